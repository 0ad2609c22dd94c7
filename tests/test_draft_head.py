"""flashc.draft_head: a draft head on the target's last hidden state (speculate="head").

Greedy output with the head is compared with an eager full-forward argmax loop on fresh
random prompts (for a trained and an untrained head: the target verifies every draft, so
identity must hold either way); sampled output is checked against the target's exact
distribution with the chi-square test of tests/test_generation.py.
"""

import pytest
import torch
from flashc_testing import fresh_ids
from test_generate import greedy_reference
from test_generation import _chi_square_z, _exact_pair_distribution, _tiny_lm

import flashc
from flashc import zoo
from flashc.decode import DecodeStep, decode_example_inputs
from flashc.draft_head import DraftHead, HeadDrafter, load_draft_head, train_draft_head
from flashc.errors import ArtifactError, FlashcError, InputError
from flashc.generation import compile_generation
from flashc.passes.quantize.calibration import CalibrationData


@pytest.fixture(scope="module")
def model():
    return zoo.build("llama-tiny", seed=0)


@pytest.fixture(scope="module")
def text_tokens(model):
    return CalibrationData.builtin(vocab_size=model.config.vocab_size).tokens[:12288]  # UTF-8 bytes


@pytest.fixture(scope="module")
def trained(model, text_tokens):
    return train_draft_head(model, text_tokens, steps=60, context=128, progress=False)


def _compile(model, head, batch=2, **kwargs):
    return compile_generation(model, "cpu", cache_len=64, batch=batch, prefill_chunk=8, draft_len=4, level=3,
                              draft_head=head, **kwargs)


@pytest.fixture(scope="module")
def gm(model, trained):
    return _compile(model, trained)


def test_hidden_output_is_the_lm_head_input(model):
    step = DecodeStep(model, 32, hidden=True)
    cm = flashc.compile(step, "cpu", decode_example_inputs(model, 2, 32, tokens=5), level=3)
    ids = fresh_ids("llama-tiny", batch=2, seq_len=5)
    kv = [torch.zeros_like(t) for t in decode_example_inputs(model, 2, 32)[2:]]
    logits, hidden = cm.executable(ids, torch.arange(5), *kv)
    assert hidden.shape == (2, 5, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(hidden), logits, rtol=1e-5, atol=1e-5)
        ref = model(ids, use_cache=False)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert DecodeStep(model, 32)(ids, torch.arange(5), *[torch.zeros_like(t) for t in kv]).shape == logits.shape


@pytest.mark.parametrize("head_kind", ["trained", "untrained"])
def test_greedy_output_is_plain_decoding(model, trained, gm, head_kind):
    target = gm if head_kind == "trained" else _compile(model, DraftHead.for_model(model, seed=3))
    for prompt_len, adaptive in ((1, False), (8, False), (13, True)):
        prompt = fresh_ids("llama-tiny", batch=2, seq_len=prompt_len)
        got, stats = target.generate(prompt, 24, speculate="head", adaptive=adaptive, return_stats=True)
        assert torch.equal(got, greedy_reference(model, prompt, 24)), (head_kind, prompt_len, adaptive)
        if not adaptive:
            assert stats.speculative_rounds > 0 and stats.proposed > 0
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=6)
    streamed = list(target.stream(prompt, 12, speculate="head", adaptive=False))
    assert torch.equal(torch.cat([prompt, *streamed], 1), greedy_reference(model, prompt, 12))


def test_sampling_keeps_the_target_distribution():
    vocab, batch = 6, 8
    model = _tiny_lm(0, vocab)
    stream = torch.randint(0, vocab, (1024,), generator=torch.Generator().manual_seed(0))
    head = train_draft_head(model, stream, steps=20, context=64, progress=False)
    gm = compile_generation(model, "cpu", cache_len=16, batch=batch, prefill_chunk=None, draft_len=3, level=1,
                            draft_head=head)
    prompt = torch.tensor([1, 4, 2, 1, 4])
    exact = _exact_pair_distribution(model, prompt, 1.0).flatten()
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    proposed = accepted = 0
    for seed in range(250):
        out, stats = gm.generate(prompt.expand(batch, -1), 3, temperature=1.0, seed=seed, speculate="head",
                                 adaptive=False, return_stats=True)
        counts += torch.bincount(out[:, -2] * vocab + out[:, -1], minlength=vocab * vocab).double()
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    assert proposed > 0 and 0 < accepted < proposed  # drafts were both kept and refused
    z = _chi_square_z(counts, exact * counts.sum())
    assert z < 3.3, f"sampling with the draft head departs from the target's distribution (z = {z:.2f})"


def test_training_lowers_the_loss_and_raises_held_out_agreement(trained):
    report = trained.training_report
    assert report.result.last_loss < 0.5 * report.result.first_loss
    assert report.agreement_after > report.agreement_before + 0.2
    assert report.held_out_tokens > 0 and trained.config.trained_steps == 60


def test_a_trained_head_is_accepted_more_than_an_untrained_one(model, text_tokens):
    """Batch 1 (a batch keeps the fewest drafts any sequence kept). The random-weight target
    falls into runs of repeated tokens, unlike text, so the head learns from the target's own
    greedy continuations of text prompts (self-distillation) and drafts on held-out prompts."""
    plain = compile_generation(model, "cpu", cache_len=128, batch=64, prefill_chunk=16, draft_len=None, level=1)
    own = plain.generate(text_tokens[:64 * 16].view(64, 16), 112, ignore_eos=True)
    head = train_draft_head(model, own.reshape(-1), steps=100, context=128, progress=False)
    prompts = text_tokens[-1200:-1200 + 12 * 16].view(12, 1, 16)
    rates = {}
    for name, h in (("trained", head), ("untrained", DraftHead.for_model(model, seed=3))):
        one = _compile(model, h, batch=1)
        for k in (1, 4):
            kept = verified = 0
            for prompt in prompts:
                got, stats = one.generate(prompt, 32, speculate="head", adaptive=False, draft_len=k,
                                          return_stats=True)
                kept, verified = kept + stats.accepted, verified + stats.proposed
            rates[name, k] = kept / verified
        assert torch.equal(got, greedy_reference(model, prompts[-1], 32))
    assert rates["trained", 1] > rates["untrained", 1] + 0.06, rates
    assert rates["trained", 4] > rates["untrained", 4], rates


def test_the_head_travels_with_the_artifact(model, gm, tmp_path):
    path = gm.save(tmp_path / "gen")
    loaded = flashc.load(path)
    assert loaded.draft_head is not None and loaded.returns_hidden
    for name, tensor in gm.draft_head.state_dict().items():
        assert torch.equal(loaded.draft_head.state_dict()[name], tensor)
    assert loaded.draft_head.embed_weight.data_ptr() == loaded.decode.program.params[
        "p_model_model_embed_tokens_weight"].data_ptr()  # the target's tensor, not a copy
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=5)
    got = loaded.generate(prompt, 12, speculate="head", adaptive=False)
    assert torch.equal(got, greedy_reference(model, prompt, 12))
    alone = gm.draft_head.save(tmp_path / "head")
    assert torch.equal(load_draft_head(alone).up.weight, gm.draft_head.up.weight)
    weights = path / "draft_head" / "head.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match="draft_head/head.safetensors"):
        flashc.load(path)


def test_mismatched_heads_and_missing_ones_are_refused(model, gm, trained):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(InputError, match="hidden size 128.*hidden size 64"):
        compile_generation(wider, "cpu", cache_len=16, draft_head=trained, level=1)
    with pytest.raises(InputError, match="ragged"):
        compile_generation(model, "cpu", cache_len=16, batch=2, ragged=True, draft_head=trained, level=1)
    plain = compile_generation(model, "cpu", cache_len=16, prefill_chunk=None, draft_len=2, level=1)
    with pytest.raises(InputError, match="train-draft"):
        plain.generate(torch.tensor([1, 2, 3]), 3, speculate="head")
    with pytest.raises(InputError, match="do not return hidden states"):
        plain.attach_draft_head(trained)
    drafter = HeadDrafter(gm.draft_head, gm.steps())
    gm.steps().feed(torch.zeros(2, 3, dtype=torch.long), 0)  # one call of the verify entry, padded to 5
    assert drafter.features(2).shape == (2, model.config.hidden_size)
    with pytest.raises(FlashcError, match="position 9, but the last call fed positions 0..4"):
        drafter.features(9)


def test_cli_trains_compiles_with_and_generates_with_a_head(model, tmp_path, capsys):
    from flashc.cli import main

    text = tmp_path / "text.txt"
    text.write_text(CalibrationData.__doc__ * 40)  # a few thousand bytes: the random model reads bytes
    head_dir, gen_dir = tmp_path / "head", tmp_path / "gen"
    assert main(["train-draft", "llama-tiny", "--steps", "5", "--context", "64", "--calibration", str(text),
                 "-o", str(head_dir)]) == 0
    assert "held-out top-1 agreement" in capsys.readouterr().out
    assert main(["compile", "llama-tiny", "--signature", "generate", "--cache-len", "32", "--prefill-chunk", "8",
                 "--draft-head", str(head_dir), "-O", "1", "-o", str(gen_dir)]) == 0
    assert "draft head:" in capsys.readouterr().out
    prompt = fresh_ids("llama-tiny", seq_len=5)[0]
    assert main(["generate", str(gen_dir), "--prompt-ids", ",".join(map(str, prompt.tolist())), "--max-new-tokens",
                 "12", "--speculate", "head"]) == 0
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed == ",".join(map(str, greedy_reference(model, prompt[None], 12)[0].tolist()))
    for args, message in ((["compile", "llama-tiny", "--draft-head", str(head_dir)], "applies to --signature generate"),
                          (["compile", "llama-tiny", "--signature", "generate", "--cache-len", "32", "--draft-head",
                            str(tmp_path / "none")], "no such directory; train a head"),
                          (["train-draft", "minilm-l6", "-o", str(tmp_path / "h2")], "encoder")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def self_distilled(model, text_tokens):
    return train_draft_head(model, text_tokens, steps=40, context=128, self_distill=12, new_tokens=20, chat=False,
                            progress=False)


def test_self_distillation_trains_on_the_models_own_greedy_answers(model, self_distilled):
    report = self_distilled.training_report
    own = report.own_answers
    assert len(own.prompts) == 12 and report.held_out_sequences == 1
    assert len({p.numel() for p in own.prompts}) > 1  # prompts of several lengths: batches were left-padded
    sequences = own.sequences()
    for i in (0, 5, 11):  # padded, generated in a batch: the same tokens as the model's own generate, alone
        alone = model.generate(own.prompts[i][None], max_new_tokens=20, do_sample=False, pad_token_id=0)[0]
        assert torch.equal(sequences[i], alone), i
        assert own.answers[i].numel() > 0
    # every position of prompt + answer has a feature, and nothing else (no padding)
    assert report.train_tokens + report.held_out_tokens == sum(s.numel() for s in sequences)
    assert report.held_out_tokens == sequences[-1].numel()
    assert report.result.last_loss < 0.5 * report.result.first_loss
    assert report.agreement_after > report.agreement_before + 0.1
    assert "own answers to 12 prompts" in report.summary()


def test_continuation_agreement_scores_the_models_own_answer(model, self_distilled):
    from flashc.draft_head import continuation_agreement

    prompt = fresh_ids("llama-tiny", batch=1, seq_len=9)[0]
    got = continuation_agreement(model, self_distilled, prompt, new_tokens=16)
    # the model's own answer: every prompt token attended (a random prompt may hold the pad id, which generate
    # would mask without an explicit mask), ending at its end-of-sequence token as the answer does
    seq = model.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=16,
                         do_sample=False, pad_token_id=0, eos_token_id=model.config.eos_token_id)
    with torch.no_grad():
        out = model(seq, output_hidden_states=True, use_cache=False)
        f = out.hidden_states[-1][0]  # the LM head's input (after the final norm)
        drafted = self_distilled.logits(self_distilled(f[:-1], seq[0, 1:])).argmax(-1)
        own = out.logits[0, 1:].argmax(-1)
    hits = (drafted == own)[8:]  # from the last prompt token on
    assert got == pytest.approx(hits.float().mean().item())
    with pytest.raises(InputError, match="tokenizer"):
        continuation_agreement(model, self_distilled, "text", 4)


def test_cli_self_distill_options(tmp_path, capsys):
    from flashc.cli import main

    text = tmp_path / "text.txt"
    text.write_text(CalibrationData.__doc__ * 10)
    assert main(["train-draft", "llama-tiny", "--steps", "3", "--calibration", str(text), "--self-distill", "4",
                 "--new-tokens", "6", "-o", str(tmp_path / "head")]) == 0
    assert "own answers to 4 prompts" in capsys.readouterr().out
    assert load_draft_head(tmp_path / "head").config.trained_steps == 3
    for args, message in ((["--self-distill", "0"], "a positive integer"), (["--self-distill", "x"], "integer"),
                          (["--self-distill", "4", "--new-tokens", "-2"], "a positive integer"),
                          (["--new-tokens", "8"], "--new-tokens applies to --self-distill"),
                          (["--self-distill", "1"], "at least 2 prompts"),
                          *([(["--device", "cuda"], "no CUDA device")] if not torch.cuda.is_available() else [])):
        assert main(["train-draft", "llama-tiny", "--calibration", str(text), *args, "-o", str(tmp_path / "h2")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_self_distill_prompts_are_chat_messages_about_paragraphs():
    from flashc.draft_head import SELF_DISTILL_CODE_INSTRUCTIONS, SELF_DISTILL_INSTRUCTIONS, self_distill_prompts

    tokenizer = zoo.tokenizer("smollm2-135m")
    tokens = CalibrationData.builtin(tokenizer).tokens  # prose, then Python source
    chat = [tokenizer.decode(p.tolist()) for p in self_distill_prompts(tokens, 12, tokenizer, chat=True)]
    asks = [a.split("{}")[0] for a in SELF_DISTILL_INSTRUCTIONS + SELF_DISTILL_CODE_INSTRUCTIONS]
    for text in chat:
        assert text.count("<|im_start|>user") == 1 and text.endswith("<|im_start|>assistant\n"), text
        assert sum(ask in text for ask in asks) == 1, text
    # the text is prose (147 paragraphs), then Python source (178): code questions only about code
    assert not any("```python" in text for text in chat[:5]) and sum("```python" in text for text in chat[6:]) >= 4
    plain = [tokenizer.decode(p.tolist()) for p in self_distill_prompts(tokens, 12, tokenizer, chat=False)]
    assert all("<|im_start|>" not in text and 20 <= len(text.split()) <= 200 for text in plain)
    assert plain[0].split()[:5] == chat[0].split("\n\n")[1].split()[:5]  # the same paragraph, without the message
    with pytest.raises(InputError, match="tokenizer"):
        self_distill_prompts(tokens, 4, None, chat=True)


def test_cli_passes_the_unroll_length_to_training(tmp_path, monkeypatch):
    """`train-draft --unroll K` trains drafts 1..K on the head's own predictions (default 2)."""
    import flashc.draft_head as draft_head
    from flashc.cli import main

    seen = []

    def record(model, tokens, **kwargs):
        seen.append(kwargs["unroll"])
        raise InputError("stop here")

    monkeypatch.setattr(draft_head, "train_draft_head", record)
    text = tmp_path / "text.txt"
    text.write_text(CalibrationData.__doc__ * 40)
    for extra in ([], ["--unroll", "4"]):
        assert main(["train-draft", "llama-tiny", "--calibration", str(text), *extra, "-o", str(tmp_path / "h")]) == 2
    assert seen == [2, 4]

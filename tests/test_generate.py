"""CompiledModel.generate: greedy decoding equals an eager full-forward argmax loop; sampling rules."""

import pytest
import torch
from flashc_testing import fresh_ids

import flashc
from flashc import zoo
from flashc.decode import DecodeStep, decode_example_inputs
from flashc.errors import InputError
from flashc.generate import sample_next


def greedy_reference(model, ids, n):
    """Argmax decoding by eager full forwards (no cache): the slow, obvious way."""
    out = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(out, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
    return out


@pytest.mark.parametrize("family", ["llama-tiny", "mixtral-tiny"])
def test_greedy_generate_matches_full_forward(tiny_models, family):
    model = tiny_models[family]
    cm = flashc.compile(DecodeStep(model, 24), "cpu", decode_example_inputs(model, 2, 24), level=3)
    prompt = fresh_ids(family, batch=2, seq_len=5)
    got = cm.generate(prompt, 8)
    assert got.shape == (2, 13) and torch.equal(got[:, :5], prompt)
    assert torch.equal(got, greedy_reference(model, prompt, 8))
    again = cm.generate(prompt, 8)  # the resident cache is reused: same answer
    assert torch.equal(again, got)


def test_generate_errors(tiny_models):
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 1, 16), level=2)
    with pytest.raises(InputError, match="does not fit the static KV cache of 16"):
        cm.generate(fresh_ids("llama-tiny", seq_len=10), 7)
    with pytest.raises(InputError, match="compiled for batch 1"):
        cm.generate(fresh_ids("llama-tiny", batch=2, seq_len=3), 2)
    inputs = list(decode_example_inputs(model, 1, 16))
    inputs[1] = torch.tensor([16])
    with pytest.raises(InputError, match="cache_position.*outside the static KV cache of 16"):
        cm(*inputs)
    prefill = flashc.compile(model, "cpu", (fresh_ids("llama-tiny"),), level=1)
    with pytest.raises(InputError, match="decode-step signature"):
        prefill.generate(fresh_ids("llama-tiny"), 2)


def test_sampling_is_seeded_and_respects_top_k_and_top_p(tiny_models):
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 24), "cpu", decode_example_inputs(model, 1, 24), level=3)
    prompt = fresh_ids("llama-tiny", seq_len=4)
    a = cm.generate(prompt, 10, temperature=1.0, seed=7)
    b = cm.generate(prompt, 10, temperature=1.0, seed=7)
    assert torch.equal(a, b)
    assert torch.equal(cm.generate(prompt, 6, temperature=0.8, top_k=1, seed=3), cm.generate(prompt, 6))

    logits = torch.randn(3, 50)
    g = torch.Generator().manual_seed(0)
    top3 = torch.topk(logits, 3).indices
    for _ in range(50):
        tok = sample_next(logits, 1.0, top_k=3, generator=g)
        assert all(t in row for t, row in zip(tok.tolist(), top3.tolist()))
    probs = torch.softmax(logits, -1)
    for _ in range(50):
        tok = sample_next(logits, 1.0, top_p=0.5, generator=g)
        for row, t in enumerate(tok.tolist()):
            ahead = probs[row][probs[row] > probs[row, t]].sum()
            assert ahead < 0.5  # the token was needed to reach p
    with pytest.raises(InputError, match="temperature"):
        sample_next(logits, -1.0)


def test_generate_stops_at_the_models_end_token_and_takes_a_tokenizers_output():
    """The end token comes from the model's generation config, as Hugging Face's generate stops there;
    ignore_eos generates every token; a tokenizer's output (input_ids + attention_mask) is a prompt."""
    import copy

    model = copy.deepcopy(zoo.build("llama-tiny", seed=3))
    ids = torch.randint(0, 512, (1, 5))
    want = greedy_reference(model, ids, 10)[0, 5:].tolist()
    eos = next(t for i, t in enumerate(want) if i >= 2 and t not in want[:i])  # first appears at step >= 2
    stop = want.index(eos)
    model.generation_config.eos_token_id = eos
    cm = flashc.compile(DecodeStep(model, 24), "cpu", decode_example_inputs(model, 1, 24), level=2)
    assert cm.program.meta.eos_token_id == eos
    got = cm.generate(ids, 10)[0, 5:].tolist()
    assert got == want[:stop + 1]  # stopped at the end token (every sequence has: the output ends there)
    assert cm.generate(ids, 10, ignore_eos=True)[0, 5:].tolist() == want
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert cm.generate(batch, 10, ignore_eos=True)[0, 5:].tolist() == want
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1, 1]])}
    with pytest.raises(InputError, match="ragged"):
        cm.generate(padded, 10)
    # the end token survives saving and loading
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        assert flashc.load(cm.save(d)).program.meta.eos_token_id == eos

"""GenerationModel: prefill/decode/verify entries over one KV cache, speculation, artifacts.

Greedy output is compared with an eager full-forward argmax loop on fresh random prompts;
speculative sampling is checked against the target's exact next-token distributions with a
chi-square test on a model small enough to enumerate them.
"""

import math

import pytest
import torch
from flashc_testing import fresh_ids
from test_generate import greedy_reference

import flashc
from flashc import zoo
from flashc.errors import ArtifactError, InputError
from flashc.generate import Sampling, Steps
from flashc.generation import GenerationModel, compile_generation
from flashc.speculate import NgramDrafter, Plan, Speculator, accept


@pytest.fixture(scope="module")
def target():
    model = zoo.build("llama-tiny", seed=0)
    return model, compile_generation(model, "cpu", cache_len=64, batch=2, prefill_chunk=8, draft_len=4, level=3)


@pytest.fixture(scope="module")
def drafter():
    return compile_generation(zoo.build("llama-tiny", seed=1), "cpu", cache_len=64, batch=2, prefill_chunk=8,
                              draft_len=None, level=2)


def repetitive(batch: int, period: int, times: int) -> torch.Tensor:
    """Prompts that repeat themselves, so prompt lookup finds continuations."""
    return fresh_ids("llama-tiny", batch=batch, seq_len=period).repeat(1, times)


@pytest.mark.parametrize("prompt_len", [1, 7, 8, 13, 21])
def test_prefill_then_decode_is_greedy_decoding(target, prompt_len):
    model, gm = target
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=prompt_len)
    out, stats = gm.generate(prompt, 10, return_stats=True)
    assert torch.equal(out, greedy_reference(model, prompt, 10))
    assert stats.new_tokens == 10 and stats.rounds == 9 and stats.prompt_tokens == prompt_len


def test_speculation_is_lossless_under_greedy(target, drafter):
    model, gm = target
    for speculate in ("ngram", drafter):
        for adaptive in (True, False):
            prompt = repetitive(2, 5, 3)
            want = greedy_reference(model, prompt, 24)
            got, stats = gm.generate(prompt, 24, speculate=speculate, adaptive=adaptive, return_stats=True)
            assert torch.equal(got, want), (speculate, adaptive)
            assert stats.new_tokens == 24
            if not adaptive:
                assert stats.speculative_rounds > 0


def test_a_perfect_drafter_is_accepted_whole(target):
    model, gm = target
    twin = GenerationModel(gm.entries)  # the same weights with their own cache: every draft is right
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=6)
    got, stats = gm.generate(prompt, 21, speculate=twin, adaptive=False, return_stats=True)
    assert torch.equal(got, greedy_reference(model, prompt, 21))
    assert stats.acceptance_rate == 1.0 and stats.mean_accepted_length == 5.0
    assert stats.rounds == 4  # 1 token from the prefill, then 4 rounds of 5
    report = gm.report()
    assert "verify" in report and "acceptance rate" in report and "1.000" in report


def test_eos_stops_each_sequence(target):
    model, gm = target
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=5)
    free = gm.generate(prompt, 12)
    eos = int(free[0, 5 + 3])  # the first sequence's fourth new token
    got = gm.generate(prompt, 12, eos_token_id=eos, speculate="ngram")
    row = got[0, 5:].tolist()
    first = row.index(eos)
    assert all(t == eos for t in row[first:]) and first <= 3
    other = free[1, 5:].tolist()
    if eos not in other:
        assert got[1, 5:5 + len(row)].tolist() == other[:len(row)]


def test_stream_and_callback_give_the_rounds(target):
    _, gm = target
    prompt = repetitive(2, 4, 3)
    seen = []
    out = gm.generate(prompt, 15, speculate="ngram", on_tokens=seen.append)
    assert torch.equal(torch.cat([prompt, *seen], 1), out)
    streamed = list(gm.stream(prompt, 15, speculate="ngram"))
    assert torch.equal(torch.cat([prompt, *streamed], 1), out)


def test_prompt_forms(target):
    model, gm = target
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=6)
    want = greedy_reference(model, prompt, 5)
    as_list = gm.generate([prompt[0], prompt[1]], 5)
    assert isinstance(as_list, list) and all(torch.equal(a, b) for a, b in zip(as_list, want))


def test_artifact_round_trip_and_old_decode_artifacts(target, tmp_path):
    model, gm = target
    gm.save(tmp_path / "gen")
    loaded = flashc.load(tmp_path / "gen")
    assert isinstance(loaded, GenerationModel) and set(loaded.entries) == {"decode", "prefill", "verify"}
    prompt = repetitive(2, 5, 2)
    want = greedy_reference(model, prompt, 9)
    assert torch.equal(loaded.generate(prompt, 9, speculate="ngram"), want)
    gm.entries["decode"].save(tmp_path / "decode")  # a single decode-step artifact, as before
    old = flashc.load(tmp_path / "decode")
    assert isinstance(old, flashc.CompiledModel)
    assert torch.equal(old.generate(prompt, 9), want)
    assert torch.equal(GenerationModel.from_decode(old).generate(prompt, 9), want)


def test_corrupt_generation_artifact_is_refused(target, tmp_path):
    _, gm = target
    path = gm.save(tmp_path / "gen")
    weights = path / "verify" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(flashc.ArtifactError, match="verify/weights.safetensors"):
        flashc.load(path)


def test_bad_input_is_refused_with_the_option_named(target, drafter):
    model, gm = target
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=6)
    with pytest.raises(InputError, match="different lengths"):
        gm.generate([prompt[0], prompt[1, :4]], 3)
    with pytest.raises(InputError, match="batch 2"):
        gm.generate(prompt[:1], 3)
    with pytest.raises(InputError, match="does not fit the static KV cache of 64"):
        gm.generate(prompt, 60)
    with pytest.raises(InputError, match="draft_len must be in 1..4"):
        gm.generate(prompt, 3, speculate="ngram", draft_len=5)
    with pytest.raises(InputError, match="known are 'ngram'"):
        gm.generate(prompt, 3, speculate="medusa")
    with pytest.raises(InputError, match="in-memory module"):
        gm.generate(prompt, 3, speculate="layerskip:1")
    with pytest.raises(InputError, match="no verify entry"):
        drafter.generate(prompt, 3, speculate="ngram")
    with pytest.raises(InputError, match="draft_len applies to speculation"):
        gm.generate(prompt, 3, draft_len=2)
    with pytest.raises(InputError, match="tokenizer"):
        gm.generate("hello", 3)
    with pytest.raises(InputError, match="vocabulary"):
        gm.generate(torch.full((2, 3), 512), 3)
    with pytest.raises(InputError, match="temperature"):
        gm.generate(prompt, 3, temperature=-1.0, speculate="ngram")
    other = compile_generation(zoo.build("llama-tiny", seed=2), "cpu", cache_len=64, batch=1, prefill_chunk=None,
                               draft_len=None, level=1)
    with pytest.raises(InputError, match="compiled for batch 1, the target for 2"):
        gm.generate(prompt, 3, speculate=other)
    short = compile_generation(zoo.build("llama-tiny", seed=2), "cpu", cache_len=32, batch=2, prefill_chunk=None,
                               draft_len=None, level=1)
    with pytest.raises(InputError, match="shorter than the target's"):
        gm.generate(prompt, 3, speculate=short)
    with pytest.raises(InputError, match="prefill_chunk"):
        compile_generation(model, "cpu", cache_len=16, prefill_chunk=32)


def test_plan_uses_the_fewest_calls_and_pads_only_inside_the_cache():
    steps = Steps({1: None, 5: None, 8: None}, [torch.zeros(1, 1, 20, 2)])
    # (step size, new tokens, tokens fed again): a padded 5 would reach 20, so it starts 2 early
    assert steps.plan(19, 0) == [(8, 8, 0), (8, 8, 0), (5, 3, 2)]
    assert steps.plan(12, 0) == [(8, 8, 0), (5, 4, 0)]
    assert steps.plan(4, 0) == [(5, 4, 0)]
    # a padded call would run past position 19, and this feed wrote nothing before it to feed again
    assert steps.plan(3, 17) == [(1, 1, 0), (1, 1, 0), (1, 1, 0)]
    assert steps.plan(4, 15) == [(5, 4, 0)]
    stateful = Steps({1: None, 5: None, 8: None}, [torch.zeros(1, 1, 20, 2)], stateful=True)
    assert stateful.plan(19, 0) == [(8, 8, 0), (8, 8, 0), (1, 1, 0), (1, 1, 0), (1, 1, 0)]


def test_a_prompt_tail_past_the_padding_room_is_one_call_that_feeds_tokens_again():
    """A 1,000-token prompt in chunks of 512 with a cache of 1,016 positions: the 488-token
    tail cannot be padded to 512 inside the cache, so it starts 24 tokens early (it was fed
    a token a step: 488 decode calls)."""
    model = zoo.build("llama-tiny", seed=0)
    gm = compile_generation(model, "cpu", cache_len=20, batch=1, prefill_chunk=8, draft_len=None, level=3)
    steps = gm.steps()
    assert steps.plan(19, 0) == [(8, 8, 0), (8, 8, 0), (8, 3, 5)]
    x = fresh_ids("llama-tiny", batch=1, seq_len=19)
    with torch.no_grad():
        ref = model(x).logits
    torch.testing.assert_close(steps.feed(x, 0, all_logits=True), ref, rtol=1e-4, atol=1e-4)
    prompt = x[:, :17]
    assert torch.equal(gm.generate(prompt, 3), greedy_reference(model, prompt, 3))


def test_adaptive_draft_length_turns_speculation_off_when_it_would_be_slower():
    spec = Speculator(NgramDrafter(), max_draft=4)
    assert spec.choose(4) == 0  # nothing measured: time a plain step first
    spec.observe_plain(1.0)
    assert spec.choose(4) == 4  # then a verify round
    spec.learned.timing.verify = 1.2
    spec.learned.counts[0] = [9.0, 1.0]  # drafts usually kept: speculate fully
    assert spec.choose(4) == 4
    spec.learned.counts[0] = [0.1, 5.0]  # drafts almost never kept: a verify costs more than it gives
    assert [spec.choose(4) for _ in range(Speculator.PROBE_EVERY - 1)] == [0] * (Speculator.PROBE_EVERY - 1)
    assert spec.choose(4) == 4  # a probe now and then
    spec.learned.counts[3] = [9.0, 1.0]  # ...while 3-gram matches are usually kept
    assert spec.choose(4, evidence=3) == 4 and spec.choose(4, evidence=0) == 0
    spec.learned.timing.draft, spec.learned.counts[0] = 0.5, [3.0, 1.0]  # a costly drafter: a shorter draft pays more
    assert 0 < spec.choose(4) < 4


def test_ngram_evidence_is_how_far_back_the_match_goes():
    drafter = NgramDrafter(max_ngram=3)
    passage = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    # copying the passage: the last 6 tokens match its start, so the evidence is 6 (not the 3 looked up)
    drafts, evidence = drafter.lookup(0, [1, 2] + passage + [0] + passage[:6], 3)
    assert drafts == passage[6:9] and evidence == 6
    fresh = NgramDrafter(max_ngram=3)  # a match longer than MAX_EVIDENCE counts as MAX_EVIDENCE
    _, evidence = fresh.lookup(0, passage + [0] + passage, 2)
    assert evidence == NgramDrafter.MAX_EVIDENCE
    _, evidence = NgramDrafter(max_ngram=3).lookup(0, [1, 2, 3, 9, 2, 3], 2)  # only "2 3" recurs
    assert evidence == 2


def test_a_declined_ngram_plan_is_scored_against_the_plain_step():
    spec = Speculator(NgramDrafter(), max_draft=4)
    spec.observe_plain(1.0)
    spec.learned.timing.verify = 1.5
    spec.learned.counts[3] = [0.1, 5.0]  # 3-token matches judged poor: their plans are declined
    tokens = torch.tensor([[1, 2, 3, 4, 9, 1, 2, 3]])
    assert spec.plan(tokens, 8, Sampling.make(0.0, None, None, None, "cpu"), tokens.tolist()) is None
    assert spec.shadow == ([4], 3)  # the first draft, to check against the token the plain step emits
    before = spec.acceptance(3)
    spec.observe_plain(1.0, [[4]])  # it was right: one kept draft of that evidence
    assert spec.acceptance(3) > before and spec.shadow is None
    assert spec.plan(tokens, 8, Sampling.make(0.0, None, None, None, "cpu"), tokens.tolist()) is None
    before = spec.acceptance(3)
    spec.observe_plain(1.0, [[7]])  # wrong: one refused
    assert spec.acceptance(3) < before
    counts = {e: list(c) for e, c in spec.learned.counts.items()}
    spec.observe_plain(1.0, [[4]])  # a plain round without a declined plan changes no estimate
    assert spec.learned.counts == counts


def test_failed_probes_wait_longer_and_a_model_drafter_probes_with_one_draft():
    class CostlyDrafter:  # stands for a draft model: every draft is a step of it
        cheap = False

        def reset(self):
            pass

    for drafter, probe_k in ((NgramDrafter(), 4), (CostlyDrafter(), 1)):
        spec = Speculator(drafter, max_draft=4)
        assert spec.choose(4) == 0
        spec.observe_plain(1.0)
        assert spec.choose(4) == probe_k  # the first verify round measures
        spec.learned.timing.verify = 1.2
        spec.learned.counts[0] = [0.1, 5.0]  # drafts almost never kept
        gaps, since = [], 0
        for _ in range(16 + 32 + 64 + 1):
            k = spec.choose(4)
            since += 1
            if k:
                assert k == probe_k
                gaps.append(since)
                since = 0
        assert gaps == [16, 32, 64], gaps  # each failed probe doubles the wait
        spec.learned.counts[0] = [9.0, 1.0]  # conditions changed: speculation pays again
        assert spec.choose(4) > 0 and spec.learned.probe_every == Speculator.PROBE_EVERY


def test_a_greedy_model_drafter_probes_without_a_verify_round():
    """Once a verify round has been timed, a model drafter's probe in greedy decoding drafts one token and lets a
    plain step run: the draft is scored against the token that step emits (kept exactly when it is that token).
    Sampling still probes with a verify round (a sampled draft's chance of being kept is not the chance that the
    plain step draws it)."""

    class OneDraft:  # stands for a draft model: proposes a fixed token, counts its calls
        cheap = False

        def __init__(self):
            self.calls = []

        def reset(self):
            pass

        def propose(self, tokens, k, sampling, rows=None):
            self.calls.append(k)
            return Plan(torch.full((tokens.shape[0], k), 7, dtype=tokens.dtype))

    greedy = Sampling.make(0.0, None, None, None, "cpu")
    tokens = torch.tensor([[1, 2, 3]])
    drafter = OneDraft()
    spec = Speculator(drafter, max_draft=4)
    spec.observe_plain(1.0)
    first = spec.plan(tokens, 8, greedy)
    assert first is not None and first.k == 1  # no verify round timed yet: the first probe is one
    spec.learned.timing.verify = 1.5
    spec.learned.counts[0] = [0.1, 5.0]  # drafts almost never kept
    rounds = [spec.plan(tokens, 8, greedy) for _ in range(Speculator.PROBE_EVERY)]
    assert rounds == [None] * Speculator.PROBE_EVERY  # all plain steps, the last one with a draft beside it
    assert drafter.calls == [1, 1] and spec.shadow is not None and spec.shadow[0].tolist() == [7]
    before = spec.acceptance(0)
    spec.observe_plain(1.0, [[7]])  # the plain step picked the drafted token
    assert spec.acceptance(0) > before and spec.shadow is None
    spec.plan(tokens, 8, greedy)
    spec.learned.idle = spec.learned.probe_every - 1
    assert spec.plan(tokens, 8, greedy) is None
    before = spec.acceptance(0)
    spec.observe_plain(1.0, [[8]])  # it picked another
    assert spec.acceptance(0) < before

    sampled = Speculator(OneDraft(), max_draft=4)
    sampled.observe_plain(1.0)
    sampled.learned.timing.verify = 1.5
    sampled.learned.counts[0] = [0.1, 5.0]
    sampled.learned.idle = sampled.learned.probe_every - 1
    plan = sampled.plan(tokens, 8, Sampling.make(0.8, None, None, 0, "cpu"))
    assert plan is not None and plan.k == 1 and sampled.shadow is None


def test_what_speculation_measured_carries_over_to_the_next_call(target):
    """A generate() call starts from what earlier calls with the same drafter measured: step times
    (no first probe just to time a verify round) and the probe wait (a drafter that did not pay is
    not probed from scratch on every prompt). Another drafter, draft length or kind of sampling starts
    afresh, as does k fixed (adaptive=False); the output is what plain decoding gives whatever was
    learned."""
    model, gm = target
    for _ in range(20):  # a prompt whose continuation prompt lookup matches: ~4% of random ones never do
        gm._learned.clear()
        prompt = repetitive(2, 5, 3)
        first, stats = gm.generate(prompt, 12, speculate="ngram", draft_len=3, return_stats=True)
        if stats.speculative_rounds:
            break
    plain = gm.generate(prompt, 12)
    (learned,) = gm._learned.values()
    assert learned.timing.plain is not None and learned.timing.verify is not None
    learned.probe_every, learned.idle = 64, 0  # as after failed probes
    learned.counts.clear()
    learned.counts.update({e: [0.0, 1000.0] for e in range(9)})  # drafts judged never kept
    learned.timing.verify = 1e3  # and verify rounds judged slow: scoring declined plans cannot turn it on
    again, stats = gm.generate(prompt, 12, speculate="ngram", draft_len=3, return_stats=True)
    assert torch.equal(first, plain) and torch.equal(again, plain)
    assert stats.speculative_rounds == 0 and learned.idle > 0  # no probe yet: the wait carried over
    gm.generate(prompt, 12, speculate="ngram", draft_len=2)
    gm.generate(prompt, 12, speculate="ngram", draft_len=3, temperature=0.8, seed=0)
    gm.generate(prompt, 12, speculate="ngram", draft_len=3, adaptive=False)
    assert len(gm._learned) == 4


def test_exact_verify_compiles_a_row_invariant_verify_entry_that_artifacts_keep(tmp_path):
    """exact_verify=True (CUDA targets): the verify entry's CUDA options say row_invariant (its kernels then
    compute each token as the decode entry does; tests/codegen check them bit for bit), the other entries
    not; saved and loaded, the verify entry keeps it. Compiled on this CPU machine for an H100."""
    from flashc.generation import load_generation

    model = zoo.build("llama-tiny", dtype=torch.bfloat16, seed=0)
    gm = compile_generation(model, "h100", cache_len=32, batch=1, prefill_chunk=8, draft_len=3, level=3,
                            verify=False, exact_verify=True)
    assert gm.entries["verify"].executable.row_invariant
    assert not gm.entries["decode"].executable.row_invariant
    path = gm.save(tmp_path / "gen")
    loaded = load_generation(path)
    assert loaded.entries["verify"].executable.row_invariant
    assert not loaded.entries["decode"].executable.row_invariant
    (options,) = path.rglob("cuda_options.json")
    options.write_text("{")  # damaged: a clear error, not a verify entry silently computed otherwise
    with pytest.raises(ArtifactError):
        load_generation(path)


@pytest.mark.parametrize("kwargs,match", [
    ({"target": "cpu"}, "does not run the CUDA backend"),
    ({"batch": 2}, "batch 2"),
    ({"draft_len": None}, "no verify entry"),
    ({"model": "mixtral-tiny"}, "flashc.moe"),
])
def test_exact_verify_refuses_what_it_cannot_make_exact(kwargs, match):
    model = zoo.build(kwargs.pop("model", "llama-tiny"), dtype=torch.bfloat16, seed=0)
    args = {"target": "h100", "batch": 1, "draft_len": 3, **kwargs}
    with pytest.raises(InputError, match=match):
        compile_generation(model, args.pop("target"), cache_len=32, prefill_chunk=8, level=3, verify=False,
                           exact_verify=True, **args)


def test_greedy_acceptance_keeps_the_common_prefix():
    logits = torch.full((2, 4, 10), -5.0)
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 7, 8]])
    logits.scatter_(-1, target[..., None], 5.0)
    new, n = accept(logits, Plan(torch.tensor([[1, 2, 3], [1, 2, 3]])), Sampling())
    assert n == 2 and new.tolist() == [[1, 2, 3], [1, 2, 7]]


# -- speculative sampling keeps the target's distribution --------------------------------


def _tiny_lm(seed: int, vocab: int = 6):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: compared over the full length
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # distributions far from uniform, and far from the drafter's
    return model


def _exact_pair_distribution(model, prompt: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(x2, x3) of the second and third new tokens under the model, summed over the first."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        p1 = torch.softmax(model(prompt[None]).logits[0, -1].double() / temperature, -1)
        firsts = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        p2 = torch.softmax(model(firsts).logits[:, -1].double() / temperature, -1)  # [x1, x2]
        both = torch.cat([firsts.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(vocab)[:, None]], 1)
        p3 = torch.softmax(model(both).logits[:, -1].double() / temperature, -1).view(vocab, vocab, vocab)
    return torch.einsum("a,ab,abc->bc", p1, p2, p3)


def _chi_square_z(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """The chi-square statistic as a standard normal deviate (Wilson-Hilferty), cells pooled
    until each expects at least 5."""
    order = torch.argsort(expected)
    e, c = expected[order].tolist(), counts[order].tolist()
    cells, acc_e, acc_c = [], 0.0, 0.0
    for ei, ci in zip(e, c):
        acc_e, acc_c = acc_e + ei, acc_c + ci
        if acc_e >= 5:
            cells.append((acc_e, acc_c))
            acc_e, acc_c = 0.0, 0.0
    if acc_e:
        last_e, last_c = cells.pop()
        cells.append((last_e + acc_e, last_c + acc_c))
    stat = sum((cj - ej) ** 2 / ej for ej, cj in cells)
    df = len(cells) - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


@pytest.mark.parametrize("drafter_kind, batch, calls", [("model", 8, 250), ("ngram", 2, 800)])
def test_speculative_sampling_keeps_the_target_distribution(drafter_kind, batch, calls):
    vocab, temperature = 6, 1.0
    model = _tiny_lm(0, vocab)
    gm = compile_generation(model, "cpu", cache_len=16, batch=batch, prefill_chunk=None, draft_len=3, level=1)
    prompt = torch.tensor([1, 4, 2, 1, 4])  # the prompt repeats itself: prompt lookup drafts
    if drafter_kind == "model":
        import copy

        near = copy.deepcopy(model)  # a drafter close to the target but not equal: flatter, so often refused
        with torch.no_grad():
            near.lm_head.weight.mul_(0.5)
        speculate = compile_generation(near, "cpu", cache_len=16, batch=batch, prefill_chunk=None, draft_len=None,
                                       level=1)
    else:
        speculate = "ngram"
    exact = _exact_pair_distribution(model, prompt, temperature).flatten()
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    proposed = accepted = 0
    for seed in range(calls):
        out, stats = gm.generate(prompt.expand(batch, -1), 3, temperature=temperature, seed=seed,
                                 speculate=speculate, adaptive=False, return_stats=True)
        pairs = out[:, -2] * vocab + out[:, -1]
        counts += torch.bincount(pairs, minlength=vocab * vocab).double()
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    assert proposed > 0 and 0 < accepted < proposed  # drafts were both kept and refused
    z = _chi_square_z(counts, exact * counts.sum())
    assert z < 3.3, f"speculative sampling's output departs from the target's distribution (z = {z:.2f})"


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("deterministic_drafts", [False, True])
def test_acceptance_rule_emits_the_target_distribution(batch, deterministic_drafts):
    """accept() alone, on fixed target (p) and draft (q) distributions per position: every
    emitted token at position i must be distributed as p_i, whatever the drafts and however
    many tokens the other sequences of the batch kept."""
    vocab, k = 5, 2
    g = torch.Generator().manual_seed(0)
    p_logits = torch.randn(k + 1, vocab, generator=g) * 2
    q = torch.softmax(torch.randn(k, vocab, generator=g) * 2, -1)
    sampling = Sampling(temperature=1.0, generator=g)
    counts = torch.zeros(k + 1, vocab, dtype=torch.float64)
    for _ in range(4000 // batch):
        if deterministic_drafts:  # prompt lookup: drafts fixed in advance (here the likeliest), q one-hot
            drafts = p_logits[:k].argmax(-1).expand(batch, -1)
            plan = Plan(drafts)
        else:
            drafts = torch.multinomial(q, batch, replacement=True, generator=g).T
            plan = Plan(drafts, q.expand(batch, -1, -1))
        new, _ = accept(p_logits.expand(batch, -1, -1), plan, sampling)
        for i in range(new.shape[1]):
            counts[i] += torch.bincount(new[:, i], minlength=vocab).double()
    p = torch.softmax(p_logits.double(), -1)
    for i in range(k + 1):
        if counts[i].sum() >= 200:
            z = _chi_square_z(counts[i], p[i] * counts[i].sum())
            assert z < 3.3, f"position {i}: emitted tokens depart from the target's distribution (z = {z:.2f})"
    assert counts[0].sum() == 4000 // batch * batch and counts[1].sum() > 0


def test_the_chi_square_check_can_fail():
    """The same statistic rejects samples drawn from the drafter's distribution instead."""
    vocab = 6
    target, other = _tiny_lm(0, vocab), _tiny_lm(1, vocab)
    prompt = torch.tensor([1, 4, 2, 1, 4])
    exact = _exact_pair_distribution(target, prompt, 1.0).flatten()
    wrong = _exact_pair_distribution(other, prompt, 1.0).flatten()
    counts = torch.bincount(torch.multinomial(wrong.float(), 2000, replacement=True, generator=torch.Generator()
                                              .manual_seed(0)), minlength=vocab * vocab).double()
    assert _chi_square_z(counts, exact * counts.sum()) > 3.3


def test_entries_hold_and_store_shared_weights_once(target, tmp_path):
    _, gm = target
    decode, prefill = gm.entries["decode"].program.params, gm.entries["prefill"].program.params
    common = set(decode) & set(prefill)
    assert common and all(prefill[n] is decode[n] for n in common)
    path = gm.save(tmp_path / "gen")
    size = {name: (path / name / "weights.safetensors").stat().st_size for name in gm.entries}
    assert size["prefill"] < size["decode"] / 10 and size["verify"] < size["decode"] / 10
    loaded = flashc.load(path)
    assert all(loaded.entries["verify"].program.params[n] is loaded.entries["decode"].program.params[n]
               for n in set(decode) & set(gm.entries["verify"].program.params))
    with pytest.raises(flashc.ArtifactError, match="live in the artifact this one is part of"):
        flashc.load(path / "prefill")


def test_text_in_text_out_and_streamed_text():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = zoo.tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()  # random weights, SmolLM2's vocabulary: text in, text out
    gm = compile_generation(model, "cpu", cache_len=48, prefill_chunk=16, draft_len=3, tokenizer="smollm2-135m",
                            level=1)
    prompt = "The quick brown fox"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    want = greedy_reference(model, ids, 12)[0]
    eos = tokenizer.eos_token_id
    if eos in want[ids.shape[1]:].tolist():
        want = want[:ids.shape[1] + want[ids.shape[1]:].tolist().index(eos) + 1]
    text = gm.generate(prompt, 12, speculate="ngram")
    assert text == tokenizer.decode(want.tolist(), skip_special_tokens=True) and text.startswith(prompt)
    pieces = list(gm.stream(prompt, 12))
    assert "".join(pieces) == tokenizer.decode(want[ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert gm.generate([prompt], 12) == [text]


# -- a position per sequence: prompts of different lengths ------------------------------------


@pytest.fixture(scope="module")
def ragged_target():
    model = zoo.build("llama-tiny", seed=0)
    return model, compile_generation(model, "cpu", cache_len=64, batch=3, prefill_chunk=8, draft_len=4, ragged=True,
                                     level=3)


def test_prompts_of_different_lengths_each_decode_as_alone(ragged_target):
    model, gm = ragged_target
    assert gm.ragged
    prompts = [fresh_ids("llama-tiny", seq_len=n)[0] for n in (3, 11, 20)]
    for speculate in (None, "ngram"):
        out, stats = gm.generate(prompts, 14, speculate=speculate, adaptive=False, return_stats=True)
        for got, prompt in zip(out, prompts):
            assert torch.equal(got, greedy_reference(model, prompt[None], 14)[0]), speculate


def test_ragged_prompt_tails_past_the_padding_room_feed_their_own_tokens_again():
    """Cache of 20, chunks of 8: a 19-token prompt's 3-token tail cannot be padded to 8 inside
    the cache, so its last call starts 5 tokens early; the 10-token prompt beside it too."""
    model = zoo.build("llama-tiny", seed=0)
    gm = compile_generation(model, "cpu", cache_len=20, batch=2, prefill_chunk=8, draft_len=None, ragged=True,
                            level=3)
    from flashc.ragged import feed_rows
    x = fresh_ids("llama-tiny", batch=1, seq_len=19)[0]
    rows = [x.tolist(), x[:10].tolist()]
    calls = []
    steps = gm.steps()
    steps.calls = {t: (lambda f, t=t: lambda *a: calls.append(t) or f(*a))(f) for t, f in steps.calls.items()}
    logits = feed_rows(steps, rows, [0, 0], all_logits=True)
    assert calls == [8, 8, 8]
    with torch.no_grad():
        ref = model(x[None]).logits[0]
    torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], ref[:10], rtol=1e-4, atol=1e-4)
    prompts = [x[:17], x[:9]]
    out = gm.generate(prompts, 3)
    for got, prompt in zip(out, prompts):
        assert torch.equal(got, greedy_reference(model, prompt[None], 3)[0])


def test_each_sequence_keeps_its_own_drafts(ragged_target):
    model, gm = ragged_target
    prompts = [repetitive(1, 4, 4)[0], fresh_ids("llama-tiny", seq_len=7)[0], repetitive(1, 6, 2)[0]]
    out, stats = gm.generate(prompts, 20, speculate="ngram", adaptive=False, return_stats=True)
    for got, prompt in zip(out, prompts):
        assert torch.equal(got, greedy_reference(model, prompt[None], 20)[0])
    # some sequence took several tokens a round (the round count is set by the random prompt, which may
    # draft nothing: only the kept drafts say so)
    assert stats.speculative_rounds > 0 and stats.accepted > 0


def test_a_padded_tokenizer_output_is_one_prompt_per_row(ragged_target):
    """input_ids with an attention_mask marking left padding: each row's kept tokens are its prompt."""
    _, gm = ragged_target
    prompts = [fresh_ids("llama-tiny", seq_len=n)[0] for n in (3, 7, 5)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p):], mask[i, 7 - len(p):] = p, 1
    got = gm.generate({"input_ids": ids, "attention_mask": mask}, 6)
    for g, w in zip(got, gm.generate(prompts, 6)):
        assert torch.equal(g, w)


def test_ragged_sequences_stop_at_their_own_end_token(ragged_target):
    _, gm = ragged_target
    prompts = [fresh_ids("llama-tiny", seq_len=n)[0] for n in (5, 9, 2)]
    free = gm.generate(prompts, 10)
    eos = int(free[1][9 + 2])  # the second sequence's third new token
    got = gm.generate(prompts, 10, eos_token_id=eos)
    for g, f, p in zip(got, free, prompts):
        new = f[len(p):].tolist()
        want = new[:new.index(eos) + 1] if eos in new else new
        assert g[len(p):].tolist() == want
    with pytest.raises(InputError, match="speculate with speculate='ngram' only"):
        gm.generate(prompts, 3, speculate=GenerationModel(gm.entries))


def test_one_sequence_acceptance_rule_keeps_the_target_distribution():
    from flashc.ragged import _accept_row

    vocab, k = 5, 2
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(k + 1, vocab, generator=g) * 2
    drafts = logits[:k].argmax(-1).tolist()
    sampling = Sampling(temperature=1.0, generator=g)
    counts = torch.zeros(k + 1, vocab, dtype=torch.float64)
    for _ in range(4000):
        _, new = _accept_row(logits, drafts, sampling)
        for i, t in enumerate(new):
            counts[i, t] += 1
    p = torch.softmax(logits.double(), -1)
    for i in range(k + 1):
        if counts[i].sum() >= 200:
            assert _chi_square_z(counts[i], p[i] * counts[i].sum()) < 3.3, i
    assert counts[1].sum() > 200


def test_random_positions_of_a_multi_token_step_are_distinct(target):
    from flashc.checking import random_inputs

    _, gm = target
    for seed in range(10):
        positions = random_inputs(gm.entries["verify"].program, seed)[1]
        assert len(set(positions.tolist())) == positions.numel() and int(positions.max()) < gm.cache_len


def test_cuda_executables_of_the_entries_share_equal_weights():
    """CudaExecutable.share_weights_from's matching, on CPU tensors (no GPU here): equal weights
    by name are shared, a weight that a backend pass changed is kept, a captured graph refuses."""
    from flashc.backends.cuda import CudaExecutable

    def executable(weights):
        e = object.__new__(CudaExecutable)
        e.weight_names, e.weights, e._graph = list(weights), list(weights.values()), None
        return e

    a, b, c = torch.randn(4, 3), torch.randn(3), torch.randn(2, 2)
    donor = executable({"w1": a, "w2": b, "w3": c})
    entry = executable({"w1": a.clone(), "w2": b + 1, "w3": c.t().contiguous().t(), "w4": torch.randn(5)})
    assert entry.share_weights_from(donor) == 1
    assert entry.weights[0] is a and entry.weights[1] is not b and entry.weights[2] is not c
    entry._graph = object()
    with pytest.raises(RuntimeError, match="captured"):
        entry.share_weights_from(donor)


def test_emitter_cuts_and_fills_after_the_end_token():
    """Rounds of several tokens: a sequence's tokens after its end token become the end token, in the round
    it ends and in later ones; the last round is cut to max_new_tokens; finished once every sequence ended."""
    from flashc.generate import Emitter, GenerationStats

    stats = GenerationStats()
    emit = Emitter(torch.zeros(2, 3, dtype=torch.long), 7, 9, stats, torch.device("cpu"))
    assert emit(torch.tensor([[1, 9, 4], [5, 6, 7]])).tolist() == [[1, 9, 9], [5, 6, 7]]
    assert not emit.finished
    assert emit([[4, 4], [9, 3]]).tolist() == [[9, 9], [9, 9]]
    assert emit.finished and emit.produced == 5 and stats.new_tokens == 5
    cut = Emitter(torch.zeros(1, 2, dtype=torch.long), 3, None, GenerationStats(), torch.device("cpu"))
    cut([[1, 2]])
    assert cut([[3, 4, 5]]).tolist() == [[3]] and cut.finished
    # a tensor round that needs no change comes back as it is (no copy to the device); one that does, changed
    keep = Emitter(torch.zeros(2, 3, dtype=torch.long), 5, 9, GenerationStats(), torch.device("cpu"))
    round_ = torch.tensor([[1], [2]])
    assert keep(round_) is round_
    ending = torch.tensor([[9, 3], [4, 5]])
    assert keep(ending).tolist() == [[9, 9], [4, 5]] and ending.tolist() == [[9, 3], [4, 5]]
    cut_round = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert keep(cut_round).tolist() == [[9, 9], [4, 5]]
    narrow = Emitter(torch.zeros(1, 2, dtype=torch.int32), 5, None, GenerationStats(), torch.device("cpu"))
    assert narrow(torch.tensor([[7]])).dtype == torch.int32  # the prompt's dtype, as before


@pytest.mark.parametrize("ragged", [False, True])
def test_warm_up_calls_every_entry_and_leaves_generation_unchanged(ragged):
    model = zoo.build("llama-tiny", seed=0)
    gm = compile_generation(model, "cpu", cache_len=32, batch=2, prefill_chunk=8, draft_len=3, ragged=ragged)
    steps = gm.steps()
    called = []
    for size, call in list(steps.calls.items()):
        steps.calls[size] = lambda *a, _call=call, _size=size: called.append(_size) or _call(*a)
    gm.warm_up()
    assert sorted(called) == [1, 4, 8]  # decode, verify (3 drafts + 1), prefill
    assert all(not t.any() for t in steps.kv_cache)  # the dummy tokens' keys and values are gone
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=5)
    want = greedy_reference(model, prompt, 9)
    got = gm.generate(list(prompt) if ragged else prompt, 9, speculate="ngram")
    assert torch.equal(torch.stack(got) if ragged else got, want)


def test_stats_time_every_round(target):
    _, gm = target
    prompt = repetitive(2, 5, 3)
    _, stats = gm.generate(prompt, 12, speculate="ngram", return_stats=True)
    assert len(stats.round_s) == len(stats.plan_s) == len(stats.draft_lengths) == stats.rounds
    assert all(0 <= p <= r for p, r in zip(stats.plan_s, stats.round_s))
    assert sum(stats.round_s) <= stats.total_s - stats.prefill_s + 1e-3


def test_ragged_ngram_scores_declined_plans_too():
    from flashc.ragged import _ngram_drafts

    spec = Speculator(NgramDrafter(), max_draft=4)
    spec.observe_plain(1.0)
    spec.learned.timing.verify = 1.5
    seqs = [[1, 2, 3, 4, 9, 1, 2, 3], [7, 8, 7], [5, 6]]  # matches of 3 tokens and of 1; the third has none
    drafts = _ngram_drafts(spec, seqs, [0, 1, 2], 8)
    assert drafts == [[4, 9, 1, 2], [8, 7], []]  # nothing measured yet: the prior (half kept) pays at 1.5
    evidence = spec.last_evidence
    assert evidence == 1
    spec.learned.counts[evidence] = [0.1, 5.0]
    assert _ngram_drafts(spec, seqs, [0, 1, 2], 8) is None
    assert spec.shadow == ([4, 8, None], evidence)
    before = spec.acceptance(evidence)
    spec.observe_plain(1.0, [[4], [8], [3]])  # both drafts right; the third sequence had none to score
    assert spec.acceptance(evidence) > before

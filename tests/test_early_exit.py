"""flashc.early_exit: tokens from the first layers where the exit is confident, deep KV filled in later.

Generation is checked against eager references on fresh random prompts: tau = inf against
plain greedy decoding; tau = 0 against a loop that takes the cut model's argmax while the
deferral allows and the full model's otherwise, and, after each deep pass, the full model's
logits against a plain full forward over the same tokens. Calibration and evaluation are
checked in float64 against the cut model of flashc.layerskip.
"""

import json
import math

import pytest
import torch
from flashc_testing import fresh_ids
from test_generate import greedy_reference
from test_layerskip import deep_llama, with_identity_layers

from flashc import zoo
from flashc.cli import main
from flashc.early_exit import (
    EarlyExit, EarlyExitModel, calibrate, evaluate, max_prob, prepare_early_exit, prob_margin, smallest_threshold,
)
from flashc.errors import InputError
from flashc.evaluation import perplexity
from flashc.generate import Sampling
from flashc.generation import GenerationModel, compile_generation
from flashc.layerskip import early_exit_model

CACHE_LEN = 48
DRAFT_LEN = 3


@pytest.fixture(scope="module")
def deep():
    model = deep_llama()
    gm = compile_generation(model, "cpu", cache_len=CACHE_LEN, batch=2, prefill_chunk=8, draft_len=DRAFT_LEN, level=1)
    return model, gm


def exit_reference(model, ids: torch.Tensor, n: int, layer: int, max_deferred: int) -> tuple[torch.Tensor, int]:
    """tau = 0 by eager full forwards: the first token and every token after max_deferred exits
    from the full model, the others the cut model's argmax; and how many tokens exited."""
    cut = early_exit_model(model, layer)
    out, waiting, exited = ids, 0, 0
    with torch.no_grad():
        for i in range(n):
            if i > 0 and waiting < max_deferred:
                nxt, waiting, exited = cut(out, use_cache=False).logits[:, -1].argmax(-1), waiting + 1, exited + 1
            else:
                nxt, waiting = model(out, use_cache=False).logits[:, -1].argmax(-1), 0
            out = torch.cat([out, nxt[:, None]], 1)
    return out, exited


@pytest.mark.parametrize("layer", [1, 3])
def test_never_exiting_is_plain_greedy(deep, layer):
    model, gm = deep
    ee = prepare_early_exit(model, gm, EarlyExit(layer, threshold=math.inf), level=1)
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=11)  # the prefill chunk of 8, then a padded one
    got, stats = gm.generate(prompt, 16, early_exit=ee, return_stats=True)
    assert torch.equal(got, greedy_reference(model, prompt, 16))
    assert stats.exited == 0 and stats.deep_passes == 15 and stats.tokens_per_deep_pass == 1.0
    assert stats.exit_share is None and stats.exits_checked == 0


@pytest.mark.parametrize("layer,max_deferred", [(1, None), (2, 2), (3, 1)])
def test_always_exiting_gives_the_cut_models_tokens(deep, layer, max_deferred):
    model, gm = deep
    ee = prepare_early_exit(model, gm, EarlyExit(layer, threshold=0.0, max_deferred=max_deferred), level=1)
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=6)
    got, stats = gm.generate(prompt, 20, early_exit=ee, return_stats=True)
    deferred = max_deferred or DRAFT_LEN
    want, exited = exit_reference(model, prompt, 20, layer, deferred)
    assert torch.equal(got, want)
    assert stats.exited == exited and stats.exited + stats.deep_passes == 19
    assert stats.deep_tokens == stats.deep_passes * (deferred + 1)  # every deep pass catches up a full deferral
    assert stats.exits_checked == 2 * stats.deep_passes * deferred and 0 <= stats.exit_agreement <= 1


def test_a_deep_pass_leaves_the_cache_of_a_full_model_run(deep):
    """After each deep pass, the full model's next logits equal a plain full forward's over the
    same tokens: the deep layers' KV of the exited positions were filled in."""
    model, gm = deep
    ee = prepare_early_exit(model, gm, EarlyExit(2, threshold=0.0), level=1)
    steps = gm.steps()
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=5)
    tokens = prompt
    from flashc.generate import GenerationStats

    stats = GenerationStats()
    checked = 0
    passes = 0
    for new in ee.rounds(steps, prompt, 16, Sampling(), stats=stats):
        tokens = torch.cat([tokens, new], 1)
        if stats.deep_passes > passes:  # the pending token is new; every earlier position is in the cache
            passes = stats.deep_passes
            got = steps.feed(tokens[:, -1:], tokens.shape[1] - 1)  # the same values the next round writes
            with torch.no_grad():
                want = model(tokens, use_cache=False).logits[:, -1]
            assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
            checked += 1
    assert checked == stats.deep_passes >= 3


def test_a_cut_model_with_another_cache_is_refused(deep):
    model, gm = deep
    other = prepare_early_exit(model, compile_generation(model, "cpu", cache_len=32, batch=2, prefill_chunk=None,
                                                         draft_len=2, level=1), EarlyExit(1, threshold=0.5), level=1)
    with pytest.raises(InputError, match="not the full model's first 1 layers'"):
        gm.generate(fresh_ids("llama-tiny", batch=2, seq_len=4), 3, early_exit=other)


def test_smallest_threshold_is_the_smallest_that_meets_the_agreement():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        conf = torch.rand(200, generator=g).round(decimals=2)  # ties, as real confidences have
        agrees = torch.rand(200, generator=g) < conf  # confident tokens agree more often
        target = 0.7 + 0.25 * torch.rand(1, generator=g).item()
        meets = [float(c) for c in conf.unique() if agrees[conf >= c].double().mean() >= target]
        assert smallest_threshold(conf, agrees, target) == (min(meets) if meets else math.inf)
    assert smallest_threshold(torch.tensor([0.9, 0.5]), torch.tensor([False, False]), 0.5) == math.inf


def test_calibration_in_float64_against_the_cut_model():
    model = with_identity_layers(deep_llama(), 2).double()  # exits 2 and 3 compute the full model
    tokens = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1))
    rows = calibrate(model, [1, 2, 3], tokens, agreement=0.2, window=64)
    assert [r.layer for r in rows] == [1, 2, 3] and all(r.tokens == 300 for r in rows)
    with torch.no_grad():
        full = torch.cat([model(tokens[i:i + 64][None], use_cache=False).logits[0] for i in range(0, 300, 64)])
        cut = torch.cat([early_exit_model(model, 1)(tokens[i:i + 64][None], use_cache=False).logits[0]
                         for i in range(0, 300, 64)])
    conf, agrees = max_prob(cut), cut.argmax(-1) == full.argmax(-1)
    assert rows[0].threshold == smallest_threshold(conf, agrees, 0.2)
    assert rows[0].exit_share == pytest.approx((conf >= rows[0].threshold).double().mean().item(), abs=1e-12)
    assert rows[0].agreement >= 0.2 and rows[0].argmax_agreement < 1.0
    for row in rows[1:]:  # every token agrees: the lowest confidence is the threshold, every token exits
        assert row.argmax_agreement == 1.0 and row.exit_share == 1.0 and row.agreement == 1.0
    margin = calibrate(model, 1, tokens, agreement=0.2, confidence="margin", window=64)[0]
    assert margin.threshold == smallest_threshold(prob_margin(cut), agrees, 0.2)


def test_evaluate_mixes_exit_and_full_logits():
    model = deep_llama().double()
    ids = torch.randint(0, 512, (150,), generator=torch.Generator().manual_seed(2))
    full = perplexity(lambda x: model(x, use_cache=False).logits, ids, window=64, stride=32, progress=False)
    cut = perplexity(lambda x: early_exit_model(model, 1)(x, use_cache=False).logits, ids, window=64, stride=32,
                     progress=False)
    never = evaluate(model, 1, math.inf, ids, window=64, stride=32)
    always = evaluate(model, 1, 0.0, ids, window=64, stride=32)
    assert never.tokens == always.tokens == full.n_tokens == 149
    assert never.exit_share == 0.0 and never.argmax_agreement == 1.0
    assert never.ppl_full == pytest.approx(full.ppl, rel=1e-10) and never.ppl_early_exit == never.ppl_full
    assert always.exit_share == 1.0 and always.ppl_early_exit == pytest.approx(cut.ppl, rel=1e-10)
    short = ids[:60]  # one window: the mixture by hand
    with torch.no_grad():
        f = model(short[None], use_cache=False).logits[0, :-1]
        c = early_exit_model(model, 1)(short[None], use_cache=False).logits[0, :-1]
    tau = float(max_prob(c).median())
    confident = max_prob(c) >= tau
    mixed = torch.where(confident[:, None], c, f)
    nll = -torch.log_softmax(mixed, -1).gather(-1, short[1:, None]).mean().item()
    some = evaluate(model, 1, tau, short, window=64, stride=32)
    assert some.tokens == 59 and some.exit_share == pytest.approx(confident.double().mean().item(), abs=1e-12)
    assert 0.4 < some.exit_share < 0.6 and some.ppl_early_exit == pytest.approx(math.exp(nll), rel=1e-10)


def test_parse_and_bad_rules():
    assert EarlyExit.parse("8") == EarlyExit(8) and EarlyExit.parse("layer:8:0.5") == EarlyExit(8, 0.5)
    assert EarlyExit.parse(3) == EarlyExit(3) and EarlyExit.parse("2:inf").threshold == math.inf
    for spec in ("x", "8:y", "1:2:3", "", "layer:"):
        with pytest.raises(InputError, match="'E' or 'E:TAU'"):
            EarlyExit.parse(spec)
    with pytest.raises(InputError, match="layer must be an int >= 1"):
        EarlyExit(0)
    with pytest.raises(InputError, match="threshold must be >= 0"):
        EarlyExit(1, threshold=-0.1)
    with pytest.raises(InputError, match=r"agreement must be in \(0, 1\]"):
        EarlyExit(1, agreement=1.5)
    with pytest.raises(InputError, match="confidence must be one of max_prob, margin"):
        EarlyExit(1, confidence="entropy")
    with pytest.raises(InputError, match="max_deferred must be >= 1"):
        EarlyExit(1, max_deferred=0)
    with pytest.raises(InputError, match="EarlyExitModel needs a threshold"):
        EarlyExitModel(EarlyExit(1), None)


def test_bad_generate_options_are_refused(deep):
    model, gm = deep
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=4)
    ee = prepare_early_exit(model, gm, EarlyExit(1, threshold=0.5), level=1)
    with pytest.raises(InputError, match="do not combine"):
        gm.generate(prompt, 3, early_exit=ee, speculate="ngram")
    with pytest.raises(InputError, match="greedy only"):
        gm.generate(prompt, 3, early_exit=ee, temperature=0.7)
    with pytest.raises(InputError, match=r"layer must be in 1\.\.3 \(the model has 4 decoder layers\), got 4"):
        prepare_early_exit(model, gm, "4:0.5")
    with pytest.raises(InputError, match="max_deferred=4, but a deep pass"):
        prepare_early_exit(model, gm, EarlyExit(1, 0.5, max_deferred=4))
    with pytest.raises(InputError, match="in-memory module"):
        gm.generate(prompt, 3, early_exit="1:0.5")
    with pytest.raises(InputError, match="no verify entry"):
        GenerationModel({"decode": gm.decode}).generate(prompt, 3, early_exit=ee)
    with pytest.raises(InputError, match="exit_layer must be in 1..3"):
        calibrate(model, [1, 4], torch.arange(10))


def test_early_exit_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "llama"
    assert main(["compile", "llama-tiny", "--signature", "generate", "--cache-len", "32", "--prefill-chunk", "8",
                 "--draft-len", "3", "-o", str(out)]) == 0
    capsys.readouterr()
    prompt = [7, 8, 9, 10, 7, 8, 9]
    assert main(["generate", str(out), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "10",
                 "--early-exit", "1:0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    want, exited = exit_reference(zoo.build("llama-tiny", seed=0), torch.tensor([prompt]), 10, 1, 3)
    assert result["ids"] == want.tolist() and result["stats"]["exited"] == exited == 7
    # no threshold: calibrated on the built-in text, read as bytes by this random-weight model
    assert main(["generate", str(out), "--prompt-ids", "1,2", "--max-new-tokens", "8", "--early-exit", "1"]) == 0
    assert "tokens from the exit layer" in capsys.readouterr().out
    assert main(["generate", str(out), "--prompt-ids", "1,2", "--early-exit", "2:0.5"]) == 2
    assert "layer must be in 1..1" in capsys.readouterr().err

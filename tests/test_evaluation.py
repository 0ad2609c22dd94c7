"""Tests for flashc.evaluation: eval data, sliding-window perplexity, embedding agreement, RTN."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from flashc.evaluation import (
    EVAL_DIR,
    embedding_agreement,
    fake_quantize_rtn,
    load_eval_sentences,
    load_eval_text,
    perplexity,
    perplexity_windows,
)

# sha256 of the committed evaluation files: they must be bit-identical everywhere.
EVAL_SHA256 = {
    "prose.txt": "b5310978a774d534db1989e7b98a60641e044bd9b85a6e0f5b5c4835e42aaf0b",
    "code.txt": "f773f42eb3289e1d8e1e8b94bb6aae876a96c0f4aec033b2b5a295cc400e4d45",
    "sentences.txt": "b30bff5603184212625ea5bcd460238426355c5602018a727c17dd2be9bbce6d",
}


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", sorted(EVAL_SHA256))
def test_eval_files_are_the_committed_bytes(name):
    assert hashlib.sha256((EVAL_DIR / name).read_bytes()).hexdigest() == EVAL_SHA256[name]


def test_load_eval_text():
    prose, code = load_eval_text("prose"), load_eval_text("code")
    assert 40_000 < len(prose) < 100_000 and "Execution model" in prose
    assert 40_000 < len(code) < 100_000 and "class Fraction" in code
    with pytest.raises(ValueError, match="kind must be one of"):
        load_eval_text("poetry")  # type: ignore[arg-type]


def test_load_eval_sentences():
    sents = load_eval_sentences()
    assert len(sents) == 100 and len(set(sents)) == 100
    assert all(s and s == s.strip() for s in sents)


# --------------------------------------------------------------------------- perplexity


class TinyCausalLM(torch.nn.Module):
    """A small context-dependent causal LM: a 2-layer random-init Llama."""

    def __init__(self, vocab: int = 61, seed: int = 0):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            attn_implementation="sdpa",
        )
        self.model = LlamaForCausalLM(cfg).eval().double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


@pytest.fixture(scope="module")
def tiny_lm():
    return TinyCausalLM()


def _full_nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids.unsqueeze(0))[0]
    return torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:]).item()


@pytest.mark.parametrize("n, window", [(64, 64), (40, 64), (2, 8)])
def test_perplexity_matches_full_sequence_nll(tiny_lm, n, window):
    """window >= n: one (right-padded) window must give exactly the full-sequence NLL."""
    ids = torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(n))
    calls = []

    def logits_fn(x):
        calls.append(tuple(x.shape))
        return tiny_lm(x)

    res = perplexity(logits_fn, ids, window=window, stride=window // 2, progress=False)
    expected = _full_nll(tiny_lm, ids)
    assert calls == [(1, window)]
    assert res.n_tokens == n - 1 and res.n_windows == 1
    assert abs(res.nll - expected) < 1e-5
    assert math.isclose(res.ppl, math.exp(expected), rel_tol=1e-5)
    assert (res.window, res.stride) == (window, window // 2)


@pytest.mark.parametrize("n", [2, 3, 17, 64, 65, 100, 129, 1000])
@pytest.mark.parametrize("window, stride", [(16, 8), (16, 1), (16, 15), (64, 32), (5, 3)])
def test_window_plan_scores_each_token_once(n, window, stride):
    plan = perplexity_windows(n, window, stride)
    scored = []
    for i, (start, first, end) in enumerate(plan):
        assert 0 <= start <= first - 1 < end <= n
        assert end - start <= window
        assert end - start == window or n < window  # fixed size unless the text is shorter
        if i > 0:
            assert first - start >= window - stride  # at least window - stride context tokens
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_perplexity_scores_each_token_once_and_fixed_window():
    """A context-free (bigram) model gives the same NLL whatever the windowing, if and
    only if every token is scored exactly once; each call must be exactly `window` long."""
    vocab = 37
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids = torch.randint(0, vocab, (1000,), generator=torch.Generator().manual_seed(2))
    seen = []

    def bigram(x):
        seen.append(x.shape[1])
        return table[x]

    ref = torch.nn.functional.cross_entropy(table[ids[:-1]], ids[1:]).item()
    for window, stride in [(64, 32), (100, 1), (256, 128), (999, 500), (2000, 7)]:
        seen.clear()
        res = perplexity(bigram, ids, window=window, stride=stride, progress=False)
        assert res.n_tokens == 999
        assert set(seen) == {window} and len(seen) == res.n_windows
        assert abs(res.nll - ref) < 1e-9


def test_perplexity_sliding_windows_track_full_context(tiny_lm):
    """With stride < window on a context-dependent model, the result is close to (not
    equal to) the full-context NLL, and the limit caps the number of windows."""
    ids = torch.randint(0, 61, (300,), generator=torch.Generator().manual_seed(3))
    full = _full_nll(tiny_lm, ids)
    res = perplexity(tiny_lm, ids, window=128, stride=64, progress=False)
    assert res.n_tokens == 299 and res.n_windows == len(perplexity_windows(300, 128, 64))
    assert abs(res.nll - full) < 0.05 * full
    lim = perplexity(tiny_lm, ids, window=128, stride=64, limit=2, progress=False)
    assert lim.n_windows == 2 and lim.n_tokens == 127 + 64


def test_perplexity_accepts_2d_ids_and_model_outputs(tiny_lm):
    ids = torch.randint(0, 61, (1, 50), generator=torch.Generator().manual_seed(4))
    a = perplexity(tiny_lm, ids, window=32, stride=16, progress=False)
    b = perplexity(lambda x: tiny_lm.model(input_ids=x), ids[0], window=32, stride=16, progress=False)
    assert a == b


def test_perplexity_errors(tiny_lm):
    ids = torch.arange(10)
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny_lm, ids, window=8, stride=8, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_lm, ids[:1], window=8, stride=4, progress=False)
    with pytest.raises(ValueError, match=r"\[1, 8, vocab\]"):
        perplexity(lambda x: torch.zeros(1, 7, 5), ids, window=8, stride=4, progress=False)
    with pytest.raises(TypeError, match="integer"):
        perplexity(tiny_lm, ids.float(), window=8, stride=4, progress=False)


# --------------------------------------------------------------------------- embeddings


def _fake_encoder(dim: int = 32, seed: int = 0):
    """A deterministic bag-of-characters sentence encoder."""
    proj = torch.randn(128, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def embed(sents):
        counts = torch.zeros(len(sents), 128, dtype=torch.float64)
        for i, s in enumerate(sents):
            for ch in s.lower():
                counts[i, ord(ch) % 128] += 1
        return counts @ proj

    return embed


def test_embedding_agreement_identical():
    enc = _fake_encoder()
    res = embedding_agreement(enc, enc)
    assert res.n_sentences == 100
    assert res.mean_cosine == pytest.approx(1.0, abs=1e-12) and res.min_cosine == pytest.approx(1.0, abs=1e-12)
    assert res.top1_agreement == res.top5_agreement == res.top5_overlap == 1.0
    assert res.spearman_mean == pytest.approx(1.0) and res.spearman_min == pytest.approx(1.0)


def test_embedding_agreement_degrades_with_noise():
    enc = _fake_encoder()
    sents = load_eval_sentences()
    small = embedding_agreement(lambda s: enc(s) * 3.0 + 0.01 * torch.randn(len(s), 32, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(5)), enc, sents)
    big = embedding_agreement(_fake_encoder(seed=9), enc, sents)
    assert small.mean_cosine > 0.999 and small.spearman_mean > 0.99  # scale-invariant, small noise
    assert big.mean_cosine < small.mean_cosine and big.spearman_mean < small.spearman_mean
    assert big.top5_overlap < small.top5_overlap
    for r in (small, big):
        assert r.min_cosine <= r.mean_cosine and r.top5_agreement <= r.top5_overlap
        assert r.spearman_min <= r.spearman_mean <= 1.0


def test_embedding_agreement_spearman_handles_ties():
    from flashc.evaluation import _rankdata, _spearman_rows

    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    assert _rankdata(x).tolist() == [[3.5, 0.5, 3.5, 2.0, 0.5]]
    y = torch.tensor([[10.0, -1.0, 10.0, 5.0, -1.0]], dtype=torch.float64)
    assert _spearman_rows(x, y).item() == pytest.approx(1.0)
    assert _spearman_rows(x, -y).item() == pytest.approx(-1.0)


def test_embedding_agreement_errors():
    enc = _fake_encoder()
    with pytest.raises(ValueError, match="at least 7"):
        embedding_agreement(enc, enc, ["a", "b"])
    with pytest.raises(ValueError, match="shapes differ"):
        embedding_agreement(enc, _fake_encoder(dim=16), load_eval_sentences())


# --------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits, group", [(3, None), (3, 16), (4, 32), (8, None)])
def test_fake_quantize_rtn(bits, group):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(bits))
    q = fake_quantize_rtn(w, bits, group)
    assert q.shape == w.shape and q.dtype == w.dtype
    g = group or 64
    blocks_w = w.reshape(24, 64 // g, g)
    blocks_q = q.reshape(24, 64 // g, g)
    scale = blocks_w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    # at most 2**bits - 1 levels per block, all integer multiples of the block scale
    levels = blocks_q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4
    # round-to-nearest: error at most half a step
    assert ((blocks_q - blocks_w).abs() <= scale / 2 + 1e-6).all()


def test_fake_quantize_rtn_errors():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="2-D"):
        fake_quantize_rtn(w[0], 3)
    with pytest.raises(ValueError, match="divide"):
        fake_quantize_rtn(w, 3, 48)
    with pytest.raises(ValueError, match="bits"):
        fake_quantize_rtn(w, 1)

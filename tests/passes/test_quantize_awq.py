"""AWQ: per-channel scales lower the output error of rounding when a few input channels carry
large activations; the scale search never does worse than RTN on its own data."""

import os

import pytest
import torch

from flashc.passes.quantize.awq import awq_clip_ratios, awq_quantize, awq_search_scales
from flashc.passes.quantize.grid import output_error
from flashc.passes.quantize.rtn import rtn_quantize


@pytest.fixture
def outliers():
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 128, generator=g)
    x[:, torch.randperm(128, generator=g)[:4]] *= 20  # a few salient channels, as in LLM activations
    h = x.double().T @ x.double() / x.shape[0]
    return seed, torch.randn(64, 128, generator=g), h, x.abs().mean(0)


def err(effective, w, h) -> float:
    return float(output_error(effective.double() - w.double(), h))


@pytest.mark.parametrize("clip", [False, True])
def test_lower_output_error_than_rtn(outliers, clip):
    seed, w, h, mean_abs = outliers
    rtn = err(rtn_quantize(w, 4, 128, False).dequantize(), w, h)
    s, alpha = awq_search_scales([w], h, mean_abs, 4, 128, False)
    q = awq_quantize(w, s, h, 4, 128, False, clip=clip)
    awq = err(q.dequantize() / s, w, h)
    # measured over seeds 0-3: 0.30-0.39 of RTN's squared error (0.28-0.34 with clipping)
    assert awq < 0.6 * rtn, f"seed {seed}: AWQ {awq:.4g} vs RTN {rtn:.4g} (alpha {alpha})"
    assert alpha > 0


def test_scale_search_never_worse_than_rtn():
    """alpha = 0 (s = 1) is RTN and is on the grid, so the chosen scales are at least as good."""
    for _ in range(3):
        w = [torch.randn(32, 64), torch.randn(16, 64)]
        x = torch.randn(512, 64)
        h = x.double().T @ x.double() / 512
        s, _ = awq_search_scales(w, h, x.abs().mean(0), 4, 32, False)
        chosen = sum(err(rtn_quantize(wi * s, 4, 32, False).dequantize() / s, wi, h) for wi in w)
        rtn = sum(err(rtn_quantize(wi, 4, 32, False).dequantize(), wi, h) for wi in w)
        assert chosen <= rtn * (1 + 1e-6)


def test_clip_ratios_in_range_and_help():
    w = torch.randn(32, 128)
    w[:, 5] *= 8  # an outlier weight widens its group's range
    h = torch.eye(128, dtype=torch.float64)
    ratio = awq_clip_ratios(w, h, 4, 32, False, torch.float32)
    assert ratio.shape == (32, 4)
    assert ((ratio > 0.5) & (ratio <= 1)).all() and (ratio < 1).any()
    clipped = awq_quantize(w, torch.ones(128), h, 4, 32, False, clip=True)
    plain = awq_quantize(w, torch.ones(128), h, 4, 32, False, clip=False)
    assert err(clipped.dequantize(), w, h) < err(plain.dequantize(), w, h)

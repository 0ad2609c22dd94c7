"""Round to nearest: every weight within half a step of its group's grid, scales as stored."""

import pytest
import torch

from flashc.passes.quantize.grid import grouped
from flashc.passes.quantize.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_error_is_at_most_half_a_step_per_group(bits, symmetric, group):
    w = torch.randn(16, 256) * torch.rand(16, 1) * 3
    q = rtn_quantize(w, bits, group, symmetric)
    step = q.scales.float().unsqueeze(-1)  # [N, groups, 1]
    error = grouped((q.dequantize() - w).abs(), group)
    assert (error <= step / 2 * (1 + 1e-5)).all()
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 1 << bits
    assert (q.zero_points is None) == symmetric
    # the grid is as fine as the range allows: the step is the group's range over the codes
    span = grouped(w, group).abs().amax(-1) if symmetric else (
        grouped(w, group).amax(-1).clamp(min=0) - grouped(w, group).amin(-1).clamp(max=0))
    levels = (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1
    assert torch.allclose(q.scales, span / levels, rtol=1e-6)


def test_per_channel_int8_is_close():
    w = torch.randn(64, 384)
    q = rtn_quantize(w, 8, 384, True)
    assert q.scales.shape == (64, 1)
    assert ((q.dequantize() - w).norm() / w.norm()) < 0.01


def test_scales_rounded_to_the_storage_dtype_before_rounding_weights():
    """With bf16 scales the stored grid is the one the codes were chosen on, rounded up so it
    still spans each group: at most half a step, on many fresh groups (a scale rounded down
    clamped the extremes by more, in some draws)."""
    for symmetric in (False, True):
        w = torch.randn(512, 64)
        q = rtn_quantize(w, 4, 32, symmetric, scale_dtype=torch.bfloat16)
        assert q.scales.dtype == torch.bfloat16
        error = grouped((q.dequantize() - w).abs(), 32)
        assert (error <= q.scales.float().unsqueeze(-1) / 2 * (1 + 1e-5)).all()


def test_zero_groups_stay_zero():
    w = torch.randn(4, 64)
    w[:, :32] = 0
    q = rtn_quantize(w, 4, 32, False)
    assert torch.equal(q.dequantize()[:, :32], torch.zeros(4, 32))
    assert torch.isfinite(q.scales).all()

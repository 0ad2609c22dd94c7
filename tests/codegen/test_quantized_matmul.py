"""The W8A8 / FP8 launchers of the CUDA target (codegen/quantized_matmul.py) against the ops'
references, on fresh random inputs: row padding, the library/reference split by shape, both
FP8 epilogues. torch's int8 and fp8 GEMMs also run on the CPU, so the launchers' logic is
checked here; the CUDA libraries' own shape rules are exercised by the GPU run of this file."""

import pytest
import torch

from flashc.codegen import quantized_matmul as qm
from flashc.passes.quantize.fp8 import quantize_weight_fp8
from flashc.passes.quantize.smoothquant import quantize_weight_int8

W8A8 = torch.ops.flashc.linear_w8a8.default
FP8 = torch.ops.flashc.linear_fp8.default
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("rows", [1, 5, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smooth", [False, True])
def test_w8a8_launcher_equals_reference(rows, dtype, smooth):
    g = torch.Generator().manual_seed(rows * 7 + smooth)
    k, n = 64, 48
    x = torch.randn(2, rows, k, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g)
    q, scales = quantize_weight_int8(w)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    scale = (torch.rand(k, generator=g) + 0.5).to(dtype).to(DEVICE) if smooth else None
    q, scales = q.to(DEVICE), scales.to(DEVICE)
    out = qm.linear_w8a8(x, q, scales, bias, scale)
    ref = W8A8(x, q, scales, bias, scale)
    assert out.shape == ref.shape == (2, rows, n) and out.dtype == dtype
    # the integer product is exact in both; only the epilogue's rounding may differ
    assert rel(out, ref) < (1e-6 if dtype == torch.float32 else 8e-3)


def test_w8a8_shapes_the_library_does_not_take_run_the_reference():
    x, w = torch.randn(3, 40), torch.randn(24, 40)  # K = 40: not a multiple of 16
    q, scales = quantize_weight_int8(w)
    assert not qm.fits(40, 24)
    assert torch.equal(qm.linear_w8a8(x, q, scales, None, None), W8A8(x, q, scales, None, None))


@pytest.mark.parametrize("rows", [1, 16, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fp8_launcher_equals_reference(rows, dtype, granularity):
    g = torch.Generator().manual_seed(rows * 3 + len(granularity))
    k, n = 64, 32
    x = (torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, k)).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g)
    q, scales = quantize_weight_fp8(w, granularity)
    q, scales = q.to(DEVICE), scales.to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    per_token = granularity == "row"
    try:
        out = qm.linear_fp8(x, q, scales, bias, None, per_token)
    except RuntimeError as e:  # CPU builds without the row-wise scaled GEMM
        if DEVICE == "cpu" and "scale" in str(e).lower():
            pytest.skip(f"this torch's CPU _scaled_mm takes no row-wise scales: {e}")
        raise
    ref = FP8(x, q, scales, bias, None, per_token)
    assert out.shape == ref.shape and out.dtype == dtype
    # Hopper's fp8 tensor cores sum with fewer bits than fp32 (4-8e-5 measured on an H100): the
    # reference's fp32 sum is met to that, not to fp32's rounding
    fp32_tol = 3e-4 if DEVICE == "cuda" else 1e-5
    assert rel(out, ref) < (fp32_tol if dtype == torch.float32 else 1e-2)
    # and it is the fp8 model of the float product: close, not equal
    assert rel(out, x.float() @ w.to(DEVICE).t() + bias.float()) < 0.1


@pytest.mark.parametrize("fp8", [False, True])
def test_moe_launcher_equals_the_routed_reference(fp8):
    """The CUDA path runs every expert on every token and keeps the routed rows: same numbers."""
    g = torch.Generator().manual_seed(5 + fp8)
    t, h, f, e = 9, 32, 48, 4
    x = torch.randn(t, h, generator=g).to(DEVICE)
    logits = torch.randn(t, e, generator=g).to(DEVICE)
    quantize = (lambda w: quantize_weight_fp8(w)) if fp8 else quantize_weight_int8  # noqa: E731
    gate_up = [quantize(torch.randn(2 * f, h, generator=g)) for _ in range(e)]
    down = [quantize(torch.randn(h, f, generator=g)) for _ in range(e)]
    stack = lambda parts, i: torch.stack([p[i] for p in parts]).to(DEVICE)  # noqa: E731
    smooth = (torch.rand(e, h, generator=g) + 0.5).to(DEVICE)
    args = (x, logits, stack(gate_up, 0), stack(gate_up, 1), smooth, stack(down, 0), stack(down, 1), None, 2, True,
            fp8, True)
    out = qm.moe_a8(*args)
    ref = torch.ops.flashc.moe_a8.default(*args)
    # on a GPU the fp8 GEMM's sum differs slightly (see above), and the SwiGLU activation is rounded
    # to fp8 again before the down projection, where a tiny difference can move a value one fp8
    # step (6%): 3.5e-3 measured on an H100
    assert rel(out, ref) < (1e-2 if fp8 and DEVICE == "cuda" else 1e-5)

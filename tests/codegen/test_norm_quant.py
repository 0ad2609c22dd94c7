"""flashc.codegen.norm_quant: RMSNorm, residual add + RMSNorm and gated activations writing W8A8 / FP8
codes in one kernel, against the ops' references (flashc/quantized_input_ops.py), which are checked
here to be the unfused ops' composition bit for bit; and the launchers of the linears on
pre-quantized codes (codegen/quantized_matmul.py: the library GEMMs, which PyTorch also runs on the
CPU) against the linears' launchers on the unquantized input. On a CPU the
kernels run in Triton's interpreter."""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import _triton_common  # noqa: E402
from flashc.codegen import norm_quant as nq  # noqa: E402
from flashc.errors import FlashcError  # noqa: E402
from flashc.ops import add_rms_norm, geglu, rms_norm, swiglu  # noqa: E402
from flashc.quantized_ops import (  # noqa: E402
    FP8_DTYPE, _rows, linear_fp8, linear_w8a8, quantize_rows_fp8, quantize_rows_int8,
)

if not torch.cuda.is_available() and not _triton_common.is_interpreted(nq._produce_quant_kernel):
    importlib.reload(importlib.import_module("flashc.codegen.quantize_rows"))  # imported before the interpreter
    nq = importlib.reload(nq)  # was chosen (tests/codegen/conftest.py): its kernels and helpers again

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCHEMES = [("int8", True), ("fp8", True), ("fp8", False)]  # (kind, per_token): W8A8, FP8 per token, per tensor


def seed(*args) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(args).encode()))


def unfused(y, input_scale, kind, per_token):
    """What flashc.linear_w8a8 / linear_fp8 do to their input y, written with the ops' own functions."""
    rows = _rows(y, input_scale)
    return quantize_rows_int8(rows) if kind == "int8" else quantize_rows_fp8(rows, per_token)


def smoothing(k, dtype, smooth, g, device="cpu"):
    if smooth is None:
        return None
    return (torch.rand(k, generator=g) * 4 + 0.1).to(dtype if smooth == "same" else smooth).to(device)


def inputs(shape, dtype, g, device="cpu", integers=False):
    """Rows with magnitudes over four decades (or small integers: their sums of squares are exact)."""
    if integers:
        return torch.randint(-12, 13, shape, generator=g).to(dtype).to(device)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[-1])[torch.randperm(shape[-1], generator=g)]
    return x.to(dtype).to(device)


def assert_same(q, ref):
    """Equal bytes; fp8 NaN codes where the reference has NaN, whatever their sign bit."""
    assert q.dtype == ref.dtype and q.shape == ref.shape
    nan = ref.float().isnan()
    assert torch.equal(q.float().isnan(), nan)
    assert torch.equal(q.view(torch.uint8)[~nan], ref.view(torch.uint8)[~nan])


def assert_close_codes(q, scale, ref_q, ref_scale, kind, rtol=2 ** -20):
    """Equal but for the few elements an ulp of summation order or of exp moves across a rounding
    boundary: scales within rtol, at most 0.2% of the codes (or 2) differ, each by at most one grid step."""
    assert q.shape == ref_q.shape and q.dtype == ref_q.dtype and scale.shape == ref_scale.shape
    assert torch.allclose(scale, ref_scale, rtol=rtol, atol=0)
    a, b = q.reshape(-1, q.shape[-1]).float(), ref_q.reshape(-1, q.shape[-1]).float()
    differ = a != b
    assert int(differ.sum()) <= max(2, 2e-3 * differ.numel())
    step = 1.0 if kind == "int8" else b.abs().clamp(min=2 ** -6) / 8  # e4m3: 3 mantissa bits
    assert ((a - b).abs() <= step * 1.001)[differ].all()


def test_kernels_run_here():
    """On a CPU the kernel tests below must exercise the interpreted kernel, not the PyTorch fallback."""
    assert torch.cuda.is_available() or _triton_common.is_interpreted(nq._produce_quant_kernel)


# ------------------------------------------------------------------ the ops' references
@pytest.mark.parametrize("smooth", [None, "same", torch.float32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,per_token", SCHEMES)
def test_references_are_the_unfused_ops_bit_for_bit(kind, per_token, dtype, smooth):
    g = seed("ref", kind, per_token, dtype, smooth)
    x, r = inputs((2, 7, 48), dtype, g), inputs((2, 7, 48), dtype, g)
    w, s = (torch.rand(48, generator=g) + 0.5).to(dtype), smoothing(48, dtype, smooth, g)
    gu = torch.randn(2, 7, 96, generator=g).to(dtype)
    gate, up = gu[..., :48], gu[..., 48:]
    cases = {
        "rms_norm": (torch.ops.flashc.rms_norm_quant(x, w, 1e-6, s, kind, per_token), rms_norm(x, w, 1e-6), ()),
        "add_rms_norm": (torch.ops.flashc.add_rms_norm_quant(x, r, w, 1e-6, s, kind, per_token),
                         add_rms_norm(x, r, w, 1e-6)[0], (add_rms_norm(x, r, w, 1e-6)[1],)),
        "swiglu": (torch.ops.flashc.glu_quant(gate, up, "silu", s, kind, per_token), swiglu(gate, up), ()),
        "geglu": (torch.ops.flashc.glu_quant(gate, up, "gelu_tanh", s, kind, per_token), geglu(gate, up, "tanh"), ()),
        "gelu": (torch.ops.flashc.glu_quant(gate, up, "gelu", s, kind, per_token), geglu(gate, up, "none"), ()),
    }
    for name, (got, y, extra) in cases.items():
        *got_extra, codes, scales = got
        ref_codes, ref_scales = unfused(y, s, kind, per_token)
        assert codes.shape == y.shape, name
        assert_same(codes.reshape(-1, 48), ref_codes)
        assert torch.equal(scales, ref_scales), name
        assert all(torch.equal(a, b) for a, b in zip(got_extra, extra)), name
        assert scales.shape == ((14, 1) if per_token else (1, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,per_token", SCHEMES)
def test_linears_on_codes_equal_the_linears_bit_for_bit(kind, per_token, dtype):
    g = seed("linear", kind, per_token, dtype)
    x, w = inputs((3, 5, 64), dtype, g), (torch.rand(64, generator=g) + 0.5).to(dtype)
    s = smoothing(64, dtype, "same", g)
    bias, w_scales = torch.randn(24, generator=g).to(dtype), torch.rand(24, generator=g) / 100
    codes, scales = torch.ops.flashc.rms_norm_quant(x, w, 1e-6, s, kind, per_token)
    y = rms_norm(x, w, 1e-6)
    if kind == "int8":
        qweight = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8)
        got = torch.ops.flashc.linear_w8a8_q(codes, scales, qweight, w_scales, bias, dtype)
        want = linear_w8a8(y, qweight, w_scales, bias, s)
    else:
        qweight = torch.randn(24, 64, generator=g).to(FP8_DTYPE)
        got = torch.ops.flashc.linear_fp8_q(codes, scales, qweight, w_scales, bias, dtype)
        want = linear_fp8(y, qweight, w_scales, bias, s, per_token)
    assert got.dtype == dtype and got.shape == (3, 5, 24)
    assert torch.equal(got, want)
    assert want.float().abs().max() > 0  # the comparison could fail


def test_ops_refuse_bad_arguments_by_name():
    x, w = torch.randn(4, 16), torch.ones(16)
    with pytest.raises(FlashcError, match="rms_norm_quant: kind must be one of"):
        torch.ops.flashc.rms_norm_quant(x, w, 1e-6, None, "int4", True)
    with pytest.raises(FlashcError, match="glu_quant: int8 inputs are quantized per token"):
        torch.ops.flashc.glu_quant(x, x, "silu", None, "int8", False)
    with pytest.raises(FlashcError, match="act must be one of"):
        torch.ops.flashc.glu_quant(x, x, "relu", None, "fp8", True)
    codes = torch.zeros(4, 16, dtype=torch.int8)
    with pytest.raises(FlashcError, match="linear_fp8_q: codes must be torch.float8_e4m3fn"):
        torch.ops.flashc.linear_fp8_q(codes, torch.ones(4, 1), torch.zeros(8, 16).to(FP8_DTYPE), torch.ones(8), None,
                                      torch.float32)
    with pytest.raises(FlashcError, match="row_scales must be fp32 with one scale per row of codes"):
        torch.ops.flashc.linear_w8a8_q(codes, torch.ones(3, 1), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8),
                                       None, torch.float32)
    with pytest.raises(ValueError, match="rms_norm_quant: input_scale must have shape \\(16,\\)"):
        nq.rms_norm_quant(x, w, 1e-6, torch.ones(8), "fp8")
    with pytest.raises(ValueError, match="add_rms_norm_quant: residual must have x's shape"):
        nq.add_rms_norm_quant(x, x[:2], w, 1e-6, None, "fp8")


# ------------------------------------------------------------------ the kernel against the references
@pytest.mark.parametrize("smooth", [None, "same", torch.float32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,per_token", SCHEMES)
def test_norm_kernels_equal_the_references_on_exact_sums(device, kind, per_token, dtype, smooth):
    """Integer-valued rows: sums of squares are exact in any order, so the kernels must match bit for bit.

    The references run on CPU copies: the kernels compute the mean by an IEEE division and rsqrt as
    1 / sqrt, as PyTorch does on a CPU; on CUDA PyTorch multiplies by 1/K and uses an approximate
    rsqrt (an ulp apart in float32: these cases failed against CUDA references on an H100, 2026-12-06)."""
    g = seed("exact", kind, per_token, dtype, smooth)
    shape = (2, 9, 80)
    x, r = inputs(shape, dtype, g, device, integers=True), inputs(shape, dtype, g, device, integers=True)
    x[0, 3] = 0  # a row of zeros: scale 1, codes 0
    r[0, 3] = 0
    w, s = (torch.rand(80, generator=g) + 0.5).to(dtype).to(device), smoothing(80, dtype, smooth, g, device)
    cpu = [None if t is None else t.cpu() for t in (x, r, w, s)]
    codes, scales = nq.rms_norm_quant(x, w, 1e-6, s, kind, per_token)
    ref_codes, ref_scales = nq.reference_rms_norm_quant(cpu[0], cpu[2], 1e-6, cpu[3], kind, per_token)
    assert_same(codes.cpu(), ref_codes)
    assert torch.equal(scales.cpu(), ref_scales)
    total, codes, scales = nq.add_rms_norm_quant(x, r, w, 1e-6, s, kind, per_token)
    ref_total, ref_codes, ref_scales = nq.reference_add_rms_norm_quant(*cpu[:3], 1e-6, cpu[3], kind, per_token)
    assert torch.equal(total.cpu(), ref_total)
    assert_same(codes.cpu(), ref_codes)
    assert torch.equal(scales.cpu(), ref_scales)
    assert float(scales[-1 if per_token else 0]) != 1.0  # real rows set the scales


@pytest.mark.parametrize("k", [1, 37, 4100], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,per_token", SCHEMES)
def test_kernels_equal_the_references_on_random_rows(device, kind, per_token, dtype, k):
    g = seed("random", kind, per_token, dtype, k)
    m = 3 if k > 1000 else 6
    x, r = inputs((m, k), dtype, g, device), inputs((m, k), dtype, g, device)
    w, s = (torch.rand(k, generator=g) + 0.5).to(dtype).to(device), smoothing(k, dtype, "same", g, device)
    gu = (torch.randn(m, 2 * k, generator=g) * 3).to(dtype).to(device)
    gate, up = gu[:, :k], gu[:, k:]  # the halves of a merged gate|up projection, read with their row stride
    got = {
        "rms_norm": (nq.rms_norm_quant(x, w, 1e-6, None, kind, per_token),
                     nq.reference_rms_norm_quant(x, w, 1e-6, None, kind, per_token)),
        "add_rms_norm": (nq.add_rms_norm_quant(x, r, w, 1e-6, s, kind, per_token),
                         nq.reference_add_rms_norm_quant(x, r, w, 1e-6, s, kind, per_token)),
        "swiglu": (nq.glu_quant(gate, up, "silu", s, kind, per_token),
                   nq.reference_glu_quant(gate, up, "silu", s, kind, per_token)),
    }
    if k > 1:  # a one-element row is its own scale, and below gate = -9 the reference's 1 + tanh(z) is
        # the rounding noise of PyTorch's tanh (0 or 6e-8): no kernel matches that but PyTorch's own
        got["geglu"] = (nq.glu_quant(gate, up, "gelu_tanh", None, kind, per_token),
                        nq.reference_glu_quant(gate, up, "gelu_tanh", None, kind, per_token))
    for name, (out, ref) in got.items():
        if name == "add_rms_norm":
            assert torch.equal(out[0], ref[0]), name
        # gelu_tanh's 1 + tanh(z) cancels for gate < -3: there an ulp of tanh (PyTorch's Sleef against
        # the kernel's exp) is up to 2^-12 of the result, which sets a row's scale when the row is that value
        rtol = 2 ** -11 if name == "geglu" else 2 ** -20
        assert_close_codes(out[-2], out[-1], ref[-2], ref[-1], kind, rtol)
        qmax = 127.0 if kind == "int8" else 448.0
        assert float(out[-2].float().abs().max()) == qmax  # the rows span the grid


def test_long_rows_and_odd_dtypes_run_the_reference(device):
    """Rows longer than MAX_K, mixed input dtypes and erf GeLU: the reference's numbers, not an error."""
    g = seed("fallback")
    x = inputs((2, nq.MAX_K + 16), torch.bfloat16, g, device)
    w = torch.ones(nq.MAX_K + 16, dtype=torch.bfloat16, device=device)
    codes, scales = nq.rms_norm_quant(x, w, 1e-6, None, "fp8")
    ref_codes, ref_scales = nq.reference_rms_norm_quant(x, w, 1e-6, None, "fp8")
    assert_same(codes, ref_codes)
    assert torch.equal(scales, ref_scales)
    gate, up = inputs((3, 40), torch.float16, g, device), inputs((3, 40), torch.float32, g, device)
    for act in ("silu", "gelu"):
        got, want = nq.glu_quant(gate, up, act, None, "int8"), nq.reference_glu_quant(gate, up, act, None, "int8")
        assert_same(got[0], want[0])
        assert torch.equal(got[1], want[1])


# ------------------------------------------------------------------ the linears on codes
@pytest.mark.parametrize("m", [8, 300], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("kind,per_token", SCHEMES)
def test_launchers_on_codes_equal_the_linear_launchers(device, kind, per_token, m):
    """Codes of y (quantize_rows, what linear_w8a8 / linear_fp8 compute inside) through the shared GEMM
    path of codegen/quantized_matmul.py give the linears' bytes on y."""
    from flashc.codegen import quantized_matmul as qm
    from flashc.codegen.quantize_rows import quantize_rows

    g = seed("cuda", kind, per_token, m)
    y = inputs((m, 256), torch.bfloat16, g, device)
    w_scales = (torch.rand(128, generator=g) / 100).to(device)
    bias = torch.randn(128, generator=g).bfloat16().to(device)
    codes, scales = quantize_rows(y, kind, None, per_token)
    if kind == "int8":
        qweight = torch.randint(-127, 128, (128, 256), generator=g, dtype=torch.int8).to(device)
        got = qm.linear_w8a8_q(codes, scales, qweight, w_scales, bias, torch.bfloat16)
        want = qm.linear_w8a8(y, qweight, w_scales, bias, None)
    else:
        qweight = torch.randn(128, 256, generator=g).to(FP8_DTYPE).to(device)
        got = qm.linear_fp8_q(codes, scales, qweight, w_scales, bias, torch.bfloat16)
        want = qm.linear_fp8(y, qweight, w_scales, bias, None, per_token)
    assert got.shape == want.shape == (m, 128)
    assert torch.equal(got, want)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("kind,per_token", SCHEMES)
def test_glu_sweeps_equal_the_one_pass_kernel_bit_for_bit(device, monkeypatch, kind, per_token, act):
    """Long GLU rows go through two sweeps of SWEEP_BLOCK_K columns: the same codes and scales as the
    one-pass kernel (every element computed alike, maxima exact in any order), NaN rows included."""
    g = seed("sweeps", kind, per_token, act)
    k = 200  # not a multiple of the sweep's block: a masked last block
    gu = (torch.randn(5, 2 * k, generator=g) * 3).to(torch.bfloat16).to(device)
    gate, up = gu[:, :k], gu[:, k:]
    gate[2, 7] = float("nan")
    s = smoothing(k, torch.bfloat16, "same", g, device)
    one_pass = nq.glu_quant(gate, up, act, s, kind, per_token)
    monkeypatch.setattr(nq, "SWEEP_K", 16)
    monkeypatch.setattr(nq, "SWEEP_BLOCK_K", 64)
    swept = nq.glu_quant(gate, up, act, s, kind, per_token)
    assert_same(swept[0], one_pass[0])
    assert torch.equal(swept[1].isnan(), one_pass[1].isnan())
    assert torch.equal(swept[1].nan_to_num(), one_pass[1].nan_to_num())
    if per_token:  # the NaN row's scale is 1, as quantize_rows gives it
        assert float(swept[1][2]) == 1.0 and float(swept[1][0]) != 1.0

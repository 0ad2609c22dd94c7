"""flashc.codegen.quantize_rows: the fused per-token quantization and int32 epilogue of the W8A8 / FP8
linears against the ops' own functions (flashc/quantized_ops.py: _rows + quantize_rows_int8 /
quantize_rows_fp8, _finish), bit for bit, on fresh random inputs: every float dtype, smoothing
scale on and off, rows longer than one tile, zero / inf / NaN rows, ties; and the CUDA launchers of
codegen/quantized_matmul.py running them. On a CPU the kernels run in Triton's interpreter."""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import _triton_common  # noqa: E402
from flashc.codegen import quantize_rows as qr  # noqa: E402
from flashc.quantized_ops import _finish, _rows, quantize_rows_fp8, quantize_rows_int8  # noqa: E402

if not torch.cuda.is_available() and not _triton_common.is_interpreted(qr._quantize_rows_kernel):
    qr = importlib.reload(qr)  # imported before tests/codegen/conftest.py chose the interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def seed(*args) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(args).encode()))


def op_quantize(x, kind, input_scale, per_token=True):
    """What flashc.linear_w8a8 / linear_fp8 do to their input, written with the ops' own functions."""
    rows = _rows(x, input_scale)
    return quantize_rows_int8(rows) if kind == "int8" else quantize_rows_fp8(rows, per_token)


def assert_same_codes(q, ref):
    """Equal bytes; NaN codes (fp8 only) where the reference has NaN, whatever their sign bit."""
    assert q.dtype == ref.dtype and q.shape == ref.shape
    nan = ref.float().isnan()
    assert torch.equal(q.float().isnan(), nan)
    assert torch.equal(q.view(torch.uint8)[~nan], ref.view(torch.uint8)[~nan])


def rows_of(m, k, dtype, g, device):
    """Magnitudes spread over five decades across the columns: codes cover the whole grid, subnormals too."""
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)[torch.randperm(k, generator=g)]
    return x.to(dtype).to(device)


def test_kernels_run_here():
    """On a CPU the tests below must exercise the interpreted kernels, not the PyTorch fallback."""
    assert torch.cuda.is_available() or _triton_common.is_interpreted(qr._quantize_rows_kernel)


def test_roundings_are_native_exactly_where_compiled():
    """Compiled kernels round with the GPU's conversion instructions; interpreted ones with the written-out
    integer forms (the interpreter's casts round bf16 half up). The tests here check whichever this runs."""
    assert bool(qr._NATIVE_ROUNDING) == (not _triton_common.is_interpreted(qr._quantize_rows_kernel))


@pytest.mark.parametrize("shape", [(1, 1), (6, 37), (3, qr.TILE + 5)], ids=str)
@pytest.mark.parametrize("smooth", [None, "same", torch.float32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantize_equals_the_ops(device, kind, dtype, smooth, shape):
    g = seed(kind, dtype, smooth, shape)
    m, k = shape
    x = rows_of(m, k, dtype, g, device)
    s = None if smooth is None else (torch.rand(k, generator=g) * 4 + 0.1).to(dtype if smooth == "same" else smooth)
    s = None if s is None else s.to(device)
    q, scale = qr.quantize_rows(x, kind, s)
    ref_q, ref_scale = op_quantize(x, kind, s)
    assert scale.dtype == torch.float32 and scale.shape == (m, 1)
    assert torch.equal(scale, ref_scale)
    assert_same_codes(q, ref_q)
    qmax = 127.0 if kind == "int8" else 448.0
    assert torch.equal(q.float().abs().amax(-1), torch.full((m,), qmax, device=device))  # each row spans the grid


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("smooth", [False, True])
def test_fp8_per_tensor_equals_the_op(device, dtype, smooth):
    g = seed("tensor", dtype, smooth)
    x = rows_of(9, 130, dtype, g, device)
    x[4] *= 50  # one row sets the scale of all
    s = (torch.rand(130, generator=g) + 0.5).to(dtype).to(device) if smooth else None
    q, scale = qr.quantize_rows(x, "fp8", s, per_token=False)
    ref_q, ref_scale = op_quantize(x, "fp8", s, per_token=False)
    assert scale.shape == (1, 1) and torch.equal(scale, ref_scale)
    assert_same_codes(q, ref_q)


# the interpreter computes with numpy, which warns about the inf and NaN these tests feed it
NUMPY_WARNS = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")


@NUMPY_WARNS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_zero_inf_nan_rows_as_the_ops(device, kind, dtype):
    """A zero row gets scale 1 and zero codes; an inf row scale inf (its finite values code 0, its
    infs NaN: int8 0); a NaN row scale 1, as torch's amax propagates NaN and amax > 0 then fails."""
    g = seed("special", kind, dtype)
    x = rows_of(6, 300, dtype, g, device)
    x[1] = 0
    x[2, 17] = float("inf")
    x[3, 5], x[3, 200] = float("nan"), -float("inf")
    x[4, 9] = -float("inf")
    x[5] = -0.0
    q, scale = qr.quantize_rows(x, kind, None)
    ref_q, ref_scale = op_quantize(x, kind, None)
    assert torch.equal(scale, ref_scale)
    assert scale[1].item() == 1.0 and scale[3].item() == 1.0 and scale[2].item() == float("inf")
    assert_same_codes(q, ref_q)
    # and with a NaN in the per-tensor maximum, the whole tensor's scale is 1, as the op's
    if kind == "fp8":
        q, scale = qr.quantize_rows(x, kind, None, per_token=False)
        ref_q, ref_scale = op_quantize(x, kind, None, per_token=False)
        assert scale.item() == ref_scale.item() == 1.0
        assert_same_codes(q, ref_q)


@NUMPY_WARNS
def test_smoothing_overflow_to_inf_as_the_ops(device):
    """fp16 x * input_scale can overflow: the kernel rounds the product to fp16 as `_rows` does."""
    x = torch.tensor([[60000.0, 1.0, -2.0, 3.0]], dtype=torch.float16, device=device)
    s = torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float16, device=device)
    for kind in ("int8", "fp8"):
        q, scale = qr.quantize_rows(x, kind, s)
        ref_q, ref_scale = op_quantize(x, kind, s)
        assert scale.item() == ref_scale.item() == float("inf")
        assert_same_codes(q, ref_q)


def test_ties_round_to_even(device):
    """Rows whose scale is exactly 1 (amax = 127 or 448), so the values themselves are the ties."""
    int8_row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -125.5, 3.4999998, 0.49999997])
    q, scale = qr.quantize_rows(int8_row[None].to(device), "int8")
    assert scale.item() == 1.0
    assert q.cpu().tolist() == [[127, 0, 2, 2, 0, -2, 126, -126, 3, 0]]
    assert torch.equal(q, op_quantize(int8_row[None].to(device), "int8", None)[0])
    # e4m3 ties: 100 between 96 and 104, 108 between 104 and 112, 2^-10 between 0 and 2^-9 (subnormal
    # steps), 3 * 2^-10 between 2^-9 and 2^-8, 15 * 2^-10 between the last subnormal and the first
    # normal (2^-6), 1.0625 * 2^-4 between 2^-4 and 1.125 * 2^-4
    fp8_row = torch.tensor([448.0, 100.0, 108.0, 2.0 ** -10, 3 * 2.0 ** -10, 15 * 2.0 ** -10, -100.0, 0.0625 * 1.0625,
                            -448.0])
    q, scale = qr.quantize_rows(fp8_row[None].to(device), "fp8")
    assert scale.item() == 1.0
    assert q.float().cpu().tolist() == [[448.0, 96.0, 112.0, 0.0, 2.0 ** -8, 2.0 ** -6, -96.0, 0.0625, -448.0]]
    assert_same_codes(q, op_quantize(fp8_row[None].to(device), "fp8", None)[0])


def test_strided_rows(device):
    """A transposed view: rows whose elements are not adjacent in memory."""
    g = seed("strided")
    x = rows_of(50, 7, torch.bfloat16, g, device).t()  # [7, 50], column stride 7
    for kind in ("int8", "fp8"):
        q, scale = qr.quantize_rows(x, kind)
        ref_q, ref_scale = op_quantize(x, kind, None)
        assert torch.equal(scale, ref_scale)
        assert_same_codes(q, ref_q)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_dtype", [None, "same", torch.float32], ids=str)
@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.float32], ids=str)
def test_dequantize_equals_finish(device, acc_dtype, bias_dtype, out_dtype):
    g = seed("dequant", acc_dtype, bias_dtype, out_dtype)
    m, n = 19, 300  # n over one block of columns, not a multiple of it
    if acc_dtype == torch.int32:  # above 2^24 the int32 -> fp32 conversion rounds too
        acc = torch.randint(-2 ** 27, 2 ** 27, (m, n), generator=g, dtype=torch.int32)
    else:
        acc = torch.randn(m, n, generator=g) * 1e4
    x_scale = torch.rand(m, 1, generator=g) * 1e-3 + 1e-5
    w_scale = torch.rand(n, generator=g) * 1e-2
    bias = None if bias_dtype is None else torch.randn(n, generator=g)
    bias = bias if bias is None else bias.to(out_dtype if bias_dtype == "same" else bias_dtype)
    acc, x_scale, w_scale = acc.to(device), x_scale.to(device), w_scale.to(device)
    bias = None if bias is None else bias.to(device)
    x = torch.empty(m, 8, dtype=out_dtype, device=device)  # _finish reads x's dtype and leading shape
    out = qr.dequantize_int32(acc, x_scale, w_scale, bias, out_dtype)
    ref = _finish(acc.float(), x_scale, w_scale, bias, x)
    assert out.dtype == out_dtype and out.shape == (m, n)
    assert torch.equal(out, ref)


def test_dequantize_broadcast_scales_and_row_slices(device):
    """One x scale and one w scale (per-tensor FP8); an accumulator sliced from padded rows."""
    g = seed("broadcast")
    acc = torch.randint(-2 ** 20, 2 ** 20, (24, 64), generator=g, dtype=torch.int32).to(device)[:5]
    x_scale = torch.tensor([[3e-4]], device=device)
    w_scale = torch.tensor([7e-3], device=device)
    x = torch.empty(5, 4, dtype=torch.bfloat16, device=device)
    assert torch.equal(qr.dequantize_int32(acc, x_scale, w_scale, None, torch.bfloat16),
                       _finish(acc.float(), x_scale, w_scale, None, x))


@NUMPY_WARNS
def test_dequantize_inf_and_nan_as_finish(device):
    acc = torch.tensor([[5, -3, 0], [1, 0, 2]], dtype=torch.int32, device=device)
    x_scale = torch.tensor([[float("inf")], [1.0]], device=device)
    w_scale = torch.tensor([1.0, float("nan"), 2.0], device=device)
    for dtype in DTYPES:
        out = qr.dequantize_int32(acc, x_scale, w_scale, None, dtype)
        ref = _finish(acc.float(), x_scale, w_scale, None, torch.empty(2, 1, dtype=dtype, device=device))
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out[~ref.isnan()], ref[~ref.isnan()])


def test_clear_errors(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="kind must be one of"):
        qr.quantize_rows(x, "int4")
    with pytest.raises(ValueError, match="per-tensor scales are FP8's only"):
        qr.quantize_rows(x, "int8", per_token=False)
    with pytest.raises(ValueError, match="must have 2 dims"):
        qr.quantize_rows(x[0], "int8")
    with pytest.raises(TypeError, match="x2d must have dtype"):
        qr.quantize_rows(x.double(), "int8")
    with pytest.raises(ValueError, match=r"input_scale must have shape \(8,\)"):
        qr.quantize_rows(x, "int8", torch.ones(7, device=device))
    with pytest.raises(ValueError, match="rows must not be empty"):
        qr.quantize_rows(x[:, :0], "fp8")
    acc = torch.zeros(3, 4, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="acc must have dtype"):
        qr.dequantize_int32(acc.to(torch.int16), torch.ones(3, 1, device=device), torch.ones(4, device=device), None,
                            torch.float16)
    with pytest.raises(ValueError, match="x_scale must hold one scale per row"):
        qr.dequantize_int32(acc, torch.ones(2, 1, device=device), torch.ones(4, device=device), None, torch.float16)
    with pytest.raises(ValueError, match="w_scale must hold one scale per column"):
        qr.dequantize_int32(acc, torch.ones(3, 1, device=device), torch.ones(3, device=device), None, torch.float16)
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        qr.dequantize_int32(acc, torch.ones(3, 1, device=device), torch.ones(4, device=device), None, torch.int8)


# ------------------------------------------------------------------ the CUDA launchers running the kernels
@pytest.fixture
def launchers(device, monkeypatch):
    """codegen/quantized_matmul.py with its kernel calls counted; on a CPU told to take the CUDA path
    (torch's int8 and fp8 GEMMs run on the CPU too), where the interpreted kernels run."""
    from flashc.codegen import quantized_matmul as qm

    calls = {"quantize": 0, "dequantize": 0}

    def quantize(*args, **kwargs):
        calls["quantize"] += 1
        return qr.quantize_rows(*args, **kwargs)

    def dequantize(*args, **kwargs):
        calls["dequantize"] += 1
        return qr.dequantize_int32(*args, **kwargs)

    monkeypatch.setattr(qm, "quantize_rows", quantize)
    monkeypatch.setattr(qm, "dequantize_int32", dequantize)
    if device.type != "cuda":
        floats = _triton_common.FLOAT_DTYPES
        monkeypatch.setattr(qm, "_fused", lambda *t: all(u.dtype in floats for u in t if u is not None))
    return qm, calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_w8a8_launcher_runs_the_kernels_and_equals_the_op(device, launchers, dtype):
    from flashc.passes.quantize.smoothquant import quantize_weight_int8

    qm, calls = launchers
    g = seed("w8a8", dtype)
    k, n = 64, 48
    x = rows_of(2 * 5, k, dtype, g, device).reshape(2, 5, k)
    q, scales = quantize_weight_int8(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g).to(dtype).to(device)
    smooth = (torch.rand(k, generator=g) + 0.5).to(dtype).to(device)
    q, scales = q.to(device), scales.to(device)
    out = qm.linear_w8a8(x, q, scales, bias, smooth)
    assert calls == {"quantize": 1, "dequantize": 1}
    # the integer product is exact in both, and the kernels compute the op's epilogue bit for bit
    assert torch.equal(out, torch.ops.flashc.linear_w8a8.default(x, q, scales, bias, smooth))


def test_fp8_launcher_runs_the_kernels(device, launchers):
    from flashc.passes.quantize.fp8 import quantize_weight_fp8

    qm, calls = launchers
    g = seed("fp8")
    k, n = 64, 32
    x = rows_of(7, k, torch.float32, g, device)
    q, scales = quantize_weight_fp8(torch.randn(n, k, generator=g), "tensor")
    q, scales = q.to(device), scales.to(device)
    bias = torch.randn(n, generator=g).to(device)
    try:
        out = qm.linear_fp8(x, q, scales, bias, None, False)
    except RuntimeError as e:  # CPU builds without an fp8 GEMM
        if device.type == "cpu" and ("scale" in str(e).lower() or "not implemented" in str(e).lower()):
            pytest.skip(f"this torch's CPU _scaled_mm cannot run this: {e}")
        raise
    assert calls == {"quantize": 1, "dequantize": 1}
    ref = torch.ops.flashc.linear_fp8.default(x, q, scales, bias, None, False)
    # the fp8 codes are the op's; only the GEMM's fp32 summation order differs (and on Hopper its
    # narrower accumulator: see tests/codegen/test_quantized_matmul.py)
    tol = 3e-4 if device.type == "cuda" else 1e-6
    assert float((out.double() - ref.double()).norm() / ref.double().norm()) < tol

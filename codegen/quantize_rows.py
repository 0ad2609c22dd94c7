"""Per-token activation quantization and the int32 dequantization epilogue of the W8A8 / FP8 linears.

Around a library GEMM (`torch._int_mm`, `torch._scaled_mm`) the ops' references
(flashc/quantized_ops.py) spend a separate PyTorch kernel on every elementwise step: the
smoothing product, abs, amax, divide, round, clamp and cast of the input, then int32 -> float,
times the row scale, times the column scale, plus bias and the cast back. On an H100 these
passes took about twice the int8 GEMMs' time in a kernel profile of bench/decode.py's W8A8 prefill
of llama-3-8b (2048 tokens, reported with the issue; not rerun here). The two kernels here do each
side in one pass:

* `quantize_rows`: a program takes BLOCK_M rows; pass 1 computes each row's largest magnitude
  (of x * input_scale rounded to the product's dtype, as `_rows` does), pass 2 re-reads the row
  (from cache) and writes its int8 or e4m3 codes and its fp32 scale.
* `dequantize_int32`: out = ((acc * x_scale) * w_scale + bias) in fp32, cast to the output dtype.

Both equal the references (`reference_quantize_rows`, `reference_dequantize`, built from the
ops' own functions) bit for bit, all-zero rows (scale 1), inf and NaN included: the divisions
are IEEE (`tl.div_rn`, Triton's `/` is approximate on NVIDIA GPUs), the epilogue is compiled
without fused multiply-adds (the reference rounds after each step), and rounding to bf16 and to
e4m3 is written out in integer arithmetic (round half to even, as PyTorch's casts) because
Triton's interpreter, which tests these kernels on the CPU, rounds half up there and mishandles
carries into the exponent; on a GPU the few integer operations hide under the memory traffic.
Round-half-to-even to int8 codes (`torch.round`) is floor plus a tie rule, which needs no
libdevice function (the interpreter has none).
"""

from __future__ import annotations

from typing import Optional

import torch

from flashc.quantized_ops import FP8_DTYPE, FP8_MAX, INT8_MAX, quantize_rows_fp8, quantize_rows_int8, row_scales

from ._triton_common import (
    FLOAT_DTYPES,
    HAS_TRITON,
    check_tensor,
    device_guard,
    is_interpreted,
    next_pow2,
    triton,
    tl,
)

__all__ = ["quantize_rows", "dequantize_int32", "reference_quantize_rows", "reference_dequantize", "KINDS"]

KINDS = ("int8", "fp8")
TILE = 4096  # elements per program and loop step: 16 per thread at 8 warps, a row of 4096 in one step
_ROUNDING = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # what x * input_scale is rounded to


# ---------------------------------------------------------------------------
# References (the ops' own arithmetic)
# ---------------------------------------------------------------------------
def reference_quantize_rows(x2d: torch.Tensor, kind: str, input_scale: Optional[torch.Tensor] = None,
                            per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`_rows` then `quantize_rows_int8` / `quantize_rows_fp8` of flashc/quantized_ops.py."""
    rows = x2d if input_scale is None else x2d * input_scale
    return quantize_rows_int8(rows) if kind == "int8" else quantize_rows_fp8(rows, per_token)


def reference_dequantize(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                         bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """`_finish` of flashc/quantized_ops.py on an [M, N] accumulator: the same steps, same order."""
    y = acc.float() * x_scale.reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
if HAS_TRITON:

    from triton.language.extra import libdevice

    @triton.jit
    def _interpretation_probe():
        pass

    # On a GPU the roundings below are single conversion instructions (round half to even, as PyTorch's casts);
    # Triton's interpreter rounds bf16 half up and mishandles carries into the exponent, so there they are
    # written out in integer arithmetic (about ten instructions an element each). The suspected cost: on an
    # H100 the norm / GLU producers of codegen/norm_quant.py, which hold rows in registers and round two to
    # four times an element, took 8.4 ms over the 96 launches of llama-3-8b's FP8 prefill, where the bf16 norm
    # and GLU kernels moving the same rows took 3.1 ms (2026-12-06; the native forms not yet timed).
    _NATIVE_ROUNDING = tl.constexpr(not is_interpreted(_interpretation_probe))

    @triton.jit
    def _round_half_even(v):
        """torch.round on fp32 (ties to even; inf and NaN pass through), exact for every input."""
        if _NATIVE_ROUNDING:  # one cvt.rni: ties to even
            r = libdevice.rint(v)
        else:
            f = tl.floor(v)
            d = v - f  # exact: below 2^23 the fraction is representable, above it d is 0
            odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
            r = tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
        return r

    @triton.jit
    def _bf16_bits(v):
        """fp32 -> the bits of the nearest bf16 (ties to even, NaN to 0x7FC0, as PyTorch), as uint32."""
        bits = v.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(v == v, rounded, 0x7FC0)

    @triton.jit
    def _as_rows(v, ROUND: tl.constexpr):
        """fp32 product -> the value of x * input_scale in the product's dtype (0 fp32, 1 fp16, 2 bf16)."""
        if ROUND == 1:
            v = v.to(tl.float16).to(tl.float32)
        elif ROUND == 2:
            if _NATIVE_ROUNDING:  # one cvt.rn.bf16.f32: ties to even
                v = v.to(tl.bfloat16).to(tl.float32)
            else:
                v = (_bf16_bits(v) << 16).to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def _e4m3_bits(c):
        """fp32 in [-448, 448] or NaN -> e4m3fn bits (ties to even, subnormals, NaN 0x7F), as uint32."""
        if _NATIVE_ROUNDING:  # cvt.rn.satfinite.e4m3x2.f32 (sm_89 and later): ties to even, subnormals kept
            bits = c.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.uint32)
        else:
            bits = c.to(tl.uint32, bitcast=True)
            sign = (bits >> 24) & 0x80
            mag = bits & 0x7FFFFFFF
            # normals keep 3 of fp32's 23 mantissa bits; a carry out of the mantissa bumps the exponent
            rounded = mag + 0x7FFFF + ((mag >> 20) & 1)
            normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
            # below 2^-6 the codes count steps of 2^-9 (code 8, the first normal, is where rounding up lands)
            subnormal = _round_half_even(tl.abs(c) * 512.0).to(tl.uint32)
            code = tl.where(tl.abs(c) < 0.015625, subnormal, normal)
            bits = tl.where(c == c, code, 0x7F) | sign
        return bits

    @triton.jit
    def _load_rows(X, S, rows, row_ok, cols, K, stride_xm, stride_xk,
                   HAS_SMOOTH: tl.constexpr, ROUND: tl.constexpr):
        mask = row_ok[:, None] & (cols < K)[None, :]
        v = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            s = tl.load(S + cols, mask=cols < K, other=0.0).to(tl.float32)
            v = _as_rows(v * s[None, :], ROUND)  # fp32 product of two 16-bit floats is exact: one rounding
        return v, mask

    @triton.jit
    def _quantize_pass(X, S, Q, rows, row_ok, cols0, K, stride_xm, stride_xk, stride_qm, scale, qmax,
                       HAS_SMOOTH: tl.constexpr, ROUND: tl.constexpr, FP8: tl.constexpr, BLOCK_K: tl.constexpr):
        """Pass 2: the rows again, divided by their scales [BLOCK_M], as codes (int8, or e4m3 bits)."""
        for off in range(0, K, BLOCK_K):
            cols = off + cols0
            v, mask = _load_rows(X, S, rows, row_ok, cols, K, stride_xm, stride_xk, HAS_SMOOTH, ROUND)
            tl.store(Q + rows[:, None] * stride_qm + cols[None, :], _codes(v, scale, qmax, FP8), mask=mask)

    @triton.jit
    def _codes(v, scale, qmax, FP8: tl.constexpr):
        """Rows v [BLOCK_M, BLOCK_K] divided by their scales [BLOCK_M] -> int8 codes, or e4m3 bits as uint8."""
        t = tl.div_rn(v, scale[:, None])
        c = tl.minimum(tl.maximum(t, -qmax), qmax)
        if FP8:
            code = _e4m3_bits(tl.where(t == t, c, t)).to(tl.uint8)
        else:  # NaN codes are 0, as PyTorch's float -> int8 cast gives on CPU and GPU
            code = tl.where(t == t, tl.minimum(tl.maximum(_round_half_even(t), -qmax), qmax), 0.0).to(tl.int8)
        return code

    @triton.jit
    def _row_scale(row_amax, row_nan, qmax):
        """row_scales: amax / qmax, or 1 where amax > 0 fails (all zeros, or NaN)."""
        return tl.where((row_amax > 0.0) & (~row_nan), tl.div_rn(row_amax, qmax), 1.0)

    @triton.jit
    def _store_row_scales(SCALE, AMAX, rows, row_ok, row_amax, row_nan, qmax, MODE: tl.constexpr):
        """MODE 1 (per-tensor, first launch): the rows' maxima to AMAX, NaN for a row holding one; MODE 0: the
        rows' scales to SCALE. Returns the scales (MODE 1 writes no codes: its return value is unused)."""
        if MODE == 1:
            tl.store(AMAX + rows, tl.where(row_nan, float("nan"), row_amax), mask=row_ok)
            scale = row_amax
        else:
            scale = _row_scale(row_amax, row_nan, qmax)
            tl.store(SCALE + rows, scale, mask=row_ok)
        return scale

    @triton.jit
    def _quantize_rows_kernel(
        X, S, Q, SCALE, AMAX,
        M, K,
        stride_xm, stride_xk, stride_qm,
        qmax,
        HAS_SMOOTH: tl.constexpr, ROUND: tl.constexpr, FP8: tl.constexpr, MODE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """BLOCK_M rows of X [M, K] -> codes Q [M, K] (int8, or e4m3 bits as uint8) and fp32 scales.

        MODE 0: per-row scales, computed (pass 1) and written to SCALE [M] before quantizing (pass 2).
        MODE 1: pass 1 only, writing each row's largest magnitude (NaN if it holds one) to AMAX [M].
        MODE 2: pass 2 only, with the single scale SCALE[0] (per-tensor fp8).
        """
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)
        cols0 = tl.arange(0, BLOCK_K)
        if MODE != 2:
            amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            nan = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
            for off in range(0, K, BLOCK_K):
                v, _ = _load_rows(X, S, rows, row_ok, off + cols0, K, stride_xm, stride_xk, HAS_SMOOTH, ROUND)
                a = tl.abs(v)
                # NaN kept apart: torch's amax propagates it, tl.maximum on a GPU drops it
                nan = nan | (a != a).to(tl.int32)
                amax = tl.maximum(amax, tl.where(a == a, a, 0.0))
            row_amax = tl.max(amax, axis=1)
            row_nan = tl.max(nan, axis=1) > 0
            scale = _store_row_scales(SCALE, AMAX, rows, row_ok, row_amax, row_nan, qmax, MODE)
        else:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SCALE)
        if MODE != 1:
            _quantize_pass(X, S, Q, rows, row_ok, cols0, K, stride_xm, stride_xk, stride_qm, scale, qmax,
                           HAS_SMOOTH, ROUND, FP8, BLOCK_K)

    @triton.jit
    def _dequantize_kernel(
        ACC, XS, WS, BIAS, OUT,
        M, N,
        stride_am, stride_xs, stride_ws, stride_om,
        HAS_BIAS: tl.constexpr, BF16_OUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """OUT[m, n] = ((ACC[m, n] * XS[m]) * WS[n] + BIAS[n]) in fp32, rounded once to OUT's dtype."""
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        acc = tl.load(ACC + rows[:, None] * stride_am + cols[None, :], mask=mask, other=0).to(tl.float32)
        xs = tl.load(XS + rows * stride_xs, mask=row_ok, other=0.0).to(tl.float32)
        ws = tl.load(WS + cols * stride_ws, mask=col_ok, other=0.0).to(tl.float32)
        y = acc * xs[:, None]
        y = y * ws[None, :]
        if HAS_BIAS:
            y = y + tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out = OUT + rows[:, None] * stride_om + cols[None, :]
        if BF16_OUT:  # OUT is the uint16 view of the bf16 result
            tl.store(out, _bf16_bits(y).to(tl.uint16), mask=mask)
        else:
            tl.store(out, y.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _runs_reference(t: torch.Tensor) -> bool:
    """No Triton, or CPU tensors that only the interpreter could run: the PyTorch reference runs."""
    return not HAS_TRITON or (t.device.type != "cuda" and not is_interpreted(_quantize_rows_kernel))


def _same_device(fn: str, first: tuple[str, torch.Tensor], *others: tuple[str, Optional[torch.Tensor]]) -> None:
    for name, t in others:
        if t is not None and t.device != first[1].device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first[0]} is on {first[1].device}; "
                             "all inputs must share a device")


def _tile(m: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of n elements: TILE elements, rows stacked when short."""
    block_n = min(next_pow2(n), TILE)
    block_m = max(1, min(next_pow2(m), TILE // block_n))
    return block_m, block_n, 8 if block_m * block_n >= 2048 else 4


def quantize_rows(x2d: torch.Tensor, kind: str, input_scale: Optional[torch.Tensor] = None,
                  per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantization of rows x2d [M, K] for the W8A8 / FP8 linears, in one kernel.

    kind "int8": codes round(r / s) clamped to +-127 with s = max|r| / 127 per row; kind "fp8":
    e4m3 values of r / s with s = max|r| / 448, per row or (per_token=False) over the whole
    tensor. r is x2d, or x2d * input_scale [K] (SmoothQuant's smoothing factor) in the
    product's dtype. A row of zeros gets scale 1. Returns (codes [M, K], fp32 scales [M, 1], or
    [1, 1] per tensor), equal bit for bit to `reference_quantize_rows`, which runs instead on
    CPU tensors unless Triton's interpreter is on.
    """
    fn = "quantize_rows"
    if kind not in KINDS:
        raise ValueError(f"{fn}: kind must be one of {KINDS}, got {kind!r}")
    if kind == "int8" and not per_token:
        raise ValueError(f"{fn}: per-tensor scales are FP8's only (W8A8 quantizes its input per token)")
    check_tensor(fn, "x2d", x2d, ndim=2)
    m, k = x2d.shape
    if k == 0:
        raise ValueError(f"{fn}: rows must not be empty (a scale needs a largest magnitude), got shape {(m, k)}")
    if input_scale is not None:
        check_tensor(fn, "input_scale", input_scale, ndim=1)
        if input_scale.shape[0] != k:
            raise ValueError(f"{fn}: input_scale must have shape ({k},) to match x2d's rows, "
                             f"got {tuple(input_scale.shape)}")
        _same_device(fn, ("x2d", x2d), ("input_scale", input_scale))
    if _runs_reference(x2d):
        return reference_quantize_rows(x2d, kind, input_scale, per_token)

    fp8 = kind == "fp8"
    row_dtype = x2d.dtype if input_scale is None else torch.promote_types(x2d.dtype, input_scale.dtype)
    q = torch.empty((m, k), dtype=FP8_DTYPE if fp8 else torch.int8, device=x2d.device)
    scale = torch.empty((m, 1) if per_token else (1, 1), dtype=torch.float32, device=x2d.device)
    if m == 0:
        return q, scale.fill_(1.0)
    block_m, block_k, warps = _tile(m, k)
    q_out = q.view(torch.uint8) if fp8 else q
    s = input_scale.contiguous() if input_scale is not None else x2d  # not read without smoothing
    common = dict(HAS_SMOOTH=input_scale is not None, ROUND=_ROUNDING[row_dtype], FP8=fp8,
                  BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, enable_fp_fusion=False)
    qmax = FP8_MAX if fp8 else INT8_MAX
    grid = (triton.cdiv(m, block_m),)
    with device_guard(x2d.device):
        run_modes(lambda out_scale, amax, mode: _quantize_rows_kernel[grid](
            x2d, s, q_out, out_scale, amax, m, k, x2d.stride(0), x2d.stride(1), k, qmax, MODE=mode, **common),
            per_token, scale, m, qmax)
    return q, scale


def run_modes(launch, per_token: bool, scale: torch.Tensor, m: int, qmax: float) -> None:
    """Run a quantizing kernel in its MODEs (``_store_row_scales``'): per-row scales in one launch (MODE 0), or one
    scale for the tensor in two (MODE 1 writes the rows' maxima, PyTorch reduces them, a few bytes, into `scale`,
    MODE 2 writes the codes). ``launch(scale_out, amax_out, mode)`` starts the kernel once."""
    if per_token:
        launch(scale, scale, 0)
        return
    amax = torch.empty(m, dtype=torch.float32, device=scale.device)
    launch(scale, amax, 1)
    scale.copy_(row_scales(amax.reshape(1, -1), qmax))
    launch(scale, amax, 2)


def dequantize_int32(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                     out_dtype: torch.dtype) -> torch.Tensor:
    """The epilogue of the W8A8 / FP8 linears in one pass: (acc * x_scale * w_scale + bias) -> out_dtype.

    acc [M, N] is the GEMM's int32 (or fp32) accumulator, columns contiguous; x_scale fp32 [M, 1]
    (or one value); w_scale [N] (or one value, per-tensor FP8), bias [N] or None, any float
    dtype (read as fp32). Computed in fp32 in `_finish`'s order, rounded once: equal bit for
    bit to `reference_dequantize`, which runs instead on CPU tensors unless Triton's
    interpreter is on. Returns a contiguous [M, N] tensor of out_dtype.
    """
    fn = "dequantize_int32"
    check_tensor(fn, "acc", acc, ndim=2, dtypes=(torch.int32, torch.float32))
    m, n = acc.shape
    check_tensor(fn, "x_scale", x_scale, dtypes=(torch.float32,))
    check_tensor(fn, "w_scale", w_scale)
    if x_scale.numel() not in (1, m):
        raise ValueError(f"{fn}: x_scale must hold one scale per row of acc ({m}) or one in all, "
                         f"got shape {tuple(x_scale.shape)}")
    if w_scale.numel() not in (1, n):
        raise ValueError(f"{fn}: w_scale must hold one scale per column of acc ({n}) or one in all, "
                         f"got shape {tuple(w_scale.shape)}")
    if bias is not None:
        check_tensor(fn, "bias", bias)
        if bias.numel() != n:
            raise ValueError(f"{fn}: bias must have {n} elements (acc's columns), got shape {tuple(bias.shape)}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: out_dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {out_dtype}")
    _same_device(fn, ("acc", acc), ("x_scale", x_scale), ("w_scale", w_scale), ("bias", bias))
    if _runs_reference(acc):
        return reference_dequantize(acc, x_scale, w_scale, bias, out_dtype)

    out = torch.empty((m, n), dtype=out_dtype, device=acc.device)
    if out.numel() == 0:
        return out
    if acc.stride(1) != 1:
        acc = acc.contiguous()
    xs, ws = x_scale.reshape(-1), w_scale.reshape(-1)
    xs, ws = (xs if xs.numel() == 1 else xs.contiguous()), (ws if ws.numel() == 1 else ws.contiguous())
    b = bias.reshape(-1).contiguous() if bias is not None else ws  # not read without bias
    block_m, block_n, warps = _tile(m, min(n, 256))
    bf16 = out_dtype == torch.bfloat16
    o = out.view(torch.uint16) if bf16 else out
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    with device_guard(acc.device):
        _dequantize_kernel[grid](acc, xs, ws, b, o, m, n, acc.stride(0), int(xs.numel() > 1), int(ws.numel() > 1),
                                 out.stride(0), HAS_BIAS=bias is not None, BF16_OUT=bf16,
                                 BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, enable_fp_fusion=False)
    return out

"""RMSNorm, residual-add + RMSNorm and gated activations that write W8A8 / FP8 codes: one kernel each.

The ops are flashc/quantized_input_ops.py's (`flashc.rms_norm_quant`, `flashc.add_rms_norm_quant`,
`flashc.glu_quant`): the producer of a quantized linear's input, then that linear's per-token
quantization. Unfused, the producer writes its bf16 row and `quantize_rows` (codegen/quantize_rows.py)
reads it back to write the codes: 4.76 ms over 128 launches of llama-3-8b's 40.6 ms FP8 prefill
on an H100 (2048 tokens; flashc issue #14). Here a program holds BLOCK_M whole rows in registers
(rows up to `MAX_K` elements), computes the producer's output, its largest magnitude and scale,
and writes only the 1-byte codes and the fp32 scale (and, for the residual add, the sum). Per-tensor
FP8 needs every row's maximum before any code: one launch writes the maxima, PyTorch reduces them
(a few bytes), a second launch recomputes the rows and writes the codes.

The arithmetic is the references' (`reference_*` below, the ops' own functions), step by step:
every rounding to fp16 / bf16 where PyTorch rounds (the sum, the normalised row, the weight product,
the activation, the smoothing product), with quantize_rows.py's integer-arithmetic roundings (Triton's
interpreter rounds bf16 half up), IEEE division and square root (`tl.div_rn`, `tl.sqrt_rn`: the
CPU reference computes rsqrt as 1 / sqrt) and no fused multiply-adds. What is left is summation order
(the row's sum of squares) and, for the GLU, `exp`'s last bit: results equal the references except
where such an ulp moves a value across a rounding boundary (tests/codegen/test_norm_quant.py measures
how often: none on integer-valued rows, whose sums are exact). This follows the references more closely
than the unfused CUDA kernels it replaces did: triton_mlp.py rounds silu(gate) * up once where
flashc.swiglu rounds silu(gate) first, and triton_norm.py uses the approximate rsqrt.
"""

from __future__ import annotations

from typing import Optional

import torch

from flashc.quantized_input_ops import ACTS, KINDS
from flashc.quantized_ops import FP8_DTYPE, FP8_MAX, INT8_MAX

from ._triton_common import FLOAT_DTYPES, HAS_TRITON, check_tensor, device_guard, is_interpreted, next_pow2, triton, tl
from .quantize_rows import _ROUNDING, TILE, run_modes

if HAS_TRITON:
    from .quantize_rows import _as_rows, _codes, _store_row_scales

    @triton.jit
    def _glu_product(A, B, rows, cols, mask, stride_am, stride_bm, ACT: tl.constexpr, ROUND_A: tl.constexpr,
                     ROUND_Y: tl.constexpr):
        """act(A) * B of a [rows, cols] tile in fp32, rounded where the reference rounds."""
        a = tl.load(A + rows[:, None] * stride_am + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(B + rows[:, None] * stride_bm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if ACT == 0:  # silu(a) = a / (1 + exp(-a)), as PyTorch computes it
            act = tl.div_rn(a, 1.0 + tl.exp(-a))
        else:  # gelu_tanh in PyTorch's order of operations, tanh(z) = 1 - 2 / (1 + exp(2z)): its
            # cancellation in 1 + tanh for a < -3 is the reference's too (a * sigmoid(2z) would not have it)
            z = 0.7978845608028654 * (a + 0.044715 * (a * a * a))
            act = 0.5 * a * (1.0 + (1.0 - tl.div_rn(2.0, 1.0 + tl.exp(2.0 * z))))
        return _as_rows(_as_rows(act, ROUND_A) * u, ROUND_Y)  # F.silu(gate) in gate's dtype, then * up

    @triton.jit
    def _smoothed(y, S, cols, col_ok, HAS_SMOOTH: tl.constexpr, ROUND_Q: tl.constexpr):
        """y times the smoothing scale S [K] of its columns, rounded once (the fp32 product of two 16-bit
        floats is exact)."""
        if HAS_SMOOTH:
            s = tl.load(S + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = _as_rows(y * s[None, :], ROUND_Q)
        return y

__all__ = ["rms_norm_quant", "add_rms_norm_quant", "glu_quant", "reference_rms_norm_quant",
           "reference_add_rms_norm_quant", "reference_glu_quant", "MAX_K"]

MAX_K = 16384  # the longest row one program holds in registers (32 warps: 16 fp32 values a thread)
# glu_quant rows longer than this go through the two-sweep kernel, SWEEP_BLOCK_K columns at a time (16 a
# thread at 4 warps); shorter rows, and every norm producer, hold their rows in one program
SWEEP_K = 4096
SWEEP_BLOCK_K = 2048
_RMS_NORM, _ADD_RMS_NORM, _GLU = 0, 1, 2
_ACT_CODES = {"silu": 0, "gelu_tanh": 1}  # "gelu" (erf) runs the reference: no erf in the interpreter


# ---------------------------------------------------------------------------
# References (the ops' own arithmetic)
# ---------------------------------------------------------------------------
def reference_rms_norm_quant(x, weight, eps, input_scale, kind, per_token=True):
    """flashc.rms_norm_quant's reference: flashc.rms_norm, then linear_w8a8's / linear_fp8's quantization."""
    return torch.ops.flashc.rms_norm_quant.default(x, weight, eps, input_scale, kind, per_token)


def reference_add_rms_norm_quant(x, residual, weight, eps, input_scale, kind, per_token=True):
    """flashc.add_rms_norm_quant's reference: (sum, codes, scales)."""
    return torch.ops.flashc.add_rms_norm_quant.default(x, residual, weight, eps, input_scale, kind, per_token)


def reference_glu_quant(gate, up, act, input_scale, kind, per_token=True):
    """flashc.glu_quant's reference: flashc.swiglu / geglu, then the linears' quantization."""
    return torch.ops.flashc.glu_quant.default(gate, up, act, input_scale, kind, per_token)


# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _produce_quant_kernel(
        A, B, W, S, SUM, Q, SCALE, AMAX,
        M, K,
        stride_am, stride_bm, stride_sum, stride_qm,
        eps, qmax,
        PRODUCER: tl.constexpr, ACT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
        ROUND_A: tl.constexpr, ROUND_Y: tl.constexpr, ROUND_Q: tl.constexpr,
        FP8: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """BLOCK_M rows [BLOCK_K >= K] of a producer's output -> codes Q [M, K] and fp32 scales.

        PRODUCER 0: rms_norm(A, W); 1: rms_norm(A + B, W), the sum written to SUM; 2: act(A) * B
        (ACT 0 silu, 1 gelu_tanh). ROUND_A: the dtype of A (and of the sum, the normalised row, the
        activation); ROUND_Y: of the producer's output; ROUND_Q: of its product with the smoothing
        scale S [K] (codes 0 fp32, 1 fp16, 2 bf16). MODE as quantize_rows' kernel: 0 per-row scales
        (SCALE [M]), 1 row maxima only (AMAX [M], NaN for a row holding one), 2 codes with SCALE[0].
        """
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        if PRODUCER == 2:
            y = _glu_product(A, B, rows, cols, mask, stride_am, stride_bm, ACT, ROUND_A, ROUND_Y)
        else:
            a = tl.load(A + rows[:, None] * stride_am + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if PRODUCER == 1:
                r = tl.load(B + rows[:, None] * stride_bm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                a = _as_rows(a + r, ROUND_A)
                if MODE != 2:  # exact: a holds values of SUM's dtype
                    tl.store(SUM + rows[:, None] * stride_sum + cols[None, :], a.to(SUM.dtype.element_ty), mask=mask)
            mean = tl.div_rn(tl.sum(a * a, axis=1), K * 1.0)
            rstd = tl.div_rn(1.0, tl.sqrt_rn(mean + eps))
            normed = _as_rows(a * rstd[:, None], ROUND_A)
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = _as_rows(normed * w[None, :], ROUND_Y)
        y = tl.where(mask, _smoothed(y, S, cols, col_ok, HAS_SMOOTH, ROUND_Q), 0.0)
        if MODE != 2:
            mag = tl.abs(y)
            # NaN kept apart: torch's amax propagates it, tl.max on a GPU drops it
            row_nan = tl.max((mag != mag).to(tl.int32), axis=1) > 0
            row_amax = tl.max(tl.where(mag == mag, mag, 0.0), axis=1)
            scale = _store_row_scales(SCALE, AMAX, rows, row_ok, row_amax, row_nan, qmax, MODE)
        else:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SCALE)
        if MODE != 1:
            tl.store(Q + rows[:, None] * stride_qm + cols[None, :], _codes(y, scale, qmax, FP8), mask=mask)


if HAS_TRITON:

    @triton.jit
    def _glu_quant_tile(A, B, S, rows, row_ok, k0, K, stride_am, stride_bm, ACT: tl.constexpr,
                        HAS_SMOOTH: tl.constexpr, ROUND_A: tl.constexpr, ROUND_Y: tl.constexpr,
                        ROUND_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        """(the smoothed GLU output of columns k0.. of the rows, 0 outside them; its columns; its mask)."""
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        y = _glu_product(A, B, rows, cols, mask, stride_am, stride_bm, ACT, ROUND_A, ROUND_Y)
        return tl.where(mask, _smoothed(y, S, cols, col_ok, HAS_SMOOTH, ROUND_Q), 0.0), cols, mask

    @triton.jit
    def _glu_quant_sweep_kernel(
        A, B, S, Q, SCALE, AMAX,
        M, K,
        stride_am, stride_bm, stride_qm,
        qmax,
        ACT: tl.constexpr, HAS_SMOOTH: tl.constexpr, ROUND_A: tl.constexpr, ROUND_Y: tl.constexpr,
        ROUND_Q: tl.constexpr, FP8: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """glu_quant for long rows, BLOCK_K columns at a time: one sweep for the rows' maxima, a second
        (the same arithmetic again, the rows now in L2) for the codes. MODE as _produce_quant_kernel's.

        Equal to the one-pass kernel bit for bit (each element computed the same way, maxima exact in
        any order), but a program holds BLOCK_M x BLOCK_K values instead of whole rows: llama-3-8b's
        14336-wide GLU rows took 32 warps and the registers of a whole SM a row in the one-pass kernel
        (one program an SM, its loads never overlapping arithmetic: the GLU and norm producers took 5.4 ms
        of W8A8's prefill on an H100, 2026-12-06, against 3.0 ms for the bf16 norm and GLU kernels)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows = rows.to(tl.int64)
        if MODE != 2:
            row_amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            row_nans = tl.zeros([BLOCK_M], dtype=tl.int32)
            for k0 in range(0, K, BLOCK_K):
                y, cols, mask = _glu_quant_tile(A, B, S, rows, row_ok, k0, K, stride_am, stride_bm, ACT, HAS_SMOOTH,
                                                ROUND_A, ROUND_Y, ROUND_Q, BLOCK_K)
                mag = tl.abs(y)
                row_nans = tl.maximum(row_nans, tl.max((mag != mag).to(tl.int32), axis=1))
                row_amax = tl.maximum(row_amax, tl.max(tl.where(mag == mag, mag, 0.0), axis=1))
            row_nan = row_nans > 0
            scale = _store_row_scales(SCALE, AMAX, rows, row_ok, row_amax, row_nan, qmax, MODE)
        else:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SCALE)
        if MODE != 1:
            for k0 in range(0, K, BLOCK_K):
                y, cols, mask = _glu_quant_tile(A, B, S, rows, row_ok, k0, K, stride_am, stride_bm, ACT, HAS_SMOOTH,
                                                ROUND_A, ROUND_Y, ROUND_Q, BLOCK_K)
                tl.store(Q + rows[:, None] * stride_qm + cols[None, :], _codes(y, scale, qmax, FP8), mask=mask)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _kernel_runs(fn: str, first: torch.Tensor, others: list[tuple[str, Optional[torch.Tensor]]], k: int) -> bool:
    """Whether the kernel takes these inputs; else the reference runs (CPU tensors without the
    interpreter, rows longer than MAX_K, dtypes other than fp32 / fp16 / bf16)."""
    for name, t in others:
        if t is not None and t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the input is on {first.device}; "
                             "all inputs must share a device")
    if not HAS_TRITON or (first.device.type != "cuda" and not is_interpreted(_produce_quant_kernel)):
        return False
    return 0 < k <= MAX_K and all(t is None or t.dtype in FLOAT_DTYPES for _, t in [("", first), *others])


def _check_kind(fn: str, kind: str, per_token: bool) -> None:
    if kind not in KINDS:
        raise ValueError(f"{fn}: kind must be one of {KINDS}, got {kind!r}")
    if kind == "int8" and not per_token:
        raise ValueError(f"{fn}: per-tensor scales are FP8's only (W8A8 quantizes its input per token)")


def _check_vector(fn: str, name: str, t: Optional[torch.Tensor], k: int) -> None:
    if t is None:
        return
    check_tensor(fn, name, t, ndim=1)
    if t.shape[0] != k:
        raise ValueError(f"{fn}: {name} must have shape ({k},) to match the rows, got {tuple(t.shape)}")


def _rows(t: torch.Tensor, k: int) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, k)


def _launch(producer: int, a2, b2, w, s, sum2, eps: float, act: int, round_a: torch.dtype, round_y: torch.dtype,
            kind: str, per_token: bool, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel over rows a2 [M, K] (and b2): (codes of `shape`, fp32 scales [M, 1] or [1, 1])."""
    m, k = a2.shape
    fp8 = kind == "fp8"
    q = torch.empty((m, k), dtype=FP8_DTYPE if fp8 else torch.int8, device=a2.device)
    scale = torch.empty((m, 1) if per_token else (1, 1), dtype=torch.float32, device=a2.device)
    if m == 0:
        return q.reshape(shape), scale.fill_(1.0)
    round_q = round_y if s is None else torch.promote_types(round_y, s.dtype)
    if producer == _GLU and k > SWEEP_K:
        return _launch_sweeps(a2, b2, s, act, round_a, round_y, round_q, kind, per_token, shape, q, scale)
    block_k = next_pow2(k)
    block_m = max(1, min(next_pow2(m), TILE // block_k))
    # 16 elements a thread (quantize_rows' choice at 4096): a GLU row of 16384 (gate, up, activation,
    # output live at once) in 32 warps keeps within the 64 registers a thread has at 1024 threads
    warps = min(32, max(4, block_m * block_k // (32 * 16)))
    qmax = FP8_MAX if fp8 else INT8_MAX
    dummy = a2  # stands in for pointers a producer does not read
    common = dict(PRODUCER=producer, ACT=act, HAS_SMOOTH=s is not None, ROUND_A=_ROUNDING[round_a],
                  ROUND_Y=_ROUNDING[round_y], ROUND_Q=_ROUNDING[round_q], FP8=fp8, BLOCK_M=block_m,
                  BLOCK_K=block_k, num_warps=warps, enable_fp_fusion=False)
    args = [a2, b2 if b2 is not None else dummy, w if w is not None else dummy, s if s is not None else dummy,
            sum2 if sum2 is not None else dummy, q.view(torch.uint8) if fp8 else q]
    strides = (m, k, a2.stride(0), b2.stride(0) if b2 is not None else 0, sum2.stride(0) if sum2 is not None else 0, k,
               float(eps), qmax)
    grid = (triton.cdiv(m, block_m),)
    with device_guard(a2.device):
        run_modes(lambda out_scale, amax, mode: _produce_quant_kernel[grid](
            *args, out_scale, amax, *strides, MODE=mode, **common), per_token, scale, m, qmax)
    return q.reshape(shape), scale


def _launch_sweeps(a2, b2, s, act, round_a, round_y, round_q, kind, per_token, shape, q, scale):
    """glu_quant's rows longer than SWEEP_K: _glu_quant_sweep_kernel, one row a program."""
    m, k = a2.shape
    fp8 = kind == "fp8"
    common = dict(ACT=act, HAS_SMOOTH=s is not None, ROUND_A=_ROUNDING[round_a], ROUND_Y=_ROUNDING[round_y],
                  ROUND_Q=_ROUNDING[round_q], FP8=fp8, BLOCK_M=1, BLOCK_K=SWEEP_BLOCK_K, num_warps=4,
                  enable_fp_fusion=False)
    args = [a2, b2, s if s is not None else a2, q.view(torch.uint8) if fp8 else q]
    qmax = FP8_MAX if fp8 else INT8_MAX
    sizes = (m, k, a2.stride(0), b2.stride(0), k, qmax)
    with device_guard(a2.device):
        run_modes(lambda out_scale, amax, mode: _glu_quant_sweep_kernel[(m,)](
            *args, out_scale, amax, *sizes, MODE=mode, **common), per_token, scale, m, qmax)
    return q.reshape(shape), scale


def _check_norm(fn: str, x, weight, eps, input_scale, kind, per_token) -> int:
    _check_kind(fn, kind, per_token)
    check_tensor(fn, "x", x, min_ndim=1, dtypes=None)
    k = x.shape[-1]
    _check_vector(fn, "weight", weight, k)
    _check_vector(fn, "input_scale", input_scale, k)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{fn}: eps must be a non-negative float, got {eps!r}")
    return k


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, input_scale: Optional[torch.Tensor],
                   kind: str, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """flashc.rms_norm_quant in one kernel: (int8 or e4m3 codes of x's shape, fp32 scales [M, 1] or [1, 1])."""
    fn = "rms_norm_quant"
    k = _check_norm(fn, x, weight, eps, input_scale, kind, per_token)
    if not _kernel_runs(fn, x, [("weight", weight), ("input_scale", input_scale)], k):
        return reference_rms_norm_quant(x, weight, eps, input_scale, kind, per_token)
    y_dtype = torch.promote_types(x.dtype, weight.dtype)
    return _launch(_RMS_NORM, _rows(x, k), None, weight.contiguous(), _contiguous(input_scale), None, eps, 0,
                   x.dtype, y_dtype, kind, per_token, x.shape)


def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       input_scale: Optional[torch.Tensor], kind: str,
                       per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flashc.add_rms_norm_quant in one kernel: (sum x + residual, codes, fp32 scales)."""
    fn = "add_rms_norm_quant"
    k = _check_norm(fn, x, weight, eps, input_scale, kind, per_token)
    check_tensor(fn, "residual", residual, dtypes=None)
    if residual.shape != x.shape:
        raise ValueError(f"{fn}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    others = [("residual", residual), ("weight", weight), ("input_scale", input_scale)]
    if not _kernel_runs(fn, x, others, k) or residual.dtype != x.dtype:
        return reference_add_rms_norm_quant(x, residual, weight, eps, input_scale, kind, per_token)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y_dtype = torch.promote_types(x.dtype, weight.dtype)
    codes, scales = _launch(_ADD_RMS_NORM, _rows(x, k), _rows(residual, k), weight.contiguous(),
                            _contiguous(input_scale), total.view(-1, k), eps, 0, x.dtype, y_dtype, kind, per_token,
                            x.shape)
    return total, codes, scales


def glu_quant(gate: torch.Tensor, up: torch.Tensor, act: str, input_scale: Optional[torch.Tensor], kind: str,
              per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """flashc.glu_quant in one kernel: gate and up read with their row strides (the halves of a merged
    gate|up projection go in as they are), (codes [..., F], fp32 scales) written."""
    fn = "glu_quant"
    _check_kind(fn, kind, per_token)
    if act not in ACTS:
        raise ValueError(f"{fn}: act must be one of {ACTS}, got {act!r}")
    check_tensor(fn, "gate", gate, min_ndim=1, dtypes=None)
    check_tensor(fn, "up", up, min_ndim=1, dtypes=None)
    k = gate.shape[-1]
    _check_vector(fn, "input_scale", input_scale, k)
    if (not _kernel_runs(fn, gate, [("up", up), ("input_scale", input_scale)], k) or act not in _ACT_CODES
            or gate.shape != up.shape or gate.dtype != up.dtype):
        return reference_glu_quant(gate, up, act, input_scale, kind, per_token)
    return _launch(_GLU, _rows(gate, k), _rows(up, k), None, _contiguous(input_scale), None, 0.0, _ACT_CODES[act],
                   gate.dtype, gate.dtype, kind, per_token, gate.shape)


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


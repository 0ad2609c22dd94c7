"""W8A8 and FP8 linears on tensor cores: the input quantized per token, then one library GEMM.

`flashc.linear_w8a8` runs as `torch._int_mm` (cuBLASLt int8 x int8 -> int32) and
`flashc.linear_fp8` as `torch._scaled_mm` (fp8 x fp8 with the scales applied in the GEMM's
epilogue where the layout allows). Both libraries want the weight column-major, which is
the op's [N, K] row-major weight read transposed: no copy. Their shape rules (cuBLASLt:
int8 needs more than 16 rows; fp8 needs rows and inner size multiples of 16) are met by
padding the rows with zeros, which quantize to zeros and are dropped after.

Semantics are the ops' (flashc/quantized_ops.py): the int8 product is exact, so this path
equals the reference up to the fp32 epilogue's rounding; the fp8 product is summed in
fp32 in another order than the reference's. Shapes the libraries cannot take (inner or
output size not a multiple of 16) run the reference, which computes the same numbers.

On CUDA the per-token quantization of the input and the int32 (or fp32) epilogue run as one
Triton kernel each (codegen/quantize_rows.py, equal to the references bit for bit) instead of
a PyTorch kernel per elementwise step (in a kernel profile of bench/decode.py's W8A8 prefill on an
H100 those steps took longer than the int8 GEMM). Elsewhere, and for dtypes the kernels do not
take, the references run. From `int8_matmul.MIN_ROWS` rows (prefill) the W8A8 product runs what
tuning measured fastest for the shape (codegen/int8_matmul.py): a Triton int8 GEMM with the
epilogue fused, or the library GEMM and the epilogue kernel; both equal the reference bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from flashc.ops import moe_routing
from flashc.quantized_input_ops import linear_fp8_q as reference_fp8_q, linear_w8a8_q as reference_w8a8_q
from flashc.quantized_ops import (
    _at, _finish, _rows, linear_fp8 as reference_fp8, linear_w8a8 as reference_w8a8, quantize_rows_fp8,
    quantize_rows_int8,
)

from . import int8_matmul as int8
from ._triton_common import FLOAT_DTYPES, HAS_TRITON
from .quantize_rows import dequantize_int32, quantize_rows

__all__ = ["linear_w8a8", "linear_w8a8_q", "tune_linear_w8a8", "linear_fp8", "linear_fp8_q", "moe_a8", "fits"]

ALIGN = 16  # rows, inner and output sizes the fp8 GEMM takes; int8 also needs more than 16 rows


def fits(k: int, n: int) -> bool:
    """Whether the library GEMMs take a [*, k] x [k, n] product (else the reference runs)."""
    return k % ALIGN == 0 and n % ALIGN == 0


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else F.pad(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                                              (0, 0, 0, rows - t.shape[0])).view(t.dtype)


def _fused(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the fused kernels of codegen/quantize_rows.py run: CUDA tensors of fp32, fp16 or bf16."""
    present = [t for t in tensors if t is not None]
    return HAS_TRITON and present[0].is_cuda and all(t.dtype in FLOAT_DTYPES for t in present)


def _quantized_input(x: torch.Tensor, input_scale: Optional[torch.Tensor], kind: str,
                     per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (times the smoothing input_scale) -> (codes [M, K], fp32 scales), as the ops quantize it."""
    if _fused(x, input_scale):
        return quantize_rows(x.reshape(-1, x.shape[-1]), kind, input_scale, per_token)
    rows = _rows(x, input_scale)
    return quantize_rows_int8(rows) if kind == "int8" else quantize_rows_fp8(rows, per_token)


def _dequantized(acc: torch.Tensor, x_scale: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
                 x: torch.Tensor) -> torch.Tensor:
    """The ops' epilogue (`_finish`) of an [M, N] int32 or fp32 accumulator, shaped as x's rows (x: the
    unquantized input, or a stand-in of its shape and dtype)."""
    if _fused(x, w_scales, bias):
        return dequantize_int32(acc, x_scale, w_scales, bias, x.dtype).reshape(*x.shape[:-1], -1)
    return _finish(acc.float(), x_scale, w_scales, bias, x)


def _int8_fused(x: torch.Tensor, m: int, w_scales: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the product goes to codegen/int8_matmul.py (its tuned choice: the fused GEMM or the
    library path): prefill-sized inputs the fused kernels take. Decode-sized ones stay on the library."""
    return m >= int8.MIN_ROWS and _fused(x, w_scales, bias)


def _like_input(codes: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """A stand-in for a pre-quantized linear's unquantized input: its shape, dtype and device, no data."""
    return torch.empty((), dtype=out_dtype, device=codes.device).expand(codes.shape)


def _w8a8_product(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                  bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """int8 codes [M, K] and their row scales times the int8 weight, through linear_w8a8's epilogue,
    shaped and typed as x's rows (x only gives the shape, dtype and device)."""
    n = qweight.shape[0]
    if _int8_fused(x, xq.shape[0], w_scales, bias):
        return int8.int8_matmul(xq, qweight, x_scale, w_scales, bias, x.dtype).reshape(*x.shape[:-1], n)
    acc = int8.int_mm(xq, qweight)  # cuBLASLt: rows padded to more than 16, a multiple of 8
    return _dequantized(acc, x_scale, w_scales, bias, x)


def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
                input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    n, k = qweight.shape
    if not fits(k, n):
        return reference_w8a8(x, qweight, w_scales, bias, input_scale)
    xq, x_scale = _quantized_input(x, input_scale, "int8")
    return _w8a8_product(xq, x_scale, qweight, w_scales, bias, x)


def linear_w8a8_q(codes: torch.Tensor, row_scales: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                  bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """flashc.linear_w8a8_q: linear_w8a8's product on codes a producer quantized (codegen/norm_quant.py)."""
    n, k = qweight.shape
    if not fits(k, n):
        return reference_w8a8_q(codes, row_scales, qweight, w_scales, bias, out_dtype)
    return _w8a8_product(codes.reshape(-1, k), row_scales, qweight, w_scales, bias, _like_input(codes, out_dtype))


def tune_linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
                     input_scale: Optional[torch.Tensor]) -> Optional[dict]:
    """The CUDA backend's tuning step for flashc.linear_w8a8 (before any CUDA graph is captured):
    on inputs `linear_w8a8` sends to codegen/int8_matmul.py, measure its tiles against the library
    path on these inputs' codes and cache the fastest. Returns that choice, or None where the
    shape takes no tuned path (decode-sized inputs, the reference's shapes)."""
    n, k = qweight.shape
    if not fits(k, n):
        return None
    xq, x_scale = _quantized_input(x, input_scale, "int8")
    if not _int8_fused(x, xq.shape[0], w_scales, bias):
        return None
    return int8.tune_int8_matmul(xq, qweight, x_scale, w_scales, bias, x.dtype)


def tune_linear_w8a8_q(codes: torch.Tensor, row_scales: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                       bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> Optional[dict]:
    """tune_linear_w8a8 for flashc.linear_w8a8_q (codes a norm or GLU quantized): the same product,
    so the same tuned choice per shape; None where linear_w8a8_q takes no tuned path."""
    n, k = qweight.shape
    if not fits(k, n):
        return None
    rows = codes.reshape(-1, k)
    if not _int8_fused(_like_input(codes, out_dtype), rows.shape[0], w_scales, bias):
        return None
    return int8.tune_int8_matmul(rows, qweight, row_scales, w_scales, bias, out_dtype)


def linear_fp8(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
               input_scale: Optional[torch.Tensor], per_token: bool) -> torch.Tensor:
    n, k = qweight.shape
    if not fits(k, n):
        return reference_fp8(x, qweight, w_scales, bias, input_scale, per_token)
    xq, x_scale = _quantized_input(x, input_scale, "fp8", per_token)
    return _fp8_product(xq, x_scale, qweight, w_scales, bias, x, per_token)


def linear_fp8_q(codes: torch.Tensor, row_scales: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                 bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """flashc.linear_fp8_q: linear_fp8's product on codes a producer quantized (codegen/norm_quant.py)."""
    n, k = qweight.shape
    if not fits(k, n):
        return reference_fp8_q(codes, row_scales, qweight, w_scales, bias, out_dtype)
    rows = codes.reshape(-1, k)
    per_token = row_scales.numel() == rows.shape[0]  # one row: per token and per tensor read the same
    return _fp8_product(rows, row_scales, qweight, w_scales, bias, _like_input(codes, out_dtype), per_token)


def _fp8_product(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                 bias: Optional[torch.Tensor], x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """e4m3 codes [M, K] and their scales ([M, 1] per token, [1, 1] per tensor) times the e4m3 weight,
    through linear_fp8's epilogue, shaped and typed as x's rows (x only gives shape, dtype, device)."""
    n = qweight.shape[0]
    m = xq.shape[0]
    padded = m + (-m) % ALIGN
    xq = _pad_rows(xq, padded)
    row_wise = per_token and w_scales.numel() == n
    if x.dtype == torch.bfloat16 and row_wise:  # scales in the GEMM's epilogue (row-wise needs a bf16 output)
        y = torch._scaled_mm(xq, qweight.t(), scale_a=_pad_rows(x_scale, padded).contiguous(),
                             scale_b=w_scales.float().reshape(1, n).contiguous(), out_dtype=torch.bfloat16)[:m]
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], n)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    acc = torch._scaled_mm(xq, qweight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)[:m]
    return _dequantized(acc, x_scale, w_scales, bias, x)


def moe_a8(x, router_logits, gate_up_qweight, gate_up_scales, gate_up_input_scale, down_qweight, down_scales,
           down_input_scale, top_k: int, normalize: bool, fp8: bool, per_token: bool) -> torch.Tensor:
    """flashc.moe_a8 without a host synchronisation (CUDA graphs capture it): every expert runs
    over every token and its output is kept where the router chose it, weighted as routed.

    This costs E / top_k times the routed work (4x for Mixtral's 2 of 8): a correct path for
    the W8A8 / FP8 experts, not a fast one; a routed kernel is what would make it pay.
    Per-token quantization makes each row's result independent of the others, so running
    unrouted rows changes nothing in the rows kept.
    """
    weights, experts = moe_routing(router_logits, top_k, normalize, x.dtype)
    n_experts, f = gate_up_qweight.shape[0], down_qweight.shape[-1]
    routed = torch.zeros(x.shape[0], n_experts, dtype=x.dtype, device=x.device).scatter_add_(1, experts, weights)
    chosen = torch.zeros(x.shape[0], n_experts, dtype=torch.bool, device=x.device).scatter_(1, experts, True)
    linear = linear_fp8 if fp8 else linear_w8a8
    extra = (per_token,) if fp8 else ()
    out = torch.zeros_like(x)
    for e in range(n_experts):
        gu = linear(x, gate_up_qweight[e], gate_up_scales[e], None, _at(gate_up_input_scale, e), *extra)
        h = F.silu(gu[:, :f]) * gu[:, f:]
        y = linear(h, down_qweight[e], down_scales[e], None, _at(down_input_scale, e), *extra)
        # where, not a product: an unrouted row's output may be inf, and 0 * inf is NaN
        out += torch.where(chosen[:, e:e + 1], y * routed[:, e:e + 1], torch.zeros((), dtype=x.dtype, device=x.device))
    return out

"""W8A8 / FP8 linears whose input is quantized by the op that produces it.

`flashc.linear_w8a8` and `flashc.linear_fp8` (flashc/quantized_ops.py) quantize their input
per token on every call: a pass that reads the bf16 rows a norm or a gated activation has just
written and writes them again as 1-byte codes and a scale per row. In a kernel profile of
llama-3-8b's FP8 prefill (2048 tokens, H100; flashc issue #14) that pass took 4.76 ms of
40.6 ms. Every quantized linear's input but o_proj's comes from an RMSNorm or a GLU, which
holds the row anyway: the ops here let it write the codes and the scales instead of the row.

* `flashc.rms_norm_quant`, `flashc.add_rms_norm_quant`, `flashc.glu_quant`: the producer, then
  the linears' input quantization, returning (codes, row scales) (and the residual sum).
* `flashc.linear_w8a8_q`, `flashc.linear_fp8_q`: the linears on those codes and scales.

Each reference is the unfused ops' own arithmetic, so `linear_*_q(*producer_quant(...))`
equals `linear_*(producer(...))` bit for bit. Codes keep the producer's shape [..., K]
(int8, or float8_e4m3fn); scales are fp32 [M, 1] (per token, M rows) or [1, 1] (per tensor,
FP8 only), as `quantize_rows_int8` / `quantize_rows_fp8` return them. The CUDA backend's
late pass `FuseQuantizedInputs` (backends/cuda_rewrites.py) writes these ops.
"""

from __future__ import annotations

from typing import Optional

import torch

from flashc.errors import FlashcError
from flashc.ops import add_rms_norm, geglu, rms_norm, swiglu
from flashc.quantized_ops import FP8_DTYPE, _finish, _rows, quantize_rows_fp8, quantize_rows_int8

KINDS = ("int8", "fp8")  # int8: SmoothQuant's W8A8 (per token only); fp8: e4m3, per token or per tensor
ACTS = ("silu", "gelu_tanh", "gelu")  # swiglu, geglu(approximate="tanh"), geglu(approximate="none")


def _check(op: str, kind: str, per_token: bool) -> None:
    if kind not in KINDS:
        raise FlashcError(f"flashc.{op}: kind must be one of {KINDS}, got {kind!r}")
    if kind == "int8" and not per_token:
        raise FlashcError(f"flashc.{op}: int8 inputs are quantized per token (per_token=True); "
                          "per-tensor scales are FP8's only")


def quantize_input(y: torch.Tensor, input_scale: Optional[torch.Tensor], kind: str,
                   per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What linear_w8a8 (kind "int8") or linear_fp8 ("fp8") does to its input y [..., K]:
    (codes of y's shape, fp32 scales [M, 1] or [1, 1])."""
    rows = _rows(y, input_scale)
    codes, scales = quantize_rows_int8(rows) if kind == "int8" else quantize_rows_fp8(rows, per_token)
    return codes.reshape(y.shape), scales


def _fake_codes(y_shape, device, kind: str, per_token: bool):
    rows = 1
    for d in y_shape[:-1]:
        rows *= d
    codes = torch.empty(y_shape, dtype=torch.int8 if kind == "int8" else FP8_DTYPE, device=device)
    return codes, torch.empty((rows, 1) if per_token else (1, 1), dtype=torch.float32, device=device)


@torch.library.custom_op("flashc::rms_norm_quant", mutates_args=())
def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, input_scale: Optional[torch.Tensor],
                   kind: str, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """flashc.rms_norm(x, weight, eps), quantized as a W8A8 (kind "int8") or FP8 linear quantizes its
    input (times input_scale, SmoothQuant's 1/s, or None): (codes [..., K], fp32 row scales)."""
    _check("rms_norm_quant", kind, per_token)
    return quantize_input(rms_norm(x, weight, eps), input_scale, kind, per_token)


@rms_norm_quant.register_fake
def _(x, weight, eps, input_scale, kind, per_token):
    return _fake_codes(x.shape, x.device, kind, per_token)


@torch.library.custom_op("flashc::add_rms_norm_quant", mutates_args=())
def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       input_scale: Optional[torch.Tensor], kind: str,
                       per_token: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flashc.add_rms_norm with its normed output quantized as rms_norm_quant's: (sum, codes, row
    scales); the sum x + residual is the next residual stream, written as add_rms_norm writes it."""
    _check("add_rms_norm_quant", kind, per_token)
    normed, s = add_rms_norm(x, residual, weight, eps)
    return (s, *quantize_input(normed, input_scale, kind, per_token))


@add_rms_norm_quant.register_fake
def _(x, residual, weight, eps, input_scale, kind, per_token):
    s = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    return (s, *_fake_codes(x.shape, x.device, kind, per_token))


def glu(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """The gated activation act of ACTS, as the graph calls it (flashc.swiglu / flashc.geglu)."""
    if act == "silu":
        return swiglu(gate, up)
    if act in ("gelu_tanh", "gelu"):
        return geglu(gate, up, "tanh" if act == "gelu_tanh" else "none")
    raise FlashcError(f"flashc.glu_quant: act must be one of {ACTS}, got {act!r}")


@torch.library.custom_op("flashc::glu_quant", mutates_args=())
def glu_quant(gate: torch.Tensor, up: torch.Tensor, act: str, input_scale: Optional[torch.Tensor], kind: str,
              per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """act(gate) * up (flashc.swiglu, or flashc.geglu with approximate "tanh" / "none"), quantized as
    rms_norm_quant quantizes: the input of a quantized down_proj. gate and up are usually the two
    halves of a merged gate|up projection's output (slices, read in place)."""
    _check("glu_quant", kind, per_token)
    return quantize_input(glu(gate, up, act), input_scale, kind, per_token)


@glu_quant.register_fake
def _(gate, up, act, input_scale, kind, per_token):
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    return _fake_codes(shape, gate.device, kind, per_token)


def _out_rows(codes: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """A shape-and-dtype stand-in for the unquantized input: `_finish` reads only those."""
    return torch.empty(codes.shape, dtype=out_dtype, device="meta")


def _check_codes(op: str, codes: torch.Tensor, row_scales: torch.Tensor, dtype: torch.dtype) -> None:
    if codes.dtype != dtype:
        raise FlashcError(f"flashc.{op}: codes must be {dtype}, got {codes.dtype}")
    rows = codes.numel() // max(1, codes.shape[-1])
    if row_scales.dtype != torch.float32 or row_scales.numel() not in (rows, 1):
        raise FlashcError(f"flashc.{op}: row_scales must be fp32 with one scale per row of codes ({rows}) "
                          f"or one in all, got {row_scales.dtype} {tuple(row_scales.shape)}")


@torch.library.custom_op("flashc::linear_w8a8_q", mutates_args=())
def linear_w8a8_q(codes: torch.Tensor, row_scales: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                  bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """flashc.linear_w8a8 on an input already quantized (int8 codes [..., K], fp32 row scales [M, 1]):
    the exact integer product, then linear_w8a8's fp32 epilogue, in out_dtype (the input's dtype)."""
    _check_codes("linear_w8a8_q", codes, row_scales, torch.int8)
    rows = codes.reshape(-1, codes.shape[-1])
    acc = (rows.double() @ qweight.double().t()).float()  # exact: integers far below 2**53
    return _finish(acc, row_scales, w_scales, bias, _out_rows(codes, out_dtype))


@linear_w8a8_q.register_fake
def _(codes, row_scales, qweight, w_scales, bias, out_dtype):
    return codes.new_empty((*codes.shape[:-1], qweight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("flashc::linear_fp8_q", mutates_args=())
def linear_fp8_q(codes: torch.Tensor, row_scales: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                 bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """flashc.linear_fp8 on an input already quantized (e4m3 codes [..., K], fp32 scales [M, 1] per token
    or [1, 1] per tensor): fp8 products summed in fp32, linear_fp8's epilogue, in out_dtype."""
    _check_codes("linear_fp8_q", codes, row_scales, FP8_DTYPE)
    rows = codes.reshape(-1, codes.shape[-1])
    acc = rows.float() @ qweight.float().t()
    return _finish(acc, row_scales, w_scales, bias, _out_rows(codes, out_dtype))


@linear_fp8_q.register_fake
def _(codes, row_scales, qweight, w_scales, bias, out_dtype):
    return codes.new_empty((*codes.shape[:-1], qweight.shape[0]), dtype=out_dtype)


QUANTIZED_INPUT_OPS = {
    "rms_norm_quant": torch.ops.flashc.rms_norm_quant.default,
    "add_rms_norm_quant": torch.ops.flashc.add_rms_norm_quant.default,
    "glu_quant": torch.ops.flashc.glu_quant.default,
    "linear_w8a8_q": torch.ops.flashc.linear_w8a8_q.default,
    "linear_fp8_q": torch.ops.flashc.linear_fp8_q.default,
}

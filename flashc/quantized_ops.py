"""Quantized ops: weight-only (int4/int8, packed) and weight-and-activation (W8A8, FP8).

`flashc.linear_wq` is a linear layer whose weight is stored as 2-, 3-, 4- or 8-bit codes with a
scale (and optionally a zero point) per group of `group_size` input columns;
`flashc.moe_wq` is `flashc.moe` with its stacked expert weights stored the same way, and
`flashc.moe_wq_mixed` the same with a width per expert (a list of tensors, one an expert).
Both reference implementations dequantize and then compute in x's dtype: the numeric
truth for the kernels that later read the packed bytes directly.

The layout is ONNX Runtime's `com.microsoft.MatMulNBits` (see its contrib-op docs), so a
later ONNX lowering emits one node with these tensors as initializers, unchanged. For a
weight W[N, K] split along K into n_blocks = K / group_size blocks:

* codes q[n, k] in 0 .. 2**bits - 1, W[n, k] = (q[n, k] - zp[n, blk]) * scale[n, blk]
  with blk = k // group_size;
* `qweight`: uint8 [N, n_blocks, group_size * bits / 8]; below 8 bits each block is a
  little-endian bitstream, code i of the block in bits bits*i .. bits*i + bits - 1 (at 4
  bits the even k in the low nibble; at 2 bits k = 4j in bits 0-1, ..., 4j + 3 in bits
  6-7; at 3 bits eight codes in three bytes, codes 2 and 5 of each eight straddling a
  byte boundary, so group_size is a multiple of 8); at 8 bits one code a byte;
* `scales`: [N, n_blocks] in the activation dtype (MatMulNBits reads them flat);
* `zero_points`: uint8, below 8 bits [N, ceil(n_blocks * bits / 8)] packed like the codes
  (one bitstream a row: at 4 bits the even block in the low nibble, at 3 bits block j at
  bit 3j), at 8 bits [N, n_blocks]; None means the midpoint 2**(bits - 1), i.e. a
  symmetric grid.

ONNX Runtime 1.32's CPU MatMulNBits takes 2, 4 and 8 bits only (its kernel refuses
others); its schema sizes a block at block_size * bits / 8 bytes for any width, which the
3-bit bitstream fills, but the ONNX lowering dequantizes 3-bit weights with standard ops.

Stacked MoE experts carry one more leading dimension [E, ...] on every tensor. K must
be a multiple of group_size here (a layer that does not fit is left in float by the
quantization pass); per-channel quantization is group_size = K.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from flashc.ops import routed_experts

SUPPORTED_BITS = (2, 3, 4, 8)


def default_zero_point(bits: int) -> int:
    """The zero point a symmetric grid implies (MatMulNBits' default when none is given)."""
    return 1 << (bits - 1)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"packed weights have {', '.join(map(str, SUPPORTED_BITS[:-1]))} or {SUPPORTED_BITS[-1]} "
                         f"bits, got {bits}")


def pack_subbyte(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., C] below 2**bits (bits 2, 3 or 4) -> [..., ceil(C * bits / 8)] bytes: a little-endian
    bitstream, element i in bits bits*i .. bits*i + bits - 1 (MatMulNBits' order at 2 and 4 bits)."""
    if values.dtype != torch.uint8:
        raise ValueError(f"{bits}-bit values must be uint8, got {values.dtype}")
    if 8 % bits:
        return _pack_bitstream(values, bits)
    per_byte = 8 // bits
    if values.shape[-1] % per_byte:
        values = F.pad(values, (0, per_byte - values.shape[-1] % per_byte))
    groups = values.reshape(*values.shape[:-1], -1, per_byte)
    packed = groups[..., 0].clone()
    for i in range(1, per_byte):
        packed |= groups[..., i] << (i * bits)
    return packed


def unpack_subbyte(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_subbyte: [..., B] bytes -> [..., floor(B * 8 / bits)] values."""
    if 8 % bits:
        return _unpack_bitstream(packed, bits)
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(8 // bits)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)


def _pack_bitstream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_subbyte for a width that does not divide 8: eight values at a time make `bits` whole
    bytes (an int32 of 8 * bits <= 32 bits, split into its little-endian bytes)."""
    c = values.shape[-1]
    if c % 8:
        values = F.pad(values, (0, 8 - c % 8))
    eights = values.reshape(*values.shape[:-1], -1, 8).to(torch.int32)
    word = eights[..., 0].clone()
    for i in range(1, 8):
        word |= eights[..., i] << (i * bits)
    packed = torch.stack([(word >> (8 * j)) & 0xFF for j in range(bits)], dim=-1).to(torch.uint8)
    return packed.reshape(*values.shape[:-1], -1)[..., :-(-c * bits // 8)]


def _unpack_bitstream(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of _pack_bitstream: [..., B] bytes -> [..., floor(B * 8 / bits)] values."""
    b = packed.shape[-1]
    if b % bits:
        packed = F.pad(packed, (0, bits - b % bits))
    chunks = packed.reshape(*packed.shape[:-1], -1, bits).to(torch.int32)
    word = chunks[..., 0].clone()
    for j in range(1, bits):
        word |= chunks[..., j] << (8 * j)
    mask = (1 << bits) - 1
    values = torch.stack([(word >> (i * bits)) & mask for i in range(8)], dim=-1).to(torch.uint8)
    return values.reshape(*packed.shape[:-1], -1)[..., :b * 8 // bits]


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C] in 0..15 -> [..., ceil(C / 2)] bytes: element 2j in the low nibble, 2j+1 high."""
    return pack_subbyte(values, 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_nibbles: [..., B] bytes -> [..., 2B] values."""
    return unpack_subbyte(packed, 4)


def pack_codes(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes uint8 [..., N, K] -> qweight uint8 [..., N, K / group_size, group_size * bits / 8]."""
    _check_bits(bits)
    *lead, n, k = codes.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    if group_size * bits % 8:
        raise ValueError(f"a group of {group_size} {bits}-bit codes is not a whole number of bytes")
    has_values = codes.numel() and codes.device.type != "meta"  # a shape-only model has none to check
    if codes.dtype != torch.uint8 or (has_values and int(codes.max()) >= 1 << bits):
        raise ValueError(f"{bits}-bit codes must be uint8 below {1 << bits}")
    blocks = codes.reshape(*lead, n, k // group_size, group_size)
    return blocks.contiguous() if bits == 8 else pack_subbyte(blocks, bits)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight [..., N, n_blocks, bytes] -> codes uint8 [..., N, K]."""
    _check_bits(bits)
    codes = qweight if bits == 8 else unpack_subbyte(qweight, bits)
    return codes.reshape(*qweight.shape[:-2], -1)


def pack_zero_points(zero_points: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points uint8 [..., N, n_blocks] -> the stored form (a bitstream a row below 8 bits)."""
    _check_bits(bits)
    if zero_points.dtype != torch.uint8:
        raise ValueError(f"zero points must be uint8, got {zero_points.dtype}")
    return zero_points.contiguous() if bits == 8 else pack_subbyte(zero_points, bits)


def unpack_zero_points(stored: torch.Tensor, bits: int, n_blocks: int) -> torch.Tensor:
    """The stored zero points -> uint8 [..., N, n_blocks]."""
    return stored if bits == 8 else unpack_subbyte(stored, bits)[..., :n_blocks]


def packed_zero_point_columns(n_blocks: int, bits: int) -> int:
    """Bytes per row of stored zero points for n_blocks groups."""
    return n_blocks if bits == 8 else -(-n_blocks * bits // 8)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
               bits: int) -> torch.Tensor:
    """The float32 weight [..., N, K] that packed codes, scales and zero points stand for."""
    codes = unpack_codes(qweight, bits)
    n_blocks, group = qweight.shape[-2], codes.shape[-1] // qweight.shape[-2]
    if zero_points is None:
        zp = torch.full(scales.shape, default_zero_point(bits), dtype=torch.float32, device=scales.device)
    else:
        zp = unpack_zero_points(zero_points, bits, n_blocks).float()
    blocks = codes.reshape(*codes.shape[:-1], n_blocks, group).float()
    w = (blocks - zp.unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(codes.shape)


@torch.library.custom_op("flashc::linear_wq", mutates_args=())
def linear_wq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    input_scale: Optional[torch.Tensor],
    bits: int,
) -> torch.Tensor:
    """y = (x * input_scale) @ dequantize(qweight, scales, zero_points)^T + bias.

    x[..., K]; qweight/scales/zero_points a [N, K] weight in the layout of this module;
    input_scale [K] (or None) is AWQ's per-input-channel 1/s, whose s was folded into the
    weight before rounding. The product is computed in x's dtype.
    """
    w = dequantize(qweight, scales, zero_points, bits).to(x.dtype)
    if input_scale is not None:
        x = x * input_scale
    return F.linear(x, w, bias)


@linear_wq.register_fake
def _(x, qweight, scales, zero_points, bias, input_scale, bits):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("flashc::moe_wq", mutates_args=())
def moe_wq(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up_qweight: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_zero_points: Optional[torch.Tensor],
    gate_up_input_scale: Optional[torch.Tensor],
    down_qweight: torch.Tensor,
    down_scales: torch.Tensor,
    down_zero_points: Optional[torch.Tensor],
    down_input_scale: Optional[torch.Tensor],
    top_k: int,
    normalize: bool,
    bits: int,
) -> torch.Tensor:
    """flashc.moe with quantized experts: gate_up [E, 2F, H] and down [E, H, F] stored packed
    (leading expert dimension on every tensor), input scales [E, H] / [E, F] or None.

    Routing is flashc.moe's; each expert's weights are dequantized to x's dtype and only
    the routed (token, expert) pairs are computed.
    """
    f = down_qweight.shape[-2] * (down_qweight.shape[-1] * 8 // bits)

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up = dequantize(gate_up_qweight[e], gate_up_scales[e], _at(gate_up_zero_points, e), bits).to(x.dtype)
        down = dequantize(down_qweight[e], down_scales[e], _at(down_zero_points, e), bits).to(x.dtype)
        xe = rows if gate_up_input_scale is None else rows * gate_up_input_scale[e]
        gu = xe @ gate_up.t()
        h = F.silu(gu[:, :f]) * gu[:, f:]
        if down_input_scale is not None:
            h = h * down_input_scale[e]
        return h @ down.t()

    return routed_experts(x, router_logits, gate_up_qweight.shape[0], top_k, normalize, expert)


def _at(t: Optional[torch.Tensor], e: int) -> Optional[torch.Tensor]:
    return None if t is None else t[e]


@moe_wq.register_fake
def _(x, router_logits, gate_up_qweight, gate_up_scales, gate_up_zero_points, gate_up_input_scale,
      down_qweight, down_scales, down_zero_points, down_input_scale, top_k, normalize, bits):
    return torch.empty_like(x)


@torch.library.custom_op("flashc::moe_wq_mixed", mutates_args=())
def moe_wq_mixed(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up_qweights: list[torch.Tensor],
    gate_up_scales: list[torch.Tensor],
    gate_up_zero_points: list[Optional[torch.Tensor]],
    down_qweights: list[torch.Tensor],
    down_scales: list[torch.Tensor],
    down_zero_points: list[Optional[torch.Tensor]],
    top_k: int,
    normalize: bool,
    bits: list[int],
) -> torch.Tensor:
    """flashc.moe_wq with a bit width per expert (a mixed-precision budget, passes/quantize/mixed.py):
    expert e's gate_up [2F, H] and down [H, F] packed at bits[e], one tensor a list entry each
    (the layout of this module; a zero point entry None: symmetric; no input scales). Routing is flashc.moe's."""
    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up = dequantize(gate_up_qweights[e], gate_up_scales[e], _at(gate_up_zero_points, e), bits[e])
        down = dequantize(down_qweights[e], down_scales[e], _at(down_zero_points, e), bits[e])
        gu = rows @ gate_up.to(x.dtype).t()
        f = gu.shape[-1] // 2
        return (F.silu(gu[:, :f]) * gu[:, f:]) @ down.to(x.dtype).t()

    return routed_experts(x, router_logits, len(gate_up_qweights), top_k, normalize, expert)


@moe_wq_mixed.register_fake
def _(x, router_logits, gate_up_qweights, gate_up_scales, gate_up_zero_points, down_qweights, down_scales,
      down_zero_points, top_k, normalize, bits):
    return torch.empty_like(x)


@torch.library.custom_op("flashc::gemv_wq", mutates_args=())
def gemv_wq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    bias: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor],
    eps: float,
    residual: Optional[torch.Tensor],
    glu: Optional[str],
    scales: torch.Tensor,
    zero_points: Optional[torch.Tensor],
    input_scale: Optional[torch.Tensor],
    bits: int,
) -> torch.Tensor:
    """`flashc.gemv` with a packed weight: a decode-sized `linear_wq` with what folds into it.

    The first seven arguments are `flashc.gemv`'s (the CUDA backend's late pass folds norms,
    activations and residuals into either op the same way); the packed weight's scales,
    zero points, AWQ input scale and bit width follow. RMSNorm of x (norm_weight), then the
    input scale, the product with the dequantized weight plus bias, then either a gated
    activation ('silu' or 'gelu_tanh') of the two halves of the output or the residual add.
    """
    from flashc.ops import gemv_epilogue, rms_norm

    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    return gemv_epilogue(linear_wq(x, qweight, scales, zero_points, bias, input_scale, bits), glu, residual)


@gemv_wq.register_fake
def _(x, qweight, bias, norm_weight, eps, residual, glu, scales, zero_points, input_scale, bits):
    dtype = torch.promote_types(x.dtype, norm_weight.dtype) if norm_weight is not None else x.dtype
    n = qweight.shape[0] // 2 if glu is not None else qweight.shape[0]
    if residual is not None:
        dtype = torch.promote_types(dtype, residual.dtype)
    return torch.empty(*x.shape[:-1], n, dtype=dtype, device=x.device)


# --------------------------------------------------------------------- weights and activations
# W8A8 (SmoothQuant) and FP8: the weight is stored quantized per output row (or per tensor),
# and each call quantizes its input per token (a scale per row of x, from that row's largest
# magnitude), so the product runs on int8 or fp8 tensor cores. The references below are the
# numeric truth: the int8 product is exact (integers in float64), the fp8 product is an fp32
# sum of exactly representable fp8 values; kernels differ from them only in summation order.

INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def row_scales(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """One scale per row of x [M, K] (fp32 [M, 1]): the row's largest magnitude over qmax; a
    row of zeros gets 1 (its codes are all 0 whatever the scale)."""
    amax = x.abs().amax(-1, keepdim=True).float()
    # a tensor divisor: PyTorch's CUDA division by a Python number multiplies by its reciprocal,
    # one ulp off the IEEE quotient that the CPU and the fused kernels (codegen/quantize_rows.py) give
    return torch.where(amax > 0, amax / torch.full_like(amax, qmax), torch.ones_like(amax))


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 codes [M, K], fp32 scales [M, 1]): symmetric, per row, round to nearest."""
    scale = row_scales(x, INT8_MAX)
    return (x.float() / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_rows_fp8(x: torch.Tensor, per_token: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 values [M, K], fp32 scales [M, 1] or [1, 1]): scaled so the row's (or,
    per_token=False, the whole tensor's) largest magnitude lands on fp8's largest value (448)."""
    scale = row_scales(x, FP8_MAX) if per_token else row_scales(x.reshape(1, -1), FP8_MAX)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _rows(x: torch.Tensor, input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """x [..., K] as rows [M, K], times the smoothing input scale in x's dtype (as applied before)."""
    if input_scale is not None:
        x = x * input_scale
    return x.reshape(-1, x.shape[-1])


def _finish(acc: torch.Tensor, x_scale: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
            x: torch.Tensor) -> torch.Tensor:
    y = acc * x_scale * w_scales.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


@torch.library.custom_op("flashc::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
                input_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """SmoothQuant's W8A8 linear: y = dequant(int8(x * input_scale) @ qweight^T) + bias.

    x[..., K] (any float dtype); qweight int8 [N, K] (symmetric, codes -127..127); w_scales
    fp32 [N] (a scale per output row); input_scale [K] or None: SmoothQuant's 1/s per input
    channel (s was multiplied into the weight's columns before rounding). The input is
    quantized per token: codes round(x / s_row) with s_row = max|x_row| / 127. The result is
    in x's dtype, from an fp32 epilogue over the exact integer product.
    """
    rows = _rows(x, input_scale)
    xq, x_scale = quantize_rows_int8(rows)
    acc = (xq.double() @ qweight.double().t()).float()  # exact: integers far below 2**53
    return _finish(acc, x_scale, w_scales, bias, x)


@linear_w8a8.register_fake
def _(x, qweight, w_scales, bias, input_scale):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("flashc::linear_fp8", mutates_args=())
def linear_fp8(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
               input_scale: Optional[torch.Tensor], per_token: bool) -> torch.Tensor:
    """An FP8 (e4m3) linear: y = (fp8(x) @ qweight^T) * x_scale * w_scales + bias.

    qweight float8_e4m3fn [N, K]; w_scales fp32 [N] (per output row) or [1] (per tensor);
    input_scale as linear_w8a8's (None for plain FP8). The input is scaled to fp8's range
    per token (per_token) or over the whole tensor, dynamically on every call. Products of
    fp8 values are summed in fp32; the result is in x's dtype.
    """
    rows = _rows(x, input_scale)
    xq, x_scale = quantize_rows_fp8(rows, per_token)
    acc = xq.float() @ qweight.float().t()
    return _finish(acc, x_scale, w_scales, bias, x)


@linear_fp8.register_fake
def _(x, qweight, w_scales, bias, input_scale, per_token):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def linear_a8(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, bias: Optional[torch.Tensor],
              input_scale: Optional[torch.Tensor], fp8: bool, per_token: bool) -> torch.Tensor:
    """linear_fp8 when fp8 (qweight e4m3), else linear_w8a8 (qweight int8): one call for both."""
    if fp8:
        return linear_fp8(x, qweight, w_scales, bias, input_scale, per_token)
    return linear_w8a8(x, qweight, w_scales, bias, input_scale)


@torch.library.custom_op("flashc::moe_a8", mutates_args=())
def moe_a8(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up_qweight: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_input_scale: Optional[torch.Tensor],
    down_qweight: torch.Tensor,
    down_scales: torch.Tensor,
    down_input_scale: Optional[torch.Tensor],
    top_k: int,
    normalize: bool,
    fp8: bool,
    per_token: bool,
) -> torch.Tensor:
    """flashc.moe with W8A8 (int8) or FP8 experts: each routed token's input and each
    expert's SwiGLU activation quantized per token, as linear_w8a8 / linear_fp8 do.

    gate_up [E, 2F, H] and down [E, H, F] int8 or float8_e4m3fn, scales [E, 2F] / [E, H]
    (per output row; [E, 1] per tensor), input scales [E, H] / [E, F] or None (SmoothQuant).
    Routing is flashc.moe's.
    """
    f = down_qweight.shape[-1]

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gu = linear_a8(rows, gate_up_qweight[e], gate_up_scales[e], None, _at(gate_up_input_scale, e), fp8, per_token)
        h = F.silu(gu[:, :f]) * gu[:, f:]
        return linear_a8(h, down_qweight[e], down_scales[e], None, _at(down_input_scale, e), fp8, per_token)

    return routed_experts(x, router_logits, gate_up_qweight.shape[0], top_k, normalize, expert)


@moe_a8.register_fake
def _(x, router_logits, gate_up_qweight, gate_up_scales, gate_up_input_scale, down_qweight, down_scales,
      down_input_scale, top_k, normalize, fp8, per_token):
    return torch.empty_like(x)


QUANTIZED_OPS = {
    "linear_wq": torch.ops.flashc.linear_wq.default,
    "moe_wq": torch.ops.flashc.moe_wq.default,
    "moe_wq_mixed": torch.ops.flashc.moe_wq_mixed.default,
    "gemv_wq": torch.ops.flashc.gemv_wq.default,
    "linear_w8a8": torch.ops.flashc.linear_w8a8.default,
    "linear_fp8": torch.ops.flashc.linear_fp8.default,
    "moe_a8": torch.ops.flashc.moe_a8.default,
}

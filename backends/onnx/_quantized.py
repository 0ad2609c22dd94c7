"""Lowerings of flashc's weight-only quantized ops (flashc/quantized_ops.py).

* linear_wq -> com.microsoft MatMulNBits (bits 2, 4 or 8, block_size = the group size,
  K = in_features, N = out_features), the packed weight, scales and zero points as
  initializers in the layout the quantization pass wrote (ORT's own: nothing is
  repacked; scales and zero points are only viewed flat), after `x * input_scale` (a
  Mul) when AWQ left one. It fits when x is fp32/fp16 and the group size is a power of
  two >= 16 (ORT's kernels take no other block size; per-channel int8 of a K that is
  not one of those takes the standard form). 3-bit weights never fit: ORT 1.32's CPU
  kernel refuses every width but 2, 4 and 8 ("Only 2b, 4b and 8b quantization is
  supported for MatMulNBits op").
* Otherwise, and with contrib_ops=False, standard ops dequantize the weight as the
  reference does (codes minus zero point, times scale, in fp32; then x's dtype) and
  MatMul: the same numbers, without the memory saving.

flashc.moe_wq and flashc.moe_wq_mixed (quantized MoE experts) are not lowered: `REFUSED` says why and
what to do.
"""

from __future__ import annotations

import torch

from flashc.quantized_ops import default_zero_point

from ._lowering import LoweringContext, lowerings_into
from .int4 import matmul_nbits

# OpOverload -> lowering, for the ops this module lowers (joined in backends/onnx/table.py)
LOWERINGS: dict = {}
lowers = lowerings_into(LOWERINGS)

flashc_ops = torch.ops.flashc

# ops this backend knows and does not lower, with what to do instead (the refusal names it)
REFUSED = {
    flashc_ops.moe_wq.default: (
        "quantized MoE experts (flashc.moe_wq) are not lowered to ONNX yet (flashc.linear_wq is, as "
        "com.microsoft MatMulNBits); quantize with QuantConfig(quantize_experts=False) to keep the experts "
        "in float, or compile for cpu"),
    flashc_ops.moe_wq_mixed.default: (
        "MoE experts quantized at a width each (flashc.moe_wq_mixed, a mixed-precision budget) are not lowered to "
        "ONNX; quantize with QuantConfig(quantize_experts=False) to keep the experts in float, or compile for cpu"),
}

# dtypes ORT's CPU MatMulNBits kernels take for x and the scales
MATMUL_NBITS_DTYPES = (torch.float32, torch.float16)


# widths ORT's CPU MatMulNBits kernel takes (its constructor refuses the others)
MATMUL_NBITS_BITS = (2, 4, 8)


def _matmul_nbits_fits(ctx: LoweringContext, x_dtype, scales_dtype, block_size: int, bits: int) -> bool:
    return (ctx.contrib_ops and bits in MATMUL_NBITS_BITS and x_dtype in MATMUL_NBITS_DTYPES and scales_dtype == x_dtype
            and block_size >= 16 and not block_size & (block_size - 1))


def _flat(ctx: LoweringContext, arg):
    """A [N, M] weight as the [N * M] value MatMulNBits reads: a flat view of the constant when it
    is one (no Reshape in the graph), else a Reshape."""
    t = ctx.param(arg)
    if t is None:
        return ctx.b.reshape(ctx.v(arg), [-1])
    key = ("flat", arg)
    if key not in ctx.cache:
        ctx.cache[key] = ctx.b.weight(f"{arg.name}_flat", t.reshape(-1))
    return ctx.cache[key]


@lowers(flashc_ops.linear_wq.default)
def _linear_wq(ctx, node):
    """(x * input_scale) @ dequantize(qweight, scales, zero_points)^T + bias."""
    a = ctx.args(node)
    x, qweight, scales, zp, bias, input_scale, bits = (
        a["x"], a["qweight"], a["scales"], a["zero_points"], a["bias"], a["input_scale"], a["bits"])
    b = ctx.b
    dt = ctx.out_dtype(node)
    n, n_blocks, blob = ctx.shape(qweight)
    group = blob * 8 // bits
    k = n_blocks * group
    xv = ctx.tensor(x, dt)
    if input_scale is not None:
        xv = b.op("Mul", xv, ctx.tensor(input_scale, dt))
    bias_v = None if bias is None else ctx.tensor(bias, dt)
    if _matmul_nbits_fits(ctx, dt, ctx.dtype(scales), group, bits):
        return matmul_nbits(b, xv, ctx.v(qweight), _flat(ctx, scales), None if zp is None else _flat(ctx, zp),
                            bias_v, k=k, n=n, bits=bits, block_size=group)
    w = _dequantize_standard(ctx, qweight, scales, zp, bits, n, n_blocks, group)  # fp32 [N, K]
    y = b.op("MatMul", xv, b.cast(b.transpose(w, [1, 0]), torch.float32, dt))
    return y if bias_v is None else b.op("Add", y, bias_v)


def _unpack_subbyte(ctx: LoweringContext, packed, shape: list[int], bits: int):
    """uint8 [..., B] bytes -> [..., floor(B * 8 / bits)] values (bits 2, 3 or 4), the first of a byte
    from its lowest bits (flashc.quantized_ops.unpack_subbyte)."""
    if 8 % bits:
        return _unpack_bitstream(ctx, packed, shape, bits)
    b = ctx.b
    axis = len(shape)
    parts = []
    for i in range(8 // bits):
        shifted = packed if i == 0 else b.op("BitShift", packed, b.scalar(i * bits, torch.uint8), direction="RIGHT")
        part = b.op("BitwiseAnd", shifted, b.scalar((1 << bits) - 1, torch.uint8))
        parts.append(b.op("Unsqueeze", part, b.ints([axis])))
    return b.reshape(b.op("Concat", *parts, axis=axis), [*shape[:-1], 8 // bits * shape[-1]])


def _unpack_bitstream(ctx: LoweringContext, packed, shape: list[int], bits: int):
    """_unpack_subbyte for a width that does not divide 8 (3 bits): eight values in `bits` bytes, joined
    little-endian into a uint32 and shifted apart (flashc.quantized_ops._unpack_bitstream)."""
    b = ctx.b
    *lead, nbytes = shape
    axis = len(shape)  # the new axis of the eight values of a chunk
    if nbytes % bits:  # zero points: the last chunk's missing bytes are zeros
        pad = b.const(torch.zeros(*lead, bits - nbytes % bits, dtype=torch.uint8), torch.uint8)
        packed = b.op("Concat", packed, pad, axis=len(shape) - 1)
    chunks = -(-nbytes // bits)
    chunk_bytes = b.cast(b.reshape(packed, [*lead, chunks, bits]), torch.uint8, torch.uint32)
    word = None
    for j in range(bits):
        byte = b.slice(chunk_bytes, axis, j, j + 1)  # [..., chunks, 1]
        if j:
            byte = b.op("BitShift", byte, b.scalar(8 * j, torch.uint32), direction="LEFT")
        word = byte if word is None else b.op("BitwiseOr", word, byte)
    parts = []
    for i in range(8):
        shifted = word if i == 0 else b.op("BitShift", word, b.scalar(i * bits, torch.uint32), direction="RIGHT")
        parts.append(b.op("BitwiseAnd", shifted, b.scalar((1 << bits) - 1, torch.uint32)))
    values = b.reshape(b.op("Concat", *parts, axis=axis), [*lead, chunks * 8])
    values = b.cast(values, torch.uint32, torch.uint8)
    count = nbytes * 8 // bits
    return values if count == chunks * 8 else b.slice(values, len(shape) - 1, 0, count)


def _dequantize_standard(ctx: LoweringContext, qweight, scales, zp, bits: int, n: int, n_blocks: int, group: int):
    """The fp32 weight [N, K] in standard ops, computed as flashc.quantized_ops.dequantize."""
    b = ctx.b
    codes = ctx.v(qweight)  # [N, n_blocks, group * bits / 8]
    if bits < 8:
        codes = _unpack_subbyte(ctx, codes, [n, n_blocks, group * bits // 8], bits)
    codes = b.cast(codes, torch.uint8, torch.float32)
    if zp is None:
        zero = b.scalar(float(default_zero_point(bits)), torch.float32)
    else:
        zero = ctx.v(zp)  # [N, ceil(n_blocks * bits / 8)] below 8 bits, [N, n_blocks] at 8
        if bits < 8:
            stored = ctx.shape(zp)[-1]
            zero = b.slice(_unpack_subbyte(ctx, zero, [n, stored], bits), 1, 0, n_blocks)
        zero = b.reshape(b.cast(zero, torch.uint8, torch.float32), [n, n_blocks, 1])
    scale = b.reshape(ctx.tensor(scales, torch.float32), [n, n_blocks, 1])
    w = b.op("Mul", b.op("Sub", codes, zero), scale)
    return b.reshape(w, [n, n_blocks * group])

"""Lowerings of ATen's convolution, normalization and pooling ops to standard ONNX, so models
beyond decoders (ResNet, ViT's patch embedding) compile for onnx-cpu.

Each follows PyTorch's semantics where ONNX's default differs:
* conv: PyTorch pads symmetrically with `padding` per side ("same" pads the extra element at
  the end, written as explicit pads: ONNX Runtime refuses SAME_UPPER with dilation; only for
  stride 1, as PyTorch allows it); groups and dilation map one to one. Transposed convolution
  (`convolution` with transposed=True) is ConvTranspose; an output_padding ONNX Runtime refuses
  (not below the stride, which PyTorch allows below the dilation) becomes less padding at the end.
* batch_norm in eval mode (running statistics) -> BatchNormalization; with training=True
  (batch statistics) it is refused: export the model in eval mode.
* max_pool: PyTorch pads with -inf (ONNX's MaxPool too) and `ceil_mode` maps one to one;
  dilation too. A window holding NaN is NaN (ONNX Runtime passes over NaN), its index the last NaN's; indices
  count within each plane (ONNX's over the whole tensor).
* avg_pool: `count_include_pad` and `ceil_mode` map one to one; divisor_override is refused.
* adaptive_avg_pool: an output of 1 per spatial dim is GlobalAveragePool; an output that
  divides the input evenly is AveragePool with kernel = stride = input / output (the windows
  PyTorch's adaptive pooling uses then); other sizes (overlapping windows) are refused.
"""

from __future__ import annotations

import math

import torch

from ._lowering import NotLowerable, lowerings_into

# OpOverload -> lowering, for the ops this module lowers (joined in backends/onnx/table.py)
LOWERINGS: dict = {}
lowers = lowerings_into(LOWERINGS)

aten = torch.ops.aten


def _tuple(value, n: int) -> list[int]:
    """PyTorch's int-or-list arguments (kernel_size=3, stride=[2, 2]) as a list of n ints."""
    if isinstance(value, (list, tuple)):
        return [int(v) for v in (value * n if len(value) == 1 else value)]
    return [int(value)] * n


@lowers(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
        aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)
def _conv(ctx, node):
    a = ctx.args(node)
    spatial = len(ctx.shape(a["input"])) - 2
    stride, dilation = _tuple(a["stride"], spatial), _tuple(a["dilation"], spatial)
    padding = a["padding"]
    attrs = dict(strides=stride, dilations=dilation, group=int(a["groups"]))
    if padding == "same":  # explicit pads: ONNX Runtime refuses auto_pad SAME_UPPER with dilation
        if any(s != 1 for s in stride):
            raise NotLowerable("padding='same' with a stride other than 1 (PyTorch refuses it too)")
        kernel = ctx.shape(a["weight"])[2:]
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        attrs["pads"] = [t // 2 for t in total] + [t - t // 2 for t in total]
    elif padding == "valid":
        attrs["pads"] = [0] * (2 * spatial)
    else:
        pads = _tuple(padding, spatial)
        attrs["pads"] = pads + pads
    inputs = [ctx.v(a["input"]), ctx.v(a["weight"])] + ([ctx.v(a["bias"])] if a["bias"] is not None else [])
    return ctx.b.op("Conv", *inputs, **attrs)


@lowers(aten.convolution.default)
def _convolution(ctx, node):
    a = ctx.args(node)
    spatial = len(ctx.shape(a["input"])) - 2
    pads = _tuple(a["padding"], spatial)
    inputs = [ctx.v(a["input"]), ctx.v(a["weight"])] + ([ctx.v(a["bias"])] if a["bias"] is not None else [])
    attrs = dict(strides=_tuple(a["stride"], spatial), dilations=_tuple(a["dilation"], spatial), pads=pads + pads,
                 group=int(a["groups"]))
    if a["transposed"]:  # PyTorch's weight [C_in, C_out / groups, k...] is ConvTranspose's layout
        extra = _tuple(a["output_padding"], spatial)
        if all(e < s for e, s in zip(extra, attrs["strides"])):
            return ctx.b.op("ConvTranspose", *inputs, output_padding=extra, **attrs)
        # PyTorch allows output_padding below the dilation too, ONNX Runtime only below the stride: the
        # extra outputs are those the padding crops at the end, so crop that much less there
        if any(e > p for e, p in zip(extra, pads)):
            raise NotLowerable(f"output_padding {extra} at or above the stride {attrs['strides']} and above the "
                               f"padding {pads} (ONNX Runtime refuses it)")
        attrs["pads"] = pads + [p - e for p, e in zip(pads, extra)]
        return ctx.b.op("ConvTranspose", *inputs, **attrs)
    return ctx.b.op("Conv", *inputs, **attrs)


@lowers(aten.batch_norm.default)
def _batch_norm(ctx, node):
    a = ctx.args(node)
    if a["training"]:
        raise NotLowerable("batch_norm with batch statistics (training=True); export the model in eval mode")
    if a["running_mean"] is None or a["running_var"] is None:
        raise NotLowerable("batch_norm without running statistics")
    x = a["input"]
    channels = ctx.shape(x)[1]
    dt = ctx.dtype(x)
    scale = ctx.v(a["weight"]) if a["weight"] is not None else ctx.b.const(torch.ones(channels), dt)
    bias = ctx.v(a["bias"]) if a["bias"] is not None else ctx.b.const(torch.zeros(channels), dt)
    return ctx.b.op("BatchNormalization", ctx.v(x), scale, bias, ctx.v(a["running_mean"]), ctx.v(a["running_var"]),
                    epsilon=float(a["eps"]))


@lowers(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default)
def _max_pool(ctx, node):
    a = ctx.args(node)
    spatial = len(ctx.shape(a["input"])) - 2
    b, x = ctx.b, ctx.v(a["input"])
    attrs = _pool_attrs(a, spatial)
    pooled = b.op("MaxPool", x, **attrs)
    dt = ctx.dtype(a["input"])
    if not dt.is_floating_point:
        return pooled
    # PyTorch's window max is NaN where the window holds one; ONNX Runtime's MaxPool passes over NaN (a window of
    # NaN only came out as the lowest float): pool where the NaNs are, and write NaN there
    nan = b.op("MaxPool", b.cast(b.op("IsNaN", x), torch.bool, dt), **attrs)
    return b.op("Where", b.op("Greater", nan, b.scalar(0.0, dt)), b.scalar(float("nan"), dt), pooled)


def _pool_attrs(a, spatial: int) -> dict:
    kernel = _tuple(a["kernel_size"], spatial)
    stride = _tuple(a["stride"], spatial) if a["stride"] not in (None, []) else kernel
    pads = _tuple(a["padding"], spatial)
    return dict(kernel_shape=kernel, strides=stride, pads=pads + pads, dilations=_tuple(a["dilation"], spatial),
                ceil_mode=int(bool(a["ceil_mode"])))


def _plane(what: str, shape: list[int], spatial: int) -> int:
    """Elements of one (batch, channel) plane; refused where indices could not be counted in float32."""
    if len(shape) != spatial + 2:
        raise NotLowerable(f"{what} of a {len(shape)}-d input (batch and channels first only)")
    plane = math.prod(shape[2:])
    if plane >= 2**24:
        raise NotLowerable(f"{what} over planes of {plane} elements (float32 counts them exactly up to 2**24)")
    return plane


@lowers(aten.max_pool1d_with_indices.default, aten.max_pool2d_with_indices.default,
        aten.max_pool3d_with_indices.default)
def _max_pool_with_indices(ctx, node):
    a = ctx.args(node)
    spatial = {aten.max_pool1d_with_indices.default: 1, aten.max_pool2d_with_indices.default: 2}.get(node.target, 3)
    shape = ctx.shape(a["input"])
    plane = _plane("max pooling with indices", shape, spatial)
    return _pooled_with_indices(ctx, a, shape, spatial, plane, _pool_attrs(a, spatial))


@lowers(aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)
def _adaptive_max_pool(ctx, node):
    """Adaptive max pooling to sizes that divide the input: MaxPool with kernel = stride = input / output, the
    windows PyTorch's adaptive pooling takes then, with NaN and indices as max_pool's (torchlib's passed over
    NaN); other sizes (overlapping windows) are refused."""
    a = ctx.args(node)
    spatial = 2 if node.target == aten.adaptive_max_pool2d.default else 3
    shape = ctx.shape(a["input"])
    plane = _plane("adaptive max pooling", shape, spatial)
    val = node.meta["val"]
    in_sizes, out_sizes = shape[2:], [int(d) for d in val[0].shape[-spatial:]]
    if any(o == 0 or i % o for i, o in zip(in_sizes, out_sizes)):
        raise NotLowerable(f"adaptive max pooling from {in_sizes} to {out_sizes}: the windows overlap "
                           "(only sizes that divide the input are lowered)")
    kernel = [i // o for i, o in zip(in_sizes, out_sizes)]
    return _pooled_with_indices(ctx, a, shape, spatial, plane, dict(kernel_shape=kernel, strides=kernel))


def _pooled_with_indices(ctx, a, shape: list[int], spatial: int, plane: int, attrs: dict):
    """Window maxima and where they are, as PyTorch has them: the index within each plane (ONNX's MaxPool counts
    over the whole tensor); a window holding NaN gives NaN and the last NaN's index (PyTorch's loop takes every
    NaN it meets, ONNX Runtime's passes over them: torchlib's lowering did)."""
    b, x = ctx.b, ctx.v(a["input"])
    values, flat = b.op("MaxPool", x, outputs=2, **attrs)
    starts = torch.arange(shape[0] * shape[1], dtype=torch.int64).reshape(shape[0], shape[1], *[1] * spatial)
    indices = b.op("Sub", flat, b.const(starts * plane, torch.int64))
    if not ctx.dtype(a["input"]).is_floating_point:
        return values, indices
    # each NaN's position + 1 (0 elsewhere), pooled: the window's last NaN, in scan order
    at = b.const(torch.arange(1, plane + 1, dtype=torch.float32).reshape(1, 1, *shape[2:]), torch.float32)
    marks = b.op("Where", b.op("IsNaN", x), at, b.scalar(0.0, torch.float32))
    last = b.op("MaxPool", marks, **attrs)
    nan = b.op("Greater", last, b.scalar(0.0, torch.float32))
    values = b.op("Where", nan, b.scalar(float("nan"), ctx.dtype(a["input"])), values)
    last_index = b.cast(b.op("Sub", last, b.scalar(1.0, torch.float32)), torch.float32, torch.int64)
    return values, b.op("Where", nan, last_index, indices)


@lowers(aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default)
def _avg_pool(ctx, node):
    a = ctx.args(node)
    if a.get("divisor_override") is not None:
        raise NotLowerable("avg_pool with divisor_override")
    spatial = len(ctx.shape(a["input"])) - 2
    kernel = _tuple(a["kernel_size"], spatial)
    stride = _tuple(a["stride"], spatial) if a["stride"] not in (None, []) else kernel
    pads = _tuple(a["padding"], spatial)
    return ctx.b.op("AveragePool", ctx.v(a["input"]), kernel_shape=kernel, strides=stride, pads=pads + pads,
                    ceil_mode=int(bool(a["ceil_mode"])), count_include_pad=int(bool(a["count_include_pad"])))


@lowers(aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default)
def _adaptive_avg_pool(ctx, node):
    a = ctx.args(node)
    n = len(_tuple(a["output_size"], 1)) if isinstance(a["output_size"], (list, tuple)) else 1
    in_sizes, out_sizes = ctx.shape(a["input"])[-n:], ctx.shape(node)[-n:]
    x = ctx.v(a["input"])
    if all(o == 1 for o in out_sizes):
        return ctx.b.op("GlobalAveragePool", x)
    if any(o == 0 or i % o for i, o in zip(in_sizes, out_sizes)):
        raise NotLowerable(f"adaptive average pooling from {in_sizes} to {out_sizes}: the windows overlap "
                           "(only sizes that divide the input are lowered)")
    kernel = [i // o for i, o in zip(in_sizes, out_sizes)]
    return ctx.b.op("AveragePool", x, kernel_shape=kernel, strides=kernel)

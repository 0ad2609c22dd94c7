"""Lowerings of ATen math ops (elementwise, creation, reductions, matmuls, SDPA) to standard ONNX.

Each lowering follows the op's PyTorch semantics, type promotion included: operands
are cast to the dtype torch computes in (the FX node's output dtype for arithmetic,
`torch.result_type` for comparisons), because ONNX ops do not promote.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from onnx_ir.tensor_adapters import TorchTensor

from ._lowering import LoweringContext, NotLowerable, causal_mask_value, lowerings_into

# OpOverload -> lowering, for the ops this module lowers (joined in backends/onnx/table.py)
LOWERINGS: dict = {}
lowers = lowerings_into(LOWERINGS)

aten = torch.ops.aten


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# --- elementwise ------------------------------------------------------------------------

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _binary(onnx_op: str, has_alpha: bool = False):
    """x op y (+ alpha), computed as PyTorch does: an in-place op (add_) in the promoted dtype,
    rounded to the written tensor's; fp16/bf16 with a Python-number factor or divisor, or an
    alpha, in fp32 (the number kept fp32, alpha rounded to the dtype first), rounded once."""
    def lower(ctx: LoweringContext, node):
        a = ctx.args(node)
        out = ctx.out_dtype(node)
        dt = out
        if node.target._schema.is_mutable:
            promoted = ctx.result_dtype(a["input"], a["other"])
            dt = promoted if promoted.is_floating_point else out
        alpha = a.get("alpha", 1) if has_alpha else 1
        scalar_factor = onnx_op in ("Mul", "Div") and _is_number(a["other"])
        b = ctx.b
        if dt in _LOW_PRECISION and (alpha != 1 or scalar_factor):
            wide = torch.float32
            x = b.cast(ctx.tensor(a["input"], dt), dt, wide)
            y = b.scalar(a["other"], wide) if scalar_factor else b.cast(ctx.tensor(a["other"], dt), dt, wide)
            if alpha != 1:
                y = b.op("Mul", y, b.scalar(float(torch.tensor(alpha, dtype=dt)), wide))
            return b.cast(b.op(onnx_op, x, y), wide, out)
        x, y = ctx.tensor(a["input"], dt), ctx.tensor(a["other"], dt)
        if alpha != 1:
            y = b.op("Mul", y, b.scalar(alpha, dt))
        return b.cast(b.op(onnx_op, x, y), dt, out)
    return lower


lowers(aten.add.Tensor, aten.add.Scalar)(_binary("Add", has_alpha=True))
lowers(aten.sub.Tensor, aten.sub.Scalar)(_binary("Sub", has_alpha=True))
lowers(aten.mul.Tensor, aten.mul.Scalar)(_binary("Mul"))
lowers(aten.div.Tensor, aten.div.Scalar)(_binary("Div"))
lowers(aten.maximum.default)(_binary("Max"))
lowers(aten.minimum.default)(_binary("Min"))


@lowers(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(ctx, node):
    """other - alpha * input (fp16/bf16 with an alpha: in fp32, rounded once, as `_binary`)."""
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    alpha = a.get("alpha", 1)
    cdt = torch.float32 if dt in _LOW_PRECISION and alpha != 1 else dt
    b = ctx.b
    y = b.cast(ctx.tensor(a["input"], dt), dt, cdt)
    if alpha != 1:
        y = b.op("Mul", y, b.scalar(float(torch.tensor(alpha, dtype=dt)) if dt.is_floating_point else alpha, cdt))
    return b.cast(b.op("Sub", b.cast(ctx.tensor(a["other"], dt), dt, cdt), y), cdt, dt)


def _float_mod(ctx, x, y, dt):
    """(fmod(x, y), whether it must move by y into y's sign): PyTorch's remainder of floats."""
    b = ctx.b
    zero = b.scalar(0, dt)
    mod = b.op("Mod", x, y, fmod=1)
    differ = b.op("Xor", b.op("Less", y, zero), b.op("Less", mod, zero))
    return mod, b.op("And", b.op("Not", b.op("Equal", mod, zero)), differ)


# ONNX Runtime's Where returns +0.0 for a -0.0 taken from its first branch (its second keeps
# the sign), so the lowerings below put a value that may be -0.0 second.

def _floor_div(ctx, x, y, dt):
    """Division rounded toward -inf, as PyTorch computes it (not floor(x / y): 1.0 // 0.1 is 9).

    Integers: exact (ONNX's integer Div truncates). Floats: PyTorch's div_floor, Python's
    algorithm: (x - fmod(x, y)) / y, moved down by one where the remainder's sign differs
    from y's, rounded to the nearest integer; 0 takes the sign of x / y; y == 0 gives x / y.
    """
    b = ctx.b
    if not dt.is_floating_point:
        return b.op("Div", b.op("Sub", x, b.op("Mod", x, y, fmod=0)), y)
    mod, moved = _float_mod(ctx, x, y, dt)
    div = b.op("Div", b.op("Sub", x, mod), y)
    div = b.op("Where", moved, b.op("Sub", div, b.scalar(1, dt)), div)
    floor = b.op("Floor", div)
    floor = b.op("Where", b.op("Greater", b.op("Sub", div, floor), b.scalar(0.5, dt)),
                 b.op("Add", floor, b.scalar(1, dt)), floor)
    quotient = b.op("Div", x, y)
    nonzero = b.op("Not", b.op("Equal", div, b.scalar(0, dt)))
    floor = b.op("Where", nonzero, floor, b.op("Mul", quotient, b.scalar(0, dt)))
    return b.op("Where", b.op("Equal", y, b.scalar(0, dt)), quotient, floor)


def _trunc(ctx, q, dt):
    """q rounded toward 0, the sign of a zero kept (Ceil of -0.5 is -0.0)."""
    b = ctx.b
    return b.op("Where", b.op("Greater", q, b.scalar(0, dt)), b.op("Floor", q), b.op("Ceil", q))


def _in_opmath(ctx, node, compute, number_in_opmath: bool):
    """compute(x, y, cdt, dt) on the node's operands in cdt (`ctx.opmath` of its dtype dt: fp32
    for fp16/bf16 computed in fp32), its result rounded to dt once, as PyTorch's kernels do.
    number_in_opmath: a Python-number divisor stays fp32 (PyTorch's floor and trunc division)
    instead of being rounded to the dtype first (its remainder)."""
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    cdt = ctx.opmath(dt)
    b = ctx.b
    x = b.cast(ctx.tensor(a["input"], dt), dt, cdt)
    if number_in_opmath and _is_number(a["other"]):
        y = b.scalar(a["other"], cdt)
    else:
        y = b.cast(ctx.tensor(a["other"], dt), dt, cdt)
    return b.cast(compute(x, y, cdt, dt), cdt, dt)


@lowers(aten.floor_divide.default, aten.floor_divide.Scalar)
def _floor_divide(ctx, node):
    return _in_opmath(ctx, node, lambda x, y, cdt, dt: _floor_div(ctx, x, y, cdt), number_in_opmath=True)


@lowers(aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div_mode(ctx, node):
    mode, b = ctx.args(node).get("rounding_mode"), ctx.b

    def compute(x, y, cdt, dt):
        if mode is None:
            return b.op("Div", x, y)
        if mode == "floor":
            return _floor_div(ctx, x, y, cdt)
        if not cdt.is_floating_point:  # trunc: ONNX integer Div truncates
            return b.op("Div", x, y)
        q = b.cast(b.cast(b.op("Div", x, y), cdt, dt), dt, cdt)  # PyTorch rounds the quotient first
        return _trunc(ctx, q, cdt)

    return _in_opmath(ctx, node, compute, number_in_opmath=True)


@lowers(aten.remainder.Tensor, aten.remainder.Scalar)
def _remainder(ctx, node):
    """x mod y with y's sign, like PyTorch: Mod for integers, fmod moved into y's sign for floats."""
    def compute(x, y, cdt, dt):
        if not cdt.is_floating_point:
            return ctx.b.op("Mod", x, y, fmod=0)
        mod, moved = _float_mod(ctx, x, y, cdt)
        return ctx.b.op("Where", moved, ctx.b.op("Add", mod, y), mod)

    return _in_opmath(ctx, node, compute, number_in_opmath=False)


def _unary(*onnx_ops: str):
    def lower(ctx: LoweringContext, node):
        dt = ctx.out_dtype(node)
        cdt = ctx.opmath(dt) if len(onnx_ops) > 1 else dt  # rsqrt: Sqrt then Reciprocal, rounded once
        x = ctx.tensor(ctx.args(node)["input"], cdt)
        for op in onnx_ops:
            x = ctx.b.op(op, x)
        return ctx.b.cast(x, cdt, dt)
    return lower


for _target, _ops in {
    aten.neg.default: ("Neg",), aten.exp.default: ("Exp",), aten.log.default: ("Log",),
    aten.sqrt.default: ("Sqrt",), aten.rsqrt.default: ("Sqrt", "Reciprocal"),
    aten.reciprocal.default: ("Reciprocal",), aten.sigmoid.default: ("Sigmoid",),
    aten.tanh.default: ("Tanh",), aten.relu.default: ("Relu",), aten.cos.default: ("Cos",),
    aten.sin.default: ("Sin",), aten.abs.default: ("Abs",), aten.erf.default: ("Erf",),
    aten.floor.default: ("Floor",), aten.ceil.default: ("Ceil",),
}.items():
    lowers(_target)(_unary(*_ops))


@lowers(aten.sign.default)
def _sign(ctx, node):
    """(x > 0) - (x < 0): PyTorch's sign of NaN is 0 (ONNX's Sign keeps NaN)."""
    dt = ctx.out_dtype(node)
    x = ctx.tensor(ctx.args(node)["input"], dt)
    if not dt.is_floating_point:
        return ctx.b.op("Sign", x)
    b = ctx.b
    above, below = (b.cast(b.op(op, x, b.scalar(0, dt)), torch.bool, dt) for op in ("Greater", "Less"))
    return b.op("Sub", above, below)


def silu(ctx, x, dt):
    """x * sigmoid(x) of an FX node or value x of dtype dt, rounded once (PyTorch's silu kernel)."""
    cdt = ctx.opmath(dt)
    v = ctx.tensor(x, cdt) if isinstance(x, fx.Node) else ctx.b.cast(x, dt, cdt)
    return ctx.b.cast(ctx.b.op("Mul", v, ctx.b.op("Sigmoid", v)), cdt, dt)


@lowers(aten.silu.default)
def _silu(ctx, node):
    return silu(ctx, ctx.args(node)["input"], ctx.out_dtype(node))


@lowers(aten.gelu.default)
def _gelu(ctx, node):
    a = ctx.args(node)
    return ctx.b.op("Gelu", ctx.v(a["input"]), approximate=a["approximate"])


@lowers(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar)
def _pow(ctx, node):
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    base = a.get("input", a.get("self"))
    x = ctx.tensor(base, dt)
    e = a["exponent"]
    if isinstance(e, (int, float)) and not isinstance(e, bool) and e == 2:
        return ctx.b.op("Mul", x, x)  # exactly what torch computes for x ** 2
    if isinstance(e, float) and dt.is_floating_point and e in (0.5, -0.5):
        # PyTorch takes x ** 0.5 as sqrt (sqrt(-inf) is NaN where pow(-inf, 0.5) is inf; sqrt(-0.0) is -0.0) and
        # x ** -0.5 as its reciprocal
        root = ctx.b.op("Sqrt", x)
        return root if e > 0 else ctx.b.op("Reciprocal", root)
    return ctx.b.op("Pow", x, ctx.tensor(e, dt))


@lowers(aten.square.default)
def _square(ctx, node):
    x = ctx.tensor(ctx.args(node)["input"], ctx.out_dtype(node))
    return ctx.b.op("Mul", x, x)


@lowers(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(ctx, node):
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    x = ctx.tensor(a["input"], dt)
    lo = a.get("min")
    hi = a.get("max")
    if lo is not None:
        x = ctx.b.op("Max", x, ctx.tensor(lo, dt))
    if hi is not None:
        x = ctx.b.op("Min", x, ctx.tensor(hi, dt))
    return x


def _compare(onnx_op: str, negate: bool = False):
    def lower(ctx: LoweringContext, node):
        a = ctx.args(node)
        dt = ctx.result_dtype(a["input"], a["other"])
        y = ctx.b.op(onnx_op, ctx.tensor(a["input"], dt), ctx.tensor(a["other"], dt))
        return ctx.b.op("Not", y) if negate else y
    return lower


for _name, (_op, _neg) in {"eq": ("Equal", False), "ne": ("Equal", True), "lt": ("Less", False),
                           "le": ("LessOrEqual", False), "gt": ("Greater", False),
                           "ge": ("GreaterOrEqual", False)}.items():
    _packet = getattr(aten, _name)
    lowers(_packet.Tensor, _packet.Scalar)(_compare(_op, _neg))


def _logical(bool_op: str, int_op: str):
    def lower(ctx: LoweringContext, node):
        a = ctx.args(node)
        dt = ctx.out_dtype(node)
        x, y = ctx.tensor(a["input"], dt), ctx.tensor(a["other"], dt)
        return ctx.b.op(bool_op if dt == torch.bool else int_op, x, y)
    return lower


lowers(aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.bitwise_and.Scalar)(_logical("And", "BitwiseAnd"))
lowers(aten.__or__.Tensor, aten.bitwise_or.Tensor, aten.bitwise_or.Scalar)(_logical("Or", "BitwiseOr"))
lowers(aten.bitwise_xor.Tensor, aten.__xor__.Tensor)(_logical("Xor", "BitwiseXor"))


@lowers(aten.logical_and.default, aten.logical_or.default)
def _logical_bool(ctx, node):
    a = ctx.args(node)
    x, y = (ctx.tensor(a[k], torch.bool) for k in ("input", "other"))
    y = ctx.b.op("And" if node.target == aten.logical_and.default else "Or", x, y)
    return ctx.b.cast(y, torch.bool, ctx.out_dtype(node))


@lowers(aten.logical_not.default, aten.bitwise_not.default)
def _not(ctx, node):
    a = ctx.args(node)
    if node.target == aten.logical_not.default or ctx.dtype(a["input"]) == torch.bool:
        return ctx.b.op("Not", ctx.tensor(a["input"], torch.bool))
    return ctx.b.op("BitwiseNot", ctx.v(a["input"]))


@lowers(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(ctx, node):
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    return ctx.b.op("Where", ctx.tensor(a["condition"], torch.bool), ctx.tensor(a["input"], dt),
                    ctx.tensor(a["other"], dt))


@lowers(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ctx, node):
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    return ctx.b.op("Where", ctx.tensor(a["mask"], torch.bool), ctx.tensor(a["value"], dt),
                    ctx.tensor(a["input"], dt))


# --- casts, copies and no-ops ------------------------------------------------------------

@lowers(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten._to_copy.default,
        aten.type_as.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
        aten.detach.default, aten.lift_fresh_copy.default, aten.positive.default)
def _cast(ctx, node):
    src = node.args[0]
    return ctx.b.cast(ctx.v(src), ctx.dtype(src), ctx.out_dtype(node))


@lowers(aten.copy.default)
def _copy(ctx, node):
    """x.copy_(src): src in x's dtype, broadcast to x's shape (the in-place write is `_in_place`'s)."""
    a = ctx.args(node)
    y = ctx.tensor(a["src"], ctx.out_dtype(node))
    shape = ctx.shape(node)
    if isinstance(a["src"], fx.Node) and ctx.shape(a["src"]) == shape:
        return y
    return ctx.b.op("Expand", y, ctx.b.ints(shape))


@lowers(aten.dropout.default)
def _dropout(ctx, node):
    a = ctx.args(node)
    if a["train"] and a["p"] > 0:
        raise NotLowerable("dropout in training mode; export the model in eval mode")
    return ctx.v(a["input"])


@lowers(aten._assert_tensor_metadata.default, aten._assert_scalar.default,
        aten.sym_constrain_range_for_size.default)
def _no_op(ctx, node):
    return None


# --- tensor creation (static shapes: sizes come from the node's fake tensor) --------------

def _fill(ctx, node, value):
    fill = TorchTensor(torch.tensor([value], dtype=ctx.out_dtype(node)))
    return ctx.b.op("ConstantOfShape", ctx.b.ints(ctx.shape(node)), value=fill)


@lowers(aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default, aten.empty.memory_format,
        aten.new_empty.default, aten.empty_like.default)
def _zeros(ctx, node):
    return _fill(ctx, node, 0)


@lowers(aten.ones.default, aten.new_ones.default, aten.ones_like.default)
def _ones(ctx, node):
    return _fill(ctx, node, 1)


@lowers(aten.full.default, aten.new_full.default, aten.full_like.default)
def _full(ctx, node):
    return _fill(ctx, node, ctx.args(node)["fill_value"])


@lowers(aten.fill.Scalar, aten.zero.default)
def _fill_scalar(ctx, node):
    """x.fill_(value) / x.zero_(): the in-place write is `_in_place`'s."""
    return _fill(ctx, node, ctx.args(node).get("value", 0))


@lowers(aten.fill.Tensor)
def _fill_tensor(ctx, node):
    value = ctx.args(node)["value"]
    return ctx.b.op("Expand", ctx.tensor(value, ctx.out_dtype(node)), ctx.b.ints(ctx.shape(node)))


@lowers(aten.scalar_tensor.default)
def _scalar_tensor(ctx, node):
    return ctx.b.scalar(ctx.args(node)["s"], ctx.out_dtype(node))


@lowers(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(ctx, node):
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    start, end, step = a.get("start", 0), a["end"], a.get("step", 1)
    if dt.is_floating_point:  # torch's own values: Range accumulates in the dtype and may count differently
        return ctx.b.const(torch.arange(start, end, step, dtype=dt), dt)
    return ctx.b.op("Range", ctx.b.scalar(start, dt), ctx.b.scalar(end, dt), ctx.b.scalar(step, dt))


# --- reductions and scans --------------------------------------------------------------------

def _nan_anywhere(ctx, x, axes, keep: int):
    """bool: whether the reduced slice holds a NaN (axes None: all of x)."""
    b = ctx.b
    nan = b.cast(b.op("IsNaN", x), torch.bool, torch.int32)
    found = b.op("ReduceMax", nan, keepdims=keep) if axes is None else b.op("ReduceMax", nan, b.ints(axes),
                                                                              keepdims=keep)
    return b.cast(found, torch.int32, torch.bool)


def _reduce(onnx_op: str):
    def lower(ctx: LoweringContext, node):
        a = ctx.args(node)
        dt = ctx.out_dtype(node)
        x = ctx.tensor(a["input"], dt)
        dims = a.get("dim")
        keep = 1 if a.get("keepdim", False) else 0
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = None
            y = ctx.b.op(onnx_op, x, keepdims=keep)
        else:
            dims = [dims] if isinstance(dims, int) else list(dims)
            y = ctx.b.op(onnx_op, x, ctx.b.ints(dims), keepdims=keep)
        if onnx_op in ("ReduceMax", "ReduceMin") and dt.is_floating_point:
            # PyTorch's amax/amin propagate NaN; ONNX Runtime's ReduceMax/ReduceMin skip it
            y = ctx.b.op("Where", _nan_anywhere(ctx, x, dims, keep), ctx.b.scalar(float("nan"), dt), y)
        return y
    return lower


lowers(aten.mean.dim, aten.mean.default)(_reduce("ReduceMean"))
lowers(aten.sum.dim_IntList, aten.sum.default)(_reduce("ReduceSum"))
lowers(aten.amax.default, aten.max.default)(_reduce("ReduceMax"))  # max(): torchlib's was +inf for NaN
lowers(aten.amin.default, aten.min.default)(_reduce("ReduceMin"))


def _arg_extreme(ctx, x, op: str, axis: int, keep: int):
    """ArgMax/ArgMin of floats as PyTorch takes them: NaN is the extreme, the first one wins."""
    b = ctx.b
    idx = b.op(op, x, axis=axis, keepdims=keep, select_last_index=0)
    nan = b.cast(b.op("IsNaN", x), torch.bool, torch.int32)
    first_nan = b.op("ArgMax", nan, axis=axis, keepdims=keep, select_last_index=0)
    return b.op("Where", _nan_anywhere(ctx, x, [axis], keep), first_nan, idx)


@lowers(aten.max.dim, aten.min.dim)
def _max_dim(ctx, node):
    a = ctx.args(node)
    keep = 1 if a["keepdim"] else 0
    big = node.target == aten.max.dim
    x = ctx.v(a["input"])
    dim = a["dim"]
    values = ctx.b.op("ReduceMax" if big else "ReduceMin", x, ctx.b.ints([dim]), keepdims=keep)
    if not ctx.dtype(a["input"]).is_floating_point:
        return values, ctx.b.op("ArgMax" if big else "ArgMin", x, axis=dim, keepdims=keep, select_last_index=0)
    nan = _nan_anywhere(ctx, x, [dim], keep)
    values = ctx.b.op("Where", nan, ctx.b.scalar(float("nan"), ctx.dtype(a["input"])), values)
    return values, _arg_extreme(ctx, x, "ArgMax" if big else "ArgMin", dim, keep)


@lowers(aten.argmax.default, aten.argmin.default)
def _argmax(ctx, node):
    a = ctx.args(node)
    op = "ArgMax" if node.target == aten.argmax.default else "ArgMin"
    x = ctx.v(a["input"])
    if a["dim"] is None:
        x = ctx.b.reshape(x, [-1])
    keep = 1 if a["keepdim"] else 0
    if not ctx.dtype(a["input"]).is_floating_point:
        return ctx.b.op(op, x, axis=a["dim"] or 0, keepdims=keep, select_last_index=0)
    return _arg_extreme(ctx, x, op, a["dim"] or 0, keep)


@lowers(aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int)
def _softmax(ctx, node):
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    op = "LogSoftmax" if node.target in (aten._log_softmax.default, aten.log_softmax.int) else "Softmax"
    return ctx.b.op(op, ctx.tensor(a["input"], dt), axis=a["dim"])


@lowers(aten.cumsum.default)
def _cumsum(ctx, node):
    a = ctx.args(node)
    return ctx.b.op("CumSum", ctx.tensor(a["input"], ctx.out_dtype(node)), ctx.b.scalar(a["dim"], torch.int64))


@lowers(aten.diff.default)
def _diff(ctx, node):
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    rank = len(ctx.shape(a["input"]))
    dim = _dim(a["dim"], rank)
    parts = [a[k] for k in ("prepend", "input", "append") if a.get(k) is not None]
    b = ctx.b
    x = b.op("Concat", *(ctx.tensor(p, dt) for p in parts), axis=dim) if len(parts) > 1 else ctx.tensor(parts[0], dt)
    n = sum(int(ctx.val(p).shape[dim]) for p in parts)
    for _ in range(a["n"]):  # torch.diff of bools is xor, of numbers the difference
        hi, lo = b.slice(x, dim, 1, n), b.slice(x, dim, 0, n - 1)
        x = b.op("Xor" if dt == torch.bool else "Sub", hi, lo)
        n -= 1
    return x


@lowers(aten.topk.default)
def _topk(ctx, node):
    a = ctx.args(node)
    values, indices = ctx.b.op("TopK", ctx.v(a["input"]), ctx.b.ints([a["k"]]), axis=a["dim"],
                               largest=1 if a["largest"] else 0, sorted=1, outputs=2)
    return values, indices


# --- matrix products ----------------------------------------------------------------------

def _linear_weight_only(ctx, w) -> bool:
    """Whether every use of the weight w is as the weight of aten.linear (so only W^T is needed)."""
    return all(u.target == aten.linear.default and u.args[1] is w and u.args[0] is not w
               and (len(u.args) < 3 or u.args[2] is not w) for u in w.users)


@lowers(aten.linear.default)
def _linear(ctx, node):
    """x @ W^T + b: MatMul with a pre-transposed weight; Gemm(transB) when W is also read elsewhere.

    fp16/bf16 computed in fp32 (`_precision`): the bias is added to the unrounded product and the
    sum rounded once, as PyTorch's addmm does.
    """
    a = ctx.args(node)
    x, w, bias = a["input"], a["weight"], a.get("bias")
    b = ctx.b
    wt = ctx.param(w)
    if wt is not None and _linear_weight_only(ctx, w):
        key = ("linear_weight_t", w)
        if key not in ctx.cache:
            ctx.cache[key] = b.weight(f"{w.name}_t", wt.detach().t().contiguous())
        w_t = ctx.cache[key]
    elif wt is not None:  # e.g. tied input/output embeddings: keep one copy, let Gemm transpose
        shape = ctx.shape(x)
        x2 = b.reshape(ctx.v(x), [-1, shape[-1]]) if len(shape) != 2 else ctx.v(x)
        y = b.op("Gemm", x2, ctx.v(w), ctx.v(bias) if bias is not None else None, transB=1)
        return b.reshape(y, ctx.shape(node)) if len(shape) != 2 else y
    else:
        w_t = b.transpose(ctx.v(w), [1, 0])
    if bias is None:
        return b.op("MatMul", ctx.v(x), w_t)
    dt = ctx.out_dtype(node)
    cdt = ctx.opmath(dt)
    y = b.op("MatMul", b.cast(ctx.v(x), ctx.dtype(x), cdt), b.cast(w_t, ctx.dtype(w), cdt))
    return b.cast(b.op("Add", y, ctx.tensor(bias, cdt)), cdt, dt)


@lowers(aten.outer.default)
def _outer(ctx, node):
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    x, y = (ctx.tensor(a[k], dt) for k in ("input", "vec2"))
    return ctx.b.op("Mul", ctx.b.reshape(x, [-1, 1]), ctx.b.reshape(y, [1, -1]))


@lowers(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(ctx, node):
    return ctx.b.op("MatMul", ctx.v(node.args[0]), ctx.v(node.args[1]))


@lowers(aten.addmm.default)
def _addmm(ctx, node):
    a = ctx.args(node)
    return ctx.b.op("Gemm", ctx.v(a["mat1"]), ctx.v(a["mat2"]), ctx.v(a["input"]),
                    alpha=float(a["alpha"]), beta=float(a["beta"]))


@lowers(aten.layer_norm.default)
def _layer_norm(ctx, node):
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    n = len(a["normalized_shape"])
    b = ctx.b
    ones = list(a["normalized_shape"])
    w = ctx.v(a["weight"]) if a["weight"] is not None else b.const(torch.ones(ones), dt)
    bias = ctx.v(a["bias"]) if a["bias"] is not None else None
    return b.op("LayerNormalization", ctx.v(a["input"]), w, bias, axis=-n, epsilon=float(a["eps"]))


@lowers(aten.scaled_dot_product_attention.default)
def _sdpa(ctx, node):
    """torch's SDPA: a top-left causal mask, masks broadcast to [B, Hq, S, L], a row with every key
    masked gives 0 (its math kernel's safe softmax)."""
    from ._fused import attention_standard

    a = ctx.args(node)
    if a["dropout_p"]:
        raise NotLowerable("attention dropout (dropout_p > 0); export the model in eval mode")
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    qs, ks = ctx.shape(q), ctx.shape(k)
    if len(qs) != 4 or len(ks) != 4:
        raise NotLowerable("query/key/value must be 4-D [batch, heads, seq, head_dim]")
    if qs[1] != ks[1] and not a["enable_gqa"]:
        raise NotLowerable("query and key head counts differ without enable_gqa")
    mask_v = None
    if mask is not None:
        mshape = ctx.shape(mask)
        mask_v = ctx.b.reshape(ctx.v(mask), [1] * (4 - len(mshape)) + mshape) if len(mshape) < 4 else ctx.v(mask)
        mask_v = (mask_v, ctx.dtype(mask), 4)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(qs[-1])
    causal = causal_mask_value(ctx, qs[2], ks[2], 0) if a["is_causal"] else None
    return attention_standard(ctx, q, k, v, mask_v, causal, scale, safe_softmax=True)

"""ATen ops lowered by flashc rather than by TVM's torch.export frontend: its converter is
missing, or gives an answer other than PyTorch's for these graphs.

Each entry of ATEN_OPS is `op -> lower(lowering, node)`, lowering being the FxToRelax
that walks the graph (its `value`, `convert`, `bb`, `R`, `opaque_scalar`). What each
one fixes:
  * instance_norm: the frontend's variance E[x^2] - E[x]^2 cancelled (0.3 off near 1000);
  * batch_norm: the frontend read `training` as the momentum and the momentum as eps,
    and normalized with the batch's statistics (a ResNet-18 in eval mode was 79% off);
  * narrow, slice, select: PyTorch's negative and out-of-range bounds (the frontend's
    narrow ended at `length` rather than `start + length`); numpy_T: no converter;
  * max.dim / min.dim, argmax / argmin of floats: NaN (and its index) where PyTorch has it, the
    first index of the extreme (TVM's argmax passed over NaN and over rows of -inf);
  * prod: no converter;
  * sort and topk of floats: NaN after every number (TVM compared NaN as it came: a row holding one came out
    in another order), the indices of NaN after those of +inf; isnan, isinf and isfinite of bfloat16 and
    float16 in float32 (the build failed); x ** 0.5 and x ** -0.5 as sqrt and its reciprocal, as PyTorch
    (pow(-inf, 0.5) is inf where PyTorch has NaN);
  * amax, amin, var, std, var_mean, layer_norm and group_norm without weight or bias:
    no converter, or one that failed;
  * reductions and softmax of float16 / bfloat16 accumulate in float32, as PyTorch;
  * float `x * 0`, `x / 0`, `x - x`, `x == x`, `x != x`: TVM's simplifier folds these as
    if floats were reals (x * 0 -> 0 whatever x is), so the zero becomes a value TVM
    only knows at run time and the same-operand forms are written out for inf and NaN;
  * cumsum and diff: the frontend accumulates bools in bool and has no diff;
  * index_put with fewer index tensors than dims (`x[:, i] = v`): see indexing.py;
  * where with a Python number on one side or both: no converter;
  * add, sub, mul and div whose operands are not of the result's dtype (int tensor + 2.5, bool + 1):
    the frontend computed in the operand's dtype (a + 2.5 was a + 2) or failed to build;
  * true division of integer tensors: the frontend divided as integers, then cast;
  * masked_fill of a float tensor with -inf (attention masks): the frontend's fill failed to build;
  * full, full_like and new_full with inf or NaN: TVM's legalization of a non-finite fill failed to build;
    new_full: no converter;
  * comparisons with a bool tensor: the build failed (LLVM compared the bits as floats); an int tensor
    compared with a float number compared as ints (x < 2.5 as x < 2);
  * rsub with an int (`1 - x`): the frontend's int32 constant minus a float tensor failed;
  * x + 0.0 and x - (-0.0) of floats: TVM folds them to x, which keeps -0.0 where PyTorch has +0.0;
  * scatter_add: no converter;
  * an int64 tensor divided by a Python int with a rounding mode: the frontend's int32 constant was refused.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from flashc.backends.tvm.common import _dtype, _shape, _tvm_dtype, refuse
from flashc.backends.tvm.indexing import lower_index, lower_index_put

aten = torch.ops.aten
HALF = ("float16", "bfloat16")


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _axes(dim, rank: int) -> list[int]:
    """Reduction axes, normalized; None or [] is every axis (as PyTorch)."""
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        return list(range(rank))
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return sorted(d % rank if rank else 0 for d in dims)


def _float32(lw, x):
    return lw.bb.emit(lw.R.op.astype(x, "float32")) if _dtype(x) in HALF else x


# --- reductions -----------------------------------------------------------------------

def _extreme(reduce: str):
    """amax / amin: NaN anywhere in the reduced elements gives NaN, as in PyTorch (TVM's
    max/min keeps whichever operand its comparison picks), and all -inf gives -inf (+inf for min)."""

    def lower(lw, node):
        op = lw.R.op
        x = lw.value(node.args[0])
        keepdim = bool(_arg(node, 2, "keepdim", False))
        axes = _axes(_arg(node, 1, "dim", []), len(_shape(x)))
        if not _shape(x):  # a 0-d tensor is its own extreme
            return x
        out = lw.bb.emit(getattr(op, reduce)(x, axis=axes, keepdims=keepdim))
        if "float" not in _dtype(x):
            return out
        # TVM starts max at the lowest finite float: a row of -inf (min: +inf) comes out finite
        infinite = float("-inf") if reduce == "max" else float("inf")
        all_inf = lw.bb.emit(op.min(lw.bb.emit(op.astype(op.equal(x, lw.R.const(infinite, _dtype(x))), "int8")),
                                    axis=axes, keepdims=keepdim))
        out = lw.bb.emit(op.where(lw.bb.emit(op.astype(all_inf, "bool")), lw.R.const(infinite, _dtype(x)), out))
        nan = lw.bb.emit(op.max(lw.bb.emit(op.astype(op.isnan(x), "int8")), axis=axes, keepdims=keepdim))
        return lw.bb.emit(op.where(lw.bb.emit(op.astype(nan, "bool")), lw.R.const(float("nan"), _dtype(x)), out))

    return lower


def _extreme_dim(reduce: str):
    """max.dim / min.dim -> (values, indices) of a float tensor: a NaN in the reduced elements gives
    NaN and the index of the first NaN, as in PyTorch (TVM's max and argmax pass over it)."""

    def lower(lw, node):
        x = lw.value(node.args[0])
        if "float" not in _dtype(x) or not _shape(x):
            return lw.frontend_convert(node)
        return _first_extreme(lw, x, reduce, node.args[1] % len(_shape(x)), bool(_arg(node, 2, "keepdim", False)))

    return lower


def _arg_extreme(reduce: str):
    """argmax / argmin of a float tensor: the index of the first NaN where there is one, else of the
    first extreme, as PyTorch (TVM's argmax passed over NaN, and over a row of -inf)."""

    def lower(lw, node):
        x = lw.value(node.args[0])
        dim, keepdim = _arg(node, 1, "dim"), bool(_arg(node, 2, "keepdim", False))
        if "float" not in _dtype(x) or not _shape(x) or (dim is None and keepdim):
            return lw.frontend_convert(node)
        if dim is None:
            x, dim = lw.bb.emit(lw.R.op.reshape(x, [-1])), 0
        return _first_extreme(lw, x, reduce, dim % len(_shape(x)), keepdim)[1]

    return lower


def _first_extreme(lw, x, reduce: str, dim: int, keepdim: bool):
    """(values, indices) along dim: NaN and the first NaN's index where a NaN is, else the extreme
    and the first index holding it."""
    op, emit = lw.R.op, lw.bb.emit
    extreme = emit(getattr(op, reduce)(x, axis=[dim], keepdims=True))
    nan = emit(op.astype(op.isnan(x), "int8"))
    any_nan = emit(op.astype(emit(op.max(nan, axis=[dim], keepdims=True)), "bool"))
    hits = emit(op.where(any_nan, nan, emit(op.astype(op.equal(x, extreme), "int8"))))
    index = emit(op.argmax(hits, axis=dim, keepdims=True))
    # the values read back at the indices: TVM's max of a row of -inf is the lowest finite float
    values = emit(op.gather_elements(x, index, axis=dim))
    if keepdim:
        return values, index
    return emit(op.squeeze(values, axis=[dim])), emit(op.squeeze(index, axis=[dim]))


# --- sorting ----------------------------------------------------------------------------

# a finite number above every finite value of the source dtype, in the dtype its sort key is widened to
_WIDER = {"float16": ("float32", 3.4028234663852886e38), "bfloat16": ("float32", 3.4028234663852886e38),
          "float32": ("float64", 1e300)}


def _reads_indices(node) -> bool:
    return any(u.target is operator.getitem and u.args[1] == 1 for u in node.users)


def _nan_order(lw, node, x, dim: int):
    """(key, index key, NaN count along dim) for sorting floats as PyTorch does, NaN after every number: TVM's
    sort compares NaN as it comes (a row holding one came out in another order, or the NaN in the middle).
    key: NaN read as +inf, so each NaN sorts among the infinities at the end, where the values then write NaN.
    index key: the same widened (NaN +inf, +inf a finite number above the source's), so NaN's indices come
    after +inf's too; float64 has nothing wider, and its indices are refused where they are read."""
    op, emit = lw.R.op, lw.bb.emit
    xf = _float32(lw, x)  # LLVM has no isnan of bfloat16, and TVM's sort of bfloat16 was wrong: sorted in float32
    nan = emit(op.isnan(xf))
    key = emit(op.where(nan, lw.R.const(float("inf"), _dtype(xf)), xf))
    count = emit(op.sum(emit(op.astype(nan, "int64")), axis=[dim], keepdims=True))
    dt = _dtype(x)
    if dt not in _WIDER:
        if _reads_indices(node):
            raise refuse(node, "the indices of a float64 sort with NaN and +inf in one row would be in TVM's "
                         "order, not PyTorch's")
        return key, key, count
    wide, big = _WIDER[dt]
    xw = emit(op.astype(x, wide))
    finite_inf = emit(op.where(emit(op.equal(xw, lw.R.const(float("inf"), wide))), lw.R.const(big, wide), xw))
    return key, emit(op.where(nan, lw.R.const(float("inf"), wide), finite_inf)), count


def _positions(lw, n: int, dim: int, rank: int):
    """0..n-1 along dim, shaped to broadcast against a tensor of `rank` dims."""
    shape = [1] * rank
    shape[dim] = n
    return lw.bb.emit(lw.R.op.reshape(lw.bb.emit(lw.R.op.arange(0, n, 1, "int64")), shape))


def _nan_slots(lw, at, nans, n: int, first: bool):
    """Where the NaNs go among n sorted places (`at`, their positions): the first `nans` of them when NaN ranks
    first (descending, largest), else the last."""
    op, emit = lw.R.op, lw.bb.emit
    if first:
        return emit(op.less(at, nans))
    return emit(op.greater_equal(at, emit(op.subtract(lw.R.const(n, "int64"), nans))))


def _sort(lw, node):
    """sort of floats as PyTorch orders them: NaN after every number (first when descending)."""
    op, emit = lw.R.op, lw.bb.emit
    x = lw.value(node.args[0])
    shape = _shape(x)
    if "float" not in _dtype(x) or not shape:
        return lw.frontend_convert(node)
    dim = _arg(node, 1, "dim", -1) % len(shape)
    descending = bool(_arg(node, 2, "descending", False))
    key, index_key, nans = _nan_order(lw, node, x, dim)
    n = shape[dim]
    at = _positions(lw, n, dim, len(shape))
    tail = _nan_slots(lw, at, nans, n, descending)
    values = emit(op.where(tail, lw.R.const(float("nan"), _dtype(key)), emit(op.sort(key, dim, descending))))
    return _like(lw, values, x), emit(op.argsort(index_key, dim, descending, "int64"))


def _topk(lw, node):
    """topk of floats as PyTorch ranks them: NaN above every number."""
    op, emit = lw.R.op, lw.bb.emit
    x = lw.value(node.args[0])
    shape = _shape(x)
    if "float" not in _dtype(x) or not shape:
        return lw.frontend_convert(node)
    k = int(node.args[1])
    dim = _arg(node, 2, "dim", -1) % len(shape)
    largest = bool(_arg(node, 3, "largest", True))
    key, index_key, nans = _nan_order(lw, node, x, dim)
    at = _positions(lw, k, dim, len(shape))
    # the NaNs are the largest: the first ones of the k largest, past the numbers among the k smallest
    nan_at = _nan_slots(lw, at, nans, shape[dim], largest)
    top = emit(op.topk(key, k, dim, "values", largest))
    values = emit(op.where(nan_at, lw.R.const(float("nan"), _dtype(key)), top))
    return _like(lw, values, x), emit(op.topk(index_key, k, dim, "indices", largest, "int64"))


def _float_test(relax_op: str):
    """isnan / isinf / isfinite, in float32 for bfloat16 and float16 (LLVM has no isnan of bfloat16: the build
    failed)."""

    def lower(lw, node):
        x = lw.value(node.args[0])
        if _dtype(x) not in HALF:
            return lw.frontend_convert(node)
        return lw.bb.emit(getattr(lw.R.op, relax_op)(_float32(lw, x)))

    return lower


def _pow_scalar(lw, node):
    """x ** 0.5 and x ** -0.5 of floats as PyTorch computes them, sqrt and its reciprocal (pow(-inf, 0.5) is inf,
    sqrt(-inf) NaN; sqrt(-0.0) is -0.0); x ** 2 as x * x; bfloat16 and float16 in float32. Other exponents of
    other floats: the frontend."""
    x, e = lw.value(node.args[0]), node.args[1]
    half = _dtype(x) in HALF
    if "float" not in _dtype(x) or isinstance(e, bool) or not isinstance(e, (int, float)) or (
            e not in (0.5, -0.5, 2) and not half):
        return lw.frontend_convert(node)
    op, emit = lw.R.op, lw.bb.emit
    xf = _float32(lw, x)  # half precision in float32, rounded once (TVM's power of bfloat16 failed to build)
    if e == 2:
        y = emit(op.multiply(xf, xf))
    elif e in (0.5, -0.5):
        y = emit(op.sqrt(xf))
        if e < 0:  # PyTorch rounds the root to the tensor's dtype before taking its reciprocal
            y = emit(op.divide(lw.R.const(1.0, _dtype(xf)), _float32(lw, _like(lw, y, x))))
    else:
        y = emit(op.power(xf, lw.R.const(float(e), "float32")))
    return _like(lw, y, x)


def _like(lw, v, x):
    """v in x's dtype (the sorts of half-precision tensors run in float32: exact both ways)."""
    return v if _dtype(v) == _dtype(x) else lw.bb.emit(lw.R.op.astype(v, _dtype(x)))


def _prod(lw, node):
    """prod (all elements) and prod.dim_int: no converter. In the result's dtype (integers and bools
    multiply in int64, as PyTorch), half floats through float32."""
    op = lw.R.op
    x = lw.value(node.args[0])
    dtype = _tvm_dtype(node.meta["val"].dtype)
    if node.target == aten.prod.dim_int:
        axes, keepdim = _axes(node.args[1], len(_shape(x))), bool(_arg(node, 2, "keepdim", False))
    else:
        axes, keepdim = list(range(len(_shape(x)))), False
    work = "float32" if dtype in HALF else dtype
    out = lw.bb.emit(op.prod(lw.ops.cast(x, work), axis=axes, keepdims=keepdim)) if _shape(x) else lw.ops.cast(x, work)
    return lw.ops.cast(out, dtype)


def _variance(lw, node, correction_default: float):
    """(variance, mean) of node.args[0] over its dims, in float32 for half inputs, divided by
    max(0, n - correction) as PyTorch (inf or NaN when that is 0)."""
    op = lw.R.op
    x = _float32(lw, lw.value(node.args[0]))
    overload = node.target._overloadname
    keepdim = bool(node.kwargs.get("keepdim", _arg(node, 3, "keepdim", False) if overload == "dim" else False))
    if overload == "dim":
        unbiased = _arg(node, 2, "unbiased", True)
        correction = 1.0 if unbiased else 0.0
    else:
        correction = node.kwargs.get("correction")
        correction = correction_default if correction is None else float(correction)
    axes = _axes(_arg(node, 1, "dim"), len(_shape(x)))
    n = math.prod(_shape(x)[a] for a in axes) if _shape(x) else 1
    mean = lw.bb.emit(op.mean(x, axis=axes, keepdims=keepdim))
    biased = lw.bb.emit(op.variance(x, axis=axes, keepdims=keepdim))
    divisor = max(0.0, n - correction)
    if divisor > 0:
        var = biased if divisor == n else lw.bb.emit(op.multiply(biased, lw.R.const(n / divisor, "float32")))
    else:  # sum of squares / 0: inf, or NaN when they are all equal
        squares = lw.bb.emit(op.multiply(biased, lw.R.const(float(n), "float32")))
        var = lw.bb.emit(op.divide(squares, lw.opaque_scalar(0.0, "float32")))
    return var, mean


def _var(lw, node):
    return _variance(lw, node, 1.0)[0]


def _std(lw, node):
    return lw.bb.emit(lw.R.op.sqrt(_variance(lw, node, 1.0)[0]))


def _var_mean(lw, node):
    return _variance(lw, node, 1.0)


def _in_float32(lw, node):
    """A frontend reduction or softmax whose first argument is float16/bfloat16, run in
    float32 (PyTorch accumulates those in float32); _check casts the result back."""
    x = node.args[0]
    value = lw.value(x)
    if _dtype(value) not in HALF or not isinstance(x, fx.Node):
        return lw.frontend_convert(node)
    with lw.substituted({x: _float32(lw, value)}):
        return lw.frontend_convert(node)


def _cumsum(lw, node):
    """aten.cumsum accumulating in torch's result dtype (int64 for bool/int inputs; float32
    for half inputs, as PyTorch does on the CPU)."""
    dim = _arg(node, 1, "dim")
    x = lw.value(node.args[0])
    want = _tvm_dtype(node.meta["val"].dtype)
    x = lw.ops.cast(x, "float32" if want in HALF else want)
    return lw.bb.emit(lw.R.op.cumsum(x, axis=dim))


def _diff(lw, node):
    """aten.diff: x[1:] - x[:-1] along dim, n times."""
    op = lw.R.op
    x = lw.value(node.args[0])
    n, dim = _arg(node, 1, "n", 1), _arg(node, 2, "dim", -1)
    ends = [_arg(node, 3, "prepend"), _arg(node, 4, "append")]
    if any(e is not None for e in ends):
        parts = [lw.value(ends[0])] if ends[0] is not None else []
        parts += [x] + ([lw.value(ends[1])] if ends[1] is not None else [])
        x = lw.bb.emit(op.concat(parts, axis=dim))
    for _ in range(n):
        size = _shape(x)[dim]
        hi = lw.bb.emit(op.strided_slice(x, axes=[dim], begin=[1], end=[size]))
        lo = lw.bb.emit(op.strided_slice(x, axes=[dim], begin=[0], end=[size - 1]))
        x = lw.bb.emit(op.not_equal(hi, lo) if _dtype(x) == "bool" else op.subtract(hi, lo))
    return x


# --- normalization --------------------------------------------------------------------

def _per_channel(lw, v, rank: int):
    """A [C] vector shaped [1, C, 1, ...] against an [N, C, ...] input, in float32."""
    return lw.bb.emit(lw.R.op.reshape(_float32(lw, v), [1, _shape(v)[0]] + [1] * (rank - 2)))


def _batch_norm(lw, node):
    """aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum,
    eps, cudnn_enabled): eval mode with the running statistics; training mode only
    without them (it would update them in place)."""
    op = lw.R.op
    x = lw.value(node.args[0])
    weight, bias, mean, var = (node.args[i] if len(node.args) > i else None for i in range(1, 5))
    training, eps = bool(_arg(node, 5, "training", False)), float(_arg(node, 7, "eps", 1e-5))
    if not training:
        if mean is None or var is None:
            raise refuse(node, "batch norm in eval mode without running statistics")
        return _batch_norm_eval(lw, x, weight, bias, mean, var, eps)
    if mean is not None:
        raise refuse(node, "batch norm in training mode updates its running statistics in place",
                     "call model.eval() before compiling, or use target 'cpu'")
    rank = len(_shape(x))
    xf = _float32(lw, x)
    axes = [a for a in range(rank) if a != 1]
    mean_v = lw.bb.emit(op.mean(xf, axis=axes, keepdims=True))
    var_v = lw.bb.emit(op.variance(xf, axis=axes, keepdims=True))
    return _normalized(lw, xf, mean_v, var_v, weight, bias, eps)


def _batch_norm_eval(lw, x, weight, bias, mean, var, eps: float):
    """x normalized with running statistics (per channel, dim 1), then scaled and shifted."""
    rank = len(_shape(x))
    mean_v, var_v = _per_channel(lw, lw.value(mean), rank), _per_channel(lw, lw.value(var), rank)
    return _normalized(lw, _float32(lw, x), mean_v, var_v, weight, bias, eps)


def _normalized(lw, xf, mean_v, var_v, weight, bias, eps: float):
    op = lw.R.op
    rank = len(_shape(xf))
    inv = lw.bb.emit(op.rsqrt(lw.bb.emit(op.add(var_v, lw.R.const(eps, "float32")))))
    out = lw.bb.emit(op.multiply(lw.bb.emit(op.subtract(xf, mean_v)), inv))
    if weight is not None:
        out = lw.bb.emit(op.multiply(out, _per_channel(lw, lw.value(weight), rank)))
    if bias is not None:
        out = lw.bb.emit(op.add(out, _per_channel(lw, lw.value(bias), rank)))
    return out


def _layer_norm(lw, node):
    """aten.layer_norm(input, normalized_shape, weight=None, bias=None, eps, cudnn_enable),
    in float32 for half inputs; a missing weight or bias is 1 or 0."""
    import numpy as np

    op = lw.R.op
    x = _float32(lw, lw.value(node.args[0]))
    shape = list(node.args[1])
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    eps = float(_arg(node, 4, "eps", 1e-5))
    gamma = _float32(lw, lw.value(weight)) if weight is not None else lw.R.const(np.ones(shape, "float32"))
    beta = _float32(lw, lw.value(bias)) if bias is not None else lw.R.const(np.zeros(shape, "float32"))
    axes = list(range(-len(shape), 0))
    return lw.bb.emit(op.nn.layer_norm(x, gamma, beta, axes=axes, epsilon=eps))


def _group_norm(lw, node):
    """aten.group_norm(input, num_groups, weight=None, bias=None, eps, cudnn_enabled) in
    float32; the frontend's converter failed on a missing weight or bias."""
    x = _float32(lw, lw.value(node.args[0]))
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    return _grouped_norm(lw, x, node.args[1], weight, bias, float(_arg(node, 4, "eps", 1e-5)))


def _instance_norm(lw, node):
    """aten.instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum,
    eps, cudnn_enabled): each (sample, channel) normalized over its own elements, a group norm with
    a group per channel (the frontend's converter took E[x^2] - E[x]^2, which cancels: 0.3 off for
    inputs near 1000); with running statistics and use_input_stats False, as batch norm in eval."""
    x = lw.value(node.args[0])
    weight, bias, mean, var = (_arg(node, i, name) for i, name in
                               enumerate(("weight", "bias", "running_mean", "running_var"), start=1))
    use_input_stats, eps = bool(_arg(node, 5, "use_input_stats", True)), float(_arg(node, 7, "eps", 1e-5))
    if use_input_stats and mean is not None:
        raise refuse(node, "instance norm tracking running statistics in training mode updates them in place",
                     "call model.eval() before compiling, or use target 'cpu'")
    if not use_input_stats:
        if mean is None or var is None:
            raise refuse(node, "instance norm without input statistics needs running statistics")
        return _batch_norm_eval(lw, x, weight, bias, mean, var, eps)
    return _grouped_norm(lw, _float32(lw, x), _shape(x)[1], weight, bias, eps)  # _check casts back


def _grouped_norm(lw, x, groups: int, weight, bias, eps: float):
    """x [N, C, ...] float32 normalized over each of `groups` groups of channels (two passes: the
    mean, then the variance about it), then scaled and shifted per channel."""
    op = lw.R.op
    shape = _shape(x)
    grouped = lw.bb.emit(op.reshape(x, [shape[0], groups, -1]))
    mean = lw.bb.emit(op.mean(grouped, axis=[2], keepdims=True))
    var = lw.bb.emit(op.variance(grouped, axis=[2], keepdims=True))
    inv = lw.bb.emit(op.rsqrt(lw.bb.emit(op.add(var, lw.R.const(eps, "float32")))))
    out = lw.bb.emit(op.reshape(lw.bb.emit(op.multiply(lw.bb.emit(op.subtract(grouped, mean)), inv)), shape))
    if weight is not None:
        out = lw.bb.emit(op.multiply(out, _per_channel(lw, lw.value(weight), len(shape))))
    if bias is not None:
        out = lw.bb.emit(op.add(out, _per_channel(lw, lw.value(bias), len(shape))))
    return out


# --- slicing with PyTorch's bounds -----------------------------------------------------

def _slice_bounds(start, end, size: int) -> tuple[int, int]:
    """PyTorch's slice bounds: None is the end, negative counts from the end, both clamped."""
    start = 0 if start is None else start
    end = size if end is None else end
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    start = min(max(start, 0), size)
    return start, min(max(end, start), size)


def _slice(lw, node):
    x = lw.value(node.args[0])
    dim = _arg(node, 1, "dim", 0)
    start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
    if any(isinstance(v, fx.Node) for v in (start, end, step)):
        raise refuse(node, "a slice with bounds computed at run time")
    size = _shape(x)[dim]
    start, end = _slice_bounds(start, end, size)
    if (start, end, step) == (0, size, 1):
        return x
    return lw.bb.emit(lw.R.op.strided_slice(x, axes=[dim], begin=[start], end=[end], strides=[step]))


def _narrow(lw, node):
    x = lw.value(node.args[0])
    dim, start, length = node.args[1], node.args[2], node.args[3]
    if isinstance(start, fx.Node) or isinstance(length, fx.Node):
        raise refuse(node, "narrow with a start or length computed at run time")
    size = _shape(x)[dim]
    start = start + size if start < 0 else start
    if not (0 <= start <= size and 0 <= length <= size - start):
        raise refuse(node, f"narrow({start}, {length}) is outside dimension {dim} of size {size} (PyTorch "
                            "raises here too)", "fix the model")
    return lw.bb.emit(lw.R.op.strided_slice(x, axes=[dim], begin=[start], end=[start + length]))


def _select(lw, node):
    x = lw.value(node.args[0])
    dim, index = node.args[1], node.args[2]
    if isinstance(index, fx.Node):
        raise refuse(node, "select with an index computed at run time")
    size = _shape(x)[dim]
    if not -size <= index < size:
        raise refuse(node, f"index {index} is out of range for dimension {dim} of size {size} (PyTorch raises "
                            "IndexError here)", "fix the model")
    return lw.bb.emit(lw.R.op.take(x, lw.R.const(index % size, "int64"), axis=dim))


def _unfold(lw, node):
    """Tensor.unfold(dim, size, step): the windows of `size` elements every `step` along dim, as a new last dim
    (a view in PyTorch; here a gather with a constant index map, then the window's dim moved last). The frontend
    has no converter."""
    x = lw.value(node.args[0])
    dim, size, step = node.args[1], node.args[2], node.args[3]
    shape = _shape(x)
    if not shape:
        raise refuse(node, "unfold of a 0-d tensor")
    dim %= len(shape)
    if not (step > 0 and 0 < size <= shape[dim]):
        raise refuse(node, f"unfold({dim}, {size}, {step}) of a dimension of size {shape[dim]} (PyTorch raises "
                            "here too)", "fix the model")
    windows = (shape[dim] - size) // step + 1
    index = torch.arange(windows)[:, None] * step + torch.arange(size)[None, :]
    taken = lw.bb.emit(lw.R.op.take(x, lw.R.const(index.numpy(), "int64"), axis=dim))  # dims: .., windows, size, ..
    order = list(range(dim + 1)) + list(range(dim + 2, len(shape) + 1)) + [dim + 1]
    return lw.bb.emit(lw.R.op.permute_dims(taken, order))


def _reversed_dims(lw, node):
    """aten.numpy_T (x.T: every dim reversed; Falcon's fused QKV at -O0) and aten.t (the same for at most
    2 dims; the RNN decompositions' weights): no frontend converter."""
    x = lw.value(node.args[0])
    return lw.bb.emit(lw.R.op.permute_dims(x, list(reversed(range(len(_shape(x)))))))


# --- arithmetic TVM would fold as if floats were reals -----------------------------------

def _is_zero(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


def _float_result(node) -> str | None:
    val = node.meta.get("val")
    return _tvm_dtype(val.dtype) if isinstance(val, torch.Tensor) and val.dtype.is_floating_point else None


def _operand(lw, x, dtype: str):
    """An operand as a tensor of dtype: a node's value cast, a number a run-time scalar of it."""
    if isinstance(x, fx.Node):
        return lw.ops.cast(lw.value(x), dtype)
    return lw.opaque_scalar(float(x) if "float" in dtype else int(x), dtype)


def _by_zero(relax_op: str):
    """mul / div by a scalar zero (x * 0.0, x / 0): the zero as a run-time value; div of integers
    (true division): in the result's float type."""

    def lower(lw, node):
        dtype = _float_result(node)
        a, b = node.args[0], node.args[1]
        if node.target == aten.div.Tensor_mode or node.kwargs.get("rounding_mode") is not None:
            return lw.frontend_convert(node)
        if dtype is not None and relax_op == "divide" and not _is_zero(b) and any(
                isinstance(x, fx.Node) and "float" not in _dtype(lw.value(x)) for x in (a, b)):
            # true division of integers: the frontend divided them as integers, then cast the quotient
            return lw.bb.emit(lw.R.op.divide(_operand(lw, a, dtype), _operand(lw, b, dtype)))
        if dtype is None or not (_is_zero(b) or (relax_op == "multiply" and _is_zero(a))):
            return lw.frontend_convert(node)
        tensor, zero = (a, b) if _is_zero(b) else (b, a)
        x = lw.ops.cast(lw.value(tensor), dtype)
        return lw.bb.emit(getattr(lw.R.op, relax_op)(x, lw.opaque_scalar(float(zero), dtype)))

    return lower


def _plus_zero(relax_op: str, then: Callable | None = None):
    """x + 0.0 and x - (-0.0) of a float tensor: -0.0 + 0.0 is +0.0, which TVM's simplifier loses by
    folding the sum to x (1 / (x * 0 + 0.0) came out -inf for negative x); the zero as a run-time value.
    Other operands: `then`, else the frontend."""

    def lower(lw, node):
        x, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        dtype = _tvm_dtype(node.meta["val"].dtype) if isinstance(node.meta.get("val"), torch.Tensor) else ""
        signed = -1.0 if relax_op == "subtract" else 1.0  # the zero that changes -0.0's sign
        if (isinstance(x, fx.Node) and isinstance(b, float) and b == 0 and math.copysign(1.0, b) == signed
                and "float" in dtype and _dtype(lw.value(x)) == dtype and node.kwargs.get("alpha", 1) == 1):
            return lw.bb.emit(getattr(lw.R.op, relax_op)(lw.value(x), lw.opaque_scalar(b, dtype)))
        return then(lw, node) if then is not None else lw.frontend_convert(node)

    return lower


def _mixed_types(lw, node, relax_op: str, swapped: bool = False):
    """add / sub / mul / div whose tensor operands are not of the result's dtype (an integer tensor
    + 2.5 is float, bool + 1 is int64): the operands cast to the result's dtype first, a number as a
    run-time scalar of it. The frontend computed in the tensor's dtype (a + 2.5 came out a + 2,
    a * 0.5 zero) or failed to build (bool + 1). swapped: the op takes its arguments the other way
    round (rsub(x, 2.5) is 2.5 - x; always lowered here). None when no operand needs a cast."""
    val = node.meta.get("val")
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
    if swapped:
        a, b = b, a
    if (not isinstance(val, torch.Tensor) or node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode")
            or not all(isinstance(v, (fx.Node, int, float)) for v in (a, b))):
        return None
    dtype = _tvm_dtype(val.dtype)
    if not swapped and all(_dtype(lw.value(x)) == dtype for x in (a, b) if isinstance(x, fx.Node)):
        return None  # (the frontend's rsub made `1 - x` an int32 constant minus a float tensor, and failed)

    return lw.bb.emit(getattr(lw.R.op, relax_op)(_operand(lw, a, dtype), _operand(lw, b, dtype)))


def _alpha(relax_op: str, then: Callable, swapped: bool = False):
    """x + alpha * y and x - alpha * y (rsub: y - alpha * x) for alpha != 1, in the result's dtype; the
    frontend dropped alpha (torch.add(a, b, alpha=0.75) came out a + b). Other calls: `then`."""

    def lower(lw, node):
        alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)  # add.Scalar: positional
        val = node.meta.get("val")
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        if swapped:
            a, b = b, a
        if alpha == 1 or not isinstance(val, torch.Tensor) or not all(isinstance(v, (fx.Node, int, float))
                                                                     for v in (a, b, alpha)):
            return then(lw, node)
        dtype = _tvm_dtype(val.dtype)
        scaled = lw.bb.emit(lw.R.op.multiply(_operand(lw, b, dtype), _operand(lw, alpha, dtype)))
        return lw.bb.emit(getattr(lw.R.op, relax_op)(_operand(lw, a, dtype), scaled))

    return lower


def _promoting(relax_op: str, then: Callable | None = None, swapped: bool = False):
    """A lowering of an arithmetic op: operands of another dtype than the result's through
    _mixed_types, the rest by `then` (default: the frontend)."""

    def lower(lw, node):
        mixed = _mixed_types(lw, node, relax_op, swapped)
        if mixed is not None:
            return mixed
        return then(lw, node) if then is not None else lw.frontend_convert(node)

    return lower


def _compare(relax_op: str, then: Callable | None = None):
    """A comparison whose operands are not all of the dtype PyTorch compares in (an int tensor < 2.5
    compares as floats; the frontend made it < 2) or holds a bool tensor (`mask == True`, `(x > 0) != 0`:
    TVM's LLVM codegen compared the bits as floats, and the build failed): the operands cast to that
    dtype (two bools: uint8) first. Other comparisons: `then`, else the frontend."""

    def lower(lw, node):
        a, b = node.args[:2]
        vals = [x.meta.get("val") if isinstance(x, fx.Node) else x for x in (a, b)]
        if not all(isinstance(v, (torch.Tensor, bool, int, float)) for v in vals):
            return then(lw, node) if then is not None else lw.frontend_convert(node)
        common = torch.result_type(*vals)
        dtype = "uint8" if common == torch.bool else _tvm_dtype(common)
        tensors = [_dtype(lw.value(x)) for x in (a, b) if isinstance(x, fx.Node)]
        if all(t == dtype for t in tensors):
            return then(lw, node) if then is not None else lw.frontend_convert(node)

        return lw.bb.emit(getattr(lw.R.op, relax_op)(_operand(lw, a, dtype), _operand(lw, b, dtype)))

    return lower


def _same_operands(kind: str):
    """x - x, x == x, x != x of one float tensor: NaN - NaN and inf - inf are NaN, and NaN
    is not equal to itself; TVM folds them to 0, True and False."""

    def lower(lw, node):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        x = lw.value(a) if isinstance(a, fx.Node) else None
        same = isinstance(a, fx.Node) and a is b and "float" in _dtype(x) and node.kwargs.get("alpha", 1) == 1
        if not same:
            return lw.frontend_convert(node)
        op = lw.R.op
        if kind == "sub":  # x * 0 + 0: +0 for finite x, NaN otherwise
            zero = lw.opaque_scalar(0.0, _dtype(x))
            return lw.bb.emit(op.add(lw.bb.emit(op.multiply(x, zero)), zero))
        nan = lw.bb.emit(op.isnan(x))
        return nan if kind == "ne" else lw.bb.emit(op.logical_not(nan))

    return lower


def _where_scalar(lw, node):
    """where with a Python number on one side (T5 masks with where(mask, x, finfo.min)): the
    number as a tensor of the other side's dtype, as PyTorch promotes it; inf and NaN kept."""
    cond, a, b = (node.args + (None,) * 3)[:3]
    other = a if isinstance(a, fx.Node) else b
    if isinstance(other, fx.Node):
        dtype = _dtype(lw.value(other))
    else:  # where(cond, 1.0, 0.0): the result's dtype
        dtype = _tvm_dtype(node.meta["val"].dtype)
    a, b = (lw.value(v) if isinstance(v, fx.Node) else lw.opaque_scalar(float(v), dtype) for v in (a, b))
    return lw.bb.emit(lw.R.op.where(lw.value(cond), a, b))


def _masked_fill_scalar(lw, node):
    """masked_fill with a number (an attention mask's -inf): where(mask, number, x), the number a
    tensor of x's dtype (the frontend's fill of -inf failed to build)."""
    x, mask, value = node.args[:3]
    xv = lw.value(x)
    dtype = _dtype(xv)
    if "float" not in dtype:
        return lw.frontend_convert(node)
    return lw.bb.emit(lw.R.op.where(lw.value(mask), lw.opaque_scalar(float(value), dtype), xv))


_ORDER = {"lt": "less", "le": "less_equal", "gt": "greater", "ge": "greater_equal"}
_FILL_ARG = {"full": 1, "full_like": 1, "new_full": 2}


def _fill_nonfinite(lw, node):
    """full / full_like / new_full of a float tensor with inf or NaN: the value as a run-time
    scalar broadcast to the result's shape (TVM's legalization of a non-finite fill failed to
    build, and a constant one would be folded as if floats were reals); new_full with any value
    (the frontend has none: lerp's decomposition makes one). Other fills: the frontend."""
    value = _arg(node, _FILL_ARG[node.target._opname], "fill_value")
    val = node.meta.get("val")
    static = val is not None and all(isinstance(d, int) for d in val.shape)
    if static and node.target._opname == "new_full" and isinstance(value, (bool, int, float)):
        pass  # the frontend has no new_full: every value here
    elif (not isinstance(value, (int, float)) or math.isfinite(value) or not static or not val.is_floating_point()):
        return lw.frontend_convert(node)
    kind = float if val.is_floating_point() else bool if val.dtype == torch.bool else int
    scalar = lw.opaque_scalar(kind(value), _tvm_dtype(val.dtype))
    return lw.bb.emit(lw.R.op.broadcast_to(scalar, [int(d) for d in val.shape]))


def _div_rounded(lw, node):
    """An integer tensor divided by a Python int with rounding_mode floor or trunc (the frontend
    made the number an int32 constant, which int64 tensors refused); other forms: the frontend."""
    a, b = node.args[:2]
    mode = _arg(node, 2, "rounding_mode")
    if not isinstance(a, fx.Node) or isinstance(b, (fx.Node, float)) or mode not in ("floor", "trunc"):
        return lw.frontend_convert(node)
    x = lw.value(a)
    dtype = _dtype(x)
    if not dtype.startswith("int") or _float_result(node) is not None:
        return lw.frontend_convert(node)
    if int(b) == 0:
        raise refuse(node, "an integer division by zero (PyTorch raises ZeroDivisionError)", "fix the model")
    op, R = lw.R.op, lw.R
    if mode == "floor":
        return lw.bb.emit(op.floor_divide(x, R.const(int(b), dtype)))
    q = lw.bb.emit(op.floor_divide(op.abs(x), R.const(abs(int(b)), dtype)))  # trunc: |x| // |b|, signed
    negative = op.less(x, R.const(0, dtype)) if b > 0 else op.greater_equal(x, R.const(0, dtype))
    return lw.bb.emit(op.where(negative, op.negative(q), q))


def _scatter_add(lw, node):
    """scatter_add (no converter in TVM's frontend): scatter_reduce's sum, with self."""
    return _scatter(lw, node, "sum", True)


_SCATTER_REDUCTIONS = {"sum": "add", "prod": "mul", "amax": "max", "amin": "min"}


def _scatter_reduce(lw, node):
    """scatter_reduce.two with sum, prod, amax or amin (no converter in TVM's frontend); "mean" is
    refused (its count of updates is not built)."""
    reduce = node.args[4] if len(node.args) > 4 else node.kwargs["reduce"]
    if reduce not in _SCATTER_REDUCTIONS:
        raise refuse(node, f"scatter_reduce with reduce={reduce!r}")
    return _scatter(lw, node, reduce, bool(_arg(node, 5, "include_self", True)))


def _scatter(lw, node, reduce: str, include_self: bool):
    """ONNX-style scatter_elements with the reduction, the indices range-checked at run time as the
    frontend's scatter's are (indexing.guarded_indices). Without include_self the positions written
    start from the reduction's identity, or for amax / amin from one of the updates landing there;
    NaN among what reaches a position gives NaN for amax / amin, as in PyTorch."""
    from flashc.backends.tvm.indexing import guarded_indices

    op, R = lw.R.op, lw.R
    x, dim, index, src = (lw.value(a) if isinstance(a, fx.Node) else a for a in node.args[:4])
    if _shape(src) != _shape(index):
        raise refuse(node, f"src {_shape(src)} larger than index {_shape(index)} (PyTorch reads only the index's "
                           "shape of it)")
    index = guarded_indices(lw, node).get(node.args[2], index)
    axis = dim % len(_shape(x))
    dtype = _dtype(x)
    if not include_self:  # sum, prod: the identity; amax, amin: one of the updates landing there (idempotent)
        fill = src if reduce in ("amax", "amin") else lw.bb.emit(op.full_like(src, R.const(int(reduce == "prod"),
                                                                                           dtype)))
        x = lw.bb.emit(op.scatter_elements(x, index, fill, axis=axis, reduction="update"))
    out = lw.bb.emit(op.scatter_elements(x, index, src, axis=axis, reduction=_SCATTER_REDUCTIONS[reduce]))
    if reduce in ("amax", "amin") and "float" in dtype:
        hits = lw.bb.emit(op.astype(op.isnan(src), "int32"))
        zeros = lw.bb.emit(op.zeros(_shape(x), "int32"))
        nan = lw.bb.emit(op.greater(op.scatter_elements(zeros, index, hits, axis=axis, reduction="add"),
                                    R.const(0, "int32")))
        if include_self:
            nan = lw.bb.emit(op.logical_or(nan, op.isnan(x)))
        out = lw.bb.emit(op.where(nan, R.const(float("nan"), dtype), out))
    return out


def _clamp(lw, node):
    """aten.clamp of integers with one bound None (PyTorch's upsample decompositions clamp indices from
    one side): the frontend writes the missing bound as an infinity, which TVM cannot make an integer
    (the build failed). Floats, or both bounds, go to the frontend."""
    val = node.meta.get("val")
    low, high = _arg(node, 1, "min"), _arg(node, 2, "max")
    if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point or (low is not None and high is not None):
        return lw.frontend_convert(node)
    if not all(b is None or isinstance(b, int) for b in (low, high)):
        return lw.frontend_convert(node)
    op, R = lw.R.op, lw.R
    x = lw.value(node.args[0])
    dtype = _dtype(x)
    if low is not None:
        x = lw.bb.emit(op.maximum(x, R.const(low, dtype)))
    if high is not None:
        x = lw.bb.emit(op.minimum(x, R.const(high, dtype)))
    return x


def _pool_default_stride(lw, node):
    """max_pool with stride [] (PyTorch: the kernel size; what F.max_pool2d(x, 2, ceil_mode=True)
    records): the frontend indexes the empty list, so it gets the kernel size written out."""
    args = list(node.args)
    if len(args) < 3 or args[2]:
        return lw.frontend_convert(node)
    args[2] = args[1]
    original = node.args
    node.args = tuple(args)
    try:
        return lw.frontend_convert(node)
    finally:
        node.args = original


def _shift(left: bool):
    """x << s and x >> s of integers as PyTorch computes them: a shift outside the type's width gives 0 (left,
    and right of unsigned types) or the sign fill (right of signed types: s >= bits - 1 is x >> (bits - 1));
    a negative shift counts as outside. LLVM's shifts are undefined there. Not integers: the frontend."""

    def lower(lw, node):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point or val.dtype == torch.bool:
            return lw.frontend_convert(node)
        dtype, signed = _tvm_dtype(val.dtype), val.dtype.is_signed
        limit = torch.iinfo(val.dtype).bits - (1 if signed and not left else 0)
        op, emit = lw.R.op, lw.bb.emit
        x, s = (_operand(lw, a, dtype) if isinstance(a, fx.Node) else lw.R.const(a, dtype) for a in node.args[:2])
        zero = lw.R.const(0, dtype)
        inside = emit(op.logical_and(emit(op.greater_equal(s, zero)), emit(op.less(s, lw.R.const(limit, dtype)))))
        shifted = emit((op.left_shift if left else op.right_shift)(x, emit(op.where(inside, s, zero))))
        fill = emit(op.right_shift(x, lw.R.const(limit, dtype))) if signed and not left else zero
        return emit(op.where(inside, shifted, fill))

    return lower


_SHIFTS = {
    **{op: _shift(left=True) for op in (aten.bitwise_left_shift.Tensor, aten.bitwise_left_shift.Tensor_Scalar,
                                        aten.bitwise_left_shift.Scalar_Tensor, aten.__lshift__.Tensor,
                                        aten.__lshift__.Scalar)},
    **{op: _shift(left=False) for op in (aten.bitwise_right_shift.Tensor, aten.bitwise_right_shift.Tensor_Scalar,
                                         aten.bitwise_right_shift.Scalar_Tensor, aten.__rshift__.Tensor,
                                         aten.__rshift__.Scalar)},
}


ATEN_OPS: dict[Any, Callable] = {
    **_SHIFTS,
    aten.where.ScalarOther: _where_scalar,
    aten.where.ScalarSelf: _where_scalar,
    aten.where.Scalar: _where_scalar,
    aten.amax.default: _extreme("max"),
    aten.sort.default: _sort,
    aten.isnan.default: _float_test("isnan"),
    aten.pow.Tensor_Scalar: _pow_scalar,
    aten.isinf.default: _float_test("isinf"),
    aten.isfinite.default: _float_test("isfinite"),
    aten.topk.default: _topk,
    aten.amin.default: _extreme("min"),
    aten.prod.default: _prod,
    aten.prod.dim_int: _prod,
    aten.argmax.default: _arg_extreme("max"),
    aten.argmin.default: _arg_extreme("min"),
    aten.max.dim: _extreme_dim("max"),
    aten.min.dim: _extreme_dim("min"),
    aten.var.dim: _var,
    aten.var.correction: _var,
    aten.std.dim: _std,
    aten.std.correction: _std,
    aten.var_mean.correction: _var_mean,
    aten.var_mean.dim: _var_mean,
    aten.sum.dim_IntList: _in_float32,
    aten.mean.dim: _in_float32,
    aten.mean.default: _in_float32,
    aten.softmax.int: _in_float32,
    aten._softmax.default: _in_float32,
    aten.log_softmax.int: _in_float32,
    aten._log_softmax.default: _in_float32,
    aten.cumsum.default: _cumsum,
    aten.diff.default: _diff,
    aten.batch_norm.default: _batch_norm,
    aten.layer_norm.default: _layer_norm,
    aten.group_norm.default: _group_norm,
    aten.instance_norm.default: _instance_norm,
    aten.slice.Tensor: _slice,
    aten.narrow.default: _narrow,
    aten.select.int: _select,
    aten.unfold.default: _unfold,
    aten.numpy_T.default: _reversed_dims,
    aten.t.default: _reversed_dims,
    aten.index.Tensor: lower_index,
    aten.index_put.default: lower_index_put,
    aten.add.Tensor: _alpha("add", _promoting("add", _plus_zero("add"))),
    aten.add.Scalar: _alpha("add", _promoting("add", _plus_zero("add"))),
    aten.mul.Tensor: _promoting("multiply", _by_zero("multiply")),
    aten.mul.Scalar: _promoting("multiply", _by_zero("multiply")),
    aten.masked_fill.Scalar: _masked_fill_scalar,
    aten.full.default: _fill_nonfinite,
    aten.full_like.default: _fill_nonfinite,
    aten.new_full.default: _fill_nonfinite,
    aten.scatter_add.default: _scatter_add,
    aten.scatter_reduce.two: _scatter_reduce,
    aten.clamp.default: _clamp,
    aten.max_pool1d.default: _pool_default_stride,
    aten.max_pool2d.default: _pool_default_stride,
    aten.max_pool3d.default: _pool_default_stride,
    aten.div.Tensor_mode: _div_rounded,
    aten.div.Tensor: _promoting("divide", _by_zero("divide")),
    aten.div.Scalar: _promoting("divide", _by_zero("divide")),
    aten.sub.Tensor: _alpha("subtract", _promoting("subtract", _plus_zero("subtract", _same_operands("sub")))),
    aten.sub.Scalar: _alpha("subtract", _promoting("subtract", _plus_zero("subtract"))),
    aten.rsub.Scalar: _alpha("subtract", _promoting("subtract", swapped=True), swapped=True),
    aten.rsub.Tensor: _alpha("subtract", _promoting("subtract", swapped=True), swapped=True),
    aten.eq.Tensor: _compare("equal", _same_operands("eq")),
    aten.ne.Tensor: _compare("not_equal", _same_operands("ne")),
    aten.eq.Scalar: _compare("equal"),
    aten.ne.Scalar: _compare("not_equal"),
    **{getattr(aten, op).Tensor: _compare(relax) for op, relax in _ORDER.items()},
    **{getattr(aten, op).Scalar: _compare(relax) for op, relax in _ORDER.items()},
}

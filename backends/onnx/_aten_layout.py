"""Lowerings of ATen layout and indexing ops (views, slicing, gathers, scatters, sorting).

Views become Reshape/Transpose/Slice to the static shapes of the capture. The routing
ops of transformers' unfused Mixtral experts (sort, histc, index_put, and its
grouped_mm_fallback custom op) are here too, so -O0/-O1 Mixtral graphs export.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ._lowering import NotLowerable, lowerings_into

# OpOverload -> lowering, for the ops this module lowers (joined in backends/onnx/table.py)
LOWERINGS: dict = {}
lowers = lowerings_into(LOWERINGS)

aten = torch.ops.aten


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# --- shape and layout ----------------------------------------------------------------------

@lowers(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
        aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints,
        aten.view_as.default, aten.reshape_as.default, aten.unflatten.int)
def _reshape(ctx, node):
    return ctx.b.reshape(ctx.v(node.args[0]), ctx.shape(node))


@lowers(aten.expand.default, aten.expand_as.default, aten.broadcast_to.default)
def _expand(ctx, node):
    return ctx.b.op("Expand", ctx.v(node.args[0]), ctx.b.ints(ctx.shape(node)))


def _permuted(ctx, x, perm: list[int]):
    """x with its dims permuted: a Reshape when only size-1 dims move (the memory order stays,
    e.g. [B, 1, H, D] -> [B, H, 1, D] of a decode step's one token), else a Transpose."""
    shape = ctx.shape(x)
    moved = [p for p in perm if shape[p] != 1]
    if moved == sorted(moved):
        return ctx.b.reshape(ctx.v(x), [shape[p] for p in perm])
    return ctx.b.transpose(ctx.v(x), perm)


@lowers(aten.transpose.int)
def _transpose(ctx, node):
    a = ctx.args(node)
    rank = len(ctx.shape(a["input"]))
    perm = list(range(rank))
    d0, d1 = _dim(a["dim0"], rank), _dim(a["dim1"], rank)
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _permuted(ctx, a["input"], perm)


@lowers(aten.permute.default)
def _permute(ctx, node):
    a = ctx.args(node)
    rank = len(ctx.shape(a["input"]))
    return _permuted(ctx, a["input"], [_dim(d, rank) for d in a["dims"]])


@lowers(aten.numpy_T.default)
def _numpy_t(ctx, node):
    x = node.args[0]
    return _permuted(ctx, x, list(range(len(ctx.shape(x))))[::-1])


@lowers(aten.t.default)
def _t(ctx, node):
    x = node.args[0]
    return _permuted(ctx, x, [1, 0]) if len(ctx.shape(x)) == 2 else ctx.v(x)


@lowers(aten.slice.Tensor)
def _slice(ctx, node):
    a = ctx.args(node)
    shape = ctx.shape(a["input"])
    dim = _dim(a["dim"], len(shape))
    size = shape[dim]

    def clamp(i, default):
        i = default if i is None else int(i)
        i = i + size if i < 0 else i
        return min(max(i, 0), size)

    start, end = clamp(a["start"], 0), clamp(a["end"], size)
    if (start, end, a["step"]) == (0, size, 1):
        return ctx.v(a["input"])
    return ctx.b.slice(ctx.v(a["input"]), dim, start, max(end, start), a["step"])


@lowers(aten.narrow.default)
def _narrow(ctx, node):
    a = ctx.args(node)
    shape = ctx.shape(a["input"])
    dim = _dim(a["dim"], len(shape))
    start = a["start"] + shape[dim] if a["start"] < 0 else a["start"]
    return ctx.b.slice(ctx.v(a["input"]), dim, start, start + a["length"])


@lowers(aten.select.int)
def _select(ctx, node):
    a = ctx.args(node)
    rank = len(ctx.shape(a["input"]))
    return ctx.b.op("Gather", ctx.v(a["input"]), ctx.b.scalar(a["index"], torch.int64), axis=_dim(a["dim"], rank))


@lowers(aten.cat.default)
def _cat(ctx, node):
    a = ctx.args(node)
    dt = ctx.out_dtype(node)
    rank = len(ctx.shape(node))
    # torch accepts (and skips) legacy empty 1-D tensors among the inputs
    parts = [t for t in a["tensors"] if not (len(ctx.shape(t)) == 1 and ctx.shape(t)[0] == 0 and rank > 1)]
    return ctx.b.op("Concat", *(ctx.tensor(t, dt) for t in parts), axis=_dim(a["dim"], rank))


@lowers(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
def _split(ctx, node):
    x = node.args[0]
    rank = len(ctx.shape(x))
    dim = _dim(ctx.args(node)["dim"], rank)
    outs = node.meta["val"]
    sizes = [int(o.shape[dim]) if node.target != aten.unbind.int else 1 for o in outs]
    parts = ctx.b.op("Split", ctx.v(x), ctx.b.ints(sizes), axis=dim, outputs=len(sizes))
    parts = parts if isinstance(parts, tuple) else (parts,)
    if node.target == aten.unbind.int:
        parts = tuple(ctx.b.reshape(p, list(o.shape)) for p, o in zip(parts, outs))
    return parts


@lowers(aten.stack.default)
def _stack(ctx, node):
    a = ctx.args(node)
    rank = len(ctx.shape(node))
    dim = _dim(a["dim"], rank)
    dt = ctx.out_dtype(node)
    parts = [ctx.b.reshape(ctx.tensor(t, dt), ctx.shape(t)[:dim] + [1] + ctx.shape(t)[dim:]) for t in a["tensors"]]
    return ctx.b.op("Concat", *parts, axis=dim)


@lowers(aten.flip.default)
def _flip(ctx, node):
    a = ctx.args(node)
    x = ctx.v(a["input"])
    shape = ctx.shape(a["input"])
    for d in sorted({_dim(d, len(shape)) for d in a["dims"]}):
        x = ctx.b.slice(x, d, shape[d] - 1, -shape[d] - 1, -1)
    return x


@lowers(aten.repeat_interleave.self_int)
def _repeat_interleave(ctx, node):
    """Each element along dim repeated `repeats` times in place: [.., n, ..] -> [.., n, r, ..] -> [.., n * r, ..]."""
    a = ctx.args(node)
    if a.get("dim") is None:
        raise NotLowerable("repeat_interleave without dim (it flattens the tensor first)")
    shape = ctx.shape(a["input"])
    dim = _dim(a["dim"], len(shape))
    r = int(a["repeats"])
    b = ctx.b
    x = b.reshape(ctx.v(a["input"]), shape[:dim + 1] + [1] + shape[dim + 1:])
    x = b.op("Expand", x, b.ints(shape[:dim + 1] + [r] + shape[dim + 1:]))
    return b.reshape(x, ctx.shape(node))


@lowers(aten.repeat.default)
def _repeat(ctx, node):
    a = ctx.args(node)
    reps = list(a["repeats"])
    shape = ctx.shape(a["input"])
    x = ctx.v(a["input"])
    if len(reps) > len(shape):
        x = ctx.b.reshape(x, [1] * (len(reps) - len(shape)) + shape)
    return ctx.b.op("Tile", x, ctx.b.ints(reps))


@lowers(aten.triu.default, aten.tril.default)
def _trilu(ctx, node):
    a = ctx.args(node)
    return ctx.b.op("Trilu", ctx.v(a["input"]), ctx.b.scalar(a["diagonal"], torch.int64),
                    upper=1 if node.target == aten.triu.default else 0)


# --- indexing -------------------------------------------------------------------------------

def _checked_index(ctx, index, size: int):
    """index as int64, a negative entry replaced by `size`: these ops refuse negative indices in
    PyTorch (IndexError) and wrap them in ONNX, so ONNX Runtime is made to refuse them too."""
    b = ctx.b
    i = ctx.tensor(index, torch.int64)
    return b.op("Where", b.op("Less", i, b.scalar(0, torch.int64)), b.scalar(size, torch.int64), i)


@lowers(aten.embedding.default)
def _embedding(ctx, node):
    a = ctx.args(node)
    rows = ctx.shape(a["weight"])[0]
    return ctx.b.op("Gather", ctx.v(a["weight"]), _checked_index(ctx, a["indices"], rows), axis=0)


@lowers(aten.one_hot.default)
def _one_hot(ctx, node):
    """one_hot(i, C): Equal(i[..., None], [0, C)) as int64, plus a Gather of C zeros at the checked
    index, so an index outside [0, C) fails in ONNX Runtime as PyTorch raises (ONNX's OneHot gives
    that index a row of zeros, and wraps negative ones)."""
    b = ctx.b
    index = node.args[0]
    shape = ctx.shape(index)
    classes = int(node.meta["val"].shape[-1])
    hot = b.cast(b.op("Equal", b.reshape(ctx.tensor(index, torch.int64), [*shape, 1]),
                      b.const(torch.arange(classes), torch.int64)), torch.bool, torch.int64)
    zeros = b.op("Gather", b.const(torch.zeros(classes, dtype=torch.int64), torch.int64),
                 _checked_index(ctx, index, classes), axis=0)
    return b.op("Add", hot, b.reshape(zeros, [*shape, 1]))


@lowers(aten.index_select.default)
def _index_select(ctx, node):
    a = ctx.args(node)
    shape = ctx.shape(a["input"])
    dim = _dim(a["dim"], len(shape))
    return ctx.b.op("Gather", ctx.v(a["input"]), _checked_index(ctx, a["index"], shape[dim]), axis=dim)


@lowers(aten.gather.default)
def _gather(ctx, node):
    a = ctx.args(node)
    shape = ctx.shape(a["input"])
    dim = _dim(a["dim"], len(shape))
    return ctx.b.op("GatherElements", ctx.v(a["input"]), _checked_index(ctx, a["index"], shape[dim]), axis=dim)


class _Indexing:
    """x[indices] with integer index tensors anywhere (None: a whole dim), laid out for GatherND /
    ScatterND: the indexed dims moved to the front (`perm`), their indices stacked (`where`).

    PyTorch puts the broadcast index dims where the indexed dims were when those are adjacent
    (x[:, i, j] is [B, *I, D]), first otherwise (x[i, :, j] is [*I, C]); GatherND gives them
    first, so `to_torch` / `from_torch` move them between the two layouts.
    """

    def __init__(self, ctx, x, indices) -> None:
        indices = list(indices)
        while indices and indices[-1] is None:
            indices.pop()
        self.shape = ctx.shape(x)
        self.used = [k for k, i in enumerate(indices) if i is not None]
        if any(ctx.dtype(indices[k]) in (torch.bool, torch.uint8) for k in self.used):
            raise NotLowerable("boolean-mask indexing has a data-dependent shape")
        rest = [k for k in range(len(self.shape)) if k not in self.used]
        self.perm = self.used + rest
        self.bshape = list(torch.broadcast_shapes(*(ctx.val(indices[k]).shape for k in self.used)))
        adjacent = self.used == list(range(self.used[0], self.used[-1] + 1))
        self.before = self.used[0] if adjacent else 0  # dims of x that stay before the index dims
        b = ctx.b
        cols = [b.reshape(b.op("Expand", ctx.tensor(indices[k], torch.int64), b.ints(self.bshape)), self.bshape + [1])
                for k in self.used]
        self.where = b.op("Concat", *cols, axis=-1) if len(cols) > 1 else cols[0]

    def moved(self, ctx, x):
        """x with the indexed dims first."""
        return ctx.b.transpose(x, self.perm) if self.perm != sorted(self.perm) else x

    def back(self, ctx, x):
        inverse = [self.perm.index(k) for k in range(len(self.perm))]
        return ctx.b.transpose(x, inverse) if self.perm != sorted(self.perm) else x

    def _order(self, rank: int) -> list[int]:
        """GatherND's layout [*I, *rest] -> PyTorch's [*rest[:before], *I, *rest[before:]]."""
        n = len(self.bshape)
        return list(range(n, n + self.before)) + list(range(n)) + list(range(n + self.before, rank))

    def to_torch(self, ctx, gathered, rank: int):
        order = self._order(rank)
        return ctx.b.transpose(gathered, order) if order != sorted(order) else gathered

    def from_torch(self, ctx, values, rank: int):
        order = self._order(rank)
        inverse = [order.index(k) for k in range(rank)]
        return ctx.b.transpose(values, inverse) if order != sorted(order) else values

    def result_shape(self) -> list[int]:
        rest = [self.shape[k] for k in self.perm[len(self.used):]]
        return rest[:self.before] + self.bshape + rest[self.before:]


@lowers(aten.index.Tensor)
def _index(ctx, node):
    """x[i0, :, i1, ...] with integer index tensors: Gather for one, GatherND over the indexed dims
    moved first otherwise."""
    a = ctx.args(node)
    x, indices = a["input"], list(a["indices"])
    used = [k for k, i in enumerate(indices) if i is not None]
    if len(used) == 1 and ctx.dtype(indices[used[0]]) not in (torch.bool, torch.uint8):
        return ctx.b.op("Gather", ctx.v(x), ctx.tensor(indices[used[0]], torch.int64), axis=used[0])
    ix = _Indexing(ctx, x, indices)
    gathered = ctx.b.op("GatherND", ix.moved(ctx, ctx.v(x)), ix.where)
    return ix.to_torch(ctx, gathered, len(ctx.shape(node)))


# --- routing ops of the unfused (-O0/-O1) Mixtral MoE -------------------------------------

@lowers(aten.sort.default, aten.sort.stable)
def _sort(ctx, node):
    """A full-length TopK; ONNX's TopK keeps equal elements in index order (a stable sort)."""
    a = ctx.args(node)
    shape = ctx.shape(a["input"])
    dim = _dim(a.get("dim", -1), len(shape))
    values, indices = ctx.b.op("TopK", ctx.v(a["input"]), ctx.b.ints([shape[dim]]), axis=dim,
                               largest=1 if a.get("descending") else 0, sorted=1, outputs=2)
    return values, indices


@lowers(aten.histc.default)
def _histc(ctx, node):
    """Counts of x in `bins` equal bins over [min, max] (max itself in the last bin)."""
    a = ctx.args(node)
    lo, hi, bins = float(a["min"]), float(a["max"]), int(a["bins"])
    if not lo < hi:
        raise NotLowerable("histc without an explicit min < max takes its range from the data")
    dt = ctx.out_dtype(node)
    b = ctx.b
    f32 = torch.float32
    x = b.reshape(ctx.tensor(a["input"], f32), [-1, 1])
    idx = b.op("Floor", b.op("Mul", b.op("Sub", x, b.scalar(lo, f32)), b.scalar(bins / (hi - lo), f32)))
    idx = b.op("Min", idx, b.scalar(bins - 1, f32))
    inside = b.op("And", b.op("GreaterOrEqual", x, b.scalar(lo, f32)), b.op("LessOrEqual", x, b.scalar(hi, f32)))
    bin_ids = b.const(torch.arange(bins).reshape(1, bins), f32)
    hit = b.op("And", b.op("Equal", idx, bin_ids), inside)
    return b.op("ReduceSum", b.cast(hit, torch.bool, dt), b.ints([0]), keepdims=0)


@lowers(aten.index_copy.default)
def _index_copy(ctx, node):
    """x.index_copy(dim, index, source): ScatterElements along dim, index broadcast to source's shape.

    In place (index_copy_), it is a decode step's cache write: when the
    GroupQueryAttention that reads the cache takes the write over, nothing is emitted
    here (see `_fused.absorbed_cache_write`).
    """
    from ._fused import absorbed_cache_write

    a = ctx.args(node)
    x, index, source = a["input"], a["index"], a["source"]
    if absorbed_cache_write(ctx, node):
        return ctx.v(x)
    shape, src_shape = ctx.shape(x), ctx.shape(source)
    if len(src_shape) != len(shape):
        raise NotLowerable("a scalar index with a source of lower rank")
    dim = _dim(a["dim"], len(shape))
    b = ctx.b
    where = [1] * len(shape)
    where[dim] = src_shape[dim]
    indices = b.op("Expand", b.reshape(_checked_index(ctx, index, shape[dim]), where), b.ints(src_shape))
    return b.op("ScatterElements", ctx.v(x), indices, ctx.tensor(source, ctx.out_dtype(node)), axis=dim)


@lowers(aten.index_fill.int_Scalar, aten.index_fill.int_Tensor)
def _index_fill(ctx, node):
    """x.index_fill(dim, index, value): ScatterElements of value along dim (a negative index wraps
    and one out of range is an error, in both)."""
    a = ctx.args(node)
    shape = ctx.shape(a["input"])
    dim = _dim(a["dim"], len(shape))
    dt = ctx.out_dtype(node)
    n = ctx.val(a["index"]).numel()
    where, target = [1] * len(shape), list(shape)
    where[dim] = target[dim] = n
    b = ctx.b
    index = b.op("Expand", b.reshape(ctx.tensor(a["index"], torch.int64), where), b.ints(target))
    value = a["value"]
    value = b.reshape(ctx.tensor(value, dt), []) if isinstance(value, fx.Node) else ctx.tensor(value, dt)
    return b.op("ScatterElements", ctx.v(a["input"]), index, b.op("Expand", value, b.ints(target)), axis=dim)


@lowers(aten.index_put.default)
def _index_put(ctx, node):
    """x[i0, :, i1, ...] = values (accumulate: +=): ScatterND over the indexed dims moved first;
    x[mask] = value for a boolean mask over x's leading dims and one value: Where."""
    a = ctx.args(node)
    x, values, indices = a["input"], a["values"], list(a["indices"])
    b = ctx.b
    dt = ctx.out_dtype(node)
    masks = [i for i in indices if i is not None and ctx.dtype(i) in (torch.bool, torch.uint8)]
    if masks:
        return _masked_put(ctx, x, indices, values, a["accumulate"], dt)
    ix = _Indexing(ctx, x, indices)
    target = ix.result_shape()
    updates = ix.from_torch(ctx, b.op("Expand", ctx.tensor(values, dt), b.ints(target)), len(target))
    scattered = b.op("ScatterND", ix.moved(ctx, ctx.v(x)), ix.where, updates,
                     reduction="add" if a["accumulate"] else None)
    return ix.back(ctx, scattered)


def _masked_put(ctx, x, indices, values, accumulate: bool, dt):
    """x[mask] = value (or += value) with one boolean mask over x's leading dims and one value."""
    mask = indices[0]
    shape = ctx.shape(x)
    mshape = ctx.shape(mask) if len(indices) == 1 and mask is not None else None
    one_value = not isinstance(values, fx.Node) or ctx.val(values).numel() == 1
    if mshape is None or shape[:len(mshape)] != mshape or not one_value:
        raise NotLowerable("boolean-mask assignment other than x[mask] = one value")
    b = ctx.b
    m = b.reshape(ctx.tensor(mask, torch.bool), mshape + [1] * (len(shape) - len(mshape)))
    value = b.reshape(ctx.tensor(values, dt), []) if isinstance(values, fx.Node) else ctx.tensor(values, dt)
    xv = ctx.v(x)
    return b.op("Where", m, b.op("Add", xv, value) if accumulate else value, xv)


def _grouped_mm(ctx, node):
    """transformers' grouped_mm_fallback: rows [offs[g-1], offs[g]) of input times weight[g].

    Static shapes cannot slice by runtime offsets, so every expert multiplies every row
    ([E, S, N]) and each row then takes its own group's result (rows past offs[-1]: 0).
    """
    x, w, offs = node.args
    b = ctx.b
    s, n = ctx.shape(node)
    e = ctx.shape(w)[0]
    dt = ctx.out_dtype(node)
    every = b.op("MatMul", ctx.v(x), ctx.v(w))  # [S, K] x [E, K, N] -> [E, S, N]
    rows = b.const(torch.arange(s).reshape(s, 1), torch.int64)
    ends = b.reshape(ctx.tensor(offs, torch.int64), [1, e])
    group = b.op("ReduceSum", b.cast(b.op("LessOrEqual", ends, rows), torch.bool, torch.int64), b.ints([1]),
                 keepdims=1)  # [S, 1]: how many groups end at or before the row = its group
    covered = b.op("Less", group, b.scalar(e, torch.int64))
    pick = b.op("Expand", b.reshape(b.op("Min", group, b.scalar(e - 1, torch.int64)), [1, s, 1]), b.ints([1, s, n]))
    out = b.reshape(b.op("GatherElements", every, pick, axis=0), [s, n])
    return b.op("Where", covered, out, b.const(0, dt))


# ops of other libraries, by op name: their OpOverloads exist only once that library is
# imported, so they are matched by name
NAMED_LOWERINGS = {"transformers.grouped_mm_fallback": _grouped_mm}

"""Lowerings of ATen layout and indexing ops (views, slicing, gathers, scatters, sorting).

Views become Reshape/Transpose/Slice to the static shapes of the capture. The routing
ops of transformers' unfused Mixtral experts (sort, histc, index_put, and its
grouped_mm_fallback custom op) are here too, so -O0/-O1 Mixtral graphs export.
"""

from __future__ import annotations

import torch

from ._lowering import NAMED_LOWERINGS, NotLowerable, lowers

aten = torch.ops.aten


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# --- shape and layout ----------------------------------------------------------------------

@lowers(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
        aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints,
        aten.view_as.default, aten.reshape_as.default)
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

@lowers(aten.embedding.default)
def _embedding(ctx, node):
    a = ctx.args(node)
    return ctx.b.op("Gather", ctx.v(a["weight"]), ctx.v(a["indices"]), axis=0)


@lowers(aten.index_select.default)
def _index_select(ctx, node):
    a = ctx.args(node)
    rank = len(ctx.shape(a["input"]))
    return ctx.b.op("Gather", ctx.v(a["input"]), ctx.v(a["index"]), axis=_dim(a["dim"], rank))


@lowers(aten.gather.default)
def _gather(ctx, node):
    a = ctx.args(node)
    rank = len(ctx.shape(a["input"]))
    return ctx.b.op("GatherElements", ctx.v(a["input"]), ctx.v(a["index"]), axis=_dim(a["dim"], rank))


@lowers(aten.index.Tensor)
def _index(ctx, node):
    """x[i0, i1, ...] with integer index tensors: Gather for one, GatherND for a leading run."""
    a = ctx.args(node)
    x, indices = a["input"], list(a["indices"])
    while indices and indices[-1] is None:
        indices.pop()
    used = [k for k, i in enumerate(indices) if i is not None]
    if any(ctx.dtype(indices[k]) in (torch.bool, torch.uint8) for k in used):
        raise NotLowerable("boolean-mask indexing has a data-dependent shape")
    b = ctx.b
    if len(used) == 1:
        k = used[0]
        return b.op("Gather", ctx.v(x), ctx.tensor(indices[k], torch.int64), axis=k)
    if used != list(range(len(used))):
        raise NotLowerable("index tensors separated by slices (x[i, :, j]) are not supported")
    bshape = list(torch.broadcast_shapes(*(ctx.val(indices[k]).shape for k in used)))
    cols = [b.reshape(b.op("Expand", ctx.tensor(indices[k], torch.int64), b.ints(bshape)), bshape + [1])
            for k in used]
    return b.op("GatherND", ctx.v(x), b.op("Concat", *cols, axis=-1))


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
    indices = b.op("Expand", b.reshape(ctx.tensor(index, torch.int64), where), b.ints(src_shape))
    return b.op("ScatterElements", ctx.v(x), indices, ctx.tensor(source, ctx.out_dtype(node)), axis=dim)


@lowers(aten.index_put.default)
def _index_put(ctx, node):
    """x[i0, i1, ...] = values (accumulate: +=) for a leading run of integer index tensors."""
    a = ctx.args(node)
    indices = list(a["indices"])
    while indices and indices[-1] is None:
        indices.pop()
    if not indices or any(i is None or ctx.dtype(i) in (torch.bool, torch.uint8) for i in indices):
        raise NotLowerable("only a leading run of integer index tensors is supported")
    b = ctx.b
    dt = ctx.out_dtype(node)
    shape = ctx.shape(a["input"])
    bshape = list(torch.broadcast_shapes(*(ctx.val(i).shape for i in indices)))
    cols = [b.reshape(b.op("Expand", ctx.tensor(i, torch.int64), b.ints(bshape)), bshape + [1]) for i in indices]
    where = b.op("Concat", *cols, axis=-1) if len(cols) > 1 else cols[0]
    updates = b.op("Expand", ctx.tensor(a["values"], dt), b.ints(bshape + shape[len(indices):]))
    return b.op("ScatterND", ctx.v(a["input"]), where, updates,
                reduction="add" if a["accumulate"] else None)


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


NAMED_LOWERINGS["transformers.grouped_mm_fallback"] = _grouped_mm

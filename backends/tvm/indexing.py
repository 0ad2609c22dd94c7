"""Indices as PyTorch reads them: negative ones normalized, out-of-range ones an error.

TVM's `take` and friends read index -2 as a memory offset (x[:, :, [-2]] came back as
row 4 of 6) and never check bounds (a token id past the vocabulary gave garbage
logits). For each indexing op, every index tensor it reads is

  * normalized where PyTorch accepts negatives (index, index_put, take: i < 0 -> i + n),
  * clamped into [0, n), so the kernel never reads or writes outside its tensor,
  * and, unless it is a weight (checked here, once), reduced to its [min, max], an extra
    output of `main` that the runtime compares with the valid range after every call,
    raising InputError naming the user input the indices come from (TvmModel).

INDEXED lists, per frontend op, where its indices are and what they index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from flashc.backends.tvm.common import _dtype, _shape, refuse
from flashc.ir import module_path, op_name, source_location, upstream


@dataclass(frozen=True)
class Indexed:
    """One index argument of an op: where it is (`index`, a position in args; `item` when it
    is a list of them), the axis it indexes (`axis(node, k)` for list item k, or None for
    the flattened tensor) and whether negative indices count from the end."""

    index: int
    data: int  # the argument holding the indexed tensor
    axis: Callable[[fx.Node, int], int | None]
    negative: bool
    listed: bool = False


def _arg_axis(position: int, default: int = 0):
    return lambda node, _k: node.args[position] if len(node.args) > position else node.kwargs.get("dim", default)


INDEXED: dict[str, Indexed] = {
    "embedding.default": Indexed(1, 0, lambda _n, _k: 0, negative=False),
    "index.Tensor": Indexed(1, 0, lambda _n, k: k, negative=True, listed=True),
    "index_put.default": Indexed(1, 0, lambda _n, k: k, negative=True, listed=True),
    "index_put_.default": Indexed(1, 0, lambda _n, k: k, negative=True, listed=True),
    "index_select.default": Indexed(2, 0, _arg_axis(1), negative=False),
    "gather.default": Indexed(2, 0, _arg_axis(1), negative=False),
    "scatter.src": Indexed(2, 0, _arg_axis(1), negative=False),
    "scatter.value": Indexed(2, 0, _arg_axis(1), negative=False),
    "scatter_add.default": Indexed(2, 0, _arg_axis(1), negative=False),
    "scatter_reduce.two": Indexed(2, 0, _arg_axis(1), negative=False),
    "take.default": Indexed(1, 0, lambda _n, _k: None, negative=True),
}


def guarded_indices(lw, node: fx.Node) -> dict[fx.Node, Any]:
    """Relax values to bind node's index arguments to while the frontend lowers it: normalized
    and clamped; records a [min, max] check per non-weight index tensor in lw.checks."""
    spec = INDEXED.get(getattr(node.target, "__name__", ""))
    if spec is None or len(node.args) <= spec.index:
        return {}
    data = lw.value(node.args[spec.data])
    items = node.args[spec.index]
    items = list(items) if spec.listed else [items]
    bound: dict[fx.Node, Any] = {}
    sizes: dict[fx.Node, int] = {}
    for k, idx in enumerate(items):
        if not isinstance(idx, fx.Node) or _index_dtype(lw, idx) is None:
            continue  # a None (whole axis) or a boolean mask
        axis = spec.axis(node, k)
        n = _numel(data) if axis is None else _shape(data)[axis % len(_shape(data))]
        if idx in sizes:
            if sizes[idx] != n:
                raise refuse(node, f"index tensor {idx.name} indexes axes of different sizes")
            continue
        sizes[idx] = n
        bound[idx] = _guard(lw, node, idx, n, spec.negative)
    return bound


def _index_dtype(lw, idx: fx.Node) -> str | None:
    dtype = _dtype(lw.value(idx))
    return dtype if dtype.startswith(("int", "uint")) and dtype != "uint8" else None


def _numel(x) -> int:
    n = 1
    for s in _shape(x):
        n *= s
    return n


def _guard(lw, node: fx.Node, idx: fx.Node, n: int, negative: bool):
    op, R = lw.R.op, lw.R
    low = -n if negative else 0
    if lw.is_weight(idx):  # known now: check once, store normalized
        t = lw.weight_value(idx)
        if t.numel() and (int(t.min()) < low or int(t.max()) >= n):
            raise refuse(node, f"its constant indices {int(t.min())}..{int(t.max())} are outside [{low}, {n}) "
                                "(PyTorch raises IndexError here)", "fix the model")
        return R.const(torch.where(t < 0, t + n, t).numpy())
    raw = lw.value(idx)
    dtype = _dtype(raw)
    if _numel(raw) == 0:
        return raw
    row = lw.bb.emit(op.reshape(raw, [1, _numel(raw)]))  # one row: a row reduction the CPU rules schedule
    extremes = lw.bb.emit(op.astype(op.concat([op.min(row, axis=[1]), op.max(row, axis=[1])], axis=0), "int64"))
    lw.checks.append((extremes, _describe(lw, node, idx, low, n)))
    value = raw
    if negative:
        value = lw.bb.emit(op.where(op.less(raw, R.const(0, dtype)), op.add(raw, R.const(n, dtype)), raw))
    return lw.bb.emit(op.minimum(op.maximum(value, R.const(0, dtype)), R.const(max(n - 1, 0), dtype)))


def _describe(lw, node: fx.Node, idx: fx.Node, low: int, high: int) -> dict[str, Any]:
    """What the runtime needs to say which input held indices out of range, and where they go."""
    inputs = [n.name for n in lw.program.input_nodes() if n in upstream([idx])]
    where = module_path(node)
    return {"op": op_name(node), "node": node.name, "where": (f"{where} at " if where else "") + source_location(node),
            "input": inputs[0] if len(inputs) == 1 else None, "low": low, "high": high}


def out_of_range_message(check: dict[str, Any], lo: int, hi: int) -> str:
    who = f"input {check['input']!r}: " if check.get("input") else ""
    fix = (f"token ids must be below the vocabulary size, {check['high']}" if check["op"] == "aten.embedding"
           else "pass indices in range")
    return (f"{who}indices {lo}..{hi} are outside [{check['low']}, {check['high']}), the range "
            f"{check['op']} (node {check['node']}, {check['where']}) accepts; PyTorch raises IndexError here: {fix}")


def lower_index(lw, node: fx.Node):
    """aten.index.Tensor (x[i, j], x[:, i], x[..., i, :, j]) with PyTorch's advanced indexing. One index
    tensor is a `take` along its axis; more than one, with whole dims between or around them, index
    every dim with a full index tensor (`_full_indices`): TVM's frontend takes them one after another
    (x[:, i, j] came out [B, n, n] for PyTorch's [B, n]) or cannot broadcast them (unfold's im2col)."""
    op = lw.R.op
    with lw.substituted(guarded_indices(lw, node)):
        data = lw.value(node.args[0])
        indices = [lw.value(i) if isinstance(i, fx.Node) else None for i in node.args[1]]
    if any(i is not None and not _dtype(i).startswith(("int", "uint")) for i in indices):
        raise refuse(node, "indexing with a boolean mask (its result's shape depends on the mask's values)")
    advanced = [k for k, i in enumerate(indices) if i is not None]
    if len(advanced) == 1:
        return lw.bb.emit(op.take(data, indices[advanced[0]], axis=advanced[0]))
    full, _ = _full_indices(lw, data, indices)
    return lw.bb.emit(op.index_tensor(data, full))


def lower_index_put(lw, node: fx.Node):
    """aten.index_put(data, indices, values, accumulate) with PyTorch's advanced indexing:
    indices may be fewer than data's dims or None (a whole dim), as `x[:, idx] = v` gives;
    TVM's index_put wants one index tensor per dim (`_full_indices`), and values are broadcast
    to the indexing result's shape."""
    op, R = lw.R.op, lw.R
    with lw.substituted(guarded_indices(lw, node)):
        data = lw.value(node.args[0])
        indices = [lw.value(i) if isinstance(i, fx.Node) else None for i in node.args[1]]
    values = lw.value(node.args[2])
    accumulate = bool(node.args[3]) if len(node.args) > 3 else bool(node.kwargs.get("accumulate", False))
    if any(i is not None and not _dtype(i).startswith(("int", "uint")) for i in indices):
        raise refuse(node, "index_put with a boolean mask")
    full, result = _full_indices(lw, data, indices)
    values = lw.bb.emit(op.broadcast_to(op.astype(values, _dtype(data)), result))
    return lw.bb.emit(op.index_put(data, R.Tuple(full), values, accumulate))


def _full_indices(lw, data, indices: list) -> tuple[list, list[int]]:
    """One int64 index tensor per dim of data, each of the indexing result's shape, for PyTorch's
    advanced indexing by `indices` (tensors, or None for a whole dim; fewer than data's dims: the
    rest whole): the index tensors broadcast together, their dims where they sit when they sit
    together, else first; whole dims as ramps along their own result dim. Returns them and the
    result's shape."""
    op, R = lw.R.op, lw.R
    shape = _shape(data)
    indices = list(indices) + [None] * (len(shape) - len(indices))
    advanced = [k for k, i in enumerate(indices) if i is not None]
    broadcast = list(torch.broadcast_shapes(*[tuple(_shape(indices[k])) for k in advanced]))
    together = advanced == list(range(advanced[0], advanced[-1] + 1))
    sliced = [k for k, i in enumerate(indices) if i is None]
    if together:  # x[:, i, j, :]: the index dims replace the indexed ones in place
        before = [k for k in sliced if k < advanced[0]]
        after = [k for k in sliced if k > advanced[-1]]
    else:  # x[i, :, j]: the index dims come first
        before, after = [], sliced
    result = [shape[k] for k in before] + broadcast + [shape[k] for k in after]
    position = {k: p for p, k in enumerate(before)}
    position.update({k: len(before) + len(broadcast) + p for p, k in enumerate(after)})
    full = []
    for k, idx in enumerate(indices):
        if idx is None:
            ramp = R.const(torch.arange(shape[k]).numpy())
            view = [1] * len(result)
            view[position[k]] = shape[k]
            full.append(lw.bb.emit(op.broadcast_to(op.reshape(ramp, view), result)))
        else:
            idx = lw.bb.emit(op.astype(idx, "int64"))
            spread = [1] * len(before) + broadcast + [1] * len(after)
            full.append(lw.bb.emit(op.broadcast_to(op.reshape(op.broadcast_to(idx, broadcast), spread), result)))
    return full, result

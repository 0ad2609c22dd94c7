"""In-place writes, carried into the ONNX graph with PyTorch's semantics or refused.

flashc's IR is torch.export's training IR, not functionalized: `add_`, `copy_` into a
slice, `index_copy_`, `masked_fill_` stay in the graph, in the order they run, and a
write through a view lands in the storage the view was taken from. ONNX values are
immutable, so each write becomes a new value:

* the written tensor's new value is the functional op (add_ -> add) applied to its
  current value;
* a write through a view (slice, select, transpose, view, ...) is scattered back into
  its *root*, the placeholder or op result that owns the storage, at the elements the
  view covers: a constant index map, the view evaluated on the root's element indices
  with the capture's strides (so a reshape that copies is a copy, as in PyTorch);
* the root, and every alias of it taken before the write and read after it, are bound
  to their new values, so reads after the write see it (the graph is lowered in order);
* a root that is a user input or a weight/buffer ends as a `present.<name>` output,
  which the runtime writes back into the caller's tensor or the compiled model's state.

Refused with UnsupportedOpError naming the op and its line: ops that write an argument
other than their first or change a tensor's shape in place (unsqueeze_), in-place ops
without a functional lowering, writes through overlapping views (expand), and views
whose layout cannot be evaluated when their storage is written.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from flashc.storage import LayoutError, Storage

from ._lowering import LoweringContext, NotLowerable


def lower_write(ctx: LoweringContext, storage: Storage, node: fx.Node, lowering) -> Any:
    """Lower the in-place op node: its functional form, scattered back into the root's storage;
    returns the written tensor's new value (what node, an alias of it, evaluates to)."""
    target = node.args[0]
    root = storage.root[node]
    new = lowering(ctx, node)
    b = ctx.b
    root_shape = ctx.shape(root)
    where = _positions(storage, target)
    if where is None:
        new_root = new if ctx.shape(target) == root_shape else b.reshape(new, root_shape)
    else:
        flat = where.reshape(-1)
        if flat.unique().numel() != flat.numel():
            raise NotLowerable(f"it writes through {target.name}, a view whose elements overlap (expand); "
                               "write to a copy (.clone()) instead")
        scattered = b.op("ScatterElements", b.reshape(ctx.v(root), [-1]), b.const(flat, torch.int64),
                         b.reshape(new, [-1]), axis=0)
        new_root = b.reshape(scattered, root_shape)
    ctx.values[root] = new_root
    for alias in storage.stale_after(node):
        ctx.values[alias] = new if alias is target else _read(ctx, storage, alias, new_root)
    return new


def _read(ctx: LoweringContext, storage: Storage, alias: fx.Node, new_root) -> Any:
    """alias's value re-read from its root's new value."""
    layout = storage.layout.get(alias)
    if isinstance(layout, list):
        return tuple(_read_one(ctx, storage, alias, new_root, part) for part in layout)
    return _read_one(ctx, storage, alias, new_root, layout)


def _read_one(ctx, storage, alias, new_root, layout):
    b = ctx.b
    where = _positions(storage, alias, layout)
    if where is None:
        root_shape = ctx.shape(storage.root[alias])
        shape = [int(d) for d in layout.shape] if layout is not None else root_shape
        return new_root if shape == root_shape else b.reshape(new_root, shape)
    return b.op("Gather", b.reshape(new_root, [-1]), b.const(where, torch.int64), axis=0)


def _positions(storage: Storage, node: fx.Node, layout=None):
    try:
        return storage.positions(node, layout)
    except LayoutError as e:
        raise NotLowerable(str(e)) from None

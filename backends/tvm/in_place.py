"""In-place writes in a TVM module, carried with PyTorch's semantics or refused.

flashc's IR keeps PyTorch's in-place ops (`add_`, `index_put_`, `copy_` into a slice, ...).
A Relax module has values, not storage, so each write becomes a new value, as in the ONNX
backend (both read the graph's storage from flashc.storage):
  * the written tensor's new value is the functional op (add_ -> add, copy_ -> the source
    cast and broadcast) applied to its current value;
  * a write through a view (slice, select, view, transpose, ...) is scattered into its
    *root*, the placeholder or op result owning the storage, at the elements the view
    covers (a constant index map: `Storage.positions`);
  * the root, and every alias of it taken before the write and read after it, are bound
    to their new values, so reads after the write see it (the graph is lowered in order);
  * a root that is a user input or a weight/buffer (state: a KV cache) is also returned
    by the module, after the model's outputs; the runtime writes it into the caller's
    tensor or the state tensor (runtime.TvmModel).

Refused at compile time with UnsupportedOpError naming the op, the node, its source line
and the way out (the 'cpu' target runs them as PyTorch does): ops that write an argument
other than their first or change a shape in place, writes through overlapping views
(expand), views whose layout cannot be evaluated when their storage is written, and
in-place ops without a functional lowering.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from flashc.aliasing import functional_form
from flashc.backends.tvm.common import _dtype, _shape
from flashc.errors import UnsupportedOpError
from flashc.ir import Program, module_path, op_name, source_location
from flashc.storage import LayoutError, Storage, is_write

aten = torch.ops.aten


class InPlaceWrites:
    """The in-place writes of a Program's graph, checked once; lowers them."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.storage = Storage(program.graph)
        self.problems: dict[fx.Node, str] = {}
        for node, why in self.storage.problems:
            self.problems.setdefault(node, why)
        for root, writes in self.storage.writes.items():
            if root.op == "get_attr":  # neither an input nor state the runtime writes back
                self.problems.setdefault(writes[0], f"it writes {root.target}, a constant of the graph")
        # placeholders written (graph order): the module returns their final values
        self.written_placeholders = [n for n in program.graph.nodes
                                     if n.op == "placeholder" and n in self.storage.writes]
        self.state = {n for n in self.written_placeholders if n.name in program.params}

    def is_write(self, node: fx.Node) -> bool:
        return is_write(node)

    def refuse_unsupported(self) -> None:
        """UnsupportedOpError for the first write that cannot be carried (in graph order)."""
        if self.problems:
            node = min(self.problems, key=self.storage.order.__getitem__)
            self._refuse(node, self.problems[node], len(self.problems) - 1)

    @staticmethod
    def _refuse(node: fx.Node, why: str, more: int = 0):
        where = module_path(node)
        raise UnsupportedOpError(
            f"TVM backend cannot run in-place {op_name(node)} (node {node.name})" + (f" in {where}" if where else "")
            + f" at {source_location(node)}: {why}" + (f" ({more} more in-place write(s) like it)" if more else "")
            + "; use target 'cpu', which runs in-place ops as PyTorch does")

    def lower(self, lw, node: fx.Node):
        """The write as its functional op, scattered into its root's storage; returns the written
        tensor's new value (what node, an alias of it, evaluates to)."""
        if node in self.problems:
            self.refuse_unsupported()
        new = self._functional(lw, node)
        storage, target = self.storage, node.args[0]
        root = storage.root[node]
        root_shape = list(storage.layout_of(root).shape)
        where = self._positions(node, target)
        op = lw.R.op
        if where is None:
            new_root = new if _shape(new) == root_shape else lw.bb.emit(op.reshape(new, root_shape))
        else:
            flat = where.reshape(-1)
            if flat.unique().numel() != flat.numel():
                self._refuse(node, f"it writes through {target.name}, a view whose elements overlap (expand); "
                                   "write to a copy (.clone()) instead")
            scattered = lw.bb.emit(op.scatter_elements(lw.bb.emit(op.reshape(lw.env[root], [-1])),
                                                       lw.R.const(flat.numpy()),
                                                       lw.bb.emit(op.reshape(new, [-1])), axis=0))
            new_root = lw.bb.emit(op.reshape(scattered, root_shape))
        lw.env[root] = new_root
        for alias in storage.stale_after(node):
            lw.env[alias] = new if alias is target else self._read(lw, node, alias, new_root)
        return new

    def _positions(self, node: fx.Node, view: fx.Node, layout=None):
        try:
            return self.storage.positions(view, layout)
        except LayoutError as e:
            self._refuse(node, str(e))

    def _read(self, lw, node: fx.Node, alias: fx.Node, new_root):
        """alias's value re-read from its root's new value."""
        layout = self.storage.layout.get(alias)
        if isinstance(layout, list):
            return tuple(self._read_one(lw, node, alias, new_root, part) for part in layout)
        return self._read_one(lw, node, alias, new_root, layout)

    def _read_one(self, lw, node, alias, new_root, layout):
        op = lw.R.op
        where = self._positions(node, alias, layout)
        if where is None:
            shape = [int(d) for d in layout.shape] if layout is not None else _shape(new_root)
            return new_root if shape == _shape(new_root) else lw.bb.emit(op.reshape(new_root, shape))
        return lw.bb.emit(op.take(lw.bb.emit(op.reshape(new_root, [-1])), lw.R.const(where.numpy()), axis=0))

    def _functional(self, lw, node: fx.Node):
        """The written tensor's new value: node's op in its functional form on the current values."""
        functional = functional_form(node.target)
        if node.target == aten.copy_.default:
            return self._copy(lw, node)
        if functional is not None and (functional in lw.own or functional.__name__ in lw.frontend.convert_map):
            in_place, node.target = node.target, functional
            try:  # converters read node.target: lowered as the functional op throughout
                return lw._check(node, lw.convert(node))
            finally:
                node.target = in_place
        saved = dict(lw.env)  # the frontend's own in-place converter; undo what it rebinds (lower() rebinds)
        value = lw._check(node, lw.convert(node))
        lw.env.clear()
        lw.env.update(saved)
        return value

    def _copy(self, lw, node: fx.Node):
        """copy_(dst, src): src cast to dst's dtype and broadcast to its shape."""
        dst, src = lw.value(node.args[0]), lw.value(node.args[1])
        op = lw.R.op
        if _dtype(src) != _dtype(dst):
            src = lw.bb.emit(op.astype(src, _dtype(dst)))
        if _shape(src) != _shape(dst):
            src = lw.bb.emit(op.broadcast_to(src, _shape(dst)))
        return src

"""Where every tensor of a graph lives: its root storage and its layout there, and the writes to each root.

flashc's IR is torch.export's training IR, not functionalized: `add_`, `copy_` into a slice, `index_copy_`,
`masked_fill_` stay in the graph, in the order they run, and a write through a view lands in the storage the
view was taken from. A backend whose values are immutable (ONNX, TVM's Relax) carries each write as a new value
of the written tensor's *root* (the placeholder or op result that owns the storage): `Storage` says which root
each node lives in, where in it (a meta tensor with the node's shape, strides and offset, evaluated by running
the view ops on meta tensors: PyTorch decides what aliases), and which root elements a view covers
(`positions`, a constant index map the backend scatters into and gathers from).

What it cannot tell (a layout that depends on data, symbolic sizes, an op writing an argument other than its
first or changing a shape in place) it lists in `problems`, for the backend to refuse by name.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx


class LayoutError(Exception):
    """A view's elements cannot be placed in its root's storage (they reach outside it)."""


_META = torch.device("meta")


def _schema(node: fx.Node):
    return node.target._schema if isinstance(node.target, torch._ops.OpOverload) else None


def is_write(node: fx.Node) -> bool:
    """Whether node calls an op with a mutable schema (add_, copy_, index_put_, sort.values)."""
    schema = _schema(node)
    return schema is not None and schema.is_mutable


def _writes_first_argument_only(schema) -> bool:
    """self is written, nothing else is, and the op returns self (`Tensor(a!) self -> Tensor(a!)`)."""
    written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    returns = schema.returns
    return (written == [0] and len(returns) == 1 and returns[0].alias_info is not None
            and returns[0].alias_info.is_write)


def _is_view(node: fx.Node) -> bool:
    """Whether node's op may return a view of its first argument (reshape, slice, to, split, ...)."""
    schema = _schema(node)
    if schema is None or schema.is_mutable or not schema.returns or not schema.arguments:
        return False
    ret, first = schema.returns[0].alias_info, schema.arguments[0].alias_info
    return ret is not None and not ret.is_write and first is not None and not first.is_write


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


class _Unknown(Exception):
    """A layout that cannot be evaluated (no static shape, a data-dependent argument)."""


class Storage:
    """Which storage every tensor of a graph lives in, and the writes to each.

    root[n]: the placeholder or op result owning n's storage (n itself when n allocates).
    layout[n]: a meta tensor with n's shape, strides and offset in its root's storage
    (a list of them for split/unbind/chunk). writes[r]: the writes to root r, in graph
    order; aliases[r]: the nodes other than r that live in r's storage, in graph order.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.order: dict[fx.Node, int] = {}
        self.root: dict[fx.Node, fx.Node] = {}
        self.layout: dict[fx.Node, Any] = {}
        self.writes: dict[fx.Node, list[fx.Node]] = {}
        self.aliases: dict[fx.Node, list[fx.Node]] = {}
        self.problems: list[tuple[fx.Node, str]] = []
        self._unknown: list[tuple[fx.Node, fx.Node, str]] = []  # (view, its input, why)
        self._indices: dict[fx.Node, torch.Tensor] = {}  # root -> storage position -> root element
        for i, node in enumerate(graph.nodes):
            self.order[node] = i
            if node.op == "call_function":
                self._visit(node)
            else:
                self.root[node] = node
        for view, source, why in self._unknown:
            if self.root.get(source) in self.writes or view in self.writes:
                self.problems.append((view, f"cannot tell whether it aliases {source.name}, which is written "
                                            f"in place ({why})"))

    # --- analysis -----------------------------------------------------------------------

    def _alias(self, node: fx.Node, source: fx.Node, layout) -> None:
        self.root[node] = r = self.root.get(source, source)
        self.layout[node] = layout
        self.aliases.setdefault(r, []).append(node)

    def _visit(self, node: fx.Node) -> None:
        self.root[node] = node
        if node.target is operator.getitem:
            source, index = node.args
            if isinstance(self.layout.get(source), list) and self.root[source] is not source:
                self._alias(node, source, self.layout[source][index])
            return
        schema = _schema(node)
        if schema is None:
            return
        if schema.is_mutable:
            self._visit_write(node, schema)
        elif _is_view(node):
            self._visit_view(node)

    def _visit_write(self, node: fx.Node, schema) -> None:
        target = node.args[0] if node.args else None
        if not _writes_first_argument_only(schema) or not isinstance(target, fx.Node):
            self.problems.append((node, "it writes in place an argument other than the tensor it is called on "
                                        "(an out= variant or a list of tensors)"))
            return
        before, after = target.meta.get("val"), node.meta.get("val")
        if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and (
                before.shape != after.shape or before.stride() != after.stride()):
            self.problems.append((node, "it changes the shape of a tensor in place; use the out-of-place op "
                                        "(unsqueeze_ -> unsqueeze)"))
            return
        try:
            layout = self.layout_of(target)
        except _Unknown as e:
            if self.root.get(target, target) is not target:
                self.problems.append((node, f"the view it writes has no static layout ({e})"))
                return
            layout = None  # the whole of a tensor whose layout was not recorded
        self._alias(node, target, layout)
        self.writes.setdefault(self.root[node], []).append(node)

    def _visit_view(self, node: fx.Node) -> None:
        source = node.args[0]
        if not isinstance(source, fx.Node):
            return
        try:
            out = self._evaluate(node)
            mine = self.layout_of(source)
        except _Unknown as e:
            self._unknown.append((node, source, str(e)))
            return
        outs = out if isinstance(out, (list, tuple)) else [out]
        if not outs or not all(isinstance(o, torch.Tensor) for o in outs):
            return
        shared = [_same_storage(o, mine) for o in outs]
        if all(shared):
            self._alias(node, source, list(outs) if isinstance(out, (list, tuple)) else out)
        elif any(shared):
            self._unknown.append((node, source, "some of its results share storage with it, some do not"))

    def layout_of(self, node: fx.Node):
        """node's meta layout; a node that allocates gets a fresh meta tensor like its value."""
        if self.layout.get(node) is not None:
            return self.layout[node]
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise _Unknown(f"{node.name} has no recorded tensor value")
        try:
            self.layout[node] = torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype,
                                                    device=_META)
        except Exception as e:  # symbolic sizes
            raise _Unknown(f"{node.name} has no static shape ({e})") from None
        return self.layout[node]

    def _evaluate(self, node: fx.Node):
        """The view op run on meta tensors laid out as its inputs: PyTorch decides what aliases."""
        def meta(a):
            if isinstance(a, fx.Node):
                return self.layout_of(a)
            if isinstance(a, torch.device):
                return _META
            return a
        args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), meta)
        try:
            return node.target(*args, **kwargs)
        except Exception as e:
            raise _Unknown(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") from None

    # --- questions the lowering asks --------------------------------------------------------

    def written_placeholders(self, nodes: list[fx.Node]) -> list[fx.Node]:
        return [n for n in nodes if n in self.writes]

    def read_after(self, root: fx.Node, write: fx.Node, live: set[fx.Node]) -> bool:
        """Whether a live node reads root's storage after write."""
        at = self.order[write]
        return any(self.order[u] > at and u in live
                   for n in [root, *self.aliases.get(root, [])] for u in n.users)

    def stale_after(self, write: fx.Node) -> list[fx.Node]:
        """The aliases of write's root taken before write and read after it: their values must be read again."""
        at = self.order[write]
        return [alias for alias in self.aliases.get(self.root[write], [])
                if self.order[alias] < at and any(self.order[u] > at for u in alias.users)]

    def positions(self, node: fx.Node, layout=None) -> torch.Tensor | None:
        """The root elements (flat, row-major) that node's elements are, in node's shape;
        None when node is the whole root in row-major order (a reshape of it at most)."""
        root = self.root[node]
        layout = self.layout.get(node) if layout is None else layout
        if layout is None:  # a write to a whole tensor without a recorded layout
            return None
        base = self.layout_of(root)
        if layout.numel() == base.numel() and layout.storage_offset() == 0 and (
                layout.shape == base.shape and layout.stride() == base.stride()
                or layout.is_contiguous() and base.is_contiguous()):
            return None
        if root not in self._indices:
            size = base.untyped_storage().nbytes() // base.element_size()
            storage = torch.full((size,), -1, dtype=torch.int64)
            storage.as_strided(base.shape, base.stride()).copy_(torch.arange(base.numel()).view(base.shape))
            self._indices[root] = storage
        found = self._indices[root].as_strided(layout.shape, layout.stride(), layout.storage_offset())
        if bool((found < 0).any()):
            raise LayoutError(f"{node.name} reaches storage outside {root.name}'s elements")
        return found.clone()

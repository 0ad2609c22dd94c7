"""Mutation and aliasing facts of a Program's graph.

flashc's IR is torch.export's training IR: in-place ops (`index_copy_`, `copy_` into a
slice, `add_`, `masked_fill_`, ...) stay in the graph, and the graph's node order is the
order they run in. A write through a view lands in the storage the view was taken
from, and a read sees the writes placed before it, even when no edge connects the two.

`MutationInfo` answers the questions passes must ask before they fold, merge, drop or
move anything: which storage a value lives in (its *root*: the placeholder or the node
that allocated it, following views, read from the ops' schemas), which roots are
written, and whether a write to a root lies between two points of the graph.

The invariant every pass keeps (checked by `check_writes_kept` and relied on by
`cleanup`, `fusion`, `merge`):
  * no read of a written storage is folded into a constant, merged with another read,
    or moved across a write to that storage;
  * no value that is later written is folded, merged or dropped in favour of another
    value (copies that are written stay copies);
  * every write stays, to the same storage, in the same order relative to the reads.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx


def _schema(node: fx.Node):
    target = node.target
    return target._schema if isinstance(target, torch._ops.OpOverload) else None


def _aliased_argument(node: fx.Node) -> fx.Node | None:
    """The argument node whose storage node's (first) result aliases, per the op's schema."""
    schema = _schema(node)
    if schema is None or not schema.returns:
        return None
    info = schema.returns[0].alias_info
    if info is None:
        return None
    sets = set(info.before_set)
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not (set(arg.alias_info.before_set) & sets):
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node):
            return value
        if isinstance(value, (list, tuple)):  # e.g. a TensorList input
            return next((v for v in value if isinstance(v, fx.Node)), None)
    return None


def written_arguments(node: fx.Node) -> list[fx.Node]:
    """The argument nodes an op writes in place (schema `Tensor(a!)`)."""
    schema = _schema(node)
    if schema is None or not schema.is_mutable:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        out.extend(v for v in values if isinstance(v, fx.Node))
    return out


def is_write(node: fx.Node) -> bool:
    schema = _schema(node)
    return schema is not None and schema.is_mutable


@dataclass
class MutationInfo:
    """Storage roots, the writes to each, and node positions of one graph (a snapshot:
    recompute after rewriting the graph)."""

    order: dict[fx.Node, int]
    root: dict[fx.Node, fx.Node]
    writes: dict[fx.Node, list[fx.Node]]  # root -> write nodes, in graph order

    @classmethod
    def of(cls, graph: fx.Graph) -> "MutationInfo":
        order: dict[fx.Node, int] = {}
        root: dict[fx.Node, fx.Node] = {}
        writes: dict[fx.Node, list[fx.Node]] = {}
        for i, node in enumerate(graph.nodes):
            order[node] = i
            if node.op != "call_function":
                root[node] = node
                continue
            if node.target is operator.getitem:
                source = node.args[0]
                # items of a view op's list (split, unbind, chunk) share its input's storage
                root[node] = root.get(source, node) if _aliased_argument(source) is not None else node
            else:
                aliased = _aliased_argument(node)
                root[node] = root.get(aliased, aliased) if aliased is not None else node
            for arg in written_arguments(node):
                writes.setdefault(root.get(arg, arg), []).append(node)
        return cls(order, root, writes)

    def root_of(self, value) -> fx.Node | None:
        return self.root.get(value) if isinstance(value, fx.Node) else None

    def is_written(self, value) -> bool:
        """Whether the storage value lives in is written anywhere in the graph."""
        r = self.root_of(value)
        return r is not None and r in self.writes

    def touches_written(self, node: fx.Node) -> bool:
        """Whether node reads, writes or is a view of storage that the graph writes."""
        return is_write(node) or self.is_written(node) or any(self.is_written(a) for a in node.all_input_nodes)

    def written_between(self, value, start: fx.Node, end: fx.Node) -> bool:
        """Whether a write to value's storage lies strictly between start and end (either order)."""
        r = self.root_of(value)
        if r is None or r not in self.writes:
            return False
        lo, hi = sorted((self.order[start], self.order[end]))
        return any(lo < self.order[w] < hi for w in self.writes[r])

    @property
    def written_roots(self) -> set[fx.Node]:
        return set(self.writes)


def written_placeholders(graph: fx.Graph) -> list[fx.Node]:
    """Placeholders (weights, buffers, user inputs) whose storage the graph writes."""
    info = MutationInfo.of(graph)
    return [n for n in graph.nodes if n.op == "placeholder" and n in info.writes]


def write_signature(graph: fx.Graph) -> list[tuple[str, str, tuple]]:
    """(written root, op, written-argument position) per write, in order: what a pass must keep.
    Roots are named by placeholder name, or 'local' for storage the graph allocates."""
    info = MutationInfo.of(graph)
    out = []
    for node in graph.nodes:
        for arg in written_arguments(node):
            r = info.root.get(arg, arg)
            out.append(r.name if r.op == "placeholder" else "local")
    return out


def check_writes_kept(before: list, after: list, where: str) -> None:
    """Raise VerificationError when a pass dropped or reordered writes to placeholders."""
    from flashc.errors import VerificationError

    kept_before = [w for w in before if w != "local"]
    kept_after = [w for w in after if w != "local"]
    if kept_before != kept_after:
        raise VerificationError(f"{where}: in-place writes to inputs or state changed from "
                                f"{kept_before} to {kept_after}; a pass must keep every write")


def aliased_outputs(graph: fx.Graph) -> list[int]:
    """Indexes of the flat outputs whose storage is a placeholder's (a weight, a buffer or
    a user input) or a view of one: returned as they are, the caller would hold the
    compiled model's state, which the next call overwrites, or a tensor it passed in."""
    from torch.utils import _pytree as pytree

    info = MutationInfo.of(graph)
    leaves = pytree.tree_leaves(graph.output_node().args[0])
    return [i for i, v in enumerate(leaves)
            if isinstance(v, fx.Node) and info.root_of(v) is not None and info.root_of(v).op == "placeholder"]


def output_storage_groups(graph: fx.Graph) -> list[int]:
    """For each flat output, the index of the first output living in the same storage (itself when
    none before it does; -1 for a leaf that is not a node): which outputs the caller gets as one
    tensor, or as views of one, so that writing into one shows in the others."""
    from torch.utils import _pytree as pytree

    info = MutationInfo.of(graph)
    first: dict[fx.Node, int] = {}
    groups = []
    for i, leaf in enumerate(pytree.tree_leaves(graph.output_node().args[0])):
        root = info.root_of(leaf)
        groups.append(-1 if root is None else first.setdefault(root, i))
    return groups


def separate_outputs(graph: fx.Graph, groups: list[int]) -> int:
    """Give each output that now shares storage with an earlier one it did not share with in
    `groups` (output_storage_groups before the passes) a copy of its own (`aten.clone`), so that a
    pass merging two equal values (CSE: `return x * 2, x * 2`; an identity dropped: `h, h * 1`)
    never lets the caller's write into one output change another. Outputs of one original group
    that are one node share one copy. Returns how many copies were made."""
    from torch.utils import _pytree as pytree

    output = graph.output_node()
    leaves, spec = pytree.tree_flatten(output.args[0])
    if len(leaves) != len(groups):
        raise ValueError(f"{len(leaves)} outputs, {len(groups)} storage groups: not the same graph's outputs")
    info = MutationInfo.of(graph)
    owner: dict[fx.Node, int] = {}  # storage root -> the original group the first output in it belongs to
    copies: dict[tuple[fx.Node, int], fx.Node] = {}
    made = 0
    for i, leaf in enumerate(leaves):
        root = info.root_of(leaf)
        if root is None or groups[i] < 0:
            continue
        if owner.setdefault(root, groups[i]) == groups[i]:
            continue
        key = (leaf, groups[i])
        if key not in copies:
            with graph.inserting_before(output):
                copy = graph.call_function(torch.ops.aten.clone.default, (leaf,))
            copy.meta.update({k: v for k, v in leaf.meta.items() if k != "val"})
            if isinstance(leaf.meta.get("val"), torch.Tensor):
                copy.meta["val"] = leaf.meta["val"].clone()
            copies[key] = copy
            owner[copy] = groups[i]
            made += 1
        leaves[i] = copies[key]
    if made:
        output.args = (pytree.tree_unflatten(leaves, spec),)
    return made


def functional_form(target):
    """aten.foo_.overload -> aten.foo.overload for an in-place ATen op (one that writes its first
    argument), else None (the ONNX backend lowers writes through it; decompositions' writes to
    their own intermediates become it)."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_") or not target._schema.is_mutable:
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None

"""In-place writes in a TVM module: carried exactly where values can stand for them,
refused everywhere else.

flashc's IR keeps PyTorch's in-place ops (`add_`, `index_put_`, `copy_`, ...). A Relax
module has values, not storage, so a write is lowered as its functional op (add_ ->
add) and the written tensor's node is rebound to the result: every later read, through
that node or the write's own, sees the new value. That is PyTorch's answer when the
written storage is a tensor the graph allocated itself, written directly, and no view of
it taken before the last write is read (a view would still show the old value).

Refused at compile time with UnsupportedOpError naming the op, the node, its source
line and the way out (the 'cpu' target runs them as PyTorch does):
  * writes to weights, buffers or user inputs: state kept across calls (a KV cache),
    or the caller's tensor, which a TVM module cannot update;
  * writes through a view (a slice, select, view, transpose, ...), or to storage a view
    was taken of before the write;
  * ops that write an argument other than their first, or have no functional lowering.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from flashc.aliasing import MutationInfo, written_arguments
from flashc.backends.tvm.common import _dtype, _shape
from flashc.errors import UnsupportedOpError
from flashc.ir import Program, module_path, op_name, source_location

aten = torch.ops.aten


def is_write(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable


def functional_form(target):
    """add_.Tensor -> add.Tensor, index_put_.default -> index_put.default (None if absent)."""
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


class InPlaceWrites:
    """The in-place writes of a Program's graph, checked once; lowers the ones it accepts."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.info = MutationInfo.of(program.graph)
        self.problems: dict[fx.Node, str] = {}
        for node in program.graph.nodes:
            if node.op == "call_function" and is_write(node):
                why = self._why_not(node)
                if why:
                    self.problems[node] = why

    def is_write(self, node: fx.Node) -> bool:
        return is_write(node)

    def _why_not(self, node: fx.Node) -> str | None:
        schema = node.target._schema
        written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        if written != [0] or len(written_arguments(node)) != 1:
            return "it writes an argument other than the tensor it is called on"
        target = node.args[0]
        root = self.info.root_of(target)
        if root is None:
            return "its target is not a tensor of the graph"
        if root.op == "placeholder":
            what = (f"weight or buffer {root.name!r}, state a TVM module does not keep between calls"
                    if root.name in self.program.params
                    else f"user input {root.name!r}, the caller's tensor, which a TVM module cannot update")
        else:
            what = root.name
        direct = self._written_directly(target)
        if direct is not root:
            return f"it writes through {direct.name} ({op_name(direct)}), a view of {what}"
        if root.op != "call_function":
            return f"it writes {what}"
        last = max(self.info.order[w] for w in self.info.writes[root])
        for view in self._views(root):
            if self.info.order[view] < last:
                return (f"{view.name} ({op_name(view)}) is a view of {root.name} taken before the write; "
                        "it would not see the new value")
        return None

    def _written_directly(self, target: fx.Node) -> fx.Node:
        """target, or what an in-place chain (x.add_(1).mul_(2)) was called on."""
        while isinstance(target, fx.Node) and target.op == "call_function" and is_write(target):
            target = target.args[0]
        return target

    def _views(self, root: fx.Node) -> list[fx.Node]:
        return [n for n, r in self.info.root.items() if r is root and n is not root and not is_write(n)]

    def refuse_unsupported(self) -> None:
        """UnsupportedOpError for the first write that cannot be carried (in graph order)."""
        if not self.problems:
            return
        node, why = next(iter(self.problems.items()))
        where = module_path(node)
        more = len(self.problems) - 1
        raise UnsupportedOpError(
            f"TVM backend cannot run in-place {op_name(node)} (node {node.name})" + (f" in {where}" if where else "")
            + f" at {source_location(node)}: {why}" + (f" ({more} more in-place write(s) like it)" if more else "")
            + "; use target 'cpu', which runs in-place ops as PyTorch does")

    def lower(self, lw, node: fx.Node):
        """The write as its functional op; node and the tensor it writes now stand for the result."""
        if node in self.problems:
            self.refuse_unsupported()
        target = self._written_directly(node.args[0])
        functional = functional_form(node.target)
        if node.target == aten.copy_.default:
            value = self._copy(lw, node)
        elif functional is not None and (functional in lw.own or functional.__name__ in lw.frontend.convert_map):
            in_place, node.target = node.target, functional
            try:  # converters read node.target: lowered as the functional op throughout
                value = lw._check(node, lw.convert(node))
            finally:
                node.target = in_place
        else:  # the frontend's own in-place converter; undo what it rebinds (we rebind below)
            saved = dict(lw.env)
            value = lw._check(node, lw.convert(node))
            lw.env.clear()
            lw.env.update(saved)
        lw.env[target] = value
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

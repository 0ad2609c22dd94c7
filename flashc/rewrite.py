"""Rewrite rules: a pattern written as the PyTorch code it matches, a replacement, a check.

A pattern function is captured with the same `torch.export` path and cleanup passes as
the model, for each dtype it may appear in, so it matches the model's graph op for op.
Pattern arguments that are tensors match any node; those listed in `scalars` are
traced with a distinctive sentinel value and bind whatever literal stands in that
place in the model's graph (an epsilon, a scale). With `any_shape_literals`, the
size lists of view/reshape/expand and other int literals that only follow from shapes
match anything, and the check function validates what matters.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from flashc.aliasing import MutationInfo, is_write, written_arguments

aten = torch.ops.aten

# Ops whose two tensor operands may appear in either order.
COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor}
# Ops whose int / int-list arguments follow from shapes (view sizes, slice bounds).
SHAPE_LITERAL_OPS = {aten.view.default, aten.reshape.default, aten.expand.default, aten.slice.Tensor,
                     aten.arange.default, aten.histc.default, aten.floor_divide.default, aten.topk.default,
                     aten._unsafe_view.default, aten.repeat.default, aten.new_zeros.default,
                     aten.split_with_sizes.default, aten.split.Tensor, aten.narrow.default,
                     # expert-count bounds in transformers 5.17's MoE dispatch
                     aten.ge.Scalar, aten.clamp_.default, aten.clamp.default}


@dataclass
class Match:
    """A match of a rule in a graph: what each pattern argument bound to."""

    rule: "RewriteRule"
    nodes: list[fx.Node]  # graph nodes covered by the pattern (excluding bound inputs)
    outputs: list[fx.Node]  # graph nodes standing for the pattern's outputs
    bindings: dict[str, Any]  # pattern argument name -> graph node or literal
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # the program's weights

    def val(self, name: str):
        """The fake tensor (shape/dtype) of a bound tensor argument."""
        return self.bindings[name].meta.get("val")

    def constant(self, name: str) -> torch.Tensor | None:
        """The value of a bound argument when it is a weight or folded constant, else None."""
        node = self.bindings.get(name)
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.constants.get(node.name)
        return None

    def covered(self, target) -> list[fx.Node]:
        """The matched graph nodes calling `target`."""
        return [n for n in self.nodes if n.target == target]


@dataclass
class RewriteRule:
    """pattern(*args) is replaced by replacement(*args) where check(match) allows."""

    name: str
    pattern: Callable
    replacement: Callable
    example_inputs: Callable[[torch.dtype], tuple]  # tensors for the pattern's tensor args
    scalars: dict[str, float] = field(default_factory=dict)  # scalar arg -> sentinel used in tracing
    check: Callable[[Match], bool] | None = None
    any_shape_literals: bool = False
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    # other spellings of a traced pattern (e.g. the code path a library takes on another
    # device than the CPU the pattern is traced on), derived from the traced graph
    variants: Callable[[fx.Graph], list[fx.Graph]] | None = None
    _graphs: dict = field(default_factory=dict, repr=False)

    def pattern_graphs(self) -> list[tuple[fx.Graph, list[str]]]:
        """The pattern captured for each dtype (cached), with its tensor argument names."""
        if not self._graphs:
            seen = set()
            for dtype in self.dtypes:
                graph, names = trace_pattern(self, dtype)
                for i, g in enumerate([graph, *(self.variants(graph) if self.variants else [])]):
                    key = str(g)
                    if key not in seen:
                        seen.add(key)
                        self._graphs[(dtype, i)] = (g, names)
        return list(self._graphs.values())


def trace_pattern(rule: RewriteRule, dtype: torch.dtype) -> tuple[fx.Graph, list[str]]:
    """Capture rule.pattern for one dtype and clean it up like a model graph."""
    import inspect

    from flashc.capture import capture
    from flashc.ir import propagate_shapes
    from flashc.pass_manager import PassContext
    from flashc.profiles import PROFILES
    from flashc.passes.cleanup import Canonicalize, EliminateDeadCode

    params = list(inspect.signature(rule.pattern).parameters)
    tensor_names = [p for p in params if p not in rule.scalars]
    example = rule.example_inputs(dtype)

    class PatternModule(torch.nn.Module):
        def forward(self, *tensors):
            kwargs = dict(zip(tensor_names, tensors))
            kwargs.update(rule.scalars)
            return rule.pattern(**kwargs)

    program = capture(PatternModule(), tuple(example), input_names=tensor_names)
    ctx = PassContext(PROFILES["cpu"])
    propagate_shapes(program)
    # No constant folding here: a pattern's arguments are its only inputs, and folding
    # its internal constants (an arange) would turn them into wildcards.
    for p in (Canonicalize(), EliminateDeadCode()):
        p.run(program, ctx)
        program.recompile()
        propagate_shapes(program)
    return program.graph, tensor_names


class _Matcher:
    def __init__(self, rule: RewriteRule, sentinels: dict[float, str]):
        self.rule = rule
        self.sentinels = sentinels

    def node(self, pn: fx.Node, gn: Any, b: dict) -> dict | None:
        if pn.op == "placeholder":
            if not isinstance(gn, fx.Node):
                return None
            if pn.name in b:
                return b if b[pn.name] is gn else None
            return {**b, pn.name: gn}
        if not isinstance(gn, fx.Node) or gn.op != "call_function" or gn.target != pn.target:
            return None
        key = ("__node__", pn.name)
        if key in b:
            return b if b[key] is gn else None
        if any(v is gn for k, v in b.items() if isinstance(k, tuple) and k[0] == "__node__"):
            return None
        b = {**b, key: gn}
        orders = [pn.args]
        if pn.target in COMMUTATIVE and len(pn.args) == 2:
            orders.append((pn.args[1], pn.args[0]))
        for pargs in orders:
            r = self.args(pargs, gn.args, b, pn.target)
            if r is not None:
                r = self.args(tuple(pn.kwargs.values()), tuple(gn.kwargs.get(k, _MISSING) for k in pn.kwargs), r, pn.target)
                if r is not None and set(gn.kwargs) <= set(pn.kwargs):
                    return r
        return None

    def args(self, pargs, gargs, b, target) -> dict | None:
        if len(pargs) != len(gargs):
            return None
        for pa, ga in zip(pargs, gargs):
            b = self.arg(pa, ga, b, target)
            if b is None:
                return None
        return b

    def arg(self, pa, ga, b, target) -> dict | None:
        if isinstance(pa, fx.Node):
            return self.node(pa, ga, b)
        if isinstance(pa, float) and pa in self.sentinels:
            name = self.sentinels[pa]
            if not isinstance(ga, (int, float)) or isinstance(ga, bool):
                return None
            if name in b:
                return b if b[name] == ga else None
            return {**b, name: ga}
        if isinstance(pa, (list, tuple)):
            if not isinstance(ga, (list, tuple)) or len(pa) != len(ga):
                return None
            if self.rule.any_shape_literals and target in SHAPE_LITERAL_OPS and all(
                    isinstance(x, int) for x in ga):
                return b
            return self.args(tuple(pa), tuple(ga), b, target)
        if self.rule.any_shape_literals and target in SHAPE_LITERAL_OPS and type(pa) is int and type(ga) is int:
            return b
        if isinstance(pa, torch.device) and isinstance(ga, torch.device):
            return b  # patterns are traced on the CPU; a graph's ops name its own device
        if isinstance(pa, float) and isinstance(ga, float):
            return b if math.isclose(pa, ga, rel_tol=1e-12) else None
        return b if (type(pa) is type(ga) and pa == ga) else None


_MISSING = object()


def find_matches(rule: RewriteRule, graph: fx.Graph, constants: dict | None = None) -> list[Match]:
    """All non-overlapping matches of rule in graph, in graph order."""
    matches: list[Match] = []
    claimed: set[fx.Node] = set()
    sentinels = {v: k for k, v in rule.scalars.items()}
    mutations = MutationInfo.of(graph)
    for pgraph, tensor_names in rule.pattern_graphs():
        pout = pgraph.output_node().args[0]
        pouts = list(pout) if isinstance(pout, (list, tuple)) else [pout]
        anchor = pouts[0]
        matcher = _Matcher(rule, sentinels)
        for gn in list(graph.nodes):
            if gn in claimed or gn.op != "call_function" or gn.target != anchor.target:
                continue
            b = matcher.node(anchor, gn, {})
            if b is None:
                continue
            b = _match_side_effects(matcher, pgraph, b)
            if b is None:
                continue
            for extra in pouts[1:]:
                key = ("__node__", extra.name)
                if b is None or key not in b:
                    b = None
            if b is None:
                continue
            covered = [v for k, v in b.items() if isinstance(k, tuple)]
            outputs = [b[("__node__", p.name)] for p in pouts]
            if set(covered) & claimed or not _self_contained(covered, outputs):
                continue
            if not _keeps_writes(mutations, covered, outputs, [v for k, v in b.items() if not isinstance(k, tuple)]):
                continue
            # Pattern placeholders beyond its arguments are constants folded while
            # tracing it (e.g. an arange): they must meet constants in the graph too.
            declared = set(tensor_names) | set(rule.scalars)
            extra = [v for k, v in b.items() if not isinstance(k, tuple) and k not in declared]
            if any(not (isinstance(v, fx.Node) and v.op == "placeholder") for v in extra):
                continue
            bindings = {k: v for k, v in b.items() if not isinstance(k, tuple) and k in declared}
            m = Match(rule, covered, outputs, bindings, constants or {})
            if rule.check is not None and not rule.check(m):
                continue
            matches.append(m)
            claimed.update(covered)
    return matches


def _match_side_effects(matcher: _Matcher, pgraph: fx.Graph, b: dict) -> dict | None:
    """Match pattern nodes the output does not reach: in-place ops (clamp_, masked_fill_)
    whose effect is on their argument. Each is looked for among the users of the graph
    node its first argument matched."""
    for pn in pgraph.nodes:
        if pn.op != "call_function" or ("__node__", pn.name) in b:
            continue
        first = next((a for a in pn.args if isinstance(a, fx.Node)), None)
        if first is None:
            return None
        target = b.get(first.name) if first.op == "placeholder" else b.get(("__node__", first.name))
        if target is None:
            return None
        for candidate in list(target.users):
            r = matcher.node(pn, candidate, b)
            if r is not None:
                b = r
                break
        else:
            return None
    return b


def _keeps_writes(mutations, covered: list[fx.Node], outputs: list[fx.Node], inputs: list) -> bool:
    """Whether replacing the match keeps in-place semantics: the replacement reads its
    inputs at one point, so no write to an input's storage may lie within the match; a
    write inside the match must be to storage the match allocates (it disappears with
    it); and an output that is a view of an input must not be written later (the write
    would land in the replacement's fresh tensor instead of the input)."""
    inside = set(covered)
    first = min(covered, key=mutations.order.__getitem__)
    last = max(covered, key=mutations.order.__getitem__)
    for v in inputs:
        if isinstance(v, fx.Node) and mutations.written_between(v, first, last):
            return False
    for n in covered:
        if is_write(n) and any(mutations.root_of(a) not in inside for a in written_arguments(n)):
            return False
    for out in outputs:
        if mutations.root_of(out) not in inside and mutations.is_written(out):
            return False
    return True


def _self_contained(covered: list[fx.Node], outputs: list[fx.Node]) -> bool:
    """Interior nodes of a match must not be read from outside it."""
    inside = set(covered)
    for n in covered:
        if n in outputs:
            continue
        if any(u not in inside for u in n.users):
            return False
    return True


def _infer_shapes(first: fx.Node, stop: fx.Node) -> None:
    """Give the nodes first..stop (exclusive) their meta['val'] by running their ops on the
    fake values of their inputs, so later rules can read shapes without re-propagating the
    whole graph. Nodes whose inputs have no value are left without one."""
    from torch._guards import detect_fake_mode

    node = first
    while node is not stop:
        inputs = [a.meta.get("val") for a in node.all_input_nodes]
        mode = detect_fake_mode([v for v in inputs if isinstance(v, torch.Tensor)])
        if node.op == "call_function" and mode is not None and all(v is not None for v in inputs):
            args = fx.node.map_arg(node.args, lambda a: a.meta["val"])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: a.meta["val"])
            try:
                with mode:
                    node.meta["val"] = node.target(*args, **kwargs)
            except Exception:
                node.meta.pop("val", None)
        node = node.next


def apply_rule(rule: RewriteRule, graph: fx.Graph, constants: dict | None = None) -> int:
    """Replace every match of rule in graph; returns the number of replacements.

    `check` may add derived bindings (e.g. is_causal) that the replacement takes.
    """
    matches = find_matches(rule, graph, constants)
    order: dict[fx.Node, float] = {n: i for i, n in enumerate(graph.nodes)}
    replaced: dict[fx.Node, fx.Node] = {}  # outputs of earlier matches -> their replacements
    done = 0
    for m in matches:
        m.bindings = {k: replaced.get(v, v) if isinstance(v, fx.Node) else v for k, v in m.bindings.items()}
        point = min(m.outputs, key=order.__getitem__)
        inputs = [v for v in m.bindings.values() if isinstance(v, fx.Node)]
        if any(order[i] >= order[point] for i in inputs):
            continue  # an input is defined after the first output: no safe insertion point
        tracer = fx.proxy.GraphAppendingTracer(graph)
        args = {k: (fx.Proxy(v, tracer) if isinstance(v, fx.Node) else v) for k, v in m.bindings.items()}
        before = point.prev
        with graph.inserting_before(point):
            result = rule.replacement(**args)
        _infer_shapes(before.next, point)
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        for old, new in zip(m.outputs, results):
            new_node = new.node if isinstance(new, fx.Proxy) else new
            new_node.meta.update({k: v for k, v in old.meta.items() if k in ("stack_trace", "nn_module_stack")})
            old.replace_all_uses_with(new_node)
            replaced[old] = new_node
            order[new_node] = order[point] - 0.5
        for n in sorted(m.nodes, key=order.__getitem__, reverse=True):
            if not n.users:
                graph.erase_node(n)
        done += 1
    return done

"""Rewrite rules: a pattern written as the PyTorch code it matches, a replacement, a check.

A pattern function is captured with the same `torch.export` path as the model, for each
dtype it may appear in, and cleaned up by the passes its rule names (`cleanup`: those
the pipeline runs on the model before the rule), so it matches the model's graph op for
op. Pattern arguments that are tensors match any node; those listed in `scalars` are
traced with a distinctive sentinel value and bind whatever literal stands in that
place in the model's graph (an epsilon, a scale). With `any_shape_literals`, the
size lists of view/reshape/expand and other int literals that only follow from shapes
match anything, and the check function validates what matters.

A check returns True to accept a match, or a sentence saying why it refuses (False is
still taken, as "check failed"). `explain_matches` says, for every place a rule could
have matched, why it did not (`NoMatch`), as onnxscript's rewriter does; `why_not` runs a
pipeline up to the pass that owns a fusion and reports its candidates, for
`flashc inspect --why-not`. Matching without explanations takes the plain path.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from flashc.aliasing import MutationInfo, is_write, written_arguments
from flashc.errors import UnknownNameError, unknown_name
from flashc.ir import Program, module_path, op_name, propagate_shapes, source_location
from flashc.pass_manager import PassContext, PassManager

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


@dataclass(frozen=True)
class NoMatch:
    """Why a rule did not match at one candidate place (a graph node of the op its pattern
    ends in), in words that name the graph's nodes and where the model computes them."""

    node: fx.Node
    reason: str
    # how far matching got, (stage, pattern ops matched): of several patterns that all
    # failed at a node, the one that got furthest is the telling miss
    progress: tuple[int, int] = field(default=(0, 0), compare=False)


# Check functions: True accepts, a string refuses saying why, False refuses without a why.
Check = Callable[[Match], "bool | str"]


@dataclass
class RewriteRule:
    """pattern(*args) is replaced by replacement(*args) where check(match) allows."""

    name: str
    pattern: Callable
    replacement: Callable
    example_inputs: Callable[[torch.dtype], tuple]  # tensors for the pattern's tensor args
    scalars: dict[str, float] = field(default_factory=dict)  # scalar arg -> sentinel used in tracing
    check: Check | None = None
    any_shape_literals: bool = False
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    # other spellings of a traced pattern (e.g. the code path a library takes on another
    # device than the CPU the pattern is traced on), derived from the traced graph
    variants: Callable[[fx.Graph], list[fx.Graph]] | None = None
    # passes (`run(program, ctx)`) run on the traced pattern: the cleanup the pipeline runs on
    # a model before this rule, so both meet in one spelling. The pass module that owns the
    # rule names them; the core imports no pass.
    cleanup: Sequence = ()
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

    def refusal(self, m: Match) -> str | None:
        """Why `check` refuses m (None when it accepts)."""
        if self.check is None:
            return None
        verdict = self.check(m)
        if isinstance(verdict, str):  # a reason: a refusal, however truthy
            return f"check failed: {verdict}"
        if verdict:
            return None
        name = getattr(self.check, "__name__", "<lambda>")
        return f"check failed ({name})" if name != "<lambda>" else f"check of rule {self.name} failed"


def trace_pattern(rule: RewriteRule, dtype: torch.dtype) -> tuple[fx.Graph, list[str]]:
    """Capture rule.pattern for one dtype and clean it up with the rule's cleanup passes."""
    from flashc.capture import capture
    from flashc.profiles import PROFILES

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
    for p in rule.cleanup:
        p.run(program, ctx)
        program.recompile()
        propagate_shapes(program)
    return program.graph, tensor_names


def describe(node: fx.Node) -> str:
    """A graph node as a user finds it in their model: 'node mul_12 (model.layers.0.self_attn,
    modeling_llama.py:123)'; an input or weight by its name."""
    if node.op == "placeholder":
        return f"input {node.name}"
    if node.op == "output":
        return "the model's outputs"
    where = [w for w in (module_path(node), short_source(node)) if w]
    return f"node {node.name}" + (f" ({', '.join(where)})" if where else "")


def short_source(node: fx.Node) -> str:
    """'modeling_llama.py:123' from source_location's 'path/modeling_llama.py:123 in forward'
    ('' when capture recorded none)."""
    location = source_location(node)
    if location == "<unknown>":
        return ""
    path, _, line = location.split(" in ")[0].rpartition(":")
    return f"{Path(path).name}:{line}" if path else location


def _value(v) -> str:
    """A graph argument in a message: a node by name and op, a literal as written."""
    if isinstance(v, fx.Node):
        return f"input {v.name}" if v.op == "placeholder" else f"{v.name} ({op_name(v)})"
    return repr(v)


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


class _ExplainingMatcher(_Matcher):
    """A _Matcher that also keeps, in words, where matching failed: of all comparisons that
    failed while trying one candidate, the one made with the most pattern ops matched is
    the nearest miss (the first of equals: the pattern as written before its commuted
    forms), and its reason is the one to show. Bound inputs do not count: they match
    anything."""

    def __init__(self, rule: RewriteRule, sentinels: dict[float, str]):
        super().__init__(rule, sentinels)
        self.start()

    def start(self) -> None:
        """Forget the failures of the previous candidate."""
        self.depth, self.reason = -1, "the pattern does not match here"
        self._at: list[fx.Node] = []  # the graph nodes whose arguments are being compared

    def fail(self, b: dict, reason: Callable[[], str]) -> None:
        depth = sum(isinstance(k, tuple) for k in b)  # pattern ops matched so far
        if depth > self.depth:
            self.depth, self.reason = depth, reason()

    def node(self, pn: fx.Node, gn: Any, b: dict) -> dict | None:
        if not b:  # the pattern's output against a new candidate
            self.start()
        self._at.append(gn)
        try:
            r = super().node(pn, gn, b)
        finally:
            self._at.pop()
        if r is None:
            self.fail(b, lambda: self._node_reason(pn, gn, b))
        return r

    def args(self, pargs, gargs, b, target) -> dict | None:
        if len(pargs) != len(gargs):
            self.fail(b, lambda: f"{self._where()}: {len(gargs)} argument(s) where the pattern's "
                                 f"{self._at_op()} has {len(pargs)}")
        return super().args(pargs, gargs, b, target)

    def arg(self, pa, ga, b, target) -> dict | None:
        r = super().arg(pa, ga, b, target)
        if r is None and not isinstance(pa, (fx.Node, list, tuple)):
            self.fail(b, lambda: self._literal_reason(pa, ga, b))
        return r

    def _where(self) -> str:
        at = self._at[-1] if self._at else None
        return describe(at) if isinstance(at, fx.Node) else "the graph"

    def _at_op(self) -> str:  # the op whose arguments are being compared
        at = self._at[-1] if self._at else None
        return op_name(at) if isinstance(at, fx.Node) else "the pattern's op"

    def _node_reason(self, pn: fx.Node, gn: Any, b: dict) -> str:
        if pn.op == "placeholder":
            if not isinstance(gn, fx.Node):
                return f"{self._where()}: the pattern's input `{pn.name}` meets the literal {gn!r} here"
            return (f"the pattern reads one value `{pn.name}` where the graph reads two: {_value(b[pn.name])} "
                    f"and {_value(gn)}")
        want = op_name(pn)
        if not isinstance(gn, fx.Node):
            return f"{self._where()}: pattern expects {want} here, found the literal {gn!r}"
        if gn.op != "call_function":
            return f"pattern expects {want} here, found {gn.name}, an input or weight of the model"
        if gn.target != pn.target:
            return f"{describe(gn)}: pattern expects {want} here, found {op_name(gn)}"
        earlier = b.get(("__node__", pn.name))
        if earlier is not None:
            return (f"{describe(gn)}: the pattern computes this {want} once and reads it twice; "
                    f"the graph computes it twice ({earlier.name} and {gn.name})")
        if any(v is gn for k, v in b.items() if isinstance(k, tuple)):
            return f"{describe(gn)}: would stand for two different {want} nodes of the pattern"
        extra = sorted(set(gn.kwargs) - set(pn.kwargs))
        if extra:
            return f"{describe(gn)}: {want} with keyword argument(s) {', '.join(extra)}, which the pattern's has not"
        return f"{describe(gn)}: the arguments of {want} differ from the pattern's"

    def _literal_reason(self, pa, ga, b) -> str:
        where = self._where()
        if isinstance(pa, float) and pa in self.sentinels:
            name = self.sentinels[pa]
            if name in b:
                return f"{where}: the pattern's scalar `{name}` is {b[name]!r} in one place and {ga!r} here"
            return f"{where}: the pattern's scalar `{name}` meets {_value(ga)}, not a number"
        return f"{where}: pattern expects {pa!r} as an argument of {self._at_op()}, found {_value(ga)}"


def find_matches(rule: RewriteRule, graph: fx.Graph, constants: dict | None = None) -> list[Match]:
    """All non-overlapping matches of rule in graph, in graph order."""
    return [r for r in _search(rule, graph, constants, explain=False) if isinstance(r, Match)]


def explain_matches(rule: RewriteRule, graph: fx.Graph, constants: dict | None = None) -> list[Match | NoMatch]:
    """For each candidate place of rule in graph (a node of the op its pattern ends in) that
    no match covers, in graph order: the match there (the very matches find_matches
    finds) or why there is none."""
    return _search(rule, graph, constants, explain=True)


# Stages of a match after its structure matched, in the order they are tried: a refusal
# at a later stage is a nearer miss than one at an earlier stage or in the structure.
_OUTPUTS, _OVERLAP, _ESCAPES, _WRITES, _CONSTANTS, _CHECK, _PLACE = range(1, 8)


def _search(rule: RewriteRule, graph: fx.Graph, constants: dict | None, explain: bool) -> list[Match | NoMatch]:
    """find_matches (the matches) and explain_matches (with the misses): one search, so both
    find the same matches; the reasons are worded only when explaining."""
    matches: list[Match] = []
    claimed: dict[fx.Node, Match] = {}  # graph node -> the match covering it
    refused: dict[fx.Node, NoMatch] = {}  # candidate -> its nearest miss so far (explaining only)
    sentinels = {v: k for k, v in rule.scalars.items()}
    mutations = MutationInfo.of(graph)
    for pgraph, tensor_names in rule.pattern_graphs():
        pout = pgraph.output_node().args[0]
        pouts = list(pout) if isinstance(pout, (list, tuple)) else [pout]
        anchor = pouts[0]
        matcher = _ExplainingMatcher(rule, sentinels) if explain else _Matcher(rule, sentinels)
        for gn in list(graph.nodes):
            if gn in claimed or gn.op != "call_function" or gn.target != anchor.target:
                continue
            b = matcher.node(anchor, gn, {})
            if b is None:  # most candidates differ in structure: the plain path does nothing more
                if explain:
                    _keep_nearest(refused, NoMatch(gn, matcher.reason, (0, matcher.depth)))
                continue
            found = _match_at(rule, matcher, pgraph, tensor_names, pouts, gn, b, claimed, mutations, constants)
            if isinstance(found, Match):
                matches.append(found)
                claimed.update(dict.fromkeys(found.nodes, found))
            elif explain:  # refused, or its in-place side effects not found (the matcher says where)
                _keep_nearest(refused, found or NoMatch(gn, matcher.reason, (0, matcher.depth)))
    if not explain:
        return matches
    # a node refused as the end of the pattern and then covered by a match (as one of its
    # inner nodes, or by another spelling) is fused
    outcomes = [miss for gn, miss in refused.items() if gn not in claimed] + matches
    return sorted(outcomes, key=lambda o: mutations.order[o.node if isinstance(o, NoMatch) else o.outputs[0]])


def _keep_nearest(refused: dict[fx.Node, NoMatch], miss: NoMatch) -> None:
    held = refused.get(miss.node)
    if held is None or miss.progress > held.progress:
        refused[miss.node] = miss


def _match_at(rule: RewriteRule, matcher: _Matcher, pgraph: fx.Graph, tensor_names: list[str], pouts: list[fx.Node],
              gn: fx.Node, b: dict, claimed: dict, mutations: MutationInfo, constants: dict | None
              ) -> Match | NoMatch | None:
    """The match of one pattern graph whose output matched gn with bindings b; a NoMatch
    when it is refused, None when the structure differs (the matcher knows where)."""
    b = _match_side_effects(matcher, pgraph, b)
    if b is None:
        return None
    for i, extra in enumerate(pouts[1:], 2):
        if ("__node__", extra.name) not in b:
            return NoMatch(gn, f"the pattern's output {i} ({op_name(extra)}) is not computed here", (_OUTPUTS, 0))
    covered = [v for k, v in b.items() if isinstance(k, tuple)]
    outputs = [b[("__node__", p.name)] for p in pouts]
    overlap = next((n for n in covered if n in claimed), None)
    if overlap is not None:
        return NoMatch(gn, f"overlaps the match at {describe(claimed[overlap].outputs[0])} ({overlap.name} would "
                           "be in both)", (_OVERLAP, 0))
    why = _escapes(covered, outputs)
    if why is not None:
        return NoMatch(gn, why, (_ESCAPES, 0))
    why = _write_conflict(mutations, covered, outputs, [v for k, v in b.items() if not isinstance(k, tuple)])
    if why is not None:
        return NoMatch(gn, why, (_WRITES, 0))
    # Pattern placeholders beyond its arguments are constants folded while tracing it
    # (e.g. an arange): they must meet constants in the graph too.
    declared = set(tensor_names) | set(rule.scalars)
    for k, v in b.items():
        if not isinstance(k, tuple) and k not in declared and not (isinstance(v, fx.Node) and v.op == "placeholder"):
            return NoMatch(gn, f"the pattern's constant `{k}` meets {_value(v)}, which is computed, not a constant",
                           (_CONSTANTS, 0))
    bindings = {k: v for k, v in b.items() if not isinstance(k, tuple) and k in declared}
    m = Match(rule, covered, outputs, bindings, constants or {})
    why = rule.refusal(m)
    if why is not None:
        return NoMatch(gn, why, (_CHECK, 0))
    return m


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
            if isinstance(matcher, _ExplainingMatcher):
                matcher.fail(b, lambda: f"the pattern's in-place {op_name(pn)} on {_value(target)} is not "
                                             "among the graph's uses of it")
            return None
    return b


def _write_conflict(mutations: MutationInfo, covered: list[fx.Node], outputs: list[fx.Node],
                    inputs: list) -> str | None:
    """Why replacing the match would not keep in-place semantics (None when it would): the
    replacement reads its inputs at one point, so no write to an input's storage may lie
    within the match; a write inside the match must be to storage the match allocates (it
    disappears with it); and an output that is a view of an input must not be written
    later (the write would land in the replacement's fresh tensor instead of the input)."""
    inside = set(covered)
    first = min(covered, key=mutations.order.__getitem__)
    last = max(covered, key=mutations.order.__getitem__)
    for v in inputs:
        if isinstance(v, fx.Node) and mutations.written_between(v, first, last):
            lo, hi = mutations.order[first], mutations.order[last]
            write = next(w for w in mutations.writes[mutations.root_of(v)] if lo < mutations.order[w] < hi)
            return (f"an in-place write to {mutations.root_of(v).name} ({describe(write)}, {op_name(write)}) lies "
                    f"between the matched nodes {first.name} and {last.name}")
    for n in covered:
        if not is_write(n):
            continue
        for a in written_arguments(n):
            if mutations.root_of(a) not in inside:
                return (f"the matched {describe(n)} writes in place into {mutations.root_of(a).name}, storage "
                        "from outside the match")
    for out in outputs:
        if mutations.root_of(out) not in inside and mutations.is_written(out):
            root = mutations.root_of(out)
            return (f"the output {out.name} is a view of {root.name}, which {mutations.writes[root][-1].name} "
                    "writes in place: a fused op would return a fresh tensor that write misses")
    return None


def _escapes(covered: list[fx.Node], outputs: list[fx.Node]) -> str | None:
    """Why the match is not self-contained: an interior node is read from outside it."""
    inside = set(covered)
    for n in covered:
        if n in outputs:
            continue
        reader = next((u for u in n.users if u not in inside), None)
        if reader is not None:
            return (f"the pattern's intermediate {n.name} ({op_name(n)}) is also read outside the match, "
                    f"by {describe(reader)}")
    return None


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
    return sum(isinstance(o, Match) for o in replace_matches(graph, find_matches(rule, graph, constants)))


def replace_matches(graph: fx.Graph, matches: list[Match]) -> list[Match | NoMatch]:
    """Replace each match (found in graph, in graph order) by its rule's replacement; per
    match, the match when replaced or a NoMatch saying why it could not be."""
    order: dict[fx.Node, float] = {n: i for i, n in enumerate(graph.nodes)}
    replaced: dict[fx.Node, fx.Node] = {}  # outputs of earlier matches -> their replacements
    outcomes: list[Match | NoMatch] = []
    for m in matches:
        m.bindings = {k: replaced.get(v, v) if isinstance(v, fx.Node) else v for k, v in m.bindings.items()}
        point = min(m.outputs, key=order.__getitem__)
        late = next((v for v in m.bindings.values() if isinstance(v, fx.Node) and order[v] >= order[point]), None)
        if late is not None:  # no point of the graph where the replacement could read all its inputs
            outcomes.append(NoMatch(m.outputs[0], f"no place for the replacement: its input {late.name} is "
                                                  f"computed after the output {point.name}", (_PLACE, 0)))
            continue
        tracer = fx.proxy.GraphAppendingTracer(graph)
        args = {k: (fx.Proxy(v, tracer) if isinstance(v, fx.Node) else v) for k, v in m.bindings.items()}
        before = point.prev
        with graph.inserting_before(point):
            result = m.rule.replacement(**args)
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
        outcomes.append(m)
    return outcomes


# --- Why a fusion did not happen: candidates of one fusion over a pipeline --------------------
# A pass that fuses says which fusions it can explain (`explains`, names) and explains one
# (`explain(program, ctx, name)`): it runs as `run` does and returns its candidates.


@dataclass(frozen=True)
class Candidate:
    """A place where a fusion could happen and what became of it."""

    node: fx.Node  # the graph node the fused op would replace (of the op the pattern ends in)
    pattern: str  # the pattern tried there (the nearest miss when several were)
    fused: bool
    reason: str = ""  # why not, when not fused
    progress: tuple[int, int] = field(default=(0, 0), compare=False)


def candidates_of(rule: RewriteRule, outcomes: list[Match | NoMatch]) -> list[Candidate]:
    """explain_matches's and replace_matches's outcomes for rule as candidates."""
    pattern = getattr(rule.pattern, "__name__", rule.name)
    return [Candidate(o.outputs[0], pattern, True) if isinstance(o, Match)
            else Candidate(o.node, pattern, False, o.reason, o.progress) for o in outcomes]


def nearest(candidates: list[Candidate]) -> list[Candidate]:
    """One candidate per node, in first-seen order: the fusion if one pattern fused it, else
    the pattern that got furthest before failing."""
    best: dict[fx.Node, Candidate] = {}
    for c in candidates:
        held = best.get(c.node)
        if held is None or (c.fused and not held.fused) or (not held.fused and c.progress > held.progress):
            best[c.node] = c
    return list(best.values())


@dataclass
class WhyNot:
    """The candidates of one fusion in a model, each fused or with the reason it was not."""

    name: str  # the fusion asked about, e.g. "rotary"
    pass_name: str  # the pass of the pipeline that runs it
    candidates: list[Candidate]

    @property
    def fused(self) -> int:
        return sum(c.fused for c in self.candidates)

    def __str__(self) -> str:
        lines = [f"{self.name} (pass {self.pass_name}): fused {self.fused} of {len(self.candidates)} candidate(s)"]
        lines += [f"  {describe(c.node)} [{c.pattern}]: " + ("fused" if c.fused else c.reason) for c in self.candidates]
        return "\n".join(lines)


def explained_names(passes: Sequence) -> list[str]:
    """The fusions the passes can explain, in pipeline order."""
    return list(dict.fromkeys(n for p in passes for n in getattr(p, "explains", ())))


def fusion_owner(passes: Sequence, name: str) -> int:
    """The index of the first pass that explains the fusion `name` ('rotary' or 'flashc.rotary');
    UnknownNameError listing the known fusions when none does."""
    name = name.removeprefix("flashc.")
    for i, p in enumerate(passes):
        if name in getattr(p, "explains", ()):
            return i
    known = explained_names(passes)
    if not known:
        raise UnknownNameError(f"unknown fusion {name!r}: this pipeline fuses nothing (fusions run at -O2 and -O3)")
    raise unknown_name("fusion", name, known)


def why_not(program: Program, passes: Sequence, ctx: PassContext, name: str) -> WhyNot:
    """Why the fusion `name` ('rotary', 'attention', 'flashc.rotary', ...) did or did not
    happen in program: runs `passes` (a pipeline) on it up to the first pass that explains
    that fusion, then that pass, explaining it. The program is rewritten as far as that."""
    index = fusion_owner(passes, name)
    PassManager(list(passes[:index])).run(program, ctx)
    owner = passes[index]
    name = name.removeprefix("flashc.")
    return WhyNot(name, owner.name, owner.explain(program, ctx, name))

"""Merge projections that read the same input into one wider matmul.

q/k/v projections (and an MLP's gate/up projections) all multiply the same activation:
one GEMM over concatenated weights reads the activation once and launches one kernel
instead of three, which matters most at decode, where each launch costs as much as
the arithmetic. The outputs are sliced back apart (free views).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from flashc.aliasing import MutationInfo
from flashc.ir import Program
from flashc.pass_manager import PassContext, PassResult

aten = torch.ops.aten


def _has_bias(linear: fx.Node) -> bool:
    return len(linear.args) > 2 and linear.args[2] is not None


class MergeProjections:
    """linear(x, w_i[, b_i]) for i in a group sharing x -> one linear, then slices."""

    name = "merge_projections"
    requires = ("shapes",)
    preserves = ("canonical",)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
        mutations = MutationInfo.of(program.graph)
        for node in program.op_nodes():
            if node.target != aten.linear.default or node.kwargs:
                continue
            w = node.args[1]
            b = node.args[2] if len(node.args) > 2 else None
            if not (isinstance(w, fx.Node) and w.name in program.params) or mutations.is_written(w):
                continue
            if b is not None and not (isinstance(b, fx.Node) and b.name in program.params and
                                      not mutations.is_written(b)):
                continue
            groups[node.args[0]].append(node)
        stats = {"qkv": 0, "gate_up": 0, "other": 0}
        # linears with a bias and without merge apart (a zero bias would turn a -0.0 into +0.0): an SSM
        # layer's q, k, v (no bias) become one matmul beside its dt projection (with one)
        parted = [(x, [l for l in linears if _has_bias(l) == biased]) for x, linears in groups.items()
                  for biased in (False, True)]
        for x, linears in parted:
            if len(linears) < 2:
                continue
            # the merged matmul reads x where the first linear did: a write to x's storage
            # between them would be lost for the later ones
            first = min(linears, key=mutations.order.__getitem__)
            if any(mutations.written_between(x, first, l) for l in linears):
                continue
            weights = [program.params[l.args[1].name] for l in linears]
            if len({(w.dtype, w.shape[1]) for w in weights}) != 1:
                continue
            self._merge(program, x, linears, weights, _has_bias(linears[0]))
            kind = {3: "qkv", 2: "gate_up"}.get(len(linears), "other")
            stats[kind] += 1
        program.graph.eliminate_dead_code()
        program.drop_unused_params()
        return PassResult(any(stats.values()), stats)

    def _merge(self, program, x, linears, weights, with_bias):
        order = {n: i for i, n in enumerate(program.graph.nodes)}
        first = min(linears, key=order.__getitem__)
        base = linears[0].args[1].name
        w_node = program.add_param(f"{base}_merged", torch.cat(weights, 0))
        args = [x, w_node]
        if with_bias:
            bias = torch.cat([program.params[l.args[2].name] for l in linears], 0)
            args.append(program.add_param(f"{linears[0].args[2].name}_merged", bias))
        with program.graph.inserting_before(first):
            merged = program.graph.call_function(aten.linear.default, tuple(args))
            merged.meta.update({k: v for k, v in first.meta.items() if k in ("stack_trace", "nn_module_stack")})
            start = 0
            for l, w in zip(linears, weights):
                part = program.graph.call_function(aten.slice.Tensor, (merged, -1, start, start + w.shape[0]))
                start += w.shape[0]
                l.replace_all_uses_with(part)
        for l in linears:
            program.graph.erase_node(l)

"""PruneExperts: whole MoE experts removed, the ones the router sends least weight to.

Each fused `flashc.moe(x, router_logits, gate_up[E, 2F, H], down[E, H, F], top_k, normalize)`
whose router logits come from a linear over a stored weight (the router, one row per expert)
loses its N least important experts. Importance is the routing weight mass an expert received
over the calibration tokens (the weights `flashc.ops.moe_routing` gives it, summed): an expert
the router rarely picks, or picks with a small weight, contributes little to any token's output
(the criterion of expert pruning by routing frequency/weight, e.g. Lu et al. 2024,
arXiv:2402.14800, which also measure that a few dropped experts cost little). The dropped
experts' slices of gate_up and down go, and so do their router rows (and bias entries), so
the softmax runs over the kept experts only: a token's top-k is then chosen among them and
its weights renormalised over them, as a model trained with fewer experts would route.

Keeps `meta["val"]` current (shapes are propagated again after the rewrite). A layer whose
weights the graph writes in place, or whose router or router logits are read by anything
else (their shape changes), is skipped and listed with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from flashc.aliasing import MutationInfo
from flashc.errors import FlashcError
from flashc.ir import Program, propagate_shapes
from flashc.pass_manager import PassContext, PassResult
from flashc.passes.prune.layers import (
    CalibratedPrunePass, DenseLayer, Skipped, calibration_run, dense_layer, moe_layer, nbytes, real_weights,
    replace_param, replace_weight,
)
from flashc.passes.prune.masks import pruned_count
from flashc.passes.quantize.calibration import collect_statistics

MOE = torch.ops.flashc.moe.default


@dataclass
class MoeExperts:
    """One fused MoE layer and its router (the linear that computes its logits)."""

    name: str
    node: fx.Node  # the flashc.moe node
    router: DenseLayer
    experts: int
    drop: int  # experts to remove

    @property
    def top_k(self) -> int:
        return int(self.node.args[4])


class RoutingProbe:
    """Sums, per expert, the routing weight and the number of tokens a flashc.moe node gave it."""

    def __init__(self, experts: int, device) -> None:
        self.mass = torch.zeros(experts, dtype=torch.float64, device=device)
        self.picks = torch.zeros(experts, dtype=torch.long, device=device)
        self.tokens = 0

    def __call__(self, args: tuple) -> None:
        from flashc.ops import moe_routing

        logits, top_k, normalize = args[1], args[4], args[5]
        weights, experts = moe_routing(logits, top_k, normalize, torch.float32)
        self.mass.index_add_(0, experts.reshape(-1), weights.reshape(-1).double())
        self.picks.index_add_(0, experts.reshape(-1), torch.ones_like(experts.reshape(-1)))
        self.tokens += logits.shape[0]


class PruneExperts(CalibratedPrunePass):
    """experts-N / experts-X%: the least routed experts of every fused MoE layer removed."""

    name = "prune_experts"
    requires = ("shapes",)
    preserves = ("shapes", "canonical")  # shapes: propagated again after the rewrite
    changes_numerics = True  # measured by the accuracy rows (flashc.compile), not by the numeric check

    methods = ("experts",)
    refusal = "PruneExperts removes MoE experts; {spec} is another pass's"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        teacher = program.clone() if config.recover is not None else None  # the unpruned graph and weights
        layers, skipped = self._plan(program, MutationInfo.of(program.graph))
        details = [s.detail() for s in skipped]
        if not layers:
            if not skipped:
                raise FlashcError(f"pruning {config.spec} found no fused MoE layer (flashc.moe) in the graph; MoE "
                                  "blocks are fused at -O2 and above: compile at -O2 or -O3")
            return PassResult(False, {"skipped": len(skipped)}, details=details)
        probes = self._calibrate(program, layers)
        rows = [self._prune(program, layer, probes[layer.node])
                for layer in tqdm(layers, desc="pruning experts", unit="layer", disable=not self.progress)]
        program.recompile()
        propagate_shapes(program)
        details += rows
        details += [{"layer": "-", "op": "calibration", "status": "warning", "note": w}
                    for w in self.calibration.warnings]
        if teacher is not None:
            from flashc.passes.prune.recover import recover_pruned

            details += recover_pruned(program, teacher, config, self.calibration, self.progress)
        before = sum(r["params_before"] for r in rows)
        after = sum(r["params_after"] for r in rows)
        stats = {"moe_layers": len(layers), "skipped": len(skipped),
                 "experts_before": sum(r["experts_before"] for r in rows),
                 "experts_after": sum(r["experts_after"] for r in rows),
                 "params_before": before, "params_after": after,
                 "sparsity": round(1 - after / before, 4) if before else 0.0}
        return PassResult(True, stats, details=details)

    # ------------------------------------------------------------------------------ plan

    def _plan(self, program: Program, mutations: MutationInfo) -> tuple[list[MoeExperts], list[Skipped]]:
        layers, skipped = [], []
        for node in list(program.op_nodes()):
            if node.target is not MOE:
                continue
            moe = moe_layer(program, node)
            if moe is None:
                continue
            gate_up, down = program.params[moe.gate_up.name], program.params[moe.down.name]
            experts = gate_up.shape[0]
            router = dense_layer(program, node.args[1]) if isinstance(node.args[1], fx.Node) else None
            reason = _skip_reason(program, node, router, mutations, experts)
            if reason:
                weights = [gate_up, down] + ([program.params[router.weight.name]] if router is not None else [])
                skipped.append(Skipped(moe.name, "moe experts", reason, sum(w.numel() for w in weights),
                                       sum(nbytes(w) for w in weights)))
                continue
            drop = self.config.count if self.config.count is not None else pruned_count(self.config.sparsity,
                                                                                         experts)
            top_k = int(node.args[4])
            if experts - drop < top_k:
                raise FlashcError(f"pruning {self.config.spec}: MoE layer {moe.name} has {experts} experts and routes "
                                  f"each token to {top_k}; removing {drop} would leave {experts - drop}, fewer than "
                                  f"top_k: remove at most {experts - top_k} experts per layer")
            layers.append(MoeExperts(moe.name, node, router, experts, drop))
        return layers, skipped

    def _calibrate(self, program: Program, layers: list[MoeExperts]) -> dict[fx.Node, RoutingProbe]:
        config = self.config
        device = real_weights(program, [program.params[layer.router.weight.name] for layer in layers],
                              f"pruning ({config.spec})")
        probes = {layer.node: RoutingProbe(layer.experts, device) for layer in layers}
        calls = calibration_run(program, self.calibration, config, config.min_calibration_tokens,
                                "expert pruning", device)
        collect_statistics(program, {node: [probe] for node, probe in probes.items()}, calls, progress=self.progress)
        return probes

    # ---------------------------------------------------------------------------- rewrite

    def _prune(self, program: Program, layer: MoeExperts, probe: RoutingProbe) -> dict:
        node, router = layer.node, layer.router
        gate_up_node, down_node = node.args[2], node.args[3]
        gate_up, down = program.params[gate_up_node.name], program.params[down_node.name]
        weight = router.float_weight(program)  # [E, H] as the linear reads it
        bias = program.params[router.bias.name] if router.bias is not None else None
        keep = kept_experts(probe.mass, layer.drop)
        dropped = sorted(set(range(layer.experts)) - set(keep.tolist()))
        tensors = [gate_up, down, weight] + ([bias] if bias is not None else [])
        before = sum(t.numel() for t in tensors)
        bytes_before = sum(nbytes(t) for t in tensors)
        if dropped:
            replace_param(program, node, gate_up_node, gate_up[keep].contiguous())
            replace_param(program, node, down_node, down[keep].contiguous())
            replace_weight(program, router, weight[keep].contiguous())
            if bias is not None:
                replace_param(program, router.node, router.bias, bias[keep].contiguous())
        kept = len(keep)
        after = sum(t.numel() // layer.experts * kept for t in tensors)
        bytes_after = sum(nbytes(t) // layer.experts * kept for t in tensors)
        total = float(probe.mass.sum())
        removed = float(probe.mass[dropped].sum()) / total if total > 0 else 0.0
        picked = int(probe.picks[dropped].sum())
        return {"layer": layer.name, "op": "moe experts", "status": "pruned", "method": "experts",
                "pattern": self.config.pattern, "sparsity": 1 - after / before, "experts_before": layer.experts,
                "experts_after": kept, "dropped": dropped, "routing_mass_removed": removed,
                "params_before": before, "params_after": after, "bytes_before": bytes_before,
                "bytes_after": bytes_after, "rel_error": None,
                "note": f"{layer.experts} -> {kept} experts (dropped {dropped or 'none'}); routing mass removed "
                        f"{removed:.2%} ({picked} of {probe.tokens * layer.top_k} token picks)"}


def kept_experts(mass: torch.Tensor, drop: int) -> torch.Tensor:
    """Indices (ascending) of the experts that stay: all but the `drop` of least routing mass
    (ties: the later expert goes first, so the result does not depend on sort stability)."""
    experts = mass.shape[0]
    order = sorted(range(experts), key=lambda e: (float(mass[e]), -e))
    return torch.tensor(sorted(order[drop:]), dtype=torch.long)


def _skip_reason(program: Program, node: fx.Node, router: DenseLayer | None, mutations: MutationInfo,
                 experts: int) -> str | None:
    """Why the experts of this MoE node are not pruned (None: they are)."""
    if router is None:
        return "router logits are not a linear over a stored weight: the experts' router rows cannot be found"
    weight = program.params[router.weight.name]
    rows = weight.shape[1] if router.transposed else weight.shape[0]
    if rows != experts:
        return f"the router has {rows} outputs for {experts} experts"
    if any(mutations.is_written(n) for n in (node.args[2], node.args[3], router.weight)) or (
            router.bias is not None and mutations.is_written(router.bias)):
        return "a weight is written in place by the graph"
    if set(router.node.users) != {node}:
        return "the router logits are also read elsewhere (e.g. returned): their shape cannot change"
    if len(router.weight.users) > 1 or (router.view is not None and len(router.view.users) > 1):
        return "the router weight is also read elsewhere (tied): its shape cannot change"
    if router.bias is not None and not (router.bias.op == "placeholder" and router.bias.name in program.params
                                        and len(router.bias.users) == 1):
        return "the router bias is not a stored weight read by the router alone"
    if any(len(n.users) > 1 for n in (node.args[2], node.args[3])):
        return "the expert weights are also read elsewhere: their shape cannot change"
    return None

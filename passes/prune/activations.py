"""SparsifyActivations: online (contextual) activation sparsity, TEAL style, training-free.

Each value that linear layers read (the normed hidden state q/k/v read, the attention
output o reads, gate/up's input, down's input; a fused MoE's token input when
`PruneConfig.experts`) gets `flashc.sparsify(x, threshold)` in front of its readers, with a
threshold calibrated on calibration activations; per-input sparsities come from TEAL's
greedy allocation under the model-wide target (flashc.passes.prune.teal). Weights are
untouched: the saving is a GEMV that reads only the weight columns whose input survives
(the backends' later step). The report gives, per input, the sparsity measured on
held-out calibration rows (every other sampled row: thresholds come from the rest).

Left dense, and listed: the output head's input unless `PruneConfig.lm_head`, MoE routers,
MoE experts unless `PruneConfig.experts` (and always the experts' down projections, whose
input is computed inside flashc.moe), layers whose weight the graph writes.

Invariants kept: every write stays where it was (the new node reads x right before its
first reader, and readers separated by a write to x's storage get separate nodes); weights
are never modified; shapes (`meta["val"]`) hold (sparsify keeps x's shape and dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from flashc.aliasing import MutationInfo
from flashc.ir import Program
from flashc.pass_manager import PassContext, PassResult
from flashc.passes.prune.config import MAX_SPARSITY, PruneConfig
from flashc.passes.prune.layers import (
    Skipped, calibration_run, dense_layer, dense_skip_reason, input_groups, moe_layer, moe_skip_reason, nbytes,
    op_label, real_weights,
)
from flashc.passes.prune.teal import (
    ErrorCurve, greedy_allocation, sparsified_fraction, sparsity_levels, thresholds_for,
)
from flashc.passes.quantize.calibration import ActivationSample, CalibrationData, collect_statistics

SPARSIFY = torch.ops.flashc.sparsify.default


@dataclass
class InputSite:
    """A value that layers read and that gets one threshold: its readers, the weights that
    multiply it, and how many weights a token reads through it (the allocation's weight)."""

    x: fx.Node
    readers: list[fx.Node]  # nodes whose argument `position` becomes sparsify(x)
    position: int
    weights: list[torch.Tensor]  # [N, K] matrices multiplying x (a MoE layer's experts' gate_up)
    per_token: float
    name: str
    op: str
    base: str  # name of the threshold parameter, before "_sparsify_threshold"


class SparsifyActivations:
    """Online activation sparsity (TEAL): calibrated flashc.sparsify nodes before linear layers."""

    name = "sparsify_activations"
    requires = ("shapes",)
    preserves = ("shapes", "canonical")
    changes_numerics = True

    def __init__(self, config: PruneConfig | str, calibration: CalibrationData | None = None,
                 progress: bool = True) -> None:
        self.config = PruneConfig.parse(config)
        if self.config.method != "online":
            raise ValueError(f"SparsifyActivations is the online method; {self.config.spec} is another pass's")
        self.calibration = calibration
        self.progress = progress

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        mutations = MutationInfo.of(program.graph)
        sites, skipped = self._plan(program, mutations)
        details = [s.detail() for s in skipped]
        if not sites:
            return PassResult(False, {"skipped": len(skipped)}, details=details)
        samples = self._calibrate(program, sites)
        levels = sparsity_levels(config.allocation_step, MAX_SPARSITY)
        curves, held_out = [], []
        for site in sites:
            rows = samples[id(site)].tensor()
            fit, held = rows[0::2], rows[1::2]  # thresholds from one half, measured on the other
            gram = sum(w.float().t() @ w.float() for w in site.weights)
            curves.append(ErrorCurve(fit, gram, thresholds_for(fit, levels)))
            held_out.append(held)
        chosen = greedy_allocation(curves, [s.per_token for s in sites], levels, config.sparsity)
        reads_before = reads_after = 0.0
        inserted = 0
        for site, level, curve, held in zip(sites, chosen, curves, held_out):
            dtype = site.x.meta["val"].dtype
            threshold = torch.tensor(float(curve.thresholds[level]), dtype=dtype, device=site.weights[0].device)
            measured = sparsified_fraction(held, float(threshold)) if level else 0.0
            param = self._insert(program, site, threshold) if level else None
            inserted += bool(level)
            reads_before += site.per_token
            reads_after += site.per_token * (1 - measured)
            details.append({
                "layer": site.name, "op": site.op, "status": "sparsified" if level else "dense",
                "method": "online", "pattern": config.pattern, "sparsity": measured,
                "calibrated": float(levels[level]), "threshold": float(threshold), "threshold_param": param,
                "params_before": round(site.per_token), "params_after": round(site.per_token * (1 - measured)),
                "rel_error": curve(level) ** 0.5 if level else None,
                "note": (f"threshold {float(threshold):.3g}; {float(levels[level]):.1%} calibrated, "
                         f"{measured:.1%} held out" if level else "left dense by the allocation")})
        details += [{"layer": "-", "op": "calibration", "status": "warning", "note": w}
                    for w in self.calibration.warnings]
        stats = {"inputs": inserted, "skipped": len(skipped), "target": config.sparsity,
                 "sparsity": round(1 - reads_after / reads_before, 4) if reads_before else 0.0}
        return PassResult(inserted > 0, stats, details=details)

    def _plan(self, program: Program, mutations: MutationInfo) -> tuple[list[InputSite], list[Skipped]]:
        config = self.config
        dense, sites, skipped = [], [], []
        for node in list(program.op_nodes()):
            if node.target is torch.ops.flashc.moe.default:
                layer = moe_layer(program, node)
                if layer is None:
                    continue
                gate_up, down = program.params[layer.gate_up.name], program.params[layer.down.name]
                reason = moe_skip_reason(layer, mutations, config.experts)
                top_k = node.args[4]  # a token reads top_k experts' weights: the rows count those
                if reason:
                    skipped.append(Skipped(layer.name, "moe experts", reason,
                                           top_k * (gate_up[0].numel() + down[0].numel()),
                                           nbytes(gate_up) + nbytes(down)))
                    continue
                sites.append(InputSite(node.args[0], [node], 0, list(gate_up), top_k * gate_up[0].numel(),
                                       layer.name, "moe experts gate_up", layer.gate_up.name))
                skipped.append(Skipped(layer.name, "moe experts down", "the experts' down projections read an "
                                       "activation computed inside flashc.moe: not sparsified",
                                       top_k * down[0].numel(), nbytes(down)))
                continue
            layer = dense_layer(program, node)
            if layer is None:
                continue
            w = layer.float_weight(program)
            reason = dense_skip_reason(program, layer, mutations, config.lm_head)
            if reason:
                skipped.append(Skipped(layer.name, op_label(node), reason, w.numel(), nbytes(w)))
            else:
                dense.append(layer)
        for group in input_groups(dense, mutations):
            first = group[0]
            weights = [layer.float_weight(program) for layer in group]
            others = [layer.name.rsplit(".", 1)[-1] for layer in group[1:]]  # 'k_proj', 'v_proj'
            name = first.name + (f" (+{', '.join(others)})" if others else "")
            sites.append(InputSite(first.x, [layer.node for layer in group], first.x_index, weights,
                                   float(sum(w.numel() for w in weights)), name, op_label(first.node),
                                   first.weight.name))
        order = {n: i for i, n in enumerate(program.graph.nodes)}
        sites.sort(key=lambda s: order[s.readers[0]])
        return sites, skipped

    def _calibrate(self, program: Program, sites: list[InputSite]) -> dict[int, ActivationSample]:
        config = self.config
        device = real_weights(program, [w for s in sites for w in s.weights], f"online pruning ({config.spec})")
        calls = calibration_run(program, self.calibration, config, config.min_calibration_tokens,
                                "online pruning", device)
        stride = max(1, -(-calls.rows // config.sample_rows))
        samples: dict[int, ActivationSample] = {}
        probes: dict[fx.Node, list] = {}
        for site in sites:
            samples[id(site)] = ActivationSample(stride, config.sample_rows, site.position)
            probes.setdefault(site.readers[0], []).append(samples[id(site)])
        collect_statistics(program, probes, calls, progress=self.progress)
        return samples

    def _insert(self, program: Program, site: InputSite, threshold: torch.Tensor) -> str:
        """sparsify(x, threshold) right before the first reader, read by every reader; returns
        the threshold parameter's name."""
        graph = program.graph
        param = program.add_param(f"{site.base}_sparsify_threshold", threshold)
        first = site.readers[0]
        with graph.inserting_before(first):
            node = graph.call_function(SPARSIFY, (site.x, param))
        node.meta.update({k: v for k, v in first.meta.items() if k in ("stack_trace", "nn_module_stack")})
        node.meta["val"] = site.x.meta["val"]
        for reader in site.readers:
            args = list(reader.args)
            args[site.position] = node
            reader.args = tuple(args)
        return param.name

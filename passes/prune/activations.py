"""SparsifyActivations: online (contextual) activation sparsity, TEAL style, training-free.

Each value that linear layers read (the normed hidden state q/k/v read, the attention
output o reads, gate/up's input, down's input; with `PruneConfig.experts`, a fused MoE's
token input and its experts' intermediate silu(gate) * up) gets a threshold calibrated on
calibration activations: `flashc.sparsify(x, threshold)` in front of its readers, or, for
the experts' intermediate, which exists only inside flashc.moe, the flashc.moe node
rewritten to `flashc.moe_sparse(..., threshold)`. Per-input sparsities come from TEAL's
greedy allocation under the target, in every transformer block by default
(flashc.passes.prune.teal). Weights are untouched: the saving is a GEMV that reads only the
weight columns whose input survives (the backends' later step). The report gives, per
input, the sparsity measured on held-out calibration rows (every other sampled row:
thresholds come from the rest).

Left dense, and listed: the output head's input unless `PruneConfig.lm_head`, MoE routers,
MoE experts unless `PruneConfig.experts`, layers whose weight the graph writes.

Invariants kept: every write stays where it was (the new node reads x right before its
first reader, and readers separated by a write to x's storage get separate nodes; a
flashc.moe becomes flashc.moe_sparse in place); weights are never modified; shapes
(`meta["val"]`) hold (sparsify keeps x's shape and dtype, moe_sparse flashc.moe's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from flashc.aliasing import MutationInfo
from flashc.ir import Program
from flashc.ops import moe_routing
from flashc.pass_manager import PassContext, PassResult
from flashc.passes.prune.config import MAX_SPARSITY, PruneConfig
from flashc.passes.prune.layers import (
    CalibratedPrunePass, Skipped, calibration_run, dense_layer, dense_skip_reason, input_groups, moe_layer,
    moe_skip_reason, nbytes, op_label, real_weights,
)
from flashc.passes.prune.teal import (
    ErrorCurve, channel_normalized, greedy_allocation, sparsified_fraction, sparsity_levels, thresholds_for,
)
from flashc.passes.quantize.calibration import ActivationSample, collect_statistics

SPARSIFY = torch.ops.flashc.sparsify.default
MOE = torch.ops.flashc.moe.default
MOE_SPARSE = torch.ops.flashc.moe_sparse.default


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
    # the experts' intermediate silu(gate) * up inside the flashc.moe reader (x is that node),
    # sparsified by rewriting it to flashc.moe_sparse; weights are then the experts' down
    intermediate: bool = False


class SparsifyActivations(CalibratedPrunePass):
    """Online activation sparsity (TEAL): calibrated flashc.sparsify nodes before linear layers."""

    name = "sparsify_activations"
    requires = ("shapes",)
    preserves = ("shapes", "canonical")
    changes_numerics = True

    methods = ("online",)
    refusal = "SparsifyActivations is the online method; {spec} is another pass's"

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
        scales: dict[int, torch.Tensor] = {}  # score "weighted": each input channel's column scale c
        for site in sites:
            if site.intermediate:  # each routed pair's row through its own expert, weighted by its routing weight
                rows, weights, experts = samples[id(site)].tensors()
                fit, held = fit_held_split(rows.shape[0])
                gram = torch.stack([w.float().t() @ w.float() for w in site.weights])
                if config.score == "weighted":  # one threshold a channel for every expert: their mean column
                    scales[id(site)], rows, gram = weighted(rows, gram, gram.mean(0))
                curves.append(ErrorCurve(rows[fit], gram, thresholds_for(rows[fit], levels), weights[fit],
                                         experts[fit]).settle())
            else:
                rows = samples[id(site)].tensor()
                fit, held = fit_held_split(rows.shape[0])  # thresholds from one half, measured on the other
                gram = sum(w.t() @ w for w in (channel_normalized(w, rows[fit]) for w in site.weights))
                if config.score == "weighted":
                    scales[id(site)], rows, gram = weighted(rows, gram, gram)
                curves.append(ErrorCurve(rows[fit], gram, thresholds_for(rows[fit], levels)).settle())
            held_out.append(rows[held])
        chosen = [0] * len(sites)
        for group in allocation_groups(sites, config.allocation):
            picked = greedy_allocation([curves[i] for i in group], [sites[i].per_token for i in group], levels,
                                       config.sparsity)
            for i, level in zip(group, picked):
                chosen[i] = level
        reads_before = reads_after = 0.0
        inserted = 0
        for site, level, curve, held in zip(sites, chosen, curves, held_out):
            dtype = site.x.meta["val"].dtype
            score = float(curve.thresholds[level])  # of |x|, or of |x| c with the weighted score
            threshold = torch.tensor(score, dtype=dtype, device=site.weights[0].device)
            measured = sparsified_fraction(held, float(threshold)) if level else 0.0
            if id(site) in scales:  # |x_i| c_i > t is |x_i| > t / c_i: one threshold a channel
                threshold = (score / scales[id(site)].double()).to(dtype=dtype, device=site.weights[0].device)
            param = self._insert(program, site, threshold) if level else None
            inserted += bool(level)
            reads_before += site.per_token
            reads_after += site.per_token * (1 - measured)
            details.append({
                "layer": site.name, "op": site.op, "status": "sparsified" if level else "dense",
                "method": "online", "pattern": config.pattern, "sparsity": measured,
                "calibrated": float(levels[level]), "threshold": score, "threshold_param": param,
                "params_before": round(site.per_token), "params_after": round(site.per_token * (1 - measured)),
                "rel_error": curve(level) ** 0.5 if level else None,
                "note": (f"threshold {score:.3g}"
                         f"{' (of |x| c, per channel)' if id(site) in scales else ''}; "
                         f"{float(levels[level]):.1%} calibrated, {measured:.1%} held out"
                         if level else "left dense by the allocation")})
        details += [{"layer": "-", "op": "calibration", "status": "warning", "note": w}
                    for w in self.calibration.warnings]
        stats = {"inputs": inserted, "skipped": len(skipped), "target": config.sparsity,
                 "sparsity": round(1 - reads_after / reads_before, 4) if reads_before else 0.0}
        return PassResult(inserted > 0, stats, details=details)

    def _plan(self, program: Program, mutations: MutationInfo) -> tuple[list[InputSite], list[Skipped]]:
        config = self.config
        dense, sites, skipped = [], [], []
        for node in list(program.op_nodes()):
            if node.target is MOE:
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
                sites.append(InputSite(node, [node], 0, list(down), top_k * down[0].numel(), layer.name,
                                       "moe experts down", layer.down.name, intermediate=True))
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

    def _calibrate(self, program: Program, sites: list[InputSite]
                   ) -> dict[int, ActivationSample | RoutedIntermediateSample]:
        config = self.config
        device = real_weights(program, [w for s in sites for w in s.weights], f"online pruning ({config.spec})")
        calls = calibration_run(program, self.calibration, config, config.min_calibration_tokens,
                                "online pruning", device)
        stride = max(1, -(-calls.rows // config.sample_rows))
        samples: dict[int, ActivationSample | RoutedIntermediateSample] = {}
        probes: dict[fx.Node, list] = {}
        for site in sites:
            if site.intermediate:
                top_k = site.readers[0].args[4]
                samples[id(site)] = RoutedIntermediateSample(max(1, -(-calls.rows * top_k // config.sample_rows)),
                                                             config.sample_rows)
            else:
                samples[id(site)] = ActivationSample(stride, config.sample_rows, site.position)
            probes.setdefault(site.readers[0], []).append(samples[id(site)])
        collect_statistics(program, probes, calls, progress=self.progress)
        return samples

    def _insert(self, program: Program, site: InputSite, threshold: torch.Tensor) -> str:
        """sparsify(x, threshold) right before the first reader, read by every reader (or, for
        the experts' intermediate, flashc.moe rewritten to flashc.moe_sparse); returns the
        threshold parameter's name."""
        graph = program.graph
        param = program.add_param(f"{site.base}_sparsify_threshold", threshold)
        first = site.readers[0]
        if site.intermediate:  # flashc.moe(...) -> flashc.moe_sparse(..., threshold), args otherwise as they were
            first.target = MOE_SPARSE
            first.args = (*first.args[:6], param)
            return param.name
        with graph.inserting_before(first):
            node = graph.call_function(SPARSIFY, (site.x, param))
        node.meta.update({k: v for k, v in first.meta.items() if k in ("stack_trace", "nn_module_stack")})
        node.meta["val"] = site.x.meta["val"]
        for reader in site.readers:
            args = list(reader.args)
            args[site.position] = node
            reader.args = tuple(args)
        return param.name


def weighted(rows: torch.Tensor, gram: torch.Tensor, columns: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PruneConfig.score "weighted": (c, rows * c, gram / (c c^T)) with c = column_scale(columns). The error
    curve of the scaled rows through the scaled Gram matrix is the original one, its thresholds now on
    |x_i| c_i (WINA's score, Chen et al. 2025, arXiv:2505.19427, without its orthogonalizing transform of the
    weights: the criterion is then a heuristic)."""
    c = column_scale(columns)
    return c, rows.float() * c, gram / (c[..., :, None] * c[..., None, :])


def column_scale(gram: torch.Tensor) -> torch.Tensor:
    """c_i = sqrt(G_ii), the norm of the readers' (channel-normalized) weight column input i multiplies;
    columns of zeros take the smallest positive norm (a zero input channel's score stays 0)."""
    c = gram.diagonal().clamp_min(0).sqrt()
    positive = c[c > 0]
    return torch.where(c > 0, c, positive.min() if positive.numel() else torch.ones_like(c))


def fit_held_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the sampled rows that fit the thresholds and of those that measure them: a seeded
    random half each. Not every other row: rows are sampled at a fixed stride, which can put the
    first token of every calibration window (unlike the others: an attention sink) in one half
    only; on smollm2-135m, split that way, the held-out sparsity was 17.8% for a 20% target (from
    the fourth layer on), split at random 20.9% (2026-12-06)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[0::2].sort().values, order[1::2].sort().values


def allocation_groups(sites: list[InputSite], allocation: str) -> list[list[int]]:
    """The sites (indices) each greedy run allocates the target over: all of them ("model"), or
    those of one transformer block each ("block": the module path up to its first layer index,
    'model.layers.3'); sites outside any block (an output head) form one group of their own."""
    if allocation == "model":
        return [list(range(len(sites)))]
    groups: dict[str, list[int]] = {}
    for i, site in enumerate(sites):
        block = re.match(r"(.*?[._]\d+)([._]|$)", site.name)
        # capture names some layers by module path ('model.layers.3.mlp'), some by parameter ('model_layers_3_mlp')
        groups.setdefault(block.group(1).replace(".", "_") if block else "", []).append(i)
    return list(groups.values())


@dataclass
class RoutedIntermediateSample:
    """Every `stride`-th routed (token, expert) pair of a flashc.moe node during calibration, at
    most `limit`: the pair's intermediate silu(gate) * up (what the expert's down projection
    reads), its routing weight and its expert, so that an error curve weighs each row through
    its own expert's down projection as the layer's output does."""

    stride: int
    limit: int
    rows: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    experts: list[torch.Tensor] = field(default_factory=list)
    seen: int = 0
    kept: int = 0

    def __call__(self, args: tuple) -> None:
        x, logits, gate_up, down, top_k, normalize = args[:6]
        weights, experts = moe_routing(logits, top_k, normalize, torch.float32)
        pairs = weights.numel()
        first = (-self.seen) % self.stride
        picked = torch.arange(first, pairs, self.stride, device=x.device)[: self.limit - self.kept]
        self.seen += pairs
        if picked.numel() == 0:
            return
        token, expert = picked // top_k, experts.flatten()[picked]
        f = down.shape[-1]
        rows = x.new_empty((picked.numel(), f), dtype=torch.float32)
        for e in expert.unique().tolist():
            mine = expert == e
            gu = x[token[mine]].float() @ gate_up[e].float().t()
            rows[mine] = F.silu(gu[:, :f]) * gu[:, f:]
        self.rows.append(rows)
        self.weights.append(weights.flatten()[picked])
        self.experts.append(expert)
        self.kept += picked.numel()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sampled intermediates [R, F] (float32), their routing weights [R] and experts [R]."""
        if not self.rows:
            return torch.zeros(0, 0), torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.cat(self.rows), torch.cat(self.weights), torch.cat(self.experts)

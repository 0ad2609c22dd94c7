"""PruneFfnChannels: structured pruning of FFN intermediate channels (smaller dense weights).

Each FFN, `down(act(gate(x)) * up(x))` or `down(act(up(x)))`, keeps the channels of most
importance: a Wanda-style score (Sun et al. 2023, arXiv:2306.11695, summed over the weights
a channel owns, as the structured "Wanda-sp" variant of An et al. 2024, arXiv:2312.11983),

    score_j = sum_i (|W_gate[j, i]| + |W_up[j, i]|) ||x_i|| + ||h_j|| sum_o |W_down[o, j]|

with ||x_i|| the norm of FFN input feature i and ||h_j|| that of down's input channel j over
the calibration tokens. The rows of gate/up and the columns of down of the other channels
go: the weights, the graph's shapes and the work get smaller, and no sparse kernel is needed.

Recognised forms (after fusion, -O2 and above): gate and up linears (or one merged gate|up
linear sliced in two halves, -O3) into flashc.swiglu / flashc.geglu; one linear into
gelu / relu / silu; then one down linear. A fused MoE's experts when
`PruneConfig.experts` (each expert keeps its own channels, the same number for all).
Shapes change, so every node's `meta["val"]` is propagated again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from flashc.aliasing import MutationInfo
from flashc.errors import FlashcError
from flashc.ir import Program, module_path, propagate_shapes
from flashc.pass_manager import PassContext, PassResult
from flashc.passes.prune.config import PruneConfig
from flashc.passes.prune.layers import (
    CalibratedPrunePass, Skipped, calibration_run, dense_layer, moe_layer, moe_skip_reason, nbytes, real_weights,
    replace_param,
)
from flashc.passes.prune.masks import pruned_count
from flashc.passes.prune.wanda import column_norms
from flashc.passes.quantize.calibration import (
    InputStatistics, LinearProbe, MoeProbe, collect_statistics,
)

aten = torch.ops.aten
GATED = {torch.ops.flashc.swiglu.default: "swiglu", torch.ops.flashc.geglu.default: "geglu"}
UNARY = {aten.gelu.default: "gelu", aten.relu.default: "relu", aten.silu.default: "silu"}


@dataclass
class Ffn:
    """One FFN: its projections into the intermediate channels (`ins`: gate then up, or the
    single up; `merged`: one linear whose output halves are gate and up), its down projection."""

    name: str
    kind: str  # "swiglu", "geglu", "gelu", ... or "moe"
    down: fx.Node | None = None  # aten.linear reading the activation
    ins: list[fx.Node] = field(default_factory=list)  # aten.linear nodes into the channels
    merged: fx.Node | None = None  # aten.linear of gate|up
    slices: tuple[fx.Node, fx.Node] | None = None  # its gate and up halves
    moe: fx.Node | None = None

    @property
    def readers(self) -> list[fx.Node]:
        return [self.merged] if self.merged is not None else self.ins


class PruneFfnChannels(CalibratedPrunePass):
    """ffn-X%: the X% least important intermediate channels of every FFN removed."""

    name = "prune_ffn_channels"
    requires = ("shapes",)
    preserves = ("shapes", "canonical")  # shapes: propagated again after the rewrite
    changes_numerics = True

    methods = ("ffn",)
    refusal = "PruneFfnChannels prunes FFN channels; {spec} is another pass's"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        teacher = program.clone() if self.config.recover is not None else None  # the unpruned graph and weights
        mutations = MutationInfo.of(program.graph)
        ffns, skipped = self._plan(program, mutations)
        details = [s.detail() for s in skipped]
        if not ffns:
            if not skipped:
                raise FlashcError(f"pruning {self.config.spec} found no FFN (linear -> swiglu/geglu/gelu/relu/silu -> "
                                  "linear, or a fused MoE) in the graph; gated FFNs are recognised once fused: "
                                  "compile at -O2 or above")
            return PassResult(False, {"skipped": len(skipped)}, details=details)
        statistics = self._calibrate(program, ffns)
        rows = [self._prune(program, ffn, statistics[id(ffn)])
                for ffn in tqdm(ffns, desc="pruning FFN channels", unit="ffn", disable=not self.progress)]
        program.recompile()
        propagate_shapes(program)
        details += rows
        details += [{"layer": "-", "op": "calibration", "status": "warning", "note": w}
                    for w in self.calibration.warnings]
        if teacher is not None:  # the narrower weights distilled against the unpruned program
            from flashc.passes.prune.recover import recover_pruned

            details += recover_pruned(program, teacher, self.config, self.calibration, self.progress)
        before = sum(r["params_before"] for r in rows)
        after = sum(r["params_after"] for r in rows)
        stats = {"ffns": len(ffns), "skipped": len(skipped), "params_before": before, "params_after": after,
                 "sparsity": round(1 - after / before, 4) if before else 0.0}
        return PassResult(True, stats, details=details)

    # ------------------------------------------------------------------------------ plan

    def _plan(self, program: Program, mutations: MutationInfo) -> tuple[list[Ffn], list[Skipped]]:
        ffns, skipped = [], []
        for node in list(program.op_nodes()):
            if node.target is torch.ops.flashc.moe.default:
                layer = moe_layer(program, node)
                if layer is None:
                    continue
                gate_up, down = program.params[layer.gate_up.name], program.params[layer.down.name]
                reason = moe_skip_reason(layer, mutations, self.config.experts)
                if reason:
                    skipped.append(Skipped(layer.name, "moe experts", reason, gate_up.numel() + down.numel(),
                                           nbytes(gate_up) + nbytes(down)))
                else:
                    ffns.append(Ffn(layer.name, "moe", moe=node))
                continue
            if node.target not in GATED and node.target not in UNARY:
                continue
            ffn = match_ffn(program, node)
            if ffn is None:
                continue
            weights = [n.args[1] for n in (*ffn.readers, ffn.down)]
            reason = None
            if any(mutations.is_written(w) for w in weights):
                reason = "a weight is written in place by the graph"
            elif any(len(w.users) > 1 for w in weights):
                reason = "a weight is also read elsewhere (tied): its shape cannot change"
            if reason:
                numel = sum(program.params[w.name].numel() for w in weights)
                skipped.append(Skipped(ffn.name, f"ffn ({ffn.kind})", reason, numel,
                                       sum(nbytes(program.params[w.name]) for w in weights)))
            else:
                ffns.append(ffn)
        return ffns, skipped

    def _calibrate(self, program: Program, ffns: list[Ffn]) -> dict[int, object]:
        config = self.config
        params = [program.params[n.args[1].name] for f in ffns if f.moe is None for n in (*f.readers, f.down)]
        params += [program.params[f.moe.args[i].name] for f in ffns if f.moe is not None for i in (2, 3)]
        device = real_weights(program, params, f"pruning ({config.spec})")
        probes: dict[fx.Node, list] = {}
        statistics: dict[int, object] = {}
        for f in ffns:
            if f.moe is not None:
                gate_up, down = f.moe.args[2:4]
                experts, _, h = program.params[gate_up.name].shape
                width = program.params[down.name].shape[-1]
                probe = MoeProbe([InputStatistics(h, device) for _ in range(experts)],
                                 [InputStatistics(width, device) for _ in range(experts)])
                probes.setdefault(f.moe, []).append(probe)
                statistics[id(f)] = probe
                continue
            first = f.readers[0]
            x_stats = InputStatistics(program.params[first.args[1].name].shape[1], device)
            h_stats = InputStatistics(program.params[f.down.args[1].name].shape[1], device)
            probes.setdefault(first, []).append(LinearProbe(x_stats, 0))
            probes.setdefault(f.down, []).append(LinearProbe(h_stats, 0))
            statistics[id(f)] = (x_stats, h_stats)
        calls = calibration_run(program, self.calibration, config, config.min_calibration_tokens,
                                "FFN channel pruning", device)
        collect_statistics(program, probes, calls, progress=self.progress)
        return statistics

    # ---------------------------------------------------------------------------- rewrite

    def _prune(self, program: Program, ffn: Ffn, statistics) -> dict:
        if ffn.moe is not None:
            return self._prune_moe(program, ffn, statistics)
        x_stats, h_stats = statistics
        p = lambda n: program.params[n.args[1].name]  # noqa: E731
        down = p(ffn.down)
        if ffn.merged is not None:
            ins = list(p(ffn.merged).chunk(2, dim=0))
        else:
            ins = [p(n) for n in ffn.ins]
        biases = _biases(program, ffn)
        width = down.shape[1]
        scores = channel_scores(ins, down, column_norms(x_stats.hessian()), column_norms(h_stats.hessian()))
        keep = kept_channels(scores, self.config.sparsity)
        before = sum(w.numel() for w in ins) + down.numel() + sum(b.numel() for b in biases if b is not None)
        new_ins = [w[keep] for w in ins]
        new_biases = [None if b is None else b[keep] for b in biases]
        if ffn.merged is not None:
            _swap(program, ffn.merged, 1, torch.cat(new_ins))
            if new_biases[0] is not None:
                _swap(program, ffn.merged, 2, torch.cat(new_biases))
            for half, node in enumerate(ffn.slices):
                args = list(node.args)
                args[2:4] = [half * len(keep), (half + 1) * len(keep)]
                node.args = tuple(args)
        else:
            for node, w, b in zip(ffn.ins, new_ins, new_biases):
                _swap(program, node, 1, w)
                if b is not None:
                    _swap(program, node, 2, b)
        _swap(program, ffn.down, 1, down[:, keep].contiguous())
        after = sum(w.numel() for w in new_ins) + down.shape[0] * len(keep) + sum(
            b.numel() for b in new_biases if b is not None)
        share = float(scores[keep].sum() / scores.sum()) if scores.sum() > 0 else 1.0
        return self._detail(ffn, width, len(keep), before, after, down.element_size(), share)

    def _prune_moe(self, program: Program, ffn: Ffn, probe: MoeProbe) -> dict:
        node = ffn.moe
        gate_up_node, down_node = node.args[2], node.args[3]
        gate_up, down = program.params[gate_up_node.name], program.params[down_node.name]
        experts, width = down.shape[0], down.shape[-1]
        new_gate_up, new_down, shares = [], [], []
        for e in range(experts):
            x_stats, h_stats = probe.gate_up[e], probe.down[e]
            reached = x_stats.rows > 0  # an expert no token reached: scored on its weights alone
            x_norm = column_norms(x_stats.hessian()) if reached else torch.ones(gate_up.shape[-1])
            h_norm = column_norms(h_stats.hessian()) if reached else torch.ones(width)
            ins = list(gate_up[e].chunk(2, dim=0))
            scores = channel_scores(ins, down[e], x_norm, h_norm)
            keep = kept_channels(scores, self.config.sparsity)
            new_gate_up.append(torch.cat([w[keep] for w in ins]))
            new_down.append(down[e][:, keep])
            shares.append(float(scores[keep].sum() / scores.sum()) if scores.sum() > 0 else 1.0)
        replace_param(program, node, gate_up_node, torch.stack(new_gate_up))
        replace_param(program, node, down_node, torch.stack(new_down))
        kept = new_down[0].shape[-1]
        before, after = gate_up.numel() + down.numel(), sum(t.numel() for t in (*new_gate_up, *new_down))
        return self._detail(ffn, width, kept, before, after, down.element_size(), min(shares),
                            "worst expert's ")

    def _detail(self, ffn: Ffn, width: int, kept: int, before: int, after: int, element_size: int, share: float,
                whose: str = "") -> dict:
        return {"layer": ffn.name, "op": f"ffn ({ffn.kind})", "status": "pruned", "method": "ffn",
                "pattern": self.config.pattern, "sparsity": 1 - after / before, "channels_before": width,
                "channels_after": kept, "params_before": before, "params_after": after,
                "bytes_before": before * element_size, "bytes_after": after * element_size, "rel_error": None,
                "note": f"{width} -> {kept} channels, {whose}importance kept {share:.1%}"}


def channel_scores(ins: list[torch.Tensor], down: torch.Tensor, x_norm: torch.Tensor, h_norm: torch.Tensor
                   ) -> torch.Tensor:
    """Wanda-style importance of each intermediate channel [F]: ins are the [F, H] projections
    into the channels (gate, up), down [H, F]; x_norm [H] and h_norm [F] the inputs' norms."""
    score = sum(w.detach().abs().float() @ x_norm.float() for w in ins)
    return score + h_norm.float() * down.detach().abs().float().sum(0)


def kept_channels(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Indices (ascending) of the channels that stay: all but the pruned_count lowest scores."""
    keep = scores.shape[0] - pruned_count(sparsity, scores.shape[0])
    return scores.topk(keep).indices.sort().values


# ---------------------------------------------------------------------------- matching


def _plain_linear(program: Program, node) -> bool:
    """An aten.linear whose weight is a [N, K] parameter read directly (no transpose)."""
    if not isinstance(node, fx.Node) or node.target is not aten.linear.default:
        return False
    layer = dense_layer(program, node)
    bias = layer.bias if layer is not None else None
    return (layer is not None and not layer.transposed and layer.view is None
            and (bias is None or (bias.op == "placeholder" and bias.name in program.params)))


def match_ffn(program: Program, act: fx.Node) -> Ffn | None:
    """The FFN around an activation node, or None when the graph around it is another shape."""
    if len(act.users) != 1:
        return None
    down = next(iter(act.users))
    if not _plain_linear(program, down) or down.args[0] is not act:
        return None
    width = program.params[down.args[1].name].shape[1]
    name = module_path(down).rsplit(".", 1)[0] or down.args[1].name
    if act.target in UNARY:
        up = act.args[0]
        if not _plain_linear(program, up) or len(up.users) != 1 or program.params[up.args[1].name].shape[0] != width:
            return None
        return Ffn(name, UNARY[act.target], down, [up])
    gate, up = act.args[0], act.args[1]
    if _plain_linear(program, gate) and _plain_linear(program, up):
        if gate.args[0] is not up.args[0] or len(gate.users) != 1 or len(up.users) != 1:
            return None
        if any(program.params[n.args[1].name].shape[0] != width for n in (gate, up)):
            return None
        if (len(gate.args) > 2 and gate.args[2] is not None) != (len(up.args) > 2 and up.args[2] is not None):
            return None
        return Ffn(name, GATED[act.target], down, [gate, up])
    halves = _halves(program, gate, up, width)
    if halves is None:
        return None
    return Ffn(name, GATED[act.target], down, merged=halves, slices=(gate, up))


def _halves(program: Program, gate, up, width: int) -> fx.Node | None:
    """The merged gate|up linear when gate and up are its output's [0, F) and [F, 2F) slices."""
    if not all(isinstance(n, fx.Node) and n.target is aten.slice.Tensor for n in (gate, up)):
        return None
    merged = gate.args[0]
    if up.args[0] is not merged or not _plain_linear(program, merged) or set(merged.users) != {gate, up}:
        return None
    if program.params[merged.args[1].name].shape[0] != 2 * width:
        return None
    ndim = merged.meta["val"].dim()
    for node, (start, end) in ((gate, (0, width)), (up, (width, 2 * width))):
        args = list(node.args) + [1] * (5 - len(node.args))
        if len(node.args) < 4 or args[1] % ndim != ndim - 1 or args[2:5] != [start, end, 1] or node.kwargs:
            return None
    return merged


def _biases(program: Program, ffn: Ffn) -> list[torch.Tensor | None]:
    """The biases of the projections into the channels, split like their weights."""
    if ffn.merged is not None:
        bias = ffn.merged.args[2] if len(ffn.merged.args) > 2 else None
        return [None, None] if bias is None else list(program.params[bias.name].chunk(2))
    return [program.params[n.args[2].name] if len(n.args) > 2 and n.args[2] is not None else None
            for n in ffn.ins]


def _swap(program: Program, node: fx.Node, index: int, value: torch.Tensor) -> None:
    """node's parameter argument `index` becomes a new parameter holding value."""
    replace_param(program, node, node.args[index], value.contiguous())

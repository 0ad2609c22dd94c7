"""PruneWeights: offline weight pruning of linear layers (and, when asked, MoE experts).

Magnitude, Wanda or SparseGPT, unstructured or N:M (2:4). A pruned layer reads a new
parameter of the same shape and dtype with zeros where weights were pruned: dense tensors
here (a sparse kernel that skips the zeros, or 2:4 sparse tensor cores, is the backends'
later step); the report gives per layer the pattern, the sparsity reached and the nonzero
parameters before and after.

Left dense, and listed with the reason: the output head unless `PruneConfig.lm_head`, MoE
routers, MoE experts unless `PruneConfig.experts`, weights the graph writes in place, and
for an N:M pattern layers whose input size does not divide into groups of M.

Calibration (Wanda's column norms, SparseGPT's Hessians) is one run of the float model
over the calibration data (flashc.passes.quantize.calibration), not the papers' layer-by-
layer run on the partly pruned model.

Invariants kept: every write stays where it was (only weight arguments change); a weight the
graph writes is never pruned; the model's own tensors are never modified (pruned weights are
new parameters); shapes (`meta["val"]`) are unchanged.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from flashc.aliasing import MutationInfo
from flashc.ir import Program
from flashc.pass_manager import PassContext, PassResult
from flashc.passes.prune.config import PruneConfig
from flashc.passes.prune.layers import (
    CalibratedPrunePass, DenseLayer, MoeLayer, Skipped, calibration_run, dense_layer, dense_skip_reason, input_groups,
    moe_layer, moe_skip_reason, nbytes, nonzeros, op_label, real_weights, relative_error, replace_param, replace_weight,
)
from flashc.passes.prune.magnitude import magnitude_mask
from flashc.passes.prune.sparsegpt import sparsegpt_prune
from flashc.passes.prune.wanda import column_norms, wanda_mask
from flashc.passes.quantize.calibration import (
    InputStatistics, LinearProbe, MoeProbe, collect_statistics,
)


class PruneWeights(CalibratedPrunePass):
    """Offline pruning (magnitude, Wanda, SparseGPT; unstructured or N:M) of linear layers."""

    name = "prune_weights"
    requires = ("shapes",)
    preserves = ("shapes", "canonical")
    changes_numerics = True  # measured by the accuracy rows (flashc.compile), not by the numeric check

    methods = ("magnitude", "wanda", "sparsegpt")
    refusal = "PruneWeights prunes weights; {spec} is another pass's (flashc.passes.prune)"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        teacher = program.clone() if config.recover is not None else None  # the unpruned graph and weights
        mutations = MutationInfo.of(program.graph)
        dense, moes, skipped = self._plan(program, mutations)
        details = [s.detail() for s in skipped]
        if not dense and not moes:
            return PassResult(False, {"skipped": len(skipped)}, details=details)
        groups = input_groups(dense, mutations)
        statistics: dict[fx.Node, object] = {}
        if config.method != "magnitude":  # the weights' input statistics (recovery reads the text itself)
            self._calibrate(program, groups, moes, statistics)
        else:
            real_weights(program, [layer.float_weight(program) for layer in dense]
                         + [program.params[m.gate_up.name] for m in moes], f"pruning ({config.spec})")
        work = [(layer, statistics.get(group[0].node)) for group in groups for layer in group]
        work += [(m, statistics.get(m.node)) for m in moes]
        rows = []
        for layer, stats in tqdm(work, desc=f"pruning ({config.method})", unit="layer", disable=not self.progress):
            rows.append(self._prune_dense(program, layer, stats) if isinstance(layer, DenseLayer)
                        else self._prune_moe(program, layer, stats))
        details += rows
        if config.needs_calibration:
            details += [{"layer": "-", "op": "calibration", "status": "warning", "note": w}
                        for w in self.calibration.warnings]
        if teacher is not None:
            from flashc.passes.prune.recover import recover_pruned

            details += recover_pruned(program, teacher, config, self.calibration, self.progress)
        numel = sum(r["numel"] for r in rows)
        after = sum(r["params_after"] for r in rows)
        stats = {"layers": len(dense), "moe_layers": len(moes), "skipped": len(skipped),
                 "params_before": sum(r["params_before"] for r in rows), "params_after": after,
                 "sparsity": round(1 - after / numel, 4) if numel else 0.0}
        return PassResult(True, stats, details=details)

    def _plan(self, program: Program, mutations: MutationInfo
              ) -> tuple[list[DenseLayer], list[MoeLayer], list[Skipped]]:
        config = self.config
        group = config.n_m[1] if config.n_m else None
        dense, moes, skipped = [], [], []
        for node in list(program.op_nodes()):
            if node.target is torch.ops.flashc.moe.default:
                layer = moe_layer(program, node)
                if layer is None:
                    continue
                weights = [program.params[p.name] for p in (layer.gate_up, layer.down)]
                reason = moe_skip_reason(layer, mutations, config.experts)
                if reason is None and group and any(w.shape[-1] % group for w in weights):
                    reason = (f"input sizes {tuple(w.shape[-1] for w in weights)} do not divide into groups of "
                              f"{group} ({config.pattern})")
                if reason:
                    skipped.append(Skipped(layer.name, "moe experts", reason, sum(w.numel() for w in weights),
                                           sum(nbytes(w) for w in weights)))
                else:
                    moes.append(layer)
                continue
            layer = dense_layer(program, node)
            if layer is None:
                continue
            w = layer.float_weight(program)
            reason = dense_skip_reason(program, layer, mutations, config.lm_head)
            if reason is None and group and w.shape[1] % group:
                reason = f"input size {w.shape[1]} does not divide into groups of {group} ({config.pattern})"
            if reason:
                skipped.append(Skipped(layer.name, op_label(node), reason, w.numel(), nbytes(w)))
            else:
                dense.append(layer)
        return dense, moes, skipped

    def _calibrate(self, program: Program, groups: list[list[DenseLayer]], moes: list[MoeLayer],
                   statistics: dict) -> None:
        config = self.config
        weights = [layer.float_weight(program) for g in groups for layer in g]
        weights += [program.params[p.name] for m in moes for p in (m.gate_up, m.down)]
        device = real_weights(program, weights, f"pruning ({config.spec})")
        probes: dict[fx.Node, list] = {}
        for group in groups:
            stats = InputStatistics(group[0].float_weight(program).shape[1], device)
            statistics[group[0].node] = stats
            probes.setdefault(group[0].node, []).append(LinearProbe(stats, group[0].x_index))
        for m in moes:
            experts, _, h = program.params[m.gate_up.name].shape
            f = program.params[m.down.name].shape[-1]
            probe = MoeProbe([InputStatistics(h, device) for _ in range(experts)],
                             [InputStatistics(f, device) for _ in range(experts)])
            statistics[m.node] = probe
            probes.setdefault(m.node, []).append(probe)
        # SparseGPT inverts each Hessian: it needs at least as many rows as the widest input
        widest = max(w.shape[-1] for w in weights) if config.method == "sparsegpt" else 0
        calls = calibration_run(program, self.calibration, config, max(config.min_calibration_tokens, widest),
                                {"wanda": "Wanda", "sparsegpt": "SparseGPT"}[config.method], device)
        collect_statistics(program, probes, calls, progress=self.progress)

    # ------------------------------------------------------------------------ pruning

    def _pruned(self, w: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
        """w [..., N, K] pruned by the configured method (hessian [..., K, K]: the inputs' mean x x^T)."""
        c = self.config
        if c.method == "sparsegpt":
            return sparsegpt_prune(w, hessian, c.sparsity, c.n_m, c.block_size, c.damp)
        if c.method == "wanda":
            mask = wanda_mask(w, column_norms(hessian), c.sparsity, c.n_m)
        else:
            mask = magnitude_mask(w, c.sparsity, c.n_m)
        return w * mask

    def _prune_dense(self, program: Program, layer: DenseLayer, stats: InputStatistics | None) -> dict:
        w = layer.float_weight(program)
        hessian = stats.hessian() if stats is not None else None
        new = self._pruned(w, hessian)
        error = relative_error(w, new, hessian)
        tied = len(layer.weight.users) > 1 or (layer.view is not None and len(layer.view.users) > 1)
        name, op = layer.name, op_label(layer.node)
        replace_weight(program, layer, new)
        return self._detail(name, op, w, new, error, "dense weight kept: something else reads it (tied)" if tied
                            else "")

    def _prune_moe(self, program: Program, layer: MoeLayer, probe: MoeProbe | None) -> dict:
        """Prune every expert's gate_up and down (each expert its own matrix and statistics)."""
        befores, afters, errors = [], [], []
        for key, placeholder in (("gate_up", layer.gate_up), ("down", layer.down)):
            w = program.params[placeholder.name]
            stats = getattr(probe, key) if probe is not None else None
            hessian = torch.stack([s.hessian() for s in stats]) if stats is not None else None
            new = self._pruned(w, hessian)
            if stats is not None:
                errors += [relative_error(w[e], new[e], s.hessian()) for e, s in enumerate(stats) if s.rows]
            replace_param(program, layer.node, placeholder, new)
            befores.append(w)
            afters.append(new)
        note = ""
        if probe is not None:
            routed = [s.rows for s in probe.gate_up]
            note = f"tokens/expert {min(routed)}..{max(routed)}"
            if min(routed) == 0:
                note += f" ({routed.count(0)} unreached: pruned on magnitude alone)"
        known = [e for e in errors if e is not None]
        if known:
            note += "; error of the worst expert"
        flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
        return self._detail(layer.name, "moe experts", flat(befores), flat(afters), max(known) if known else None,
                            note)

    def _detail(self, name: str, op: str, before: torch.Tensor, after: torch.Tensor, error: float | None,
                note: str) -> dict:
        c = self.config
        kept = nonzeros(after)
        return {"layer": name, "op": op, "status": "pruned", "method": c.method, "pattern": c.pattern,
                "sparsity": 1 - kept / after.numel(), "numel": after.numel(), "params_before": nonzeros(before),
                "params_after": kept, "bytes_before": nbytes(before), "bytes_after": nbytes(after),
                "rel_error": error, "note": note}

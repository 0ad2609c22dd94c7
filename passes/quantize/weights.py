"""QuantizeWeights: linear layers (and fused MoE experts) become quantized ops.

Each `aten.linear` (and `mm` / `matmul` / `addmm` whose weight is a parameter, read
directly or through a transpose) becomes `flashc.linear_wq` (weight-only int4/int8), and
each `flashc.moe` becomes `flashc.moe_wq`, with packed codes, scales and zero points as new
parameters (layout: flashc.quantized_ops). With a weights-and-activations scheme the
linear becomes `flashc.linear_w8a8` (SmoothQuant) or `flashc.linear_fp8` instead, its
input quantized per token on every call, and each `flashc.moe` becomes `flashc.moe_a8`.
With QuIP (`quip-4bit`) each layer becomes `flashc.hadamard` (of its input, shared by the layers
reading it) -> `flashc.linear_wq` on the rotated weight -> `flashc.hadamard` * signs (+ bias), and
a `flashc.moe` is wrapped alike (passes/quantize/quip.py); sizes without a Hadamard matrix are
skipped. The float weight is removed when nothing else reads it; a weight that something
else also reads (a head tied to the embedding) stays.

With a bit budget (`QuantConfig.budget_bits`, scheme 'mixed-3.5') each layer, and each MoE
layer's experts together, is quantized at the width passes/quantize/mixed.py chooses from
measured sensitivities; the report's rows give each layer's width and sensitivities, its
totals the achieved bits a weight against the budget.

Left in float, and listed in the report with the reason: the output head unless
`QuantConfig.lm_head` (GPTQ and AWQ leave it too), MoE routers, layers whose input size
is not a multiple of the group size, weights the graph writes in place, and MoE experts
when `quantize_experts` is off.

Invariants kept (flashc/aliasing.py): every write stays where it was (the new op is
placed where the old one was and reads the same input); a weight the graph writes is
never quantized; calibration runs on copies of the state the graph writes; the model's
own tensors are never modified (scaled or quantized weights are new tensors). Shapes
(`meta["val"]`) are kept: the new op has the old one's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from flashc.aliasing import MutationInfo
from flashc.errors import FlashcError
from flashc.ir import Program, module_path, op_name, replace_with_call
from flashc.pass_manager import PassContext, PassResult
from flashc.passes.quantize.aqlm import AqlmWeight, aqlm_quantize
from flashc.passes.quantize.awq import awq_quantize, awq_search_scales
from flashc.passes.quantize.calibration import (
    ActivationSample, CalibrationData, InputStatistics, LinearProbe, MoeProbe, calibration_calls, collect_statistics,
    split_calls,
)
from flashc.passes.quantize.config import QuantConfig
from flashc.passes.quantize.fp8 import quantize_weight_fp8
from flashc.passes.quantize.gptq import gptq_quantize
from flashc.passes.quantize.grid import QuantizedWeight, output_error
from flashc.passes.quantize.mixed import Candidate, LayerChoice, LossProbe, choose_bits, measure_factors
from flashc.passes.quantize.quip import (
    QuipWeight, quip_quantize, quip_relative_error, random_signs, rotation_skip_reason,
)
from flashc.passes.quantize.rtn import rtn_quantize
from flashc.passes.quantize.smoothquant import quantize_weight_int8, smoothquant, w8a8_error

aten = torch.ops.aten
HADAMARD = torch.ops.flashc.hadamard.default  # flashc/hadamard_ops.py (QuIP's rotations)
LINEAR_WQ = torch.ops.flashc.linear_wq.default

# Ops a value passes through unchanged in content (the head's logits are often reshaped or cast).
_PASS_THROUGH = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.slice", "aten.select", "aten.squeeze",
                 "aten.unsqueeze", "aten.expand", "aten.contiguous", "aten.clone", "aten._to_copy", "aten.to",
                 "aten.alias", "aten.detach", "getitem"}


@dataclass
class DenseLayer:
    """A linear-like node whose weight is a parameter: y = x @ W^T (+ bias), W [N, K]."""

    node: fx.Node
    weight: fx.Node  # the parameter placeholder
    transposed: bool  # the parameter is stored [K, N] (mm/matmul read it directly)
    view: fx.Node | None  # a transpose between the parameter and the node
    x_index: int  # where the input and the bias sit among the node's arguments (read from the node,
    bias_index: int | None  # which stays current when an earlier rewrite replaces the input)
    name: str

    @property
    def x(self) -> fx.Node:
        return self.node.args[self.x_index]

    @property
    def bias(self) -> fx.Node | None:
        return None if self.bias_index is None or self.bias_index >= len(self.node.args) else \
            self.node.args[self.bias_index]

    def float_weight(self, program: Program) -> torch.Tensor:
        w = program.params[self.weight.name]
        return w.t() if self.transposed else w


@dataclass
class MoeLayer:
    """A flashc.moe node: gate_up [E, 2F, H] and down [E, H, F] parameters."""

    node: fx.Node
    gate_up: fx.Node
    down: fx.Node
    name: str


@dataclass
class Skipped:
    name: str
    op: str
    reason: str
    nbytes: int

    def detail(self) -> dict:
        return {"layer": self.name, "op": self.op, "status": "skipped", "bytes_before": self.nbytes,
                "bytes_after": self.nbytes, "note": self.reason}


class QuantizeWeights:
    """Quantization of linear layers and MoE experts: weight-only (RTN, GPTQ or AWQ; int4 or
    int8), or weights and activations (SmoothQuant W8A8, FP8)."""

    name = "quantize_weights"
    requires = ("shapes",)
    preserves = ("shapes", "canonical")
    changes_numerics = True  # measured by the accuracy rows (flashc.compile), not by the numeric check

    def __init__(self, config: QuantConfig | str, calibration: CalibrationData | None = None,
                 progress: bool = True) -> None:
        """config: a QuantConfig or a scheme name ('int4-gptq'); calibration: the data GPTQ and
        AWQ calibrate on (flashc.passes.quantize.calibration.resolve_calibration builds it)."""
        self.config = QuantConfig.parse(config)
        if self.config.needs_calibration and calibration is None:
            what = "a bit budget (mixed precision)" if self.config.mixed else self.config.method.upper()
            raise FlashcError(f"{what} needs calibration data: pass calibration='builtin' "
                              "(flashc's built-in text), a text or .safetensors file, or token ids")
        self.calibration = calibration
        self.progress = progress

    @classmethod
    def for_model(cls, quantize, calibration, model: torch.nn.Module, source=None) -> "QuantizeWeights":
        """The pass flashc.compile(quantize=..., calibration=...) appends: the scheme parsed, and
        the calibration text tokenized with the model's tokenizer when flashc knows it (a zoo
        model with real weights); a random-weight zoo model reads text as bytes."""
        from flashc.passes.quantize.calibration import calibration_for_model

        config = QuantConfig.parse(quantize)
        if not config.needs_calibration:
            if calibration is not None:
                raise FlashcError(f"{config.scheme} rounds to nearest and reads no calibration data; drop "
                                  "calibration=, or choose a gptq or awq scheme")
            return cls(config)
        return cls(config, calibration_for_model(calibration, model, source))

    # ------------------------------------------------------------------------------ plan

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        config = self.config
        if config.method == "fp8" and ctx.profile.kind != "cpu" and "fp8" not in ctx.profile.features:
            raise FlashcError(f"{config.scheme}: the {ctx.profile.name} profile has no FP8 tensor cores (FP8 runs on "
                              "h100, h200, l4); choose w8a8-smoothquant or int8-weight, or another profile")
        mutations = MutationInfo.of(program.graph)
        dense, moes, skipped = self._plan(program, mutations)
        details = [s.detail() for s in skipped]
        if not dense and not moes:
            return PassResult(False, {"skipped": len(skipped)}, details=details)
        probes: dict[fx.Node, list] = {}
        statistics: dict[fx.Node, object] = {}
        self.samples: dict[fx.Node, ActivationSample] = {}
        groups = _input_groups(dense, mutations)
        self.choices: dict[fx.Node, LayerChoice] = {}
        if config.needs_calibration:
            self._calibrate(program, groups, moes, probes, statistics)
        mixed_stats = self._choose_bits(program, groups, moes, statistics) if config.mixed else {}
        bytes_before = bytes_after = 0
        work = [("dense", g) for g in groups] + [("moe", m) for m in moes]
        for kind, item in tqdm(work, desc=f"quantizing ({config.method})", unit="layer",
                               disable=not self.progress):
            if kind == "dense":
                rows = self._quantize_group(program, item, statistics.get(item[0].node))
            else:
                rows = [self._quantize_moe(program, item, statistics.get(item.node))]
            for row in rows:
                bytes_before += row["bytes_before"]
                bytes_after += row["bytes_after"]
            details += rows
        if config.needs_calibration:
            details += [{"layer": "-", "op": "calibration", "status": "warning", "note": w}
                        for w in self.calibration.warnings]
        if config.mixed and program.meta.signature == "decode":
            details.append({"layer": "-", "op": "calibration", "status": "warning",
                            "note": "a decode step's sensitivities are measured on the first calibration windows, "
                                    "which the statistics also read (no held-out windows)"})
        stats = {"layers": len(dense), "moe_layers": len(moes), "skipped": len(skipped),
                 "bytes_before": bytes_before, "bytes_after": bytes_after, **mixed_stats}
        return PassResult(True, stats, details=details)

    def _plan(self, program: Program, mutations: MutationInfo
              ) -> tuple[list[DenseLayer], list[MoeLayer], list[Skipped]]:
        config = self.config
        dense, moes, skipped = [], [], []
        for node in list(program.op_nodes()):
            if node.target is torch.ops.flashc.moe.default:
                layer = _moe_layer(program, node)
                if layer is None:
                    continue
                k_in = (program.params[layer.gate_up.name].shape[-1], program.params[layer.down.name].shape[-1])
                nbytes = sum(_nbytes(program.params[p.name]) for p in (layer.gate_up, layer.down))
                reason = None
                if not config.quantize_experts:
                    reason = "MoE experts kept in float (QuantConfig.quantize_experts=False)"
                elif any(mutations.is_written(p) for p in (layer.gate_up, layer.down)):
                    reason = "expert weights are written in place by the graph"
                elif not config.activations and config.group_size and any(k % config.group_size for k in k_in):
                    reason = f"input sizes {k_in} are not multiples of the group size {config.group_size}"
                elif not config.activations and (why := _whole_bytes_skip_reason(k_in, config)):
                    reason = why
                elif config.method == "quip" and (why := rotation_skip_reason(k_in[0], k_in[0])):
                    reason = why  # gate_up's input side and down's output side: the hidden size
                if reason:
                    skipped.append(Skipped(layer.name, "moe experts", reason, nbytes))
                else:
                    moes.append(layer)
                continue
            layer = _dense_layer(program, node)
            if layer is None:
                continue
            w = layer.float_weight(program)
            n, k = w.shape
            reason = None
            if mutations.is_written(layer.weight):
                reason = "weight is written in place by the graph"
            elif _feeds_router(node):
                reason = "MoE router: kept float (small; routing is sensitive)"
            elif not config.lm_head and _is_output_head(node, layer.weight):
                reason = "output head: kept float, as GPTQ and AWQ do (QuantConfig(lm_head=True) quantizes it)"
            elif config.group_size and k % config.group_size:
                reason = f"input size {k} is not a multiple of the group size {config.group_size}"
            elif not config.activations and (why := _whole_bytes_skip_reason((k,), config)):
                reason = why
            elif config.method == "quip" and (why := rotation_skip_reason(n, k)):
                reason = why
            if reason:
                skipped.append(Skipped(layer.name, _op_label(node), reason, _nbytes(w)))
            else:
                dense.append(layer)
        return dense, moes, skipped

    # ------------------------------------------------------------------------ calibration

    def _calibrate(self, program: Program, groups: list[list[DenseLayer]], moes: list[MoeLayer],
                   probes: dict, statistics: dict) -> None:
        config = self.config
        weights = [program.params[l.weight.name] for g in groups for l in g]
        weights += [program.params[p.name] for m in moes for p in (m.gate_up, m.down)]
        if any(w.device.type == "meta" for w in weights):
            what = "mixed precision" if config.mixed else config.method.upper()
            raise FlashcError(f"{what} calibrates on real weights, and this model is on the meta "
                              "device (shapes only): quantize it with an rtn scheme (e.g. int4-rtn)")
        device = weights[0].device
        for group in groups:
            stats = InputStatistics(group[0].float_weight(program).shape[1], device)
            statistics[group[0].node] = stats
            first = group[0].node
            probes.setdefault(first, []).append(LinearProbe(stats, group[0].x_index))
            if config.activations:
                self.samples[first] = ActivationSample(1, config.sample_rows, group[0].x_index)
        for m in moes:
            experts, _, h = program.params[m.gate_up.name].shape
            f = program.params[m.down.name].shape[-1]
            probe = MoeProbe([InputStatistics(h, device) for _ in range(experts)],
                             [InputStatistics(f, device) for _ in range(experts)])
            if config.activations:
                probe.gate_up_samples = [ActivationSample(1, config.sample_rows) for _ in range(experts)]
                probe.down_samples = [ActivationSample(1, config.sample_rows) for _ in range(experts)]
            statistics[m.node] = probe
            probes.setdefault(m.node, []).append(probe)
        widest = max(w.shape[-1] for w in weights)
        needed = max(config.min_calibration_tokens, widest)
        if config.mixed:  # sensitivities are measured on tokens held out from the statistics
            calls, self.held_out = split_calls(calibration_calls(
                program, self.calibration, config.calibration_tokens + config.sensitivity_tokens, device),
                config.sensitivity_tokens)
        else:
            calls = calibration_calls(program, self.calibration, config.calibration_tokens, device)
        for node, sample in self.samples.items():  # every stride-th row: spread over the whole run
            sample.stride = max(1, -(-calls.rows // config.sample_rows))
            probes.setdefault(node, []).append(sample)
        for m in moes:  # an expert sees about top_k / E of the rows
            probe = statistics[m.node]
            experts, top_k = len(probe.gate_up), m.node.args[4]
            for sample in (probe.gate_up_samples or []) + (probe.down_samples or []):
                sample.stride = max(1, -(-calls.rows * top_k // (experts * config.sample_rows)))
        if calls.rows < needed:
            raise FlashcError(
                f"calibration data too small: {self.calibration.description} gives {calls.rows} {calls.unit} in "
                f"{calls.count} calls of {calls.rows_per_call}; {config.method.upper()} needs at least {needed} "
                f"(QuantConfig.min_calibration_tokens={config.min_calibration_tokens}, widest layer input "
                f"{widest}): give more text or samples")
        collect_statistics(program, probes, calls, progress=self.progress)

    # ------------------------------------------------------------------------ quantizing

    def _quantize(self, w: torch.Tensor, stats: InputStatistics | None,
                  awq_scale: torch.Tensor | None, bits: int | None = None
                  ) -> tuple[QuantizedWeight, torch.Tensor | None]:
        """(quantized w [N, K], input scale 1/s or None) by the configured method, at `bits` (default
        the config's)."""
        c = self.config
        bits = bits or c.bits
        group = c.group_size or w.shape[-1]
        if w.device.type == "meta":
            return _meta_quantized(w, c), None
        if c.method == "gptq":
            return gptq_quantize(w, stats.hessian(), bits, group, c.symmetric, c.act_order, c.damp,
                                 c.block_size, w.dtype), None
        if c.method == "awq":
            inverse = (1 / awq_scale).to(w.dtype)  # stored in the activation dtype: round first,
            scale = 1 / inverse.float()  # then quantize with exactly the scale the op applies
            q = awq_quantize(w, scale, stats.hessian(), c.bits, group, c.symmetric, c.awq_clip, c.awq_grid,
                             w.dtype)
            return q, inverse
        return rtn_quantize(w, bits, group, c.symmetric, w.dtype), None

    def _quantize_experts(self, w: torch.Tensor, stats: list[InputStatistics], bits: int) -> QuantizedWeight:
        """Stacked experts [E, N, K] by GPTQ (solved together, each under its own Hessian) or RTN."""
        c = self.config
        group = c.group_size or w.shape[-1]
        if c.method == "gptq":  # an expert no token reached has a zero Hessian: it is rounded
            hessians = torch.stack([s.hessian() for s in stats])
            return gptq_quantize(w, hessians, bits, group, c.symmetric, c.act_order, c.damp, c.block_size, w.dtype)
        return rtn_quantize(w, bits, group, c.symmetric, w.dtype)

    # ---------------------------------------------------------------------- mixed precision

    def _choose_bits(self, program: Program, groups: list[list[DenseLayer]], moes: list[MoeLayer],
                     statistics: dict) -> dict:
        """Quantize every layer at every candidate width, measure the sensitivities and choose the
        widths under the budget (passes/quantize/mixed.py); returns the report's totals."""
        c = self.config
        units = []
        work = [("dense", layer, g[0].node) for g in groups for layer in g] + [("moe", m, m.node) for m in moes]
        for kind, layer, key in tqdm(work, desc=f"mixed precision: {len(c.candidate_bits)} widths ({c.method})",
                                     unit="layer", disable=not self.progress):
            if kind == "dense":
                members, variant = self._dense_candidates(program, layer, statistics[key])
            else:
                members, variant = self._moe_candidates(program, layer, statistics[key])
            self.choices[layer.node] = members
            units.append((members, variant))
        probe = LossProbe(program, list(self.held_out.make()))
        measure_factors(units, probe, self.progress)
        achieved, _ = choose_bits([m for members, _ in units for m in members], c.budget_bits)
        return {"budget_bits": c.budget_bits, "achieved_bits": round(achieved, 4),
                "sensitivity_tokens": sum(r.shape[0] for r in probe.reference)}

    def _dense_candidates(self, program: Program, layer: DenseLayer, stats: InputStatistics):
        w = layer.float_weight(program)
        h = stats.hessian()
        candidates = []
        for bits in self.config.candidate_bits:
            q, _ = self._quantize(w, stats, None, bits)
            error = float(output_error(q.dequantize().double() - w.double(), h))
            candidates.append(Candidate(bits, 8 * sum(_nbytes(t) for t in q.packed() if t is not None), error, q))

        def variant(quantized: list[QuantizedWeight]) -> dict[str, torch.Tensor]:
            deq = quantized[0].dequantize().to(w.dtype)
            return {layer.weight.name: deq.t().contiguous() if layer.transposed else deq}

        return [LayerChoice(layer.name, w.numel(), candidates)], variant

    def _moe_candidates(self, program: Program, layer: MoeLayer, probe: MoeProbe):
        """Each expert's candidates: its gate_up and down at each width (GPTQ solves a width's experts
        together), its error weighted by its share of the routed calibration tokens."""
        weights = {"gate_up": program.params[layer.gate_up.name], "down": program.params[layer.down.name]}
        routed = [s.rows for s in probe.gate_up]
        total = max(1, sum(routed))
        experts = len(routed)
        candidates: list[list[Candidate]] = [[] for _ in range(experts)]
        for bits in self.config.candidate_bits:
            stacked = {key: self._quantize_experts(w, getattr(probe, key), bits) for key, w in weights.items()}
            for e in range(experts):
                parts = {key: q[e] for key, q in stacked.items()}
                error = sum(float(output_error(parts[key].dequantize().double() - w[e].double(),
                                               getattr(probe, key)[e].hessian())) for key, w in weights.items())
                stored = 8 * sum(_nbytes(t) for q in parts.values() for t in q.packed() if t is not None)
                candidates[e].append(Candidate(bits, stored, routed[e] / total * error, parts))
        size = sum(w[0].numel() for w in weights.values())
        members = [LayerChoice(f"{layer.name}.{e}", size, candidates[e]) for e in range(experts)]

        def variant(quantized: list[dict]) -> dict[str, torch.Tensor]:
            return {p.name: torch.stack([q[key].dequantize() for q in quantized]).to(weights[key].dtype)
                    for key, p in (("gate_up", layer.gate_up), ("down", layer.down))}

        return members, variant

    def _awq_scale(self, weights: list[torch.Tensor], stats: InputStatistics | None) -> torch.Tensor | None:
        c = self.config
        if c.method != "awq" or stats is None or weights[0].device.type == "meta":
            return None
        scale, _alpha = awq_search_scales(weights, stats.hessian(), stats.mean_abs(), c.bits,
                                          c.group_size or weights[0].shape[-1], c.symmetric, c.awq_grid,
                                          weights[0].dtype)
        return scale

    def _quantize_group(self, program: Program, group: list[DenseLayer], stats: InputStatistics | None
                        ) -> list[dict]:
        """Quantize the layers that read one input (they share AWQ's scales and the statistics)."""
        if self.config.activations:
            return self._quantize_group_activations(program, group, stats)
        if self.config.method == "aqlm":
            return self._quantize_group_aqlm(program, group, stats)
        if self.config.method == "quip":
            return self._quantize_group_quip(program, group, stats)
        weights = [layer.float_weight(program) for layer in group]
        awq_scale = self._awq_scale(weights, stats)
        rows = []
        for layer, w in zip(group, weights):
            choice = self.choices[layer.node][0] if layer.node in self.choices else None
            if choice is not None:
                q, input_scale = choice.choice.quantized, None
            else:
                q, input_scale = self._quantize(w, stats, awq_scale)
            error = _relative_error(w, q, input_scale, stats)
            tied = len(layer.weight.users) > 1 or (layer.view is not None and len(layer.view.users) > 1)
            new = _rewrite_dense(program, layer, q, input_scale)
            notes = [choice.note()] if choice is not None else []
            notes += ["float weight kept: something else reads it (tied)"] if tied else []
            rows.append(self._detail(layer.name, _op_label(layer.node), _nbytes(w), new, error, "; ".join(notes),
                                     choice))
        return rows

    def _quantize_group_activations(self, program: Program, group: list[DenseLayer],
                                    stats: InputStatistics | None) -> list[dict]:
        """W8A8 (one smoothing for the group, searched on the sampled rows) or FP8, per layer."""
        c = self.config
        weights = [layer.float_weight(program) for layer in group]
        sample = self.samples.get(group[0].node)
        rows = sample.tensor() if sample is not None else torch.zeros(0, weights[0].shape[1])
        note, input_scale = "", None
        if weights[0].device.type == "meta":
            quantized = [_meta_activation_weight(w, c) for w in weights]
        elif c.method == "smoothquant":
            if c.smooth:
                quantized, input_scale, alpha, _ = smoothquant(weights, rows, stats.amax, c.alpha)
                note = f"alpha {alpha}" if alpha is not None else "no smoothing measured best"
            else:
                quantized = [quantize_weight_int8(w) for w in weights]
        else:
            quantized = [quantize_weight_fp8(w, c.granularity) for w in weights]
        rows_out = []
        for layer, w, q in zip(group, weights, quantized):
            error = None
            if rows.numel() and c.method == "smoothquant":
                error = w8a8_error(rows, [w], input_scale, [q])
            tied = len(layer.weight.users) > 1 or (layer.view is not None and len(layer.view.users) > 1)
            new = _rewrite_activations(program, layer, c, q, input_scale)
            rows_out.append(self._detail(layer.name, _op_label(layer.node), _nbytes(w), new, error,
                                         "; ".join(t for t in (note, "float weight kept: something else reads it "
                                                               "(tied)" if tied else "") if t)))
        return rows_out

    def _quantize_moe(self, program: Program, layer: MoeLayer, probe: MoeProbe | None) -> dict:
        """Quantize every expert's gate_up and down; GPTQ solves a layer's experts together."""
        c = self.config
        if c.activations:
            return self._quantize_moe_activations(program, layer, probe)
        if c.method == "aqlm":
            return self._quantize_moe_aqlm(program, layer, probe)
        if c.method == "quip":
            return self._quantize_moe_quip(program, layer, probe)
        parts: dict[str, tuple[QuantizedWeight, torch.Tensor | None]] = {}
        errors = []
        weights = {"gate_up": program.params[layer.gate_up.name], "down": program.params[layer.down.name]}
        chosen = self.choices.get(layer.node)  # each expert's width under a bit budget
        if chosen is not None and len({m.choice.bits for m in chosen}) > 1:
            return self._quantize_moe_mixed(program, layer, probe, chosen)
        for key, w in weights.items():
            stats = getattr(probe, key) if probe is not None else None
            input_scale = None
            if chosen is not None:
                q = QuantizedWeight.stack([m.choice.quantized[key] for m in chosen])
            elif w.device.type == "meta":
                q = _meta_quantized(w, c)
            elif c.method == "gptq":
                q = self._quantize_experts(w, stats, c.bits)
            elif c.method == "awq":
                experts = []
                for e, s in enumerate(stats):
                    scale = self._awq_scale([w[e]], s) if s.rows else torch.ones(w.shape[-1], device=w.device)
                    experts.append(self._quantize(w[e], s, scale))
                q = QuantizedWeight.stack([e for e, _ in experts])
                input_scale = torch.stack([s for _, s in experts])
            else:
                q = rtn_quantize(w, c.bits, c.group_size or w.shape[-1], c.symmetric, w.dtype)
            parts[key] = (q, input_scale)
            if stats is not None:
                errors += [_relative_error(w[e], q[e], None if input_scale is None else input_scale[e], s)
                           for e, s in enumerate(stats)]
        new = _rewrite_moe(program, layer, parts, c)
        note = ""
        if probe is not None:
            routed = [s.rows for s in probe.gate_up]
            note = f"tokens/expert {min(routed)}..{max(routed)}"
            if min(routed) == 0:
                note += f" ({routed.count(0)} unreached: rounded to nearest)"
        known = [e for e in errors if e is not None]
        note += "; error of the worst expert" if known else ""
        if chosen is not None:
            note += f"; {_experts_note(chosen)}"
        return self._detail(layer.name, "moe experts", sum(_nbytes(w) for w in weights.values()), new,
                            max(known) if known else None, note, chosen)

    def _quantize_moe_mixed(self, program: Program, layer: MoeLayer, probe: MoeProbe,
                            experts: list[LayerChoice]) -> dict:
        """Experts at different widths: flashc.moe_wq_mixed, one packed tensor an expert."""
        weights = {"gate_up": program.params[layer.gate_up.name], "down": program.params[layer.down.name]}
        errors = [_relative_error(weights[key][e], m.choice.quantized[key], None, getattr(probe, key)[e])
                  for e, m in enumerate(experts) for key in weights]
        new = _rewrite_moe_mixed(program, layer, [m.choice for m in experts])
        routed = [s.rows for s in probe.gate_up]
        known = [e for e in errors if e is not None]
        note = f"tokens/expert {min(routed)}..{max(routed)}; error of the worst expert; {_experts_note(experts)}"
        return self._detail(layer.name, "moe experts", sum(_nbytes(w) for w in weights.values()), new,
                            max(known) if known else None, note, experts)



    def _quantize_moe_activations(self, program: Program, layer: MoeLayer, probe: MoeProbe | None) -> dict:
        """W8A8 or FP8 experts (flashc.moe_a8): each expert's gate_up and down quantized alone, its
        smoothing (SmoothQuant) searched on the rows routed to it; an expert no calibration token
        reached is not smoothed."""
        c = self.config
        weights = {"gate_up": program.params[layer.gate_up.name], "down": program.params[layer.down.name]}
        parts, errors, alphas = {}, [], []
        for key, w in weights.items():
            stats = getattr(probe, key) if probe is not None else None
            samples = getattr(probe, f"{key}_samples") if probe is not None else None
            codes, scales, inverses = [], [], []
            for e in range(w.shape[0]):
                inverse = None
                if w.device.type == "meta":
                    q = _meta_activation_weight(w[e], c)
                elif c.method == "fp8":
                    q = quantize_weight_fp8(w[e], c.granularity)
                elif c.smooth and stats is not None and stats[e].rows:
                    rows = samples[e].tensor()
                    (q,), inverse, alpha, _ = smoothquant([w[e]], rows, stats[e].amax, c.alpha)
                    alphas.append(alpha)
                    errors.append(w8a8_error(rows, [w[e]], inverse, [q]))
                else:
                    q = quantize_weight_int8(w[e])
                codes.append(q[0])
                scales.append(q[1])
                inverses.append(inverse)
            smoothed = any(i is not None for i in inverses)
            ones = torch.ones(w.shape[-1], dtype=w.dtype, device=w.device)
            parts[key] = (torch.stack(codes), torch.stack(scales),
                          torch.stack([ones if i is None else i for i in inverses]) if smoothed else None)
        new = _rewrite_moe_activations(program, layer, parts, c)
        note = f"{weights['gate_up'].shape[0]} experts"
        if alphas:
            chosen = [a for a in alphas if a is not None]
            note += f"; alpha {min(chosen)}..{max(chosen)}" if chosen else "; no smoothing measured best"
        if probe is not None and min(s.rows for s in probe.gate_up) == 0:
            note += f" ({sum(s.rows == 0 for s in probe.gate_up)} unreached: not smoothed)"
        return self._detail(layer.name, "moe experts", sum(_nbytes(w) for w in weights.values()), new,
                            max(errors) if errors else None, note + ("; error of the worst expert" if errors else ""))

    def _quantize_group_quip(self, program: Program, group: list[DenseLayer], stats: InputStatistics
                             ) -> list[dict]:
        """QuIP (passes/quantize/quip.py): the group's input rotated once (shared signs), each weight
        rotated on both sides and quantized by GPTQ on the rotated Hessian, its output rotation undone."""
        c = self.config
        weights = [layer.float_weight(program) for layer in group]
        w0 = weights[0]
        hessian = stats.hessian()
        s_in = random_signs(w0.shape[1], f"{group[0].name}:input", w0.dtype, w0.device)
        quantized = [quip_quantize(w, hessian, s_in, random_signs(w.shape[0], f"{layer.name}:output", w.dtype,
                                                                  w.device),
                                   c.bits, c.group_size or w.shape[1], c.symmetric, c.damp, c.block_size, w.dtype)
                     for layer, w in zip(group, weights)]
        errors = [quip_relative_error(w, q, hessian) if stats.rows else None for w, q in zip(weights, quantized)]
        labels = [_op_label(layer.node) for layer in group]
        ties = [len(layer.weight.users) > 1 or (layer.view is not None and len(layer.view.users) > 1)
                for layer in group]
        new = _rewrite_quip(program, group, quantized)
        shared = f"input rotation shared by {len(group)} layers" if len(group) > 1 else "input rotation"
        return [self._detail(layer.name, label, _nbytes(w), params, error,
                             "; ".join([f"rotated on both sides ({shared})"]
                                       + (["float weight kept: something else reads it (tied)"] if tied else [])))
                for layer, label, w, params, error, tied in zip(group, labels, weights, new, errors, ties)]

    def _quantize_moe_quip(self, program: Program, layer: MoeLayer, probe: MoeProbe) -> dict:
        """QuIP for fused experts: gate_up rotated on its input side (one transform of the layer's input
        for all experts), down on its output side (one transform of the summed output); GPTQ on each
        expert's (rotated) Hessian. An expert's inside (the gated activation) stays unrotated."""
        c = self.config
        gate_up, down = program.params[layer.gate_up.name], program.params[layer.down.name]
        hidden = gate_up.shape[-1]
        s_in = random_signs(hidden, f"{layer.name}:input", gate_up.dtype, gate_up.device)
        s_out = random_signs(hidden, f"{layer.name}:output", down.dtype, down.device)
        hessians = {"gate_up": torch.stack([s.hessian() for s in probe.gate_up]),
                    "down": torch.stack([s.hessian() for s in probe.down])}
        parts = {"gate_up": quip_quantize(gate_up, hessians["gate_up"], s_in, None, c.bits, c.group_size or hidden,
                                          c.symmetric, c.damp, c.block_size, gate_up.dtype),
                 "down": quip_quantize(down, hessians["down"], None, s_out, c.bits, c.group_size or down.shape[-1],
                                       c.symmetric, c.damp, c.block_size, down.dtype)}
        errors = []
        for key, w in (("gate_up", gate_up), ("down", down)):
            part, stats = parts[key], getattr(probe, key)
            errors += [quip_relative_error(w[e], QuipWeight(part.q[e], part.input_signs, part.output_signs),
                                           hessians[key][e]) for e, s in enumerate(stats) if s.rows]
        new = _rewrite_moe_quip(program, layer, parts, c)
        routed = [s.rows for s in probe.gate_up]
        note = f"tokens/expert {min(routed)}..{max(routed)}; Hadamard-rotated: gate_up input side, down output side"
        known = [e for e in errors if e is not None]
        return self._detail(layer.name, "moe experts", _nbytes(gate_up) + _nbytes(down), new,
                            max(known) if known else None, note + ("; error of the worst expert" if known else ""))

    def _aqlm(self, w: torch.Tensor, hessian: torch.Tensor):
        c = self.config
        return aqlm_quantize(w, hessian, c.aqlm_codebooks, c.group_size, c.aqlm_rounds, c.damp, storage_dtype=w.dtype)

    def _quantize_group_aqlm(self, program: Program, group: list[DenseLayer], stats: InputStatistics) -> list[dict]:
        """AQLM (passes/quantize/aqlm.py): each layer's codes, codebooks and row scales fitted to its
        own weight under the group's calibration Hessian."""
        rows = []
        for layer in group:
            w = layer.float_weight(program)
            fit = self._aqlm(w, stats.hessian())
            error = _aqlm_relative_error(w, fit.weight, stats)
            tied = len(layer.weight.users) > 1 or (layer.view is not None and len(layer.view.users) > 1)
            new = _rewrite_aqlm(program, layer, fit.weight)
            notes = [f"fit error {fit.errors[0]:.3f} (k-means) -> {fit.errors[-1]:.3f}"]
            rows.append(self._detail(layer.name, _op_label(layer.node), _nbytes(w), new, error, "; ".join(
                notes + (["float weight kept: something else reads it (tied)"] if tied else []))))
        return rows

    def _quantize_moe_aqlm(self, program: Program, layer: MoeLayer, probe: MoeProbe) -> dict:
        """AQLM experts (flashc.moe_aqlm): each expert's gate_up and down with codebooks of its own,
        fitted under its own Hessian (all experts of a layer solved together); an expert no
        calibration token reached is fitted to plain squared error."""
        weights = {"gate_up": program.params[layer.gate_up.name], "down": program.params[layer.down.name]}
        parts, errors = {}, []
        for key, w in weights.items():
            stats = getattr(probe, key)
            fit = self._aqlm(w, torch.stack([s.hessian() for s in stats]))
            parts[key] = fit.weight
            errors += [_aqlm_relative_error(w[e], fit.weight[e], s) for e, s in enumerate(stats)]
        new = _rewrite_moe_aqlm(program, layer, parts)
        routed = [s.rows for s in probe.gate_up]
        note = f"tokens/expert {min(routed)}..{max(routed)}"
        if min(routed) == 0:
            note += f" ({routed.count(0)} unreached: fitted to plain squared error)"
        known = [e for e in errors if e is not None]
        return self._detail(layer.name, "moe experts", sum(_nbytes(w) for w in weights.values()), new,
                            max(known) if known else None, note + ("; error of the worst expert" if known else ""))

    def _detail(self, name: str, op: str, before: int, new_params: list[torch.Tensor], error: float | None,
                note: str, members: LayerChoice | list[LayerChoice] | None = None) -> dict:
        """A quantized layer's report row; with a bit budget, its chosen width (a MoE layer's: the
        experts' mean) and its sensitivity (summed over experts)."""
        c = self.config
        mixed = {}
        if members is not None:
            members = members if isinstance(members, list) else [members]
            widths = sorted({m.choice.bits for m in members})
            weights = sum(m.weights for m in members)
            mean = sum(m.choice.bits * m.weights for m in members) / weights
            bits = widths[0] if len(widths) == 1 else round(mean, 3)
            label = f"int{bits}" if len(widths) == 1 else f"int{'/'.join(map(str, widths))}"
            mixed = {"bits": bits, "sensitivity": sum(m.sensitivity(m.chosen) for m in members),
                     "scheme": f"{label}-{c.method}-{f'g{c.group_size}' if c.group_size else 'per-channel'}-"
                               f"{'sym' if c.symmetric else 'asym'} (mixed-{c.budget_bits:g})"}
        return {"layer": name, "op": op, "status": "quantized", "method": c.method, "bits": c.bits,
                "group_size": c.group_size or "channel", "symmetric": c.symmetric, "bytes_before": before,
                "bytes_after": sum(_nbytes(t) for t in new_params),
                "rel_error": error, "note": note,
                **({"scheme": c.scheme} if c.activations or c.method in ("quip", "aqlm") else {}), **mixed}


# ---------------------------------------------------------------------------- matching


def _param(program: Program, value) -> bool:
    return isinstance(value, fx.Node) and value.op == "placeholder" and value.name in program.params


def _transpose_of_param(program: Program, node) -> fx.Node | None:
    """The 2-D parameter p when node is t(p), transpose(p, 0, 1) or permute(p, [1, 0])."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    p = node.args[0]
    if not _param(program, p) or program.params[p.name].dim() != 2:
        return None
    if node.target is aten.t.default:
        return p
    if node.target is aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return p
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return p
    return None


def _dense_layer(program: Program, node: fx.Node) -> DenseLayer | None:
    """The layer node computes, when it is a linear-like op with a float parameter as weight."""
    args = list(node.args)
    if node.target is aten.linear.default and not node.kwargs:
        x, w, bias = (args + [None])[:3]
        if not _param(program, w):
            return None
        weight, view, transposed, x_index, bias_index = w, None, False, 0, 2
    elif node.target in (aten.mm.default, aten.matmul.default, aten.addmm.default):
        if node.target is aten.addmm.default:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(args) != 3:
                return None
            bias, x, b = args
            x_index, bias_index = 1, 0
        elif node.kwargs or len(args) != 2:
            return None
        else:
            (x, b), bias = args, None
            x_index, bias_index = 0, None
        if _param(program, b) and program.params[b.name].dim() == 2:
            weight, view, transposed = b, None, True
        elif (p := _transpose_of_param(program, b)) is not None:
            weight, view, transposed = p, b, False
        else:
            return None
    else:
        return None
    w = program.params[weight.name]
    xval = x.meta.get("val") if isinstance(x, fx.Node) else None
    if w.dim() != 2 or not w.is_floating_point() or xval is None or xval.dtype != w.dtype or xval.dim() < 1:
        return None
    n = w.shape[1] if transposed else w.shape[0]
    if bias is not None:
        bval = bias.meta.get("val") if isinstance(bias, fx.Node) else None
        if bval is None or tuple(bval.shape) != (n,) or bval.dtype != w.dtype:
            return None
    return DenseLayer(node, weight, transposed, view, x_index, bias_index, module_path(node) or _param_label(weight))


def _moe_layer(program: Program, node: fx.Node) -> MoeLayer | None:
    gate_up, down = node.args[2], node.args[3]
    if not (_param(program, gate_up) and _param(program, down)):
        return None
    if not (program.params[gate_up.name].is_floating_point() and program.params[down.name].is_floating_point()):
        return None
    return MoeLayer(node, gate_up, down, module_path(node) or _param_label(gate_up).removesuffix("_gate_up_proj"))


def _param_label(placeholder: fx.Node) -> str:
    """A layer's name from its weight's placeholder when capture kept no module path
    ('p_model_layers_0_mlp_gate_weight' -> 'model_layers_0_mlp_gate')."""
    return placeholder.name.removeprefix("p_").removesuffix("_weight")


def _flows_to(node: fx.Node, accept) -> bool:
    """Whether node's value reaches a user that `accept(user, value)` approves, through pass-through ops."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if accept(u, n):
                return True
            if u.op == "call_function" and op_name(u) in _PASS_THROUGH:
                stack.append(u)
    return False


def _feeds_router(node: fx.Node) -> bool:
    return _flows_to(node, lambda u, v: u.target is torch.ops.flashc.moe.default and u.args[1] is v)


def _is_output_head(node: fx.Node, weight: fx.Node) -> bool:
    """The model's output projection: its weight is tied to an embedding, or it is returned."""
    if any(u.target is aten.embedding.default for u in weight.users):
        return True
    return _flows_to(node, lambda u, v: u.op == "output")


def _input_groups(dense: list[DenseLayer], mutations: MutationInfo) -> list[list[DenseLayer]]:
    """Layers grouped by the value they read (q/k/v, gate/up): one set of statistics each. A
    write to that value's storage between two readers splits them (they read different data)."""
    by_input: dict[fx.Node, list[list[DenseLayer]]] = {}
    for layer in sorted(dense, key=lambda l: mutations.order[l.node]):
        groups = by_input.setdefault(layer.x, [])
        if groups and not mutations.written_between(layer.x, groups[-1][0].node, layer.node):
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return [g for gs in by_input.values() for g in gs]


def _op_label(node: fx.Node) -> str:
    return op_name(node).removeprefix("aten.")


# -------------------------------------------------------------------------- rewriting


def _rewrite_dense(program: Program, layer: DenseLayer, q: QuantizedWeight,
                   input_scale: torch.Tensor | None) -> list[torch.Tensor]:
    """Replace layer.node by flashc.linear_wq; returns the new parameters."""
    qweight, scales, zero_points = q.packed()
    base = layer.weight.name
    new = [qweight, scales] + [t for t in (zero_points, input_scale) if t is not None]
    args = (layer.x, program.add_param(f"{base}_q{q.bits}", qweight), program.add_param(f"{base}_scales", scales),
            None if zero_points is None else program.add_param(f"{base}_zero_points", zero_points),
            layer.bias, None if input_scale is None else program.add_param(f"{base}_input_scale", input_scale),
            q.bits)
    replace_with_call(program.graph, layer.node, torch.ops.flashc.linear_wq.default, args)
    if layer.view is not None and not layer.view.users:
        program.graph.erase_node(layer.view)
    program.drop_unused_params([layer.weight])
    return new


def _rewrite_activations(program: Program, layer: DenseLayer, config: QuantConfig,
                         quantized: tuple[torch.Tensor, torch.Tensor], input_scale: torch.Tensor | None
                         ) -> list[torch.Tensor]:
    """Replace layer.node by flashc.linear_w8a8 or flashc.linear_fp8; returns the new parameters."""
    qweight, scales = quantized
    base = layer.weight.name
    kind = "w8a8" if config.method == "smoothquant" else "fp8"
    args = (layer.x, program.add_param(f"{base}_{kind}", qweight), program.add_param(f"{base}_{kind}_scales", scales),
            layer.bias, None if input_scale is None else program.add_param(f"{base}_smooth", input_scale))
    if config.method == "smoothquant":
        replace_with_call(program.graph, layer.node, torch.ops.flashc.linear_w8a8.default, args)
    else:
        replace_with_call(program.graph, layer.node, torch.ops.flashc.linear_fp8.default,
                          (*args, config.granularity == "row"))
    if layer.view is not None and not layer.view.users:
        program.graph.erase_node(layer.view)
    program.drop_unused_params([layer.weight])
    return [t for t in (qweight, scales, input_scale) if t is not None]


def _rewrite_moe_activations(program: Program, layer: MoeLayer, parts: dict[str, tuple], config: QuantConfig
                             ) -> list[torch.Tensor]:
    """Replace a flashc.moe by flashc.moe_a8 with the experts' int8 / fp8 weights ([E, ...] each)."""
    node, kind = layer.node, "w8a8" if config.method == "smoothquant" else "fp8"
    new, args = [], []
    for key, placeholder in (("gate_up", layer.gate_up), ("down", layer.down)):
        codes, scales, inverse = parts[key]
        base = placeholder.name
        args += [program.add_param(f"{base}_{kind}", codes), program.add_param(f"{base}_{kind}_scales", scales),
                 None if inverse is None else program.add_param(f"{base}_smooth", inverse)]
        new += [t for t in (codes, scales, inverse) if t is not None]
    x, logits, _, _, top_k, normalize = node.args[:6]
    replace_with_call(program.graph, node, torch.ops.flashc.moe_a8.default,
             (x, logits, *args, top_k, normalize, config.method == "fp8", config.granularity == "row"))
    for placeholder in (layer.gate_up, layer.down):
        program.drop_unused_params([placeholder])
    return new


def _rewrite_moe(program: Program, layer: MoeLayer, parts: dict[str, tuple], config: QuantConfig
                 ) -> list[torch.Tensor]:
    """Replace a flashc.moe by flashc.moe_wq with the experts' packed weights ([E, ...] each)."""
    node = layer.node
    new, args = [], []
    for key, placeholder in (("gate_up", layer.gate_up), ("down", layer.down)):
        q, input_scale = parts[key]
        qweight, scales, zero_points = q.packed()
        base = placeholder.name
        args += [program.add_param(f"{base}_q{q.bits}", qweight), program.add_param(f"{base}_scales", scales),
                 None if zero_points is None else program.add_param(f"{base}_zero_points", zero_points),
                 None if input_scale is None else program.add_param(f"{base}_input_scale", input_scale)]
        new += [t for t in (qweight, scales, zero_points, input_scale) if t is not None]
    x, logits, _, _, top_k, normalize = node.args[:6]
    replace_with_call(program.graph, node, torch.ops.flashc.moe_wq.default,
             (x, logits, *args, top_k, normalize, parts["gate_up"][0].bits))
    for placeholder in (layer.gate_up, layer.down):
        program.drop_unused_params([placeholder])
    return new


def _rewrite_moe_mixed(program: Program, layer: MoeLayer, chosen: list) -> list[torch.Tensor]:
    """Replace a flashc.moe by flashc.moe_wq_mixed: each expert's packed weights at its own width
    (`chosen[e].quantized` holds its gate_up and down QuantizedWeight)."""
    node = layer.node
    new, args = [], []
    for key, placeholder in (("gate_up", layer.gate_up), ("down", layer.down)):
        lists = ([], [], [])
        for e, candidate in enumerate(chosen):
            qweight, scales, zero_points = candidate.quantized[key].packed()
            base = f"{placeholder.name}_e{e}"
            lists[0].append(program.add_param(f"{base}_q{candidate.bits}", qweight))
            lists[1].append(program.add_param(f"{base}_scales", scales))
            lists[2].append(None if zero_points is None else program.add_param(f"{base}_zero_points", zero_points))
            new += [t for t in (qweight, scales, zero_points) if t is not None]
        args += list(lists)
    x, logits, _, _, top_k, normalize = node.args[:6]
    replace_with_call(program.graph, node, torch.ops.flashc.moe_wq_mixed.default,
             (x, logits, *args, top_k, normalize, [c.bits for c in chosen]))
    for placeholder in (layer.gate_up, layer.down):
        program.drop_unused_params([placeholder])
    return new


def _experts_note(experts: list) -> str:
    """The experts' chosen widths and sensitivities, in expert order, for the report."""
    widths = " ".join(str(m.choice.bits) for m in experts)
    sens = sum(m.sensitivity(m.chosen) for m in experts)
    return (f"experts' bits {widths}; sensitivity (KL, experts weighted by routed tokens) {sens:.3g} "
            f"(all at {experts[0].candidates[0].bits} bits: {experts[0].kl:.3g})")


def _rewrite_quip(program: Program, group: list[DenseLayer], quantized: list[QuipWeight]
                  ) -> list[list[torch.Tensor]]:
    """Replace the layers of one input group by ``hadamard(x, s_in)`` (one node, shared) ->
    ``linear_wq`` on the rotated weight -> ``hadamard(z, None) * s_out`` (+ bias, after the
    rotation is undone); returns each layer's new parameters (the first one also holds s_in)."""
    graph = program.graph
    first = group[0]
    x = first.x
    signs_in = quantized[0].input_signs
    with graph.inserting_before(first.node):
        rotated = graph.call_function(HADAMARD, (x, program.add_param(f"{first.weight.name}_quip_input_signs",
                                                                      signs_in)))
    _copy_meta(rotated, first.node, x.meta.get("val"))
    new = []
    for i, (layer, q) in enumerate(zip(group, quantized)):
        qweight, scales, zero_points = q.q.packed()
        base, node, bias = layer.weight.name, layer.node, layer.bias
        args = (rotated, program.add_param(f"{base}_q{q.q.bits}", qweight),
                program.add_param(f"{base}_scales", scales),
                None if zero_points is None else program.add_param(f"{base}_zero_points", zero_points),
                None, None, q.q.bits)
        signs_out = program.add_param(f"{base}_quip_output_signs", q.output_signs)
        with graph.inserting_before(node):
            written = [graph.call_function(LINEAR_WQ, args)]
            written.append(graph.call_function(HADAMARD, (written[-1], None)))
            written.append(graph.call_function(aten.mul.Tensor, (written[-1], signs_out)))
            if bias is not None:
                written.append(graph.call_function(aten.add.Tensor, (written[-1], bias)))
        for n in written:  # each has the layer's output shape and dtype
            _copy_meta(n, node, node.meta.get("val"))
        out = written[-1]
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        if layer.view is not None and not layer.view.users:
            graph.erase_node(layer.view)
        program.drop_unused_params([layer.weight])
        new.append([t for t in (qweight, scales, zero_points, q.output_signs) if t is not None]
                   + ([signs_in] if i == 0 else []))
    return new


def _rewrite_moe_quip(program: Program, layer: MoeLayer, parts: dict[str, QuipWeight], config: QuantConfig
                      ) -> list[torch.Tensor]:
    """flashc.moe -> ``hadamard(x, s_in)`` -> flashc.moe_wq (gate_up rotated on its input side, down
    on its output side) -> ``hadamard(y, None) * s_out``; returns the new parameters."""
    graph, node = program.graph, layer.node
    x = node.args[0]
    s_in, s_out = parts["gate_up"].input_signs, parts["down"].output_signs
    with graph.inserting_before(node):
        rotated = graph.call_function(HADAMARD, (x, program.add_param(f"{layer.gate_up.name}_quip_input_signs",
                                                                      s_in)))
    _copy_meta(rotated, node, x.meta.get("val"))
    node.args = (rotated, *node.args[1:])
    new = _rewrite_moe(program, layer, {key: (part.q, None) for key, part in parts.items()}, config)
    (moe,) = rotated.users
    signs_out = program.add_param(f"{layer.down.name}_quip_output_signs", s_out)
    with graph.inserting_after(moe):
        back = graph.call_function(HADAMARD, (moe, None))
    with graph.inserting_after(back):
        out = graph.call_function(aten.mul.Tensor, (back, signs_out))
    moe.replace_all_uses_with(out, delete_user_cb=lambda user: user is not back)
    for n in (back, out):
        _copy_meta(n, moe, moe.meta.get("val"))
    return new + [s_in, s_out]


def _copy_meta(new: fx.Node, old: fx.Node, val) -> None:
    """A node written in old's place: old's source location, and the value (shape, dtype) given."""
    new.meta.update({k: v for k, v in old.meta.items() if k in ("stack_trace", "nn_module_stack")})
    if val is not None:
        new.meta["val"] = val


def _rewrite_aqlm(program: Program, layer: DenseLayer, q: AqlmWeight) -> list[torch.Tensor]:
    """Replace layer.node by flashc.linear_aqlm (layout: flashc/codebook_ops.py); returns the new parameters."""
    base = layer.weight.name
    new = [q.codes.contiguous(), q.codebooks.contiguous(), q.scales.contiguous()]
    args = (layer.x, *(program.add_param(f"{base}_aqlm_{part}", t) for part, t in zip(_AQLM_PARTS, new)), layer.bias)
    replace_with_call(program.graph, layer.node, torch.ops.flashc.linear_aqlm.default, args)
    if layer.view is not None and not layer.view.users:
        program.graph.erase_node(layer.view)
    program.drop_unused_params([layer.weight])
    return new


def _rewrite_moe_aqlm(program: Program, layer: MoeLayer, parts: dict[str, AqlmWeight]) -> list[torch.Tensor]:
    """Replace a flashc.moe by flashc.moe_aqlm with the experts' codes, codebooks and scales ([E, ...] each)."""
    node = layer.node
    new, args = [], []
    for key, placeholder in (("gate_up", layer.gate_up), ("down", layer.down)):
        q = parts[key]
        tensors = [q.codes.contiguous(), q.codebooks.contiguous(), q.scales.contiguous()]
        args += [program.add_param(f"{placeholder.name}_aqlm_{part}", t) for part, t in zip(_AQLM_PARTS, tensors)]
        new += tensors
    x, logits, _, _, top_k, normalize = node.args[:6]
    replace_with_call(program.graph, node, torch.ops.flashc.moe_aqlm.default, (x, logits, *args, top_k, normalize))
    for placeholder in (layer.gate_up, layer.down):
        program.drop_unused_params([placeholder])
    return new


_AQLM_PARTS = ("codes", "codebooks", "scales")


# ---------------------------------------------------------------------------- measures


def _whole_bytes_skip_reason(k_in: tuple[int, ...], config: QuantConfig) -> str | None:
    """Why a per-channel row of k codes cannot be packed (flashc.quantized_ops stores a group in whole
    bytes: k * bits a multiple of 8), or None."""
    if config.group_size or config.method in ("aqlm", "quip"):
        return None
    widths = config.candidate_bits if config.mixed else (config.bits,)
    bad = [b for b in widths if b < 8 and any(k * b % 8 for k in k_in)]
    if not bad:
        return None
    return (f"input size{'s' if len(k_in) > 1 else ''} {', '.join(map(str, k_in))}: a row of {bad[0]}-bit codes "
            "per output channel is not a whole number of bytes (use a group size)")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _relative_error(w: torch.Tensor, q: QuantizedWeight, input_scale: torch.Tensor | None,
                    stats: InputStatistics | None) -> float | None:
    """sqrt(||(W_q - W) X^T||^2 / ||W X^T||^2) on the calibration inputs (None without them)."""
    if stats is None or stats.rows == 0 or w.device.type == "meta":
        return None
    h = stats.hessian().float()
    effective = q.dequantize() if input_scale is None else q.dequantize() * input_scale.float()
    base = float(output_error(w.float(), h))
    return (float(output_error(effective - w.float(), h)) / base) ** 0.5 if base > 0 else None


def _aqlm_relative_error(w: torch.Tensor, q: AqlmWeight, stats: InputStatistics) -> float | None:
    """sqrt(||(W_hat - W) X^T||^2 / ||W X^T||^2) on the calibration inputs (None without them)."""
    if stats.rows == 0:
        return None
    h = stats.hessian()
    base = float(output_error(w.double(), h))
    return (float(output_error(q.dequantize() - w.double(), h)) / base) ** 0.5 if base > 0 else None


def _meta_quantized(w: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    """Shapes only, for a model on the meta device (cost estimates of quantized real-size models)."""
    group = config.group_size or w.shape[-1]
    groups = (*w.shape[:-1], w.shape[-1] // group)
    codes = torch.empty(w.shape, dtype=torch.uint8, device="meta")
    zero_points = None if config.symmetric else torch.empty(groups, dtype=torch.uint8, device="meta")
    return QuantizedWeight(codes, torch.empty(groups, dtype=w.dtype, device="meta"), zero_points, config.bits, group)



def _meta_activation_weight(w: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes only, as _meta_quantized: a W8A8 / FP8 weight [N, K] and its scales ([N], or [1] per tensor)."""
    per_row = config.method == "smoothquant" or config.granularity == "row"
    dtype = torch.int8 if config.method == "smoothquant" else torch.float8_e4m3fn
    return (torch.empty(w.shape, dtype=dtype, device="meta"),
            torch.empty(w.shape[0] if per_row else 1, device="meta"))

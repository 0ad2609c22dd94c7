"""Mixed precision under a bit budget: a width per layer from its measured sensitivity.

`QuantConfig(budget_bits=3.5)` (scheme 'mixed-3.5') gives each quantized layer one of
`candidate_bits` (2, 3, 4, 8) so that the stored bits a weight (codes, scales and zero points,
flashc/quantized_ops.py's layout, counted from the packed tensors' bytes) averaged over the
quantized layers' weights stay within the budget, and the model loses as little as it can.

Sensitivity. Measuring the model's loss with each layer quantized alone at each width costs
one run of the held-out tokens per (layer, width); the Hessian-weighted output error that
GPTQ minimises, tr((W - Q) H (W - Q)^T) with H the mean x x^T of the layer's calibration
inputs, costs nothing once the layer is quantized, but it is local: a unit of error in an
early layer and in the last one do not cost the model the same. So both, a second-order
proxy as in HAWQ-V2 (Dong et al., NeurIPS 2020, arXiv:1911.03852) calibrated by a measurement:
the error of every width is measured by the Hessian form, and one factor a layer, measured
end to end at the narrowest width (where the loss rises well above the float noise), turns
it into loss:

    sensitivity(layer, b) = KL(layer at b_min) / err(layer, b_min) * err(layer, b)

KL is the mean over held-out calibration tokens of KL(p_float || p_quantized) of the
model's next-token distributions (its first floating output read as logits), the rest of
the model in float. For the widths above the narrowest the loss is close to quadratic in
the layer's output error (the float model is at a minimum of the KL), which the factor
assumes. Each expert of a fused MoE layer gets its own width (flashc.moe_wq_mixed when they
differ): an expert's error is its Hessian-weighted error times the share of calibration
tokens routed to it, so frequently routed experts count for more, and the layer's one factor
is measured with all its experts at the narrowest width.

Allocation: a multiple-choice knapsack (a width a layer or expert, total stored bits within
the budget, least total sensitivity; HAWQ-V3 solves the same choice as an integer program),
solved exactly by dynamic programming over the budget discretised into `RESOLUTION` units
(each cost rounded up, so every solution fits), then the budget the rounding left is spent
greedily on the upgrades with the best sensitivity saved per bit.

Widths. 3 bits among the candidates lets a 3.5 budget put layers at 3 and 4 bits where
(2, 4, 8) must put about a quarter of the weights at 2. mixtral-ref, GPTQ g128, perplexity of
both evaluation texts (bench/quant_accuracy.py, 2026-12-05): mixed-3.5 with (2, 3, 4, 8) +2.45%,
with (3, 4, 8) +2.74%, with (2, 4, 8) +3.13%; mixed-3 with (2, 3, 4, 8) +6.00% against +9.43%
with (2, 4, 8) ((3, 4, 8) cannot store 3.0); uniform int3-gptq +6.83%, int4-rtn +2.55% at 4.28
bits. Hence the default (2, 3, 4, 8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flashc.errors import FlashcError
from flashc.ir import Program

RESOLUTION = 4096  # budget units of the exact allocation; rounding costs at most one unit a layer


@dataclass
class Candidate:
    """One width of one layer (or expert): its quantized weights, their stored size and measured error."""

    bits: int
    stored_bits: int  # bits of the packed codes, scales and zero points
    error: float  # Hessian-weighted output error (an expert's: times its share of the routed tokens)
    quantized: object  # what the pass rewrites with (a QuantizedWeight; an expert's: one for gate_up and down)


@dataclass
class LayerChoice:
    """A quantized layer's (or expert's) candidates, the factor from its error to model loss, its width."""

    name: str
    weights: int  # number of weights (the budget's denominator)
    candidates: list[Candidate]
    factor: float = 0.0  # KL per unit of Hessian-weighted error, measured at the narrowest width
    kl: float = 0.0  # the KL measured at the narrowest width
    chosen: int = 0  # index into candidates

    def sensitivity(self, index: int) -> float:
        return self.factor * self.candidates[index].error

    @property
    def choice(self) -> Candidate:
        return self.candidates[self.chosen]

    def note(self) -> str:
        """The measured sensitivities, for the report's per-layer row."""
        per_width = ", ".join(f"{c.bits}b {self.sensitivity(i):.3g}" for i, c in enumerate(self.candidates))
        return f"sensitivity (KL) {per_width}"


def allocate_bits(costs: list[list[float]], sensitivities: list[list[float]], budget: float,
                  resolution: int = RESOLUTION) -> list[int]:
    """The candidate index per layer that minimises the total sensitivity with total cost <= budget.

    costs[i][j], sensitivities[i][j]: layer i at candidate j. Exact over costs rounded up to
    budget / resolution (dynamic programming), then greedy upgrades while the exact costs fit.
    Raises FlashcError when even the cheapest candidates exceed the budget.
    """
    if not costs:
        return []
    cheapest = sum(min(row) for row in costs)
    if cheapest > budget * (1 + 1e-12):
        raise FlashcError(f"the bit budget ({budget:g} bits) is below the cheapest choice ({cheapest:g} bits: every "
                          "layer at its narrowest width)")
    unit = budget / resolution
    units = [[min(resolution + 1, math.ceil(c / unit - 1e-9)) for c in row] for row in costs]
    inf = float("inf")
    best = torch.full((resolution + 1,), 0.0, dtype=torch.float64)  # least sensitivity within b units
    picks = []
    for row_units, row_sens in zip(units, sensitivities):
        new = torch.full_like(best, inf)
        pick = torch.zeros(resolution + 1, dtype=torch.int64)
        for j, (w, s) in enumerate(zip(row_units, row_sens)):
            if w > resolution:
                continue
            shifted = torch.full_like(best, inf)
            shifted[w:] = best[: resolution + 1 - w] + s
            better = shifted < new
            new = torch.where(better, shifted, new)
            pick = torch.where(better, torch.full_like(pick, j), pick)
        best = new
        picks.append(pick)
    if math.isinf(float(best[resolution])):
        # the rounding cost the cheapest solution its fit: start there, the greedy pass below adds to it
        chosen = [min(range(len(row)), key=lambda j: (row[j], sens[j])) for row, sens in zip(costs, sensitivities)]
    else:
        chosen, b = [0] * len(costs), resolution
        for i in range(len(costs) - 1, -1, -1):
            chosen[i] = int(picks[i][b])
            b -= units[i][chosen[i]]
    return _spend_the_rest(chosen, costs, sensitivities, budget)


def _spend_the_rest(chosen: list[int], costs, sensitivities, budget: float) -> list[int]:
    """Upgrade layers while the exact costs fit: each time the move saving the most sensitivity a bit."""
    chosen = list(chosen)
    total = sum(costs[i][j] for i, j in enumerate(chosen))
    while True:
        best, move = 0.0, None
        for i, j in enumerate(chosen):
            for k in range(len(costs[i])):
                extra = costs[i][k] - costs[i][j]
                saved = sensitivities[i][j] - sensitivities[i][k]
                if saved <= 0 or total + extra > budget * (1 + 1e-12):
                    continue
                gain = saved / extra if extra > 0 else math.inf
                if gain > best:
                    best, move = gain, (i, k, extra)
        if move is None:
            return chosen
        i, k, extra = move
        chosen[i] = k
        total += extra


# ------------------------------------------------------------------------------- measuring


@dataclass
class LossProbe:
    """The float model's next-token distributions on held-out calls, and the KL of a variant's.

    calls: argument tuples of the program (a few, at most `sensitivity_tokens` rows); the first
    floating output is read as logits over its last dimension.
    """

    program: Program
    calls: list[tuple]
    reference: list[torch.Tensor] = field(default_factory=list)  # float log-probabilities per call

    def __post_init__(self) -> None:
        self.reference = [F.log_softmax(logits, -1) for logits in self._logits({})]
        if not self.reference:
            raise FlashcError("mixed precision: no held-out calibration tokens to measure sensitivities on; give "
                              "more calibration text or lower QuantConfig.sensitivity_tokens")

    def _logits(self, replaced: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        from flashc.checking import written_state

        program = self.program
        params = dict(program.params)
        params.update(replaced)
        for name in written_state(program):  # a fresh copy of the state the graph writes, each run
            params[name] = program.params[name].clone()
        weights = [params[n.name] for n in program.param_nodes()]
        out = []
        with torch.no_grad():
            copies: dict[int, torch.Tensor] = {}  # one copy a run of each input tensor: a decode step writes
            for args in self.calls:  # its cache inputs in place, and the next call reads them
                for a in args:
                    if isinstance(a, torch.Tensor) and id(a) not in copies:
                        copies[id(a)] = a.clone()
                args = [copies[id(a)] if isinstance(a, torch.Tensor) else a for a in args]
                flat = program.graph_module(*weights, *args)
                flat = flat if isinstance(flat, (tuple, list)) else [flat]
                logits = next((t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()
                               and t.dim() >= 1 and t.shape[-1] > 1), None)
                if logits is None:
                    raise FlashcError("mixed precision measures the KL of the model's output distribution, and this "
                                      "program returns no floating tensor to read as logits; quantize it with a "
                                      "uniform scheme (e.g. int4-gptq)")
                out.append(logits.detach().float().reshape(-1, logits.shape[-1]))
        return out

    def kl(self, replaced: dict[str, torch.Tensor]) -> float:
        """Mean KL(p_float || p) a token with the named weights replaced."""
        total, rows = 0.0, 0
        for ref, logits in zip(self.reference, self._logits(replaced)):
            logp = F.log_softmax(logits, -1)
            total += float((ref.exp() * (ref - logp)).sum())
            rows += ref.shape[0]
        return max(total / max(rows, 1), 0.0)


def measure_factors(units: list[tuple[list[LayerChoice], Callable[[list], dict[str, torch.Tensor]]]],
                    probe: LossProbe, progress: bool = True) -> None:
    """The factor from error to loss of each unit (a dense layer, or a MoE layer's experts): the KL
    with the unit alone at its narrowest width (`variant([quantized of each member])` gives the
    replaced weights) over the members' summed Hessian-weighted errors there, shared by the members
    (an MoE layer's experts add into one output, so a unit of their error costs the model alike)."""
    for members, variant in tqdm(units, desc="sensitivity", unit="layer", disable=not progress):
        kl = probe.kl(variant([m.candidates[0].quantized for m in members]))
        error = sum(m.candidates[0].error for m in members)
        for m in members:
            m.kl, m.factor = kl, (kl / error if error > 0 else 0.0)


def choose_bits(layers: list[LayerChoice], budget_bits: float) -> tuple[float, float]:
    """Set each layer's width under the budget (bits a weight over all the layers' weights);
    returns (achieved bits a weight, total sensitivity)."""
    weights = sum(l.weights for l in layers)
    costs = [[c.stored_bits for c in l.candidates] for l in layers]
    sens = [[l.sensitivity(j) for j in range(len(l.candidates))] for l in layers]
    cheapest = sum(min(row) for row in costs) / weights
    if cheapest > budget_bits:
        narrowest = layers[0].candidates[0].bits
        raise FlashcError(f"the bit budget of {budget_bits:g} bits a weight is below what the quantized layers "
                          f"store at their narrowest width ({narrowest} bits: {cheapest:.3f} bits a weight with their "
                          f"scales' dtype): raise QuantConfig.budget_bits to at least "
                          f"{math.ceil(cheapest * 100) / 100}")
    for layer, j in zip(layers, allocate_bits(costs, sens, budget_bits * weights)):
        layer.chosen = j
    achieved = sum(l.choice.stored_bits for l in layers) / weights
    return achieved, sum(l.sensitivity(l.chosen) for l in layers)

"""TEAL: training-free activation sparsity, calibrated thresholds and a greedy allocation.

Liu, Ponnusamy, Cai, Guo, Kim, Athiwaratkun, "Training-Free Activation Sparsity in Large
Language Models", ICLR 2025 (arXiv:2408.14690). The input x of a linear layer is
sparsified per token by magnitude, `flashc.sparsify(x, t)`, with t the quantile of |x| on
calibration activations at the layer's sparsity. Sparsities differ per layer: starting
from dense, the input whose output error grows least per unit of sparsity is raised by one
step, until the sparsity (the mean of the per-input sparsities weighted by the weights a
token reads through each input) reaches the target, in every transformer block (as TEAL
allocates; `PruneConfig(allocation="model")`: one run over the whole model).

Differences from TEAL's code (teal/greedyopt.py), chosen for a graph compiler:
* the error of a step is the relative output error of the layers reading the input, each
  output channel's counted alike: mean_c ||(X - S(X)) W_c^T||^2 / ||X W_c^T||^2 on
  calibration rows (`channel_normalized`; TEAL measures the block's output), and steps are
  ranked by error per unit of weighted sparsity gained. The output's total energy instead,
  ||(X - S(X)) W^T||^2 / ||X W^T||^2, let a few massive channels hide every other
  channel's error: on smollm2-135m it put two down projections' inputs at 95% and 80%
  sparsity "for 0.6% error", and online-25% / 40% cost +6.0% / +25.5% perplexity against
  +2.2% / +17.8% per channel (first 24 windows; mixtral-ref, without such channels: +0.8% /
  +7.5% against +0.5% / +8.3%; 2026-12-06). The experts' intermediates keep the energy
  form (averaging each expert's channels was worse on mixtral-ref: +9.6% at 40%). Scoring
  the MoE experts' input by the experts' output error instead (through the SwiGLU) was
  measured worse on mixtral-ref (30% / 40%: +3.07% / +8.51% perplexity against +2.51% / +8.01%);
* layers reading the same value (q/k/v, gate/up) share one threshold: one mask feeds a
  merged GEMV (TEAL thresholds q, k, v separately on the same input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


def channel_normalized(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (float32) with each output channel's row divided by the norm of that channel's
    output over the calibration rows [R, K], so that ||X W'^T||^2 counts every channel as one: an
    error curve through W'^T W' is the mean of the channels' relative errors. A channel whose
    output is zero on every row keeps its row (it adds nothing to either side)."""
    w = weight.float()
    norms = (rows.float() @ w.t()).norm(dim=0)
    return w / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]


def sparsity_levels(step: float, max_sparsity: float) -> torch.Tensor:
    """0, step, 2 step, ... up to max_sparsity (float64)."""
    return torch.arange(0, math.floor(max_sparsity / step + 1e-9) + 1, dtype=torch.float64) * step


def thresholds_for(rows: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Per level s, the threshold t that zeroes floor(s * numel) entries of rows under
    `|x| > t` (the largest of those entries; 0 for s = 0, which zeroes only exact zeros)."""
    magnitudes = rows.abs().flatten().sort().values
    counts = torch.floor(levels * magnitudes.numel() + 1e-9).long().to(magnitudes.device)  # rows may be on a GPU
    picked = magnitudes[(counts - 1).clamp(min=0)]
    return torch.where(counts > 0, picked, torch.zeros_like(picked)).double().cpu()


def sparsified_fraction(rows: torch.Tensor, threshold: float) -> float:
    """The fraction of entries that `sparsify(rows, threshold)` zeroes."""
    return float((rows.abs() <= threshold).float().mean()) if rows.numel() else 0.0


class ErrorCurve:
    """e(i) = ||(X - S_t_i(X)) W^T||^2 / ||X W^T||^2 over calibration rows X, through the Gram
    matrix G = sum W^T W of the layers reading X (so its cost is rows x K^2 per level, not per
    layer); computed on demand and kept. W is what the caller passes: flashc's allocation passes
    `channel_normalized` weights, which make e the mean of the output channels' relative errors.

    For MoE experts' intermediates (each row read by one expert's down projection, its output
    scaled by the routing weight) gram is one matrix per expert [E, K, K], `experts` gives each
    row's expert and `row_weights` its routing weight: e(i) = sum_r w_r^2 ||(x_r - S(x_r))
    D_e(r)^T||^2 / sum_r w_r^2 ||x_r D_e(r)^T||^2 (the pairs' cross terms within a token dropped).
    """

    def __init__(self, rows: torch.Tensor, gram: torch.Tensor, thresholds: torch.Tensor,
                 row_weights: torch.Tensor | None = None, experts: torch.Tensor | None = None) -> None:
        if (gram.dim() == 3) != (experts is not None):
            raise ValueError("ErrorCurve: per-expert Gram matrices [E, K, K] need each row's expert, and only they")
        self.rows = rows.float()
        self.gram = gram.float()
        self.thresholds = thresholds
        self.row_weights = None if row_weights is None else row_weights.float() ** 2
        self.experts = experts
        self.base = self._energy(self.rows)
        self.cache: dict[int, float] = {0: 0.0}

    def _energy(self, x: torch.Tensor) -> float:
        """sum_r w_r^2 x_r G_r x_r^T: the squared norm of the layers' output of rows x."""
        if self.experts is None:
            per_row = ((x @ self.gram) * x).sum(-1)
        else:
            per_row = x.new_zeros(x.shape[0])
            for e in self.experts.unique().tolist():
                mine = self.experts == e
                per_row[mine] = ((x[mine] @ self.gram[e]) * x[mine]).sum(-1)
        return float((per_row * self.row_weights).sum() if self.row_weights is not None else per_row.sum())

    def __call__(self, level: int) -> float:
        if level not in self.cache:
            if self.rows is None:
                raise ValueError(f"ErrorCurve: level {level} was not computed before settle() dropped the rows")
            removed = self.rows * (self.rows.abs() <= float(self.thresholds[level]))
            error = self._energy(removed)
            self.cache[level] = error / self.base if self.base > 0 else 0.0
        return self.cache[level]

    def settle(self) -> "ErrorCurve":
        """Compute every level now and drop the rows and the Gram matrix. A model's curves are
        all alive during the allocation, and their Gram matrices are K x K fp32 each: 32 GiB
        over llama-3-8b's down projections (K = 14336), held at once. Settled, a curve keeps
        one float a level."""
        for level in range(len(self.thresholds)):
            self(level)
        self.rows = self.gram = self.row_weights = self.experts = None
        return self


def greedy_allocation(curves: list[Callable[[int], float]], weights: list[float], levels: torch.Tensor,
                      target: float) -> list[int]:
    """The level index of each input: from all dense, repeatedly raise by one level the input
    whose error grows least per unit of sparsity gained, until the weighted mean
    of the levels reaches target (or every input is at the last level)."""
    total = float(sum(weights))
    chosen = [0] * len(curves)
    if total <= 0:
        return chosen
    last = len(levels) - 1

    def reached() -> float:
        return sum(w * float(levels[i]) for w, i in zip(weights, chosen)) / total

    while reached() < target - 1e-9:
        best, best_cost = None, math.inf
        for i, curve in enumerate(curves):
            if chosen[i] >= last or weights[i] <= 0:
                continue
            gain = weights[i] * float(levels[chosen[i] + 1] - levels[chosen[i]]) / total
            cost = (curve(chosen[i] + 1) - curve(chosen[i])) / gain
            if cost < best_cost:
                best, best_cost = i, cost
        if best is None:
            break
        chosen[best] += 1
    return chosen

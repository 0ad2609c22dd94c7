"""Wanda: prune by weight magnitude times input activation norm, compared per output row.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", ICLR 2024 (arXiv:2306.11695): score S_ij = |W_ij| * ||X_j||_2, where ||X_j|| is the
norm of input feature j over the calibration tokens; within each output row the lowest
scores are pruned (per-output comparison mattered for LLMs in the paper), no weight update.
"""

from __future__ import annotations

import torch

from flashc.passes.prune.masks import mask_from_scores


def wanda_scores(w: torch.Tensor, column_norms: torch.Tensor) -> torch.Tensor:
    """|W| * ||x_j|| for w [..., N, K] and column_norms [..., K]."""
    return w.detach().abs().float() * column_norms.float().unsqueeze(-2)


def wanda_mask(w: torch.Tensor, column_norms: torch.Tensor, sparsity: float,
               n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of w [..., N, K] given the inputs' column norms [..., K] (any positive scale)."""
    return mask_from_scores(wanda_scores(w, column_norms), sparsity, n_m, per_row=True)


def column_norms(hessian: torch.Tensor) -> torch.Tensor:
    """||x_j|| up to a common scale, from the calibration Hessian mean(x x^T) [..., K, K]."""
    return torch.diagonal(hessian, dim1=-2, dim2=-1).clamp(min=0).sqrt()

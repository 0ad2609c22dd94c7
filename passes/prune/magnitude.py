"""Magnitude pruning: the smallest weights of each layer go (the baseline of the Wanda and
SparseGPT papers). No calibration data; each matrix is compared as a whole."""

from __future__ import annotations

import torch

from flashc.passes.prune.masks import mask_from_scores


def magnitude_mask(w: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask of w [..., N, K]: all but the smallest |w| of each matrix (or the n largest of
    every m inputs of a row, for an N:M pattern)."""
    return mask_from_scores(w.detach().abs().float(), sparsity, n_m, per_row=False)

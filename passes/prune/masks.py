"""Masks from importance scores: unstructured (a fraction of each row or matrix) and N:M.

A mask is a bool tensor shaped like the weight, True where the weight is kept. Scores
are compared within what the pattern constrains: each output row (Wanda), each matrix
(magnitude), each group of M consecutive inputs of a row (N:M). Leading dimensions (a
MoE layer's experts) are independent matrices.
"""

from __future__ import annotations

import math

import torch


def pruned_count(sparsity: float, count: int) -> int:
    """How many of `count` weights a sparsity removes: floor(sparsity * count), as Wanda and
    SparseGPT count (the small epsilon keeps 0.29 * 100 from flooring to 28)."""
    return math.floor(sparsity * count + 1e-9)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep all but the pruned_count lowest scores of each row [..., N, K] (per_row) or of
    each matrix (per_row=False); exactly that many are dropped, ties broken by position."""
    *lead, n, k = scores.shape
    flat = scores.reshape(-1, k) if per_row else scores.reshape(-1, n * k)
    drop = pruned_count(sparsity, flat.shape[-1])
    keep = torch.ones(flat.shape, dtype=torch.bool, device=scores.device)
    if drop:
        keep.scatter_(-1, flat.topk(drop, dim=-1, largest=False).indices, False)
    return keep.reshape(scores.shape)


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive inputs of each row
    (scores [..., N, K], K a multiple of m)."""
    *lead, rows, k = scores.shape
    if k % m:
        raise ValueError(f"{k} inputs do not divide into groups of {m}")
    groups = scores.reshape(*lead, rows, k // m, m)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(scores.shape)


def mask_from_scores(scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None,
                     per_row: bool) -> torch.Tensor:
    """The N:M mask when n_m is given, else the unstructured one."""
    if n_m is not None:
        return n_m_mask(scores, *n_m)
    return unstructured_mask(scores, sparsity, per_row)

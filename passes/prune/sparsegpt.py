"""SparseGPT: choose each block's mask from the inverse Hessian and spread every pruned
weight's error over the columns not yet visited.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023 (arXiv:2301.00774), Algorithm 1: the same column sweep as GPTQ
(flashc.passes.quantize.gptq: upper Cholesky factor U of the dampened inverse Hessian,
lazy batch updates of `block_size` columns), with "rounding" replaced by setting masked
weights to zero. Adaptive mask selection: at the start of each block the weights with the
least OBS error w^2 / U_jj^2 across the block (all rows together) are masked; for an N:M
pattern, at the start of each group of M columns the M - N lowest of each row.
"""

from __future__ import annotations

import torch

from flashc.errors import FlashcError
from flashc.passes.prune.masks import n_m_mask, unstructured_mask
from flashc.passes.quantize.gptq import inverse_hessian_cholesky


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None,
                    block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """The pruned weight: w [..., N, K] with masked weights zero and the others updated to
    minimise ||(W - W') X^T||^2 given hessian [..., K, K] = mean x x^T (leading dimensions,
    a MoE layer's experts, are independent problems solved together). Same dtype as w."""
    *lead, n, k = w.shape
    if tuple(hessian.shape) != (*lead, k, k):
        raise FlashcError(f"SparseGPT: Hessian {tuple(hessian.shape)} does not match a weight {tuple(w.shape)}")
    if n_m is not None and k % n_m[1]:
        raise FlashcError(f"SparseGPT: {k} input columns do not divide into groups of {n_m[1]}")
    if n_m is not None:  # whole groups per block: a group's mask is chosen on up-to-date columns
        block_size = max(n_m[1], block_size // n_m[1] * n_m[1])
    weight = w.detach().double().reshape(-1, n, k).clone()
    h = hessian.detach().double().reshape(-1, k, k).clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    # inputs that were always zero have no cross terms: those columns are pruned on magnitude
    # (the paper's code zeroes them; an expert no token reached would lose every weight)
    diag.masked_fill_(diag == 0, 1)
    upper = inverse_hessian_cholesky(h, damp, "SparseGPT", "the wanda method")
    mask = torch.ones(weight.shape, dtype=torch.bool, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = weight[..., i1:i2].clone()
        errors = torch.zeros_like(w1)
        u1 = upper[:, i1:i2, i1:i2]
        d1 = torch.diagonal(u1, dim1=-2, dim2=-1).unsqueeze(1)  # [B, 1, count]
        if n_m is None:
            mask1 = unstructured_mask(w1.pow(2) / d1.pow(2), sparsity, per_row=False)
        else:
            mask1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                mask1[..., group] = n_m_mask(w1[..., group].pow(2) / d1[..., group].pow(2), *n_m)
            column = w1[..., i]
            kept = column * mask1[..., i]
            err = (column - kept) / u1[:, i, i].unsqueeze(-1)
            w1[..., i:] -= err.unsqueeze(-1) * u1[:, i, i:].unsqueeze(-2)
            w1[..., i] = kept  # exactly: the update leaves it there up to rounding
            errors[..., i] = err
        weight[..., i1:i2] = w1
        weight[..., i2:] -= errors @ upper[:, i1:i2, i2:]
        mask[..., i1:i2] = mask1
    return (weight * mask).to(w.dtype).reshape(w.shape)

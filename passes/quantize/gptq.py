"""GPTQ: round weights one input column at a time and spread each rounding error over the
columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323), Algorithm 1: the
Cholesky form of the inverse Hessian, lazy batch updates (errors of a block of columns
applied to the rest in one matrix product), dampening, and act-order (columns in
decreasing order of the Hessian's diagonal). With act-order and groups, each group's
grid is fitted on the original weights before any column moves ("static groups"), so
that the columns of a group share one grid whatever order they are rounded in and the
packed layout stays contiguous groups.
"""

from __future__ import annotations

import torch

from flashc.errors import FlashcError
from flashc.passes.quantize.grid import QuantizedWeight, fit_grid, grouped


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                  act_order: bool = True, damp: float = 0.01, block_size: int = 128,
                  scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Quantize w [..., N, K] given hessian [..., K, K] = the mean of x x^T over calibration inputs x.

    Minimises ||(W - Q) X^T||^2 greedily column by column (the paper's objective; any
    positive scale of H gives the same result). group_size columns share a grid
    (group_size = K: one grid per output channel). Leading dimensions are independent
    problems solved together (a MoE layer's experts, each with its own Hessian), which
    shares the column loop between them.
    """
    *lead, n, k = w.shape
    if tuple(hessian.shape) != (*lead, k, k):
        raise FlashcError(f"GPTQ: Hessian {tuple(hessian.shape)} does not match a weight {tuple(w.shape)}")
    if k % group_size:
        raise FlashcError(f"GPTQ: {k} input columns are not a multiple of group_size {group_size}")
    dtype = scale_dtype or w.dtype
    maxq = (1 << bits) - 1
    weight = w.detach().double().reshape(-1, n, k).clone()
    h = hessian.detach().double().reshape(-1, k, k).clone()
    batch = weight.shape[0]
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    # inputs that were always zero: no cross terms, so those columns are simply rounded
    # (the paper's code zeroes their weights; an expert no token reached would lose them all)
    diag.masked_fill_(diag == 0, 1)

    n_groups = k // group_size
    static = act_order or n_groups == 1  # per channel: one grid per row, fitted up front as in the paper
    scale = torch.empty(batch, n, n_groups, dtype=torch.float64, device=w.device)
    zero = torch.empty_like(scale)
    if static:
        s, z = fit_grid(grouped(weight, group_size).float(), bits, symmetric, dtype)
        scale.copy_(s), zero.copy_(z)

    columns = torch.arange(k, device=w.device).expand(batch, k)
    perm = torch.argsort(diag, dim=-1, descending=True) if act_order else columns
    weight = weight.gather(-1, perm.unsqueeze(1).expand(batch, n, k))
    h = h.gather(-1, perm.unsqueeze(1).expand(batch, k, k)).gather(-2, perm.unsqueeze(2).expand(batch, k, k))
    upper = inverse_hessian_cholesky(h, damp)
    group_of = (perm // group_size).unsqueeze(1).expand(batch, n, k)  # group of each permuted column

    # whole groups per block, so a group's grid is fitted on columns that are up to date
    block = block_size if static else max(group_size, block_size // group_size * group_size)
    codes = torch.empty(batch, n, k, dtype=torch.float64, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = weight[..., i1:i2].clone()
        errors = torch.zeros_like(w1)
        u1 = upper[:, i1:i2, i1:i2]
        if static:
            s1, z1 = scale.gather(-1, group_of[..., i1:i2]), zero.gather(-1, group_of[..., i1:i2])
        else:
            s1, z1 = torch.empty_like(w1), torch.empty_like(w1)
        for i in range(i2 - i1):
            if not static and i % group_size == 0:  # without act-order, column i1 + i starts a group
                s, z = fit_grid(w1[..., i:i + group_size].float(), bits, symmetric, dtype)
                g = (i1 + i) // group_size
                scale[..., g], zero[..., g] = s, z
                s1[..., i:i + group_size] = s.double().unsqueeze(-1)
                z1[..., i:i + group_size] = z.double().unsqueeze(-1)
            column = w1[..., i]
            q = (column / s1[..., i]).round_().add_(z1[..., i]).clamp_(0, maxq)
            codes[..., i1 + i] = q
            err = (column - (q - z1[..., i]) * s1[..., i]) / u1[:, i, i].unsqueeze(-1)
            w1[..., i:] -= err.unsqueeze(-1) * u1[:, i, i:].unsqueeze(-2)
            errors[..., i] = err
        weight[..., i2:] -= errors @ upper[:, i1:i2, i2:]
    codes = codes.gather(-1, torch.argsort(perm, dim=-1).unsqueeze(1).expand(batch, n, k))
    return QuantizedWeight(codes.to(torch.uint8).reshape(w.shape), scale.to(dtype).reshape(*lead, n, n_groups),
                           None if symmetric else zero.to(torch.uint8).reshape(*lead, n, n_groups), bits, group_size)


def inverse_hessian_cholesky(h: torch.Tensor, damp: float, method: str = "GPTQ",
                             instead: str = "the rtn method") -> torch.Tensor:
    """Upper Cholesky factors of (H + damp * mean(diag H) * I)^-1 for a batch of H [B, K, K]; the
    dampening grows tenfold (up to three times) while an H is not numerically positive definite.
    (SparseGPT shares it: `method` and `instead` name the caller and its fallback in the error.)"""
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    mean_diag = torch.diagonal(h, dim1=-2, dim2=-1).mean(-1)[:, None, None]
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(h + damp * 10 ** attempt * mean_diag * eye)
        if not info.any():
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not info.any():
                return upper
    raise FlashcError(f"{method}: the calibration Hessian is not positive definite even with dampening "
                      f"{damp * 1000:g} x its mean diagonal (non-finite activations?); use more calibration data "
                      f"or {instead}")

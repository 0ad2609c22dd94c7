"""Activation-sparsity ops: `flashc.sparsify`, the online (contextual) pruning of a layer's input.

`flashc.sparsify(x, threshold)` keeps the entries of x whose magnitude is above the
threshold and zeroes the rest (TEAL's magnitude sparsification: Liu et al., "Training-Free
Activation Sparsity in Large Language Models", ICLR 2025, arXiv:2408.14690). The pruning
pass (flashc.passes.prune.activations) inserts it before a linear layer with a threshold
calibrated so that a chosen fraction of the entries is zero; a sparse GEMV then reads only
the weight columns whose input survives. The reference below is the numeric truth; it
computes the dense product's input, so on its own it saves nothing.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("flashc::sparsify", mutates_args=())
def sparsify(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """x where |x| > threshold, else 0.

    threshold: a 0-d tensor (one threshold for the whole input, as TEAL calibrates) or one
    per channel (shape [K], broadcast along x's last dimension [..., K]).
    """
    return torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


@sparsify.register_fake
def _(x, threshold):
    return torch.empty_like(x)


SPARSE_OPS = {"sparsify": torch.ops.flashc.sparsify.default}

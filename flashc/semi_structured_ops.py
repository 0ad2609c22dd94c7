"""Semi-structured (2:4) sparsity op: `flashc.linear_24`, a linear layer whose weight holds at
most 2 nonzeros in every 4 consecutive inputs of a row.

Offline N:M pruning (passes/prune: '2:4', 'wanda-2:4', 'sparsegpt-2:4') leaves such a weight as
an ordinary dense tensor; NVIDIA's sparse tensor cores (sm80 and later) multiply by it reading
only the kept half plus 2-bit indices (Mishra et al., "Accelerating Sparse Deep Neural
Networks", arXiv:2104.08378). The CUDA backend's late pass
(backends/cuda_semi_structured.py) writes `linear_24` for prefill-sized products whose stored
weight has the exact pattern, and its kernel (codegen/semi_structured.py) runs it on the
sparse tensor cores where that measured faster than the dense GEMM.

The op takes the dense (2:4-patterned) weight, so its reference is `F.linear`: the same
numbers by definition, and an artifact's program stays portable. A weight without the
pattern gives the dense product here; the kernel never packs one (it checks the pattern).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("flashc::linear_24", mutates_args=())
def linear_24(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """linear(x, weight, bias): x [..., K], weight [N, K] with at most 2 nonzeros in every 4
    consecutive entries of a row, bias [N] or None -> [..., N]."""
    return F.linear(x, weight, bias)


@linear_24.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive entries along the last dim holds at most 2 nonzeros
    (a last dim not divisible by 4 has no such pattern: False). NaN counts as nonzero."""
    if weight.dim() < 1 or weight.shape[-1] % 4:
        return False
    if weight.numel() == 0:
        return True
    rows = weight.reshape(-1, weight.shape[-1])
    # the first row first: an unpruned weight fails there, without a pass over all of it (the
    # late pass asks this of every prefill linear); then every row, in chunks of bounded memory
    step = max(1, 2**22 // max(1, rows.shape[1]))
    for start in (0, *range(1, rows.shape[0], step)):
        chunk = rows[start:start + 1] if start == 0 else rows[start:start + step]
        if not bool(((chunk.reshape(-1, 4) != 0).sum(-1) <= 2).all()):
            return False
    return True


SEMI_STRUCTURED_OPS = {"linear_24": torch.ops.flashc.linear_24.default}

"""Predicted activation sparsity: `flashc.predicted_sparsify`, Deja Vu's contextual sparsity of an MLP.

`flashc.predicted_sparsify(h, x, a, b, threshold)` keeps the entries of an MLP's intermediate
h [..., F] (act(gate x) * up x, what its down projection reads) that a low-rank predictor of
the MLP's input x [..., K] scores above a threshold, and zeroes the rest:

    h * ((x @ a) @ b > threshold)          a [K, r], b [r, F], threshold 0-d or one per neuron [F]

Liu et al., "Deja Vu: Contextual Sparsity for Efficient LLMs at Inference Time", ICML 2023
(arXiv:2310.17157), train such a predictor per MLP to guess which neurons matter for this
token; the pruning pass (flashc.passes.prune.dejavu) trains a and b on calibration
activations and fixes the threshold there, as TEAL fixes its thresholds (no top-k at run
time). Unlike `flashc.sparsify`, which reads the value it prunes, the mask here depends on x
alone, so a kernel could skip the gate and up rows of the dropped neurons before computing
them; that output-sparse kernel is not built: h is computed whole, and the saving is the down
projection's reads, through the `flashc.sparsify(., 0)` the pass puts after this op (the CUDA
backend turns that linear into flashc.sparse_gemv). The score is computed in a's dtype (the
model's); a per-neuron threshold carries the predictor's bias and input centring, folded in.
"""

from __future__ import annotations

import torch


def predicted_mask(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The neurons kept, (x @ a) @ b > threshold [..., F] (bool): what the op and the pass's
    held-out measurements both compute, so the sparsity the report gives is the op's."""
    return (x.to(a.dtype) @ a) @ b > threshold


@torch.library.custom_op("flashc::predicted_sparsify", mutates_args=())
def predicted_sparsify(h: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       threshold: torch.Tensor) -> torch.Tensor:
    """h where the predictor of x keeps the neuron, else 0: h [..., F], x [..., K], a [K, r],
    b [r, F], threshold 0-d or [F]."""
    return torch.where(predicted_mask(x, a, b, threshold), h, torch.zeros((), dtype=h.dtype, device=h.device))


@predicted_sparsify.register_fake
def _(h, x, a, b, threshold):
    return torch.empty_like(h)


PREDICTOR_OPS = {"predicted_sparsify": torch.ops.flashc.predicted_sparsify.default}

"""FP8 (e4m3) weights and activations: a scale per output row (or per tensor) for the weight,
computed once here, and a scale per token (or per tensor) for the input, computed on every
call by flashc.linear_fp8.

e4m3 keeps 3 mantissa bits over a wide exponent range (largest value 448), so unlike int8 it
needs no outlier migration: each value is rounded relative to its own magnitude. Scaling
the largest magnitude of a row onto 448 uses the whole range (Micikevicius et al., "FP8
Formats for Deep Learning", arXiv:2209.05433). Runs on GPUs with FP8 tensor cores (the
profile's "fp8" feature: H100, H200, L4); the cpu target computes the same numbers by the
op's reference, for accuracy measurements.
"""

from __future__ import annotations

import torch

from flashc.quantized_ops import FP8_DTYPE, FP8_MAX, row_scales

GRANULARITIES = ("row", "tensor")


def quantize_weight_fp8(w: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (float8_e4m3fn [N, K], fp32 scales [N] ('row') or [1] ('tensor'))."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    scale = row_scales(w, FP8_MAX) if granularity == "row" else row_scales(w.reshape(1, -1), FP8_MAX)
    q = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.reshape(-1)

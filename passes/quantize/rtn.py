"""Round to nearest (RTN): each weight onto the nearest point of its group's min/max grid.

The baseline every other method is measured against: no calibration data, no error
compensation. Used as is for int8, where the grid is fine enough that it loses little.
"""

from __future__ import annotations

import torch

from flashc.passes.quantize.grid import QuantizedWeight, quantize_with_grid


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Quantize w [..., N, K] group-wise (group_size columns share a scale) by rounding."""
    return quantize_with_grid(w, bits, group_size, symmetric, scale_dtype or w.dtype)

"""The integer grid a weight is rounded onto: scales and zero points per group, codes.

Every method (RTN, GPTQ, AWQ) ends with codes on such a grid; they differ in which grid
they fit and in how they choose the values they round. Scales are rounded to their
storage dtype *before* any code is chosen, so the stored weight is exactly the one the
method measured its error on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashc.quantized_ops import default_zero_point, pack_codes, pack_zero_points


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight [..., N, K] as codes on a grid: W ~ (codes - zero_points) * scales per group."""

    codes: torch.Tensor  # uint8 [..., N, K], 0 .. 2**bits - 1
    scales: torch.Tensor  # [..., N, K / group_size], the storage dtype
    zero_points: torch.Tensor | None  # uint8 [..., N, K / group_size]; None: symmetric (midpoint)
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these codes stand for."""
        zp = (torch.full(self.scales.shape, float(default_zero_point(self.bits)), device=self.scales.device)
              if self.zero_points is None else self.zero_points.float())
        return dequantize_codes(self.codes, self.scales.float(), zp, self.group_size)

    def __getitem__(self, index: int) -> "QuantizedWeight":
        """One matrix of a stack (e.g. one expert of [E, N, K])."""
        zp = None if self.zero_points is None else self.zero_points[index]
        return QuantizedWeight(self.codes[index], self.scales[index], zp, self.bits, self.group_size)

    @classmethod
    def stack(cls, items: "list[QuantizedWeight]") -> "QuantizedWeight":
        """Matrices quantized alike, stacked along a new leading dimension."""
        first = items[0]
        zp = None if first.zero_points is None else torch.stack([q.zero_points for q in items])
        return cls(torch.stack([q.codes for q in items]), torch.stack([q.scales for q in items]), zp, first.bits,
                   first.group_size)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight, scales, zero_points) in flashc.quantized_ops' (MatMulNBits) layout."""
        zp = None if self.zero_points is None else pack_zero_points(self.zero_points, self.bits)
        return pack_codes(self.codes, self.bits, self.group_size), self.scales.contiguous(), zp


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., N, K] -> [..., N, K / group_size, group_size]."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def fit_grid(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype,
             clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (float32, zero points integral) for groups along w's last dim.

    w: [..., G] float (one grid per row of the last dim). Asymmetric: the group's
    [min, max], widened to include 0 so that 0 stays exact and no code range is lost to
    a one-signed group, maps onto 0 .. 2**bits - 1 (as GPTQ's quantizer). Symmetric:
    scale = max|w| / (2**(bits-1) - 1) around the midpoint code. `clip` (scalar or
    [...]) shrinks the range first (AWQ's clipping search). Scales are rounded up to
    scale_dtype, the dtype they are stored in (so the grid still spans the group).
    """
    maxq = (1 << bits) - 1
    if symmetric:
        amax = w.abs().amax(-1) * clip
        scale = amax / (default_zero_point(bits) - 1)
        zero = torch.full_like(scale, float(default_zero_point(bits)))
    else:
        lo = w.amin(-1).clamp(max=0) * clip
        hi = w.amax(-1).clamp(min=0) * clip
        scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # stored scales are rounded up, never down: a grid narrower than [min, max] would clamp the
    # extreme weights by more than half a step
    stored = scale.to(scale_dtype)
    stored = torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    scale = stored.float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(scale_dtype).tiny))  # underflow
    if not symmetric:
        zero = (-lo / scale).round().clamp(0, maxq)
    return scale, zero


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (float, integral) of w [..., G] on the grid of scale/zero [...] (broadcast over G)."""
    return (w / scale.unsqueeze(-1)).round().add(zero.unsqueeze(-1)).clamp(0, (1 << bits) - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes [..., N, K] with scale/zero [..., N, K / group_size] -> float32 [..., N, K]."""
    w = (grouped(codes.float(), group_size) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.reshape(codes.shape)


def quantize_with_grid(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype,
                       clip: torch.Tensor | float = 1.0) -> QuantizedWeight:
    """Round-to-nearest of w [..., N, K] on per-group grids fitted to w (clipped by `clip`)."""
    g = grouped(w.float(), group_size)
    scale, zero = fit_grid(g, bits, symmetric, scale_dtype, clip)
    codes = round_to_grid(g, scale, zero, bits).reshape(w.shape).to(torch.uint8)
    return QuantizedWeight(codes, scale.to(scale_dtype), None if symmetric else zero.to(torch.uint8), bits,
                           group_size)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """sum_n delta[n] H delta[n]^T: the squared output error ||delta X^T||^2 of a weight error
    delta [N, K] when H = X^T X (divided by the number of rows of X: the mean per token)."""
    return ((delta @ hessian) * delta).sum()

"""SmoothQuant W8A8: move activation outliers into the weights, then int8 for both.

Xiao, Lin, Seznec, Wu, Demouth, Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023 (arXiv:2211.10438):

* a few input channels of a transformer's linear layers carry activations 10-100x larger
  than the rest, so a per-token int8 grid sized for them rounds every other channel to
  almost nothing. Dividing channel j of the input by s_j and multiplying column j of the
  weight by s_j leaves the product unchanged and moves part of the range into the weight:
      s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
  (max|W_j| over every layer reading that input: q/k/v share one s, as gate/up do);
* the weight is then rounded per output row and the input per token (flashc.linear_w8a8).

The migration strength alpha is searched on the calibration activations (a sample of
rows kept per input): the alpha with the least summed relative output error of the
quantized layers, measured with the op's own reference. "No smoothing" (s = 1) is one of
the candidates, so the search never does worse than plain W8A8 on the calibration rows.
"""

from __future__ import annotations

import torch

from flashc.quantized_ops import INT8_MAX, linear_w8a8, row_scales

ALPHAS = tuple(round(0.05 * i, 2) for i in range(4, 19))  # 0.2 .. 0.9, the range the paper sweeps


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (int8 codes [N, K], fp32 scales [N]): symmetric, per output row."""
    scale = row_scales(w, INT8_MAX)
    return (w.float() / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale.squeeze(1)


def smoothing_scales(x_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] (float32) for migration strength alpha; channels never active or never weighted keep 1."""
    w_amax = torch.stack([w.abs().amax(0).float() for w in weights]).amax(0)
    x_amax = x_amax.float()
    s = x_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1 - alpha)
    return torch.where((x_amax > 0) & (w_amax > 0) & torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def w8a8_error(rows: torch.Tensor, weights: list[torch.Tensor], input_scale: torch.Tensor | None,
               quantized: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Summed relative output error sqrt(||Y_q - Y||^2 / ||Y||^2) of the layers on `rows`."""
    total = 0.0
    for w, (q, scales) in zip(weights, quantized):
        ref = rows @ w.float().t()
        out = linear_w8a8(rows.to(w.dtype), q, scales, None, input_scale).float()
        total += float((out - ref).norm() / ref.norm().clamp(min=1e-12))
    return total


def smoothquant(weights: list[torch.Tensor], rows: torch.Tensor, x_amax: torch.Tensor,
                alpha: float | None = None, alphas: tuple[float, ...] = ALPHAS
                ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None, float | None, float]:
    """Quantize the layers reading one input (each w [N_i, K]).

    rows: sampled calibration inputs [R, K]; x_amax: max |x| per channel over the whole
    calibration run. alpha: a fixed strength, or None to search `alphas` (plus no smoothing).
    Returns ([(int8 codes, fp32 row scales)] per layer, input scale 1/s in the weights' dtype
    or None, the alpha chosen (None: no smoothing), its error on `rows`).
    """
    dtype = weights[0].dtype
    candidates: list[float | None] = [alpha] if alpha is not None else [None, *alphas]
    best = None
    for a in candidates:
        if a is None:
            inverse = None
            quantized = [quantize_weight_int8(w) for w in weights]
        else:
            # 1/s is stored in the activation dtype: round it first, then fold exactly what the op applies
            inverse = (1 / smoothing_scales(x_amax, weights, a)).to(dtype)
            s = 1 / inverse.float()
            quantized = [quantize_weight_int8(w.float() * s) for w in weights]
        error = w8a8_error(rows, weights, inverse, quantized) if rows.numel() else 0.0
        if best is None or error < best[3]:
            best = (quantized, inverse, a, error)
    return best

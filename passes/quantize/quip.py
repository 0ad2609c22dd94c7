"""QuIP-style incoherence processing: rotate a weight by random Hadamard transforms, then round it.

Chee, Cai, Kuleshov, De Sa, "QuIP: 2-Bit Quantization of Large Language Models With Guarantees",
NeurIPS 2023 (arXiv:2307.13304); Tseng et al., "QuIP#", ICML 2024 (arXiv:2402.04396). A weight
with a few large entries (outlier input columns are common in LLMs) wastes a rounding grid on them.
Multiplying it on both sides by random orthogonal matrices spreads every entry over all of them
("incoherence": max |W'| / rms(W') falls to about sqrt(2 log(N K))), the rotated weight is rounded
with GPTQ (QuIP's LDLQ is GPTQ's rule) on the Hessian rotated the same way, and the rotations are
undone at run time:

    W' = U_out W U_in^T,   U = H diag(s) / sqrt(n)   (flashc.hadamard_ops; s random signs)
    y  = W x + b ~ U_out^T Q(W') U_in x + b
       = s_out * hadamard(linear_wq(hadamard(x, s_in), Q(W')), None) + b

(U^T y = s * hadamard(y, None): flashc.hadamard_ops.) Orthogonal U keep the output error:
||(U_out^T Q U_in - W) X^T|| = ||(Q - W') (U_in X^T)||, so GPTQ on W' with H' = U_in H U_in^T
minimises the layer's own error. Act-order is off: after the rotation every column looks alike,
which is what act-order approximates (QuIP# runs without it too).

Signs are drawn from a generator seeded by the layer's name, so a compile is reproducible. Layers
reading one input share s_in (one transform of x). MoE experts (all reading the layer's input, their
outputs summed) take one-sided rotations: gate_up on its input side, down on its output side; the
inside of an expert (the gated activation) cannot be rotated without changing flashc.moe_wq.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from flashc.hadamard_ops import hadamard_reference, unsupported_size_reason
from flashc.passes.quantize.gptq import gptq_quantize
from flashc.passes.quantize.grid import QuantizedWeight, output_error
from flashc.passes.quantize.rtn import rtn_quantize


@dataclass(frozen=True)
class QuipWeight:
    """A weight W [..., N, K] stored as Q(W') with W' = U_out W U_in^T; a side whose signs are None
    is not rotated (U = I)."""

    q: QuantizedWeight  # the rotated weight, quantized
    input_signs: torch.Tensor | None  # s_in [K]: x is rotated by hadamard(x, s_in) before the product
    output_signs: torch.Tensor | None  # s_out [N]: the product is unrotated by s_out * hadamard(z, None)

    def effective_weight(self) -> torch.Tensor:
        """U_out^T dequantize(Q) U_in (float64 [..., N, K]): the weight the rewritten graph applies to x."""
        w = self.q.dequantize().double()
        if self.input_signs is not None:  # rows of W' U_in = (U_in^T rows of W')^T
            w = unrotate_last(w, self.input_signs)
        if self.output_signs is not None:
            w = unrotate_last(w.transpose(-1, -2), self.output_signs).transpose(-1, -2)
        return w


def random_signs(n: int, seed_text: str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """n random +-1 (dtype), drawn from a generator seeded by seed_text (a layer's name)."""
    g = torch.Generator().manual_seed(zlib.crc32(seed_text.encode()))
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(device=device, dtype=dtype)


def rotate_last(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Each row r of w [..., K] -> U r (float64): w U^T, U = H diag(signs) / sqrt(K)."""
    return hadamard_reference(w.double(), signs)


def unrotate_last(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Each row r of w [..., K] -> U^T r = signs * hadamard(r, None) (float64): w U."""
    return hadamard_reference(w.double(), None) * signs.double()


def rotate_weight(w: torch.Tensor, input_signs: torch.Tensor | None,
                  output_signs: torch.Tensor | None) -> torch.Tensor:
    """W' = U_out W U_in^T (float64) for w [..., N, K]; a side with signs None is left as it is."""
    w = w.double()
    if input_signs is not None:
        w = rotate_last(w, input_signs)
    if output_signs is not None:
        w = rotate_last(w.transpose(-1, -2), output_signs).transpose(-1, -2)
    return w


def rotate_hessian(hessian: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """H' = U H U^T (float64) for hessian [..., K, K] = E[x x^T]: the Hessian of the rotated inputs U x."""
    h = hessian.double()
    if signs is None:
        return h
    return rotate_last(rotate_last(h, signs).transpose(-1, -2), signs)


def incoherence(w: torch.Tensor) -> float:
    """max |w| / rms(w): QuIP's mu (up to its normalisation); 1 for a flat weight, large with outliers."""
    w = w.double()
    return float(w.abs().max() / w.pow(2).mean().sqrt().clamp_min(1e-300))


def rotation_skip_reason(n: int, k: int) -> str | None:
    """Why a weight [n, k] cannot be rotated on both sides (None: it can)."""
    for side, size in (("input", k), ("output", n)):
        why = unsupported_size_reason(size)
        if why is not None:
            return f"QuIP rotation of the {side} side: {why}"
    return None


def quip_quantize(w: torch.Tensor, hessian: torch.Tensor, input_signs: torch.Tensor | None,
                  output_signs: torch.Tensor | None, bits: int, group_size: int, symmetric: bool,
                  damp: float = 0.01, block_size: int = 128, scale_dtype: torch.dtype | None = None,
                  rounding: str = "gptq") -> QuipWeight:
    """Quantize w [..., N, K] (leading dims: a stack, e.g. MoE experts, with hessian [..., K, K]) in the
    rotated basis: GPTQ without act-order on W' with U_in H U_in^T, or round to nearest ("rtn").

    The grid's scales are stored in scale_dtype (w's dtype by default), as every method here does.
    """
    if rounding not in ("gptq", "rtn"):
        raise ValueError(f"quip_quantize: rounding must be 'gptq' or 'rtn', got {rounding!r}")
    dtype = scale_dtype or w.dtype
    rotated = rotate_weight(w, input_signs, output_signs)
    if rounding == "rtn":
        q = rtn_quantize(rotated, bits, group_size, symmetric, dtype)
    else:
        q = gptq_quantize(rotated, rotate_hessian(hessian, input_signs), bits, group_size, symmetric,
                          act_order=False, damp=damp, block_size=block_size, scale_dtype=dtype)
    signs_dtype = w.dtype if w.is_floating_point() else torch.float32
    return QuipWeight(q, None if input_signs is None else input_signs.to(signs_dtype),
                      None if output_signs is None else output_signs.to(signs_dtype))


def quip_relative_error(w: torch.Tensor, quantized: QuipWeight, hessian: torch.Tensor) -> float | None:
    """sqrt(||(W_eff - W) X^T||^2 / ||W X^T||^2) for w [N, K], W_eff the effective weight, H = X^T X / rows."""
    h = hessian.double()
    base = float(output_error(w.double(), h))
    if base <= 0:
        return None
    return (float(output_error(quantized.effective_weight() - w.double(), h)) / base) ** 0.5

"""Codebook-quantized ops: `flashc.linear_aqlm` and `flashc.moe_aqlm` (additive quantization, AQLM).

AQLM (Egiazarian et al., "Extreme Compression of Large Language Models via Additive
Quantization", ICML 2024, arXiv:2401.06118) stores a weight W [N, K] as codes into M
learned codebooks. The layout, for groups of g consecutive input columns:

* `codes`: uint8 [N, K / g, M]; codes[n, j, m] indexes codebook m for group j of row n
  (B = 8 bits a code: 256 codewords a codebook);
* `codebooks`: [M, 256, g] in the activation dtype (shared by every row and group of the layer);
* `scales`: [N] in the activation dtype, one per output row;

    W_hat[n, j*g:(j+1)*g] = scales[n] * sum_m codebooks[m, codes[n, j, m]]

With M = 2, g = 8 that is 2 bits a weight for the codes, plus the codebooks (2 x 256 x 8
values a layer) and a scale a row. Stacked MoE experts carry a leading expert dimension
[E, ...] on every tensor (each expert has its own codebooks). The references below decode
W_hat in x's dtype (the codewords summed in codebook order, then scaled) and multiply: the
numeric truth that the CUDA kernels (codegen/aqlm_gemv.py) match up to summation order.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from flashc.ops import routed_experts


def decode_aqlm(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """W_hat [N, K] of codes [N, K/g, M], codebooks [M, 2^B, g] and scales [N], in `dtype`
    (default: the codebooks' dtype)."""
    dtype = dtype or codebooks.dtype
    n, groups, m = codes.shape
    books = codebooks.to(dtype)
    index = codes.long()
    w = books[0][index[..., 0]]  # [N, K/g, g]
    for i in range(1, m):
        w = w + books[i][index[..., i]]
    return (w * scales.to(dtype)[:, None, None]).reshape(n, groups * books.shape[-1])


@torch.library.custom_op("flashc::linear_aqlm", mutates_args=())
def linear_aqlm(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x @ W_hat^T + bias, W_hat decoded from AQLM codes (layout: this module's docstring).

    x [..., K]; codes uint8 [N, K/g, M]; codebooks [M, 256, g]; scales [N]; bias [N] or None.
    The weight is decoded and the product computed in x's dtype.
    """
    return F.linear(x, decode_aqlm(codes, codebooks, scales, x.dtype), bias)


@linear_aqlm.register_fake
def _(x, codes, codebooks, scales, bias):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@torch.library.custom_op("flashc::moe_aqlm", mutates_args=())
def moe_aqlm(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up_codes: torch.Tensor,
    gate_up_codebooks: torch.Tensor,
    gate_up_scales: torch.Tensor,
    down_codes: torch.Tensor,
    down_codebooks: torch.Tensor,
    down_scales: torch.Tensor,
    top_k: int,
    normalize: bool,
) -> torch.Tensor:
    """flashc.moe with AQLM experts: gate_up [E, 2F, H] as codes [E, 2F, H/g, M], codebooks
    [E, M, 256, g], scales [E, 2F]; down [E, H, F] likewise. Routing is flashc.moe's; each
    expert's weights are decoded in x's dtype and only the routed (token, expert) pairs computed."""
    f = down_codes.shape[-2] * down_codebooks.shape[-1]

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up = decode_aqlm(gate_up_codes[e], gate_up_codebooks[e], gate_up_scales[e], x.dtype)
        down = decode_aqlm(down_codes[e], down_codebooks[e], down_scales[e], x.dtype)
        gu = rows @ gate_up.t()
        return (F.silu(gu[:, :f]) * gu[:, f:]) @ down.t()

    return routed_experts(x, router_logits, gate_up_codes.shape[0], top_k, normalize, expert)


@moe_aqlm.register_fake
def _(x, router_logits, gate_up_codes, gate_up_codebooks, gate_up_scales, down_codes, down_codebooks, down_scales,
      top_k, normalize):
    return torch.empty_like(x)


CODEBOOK_OPS = {"linear_aqlm": torch.ops.flashc.linear_aqlm.default, "moe_aqlm": torch.ops.flashc.moe_aqlm.default}

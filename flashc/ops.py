"""flashc's own ops, registered with torch.library.

Each op is defined once here: its schema, its reference implementation (plain
PyTorch, the numeric truth every backend is checked against) and its fake kernel
(shapes and dtypes only, so an optimized graph still propagates shapes). Fusion
passes rewrite ATen subgraphs into these ops; a backend lowers the ones it supports
and leaves the rest to the reference implementation.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@torch.library.custom_op("flashc::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: normalise in fp32, cast back to x's dtype, then scale by weight."""
    return _rms(x, eps) * weight


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("flashc::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm; returns (normed, sum) so the sum feeds the next residual."""
    s = x + residual
    return _rms(s, eps) * weight, s


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    s = torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))
    return torch.empty_like(s, dtype=torch.promote_types(s.dtype, weight.dtype)), s


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary_out(x: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """The output of a rotary op: x's shape, and x's memory layout when x is dense (the kernels
    keep it), so rope on a transposed view (x [B, S, H, D] seen as [B, H, S, D]) transposed
    back is as contiguous as x was."""
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))


@torch.library.custom_op("flashc::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (rotate-half form) of x[B, H, S, D] with cos/sin[B, S, D]."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    # copied into x's layout, not written with out= (which autograd refuses: distillation trains through it)
    return _rotary_out(x, cos).copy_(x * c + rotate_half(x) * s)


@rotary.register_fake
def _(x, cos, sin):
    return _rotary_out(x, cos)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x[2i], x[2i + 1]) -> (-x[2i + 1], x[2i]) along the last dim: rotate_half for interleaved pairs."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


@torch.library.custom_op("flashc::rotary_interleaved", mutates_args=())
def rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of the pairs (2i, 2i + 1) (GPT-J's and Meta's Llama's form) of
    x[B, H, S, D], with cos/sin[B, S, D] in the pairs' order:

        out[2i]     = x[2i]     * cos[2i]     - x[2i + 1] * sin[2i]
        out[2i + 1] = x[2i + 1] * cos[2i + 1] + x[2i]     * sin[2i + 1]

    (`rotary` with `rotate_pairs` for rotate_half; a model's tables hold each pair's angle twice,
    cos[2i] == cos[2i + 1]). A separate op rather than a mode of `rotary`, so that graphs calling
    flashc.rotary (saved artifacts, the CUDA backend's kv-write folding) keep their meaning."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotary_out(x, cos).copy_(x * c + rotate_pairs(x) * s)  # as rotary: no out= (autograd)


@rotary_interleaved.register_fake
def _(x, cos, sin):
    return _rotary_out(x, cos)


@torch.library.custom_op("flashc::swiglu", mutates_args=())
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the activation of Llama/Mistral/Qwen MLPs."""
    return F.silu(gate) * up


@swiglu.register_fake
def _(gate, up):
    return torch.empty(torch.broadcast_shapes(gate.shape, up.shape),
                       dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)


@torch.library.custom_op("flashc::geglu", mutates_args=())
def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(gate) * up, the activation of Gemma's MLP ('tanh' approximation there)."""
    return F.gelu(gate, approximate=approximate) * up


@geglu.register_fake
def _(gate, up, approximate):
    return torch.empty(torch.broadcast_shapes(gate.shape, up.shape),
                       dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)


def causal_mask(s: int, l: int, device=None) -> torch.Tensor:
    """Boolean [s, l] mask, True where query i may attend key j (aligned bottom-right)."""
    i = torch.arange(s, device=device).unsqueeze(1)
    j = torch.arange(l, device=device).unsqueeze(0)
    return j <= i + (l - s)


@torch.library.custom_op("flashc::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor],
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with grouped-query heads, never repeating K/V.

    q[B, Hq, S, D], k/v[B, Hkv, L, D] with Hq a multiple of Hkv; query head h reads
    KV head h // (Hq // Hkv). is_causal aligns the mask bottom-right (query i sees keys
    j <= i + L - S), the convention of a KV cache. mask is boolean (True = attend) or
    additive, broadcastable to [B, Hq, S, L].
    """
    b, hq, s, d = q.shape
    hkv, l = k.shape[1], k.shape[2]
    group = hq // hkv
    qg = q.reshape(b, hkv, group, s, d)
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)).float() * scale
    if mask is not None:
        m = mask.expand(b, hq, s, l).reshape(b, hkv, group, s, l) if mask.dim() == 4 else mask
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + m.float()
    if is_causal:
        scores = scores.masked_fill(~causal_mask(s, l, q.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if mask is not None and mask.dtype == torch.bool:
        # a query that may attend to no key reads nothing: zeros, as scaled_dot_product_attention
        # gives (an additive mask of -inf keeps softmax's NaN, as eager's written-out form does)
        probs = probs.masked_fill(torch.isnan(probs), 0.0)
    out = torch.matmul(probs.to(v.dtype), v.unsqueeze(2))
    return out.reshape(b, hq, s, d)


@attention.register_fake
def _(q, k, v, mask, is_causal, scale):
    return torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)


def decode_mask(cache_position: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Boolean [S, cache_len] mask of a static KV cache: query s sees keys j <= cache_position[s]."""
    keys = torch.arange(cache_len, device=cache_position.device)
    return keys.unsqueeze(0) <= cache_position.unsqueeze(1)


@torch.library.custom_op("flashc::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_position: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of new queries over a static KV cache that already holds their keys.

    q[B, Hq, S, D], k_cache/v_cache[B, Hkv, L, D], cache_position[S] (int64): query s
    sits at position cache_position[s] of every sequence in the batch and attends the
    keys j <= cache_position[s]. This is `attention` with `decode_mask`, kept as its own
    op so a backend can bound the work by the live length instead of reading a mask.
    """
    mask = decode_mask(cache_position, k_cache.shape[2])
    return attention(q, k_cache, v_cache, mask, False, scale)


@decode_attention.register_fake
def _(q, k_cache, v_cache, cache_position, scale):
    return torch.empty(q.shape[:-1] + (v_cache.shape[-1],), dtype=q.dtype, device=q.device)


def moe_routing(router_logits: torch.Tensor, top_k: int, normalize: bool, dtype: torch.dtype):
    """(weights[T, top_k] in dtype, experts[T, top_k]): top-k of the fp32 softmax over experts,
    renormalised over the k chosen when `normalize` -- how flashc.moe routes tokens."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(dtype), experts


@torch.library.custom_op("flashc::moe", mutates_args=())
def moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    normalize: bool,
) -> torch.Tensor:
    """Top-k mixture of SwiGLU experts (Mixtral), computing only the routed pairs.

    x[T, H], router_logits[T, E], gate_up[E, 2F, H] (gate rows first), down[E, H, F].
    Routing weights are the softmax over experts (fp32) of the top-k logits,
    renormalised over the k chosen when `normalize`.
    """
    f = down.shape[-1]

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gu = rows @ gate_up[e].t()
        return (F.silu(gu[:, :f]) * gu[:, f:]) @ down[e].t()

    return routed_experts(x, router_logits, gate_up.shape[0], top_k, normalize, expert)


def routed_experts(x: torch.Tensor, router_logits: torch.Tensor, n_experts: int, top_k: int, normalize: bool,
                   expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """flashc.moe's routing and combination around `expert(e, rows)`, expert e's output for the
    rows x[token] routed to it: only routed (token, expert) pairs are computed, and each token's
    outputs are added in expert order, weighted as moe_routing weighs them. The references of
    flashc.moe and of its quantized forms (moe_wq, moe_a8, moe_aqlm) differ only in `expert`."""
    weights, experts = moe_routing(router_logits, top_k, normalize, x.dtype)
    out = torch.zeros_like(x)
    for e in range(n_experts):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        out.index_add_(0, token, expert(e, x[token]) * weights[token, slot, None])
    return out


@moe.register_fake
def _(x, router_logits, gate_up, down, top_k, normalize):
    return torch.empty_like(x)


# The ops above, by name, for backends that list what they lower and for reports.
FLASHC_OPS = {
    "rms_norm": torch.ops.flashc.rms_norm.default,
    "add_rms_norm": torch.ops.flashc.add_rms_norm.default,
    "rotary": torch.ops.flashc.rotary.default,
    "rotary_interleaved": torch.ops.flashc.rotary_interleaved.default,
    "swiglu": torch.ops.flashc.swiglu.default,
    "geglu": torch.ops.flashc.geglu.default,
    "attention": torch.ops.flashc.attention.default,
    "decode_attention": torch.ops.flashc.decode_attention.default,
    "moe": torch.ops.flashc.moe.default,
}


# --- ops the CUDA backend's late passes rewrite into (backends/cuda_rewrites.py) -------------
# Each one is a launch of one generated kernel on the GPU; here, the unfused ops it stands
# for, in the order the graph ran them, so a rewritten graph computes what it computed.


@torch.library.custom_op("flashc::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
         eps: float, residual: Optional[torch.Tensor], glu: Optional[str]) -> torch.Tensor:
    """A decode-sized linear with what folds into it: RMSNorm of x before (norm_weight),
    then either the residual added after or a gated activation ('silu' or 'gelu_tanh') of
    the two halves of the output."""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    return gemv_epilogue(F.linear(x, weight, bias), glu, residual)


def gemv_epilogue(y: torch.Tensor, glu: Optional[str], residual: Optional[torch.Tensor]) -> torch.Tensor:
    """What folds after the product in `flashc.gemv` and the ops that fold like it (`gemv_wq`,
    `sparse_gemv`): the gated activation ('silu' or 'gelu_tanh') of the output's two halves, then
    the residual added."""
    if glu is not None:
        gate, up = y.chunk(2, dim=-1)
        y = swiglu(gate, up) if glu == "silu" else geglu(gate, up, "tanh")
    if residual is not None:
        y = y + residual
    return y


@gemv.register_fake
def _(x, weight, bias, norm_weight, eps, residual, glu):
    dtype = torch.promote_types(x.dtype, norm_weight.dtype) if norm_weight is not None else x.dtype
    n = weight.shape[0] // 2 if glu is not None else weight.shape[0]
    if residual is not None:
        dtype = torch.promote_types(dtype, residual.dtype)
    return torch.empty(*x.shape[:-1], n, dtype=dtype, device=x.device)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return rotary_interleaved(x, cos, sin) if interleaved else rotary(x, cos, sin)


@torch.library.custom_op("flashc::rotary_kv_write", mutates_args=("k_cache", "v_cache"))
def rotary_kv_write(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                    interleaved: bool = False) -> None:
    """A decode step's cache update: rotary of the new keys written to k_cache and the new
    values to v_cache, at rows `positions` of dim 2 (`interleaved`: the pairs' rotary,
    flashc.rotary_interleaved, instead of rotate-half)."""
    k_cache.index_copy_(2, positions, _rope(k, cos, sin, interleaved))
    v_cache.index_copy_(2, positions, v)


@rotary_kv_write.register_fake
def _(k, v, cos, sin, k_cache, v_cache, positions, interleaved=False):
    return None


@torch.library.custom_op("flashc::rotary_qkv_write", mutates_args=("k_cache", "v_cache"))
def rotary_qkv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     interleaved: bool = False) -> torch.Tensor:
    """`rotary_kv_write`, and the rotary of the new queries with the same tables (returned)."""
    k_cache.index_copy_(2, positions, _rope(k, cos, sin, interleaved))
    v_cache.index_copy_(2, positions, v)
    return _rope(q, cos, sin, interleaved)


@rotary_qkv_write.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, positions, interleaved=False):
    return torch.empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)


from flashc import quantized_ops as _quantized_ops  # noqa: E402,F401  (registers flashc.linear_wq, flashc.moe_wq)
from flashc import quantized_input_ops as _quantized_input_ops  # noqa: E402,F401  (flashc.rms_norm_quant, ...)
from flashc import sparse_ops as _sparse_ops  # noqa: E402,F401  (registers flashc.sparsify)
from flashc import predictor_ops as _predictor_ops  # noqa: E402,F401  (registers flashc.predicted_sparsify)
from flashc import semi_structured_ops as _semi_structured_ops  # noqa: E402,F401  (registers flashc.linear_24)
from flashc import codebook_ops as _codebook_ops  # noqa: E402,F401  (registers flashc.linear_aqlm)
from flashc import hadamard_ops as _hadamard_ops  # noqa: E402,F401  (registers flashc.hadamard)
from flashc import ssm_ops as _ssm_ops  # noqa: E402,F401  (registers flashc.ssm_scan, ssm_mix, gla_mix)

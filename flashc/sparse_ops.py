"""Activation-sparsity ops: `flashc.sparsify`, the online (contextual) pruning of a layer's input.

`flashc.sparsify(x, threshold)` keeps the entries of x whose magnitude is above the
threshold and zeroes the rest (TEAL's magnitude sparsification: Liu et al., "Training-Free
Activation Sparsity in Large Language Models", ICLR 2025, arXiv:2408.14690). The pruning
pass (flashc.passes.prune.activations) inserts it before a linear layer with a threshold
calibrated so that a chosen fraction of the entries is zero; a sparse GEMV then reads only
the weight columns whose input survives. The reference below is the numeric truth; it
computes the dense product's input, so on its own it saves nothing.

`flashc.sparse_gemv(x, threshold, weight_t, bias, ...)` is that saving: `linear(sparsify(x,
threshold), weight_t.T, bias)` with the weight stored transposed, [K, N], so the weights
one input feature multiplies are one contiguous row, skipped whole when the feature is
zeroed; the RMSNorm before it, the gated activation or the residual add after it fold in
as they do into `flashc.gemv`. The CUDA backend's late pass writes it for decode-sized products
(backends/cuda_rewrites.py) and runs it as a Triton kernel (codegen/triton_sparse_gemv.py).

`flashc.moe_sparse(x, router_logits, gate_up, down, top_k, normalize, threshold)` is
`flashc.moe` with the experts' intermediate, silu(gate) * up (the down projections' input),
sparsified by threshold: that value exists only inside the fused experts, so a
`flashc.sparsify` node cannot reach it. TEAL (Sec. 3) finds the intermediate zero-centred
and heavy-tailed, cheap to sparsify by magnitude; on mixtral-ref, with it, the same 28% of
weight reads removed cost +3.1% perplexity instead of +12.0% (8 windows per text of the
evaluation texts, a one-off script not kept, 2026-12-06; bench/RESULTS.md). Its own op rather than an optional argument of
flashc.moe, so that no lowering of flashc.moe can silently drop the threshold: ONNX and TVM
lower it (backends/onnx/_fused.py, backends/tvm/relax_ops.py), and the CUDA backend runs
flashc.moe's Triton kernels with the pruning in their SwiGLU epilogue
(codegen/triton_moe.py: `moe_sparse`), whose routing stays on the device, so the forward
keeps its CUDA graph; this reference's per-expert routing synchronises with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashc.ops import _rms, gemv_epilogue, routed_experts


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


@torch.library.custom_op("flashc::sparse_gemv", mutates_args=())
def sparse_gemv(x: torch.Tensor, threshold: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
                glu: str | None = None) -> torch.Tensor:
    """linear(sparsify(x, threshold), weight_t.T, bias): x [..., K], weight_t [K, N] -> [..., N],
    with what folds into it as into `flashc.gemv`: x RMSNormed first (norm_weight, eps: the
    normed value is what the threshold sees), then either a gated activation ('silu' or
    'gelu_tanh') of the output's two halves -> [..., N / 2], or the residual added.

    threshold as for `sparsify` (0-d, or [K]). With finite weights this is the sum over the
    kept input features only, which is what the kernel computes; a zeroed feature whose weight
    row holds inf or nan gives nan here (0 * inf), so the late pass rewrites finite weights only.
    """
    if norm_weight is not None:
        x = _rms(x, eps) * norm_weight
    kept = torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return gemv_epilogue(F.linear(kept, weight_t.t(), bias), glu, residual)


@sparse_gemv.register_fake
def _(x, threshold, weight_t, bias, norm_weight=None, eps=1e-6, residual=None, glu=None):
    n = weight_t.shape[1] // 2 if glu is not None else weight_t.shape[1]
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("flashc::moe_sparse", mutates_args=())
def moe_sparse(x: torch.Tensor, router_logits: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
               normalize: bool, threshold: torch.Tensor) -> torch.Tensor:
    """flashc.moe (x[T, H], router_logits[T, E], gate_up[E, 2F, H], down[E, H, F]) with each
    routed pair's intermediate h = silu(gate) * up [rows, F] sparsified, `sparsify(h, threshold)`,
    before its expert's down projection. threshold: 0-d, or one per intermediate channel [F]."""
    f = down.shape[-1]

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gu = rows @ gate_up[e].t()
        h = F.silu(gu[:, :f]) * gu[:, f:]
        return torch.where(h.abs() > threshold, h, torch.zeros((), dtype=h.dtype, device=h.device)) @ down[e].t()

    return routed_experts(x, router_logits, gate_up.shape[0], top_k, normalize, expert)


@moe_sparse.register_fake
def _(x, router_logits, gate_up, down, top_k, normalize, threshold):
    return torch.empty_like(x)


SPARSE_OPS = {"sparsify": torch.ops.flashc.sparsify.default, "sparse_gemv": torch.ops.flashc.sparse_gemv.default,
              "moe_sparse": torch.ops.flashc.moe_sparse.default}

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

`flashc.sparse_gemv_wq(x, threshold, qweight_t, bias, ..., scales_t, zero_points_t, input_scale,
bits)` is the same saving on a weight-only quantized layer (`flashc.linear_wq`, flashc/quantized_ops.py):
`linear_wq(sparsify(x, threshold), ...)`. linear_wq's codes are packed along K (a 32-byte sector holds
64 int4 codes of one output row), so a zeroed input feature saves nothing there; here the weight is
stored K-major (`to_kmajor`): for each input feature k its N codes packed along N in int32 words,
`qweight_t[K, N * bits / 32]`, with the scales `scales_t[K / G, N]` (and packed zero points
`zero_points_t[K / G, N * bits / 32]`) per (group of G input features, output). A zeroed feature is
then one row of N * bits / 8 contiguous bytes not read (codegen/triton_sparse_gemv_wq.py). The
conversion keeps every code and scale: `dequantize_kmajor(*to_kmajor(...))` equals
`dequantize(...).T` bit for bit.

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

from flashc.errors import InputError
from flashc.ops import _rms, gemv_epilogue, routed_experts
from flashc.quantized_ops import default_zero_point, pack_subbyte, unpack_codes, unpack_subbyte, unpack_zero_points


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


# ------------------------------------------------------------- K-major packed weights (sparse_gemv_wq)
KMAJOR_BITS = (2, 4, 8)  # widths whose codes tile a 32-bit word (3-bit codes would straddle words along N)


def _check_kmajor_bits(bits: int) -> None:
    if bits not in KMAJOR_BITS:
        raise InputError(f"K-major packed weights have {', '.join(map(str, KMAJOR_BITS))} bits, got {bits!r}: "
                         "3-bit codes straddle 32-bit words; leave such a layer to linear_wq")


def _pack_along_n(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [R, N] below 2**bits -> int32 [R, N * bits / 32]: word j holds columns j * 32 / bits ..,
    column i of the word in bits bits*i .. (a little-endian bitstream read as words, like linear_wq's)."""
    values = values.contiguous()
    packed = values if bits == 8 else pack_subbyte(values, bits).contiguous()
    return packed.view(torch.int32)


def _unpack_along_n(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of _pack_along_n: int32 [R, W] -> uint8 [R, W * 32 / bits]."""
    raw = words.contiguous().view(torch.uint8)
    return raw if bits == 8 else unpack_subbyte(raw, bits)


def to_kmajor(qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
              bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """linear_wq's packed weight (qweight [N, K / G, G * bits / 8], scales [N, K / G], zero points or None)
    -> (qweight_t int32 [K, N * bits / 32], scales_t [K / G, N], zero_points_t int32 [K / G, N * bits / 32]
    or None): the same codes, scales and zero points, K-major, as flashc.sparse_gemv_wq reads them.

    Done once when a program is compiled (the CUDA backend's late pass), never per call. N must
    be a multiple of 32 / bits (whole words a feature row)."""
    _check_kmajor_bits(bits)
    if qweight.dim() != 3 or qweight.dtype != torch.uint8:
        raise InputError(f"to_kmajor: qweight must be uint8 [N, K / group_size, group_size * {bits} / 8] "
                         f"(linear_wq's layout), got {qweight.dtype} {list(qweight.shape)}")
    n, n_blocks = qweight.shape[0], qweight.shape[1]
    if n % (32 // bits):
        raise InputError(f"to_kmajor: {n} output rows do not fill whole 32-bit words of {32 // bits} "
                         f"{bits}-bit codes; leave this layer to linear_wq")
    if tuple(scales.shape) != (n, n_blocks):
        raise InputError(f"to_kmajor: scales must be [{n}, {n_blocks}] (one per row and group), "
                         f"got {list(scales.shape)}")
    codes = unpack_codes(qweight, bits)  # [N, K]
    qweight_t = _pack_along_n(codes.t(), bits)
    zero_points_t = None
    if zero_points is not None:
        zero_points_t = _pack_along_n(unpack_zero_points(zero_points, bits, n_blocks).t(), bits)
    return qweight_t, scales.t().contiguous(), zero_points_t


def unpack_kmajor_codes(qweight_t: torch.Tensor, bits: int) -> torch.Tensor:
    """K-major packed codes int32 [K, N * bits / 32] -> uint8 [K, N]."""
    _check_kmajor_bits(bits)
    return _unpack_along_n(qweight_t, bits)


def dequantize_kmajor(qweight_t: torch.Tensor, scales_t: torch.Tensor, zero_points_t: torch.Tensor | None,
                      bits: int) -> torch.Tensor:
    """The float32 weight [K, N] a K-major packed weight stands for: `dequantize(...).T` of the layout it
    came from, bit for bit (the same fp32 operations on the same codes, zero points and scales)."""
    codes = unpack_kmajor_codes(qweight_t, bits)
    n_groups, n = scales_t.shape
    group = codes.shape[0] // n_groups
    if zero_points_t is None:
        zp = torch.full(scales_t.shape, default_zero_point(bits), dtype=torch.float32, device=scales_t.device)
    else:
        zp = _unpack_along_n(zero_points_t, bits).float()
    blocks = codes.reshape(n_groups, group, n).float()
    return ((blocks - zp.unsqueeze(1)) * scales_t.float().unsqueeze(1)).reshape(codes.shape)


@torch.library.custom_op("flashc::sparse_gemv_wq", mutates_args=())
def sparse_gemv_wq(x: torch.Tensor, threshold: torch.Tensor, qweight_t: torch.Tensor, bias: torch.Tensor | None,
                   norm_weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None, glu: str | None,
                   scales_t: torch.Tensor, zero_points_t: torch.Tensor | None, input_scale: torch.Tensor | None,
                   bits: int) -> torch.Tensor:
    """linear_wq(sparsify(x, threshold), ...) on a K-major packed weight (`to_kmajor`), with sparse_gemv's
    folds: the first eight arguments are `flashc.sparse_gemv`'s (the late pass folds norms, activations and
    residuals into either op the same way), the packed weight's scales, zero points, AWQ input scale and bit
    width follow. x RMSNormed first (norm_weight: the threshold sees the normed value), the kept inputs times
    input_scale, the product with the dequantized weight plus bias, then the gated activation of the output's
    halves or the residual added. x [..., K] -> [..., N] ([..., N / 2] with glu), N = scales_t.shape[1].

    As linear_wq computes it: the weight dequantized in fp32 and rounded to x's dtype, the product in x's
    dtype. A finite weight needs finite scales; the late pass rewrites only those (see sparse_gemv).
    """
    if norm_weight is not None:
        x = _rms(x, eps) * norm_weight
    kept = torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
    # [N, K] contiguous, as linear_wq multiplies: the same product, bit for bit, on the same device
    w = dequantize_kmajor(qweight_t, scales_t, zero_points_t, bits).to(kept.dtype).t().contiguous()
    if input_scale is not None:
        kept = kept * input_scale
    return gemv_epilogue(F.linear(kept, w, bias), glu, residual)


@sparse_gemv_wq.register_fake
def _(x, threshold, qweight_t, bias, norm_weight, eps, residual, glu, scales_t, zero_points_t, input_scale, bits):
    n = scales_t.shape[1] // 2 if glu is not None else scales_t.shape[1]
    return x.new_empty((*x.shape[:-1], n))


SPARSE_OPS = {"sparsify": torch.ops.flashc.sparsify.default, "sparse_gemv": torch.ops.flashc.sparse_gemv.default,
              "sparse_gemv_wq": torch.ops.flashc.sparse_gemv_wq.default,
              "moe_sparse": torch.ops.flashc.moe_sparse.default}

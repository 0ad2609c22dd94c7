"""Decode matrix-vector products that skip the weights of zeroed activations (TEAL's sparse GEMV).

Online activation sparsity (passes/prune/activations.py) puts ``flashc.sparsify(x, t)``
before a linear layer: the inputs whose magnitude is at most ``t`` become zero. A decode
step's time is the time to read the weights, so the product gains only if it does not read
the weights those zeros multiply. ``flashc.sparse_gemv(x, t, w_t, bias)`` takes the weight
stored transposed, ``w_t[K, N]`` (Liu et al., "Training-Free Activation Sparsity in Large
Language Models", arXiv:2408.14690, sec. 4.3): the N weights of one input feature are one
contiguous row, so a zeroed feature is a whole row this kernel does not load. Semantics
(``reference_sparse_gemv``, the numeric truth; ``flashc.sparse_gemv``'s reference)::

    y = linear(where(|x| > t, x, 0), w_t.T, bias)        t: 0-d, or one per input feature [K]

computed in fp32 from ``x`` and ``w_t`` of one dtype (bf16, fp16, fp32), the result in that
dtype. With finite weights the kernel differs from it only in the order of the fp32 sums
(a skipped row adds nothing; the reference adds 0 * w, which is 0 unless w is inf or nan).

The kernel, for ``M`` rows (at most ``MAX_ROWS``; leading dimensions are flattened):

* programs split K (``SPLIT_K`` ranges) as well as N (``BLOCK_N`` columns): at batch 1 the N
  blocks alone are too few programs to keep the memory system busy on 2048-wide outputs;
* a program loads its ``[BLOCK_M, BLOCK_K]`` chunk of x, computes the keep mask
  ``|x| > t`` (in fp32, exactly as torch compares: see ``_kernel_threshold``), and loads
  the ``[BLOCK_K, BLOCK_N]`` tile of ``w_t`` predicated on "some row keeps this feature":
  a predicated-off lane issues no memory request, so the bytes read scale with the
  fraction of features kept (by any of the M rows);
* or, ``COMPACT``, it first lists the features of its K range that some row keeps (a prefix
  sum over the keep mask, written to its own slot of an int32 scratch) and loops over that
  list: the loop's iterations scale with the features kept. On the H100 the predicated loop
  took as long at 80% sparsity as at 0% on llama-3-8b's down projection (its time is a chain
  of load latencies, one an iteration, not the bytes read);
* the rows' products are fp32: elementwise FMAs into ``[BLOCK_M, BLOCK_K, BLOCK_N]``,
  reduced over K once after the loop (up to ``ELEMENTWISE_ROWS`` rows), or ``tl.dot`` with
  the rows padded to 16 (``DOT`` configs, IEEE fp32 for fp32 inputs);
* the K ranges are combined by a second, tiny kernel: each split writes its fp32 partial
  sums ``[SPLIT_K, M, N]``, and ``triton_gemv.sum_splits_kernel`` adds them in split order, adds the
  bias once and casts. Not fp32 atomics into a zeroed buffer (TEAL's choice): those need a
  memset and the cast as launches too, and their order of additions changes from run to
  run; the partials (``SPLIT_K * M * N * 4`` bytes, 128 KiB for a 2048-wide output at
  batch 1 with 16 splits, against 8 MiB of bf16 weights) stay in L2, and the result is the
  same on every call. ``SPLIT_K == 1`` writes the output directly, bias and cast included.

Autotuning (``tune_sparse_gemv``) times the candidates of ``TUNING_SPACE`` and the library
path (sparsify in PyTorch, then cuBLAS on the dense product: ``{"library": True}``) from a
CUDA graph on the first call's real activations, so the kernel runs only where it measured
faster. The key is the shape, not the sparsity (a launch cannot know it without a sync):
the activations of the tuning call stand for the model's.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from . import tuning
from ._triton_common import (
    HAS_TRITON,
    check_devices,
    check_tensor,
    device_guard,
    launch_opts,
    next_pow2,
    pdl_enabled,
    require_triton,
    triton,
    tl,
)
from .triton_gemv import _ACTS, ELEMENTWISE_ROWS, L2_SPILL_BYTES, MAX_ROWS, k_ranges, sum_splits

__all__ = ["MAX_ROWS", "TUNING_SPACE", "candidates", "reference_sparse_gemv", "sparse_gemv", "tune_sparse_gemv"]

LIBRARY = {"library": True}  # tuning candidate: sparsify in PyTorch, then cuBLAS on the dense product
DOT_ROWS = 16  # DOT configs pad the rows to tl.dot's smallest M

# Candidates, in order of preference when nothing is tuned (the first that fits is the default).
# One row: BLOCK_N * 2 bytes (bf16) is the contiguous run one kept feature costs a program, and
# 256-512 columns (512 B - 1 KiB) keep those runs long enough for full 128-byte lines while
# N / BLOCK_N * SPLIT_K gives ~128-1024 programs on the 2048-16384-wide outputs of 1B-8B models
# (132 SMs on H100/H200). Several rows: tl.dot on [16, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles, and
# one elementwise config for 2-8 rows. Untimed on a GPU so far: bench/sparse_gemv_shapes.py
# times them; the tuner picks per shape, and the library path wins where none is faster.
_ONE_ROW = [
    {"BLOCK_N": 256, "BLOCK_K": 16, "SPLIT_K": 16, "num_warps": 4},
    {"BLOCK_N": 512, "BLOCK_K": 8, "SPLIT_K": 16, "num_warps": 4},
    {"BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 16, "num_warps": 4},
    {"BLOCK_N": 256, "BLOCK_K": 32, "SPLIT_K": 32, "num_warps": 8},
    {"BLOCK_N": 256, "BLOCK_K": 16, "SPLIT_K": 4, "num_warps": 4},
    {"BLOCK_N": 128, "BLOCK_K": 16, "SPLIT_K": 1, "num_warps": 4},
    # the H100 put the loop above at 38-42 us on llama-3-8b's down projection whether it read 20% or 60% of
    # the weight (sessions 18-19): a round's weight loads wait on its input loads, rounds one after another.
    # The next round's loads issued before this round's products (PREFETCH), and shorter chains over more
    # programs (SPLIT_K 64: 7 rounds of 32 features a program on 14336 inputs); untimed when added
    {"BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 16, "num_warps": 4, "PREFETCH": True},
    {"BLOCK_N": 256, "BLOCK_K": 16, "SPLIT_K": 16, "num_warps": 4, "PREFETCH": True},
    {"BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 32, "num_warps": 4, "PREFETCH": True},
    {"BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 64, "num_warps": 4},
    # the kept features listed first, the loop over them only (COMPACT): on the H100 (session 19) it won at 80%
    # sparsity only (8B gate|up 49.9 us against 54.6) and was 2-4x slower below; the other two tiles tried then
    # won nothing and are gone
    {"BLOCK_N": 256, "BLOCK_K": 16, "SPLIT_K": 16, "num_warps": 4, "COMPACT": True},
    LIBRARY,
]
_ROWS = [
    {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 8, "num_warps": 4, "DOT": True},
    {"BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 8, "num_warps": 4, "DOT": True},
    {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 16, "num_warps": 4, "DOT": True},
    {"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 8, "num_warps": 4, "DOT": True, "PREFETCH": True},
    {"BLOCK_N": 128, "BLOCK_K": 8, "SPLIT_K": 16, "num_warps": 4},
    LIBRARY,
]
# per tuning profile (codegen.tuning's names); a profile not listed uses "default"
TUNING_SPACE: dict[str, dict[str, list[dict]]] = {
    "default": {"sparse_gemv": _ONE_ROW, "sparse_gemv_rows": _ROWS},
}


def candidates(kernel_name: str, profile_name: str = "default") -> list[dict]:
    """Candidate configs of ``kernel_name`` ("sparse_gemv": one row, "sparse_gemv_rows") for a profile (copies)."""
    space = TUNING_SPACE.get(profile_name, TUNING_SPACE["default"])
    return [dict(c) for c in space[kernel_name]]


def reference_sparse_gemv(x, threshold, weight_t, bias=None, norm_weight=None, eps=1e-6, residual=None, glu=None):
    """flashc.sparse_gemv's semantics in PyTorch, in the inputs' dtype (float64: a float64 truth):
    linear(sparsify(rms_norm(x) if norm_weight else x, threshold), weight_t.T, bias), then the
    gated activation of its halves or the residual."""
    from flashc import sparse_ops  # the op's own reference (flashc registers it)

    return sparse_ops.sparse_gemv(x, threshold, weight_t, bias, norm_weight, eps, residual, glu)


if HAS_TRITON:
    from .triton_gemv import gated, sum_splits_kernel  # the GEMV epilogues' gated activation, split sum

    @triton.jit
    def _normed(x, g, rstd):
        """x RMSNormed as flashc.rms_norm rounds it: (x * rstd) in x's dtype, times g, in x's dtype."""
        return ((x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32) * g.to(tl.float32)).to(x.dtype)

    @triton.jit
    def _kept_inputs(X, T, G, kk, k_ok, offs_m, m_ok, stride_xm, t, rstd,
                     PER_FEATURE: tl.constexpr, HAS_NORM: tl.constexpr):
        """(x[:, kk] as the op sees it, RMSNormed under HAS_NORM, with |x| <= t zeroed; the keep mask). Lanes
        off k_ok are never kept (x there is 0, but a negative threshold keeps zeros). PER_FEATURE: t is
        loaded here, T[kk]; else it is the 0-d threshold the caller loaded."""
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_NORM:
            x = _normed(x, tl.load(G + kk, mask=k_ok, other=0.0)[None, :], rstd)
        if PER_FEATURE:
            t = tl.load(T + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        keep = (tl.abs(x.to(tl.float32)) > t) & m_ok[:, None] & k_ok[None, :]
        return tl.where(keep, x, tl.zeros_like(x)), keep

    @triton.jit
    def _chunk(X, T, G, W, kk, k_ok, offs_m, offs_n, m_ok, n_ok, stride_xm, stride_wk, t, rstd,
               PER_FEATURE: tl.constexpr, HAS_NORM: tl.constexpr, EVEN_N: tl.constexpr):
        """(the kept inputs of features kk, as _kept_inputs gives them; the weight rows kk [BLOCK_K, BLOCK_N],
        read where some row keeps the feature: predicated-off lanes issue no load)."""
        x, keep = _kept_inputs(X, T, G, kk, k_ok, offs_m, m_ok, stride_xm, t, rstd, PER_FEATURE, HAS_NORM)
        row_used = tl.max(keep.to(tl.int32), axis=0) > 0
        w_ptrs = W + kk.to(tl.int64)[:, None] * stride_wk + offs_n[None, :]
        if EVEN_N:  # a mask constant along N: the loads of a row stay vectorized
            w = tl.load(w_ptrs, mask=row_used[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=row_used[:, None] & n_ok[None, :], other=0.0)
        return x, w

    @triton.jit
    def _accumulate(acc, acc3, x, w, DOT: tl.constexpr, IEEE: tl.constexpr):
        """(acc, acc3) plus the products of the chunk: tl.dot into acc (DOT), else elementwise into acc3."""
        if DOT:
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        else:
            acc3 += x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
        return acc, acc3

    @triton.jit
    def _sparse_gemv_kernel(
        X, T, W, BIAS, P, Y, S, G, R,
        M, N, K, k_per_split,
        stride_xm, stride_wk, stride_rm,
        eps,
        PER_FEATURE: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_RES: tl.constexpr,
        NORM_BLOCK: tl.constexpr,
        COMPACT: tl.constexpr,
        PREFETCH: tl.constexpr,
        RANGE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ONE_SPLIT: tl.constexpr,
        DOT: tl.constexpr,
        IEEE: tl.constexpr,
        EVEN_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program (n, s): the products of columns n*BLOCK_N.. with the features of K range s, for all rows.

        HAS_NORM: x is RMSNormed first (weight G): every program computes its rows' rstd over
        all of K (a few KiB from L2), the threshold is compared with the normed value.
        ONE_SPLIT: adds the bias (and HAS_RES: the residual R) and stores Y [M, N] in Y's
        dtype; else stores the fp32 partial sums at P[s, :M, n*BLOCK_N..] for sum_splits_kernel.
        COMPACT: the program first lists the features of its K range (``RANGE``, a power of two
        at least k_per_split) that some row keeps, in order, in its own slot of the scratch S
        (int32 [programs, RANGE]), then loops over that list only: its loop has as many
        iterations as BLOCK_K-chunks of kept features, not of all features.
        PREFETCH (not COMPACT): each round issues the next chunk's input and weight loads before it multiplies
        the chunk loaded the round before, so a round waits on one chain of loads, not on the input load and
        then the weight load it gates (the predicated loop's time at high sparsity, session 19).
        """
        if PDL:  # launched before the previous kernel finished: wait for its results
            tl.extra.cuda.gdc_wait()
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        k_start = pid_k * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        if PER_FEATURE:
            t = 0.0  # _kept_inputs loads each feature's
        else:
            t = tl.load(T).to(tl.float32)
        rstd = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
        if HAS_NORM:  # the rows' rstd, as flashc.rms_norm: rsqrt(mean(x^2) + eps) in fp32
            sq = tl.zeros([BLOCK_M, NORM_BLOCK], dtype=tl.float32)
            for n0 in range(0, K, NORM_BLOCK):
                kn = n0 + tl.arange(0, NORM_BLOCK)
                xn = tl.load(X + offs_m[:, None] * stride_xm + kn[None, :], mask=m_ok[:, None] & (kn < K)[None, :],
                             other=0.0).to(tl.float32)
                sq += xn * xn
            rstd = tl.math.rsqrt(tl.sum(sq, axis=1) / K + eps)[:, None]
        # DOT: acc [BLOCK_M, BLOCK_N]; else elementwise products for every row in acc3, reduced over K after
        # the loop (the other one is a placeholder)
        acc = tl.zeros([BLOCK_M, BLOCK_N] if DOT else [1, 1], dtype=tl.float32)
        acc3 = tl.zeros([1, 1, 1] if DOT else [BLOCK_M, BLOCK_K, BLOCK_N], dtype=tl.float32)
        if COMPACT:
            # the kept features of this K range, listed in order: the loop below reads only them
            kr = k_start + tl.arange(0, RANGE)
            r_ok = kr < k_end
            xr, kept = _kept_inputs(X, T, G, kr, r_ok, offs_m, m_ok, stride_xm, t, rstd, PER_FEATURE, HAS_NORM)
            used = tl.max(kept.to(tl.int32), axis=0)
            count = tl.sum(used, axis=0)
            slot = S + (pid_k * tl.num_programs(0) + pid_n).to(tl.int64) * RANGE
            tl.store(slot + tl.cumsum(used, axis=0) - 1, kr, mask=used > 0)
            tl.debug_barrier()  # the list is written by all of the program's threads, read by all
            for i in range(0, count, BLOCK_K):
                j = i + offs_k
                j_ok = j < count
                kk = tl.load(slot + j, mask=j_ok, other=0, cache_modifier=".cg")  # L2: written by this program
                # listed features are kept by some row: each row's own threshold test still applies
                x, keep = _kept_inputs(X, T, G, kk, j_ok, offs_m, m_ok, stride_xm, t, rstd, PER_FEATURE, HAS_NORM)
                w_ptrs = W + kk.to(tl.int64)[:, None] * stride_wk + offs_n[None, :]
                if EVEN_N:
                    w = tl.load(w_ptrs, mask=j_ok[:, None], other=0.0)
                else:
                    w = tl.load(w_ptrs, mask=j_ok[:, None] & n_ok[None, :], other=0.0)
                acc3 += x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
        elif PREFETCH:  # the same, the next chunk's loads issued before this chunk's products
            kk = k_start + offs_k
            x, w = _chunk(X, T, G, W, kk, kk < k_end, offs_m, offs_n, m_ok, n_ok, stride_xm, stride_wk, t, rstd,
                          PER_FEATURE, HAS_NORM, EVEN_N)
            for k0 in range(k_start + BLOCK_K, k_end + BLOCK_K, BLOCK_K):  # the last round loads nothing
                kk = k0 + offs_k
                x_next, w_next = _chunk(X, T, G, W, kk, kk < k_end, offs_m, offs_n, m_ok, n_ok, stride_xm,
                                        stride_wk, t, rstd, PER_FEATURE, HAS_NORM, EVEN_N)
                acc, acc3 = _accumulate(acc, acc3, x, w, DOT, IEEE)
                x = x_next
                w = w_next
        else:  # every BLOCK_K-chunk of the range, loads predicated on the features kept
            for k0 in range(k_start, k_end, BLOCK_K):
                kk = k0 + offs_k
                x, w = _chunk(X, T, G, W, kk, kk < k_end, offs_m, offs_n, m_ok, n_ok, stride_xm, stride_wk, t, rstd,
                              PER_FEATURE, HAS_NORM, EVEN_N)
                acc, acc3 = _accumulate(acc, acc3, x, w, DOT, IEEE)

        if PDL:  # the weights are streamed: the next kernel may start its launch now
            tl.extra.cuda.gdc_launch_dependents()
        if not DOT:
            acc = tl.sum(acc3, axis=1)
        mask = m_ok[:, None] & n_ok[None, :]
        if ONE_SPLIT:
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_RES:
                acc += tl.load(R + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + offs_m[:, None] * N + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=mask)
        else:
            part = P + pid_k.to(tl.int64) * M * N
            tl.store(part + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)

    for _name in ("sparse_gemv", "sparse_gemv_rows"):
        tuning.register_kernel_source(_name, _sparse_gemv_kernel, _kept_inputs, _normed, _chunk, _accumulate,
                                      sum_splits_kernel, gated)

NO_FOLDS = (None, 1e-6, None, None)  # (norm_weight, eps, residual, glu): nothing folded in


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _check(x, threshold, weight_t, bias, norm_weight=None, residual=None, glu=None) -> int:
    """Validate the arguments; returns M, the number of rows."""
    fn = "sparse_gemv"
    require_triton(fn)
    check_tensor(fn, "x", x, min_ndim=1)
    check_tensor(fn, "weight_t", weight_t, ndim=2)
    K = x.shape[-1]
    if weight_t.shape[0] != K:
        raise ValueError(f"{fn}: weight_t must be [{K}, N] (the weight transposed) to match x's last dim, "
                         f"got {tuple(weight_t.shape)}")
    if x.dtype != weight_t.dtype:
        raise TypeError(f"{fn}: x ({x.dtype}) and weight_t ({weight_t.dtype}) must share a dtype")
    if not isinstance(threshold, torch.Tensor) or not threshold.dtype.is_floating_point:
        raise TypeError(f"{fn}: threshold must be a floating-point tensor, got "
                        f"{threshold.dtype if isinstance(threshold, torch.Tensor) else type(threshold).__name__}")
    if not (threshold.dim() == 0 or tuple(threshold.shape) in ((K,), (1,))):
        raise ValueError(f"{fn}: threshold must be 0-d or one per input feature [{K}], got {tuple(threshold.shape)}")
    M = x.numel() // K if K else math.prod(x.shape[:-1])
    if M > MAX_ROWS:
        raise ValueError(f"{fn}: x has {M} rows; the kernel is for at most {MAX_ROWS} (use sparsify and a GEMM)")
    tensors = [("x", x), ("threshold", threshold), ("weight_t", weight_t)]
    if bias is not None:
        check_tensor(fn, "bias", bias, ndim=1)
        if bias.shape[0] != weight_t.shape[1] or bias.dtype != x.dtype:
            raise ValueError(f"{fn}: bias must be [{weight_t.shape[1]}] of x's dtype {x.dtype}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")
        tensors.append(("bias", bias))
    if glu not in _ACTS:
        raise ValueError(f"{fn}: glu must be one of {sorted(a for a in _ACTS if a)} or None, got {glu!r}")
    N = weight_t.shape[1] // 2 if glu is not None else weight_t.shape[1]
    if glu is not None and weight_t.shape[1] % 2:
        raise ValueError(f"{fn}: a gated activation needs weight_t's columns to be gate|up halves, got "
                         f"{weight_t.shape[1]}")
    if glu is not None and residual is not None:
        raise ValueError(f"{fn}: a gated activation or a residual, not both (as flashc.gemv)")
    if norm_weight is not None:
        check_tensor(fn, "norm_weight", norm_weight, ndim=1)
        if norm_weight.shape[0] != K or norm_weight.dtype != x.dtype:
            raise ValueError(f"{fn}: norm_weight must be [{K}] of x's dtype {x.dtype}, got "
                             f"{tuple(norm_weight.shape)} {norm_weight.dtype}")
        tensors.append(("norm_weight", norm_weight))
    if residual is not None:
        check_tensor(fn, "residual", residual, min_ndim=1)
        if tuple(residual.shape) != (*x.shape[:-1], N) or residual.dtype != x.dtype:
            raise ValueError(f"{fn}: residual must be {[*x.shape[:-1], N]} of x's dtype {x.dtype}, got "
                             f"{list(residual.shape)} {residual.dtype}")
        tensors.append(("residual", residual))
    check_devices(fn, _sparse_gemv_kernel, tensors)
    return M


def _kernel_threshold(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The threshold the kernel compares |x| with in fp32, giving exactly torch's ``x.abs() > threshold``.

    torch compares in ``result_type(x, threshold)``: a 0-d float32 threshold with bf16 x is
    first rounded to bf16. Thresholds already of that dtype (what the pruning pass writes) go
    in as they are, converted in the kernel (bf16/fp16 -> fp32 is exact). A float64 one is
    rounded towards -inf to fp32: for an fp32-representable |x|, |x| > t exactly when
    |x| > that rounding. Other cases cost one small conversion on the device.
    """
    compare = torch.result_type(x, threshold)
    t = threshold if threshold.dtype == compare else threshold.to(compare)
    if compare == torch.float64:
        t32 = t.to(torch.float32)
        t = torch.where(t32.double() > t, torch.nextafter(t32, torch.full_like(t32, -float("inf"))), t32)
    return t.reshape(-1) if t.dim() else t.reshape(1)


def _tuning_entry(M, x, threshold, weight_t, bias, folds=NO_FOLDS) -> tuple[str, dict]:
    """(tuning kernel name, shape key): one row and several rows have separate candidate lists."""
    norm_weight, _, residual, glu = folds
    return ("sparse_gemv" if M == 1 else "sparse_gemv_rows",
            {"M": M, "N": weight_t.shape[1], "K": weight_t.shape[0], "dtype": str(x.dtype).replace("torch.", ""),
             "bias": bias is not None, "per_feature": threshold.numel() > 1,
             **({"norm": True} if norm_weight is not None else {}),
             **({"residual": True} if residual is not None else {}), **({"glu": glu} if glu else {})})


def _fits(M: int):
    return lambda cfg: bool(cfg.get("library") or cfg.get("DOT") or M <= ELEMENTWISE_ROWS)


def _config(M, x, threshold, weight_t, bias, folds=NO_FOLDS) -> dict:
    """The tuned config if the cache has one, else the first candidate that fits (never times anything)."""
    name, key = _tuning_entry(M, x, threshold, weight_t, bias, folds)
    profile = tuning.detect_profile(x.device)
    hit = tuning.cached_config(name, key, profile)
    if hit is not None and _fits(M)(hit):
        return hit
    return next(c for c in candidates(name, profile) if _fits(M)(c))


def _launch(x, threshold, weight_t, bias, M, config, folds=NO_FOLDS):
    """folds: (norm_weight, eps, residual, glu), as flashc.sparse_gemv takes them."""
    norm_weight, eps, residual, glu = folds
    K, N = weight_t.shape
    n_out = N // 2 if glu is not None else N
    if config is None:
        config = _config(M, x, threshold, weight_t, bias, folds)
    if config.get("library"):  # sparsify in PyTorch, then the dense product on cuBLAS (weight_t.T: a view)
        return reference_sparse_gemv(x, threshold, weight_t, bias, norm_weight, eps, residual, glu)
    y = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if K == 0:  # an empty sum: what the reference computes from a zero product
        return y.copy_(reference_sparse_gemv(x, threshold, weight_t, bias, norm_weight, eps, residual, glu))
    x2 = (x if x.stride(-1) == 1 else x.contiguous()).reshape(-1, K)
    w2 = weight_t if weight_t.stride(-1) == 1 else weight_t.contiguous()
    r2 = None if residual is None else (residual if residual.is_contiguous() else residual.contiguous()).view(-1, n_out)
    t = _kernel_threshold(x, threshold)
    t = t if t.is_contiguous() else t.contiguous()
    block_n, block_k = int(config["BLOCK_N"]), int(config["BLOCK_K"])
    dot = bool(config.get("DOT"))
    if dot:
        block_n, block_k = max(16, block_n), max(16, block_k)
    elif M > ELEMENTWISE_ROWS:
        raise ValueError(f"sparse_gemv: config {config} multiplies elementwise, for at most {ELEMENTWISE_ROWS} "
                         f"rows; x has {M} (use a DOT config)")
    compact = bool(config.get("COMPACT"))
    if compact and dot:
        raise ValueError(f"sparse_gemv: config {config}: COMPACT lists kept features for the elementwise loop, not DOT")
    per_split, splits = k_ranges(K, block_k, config)
    # a gated activation pairs columns j and N/2 + j, which one program does not both hold: partials and the
    # summing kernel's epilogue, even for one split
    one_split = splits == 1 and glu is None
    partials = y if one_split else torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    out = y.view(M, n_out)
    grid = (triton.cdiv(N, block_n), splits)
    span = next_pow2(per_split) if compact else 1
    scratch = torch.empty((grid[0] * splits * span if compact else 1,), dtype=torch.int32, device=x.device)
    pdl = pdl_enabled(x.device)
    pdl_launch = {"launch_pdl": True} if pdl else {}
    with device_guard(x.device):
        _sparse_gemv_kernel[grid](
            x2, t, w2, bias if bias is not None else w2, partials, out, scratch,
            norm_weight if norm_weight is not None else w2, r2 if r2 is not None else w2,
            M, N, K, per_split,
            x2.stride(0), w2.stride(0), r2.stride(0) if r2 is not None else 0,
            float(eps),
            PER_FEATURE=t.numel() > 1,
            HAS_NORM=norm_weight is not None,
            HAS_RES=r2 is not None and one_split,
            NORM_BLOCK=min(512, next_pow2(K)),
            COMPACT=compact,
            PREFETCH=bool(config.get("PREFETCH")) and not compact,
            RANGE=span,
            HAS_BIAS=bias is not None,
            ONE_SPLIT=one_split,
            DOT=dot,
            IEEE=x.dtype == torch.float32,
            EVEN_N=N % block_n == 0,
            BLOCK_M=DOT_ROWS if dot else next_pow2(M),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            PDL=pdl,
            **pdl_launch,
            **launch_opts(config),
        )
        if not one_split:  # the norm was applied to the inputs: the sum has none to apply
            sum_splits(partials, partials, bias, r2, out, K, eps, glu, False, pdl)
    return y


def sparse_gemv(
    x: torch.Tensor,
    threshold: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    glu: str | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """``flashc.sparse_gemv``: ``linear(sparsify(x, threshold), weight_t.T, bias)`` for at most
    ``MAX_ROWS`` rows of ``x[..., K]``, x RMSNormed first when ``norm_weight`` is given, then
    ``glu`` ('silu' or 'gelu_tanh') of the output's halves or ``residual`` added.

    ``weight_t`` is the weight transposed, ``[K, N]``; ``threshold`` 0-d or ``[K]``. Returns
    a new tensor ``[..., N]`` (``[..., N / 2]`` with glu) of x's dtype. ``config`` overrides the
    tuned one (``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``, ``DOT``, ``COMPACT`` or ``PREFETCH``, ``num_warps``, or
    ``{"library": True}``).
    """
    M = _check(x, threshold, weight_t, bias, norm_weight, residual, glu)
    return _launch(x, threshold, weight_t, bias, M, config, (norm_weight, eps, residual, glu))


def tune_sparse_gemv(x, threshold, weight_t, bias=None, norm_weight=None, eps=1e-6, residual=None, glu=None) -> dict:
    """Time the kernel's candidate configs and the library path on these inputs; cache the winner.

    Candidates run as a decode step runs them: back to back from a CUDA graph, each call on
    the next of enough copies of ``weight_t`` that the weights come from memory, not L2. The
    activations given are the ones timed: their sparsity decides the winner.
    """
    M = _check(x, threshold, weight_t, bias, norm_weight, residual, glu)
    folds = (norm_weight, eps, residual, glu)
    name, key = _tuning_entry(M, x, threshold, weight_t, bias, folds)
    profile = tuning.detect_profile(x.device)
    hit = tuning.cached_config(name, key, profile)
    if hit is not None:  # no weight copies for a cache hit
        return hit
    cands = [c for c in candidates(name, profile) if _fits(M)(c)]
    copies = max(1, min(8, -(-L2_SPILL_BYTES // max(1, weight_t.numel() * weight_t.element_size()))))
    weights = itertools.cycle([weight_t] + [weight_t.clone() for _ in range(copies - 1)] if x.is_cuda else [weight_t])

    def run(cfg):
        return _launch(x, threshold, next(weights), bias, M, cfg, folds)

    return tuning.autotune(name, key, cands, run, profile, bench_fn=tuning.graph_bench_for(x))

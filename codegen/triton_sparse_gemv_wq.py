"""Decode GEMVs on int4 (2-, 4- or 8-bit) packed weights that skip the weights of zeroed activations.

Online activation sparsity composed with weight-only quantization (flashc issue #15): a decode step's
``linear_wq(sparsify(x, t), ...)`` otherwise runs the sparsify and then a dense int4 GEMV that reads every
weight, because linear_wq packs codes along K (codegen/triton_gemv_wq.py): a 32-byte sector holds 64 int4
codes of one output row, so one zeroed input feature frees no sector. ``flashc.sparse_gemv_wq`` reads
the weight K-major instead (``flashc.sparse_ops.to_kmajor``, converted once at compile time): for each
input feature k its N codes packed along N in int32 words, ``qweight_t[K, N * bits / 32]``, with the
scales ``scales_t[K / G, N]`` and packed zero points ``zero_points_t[K / G, N * bits / 32]`` per (group
of G features, output). A zeroed feature is one contiguous row of N * bits / 8 bytes this kernel does not
load (N / 2 bytes at int4: 2 KiB for llama-3-8b's 4096-wide outputs). Semantics
(``reference_sparse_gemv_wq``: the op's reference, the numeric truth)::

    h = rms_norm(x, norm_weight, eps) if norm_weight is not None else x    # the threshold sees this
    h = where(|h| > t, h, 0) * input_scale                                  # input_scale: AWQ's, or none
    y = h @ dequantize(...) ^ T + bias
    y = act(y[..., :F]) * y[..., F:]  if glu,  or  y + residual  if residual

summed in fp32 (the op rounds the dequantized weight to x's dtype and multiplies in that dtype; the
kernel differs from it in rounding and the order of its sums; a float64 reference bounds both).

The kernel, for ``M`` rows (at most ``MAX_ROWS``; leading dimensions are flattened):

* programs split N (``BLOCK_N`` columns: ``BLOCK_N * bits / 32`` words a feature row) and K
  (``SPLIT_K`` ranges of whole chunks); a chunk is ``BLOCK_K`` features of one group (BLOCK_K
  divides G), so a chunk has one scale and zero point a column;
* elementwise (up to ``ELEMENTWISE_ROWS`` rows; the tuner times it up to ``TUNED_ELEMENTWISE_ROWS``):
  a chunk is walked feature by feature. The feature's inputs are scalars (every thread loads the same
  bytes, from L1), RMSNormed and compared with the threshold, and its weight row is a ``[words]`` load
  predicated on "some row keeps the feature", the same for every lane: a warp issues no request for a
  zeroed feature. Code c of a word is masked in place and read as the subnormal ``q * 2**(e_c - 149)``
  (triton_gemv_wq's trick: one LOP, no convert), times the input scaled by ``2**(X_EXP - e_c)``; the
  group's scale and zero point apply once a chunk in the group-sum form::

      y[m, n] += s[g, n] * (2**(149 - X_EXP) * sum_k q[k, n] x[m, k] 2**(X_EXP - 149) - zp[g, n] * sum_k x[m, k])

  so a weight costs one LOP and one FMA a row. A thread's words are whole output columns (code c of
  word w is column ``w * 32 / bits + c``): the sum over K stays in the thread, with no reduction across
  threads (a ``[BLOCK_K, words]`` tile would need one a chunk, across warps). The per-feature scalar work
  (loads, norm, threshold, the input's scalings) is shared by the words a thread holds: ``BLOCK_N * bits /
  32 / (32 * num_warps)`` of them, 2 or 4 at int4 in every candidate;
* ``DOT`` (several rows): the chunk's ``[BLOCK_K, words]`` tile, loaded where some row keeps the
  feature, dequantized per code position to x's dtype (codes ORed into float32's 2**23, as triton_gemv_wq's
  DOT path; exactly the op's fp32 ``(q - zp) * s``, rounded once) and multiplied by the rows' kept inputs,
  padded to 16 rows, with ``tl.dot`` (one dot a code position, IEEE fp32 for fp32 inputs);
* ``PREFETCH``: the next chunk's loads (inputs, weight rows, scales) are issued before this chunk's
  products, so a round waits on one chain of loads (codegen/triton_sparse_gemv.py says why);
* ``SKIP`` (elementwise): after the chunk's loads, a feature no row keeps is branched over, every lane
  alike, so the products too, not only the bytes, scale with the features kept;
* the K ranges' fp32 partials ``[SPLIT_K, M, N]`` are summed by ``triton_gemv.sum_splits`` (bias,
  gated activation, residual there); one range with no gated activation stores y directly.

Without SKIP a dropped feature saves its bytes, not its instructions: the predicated-off row is multiplied
as zeros. An H200 has about four instructions a weight to spend at int4 (codegen/triton_gemv_wq.py), and
the elementwise loop takes about 3.5 (offline sm_90 compiles): reading half the bytes can then save less
than half the time, which is what SKIP is for (at the cost of a branch a feature); the tuner decides.

Autotuning (``tune_sparse_gemv_wq``) times ``TUNING_SPACE``'s candidates and the library path (the op's
PyTorch reference: the weight dequantized every call, then cuBLAS; ``{"library": True}``), from a CUDA
graph on the first call's activations, as codegen/triton_sparse_gemv.py does. The library path is slow by
construction (it reads and writes the whole weight in x's dtype): it is the fallback where no kernel
config compiles, never expected to win. bench/sparse_gemv_shapes.py times the candidates against the
dense ``gemv_wq``: on an H100 (session 20, bench/RESULTS.md) the tuned tiles ran 0.37-0.83x its speed on
llama-3-8b's shapes at 40% sparsity, 1.4-2.8x slower reading every row.
"""

from __future__ import annotations

import functools
import itertools

import torch

from flashc.errors import InputError
from flashc.sparse_ops import KMAJOR_BITS

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
from .triton_gemv_wq import X_EXP
from .triton_sparse_gemv import _fits, _kernel_threshold  # the elementwise path's row limit, as there

__all__ = ["MAX_ROWS", "TUNING_SPACE", "candidates", "reference_sparse_gemv_wq", "sparse_gemv_wq",
           "tune_sparse_gemv_wq"]

LIBRARY = {"library": True}  # tuning candidate: the op's reference (dequantize, then cuBLAS)
DOT_ROWS = 16  # DOT configs pad the rows to tl.dot's smallest M
TUNED_ELEMENTWISE_ROWS = 2  # one FMA a row per weight: past 2 rows the DOT tiles (as triton_gemv_wq's tuner)

# Candidates, in order of preference when nothing is tuned (the first that fits is the default). BLOCK_N
# is in output columns (1024 at int4: 128 words, 512 B a feature row); the elementwise tiles hold 2-4 words
# a thread, so the per-feature scalar work is shared by 16-32 int4 weights (offline sm_90 compiles of the
# one-row loop: ~3.5 SASS instructions a weight at 4 words a thread, ~4.2 at 2), and N / BLOCK_N * SPLIT_K
# gives 128-512 programs on llama-3-8b's 4096-28672-wide outputs (132 SMs on H100/H200). SPLIT_K is higher
# than the bf16 sparse GEMV's: a feature row is a quarter of its bytes, so a program needs more features to
# keep as many bytes in flight. SKIP branches over the products of dropped features (see _multiply_rows).
# Several rows: tl.dot on [16, BLOCK_K] x [BLOCK_K, words] tiles a code position. Untimed on a GPU when
# added: bench/sparse_gemv_shapes.py times them against the dense int4 GEMV; the tuner picks per shape.
_ONE_ROW = [
    {"BLOCK_N": 1024, "BLOCK_K": 16, "SPLIT_K": 32, "num_warps": 2, "PREFETCH": True},
    {"BLOCK_N": 1024, "BLOCK_K": 16, "SPLIT_K": 32, "num_warps": 2, "PREFETCH": True, "SKIP": True},
    {"BLOCK_N": 1024, "BLOCK_K": 32, "SPLIT_K": 16, "num_warps": 1, "PREFETCH": True},
    {"BLOCK_N": 1024, "BLOCK_K": 32, "SPLIT_K": 16, "num_warps": 1, "PREFETCH": True, "SKIP": True},
    {"BLOCK_N": 2048, "BLOCK_K": 16, "SPLIT_K": 64, "num_warps": 2, "PREFETCH": True},
    {"BLOCK_N": 1024, "BLOCK_K": 16, "SPLIT_K": 32, "num_warps": 2},
    {"BLOCK_N": 2048, "BLOCK_K": 32, "SPLIT_K": 16, "num_warps": 4},
    LIBRARY,
]
_ROWS = [
    {"BLOCK_N": 256, "BLOCK_K": 32, "SPLIT_K": 8, "num_warps": 4, "DOT": True},
    {"BLOCK_N": 128, "BLOCK_K": 32, "SPLIT_K": 16, "num_warps": 4, "DOT": True},
    {"BLOCK_N": 256, "BLOCK_K": 64, "SPLIT_K": 8, "num_warps": 4, "DOT": True, "PREFETCH": True},
    {"BLOCK_N": 1024, "BLOCK_K": 16, "SPLIT_K": 32, "num_warps": 2, "PREFETCH": True},  # 2 rows, elementwise
    LIBRARY,
]
# per tuning profile (codegen.tuning's names); a profile not listed uses "default"
TUNING_SPACE: dict[str, dict[str, list[dict]]] = {
    "default": {"sparse_gemv_wq": _ONE_ROW, "sparse_gemv_wq_rows": _ROWS},
}


def candidates(kernel_name: str, profile_name: str = "default") -> list[dict]:
    """Candidate configs of ``kernel_name`` ("sparse_gemv_wq": one row, "sparse_gemv_wq_rows") (copies)."""
    space = TUNING_SPACE.get(profile_name, TUNING_SPACE["default"])
    return [dict(c) for c in space[kernel_name]]


def reference_sparse_gemv_wq(x, threshold, qweight_t, scales_t, zero_points_t, bits, bias=None, input_scale=None,
                             norm_weight=None, eps=1e-6, residual=None, glu=None):
    """flashc.sparse_gemv_wq's semantics in PyTorch, in x's dtype (float64 inputs give a float64 truth)."""
    from flashc import sparse_ops  # the op's own reference (flashc registers it)

    return sparse_ops.sparse_gemv_wq(x, threshold, qweight_t, bias, norm_weight, eps, residual, glu, scales_t,
                                     zero_points_t, input_scale, bits)


if HAS_TRITON:
    from .triton_gemv import gated, sum_splits_kernel  # the split sum's epilogue
    from .triton_gemv_wq import _masked_code  # code c of a word, masked in place
    from .triton_sparse_gemv import _kept_inputs, _normed  # the inputs as the op sees them

    _X_EXP = tl.constexpr(X_EXP)

    @triton.jit
    def _group_columns(S, ZP, g, offs_w, w_ok, N, row_words, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
        """Scales and zero points (fp32) of group g for the columns of words offs_w: a tuple of 32 / BITS
        [words] tensors each, code position c's columns offs_w * 32 / BITS + c (strided loads whose lines
        the other positions' loads share)."""
        CPW: tl.constexpr = 32 // BITS
        scales = ()
        zps = ()
        if HAS_ZP:
            zw = tl.load(ZP + g * row_words + offs_w, mask=w_ok, other=0)
        for c in tl.static_range(CPW):
            scales = scales + (tl.load(S + g * N + offs_w * CPW + c, mask=w_ok, other=0.0).to(tl.float32),)
            if HAS_ZP:
                zps = zps + (((zw >> (c * BITS)) & ((1 << BITS) - 1)).to(tl.float32),)
            else:
                zps = zps + (tl.zeros_like(scales[c]) + (1 << (BITS - 1)),)
        return scales, zps

    @triton.jit
    def _row_rstd(X, K, eps, NORM_BLOCK: tl.constexpr):
        """rsqrt(mean(x^2) + eps) of the row at X, in fp32, as flashc.rms_norm."""
        sq = tl.zeros([NORM_BLOCK], dtype=tl.float32)
        for n0 in range(0, K, NORM_BLOCK):
            kn = n0 + tl.arange(0, NORM_BLOCK)
            xn = tl.load(X + kn, mask=kn < K, other=0.0).to(tl.float32)
            sq += xn * xn
        return tl.math.rsqrt(tl.sum(sq, axis=0) / K + eps)

    @triton.jit
    def _feature_rows(X, T, G, XS, QW, S, ZP, k0, live, offs_w, w_ok, N, row_words, stride_xm, t, rstds,
                      ROWS: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                      PER_FEATURE: tl.constexpr, HAS_NORM: tl.constexpr, HAS_XSCALE: tl.constexpr,
                      HAS_ZP: tl.constexpr, EVEN_N: tl.constexpr):
        """The loads of chunk k0 (BLOCK_K features of one group), feature by feature: (the rows' inputs as the
        op multiplies them, fp32 scalars, feature-major, a dropped one 0; the features' weight rows, [words]
        int32 each, read only where some row keeps the feature and ``live``; whether some row keeps each feature,
        scalars; the group's scales and zero points, _group_columns). The masks are tensors built from the
        scalar test: Triton's interpreter splats a scalar mask with a wrong dtype."""
        xs = ()
        rows = ()
        kept = ()
        for j in tl.static_range(BLOCK_K):
            k = k0 + j
            if PER_FEATURE:
                t = tl.load(T + k).to(tl.float32)
            if HAS_NORM:
                g = tl.load(G + k)
            if HAS_XSCALE:
                f = tl.load(XS + k).to(tl.float32)
            kept_by = 0
            for m in tl.static_range(ROWS):
                x = tl.load(X + m * stride_xm + k)
                if HAS_NORM:
                    x = _normed(x, g, rstds[m])
                keep = tl.abs(x.to(tl.float32)) > t
                x = tl.where(keep, x, tl.zeros_like(x))
                if HAS_XSCALE:  # in x's dtype, as the op multiplies
                    x = (x.to(tl.float32) * f).to(x.dtype)
                xs = xs + (x.to(tl.float32),)
                kept_by += keep.to(tl.int32)
            kept = kept + (kept_by > 0,)
            read = (offs_w * 0 + (kept_by > 0).to(tl.int32) * live) > 0
            if not EVEN_N:  # (EVEN_N: every program's words are in the row, one predicate a feature)
                read = read & w_ok
            rows = rows + (tl.load(QW + k.to(tl.int64) * row_words + offs_w, mask=read, other=0),)
        scales, zps = _group_columns(S, ZP, k0 // GROUP, offs_w, w_ok, N, row_words, BITS, HAS_ZP)
        return xs, rows, kept, scales, zps

    @triton.jit
    def _code_products(parts, row, xs, j: tl.constexpr, c: tl.constexpr, ROWS: tl.constexpr, BITS: tl.constexpr):
        """parts[c * ROWS + m] + q_c(row) * xs[j * ROWS + m] * 2**(X_EXP - 149) for each row m (a tuple of ROWS):
        one feature's products at code position c, as _code_sums forms them."""
        E: tl.constexpr = c * BITS - 16 * (c * BITS + BITS > 20)
        SHIFT: tl.constexpr = c * BITS - E
        MASK: tl.constexpr = ((1 << BITS) - 1) << E
        LIFT: tl.constexpr = 2.0 ** (_X_EXP - E)
        q = ((row >> SHIFT) & MASK).to(tl.float32, bitcast=True)
        grown = ()
        for m in tl.static_range(ROWS):
            grown = grown + (parts[c * ROWS + m] + q * (xs[j * ROWS + m] * LIFT),)
        return grown

    @triton.jit
    def _code_sums(rows, xs, c: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr):
        """Per row m, sum_j q_c(rows[j]) * xs[j * ROWS + m] * 2**(X_EXP - 149): a tuple of ROWS [words] fp32.
        Code c of a word is masked in place at bit e_c (in the word shifted down by 16 past bit 19:
        triton_gemv_wq._masked_code for one-word units, written out: a jit call a weight row is most of the
        interpreter's time) and read as the subnormal q * 2**(e_c - 149); the input, lifted by 2**(X_EXP -
        e_c), makes the product a normal float."""
        E: tl.constexpr = c * BITS - 16 * (c * BITS + BITS > 20)
        SHIFT: tl.constexpr = c * BITS - E
        MASK: tl.constexpr = ((1 << BITS) - 1) << E
        LIFT: tl.constexpr = 2.0 ** (_X_EXP - E)
        parts = ()
        for j in tl.static_range(BLOCK_K):
            q = ((rows[j] >> SHIFT) & MASK).to(tl.float32, bitcast=True)
            if j == 0:
                for m in tl.static_range(ROWS):
                    parts = parts + (q * (xs[m] * LIFT),)
            else:
                grown = ()
                for m in tl.static_range(ROWS):
                    grown = grown + (parts[m] + q * (xs[j * ROWS + m] * LIFT),)
                parts = grown
        return parts

    @triton.jit
    def _multiply_rows(accs, xs, rows, kept, scales, zps, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                       BITS: tl.constexpr, SKIP: tl.constexpr):
        """accs (code-position-major: index c * ROWS + m, [words] fp32 each) plus the chunk's products in the
        group-sum form: per code position and row, sum_k q x 2**(X_EXP - 149) over the chunk, then the
        group's scale and zero point once. SKIP: a feature no row keeps is branched over (every lane takes the
        same branch), so the products, not only the bytes, scale with the features kept; else its row, read as
        zeros, is multiplied like the others (no branch in the chain of FMAs)."""
        CPW: tl.constexpr = 32 // BITS
        sums = ()
        for m in tl.static_range(ROWS):
            total = xs[m]
            for j in tl.static_range(1, BLOCK_K):
                total += xs[j * ROWS + m]
            sums = sums + (total,)
        if SKIP:
            parts = (tl.zeros_like(rows[0]).to(tl.float32),) * (CPW * ROWS)
            for j in tl.static_range(BLOCK_K):
                if kept[j]:
                    for c in tl.static_range(CPW):
                        grown = _code_products(parts, rows[j], xs, j, c, ROWS, BITS)
                        parts = parts[:c * ROWS] + grown + parts[(c + 1) * ROWS:]
        else:
            parts = ()
            for c in tl.static_range(CPW):
                parts = parts + _code_sums(rows, xs, c, ROWS, BLOCK_K, BITS)
        new = ()
        for c in tl.static_range(CPW):
            a = scales[c] * 2.0 ** (149 - _X_EXP)
            b = scales[c] * zps[c]
            for m in tl.static_range(ROWS):
                new = new + (accs[c * ROWS + m] + parts[c * ROWS + m] * a - b * sums[m],)
        return new

    @triton.jit
    def _tile(X, T, G, XS, QW, S, ZP, k0, live, offs_k, offs_m, m_ok, offs_w, w_ok, N, row_words, stride_xm, t,
              rstd, GROUP: tl.constexpr, BITS: tl.constexpr, PER_FEATURE: tl.constexpr, HAS_NORM: tl.constexpr,
              HAS_XSCALE: tl.constexpr, HAS_ZP: tl.constexpr, EVEN_N: tl.constexpr):
        """The loads of DOT chunk k0 (BLOCK_K features of one group): (the rows' kept inputs [BLOCK_M, BLOCK_K]
        in x's dtype, times the input scale; the weight words [BLOCK_K, words], read where some row keeps the
        feature and ``live``; the group's scales and zero points)."""
        kk = k0 + offs_k
        k_ok = (offs_k * 0 + live) > 0
        x, keep = _kept_inputs(X, T, G, kk, k_ok, offs_m, m_ok, stride_xm, t, rstd, PER_FEATURE, HAS_NORM)
        if HAS_XSCALE:
            f = tl.load(XS + kk, mask=k_ok, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * f[None, :]).to(x.dtype)
        read = (tl.max(keep.to(tl.int32), axis=0) > 0)[:, None]  # some row keeps the feature
        if not EVEN_N:
            read = read & w_ok[None, :]
        words = tl.load(QW + kk.to(tl.int64)[:, None] * row_words + offs_w[None, :], mask=read, other=0)
        scales, zps = _group_columns(S, ZP, k0 // GROUP, offs_w, w_ok, N, row_words, BITS, HAS_ZP)
        return x, words, scales, zps

    @triton.jit
    def _dequantized(words, c: tl.constexpr, s, zp, BITS: tl.constexpr):
        """(q - zp) * s of code c of every word [BLOCK_K, words], float32: the masked code ORed into 2**23 and
        read as float32, minus 2**23 + zp * 2**e_c, times s * 2**-e_c (triton_gemv_wq._dequantized_code for
        one-word units: exact, the op's fp32 value)."""
        E: tl.constexpr = c * BITS - 16 * (c * BITS + BITS > 20)  # e_c, as _masked_code places it
        lifted = (_masked_code(words, words, words, c, BITS) | 0x4B000000).to(tl.float32, bitcast=True)
        return (lifted - (8388608.0 + zp * 2.0 ** E)[None, :]) * (s * 2.0 ** -E)[None, :]

    @triton.jit
    def _multiply_tile(accs, x, words, scales, zps, BITS: tl.constexpr, IEEE: tl.constexpr):
        """accs (one [BLOCK_M, words] fp32 a code position) plus x @ the chunk's dequantized codes (_dequantized)
        in x's dtype, one tl.dot a code position."""
        CPW: tl.constexpr = 32 // BITS
        new = ()
        for c in tl.static_range(CPW):
            w = _dequantized(words, c, scales[c], zps[c], BITS)
            if IEEE:
                new = new + (tl.dot(x, w, accs[c], input_precision="ieee"),)
            else:
                new = new + (tl.dot(x, w.to(x.dtype), accs[c]),)
        return new

    @triton.jit
    def _store_columns(acc, offs_m, m_ok, cols, col_ok, pid_k, M, N, BIAS, R, Y, P, stride_rm,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ONE_SPLIT: tl.constexpr):
        """acc [rows, words]: the products of columns ``cols`` (one code position). ONE_SPLIT: plus the bias
        and the residual, stored in Y's dtype; else stored as fp32 partials at P[pid_k]."""
        mask = m_ok[:, None] & col_ok[None, :]
        if ONE_SPLIT:
            if HAS_BIAS:
                acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_RES:
                acc += tl.load(R + offs_m[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + offs_m[:, None] * N + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)
        else:
            tl.store(P + pid_k.to(tl.int64) * M * N + offs_m[:, None] * N + cols[None, :], acc, mask=mask)

    @triton.jit
    def _sparse_gemv_wq_kernel(
        X, T, QW, S, ZP, BIAS, XS, G, R, Y, P,
        M, N, K, row_words, k_per_split,
        stride_xm, stride_rm,
        eps,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        HAS_ZP: tl.constexpr,
        PER_FEATURE: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_XSCALE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        ONE_SPLIT: tl.constexpr,
        DOT: tl.constexpr,
        IEEE: tl.constexpr,
        PREFETCH: tl.constexpr,
        SKIP: tl.constexpr,
        EVEN_N: tl.constexpr,
        NORM_BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
        WORDS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program (n, s): columns of words n*WORDS.. (32 / BITS columns a word) with the features of K range s.

        Elementwise (not DOT): ROWS is M, every row a Python-unrolled scalar stream; DOT: ROWS = 16, rows past
        M masked. HAS_NORM: every program computes its rows' rstd over all of K first (a few KiB from L2),
        and the threshold sees the normed value. ONE_SPLIT: adds the bias (and HAS_RES: the residual R) and
        stores Y [M, N]; else stores the fp32 partials P[s, :M, :] for triton_gemv.sum_splits_kernel.
        PREFETCH: each round issues the next chunk's loads, then multiplies the chunk loaded the round before;
        the last round's loads (of the range's last chunk again, in bounds) are predicated off.
        """
        if PDL:  # launched before the previous kernel finished: wait for its results
            tl.extra.cuda.gdc_wait()
        CPW: tl.constexpr = 32 // BITS
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_w = pid_n * WORDS + tl.arange(0, WORDS)
        w_ok = offs_w < row_words
        k_start = pid_k * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        if PER_FEATURE:
            t = 0.0  # loaded a feature at a time
        else:
            t = tl.load(T).to(tl.float32)
        if DOT:
            offs_m = tl.arange(0, ROWS)
            m_ok = offs_m < M
            offs_k = tl.arange(0, BLOCK_K)
            rstd = tl.zeros([ROWS, 1], dtype=tl.float32)
            if HAS_NORM:  # the rows' rstd, as flashc.rms_norm: rsqrt(mean(x^2) + eps) in fp32
                sq = tl.zeros([ROWS, NORM_BLOCK], dtype=tl.float32)
                for n0 in range(0, K, NORM_BLOCK):
                    kn = n0 + tl.arange(0, NORM_BLOCK)
                    xn = tl.load(X + offs_m[:, None] * stride_xm + kn[None, :], mask=m_ok[:, None] & (kn < K)[None, :],
                                 other=0.0).to(tl.float32)
                    sq += xn * xn
                rstd = tl.math.rsqrt(tl.sum(sq, axis=1) / K + eps)[:, None]
            accs = (tl.zeros([ROWS, WORDS], dtype=tl.float32),) * CPW
            if PREFETCH:
                x, words, scales, zps = _tile(X, T, G, XS, QW, S, ZP, k_start, 1, offs_k, offs_m, m_ok, offs_w, w_ok,
                                              N, row_words, stride_xm, t, rstd, GROUP, BITS, PER_FEATURE, HAS_NORM,
                                              HAS_XSCALE, HAS_ZP, EVEN_N)
                for k0 in range(k_start + BLOCK_K, k_end + BLOCK_K, BLOCK_K):
                    nxt = _tile(X, T, G, XS, QW, S, ZP, tl.minimum(k0, k_end - BLOCK_K), (k0 < k_end).to(tl.int32),
                                offs_k, offs_m, m_ok, offs_w, w_ok, N, row_words, stride_xm, t, rstd, GROUP, BITS,
                                PER_FEATURE, HAS_NORM, HAS_XSCALE, HAS_ZP, EVEN_N)
                    accs = _multiply_tile(accs, x, words, scales, zps, BITS, IEEE)
                    x, words, scales, zps = nxt
            else:
                for k0 in range(k_start, k_end, BLOCK_K):
                    x, words, scales, zps = _tile(X, T, G, XS, QW, S, ZP, k0, 1, offs_k, offs_m, m_ok, offs_w, w_ok,
                                                  N, row_words, stride_xm, t, rstd, GROUP, BITS, PER_FEATURE,
                                                  HAS_NORM, HAS_XSCALE, HAS_ZP, EVEN_N)
                    accs = _multiply_tile(accs, x, words, scales, zps, BITS, IEEE)
            if PDL:  # the weights are streamed: the next kernel may start its launch now
                tl.extra.cuda.gdc_launch_dependents()
            for c in tl.static_range(CPW):
                _store_columns(accs[c], offs_m, m_ok, offs_w * CPW + c, w_ok, pid_k, M, N, BIAS, R, Y, P, stride_rm,
                               HAS_BIAS, HAS_RES, ONE_SPLIT)
        else:
            rstds = ()
            for m in tl.static_range(ROWS):
                if HAS_NORM:
                    rstds = rstds + (_row_rstd(X + m * stride_xm, K, eps, NORM_BLOCK),)
                else:
                    rstds = rstds + (1.0,)
            accs = (tl.zeros([WORDS], dtype=tl.float32),) * (CPW * ROWS)
            if PREFETCH:
                xs, rows, kept, scales, zps = _feature_rows(X, T, G, XS, QW, S, ZP, k_start, 1, offs_w, w_ok, N,
                                                            row_words, stride_xm, t, rstds, ROWS, BLOCK_K, GROUP,
                                                            BITS, PER_FEATURE, HAS_NORM, HAS_XSCALE, HAS_ZP, EVEN_N)
                for k0 in range(k_start + BLOCK_K, k_end + BLOCK_K, BLOCK_K):
                    nxt = _feature_rows(X, T, G, XS, QW, S, ZP, tl.minimum(k0, k_end - BLOCK_K),
                                        (k0 < k_end).to(tl.int32), offs_w, w_ok, N, row_words, stride_xm, t, rstds,
                                        ROWS, BLOCK_K, GROUP, BITS, PER_FEATURE, HAS_NORM, HAS_XSCALE, HAS_ZP, EVEN_N)
                    accs = _multiply_rows(accs, xs, rows, kept, scales, zps, ROWS, BLOCK_K, BITS, SKIP)
                    xs, rows, kept, scales, zps = nxt
            else:
                for k0 in range(k_start, k_end, BLOCK_K):
                    xs, rows, kept, scales, zps = _feature_rows(X, T, G, XS, QW, S, ZP, k0, 1, offs_w, w_ok, N,
                                                                row_words, stride_xm, t, rstds, ROWS, BLOCK_K, GROUP,
                                                                BITS, PER_FEATURE, HAS_NORM, HAS_XSCALE, HAS_ZP,
                                                                EVEN_N)
                    accs = _multiply_rows(accs, xs, rows, kept, scales, zps, ROWS, BLOCK_K, BITS, SKIP)
            if PDL:
                tl.extra.cuda.gdc_launch_dependents()
            for c in tl.static_range(CPW):
                for m in tl.static_range(ROWS):
                    row = tl.arange(0, 1) + m
                    _store_columns(accs[c * ROWS + m][None, :], row, row < M, offs_w * CPW + c, w_ok, pid_k, M, N,
                                   BIAS, R, Y, P, stride_rm, HAS_BIAS, HAS_RES, ONE_SPLIT)

    for _name in ("sparse_gemv_wq", "sparse_gemv_wq_rows"):
        tuning.register_kernel_source(_name, _sparse_gemv_wq_kernel, _group_columns, _row_rstd, _feature_rows,
                                      _code_products, _code_sums, _multiply_rows, _tile, _dequantized, _multiply_tile,
                                      _store_columns, _masked_code, _kept_inputs, _normed, sum_splits_kernel, gated)

NO_FOLDS = (None, None, 1e-6, None, None)  # (input_scale, norm_weight, eps, residual, glu): nothing folded in


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------
def _check(x, threshold, qweight_t, scales_t, zero_points_t, bits, bias, folds) -> tuple[int, int, int]:
    """Validate the arguments; returns (M rows, N outputs before a gated activation, group size).
    Every refusal is an InputError (a FlashcError) naming the argument, what was expected and what came."""
    try:
        return _check_arguments(x, threshold, qweight_t, scales_t, zero_points_t, bits, bias, folds)
    except InputError:
        raise
    except (TypeError, ValueError) as e:  # the shared checks' refusals, as this module's kind
        raise InputError(str(e)) from None


def _check_arguments(x, threshold, qweight_t, scales_t, zero_points_t, bits, bias, folds):
    fn = "sparse_gemv_wq"
    input_scale, norm_weight, _, residual, glu = folds
    require_triton(fn)
    if bits not in KMAJOR_BITS:
        raise InputError(f"{fn}: bits must be one of {KMAJOR_BITS} (K-major codes tile 32-bit words), got {bits!r}")
    check_tensor(fn, "x", x, min_ndim=1)
    K = x.shape[-1]
    check_tensor(fn, "qweight_t", qweight_t, ndim=2, dtypes=(torch.int32,))
    if qweight_t.shape[0] != K or K == 0:
        raise InputError(f"{fn}: qweight_t must be int32 [K, N * {bits} / 32] with K = {K} (x's last dim, "
                         f"positive): the weight K-major (flashc.sparse_ops.to_kmajor), got {list(qweight_t.shape)}")
    check_tensor(fn, "scales_t", scales_t, ndim=2)
    n_groups, N = scales_t.shape
    if N * bits != qweight_t.shape[1] * 32:
        raise InputError(f"{fn}: scales_t [K / group_size, N] has N = {N}, but qweight_t's rows hold "
                         f"{qweight_t.shape[1] * 32 // bits} {bits}-bit codes")
    if n_groups == 0 or K % n_groups:
        raise InputError(f"{fn}: scales_t has {n_groups} groups, which do not divide K = {K}")
    group = K // n_groups
    if group & -group < 16:
        raise InputError(f"{fn}: the group size must be a multiple of 16 (MatMulNBits), got {group}")
    if scales_t.dtype not in (x.dtype, torch.float32):
        raise InputError(f"{fn}: scales_t must have x's dtype ({x.dtype}) or float32, got {scales_t.dtype}")
    tensors = [("x", x), ("threshold", threshold), ("qweight_t", qweight_t), ("scales_t", scales_t)]
    if zero_points_t is not None:
        check_tensor(fn, "zero_points_t", zero_points_t, ndim=2, dtypes=(torch.int32,))
        if tuple(zero_points_t.shape) != (n_groups, qweight_t.shape[1]):
            raise InputError(f"{fn}: zero_points_t must be int32 [{n_groups}, {qweight_t.shape[1]}] (packed along N "
                             f"as the codes), got {list(zero_points_t.shape)}")
        tensors.append(("zero_points_t", zero_points_t))
    if not isinstance(threshold, torch.Tensor) or not threshold.dtype.is_floating_point:
        raise InputError(f"{fn}: threshold must be a floating-point tensor, got "
                         f"{threshold.dtype if isinstance(threshold, torch.Tensor) else type(threshold).__name__}")
    if not (threshold.dim() == 0 or tuple(threshold.shape) in ((K,), (1,))):
        raise InputError(f"{fn}: threshold must be 0-d or one per input feature [{K}], got {list(threshold.shape)}")
    M = x.numel() // K
    if M > MAX_ROWS:
        raise InputError(f"{fn}: x has {M} rows; the kernel is for at most {MAX_ROWS} (use sparsify and linear_wq)")
    if glu not in _ACTS:
        raise InputError(f"{fn}: glu must be one of {sorted(a for a in _ACTS if a)} or None, got {glu!r}")
    if glu is not None and N % 2:
        raise InputError(f"{fn}: a gated activation needs the columns to be gate|up halves, got {N}")
    if glu is not None and residual is not None:
        raise InputError(f"{fn}: a gated activation or a residual, not both (as flashc.gemv)")
    n_out = N // 2 if glu is not None else N
    for name, t, length in (("bias", bias, N), ("norm_weight", norm_weight, K), ("input_scale", input_scale, K)):
        if t is None:
            continue
        check_tensor(fn, name, t, ndim=1)
        if t.shape[0] != length:
            raise InputError(f"{fn}: {name} must be [{length}], got {list(t.shape)}")
        # the op adds the bias in x's dtype, and the kernel norms in it: a promotion would change both
        if (name == "bias" and t.dtype != x.dtype) or (name == "norm_weight"
                                                       and torch.promote_types(x.dtype, t.dtype) != x.dtype):
            raise InputError(f"{fn}: {name} must have x's dtype {x.dtype}{' (or a narrower one)' * (name != 'bias')}"
                             f", got {t.dtype}")
        tensors.append((name, t))
    if residual is not None:
        check_tensor(fn, "residual", residual, min_ndim=1)
        if tuple(residual.shape) != (*x.shape[:-1], n_out) or residual.dtype != x.dtype:
            raise InputError(f"{fn}: residual must be {[*x.shape[:-1], n_out]} of x's dtype {x.dtype}, got "
                             f"{list(residual.shape)} {residual.dtype}")
        tensors.append(("residual", residual))
    check_devices(fn, _sparse_gemv_wq_kernel, tensors)
    return M, N, group


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _tuning_entry(M, x, threshold, N, group, bits, zero_points_t, bias, folds) -> tuple[str, dict]:
    """(tuning kernel name, shape key): one row and several rows have separate candidate lists."""
    input_scale, norm_weight, _, residual, glu = folds
    return ("sparse_gemv_wq" if M == 1 else "sparse_gemv_wq_rows",
            {"M": M, "N": N, "K": x.shape[-1], "group": group, "bits": bits, "asym": zero_points_t is not None,
             "dtype": str(x.dtype).replace("torch.", ""), "bias": bias is not None,
             "per_feature": threshold.numel() > 1, "xscale": input_scale is not None,
             "norm": norm_weight is not None, "residual": residual is not None, "glu": str(glu)})


def _worth_timing(M: int):
    """Candidates the tuner times: elementwise configs only up to TUNED_ELEMENTWISE_ROWS rows."""
    return lambda cfg: _fits(M)(cfg) and bool(cfg.get("library") or cfg.get("DOT") or M <= TUNED_ELEMENTWISE_ROWS)


def _config(M, x, threshold, N, group, bits, zero_points_t, bias, folds) -> dict:
    """The tuned config if the cache has one, else the first candidate that fits (never times anything)."""
    name, key = _tuning_entry(M, x, threshold, N, group, bits, zero_points_t, bias, folds)
    profile = tuning.detect_profile(x.device)
    hit = tuning.cached_config(name, key, profile)
    if hit is not None and _fits(M)(hit):
        return hit
    return next(c for c in candidates(name, profile) if _fits(M)(c))


def _launch(x, threshold, qweight_t, scales_t, zero_points_t, bits, bias, M, N, group, config, folds=NO_FOLDS):
    """folds: (input_scale, norm_weight, eps, residual, glu)."""
    input_scale, norm_weight, eps, residual, glu = folds
    K = x.shape[-1]
    n_out = N // 2 if glu is not None else N
    if config is None:
        config = _config(M, x, threshold, N, group, bits, zero_points_t, bias, folds)
    if config.get("library"):
        return reference_sparse_gemv_wq(x, threshold, qweight_t, scales_t, zero_points_t, bits, bias, input_scale,
                                        norm_weight, eps, residual, glu)
    y = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    x2 = (x if x.stride(-1) == 1 else x.contiguous()).reshape(-1, K)
    r2 = None if residual is None else (residual if residual.is_contiguous() else residual.contiguous()).view(-1, n_out)
    # the kernel indexes these densely (a no-op for the contiguous tensors a program holds)
    qweight_t, scales_t, zero_points_t, bias, input_scale, norm_weight = (
        None if t is None else t.contiguous()
        for t in (qweight_t, scales_t, zero_points_t, bias, input_scale, norm_weight))
    t = _kernel_threshold(x, threshold)
    t = t if t.is_contiguous() else t.contiguous()
    codes_per_word = 32 // bits
    words = max(1, int(config["BLOCK_N"]) // codes_per_word)
    block_k = min(int(config["BLOCK_K"]), group & -group)  # a chunk inside one group
    dot = bool(config.get("DOT"))
    if dot:  # tl.dot takes at least 16 along each dimension
        words, block_k = max(16, words), max(16, block_k)
    elif M > ELEMENTWISE_ROWS:
        raise InputError(f"sparse_gemv_wq: config {config} multiplies elementwise, for at most {ELEMENTWISE_ROWS} "
                         f"rows; x has {M} (use a DOT config)")
    if words & (words - 1) or block_k & (block_k - 1):
        raise InputError(f"sparse_gemv_wq: config {config}: BLOCK_N * {bits} / 32 words and BLOCK_K must be powers "
                         "of two")
    per_split, splits = k_ranges(K, block_k, config)
    # a gated activation pairs columns j and N/2 + j, which one program does not both hold: partials and the
    # summing kernel's epilogue, even for one split (as triton_sparse_gemv)
    one_split = splits == 1 and glu is None
    partials = y if one_split else torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    out = y.view(M, n_out)
    row_words = qweight_t.shape[1]
    pdl = pdl_enabled(x.device)
    with device_guard(x.device):
        _sparse_gemv_wq_kernel[(triton.cdiv(row_words, words), splits)](
            x2, t, qweight_t, scales_t, zero_points_t if zero_points_t is not None else qweight_t,
            bias if bias is not None else x2, input_scale if input_scale is not None else x2,
            norm_weight if norm_weight is not None else x2, r2 if r2 is not None else x2, out, partials,
            M, N, K, row_words, per_split,
            x2.stride(0), r2.stride(0) if r2 is not None else 0,
            float(eps),
            BITS=bits,
            GROUP=group,
            HAS_ZP=zero_points_t is not None,
            PER_FEATURE=t.numel() > 1,
            HAS_NORM=norm_weight is not None,
            HAS_XSCALE=input_scale is not None,
            HAS_BIAS=bias is not None,
            HAS_RES=r2 is not None and one_split,
            ONE_SPLIT=one_split,
            DOT=dot,
            IEEE=x.dtype == torch.float32,
            PREFETCH=bool(config.get("PREFETCH")),
            SKIP=bool(config.get("SKIP")) and not dot,
            EVEN_N=row_words % words == 0,
            NORM_BLOCK=min(512, next_pow2(K)),
            ROWS=DOT_ROWS if dot else M,
            WORDS=words,
            BLOCK_K=block_k,
            PDL=pdl,
            **({"launch_pdl": True} if pdl else {}),
            **launch_opts(config),
        )
        if not one_split:  # the norm was applied to the inputs: the sum has none to apply
            sum_splits(partials, partials, bias, r2, out, K, eps, glu, False, pdl)
    return y


def sparse_gemv_wq(
    x: torch.Tensor,
    threshold: torch.Tensor,
    qweight_t: torch.Tensor,
    scales_t: torch.Tensor,
    zero_points_t: torch.Tensor | None,
    bits: int,
    bias: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    glu: str | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """``flashc.sparse_gemv_wq``: ``linear_wq(sparsify(x, threshold), ...)`` on a K-major packed weight
    (``flashc.sparse_ops.to_kmajor``: ``qweight_t`` int32 [K, N * bits / 32], ``scales_t`` [K / G, N],
    ``zero_points_t`` int32 [K / G, N * bits / 32] or None) for at most ``MAX_ROWS`` rows of ``x[..., K]``,
    with the folds of the module docstring. Returns a new tensor ``[..., N]`` (``[..., N / 2]`` with glu)
    of x's dtype. ``config`` overrides the tuned one (``BLOCK_N`` columns, ``BLOCK_K``, ``SPLIT_K``, ``DOT``,
    ``PREFETCH``, ``SKIP``, ``num_warps``, or ``{"library": True}``). Bad arguments raise InputError (a
    FlashcError).
    """
    folds = (input_scale, norm_weight, eps, residual, glu)
    M, N, group = _check(x, threshold, qweight_t, scales_t, zero_points_t, bits, bias, folds)
    return _launch(x, threshold, qweight_t, scales_t, zero_points_t, bits, bias, M, N, group, config, folds)


def tune_sparse_gemv_wq(x, threshold, qweight_t, scales_t, zero_points_t, bits, bias=None, input_scale=None,
                        norm_weight=None, eps=1e-6, residual=None, glu=None) -> dict:
    """Time the kernel's candidate configs and the library path on these inputs; cache the winner.

    As ``triton_sparse_gemv.tune_sparse_gemv``: from a CUDA graph, each call on the next of enough copies of
    the packed weight that it comes from memory, not L2 (up to 64, as triton_gemv_wq's tuner: an int4
    matrix is a quarter of its bf16 bytes). The activations given are the ones timed: their sparsity
    decides the winner.
    """
    folds = (input_scale, norm_weight, eps, residual, glu)
    M, N, group = _check(x, threshold, qweight_t, scales_t, zero_points_t, bits, bias, folds)
    name, key = _tuning_entry(M, x, threshold, N, group, bits, zero_points_t, bias, folds)
    profile = tuning.detect_profile(x.device)
    hit = tuning.cached_config(name, key, profile)
    if hit is not None:  # no weight copies for a cache hit
        return hit
    cands = [c for c in candidates(name, profile) if _worth_timing(M)(c)]
    nbytes = qweight_t.numel() * 4 + scales_t.numel() * scales_t.element_size()
    copies = max(1, min(64, -(-L2_SPILL_BYTES // max(1, nbytes))))
    copied = [(qweight_t.clone(), scales_t.clone()) for _ in range(copies - 1)] if x.is_cuda else []
    packed = itertools.cycle([(qweight_t, scales_t)] + copied)

    def run(cfg):
        q, s = next(packed)
        return _launch(x, threshold, q, s, zero_points_t, bits, bias, M, N, group, cfg, folds)

    bench = tuning.graph_bench_for(x)
    if bench is not None:
        bench = functools.partial(bench, calls=max(24, copies))
    return tuning.autotune(name, key, cands, run, profile, bench_fn=bench)

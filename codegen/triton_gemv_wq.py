"""Decode matrix-vector products that read 2-, 3-, 4- or 8-bit packed weights directly (MatMulNBits layout).

The weight-only quantized twin of ``codegen/triton_gemv.py``: ``x[..., K]`` (at most
``MAX_ROWS`` rows) times a weight ``W[N, K]`` stored as codes, a scale per group of
``G`` input columns and optionally a zero point (``flashc/quantized_ops.py`` gives the
layout and ``dequantize``, the numeric truth), with the same folds: RMSNorm prologue
(``rstd`` applied at the end), AWQ's per-input-channel ``input_scale``, bias, a gated
activation over merged gate|up halves, residual add. Semantics (``reference_gemv_wq``)::

    h = rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    h = h * input_scale                       if input_scale is not None
    y = h @ dequantize(qweight, scales, zero_points, bits).T + bias
    y = act(y[..., :F]) * y[..., F:]          if glu
    y = y + residual                          if residual is not None

At batch 1 an int4 weight is 4x fewer bytes than bf16, and an H200 then has about four
instructions a weight to spend (128 FP32 lanes x 132 SMs x 1.98 GHz over 4.3 TB/s x 2
weights a byte). Converting each code with ``I2F`` (16 a clock per SM: half the bytes'
rate by itself) and dequantizing before the FMA would make the kernel compute-bound, so
the elementwise path spends per weight one logic op and one FMA a row:

* ``qweight`` is read as 32-bit words (16 codes at 2 bits, 8 at 4 bits, 4 at 8 bits). Code ``c`` of a
  word is masked *in place*, ``word & (mask << e_c)`` (one ``LOP3``; codes above bit 19
  are masked in the word shifted right by 16, one shift a word, so ``e_c + bits <= 20``
  stays below float32's exponent), and the masked bits read as a float32 are the
  subnormal ``q * 2**(e_c - 149)``: exact, with no convert instruction (FP32 FMAs take
  subnormals at full rate; nothing here is compiled with flush-to-zero);
* the matching activations are scaled by ``2**(X_EXP - e_c)`` once a program (shared by
  its rows), so every product is ``q * x * 2**(X_EXP - 149)``, a normal float;
* scale and zero point are applied once a group, in the group-sum form::

      y[m, n] = sum_g s[n, g] * (2**(149 - X_EXP) * sum_{k in g} q[n, k] x[m, k] - zp[n, g] * sum_{k in g} x[m, k])

  with the group sums of x shared by all rows of the program.

At 3 bits the unit is three words, 32 codes: code c of a unit starts at bit 3c of the
96, in word (3c) // 32; codes 10 and 21 straddle two words and are joined from both
(shifted down to bit 0, e_c = 0), the others are masked in place as above. A 3-bit group
is then a multiple of 32 codes (whole units).

Code c of all the words of a tile is one tensor in the words' own layout, multiplied with
the activations ``x[k0 + 8 i + c]`` (loaded with stride 8): a ``[.., codes]`` dimension
made Triton spread a word's codes over threads (10-13 SASS instructions a weight, against
~3 now; offline sm_90 compiles of this kernel, not GPU timings).

``DOT`` configs (9..16 rows, and tuning candidates from 2 rows) dequantize the codes to
x's dtype instead (the code ORed into float32's 2**23, minus 2**23 + zp * 2**e_c, times
s * 2**-e_c) and multiply with ``tl.dot``, one dot a code position, the rows padded to
16. The unfused path (``dequantize_weight``, then the norm kernel, cuBLAS, the
activation kernel, add) is a tuning candidate, ``{"library": True}``, as in triton_gemv.

``linear_wq`` is the CUDA backend's ``flashc.linear_wq`` for any number of rows: this
kernel for decode, ``dequantize_weight`` + cuBLAS for prefill.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from flashc.quantized_ops import SUPPORTED_BITS, dequantize, packed_zero_point_columns

from . import tuning
from ._triton_common import (
    FLOAT_DTYPES,
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
from .triton_gemv import (
    ELEMENTWISE_ROWS,
    L2_SPILL_BYTES,
    MAX_ROWS,
    by_row,
    k_ranges,
    reference_gemv,
    split_buffers,
    sum_splits,
)

__all__ = ["MAX_ROWS", "gemv_wq", "tune_gemv_wq", "reference_gemv_wq", "dequantize_weight", "linear_wq"]

_ACTS = {None: 0, "silu": 1, "gelu_tanh": 2}
LIBRARY = {"library": True}  # tuning candidate: dequantize_weight, then the unfused ops with cuBLAS
# The elementwise path takes up to ELEMENTWISE_ROWS rows, but costs one FMA a row per weight and
# spilled registers from 4 rows in offline sm_90 compiles (8 rows: 4 KB of stack, ~40 SASS
# instructions a weight against ~6.5 for a DOT config), so the tuner times it up to 2 rows only.
TUNED_ELEMENTWISE_ROWS = 2
# Activations are scaled by 2**(X_EXP - e_j) <= 2**88 before the product (see the module
# docstring), so |x * norm_weight * input_scale| must stay below 2**40 (~1e12); products
# of codes and activations are then normal floats down to |x| ~ 2**-65.
X_EXP = 88
DEQUANT_BLOCK = {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4}  # dequantize_weight's tile


def reference_gemv_wq(x, qweight, scales, zero_points, bits, bias=None, input_scale=None, norm_weight=None,
                      eps=1e-6, residual=None, glu=None):
    """The unfused ops in PyTorch, in x's dtype (float64 inputs give a float64 truth).

    ``input_scale`` multiplies the dequantized weight's columns, the same product as
    ``(h * input_scale) @ W^T`` up to rounding.
    """
    w = dequantize(qweight, scales, zero_points, bits).to(x.dtype)
    if input_scale is not None:
        w = w * input_scale.to(x.dtype)
    return reference_gemv(x, w, bias, norm_weight, eps, residual, glu)


if HAS_TRITON:
    # the folds after the product and the split-K partials, shared with the bf16 GEMV
    from .triton_gemv import gated, gemv_epilogue, store_partials, sum_splits_kernel

    _X_EXP = tl.constexpr(X_EXP)

    @triton.jit
    def _masked_code(words, words_b, words_c, c: tl.constexpr, BITS: tl.constexpr):
        """Code c of every unit, ``q << e_c``: masked in place (the word shifted right by 16 first for
        codes past bit 19, one shift a word shared by them), so it stays below float32's exponent.

        A unit is one word (words_b, words_c unused) below 3 bits' width; at 3 bits the three words
        words, words_b, words_c (32 codes), and a code across two words is joined at bit 0."""
        P: tl.constexpr = c * BITS % 32  # the code's first bit in its word
        E: tl.constexpr = (P - 16 * (P + BITS > 20)) * (P + BITS <= 32)  # e_c (0 for a straddling code)
        W: tl.constexpr = c * BITS // 32
        if W == 0:
            word = words
            nxt = words_b
        elif W == 1:
            word = words_b
            nxt = words_c
        else:
            word = words_c
            nxt = words_c
        if P + BITS <= 32:
            code = (word >> (P - E)) & (((1 << BITS) - 1) << E)
        else:  # low 32 - P bits from this word (an arithmetic shift: masked), the rest from the next
            code = ((word >> P) & ((1 << (32 - P)) - 1)) | ((nxt << (32 - P)) & ((1 << BITS) - 1))
        return code

    @triton.jit
    def _load_units(ptrs, mask, BITS: tl.constexpr, EVEN: tl.constexpr):
        """A tile of units: (word, second word, third word), the last two read at 3 bits only."""
        if EVEN:
            words = tl.load(ptrs)
        else:
            words = tl.load(ptrs, mask=mask, other=0)
        words_b = words
        words_c = words
        if BITS == 3:
            if EVEN:
                words_b = tl.load(ptrs + 1)
                words_c = tl.load(ptrs + 2)
            else:
                words_b = tl.load(ptrs + 1, mask=mask, other=0)
                words_c = tl.load(ptrs + 2, mask=mask, other=0)
        return words, words_b, words_c

    @triton.jit
    def _code(words, words_b, words_c, c: tl.constexpr, BITS: tl.constexpr):
        """Code c of every unit read as a float32: the subnormal q * 2**(e_c - 149), exactly."""
        return _masked_code(words, words_b, words_c, c, BITS).to(tl.float32, bitcast=True)

    @triton.jit
    def _code_columns(x3, SUBS: tl.constexpr, WORDS: tl.constexpr):
        """The 8 columns of x3 [SUBS, WORDS, 8] as [SUBS, WORDS] tensors, in order (three rounds of
        tl.split, which takes the last dimension's even and odd halves)."""
        e, o = tl.split(tl.reshape(x3, [SUBS, WORDS, 4, 2]))  # columns 0 2 4 6 | 1 3 5 7
        ee, eo = tl.split(tl.reshape(e, [SUBS, WORDS, 2, 2]))  # 0 4 | 2 6
        oe, oo = tl.split(tl.reshape(o, [SUBS, WORDS, 2, 2]))  # 1 5 | 3 7
        c0, c4 = tl.split(ee)
        c2, c6 = tl.split(eo)
        c1, c5 = tl.split(oe)
        c3, c7 = tl.split(oo)
        return c0, c1, c2, c3, c4, c5, c6, c7

    @triton.jit
    def _group_params(S, ZP, rows, blk, ok, n_blocks, zp_stride, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
        """Scales and zero points (float32) of the [rows, sub-blocks] tile's groups ``blk``."""
        s = tl.load(S + rows[:, None] * n_blocks + blk[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_ZP:
            if BITS == 3:  # a bitstream a row, block j at bit 3j: two bytes hold it
                bit = blk * 3
                z_ok = ok & ((bit // 8 + 1) < zp_stride)[None, :]
                z0 = tl.load(ZP + rows[:, None] * zp_stride + (bit // 8)[None, :], mask=ok, other=0).to(tl.int32)
                z1 = tl.load(ZP + rows[:, None] * zp_stride + (bit // 8 + 1)[None, :], mask=z_ok, other=0).to(tl.int32)
                zp = (((z0 | (z1 << 8)) >> (bit % 8)[None, :]) & 7).to(tl.float32)
            elif BITS < 8:  # 8 / BITS blocks a byte, the first in the lowest bits
                PER: tl.constexpr = 8 // BITS
                zb = tl.load(ZP + rows[:, None] * zp_stride + (blk // PER)[None, :], mask=ok, other=0).to(tl.int32)
                zp = ((zb >> ((blk % PER) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
            else:
                zp = tl.load(ZP + rows[:, None] * zp_stride + blk[None, :], mask=ok, other=0).to(tl.float32)
        else:
            zp = tl.zeros_like(s) + (1 << (BITS - 1))
        return s, zp

    @triton.jit
    def _dequantized_code(words, words_b, words_c, c: tl.constexpr, s, zp, BITS: tl.constexpr):
        """(q - zp) * s of code c, float32 [rows, sub-blocks, units]: the masked code ORed into
        2**23 (float32 with a unit last mantissa bit), minus 2**23 + zp * 2**e_c, times s * 2**-e_c."""
        P: tl.constexpr = c * BITS % 32
        E: tl.constexpr = (P - 16 * (P + BITS > 20)) * (P + BITS <= 32)  # e_c, as in _masked_code
        bits = _masked_code(words, words_b, words_c, c, BITS) | 0x4B000000
        return (bits.to(tl.float32, bitcast=True) - (8388608.0 + zp * 2.0 ** E)[:, :, None]) \
            * (s * 2.0 ** -E)[:, :, None]

    @triton.jit
    def _gemv_wq_kernel(
        X, QW, S, ZP, BIAS, G, XS, R, Y, P, PSQ,
        M, N, K, n_blocks, zp_stride, row_words, up_row, per_split,
        stride_xm, stride_rm, stride_ym,
        eps,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        HAS_ZP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_NORM: tl.constexpr,
        HAS_XSCALE: tl.constexpr,
        HAS_RES: tl.constexpr,
        ACT: tl.constexpr,
        DOT: tl.constexpr,
        IEEE: tl.constexpr,
        EVEN: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SUB: tl.constexpr,
        SUBS: tl.constexpr,
        STAGES: tl.constexpr,
        PREFETCH: tl.constexpr,
        FLAT: tl.constexpr,
        XVEC: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Program (n, r): Y[r:r + M, n*BLOCK_N:(n+1)*BLOCK_N] for rows r.. of X: all rows with a grid of one
        column, or one row a column (M = 1) for ROWWISE launches (as codegen/triton_gemv.py's).

        QW is the packed weight as int32 words, ``row_words`` a row. An iteration reads a
        [BLOCK_N, SUBS, WORDS] tile of words: SUBS sub-blocks of SUB codes a row (SUB
        divides the group size: one scale a sub-block), word i holding codes
        ``i * CODES + c`` of the iteration. Code c of all words is one [BLOCK_N, SUBS,
        WORDS] tensor (`_code`), multiplied with the activations ``x[k0 + i * CODES + c]``
        (strided loads, so every tensor of the loop keeps the words' layout). ACT != 0:
        rows ``up_row`` further down are the up projection.
        SPLIT: program (n, 0, s) takes K from s * per_split (whole BLOCK_K blocks) on and stores fp32 partials
        (triton_gemv.store_partials: P, and PSQ for the norm) for triton_gemv.sum_splits_kernel.
        FLAT (EVEN, one-word units): a step's words are loaded as a [BLOCK_N, BLOCK_K / CODES] tile, one
        contiguous run a row, and reshaped to [BLOCK_N, SUBS, WORDS]. The same words in the same registers'
        order, but Triton then lays the tile out with a warp's lanes along K and the rows across warps
        (offline sm_90 compiles, Triton 3.6: threads [1, 8, 4], warps [4, 1, 1]) instead of lanes across
        rows: a code position's activations, broadcast to every row through shared memory, are needed by
        4 threads a value instead of 16, and the shared-memory reads a step fall about 3.5x (Nsight Compute
        found the one-row tiles bound by L1/shared traffic, 70-89% busy, with DRAM at 7-41%).
        XVEC (elementwise, EVEN, 4 bits): a step's activations (and norm weight, input scale) are loaded once
        as a [SUBS, WORDS, 8] tile, word i's 8 columns as one 16-byte vector, and split into the 8 code
        positions' [SUBS, WORDS] tensors (`_code_columns`), instead of 8 strided 2-byte loads each (offline
        sm_90 compiles, Triton 3.6, 16 x 1024 flat tile with norm + GLU: 18 LDG.U16 -> 2 LDG.128 a thread a
        step; the split columns still reach the words' layout through shared memory, as before). On an H100
        (bench/RESULTS.md, session 21) an xvec tile won every 8B shape, 5-18% faster than the flat tiles.
        """
        if PDL:  # launched before the previous kernel finished: wait for its results
            tl.extra.cuda.gdc_wait()
        UNIT: tl.constexpr = 3 if BITS == 3 else 1  # words a unit of codes
        CODES: tl.constexpr = 32 * UNIT // BITS  # codes a unit
        WORDS: tl.constexpr = SUB // CODES  # units a sub-block
        BLOCK_K: tl.constexpr = SUB * SUBS
        pid = tl.program_id(0)
        row = tl.program_id(1)  # row-wise launches (one program column a row, M = 1): the row's offsets
        pid_k = tl.program_id(2)
        # per_split is whole BLOCK_K blocks: written so, the compiler knows k_lo // CODES is a multiple of
        # BLOCK_K / CODES words and loads the words 16 bytes at a time (as pid_k * per_split it knew only 2 words)
        k_lo = pid_k * (per_split // BLOCK_K) * BLOCK_K
        k_hi = tl.minimum(K, k_lo + per_split)
        X += row * stride_xm + k_lo
        QW += k_lo // CODES * UNIT
        R += row * stride_rm
        Y += row * stride_ym
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_s = tl.arange(0, SUBS)
        m_ok = offs_m < M
        n_ok = offs_n < N
        rows = offs_n.to(tl.int64)
        up_rows = rows + up_row
        word = offs_s[:, None] * WORDS + tl.arange(0, WORDS)[None, :]  # [SUBS, WORDS]: word i of the iteration
        w_ptrs = QW + rows[:, None, None] * row_words + word[None, :, :] * UNIT
        w_up_ptrs = QW + up_rows[:, None, None] * row_words + word[None, :, :] * UNIT
        if DOT:  # y^T = W x^T: the dequantized codes are the MMA's wide operand, the rows its narrow one
            x_ptrs = X + offs_m[:, None] * stride_xm + tl.reshape(word, [SUBS * WORDS])[None, :] * CODES
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            sq = tl.zeros([BLOCK_M, SUBS * WORDS], dtype=tl.float32)
        else:  # per row m: [BLOCK_N, SUBS, WORDS] sums of scaled products, reduced after the loop
            x_ptrs = X + word * CODES
            accs = (tl.zeros([BLOCK_N, SUBS, WORDS], dtype=tl.float32),) * BLOCK_M
            accs_up = accs
            sqs = (tl.zeros([SUBS, WORDS], dtype=tl.float32),) * BLOCK_M
        # STAGES > 1: the word loads run that many iterations ahead (cp.async into shared memory);
        # without a tl.dot in the loop Triton pipelines only a loop that asks for it
        # PREFETCH: the next step's words are loaded into registers before this step's arithmetic (the
        # loads of two steps in flight a thread; Nsight Compute found the kernel latency-bound, its loads
        # waiting on their step's arithmetic). The first step's words come before the loop.
        if PREFETCH:
            nxt_mask = n_ok[:, None, None] & (offs_s < (k_hi - k_lo) // SUB)[None, :, None]
            nxt, nxt_b, nxt_c = _load_units(w_ptrs, nxt_mask, BITS, False)
            if ACT != 0:
                nxt_up, nxt_up_b, nxt_up_c = _load_units(w_up_ptrs, nxt_mask, BITS, False)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            blk = (k0 + offs_s * SUB) // GROUP
            if EVEN:
                s_ok = offs_s < SUBS
            else:
                s_ok = offs_s < (k_hi - k0) // SUB
            w_mask = n_ok[:, None, None] & s_ok[None, :, None]
            if PREFETCH:
                words, words_b, words_c = nxt, nxt_b, nxt_c
                if ACT != 0:
                    words_up, words_up_b, words_up_c = nxt_up, nxt_up_b, nxt_up_c
                nxt_mask = n_ok[:, None, None] & (offs_s < (k_hi - k0 - BLOCK_K) // SUB)[None, :, None]
                step = BLOCK_K // CODES * UNIT
                nxt, nxt_b, nxt_c = _load_units(w_ptrs + step, nxt_mask, BITS, False)
                if ACT != 0:
                    nxt_up, nxt_up_b, nxt_up_c = _load_units(w_up_ptrs + step, nxt_mask, BITS, False)
            elif FLAT:  # [BLOCK_N, BLOCK_K / CODES] words, reshaped: see the docstring
                flat = tl.arange(0, SUBS * WORDS)[None, :]
                words = tl.reshape(tl.load(QW + rows[:, None] * row_words + (k0 - k_lo) // CODES + flat),
                                   [BLOCK_N, SUBS, WORDS])
                words_b = words
                words_c = words
                if ACT != 0:
                    words_up = tl.reshape(tl.load(QW + up_rows[:, None] * row_words + (k0 - k_lo) // CODES + flat),
                                          [BLOCK_N, SUBS, WORDS])
                    words_up_b = words_up
                    words_up_c = words_up
            else:
                words, words_b, words_c = _load_units(w_ptrs, w_mask, BITS, EVEN)
                if ACT != 0:
                    words_up, words_up_b, words_up_c = _load_units(w_up_ptrs, w_mask, BITS, EVEN)
            p_ok = n_ok[:, None] & s_ok[None, :]
            s, zp = _group_params(S, ZP, rows, blk, p_ok, n_blocks, zp_stride, BITS, HAS_ZP)
            if ACT != 0:
                s_up, zp_up = _group_params(S, ZP, up_rows, blk, p_ok, n_blocks, zp_stride, BITS, HAS_ZP)
            if DOT:
                x_mask = m_ok[:, None] & tl.reshape(s_ok[:, None] & (word >= 0), [SUBS * WORDS])[None, :]
                for c in tl.static_range(CODES):
                    x = tl.load(x_ptrs + c, mask=x_mask, other=0.0).to(tl.float32)  # [BLOCK_M, SUBS * WORDS]
                    if HAS_NORM:
                        sq += x * x
                        f = tl.load(G + k0 + word * CODES + c, mask=s_ok[:, None], other=0.0).to(tl.float32)
                        x = x * tl.reshape(f, [SUBS * WORDS])[None, :]
                    if HAS_XSCALE:
                        f = tl.load(XS + k0 + word * CODES + c, mask=s_ok[:, None], other=0.0).to(tl.float32)
                        x = x * tl.reshape(f, [SUBS * WORDS])[None, :]
                    xt = tl.trans(x.to(X.dtype.element_ty))
                    w = tl.reshape(_dequantized_code(words, words_b, words_c, c, s, zp, BITS), [BLOCK_N, SUBS * WORDS])
                    if IEEE:
                        acc = tl.dot(w, xt, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(w.to(X.dtype.element_ty), xt, acc)
                    if ACT != 0:
                        w = tl.reshape(_dequantized_code(words_up, words_up_b, words_up_c, c, s_up, zp_up, BITS),
                                       [BLOCK_N, SUBS * WORDS])
                        if IEEE:
                            acc_up = tl.dot(w, xt, acc_up, input_precision="ieee")
                        else:
                            acc_up = tl.dot(w.to(X.dtype.element_ty), xt, acc_up)
            else:
                # the group-sum form: s * (2**(149 - X_EXP) * sum(q x 2**(X_EXP - 149)) - zp * sum(x))
                a = (s * 2.0 ** (149 - _X_EXP))[:, :, None]
                b = (s * zp)[:, :, None]
                if ACT != 0:
                    a_up = (s_up * 2.0 ** (149 - _X_EXP))[:, :, None]
                    b_up = (s_up * zp_up)[:, :, None]
                folds = ()  # norm_weight * input_scale of code c's columns
                if (HAS_NORM or HAS_XSCALE) and not XVEC:
                    for c in tl.static_range(CODES):
                        f = tl.full([SUBS, WORDS], 1.0, tl.float32)
                        if HAS_NORM:
                            f = f * tl.load(G + k0 + word * CODES + c, mask=s_ok[:, None], other=0.0).to(tl.float32)
                        if HAS_XSCALE:
                            f = f * tl.load(XS + k0 + word * CODES + c, mask=s_ok[:, None], other=0.0).to(tl.float32)
                        folds = folds + (f,)
                new_accs = ()
                new_accs_up = ()
                new_sqs = ()
                if XVEC:  # x as [SUBS, WORDS, CODES] vectors, contiguous (see the docstring); 4 bits only
                    col = word[:, :, None] * CODES + tl.arange(0, CODES)[None, None, :]  # the step's columns
                    f3 = tl.full([SUBS, WORDS, CODES], 1.0, tl.float32)
                    if HAS_NORM:
                        f3 = f3 * tl.load(G + k0 + col).to(tl.float32)
                    if HAS_XSCALE:
                        f3 = f3 * tl.load(XS + k0 + col).to(tl.float32)
                for m in tl.static_range(BLOCK_M):
                    part = tl.zeros([BLOCK_N, SUBS, WORDS], dtype=tl.float32)
                    part_up = tl.zeros([BLOCK_N, SUBS, WORDS], dtype=tl.float32)
                    sq = sqs[m]
                    if XVEC:  # the row's step of x at once, then its code positions split out of it
                        x3 = tl.load(X + (k0 - k_lo) + m * stride_xm + col, mask=(col * 0 + m) < M,
                                     other=0.0).to(tl.float32)
                        if HAS_NORM:
                            sq += tl.sum(x3 * x3, axis=2)
                        if HAS_NORM or HAS_XSCALE:
                            x3 = x3 * f3
                        x_sum = tl.sum(x3, axis=2)
                        xs = _code_columns(x3, SUBS, WORDS)
                    else:
                        x_sum = tl.zeros([SUBS, WORDS], dtype=tl.float32)
                        x_ok = (s_ok & (offs_s * 0 + m < M))[:, None]  # (a tensor: the interpreter mishandles a scalar)
                    for c in tl.static_range(CODES):
                        if XVEC:
                            x = xs[c]
                        else:  # code position c's activations, strided
                            x = tl.load(x_ptrs + m * stride_xm + c, mask=x_ok, other=0.0).to(tl.float32)
                            if HAS_NORM:
                                sq += x * x
                            if HAS_NORM or HAS_XSCALE:
                                x = x * folds[c]
                            x_sum += x
                        # 2**(X_EXP - e_c), e_c as in _masked_code (a constexpr: no jit call in a loop)
                        xq = (x * 2.0 ** (_X_EXP - (c * BITS % 32 - 16 * (c * BITS % 32 + BITS > 20))
                                          * (c * BITS % 32 + BITS <= 32)))[None, :, :]
                        part += _code(words, words_b, words_c, c, BITS) * xq
                        if ACT != 0:
                            part_up += _code(words_up, words_up_b, words_up_c, c, BITS) * xq
                    new_accs = new_accs + (accs[m] + part * a - b * x_sum[None, :, :],)
                    if ACT != 0:
                        new_accs_up = new_accs_up + (accs_up[m] + part_up * a_up - b_up * x_sum[None, :, :],)
                    new_sqs = new_sqs + (sq,)
                accs = new_accs
                if ACT != 0:
                    accs_up = new_accs_up
                sqs = new_sqs
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // CODES * UNIT
            w_up_ptrs += BLOCK_K // CODES * UNIT

        if PDL:  # the weights are streamed: the next kernel may start its launch now
            tl.extra.cuda.gdc_launch_dependents()
        if DOT:
            out = tl.trans(acc)
            up = tl.trans(acc_up)
            sq_rows = tl.sum(sq, axis=1)
        else:  # gather the rows' sums into [BLOCK_M, BLOCK_N]
            out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            sq_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
            for m in tl.static_range(BLOCK_M):
                out = tl.where(offs_m[:, None] == m, tl.sum(tl.sum(accs[m], axis=2), axis=1)[None, :], out)
                if ACT != 0:
                    up = tl.where(offs_m[:, None] == m, tl.sum(tl.sum(accs_up[m], axis=2), axis=1)[None, :], up)
                if HAS_NORM:
                    sq_rows = tl.where(offs_m == m, tl.sum(tl.sum(sqs[m], axis=1), axis=0), sq_rows)
        if SPLIT:
            store_partials(out, up, sq_rows, P, PSQ, pid, pid_k, M, N, offs_m, offs_n, m_ok, n_ok, HAS_NORM, ACT)
        else:
            gemv_epilogue(out, up, sq_rows, K, eps, BIAS, up_row, R, Y, offs_m, offs_n, m_ok, n_ok,
                          stride_rm, stride_ym, HAS_NORM, HAS_BIAS, HAS_RES, ACT)

    @triton.jit
    def _dequantize_kernel(
        QW, S, ZP, Y,
        N, K, n_blocks, zp_stride, row_words,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        HAS_ZP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SUB: tl.constexpr,
        SUBS: tl.constexpr,
    ):
        """Program (n, k): Y[n-tile, k-tile] = (q - zp) * s in float32, rounded once to Y's dtype."""
        UNIT: tl.constexpr = 3 if BITS == 3 else 1  # words a unit of codes, as in _gemv_wq_kernel
        CODES: tl.constexpr = 32 * UNIT // BITS
        WORDS: tl.constexpr = SUB // CODES
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * SUB * SUBS
        offs_s = tl.arange(0, SUBS)
        offs_w = tl.arange(0, WORDS)
        j = tl.arange(0, CODES)
        rows = offs_n.to(tl.int64)
        s_ok = offs_s < (K - k0) // SUB
        ok = (offs_n < N)[:, None] & s_ok[None, :]
        unit = QW + rows[:, None, None] * row_words + (k0 // CODES + offs_s[None, :, None] * WORDS
                                                       + offs_w[None, None, :]) * UNIT
        if BITS == 3:  # code j at bit 3j of its unit: its word, and the next for the two that straddle
            at = (j * 3 // 32)[None, None, None, :]
            shift = (j * 3 % 32)[None, None, None, :]
            lo = tl.load(unit[:, :, :, None] + at, mask=ok[:, :, None, None], other=0)
            hi = tl.load(unit[:, :, :, None] + at + 1, mask=ok[:, :, None, None] & (shift > 29), other=0)
            # (hi is 0 where nothing straddles; the low part's mask drops the arithmetic shift's sign bits)
            q = ((lo >> shift) & (7 >> tl.maximum(shift - 29, 0))) | ((hi << ((32 - shift) & 31)) & 7)
            q = q.to(tl.float32)
        else:
            words = tl.load(unit, mask=ok[:, :, None], other=0)
            q = ((words[:, :, :, None] >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
        s, zp = _group_params(S, ZP, rows, (k0 + offs_s * SUB) // GROUP, ok, n_blocks, zp_stride, BITS, HAS_ZP)
        w = (q - zp[:, :, None, None]) * s[:, :, None, None]
        cols = k0 + offs_s[:, None, None] * SUB + offs_w[None, :, None] * CODES + j[None, None, :]
        tl.store(Y + rows[:, None, None, None] * K + cols[None, :, :, :], w.to(Y.dtype.element_ty),
                 mask=ok[:, :, None, None])

    tuning.register_kernel_source("gemv_wq", _gemv_wq_kernel, _masked_code, _code, _group_params,
                                    _dequantized_code, gemv_epilogue, gated, store_partials, sum_splits_kernel)
    tuning.register_kernel_source("gemv_wq_rows", _gemv_wq_kernel, _masked_code, _code, _group_params,
                                    _dequantized_code, gemv_epilogue, gated, store_partials, sum_splits_kernel)


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------
def _packed_shape(fn, qweight, scales, zero_points, bits, K):
    """(N, group size, n_blocks) of a packed weight, after checking it against x's K."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{fn}: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    check_tensor(fn, "qweight", qweight, ndim=3, dtypes=(torch.uint8,))
    N, n_blocks, group_bytes = qweight.shape
    group = group_bytes * 8 // bits
    if n_blocks * group != K:
        raise ValueError(f"{fn}: qweight must be [N, K / group_size, group_size * {bits} / 8] with K = {K} "
                         f"(x's last dim), got {tuple(qweight.shape)}: {n_blocks} groups of {group} codes")
    if group & -group < 16:
        raise ValueError(f"{fn}: the group size must be a multiple of 16 (MatMulNBits), got {group}")
    if bits == 3 and group % 32:
        raise ValueError(f"{fn}: a 3-bit group must be a multiple of 32 codes (three whole 32-bit words), got "
                         f"{group}; use group_size 32, 64 or 128, or compile for cpu")
    check_tensor(fn, "scales", scales, ndim=2)
    if tuple(scales.shape) != (N, n_blocks):
        raise ValueError(f"{fn}: scales must be [{N}, {n_blocks}] (one per row and group), got {tuple(scales.shape)}")
    if zero_points is not None:
        check_tensor(fn, "zero_points", zero_points, ndim=2, dtypes=(torch.uint8,))
        expect = (N, packed_zero_point_columns(n_blocks, bits))
        if tuple(zero_points.shape) != expect:
            raise ValueError(f"{fn}: {bits}-bit zero_points must be {list(expect)} (uint8"
                             f"{f', {8 // bits} blocks a byte' if bits < 8 else ''}), got {tuple(zero_points.shape)}")
    return N, group, n_blocks


def _check(x, qweight, scales, zero_points, bits, bias, input_scale, norm_weight, residual, glu):
    fn = "gemv_wq"
    require_triton(fn)
    check_tensor(fn, "x", x, min_ndim=1)
    K = x.shape[-1]
    N, group, n_blocks = _packed_shape(fn, qweight, scales, zero_points, bits, K)
    if scales.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{fn}: scales must have x's dtype ({x.dtype}) or float32, got {scales.dtype}")
    if glu not in _ACTS:
        raise ValueError(f"{fn}: glu must be one of {sorted(a for a in _ACTS if a)} or None, got {glu!r}")
    if glu is not None and N % 2:
        raise ValueError(f"{fn}: a gated activation needs qweight's rows to be gate|up halves, got {N} rows")
    n_out = N // 2 if glu else N
    M = x.numel() // K if K else 0
    if M > MAX_ROWS:
        raise ValueError(f"{fn}: x has {M} rows; the kernel is for at most {MAX_ROWS} (use linear_wq: "
                         "dequantize_weight and a GEMM)")
    tensors = [("x", x), ("qweight", qweight), ("scales", scales)]
    if zero_points is not None:
        tensors.append(("zero_points", zero_points))
    for name, t, length in (("bias", bias, N), ("input_scale", input_scale, K), ("norm_weight", norm_weight, K)):
        if t is not None:
            check_tensor(fn, name, t, ndim=1)
            if t.shape[0] != length:
                raise ValueError(f"{fn}: {name} must be [{length}], got {tuple(t.shape)}")
            tensors.append((name, t))
    if residual is not None:
        check_tensor(fn, "residual", residual)
        if tuple(residual.shape) != (*x.shape[:-1], n_out):
            raise ValueError(f"{fn}: residual must have shape {(*x.shape[:-1], n_out)}, got {tuple(residual.shape)}")
        tensors.append(("residual", residual))
    check_devices(fn, _gemv_wq_kernel, tensors)
    return M, n_out, group


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _rows(t: torch.Tensor, K: int) -> torch.Tensor:
    return (t if t.stride(-1) == 1 else t.contiguous()).reshape(-1, K)


def _words(qweight: torch.Tensor) -> torch.Tensor:
    """The packed bytes as int32 words [N, K * bits / 32] (little-endian: byte 0 is bits 0..7)."""
    q = qweight.contiguous()
    return q.view(torch.int32).reshape(q.shape[0], -1)


def _codes_per_unit(bits: int) -> int:
    """Codes the kernels read as one unit: a 32-bit word, or three at 3 bits (32 codes, 96 bits)."""
    return 32 if bits == 3 else 32 // bits


def _sub_block(block_k: int, group: int) -> tuple[int, int]:
    """(SUB, SUBS): sub-blocks of one scale (SUB divides the group, a power of two) tiling BLOCK_K."""
    sub = min(block_k, group & -group)
    return sub, max(1, block_k // sub)


def _tuning_entry(M, n_out, x, group, bits, zero_points, bias, input_scale, norm_weight, residual, glu):
    """(tuning kernel name, shape key): one row and several rows have separate candidate lists."""
    return ("gemv_wq" if M == 1 else "gemv_wq_rows",
            {"M": M, "N": n_out, "K": x.shape[-1], "group": group, "bits": bits, "asym": zero_points is not None,
             "dtype": str(x.dtype).replace("torch.", ""), "act": str(glu), "norm": norm_weight is not None,
             "bias": bias is not None, "xscale": input_scale is not None, "res": residual is not None})


def _fits(M: int):
    return lambda cfg: bool(cfg.get("library") or cfg.get("DOT") or cfg.get("ROWWISE") or M <= ELEMENTWISE_ROWS)


def _worth_timing(M: int):
    """Candidates the tuner times: elementwise configs only up to TUNED_ELEMENTWISE_ROWS rows."""
    return lambda cfg: _fits(M)(cfg) and bool(cfg.get("library") or cfg.get("DOT") or cfg.get("ROWWISE")
                                              or M <= TUNED_ELEMENTWISE_ROWS)


def _library(x, qweight, scales, zero_points, bits, bias, input_scale, norm_weight, eps, residual, glu):
    """The unfused ops: dequantize_weight, norm kernel, cuBLAS, activation kernel, add."""
    from .triton_mlp import geglu, swiglu
    from .triton_norm import rms_norm

    w = dequantize_weight(qweight, scales, zero_points, bits, x.dtype)
    h = x if norm_weight is None else rms_norm(x, norm_weight.to(x.dtype), eps)
    if input_scale is not None:
        h = h * input_scale.to(x.dtype)
    y = F.linear(h, w, None if bias is None else bias.to(x.dtype))
    if glu is not None:
        g, u = y.chunk(2, dim=-1)
        y = swiglu(g, u) if glu == "silu" else geglu(g, u)
    return y if residual is None else y + residual


def _launch(x, qweight, scales, zero_points, bits, bias, input_scale, norm_weight, eps, residual, glu,
            M, n_out, group, config):
    K = x.shape[-1]
    if config is None and M > 1 and tuning.row_invariant_active():
        config = {"ROWWISE": True}
    if config is None:
        name, key = _tuning_entry(M, n_out, x, group, bits, zero_points, bias, input_scale, norm_weight, residual, glu)
        config = tuning.get_config(name, key, tuning.detect_profile(x.device), _fits(M))
    rowwise = bool(config.get("ROWWISE"))
    if rowwise:  # every row as a one-row product runs it (same config, same code): equal bit for bit
        name, key = _tuning_entry(1, n_out, x, group, bits, zero_points, bias, input_scale, norm_weight, residual, glu)
        config = tuning.get_config(name, key, tuning.detect_profile(x.device), _fits(1))
    if config.get("library"):
        if rowwise:
            return by_row(lambda row, res: _library(row, qweight, scales, zero_points, bits, bias, input_scale,
                                                    norm_weight, eps, res, glu), x, residual, n_out)
        return _library(x, qweight, scales, zero_points, bits, bias, input_scale, norm_weight, eps, residual, glu)
    y = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype, device=x.device)
    if M == 0 or n_out == 0:
        return y
    x2 = _rows(x, K)
    words = _words(qweight)
    r2 = _rows(residual, n_out) if residual is not None else y.view(-1, n_out)
    # the kernel indexes these densely (a no-op for the contiguous tensors a model holds)
    scales, zero_points, bias, norm_weight, input_scale = (
        None if t is None else t.contiguous() for t in (scales, zero_points, bias, norm_weight, input_scale))
    block_n, block_k = int(config["BLOCK_N"]), int(config["BLOCK_K"])
    dot = bool(config.get("DOT"))
    if dot:  # tl.dot needs 16 rows of the tile and 16 units a code position
        block_n, block_k = max(16, block_n), max(block_k, 16 * _codes_per_unit(bits))
    elif M > ELEMENTWISE_ROWS and not rowwise:
        raise ValueError(f"gemv_wq: config {config} multiplies elementwise, for at most {ELEMENTWISE_ROWS} rows; "
                         f"x has {M} (use a DOT config)")
    else:  # a sub-block is at least one unit of codes
        block_k = max(block_k, _codes_per_unit(bits))
    sub, subs = _sub_block(block_k, group)
    if config.get("SPLIT_K", 1) > 1 and rowwise:
        raise ValueError(f"gemv_wq: config {config}: SPLIT_K is for DOT and elementwise tiles, not ROWWISE")
    per_split, splits = k_ranges(K, sub * subs, config)
    partials, sums = split_buffers(splits, M, n_out, glu, norm_weight is not None, x.device)
    pdl = pdl_enabled(x.device)
    n_blocks = qweight.shape[1]
    with device_guard(x.device):
        _gemv_wq_kernel[(triton.cdiv(n_out, block_n), M if rowwise else 1, splits)](
            x2, words, scales, zero_points if zero_points is not None else qweight,
            bias if bias is not None else x2, norm_weight if norm_weight is not None else x2,
            input_scale if input_scale is not None else x2, r2, y, partials, sums,
            1 if rowwise else M, n_out, K, n_blocks, zero_points.shape[1] if zero_points is not None else 0,
            words.shape[1], n_out, per_split,
            x2.stride(0), r2.stride(0), n_out,
            float(eps),
            BITS=bits,
            GROUP=group,
            HAS_ZP=zero_points is not None,
            HAS_BIAS=bias is not None,
            HAS_NORM=norm_weight is not None,
            HAS_XSCALE=input_scale is not None,
            HAS_RES=residual is not None,
            ACT=_ACTS[glu],
            DOT=dot,
            IEEE=x.dtype == torch.float32,
            EVEN=n_out % block_n == 0 and K % (sub * subs) == 0,
            SPLIT=splits > 1,
            BLOCK_M=MAX_ROWS if dot else 1 if rowwise else next_pow2(M),
            BLOCK_N=block_n,
            SUB=sub,
            SUBS=subs,
            STAGES=int(config.get("num_stages", 1)),
            PREFETCH=bool(config.get("prefetch")) and not dot,
            FLAT=bool(config.get("flat")) and not config.get("prefetch") and bits != 3
            and n_out % block_n == 0 and K % (sub * subs) == 0,
            XVEC=bool(config.get("xvec")) and not config.get("prefetch") and not dot and bits == 4
            and n_out % block_n == 0 and K % (sub * subs) == 0,
            PDL=pdl,
            **({"launch_pdl": True} if pdl else {}),
            **launch_opts(config),
        )
        if splits > 1:
            sum_splits(partials, sums, bias, r2 if residual is not None else None, y, K, eps, glu,
                       norm_weight is not None, pdl)
    return y


def gemv_wq(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
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
    """``x[..., K] @ dequantize(qweight, scales, zero_points, bits)^T`` for at most ``MAX_ROWS`` rows,
    with the folds of the module docstring.

    Returns a new tensor ``[..., N]`` (``[..., N // 2]`` with ``glu``) of x's dtype.
    ``config`` overrides the tuned one (``BLOCK_N``, ``BLOCK_K``, ``num_warps``,
    ``num_stages``, ``DOT``, or ``{"library": True}`` for the unfused ops).
    """
    M, n_out, group = _check(x, qweight, scales, zero_points, bits, bias, input_scale, norm_weight, residual, glu)
    return _launch(x, qweight, scales, zero_points, bits, bias, input_scale, norm_weight, eps, residual, glu,
                   M, n_out, group, config)


def tune_gemv_wq(x, qweight, scales, zero_points, bits, bias=None, input_scale=None, norm_weight=None, eps=1e-6,
                 residual=None, glu=None) -> dict:
    """Time the kernel's candidate configs and the unfused library path on these inputs; cache the winner.

    As ``triton_gemv.tune_gemv``: back to back from a CUDA graph, each call on the next
    of enough copies of the packed weight that it comes from memory, not L2.
    """
    M, n_out, group = _check(x, qweight, scales, zero_points, bits, bias, input_scale, norm_weight, residual, glu)
    name, key = _tuning_entry(M, n_out, x, group, bits, zero_points, bias, input_scale, norm_weight, residual, glu)
    profile = tuning.detect_profile(x.device)
    cands = [c for c in tuning.candidates(name, profile) if _worth_timing(M)(c)]
    hit = tuning.cached_config(name, key, profile)
    if hit is not None:  # no weight copies for a cache hit
        return hit
    # an int4 matrix is a quarter of its bf16 bytes: up to 64 copies (not triton_gemv's 8), and a
    # graph of as many calls, so that a 2 MB o_proj is read from memory as in a decode step
    nbytes = qweight.numel() + scales.numel() * scales.element_size()
    copies = max(1, min(64, -(-L2_SPILL_BYTES // max(1, nbytes))))
    packed = itertools.cycle([(qweight, scales)] + [(qweight.clone(), scales.clone()) for _ in range(copies - 1)]
                             if x.is_cuda else [(qweight, scales)])

    def run(cfg):
        q, s = next(packed)
        return _launch(x, q, s, zero_points, bits, bias, input_scale, norm_weight, eps, residual, glu,
                       M, n_out, group, cfg)

    bench = tuning.graph_bench_for(x)
    if bench is not None:
        bench = functools.partial(bench, calls=max(24, copies))
    return tuning.autotune(name, key, cands, run, profile, bench_fn=bench)


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in ``dtype`` that packed codes stand for: ``quantized_ops.dequantize(...).to(dtype)``,
    bit for bit, in one Triton kernel (CUDA tensors, or CPU tensors under Triton's interpreter)."""
    fn = "dequantize_weight"
    require_triton(fn)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 3:
        raise ValueError(f"{fn}: qweight must be a uint8 tensor [N, K / group_size, group_size * bits / 8], "
                         f"got {getattr(qweight, 'shape', type(qweight).__name__)}")
    K = qweight.shape[1] * (qweight.shape[2] * 8 // bits) if bits in SUPPORTED_BITS else 0
    N, group, n_blocks = _packed_shape(fn, qweight, scales, zero_points, bits, K)
    tensors = [("qweight", qweight), ("scales", scales)] + ([("zero_points", zero_points)] if zero_points is not None else [])
    check_devices(fn, _dequantize_kernel, tensors)
    y = torch.empty((N, K), dtype=dtype, device=qweight.device)
    if y.numel() == 0:
        return y
    words = _words(qweight)
    scales = scales.contiguous()
    zero_points = None if zero_points is None else zero_points.contiguous()
    block_n = DEQUANT_BLOCK["BLOCK_N"]
    sub, subs = _sub_block(DEQUANT_BLOCK["BLOCK_K"], group)
    with device_guard(qweight.device):
        _dequantize_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, sub * subs))](
            words, scales, zero_points if zero_points is not None else qweight, y,
            N, K, n_blocks, zero_points.shape[1] if zero_points is not None else 0, words.shape[1],
            BITS=bits, GROUP=group, HAS_ZP=zero_points is not None, BLOCK_N=block_n, SUB=sub, SUBS=subs,
            num_warps=DEQUANT_BLOCK["num_warps"],
        )
    return y


def linear_wq(x, qweight, scales, zero_points, bias, input_scale, bits) -> torch.Tensor:
    """``flashc.linear_wq`` for any number of rows: ``gemv_wq`` up to ``MAX_ROWS`` rows (decode),
    else ``dequantize_weight`` and a cuBLAS GEMM (prefill), ``x * input_scale`` first."""
    K = x.shape[-1]
    if (x.numel() // K if K else 0) <= MAX_ROWS:
        return gemv_wq(x, qweight, scales, zero_points, bits, bias, input_scale)
    w = dequantize_weight(qweight, scales, zero_points, bits, x.dtype)
    if input_scale is not None:
        x = x * input_scale.to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))

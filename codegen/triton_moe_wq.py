"""``flashc.moe_wq`` (a top-k SwiGLU MoE whose experts are 4- or 8-bit) as Triton grouped GEMMs
that read the packed expert weights directly.

Semantics: ``torch.ops.flashc.moe_wq`` (``reference_moe_wq``), i.e. ``flashc.moe`` with
``gate_up[E, 2F, H]`` and ``down[E, H, F]`` stored in MatMulNBits' packed layout
(flashc/quantized_ops.py: codes ``c``, a scale ``s`` and zero point ``zp`` per group of
``G`` input columns, ``w = (c - zp) * s``), and AWQ input scales multiplied into the
activation rows (``gate_up_input_scale[e]`` on x, ``down_input_scale[e]`` on h).

The scheme is codegen/triton_moe.py's, whose routing it shares (``_route_pairs``: the
padded pair table built on the device, no host synchronisation, CUDA-graph
capturable): kernel 1 multiplies each block of pairs of one expert by that expert's gate
and up rows and writes ``h = silu(gate) * up``; kernel 2 multiplies h by the expert's down
rows times the pair's routing weight into fp32 ``y``; ``out`` is a fixed-order sum of
``y``.  Only the routed experts' packed codes, scales and zero points are read, and the
codes are dequantized in registers, a K tile at a time, in pieces that lie in one group.

At decode the time is the routed experts' packed bytes, and an H200 has about four
instructions a 4-bit code to spend on them (128 FP32 lanes x 132 SMs x 1.98 GHz over
4.3 TB/s x 2 codes a byte).  ``(c - zp) * s`` before the FMA, or an int->float
conversion (``I2F``, 16 a clock per SM), would make the kernel compute-bound, so there
are two paths:

* elementwise (decode, ``BLOCK_M`` of 1 to 16 pairs): the codes are read as 32-bit
  words; code j of a word is masked in place (one ``LOP3``; codes past bit 20 in the word
  shifted right by 16 once) and the masked bits, read as a float, are the subnormal
  ``c * 2**(e_j - 149)``: exact with no conversion, and FMAs take subnormals at full rate.
  The activation of code j carries ``2**(X_EXP - e_j)``, so every product is
  ``c x 2**(X_EXP - 149)``, and each thread's chunk of 4 words (one group's) is summed in
  its own FMAs: ``acc += s * (2**(149 - X_EXP) sum c x - zp sum x)`` once a chunk.  Per
  code: one logic op and one FMA a pair; in all, for the first candidate at BLOCK_M 1
  (offline sm_90 compiles), ~3.6 SASS instructions a code for gate|up and ~4.4 for down
  at 4 bits, 3.7 and 4.0 at 8 bits (where a byte is one code: twice the budget);
* ``DOT`` (prefill, ``BLOCK_M`` >= 16): byte tiles dequantized to x's dtype, as the
  reference does (``c | 0x4B000000`` is the float ``2**23 + c``, minus ``2**23 + zp``,
  times s), and multiplied with ``tl.dot`` (tensor cores, fp32 accumulation).

Kernel 2 may split K (``SPLIT_K``): each split writes its own fp32 partial of ``y`` and
the final sum adds them in a fixed order, so more programs stream the down weights of a
decode step (its N = H is 3.5 times narrower than kernel 1's gate|up) with no atomics.
The routing weights stay fp32 (the op rounds them to x's dtype, which only moves away
from the truth).
"""

from __future__ import annotations

import itertools

import torch

from flashc.errors import UnsupportedOpError
from flashc.quantized_ops import SUPPORTED_BITS, moe_wq as _moe_wq_op, packed_zero_point_columns

from . import tuning
from ._triton_common import (
    HAS_TRITON,
    FLOAT_DTYPES,
    check_devices,
    check_tensor,
    device_guard,
    launch_opts,
    next_pow2,
    require_triton,
    triton,
    tl,
)
from .triton_gemv import L2_SPILL_BYTES
from .triton_moe import _route_kernel, _route_pairs

__all__ = ["moe_wq", "tune_moe_wq", "reference_moe_wq", "ELEMENTWISE_TOKENS"]

ELEMENTWISE_TOKENS = 16  # untuned, elementwise configs are chosen up to this many tokens, DOT ones beyond
# Elementwise tiles hold this many bytes of each weight a thread and stage at most: 8-bit codes at
# BLOCK_N 64, BLOCK_K 256 and 4 warps take 226 registers with 1 stage and spill with 2 (sm_90).
ELEMENTWISE_THREAD_BYTES = 128
_ELEMENTWISE_MAX_M = 16  # the elementwise path keeps a [BLOCK_N, NV, VW] accumulator a pair
# The elementwise path scales activations by 2**(X_EXP - e_j) so that their products with codes read
# as subnormals (c * 2**(e_j - 149)) are normal floats: exact for |x * input_scale| in [2**-65, 2**40).
X_EXP = 88
_CHUNK_WORDS = 4  # the elementwise path's chunk: one 128-bit load a thread, summed in the thread's FMAs
KERNEL_BITS = (4, 8)  # bit widths the kernels read (2- and 3-bit experts: flashc.moe_wq's reference only)


def reference_moe_wq(x, router_logits, gate_up_qweight, gate_up_scales, gate_up_zero_points, gate_up_input_scale,
                     down_qweight, down_scales, down_zero_points, down_input_scale, top_k, normalize, bits):
    """``torch.ops.flashc.moe_wq``'s reference implementation, in x's dtype.

    It dequantizes through float32 (``(q - zp) * s`` rounded once, a relative 2**-24) and
    then computes in x's dtype, so float64 x with scales that are bf16/fp16/fp32 values
    gives the tests' truth to far below their tolerances.
    """
    return _moe_wq_op(x, router_logits, gate_up_qweight, gate_up_scales, gate_up_zero_points, gate_up_input_scale,
                      down_qweight, down_scales, down_zero_points, down_input_scale, top_k, normalize, bits)


# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------
if HAS_TRITON:
    _X_EXP = tl.constexpr(X_EXP)
    _UNSCALE = tl.constexpr(2.0 ** (149 - X_EXP))

    @triton.jit
    def _zero_points(z_ptrs, g, stride_zg, mask, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
        """Zero points (fp32) of groups g for the rows of z_ptrs; same shape as z_ptrs + g."""
        if HAS_ZP:
            if BITS == 4:  # two groups a byte, the even group in the low nibble
                zp = tl.load(z_ptrs + (g // 2) * stride_zg, mask=mask, other=0).to(tl.int32)
                zp = (zp >> ((g % 2) * 4)) & 0xF
            else:
                zp = tl.load(z_ptrs + g * stride_zg, mask=mask, other=0)
            return zp.to(tl.float32)
        else:  # symmetric: the grid's midpoint
            return tl.zeros((z_ptrs + g).shape, tl.float32) + (1 << (BITS - 1))

    @triton.jit
    def _dequantized(q, zp, scale, PHASE: tl.constexpr, BITS: tl.constexpr):
        """(c - zp) * s of code PHASE of each byte of q [SPAN, BLOCK_N] (int32), as fp32.

        ``c | 0x4B000000`` is the bit pattern of the float ``2**23 + c``, so subtracting
        ``2**23 + zp`` gives ``c - zp`` exactly without an int->float conversion.
        """
        if BITS == 4:
            c = (q >> (4 * PHASE)) & 0xF
        else:
            c = q
        return ((c | 0x4B000000).to(tl.float32, bitcast=True) - (zp + 8388608.0)[None, :]) * scale[None, :]

    @triton.jit
    def _dot_subspan(acc, x0, x1, q_ptrs, s_ptrs, z_ptrs, kb, g, stride_sg, stride_zg, q_mask, p_mask,
                     BITS: tl.constexpr, HAS_ZP: tl.constexpr, IEEE: tl.constexpr, EVEN: tl.constexpr):
        """acc [BLOCK_M, BLOCK_N] += x [BLOCK_M, sub-span] @ W[sub-span, BLOCK_N], the sub-span in one group:
        W dequantized to x's dtype (as the reference does), multiplied on the tensor cores.
        x0 / x1: the activation columns of the low / high nibbles (x1 unused at 8 bits); p_mask
        [BLOCK_N]: the columns (of a sub-span inside K) whose scale and zero point exist."""
        if EVEN:
            q = tl.load(q_ptrs + kb).to(tl.int32)
        else:
            q = tl.load(q_ptrs + kb, mask=q_mask, other=0).to(tl.int32)
        scale = tl.load(s_ptrs + g * stride_sg, mask=p_mask, other=0.0).to(tl.float32)
        zp = _zero_points(z_ptrs, g, stride_zg, p_mask, BITS, HAS_ZP)
        w = _dequantized(q, zp, scale, 0, BITS).to(x0.dtype)
        if IEEE:
            acc = tl.dot(x0, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x0, w, acc)
        if BITS == 4:
            w = _dequantized(q, zp, scale, 1, BITS).to(x1.dtype)
            if IEEE:
                acc = tl.dot(x1, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x1, w, acc)
        return acc

    @triton.jit
    def _dot_loop(A, QW, SCALES, ZP, IN_SCALE, a_rows, row_ok, offs_n, n_ok, e, kb_start, kb_end, group_bytes,
                  up_rows, stride_am, stride_ak, stride_qe, stride_qn, stride_se, stride_sn, stride_sg,
                  stride_ze, stride_zn, stride_zg, stride_ie, stride_ik,
                  BITS: tl.constexpr, PACK: tl.constexpr, HAS_ZP: tl.constexpr, HAS_IN_SCALE: tl.constexpr,
                  SWIGLU: tl.constexpr, IEEE: tl.constexpr, EVEN: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPAN: tl.constexpr, NSUB: tl.constexpr):
        """(acc, acc_up) [BLOCK_M, BLOCK_N] over K bytes [kb_start, kb_end): tiles of NSUB sub-spans of
        SPAN bytes, each in one group; weight tiles loaded transposed, [SPAN, BLOCK_N]."""
        offs_b = tl.arange(0, SPAN)
        offs_k = tl.arange(0, SPAN * PACK)  # the sub-span's activation columns
        n64 = offs_n.to(tl.int64)
        q_ptrs = QW + e * stride_qe + n64[None, :] * stride_qn + offs_b[:, None]
        s_ptrs = SCALES + e * stride_se + n64 * stride_sn
        z_ptrs = ZP + e * stride_ze + n64 * stride_zn
        a_ptrs = A + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        i_ptrs = IN_SCALE + e * stride_ie + offs_k * stride_ik
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb0 in range(kb_start, kb_end, SPAN * NSUB):
            for j in tl.static_range(NSUB):
                kb = kb0 + j * SPAN
                g = kb // group_bytes
                if EVEN:
                    a_mask = row_ok[:, None]
                    q_mask = n_ok[None, :]  # unused: EVEN tiles load unmasked
                    p_mask = n_ok
                else:
                    k_ok = offs_k < (kb_end - kb) * PACK  # a sub-span is all in or all out
                    a_mask = row_ok[:, None] & k_ok[None, :]
                    q_mask = (offs_b < kb_end - kb)[:, None] & n_ok[None, :]
                    # past K a group index reaches other rows' scales, or past the tensor: garbage,
                    # NaN perhaps, and NaN * 0 is no 0
                    p_mask = n_ok & (offs_n * 0 + kb < kb_end)
                x = tl.load(a_ptrs + kb * PACK * stride_ak, mask=a_mask, other=0.0)
                if HAS_IN_SCALE:  # AWQ's 1/s on the activation columns, rounded to x's dtype like the reference
                    if EVEN:
                        in_scale = tl.load(i_ptrs + kb * PACK * stride_ik)
                    else:
                        in_scale = tl.load(i_ptrs + kb * PACK * stride_ik, mask=k_ok, other=0.0)
                    x = (x.to(tl.float32) * in_scale.to(tl.float32)[None, :]).to(A.dtype.element_ty)
                if PACK == 2:  # columns 2j (low nibbles) and 2j + 1 (high nibbles)
                    x0, x1 = tl.split(tl.reshape(x, [BLOCK_M, SPAN, 2]))
                else:
                    x0 = x
                    x1 = x
                acc = _dot_subspan(acc, x0, x1, q_ptrs, s_ptrs, z_ptrs, kb, g, stride_sg, stride_zg, q_mask, p_mask,
                                   BITS, HAS_ZP, IEEE, EVEN)
                if SWIGLU:
                    acc_up = _dot_subspan(acc_up, x0, x1, q_ptrs + up_rows * stride_qn, s_ptrs + up_rows * stride_sn,
                                          z_ptrs + up_rows * stride_zn, kb, g, stride_sg, stride_zg, q_mask, p_mask,
                                          BITS, HAS_ZP, IEEE, EVEN)
        return acc, acc_up

    @triton.jit
    def _code(words, J: tl.constexpr, BITS: tl.constexpr):
        """Code J of every word (bits J * BITS and up), masked in place and read as a float: the
        subnormal c * 2**(e_J - 149), exact with no conversion (FMAs take subnormals at full rate).

        Codes reaching past bit 20 are masked in the word shifted right by 16 (one shift a
        word, shared by them), so a mask stays clear of float32's exponent (bit 23 up).
        """
        if J * BITS + BITS > 20:
            return ((words >> 16) & (((1 << BITS) - 1) << (J * BITS - 16))).to(tl.float32, bitcast=True)
        else:
            return (words & (((1 << BITS) - 1) << (J * BITS))).to(tl.float32, bitcast=True)

    @triton.jit
    def _chunk_factors(s_ptrs, z_ptrs, g, stride_sg, stride_zg, p_mask, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
        """Per chunk (one group's) [BLOCK_N, NV]: (s * 2**(149 - X_EXP), s * zp)."""
        scale = tl.load(s_ptrs + g[None, :] * stride_sg, mask=p_mask, other=0.0).to(tl.float32)
        zp = _zero_points(z_ptrs, g[None, :], stride_zg, p_mask, BITS, HAS_ZP)
        return scale * _UNSCALE, scale * zp

    @triton.jit
    def _elementwise_loop(A, QW, SCALES, ZP, IN_SCALE, pair_ptr, num_pairs, a_row_div, offs_n, n_ok, e, kw_start,
                          kw_end, group_words, up_rows, stride_am, stride_ak, stride_qe, stride_qn, stride_se,
                          stride_sn, stride_sg, stride_ze, stride_zn, stride_zg, stride_ie, stride_ik,
                          BITS: tl.constexpr, CODES: tl.constexpr, HAS_ZP: tl.constexpr,
                          HAS_IN_SCALE: tl.constexpr, SWIGLU: tl.constexpr, EVEN: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VW: tl.constexpr, NV: tl.constexpr,
                          STAGES: tl.constexpr):
        """(acc, acc_up) [BLOCK_M, BLOCK_N] over the 32-bit words [kw_start, kw_end) of QW's rows: tiles of
        NV chunks of VW words, each chunk in one group, CODES codes a word.

        Every tensor of the loop keeps the layout of the [BLOCK_N, NV, VW] word tile (a thread
        holds a chunk; the activations of code J, columns CODES * word + J, load strided to
        match) and each pair of the block has its own accumulator: a code costs one logic op
        and one FMA a pair, s * (sum c x - zp sum x) is applied once a chunk, and the chunks
        are summed after the loop.
        """
        offs_v = tl.arange(0, NV)
        word = offs_v[:, None] * VW + tl.arange(0, VW)[None, :]  # [NV, VW]: word of the tile
        n64 = offs_n.to(tl.int64)
        q_ptrs = QW + e * stride_qe + n64[:, None, None] * stride_qn + word[None, :, :]
        s_ptrs = SCALES + e * stride_se + n64[:, None] * stride_sn
        z_ptrs = ZP + e * stride_ze + n64[:, None] * stride_zn
        x_ptrs = A + word * CODES * stride_ak
        i_ptrs = IN_SCALE + e * stride_ie + word * CODES * stride_ik
        x_rows = ()  # per pair of the block: its activation row, and whether it is a pair (not padding)
        x_oks = ()
        for m in tl.static_range(BLOCK_M):
            pair = tl.load(pair_ptr + m)
            x_rows = x_rows + (x_ptrs + (pair // a_row_div).to(tl.int64) * stride_am,)
            x_oks = x_oks + (offs_v * 0 + pair < num_pairs,)  # [NV]: the interpreter mishandles a scalar mask
        accs = (tl.zeros([BLOCK_N, NV], dtype=tl.float32),) * BLOCK_M
        accs_up = accs
        # STAGES > 1: the word loads run that many iterations ahead (cp.async into shared memory);
        # without a tl.dot in the loop Triton pipelines only a loop that asks for it
        for kw0 in tl.range(kw_start, kw_end, VW * NV, num_stages=STAGES):
            kwv = kw0 + offs_v * VW
            g = kwv // group_words
            v_ok = kwv < kw_end  # a chunk is all in or all out
            p_mask = n_ok[:, None] & v_ok[None, :]
            if EVEN:
                words = tl.load(q_ptrs + kw0)
                if SWIGLU:
                    words_up = tl.load(q_ptrs + kw0 + up_rows * stride_qn)
            else:
                q_mask = n_ok[:, None, None] & v_ok[None, :, None]
                words = tl.load(q_ptrs + kw0, mask=q_mask, other=0)
                if SWIGLU:
                    words_up = tl.load(q_ptrs + kw0 + up_rows * stride_qn, mask=q_mask, other=0)
            a, b = _chunk_factors(s_ptrs, z_ptrs, g, stride_sg, stride_zg, p_mask, BITS, HAS_ZP)
            if SWIGLU:
                a_up, b_up = _chunk_factors(s_ptrs + up_rows * stride_sn, z_ptrs + up_rows * stride_zn, g,
                                            stride_sg, stride_zg, p_mask, BITS, HAS_ZP)
            parts = (tl.zeros([BLOCK_N, NV, VW], dtype=tl.float32),) * BLOCK_M
            parts_up = parts
            x_sums = (tl.zeros([NV, VW], dtype=tl.float32),) * BLOCK_M
            for j in tl.static_range(CODES):
                col = kw0 * CODES + j  # column of code j of the tile's first word
                code = _code(words, j, BITS)
                if SWIGLU:
                    code_up = _code(words_up, j, BITS)
                if HAS_IN_SCALE:  # AWQ's 1/s on the activation columns
                    f = tl.load(i_ptrs + col * stride_ik, mask=v_ok[:, None], other=0.0).to(tl.float32)
                new_parts = ()
                new_parts_up = ()
                new_x_sums = ()
                for m in tl.static_range(BLOCK_M):
                    x = tl.load(x_rows[m] + col * stride_ak, mask=(v_ok & x_oks[m])[:, None], other=0.0).to(tl.float32)
                    if HAS_IN_SCALE:
                        x = x * f
                    new_x_sums = new_x_sums + (x_sums[m] + x,)
                    x = (x * 2.0 ** (_X_EXP - j * BITS + 16 * (j * BITS + BITS > 20)))[None, :, :]  # c x 2**(X_EXP - 149)
                    new_parts = new_parts + (parts[m] + code * x,)
                    if SWIGLU:
                        new_parts_up = new_parts_up + (parts_up[m] + code_up * x,)
                parts = new_parts
                parts_up = new_parts_up
                x_sums = new_x_sums
            new_accs = ()
            new_accs_up = ()
            for m in tl.static_range(BLOCK_M):
                x_sum = tl.sum(x_sums[m], axis=1)[None, :]
                new_accs = new_accs + (accs[m] + tl.sum(parts[m], axis=2) * a - b * x_sum,)
                if SWIGLU:
                    new_accs_up = new_accs_up + (accs_up[m] + tl.sum(parts_up[m], axis=2) * a_up - b_up * x_sum,)
            accs = new_accs
            if SWIGLU:
                accs_up = new_accs_up
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for m in tl.static_range(BLOCK_M):
            pick = (tl.arange(0, BLOCK_M) == m)[:, None]
            acc = tl.where(pick, tl.sum(accs[m], axis=1)[None, :], acc)
            if SWIGLU:
                acc_up = tl.where(pick, tl.sum(accs_up[m], axis=1)[None, :], acc_up)
        return acc, acc_up

    @triton.jit
    def _moe_wq_gemm_kernel(
        A, QW, SCALES, ZP, IN_SCALE, OUT, ROWS, BLOCK_EXPERT, ROUTE_W,
        num_pairs, num_experts, N, KU, group_units, split_ku, a_row_div, up_rows,
        stride_am, stride_ak,
        stride_qe, stride_qn,
        stride_se, stride_sn, stride_sg,
        stride_ze, stride_zn, stride_zg,
        stride_ie, stride_ik,
        stride_os, stride_om, stride_on,
        BITS: tl.constexpr,
        PACK: tl.constexpr,
        HAS_ZP: tl.constexpr,
        HAS_IN_SCALE: tl.constexpr,
        SWIGLU: tl.constexpr,
        DOT: tl.constexpr,
        IEEE: tl.constexpr,
        EVEN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPAN: tl.constexpr,
        NSUB: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        """Program (block b, column tile, K split): OUT[split, p, cols] for the pairs p of block b.

        The A row of pair p is p // a_row_div; QW [E, N, KU units] (each row's units contiguous:
        DOT bytes, elementwise 32-bit words; PACK codes a unit), SCALES / ZP [E, N, groups]; a K
        tile is NSUB pieces of SPAN units (DOT: sub-spans, elementwise: chunks), each inside one
        group of ``group_units``.  SWIGLU: rows ``up_rows`` further are the up projection, the
        result is silu(gate) * up; else it is scaled by ROUTE_W[p].
        """
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        expert = tl.load(BLOCK_EXPERT + pid_b)
        if expert >= num_experts:  # past the last padded group: nothing to do, nothing read
            return
        pairs = tl.load(ROWS + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs
        a_rows = tl.where(row_ok, pairs // a_row_div, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        e = expert.to(tl.int64)
        ku_start = pid_s * split_ku
        ku_end = tl.minimum(ku_start + split_ku, KU)
        if DOT:
            acc, acc_up = _dot_loop(
                A, QW, SCALES, ZP, IN_SCALE, a_rows, row_ok, offs_n, n_ok, e, ku_start, ku_end, group_units,
                up_rows, stride_am, stride_ak, stride_qe, stride_qn, stride_se, stride_sn, stride_sg,
                stride_ze, stride_zn, stride_zg, stride_ie, stride_ik,
                BITS, PACK, HAS_ZP, HAS_IN_SCALE, SWIGLU, IEEE, EVEN, BLOCK_M, BLOCK_N, SPAN, NSUB)
        else:
            acc, acc_up = _elementwise_loop(
                A, QW, SCALES, ZP, IN_SCALE, ROWS + pid_b * BLOCK_M, num_pairs, a_row_div, offs_n, n_ok, e,
                ku_start, ku_end, group_units,
                up_rows, stride_am, stride_ak, stride_qe, stride_qn, stride_se, stride_sn, stride_sg,
                stride_ze, stride_zn, stride_zg, stride_ie, stride_ik,
                BITS, PACK, HAS_ZP, HAS_IN_SCALE, SWIGLU, EVEN, BLOCK_M, BLOCK_N, SPAN, NSUB, STAGES)

        if SWIGLU:
            # silu(g) = g * sigmoid(g); the exponent is capped so exp never overflows.
            result = acc / (1.0 + tl.exp(tl.minimum(-acc, 80.0))) * acc_up
        else:
            route_w = tl.load(ROUTE_W + pairs, mask=row_ok, other=0.0).to(tl.float32)
            result = acc * route_w[:, None]
        out_ptrs = OUT + pid_s * stride_os + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, result.to(OUT.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    tuning.register_kernel_source("moe_wq", _moe_wq_gemm_kernel, _dot_loop, _dot_subspan, _elementwise_loop,
                                  _code, _chunk_factors, _dequantized, _zero_points, _route_kernel)


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------
_FN = "moe_wq"


def _check_packed(name: str, qweight, scales, zero_points, input_scale, E: int, N: int, K: int, bits: int) -> int:
    """One packed expert weight [E, N, K]; returns its group size."""
    fn = _FN
    check_tensor(fn, f"{name}_qweight", qweight, ndim=4, dtypes=(torch.uint8,))
    e, n, n_blocks, group_bytes = qweight.shape
    if (e, n) != (E, N) or n_blocks * group_bytes * 8 != K * bits:
        raise ValueError(
            f"{fn}: {name}_qweight must be [E={E}, {N}, K / group_size, group_size * {bits} / 8] for K={K} input "
            f"columns, got {tuple(qweight.shape)}"
        )
    group = group_bytes * 8 // bits
    check_tensor(fn, f"{name}_scales", scales, ndim=3)
    if tuple(scales.shape) != (E, N, n_blocks):
        raise ValueError(f"{fn}: {name}_scales must be [E={E}, {N}, {n_blocks}] (one per group), got {tuple(scales.shape)}")
    if zero_points is not None:
        check_tensor(fn, f"{name}_zero_points", zero_points, ndim=3, dtypes=(torch.uint8,))
        cols = packed_zero_point_columns(n_blocks, bits)
        if tuple(zero_points.shape) != (E, N, cols):
            raise ValueError(
                f"{fn}: {name}_zero_points must be [E={E}, {N}, {cols}] ({bits}-bit, {n_blocks} groups), "
                f"got {tuple(zero_points.shape)}"
            )
    if input_scale is not None:
        check_tensor(fn, f"{name}_input_scale", input_scale, ndim=2)
        if tuple(input_scale.shape) != (E, K):
            raise ValueError(f"{fn}: {name}_input_scale must be [E={E}, {K}], got {tuple(input_scale.shape)}")
    return group


def _check_moe_wq(x, router_logits, gate_up_qweight, gate_up_scales, gate_up_zero_points, gate_up_input_scale,
                  down_qweight, down_scales, down_zero_points, down_input_scale, top_k, bits) -> tuple[int, int, int]:
    """Raise on bad arguments; returns (F, gate_up group size, down group size)."""
    fn = _FN
    require_triton(fn)
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{fn}: bits must be one of {KERNEL_BITS}, got {bits!r}")
    if bits not in KERNEL_BITS:
        raise UnsupportedOpError(
            f"{fn}: {bits}-bit experts have no kernel here (the dot path reads nibble or byte codes: "
            f"{' and '.join(map(str, KERNEL_BITS))} bits); quantize the experts to 4 or 8 bits (a mixed budget: "
            "QuantConfig(candidate_bits=(4, 8)), or quantize_experts=False), or compile for cpu")
    check_tensor(fn, "x", x, ndim=2)
    check_tensor(fn, "router_logits", router_logits, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor(fn, "gate_up_qweight", gate_up_qweight, ndim=4, dtypes=(torch.uint8,))
    check_tensor(fn, "down_qweight", down_qweight, ndim=4, dtypes=(torch.uint8,))
    T, H = x.shape
    E = router_logits.shape[1]
    if router_logits.shape[0] != T:
        raise ValueError(f"{fn}: router_logits must be [T={T}, E], got {tuple(router_logits.shape)}")
    Fd = down_qweight.shape[2] * down_qweight.shape[3] * 8 // bits
    if gate_up_qweight.shape[1] != 2 * Fd:
        raise ValueError(
            f"{fn}: gate_up_qweight must have 2F={2 * Fd} rows (F={Fd} from down_qweight's packed columns), "
            f"got shape {tuple(gate_up_qweight.shape)}"
        )
    gate_up_group = _check_packed("gate_up", gate_up_qweight, gate_up_scales, gate_up_zero_points, gate_up_input_scale,
                                  E, 2 * Fd, H, bits)
    down_group = _check_packed("down", down_qweight, down_scales, down_zero_points, down_input_scale, E, H, Fd, bits)
    if gate_up_group % (32 // bits) or down_group % (32 // bits):
        raise ValueError(f"{fn}: {bits}-bit groups must be whole 32-bit words of codes, a multiple of {32 // bits} "
                         f"columns; got group sizes {gate_up_group} (gate_up) and {down_group} (down)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"{fn}: top_k must be an int in [1, E={E}], got {top_k!r}")
    tensors = [("x", x), ("router_logits", router_logits), ("gate_up_qweight", gate_up_qweight),
               ("gate_up_scales", gate_up_scales), ("down_qweight", down_qweight), ("down_scales", down_scales)]
    for name, t in (("gate_up_zero_points", gate_up_zero_points), ("gate_up_input_scale", gate_up_input_scale),
                    ("down_zero_points", down_zero_points), ("down_input_scale", down_input_scale)):
        if t is not None:
            tensors.append((name, t))
    check_devices(fn, _moe_wq_gemm_kernel, tensors)
    return Fd, gate_up_group, down_group


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------
def _check_config(config: dict) -> None:
    bm, bn, bk = (int(config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if min(bm, bn, bk) < 1 or any(v & (v - 1) for v in (bm, bn, bk)) or int(config.get("SPLIT_K", 1)) < 1:
        raise ValueError(f"{_FN}: BLOCK_M, BLOCK_N and BLOCK_K must be powers of two and SPLIT_K >= 1, got config {config}")
    if config.get("DOT"):
        if min(bm, bn) < 16 or bk < 32:
            raise ValueError(f"{_FN}: a DOT config needs BLOCK_M, BLOCK_N >= 16 and BLOCK_K >= 32 (tl.dot), got {config}")
    elif bm > _ELEMENTWISE_MAX_M:
        raise ValueError(f"{_FN}: config {config} multiplies elementwise, for BLOCK_M <= {_ELEMENTWISE_MAX_M} "
                         "(use a DOT config)")


def _moe_wq_key(x, E: int, Fd: int, top_k: int, bits: int, group: int, asym: bool) -> dict:
    T, H = x.shape
    return {"T": T, "E": E, "H": H, "F": Fd, "top_k": top_k, "bits": bits, "group": group, "asym": asym,
            "dtype": str(x.dtype).replace("torch.", "")}


def _moe_wq_suits(T: int, top_k: int, E: int, bits: int, dtype: torch.dtype, profile: str):
    """Config filter: elementwise configs for decode batches, with at most ELEMENTWISE_THREAD_BYTES of
    each weight tile a thread and stage; DOT tiles no taller than an expert's pairs (at least 16),
    pipelined in shared memory (an upper bound, as in triton_moe)."""
    elem = torch.empty((), dtype=dtype).element_size()
    smem = tuning.hardware(profile)["smem_per_block"]
    pairs_per_expert = next_pow2(-(-T * top_k // max(1, E)))

    def suits(cfg: dict) -> bool:
        bm, bn, bk = cfg.get("BLOCK_M", 16), cfg.get("BLOCK_N", 64), cfg.get("BLOCK_K", 64)
        stages = max(1, cfg.get("num_stages", 2))
        if not cfg.get("DOT"):
            thread_bytes = bn * bk * bits // 8 // (32 * cfg.get("num_warps", 4)) * stages
            return T <= ELEMENTWISE_TOKENS and thread_bytes <= ELEMENTWISE_THREAD_BYTES
        return bm <= max(16, pairs_per_expert) and stages * (bm * bk + 2 * bk * bn) * elem <= smem

    return suits


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _packed_rows(qweight: torch.Tensor) -> torch.Tensor:
    """qweight with each row's bytes contiguous and word-aligned (the kernel walks a row as one run
    of K bytes, or of 32-bit words)."""
    if qweight.stride(3) == 1 and qweight.stride(2) == qweight.shape[3] and qweight.storage_offset() % 4 == 0:
        return qweight
    return qweight.clone(memory_format=torch.contiguous_format)


def _launch_gemm(a, packed, out, rows, block_expert, route_w, num_pairs, num_experts, a_row_div, swiglu, bits, config):
    """One grouped GEMM over the pair table: out[split, p] = epilogue(a[p // a_row_div] @ dequant(packed[e])^T)."""
    qweight, scales, zero_points, in_scale = packed
    n = out.shape[-1]
    dot, block_n, span, nsub = _tiling(config, qweight, n, bits)
    unit = 1 if dot else 4  # DOT walks K in bytes, the elementwise path in 32-bit words
    qweight = _packed_rows(qweight)
    if not dot:
        qweight = qweight.view(torch.int32)
    group_units = qweight.shape[3]
    KU = qweight.shape[2] * group_units
    block_ku = span * nsub
    split_ku, splits = _k_splits(KU, block_ku, 1 if swiglu else int(config.get("SPLIT_K", 1)))
    assert splits == out.shape[0], (splits, out.shape)
    grid = (block_expert.numel(), triton.cdiv(n, block_n), splits)
    zp = zero_points if zero_points is not None else scales
    isc = in_scale if in_scale is not None else scales
    _moe_wq_gemm_kernel[grid](
        a, qweight, scales, zp, isc, out, rows, block_expert, route_w,
        num_pairs, num_experts, n, KU, group_units, split_ku, a_row_div, n if swiglu else 0,
        a.stride(0), a.stride(1),
        qweight.stride(0), qweight.stride(1),
        *scales.stride(),
        *(zero_points.stride() if zero_points is not None else (0, 0, 0)),
        *(in_scale.stride() if in_scale is not None else (0, 0)),
        out.stride(0), out.stride(1), out.stride(2),
        BITS=bits,
        PACK=unit * 8 // bits,
        HAS_ZP=zero_points is not None,
        HAS_IN_SCALE=in_scale is not None,
        SWIGLU=swiglu,
        DOT=dot,
        IEEE=a.dtype == torch.float32,
        EVEN=n % block_n == 0 and KU % block_ku == 0,
        BLOCK_M=int(config["BLOCK_M"]),
        BLOCK_N=block_n,
        SPAN=span,
        NSUB=nsub,
        STAGES=int(config.get("num_stages", 1)),
        **launch_opts(config),
    )


def _tiling(config: dict, qweight: torch.Tensor, n: int, bits: int) -> tuple[bool, int, int, int]:
    """(DOT, BLOCK_N, SPAN, NSUB) of a launch: a K tile is NSUB pieces of SPAN units (bytes for DOT,
    32-bit words elementwise), each inside one quantization group.

    Groups of a power-of-two size hold whole pieces or are them; a per-channel group
    (group = K, any size) is walked in pieces of its largest power-of-two divisor. DOT
    needs sub-spans of 16 bytes or more (tl.dot's K); narrower ones multiply elementwise.
    """
    dot = bool(config.get("DOT"))
    group_bytes = qweight.shape[3]
    KB = qweight.shape[2] * group_bytes
    block_kb = max(4, min(int(config["BLOCK_K"]) * bits // 8, next_pow2(KB)))
    lowbit = group_bytes & -group_bytes
    span = min(lowbit, block_kb)
    nsub = block_kb // span if lowbit == group_bytes else 1
    if dot and span < 16:
        dot = False
    if not dot:  # chunks of at most 4 words, one 128-bit load a thread
        block_words = span * nsub // 4
        span = min(span // 4, _CHUNK_WORDS)
        nsub = block_words // span
    block_n = min(int(config["BLOCK_N"]), max(16 if dot else 1, next_pow2(n)))
    return dot, block_n, span, nsub


def _k_splits(KU: int, block_ku: int, requested: int) -> tuple[int, int]:
    """(units a split, splits): K cut into ``requested`` runs of whole tiles, fewer if K has fewer tiles."""
    split_ku = triton.cdiv(triton.cdiv(KU, max(1, requested)), block_ku) * block_ku
    return split_ku, triton.cdiv(KU, split_ku)


def _down_splits(config: dict, down_qweight: torch.Tensor, H: int, bits: int) -> int:
    """How many K splits (fp32 partials of y) the down GEMM writes."""
    dot, _, span, nsub = _tiling(config, down_qweight, H, bits)
    KU = down_qweight.shape[2] * down_qweight.shape[3] // (1 if dot else 4)
    return _k_splits(KU, span * nsub, int(config.get("SPLIT_K", 1)))[1]


def _launch_moe_wq(x, router_logits, gate_up, down, top_k, normalize, bits, Fd, key, config) -> torch.Tensor:
    """gate_up / down: (qweight, scales, zero_points, input_scale) of each expert weight."""
    T, H = x.shape
    E = router_logits.shape[1]
    if T == 0 or H == 0 or Fd == 0:
        return torch.zeros_like(x)
    if config is None:
        profile = tuning.detect_profile(x.device)
        config = tuning.get_config("moe_wq", key, profile, _moe_wq_suits(T, top_k, E, bits, x.dtype, profile))
    _check_config(config)
    P = T * top_k
    splits = _down_splits(config, down[0], H, bits)
    h = torch.empty((1, P, Fd), dtype=x.dtype, device=x.device)
    y = torch.empty((splits, P, H), dtype=torch.float32, device=x.device)
    with device_guard(x.device):
        # fp32 routing weights: the op rounds them to x's dtype, which only moves away from the truth
        route_w, rows, block_expert = _route_pairs(router_logits, top_k, normalize, torch.float32,
                                                   int(config["BLOCK_M"]))
        _launch_gemm(x, gate_up, h, rows, block_expert, route_w, P, E, top_k, True, bits, config)
        _launch_gemm(h[0], down, y, rows, block_expert, route_w, P, E, 1, False, bits, config)
    return y.view(splits, T, top_k, H).sum((0, 2)).to(x.dtype)


def moe_wq(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up_qweight: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_zero_points: torch.Tensor | None,
    gate_up_input_scale: torch.Tensor | None,
    down_qweight: torch.Tensor,
    down_scales: torch.Tensor,
    down_zero_points: torch.Tensor | None,
    down_input_scale: torch.Tensor | None,
    top_k: int,
    normalize: bool,
    bits: int,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """``torch.ops.flashc.moe_wq`` with grouped Triton GEMMs over the routed experts' packed weights.

    Arguments as the op's (flashc/quantized_ops.py): ``x[T, H]`` (bf16, fp16 or fp32),
    ``router_logits[T, E]``, packed ``gate_up[E, 2F, H]`` and ``down[E, H, F]`` with their
    scales, zero points (None: symmetric) and input scales (None: no AWQ).  Returns a new
    ``[T, H]`` tensor of x's dtype; no host synchronisation (CUDA-graph capturable).
    ``config`` overrides the tuned one (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` in codes,
    ``num_warps``, ``num_stages``, ``DOT``, ``SPLIT_K`` of the down GEMM).
    """
    Fd, gate_up_group, _ = _check_moe_wq(
        x, router_logits, gate_up_qweight, gate_up_scales, gate_up_zero_points, gate_up_input_scale,
        down_qweight, down_scales, down_zero_points, down_input_scale, top_k, bits)
    key = _moe_wq_key(x, router_logits.shape[1], Fd, top_k, bits, gate_up_group, gate_up_zero_points is not None)
    return _launch_moe_wq(
        x, router_logits, (gate_up_qweight, gate_up_scales, gate_up_zero_points, gate_up_input_scale),
        (down_qweight, down_scales, down_zero_points, down_input_scale), top_k, bool(normalize), bits, Fd, key, config)


def tune_moe_wq(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up_qweight: torch.Tensor,
    gate_up_scales: torch.Tensor,
    gate_up_zero_points: torch.Tensor | None,
    gate_up_input_scale: torch.Tensor | None,
    down_qweight: torch.Tensor,
    down_scales: torch.Tensor,
    down_zero_points: torch.Tensor | None,
    down_input_scale: torch.Tensor | None,
    top_k: int,
    normalize: bool,
    bits: int,
) -> dict:
    """Time the candidate configs on these inputs (as a decode step runs them: from a CUDA graph,
    the expert weights cycled through enough copies to come from memory, not L2); cache the winner."""
    Fd, gate_up_group, _ = _check_moe_wq(
        x, router_logits, gate_up_qweight, gate_up_scales, gate_up_zero_points, gate_up_input_scale,
        down_qweight, down_scales, down_zero_points, down_input_scale, top_k, bits)
    T, E = x.shape[0], router_logits.shape[1]
    key = _moe_wq_key(x, E, Fd, top_k, bits, gate_up_group, gate_up_zero_points is not None)
    profile = tuning.detect_profile(x.device)
    suits = _moe_wq_suits(T, top_k, E, bits, x.dtype, profile)
    cands = [c for c in tuning.candidates("moe_wq", profile) if suits(c)] or tuning.candidates("moe_wq", profile)
    hit = tuning.cached_config("moe_wq", key, profile)
    if hit is not None:  # no weight copies for a cache hit
        return hit
    gate_up = (gate_up_qweight, gate_up_scales, gate_up_zero_points, gate_up_input_scale)
    down = (down_qweight, down_scales, down_zero_points, down_input_scale)
    weights = [gate_up, down]
    nbytes = sum(t.numel() * t.element_size() for part in weights for t in part if t is not None)
    routed = nbytes * min(E, T * top_k) // E  # what a call reads, at most
    copies = max(1, min(8, -(-L2_SPILL_BYTES // max(1, routed)))) if x.is_cuda else 1
    cycle = itertools.cycle([weights] + [[tuple(None if t is None else t.clone() for t in part) for part in weights]
                                         for _ in range(copies - 1)])

    def run(cfg):
        gu, dn = next(cycle)
        return _launch_moe_wq(x, router_logits, gu, dn, top_k, bool(normalize), bits, Fd, key, cfg)

    return tuning.autotune("moe_wq", key, cands, run, profile, bench_fn=tuning.graph_bench_for(x))

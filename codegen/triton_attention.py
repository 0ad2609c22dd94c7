"""Attention kernels: FlashAttention-2 style prefill and Flash-Decoding style decode, with PyTorch references.

Prefill -- :func:`attention` ``(q[B, Hq, S, D], k[B, Hkv, L, D], v[B, Hkv, L, D], is_causal, scale)``:
``softmax(q k^T * scale) v`` with

* grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are
  indexed, never repeated in memory;
* causal masking aligned bottom-right: query ``i`` may attend key ``j`` iff
  ``j <= i + L - S`` (the convention of FlashAttention >= 2.1 and of a KV cache whose
  last ``S`` entries are the current queries).  Note this differs from
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, which aligns
  top-left; they agree when ``S == L``;
* query rows that may attend no key at all (causal with ``S > L``) produce 0, as in
  FlashAttention, instead of the NaN a naive softmax gives;
* fp32 accumulation, output in ``q.dtype``.

The kernel follows FlashAttention-2 (Dao, 2023, "FlashAttention-2: Faster Attention
with Better Parallelism and Work Partitioning", Alg. 1): one program owns a
``BLOCK_M`` tile of queries of one head, streams ``BLOCK_N`` tiles of K/V through an
online softmax (running max ``m``, running sum ``l``, unnormalised accumulator), and
divides by ``l`` once at the end.  Scores are scaled by ``scale * log2(e)`` so the
exponentials are ``exp2`` (one MUFU op).  As in FA-2 sec. 3.1, key tiles entirely
below the causal diagonal skip the mask, so only the diagonal tiles pay for it, and
tiles entirely above it are never visited.

Chunk -- :func:`chunk_attention` ``(q[B, Hq, S, D], k_cache[B, Hkv, Lmax, D], v_cache,
positions[S] or [B, S], scale)``: the prefill kernel over a static KV cache, query ``i``
seeing the slots ``j <= positions[b, i]`` (a prompt chunk or a speculative verify step,
whose own keys are already in the cache).  Each query tile loads its positions and bounds
its key loop by them on the GPU, so one CUDA graph serves every position.

Decode -- :func:`decode_attention` ``(q[B, Hq, 1, D], k_cache[B, Hkv, Lmax, D],
v_cache, seq_lens[B], scale)``: keys ``j < seq_lens[b]`` are valid.  With one query
per head there is too little work per (batch, head) to fill the GPU, so the KV length
is split across programs (Flash-Decoding: Dao, Haziza, Massa, Sizov, 2023, "Flash-
Decoding for long-context inference").  Stage 1: program ``(b, kv head, split)``
computes, for *all* ``Hq // Hkv`` query heads of that KV group at once (so each K/V
tile is read once, the GQA trick of FlashInfer / FlashAttention's decode path), a
partial result normalised within the split plus its log-sum-exp.  Stage 2: a small
kernel combines the splits with weights ``exp(lse_s - max lse)``.  With the config key
``FUSED_COMBINE`` the two stages are one launch: each split program takes a ticket from
a per-(b, kv head) atomic counter after writing its partials, and the last one to
arrive combines the group's splits (the "last block" reduction of CUDA's
threadFenceReduction sample); with a single split the program writes the output itself.
"""

from __future__ import annotations

import math

import torch

from . import tuning
from ._triton_common import (
    HAS_TRITON,
    check_devices,
    check_out,
    check_same_dtype,
    check_tensor,
    device_guard,
    launch_opts,
    next_pow2,
    pdl_enabled,
    require_triton,
    triton,
    tl,
)

__all__ = [
    "attention",
    "decode_attention",
    "chunk_attention",
    "tune_attention",
    "tune_decode_attention",
    "reference_attention",
    "reference_decode_attention",
    "reference_chunk_attention",
    "decode_num_splits",
]

_LOG2E = 1.4426950408889634
_MAX_GRID_YZ = 65535


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------
def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch attention with GQA and bottom-right causal alignment (see module docstring).

    Computes in fp32 (fp64 for fp64 inputs) and returns ``q.dtype``.  Rows with
    no visible key are 0.
    """
    B, Hq, S, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    acc = _acc_dtype(q)
    group = Hq // Hkv
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale
    if is_causal:
        i = torch.arange(S, device=q.device)[:, None]
        j = torch.arange(L, device=q.device)[None, :]
        visible = j <= i + (L - S)
        scores = scores.masked_fill(~visible, float("-inf"))
    else:
        visible = torch.ones(S, L, dtype=torch.bool, device=q.device)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(visible.any(-1)[:, None], probs, torch.zeros((), dtype=acc, device=q.device))
    return torch.matmul(probs, vf).to(q.dtype)


def reference_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Plain PyTorch single-query attention over the first ``seq_lens[b]`` cache entries of each batch row.

    A row with ``seq_lens[b] == 0`` gives 0.  Lengths are clamped to ``[0, Lmax]``.  The query of
    row ``b`` sits at position ``seq_lens[b] - 1``: :func:`reference_chunk_attention` with one query.
    """
    lens = seq_lens.to(torch.int64).clamp(0, k_cache.shape[2]).to(q.device)
    return reference_chunk_attention(q, k_cache, v_cache, (lens - 1)[:, None], scale)


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _attn_tiles(
        acc, l_i, m_i, q,
        K_base, V_base, stride_kl, stride_kd, stride_vl, stride_vd,
        qpos, offs_d, lo, hi, L, D, qk_scale,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        """Online-softmax update over key tiles [lo, hi) (FlashAttention-2, Alg. 1 inner loop).

        MASKED=False is only used for tiles where every key is < L and visible to
        every query of the tile, so it skips the mask and the -inf guards. With CAUSAL,
        key j is visible to query row r iff j <= qpos[r].
        """
        offs_n0 = tl.arange(0, BLOCK_N)
        d_ok = offs_d < D
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            n_ok = offs_n < L
            k_ptrs = K_base + offs_n[None, :] * stride_kl + offs_d[:, None] * stride_kd
            v_ptrs = V_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd
            # Interior tiles load without predicates (cheaper, and lets Triton pipeline plain copies).
            if MASKED:
                kT = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            elif EVEN_D:
                kT = tl.load(k_ptrs)
            else:
                kT = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            if IEEE:
                qk = tl.dot(q, kT, input_precision="ieee")
            else:
                qk = tl.dot(q, kT)
            # The softmax scale (times log2 e) is applied inside the max and the exponent,
            # so it fuses into one FMA per score (scale > 0 keeps the max unchanged).
            if MASKED:
                visible = n_ok[None, :]
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= qpos[:, None])
                qk = tl.where(visible, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                # A row with nothing visible yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                m_sub = m_new
            p = tl.exp2(qk * qk_scale - m_sub[:, None])
            alpha = tl.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if MASKED:
                v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            elif EVEN_D:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O,
        sq_b, sq_h, sq_s, sq_d,
        sk_b, sk_h, sk_l, sk_d,
        sv_b, sv_h, sv_l, sv_d,
        so_b, so_h, so_s, so_d,
        P, sp_b, sp_s,
        Hq, GROUP, S, L, D,
        qk_scale,
        CAUSAL: tl.constexpr,
        HAS_POS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        """Program (query tile, b*Hq + h): O[b, h, tile] = softmax(Q K^T * scale) V for kv head h // GROUP."""
        pid_m = tl.program_id(0)
        if CAUSAL or HAS_POS:
            # Causal tiles near the end of the sequence have the most keys: start them first
            # so the long ones don't form the tail of the schedule.
            pid_m = tl.num_programs(0) - 1 - pid_m
        pid_bh = tl.program_id(1)
        b = (pid_bh // Hq).to(tl.int64)
        h = pid_bh % Hq
        kvh = (h // GROUP).to(tl.int64)
        h = h.to(tl.int64)

        m0 = pid_m * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(
            Q + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_s + offs_d[None, :] * sq_d,
            mask=(offs_m < S)[:, None] & (offs_d < D)[None, :],
            other=0.0,
        )
        K_base = K + b * sk_b + kvh * sk_h
        V_base = V + b * sv_b + kvh * sv_h

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

        full_L = (L // BLOCK_N) * BLOCK_N  # key tiles with no out-of-range key
        causal_shift = L - S  # bottom-right alignment: key j visible to query i iff j <= i + L - S
        if HAS_POS:
            # Query i sits at position P[b, i] of a static cache and sees keys j <= P[b, i]
            # (the CUDA graph replays one launch whatever the positions: bounds come from memory).
            m_ok = offs_m < S
            qpos = tl.load(P + b * sp_b + offs_m.to(tl.int64) * sp_s, mask=m_ok, other=-1).to(tl.int32)
            lowest = tl.min(tl.where(m_ok, qpos, L), 0)
            full_hi = tl.minimum(((tl.maximum(lowest, -1) + 1) // BLOCK_N) * BLOCK_N, full_L)
            hi = tl.minimum(tl.max(qpos, 0) + 1, L)
            hi = tl.maximum(hi, full_hi)
        elif CAUSAL:
            qpos = offs_m + causal_shift
            # Keys < m0 + shift + 1 are visible to every query of the tile.
            free = tl.maximum(m0 + causal_shift + 1, 0)
            full_hi = tl.minimum((free // BLOCK_N) * BLOCK_N, full_L)
            # The last real query of the tile sees keys up to its index + shift.
            hi = tl.minimum(tl.minimum(m0 + BLOCK_M, S) + causal_shift, L)
            hi = tl.maximum(hi, full_hi)
        else:
            qpos = offs_m
            full_hi = full_L
            hi = L
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, K_base, V_base, sk_l, sk_d, sv_l, sv_d,
            qpos, offs_d, 0, full_hi, L, D, qk_scale,
            MASKED=False, CAUSAL=CAUSAL or HAS_POS, BLOCK_N=BLOCK_N, IEEE=IEEE, EVEN_D=EVEN_D,
        )
        acc, l_i, m_i = _attn_tiles(
            acc, l_i, m_i, q, K_base, V_base, sk_l, sk_d, sv_l, sv_d,
            qpos, offs_d, full_hi, hi, L, D, qk_scale,
            MASKED=True, CAUSAL=CAUSAL or HAS_POS, BLOCK_N=BLOCK_N, IEEE=IEEE, EVEN_D=EVEN_D,
        )
        # Rows that saw no key have l = 0 and acc = 0: output 0.
        l_div = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_div[:, None]
        tl.store(
            O + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_s + offs_d[None, :] * so_d,
            out.to(O.dtype.element_ty),
            mask=(offs_m < S)[:, None] & (offs_d < D)[None, :],
        )

    @triton.jit
    def _decode_combine(
        MID_O, MID_LSE, O,
        b64, kvh,
        so_b, so_h, so_d,
        Hq, GROUP, D, NUM_SPLITS,
        BLOCK_G: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Fused stage 2: combine the NUM_SPLITS partials of the GROUP query heads of kv head kvh.

        The weights of _decode_reduce_kernel, taken BLOCK_S splits at a time with a
        running max (one chunk: the same arithmetic).  Partials written by other
        programs are loaded with .cg (L2, never a possibly stale L1 line).
        """
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < GROUP
        heads = (kvh * GROUP + offs_g).to(tl.int64)
        base = (b64 * Hq + heads) * NUM_SPLITS
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            row = base[:, None] + s0 + offs_s[None, :]  # [BLOCK_G, BLOCK_S]
            gs_ok = g_ok[:, None] & (s0 + offs_s < NUM_SPLITS)[None, :]
            lse = tl.load(MID_LSE + row, mask=gs_ok, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(
                MID_O + row[:, :, None] * D + offs_d[None, None, :],
                mask=gs_ok[:, :, None] & d_ok[None, None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            m_new = tl.maximum(m_i, tl.max(lse, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            w = tl.exp2(lse - m_ref[:, None])
            denom = denom * alpha + tl.sum(w, 1)
            acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 1)
            m_i = m_new
        out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
        tl.store(
            O + b64 * so_b + heads[:, None] * so_h + offs_d[None, :] * so_d,
            out.to(O.dtype.element_ty),
            mask=g_ok[:, None] & d_ok[None, :],
        )

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, SEQ_LENS, MID_O, MID_LSE, O, COUNTERS,
        s_len, len_offset,
        sq_b, sq_h, sq_d,
        sk_b, sk_h, sk_l, sk_d,
        sv_b, sv_h, sv_l, sv_d,
        so_b, so_h, so_d,
        Hq, Hkv, GROUP, Lmax, D, split_len, NUM_SPLITS,
        qk_scale,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr,
        FUSED: tl.constexpr,
        DIRECT: tl.constexpr,
        COMBINE_G: tl.constexpr,
        COMBINE_S: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Flash-Decoding stage 1: program (b*Hkv + kv head, split).

        All GROUP query heads of the kv head form the rows of one [BLOCK_G, D] tile,
        so every K/V tile is loaded once for the whole group.  Writes, per query
        head, the split's softmax-normalised output and its log2-sum-exp (-inf for
        a split with no valid key).  The last split runs to seq_len whatever
        split_len is, so a too-small length hint never drops keys.

        DIRECT (one split): write the output to O instead.  FUSED: then take a ticket
        from COUNTERS[b*Hkv + kv head]; the program that draws the last one combines
        the group's splits into O (_decode_combine, COMBINE_G x COMBINE_S x BLOCK_D
        tiles) and resets the counter to 0 for the next launch.
        """
        if PDL:  # launched before the previous kernel finished: wait for its results
            tl.extra.cuda.gdc_wait()
        pid_bk = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bk // Hkv
        kvh = pid_bk % Hkv
        seq_len = tl.load(SEQ_LENS + b * s_len).to(tl.int32) + len_offset
        seq_len = tl.minimum(tl.maximum(seq_len, 0), Lmax)
        start = split * split_len
        end = tl.where(split == NUM_SPLITS - 1, seq_len, tl.minimum(start + split_len, seq_len))

        b64 = b.to(tl.int64)
        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < GROUP
        heads = (kvh * GROUP + offs_g).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(
            Q + b64 * sq_b + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        K_base = K + b64 * sk_b + kvh.to(tl.int64) * sk_h
        V_base = V + b64 * sv_b + kvh.to(tl.int64) * sv_h

        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        offs_n0 = tl.arange(0, BLOCK_N)
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + offs_n0
            n_ok = offs_n < end
            kT = tl.load(
                K_base + offs_n[None, :].to(tl.int64) * sk_l + offs_d[:, None] * sk_d,
                mask=n_ok[None, :] & d_ok[:, None],
                other=0.0,
            )
            if IEEE:
                qk = tl.dot(q, kT, input_precision="ieee")
            else:
                qk = tl.dot(q, kT)
            # Each tile starts at a valid key, so every row's max is finite.
            qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                V_base + offs_n[:, None].to(tl.int64) * sv_l + offs_d[None, :] * sv_d,
                mask=n_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        if DIRECT:
            tl.store(
                O + b64 * so_b + heads[:, None] * so_h + offs_d[None, :] * so_d,
                out.to(O.dtype.element_ty),
                mask=g_ok[:, None] & d_ok[None, :],
            )
        else:
            lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
            row = (b64 * Hq + heads) * NUM_SPLITS + split  # [BLOCK_G] index into [B*Hq, NUM_SPLITS]
            tl.store(MID_LSE + row, lse, mask=g_ok)
            tl.store(MID_O + row[:, None] * D + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
            if FUSED:
                # The ticket is one thread's atomic, so the barrier first orders every
                # thread's partial stores before it (CTA scope); the acq_rel atomic at
                # GPU scope then releases them to, and acquires the other programs'
                # stores for, whoever draws the last ticket -- the pattern of
                # cooperative groups' grid sync.
                tl.debug_barrier()
                ticket = tl.atomic_add(COUNTERS + pid_bk, 1, sem="acq_rel")
                if ticket == NUM_SPLITS - 1:
                    _decode_combine(
                        MID_O, MID_LSE, O, b64, kvh, so_b, so_h, so_d, Hq, GROUP, D, NUM_SPLITS,
                        BLOCK_G=COMBINE_G, BLOCK_S=COMBINE_S, BLOCK_D=BLOCK_D,
                    )
                    tl.store(COUNTERS + pid_bk, 0)

    @triton.jit
    def _decode_reduce_kernel(
        MID_O, MID_LSE, O,
        so_b, so_h, so_d,
        Hq, D, NUM_SPLITS,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Flash-Decoding stage 2: program b*Hq + h combines its NUM_SPLITS partials.

        out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse); empty splits
        have lse = -inf (w = 0); a row with no valid key at all gives 0.
        """
        pid = tl.program_id(0)
        b = (pid // Hq).to(tl.int64)
        h = (pid % Hq).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        s_ok = offs_s < NUM_SPLITS
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        base = pid.to(tl.int64) * NUM_SPLITS
        lse = tl.load(MID_LSE + base + offs_s, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lse - m)
        denom = tl.sum(w, 0)
        o = tl.load(MID_O + (base + offs_s[:, None]) * D + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        out = tl.sum(o * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
        tl.store(O + b * so_b + h * so_h + offs_d * so_d, out.to(O.dtype.element_ty), mask=d_ok)

    tuning.register_kernel_source("attention", _attn_fwd_kernel, _attn_tiles)
    tuning.register_kernel_source("decode_attention", _decode_split_kernel, _decode_combine, _decode_reduce_kernel)


# ---------------------------------------------------------------------------
# Prefill launcher
# ---------------------------------------------------------------------------
def _dtype_key(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _attn_fits(D: int, dtype: torch.dtype, profile: str):
    """Config filter: estimated shared memory (Q tile + num_stages K and V tiles) and accumulator registers."""
    elem = torch.empty((), dtype=dtype).element_size()
    block_d = max(16, next_pow2(D))
    smem = tuning.hardware(profile)["smem_per_block"]

    def fits(cfg: dict) -> bool:
        bm, bn = cfg.get("BLOCK_M", 64), cfg.get("BLOCK_N", 64)
        stages = max(1, cfg.get("num_stages", 2))
        need = (bm * block_d + stages * 2 * bn * block_d) * elem
        acc_regs = bm * block_d // (32 * cfg.get("num_warps", 4))
        return need <= smem and acc_regs <= 128

    return fits


def _check_kv_heads(fn: str, q, k, v, kv_names: str, kv_short: str, length: str) -> None:
    """k and v share one [B, Hkv, length, D] shape that fits q[B, Hq, ., D] with Hq % Hkv == 0."""
    B, Hq, _, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{fn}: {kv_names} must have the same shape [B, Hkv, {length}, D], "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{fn}: {kv_short} must be [B={B}, Hkv, {length}, D={D}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{fn}: Hq ({Hq}) must be a multiple of Hkv ({Hkv}) for grouped-query attention")


def _check_attention(q, k, v):
    fn = "attention"
    require_triton(fn)
    check_tensor(fn, "q", q, ndim=4)
    check_tensor(fn, "k", k, ndim=4)
    check_tensor(fn, "v", v, ndim=4)
    _check_kv_heads(fn, q, k, v, "k and v", "k/v", "L")
    check_same_dtype(fn, [("q", q), ("k", k), ("v", v)])
    check_devices(fn, _attn_fwd_kernel, [("q", q), ("k", k), ("v", v)])


def _attention_key(q, k, is_causal, positions) -> dict:
    B, Hq, S, D = q.shape
    key = {"S": S, "L": k.shape[2], "D": D, "Hq": Hq, "Hkv": k.shape[1], "causal": bool(is_causal),
           "dtype": _dtype_key(q)}
    if positions is not None:
        key["positions"] = True
    return key


def _launch_attention(q, k, v, o, is_causal, scale, config, positions=None):
    B, Hq, S, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if o.numel() == 0:
        return
    profile = tuning.detect_profile(q.device)
    if config is None:
        config = tuning.get_config("attention", _attention_key(q, k, is_causal, positions), profile,
                                   _attn_fits(D, q.dtype, profile))
    block_m, block_n = int(config["BLOCK_M"]), int(config["BLOCK_N"])
    if min(block_m, block_n) < 16:
        raise ValueError(f"attention: BLOCK_M and BLOCK_N must be >= 16 (tl.dot), got config {config}")
    grid = (triton.cdiv(S, block_m), B * Hq)
    if grid[1] > _MAX_GRID_YZ:
        raise ValueError(f"attention: B*Hq = {grid[1]} exceeds the grid limit {_MAX_GRID_YZ}; split the batch")
    if positions is None:
        pos, pos_strides = q, (0, 0)  # unread (HAS_POS=False)
    else:
        pos = positions if positions.dim() == 2 else positions[None, :]
        pos_strides = (pos.stride(0) if pos.shape[0] > 1 else 0, pos.stride(1))
    with device_guard(q.device):
        _attn_fwd_kernel[grid](
            q, k, v, o,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            pos, *pos_strides,
            Hq, Hq // Hkv, S, L, D,
            float(scale) * _LOG2E,
            CAUSAL=bool(is_causal) and positions is None,
            HAS_POS=positions is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=max(16, next_pow2(D)),
            IEEE=q.dtype == torch.float32,
            EVEN_D=next_pow2(D) == D and D >= 16,
            **launch_opts(config),
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """FlashAttention-2 style ``softmax(q k^T * scale) v`` with GQA; see the module docstring.

    ``q[B, Hq, S, D]``, ``k, v[B, Hkv, L, D]`` of one float dtype, any strides.
    ``scale`` defaults to ``1/sqrt(D)``.  Returns a contiguous ``[B, Hq, S, D]``
    tensor of ``q.dtype`` (or ``out``: any strides, not sharing memory with the
    inputs).  ``config`` overrides the launch config
    (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``).
    fp32 inputs use exact fp32 products (no TF32) so fp32 stays fp32-accurate.
    """
    _check_attention(q, k, v)
    return _attend("attention", q, k, v, is_causal, scale, out, config, None)


def _attend(fn, q, k, v, is_causal, scale, out, config, positions) -> torch.Tensor:
    """The checked inputs' launch, for attention and chunk_attention: the default scale, the output."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        check_out(fn, "out", out, q.shape, q.dtype, q.device, inputs=(q, k, v))
    _launch_attention(q, k, v, out, is_causal, scale, config, positions)
    return out


def tune_attention(q, k, v, is_causal: bool = False, scale: float | None = None, positions=None) -> dict:
    """Autotune (and cache) the prefill kernel on these example inputs; returns the winning config."""
    _check_attention(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    key = _attention_key(q, k, is_causal, positions)
    profile = tuning.detect_profile(q.device)
    fits = _attn_fits(q.shape[-1], q.dtype, profile)
    cands = [c for c in tuning.candidates("attention", profile) if fits(c)] or tuning.candidates("attention", profile)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return tuning.autotune("attention", key, cands,
                           lambda cfg: _launch_attention(q, k, v, o, is_causal, scale, cfg, positions), profile)


def _check_positions(fn: str, q: torch.Tensor, positions: torch.Tensor) -> None:
    B, _, S, _ = q.shape
    if positions.dtype not in (torch.int32, torch.int64) or positions.device != q.device:
        raise ValueError(f"{fn}: positions must be int32/int64 on {q.device}, got {positions.dtype} on "
                         f"{positions.device}")
    if tuple(positions.shape) not in ((S,), (B, S), (1, S)):
        raise ValueError(f"{fn}: positions must have shape ({S},) or ({B}, {S}) for q {tuple(q.shape)}, "
                         f"got {tuple(positions.shape)}")


def chunk_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    scale: float | None = None,
    *,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Several new queries against a static KV cache: the prefill kernel with query ``i`` of
    batch row ``b`` seeing the cache slots ``j <= positions[b, i]`` (``positions[S]`` or
    ``[B, S]``, any values: the slots of the chunk itself are written before this runs).

    What ``flashc.decode_attention`` computes for a prompt chunk or a verify step; the key
    bounds are read from ``positions`` on the GPU, so one CUDA graph serves every position.
    """
    _check_attention(q, k_cache, v_cache)
    _check_positions("chunk_attention", q, positions)
    return _attend("chunk_attention", q, k_cache, v_cache, True, scale, out, config, positions)


def reference_chunk_attention(q, k_cache, v_cache, positions, scale: float | None = None) -> torch.Tensor:
    """Plain PyTorch :func:`chunk_attention` (fp32 math; rows that see no slot give 0)."""
    B, Hq, S, D = q.shape
    L = k_cache.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    acc = _acc_dtype(q)
    group = Hq // k_cache.shape[1]
    kf = k_cache.to(acc).repeat_interleave(group, dim=1)
    vf = v_cache.to(acc).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale  # [B, Hq, S, L]
    pos = positions.to(torch.int64).reshape(-1, S)
    visible = torch.arange(L, device=q.device)[None, None, :] <= pos[:, :, None]  # [B or 1, S, L]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(visible.any(-1)[:, None, :, None], probs, torch.zeros((), dtype=acc, device=q.device))
    return torch.matmul(probs, vf).to(q.dtype)


# ---------------------------------------------------------------------------
# Decode launcher
# ---------------------------------------------------------------------------
def _workspace(shape, device) -> torch.Tensor:
    """fp32 scratch for the split partials (every element is written by stage 1; tests poison it)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN_COUNTERS: list[torch.Tensor] = []


def _split_counters(n: int, device: torch.device) -> torch.Tensor:
    """The fused combine's per-(b, kv head) int32 ticket counters: one zeroed buffer per device.

    Every launch leaves them 0 (the last split resets its counter), so they are
    neither zeroed per call nor inside a replayed CUDA graph; a launch aborted
    midway would leave them dirty (not a concern in practice).  The buffer grows
    to the largest ``n`` seen; an outgrown one is kept alive, as a captured graph
    still points at it.  Launches sharing a device share the buffer, so they must
    not run concurrently on different streams.
    """
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # zeros() would only be recorded, not run: eager calls would see garbage
            raise RuntimeError("decode_attention: run the fused decode once before CUDA graph capture")
        if buf is not None:
            _OUTGROWN_COUNTERS.append(buf)
        buf = _COUNTERS[device] = torch.zeros(n, dtype=torch.int32, device=device)
    return buf


def decode_num_splits(
    batch: int, kv_heads: int, max_len: int, sm_count: int, block_n: int = 64, min_split_len: int = 256
) -> tuple[int, int]:
    """Flash-Decoding split count: ``(num_splits, split_len)``.

    Aims at about two waves of programs (``2 * sm_count``) over ``batch *
    kv_heads`` (b, kv head) pairs, but never gives a split fewer than
    ``min_split_len`` keys (each split costs a partial write and a combine
    term) and never more than 256 splits.  ``split_len`` is a multiple of
    ``block_n`` so only a split's last tile is partial.
    """
    max_len = max(int(max_len), 1)
    pairs = max(batch * kv_heads, 1)
    want = -(-2 * sm_count // pairs)
    cap = max(1, -(-max_len // max(min_split_len, block_n)))
    ns = max(1, min(want, cap, 256))
    split_len = -(-max_len // ns)
    split_len = -(-split_len // block_n) * block_n
    ns = -(-max_len // split_len)
    return ns, split_len


def _check_decode(q, k_cache, v_cache, seq_lens):
    fn = "decode_attention"
    require_triton(fn)
    check_tensor(fn, "q", q, ndim=4)
    check_tensor(fn, "k_cache", k_cache, ndim=4)
    check_tensor(fn, "v_cache", v_cache, ndim=4)
    check_tensor(fn, "seq_lens", seq_lens, ndim=1, dtypes=(torch.int32, torch.int64))
    B, _, one, _ = q.shape
    if one != 1:
        raise ValueError(f"decode_attention: q must be [B, Hq, 1, D] (one new token), got {tuple(q.shape)}")
    _check_kv_heads(fn, q, k_cache, v_cache, "k_cache and v_cache", "caches", "Lmax")
    if seq_lens.shape[0] != B:
        raise ValueError(f"decode_attention: seq_lens must have shape ({B},), got {tuple(seq_lens.shape)}")
    check_same_dtype(fn, [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)])
    check_devices(
        fn, _decode_split_kernel, [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("seq_lens", seq_lens)]
    )


def _decode_key(q, k_cache, max_len):
    return {
        "Lmax": int(max_len),
        "D": q.shape[3],
        "B": q.shape[0],
        "Hq": q.shape[1],
        "Hkv": k_cache.shape[1],
        "dtype": _dtype_key(q),
    }


def _launch_decode(q, k_cache, v_cache, seq_lens, o, scale, config, num_splits, max_seq_len, len_offset=0):
    B, Hq, _, D = q.shape
    Hkv, Lmax = k_cache.shape[1], k_cache.shape[2]
    if o.numel() == 0:
        return
    profile = tuning.detect_profile(q.device)
    max_len = min(Lmax, max_seq_len) if max_seq_len is not None else Lmax
    # row-invariant launches (tuning.row_invariant): every sequence split and tiled as a batch of one is
    like = 1 if tuning.row_invariant_active() else B
    if config is None:
        config = tuning.get_config("decode_attention", _decode_key(q[:like], k_cache[:like], max_len), profile)
    block_n = int(config.get("BLOCK_N", 64))
    if block_n < 16:
        raise ValueError(f"decode_attention: BLOCK_N must be >= 16 (tl.dot), got config {config}")
    if num_splits is None:
        sm = tuning.hardware(profile)["sm_count"]
        if q.device.type == "cuda":
            sm = torch.cuda.get_device_properties(q.device).multi_processor_count
        ns, split_len = decode_num_splits(like, Hkv, max_len, sm, block_n, int(config.get("MIN_SPLIT_LEN", 256)))
    else:
        if int(num_splits) < 1:
            raise ValueError(f"decode_attention: num_splits must be >= 1, got {num_splits}")
        ns = int(num_splits)
        split_len = -(-max(max_len, 1) // ns)
        split_len = -(-split_len // block_n) * block_n
    if ns > _MAX_GRID_YZ:
        raise ValueError(f"decode_attention: {ns} splits exceed the grid limit {_MAX_GRID_YZ}")
    G = Hq // Hkv
    fused = bool(config.get("FUSED_COMBINE", False))
    direct = fused and ns == 1
    if direct:  # the partial and counter pointers go unused
        mid_o = mid_lse = counters = o
    else:
        mid_o = _workspace((B * Hq, ns, D), q.device)
        mid_lse = _workspace((B * Hq, ns), q.device)
        counters = _split_counters(B * Hkv, q.device) if fused else mid_lse  # unused unless fused
    block_d = max(16, next_pow2(D))
    combine_g = combine_s = 1  # constexprs of the fused combine only: one specialisation otherwise
    if fused and not direct:
        # [G, splits, D] fp32 chunks of about 64 values a thread
        combine_g = next_pow2(G)
        combine_s = max(1, min(next_pow2(ns), 64 * 32 * int(config.get("num_warps", 4)) // (combine_g * block_d)))
    pdl = pdl_enabled(q.device)
    with device_guard(q.device):
        _decode_split_kernel[(B * Hkv, ns)](
            q, k_cache, v_cache, seq_lens, mid_o, mid_lse, o, counters,
            seq_lens.stride(0), int(len_offset),
            q.stride(0), q.stride(1), q.stride(3),
            *k_cache.stride(), *v_cache.stride(),
            o.stride(0), o.stride(1), o.stride(3),
            Hq, Hkv, G, Lmax, D, split_len, ns,
            float(scale) * _LOG2E,
            BLOCK_G=max(16, next_pow2(G)),
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            IEEE=q.dtype == torch.float32,
            FUSED=fused and not direct,
            DIRECT=direct,
            COMBINE_G=combine_g,
            COMBINE_S=combine_s,
            PDL=pdl,
            **launch_opts(config),
            **({"launch_pdl": True} if pdl else {}),
        )
        if fused:
            return
        _decode_reduce_kernel[(B * Hq,)](
            mid_o, mid_lse, o,
            o.stride(0), o.stride(1), o.stride(3),
            Hq, D, ns,
            BLOCK_S=max(2, next_pow2(ns)),
            BLOCK_D=block_d,
            num_warps=4 if block_d * max(2, next_pow2(ns)) >= 4096 else 2,
        )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    len_offset: int = 0,
) -> torch.Tensor:
    """Flash-Decoding attention of one new query per sequence over a KV cache; see the module docstring.

    ``q[B, Hq, 1, D]``, ``k_cache, v_cache[B, Hkv, Lmax, D]`` (any strides),
    ``seq_lens[B]`` int32/int64 on the same device: keys ``j < seq_lens[b]`` are
    attended (lengths are clamped to ``[0, Lmax]``; a length of 0 gives 0).  ``seq_lens``
    may have any stride (0: one length for the whole batch); ``len_offset`` is added
    to every length, so a decode step passes its cache position with offset 1.

    ``num_splits`` forces the KV split count (default: :func:`decode_num_splits`
    from ``max_seq_len`` and the SM count).  ``max_seq_len`` is an optional host-side
    upper bound of ``seq_lens`` (it avoids a device sync and sizes the splits to the
    live part of the cache); keys past it are still attended, by the last split, so
    a wrong hint costs speed, never correctness.  Returns ``[B, Hq, 1, D]`` in ``q.dtype``
    (``out`` if given: any strides, not sharing memory with the inputs).
    """
    _check_decode(q, k_cache, v_cache, seq_lens)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    else:
        check_out("decode_attention", "out", out, q.shape, q.dtype, q.device, inputs=(q, k_cache, v_cache))
    _launch_decode(q, k_cache, v_cache, seq_lens, out, scale, config, num_splits, max_seq_len, len_offset)
    return out


def tune_decode_attention(q, k_cache, v_cache, seq_lens, scale: float | None = None, max_seq_len: int | None = None) -> dict:
    """Autotune (and cache) the decode kernels on these example inputs; returns the winning config."""
    _check_decode(q, k_cache, v_cache, seq_lens)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    max_len = min(k_cache.shape[2], max_seq_len) if max_seq_len is not None else k_cache.shape[2]
    profile = tuning.detect_profile(q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return tuning.autotune(
        "decode_attention",
        _decode_key(q, k_cache, max_len),
        tuning.candidates("decode_attention", profile),
        lambda cfg: _launch_decode(q, k_cache, v_cache, seq_lens, o, scale, cfg, None, max_seq_len),
        profile,
        bench_fn=tuning.graph_bench_for(q),
    )

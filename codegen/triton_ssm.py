"""Triton kernels for ``flashc.ssm_scan``: a decode step and a chunked prefill of the scalar-decay SSM.

The op (``flashc/ssm_ops.py``; Mamba-2's state space duality, Dao & Gu, "Transformers are
SSMs", ICML 2024, arXiv:2405.21060), per (batch, head), with a state ``h[K, V]`` in fp32::

    h_t = exp(g_t) h_{t-1} + k_t^T v_t          y_t = q_t h_t

References: ``ssm_recurrent`` (the definition, step by step) and ``ssm_chunked`` (the chunk
form below); both live in ``flashc.ssm_ops`` and are what the tests check against.

**Decode** (T = 1, ``_ssm_step_kernel``): program (b, h, V tile) reads its ``[K, BLOCK_V]``
state tile once, computes ``h = exp(g) h + k^T v`` and ``y = q h`` in registers and writes
the tile once. The state is the only sizeable operand (``K V`` fp32 per head against ``K + V``
inputs), so the step moves ``2 * 4 K V`` bytes per head and is bound by memory bandwidth;
small ``BLOCK_V`` tiles spread a small batch over more programs (SMs).

**Prefill** (T > 1, ``_ssm_chunk_kernel``): program (b, h, V tile) walks the sequence in
chunks of ``BLOCK_T`` tokens, the state tile held in registers in fp32 throughout, so the
state is read and written once per call and q, k, v are each read once (k and q once per V
tile). Inside a chunk, with the cumulative log decay ``G_t = g_1 + ... + g_t``::

    y_t   = exp(G_t) q_t h_0 + sum_{s <= t} exp(G_t - G_s) (q_t . k_s) v_s
    h_end = exp(G_C) h_0 + sum_s exp(G_C - G_s) k_s^T v_s

i.e. four matmuls on tensor cores (``q k^T``, ``scores v``, ``q h``, ``k^T v``) instead of
``C`` rank-1 updates of the state. Every exponent is <= 0 (``g <= 0``), so nothing overflows.
Exponentials are ``exp2`` of ``log2(e)``-scaled decays (one MUFU op each).

**Mixing** (``ssm_mix_triton``, the op ``flashc.ssm_mix``: a layer's grouped heads, k scaling,
decay from dt and per-head output RMSNorm around the scan). T = 1: one kernel,
``_ssm_mix_step_kernel``, one program per (b, h) with the whole ``[d, d]`` state tile, since the
norm needs all of a head's y; a decode step is launch-bound, so one launch replaces about fifteen.
T > 1: torch ops make the decay and the scaled k, the chunked kernel reads the grouped k and v
heads unrepeated (``GROUP``), torch normalizes y.

Precision: fp32 accumulation everywhere. fp32 inputs multiply in exact fp32
(``input_precision="ieee"``), fp16 inputs in TF32 (fp16's mantissa, fp32's range, so a large
state cannot overflow), bf16 inputs in bf16 with the fp32 scores and state rounded to bf16 as
matmul operands (the running state itself stays fp32). Triton's CPU interpreter computes bf16
``tl.dot`` wrongly (see tests/codegen/test_triton_attention.py), so interpreted kernels round
the operands to bf16 and multiply in fp32: the same products, as bf16 x bf16 is exact in fp32.
"""

from __future__ import annotations

import torch

from flashc.ssm_ops import (  # the op's semantics, shared with its reference
    check_mix,
    head_rms_norm,
    mix_inputs,
    restarted,
)

from ._triton_common import (
    HAS_TRITON,
    check_devices,
    check_out,
    check_tensor,
    device_guard,
    is_interpreted,
    launch_opts,
    next_pow2,
    pdl_enabled,
    require_triton,
    triton,
    tl,
)

__all__ = ["ssm_scan_triton", "ssm_mix_triton", "DECODE_CONFIG", "PREFILL_CONFIGS", "MIX_DECODE_CONFIGS"]

_MAX_K = 256  # the state tile [BLOCK_K, BLOCK_V] lives in registers; 128 is the largest head dim in use

# Launch configs, not yet timed on a GPU. Decode: BLOCK_V = None picks ~2K fp32 state entries per
# program (_block_v), so a batch-1 step still spreads over many SMs.
DECODE_CONFIG = {"BLOCK_V": None, "num_warps": 4}
# Prefill, by BLOCK_K: for K <= 128 the largest tiles that Triton 3.6 compiles for sm_90 (bf16)
# without register spills (cuobjdump -res-usage; larger ones spill; K = 256 spills ~0.5 KB).
# BLOCK_T = 64 is the reference's chunk (flashc.ssm_ops.CHUNK) and Mamba-2's; the chunk size
# changes rounding only. fp32 inputs (exact fp32 products, no tensor cores) spill at any size.
PREFILL_CONFIGS = {
    32: {"BLOCK_T": 64, "BLOCK_V": 32, "num_warps": 4, "num_stages": 2},
    64: {"BLOCK_T": 64, "BLOCK_V": 32, "num_warps": 8, "num_stages": 2},
    128: {"BLOCK_T": 32, "BLOCK_V": 64, "num_warps": 8, "num_stages": 2},
    256: {"BLOCK_T": 32, "BLOCK_V": 32, "num_warps": 8, "num_stages": 2},
}
# ssm_mix's decode step, by BLOCK (next pow2 of d): one program holds the whole [d, d] fp32 state tile
# (the output norm needs all of a head's y). The fewest warps that Triton 3.6 compiles for sm_90
# without register spills (cuobjdump -res-usage: d = 64 at 4 warps takes ~210 registers, at 8 ~100;
# d = 128 spills at 8 and 16 warps, takes 64 registers at 32). Not yet timed on a GPU.
MIX_DECODE_CONFIGS = {16: {"num_warps": 2}, 32: {"num_warps": 4}, 64: {"num_warps": 8}, 128: {"num_warps": 32}}
_MAX_MIX_D = 128


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _dot(a, b, acc, LOWP: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
        """acc + a @ b in fp32: bf16 operands if LOWP, else fp32 operands at PRECISION."""
        if LOWP:
            a = a.to(tl.bfloat16)
            b = b.to(tl.bfloat16)
            if INTERPRETED:  # the interpreter's bf16 dot is wrong; bf16 x bf16 products are exact in fp32
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _ssm_step_kernel(
        Q, K, V, G, S_IN, Y, S_OUT,
        sq_b, sq_h, sq_k,
        sk_b, sk_h, sk_k,
        sv_b, sv_h, sv_v,
        sg_b, sg_h,
        ss_b, ss_h, ss_k, ss_v,
        sy_b, sy_h, sy_v,
        so_b, so_h, so_k, so_v,
        H, DK, DV,
        BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """One decode step, program (b * H + h, V tile): h = exp(g) h + k^T v, y = q h."""
        if PDL:  # launched before the previous kernel finished: wait for its results
            tl.extra.cuda.gdc_wait()
        pid_bh = tl.program_id(0)
        b = (pid_bh // H).to(tl.int64)
        hd = (pid_bh % H).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        k_ok = offs_k < DK
        v_ok = offs_v < DV
        kv_ok = k_ok[:, None] & v_ok[None, :]

        state = tl.load(
            S_IN + b * ss_b + hd * ss_h + offs_k[:, None] * ss_k + offs_v[None, :] * ss_v, mask=kv_ok, other=0.0
        ).to(tl.float32)
        q = tl.load(Q + b * sq_b + hd * sq_h + offs_k * sq_k, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(K + b * sk_b + hd * sk_h + offs_k * sk_k, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(V + b * sv_b + hd * sv_h + offs_v * sv_v, mask=v_ok, other=0.0).to(tl.float32)
        g = tl.load(G + b * sg_b + hd * sg_h).to(tl.float32)
        if PDL:  # every input is loaded: the next kernel may start its launch now
            tl.extra.cuda.gdc_launch_dependents()

        state = state * tl.exp2(g * 1.4426950408889634) + k[:, None] * v[None, :]  # exp(g) = 2^(g log2 e)
        y = tl.sum(q[:, None] * state, 0)
        tl.store(Y + b * sy_b + hd * sy_h + offs_v * sy_v, y.to(Y.dtype.element_ty), mask=v_ok)
        tl.store(S_OUT + b * so_b + hd * so_h + offs_k[:, None] * so_k + offs_v[None, :] * so_v, state, mask=kv_ok)

    @triton.jit
    def _ssm_chunk_kernel(
        Q, K, V, G, S_IN, Y, S_OUT,
        sq_b, sq_h, sq_t, sq_k,
        sk_b, sk_h, sk_t, sk_k,
        sv_b, sv_h, sv_t, sv_v,
        sg_b, sg_h, sg_t,
        ss_b, ss_h, ss_k, ss_v,
        sy_b, sy_h, sy_t, sy_v,
        so_b, so_h, so_k, so_v,
        H, T, DK, DV, GROUP,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr,
        LOWP: tl.constexpr,
        PRECISION: tl.constexpr,
        INTERPRETED: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Chunked scan, program (b * H + h, V tile): the chunks in order, the state tile in registers.

        Per chunk (ssm_chunked's form): G = cumsum(g); y = (q k^T * exp(G_t - G_s), s <= t) v
        + exp(G) (q h); h = exp(G_C) h + (k exp(G_C - G))^T v. Tokens past T load as zeros
        (g = 0 keeps G flat there, k = 0 adds nothing to the state) and are not stored.
        Head h reads k and v at head h // GROUP (grouped kv heads, unrepeated).
        """
        if PDL:  # launched before the previous kernel finished: wait for its results
            tl.extra.cuda.gdc_wait()
        pid_bh = tl.program_id(0)
        b = (pid_bh // H).to(tl.int64)
        hd = (pid_bh % H).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_T)
        offs_k = tl.arange(0, BLOCK_K)
        offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        k_ok = offs_k < DK
        v_ok = offs_v < DV
        causal = offs_c[None, :] <= offs_c[:, None]  # [t, s]: s <= t

        state = tl.load(
            S_IN + b * ss_b + hd * ss_h + offs_k[:, None] * ss_k + offs_v[None, :] * ss_v,
            mask=k_ok[:, None] & v_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        Q_base = Q + b * sq_b + hd * sq_h
        kv = hd // GROUP
        K_base = K + b * sk_b + kv * sk_h
        V_base = V + b * sv_b + kv * sv_h
        G_base = G + b * sg_b + hd * sg_h
        Y_base = Y + b * sy_b + hd * sy_h
        zero_tt = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
        zero_tv = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)

        for start in range(0, T, BLOCK_T):
            offs_t = start + offs_c
            t_ok = offs_t < T
            t64 = offs_t.to(tl.int64)
            tk_ok = t_ok[:, None] & k_ok[None, :]
            q = tl.load(Q_base + t64[:, None] * sq_t + offs_k[None, :] * sq_k, mask=tk_ok, other=0.0)
            k = tl.load(K_base + t64[:, None] * sk_t + offs_k[None, :] * sk_k, mask=tk_ok, other=0.0)
            tv_ok = t_ok[:, None] & v_ok[None, :]
            v = tl.load(V_base + t64[:, None] * sv_t + offs_v[None, :] * sv_v, mask=tv_ok, other=0.0)
            g = tl.load(G_base + t64 * sg_t, mask=t_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            cum = tl.cumsum(g, 0)  # G_t in log2 units
            total = tl.sum(g, 0)  # G_C: the chunk's whole decay (tokens past T add 0)

            # Inter-chunk: the state entering the chunk, decayed to each token.
            y = tl.exp2(cum)[:, None] * _dot(q, state, zero_tv, LOWP, PRECISION, INTERPRETED)
            # Intra-chunk: scores[t, s] = (q_t . k_s) 2^(G_t - G_s) for s <= t; masked first, so no 2^(+x).
            weights = tl.exp2(tl.where(causal, cum[:, None] - cum[None, :], float("-inf")))
            scores = _dot(q, tl.trans(k), zero_tt, LOWP, PRECISION, INTERPRETED) * weights
            y = _dot(scores, v, y, LOWP, PRECISION, INTERPRETED)
            tl.store(Y_base + t64[:, None] * sy_t + offs_v[None, :] * sy_v, y.to(Y.dtype.element_ty), mask=tv_ok)

            k_decayed = k.to(tl.float32) * tl.exp2(total - cum)[:, None]
            state = _dot(tl.trans(k_decayed), v, state * tl.exp2(total), LOWP, PRECISION, INTERPRETED)

        tl.store(
            S_OUT + b * so_b + hd * so_h + offs_k[:, None] * so_k + offs_v[None, :] * so_v,
            state,
            mask=k_ok[:, None] & v_ok[None, :],
        )
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()


    @triton.jit
    def _ssm_mix_step_kernel(
        Q, K, V, DT, A_LOG, S_IN, Y, S_OUT, KEEP, DT_BIAS,
        sq_b, sq_n,
        sk_b, sk_n,
        sv_b, sv_n,
        sdt_b, sdt_h,
        sa,
        ss_b, ss_h, ss_k, ss_v,
        sy_b, sy_n,
        so_b, so_h, so_k, so_v,
        skeep,
        H, D, GROUP, k_scale, eps,
        BLOCK: tl.constexpr,
        HAS_KEEP: tl.constexpr,
        HAS_DT_BIAS: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """``flashc.ssm_mix``'s decode step, program b * H + h, the whole [d, d] state tile:
        g = -exp(A_log) softplus(dt); h = exp(g) h + (k d^-0.5)^T v at kv head h // GROUP;
        y = rms_norm(q h) over d. q, k, v are [B, 1, heads * d] rows (last-dim stride sq_n ...).
        HAS_KEEP: h is first scaled by its sequence's KEEP[b] (0: restart; flashc.ssm_mix_into,
        which passes S_OUT = S_IN: each program reads its whole tile before writing it)."""
        if PDL:  # launched before the previous kernel finished: wait for its results
            tl.extra.cuda.gdc_wait()
        pid = tl.program_id(0)
        b = (pid // H).to(tl.int64)
        hd = (pid % H).to(tl.int64)
        kv = hd // GROUP
        offs = tl.arange(0, BLOCK)
        ok = offs < D
        tile_ok = ok[:, None] & ok[None, :]

        state = tl.load(
            S_IN + b * ss_b + hd * ss_h + offs[:, None] * ss_k + offs[None, :] * ss_v, mask=tile_ok, other=0.0
        ).to(tl.float32)
        if HAS_KEEP:  # 0 restarts the sequence from a zero state
            state = state * tl.load(KEEP + b * skeep).to(tl.float32)
        q = tl.load(Q + b * sq_b + (hd * D + offs) * sq_n, mask=ok, other=0.0).to(tl.float32)
        k = tl.load(K + b * sk_b + (kv * D + offs) * sk_n, mask=ok, other=0.0)
        v = tl.load(V + b * sv_b + (kv * D + offs) * sv_n, mask=ok, other=0.0).to(tl.float32)
        dt = tl.load(DT + b * sdt_b + hd * sdt_h).to(tl.float32)
        if HAS_DT_BIAS:  # added in fp32, as the op adds it
            dt += tl.load(DT_BIAS + hd).to(tl.float32)
        a_log = tl.load(A_LOG + hd * sa).to(tl.float32)
        if PDL:  # every input is loaded: the next kernel may start its launch now
            tl.extra.cuda.gdc_launch_dependents()

        # k d^-0.5 rounded to k's dtype, as the op scales k before the scan.
        k = (k.to(tl.float32) * k_scale).to(K.dtype.element_ty).to(tl.float32)
        softplus = tl.maximum(dt, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(dt)))  # no overflow for large dt
        g = -tl.exp(a_log) * softplus
        state = state * tl.exp2(g * 1.4426950408889634) + k[:, None] * v[None, :]  # exp(g) = 2^(g log2 e)
        y = tl.sum(q[:, None] * state, 0)
        y = y.to(V.dtype.element_ty).to(tl.float32)  # the scan's output is in v's dtype, then normalized in fp32
        y = y * tl.rsqrt(tl.sum(y * y, 0) / D + eps)  # lanes past D are 0: they add nothing
        tl.store(Y + b * sy_b + (hd * D + offs) * sy_n, y.to(Y.dtype.element_ty), mask=ok)
        tl.store(S_OUT + b * so_b + hd * so_h + offs[:, None] * so_k + offs[None, :] * so_v, state, mask=tile_ok)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _check_scan(q, k, v, log_decay, state) -> None:
    fn = "ssm_scan_triton"
    require_triton(fn)
    for name, t in (("q", q), ("k", k), ("v", v), ("state", state)):
        check_tensor(fn, name, t, ndim=4)
    check_tensor(fn, "log_decay", log_decay, ndim=3)
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{fn}: q and k must be [B, H, T, K] and v [B, H, T, V] alike, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if log_decay.shape != (B, H, T):
        raise ValueError(f"{fn}: log_decay must be [B, H, T] = {(B, H, T)}, got {tuple(log_decay.shape)}")
    if state.shape != (B, H, DK, DV):
        raise ValueError(f"{fn}: state must be [B, H, K, V] = {(B, H, DK, DV)}, got {tuple(state.shape)}")
    if DK > _MAX_K:
        raise ValueError(f"{fn}: K = {DK} exceeds {_MAX_K}, the largest state tile the kernels hold in registers")
    check_devices(fn, _ssm_chunk_kernel, [("q", q), ("k", k), ("v", v), ("log_decay", log_decay), ("state", state)])


def _block_v(DK: int, DV: int, elements: int = 2048) -> int:
    """The decode step's V tile: a power of 2 >= 16 giving about ``elements`` state entries per program."""
    return max(16, min(next_pow2(DV), elements // max(16, next_pow2(DK))))


def _dot_mode(q, k, v) -> tuple[bool, str]:
    """(bf16 operands, fp32 operand precision): see the module docstring."""
    dtypes = {q.dtype, k.dtype, v.dtype}
    if dtypes == {torch.bfloat16}:
        return True, "ieee"
    if dtypes == {torch.float16}:
        return False, "tf32"
    return False, "ieee"


def _launch_step(q, k, v, log_decay, state, y, new_state, config):
    B, H, _, DK = q.shape
    DV = v.shape[-1]
    block_k = max(16, next_pow2(DK))
    block_v = int(config.get("BLOCK_V") or _block_v(DK, DV))
    if block_v != next_pow2(block_v):
        raise ValueError(f"ssm_scan_triton: BLOCK_V must be a power of 2, got config {config}")
    pdl = pdl_enabled(q.device)
    sq, sk, sv, sy = q.stride(), k.stride(), v.stride(), y.stride()
    with device_guard(q.device):
        _ssm_step_kernel[(B * H, triton.cdiv(DV, block_v))](
            q, k, v, log_decay, state, y, new_state,
            sq[0], sq[1], sq[3],
            sk[0], sk[1], sk[3],
            sv[0], sv[1], sv[3],
            log_decay.stride(0), log_decay.stride(1),
            *state.stride(),
            sy[0], sy[1], sy[3],
            *new_state.stride(),
            H, DK, DV,
            BLOCK_K=block_k,
            BLOCK_V=block_v,
            PDL=pdl,
            **({"launch_pdl": True} if pdl else {}),
            **launch_opts(config),
        )


def _launch_chunked(q, k, v, log_decay, state, y, new_state, config, group: int = 1):
    """The chunked kernel; k and v may hold H // group heads, head h reading head h // group."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    block_k = max(16, next_pow2(DK))
    config = {**PREFILL_CONFIGS[max(32, block_k)], **(config or {})}
    block_t = int(config["BLOCK_T"])
    block_v = min(int(config["BLOCK_V"]), max(16, next_pow2(DV)))
    if min(block_t, block_v) < 16 or block_t != next_pow2(block_t) or block_v != next_pow2(block_v):
        raise ValueError(f"ssm_scan_triton: BLOCK_T and BLOCK_V must be powers of 2 >= 16 (tl.dot), "
                         f"got config {config}")
    lowp, precision = _dot_mode(q, k, v)
    pdl = pdl_enabled(q.device)
    with device_guard(q.device):
        _ssm_chunk_kernel[(B * H, triton.cdiv(DV, block_v))](
            q, k, v, log_decay, state, y, new_state,
            *q.stride(), *k.stride(), *v.stride(), *log_decay.stride(), *state.stride(), *y.stride(),
            *new_state.stride(),
            H, T, DK, DV, group,
            BLOCK_T=block_t,
            BLOCK_K=block_k,
            BLOCK_V=block_v,
            LOWP=lowp,
            PRECISION=precision,
            INTERPRETED=is_interpreted(_ssm_chunk_kernel),
            PDL=pdl,
            **({"launch_pdl": True} if pdl else {}),
            **launch_opts(config),
        )


def ssm_scan_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor,
    *,
    state_out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flashc.ssm_scan`` on Triton: ``(y[B, H, T, V] in v's dtype, new_state[B, H, K, V] fp32)``.

    ``q, k[B, H, T, K]``, ``v[B, H, T, V]``, ``log_decay[B, H, T]`` (each <= 0) and
    ``state[B, H, K, V]``, float dtypes, any strides (e.g. transposes of [B, T, H, K]
    projections). T = 1 runs the decode step kernel, T > 1 the chunked kernel.
    ``state_out``: an fp32 ``[B, H, K, V]`` buffer for the new state; it may be ``state``
    itself (an in-place update: each program reads its tile before writing it).
    ``config`` overrides the launch config (decode: ``BLOCK_V``, ``num_warps``; prefill:
    also ``BLOCK_T``, ``num_stages``; defaults: ``DECODE_CONFIG``, ``PREFILL_CONFIGS``).
    """
    _check_scan(q, k, v, log_decay, state)
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    if state_out is None:
        state_out = torch.empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    else:
        check_out("ssm_scan_triton", "state_out", state_out, (B, H, DK, DV), torch.float32, q.device, inputs=(q, k, v))
    y = torch.empty((B, H, T, DV), dtype=v.dtype, device=q.device)
    if B * H * DK * DV == 0 or T == 0:
        if state_out is not state:
            state_out.copy_(state)
        return y, state_out
    if T == 1:
        _launch_step(q, k, v, log_decay, state, y, state_out, {**DECODE_CONFIG, **(config or {})})
    else:
        _launch_chunked(q, k, v, log_decay, state, y, state_out, config)
    return y, state_out


def _launch_mix_step(q, k, v, dt, A_log, state, y, new_state, heads, kv_heads, d, eps, config, keep=None,
                     dt_bias=None):
    block = max(16, next_pow2(d))
    config = {**MIX_DECODE_CONFIGS[block], **(config or {})}
    pdl = pdl_enabled(q.device)
    with device_guard(q.device):
        _ssm_mix_step_kernel[(q.shape[0] * heads,)](
            q, k, v, dt, A_log, state, y, new_state, keep if keep is not None else state,
            dt_bias if dt_bias is not None else A_log,
            q.stride(0), q.stride(2),
            k.stride(0), k.stride(2),
            v.stride(0), v.stride(2),
            dt.stride(0), dt.stride(2),
            A_log.stride(0),
            *state.stride(),
            y.stride(0), y.stride(2),
            *new_state.stride(),
            keep.stride(0) if keep is not None else 0,
            heads, d, heads // kv_heads, d ** -0.5, float(eps),
            BLOCK=block,
            HAS_KEEP=keep is not None,
            HAS_DT_BIAS=dt_bias is not None,
            PDL=pdl,
            **({"launch_pdl": True} if pdl else {}),
            **launch_opts(config),
        )


def ssm_mix_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dt: torch.Tensor,
    A_log: torch.Tensor,
    state: torch.Tensor,
    heads: int,
    kv_heads: int,
    eps: float,
    dt_bias: torch.Tensor | None = None,
    *,
    state_out: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flashc.ssm_mix`` on Triton: ``(y[B, T, heads * d] in q's dtype, new_state[B, heads, d, d] fp32)``.

    ``q[B, T, heads * d]``, ``k, v[B, T, kv_heads * d]`` (rows may be strided, e.g. slices of a
    merged projection), ``dt[B, T, heads]`` before softplus (``dt_bias[heads]`` added in fp32),
    ``A_log[heads]``, ``state[B, heads, d, d]``.
    T = 1: one kernel (``_ssm_mix_step_kernel``, d <= 128) does the whole step. T > 1: the scan's
    inputs from torch ops (``mix_inputs``, k and v unrepeated), the chunked kernel reading grouped
    heads, the per-head norm in torch (prefill is not launch-bound). ``state_out`` may be
    ``state`` (in place). ``keep`` ([B] or [B, 1, 1, 1]) scales each sequence's start state
    (``flashc.ssm_mix_into``'s reset; the decode kernel applies it as it reads the tile).
    ``config`` overrides the launch config (``MIX_DECODE_CONFIGS``, ``PREFILL_CONFIGS``).
    """
    fn = "ssm_mix_triton"
    require_triton(fn)
    named = [("q", q), ("k", k), ("v", v), ("dt", dt), ("A_log", A_log), ("state", state)]
    named += [("dt_bias", dt_bias)] if dt_bias is not None else []
    for name, t in named:
        check_tensor(fn, name, t)
    d = check_mix(fn, q, k, v, dt, A_log, state, heads, kv_heads, dt_bias)
    check_devices(fn, _ssm_mix_step_kernel, named)
    B, T = q.shape[:2]
    if state_out is None:
        state_out = torch.empty((B, heads, d, d), dtype=torch.float32, device=q.device)
    else:
        check_out(fn, "state_out", state_out, (B, heads, d, d), torch.float32, q.device, inputs=(q, k, v, dt, A_log))
    keep = checked_keep(fn, keep, state)
    if keep is not None and (T != 1 or B * heads * d == 0):  # the decode kernel scales the tiles it reads
        state, keep = restarted(state, keep), None
    if B * heads * d == 0 or T == 0:
        if state_out is not state:
            state_out.copy_(state)
        return torch.empty((B, T, heads * d), dtype=q.dtype, device=q.device), state_out
    if T == 1:
        if d > _MAX_MIX_D:
            raise ValueError(f"{fn}: head dim {d} exceeds {_MAX_MIX_D}, the largest state tile the decode step "
                             "holds in one program")
        y = torch.empty((B, 1, heads * d), dtype=q.dtype, device=q.device)
        _launch_mix_step(q, k, v, dt, A_log, state, y, state_out, heads, kv_heads, d, eps, config, keep=keep,
                         dt_bias=dt_bias)
        return y, state_out
    if d > _MAX_K:
        raise ValueError(f"{fn}: head dim {d} exceeds {_MAX_K}, the largest state tile the kernels hold in registers")
    if dt_bias is not None:
        dt = dt.float() + dt_bias.float()
    qh, kh, vh, log_decay = mix_inputs(q, k, v, dt, A_log, heads, kv_heads)
    y_heads = torch.empty((B, T, heads, d), dtype=v.dtype, device=q.device)  # the scan's y, in v's dtype
    _launch_chunked(qh, kh, vh, log_decay, state, y_heads.transpose(1, 2), state_out, config, heads // kv_heads)
    return head_rms_norm(y_heads, eps, q.dtype).view(B, T, heads * d), state_out


def checked_keep(fn: str, keep: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor | None:
    """A mix_into op's keep factors ([B] or [B, 1, 1, 1], one a sequence of state) as [B]; None stays None."""
    if keep is None:
        return None
    check_tensor(fn, "keep", keep)
    if keep.numel() != state.shape[0] or keep.device != state.device:
        raise ValueError(f"{fn}: keep must hold one factor a sequence ({state.shape[0]}) on {state.device}, "
                         f"got {tuple(keep.shape)} on {keep.device}")
    return keep.reshape(-1)


def ssm_mix_into_triton(q, k, v, dt, A_log, state, keep, heads, kv_heads, eps, dt_bias=None) -> torch.Tensor:
    """``flashc.ssm_mix_into`` on Triton: ``ssm_mix`` from ``state * keep`` with the new state
    written into ``state``; returns y. T = 1: the decode kernel reads each state tile, scales it by
    its sequence's ``keep`` ([B] or [B, 1, 1, 1]) and writes it back in place: one pass over the
    state. T > 1: the scaled start state in torch, the chunked scan writing ``state``."""
    y, _ = ssm_mix_triton(q, k, v, dt, A_log, state, heads, kv_heads, eps, dt_bias, state_out=state, keep=keep)
    return y

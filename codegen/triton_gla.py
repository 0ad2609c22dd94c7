"""Triton kernels for ``flashc.gla_mix``: gated linear attention's decode step and chunked prefill.

GLA (Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training",
ICML 2024, arXiv:2312.06635), per (batch, head), a state ``S[K, V]`` in fp32 decayed by a rate
per key dimension::

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t          y_t = q_t S_t          alpha_t = exp(log_alpha_t)

References (``flashc.ssm_ops``, what the tests check against): ``gla_recurrent`` (the
definition), ``gla_chunked`` (the paper's two-level chunked form) and ``gla_mix_reference``.

**Decode** (T = 1, ``_gla_mix_step_kernel``): the whole of ``gla_mix`` in one kernel, one
program per (b, h) holding the ``[d, d]`` state tile (the output norm needs all of a head's
y): log_alpha = logsigmoid(gate) / tau, ``S = alpha S + (k d^-0.5)^T v``, ``y = q S``, RMSNorm.
The state is read and written once, as ``ssm_mix``'s step does.

**Prefill** (T > 1, ``_gla_chunk_kernel``): program (b, h, V tile) walks the sequence in
sub-chunks of ``BLOCK_C`` tokens with the state tile in registers (fp32) throughout, the fused
form of the paper's chunkwise algorithm (its "materialize no state" variant, as
flash-linear-attention's ``fused_chunk_gla``). Per sub-chunk, with the cumulative log gates
``B_t = log alpha_1 + ... + log alpha_t`` (per key dim)::

    y_t   = (q_t * exp(B_t)) S + sum_{s <= t} [sum_k q_tk k_sk exp(B_tk - B_sk)] v_s
    S_end = diag(exp(B_C)) S + sum_s (k_s * exp(B_C - B_s))^T v_s

Three matmuls (inter-chunk y, scores times v, the state update) and the intra-sub-chunk scores
in full precision in log space, as the paper computes its diagonal sub-chunks: the exponent
``B_t - B_s`` per key dimension is masked (s <= t) before ``exp2``, so every factor is <= 1 and
no decay, however fast, overflows. That term is a ``[C, C, K]`` product on CUDA cores, hence the
small sub-chunk (16 tokens, tl.dot's smallest tile).

Precision as ``codegen/triton_ssm.py`` (its ``_dot`` and ``_dot_mode``): fp32 accumulation,
fp32 inputs in exact fp32, fp16 in TF32, bf16 as bf16 matmul operands (scores and state
rounded to bf16 as operands; the running state stays fp32).
"""

from __future__ import annotations

import torch

from flashc.ssm_ops import (  # the op's semantics, shared with its reference
    check_gla_mix,
    gla_inputs,
    head_rms_norm,
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
from .triton_ssm import MIX_DECODE_CONFIGS, _dot_mode, checked_keep

if HAS_TRITON:
    from .triton_ssm import _dot

__all__ = ["gla_scan_triton", "gla_mix_triton", "PREFILL_CONFIGS", "MIX_DECODE_CONFIGS"]

_MAX_K = 128  # the prefill's [BLOCK_C, BLOCK_C, BLOCK_K] log-space term and state tile live in registers
_MAX_MIX_D = 128  # the decode step holds a whole [d, d] state tile in one program

# Prefill launch configs by BLOCK_K, not yet timed or checked for register spills on a GPU.
# BLOCK_C = 16: the [C, C, K] intra-sub-chunk term grows with C^2 K (32K fp32 at K = 128).
PREFILL_CONFIGS = {
    16: {"BLOCK_C": 16, "BLOCK_V": 16, "num_warps": 2, "num_stages": 2},
    32: {"BLOCK_C": 16, "BLOCK_V": 32, "num_warps": 4, "num_stages": 2},
    64: {"BLOCK_C": 16, "BLOCK_V": 32, "num_warps": 4, "num_stages": 2},
    128: {"BLOCK_C": 16, "BLOCK_V": 32, "num_warps": 8, "num_stages": 2},
}


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _gla_chunk_kernel(
        Q, K, V, G, S_IN, Y, S_OUT,
        sq_b, sq_h, sq_t, sq_k,
        sk_b, sk_h, sk_t, sk_k,
        sv_b, sv_h, sv_t, sv_v,
        sg_b, sg_h, sg_t, sg_k,
        ss_b, ss_h, ss_k, ss_v,
        sy_b, sy_h, sy_t, sy_v,
        so_b, so_h, so_k, so_v,
        H, T, DK, DV, GROUP,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr,
        LOWP: tl.constexpr,
        PRECISION: tl.constexpr,
        INTERPRETED: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Chunked GLA scan, program (b * H + h, V tile): the sub-chunks in order, the state tile in
        registers (see the module doc). Tokens past T load as zeros (log_alpha = 0 keeps B flat,
        k = 0 adds nothing) and are not stored. Head h reads k and v at head h // GROUP."""
        if PDL:  # launched before the previous kernel finished: wait for its results
            tl.extra.cuda.gdc_wait()
        pid_bh = tl.program_id(0)
        b = (pid_bh // H).to(tl.int64)
        hd = (pid_bh % H).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_C)
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
        zero_cv = tl.zeros([BLOCK_C, BLOCK_V], dtype=tl.float32)

        for start in range(0, T, BLOCK_C):
            offs_t = start + offs_c
            t_ok = offs_t < T
            t64 = offs_t.to(tl.int64)
            tk_ok = t_ok[:, None] & k_ok[None, :]
            q = tl.load(Q_base + t64[:, None] * sq_t + offs_k[None, :] * sq_k, mask=tk_ok, other=0.0).to(tl.float32)
            k = tl.load(K_base + t64[:, None] * sk_t + offs_k[None, :] * sk_k, mask=tk_ok, other=0.0).to(tl.float32)
            tv_ok = t_ok[:, None] & v_ok[None, :]
            v = tl.load(V_base + t64[:, None] * sv_t + offs_v[None, :] * sv_v, mask=tv_ok, other=0.0)
            g = tl.load(G_base + t64[:, None] * sg_t + offs_k[None, :] * sg_k, mask=tk_ok, other=0.0)
            g = g.to(tl.float32) * 1.4426950408889634  # log2 units: exp(x) = 2^(x log2 e)
            cum = tl.cumsum(g, 0)  # [C, K]: B_t, non-increasing down the sub-chunk
            total = tl.sum(g, 0)  # [K]: B_C, the sub-chunk's whole decay (tokens past T add 0)

            # Inter-chunk: the state entering the sub-chunk, decayed to each token per key dim.
            y = _dot(q * tl.exp2(cum), state, zero_cv, LOWP, PRECISION, INTERPRETED)
            # Intra-sub-chunk, in log space: scores[t, s] = sum_k q_tk k_sk 2^(B_tk - B_sk), s <= t,
            # the exponent masked before exp2, so no 2^(+x).
            diff = tl.where(causal[:, :, None], cum[:, None, :] - cum[None, :, :], float("-inf"))
            scores = tl.sum(q[:, None, :] * k[None, :, :] * tl.exp2(diff), 2)
            y = _dot(scores, v, y, LOWP, PRECISION, INTERPRETED)
            tl.store(Y_base + t64[:, None] * sy_t + offs_v[None, :] * sy_v, y.to(Y.dtype.element_ty), mask=tv_ok)

            k_decayed = k * tl.exp2(total[None, :] - cum)
            state = _dot(tl.trans(k_decayed), v, state * tl.exp2(total)[:, None], LOWP, PRECISION, INTERPRETED)

        tl.store(
            S_OUT + b * so_b + hd * so_h + offs_k[:, None] * so_k + offs_v[None, :] * so_v,
            state,
            mask=k_ok[:, None] & v_ok[None, :],
        )
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _gla_mix_step_kernel(
        Q, K, V, GATE, S_IN, Y, S_OUT, KEEP,
        sq_b, sq_n,
        sk_b, sk_n,
        sv_b, sv_n,
        sg_b, sg_n,
        ss_b, ss_h, ss_k, ss_v,
        sy_b, sy_n,
        so_b, so_h, so_k, so_v,
        skeep,
        H, D, GROUP, k_scale, inv_tau, eps,
        BLOCK: tl.constexpr,
        HAS_KEEP: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """``flashc.gla_mix``'s decode step, program b * H + h, the whole [d, d] state tile:
        log_alpha = logsigmoid(gate) / tau; S = diag(alpha) S + (k d^-0.5)^T v at kv head h // GROUP;
        y = rms_norm(q S) over d. q, k, v, gate are [B, 1, N] rows (last-dim stride sq_n ...).
        HAS_KEEP: S is first scaled by its sequence's KEEP[b] (flashc.gla_mix_into, in place)."""
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
        z = tl.load(GATE + b * sg_b + (hd * D + offs) * sg_n, mask=ok, other=0.0).to(tl.float32)
        if PDL:  # every input is loaded: the next kernel may start its launch now
            tl.extra.cuda.gdc_launch_dependents()

        # k d^-0.5 rounded to k's dtype, as the op scales k before the scan.
        k = (k.to(tl.float32) * k_scale).to(K.dtype.element_ty).to(tl.float32)
        log_sigmoid = tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))  # no overflow for large |z|
        alpha = tl.exp2(log_sigmoid * inv_tau * 1.4426950408889634)
        state = state * alpha[:, None] + k[:, None] * v[None, :]
        y = tl.sum(q[:, None] * state, 0)
        y = y.to(V.dtype.element_ty).to(tl.float32)  # the scan's output is in v's dtype, then normalized in fp32
        y = y * tl.rsqrt(tl.sum(y * y, 0) / D + eps)  # lanes past D are 0: they add nothing
        tl.store(Y + b * sy_b + (hd * D + offs) * sy_n, y.to(Y.dtype.element_ty), mask=ok)
        tl.store(S_OUT + b * so_b + hd * so_h + offs[:, None] * so_k + offs[None, :] * so_v, state, mask=tile_ok)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------
def _launch_chunked(q, k, v, log_alpha, state, y, new_state, config, group: int = 1):
    """The chunked kernel; k and v may hold H // group heads, head h reading head h // group."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    block_k = max(16, next_pow2(DK))
    config = {**PREFILL_CONFIGS[block_k], **(config or {})}
    block_c = int(config["BLOCK_C"])
    block_v = min(int(config["BLOCK_V"]), max(16, next_pow2(DV)))
    if min(block_c, block_v) < 16 or block_c != next_pow2(block_c) or block_v != next_pow2(block_v):
        raise ValueError(f"gla_scan_triton: BLOCK_C and BLOCK_V must be powers of 2 >= 16 (tl.dot), "
                         f"got config {config}")
    lowp, precision = _dot_mode(q, k, v)
    pdl = pdl_enabled(q.device)
    with device_guard(q.device):
        _gla_chunk_kernel[(B * H, triton.cdiv(DV, block_v))](
            q, k, v, log_alpha, state, y, new_state,
            *q.stride(), *k.stride(), *v.stride(), *log_alpha.stride(), *state.stride(), *y.stride(),
            *new_state.stride(),
            H, T, DK, DV, group,
            BLOCK_C=block_c,
            BLOCK_K=block_k,
            BLOCK_V=block_v,
            LOWP=lowp,
            PRECISION=precision,
            INTERPRETED=is_interpreted(_gla_chunk_kernel),
            PDL=pdl,
            **({"launch_pdl": True} if pdl else {}),
            **launch_opts(config),
        )


def gla_scan_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    state: torch.Tensor,
    *,
    state_out: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLA's scan on Triton (the chunked kernel): ``(y[B, H, T, V] in v's dtype, new_state[B, H, K, V] fp32)``.

    ``q, k, log_alpha[B, H, T, K]`` (log_alpha <= 0), ``v[B, H, T, V]``, ``state[B, H, K, V]``,
    float dtypes, any strides. ``state_out``: an fp32 ``[B, H, K, V]`` buffer for the new state;
    it may be ``state`` itself (each program reads its tile before writing it). ``config``
    overrides ``PREFILL_CONFIGS`` (``BLOCK_C``, ``BLOCK_V``, ``num_warps``, ``num_stages``).
    Reference: ``flashc.ssm_ops.gla_recurrent`` / ``gla_chunked``.
    """
    fn = "gla_scan_triton"
    require_triton(fn)
    for name, t in (("q", q), ("k", k), ("v", v), ("log_alpha", log_alpha), ("state", state)):
        check_tensor(fn, name, t, ndim=4)
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{fn}: q and k must be [B, H, T, K] and v [B, H, T, V] alike, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if log_alpha.shape != q.shape:
        raise ValueError(f"{fn}: log_alpha must be [B, H, T, K] like q = {tuple(q.shape)}, got "
                         f"{tuple(log_alpha.shape)}")
    if state.shape != (B, H, DK, DV):
        raise ValueError(f"{fn}: state must be [B, H, K, V] = {(B, H, DK, DV)}, got {tuple(state.shape)}")
    if DK > _MAX_K:
        raise ValueError(f"{fn}: K = {DK} exceeds {_MAX_K}, the largest key dim the chunked kernel holds in registers")
    check_devices(fn, _gla_chunk_kernel, [("q", q), ("k", k), ("v", v), ("log_alpha", log_alpha), ("state", state)])
    if state_out is None:
        state_out = torch.empty((B, H, DK, DV), dtype=torch.float32, device=q.device)
    else:
        check_out(fn, "state_out", state_out, (B, H, DK, DV), torch.float32, q.device, inputs=(q, k, v, log_alpha))
    y = torch.empty((B, H, T, DV), dtype=v.dtype, device=q.device)
    if B * H * DK * DV == 0 or T == 0:
        if state_out is not state:
            state_out.copy_(state)
        return y, state_out
    _launch_chunked(q, k, v, log_alpha, state, y, state_out, config)
    return y, state_out


def _launch_mix_step(q, k, v, gate, state, y, new_state, heads, kv_heads, d, tau, eps, config, keep=None):
    block = max(16, next_pow2(d))
    config = {**MIX_DECODE_CONFIGS[block], **(config or {})}
    pdl = pdl_enabled(q.device)
    with device_guard(q.device):
        _gla_mix_step_kernel[(q.shape[0] * heads,)](
            q, k, v, gate, state, y, new_state, keep if keep is not None else state,
            q.stride(0), q.stride(2),
            k.stride(0), k.stride(2),
            v.stride(0), v.stride(2),
            gate.stride(0), gate.stride(2),
            *state.stride(),
            y.stride(0), y.stride(2),
            *new_state.stride(),
            keep.stride(0) if keep is not None else 0,
            heads, d, heads // kv_heads, d ** -0.5, 1.0 / float(tau), float(eps),
            BLOCK=block,
            HAS_KEEP=keep is not None,
            PDL=pdl,
            **({"launch_pdl": True} if pdl else {}),
            **launch_opts(config),
        )


def gla_mix_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    state: torch.Tensor,
    heads: int,
    kv_heads: int,
    tau: float,
    eps: float,
    *,
    state_out: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flashc.gla_mix`` on Triton: ``(y[B, T, heads * d] in q's dtype, new_state[B, heads, d, d] fp32)``.

    ``q, gate[B, T, heads * d]`` (gate before the sigmoid), ``k, v[B, T, kv_heads * d]`` (rows may
    be strided), ``state[B, heads, d, d]``. T = 1: one kernel (``_gla_mix_step_kernel``) does the
    whole step. T > 1: the scan's inputs from torch ops (``gla_inputs``, k and v unrepeated), the
    chunked kernel reading grouped heads, the per-head norm in torch (prefill is not
    launch-bound). ``state_out`` may be ``state`` (in place). ``keep`` scales each sequence's start
    state (``flashc.gla_mix_into``'s reset, as ``ssm_mix_triton``'s). ``config`` overrides the launch
    config (``MIX_DECODE_CONFIGS``, ``PREFILL_CONFIGS``). Both need d <= 128.
    """
    fn = "gla_mix_triton"
    require_triton(fn)
    named = [("q", q), ("k", k), ("v", v), ("gate", gate), ("state", state)]
    for name, t in named:
        check_tensor(fn, name, t)
    d = check_gla_mix(fn, q, k, v, gate, state, heads, kv_heads, tau)
    check_devices(fn, _gla_mix_step_kernel, named)
    B, T = q.shape[:2]
    if state_out is None:
        state_out = torch.empty((B, heads, d, d), dtype=torch.float32, device=q.device)
    else:
        check_out(fn, "state_out", state_out, (B, heads, d, d), torch.float32, q.device, inputs=(q, k, v, gate))
    keep = checked_keep(fn, keep, state)
    if keep is not None and (T != 1 or B * heads * d == 0):  # the decode kernel scales the tiles it reads
        state, keep = restarted(state, keep), None
    if B * heads * d == 0 or T == 0:
        if state_out is not state:
            state_out.copy_(state)
        return torch.empty((B, T, heads * d), dtype=q.dtype, device=q.device), state_out
    if d > min(_MAX_K, _MAX_MIX_D):
        raise ValueError(f"{fn}: head dim {d} exceeds {_MAX_MIX_D}, the largest state tile the kernels hold in "
                         "one program")
    if T == 1:
        y = torch.empty((B, 1, heads * d), dtype=q.dtype, device=q.device)
        _launch_mix_step(q, k, v, gate, state, y, state_out, heads, kv_heads, d, tau, eps, config, keep=keep)
        return y, state_out
    qh, kh, vh, log_alpha = gla_inputs(q, k, v, gate, heads, kv_heads, tau)
    y_heads = torch.empty((B, T, heads, d), dtype=v.dtype, device=q.device)  # the scan's y, in v's dtype
    _launch_chunked(qh, kh, vh, log_alpha, state, y_heads.transpose(1, 2), state_out, config, heads // kv_heads)
    return head_rms_norm(y_heads, eps, q.dtype).view(B, T, heads * d), state_out


def gla_mix_into_triton(q, k, v, gate, state, keep, heads, kv_heads, tau, eps) -> torch.Tensor:
    """``flashc.gla_mix_into`` on Triton: ``gla_mix`` from ``state * keep`` with the new state
    written into ``state``; returns y (T = 1: one pass over the state, as ``ssm_mix_into_triton``)."""
    y, _ = gla_mix_triton(q, k, v, gate, state, heads, kv_heads, tau, eps, state_out=state, keep=keep)
    return y

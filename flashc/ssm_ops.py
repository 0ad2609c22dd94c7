"""State-space ops: `flashc.ssm_scan`, the recurrence of the attention-to-SSM rewrite.

A selective state-space layer in the Mamba-2 form (state space duality: Dao & Gu, "Transformers
are SSMs", ICML 2024, arXiv:2405.21060) with a scalar decay per head and time step:

    h_t = exp(g_t) * h_{t-1} + k_t^T v_t        h: [K, V] per (batch, head), fp32
    y_t = q_t h_t                               (q, k: the SSM's C and B; v: its x)

`ssm_scan(q, k, v, log_decay, state)` runs it over T steps from `state` and returns the
outputs and the state after the last step. One op serves both uses: a prefill chunk (T
tokens, computed chunk by chunk: `ssm_chunked`, the form a parallel kernel takes) and a
decode step (T = 1: the recurrence itself, constant memory whatever the context). The
functions below are the numeric truth, differentiable (distillation trains through
`ssm_chunked`), and the reference every backend's kernel is checked against.
"""

from __future__ import annotations

import torch

CHUNK = 64  # tokens per chunk of the reference's chunked form


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, state: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"ssm_scan: q and k must be [B, H, T, K] and v [B, H, T, V] alike, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, h, t, dk = q.shape
    if log_decay.shape != (b, h, t):
        raise ValueError(f"ssm_scan: log_decay must be [B, H, T] = {(b, h, t)}, got {tuple(log_decay.shape)}")
    if state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(f"ssm_scan: state must be [B, H, K, V] = {(b, h, dk, v.shape[-1])}, got {tuple(state.shape)}")


def ssm_recurrent(q, k, v, log_decay, state):
    """The recurrence step by step (fp32): the definition, for tests and T = 1."""
    _check(q, k, v, log_decay, state)
    h = state.float()
    ys = []
    for t in range(q.shape[2]):
        h = torch.exp(log_decay[:, :, t].float())[..., None, None] * h + \
            k[:, :, t].float().unsqueeze(-1) * v[:, :, t].float().unsqueeze(-2)
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t].float(), h))
    y = torch.stack(ys, dim=2) if ys else v.float()[:, :, :0]
    return y.to(v.dtype), h


def ssm_chunked(q, k, v, log_decay, state, chunk: int = CHUNK):
    """The same recurrence computed a chunk at a time (fp32), as a parallel kernel does.

    Inside a chunk with cumulative log decay G (G_t = g_1 + ... + g_t):
        y_t   = exp(G_t) q_t h_0 + sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s
        h_end = exp(G_C) h_0 + sum_s exp(G_C - G_s) k_s^T v_s
    Every exponent is <= 0 (decays are at most 1), so nothing overflows.
    """
    _check(q, k, v, log_decay, state)
    b, h, t, _ = q.shape
    out_dtype = v.dtype
    q, k, v, g = q.float(), k.float(), v.float(), log_decay.float()
    s = state.float()
    ys = []
    for start in range(0, t, chunk):
        qc, kc, vc = q[:, :, start:start + chunk], k[:, :, start:start + chunk], v[:, :, start:start + chunk]
        gc = torch.cumsum(g[:, :, start:start + chunk], dim=-1)  # [B, H, C]
        n = gc.shape[-1]
        diff = gc.unsqueeze(-1) - gc.unsqueeze(-2)  # [B, H, C(t), C(s)]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        weights = torch.exp(diff.masked_fill(~causal, float("-inf")))
        scores = (qc @ kc.transpose(-1, -2)) * weights
        y = scores @ vc + torch.exp(gc).unsqueeze(-1) * (qc @ s)
        ys.append(y)
        last = gc[..., -1:]  # [B, H, 1]
        s = torch.exp(last).unsqueeze(-1) * s + (kc * torch.exp(last - gc).unsqueeze(-1)).transpose(-1, -2) @ vc
    y = torch.cat(ys, dim=2) if ys else v[:, :, :0]
    return y.to(out_dtype), s


@torch.library.custom_op("flashc::ssm_scan", mutates_args=())
def ssm_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y[B, H, T, V] in v's dtype, state after the last step [B, H, K, V] fp32).

    q, k: [B, H, T, K]; v: [B, H, T, V]; log_decay: [B, H, T], each <= 0; state: [B, H, K, V]."""
    if q.shape[2] == 1:
        return ssm_recurrent(q, k, v, log_decay, state)
    return ssm_chunked(q, k, v, log_decay, state)


@ssm_scan.register_fake
def _(q, k, v, log_decay, state):
    b, h, t, dk = q.shape
    return (torch.empty(b, h, t, v.shape[-1], dtype=v.dtype, device=v.device),
            torch.empty(b, h, dk, v.shape[-1], dtype=torch.float32, device=v.device))


SSM_OPS = {"ssm_scan": torch.ops.flashc.ssm_scan.default}

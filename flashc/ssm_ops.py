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

`ssm_mix(q, k, v, dt, A_log, state, heads, kv_heads, eps)` is the layer's whole mixing around
the scan (grouped heads, k scaling, the decay from dt, the per-head output RMSNorm) as one op,
so a decode step, launch-bound with a dozen small kernels per layer, can run it as one.

`gla_mix(q, k, v, gate, state, heads, kv_heads, tau, eps)` is the same mixing for the gated
linear attention layer (GLA: Yang et al., "Gated Linear Attention Transformers with
Hardware-Efficient Training", ICML 2024, arXiv:2312.06635), whose decay is a vector, one rate
per key dimension, instead of one scalar per head:

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t     alpha_t = sigmoid(gate_t)^(1/tau), S: [K, V] fp32
    o_t = q_t S_t

with `gla_recurrent` (the definition) and `gla_chunked` (the paper's two-level chunked form)
as its references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 64  # tokens per chunk of the reference's chunked form
SUBCHUNK = 16  # GLA's secondary chunks inside a chunk (the paper's c = 16)


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
    y = torch.stack(ys, dim=2) if ys else v.new_empty(*v.shape[:2], 0, v.shape[-1], dtype=torch.float32)
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
    y = torch.cat(ys, dim=2) if ys else v.new_empty(*v.shape[:2], 0, v.shape[-1])
    return y.to(out_dtype), s


@torch.library.custom_op("flashc::ssm_scan", mutates_args=())
def ssm_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y[B, H, T, V] in v's dtype, state after the last step [B, H, K, V] fp32).

    q, k: [B, H, T, K]; v: [B, H, T, V]; log_decay: [B, H, T], each <= 0; state: [B, H, K, V]."""
    y, new_state = (ssm_recurrent if q.shape[2] == 1 else ssm_chunked)(q, k, v, log_decay, state)
    if new_state is state:  # T = 0 hands back an fp32 state itself; an op's output may not alias an input
        new_state = new_state.clone()
    return y, new_state


@ssm_scan.register_fake
def _(q, k, v, log_decay, state):
    b, h, t, dk = q.shape
    return (torch.empty(b, h, t, v.shape[-1], dtype=v.dtype, device=v.device),
            torch.empty(b, h, dk, v.shape[-1], dtype=torch.float32, device=v.device))


def check_mix(fn: str, q, k, v, dt, A_log, state, heads: int, kv_heads: int, dt_bias=None) -> int:
    """Raise ValueError naming `fn` unless the arguments fit `ssm_mix`; return the head dim d."""
    b, t, d = _check_heads(fn, q, k, v, heads, kv_heads, ("dt", dt))
    if dt.shape != (b, t, heads):
        raise ValueError(f"{fn}: dt must be [B, T, heads] = {(b, t, heads)}, got {tuple(dt.shape)}")
    if A_log.shape != (heads,):
        raise ValueError(f"{fn}: A_log must be [heads] = {(heads,)}, got {tuple(A_log.shape)}")
    if dt_bias is not None and dt_bias.shape != (heads,):
        raise ValueError(f"{fn}: dt_bias must be [heads] = {(heads,)}, got {tuple(dt_bias.shape)}")
    _check_state(fn, state, b, heads, d)
    return d


def _check_heads(fn: str, q, k, v, heads: int, kv_heads: int, per_token: tuple[str, torch.Tensor]):
    """The checks `ssm_mix` and `gla_mix` share: the head counts, [B, T, N] projections (and the
    op's own per-token input `per_token`), k and v of kv_heads heads of q's size; (B, T, d)."""
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"{fn}: heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
    for name, t in (("q", q), ("k", k), ("v", v), per_token):
        if t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be [B, T, N], got shape {tuple(t.shape)}")
    b, t, n = q.shape
    if n % heads:
        raise ValueError(f"{fn}: q's last dim {n} is not divisible by heads = {heads}")
    d = n // heads
    for name, x in (("k", k), ("v", v)):
        if x.shape != (b, t, kv_heads * d):
            raise ValueError(f"{fn}: {name} must be [B, T, kv_heads * d] = {(b, t, kv_heads * d)} (d = {d}: q's last "
                             f"dim / heads), got {tuple(x.shape)}")
    return b, t, d


def _check_state(fn: str, state, b: int, heads: int, d: int) -> None:
    if state.shape != (b, heads, d, d):
        raise ValueError(f"{fn}: state must be [B, heads, d, d] = {(b, heads, d, d)}, got {tuple(state.shape)}")


def mix_inputs(q, k, v, dt, A_log, heads: int, kv_heads: int):
    """The scan's inputs from the projections, as `passes/ssm/layer.py` computes them:
    (q [B, heads, T, d], k and v [B, kv_heads, T, d], log_decay [B, heads, T] fp32), views of
    [B, T, ...] tensors. k is scaled by d^-0.5 in its own dtype; log_decay = -exp(A_log) *
    softplus(dt) in fp32. k and v stay grouped: head h reads kv head h // (heads // kv_heads)."""
    log_decay = -torch.exp(A_log.float()) * F.softplus(dt.float())
    return (*_split_heads(q, k, v, heads, kv_heads), log_decay.transpose(1, 2))


def _split_heads(q, k, v, heads: int, kv_heads: int):
    """(q [B, heads, T, d], k * d^-0.5 and v [B, kv_heads, T, d]) from [B, T, N] projections."""
    d = q.shape[-1] // heads
    qh = q.unflatten(-1, (heads, d))  # splitting the last dim is a view whatever q's row stride
    kh = k.unflatten(-1, (kv_heads, d)) * d ** -0.5
    vh = v.unflatten(-1, (kv_heads, d))
    return qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)


def head_rms_norm(y: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm (no weight) over the last dim in fp32, cast to `dtype`: the layer's per-head output norm."""
    yf = y.float()
    return (yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def ssm_mix_reference(q, k, v, dt, A_log, state, heads: int, kv_heads: int, eps: float, dt_bias=None):
    """`ssm_mix` in plain torch (differentiable): `mix_inputs` (dt_bias added to dt in fp32 first),
    k and v repeated to `heads`, the scan (y in v's dtype, as the layer's scan returns it), then
    `head_rms_norm` of each head's y."""
    d = check_mix("ssm_mix", q, k, v, dt, A_log, state, heads, kv_heads, dt_bias)
    if dt_bias is not None:
        dt = dt.float() + dt_bias.float()
    qh, kh, vh, log_decay = mix_inputs(q, k, v, dt, A_log, heads, kv_heads)
    return _scan_heads(q.dtype, qh, kh, vh, log_decay, state, heads, kv_heads, d, eps, ssm_recurrent, ssm_chunked)


def _scan_heads(dtype, qh, kh, vh, log_w, state, heads: int, kv_heads: int, d: int, eps: float, recurrent, chunked):
    """A mix reference's shared tail: k and v repeated to `heads`, the scan (`recurrent` for one
    token, else `chunked`), then `head_rms_norm` of each head's y, as [B, T, heads * d] in `dtype`."""
    if kv_heads != heads:
        kh = kh.repeat_interleave(heads // kv_heads, dim=1)
        vh = vh.repeat_interleave(heads // kv_heads, dim=1)
    scan = recurrent if qh.shape[2] == 1 else chunked
    y, new_state = scan(qh, kh, vh, log_w, state)
    b, t = qh.shape[0], qh.shape[2]
    return head_rms_norm(y, eps, dtype).transpose(1, 2).reshape(b, t, heads * d), new_state


@torch.library.custom_op("flashc::ssm_mix", mutates_args=())
def ssm_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, A_log: torch.Tensor,
            state: torch.Tensor, heads: int, kv_heads: int, eps: float,
            dt_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """An SSM layer's whole mixing, projections to output norm: (y[B, T, heads * d] in q's dtype, state fp32).

    q: [B, T, heads * d]; k, v: [B, T, kv_heads * d]; dt: [B, T, heads], the dt projection's
    output before softplus (dt_bias [heads], if given, added to it in fp32: the projection then has
    no bias and merges with q, k and v); A_log: [heads]; state: [B, heads, d, d]. What `passes/ssm/layer.py`
    computes between its projections (and q/k norms) and its output norm weight, as one op so
    a backend can run a decode step's dozen small kernels (repeat, scale, softplus, exp, norm,
    casts) as one. Reference: `ssm_mix_reference`."""
    y, new_state = ssm_mix_reference(q, k, v, dt, A_log, state, heads, kv_heads, eps, dt_bias)
    if new_state is state:  # T = 0 hands back an fp32 state itself; an op's output may not alias an input
        new_state = new_state.clone()
    return y, new_state


@ssm_mix.register_fake
def _(q, k, v, dt, A_log, state, heads, kv_heads, eps, dt_bias=None):
    d = q.shape[-1] // heads
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[0], heads, d, d, dtype=torch.float32, device=q.device))


# ------------------------------------------------------------------------------------------------
# Gated linear attention (GLA): a decay per key dimension
# ------------------------------------------------------------------------------------------------
def _check_gla(q, k, v, log_alpha, state) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gla scan: q and k must be [B, H, T, K] and v [B, H, T, V] alike, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if log_alpha.shape != q.shape:
        raise ValueError(f"gla scan: log_alpha must be [B, H, T, K] like q = {tuple(q.shape)}, got "
                         f"{tuple(log_alpha.shape)}")
    b, h, _, dk = q.shape
    if state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(f"gla scan: state must be [B, H, K, V] = {(b, h, dk, v.shape[-1])}, got {tuple(state.shape)}")


def gla_recurrent(q, k, v, log_alpha, state):
    """GLA's recurrence step by step (fp32): S = diag(exp(log_alpha_t)) S + k_t^T v_t, y_t = q_t S.

    q, k, log_alpha: [B, H, T, K] (log_alpha <= 0); v: [B, H, T, V]; state: [B, H, K, V].
    Returns (y [B, H, T, V] in v's dtype, the state after the last step, fp32)."""
    _check_gla(q, k, v, log_alpha, state)
    s = state.float()
    ys = []
    for t in range(q.shape[2]):
        s = torch.exp(log_alpha[:, :, t].float()).unsqueeze(-1) * s + \
            k[:, :, t].float().unsqueeze(-1) * v[:, :, t].float().unsqueeze(-2)
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t].float(), s))
    y = torch.stack(ys, dim=2) if ys else v.new_empty(*v.shape[:2], 0, v.shape[-1], dtype=torch.float32)
    return y.to(v.dtype), s


def _gla_intra_chunk(q, k, cum, subchunk: int) -> torch.Tensor:
    """A chunk's causal scores P[t, s] = sum_k q_tk k_sk exp(B_tk - B_sk), s <= t, for the cumulative
    log gates B (`cum`, [B, H, n, K], non-increasing along n), by GLA's secondary chunking
    (arXiv:2312.06635): between sub-chunks, two matmuls of operands rescaled around
    a reference point r (the last B before the row sub-chunk: exp(B_t - r) and exp(r - B_s)
    are both <= 1); inside a diagonal sub-chunk, the exponent B_t - B_s per key dimension taken
    in log space, masked before exp, so no factor ever exceeds 1."""
    n = q.shape[2]
    rows = []
    for i0 in range(0, n, subchunk):
        i1 = min(i0 + subchunk, n)
        qi, ki, bi = q[:, :, i0:i1], k[:, :, i0:i1], cum[:, :, i0:i1]
        causal = torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=q.device).tril()
        diff = (bi.unsqueeze(-2) - bi.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf"))  # [.., t, s, K]
        diagonal = (qi.unsqueeze(-2) * ki.unsqueeze(-3) * torch.exp(diff)).sum(-1)
        parts = [diagonal, q.new_zeros(*q.shape[:2], i1 - i0, n - i1)]
        if i0:
            r = cum[:, :, i0 - 1:i0]  # [B, H, 1, K]
            earlier = (qi * torch.exp(bi - r)) @ (k[:, :, :i0] * torch.exp(r - cum[:, :, :i0])).transpose(-1, -2)
            parts.insert(0, earlier)
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=-2)


def gla_chunked(q, k, v, log_alpha, state, chunk: int = CHUNK, subchunk: int = SUBCHUNK):
    """GLA's recurrence a chunk at a time (fp32), the paper's chunkwise form (arXiv:2312.06635).

    Inside a chunk with cumulative log gates B (B_t = log alpha_1 + ... + log alpha_t, per key dim):
        y_t   = (q_t * exp(B_t)) S_0 + sum_{s<=t} P[t, s] v_s       (P: `_gla_intra_chunk`)
        S_end = diag(exp(B_C)) S_0 + sum_s (k_s * exp(B_C - B_s))^T v_s
    Every exponent is <= 0 (alpha <= 1), so nothing overflows whatever the chunk's decay.
    Differentiable: distillation trains through it."""
    _check_gla(q, k, v, log_alpha, state)
    t = q.shape[2]
    out_dtype = v.dtype
    q, k, v, g = q.float(), k.float(), v.float(), log_alpha.float()
    s = state.float()
    ys = []
    for start in range(0, t, chunk):
        qc, kc, vc = q[:, :, start:start + chunk], k[:, :, start:start + chunk], v[:, :, start:start + chunk]
        cum = torch.cumsum(g[:, :, start:start + chunk], dim=2)  # [B, H, C, K]
        ys.append((qc * torch.exp(cum)) @ s + _gla_intra_chunk(qc, kc, cum, subchunk) @ vc)
        last = cum[:, :, -1:]  # [B, H, 1, K]
        s = torch.exp(last).transpose(-1, -2) * s + (kc * torch.exp(last - cum)).transpose(-1, -2) @ vc
    y = torch.cat(ys, dim=2) if ys else v.new_empty(*v.shape[:2], 0, v.shape[-1])
    return y.to(out_dtype), s


def check_gla_mix(fn: str, q, k, v, gate, state, heads: int, kv_heads: int, tau: float) -> int:
    """Raise ValueError naming `fn` unless the arguments fit `gla_mix`; return the head dim d."""
    if not tau > 0:
        raise ValueError(f"{fn}: the gate temperature tau must be > 0, got {tau}")
    b, t, d = _check_heads(fn, q, k, v, heads, kv_heads, ("gate", gate))
    if gate.shape != q.shape:
        raise ValueError(f"{fn}: gate must be [B, T, heads * d] like q = {tuple(q.shape)}, got {tuple(gate.shape)}")
    _check_state(fn, state, b, heads, d)
    return d


def gla_inputs(q, k, v, gate, heads: int, kv_heads: int, tau: float):
    """The GLA scan's inputs from the projections, as `passes/ssm/gla.py` computes them: (q
    [B, heads, T, d], k and v [B, kv_heads, T, d], log_alpha [B, heads, T, d] fp32), views of
    [B, T, ...] tensors. k is scaled by d^-0.5 in its own dtype, as `mix_inputs` does;
    log_alpha = logsigmoid(gate) / tau in fp32 (alpha = sigmoid(gate)^(1/tau), the paper's gate)."""
    log_alpha = F.logsigmoid(gate.float()).unflatten(-1, (heads, q.shape[-1] // heads)) / tau
    return (*_split_heads(q, k, v, heads, kv_heads), log_alpha.transpose(1, 2))


def gla_mix_reference(q, k, v, gate, state, heads: int, kv_heads: int, tau: float, eps: float):
    """`gla_mix` in plain torch (differentiable): `gla_inputs`, k and v repeated to `heads`, the
    scan (y in v's dtype), then `head_rms_norm` of each head's y."""
    d = check_gla_mix("gla_mix", q, k, v, gate, state, heads, kv_heads, tau)
    qh, kh, vh, log_alpha = gla_inputs(q, k, v, gate, heads, kv_heads, tau)
    return _scan_heads(q.dtype, qh, kh, vh, log_alpha, state, heads, kv_heads, d, eps, gla_recurrent, gla_chunked)


@torch.library.custom_op("flashc::gla_mix", mutates_args=())
def gla_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, state: torch.Tensor,
            heads: int, kv_heads: int, tau: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A GLA layer's whole mixing, projections to output norm: (y[B, T, heads * d] in q's dtype, state fp32).

    q, gate: [B, T, heads * d] (gate: the low-rank gate projection's output, before the
    sigmoid); k, v: [B, T, kv_heads * d]; state: [B, heads, d, d]; tau: the gate's temperature
    (16 in the paper). One op, as `ssm_mix` is, so a decode step can run as one kernel.
    Reference: `gla_mix_reference`."""
    y, new_state = gla_mix_reference(q, k, v, gate, state, heads, kv_heads, tau, eps)
    if new_state is state:  # T = 0 hands back an fp32 state itself; an op's output may not alias an input
        new_state = new_state.clone()
    return y, new_state


@gla_mix.register_fake
def _(q, k, v, gate, state, heads, kv_heads, tau, eps):
    d = q.shape[-1] // heads
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[0], heads, d, d, dtype=torch.float32, device=q.device))


# ------------------------------------------------------------------------------------------------
# The same mixings writing the layer's state buffer in place (the CUDA backend's late rewrite)
# ------------------------------------------------------------------------------------------------
def restarted(state: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The start state of a `*_mix_into` op: `state` scaled by each sequence's keep factor ([B] or
    [B, 1, 1, 1]: 0 restarts it from zero, 1 continues it); `state` itself without keep."""
    return state if keep is None else state * keep.reshape(-1, 1, 1, 1).to(state.dtype)


@torch.library.custom_op("flashc::ssm_mix_into", mutates_args=("state",))
def ssm_mix_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor, A_log: torch.Tensor,
                 state: torch.Tensor, keep: torch.Tensor | None, heads: int, kv_heads: int,
                 eps: float, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """`ssm_mix` from the state buffer `state` (times `keep`, [B] or [B, 1, 1, 1]: 0 restarts a
    sequence from a zero state, 1 continues it), the new state written back into `state`;
    returns y. What a layer's decode step does around `ssm_mix` (passes/ssm/layer.py: the
    reset multiply, the op, `state.copy_`), as one op: the CUDA backend's late pass
    (backends/cuda_rewrites.py: FuseStateWrites) writes it so that the state is read and
    written once a step, by the mixing kernel, instead of three times."""
    y, new_state = ssm_mix_reference(q, k, v, dt, A_log, restarted(state, keep), heads, kv_heads, eps, dt_bias)
    state.copy_(new_state)
    return y


@ssm_mix_into.register_fake
def _(q, k, v, dt, A_log, state, keep, heads, kv_heads, eps, dt_bias=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("flashc::gla_mix_into", mutates_args=("state",))
def gla_mix_into(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor, state: torch.Tensor,
                 keep: torch.Tensor | None, heads: int, kv_heads: int, tau: float, eps: float) -> torch.Tensor:
    """`gla_mix` from the state buffer `state` (times `keep`, as `ssm_mix_into`), the new state
    written back into it; returns y."""
    y, new_state = gla_mix_reference(q, k, v, gate, restarted(state, keep), heads, kv_heads, tau, eps)
    state.copy_(new_state)
    return y


@gla_mix_into.register_fake
def _(q, k, v, gate, state, keep, heads, kv_heads, tau, eps):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


SSM_OPS = {"ssm_scan": torch.ops.flashc.ssm_scan.default, "ssm_mix": torch.ops.flashc.ssm_mix.default,
           "gla_mix": torch.ops.flashc.gla_mix.default, "ssm_mix_into": torch.ops.flashc.ssm_mix_into.default,
           "gla_mix_into": torch.ops.flashc.gla_mix_into.default}

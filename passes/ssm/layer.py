"""The state-space layer that takes an attention layer's place.

`SSMAttention` is a drop-in for a decoder layer's self-attention module: it keeps the
attention's q/k/v/o projections (and q/k norms, where the model has them) and reads them as a
Mamba-2 layer reads its C, B, x and output projections, as Mamba-in-the-Llama (Wang et al.,
NeurIPS 2024, arXiv:2408.15237) initializes its layers from attention:

    q = C(x), k = B(x) / sqrt(d), v = x-projection(x)     per head, grouped-query heads repeated
    g = -exp(A_log) * softplus(dt(x) + dt_bias)         log decay per head and token (new weights)
    h_t = exp(g_t) h_{t-1} + k_t^T v_t,  y_t = q_t h_t   (flashc.ssm_scan's recurrence)
    out = o_proj(rms_norm_per_head(y) * norm_weight)
    (everything between the projections and norm_weight is one op, flashc.ssm_mix)

Without rotary and softmax the layer starts near, not at, the attention it replaces; the
distillation (`flashc.passes.ssm.distill`) closes the gap. dt starts at zero weight with a
bias that spreads the heads' memory over about 10 to 1,000 tokens (decay 0.9 to 0.999), as
Mamba initializes its time steps.

State: a plain forward starts every sequence from a zero state (the `forward` signature).
A decode step binds a state tensor per layer (`bind_state`): the layer then starts from it
(from zero where the position is 0: a new sequence) and writes the state after its tokens
back into it, as attention writes its KV cache.

`GLAAttention` (passes/ssm/gla.py) is the other kind: gated linear attention, a decay per key
dimension, on the same projections, norm and state.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from flashc.ssm_ops import ssm_mix_reference

DT_RANGE = (1e-3, 1e-1)  # initial softplus(dt) across heads: decay exp(-dt) from 0.999 to 0.905
NORM_EPS = 1e-6


def initial_decay_rates(heads: int) -> torch.Tensor:
    """Per head, the initial -log(decay) a token: log-spaced across DT_RANGE (memories of about
    1,000 down to 10 tokens), as Mamba initializes dt (Gu & Dao, arXiv:2312.00752)."""
    return torch.exp(torch.linspace(math.log(DT_RANGE[0]), math.log(DT_RANGE[1]), heads))


class SSMAttention(nn.Module):
    """Mamba-2-style state-space mixing in place of self-attention (see the module doc).

    The base of every state-space layer kind (`kind`): a kind changes only its decay's new
    weights (`init_decay`) and its mixing op (`mix`); projections, norms, the state's shape and
    its binding for decode steps are shared, so generation and the backends treat all alike."""

    kind = "mamba2"

    def __init__(self, attention: nn.Module, heads: int, kv_heads: int, head_dim: int, layer_index: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.o_proj = attention.v_proj, attention.o_proj
        self.q_norm = getattr(attention, "q_norm", None)
        self.k_norm = getattr(attention, "k_norm", None)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.layer_index = layer_index
        weight = self.q_proj.weight
        self.init_decay(self.q_proj.in_features, weight.device, weight.dtype)
        self.norm_weight = nn.Parameter(torch.ones(heads * head_dim, device=weight.device, dtype=weight.dtype))
        self._state: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None

    def init_decay(self, hidden: int, device, dtype) -> None:
        """The decay's new weights: dt_proj at zero weight, its bias spreading the heads' memory
        over about 10 to 1,000 tokens (softplus(dt) across DT_RANGE), and A_log = 0."""
        self.dt_proj = nn.Linear(hidden, self.heads, bias=True, device=device, dtype=dtype)
        with torch.no_grad():
            dt = initial_decay_rates(self.heads)
            self.dt_proj.weight.zero_()
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.zeros(self.heads, device=device, dtype=torch.float32))

    def mix(self, hidden_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized y [B, T, heads * d], the state after the tokens): flashc.ssm_mix's grouped
        heads, decay, scan and per-head norm, one op (one kernel a decode step on the CUDA
        target); training differentiates its reference."""
        # [B, T, H] before softplus; the bias added inside the op, so that the projection (no bias) merges
        # with q, k and v into one matmul (passes/merge.py merges linears with a bias and without apart)
        dt = F.linear(hidden_states, self.dt_proj.weight)
        mix = ssm_mix_reference if torch.is_grad_enabled() else torch.ops.flashc.ssm_mix
        return mix(q, k, v, dt, self.A_log, state, self.heads, self.kv_heads, NORM_EPS, self.dt_proj.bias)

    def state_shape(self, batch: int) -> tuple[int, int, int, int]:
        """The recurrent state a decode step carries for this layer: [B, H, d, d], fp32."""
        return (batch, self.heads, self.head_dim, self.head_dim)

    def bind_state(self, state: torch.Tensor | None, cache_position: torch.Tensor | None = None) -> None:
        """Read and write `state` in the next forward (None: stateless, zero start)."""
        self._state, self._positions = state, cache_position

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        b, t, _ = hidden_states.shape
        h, d = self.heads, self.head_dim
        q = self.q_proj(hidden_states)
        k = self.k_proj(hidden_states)
        v = self.v_proj(hidden_states)
        if self.q_norm is not None:
            q = self.q_norm(q.view(b, t, h, d)).reshape(b, t, h * d)
        if self.k_norm is not None:
            k = self.k_norm(k.view(b, t, self.kv_heads, d)).reshape(b, t, self.kv_heads * d)
        y, new_state = self.mix(hidden_states, q, k, v, self._start_state(b, hidden_states.device))
        if self._state is not None:
            self._state.copy_(new_state)
        if self.norm_weight is not None:
            y = y * self.norm_weight
        return self.o_proj(y), None

    def _start_state(self, batch: int, device) -> torch.Tensor:
        if self._state is None:  # a plain forward: every sequence from a zero state
            return torch.zeros(batch, self.heads, self.head_dim, self.head_dim, dtype=torch.float32, device=device)
        state, pos = self._state, self._positions
        # A sequence starting at position 0 starts from a zero state (the cache's old contents
        # belong to the previous sequence, as stale KV entries past the position do).
        first = pos[..., 0] if pos.dim() == 2 else pos[0].expand(state.shape[0])
        return state * (first > 0).to(state.dtype).view(-1, 1, 1, 1)

    @torch.no_grad()
    def fold_norm_weight(self) -> None:
        """Fold the output norm's weight into o_proj's columns (o_proj(y * w) = (W diag(w)) y): one
        multiply less a token, once training is over."""
        if self.norm_weight is None:
            return
        self.o_proj.weight.mul_(self.norm_weight.to(self.o_proj.weight.dtype)[None, :])
        self.norm_weight = None

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, layer={self.layer_index}, heads={self.heads}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}")

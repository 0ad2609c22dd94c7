"""Gated linear attention (GLA) as the state-space layer that takes an attention layer's place.

GLA (Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training",
ICML 2024, arXiv:2312.06635) decays its state by a data-dependent rate per key dimension,
where Mamba-2 (`SSMAttention`) has one scalar per head:

    alpha_t = sigmoid(x_t W1 W2 + b)^(1/tau)         W1 [hidden, 16], W2 [16, heads * d], tau = 16
    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t       (flashc.gla_mix)

Everything else is `SSMAttention`'s: q/k/v/o read from the attention's projections (q = C,
k = B / sqrt(d), v = x; grouped-query heads repeated), the per-head output RMSNorm and
norm_weight, the [B, H, d, d] fp32 state and its binding for decode steps. W2 starts at zero
and b per head, so every head starts with the memory `SSMAttention`'s dt init gives it (about
10 to 1,000 tokens) whatever the input; W1 starts random (nn.Linear's init), since with W2 at
zero its gradient is zero until W2 moves.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from flashc.passes.ssm.layer import NORM_EPS, SSMAttention, initial_decay_rates
from flashc.ssm_ops import gla_mix_reference

GATE_RANK = 16  # W1's output width: the paper's low-rank gate
GATE_TEMPERATURE = 16.0  # tau: alpha = sigmoid(.)^(1/tau) keeps decays near 1 (the paper's 16)


class GLAAttention(SSMAttention):
    """Gated linear attention in place of self-attention (see the module doc)."""

    kind = "gla"

    def init_decay(self, hidden: int, device, dtype) -> None:
        """The gate's new weights: W1 (`gate_down`) random, W2 (`gate_up`) zero, and a bias per
        head with sigmoid(b)^(1/tau) = exp(-dt), dt across the heads as `SSMAttention`'s."""
        self.gate_down = nn.Linear(hidden, GATE_RANK, bias=False, device=device, dtype=dtype)
        self.gate_up = nn.Linear(GATE_RANK, self.heads * self.head_dim, bias=True, device=device, dtype=dtype)
        with torch.no_grad():
            sigmoid = torch.exp(-GATE_TEMPERATURE * initial_decay_rates(self.heads).double())
            bias = torch.log(sigmoid) - torch.log1p(-sigmoid)  # logit: sigmoid(bias) = exp(-tau dt)
            self.gate_up.weight.zero_()
            self.gate_up.bias.copy_(bias.repeat_interleave(self.head_dim))

    def mix(self, hidden_states: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flashc.gla_mix: grouped heads, the gate, the scan and the per-head norm, one op (one
        kernel a decode step on the CUDA target); training differentiates its reference."""
        gate = self.gate_up(self.gate_down(hidden_states))  # [B, T, heads * d], before the sigmoid
        mix = gla_mix_reference if torch.is_grad_enabled() else torch.ops.flashc.gla_mix
        return mix(q, k, v, gate, state, self.heads, self.kv_heads, GATE_TEMPERATURE, NORM_EPS)

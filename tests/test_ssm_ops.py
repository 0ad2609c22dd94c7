"""flashc.ssm_ops.ssm_mix: an SSM layer's mixing as one op, against a float64 computation written
here from its definition, against the layer it stands for, its gradients, fake kernel and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashc.ops  # noqa: F401  (registers the flashc ops)
from flashc.passes.ssm.layer import NORM_EPS, SSMAttention
from flashc.ssm_ops import SSM_OPS, ssm_mix_reference

EPS = 1e-6


def mix_inputs(B, T, heads, kv_heads, d, dtype=torch.float32, seed=None):
    """Fresh random (q, k, v, dt, A_log, state); q a slice of a wider [B, T, N] row, as a merged
    projection gives; dt around -2 so decays run from fast to slow and the state persists."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    wide = (torch.randn(B, T, heads * d + 2 * kv_heads * d, generator=g) * d**-0.5).to(dtype)
    q = wide[..., : heads * d]
    k = torch.randn(B, T, kv_heads * d, generator=g).to(dtype)
    v = torch.randn(B, T, kv_heads * d, generator=g).to(dtype)
    dt = (torch.randn(B, T, heads, generator=g) - 2).to(dtype)
    A_log = torch.randn(heads, generator=g) * 0.5
    state = 0.5 * torch.randn(B, heads, d, d, generator=g)
    return q, k, v, dt, A_log, state


def mix64(q, k, v, dt, A_log, state, heads, kv_heads, eps=EPS):
    """The definition in float64, token by token and head by head: head h reads kv head
    h // (heads // kv_heads); h_t = exp(-exp(A_log) softplus(dt)) h + (k d^-0.5)^T v; y = rms(q h)."""
    B, T, N = q.shape
    d, group = N // heads, heads // kv_heads
    q = q.double().reshape(B, T, heads, d)
    k = k.double().reshape(B, T, kv_heads, d) * d**-0.5
    v = v.double().reshape(B, T, kv_heads, d)
    decay = torch.exp(-torch.exp(A_log.double()) * F.softplus(dt.double()))  # [B, T, heads]
    hs = [state.double()[:, h] for h in range(heads)]
    ys = []
    for t in range(T):
        heads_out = []
        for h in range(heads):
            kv = h // group
            hs[h] = decay[:, t, h, None, None] * hs[h] + k[:, t, kv, :, None] * v[:, t, kv, None, :]
            y = torch.einsum("bk,bkv->bv", q[:, t, h], hs[h])
            heads_out.append(y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps))
        ys.append(torch.cat(heads_out, -1))
    y = torch.stack(ys, 1) if ys else q.new_zeros(B, 0, N)
    return y, torch.stack(hs, 1)


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3)])
@pytest.mark.parametrize("T", [1, 5, 70])
def test_ssm_mix_matches_the_definition(T, heads, kv_heads):
    """T = 1: the recurrence; 5: one chunk; 70: two chunks of the reference's chunked form."""
    args = mix_inputs(2, T, heads, kv_heads, 16)
    assert not args[0].is_contiguous()
    y, new_state = torch.ops.flashc.ssm_mix(*args, heads, kv_heads, EPS)
    y_ref, state_ref = mix64(*args, heads, kv_heads)
    assert y.shape == (2, T, heads * 16) and y.dtype == torch.float32
    assert new_state.shape == (2, heads, 16, 16) and new_state.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(new_state, state_ref) < 1e-5


def test_ssm_mix_bf16_keeps_q_dtype():
    """bf16 projections: y comes back in bf16 within bf16 rounding of the float64 definition."""
    args = mix_inputs(2, 9, 4, 2, 32, dtype=torch.bfloat16)
    y, new_state = torch.ops.flashc.ssm_mix(*args, 4, 2, EPS)
    y_ref, state_ref = mix64(*args, 4, 2)
    assert y.dtype == torch.bfloat16 and new_state.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-2  # k and the scan's y round to bf16 (2^-9) before the norm
    assert rel_err(new_state, state_ref) < 1e-2


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_ssm_mix_is_what_the_layer_computes(kv_heads):
    """SSMAttention's forward, from a bound non-zero state, equals o_proj(ssm_mix(...) * norm_weight)
    on the same projections, and the state it writes back is the op's new state."""
    torch.manual_seed(torch.seed() % 2**31)
    hidden, heads, d, B, T = 32, 4, 8, 2, 6
    attention = nn.Module()
    attention.q_proj = nn.Linear(hidden, heads * d, bias=False)
    attention.k_proj = nn.Linear(hidden, kv_heads * d, bias=False)
    attention.v_proj = nn.Linear(hidden, kv_heads * d, bias=False)
    attention.o_proj = nn.Linear(heads * d, hidden, bias=False)
    layer = SSMAttention(attention, heads, kv_heads, d, layer_index=0)
    with torch.no_grad():
        layer.dt_proj.weight.normal_(0, 0.3)
        layer.A_log.normal_(0, 0.5)
        layer.norm_weight.normal_(1, 0.2)
    x = torch.randn(B, T, hidden)
    state = 0.5 * torch.randn(B, heads, d, d)
    start = state.clone()
    layer.bind_state(state, torch.arange(5, 5 + T))  # not position 0: the layer starts from `state`
    with torch.no_grad():
        out, _ = layer(x)
        y, new_state = torch.ops.flashc.ssm_mix(layer.q_proj(x), layer.k_proj(x), layer.v_proj(x), layer.dt_proj(x),
                                                layer.A_log, start, heads, kv_heads, NORM_EPS)
        expected = layer.o_proj(y * layer.norm_weight)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state, new_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 70])
def test_ssm_mix_reference_gradients(T):
    """The reference is differentiable: its gradients match the float64 definition's."""
    args = [a.requires_grad_() for a in mix_inputs(1, T, 4, 2, 16)]
    args64 = [a.detach().double().requires_grad_() for a in args]
    weight = torch.randn(1, T, 4 * 16)  # a random linear functional of y and the state
    weight_state = torch.randn(1, 4, 16, 16)
    for fn, inputs in ((ssm_mix_reference, args), (mix64, args64)):
        y, new_state = fn(*inputs, 4, 2, EPS)
        ((y * weight).sum() + (new_state * weight_state).sum()).backward()
    names = ["q", "k", "v", "dt", "A_log", "state"]
    for name, a, a64 in zip(names, args, args64):
        assert a.grad is not None and torch.isfinite(a.grad).all(), name
        assert a.grad.abs().sum() > 0, name
        assert rel_err(a.grad, a64.grad) < 1e-4, name


def test_ssm_mix_fake_kernel_and_registry():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = mix_inputs(2, 3, 6, 2, 8, dtype=torch.bfloat16)
    with FakeTensorMode() as mode:
        y, new_state = torch.ops.flashc.ssm_mix(*(mode.from_tensor(a) for a in args), 6, 2, EPS)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    assert new_state.shape == (2, 6, 8, 8) and new_state.dtype == torch.float32
    assert SSM_OPS["ssm_mix"] is torch.ops.flashc.ssm_mix.default


def test_ssm_mix_empty_sequence_returns_a_copy_of_the_state():
    args = mix_inputs(1, 0, 2, 1, 8)
    y, new_state = torch.ops.flashc.ssm_mix(*args, 2, 1, EPS)
    assert y.shape == (1, 0, 16)
    assert torch.equal(new_state, args[-1]) and new_state.data_ptr() != args[-1].data_ptr()


def test_ssm_mix_refuses_bad_shapes():
    q, k, v, dt, A_log, state = mix_inputs(1, 3, 4, 2, 8)
    op = torch.ops.flashc.ssm_mix
    with pytest.raises(ValueError, match=r"heads \(4\) must be a positive multiple of kv_heads \(3\)"):
        op(q, k, v, dt, A_log, state, 4, 3, EPS)
    with pytest.raises(ValueError, match="q's last dim 32 is not divisible by heads = 5"):
        op(q, k, v, dt, A_log, state, 5, 1, EPS)
    with pytest.raises(ValueError, match=r"k must be \[B, T, kv_heads \* d\] = \(1, 3, 16\)"):
        op(q, k[..., :8], v, dt, A_log, state, 4, 2, EPS)
    with pytest.raises(ValueError, match=r"v must be \[B, T, kv_heads \* d\]"):
        op(q, k, v[:, :2], dt, A_log, state, 4, 2, EPS)
    with pytest.raises(ValueError, match=r"dt must be \[B, T, heads\] = \(1, 3, 4\)"):
        op(q, k, v, dt[..., :2], A_log, state, 4, 2, EPS)
    with pytest.raises(ValueError, match=r"A_log must be \[heads\] = \(4,\)"):
        op(q, k, v, dt, A_log[:3], state, 4, 2, EPS)
    with pytest.raises(ValueError, match=r"state must be \[B, heads, d, d\] = \(1, 4, 8, 8\)"):
        op(q, k, v, dt, A_log, state[:, :2], 4, 2, EPS)
    with pytest.raises(ValueError, match=r"q must be \[B, T, N\]"):
        op(q.unflatten(-1, (4, 8)), k, v, dt, A_log, state, 4, 2, EPS)

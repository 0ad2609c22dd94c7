"""flashc.codegen.triton_gla: gated linear attention's chunked-prefill kernel against GLA's recurrence
in float64, and gla_mix_triton (the layer's fused mixing, decode step and prefill) against the op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import triton_gla as tg  # noqa: E402
import flashc.ops  # noqa: E402,F401  (registers flashc.gla_mix, the reference of gla_mix_triton)
from flashc.ssm_ops import gla_recurrent  # noqa: E402

# Relative (norm-wise) error bounds, as tests/codegen/test_triton_ssm.py's. bf16: the kernel rounds
# scores and state to bf16 as matmul operands and the output to bf16 (unit roundoff 2^-8).
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
TAU = 16.0


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def gla_inputs(B, H, T, DK, DV, dtype, device, layout="bhtk", fast=False, seed=0):
    """Fresh random q, k, v, log_alpha (<= 0, per key dim) and a non-zero fp32 state.

    layout "bthk": q, k, v, log_alpha are [B, T, H, D] tensors viewed as [B, H, T, D].
    fast: every other key dim forgets almost at once (log alpha down to about -40 a token)."""
    g = torch.Generator().manual_seed(seed)

    def heads(x):  # [B, T, H, D] -> [B, H, T, D]
        return x.transpose(1, 2) if layout == "bthk" else x.transpose(1, 2).contiguous()

    q = heads(DK**-0.5 * torch.randn(B, T, H, DK, generator=g)).to(dtype).to(device)
    k = heads(DK**-0.5 * torch.randn(B, T, H, DK, generator=g)).to(dtype).to(device)
    v = heads(torch.randn(B, T, H, DV, generator=g)).to(dtype).to(device)
    logits = torch.randn(B, T, H, DK, generator=g) + 2
    if fast:
        logits[..., ::2] -= 40
    log_alpha = heads(F.logsigmoid(logits)).to(device)
    state = (0.5 * torch.randn(B, H, DK, DV, generator=g)).to(device)
    return q, k, v, log_alpha, state


def reference(q, k, v, log_alpha, state):
    return gla_recurrent(q.double(), k.double(), v.double(), log_alpha.double(), state.double())


# (B, H, T, K, V): T = 1, one 16-token sub-chunk exactly, partial sub-chunks
SHAPES = [(2, 3, T, DK, DV) for T in (1, 16, 37, 70) for DK, DV in ((64, 64), (32, 16))]


@pytest.mark.parametrize("layout", ["bhtk", "bthk"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}T{}K{}V{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scan_matches_recurrence(device, dtype, shape, layout):
    B, H, T, DK, DV = shape
    q, k, v, log_alpha, state = gla_inputs(B, H, T, DK, DV, dtype, device, layout)
    if layout == "bthk":
        assert q.stride(2) == H * DK and log_alpha.stride(2) == H * DK
    y, new_state = tg.gla_scan_triton(q, k, v, log_alpha, state)
    y_ref, state_ref = reference(q, k, v, log_alpha, state)
    assert y.shape == (B, H, T, DV) and y.dtype == dtype
    assert new_state.shape == (B, H, DK, DV) and new_state.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(new_state, state_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fast_gates_stay_finite_and_exact(device, dtype):
    """Decays of e^-40 a token on half the key dims: the log-space sub-chunk form never divides by a
    cumulative decay (which would overflow fp32 within three tokens); 16-wide V tiles, K = 48 padded."""
    q, k, v, log_alpha, state = gla_inputs(1, 3, 53, 48, 64, dtype, device, fast=True, seed=1)
    y, new_state = tg.gla_scan_triton(q, k, v, log_alpha, state, config={"BLOCK_V": 16})
    y_ref, state_ref = reference(q, k, v, log_alpha, state)
    assert torch.isfinite(y).all() and torch.isfinite(new_state).all()
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(new_state, state_ref) < TOL[dtype]


def test_head_dim_128(device):
    q, k, v, log_alpha, state = gla_inputs(1, 2, 21, 128, 128, torch.float32, device, seed=2)
    y, new_state = tg.gla_scan_triton(q, k, v, log_alpha, state)
    y_ref, state_ref = reference(q, k, v, log_alpha, state)
    assert rel_err(y, y_ref) < 1e-4 and rel_err(new_state, state_ref) < 1e-4


def test_scan_in_place_state_and_errors(device):
    q, k, v, log_alpha, state = gla_inputs(1, 2, 20, 16, 16, torch.float32, device, seed=3)
    y_ref, state_ref = reference(q, k, v, log_alpha, state)
    s = state.clone()
    y, s_out = tg.gla_scan_triton(q, k, v, log_alpha, s, state_out=s)
    assert s_out is s and rel_err(y, y_ref) < 1e-4 and rel_err(s, state_ref) < 1e-4
    with pytest.raises(ValueError, match=r"log_alpha must be \[B, H, T, K\] like q = \(1, 2, 20, 16\)"):
        tg.gla_scan_triton(q, k, v, log_alpha[..., :1], state)
    with pytest.raises(ValueError, match=r"state must be \[B, H, K, V\] = \(1, 2, 16, 16\)"):
        tg.gla_scan_triton(q, k, v, log_alpha, state[..., :8])
    with pytest.raises(TypeError, match="state_out must have dtype torch.float32"):
        tg.gla_scan_triton(q, k, v, log_alpha, state, state_out=state.bfloat16())
    with pytest.raises(ValueError, match="powers of 2 >= 16"):
        tg.gla_scan_triton(q, k, v, log_alpha, state, config={"BLOCK_C": 8})
    big = gla_inputs(1, 1, 2, 160, 16, torch.float32, device)
    with pytest.raises(ValueError, match="K = 160 exceeds 128"):
        tg.gla_scan_triton(*big)


# ---------------------------------------------------------------------------- gla_mix


def mix_inputs(B, T, heads, kv_heads, d, dtype, device, seed=0):
    """Fresh random gla_mix inputs: q, k and v slices of one merged [B, T, N] projection (strided
    rows), gate logits around 2 (decays from fast to near 1), a non-zero fp32 state."""
    g = torch.Generator().manual_seed(seed)
    n_q, n_kv = heads * d, kv_heads * d
    qkv = torch.randn(B, T, n_q + 2 * n_kv, generator=g)
    qkv[..., :n_q] *= d**-0.5
    qkv = qkv.to(dtype).to(device)
    q, k, v = qkv[..., :n_q], qkv[..., n_q:n_q + n_kv].contiguous(), qkv[..., n_q + n_kv:]
    gate = (3 * torch.randn(B, T, n_q, generator=g) + 2).to(dtype).to(device)
    state = (0.5 * torch.randn(B, heads, d, d, generator=g)).to(device)
    return q, k, v, gate, state


MIX_SHAPES = [(4, 2, 32), (3, 3, 64)]  # (heads, kv_heads, d): grouped heads, and one kv head per head


@pytest.mark.parametrize("shape", MIX_SHAPES, ids=lambda s: "H{}KV{}d{}".format(*s))
@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mix_matches_the_op(device, dtype, T, shape):
    """T = 1: the one-kernel decode step; T = 70: the chunked kernel over grouped heads."""
    heads, kv_heads, d = shape
    q, k, v, gate, state = mix_inputs(2, T, heads, kv_heads, d, dtype, device)
    assert q.stride(1) > heads * d and v.stride(1) > kv_heads * d
    y, new_state = tg.gla_mix_triton(q, k, v, gate, state, heads, kv_heads, TAU, 1e-6)
    y_ref, state_ref = torch.ops.flashc.gla_mix(q, k, v, gate, state, heads, kv_heads, TAU, 1e-6)
    assert y.shape == (2, T, heads * d) and y.dtype == dtype
    assert new_state.shape == (2, heads, d, d) and new_state.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(new_state, state_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mix_decode_continues_prefill_in_place(device, dtype):
    """A prefill then two decode steps, the state updated in place, equal the op over all tokens."""
    T, steps, heads, kv_heads, d = 40, 2, 4, 1, 32
    q, k, v, gate, state = mix_inputs(1, T + steps, heads, kv_heads, d, dtype, device, seed=1)
    y_ref, state_ref = torch.ops.flashc.gla_mix(q, k, v, gate, state, heads, kv_heads, TAU, 1e-6)
    s = state.clone()
    ys = []
    for step in (slice(0, T), *(slice(t, t + 1) for t in range(T, T + steps))):
        y, s_out = tg.gla_mix_triton(q[:, step], k[:, step], v[:, step], gate[:, step], s, heads, kv_heads, TAU,
                                     1e-6, state_out=s)
        assert s_out is s
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_ref) < TOL[dtype]
    assert rel_err(s, state_ref) < TOL[dtype]


def test_mix_errors(device):
    q, k, v, gate, state = mix_inputs(1, 1, 4, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match=r"gla_mix_triton: heads \(4\) must be a positive multiple of kv_heads"):
        tg.gla_mix_triton(q, k, v, gate, state, 4, 3, TAU, 1e-6)
    with pytest.raises(ValueError, match=r"gla_mix_triton: gate must be \[B, T, heads \* d\]"):
        tg.gla_mix_triton(q, k, v, gate[..., :8], state, 4, 2, TAU, 1e-6)
    with pytest.raises(TypeError, match="state_out must have dtype torch.float32"):
        tg.gla_mix_triton(q, k, v, gate, state, 4, 2, TAU, 1e-6, state_out=state.bfloat16())
    big = mix_inputs(1, 1, 1, 1, 160, torch.float32, device)
    with pytest.raises(ValueError, match="head dim 160 exceeds 128"):
        tg.gla_mix_triton(*big, 1, 1, TAU, 1e-6)


@pytest.mark.parametrize("keep", ["none", "some_restart"])
@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mix_into_writes_the_state_in_place(device, dtype, T, keep):
    """gla_mix_into: the state buffer scaled by keep (0 restarts the second sequence), mixed, the new
    state written back into the buffer."""
    heads, kv_heads, d = 4, 2, 32
    q, k, v, gate, state = mix_inputs(3, T, heads, kv_heads, d, dtype, device, seed=2)
    factor = None if keep == "none" else torch.tensor([1.0, 0.0, 1.0], device=device).view(3, 1, 1, 1)
    buffer = state.clone()
    ptr = buffer.data_ptr()
    y = tg.gla_mix_into_triton(q, k, v, gate, buffer, factor, heads, kv_heads, TAU, 1e-6)
    start = state * (1 if factor is None else factor)
    want_y, want_s = torch.ops.flashc.gla_mix(q, k, v, gate, start, heads, kv_heads, TAU, 1e-6)
    assert buffer.data_ptr() == ptr and y.shape == (3, T, heads * d) and y.dtype == dtype
    assert rel_err(y, want_y) < TOL[dtype] and rel_err(buffer, want_s) < TOL[dtype]
    if factor is not None:
        kept_y, _ = torch.ops.flashc.gla_mix(q, k, v, gate, state, heads, kv_heads, TAU, 1e-6)
        assert rel_err(y[1], kept_y[1]) > 10 * TOL[dtype]

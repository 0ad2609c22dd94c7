"""flashc.codegen.triton_ssm: the decode-step and chunked-prefill kernels of ssm_scan vs the recurrence,
and ssm_mix_triton (the fused mixing of an SSM layer) vs the op's reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import triton_ssm as ts  # noqa: E402
import flashc.ops  # noqa: E402,F401  (registers flashc.ssm_mix, the reference of ssm_mix_triton)
from flashc.ssm_ops import ssm_recurrent  # noqa: E402

# Relative (norm-wise) error bounds. bf16: the kernel rounds scores and state to bf16 as matmul
# operands and the output to bf16 (unit roundoff 2^-8 = 4e-3).
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
# Per-head decay rates spanning Mamba-2's range (A dt from ~0.01 to ~1 per step): the slow head
# carries the state across many chunks, the fast one forgets within a few tokens.
RATES = (0.02, 0.2, 1.0)


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def ssm_inputs(B, H, T, DK, DV, dtype, device, layout="bhtk"):
    """Fresh random q, k, v, log_decay (<= 0) and a non-zero fp32 state.

    layout "bthk": q, k, v are [B, T, H, D] projections viewed as [B, H, T, D] (non-contiguous).
    """
    def proj(d, scale=1.0):
        if layout == "bthk":
            return (scale * torch.randn(B, T, H, d)).to(dtype).to(device).transpose(1, 2)
        return (scale * torch.randn(B, H, T, d)).to(dtype).to(device)

    q = proj(DK, DK**-0.5)
    k = proj(DK, DK**-0.5)
    v = proj(DV)
    rates = torch.tensor([RATES[i % len(RATES)] for i in range(H)])
    log_decay = (-F.softplus(torch.randn(B, H, T)) * rates[:, None]).to(device)
    state = (0.5 * torch.randn(B, H, DK, DV)).to(device)
    return q, k, v, log_decay, state


def reference(q, k, v, log_decay, state):
    return ssm_recurrent(q.double(), k.double(), v.double(), log_decay.double(), state.double())


# (B, H, T, K, V)
SHAPES = [(2, 3, T, DK, DV) for T in (1, 64, 100, 130) for DK, DV in ((64, 64), (32, 16))]


@pytest.mark.parametrize("layout", ["bhtk", "bthk"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}T{}K{}V{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scan_matches_recurrence(device, dtype, shape, layout):
    """T = 1: the step kernel; T = 64: one full chunk; 100 and 130: a partial last chunk."""
    B, H, T, DK, DV = shape
    q, k, v, log_decay, state = ssm_inputs(B, H, T, DK, DV, dtype, device, layout)
    if layout == "bthk":
        assert q.stride(2) == H * DK and v.stride(1) == DV
    y, new_state = ts.ssm_scan_triton(q, k, v, log_decay, state)
    y_ref, state_ref = reference(q, k, v, log_decay, state)
    assert y.shape == (B, H, T, DV) and y.dtype == dtype
    assert new_state.shape == (B, H, DK, DV) and new_state.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(new_state, state_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_small_chunks_and_v_tiles(device, dtype):
    """16-token chunks and 16-wide V tiles: seven chunk boundaries, four programs per head."""
    q, k, v, log_decay, state = ssm_inputs(1, 3, 100, 48, 64, dtype, device)
    y, new_state = ts.ssm_scan_triton(q, k, v, log_decay, state, config={"BLOCK_T": 16, "BLOCK_V": 16})
    y_ref, state_ref = reference(q, k, v, log_decay, state)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(new_state, state_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dim_128(device, dtype):
    """K = V = 128 (the default config's 32-token chunks and 64-wide V tiles), and a decode step."""
    for T in (40, 1):
        q, k, v, log_decay, state = ssm_inputs(1, 2, T, 128, 128, dtype, device)
        y, new_state = ts.ssm_scan_triton(q, k, v, log_decay, state)
        y_ref, state_ref = reference(q, k, v, log_decay, state)
        assert rel_err(y, y_ref) < TOL[dtype]
        assert rel_err(new_state, state_ref) < TOL[dtype]


def test_decode_continues_prefill_in_place(device):
    """A prefill's state fed to decode steps, updated in place, gives the recurrence over all tokens."""
    T, steps = 70, 3
    q, k, v, log_decay, state = ssm_inputs(2, 3, T + steps, 64, 64, torch.float32, device)
    y_ref, state_ref = reference(q, k, v, log_decay, state)
    y, s = ts.ssm_scan_triton(q[:, :, :T], k[:, :, :T], v[:, :, :T], log_decay[:, :, :T], state)
    ys = [y]
    for t in range(T, T + steps):
        step = slice(t, t + 1)
        y_t, s_out = ts.ssm_scan_triton(q[:, :, step], k[:, :, step], v[:, :, step], log_decay[:, :, step], s,
                                        state_out=s)
        assert s_out is s
        ys.append(y_t)
    assert rel_err(torch.cat(ys, dim=2), y_ref) < 1e-4
    assert rel_err(s, state_ref) < 1e-4


def test_mixed_dtypes_and_strided_state(device):
    """bf16 q/k with fp32 v, a transposed bf16 state: the op upcasts each input, so must the kernel."""
    q, k, v, log_decay, state = ssm_inputs(1, 2, 40, 32, 32, torch.float32, device)
    q, k = q.bfloat16(), k.bfloat16()
    state = state.transpose(-1, -2).contiguous().transpose(-1, -2).bfloat16()
    assert not state.is_contiguous()
    y, new_state = ts.ssm_scan_triton(q, k, v, log_decay, state)
    y_ref, state_ref = reference(q, k, v, log_decay, state)
    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(new_state, state_ref) < 1e-4


def test_empty_sequence_returns_the_state(device):
    q, k, v, log_decay, state = ssm_inputs(1, 2, 0, 16, 16, torch.float32, device)
    y, new_state = ts.ssm_scan_triton(q, k, v, log_decay, state)
    assert y.shape == (1, 2, 0, 16)
    assert torch.equal(new_state, state) and new_state.data_ptr() != state.data_ptr()


def test_errors(device):
    q, k, v, log_decay, state = ssm_inputs(1, 2, 5, 16, 8, torch.float32, device)
    with pytest.raises(ValueError, match=r"q and k must be \[B, H, T, K\]"):
        ts.ssm_scan_triton(q, k[..., :8], v, log_decay, state)
    with pytest.raises(ValueError, match=r"log_decay must be \[B, H, T\] = \(1, 2, 5\)"):
        ts.ssm_scan_triton(q, k, v, log_decay[..., :4], state)
    with pytest.raises(ValueError, match=r"state must be \[B, H, K, V\] = \(1, 2, 16, 8\)"):
        ts.ssm_scan_triton(q, k, v, log_decay, state.transpose(-1, -2))
    with pytest.raises(TypeError, match="state_out must have dtype torch.float32"):
        ts.ssm_scan_triton(q, k, v, log_decay, state, state_out=state.bfloat16())
    with pytest.raises(ValueError, match="powers of 2 >= 16"):
        ts.ssm_scan_triton(q, k, v, log_decay, state, config={"BLOCK_T": 8})
    with pytest.raises(ValueError, match="BLOCK_V must be a power of 2"):
        ts.ssm_scan_triton(q[:, :, :1], k[:, :, :1], v[:, :, :1], log_decay[:, :, :1], state, config={"BLOCK_V": 24})


# ---------------------------------------------------------------------------- ssm_mix


def mix_inputs(B, T, heads, kv_heads, d, dtype, device, seed=0):
    """Fresh random ssm_mix inputs: q, k and v slices of one merged [B, T, N] projection (strided
    rows), dt around -2 (decays from fast to slow), a non-zero fp32 state."""
    g = torch.Generator().manual_seed(seed)
    n_q, n_kv = heads * d, kv_heads * d
    qkv = torch.randn(B, T, n_q + 2 * n_kv, generator=g)
    qkv[..., :n_q] *= d**-0.5
    qkv = qkv.to(dtype).to(device)
    q, k, v = qkv[..., :n_q], qkv[..., n_q:n_q + n_kv].contiguous(), qkv[..., n_q + n_kv:]  # k contiguous
    dt = (torch.randn(B, T, heads, generator=g) - 2).to(dtype).to(device)
    A_log = (0.5 * torch.randn(heads, generator=g)).to(device)
    state = (0.5 * torch.randn(B, heads, d, d, generator=g)).to(device)
    return q, k, v, dt, A_log, state


def mix_reference(q, k, v, dt, A_log, state, heads, kv_heads, eps=1e-6):
    return torch.ops.flashc.ssm_mix(q, k, v, dt, A_log, state, heads, kv_heads, eps)


# (heads, kv_heads, d): grouped heads at d = 32, one kv head per head at d = 64
MIX_SHAPES = [(4, 2, 32), (3, 3, 64)]


@pytest.mark.parametrize("shape", MIX_SHAPES, ids=lambda s: "H{}KV{}d{}".format(*s))
@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dt_bias", [False, True], ids=["no_dt_bias", "dt_bias"])
def test_mix_matches_reference(device, dtype, T, shape, dt_bias):
    """T = 1: the one-kernel decode step; T = 70: the chunked kernel over grouped heads, a partial chunk;
    the dt projection's bias added by the op (the projection then merges with q, k and v)."""
    heads, kv_heads, d = shape
    q, k, v, dt, A_log, state = mix_inputs(2, T, heads, kv_heads, d, dtype, device)
    bias = torch.linspace(1.0, 2.0, heads).to(dtype).to(device) if dt_bias else None  # decays 3-6x faster
    assert q.stride(1) > heads * d and v.stride(1) > kv_heads * d  # slices of the merged projection's rows
    y, new_state = ts.ssm_mix_triton(q, k, v, dt, A_log, state, heads, kv_heads, 1e-6, bias)
    y_ref, state_ref = torch.ops.flashc.ssm_mix(q, k, v, dt, A_log, state, heads, kv_heads, 1e-6, bias)
    if dt_bias:  # the bias matters: without it the decays differ
        assert rel_err(mix_reference(q, k, v, dt, A_log, state, heads, kv_heads)[1], state_ref) > 3 * TOL[dtype]
    assert y.shape == (2, T, heads * d) and y.dtype == dtype
    assert new_state.shape == (2, heads, d, d) and new_state.dtype == torch.float32
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(new_state, state_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mix_decode_continues_prefill_in_place(device, dtype):
    """A prefill then two decode steps, the state updated in place (state_out=state), equal the op
    over all tokens at once; A_log in the model dtype."""
    T, steps, heads, kv_heads, d = 40, 2, 4, 1, 32
    q, k, v, dt, A_log, state = mix_inputs(1, T + steps, heads, kv_heads, d, dtype, device, seed=1)
    A_log = A_log.to(dtype)
    y_ref, state_ref = mix_reference(q, k, v, dt, A_log, state, heads, kv_heads)
    s = state.clone()
    ys = []
    for step in (slice(0, T), *(slice(t, t + 1) for t in range(T, T + steps))):
        y, s_out = ts.ssm_mix_triton(q[:, step], k[:, step], v[:, step], dt[:, step], A_log, s, heads, kv_heads,
                                     1e-6, state_out=s)
        assert s_out is s
        ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_ref) < TOL[dtype]
    assert rel_err(s, state_ref) < TOL[dtype]


def test_mix_errors(device):
    q, k, v, dt, A_log, state = mix_inputs(1, 1, 4, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match=r"ssm_mix_triton: heads \(4\) must be a positive multiple of kv_heads"):
        ts.ssm_mix_triton(q, k, v, dt, A_log, state, 4, 3, 1e-6)
    with pytest.raises(ValueError, match=r"ssm_mix_triton: state must be \[B, heads, d, d\]"):
        ts.ssm_mix_triton(q, k, v, dt, A_log, state[..., :8], 4, 2, 1e-6)
    with pytest.raises(TypeError, match="state_out must have dtype torch.float32"):
        ts.ssm_mix_triton(q, k, v, dt, A_log, state, 4, 2, 1e-6, state_out=state.bfloat16())
    big = mix_inputs(1, 1, 1, 1, 160, torch.float32, device)
    with pytest.raises(ValueError, match="head dim 160 exceeds 128"):
        ts.ssm_mix_triton(*big, 1, 1, 1e-6)


@pytest.mark.parametrize("keep", ["none", "some_restart"])
@pytest.mark.parametrize("T", [1, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mix_into_writes_the_state_in_place(device, dtype, T, keep):
    """ssm_mix_into: the state buffer scaled by keep (0 restarts the second sequence from zero), mixed,
    and the new state written back into the buffer; y as the op computes it."""
    heads, kv_heads, d = 4, 2, 32
    q, k, v, dt, A_log, state = mix_inputs(3, T, heads, kv_heads, d, dtype, device, seed=2)
    factor = None if keep == "none" else torch.tensor([1.0, 0.0, 1.0], device=device).view(3, 1, 1, 1)
    buffer, want_state = state.clone(), state.clone()
    y_ref = torch.ops.flashc.ssm_mix_into(q.cpu(), k.cpu(), v.cpu(), dt.cpu(), A_log.cpu(), want_state.cpu(),
                                          None if factor is None else factor.cpu(), heads, kv_heads, 1e-6)
    ptr = buffer.data_ptr()
    y = ts.ssm_mix_into_triton(q, k, v, dt, A_log, buffer, factor, heads, kv_heads, 1e-6)
    assert buffer.data_ptr() == ptr and y.shape == (3, T, heads * d) and y.dtype == dtype
    want_y, want_s = mix_reference(q, k, v, dt, A_log, state * (1 if factor is None else factor), heads, kv_heads)
    assert rel_err(y, want_y) < TOL[dtype] and rel_err(y.cpu(), y_ref) < TOL[dtype]
    assert rel_err(buffer, want_s) < TOL[dtype]
    if factor is not None:  # the restarted sequence forgot its state: not what continuing it gives
        kept_y, _ = mix_reference(q, k, v, dt, A_log, state, heads, kv_heads)
        assert rel_err(y[1], kept_y[1]) > 10 * TOL[dtype]

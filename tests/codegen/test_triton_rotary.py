"""flashc.codegen.triton_rotary: RoPE kernel against a float64 reference, incl. strided (transposed) inputs."""

from __future__ import annotations

import os
import re
import zlib

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import triton_rotary as tr  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [(1, 1, 1, 2), (2, 3, 7, 24), (1, 4, 33, 64), (2, 2, 5, 10)]  # (B, H, S, D); D/2 = 5 is not a power of 2


def seed(*args) -> None:
    torch.manual_seed(zlib.crc32(repr(args).encode()))


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_cos_sin(batch, S, D, dtype, device):
    """Real RoPE tables (cos/sin of position * inverse frequency), duplicated halves as in HF."""
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    pos = torch.arange(S, dtype=torch.float64)[:, None] + torch.arange(batch, dtype=torch.float64)[:, None, None] * 3
    ang = torch.cat((pos * inv, pos * inv), dim=-1)  # [batch, S, D]
    return ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


@pytest.mark.parametrize("cos_batch", ["B", "1"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd_transposed"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_matches_reference(device, dtype, shape, layout, cos_batch):
    seed(dtype, shape, layout, cos_batch)
    B, H, S, D = shape
    if layout == "bhsd":
        x = torch.randn(B, H, S, D).to(dtype).to(device)
    else:  # the usual case: projection output [B, S, H, D] viewed as [B, H, S, D]
        x = torch.randn(B, S, H, D).to(dtype).to(device).transpose(1, 2)
    cos, sin = make_cos_sin(B if cos_batch == "B" else 1, S, D, dtype, device)
    y = tr.rotary(x, cos, sin, config={"BLOCK_S": 4, "num_warps": 2} if S > 4 else None)
    assert y.shape == x.shape and y.dtype == dtype
    assert y.stride() == x.stride()  # output keeps the input's layout
    ref = tr.reference_rotary(x.double(), cos.double(), sin.double())
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_general_cos_sin_and_poisoned_strided_out(device, dtype):
    """cos/sin with independent halves (not duplicated) and a strided, NaN-filled out buffer."""
    seed("general", dtype)
    B, H, S, D = 2, 3, 9, 12
    x = torch.randn(B, H, S, D).to(dtype).to(device)
    cos = torch.randn(B, S, D).to(dtype).to(device)
    sin = torch.randn(B, S, D).to(dtype).to(device)
    out = torch.full((B, S, H, D), float("nan"), dtype=dtype, device=device).transpose(1, 2)
    y = tr.rotary(x, cos, sin, out=out)
    assert y is out and not torch.isnan(y).any()
    assert rel_err(y, tr.reference_rotary(x.double(), cos.double(), sin.double())) < TOL[dtype]


def test_rotary_is_a_rotation(device):
    """With real cos/sin tables each (d, d + D/2) pair is rotated: the norm per position is preserved."""
    seed("rotation")
    x = torch.randn(1, 2, 6, 16, device=device)
    cos, sin = make_cos_sin(1, 6, 16, torch.float32, device)
    y = tr.rotary(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert not torch.allclose(y, x)


def make_pair_tables(batch, S, D, dtype, device):
    """Real RoPE tables in the interleaved pairs' order: each pair's angle twice, [batch, S, D]."""
    cos, sin = make_cos_sin(batch, S, D, torch.float64, "cpu")
    order = lambda t: t[..., : D // 2].repeat_interleave(2, dim=-1)  # noqa: E731
    return order(cos).to(dtype).to(device), order(sin).to(dtype).to(device)


@pytest.mark.parametrize("layout", ["bhsd", "bshd_transposed"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_interleaved_matches_reference(device, dtype, shape, layout):
    """flashc.rotary_interleaved's kernel: pairs (2i, 2i + 1), against the op's float64 reference."""
    seed("interleaved", dtype, shape, layout)
    B, H, S, D = shape
    if layout == "bhsd":
        x = torch.randn(B, H, S, D).to(dtype).to(device)
    else:
        x = torch.randn(B, S, H, D).to(dtype).to(device).transpose(1, 2)
    cos, sin = make_pair_tables(B, S, D, dtype, device)
    y = tr.rotary(x, cos, sin, interleaved=True, config={"BLOCK_S": 4, "num_warps": 2} if S > 4 else None)
    assert y.shape == x.shape and y.dtype == dtype and y.stride() == x.stride()
    ref = torch.ops.flashc.rotary_interleaved(x.double().cpu(), cos.double().cpu(), sin.double().cpu())
    assert rel_err(y.cpu(), ref) < TOL[dtype]
    assert rel_err(tr.reference_rotary(x.double(), cos.double(), sin.double(), interleaved=True).cpu(), ref) < 1e-12


def test_rotary_interleaved_general_tables_differ_from_rotate_half(device):
    """Tables whose two entries of a pair differ (the op's general formula) into a strided NaN-filled
    out; the same inputs through the rotate-half layout give another answer."""
    seed("interleaved-general")
    B, H, S, D = 2, 3, 9, 12
    x = torch.randn(B, H, S, D, device=device)
    cos, sin = torch.randn(1, S, D, device=device), torch.randn(1, S, D, device=device)
    out = torch.full((B, S, H, D), float("nan"), device=device).transpose(1, 2)
    y = tr.rotary(x, cos, sin, interleaved=True, out=out)
    assert y is out and not torch.isnan(y).any()
    want = tr.reference_rotary(x.double(), cos.double(), sin.double(), interleaved=True)
    assert rel_err(y, want) < 1e-5
    assert rel_err(tr.rotary(x, cos, sin), want) > 0.1


def test_rotary_errors(device):
    x = torch.randn(1, 2, 4, 8, device=device)
    cos = torch.randn(1, 4, 8, device=device)
    with pytest.raises(ValueError, match="must be even"):
        tr.rotary(torch.randn(1, 2, 4, 7, device=device), cos[..., :7], cos[..., :7])
    with pytest.raises(ValueError, match=r"cos must have shape \(1, 4, 8\).*got \(1, 5, 8\)"):
        tr.rotary(x, torch.randn(1, 5, 8, device=device), cos)
    with pytest.raises(ValueError, match="x must have 4 dims"):
        tr.rotary(x[0], cos, cos)
    with pytest.raises(TypeError, match="cos must have the dtype of x"):
        tr.rotary(x, cos.half(), cos)
    with pytest.raises(ValueError, match="rotary_interleaved: head dim D must be even"):
        tr.rotary(torch.randn(1, 2, 4, 7, device=device), cos[..., :7], cos[..., :7], interleaved=True)


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "pairs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("S", [1, 3])
def test_rotary_kv_write_matches_reference(device, dtype, S, interleaved):
    """Rotated keys and values land at the given cache rows; other rows are untouched."""
    seed("kv_write", dtype, S, interleaved)
    B, H, L, D = 2, 3, 11, 24
    k = torch.randn(B, S, H, D).to(dtype).to(device).transpose(1, 2)  # a transposed projection, as in models
    v = torch.randn(B, H, S, D).to(dtype).to(device)
    cos, sin = make_cos_sin(1, S, D, dtype, device)
    positions = torch.tensor([7, 2, 9][:S], device=device)
    kc = torch.randn(B, H, L, D).to(dtype).to(device)
    vc = torch.randn(B, H, L, D).to(dtype).to(device)
    want_k, want_v = kc.double().clone(), vc.double().clone()
    tr.reference_rotary_kv_write(k.double(), v.double(), cos.double(), sin.double(), want_k, want_v, positions,
                                 interleaved)
    tr.rotary_kv_write(k, v, cos, sin, kc, vc, positions, interleaved=interleaved)
    assert rel_err(kc, want_k) < TOL[dtype] and rel_err(vc, want_v) < TOL[dtype]
    rows = [r for r in range(L) if r not in positions.tolist()]
    assert torch.equal(kc[:, :, rows].double(), want_k[:, :, rows].to(dtype).double())


def test_rotary_kv_write_skips_rows_outside_the_cache(device):
    k = torch.randn(1, 1, 1, 8, device=device)
    cos, sin = make_cos_sin(1, 1, 8, torch.float32, device)
    kc = torch.zeros(1, 1, 4, 8, device=device)
    vc = torch.zeros(1, 1, 4, 8, device=device)
    tr.rotary_kv_write(k, k, cos, sin, kc, vc, torch.tensor([4], device=device))
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0


def fresh_seed() -> int:
    """Seed torch from os.urandom; the seed goes into assertion messages so a failure can be replayed."""
    s = int.from_bytes(os.urandom(8), "little")
    torch.manual_seed(s)
    return s


def cos_sin_at(batch, positions, D, dtype, device):
    """RoPE tables for the tokens at ``positions`` (batch b shifted by 3*b, as in make_cos_sin)."""
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    pos = positions.double().cpu()[:, None] + torch.arange(batch, dtype=torch.float64)[:, None, None] * 3
    ang = torch.cat((pos * inv, pos * inv), dim=-1)  # [batch, S, D]
    return ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


@pytest.mark.parametrize("cos_batch", ["B", "1"])
@pytest.mark.parametrize("G", [1, 4], ids=lambda g: f"Hq={g}H")
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rotary_qkv_write_matches_reference(device, dtype, B, S, G, cos_batch):
    """One launch: rotated queries come back, rotated keys and values land at rows ``positions``
    (not starting at 0), every other cache row and the inputs are untouched."""
    s = fresh_seed()
    H, L, D = 2, 13, 32
    q = torch.randn(B, S, G * H, D).to(dtype).to(device).transpose(1, 2)  # transposed projection output
    k = torch.randn(B, S, H, D).to(dtype).to(device).transpose(1, 2)
    v = torch.randn(B, H, S, D).to(dtype).to(device)
    positions = int(torch.randint(1, L - S + 1, ())) + torch.arange(S, device=device)
    cos, sin = cos_sin_at(B if cos_batch == "B" else 1, positions, D, dtype, device)
    kc = torch.randn(B, H, L, D).to(dtype).to(device)
    vc = torch.randn(B, H, L, D).to(dtype).to(device)
    kc0, vc0, q0 = kc.clone(), vc.clone(), q.clone()
    want_k, want_v = kc.double(), vc.double()
    want_q = tr.reference_rotary_qkv_write(q.double(), k.double(), v.double(), cos.double(), sin.double(),
                                           want_k, want_v, positions)

    y = tr.rotary_qkv_write(q, k, v, cos, sin, kc, vc, positions)

    assert y.shape == q.shape and y.dtype == dtype and y.is_contiguous()
    assert rel_err(y, want_q) < TOL[dtype], s
    assert rel_err(kc, want_k) < TOL[dtype] and rel_err(vc, want_v) < TOL[dtype], s
    rows = [r for r in range(L) if r not in positions.tolist()]
    assert torch.equal(kc[:, :, rows], kc0[:, :, rows]) and torch.equal(vc[:, :, rows], vc0[:, :, rows]), s
    assert torch.equal(q, q0), s
    # Same helper, same fp32 math: bit-identical to the two-kernel path.
    kc2, vc2 = kc0.clone(), vc0.clone()
    tr.rotary_kv_write(k, v, cos, sin, kc2, vc2, positions)
    assert torch.equal(y, tr.rotary(q, cos, sin)) and torch.equal(kc, kc2) and torch.equal(vc, vc2), s
    # the interleaved pairs: the same launch with the other pairing, as rotary_interleaved + the writes
    kc3, vc3 = kc0.clone(), vc0.clone()
    y3 = tr.rotary_qkv_write(q, k, v, cos, sin, kc3, vc3, positions, interleaved=True)
    want_k3, want_v3 = kc0.double(), vc0.double()
    want_q3 = tr.reference_rotary_qkv_write(q.double(), k.double(), v.double(), cos.double(), sin.double(),
                                            want_k3, want_v3, positions, True)
    assert rel_err(y3, want_q3) < TOL[dtype] and rel_err(kc3, want_k3) < TOL[dtype], s
    assert torch.equal(vc3, vc), s


def test_rotary_qkv_write_into_strided_out_with_many_s_blocks(device):
    """A NaN-filled strided ``out`` is filled exactly; S spans several BLOCK_S programs."""
    s = fresh_seed()
    B, H, Hq, S, L, D = 2, 2, 6, 9, 20, 10  # D/2 = 5 is not a power of 2
    q = torch.randn(B, S, Hq, D, device=device).transpose(1, 2)
    k = torch.randn(B, H, S, D, device=device)
    v = torch.randn(B, H, S, D, device=device)
    cos, sin = torch.randn(B, S, D, device=device), torch.randn(B, S, D, device=device)
    positions = torch.randperm(L - 1, device=device)[:S] + 1
    kc, vc = torch.zeros(B, H, L, D, device=device), torch.zeros(B, H, L, D, device=device)
    want_k, want_v = kc.double(), vc.double()
    want_q = tr.reference_rotary_qkv_write(q.double(), k.double(), v.double(), cos.double(), sin.double(),
                                           want_k, want_v, positions)
    out = torch.full((B, S, Hq, D), float("nan"), device=device).transpose(1, 2)
    y = tr.rotary_qkv_write(q, k, v, cos, sin, kc, vc, positions, out=out,
                            config={"BLOCK_S": 4, "num_warps": 2})
    assert y is out and not torch.isnan(y).any()
    assert rel_err(y, want_q) < 1e-5 and rel_err(kc, want_k) < 1e-5 and rel_err(vc, want_v) < 1e-5, s


def test_rotary_qkv_write_rotates_q_even_when_the_cache_row_is_skipped(device):
    q = torch.randn(1, 2, 1, 8, device=device)
    k = torch.randn(1, 1, 1, 8, device=device)
    cos, sin = make_cos_sin(1, 1, 8, torch.float32, device)
    kc, vc = torch.zeros(1, 1, 4, 8, device=device), torch.zeros(1, 1, 4, 8, device=device)
    y = tr.rotary_qkv_write(q, k, k, cos, sin, kc, vc, torch.tensor([4], device=device))
    assert kc.abs().sum() == 0 and vc.abs().sum() == 0
    assert torch.allclose(y, tr.reference_rotary(q, cos, sin), atol=1e-6)


def test_rotary_qkv_write_errors(device):
    B, H, S, L, D = 2, 2, 3, 8, 8
    k = torch.randn(B, H, S, D, device=device)
    cos = torch.randn(1, S, D, device=device)
    kc = torch.zeros(B, H, L, D, device=device)
    pos = torch.arange(S, device=device) + 1

    def call(q, **kw):
        return tr.rotary_qkv_write(q, k, k, cos, cos, kc, kc.clone(), pos, **kw)

    with pytest.raises(ValueError, match=r"q's head count \(3\) must be a positive multiple of k's \(2\)"):
        call(torch.randn(B, 3, S, D, device=device))
    with pytest.raises(ValueError, match=r"q's head count \(0\)"):
        call(torch.randn(B, 0, S, D, device=device))
    for bad in ((1, 4, S, D), (B, 4, S + 1, D), (B, 4, S, D + 2)):
        with pytest.raises(ValueError, match=re.escape(f"q must be [{B}, Hq, {S}, {D}]") + ".*" + re.escape(f"got {bad}")):
            call(torch.randn(*bad, device=device))
    with pytest.raises(ValueError, match="q must have 4 dims"):
        call(torch.randn(B, 4, S, device=device))
    with pytest.raises(TypeError, match="q must have the dtype of k"):
        call(torch.randn(B, 4, S, D, device=device).half())
    q = torch.randn(B, 4, S, D, device=device)
    with pytest.raises(ValueError, match="out must have shape"):
        call(q, out=torch.empty(B, 2, S, D, device=device))
    with pytest.raises(ValueError, match="out must not share memory with an input"):
        call(q, out=q)
    with pytest.raises(ValueError, match="v must have k's shape"):
        tr.rotary_qkv_write(q, k, k[:, :1], cos, cos, kc, kc.clone(), pos)

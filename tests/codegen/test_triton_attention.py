"""flashc.codegen.triton_attention: FlashAttention-2 prefill and Flash-Decoding kernels vs float64 references."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from flashc_testing import dot_dtypes, kernel_cases, triton_dtypes

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

from flashc.codegen import triton_attention as ta  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = triton_dtypes()  # bf16 on GPUs only (flashc_testing.triton_dtypes says why)
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2, "num_stages": 1}
UNEVEN = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}

# (B, Hq, Hkv, S, L, D)
PREFILL_CASES = [
    (1, 2, 2, 17, 17, 32),  # GQA 1, S == L, one partial tile
    (2, 4, 1, 5, 37, 24),  # GQA 4, L > S (bottom-right causal), D not a power of 2
    (1, 4, 4, 40, 20, 16),  # S > L: causal rows with no visible key
    (1, 8, 2, 33, 70, 80),  # GQA 4, D = 80, several key tiles
    (2, 2, 1, 64, 64, 64),  # tile-aligned
]


def seed(*args) -> None:
    torch.manual_seed(zlib.crc32(repr(args).encode()))


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def qkv(B, Hq, Hkv, S, L, D, dtype, device, layout="bhsd"):
    if layout == "bhsd":
        q = torch.randn(B, Hq, S, D)
        k = torch.randn(B, Hkv, L, D)
        v = torch.randn(B, Hkv, L, D)
        return (t.to(dtype).to(device) for t in (q, k, v))
    # projection outputs [B, S, H, D] viewed as [B, H, S, D]
    q = torch.randn(B, S, Hq, D).to(dtype).to(device).transpose(1, 2)
    k = torch.randn(B, L, Hkv, D).to(dtype).to(device).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D).to(dtype).to(device).transpose(1, 2)
    return q, k, v


# ---------------------------------------------------------------------------
# The references themselves
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("S,L", [(7, 7), (5, 12), (9, 4)])
def test_reference_attention_matches_sdpa_with_bottom_right_mask(S, L):
    seed("ref", S, L)
    q = torch.randn(2, 4, S, 16, dtype=torch.float64)
    k = torch.randn(2, 2, L, 16, dtype=torch.float64)
    v = torch.randn(2, 2, L, 16, dtype=torch.float64)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    assert torch.allclose(ta.reference_attention(q, k, v, False), F.scaled_dot_product_attention(q, kr, vr))
    mask = torch.ones(S, L, dtype=torch.bool).tril(diagonal=L - S)
    ref = ta.reference_attention(q, k, v, True)
    rows = mask.any(-1)
    sdpa = F.scaled_dot_product_attention(q[:, :, rows], kr, vr, attn_mask=mask[rows])
    assert torch.allclose(ref[:, :, rows], sdpa)
    assert torch.equal(ref[:, :, ~rows], torch.zeros_like(ref[:, :, ~rows]))
    if S == L:  # bottom-right == top-left
        assert torch.allclose(ref, F.scaled_dot_product_attention(q, kr, vr, is_causal=True))


# ---------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", [SMALL, UNEVEN], ids=["16x16", "32x16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_matches_reference(device, dtype, case, causal, config):
    B, Hq, Hkv, S, L, D = case
    seed("attn", dtype, case, causal)
    q, k, v = qkv(B, Hq, Hkv, S, L, D, dtype, device)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    o = ta.attention(q, k, v, causal, out=out, config=config)
    assert o is out and not torch.isnan(o).any()
    ref = ta.reference_attention(q.double(), k.double(), v.double(), causal)
    assert rel_err(o, ref) < TOL[dtype]
    if causal and S > L:
        assert torch.equal(o[:, :, : S - L], torch.zeros_like(o[:, :, : S - L]))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_default_config_and_strided_inputs(device, dtype, causal):
    """Transposed [B, S, H, D] inputs, the profile's default tile config, a custom scale."""
    seed("strided", dtype, causal)
    q, k, v = qkv(2, 4, 2, 45, 70, 40, dtype, device, layout="bshd")
    assert not q.is_contiguous()
    o = ta.attention(q, k, v, is_causal=causal, scale=0.3)
    ref = ta.reference_attention(q.double(), k.double(), v.double(), causal, scale=0.3)
    assert o.is_contiguous() and o.dtype == dtype
    assert rel_err(o, ref) < TOL[dtype]


def test_attention_gqa_equals_repeated_kv(device):
    """Indexing kv head h // group gives exactly what materialised repeated K/V give."""
    seed("gqa")
    q, k, v = qkv(1, 8, 2, 20, 30, 32, torch.float32, device)
    a = ta.attention(q, k, v, True, config=SMALL)
    b = ta.attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), True, config=SMALL)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# (B, Hq, Hkv, S, L, D): a chunk of S new queries over a static cache of L slots
CHUNK_CASES = [
    (1, 4, 2, 16, 40, 32),  # GQA 2, a prompt chunk in the middle of the cache
    (2, 2, 1, 5, 37, 24),  # a verify step, D not a power of 2
    (1, 8, 2, 33, 70, 64),  # several query and key tiles
]


@pytest.mark.parametrize("config", [SMALL, UNEVEN], ids=["16x16", "32x16"])
@pytest.mark.parametrize("case", CHUNK_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunk_attention_sees_the_slots_up_to_each_position(device, dtype, case, config):
    B, Hq, Hkv, S, L, D = case
    seed("chunk", dtype, case)
    q, k, v = qkv(B, Hq, Hkv, S, L, D, dtype, device)
    start = L - S - 3
    positions = torch.arange(start, start + S, device=device)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    o = ta.chunk_attention(q, k, v, positions, out=out, config=config)
    assert o is out and not torch.isnan(o).any()
    ref = ta.reference_chunk_attention(q.double(), k.double(), v.double(), positions)
    assert rel_err(o, ref) < TOL[dtype]
    # the reference is attention over the live prefix with the bottom-right causal mask
    live = start + S
    prefix = ta.reference_attention(q.double(), k[:, :, :live].double(), v[:, :, :live].double(), True)
    assert torch.allclose(ref, prefix)
    # a position per sequence, not contiguous, some past each other: the bound is per query
    per_row = torch.stack([torch.randperm(L, device=device)[:S] for _ in range(B)])
    o = ta.chunk_attention(q, k, v, per_row, config=config)
    assert rel_err(o, ta.reference_chunk_attention(q.double(), k.double(), v.double(), per_row)) < TOL[dtype]


@pytest.mark.parametrize("positions_shape", ["[T]", "[1, T]"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_verify_queries_run_as_decode_sequences(device, dtype, positions_shape, monkeypatch):
    """The CUDA backend's flashc.decode_attention for a few queries at batch 1 (a verify step): each query a
    sequence of the split-KV decode kernel over stride-0 views of the cache, equal to the float64 reference
    (query i sees the slots j <= positions[i]); batch 2 keeps the chunk kernel."""
    from flashc.backends import cuda

    calls = []
    real_chunk, real_decode = ta.chunk_attention, ta.decode_attention
    small = {"BLOCK_N": 16, "MIN_SPLIT_LEN": 16, "num_warps": 2, "num_stages": 1}  # splits these short caches too
    monkeypatch.setattr(ta, "chunk_attention", lambda *a, **kw: calls.append(("chunk", a[0].shape))
                        or real_chunk(*a, **kw))
    monkeypatch.setattr(ta, "decode_attention", lambda *a, **kw: calls.append(("decode", a[0].shape))
                        or real_decode(*a, **{**kw, "config": small}))
    for B, T in ((1, 6), (1, 2), (2, 6)):
        seed("verify_as_sequences", dtype, positions_shape, B, T)
        q, k, v = qkv(B, 4, 2, T, 40, 32, dtype, device)
        start = 40 - T - 5
        positions = torch.arange(start, start + T, device=device)
        if positions_shape == "[1, T]":
            positions = positions[None].expand(B, T)
        o = cuda._decode_attention(q, k, v, positions, 1 / math.sqrt(32))
        ref = ta.reference_chunk_attention(q.double(), k.double(), v.double(), positions)
        assert o.shape == q.shape and o.is_contiguous() and rel_err(o, ref) < TOL[dtype], (B, T)
    assert calls == [("decode", (6, 4, 1, 32)), ("decode", (2, 4, 1, 32)), ("chunk", (2, 4, 6, 32))]


def test_row_invariant_verify_queries_equal_one_query_decode_steps_bit_for_bit(device):
    """Under codegen.tuning.row_invariant (a CUDA verify entry compiled with exact_verify) each query of a
    verify step is split and tiled as the one-token decode step's call is: equal to it bit for bit."""
    from flashc.backends import cuda

    seed("row_invariant_verify")
    T, L, D = 6, 2048, 16  # 8 KV heads: one query splits the keys 8 ways, six as a batch would split them 6 ways
    q, k, v = qkv(1, 8, 8, T, L, D, torch.float32, device)
    positions = torch.arange(L - T - 9, L - 9, device=device)
    scale = 1 / math.sqrt(D)
    with ta.tuning.row_invariant():
        together = cuda._decode_attention(q, k, v, positions, scale)
    alone = torch.cat([cuda._decode_attention(q[:, :, i:i + 1], k, v, positions[i:i + 1], scale) for i in range(T)], 2)
    assert torch.equal(together, alone)
    assert rel_err(together, ta.reference_chunk_attention(q.double(), k.double(), v.double(), positions)) < 1e-5
    assert not torch.equal(cuda._decode_attention(q, k, v, positions, scale), alone)  # as a batch: other splits


def test_chunk_attention_errors(device):
    q, k, v = qkv(1, 2, 2, 4, 10, 16, torch.float32, device)
    with pytest.raises(ValueError, match="positions must have shape"):
        ta.chunk_attention(q, k, v, torch.arange(3, device=device))
    with pytest.raises(ValueError, match="int32/int64"):
        ta.chunk_attention(q, k, v, torch.arange(4, device=device).float())


def test_attention_errors(device):
    q = torch.randn(1, 6, 4, 16, device=device)
    k = torch.randn(1, 4, 5, 16, device=device)
    with pytest.raises(ValueError, match=r"Hq \(6\) must be a multiple of Hkv \(4\)"):
        ta.attention(q, k, k)
    with pytest.raises(ValueError, match="k/v must be"):
        ta.attention(q, torch.randn(1, 3, 5, 8, device=device), torch.randn(1, 3, 5, 8, device=device))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ta.attention(q, k[:, :3], k[:, :2])
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        ta.attention(q, k[:, :3].half(), k[:, :3].half())
    with pytest.raises(ValueError, match=">= 16"):
        ta.attention(q, k[:, :3], k[:, :3], config={"BLOCK_M": 8, "BLOCK_N": 16})


# ---------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------
# (B, Hq, Hkv, Lmax, D)
DECODE_CASES = [
    (3, 4, 1, 50, 24),  # GQA 4
    (2, 8, 8, 130, 64),  # GQA 1
    (4, 8, 2, 97, 40),  # GQA 4, odd Lmax
]


def ragged_lens(B, Lmax, device):
    lens = torch.randint(1, Lmax + 1, (B,))
    lens[0] = Lmax  # full cache
    if B > 2:
        lens[1] = 1  # a single key
    if B > 3:
        lens[3] = 0  # empty row -> zeros
    return lens.to(torch.int32).to(device)


@pytest.mark.parametrize("splits", [None, 1, 3, 7], ids=lambda s: f"splits={s}")
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_matches_reference(device, dtype, case, splits, monkeypatch):
    B, Hq, Hkv, Lmax, D = case
    seed("decode", dtype, case, splits)
    q = torch.randn(B, Hq, 1, D).to(dtype).to(device)
    kc = torch.randn(B, Hkv, Lmax, D).to(dtype).to(device)
    vc = torch.randn(B, Hkv, Lmax, D).to(dtype).to(device)
    lens = ragged_lens(B, Lmax, device)

    # Poison the split workspace: every partial the reduce reads must have been written.
    real_ws = ta._workspace
    monkeypatch.setattr(ta, "_workspace", lambda shape, dev: real_ws(shape, dev).fill_(float("nan")))
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    # MIN_SPLIT_LEN=16 lets the default heuristic (splits=None) split these short caches too.
    cfg = {"BLOCK_N": 16, "MIN_SPLIT_LEN": 16, "num_warps": 2, "num_stages": 1}
    o = ta.decode_attention(q, kc, vc, lens, num_splits=splits, out=out, config=cfg)
    assert o is out and not torch.isnan(o).any()
    ref = ta.reference_decode_attention(q.double(), kc.double(), vc.double(), lens)
    assert rel_err(o, ref) < TOL[dtype]
    empty = lens == 0
    assert torch.equal(o[empty], torch.zeros_like(o[empty]))


def test_decode_matches_prefill_on_the_valid_prefix(device):
    """Decode of the last token == causal prefill's last row over the same keys."""
    seed("decode_vs_prefill")
    B, Hq, Hkv, L, D = 2, 8, 2, 45, 32
    k = torch.randn(B, Hkv, 64, D, device=device)
    v = torch.randn(B, Hkv, 64, D, device=device)
    q = torch.randn(B, Hq, 1, D, device=device)
    lens = torch.full((B,), L, dtype=torch.int64, device=device)  # int64 lengths accepted too
    dec = ta.decode_attention(q, k, v, lens, num_splits=4, config={"BLOCK_N": 16})
    pre = ta.attention(q, k[:, :, :L], v[:, :, :L], is_causal=True, config=SMALL)
    assert torch.allclose(dec, pre, rtol=1e-5, atol=1e-6)


def test_decode_strided_cache_default_config_and_wrong_length_hint(device):
    """A [B, Lmax, Hkv, D] cache viewed as [B, Hkv, Lmax, D]; a too-small max_seq_len hint stays correct."""
    seed("decode_strided")
    B, Hq, Hkv, Lmax, D = 3, 4, 2, 300, 32
    kc = torch.randn(B, Lmax, Hkv, D, device=device).transpose(1, 2)
    vc = torch.randn(B, Lmax, Hkv, D, device=device).transpose(1, 2)
    q = torch.randn(B, Hq, 1, D, device=device)
    lens = torch.tensor([300, 123, 257], dtype=torch.int32, device=device)
    ref = ta.reference_decode_attention(q.double(), kc.double(), vc.double(), lens)
    assert rel_err(ta.decode_attention(q, kc, vc, lens), ref) < 1e-5
    assert rel_err(ta.decode_attention(q, kc, vc, lens, max_seq_len=40, config={"BLOCK_N": 16, "MIN_SPLIT_LEN": 16}), ref) < 1e-5


def test_decode_broadcast_lengths(device):
    """One length expanded over the batch (stride 0), as a decode step at a shared position passes it."""
    seed("decode_expand")
    B, Hq, Hkv, Lmax, D = 3, 4, 2, 64, 16
    kc, vc = torch.randn(B, Hkv, Lmax, D, device=device), torch.randn(B, Hkv, Lmax, D, device=device)
    q = torch.randn(B, Hq, 1, D, device=device)
    lens = torch.tensor([37], device=device).expand(B)
    ref = ta.reference_decode_attention(q.double(), kc.double(), vc.double(), lens)
    assert rel_err(ta.decode_attention(q, kc, vc, lens), ref) < 1e-5
    positions = torch.tensor([36], device=device).expand(B)  # a cache position: length = position + 1
    assert rel_err(ta.decode_attention(q, kc, vc, positions, len_offset=1), ref) < 1e-5


def test_decode_lengths_beyond_cache_are_clamped(device):
    seed("clamp")
    q = torch.randn(2, 2, 1, 16, device=device)
    kc = torch.randn(2, 1, 20, 16, device=device)
    lens = torch.tensor([25, -3], dtype=torch.int32, device=device)
    o = ta.decode_attention(q, kc, kc, lens, num_splits=2, config={"BLOCK_N": 16})
    ref = ta.reference_decode_attention(q.double(), kc.double(), kc.double(), lens)
    assert rel_err(o, ref) < 1e-5
    assert torch.equal(o[1], torch.zeros_like(o[1]))


# One launch: the last split program of each (batch, kv head) combines.  Fresh random
# inputs every run (no seed): the ticket logic must not depend on particular values.
FUSED = {"BLOCK_N": 16, "MIN_SPLIT_LEN": 16, "num_warps": 2, "num_stages": 1, "FUSED_COMBINE": True}
FUSED_CASES = [
    (1, 8, 2, 70, 32),  # GQA 4, batch 1
    (3, 2, 2, 70, 24),  # MHA, D not a power of 2
    (3, 16, 2, 200, 128),  # GQA 8, D 128: the combine takes 4 splits at a time (num_warps 2)
]


def counters_are_zero() -> bool:
    return all(not c.any() for c in ta._COUNTERS.values())


@pytest.mark.parametrize("dtype,case,splits", kernel_cases(dtype=dot_dtypes(), case=FUSED_CASES,
                                                            splits=[1, 3, 13, 40, None]), ids=str)
def test_fused_decode_matches_reference(device, dtype, case, splits, monkeypatch):
    B, Hq, Hkv, Lmax, D = case
    q = torch.randn(B, Hq, 1, D).to(dtype).to(device)
    kc = torch.randn(B, Hkv, Lmax, D).to(dtype).to(device)
    vc = torch.randn(B, Hkv, Lmax, D).to(dtype).to(device)
    lens = torch.randint(1, Lmax + 1, (B,))
    lens[0] = Lmax
    if B > 1:
        lens[1] = 0
    lens = lens.to(torch.int32).to(device)

    real_ws = ta._workspace
    monkeypatch.setattr(ta, "_workspace", lambda shape, dev: real_ws(shape, dev).fill_(float("nan")))
    outs = []
    for _ in range(2):  # the second call finds the counters reset by the first
        out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
        outs.append(ta.decode_attention(q, kc, vc, lens, num_splits=splits, out=out, config=FUSED))
        assert counters_are_zero()
    assert torch.equal(outs[0], outs[1]) and not torch.isnan(outs[0]).any()
    ref = ta.reference_decode_attention(q.double(), kc.double(), vc.double(), lens)
    assert rel_err(outs[0], ref) < TOL[dtype]
    empty = lens == 0
    assert torch.equal(outs[0][empty], torch.zeros_like(outs[0][empty]))
    unfused = {k: v for k, v in FUSED.items() if k != "FUSED_COMBINE"}
    two_launch = ta.decode_attention(q, kc, vc, lens, num_splits=splits, config=unfused)
    assert torch.allclose(outs[0].float(), two_launch.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("splits", [1, 4], ids=lambda s: f"splits={s}")
def test_fused_decode_offsets_strides_and_clamps(device, splits):
    """len_offset, a stride-0 length, lengths past the cache and negative ones, as on the two-launch path."""
    B, Hq, Hkv, Lmax, D = 3, 4, 2, 64, 16
    q = torch.randn(B, Hq, 1, D, device=device)
    kc, vc = torch.randn(B, Hkv, Lmax, D, device=device), torch.randn(B, Hkv, Lmax, D, device=device)
    positions = torch.tensor([36], device=device).expand(B)
    ref = ta.reference_decode_attention(q.double(), kc.double(), vc.double(), positions + 1)
    o = ta.decode_attention(q, kc, vc, positions, len_offset=1, num_splits=splits, config=FUSED)
    assert rel_err(o, ref) < 1e-5
    lens = torch.tensor([90, -3, 0], dtype=torch.int64, device=device)
    o = ta.decode_attention(q, kc, vc, lens, num_splits=splits, config=FUSED)
    assert rel_err(o, ta.reference_decode_attention(q.double(), kc.double(), vc.double(), lens)) < 1e-5
    assert torch.equal(o[1:], torch.zeros_like(o[1:]))
    assert counters_are_zero()


def test_fused_decode_counters_grow_per_device(device, monkeypatch):
    monkeypatch.setattr(ta, "_COUNTERS", {})
    monkeypatch.setattr(ta, "_OUTGROWN_COUNTERS", [])
    for B, Hkv in [(1, 2), (1, 1), (3, 4)]:
        q = torch.randn(B, 2 * Hkv, 1, 16, device=device)
        kc = torch.randn(B, Hkv, 40, 16, device=device)
        lens = torch.full((B,), 33, dtype=torch.int32, device=device)
        o = ta.decode_attention(q, kc, kc, lens, num_splits=3, config=FUSED)
        assert rel_err(o, ta.reference_decode_attention(q.double(), kc.double(), kc.double(), lens)) < 1e-5
    (dev, buf), = ta._COUNTERS.items()
    assert dev == q.device and buf.dtype == torch.int32 and buf.numel() == 12 and not buf.any()
    assert [c.numel() for c in ta._OUTGROWN_COUNTERS] == [2]  # kept alive for graphs captured with it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_fused_decode_replays_in_a_cuda_graph():
    """Replays reuse the counters without re-zeroing them; many splits and replays stress the ticket ordering."""
    B, Hq, Hkv, Lmax, D = 4, 32, 8, 4096, 128
    dev = torch.device("cuda", torch.cuda.current_device())
    q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(B, Hkv, Lmax, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(B, Hkv, Lmax, D, device=dev, dtype=torch.bfloat16)
    lens = torch.tensor([4096, 1, 0, 2500], dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    cfg = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "FUSED_COMBINE": True}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and allocate the counters outside the capture
        ta.decode_attention(q, kc, vc, lens, num_splits=64, out=out, config=cfg)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ta.decode_attention(q, kc, vc, lens, num_splits=64, out=out, config=cfg)
    for _ in range(20):
        q.normal_()
        lens.copy_(torch.randint(0, Lmax + 1, (B,), dtype=torch.int32, device=dev))
        graph.replay()
        ref = ta.reference_decode_attention(q.double(), kc.double(), vc.double(), lens)
        assert rel_err(out, ref) < 1e-2
    torch.cuda.synchronize()
    assert counters_are_zero()


@pytest.mark.parametrize(
    "B,Hkv,L,sm,bn,msl",
    [(1, 8, 4096, 132, 64, 256), (64, 8, 4096, 132, 64, 256), (1, 1, 100, 132, 64, 256), (2, 4, 32768, 108, 128, 512), (1, 1, 10**6, 132, 64, 256)],
)
def test_decode_num_splits_properties(B, Hkv, L, sm, bn, msl):
    ns, split_len = ta.decode_num_splits(B, Hkv, L, sm, bn, msl)
    assert 1 <= ns <= 256
    assert split_len % bn == 0
    assert ns * split_len >= L > (ns - 1) * split_len  # the splits cover L, none is empty
    if ns > 1:
        assert split_len >= min(msl, L)
    if B * Hkv >= 2 * sm:
        assert ns == 1  # already enough programs: no split overhead
    if B * Hkv == 8 and L == 4096:
        assert ns >= 8  # a single long sequence gets spread over the GPU


def test_decode_errors(device):
    q = torch.randn(2, 4, 1, 16, device=device)
    kc = torch.randn(2, 2, 10, 16, device=device)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"q must be \[B, Hq, 1, D\]"):
        ta.decode_attention(torch.randn(2, 4, 2, 16, device=device), kc, kc, lens)
    with pytest.raises(TypeError, match="seq_lens must have dtype"):
        ta.decode_attention(q, kc, kc, lens.float())
    with pytest.raises(ValueError, match=r"seq_lens must have shape \(2,\)"):
        ta.decode_attention(q, kc, kc, lens[:1])
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        ta.decode_attention(q, kc, kc, lens, num_splits=0)
    with pytest.raises(ValueError, match=r"Hq \(4\) must be a multiple of Hkv \(3\)"):
        ta.decode_attention(q, torch.randn(2, 3, 10, 16, device=device), torch.randn(2, 3, 10, 16, device=device), lens)


def test_default_scale_is_inverse_sqrt_d(device):
    seed("scale")
    q, k, v = qkv(1, 2, 2, 8, 8, 16, torch.float32, device)
    assert torch.allclose(ta.attention(q, k, v), ta.attention(q, k, v, scale=1 / math.sqrt(16)))

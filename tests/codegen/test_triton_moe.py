"""flashc.codegen.triton_moe: the fused mixture-of-experts kernels against a float64 reference."""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from flashc_testing import triton_dtypes

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

import flashc.ops  # noqa: E402,F401  (registers torch.ops.flashc.moe)
from flashc.codegen import triton_moe as tm  # noqa: E402
from flashc.codegen import tuning  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = triton_dtypes()  # bf16 on GPUs only (flashc_testing.triton_dtypes says why)
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 2, "num_stages": 1}
WIDE_M = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}

# (T, E, top_k, H, F, normalize)
CASES = [
    (1, 8, 2, 64, 96, True),  # decode: one token, most experts idle
    (3, 4, 2, 40, 72, False),  # H, F not multiples of any block
    (8, 8, 1, 64, 96, False),
    (8, 8, 2, 40, 72, True),
    (32, 8, 2, 40, 72, False),  # P = 64: the largest batch the routing kernel takes
    (37, 4, 2, 64, 96, True),  # several BLOCK_M tiles per expert; P = 74: PyTorch routing
    (37, 8, 1, 40, 72, False),
]


def seed(*args) -> None:
    torch.manual_seed(zlib.crc32(repr(args).encode()))


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_inputs(T, E, H, F, dtype, device):
    """x[T, H], fp32 router logits[T, E], gate_up[E, 2F, H], down[E, H, F], scaled so outputs are O(1)."""
    x = torch.randn(T, H)
    logits = torch.randn(T, E) * 2
    gate_up = torch.randn(E, 2 * F, H) / H**0.5
    down = torch.randn(E, H, F) / F**0.5
    return x.to(dtype).to(device), logits.to(device), gate_up.to(dtype).to(device), down.to(dtype).to(device)


def reference64(x, logits, gate_up, down, top_k, normalize):
    return tm.reference_moe(x.double(), logits, gate_up.double(), down.double(), top_k, normalize)


@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small_tiles"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_matches_reference(device, dtype, case, config):
    T, E, top_k, H, F, normalize = case
    seed(dtype, case)
    x, logits, gate_up, down = make_inputs(T, E, H, F, dtype, device)
    y = tm.moe(x, logits, gate_up, down, top_k, normalize, config=config)
    assert y.shape == (T, H) and y.dtype == dtype and torch.isfinite(y).all()
    assert rel_err(y, reference64(x, logits, gate_up, down, top_k, normalize)) < TOL[dtype]


def test_reference_matches_flashc_op():
    """reference_moe is torch.ops.flashc.moe (guards the tests' own ground truth)."""
    seed("ref")
    x, logits, gate_up, down = make_inputs(9, 6, 24, 20, torch.float64, "cpu")
    for top_k, normalize in ((1, False), (2, True), (3, False)):
        ref = tm.reference_moe(x, logits, gate_up, down, top_k, normalize)
        assert torch.allclose(ref, torch.ops.flashc.moe(x, logits, gate_up, down, top_k, normalize))


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("routed", [(0,), (7,), (1, 6)], ids=str)
def test_only_routed_experts_are_read(device, routed, T):
    """Experts no token routes to hold NaN weights; the output stays finite, so they were never read."""
    E, H, F = 8, 40, 72
    seed("routed", routed, T)
    x, logits, gate_up, down = make_inputs(T, E, H, F, torch.float32, device)
    for rank, e in enumerate(routed):
        logits[:, e] = 20.0 - rank  # distinct, so top-k is the same on every token
    idle = [e for e in range(E) if e not in routed]
    gate_up[idle] = float("nan")
    down[idle] = float("nan")
    y = tm.moe(x, logits, gate_up, down, len(routed), True, config=WIDE_M)
    assert torch.isfinite(y).all()
    assert rel_err(y, reference64(x, logits, gate_up, down, len(routed), True)) < TOL[torch.float32]


@pytest.mark.parametrize("block_m", [16, 32])
def test_pair_table_groups_pairs_by_expert(block_m):
    """Every pair once, each block of one expert, padding only at group ends, unused blocks marked E."""
    T, E, top_k = 29, 8, 2
    seed("table", block_m)
    experts = torch.topk(torch.randn(T, E), top_k, dim=-1).indices
    experts[:, 0] = torch.where(torch.arange(T) < 20, 3, experts[:, 0])  # expert 3: more than one block
    experts[:, 1] = torch.where(experts[:, 1] == 3, 5, experts[:, 1])  # no token routes twice to 3
    P = T * top_k
    rows, block_expert = tm._sort_pairs(experts, E, block_m)
    assert rows.numel() == block_expert.numel() * block_m
    real = rows[rows < P].long()
    assert torch.equal(real.sort().values, torch.arange(P))
    flat = experts.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    used = int(((counts + block_m - 1) // block_m).sum())
    assert (block_expert[:used] < E).all() and (block_expert[used:] == E).all()
    for b in range(used):
        tile = rows[b * block_m:(b + 1) * block_m].long()
        valid = tile < P
        assert valid[0] and torch.equal(valid, valid.sort(descending=True).values)  # pairs first, then padding
        assert (flat[tile[valid]] == block_expert[b]).all()
        assert torch.equal(tile[valid], tile[valid].sort().values)  # stable: pair order within an expert


def tie_free_logits(T, E, dtype, device, gen):
    """Random logits, distinct within each token even in bf16 (gaps >= 0.25), so top-k has one answer."""
    ranks = torch.stack([torch.randperm(E, generator=gen) for _ in range(T)]).float()
    return (ranks * 0.5 + torch.rand(T, E, generator=gen) * 0.25 - E / 4).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("E", [4, 8])
@pytest.mark.parametrize("T", [1, 2, 5, 16])
def test_routing_kernel_matches_pytorch_routing(device, T, E, top_k, normalize, dtype):
    """The one-launch routing equals route + _sort_pairs: the pair table exactly, the weights to rounding."""
    assert T * top_k <= tm._ROUTE_KERNEL_MAX
    block_m = 16
    gen = torch.Generator()
    msg = f"logits from torch.Generator().manual_seed({gen.seed()})"  # fresh inputs each run
    logits = tie_free_logits(T, E, dtype, device, gen)
    route_w, rows, block_expert = tm._route_pairs(logits, top_k, normalize, dtype, block_m)
    weights, experts = tm.route(logits, top_k, normalize, dtype)
    ref_rows, ref_block_expert = tm._sort_pairs(experts, E, block_m)
    assert torch.equal(rows, ref_rows) and torch.equal(block_expert, ref_block_expert), msg
    assert route_w.dtype == dtype
    torch.testing.assert_close(route_w, weights.reshape(-1), msg=msg)


def test_routing_kernel_breaks_ties_to_the_lowest_expert(device):
    """Equal logits: each token picks experts 0..top_k-1; ranking is on the logits, so -inf ones still rank."""
    T, E, top_k, block_m = 3, 8, 2, 16
    logits = torch.zeros(T, E, device=device)
    logits[2, :] = float("-inf")
    logits[2, 5] = 1.0  # token 2: expert 5, then the lowest of the -inf ones
    route_w, rows, block_expert = tm._route_pairs(logits, top_k, True, torch.float32, block_m)
    P = T * top_k
    pad = [P] * block_m
    assert rows.tolist() == [0, 2, 5, *pad[3:], 1, 3, *pad[2:], 4, *pad[1:], *pad * 3]
    assert block_expert.tolist() == [0, 1, 5, E, E, E]
    torch.testing.assert_close(route_w[:4], torch.full((4,), 0.5, device=device))
    torch.testing.assert_close(route_w[4:], torch.tensor([1.0, 0.0], device=device))


@pytest.mark.parametrize("T", [5, 40], ids=["routing_kernel", "pytorch_routing"])
def test_host_code_has_no_data_dependent_ops(device, monkeypatch, T):
    """moe's host code runs under FakeTensorMode, where .item(), nonzero or bincount would raise.

    So it never synchronises with the device and can be captured in a CUDA graph;
    the kernel launches take only shapes, strides and pointers.
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    launches = []
    monkeypatch.setattr(tm, "_launch_route", lambda *args: launches.append(args[1].shape))
    monkeypatch.setattr(tm, "_launch_gemm", lambda *args: launches.append(args[2].shape))
    with FakeTensorMode():
        x, logits, gate_up, down = make_inputs(T, 8, 64, 96, torch.float16, device)
        y = tm.moe(x, logits, gate_up, down, 2, True)
        with pytest.raises(DataDependentOutputException):  # the mode does catch a sync
            logits.sum().item()
    assert y.shape == (T, 64) and y.dtype == torch.float16
    P = 2 * T
    assert launches == ([(P,)] if P <= tm._ROUTE_KERNEL_MAX else []) + [(P, 96), (P, 64)]


def test_moe_noncontiguous_inputs_and_determinism(device):
    T, E, H, F = 6, 4, 40, 24
    seed("strided")
    x = torch.randn(H, T, device=device).t()  # column-major activations
    logits = torch.randn(E, T, device=device).t()
    gate_up = torch.randn(E, H, 2 * F, device=device).transpose(1, 2) / H**0.5
    down = torch.randn(E, F, H, device=device).transpose(1, 2) / F**0.5
    y = tm.moe(x, logits, gate_up, down, 2, False)
    assert rel_err(y, reference64(x, logits, gate_up, down, 2, False)) < TOL[torch.float32]
    assert torch.equal(y, tm.moe(x, logits, gate_up, down, 2, False))


def test_moe_empty_batch(device):
    x, logits, gate_up, down = make_inputs(0, 4, 16, 16, torch.float32, device)
    assert tm.moe(x, logits, gate_up, down, 2, True).shape == (0, 16)


def test_moe_errors(device):
    x, logits, gate_up, down = make_inputs(3, 4, 16, 8, torch.float32, device)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, E=4\], got 5"):
        tm.moe(x, logits, gate_up, down, 5, True)
    with pytest.raises(ValueError, match=r"gate_up must be \[E=4, 2F=16, H=16\]"):
        tm.moe(x, logits, gate_up[:, :8], down, 2, True)
    with pytest.raises(ValueError, match=r"router_logits must be \[T=3, E\]"):
        tm.moe(x, logits[:2], gate_up, down, 2, True)
    with pytest.raises(TypeError, match="down must have the dtype of x"):
        tm.moe(x, logits, gate_up, down.half(), 2, True)
    with pytest.raises(ValueError, match="must be >= 16"):
        tm.moe(x, logits, gate_up, down, 2, True, config={**SMALL, "BLOCK_K": 8})


def test_tune_moe_without_gpu_returns_a_candidate(device):
    if device.type == "cuda":
        pytest.skip("timing on a real GPU is exercised by the benchmark scripts, not unit tests")
    x, logits, gate_up, down = make_inputs(2, 4, 32, 32, torch.float16, device)
    assert tm.tune_moe(x, logits, gate_up, down, 2, True) in tuning.candidates("moe", "default")
    assert not os.path.exists(tuning.cache_path())

"""flashc.codegen.triton_moe.moe_sparse (flashc.moe_sparse: the experts' intermediate pruned in
kernel 1's epilogue) against the op's reference and a float64 reference, and the CUDA backend's
row for the op."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from flashc_testing import triton_dtypes

pytest.importorskip("triton", reason="Triton is not installed: flashc.codegen's kernels need it")

import flashc.sparse_ops  # noqa: E402,F401  (registers torch.ops.flashc.moe_sparse)
from flashc.codegen import triton_moe as tm  # noqa: E402
from flashc.codegen import tuning  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = triton_dtypes()  # bf16 on GPUs only (flashc_testing.triton_dtypes says why)
SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 2, "num_stages": 1}

# (T, E, top_k, H, F, normalize)
CASES = [
    (1, 8, 2, 64, 96, True),  # decode: the routing kernel, most experts idle
    (3, 4, 2, 40, 72, False),  # H, F not multiples of any block: masked column tiles
    (37, 4, 2, 64, 96, True),  # several BLOCK_M tiles per expert; P = 74: PyTorch routing
]


def fresh_generator() -> tuple[torch.Generator, str]:
    """A generator on a fresh seed (new inputs every run) and the message that reproduces a failure."""
    gen = torch.Generator()
    return gen, f"inputs from torch.Generator().manual_seed({gen.seed()})"


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_inputs(T, E, H, F, dtype, device, gen):
    """x[T, H], fp32 router logits[T, E] (distinct within a token: one top-k), gate_up[E, 2F, H],
    down[E, H, F], scaled so that gate and up are O(1) and so is the output."""
    ranks = torch.rand(T, E, generator=gen).argsort(dim=1).float()
    logits = ranks * 0.5 + torch.rand(T, E, generator=gen) * 0.25 - E / 4
    x = torch.randn(T, H, generator=gen)
    gate_up = torch.randn(E, 2 * F, H, generator=gen) / H**0.5
    down = torch.randn(E, H, F, generator=gen) / F**0.5
    return x.to(dtype).to(device), logits.to(device), gate_up.to(dtype).to(device), down.to(dtype).to(device)


def make_threshold(kind: str, F: int, device, gen) -> torch.Tensor:
    """fp32 thresholds that zero a good share of h = silu(gate) * up (|h| has median ~0.2 here)."""
    if kind == "scalar":
        return torch.tensor(0.1 + 0.1 * torch.rand((), generator=gen).item(), device=device)
    return (torch.rand(F, generator=gen) * 0.4).to(device)


def reference64(x, logits, gate_up, down, top_k, normalize, threshold):
    """flashc.moe_sparse in float64, except that whether h is kept is decided on h rounded to x's
    dtype, as the op decides it (its h is in x.dtype), so that near-threshold entries are kept or
    dropped as the kernel does and only rounding remains between the two."""
    weights, experts = tm.route(logits, top_k, normalize, torch.float64)
    f = down.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for k in range(top_k):
        e = experts[:, k]
        gu = torch.einsum("th,tnh->tn", x.double(), gate_up[e].double())
        h = torch.nn.functional.silu(gu[:, :f]) * gu[:, f:]
        h = torch.where(h.to(x.dtype).abs() > threshold, h, 0.0)
        out = out + torch.einsum("tf,thf->th", h, down[e].double()) * weights[:, k, None]
    return out


@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small_tiles"])
@pytest.mark.parametrize("kind", ["scalar", "per_channel"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_sparse_matches_float64_reference(device, dtype, case, kind, config):
    T, E, top_k, H, F, normalize = case
    gen, msg = fresh_generator()
    x, logits, gate_up, down = make_inputs(T, E, H, F, dtype, device, gen)
    threshold = make_threshold(kind, F, device, gen)
    y = tm.moe_sparse(x, logits, gate_up, down, top_k, normalize, threshold, config=config)
    assert y.shape == (T, H) and y.dtype == dtype and torch.isfinite(y).all(), msg
    want = reference64(x, logits, gate_up, down, top_k, normalize, threshold)
    assert rel_err(y, want) < TOL[dtype], msg
    # the threshold matters: far beyond the tolerance from the dense MoE
    dense = reference64(x, logits, gate_up, down, top_k, normalize, torch.tensor(-1.0))
    assert rel_err(want, dense) > 100 * TOL[torch.float32], msg


@pytest.mark.parametrize("kind", ["scalar", "per_channel"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_moe_sparse_matches_the_op_reference(device, case, kind):
    """fp32, where the op's reference (flashc/sparse_ops.py) and the kernel round h alike."""
    T, E, top_k, H, F, normalize = case
    gen, msg = fresh_generator()
    x, logits, gate_up, down = make_inputs(T, E, H, F, torch.float32, device, gen)
    threshold = make_threshold(kind, F, device, gen)
    y = tm.moe_sparse(x, logits, gate_up, down, top_k, normalize, threshold)
    want = torch.ops.flashc.moe_sparse(x, logits, gate_up, down, top_k, normalize, threshold)
    assert rel_err(y, want) < TOL[torch.float32], msg


def test_reference_matches_flashc_op():
    """reference_moe with a threshold is torch.ops.flashc.moe_sparse (guards the tests' ground truth)."""
    gen, msg = fresh_generator()
    x, logits, gate_up, down = make_inputs(9, 6, 24, 20, torch.float64, "cpu", gen)
    for top_k, normalize, threshold in ((1, False, torch.tensor(0.15, dtype=torch.float64)),
                                        (2, True, torch.rand(20, generator=gen, dtype=torch.float64) * 0.4)):
        ref = tm.reference_moe(x, logits, gate_up, down, top_k, normalize, threshold)
        op = torch.ops.flashc.moe_sparse(x, logits, gate_up, down, top_k, normalize, threshold)
        assert torch.allclose(ref, op), msg
        assert not torch.allclose(ref, tm.reference_moe(x, logits, gate_up, down, top_k, normalize)), msg


@pytest.mark.parametrize("kind", ["scalar", "per_channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_threshold_zero_is_moe(device, dtype, kind):
    """Threshold 0 drops only zeros: the same bits as moe's kernel, the pruning costs no accuracy."""
    T, E, top_k, H, F, normalize = CASES[1]
    gen, msg = fresh_generator()
    x, logits, gate_up, down = make_inputs(T, E, H, F, dtype, device, gen)
    zero = torch.zeros(() if kind == "scalar" else (F,), device=device)
    y = tm.moe_sparse(x, logits, gate_up, down, top_k, normalize, zero)
    assert torch.equal(y, tm.moe(x, logits, gate_up, down, top_k, normalize)), msg


@pytest.mark.parametrize("kind", ["scalar", "per_channel"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_threshold_is_compared_as_the_op_compares_it(dtype, kind):
    """The kernel compares h (in x's dtype, widened) with _comparison_threshold's threshold; that must
    decide as the op's `h.abs() > threshold` does, torch's promotion included: a 0-d fp32 threshold
    against fp16 h is rounded to fp16 first, a per-channel one is not. Thresholds halfway between
    neighbouring h values, where the two roundings disagree, and on them."""
    gen, msg = fresh_generator()
    F = 64
    h = (torch.randn(32, F, generator=gen) * 0.3).to(dtype)
    values = h.abs().flatten().unique()
    above = torch.nextafter(values, torch.tensor(float("inf"), dtype=dtype))
    halfway = values.double() + (above.double() - values.double()) / 2
    for t in (halfway, values.double()):
        for _ in range(8):  # a 0-d threshold rounds up to an h value about half the time
            picks = t[torch.randint(len(t), (F,), generator=gen)]
            threshold = (picks[0] if kind == "scalar" else picks).float()
            compared = tm._comparison_threshold(h, threshold)
            assert torch.equal(h.to(compared.dtype).abs() > compared, h.abs() > threshold), msg
    threshold64 = halfway[torch.randint(len(halfway), (F,), generator=gen)]  # per channel: compared in fp64
    kept = h.double().abs() > tm._comparison_threshold(h, threshold64)
    assert torch.equal(kept, h.abs() > threshold64), msg


@pytest.mark.parametrize("T", [5, 40], ids=["routing_kernel", "pytorch_routing"])
def test_host_code_has_no_data_dependent_ops(device, monkeypatch, T):
    """moe_sparse's host code (threshold checks and cast included) runs under FakeTensorMode, where
    a host synchronisation would raise: it can be captured in a CUDA graph, as moe can."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    launches = []
    monkeypatch.setattr(tm, "_launch_route", lambda *args: launches.append(("route", args[1].shape)))
    def gemm(*args):  # the output's shape, and whether a threshold (the 12th argument) came
        launches.append((args[2].shape, len(args) > 11 and args[11] is not None))

    monkeypatch.setattr(tm, "_launch_gemm", gemm)
    with FakeTensorMode():
        x = torch.randn(T, 64, dtype=torch.float16, device=device)
        logits = torch.randn(T, 8, device=device)
        gate_up = torch.randn(8, 192, 64, dtype=torch.float16, device=device)
        down = torch.randn(8, 64, 96, dtype=torch.float16, device=device)
        y = tm.moe_sparse(x, logits, gate_up, down, 2, True, torch.rand(96, device=device))
    assert y.shape == (T, 64) and y.dtype == torch.float16
    P = 2 * T
    routing = [("route", (P,))] if P <= tm._ROUTE_KERNEL_MAX else []
    assert launches == routing + [((P, 96), True), ((P, 64), False)]  # the threshold goes to kernel 1 only


def test_moe_sparse_errors(device):
    gen, _ = fresh_generator()
    x, logits, gate_up, down = make_inputs(3, 4, 16, 8, torch.float32, device, gen)
    with pytest.raises(ValueError, match=r"moe_sparse: threshold must be 0-d or one per intermediate channel "
                                         r"\[F=8\], got shape \(16,\)"):
        tm.moe_sparse(x, logits, gate_up, down, 2, True, torch.zeros(16, device=device))
    with pytest.raises(TypeError, match="moe_sparse: threshold must have dtype in"):
        tm.moe_sparse(x, logits, gate_up, down, 2, True, torch.zeros((), dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"moe_sparse: top_k must be an int in \[1, E=4\], got 5"):
        tm.moe_sparse(x, logits, gate_up, down, 5, True, torch.zeros((), device=device))


def test_tune_moe_sparse_without_gpu_returns_a_candidate(device):
    if device.type == "cuda":
        pytest.skip("timing on a real GPU is exercised by the benchmark scripts, not unit tests")
    gen, _ = fresh_generator()
    x, logits, gate_up, down = make_inputs(2, 4, 32, 32, torch.float16, device, gen)
    threshold = torch.tensor(0.1, device=device)
    assert tm.tune_moe_sparse(x, logits, gate_up, down, 2, True, threshold) in tuning.candidates("moe", "default")
    assert not os.path.exists(tuning.cache_path())


def test_the_cuda_backend_runs_the_kernel_for_the_op(device, tiny_models):
    """mixtral-tiny's experts pruned (flashc.moe rewritten to flashc.moe_sparse as the pruning pass
    writes it), each moe_sparse node pointed at the CUDA backend's launcher as CudaExecutable does
    (without a GPU: the kernels in the interpreter, on CPU tensors), against the program run eagerly."""
    from flashc_testing import fresh_ids

    from flashc.backends.cuda import KERNELS, CudaBackend
    from flashc.capture import capture
    from flashc.ir import op_name
    from flashc.pass_manager import PassContext, PassManager
    from flashc.pipelines import pipeline
    from flashc.profiles import get_profile

    assert CudaBackend().lowering.lowers("flashc.moe_sparse") and KERNELS["flashc.moe_sparse"].tune is not None
    program = capture(tiny_models["mixtral-tiny"], (fresh_ids("mixtral-tiny"),), {"use_cache": False})
    PassManager(pipeline(3)).run(program, PassContext(get_profile("cpu")))
    dense = program.clone()
    moes = [n for n in program.op_nodes() if n.target is torch.ops.flashc.moe.default]
    assert moes
    gen, msg = fresh_generator()
    for i, node in enumerate(moes):
        f = program.params[node.args[3].name].shape[-1]
        threshold = torch.rand(f, generator=gen) * 0.1 if i % 2 else torch.tensor(0.05)
        param = program.add_param(f"moe_{i}_sparsify_threshold", threshold)
        node.target = torch.ops.flashc.moe_sparse.default
        node.args = (*node.args[:6], param)
    program.graph.lint()
    program.recompile()

    graph = copy.deepcopy(program.graph)
    launched = 0
    for node in graph.nodes:
        if node.op == "call_function" and op_name(node) == "flashc.moe_sparse":
            node.target = KERNELS["flashc.moe_sparse"].launch
            launched += 1
    assert launched == len(moes)
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    weights = [program.params[n.name].to(device) for n in program.param_nodes()]
    ids = fresh_ids("mixtral-tiny")
    got = module(*weights, ids.to(device))
    got = (got[0] if isinstance(got, (tuple, list)) else got).cpu()
    want = program.run_flat(ids)[0]
    assert rel_err(want, dense.run_flat(ids)[0]) > 1e-3, msg  # the thresholds matter
    assert rel_err(got, want) < 1e-4, msg

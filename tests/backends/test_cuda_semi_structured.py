"""2:4-pruned linears on the sparse tensor cores (backends/cuda_semi_structured.py, codegen/semi_structured.py).

On the CPU: the late pass rewrites exactly the prefill-sized linears whose stored weight has the
2:4 pattern into flashc.linear_24, leaves the others with a reason, and the rewritten program
(the op's reference runs here) computes what the pruned program computed. On a GPU: the kernel
against F.linear for each sparse library, tuning's choice, and a compiled 2:4-pruned prefill
against the pruned program run eagerly.
"""

import pytest
import torch
import torch.nn.functional as F
from flashc_testing import optimized_program, rel_err

import flashc
from flashc import zoo
from flashc.backends.cuda import KERNELS, CudaBackend
from flashc.backends.cuda_semi_structured import (LINEAR_24, NOT_2_4, FuseSemiStructuredMatmuls,
                                                  fuse_semi_structured_matmuls)
from flashc.capture import capture
from flashc.codegen import semi_structured as s24
from flashc.codegen.triton_gemv import MAX_ROWS
from flashc.ir import op_name
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.prune import for_model
from flashc.profiles import PROFILES
from flashc.semi_structured_ops import is_2_4

LINEAR = torch.ops.aten.linear.default
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the sparse tensor cores")


def make_2_4(w: torch.Tensor) -> torch.Tensor:
    """w with the 2 largest-magnitude entries of every 4 consecutive inputs kept, the rest zeroed."""
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).reshape(w.shape)


def run_late_passes(program, profile="h100", *passes):
    lowered = program.clone()
    records = PassManager(list(passes) or [FuseSemiStructuredMatmuls(MAX_ROWS)], numeric_check=True).run(
        lowered, PassContext(PROFILES[profile]))
    return lowered, records


@pytest.fixture(scope="module")
def pruned_prefill():
    """llama-tiny in bf16, captured for a 64-token prefill, optimized at level 3 (qkv and gate|up
    merged) and pruned to 2:4 by SparseGPT (prune='2:4') on a small calibration set."""
    model = zoo.build("llama-tiny", dtype=torch.bfloat16, seed=0)
    program = optimized_program(model, "llama-tiny", seq_len=64, level=3)
    calibration = torch.randint(0, model.config.vocab_size, (1024,), generator=torch.Generator().manual_seed(0))
    PassManager([for_model("2:4", calibration, model)]).run(program, PassContext(PROFILES["cpu"]))
    return model, program


def test_is_2_4_checks_every_group():
    w = make_2_4(torch.randn(8, 64))
    assert is_2_4(w) and is_2_4(torch.zeros(4, 8)) and not is_2_4(torch.randn(4, 6))
    w[7, 61] = w[7, 62] = w[7, 63] = w[7, 60] = 1.0  # the very last group: 4 nonzeros
    assert not is_2_4(w)


def test_prefill_2_4_linears_become_linear_24_and_keep_the_numbers(pruned_prefill):
    model, program = pruned_prefill
    linears = [n for n in program.op_nodes() if n.target is LINEAR]
    patterned = [n for n in linears if is_2_4(program.params[n.args[1].name])]
    assert len(patterned) == 4 * model.config.num_hidden_layers  # qkv, o, gate|up, down; the lm_head is not pruned
    assert len(linears) == len(patterned) + 1
    lowered, (record,) = run_late_passes(program)
    # the lm_head is only counted: a report lists the 2:4 weights left dense, not every unpruned layer
    assert record.stats == {"matmuls_to_linear_24": len(patterned), "semi_structured_kept_dense": 0, "not_2_4": 1}
    assert not record.details
    calls = [n for n in lowered.op_nodes() if n.target is LINEAR_24]
    assert [c.args[1].name for c in calls] == [n.args[1].name for n in patterned]  # the dense weight, no copy
    assert [op_name(n) for n in lowered.op_nodes()].count("aten.linear") == 1
    assert set(lowered.params) == set(program.params)
    for seed in range(2):  # fresh random prompts: the rewritten graph computes what the pruned graph computed
        ids = zoo.example_inputs("llama-tiny", seq_len=64, seed=100 + seed)
        got, want = lowered.run_flat(*ids)[0], program.run_flat(*ids)[0]
        assert torch.equal(got, want)
    dense = zoo.build("llama-tiny", dtype=torch.bfloat16, seed=0)(*ids, use_cache=False).logits
    assert rel_err(want, dense) > 1e-2  # the pruning is real: the comparison could fail


class ThreeWeights(torch.nn.Module):
    """A 2:4 weight, a dense one, and a 2:4 one the forward then scales in place."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w24", make_2_4(torch.randn(64, 128, generator=g)).bfloat16())
        self.register_buffer("w_dense", torch.randn(64, 128, generator=g).bfloat16())
        self.register_buffer("w_written", make_2_4(torch.randn(64, 128, generator=g)).bfloat16())
        self.register_buffer("b", torch.randn(64, generator=g).bfloat16())

    def forward(self, x):
        y = F.linear(x, self.w24, self.b) + F.linear(x, self.w_dense) + F.linear(x, self.w_written)
        self.w_written.mul_(0.5)
        return y


def test_only_the_stored_unwritten_2_4_weight_is_rewritten_and_the_rest_say_why():
    program = capture(ThreeWeights(), (torch.randn(2, 24, 128).bfloat16(),))
    done, skipped = fuse_semi_structured_matmuls(program.clone(), MAX_ROWS, PROFILES["h100"])
    assert done == 1 and sorted(why for _, why in skipped) == sorted(
        [NOT_2_4, "the graph writes the weight in place: a packed copy would go stale"])
    lowered, (record,) = run_late_passes(program)
    assert record.stats == {"matmuls_to_linear_24": 1, "semi_structured_kept_dense": 1, "not_2_4": 1}
    assert "writes the weight in place" in record.details[0]["note"]
    (call,) = [n for n in lowered.op_nodes() if n.target is LINEAR_24]
    assert call.args[1].name.endswith("w24") and call.args[2] is not None
    # both scale w_written call after call: each sees the same weights at every call
    ref = program.clone()
    ref.params = {k: v.clone() for k, v in program.params.items()}
    lowered.params = {k: v.clone() for k, v in lowered.params.items()}
    for _ in range(3):
        x = torch.randn(2, 24, 128).bfloat16()
        assert torch.equal(lowered.run_flat(x)[0], ref.run_flat(x)[0])


def test_decode_sized_products_and_chips_without_sparse_cores_stay_dense():
    decode = capture(ThreeWeights(), (torch.randn(MAX_ROWS, 128).bfloat16(),))
    done, skipped = fuse_semi_structured_matmuls(decode.clone(), MAX_ROWS, PROFILES["h100"])
    assert done == 0 and sorted(why for _, why in skipped) == sorted(
        [NOT_2_4, *[f"{MAX_ROWS} rows: at most {MAX_ROWS}, the decode GEMV path (2:4 does not speed up a GEMV)"] * 2])
    prefill = capture(ThreeWeights(), (torch.randn(MAX_ROWS + 1, 128).bfloat16(),))
    assert fuse_semi_structured_matmuls(prefill.clone(), MAX_ROWS, PROFILES["h100"])[0] == 1
    done, skipped = fuse_semi_structured_matmuls(prefill.clone(), MAX_ROWS, PROFILES["cpu"])
    assert done == 0 and any("no 2:4 sparse tensor cores" in why for _, why in skipped)


def test_shapes_and_dtypes_the_libraries_do_not_take_stay_dense():
    class One(torch.nn.Module):
        def __init__(self, n, k, dtype):
            super().__init__()
            self.register_buffer("w", make_2_4(torch.randn(n, k)).to(dtype))

        def forward(self, x):
            return F.linear(x, self.w)

    for n, k, dtype, why in [(40, 128, torch.bfloat16, "multiples"), (64, 128, torch.float32, "fp16/bf16")]:
        program = capture(One(n, k, dtype), (torch.randn(32, k).to(dtype),))
        done, skipped = fuse_semi_structured_matmuls(program, MAX_ROWS, PROFILES["h100"])
        assert done == 0 and why in skipped[0][1]
    program = capture(One(48, 128, torch.float16), (torch.randn(32, 128).half(),))  # cuSPARSELt's multiples only
    assert fuse_semi_structured_matmuls(program, MAX_ROWS, PROFILES["h100"])[0] == 1


def test_the_backend_lists_the_pass_after_the_gemv_rewrites_and_has_the_kernel():
    """Decode-sized linears become GEMVs first; 2:4 takes what is left (the quantized-input fusion after it
    touches only W8A8/FP8 linears)."""
    names = [p.name for p in CudaBackend().late_passes(PROFILES["h100"], None)]
    assert names.index("cuda_semi_structured_matmuls") > names.index("cuda_fuse_small_matmuls")
    assert names.index("cuda_semi_structured_matmuls") > names.index("cuda_fuse_sparse_matmuls")
    assert "flashc.linear_24" in KERNELS and KERNELS["flashc.linear_24"].tune is not None


def test_without_a_gpu_the_kernel_is_the_dense_product():
    x, w, b = torch.randn(32, 128).bfloat16(), make_2_4(torch.randn(64, 128)).bfloat16(), torch.randn(64).bfloat16()
    assert s24.choice(x, w, b) == "dense" and s24.tune_linear_24(x, w, b) == {"impl": "dense"}
    assert torch.equal(s24.linear_24(x, w, b, impl="cutlass"), F.linear(x, w, b))
    with pytest.raises(ValueError, match="impl must be"):
        s24.linear_24(x, w, b, impl="cublas")
    assert s24.fits("cutlass", 64, 128, torch.bfloat16) and not s24.fits("cutlass", 48, 128, torch.bfloat16)
    assert s24.fits("cusparselt", 48, 128, torch.float16) and not s24.fits("cusparselt", 64, 128, torch.float32)


# ---------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------
@pytest.fixture
def own_tuning_cache(tmp_path, monkeypatch):
    from flashc.codegen import tuning

    monkeypatch.setenv("FLASHC_CACHE", str(tmp_path / "flashc_cache"))
    tuning.clear_memory_cache()
    yield tuning
    tuning.clear_memory_cache()


def _impls(n, k):
    return s24.sparse_impls(torch.device("cuda"), n, k, torch.bfloat16)


@needs_gpu
@pytest.mark.parametrize("shape", [(512, 1024, 4096), (100, 4096, 1024), ((2, 96), 1536, 512)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_24_matches_the_dense_product_on_each_library(shape, with_bias):
    rows, n, k = shape
    rows = rows if isinstance(rows, tuple) else (rows,)
    impls = _impls(n, k)
    assert impls, "an sm8x GPU runs CUTLASS's 2:4 GEMM for these shapes, a later one cuSPARSELt's"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(*rows, k, device="cuda", generator=g).bfloat16()
    w = make_2_4(torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(n, device="cuda", generator=g).bfloat16() if with_bias else None
    want = F.linear(x, w, b)
    truth = F.linear(x.double(), w.double(), b.double() if with_bias else None)
    for impl in impls:
        got = s24.linear_24(x, w, b, impl=impl)
        assert got.shape == want.shape and got.dtype == torch.bfloat16 and got.is_contiguous()
        assert s24._PACKED[s24._key(w, impl)].used, f"{impl}: the sparse GEMM ran, not the dense fallback"
        assert rel_err(got, want) < 1e-2, impl
        assert rel_err(got, truth) < 1e-2, impl


@needs_gpu
def test_tuning_measures_every_library_and_the_launch_runs_its_choice(own_tuning_cache):
    tuning = own_tuning_cache
    x = torch.randn(2048, 4096, device="cuda").bfloat16()
    w = make_2_4(torch.randn(4096, 4096, device="cuda") / 64).bfloat16()
    cfg = s24.tune_linear_24(x, w, None)
    assert cfg["impl"] in ("dense", *_impls(4096, 4096))
    (entry,) = [v for k, v in tuning.export_tuning()["entries"].items() if "|linear_24|" in k]
    timings = {t["config"]["impl"]: t["ms"] for t in entry["timings"]}
    assert set(timings) == {"dense", *_impls(4096, 4096)}, timings  # every library passed the check and was tried
    assert timings["dense"] is not None and timings[cfg["impl"]] == min(t for t in timings.values() if t is not None)
    assert s24.choice(x, w, None) == cfg["impl"]
    assert rel_err(s24.linear_24(x, w, None), F.linear(x, w)) < 1e-2
    for impl in _impls(4096, 4096):  # the losers' packings are freed; the winner's is kept
        assert (s24._key(w, impl) in s24._PACKED) == (impl == cfg["impl"])


@needs_gpu
@pytest.mark.parametrize("force_sparse", [False, True])
def test_a_compiled_2_4_prefill_matches_the_pruned_program(own_tuning_cache, monkeypatch, force_sparse):
    """flashc.compile(model, 'h100', prune='2:4') on a bf16 model: the GPU's prefill logits against
    the pruned program run eagerly. force_sparse: tuning off and every linear_24 on a sparse
    library, so the packing before the CUDA graph's capture and the captured sparse GEMMs run."""
    model = zoo.build("llama-tiny", dtype=torch.bfloat16, seed=0)
    ids = zoo.example_inputs("llama-tiny", seq_len=128)
    calibration = torch.randint(0, model.config.vocab_size, (1024,), generator=torch.Generator().manual_seed(0))
    options = {}
    if force_sparse:
        monkeypatch.setattr(s24, "choice", lambda x, w, b: _impls(*w.shape)[0])
        options = {"tune": False}
    cm = flashc.compile(model, "h100", ids, level=3, prune="2:4", calibration=calibration, options=options)
    late = {r.name: r.stats for r in cm.records if r.stage == "backend"}
    assert late["cuda_semi_structured_matmuls"]["matmuls_to_linear_24"] == 4 * model.config.num_hidden_layers
    for seed in range(2):
        fresh = zoo.example_inputs("llama-tiny", seq_len=128, seed=10 + seed)
        want = cm.program.run_flat(*fresh)[0]
        got = cm(*fresh)
        got = (got.logits if hasattr(got, "logits") else got[0] if isinstance(got, (tuple, list)) else got).cpu()
        assert rel_err(got, want) < 3e-2
    if force_sparse:
        assert any(e.used for e in s24._PACKED.values())


def test_tuning_drops_a_library_whose_product_differs_and_keeps_the_winners_packing(monkeypatch, own_tuning_cache):
    """The tuner's bookkeeping, on the CPU with the libraries stood in for: "cutlass" packs the
    weight as it is (its product is the dense one), "cusparselt" packs it wrongly (doubled): the
    wrong one is dropped with a warning before any timing, the faster survivor is cached and
    run, its packing reused until the weight is written in place, the loser's freed."""
    tuning = own_tuning_cache
    monkeypatch.setattr(s24, "_eligible", lambda x, w, b: True)
    monkeypatch.setattr(s24, "sparse_impls", lambda device, n, k, dtype: ["cutlass", "cusparselt"])
    monkeypatch.setattr(s24, "_pack", lambda w, impl: w.clone() if impl == "cutlass" else 2 * w)
    times = iter([2.0, 1.0])  # dense, then cutlass: the only candidates timed
    monkeypatch.setattr(tuning, "_can_time_on_gpu", lambda: True)
    monkeypatch.setattr(tuning, "_default_bench", lambda fn: (fn(), next(times))[1])
    x, w = torch.randn(2, 24, 128).bfloat16(), make_2_4(torch.randn(64, 128)).bfloat16()
    with pytest.warns(UserWarning, match=r"cusparselt is not used .* relative difference"):
        assert s24.tune_linear_24(x, w, None) == {"impl": "cutlass"}
    assert s24.choice(x, w, None) == "cutlass" and s24._key(w, "cusparselt") not in s24._PACKED
    assert torch.equal(s24.linear_24(x, w, None), F.linear(x, w))
    entry = s24._PACKED[s24._key(w, "cutlass")]
    assert entry.used and s24.packed_weight(w, "cutlass") is entry.sparse  # packed once, reused
    w.mul_(0.5)  # an in-place write: the packing is stale and is redone
    assert torch.equal(s24.packed_weight(w, "cutlass"), w) and s24._PACKED[s24._key(w, "cutlass")] is not entry
    dense = torch.randn(64, 128).bfloat16()  # no 2:4 pattern: never packed, runs dense
    with pytest.warns(UserWarning, match="more than 2 nonzeros"):
        assert torch.equal(s24.linear_24(x, dense, None, impl="cutlass"), F.linear(x, dense))
    key = s24._key(w, "cutlass")
    del w, entry
    import gc

    gc.collect()
    assert key not in s24._PACKED  # the packing lives as long as its dense weight

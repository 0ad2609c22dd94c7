"""The CUDA backend's sparse late pass (backends/cuda_rewrites.py: FuseSparseMatmuls), checked on the CPU:
an online-pruned decode step's linear(sparsify(x, t), w, b) become flashc.sparse_gemv on a stored transposed
weight (a quantized one's linear_wq(sparsify(x, t), ...) flashc.sparse_gemv_wq on its codes K-major), and the
rewritten graph (the ops' references run here) computes what the pruned graph computed."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from flashc_testing import rel_err

import flashc
from flashc.backends.cuda import CudaBackend
from flashc.backends.cuda_rewrites import (LINEAR_WQ, SPARSE_GEMV, SPARSE_GEMV_WQ, SPARSIFY, FuseSparseMatmuls,
                                           fuse_sparse_matmuls, fuse_sparse_quantized_matmuls)
from flashc.capture import capture
from flashc.codegen.triton_gemv import MAX_ROWS
from flashc.decode import DecodeStep, decode_example_inputs, empty_kv_cache
from flashc.ir import op_name
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.prune import PruneConfig
from flashc.profiles import PROFILES

LINEAR = torch.ops.aten.linear.default
# a calibration budget that keeps the compile to seconds (tests/passes/test_prune_activations.py)
PRUNE = replace(PruneConfig.parse("online-40%"), min_calibration_tokens=256, calibration_tokens=512,
                sample_rows=256, allocation_step=0.05)


@pytest.fixture(scope="module")
def pruned_decode(tiny_models):
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 2, 16), level=3, prune=PRUNE,
                        calibration=torch.randint(0, model.config.vocab_size, (1024,),
                                                  generator=torch.Generator().manual_seed(0)))
    return model, cm.program


def run_late_passes(program, *passes):
    lowered = program.clone()
    records = PassManager(list(passes), numeric_check=True).run(lowered, PassContext(PROFILES["h100"]))
    return lowered, records


def decode_outputs(model, program, steps=4, seed=0):
    """Logits of `steps` decode steps from a fresh cache, on fresh random tokens; and the final cache."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (2, steps), generator=g)
    cache = empty_kv_cache(model, 2, 16)
    logits = []
    for t in range(steps):
        out = program.run_flat(tokens[:, t:t + 1], torch.tensor([t]), *cache)
        logits.append(out[0])
    return torch.stack(logits), cache


def sparsified_linears(program):
    return [n for n in program.op_nodes() if n.target is LINEAR and n.args[0].target is SPARSIFY]


def test_pruned_decode_linears_become_sparse_gemv_and_keep_the_numbers(pruned_decode):
    model, program = pruned_decode
    linears = sparsified_linears(program)
    assert len(linears) == 4 * model.config.num_hidden_layers  # qkv, o, gate|up, down per layer
    lowered, (record,) = run_late_passes(program, FuseSparseMatmuls(MAX_ROWS))
    assert record.stats["matmuls_to_sparse_gemv"] == len(linears) and record.stats["sparse_kept_dense"] == 0
    copied = sum(program.params[linear.args[1].name].numel() * 4 for linear in linears) / 2**20  # fp32, each once
    assert record.stats["transposed_weight_mib"] == round(copied, 1)
    assert "stored transposed for the sparse GEMVs" in record.details[-1]["note"]
    calls = [n for n in lowered.op_nodes() if n.target is SPARSE_GEMV]
    ops = [op_name(n) for n in lowered.op_nodes()]
    assert len(calls) == len(linears) and "flashc.sparsify" not in ops
    assert ops.count("aten.linear") == 1  # the lm_head, left dense by the pruning pass
    for call, linear in zip(calls, linears):
        w = program.params[linear.args[1].name]
        w_t = lowered.params[call.args[2].name]
        assert torch.equal(w_t, w.t()) and w_t.is_contiguous()  # stored transposed, not a view
        assert linear.args[1].name not in lowered.params  # nothing else read it: no second copy
        assert call.args[0] is not None and call.args[1].name == linear.args[0].args[1].name
    assert all(n in program.params for n in (linear.args[1].name for linear in linears))  # the portable program
    want, cache_want = decode_outputs(model, program)
    got, cache_got = decode_outputs(model, lowered)
    assert rel_err(got, want) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(cache_got, cache_want))
    dense_model, _ = decode_outputs(model, flashc.compile(DecodeStep(model, 16), "cpu",
                                                          decode_example_inputs(model, 2, 16), level=3).program)
    assert rel_err(got, dense_model) > 1e-3  # the sparsity is real: the comparison can fail


def test_the_backends_late_passes_run_sparse_first_and_the_rest_become_gemv(pruned_decode):
    """In the CUDA backend's order: the sparsified linears are sparse_gemv, the lm_head a dense gemv."""
    model, program = pruned_decode
    passes = CudaBackend().late_passes(PROFILES["h100"], None)
    assert [p.name for p in passes] == ["cuda_fuse_kv_writes", "cuda_fuse_state_writes", "cuda_fuse_sparse_matmuls",
                                        "cuda_fuse_small_matmuls",
                                        "cuda_semi_structured_matmuls", "cuda_fuse_quantized_inputs"]
    lowered, records = run_late_passes(program, *passes)
    stats = {r.name: r.stats for r in records}
    assert stats["cuda_fuse_sparse_matmuls"]["matmuls_to_sparse_gemv"] == 4 * model.config.num_hidden_layers
    assert stats["cuda_fuse_small_matmuls"]["matmuls_to_gemv"] == 1
    ops = [op_name(n) for n in lowered.op_nodes()]
    assert "aten.linear" not in ops and ops.count("flashc.gemv") == 1
    # what the dense gemv folds in, the sparse ones take too: one launch a matmul, no norm, activation or add left
    assert not {"flashc.rms_norm", "flashc.add_rms_norm", "flashc.swiglu", "aten.add"} & set(ops)
    folded = [(n.args[4] is not None, n.args[6] is not None, n.args[7]) for n in lowered.op_nodes()
              if n.target is SPARSE_GEMV]
    assert folded == [(True, False, None), (False, True, None), (True, False, "silu"),
                      (False, True, None)] * model.config.num_hidden_layers  # qkv, o, gate|up, down
    want, _ = decode_outputs(model, program, seed=1)
    got, _ = decode_outputs(model, lowered, seed=1)
    assert rel_err(got, want) < 1e-5


class WritesItsWeight(torch.nn.Module):
    """linear(sparsify(x)) whose weight buffer the forward then scales in place; a second, plain one."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(12, 16))
        self.register_buffer("w2", torch.randn(12, 16))
        self.register_buffer("t", torch.tensor(0.5))

    def forward(self, x):
        y = F.linear(torch.ops.flashc.sparsify(x, self.t), self.w)
        self.w.mul_(0.5)
        return y + F.linear(torch.ops.flashc.sparsify(x, self.t), self.w2)


def test_a_weight_written_in_place_is_not_rewritten():
    program = capture(WritesItsWeight(), (torch.randn(2, 16),))
    assert len(sparsified_linears(program)) == 2
    lowered, (record,) = run_late_passes(program, FuseSparseMatmuls(MAX_ROWS))
    assert record.stats == {"matmuls_to_sparse_gemv": 1, "sparse_kept_dense": 1,
                            "transposed_weight_mib": round(12 * 16 * 4 / 2**20, 1)}
    assert "writes the weight in place" in record.details[0]["note"]
    kept = sparsified_linears(lowered)
    assert len(kept) == 1 and kept[0].args[1].name.endswith("w")
    # the rewritten program still scales w each call: both see the same weights call after call
    x = torch.randn(2, 16)
    ref_program = program.clone()
    ref_program.params = {k: v.clone() for k, v in program.params.items()}
    lowered.params = {k: v.clone() for k, v in lowered.params.items()}
    for _ in range(3):
        assert rel_err(lowered.run_flat(x)[0], ref_program.run_flat(x)[0]) < 1e-6


class SharedWeight(torch.nn.Module):
    """One weight read by a sparsified linear and by a dense one."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(12, 16))
        self.register_buffer("t", torch.tensor(0.5))

    def forward(self, x):
        return F.linear(torch.ops.flashc.sparsify(x, self.t), self.w) + F.linear(x, self.w)


def test_a_weight_other_ops_read_is_kept_next_to_its_transposed_copy():
    program = capture(SharedWeight(), (torch.randn(3, 16),))
    lowered, (record,) = run_late_passes(program, FuseSparseMatmuls(MAX_ROWS))
    assert record.stats["matmuls_to_sparse_gemv"] == 1
    (call,) = [n for n in lowered.op_nodes() if n.target is SPARSE_GEMV]
    (w_name,) = [n for n in program.params if program.params[n].shape == (12, 16)]
    assert w_name in lowered.params and torch.equal(lowered.params[call.args[2].name], program.params[w_name].t())
    x = torch.randn(3, 16)
    assert rel_err(lowered.run_flat(x)[0], program.run_flat(x)[0]) < 1e-6


def test_too_many_rows_and_non_finite_weights_stay_dense():
    program = capture(SharedWeight(), (torch.randn(MAX_ROWS + 1, 16),))
    copy = program.clone()
    assert fuse_sparse_matmuls(copy, MAX_ROWS)[0] == 0  # a prefill's rows: cuBLAS reads the weight once anyway
    small = capture(SharedWeight(), (torch.randn(2, 16),))
    (w_name,) = [n for n in small.params if small.params[n].shape == (12, 16)]
    small.params[w_name] = small.params[w_name].clone()
    small.params[w_name][3, 5] = float("inf")
    done, skipped = fuse_sparse_matmuls(small, MAX_ROWS)
    assert done == 0 and "inf or nan" in skipped[0][1]


def test_compiling_for_the_gpu_reports_the_sparse_pass(tiny_models):
    """Compiling for h100 here (no GPU: the executable refuses to run) runs the sparse late pass; the
    artifact's portable program keeps sparsify + linear."""
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "h100", decode_example_inputs(model, 1, 16), level=3, prune=PRUNE,
                        calibration=torch.randint(0, model.config.vocab_size, (1024,)))
    late = {r.name: r for r in cm.records if r.stage == "backend"}
    assert late["cuda_fuse_sparse_matmuls"].stats["matmuls_to_sparse_gemv"] == 4 * model.config.num_hidden_layers
    ops = {op_name(n) for n in cm.program.op_nodes()}
    assert "flashc.sparsify" in ops and "flashc.sparse_gemv" not in ops


# ------------------------------------------------------------------ quantized: linear_wq(sparsify(x, t), ...)
def sparsified_quantized(program):
    return [n for n in program.op_nodes() if n.target is LINEAR_WQ and n.args[0].target is SPARSIFY]


class QuantizedLayers(torch.nn.Module):
    """Two int4 layers (one asymmetric with an AWQ input scale and a bias, one symmetric) reading sparsified inputs;
    `write` scales the first layer's input in place between its sparsify and its linear, `shared` reads the
    second layer's sparsified value in another op too."""

    def __init__(self, write=False, shared=False):
        super().__init__()
        from flashc.quantized_ops import pack_codes, pack_zero_points

        self.write, self.shared = write, shared
        self.register_buffer("q1", pack_codes(torch.randint(0, 16, (32, 64), dtype=torch.uint8), 4, 32))
        self.register_buffer("s1", torch.rand(32, 2) / 40 + 0.01)
        self.register_buffer("z1", pack_zero_points(torch.randint(0, 16, (32, 2), dtype=torch.uint8), 4))
        self.register_buffer("b1", torch.randn(32))
        self.register_buffer("a1", torch.rand(64) + 0.5)
        self.register_buffer("q2", pack_codes(torch.randint(0, 16, (16, 32), dtype=torch.uint8), 4, 32))
        self.register_buffer("s2", torch.rand(16, 1) / 20 + 0.01)
        self.register_buffer("t1", torch.tensor(0.6))
        self.register_buffer("t2", torch.rand(32) * 0.5)

    def forward(self, x):
        h = x * 1.0
        s = torch.ops.flashc.sparsify(h, self.t1)
        if self.write:
            h.mul_(2.0)
        y = torch.ops.flashc.linear_wq(s, self.q1, self.s1, self.z1, self.b1, self.a1, 4)
        s2 = torch.ops.flashc.sparsify(y, self.t2)
        out = torch.ops.flashc.linear_wq(s2, self.q2, self.s2, None, None, None, 4)
        return out + s2.sum() if self.shared else out


def test_quantized_sparsified_linears_become_sparse_gemv_wq_on_codes_converted_once():
    """Both layers -> flashc.sparse_gemv_wq on K-major copies (to_kmajor's, the same codes), made once at compile
    time; the packed originals and the sparsify nodes go; the numbers are the quantized graph's, bit for bit."""
    from flashc.sparse_ops import to_kmajor

    program = capture(QuantizedLayers(), (torch.randn(2, 64),))
    assert len(sparsified_quantized(program)) == 2
    lowered, (record,) = run_late_passes(program, FuseSparseMatmuls(MAX_ROWS))
    assert record.stats["quantized_to_sparse_gemv_wq"] == 2 and record.stats["matmuls_to_sparse_gemv"] == 0
    ops = [op_name(n) for n in lowered.op_nodes()]
    assert ops.count("flashc.sparse_gemv_wq") == 2 and "flashc.linear_wq" not in ops and "flashc.sparsify" not in ops
    first, second = [n for n in lowered.op_nodes() if n.target is SPARSE_GEMV_WQ]
    (linear1, linear2) = sparsified_quantized(program)
    want = to_kmajor(*(program.params[a.name] for a in linear1.args[1:4]), 4)
    got = [lowered.params[a.name] for a in (first.args[2], first.args[8], first.args[9])]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert second.args[9] is None and second.args[10] is None  # symmetric, no input scale
    assert first.args[10].name == linear1.args[5].name and first.args[3].name == linear1.args[4].name
    assert not {a.name for a in linear1.args[1:4]} & set(lowered.params)  # nothing else read them
    x = torch.randn(2, 64)
    assert torch.equal(lowered.run_flat(x)[0], program.run_flat(x)[0])


def test_a_write_between_the_sparsify_and_the_linear_keeps_the_linear_and_a_shared_sparsify_stays():
    """The input scaled in place after the sparsify read it: the fused op would read the new values, so that
    layer stays linear_wq(sparsify); the second layer's sparsified value is also summed: its sparsify stays beside
    the new op, which reads the unsparsified input."""
    program = capture(QuantizedLayers(write=True, shared=True), (torch.randn(2, 64),))
    assert any(n.target is torch.ops.aten.mul_.Tensor for n in program.op_nodes())
    lowered, (record,) = run_late_passes(program, FuseSparseMatmuls(MAX_ROWS))
    assert record.stats["quantized_to_sparse_gemv_wq"] == 1 and record.stats["sparse_kept_dense"] == 1
    assert "written between the sparsify and the linear" in record.details[0]["note"]
    assert len(sparsified_quantized(lowered)) == 1  # the first layer, as it was
    (call,) = [n for n in lowered.op_nodes() if n.target is SPARSE_GEMV_WQ]
    assert op_name(call.args[0]) != "flashc.sparsify" and call.args[1].name.endswith("t2")
    assert sum(n.target is SPARSIFY for n in lowered.op_nodes()) == 2
    x = torch.randn(2, 64)
    assert torch.equal(lowered.run_flat(x.clone())[0], program.run_flat(x.clone())[0])


def test_layouts_the_kernel_cannot_hold_stay_linear_wq():
    """3-bit codes, and outputs that do not fill whole words along N (20 int4 codes), are left as they are,
    with the reason; a decode-sized program only (a prefill's rows stay for cuBLAS)."""
    from flashc.quantized_ops import pack_codes

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("q3", pack_codes(torch.randint(0, 8, (16, 64), dtype=torch.uint8), 3, 32))
            self.register_buffer("q4", pack_codes(torch.randint(0, 16, (20, 64), dtype=torch.uint8), 4, 32))
            self.register_buffer("s3", torch.rand(16, 2))
            self.register_buffer("s4", torch.rand(20, 2))
            self.register_buffer("t", torch.tensor(0.5))

        def forward(self, x):
            s = torch.ops.flashc.sparsify(x, self.t)
            return (torch.ops.flashc.linear_wq(s, self.q3, self.s3, None, None, None, 3).sum()
                    + torch.ops.flashc.linear_wq(s, self.q4, self.s4, None, None, None, 4).sum())

    program = capture(Odd(), (torch.randn(2, 64),))
    done, skipped = fuse_sparse_quantized_matmuls(program.clone(), MAX_ROWS)
    assert done == 0 and len(skipped) == 2 and all("whole 32-bit words" in why for _, why in skipped)
    prefill = capture(QuantizedLayers(), (torch.randn(MAX_ROWS + 1, 64),))
    done, skipped = fuse_sparse_quantized_matmuls(prefill, MAX_ROWS)
    assert done == 0 and all("more than 16" in why for _, why in skipped)


@pytest.fixture(scope="module")
def pruned_quantized_for_gpu(tiny_models):
    """llama-tiny's decode step with online-40% and int4-rtn, compiled for the h100 target (here, without a
    GPU: the executable refuses to run; the portable program and the late passes' records are what is checked)."""
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "h100", decode_example_inputs(model, 2, 16), level=3, prune=PRUNE,
                        quantize="int4-rtn", calibration=torch.randint(0, model.config.vocab_size, (1024,),
                                                                       generator=torch.Generator().manual_seed(0)))
    return model, cm


def test_a_model_compiled_with_online_sparsity_and_int4_for_the_gpu_runs_sparse_gemv_wq(pruned_quantized_for_gpu):
    """prune="online-40%" with quantize="int4-rtn", for h100: every pruned linear_wq becomes a sparse_gemv_wq (the
    CUDA lowering table has it: no fallback), norms, SwiGLU and residual adds fold in as into sparse_gemv, and the
    lowered graph computes what the portable one (kept in the artifact, linear_wq(sparsify)) computes."""
    model, cm = pruned_quantized_for_gpu
    layers = model.config.num_hidden_layers
    late = {r.name: r for r in cm.records if r.stage == "backend"}
    assert late["cuda_fuse_sparse_matmuls"].stats["quantized_to_sparse_gemv_wq"] == 4 * layers
    assert "flashc.sparse_gemv_wq" not in {f.op for f in cm.fallbacks}
    portable = {op_name(n) for n in cm.program.op_nodes()}
    assert {"flashc.sparsify", "flashc.linear_wq"} <= portable and "flashc.sparse_gemv_wq" not in portable
    lowered, records = run_late_passes(cm.program, *CudaBackend().late_passes(PROFILES["h100"], None))
    ops = [op_name(n) for n in lowered.op_nodes()]
    assert ops.count("flashc.sparse_gemv_wq") == 4 * layers and "flashc.linear_wq" not in ops
    assert not {"flashc.rms_norm", "flashc.add_rms_norm", "flashc.swiglu", "flashc.sparsify", "aten.add"} & set(ops)
    folded = [(n.args[4] is not None, n.args[6] is not None, n.args[7]) for n in lowered.op_nodes()
              if n.target is SPARSE_GEMV_WQ]
    assert folded == [(True, False, None), (False, True, None), (True, False, "silu"), (False, True, None)] * layers
    want, cache_want = decode_outputs(model, cm.program, seed=2)
    got, cache_got = decode_outputs(model, lowered, seed=2)
    assert rel_err(got, want) < 1e-5 and all(rel_err(a, b) < 1e-5 for a, b in zip(cache_got, cache_want))

"""The CUDA backend's late passes, checked on the CPU: the ops they write run their
reference implementations, against the graph before the passes and the codegen references."""

import torch
import pytest
from flashc_testing import FAMILIES, rel_err

import flashc
from flashc.backends.cuda_rewrites import GEMV, FuseKvWrites, FuseSmallMatmuls
from flashc.codegen.triton_gemv import MAX_ROWS, reference_gemv
from flashc.codegen.triton_rotary import reference_rotary, reference_rotary_kv_write
from flashc.decode import DecodeStep, decode_example_inputs, empty_kv_cache
from flashc.ir import op_name
from flashc.pass_manager import PassContext, PassManager
from flashc.profiles import PROFILES


def run_late_pass(program, late_pass):
    """The program after one late pass, run and verified by the PassManager (with its numeric check)."""
    lowered = program.clone()
    records = PassManager([late_pass], numeric_check=True).run(lowered, PassContext(PROFILES["h100"]))
    return lowered, records[0]


def test_kv_writes_fold_into_one_call_and_keep_the_numbers(tiny_models):
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 2, 16), level=3)
    lowered, record = run_late_pass(cm.program, FuseKvWrites())
    assert record.stats["kv_writes_fused"] == model.config.num_hidden_layers
    ops = [op_name(n) for n in lowered.graph.nodes if n.op == "call_function"]
    assert "aten.index_copy_" not in ops and "flashc.rotary" not in ops  # queries rotate in the same launch
    assert ops.count("flashc.rotary_qkv_write") == model.config.num_hidden_layers
    fused = lowered.graph_module
    weights = [cm.program.params[n.name] for n in cm.program.param_nodes()]
    tokens = torch.randint(0, model.config.vocab_size, (2, 5))
    kv_ref, kv_new = empty_kv_cache(model, 2, 16), empty_kv_cache(model, 2, 16)
    for t in range(5):
        args = (tokens[:, t:t + 1], torch.tensor([t]))
        ref = cm(*args, *kv_ref)
        got = fused(*weights, *args, *kv_new)
        got = got[0] if isinstance(got, (tuple, list)) else got
        assert rel_err(got, ref.logits if hasattr(ref, "logits") else ref) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(kv_new, kv_ref))


def test_the_kv_write_ops_match_the_kernel_references():
    """flashc.rotary_(q)kv_write's reference against codegen's reference of the kernel, fresh inputs."""
    b, h, s, d, length = 2, 3, 2, 8, 10
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64) for _ in range(3))
    cos, sin = torch.randn(b, s, d, dtype=torch.float64), torch.randn(b, s, d, dtype=torch.float64)
    pos = torch.tensor([4, 7])
    caches = [torch.randn(b, h, length, d, dtype=torch.float64) for _ in range(2)]
    caches += [c.clone() for c in caches]
    got_q = torch.ops.flashc.rotary_qkv_write(q, k, v, cos, sin, caches[0], caches[1], pos)
    reference_rotary_kv_write(k, v, cos, sin, caches[2], caches[3], pos)
    assert torch.allclose(got_q, reference_rotary(q, cos, sin), atol=1e-12)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    torch.ops.flashc.rotary_kv_write(k, v, cos, sin, caches[0], caches[1], pos + 1)
    reference_rotary_kv_write(k, v, cos, sin, caches[2], caches[3], pos + 1)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("glu", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("norm", [False, True])
def test_the_gemv_op_matches_the_kernel_reference(glu, norm):
    # float32: flashc.rms_norm normalises in fp32 (as the kernels do), whatever the input dtype
    x = torch.randn(3, 16)
    w = torch.randn(24, 16)
    bias = torch.randn(24)
    g = torch.randn(16) if norm else None
    residual = torch.randn(3, 24) if glu is None else None
    got = torch.ops.flashc.gemv(x, w, bias, g, 1e-6, residual, glu)
    assert rel_err(got, reference_gemv(x, w, bias, g, 1e-6, residual, glu)) < 1e-6


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_matmuls_fold_their_norms_activations_and_residuals(tiny_models, name):
    model = tiny_models[name]
    layers = model.config.num_hidden_layers
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 2, 16), level=3)
    before = [op_name(n) for n in cm.program.graph.nodes if n.op == "call_function"]
    lowered, record = run_late_pass(cm.program, FuseSmallMatmuls(MAX_ROWS))
    assert record.stats["matmuls_to_gemv"] == before.count("aten.linear") > 0
    calls = [n for n in lowered.graph.nodes if n.op == "call_function"]
    ops = [op_name(n) for n in calls]
    gemvs = [n for n in calls if n.target is GEMV]
    assert "aten.linear" not in ops
    if name != "mixtral-tiny":  # dense MLP: every norm, activation and residual add folds away
        assert not {"flashc.rms_norm", "flashc.add_rms_norm", "flashc.swiglu", "flashc.geglu"} & set(ops)
        assert sum(n.args[6] is not None for n in gemvs) == layers  # one merged gate|up per layer
        assert sum(n.args[5] is not None for n in gemvs) == 2 * layers  # o_proj and down_proj
    else:  # the router and the experts share the normed input: a norm stays for the experts
        assert ops.count("flashc.rms_norm") == layers
    weights = [cm.program.params[n.name] for n in cm.program.param_nodes()]
    plain, fused = cm.program.graph_module, lowered.graph_module
    tokens = torch.randint(0, model.config.vocab_size, (2, 5))
    kv_ref, kv_new = empty_kv_cache(model, 2, 16), empty_kv_cache(model, 2, 16)
    for t in range(5):
        args = (tokens[:, t:t + 1], torch.tensor([t]))
        ref, got = plain(*weights, *args, *kv_ref), fused(*weights, *args, *kv_new)
        ref, got = (r[0] if isinstance(r, (tuple, list)) else r for r in (ref, got))
        assert rel_err(got, ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(kv_new, kv_ref))


def test_compile_runs_the_late_passes_and_reports_them_as_backend_passes(tiny_models):
    """Compiling for h100 (here, without a GPU: the executable refuses to run) runs the CUDA
    late passes in the PassManager; the report lists them as the backend's; the artifact keeps
    the portable program (no flashc.gemv), which other targets still export."""
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "h100", decode_example_inputs(model, 1, 16), level=3)
    late = [r for r in cm.records if r.stage == "backend"]
    assert [r.name for r in late] == ["cuda_fuse_kv_writes", "cuda_fuse_state_writes", "cuda_fuse_sparse_matmuls",
                                      "cuda_fuse_small_matmuls", "cuda_semi_structured_matmuls",
                                      "cuda_fuse_quantized_inputs"]
    assert late[0].stats["kv_writes_fused"] == model.config.num_hidden_layers
    assert late[1].stats["state_writes_fused"] == 0  # no state-space layer in this model
    assert late[2].stats["matmuls_to_sparse_gemv"] == 0  # nothing sparsified in this model
    assert late[3].stats["matmuls_to_gemv"] > 0
    assert all(r.stage == "pipeline" for r in cm.records[:-len(late)])
    assert "flashc.gemv" not in {op_name(n) for n in cm.program.op_nodes()}
    assert "cuda_fuse_small_matmuls" in cm.report().render()


@pytest.mark.parametrize("scheme", ["int4-rtn", "int8-weight"])
def test_quantized_decode_matmuls_become_gemv_wq_with_the_same_folds(tiny_models, scheme):
    """A weight-only quantized decode step: every flashc.linear_wq becomes flashc.gemv_wq and
    the norms, activations and residual adds fold into it as into flashc.gemv; the rewritten
    graph computes what the quantized graph computed."""
    model = tiny_models["llama-tiny"]
    layers = model.config.num_hidden_layers
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 2, 16), level=3,
                        quantize=scheme)
    before = [op_name(n) for n in cm.program.graph.nodes if n.op == "call_function"]
    assert before.count("flashc.linear_wq") >= 4 * layers
    lowered, record = run_late_pass(cm.program, FuseSmallMatmuls(MAX_ROWS))
    assert record.stats["matmuls_to_gemv"] == before.count("aten.linear") + before.count("flashc.linear_wq")
    calls = [n for n in lowered.graph.nodes if n.op == "call_function"]
    ops = [op_name(n) for n in calls]
    quantized = [n for n in calls if op_name(n) == "flashc.gemv_wq"]
    assert "flashc.linear_wq" not in ops and len(quantized) == before.count("flashc.linear_wq")
    assert not {"flashc.rms_norm", "flashc.add_rms_norm", "flashc.swiglu"} & set(ops)
    assert sum(n.args[6] is not None for n in quantized) == layers  # merged gate|up, SwiGLU folded
    assert sum(n.args[5] is not None for n in quantized) == 2 * layers  # o_proj and down_proj
    weights = [cm.program.params[n.name] for n in cm.program.param_nodes()]
    plain, fused = cm.program.graph_module, lowered.graph_module
    tokens = torch.randint(0, model.config.vocab_size, (2, 5))
    kv_ref, kv_new = empty_kv_cache(model, 2, 16), empty_kv_cache(model, 2, 16)
    for t in range(5):
        args = (tokens[:, t:t + 1], torch.tensor([t]))
        ref, got = plain(*weights, *args, *kv_ref), fused(*weights, *args, *kv_new)
        ref, got = (r[0] if isinstance(r, (tuple, list)) else r for r in (ref, got))
        assert rel_err(got, ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(kv_new, kv_ref))


@pytest.mark.parametrize("glu", [None, "silu"])
@pytest.mark.parametrize("norm", [False, True])
def test_the_gemv_wq_op_is_linear_wq_with_the_folds(glu, norm):
    from flashc.quantized_ops import pack_codes

    n, k, group = 24, 64, 32
    x = torch.randn(3, k)
    qweight = pack_codes(torch.randint(0, 16, (n, k), dtype=torch.uint8), 4, group)
    scales, input_scale = torch.rand(n, k // group) + 0.1, torch.rand(k) + 0.5
    bias = torch.randn(n)
    g = torch.randn(k) if norm else None
    residual = torch.randn(3, n) if glu is None else None
    got = torch.ops.flashc.gemv_wq(x, qweight, bias, g, 1e-6, residual, glu, scales, None, input_scale, 4)
    h = x if g is None else torch.ops.flashc.rms_norm(x, g, 1e-6)
    want = torch.ops.flashc.linear_wq(h, qweight, scales, None, bias, input_scale, 4)
    if glu:
        want = torch.ops.flashc.swiglu(*want.chunk(2, dim=-1))
    if residual is not None:
        want = want + residual
    assert rel_err(got, want) < 1e-6


def test_a_quantized_model_compiles_for_the_gpu_and_keeps_linear_wq_in_the_artifact(tiny_models):
    """The CUDA lowering table has rows for the quantized ops (here, without a GPU, it records
    them); the portable program keeps flashc.linear_wq, the late pass writes flashc.gemv_wq."""
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "h100", decode_example_inputs(model, 1, 16), level=3,
                        quantize="int4-rtn")
    late = {r.name: r for r in cm.records if r.stage == "backend"}
    assert late["cuda_fuse_small_matmuls"].stats["matmuls_to_gemv"] > 0
    ops = {op_name(n) for n in cm.program.op_nodes()}
    assert "flashc.linear_wq" in ops and "flashc.gemv_wq" not in ops


def test_quantized_experts_lower_for_the_gpu(tiny_models):
    """flashc.moe_wq has a row in the CUDA lowering table (codegen/triton_moe_wq): a quantized
    Mixtral compiles for the GPU target instead of being refused."""
    model = tiny_models["mixtral-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "h100", decode_example_inputs(model, 1, 16), level=3,
                        quantize="int4-rtn")
    assert {"flashc.moe_wq", "flashc.linear_wq"} <= {op_name(n) for n in cm.program.op_nodes()}

"""The CUDA backend's graph rewrites, checked on the CPU with reference launchers."""

import copy

import torch
import pytest
import torch.fx as fx
from flashc_testing import FAMILIES, rel_err

import flashc
from flashc.backends.cuda_rewrites import fuse_kv_writes, fuse_small_matmuls
from flashc.codegen.triton_gemv import MAX_ROWS, reference_gemv
from flashc.codegen.triton_rotary import reference_rotary, reference_rotary_kv_write
from flashc.decode import DecodeStep, decode_example_inputs, empty_kv_cache
from flashc.ir import op_name


def reference_write(q, k, v, cos, sin, k_cache, v_cache, positions):
    reference_rotary_kv_write(k, v, cos, sin, k_cache, v_cache, positions)
    return (None if q is None else reference_rotary(q, cos, sin)), k_cache, v_cache


def test_kv_writes_fold_into_one_call_and_keep_the_numbers(tiny_models):
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 2, 16), level=3)
    graph = copy.deepcopy(cm.program.graph)
    assert fuse_kv_writes(graph, reference_write) == model.config.num_hidden_layers
    ops = [op_name(n) for n in graph.nodes if n.op == "call_function"]
    assert "aten.index_copy_" not in ops and "flashc.rotary" not in ops  # queries rotate in the same launch
    fused = fx.GraphModule(torch.nn.Module(), graph)
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


def reference_gemv_call(x, w, bias, norm_weight, eps, residual, glu):
    return reference_gemv(x, w, bias, norm_weight, eps, residual, glu)


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_matmuls_fold_their_norms_activations_and_residuals(tiny_models, name):
    model = tiny_models[name]
    layers = model.config.num_hidden_layers
    cm = flashc.compile(DecodeStep(model, 16), "h100", decode_example_inputs(model, 2, 16), level=3)
    before = [op_name(n) for n in cm.program.graph.nodes if n.op == "call_function"]
    graph = copy.deepcopy(cm.program.graph)
    assert fuse_small_matmuls(graph, reference_gemv_call, MAX_ROWS) == before.count("aten.linear") > 0
    calls = [n for n in graph.nodes if n.op == "call_function"]
    ops = [op_name(n) for n in calls]
    gemvs = [n for n in calls if n.target is reference_gemv_call]
    assert "aten.linear" not in ops
    if name != "mixtral-tiny":  # dense MLP: every norm, activation and residual add folds away
        assert not {"flashc.rms_norm", "flashc.add_rms_norm", "flashc.swiglu", "flashc.geglu"} & set(ops)
        assert sum(n.args[6] is not None for n in gemvs) == layers  # one merged gate|up per layer
        assert sum(n.args[5] is not None for n in gemvs) == 2 * layers  # o_proj and down_proj
    else:  # the router and the experts share the normed input: a norm stays for the experts
        assert ops.count("flashc.rms_norm") == layers
    weights = [cm.program.params[n.name] for n in cm.program.param_nodes()]
    plain = fx.GraphModule(torch.nn.Module(), copy.deepcopy(cm.program.graph))
    fused = fx.GraphModule(torch.nn.Module(), graph)
    tokens = torch.randint(0, model.config.vocab_size, (2, 5))
    kv_ref, kv_new = empty_kv_cache(model, 2, 16), empty_kv_cache(model, 2, 16)
    for t in range(5):
        args = (tokens[:, t:t + 1], torch.tensor([t]))
        ref, got = plain(*weights, *args, *kv_ref), fused(*weights, *args, *kv_new)
        ref, got = (r[0] if isinstance(r, (tuple, list)) else r for r in (ref, got))
        assert rel_err(got, ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(kv_new, kv_ref))

"""The CUDA backend's graph rewrites, checked on the CPU with reference launchers."""

import copy

import torch
import torch.fx as fx
from flashc_testing import rel_err

import flashc
from flashc.backends.cuda import fuse_kv_writes
from flashc.codegen.triton_rotary import reference_rotary_kv_write
from flashc.decode import DecodeStep, decode_example_inputs, empty_kv_cache
from flashc.ir import op_name


def reference_write(k, v, cos, sin, k_cache, v_cache, positions):
    reference_rotary_kv_write(k, v, cos, sin, k_cache, v_cache, positions)
    return k_cache, v_cache


def test_kv_writes_fold_into_one_call_and_keep_the_numbers(tiny_models):
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 2, 16), level=3)
    graph = copy.deepcopy(cm.program.graph)
    assert fuse_kv_writes(graph, reference_write) == model.config.num_hidden_layers
    ops = [op_name(n) for n in graph.nodes if n.op == "call_function"]
    assert "aten.index_copy_" not in ops and ops.count("flashc.rotary") == model.config.num_hidden_layers  # q only
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

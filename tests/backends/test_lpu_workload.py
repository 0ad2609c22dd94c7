"""lpu backend, workload: the per-token ops of an optimized Program; a few captured layers
repeated equal the whole model captured; a decode step's cache writes move what they write."""

from __future__ import annotations

import pytest
import torch

from flashc import zoo
from flashc.backends.lpu.workload import CAPTURE_TOKENS, capture_workload, extract_workload, repeat_layers
from flashc.capture import capture
from flashc.errors import FlashcError
from flashc.pass_manager import PassContext, PassManager
from flashc.pipelines import pipeline
from flashc.profiles import PROFILES


def _workload(name: str, layers: int, dtype=torch.bfloat16):
    model = zoo.build(name, dtype=dtype, device="meta", num_layers=layers)
    program = capture(model, zoo.example_inputs(name, 1, CAPTURE_TOKENS), {"use_cache": False})
    PassManager(pipeline(3)).run(program, PassContext(PROFILES["cpu"]))
    return extract_workload(program, name)


def _shape(work):
    return [(o.op, o.kind, o.layer, o.inputs, o.k, o.n, o.heads, o.kv_heads, o.experts, round(o.out_elements, 6),
             o.constant, o.pair_scaled) for o in work.ops]


@pytest.mark.parametrize("name", ["llama-tiny", "mixtral-tiny"])
def test_three_layers_repeated_equal_the_whole_model(name):
    whole, three = _workload(name, 5), _workload(name, 3)
    repeated = repeat_layers(three, 5)
    assert _shape(repeated) == _shape(whole)
    assert repeated.parameters == whole.parameters == sum(
        p.numel() for p in zoo.build(name, device="meta", num_layers=5).parameters())
    assert repeated.notes and "layer 1 stands for layers 1-4" in repeated.notes[0]


def test_layers_that_differ_are_not_repeated():
    three = _workload("llama-tiny", 3)
    ops = list(three.ops)
    i = next(i for i, o in enumerate(ops) if o.layer == 2 and o.kind == "matmul")
    ops[i] = type(ops[i])(**{**ops[i].__dict__, "n": ops[i].n + 1})
    with pytest.raises(FlashcError, match="layers 1 and 2 differ"):
        repeat_layers(type(three)(three.model, ops, three.layers, three.captured_tokens), 8)


def test_llama_2_70b_shapes():
    model = zoo.build("llama-2-70b", dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 68_976_648_192  # Llama-2-70B's published count
    work = capture_workload("llama-2-70b")
    assert work.layers == 80 and work.parameters == 68_976_648_192
    attention = [o for o in work.ops if o.kind == "attention"]
    assert len(attention) == 80 and {(o.heads, o.kv_heads, o.head_dim) for o in attention} == {(64, 8, 128)}
    assert work.weight_bytes("int8") == pytest.approx(68_976_648_192, rel=1e-3)  # norms stay bf16


def test_decode_step_cache_writes_move_what_they_write():
    from flashc.decode import DecodeStep, decode_example_inputs, decode_input_names

    model = zoo.build("llama-tiny")
    step = DecodeStep(model, 64)
    program = capture(step, decode_example_inputs(model, 2, 64), {}, input_names=decode_input_names(model))
    PassManager(pipeline(3)).run(program, PassContext(PROFILES["cpu"]))
    work = extract_workload(program, "llama-tiny")
    writes = [o for o in work.ops if o.op == "aten.index_copy_"]
    assert len(writes) == 4  # k and v of 2 layers
    assert all(o.out_elements == 2 * 32 for o in writes)  # one token: 2 kv heads x head size 32, not the cache
    attention = [o for o in work.ops if o.kind == "attention"]
    assert [(o.op, o.heads, o.kv_heads, o.head_dim) for o in attention] == [("flashc.decode_attention", 4, 2, 32)] * 2

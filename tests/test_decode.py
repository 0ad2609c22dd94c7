"""The decode-step signature: step-by-step decoding with a static KV cache equals a full forward."""

import pytest
import torch
from flashc_testing import rel_err

import flashc
from flashc.decode import DecodeStep, decode_example_inputs, empty_kv_cache
from flashc.ir import op_name


@pytest.mark.parametrize("family", ["llama-tiny", "mixtral-tiny", "gemma-tiny", "qwen2-tiny"])
def test_decode_steps_match_full_forward(tiny_models, family):
    model = tiny_models[family]
    step = DecodeStep(model, max_cache_len=32)
    cm = flashc.compile(step, "cpu", decode_example_inputs(model, 1, 32), level=3)
    assert [s.name for s in cm.inputs][:3] == ["input_ids", "cache_position", "k_cache_0"]
    ops = [op_name(n) for n in cm.program.op_nodes()]
    assert ops.count("flashc.decode_attention") == 2 and ops.count("aten.index_copy_") == 4  # k and v per layer
    tokens = torch.randint(0, model.config.vocab_size, (1, 7))
    kv = empty_kv_cache(model, 1, 32)
    steps = [cm(tokens[:, t:t + 1], torch.tensor([t]), *kv) for t in range(tokens.shape[1])]
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
    assert rel_err(torch.cat(steps, 1), full) < 1e-5
    assert kv[0][:, :, 7:].abs().sum() == 0 and kv[0][:, :, :7].abs().sum() > 0  # cache written at 0..6 only


def test_decode_cli_roundtrip(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "dec"
    r = subprocess.run([sys.executable, "-m", "flashc.cli", "compile", "llama-tiny", "--signature", "decode",
                        "--cache-len", "48", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "flashc.cli", "run", str(out), "--repeat", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "k_cache_0" in r.stdout and "rel. error" in r.stdout


def test_decode_step_of_a_shape_only_model_compiles():
    """A real-size model on the meta device (no weights): the decode step still captures and type-checks."""
    from flashc import zoo

    model = zoo.build("llama-3.2-1b", device="meta", dtype=torch.bfloat16, num_layers=2)
    cm = flashc.compile(DecodeStep(model, 64), "eager", decode_example_inputs(model, 1, 64, device="meta"), level=3)
    assert [s.name for s in cm.inputs][:2] == ["input_ids", "cache_position"]
    assert cm.report().estimate.flops > 0

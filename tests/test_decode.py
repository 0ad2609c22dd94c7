"""The decode-step signature: step-by-step decoding with a static KV cache equals a full forward."""

import pytest
import torch
from flashc_testing import rel_err

import flashc
from flashc.decode import DecodeStep, attention_mask_for, decode_example_inputs, empty_kv_cache
from flashc.errors import CaptureError
from flashc.ir import op_name
from flashc.ops import decode_mask


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


# --- Eager attention: the mask is added to the scores, so it must be additive ----------------

def _eager_model(family: str) -> torch.nn.Module:
    """A tiny random model (no download) whose attention adds the mask to the scores."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 attn_implementation="eager")  # Gemma-2's default in some transformers releases, not all
    torch.manual_seed(0)
    if family == "gemma2":  # with soft-capped scores and logits, and sliding-window layers
        model = Gemma2ForCausalLM(Gemma2Config(**sizes, head_dim=16, sliding_window=32))
    else:
        model = LlamaForCausalLM(LlamaConfig(**sizes))
    assert model.config._attn_implementation == "eager"
    model.generation_config.eos_token_id = None  # random weights: compared over the full length
    return model.eval()


@pytest.fixture(scope="module")
def eager_models():
    return {family: _eager_model(family) for family in ("gemma2", "llama")}


@pytest.fixture(scope="module")
def eager_steps(eager_models):
    """family -> level -> compiled decode step (cache of 32), compiled once per module."""
    return {family: {level: flashc.compile(DecodeStep(model, 32), "cpu", decode_example_inputs(model, 1, 32),
                                           level=level)
                     for level in (0, 2, 3)}
            for family, model in eager_models.items()}


def test_mask_form_follows_attention_implementation(eager_models, tiny_models):
    visible = decode_mask(torch.tensor([2]), 6)[None, None]
    assert attention_mask_for(tiny_models["llama-tiny"], visible) is visible  # sdpa: boolean
    additive = attention_mask_for(eager_models["gemma2"], visible)  # eager: 0 visible, dtype min hidden
    assert additive.dtype == torch.float32
    assert additive[..., :3].eq(0).all() and additive[..., 3:].eq(torch.finfo(torch.float32).min).all()
    half = _eager_model("llama").to(torch.bfloat16)
    assert attention_mask_for(half, visible).min() == torch.finfo(torch.bfloat16).min


def test_unknown_attention_implementation_is_an_error():
    model = _eager_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(CaptureError, match="flash_attention_2.*sdpa"):
        attention_mask_for(model, decode_mask(torch.tensor([0]), 4)[None, None])


@pytest.mark.parametrize("level", [0, 2, 3])
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_eager_decode_steps_match_full_forward(eager_models, eager_steps, family, level):
    model, cm = eager_models[family], eager_steps[family][level]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (1, 12), generator=g)
    kv = empty_kv_cache(model, 1, 32)
    for t in range(3):  # stale keys in the cache must stay hidden: fill it with noise first
        kv[t].normal_(generator=g)
    steps = torch.cat([cm(tokens[:, t:t + 1], torch.tensor([t]), *kv) for t in range(tokens.shape[1])], 1)
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
    for t in (0, 1, 5, 11):
        assert rel_err(steps[:, t], full[:, t]) < 1e-5, f"position {t}"


@pytest.mark.parametrize("level", [0, 2, 3])
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_eager_greedy_generation_matches_hugging_face(eager_models, eager_steps, family, level):
    model, cm = eager_models[family], eager_steps[family][level]
    g = torch.Generator().manual_seed(2)
    # the longer prompt first: the second call reuses a cache holding its stale keys
    for prompt_len in (9, 4):
        ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=10, do_sample=False)
        got = cm.generate(ids, 10)
        assert got.shape == (1, prompt_len + 10) and torch.equal(got, want)


def test_eager_attention_at_o3_is_decode_attention_or_left_alone(eager_steps):
    """Eager attention, softmax(q @ k^T * scale + mask) @ v, is not fused today (Gemma-2's also
    soft-caps the scores); fused, it must become decode_attention, never a masked flashc.attention."""
    for family in ("gemma2", "llama"):
        ops = [op_name(n) for n in eager_steps[family][3].program.op_nodes()]
        assert ops.count("aten.softmax") + ops.count("flashc.decode_attention") == 2  # one per layer
        assert "flashc.attention" not in ops and ops.count("aten.index_copy_") == 4

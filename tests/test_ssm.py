"""The attention-to-SSM rewrite (issue #16): the op, the layer, conversion, distillation,
decode steps with recurrent state, compile and its errors. Every numeric check compares
against a reference on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import flashc
from flashc import zoo
from flashc.compiled import ModelSource
from flashc.distill import DistillConfig, layer_alignment_loss, train
from flashc.errors import FlashcError, InputError
from flashc.passes.quantize.calibration import CalibrationData
from flashc.passes import ssm as ssm_pass
from flashc.passes.ssm import SSMConfig, attention_sites, convert, rewrite, ssm_layers
from flashc.ssm_ops import ssm_chunked, ssm_recurrent

TINY = dict(batch=1, seq_len=32, lr=1e-3)


def _inputs(b=2, h=3, t=70, dk=8, dv=5, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    q, k = (torch.randn(b, h, t, dk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=g, dtype=dtype)
    log_decay = -torch.nn.functional.softplus(torch.randn(b, h, t, generator=g, dtype=dtype)) * 0.3
    state = torch.randn(b, h, dk, dv, generator=g)
    return q, k, v, log_decay, state


def _recurrence64(q, k, v, g, state):
    """The definition in float64, token by token."""
    h = state.double()
    ys = []
    for t in range(q.shape[2]):
        h = torch.exp(g[:, :, t].double())[..., None, None] * h + \
            k[:, :, t].double().unsqueeze(-1) * v[:, :, t].double().unsqueeze(-2)
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t].double(), h))
    return torch.stack(ys, 2), h


@pytest.mark.parametrize("t", [1, 63, 64, 65, 150])
def test_ssm_forms_agree_with_the_recurrence(t):
    args = _inputs(t=t)
    y_ref, h_ref = _recurrence64(*args)
    for fn in (ssm_recurrent, ssm_chunked, torch.ops.flashc.ssm_scan):
        y, h = fn(*(a.float() for a in args))
        assert h.dtype == torch.float32
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)


def test_chunked_form_carries_state_across_calls():
    q, k, v, g, s = _inputs(t=100)
    y_all, h_all = ssm_chunked(q.float(), k.float(), v.float(), g.float(), s)
    y1, h1 = ssm_chunked(q[:, :, :37].float(), k[:, :, :37].float(), v[:, :, :37].float(), g[:, :, :37].float(), s)
    y2, h2 = ssm_chunked(q[:, :, 37:].float(), k[:, :, 37:].float(), v[:, :, 37:].float(), g[:, :, 37:].float(), h1)
    torch.testing.assert_close(torch.cat([y1, y2], 2), y_all, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h2, h_all, rtol=1e-4, atol=1e-4)


def test_ssm_scan_refuses_mismatched_shapes():
    q, k, v, g, s = (a.float() for a in _inputs(t=4))
    with pytest.raises(ValueError, match="log_decay must be"):
        ssm_chunked(q, k, v, g[:, :, :3], s)
    with pytest.raises(ValueError, match="state must be"):
        ssm_chunked(q, k, v, g, s[:, :, :2])


# ---------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", ["llama-tiny", "mistral-tiny", "qwen2-tiny", "gemma-tiny", "mixtral-tiny"])
def test_zoo_families_convert_and_run(name):
    model = zoo.build(name, seed=0)
    sites = attention_sites(model)
    assert len(sites) == model.config.num_hidden_layers
    student = convert(model, [0])
    assert [m.layer_index for m in ssm_layers(student)] == [0]
    assert not ssm_layers(model), "the input model is left as it was"
    ids = torch.randint(0, 200, (2, 19))
    with torch.no_grad():
        out = student(ids).logits
    assert out.shape == (2, 19, model.config.vocab_size) and torch.isfinite(out).all()


class _FusedQKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.o_proj = nn.Linear(16, 16)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _FusedQKV()


class _Handwritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(), _Layer()])


def test_unknown_attention_is_refused_naming_the_layer():
    with pytest.raises(FlashcError, match=r"layer 0 \(layers.0.self_attn\).*no nn.Linear q_proj, k_proj, v_proj"):
        attention_sites(_Handwritten())
    with pytest.raises(FlashcError, match="found no decoder layers"):
        attention_sites(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(FlashcError, match=r"layer\(s\) \[5\] do not exist"):
        convert(zoo.build("llama-tiny"), [5])


@pytest.mark.parametrize("spec, layers", [("all", "all"), ("auto", "auto"), ("3, 1,1", [1, 3]), ([2, 0], [0, 2]),
                                          ({"layers": "1", "keep_attention": 0}, [1])])
def test_config_parses(spec, layers):
    assert SSMConfig.parse(spec).layers == layers


@pytest.mark.parametrize("spec, match", [("most", "not a layer choice"), (3.5, "takes 'all'"),
                                         ({"layer": "all"}, "unknown key")])
def test_config_refuses(spec, match):
    with pytest.raises(FlashcError, match=match):
        SSMConfig.parse(spec)


# ----------------------------------------------------------------------- the layer, stateful


def _hybrid(layers=(0, 2), align_steps=2):
    model = zoo.build("llama-tiny", seed=0, num_layers=3)
    data = CalibrationData.builtin(None, model.config.vocab_size)
    config = SSMConfig(layers=list(layers), align=DistillConfig(steps=align_steps, **TINY),
                       distill=DistillConfig(steps=0))
    return model, rewrite(model, config, data.tokens, progress=False)


def test_decode_steps_match_the_full_forward_and_generate_matches_eager():
    from flashc.generation import compile_generation

    _, result = _hybrid()
    model = result.model
    gm = compile_generation(model, "cpu", cache_len=64, batch=2, prefill_chunk=16, draft_len=3)
    assert [s.name for s in gm.decode.inputs[2:5]] == ["ssm_state_0", "k_cache_1", "v_cache_1"]
    assert gm.stateful
    steps = gm.steps()
    x = torch.randint(0, model.config.vocab_size, (2, 37))  # 2 chunks + a tail fed without padding
    assert all(size == count and back == 0 for size, count, back in steps.plan(37, 0))
    logits = steps.feed(x, 0, all_logits=True)
    with torch.no_grad():
        ref = model(x).logits
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    # a new sequence at position 0 starts from a zero state, whatever the cache holds
    prompt = torch.randint(0, model.config.vocab_size, (2, 21))
    out = gm.generate(prompt, 10)
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
    with pytest.raises(InputError, match="state-space layers"):
        gm.generate(prompt, 4, speculate="ngram")


def test_ragged_generation_is_refused_for_state_space_layers():
    from flashc.generation import compile_generation

    _, result = _hybrid(layers=(1,), align_steps=1)
    with pytest.raises(InputError, match="ragged=True"):
        compile_generation(result.model, "cpu", cache_len=32, ragged=True)


# ---------------------------------------------------------------------------- distillation


def test_alignment_lowers_the_layer_loss_and_distillation_reports():
    model, result = _hybrid(layers=(0, 1, 2), align_steps=25)
    align = result.training[0]
    assert align.stage == "align" and len(align.losses) == 25
    assert align.last_loss < align.losses[0] * 0.8
    rows = dict((r[0], r[1]) for r in result.rows())
    assert rows["converted layers"].startswith("3 of 3")
    assert "MiB, any context" in rows["state per sequence"]
    assert result.state_bytes == 3 * 4 * 4 * 32 * 32  # fp32 [heads, d, d] per layer


@pytest.mark.parametrize("scope", ["ssm", "blocks", "all"])
def test_the_logit_stage_trains_what_train_names(scope):
    """train="ssm" leaves every weight but the new layers' as it was; "blocks" also trains the MLP and norms of the
    decoder blocks holding a new layer (no other block's); "all" trains every weight. The input model is never
    changed."""
    model = zoo.build("llama-tiny", seed=0, num_layers=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = CalibrationData.builtin(None, model.config.vocab_size)
    config = SSMConfig(layers=[1], align=DistillConfig(steps=0), distill=DistillConfig(steps=2, **TINY), train=scope)
    result = rewrite(model, config, data.tokens, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    after = dict(result.model.named_parameters())
    changed = {n for n, p in before.items() if n in after and not torch.equal(after[n].float(), p.float())}
    assert any(".layers.1.self_attn." in n for n in changed)  # the new layer trains in every scope
    assert ("model.layers.1.mlp.up_proj.weight" in changed) == (scope != "ssm")
    assert ("model.layers.1.input_layernorm.weight" in changed) == (scope != "ssm")
    assert ("model.layers.0.mlp.up_proj.weight" in changed) == (scope == "all")
    assert dict(result.rows())["end-to-end distillation trained"] == ssm_pass.TRAIN_SCOPES[scope]


def test_an_unknown_training_scope_is_refused():
    with pytest.raises(FlashcError, match="not a training scope"):
        SSMConfig(train="everything")


def _train_run(model, pairs, tokens, config, ckpt, fingerprint, fail_at=None):
    loss = layer_alignment_loss(model[0], pairs)
    calls = {"n": 0}

    def maybe_failing(ids):
        calls["n"] += 1
        if fail_at is not None and calls["n"] > fail_at:
            raise KeyboardInterrupt
        return loss(ids)
    params = {f"p{i}.{n}": p for i, (_, s) in enumerate(pairs) for n, p in s.named_parameters()}
    return train(maybe_failing, params, tokens, config, "align", checkpoint_dir=ckpt, fingerprint=fingerprint,
                 progress=False), params


def test_checkpoints_resume_where_an_interrupted_run_stopped(tmp_path):
    model = zoo.build("llama-tiny", seed=0).float()
    tokens = torch.randint(0, 500, (2000,))
    config = DistillConfig(steps=6, checkpoint_every=2, **TINY)

    def setup():
        student = convert(model, [0, 1])
        sites = attention_sites(model)
        return [(sites[i].module, m) for i, m in enumerate(ssm_layers(student))]

    whole, params_whole = _train_run((model,), setup(), tokens, config, None, {"m": 1})
    with pytest.raises(KeyboardInterrupt):
        _train_run((model,), setup(), tokens, config, tmp_path, {"m": 1}, fail_at=3)  # checkpoint at step 2
    resumed, params = _train_run((model,), setup(), tokens, config, tmp_path, {"m": 1})
    assert resumed.resumed_from == 2 and len(resumed.losses) == 6
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-4)
    for n in params:
        torch.testing.assert_close(params[n], params_whole[n], rtol=1e-4, atol=1e-5)
    with pytest.raises(FlashcError, match="from another run"):
        _train_run((model,), setup(), tokens, config, tmp_path, {"m": 2})
    with pytest.raises(FlashcError, match="other distillation settings.*lr"):
        _train_run((model,), setup(), tokens, DistillConfig(steps=6, checkpoint_every=2, batch=1, seq_len=32,
                                                            lr=5e-4), tmp_path, {"m": 1})


def test_rewrite_without_calibration_text_is_refused():
    with pytest.raises(FlashcError, match="trains the new layers on calibration text"):
        rewrite(zoo.build("llama-tiny"), "all", None)
    with pytest.raises(FlashcError, match="at least 33 calibration tokens"):
        rewrite(zoo.build("llama-tiny"), SSMConfig(layers=[0], align=DistillConfig(steps=1, **TINY)),
                torch.arange(20), eval_tokens=torch.arange(40), progress=False)


def test_auto_keeps_the_most_damaging_attention(monkeypatch):
    model = zoo.build("llama-tiny", seed=0, num_layers=3)
    data = CalibrationData.builtin(None, model.config.vocab_size)
    config = SSMConfig(layers="all", keep_attention=1, align=DistillConfig(steps=1, **TINY),
                       distill=DistillConfig(steps=0))
    result = rewrite(model, config, data.tokens, progress=False)
    assert len(result.layers) == 2
    damage = {r["layer"]: r["perplexity_alone"] for r in result.choice if "layer" in r}
    kept = (set(range(3)) - set(result.layers)).pop()
    assert damage[kept] == max(damage.values())
    assert sorted(m.layer_index for m in ssm_layers(result.model)) == result.layers


# -------------------------------------------------------------------------------- compile


def test_compile_with_ssm_reports_the_rewrite():
    model = zoo.build("llama-tiny", seed=0)
    ssm = {"layers": [1], "align": {"steps": 2, **TINY}, "distill": {"steps": 1, **TINY}}
    cm = flashc.compile(model, "cpu", torch.zeros(1, 16, dtype=torch.long), ssm=ssm, calibration="builtin",
                        source=ModelSource("zoo", "llama-tiny"))
    text = cm.report().render()
    assert "attention -> SSM" in text and "1 of 2: [1]" in text
    assert "ssm_mix" in " ".join(str(n.target) for n in cm.program.op_nodes())
    assert cm.report().to_dict()["rewrites"]["attention -> SSM"][0][0] == "converted layers"
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.isfinite(cm(ids)[0] if isinstance(cm(ids), tuple) else cm(ids).logits).all()


def test_compile_decode_step_with_ssm_rebuilds_its_cache_inputs():
    from flashc.decode import DecodeStep, decode_example_inputs

    model = zoo.build("llama-tiny", seed=0)
    step = DecodeStep(model, 32)
    ssm = {"layers": [0], "align": {"steps": 1, **TINY}, "distill": {"steps": 0}}
    cm = flashc.compile(step, "cpu", decode_example_inputs(model, 1, 32), ssm=ssm,
                        source=ModelSource("zoo", "llama-tiny"))
    assert [s.name for s in cm.inputs][2:] == ["ssm_state_0", "k_cache_1", "v_cache_1"]
    out = cm.generate(torch.randint(0, 500, (1, 5)), 4)
    assert out.shape == (1, 9)


def test_hybrid_generation_artifact_round_trips(tmp_path):
    from flashc.generation import compile_generation

    model = zoo.build("llama-tiny", seed=0, num_layers=3)
    hybrid = convert(model, [0, 2]).eval()
    gm = compile_generation(hybrid, "cpu", cache_len=48, prefill_chunk=16, draft_len=2)
    gm.save(tmp_path / "a")
    loaded = flashc.load(tmp_path / "a")
    assert loaded.stateful and loaded.cache_len == 48
    prompt = torch.randint(0, model.config.vocab_size, (1, 19))
    assert torch.equal(gm.generate(prompt, 8), loaded.generate(prompt, 8))


def test_backends_without_the_op_refuse_it_by_name():
    hybrid = convert(zoo.build("llama-tiny", seed=0), [0]).eval()
    with pytest.raises(flashc.UnsupportedOpError, match="flashc.ssm_mix"):
        flashc.compile(hybrid, "onnx-cpu", torch.zeros(1, 8, dtype=torch.long))


def test_a_zero_length_scan_returns_fresh_tensors():
    q, k, v, g, s = (a.float() for a in _inputs(t=0))
    y, h = torch.ops.flashc.ssm_scan(q, k, v, g, s)
    assert y.shape == (2, 3, 0, 5) and h is not s and torch.equal(h, s)

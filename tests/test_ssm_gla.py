"""Gated linear attention as the attention-to-SSM rewrite's other layer kind (issue #16): the op
flashc.gla_mix and its recurrent and chunked references against float64 computations written
here from the definition, the state carried across calls, the layer's initialization, the
config's spelling, a llama-tiny rewrite compiled for "cpu" and its decode steps, and training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashc
import flashc.ops  # noqa: F401  (registers the flashc ops)
from flashc import zoo
from flashc.compiled import ModelSource
from flashc.distill import DistillConfig
from flashc.errors import FlashcError
from flashc.passes.quantize.calibration import CalibrationData
from flashc.passes.ssm import GLAAttention, SSMConfig, convert, rewrite, ssm_layers
from flashc.passes.ssm.gla import GATE_TEMPERATURE
from flashc.passes.ssm.layer import DT_RANGE
from flashc.ssm_ops import SSM_OPS, gla_chunked, gla_mix_reference, gla_recurrent

TINY = dict(batch=1, seq_len=32, lr=1e-3)
EPS = 1e-6


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def scan_inputs(b=2, h=3, t=70, dk=8, dv=5, fast=False, seed=None):
    """Fresh random q, k, v, log_alpha (<= 0, per key dim) and state, float64. fast: some key dims
    forget almost at once (log alpha down to about -40 a token), which overflows any chunked
    form that divides by a cumulative decay instead of working in log space."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    q, k = (torch.randn(b, h, t, dk, generator=g, dtype=torch.float64) * dk**-0.5 for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=g, dtype=torch.float64)
    logits = torch.randn(b, h, t, dk, generator=g, dtype=torch.float64) + 2
    if fast:
        logits[..., ::2] -= 40
    log_alpha = F.logsigmoid(logits)
    state = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64)
    return q, k, v, log_alpha, state


def recurrence64(q, k, v, log_alpha, state):
    """GLA's definition in float64, token by token: S = diag(alpha) S + k^T v, y = q S."""
    s = state.double()
    ys = []
    for t in range(q.shape[2]):
        alpha = torch.exp(log_alpha[:, :, t].double())
        s = alpha[..., :, None] * s + k[:, :, t].double()[..., :, None] * v[:, :, t].double()[..., None, :]
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t].double(), s))
    return torch.stack(ys, 2), s


@pytest.mark.parametrize("t", [1, 15, 16, 17, 63, 64, 65, 150])
@pytest.mark.parametrize("fast", [False, True], ids=["slow", "fast"])
def test_gla_forms_agree_with_the_float64_recurrence(t, fast):
    """Chunks of 64 with 16-token sub-chunks: T across both boundaries, a partial last chunk."""
    args = scan_inputs(t=t, fast=fast)
    y_ref, s_ref = recurrence64(*args)
    for fn in (gla_recurrent, gla_chunked):
        y, s = fn(*(a.float() for a in args))
        assert s.dtype == torch.float32 and torch.isfinite(y).all()
        assert rel_err(y, y_ref) < 1e-5, fn.__name__
        assert rel_err(s, s_ref) < 1e-5, fn.__name__


@pytest.mark.parametrize("chunk, subchunk", [(64, 16), (32, 8), (20, 7)])
def test_chunked_form_carries_state_across_calls(chunk, subchunk):
    """T tokens at once equal the same tokens in two calls, the first call's state fed to the second."""
    q, k, v, g, s = (a.float() for a in scan_inputs(t=100))
    y_all, s_all = gla_chunked(q, k, v, g, s, chunk, subchunk)
    cut = 37
    y1, s1 = gla_chunked(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], g[:, :, :cut], s, chunk, subchunk)
    y2, s2 = gla_chunked(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], g[:, :, cut:], s1, chunk, subchunk)
    assert rel_err(torch.cat([y1, y2], 2), y_all) < 1e-5
    assert rel_err(s2, s_all) < 1e-5


# ---------------------------------------------------------------------------- the op


def mix_inputs(B, T, heads, kv_heads, d, seed=None):
    """Fresh random gla_mix inputs: q a slice of a wider row (as a merged projection gives), gate
    logits around 2 (decays sigmoid(.)^(1/16) from fast to near 1), a non-zero state."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    wide = torch.randn(B, T, heads * d + 8, generator=g) * d**-0.5
    q = wide[..., : heads * d]
    k = torch.randn(B, T, kv_heads * d, generator=g)
    v = torch.randn(B, T, kv_heads * d, generator=g)
    gate = torch.randn(B, T, heads * d, generator=g) * 3 + 2
    state = 0.5 * torch.randn(B, heads, d, d, generator=g)
    return q, k, v, gate, state


def mix64(q, k, v, gate, state, heads, kv_heads, tau, eps=EPS):
    """gla_mix's definition in float64, head by head: head h reads kv head h // (heads // kv_heads),
    k scaled by d^-0.5, alpha = sigmoid(gate)^(1/tau), then an RMSNorm of each head's y."""
    B, T, n = q.shape
    d = n // heads
    ys, states = [], []
    for h in range(heads):
        j = h // (heads // kv_heads)
        cols, kv_cols = slice(h * d, (h + 1) * d), slice(j * d, (j + 1) * d)
        log_alpha = torch.log(torch.sigmoid(gate[..., cols].double()) ** (1 / tau))
        y, s = recurrence64(q[..., cols].double()[:, None], k[..., kv_cols].double()[:, None] * d**-0.5,
                            v[..., kv_cols].double()[:, None], log_alpha[:, None], state[:, h:h + 1].double())
        y = y[:, 0]
        ys.append(y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps))
        states.append(s[:, 0])
    return torch.cat(ys, -1), torch.stack(states, 1)


@pytest.mark.parametrize("shape", [(4, 2, 8), (3, 3, 16)], ids=lambda s: "H{}KV{}d{}".format(*s))
@pytest.mark.parametrize("T", [1, 23, 80])
def test_gla_mix_matches_its_float64_definition(shape, T):
    heads, kv_heads, d = shape
    args = mix_inputs(2, T, heads, kv_heads, d)
    y_ref, s_ref = mix64(*args, heads, kv_heads, GATE_TEMPERATURE)
    y, s = torch.ops.flashc.gla_mix(*args, heads, kv_heads, GATE_TEMPERATURE, EPS)
    assert y.shape == (2, T, heads * d) and s.shape == (2, heads, d, d) and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


def test_gla_mix_gradients_match_float64():
    """Distillation trains through the chunked reference: its gradients against float64's."""
    heads, kv_heads, d = 4, 2, 8
    args = mix_inputs(1, 40, heads, kv_heads, d)
    leaves = [a.detach().clone().requires_grad_(True) for a in args[:4]]
    leaves64 = [a.detach().double().requires_grad_(True) for a in args[:4]]
    w = torch.randn(1, 40, heads * d, dtype=torch.float64)
    (gla_mix_reference(*leaves, args[4], heads, kv_heads, GATE_TEMPERATURE, EPS)[0] * w.float()).sum().backward()
    (mix64(*leaves64, args[4], heads, kv_heads, GATE_TEMPERATURE)[0] * w).sum().backward()
    for name, a, a64 in zip("q k v gate".split(), leaves, leaves64):
        assert a.grad.abs().sum() > 0, name
        assert rel_err(a.grad, a64.grad) < 1e-4, name


def test_gla_mix_fake_kernel_registry_and_empty_sequence():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = [a.bfloat16() if i < 4 else a for i, a in enumerate(mix_inputs(2, 3, 6, 2, 8))]
    with FakeTensorMode() as mode:
        y, s = torch.ops.flashc.gla_mix(*(mode.from_tensor(a) for a in args), 6, 2, GATE_TEMPERATURE, EPS)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    assert s.shape == (2, 6, 8, 8) and s.dtype == torch.float32
    assert SSM_OPS["gla_mix"] is torch.ops.flashc.gla_mix.default
    empty = mix_inputs(1, 0, 2, 1, 8)
    y, s = torch.ops.flashc.gla_mix(*empty, 2, 1, GATE_TEMPERATURE, EPS)
    assert y.shape == (1, 0, 16) and torch.equal(s, empty[-1]) and s.data_ptr() != empty[-1].data_ptr()


def test_gla_mix_refuses_bad_shapes():
    q, k, v, gate, state = mix_inputs(1, 3, 4, 2, 8)
    op = torch.ops.flashc.gla_mix
    with pytest.raises(ValueError, match=r"heads \(4\) must be a positive multiple of kv_heads \(3\)"):
        op(q, k, v, gate, state, 4, 3, GATE_TEMPERATURE, EPS)
    with pytest.raises(ValueError, match=r"gate must be \[B, T, heads \* d\] like q = \(1, 3, 32\)"):
        op(q, k, v, gate[..., :4], state, 4, 2, GATE_TEMPERATURE, EPS)
    with pytest.raises(ValueError, match=r"k must be \[B, T, kv_heads \* d\] = \(1, 3, 16\)"):
        op(q, k[..., :8], v, gate, state, 4, 2, GATE_TEMPERATURE, EPS)
    with pytest.raises(ValueError, match=r"state must be \[B, heads, d, d\] = \(1, 4, 8, 8\)"):
        op(q, k, v, gate, state[:, :2], 4, 2, GATE_TEMPERATURE, EPS)
    with pytest.raises(ValueError, match="temperature tau must be > 0"):
        op(q, k, v, gate, state, 4, 2, 0.0, EPS)
    with pytest.raises(ValueError, match=r"log_alpha must be \[B, H, T, K\]"):
        a = scan_inputs(t=4)
        gla_chunked(a[0], a[1], a[2], a[3][..., :1], a[4])


# ------------------------------------------------------------------------ layer and config


def test_gla_layer_starts_with_the_mamba2_layers_memory_spread():
    model = zoo.build("llama-tiny", seed=0)
    layer = ssm_layers(convert(model, [1], "gla"))[0]
    assert isinstance(layer, GLAAttention) and layer.kind == "gla" and layer.gate_down.out_features == 16
    assert torch.count_nonzero(layer.gate_up.weight) == 0
    alpha = torch.sigmoid(layer.gate_up.bias.double()) ** (1 / GATE_TEMPERATURE)  # input-independent at init
    per_head = alpha.view(layer.heads, layer.head_dim)
    assert torch.equal(per_head, per_head[:, :1].expand_as(per_head))
    torch.testing.assert_close(per_head[[0, -1], 0], torch.exp(-torch.tensor(DT_RANGE, dtype=torch.float64)),
                               rtol=1e-5, atol=1e-6)
    assert layer.state_shape(3) == (3, layer.heads, layer.head_dim, layer.head_dim)


def test_gla_layer_carries_its_state_across_calls():
    """A bound state: T tokens in one forward equal the same tokens in two forwards (positions
    continuing), and position 0 starts from zero whatever the state held."""
    model = zoo.build("llama-tiny", seed=0)
    layer = ssm_layers(convert(model, [0], "gla"))[0].eval()
    with torch.no_grad():  # a trained-looking gate: input-dependent decays
        layer.gate_up.weight.normal_(std=0.5)
    x = torch.randn(2, 29, layer.q_proj.in_features)
    with torch.no_grad():
        whole = layer(x)[0]
        state = torch.randn(2, *layer.state_shape(2)[1:])  # stale contents: position 0 must ignore them
        layer.bind_state(state, torch.arange(0, 11))
        first = layer(x[:, :11])[0]
        layer.bind_state(state, torch.arange(11, 29))
        second = layer(x[:, 11:])[0]
        layer.bind_state(None)
    assert rel_err(torch.cat([first, second], 1), whole) < 1e-5


@pytest.mark.parametrize("spec, layers, kind", [("all:gla", "all", "gla"), ("1, 3 : GLA", [1, 3], "gla"),
                                                ("auto:mamba2", "auto", "mamba2"), ("all", "all", "mamba2"),
                                                ({"layers": "all", "kind": "gla"}, "all", "gla")])
def test_config_parses_the_kind(spec, layers, kind):
    config = SSMConfig.parse(spec)
    assert (config.layers, config.kind) == (layers, kind)


@pytest.mark.parametrize("spec, match", [("all:mamba3", "'mamba3' is not a state-space layer kind; known: mamba2, gla"),
                                         ({"layers": "all", "kind": "s4"}, "kind='s4' is not a state-space layer kind"),
                                         ({"layers": "all:gla"}, "give the kind as the dict's 'kind' key"),
                                         ("x:gla", "not a layer choice")])
def test_config_refuses_unknown_kinds(spec, match):
    with pytest.raises(FlashcError, match=match):
        SSMConfig.parse(spec)
    with pytest.raises(FlashcError, match="unknown layer kind 'rwkv'"):
        convert(zoo.build("llama-tiny"), [0], "rwkv")


# ------------------------------------------------------------------ rewrite, compile, train


def _gla_rewrite(layers=(0, 2), align_steps=2, distill_steps=0):
    model = zoo.build("llama-tiny", seed=0, num_layers=3)
    data = CalibrationData.builtin(None, model.config.vocab_size)
    config = SSMConfig(layers=list(layers), kind="gla", align=DistillConfig(steps=align_steps, **TINY),
                       distill=DistillConfig(steps=distill_steps, **TINY))
    return model, rewrite(model, config, data.tokens, progress=False)


def test_gla_rewrite_compiles_for_cpu_and_matches_eager():
    _, result = _gla_rewrite()
    model = result.model
    assert [m.kind for m in ssm_layers(model)] == ["gla", "gla"]
    assert dict((r[0], r[1]) for r in result.rows())["state-space layer"].startswith("gla")
    ids = torch.randint(0, model.config.vocab_size, (2, 45))
    cm = flashc.compile(model, "cpu", ids)
    targets = [str(n.target) for n in cm.program.op_nodes()]
    assert sum("gla_mix" in t for t in targets) == 2 and not any("ssm_mix" in t for t in targets)
    out = cm(ids)
    out = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
    with torch.no_grad():
        ref = model(ids).logits
    assert rel_err(out, ref) < 1e-5


def test_gla_decode_steps_match_the_full_forward():
    """The generation path's state handling (bind_state, state_shape) works unchanged for GLA."""
    from flashc.generation import compile_generation

    _, result = _gla_rewrite(layers=(1,), align_steps=1)
    model = result.model
    gm = compile_generation(model, "cpu", cache_len=64, batch=2, prefill_chunk=16, draft_len=3)
    assert [s.name for s in gm.decode.inputs[2:6]] == ["k_cache_0", "v_cache_0", "ssm_state_1", "k_cache_2"]
    x = torch.randint(0, model.config.vocab_size, (2, 37))
    logits = gm.steps().feed(x, 0, all_logits=True)
    with torch.no_grad():
        ref = model(x).logits
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    prompt = torch.randint(0, model.config.vocab_size, (2, 21))
    out = gm.generate(prompt, 8)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_gla_training_lowers_the_loss():
    """A few steps of layer alignment and of end-to-end logit distillation each lower their loss."""
    _, result = _gla_rewrite(layers=(0, 1, 2), align_steps=20, distill_steps=8)
    align, distill = result.training
    assert align.stage == "align" and len(align.losses) == 20
    assert align.last_loss < 0.8 * align.losses[0]
    assert distill.stage == "logits" and len(distill.losses) == 8
    assert sum(distill.losses[-3:]) < sum(distill.losses[:3])


def test_compile_with_ssm_kind_gla_reports_it():
    model = zoo.build("llama-tiny", seed=0)
    cm = flashc.compile(model, "cpu", torch.zeros(1, 16, dtype=torch.long), calibration="builtin",
                        ssm={"layers": [1], "kind": "gla", "align": {"steps": 1, **TINY}, "distill": {"steps": 0}},
                        source=ModelSource("zoo", "llama-tiny"))
    text = cm.report().render()
    assert "1 of 2: [1]" in text and "gla (gated linear attention" in text
    assert any("gla_mix" in str(n.target) for n in cm.program.op_nodes())

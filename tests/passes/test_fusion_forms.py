"""Building blocks written by hand fuse as Hugging Face's do, and look-alikes do not.

Each form is a small module written the way people write it: at -O2 on the CPU it
becomes its flashc op (counted) and keeps eager's numbers on fresh random inputs; a
near-miss (a different computation that looks alike) stays unfused and keeps them too.
"""

import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashc
from flashc.ir import op_name

B, H, HKV, S, D = 2, 4, 2, 6, 8


def _compile(model, make_inputs, tol=1e-5):
    """-O2 for the CPU; two calls on fresh inputs match eager. Returns the compiled model
    and its op counts."""
    cm = flashc.compile(model, "cpu", make_inputs(), level=2)
    for _ in range(2):
        args = make_inputs()
        with torch.no_grad():
            want = model(*args)
        torch.testing.assert_close(cm(*args), want, rtol=tol, atol=tol, equal_nan=True)
    return cm, Counter(op_name(n) for n in cm.program.op_nodes())


def _nodes(cm, name):
    return [n for n in cm.program.op_nodes() if op_name(n) == f"flashc.{name}"]


# --- RMSNorm -------------------------------------------------------------------------------

class WrittenRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w without the float32 cast, in several spellings."""

    def __init__(self, square="pow", divide=False, weight_shape=(D,)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(weight_shape))
        self.square, self.divide = square, divide

    def forward(self, x):
        sq = {"pow": lambda: x.pow(2), "mul": lambda: x * x, "square": lambda: torch.square(x)}[self.square]()
        ms = sq.mean(-1, keepdim=True) + 1e-6
        return (x / torch.sqrt(ms) if self.divide else x * torch.rsqrt(ms)) * self.weight


class MetaRMSNorm(nn.Module):
    """Meta's Llama reference: normalize in float32, type_as(x), then scale."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    def forward(self, x):
        return self._norm(x.float()).type_as(x) * self.weight


class GemmaRMSNorm(nn.Module):
    """Gemma's (1 + w) scale, written by hand."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class FunctionalRMSNorm(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(D)), eps

    def forward(self, x):
        return F.rms_norm(x, (D,), self.weight, self.eps)


def _hidden(dtype=torch.float32):
    return lambda: (torch.randn(B, S, D, dtype=dtype),)


@pytest.mark.parametrize("model", [
    WrittenRMSNorm(), WrittenRMSNorm("mul"), WrittenRMSNorm("square"), WrittenRMSNorm(divide=True),
    WrittenRMSNorm("mul", divide=True), MetaRMSNorm(), GemmaRMSNorm(), FunctionalRMSNorm(1e-5),
    FunctionalRMSNorm(None), nn.RMSNorm(D), nn.RMSNorm(D, eps=1e-6),
], ids=["pow", "x*x", "square", "sqrt-divide", "x*x-sqrt-divide", "meta", "gemma", "F.rms_norm", "F.rms_norm-no-eps",
        "nn.RMSNorm", "nn.RMSNorm-eps"])
def test_rms_norm_forms_fuse(model):
    cm, ops = _compile(model, _hidden())
    assert ops["flashc.rms_norm"] == 1 and not ops["aten.rsqrt"] and not ops["aten.rms_norm"]


def test_rms_norm_default_eps_is_torchs():
    cm, _ = _compile(nn.RMSNorm(D), _hidden())
    assert _nodes(cm, "rms_norm")[0].args[2] == torch.finfo(torch.float32).eps


@pytest.mark.parametrize("model", [MetaRMSNorm(), nn.RMSNorm(D), WrittenRMSNorm("mul")], ids=["meta", "nn.RMSNorm", "x*x"])
def test_rms_norm_forms_fuse_in_bfloat16(model):
    model = model.to(torch.bfloat16)
    cm, ops = _compile(model, _hidden(torch.bfloat16), tol=2e-2)  # flashc.rms_norm rounds once more or less
    assert ops["flashc.rms_norm"] == 1


class SumNorm(nn.Module):
    """L2 normalization: a sum of squares where RMSNorm takes the mean."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6) * self.weight


class SequenceNorm(nn.Module):
    """The mean over the sequence dim, not the hidden dim."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6) * self.weight


class TwoDimNorm(nn.Module):
    """F.rms_norm over the last two dims."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(S, D))

    def forward(self, x):
        return F.rms_norm(x, (S, D), self.weight, 1e-5)


@pytest.mark.parametrize("model", [SumNorm(), SequenceNorm(), TwoDimNorm(), WrittenRMSNorm(weight_shape=(S, 1)),
                                   WrittenRMSNorm(weight_shape=(3, 1, 1, D))],  # the weight grows the output
                         ids=["sum", "mean-over-sequence", "two-dims", "weight-per-row", "weight-broadcasts-up"])
def test_rms_norm_look_alikes_do_not_fuse(model):
    _, ops = _compile(model, _hidden())
    assert not ops["flashc.rms_norm"]


def test_rms_norm_in_float64_is_not_fused():
    """flashc.rms_norm computes in float32: a float64 model would lose precision."""
    _, ops = _compile(WrittenRMSNorm().double(), _hidden(torch.float64), tol=1e-12)
    assert not ops["flashc.rms_norm"]


# --- Attention -----------------------------------------------------------------------------

def _qkv(hkv=H, s=S, l=S, dv=D, b=B):
    return torch.randn(b, H, s, D), torch.randn(b, hkv, l, D), torch.randn(b, hkv, l, dv)


def _allowed(s=S, l=S):
    """A boolean mask, True where attending, with every query attending at least one key."""
    return (torch.rand(B, 1, s, l) > 0.5) | torch.eye(s, l, dtype=torch.bool)


class WrittenAttention(nn.Module):
    """softmax(q @ k^T * scale + mask) @ v, additive mask."""

    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1])) + mask, dim=-1) @ v


class MetaAttention(nn.Module):
    """Meta's Llama reference: divide by sqrt(d), transpose(2, 3), softmax in float32."""

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(D)
        scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(q)
        return torch.matmul(scores, v)


class MaskedFillAttention(nn.Module):
    """A boolean mask through masked_fill(-inf): `~allowed` or `mask == 0`."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v, mask):
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        masked = ~mask if self.spelling == "not" else mask == 0
        return F.softmax(scores.masked_fill(masked, float("-inf")), dim=-1) @ v


class NanoGPTAttention(nn.Module):
    """nanoGPT's causal self-attention core: a tril buffer, masked_fill, dropout."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))
        self.attn_dropout = nn.Dropout(0.1)

    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return self.attn_dropout(F.softmax(att, dim=-1)) @ v


class UnmaskedAttention(nn.Module):
    """No mask, k.mT, q scaled up front."""

    def forward(self, q, k, v):
        return ((q * D ** -0.5) @ k.mT).softmax(-1) @ v


@pytest.mark.parametrize("model, make", [
    (WrittenAttention(), lambda: (*_qkv(), torch.randn(B, 1, S, S))),
    (MetaAttention(), lambda: (*_qkv(), torch.randn(B, 1, S, S))),
    (MaskedFillAttention("not"), lambda: (*_qkv(), _allowed())),
    (MaskedFillAttention("eq"), lambda: (*_qkv(), _allowed().int())),
    (UnmaskedAttention(), _qkv),
], ids=["additive", "meta", "masked-fill-not", "masked-fill-eq", "unmasked"])
def test_written_attention_fuses(model, make):
    _, ops = _compile(model, make)
    assert ops["flashc.attention"] == 1 and not ops["aten.softmax"] and not ops["aten.matmul"]


@pytest.mark.parametrize("model", [WrittenAttention(), MetaAttention()], ids=["additive", "meta"])
def test_written_attention_fuses_in_bfloat16(model):
    """Meta's softmax in float32 is a cast only in half precision (float32 drops it)."""
    make = lambda: tuple(t.to(torch.bfloat16) for t in (*_qkv(), torch.randn(B, 1, S, S)))  # noqa: E731
    _, ops = _compile(model, make, tol=2e-2)  # flashc.attention scales and masks in float32: rounds less
    assert ops["flashc.attention"] == 1 and not ops["aten.softmax"]


def test_written_causal_attention_becomes_is_causal():
    cm, ops = _compile(NanoGPTAttention(), _qkv)
    (node,) = _nodes(cm, "attention")
    assert node.args[3] is None and node.args[4] is True and ops["aten.masked_fill"] == 0
    assert node.args[5] == pytest.approx(1 / math.sqrt(D))


class ConstantMaskAttention(nn.Module):
    """A 2-D mask built in forward: additive causal, top-left tril, or a sliding window."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        s, l = q.shape[2], k.shape[2]
        if self.kind == "additive-causal":
            return torch.softmax(q @ k.transpose(-2, -1) * 0.3 + torch.full((s, l), float("-inf")).triu(1), -1) @ v
        if self.kind == "tril-top-left":
            mask = torch.ones(s, l, dtype=torch.bool).tril()
        else:
            i, j = torch.arange(s)[:, None] + (l - s), torch.arange(l)[None, :]
            mask = (j <= i) & (j > i - 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind, s, is_causal", [
    ("additive-causal", S, True), ("tril-top-left", S - 2, False), ("sliding-window", S, False),
])
def test_constant_masks_become_is_causal_or_a_4d_mask(kind, s, is_causal):
    cm, ops = _compile(ConstantMaskAttention(kind), lambda: _qkv(s=s))
    (node,) = _nodes(cm, "attention")
    assert node.args[4] is is_causal and (node.args[3] is None) is is_causal
    assert is_causal or node.args[3].meta["val"].shape == (1, 1, s, S)


def test_hugging_face_eager_attention_fuses():
    """Hugging Face's eager attention: repeat_kv, transpose(2, 3), softmax(dtype=float32), an
    additive mask of finfo.min (kept as a mask: it is not -inf)."""
    from flashc import zoo
    from flashc_testing import fresh_ids, rel_err

    model = zoo.build("llama-tiny")
    model.config._attn_implementation = "eager"
    cm = flashc.compile(model, "cpu", (fresh_ids("llama-tiny"),), level=2)
    nodes = _nodes(cm, "attention")
    assert len(nodes) == 2 and all(n.args[1].meta["val"].shape[1] == model.config.num_key_value_heads for n in nodes)
    ids = fresh_ids("llama-tiny")
    with torch.no_grad():
        assert rel_err(cm(ids).logits, model(ids, use_cache=False).logits) < 1e-5


class RepeatInterleaveGQA(nn.Module):
    def __init__(self, written):
        super().__init__()
        self.written = written

    def forward(self, q, k, v):
        n = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
        if self.written:
            return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), dim=-1) @ v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class ExpandGQA(nn.Module):
    """K and V expanded per query head and flattened (or reshaped) to Hq heads."""

    def __init__(self, flatten):
        super().__init__()
        self.flatten = flatten

    def _repeat(self, x, n):
        b, h, l, d = x.shape
        x = x.unsqueeze(2).expand(b, h, n, l, d)
        return x.flatten(1, 2) if self.flatten else x.reshape(b, h * n, l, d)

    def forward(self, q, k, v, mask):
        n = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, self._repeat(k, n), self._repeat(v, n), attn_mask=mask)


class EnableGQA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("model, make", [
    (RepeatInterleaveGQA(written=True), lambda: _qkv(HKV)),
    (RepeatInterleaveGQA(written=False), lambda: _qkv(HKV)),
    (ExpandGQA(flatten=True), lambda: (*_qkv(HKV), _allowed())),
    (ExpandGQA(flatten=False), lambda: (*_qkv(HKV), torch.randn(B, 1, S, S))),
    (EnableGQA(), lambda: _qkv(HKV)),
], ids=["repeat-interleave-written", "repeat-interleave-sdpa", "expand-flatten", "expand-reshape", "enable-gqa"])
def test_grouped_query_attention_reads_kv_heads_once(model, make):
    cm, ops = _compile(model, make)
    (node,) = _nodes(cm, "attention")
    assert node.args[1].meta["val"].shape[1] == HKV and node.args[2].meta["val"].shape[1] == HKV
    assert not ops["aten.repeat_interleave"] and not ops["aten.expand"]


def test_sdpa_without_scale_takes_the_default():
    cm, _ = _compile(EnableGQA(), lambda: _qkv(HKV))
    (node,) = _nodes(cm, "attention")
    assert node.args[4] is True and node.args[5] == pytest.approx(1 / math.sqrt(D))


class SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_without_mask_fuses():
    cm, ops = _compile(SDPA(), _qkv)
    (node,) = _nodes(cm, "attention")
    assert node.args[3] is None and node.args[4] is False


class TiledGQA(nn.Module):
    """K and V tiled: query head h reads KV head h % Hkv, not h // n. Still attention, but
    over the repeated K and V (not grouped-query)."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling

    def _tile(self, x, n):
        if self.spelling == "repeat":
            return x.repeat(1, n, 1, 1)
        b, h, l, d = x.shape
        return x[:, None].expand(b, n, h, l, d).reshape(b, n * h, l, d)

    def forward(self, q, k, v):
        n = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, self._tile(k, n), self._tile(v, n), is_causal=True)


@pytest.mark.parametrize("spelling", ["repeat", "expand"])
def test_tiled_kv_is_not_grouped_query(spelling):
    cm, _ = _compile(TiledGQA(spelling), lambda: _qkv(HKV))
    (node,) = _nodes(cm, "attention")
    assert node.args[1].meta["val"].shape[1] == H  # K stays repeated


class BooleanAdded(nn.Module):
    """A boolean mask added to the scores adds 1 where True: not a mask."""

    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3 + mask, dim=-1) @ v


class MaskThenScale(nn.Module):
    """The mask added before scaling is scaled too."""

    def forward(self, q, k, v, mask):
        return torch.softmax((q @ k.transpose(-2, -1) + mask) * 0.3, dim=-1) @ v


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3 + mask, dim=-2) @ v


class LargeNegativeFill(nn.Module):
    """masked_fill(-1e9): a fully masked row averages all keys where -inf gives NaN."""

    def forward(self, q, k, v, mask):
        return torch.softmax((q @ k.transpose(-2, -1) * 0.3).masked_fill(~mask, -1e9), dim=-1) @ v


class TransposeOtherDims(nn.Module):
    """q @ k.transpose(1, 3): not k^T per head (square shapes keep it well formed)."""

    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(1, 3) * 0.3 + mask, dim=-1) @ v


def _square_qkv():
    x = lambda: torch.randn(B, D, D, D)  # noqa: E731
    return x(), x(), x(), torch.randn(B, 1, D, D)


@pytest.mark.parametrize("model, make", [
    (BooleanAdded(), lambda: (*_qkv(), _allowed())),
    (MaskThenScale(), lambda: (*_qkv(), torch.randn(B, 1, S, S))),
    (SoftmaxOverQueries(), lambda: (*_qkv(), torch.randn(B, 1, S, S))),
    (LargeNegativeFill(), lambda: (*_qkv(), _allowed())),
    (TransposeOtherDims(), _square_qkv),
    (WrittenAttention(), lambda: (*_qkv(dv=2 * D), torch.randn(B, 1, S, S))),  # value head size differs
    (WrittenAttention(), lambda: (*_qkv(b=1), torch.randn(B, 1, S, S))),  # the mask grows the batch
], ids=["bool-added", "mask-then-scale", "softmax-dim", "fill-1e9", "transpose-1-3", "value-head-size",
             "mask-grows-batch"])
def test_attention_look_alikes_do_not_fuse(model, make):
    _, ops = _compile(model, make)
    assert not ops["flashc.attention"]


class CausalSDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_sdpa_causal_with_fewer_queries_is_not_fused():
    """torch's is_causal is aligned top-left, flashc's bottom-right: the same only when S == L."""
    _, ops = _compile(CausalSDPA(), lambda: _qkv(s=S - 2))
    assert not ops["flashc.attention"]


def test_eval_dropout_is_removed_and_training_dropout_kept():
    from flashc.capture import capture
    from flashc.ir import propagate_shapes
    from flashc.pass_manager import PassContext
    from flashc.passes.cleanup import Canonicalize
    from flashc.profiles import PROFILES

    class Dropouts(nn.Module):
        def forward(self, x):
            return F.dropout(x, 0.1, False) + F.dropout(x, 0.0, True) + F.dropout(x, 0.1, True)

    program = capture(Dropouts(), (torch.randn(3, 4),))
    propagate_shapes(program)
    Canonicalize().run(program, PassContext(PROFILES["cpu"]))
    kept = [n for n in program.op_nodes() if op_name(n) == "aten.dropout"]
    assert len(kept) == 1 and kept[0].args[1:] == (0.1, True)


# --- Rotary ----------------------------------------------------------------------------------

class InterleavedRope(nn.Module):
    """GPT-J's rotate_every_two: pairs (2i, 2i+1), which flashc.rotary (pairs i, i + d/2)
    does not express and flashc.rotary_interleaved does (more forms: test_fusion_rotary.py)."""

    def forward(self, x, cos, sin):
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return x * cos + rotated * sin


def test_interleaved_rotary_fuses_into_its_own_op():
    make = lambda: (torch.randn(B, H, S, D), torch.randn(B, 1, S, D), torch.randn(B, 1, S, D))  # noqa: E731
    _, ops = _compile(InterleavedRope(), make)
    assert not ops["flashc.rotary"] and ops["flashc.rotary_interleaved"] == 1 and not ops["aten.stack"]


# --- Gated MLPs ------------------------------------------------------------------------------

class GatedMLP(nn.Module):
    """down(act(x @ W1) * (x @ W3)) with the activation as written."""

    def __init__(self, act, linear="functional"):
        super().__init__()
        self.w1, self.w3, self.w2 = (nn.Parameter(torch.randn(16, D) * 0.3), nn.Parameter(torch.randn(16, D) * 0.3),
                                     nn.Parameter(torch.randn(D, 16) * 0.3))
        self.act, self.linear = act, linear

    def forward(self, x):
        if self.linear == "functional":
            a, b = F.linear(x, self.w1), F.linear(x, self.w3)
        else:
            a, b = x @ self.w1.t(), x @ self.w3.t()
        return F.linear(self.act(a) * b, self.w2)


def _sigmoid_silu(a):
    return a * torch.sigmoid(a)


def _gpt2_gelu(a):
    return 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * torch.pow(a, 3.0))))


def _gpt2_gelu_int_literals(a):
    return 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))


def _bert_gelu(a):
    return a * 0.5 * (1.0 + torch.erf(a / math.sqrt(2.0)))


@pytest.mark.parametrize("act, linear, fused", [
    (F.silu, "functional", ("swiglu",)), (nn.SiLU(), "matmul", ("swiglu",)),
    (_sigmoid_silu, "functional", ("swiglu",)), (_sigmoid_silu, "matmul", ("swiglu",)),
    (nn.GELU(approximate="tanh"), "functional", ("geglu", "tanh")), (nn.GELU(), "matmul", ("geglu", "none")),
    (_gpt2_gelu, "functional", ("geglu", "tanh")), (_gpt2_gelu_int_literals, "functional", ("geglu", "tanh")),
    (_bert_gelu, "matmul", ("geglu", "none")),
], ids=["silu", "nn-silu", "sigmoid", "sigmoid-matmul", "gelu-tanh", "gelu-erf", "gpt2-gelu", "gpt2-gelu-ints",
        "bert-gelu"])
def test_gated_mlp_forms_fuse(act, linear, fused):
    op, *approximate = fused
    cm, ops = _compile(GatedMLP(act, linear), _hidden())
    assert ops[f"flashc.{op}"] == 1
    assert not ops["aten.sigmoid"] and not ops["aten.tanh"] and not ops["aten.erf"] and not ops["aten.gelu"]
    assert _nodes(cm, op)[0].args[2:] == tuple(approximate)


class SigmoidOfOther(nn.Module):
    """a * sigmoid(b) * up: a gate of another tensor, not silu."""

    def forward(self, x):
        a, b, up = x[..., :4], x[..., 4:], x[..., :4] + 1
        return a * torch.sigmoid(b) * up


def _wrong_tanh_gelu(a):
    return 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044 * torch.pow(a, 3.0))))


def _half_erf_gelu(a):
    return a * 0.5 * (1.0 + torch.erf(a / 2.0))


@pytest.mark.parametrize("model", [SigmoidOfOther(), GatedMLP(_wrong_tanh_gelu), GatedMLP(_half_erf_gelu)],
                         ids=["sigmoid-of-other", "tanh-gelu-constant", "erf-over-2"])
def test_gated_mlp_look_alikes_do_not_fuse(model):
    _, ops = _compile(model, _hidden())
    assert not ops["flashc.swiglu"] and not ops["flashc.geglu"]

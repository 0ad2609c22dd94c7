"""Pattern fusion: rewrite the ATen spelling of LLM building blocks into flashc ops.

Each fusion is a pattern (the PyTorch code it matches, as the Hugging Face models of
the five supported families write it), a replacement, and where needed a check.
`Fuse(rules)` applies a list of them; the order of a list is the order they run in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import flashc.ops  # noqa: F401  (registers torch.ops.flashc)
from flashc.ir import Program, propagate_shapes
from flashc.pass_manager import PassContext, PassResult
from flashc.rewrite import Match, RewriteRule, apply_rule

aten = torch.ops.aten
flashc_ops = torch.ops.flashc

# Sentinels: distinctive values traced in place of scalars that a match binds.
EPS = 0.00012345
SCALE = 0.0987654


def _x(dtype, *shape):
    return torch.randn(*shape, dtype=dtype)


# --- RMSNorm -------------------------------------------------------------------------

def rms_norm_pattern(x, weight, eps):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_replacement(x, weight, eps):
    return flashc_ops.rms_norm.default(x, weight, eps)


FUSE_RMS_NORM = RewriteRule(
    "rms_norm", rms_norm_pattern, rms_norm_replacement,
    example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(dt, 8)), scalars={"eps": EPS},
)


def gemma_rms_norm_pattern(x, weight, eps):
    # Gemma scales by (1 + w) in float32 before casting back; constant folding has
    # already turned (1 + w.float()) into one float32 weight.
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * weight).type_as(x)


def gemma_rms_norm_replacement(x, weight, eps):
    return aten.type_as.default(flashc_ops.rms_norm.default(x, weight, eps), x)


FUSE_GEMMA_RMS_NORM = RewriteRule(
    "rms_norm_gemma", gemma_rms_norm_pattern, gemma_rms_norm_replacement,
    example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(torch.float32, 8)), scalars={"eps": EPS},
)


def add_rms_norm_pattern(x, residual, weight, eps):
    s = residual + x
    return flashc_ops.rms_norm.default(s, weight, eps), s


def add_rms_norm_replacement(x, residual, weight, eps):
    out = flashc_ops.add_rms_norm.default(x, residual, weight, eps)
    return out[0], out[1]


FUSE_ADD_RMS_NORM = RewriteRule(
    "add_rms_norm", add_rms_norm_pattern, add_rms_norm_replacement,
    example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(dt, 2, 3, 8), _x(dt, 8)), scalars={"eps": EPS},
    check=lambda m: m.val("x").shape == m.val("residual").shape,
)


# --- Rotary embedding -------------------------------------------------------------------

def rotary_pattern(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary_replacement(x, cos, sin):
    return flashc_ops.rotary.default(x, aten.squeeze.dim(cos, 1), aten.squeeze.dim(sin, 1))


def _check_rotary(m: Match) -> bool:
    x, cos = m.val("x"), m.val("cos")
    if x.dim() != 4 or cos.dim() != 4 or cos.shape[1] != 1 or m.val("sin").shape != cos.shape:
        return False
    d = x.shape[-1]
    for node in m.covered(aten.slice.Tensor):
        dim, start, end = node.args[1], node.args[2], node.args[3]
        if dim not in (3, -1) or (start, min(end, d)) not in ((0, d // 2), (d // 2, d)):
            return False
    return d % 2 == 0 and cos.shape[-1] == d


FUSE_ROTARY = RewriteRule(
    "rotary", rotary_pattern, rotary_replacement,
    example_inputs=lambda dt: (_x(dt, 1, 2, 5, 8), _x(dt, 1, 1, 5, 8), _x(dt, 1, 1, 5, 8)),
    check=_check_rotary, any_shape_literals=True,
)


# --- Gated MLP activations ----------------------------------------------------------------

def swiglu_pattern(gate, up):
    return F.silu(gate) * up


def swiglu_replacement(gate, up):
    return flashc_ops.swiglu.default(gate, up)


FUSE_SWIGLU = RewriteRule(
    "swiglu", swiglu_pattern, swiglu_replacement,
    example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(dt, 2, 3, 8)),
    check=lambda m: m.val("gate").shape == m.val("up").shape,
)


def geglu_tanh_pattern(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def geglu_tanh_replacement(gate, up):
    return flashc_ops.geglu.default(gate, up, "tanh")


def geglu_pattern(gate, up):
    return F.gelu(gate) * up


def geglu_replacement(gate, up):
    return flashc_ops.geglu.default(gate, up, "none")


FUSE_GEGLU = [
    RewriteRule("geglu", geglu_tanh_pattern, geglu_tanh_replacement,
                example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(dt, 2, 3, 8)),
                check=lambda m: m.val("gate").shape == m.val("up").shape),
    RewriteRule("geglu", geglu_pattern, geglu_replacement,
                example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(dt, 2, 3, 8)),
                check=lambda m: m.val("gate").shape == m.val("up").shape),
]


# --- Attention ------------------------------------------------------------------------------

def _repeat_kv(x, n_rep):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def sdpa_gqa_mask_pattern(q, k, v, mask, scale):
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep),
                                          attn_mask=mask, scale=scale)


def sdpa_mask_pattern(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def sdpa_gqa_causal_pattern(q, k, v, scale):
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep),
                                          is_causal=True, scale=scale)


def sdpa_causal_pattern(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def attention_replacement(q, k, v, scale, mask=None, is_causal=False):
    return flashc_ops.attention.default(q, k, v, mask, is_causal, scale)


def _check_attention(m: Match) -> bool:
    """GQA shapes line up; a constant causal mask becomes the is_causal flag."""
    q, k, v = m.val("q"), m.val("k"), m.val("v")
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] % k.shape[1] or k.shape != v.shape[:3] + k.shape[3:]:
        return False
    if "mask" in m.bindings:
        s, l = q.shape[2], k.shape[2]
        mask = m.constant("mask")
        if mask is not None and mask.dtype == torch.bool and mask.shape[-2:] == (s, l):
            if bool((mask == flashc.ops.causal_mask(s, l)).all()):
                m.bindings["mask"] = None
                m.bindings["is_causal"] = True
        elif m.val("mask").dim() != 4:
            return False
    elif q.shape[2] != k.shape[2]:
        return False  # torch's is_causal is top-left aligned: same as ours only when S == L
    else:
        m.bindings["is_causal"] = True
    return True


def _qkv_examples(dt, hq=4, hkv=2):
    return (_x(dt, 1, hq, 5, 8), _x(dt, 1, hkv, 5, 8), _x(dt, 1, hkv, 5, 8))


FUSE_ATTENTION = [
    RewriteRule("attention", sdpa_gqa_mask_pattern, attention_replacement,
                example_inputs=lambda dt: (*_qkv_examples(dt), torch.ones(1, 1, 5, 5, dtype=torch.bool)),
                scalars={"scale": SCALE}, check=_check_attention, any_shape_literals=True),
    RewriteRule("attention", sdpa_mask_pattern, attention_replacement,
                example_inputs=lambda dt: (*_qkv_examples(dt, 2, 2), torch.ones(1, 1, 5, 5, dtype=torch.bool)),
                scalars={"scale": SCALE}, check=_check_attention),
    RewriteRule("attention", sdpa_gqa_causal_pattern, attention_replacement,
                example_inputs=lambda dt: _qkv_examples(dt), scalars={"scale": SCALE},
                check=_check_attention, any_shape_literals=True),
    RewriteRule("attention", sdpa_causal_pattern, attention_replacement,
                example_inputs=lambda dt: _qkv_examples(dt, 2, 2), scalars={"scale": SCALE},
                check=_check_attention),
]


class Fuse:
    """Apply rewrite rules in order; stats count replacements per rule name."""

    requires = ("canonical",)
    preserves = ("canonical",)

    def __init__(self, *rules: RewriteRule | list[RewriteRule], name: str = "fuse") -> None:
        self.rules: list[RewriteRule] = []
        for r in rules:
            self.rules.extend(r if isinstance(r, list) else [r])
        self.name = name

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        for rule in self.rules:
            n = apply_rule(rule, program.graph, program.params)
            stats[rule.name] = stats.get(rule.name, 0) + n
            if n:  # later rules read shapes of the nodes this one created
                propagate_shapes(program)
        program.graph.eliminate_dead_code()
        program.drop_unused_params()
        return PassResult(any(stats.values()), stats)

"""Pattern fusion: rewrite the ATen spelling of LLM building blocks into flashc ops.

Each fusion is a pattern (the PyTorch code it matches, as the Hugging Face models of
the five supported families write it), a replacement, and where needed a check.
`Fuse(rules)` applies a list of them; the order of a list is the order they run in.
"""

from __future__ import annotations

import torch
import torch.fx as fx
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


# Traced in float32 the casts vanish, so this rule also takes Gemma's form, which
# scales by a float32 (1 + w) before casting back: the match is the float32 core and
# Gemma's cast stays outside it, so the numbers are Gemma's exactly.
FUSE_RMS_NORM = RewriteRule(
    "rms_norm", rms_norm_pattern, rms_norm_replacement,
    example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(dt, 8)), scalars={"eps": EPS},
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
    """The match is rope: the rotated half is cat(-x[..., d/2:], x[..., :d/2]) along the
    last dim of x itself (slice bounds and dims matched as wildcards are checked here)."""
    x, cos = m.val("x"), m.val("cos")
    if x.dim() != 4 or cos.dim() != 4 or cos.shape[1] != 1 or m.val("sin").shape != cos.shape:
        return False
    d = x.shape[-1]
    if d % 2 or cos.shape[-1] != d:
        return False
    negs, cats = m.covered(aten.neg.default), m.covered(aten.cat.default)
    slices = m.covered(aten.slice.Tensor)
    if len(negs) != 1 or len(cats) != 1 or len(slices) != 2:
        return False
    cat = cats[0]
    if (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) not in (3, -1):
        return False
    first, second = cat.args[0]
    if first is not negs[0] or second not in slices or negs[0].args[0] not in slices:
        return False
    halves = {negs[0].args[0]: (d // 2, d), second: (0, d // 2)}
    for node, (start, end) in halves.items():
        dim, lo, hi = node.args[1], node.args[2], node.args[3]
        step = node.args[4] if len(node.args) > 4 else 1
        if node.args[0] is not m.bindings["x"] or dim not in (3, -1) or step != 1 or (lo, min(hi, d)) != (start, end):
            return False
    return True


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
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[1] % k.shape[1]:
        return False
    # flashc.attention takes one head size for queries, keys and values
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        return False
    if "mask" in m.bindings:
        s, l = q.shape[2], k.shape[2]
        mask = m.constant("mask")
        if mask is not None and mask.device.type == "meta":
            pass  # shapes only (a meta-device model): the mask's values cannot be checked
        elif mask is not None and mask.dtype == torch.bool and mask.shape[-2:] == (s, l):
            if bool((mask == flashc.ops.causal_mask(s, l, mask.device)).all()):
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
    # every node it inserts gets its shape (inferred locally, else by propagating the graph)
    preserves = ("canonical", "shapes")

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
            # later rules read shapes of the nodes this one created; apply_rule infers them
            # locally and the whole graph is re-propagated only where that failed
            if n and any(node.meta.get("val") is None for node in program.op_nodes()):
                propagate_shapes(program)
        program.graph.eliminate_dead_code()
        program.drop_unused_params()
        return PassResult(any(stats.values()), stats)


# --- Mixture of experts (Mixtral) ------------------------------------------------------------
# The pattern is the installed transformers' own MixtralSparseMoeBlock, run on the
# pattern's arguments as its weights, so it matches however that version dispatches
# experts (grouped GEMM or a loop) under export.

_MOE_DIMS = dict(hidden=16, ffn=8, experts=4, top_k=2)


def _tiny_moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    d = _MOE_DIMS
    cfg = MixtralConfig(hidden_size=d["hidden"], intermediate_size=d["ffn"], num_local_experts=d["experts"],
                        num_experts_per_tok=d["top_k"], num_attention_heads=2, num_key_value_heads=1)
    # A whole model picks its experts implementation at construction; a lone block
    # must be told, or it falls back to a data-dependent loop that export rejects.
    cfg._experts_implementation = "grouped_mm"
    return MixtralSparseMoeBlock(cfg).eval()


def _moe_weight_names(block) -> dict[str, str]:
    """Map router/gate_up/down to the block's parameter names, found by shape."""
    d = _MOE_DIMS
    want = {(d["experts"], d["hidden"]): "router_weight",
            (d["experts"], 2 * d["ffn"], d["hidden"]): "gate_up",
            (d["experts"], d["hidden"], d["ffn"]): "down"}
    names = {want[tuple(p.shape)]: n for n, p in block.named_parameters() if tuple(p.shape) in want}
    if len(names) != 3:
        raise NotImplementedError("this transformers version stores Mixtral experts per module; "
                                  "the MoE fusion expects stacked expert weights (transformers >= 5)")
    return names


def mixtral_moe_pattern(x, router_weight, gate_up, down):
    block = _tiny_moe_block()
    names = _moe_weight_names(block)
    weights = {names["router_weight"]: router_weight, names["gate_up"]: gate_up, names["down"]: down}
    return torch.func.functional_call(block, weights, (x,))


def mixtral_moe_replacement(x, router_weight, gate_up, down, top_k, shape):
    flat = aten.reshape.default(x, [-1, shape[-1]])
    logits = aten.linear.default(flat, router_weight)
    out = flashc_ops.moe.default(flat, logits, gate_up, down, top_k, True)
    return aten.reshape.default(out, shape)


def _check_moe(m: Match) -> bool:
    x, r, gu, dn = (m.val(n) for n in ("x", "router_weight", "gate_up", "down"))
    e, h = r.shape
    if x.shape[-1] != h or gu.shape[0] != e or gu.shape[2] != h or dn.shape[:2] != (e, h) or gu.shape[1] != 2 * dn.shape[2]:
        return False
    topk = m.covered(aten.topk.default)
    if len(topk) != 1:
        return False
    # expert-count literals (bins of the histogram, bounds of the expert index) must
    # be this model's E: the pattern matched them as wildcards
    for node in m.covered(aten.histc.default):
        if node.args[1] != e or node.args[3] != e - 1:
            return False
    for node in m.covered(aten.ge.Scalar):
        if node.args[1] != e:
            return False
    for node in m.covered(aten.clamp_.default) + m.covered(aten.clamp.default):
        if node.args[2] != e - 1:
            return False
    m.bindings["top_k"] = int(topk[0].args[1])
    m.bindings["shape"] = list(x.shape)
    return True


def _moe_examples(dt):
    d = _MOE_DIMS
    return (_x(dt, 1, 5, d["hidden"]), _x(dt, d["experts"], d["hidden"]),
            _x(dt, d["experts"], 2 * d["ffn"], d["hidden"]), _x(dt, d["experts"], d["hidden"], d["ffn"]))


def _moe_on_gpu(graph: fx.Graph) -> list[fx.Graph]:
    """The block as traced on a GPU: transformers counts tokens per expert with histc of
    float expert ids on the CPU (histc takes no integers there) and of int32 ids elsewhere."""
    variant = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    changed = False
    for n in graph.nodes:
        env[n] = variant.node_copy(n, lambda a: env[a])
        if (n.target == aten.to.dtype and n.args[1] == torch.float32
                and any(u.target == aten.histc.default for u in n.users)):
            env[n].args = (env[n].args[0], torch.int32, *env[n].args[2:])
            changed = True
    return [variant] if changed else []


FUSE_MOE = RewriteRule("moe", mixtral_moe_pattern, mixtral_moe_replacement, example_inputs=_moe_examples,
                       check=_check_moe, any_shape_literals=True, variants=_moe_on_gpu)

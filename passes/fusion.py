"""Pattern fusion: rewrite the ATen spelling of LLM building blocks into flashc ops.

Each fusion is a pattern (the PyTorch code it matches, as the Hugging Face models of
the five supported families write it or as people write it by hand), a replacement, and
where needed a check. Other spellings of the same computation (`x * x` for `x.pow(2)`,
`k.transpose(2, 3)` for `k.transpose(-2, -1)`) are a rule's `variants`: small edits of its
traced graph, listed next to it, that cost no tracing. `Fuse(rules)` applies a list of
them; the order of a list is the order they run in.

A check returns True or, when it refuses, a sentence saying why, which
`flashc inspect --why-not` shows next to the node (`Fuse.explain`).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

import flashc.ops  # noqa: F401  (registers torch.ops.flashc)
from flashc.ir import Program, op_name, propagate_shapes, replace_with_call
from flashc.pass_manager import PassContext, PassResult
from flashc.passes.cleanup import Canonicalize, EliminateDeadCode
from flashc.rewrite import (
    Candidate, Match, RewriteRule, apply_rule, candidates_of, explain_matches, nearest, replace_matches,
)

aten = torch.ops.aten
flashc_ops = torch.ops.flashc

# Sentinels: distinctive values traced in place of scalars that a match binds.
EPS = 0.00012345
SCALE = 0.0987654
SIZE = 0.0024681  # the normalized size in F.rms_norm(x, (size,), ...)
N_REP = 0.0013579  # the repeat count in k.repeat_interleave(n_rep, dim=1)

# Patterns are cleaned up as the pipeline cleans a model before fusion, so both meet in
# one spelling. No constant folding: a pattern's arguments are its only inputs, and
# folding its internal constants (an arange) would turn them into wildcards.
PATTERN_CLEANUP = (Canonicalize(), EliminateDeadCode())


def _rule(name, pattern, replacement, **fields) -> RewriteRule:
    """A rule of this module: its pattern is traced and cleaned up with PATTERN_CLEANUP."""
    return RewriteRule(name, pattern, replacement, cleanup=PATTERN_CLEANUP, **fields)


# A pattern without casts traces to the same graph in every dtype, and the matcher does
# not compare dtypes: such rules are traced once.
ANY_DTYPE = (torch.float32,)


def _x(dtype, *shape):
    return torch.randn(*shape, dtype=dtype)


# --- Spellings: edits of a traced pattern into another way of writing it ---------------
# Each edit changes a copy of a pattern graph in place and says whether it found
# something to change; `_spellings(*edits)` makes a rule's `variants`: every combination.

def _spellings(*edits):
    def variants(graph: fx.Graph) -> list[fx.Graph]:
        graphs = [graph]
        for edit in edits:
            graphs += [g for g in (_edited(g, edit) for g in graphs) if g is not None]
        return graphs[1:]
    return variants


def _edited(graph: fx.Graph, edit) -> fx.Graph | None:
    copy, env = fx.Graph(), {}
    for n in graph.nodes:
        env[n] = copy.node_copy(n, lambda a: env[a])
    return copy if edit(copy) else None


def _nodes(graph: fx.Graph, target) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target == target]


def _placeholder(graph: fx.Graph, name: str) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "placeholder" and n.name == name)


def _val_shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


# --- RMSNorm -------------------------------------------------------------------------

def rms_norm_pattern(x, weight, eps, size):
    """Hugging Face's RMSNorm. `size` does not appear: only F.rms_norm's spelling binds it."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rms_norm_replacement(x, weight, eps):
    return flashc_ops.rms_norm.default(x, weight, eps)


def _square_as_product(graph):  # x * x
    pows = [n for n in _nodes(graph, aten.pow.Tensor_Scalar) if n.args[1] == 2]
    for n in pows:
        replace_with_call(graph, n, aten.mul.Tensor, (n.args[0], n.args[0]))
    return bool(pows)


def _square_as_square(graph):  # torch.square(x)
    pows = [n for n in _nodes(graph, aten.pow.Tensor_Scalar) if n.args[1] == 2]
    for n in pows:
        replace_with_call(graph, n, aten.square.default, (n.args[0],))
    return bool(pows)


def _rsqrt_as_division(graph):  # x / torch.sqrt(var + eps)
    changed = False
    for r in _nodes(graph, aten.rsqrt.default):
        for user in [u for u in r.users if u.target == aten.mul.Tensor]:
            other = user.args[1] if user.args[0] is r else user.args[0]
            with graph.inserting_before(user):
                root = graph.call_function(aten.sqrt.default, r.args)
            replace_with_call(graph, user, aten.div.Tensor, (other, root))
            changed = True
        if not r.users:
            graph.erase_node(r)
    return changed


def _cast_back_by_type_as(graph):  # h.type_as(x) for h.to(x.dtype), as Meta's Llama writes it
    x = _placeholder(graph, "x")
    casts = [n for n in _nodes(graph, aten.to.dtype) if n.args[0] is not x]
    for n in casts:
        replace_with_call(graph, n, aten.type_as.default, (n.args[0], x))
    return bool(casts)


def _rms_norm_op_graphs() -> list[fx.Graph]:
    """F.rms_norm(x, (size,), weight, eps) and nn.RMSNorm (eps given or left to torch): the
    computation as torch's own op, with its normalized size bound to the SIZE sentinel."""
    graphs = []
    for with_eps in (True, False):
        g = fx.Graph()
        x, weight = g.placeholder("x"), g.placeholder("weight")
        args = (x, [SIZE], weight, EPS) if with_eps else (x, [SIZE], weight)
        g.output(g.call_function(aten.rms_norm.default, args))
        graphs.append(g)
    return graphs


def _rms_norm_variants(graph: fx.Graph) -> list[fx.Graph]:
    respelled = _spellings(_square_as_product, _square_as_square, _rsqrt_as_division, _cast_back_by_type_as)
    return [*respelled(graph), *_rms_norm_op_graphs()]


def _check_rms_norm(m: Match) -> bool | str:
    """The weight is one scale per channel, [d] for x[..., d], as flashc.rms_norm's kernels
    take it (a per-row or larger weight is another computation), and x is not float64
    (flashc.rms_norm computes in float32). torch's op must normalize over the last dim only,
    with a weight of x's dtype; its default eps is float32's epsilon."""
    x, weight = m.val("x"), m.val("weight")
    if x.dtype == torch.float64:
        return "x is float64; flashc.rms_norm computes in float32"
    if tuple(weight.shape) != (x.shape[-1],):
        return f"the weight is {list(weight.shape)}, not one scale per channel of x [{x.shape[-1]}]"
    if m.covered(aten.rms_norm.default):
        size = m.bindings.pop("size")
        if size != x.shape[-1]:
            return f"torch's rms_norm normalizes over {size} elements, not over the last dim of x ({x.shape[-1]})"
        if weight.dtype != x.dtype:
            return f"the weight is {weight.dtype} and x {x.dtype}; flashc.rms_norm takes one dtype"
        m.bindings.setdefault("eps", torch.finfo(torch.float32).eps)
    return True


# Traced in float32 the casts vanish, so this rule also takes Gemma's form, which
# scales by a float32 (1 + w) before casting back: the match is the float32 core and
# Gemma's cast stays outside it, so the numbers are Gemma's exactly. The float32 graph
# is also the hand-written form without casts, in any dtype (flashc.rms_norm then
# normalizes in float32: more exact than the model, not less). In bfloat16 and float16
# torch's own op scales by the weight before rounding, flashc.rms_norm after: the two
# differ by at most one rounding of the output.
FUSE_RMS_NORM = _rule(
    "rms_norm", rms_norm_pattern, rms_norm_replacement,
    example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(dt, 8)), scalars={"eps": EPS, "size": SIZE},
    check=_check_rms_norm, variants=_rms_norm_variants,
)


def add_rms_norm_pattern(x, residual, weight, eps):
    s = residual + x
    return flashc_ops.rms_norm.default(s, weight, eps), s


def _check_add_rms_norm(m: Match) -> bool | str:
    """x and the residual have one shape: flashc.add_rms_norm adds without broadcasting."""
    x, residual = m.val("x"), m.val("residual")
    if x.shape != residual.shape:
        return f"x {list(x.shape)} and the residual {list(residual.shape)} differ in shape (the sum broadcasts)"
    return True


def add_rms_norm_replacement(x, residual, weight, eps):
    out = flashc_ops.add_rms_norm.default(x, residual, weight, eps)
    return out[0], out[1]


FUSE_ADD_RMS_NORM = _rule(
    "add_rms_norm", add_rms_norm_pattern, add_rms_norm_replacement,
    example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(dt, 2, 3, 8), _x(dt, 8)), scalars={"eps": EPS},
    check=_check_add_rms_norm, dtypes=ANY_DTYPE,
)


# --- Rotary embedding -------------------------------------------------------------------
# Two ops take rope. flashc.rotary rotates the pairs (i, i + d/2) (rotate-half, as Hugging
# Face writes it); flashc.rotary_interleaved the pairs (2i, 2i + 1), as GPT-J's
# rotate_every_two, Meta's Llama (complex numbers) and hand-written models (x[..., ::2] and
# x[..., 1::2] rotated, stacked and flattened) do. Both take x [B, H, S, D] and cos/sin
# [B or 1, S, D] entry for entry with x's channels, so the replacement reshapes the tables
# the model had: a form with one angle per pair (tables [..., D/2], or complex) has each
# entry repeated for both channels of its pair, a complex table is split into its real
# (cos) and imaginary (sin) parts. Rope on x [B, S, H, D] (Meta's code ropes before it
# moves the heads forward) runs on x transposed and is transposed back: exact. Partial
# rotary (rope on x[..., :r], the rest passed on by a cat, as Phi and GPT-NeoX write it)
# needs no rule of its own: x binds to the slice x[..., :r] and the cat stays.

STACK_DIM = 0.0036912  # the dim the rotated pairs are stacked along (-1 or 4)
FLATTEN_START = 0.0048123  # flatten(start, end) of the stacked pairs: (-2 or 3, -1 or 4)
FLATTEN_END = 0.0059874

# how a step of reshaping a rope table is spelled in the replacement
_TABLE_STEPS = {"squeeze": aten.squeeze.dim, "reshape": aten.reshape.default, "expand": aten.expand.default}


def _rope_layout(m: Match, x_shape, tables: dict[str, tuple], width: int, pairs: bool) -> bool | str:
    """Bind how the tables become [B or 1, S, D] and which dim of x is the positions'.

    Each table broadcasts against x [B, A1, A2, `width`] (x's pairs' shape when `pairs`:
    one angle per pair) without growing it, and holds one row per position shared by the
    heads: constant along dim 1 of x ([B, H, S, D], the op's layout) or else along dim 2
    ([B, S, H, D]: x is transposed around the op). Binds seq_dim and, per table, the steps
    (`_TABLE_STEPS`) that reshape it."""
    b, a1, a2 = x_shape[:3]
    padded = {}
    for name, shape in tables.items():
        if len(shape) > 4:
            return f"{name} is {len(shape)}-D; rope tables broadcast against a 4-D x"
        p = (1,) * (4 - len(shape)) + tuple(shape)
        if any(t not in (1, n) for t, n in zip(p, (b, a1, a2, width))):
            return f"{name} {list(shape)} does not broadcast to {[b, a1, a2, width]} without growing it"
        padded[name] = p
    if all(p[1] == 1 for p in padded.values()):
        seq_dim = 2
    elif all(p[2] == 1 for p in padded.values()):
        seq_dim = 1
    else:
        shapes = ", ".join(f"{n} {list(s)}" for n, s in tables.items())
        return (f"the tables ({shapes}) vary along both dims 1 and 2 of x {list(x_shape)}: flashc's rope takes "
                "one row per position, shared by the heads")
    positions, heads_dim = x_shape[seq_dim], 3 - seq_dim
    for name, shape in tables.items():
        tb, ts, tw = padded[name][0], padded[name][seq_dim], padded[name][3]
        if pairs:  # each angle for both channels of its pair: [b, s, w, 1] -> [b, s, w, 2] -> [b, s, 2w]
            steps = [("reshape", [tb, ts, tw, 1]), ("expand", [tb, positions, width, 2]),
                     ("reshape", [tb, positions, 2 * width])]
        else:
            steps = ([("squeeze", heads_dim)] if len(shape) == 4
                     else [("reshape", [tb, ts, tw])] if tuple(shape) != (tb, ts, tw) else [])
            if (ts, tw) != (positions, width):
                steps.append(("expand", [tb, positions, width]))
        m.bindings[f"{name}_steps"] = steps
    m.bindings["seq_dim"] = seq_dim
    return True


def _tables_refusal(m: Match) -> str | None:
    """Why cos and sin cannot be one op's tables (None when they can): the op's result takes
    x's and cos's dtype, the form's x's, cos's and sin's."""
    cos, sin = m.val("cos"), m.val("sin")
    if cos.dtype != sin.dtype:
        return f"cos is {cos.dtype} and sin {sin.dtype}; flashc's rope takes both tables in one dtype"
    return None


def _rope_table(t, steps):
    for step, arg in steps:
        t = _TABLE_STEPS[step](t, arg)
    return t


def _rope_call(op, x, cos, sin, seq_dim, cos_steps, sin_steps):
    """op(x, cos, sin) on x [B, H, S, D], for x in the layout the match found (seq_dim)."""
    if seq_dim == 1:
        x = aten.transpose.int(x, 1, 2)
    out = op(x, _rope_table(cos, cos_steps), _rope_table(sin, sin_steps))
    return aten.transpose.int(out, 1, 2) if seq_dim == 1 else out


def rotary_pattern(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary_replacement(x, cos, sin, seq_dim, cos_steps, sin_steps):
    return _rope_call(flashc_ops.rotary.default, x, cos, sin, seq_dim, cos_steps, sin_steps)


def _check_rotary(m: Match) -> bool | str:
    """The match is rope: the rotated half is cat(-x[..., d/2:], x[..., :d/2]) along the
    last dim of x itself (slice bounds and dims matched as wildcards are checked here); cos
    and sin hold one row per position (`_rope_layout`) in one dtype."""
    x, cos, sin = m.val("x"), m.val("cos"), m.val("sin")
    if x.dim() != 4:
        return f"x is {x.dim()}-D; flashc.rotary takes [batch, heads, seq, head size]"
    d = x.shape[-1]
    if d % 2:
        return f"the head size {d} is odd: it has no halves to rotate"
    negs, cats = m.covered(aten.neg.default), m.covered(aten.cat.default)
    slices = m.covered(aten.slice.Tensor)
    if len(negs) != 1 or len(cats) != 1 or len(slices) != 2:
        return (f"the rotated x takes {len(negs)} neg, {len(cats)} cat and {len(slices)} slice ops; "
                "rotate-half takes one, one and two")
    cat = cats[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim not in (3, -1):
        return f"the halves are concatenated along dim {dim}, not the last"
    first, second = cat.args[0]
    if first is not negs[0]:
        return "the negated half comes second in the cat; rotate-half puts it first"
    if second not in slices or negs[0].args[0] not in slices:
        return "the halves in the cat are not both slices of x"
    halves = {negs[0].args[0]: (d // 2, d, "negated", "negates the second"),
              second: (0, d // 2, "kept", "keeps the first")}
    for node, (start, end, role, rope) in halves.items():
        dim, lo, hi = node.args[1], node.args[2], node.args[3]
        step = node.args[4] if len(node.args) > 4 else 1
        if node.args[0] is not m.bindings["x"]:
            return f"the {role} half {node.name} is a slice of {node.args[0].name}, not of x itself"
        if dim not in (3, -1):
            return f"the {role} half {node.name} slices dim {dim}, not the last"
        if step != 1:
            return (f"the {role} half takes channels {step} apart (interleaved pairs take "
                    "x[..., ::2] and x[..., 1::2] rotated by stack and flatten, as GPT-J); "
                    "rotate-half takes contiguous halves")
        if (lo, min(hi, d)) != (start, end):
            return (f"the {role} half is x[..., {lo}:{min(hi, d)}]; rotate-half {rope} half, "
                    f"x[..., {start}:{end}]")
    tables = {"cos": tuple(cos.shape), "sin": tuple(sin.shape)}
    return _tables_refusal(m) or _rope_layout(m, x.shape, tables, d, pairs=False)


# --- Rotary embedding on interleaved pairs ---

def rotary_pairs_pattern(x, cos, sin, stack_dim, flatten_start, flatten_end):
    """Pairs (2i, 2i + 1) rotated by one angle each (cos/sin [..., D/2]) and put back in
    place by stack and flatten, as a hand-written Llama does."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def rotary_every_two_pattern(x, cos, sin, stack_dim, flatten_start, flatten_end):
    """GPT-J's rotate_every_two with tables in the pairs' order (each angle repeated, [..., D])."""
    rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def rotary_complex_pattern(x, freqs, flatten_start, flatten_end):
    """Meta's Llama: the pairs as complex numbers times freqs_cis (complex, one per pair).
    Its x.float() and .type_as(x) stay outside the match: the op computes in float32 as it
    did."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(3)


def rotary_interleaved_replacement(x, cos, sin, seq_dim, cos_steps, sin_steps):
    return _rope_call(flashc_ops.rotary_interleaved.default, x, cos, sin, seq_dim, cos_steps, sin_steps)


def rotary_complex_replacement(x, freqs, seq_dim, cos_steps, sin_steps):
    parts = aten.view_as_real.default(freqs)  # [..., D/2, 2]: (cos, sin) of each pair's angle
    cos, sin = aten.select.int(parts, -1, 0), aten.select.int(parts, -1, 1)
    return rotary_interleaved_replacement(x, cos, sin, seq_dim, cos_steps, sin_steps)


def _stack_dim_any(graph):  # torch.stack(..., dim=4)
    nodes = _nodes(graph, aten.stack.default)
    for n in nodes:
        n.args = (n.args[0], STACK_DIM)
    return bool(nodes)


def _flatten_from_any(graph):  # .flatten(3)
    nodes = _nodes(graph, aten.flatten.using_ints)
    for n in nodes:
        n.args = (n.args[0], FLATTEN_START)
    return bool(nodes)


def _flatten_any(graph):  # .flatten(3, 4)
    nodes = _nodes(graph, aten.flatten.using_ints)
    for n in nodes:
        n.args = (n.args[0], FLATTEN_START, FLATTEN_END)
    return bool(nodes)


def _flatten_as(target):  # .reshape(x.shape), .view(b, h, s, d): the check compares shapes
    def edit(graph):
        nodes = _nodes(graph, aten.flatten.using_ints)
        for n in nodes:
            replace_with_call(graph, n, target, (n.args[0], [1, 1, 1, 1]))
        return bool(nodes)
    return edit


def _slices_of_step_one(graph):  # x[..., :d/2], x[..., d/2:]: halves, which the check refuses saying so
    nodes = [n for n in _nodes(graph, aten.slice.Tensor) if len(n.args) == 5]
    for n in nodes:
        n.args = n.args[:4]
    return bool(nodes)


def _pairs_as_view(graph):  # x.view(*x.shape[:-1], -1, 2)
    nodes = [n for n in _nodes(graph, aten.reshape.default) if n.args[0].op == "placeholder"]
    for n in nodes:
        replace_with_call(graph, n, aten.view.default, n.args)
    return bool(nodes)


_FLATTEN_SPELLINGS = (_flatten_from_any, _flatten_any, _flatten_as(aten.reshape.default),
                      _flatten_as(aten.view.default))


def _slice_refusal(m: Match, node: fx.Node, start: int, role: str) -> str | None:
    """Why `node` is not x[..., start::2], the channels `role` of every pair (None when it is)."""
    d = m.val("x").shape[-1]
    if node.target != aten.slice.Tensor or node.args[0] is not m.bindings["x"]:
        return f"{role} ({node.name}, {op_name(node)}) is not a slice of x itself"
    dim, lo, hi = node.args[1], node.args[2], node.args[3]
    step = node.args[4] if len(node.args) > 4 else 1
    if dim not in (3, -1):
        return f"{role} ({node.name}) slices dim {dim}, not the last"
    if (lo, step) != (start, 2) or (_val_shape(node) or (0,))[-1] != d // 2:
        written = f"x[..., {lo}:{hi if hi < d else ''}{f':{step}' if step != 1 else ''}]"
        return f"{role} is {written}; rope on interleaved pairs takes x[..., {start}::2]"
    return None


def _pairs_put_back_refusal(m: Match, stacked: bool = True) -> str | None:
    """Why the pairs are not put back in place (None when they are): stacked along the last
    dim, then that dim and the one before flattened (or x's shape restored by a reshape)."""
    stack_dim, start, end = (m.bindings.pop(k, None) for k in ("stack_dim", "flatten_start", "flatten_end"))
    if stacked and stack_dim not in (None, -1, 4):
        return (f"the rotated pairs are stacked along dim {stack_dim}, not the last: flatten then "
                "interleaves other channels")
    if start not in (None, 3, -2) or end not in (None, 4, -1):
        return f"flatten({start}, {end}) of the [B, H, S, D/2, 2] pairs; rope flattens the last two dims, 3 and 4"
    x = m.val("x")
    for n in m.nodes:
        if (n.target in (aten.reshape.default, aten.view.default) and isinstance(n.args[0], fx.Node)
                and n.args[0].target in (aten.stack.default, aten.view_as_real.default)
                and _val_shape(n) != tuple(x.shape)):
            return f"the pairs are reshaped to {list(_val_shape(n) or ())}, not to x's {list(x.shape)}"
    return None


def _pairs_refusal(m: Match) -> str | None:
    x = m.val("x")
    if x.dim() != 4:
        return f"x is {x.dim()}-D; flashc.rotary_interleaved takes [batch, heads, seq, head size] (or seq, heads)"
    if x.shape[-1] % 2:
        return f"the head size {x.shape[-1]} is odd: it has no pairs to rotate"
    return None


def _check_rotary_pairs(m: Match) -> bool | str:
    """x1 = x[..., 0::2] and x2 = x[..., 1::2] (the first is the one multiplied by cos in the
    first stacked element), put back in place; cos/sin one angle per pair."""
    why = _pairs_refusal(m) or _pairs_put_back_refusal(m)
    if why:
        return why
    (sub,) = m.covered(aten.sub.Tensor)
    cos, sin = m.bindings["cos"], m.bindings["sin"]
    first, second = sub.args
    x1 = first.args[0] if first.args[1] is cos else first.args[1]
    x2 = second.args[0] if second.args[1] is sin else second.args[1]
    why = (_slice_refusal(m, x1, 0, "x1 (times cos, first in the stack)")
           or _slice_refusal(m, x2, 1, "x2 (times sin, subtracted)") or _tables_refusal(m))
    if why:
        return why
    x = m.val("x")
    tables = {"cos": tuple(m.val("cos").shape), "sin": tuple(m.val("sin").shape)}
    return _rope_layout(m, x.shape, tables, x.shape[-1] // 2, pairs=True)


def _check_rotary_every_two(m: Match) -> bool | str:
    """The rotated x is stack(-x[..., 1::2], x[..., 0::2]) put back in place; cos/sin have an
    entry per channel of x."""
    why = _pairs_refusal(m) or _pairs_put_back_refusal(m)
    if why:
        return why
    (stack,) = m.covered(aten.stack.default)
    negated, kept = stack.args[0]
    why = (_slice_refusal(m, negated.args[0], 1, "the negated element")
           or _slice_refusal(m, kept, 0, "the element kept") or _tables_refusal(m))
    if why:
        return why
    x = m.val("x")
    tables = {"cos": tuple(m.val("cos").shape), "sin": tuple(m.val("sin").shape)}
    return _rope_layout(m, x.shape, tables, x.shape[-1], pairs=False)


def _check_rotary_complex(m: Match) -> bool | str:
    """x's channels viewed as [..., D/2, 2] (pairs 2i, 2i + 1), times a complex table, put back
    by flattening; the table's real parts are the cos, its imaginary parts the sin."""
    why = _pairs_refusal(m) or _pairs_put_back_refusal(m, stacked=False)
    if why:
        return why
    x, freqs = m.val("x"), m.val("freqs")
    (complex_pairs,) = m.covered(aten.view_as_complex.default)
    pairs = complex_pairs.args[0]
    if _val_shape(pairs) != (*x.shape[:-1], x.shape[-1] // 2, 2):
        return f"x is viewed as {list(_val_shape(pairs) or ())}, not as pairs {[*x.shape[:-1], x.shape[-1] // 2, 2]}"
    if not freqs.is_complex():
        return f"the pairs are multiplied by a {freqs.dtype} tensor, not by complex numbers (a rotation)"
    shape = tuple(freqs.shape)
    return _rope_layout(m, x.shape, {"cos": shape, "sin": shape}, x.shape[-1] // 2, pairs=True)


def _rope_examples(width):
    return lambda dt: (_x(dt, 1, 2, 5, 8), _x(dt, 1, 1, 5, width), _x(dt, 1, 1, 5, width))


_PAIR_SCALARS = {"stack_dim": STACK_DIM, "flatten_start": FLATTEN_START, "flatten_end": FLATTEN_END}

FUSE_ROTARY = [
    _rule("rotary", rotary_pattern, rotary_replacement, example_inputs=_rope_examples(8),
          check=_check_rotary, any_shape_literals=True, dtypes=ANY_DTYPE),
    _rule("rotary", rotary_pairs_pattern, rotary_interleaved_replacement, example_inputs=_rope_examples(4),
          scalars=_PAIR_SCALARS, check=_check_rotary_pairs, any_shape_literals=True, dtypes=ANY_DTYPE,
          variants=_spellings(_stack_dim_any, *_FLATTEN_SPELLINGS, _slices_of_step_one)),
    _rule("rotary", rotary_every_two_pattern, rotary_interleaved_replacement, example_inputs=_rope_examples(8),
          scalars=_PAIR_SCALARS, check=_check_rotary_every_two, any_shape_literals=True, dtypes=ANY_DTYPE,
          variants=_spellings(_stack_dim_any, *_FLATTEN_SPELLINGS)),
    _rule("rotary", rotary_complex_pattern, rotary_complex_replacement,
          example_inputs=lambda dt: (_x(dt, 1, 5, 2, 8), torch.randn(1, 5, 1, 4, dtype=torch.complex64)),
          scalars={"flatten_start": FLATTEN_START, "flatten_end": FLATTEN_END}, check=_check_rotary_complex,
          any_shape_literals=True, dtypes=ANY_DTYPE, variants=_spellings(_pairs_as_view, *_FLATTEN_SPELLINGS)),
]


# --- Gated MLP activations ----------------------------------------------------------------

def _same_shape(m: Match) -> bool | str:
    gate, up = m.val("gate"), m.val("up")
    if gate.shape != up.shape:
        return f"gate {list(gate.shape)} and up {list(up.shape)} differ in shape (the product broadcasts)"
    return True


def swiglu_pattern(gate, up):
    return F.silu(gate) * up


def swiglu_replacement(gate, up):
    return flashc_ops.swiglu.default(gate, up)


def _silu_as_sigmoid_product(graph):  # gate * torch.sigmoid(gate)
    silus = _nodes(graph, aten.silu.default)
    for n in silus:
        with graph.inserting_before(n):
            sigmoid = graph.call_function(aten.sigmoid.default, (n.args[0],))
        replace_with_call(graph, n, aten.mul.Tensor, (n.args[0], sigmoid))
    return bool(silus)


FUSE_SWIGLU = _rule(
    "swiglu", swiglu_pattern, swiglu_replacement,
    example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(dt, 2, 3, 8)),
    check=_same_shape, dtypes=ANY_DTYPE, variants=_spellings(_silu_as_sigmoid_product),
)


def geglu_tanh_pattern(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def geglu_tanh_replacement(gate, up):
    return flashc_ops.geglu.default(gate, up, "tanh")


def geglu_pattern(gate, up):
    return F.gelu(gate) * up


def geglu_replacement(gate, up):
    return flashc_ops.geglu.default(gate, up, "none")


def geglu_tanh_written_pattern(gate, up):
    """The tanh approximation written out, as GPT-2 (transformers' NewGELUActivation)."""
    g = 0.5 * gate * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * torch.pow(gate, 3.0))))
    return g * up


def geglu_written_pattern(gate, up):
    """The erf form written out, as BERT's gelu."""
    return gate * 0.5 * (1.0 + torch.erf(gate / math.sqrt(2.0))) * up


def _literal_as_int(value: float):  # 1 + torch.tanh(...), gate ** 3: an int where the pattern has a float
    def is_value(a):
        return type(a) is float and a == value

    def edit(graph):
        nodes = [n for n in graph.nodes if n.op == "call_function" and any(is_value(a) for a in n.args)]
        for n in nodes:
            n.args = tuple(int(a) if is_value(a) else a for a in n.args)
        return bool(nodes)
    return edit


def _division_by_sqrt2_as_product(graph):  # gate * (1 / math.sqrt(2)), gate * 0.7071067811865476
    divs = [n for n in _nodes(graph, aten.div.Tensor) if n.args[1] == math.sqrt(2.0)]
    for n in divs:
        replace_with_call(graph, n, aten.mul.Tensor, (n.args[0], 1 / math.sqrt(2.0)))
    return bool(divs)


def _geglu_rule(pattern, replacement, variants=None):
    return _rule("geglu", pattern, replacement, example_inputs=lambda dt: (_x(dt, 2, 3, 8), _x(dt, 2, 3, 8)),
                 check=_same_shape, dtypes=ANY_DTYPE, variants=variants)


# The written-out forms compute gelu in the model's dtype; flashc.geglu, as F.gelu, in
# float32 for bfloat16 and float16: as exact as the model or more.
FUSE_GEGLU = [
    _geglu_rule(geglu_tanh_pattern, geglu_tanh_replacement),
    _geglu_rule(geglu_pattern, geglu_replacement),
    _geglu_rule(geglu_tanh_written_pattern, geglu_tanh_replacement,
           variants=_spellings(_literal_as_int(1.0), _literal_as_int(3.0))),
    _geglu_rule(geglu_written_pattern, geglu_replacement,
           variants=_spellings(_literal_as_int(1.0), _division_by_sqrt2_as_product)),
]


# --- Attention ------------------------------------------------------------------------------
# First whole attentions become flashc.attention with K and V as the model gives them
# (SDPA, and softmax(q @ k^T * scale + mask) @ v written out); then, where K and V were
# repeated for grouped-query attention in the order flashc.attention reads them, the
# repeats go (FUSE_ATTENTION runs the rules in this order).

SDPA = aten.scaled_dot_product_attention.default


def sdpa_mask_pattern(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def sdpa_causal_pattern(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def sdpa_pattern(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_pattern(q, k, v, mask, scale):
    """Attention written out with an additive mask (nanoGPT, Meta's Llama)."""
    return torch.softmax(q @ k.transpose(-2, -1) * scale + mask, dim=-1) @ v


def attention_masked_fill_pattern(q, k, v, mask, scale):
    """Attention written out with a boolean mask that is True where attending."""
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def attention_unmasked_pattern(q, k, v, scale):
    return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v


def attention_replacement(q, k, v, scale, mask=None, is_causal=False, mask_blocks=False, mask_shape=None,
                          nan_rows=False):
    if mask is not None and mask_shape is not None:
        mask = aten.reshape.default(mask, mask_shape)  # flashc.attention reads a 4-D mask
    if mask is not None and mask_blocks:
        mask = aten.bitwise_not.default(mask)  # flashc.attention's boolean mask is True where attending
    if mask is not None and nan_rows:
        # masked_fill(-inf) then softmax: a row with no visible key is NaN, which flashc.attention
        # keeps for an additive mask (a boolean one gives zeros there, as SDPA does)
        mask = aten.where.Scalar(mask, 0.0, float("-inf"))
    return flashc_ops.attention.default(q, k, v, mask, is_causal, float(scale))


def _default_scale(graph):  # scale left to SDPA: 1/sqrt(head size)
    nodes = [n for n in _nodes(graph, SDPA) if "scale" in n.kwargs]
    for n in nodes:
        n.kwargs = {k: v for k, v in n.kwargs.items() if k != "scale"}
    return bool(nodes)


def _grouped_query(graph):  # enable_gqa=True
    nodes = _nodes(graph, SDPA)
    for n in nodes:
        n.kwargs = {**n.kwargs, "enable_gqa": True}
    return bool(nodes)


def _scaled_products(graph):
    return [n for n in _nodes(graph, aten.mul.Tensor) if n.args[1] == SCALE]


def _scale_as_division(graph):  # scores / math.sqrt(d)
    muls = _scaled_products(graph)
    for n in muls:
        replace_with_call(graph, n, aten.div.Tensor, n.args)
    return bool(muls)


def _unscaled(graph):  # q scaled before (q * scale) @ k^T, or no scale at all (T5)
    muls = _scaled_products(graph)
    for n in muls:
        n.replace_all_uses_with(n.args[0])
        graph.erase_node(n)
    return bool(muls)


def _transposed(*dims):  # k.transpose(2, 3), k.transpose(-1, -2)
    def edit(graph):
        nodes = [n for n in _nodes(graph, aten.transpose.int) if tuple(n.args[1:]) == (-2, -1)]
        for n in nodes:
            n.args = (n.args[0], *dims)
        return bool(nodes)
    return edit


def _transposed_by_mT(graph):  # k.mT
    nodes = [n for n in _nodes(graph, aten.transpose.int) if tuple(n.args[1:]) == (-2, -1)]
    for n in nodes:
        replace_with_call(graph, n, aten.mT.default, (n.args[0],))
    return bool(nodes)


def _plain_softmaxes(graph):
    return [n for n in _nodes(graph, aten.softmax.int) if len(n.args) == 2 and n.args[0].target != aten.to.dtype]


def _softmax_in_float32(graph):  # F.softmax(scores.float(), dim=-1).type_as(q), as Meta's Llama
    q = _placeholder(graph, "q")
    nodes = _plain_softmaxes(graph)
    for n in nodes:
        with graph.inserting_before(n):
            up = graph.call_function(aten.to.dtype, (n.args[0], torch.float32))
        n.args = (up, *n.args[1:])
        with graph.inserting_after(n):
            back = graph.call_function(aten.type_as.default, (n, q))
        n.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
    return bool(nodes)


def _softmax_to_float32(graph):  # softmax(scores, dim=-1, dtype=torch.float32), as Hugging Face's eager attention
    nodes = _plain_softmaxes(graph)
    for n in nodes:
        n.args = (*n.args, torch.float32)
    return bool(nodes)


def _mask_of_masked(graph):  # masked_fill(mask == 0, -inf): any boolean, True where masked
    nodes = _nodes(graph, aten.bitwise_not.default)
    for n in nodes:
        n.replace_all_uses_with(n.args[0])
        graph.erase_node(n)
    return bool(nodes)


_WRITTEN_SPELLINGS = (_scale_as_division, _unscaled, _transposed(2, 3), _transposed(-1, -2), _transposed_by_mT,
                      _softmax_in_float32, _softmax_to_float32)


def _attention_shapes_refusal(q, k, v) -> str | None:
    """Why q, k, v are not what flashc.attention takes (None when they are): 4-D q, k, v of
    one batch, Hq a multiple of Hkv and one head size for queries, keys and values; not
    float64 (it computes scores in float32)."""
    shapes = f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
    if not q.dim() == k.dim() == v.dim() == 4:
        return f"{shapes}: flashc.attention takes 4-D [batch, heads, seq, head size]"
    if k.shape != v.shape:
        return f"{shapes}: k and v differ in shape (flashc.attention takes one head size for keys and values)"
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        return f"{shapes}: q and k differ in batch or head size"
    if q.shape[1] % k.shape[1]:
        return f"{shapes}: {q.shape[1]} query heads are no multiple of {k.shape[1]} KV heads"
    if q.dtype == torch.float64:
        return "q is float64; flashc.attention computes scores in float32"
    return None


def _broadcasts_to(shape, target) -> bool:
    """Whether `shape` broadcasts to `target` without growing it."""
    return len(shape) <= len(target) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


def _is_causal_mask(value: torch.Tensor, blocks: bool, s: int, l: int) -> bool:
    """Whether a constant mask is flashc's causal mask (aligned bottom-right): boolean (True
    where attending, or where masked when `blocks`) or additive (0 and -inf)."""
    if value.device.type == "meta" or tuple(value.shape[-2:]) != (s, l):
        return False  # a meta-device model has no values to compare
    causal = flashc.ops.causal_mask(s, l, value.device)
    if value.dtype == torch.bool:
        return bool(((~value if blocks else value) == causal).all())
    if value.is_floating_point() and not blocks:
        return bool((value == torch.where(causal, 0.0, float("-inf"))).all())
    return False


def _bind_mask(m: Match, blocks: bool) -> bool | str:
    """The mask must broadcast to [B, Hq, S, L] without growing the scores; a constant
    causal mask becomes is_causal; one of fewer dims is given leading 1s (flashc.attention
    reads a 4-D mask, as broadcasting did)."""
    q, k, mask = m.val("q"), m.val("k"), m.val("mask")
    s, l = q.shape[2], k.shape[2]
    if not _broadcasts_to(tuple(mask.shape), (q.shape[0], q.shape[1], s, l)):
        return f"the mask {list(mask.shape)} does not broadcast to the scores {[q.shape[0], q.shape[1], s, l]}"
    value = m.constant("mask")
    if value is not None and _is_causal_mask(value, blocks, s, l):
        m.bindings.update(mask=None, is_causal=True)
        return True
    if mask.dim() < 4:
        m.bindings["mask_shape"] = [1] * (4 - mask.dim()) + list(mask.shape)
    m.bindings["mask_blocks"] = blocks
    return True


def _check_sdpa(m: Match) -> bool | str:
    """Shapes fit; no scale means SDPA's 1/sqrt(head size); torch's is_causal is aligned
    top-left, the same as flashc's only when S == L; a mask is boolean or additive in
    SDPA as in flashc.attention, with enable_gqa or not (both read KV head h // n)."""
    q, k, v = m.val("q"), m.val("k"), m.val("v")
    why = _attention_shapes_refusal(q, k, v)
    if why:
        return why
    (node,) = m.covered(SDPA)
    m.bindings.setdefault("scale", 1.0 / math.sqrt(q.shape[-1]))
    if len(node.args) > 5 and node.args[5] is True:
        if q.shape[2] != k.shape[2]:
            return (f"is_causal with {q.shape[2]} queries over {k.shape[2]} keys: torch aligns its causal mask "
                    "top-left, flashc bottom-right, the same only when the two are equal")
        m.bindings["is_causal"] = True
    return _bind_mask(m, blocks=False) if "mask" in m.bindings else True


def _check_written_attention(m: Match) -> bool | str:
    """Shapes fit; the transpose swaps k's last two dims; the scale is the product's factor,
    the reciprocal of the divisor, or 1 without either; the softmax in float32 casts back
    to q's dtype, which k and v share; an additive mask is a float (a boolean added adds
    1), masked_fill's is boolean (masked where True, or attending where True under ~)."""
    q, k, v = m.val("q"), m.val("k"), m.val("v")
    why = _attention_shapes_refusal(q, k, v)
    if why:
        return why
    (transpose,) = m.covered(aten.transpose.int) + m.covered(aten.mT.default)
    if transpose.args[0] is not m.bindings["k"]:
        return f"the transposed operand {transpose.args[0].name} is not k"
    if transpose.target == aten.transpose.int and {d % 4 for d in transpose.args[1:3]} != {2, 3}:
        return f"k is transposed in dims {list(transpose.args[1:3])}, not its last two"
    scale = m.bindings.get("scale", 1.0)
    if m.covered(aten.div.Tensor):
        if scale == 0:
            return "the scores are divided by 0"
        scale = 1.0 / scale
    m.bindings["scale"] = float(scale)
    if m.covered(aten.type_as.default) and not q.dtype == k.dtype == v.dtype:
        return f"q, k, v are {q.dtype}, {k.dtype}, {v.dtype}: the softmax casts back to q's dtype, not theirs"
    if any(len(n.args) > 2 for n in m.covered(aten.softmax.int)) and q.dtype != torch.float32:
        # softmax to float32 without a cast back: float32 all through
        return f"the softmax computes in float32 and is not cast back to q's {q.dtype}"
    if "mask" not in m.bindings:
        return True
    mask = m.val("mask")
    if m.covered(aten.masked_fill.Scalar):
        m.bindings["nan_rows"] = True
        if mask.dtype != torch.bool:
            return f"masked_fill's mask is {mask.dtype}, not boolean"
        return _bind_mask(m, blocks=not m.covered(aten.bitwise_not.default))
    if not mask.is_floating_point():
        return f"the mask added to the scores is {mask.dtype} (adding a boolean adds 1), not an additive float mask"
    return _bind_mask(m, blocks=False)


# --- Attention: grouped-query repeats of K and V ---

def _repeat_kv(x, n_rep):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def attention_repeat_kv_pattern(q, k, v, mask, scale):
    """K and V repeated per query head as Hugging Face's repeat_kv does."""
    n_rep = q.shape[1] // k.shape[1]
    return flashc_ops.attention.default(q, _repeat_kv(k, n_rep), _repeat_kv(v, n_rep), mask, False, scale)


def attention_repeat_interleave_pattern(q, k, v, mask, scale, n_rep):
    """K and V repeated by repeat_interleave (traced with n = 2; the N_REP variant takes any n)."""
    n = q.shape[1] // k.shape[1]
    return flashc_ops.attention.default(q, k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1),
                                        mask, False, scale)


def _without_mask(is_causal: bool):  # attention(..., None, is_causal, scale)
    def edit(graph):
        nodes = [n for n in _nodes(graph, flashc_ops.attention.default) if n.args[3] is not None]
        for n in nodes:
            n.args = (*n.args[:3], None, is_causal, *n.args[5:])
        if nodes:
            graph.erase_node(_placeholder(graph, "mask"))
        return bool(nodes)
    return edit


def _heads_flattened(graph):  # .flatten(1, 2) for .reshape(b, h * n, s, d)
    nodes = _nodes(graph, aten.reshape.default)
    for n in nodes:
        replace_with_call(graph, n, aten.flatten.using_ints, (n.args[0], 1, 2))
    return bool(nodes)


def _any_repeat_count(graph):
    nodes = _nodes(graph, aten.repeat_interleave.self_int)
    for n in nodes:
        n.args = (n.args[0], N_REP, *n.args[2:])
    return bool(nodes)


def _check_repeated_kv(m: Match) -> bool | str:
    """K and V ([B, Hkv, L, D] each) are repeated n = Hq / Hkv times in repeat_interleave's
    order: [B, Hkv, 1, L, D] expanded to [B, Hkv, n, L, D], then Hkv and n flattened (or
    repeat_interleave(n, dim=1)), so query head h reads KV head h // n as in
    flashc.attention. A tiled repeat (k.repeat(1, n, 1, 1), or the new dim before the
    heads) gives the other order and no match."""
    q, k, v = m.val("q"), m.val("k"), m.val("v")
    if k.dim() != 4 or k.shape != v.shape or q.dim() != 4 or q.shape[1] % k.shape[1]:
        return (f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}: not 4-D, k and v differ, or the "
                "query heads are no multiple of the KV heads")
    b, hkv, l, d = k.shape
    n = q.shape[1] // hkv
    for node in m.covered(aten.unsqueeze.default):
        if node.args[1] != 2:
            return (f"{node.name} inserts the repeat dim at {node.args[1]}, not after the heads: that tiles the "
                    "heads, where flashc.attention reads KV head h // n for query head h")
    for node in m.covered(aten.expand.default):
        if _val_shape(node) != (b, hkv, n, l, d):
            return f"{node.name} expands to {list(_val_shape(node) or ())}, not {[b, hkv, n, l, d]}"
    repeated = (m.covered(aten.reshape.default) + m.covered(aten.flatten.using_ints)
                + m.covered(aten.repeat_interleave.self_int))
    if len(repeated) != 2 or any(_val_shape(node) != (b, hkv * n, l, d) for node in repeated):
        shapes = [list(_val_shape(node) or ()) for node in repeated]
        return f"K and V are repeated to {shapes}, not twice {[b, hkv * n, l, d]}"
    for node in m.covered(aten.repeat_interleave.self_int):
        if node.args[1] != n or node.args[2] not in (1, -3) or node.kwargs.get("output_size") not in (None, hkv * n):
            return f"{node.name} repeats {node.args[1]} times along dim {node.args[2]}; the heads need {n} along dim 1"
    (attention,) = m.covered(flashc_ops.attention.default)
    m.bindings.pop("n_rep", None)
    m.bindings.update(mask=m.bindings.get("mask"), is_causal=attention.args[4])
    return True


def _qkv_examples(dt, hq=4, hkv=2):
    return (_x(dt, 1, hq, 5, 8), _x(dt, 1, hkv, 5, 8), _x(dt, 1, hkv, 5, 8))


def _mask_example():
    return torch.ones(1, 1, 5, 5, dtype=torch.bool)


def _attention_rule(pattern, examples, check, scalars=None, variants=None, name="attention", shape_literals=False):
    return _rule(name, pattern, attention_replacement, example_inputs=examples,
                 scalars=scalars or {"scale": SCALE}, check=check, any_shape_literals=shape_literals,
                 dtypes=ANY_DTYPE, variants=variants)


_SDPA_SPELLINGS = _spellings(_default_scale, _grouped_query)
_WITHOUT_MASK = (_without_mask(True), _without_mask(False))

FUSE_ATTENTION = [
    _attention_rule(sdpa_mask_pattern, lambda dt: (*_qkv_examples(dt, 2, 2), _mask_example()), _check_sdpa,
                    variants=_SDPA_SPELLINGS),
    _attention_rule(sdpa_causal_pattern, lambda dt: _qkv_examples(dt, 2, 2), _check_sdpa,
                    variants=_SDPA_SPELLINGS),
    _attention_rule(sdpa_pattern, lambda dt: _qkv_examples(dt, 2, 2), _check_sdpa, variants=_SDPA_SPELLINGS),
    _attention_rule(attention_pattern, lambda dt: (*_qkv_examples(dt, 2, 2), _x(dt, 1, 1, 5, 5)),
                    _check_written_attention, variants=_spellings(*_WRITTEN_SPELLINGS)),
    _attention_rule(attention_masked_fill_pattern, lambda dt: (*_qkv_examples(dt, 2, 2), _mask_example()),
                    _check_written_attention, variants=_spellings(_mask_of_masked, *_WRITTEN_SPELLINGS)),
    _attention_rule(attention_unmasked_pattern, lambda dt: _qkv_examples(dt, 2, 2), _check_written_attention,
                    variants=_spellings(*_WRITTEN_SPELLINGS)),
    # then the grouped-query repeats of K and V
    _attention_rule(attention_repeat_kv_pattern, lambda dt: (*_qkv_examples(dt), _mask_example()),
                    _check_repeated_kv, name="gqa_repeats_removed", shape_literals=True,
                    variants=_spellings(_heads_flattened, *_WITHOUT_MASK)),
    _attention_rule(attention_repeat_interleave_pattern, lambda dt: (*_qkv_examples(dt), _mask_example()),
                    _check_repeated_kv, scalars={"scale": SCALE, "n_rep": N_REP}, name="gqa_repeats_removed",
                    variants=_spellings(_any_repeat_count, *_WITHOUT_MASK)),
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

    @property
    def explains(self) -> tuple[str, ...]:
        """The rule names `explain` takes."""
        return tuple(dict.fromkeys(rule.name for rule in self.rules))

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        return self._run(program)

    def explain(self, program: Program, ctx: PassContext, name: str) -> list[Candidate]:
        """Run the pass as `run` does and return the candidates of the rules called `name`,
        each explained on the graph as it is when that rule runs (after the rules before it).
        The ops that one of these rules put in place are not candidates of the next ones."""
        found: list[Candidate] = []
        self._run(program, name, found)
        return nearest(found)

    def _run(self, program: Program, explain: str | None = None, found: list | None = None) -> PassResult:
        stats: dict[str, int] = {}
        places: set[fx.Node] | None = None  # the graph's nodes before the first rule explained
        covered: set[fx.Node] = set()  # nodes a rule explained fused (replaced)
        for rule in self.rules:
            if rule.name == explain:
                places = set(program.graph.nodes) if places is None else places
                outcomes = explain_matches(rule, program.graph, program.params)
                replaced = iter(replace_matches(program.graph, [o for o in outcomes if isinstance(o, Match)]))
                outcomes = [next(replaced) if isinstance(o, Match) else o for o in outcomes]
                covered.update(n for o in outcomes if isinstance(o, Match) for n in o.nodes)
                found += [c for c in candidates_of(rule, outcomes) if c.node in places]
                n = sum(isinstance(o, Match) for o in outcomes)
            else:
                n = apply_rule(rule, program.graph, program.params)
            stats[rule.name] = stats.get(rule.name, 0) + n
            # later rules read shapes of the nodes this one created; apply_rule infers them
            # locally and the whole graph is re-propagated only where that failed
            if n and any(node.meta.get("val") is None for node in program.op_nodes()):
                propagate_shapes(program)
        program.graph.eliminate_dead_code()
        program.drop_unused_params()
        if found is not None:  # a place one form's rule refused inside another form's match is no miss
            found[:] = [c for c in found if c.fused or c.node not in covered]
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


def _check_moe(m: Match) -> bool | str:
    x, r, gu, dn = (m.val(n) for n in ("x", "router_weight", "gate_up", "down"))
    e, h = r.shape
    if (x.shape[-1] != h or gu.shape[0] != e or gu.shape[2] != h or dn.shape[:2] != (e, h)
            or gu.shape[1] != 2 * dn.shape[2]):
        return (f"the weights (router {list(r.shape)}, gate_up {list(gu.shape)}, down {list(dn.shape)}) are not "
                f"{e} experts' of a gated MLP over x {list(x.shape)}")
    topk = m.covered(aten.topk.default)
    if len(topk) != 1:
        return f"{len(topk)} top-k selections of experts, not one"
    # expert-count literals (bins of the histogram, bounds of the expert index) must
    # be this model's E: the pattern matched them as wildcards
    for node in m.covered(aten.histc.default):
        if node.args[1] != e or node.args[3] != e - 1:
            return f"{node.name} counts tokens in {node.args[1]} bins up to {node.args[3]}, for {e} experts"
    for node in m.covered(aten.ge.Scalar):
        if node.args[1] != e:
            return f"{node.name} compares expert ids with {node.args[1]}, for {e} experts"
    for node in m.covered(aten.clamp_.default) + m.covered(aten.clamp.default):
        if node.args[2] != e - 1:
            return f"{node.name} clamps expert ids to {node.args[2]}, for {e} experts"
    m.bindings["top_k"] = int(topk[0].args[1])
    m.bindings["shape"] = list(x.shape)
    return True


def _moe_examples(dt):
    # Called before the pattern is traced: import transformers' Mixtral code now. Imported
    # for the first time inside torch.export's trace, the model output classes it defines
    # (CausalLMOutputWithPast, ...) stay unknown to pytree, and every later capture of a
    # transformers model in the process fails.
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401

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


FUSE_MOE = _rule("moe", mixtral_moe_pattern, mixtral_moe_replacement, example_inputs=_moe_examples,
                 check=_check_moe, any_shape_literals=True, variants=_moe_on_gpu)

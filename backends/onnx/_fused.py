"""Lowerings of flashc's fused ops: ONNX Runtime's fused kernels where they compute
the same thing, standard ONNX ops otherwise.

* rms_norm -> ONNX RMSNormalization (opset >= 23), when x and weight share a dtype.
* add_rms_norm -> com.microsoft SkipSimplifiedLayerNormalization (outputs the sum too),
  when x, residual and weight share a dtype and x has the residual's shape.
* rotary -> com.microsoft RotaryEmbedding (rotate-half, BNSH input), when cos/sin are
  constants with one table for the batch whose two halves are equal (HF's layout), or,
  for a decode step's one token, functions of cache_position: the tables then hold them
  evaluated at every cache slot, and cache_position is the position id.
* rotary_interleaved -> the same with interleaved=1 (pairs 2i, 2i + 1), when both
  entries of every pair of the tables are equal (one angle per pair).
* attention -> com.microsoft GroupQueryAttention, for prefill: no mask, causal,
  S == L, fp32/fp16. Masked, non-causal or S != L attention uses standard ops
  (MatMul/Softmax, GQA by broadcasting, never repeating K/V).
* decode_attention -> com.microsoft GroupQueryAttention with past/present KV, for one
  new token (fp32/fp16) whose key and value are written into input caches right before
  (index_copy_ at cache_position): the op writes them itself and attends only over the
  live positions 0..cache_position. Otherwise standard ops with the mask
  j <= cache_position[s] (Range/LessOrEqual) over the whole cache.
* swiglu, geglu, moe, moe_sparse -> standard ops (Sigmoid/Gelu; MoE as dense TopK-weighted experts).
* sparsify, predicted_sparsify (online pruning's masks) -> Abs/Greater/Where and MatMul/MatMul/
  Greater/Where: the masked values are computed, nothing is skipped (ORT has no sparse GEMV).

With contrib_ops=False every flashc op takes its standard-op form.

Why RMSNormalization and not ORT's SimplifiedLayerNormalization: ORT registers the
latter in the *ONNX* domain, so `onnx.checker` rejects every model that uses it ("No Op
registered for SimplifiedLayerNormalization"); ONNX's own RMSNormalization (opset 23)
runs on ORT's fused kernel and passes the checker. Its spec matches flashc.rms_norm
(normalise in fp32, cast to x's dtype, then scale). Below opset 23 the decomposed form
is emitted and ORT's optimizer fuses it back at load.

Precision caveats (fp16/bf16 only; fp32 agrees to rounding): ORT's fused norm kernels
multiply by the weight in fp32 and round once, where flashc rounds the normalised value
to x's dtype first; SkipSimplifiedLayerNormalization also normalises the fp32 sum
before rounding it. Both differ from flashc by at most an ulp or two of fp16.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from flashc.ir import function_of_one_input, upstream

from ._aten import silu
from ._builder import MS_DOMAIN
from ._lowering import LoweringContext, annotate, causal_mask_value, lowerings_into

# OpOverload -> lowering, for the ops this module lowers (joined in backends/onnx/table.py)
LOWERINGS: dict = {}
lowers = lowerings_into(LOWERINGS)

flashc_ops = torch.ops.flashc
aten = torch.ops.aten
# ONNX Runtime's GroupQueryAttention refuses other head sizes at run time ("head_size must
# be a multiple of 8"); those take the standard-op attention.
GQA_HEAD_SIZE_MULTIPLE = 8

# --- RMSNorm -----------------------------------------------------------------------------


def _rms_norm_standard(ctx: LoweringContext, x, x_dtype, w, w_dtype, eps, out_dtype):
    """flashc.rms_norm step by step: fp32 normalise, cast to x's dtype, scale by w.

    Spelled Pow/ReduceMean/Add/Sqrt/Div/Mul, the pattern ORT's optimizer fuses into its
    SimplifiedLayerNormalization kernel at load (x / sqrt(.) rather than x * rsqrt(.):
    an ulp apart in fp32).
    """
    b = ctx.b
    xf = b.cast(x, x_dtype, torch.float32)
    ms = b.op("ReduceMean", b.op("Pow", xf, b.scalar(2.0, torch.float32)), b.ints([-1]), keepdims=1)
    normed = b.op("Div", xf, b.op("Sqrt", b.op("Add", ms, b.scalar(eps, torch.float32))))
    normed = b.cast(normed, torch.float32, x_dtype)
    return b.op("Mul", b.cast(normed, x_dtype, out_dtype), b.cast(w, w_dtype, out_dtype))


def _per_channel(ctx, w, x) -> bool:
    """Whether the norm weight is one value per channel [D], the only shape the fused kernels take
    (ORT's SkipSimplifiedLayerNormalization refuses a 2-D gamma at run time)."""
    return ctx.shape(w) == ctx.shape(x)[-1:]


@lowers(flashc_ops.rms_norm.default)
def _rms_norm(ctx, node):
    x, w, eps = node.args
    xd, wd, od = ctx.dtype(x), ctx.dtype(w), ctx.out_dtype(node)
    if ctx.contrib_ops and ctx.b.opset >= 23 and xd == wd == od and _per_channel(ctx, w, x):
        return ctx.b.op("RMSNormalization", ctx.v(x), ctx.v(w), axis=-1, epsilon=float(eps), stash_type=1)
    return _rms_norm_standard(ctx, ctx.v(x), xd, ctx.v(w), wd, eps, od)


@lowers(flashc_ops.add_rms_norm.default)
def _add_rms_norm(ctx, node):
    x, residual, w, eps = node.args
    normed_dt, sum_dt = (v.dtype for v in node.meta["val"])
    same = ctx.dtype(x) == ctx.dtype(residual) == ctx.dtype(w) == normed_dt == sum_dt
    if ctx.contrib_ops and same and ctx.shape(x) == ctx.shape(residual) and _per_channel(ctx, w, x):
        normed, _, _, total = ctx.b.op("SkipSimplifiedLayerNormalization", ctx.v(x), ctx.v(residual), ctx.v(w),
                                       domain=MS_DOMAIN, outputs=4, omit=(1, 2), epsilon=float(eps))
        return normed, total
    total = ctx.b.op("Add", ctx.tensor(x, sum_dt), ctx.tensor(residual, sum_dt))
    return _rms_norm_standard(ctx, total, sum_dt, ctx.v(w), ctx.dtype(w), eps, normed_dt), total


# --- Rotary embedding ---------------------------------------------------------------------


def _half_table(t: torch.Tensor, d: int, interleaved: bool = False) -> torch.Tensor | None:
    """t [B, S, D] as a RotaryEmbedding table [S, D/2], or None: every batch row must be the
    same (the op takes one table and position ids) and both channels of every pair must
    have the same entry: both halves repeat the frequencies (the rotate-half layout), or
    with `interleaved` channels 2i and 2i + 1 do."""
    if t.dim() != 3 or t.shape[2] != d or d % 2 or not torch.equal(t, t[:1].expand_as(t)):
        return None
    first, second = (t[0, :, 0::2], t[0, :, 1::2]) if interleaved else (t[0, :, : d // 2], t[0, :, d // 2:])
    return first if torch.equal(first, second) else None


def _position_tables(ctx: LoweringContext, cos, sin):
    """(position input, cos table, sin table) when cos and sin [B, 1, D] are functions of one
    position input [1] and weights, and the program bounds that input (a decode step's
    cache_position: meta.input_high): both evaluated at every position 0..bound-1 and
    stacked [B, bound, D]. None otherwise. Evaluated once per (cos, sin)."""
    key = ("position_tables", cos, sin)
    if key in ctx.cache:
        return ctx.cache[key]
    ctx.cache[key] = None
    if ctx.state & upstream([cos, sin]):  # they read state the graph writes: not a function of the input
        return None
    found = function_of_one_input(ctx.program, [cos, sin])
    if found is None:
        return None
    position, evaluate = found
    bound = ctx.program.meta.input_high.get(position.name)
    val = position.meta.get("val")
    if bound is None or val is None or tuple(val.shape) != (1,) or val.dtype not in (torch.int32, torch.int64):
        return None
    try:
        rows = [evaluate(torch.tensor([p], dtype=val.dtype)) for p in range(bound)]
    except Exception:  # an op that cannot run here on real tensors: keep the standard form
        return None
    ctx.cache[key] = (position, torch.cat([c for c, _ in rows], 1), torch.cat([s for _, s in rows], 1))
    return ctx.cache[key]


def _rotary_tables(ctx, cos, sin, x, interleaved=False):
    """(position ids, cos_cache, sin_cache) for RotaryEmbedding, or None when the inputs do not fit.

    cos/sin [B, S, D] are constants (positions 0..S-1), or, for one token, functions of a
    bounded position input (`_position_tables`; the position ids are that input).
    """
    xs = ctx.shape(x)
    if len(xs) != 4 or ctx.dtype(cos) != ctx.dtype(x) or ctx.dtype(sin) != ctx.dtype(x):
        return None
    batch, _, seq, d = xs
    c, s, position = ctx.param(cos), ctx.param(sin), None
    if c is None or s is None:
        found = _position_tables(ctx, cos, sin) if seq == 1 else None
        if found is None:
            return None
        position, c, s = found
    elif c.shape[1] != seq:
        return None
    half_c, half_s = _half_table(c, d, interleaved), _half_table(s, d, interleaved)
    if half_c is None or half_s is None:
        return None
    b = ctx.b
    if position is None:
        positions = b.const(torch.arange(seq).expand(batch, seq), torch.int64)
    else:
        key = ("position_ids", position, batch)
        if key not in ctx.cache:
            ctx.cache[key] = b.op("Expand", b.reshape(ctx.tensor(position, torch.int64), [1, 1]), b.ints([batch, 1]))
        positions = ctx.cache[key]
    return positions, b.const(half_c, c.dtype), b.const(half_s, s.dtype)


def _rotate_pairs(b, xv, shape):
    """flashc.ops.rotate_pairs in standard ops: x [B, H, S, D] as pairs [B, H, S, D/2, 2],
    (-odd, even) concatenated along the pairs' dim, back to [B, H, S, D]."""
    *lead, d = shape
    pairs = b.reshape(xv, [*lead, d // 2, 2])
    swapped = b.op("Concat", b.op("Neg", b.slice(pairs, 4, 1, 2)), b.slice(pairs, 4, 0, 1), axis=4)
    return b.reshape(swapped, [*lead, d])


def _lower_rotary(ctx, node, interleaved: bool):
    x, cos, sin = node.args
    b = ctx.b
    out_dt = ctx.out_dtype(node)
    tables = _rotary_tables(ctx, cos, sin, x, interleaved) if ctx.contrib_ops and out_dt == ctx.dtype(x) else None
    d = ctx.shape(x)[3]
    if tables is not None:
        return b.op("RotaryEmbedding", ctx.v(x), *tables, domain=MS_DOMAIN, interleaved=int(interleaved))
    xv = ctx.tensor(x, out_dt)
    cb, cs, cd = ctx.shape(cos)
    c = b.reshape(ctx.tensor(cos, out_dt), [cb, 1, cs, cd])
    s = b.reshape(ctx.tensor(sin, out_dt), [cb, 1, cs, cd])
    if interleaved:
        rotated = _rotate_pairs(b, xv, ctx.shape(x))
    else:
        rotated = b.op("Concat", b.op("Neg", b.slice(xv, 3, d // 2, d)), b.slice(xv, 3, 0, d // 2), axis=3)
    return b.op("Add", b.op("Mul", xv, c), b.op("Mul", rotated, s))


@lowers(flashc_ops.rotary.default)
def _rotary(ctx, node):
    return _lower_rotary(ctx, node, interleaved=False)


@lowers(flashc_ops.rotary_interleaved.default)
def _rotary_interleaved(ctx, node):
    return _lower_rotary(ctx, node, interleaved=True)


# --- Gated activations ------------------------------------------------------------------------

@lowers(flashc_ops.swiglu.default)
def _swiglu(ctx, node):
    """silu(gate) * up, each rounded to the dtype as the reference rounds it."""
    dt = ctx.out_dtype(node)
    gate, up = node.args
    return ctx.b.op("Mul", silu(ctx, ctx.tensor(gate, dt), dt), ctx.tensor(up, dt))


@lowers(flashc_ops.geglu.default)
def _geglu(ctx, node):
    dt = ctx.out_dtype(node)
    gate, up = (ctx.tensor(a, dt) for a in node.args[:2])
    return ctx.b.op("Mul", ctx.b.op("Gelu", gate, approximate=node.args[2]), up)


# --- Attention --------------------------------------------------------------------------------


def attention_standard(ctx: LoweringContext, q, k, v, mask, causal, scale: float, safe_softmax: bool = False):
    """softmax(q k^T * scale + mask) v in standard ops, grouped-query heads without repeating K/V.

    safe_softmax: a row with every key masked gets probabilities 0 (PyTorch's
    scaled_dot_product_attention), instead of NaN (flashc.attention's reference).

    q [B, Hq, S, D] is viewed as [B, Hkv, G, S, D] and K/V as [B, Hkv, 1, L, D], so MatMul
    broadcasting shares each KV head across its G query heads. Scores and softmax are
    fp32 (as flashc.attention). mask: None or (value, dtype, rank); a 4-D mask is
    expanded to [B, Hq, S, L] and regrouped, lower ranks broadcast as they are.
    causal: None or a bool [S, L] value (True = attend).
    """
    b = ctx.b
    bsz, hq, s, d = ctx.shape(q)
    hkv, l, dv = ctx.shape(k)[1], ctx.shape(k)[2], ctx.shape(v)[3]
    g = hq // hkv
    qv, kv, vv = ctx.v(q), ctx.v(k), ctx.v(v)
    if g > 1:
        qv = b.reshape(qv, [bsz, hkv, g, s, d])
        kv = b.reshape(kv, [bsz, hkv, 1, l, d])
        vv = b.reshape(vv, [bsz, hkv, 1, l, dv])
    kt = b.transpose(kv, [0, 1, 2, 4, 3] if g > 1 else [0, 1, 3, 2])
    scores = b.cast(b.op("MatMul", qv, kt), ctx.dtype(q), torch.float32)
    scores = b.op("Mul", scores, b.scalar(scale, torch.float32))
    neg_inf = b.scalar(float("-inf"), torch.float32)
    if mask is not None:
        m, m_dtype, rank = mask
        if rank == 4 and g > 1:
            m = b.reshape(b.op("Expand", m, b.ints([bsz, hq, s, l])), [bsz, hkv, g, s, l])
        if m_dtype == torch.bool:
            scores = b.op("Where", m, scores, neg_inf)
        else:
            scores = b.op("Add", scores, b.cast(m, m_dtype, torch.float32))
    if causal is not None:
        scores = b.op("Where", causal, scores, neg_inf)
    probs = b.op("Softmax", scores, axis=-1)
    if safe_softmax and (mask is not None or causal is not None):
        none_seen = b.op("Equal", b.op("ReduceMax", scores, b.ints([-1]), keepdims=1), neg_inf)
        probs = b.op("Where", none_seen, b.scalar(0.0, torch.float32), probs)
    probs = b.cast(probs, torch.float32, ctx.dtype(v))
    out = b.op("MatMul", probs, vv)
    return b.reshape(out, [bsz, hq, s, dv]) if g > 1 else out


def _gqa_fits(ctx, q, k, v, mask, is_causal) -> bool:
    qs, ks, vs = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    dtypes = {ctx.dtype(q), ctx.dtype(k), ctx.dtype(v)}
    return (mask is None and is_causal and qs[2] == ks[2] and len(dtypes) == 1
            and dtypes <= {torch.float32, torch.float16} and qs[3] == ks[3] == vs[3]
            and qs[3] % GQA_HEAD_SIZE_MULTIPLE == 0 and qs[1] % ks[1] == 0 and ks == vs)


@lowers(flashc_ops.attention.default)
def _attention(ctx, node):
    q, k, v, mask, is_causal, scale = node.args
    b = ctx.b
    if ctx.contrib_ops and _gqa_fits(ctx, q, k, v, mask, is_causal):
        bsz, hq, s, d = ctx.shape(q)
        hkv = ctx.shape(k)[1]

        def packed(x, heads):  # [B, H, S, D] -> [B, S, H * D]
            return b.reshape(b.transpose(ctx.v(x), [0, 2, 1, 3]), [bsz, s, heads * d])

        seqlens_k = b.const([s - 1] * bsz, torch.int32)  # prefill: every row sees all S keys
        total = b.scalar(s, torch.int32)
        out, _, _ = b.op("GroupQueryAttention", packed(q, hq), packed(k, hkv), packed(v, hkv), None, None,
                         seqlens_k, total, domain=MS_DOMAIN, outputs=3, num_heads=hq, kv_num_heads=hkv,
                         scale=float(scale))
        return b.transpose(b.reshape(out, [bsz, s, hq, d]), [0, 2, 1, 3])
    s, l = ctx.shape(q)[2], ctx.shape(k)[2]
    mask_v = None if mask is None else (ctx.v(mask), ctx.dtype(mask), len(ctx.shape(mask)))
    causal = causal_mask_value(ctx, s, l, l - s) if is_causal else None
    return attention_standard(ctx, q, k, v, mask_v, causal, scale)


# --- Decode attention (a static KV cache) ---------------------------------------------------


def _decode_mask_value(ctx: LoweringContext, cache_position, length: int):
    """A bool [S, L] mask, True where key j <= cache_position[s] (flashc.ops.decode_mask); built once."""
    key = ("decode_mask", cache_position, length)
    if key not in ctx.cache:
        b = ctx.b
        s = ctx.shape(cache_position)[0]
        keys = b.op("Range", b.scalar(0, torch.int64), b.scalar(length, torch.int64), b.scalar(1, torch.int64))
        positions = b.reshape(ctx.tensor(cache_position, torch.int64), [s, 1])
        ctx.cache[key] = b.op("LessOrEqual", b.reshape(keys, [1, length]), positions)
    return ctx.cache[key]


def _cache_write(ctx: LoweringContext, arg, cache_position):
    """arg when it is `cache.index_copy_(2, cache_position, new)` of one new token into an input
    cache that nothing else reads, and whose result only this attention reads; else None."""
    if not (isinstance(arg, fx.Node) and arg.target == aten.index_copy_.default and len(arg.users) == 1):
        return None
    cache, dim, index, new = arg.args
    if index is not cache_position or dim not in (2, -2) or len(cache.users) != 1:
        return None
    if cache.op != "placeholder" or cache.name in ctx.program.params:
        return None
    if ctx.shape(new)[2] != 1 or ctx.dtype(new) != ctx.dtype(cache):
        return None
    return arg


def _gqa_decode_writes(ctx: LoweringContext, node):
    """(k write, v write), the cache writes a GroupQueryAttention performs in place of this
    decode_attention and the index_copy_ nodes before it, or None when it does not fit."""
    q, k, v, cache_position, _ = node.args
    if not ctx.contrib_ops:
        return None
    qs, ks = ctx.shape(q), ctx.shape(k)
    dtypes = {ctx.dtype(q), ctx.dtype(k), ctx.dtype(v)}
    if (qs[2] != 1 or ctx.shape(cache_position) != [1] or len(dtypes) != 1
            or not dtypes <= {torch.float32, torch.float16} or ks != ctx.shape(v) or qs[3] != ks[3]
            or qs[3] % GQA_HEAD_SIZE_MULTIPLE or qs[1] % ks[1]):
        return None
    writes = (_cache_write(ctx, k, cache_position), _cache_write(ctx, v, cache_position))
    if None in writes or writes[0].args[0] is writes[1].args[0]:
        return None
    return writes


def absorbed_cache_write(ctx: LoweringContext, node) -> bool:
    """Whether this index_copy_ is a cache write that the GroupQueryAttention reading it performs."""
    users = list(node.users)
    return (len(users) == 1 and users[0].target == flashc_ops.decode_attention.default
            and node in (_gqa_decode_writes(ctx, users[0]) or ()))


@lowers(flashc_ops.decode_attention.default)
def _decode_attention(ctx, node):
    """GroupQueryAttention over past/present caches when it fits, else standard ops with the decode mask.

    GroupQueryAttention gets the new token's key and value and the input caches as
    past_key/past_value; seqlens_k = cache_position (per sequence: the index of its
    last key) and total_sequence_length = cache_position + 1. Its present outputs
    become the caches' values from here on (the graph's `present.*` outputs). When
    present and past share one buffer (the flashc runtime binds them so) it writes
    the new token alone; given separate buffers, ORT's CPU kernel copies positions
    0..cache_position into present and zeroes the slots after them.
    """
    q, k, v, cache_position, scale = node.args
    writes = _gqa_decode_writes(ctx, node)
    if writes is None:
        mask = _decode_mask_value(ctx, cache_position, ctx.shape(k)[2])
        return attention_standard(ctx, q, k, v, None, mask, scale)
    b = ctx.b
    bsz, hq, _, d = ctx.shape(q)
    hkv = ctx.shape(k)[1]
    (k_cache, _, _, k_new), (v_cache, _, _, v_new) = (w.args for w in writes)
    position = b.cast(ctx.v(cache_position), ctx.dtype(cache_position), torch.int32)
    seqlens_k = b.op("Expand", position, b.ints([bsz]))
    total = b.reshape(b.op("Add", position, b.scalar(1, torch.int32)), [])
    # [B, H, 1, D] -> [B, 1, H * D]: one token, so a reshape is the BNSH -> BSNH transpose
    out, present_k, present_v = b.op(
        "GroupQueryAttention", b.reshape(ctx.v(q), [bsz, 1, hq * d]), b.reshape(ctx.v(k_new), [bsz, 1, hkv * d]),
        b.reshape(ctx.v(v_new), [bsz, 1, hkv * d]), ctx.v(k_cache), ctx.v(v_cache), seqlens_k, total,
        domain=MS_DOMAIN, outputs=3, num_heads=hq, kv_num_heads=hkv, scale=float(scale))
    for write, cache, present in ((writes[0], k_cache, present_k), (writes[1], v_cache, present_v)):
        annotate(present, cache.meta["val"])
        ctx.values[write] = ctx.values[cache] = present  # the cache after the write, for later readers
    return b.reshape(out, [bsz, hq, 1, d])


# --- Mixture of experts -----------------------------------------------------------------------


def _expert_weight_t(ctx, w):
    """An expert weight [E, A, B] as [E, B, A]: a transposed initializer when it is a constant."""
    t = ctx.param(w)
    if t is not None and all(u.target in (flashc_ops.moe.default, flashc_ops.moe_sparse.default) for u in w.users):
        key = ("expert_weight_t", w)
        if key not in ctx.cache:
            ctx.cache[key] = ctx.b.weight(f"{w.name}_t", t.detach().transpose(1, 2).contiguous())
        return ctx.cache[key]
    return ctx.b.transpose(ctx.v(w), [0, 2, 1])


@lowers(flashc_ops.moe.default, flashc_ops.moe_sparse.default)
def _moe(ctx, node):
    """Dense top-k MoE: every expert runs on every token, weighted by a scattered routing matrix
    (flashc.moe_sparse: each expert's intermediate sparsified by the threshold first).

    Exact (the unrouted experts get weight 0) and static-shaped, at E/top_k times the
    routed FLOPs: correctness first; a gather-based version is a later optimisation.
    """
    x, logits, gate_up, down, top_k, normalize, *threshold = node.args
    b = ctx.b
    dt = ctx.dtype(x)
    t = ctx.shape(x)[0]
    e, f = ctx.shape(down)[0], ctx.shape(down)[2]
    probs = b.op("Softmax", ctx.tensor(logits, torch.float32), axis=-1)
    weights, experts = b.op("TopK", probs, b.ints([top_k]), axis=-1, largest=1, sorted=1, outputs=2)
    if normalize:
        weights = b.op("Div", weights, b.op("ReduceSum", weights, b.ints([-1]), keepdims=1))
    weights = b.cast(weights, torch.float32, dt)
    dense = b.op("ScatterElements", b.const(torch.zeros(t, e), dt), experts, weights, axis=1)  # [T, E]
    gu = b.op("MatMul", ctx.v(x), _expert_weight_t(ctx, gate_up))  # [T, H] x [E, H, 2F] -> [E, T, 2F]
    gate, up = b.slice(gu, 2, 0, f), b.slice(gu, 2, f, 2 * f)
    act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    if threshold:  # flashc.moe_sparse: the intermediate sparsified, act where |act| > threshold
        kept = b.op("Greater", b.op("Abs", act), ctx.tensor(threshold[0], dt))
        act = b.op("Where", kept, act, b.const(torch.zeros(()), dt))
    y = b.op("MatMul", act, _expert_weight_t(ctx, down))  # [E, T, F] x [E, F, H] -> [E, T, H]
    route = b.reshape(b.transpose(dense, [1, 0]), [e, t, 1])
    return b.op("ReduceSum", b.op("Mul", y, route), b.ints([0]), keepdims=0)


# --- Activation sparsity (online pruning) ----------------------------------------------------------


@lowers(flashc_ops.sparsify.default)
def _sparsify(ctx, node):
    """flashc.sparsify: x where |x| > threshold (0-d or per channel), else 0."""
    x, threshold = node.args
    b, dt = ctx.b, ctx.dtype(x)
    kept = b.op("Greater", b.op("Abs", ctx.v(x)), ctx.tensor(threshold, dt))
    return b.op("Where", kept, ctx.v(x), b.const(torch.zeros(()), dt))


@lowers(flashc_ops.predicted_sparsify.default)
def _predicted_sparsify(ctx, node):
    """flashc.predicted_sparsify: h where the predictor's score (x @ a) @ pb, in a's dtype, is above the
    threshold (0-d or per neuron), else 0."""
    h, x, a, pb, threshold = node.args
    b, dt = ctx.b, ctx.dtype(a)
    score = b.op("MatMul", b.op("MatMul", ctx.tensor(x, dt), ctx.v(a)), ctx.tensor(pb, dt))
    kept = b.op("Greater", score, ctx.tensor(threshold, dt))
    return b.op("Where", kept, ctx.v(h), b.const(torch.zeros(()), ctx.dtype(h)))

"""The CUDA backend's late passes: rewrites of a decode step's graph into ops that are one
launch of a generated kernel each, where the graph's static shapes make it safe.

They run in the PassManager after the optimization pipeline (flashc.lowering), verified,
dumped and reported like every pass, on the backend's copy of the program. The ops they
write (`flashc.gemv`, `flashc.rotary_kv_write`, `flashc.rotary_qkv_write`, flashc/ops.py)
have reference implementations, so the rewritten graph runs and is checked on the CPU.

* `FuseKvWrites`: rotary of the new queries and keys plus the key and value cache
  writes -> one `rotary_qkv_write` (or `rotary_kv_write`).
* `FuseStateWrites`: a state-space layer's state reset, mixing (`ssm_mix` / `gla_mix`) and
  copy of the new state into its buffer -> one `ssm_mix_into` / `gla_mix_into` that writes
  the buffer in place (one pass over the state a decode step instead of three).
* `FuseSparseMatmuls`: a linear of at most a few rows whose input is `flashc.sparsify`d
  (online activation sparsity) -> one `sparse_gemv` reading a transposed copy of the
  weight, stored in the program, that skips the weight rows of the zeroed inputs; a
  weight-only quantized `linear_wq` so fed -> one `sparse_gemv_wq` reading its codes
  repacked K-major (flashc.sparse_ops.to_kmajor), likewise stored once. It runs before
  `FuseSmallMatmuls`, which would make the linear a dense `gemv` (`gemv_wq`).
* `FuseSmallMatmuls`: matmuls of at most a few rows (decode) -> one `gemv` each (a
  weight-only quantized `linear_wq` -> one `gemv_wq`), with the RMSNorm before, the gated
  activation after a merged gate|up projection, and the residual add after folded in; the
  same folds go into the `sparse_gemv` and `sparse_gemv_wq` calls (their threshold then sees
  the normed value).
* `FuseQuantizedInputs`: the RMSNorm, residual add + RMSNorm or gated activation whose output
  only W8A8 / FP8 linears read -> one op that writes their input's codes and row scales
  (flashc/quantized_input_ops.py), the linears -> `linear_w8a8_q` / `linear_fp8_q` on them.

All keep shapes in meta["val"] and every in-place write in its order (the cache writes
move into the fused op, whose schema declares them).
"""

from __future__ import annotations

import operator
import torch
import torch.fx as fx

from flashc.aliasing import MutationInfo, is_write
from flashc.ir import Program, op_name, replace_with_call
from flashc.pass_manager import PassContext, PassResult
from flashc.sparse_ops import KMAJOR_BITS, to_kmajor

GEMV = torch.ops.flashc.gemv.default
GEMV_WQ = torch.ops.flashc.gemv_wq.default  # gemv's first seven arguments, then the packed weight's
LINEAR_WQ = torch.ops.flashc.linear_wq.default
KV_WRITE = torch.ops.flashc.rotary_kv_write.default
QKV_WRITE = torch.ops.flashc.rotary_qkv_write.default
SPARSIFY = torch.ops.flashc.sparsify.default
SPARSE_GEMV = torch.ops.flashc.sparse_gemv.default
SPARSE_GEMV_WQ = torch.ops.flashc.sparse_gemv_wq.default  # sparse_gemv's first eight arguments, then the packed weight
# a state-space layer's mixing -> the same writing its state buffer in place (the state argument's position)
MIX_INTO = {torch.ops.flashc.ssm_mix.default: (torch.ops.flashc.ssm_mix_into.default, 5),
            torch.ops.flashc.gla_mix.default: (torch.ops.flashc.gla_mix_into.default, 4)}


class FuseKvWrites:
    """Rotary + key and value cache writes of a decode step -> one flashc.rotary_(q)kv_write."""

    name = "cuda_fuse_kv_writes"
    requires = ("shapes",)
    preserves = ("canonical", "shapes")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        done = fuse_kv_writes(program.graph)
        return PassResult(done > 0, {"kv_writes_fused": done})


class FuseStateWrites:
    """A state-space layer's decode step: the state reset, the mixing and the state write -> one op in place."""

    name = "cuda_fuse_state_writes"
    requires = ("shapes",)
    preserves = ("canonical", "shapes")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        done = fuse_state_writes(program.graph)
        return PassResult(done > 0, {"state_writes_fused": done})


class FuseSmallMatmuls:
    """Matmuls of at most `max_rows` rows -> flashc.gemv, norms, activations and residuals folded in."""

    name = "cuda_fuse_small_matmuls"
    requires = ("shapes",)
    preserves = ("canonical", "shapes")

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        done = matmuls_to_gemvs(program.graph, self.max_rows)
        folds = fold_into_gemvs(program.graph)
        return PassResult(done + folds > 0, {"matmuls_to_gemv": done, "folded_into_gemvs": folds})


class FuseQuantizedInputs:
    """Producers of W8A8 / FP8 linears' inputs -> ops writing the codes and scales the linears read."""

    name = "cuda_fuse_quantized_inputs"
    requires = ("shapes",)
    preserves = ("canonical", "shapes")

    def __init__(self, max_k: int) -> None:
        self.max_k = max_k

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        producers, linears, kept = fuse_quantized_inputs(program.graph, self.max_k)
        details = [{"layer": node, "op": op, "status": "unfused", "note": why} for node, op, why in kept]
        return PassResult(producers > 0, {"inputs_quantized_in_producer": producers, "linears_on_codes": linears,
                                          "quantized_inputs_kept_separate": len(kept)}, details=details)


class FuseSparseMatmuls:
    """linear(sparsify(x, t), w, b) of at most `max_rows` rows -> flashc.sparse_gemv(x, t, w_t, b), and
    linear_wq(sparsify(x, t), ...) -> flashc.sparse_gemv_wq on the codes K-major."""

    name = "cuda_fuse_sparse_matmuls"
    requires = ("shapes",)
    preserves = ("canonical", "shapes")

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        before = set(program.params)
        done, skipped = fuse_sparse_matmuls(program, self.max_rows)
        quantized, kept_quantized = fuse_sparse_quantized_matmuls(program, self.max_rows)
        details = [{"layer": node, "op": "aten.linear", "status": "dense", "note": why} for node, why in skipped]
        details += [{"layer": node, "op": "flashc.linear_wq", "status": "dense", "note": why}
                    for node, why in kept_quantized]
        # the transposed copies are new memory: the model the user compiled still holds its own weights
        copies = [program.params[name] for name in set(program.params) - before]
        copy_mb = sum(t.numel() * t.element_size() for t in copies) / 2**20
        if copies:
            details.append({"layer": "-", "op": "flashc.sparse_gemv", "status": "memory",
                            "note": f"{len(copies)} weights stored transposed for the sparse GEMVs: {copy_mb:,.1f} MiB "
                                    "beside the compiled model's own weights"})
        stats = {"matmuls_to_sparse_gemv": done, "sparse_kept_dense": len(skipped) + len(kept_quantized),
                 "transposed_weight_mib": round(copy_mb, 1)}
        if quantized or kept_quantized:  # a program with quantized sparsified linears says what became of them
            stats["quantized_to_sparse_gemv_wq"] = quantized
        return PassResult(done + quantized > 0, stats, details=details)


ROPES = {torch.ops.flashc.rotary.default: False, torch.ops.flashc.rotary_interleaved.default: True}  # -> interleaved
_SQUEEZING_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _row_write(node: fx.Node) -> tuple[fx.Node, fx.Node, object, str] | None:
    """(cache, positions, value, kind) when node writes rows `positions` of dim 2 of a 4-D cache:
    ``index_copy_(c, 2, pos, value)`` (kind "copy") or the slice assignment ``c[:, :, pos] = value``,
    ``index_put_(c, [None, None, pos], value)`` (kind "put"). The value is returned as the
    [B, H, S, D] tensor the write stores: for a put whose value is a view dropping leading
    size-1 dims of such a tensor (which index_put_ broadcasts back), that tensor."""
    if node.op != "call_function":
        return None
    if node.target == torch.ops.aten.index_copy_.default:
        cache, dim, pos, value = node.args
        return (cache, pos, value, "copy") if dim == 2 else None
    if node.target != torch.ops.aten.index_put_.default:
        return None
    cache, indices, value = node.args[:3]
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    if accumulate or len(indices) != 3 or indices[0] is not None or indices[1] is not None:
        return None
    pos, cv = indices[2], _val(cache)
    pv = _val(pos)
    if cv is None or cv.dim() != 4 or pv is None or pv.dim() != 1 or pv.dtype not in (torch.int32, torch.int64):
        return None
    slot = (cv.shape[0], cv.shape[1], pv.shape[0], cv.shape[3])
    vv = _val(value)
    if vv is None:
        return None
    if tuple(vv.shape) == slot:
        return cache, pos, value, "put"
    lead = len(slot) - vv.dim()
    if (isinstance(value, fx.Node) and value.target in _SQUEEZING_VIEWS and len(value.users) == 1 and lead > 0
            and all(d == 1 for d in slot[:lead]) and tuple(vv.shape) == slot[lead:]
            and _val(value.args[0]) is not None and tuple(_val(value.args[0]).shape) == slot):
        return cache, pos, value.args[0], "put"
    return None


def fuse_kv_writes(graph: fx.Graph) -> int:
    """Fold a decode step's rotary embeddings and cache update into one launch; returns
    how many were folded.

    A write of ``flashc.rotary(k, cos, sin)`` (or ``flashc.rotary_interleaved``) into rows
    ``pos`` of the key cache kc and the next write of ``v`` into the same rows of vc (three
    kernels) become ``flashc.rotary_kv_write(k, v, cos, sin, kc, vc, pos, interleaved)``,
    which rotates the keys and stores keys and values straight into their cache rows (one
    kernel); readers of the writes' results read kc and vc. Writes are ``index_copy_`` along
    dim 2 (Hugging Face's static cache) or slice assignments ``kc[:, :, pos] = k``
    (``index_put_``, hand-written caches); a put's negative positions count from the end, as
    index_put_ does, so they are wrapped first (one small op per step, shared by the layers).
    The queries' rotary of the same kind with the same tables joins the launch
    (``flashc.rotary_qkv_write``, returning the rotated queries) when nothing reads it before
    the key write. Only where it is safe: both writes of one kind, the rotated keys feed
    nothing else, every input of the write exists where the key write was, and nothing
    between the two writes reads vc.
    """
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    writes = {n: w for n in nodes if (w := _row_write(n)) is not None}
    rotaries = [n for n in nodes if n.op == "call_function" and n.target in ROPES]
    wrapped: dict[tuple[fx.Node, int], fx.Node] = {}
    done = 0
    taken: set[fx.Node] = set()
    for kn, (kc, pos, rot, kind) in list(writes.items()):
        if kn in taken or not isinstance(rot, fx.Node) or rot.target not in ROPES:
            continue
        key_value = kn.args[2] if kind == "put" else kn.args[3]
        if len(rot.users) != 1 or (key_value is not rot and set(key_value.users) != {kn}):
            continue
        later = [m for m, (_, p, value, k2) in writes.items() if m not in taken and order[m] > order[kn]
                 and p is pos and k2 == kind and not (isinstance(value, fx.Node) and value.target in ROPES)]
        if not later:
            continue
        vn = min(later, key=order.__getitem__)
        vc, _, v, _ = writes[vn]
        k, cos, sin = rot.args
        if any(isinstance(a, fx.Node) and order[a] >= order[kn] for a in (k, cos, sin, v, vc)):
            continue
        between = nodes[order[kn] + 1:order[vn]]
        if any(vc in n.all_input_nodes for n in between):
            continue
        queries = [r for r in rotaries if r is not rot and r not in taken and r.target == rot.target
                   and r.args[1:] == (cos, sin) and order[r.args[0]] < order[kn]
                   and all(order[u] > order[kn] for u in r.users)]
        rq = max(queries, key=order.__getitem__) if queries else None
        interleaved = ROPES[rot.target]
        rows = pos
        if kind == "put":  # index_put_ counts negative positions from the end; the kernel takes rows
            length = _val(kc).shape[2]
            if (pos, length) not in wrapped:
                with graph.inserting_before(kn):
                    negative = graph.call_function(torch.ops.aten.lt.Scalar, (pos, 0))
                    shifted = graph.call_function(torch.ops.aten.add.Tensor, (pos, length))
                    rows = graph.call_function(torch.ops.aten.where.self, (negative, shifted, pos))
                pv = _val(pos)
                negative.meta["val"] = torch.empty(pv.shape, dtype=torch.bool, device=pv.device)
                shifted.meta["val"] = rows.meta["val"] = torch.empty_like(pv)
                wrapped[(pos, length)] = rows
            rows = wrapped[(pos, length)]
        with graph.inserting_before(kn):
            if rq is not None:
                call = graph.call_function(QKV_WRITE, (rq.args[0], k, v, cos, sin, kc, vc, rows, interleaved))
                call.meta["val"] = rq.meta.get("val")
                rq.replace_all_uses_with(call)
            else:
                graph.call_function(KV_WRITE, (k, v, cos, sin, kc, vc, rows, interleaved))
        kn.replace_all_uses_with(kc)  # index_copy_ and index_put_ return their destination
        vn.replace_all_uses_with(vc)
        dead = [vn, kn] + ([key_value] if key_value is not rot else []) + [rot] + ([rq] if rq else [])
        value_view = vn.args[2] if kind == "put" else None
        for n in dead:
            graph.erase_node(n)
        if value_view is not None and value_view is not v and not value_view.users:
            graph.erase_node(value_view)
        taken |= {kn, vn, rq}
        done += 1
    return done


def _state_write(mix: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None, fx.Node, fx.Node] | None:
    """(buffer, copy_, keep, y getitem, new-state getitem) when ``mix``'s new state is only
    copied into a placeholder buffer B and its start state is B or ``B * keep`` with keep one
    factor a sequence ([B, 1, 1, 1]) read by nothing else; else None."""
    items = list(mix.users)
    if any(u.target is not operator.getitem for u in items) or sorted(u.args[1] for u in items) != [0, 1]:
        return None
    y, new = sorted(items, key=lambda u: u.args[1])
    if len(new.users) != 1:
        return None
    copy = next(iter(new.users))
    if copy.target != torch.ops.aten.copy_.default or copy.args[1] is not new or copy.users or copy.kwargs:
        return None
    buffer, start = copy.args[0], mix.args[MIX_INTO[mix.target][1]]
    if buffer.op != "placeholder" or _val(buffer) is None:
        return None
    if start is buffer:
        return buffer, copy, None, y, new
    if (start.op == "call_function" and start.target == torch.ops.aten.mul.Tensor and start.args[0] is buffer
            and isinstance(start.args[1], fx.Node) and set(start.users) == {mix}
            and _val(start.args[1]) is not None and _val(start) is not None
            and tuple(_val(start.args[1]).shape) == (_val(buffer).shape[0], 1, 1, 1)
            and _val(start).shape == _val(buffer).shape):
        return buffer, copy, start.args[1], y, new
    return None


def fuse_state_writes(graph: fx.Graph) -> int:
    """``flashc.ssm_mix`` / ``gla_mix`` of a layer's state buffer B (or ``B * keep``, the reset of
    sequences starting at position 0) whose new state is then ``copy_``'d into B (three passes
    over the state a step: the multiply, the mixing, the copy) -> ``ssm_mix_into`` /
    ``gla_mix_into``, which reads B, scales it by keep and writes the new state back in place
    (one pass in the decode kernel); returns how many. Only where nothing between the mixing
    and the copy reads B or writes anything (the write moves from the copy to the mixing) and
    nothing writes B between the reset and the mixing."""
    info = MutationInfo.of(graph)
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    done = 0
    for mix in [n for n in nodes if n.op == "call_function" and n.target in MIX_INTO and not n.kwargs]:
        found = _state_write(mix)
        if found is None:
            continue
        buffer, copy, keep, y, new = found
        start = mix.args[MIX_INTO[mix.target][1]]
        between = nodes[order[mix] + 1:order[copy]]
        if any(buffer in n.all_input_nodes or is_write(n) for n in between if n is not new):
            continue
        if start is not buffer and info.written_between(buffer, start, mix):
            continue
        into, position = MIX_INTO[mix.target]
        args = list(mix.args)
        args[position:position + 1] = [buffer, keep]
        with graph.inserting_before(mix):
            call = graph.call_function(into, tuple(args))
        call.meta["val"] = _val(y)
        y.replace_all_uses_with(call)
        for n in (copy, new, y, mix) + ((start,) if start is not buffer else ()):
            graph.erase_node(n)
        done += 1
    graph.lint()
    return done


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# where each op that norms, activations and residuals fold into takes x, norm_weight, eps, residual, glu:
# gemv (x, w, bias, norm_weight, eps, residual, glu), gemv_wq's first seven, sparse_gemv (x, t, w_t, bias, ...),
# sparse_gemv_wq's first eight
_FOLD_ARGS = {GEMV: (0, 3, 4, 5, 6), GEMV_WQ: (0, 3, 4, 5, 6), SPARSE_GEMV: (0, 4, 5, 6, 7),
              SPARSE_GEMV_WQ: (0, 4, 5, 6, 7)}
SPARSE_GEMVS = (SPARSE_GEMV, SPARSE_GEMV_WQ)  # their kernels norm in x's dtype
_FOLD_NAMES = ("x", "norm", "eps", "residual", "glu")
FOLDS_INTO = tuple(_FOLD_ARGS)


def _arg(node: fx.Node, name: str):
    """The argument `name` ("x", "norm", "eps", "residual", "glu") of a call of one of FOLDS_INTO."""
    return node.args[_FOLD_ARGS[node.target][_FOLD_NAMES.index(name)]]


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _with(node: fx.Node, **changes) -> None:
    args = list(node.args)
    for name, value in changes.items():
        args[_FOLD_ARGS[node.target][_FOLD_NAMES.index(name)]] = value
    node.args = tuple(args)


def _halves(gate: fx.Node, up: fx.Node) -> fx.Node | None:
    """The tensor y when gate = y[..., :F] and up = y[..., F:2F] with 2F = y's last dim; else None."""
    if op_name(gate) != "aten.slice" or op_name(up) != "aten.slice" or gate.args[0] is not up.args[0]:
        return None
    y = _val(gate.args[0])
    if y is None:
        return None
    width = y.shape[-1]

    def span(s):
        if s.kwargs:
            return None
        _, dim, start, end, step = list(s.args) + [0, None, None, 1][len(s.args) - 1:]
        if dim % y.dim() != y.dim() - 1 or step != 1:
            return None
        return start or 0, width if end is None else min(end, width)

    if span(gate) != (0, width // 2) or span(up) != (width // 2, width) or width % 2:
        return None
    return gate.args[0]


def fuse_small_matmuls(graph: fx.Graph, max_rows: int) -> int:
    """Rewrite decode-sized matmuls into ``flashc.gemv(x, w, bias, norm_weight, eps, residual,
    glu)`` calls, then fold norms, activations and residuals into them (`fold_into_gemvs`);
    returns how many matmuls became one.

    ``aten.linear(x, w, b)`` with at most ``max_rows`` rows of x -> ``gemv(x, w, b)``;
    ``flashc.linear_wq(x, q, s, z, b, a, bits)`` -> ``gemv_wq(x, q, b, ..., s, z, a, bits)``.
    """
    count = matmuls_to_gemvs(graph, max_rows)
    fold_into_gemvs(graph)
    return count


def matmuls_to_gemvs(graph: fx.Graph, max_rows: int) -> int:
    """`fuse_small_matmuls`'s first step alone: the linears (and linear_wq) of at most ``max_rows``
    rows -> gemv (gemv_wq) calls with nothing folded; returns how many."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.linear.default, LINEAR_WQ):
            continue
        x, w = node.args[0], node.args[1]
        xv, wv = _val(x), _val(w)
        if (xv is None or xv.dtype not in _FLOATS or xv.shape[-1] == 0
                or xv.numel() // xv.shape[-1] > max_rows):
            continue
        if node.target == LINEAR_WQ:
            if node.kwargs:
                continue
            _, qweight, scales, zero_points, bias, input_scale, bits = node.args
            target, args = GEMV_WQ, (x, qweight, bias, None, 1e-6, None, None, scales, zero_points, input_scale, bits)
        else:
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if wv is None or wv.dim() != 2 or xv.dtype != wv.dtype:
                continue
            target, args = GEMV, (x, w, bias, None, 1e-6, None, None)
        replace_with_call(graph, node, target, args)
        count += 1
    graph.lint()
    return count


def fold_into_gemvs(graph: fx.Graph) -> int:
    """Fold into gemv, gemv_wq, sparse_gemv and sparse_gemv_wq calls what their kernels compute around the
    product; returns how many folds.

    1. ``rms_norm(x, g, eps)`` whose users are all such calls -> their ``x`` and ``norm`` (a
       sparse_gemv's threshold then applies to the normed value, as before; it takes a norm
       whose output keeps x's dtype only).
    2. ``add_rms_norm(y, r, g, eps)`` where y is such a call used only there -> y takes the
       residual (its result is the new residual stream) and the normed users take the
       norm as in 1 (a plain ``rms_norm`` remains for users that are not such calls).
    3. ``swiglu``/``geglu(tanh)`` of the two halves of a call's output -> its ``glu``.
    """
    rms, add_rms = torch.ops.flashc.rms_norm.default, torch.ops.flashc.add_rms_norm.default
    folds = 0

    def takes_norm(user: fx.Node, normed: fx.Node, source: fx.Node) -> bool:
        """Can user take the norm of source (whose normed value it reads as normed) in?"""
        if user.target not in FOLDS_INTO or _arg(user, "x") is not normed or _arg(user, "norm") is not None:
            return False
        if normed in user.args[1:]:
            return False
        sv, nv = _val(source), _val(normed)  # the sparse kernels norm in x's dtype: no promotion
        return user.target not in SPARSE_GEMVS or (sv is not None and nv is not None and sv.dtype == nv.dtype)

    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == rms:
            x, g, eps = node.args
            if node.users and all(takes_norm(u, node, x) for u in node.users):
                for u in list(node.users):
                    _with(u, x=x, norm=g, eps=eps)
                    folds += 1
                graph.erase_node(node)
        elif node.target == add_rms:
            y, r, g, eps = node.args
            if not (isinstance(y, fx.Node) and y.target in FOLDS_INTO and len(y.users) == 1
                    and _arg(y, "residual") is None and _arg(y, "glu") is None
                    and _val(y) is not None and _val(r) is not None and _val(r).shape == _val(y).shape
                    and (not isinstance(r, fx.Node) or order[r] < order[y])):
                continue
            items = list(node.users)
            if any(u.target is not operator.getitem for u in items):
                continue
            _with(y, residual=r)  # y now is the sum: the new residual stream
            folds += 1
            for item in items:
                if item.args[1] == 1:
                    item.replace_all_uses_with(y)
                elif item.users and all(takes_norm(u, item, y) for u in item.users):
                    for u in list(item.users):
                        _with(u, x=y, norm=g, eps=eps)
                        folds += 1
                else:
                    with graph.inserting_before(item):
                        normed = graph.call_function(rms, (y, g, eps))
                    normed.meta["val"] = item.meta.get("val")
                    item.replace_all_uses_with(normed)
                graph.erase_node(item)
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        name = op_name(node)
        if name == "flashc.swiglu":
            act = "silu"
        elif name == "flashc.geglu" and node.args[2] == "tanh":
            act = "gelu_tanh"
        else:
            continue
        gate, up = node.args[0], node.args[1]
        if not (isinstance(gate, fx.Node) and isinstance(up, fx.Node)):
            continue
        y = _halves(gate, up)
        if (y is None or y.target not in FOLDS_INTO or _arg(y, "residual") is not None
                or _arg(y, "glu") is not None
                or set(y.users) != {gate, up} or set(gate.users) != {node} or set(up.users) != {node}):
            continue
        _with(y, glu=act)
        folds += 1
        y.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(y)
        for n in (node, gate, up):
            graph.erase_node(n)
    graph.lint()
    return folds


def _sparse_rows_reason(xv, tv, max_rows: int) -> str | None:
    """What both sparse rewrites ask of the sparsified input x (shape and dtype xv, at least one feature) and
    its threshold (tv): decode-sized rows, and a 0-d or per-feature float threshold (None: both hold)."""
    if xv.numel() // xv.shape[-1] > max_rows:
        return f"{xv.numel() // xv.shape[-1]} rows: more than {max_rows}, a GEMM (cuBLAS) reads the weight once anyway"
    if not (tv.dim() == 0 or tuple(tv.shape) in ((xv.shape[-1],), (1,))) or not tv.dtype.is_floating_point:
        return f"threshold {tv.dtype}{list(tv.shape)}: the kernel takes a 0-d or per-feature float threshold"
    return None


def _replace_sparse_linear(graph: fx.Graph, node: fx.Node, target, args: tuple) -> None:
    """node, a linear of ``sparsify(x, t)`` (its first argument), -> ``target(*args)`` with node's meta; the
    sparsify goes too when nothing else reads it."""
    sparse = node.args[0]
    replace_with_call(graph, node, target, args)
    if not sparse.users:
        graph.erase_node(sparse)


def _sparse_skip_reason(program: Program, info: MutationInfo, node: fx.Node, max_rows: int) -> str | None:
    """Why linear(sparsify(x, t), w, b) at node cannot become a sparse_gemv (None: it can)."""
    sparse = node.args[0]
    x, t = sparse.args
    w = node.args[1]
    xv, wv, tv = _val(x), _val(w), _val(t)
    if node.kwargs or xv is None or wv is None or tv is None:
        return "no shapes recorded, or keyword arguments"
    if xv.dtype not in _FLOATS or wv.dim() != 2 or wv.dtype != xv.dtype or xv.shape[-1] == 0:
        return f"input {xv.dtype} and weight {wv.dtype}{list(wv.shape)}: the kernel takes a 2-d weight of x's dtype"
    rows_why = _sparse_rows_reason(xv, tv, max_rows)
    if rows_why is not None:
        return rows_why
    if w.op != "placeholder" or w.name not in program.params:
        return "the weight is computed in the graph, not a stored weight"
    if info.is_written(w):
        return "the graph writes the weight in place: a transposed copy would go stale"
    if any(info.written_between(v, sparse, node) for v in (x, t, sparse)):
        return "the input, threshold or sparsified value is written between the sparsify and the linear"
    weight = program.params[w.name]
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        return "the weight holds inf or nan: a skipped row would not give the reference's 0 * inf = nan"
    return None


def fuse_sparse_matmuls(program: Program, max_rows: int) -> tuple[int, list[tuple[str, str]]]:
    """Rewrite ``aten.linear(flashc.sparsify(x, t), w, b)`` with at most ``max_rows`` rows into
    ``flashc.sparse_gemv(x, t, w_t, b)``; returns (how many, [(linear node, why not)] for the rest).

    ``w_t`` is a new weight of the program, ``w`` transposed to [K, N] once here (each
    weight once, however many linears read it), so the kernel skips a zeroed input's
    contiguous row; ``w`` itself is dropped when nothing else reads it, so the GPU holds
    the same bytes. A weight that other ops also read (say an embedding tied to a sparsified
    head) is kept as well: its transposed copy then costs its size again in memory.
    Left as they are: weights the graph writes in place (the copy would go stale), computed
    weights, weights holding inf or nan (a skipped row would drop a 0 * inf = nan that the
    reference computes), an input or threshold written between the sparsify and the
    linear, and more rows than ``max_rows``. The sparsify stays while other nodes read it.
    Keeps shapes (the new call has the linear's meta["val"]) and every in-place write.
    """
    graph = program.graph
    info = MutationInfo.of(graph)
    transposed: dict[fx.Node, fx.Node] = {}
    skipped: list[tuple[str, str]] = []
    count = 0
    for node in list(graph.nodes):
        if (node.op != "call_function" or node.target != torch.ops.aten.linear.default
                or not isinstance(node.args[0], fx.Node) or node.args[0].target != SPARSIFY):
            continue
        why = _sparse_skip_reason(program, info, node, max_rows)
        if why is not None:
            skipped.append((node.name, why))
            continue
        sparse, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if w not in transposed:
            transposed[w] = program.add_param(f"{w.name}_t", program.params[w.name].t().contiguous())
        _replace_sparse_linear(graph, node, SPARSE_GEMV, (*sparse.args, transposed[w], bias, None, 1e-6, None, None))
        count += 1
    program.drop_unused_params(transposed)
    graph.lint()
    return count, skipped


def _sparse_wq_skip_reason(program: Program, info: MutationInfo, node: fx.Node, max_rows: int) -> str | None:
    """Why linear_wq(sparsify(x, t), qweight, scales, zero_points, bias, input_scale, bits) at node cannot
    become a sparse_gemv_wq (None: it can)."""
    sparse = node.args[0]
    x, t = sparse.args
    _, qweight, scales, zero_points, _, input_scale, bits = node.args
    xv, tv, qv, sv = _val(x), _val(t), _val(qweight), _val(scales)
    if node.kwargs or xv is None or tv is None or qv is None or sv is None:
        return "no shapes recorded, or keyword arguments"
    bv = _val(node.args[4])
    if xv.dtype not in _FLOATS or xv.shape[-1] == 0 or (bv is not None and bv.dtype != xv.dtype):
        return f"input {xv.dtype}{list(xv.shape)}: the kernel takes float rows (and a bias of their dtype)"
    rows_why = _sparse_rows_reason(xv, tv, max_rows)
    if rows_why is not None:
        return rows_why
    if bits not in KMAJOR_BITS or qv.shape[0] % (32 // bits):
        return (f"{bits}-bit codes, {qv.shape[0]} outputs: the K-major layout fills whole 32-bit words along N "
                f"with {KMAJOR_BITS}-bit codes")
    group = qv.shape[2] * 8 // bits
    if group & -group < 16 or sv.dtype not in (xv.dtype, torch.float32):
        return (f"group size {group}, scales {sv.dtype}: the kernel takes a group size that is a multiple of 16, "
                "scales of x's dtype or fp32")
    packed = [a for a in (qweight, scales, zero_points) if a is not None]
    if any(a.op != "placeholder" or a.name not in program.params for a in packed):
        return "the packed weight is computed in the graph, not stored"
    if any(info.is_written(a) for a in packed):
        return "the graph writes the packed weight in place: a K-major copy would go stale"
    if any(info.written_between(v, sparse, node) for v in (x, t, sparse, input_scale) if isinstance(v, fx.Node)):
        return "the input, threshold, sparsified value or input scale is written between the sparsify and the linear"
    stored = program.params[scales.name]
    if stored.device.type != "meta" and not bool(torch.isfinite(stored).all()):
        return "the scales hold inf or nan: a skipped row would not give the reference's 0 * inf = nan"
    return None


def fuse_sparse_quantized_matmuls(program: Program, max_rows: int) -> tuple[int, list[tuple[str, str]]]:
    """Rewrite ``flashc.linear_wq(flashc.sparsify(x, t), qweight, scales, zero_points, bias, input_scale, bits)``
    with at most ``max_rows`` rows into ``flashc.sparse_gemv_wq(x, t, qweight_t, bias, None, 1e-6, None, None,
    scales_t, zero_points_t, input_scale, bits)``; returns (how many, [(linear node, why not)] for the rest).

    The packed weight is repacked K-major here, once (flashc.sparse_ops.to_kmajor: the same codes, scales
    and zero points; each packed weight once however many linears read it), into new weights of the
    program, so a zeroed input skips a contiguous row of codes; the originals are dropped when nothing else
    reads them, so the GPU holds the same bytes. Left as they are, as in `fuse_sparse_matmuls`: packed
    weights the graph writes in place or computes, scales holding inf or nan, an input, threshold,
    sparsified value or input scale written between the sparsify and the linear, more rows than
    ``max_rows``, and what the layout cannot hold (3-bit codes, outputs not filling whole words, groups not
    a multiple of 16). The sparsify stays while other nodes read it. Keeps shapes (the new call has the
    linear's meta["val"]) and every in-place write.
    """
    graph = program.graph
    info = MutationInfo.of(graph)
    kmajor: dict[tuple, tuple] = {}
    skipped: list[tuple[str, str]] = []
    count = 0
    for node in list(graph.nodes):
        if (node.op != "call_function" or node.target != LINEAR_WQ
                or not isinstance(node.args[0], fx.Node) or node.args[0].target != SPARSIFY):
            continue
        why = _sparse_wq_skip_reason(program, info, node, max_rows)
        if why is not None:
            skipped.append((node.name, why))
            continue
        sparse, qweight, scales, zero_points, bias, input_scale, bits = node.args
        if (qweight, scales, zero_points) not in kmajor:
            converted = to_kmajor(program.params[qweight.name], program.params[scales.name],
                                  None if zero_points is None else program.params[zero_points.name], bits)
            kmajor[(qweight, scales, zero_points)] = tuple(
                None if t is None else program.add_param(f"{source.name}_kmajor", t)
                for source, t in zip((qweight, scales, zero_points), converted))
        qweight_t, scales_t, zero_points_t = kmajor[(qweight, scales, zero_points)]
        _replace_sparse_linear(graph, node, SPARSE_GEMV_WQ, (*sparse.args, qweight_t, bias, None, 1e-6, None, None,
                                                             scales_t, zero_points_t, input_scale, bits))
        count += 1
    program.drop_unused_params({a: None for key in kmajor for a in key if a is not None})
    graph.lint()
    return count, skipped


# ----------------------------------------------------------------- quantized inputs in their producers
LINEAR_W8A8 = torch.ops.flashc.linear_w8a8.default  # (x, qweight, w_scales, bias, input_scale)
LINEAR_FP8 = torch.ops.flashc.linear_fp8.default  # (x, qweight, w_scales, bias, input_scale, per_token)
ON_CODES = {LINEAR_W8A8: torch.ops.flashc.linear_w8a8_q.default, LINEAR_FP8: torch.ops.flashc.linear_fp8_q.default}
RMS_NORM, ADD_RMS_NORM = torch.ops.flashc.rms_norm.default, torch.ops.flashc.add_rms_norm.default
SWIGLU, GEGLU = torch.ops.flashc.swiglu.default, torch.ops.flashc.geglu.default
RMS_NORM_QUANT = torch.ops.flashc.rms_norm_quant.default
ADD_RMS_NORM_QUANT = torch.ops.flashc.add_rms_norm_quant.default
GLU_QUANT = torch.ops.flashc.glu_quant.default
_GELU_ACTS = {"tanh": "gelu_tanh", "none": "gelu"}


def _input_quantization(node: fx.Node) -> tuple[str, object, bool] | None:
    """(kind, input_scale, per_token) of a W8A8 / FP8 linear: how it quantizes its input; else None."""
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target == LINEAR_W8A8 and len(node.args) == 5:
        return "int8", node.args[4], True
    if node.target == LINEAR_FP8 and len(node.args) == 6:
        return "fp8", node.args[4], node.args[5]
    return None


def _produced(node: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """(output, sum item) of a producer the pass fuses into: the node itself for rms_norm and a GLU,
    add_rms_norm's normed item (and its sum item, or None) when only those two items read it."""
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target in (RMS_NORM, SWIGLU) or (node.target == GEGLU and len(node.args) == 3
                                             and node.args[2] in _GELU_ACTS):
        return node, None
    if node.target != ADD_RMS_NORM or any(u.target is not operator.getitem for u in node.users):
        return None
    items = {u.args[1]: u for u in node.users}
    if len(items) != len(node.users) or 0 not in items:
        return None
    return items[0], items.get(1)


def _describe(node: fx.Node) -> str:
    return f"{node.name} ({op_name(node)})"


def _quant_skip_reason(info: MutationInfo, producer: fx.Node, out: fx.Node, max_k: int) -> str | None:
    """Why the producer's output cannot be quantized where it is produced (None: it can)."""
    other = next((u for u in out.users if _input_quantization(u) is None or u.args[0] is not out
                  or out in u.args[1:]), None)
    if other is not None:
        return f"its output is also read by {_describe(other)}, which needs it unquantized"
    scales = [_input_quantization(u)[1] for u in out.users]
    if any(s is not None and not isinstance(s, fx.Node) for s in scales):
        return "an input scale is not a value of the graph"
    ways = {_input_quantization(u) for u in out.users}
    if len(ways) != 1:
        return "its linears quantize it differently (int8 and fp8, other input scales, or per token and per tensor)"
    (_, scale, _), = ways
    val = _val(out)
    if val is None or val.dtype not in _FLOATS or val.dim() == 0:
        return "no float output shape recorded"
    k = val.shape[-1]
    if not 0 < k <= max_k:
        return f"rows of {k} elements: the kernel holds rows of at most {max_k}"
    if isinstance(scale, fx.Node):
        sv = _val(scale)
        if sv is None or tuple(sv.shape) != (k,) or sv.dtype not in _FLOATS:
            return "the input scale is not a float vector of the rows' length"
        if info.order[scale] > info.order[producer]:
            return "the input scale is computed after the producer"
    for linear in out.users:
        if info.written_between(out, producer, linear) or info.written_between(scale, producer, linear):
            return f"the output or the input scale is written in place before {_describe(linear)} reads it"
    return None


def _infer_val(node: fx.Node) -> None:
    """node.meta['val'] from its op's fake kernel on its inputs' fake values (left unset without them)."""
    from torch._guards import detect_fake_mode

    if node.target is operator.getitem:
        source = node.args[0].meta.get("val")
        if isinstance(source, (tuple, list)):
            node.meta["val"] = source[node.args[1]]
        return
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None or any(v is None for v in vals):
        return
    with mode:
        node.meta["val"] = node.target(*fx.node.map_arg(node.args, lambda a: a.meta["val"]))


def fuse_quantized_inputs(graph: fx.Graph, max_k: int) -> tuple[int, int, list[tuple[str, str, str]]]:
    """Quantize W8A8 / FP8 linears' inputs in the kernels that produce them; returns (producers
    fused, linears rewritten, [(producer, op, why not)] for producers some such linear reads but
    that stay as they are).

    A producer is ``flashc.rms_norm``, ``flashc.add_rms_norm`` (its normed item) or
    ``flashc.swiglu`` / ``flashc.geglu``. When every reader of its output is a
    ``flashc.linear_w8a8`` / ``linear_fp8`` taking it as input, all quantizing it alike (kind,
    input scale node, per_token), the producer becomes ``flashc.rms_norm_quant`` /
    ``add_rms_norm_quant`` / ``glu_quant`` writing (codes, row scales) (and the sum, the next
    residual stream), and each linear ``flashc.linear_w8a8_q`` / ``linear_fp8_q`` on them: the
    same numbers (the ops' references are the unfused composition), one pass over the
    activations fewer. Left as they are: outputs another op reads, mixed quantizations, rows
    longer than ``max_k``, input scales computed after the producer, and outputs or input
    scales written in place between the producer and a linear (the scale is read earlier now).
    Keeps shapes (new nodes get meta["val"] from the ops' fake kernels) and every in-place write.
    """
    info = MutationInfo.of(graph)
    producers = linears = 0
    kept: list[tuple[str, str, str]] = []
    for node in list(graph.nodes):
        produced = _produced(node)
        if produced is None:
            continue
        out, sum_item = produced
        if not any(_input_quantization(u) is not None and u.args[0] is out for u in out.users):
            continue  # nothing quantizes this output: not a candidate
        why = _quant_skip_reason(info, node, out, max_k)
        if why is not None:
            kept.append((node.name, op_name(node), why))
            continue
        kind, scale, per_token = _input_quantization(next(iter(out.users)))
        if node.target == RMS_NORM:
            target, args = RMS_NORM_QUANT, (*node.args, scale, kind, per_token)
        elif node.target == ADD_RMS_NORM:
            target, args = ADD_RMS_NORM_QUANT, (*node.args, scale, kind, per_token)
        else:
            act = "silu" if node.target == SWIGLU else _GELU_ACTS[node.args[2]]
            target, args = GLU_QUANT, (node.args[0], node.args[1], act, scale, kind, per_token)
        first = 1 if target == ADD_RMS_NORM_QUANT else 0  # add_rms_norm_quant returns the sum first
        with graph.inserting_before(node):
            call = graph.call_function(target, args)
            items = [graph.call_function(operator.getitem, (call, i)) for i in range(first + 2)]
        call.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        for n in (call, *items):
            _infer_val(n)
        codes, scales = items[first:]
        out_dtype = _val(out).dtype
        for linear in list(out.users):
            _, qweight, w_scales, bias = linear.args[:4]
            replace_with_call(graph, linear, ON_CODES[linear.target], (codes, scales, qweight, w_scales, bias,
                                                                       out_dtype))
            linears += 1
        if sum_item is not None:
            sum_item.replace_all_uses_with(items[0])
            graph.erase_node(sum_item)
        elif first:  # nothing reads add_rms_norm's sum
            graph.erase_node(items[0])
        if out is not node:
            graph.erase_node(out)
        graph.erase_node(node)
        producers += 1
    graph.lint()
    return producers, linears, kept

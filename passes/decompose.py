"""Ops a backend does not lower, replaced by PyTorch's own decomposition of them.

flashc captures a model without decomposing it (`aten.linear`, `aten.argsort`, `aten.std` stay
whole, so the fusion patterns see what the model wrote). A backend with a smaller op set (ONNX
through onnxscript's torchlib, TVM's Relax frontend) then meets composite ops it has no lowering
for, though PyTorch knows how to write each in simpler ATen ops: `argsort` is `sort` and an index,
`std` is `var` and `sqrt`, `conv_transpose2d` is `convolution`, `one_hot` is a comparison with
`arange`. This pass, declared by those backends as a late pass, rewrites every node whose op the
backend does not lower into PyTorch's decomposition of it, and again for the ops that brings in
that the backend does not lower either. The backend answers per node, so per op overload
(TVM's frontend converts `conv2d.default` but not `conv2d.padding`). A node is rewritten only when
that ends in ops the backend lowers; else it stays, and the backend refuses it as before, naming
the op and the model line.

The decomposition of an op is flashc's own for the few whose PyTorch decomposition no backend
lowers or whose converters are wrong at the edges (`OWN_DECOMPOSITIONS`: EmbeddingBag, masked_scatter,
the values of kthvalue and (nan)median by a sort, and the elementwise math of exact_math.py), else
torch._decomp's registered one, else the op's CompositeImplicitAutograd kernel (`OpOverload.decompose`,
how PyTorch itself writes the op in other ops), traced on fake tensors of the node's argument shapes
(oneDNN off, so the RNNs take their portable form). It is spliced in only when the ops it brings
write nothing but intermediates of their own (such a write becomes the functional op) and its results
are new tensors, not arguments or views of them (an op that writes an argument is never decomposed; views: below), it
needs no constant tensor, and it checks no input values (one_hot's class range; EmbeddingBag's
offsets unless the graph makes them: a backend would drop the check); else the node is left as it
was. A decomposition may compute the op's first outputs only, where nothing reads the others. The
ops go where the node was and read what it read, so no read moves across a write to the same
storage. A view op (movedim) and an op whose results are views of its arguments (meshgrid's
expands) are decomposed through their CompositeImplicitAutograd kernel only: that is what eager
itself runs, so the views are the model's own, and writes through them reach what they view.
An in-place op the backend does not lower (`index_copy_`) becomes `x.copy_(index_copy(x, ...))`,
the same write at the same point, when the backend lowers copy_ and the functional op or its
decomposition (`split_write`).
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from flashc.aliasing import MutationInfo, functional_form, written_arguments
from flashc.ir import NODE_META, Program, op_name, propagate_shapes, upstream
from flashc.passes.exact_math import EXACT_MATH
from flashc.pass_manager import PassContext, PassResult

_CHECKS = (torch.ops.aten._assert_async.msg, torch.ops.aten._assert_async.default,
           torch.ops.aten._assert_scalar.default)
MAX_DEPTH = 8  # decompositions of decompositions: std -> var -> prims.var


class DecomposeUnlowered:
    """Each node `lowers(node)` rejects (the backend has no converter for its op, or for that overload
    of it), written as PyTorch's decomposition of it when that is all ops the backend lowers (`stats`:
    how many nodes of each op; the others are left for the backend to refuse, naming the op the model
    wrote)."""

    name = "decompose_unlowered"
    requires = ("shapes",)
    preserves = ("canonical", "shapes")

    def __init__(self, lowers: Callable[[fx.Node], bool]) -> None:
        self.lowers = lowers

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = {}
        for node in list(program.op_nodes()):
            name = op_name(node)
            if not self.lowers(node) and (decompose_node(program.graph, node, self.lowers, params=program.params)
                                          or split_write(program.graph, node, self.lowers, program.params)):
                stats[name] = stats.get(name, 0) + 1
        if stats:
            program.recompile()
            propagate_shapes(program)  # one fake mode for every node's value, as the other passes leave it
        return PassResult(bool(stats), stats)


def _embedding_bag(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False,
                   per_sample_weights=None, include_last_offset=False, padding_idx=None, *_):
    """EmbeddingBag's pooled rows (its first output only) in ops the backends lower: each position's
    bag by a cumulative sum of marks at the bags' starts, rows summed (mode 0), averaged over the
    bag's non-padding entries (1) or maxed (2) into their bag by scatter; an empty bag is 0, as in
    PyTorch. Spliced only where the offsets come from the graph itself (`_checked_elsewhere`)."""
    n, dim = indices.shape[0], weight.shape[1]
    bags = offsets.shape[0] - int(bool(include_last_offset))
    starts = offsets[:bags]
    marks = torch.zeros(n + 1, dtype=starts.dtype, device=indices.device)
    marks = marks.scatter_add(0, starts, torch.ones_like(starts))
    bag = torch.cumsum(marks[:n], 0) - 1
    rows = torch.ops.aten.embedding.default(weight, indices)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(1)
    keep = (indices != padding_idx) if padding_idx is not None and padding_idx >= 0 else torch.ones_like(indices) > 0
    counts = torch.zeros(bags, dtype=weight.dtype, device=weight.device).scatter_add(0, bag, keep.to(weight.dtype))
    spread = bag.unsqueeze(1).expand(n, dim)
    zeros = torch.zeros(bags, dim, dtype=weight.dtype, device=weight.device)
    if mode == 2:  # padding entries go to a bag past the last, dropped after (no -inf: TVM cannot build one)
        aside = torch.where(keep, bag, torch.full_like(bag, bags)).unsqueeze(1).expand(n, dim)
        spare = torch.zeros(bags + 1, dim, dtype=weight.dtype, device=weight.device)
        pooled = spare.scatter_reduce(0, aside, rows, "amax", include_self=False)[:bags]
        return [torch.where(counts.unsqueeze(1) > 0, pooled, zeros)]
    pooled = zeros.scatter_add(0, spread, rows * keep.unsqueeze(1).to(rows.dtype))
    return [pooled / counts.clamp(min=1).unsqueeze(1) if mode == 1 else pooled]


def _masked_scatter(x, mask, source):
    """x with its masked positions (mask broadcast to x, row-major order) taking source's elements in turn:
    each position's rank among the masked ones by a cumulative sum, read from the flattened source by an
    index, whose range the backends check (a source with fewer elements than the mask has is an error, as in
    PyTorch). Vision-language models merge image features into the text embeddings so."""
    keep = mask.expand(x.shape).reshape(-1)
    rank = (torch.cumsum(keep.long(), 0) - 1).clamp(min=0)  # -1 before the first masked position: unread
    return torch.where(keep, source.reshape(-1)[rank].to(x.dtype), x.reshape(-1)).reshape(x.shape)


def _kthvalue(x, k, dim=-1, keepdim=False):
    """kthvalue's values (its first output only): the k-th of each slice sorted ascending, NaN after every
    number, as PyTorch ranks it. Which index a tie reports PyTorch leaves open, so nothing reading the
    indices gets this."""
    dim = dim % max(x.dim(), 1)
    picked = torch.sort(x, dim).values.narrow(dim, k - 1, 1)
    return [picked if keepdim else picked.squeeze(dim)]


def _nan_in(x, dim, keepdim):
    return torch.isnan(x).any(dim, keepdim=keepdim) if x.is_floating_point() else None


def _median_dim(x, dim=0, keepdim=False):
    """median's values along dim (first output only): the lower of the two middle elements sorted, NaN
    where the slice holds a NaN."""
    dim = dim % max(x.dim(), 1)
    mid = (x.shape[dim] - 1) // 2 if x.dim() else 0
    picked = torch.sort(x, dim).values.narrow(dim, mid, 1)
    picked = picked if keepdim else picked.squeeze(dim)
    nan = _nan_in(x, dim, keepdim)
    return [picked if nan is None else torch.where(nan, torch.full_like(picked, float("nan")), picked)]


def _median(x):
    """median of every element: the lower middle one, NaN if there is a NaN."""
    return _median_dim(x.reshape(-1), 0)[0]


def _nanmedian_dim(x, dim=0, keepdim=False):
    """nanmedian's values along dim (first output only): the lower middle of the slice's numbers (NaN sorts
    after them), NaN for a slice of NaNs only."""
    if not x.is_floating_point():
        return _median_dim(x, dim, keepdim)
    dim = dim % max(x.dim(), 1)
    numbers = (~torch.isnan(x)).sum(dim, keepdim=True)
    mid = ((numbers - 1).clamp(min=0) // 2).to(torch.int64)
    picked = torch.gather(torch.sort(x, dim).values, dim, mid)  # all-NaN slices: the first NaN
    return [picked if keepdim else picked.squeeze(dim)]


def _nanmedian(x):
    return _nanmedian_dim(x.reshape(-1), 0)[0]


_EMBEDDING_BAGS = (torch.ops.aten.embedding_bag.default, torch.ops.aten.embedding_bag.padding_idx,
                   torch.ops.aten._embedding_bag.default, torch.ops.aten._embedding_bag_forward_only.default)
# ops whose PyTorch decomposition no backend lowers (EmbeddingBag's is its own kernel) or is not exact at
# the edges (exact_math.py), written here; such a decomposition may compute the op's first outputs only:
# spliced where nothing reads the rest
OWN_DECOMPOSITIONS: dict[Any, Callable] = {**{op: _embedding_bag for op in _EMBEDDING_BAGS},
                                            torch.ops.aten.masked_scatter.default: _masked_scatter, **EXACT_MATH,
                                            # order statistics by a sort (values only)
                                            torch.ops.aten.kthvalue.default: _kthvalue,
                                            torch.ops.aten.median.dim: _median_dim,
                                            torch.ops.aten.median.default: _median,
                                            torch.ops.aten.nanmedian.dim: _nanmedian_dim,
                                            torch.ops.aten.nanmedian.default: _nanmedian}


def _checked_elsewhere(node: fx.Node, params: dict[str, torch.Tensor]) -> bool:
    """Whether what the op checks of its inputs' values needs no check at run time: EmbeddingBag's
    offsets (first 0, never decreasing) made in the graph (`arange` for 2-D input), or a constant
    checked here; not passed in by the caller."""
    if node.target not in _EMBEDDING_BAGS:
        return True
    offsets = node.args[2]
    if offsets.op == "placeholder":
        value = params.get(offsets.name)
        mutations = MutationInfo.of(node.graph)
        return (value is not None and value.ndim == 1 and value.numel() > 0 and int(value[0]) == 0
                and bool((value[1:] >= value[:-1]).all()) and not mutations.is_written(offsets))
    return not any(n.op == "placeholder" for n in upstream([offsets]))


def _eager_kernel(target: Any) -> Callable | None:
    """The op's CompositeImplicitAutograd kernel (eager writes it in other ATen ops), if it has one."""
    if isinstance(target, torch._ops.OpOverload) and torch._C._dispatch_has_kernel_for_dispatch_key(
            target.name(), "CompositeImplicitAutograd"):
        return target.decompose
    return None


def decomposition_of(target: Any) -> Callable | None:
    """PyTorch's decomposition of an ATen op: flashc's own for the few whose PyTorch decomposition
    no backend lowers, torch._decomp's, else its CompositeImplicitAutograd kernel; None for other
    ops and for ops that write or alias an argument."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    schema = target._schema
    if schema.is_mutable or any(a.alias_info is not None and a.alias_info.is_write
                                for a in (*schema.arguments, *schema.returns)):
        return None
    if any(a.alias_info is not None for a in (*schema.arguments, *schema.returns)):  # a view (movedim)
        return _eager_kernel(target)  # only the views eager itself makes
    from torch._decomp import decomposition_table

    if target in OWN_DECOMPOSITIONS:
        return OWN_DECOMPOSITIONS[target]
    if target in decomposition_table:
        return decomposition_table[target]
    return _eager_kernel(target)


def decompose_node(graph: fx.Graph, node: fx.Node, lowers: Callable[[fx.Node], bool],
                   depth: int = MAX_DEPTH, params: dict[str, torch.Tensor] | None = None) -> bool:
    """Replace node by the ops of its decomposition (traced on its arguments' shapes), the ops of that
    `lowers` rejects decomposed in turn; False, and the graph untouched, unless that ends in ops
    `lowers` accepts, every step spliced in safely."""
    fn = decomposition_of(node.target) if depth > 0 and _checked_elsewhere(node, params or {}) else None
    traced = _trace(fn, node) if fn is not None else None
    eager_kernel = _eager_kernel(node.target)
    if traced is None and fn is not None and eager_kernel is not None and fn != eager_kernel:
        traced = _trace(eager_kernel, node)  # meshgrid: torch._decomp's views are refused, eager's own are not
    if traced is None:
        return False
    gm, tensor_args = traced
    for inner in list(gm.graph.nodes):
        if inner.op == "call_function" and not lowers(inner) and not decompose_node(
                gm.graph, inner, lowers, depth - 1, {}):
            return False  # e.g. digamma -> prims.digamma: the model's own op is the one to name
    env: dict[fx.Node, Any] = {}
    placeholders = iter(tensor_args)
    source = {k: v for k, v in node.meta.items() if k in NODE_META and k != "val"}
    outputs: Any = None
    with graph.inserting_before(node):
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
            elif n.op == "output":
                outputs = fx.map_arg(n.args[0], env.__getitem__)
            else:
                new = graph.call_function(n.target, fx.map_arg(n.args, env.__getitem__),
                                          fx.map_arg(n.kwargs, env.__getitem__))
                new.meta.update(source)
                new.meta["val"] = n.meta.get("val")
                env[n] = new
    if isinstance(node.meta["val"], torch.Tensor):
        node.replace_all_uses_with(outputs[0])
    else:
        for user in list(node.users):  # operator.getitem(node, i): checked in _trace (i past outputs: unread)
            if user.args[1] < len(outputs):
                user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(node)
    return True


def split_write(graph: fx.Graph, node: fx.Node, lowers: Callable[[fx.Node], bool],
                params: dict[str, torch.Tensor] | None = None) -> bool:
    """An in-place op the backend does not lower (x.index_copy_(...) on TVM) as x.copy_(op(x, ...)): the
    same write to the same storage at the same point, its value computed by the functional op, which is
    decomposed like any other; False, and the graph untouched, unless both then lower."""
    functional = functional_form(node.target)
    if functional is None or written_arguments(node) != [node.args[0]] or node.args[0] in node.args[1:]:
        return False
    with graph.inserting_before(node):
        value = graph.call_function(functional, node.args, node.kwargs)
        write = graph.call_function(torch.ops.aten.copy_.default, (node.args[0], value))
    for new in (value, write):
        new.meta.update({k: v for k, v in node.meta.items() if k in NODE_META})
    if not lowers(write) or not (lowers(value) or decompose_node(graph, value, lowers, params=params)):
        graph.erase_node(write)
        graph.erase_node(value)
        return False
    node.replace_all_uses_with(write)
    graph.erase_node(node)
    return True


def _trace(fn: Callable, node: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]] | None:
    """fn on node's arguments traced to an ATen graph over fake tensors of their shapes, returning a
    list of its results, with the argument nodes its placeholders stand for; None where the result
    cannot be spliced safely."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        if not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users):
            return None
    elif not isinstance(val, torch.Tensor):
        return None
    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    tensor_args = [a for a in flat if isinstance(a, fx.Node)]
    vals = [a.meta.get("val") for a in tensor_args]
    if not all(isinstance(v, torch.Tensor) for v in vals):
        return None
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mode:
        fakes = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype,
                                     device="cpu" if v.device.type == "meta" else v.device) for v in vals]

    def call(*tensors):
        it = iter(tensors)
        args, kwargs = pytree.tree_unflatten([next(it) if isinstance(a, fx.Node) else a for a in flat], spec)
        out = fn(*args, **kwargs)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    try:
        with _without_mkldnn():
            gm = make_fx(call, tracing_mode="fake")(*fakes)
    except Exception:  # no decomposition for these arguments (data-dependent, unsupported dtype, ...)
        return None
    _functionalize_local_writes(gm.graph)
    nodes = list(gm.graph.nodes)
    for n in nodes:  # reshape's copy-then-view, written as the view it is (backends lower view)
        if n.target is torch.ops.aten._unsafe_view.default:
            n.target = torch.ops.aten.view.default
    placeholders = {n for n in nodes if n.op == "placeholder"}
    results = next(n for n in nodes if n.op == "output").args[0]
    if any(n.op in ("get_attr", "call_module", "call_method") for n in nodes):
        return None  # a constant tensor (or a module) the program's graph does not hold
    eager_kernel = fn == _eager_kernel(node.target)  # what eager runs for the op, views included
    if any(not isinstance(r, fx.Node) or (_view_of(r, placeholders) and not eager_kernel) for r in results):
        return None  # an argument (or a view of one) returned as the result would alias it
    if any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable for n in nodes):
        return None  # it writes a tensor: kept out of the graph's write order
    if any(n.target in _CHECKS for n in nodes):
        return None  # the op checks its input's values (one_hot's class range): a backend would drop the check
    got = [r.meta.get("val") for r in results]
    want = list(val) if isinstance(val, (list, tuple)) else [val]
    if len(got) < len(want) and not any(u.args[1] >= len(got) and u.users for u in node.users):
        want = want[:len(got)]  # the first outputs only (OWN_DECOMPOSITIONS): nothing reads the others
    if len(got) != len(want) or any(not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype
                                    for g, w in zip(got, want)):
        return None  # not the node's shapes and dtypes: leave it to the backend's refusal
    return gm, tensor_args


@contextlib.contextmanager
def _without_mkldnn():
    """The portable decomposition: PyTorch's RNN decompositions pick the CPU's oneDNN kernel
    (`mkldnn_rnn`, which no backend lowers) for float32 CPU tensors while oneDNN is enabled."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _functionalize_local_writes(graph: fx.Graph) -> None:
    """A decomposition's write to a tensor it made and reads nowhere else (rms_norm's
    `mean(...).add_(eps)`) as the functional op: the result is the same tensor's new value. Writes
    to anything else stay, and the trace is refused for them."""
    roots = MutationInfo.of(graph)
    for node in list(graph.nodes):
        functional = functional_form(node.target) if node.op == "call_function" else None
        written = node.args[0] if functional is not None and node.args else None
        if (isinstance(written, fx.Node) and written.op == "call_function" and len(written.users) == 1
                and roots.root_of(written) is written):  # a tensor of its own, not a view of another
            node.target = functional


def _view_of(node: fx.Node, roots: set[fx.Node]) -> bool:
    """Whether node is one of roots or a view of one (through ops whose result aliases an argument)."""
    while node not in roots:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not any(r.alias_info for r in schema.returns):
            return False
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
    return True

"""Target-independent cleanup passes: canonicalize, fold constants, CSE, dead code.

These run before fusion so that patterns see one spelling of each computation: no
no-op casts or metadata asserts, weight-only subgraphs (casts, transposes, the causal
mask, rotary tables) folded into constants.

Each keeps the invariant of `flashc.aliasing`: nothing that reads, is, or is a view of
storage the graph writes in place (a KV cache in a buffer, a scratch tensor filled by
slice assignment, a copy that is then written) is folded, merged or dropped.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from flashc.aliasing import MutationInfo
from flashc.ir import Program
from flashc.pass_manager import PassContext, PassResult

aten = torch.ops.aten

# Casts and copies that are identities when dtype (and device) do not change.
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
          aten.type_as.default, aten.alias.default, aten.contiguous.default, aten.clone.default}
_METADATA_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                     aten.sym_constrain_range_for_size.default}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_identity(node: fx.Node, mutations: MutationInfo) -> bool:
    src, out = _val(node.args[0]) if node.args else None, _val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    same = (src.dtype == out.dtype and src.shape == out.shape and src.device == out.device
            and src.stride() == out.stride())
    # A copy (clone, x*1, a cast to the same dtype) of storage that is written later, or
    # that is itself written, keeps a value apart from its source: it must stay.
    if not same or mutations.touches_written(node):
        return False
    if node.target in _CASTS:
        return True
    if node.target in (aten.mul.Tensor, aten.div.Tensor):
        return _is_number(node.args[1]) and node.args[1] == 1
    if node.target in (aten.add.Tensor, aten.sub.Tensor) and node.kwargs.get("alpha", 1) == 1:
        return _adds_nothing(node.args[1], subtract=node.target == aten.sub.Tensor, floating=src.is_floating_point())
    if node.target == aten.dropout.default:
        return _drops_nothing(node)
    return False


def _drops_nothing(node: fx.Node) -> bool:
    """Whether aten.dropout(x, p, train) is x: outside training (nn.Dropout of a model in eval
    mode) or with p == 0 it zeroes nothing and scales by 1."""
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    return train is False or (_is_number(p) and p == 0)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _adds_nothing(value, subtract: bool, floating: bool) -> bool:
    """Whether x + value (x - value) is x for every x. In floating point -0.0 + 0 is +0.0,
    so adding zero is an identity only as -0.0 (and subtracting only as +0.0)."""
    if not _is_number(value) or value != 0:
        return False
    if not floating:
        return True
    negative_zero = isinstance(value, float) and math.copysign(1.0, value) < 0
    return negative_zero != subtract


_MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default}


def _outer_product(node: fx.Node) -> bool:
    """Whether a matmul contracts over one element (``a[..., M, 1] @ b[..., 1, N]``, as Hugging Face's
    rotary tables are spelled: ``inv_freq[None, :, None] @ positions[:, None, :]``): then every output
    element is one product, which the broadcasting multiply computes with the same rounding on every
    backend and whatever the shape (a GEMM kernel chosen per shape may compute it in TF32). Only
    where that multiply's result has the matmul's shape and layout."""
    a, b = (_val(x) for x in node.args[:2])
    out = _val(node)
    if not all(isinstance(t, torch.Tensor) for t in (a, b, out)) or a.dim() < 2 or b.dim() < 2:
        return False
    if a.shape[-1] != 1 or b.shape[-2] != 1 or a.dtype != b.dtype:
        return False
    product = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta") * \
        torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="meta")
    return product.shape == out.shape and product.stride() == out.stride()


class Canonicalize:
    """Remove metadata asserts and identity ops (same-dtype casts, x*1, x+0, aliases, dropout
    outside training or with p = 0); a matmul over a contraction of one element becomes the
    multiply it is (one spelling of an outer product)."""

    name = "canonicalize"
    requires = ("shapes",)
    preserves = ("shapes",)
    establishes = ("canonical",)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        removed_asserts = removed_identities = outer_products = 0
        mutations = MutationInfo.of(program.graph)  # identities removed keep roots: stays valid
        for node in list(program.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _METADATA_ASSERTS:
                program.graph.erase_node(node)
                removed_asserts += 1
            elif _is_identity(node, mutations):
                node.replace_all_uses_with(node.args[0])
                program.graph.erase_node(node)
                removed_identities += 1
            elif node.target in _MATMULS and _outer_product(node):
                node.target, node.args = aten.mul.Tensor, tuple(node.args[:2])
                outer_products += 1
        return PassResult(bool(removed_asserts or removed_identities or outer_products),
                          {"asserts_removed": removed_asserts, "identities_removed": removed_identities,
                           "outer_products_to_multiply": outer_products})


def _is_pure(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags:
        return False
    return t not in _METADATA_ASSERTS


class FoldConstants:
    """Evaluate subgraphs that read only weights and constants; store results as weights.

    This turns the causal mask, rotary cos/sin tables and weight casts/transposes into
    constants. A fold that would blow a small tensor up (e.g. an expand of a bias to a
    huge activation-sized buffer) is skipped to keep the artifact small.
    """

    name = "fold_constants"
    requires = ("shapes",)
    preserves = ("canonical",)
    max_growth = 4  # folded output may hold at most this many times its inputs' elements...
    min_elements_to_limit = 1 << 16  # ...once it is larger than this

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        mutations = MutationInfo.of(program.graph)
        # Weights the graph writes (state such as a KV cache in a buffer) are not constants.
        constant: dict[fx.Node, torch.Tensor | object] = {
            n: program.params[n.name] for n in program.param_nodes() if not mutations.is_written(n)
        }
        folded_nodes: list[fx.Node] = []
        for node in program.graph.nodes:
            # nor is a value that is written later (a scratch tensor, `pos = arange(4); pos += 1`)
            if not _is_pure(node) or mutations.touches_written(node):
                continue
            inputs = node.all_input_nodes
            if any(i not in constant for i in inputs):
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: constant[n])
            with torch.no_grad():
                value = node.target(*args, **kwargs)
            constant[node] = value
            folded_nodes.append(node)
        materialized = 0
        for node in folded_nodes:
            value = constant[node]
            if not isinstance(value, torch.Tensor):
                continue
            if not any(u not in constant for u in node.users) and node.users:
                continue  # only feeds other folded nodes
            if not node.users:
                continue
            in_elems = sum(constant[i].numel() for i in node.all_input_nodes
                           if isinstance(constant[i], torch.Tensor))
            if value.numel() > self.min_elements_to_limit and value.numel() > self.max_growth * max(in_elems, 1):
                continue
            param = program.add_param(f"c_{node.name}", value.contiguous().clone())
            node.replace_all_uses_with(param, delete_user_cb=lambda u: u not in constant)
            materialized += 1
        merged = _merge_equal_constants(program, MutationInfo.of(program.graph))
        program.graph.eliminate_dead_code()
        dropped = program.drop_unused_params()
        return PassResult(bool(materialized or merged),
                          {"constants_folded": materialized, "constants_merged": merged, "weights_dropped": dropped})


def _merge_equal_constants(program: Program, mutations: MutationInfo) -> int:
    """Point uses of equal folded constants (e.g. each layer's copy of the rotary
    tables) at one of them. Only folded constants that nothing writes are compared:
    model weights that are equal by accident stay separate parameters."""
    groups: dict[tuple, list[fx.Node]] = {}
    for node in program.param_nodes():
        t = program.params[node.name]
        if (node.name.startswith("c_") and node.users and t.device.type != "meta"  # meta: no values to compare
                and not mutations.is_written(node)):
            groups.setdefault((t.shape, t.dtype, t.device), []).append(node)
    merged = 0
    for nodes in groups.values():
        kept: list[fx.Node] = []
        for node in nodes:
            value = program.params[node.name]
            same = next((k for k in kept if torch.equal(program.params[k.name], value)), None)
            if same is None:
                kept.append(node)
            else:
                node.replace_all_uses_with(same)
                merged += 1
    return merged


class EliminateCommonSubexpressions:
    """Merge pure nodes that compute the same op on the same arguments."""

    name = "cse"
    requires = ()
    preserves = ("shapes", "canonical")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        seen: dict[tuple, fx.Node] = {}
        merged = 0
        mutations = MutationInfo.of(program.graph)
        for node in list(program.graph.nodes):
            # two reads of written storage may see different values; two fresh tensors
            # that are each written must stay two tensors
            if not _is_pure(node) or mutations.touches_written(node):
                continue
            try:
                key = (node.target, _hashable(node.args), _hashable(node.kwargs))
                hash(key)
            except TypeError:
                continue
            if key in seen:
                node.replace_all_uses_with(seen[key])
                program.graph.erase_node(node)
                merged += 1
            else:
                seen[key] = node
        return PassResult(bool(merged), {"nodes_merged": merged})


def _hashable(x):
    """A key that is equal only for arguments that compute the same thing: True, 1 and
    1.0 differ, and so do 0.0 and -0.0 (their reciprocals are infinities of both signs)."""
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_hashable(i) for i in x))
    if isinstance(x, dict):
        return ("dict", tuple(sorted((k, _hashable(v)) for k, v in x.items())))
    if isinstance(x, float):
        return ("float", repr(x))  # repr tells -0.0 from 0.0 and keeps nan equal to nan
    if isinstance(x, (bool, int)):
        return (type(x).__name__, x)
    if isinstance(x, fx.Node):
        return ("node", x)
    return (type(x).__name__, x)


class EliminateDeadCode:
    """Remove nodes and weights whose results nothing reads."""

    name = "dce"
    requires = ()
    preserves = ("shapes", "canonical")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        before = len(program.graph.nodes)
        program.graph.eliminate_dead_code()
        dropped = program.drop_unused_params()
        removed = before - len(program.graph.nodes)
        return PassResult(bool(removed), {"nodes_removed": removed - dropped, "weights_dropped": dropped})

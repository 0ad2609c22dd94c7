"""The ONNX backend's lowering table: every op it lowers, from the five modules that hold
lowerings (`_aten`: elementwise, reductions, matmuls; `_aten_layout`: views, indexing,
scatter; `_aten_vision`: convolution, batch norm, pooling; `_fused`: flashc's ops onto
ONNX Runtime's contrib ops or standard ops;
`_quantized`: weight-only quantized linears onto MatMulNBits). Every other ATen op goes
through onnxscript's torch library, as torch.onnx lowers it (`_torchlib`, when onnxscript
is installed); flashc's own lowering wins wherever there is one.

Adding an op is one `@lowers(...)` function in one of those modules; this table is where
the backend's coverage is read from (`OnnxBackend.lowering`, fallbacks, refusals).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.fx as fx

from flashc.ir import op_name
from flashc.lowering import LoweringTable

from . import _aten, _aten_layout, _aten_vision, _fused, _quantized, _torchlib
from ._lowering import Lowering, functional_form

# OpOverload -> lowering
_MODULES = (_aten, _aten_layout, _aten_vision, _fused, _quantized)
LOWERINGS: dict[Any, Lowering] = {k: v for m in _MODULES for k, v in m.LOWERINGS.items()}
assert len(LOWERINGS) == sum(len(m.LOWERINGS) for m in _MODULES), "an op has lowerings in two modules"
# ops known and deliberately not lowered -> why, and what to do (the refusal's reason)
REFUSED: dict[Any, str] = dict(_quantized.REFUSED)
_BAGS = ("offsets passed in (PyTorch checks they start at 0 and never decrease; flashc's decomposition, used for "
         "offsets the graph makes, would not) or its other outputs read, and torchlib's EmbeddingBag builds a tensor "
         "sequence ONNX Runtime rejects; use 2-D input, or nn.Embedding and a reduction")
REFUSED.update({op: _BAGS for op in (torch.ops.aten.embedding_bag.default, torch.ops.aten.embedding_bag.padding_idx,
                                      torch.ops.aten._embedding_bag.default,
                                      torch.ops.aten._embedding_bag_forward_only.default)})
# torchlib's functions that answer otherwise than PyTorch at the edges, left to flashc's exact decompositions
# (passes/exact_math.py); an op without one is refused
REFUSED.update({
    torch.ops.aten.log_sigmoid.default: "torchlib's log_sigmoid is -inf for large negative inputs",
    torch.ops.aten.atan2.default: "torchlib's atan2 is NaN for two zeros or two infinities",
    torch.ops.aten.logaddexp.default: "torchlib's logaddexp is NaN for two equal infinities",
    torch.ops.aten.heaviside.default: "torchlib's heaviside gives other values than PyTorch's",
    torch.ops.aten.logit.default: "torchlib's logit fails on flashc's graphs",
    torch.ops.aten.signbit.default: "torchlib's signbit is x < 0, which loses -0.0, and ONNX cannot read a NaN's sign bit",
    torch.ops.aten.logcumsumexp.default: "torchlib's logcumsumexp is NaN where a prefix holds an infinity",
    # left to PyTorch's decomposition (abs, amax: NaN propagates)
    torch.ops.aten.linalg_vector_norm.default: "torchlib's infinity norm passes over NaN",
    # left to PyTorch's own decompositions (log_softmax, nll_loss, ...):
    torch.ops.aten.cross_entropy_loss.default: "torchlib's cross_entropy ignores label smoothing and makes an invalid "
                                               "graph for probability targets",
    torch.ops.aten.mse_loss.default: "torchlib's mse_loss fails on flashc's graphs",
    torch.ops.aten.bitwise_right_shift.Scalar_Tensor: "torchlib's number >> tensor compares an int64 with the "
                                                      "tensor's type: ONNX Runtime refuses the model for other types",
})
# ops of other libraries, by op name
NAMED_LOWERINGS: dict[str, Lowering] = dict(_aten_layout.NAMED_LOWERINGS)


def functional_variant(target: Any) -> Any:
    """aten.foo_.overload -> aten.foo.overload, for an in-place op whose functional form is lowered."""
    functional = functional_form(target)
    return functional if functional in LOWERINGS else None


def find_lowering(node: fx.Node) -> tuple[Lowering, bool] | None:
    """(lowering, in_place) for a call_function node, or None when there is none.

    flashc's own lowerings first; then onnxscript's torchlib for the ATen ops they leave
    (`_torchlib`). An in-place op (add_) lowers through its functional form (add);
    `_in_place` writes the result back into the storage it names.
    """
    if node.target in LOWERINGS:
        return LOWERINGS[node.target], False
    functional = functional_variant(node.target)
    if functional is not None:
        return LOWERINGS[functional], True
    fn = NAMED_LOWERINGS.get(op_name(node))
    if fn is not None:
        return fn, False
    if node.target not in REFUSED and _torchlib.covers(node.target):
        return _torchlib.lower_with_torchlib, node.target._schema.is_mutable
    return None


def why_not_lowered(node: fx.Node) -> str:
    """The reason an op without a lowering gives in the refusal."""
    if node.target in REFUSED:
        return REFUSED[node.target]
    return _torchlib.why_not(node.target)


def _by_name() -> dict[str, Lowering]:
    """The table by op name, as the rest of flashc names ops ('aten.add', 'aten.add_')."""
    out: dict[str, Lowering] = {}
    for target, fn in LOWERINGS.items():
        name = f"{target.namespace}.{target._schema.name.split('::')[-1]}"
        out.setdefault(name, fn)
        if target.namespace == "aten" and not name.split(".")[-1].startswith("_"):
            out.setdefault(name + "_", fn)  # lowered through the functional form (`_in_place`)
    out.update(NAMED_LOWERINGS)
    return out


TABLE = LoweringTable("onnx", _by_name())
"""flashc's own lowerings (what `lowers()` and the tests of flashc's coverage read)."""


@functools.lru_cache(maxsize=1)
def full_table() -> LoweringTable:
    """flashc's lowerings, then the ATen ops onnxscript's torchlib lowers (when installed):
    everything the exporter lowers, so that the compile report lists no fallback for them."""
    return LoweringTable("onnx", {**_torchlib.covered_op_names(), **_by_name()})

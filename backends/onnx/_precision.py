"""fp16/bf16 ops computed in fp32 and rounded after each op, as PyTorch computes them on the CPU.

ONNX Runtime's CPU provider has few fp16 kernels and almost no bf16 ones. For fp16 it
inserts casts to fp32 around each op (its InsertCastTransformer), then drops pairs of
casts it considers redundant and rewrites an explicit Cast(fp32 -> fp16) whose readers
now run in fp32 into a no-op: `(x.half() * 3).float()` comes out computed entirely in
fp32, never rounded to fp16 (measured with onnxruntime 1.32; microsoft/onnxruntime
#8787). bf16 ops fail to load ("Could not find an implementation").

So the exporter makes the rounding explicit: every standard op reading or producing
fp16/bf16 values reads them through Cast(-> fp32), computes in fp32 and rounds each
such result with Cast(-> fp16/bf16). A Cast pair fp32 -> fp16 -> fp32 that loses
precision is kept by ONNX Runtime's optimizers, and no fp16/bf16 value reaches an op
without a kernel for it, so nothing is rewritten behind the model's back. PyTorch's
CPU kernels compute fp16/bf16 elementwise ops, reductions and matmuls in fp32 and round
the result, so the two agree to summation order. ONNX Runtime's fused kernels
(com.microsoft) keep fp16 (they have CPU kernels; their precision notes are in `_fused`);
in bf16 they are computed in fp32 too.
"""

from __future__ import annotations

import onnx_ir as ir

from ._builder import GraphBuilder

LOW = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
FLOAT = ir.DataType.FLOAT

_BOOL_RESULTS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
                 "IsNaN", "IsInf"}
_INDEX_RESULTS = {"ArgMax", "ArgMin"}


def _result_dtypes(node: ir.Node, dtype) -> list:
    """The dtypes of node's outputs, from its inputs' (the ops the exporter emits)."""
    op = node.op_type
    first = dtype(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if op == "Cast":
        return [ir.DataType(node.attributes["to"].as_int())]
    if op in _BOOL_RESULTS:
        return [ir.DataType.BOOL]
    if op in _INDEX_RESULTS:
        return [ir.DataType.INT64]
    if op in ("TopK", "MaxPool"):  # MaxPool's second output: the indices
        return [first, ir.DataType.INT64][:len(node.outputs)]
    if op == "ConstantOfShape":
        value = node.attributes.get("value")
        return [value.as_tensor().dtype if value is not None else FLOAT]
    if op == "Where":
        return [dtype(node.inputs[1])]
    return [first] * len(node.outputs)


class _Dtypes:
    """Each value's dtype: as annotated, else inferred from its producer."""

    def __init__(self) -> None:
        self.known: dict[int, ir.DataType | None] = {}

    def __call__(self, value: ir.Value | None):
        if value is None:
            return None
        if value.dtype is not None:
            return value.dtype
        if id(value) not in self.known:
            producer = value.producer()
            self.known[id(value)] = None
            if producer is not None:
                found = _result_dtypes(producer, self)
                self.known[id(value)] = found[value.index()] if value.index() < len(found) else None
        return self.known[id(value)]


def _cast(b: GraphBuilder, x: ir.Value, to: ir.DataType, name: str, like: ir.Node) -> ir.Node:
    """Cast(x -> to) with output `name`, attributed to the same model code as `like`."""
    node = ir.Node("", "Cast", [x], attributes=[ir.AttrInt64("to", to.value)], name=b.unique(f"{name}/Cast"),
                   metadata_props=dict(like.metadata_props))
    out = node.outputs[0]
    out.name, out.dtype, out.shape = name, to, x.shape
    return node


def compute_low_precision_in_fp32(b: GraphBuilder, nodes: list[ir.Node], outputs: list[ir.Value]) -> list[ir.Node]:
    """nodes with each fp16/bf16 standard op computed in fp32 between explicit casts; outputs
    (the graph outputs) are updated where a value is replaced. Returns the new node list."""
    dtype = _Dtypes()
    widened: dict[int, ir.Value] = {}  # id(low-precision value) -> its fp32 Cast
    out: list[ir.Node] = []
    for node in nodes:
        ins = [dtype(v) for v in node.inputs]
        results = _result_dtypes(node, dtype)
        low = [t for t in ins + results if t in LOW]
        fused = node.domain != ""
        if node.op_type == "Cast" or not low or (fused and ir.DataType.BFLOAT16 not in low):
            for v, t in zip(node.outputs, results):
                if v.dtype is None and t is not None:
                    v.dtype = t
            out.append(node)
            continue
        for i, (v, t) in enumerate(zip(node.inputs, ins)):
            if t in LOW:
                if id(v) not in widened:
                    cast = _cast(b, v, FLOAT, b.unique(f"{v.name}_fp32"), node)
                    out.append(cast)
                    widened[id(v)] = cast.outputs[0]
                node.replace_input_with(i, widened[id(v)])
        if node.op_type == "ConstantOfShape" and "value" in node.attributes:
            value = node.attributes["value"].as_tensor()
            if value.dtype in LOW:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(value.numpy().astype("float32")))
        out.append(node)
        for v, t in zip(node.outputs, results):
            if t not in LOW or not v.name:
                if v.dtype is None and t is not None:
                    v.dtype = t
                continue
            uses = list(v.uses())
            name = v.name
            v.name, v.dtype = b.unique(f"{name}_fp32"), FLOAT
            cast = _cast(b, v, t, name, node)
            rounded = cast.outputs[0]
            for user, index in uses:
                user.replace_input_with(index, rounded)
            for k, o in enumerate(outputs):
                if o is v:
                    outputs[k] = rounded
            out.append(cast)
    return out

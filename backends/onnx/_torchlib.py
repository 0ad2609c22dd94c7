"""ATen ops without a flashc lowering, lowered through onnxscript's torch library (flashc issue #13).

torch.onnx's dynamo exporter lowers ATen ops with onnxscript's "torchlib": one ONNX Script
function per ATen overload, kept with PyTorch's op set. flashc keeps its own lowerings (the
`@lowers` tables) for its fused ops and the ATen ops it maps to ONNX Runtime's kernels; every
other ATen op is lowered here the way torch.onnx lowers it (`torch/onnx/_internal/exporter/
_core.py`, `_handle_call_function_node_with_lowering`):

* the function comes from torch.onnx's registry (`ONNXRegistry.from_torchlib`: onnxscript's
  `torch_lib.registration.default_registry` plus torch's own additions), picked for the
  graph's opset, real-valued overloads only (complex tensors are refused);
* it is called on the node's FX arguments, converted as torch.onnx converts them (tensors to
  ONNX values, dtypes to ONNX data types, devices and layouts to strings, `dtype=None` to -1),
  under torch.onnx's `OpRecorder`, which records the ONNX nodes it emits;
* the recorded nodes form a small model of their own, whose inputs stand for the node's
  arguments: its function calls are inlined and its ops converted from torchlib's opset (18)
  to the graph's by onnxscript's version converter (as `torch.onnx.export(opset_version=...)`
  converts its model; GridSample's modes were renamed at opset 20), and ONNX shape inference
  types its values; the nodes then join flashc's graph, reading the real arguments.

fp16/bf16 on ONNX Runtime's CPU provider (`low_precision_in_fp32`, see `_precision`): the
arguments are widened to fp32, the function computes in fp32 and each result is rounded
once to the node's dtype, as PyTorch's CPU kernels compute an ATen op in fp32 and round its
result (the rule `LoweringContext.opmath` states for flashc's multi-node lowerings). Every
result is cast to the dtype PyTorch gives it where the function computes in another one.

onnxscript is optional: without it (or with a torch.onnx that lacks the exporter), these ops
are refused naming the op, its module and source line, and saying what to install.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import onnx_ir as ir
import torch
import torch.fx as fx

from flashc.ir import module_path, source_location

from . import DEFAULT_OPSET
from ._builder import onnx_dtype
from ._lowering import LoweringContext, NotLowerable, functional_form

INSTALL_ONNXSCRIPT = "pip install onnxscript"
# Model metadata: the ATen ops lowered through torchlib, 'aten.cumprod (1), aten.roll (2)'.
VIA_TORCHLIB_KEY = "flashc.via_torchlib"
TORCHLIB_OPSET = 18  # the opset torchlib's functions are written in (onnxscript.onnx_opset.opset18)


class _Unavailable(Exception):
    """onnxscript or torch.onnx's exporter cannot be imported (the message says which)."""


@functools.lru_cache(maxsize=1)
def _modules() -> dict[str, Any]:
    """The pieces of torch.onnx and onnxscript this module drives, imported on first use."""
    try:
        import onnxscript
        import onnxscript.evaluator
        import onnxscript.values
        from onnx_ir.passes.common import ShapeInferencePass
        from onnxscript import version_converter
        from torch.onnx._internal.exporter import _building, _registration
    except ImportError as e:
        raise _Unavailable(f"onnxscript's torchlib is not available ({e}); install it: {INSTALL_ONNXSCRIPT}") from None
    if not hasattr(_building, "OpRecorder") or not hasattr(_registration.ONNXRegistry, "from_torchlib"):
        raise _Unavailable(f"torch {torch.__version__}'s ONNX exporter has no OpRecorder/ONNXRegistry.from_torchlib")
    return {"onnxscript": onnxscript, "building": _building, "registration": _registration,
            "version_converter": version_converter, "ShapeInferencePass": ShapeInferencePass}


@functools.lru_cache(maxsize=4)
def _registry(opset: int):
    """torch.onnx's registry of torchlib functions for opset (built once: ~1 s)."""
    registration = _modules()["registration"]
    # the registry logs a warning per torchvision op when torchvision is not installed
    log = logging.getLogger(registration.__name__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        if "opset_version" in inspect.signature(registration.ONNXRegistry.from_torchlib).parameters:
            return registration.ONNXRegistry.from_torchlib(opset_version=opset)
        return registration.ONNXRegistry.from_torchlib()  # older torch: torchlib's opset, converted after
    except Exception as e:
        raise _Unavailable(f"torch {torch.__version__} could not build its registry of onnxscript's torchlib "
                           f"functions ({type(e).__name__}: {e})") from e
    finally:
        log.setLevel(level)


def unavailable_reason() -> str | None:
    """Why ATen ops cannot go through torchlib here (onnxscript missing), or None when they can."""
    try:
        _modules()
        _registry(DEFAULT_OPSET)
    except _Unavailable as e:
        return str(e)
    return None


def torchlib_target(target: Any) -> Any:
    """The functional ATen overload whose torchlib function lowers target: target itself when it
    is functional, its functional form when it is an in-place op (`_in_place` writes the result
    back), None when target is not an ATen op. Mutable ops torchlib registers itself (they come
    functionalized in torch.onnx) are not used: flashc's in-place path needs the functional result.
    """
    if not isinstance(target, torch._ops.OpOverload) or target.namespace not in ("aten", "prims"):
        return None
    if target._schema.is_mutable:
        return functional_form(target)
    return target


def _function(target: Any, opset: int):
    """torchlib's real-valued function for target at opset, as torch.onnx's dispatcher picks it
    (custom registrations first, then the first one), or None."""
    decomps = [d for d in _registry(opset).get_decomps(target) if not d.is_complex]
    return decomps[0].onnx_function if decomps else None


def covers(target: Any) -> bool:
    """Whether onnxscript's torchlib lowers this op (an in-place op: its functional form); False
    when onnxscript is not installed."""
    functional = torchlib_target(target)
    if functional is None or unavailable_reason() is not None:
        return False
    return _function(functional, DEFAULT_OPSET) is not None


def covered_op_names() -> dict[str, str]:
    """Op names ('aten.roll', 'aten.roll_') torchlib lowers, as the backend's table names ops."""
    if unavailable_reason() is not None:
        return {}
    out: dict[str, str] = {}
    for key in _registry(DEFAULT_OPSET).functions:
        if not isinstance(key, str) or not key.startswith(("aten::", "prims::")):
            continue  # prims: what PyTorch's decompositions bring in (`passes/decompose.py`: std -> prims.var)
        namespace, _, op = key.partition("::")
        name = f"{namespace}.{op.split('.')[0]}"
        out[name] = "onnxscript torchlib"
        if namespace == "aten" and not op.startswith("_"):
            out[name + "_"] = "onnxscript torchlib"  # in place, through the functional form (`_in_place`)
    return out


def why_not(target: Any) -> str:
    """The refusal of an ATen op flashc does not lower: torchlib has no function, or is missing."""
    if torchlib_target(target) is None:
        return "no ONNX lowering"
    missing = unavailable_reason()
    if missing is not None:
        return f"no ONNX lowering in flashc, and {missing}"
    return "no ONNX lowering (neither flashc's nor onnxscript's torchlib)"


# --- lowering --------------------------------------------------------------------------------


class _Arguments:
    """The node's FX arguments as torch.onnx passes them to torchlib (`_convert_fx_arg_to_onnx_arg`),
    with each tensor a typed stand-in value (an input of the recorded model) for its real value."""

    def __init__(self, ctx: LoweringContext, node: fx.Node) -> None:
        self.ctx = ctx
        self.node = node
        self.stand_ins: dict[fx.Node, ir.Value] = {}
        self.real: dict[int, ir.Value] = {}  # id(stand-in) -> the value it stands for in flashc's graph

    def convert(self, arg: Any) -> Any:
        if arg is None:
            return None
        if isinstance(arg, fx.Node):
            return self._tensor(arg)
        if isinstance(arg, (list, tuple)):
            return [self.convert(a) for a in arg]
        if isinstance(arg, (torch.device, torch.memory_format, torch.layout)):
            return str(arg)
        if isinstance(arg, torch.dtype):
            return onnx_dtype(arg)
        return arg

    def _tensor(self, arg: fx.Node) -> ir.Value:
        if arg in self.stand_ins:
            return self.stand_ins[arg]
        val = arg.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise NotLowerable(f"its argument {arg.name} is not a tensor with a static shape")
        if val.is_complex():
            raise NotLowerable("complex tensors are not lowered to ONNX")
        dtype = self.ctx.opmath(val.dtype)
        stand_in = ir.Value(name=f"{arg.name}_in", type=ir.TensorType(onnx_dtype(dtype)),
                            shape=ir.Shape([int(d) for d in val.shape]))
        self.stand_ins[arg] = stand_in
        self.real[id(stand_in)] = self.ctx.b.cast(self.ctx.v(arg), val.dtype, dtype)
        return stand_in


def lower_with_torchlib(ctx: LoweringContext, node: fx.Node) -> ir.Value | tuple[ir.Value, ...]:
    """Emit the ONNX nodes torchlib's function for node's op records (see the module docstring)."""
    try:
        m = _modules()
        target = torchlib_target(node.target)
        function = _function(target, ctx.b.opset) if target is not None else None
    except _Unavailable as e:
        raise NotLowerable(str(e)) from None
    if function is None:
        raise NotLowerable(f"onnxscript's torchlib has no function for it at opset {ctx.b.opset}")
    vals = node.meta.get("val")
    metas = list(vals) if isinstance(vals, (tuple, list)) else [vals]
    if not all(isinstance(v, torch.Tensor) for v in metas):
        raise NotLowerable("it returns something other than tensors")
    if any(v.is_complex() for v in metas):
        raise NotLowerable("complex tensors are not lowered to ONNX")

    arguments = _Arguments(ctx, node)
    args = [arguments.convert(a) for a in node.args]
    kwargs = {k: arguments.convert(v) for k, v in node.kwargs.items()}
    if "dtype" in kwargs and kwargs["dtype"] is None:
        kwargs["dtype"] = -1  # as torch.onnx passes it

    outputs, recorded, functions = _record(m, function, args, kwargs, len(metas), isinstance(vals, (tuple, list)))
    model = _recorded_model(list(arguments.stand_ins.values()), outputs, recorded, functions)
    _convert_and_type(m, model, ctx.b.opset)
    results = _join(ctx, node, model, arguments.real)

    ctx.via_torchlib[_name(node.target)] += 1
    out = []
    for value, val in zip(results, metas):
        if value.dtype != onnx_dtype(val.dtype):
            value = ctx.b.op("Cast", value, to=onnx_dtype(val.dtype))
        # the shape PyTorch gave the node, not what torchlib's recording inferred: IsNaN's result came out
        # 0-d, and a graph output of that shape is bound as a scalar
        value.shape = ir.Shape([int(d) for d in val.shape])
        out.append(value)
    return tuple(out) if isinstance(vals, (tuple, list)) else out[0]


def _record(m, function, args: list, kwargs: dict, count: int, returns_many: bool):
    """Run the torchlib function under torch.onnx's OpRecorder: (its output values, the nodes it
    recorded, the ONNX functions they call). A list result torchlib returns as one ONNX
    sequence is split with SequenceAt."""
    onnxscript = m["onnxscript"]
    opset = onnxscript.values.Opset("", TORCHLIB_OPSET)
    name = getattr(function, "name", function)
    try:
        recorder = m["building"].OpRecorder(opset, {})  # {}: its constants, shared by this op's nodes
        with onnxscript.evaluator.default_as(recorder):
            outputs = function(*args, **kwargs)
            if returns_many and isinstance(outputs, ir.Value):  # a sequence(tensor) value
                outputs = [opset.SequenceAt(outputs, opset.Constant(value_int=i)) for i in range(count)]
    except Exception as e:
        cause = e.__cause__ or e
        raise NotLowerable(f"onnxscript's torchlib function {name} failed on it "
                           f"({type(cause).__name__}: {str(cause).splitlines()[0][:200]})") from e
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    if len(outputs) != count or not all(isinstance(o, ir.Value) for o in outputs):
        raise NotLowerable(f"onnxscript's torchlib function {name} returned "
                           f"{len(outputs)} values for {count} results")
    functions = []
    for fn in recorder.functions.values():
        functions.append(fn if isinstance(fn, ir.Function) else ir.serde.deserialize_function(fn.to_function_proto()))
    return outputs, recorder.nodes, functions


def _recorded_model(inputs: list[ir.Value], outputs: list[ir.Value], recorded: list[ir.Node],
                    functions: list) -> ir.Model:
    """The recorded nodes the outputs depend on as a model of their own, in torchlib's opset, so
    that onnxscript's and onnx-ir's passes can run on them before they join flashc's graph."""
    needed = {id(o) for o in outputs}
    nodes = []
    for n in reversed(recorded):  # recorded in order: every producer before its readers
        if any(id(o) in needed for o in n.outputs):
            nodes.append(n)
            needed.update(id(i) for i in n.inputs if i is not None)
    nodes.reverse()
    opsets = {"": TORCHLIB_OPSET}
    for fn in functions:
        opsets.setdefault(fn.domain, 1)
        for domain, version in fn.opset_imports.items():
            opsets.setdefault(domain, version)
    # an output that is an argument as it came (torchlib returned it unchanged), or repeated,
    # is an Identity's: a graph output must be computed by the graph, once
    graph_outputs: list[ir.Value] = []
    for o in outputs:
        if o.producer() is None or any(o is g for g in graph_outputs):
            identity = ir.Node("", "Identity", [o], version=TORCHLIB_OPSET)
            nodes.append(identity)
            o = identity.outputs[0]
        graph_outputs.append(o)
    graph = ir.Graph(inputs, graph_outputs, nodes=nodes, opset_imports=opsets)
    return ir.Model(graph, ir_version=10, functions=functions)


def _convert_and_type(m, model: ir.Model, opset: int) -> None:
    """Inline the model's function calls, convert its ops to opset, and infer its values' types."""
    converter = m["version_converter"]
    try:
        if hasattr(converter, "ConvertVersionPass"):
            converter.ConvertVersionPass(target_version=opset, fallback=False)(model)
        else:  # older onnxscript: the converter inlines itself
            converter.convert_version(model, opset)
        # the inlined functions' values keep the shapes their bodies were written with (IsNaN's result in
        # aten_isnan is a scalar there): onnx's inference refuses to contradict them, so it infers them afresh
        for n in model.graph:
            for out in n.outputs:
                out.shape = None
        m["ShapeInferencePass"]()(model)
    except Exception as e:
        raise NotLowerable(f"converting onnxscript's torchlib lowering to opset {opset} failed "
                           f"({type(e).__name__}: {e})") from e
    if model.functions or any(n.domain not in ("", "com.microsoft") for n in model.graph):
        raise NotLowerable("onnxscript's torchlib lowering calls functions that could not be inlined")


def _join(ctx: LoweringContext, node: fx.Node, model: ir.Model, real: dict[int, ir.Value]) -> list[ir.Value]:
    """Move the model's nodes into flashc's graph, reading the real arguments; returns its outputs."""
    graph = model.graph
    results = list(graph.outputs)
    nodes = list(graph)
    graph.outputs.clear()
    graph.remove(nodes)
    for stand_in in graph.inputs:
        for user, index in list(stand_in.uses()):
            user.replace_input_with(index, real[id(stand_in)])
    b = ctx.b
    meta = {"flashc.module": module_path(node), "flashc.source": source_location(node)}
    for n in nodes:
        n.name = b.unique(f"{node.name}/{n.op_type}")
        n.metadata_props.update(meta)
        for out in n.outputs:
            out.name = b.unique(f"{node.name}_{n.op_type.lower()}")
        if n.domain and n.domain not in b.domains:
            b.domains[n.domain] = graph.opset_imports.get(n.domain, 1)
        b.nodes.append(n)
    return results


def _name(target: Any) -> str:
    """'aten.roll' for aten.roll.default (the name the report counts)."""
    return f"{target.namespace}.{target._schema.name.split('::')[-1]}" if isinstance(
        target, torch._ops.OpOverload) else str(target)


def describe(counts: dict[str, int]) -> str:
    """'aten.cumprod (1), aten.roll (2)': the ops lowered through torchlib (model metadata)."""
    return ", ".join(f"{op} ({n})" for op, n in sorted(counts.items()))


def parse(text: str) -> dict[str, int]:
    """The counts `describe` wrote."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        op, _, n = item.rpartition(" (")
        out[op] = int(n.rstrip(")"))
    return out


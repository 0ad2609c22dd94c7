"""Program -> ONNX model: walk the graph, lower each live node, save, check."""

from __future__ import annotations

import operator
import re
from pathlib import Path

import onnx
import onnx_ir as ir
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from flashc.errors import FlashcError
from flashc.ir import Program, upstream

from . import DEFAULT_OPSET, _aten, _aten_layout, _fused  # noqa: F401  (importing registers the lowerings)
from ._builder import GraphBuilder, onnx_dtype
from ._lowering import (LOWERINGS, NAMED_LOWERINGS, LoweringContext, NotLowerable, annotate, find_lowering,
                        unsupported_error)
from .runtime import PRESENT_PREFIX, SHARED_PRESENT_KEY

MIN_OPSET = 20  # Gelu(approximate), ReduceMean/ReduceMax with axes as an input
# Protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024


def lowerable(node: fx.Node) -> bool:
    """Whether the exporter has a lowering for this call_function node's op."""
    return node.target is operator.getitem or find_lowering(node) is not None


def lowers_op(name: str) -> bool:
    """Whether an op, by op_name ('aten.linear', 'flashc.rms_norm', 'aten.div_'), has a lowering."""
    names = {f"{t.namespace}.{t._schema.name.split('::')[-1]}" for t in LOWERINGS} | set(NAMED_LOWERINGS)
    names.add("getitem")
    return name in names or (name.startswith("aten.") and name.endswith("_") and name[:-1] in names)


_VIEW_OPS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "transpose", "permute", "t", "slice",
             "select", "expand", "narrow", "split", "chunk", "unbind", "alias", "flatten", "as_strided"}


def _in_place(node) -> bool:
    """Whether node is a call of an in-place op (a mutable schema: add_, index_copy_)."""
    return isinstance(node, fx.Node) and isinstance(node.target, torch._ops.OpOverload) \
        and node.target._schema.is_mutable


def _written_root(node: fx.Node) -> fx.Node:
    """The tensor an in-place op writes: its first argument, followed through chained in-place ops."""
    target = node.args[0]
    while _in_place(target):
        target = target.args[0]
    return target


def _rebind_in_place(ctx: LoweringContext, node: fx.Node, result) -> None:
    """After x.foo_(...), later readers of x see the result (the graph is lowered in order).

    x may itself be the result of an in-place op (an alias of its first argument): the
    whole chain back to the tensor first written is rebound, so that an input written
    in place ends with its final value. Refused when one of them has views taken
    before the update: they would see it in PyTorch but still hold the old value here.
    """
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    target = node.args[0]
    while True:  # the chain _written_root follows
        for user in target.users:
            if order[user] < order[node] and getattr(user.target, "__name__", "").split(".")[0] in _VIEW_OPS:
                raise NotLowerable(f"in-place update of {target.name}, which has views ({user.name})")
        ctx.values[target] = result
        if not _in_place(target):
            return
        target = target.args[0]


def _written_inputs(program: Program) -> list[fx.Node]:
    """The user inputs the graph writes in place, in input order (a decode step's caches).

    Only inputs that an in-place op writes count, not every input one reads (the
    source of a copy_ is read, not written).
    """
    roots = {_written_root(n) for n in program.op_nodes() if _in_place(n)}
    return [n for n in program.input_nodes() if n in roots]


def _live_nodes(program: Program) -> list[fx.Node]:
    """The call_function nodes the outputs and the in-place writes of inputs depend on, in graph order."""
    roots = [n for n in pytree.tree_leaves(program.graph.output_node().args[0]) if isinstance(n, fx.Node)]
    inputs = set(program.input_nodes())
    roots += [n for n in program.op_nodes() if _in_place(n) and _written_root(n) in inputs]
    live = upstream(roots)
    return [n for n in program.graph.nodes if n in live and n.op == "call_function"]


def check_lowerable(program: Program) -> None:
    """Raise UnsupportedOpError naming every op (with its module and line) that has no lowering."""
    missing = [(n, "no ONNX lowering") for n in _live_nodes(program) if not lowerable(n)]
    if missing:
        raise unsupported_error(missing)


def _output_names(program: Program, count: int) -> list[str]:
    """Output names from the model's output structure ('logits'), else output_<i>."""
    names = [f"output_{i}" for i in range(count)]
    if program.out_spec is not None:
        try:
            tree = pytree.tree_unflatten(list(range(count)), program.out_spec)
            paths = pytree.tree_flatten_with_path(tree)[0]
            for i, (path, _) in enumerate(paths):
                key = "_".join(re.sub(r"\W", "", str(getattr(p, "key", getattr(p, "idx", p)))) for p in path)
                if key:
                    names[i] = key
        except Exception:  # structures pytree cannot rebuild keep positional names
            pass
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def build_model(program: Program, *, opset: int = DEFAULT_OPSET, contrib_ops: bool = True) -> ir.Model:
    """Lower the program to an in-memory ONNX model (weights referenced, not copied)."""
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise FlashcError(f"the ONNX exporter supports opsets {MIN_OPSET} to {onnx.defs.onnx_opset_version()} "
                          f"(this onnx package), got {opset}")
    check_lowerable(program)
    b = GraphBuilder(opset)
    ctx = LoweringContext(program, b, contrib_ops)
    inputs = []
    for node, spec in zip(program.input_nodes(), program.inputs):
        value = ir.Value(name=b.unique(spec.name), shape=ir.Shape(spec.shape),
                         type=ir.TensorType(onnx_dtype(spec.dtype)))
        ctx.values[node] = value
        inputs.append(value)
    leaves = pytree.tree_leaves(program.graph.output_node().args[0])
    written = _written_inputs(program)
    # reserved now, so that no intermediate value takes an output's name
    out_names = [b.unique(n) for n in _output_names(program, len(leaves))]
    present_names = [b.unique(PRESENT_PREFIX + ctx.values[node].name) for node in written]
    problems = []
    for node in _live_nodes(program):
        b.at(node)
        start = len(b.nodes)
        try:
            if node.target is operator.getitem:
                result = ctx.values[node.args[0]][node.args[1]]
            else:
                lowering, in_place = find_lowering(node)
                result = lowering(ctx, node)
                if in_place:
                    _rebind_in_place(ctx, node, result)
        except NotLowerable as e:
            problems.append((node, str(e)))
            continue
        ctx.values[node] = result
        _name_results(b, node, result, start)
    if problems:
        raise unsupported_error(problems)
    b.at(None)
    outputs = _graph_outputs(ctx, leaves + written, out_names + present_names, inputs)
    nodes, initializers = _needed(b, outputs)
    input_values = dict(zip(program.input_nodes(), inputs))
    shared = [input_values[node].name for node, present in zip(written, outputs[len(leaves):])
              if _may_share_buffer(input_values[node], present, nodes)]
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers,
                     opset_imports=dict(b.domains), name="flashc")
    ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)], ignore_unknown=True)
    model = ir.Model(graph, ir_version=max(ir_version, 10), producer_name="flashc")
    model.metadata_props["flashc.inputs"] = ", ".join(s.describe() for s in program.inputs)
    if shared:
        model.metadata_props[SHARED_PRESENT_KEY] = ",".join(shared)
    return model


def _may_share_buffer(value: ir.Value, present: ir.Value, nodes: list[ir.Node]) -> bool:
    """Whether present (the new value of the input value) may be written into value's buffer:
    every node reading value writes present or feeds the node that does, so it has run
    by then, whatever order ONNX Runtime picks (a decode step: GroupQueryAttention or
    ScatterElements reads the cache and writes its present output)."""
    writer = present.producer()
    before, stack = set(), [writer]
    while stack:
        node = stack.pop()
        if node is None or id(node) in before:
            continue
        before.add(id(node))
        stack.extend(i.producer() for i in node.inputs if i is not None)
    return all(id(n) in before for n in nodes if any(i is value for i in n.inputs))


def _needed(b: GraphBuilder, outputs: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value]]:
    """The nodes and initializers the outputs depend on; a lowering may leave values unread
    (e.g. the cos/sin computation whose values RotaryEmbedding's tables replace)."""
    needed = {id(v) for v in outputs}
    nodes = []
    for node in reversed(b.nodes):
        if any(id(o) in needed for o in node.outputs):
            nodes.append(node)
            needed.update(id(i) for i in node.inputs if i is not None)
    return nodes[::-1], [v for v in b.initializers if id(v) in needed]


def _name_results(b: GraphBuilder, node: fx.Node, result, start: int) -> None:
    """Name the values this node's lowering created after the node, with its dtype and shape."""
    fresh = {id(o) for n in b.nodes[start:] for o in n.outputs}
    vals = node.meta.get("val")
    results = result if isinstance(result, tuple) else (result,)
    metas = vals if isinstance(vals, (tuple, list)) else (vals,)
    for value, meta in zip(results, metas):
        if isinstance(value, ir.Value) and id(value) in fresh:
            if len(results) == 1:
                value.name = b.unique(node.name)
            annotate(value, meta)


def _graph_outputs(ctx: LoweringContext, leaves: list, names: list[str], inputs: list[ir.Value]) -> list[ir.Value]:
    """The graph outputs, named; an Identity where a value is an input, a weight or repeated.

    leaves: the model's outputs, then the inputs written in place (their final values).
    """
    if not all(isinstance(n, fx.Node) for n in leaves):
        raise FlashcError("the ONNX exporter needs every model output to be a tensor computed by the graph")
    outputs, used = [], set()
    for node, name in zip(leaves, names):
        value = ctx.v(node)
        if id(value) in used or value in inputs or value.const_value is not None:
            value = ctx.b.op("Identity", value)
        used.add(id(value))
        value.name = name
        annotate(value, node.meta.get("val"))
        outputs.append(value)
    return outputs


def export_onnx(program: Program, path: str | Path, *, opset: int = DEFAULT_OPSET,
                external_data: bool | None = None, contrib_ops: bool = True) -> Path:
    """Write the program as an ONNX model at path and check it; returns the path.

    external_data: store the weights in `<name>.data` next to the model (None: only
    when they exceed ~1.5 GB, protobuf's 2 GB limit minus a margin). contrib_ops: map
    flashc's fused ops to ONNX Runtime's fused kernels (see `_fused`); False emits
    standard ONNX ops only, for runtimes without the com.microsoft domain.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(program, opset=opset, contrib_ops=contrib_ops)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_THRESHOLD
    if external_data:
        ir.save(model, path, external_data=f"{path.name}.data", size_threshold_bytes=1024)
    else:
        if weight_bytes > EXTERNAL_DATA_THRESHOLD:
            raise FlashcError(f"{weight_bytes / 2**30:.1f} GiB of weights do not fit one ONNX file "
                              "(protobuf's 2 GB limit); export with external_data=True")
        ir.save(model, path)
    try:
        onnx.checker.check_model(str(path))  # path-based: follows external data, no 2 GB limit
    except onnx.checker.ValidationError as e:
        raise FlashcError(f"the exported ONNX model at {path} fails onnx.checker: {e}") from e
    return path

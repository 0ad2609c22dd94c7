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
from flashc.storage import Storage, is_write

from . import DEFAULT_OPSET
from ._builder import GraphBuilder, onnx_dtype
from ._in_place import lower_write
from ._lowering import LoweringContext, NotLowerable, annotate, unsupported_error
from ._torchlib import VIA_TORCHLIB_KEY, describe
from .table import find_lowering, full_table, why_not_lowered
from ._precision import compute_low_precision_in_fp32
from .runtime import PRESENT_PREFIX, SHARED_PRESENT_KEY, STATE_KEY

MIN_OPSET = 20  # Gelu(approximate), ReduceMean/ReduceMax with axes as an input
# Protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024


def lowerable(node: fx.Node) -> bool:
    """Whether the exporter has a lowering for this call_function node's op."""
    return node.target is operator.getitem or find_lowering(node) is not None


def lowers_op(name: str) -> bool:
    """Whether an op, by op_name ('aten.linear', 'flashc.rms_norm', 'aten.div_'), has a lowering
    (flashc's own or, for ATen ops, onnxscript's torchlib)."""
    return full_table().lowers(name)


def _lower_node(ctx: LoweringContext, storage: Storage, node: fx.Node):
    if node.target is operator.getitem:
        return ctx.values[node.args[0]][node.args[1]]
    lowering, _ = find_lowering(node)
    if is_write(node):
        return lower_write(ctx, storage, node, lowering)
    return lowering(ctx, node)


def _live_nodes(program: Program, storage: Storage) -> list[fx.Node]:
    """The call_function nodes the outputs depend on, in graph order, with every write whose
    effect is seen: writes to inputs and weights/buffers (the caller and the next call see
    them) and writes to storage that a live node reads afterwards."""
    output = program.graph.output_node()
    leaves = [n for n in pytree.tree_leaves(output.args[0]) if isinstance(n, fx.Node)]
    kept = [w for root, writes in storage.writes.items() if root.op == "placeholder" for w in writes]
    live = upstream(leaves + kept) | {output}
    while True:
        more = [w for root, writes in storage.writes.items() for w in writes
                if w not in live and storage.read_after(root, w, live)]
        if not more:
            break
        live |= upstream(more)
    return [n for n in program.graph.nodes if n in live and n.op == "call_function"]


def _plan(program: Program) -> tuple[Storage, list[fx.Node]]:
    """The program's storage facts and the nodes to lower; UnsupportedOpError naming every op
    (with its node, module and line) that has no lowering or whose in-place write cannot be carried."""
    storage = Storage(program.graph)
    if storage.problems:
        raise unsupported_error(storage.problems)
    live = _live_nodes(program, storage)
    missing = [(n, why_not_lowered(n)) for n in live if not lowerable(n)]
    if missing:
        raise unsupported_error(missing)
    return storage, live


def check_lowerable(program: Program) -> None:
    """Raise UnsupportedOpError naming every op that the exporter cannot lower (see `_plan`)."""
    _plan(program)


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


def build_model(program: Program, *, opset: int = DEFAULT_OPSET, contrib_ops: bool = True,
                low_precision_in_fp32: bool = True) -> ir.Model:
    """Lower the program to an in-memory ONNX model (weights referenced, not copied).

    low_precision_in_fp32: compute fp16/bf16 ops in fp32 and round each result (`_precision`),
    as PyTorch does; for ONNX Runtime's CPU provider. Weights/buffers the graph writes in place
    become graph inputs after the user inputs (metadata STATE_KEY), each with a present output.
    """
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise FlashcError(f"the ONNX exporter supports opsets {MIN_OPSET} to {onnx.defs.onnx_opset_version()} "
                          f"(this onnx package), got {opset}")
    storage, live = _plan(program)
    b = GraphBuilder(opset)
    ctx = LoweringContext(program, b, contrib_ops, low_precision_in_fp32)
    written = storage.written_placeholders(program.input_nodes())
    state = storage.written_placeholders(list(program.param_nodes()))
    ctx.state = set(state)
    inputs = []
    for node, spec in zip(program.input_nodes(), program.inputs):
        inputs.append(_graph_input(b, spec.name, spec.shape, spec.dtype))
        ctx.values[node] = inputs[-1]
    for node in state:  # after the user inputs: the runtime feeds them from the model's state
        t = program.params[node.name]
        inputs.append(_graph_input(b, node.name, t.shape, t.dtype))
        ctx.values[node] = inputs[-1]
    leaves = pytree.tree_leaves(program.graph.output_node().args[0])
    kept = written + state
    input_values = {node: ctx.values[node] for node in kept}  # before the writes rebind them
    # reserved now, so that no intermediate value takes an output's name
    out_names = [b.unique(n) for n in _output_names(program, len(leaves))]
    present_names = [b.unique(PRESENT_PREFIX + input_values[node].name) for node in kept]
    problems, failed, cause = [], set(), None
    for node in live:
        if any(a in failed for a in node.all_input_nodes):
            failed.add(node)  # reported through the node that failed first
            continue
        b.at(node)
        start = len(b.nodes)
        try:
            result = _lower_node(ctx, storage, node)
        except NotLowerable as e:
            problems.append((node, str(e)))
            failed.add(node)
            continue
        except Exception as e:  # a lowering meeting a case it did not foresee: never a raw error
            problems.append((node, f"the lowering failed ({type(e).__name__}: {e}); "
                                   "please report it with the model"))
            failed.add(node)
            cause = cause or e
            continue
        ctx.values[node] = result
        _name_results(b, node, result, start)
    if problems:
        raise unsupported_error(problems) from cause
    b.at(None)
    outputs = _graph_outputs(ctx, leaves + kept, out_names + present_names, inputs)
    nodes, initializers = _needed(b, outputs)
    if low_precision_in_fp32:
        nodes = compute_low_precision_in_fp32(b, nodes, outputs)
    shared = [input_values[node].name for node, present in zip(kept, outputs[len(leaves):])
              if _may_share_buffer(input_values[node], present, nodes)]
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers,
                     opset_imports=dict(b.domains), name="flashc")
    ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)], ignore_unknown=True)
    model = ir.Model(graph, ir_version=max(ir_version, 10), producer_name="flashc")
    model.metadata_props["flashc.inputs"] = ", ".join(s.describe() for s in program.inputs)
    if shared:
        model.metadata_props[SHARED_PRESENT_KEY] = ",".join(shared)
    if state:
        model.metadata_props[STATE_KEY] = ",".join(input_values[node].name for node in state)
    if ctx.via_torchlib:
        model.metadata_props[VIA_TORCHLIB_KEY] = describe(ctx.via_torchlib)
    return model


def _graph_input(b: GraphBuilder, name: str, shape, dtype: torch.dtype) -> ir.Value:
    return ir.Value(name=b.unique(name), shape=ir.Shape([int(d) for d in shape]), type=ir.TensorType(onnx_dtype(dtype)))


# ONNX Runtime may give these ops' output the input's own buffer (no copy): reading their
# output is reading the input's memory.
_ALIASING_OPS = {"Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
# Ops whose kernels stay correct when their output buffer is this input's: elementwise ops
# read element i before writing element i; the scatters copy their data input to the
# output (a no-op then) before scattering; GroupQueryAttention is made for past == present.
_IN_PLACE_SAFE = {"Add", "Sub", "Mul", "Div", "Where", "Neg", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log",
                  "Sqrt", "Reciprocal", "Max", "Min", "Pow", "Erf", "Floor", "Ceil", "Sin", "Cos", "Cast", "Not",
                  "And", "Or", "Xor"}
_WRITES_OVER_INPUT = {("", "ScatterElements"): 0, ("", "ScatterND"): 0,
                      ("com.microsoft", "GroupQueryAttention"): None}


def _may_share_buffer(value: ir.Value, present: ir.Value, nodes: list[ir.Node]) -> bool:
    """Whether present (the new value of the input value) may be written into value's buffer.

    Every node reading value's memory (value, or an output ONNX Runtime may alias to it)
    must be an ancestor of the node writing present, so it has run by then, whatever
    order ONNX Runtime picks; the writer itself may read it only when its kernel is
    correct with input and output in one buffer (`_IN_PLACE_SAFE`, `_WRITES_OVER_INPUT`:
    a decode step's GroupQueryAttention or ScatterElements cache write). A Gather or a
    Transpose writing over its own input would read elements it already overwrote.
    """
    writer = present.producer()
    before, stack = set(), [i.producer() for i in writer.inputs if i is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in before:
            continue
        before.add(id(node))
        stack.extend(i.producer() for i in node.inputs if i is not None)
    memory, stack = {id(value)}, [value]
    while stack:
        v = stack.pop()
        for use in v.uses():
            user = use.node
            if user.domain == "" and user.op_type in _ALIASING_OPS and id(user.outputs[0]) not in memory:
                memory.add(id(user.outputs[0]))
                stack.append(user.outputs[0])
    for node in nodes:
        reads = [k for k, i in enumerate(node.inputs) if i is not None and id(i) in memory]
        if not reads or id(node) in before:
            continue
        if node is not writer or not _writes_in_place_safely(node, reads, present):
            return False
    return True


def _writes_in_place_safely(node: ir.Node, reads: list[int], present: ir.Value) -> bool:
    if (node.domain, node.op_type) in _WRITES_OVER_INPUT:
        allowed = _WRITES_OVER_INPUT[node.domain, node.op_type]
        return allowed is None or reads == [allowed]
    if node.domain != "" or node.op_type not in _IN_PLACE_SAFE or present.shape is None:
        return False
    return all(node.inputs[k].shape is not None and list(node.inputs[k].shape) == list(present.shape)
               for k in reads)


def _needed(b: GraphBuilder, outputs: list[ir.Value]) -> tuple[list[ir.Node], list[ir.Value]]:
    """The nodes and initializers the outputs depend on; a lowering may leave values unread
    (e.g. the cos/sin computation whose values RotaryEmbedding's tables replace)."""
    needed = {id(v) for v in outputs}
    nodes = []
    for node in reversed(b.nodes):
        if any(id(o) in needed for o in node.outputs):
            nodes.append(node)
            needed.update(id(i) for i in _reads(node))
    return nodes[::-1], [v for v in b.initializers if id(v) in needed]


def _reads(node: ir.Node) -> list[ir.Value]:
    """The values a node reads: its inputs, and those its subgraphs (an If's branches, a Loop's
    body, as torchlib's functions emit them) read from the graph around them."""
    reads = [i for i in node.inputs if i is not None]
    for attr in node.attributes.values():
        graphs = (attr.value,) if attr.type == ir.AttributeType.GRAPH else (
            tuple(attr.value) if attr.type == ir.AttributeType.GRAPHS else ())
        for graph in graphs:
            for inner in graph:
                reads.extend(_reads(inner))  # inner values too: no node outside produces them
    return reads


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
                external_data: bool | None = None, contrib_ops: bool = True,
                low_precision_in_fp32: bool = True) -> Path:
    """Write the program as an ONNX model at path and check it; returns the path.

    external_data: store the weights in `<name>.data` next to the model (None: only
    when they exceed ~1.5 GB, protobuf's 2 GB limit minus a margin). contrib_ops: map
    flashc's fused ops to ONNX Runtime's fused kernels (see `_fused`); False emits
    standard ONNX ops only, for runtimes without the com.microsoft domain.
    low_precision_in_fp32: see `build_model`. Every failure is a FlashcError.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        model = build_model(program, opset=opset, contrib_ops=contrib_ops,
                            low_precision_in_fp32=low_precision_in_fp32)
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
        onnx.checker.check_model(str(path))  # path-based: follows external data, no 2 GB limit
    except FlashcError:
        raise
    except onnx.checker.ValidationError as e:
        raise FlashcError(f"the exported ONNX model at {path} fails onnx.checker: {e}") from e
    except Exception as e:
        raise FlashcError(f"exporting to ONNX at {path} failed ({type(e).__name__}: {e}); "
                          "compile for target cpu, or report the model") from e
    return path

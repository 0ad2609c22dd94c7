"""The work of a model, from its optimized flashc Program, in a form that scales with tokens.

A Program is captured at one shape (batch 1, T tokens). The planner needs the same model
at any batch, prompt length and context, so each op of the optimized graph becomes an
`Op` whose sizes are per token: matmuls keep their weight shape (K x N), attention its
heads and head size, MoE its experts, vector ops their elements per token (or per pair of
query and key tokens, for masks) and their operations per element (`flashc.cost_model`).
View ops move no data and disappear; the ops reading them read their source instead.

Real-size models are captured on the meta device with a few decoder layers
(`capture_workload`): the layers of a zoo architecture are identical, so the captured
layer 1 (checked equal to layer 2) is repeated for layers 1 to L-1. Layer 0 is kept as
captured (it holds the first layer's input norm, which later layers share with the
previous layer's residual add).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from flashc.cost_model import VIEW_OPS, layer_of, node_flops
from flashc.errors import FlashcError, InputError
from flashc.ir import Program, op_name

# Weight precisions a plan can take: bytes per weight, the dtype the matrix units compute in.
# int4 is weight-only (dequantized before the matrix units); int8 is W8A8; fp8 computes in
# fp8 where the chip has it (SystemProfile.ops_for falls back to its bf16/fp16 rate).
PRECISIONS: dict[str, tuple[float, str]] = {
    "bf16": (2.0, "bfloat16"),
    "fp8": (1.0, "float8"),
    "int8": (1.0, "int8"),
    "int4": (0.5, "bfloat16"),
}
ACTIVATION_BYTES = 2  # activations, KV cache, norm weights and biases stay in bf16/fp16

# Vector ops that reduce over the last dimension: with that dimension split over chips
# (tensor parallelism) their input is gathered first.
REDUCTIONS = {"aten.mean", "aten.sum", "aten.amax", "aten.amin", "aten.max", "aten.softmax", "aten._softmax",
              "aten.log_softmax", "aten._log_softmax", "aten.argmax", "aten.topk", "aten.sort", "aten.var",
              "aten.layer_norm", "aten.native_layer_norm", "flashc.rms_norm", "flashc.add_rms_norm",
              "aten.cumsum"}
ATTENTION_OPS = {"flashc.attention", "flashc.decode_attention", "aten.scaled_dot_product_attention",
                 "aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_efficient_attention",
                 "aten._scaled_dot_product_flash_attention"}
MATMUL_OPS = {"aten.linear", "aten.mm", "aten.matmul", "aten.bmm", "aten.addmm"}
# Ops that write some values into a larger tensor (a KV cache): they move the values written,
# not the whole destination they return. op -> position of the written values.
WRITES = {"aten.index_copy_": 3, "aten.index_copy": 3, "aten.index_put_": 2, "aten.index_put": 2,
          "aten.copy_": 1, "aten.slice_scatter": 1, "aten.select_scatter": 1}


@dataclass(frozen=True)
class Op:
    """One op of the model, sized per token. `inputs` are indices of the ops it reads."""

    index: int
    name: str
    op: str  # the flashc/aten op name ('aten.linear', 'flashc.attention', ...)
    kind: str  # "matmul", "attention", "moe", "embedding", "vector"
    layer: int  # decoder layer index; -1 before the first layer, a large number after the last
    inputs: tuple[int, ...]
    k: int = 0  # matmul/moe: input features; embedding: hidden size
    n: int = 0  # matmul: output features; embedding: vocabulary
    heads: int = 0  # attention: query heads, key/value heads, head size
    kv_heads: int = 0
    head_dim: int = 0
    experts: int = 0  # moe: experts, experts per token, hidden size of one expert's MLP
    top_k: int = 0
    ffn: int = 0
    out_elements: float = 0.0  # elements of the output per token (per query-key pair if pair_scaled)
    in_elements: float = 0.0  # elements of the activation inputs, same unit
    ops_per_element: float = 0.0  # vector ops: operations per output element
    pair_scaled: bool = False  # vector ops sized by query x key tokens (attention masks)
    constant: bool = False  # vector ops whose size does not depend on tokens
    reduces: bool = False  # vector op reducing over the last dimension
    small_params: int = 0  # norm weights, biases (kept in bf16)
    act_operand: float = 0.0  # matmul of two activations: elements of the second operand per token
    weight: str = ""  # name of the weight matrix it reads (tied weights share one), "" if none

    @property
    def weight_params(self) -> int:
        """Parameters stored at the plan's weight precision."""
        if self.kind == "matmul":
            return self.k * self.n
        if self.kind == "moe":
            return self.experts * 3 * self.k * self.ffn
        if self.kind == "embedding":
            return self.k * self.n
        return 0


@dataclass
class Workload:
    """The ops of one model (topological order), sized per token, plus what the plan reports."""

    model: str
    ops: list[Op]
    layers: int
    captured_tokens: int
    notes: list[str] = field(default_factory=list)

    def _unique(self) -> list[Op]:
        """Ops with their own weights: a weight that two ops read (tied embeddings) counts once."""
        seen, out = set(), []
        for o in self.ops:
            if o.weight and o.weight in seen:
                continue
            seen.add(o.weight)
            out.append(o)
        return out

    @property
    def parameters(self) -> int:
        return sum(o.weight_params + o.small_params for o in self._unique())

    def weight_bytes(self, precision: str) -> float:
        """Bytes of the model's weights at a precision (a tied weight once; a pipeline that
        puts its two readers on different chips holds it twice, see partition)."""
        per_weight, _ = PRECISIONS[precision]
        return sum(o.weight_params * per_weight + o.small_params * ACTIVATION_BYTES for o in self._unique())

    def kv_bytes(self, batch: int, context: int) -> float:
        return sum(kv_cache_bytes(o, batch, context) for o in self.ops if o.kind == "attention")


def kv_cache_bytes(op: Op, batch: int, context: int, kv_heads: int | None = None) -> float:
    """Bytes of the keys and values an attention op keeps for batch sequences of context tokens."""
    heads = op.kv_heads if kv_heads is None else kv_heads
    return 2.0 * batch * context * heads * op.head_dim * ACTIVATION_BYTES


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


# ---------------------------------------------------------------------------------------
# From an optimized Program.


def extract_workload(program: Program, model: str = "model") -> Workload:
    """The per-token ops of an optimized Program captured at batch 1 (or B) and T tokens."""
    if not program.inputs:
        raise FlashcError("the program has no inputs; the planner sizes work per input token")
    shape = program.inputs[0].shape
    if len(shape) != 2 or program.inputs[0].dtype.is_floating_point:
        raise FlashcError(f"the planner reads token-id models (input [batch, tokens] of integers); "
                          f"{program.inputs[0].describe()} is not one")
    batch, tokens = shape
    rows = batch * tokens
    source: dict[fx.Node, int] = {}  # node -> index of the op whose output it is (views pass through)
    ops: list[Op] = []
    layer = -1
    seen_layers: list[int] = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node)
        tensor_inputs = [a for a in node.all_input_nodes if a.name not in program.params]
        deps = tuple(sorted({source[a] for a in tensor_inputs if a in source}))
        if name in VIEW_OPS or node.target is operator.getitem:
            if deps:
                source[node] = deps[0]
            continue
        val = node.meta.get("val")
        outs = _tensors(val)
        if not outs:
            continue
        layer = _layer_index(node, layer)
        if layer >= 0 and layer not in seen_layers:
            seen_layers.append(layer)
        made = _make_op(program, node, name, len(ops), layer, deps, rows, tokens)
        source[node] = made.index
        ops.append(made)
    last = max(seen_layers) if seen_layers else 0
    # ops after the last decoder layer (final norm, lm_head) are labelled past it
    ops = [replace(o, layer=last + 1) if o.layer == AFTER_LAYERS else o for o in ops]
    return Workload(model, ops, last + 1 if seen_layers else 0, tokens)


def _tensors(val) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


AFTER_LAYERS = -2  # marks ops after the last decoder layer while extracting


def _layer_index(node: fx.Node, current: int) -> int:
    """The decoder layer of node, from its module path ('model.layers.3' -> 3). Ops that
    fusion created have no module path and belong with the op before them; ops of a named
    module outside the layers (final norm, lm_head) come after the last layer once a layer
    was seen, before the first one otherwise (embedding, rotary tables)."""
    path = layer_of(node)
    last = path.split(".")[-1]
    if last.isdigit():
        return int(last)
    if path in ("<model>", ""):
        return current
    return AFTER_LAYERS if current >= 0 or current == AFTER_LAYERS else current


def _param_of(program: Program, arg) -> torch.Tensor | None:
    """The weight an argument reads, through views (transposes, reshapes); None for activations."""
    name = _param_name(program, arg)
    return program.params[name] if name else None


def _param_name(program: Program, arg) -> str:
    """The placeholder name of the weight an argument reads through views ("" if none)."""
    for _ in range(8):
        if not isinstance(arg, fx.Node):
            return ""
        if arg.op == "placeholder":
            return arg.name if arg.name in program.params else ""
        if op_name(arg) not in VIEW_OPS or not arg.args:
            return ""
        arg = arg.args[0]
    return ""


def _numel(t) -> int:
    return int(t.numel()) if isinstance(t, torch.Tensor) else 0


def _make_op(program: Program, node: fx.Node, name: str, index: int, layer: int, deps: tuple[int, ...],
             rows: int, tokens: int) -> Op:
    outs = _tensors(node.meta.get("val"))
    base = dict(index=index, name=node.name, op=name, layer=layer, inputs=deps)
    small = sum(_numel(program.params.get(a.name)) for a in node.all_input_nodes
                if a.name in program.params and program.params[a.name].dim() <= 1)
    if name.startswith("flashc.linear"):  # a quantized linear (packed weights): sized by its activations
        x, out = _val(node.args[0]), outs[0]
        k, n = int(x.shape[-1]), int(out.shape[-1])
        return Op(**base, kind="matmul", k=k, n=n, out_elements=out.numel() / rows, in_elements=x.numel() / rows)
    if name in MATMUL_OPS:
        weight = None
        operands = list(node.args[:2]) if name != "aten.addmm" else list(node.args[1:3])
        for i, a in enumerate(operands):
            w = _param_of(program, a)
            if w is not None and w.dim() == 2:
                weight = (i, w)
                break
        out = outs[0]
        if weight is not None:
            i, w = weight
            if name == "aten.linear":
                n, k = w.shape
            else:  # x @ W (W as stored, or a transposed view of it): K is x's last dim
                k = _val(operands[1 - i]).shape[-1] if i == 1 else w.shape[0]
                n = out.shape[-1]
                if k * n != w.numel():
                    k, n = w.shape[1], w.shape[0]
            bias = node.args[2] if name == "aten.linear" and len(node.args) > 2 else None
            small = _numel(program.params.get(bias.name)) if isinstance(bias, fx.Node) else 0
            return Op(**base, kind="matmul", k=int(k), n=int(n), out_elements=out.numel() / rows,
                      in_elements=out.numel() / rows * k / n, small_params=small,
                      weight=_param_name(program, operands[i]))
        # two activations (attention written out by hand): a matmul with no weights
        a, b = (_val(x) for x in operands)
        per = out.numel()
        pair = _pair_scaled(out, tokens)
        scale = rows * (tokens if pair else 1)
        return Op(**base, kind="vector", out_elements=per / scale, in_elements=(_numel(a) + _numel(b)) / scale,
                  ops_per_element=2.0 * a.shape[-1], pair_scaled=pair, act_operand=_numel(b) / scale)
    if name in ATTENTION_OPS:
        q, k = _val(node.args[0]), _val(node.args[1])
        _, heads, _, head_dim = q.shape
        return Op(**base, kind="attention", heads=int(heads), kv_heads=int(k.shape[1]), head_dim=int(head_dim),
                  out_elements=outs[0].numel() / rows, in_elements=3 * q.numel() / rows)
    if name == "flashc.moe":
        x, _, gate_up, down = (_val(a) for a in node.args[:4])
        experts, hidden, ffn = down.shape
        return Op(**base, kind="moe", k=int(hidden), experts=int(experts), top_k=int(node.args[4]), ffn=int(ffn),
                  weight=_param_name(program, node.args[2]),
                  out_elements=outs[0].numel() / rows, in_elements=x.numel() / rows)
    if name == "aten.embedding":
        w = _param_of(program, node.args[0])
        if w is not None:
            return Op(**base, kind="embedding", k=int(w.shape[1]), n=int(w.shape[0]),
                      weight=_param_name(program, node.args[0]),
                      out_elements=outs[0].numel() / rows)
    if name in WRITES and len(node.args) > WRITES[name] and _val(node.args[WRITES[name]]) is not None:
        written = _val(node.args[WRITES[name]]).numel()
        return Op(**base, kind="vector", out_elements=written / rows, in_elements=written / rows,
                  ops_per_element=1.0)
    out_numel = sum(t.numel() for t in outs)
    pair = _pair_scaled(outs[0], tokens)
    constant = not pair and tokens not in outs[0].shape and outs[0].numel() > 0 and tokens > 1
    scale = 1 if constant else rows * (tokens if pair else 1)
    in_numel = sum(_numel(_val(a)) for a in node.all_input_nodes if a.name not in program.params)
    flops = node_flops(node)
    return Op(**base, kind="vector", out_elements=out_numel / scale, in_elements=in_numel / scale,
              ops_per_element=flops / max(out_numel, 1), pair_scaled=pair, constant=constant,
              reduces=name in REDUCTIONS, small_params=small)


def _val(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _pair_scaled(t: torch.Tensor, tokens: int) -> bool:
    """Sized by query x key tokens: two dimensions equal to the captured token count."""
    return tokens > 1 and sum(1 for d in t.shape if d == tokens) >= 2


# ---------------------------------------------------------------------------------------
# Real-size models: capture a few layers on the meta device and repeat one.

CAPTURE_TOKENS = 7  # prime and smaller than any head count of the zoo: a token dim is never mistaken


def capture_workload(name: str, level: int = 3, dtype: torch.dtype = torch.bfloat16,
                     layers_to_capture: int = 3) -> Workload:
    """The workload of a zoo model (or a path/to/file.py:factory) at full size.

    Zoo models with random weights are built on the meta device with `layers_to_capture`
    decoder layers, captured at CAPTURE_TOKENS tokens, optimized at `level`; the captured
    layer 1 (checked equal to layer 2) stands for layers 1..L-1 (`repeat_layers`). Other
    models are captured whole.
    """
    from flashc import zoo
    from flashc.capture import capture
    from flashc.models import build_model, is_factory
    from flashc.pass_manager import PassContext, PassManager
    from flashc.pipelines import pipeline
    from flashc.profiles import get_profile
    from flashc.compiled import ModelSource

    if is_factory(name):
        model, inputs = build_model(ModelSource("factory", name, str(dtype).removeprefix("torch."), 0, 1,
                                                CAPTURE_TOKENS))
        total = None
    else:
        entry = zoo.get_entry(name)
        total = entry.config.get("num_hidden_layers")
        if entry.pretrained:
            model = zoo.build(name, dtype=dtype)
            total = model.config.num_hidden_layers
        else:
            keep = min(total, layers_to_capture) if total else None
            model = zoo.build(name, dtype=dtype, device="meta", num_layers=keep)
        inputs = zoo.example_inputs(name, 1, CAPTURE_TOKENS)
        if not entry.pretrained:  # inputs where the weights are: torch 2.11's export refuses meta weights + cpu ids
            inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    program = capture(model, inputs, kwargs)
    PassManager(pipeline(level)).run(program, PassContext(get_profile("h100")))
    work = extract_workload(program, name)
    if total and work.layers < total:
        work = repeat_layers(work, total)
    return work


def repeat_layers(work: Workload, total: int) -> Workload:
    """The workload with captured layer 1 repeated to make `total` decoder layers.

    Needs layers 0, 1 and 2 captured, in order, with layers 1 and 2 alike: the same ops
    and shapes, reading the same ops of their own layer, the same ops at the end of the
    layer before, and the same ops before the first layer. Refuses otherwise rather than
    guess. Ops after the last captured layer read the copy of layer 2's ops in the last layer.
    """
    captured = work.layers
    labels = [o.layer for o in work.ops]
    if captured < 3 or labels != sorted(labels):
        raise FlashcError(f"{work.model}: repeating layers needs 3 captured layers in order; capture the whole "
                          "model instead")
    start = {layer: next(o.index for o in work.ops if o.layer == layer) for layer in (0, 1, 2)}
    one = [o for o in work.ops if o.layer == 1]
    two = [o for o in work.ops if o.layer == 2]
    if [_signature(o, start[1], start[0]) for o in one] != [_signature(o, start[2], start[1]) for o in two]:
        raise FlashcError(f"{work.model}: decoder layers 1 and 2 differ in their ops; capture the whole model "
                          "(layers_to_capture = num_hidden_layers)")
    ops = [o for o in work.ops if o.layer <= 1]
    for layer in range(2, total):
        here = len(ops)
        for o in one:
            inputs = tuple(i if i < start[0] else here + (i - start[1]) for i in o.inputs)
            weight = f"{o.weight}@layer{layer}" if o.weight else ""  # a copy has weights of its own
            ops.append(replace(o, index=len(ops), layer=layer, inputs=inputs, weight=weight))
    last_start = len(ops) - len(one)
    tail_map: dict[int, int] = {}
    for o in work.ops:
        if o.layer <= 2:
            continue
        inputs = []
        for i in o.inputs:
            if i in tail_map:
                inputs.append(tail_map[i])
            elif i >= start[2]:
                inputs.append(last_start + (i - start[2]))
            elif i < start[0]:
                inputs.append(i)
            else:
                raise FlashcError(f"{work.model}: op {o.name} after the last layer reads an op of layer 0 or 1; "
                                  "capture the whole model")
        tail_map[o.index] = len(ops)
        ops.append(replace(o, index=len(ops), layer=total, inputs=tuple(inputs)))
    notes = work.notes + [f"captured {captured} decoder layers on the meta device; layer 1 stands for layers "
                          f"1-{total - 1} (layers 1 and 2 checked alike)"]
    return Workload(work.model, ops, total, work.captured_tokens, notes)


def _signature(o: Op, start: int, previous_start: int) -> tuple:
    """What must match between two layers: the op, its sizes, and what it reads, relative to
    its layer's start (inputs in the layer before as negative offsets, before the first
    layer as absolute indices)."""
    def where(i: int):
        return ("prologue", i) if i < previous_start else ("layer", i - start)

    return (o.op, o.kind, o.k, o.n, o.heads, o.kv_heads, o.head_dim, o.experts, o.top_k, o.ffn,
            round(o.out_elements, 6), round(o.in_elements, 6), round(o.ops_per_element, 6), o.pair_scaled,
            o.constant, o.reduces, o.small_params, tuple(where(i) for i in o.inputs))


__all__ = ["Op", "Workload", "PRECISIONS", "ACTIVATION_BYTES", "extract_workload", "capture_workload",
           "repeat_layers", "kv_cache_bytes", "check_precision", "CAPTURE_TOKENS"]

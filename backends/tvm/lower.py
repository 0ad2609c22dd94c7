"""FX graph -> Relax: `main(*inputs, *weights)` built node by node with a BlockBuilder.

ATen ops go through the per-node converters of TVM's torch.export frontend; flashc
ops, aten.linear (weights in their stored layout) and the ATen ops whose frontend
converter is missing or wrong for these graphs are built here (aten_ops.ATEN_OPS).

What keeps the module's answers PyTorch's (each refused with a flashc error naming the
op, the node and its source line when it cannot be kept):
  * indices are normalized (x[..., -2] is the second last) and bounds-checked per call:
    each indexing op also returns the min and max of its indices, which the runtime
    compares with the valid range (indexing.py);
  * in-place writes are carried as new values, rebound for every later read and
    scattered into the storage a view was taken from; the final values of written user
    inputs and weights/buffers (state) are returned after the outputs, for the runtime
    to write back (in_place.py);
  * outputs that are not tensors (None, numbers) are returned as they are.
Any other exception from a converter becomes an UnsupportedOpError with the original
as its __cause__.
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from flashc.backends.tvm.common import _dtype, _shape, _tvm_dtype, import_tvm
from flashc.backends.tvm.relax_ops import FlashcOps
from flashc.lowering import unsupported_op_error
from flashc.errors import FlashcError, UnsupportedOpError
from flashc.ir import Program, dtype_name, module_path, op_name, source_location

aten = torch.ops.aten

# Python values a graph may return beside tensors; the runtime puts them back in place.
CONSTANT_OUTPUTS = (type(None), bool, int, float, str)


def _transposed(w: torch.Tensor) -> torch.Tensor:
    """[.., out, in] -> [.., in, out]: what matmul reads for x @ W^T."""
    return w.transpose(-1, -2)


def _experts_in_columns(w: torch.Tensor) -> torch.Tensor:
    """MoE gate_up [E, 2F, H] -> [H, E*2F]: one GEMM computes every expert's projection."""
    return w.permute(2, 0, 1).reshape(w.shape[2], -1)


def _experts_in_rows(w: torch.Tensor) -> torch.Tensor:
    """MoE down [E, H, F] -> [E*F, H]: one GEMM projects and sums over experts."""
    return w.permute(0, 2, 1).reshape(-1, w.shape[1])


# (op, argument position) -> the layout the weight is stored in (the transform runs
# once at build time; an activation in that position gets the same transform in Relax).
WEIGHT_LAYOUTS: dict[tuple[Any, int], tuple[str, Callable]] = {
    (aten.linear.default, 1): ("T", _transposed),
    (torch.ops.flashc.moe.default, 2): ("cols", _experts_in_columns),
    (torch.ops.flashc.moe.default, 3): ("rows", _experts_in_rows),
    (torch.ops.flashc.moe_sparse.default, 2): ("cols", _experts_in_columns),
    (torch.ops.flashc.moe_sparse.default, 3): ("rows", _experts_in_rows),
}


def _relax_layout(layout: str, op, x, shape: list[int]):
    """The Relax expression of a weight layout, for a non-weight value in a weight's position."""
    if layout == "T":
        nd = len(shape)
        return op.permute_dims(x, list(range(nd - 2)) + [nd - 1, nd - 2])
    if layout == "cols":
        e, f2, h = shape
        return op.reshape(op.permute_dims(x, [2, 0, 1]), [h, e * f2])
    e, h, f = shape  # rows
    return op.reshape(op.permute_dims(x, [0, 2, 1]), [e * f, h])


def _flashc_converters() -> dict[Any, Callable]:
    fl = torch.ops.flashc
    return {
        fl.rms_norm.default: lambda o, a: o.rms_norm(*a),
        fl.add_rms_norm.default: lambda o, a: o.add_rms_norm(*a),
        fl.rotary.default: lambda o, a: o.rotary(*a),
        fl.rotary_interleaved.default: lambda o, a: o.rotary_interleaved(*a),
        fl.swiglu.default: lambda o, a: o.swiglu(*a),
        fl.geglu.default: lambda o, a: o.geglu(*a),
        fl.attention.default: lambda o, a: o.attention(*a),
        fl.decode_attention.default: lambda o, a: o.decode_attention(*a),
        fl.moe.default: lambda o, a: o.moe(*a),
        fl.moe_sparse.default: lambda o, a: o.moe(*a),  # the threshold, its 7th argument, sparsifies the intermediate
        fl.sparsify.default: lambda o, a: o.sparsify(*a),
        fl.predicted_sparsify.default: lambda o, a: o.predicted_sparsify(*a),
    }


def own_aten_targets() -> set:
    """The ATen op overloads lowered here rather than by TVM's frontend (`FxToRelax._own_converters`)."""
    from flashc.backends.tvm.aten_ops import ATEN_OPS

    return set(ATEN_OPS) | {aten.linear.default, aten.scaled_dot_product_attention.default, aten.to.device}


def own_aten_ops() -> set[str]:
    """'aten.<name>' of the ATen ops lowered here rather than by TVM's frontend."""
    from flashc.backends.tvm.aten_ops import ATEN_OPS

    return {"aten." + t._schema.name.split("::")[-1] for t in ATEN_OPS} | {"aten.linear"}


@dataclass
class Lowered:
    """A Program as a Relax module plus the weights its `main` takes after the user inputs."""

    module: Any  # tvm.IRModule
    weights: dict[str, torch.Tensor]  # parameter name -> tensor, in call order
    signature: dict[str, Any]


class FxToRelax:
    """Builds `main(*inputs, *weights)` from a Program's graph, node by node."""

    def __init__(self, program: Program) -> None:
        tvm = import_tvm()
        from tvm import relax
        from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

        from flashc.backends.tvm.aten_ops import ATEN_OPS
        from flashc.backends.tvm.in_place import InPlaceWrites

        self.tvm, self.R = tvm, relax
        self.program = program
        self.bb = relax.BlockBuilder()
        self.env: dict[fx.Node, Any] = {}
        self.bound: set[fx.Node] = set()  # nodes `substituted` binds to other values, weights included
        self.frontend = ExportedProgramImporter()
        self.frontend.env = self.env  # the frontend's converters read our values
        self.frontend.block_builder = self.bb
        self.ops = FlashcOps(self.bb, relax)
        self.flashc = _flashc_converters()
        self.aten = ATEN_OPS
        self.own = self._own_converters()
        self.writes = InPlaceWrites(program)
        self.weight_vars: dict[str, Any] = {}  # stored name -> relax.Var
        self.weights: dict[str, torch.Tensor] = {}
        self.checks: list[tuple[Any, dict[str, Any]]] = []  # (relax [min, max] of indices, what they index)

    # weights
    def _weight(self, node: fx.Node, layout: tuple[str, Callable] | None):
        """The Relax parameter for weight `node` stored in `layout` (made once per layout)."""
        name = node.name + (f".{layout[0]}" if layout else "")
        if name not in self.weight_vars:
            value = self.program.params[node.name] if node.op == "placeholder" else self._attr(node)
            value = value.detach()
            if layout:
                value = layout[1](value)
            self._add_weight(name, value)
        return self.weight_vars[name]

    def _add_weight(self, name: str, value: torch.Tensor):
        value = value.contiguous()
        self.weights[name] = value
        self.weight_vars[name] = self.R.Var(name, self.R.TensorType(list(value.shape), _tvm_dtype(value.dtype)))
        return self.weight_vars[name]

    def opaque_scalar(self, value: float, dtype: str):
        """A 0-d tensor holding value that TVM cannot see through: a weight, not a constant.
        TIR's simplifier treats floats as reals (x * 0 -> 0, x - x -> 0), which is wrong for
        inf, NaN and the sign of zero; a value it only knows at run time is not folded."""
        t = torch.tensor(value, dtype=getattr(torch, dtype))
        name = f"flashc.scalar.{dtype}.{t.view(-1).view(torch.uint8).numpy().tobytes().hex()}"
        return self.weight_vars[name] if name in self.weight_vars else self._add_weight(name, t)

    def _attr(self, node: fx.Node) -> torch.Tensor:
        value = self.program.graph_module
        for part in node.target.split("."):
            value = getattr(value, part)
        return value

    def is_weight(self, a) -> bool:
        """A weight the module reads as stored; state (weights/buffers written in place) is a value like any
        other, bound to its stored tensor at the start."""
        return isinstance(a, fx.Node) and a not in self.writes.state and (
            (a.op == "placeholder" and a.name in self.program.params) or a.op == "get_attr")

    def weight_value(self, a: fx.Node) -> torch.Tensor:
        return self.program.params[a.name] if a.op == "placeholder" else self._attr(a)

    def _arg(self, node: fx.Node, i: int, a):
        """The Relax value of argument i of node; a weight comes in the layout node reads it in
        (WEIGHT_LAYOUTS), stored so at build time; another value there is transformed per call."""
        layout = WEIGHT_LAYOUTS.get((node.target, i))
        if isinstance(a, fx.Node):
            if self.is_weight(a):
                return self._weight(a, layout)
            value = self.env[a]
            if layout is not None:
                value = self.bb.emit(_relax_layout(layout[0], self.R.op, value, _shape(value)))
            return value
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(node, i, x) for x in a)
        return a

    def value(self, a):
        """The Relax value of an argument (weights as stored, unchanged), or a Python value as it is."""
        if isinstance(a, fx.Node):
            return self._weight(a, None) if self.is_weight(a) and a not in self.bound else self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        return a

    @contextmanager
    def substituted(self, values: dict[fx.Node, Any]):
        """env with some nodes bound to other Relax values while a converter runs."""
        saved = {n: self.env[n] for n in values if n in self.env}
        self.env.update(values)
        outer = self.bound
        self.bound = outer | set(values)
        try:
            yield
        finally:
            self.bound = outer
            for n in values:
                if n in saved:
                    self.env[n] = saved[n]
                else:
                    self.env.pop(n, None)

    # ops
    def _linear(self, node: fx.Node):
        x = self.env[node.args[0]]
        # half-precision products accumulate in float32, as cuBLAS and PyTorch's CPU kernels do: a float16
        # sum over the 2048-8192 inputs of the llama-3.2-1b shape was 2.8e-2 off eager (2 layers, llvm)
        half = _dtype(x) in ("float16", "bfloat16")
        out = self.bb.emit(self.R.op.matmul(x, self._arg(node, 1, node.args[1]), out_dtype="float32" if half else None))
        if half:
            out = self.bb.emit(self.R.op.astype(out, _dtype(x)))
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None:
            out = self.bb.emit(self.R.op.add(out, self._arg(node, 2, bias)))
        return out

    def _flashc_op(self, node: fx.Node):
        args = [self._arg(node, i, a) for i, a in enumerate(node.args)]
        return self.flashc[node.target](self.ops, args)

    def _sdpa(self, node: fx.Node):
        """aten.scaled_dot_product_attention through the attention emitter: the frontend's
        refuses boolean masks. SDPA's causal mask is aligned top-left."""
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
        defaults = [None, None, None, None, 0.0, False, None, False]
        a = dict(zip(names, defaults))
        a.update(zip(names, node.args))
        a.update(node.kwargs)
        if a["dropout_p"]:
            raise ValueError(f"dropout_p={a['dropout_p']} (training-mode attention)")
        q, k, v = (self._arg(node, i, a[n]) for i, n in enumerate(names[:3]))
        mask = self._arg(node, 3, a["attn_mask"]) if a["attn_mask"] is not None else None
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(_shape(q)[-1])
        return self.ops.attention(q, k, v, mask, bool(a["is_causal"]), float(scale), causal_offset=0)

    def _getitem(self, node: fx.Node):
        src, idx = node.args
        value = self.env[src]
        if isinstance(value, (tuple, list)):
            return value[idx]
        return self.bb.emit(self.R.TupleGetItem(value, idx))

    def _own_converters(self) -> dict[Any, Callable]:
        """Ops built here rather than by the frontend: flashc ops, linear (pre-transposed
        weights), SDPA and the ATen ops of aten_ops.ATEN_OPS."""
        own: dict[Any, Callable] = {t: self._flashc_op for t in self.flashc}
        own.update({t: (lambda node, f=f: f(self, node)) for t, f in self.aten.items()})
        own.update({
            aten.linear.default: self._linear,
            operator.getitem: self._getitem,
            aten.scaled_dot_product_attention.default: self._sdpa,
            # a device move is a no-op inside one module; _check casts to the node's dtype
            aten.to.device: lambda node: self._arg(node, 0, node.args[0]),
        })
        return own

    def convert(self, node: fx.Node):
        """The Relax value of node: by a converter of ours, else by the frontend's."""
        if node.target in self.own:
            return self.own[node.target](node)
        return self.frontend_convert(node)

    def frontend_convert(self, node: fx.Node):
        """node through the converter of TVM's frontend, its indices normalized and clamped
        (indexing.guarded_indices)."""
        from flashc.backends.tvm.indexing import guarded_indices

        target = node.target
        convert = None
        if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
            convert = self.frontend.convert_map.get(target.__name__)
        if convert is None:
            raise unsupported_op(node, "TVM")
        from flashc.backends.tvm.backend import broken_converter

        broken = broken_converter(node)  # left to a decomposition that did not apply (its indices are read, ...)
        if broken:
            raise unsupported_op(node, "TVM", f"TVM's converter: {broken}")
        for a in node.all_input_nodes:  # frontend converters read weights from env
            if self.is_weight(a):
                self.env[a] = self._weight(a, None)
        with self.substituted(guarded_indices(self, node)):
            return convert(node)

    def _check(self, node: fx.Node, value):
        """Compare a lowered value with the node's fake tensor; cast dtypes, refuse shape drift."""
        expected = node.meta.get("val")
        if not isinstance(expected, torch.Tensor) or not isinstance(value, self.R.Expr):
            return value
        ty = value.ty
        if not isinstance(ty, self.R.TensorType) or ty.shape is None:
            return value
        got = _shape(value)
        if got != list(expected.shape):
            raise FlashcError(f"TVM lowering of {op_name(node)} (node {node.name}{_in(node)} at "
                              f"{source_location(node)}) gave shape {got}, expected {list(expected.shape)}; "
                              "this is a flashc bug, use target 'cpu'")
        want = _tvm_dtype(expected.dtype)
        return value if str(ty.dtype) == want else self.bb.emit(self.R.op.astype(value, want))

    def _lower_node(self, node: fx.Node):
        try:
            if self.writes.is_write(node):
                return self.writes.lower(self, node)
            return self._check(node, self.convert(node))
        except FlashcError:
            raise
        except Exception as e:  # a converter refusing its arguments, or TVM refusing what it built
            raise unsupported_op(node, "TVM", f"{type(e).__name__}: {e}") from e

    def lower(self) -> Lowered:
        try:
            return self._lower()
        except FlashcError:
            raise
        except Exception as e:  # assembling the module (outputs, the function's signature)
            raise FlashcError(f"TVM lowering failed while assembling the module ({type(e).__name__}: "
                              f"{str(e).strip()[:300]}); use target 'cpu', and report this") from e

    def _lower(self) -> Lowered:
        program, R = self.program, self.R
        inputs = []
        for spec, node in zip(program.inputs, program.input_nodes()):
            var = R.Var(node.name, R.TensorType(list(spec.shape), _tvm_dtype(spec.dtype)))
            self.env[node] = var
            inputs.append(var)
        self.writes.refuse_unsupported()  # before building anything: the first refused write
        for node in self.writes.state:
            self.env[node] = self._weight(node, None)
        with self.bb.function("main"):
            with self.bb.dataflow():
                outputs, kinds, written = [], [], []
                for node in program.graph.nodes:
                    if node.op == "call_function":
                        self.env[node] = self._lower_node(node)
                    elif node.op == "output":
                        outputs, kinds = self._outputs(node)
                        written = [self.env[n] for n in self.writes.written_placeholders]
                    elif node.op not in ("placeholder", "get_attr"):
                        raise UnsupportedOpError(f"graph node kind {node.op!r} ({node.name}) has no TVM lowering")
                result = self.bb.emit_output(R.Tuple(outputs + written + [c for c, _ in self.checks]))
            self.bb.emit_func_output(result, params=inputs + list(self.weight_vars.values()))
        mod = self.bb.get()
        mod["main"] = mod["main"].with_attr("num_input", len(inputs))
        return Lowered(mod, self.weights, self._signature(outputs, kinds))

    def _outputs(self, node: fx.Node) -> tuple[list, list]:
        """The tensor outputs as Relax values, and per flat output position its kind: the
        index among the tensors, or {'constant': value} for a Python value returned as is."""
        values, kinds = [], []
        for i, a in enumerate(_flat(node.args[0])):
            if isinstance(a, fx.Node):
                value = self._arg(node, 0, a)
                if not isinstance(getattr(value, "ty", None), self.R.TensorType):
                    raise UnsupportedOpError(f"output {i} ({a.name}, {op_name(a)}) is not a tensor in the TVM "
                                             "lowering; return tensors, or use target 'cpu'")
                kinds.append(len(values))
                values.append(value)
            elif isinstance(a, CONSTANT_OUTPUTS):
                kinds.append({"constant": a})
            else:
                raise UnsupportedOpError(f"output {i} is a {type(a).__name__} ({a!r:.80}), which a TVM module "
                                         "cannot return; return tensors, None or numbers, or use target 'cpu'")
        return values, kinds

    def _signature(self, outputs, kinds) -> dict[str, Any]:
        inputs = list(self.program.input_nodes())
        tensors = [{"shape": _shape(o), "dtype": _dtype(o)} for o in outputs]
        return {
            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": dtype_name(s.dtype)}
                       for s in self.program.inputs],
            "outputs": [tensors[k] if isinstance(k, int) else k for k in kinds],
            # after the outputs: the final values of what the graph writes in place, to write back
            "writes": [{"weight": n.name} if n in self.writes.state else {"input": inputs.index(n)}
                       for n in self.writes.written_placeholders],
            "index_checks": [info for _, info in self.checks],
            "weights": [{"name": n, "shape": list(t.shape), "dtype": dtype_name(t.dtype)}
                        for n, t in self.weights.items()],
        }


def _flat(x) -> list:
    return [y for item in x for y in _flat(item)] if isinstance(x, (list, tuple)) else [x]


def _in(node: fx.Node) -> str:
    where = module_path(node)
    return f" in {where}" if where else ""


def unsupported_op(node: fx.Node, backend: str, detail: str = "") -> UnsupportedOpError:
    """UnsupportedOpError naming the op, its node, module and source line, and the way out."""
    why = detail.strip().splitlines()[0][:300] if detail.strip() else "no lowering for this op"
    return unsupported_op_error(backend, [(node, why)])


def lower_to_relax(program: Program) -> Lowered:
    """The Program as a Relax IRModule whose `main` takes (*inputs, *weights)."""
    return FxToRelax(program).lower()


def weight_transposes(mod, num_input: int | None = None) -> int:
    """Count `permute_dims` calls applied directly to a weight (a parameter after num_input,
    or a constant) in a Relax module's `main`: each one is a per-call transpose of a weight."""
    tvm = import_tvm()
    from tvm import relax

    func = mod["main"]
    if num_input is None:
        num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else 0
    weights = list(func.params)[num_input:]
    count = 0

    def visit(expr):
        nonlocal count
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.permute_dims":
            arg = expr.args[0]
            if isinstance(arg, tvm.ir.expr.Constant) or any(arg.same_as(w) for w in weights):
                count += 1

    relax.analysis.post_order_visit(func.body, visit)
    return count

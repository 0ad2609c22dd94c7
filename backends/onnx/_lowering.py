"""The lowering context and the table of op lowerings.

A lowering is a function `(ctx, node) -> ir.Value | tuple[ir.Value, ...] | None` that
emits the ONNX nodes computing one FX node. It reads the node's arguments by schema
name (`ctx.args(node)`) and its static output shape and dtype from `node.meta["val"]`:
captured programs have static shapes, so every shape the ONNX graph needs is a
constant and no Shape/Gather arithmetic is emitted.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import onnx_ir as ir
import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from flashc.aliasing import functional_form  # noqa: F401 (table and _torchlib import it from here)
from flashc.errors import UnsupportedOpError
from flashc.lowering import unsupported_op_error
from flashc.ir import Program

from ._builder import GraphBuilder, onnx_dtype

Lowering = Callable[["LoweringContext", fx.Node], Any]

EAGER_TARGETS = "cpu (eager)"


def lowerings_into(table: dict[Any, Lowering]) -> Callable[..., Callable[[Lowering], Lowering]]:
    """A decorator `@lowers(target, ...)` that puts the decorated function into `table` (one
    module's lowerings; backends/onnx/table.py joins the modules' tables into the backend's)."""

    def lowers(*targets: Any) -> Callable[[Lowering], Lowering]:
        def put(fn: Lowering) -> Lowering:
            for t in targets:
                if t in table:
                    raise AssertionError(f"two ONNX lowerings for {t}")
                table[t] = fn
            return fn

        return put

    return lowers


class NotLowerable(Exception):
    """Raised by a lowering when this particular use of a supported op has no mapping."""


def unsupported_error(nodes: list[tuple[fx.Node, str]]) -> UnsupportedOpError:
    """One UnsupportedOpError listing each op (first occurrence per reason), where it came from and why."""
    return unsupported_op_error("ONNX", nodes, EAGER_TARGETS)


class LoweringContext:
    """What a lowering sees: the program, the builder and the values lowered so far."""

    def __init__(self, program: Program, builder: GraphBuilder, contrib_ops: bool,
                 low_precision_in_fp32: bool = False) -> None:
        self.program = program
        self.b = builder
        self.contrib_ops = contrib_ops
        self.low_precision_in_fp32 = low_precision_in_fp32
        self.values: dict[fx.Node, Any] = {}
        # weights/buffers the graph writes in place: graph inputs (the model's state), not constants
        self.state: set[fx.Node] = set()
        # what lowerings share: values (causal masks, position ids) and derived constants (rotary tables)
        self.cache: dict[Any, Any] = {}
        # ATen ops lowered through onnxscript's torchlib (`_torchlib`), by op name, for the report
        self.via_torchlib: Counter[str] = Counter()

    # --- arguments ------------------------------------------------------------------

    def args(self, node: fx.Node) -> dict[str, Any]:
        """The node's arguments by schema name, defaults filled in."""
        pair = normalize_function(node.target, tuple(node.args), dict(node.kwargs),
                                  normalize_to_only_use_kwargs=True)
        if pair is None:
            raise NotLowerable("its arguments do not match the op schema")
        return pair.kwargs

    def v(self, arg: fx.Node) -> ir.Value:
        """The ONNX value of an FX node (a weight becomes an initializer on first use)."""
        if arg in self.values:
            return self.values[arg]
        if arg.op == "placeholder" and arg.name in self.program.params:
            value = self.b.weight(arg.name, self.program.params[arg.name])
            self.values[arg] = value
            return value
        raise KeyError(f"{arg.name} has not been lowered yet")

    def param(self, arg: Any) -> torch.Tensor | None:
        """The constant tensor behind arg when it is a weight/folded constant, else None
        (a weight or buffer the graph writes is state, not a constant)."""
        if isinstance(arg, fx.Node) and arg.op == "placeholder" and arg not in self.state:
            return self.program.params.get(arg.name)
        return None

    def val(self, arg: fx.Node) -> torch.Tensor:
        return arg.meta["val"]

    def dtype(self, arg: Any) -> torch.dtype:
        if isinstance(arg, fx.Node):
            return arg.meta["val"].dtype
        if isinstance(arg, bool):
            return torch.bool
        if isinstance(arg, int):
            return torch.int64
        return torch.get_default_dtype()

    def shape(self, arg: fx.Node) -> list[int]:
        return [int(d) for d in arg.meta["val"].shape]

    def tensor(self, arg: Any, dtype: torch.dtype) -> ir.Value:
        """arg (an FX node or a python scalar) as an ONNX value of dtype."""
        if isinstance(arg, fx.Node):
            return self.b.cast(self.v(arg), self.dtype(arg), dtype)
        return self.b.scalar(arg, dtype)

    def result_dtype(self, a: Any, b: Any) -> torch.dtype:
        """torch's type promotion of two operands (tensors keep their rank: 0-d ones are weak)."""
        def probe(x):
            if isinstance(x, fx.Node):
                v = x.meta["val"]
                return torch.empty(v.shape, dtype=v.dtype, device="meta")
            return x
        return torch.result_type(probe(a), probe(b))

    def opmath(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a lowering of several ONNX ops computes in: fp32 for fp16/bf16 when those are
        exported computed in fp32 (`_precision`), so the result is rounded once, as PyTorch's
        kernels round it (silu, rsqrt, floor division, linear with a bias); else dtype."""
        low = dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if low and self.low_precision_in_fp32 else dtype

    def out_dtype(self, node: fx.Node) -> torch.dtype:
        val = node.meta["val"]
        return (val[0] if isinstance(val, (tuple, list)) else val).dtype


def causal_mask_value(ctx: LoweringContext, s: int, l: int, offset: int) -> ir.Value:
    """A bool [s, l] mask, True where key j <= query i + offset; built once per shape.

    offset = l - s aligns it bottom-right (flashc.attention, a KV cache), 0 top-left
    (torch's scaled_dot_product_attention). Emitted as Range/LessOrEqual rather than an
    s x l initializer, so long sequences do not bloat the model file.
    """
    key = ("causal", s, l, offset)
    if key not in ctx.cache:
        b = ctx.b
        i = b.op("Range", b.scalar(offset, torch.int64), b.scalar(s + offset, torch.int64), b.scalar(1, torch.int64))
        j = b.op("Range", b.scalar(0, torch.int64), b.scalar(l, torch.int64), b.scalar(1, torch.int64))
        ctx.cache[key] = b.op("LessOrEqual", b.reshape(j, [1, l]), b.reshape(i, [s, 1]))
    return ctx.cache[key]


def annotate(value: ir.Value, val: torch.Tensor) -> None:
    """Record a value's dtype and static shape (from the FX node's fake tensor)."""
    if isinstance(val, torch.Tensor):
        if value.type is None:
            value.type = ir.TensorType(onnx_dtype(val.dtype))
        if value.shape is None:
            value.shape = ir.Shape([int(d) for d in val.shape])

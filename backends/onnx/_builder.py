"""A small graph builder over onnx-ir: nodes, constants and weights, named after the FX graph.

The exporter lowers one FX node at a time; every ONNX node it emits while doing so is
named after that FX node and carries its module path and source line as metadata, so a
profile of the ONNX model can be read against the PyTorch model.
"""

from __future__ import annotations

from typing import Any, Sequence

import onnx_ir as ir
import torch
import torch.fx as fx
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype

from flashc.ir import module_path, source_location

MS_DOMAIN = "com.microsoft"


def onnx_dtype(dtype: torch.dtype) -> ir.DataType:
    return from_torch_dtype(dtype)


class GraphBuilder:
    """Collects the nodes, initializers and opset imports of one ONNX graph."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.domains: dict[str, int] = {"": opset}
        self._names: set[str] = set()
        self._consts: dict[tuple, ir.Value] = {}
        self._current: fx.Node | None = None
        self._count = 0

    # --- naming ---------------------------------------------------------------------

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def at(self, node: fx.Node | None) -> None:
        """Name and annotate the nodes emitted from now on after this FX node."""
        self._current = node

    # --- nodes --------------------------------------------------------------------------

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", outputs: int = 1,
           omit: Sequence[int] = (), **attrs: Any) -> ir.Value | tuple[ir.Value, ...]:
        """Emit one node; returns its output (or a tuple of them when outputs > 1).

        None inputs are omitted optional inputs; None attributes are left out; the
        outputs at the indices in `omit` are optional outputs left unnamed (not computed).
        """
        if domain and domain not in self.domains:
            self.domains[domain] = 1
        inputs = list(inputs)
        while inputs and inputs[-1] is None:  # ORT's LayerNormalization crashes on a trailing "" input
            inputs.pop()
        attributes = ir.convenience.convert_attributes({k: v for k, v in attrs.items() if v is not None})
        where = self._current
        self._count += 1
        base = f"{where.name}/{op_type}" if where is not None else f"{op_type}_{self._count}"
        meta = {}
        if where is not None:
            meta = {"flashc.module": module_path(where), "flashc.source": source_location(where)}
        node = ir.Node(domain, op_type, inputs, attributes=attributes, num_outputs=outputs,
                       name=self.unique(base), metadata_props=meta)
        for i, out in enumerate(node.outputs):
            out.name = "" if i in omit else self.unique(f"{where.name if where is not None else 'v'}_{op_type.lower()}")
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)

    # --- constants and weights --------------------------------------------------------

    def weight(self, name: str, tensor: torch.Tensor) -> ir.Value:
        """A weight as an initializer, referencing the torch tensor without copying it."""
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        name = self.unique(name)
        value = ir.Value(name=name, shape=ir.Shape(t.shape), type=ir.TensorType(onnx_dtype(t.dtype)),
                         const_value=TorchTensor(t, name=name))
        self.initializers.append(value)
        return value

    def const(self, value: Any, dtype: torch.dtype) -> ir.Value:
        """A small constant (python scalar, list or tensor) of dtype; equal constants are shared."""
        # a Python number straight to dtype (torch.tensor(0.1) would round it to float32 first)
        t = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
        # standard strides (a size-1 dim of a view may keep any stride, which .contiguous() accepts)
        t = t.to(dtype).clone(memory_format=torch.contiguous_format)
        key = (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight("const", t)
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> ir.Value:
        """A 1-D int64 constant (shapes, axes, starts/ends)."""
        return self.const([int(v) for v in values], torch.int64)

    def scalar(self, value: float | int | bool, dtype: torch.dtype) -> ir.Value:
        return self.const(value, dtype)

    # --- common idioms -----------------------------------------------------------------

    def cast(self, x: ir.Value, from_dtype: torch.dtype, to_dtype: torch.dtype) -> ir.Value:
        if from_dtype == to_dtype:
            return x
        return self.op("Cast", x, to=onnx_dtype(to_dtype))

    def reshape(self, x: ir.Value, shape: Sequence[int]) -> ir.Value:
        """x in a static shape; a reshape of a Reshape's output reshapes that Reshape's input."""
        shape = [int(d) for d in shape]
        producer = x.producer()
        if producer is not None and producer.op_type == "Reshape" and producer.domain == "":
            x = producer.inputs[0]
        return self.op("Reshape", x, self.ints(shape), allowzero=1 if 0 in shape else None)

    def slice(self, x: ir.Value, axis: int, start: int, end: int, step: int = 1) -> ir.Value:
        return self.op("Slice", x, self.ints([start]), self.ints([end]), self.ints([axis]), self.ints([step]))

    def transpose(self, x: ir.Value, perm: Sequence[int]) -> ir.Value:
        return self.op("Transpose", x, perm=[int(p) for p in perm])

"""The ONNX backend: export an optimized Program to ONNX and run it with ONNX Runtime.

    from flashc.backends.onnx import export_onnx, OnnxRuntimeModel
    export_onnx(program, "model.onnx")
    logits, = OnnxRuntimeModel.load("model.onnx")(input_ids)

ATen ops lower to the standard ONNX opset (default 23, at least 20); flashc's fused ops
lower to ONNX Runtime's fused kernels where they compute the same thing (RMSNormalization,
com.microsoft SkipSimplifiedLayerNormalization, RotaryEmbedding, GroupQueryAttention;
the table and precision notes are in `_fused`) and to standard ops otherwise. ATen ops
without a flashc lowering go through onnxscript's torch library, the converter torch.onnx
uses (`_torchlib`; optional: without onnxscript they are refused, saying what to install);
`backend.via_torchlib` counts them. Shapes are
the static shapes of the capture. Weights become initializers, stored as external data
next to the model above ~1.5 GB. An op without a lowering raises UnsupportedOpError naming
the op, its module and source line. Weight-only quantized linears (`flashc.linear_wq`, int4
and int8) lower to com.microsoft MatMulNBits with their packed weights as initializers
(`_quantized`; `int4` holds the layout); quantized MoE experts (`flashc.moe_wq`) are refused.

The model computes the captured shapes only (inputs are static-shaped). In-place writes
keep PyTorch's semantics (`_in_place`): a write through a view is scattered back into the
tensor it was taken of, reads after a write see it, and a written user input or
weight/buffer is also an output, `present.<name>`; what cannot be carried exactly is
refused. The exported decode step takes past caches and returns present ones, with
GroupQueryAttention writing the new token and attending over positions
0..cache_position (`_fused`). `OnnxRuntimeModel` keeps flashc's in-place contract: it
binds each present output to its input's own buffer where the model allows it (metadata
`flashc.present_shares_input`), else copies it back; written weights/buffers are inputs
it feeds from the compiled model's state and updates (metadata `flashc.state`). For ONNX
Runtime's CPU provider fp16/bf16 ops are computed in fp32 and rounded after each op, as
PyTorch does (`_precision`): ORT would otherwise drop roundings (fp16) or refuse (bf16).
Every failure is a FlashcError naming the op and the model code it came from.

Modules: `_builder` (onnx-ir graph building), `_lowering` (context, op table, errors),
`_aten` / `_aten_layout` / `_aten_vision` / `_fused` / `_quantized` (the lowerings), `_torchlib`
(every other ATen op, through onnxscript), `table` (which lowering an op gets), `_in_place` (writes and aliasing),
`_precision` (fp16/bf16 on the CPU), `_export` (driver), `runtime` (ORT session),
`backend` (flashc's Backend protocol, for the onnx-* targets), `int4`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flashc.errors import FlashcError

from .runtime import INSTALL_ORT, OnnxRuntimeModel

if TYPE_CHECKING:
    from flashc.ir import Program

INSTALL_ONNX = "pip install onnx onnx-ir (or: pip install 'flashc[onnx]')"
DEFAULT_OPSET = 23


def _export_module():
    try:
        from . import _export
    except ImportError as e:
        raise FlashcError(f"exporting to ONNX needs the onnx and onnx-ir packages ({e}); "
                          f"install them: {INSTALL_ONNX}") from None
    return _export


def export_onnx(program: "Program", path: str | Path, *, opset: int = DEFAULT_OPSET,
                external_data: bool | None = None, contrib_ops: bool = True,
                low_precision_in_fp32: bool = True) -> Path:
    """Export program as an ONNX model at path, checked with onnx.checker; returns the path.

    external_data: weights in `<file>.data` beside the model (None: when over ~1.5 GB).
    contrib_ops: use ONNX Runtime's fused kernels for flashc ops (False: standard ops only).
    low_precision_in_fp32: fp16/bf16 ops computed in fp32 and rounded after each op, as
    PyTorch does (ONNX Runtime's CPU provider; False for CUDA's native fp16 kernels).
    """
    return _export_module().export_onnx(program, path, opset=opset, external_data=external_data,
                                        contrib_ops=contrib_ops, low_precision_in_fp32=low_precision_in_fp32)


def lowers(op: str) -> bool:
    """Whether the exporter lowers op ('aten.linear', 'flashc.rms_norm', 'getitem')."""
    return _export_module().lowers_op(op)


__all__ = ["export_onnx", "lowers", "OnnxRuntimeModel", "INSTALL_ORT", "INSTALL_ONNX", "DEFAULT_OPSET"]

"""The ONNX backend in flashc's Backend protocol: lower = export + open an ORT session.

Ready for the `onnx-cpu` / `onnx-cuda` targets (providers "cpu" / "cuda"): an artifact
stores the exported model (and its external data) as its payload. Weights/buffers the
graph writes in place are the session's state: the program's own tensors
(`program.params`), updated by every call as the eager model updates its buffers.
`via_torchlib(executable)` counts the ATen ops lowered through onnxscript's torchlib.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashc.ir import Program, op_name
from flashc.lowering import LoweringTable
from flashc.profiles import HardwareProfile

from . import DEFAULT_OPSET, export_onnx
from .runtime import OnnxRuntimeModel

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class OnnxOptions:
    providers: str | list | tuple | None = None  # ONNX Runtime providers; None: the target's
    opset: int = DEFAULT_OPSET
    contrib_ops: bool = True  # ONNX Runtime's fused kernels for flashc ops (False: standard ops only)
    threads: int | None = None  # ONNX Runtime intra-op threads; None: its default


class OnnxBackend:
    name = "onnx"
    Options = OnnxOptions

    def __init__(self, providers: str = "cpu") -> None:
        self.providers = providers

    @property
    def lowering(self) -> LoweringTable:
        from .table import full_table  # imports onnx (and onnxscript's torchlib): only when asked

        return full_table()

    def converts(self, node) -> bool:
        """Whether lowering finds a function for node's op overload: flashc's, else torchlib's, which
        is per overload (`upsample_linear1d.default`, not `.vec`)."""
        from .table import find_lowering

        return op_name(node) == "getitem" or find_lowering(node) is not None

    def late_passes(self, profile: HardwareProfile, options: OnnxOptions) -> list:
        """Ops neither flashc nor torchlib lowers, written as PyTorch's decompositions of them."""
        from flashc.passes.decompose import DecomposeUnlowered

        return [DecomposeUnlowered(self.converts)]

    def lower(self, program: Program, profile: HardwareProfile, options: OnnxOptions) -> OnnxRuntimeModel:
        """Export into a private temporary directory, kept as long as the session lives."""
        providers = options.providers or self.providers
        tmp = tempfile.TemporaryDirectory(prefix="flashc-onnx-")
        path = export_onnx(program, Path(tmp.name) / MODEL_FILE, opset=options.opset,
                           contrib_ops=options.contrib_ops, low_precision_in_fp32=not _uses_cuda(providers))
        model = OnnxRuntimeModel.load(path, providers=providers, threads=options.threads,
                                      state=program.params)
        model.keepalive = tmp  # removed with the model
        return model

    def save_payload(self, executable: OnnxRuntimeModel, directory: Path) -> dict[str, Any]:
        src = executable.path
        shutil.copy2(src, directory / MODEL_FILE)
        data = src.with_name(src.name + ".data")
        if data.exists():
            shutil.copy2(data, directory / data.name)  # the name the model refers to
        return {"model": MODEL_FILE}

    def load_payload(self, program: Program, directory: Path, info: dict[str, Any]) -> OnnxRuntimeModel:
        return OnnxRuntimeModel.load(directory / info.get("model", MODEL_FILE), providers=self.providers,
                                     state=program.params)


def via_torchlib(executable: OnnxRuntimeModel) -> dict[str, int]:
    """The ATen ops the exported model lowers through onnxscript's torchlib, with their counts
    ({'aten.roll': 2}); flashc's own lowerings cover the rest (read from the model's metadata,
    so a loaded artifact answers too)."""
    from ._torchlib import VIA_TORCHLIB_KEY, parse

    return parse(executable.session.get_modelmeta().custom_metadata_map.get(VIA_TORCHLIB_KEY, ""))


def _uses_cuda(providers) -> bool:
    """Whether the session runs on CUDA, whose fp16 kernels round each op themselves; on the CPU
    provider fp16/bf16 ops are exported computed in fp32 and rounded (`_precision`)."""
    names = [providers] if isinstance(providers, str) else list(providers or [])
    return any(n.lower() in ("cuda", "cudaexecutionprovider") for n in names)

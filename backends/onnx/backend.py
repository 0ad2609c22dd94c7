"""The ONNX backend in flashc's Backend protocol: lower = export + open an ORT session.

Ready for the `onnx-cpu` / `onnx-cuda` targets (providers "cpu" / "cuda"): an artifact
stores the exported model (and its external data) as its payload.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from flashc.ir import Program
from flashc.profiles import HardwareProfile

from . import DEFAULT_OPSET, export_onnx, lowers
from .runtime import OnnxRuntimeModel

MODEL_FILE = "model.onnx"


class OnnxBackend:
    name = "onnx"

    def __init__(self, providers: str = "cpu") -> None:
        self.providers = providers

    def lowers(self, op: str) -> bool:
        return lowers(op)

    def lower(self, program: Program, profile: HardwareProfile, options: dict[str, Any]) -> OnnxRuntimeModel:
        """Export into a private temporary directory, kept as long as the session lives."""
        tmp = tempfile.TemporaryDirectory(prefix="flashc-onnx-")
        path = export_onnx(program, Path(tmp.name) / MODEL_FILE, opset=options.get("opset", DEFAULT_OPSET),
                           contrib_ops=options.get("contrib_ops", True))
        model = OnnxRuntimeModel.load(path, providers=options.get("providers", self.providers),
                                      threads=options.get("threads"))
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
        return OnnxRuntimeModel.load(directory / info.get("model", MODEL_FILE), providers=self.providers)

"""flashc's Backend protocol (backends/base.py) over build_tvm, for targets tvm-cpu / tvm-cuda."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from flashc.backends.tvm.build import TARGET_KINDS, TvmBuild, build_tvm
from flashc.backends.tvm.common import import_tvm
from flashc.backends.tvm.lower import _flashc_converters, own_aten_ops
from flashc.backends.tvm.runtime import TvmModel, load_tvm_artifact
from flashc.errors import FlashcError
from flashc.ir import Program


class TvmBackend:
    """flashc's Backend interface over build_tvm ('llvm' -> tvm-cpu, 'cuda' -> tvm-cuda).

    options: arch (CUDA, default from the profile's compute capability), tune_trials,
    work_dir, tuning_database; see build_tvm.
    """

    options = ("arch", "tune_trials", "work_dir", "tuning_database")  # compile options it reads

    def __init__(self, kind: str = "llvm") -> None:
        if kind not in TARGET_KINDS:
            raise FlashcError(f"unknown TVM target {kind!r}; use one of {', '.join(TARGET_KINDS)}")
        self.kind = kind
        self.device = "cuda" if kind == "cuda" else "cpu"
        self.name = f"tvm-{self.device}"
        self._aten: set[str] | None = None

    def lowers(self, op: str) -> bool:
        """Whether op has a TVM lowering (flashc ops, the frontend's ATen ops, flashc's own)."""
        if op == "getitem":
            return True
        if op.startswith("flashc."):
            return op in {"flashc." + t._schema.name.split("::")[-1] for t in _flashc_converters()}
        if self._aten is None:
            import_tvm()
            from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

            frontend = {"aten." + k.split(".")[0] for k in ExportedProgramImporter().convert_map if isinstance(k, str)}
            own = {"aten.to", "aten.scaled_dot_product_attention"} | own_aten_ops()
            self._aten = frontend | own
        return op in self._aten

    def lower(self, program: Program, profile, options: dict[str, Any]):
        if self.kind == "cuda":
            from flashc.ir import op_name

            unfused = [n for n in program.op_nodes() if op_name(n) == "aten.scaled_dot_product_attention"]
            if unfused:
                # seen 2026-11-25 on an H200: llama-tiny at -O0 gives NaN under tvm-cuda while
                # the same module is right on llvm and fused attention is right on cuda
                raise FlashcError(f"tvm-cuda gave wrong results (NaN) for graphs with unfused attention "
                                  f"({unfused[0].name}: aten.scaled_dot_product_attention, as at -O0/-O1); "
                                  "compile at -O2 or -O3, where it becomes flashc.attention, or use target "
                                  "tvm-cpu or h100")
        arch = options.get("arch")
        if self.kind == "cuda" and arch is None and getattr(profile, "compute_capability", None):
            arch = "sm_{}{}".format(*profile.compute_capability)
        build = build_tvm(program, self.kind, arch=arch, tune_trials=options.get("tune_trials", 0),
                          work_dir=options.get("work_dir"), tuning_database=options.get("tuning_database"))
        return TvmExecutable(build, self.device)

    def save_payload(self, executable, directory: Path) -> dict[str, Any]:
        if isinstance(executable, TvmExecutable):
            executable.build.export(Path(directory) / "tvm")
        elif getattr(executable, "directory", None) is not None:  # a loaded artifact saved again
            shutil.copytree(executable.directory, Path(directory) / "tvm", dirs_exist_ok=True)
        else:
            raise FlashcError(f"the TVM backend cannot save a {type(executable).__name__}")
        return {"tvm": "tvm"}

    def load_payload(self, program: Program, directory: Path, info: dict[str, Any]):
        return load_tvm_artifact(Path(directory) / info.get("tvm", "tvm"), self.device)


class TvmExecutable:
    """A fresh build as a flashc executable; it loads its VM on first call (so a CUDA
    build made without a GPU can still be saved)."""

    def __init__(self, build: TvmBuild, device: str) -> None:
        self.build, self.device = build, device
        self._model: TvmModel | None = None

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if self._model is None:
            self._model = self.build.load(self.device)
        return self._model(*args)

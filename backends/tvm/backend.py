"""flashc's Backend protocol (backends/base.py) over build_tvm, for targets tvm-cpu / tvm-cuda."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flashc.backends.tvm.build import TARGET_KINDS, TvmBuild, build_tvm
from flashc.backends.tvm.common import import_tvm
from flashc.backends.tvm.lower import _flashc_converters, own_aten_ops, own_aten_targets
from flashc.backends.tvm.runtime import TvmModel, load_tvm_artifact
from flashc.errors import FlashcError
from flashc.ir import Program, op_name
from flashc.lowering import LoweringTable


@dataclass(frozen=True)
class TvmOptions:
    arch: str | None = None  # CUDA arch ('sm_90'); None: from the profile's compute capability
    tune_trials: int = 0  # MetaSchedule trials (0: flashc's default schedules, no tuning)
    work_dir: str | None = None  # MetaSchedule's working directory
    tuning_database: str | None = None  # a MetaSchedule database to reuse


# converters of TVM's frontend (0.27) that fail when the module builds
FRONTEND_BROKEN = {"aten.pixel_shuffle": "calls tvm.topi.nn.pixel_shuffle, which TVM 0.27 lacks",
                   "aten.lstm": "returns one tensor where PyTorch returns (output, h, c)",
                   "aten.gru": "returns one tensor where PyTorch returns (output, h)",
                   "aten.rnn_tanh": "refuses more than one layer", "aten.rnn_relu": "refuses more than one layer",
                   # flashc's exact decompositions (passes/exact_math.py) instead:
                   "aten.sinh": "no LLVM intrinsic: the build fails", "aten.cosh": "no LLVM intrinsic: the build fails",
                   "aten.celu": "computes exp(x) / alpha - 1 for exp(x / alpha) - 1",
                   "aten.softshrink": "masks by multiplying: softshrink(inf) is NaN",
                   "aten.logaddexp": "NaN for two equal infinities",
                   # PyTorch's own decompositions instead:
                   "aten.meshgrid": "indexing='xy' gave the transposed shapes",
                   "aten.cross_entropy_loss": "ignores label smoothing, reduction 'none' and probability targets"}
# integers are right, floats not: left to decompositions for floats
FRONTEND_BROKEN_FOR_FLOATS = {
    "aten.floor_divide": "gives inf for inf // 2 where PyTorch, dividing as fmod does, has NaN",
    # flashc's decompositions by a sort (passes/decompose.py) instead, values only
    "aten.median": "sorts NaN as a number: the median of a row holding NaN was a number",
    "aten.nanmedian": "sorts NaN as a number"}


class TvmBackend:
    """flashc's Backend interface over build_tvm ('llvm' -> tvm-cpu, 'cuda' -> tvm-cuda)."""

    Options = TvmOptions

    def __init__(self, kind: str = "llvm") -> None:
        if kind not in TARGET_KINDS:
            raise FlashcError(f"unknown TVM target {kind!r}; use one of {', '.join(TARGET_KINDS)}")
        self.kind = kind
        self.device = "cuda" if kind == "cuda" else "cpu"
        self.name = f"tvm-{self.device}"
        self._table: LoweringTable | None = None

    @property
    def lowering(self) -> LoweringTable:
        """flashc ops by flashc's converters (lower.py), ATen ops by flashc's own lowerings
        (aten_ops.py) or else by TVM's Relax frontend (its convert map, read once)."""
        if self._table is None:
            import_tvm()
            from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

            self._frontend_keys = {k for k in ExportedProgramImporter().convert_map if isinstance(k, str)}
            self._own_targets = own_aten_targets()
            ops: dict[str, Any] = {"aten." + k.split(".")[0]: "relax frontend" for k in self._frontend_keys}
            ops["aten.to"] = ops["aten.scaled_dot_product_attention"] = "relax frontend"
            for name in FRONTEND_BROKEN:  # left to their decompositions (`late_passes`)
                ops.pop(name, None)
            ops.update({name: "flashc" for name in own_aten_ops()})
            ops.update({"flashc." + t._schema.name.split("::")[-1]: fn for t, fn in _flashc_converters().items()})
            self._table = LoweringTable(self.name, ops)
        return self._table

    def converts(self, node) -> bool:
        """Whether lowering finds a converter for node's op overload: flashc's, else TVM's frontend's,
        whose table is per overload (`conv2d.default`, not `conv2d.padding`: padding='same')."""
        if not self.lowering.lowers(op_name(node)) or broken_converter(node):
            return False
        target = node.target
        if not (isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"):
            return True
        return target in self._own_targets or target.__name__ in self._frontend_keys

    def late_passes(self, profile, options: TvmOptions) -> list:
        """Ops neither flashc nor TVM's frontend lowers, written as PyTorch's decompositions of them."""
        from flashc.passes.decompose import DecomposeUnlowered

        return [DecomposeUnlowered(self.converts)]

    def lower(self, program: Program, profile, options: TvmOptions):
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
        arch = options.arch
        if self.kind == "cuda" and arch is None and getattr(profile, "compute_capability", None):
            arch = "sm_{}{}".format(*profile.compute_capability)
        build = build_tvm(program, self.kind, arch=arch, tune_trials=options.tune_trials,
                          work_dir=options.work_dir, tuning_database=options.tuning_database)
        return TvmExecutable(build, self.device, program.params)

    def save_payload(self, executable, directory: Path) -> dict[str, Any]:
        if isinstance(executable, TvmExecutable):
            executable.build.export(Path(directory) / "tvm")
        elif getattr(executable, "directory", None) is not None:  # a loaded artifact saved again
            shutil.copytree(executable.directory, Path(directory) / "tvm", dirs_exist_ok=True)
        else:
            raise FlashcError(f"the TVM backend cannot save a {type(executable).__name__}")
        return {"tvm": "tvm"}

    def load_payload(self, program: Program, directory: Path, info: dict[str, Any]):
        return load_tvm_artifact(Path(directory) / info.get("tvm", "tvm"), self.device, program.params)


class TvmExecutable:
    """A fresh build as a flashc executable; it loads its VM on first call (so a CUDA
    build made without a GPU can still be saved)."""

    def __init__(self, build: TvmBuild, device: str, state: dict[str, torch.Tensor] | None = None) -> None:
        self.build, self.device, self.state = build, device, state
        self._model: TvmModel | None = None

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if self._model is None:
            self._model = self.build.load(self.device, self.state)
        return self._model(*args)


def broken_converter(node) -> str | None:
    """Why TVM's frontend converter of node's op is not to be used (FRONTEND_BROKEN, or
    FRONTEND_BROKEN_FOR_FLOATS for a float result), else None."""
    name = op_name(node)
    return FRONTEND_BROKEN.get(name) or (FRONTEND_BROKEN_FOR_FLOATS.get(name) if _floating(node) else None)


def _floating(node) -> bool:
    """Whether the op's (first) result is a float tensor."""
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)) and val:
        val = val[0]
    return isinstance(val, torch.Tensor) and val.is_floating_point()

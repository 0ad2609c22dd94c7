"""Building a lowered module with TVM: targets, the default pipeline, MetaSchedule tuning,
and the exported artifact (model.so + weights.safetensors + model.json [+ tuning/])."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from flashc.backends.tvm.common import (
    ARTIFACT_FORMAT, LIBRARY, MANIFEST, TUNING_DIR, WEIGHTS, _log, cpu_cores, import_tvm,
)
from flashc.backends.tvm.lower import lower_to_relax
from flashc.backends.tvm.runtime import TvmModel, _device
from flashc.errors import FlashcError
from flashc.ir import Program


TARGET_KINDS = ("llvm", "cuda")


def make_target(target: str, arch: str | None = None) -> dict[str, Any]:
    """The TVM target dict for 'llvm' or 'cuda'.

    arch is the CPU for llvm (LLVM's -mcpu, e.g. 'znver4', 'x86-64-v3'; default this
    machine's, so vector code uses its AVX) and the SM for cuda ('sm_90'; default the
    local GPU's, required without one).
    """
    if target == "llvm":  # MetaSchedule also needs the core count it tunes threads for
        if arch is None:
            from tvm.target import codegen

            arch = codegen.llvm_get_system_cpu()
        return {"kind": "llvm", "mcpu": arch, "num-cores": cpu_cores()}
    if target == "cuda":
        if arch is None:
            arch = _local_cuda_arch()
        if not (isinstance(arch, str) and arch.startswith("sm_")):
            raise FlashcError(f"CUDA arch must look like 'sm_90', got {arch!r}")
        return {"kind": "cuda", "arch": arch}
    raise FlashcError(f"unknown TVM target {target!r}; use one of {', '.join(TARGET_KINDS)}")


def _local_cuda_arch() -> str:
    if not torch.cuda.is_available():
        raise FlashcError("no GPU here to take the CUDA arch from; pass arch='sm_90' (H100) or "
                          "'sm_80' (A100) to build ahead of time")
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def _passes(target):
    """TVM's per-target pipeline stages (relax.backend.<cpu_generic|cuda>.pipeline)."""
    kind = "cuda" if target.kind.name == "cuda" else "cpu_generic"
    return importlib.import_module(f"tvm.relax.backend.{kind}.pipeline")


def _fuse(tvm, mod, target):
    """The default pipeline's first half, up to fused TIR functions and before any schedule:
    what MetaSchedule tunes, and the exact functions its records are then applied to."""
    from tvm.s_tir import dlight as dl

    P = _passes(target)
    passes = [p for p in P.library_dispatch_passes(target) + P.legalize_passes(target)
              if not isinstance(p, dl.ApplyDefaultSchedule)]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def _default_schedules(target) -> list:
    """Passes scheduling the fused functions that no tuning record covers: dlight's GPU
    rules on CUDA (as TVM's CUDA pipeline); on llvm flashc's CPU rules and exp as
    vectorizable arithmetic (TVM's CPU pipeline schedules nothing; see cpu_schedules).
    Then, on every function, floats keep PyTorch's semantics (float_semantics.py)."""
    from tvm.s_tir import dlight as dl

    from flashc.backends.tvm.float_semantics import bfloat16_rounding, nan_propagating_min_max

    if target.kind.name == "cuda":
        return [dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                        dl.gpu.GeneralReduction(), dl.gpu.Fallback()), bfloat16_rounding()]
    from flashc.backends.tvm.cpu_schedules import polynomial_exp, schedule_rules

    return [dl.ApplyDefaultSchedule(*schedule_rules()), bfloat16_rounding(), nan_propagating_min_max(),
            polynomial_exp()]


def _default_pipeline(tvm, target, database_dir: Path | None, applied: list[str] | None = None):
    """TVM's Relax pipeline for the target, with the fused functions scheduled by the
    records of a MetaSchedule database when given (their names are appended to
    `applied`) and by the target's defaults (_default_schedules) otherwise."""
    from tvm import relax

    P = _passes(target)

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        mod = _fuse(tvm, mod, target)
        with target:
            if database_dir is not None:
                from tvm.s_tir import meta_schedule as ms

                with ms.database.JSONDatabase(work_dir=str(database_dir)):
                    mod = relax.transform.MetaScheduleApplyDatabase()(mod)
                if applied is not None:
                    applied.extend(gv.name_hint for gv, f in mod.functions.items()
                                   if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "tirx.is_scheduled" in f.attrs)
            mod = tvm.transform.Sequential(_default_schedules(target) + P.dataflow_lower_passes(target)
                                           + P.finalize_passes(target))(mod)
        return mod

    return pipeline


def _ms_build(mod, target, _params):
    """MetaSchedule's candidate build without its `import tvm.s_tir.tensor_intrin`, which
    takes ~40 s per fresh builder process (more than the builder's timeout); the fp32 CPU
    schedules flashc tunes use no tensor intrinsics."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _cpu_tensor_intrinsics() -> None:
    """Register TVM's CPU tensor intrinsics without its CUDA ones before MetaSchedule would import them all.

    MetaSchedule's TuneContext imports `tvm.s_tir.tensor_intrin`, whose CUDA module parses hundreds of TVMScript
    functions, each calling inspect.stack(), which scans sys.modules for every frame: with PyTorch loaded that
    took 146 s on a 2-core machine before a 4-trial CPU tuning could start. CPU schedules tensorize with the
    x86/ARM intrinsics only, so the package is entered without running its __init__ and those are imported."""
    import importlib.util
    import sys

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        for cpu in ("x86", "arm_cpu"):
            importlib.import_module(f"{name}.{cpu}")
    except Exception:
        del sys.modules[name]  # let MetaSchedule import it as usual
        raise


def _tune(tvm, mod, target, trials: int, database_dir: Path) -> dict[str, Any]:
    """MetaSchedule-tune mod's fused functions for `trials` measurements in total, printing
    progress; records accumulate in database_dir (a JSON database), reused on rebuild."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.measure_callback import MeasureCallback, PyMeasureCallback

    database_dir.mkdir(parents=True, exist_ok=True)
    _cpu_tensor_intrinsics()  # tuning is for llvm only (build_tvm)
    mod = _fuse(tvm, mod, target)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    # MetaSchedule's learned cost model needs xgboost; without it candidates are sampled at random
    cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
    _log(f"tuning {len(tasks)} task(s) with MetaSchedule, {trials} trial(s) in total, "
         f"{cost_model} cost model; records in {database_dir}")
    start = time.time()
    done = [0]

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            done[0] += len(candidates)
            ok = sum(r.error_msg is None for r in runner_results)
            _log(f"  trials {done[0]}/{trials}: task {task_id} ({tasks[task_id].task_name}) "
                 f"{ok}/{len(candidates)} measured, {time.time() - start:.0f}s")

    ms.relax_integration.tune_relax(
        mod, params={}, target=target, work_dir=str(database_dir), max_trials_global=trials,
        num_trials_per_iter=min(64, max(1, trials)), cost_model=cost_model,
        builder=ms.builder.LocalBuilder(f_build=_ms_build, timeout_sec=120),
        runner=ms.runner.LocalRunner(timeout_sec=120),
        measure_callbacks=[*MeasureCallback.create("default"), Progress()])
    return {"trials": trials, "tasks": len(tasks), "cost_model": cost_model,
            "seconds": round(time.time() - start, 1)}


@dataclass
class TvmBuild:
    """A built TVM module with its weights and call signature; export() writes the artifact."""

    executable: Any  # tvm.runtime.Executable
    relax_module: Any  # the Relax IRModule before TVM's pipeline (what flashc lowered)
    weights: dict[str, torch.Tensor]
    signature: dict[str, Any]
    target: dict[str, Any]
    tuning: dict[str, Any] = field(default_factory=dict)
    database_dir: Path | None = None
    build_seconds: float = 0.0

    def manifest(self) -> dict[str, Any]:
        import tvm

        return {"format": ARTIFACT_FORMAT, "library": LIBRARY, "weights": WEIGHTS, "target": self.target,
                "tvm_version": tvm.__version__, "signature": self.signature, "tuning": self.tuning,
                "build_seconds": round(self.build_seconds, 2)}

    def export(self, directory: str | os.PathLike) -> Path:
        """Write model.so, weights.safetensors, model.json (and tuning/) into directory,
        atomically: everything goes to a temporary sibling that then replaces directory."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            self.executable.export_library(str(tmp / LIBRARY))
            save_file({n: t.contiguous() for n, t in self.weights.items()}, str(tmp / WEIGHTS))
            if self.database_dir is not None and self.database_dir.exists():
                (tmp / TUNING_DIR).mkdir()
                for f in self.database_dir.glob("database_*.json"):
                    shutil.copy2(f, tmp / TUNING_DIR / f.name)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest(), indent=1))
            _replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def load(self, device: str = "cpu", state: Mapping[str, torch.Tensor] | None = None) -> "TvmModel":
        """Run this build in-process (no export), e.g. to check it before saving; state: see TvmModel."""
        tvm = import_tvm()
        return TvmModel(tvm.runtime.vm.VirtualMachine(self.executable, _device(tvm, device)),
                        self.weights, self.signature, device, state)


def _replace_dir(new: Path, directory: Path) -> None:
    old = None
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{os.getpid()}-{time.time_ns()}"
        os.rename(directory, old)
    os.rename(new, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_failure(error: Exception) -> FlashcError:
    """A FlashcError for a TVM build that failed: TVM's message, the fused functions it names
    (fused_<op>_<op>...: which ops were being built) and the way out."""
    import re

    text = str(error).strip()
    last = text.splitlines()[-1][:300] if text else type(error).__name__
    functions = sorted(set(re.findall(r"\bfused_\w+", text)))
    if not functions:
        functions = sorted({name for name in re.findall(r"\b(?:R\.|relax\.)([a-z_][\w.]*)", text)})
    where = f" in {', '.join(functions[:3])}" if functions else ""
    return FlashcError(f"TVM failed to build the lowered model{where} ({type(error).__name__}: {last}); "
                       "use target 'cpu', and report this with the model")


def build_tvm(program: Program, target: str = "llvm", *, arch: str | None = None, tune_trials: int = 0,
              work_dir: str | os.PathLike | None = None,
              tuning_database: str | os.PathLike | None = None) -> TvmBuild:
    """Lower an optimized Program to Relax and build it with TVM for 'llvm' or 'cuda'.

    tune_trials > 0 runs MetaSchedule (llvm only: measuring needs the target device)
    with that many trials in total; its database lives in work_dir/tuning (a temporary
    directory when work_dir is None) and is exported with the artifact.
    tuning_database applies the records of an earlier tuning (e.g. an artifact's
    tuning/) without measuring again. Functions without a record get the default
    schedules (_default_schedules): dlight's on CUDA, cpu_schedules' on llvm.
    """
    tvm = import_tvm()
    tgt_dict = make_target(target, arch)
    if tune_trials < 0:
        raise FlashcError(f"tune_trials must be >= 0, got {tune_trials}")
    if tune_trials and target != "llvm":
        raise FlashcError("MetaSchedule tuning measures on the target device and is only supported for "
                          "target 'llvm' here; build CUDA with tune_trials=0 (dlight schedules)")
    start = time.time()
    lowered = lower_to_relax(program)
    tgt = tvm.target.Target(tgt_dict)
    database_dir, tuning = None, {"trials": 0}
    if tuning_database is not None:
        database_dir = Path(tuning_database)
        if not (database_dir / "database_tuning_record.json").exists():
            raise FlashcError(f"no MetaSchedule database in {database_dir} (database_tuning_record.json)")
        tuning = {"trials": 0, "applied_from": str(database_dir)}
    if tune_trials:
        base = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="flashc-tvm-"))
        database_dir = base / TUNING_DIR
        tuning = _tune(tvm, lowered.module, tgt, tune_trials, database_dir)
    if database_dir is not None:
        tuning["database"] = TUNING_DIR
    applied: list[str] = []
    try:
        executable = tvm.compile(lowered.module, tgt, relax_pipeline=_default_pipeline(tvm, tgt, database_dir, applied))
    except FlashcError:
        raise
    except Exception as e:  # TVM refusing what flashc lowered: a flashc bug or an op TVM cannot build
        raise build_failure(e) from e
    if database_dir is not None:
        tuning["tuned_functions"] = sorted(applied)
    return TvmBuild(executable, lowered.module, lowered.weights, lowered.signature, tgt_dict, tuning,
                    database_dir, time.time() - start)

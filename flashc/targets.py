"""Targets: an explicit table from target name to backend and default hardware profile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flashc.errors import unknown_name


@dataclass(frozen=True)
class Target:
    name: str
    backend: Callable[[], object]  # constructs the backend (imported lazily)
    profile: str
    description: str
    status: str = "ready"  # or what is known to be missing
    # the level compile uses when none is given: the fastest measured correct on the target.
    # CUDA: -O3 (merged projections: one GEMV launch for q|k|v and gate|up) decoded Llama-3.2-1B
    # shapes in 0.90 ms a token on an H200 against 1.04 ms at -O2 (issue "Any model, fast by
    # default"); elsewhere -O2 until a benchmark shows -O3 is faster there.
    default_level: int = 2


def _eager():
    from flashc.backends.eager import EagerBackend

    return EagerBackend()


def _cuda():
    from flashc.backends.cuda import CudaBackend

    return CudaBackend()


def _onnx(providers: str):
    def make():
        from flashc.backends.onnx.backend import OnnxBackend

        return OnnxBackend(providers)

    return make


def _tvm(kind: str):
    def make():
        from flashc.backends.tvm.backend import TvmBackend

        return TvmBackend(kind)

    return make


def _lpu():
    from flashc.backends.lpu.backend import LpuBackend

    return LpuBackend()


TARGETS: dict[str, Target] = {
    "eager": Target("eager", _eager, "cpu", "optimized graph run by PyTorch; the numeric reference"),
    "cpu": Target("cpu", _eager, "cpu", "PyTorch on the CPU with flashc's fused graph: the reference CPU target, "
                  "about eager's speed (onnx-cpu is the fast CPU path)"),
    "h100": Target("h100", _cuda, "h100", "NVIDIA H100: Triton kernels + CUDA graphs",
                   "first kernels: fused ops + CUDA graph", default_level=3),
    "h200": Target("h200", _cuda, "h200", "NVIDIA H200: Triton kernels + CUDA graphs",
                   "first kernels: fused ops + CUDA graph", default_level=3),
    "a100": Target("a100", _cuda, "a100", "NVIDIA A100: Triton kernels + CUDA graphs",
                   "first kernels: fused ops + CUDA graph", default_level=3),
    "l4": Target("l4", _cuda, "l4", "NVIDIA L4: Triton kernels + CUDA graphs",
                 "first kernels: fused ops + CUDA graph", default_level=3),
    "onnx-cpu": Target("onnx-cpu", _onnx("cpu"), "cpu", "ONNX model (ORT contrib ops) run by ONNX Runtime (CPU)"),
    "onnx-cuda": Target("onnx-cuda", _onnx("cuda"), "h100", "ONNX model run by onnxruntime-gpu (CUDA EP)",
                        "ready; needs onnxruntime-gpu"),
    "tvm-cpu": Target("tvm-cpu", _tvm("llvm"), "cpu", "TVM Relax module built for llvm (untuned unless "
                      "tune_trials is set)"),
    "tvm-cuda": Target("tvm-cuda", _tvm("cuda"), "h100", "TVM Relax module built for CUDA (dlight schedules)",
                       "builds without a GPU; GPU numerics unverified"),
    "lpu-v1": Target("lpu-v1", _lpu, "lpu-v1", "static dataflow schedule and predicted speed on SRAM-only LPU "
                     "chips (Groq TSP figures); runs the reference on the CPU", "simulated: no LPU hardware"),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise unknown_name("target", name, list(TARGETS))
    return TARGETS[name]

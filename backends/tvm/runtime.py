"""Running exported TVM artifacts; works with TVM's runtime library alone (never imports
tvm.relax), which is all the GPU machine has. CUDA kernels ship as source in model.so
and are compiled by NVRTC for the local GPU when the module loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from flashc.backends.tvm.common import ARTIFACT_FORMAT, MANIFEST, READ_FORMATS, cpu_cores, import_tvm
from flashc.backends.tvm.indexing import out_of_range_message
from flashc.errors import ArtifactError, FlashcError, InputError
from flashc.ir import dtype_name


def _device(tvm, device: str):
    if device == "cpu":
        _use_all_cores()
        return tvm.cpu(0)
    if device == "cuda":
        _enable_cuda_runtime(tvm)
        dev = tvm.cuda(0)
        if not dev.exist:
            raise FlashcError("no CUDA device visible to TVM; run a CUDA artifact on a machine with an NVIDIA GPU")
        return dev
    raise FlashcError(f"unknown device {device!r}; use 'cpu' or 'cuda'")


def _use_all_cores() -> None:
    """Give TVM's thread pool one thread per physical core. Without TVM_NUM_THREADS (or
    OMP_NUM_THREADS) it takes half the logical CPUs on x86, assuming two hyper-threads per
    core: one thread on a 2-vCPU machine without SMT, half its speed. The pool reads the
    variable when it starts, at the first parallel kernel of the process."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(cpu_cores())


_LOADED_LIBRARIES: set[str] = set()


def _load_runtime_library(tvm, name: str) -> None:
    """Load tvm/lib/<name> into the process (RTLD_GLOBAL, once), if the wheel has it.

    A runtime-only TVM (TVM_USE_RUNTIME_LIB=1, the GPU machine) loads libtvm_runtime.so
    alone. CUDA support is in libtvm_runtime_cuda.so, and the contrib kernels that
    lowered ops call are in libtvm_runtime_extra.so (tvm.contrib.sort.topk: MoE routing
    on the CPU), which the compiler library brings along when it is loaded.
    """
    if name in _LOADED_LIBRARIES:
        return
    import ctypes

    lib = Path(tvm.__file__).parent / "lib" / name
    if lib.exists():
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            hint = "; CUDA artifacts run on a machine with an NVIDIA driver" if "cuda" in name else ""
            raise FlashcError(f"TVM's runtime library {name} does not load here ({e}){hint}") from None
    _LOADED_LIBRARIES.add(name)


_CUDA_READY = False


def _enable_cuda_runtime(tvm) -> None:
    """Load TVM's CUDA runtime and compile kernels with NVRTC for the local GPU when modules load.

    A runtime-only TVM does not load libtvm_runtime_cuda.so by itself, and the compiler's
    own callback takes the arch from a target scope that does not exist at load time.
    """
    global _CUDA_READY
    if _CUDA_READY:
        return
    import tvm_ffi

    _load_runtime_library(tvm, "libtvm_runtime_cuda.so")

    def compile_cuda(code, *_):
        from tvm.support import nvcc

        arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
        return nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvrtc")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    _CUDA_READY = True


def _to_tvm(tvm, t: torch.Tensor):
    """A zero-copy TVM view of t (copied first if not contiguous or not 64-byte aligned)."""
    if not t.is_contiguous() or t.data_ptr() % 64:
        t = t.contiguous().clone()
    return tvm.runtime.from_dlpack(t), t


class TvmModel:
    """A loaded TVM build: `model(*tensors) -> list[torch.Tensor]` on its device.

    A module that writes in place returns the new values after its outputs (signature 'writes'): a
    written input is copied into the caller's tensor, a written weight/buffer (state: a KV cache) into
    its tensor in `state` (the compiled program's params, so flashc's checks see and restore it), else
    into the model's own copy; each call reads the state as it then is.
    """

    def __init__(self, vm, weights: dict[str, torch.Tensor], signature: dict[str, Any], device: str,
                 state: Mapping[str, torch.Tensor] | None = None) -> None:
        import tvm

        self.tvm, self.vm, self.signature, self.device = tvm, vm, signature, device
        self.directory: Path | None = None  # the artifact it was loaded from, if any
        self.main = vm["main"]
        keep = [_to_tvm(tvm, w.to(device)) for w in weights.values()]
        self._weights = [k[0] for k in keep]
        self._weight_tensors = [k[1] for k in keep]  # keep the torch storage alive
        self.writes = signature.get("writes", [])
        index = {name: i for i, name in enumerate(weights)}
        self._state: dict[int, torch.Tensor] = {}  # weight position -> the tensor the state lives in
        for w in self.writes:
            if "weight" in w:
                i = index[w["weight"]]
                outside = state.get(w["weight"]) if state is not None else None
                self._state[i] = outside if outside is not None else self._weight_tensors[i]
        # per written value: the caller's input position, or None and the state tensor it goes into
        self._write_back = [(w["input"], None) if "input" in w else (None, self._state[index[w["weight"]]])
                            for w in self.writes]

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu") -> "TvmModel":
        return load_tvm_artifact(directory, device)

    def _check(self, args) -> None:
        specs = self.signature["inputs"]
        if len(args) != len(specs):
            raise InputError(f"expected {len(specs)} input(s), got {len(args)}")
        for spec, a in zip(specs, args):
            if not isinstance(a, torch.Tensor) or list(a.shape) != spec["shape"] or dtype_name(a.dtype) != spec["dtype"]:
                got = f"{dtype_name(a.dtype)}{list(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
                raise InputError(f"input {spec['name']!r}: expected {spec['dtype']}{spec['shape']}, got {got}; "
                                 "the TVM module was built for that shape: build again for a new one")

    def __call__(self, *args: torch.Tensor) -> list:
        """The flat outputs: tensors, and the Python values (None, numbers) the graph returns
        as they are. Raises InputError when indices were out of range (indexing.py)."""
        self._check(args)
        inputs = [_to_tvm(self.tvm, a.to(self.device)) for a in args]
        weights = list(self._weights)
        state = {i: _to_tvm(self.tvm, t.to(self.device)) for i, t in self._state.items()}  # zero-copy: aligned
        for i, (array, _) in state.items():
            weights[i] = array
        try:
            out = self.main(*[i[0] for i in inputs], *weights)
        except Exception as e:  # a TVM runtime error (an assertion of the VM, a kernel failing)
            last = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            raise FlashcError(f"the TVM module failed at run time ({last}); run the model with target 'cpu' "
                              "and report this") from e
        # Copied out of TVM's memory: an output may be a constant of the module or an input
        # passed through (x * 1 after simplification), which the caller must not write into.
        results = [torch.from_dlpack(o).clone() for o in out]
        kinds = self.signature["outputs"]
        tensors = sum(1 for k in kinds if "constant" not in k)
        written = results[tensors:tensors + len(self.writes)]
        for check, extremes in zip(self.signature.get("index_checks", []), results[tensors + len(written):]):
            lo, hi = (int(v) for v in extremes.tolist())
            if lo < check["low"] or hi >= check["high"]:
                raise InputError(out_of_range_message(check, lo, hi))  # before any write: state kept
        for (position, state), value in zip(self._write_back, written):
            dst = args[position] if state is None else state
            with torch.no_grad():
                dst.copy_(value)
        produced = iter(results[:tensors])
        return [k["constant"] if "constant" in k else next(produced) for k in kinds]


def load_tvm_artifact(directory: str | os.PathLike, device: str = "cpu",
                      state: Mapping[str, torch.Tensor] | None = None) -> TvmModel:
    """Load an exported TVM artifact with only TVM's runtime (never imports tvm.relax). state: where the
    weights/buffers the module writes in place live (TvmModel), if not in the model's own copies."""
    from flashc.artifact import load_tensors

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise ArtifactError(f"{directory} is not a flashc TVM artifact (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") not in READ_FORMATS:
        why = (" (format 1 predates the fixes of reductions, indices and casts: its answers may be wrong)"
               if manifest.get("format") == 1 else "")
        raise ArtifactError(f"{manifest_path}: artifact format {manifest.get('format')!r}, "
                            f"this flashc reads {ARTIFACT_FORMAT}{why}; rebuild it")
    kind = manifest["target"]["kind"]
    if (kind == "cuda") != (device == "cuda"):
        raise ArtifactError(f"{directory} was built for {kind}; load it with device="
                            f"{'cuda' if kind == 'cuda' else 'cpu'}")
    tvm = import_tvm()
    dev = _device(tvm, device)
    if tvm._RUNTIME_ONLY:
        _load_runtime_library(tvm, "libtvm_runtime_extra.so")
    lib = tvm.runtime.load_module(str(directory / manifest["library"]))
    from tvm.runtime.vm import VirtualMachine

    stored = load_tensors(directory / manifest["weights"])  # aligned as PyTorch allocates
    names = [w["name"] for w in manifest["signature"]["weights"]]
    missing = [n for n in names if n not in stored]
    if missing:
        raise ArtifactError(f"{directory / manifest['weights']} lacks weight(s) {', '.join(missing[:5])}")
    weights = {n: stored[n] for n in names}
    model = TvmModel(VirtualMachine(lib, dev), weights, manifest["signature"], device, state)
    model.directory = directory
    return model

"""The TVM backend: an optimized Program lowered to a Relax module and built by TVM.

Lowering walks the Program's ATen-level FX graph with a `relax.BlockBuilder` instead
of going through `from_exported_program`: the graph is no longer an ExportedProgram
after flashc's passes (it calls flashc ops and has rewritten weights), and walking it
directly lets flashc decide how weights reach the module. ATen ops reuse the
per-node converters of TVM's torch.export frontend (its `convert_map`, which covers
hundreds of ops); flashc ops, `aten.linear` and the `getitem` of their tuples are built
here as Relax expressions.

Weights are function parameters after the user inputs (attribute `num_input`), stored
beside the library (`weights.safetensors`), not constants baked into `model.so`: a
large model then builds and links fast and the library stays small. Each weight is
stored in the layout its op reads (WEIGHT_LAYOUTS: a linear's transposed, a MoE's
expert banks flattened for one GEMM each), so no `permute_dims` of a weight runs per
call, the 6x slowdown of the frontend's `keep_params_as_input` path.

Artifacts load with TVM's runtime alone (`load_tvm_artifact`), which is all the GPU
machine has: CUDA kernels are carried as source and compiled by NVRTC when loaded.

CPU builds get flashc's own default schedules (cpu_schedules: register-tiled parallel
matmuls, vectorized elementwise kernels); TVM's CPU pipeline leaves every kernel a
serial naive loop nest. CUDA builds get dlight's.

What the module computes is PyTorch's answer or a flashc error, never silently another:
ATen ops whose frontend converter is wrong or missing are lowered by flashc (aten_ops:
batch norm, slicing bounds, half-precision reductions, IEEE zeros), indices are
normalized and checked on every call (indexing), in-place writes are carried as new
values, scattered into the storage a view was taken from, and written back into the
caller's inputs and the model's state by the runtime (in_place), and TIR passes keep
bfloat16 rounding and NaN propagation (float_semantics).

Modules: common (TVM import, helpers), relax_ops (flashc ops in Relax), lower (FX ->
Relax), aten_ops, indexing, in_place (what lower builds itself), cpu_schedules (default
CPU schedules), float_semantics (TIR passes), build (pipeline, tuning, export), runtime
(runtime-only loading), backend (flashc's Backend protocol).
"""

from flashc.backends.tvm.backend import TvmBackend, TvmExecutable
from flashc.backends.tvm.build import TARGET_KINDS, TvmBuild, build_tvm, make_target
from flashc.backends.tvm.common import INSTALL_TVM, import_tvm
from flashc.backends.tvm.lower import WEIGHT_LAYOUTS, Lowered, lower_to_relax, unsupported_op, weight_transposes
from flashc.backends.tvm.runtime import TvmModel, load_tvm_artifact

__all__ = ["INSTALL_TVM", "TARGET_KINDS", "WEIGHT_LAYOUTS", "Lowered", "TvmBackend", "TvmBuild", "TvmExecutable",
           "TvmModel", "build_tvm", "import_tvm", "load_tvm_artifact", "lower_to_relax", "make_target",
           "unsupported_op", "weight_transposes"]

"""tvm-cuda numerics and speed on a GPU machine that has only TVM's runtime.

A tvm-cuda build of llama-tiny, run on the H100 with TVM's runtime alone, was 0.6 off
eager (relative error of the logits, 2026-11-25). This script bisects such a failure:
whole models (llama-tiny fp32 at -O3 and -O0, fp16 at -O3) and each op of flashc's
Relax lowering alone, each compiled here and run there against eager references.

Step 1, here (TVM's compiler, nvcc; no GPU needed):

    python bench/tvm_cuda_check.py build --out build/tvmcuda [--arch sm_90]

writes one folder per case under --out:
  cuda/             the tvm-cuda artifact (model.so carrying CUDA source, weights, model.json)
  cpu/              the same Relax module built for llvm (x86-64-v3, runs on any AVX2 CPU);
                    ops and llama-tiny-O3-fp32 only, to keep what is carried small
  io.safetensors    inputs (input.N) and eager reference outputs (reference.N)
  case.json         what the case is, its tolerance, the local nvcc compile of its kernels
  hf/               llama-tiny -O3 cases: the Hugging Face model, for eager and flashc timings
The kernels of each CUDA module are compiled with the local nvcc for --arch as a check;
on the GPU, NVRTC compiles them again when the module loads.

Step 2, on the GPU machine (TVM's runtime only, TVM_USE_RUNTIME_LIB=1):

    python bench/tvm_cuda_check.py check --dir build/tvmcuda --out $OUT [--device cuda]

runs every case and prints one table, also written to OUTDIR/tvm_cuda.md (rows as JSON
in tvm_cuda.json). Rows per case:
  tvm-cuda              error vs the reference; error of a second call made after the CUDA
                        caching allocator was filled with NaN (exposes a weight, input or
                        output whose memory TVM does not own); ms per call by CUDA events
  tvm-cuda, exact math  llama cases: NVRTC without fast-math division, sqrt, denormals and
                        FMA contraction
  tvm-cpu               the same Relax module built for llvm, on the GPU machine's CPU
  eager torch, flashc h100 -O3   llama -O3 cases: PyTorch and flashc's CUDA target there
A case or variant that fails is a row naming its error; the run goes on. `--device cpu`
runs the cpu artifacts only (no GPU needed).

The GPU machine has Python 3.12 and torch but no TVM: carry build/tvmcuda (~20 MB),
TVM's Python package without its compiler in build/tvmgpu/site (15 MB: the installed
`tvm` folder less lib/libtvm_compiler.so, 3rdparty, include, src, topi, web) and the
apache_tvm_ffi 0.1.14.post0 cp312 wheel in build/tvmgpu/wheels (3 MB), then:

    pip install --no-index --no-deps --target /tmp/site build/tvmgpu/wheels/apache_tvm_ffi-*.whl
    pip install --no-deps --no-build-isolation .
    PYTHONPATH=/tmp/site:$PWD/build/tvmgpu/site TVM_USE_RUNTIME_LIB=1 \
        python bench/tvm_cuda_check.py check --dir build/tvmcuda --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bench import wall_time  # noqa: E402  (same folder)
from gpu_bench import cuda_time  # noqa: E402

SEQ = 16
CPU_ARCH = "x86-64-v3"  # the cpu artifacts must run on the GPU machine's CPU, not only on znver4
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}
EXACT_MATH_NVRTC = "--ftz=false --prec-div=true --prec-sqrt=true --fmad=false"
CARRY_LIMIT_MB = 22  # with TVM's runtime-only layout and tvm_ffi wheel (18 MB): ~40 MB to carry


# ---------------------------------------------------------------- cases (build side)

@dataclass
class Case:
    """A captured Program with its inputs and eager reference outputs."""

    name: str
    description: str
    program: object  # flashc.ir.Program
    inputs: list[torch.Tensor]
    reference: list[torch.Tensor]
    tolerance: float
    hf_model: torch.nn.Module | None = None
    cpu_build: bool = True  # also build for llvm (the tvm-cpu row)
    notes: dict = field(default_factory=dict)


class OneOp(torch.nn.Module):
    """A module whose forward is one op; its weights are parameters, so they lower as weights."""

    def __init__(self, fn: Callable, **weights: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, w in weights.items():
            self.register_parameter(name, torch.nn.Parameter(w, requires_grad=False))

    def forward(self, *xs):
        return self.fn(self, *xs)


def _fp32_reference(module: torch.nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Eager outputs of module with its weights and floating inputs upcast to fp32: the
    reference for a half-precision case (its error is then the half rounding alone)."""
    with torch.no_grad():
        out = copy.deepcopy(module).float()(*[x.float() if x.is_floating_point() else x for x in inputs])
    return [o.float() for o in (out if isinstance(out, (tuple, list)) else [out])]


def op_cases() -> Iterator[Case]:
    """Each op of flashc's TVM lowering alone (relax_ops.py, aten.linear, embedding)."""
    from flashc.capture import capture

    flashc_ops = torch.ops.flashc
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def linear(m, x):
        return torch.nn.functional.linear(x, m.w)

    specs = {  # name: (forward, weights, inputs, description)
        "op-linear": (linear, {"w": r(256, 128)}, [r(1, SEQ, 128)], "x[1,16,128] @ W[256,128]^T"),
        "op-linear-2d": (linear, {"w": r(256, 128)}, [r(SEQ, 128)], "x[16,128] @ W^T"),
        "op-linear-m128": (linear, {"w": r(512, 256, scale=0.1)}, [r(1, 128, 256)], "128 rows: dlight Matmul"),
        "op-embedding": (lambda m, i: torch.nn.functional.embedding(i, m.w), {"w": r(512, 128)},
                         [torch.randint(0, 512, (1, SEQ), generator=g)], "take rows of a [512,128] table"),
        "op-rms_norm": (lambda m, x: flashc_ops.rms_norm(x, m.w, 1e-6), {"w": r(128)}, [r(1, SEQ, 128)], ""),
        "op-add_rms_norm": (lambda m, x, y: flashc_ops.add_rms_norm(x, y, m.w, 1e-6), {"w": r(128)},
                            [r(1, SEQ, 128), r(1, SEQ, 128)], "two outputs: normed, sum"),
        "op-rotary": (lambda m, x, c, s: flashc_ops.rotary(x, c, s), {},
                      [r(1, 4, SEQ, 32), r(1, SEQ, 32), r(1, SEQ, 32)], "q[1,4,16,32]"),
        "op-swiglu": (lambda m, a, b: flashc_ops.swiglu(a, b), {}, [r(1, SEQ, 256), r(1, SEQ, 256)], ""),
        "op-geglu": (lambda m, a, b: flashc_ops.geglu(a, b, "tanh"), {}, [r(1, SEQ, 256), r(1, SEQ, 256)], ""),
        "op-attention-causal": (lambda m, q, k, v: flashc_ops.attention(q, k, v, None, True, 0.17), {},
                                [r(1, 4, SEQ, 32), r(1, 2, SEQ, 32), r(1, 2, SEQ, 32)], "GQA 4:2, causal"),
        "op-attention-nomask": (lambda m, q, k, v: flashc_ops.attention(q, k, v, None, False, 0.17), {},
                                [r(1, 4, SEQ, 32), r(1, 2, SEQ, 32), r(1, 2, SEQ, 32)], "GQA 4:2, no mask"),
        "op-attention-boolmask": (lambda m, q, k, v, mask: flashc_ops.attention(q, k, v, mask, False, 0.17), {},
                                  [r(1, 4, SEQ, 32), r(1, 2, SEQ, 32), r(1, 2, SEQ, 32),
                                   torch.rand(1, 1, SEQ, SEQ, generator=g) > 0.3], "boolean mask"),
        "op-moe": (lambda m, x, logits: flashc_ops.moe(x, logits, m.gate_up, m.down, 2, True),
                   {"gate_up": r(4, 256, 128, scale=0.1), "down": r(4, 128, 128, scale=0.1)},
                   [r(SEQ, 128), r(SEQ, 4)], "4 experts, top-2, dense formulation"),
    }
    for name, (fn, weights, inputs, description) in specs.items():
        module = OneOp(fn, **weights).eval()
        program = capture(module, tuple(inputs))
        yield Case(name, description, program, inputs, program.run_flat(*inputs), TOLERANCE[torch.float32])
    # half precision: dlight's tensor-core Matmul rule takes fp16 matmuls of > 64 rows
    module = OneOp(linear, w=r(512, 256, scale=0.1).half()).eval()
    inputs = [r(1, 128, 256).half()]
    yield Case("op-linear-m128-fp16", "fp16, 128 rows: dlight's tensor-core Matmul", capture(module, tuple(inputs)),
               inputs, _fp32_reference(module, inputs), TOLERANCE[torch.float16])


def llama_cases() -> Iterator[Case]:
    """llama-tiny prefill of 16 tokens: fp32 at -O3 (flashc ops) and -O0 (ATen only), fp16 at -O3."""
    from flashc import zoo
    from flashc.capture import capture
    from flashc.pass_manager import PassContext, PassManager
    from flashc.pipelines import pipeline
    from flashc.profiles import PROFILES

    ids = zoo.example_inputs("llama-tiny", 1, SEQ, seed=1)[0]
    for dtype, level in ((torch.float32, 3), (torch.float32, 0), (torch.float16, 3)):
        model = zoo.build("llama-tiny", dtype=dtype).eval()
        program = capture(model, (ids,), {"use_cache": False})
        PassManager(pipeline(level)).run(program, PassContext(PROFILES["cpu"]))
        if dtype == torch.float32:
            with torch.no_grad():
                reference = [model(ids, use_cache=False).logits]
        else:
            with torch.no_grad():
                reference = [copy.deepcopy(model).float()(ids, use_cache=False).logits]
        name = f"llama-tiny-O{level}-{'fp32' if dtype == torch.float32 else 'fp16'}"
        first = dtype == torch.float32 and level == 3
        # -O0 is the same model as -O3: no second copy of the HF weights; a cpu build of the
        # first case only keeps what the GPU machine gets under CARRY_LIMIT_MB with TVM's runtime
        yield Case(name, f"prefill {SEQ} tokens, flashc -O{level}", program, [ids], reference, TOLERANCE[dtype],
                   hf_model=model if level == 3 else None, cpu_build=first, notes={"level": level})


def _find_module(module, kind: str):
    if module.kind == kind:
        return module
    for child in module.imports:
        found = _find_module(child, kind)
        if found is not None:
            return found
    return None


def _nvcc_check(build, arch: str) -> str:
    """Compile the build's CUDA kernels with the local nvcc for arch: 'ok (N kernels)' or the error."""
    import tvm
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        return "skipped: no nvcc"
    cuda = _find_module(build.executable.mod, "cuda")
    if cuda is None:
        return "no CUDA module"
    source = str(cuda.inspect_source(""))
    try:
        with tvm.target.Target({"kind": "cuda", "arch": arch}):
            nvcc.compile_cuda(source, target_format="cubin", arch=arch, compiler="nvcc")
    except Exception as e:  # noqa: BLE001 - the compiler's message is the result
        return f"FAILED: {str(e).strip().splitlines()[-1][:300]}"
    return f"ok ({source.count('__global__')} kernels)"


def build_all(out: Path, arch: str, targets: list[str]) -> int:
    from safetensors.torch import save_file

    from flashc.backends.tvm import build_tvm

    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for case in [*llama_cases(), *op_cases()]:
        folder = out / case.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        info = {"name": case.name, "description": case.description, "tolerance": case.tolerance,
                "inputs": len(case.inputs), "outputs": len(case.reference), "arch": arch, **case.notes}
        for target in [t for t in targets if t == "cuda" or case.cpu_build]:
            start = time.perf_counter()
            try:
                build = build_tvm(case.program, target, arch=arch if target == "cuda" else CPU_ARCH)
                build.export(folder / ("cuda" if target == "cuda" else "cpu"))
                info[f"{target}_build_s"] = round(time.perf_counter() - start, 1)
                if target == "cuda":
                    info["nvcc"] = _nvcc_check(build, arch)
            except Exception as e:  # noqa: BLE001 - one case failing to build is a result, not the end
                failures += 1
                info[f"{target}_build_error"] = f"{type(e).__name__}: {str(e)[:500]}"
                traceback.print_exc()
        tensors = {f"input.{i}": x.contiguous() for i, x in enumerate(case.inputs)}
        tensors.update({f"reference.{i}": y.contiguous() for i, y in enumerate(case.reference)})
        save_file(tensors, str(folder / "io.safetensors"))
        if case.hf_model is not None:
            case.hf_model.save_pretrained(str(folder / "hf"))
        (folder / "case.json").write_text(json.dumps(info, indent=1))
        print(f"{case.name:26s} " + " ".join(f"{k}={v}" for k, v in info.items()
                                              if k.endswith(("_s", "_error")) or k == "nvcc"), flush=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"\n{out}: {size:.1f} MB" + (f" (over the {CARRY_LIMIT_MB} MB to carry)" if size > CARRY_LIMIT_MB else ""))
    return 1 if failures else 0


# ---------------------------------------------------------------- check (GPU side)

def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def max_rel_err(outputs, references) -> float:
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} output(s), {len(references)} reference(s)")
    return max(rel_err(o, r) for o, r in zip(outputs, references))


def churn_cuda_allocator() -> None:
    """Release PyTorch's cached CUDA memory, then allocate blocks of many sizes (small to
    256 MB) filled with NaN and drop them: memory that a module reads but does not own
    (a freed copy of a weight or input) now most likely holds NaN."""
    gc.collect()
    torch.cuda.empty_cache()
    sizes = [1 << 10] * 256 + [1 << 16] * 64 + [1 << 20] * 16 + [1 << 26] * 4  # floats
    junk = [torch.full((n,), float("nan"), device="cuda") for n in sizes]
    torch.cuda.synchronize()
    del junk


@dataclass
class Row:
    case: str
    variant: str
    err: float | None = None
    err_after_churn: float | None = None
    tolerance: float | None = None
    ms: float | None = None
    note: str = ""

    def ok(self) -> str:
        """'ok' when every error measured is within tolerance, 'FAIL' otherwise (NaN fails)."""
        if self.tolerance is None or self.err is None:
            return ""
        errors = [e for e in (self.err, self.err_after_churn) if e is not None]
        return "ok" if all(e <= self.tolerance for e in errors) else "FAIL"


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def check_case(folder: Path, device: str, rows: list[Row]) -> None:
    """Every variant of one case; each failure becomes a row with its error."""
    from safetensors.torch import load_file

    info = json.loads((folder / "case.json").read_text())
    io = load_file(str(folder / "io.safetensors"))
    inputs = [io[f"input.{i}"] for i in range(info["inputs"])]
    references = [io[f"reference.{i}"] for i in range(info["outputs"])]
    name, tol = info["name"], info["tolerance"]
    if info.get("nvcc", "").startswith("FAILED"):
        rows.append(Row(name, "nvcc (build machine)", note=info["nvcc"]))

    def attempt(variant: str, run: Callable[[Row], None], tolerance: float | None = tol) -> None:
        row = Row(name, variant, tolerance=tolerance)
        try:
            run(row)
        except Exception as e:  # noqa: BLE001 - a failing variant is a row of the table
            row.note = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            traceback.print_exc()
        rows.append(row)
        print(f"{row.case:26s} {row.variant:28s} err {_fmt(row.err, '.1e'):>8s} "
              f"churn {_fmt(row.err_after_churn, '.1e'):>8s} {_fmt(row.ms, '.3f'):>9s} ms {row.ok():4s} {row.note}",
              flush=True)

    if device == "cuda" and (folder / "cuda").exists():
        attempt("tvm-cuda", lambda row: _run_tvm_cuda(folder / "cuda", inputs, references, row))
        if "level" in info:  # a whole model
            attempt("tvm-cuda, exact math", lambda row: _run_tvm_cuda(folder / "cuda", inputs, references, row,
                                                                     nvrtc_options=EXACT_MATH_NVRTC))
    elif device == "cuda" and "cuda_build_error" in info:
        rows.append(Row(name, "tvm-cuda", note="build failed: " + info["cuda_build_error"][:200]))
    if (folder / "cpu").exists():
        attempt("tvm-cpu", lambda row: _run_tvm_cpu(folder / "cpu", inputs, references, row))
    if device == "cuda" and (folder / "hf").exists():
        attempt("eager torch", lambda row: _run_eager(folder / "hf", inputs, references, row), tolerance=None)
        attempt("flashc h100 -O3", lambda row: _run_flashc_cuda(folder / "hf", inputs, references, row),
                tolerance=None)


def _run_tvm_cuda(artifact: Path, inputs, references, row: Row, nvrtc_options: str | None = None) -> None:
    from flashc.backends.tvm import load_tvm_artifact

    previous = os.environ.get("TVM_CUDA_NVRTC_EXTRA_OPTS")
    if nvrtc_options is not None:
        os.environ["TVM_CUDA_NVRTC_EXTRA_OPTS"] = nvrtc_options  # read by TVM's NVRTC compile, at load
    try:
        model = load_tvm_artifact(artifact, "cuda")
        args = [x.cuda() for x in inputs]
        first = [o.clone() for o in model(*args)]
        torch.cuda.synchronize()
    finally:
        if nvrtc_options is not None:
            if previous is None:
                os.environ.pop("TVM_CUDA_NVRTC_EXTRA_OPTS", None)
            else:
                os.environ["TVM_CUDA_NVRTC_EXTRA_OPTS"] = previous
    row.err = max_rel_err(first, references)
    churn_cuda_allocator()
    row.err_after_churn = max_rel_err(model(*args), references)
    row.ms = cuda_time(lambda: model(*args))


def _run_tvm_cpu(artifact: Path, inputs, references, row: Row) -> None:
    from flashc.backends.tvm import load_tvm_artifact

    model = load_tvm_artifact(artifact, "cpu")
    row.err = max_rel_err(model(*inputs), references)
    row.ms = wall_time(lambda: model(*inputs))


def _hf_model(folder: Path):
    """The case's Hugging Face model on the GPU, in the dtype it was saved in."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto").to("cuda").eval()


def _run_eager(folder: Path, inputs, references, row: Row) -> None:
    model = _hf_model(folder)
    ids = inputs[0].cuda()

    def run():
        with torch.no_grad():
            return model(ids, use_cache=False).logits

    row.err = max_rel_err(run(), references)
    row.ms = cuda_time(run)
    row.note = f"{next(model.parameters()).dtype}"


def _run_flashc_cuda(folder: Path, inputs, references, row: Row) -> None:
    import flashc

    model = _hf_model(folder)
    ids = inputs[0].cuda()
    compiled = flashc.compile(model, "h100", ids, level=3)
    row.err = max_rel_err(compiled.executable(ids)[0], references)
    row.ms = cuda_time(lambda: compiled.executable(ids))


def environment(device: str) -> list[str]:
    import tvm

    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}, TVM {tvm.__version__} "
             f"(runtime only: {tvm._RUNTIME_ONLY})"]
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{major}{minor})")
    return lines


def check_all(directory: Path, out: Path, device: str) -> int:
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # as on the GPU machine: no TVM compiler
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu to check the cpu artifacts only")
        return 2
    folders = [f for f in sorted(directory.iterdir()) if (f / "case.json").exists()]
    if not folders:
        print(f"no cases in {directory}; make them with: python bench/tvm_cuda_check.py build --out {directory}")
        return 2
    header = environment(device)
    print("\n".join(header), flush=True)
    rows: list[Row] = []
    for folder in folders:
        try:
            check_case(folder, device, rows)
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable case folder
            traceback.print_exc()
            rows.append(Row(folder.name, "(case)", note=f"{type(e).__name__}: {str(e)[:200]}"))
    header.append(f"tvm.relax imported: {'tvm.relax' in sys.modules} (must be False with the runtime alone)")
    table = ["| case | variant | rel. err | after allocator churn | tolerance | ok | ms per call | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        table.append(f"| {row.case} | {row.variant} | {_fmt(row.err, '.1e')} | {_fmt(row.err_after_churn, '.1e')} | "
                     f"{_fmt(row.tolerance, 'g')} | {row.ok()} | {_fmt(row.ms, '.3f')} | {row.note} |")
    text = "\n".join([*header, "", *table, ""])
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tvm_cuda.md").write_text(text)
    (out / "tvm_cuda.json").write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile the cases here (TVM compiler, nvcc)")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--arch", default="sm_90", help="CUDA arch of the GPU (sm_90: H100 and H200)")
    build.add_argument("--targets", nargs="+", default=["cuda", "llvm"], choices=["cuda", "llvm"])
    check = sub.add_parser("check", help="run the cases (TVM runtime only) and write OUT/tvm_cuda.md")
    check.add_argument("--dir", type=Path, required=True)
    check.add_argument("--out", type=Path, required=True)
    check.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.command == "build":
        return build_all(args.out, args.arch, args.targets)
    return check_all(args.dir, args.out, args.device)


if __name__ == "__main__":
    raise SystemExit(main())

"""tvm-cuda against flashc's CUDA target on a llama-3.2-1b decode step (issue #13).

One decode step (batch 1, one new token, a static KV cache of --cache-len positions) of
the zoo's llama-3.2-1b shape with seeded random weights, built here by flashc's TVM
backend with TVM's default GPU schedules (dlight, no MetaSchedule: no GPU here) and run
on the GPU machine with TVM's runtime alone, beside flashc's CUDA target and eager
PyTorch on the same step. float16 by default: the tvm-cuda dtype already checked on the
H200 (bench/RESULTS.md, 2026-11-25); bfloat16 there is unchecked.

What the TVM module computes is flashc's DecodeStep with two differences, both because
the TVM backend refused the step as flashc.decode builds it:
  * the cache update is a value, not a write: a TVM module cannot write its inputs
    (backends/tvm/in_place.py refuses the step's index_copy_ into k_cache_i), so
    FunctionalDecodeStep returns (logits, *updated caches), each cache selected per slot
    with torch.where; the caller passes the returned caches to the next step. The copy of
    the whole cache this costs is part of the tvm-cuda time (32 MB per step at 1B, 1024);
  * DecodeAttention is left out of the -O3 pipeline (TVM had no lowering of
    flashc.decode_attention when this was written; it now lowers to the same masked
    attention), so the attention stays flashc.attention with the decode mask (it reads
    every cache slot, live or not, either way).

Step 1, here (TVM's compiler; nvcc, if present, compiles the kernels once as a check):

    python bench/tvm_cuda_1b.py build --out build/tvm1b [--arch sm_90] [--layers N] [--target llvm]

writes under --out: cuda/ (or cpu/ for --target llvm: the artifact's model.so and
model.json, WITHOUT weights.safetensors: 3.0 GB at 1B, the tied embedding stored twice),
weights.json (name, shape, dtype and sha256 of each weight the module takes, to check
that the GPU machine rebuilt the same ones), small_weights.safetensors (the weights up to
1 MB: norms, the rotary table, opaque scalars; 0.2 MB) and case.json (shape, seed, times).
At 1B: 42 s on 2 cores (capture and -O3 25 s, TVM 11 s), 0.8 MB, 6.9 GB of memory.

Step 2, on the GPU machine (TVM's runtime only, set up as in bench/tvm_cuda_check.py):

    PYTHONPATH=/tmp/site:$PWD/build/tvmgpu/site TVM_USE_RUNTIME_LIB=1 \\
        python bench/tvm_cuda_1b.py check --dir build/tvm1b --out $OUT [--device cpu]

rebuilds the model from the same zoo entry and seed on the CPU, captures and optimizes
the same step with flashc (no TVM needed), writes the weights the artifact names into
its weights.safetensors (stored layouts as backends/tvm/lower.py makes them, the small
ones from the build; sha256 compared with the build's), loads the module with TVM's
runtime and prints one table (variant, ms/step, x flashc, rel. err vs eager), also
written to OUT/tvm_1b.md:
  tvm-cuda                 TvmModel call: input checks, the VM, copies of all outputs
  tvm-cuda, VM only        the module's main alone, outputs left in TVM's memory
  flashc h100|h200 -O3     flashc.compile of flashc.decode.DecodeStep, as bench/decode.py
  eager                    DecodeStep in PyTorch (the reference)
`--device cpu` runs the cpu artifact of a --target llvm build against eager on the CPU.

Seen here (2 layers of the 1B shape, --target llvm, --device cpu, 2026-12-06): the TVM
module was 2.8e-2 off eager (eager fp16 is 1.3e-3 off fp32): Relax's matmul of float16
accumulated in float16 (aten.linear and attention's two matmuls in backends/tvm); with
out_dtype float32 there it was 1.5e-3, and backends/tvm now lowers them so (session 14).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bench import wall_time  # noqa: E402  (same folder)
from gpu_bench import cuda_time  # noqa: E402
from tvm_cuda_check import CPU_ARCH, _nvcc_check, environment, rel_err  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# float16 logits of a random-weight model after 16 layers: half rounding alone gives ~1e-3
# relative error against fp32 eager (flashc's CUDA target and eager itself land there too)
TOLERANCE = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 1e-4}
# weights up to this size travel with the build (norms, the rotary table, opaque scalars: 0.2 MB
# at 1B): the GPU machine's torch 2.11 did not lift the rotary inv_freq buffer as this one does
SMALL_WEIGHT = 1 << 20
CARRY_LIMIT_MB = 40  # the call carries 64 MiB: TVM's runtime (18 MB) and the repository too


class FunctionalDecodeStep(torch.nn.Module):
    """flashc.decode.DecodeStep for one new token whose cache update is a value:
    (input_ids[B, 1], cache_position[1], *kv) -> (logits, *updated kv), the inputs unchanged.

    A TVM module cannot write its inputs, so the step that flashc.decode captures (an
    index_copy_ into each cache tensor) is refused by the TVM backend; here each layer's
    cache is selected slot by slot with torch.where, an elementwise kernel on any target.
    """

    def __init__(self, model: torch.nn.Module, max_cache_len: int) -> None:
        super().__init__()
        self.model = model
        self.max_cache_len = max_cache_len
        self.config = model.config

    def input_names(self) -> list[str]:
        from flashc.decode import decode_input_names

        return decode_input_names(self.model)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor, *kv_cache: torch.Tensor):
        from transformers import StaticCache

        from flashc.decode import _bind_layer, attention_mask_for
        from flashc.ops import decode_mask

        batch, steps = input_ids.shape
        if steps != 1 or cache_position.shape != (1,):
            raise ValueError(f"FunctionalDecodeStep feeds one token (input_ids [B, 1], cache_position [1]), got "
                             f"input_ids {list(input_ids.shape)}, cache_position {list(cache_position.shape)}")
        cache = StaticCache(config=self.config, max_cache_len=self.max_cache_len)
        if len(kv_cache) != 2 * len(cache.layers):
            raise ValueError(f"expected {2 * len(cache.layers)} cache tensors (k and v per layer), got {len(kv_cache)}")
        slots = torch.arange(self.max_cache_len, device=cache_position.device)
        written = (slots == cache_position).view(1, 1, -1, 1)  # the new token's slot, over [B, H, L, D]
        updated = list(kv_cache)
        for i, layer in enumerate(cache.layers):
            _bind_layer(layer, kv_cache[2 * i], kv_cache[2 * i + 1], cache_position)

            def update(key_states, value_states, *args, i=i, **kwargs):
                updated[2 * i] = torch.where(written, key_states, kv_cache[2 * i])
                updated[2 * i + 1] = torch.where(written, value_states, kv_cache[2 * i + 1])
                return updated[2 * i], updated[2 * i + 1]

            layer.update = update
        visible = decode_mask(cache_position, self.max_cache_len)[None, None].expand(batch, 1, 1, -1)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask_for(self.model, visible),
                         position_ids=cache_position.unsqueeze(0).expand(batch, -1), cache_position=cache_position,
                         past_key_values=cache, use_cache=True)
        return (out.logits, *updated)


# ---------------------------------------------------------------- the model and its program (both sides)

def build_model(info: dict) -> torch.nn.Module:
    """The zoo model of the case on the CPU: CPU random numbers, so both machines draw the same weights."""
    from flashc import zoo

    return zoo.build(info["model"], dtype=DTYPES[info["dtype"]], seed=info["seed"], num_layers=info["layers"])


def example_inputs(model, cache_len: int) -> tuple:
    from flashc.decode import decode_example_inputs

    return tuple(decode_example_inputs(model, 1, cache_len))


def optimized_program(model, info: dict):
    """The functional step captured and optimized at -O3 less DecodeAttention (no TVM needed)."""
    from flashc.capture import capture
    from flashc.pass_manager import PassContext, PassManager
    from flashc.passes.decode_attention import DecodeAttention
    from flashc.pipelines import pipeline
    from flashc.profiles import PROFILES

    step = FunctionalDecodeStep(model, info["cache_len"])
    program = capture(step, example_inputs(model, info["cache_len"]))
    passes = [p for p in pipeline(3) if not isinstance(p, DecodeAttention)]
    PassManager(passes).run(program, PassContext(PROFILES[info["profile"]]))
    return program


def artifact_weights(program, expected: dict[str, dict], small: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights named in an artifact's signature (`expected`: weights.json), made from
    `program` as lower.py stores them: a parameter or constant by node name, '.T' / '.cols' /
    '.rows' its stored layout (WEIGHT_LAYOUTS). `small` (carried with the build: norms, rotary
    tables, opaque scalars) gives the ones another torch or transformers may name or fold
    differently; a large one whose name is not found here is looked up by its bytes."""
    from flashc.backends.tvm.lower import WEIGHT_LAYOUTS
    from flashc.errors import ArtifactError

    layouts = dict(WEIGHT_LAYOUTS.values())
    values = dict(program.params)
    for node in program.graph.nodes:
        if node.op == "get_attr":
            value = program.graph_module
            for part in node.target.split("."):
                value = getattr(value, part)
            values[node.name] = value
    by_bytes: dict[str, torch.Tensor] | None = None
    out = {}
    for name, e in expected.items():
        base, _, layout = name.rpartition(".")
        if name in small:
            out[name] = small[name]
        elif base in values and layout in layouts:
            out[name] = layouts[layout](values[base].detach()).contiguous()
        elif name in values:
            out[name] = values[name].detach().contiguous()
        else:
            if by_bytes is None:
                candidates = [v.detach().contiguous() for v in values.values() if isinstance(v, torch.Tensor)]
                candidates += [layouts["T"](v).contiguous() for v in list(candidates) if v.dim() >= 2]
                by_bytes = {fingerprint(v)["sha256"]: v for v in candidates}
            if e["sha256"] not in by_bytes:
                raise ArtifactError(f"weight {name!r} of the artifact is neither in the program rebuilt here nor "
                                    "equal to any of its weights (another transformers or torch version?)")
            out[name] = by_bytes[e["sha256"]]
    return out


def fingerprint(t: torch.Tensor) -> dict:
    data = t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(data).hexdigest()}


# ---------------------------------------------------------------- build (here)

def build(out: Path, info: dict, target: str, arch: str) -> int:
    from safetensors.torch import save_file

    from flashc.backends.tvm import build_tvm

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = build_model(info)
    program = optimized_program(model, info)
    info["capture_optimize_s"] = round(time.perf_counter() - start, 1)
    print(f"captured and optimized in {info['capture_optimize_s']} s", flush=True)
    start = time.perf_counter()
    built = build_tvm(program, target, arch=arch if target == "cuda" else CPU_ARCH)
    info["tvm_build_s"] = round(time.perf_counter() - start, 1)
    print(f"TVM build ({target}) in {info['tvm_build_s']} s", flush=True)
    folder = out / ("cuda" if target == "cuda" else "cpu")
    # the module and its manifest only; the check rebuilds the weights (weights.json: which ones)
    dataclasses.replace(built, weights={}).export(folder)
    (folder / "weights.safetensors").unlink()
    (out / "weights.json").write_text(json.dumps({n: fingerprint(w) for n, w in built.weights.items()}, indent=1))
    save_file({n: w.contiguous() for n, w in built.weights.items() if w.numel() * w.element_size() <= SMALL_WEIGHT},
              str(out / "small_weights.safetensors"))
    info.update(target=target, arch=arch if target == "cuda" else CPU_ARCH, weights=len(built.weights),
                weight_gb=round(sum(w.numel() * w.element_size() for w in built.weights.values()) / 1e9, 3))
    if target == "cuda":
        start = time.perf_counter()
        info["nvcc"] = _nvcc_check(built, arch)
        info["nvcc_s"] = round(time.perf_counter() - start, 1)
    (out / "case.json").write_text(json.dumps(info, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(json.dumps(info, indent=1))
    print(f"\n{out}: {size:.1f} MB to carry" + (f" (over {CARRY_LIMIT_MB} MB)" if size > CARRY_LIMIT_MB else ""))
    return 0 if size <= CARRY_LIMIT_MB and not info.get("nvcc", "").startswith("FAILED") else 1


# ---------------------------------------------------------------- check (GPU machine)

def write_weights(directory: Path, folder: Path, program) -> str:
    """Write folder/weights.safetensors from the program rebuilt here; how many match the build's bytes."""
    from safetensors.torch import load_file, save_file

    expected = json.loads((directory / "weights.json").read_text())
    weights = artifact_weights(program, expected, load_file(str(directory / "small_weights.safetensors")))
    for name, w in weights.items():
        e = expected[name]
        if list(w.shape) != e["shape"] or str(w.dtype).removeprefix("torch.") != e["dtype"]:
            raise ValueError(f"weight {name}: rebuilt {w.dtype}{list(w.shape)}, "
                             f"the module takes {e['dtype']}{e['shape']}")
    same = sum(fingerprint(w)["sha256"] == expected[n]["sha256"] for n, w in weights.items())
    save_file(weights, str(folder / "weights.safetensors"))
    return f"{same}/{len(weights)} weights byte-identical to the build's"


@dataclasses.dataclass
class Row:
    variant: str
    ms: float | None = None
    err: float | None = None
    err_fp32: float | None = None
    note: str = ""


def check(directory: Path, out: Path, device: str, position: int | None, variants: set[str]) -> int:
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # as on the GPU machine: no TVM compiler
    info = json.loads((directory / "case.json").read_text())
    folder = directory / ("cuda" if device == "cuda" else "cpu")
    if not folder.exists():
        print(f"no {folder}: build it with --target {'cuda' if device == 'cuda' else 'llvm'}")
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; a --target llvm build runs with --device cpu")
        return 2
    header = environment(device)
    name = info["model"] + (f" ({info['layers']} layers)" if info["layers"] else "")
    position = info["cache_len"] - 64 if position is None else position
    header.append(f"{name}, {info['dtype']}, decode batch 1 at position {position} of a {info['cache_len']}-slot "
                  f"static cache; tvm module built for {info['target']} {info['arch']} in {info['tvm_build_s']} s"
                  + (f"; lowering: {info['lowering']}" if "lowering" in info else ""))
    print("\n".join(header), flush=True)

    start = time.perf_counter()
    model = build_model(info)
    header.append(write_weights(directory, folder, optimized_program(model, info))
                  + f" (rebuilt in {time.perf_counter() - start:.0f} s)")
    print(header[-1], flush=True)

    from flashc.decode import DecodeStep

    model = model.to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 1), generator=g).to(device)
    pos = torch.tensor([position], device=device)
    cache = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(device)
             for t in example_inputs(model, info["cache_len"])[2:]]
    inputs = [ids, pos, *cache]
    eager = DecodeStep(model, info["cache_len"])
    with torch.no_grad():
        written = [t.clone() for t in cache]
        reference = eager(ids, pos, *written)
        # a float32 copy: model.float() then .to(float16) in place would leave the rotary table's inv_freq
        # buffer (float32 in Hugging Face's model) in float16, 0.5 rad off at position 960, for what runs next
        fp32 = DecodeStep(copy.deepcopy(model).float(), info["cache_len"])(ids, pos, *[t.float() for t in cache])
    timer = cuda_time if device == "cuda" else wall_time
    rows: list[Row] = []
    fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731

    def attempt(variant: str, run) -> None:
        row = Row(variant)
        try:
            run(row)
        except Exception as e:  # noqa: BLE001 - a failing variant is a row of the table
            traceback.print_exc()
            row.note = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        rows.append(row)
        print(f"{row.variant:26s} {fmt(row.ms, '9.3f')} ms  err {fmt(row.err, '.1e')}  {row.note}", flush=True)

    def run_tvm(row: Row) -> None:
        from flashc.backends.tvm import load_tvm_artifact

        tvm_model = load_tvm_artifact(folder, device)
        logits, *updated = tvm_model(*inputs)
        row.err, row.err_fp32 = rel_err(logits, reference), rel_err(logits, fp32)
        cache_err = max(rel_err(u, w) for u, w in zip(updated, written))
        row.note = f"updated KV cache vs eager's: {cache_err:.1e}"
        row.ms = timer(lambda: tvm_model(*inputs))
        # the VM's main alone: no input checks, outputs left where TVM wrote them
        args = [tvm_model.tvm.runtime.from_dlpack(t) for t in inputs] + tvm_model._weights
        vm_only.append(Row(f"tvm-{device}, VM only", ms=timer(lambda: tvm_model.main(*args)), err=row.err,
                           err_fp32=row.err_fp32, note="TvmModel less its input checks and output copies"))

    vm_only: list[Row] = []
    if "tvm" in variants:
        attempt(f"tvm-{device}", run_tvm)
        rows += vm_only

    def run_eager(row: Row) -> None:
        row.err, row.err_fp32 = 0.0, rel_err(reference, fp32)
        with torch.no_grad():
            row.ms = timer(lambda: eager(*inputs))
        row.note = "the reference"

    if "eager" in variants:
        attempt("eager", run_eager)
    if device == "cuda" and "flashc" in variants:
        import flashc
        from flashc.profiles import detect

        target = "h200" if "H200" in torch.cuda.get_device_name() else "h100"

        def run_flashc(row: Row) -> None:
            compiled = flashc.compile(DecodeStep(model, info["cache_len"]), target, tuple(inputs), level=3,
                                      profile=detect())
            logits = compiled.executable(*[t.clone() for t in inputs])[0]
            row.err, row.err_fp32 = rel_err(logits, reference), rel_err(logits, fp32)
            row.ms = timer(lambda: compiled.executable(*inputs))

        attempt(f"flashc {target} -O3", run_flashc)

    base = next((r.ms for r in rows if r.variant.startswith("flashc") and r.ms), None)
    tolerance = TOLERANCE[info["dtype"]]
    table = [f"| variant | ms/step | x flashc | rel. err vs eager (tolerance {tolerance:g}) | rel. err vs fp32 eager "
             "| note |", "| --- | --- | --- | --- | --- | --- |"]
    failed = False
    for r in rows:
        ok = "" if r.err is None else (" ok" if r.err <= tolerance else " FAIL")
        failed |= ok == " FAIL" or r.ms is None
        ratio = f"{r.ms / base:.2f}" if base and r.ms else ""
        table.append(f"| {r.variant} | {fmt(r.ms, '.3f')} | {ratio} | {fmt(r.err, '.1e')}{ok} | "
                     f"{fmt(r.err_fp32, '.1e')} | {r.note} |")
    header.append(f"tvm.relax imported: {'tvm.relax' in sys.modules} (must be False with the runtime alone)")
    text = "\n".join([*header, "", *table, ""])
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tvm_1b.md").write_text(text)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the decode step here (TVM compiler)")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--arch", default="sm_90", help="CUDA arch of the GPU (sm_90: H100 and H200)")
    b.add_argument("--target", default="cuda", choices=["cuda", "llvm"])
    b.add_argument("--model", default="llama-3.2-1b", help="a zoo model with random weights")
    b.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    b.add_argument("--dtype", default="float16", choices=list(DTYPES))
    b.add_argument("--cache-len", type=int, default=1024)
    b.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="run the built step (TVM runtime only) and write OUT/tvm_1b.md")
    c.add_argument("--dir", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    c.add_argument("--position", type=int, default=None, help="the new token's slot (default: cache_len - 64)")
    c.add_argument("--variants", nargs="+", default=["tvm", "flashc", "eager"], choices=["tvm", "flashc", "eager"])
    args = parser.parse_args()
    if args.command == "build":
        info = {"model": args.model, "layers": args.layers, "dtype": args.dtype, "cache_len": args.cache_len,
                "seed": args.seed, "level": 3, "profile": "h100", "passes": "-O3 less decode_attention"}
        return build(args.out, info, args.target, args.arch)
    return check(args.dir, args.out, args.device, args.position, set(args.variants))


if __name__ == "__main__":
    raise SystemExit(main())

"""LLM benchmark on the GPU: decode steps and prefill, flashc against eager and torch.compile.

    python bench/decode.py --models llama-3.2-1b llama-3-8b mixtral-8x7b:4 --out $OUT

Each model runs in its own child process (a crash or a timeout costs one model, and
memory is clean between models); `name:N` keeps the first N layers. Per model, bf16
with random weights:

* decode: one token per sequence at batch 1 and 8 over a static KV cache holding
  `--context` tokens (`flashc.decode.DecodeStep`: HF's model with a static cache) for
  eager PyTorch, `torch.compile` (default and reduce-overhead) and flashc's CUDA target;
  the floor is the bytes a step must read (weights, once; the live KV cache; for MoE only
  the experts the step routes to, expected count at batch > 1) over the copy bandwidth
  measured in the same run.
* prefill of `--prefill` tokens: tokens/s for eager, torch.compile (default) and flashc;
  the ceiling is the model's FLOPs over the bf16 matmul rate measured in the same run.
* compile time: cold (first compile in the process, first calls included) and warm (the
  same compile again: flashc's tuning cache and Triton's cache hit; torch.compile after
  `torch._dynamo.reset()` with Inductor's caches warm).
* peak GPU memory while a variant is built and run (allocator peak, weights included).

Rows are appended to `OUT/decode.jsonl` as they are measured; `OUT/decode.md` is the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import cuda_time, measured_ceilings, rel_err  # noqa: E402


def _weights_read_per_step(model) -> tuple[float, float]:
    """(bytes of dense weights a decode step reads, bytes of all experts' weights)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    dense = experts = 0
    for name, p in model.named_parameters():  # tied weights are listed once
        nbytes = p.numel() * p.element_size()
        if p is embed and embed is not head:
            continue  # an untied embedding table: a step gathers B rows of it
        if ".experts." in name:
            experts += nbytes
        else:
            dense += nbytes
    return float(dense), float(experts)


def _prefill_flops(model, seq: int) -> float:
    """Matmul FLOPs of a causal prefill: 2 per weight per token (routed experts only) + attention."""
    cfg = model.config
    flops = 0.0
    experts = getattr(cfg, "num_local_experts", 0)
    embed = model.get_input_embeddings().weight
    for name, p in model.named_parameters():
        if p.dim() < 2 or (p is embed and embed is not model.get_output_embeddings().weight):
            continue  # norms and biases; a gathered (untied) embedding table
        share = cfg.num_experts_per_tok / experts if ".experts." in name else 1.0
        flops += 2.0 * seq * p.numel() * share
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    flops += 4.0 * cfg.num_attention_heads * head_dim * seq * (seq + 1) / 2 * cfg.num_hidden_layers
    return flops


def _program_read_bytes(cm, expert_fraction: float = 1.0) -> float:
    """Bytes of the compiled program's weights a step reads: every parameter once, but an
    embedding table used only by aten.embedding is gathered (a few rows), not read, and
    stacked expert weights (read by flashc.moe / moe_wq past the router logits) count for
    the fraction of experts a step routes to."""
    from flashc.ir import op_name

    total = 0.0
    for node in cm.program.param_nodes():
        t = cm.program.params[node.name]
        if node.users and all(op_name(u) == "aten.embedding" for u in node.users):
            continue
        experts = node.users and all(op_name(u) in ("flashc.moe", "flashc.moe_wq") and node in u.args[2:]
                                     for u in node.users)
        total += t.numel() * t.element_size() * (expert_fraction if experts else 1.0)
    return total


def _quantized_variants() -> dict:
    """--variants name -> (row label, compile's quantize=)."""
    from flashc.passes.quantize import QuantConfig

    return {"flashc-int4": ("int4-rtn", "int4-rtn"), "flashc-int8": ("int8-weight", "int8-weight"),
            "flashc-int4-head": ("int4-rtn + lm_head", QuantConfig(method="rtn", bits=4, lm_head=True)),
            # weights and activations: int8 / fp8 tensor-core GEMMs (speed: "w8a8" is SmoothQuant's kernel
            # without the calibrated smoothing, which only adds one multiply of the input)
            "flashc-w8a8": ("w8a8", "w8a8"), "flashc-fp8": ("fp8", "fp8")}


def _pruned_variants() -> dict:
    """--variants name -> (row label, compile's prune=): online activation sparsity (TEAL thresholds
    calibrated on flashc's built-in text read as bytes: random weights, so only the speed means anything)."""
    from flashc.passes.prune import PruneConfig

    variants = {f"flashc-online{p}": (f"online-{p}%", PruneConfig(method="online", sparsity=p / 100,
                                                               calibration_tokens=512, min_calibration_tokens=256))
                for p in (40, 50)}
    # 2:4 by magnitude (no calibration: only the speed of the 2:4 matmuls means anything here)
    variants["flashc-2:4"] = ("magnitude-2:4", "magnitude-2:4")
    return variants


def _composed_variants() -> dict:
    """--variants name -> (row label, compile's quantize=, compile's prune=): online activation sparsity on int4
    weights (flashc issue #15: the sparsified linear_wq become sparse_gemv_wq on the codes K-major)."""
    _, online40 = _pruned_variants()["flashc-online40"]
    return {"flashc-int4-online40": ("int4-rtn + online-40%", "int4-rtn", online40)}


def profile_kernels(fn, out: Path, title: str, weight_bytes: float, bw: float, iters: int = 5) -> None:
    """Per-kernel GPU time of fn() (kernel by kernel, no CUDA graph), grouped by kernel name."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time / iters
            count[e.name] += 1
    rows = sorted(total.items(), key=lambda kv: -kv[1])
    all_us = sum(total.values())
    gemm_us = sum(us for name, us in rows if any(k in name.lower() for k in ("gemm", "gemv", "nvjet", "cutlass", "sm90")))
    lines = [f"### {title}", "",
             f"kernel time per call {all_us:.0f} us over {sum(count.values()) // iters} launches; "
             f"matmul kernels {gemm_us:.0f} us against a weight-read floor of {weight_bytes / bw * 1e6:.0f} us", "",
             "| kernel | us per call | launches per call | share |", "| --- | --- | --- | --- |"]
    for name, us in rows[:20]:
        lines.append(f"| `{name[:90]}` | {us:.1f} | {count[name] // iters} | {us / all_us:.1%} |")
    with open(out / "kernels.md", "a") as f:
        f.write("\n".join(lines) + "\n\n")
    print("\n".join(lines), flush=True)


def _active_expert_fraction(cfg, batch: int) -> float:
    """Expected fraction of a layer's experts a step reads (uniform routing at batch > 1)."""
    e = getattr(cfg, "num_local_experts", 0)
    if not e:
        return 0.0
    k = cfg.num_experts_per_tok
    return 1 - (1 - k / e) ** batch


def decode_step_inputs(model, batch: int, context: int, cache_len: int, device: str = "cuda"):
    """(step, inputs, kv_bytes): `model`'s decode step over a static cache of cache_len slots, and its
    inputs for one new token per sequence at position `context`, the first `context` slots holding random
    keys and values; kv_bytes is what the step reads of the cache (the live context and the new token)."""
    from flashc.decode import DecodeStep, decode_example_inputs

    step = DecodeStep(model, cache_len)
    inputs = list(decode_example_inputs(model, batch, cache_len, device=device))
    for t in inputs[2:]:
        t.normal_()  # the first `context` slots hold random keys/values
    inputs[0] = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    inputs[1] = torch.tensor([context], device=device)
    kv_bytes = sum(t.numel() * t.element_size() for t in inputs[2:]) * (context + 1) / cache_len
    return step, inputs, kv_bytes


class Recorder:
    def __init__(self, out: Path, model: str, device: str, bw: float, mm: float) -> None:
        self.path = out / "decode.jsonl"
        self.base = dict(model=model, device=device, copy_bw=bw, matmul=mm)

    def add(self, **row) -> None:
        row = {**self.base, **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['model']:18s} {row['case']:22s} {row['variant']:30s} "
              + (f"{row['ms']:9.3f} ms {row['x_floor']:5.2f}x floor err {row['rel_err']:.1e} "
                 f"compile {row['compile_s']:.1f}/{row.get('warm_s') or 0:.1f} s peak {row['peak_gb']:.1f} GB"
                 if row.get("ms") else f"FAILED {row.get('error', '')[:200]}"), flush=True)


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9


def _measure(rec: Recorder, case: str, name: str, build, ref, floor_ms, tokens: int,
             warm_build=None) -> None:
    """Build a variant (timed: compile), check it against ref, time it, free it."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        t = time.perf_counter()
        fn = build()
        out = fn()
        fn()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t
        if callable(floor_ms):
            floor_ms = floor_ms()
        err = rel_err(out, ref)
        ms = cuda_time(fn)
        peak = _peak_gb()
        warm_s = None
        if warm_build is not None:
            del fn
            t = time.perf_counter()
            fn = warm_build()
            fn()
            torch.cuda.synchronize()
            warm_s = time.perf_counter() - t
        rec.add(case=case, variant=name, ms=ms, floor_ms=floor_ms, x_floor=ms / floor_ms,
                tokens_per_s=tokens / (ms / 1e3), compile_s=compile_s, warm_s=warm_s, peak_gb=peak, rel_err=err)
    except Exception as e:
        traceback.print_exc()
        rec.add(case=case, variant=name, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def run_model(spec: str, batches: list[int], context: int, prefill: int, out: Path, variants: set[str]) -> None:
    import flashc
    from flashc import zoo
    from flashc.profiles import detect

    name, _, layers = spec.partition(":")
    bw, mm = measured_ceilings()
    dev = torch.cuda.get_device_name(0)
    label = name + (f" ({layers} layers)" if layers else "")
    rec = Recorder(out, label, dev, bw, mm)
    print(f"{label}: {dev}, copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)
    model = zoo.build(name, dtype=torch.bfloat16, device="cuda", num_layers=int(layers) if layers else None)
    dense, experts = _weights_read_per_step(model)
    profile = detect()
    cache_len = context + 64
    kept: dict = {}

    for batch in batches:
        step, inputs, kv_bytes = decode_step_inputs(model, batch, context, cache_len)
        weight_bytes = dense + experts * _active_expert_fraction(model.config, batch)
        floor_ms = (weight_bytes + kv_bytes) / bw * 1e3
        case = f"decode b{batch} ctx{context}"
        with torch.no_grad():
            ref = step(*[t.clone() for t in inputs])

        def eager():
            return lambda: step(*inputs)

        def compiled(mode):
            def build():
                torch._dynamo.reset()
                c = torch.compile(step, mode=mode)
                return lambda: c(*inputs)
            return build

        def flashc_step(quantize=None, prune=None):
            def build():
                calibration = None
                if prune is not None:  # random weights: the built-in text read as bytes (the step is no zoo source)
                    from flashc.passes.quantize.calibration import resolve_calibration

                    calibration = resolve_calibration("builtin", None, model.config.vocab_size)
                cm = flashc.compile(step, "h100", tuple(inputs), level=3, profile=profile, quantize=quantize,
                                    prune=prune, calibration=calibration)
                kept["cm"] = cm
                kept["read"] = _program_read_bytes(cm, _active_expert_fraction(model.config, batch) or 1.0)
                return lambda: cm.executable(*inputs)[0]
            return build

        with torch.no_grad():
            if "eager" in variants:
                _measure(rec, case, "eager", eager, ref, floor_ms, batch)
            if "compile" in variants:
                _measure(rec, case, "torch.compile default", compiled(None), ref, floor_ms, batch,
                         warm_build=compiled(None) if batch == batches[0] else None)
            if "reduce-overhead" in variants:
                _measure(rec, case, "torch.compile reduce-overhead", compiled("reduce-overhead"), ref, floor_ms, batch)
            if "flashc" in variants:
                _measure(rec, case, "flashc h100 -O3", flashc_step(), ref, floor_ms, batch,
                         warm_build=flashc_step() if batch == batches[0] else None)
                if "cm" in kept:
                    exe = kept.pop("cm").executable
                    profile_kernels(lambda: exe.run_eager(*inputs), out, f"{label} flashc {case}",
                                    weight_bytes, bw)
                    del exe
            # quantized, and quantized with online sparsity (composed: what sparsity saves depends on the token)
            quantized = {name: (label_q, scheme, None) for name, (label_q, scheme) in _quantized_variants().items()}
            for variant, (label_q, scheme, spec) in {**quantized, **_composed_variants()}.items():
                if variant not in variants:
                    continue
                # the floor of a quantized step: its own packed weights (and scales), plus the KV cache
                def q_floor_ms():  # known once the variant is built
                    return (kept["read"] + kv_bytes) / bw * 1e3

                _measure(rec, case, f"flashc h100 -O3 {label_q}", flashc_step(scheme, spec), ref, q_floor_ms,
                         batch)
                if "cm" in kept:
                    exe = kept.pop("cm").executable
                    profile_kernels(lambda: exe.run_eager(*inputs), out, f"{label} flashc {label_q} {case}",
                                    kept["read"], bw)
                    del exe
                kept.pop("read", None)
            for variant, (label_p, spec) in _pruned_variants().items():
                if variant in variants:  # the floor stays the dense one: what is read depends on the token
                    _measure(rec, case, f"flashc h100 -O3 {label_p}", flashc_step(prune=spec), ref, floor_ms, batch)
                    kept.pop("cm", None)
                    kept.pop("read", None)
        del step, inputs, ref
        torch._dynamo.reset()

    if prefill:
        ids = torch.randint(0, model.config.vocab_size, (1, prefill), device="cuda")
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits
        floor_ms = _prefill_flops(model, prefill) / mm * 1e3
        case = f"prefill {prefill}"

        def forward(fn):
            return lambda: fn(ids, use_cache=False).logits

        def compiled_prefill():
            torch._dynamo.reset()
            return forward(torch.compile(model))

        def flashc_prefill(quantize=None, prune=None):
            def build():
                cm = flashc.compile(model, "h100", (ids,), level=3, profile=profile, quantize=quantize, prune=prune)
                kept["cm"] = cm
                return lambda: cm.executable(ids)[0]
            return build

        with torch.no_grad():
            if "eager" in variants:
                _measure(rec, case, "eager", lambda: forward(model), ref, floor_ms, prefill)
            if "compile" in variants:
                _measure(rec, case, "torch.compile default", compiled_prefill, ref, floor_ms, prefill)
            if "flashc" in variants:
                _measure(rec, case, "flashc h100 -O3", flashc_prefill(), ref, floor_ms, prefill)
                if "cm" in kept:
                    exe = kept.pop("cm").executable
                    profile_kernels(lambda: exe.run_eager(ids), out, f"{label} flashc {case}", dense, bw)
            for variant, (label_q, scheme) in _quantized_variants().items():
                if variant in variants:  # prefill's matmuls: int4/int8 dequantize + cuBLAS, w8a8/fp8 int8/fp8 GEMMs
                    _measure(rec, case, f"flashc h100 -O3 {label_q}", flashc_prefill(scheme), ref, floor_ms, prefill)
                    if "cm" in kept:
                        exe = kept.pop("cm").executable
                        profile_kernels(lambda: exe.run_eager(ids), out, f"{label} flashc {label_q} {case}", dense, bw)
            if "flashc-2:4" in variants:  # 2:4 weights: the sparse tensor cores where they measure faster
                label_p, spec = _pruned_variants()["flashc-2:4"]
                _measure(rec, case, f"flashc h100 -O3 {label_p}", flashc_prefill(prune=spec), ref, floor_ms, prefill)
                kept.pop("cm", None)


def table(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "decode.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    lines = [f"device: {r0['device']}; copy bandwidth {r0['copy_bw'] / 1e12:.2f} TB/s, bf16 matmul "
             f"{r0['matmul'] / 1e12:.0f} TFLOP/s (measured in each model's process); bf16, random weights", "",
             "| model | case | variant | ms | floor ms | x floor | tokens/s | compile cold s | compile warm s "
             "| peak GB | rel. err vs eager |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['model']} | {r['case']} | {r['variant']} | failed: {r.get('error', '')[:120]} "
                         "| | | | | | | |")
            continue
        warm = f"{r['warm_s']:.1f}" if r.get("warm_s") is not None else ""
        lines.append(f"| {r['model']} | {r['case']} | {r['variant']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | "
                     f"{r['x_floor']:.2f} | {r['tokens_per_s']:.0f} | {r['compile_s']:.1f} | {warm} | "
                     f"{r['peak_gb']:.1f} | {r['rel_err']:.1e} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["llama-3.2-1b"])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8], help="decode batches (none: prefill only)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prefill", type=int, default=2048, help="prefill length (0: skip)")
    p.add_argument("--variants", nargs="+", default=["eager", "compile", "reduce-overhead", "flashc"],
                   help="eager, compile, reduce-overhead, flashc, and the quantized flashc-int4 (int4-rtn, "
                        "group 128), flashc-int4-head (the output head too), flashc-int8 (int8-weight), flashc-w8a8 "
                        "(int8 weights and activations), flashc-fp8 (e4m3 weights and activations), flashc-online40 / "
                        "flashc-online50 (online activation sparsity, sparse GEMVs), flashc-int4-online40 (int4-rtn "
                        "with online-40%%: sparse GEMVs on int4 codes, decode only), flashc-2:4 (magnitude 2:4 "
                        "weights: the sparse tensor cores for prefill where they measure faster)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per model")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child process: run this model
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        run_model(args.one, args.batches, args.context, args.prefill, out, set(args.variants))
        return 0
    for spec in args.models:
        cmd = [sys.executable, __file__, "--one", spec, "--batches", *map(str, args.batches),
               "--context", str(args.context), "--prefill", str(args.prefill), "--variants", *args.variants,
               "--out", str(out)]
        try:
            subprocess.run(cmd, timeout=args.timeout, env=os.environ)
        except subprocess.TimeoutExpired:
            print(f"{spec}: timed out after {args.timeout} s", flush=True)
    text = table(out)
    (out / "decode.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

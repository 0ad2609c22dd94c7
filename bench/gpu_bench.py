"""GPU benchmark: flashc's CUDA target against eager PyTorch and torch.compile, one process.

For a zoo model's shapes (bf16, random weights) it times a single-token forward
(no KV cache: flashc has no decode-step capture yet, so this is NOT a decode step) and
a prefill, each against the floors measured in the same run: bytes of weights over
the measured copy bandwidth, and FLOPs over the measured bf16 matmul rate.

    python bench/gpu_bench.py --model llama-3.2-1b --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def cuda_time(fn, warmup=3, iters=20) -> float:
    """Median milliseconds of fn() with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measured_ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read+write, bf16 matmul FLOP/s) on this GPU."""
    n = 1 << 30
    src = torch.randn(n // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), 3, 10)
    bw = 2 * src.numel() * 2 / (ms / 1e3)
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = cuda_time(lambda: a @ b, 3, 10)
    return bw, 2 * 8192 ** 3 / (ms / 1e3)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import flashc
    from flashc import zoo
    from flashc.cost_model import estimate
    from flashc.profiles import detect

    dev = torch.cuda.get_device_name(0)
    bw, mm = measured_ceilings()
    print(f"device {dev}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)
    model = zoo.build(args.model, dtype=torch.bfloat16, device="cuda", num_layers=args.layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for label, seq in (("1-token forward (no KV cache)", 1), (f"prefill {args.prefill}", args.prefill)):
        ids = zoo.example_inputs(args.model, 1, seq)[0].cuda()
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits

        def eager():
            with torch.no_grad():
                return model(ids, use_cache=False).logits

        variants = {"eager": (eager, 0.0)}
        for mode in (["default", "reduce-overhead"] if seq == 1 else ["default"]):
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=None if mode == "default" else mode)

            def run(c=compiled):
                with torch.no_grad():
                    return c(ids, use_cache=False).logits

            t = time.perf_counter()
            run()
            run()
            torch.cuda.synchronize()
            variants[f"torch.compile {mode}"] = (run, time.perf_counter() - t)
        t = time.perf_counter()
        cm = None
        try:
            cm = flashc.compile(model, "h100", ids, level=3, profile=detect())
            cm.executable(ids)
            torch.cuda.synchronize()
            variants["flashc h100 -O3"] = (lambda: cm.executable(ids)[0], time.perf_counter() - t)
            flops = estimate(cm.program, cm.profile).flops
        except Exception:  # keep the baselines' numbers; the log says what broke
            import traceback

            traceback.print_exc()
            flops = 2.0 * seq * weight_bytes / 2
        floor_ms = max(weight_bytes / bw, flops / mm) * 1e3
        for name, (fn, compile_s) in variants.items():
            torch.cuda.reset_peak_memory_stats()
            err = rel_err(fn(), ref)
            ms = cuda_time(fn)
            peak = torch.cuda.max_memory_allocated() / 1e9
            rows.append(dict(case=label, variant=name, ms=ms, floor_ms=floor_ms, x_floor=ms / floor_ms,
                             compile_s=compile_s, peak_gb=peak, rel_err=err,
                             tokens_per_s=seq / (ms / 1e3)))
            print(f"{label:32s} {name:28s} {ms:9.3f} ms  {ms / floor_ms:5.2f}x floor  err {err:.1e}", flush=True)
        del cm
        torch.cuda.empty_cache()
    (out / "gpu_bench.json").write_text(json.dumps(dict(device=dev, copy_bw=bw, matmul=mm, model=args.model,
                                                         weight_bytes=weight_bytes, rows=rows), indent=2))
    lines = [f"device: {dev}; measured copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s; "
             f"model {args.model} (bf16, random weights, {weight_bytes / 1e9:.2f} GB)", "",
             "| case | variant | ms | floor ms | x floor | tokens/s | compile s | peak GB | rel. err vs eager |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['variant']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | {r['x_floor']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['compile_s']:.1f} | {r['peak_gb']:.2f} | {r['rel_err']:.1e} |")
    table = "\n".join(lines)
    (out / "gpu_bench.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

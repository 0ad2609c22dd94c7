"""Decode-step benchmark on the GPU: one token with a static KV cache of `--context` tokens.

    python bench/decode.py --model llama-3.2-1b --batches 1 8 --context 1024 --out $OUT

Variants, in one process: the eager model (`flashc.decode.DecodeStep` around the HF
model: HF's own static-cache path), `torch.compile(mode="reduce-overhead")` of the same
step, and flashc's CUDA target. The floor is the bytes of weights plus the KV cache
read once, over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gpu_bench import cuda_time, measured_ceilings, rel_err  # same folder


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    import flashc
    from flashc import zoo
    from flashc.decode import DecodeStep, decode_example_inputs
    from flashc.profiles import detect

    bw, _ = measured_ceilings()
    dev = torch.cuda.get_device_name(0)
    model = zoo.build(args.model, dtype=torch.bfloat16, device="cuda")
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    rows = []
    cache_len = args.context + 8
    for batch in args.batches:
        step = DecodeStep(model, cache_len)
        inputs = list(decode_example_inputs(model, batch, cache_len, device="cuda"))
        for t in inputs[2:]:
            t.normal_()  # a full cache of random keys/values
        inputs[0] = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
        inputs[1] = torch.tensor([args.context], device="cuda")
        kv_bytes = sum(t.numel() * t.element_size() for t in inputs[2:]) * args.context / cache_len
        floor_ms = (weight_bytes + kv_bytes) / bw * 1e3
        with torch.no_grad():
            ref = step(*[t.clone() for t in inputs])
        variants = {"eager": (lambda: step(*inputs), 0.0)}
        try:
            torch._dynamo.reset()
            t = time.perf_counter()
            compiled = torch.compile(step, mode="reduce-overhead")
            with torch.no_grad():
                compiled(*inputs)
                compiled(*inputs)
            variants["torch.compile reduce-overhead"] = (lambda: compiled(*inputs), time.perf_counter() - t)
        except Exception as e:
            print(f"torch.compile failed: {type(e).__name__}: {str(e)[:300]}")
        try:
            t = time.perf_counter()
            cm = flashc.compile(step, "h100", tuple(inputs), level=3, profile=detect())
            cm.executable(*inputs)
            torch.cuda.synchronize()
            variants["flashc h100 -O3"] = (lambda: cm.executable(*inputs)[0], time.perf_counter() - t)
        except Exception:
            import traceback

            traceback.print_exc()
        for name, (fn, compile_s) in variants.items():
            with torch.no_grad():
                err = rel_err(fn(), ref)
                ms = cuda_time(lambda: fn())
            rows.append(dict(batch=batch, variant=name, ms=ms, floor_ms=floor_ms, x_floor=ms / floor_ms,
                             compile_s=compile_s, rel_err=err))
            print(f"batch {batch} {name:32s} {ms:8.3f} ms  {ms / floor_ms:5.2f}x floor  err {err:.1e}", flush=True)
    lines = [f"device {dev}; copy bandwidth {bw / 1e12:.2f} TB/s; {args.model} bf16 random weights; "
             f"decode step at context {args.context}", "",
             "| batch | variant | ms/step | floor ms | x floor | compile s | rel. err vs eager |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | {r['x_floor']:.2f} | "
              f"{r['compile_s']:.1f} | {r['rel_err']:.1e} |" for r in rows]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode.md").write_text("\n".join(lines) + "\n")
    (Path(args.out) / "decode.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

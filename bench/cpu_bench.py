"""CPU benchmark (2 cores): eager PyTorch, torch.compile, ONNX Runtime on flashc's export,
ONNX Runtime on torch.onnx.export of the unoptimized model, TVM, flashc cpu.

    python bench/cpu_bench.py [--models llama-tiny smollm2-135m] [--seq 128]
    python bench/cpu_bench.py --decode [--cache-len 256 --context 128] [--quantize int4-rtn int8-weight]

Prints one table; every row is timed in this process on the same inputs. --decode times
one decode step (flashc.decode.DecodeStep, batch 1: one token at position --context of a
static KV cache of --cache-len slots) instead of the prefill: the eager step, and the
executable of flashc's cpu and onnx-cpu compiles, called as CompiledModel.generate does.
--variants builds and times only the named prefill rows, e.g. --variants eager "flashc tvm-cpu".
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def wall_time(fn, warmup=2, iters=10) -> float:
    """Median milliseconds of fn()."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


UNOPTIMIZED_ONNX = "torch.onnx.export + ORT (unoptimized)"


def torch_onnx_baseline(model, ids, path: Path):
    """The unoptimized model through torch.onnx.export, run by onnxruntime."""
    import onnxruntime as ort

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids, use_cache=False).logits

    torch.onnx.export(Logits(model), (ids,), str(path), dynamo=True, external_data=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda: torch.from_numpy(sess.run(None, {name: ids.numpy()})[0])


def decode_rows(name: str, cache_len: int, context: int, iters: int, quantize: list[str] = ()) -> list[tuple]:
    """(model, variant, ms per step, compile s, rel. err vs eager) for one decode step of a zoo model."""
    import flashc
    from flashc import zoo
    from flashc.decode import DecodeStep, decode_example_inputs

    model = zoo.build(name)
    step = DecodeStep(model, cache_len)
    example = decode_example_inputs(model, 1, cache_len)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, model.config.vocab_size, (1, 1), generator=g), torch.tensor([context])]
    for cache in example[2:]:
        filled = cache.clone()
        filled[:, :, :context] = torch.randn(filled[:, :, :context].shape, generator=g)  # the context so far
        inputs.append(filled)
    with torch.no_grad():
        ref = step(*[x.clone() for x in inputs])
    caches = {}  # each variant writes its own copy of the cache (the same slot, every call)
    caches["eager DecodeStep"] = [x.clone() for x in inputs]
    variants = {"eager DecodeStep": lambda: step(*caches["eager DecodeStep"])}
    compile_times = {}
    plans = [("flashc cpu", "cpu", {}, None), ("flashc onnx-cpu", "onnx-cpu", {}, None),
             ("flashc onnx-cpu, contrib_ops=False", "onnx-cpu", {"contrib_ops": False}, None)]
    plans += [(f"flashc onnx-cpu --quantize {q}", "onnx-cpu", {}, q) for q in quantize]
    for label, target, options, scheme in plans:
        t = time.perf_counter()
        cm = flashc.compile(step, target, example, level=3, options=options, quantize=scheme)
        compile_times[label] = time.perf_counter() - t
        caches[label] = [x.clone() for x in inputs]
        variants[label] = lambda cm=cm, args=caches[label]: cm.executable(*args)[0]
    rows = []
    for label, fn in variants.items():
        with torch.no_grad():
            err = rel_err(fn(), ref)
        ms = wall_time(fn, warmup=3, iters=iters)
        rows.append((name, label, ms, compile_times.get(label, 0.0), err))
        print(f"{name:14s} {label:40s} {ms:9.3f} ms/step  err {err:.1e}", flush=True)
    return rows


def decode_main(args) -> int:
    torch.set_num_threads(2)
    rows = [r for name in args.models
            for r in decode_rows(name, args.cache_len, args.context, args.iters, args.quantize)]
    print(f"\ndecode step, batch 1, token at position {args.context} of a {args.cache_len}-slot KV cache, fp32, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | variant | ms/step | vs eager | compile s | rel. err vs eager |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, label, ms, cs, err in rows:
        base = next(r[2] for r in rows if r[0] == name and r[1] == "eager DecodeStep")
        print(f"| {name} | {label} | {ms:.3f} | {base / ms:.2f}x | {cs:.1f} | {err:.1e} |")
    return 0


VARIANTS = ("eager", "torch.compile", "flashc cpu", "flashc onnx-cpu", "flashc tvm-cpu", UNOPTIMIZED_ONNX)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["llama-tiny", "smollm2-135m"])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--decode", action="store_true", help="time a decode step instead of the prefill")
    p.add_argument("--cache-len", type=int, default=256)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--quantize", nargs="*", default=[], metavar="SCHEME",
                   help="--decode: also onnx-cpu rows quantized with these schemes (int4-rtn, int8-weight; "
                        "MatMulNBits), whose error vs eager includes the quantization's")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="prefill rows to build and time (default all; eager, the reference, always runs)")
    args = p.parse_args()
    if args.decode:
        return decode_main(args)
    import flashc
    from flashc import zoo

    torch.set_num_threads(2)
    wanted = set(args.variants)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="flashc-bench-"))
    for name in args.models:
        model = zoo.build(name)
        ids = zoo.example_inputs(name, 1, args.seq)[0]
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits
        variants = {"eager": lambda: model(ids, use_cache=False).logits}
        compile_times = {}
        if "torch.compile" in wanted:
            t = time.perf_counter()
            compiled = torch.compile(model)
            with torch.no_grad():
                compiled(ids, use_cache=False)
            variants["torch.compile"] = lambda: compiled(ids, use_cache=False).logits
            compile_times["torch.compile"] = time.perf_counter() - t
        for target in ("cpu", "onnx-cpu", "tvm-cpu"):
            if f"flashc {target}" not in wanted:
                continue
            t = time.perf_counter()
            try:
                cm = flashc.compile(model, target, ids, level=3)
            except flashc.FlashcError as e:
                print(f"{name} flashc {target}: skipped ({e})")
                continue
            compile_times[f"flashc {target}"] = time.perf_counter() - t
            variants[f"flashc {target}"] = (lambda cm=cm: cm(ids).logits)
        try:
            if UNOPTIMIZED_ONNX in wanted:
                t = time.perf_counter()
                variants[UNOPTIMIZED_ONNX] = torch_onnx_baseline(model, ids, tmp / f"{name}.onnx")
                compile_times[UNOPTIMIZED_ONNX] = time.perf_counter() - t
        except Exception as e:  # the baseline exporter failing is a result worth printing, not a crash
            print(f"{name} torch.onnx.export failed: {type(e).__name__}: {str(e)[:200]}")
        for label, fn in variants.items():
            with torch.no_grad():
                err = rel_err(fn(), ref)
            ms = wall_time(fn, iters=args.iters)
            rows.append((name, label, ms, compile_times.get(label, 0.0), err))
            print(f"{name:14s} {label:40s} {ms:9.2f} ms  err {err:.1e}", flush=True)
    print(f"\nprefill of {args.seq} tokens, batch 1, fp32, {torch.get_num_threads()} threads\n")
    print("| model | variant | ms | vs eager | compile s | rel. err vs eager |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, label, ms, cs, err in rows:
        base = next(r[2] for r in rows if r[0] == name and r[1] == "eager")
        print(f"| {name} | {label} | {ms:.2f} | {base / ms:.2f}x | {cs:.1f} | {err:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prefill operators one by one on the GPU: the operator table the lpu simulator composes (issue #17).

    python bench/gpu_op_rates.py [--models llama-3.2-1b llama-3-8b] [--prompts 1024 2048 4096] [--out DIR]
    python bench/gpu_op_rates.py --device cpu --quick     # smoke test on the CPU, tiny shapes

Operator profiling as Vidur does it (arXiv:2405.05187): every operator shape the model runs,
timed alone on the GPU; the simulator adds them up and the end-to-end runs check the sum.
The shapes are the simulator's own: the workload `capture_workload` extracts (zoo model on
the meta device, optimized at -O3), its distinct matmuls (K, N) and attention ops (heads,
KV heads, head size), at M = prompt tokens (batch 1). Each runs as flashc's CUDA target
runs a prefill:

- matmul: `F.linear(x[1, M, K], W[N, K])` in bf16 (cuBLAS through aten);
- attention: flashc's Triton kernel `triton_attention.attention(q, k, v, is_causal=True)`
  after `tune_attention` (tuned here if $FLASHC_CACHE has no result), q and k laid out as
  the rotary kernel leaves them ([1, S, H, D] memory seen as [1, H, S, D]), v a view of the
  merged qkv projection's output.

Timing: the back-to-back calls captured in one CUDA graph (flashc's CUDA target replays its
forward as one graph, prefill included), replays timed by CUDA events after warm-up; the median
over repeats of the time per call. The calls cycle through
enough copies of the operands to exceed twice the L2 cache, so every call reads its
weights from HBM as a prefill layer does; no L2 flush is needed between repeats. The
8192^3 matmul (the rate the simulator's profiles use) is timed the same way, and the copy
bandwidth by a 1 GiB device-to-device copy (read + written). Writes OUT/gpu_op_rates.json
(schema: backends/lpu/data/README.md; commit it as backends/lpu/data/<profile>_operators.json)
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

MODELS = ("llama-3.2-1b", "llama-3-8b")
PROMPTS = (1024, 2048, 4096)
QUICK_MODELS = ("llama-tiny",)
QUICK_PROMPTS = (16, 32)
REFERENCE_MATMUL = 8192  # the square matmul whose rate the simulator's GPU profiles take
TARGET_REPEAT_S = 2e-3  # calls per repeat are chosen so one repeat takes about this long
MAX_COPIES = 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help=f"zoo models (default {' '.join(MODELS)})")
    p.add_argument("--prompts", type=int, nargs="+", default=None,
                   help=f"prompt lengths M (default {' '.join(map(str, PROMPTS))})")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per shape (default 10; quick 3)")
    p.add_argument("--out", default="bench_out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # flashc's Triton kernels run on CPU tensors only under the interpreter, set before triton loads
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on the GPU machine, or --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    models = args.models or (QUICK_MODELS if args.quick else MODELS)
    prompts = args.prompts or (QUICK_PROMPTS if args.quick else PROMPTS)
    repeats = args.repeats or (3 if args.quick else 10)
    # bf16 as the CUDA target runs; the Triton interpreter on the CPU computes in float32
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    timer = Timer(torch, args.device, repeats)
    started = time.perf_counter()

    from flashc.backends.lpu.workload import capture_workload

    matmuls: dict[tuple[int, int], list[str]] = {}
    attention: dict[tuple[int, int, int], list[str]] = {}
    for name in models:
        t = time.perf_counter()
        work = capture_workload(name, level=3)
        for op in work.ops:
            if op.kind == "matmul" and op.op == "aten.linear":
                matmuls.setdefault((op.k, op.n), []).append(name)
            elif op.kind == "attention" and op.op == "flashc.attention":
                attention.setdefault((op.heads, op.kv_heads, op.head_dim), []).append(name)
        print(f"{name}: workload captured in {time.perf_counter() - t:.1f} s", flush=True)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    copy_bw = copy_bandwidth(torch, timer, args.device, quick=args.quick)
    rows, entries = [], {"matmul": [], "attention": []}
    ref = REFERENCE_MATMUL if not args.quick else 256
    ref_s = time_matmul(torch, timer, ref, ref, ref, dtype, args.device)
    ref_rate = 2 * ref ** 3 / ref_s
    entries["matmul"].append(_matmul_entry(ref, ref, ref, ref_s))
    rows.append(("matmul", f"{ref}x{ref}x{ref}", "(reference)", ref_s, ref_rate))
    for (k, n), users in sorted(matmuls.items()):
        for m in prompts:
            if (m, k, n) == (ref, ref, ref):
                continue
            s = time_matmul(torch, timer, m, k, n, dtype, args.device)
            entries["matmul"].append(_matmul_entry(m, k, n, s))
            rows.append(("matmul", f"{m}x{k}x{n}", ", ".join(sorted(set(users))), s, 2 * m * k * n / s))
    for (heads, kv_heads, head_dim), users in sorted(attention.items()):
        for s_len in prompts:
            s = time_attention(torch, timer, heads, kv_heads, head_dim, s_len, dtype, args.device)
            entries["attention"].append({"s": s_len, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                                         "causal": True, "seconds": s})
            pairs = s_len * (s_len + 1) / 2
            rows.append(("attention", f"S={s_len} H={heads}/{kv_heads} D={head_dim}", ", ".join(sorted(set(users))),
                         s, 4 * heads * pairs * head_dim / s))

    import triton  # noqa: F401  (imported by the attention kernel already; its version goes in the table)
    from flashc.profiles import profile_name_for_gpu

    table = {
        "device": device_name,
        "profile": (profile_name_for_gpu(device_name) or "") if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": (f"each op alone, {dtype}, back-to-back calls cycling operand copies past 2x L2, captured in "
                   "a CUDA graph, replays timed by CUDA events, "
                   f"median of {repeats} repeats; matmul F.linear(x[1,M,K], W[N,K]); attention flashc Triton "
                   "prefill kernel after tune_attention; bench/gpu_op_rates.py"),
        "models": list(models), "prompts": list(prompts),
        "copy_bandwidth": copy_bw,
        "matmul": entries["matmul"],
        "attention": entries["attention"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_op_rates.json").write_text(json.dumps(table, indent=1) + "\n")
    print(f"\ndevice {device_name}, torch {torch.__version__}; copy bandwidth {copy_bw / 1e12:.3f} TB/s; "
          f"{ref}^3 matmul {ref_rate / 1e12:.1f} TFLOP/s")
    print("| op | shape | models | ms | TFLOP/s | x the reference matmul rate |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, shape, users, s, rate in rows:
        print(f"| {kind} | {shape} | {users} | {s * 1e3:.4f} | {rate / 1e12:.1f} | {rate / ref_rate:.3f} |")
    print(f"\nwrote {out / 'gpu_op_rates.json'} ({time.perf_counter() - started:.0f} s)")
    return 0


class Timer:
    """Median seconds per call of back-to-back calls (CUDA events on a GPU, the wall clock on the CPU)."""

    def __init__(self, torch, device: str, repeats: int):
        self.torch, self.device, self.repeats = torch, device, repeats

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _elapsed(self, calls) -> float:
        if self.device != "cuda":
            t = time.perf_counter()
            for call in calls:
                call()
            return time.perf_counter() - t
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def per_call(self, calls: list) -> float:
        """`calls` are thunks over distinct operand copies; each repeat runs them in turn.

        On a GPU the calls are captured in one CUDA graph and the graph is replayed, as flashc's
        CUDA target replays its forward (prefill included): the host-side cost of a Python
        launch is not in the time (the 2026-12-05 table timed eager launches: its 60-us
        attention kernel read 129 us a call, launch-bound)."""
        for call in calls:  # warm-up: compile, tuning lookups, cuBLAS heuristics, allocator
            call()
        self._sync()
        first = self._elapsed(calls) / len(calls)
        turns = max(1, min(200, math.ceil(TARGET_REPEAT_S / max(first * len(calls), 1e-9))))
        if self.device != "cuda":
            times = [self._elapsed(calls * turns) / (len(calls) * turns) for _ in range(self.repeats)]
            return statistics.median(times)
        from flashc.codegen.cuda_graphs import capture

        graph = self.torch.cuda.CUDAGraph()
        with capture(graph):
            for call in calls * turns:
                call()
        graph.replay()  # warm-up replay
        self._sync()
        times = [self._elapsed([graph.replay]) / (len(calls) * turns) for _ in range(self.repeats)]
        del graph
        return statistics.median(times)


def _copies(torch, device: str, nbytes: float) -> int:
    """Operand copies whose total passes twice the L2 (one on the CPU: no L2 to spill there)."""
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(MAX_COPIES, math.ceil(2 * l2 / nbytes)))


def time_matmul(torch, timer: Timer, m: int, k: int, n: int, dtype, device: str) -> float:
    import torch.nn.functional as F

    nbytes = (m * k + n * k + m * n) * torch.empty((), dtype=dtype).element_size()
    operands = [(torch.randn(1, m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device))
                for _ in range(_copies(torch, device, nbytes))]
    seconds = timer.per_call([lambda x=x, w=w: F.linear(x, w) for x, w in operands])
    del operands
    return seconds


def time_attention(torch, timer: Timer, heads: int, kv_heads: int, head_dim: int, s: int, dtype, device: str) -> float:
    from flashc.codegen import triton_attention

    def operands():
        q = torch.randn(1, s, heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
        k = torch.randn(1, s, kv_heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
        qkv = torch.randn(1, s, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
        v = qkv[..., (heads + kv_heads) * head_dim:].view(1, s, kv_heads, head_dim).transpose(1, 2)
        return q, k, v

    nbytes = (2 * heads + 3 * kv_heads + heads) * s * head_dim * torch.empty((), dtype=dtype).element_size()
    sets = [operands() for _ in range(_copies(torch, device, nbytes))]
    triton_attention.tune_attention(*sets[0], is_causal=True)
    seconds = timer.per_call([lambda t=t: triton_attention.attention(*t, is_causal=True) for t in sets])
    del sets
    return seconds


def copy_bandwidth(torch, timer: Timer, device: str, quick: bool) -> float:
    """Bytes/s read + written by a large device-to-device copy (1 GiB; 16 MiB when quick)."""
    nbytes = (16 if quick else 1024) * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = timer.per_call([lambda: dst.copy_(src)])
    del src, dst
    return 2 * nbytes / seconds


def _matmul_entry(m: int, k: int, n: int, seconds: float) -> dict:
    return {"m": m, "k": k, "n": n, "seconds": seconds, "tflops": 2 * m * k * n / seconds / 1e12}


if __name__ == "__main__":
    sys.exit(main())

"""A decode step's chain of GEMVs, with and without the L2 prefetch under PDL (codegen/triton_gemv.py).

llama-3.2-1b's four GEMVs a layer (qkv with the norm folded, o with the residual, gate|up with the
norm and SwiGLU, down with the residual) for 16 layers, each layer its own weights (1.95 GB: every
weight comes from memory), captured once in a CUDA graph per variant and replayed; the variants run
the same configs (a decode step's tuned ones on an H100, session 15) and differ only in the
``L2_PREFETCH`` config key: each GEMV sends its weight rows to L2 before it waits on the previous
kernel, and lets the next one launch as soon as it has waited. Prints ms a step, the weight-read
floor at the measured copy bandwidth, and whether both variants computed the same bits.

    python3 bench/gemv_chain.py [--layers 16] [--reps 50] [--out OUT]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

H, Q, F = 2048, 3072, 8192  # hidden, q|k|v rows, intermediate (llama-3.2-1b)
# tuned on an H100 (bench/handwritten_decode.py's tuning log, session 15)
CONFIGS = {
    "qkv": {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
    "o": {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 2, "num_stages": 1},
    "gate_up": {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
    "down": {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 2, "num_stages": 1},
}


def copy_bandwidth() -> float:
    a = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from flashc.codegen import triton_gemv as tg
    from flashc.codegen._triton_common import pdl_enabled

    torch.manual_seed(0)
    dev = torch.device("cuda")
    dt = torch.bfloat16
    layers = [{"qkv": torch.randn(Q, H, dtype=dt, device=dev) / H ** 0.5,
               "o": torch.randn(H, H, dtype=dt, device=dev) / H ** 0.5,
               "gate_up": torch.randn(2 * F, H, dtype=dt, device=dev) / H ** 0.5,
               "down": torch.randn(H, F, dtype=dt, device=dev) / F ** 0.5,
               "norm": 1 + 0.1 * torch.randn(H, dtype=dt, device=dev)} for _ in range(args.layers)]
    x0 = torch.randn(1, H, dtype=dt, device=dev)
    weight_bytes = sum(t.numel() * t.element_size() for layer in layers for t in layer.values())

    def step(x, prefetch: bool):
        def cfg(name):
            return {**CONFIGS[name], **({"L2_PREFETCH": True} if prefetch else {})}
        for layer in layers:
            qkv = tg.gemv(x, layer["qkv"], None, layer["norm"], 1e-5, config=cfg("qkv"), constant_weight=True)
            o = tg.gemv(qkv[:, :H].contiguous(), layer["o"], residual=x, config=cfg("o"), constant_weight=True)
            h = tg.gemv(o, layer["gate_up"], None, layer["norm"], 1e-5, glu="silu", config=cfg("gate_up"),
                        constant_weight=True)
            x = tg.gemv(h, layer["down"], residual=o, config=cfg("down"), constant_weight=True)
        return x

    bw = copy_bandwidth()
    lines = [f"device {torch.cuda.get_device_name()}, PDL {pdl_enabled(dev)}, copy bandwidth {bw / 1e12:.2f} TB/s, "
             f"{args.layers} layers of llama-3.2-1b GEMVs, {weight_bytes / 1e9:.2f} GB of weights, "
             f"floor {weight_bytes / bw * 1e3:.3f} ms", "",
             "| variant | ms a step (median of reps) | min | x floor |", "| --- | --- | --- | --- |"]
    outs = {}
    for name, prefetch in (("plain", False), ("L2_PREFETCH", True), ("plain again", False)):
        static_x = x0.clone()
        step(static_x, prefetch)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(static_x, prefetch)
        times = []
        for _ in range(args.reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            graph.replay()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        outs[name] = out.clone()
        med = statistics.median(times)
        lines.append(f"| {name} | {med:.3f} | {min(times):.3f} | {med / (weight_bytes / bw * 1e3):.2f} |")
    same = all(torch.equal(outs["plain"], o) for o in outs.values())
    lines += ["", f"outputs bit-identical across variants: {same}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gemv_chain.md").write_text(text + "\n")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

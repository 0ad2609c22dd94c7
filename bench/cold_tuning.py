"""How long a first-time user waits for the kernels of a decode step to tune: candidates compiled one after
another against side by side (`FLASHC_COMPILE_WORKERS`), each run in a fresh process with empty caches.

    python bench/cold_tuning.py --out $OUT                        # llama-3.2-1b int4 and bf16 shapes, 0 and 16 workers
    python bench/cold_tuning.py --workers 0 4 16 --kinds int4 --out $OUT

For every matmul of a llama-3.2-1b decode step at batch 1 (qkv with RMSNorm, o_proj with the residual, gate|up with
RMSNorm and SwiGLU, down_proj with the residual, the output head with RMSNorm), the tuner of the bf16 GEMV
(`codegen/triton_gemv`) and of the int4 GEMV (`codegen/triton_gemv_wq`, group 128) runs once with a cold
`$FLASHC_CACHE` and a cold `$TRITON_CACHE_DIR`. The table gives seconds per shape for each worker count and whether
each tuning picked the same config (timing noise can change a winner between close candidates). Writes
OUT/cold_tuning.md and OUT/cold_tuning.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {"hidden": 2048, "qkv": 3072, "mlp": 8192, "vocab": 128256}  # llama-3.2-1b


def child(kind: str) -> None:
    """In a fresh process: tune every shape of `kind`, print one JSON line a shape."""
    import torch

    sys.path.insert(0, str(HERE))
    from gemv_shapes import cases

    from flashc import quantized_ops
    from flashc.codegen import triton_gemv, triton_gemv_wq, tuning

    torch.manual_seed(0)
    dt = torch.bfloat16
    for name, folds, N, K in cases(SHAPES["hidden"], SHAPES["qkv"], SHAPES["mlp"]):
        x = torch.randn(1, 1, K, device="cuda", dtype=dt)
        n_out = N // 2 if folds.get("glu") else N
        kw = {"glu": folds.get("glu"), "eps": 1e-5}
        if folds.get("norm"):
            kw["norm_weight"] = 1 + 0.1 * torch.randn(K, device="cuda", dtype=dt)
        if folds.get("residual"):
            kw["residual"] = torch.randn(1, 1, n_out, device="cuda", dtype=dt)
        torch.cuda.synchronize()
        if kind == "bf16":
            w = torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5
            n_cands = len(tuning.candidates("gemv", tuning.detect_profile(x.device)))
            start = time.perf_counter()
            cfg = triton_gemv.tune_gemv(x, w, **kw)
        else:
            codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda")
            qweight = quantized_ops.pack_codes(codes, 4, 128)
            scales = ((torch.rand(N, K // 128, device="cuda") + 0.5) / (8 * K ** 0.5)).to(dt)
            n_cands = len(tuning.candidates("gemv_wq", tuning.detect_profile(x.device)))
            start = time.perf_counter()
            cfg = triton_gemv_wq.tune_gemv_wq(x, qweight, scales, None, 4, **kw)
        torch.cuda.synchronize()
        print(json.dumps({"shape": name, "N": N, "K": K, "candidates": n_cands,
                          "s": round(time.perf_counter() - start, 2), "config": cfg}), flush=True)


def run_cold(kind: str, workers: int, timeout: float) -> tuple[list[dict], str]:
    with tempfile.TemporaryDirectory() as flashc_cache, tempfile.TemporaryDirectory() as triton_cache:
        env = dict(os.environ, FLASHC_CACHE=flashc_cache, TRITON_CACHE_DIR=triton_cache,
                   FLASHC_COMPILE_WORKERS=str(workers))
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", kind], env=env, capture_output=True,
                                  text=True, timeout=timeout)
            out, err = proc.stdout, proc.stderr[-2000:] if proc.returncode else ""
        except subprocess.TimeoutExpired as e:  # the shapes tuned by then still count
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = f"timed out after {timeout:.0f} s"
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for r in rows:
            r.update(kind=kind, workers=workers)
        wall = time.perf_counter() - start
        return rows, (err + f"\n(process {wall:.1f} s)").strip()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--child", choices=["bf16", "int4"])
    p.add_argument("--kinds", nargs="+", default=["int4", "bf16"], choices=["bf16", "int4"])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 16])
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    if args.child:
        child(args.child)
        return 0
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    results: dict[tuple[str, int], list[dict]] = {}
    with open(out / "cold_tuning.jsonl", "w") as log:
        for kind in args.kinds:
            for workers in args.workers:
                rows, note = run_cold(kind, workers, args.timeout)
                results[kind, workers] = rows
                for r in rows:
                    log.write(json.dumps(r) + "\n")
                print(f"{kind} workers={workers}: {sum(r['s'] for r in rows):.1f} s over {len(rows)} shapes; {note}",
                      flush=True)
    head = ["kind", "matmul", "N x K", "candidates"] + [f"{w} workers s" for w in args.workers] + ["same config"]
    lines = [f"device: {device}; {os.cpu_count()} CPU cores; each column a fresh process with empty caches", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for kind in args.kinds:
        first = results[kind, args.workers[0]]
        for i, r in enumerate(first):
            others = [results[kind, w][i] if i < len(results[kind, w]) else None for w in args.workers]
            times = [f"{o['s']:.1f}" if o else "-" for o in others]
            same = all(o is not None and o["config"] == r["config"] for o in others)
            lines.append(f"| {kind} | {r['shape']} | {r['N']} x {r['K']} | {r['candidates']} | " + " | ".join(times)
                         + f" | {'yes' if same else 'no'} |")
        totals = [f"**{sum(o['s'] for o in results[kind, w]):.1f}**" for w in args.workers]
        lines.append(f"| {kind} | all | | | " + " | ".join(totals) + " | |")
    text = "\n".join(lines) + "\n"
    (out / "cold_tuning.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

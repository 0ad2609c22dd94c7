"""Decode matmuls with sparsified activations: flashc's sparse GEMV against its dense GEMV, per sparsity.

    python bench/sparse_gemv_shapes.py --out $OUT              # GPU: the numbers
    python bench/sparse_gemv_shapes.py --device cpu --out DIR  # a dry run: tiny shapes, no GPU

For the linear layers online pruning sparsifies (TEAL, arXiv:2408.14690: qkv, o_proj,
gate|up, down_proj; the shapes of bench/gemv_shapes.py without the lm_head) of llama-3.2-1b
and llama-3-8b, bf16, batch 1 by default: the dense flashc GEMV (``flashc.gemv``, tuned,
no folds) and ``flashc.sparse_gemv`` at 0/25/40/50/65/80% activation sparsity (random
activations, the 0-d threshold that zeroes that fraction, as the pruning pass calibrates
it). Every sparse candidate config of codegen/triton_sparse_gemv.py and the library path
(sparsify + cuBLAS) is timed; "sparse us" is the fastest, which the tuner would pick for
activations of that sparsity. Timed as in bench/gemv_shapes.py: a CUDA graph of
back-to-back calls cycling through enough weight copies to spill the 50 MB L2. Bytes read
count the weight rows of kept features (kept by any row of the batch), x and y; ideal =
1 / (rows read), the speedup if time were the weight bytes (1 / (1 - sparsity) at batch 1).
rel. err: the fastest kernel config against a float64 reference. Writes
OUT/sparse_gemv_shapes.{md,json}.

``--device cpu`` runs the same loop with tiny shapes, in fp32, and the kernels through
Triton's interpreter (checking configs, launches and errors end to end); its times are
the interpreter's, not a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

SPARSITIES = (0.0, 0.25, 0.40, 0.50, 0.65, 0.80)
TINY = {"tiny": (64, 96, 80)}  # hidden, qkv rows, mlp: the dry run's shapes (odd multiples of the blocks)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--models", nargs="+", default=None, help="default: llama-3.2-1b llama-3-8b (cpu: tiny)")
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # before the kernel modules are imported: @triton.jit reads it then
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("sparse_gemv_shapes: no CUDA device here; run with --device cpu for a dry run")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gemv_shapes import MODELS, cases, graph_time_us  # noqa: E402  (same folder)
    from gpu_bench import measured_ceilings, rel_err  # noqa: E402
    from tqdm.auto import tqdm

    import flashc  # noqa: F401  (registers the ops)
    from flashc.codegen import triton_gemv, triton_sparse_gemv as ts

    device = torch.device(args.device)
    models = TINY if args.device == "cpu" else MODELS
    names = args.models or list(models)
    if args.device == "cpu":
        bw = None

        def time_us(calls):  # wall clock of the interpreter: checks the path, measures nothing
            calls[0]()
            start = time.perf_counter()
            for call in calls:
                call()
            return (time.perf_counter() - start) / len(calls) * 1e6
    else:
        bw, _ = measured_ceilings()
        time_us = graph_time_us
    # the interpreter computes bf16 tl.dot wrongly (tests/codegen say so too): the dry run is fp32
    dt = torch.bfloat16 if args.device == "cuda" else torch.float32
    size = torch.empty((), dtype=dt).element_size()
    work = [(m, M, name, N, K) for m in names for M in args.batches
            for name, _, N, K in cases(*models[m]) if name != "lm_head"]
    rows = []
    bar = tqdm(total=len(work) * len(args.sparsities), desc="sparse gemv shapes")
    for model, M, name, N, K in work:
        w_bytes = N * K * size
        copies = 1 if args.device == "cpu" else max(1, -(-256 * 2**20 // w_bytes))
        ws = [torch.randn(N, K, device=device, dtype=dt) / K ** 0.5 for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        x_dense = torch.randn(M, K, device=device, dtype=dt)
        dense_cfg = triton_gemv.tune_gemv(x_dense, ws[0])
        dense_us = time_us([lambda w=w: triton_gemv.gemv(x_dense, w, config=dense_cfg) for w in ws])
        one_row = "sparse_gemv" if M == 1 else "sparse_gemv_rows"
        configs = [c for c in ts.candidates(one_row, "h100" if args.device == "cuda" else "default")
                   if ts._fits(M)(c)]
        for s in args.sparsities:
            x = torch.randn(M, K, device=device, dtype=dt)
            t = (x.abs().float().flatten().quantile(s) if s > 0 else torch.zeros((), device=device)).to(dt)
            kept = x.abs() > t
            dropped = 1 - kept.float().mean().item()
            rows_read = kept.any(0).float().mean().item()  # weight rows some batch row needs
            times = {}
            for cfg in configs:
                label = "library" if cfg.get("library") else ",".join(f"{k}={v}" for k, v in cfg.items())
                try:
                    times[label] = (time_us([lambda w=w, c=cfg: ts.sparse_gemv(x, t, w, config=c) for w in wts]), cfg)
                except Exception as e:  # a config that does not compile or fit is just not a winner
                    tqdm.write(f"  {model} {name} s={s:.2f} {label}: {type(e).__name__}: {str(e)[:200]}")
            kernels = {k: v for k, v in times.items() if k != "library"}
            best_label, (best_us, best_cfg) = min(kernels.items(), key=lambda kv: kv[1][0])
            library_us = times["library"][0] if "library" in times else float("nan")
            sparse_us = min(best_us, library_us) if library_us == library_us else best_us
            want = ts.reference_sparse_gemv(x.double(), t.double(), wts[0].double())
            err = rel_err(ts.sparse_gemv(x, t, wts[0], config=best_cfg), want)
            bytes_read = rows_read * w_bytes + (M * K + M * N) * size
            row = {"model": model, "M": M, "matmul": name, "N": N, "K": K, "target_sparsity": s,
                   "sparsity": round(dropped, 4), "weight_rows_read": round(rows_read, 4),
                   "dense_us": dense_us, "dense_config": dense_cfg, "sparse_us": sparse_us,
                   "kernel_us": best_us, "kernel_config": best_cfg, "library_us": library_us,
                   "speedup": dense_us / sparse_us, "ideal": 1 / rows_read if rows_read else float("inf"),
                   "bytes_read": int(bytes_read), "rel_err": err,
                   "floor_us": bytes_read / bw * 1e6 if bw else None,
                   "all_us": {k: v[0] for k, v in times.items()}}
            rows.append(row)
            tqdm.write(markdown_row(row))
            bar.update(1)
        del ws, wts
        if args.device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU, Triton interpreter (not a speed)"
    head = f"device: {where}" + (f"; copy bandwidth {bw / 1e12:.2f} TB/s" if bw else "")
    (out / "sparse_gemv_shapes.md").write_text(head + "\n\n" + "\n".join([*HEADER, *map(markdown_row, rows)]) + "\n")
    (out / "sparse_gemv_shapes.json").write_text(json.dumps({"device": where, "copy_bandwidth": bw, "rows": rows},
                                                            indent=1, default=str))
    print(head)
    print("\n".join([*HEADER, *map(markdown_row, rows)]))
    return 0


HEADER = ["| model | M | matmul | N x K | sparsity | rows read | dense us | sparse us | speedup | ideal "
          "| kernel us | library us | MB read | rel. err | sparse config |", "| --- " * 15 + "|"]


def markdown_row(r: dict) -> str:
    cfg = ("library" if r["library_us"] == r["sparse_us"]
           else ",".join(f"{k}={v}" for k, v in r["kernel_config"].items()))
    return (f"| {r['model']} | {r['M']} | {r['matmul']} | {r['N']} x {r['K']} | {r['sparsity']:.1%} "
            f"| {r['weight_rows_read']:.1%} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | {r['speedup']:.2f} "
            f"| {r['ideal']:.2f} | {r['kernel_us']:.1f} | {r['library_us']:.1f} | {r['bytes_read'] / 1e6:.2f} "
            f"| {r['rel_err']:.1e} | {cfg} |")


if __name__ == "__main__":
    raise SystemExit(main())

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

The int4 rows (``--int4-models``, llama-3-8b by default) do the same for weight-only int4 (asymmetric, group
128, as int4-rtn writes it): the dense int4 GEMV (``flashc.gemv_wq`` on linear_wq's layout, tuned, no folds)
against ``flashc.sparse_gemv_wq`` on the same codes K-major (codegen/triton_sparse_gemv_wq.py: every candidate
and its library path), at the same sparsities; bytes read count the kept features' rows of codes plus every
group's scales and zero points. Their table is the second of the .md; their JSON rows have "weights": "int4".

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
    p.add_argument("--models", nargs="*", default=None,
                   help="models of the bf16 rows; default: llama-3.2-1b llama-3-8b (cpu: tiny); none: no bf16 rows")
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--int4-models", nargs="*", default=None,
                   help="models of the int4 rows; default: llama-3-8b (cpu: tiny); none: no int4 rows")
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
    names = args.models if args.models is not None else list(models)
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
            rows.append({"weights": "bf16", **row})
            tqdm.write(markdown_row(row))
            bar.update(1)
        del ws, wts
        if args.device == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    int4_names = args.int4_models if args.int4_models is not None else (["tiny"] if args.device == "cpu"
                                                                        else ["llama-3-8b"])
    int4 = int4_rows([(m, M, name, N, K) for m in int4_names for M in args.batches
                      for name, _, N, K in cases(*models[m]) if name != "lm_head"],
                     args.sparsities, device, dt, time_us, bw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU, Triton interpreter (not a speed)"
    head = f"device: {where}" + (f"; copy bandwidth {bw / 1e12:.2f} TB/s" if bw else "")
    text = "\n".join([head, "", *(HEADER + [markdown_row(r) for r in rows] + [""] if rows else []),
                      *(INT4_HEADER + [markdown_row(r) for r in int4] if int4 else [])])
    (out / "sparse_gemv_shapes.md").write_text(text + "\n")
    (out / "sparse_gemv_shapes.json").write_text(json.dumps({"device": where, "copy_bandwidth": bw,
                                                             "rows": rows + int4}, indent=1, default=str))
    print(text)
    return 0


INT4_GROUP = {"cuda": 128, "cpu": 16}  # int4-rtn's group; the dry run's tiny K (64, 80) takes 16


def int4_rows(work, sparsities, device, dt, time_us, bw) -> list[dict]:
    """The int4 rows: for each (model, M, matmul, N, K) of work and each sparsity, the dense int4 GEMV (gemv_wq,
    tuned) against sparse_gemv_wq's candidates and library path on the same codes K-major."""
    from tqdm.auto import tqdm

    from flashc.codegen import triton_gemv_wq, triton_sparse_gemv_wq as sw
    from flashc.quantized_ops import pack_codes, pack_zero_points
    from flashc.sparse_ops import to_kmajor

    from gpu_bench import rel_err  # (same folder: main put it on the path)

    group = INT4_GROUP[device.type]
    rows = []
    bar = tqdm(total=len(work) * len(sparsities), desc="sparse int4 gemv shapes")
    for model, M, name, N, K in work:
        packed_bytes = N * K // 2 + (K // group) * N * (torch.empty((), dtype=dt).element_size() + 0.5)
        copies = 1 if device.type == "cpu" else max(1, -(-256 * 2**20 // int(packed_bytes)))
        packed = []
        for _ in range(copies):  # int4-rtn's layout: asymmetric, a scale and a zero point a group
            codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
            zp = pack_zero_points(torch.randint(0, 16, (N, K // group), dtype=torch.uint8), 4)
            scales = (torch.rand(N, K // group) + 0.5) / (8 * K ** 0.5)
            packed.append(tuple(t.to(device) for t in (pack_codes(codes, 4, group), scales.to(dt), zp)))
        kmajor = [to_kmajor(*w, 4) for w in packed]
        x_dense = torch.randn(M, K, device=device, dtype=dt)
        dense_cfg = triton_gemv_wq.tune_gemv_wq(x_dense, *packed[0], 4)
        dense_us = time_us([lambda w=w: triton_gemv_wq.gemv_wq(x_dense, *w, 4, config=dense_cfg) for w in packed])
        name_k = "sparse_gemv_wq" if M == 1 else "sparse_gemv_wq_rows"
        configs = [c for c in sw.candidates(name_k, "h100" if device.type == "cuda" else "default")
                   if sw._worth_timing(M)(c)]
        for s in sparsities:
            x = torch.randn(M, K, device=device, dtype=dt)
            t = (x.abs().float().flatten().quantile(s) if s > 0 else torch.zeros((), device=device)).to(dt)
            kept = x.abs() > t
            rows_read = kept.any(0).float().mean().item()
            times = {}
            for cfg in configs:
                label = "library" if cfg.get("library") else ",".join(f"{k}={v}" for k, v in cfg.items())
                try:
                    times[label] = (time_us([lambda w=w, c=cfg: sw.sparse_gemv_wq(x, t, *w, 4, config=c)
                                             for w in kmajor]), cfg)
                except Exception as e:  # a config that does not compile or fit is just not a winner
                    tqdm.write(f"  int4 {model} {name} s={s:.2f} {label}: {type(e).__name__}: {str(e)[:200]}")
            kernels = {k: v for k, v in times.items() if k != "library"}
            best_label, (best_us, best_cfg) = min(kernels.items(), key=lambda kv: kv[1][0])
            library_us = times["library"][0] if "library" in times else float("nan")
            qt, st, zt = kmajor[0]
            want = sw.reference_sparse_gemv_wq(x.double(), t.double(), qt, st.double(), zt, 4)
            err = rel_err(sw.sparse_gemv_wq(x, t, *kmajor[0], 4, config=best_cfg), want)
            size = torch.empty((), dtype=dt).element_size()
            bytes_read = rows_read * N * K / 2 + (packed_bytes - N * K / 2) + (M * K + M * N) * size
            row = {"weights": "int4", "group": group, "model": model, "M": M, "matmul": name, "N": N, "K": K,
                   "target_sparsity": s, "sparsity": round(1 - kept.float().mean().item(), 4),
                   "weight_rows_read": round(rows_read, 4), "dense_us": dense_us, "dense_config": dense_cfg,
                   "sparse_us": min(best_us, library_us) if library_us == library_us else best_us,
                   "kernel_us": best_us, "kernel_config": best_cfg, "library_us": library_us,
                   "ideal": 1 / rows_read if rows_read else float("inf"), "bytes_read": int(bytes_read),
                   "rel_err": err, "floor_us": bytes_read / bw * 1e6 if bw else None,
                   "all_us": {k: v[0] for k, v in times.items()}}
            row["speedup"] = dense_us / row["sparse_us"]
            rows.append(row)
            tqdm.write(markdown_row(row))
            bar.update(1)
        del packed, kmajor
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return rows


HEADER = ["| model | M | matmul | N x K | sparsity | rows read | dense us | sparse us | speedup | ideal "
          "| kernel us | library us | MB read | rel. err | sparse config |", "| --- " * 15 + "|"]


INT4_HEADER = ["int4 weights (asymmetric, int4-rtn's group 128; the dry run's 16): dense = flashc.gemv_wq, "
               "sparse = flashc.sparse_gemv_wq", "",
               "| model | M | matmul | N x K | sparsity | rows read | dense int4 us | sparse int4 us | speedup | ideal "
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

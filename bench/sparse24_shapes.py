"""2:4-pruned prefill matmuls: dense cuBLAS against the sparse tensor cores (CUTLASS, cuSPARSELt).

    python bench/sparse24_shapes.py --out $OUT            # GPU (sm80+): the numbers
    python bench/sparse24_shapes.py --rows 512 2048       # other prompt lengths

For llama-3-8b's prefill linears (hidden 4096, GQA 32:8 -> merged qkv 6144 x 4096, o_proj
4096 x 4096, merged gate|up 28672 x 4096, down_proj 4096 x 14336), bf16, M = 2048 and 4096
prompt tokens by default, each weight pruned to 2:4 (the 2 largest of every 4 inputs): the
dense ``F.linear`` (cuBLAS), and ``flashc.linear_24``'s launcher (codegen/semi_structured.py)
forced to each sparse library PyTorch has here: CUTLASS's 2:4 GEMM, and cuSPARSELt when
``torch.backends.cusparselt.is_available()``. Each is timed with CUDA events around single
calls (median of --iters after --warmup; the launcher's Python dispatch is included, as it
runs outside a CUDA graph), in microseconds; "speedup" is dense / sparse; "rel. err" is the
sparse result against the dense one (relative Frobenius norm: the sums' order only, ~1e-3 in
bf16). "tuned" is what ``tune_linear_24`` picks for the shape (timed from a CUDA graph, with
its own cache in a temporary folder). Issue #15's target: 2:4 at least 1.3x faster than
dense. Writes OUT/sparse24_shapes.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import cuda_time  # noqa: E402  (same folder)

HIDDEN, QKV, MLP = 4096, 6144, 14336  # llama-3-8b
SHAPES = [("qkv", QKV, HIDDEN), ("o_proj", HIDDEN, HIDDEN), ("gate|up", 2 * MLP, HIDDEN), ("down_proj", HIDDEN, MLP)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    p.add_argument("--rows", type=int, nargs="+", default=[2048, 4096], help="prompt tokens M (default 2048 4096)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--no-tune", action="store_true", help="skip the tuner's column")
    return p.parse_args(argv)


def event_us(fn, warmup: int, iters: int) -> float:
    """Median microseconds of fn() between two CUDA events (bench/gpu_bench.py's timer)."""
    return cuda_time(fn, warmup, iters) * 1e3


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """w with the 2 largest-magnitude of every 4 consecutive inputs of a row kept."""
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).reshape(w.shape)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sparse24_shapes: no CUDA device here; the 2:4 GEMMs need an sm80+ NVIDIA GPU")
    os.environ["FLASHC_CACHE"] = tempfile.mkdtemp(prefix="flashc-s24-")  # the tuner's column: a fresh cache
    from tqdm.auto import tqdm

    import flashc  # noqa: F401  (registers the ops)
    from flashc.codegen import semi_structured as s24
    from flashc.codegen import tuning

    tuning.clear_memory_cache()
    device = torch.device("cuda")
    dt = torch.bfloat16
    impls_here = s24.sparse_impls(device, QKV, HIDDEN, dt)
    rows = []
    bar = tqdm(total=len(SHAPES) * len(args.rows), desc="2:4 prefill shapes")
    for name, N, K in SHAPES:
        g = torch.Generator(device=device).manual_seed(0)
        w = prune_2_4(torch.randn(N, K, device=device, generator=g) / K ** 0.5).to(dt)
        for M in args.rows:
            x = torch.randn(M, K, device=device, dtype=dt, generator=g)
            want = F.linear(x, w)
            row = {"M": M, "matmul": name, "N": N, "K": K,
                   "dense_us": event_us(lambda: F.linear(x, w), args.warmup, args.iters)}
            for impl in ("cutlass", "cusparselt"):
                row[f"{impl}_us"] = row[f"{impl}_err"] = None
                if impl not in s24.sparse_impls(device, N, K, dt):
                    continue
                try:
                    got = s24.linear_24(x, w, None, impl=impl)
                    if not s24._PACKED[s24._key(w, impl)].used:
                        raise RuntimeError("the launcher fell back to the dense GEMM (see its warning)")
                    row[f"{impl}_err"] = s24.relative_difference(got, want)
                    row[f"{impl}_us"] = event_us(lambda: s24.linear_24(x, w, None, impl=impl), args.warmup,
                                                 args.iters)
                except Exception as e:  # a library that cannot run here is reported, not fatal
                    tqdm.write(f"  {name} M={M} {impl}: {type(e).__name__}: {str(e)[:300]}")
            sparse = [row[f"{i}_us"] for i in ("cutlass", "cusparselt") if row[f"{i}_us"] is not None]
            row["best_speedup"] = row["dense_us"] / min(sparse) if sparse else None
            row["tflops_dense"] = 2 * M * N * K / (row["dense_us"] * 1e-6) / 1e12
            row["tuned"] = None if args.no_tune else s24.tune_linear_24(x, w, None)["impl"]
            rows.append(row)
            tqdm.write(markdown_row(row))
            bar.update(1)
        s24._PACKED.clear()  # this weight's packings: the next shape's weight replaces it
        torch.cuda.empty_cache()
    bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(0)
    head = (f"device: {where}; torch {torch.__version__}; sparse libraries here: {', '.join(impls_here) or 'none'}; "
            f"bf16, median of {args.iters} calls")
    table = "\n".join([*HEADER, *map(markdown_row, rows)])
    (out / "sparse24_shapes.md").write_text(head + "\n\n" + table + "\n")
    (out / "sparse24_shapes.json").write_text(json.dumps({"device": where, "torch": torch.__version__,
                                                          "rows": rows}, indent=1, default=str))
    print(head)
    print(table)
    return 0


HEADER = ["| M | matmul | N x K | dense us | dense TFLOP/s | cutlass us | speedup | rel. err "
          "| cusparselt us | speedup | rel. err | tuned |", "| --- " * 12 + "|"]


def markdown_row(r: dict) -> str:
    def us(v):
        return "-" if v is None else f"{v:.1f}"

    def cols(impl):
        t, e = r[f"{impl}_us"], r[f"{impl}_err"]
        speedup = "-" if t is None else f"{r['dense_us'] / t:.2f}"
        return f"{us(t)} | {speedup} | {'-' if e is None else f'{e:.1e}'}"

    return (f"| {r['M']} | {r['matmul']} | {r['N']} x {r['K']} | {r['dense_us']:.1f} | {r['tflops_dense']:.0f} "
            f"| {cols('cutlass')} | {cols('cusparselt')} | {r['tuned'] or '-'} |")


if __name__ == "__main__":
    raise SystemExit(main())

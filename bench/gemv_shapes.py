"""Decode matmuls one by one: flashc's fused GEMV against the unfused library ops, and the floor.

    python bench/gemv_shapes.py --out $OUT

For the matmuls of a decode step of llama-3.2-1b and llama-3-8b (bf16, batch 1 and 8),
with what the CUDA backend folds into each (RMSNorm before qkv / gate|up / lm_head,
SwiGLU after gate|up, the residual add after o_proj / down_proj): the unfused ops
(Triton norm kernel, cuBLAS through torch, activation kernel, add) and the tuned fused
kernel, each timed as a CUDA graph of back-to-back calls that cycle through enough
weight copies to spill the 50 MB L2, as a decode step does. Floor = bytes read and
written over the copy bandwidth measured in the same run. Writes OUT/gemv_shapes.md.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import measured_ceilings, rel_err  # noqa: E402  (same folder)

from flashc.codegen import triton_gemv, tuning  # noqa: E402

MODELS = {"llama-3.2-1b": (2048, 3072, 8192), "llama-3-8b": (4096, 6144, 14336)}  # hidden, qkv rows, mlp
VOCAB = 128256


def cases(hidden: int, qkv: int, mlp: int):
    yield "qkv", dict(norm=True), qkv, hidden
    yield "o_proj", dict(residual=True), hidden, hidden
    yield "gate|up", dict(norm=True, glu="silu"), 2 * mlp, hidden
    yield "down_proj", dict(residual=True), hidden, mlp
    yield "lm_head", dict(norm=True), VOCAB, hidden


def graph_time_us(calls) -> float:
    """Microseconds per call of a CUDA graph replaying ``calls`` (a list of thunks) in turn."""
    turn = itertools.cycle(calls)
    return tuning.cuda_graph_bench(lambda: next(turn)(), calls=max(24, len(calls))) * 1e3


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench_out")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    bw, _ = measured_ceilings()
    rows = ["| model | M | matmul | folds | N x K | floor us | library us | flashc us | flashc x floor "
            "| library x floor | config | rel. err |", "| --- " * 12 + "|"]
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    for model in args.models:
        hidden, qkv, mlp = MODELS[model]
        for M in args.batches:
            for name, folds, N, K in cases(hidden, qkv, mlp):
                dt = torch.bfloat16
                w_bytes = N * K * 2
                copies = max(1, -(-256 * 2**20 // w_bytes))
                ws = [torch.randn(N, K, device="cuda", dtype=dt) / K ** 0.5 for _ in range(copies)]
                x = torch.randn(M, 1, K, device="cuda", dtype=dt)
                n_out = N // 2 if folds.get("glu") else N
                kw = {"glu": folds.get("glu"), "eps": 1e-5}
                if folds.get("norm"):
                    kw["norm_weight"] = 1 + 0.1 * torch.randn(K, device="cuda", dtype=dt)
                if folds.get("residual"):
                    kw["residual"] = torch.randn(M, 1, n_out, device="cuda", dtype=dt)
                cfg = triton_gemv.tune_gemv(x, ws[0], **kw)
                best = [c for c in triton_gemv.tuning.candidates("gemv" if M == 1 else "gemv_rows", "h100")
                        if not c.get("library")]
                kernel_cfg = cfg if not cfg.get("library") else best[0]
                lib = graph_time_us([lambda w=w: triton_gemv.gemv(x, w, **kw, config={"library": True}) for w in ws])
                fused = graph_time_us([lambda w=w: triton_gemv.gemv(x, w, **kw, config=kernel_cfg) for w in ws])
                err = rel_err(triton_gemv.gemv(x, ws[0], **kw, config=kernel_cfg),
                              triton_gemv.reference_gemv(*(t.double() for t in (x, ws[0])),
                                                         **{k: (v.double() if torch.is_tensor(v) else v)
                                                            for k, v in kw.items()}))
                floor = (w_bytes + M * K * 2 + M * n_out * 2 * (2 if folds.get("residual") else 1)) / bw * 1e6
                folded = "+".join(k for k in ("norm", "glu", "residual") if folds.get(k)) or "-"
                shown = ("tuned: library; kernel " if cfg.get("library") else "tuned: ") + ",".join(
                    f"{k}={v}" for k, v in kernel_cfg.items())
                rows.append(f"| {model} | {M} | {name} | {folded} | {N} x {K} | {floor:.1f} | {lib:.1f} | "
                            f"{fused:.1f} | {fused / floor:.2f} | {lib / floor:.2f} | {shown} | {err:.1e} |")
                print(rows[-1], flush=True)
                del ws
                torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gemv_shapes.md").write_text(f"copy bandwidth {bw / 1e12:.2f} TB/s\n\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

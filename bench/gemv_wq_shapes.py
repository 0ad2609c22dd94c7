"""Decode matmuls with packed int4/int8 weights: flashc's gemv_wq against the bf16 GEMV, the library path and the floor.

    python bench/gemv_wq_shapes.py --out $OUT            # ~3 minutes on an H200 with a cold tuning cache
    python bench/gemv_wq_shapes.py --quick --out $OUT    # batch 1, int4 symmetric only

For the matmuls of a decode step of llama-3.2-1b and llama-3-8b (what the CUDA backend folds
into each: RMSNorm before qkv / gate|up / lm_head, SwiGLU after gate|up, the residual add after
o_proj / down_proj), with weights quantized to int4 (group 128, symmetric and with zero points)
and int8 (group 128, symmetric), batch 1 and 8:

* bf16 us: flashc's tuned bf16 GEMV (codegen/triton_gemv) on the dequantized weight;
* kernel us: codegen/triton_gemv_wq, tuned (the fastest kernel config when the tuner picked the
  library path: the config column says so);
* library us: dequantize_weight (Triton) + the unfused ops with cuBLAS;

each timed as a CUDA graph of back-to-back calls cycling through enough copies of the weights
to spill the 50 MB L2, as a decode step does. Floor = packed bytes + scales + zero points +
activations in and out over the copy bandwidth measured in the same run. rel. err: the kernel's
output against a float64 reference on the dequantized weight. Writes OUT/gemv_wq.md.
Cases still waiting when --budget-s has passed are listed as skipped, not run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_shapes import MODELS, cases, graph_time_us  # noqa: E402  (the bf16 benchmark's shapes and timing)
from gpu_bench import measured_ceilings, rel_err  # noqa: E402  (same folder)

from flashc import quantized_ops  # noqa: E402
from flashc.codegen import triton_gemv, triton_gemv_wq, tuning  # noqa: E402

QUANTS = {"int4": (4, False), "int4-asym": (4, True), "int8": (8, False)}  # name -> (bits, zero points)
GROUP = 128
SPILL_BYTES = 256 * 2**20  # weight copies cycled per timing: five times the H200's 50 MB L2


def random_packed(N: int, K: int, bits: int, asym: bool):
    """Random codes, scales ~ 2 / (sqrt(K) 2**bits) in bf16, and zero points when asym, on the GPU."""
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, device="cuda")
    qweight = quantized_ops.pack_codes(codes, bits, GROUP)
    del codes
    scales = ((torch.rand(N, K // GROUP, device="cuda") + 0.5) * 2 / (K ** 0.5 * (1 << bits))).to(torch.bfloat16)
    zp = None
    if asym:
        zp = quantized_ops.pack_zero_points(
            torch.randint(0, 1 << bits, (N, K // GROUP), dtype=torch.uint8, device="cuda"), bits)
    return qweight, scales, zp


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def fastest_kernel_config(M, run) -> dict:
    """The fastest non-library candidate (for the table when the tuner picked the library path)."""
    name = "gemv_wq" if M == 1 else "gemv_wq_rows"
    cands = [c for c in tuning.candidates(name, tuning.detect_profile("cuda"))
             if not c.get("library") and triton_gemv_wq._worth_timing(M)(c)]
    timed = []
    for cfg in cands:
        try:
            timed.append((graph_time_us([lambda cfg=cfg: run(cfg)]), cfg))
        except Exception:  # a config that does not compile or fit is no winner
            continue
    return min(timed, key=lambda t: t[0])[1]


def run_case(model, M, quant, name, folds, N, K, bw) -> str:
    bits, asym = QUANTS[quant]
    dt = torch.bfloat16
    packed_bytes = N * K * bits // 8
    copies = max(1, -(-SPILL_BYTES // packed_bytes))
    weights = [random_packed(N, K, bits, asym)]
    weights += [tuple(None if t is None else t.clone() for t in weights[0]) for _ in range(copies - 1)]
    qweight, scales, zp = weights[0]
    x = torch.randn(M, 1, K, device="cuda", dtype=dt)
    n_out = N // 2 if folds.get("glu") else N
    kw = {"glu": folds.get("glu"), "eps": 1e-5}
    if folds.get("norm"):
        kw["norm_weight"] = 1 + 0.1 * torch.randn(K, device="cuda", dtype=dt)
    if folds.get("residual"):
        kw["residual"] = torch.randn(M, 1, n_out, device="cuda", dtype=dt)

    def kernel(cfg, w=weights[0]):
        return triton_gemv_wq.gemv_wq(x, *w[:2], w[2], bits, **kw, config=cfg)

    tuned = triton_gemv_wq.tune_gemv_wq(x, qweight, scales, zp, bits, **kw)
    kernel_cfg = tuned if not tuned.get("library") else fastest_kernel_config(M, kernel)
    fused = graph_time_us([lambda w=w: kernel(kernel_cfg, w) for w in weights])
    library = graph_time_us([lambda w=w: kernel(triton_gemv_wq.LIBRARY, w) for w in weights])
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref = triton_gemv_wq.reference_gemv_wq(x.double(), qweight, scales.double(), zp, bits, **kw64)
    err = rel_err(kernel(kernel_cfg), ref)
    del ref

    # the bf16 GEMV on the same (dequantized) weights, its own copies past L2
    dense = triton_gemv_wq.dequantize_weight(qweight, scales, zp, bits, dt)
    del weights
    dense_copies = [dense] + [dense.clone() for _ in range(max(1, -(-SPILL_BYTES // nbytes(dense))) - 1)]
    bf16_cfg = triton_gemv.tune_gemv(x, dense, **kw)
    bf16 = graph_time_us([lambda w=w: triton_gemv.gemv(x, w, **kw, config=bf16_cfg) for w in dense_copies])
    del dense_copies, dense

    moved = packed_bytes + nbytes(scales, zp, x) + M * n_out * 2 * (2 if folds.get("residual") else 1)
    floor = moved / bw * 1e6
    folded = "+".join(k for k in ("norm", "glu", "residual") if folds.get(k)) or "-"
    shown = ("tuned: library; kernel " if tuned.get("library") else "tuned: ") + ",".join(
        f"{k}={v}" for k, v in kernel_cfg.items())
    torch.cuda.empty_cache()
    return (f"| {model} | {M} | {name} | {quant} | {folded} | {N} x {K} | {floor:.1f} | {bf16:.1f} | {fused:.1f} | "
            f"{library:.1f} | {fused / floor:.2f} | {bf16 / fused:.2f} | {err:.1e} | {shown} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--quants", nargs="+", default=list(QUANTS), choices=list(QUANTS))
    p.add_argument("--quick", action="store_true", help="batch 1, int4 symmetric only")
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="start no new case after this many seconds (the rest are listed as skipped)")
    args = p.parse_args()
    if args.quick:
        args.batches, args.quants = [1], ["int4"]
    start = time.perf_counter()
    bw, _ = measured_ceilings()
    head = (f"device {torch.cuda.get_device_name(0)}, copy bandwidth {bw / 1e12:.2f} TB/s, "
            f"group size {GROUP}, tuning profile {tuning.detect_profile('cuda')}")
    print(head, flush=True)
    rows = ["| model | M | matmul | quant | folds | N x K | floor us | bf16 gemv us | kernel us | library us "
            "| kernel x floor | speedup vs bf16 | rel. err | config |", "| --- " * 14 + "|"]
    skipped = []
    for M in args.batches:  # every batch-1 case first: the budget cuts batch 8 before them
        for model in args.models:
            for quant in args.quants:
                for name, folds, N, K in cases(*MODELS[model]):
                    if time.perf_counter() - start > args.budget_s:
                        skipped.append(f"{model} M={M} {name} {quant}")
                        continue
                    rows.append(run_case(model, M, quant, name, folds, N, K, bw))
                    print(rows[-1], flush=True)
    took = time.perf_counter() - start
    tail = f"\n{took:.0f} s in all" + (f"; skipped after --budget-s {args.budget_s:.0f}: " + ", ".join(skipped)
                                        if skipped else "")
    print(tail, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gemv_wq.md").write_text(head + "\n\n" + "\n".join(rows) + "\n" + tail + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

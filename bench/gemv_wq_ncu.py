"""One int4 decode GEMV under Nsight Compute: what limits it (memory, issue slots, stalls).

    ncu --section SpeedOfLight --section WarpStateStats ... python bench/gemv_wq_ncu.py \
        --shape 28672x4096 --folds norm+glu --config '{"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4}'

Runs the kernel (random int4 codes, group 128, bf16) a few times with the given config; ncu
profiles the last launch (``--launch-skip``). `bench/gemv_wq_shapes.py` times the same shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_wq_shapes import random_packed  # noqa: E402  (same folder)

from flashc.codegen import triton_gemv_wq  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="28672x4096", help="N x K of the packed weight (N: gate|up rows with glu)")
    ap.add_argument("--folds", default="norm+glu", choices=["none", "norm", "norm+glu", "residual"])
    ap.add_argument("--config", required=True, help="the kernel config as JSON")
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args()
    N, K = (int(v) for v in args.shape.split("x"))
    qweight, scales, _ = random_packed(N, K, 4, False)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    kw = {}
    if "norm" in args.folds:
        kw["norm_weight"] = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5
    if "glu" in args.folds:
        kw["glu"] = "silu"
    if args.folds == "residual":
        kw["residual"] = torch.randn(1, N, device="cuda", dtype=torch.bfloat16)
    config = json.loads(args.config)
    for _ in range(args.calls):
        y = triton_gemv_wq.gemv_wq(x, qweight, scales, None, 4, config=config, **kw)
    torch.cuda.synchronize()
    print(f"{args.shape} {args.folds} {config}: output {tuple(y.shape)}, finite {bool(torch.isfinite(y).all())}")


if __name__ == "__main__":
    main()

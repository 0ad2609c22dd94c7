"""Benchmark flashc's Triton kernels against PyTorch eager on LLM-sized shapes (needs CUDA).

    python -m flashc.codegen.bench_kernels            # default configs
    python -m flashc.codegen.bench_kernels --tune     # autotune first (fills the tuning cache)
    python -m flashc.codegen.bench_kernels --json out.json

Shapes are those of a Llama-3-8B-like layer (H=4096, 32 query / 8 kv heads of
128, FFN 14336) at 8192 tokens for prefill and batch 8 for decode.  For each
kernel it prints the median time (``triton.testing.do_bench``) of the kernel and
of the eager PyTorch equivalent, the effective memory bandwidth or FLOP rate, and
the relative error against a float32 evaluation of the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def _rel(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from . import tuning
    from . import triton_attention as ta
    from . import triton_mlp as tm
    from . import triton_norm as tn
    from . import triton_rotary as tr

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true", help="autotune every kernel on the bench shapes first")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = ap.parse_args(argv)

    dt = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    T, H, F_, Hq, Hkv, D = args.tokens, 4096, 14336, 32, 8, 128
    esz = torch.empty((), dtype=dt).element_size()
    profile = tuning.detect_profile(dev)
    print(f"device={torch.cuda.get_device_name(dev)} profile={profile} dtype={args.dtype} tokens={T}")
    results = []

    def bench(name, fn, eager, ref_fn, bytes_moved=None, flops=None, tune=None):
        if args.tune and tune is not None:
            cfg = tune()
            print(f"  tuned {name}: {cfg}")
        out = fn()
        err = _rel(out[0] if isinstance(out, tuple) else out, ref_fn())
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        ms_e = do_bench(eager, warmup=25, rep=100, return_mode="median")
        rate = ""
        if bytes_moved:
            rate = f"{bytes_moved / ms / 1e6:8.0f} GB/s"
        if flops:
            rate = f"{flops / ms / 1e9:8.1f} TFLOP/s"
        print(f"{name:<24} triton {ms:8.4f} ms  eager {ms_e:8.4f} ms  x{ms_e / ms:5.2f}  {rate}  rel_err {err:.2e}")
        results.append({"kernel": name, "ms": ms, "eager_ms": ms_e, "speedup": ms_e / ms, "rel_err": err, "rate": rate.strip()})

    # --- norms ---------------------------------------------------------
    x = torch.randn(T, H, device=dev, dtype=dt)
    r = torch.randn(T, H, device=dev, dtype=dt)
    w = torch.randn(H, device=dev, dtype=dt)
    bench(
        "rms_norm", lambda: tn.rms_norm(x, w), lambda: tn.reference_rms_norm(x, w),
        lambda: tn.reference_rms_norm(x.float(), w.float()), bytes_moved=2 * T * H * esz,
        tune=lambda: tn.tune_rms_norm(x, w),
    )
    bench(
        "add_rms_norm", lambda: tn.add_rms_norm(x, r, w), lambda: tn.reference_add_rms_norm(x, r, w),
        lambda: tn.reference_add_rms_norm(x.float(), r.float(), w.float())[0], bytes_moved=4 * T * H * esz,
        tune=lambda: tn.tune_rms_norm(x, w, residual=r),
    )
    # --- rotary (q projection output [1, T, Hq, D] seen as [1, Hq, T, D]) ---
    q4 = torch.randn(1, T, Hq, D, device=dev, dtype=dt).transpose(1, 2)
    ang = torch.arange(T, device=dev, dtype=torch.float32)[:, None] / (
        10000 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D)
    )
    ang = torch.cat((ang, ang), -1)[None]
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)
    bench(
        "rotary", lambda: tr.rotary(q4, cos, sin), lambda: tr.reference_rotary(q4, cos, sin),
        lambda: tr.reference_rotary(q4.float(), cos.float(), sin.float()), bytes_moved=2 * q4.numel() * esz,
        tune=lambda: tr.tune_rotary(q4, cos, sin),
    )
    # --- gated MLP --------------------------------------------------------
    gu = torch.randn(T, 2 * F_, device=dev, dtype=dt)
    bench(
        "swiglu_packed", lambda: tm.swiglu_packed(gu),
        lambda: F.silu(gu[:, :F_]) * gu[:, F_:],
        lambda: tm.reference_swiglu_packed(gu.float()), bytes_moved=3 * T * F_ * esz,
        tune=lambda: tm.tune_glu(gu),
    )
    # --- prefill attention ------------------------------------------------------
    S = min(T, 4096)
    q = torch.randn(1, S, Hq, D, device=dev, dtype=dt).transpose(1, 2)
    k = torch.randn(1, S, Hkv, D, device=dev, dtype=dt).transpose(1, 2)
    v = torch.randn(1, S, Hkv, D, device=dev, dtype=dt).transpose(1, 2)
    for causal in (False, True):
        fl = 4 * Hq * S * S * D * (0.5 if causal else 1.0)
        bench(
            f"attention{'_causal' if causal else ''}", lambda c=causal: ta.attention(q, k, v, c),
            lambda c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c, enable_gqa=True),
            lambda c=causal: F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=c, enable_gqa=True),
            flops=fl, tune=lambda c=causal: ta.tune_attention(q, k, v, c),
        )
    # --- decode attention ------------------------------------------------------
    B, Lmax = 8, 8192
    qd = torch.randn(B, Hq, 1, D, device=dev, dtype=dt)
    kc = torch.randn(B, Hkv, Lmax, D, device=dev, dtype=dt)
    vc = torch.randn(B, Hkv, Lmax, D, device=dev, dtype=dt)
    lens = torch.randint(Lmax // 2, Lmax + 1, (B,), device=dev, dtype=torch.int32)
    mask = (torch.arange(Lmax, device=dev)[None, :] < lens[:, None])[:, None, None, :]
    live = int(lens.sum().item())
    bench(
        "decode_attention", lambda: ta.decode_attention(qd, kc, vc, lens),
        lambda: F.scaled_dot_product_attention(qd, kc, vc, attn_mask=mask, enable_gqa=True),
        lambda: ta.reference_decode_attention(qd.float(), kc.float(), vc.float(), lens),
        bytes_moved=2 * live * Hkv * D * esz, tune=lambda: ta.tune_decode_attention(qd, kc, vc, lens),
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "profile": profile, "results": results,
                       "tuning": tuning.export_tuning()}, f, indent=1)
    bad = [r for r in results if not math.isfinite(r["rel_err"]) or r["rel_err"] > 2e-2]
    if bad:
        print("ACCURACY FAILURES:", [r["kernel"] for r in bad], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

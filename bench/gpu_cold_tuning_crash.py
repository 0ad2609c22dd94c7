"""Check for the cold-tuning GPU fault of issue "Soundness": prints "clean", or "FAILED: ..." with status 1.

    python3 bench/gpu_cold_tuning_crash.py                    # the issue's steps, Llama-3.2-1B shapes
    python3 bench/gpu_cold_tuning_crash.py --layers 2 --new-tokens 16 --no-hf   # small, for compute-sanitizer
    python3 bench/gpu_cold_tuning_crash.py --unfixed          # the fix undone in this process: expect FAILED

The issue's repro (../shared/repro/gpu_cold_tuning_crash.py, H200, 2026-12-01: `unspecified
launch failure` in 3 of 3 cold-cache runs, clean with a warm cache), made a check. Steps: a
random-weight Llama-3.2-1B-shaped Hugging Face model in bf16; its decode step compiled for the
GPU at -O3 with a tuning cache of its own (a fresh temporary folder unless --cache names one:
the fault needed a cold cache); generate() of a 32-token prompt (the first call autotunes, then
captures the step's CUDA graph); the step's logits at one position recorded; Hugging Face's own
generate() with a static cache (it compiles with mode="reduce-overhead", whose CUDA graph trees
drop PyTorch's cuBLAS workspaces); the same drop done directly, then `empty_cache()` and the
freed memory refilled with NaN canaries; then back-to-back replays of the step and generate()
again. Each replay must give the recorded logits, generate() the first tokens, and the canaries
must stay NaN (a graph writing memory it no longer owns would change them).

Cause and fix: flashc/codegen/cuda_graphs.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch


def canaries(sizes_mib=(2, 8, 32, 64), each: int = 4) -> list[torch.Tensor]:
    """NaN-filled blocks taking memory just returned to the allocator or the driver (cuBLAS's
    workspace is 32 MiB on Hopper; the others catch blocks of other pools)."""
    return [torch.full((mib * 2**20 // 4,), float("nan"), device="cuda") for mib in sizes_mib for _ in range(each)]


def run(args) -> str:
    os.environ["FLASHC_CACHE"] = args.cache or tempfile.mkdtemp(prefix="flashc_cold_")
    import flashc
    from flashc.codegen import cuda_graphs, tuning
    from flashc.codegen.cuda_graphs import release_library_workspaces
    from flashc.decode import DecodeStep, decode_example_inputs
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.unfixed:  # captures share PyTorch's cached cuBLAS workspaces again, as before the fix
        cuda_graphs.release_library_workspaces = lambda: None
    tuning.clear_memory_cache()
    cached = len(tuning.export_tuning()["entries"])
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    t = time.perf_counter()
    cm = flashc.compile(DecodeStep(model, 256), target="h200", level=3,
                        example_inputs=decode_example_inputs(model, 1, 256, device="cuda"))
    ids = torch.randint(0, cfg.vocab_size, (1, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    first = cm.generate(ids, args.new_tokens)  # the step's first call (here or in compile's check) tunes, then captures
    torch.cuda.synchronize()
    tuned = len(tuning.export_tuning()["entries"]) - cached
    print(f"compile + first generate (tuning, capture): {time.perf_counter() - t:.1f} s; tuning entries: "
          f"{cached} cached before, {tuned} new{'' if cached == 0 else ' (warm cache: the fault needed a cold one)'}",
          flush=True)
    for _ in range(args.generates - 1):
        if not torch.equal(cm.generate(ids, args.new_tokens), first):
            return "generate() changed its tokens before any other work"
    at = min(100, first.shape[1] - 1)
    tok, pos = first[:, at:at + 1].contiguous(), torch.tensor([at], device="cuda")
    ref = cm.executable(tok, pos, *cm._kv_cache)[0].clone()
    torch.cuda.synchronize()

    if args.hf:
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static")
        torch.cuda.synchronize()
        print(f"Hugging Face generate (static cache): {time.perf_counter() - t:.1f} s", flush=True)
    release_library_workspaces()  # what Inductor's CUDA graph trees do around every recording
    torch.cuda.empty_cache()
    canary = canaries()
    torch.cuda.synchronize()

    worst = 0.0
    for i in range(args.calls):
        got = cm.executable(tok, pos, *cm._kv_cache)[0]
        if args.check_each or i == args.calls - 1:
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            if not err <= 1e-3:  # NaN fails too
                return f"replay {i}: logits differ from the ones before the other work (rel. err {err:.2e})"
            worst = max(worst, err)
    torch.cuda.synchronize()
    if not torch.equal(cm.generate(ids, args.new_tokens), first):
        return "generate() after the other work gave other tokens than the first"
    torch.cuda.synchronize()
    spoiled = sum(int((~torch.isnan(c)).sum()) for c in canary)
    if spoiled:
        return f"{spoiled} canary values in freed memory were overwritten during the replays"
    print(f"{args.calls} replays: worst rel. err {worst:.1e} against the logits recorded before; "
          f"generate() tokens unchanged; canaries intact", flush=True)
    return ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16, help="decoder layers (16: Llama-3.2-1B)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--generates", type=int, default=8, help="generate() calls before the other work")
    p.add_argument("--calls", type=int, default=25, help="back-to-back replays after the other work")
    p.add_argument("--check-each", action="store_true", help="compare every replay (a sync each), not only the last")
    p.add_argument("--no-hf", dest="hf", action="store_false",
                   help="skip Hugging Face's generate (its torch.compile is slow under compute-sanitizer); "
                        "the workspace drop it does is still done directly")
    p.add_argument("--unfixed", action="store_true",
                   help="undo the fix in this process (captures keep sharing cuBLAS workspaces): shows the fault")
    p.add_argument("--cache", help="tuning cache folder (default: a fresh one, i.e. a cold cache)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("FAILED: no CUDA device", flush=True)
        return 1
    try:
        failure = run(args)
        torch.cuda.synchronize()
    except Exception as e:  # a fault surfaces as a RuntimeError at the next sync
        failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(f"FAILED: {failure}" if failure else "clean", flush=True)
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())

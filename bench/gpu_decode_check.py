"""Correctness of decode on the GPU: steps vs a full forward, and greedy generation, eager and flashc.

    python bench/gpu_decode_check.py --out $OUT

For each tiny family (fp32, then llama-tiny in bf16): the eager DecodeStep and flashc's
h100 compile of it, stepped token by token over a prompt, against the model's full
forward without a cache; then `CompiledModel.generate` (greedy) against an argmax loop of
full forwards. Prints one line per check and writes OUT/decode_check.md; never stops at
the first failure.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import rel_err as rel  # noqa: E402  (same folder)

import flashc
from flashc import zoo
from flashc.decode import DecodeStep, decode_example_inputs, empty_kv_cache


def check(name: str, dtype: torch.dtype, lines: list[str]) -> None:
    model = zoo.build(name, dtype=dtype, device="cuda")
    step = DecodeStep(model, 32)
    tokens = torch.randint(0, model.config.vocab_size, (2, 6), device="cuda")
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
    cm = flashc.compile(step, "h100", decode_example_inputs(model, 2, 32, device="cuda"), level=3)
    ops = sorted({n.target.__name__ if hasattr(n.target, "__name__") else str(n.target)
                  for n in cm.program.op_nodes() if "flashc" in str(n.target)})
    for label, fn in (("eager", step), ("flashc h100", cm)):
        kv = empty_kv_cache(model, 2, 32, device="cuda")
        with torch.no_grad():
            outs = [fn(tokens[:, t:t + 1], torch.tensor([t], device="cuda"), *kv) for t in range(6)]
        torch.cuda.synchronize()
        lines.append(f"| {name} | {dtype} | {label} steps vs full forward | {rel(torch.cat(outs, 1), full):.2e} |")
        print(lines[-1], flush=True)
    ref = tokens[:, :3]
    with torch.no_grad():
        for _ in range(8):
            ref = torch.cat([ref, model(ref, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    got = cm.generate(tokens[:, :3], 8)
    same = (got == ref).float().mean().item()
    lines.append(f"| {name} | {dtype} | flashc generate == eager greedy (fraction of tokens) | {same:.3f} |")
    lines.append(f"| {name} | {dtype} | flashc ops | {', '.join(ops)} |")
    print("\n".join(lines[-2:]), flush=True)


def check_tuning_saved_back(lines: list[str]) -> None:
    """An artifact saved without tuning results tunes at its first call and writes them into itself."""
    import json
    import os
    import tempfile

    from flashc.codegen import tuning

    model = zoo.build("llama-tiny", dtype=torch.bfloat16, device="cuda")
    inputs = decode_example_inputs(model, 2, 32, device="cuda")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FLASHC_CACHE"] = f"{tmp}/cache_a"
        tuning.clear_memory_cache()
        cm = flashc.compile(DecodeStep(model, 32), "h100", inputs, level=3)
        cm.save(f"{tmp}/art")  # nothing tuned yet in this process: the artifact carries no tuning

        def tuning_entries() -> int:
            from flashc.artifact import read_manifest

            manifest = read_manifest(f"{tmp}/art")  # checksums verified
            name = manifest["payload"]["tuning"]
            return len(json.loads((Path(tmp) / "art" / "payload" / name).read_text())["entries"])

        before = tuning_entries()
        os.environ["FLASHC_CACHE"] = f"{tmp}/cache_b"  # a machine that never tuned these kernels
        tuning.clear_memory_cache()
        kv = empty_kv_cache(model, 2, 32, device="cuda")
        tokens = torch.randint(0, model.config.vocab_size, (2, 1), device="cuda")
        out = flashc.load(f"{tmp}/art")(tokens, torch.tensor([0], device="cuda"), *kv)
        saved = tuning_entries()
        os.environ["FLASHC_CACHE"] = f"{tmp}/cache_c"
        tuning.clear_memory_cache()
        kv = empty_kv_cache(model, 2, 32, device="cuda")
        again = flashc.load(f"{tmp}/art")(tokens, torch.tensor([0], device="cuda"), *kv)
        kv_ref = empty_kv_cache(model, 2, 32, device="cuda")
        with torch.no_grad():
            ref = DecodeStep(model, 32)(tokens, torch.tensor([0], device="cuda"), *kv_ref)
    lines.append(f"| llama-tiny | torch.bfloat16 | artifact tuning entries: saved at compile, after first load, "
                 f"reloaded step vs eager | {before}, {saved}, {rel(again, ref):.1e} (first load {rel(out, ref):.1e}) |")
    print(lines[-1], flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    lines = ["| model | dtype | check | result |", "| --- | --- | --- | --- |"]
    for name, dtype in (("llama-tiny", torch.float32), ("mixtral-tiny", torch.float32),
                        ("gemma-tiny", torch.float32), ("qwen2-tiny", torch.float32),
                        ("llama-tiny", torch.bfloat16), ("mixtral-tiny", torch.bfloat16)):
        try:
            check(name, dtype, lines)
        except Exception as e:
            traceback.print_exc()
            lines.append(f"| {name} | {dtype} | FAILED | {type(e).__name__}: {str(e)[:200]} |")
    try:
        check_tuning_saved_back(lines)
    except Exception as e:
        traceback.print_exc()
        lines.append(f"| llama-tiny | torch.bfloat16 | artifact tuning saved back: FAILED | {type(e).__name__}: {e} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

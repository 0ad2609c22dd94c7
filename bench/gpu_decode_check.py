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
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

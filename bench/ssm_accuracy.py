"""Attention-to-SSM rewrite (issue #16): what it costs in perplexity, on real weights.

    python bench/ssm_accuracy.py --model mixtral-ref --out /tmp/ssm_acc                 # CPU
    python bench/ssm_accuracy.py --model smollm2-135m --device cuda --out $OUT           # GPU
    python bench/ssm_accuracy.py --model smollm2-135m --device cuda --self-distill 1024 --tf32 \
        --checkpoint /tmp/ssm_ckpt --out $OUT        # + text sampled from the original; resumable
    python bench/ssm_accuracy.py --model mixtral-ref --kind gla --out /tmp/ssm_acc      # gated linear attention

For each setting (--settings; default: half the layers, measured choice, and all layers),
flashc's rewrite (`flashc.passes.ssm.rewrite`) converts, aligns and distils on flashc's
built-in calibration text, then perplexity is measured with flashc's evaluation code on its
evaluation texts (prose and code, disjoint from the calibration text), against the original
model on the same windows: after conversion (no training), after layer alignment, and after
end-to-end distillation. mixtral-ref is float-trained (flashc's own 19M MoE); smollm2-135m's
weights come from a 4-bit GGUF (dequantized), so its baseline is the 4-bit model's.

Rows go to OUT/ssm_accuracy.jsonl, the table to OUT/ssm_accuracy.md (appended), loss curves
to OUT/ssm_loss_<model>_<kind>_<setting>.png. --kind picks the new layers' kind: mamba2
(Mamba-2, the default) or gla (gated linear attention).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _setting(text: str):
    from flashc.passes.ssm import SSMConfig

    if text == "half":  # every other layer would be a guess; the measured choice keeps the worst half
        return "half (measured: all, keep the worst half as attention)", lambda n: dict(layers="all",
                                                                                       keep_attention=n // 2)
    if text == "all":
        return "all layers", lambda n: dict(layers="all")
    if text == "auto":
        return "auto (+10% budget on calibration text)", lambda n: dict(layers="auto")
    return f"layers {text}", lambda n: dict(layers=SSMConfig.parse(text).layers)


def _with_samples(model, tokenizer, calibration: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Training tokens: args.self_distill continuations of calibration paragraphs sampled from the original
    model, then the calibration text less its last tenth, which is held out (what `rewrite` measures on)."""
    from flashc.draft_head import generate_own_answers, self_distill_prompts

    held = calibration.numel() // 10
    train, held_out = calibration[:-held], calibration[-held:]
    prompts = self_distill_prompts(train, args.self_distill, tokenizer, chat=False)
    own = generate_own_answers(model, prompts, args.new_tokens, batch=args.sample_batch, sample=True)
    samples = torch.cat(own.sequences())
    print(f"sampled {len(prompts)} continuations ({own.answer_tokens} new tokens) in {own.seconds:.0f} s",
          flush=True)
    return torch.cat([samples, train]), held_out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixtral-ref")
    p.add_argument("--settings", nargs="+", default=["half", "all"], help="half, all, auto or indices like 1,3,5")
    p.add_argument("--align-steps", type=int, default=300)
    p.add_argument("--distill-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4, help="distillation's peak rate (alignment: 4x)")
    p.add_argument("--windows", type=int, default=None, help="perplexity windows per text (default: all)")
    p.add_argument("--kind", default="mamba2", help="the new layers' kind: mamba2 or gla (SSMConfig.kind)")
    p.add_argument("--train", default="ssm", help="what the logit stage trains: ssm (the new layers), blocks (their "
                                                "decoder blocks too) or all (SSMConfig.train)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--self-distill", type=int, default=0, metavar="N",
                   help="also train on N continuations of calibration paragraphs sampled from the original model "
                        "(temperature 1): more text to distil on than the ~50k calibration tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="--self-distill: tokens a continuation")
    p.add_argument("--sample-batch", type=int, default=64, help="--self-distill: continuations a generate() call")
    p.add_argument("--checkpoint", default=None, help="training checkpoints here; a rerun resumes from them")
    p.add_argument("--tf32", action="store_true", help="float32 matmuls on TF32 tensor cores (CUDA; training only "
                                                       "would differ, perplexity is measured the same way)")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()

    from flashc import zoo
    from flashc.accuracy import perplexity_rows, pooled_perplexity
    from flashc.distill import DistillConfig
    from flashc.passes.quantize.calibration import CalibrationData
    from flashc.passes.ssm import SSMConfig, attention_sites, convert, rewrite

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = zoo.tokenizer(args.model)
    model = zoo.build(args.model, dtype=torch.float32).to(args.device).eval()
    layers = len(attention_sites(model))
    calibration = CalibrationData.builtin(tokenizer)
    tokens, held_out = calibration.tokens, None
    if args.self_distill:
        tokens, held_out = _with_samples(model, tokenizer, tokens, args)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    align = DistillConfig(steps=args.align_steps, batch=args.batch, seq_len=args.seq_len, lr=4 * args.lr)
    distill = DistillConfig(steps=args.distill_steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr)

    def ppl(candidate) -> tuple[float, float, list]:
        with torch.no_grad():
            rows = perplexity_rows(candidate, model, tokenizer, window=256, stride=128, limit=args.windows)
        pooled = pooled_perplexity(rows)
        return pooled.value, pooled.baseline, rows

    lines = []
    for setting in args.settings:
        label, fields = _setting(setting)
        if args.train != "ssm":
            label += f"; logit stage trains {args.train}"
        config = SSMConfig(**fields(layers), kind=args.kind, align=align, distill=distill, train=args.train,
                           plot=str(out / f"ssm_loss_{args.model}_{args.kind}_{setting.replace(',', '-')}.png"))
        t0 = time.perf_counter()
        ckpt = None if args.checkpoint is None else str(Path(args.checkpoint) / setting.replace(",", "-"))
        result = rewrite(model, config, tokens.to(args.device), None if held_out is None else held_out.to(args.device),
                         checkpoint_dir=ckpt, progress=True, plot=config.plot)
        # the same layers without training, and after alignment only, measured on the evaluation texts
        untrained = convert(model, result.layers, args.kind).eval()
        converted, base, _ = ppl(untrained)
        del untrained
        distilled, _, rows = ppl(result.model)
        row = {"model": args.model, "kind": args.kind, "setting": label, "layers": result.layers, "of": layers,
               "baseline_ppl": base, "converted_ppl": converted, "distilled_ppl": distilled,
               "change": distilled / base - 1, "calibration_held_out": result.perplexity,
               "align_steps": args.align_steps, "distill_steps": args.distill_steps,
               "tokens_per_step": args.batch * args.seq_len, "seconds": time.perf_counter() - t0,
               "training_tokens": tokens.numel(), "self_distill": args.self_distill, "tf32": args.tf32,
               "train": args.train,
               "per_text": [r.to_dict() for r in rows], "device": args.device}
        with open(out / "ssm_accuracy.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        lines.append(f"| {args.model} | {args.kind} | {label} | {len(result.layers)} of {layers} | {base:.3f} | "
                     f"{converted:.3f} | {distilled:.3f} | {100 * (distilled / base - 1):+.1f}% | {args.align_steps} + "
                     f"{args.distill_steps} | {row['seconds']:.0f} |")
        print(lines[-1], flush=True)
        del result
    head = ("| model | kind | converted | layers | original ppl | converted, untrained | distilled | change | steps "
            "(align + logits) | seconds |\n|---|---|---|---|---|---|---|---|---|---|\n")
    data = (f"calibration text + {args.self_distill} sampled continuations, {tokens.numel()} tokens"
            if args.self_distill else f"calibration text, {tokens.numel()} tokens")
    text = (f"### attention -> SSM perplexity, {args.model}, eval texts (prose + code pooled), "
            f"{args.batch}x{args.seq_len} tokens a step, {args.device}, trained on {data}\n\n" + head
            + "\n".join(lines) + "\n")
    with open(out / "ssm_accuracy.md", "a") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

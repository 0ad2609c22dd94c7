"""Accuracy on the GPU: mixtral-ref's perplexity, eager vs flashc's CUDA target.

    python bench/gpu_eval.py --tokenizer DIR --out $OUT

The tokenizer is SmolLM2's (saved with `AutoTokenizer.save_pretrained`), carried to
the GPU machine because the package that ships it is not installed there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    from transformers import AutoTokenizer

    import flashc
    from flashc.accuracy import logits_fn_of
    from flashc.evaluation import load_eval_text, perplexity
    from flashc.profiles import detect

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    from transformers import MixtralForCausalLM

    from flashc.pretrained import mixtral_ref_dir

    model = MixtralForCausalLM.from_pretrained(str(mixtral_ref_dir()), dtype=torch.float32,
                                               attn_implementation="sdpa").eval().cuda()
    w = args.window
    ids0 = torch.zeros(1, w, dtype=torch.long, device="cuda")
    t = time.perf_counter()
    cm = flashc.compile(model, "h100", ids0, level=3, profile=detect())
    compile_s = time.perf_counter() - t
    rows = []
    for kind in ("prose", "code"):
        ids = torch.tensor(tok(load_eval_text(kind))["input_ids"])
        for name, fn in (("eager fp32", logits_fn_of(model)), ("flashc h100 -O3 fp32", logits_fn_of(cm))):
            def on_gpu(x, fn=fn):
                return fn(x.cuda()).float().cpu()
            t = time.perf_counter()
            r = perplexity(on_gpu, ids, w, w // 2, progress=False)
            rows.append(dict(text=kind, variant=name, ppl=r.ppl, windows=r.n_windows, tokens=r.n_tokens,
                             seconds=time.perf_counter() - t))
            print(rows[-1], flush=True)
    dev = torch.cuda.get_device_name(0)
    lines = [f"device {dev}; mixtral-ref (fp32), window {w}, stride {w // 2}; flashc compile {compile_s:.1f} s; "
             f"fused: {cm.report().fused()}; fallbacks: {[f.op for f in cm.fallbacks]}", "",
             "| text | variant | perplexity | windows | scored tokens | seconds |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['text']} | {r['variant']} | {r['ppl']:.4f} | {r['windows']} | {r['tokens']} | {r['seconds']:.1f} |"
              for r in rows]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_eval.md").write_text("\n".join(lines) + "\n")
    (Path(args.out) / "gpu_eval.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

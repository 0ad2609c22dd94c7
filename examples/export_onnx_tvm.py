"""Compile one model for ONNX Runtime and for TVM on the CPU; run each and print errors and timings.

Shows: targets "onnx-cpu" and "tvm-cpu" (each compile is checked end to end against the model), and
`flashc export`, which re-targets a saved "cpu" artifact's optimized graph to ONNX without recompiling.

    python examples/export_onnx_tvm.py            # 4 layers, 128 tokens
    python examples/export_onnx_tvm.py --quick    # 2 layers, 16 tokens (also FLASHC_EXAMPLES_QUICK=1)
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flashc
from flashc.cli import main as flashc_cli

TOLERANCE = 1e-4  # float32 everywhere; the runtimes only reorder sums


def median_ms(fn, repeat=10) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("FLASHC_EXAMPLES_QUICK") == "1")
    layers, seq_len = (2, 16) if parser.parse_args().quick else (4, 128)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq_len))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    compiled = {}
    for target in ("cpu", "onnx-cpu", "tvm-cpu"):
        start = time.perf_counter()
        compiled[target] = flashc.compile(model, target=target, example_inputs=(ids,), level=3)
        print(f"compiled for {target:8} in {time.perf_counter() - start:5.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        compiled["cpu"].save(f"{tmp}/cpu")
        if flashc_cli(["export", f"{tmp}/cpu", "--format", "onnx", "-o", f"{tmp}/onnx"]) != 0:
            return 1
        compiled["flashc export --format onnx"] = flashc.load(f"{tmp}/onnx")

    print(f"\n{'runs':28} {'max rel. error':>14} {'ms per call':>12}")
    with torch.no_grad():
        print(f"{'eager PyTorch':28} {'-':>14} {median_ms(lambda: model(ids, use_cache=False)):12.2f}")
    ok = True
    for name, cm in compiled.items():
        error = ((cm(ids).logits - want).abs().max() / want.abs().max()).item()
        print(f"{name:28} {error:14.2e} {median_ms(lambda: cm(ids)):12.2f}")
        ok &= error <= TOLERANCE
    print("RESULT", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

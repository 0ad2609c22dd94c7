"""Compile a Hugging Face Llama for the CPU, read the report, save and reload the artifact.

Shows: flashc.compile on a transformers model built from a config (random weights, nothing
downloaded), cm.report(), the compiled logits against the model's, and cm.save / flashc.load.

    python examples/compile_hf_model.py            # 4 layers, 64 tokens
    python examples/compile_hf_model.py --quick    # 2 layers, 16 tokens (also FLASHC_EXAMPLES_QUICK=1)
"""

import argparse
import os
import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flashc

TOLERANCE = 1e-4  # float32 on the CPU: fusion reorders sums, nothing more


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("FLASHC_EXAMPLES_QUICK") == "1")
    args = parser.parse_args()
    layers, seq_len = (2, 16) if args.quick else (4, 64)

    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq_len))

    cm = flashc.compile(model, target="cpu", example_inputs=(ids,), level=3)
    print(cm.report())

    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    compiled_error = relative_error(cm(ids).logits, want)
    with tempfile.TemporaryDirectory() as tmp:
        path = cm.save(os.path.join(tmp, "llama"))
        print(f"artifact: {sorted(os.listdir(path))}")
        reloaded_error = relative_error(flashc.load(path)(ids).logits, want)

    ok = compiled_error <= TOLERANCE and reloaded_error <= TOLERANCE
    print(f"max relative error of the logits vs the model: compiled {compiled_error:.2e}, "
          f"reloaded artifact {reloaded_error:.2e} (tolerance {TOLERANCE:g})")
    print("RESULT", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Generate text with a compiled decode step and check it against Hugging Face's generate, token for token.

Shows: flashc.decode.DecodeStep (one token in, a static KV cache updated in place), compiled for the
CPU, and cm.generate (greedy) against model.generate(..., do_sample=False) on a small random Llama.

    python examples/decode_and_generate.py            # 4 layers, prompt of 16, 32 new tokens
    python examples/decode_and_generate.py --quick    # 2 layers, prompt of 8, 16 new tokens
                                                      # (also FLASHC_EXAMPLES_QUICK=1)
"""

import argparse
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flashc
from flashc.decode import DecodeStep, decode_example_inputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("FLASHC_EXAMPLES_QUICK") == "1")
    layers, prompt_len, new_tokens = (2, 8, 16) if parser.parse_args().quick else (4, 16, 32)

    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1)  # larger random weights: less repetitive text
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len))
    cache_len = prompt_len + new_tokens

    step = DecodeStep(model, max_cache_len=cache_len)
    cm = flashc.compile(step, target="cpu", example_inputs=decode_example_inputs(model, 1, cache_len), level=3)
    fused = {k: v for k, v in cm.report().fused().items() if v}
    print(f"decode step compiled at -O3, fused: {fused}")

    start = time.perf_counter()
    ours = cm.generate(prompt, max_new_tokens=new_tokens)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        theirs = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                pad_token_id=0)
    theirs_s = time.perf_counter() - start

    new_ours, new_theirs = ours[0, prompt_len:].tolist(), theirs[0, prompt_len:].tolist()
    same = sum(a == b for a, b in zip(new_ours, new_theirs))
    print(f"flashc      ({ours_s:6.2f} s): {new_ours}")
    print(f"transformers({theirs_s:6.2f} s): {new_theirs}")
    ok = ours.shape == theirs.shape and same == new_tokens
    print(f"{same}/{new_tokens} new tokens identical")
    print("RESULT", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Generate with prefill + speculative decoding and check it is plain greedy decoding, token for token.

Shows: flashc.generation.compile_generation (decode, prefill and verify entries over one KV cache),
gm.generate with speculate="ngram" (prompt lookup) and with a draft model (the target's own first
layers, flashc.layerskip), their stats, and a save/load of the generation artifact. The prompt repeats
a phrase, so prompt lookup finds drafts; on the CPU the speedups are small (a verify call costs
about a decode call only where reading the weights dominates: see bench/generation.py).

    python examples/speculative_generation.py            # 4 layers, 64 new tokens
    python examples/speculative_generation.py --quick    # 2 layers, 24 new tokens (also FLASHC_EXAMPLES_QUICK=1)
"""

import argparse
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flashc
from flashc.generation import compile_generation
from flashc.layerskip import compile_layerskip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("FLASHC_EXAMPLES_QUICK") == "1")
    layers, new_tokens = (2, 24) if parser.parse_args().quick else (4, 64)

    config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 12)).repeat(1, 4)  # 48 tokens, a phrase said 4 times

    gm = compile_generation(model, "cpu", cache_len=128, prefill_chunk=32, draft_len=4, level=3)
    draft = compile_layerskip(model, "cpu", exit_layer=1, cache_len=128, prefill_chunk=32, level=3)
    print(gm.describe())
    plain, plain_stats = gm.generate(prompt, new_tokens, return_stats=True)
    ok = True
    print(f"{'variant':<28}{'identical':>10}{'rounds':>8}{'kept/drafted':>14}{'tokens/round':>14}")
    for name, spec in (("plain", None), ("ngram", "ngram"), ("layerskip (1st layer)", draft)):
        out, stats = gm.generate(prompt, new_tokens, speculate=spec, return_stats=True) if spec else (plain,
                                                                                                       plain_stats)
        same = torch.equal(out, plain)
        ok &= same
        kept = f"{stats.accepted}/{stats.proposed}" if stats.proposed else "-"
        per_round = f"{stats.mean_accepted_length:.2f}" if stats.mean_accepted_length else "1.00"
        print(f"{name:<28}{'yes' if same else 'NO':>10}{stats.rounds:>8}{kept:>14}{per_round:>14}")

    with tempfile.TemporaryDirectory() as tmp:
        gm.save(f"{tmp}/gen")
        loaded = flashc.load(f"{tmp}/gen")
        again = loaded.generate(prompt, new_tokens, speculate="ngram")
    print(f"reloaded artifact: entries {sorted(loaded.entries)}, output identical: {torch.equal(again, plain)}")
    ok &= torch.equal(again, plain)
    print("RESULT", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The generation loop's own cost, without carried weights: a SmolLM2-135M-shaped Llama with seeded
random weights (its greedy output soon repeats itself, so prompt lookup drafts are mostly kept),
compiled once; plain decoding and ngram speculation (k fixed) timed by the loop's own statistics.

Run it on two checkouts in one call to A/B a change to flashc.generate / flashc.speculate (each
prints one JSON line a variant):

    python3 bench/generation_loop.py --target h100 --label new [--exact-verify]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flashc
from flashc.generation import compile_generation


def smollm2_shaped(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="h100", choices=["h100", "h200", "cpu"])
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--exact-verify", action="store_true", help="compile the verify entry with exact_verify")
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dtype = torch.float32 if args.target == "cpu" else torch.bfloat16
    gm = compile_generation(smollm2_shaped(dtype), args.target, cache_len=512, batch=1, prefill_chunk=64,
                            draft_len=5, exact_verify=args.exact_verify)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(49152, (1, 40), generator=g) for _ in range(args.prompts)]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    for name, kw in (("plain", {}), ("ngram k fixed", {"speculate": "ngram", "adaptive": False}),
                     ("ngram adaptive", {"speculate": "ngram"})):
        rates, per_call, ratios, kept = [], [], [], []
        for ids in prompts:
            gm.generate(ids, 8, **kw)
            for _ in range(args.repeat):
                _, st = gm.generate(ids, args.new_tokens, return_stats=True, **kw)
                rates.append((st.new_tokens - 1) / (st.total_s - st.prefill_s))
                per_call.append((st.new_tokens - 1) / st.rounds)
                if st.verify_step_s and st.plain_step_s:
                    ratios.append(st.verify_step_s / st.plain_step_s)
                if st.proposed:
                    kept.append(st.accepted / st.proposed)
        print(json.dumps(dict(label=args.label, exact_verify=args.exact_verify, variant=name,
                              tokens_per_s=round(statistics.median(rates), 1),
                              tokens_a_call=round(statistics.median(per_call), 2),
                              verify_over_plain=round(statistics.median(ratios), 3) if ratios else None,
                              drafts_kept=round(statistics.median(kept), 3) if kept else None,
                              device=device, flashc=flashc.__file__)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

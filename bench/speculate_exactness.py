"""Is speculative greedy decoding token-for-token plain decoding? Where not, why.

For smollm2-135m (its weights carried, see bench/gpu_session.sh) compiled at each dtype, every
prompt is decoded plainly and with each speculation variant; where a variant's tokens leave
plain decoding's, the prefix they share goes through the eager model in float64 and the
table gives the reference's logit margin between the two candidate tokens at that step and
which of them the reference prefers. A margin far below the dtype's rounding of a logit (bf16:
about 0.03 at logit 8) is a tie that the verify entry's matmul order broke the other way; a
large margin is a bug.

    python bench/speculate_exactness.py --target h100 --out OUT [--dtypes float32 bfloat16 bfloat16-exact]
        [--model llama-3.2-1b:4]

`--model NAME[:LAYERS]` takes a zoo model with seeded random weights instead (no carried wheel): the
prompts are then random token ids, "passage" ones a random stretch repeated (prompt lookup finds its
continuations), and random logits are near-ties everywhere, the hardest case for identity.

`bfloat16-exact` compiles the verify entry with exact_verify=True (each token computed as the decode
entry computes it): its rows should all say identical, and the entry spread be zero.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from generation import _passage_prompts  # noqa: E402


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int | None:
    n = min(a.shape[-1], b.shape[-1])
    diff = (a[..., :n] != b[..., :n]).reshape(-1, n).any(0).nonzero()
    if len(diff):
        return int(diff[0])
    return None if a.shape[-1] == b.shape[-1] else n


@torch.no_grad()
def entry_spread(gm, ids: torch.Tensor, tokens: int = 6) -> dict:
    """Logits of `tokens` continuation tokens through the verify entry in one call against the decode entry
    one token a call (same KV cache before each): the largest difference, relative to the logits' spread,
    and how often the argmax differs. Where it is nonzero, greedy outputs can part at near-ties."""
    steps = gm.steps()
    n = ids.shape[1] - tokens
    steps.feed(ids[:, :n].to(steps.device), 0)
    saved = [t.clone() for t in steps.kv_cache]
    chunk = ids[:, n:].to(steps.device)
    positions = torch.arange(n, n + tokens, device=steps.device)
    one_call = steps.calls[tokens](chunk, positions, *steps.kv_cache).float()
    for t, s in zip(steps.kv_cache, saved):
        t.copy_(s)
    by_token = torch.cat([steps.calls[1](chunk[:, i:i + 1], positions[i:i + 1], *steps.kv_cache).float()
                          for i in range(tokens)], 1)
    diff = (one_call - by_token).abs().max().item()
    return {"max_abs_diff": diff, "logit_std": by_token.std().item(),
            "argmax_differs": int((one_call.argmax(-1) != by_token.argmax(-1)).sum())}


def main() -> None:
    from flashc import pretrained
    from flashc.generation import compile_generation

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--head", default=None, metavar="DIR")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, or a zoo model NAME[:LAYERS] with "
                    "seeded random weights")
    args = ap.parse_args()
    device = "cpu" if args.target == "cpu" else "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2-135m":
        ref64, tokenizer = pretrained.load_smollm2(torch.float32)
        passage, open_ended = _passage_prompts(tokenizer, args.prompts, 90)
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
        load = lambda dtype: pretrained.load_smollm2(dtype)[0]  # noqa: E731
    else:
        from flashc import zoo

        zoo_name, _, layers = args.model.partition(":")
        load = functools.partial(zoo.build, zoo_name, num_layers=int(layers) if layers else None)
        ref64 = load(torch.float32)
        g = torch.Generator().manual_seed(0)
        vocab = ref64.config.vocab_size
        passage = [torch.randint(vocab, (45,), generator=g).repeat(2).tolist() for _ in range(args.prompts)]
        open_ended = [torch.randint(vocab, (90,), generator=g).tolist() for _ in range(args.prompts)]
        encode = lambda ids: ids  # noqa: E731
    ref64 = ref64.to(device=device, dtype=torch.float64).eval()
    rows, records, spreads = [], [], []
    for dtype_name in args.dtypes:  # "bfloat16-exact": the verify entry compiled with exact_verify=True
        exact = dtype_name.endswith("-exact")
        dtype = getattr(torch, dtype_name.removesuffix("-exact"))
        model = load(dtype)
        head = None
        if args.head:
            from flashc.draft_head import load_draft_head

            head = load_draft_head(args.head)
        gm = compile_generation(model, args.target, cache_len=512, batch=1, draft_len=5,
                                prefill_chunk=512 if device == "cuda" else 64, draft_head=head, exact_verify=exact)
        variants = {"ngram": {"speculate": "ngram"}, "ngram k fixed": {"speculate": "ngram", "adaptive": False}}
        if head is not None:
            variants["head"] = {"speculate": "head"}
        first = torch.tensor([encode(passage[0])])
        spread = entry_spread(gm, gm.generate(first, 6))
        spread = {"dtype": dtype_name, "entries": "verify (6 tokens, one call) vs decode (a call a token)", **spread}
        print(json.dumps(spread), flush=True)
        records.append(spread)
        spreads.append(spread)
        for kind, prompts in (("passage", passage), ("open-ended", open_ended)):
            for p, text in enumerate(prompts):
                ids = torch.tensor([encode(text)])
                plain = gm.generate(ids, args.new_tokens)
                for name, kw in variants.items():
                    spec, st = gm.generate(ids, args.new_tokens, return_stats=True, **kw)
                    at = first_difference(plain, spec)
                    rec = {"dtype": dtype_name, "prompts": kind, "prompt": p, "variant": name,
                           "identical": at is None, "kept": f"{st.accepted}/{st.proposed}"}
                    if at is not None:
                        with torch.no_grad():
                            logits = ref64(input_ids=plain[:, :at].to(device)).logits[0, -1]
                        a, b = int(plain[0, at]), int(spec[0, at])
                        top = torch.topk(logits, 2)
                        rec.update(step=at - ids.shape[1], plain_token=a, spec_token=b,
                                   margin=float(logits[a] - logits[b]),
                                   reference_top=int(top.indices[0]),
                                   reference_gap=float(top.values[0] - top.values[1]))
                    records.append(rec)
                    print(json.dumps(rec), flush=True)
                    rows.append(rec)
    lines = [f"### speculative greedy decoding against plain, {args.model}, {args.target}", "",
             "| dtype | prompts | variant | drafts kept | identical | first differing step |"
             " ref. logit(plain) - logit(spec) | ref. top-2 gap | reference's choice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lead = f"| {r['dtype']} | {r['prompts']} {r['prompt']} | {r['variant']} | {r['kept']} |"
        if r["identical"]:
            lines.append(f"{lead} yes | - | - | - | - |")
        else:
            choice = ("plain" if r["reference_top"] == r["plain_token"] else
                      "spec" if r["reference_top"] == r["spec_token"] else "neither")
            lines.append(f"{lead} NO | {r['step']} | {r['margin']:+.4f} | {r['reference_gap']:.4f} | {choice} |")
    for dtype_name in args.dtypes:
        mine = [r for r in rows if r["dtype"] == dtype_name]
        lines.append(f"\n{dtype_name}: greedy speculative output identical to plain decoding in "
                     f"{sum(r['identical'] for r in mine)} of {len(mine)} runs ({len(mine) // max(1, len(variants))} "
                     f"prompts x {len(variants)} variants)")
    lines += ["", "| dtype | entries | max abs logit difference | logits' std | argmax differs (of 6) |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['entries']} | {r['max_abs_diff']:.3g} | {r['logit_std']:.3g} | "
              f"{r['argmax_differs']} |" for r in spreads]
    (out / "speculate_exactness.md").write_text("\n".join(lines) + "\n")
    (out / "speculate_exactness.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

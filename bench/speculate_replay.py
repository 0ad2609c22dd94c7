"""Speculation policy on recorded text: flashc's generation loop and drafters run against a stand-in
target that replays a model's recorded greedy output and takes a fixed time a call.

The stand-in's logits put the recorded next token first, so greedy decoding reproduces the record,
and prompt lookup keeps exactly the drafts the real model would keep. Each call waits (busy) for a
plain step's or a verify step's device time, given in microseconds (defaults: smollm2-135m's kernels
on an H100, session 16's tuning log: about 460 us a decode step, 730 us a 6-token verify step). What
the loop itself costs is real: it runs as written, on this machine's CPU.

    python bench/speculate_replay.py                      # record smollm2-135m's answers (CPU, float32), replay
    python bench/speculate_replay.py --ratios 1.2 1.6 2.4 # verify step cost against a plain step

It answers: how many tokens a call prompt lookup gives on these prompts, what speed-up that makes at a
given verify/plain cost, and whether the adaptive policy ever runs slower than plain decoding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def record(prompts: int, new_tokens: int, path: Path) -> dict:
    """smollm2-135m's greedy answers to bench/generation.py's prompts (Hugging Face, float32, CPU)."""
    from generation import _passage_prompts

    from flashc import pretrained

    model, tokenizer = pretrained.load_smollm2(torch.float32)
    passage, open_ended = _passage_prompts(tokenizer, prompts, 90)
    out = {}
    with torch.no_grad():
        for kind, texts in (("passage", passage), ("open-ended", open_ended)):
            for i, text in enumerate(texts):
                ids = torch.tensor([tokenizer(text)["input_ids"]])
                seq = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
                out[f"{kind} {i}"] = {"prompt": ids.shape[1], "tokens": seq[0].tolist()}
    path.write_text(json.dumps(out))
    return out


def _wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Replay:
    """A target that emits a recorded sequence: its step for `size` tokens returns logits whose argmax
    at each fed position is the recorded token after it."""

    def __init__(self, tokens: list[int], vocab: int, plain_s: float, verify_s: float) -> None:
        self.next = torch.tensor(tokens[1:] + [tokens[-1]])
        self.vocab, self.plain_s, self.verify_s = vocab, plain_s, verify_s

    def step(self, size: int):
        def call(ids, positions, *kv):
            _wait(self.plain_s if size == 1 else self.verify_s)
            nxt = self.next[positions.clamp_max(self.next.shape[0] - 1)]
            return torch.nn.functional.one_hot(nxt, self.vocab).float()[None].expand(ids.shape[0], -1, -1)
        return call


def replay(records: dict, k: int, plain_us: float, ratio: float) -> dict:
    from flashc.generate import Steps, generate
    from flashc.speculate import NgramDrafter, Speculator

    # token ids renumbered densely (equal ids stay equal, so prompt lookup finds the same matches): the
    # stand-in's logits then cost the loop what a real step's small readback does, not a 49k-wide one-hot
    ids_seen = sorted({t for rec in records.values() for t in rec["tokens"]})
    dense = {t: i for i, t in enumerate(ids_seen)}
    vocab = len(ids_seen)
    rows = {}
    for name, rec in records.items():
        kind = name.split()[0]
        prompt, tokens = rec["prompt"], [dense[t] for t in rec["tokens"]]
        target = Replay(tokens, vocab, plain_us * 1e-6, plain_us * ratio * 1e-6)
        steps = Steps({1: target.step(1), k + 1: target.step(k + 1), 64: target.step(64)},
                      [torch.zeros(1, 1, len(tokens) + k + 64, 1)])
        ids = torch.tensor([tokens[:prompt]])
        new = len(tokens) - prompt
        for variant, spec in (("plain", None), ("ngram (adaptive)", Speculator(NgramDrafter(), k)),
                              ("ngram (k fixed)", Speculator(NgramDrafter(), k, adaptive=False))):
            from flashc.generate import GenerationStats

            st = GenerationStats()
            out = generate(steps, ids, new, speculator=spec, stats=st)
            if out[0].tolist() != tokens:
                raise AssertionError(f"{name} {variant}: the replay did not reproduce the record")
            acc = rows.setdefault((kind, variant), [0.0, 0, 0])
            acc[0] += st.total_s - st.prefill_s
            acc[1] += st.new_tokens - 1
            acc[2] += st.rounds
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--record", default=str(REPO / "bench_out" / "smollm2_greedy.json"),
                    help="recorded answers (made on first use)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--plain-us", type=float, default=460.0, help="a plain step's device time")
    ap.add_argument("--ratios", type=float, nargs="+", default=[730 / 460], help="verify step / plain step")
    ap.add_argument("--drafts", type=int, nargs="+", default=[5, 8])
    args = ap.parse_args()
    path = Path(args.record)
    if path.is_file():
        records = json.loads(path.read_text())
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        records = record(args.prompts, args.new_tokens, path)
    print(f"| verify / plain | drafts | prompts | variant | tokens a call | x plain |\n|---|---|---|---|---|---|")
    for ratio in args.ratios:
        for k in args.drafts:
            rows = replay(records, k, args.plain_us, ratio)
            for kind in ("passage", "open-ended"):
                base = rows[(kind, "plain")]
                for variant in ("plain", "ngram (adaptive)", "ngram (k fixed)"):
                    secs, toks, calls = rows[(kind, variant)]
                    print(f"| {ratio:.2f} | {k} | {kind} | {variant} | {toks / calls:.2f} | "
                          f"{(toks / secs) / (base[1] / base[0]):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

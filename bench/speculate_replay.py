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
    """A model that emits a recorded sequence: its step for `size` tokens waits seconds[size] and
    returns logits whose argmax at each fed position is the recorded token after it."""

    def __init__(self, tokens: list[int], vocab: int, seconds: dict[int, float]) -> None:
        self.next = torch.tensor(tokens[1:] + [tokens[-1]])
        self.eye = torch.eye(vocab, dtype=torch.bfloat16)  # a row per token: logits by one gather
        self.seconds = seconds

    def steps(self, cache_len: int):
        from flashc.generate import Steps

        def step(size: int):
            def call(ids, positions, *kv):
                _wait(self.seconds[size])
                return self.eye[self.next[positions.clamp_max(self.next.shape[0] - 1)]][None].expand(ids.shape[0],
                                                                                                      -1, -1)
            return call
        return Steps({size: step(size) for size in self.seconds}, [torch.zeros(1, 1, cache_len, 1)])


def replay(records: dict, k: int, plain_us: float, ratio: float, drafter: tuple[float, list[int]] | None = None,
           cache_len: int = 512, chunk: int = 512) -> dict:
    """Seconds, tokens and rounds per (prompt kind, variant). drafter: (its step's cost as a share of a
    plain step, its entries' sizes) adds a model drafter whose drafts are never kept (the next token
    shifted by one), as an untrained layerskip draft nearly is."""
    from flashc.generate import GenerationStats, generate
    from flashc.speculate import ModelDrafter, NgramDrafter, Speculator

    # token ids renumbered densely (equal ids stay equal, so prompt lookup finds the same matches): the
    # stand-in's logits then cost the loop what a real step's small readback does, not a 49k-wide one-hot
    ids_seen = sorted({t for rec in records.values() for t in rec["tokens"]})
    dense = {t: i for i, t in enumerate(ids_seen)}
    vocab = len(ids_seen)
    rows = {}
    for name, rec in records.items():
        kind = name.split()[0]
        prompt, tokens = rec["prompt"], [dense[t] for t in rec["tokens"]]
        plain_s = plain_us * 1e-6
        # a prefill chunk of T tokens costs T / 200 plain steps (smollm2-135m's 512-token prefill kernels in the
        # session-16 H100 tuning log: about 1.2 ms, 2.6 decode steps)
        steps = Replay(tokens, vocab, {1: plain_s, k + 1: plain_s * ratio,
                                       chunk: plain_s * chunk / 200}).steps(cache_len)
        ids = torch.tensor([tokens[:prompt]])
        new = len(tokens) - prompt
        variants = [("plain", None), ("ngram (adaptive)", Speculator(NgramDrafter(), k)),
                    ("ngram (k fixed)", Speculator(NgramDrafter(), k, adaptive=False))]
        if drafter is not None:
            share, sizes = drafter
            cost = {size: plain_s * share * (1 if size == 1 else ratio if size <= 16 else size / 200)
                    for size in sizes}
            wrong = Replay([(t + 1) % vocab for t in tokens], vocab, cost).steps(cache_len)
            variants.append((f"model drafter never kept, entries {sizes}", Speculator(ModelDrafter(wrong, vocab), k)))
        for variant, spec in variants:
            st = GenerationStats()
            out = generate(steps, ids, new, speculator=spec, stats=st)
            if out[0].tolist() != tokens:
                raise AssertionError(f"{name} {variant}: the replay did not reproduce the record")
            acc = rows.setdefault((kind, variant), [0.0, 0, 0])
            acc[0] += st.total_s - st.prefill_s
            acc[1] += st.new_tokens - 1
            acc[2] += st.rounds
    return rows


def device_time(records: dict, k: int, plain_us: float, ratio: float, share: float, repeats: int = 3,
                cache_len: int = 1024) -> dict:
    """Plain decoding's device time over a model drafter's whose drafts are never kept, per prompt kind and
    repeat, with what speculation learned carried from prompt to prompt as GenerationModel carries it: the
    cost of the adaptive policy's probes alone, free of this machine's timing noise (the seconds each stand-in
    call was given, added up; the policy itself still decides on the times it measures)."""
    from flashc.generate import generate
    from flashc.speculate import Learned, ModelDrafter, Speculator

    spent = [0.0]
    global _wait
    real_wait = _wait

    def counted(seconds: float) -> None:
        spent[0] += seconds
        real_wait(seconds)

    _wait = counted
    ids_seen = sorted({t for rec in records.values() for t in rec["tokens"]})
    dense = {t: i for i, t in enumerate(ids_seen)}
    vocab, plain_s, out = len(ids_seen), plain_us * 1e-6, {}
    sizes = (1, 16, 512)
    try:
        for kind in ("passage", "open-ended"):
            learned = Learned()
            for rep in range(repeats):
                totals = []
                for drafted in (False, True):
                    spent[0] = 0.0
                    for name, rec in records.items():
                        if not name.startswith(kind):
                            continue
                        tokens = [dense[t] for t in rec["tokens"]]
                        steps = Replay(tokens, vocab, {1: plain_s, k + 1: plain_s * ratio,
                                                       512: plain_s * 512 / 200}).steps(cache_len)
                        spec = None
                        if drafted:
                            cost = {n: plain_s * share * (1 if n == 1 else ratio if n <= 16 else n / 200)
                                    for n in sizes}
                            wrong = Replay([(t + 1) % vocab for t in tokens], vocab, cost).steps(cache_len)
                            spec = Speculator(ModelDrafter(wrong, vocab), k, learned=learned)
                        generate(steps, torch.tensor([tokens[:rec["prompt"]]]), len(tokens) - rec["prompt"],
                                 speculator=spec)
                    totals.append(spent[0])
                out[(kind, rep)] = totals[0] / totals[1]
    finally:
        _wait = real_wait
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--record", default=str(REPO / "bench_out" / "smollm2_greedy.json"),
                    help="recorded answers (made on first use)")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--plain-us", type=float, default=460.0, help="a plain step's device time")
    ap.add_argument("--ratios", type=float, nargs="+", default=[730 / 460], help="verify step / plain step")
    ap.add_argument("--drafts", type=int, nargs="+", default=[5, 8])
    ap.add_argument("--drafter", type=float, default=None, metavar="SHARE",
                    help="add a model drafter whose drafts are never kept, its step SHARE of a plain step")
    ap.add_argument("--drafter-entries", type=int, nargs="+", default=[1, 512],
                    help="that drafter's entries (tokens a call): 1 512 as before session 16's catch-up entry, "
                         "1 16 512 with it")
    ap.add_argument("--device-time", type=float, default=None, metavar="SHARE",
                    help="only the device-time cost of a never-kept model drafter's probes (its step SHARE of a "
                         "plain step), what was learned carried from prompt to prompt, per repeat")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the stand-ins' tensor ops in one thread: no pool wake-ups in the timed loop
    path = Path(args.record)
    if path.is_file():
        records = json.loads(path.read_text())
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        records = record(args.prompts, args.new_tokens, path)
    if args.device_time is not None:
        print("| verify / plain | drafter step / plain | prompts | repeat | device time x plain |")
        print("|---|---|---|---|---|")
        for ratio in args.ratios:
            for (kind, rep), x in device_time(records, max(args.drafts), args.plain_us, ratio,
                                              args.device_time).items():
                print(f"| {ratio:.2f} | {args.device_time:.2f} | {kind} | {rep + 1} | {x:.3f} |", flush=True)
        return 0
    print(f"| verify / plain | drafts | prompts | variant | tokens a call | x plain |\n|---|---|---|---|---|---|")
    for ratio in args.ratios:
        for k in args.drafts:
            drafter = (args.drafter, args.drafter_entries) if args.drafter else None
            rows = replay(records, k, args.plain_us, ratio, drafter)
            for kind in ("passage", "open-ended"):
                base = rows[(kind, "plain")]
                for variant in [v for (kd, v) in rows if kd == kind]:
                    secs, toks, calls = rows[(kind, variant)]
                    print(f"| {ratio:.2f} | {k} | {kind} | {variant} | {toks / calls:.2f} | "
                          f"{(toks / secs) / (base[1] / base[0]):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

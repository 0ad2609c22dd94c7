"""Generation for a batch of sequences of different lengths: a position per sequence.

Entries compiled with a position per sequence and token (`flashc.decode.DecodeStep` with
cache_position [B, T]: `compile_generation(..., ragged=True)`) let every sequence of a batch
keep its own length. Prompts of different lengths go through the prefill entry together; a
sequence with fewer tokens in a call fills the rest of its row with padding placed past its
own end, which is overwritten before any query can read it (a query at position p sees slots
<= p, and every slot below p holds a token fed earlier). In a speculative round each sequence
verifies its own drafts and keeps its own number of them; each stops at its own end token.

The loop keeps flashc.generate's invariant per sequence: the cache holds every token of the
sequence but the last one emitted (the pending token), fed first in the next call. Prompt
lookup (`NgramDrafter`) drafts; a draft model needs its own ragged entries and is refused.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from flashc.errors import InputError
from flashc.generate import GenerationStats, Sampling, Steps, sync


def feed_rows(steps: Steps, rows: list[list[int]], starts: list[int], *, all_logits: bool = False,
              finished: list[bool] | None = None) -> list[torch.Tensor]:
    """Write row b's tokens at positions starts[b].. of sequence b, in calls of the steps' sizes;
    returns per row the logits of its last token [V] (of every token [n_b, V] with all_logits;
    an empty row gives None). A finished row (its cache no longer read) may be written anywhere
    past the others' needs, so it never limits the call's size."""
    cache_len, batch = steps.cache_len, steps.batch
    finished = finished or [False] * batch
    longest = max(len(r) for r in rows)
    out: list = [[] if all_logits else None for _ in range(batch)]
    at = 0
    while at < longest:
        left = longest - at
        size = _call_size(steps, [s for s, f in zip(starts, finished) if not f], at, left)
        ids = torch.zeros(batch, size, dtype=torch.long)
        pos = torch.zeros(batch, size, dtype=torch.long)
        new_at = [0] * batch  # where row b's first new token sits in the call
        for b, (row, start) in enumerate(zip(rows, starts)):
            first = start + min(at, len(row))  # a row with no tokens left: padding right after its end
            if first + size > cache_len:
                # a live row's last call starts early and feeds its own tokens again (same tokens,
                # same positions: same keys and values); a finished row's slots are never read again
                first = cache_len - size
            lo = first - start
            chunk = row[lo:lo + size] if lo >= 0 else []
            fill = chunk[-1] if chunk else (row[-1] if row else 0)
            ids[b] = torch.tensor(chunk + [fill] * (size - len(chunk)))
            pos[b] = torch.arange(first, first + size)
            new_at[b] = start + at - first
        logits = steps.calls[size](ids.to(steps.device), pos.to(steps.device), *steps.kv_cache)
        for b, row in enumerate(rows):
            count, off = max(0, min(size, len(row) - at)), new_at[b]
            if count and all_logits:
                out[b].append(logits[b, off:off + count])
            elif count and at + count == len(row):
                out[b] = logits[b, off + count - 1]
        at += size
    return [torch.cat(o) if all_logits and o else (None if all_logits else o) for o in out]


def _call_size(steps: Steps, starts: list[int], at: int, left: int) -> int:
    """The step that feeds the most of `left` tokens (from offset `at` of rows starting at the
    live rows' `starts`) in one call: the smallest covering them all whose slots stay inside the
    cache, if need be by starting early over the rows' own tokens of this feed (a row may slide
    back to its start), else the largest that fits from offset `at`."""
    covering_limit = steps.cache_len - max(starts) if starts else steps.cache_len
    covering = [t for t in steps.calls if left <= t <= covering_limit]
    if covering:
        return min(covering)
    limit = steps.cache_len - max(starts) - at if starts else steps.cache_len
    fitting = [t for t in steps.calls if t <= limit]
    if not fitting:
        raise InputError(f"a sequence reached the end of the static KV cache ({steps.cache_len} positions)")
    return max(fitting)


def generate_ragged(steps: Steps, prompts: list[torch.Tensor], max_new_tokens: int, sampling: Sampling, *,
                    eos_token_id: int | None = None, speculator=None,
                    stats: GenerationStats | None = None) -> Iterator[list[list[int]]]:
    """Yields each round's new tokens per sequence (a list per sequence, possibly empty once it
    has finished) until every sequence has max_new_tokens or has emitted eos_token_id."""
    from flashc.speculate import NgramDrafter

    if speculator is not None and not isinstance(speculator.drafter, NgramDrafter):
        raise InputError("sequences of different lengths speculate with speculate='ngram' only: a draft model "
                         "would need ragged entries of its own")
    batch, cache_len = steps.batch, steps.cache_len
    seqs = [p.tolist() for p in prompts]
    if len(seqs) != batch:
        raise InputError(f"{len(seqs)} prompts, but the steps were compiled for batch {batch}")
    longest = max(len(s) for s in seqs)
    if longest + max_new_tokens > cache_len:
        raise InputError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens does not fit the static KV "
                         f"cache of {cache_len} positions; compile with a larger cache_len")
    stats = stats if stats is not None else GenerationStats()
    stats.batch, stats.prompt_tokens = batch, longest
    produced = [0] * batch
    done = [False] * batch
    start = time.perf_counter()
    if max_new_tokens == 0:
        return

    def emit(b: int, new: list[int]) -> list[int]:
        new = new[:max_new_tokens - produced[b]]
        if eos_token_id is not None and eos_token_id in new:
            new = new[:new.index(eos_token_id) + 1]
            done[b] = True
        produced[b] += len(new)
        done[b] = done[b] or produced[b] >= max_new_tokens
        seqs[b] += new
        return new

    last = feed_rows(steps, seqs, [0] * batch)
    first = sampling.next(torch.stack(last)).tolist()
    news = [emit(b, [t]) for b, t in enumerate(first)]
    sync(steps.device)
    stats.prefill_s = time.perf_counter() - start
    stats.new_tokens = max(produced)
    yield news
    while not all(done):
        live = [b for b in range(batch) if not done[b]]
        room = min(min(cache_len - len(seqs[b]), max_new_tokens - produced[b] - 1) for b in live)
        drafts = _ngram_drafts(speculator, seqs, live, room) if speculator is not None else None
        stats.rounds += 1
        t = time.perf_counter()
        pending = [[s[-1]] for s in seqs]
        starts = [len(s) - 1 for s in seqs]
        if drafts is None:
            stats.draft_lengths.append(0)
            logits = feed_rows(steps, pending, starts, finished=done)
            chosen = sampling.next(torch.stack(logits)).tolist()  # read back: the step is done
            news = [emit(b, [chosen[b]]) if not done[b] else [] for b in range(batch)]
            if speculator is not None:
                speculator.observe_plain(time.perf_counter() - t, news)
        else:
            rows = [pending[b] + drafts[b] for b in range(batch)]
            logits = feed_rows(steps, rows, starts, all_logits=True, finished=done)
            news = []
            kept_total = proposed = 0
            for b in range(batch):
                if done[b]:
                    news.append([])
                    continue
                kept, new = _accept_row(logits[b], drafts[b], sampling)
                kept_total, proposed = kept_total + kept, proposed + len(drafts[b])
                speculator.observe_row(len(drafts[b]), kept, speculator.last_evidence)
                news.append(emit(b, new))
            speculator.observe_verify(time.perf_counter() - t)
            k = max(len(d) for d in drafts)
            stats.speculative_rounds += 1
            stats.proposed += proposed
            stats.accepted += kept_total
            stats.draft_lengths.append(k)
        stats.new_tokens = max(produced)
        yield news
    sync(steps.device)
    stats.total_s = time.perf_counter() - start
    if speculator is not None:
        stats.plain_step_s, stats.verify_step_s = speculator.learned.timing.plain, speculator.learned.timing.verify


def _ngram_drafts(speculator, seqs: list[list[int]], live: list[int], room: int) -> list[list[int]] | None:
    """Each live sequence's prompt-lookup drafts (finished ones draft nothing), or None for a
    plain round (no sequence has a match, or the controller turns speculation off)."""
    limit = min(speculator.max_draft, room)
    if limit < 1:
        return None
    drafter = speculator.drafter
    found, evidence = [[] for _ in seqs], []
    for b in live:
        match = drafter.lookup(b, seqs[b], limit)
        if match is not None:
            found[b], n = match
            evidence.append(n)
    if not evidence:
        return None
    speculator.last_evidence = min(evidence)
    speculator.shadow = None
    k = speculator.choose(max(len(f) for f in found), speculator.last_evidence)
    if k < 1:
        speculator.declined([f[0] if f else None for f in found], speculator.last_evidence)
        return None
    return [f[:k] for f in found]


def _accept_row(logits: torch.Tensor, drafts: list[int], sampling: Sampling) -> tuple[int, list[int]]:
    """One sequence's verify: logits [1 + len(drafts), V] at its pending token and drafts;
    returns (drafts kept, tokens to emit). Greedy keeps drafts while they are the argmax; sampled
    keeps draft i with probability p_i(d) (prompt lookup drafts deterministically) and draws the
    replacement from p_i without d, or a bonus token from p after every draft."""
    k = len(drafts)
    if sampling.greedy:
        target = logits.argmax(-1).tolist()
        kept = 0
        while kept < k and drafts[kept] == target[kept]:
            kept += 1
        return kept, drafts[:kept] + [target[kept]]
    p = sampling.probs(logits)
    u = torch.rand(k, generator=sampling.generator, device=p.device).tolist() if k else []
    kept = 0
    while kept < k and u[kept] < float(p[kept, drafts[kept]]):
        kept += 1
    if kept == k:
        return kept, drafts + [int(sampling.draw(p[k]))]
    residual = p[kept].clone()
    residual[drafts[kept]] = 0
    total = residual.sum()
    residual = residual / total if total > 0 else p[kept]
    return kept, drafts[:kept] + [int(sampling.draw(residual))]

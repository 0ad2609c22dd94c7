"""Token generation over compiled steps of a static KV cache: prefill, decode, speculation.

A *step* has the decode-step signature of flashc.decode,
`step(input_ids[B, T], cache_position[T], *kv_cache) -> logits[B, T, V]`: it writes the keys
and values of its T tokens into the cache at those positions and returns the logits of each.
`Steps` holds the steps one model has, by T (the one-token decode step always; a prefill
chunk and a verify step when flashc.generation compiled them), and feeds any number of
tokens through them (`Steps.feed`).

The loop (`generate_rounds`) keeps one invariant: the cache holds every token of the
sequence but the last one emitted, the *pending* token, and each round feeds the pending
token first. A plain round feeds it alone and samples one token; a speculative round feeds
it with k drafted tokens in one call and keeps the drafts the target agrees with plus one
token of its own (flashc.speculate). Rejected drafts need no rollback: their cache slots lie
past the sequence and are overwritten before any query can see them (a query at position p
sees slots <= p, and every slot < p holds a token fed earlier). For the same reason a
chunk may be padded past the tokens it feeds, while the padding stays inside the cache, and
a prompt's last chunk may start early, feeding again tokens the chunk before it wrote.
A round reads its new tokens back once; what to emit, end tokens and (greedy) acceptance are
then decided on the host, where the loop must know them anyway to decide whether to go on.

All sequences of a batch share positions (the compiled steps take one cache_position
vector), so prompts have equal lengths and a speculative round advances every sequence by
the fewest tokens any of them accepted (lossless: see flashc.speculate.accept).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from flashc.errors import InputError


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """The distribution a sampled token is drawn from, float32 [..., V], for temperature > 0.

    top_k keeps the k most likely tokens, top_p the smallest set whose probability reaches p
    (nucleus sampling); both apply before normalizing.
    """
    scores = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(sorted_scores, -1)
        drop = probs.cumsum(-1) - probs >= top_p  # keeps the token that crosses p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.softmax(scores, -1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax at temperature 0, else sampled."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: argmax at temperature 0, else drawn from sampling_probs."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    @classmethod
    def make(cls, temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
             device: torch.device) -> "Sampling":
        """Checked options; a generator seeded on `device` when sampling with a seed."""
        check_sampling(temperature, top_k, top_p)
        generator = None
        if seed is not None and temperature > 0:
            generator = torch.Generator(device=device).manual_seed(seed)
        return cls(temperature, top_k, top_p, generator)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(logits, self.temperature, self.top_k, self.top_p)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of probs [..., V]."""
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).reshape(probs.shape[:-1])

    def next(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1) if self.greedy else self.draw(self.probs(logits))

    def draft(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A drafter's token from its logits and the distribution it was drawn from (None when
        greedy), which speculative sampling's acceptance rule needs (flashc.speculate.accept)."""
        if self.greedy:
            return logits.argmax(-1), None
        q = self.probs(logits)
        return self.draw(q), q


Step = Callable[..., torch.Tensor]


class Steps:
    """The compiled steps of one model (by tokens per call) over its resident KV cache.

    stateful: the cache holds recurrent states (state-space layers of the attention-to-SSM
    rewrite), which every token fed changes for good: no call is then padded past the
    sequence, and cache_len (positions) must be given, the states having none.

    last_hidden, last_positions: the last call's hidden states [B, T, H] (the LM head's input)
    and the positions it fed [T], when its entry returns them (flashc.draft_head reads them)."""

    def __init__(self, calls: dict[int, Step], kv_cache: Sequence[torch.Tensor], cache_len: int | None = None,
                 stateful: bool = False) -> None:
        if 1 not in calls:
            raise InputError("generation needs the one-token decode step")
        self.calls = dict(sorted(calls.items()))
        self.kv_cache = list(kv_cache)
        self.stateful = stateful
        self._cache_len = cache_len
        self.last_hidden: torch.Tensor | None = None
        self.last_positions: torch.Tensor | None = None

    @property
    def cache_len(self) -> int:
        return self._cache_len if self._cache_len is not None else self.kv_cache[0].shape[2]

    @property
    def batch(self) -> int:
        return self.kv_cache[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.kv_cache[0].device

    def plan(self, n: int, start: int) -> list[tuple[int, int, int]]:
        """Calls that feed n tokens from position `start`: (tokens of the step, new tokens it
        feeds, tokens it feeds again before them).

        Full calls of the largest step while they fit, then the tail in the fewest calls: a
        step longer than the tail is padded past it if the padding stays inside the cache, or
        else starts early and feeds again tokens this feed wrote just before (same tokens at
        the same positions: the same keys and values). Neither when the cache holds a
        recurrent state, which every token fed changes for good.
        """
        sizes = list(self.calls)
        plan: list[tuple[int, int, int]] = []
        fed = 0
        while n > 0:
            exact_or_padded = [t for t in sizes if (t == n or t > n and not self.stateful)
                               and start + t <= self.cache_len]
            if exact_or_padded:
                plan.append((exact_or_padded[0], n, 0))
                return plan
            refeeding = [t for t in sizes if n < t <= n + fed and not self.stateful]
            if refeeding:
                plan.append((refeeding[0], n, refeeding[0] - n))
                return plan
            t = max(s for s in sizes if s <= n)
            plan.append((t, t, 0))
            n, start, fed = n - t, start + t, fed + t
        return plan

    def feed(self, ids: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        """Write ids[B, n] into the cache at positions start..start+n-1; returns the logits of
        the last token [B, V], or of every token [B, n, V] with all_logits."""
        n = ids.shape[1]
        if start + n > self.cache_len:
            raise InputError(f"{start + n} tokens do not fit the static KV cache of {self.cache_len} positions")
        outs, at = [], 0
        for size, count, back in self.plan(n, start):
            chunk = ids[:, at - back:at + count]
            if size > back + count:  # padding past the sequence: overwritten before it is ever read
                chunk = torch.cat([chunk, chunk[:, -1:].expand(-1, size - back - count)], 1)
            first = start + at - back
            positions = torch.arange(first, first + size, device=self.device)
            logits = self.calls[size](chunk, positions, *self.kv_cache)
            if all_logits:
                outs.append(logits[:, back:back + count])
            elif at + count == n:
                outs.append(logits[:, back + count - 1])
            at += count
        if not all_logits:
            return outs[-1]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GenerationStats:
    """What one generate() call did and how long it took (seconds measured with the device
    synchronized around the prefill and the whole call)."""

    batch: int = 0
    prompt_tokens: int = 0  # per sequence
    new_tokens: int = 0  # per sequence, the longest
    prefill_s: float = 0.0  # the prompt through the cache and the first token chosen
    total_s: float = 0.0
    rounds: int = 0  # calls of the target after the prefill
    speculative_rounds: int = 0
    proposed: int = 0  # drafted tokens verified
    accepted: int = 0  # drafted tokens kept
    plain_step_s: float | None = None  # measured time of a one-token step, when one ran
    verify_step_s: float | None = None  # measured time of the verify step, when one ran
    draft_lengths: list[int] = field(default_factory=list)  # k chosen each round (0: plain)
    round_s: list[float] = field(default_factory=list)  # each round's wall time, planning to emitted tokens (batches
    plan_s: list[float] = field(default_factory=list)  # of one length); of which choosing the round (and drafting)
    exited: int = 0  # early exit (flashc.early_exit): tokens emitted from the exit layer
    deep_passes: int = 0  # calls of the full model after the prefill that caught up exited tokens
    deep_tokens: int = 0  # tokens those calls fed (exited tokens + the pending one each)
    exits_checked: int = 0  # exited tokens a deep pass then scored with the full model (per sequence)
    exits_agreed: int = 0  # of those, the tokens the full model would have chosen too

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens emitted per speculative round (accepted drafts + the target's own)."""
        if not self.speculative_rounds:
            return None
        return (self.accepted + self.speculative_rounds) / self.speculative_rounds

    @property
    def exit_share(self) -> float | None:
        """Share of the tokens after the first that the exit layer emitted (early exit)."""
        return self.exited / (self.new_tokens - 1) if self.exited and self.new_tokens > 1 else None

    @property
    def tokens_per_deep_pass(self) -> float | None:
        return self.deep_tokens / self.deep_passes if self.deep_passes else None

    @property
    def exit_agreement(self) -> float | None:
        """Share of the scored exited tokens that the full model, fed the same prefix, would have chosen too."""
        return self.exits_agreed / self.exits_checked if self.exits_checked else None

    @property
    def decode_s(self) -> float:
        return self.total_s - self.prefill_s

    @property
    def tokens_per_s(self) -> float | None:
        """New tokens after the first, per second of decoding, per sequence."""
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else None

    @property
    def speedup_vs_plain(self) -> float | None:
        """Decoding time plain steps would have taken (measured step time x tokens) over the
        time taken; None unless a plain step ran in this call and was timed."""
        if self.plain_step_s is None or self.new_tokens <= 1 or self.decode_s <= 0:
            return None
        return self.plain_step_s * (self.new_tokens - 1) / self.decode_s

    def to_dict(self) -> dict:
        keys = ("batch", "prompt_tokens", "new_tokens", "prefill_s", "total_s", "rounds", "speculative_rounds",
                "proposed", "accepted", "plain_step_s", "verify_step_s", "acceptance_rate", "mean_accepted_length",
                "tokens_per_s", "speedup_vs_plain", "exited", "deep_passes", "exit_share", "tokens_per_deep_pass",
                "exit_agreement")
        return {k: getattr(self, k) for k in keys}


def stats_table(stats: GenerationStats):
    """GenerationStats as a rich table (flashc generate, GenerationModel.report)."""
    from rich.table import Table

    t = Table(title="generation", title_justify="left")
    t.add_column("measure")
    t.add_column("value", justify="right")

    def fmt(v, unit=""):
        return "-" if v is None else f"{v:.3f}{unit}" if isinstance(v, float) else f"{v}{unit}"

    rows = [("batch x prompt tokens", f"{stats.batch} x {stats.prompt_tokens}"), ("new tokens", fmt(stats.new_tokens)),
            ("time to first token", fmt(stats.prefill_s * 1e3, " ms")),
            ("decode tokens/s (per sequence)", fmt(stats.tokens_per_s)),
            ("rounds (speculative)", f"{stats.rounds} ({stats.speculative_rounds})"),
            ("drafts kept / verified", f"{stats.accepted} / {stats.proposed}"),
            ("acceptance rate", fmt(stats.acceptance_rate)),
            ("tokens per speculative round", fmt(stats.mean_accepted_length)),
            ("plain step (measured)", fmt(None if stats.plain_step_s is None else stats.plain_step_s * 1e3, " ms")),
            ("verify step (measured)", fmt(None if stats.verify_step_s is None else stats.verify_step_s * 1e3, " ms")),
            ("speedup vs plain steps", fmt(stats.speedup_vs_plain, "x"))]
    if stats.exited or stats.deep_passes:  # early exit ran
        rows += [("tokens from the exit layer", f"{stats.exited} ({fmt(stats.exit_share)})"),
                 ("deep passes (tokens each)", f"{stats.deep_passes} ({fmt(stats.tokens_per_deep_pass)})"),
                 ("exits the full model agrees with", fmt(stats.exit_agreement))]
    for name, value in rows:
        t.add_row(name, value)
    return t


class Emitter:
    """Cuts each round's new tokens [B, n] to max_new_tokens and, once a sequence has emitted
    eos_token_id, fills the rest of it with eos; counts what was produced into stats.

    The bookkeeping runs on the host: a round reads its tokens back once (the loop needs them
    there anyway, to know whether to go on), where a check on the device cost a few small
    kernels a token and a synchronisation besides."""

    def __init__(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None,
                 stats: GenerationStats, device: torch.device) -> None:
        self.max_new_tokens, self.eos_token_id, self.stats = max_new_tokens, eos_token_id, stats
        self.dtype, self.device = input_ids.dtype, device
        self.done = [False] * input_ids.shape[0]
        self.produced = 0
        self.rows: list[list[int]] = []  # the last call's tokens, on the host
        stats.batch, stats.prompt_tokens = input_ids.shape

    def __call__(self, new: torch.Tensor | list[list[int]]) -> torch.Tensor:
        """new: [B, n] tokens (a tensor, or rows on the host) -> the emitted [B, <= n] on the device
        (new itself when it is a tensor that needed no change: no copy back to the device)."""
        left = self.max_new_tokens - self.produced
        given = new.tolist() if isinstance(new, torch.Tensor) else new
        rows = [list(r[:left]) for r in given]
        eos = self.eos_token_id
        if eos is not None:
            for i, row in enumerate(rows):
                if self.done[i]:
                    row[:] = [eos] * len(row)
                elif eos in row:
                    end = row.index(eos)
                    row[end:] = [eos] * (len(row) - end)
                    self.done[i] = True
        self.rows = rows
        self.produced += len(rows[0])
        self.stats.new_tokens = self.produced
        if isinstance(new, torch.Tensor) and new.dtype == self.dtype and rows == given:
            return new
        return torch.tensor(rows, dtype=self.dtype, device=self.device)

    @property
    def finished(self) -> bool:
        """max_new_tokens produced, or every sequence past its end token."""
        return self.produced >= self.max_new_tokens or (self.eos_token_id is not None and all(self.done))


def generate_rounds(steps: Steps, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling, *,
                    eos_token_id: int | None = None, speculator=None,
                    stats: GenerationStats | None = None) -> Iterator[torch.Tensor]:
    """Yields the new tokens of each round, [B, n] (n >= 1), until max_new_tokens or every
    sequence has emitted eos_token_id (after which a sequence's tokens are eos_token_id).

    speculator: None (plain decoding) or a flashc.speculate.Speculator.
    """
    device = steps.device
    ids = input_ids.to(device)
    stats = stats if stats is not None else GenerationStats()
    emit = Emitter(input_ids, max_new_tokens, eos_token_id, stats, device)
    start = time.perf_counter()
    if max_new_tokens == 0:
        return
    logits = steps.feed(ids, 0)
    pending = emit(sampling.next(logits)[:, None])
    sync(device)
    stats.prefill_s = time.perf_counter() - start
    yield pending
    tokens = torch.cat([ids.to(input_ids.dtype), pending], 1)
    rows = [prompt + new for prompt, new in zip(input_ids.tolist(), emit.rows)]  # the same on the host
    while not emit.finished:
        length = tokens.shape[1]  # the pending token sits at length - 1
        room = min(steps.cache_len - length, max_new_tokens - emit.produced - 1)
        round_start = time.perf_counter()
        plan = speculator.plan(tokens, room, sampling, rows) if speculator is not None else None
        stats.plan_s.append(time.perf_counter() - round_start)
        stats.rounds += 1
        if plan is None:
            stats.draft_lengths.append(0)
            t = time.perf_counter()
            logits = steps.feed(tokens[:, -1:], length - 1)
            new = emit(sampling.next(logits)[:, None])  # reads the tokens back: the step is done
            if speculator is not None:
                speculator.observe_plain(time.perf_counter() - t, emit.rows)
        else:
            new, accepted = speculator.verify(steps, tokens, plan, sampling)
            new = emit(new)
            stats.speculative_rounds += 1
            stats.proposed += plan.k
            stats.accepted += accepted
            stats.draft_lengths.append(plan.k)
        tokens = torch.cat([tokens, new], 1)
        for row, more in zip(rows, emit.rows):
            row.extend(more)
        stats.round_s.append(time.perf_counter() - round_start)
        yield new
    sync(device)
    stats.total_s = time.perf_counter() - start
    if speculator is not None:
        stats.plain_step_s, stats.verify_step_s = speculator.learned.timing.plain, speculator.learned.timing.verify


def generate(step: Step | Steps, input_ids: torch.Tensor, max_new_tokens: int,
             kv_cache: Sequence[torch.Tensor] | None = None, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | None = None, progress: bool = False, speculator=None,
             on_tokens: Callable[[torch.Tensor], None] | None = None,
             stats: GenerationStats | None = None, early_exit=None) -> torch.Tensor:
    """input_ids[B, P] -> [B, P + n] with n <= max_new_tokens new tokens.

    step: a one-token decode step (with its kv_cache) or a Steps. The prompt goes through
    the largest steps there are (one token a call when there is only the decode step).
    on_tokens(new[B, n]) is called after every round with the tokens it produced.
    Stops early once every sequence has produced eos_token_id. early_exit: None or a
    flashc.early_exit.EarlyExitModel, whose rounds then replace generate_rounds (lossy, greedy).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise InputError(f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    steps = step if isinstance(step, Steps) else Steps({1: step}, kv_cache)
    prompt_len = input_ids.shape[1]
    if prompt_len + max_new_tokens > steps.cache_len:
        raise InputError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens does not fit the static "
                         f"KV cache of {steps.cache_len} positions; compile with a larger cache_len "
                         f"(flashc compile ... --signature decode --cache-len N)")
    if input_ids.shape[0] != steps.batch:
        raise InputError(f"input_ids has batch {input_ids.shape[0]} but the KV cache holds {steps.batch} sequences")
    sampling = Sampling.make(temperature, top_k, top_p, seed, steps.device)
    out = [input_ids.to(steps.device)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_new_tokens, desc="generate", unit="tok")
    if early_exit is not None:
        rounds = early_exit.rounds(steps, input_ids, max_new_tokens, sampling, eos_token_id=eos_token_id, stats=stats)
    else:
        rounds = generate_rounds(steps, input_ids, max_new_tokens, sampling, eos_token_id=eos_token_id,
                                 speculator=speculator, stats=stats)
    for new in rounds:
        out.append(new)
        if on_tokens is not None:
            on_tokens(new)
        if bar is not None:
            bar.update(new.shape[1])
    if bar is not None:
        bar.close()
    return torch.cat(out, 1)

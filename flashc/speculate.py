"""Speculative decoding: draft tokens cheaply, check them in one call of the target, keep
exactly what the target itself would have produced.

A round (flashc.generate.generate_rounds) feeds the pending token and k drafted tokens to
the target's verify step, which returns the target's logits at all k + 1 positions;
`accept` keeps the drafts the target agrees with and adds one token of the target's own,
so a round emits between 1 and k + 1 tokens for one call of the target.

Drafters (`propose(tokens, k, sampling, rows=None) -> Plan | None`; tokens [B, L] on the device,
rows the same sequences on the host when the caller keeps them, for a drafter that works there):
- `NgramDrafter`: prompt lookup. The continuation of the latest earlier occurrence of the
  sequence's last n tokens (n = 3, 2, 1), from an index updated as tokens arrive. No model.
- `ModelDrafter`: a smaller compiled model with the same tokenizer, run autoregressively
  on its own KV cache (k one-token steps), which it brings up to date lazily.
- `flashc.draft_head.HeadDrafter`: a small head on the target's own last hidden state (EAGLE-style).

`Speculator` picks k each round from the measured acceptance and the measured times of a
plain step, a verify step and a draft step, and turns speculation off (k = 0, a plain step)
while it would be slower, probing again now and then (less often each time a probe fails; a
model drafter probes with one draft, and in greedy decoding, once a verify round has been timed,
without one: its draft is checked against the token a plain step picks). Acceptance is estimated per class of
the drafter's evidence (prompt lookup: how long an n-gram matched), since a 3-gram match in a
passage being copied is kept far more often than a 1-gram match in free text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from flashc.errors import InputError
from flashc.generate import Sampling, Steps, sync


@dataclass
class Plan:
    """k drafted tokens per sequence and, for sampled drafts, the distributions they came from."""

    drafts: torch.Tensor  # [B, k]; a cheap drafter's stay on the host until Speculator.plan verifies them
    q: torch.Tensor | None = None  # [B, k, V]; None: drafts were chosen deterministically
    evidence: int = 0  # the drafter's class of confidence (ngram: the n-gram length matched); acceptance
    # is estimated per class
    host: list[list[int]] | None = None  # the drafts on the host too, when the drafter made them there

    @property
    def k(self) -> int:
        return self.drafts.shape[1]


def accept(logits: torch.Tensor, plan: Plan, sampling: Sampling) -> tuple[torch.Tensor, int]:
    """Given the target's logits [B, k + 1, V] at the pending token and each draft, the tokens
    to emit [B, n + 1] and n, the drafts kept (the same n for every sequence).

    Greedy: a draft is kept while it equals the target's argmax; the last token is the argmax
    after the kept drafts, so the output is token for token plain greedy decoding.
    Sampled (speculative sampling, Leviathan et al. 2023): draft i is kept with probability
    min(1, p_i(d) / q_i(d)) and the first rejected one is replaced by a draw from the residual
    max(p_i - q_i, 0), renormalized; after k kept drafts a bonus token is drawn from p_k. Each
    emitted token is then distributed as the target's p given the tokens before it. With a
    batch, every sequence emits the same number of tokens, n + 1, n being the fewest drafts any
    sequence kept: each emits what it would alone up to position n (its kept drafts, then at n
    its draft if it kept it, else its residual draw) and stops there. Whether a sequence
    emits a token at position i depends on the others (independent of it) and on its own tests
    before i, exactly as alone, so each emitted token keeps the target's distribution
    (tests/test_generation.py checks it with a chi-square test, batch 1 and 4). Drawing from
    p_n for a sequence that kept draft n would not: it mixes residual and p by the outcome of
    that sequence's own test at n.
    """
    drafts, k = plan.drafts, plan.k
    if sampling.greedy:
        rows, n = accept_greedy(logits, plan)
        return torch.tensor(rows, dtype=drafts.dtype, device=drafts.device), n
    p = sampling.probs(logits)
    p_drafts = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    q_drafts = plan.q.gather(-1, drafts[..., None]).squeeze(-1) if plan.q is not None else torch.ones_like(p_drafts)
    u = torch.rand(p_drafts.shape, generator=sampling.generator, device=p.device)
    kept = (u * q_drafts < p_drafts).int().cumprod(-1).sum(-1)
    n = int(kept.min())
    if n == k:  # every sequence kept every draft: a bonus token from p_k
        final = sampling.draw(p[:, k])
    else:  # a sequence that refused draft n draws from the residual there; one that kept it keeps it
        q_n = plan.q[:, n] if plan.q is not None else torch.nn.functional.one_hot(drafts[:, n], p.shape[-1]).float()
        residual = (p[:, n] - q_n).clamp_min(0)
        total = residual.sum(-1, keepdim=True)
        residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p[:, n])
        final = torch.where(kept > n, drafts[:, n], sampling.draw(residual))
    return torch.cat([drafts[:, :n], final[:, None]], 1), n


def accept_greedy(logits: torch.Tensor, plan: Plan) -> tuple[list[list[int]], int]:
    """accept()'s greedy rule on the host: the tokens to emit, as rows, and n. The target's
    choices come back in one copy (the round's one synchronisation); the drafts too unless the
    plan has them on the host already."""
    target = logits.argmax(-1).tolist()
    drafts = plan.host if plan.host is not None else plan.drafts.tolist()
    kept = []
    for d, t in zip(drafts, target):
        i = 0
        while i < len(d) and d[i] == t[i]:
            i += 1
        kept.append(i)
    n = min(kept)
    return [d[:n] + [t[n]] for d, t in zip(drafts, target)], n


class NgramDrafter:
    """Prompt lookup: propose what followed the latest earlier occurrence of the last n tokens."""

    name = "ngram"
    cheap = True  # proposing costs nothing next to a step: propose first, then choose how many to verify
    MAX_EVIDENCE = 8  # a match's length is measured up to this (the plan's evidence)

    def __init__(self, max_ngram: int = 3) -> None:
        if max_ngram < 1:
            raise InputError(f"ngram: max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self.reset()

    def reset(self) -> None:
        self.rows: list[list[int]] = []  # host copy of every sequence
        self.index: list[dict[tuple[int, ...], int]] = []  # per sequence: n-gram -> end of latest occurrence

    def _extend(self, i: int, new: list[int]) -> None:
        """Append sequence i's new tokens to its host copy and its n-gram index."""
        while len(self.rows) <= i:
            self.rows.append([])
            self.index.append({})
        row, index = self.rows[i], self.index[i]
        for tok in new:
            row.append(tok)
            end = len(row) - 1  # a gram ending here has its continuation row[end]
            for n in range(1, self.max_ngram + 1):
                if end - n >= 0:
                    index[tuple(row[end - n:end])] = end

    def lookup(self, i: int, sequence: list[int], k: int) -> tuple[list[int], int] | None:
        """Sequence i's (up to k drafts, n-gram length matched), or None without a match; the
        sequence only grows between calls."""
        have = len(self.rows[i]) if i < len(self.rows) else 0
        self._extend(i, sequence[have:])
        row, index = self.rows[i], self.index[i]
        for n in range(self.max_ngram, 0, -1):
            end = index.get(tuple(row[-n:])) if len(row) > n else None
            if end is not None:
                while n < self.MAX_EVIDENCE and end - n - 1 >= 0 and row[end - n - 1] == row[-n - 1]:
                    n += 1  # how far back the match goes: a long one is a passage being copied
                return row[end:end + k], n
        return None

    def propose(self, tokens: torch.Tensor, k: int, sampling: Sampling,
                rows: list[list[int]] | None = None) -> Plan | None:
        have = len(self.rows[0]) if self.rows else 0
        found, matched = [], []
        news = [row[have:] for row in rows] if rows is not None else tokens[:, have:].tolist()
        for i, new in enumerate(news):
            self._extend(i, new)
        for i, row in enumerate(self.rows[:tokens.shape[0]]):
            match = self.lookup(i, row, k)
            if match is None:
                return None  # one sequence without a match would keep nothing for all
            found.append(match[0])
            matched.append(match[1])
        k = min(len(f) for f in found)
        host = [f[:k] for f in found]
        drafts = torch.tensor(host, dtype=tokens.dtype)  # on the host: the plan may be declined (Speculator.plan)
        return Plan(drafts, evidence=min(matched), host=host)

    def accepted(self, length: int, n: int) -> None:
        pass


class ModelDrafter:
    """A smaller model's compiled steps, with its own KV cache, drafting k tokens a round."""

    name = "draft"
    cheap = False  # k steps of the draft model: choose k first

    def __init__(self, steps: Steps, vocab_size: int) -> None:
        self.steps = steps
        self.vocab_size = vocab_size  # the target's: draft logits are cut or padded to it
        self.fed = 0  # positions of the draft's cache that hold the sequence

    def reset(self) -> None:
        self.fed = 0

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        v = logits.shape[-1]
        if v > self.vocab_size:  # padding rows past the shared vocabulary: never proposed
            return logits[..., :self.vocab_size]
        if v < self.vocab_size:
            return torch.nn.functional.pad(logits, (0, self.vocab_size - v), value=float("-inf"))
        return logits

    def propose(self, tokens: torch.Tensor, k: int, sampling: Sampling, rows=None) -> Plan:
        length = tokens.shape[1]
        if length + k - 1 > self.steps.cache_len:
            raise InputError(f"the draft model's KV cache of {self.steps.cache_len} positions is shorter than the "
                             f"sequence ({length + k - 1} tokens); compile the drafter with a cache_len at least "
                             "the target's")
        logits = self._fit(self.steps.feed(tokens[:, self.fed:], self.fed))
        self.fed = length
        drafts, qs = [], []
        for i in range(k):
            d, q = sampling.draft(logits)
            drafts.append(d)
            if q is not None:
                qs.append(q)
            if i + 1 < k:
                logits = self._fit(self.steps.feed(d[:, None].to(tokens.dtype), self.fed))
                self.fed += 1
        return Plan(torch.stack(drafts, 1).to(tokens.dtype), torch.stack(qs, 1) if qs else None)

    def accepted(self, length: int, n: int) -> None:
        """The round that began at `length` kept n drafts: the draft's cache holds the sequence
        up to position length + n - 1 at most (later slots hold rejected drafts)."""
        self.fed = min(self.fed, length + n)


@dataclass
class Timing:
    """Measured seconds (moving averages): a plain round, a verify round, one draft step."""

    plain: float | None = None
    verify: float | None = None
    draft: float = 0.0

    @staticmethod
    def mix(old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new


PROBE_EVERY = 16  # plain rounds before a speculative probe while speculation is off


@dataclass
class Learned:
    """What a Speculator measured: step times, acceptance per class of evidence, and how long
    it waits before probing again. GenerationModel keeps one per drafter, draft length, kind of
    sampling and adaptive or not across its generate() calls, so a drafter found not to pay on one prompt is not
    probed from scratch on every prompt after it (on an H100, smollm2-135m, 96 new tokens a
    prompt, three probes an answer cost a head drafter 4-5% against plain decoding)."""

    timing: Timing = field(default_factory=Timing)
    counts: dict[int, list[float]] = field(default_factory=dict)  # evidence -> decayed [kept, rejections]
    idle: int = 0  # plain rounds since the last probe
    probe_every: int = PROBE_EVERY


class Speculator:
    """Chooses each round's draft length and runs the round; see the module docstring.

    max_draft: the most drafts a round verifies (the verify step's tokens - 1).
    adaptive: choose k in 0..max_draft by expected tokens per second (k = 0 is a plain step);
    else always max_draft (when the drafter has that many).
    learned: measurements of earlier calls with this drafter to start from (see Learned); its
    fields are updated in place.
    """

    PROBE_EVERY = PROBE_EVERY
    PROBE_EVERY_MAX = 256  # the wait doubles after each probe that leaves speculation off, up to this

    def __init__(self, drafter, max_draft: int, adaptive: bool = True, learned: Learned | None = None) -> None:
        if max_draft < 1:
            raise InputError(f"speculation needs a draft length >= 1, got {max_draft}")
        self.drafter = drafter
        self.max_draft = max_draft
        self.adaptive = adaptive
        self.learned = learned if learned is not None else Learned()
        self.last_evidence = 0
        # a declined plan's first drafts (host list, or a tensor [B] for a model drafter's), evidence
        self.shadow: tuple[list[int | None] | torch.Tensor, int] | None = None
        self.probing = False  # the last choose() was a probe, not a choice
        self.drafter.reset()

    def reset(self) -> None:
        """Forget what was measured (and the drafter's state)."""
        self.learned = Learned()
        self.last_evidence = 0
        self.shadow = None
        self.drafter.reset()

    def acceptance(self, evidence: int = 0) -> float:
        """Estimated chance that a draft of this class is kept, given the ones before it were."""
        kept, refused = self.learned.counts.get(evidence, (1.0, 1.0))
        return kept / (kept + refused)

    def choose(self, limit: int, evidence: int = 0) -> int:
        self.probing = False
        if not self.adaptive:
            return limit
        t = self.learned.timing
        if t.plain is None:
            return 0  # time a plain step first
        if t.verify is None:
            self.probing = True
            return self._probe(limit)
        a = self.acceptance(evidence)
        best, best_rate = 0, 1.0 / t.plain
        expected, kept = 1.0, 1.0  # tokens a round of k drafts emits: 1 + a + ... + a^k
        for k in range(1, limit + 1):
            kept *= a
            expected += kept
            rate = expected / (t.verify + k * t.draft)
            if rate > best_rate:
                best, best_rate = k, rate
        if best > 0:
            self.learned.probe_every = self.PROBE_EVERY
            return best
        learned = self.learned
        learned.idle += 1
        if learned.idle >= learned.probe_every:  # conditions change (a passage to copy, a lower temperature)
            learned.idle = 0
            learned.probe_every = min(2 * learned.probe_every, self.PROBE_EVERY_MAX)
            self.probing = True
            return self._probe(limit)
        return 0

    def _probe(self, limit: int) -> int:
        """A round that measures rather than pays: all the drafts a cheap drafter has (they cost nothing),
        one draft of a drafter that runs a model (each draft is a step of it; a verify step costs the same
        whatever k, its shape being static). On an H100 a layerskip drafter whose drafts were almost never
        kept, probing with k = 5, decoded at 0.48-0.64x plain (how much of that the probes cost was not
        measured)."""
        return limit if self.drafter.cheap else 1

    def plan(self, tokens: torch.Tensor, room: int, sampling: Sampling,
             rows: list[list[int]] | None = None) -> Plan | None:
        """This round's drafts, or None for a plain step. rows: tokens on the host, if the caller has them."""
        limit = min(self.max_draft, room)
        if limit < 1:
            return None
        self.shadow = None
        if self.drafter.cheap:  # see what the drafter has, then decide how much of it to verify
            plan = self.drafter.propose(tokens, limit, sampling, rows)
            if plan is None:
                return None
            k = self.choose(plan.k, plan.evidence)
            if k < 1:
                if plan.host is not None and plan.q is None:
                    self.declined([h[0] for h in plan.host], plan.evidence)
                return None
            return Plan(plan.drafts[:, :k].to(tokens.device), None if plan.q is None else plan.q[:, :k], plan.evidence,
                        None if plan.host is None else [h[:k] for h in plan.host])
        k = self.choose(limit)
        if k < 1:
            return None
        shadow = self.probing and self.learned.timing.verify is not None and sampling.greedy
        start = time.perf_counter()
        plan = self.drafter.propose(tokens, 1 if shadow else k, sampling, rows)
        if plan is not None and not self.drafter.cheap:  # a drafter that runs a model (draft model or head)
            sync(tokens.device)
            timing = self.learned.timing
            timing.draft = Timing.mix(timing.draft or None, (time.perf_counter() - start) / plan.k)
        if shadow and plan is not None:
            # a probe at the price of one draft instead of a verify round: the draft is kept exactly when it is
            # the token the plain step picks (greedy). On an H100 a verify round of smollm2-135m cost 1.6-2 plain
            # steps, so three probes an answer made a drafter that never paid 3-6% slower than plain decoding
            self.shadow = (plan.drafts[:, 0], 0)
            return None
        return plan

    def declined(self, firsts: list[int | None], evidence: int) -> None:
        """This round's deterministic plan (each sequence's first draft, None for a sequence without
        one) was declined for a plain step: observe_plain scores it against the token that step chose."""
        self.shadow = (firsts, evidence)

    def observe_plain(self, seconds: float, emitted: list[list[int]] | None = None) -> None:
        """A plain round took `seconds` and emitted these tokens (rows on the host, when the caller has them).

        A cheap drafter's plan declined this round is scored for free: its first draft against the
        token the plain step chose, one observation of that evidence's acceptance (sampled too: a
        deterministic draft d is kept with probability p(d), the chance the plain step draws d;
        a sequence without a draft, None, or that emitted nothing is left out). Without it a
        class judged poor stays so until a probe (16 plain rounds, then 32, ...), though the text
        may have turned to copying its prompt: on an H100 (smollm2-135m, passage prompts, 8 drafts)
        adaptive speculation ran at 1.71x plain decoding where verifying every plan ran at 2.15x."""
        self.learned.timing.plain = Timing.mix(self.learned.timing.plain, seconds)
        if self.shadow is not None and emitted is not None:
            firsts, evidence = self.shadow
            if isinstance(firsts, torch.Tensor):  # read back only now, after the plain step
                firsts = firsts.tolist()
            kept = all(row[0] == d for row, d in zip(emitted, firsts) if d is not None and row)
            self.observe_row(1, int(kept), evidence)
        self.shadow = None

    def verify(self, steps: Steps, tokens: torch.Tensor, plan: Plan,
               sampling: Sampling) -> tuple[torch.Tensor | list[list[int]], int]:
        """One call of the target over the pending token and the drafts; returns the tokens to
        emit [B, n + 1] (greedy: rows on the host) and n, the drafts kept."""
        length = tokens.shape[1]
        start = time.perf_counter()
        ids = torch.cat([tokens[:, -1:], plan.drafts], 1)
        logits = steps.feed(ids, length - 1, all_logits=True)
        # n is read on the host: the device is done after this
        new, n = accept_greedy(logits, plan) if sampling.greedy else accept(logits, plan, sampling)
        self.observe_verify(time.perf_counter() - start)
        self.observe_row(plan.k, n, plan.evidence)
        self.drafter.accepted(length, n)
        return new, n

    def observe_row(self, drafted: int, kept: int, evidence: int) -> None:
        """A sequence verified `drafted` drafts of this evidence and kept `kept`."""
        if drafted:
            counts = self.learned.counts.setdefault(evidence, [1.0, 1.0])
            counts[0] = 0.9 * counts[0] + kept
            counts[1] = 0.9 * counts[1] + (1 if kept < drafted else 0)

    def observe_verify(self, seconds: float) -> None:
        self.learned.timing.verify = Timing.mix(self.learned.timing.verify, seconds)

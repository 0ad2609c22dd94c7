"""Early exit: emit a token after the model's first E layers when the exit is confident enough.

    ee = flashc.early_exit.prepare_early_exit(model, gm, "8", calibration="builtin")  # gm: the full model, compiled
    out, stats = gm.generate(prompt_ids, 64, early_exit=ee, return_stats=True)
    gm.generate(prompt_ids, 64, early_exit="8:0.9")                  # a zoo model: exit after layer 8 at tau 0.9
    rows = flashc.early_exit.calibrate(model, [6, 10, 15], tokens)   # tau and the share that exits, per layer
    quality = flashc.early_exit.evaluate(model, 10, rows[1].threshold, eval_ids)

Per token, the first E decoder layers run with the model's final norm and LM head on top (the
cut model of flashc.layerskip, compiled as its own one-token entry). When the exit's
confidence, the largest softmax probability of its logits (or the gap between the two
largest: CALM, Schuster et al. 2022, arXiv:2207.07061), reaches a calibrated threshold tau,
the exit's argmax is emitted and layers E..N-1 do not run. Their keys and values for the
exited positions are computed later, in one call of the full model's verify entry that also
feeds the next token the exit is not confident about, whose successor the full model then
chooses: EE-LLM's KV recomputation (Chen et al. 2023, arXiv:2312.04916). The cut model writes
layers 0..E-1 of the full model's own KV cache (the same tensors), so the prompt goes through
the full model once and the deep pass rewrites those layers with the same values.

Unlike speculation (flashc.speculate), exited tokens are kept whether or not the full model
would have chosen them: the output can differ from plain decoding, so early exit is opt-in and
its quality change is measured. tau is the smallest threshold at which the exit's confident
argmax agrees with the full model's at a target rate (default 99%) on calibration text,
teacher forced (`calibrate`); `evaluate` scores the early-exit predictor's perplexity (exit
logits where confident, the full model's elsewhere) against the full model's. Both are exact
for generation: the exit at position t reads only layers 0..E-1, which never depend on the
deep layers, and the deep pass gives the full model every position's KV before it predicts,
so the teacher-forced predictor is the one generation runs (up to the deferral limit below).

A deep pass feeds at most max_deferred exited tokens plus one (by default the verify entry's
k + 1): once max_deferred tokens wait, the next token comes from the full model whatever the
exit's confidence. Greedy only; a batch exits a token only where every sequence is confident.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from flashc.errors import InputError
from flashc.generate import Emitter, GenerationStats, Sampling, Steps, sync

DEFAULT_AGREEMENT = 0.99  # CALM's consistency targets run 0.8-0.99 of tokens; 0.99 keeps text close to plain


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """The largest softmax probability of each row of logits [..., V] (float32)."""
    return torch.softmax(logits.float(), -1).amax(-1)


def prob_margin(logits: torch.Tensor) -> torch.Tensor:
    """The gap between the two largest softmax probabilities of each row (CALM's "softmax response")."""
    top = torch.softmax(logits.float(), -1).topk(2, -1).values
    return top[..., 0] - top[..., 1]


CONFIDENCE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"max_prob": max_prob, "margin": prob_margin}


@dataclass(frozen=True)
class EarlyExit:
    """Where to exit and when: after decoder layer `layer` (1..N-1), where confidence >=
    threshold (None: calibrated to `agreement`, the share of confident exits whose argmax is
    the full model's). max_deferred: exited tokens one deep pass catches up (None: the verify
    entry's drafts)."""

    layer: int
    threshold: float | None = None
    agreement: float = DEFAULT_AGREEMENT
    confidence: str = "max_prob"
    max_deferred: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise InputError(f"early exit: layer must be an int >= 1 (decoder layers run before the exit), "
                             f"got {self.layer!r}")
        if self.threshold is not None and (math.isnan(self.threshold) or self.threshold < 0):
            raise InputError(f"early exit: threshold must be >= 0 (a confidence; inf: never exit), got "
                             f"{self.threshold!r}")
        if not 0 < self.agreement <= 1:
            raise InputError(f"early exit: agreement must be in (0, 1], got {self.agreement!r}")
        if self.confidence not in CONFIDENCE:
            raise InputError(f"early exit: confidence must be one of {', '.join(CONFIDENCE)}, got "
                             f"{self.confidence!r}")
        if self.max_deferred is not None and self.max_deferred < 1:
            raise InputError(f"early exit: max_deferred must be >= 1, got {self.max_deferred!r}")

    @classmethod
    def parse(cls, spec: "str | int | EarlyExit") -> "EarlyExit":
        """'E', 'E:TAU' or 'layer:E[:TAU]' (CLI --early-exit); an int is E; an EarlyExit is itself."""
        if isinstance(spec, EarlyExit):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls(spec)
        if not isinstance(spec, str):
            raise InputError(f"early_exit must be 'E', 'E:TAU', an EarlyExit or an EarlyExitModel, got "
                             f"{type(spec).__name__}")
        parts = spec.split(":")
        if parts[0] == "layer":
            parts = parts[1:]
        try:
            if not 1 <= len(parts) <= 2:
                raise ValueError
            layer = int(parts[0])
            threshold = float(parts[1]) if len(parts) == 2 else None
        except ValueError:
            raise InputError(f"early_exit={spec!r}: give the exit layer and optionally the threshold, 'E' or "
                             "'E:TAU' (e.g. '8' or '8:0.9')") from None
        return cls(layer, threshold)

    def describe(self) -> str:
        tau = "calibrated" if self.threshold is None else f"{self.threshold:.4g}"
        return f"exit after layer {self.layer}, {self.confidence} >= {tau}"


# -- calibration and quality, teacher forced on the eager model -----------------------------


@torch.no_grad()
def exit_and_full_logits(model: torch.nn.Module, ids: torch.Tensor,
                         layers: Sequence[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One forward of the Hugging Face causal LM over ids [B, T]: the logits of each exit
    (layer E's output through the final norm and LM head, as flashc.layerskip.early_exit_model
    computes them) and the full model's."""
    out = model(ids, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states  # [embeddings, layer 0's output, ...]
    return {e: model.lm_head(model.model.norm(hidden[e])) for e in layers}, out.logits


def smallest_threshold(confidence: torch.Tensor, agrees: torch.Tensor, agreement: float) -> float:
    """The smallest tau such that the tokens with confidence >= tau agree at least `agreement`
    of the time (inf when no threshold does: never exit)."""
    order = confidence.argsort(descending=True)
    conf, ok = confidence[order], agrees[order].double()
    rate = ok.cumsum(0) / torch.arange(1, len(ok) + 1, dtype=torch.float64)
    last_of_value = torch.ones(len(conf), dtype=torch.bool)  # a threshold takes every tie of its value
    last_of_value[:-1] = conf[1:] != conf[:-1]
    meets = (rate >= agreement) & last_of_value
    if not bool(meets.any()):
        return math.inf
    return float(conf[int(meets.nonzero().max())])


@dataclass(frozen=True)
class Calibration:
    """calibrate's answer for one exit layer, over the calibration tokens (teacher forced)."""

    layer: int
    threshold: float  # inf: no threshold reaches the agreement
    target: float  # the agreement asked for
    agreement: float | None  # reached by the confident tokens (None: none is confident)
    exit_share: float  # share of the tokens confident enough to exit
    argmax_agreement: float  # share of all tokens whose exit argmax is the full model's
    tokens: int
    confidence: str

    def row(self) -> list[str]:
        reached = "-" if self.agreement is None else f"{self.agreement:.3f}"
        return [str(self.layer), f"{self.threshold:.6f}", f"{self.exit_share:.1%}", reached,
                f"{self.argmax_agreement:.1%}"]


def calibration_tokens(calibration: Any = "builtin", tokenizer=None, vocab_size: int | None = None) -> torch.Tensor:
    """The token stream flashc.compile's calibration takes ('builtin', a file, ids), as int64 [n]."""
    from flashc.passes.quantize.calibration import resolve_calibration

    data = resolve_calibration(calibration, tokenizer, vocab_size)
    if data.tokens is None:
        raise InputError(f"early exit: calibration needs a token stream, got {data.description}")
    return data.tokens


def calibrate(model: torch.nn.Module, layers: int | Sequence[int], tokens: torch.Tensor, *,
              agreement: float = DEFAULT_AGREEMENT, confidence: str = "max_prob", window: int = 256,
              max_tokens: int = 4096) -> list[Calibration]:
    """Teacher forced over tokens (int64 [n], cut into windows of `window`; beyond max_tokens,
    windows spread evenly over the stream, so a text of prose then code gives both), each
    exit's confidence and whether its argmax equals the full model's; per layer the smallest
    threshold whose confident tokens agree at `agreement` (smallest_threshold)."""
    from flashc.layerskip import check_exit_layer

    layers = [layers] if isinstance(layers, int) else sorted(set(layers))
    for layer in layers:
        check_exit_layer(model, layer)
    EarlyExit(layers[0], agreement=agreement, confidence=confidence)  # checks the options
    measure = CONFIDENCE[confidence]
    tokens = tokens.reshape(-1).long()
    if tokens.numel() < 2:
        raise InputError(f"early exit: calibration needs at least 2 tokens, got {tokens.numel()}")
    starts = list(range(0, tokens.numel(), window))
    if tokens.numel() > max_tokens:
        count = max(1, max_tokens // window)
        starts = torch.linspace(0, tokens.numel() - window, count).long().tolist()
    device = next(model.parameters()).device
    conf = {e: [] for e in layers}
    agree = {e: [] for e in layers}
    for start in starts:
        ids = tokens[start:start + window][None].to(device)
        exits, full = exit_and_full_logits(model, ids, layers)
        want = full.argmax(-1)
        for e, logits in exits.items():
            conf[e].append(measure(logits).reshape(-1).cpu())
            agree[e].append((logits.argmax(-1) == want).reshape(-1).cpu())
    rows = []
    for e in layers:
        c, a = torch.cat(conf[e]), torch.cat(agree[e])
        tau = smallest_threshold(c, a, agreement)
        confident = c >= tau
        reached = float(a[confident].double().mean()) if bool(confident.any()) else None
        rows.append(Calibration(e, tau, agreement, reached, float(confident.double().mean()),
                                float(a.double().mean()), c.numel(), confidence))
    return rows


@dataclass(frozen=True)
class ExitQuality:
    """Teacher-forced perplexity of the full model and of the early-exit predictor (the exit's
    logits where it is confident, the full model's elsewhere) over the same scored tokens."""

    layer: int
    threshold: float
    ppl_full: float
    ppl_early_exit: float
    exit_share: float  # of the scored tokens' predictions
    argmax_agreement: float  # the predictor's argmax = the full model's, over the scored tokens
    tokens: int

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change of the early-exit predictor over the full model's."""
        return self.ppl_early_exit / self.ppl_full - 1


@torch.no_grad()
def evaluate(model: torch.nn.Module, layer: int, threshold: float, token_ids: torch.Tensor, *,
             confidence: str = "max_prob", window: int = 256, stride: int = 128,
             limit: int | None = None) -> ExitQuality:
    """Sliding-window perplexity (flashc.evaluation's window plan: each token scored once) of
    the full model and of the early-exit predictor at (layer, threshold)."""
    from flashc.evaluation import perplexity_windows
    from flashc.layerskip import check_exit_layer

    check_exit_layer(model, layer)
    measure = CONFIDENCE[EarlyExit(layer, threshold, confidence=confidence).confidence]
    ids = token_ids.reshape(-1).long()
    plan = perplexity_windows(ids.numel(), window, stride)[:limit]
    device = next(model.parameters()).device
    nll_full = nll_exit = 0.0
    exited = agreed = scored = 0
    for start, first, end in plan:
        chunk = ids[start:start + window][None].to(device)
        exits, full = exit_and_full_logits(model, chunk, [layer])
        at = slice(first - 1 - start, end - 1 - start)  # target t is predicted at t - 1
        full, exit_logits = full[0, at].double(), exits[layer][0, at].double()
        confident = measure(exit_logits) >= threshold
        mixed = torch.where(confident[:, None], exit_logits, full)
        targets = ids[first:end].to(device)[:, None]
        nll_full -= float(torch.log_softmax(full, -1).gather(-1, targets).sum())
        nll_exit -= float(torch.log_softmax(mixed, -1).gather(-1, targets).sum())
        exited += int(confident.sum())
        agreed += int((mixed.argmax(-1) == full.argmax(-1)).sum())
        scored += end - first
    if scored == 0:
        raise InputError("early exit: evaluate needs at least 2 tokens")
    return ExitQuality(layer, threshold, math.exp(nll_full / scored), math.exp(nll_exit / scored), exited / scored,
                       agreed / scored, scored)


# -- the runtime ----------------------------------------------------------------------------


def check_target(gm, rule: EarlyExit) -> None:
    """That gm (the full model's GenerationModel) can run the rule: no recurrent states, no
    ragged positions, a verify entry for the deep passes, the layer inside the model."""
    if gm.stateful:
        raise InputError("early exit: this model has state-space layers (attention -> SSM), whose states a "
                         "deferred deep pass cannot fill in later; generate without early_exit")
    if gm.ragged:
        raise InputError("early exit: ragged batches (a position per sequence) are not supported; compile the "
                         "model without ragged=True")
    if gm.draft_len is None:
        raise InputError("early exit: the model has no verify entry for the deep passes; compile it with "
                         "compile_generation(..., draft_len=K) or `flashc compile --signature generate "
                         "--draft-len K`")
    layers = len(gm.decode.inputs[2:]) // 2
    if not 1 <= rule.layer <= layers - 1:
        raise InputError(f"early exit: layer must be in 1..{layers - 1} (the model has {layers} decoder layers), "
                         f"got {rule.layer}")
    if rule.max_deferred is not None and rule.max_deferred > gm.draft_len:
        raise InputError(f"early exit: max_deferred={rule.max_deferred}, but a deep pass through the "
                         f"verify entry feeds at most {gm.draft_len} exited tokens (draft_len)")


class EarlyExitModel:
    """What generate(..., early_exit=) runs: the compiled cut model (the first `layer` layers,
    the final norm and the LM head: flashc.layerskip.compile_layerskip) and the rule, its
    threshold resolved. calibration: how the threshold was chosen, when it was calibrated."""

    def __init__(self, rule: EarlyExit, shallow, calibration: Calibration | None = None) -> None:
        if rule.threshold is None:
            raise InputError("early exit: EarlyExitModel needs a threshold; calibrate it (prepare_early_exit)")
        self.rule = rule
        self.shallow = shallow  # a flashc.generation.GenerationModel
        self.calibration = calibration
        self._steps: tuple[Steps, Steps] | None = None  # (the full model's Steps, the cut model's on its cache)
        self.max_deferred: int | None = None  # exited tokens a deep pass catches up, once checked (check_target)

    @property
    def layer(self) -> int:
        return self.rule.layer

    @property
    def threshold(self) -> float:
        return self.rule.threshold

    def check_target(self, gm) -> None:
        """That gm (the full model's GenerationModel) can run this exit (check_target) with this
        cut model, whose KV cache must be gm's first layers'."""
        check_target(gm, self.rule)
        self.max_deferred = self.rule.max_deferred or gm.draft_len
        mine = [(s.shape, s.dtype) for s in self.shallow.decode.inputs[2:]]
        full = [(s.shape, s.dtype) for s in gm.decode.inputs[2:2 + 2 * self.layer]]
        if mine != full or self.shallow.batch != gm.batch:
            raise InputError(f"early exit: the cut model's KV cache ({len(mine) // 2} layers) is not the full "
                             f"model's first {self.layer} layers' (same batch, cache_len and dtype); compile it "
                             "with prepare_early_exit(model, gm, ...)")

    def bind(self, steps: Steps) -> Steps:
        """The cut model's steps over the first layers of the full model's cache (kept per steps)."""
        from flashc.generation import _step_call

        if self._steps is None or self._steps[0] is not steps:
            calls = {cm.inputs[0].shape[1]: _step_call(cm) for cm in self.shallow.entries.values()}
            shallow = Steps(calls, steps.kv_cache[:2 * self.layer], cache_len=steps.cache_len)
            self._steps = (steps, shallow)
        return self._steps[1]

    def rounds(self, steps: Steps, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling, *,
               eos_token_id: int | None = None, stats: GenerationStats | None = None) -> Iterator[torch.Tensor]:
        """Yields each token [B, 1] until max_new_tokens or every sequence's eos: the prompt
        through the full model (its first token the full model's), then per token the exit,
        and a deep pass where the exit is not confident or max_deferred tokens wait."""
        if not sampling.greedy:
            raise InputError("early exit is greedy only (temperature 0): a sampled token has no single exit "
                             "decision to calibrate")
        if self.max_deferred is None:
            raise InputError("early exit: check the EarlyExitModel against the full model first (check_target)")
        shallow = self.bind(steps)
        max_deferred = self.max_deferred
        measure = CONFIDENCE[self.rule.confidence]
        tau = self.rule.threshold
        device = steps.device
        stats = stats if stats is not None else GenerationStats()
        emit = Emitter(input_ids, max_new_tokens, eos_token_id, stats, device)
        start = time.perf_counter()
        if max_new_tokens == 0:
            return
        ids = input_ids.to(device)
        pending = emit(steps.feed(ids, 0).argmax(-1)[:, None])
        sync(device)
        stats.prefill_s = time.perf_counter() - start
        yield pending
        tokens = torch.cat([ids.to(input_ids.dtype), pending], 1)
        deep_fed = tokens.shape[1] - 1  # positions whose every layer's KV is in the cache
        while not emit.finished:
            length = tokens.shape[1]  # the pending token sits at length - 1
            stats.rounds += 1
            exit_logits = shallow.feed(tokens[:, -1:], length - 1)  # writes layers < E at length - 1
            waiting = length - 1 - deep_fed  # exited tokens whose deep KV is still missing
            if waiting < max_deferred and bool((measure(exit_logits) >= tau).all()):
                new = exit_logits.argmax(-1)
                stats.exited += 1
            else:
                logits = steps.feed(tokens[:, deep_fed:], deep_fed, all_logits=True)
                if waiting:  # the full model's choice at each exited position, for the record
                    chosen = logits[:, :waiting].argmax(-1)
                    stats.exits_checked += chosen.numel()
                    stats.exits_agreed += int((chosen == tokens[:, deep_fed + 1:length].to(chosen.device)).sum())
                stats.deep_passes += 1
                stats.deep_tokens += length - deep_fed
                deep_fed = length
                new = logits[:, -1].argmax(-1)
            new = emit(new[:, None])
            tokens = torch.cat([tokens, new], 1)
            yield new
        sync(device)
        stats.total_s = time.perf_counter() - start


def prepare_early_exit(model: torch.nn.Module, gm, rule: "str | int | EarlyExit", *, calibration: Any = "builtin",
                       tokenizer=None, calibration_tokens_max: int = 4096, **compile_kwargs: Any) -> EarlyExitModel:
    """Compile the model's first rule.layer layers for gm (the full model's GenerationModel:
    same target, batch, KV cache, level and profile; only a one-token entry) and, when the rule
    has no threshold, calibrate one on `calibration` (teacher forced, see calibrate; tokenized
    with `tokenizer`, else gm's, else read as UTF-8 bytes for a random-weight model)."""
    from flashc.layerskip import compile_layerskip

    rule = EarlyExit.parse(rule)
    check_target(gm, rule)  # before any work
    found = None
    if rule.threshold is None:
        if tokenizer is None and gm.tokenizer is not None:
            tokenizer = gm.tokenizer
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        tokens = calibration_tokens(calibration, tokenizer, vocab)
        found = calibrate(model, rule.layer, tokens, agreement=rule.agreement, confidence=rule.confidence,
                          max_tokens=calibration_tokens_max)[0]
        rule = EarlyExit(rule.layer, found.threshold, rule.agreement, rule.confidence, rule.max_deferred)
    compile_kwargs.setdefault("level", gm.decode.level)
    compile_kwargs.setdefault("profile", gm.decode.profile)
    compile_kwargs.setdefault("tokenizer", gm.tokenizer_name)
    shallow = compile_layerskip(model, gm.decode.target, exit_layer=rule.layer, cache_len=gm.cache_len,
                                batch=gm.batch, prefill_chunk=None, **compile_kwargs)
    ee = EarlyExitModel(rule, shallow, found)
    ee.check_target(gm)
    return ee


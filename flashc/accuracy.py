"""Accuracy of a model against a baseline, as rows a table or JSON shows.

Perplexity for causal LMs, embedding agreement for encoders. Used by `flashc eval` and
by compile reports whenever a pipeline changed numerics. The measuring itself lives in
`flashc.evaluation`; this module decides what is run against what, on which inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from flashc.errors import FlashcError
from flashc.report import json_safe

#: Version of the JSON object `Evaluation.to_dict` returns (`flashc eval --json`).
EVAL_SCHEMA = 1

#: Inputs an encoder artifact may take: what a BERT-family tokenizer returns, by name.
TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class AccuracyRow:
    """One figure of the model next to the same figure of the baseline (None: no baseline)."""

    metric: str
    baseline: float | None
    value: float
    detail: dict[str, Any] = field(default_factory=dict)  # what the figure was computed over
    digits: int = 4  # decimals shown in a table (cosines near 1 need more)

    @property
    def change(self) -> float | None:
        """value / baseline - 1, or None without a (non-zero) baseline."""
        if self.baseline in (None, 0):
            return None
        return (self.value - self.baseline) / self.baseline

    def cells(self) -> list[str]:
        base = "-" if self.baseline is None else f"{self.baseline:.{self.digits}f}"
        return [self.metric, base, f"{self.value:.{self.digits}f}", _percent(self.change)]

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "baseline": self.baseline, "model": self.value,
                "relative_change": self.change, **self.detail}


def _percent(change: float | None) -> str:
    if change is None:
        return "-"
    if change != 0 and abs(change) < 1e-4:  # "+0.00%" would read as "no change at all"
        return f"{100 * change:+.1e}%"
    return f"{100 * change:+.2f}%"


@dataclass
class Evaluation:
    """What `flashc eval` measured: one headline figure, the rows behind it, and notes on
    how the inputs were prepared (truncation, padding) that a reader must know."""

    metric: str  # "ppl" or "embed"
    model: str  # what was evaluated: a zoo name or an artifact directory
    baseline: str | None  # what it was compared with
    headline: AccuracyRow
    rows: list[AccuracyRow]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of `flashc eval --json`: `model`, `baseline` and `relative_change`
        are the headline figure's (model / baseline - 1); names are `*_name`. A NaN figure
        (a model that broke) is the string "nan"."""
        return json_safe({"schema": EVAL_SCHEMA, "metric": self.metric, "figure": self.headline.metric,
                "model": self.headline.value, "baseline": self.headline.baseline,
                "relative_change": self.headline.change, "model_name": self.model, "baseline_name": self.baseline,
                "rows": [r.to_dict() for r in self.rows], "notes": list(self.notes)})


# --------------------------------------------------------------------------- perplexity


def logits_fn_of(model_or_compiled) -> Callable[[torch.Tensor], torch.Tensor]:
    """input_ids[1, T] -> logits[1, T, V] for an HF causal LM or a CompiledModel of one."""
    from flashc.compiled import CompiledModel

    if isinstance(model_or_compiled, CompiledModel):
        def run(ids):
            return _logits(model_or_compiled(ids), model_or_compiled.source.name)
        return run

    device = next(iter(model_or_compiled.parameters()), torch.empty(0)).device  # a model on a GPU: ids go there

    def run_eager(ids):
        with torch.no_grad():
            return _logits(model_or_compiled(ids.to(device), use_cache=False), type(model_or_compiled).__name__)
    return run_eager


def _logits(out, name: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    raise FlashcError(f"{name} returns {type(out).__name__}, which has no logits: perplexity needs a causal LM "
                      "(an encoder is scored with --metric embed)")


def perplexity_rows(candidate, baseline, tokenizer, texts=("prose", "code"), window: int = 256,
                    stride: int = 128, limit: int | None = None) -> list[AccuracyRow]:
    """Perplexity of candidate (and baseline, when given) on the committed evaluation texts,
    both scored on the same windows; `detail` holds the tokens and windows scored and the NLLs."""
    from flashc.evaluation import load_eval_text, perplexity

    rows = []
    for kind in texts:
        ids = torch.tensor(tokenizer(load_eval_text(kind))["input_ids"])
        got = perplexity(logits_fn_of(candidate), ids, window, stride, limit)
        base = perplexity(logits_fn_of(baseline), ids, window, stride, limit) if baseline is not None else None
        detail = {"text": kind, "window": window, "stride": stride, "windows": got.n_windows,
                  "tokens": got.n_tokens, "nll": got.nll, "baseline_nll": None if base is None else base.nll}
        rows.append(AccuracyRow(f"perplexity ({kind}, window {window}, stride {stride})",
                                None if base is None else base.ppl, got.ppl, detail))
    return rows


def pooled_perplexity(rows: Sequence[AccuracyRow]) -> AccuracyRow:
    """One perplexity over every token the rows scored: exp of the token-weighted mean NLL."""
    if len(rows) == 1:
        return rows[0]
    tokens = sum(r.detail["tokens"] for r in rows)
    value = math.exp(sum(r.detail["nll"] * r.detail["tokens"] for r in rows) / tokens)
    baseline = None
    if all(r.detail["baseline_nll"] is not None for r in rows):
        baseline = math.exp(sum(r.detail["baseline_nll"] * r.detail["tokens"] for r in rows) / tokens)
    texts = "+".join(r.detail["text"] for r in rows)
    return AccuracyRow(f"perplexity ({texts}, all {tokens} tokens)", baseline, value,
                       {"text": texts, "tokens": tokens})


def perplexity_evaluation(candidate, baseline, tokenizer, texts: Sequence[str], window: int, stride: int,
                          limit: int | None, model: str, baseline_name: str | None) -> Evaluation:
    """`flashc eval`'s perplexity: one row per text, headed by the pooled perplexity."""
    rows = perplexity_rows(candidate, baseline, tokenizer, texts, window, stride, limit)
    return Evaluation("ppl", model, baseline_name, pooled_perplexity(rows), rows)


def compiled_window(cm) -> int:
    """The perplexity window of an artifact: the length of its one input, input_ids[1, window]."""
    shape = cm.inputs[0].shape
    if len(cm.inputs) != 1 or len(shape) != 2 or shape[0] != 1:
        raise FlashcError(f"perplexity needs an artifact compiled for input_ids[1, window]; this one takes "
                          f"{', '.join(s.describe() for s in cm.inputs)}")
    return shape[1]


# --------------------------------------------------------------------------- embeddings


def embedding_evaluation(embed_fn: Callable[[list[str]], torch.Tensor],
                         ref_embed_fn: Callable[[list[str]], torch.Tensor], sentences: Sequence[str],
                         model: str, baseline_name: str, notes: Sequence[str] = ()) -> Evaluation:
    """`flashc eval`'s embedding agreement of `embed_fn` with `ref_embed_fn`, headed by the
    mean cosine. Each baseline figure is 1: the reference agrees perfectly with itself."""
    from flashc.evaluation import embedding_agreement

    res = embedding_agreement(embed_fn, ref_embed_fn, sentences)
    detail = {"sentences": res.n_sentences}
    rows = [AccuracyRow(metric, 1.0, value, dict(detail), digits=6) for metric, value in (
        ("mean cosine vs baseline", res.mean_cosine),
        ("min cosine vs baseline", res.min_cosine),
        ("top-1 neighbour agreement", res.top1_agreement),
        ("top-5 neighbour overlap", res.top5_overlap),
        ("spearman of neighbour rankings (mean)", res.spearman_mean),
        ("spearman of neighbour rankings (min)", res.spearman_min),
    )]
    return Evaluation("embed", model, baseline_name, rows[0], rows, list(notes))


def static_shape_embedders(cm, reference: torch.nn.Module, tokenizer, sentences: Sequence[str]):
    """(artifact embed_fn, reference embed_fn, notes) for an encoder artifact compiled for one
    input shape [batch, seq].

    Both run through `flashc.pretrained.minilm_embed` (tokenize, mean-pool over the real
    tokens, normalise) on the same inputs: each sentence truncated to `seq` tokens and padded
    to it with the tokenizer's pad id and a zero attention mask, in batches of `batch` (a last
    short batch is filled with copies of its last sentence, whose outputs are dropped). The
    reference gets exactly the inputs the artifact takes, so an artifact without an
    attention_mask input is compared with a reference that attends to the padding too.
    """
    from flashc.pretrained import minilm_embed

    specs = cm.inputs
    names = [s.name for s in specs]
    shape = tuple(specs[0].shape)
    fits = names[0] == "input_ids" and len(shape) == 2 and set(names) <= set(TOKENIZER_INPUTS)
    if not fits or any(tuple(s.shape) != shape for s in specs):
        raise FlashcError(f"embedding agreement feeds an encoder what its tokenizer returns "
                          f"({', '.join(TOKENIZER_INPUTS)}; input_ids first, all [batch, seq]); {cm.source.name}'s "
                          f"artifact takes {', '.join(s.describe() for s in specs)}")
    batch, seq = shape
    fixed = _FixedLengthTokenizer(tokenizer, seq)
    name = cm.source.name

    def run_artifact(**inputs):
        return _last_hidden_state(cm(*(inputs[n] for n in names)), name, (batch, seq))

    def run_reference(**inputs):
        with torch.no_grad():
            return reference(**{n: inputs[n] for n in names}).last_hidden_state

    artifact_encoder = _StaticBatchEncoder(run_artifact, batch)
    reference_encoder = _StaticBatchEncoder(run_reference, batch)
    notes = [f"inputs: {len(sentences)} sentences as [{batch}, {seq}] batches, padded with pad id "
             f"{tokenizer.pad_token_id}, mean-pooled over their real tokens"]
    lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=False)["input_ids"]]
    truncated = sum(n > seq for n in lengths)
    if truncated:
        notes.append(f"{truncated} of {len(sentences)} sentences are longer than the artifact's {seq} tokens "
                     f"(up to {max(lengths)}) and were truncated to {seq}, for the baseline too")
    if "attention_mask" not in names:
        notes.append("the artifact takes no attention_mask: it attends to the padding, so the baseline runs on "
                     "the same padded ids without a mask; the figures measure the compile, not the encoder's "
                     "embeddings (compile a factory returning (model, (input_ids, attention_mask)) for those)")
    return (lambda s: minilm_embed(artifact_encoder, fixed, s, batch_size=batch),
            lambda s: minilm_embed(reference_encoder, fixed, s, batch_size=batch), notes)


class _FixedLengthTokenizer:
    """A tokenizer that pads and truncates every call to `seq` tokens (a static input shape)."""

    def __init__(self, tokenizer, seq: int) -> None:
        self.tokenizer = tokenizer
        self.model_max_length = seq

    def __call__(self, texts, **kwargs):
        kwargs.update(padding="max_length", truncation=True, max_length=self.model_max_length)
        return self.tokenizer(texts, **kwargs)


class _StaticBatchEncoder:
    """An encoder called with a fixed batch size: what `minilm_embed` drives like a BertModel
    (its `parameters()` say where inputs go; a call returns `last_hidden_state`)."""

    def __init__(self, run: Callable[..., torch.Tensor], batch: int) -> None:
        self.run = run
        self.batch = batch

    def parameters(self):
        return iter((torch.empty(0),))  # inputs stay on the CPU; an artifact moves them itself

    def __call__(self, **inputs: torch.Tensor) -> SimpleNamespace:
        n = inputs["input_ids"].shape[0]
        if n < self.batch:  # fill the batch with copies of the last row; their outputs are dropped
            inputs = {k: torch.cat([v, v[-1:].expand(self.batch - n, *v.shape[1:])]) for k, v in inputs.items()}
        return SimpleNamespace(last_hidden_state=self.run(**inputs)[:n])


def _last_hidden_state(out, name: str, shape: tuple[int, int]) -> torch.Tensor:
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)) and out:
        hidden = out[0]  # an output type that could not be rebuilt loads as a flat tuple
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != shape:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(out).__name__
        raise FlashcError(f"{name}: embedding agreement needs the encoder's hidden states [{shape[0]}, {shape[1]}, "
                          f"hidden] as its first output (last_hidden_state); the artifact returned {got}")
    return hidden.cpu()

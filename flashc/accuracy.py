"""Accuracy of a compiled model against its float baseline, as table rows.

Used by `flashc eval` and by compile reports whenever a pipeline changed numerics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flashc.errors import FlashcError


@dataclass
class AccuracyRow:
    metric: str
    baseline: float | None
    value: float

    @property
    def change(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return (self.value - self.baseline) / self.baseline

    def cells(self) -> list[str]:
        base = "-" if self.baseline is None else f"{self.baseline:.4f}"
        change = "-" if self.change is None else f"{100 * self.change:+.2f}%"
        return [self.metric, base, f"{self.value:.4f}", change]


def logits_fn_of(model_or_compiled) -> Callable[[torch.Tensor], torch.Tensor]:
    """input_ids[1, T] -> logits[1, T, V] for an HF causal LM or a CompiledModel of one."""
    from flashc.compiled import CompiledModel

    if isinstance(model_or_compiled, CompiledModel):
        def run(ids):
            out = model_or_compiled(ids)
            return out.logits if hasattr(out, "logits") else out
        return run

    def run_eager(ids):
        with torch.no_grad():
            return model_or_compiled(ids, use_cache=False).logits
    return run_eager


def perplexity_rows(candidate, baseline, tokenizer, texts=("prose", "code"), window: int = 256,
                    stride: int = 128, limit: int | None = None) -> list[AccuracyRow]:
    """Perplexity of candidate (and baseline, when given) on the committed evaluation texts."""
    from flashc.evaluation import load_eval_text, perplexity

    rows = []
    for kind in texts:
        ids = torch.tensor(tokenizer(load_eval_text(kind))["input_ids"])
        value = perplexity(logits_fn_of(candidate), ids, window, stride, limit).ppl
        base = perplexity(logits_fn_of(baseline), ids, window, stride, limit).ppl if baseline is not None else None
        rows.append(AccuracyRow(f"perplexity ({kind}, window {window}, stride {stride})", base, value))
    return rows


def compiled_window(cm) -> int:
    shape = cm.inputs[0].shape
    if len(cm.inputs) != 1 or len(shape) != 2 or shape[0] != 1:
        raise FlashcError(f"perplexity needs an artifact compiled for input_ids[1, window]; this one takes "
                          f"{', '.join(s.describe() for s in cm.inputs)}")
    return shape[1]

"""Accuracy evaluation: sliding-window perplexity and embedding agreement.

The evaluation texts under ``flashc/data/eval/`` are committed verbatim so every
machine scores the same bytes. They are for *evaluation only*: never use them to
calibrate a quantizer or tune a pass (that would leak the test set into the method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm

__all__ = [
    "EVAL_DIR",
    "EVAL_SOURCE_FILES",
    "PerplexityResult",
    "EmbeddingResult",
    "load_eval_text",
    "load_eval_sentences",
    "perplexity",
    "perplexity_windows",
    "embedding_agreement",
    "fake_quantize_rtn",
]

EVAL_DIR = Path(__file__).resolve().parent / "data" / "eval"

#: CPython standard-library files the evaluation texts were cut from (paths relative
#: to the stdlib directory). Training code must exclude them (see
#: ``scripts/train_mixtral_ref.py``) so the held-out texts stay held out.
EVAL_SOURCE_FILES: tuple[str, ...] = (
    "pydoc_data/topics.py",
    "fractions.py",
    "textwrap.py",
    "graphlib.py",
)

_TEXT_FILES = {"prose": "prose.txt", "code": "code.txt"}


def load_eval_text(kind: Literal["prose", "code"]) -> str:
    """The committed evaluation text of one kind.

    ``"prose"``: ~56 KB of English from the Python Language Reference (CPython 3.11.7
    ``pydoc_data/topics.py``); ``"code"``: ~58 KB of Python source (``fractions.py``,
    ``textwrap.py``, ``graphlib.py`` of CPython 3.11.7). See ``data/eval/README.md``.
    Evaluation only -- never calibration data.
    """
    try:
        name = _TEXT_FILES[kind]
    except KeyError:
        raise ValueError(f"load_eval_text: kind must be one of {sorted(_TEXT_FILES)}, got {kind!r}") from None
    path = EVAL_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"Evaluation text {path} is missing; the flashc install is incomplete.")
    return path.read_text(encoding="utf-8")


def load_eval_sentences() -> list[str]:
    """The committed 100-sentence set (``data/eval/sentences.txt``), one per line."""
    path = EVAL_DIR / "sentences.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


# --------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`.

    ``nll`` is the mean negative log-likelihood per scored token (nats) and
    ``ppl = exp(nll)``; ``n_tokens`` tokens were scored over ``n_windows`` calls.
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    window: int
    stride: int


def perplexity_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Plan the fixed-size windows for a sequence of ``n`` tokens.

    Returns ``(start, first, end)`` triples: the model sees tokens ``[start, start +
    window)`` and the targets ``first .. end-1`` are scored (target ``t`` from the
    logits at position ``t - 1``). Token 0 has no context and is never scored; every
    other token is scored exactly once. The first window scores ``window - 1``
    tokens, later ones ``stride`` tokens with ``window - stride`` tokens of context;
    the last window is moved back to end at the sequence end (so it is still
    ``window`` long) and scores only what is left. When ``n < window`` a single
    window is used and the caller pads it on the right.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride < window:
        raise ValueError(f"stride must satisfy 1 <= stride < window ({window}), got {stride}")
    plan: list[tuple[int, int, int]] = []
    first = 1
    begin = 0
    while first < n:
        end = min(begin + window, n)
        start = max(0, end - window)
        plan.append((start, first, end))
        first = end
        begin += stride
    return plan


@torch.inference_mode()
def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    token_ids: torch.Tensor,
    window: int = 256,
    stride: int = 128,
    limit: int | None = None,
    progress: bool = True,
    pad_id: int = 0,
) -> PerplexityResult:
    """Sliding-window perplexity of a causal LM over one token sequence.

    ``logits_fn`` gets ``input_ids`` of shape ``[1, window]`` (int64, on the device of
    ``token_ids``) and returns logits ``[1, window, vocab]``; every call has exactly
    ``window`` tokens, so statically shaped compiled models work. Windows advance by
    ``stride``; each token is scored once, with up to ``window - stride`` tokens of
    context (more in the first and last window), see :func:`perplexity_windows`.
    A sequence shorter than ``window`` is right-padded with ``pad_id``; padded
    positions are never scored and, the model being causal, cannot affect the
    scored ones. ``limit`` caps the number of windows (the first ``limit`` are used).
    """
    ids = token_ids
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"token_ids must be [n] or [1, n], got shape {tuple(ids.shape)}")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be [n] or [1, n], got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point:
        raise TypeError(f"token_ids must be an integer tensor, got {ids.dtype}")
    ids = ids.long()
    n = ids.numel()
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n}")
    plan = perplexity_windows(n, window, stride)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        plan = plan[:limit]

    total_nll = 0.0
    n_tokens = 0
    for start, first, end in tqdm(plan, desc="perplexity", unit="win", disable=not progress):
        chunk = ids[start : start + window]
        if chunk.numel() < window:
            pad = torch.full((window - chunk.numel(),), pad_id, dtype=ids.dtype, device=ids.device)
            chunk = torch.cat([chunk, pad])
        logits = logits_fn(chunk.unsqueeze(0))
        if not isinstance(logits, torch.Tensor):  # e.g. a HF ModelOutput
            logits = getattr(logits, "logits", logits)
        if logits.dim() != 3 or logits.shape[0] != 1 or logits.shape[1] != window:
            raise ValueError(
                f"logits_fn must return logits of shape [1, {window}, vocab], got {tuple(logits.shape)}"
            )
        # target t is predicted at position t - 1 (window-relative: t - 1 - start)
        pos = slice(first - 1 - start, end - 1 - start)
        targets = ids[first:end].to(logits.device)
        scores = logits[0, pos]
        if scores.dtype != torch.float64:
            scores = scores.float()  # bf16/fp16 logits: do the softmax in fp32
        logp = torch.log_softmax(scores, dim=-1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total_nll += float(nll.double().sum())
        n_tokens += end - first

    mean = total_nll / n_tokens
    return PerplexityResult(
        ppl=math.exp(mean), nll=mean, n_tokens=n_tokens, n_windows=len(plan), window=window, stride=stride
    )


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class EmbeddingResult:
    """Outcome of :func:`embedding_agreement` (test embeddings vs reference).

    * ``mean_cosine`` / ``min_cosine``: cosine similarity of each sentence's test
      embedding with its reference embedding.
    * ``top1_agreement``: fraction of sentences whose nearest other sentence is the
      same under both embeddings.
    * ``top5_agreement``: fraction whose set of 5 nearest other sentences is the same.
    * ``top5_overlap``: mean size of the intersection of those sets, divided by 5.
    * ``spearman_mean`` / ``spearman_min``: Spearman rank correlation between each
      row of the two sentence-sentence cosine-similarity matrices (diagonal removed).
    """

    mean_cosine: float
    min_cosine: float
    top1_agreement: float
    top5_agreement: float
    top5_overlap: float
    spearman_mean: float
    spearman_min: float
    n_sentences: int


def _rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim (0-based), ties given their average rank."""
    order = x.argsort(dim=-1, stable=True)
    sorted_x = x.gather(-1, order)
    ranks_sorted = torch.empty_like(x, dtype=torch.float64)
    for r in range(x.shape[0]):
        vals = sorted_x[r]
        row = torch.arange(vals.numel(), dtype=torch.float64)
        _, counts = torch.unique_consecutive(vals, return_counts=True)
        if counts.numel() != vals.numel():  # ties: average their ranks
            ends = counts.cumsum(0)
            starts = ends - counts
            avg = (starts + ends - 1).double() / 2
            row = avg.repeat_interleave(counts)
        ranks_sorted[r] = row
    ranks = torch.empty_like(ranks_sorted)
    ranks.scatter_(-1, order, ranks_sorted)
    return ranks


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ra, rb = _rankdata(a), _rankdata(b)
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    denom = (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp(min=1e-300)
    return (ra * rb).sum(dim=-1) / denom


def _offdiag(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool)
    return m[mask].view(n, n - 1)


@torch.inference_mode()
def embedding_agreement(
    embed_fn: Callable[[list[str]], torch.Tensor],
    ref_embed_fn: Callable[[list[str]], torch.Tensor],
    sentences: Sequence[str] | None = None,
) -> EmbeddingResult:
    """Compare a sentence encoder with a reference one on ``sentences``.

    Both functions take a list of ``N`` strings and return ``[N, D]`` embeddings
    (normalised or not: cosine similarity is used throughout). ``sentences``
    defaults to :func:`load_eval_sentences`; at least 7 are needed for top-5.
    """
    sents = list(sentences) if sentences is not None else load_eval_sentences()
    n = len(sents)
    if n < 7:
        raise ValueError(f"embedding_agreement needs at least 7 sentences, got {n}")
    test = embed_fn(sents)
    ref = ref_embed_fn(sents)
    for name, e in (("embed_fn", test), ("ref_embed_fn", ref)):
        if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[0] != n:
            shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"{name} must return a [{n}, D] tensor, got {shape}")
    if test.shape != ref.shape:
        raise ValueError(f"embedding shapes differ: {tuple(test.shape)} vs reference {tuple(ref.shape)}")
    t = torch.nn.functional.normalize(test.detach().double().cpu(), dim=-1)
    r = torch.nn.functional.normalize(ref.detach().double().cpu(), dim=-1)
    cos = (t * r).sum(dim=-1)

    sim_t = _offdiag(t @ t.T)
    sim_r = _offdiag(r @ r.T)
    top_t = sim_t.topk(5, dim=-1).indices
    top_r = sim_r.topk(5, dim=-1).indices
    top1 = (top_t[:, 0] == top_r[:, 0]).double().mean()
    overlaps = torch.tensor(
        [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_t, top_r, strict=True)], dtype=torch.float64
    )
    rho = _spearman_rows(sim_t, sim_r)
    return EmbeddingResult(
        mean_cosine=float(cos.mean()),
        min_cosine=float(cos.min()),
        top1_agreement=float(top1),
        top5_agreement=float((overlaps == 5).double().mean()),
        top5_overlap=float(overlaps.mean() / 5),
        spearman_mean=float(rho.mean()),
        spearman_min=float(rho.min()),
        n_sentences=n,
    )


# --------------------------------------------------------------------------- perturbations


def fake_quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Symmetric round-to-nearest quantize-dequantize of a 2-D weight ``[out, in]``.

    Scales are per output channel (``group_size=None``) or per group of
    ``group_size`` consecutive input columns: ``scale = max|w| / (2**(bits-1) - 1)``,
    ``q = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1)``; returns
    ``q * scale`` in the weight's dtype. Used to measure how sensitive a metric is
    to quantization error; not a production quantizer.
    """
    if weight.dim() != 2:
        raise ValueError(f"fake_quantize_rtn expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    out_f, in_f = weight.shape
    w = weight.float()
    if group_size is not None:
        if group_size < 1 or in_f % group_size:
            raise ValueError(f"group_size {group_size} must divide the input dim {in_f}")
        w = w.reshape(out_f, in_f // group_size, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
    return (q * scale).reshape(out_f, in_f).to(weight.dtype)

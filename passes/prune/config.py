"""PruneConfig: what pruning does, parsed from a spec ('wanda-50%', '2:4', 'online-40%', 'dejavu-40%') in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flashc.errors import FlashcError, closest_names

# offline: weights set to zero once (unstructured or N:M); online: activations zeroed per
# token below a calibrated threshold; dejavu: MLP neurons zeroed per token by a learned
# predictor; ffn, heads, experts: whole FFN channels, query heads or MoE experts removed
# (smaller dense weights)
METHODS = ("magnitude", "wanda", "sparsegpt", "online", "dejavu", "ffn", "heads", "experts")
WEIGHT_METHODS = ("magnitude", "wanda", "sparsegpt")
RECOVERABLE = (*WEIGHT_METHODS, "ffn", "experts")  # passes that distil their new weights (recover.py)
MAX_SPARSITY = 0.95
# online sparsity's greedy allocation: one per transformer block with the target in each (TEAL's,
# teal/greedyopt.py; the default: on mixtral-ref at 30% / 40%, +2.51% / +8.01% perplexity against
# +3.60% / +9.41% for one run model-wide, bench/prune_accuracy.py 2026-12-06), or one model-wide run
ALLOCATIONS = ("block", "model")
# online sparsity's per-entry score: |x| (TEAL) or |x_i| times the size of the weight column x_i multiplies
# in the readers' channel-normalized weights (WINA's criterion: Chen et al. 2025, arXiv:2505.19427)
SCORES = ("magnitude", "weighted")

# Specs accepted by PruneConfig.parse, with what they mean (X a percentage, N:M a pattern).
SPECS = {
    "magnitude-X%": "zero the X% smallest weights of each layer (no calibration)",
    "wanda-X%": "zero the X% of each output row with the least |W| * ||x|| (Wanda)",
    "sparsegpt-X%": "SparseGPT: Hessian-based mask and error compensation, X% of each layer",
    "N:M": "at most N nonzero weights in every M inputs, by SparseGPT ('2:4')",
    "wanda-N:M / magnitude-N:M / sparsegpt-N:M": "the N:M pattern by that method",
    "online-X%": "activation sparsity (TEAL): inputs of linear layers zeroed below calibrated thresholds, "
                 "X% in every transformer block",
    "dejavu-X%": "contextual sparsity (Deja Vu): X% of each gated MLP's intermediate neurons zeroed per token, "
                 "chosen by a low-rank predictor trained on the calibration text",
    "ffn-X%": "drop X% of the intermediate channels of every FFN (smaller dense weights)",
    "heads-X%": "drop X% of the query heads, the same number in every grouped-query group of a layer (key/value "
                "heads and the KV cache stay; without GQA whole heads go, k/v and the cache too)",
    "experts-N / experts-X%": "drop the N (or X%) least routed experts of every MoE layer",
}

# Kinds of flashc issue #15 that are not built yet: asking for one is an error, never a fallback.
NOT_IMPLEMENTED: dict[str, str] = {}


@dataclass(frozen=True)
class PruneConfig:
    """Pruning of linear layers (and, when asked, MoE experts), attention heads or whole experts.

    method: "magnitude" (per layer), "wanda" (Sun et al. 2023, arXiv:2306.11695: |W| times
    the input's column norm, compared within each output row), "sparsegpt" (Frantar &
    Alistarh 2023, arXiv:2301.00774: OBS mask selection with the calibration Hessian and
    error compensation, blocked), "online" (TEAL, arXiv:2408.14690: each linear's input
    zeroed below a magnitude threshold, per-input sparsities allocated greedily under the
    target in every transformer block), "dejavu" (Liu et al. 2023, arXiv:2310.17157, the MLP part: in each
    gated MLP, the intermediate act(gate x) * up x multiplied per token by the mask of a low-rank predictor
    (x @ A) @ B above a threshold, A [K, r] and B [r, F] trained on calibration activations to find the
    top (1 - sparsity) of |act(gate x) * up x|, `passes/prune/dejavu.py`; the down projection reads the kept
    neurons only, gate and up are still computed whole), "ffn" (structured: FFN intermediate channels of
    least Wanda-style importance removed), "heads" (query heads removed before capture, `passes/prune/heads.py`:
    the layers that lose them chosen by measured damage, each layer's removal alone against the
    unpruned logits; inside a layer, the heads of least Wanda-style importance on o_proj's input) or "experts" (the MoE experts that
    received the least routing weight on the calibration text removed, with their router
    rows, `passes/prune/experts.py`). sparsity: the fraction to remove (0-0.95); with n_m = (N, M), at
    most N nonzeros in every M consecutive inputs of a row (sparsity 1 - N/M; NVIDIA's 2:4).
    count: for "experts", the number of experts removed from every MoE layer ('experts-2';
    sparsity is then unused and 0); None: the fraction `sparsity` of each layer's experts
    ('experts-25%'). experts: prune fused MoE experts too (off: they are left dense and listed). lm_head:
    prune the output projection too (off, as Wanda and SparseGPT leave it). damp,
    block_size: SparseGPT's dampening (fraction of the mean Hessian diagonal) and columns per
    lazy batch update. allocation_step: the sparsity increment of the online greedy
    allocation; allocation: "block" (one greedy run per transformer block, the target in
    each, as TEAL allocates) or "model" (one run, the target model-wide); score: what online
    sparsity thresholds, "magnitude" (|x|, TEAL) or "weighted" (|x_i| times the norm of the weight
    column it multiplies, a threshold per input channel: WINA); sample_rows:
    calibration rows kept per input for thresholds and errors. predictor_rank: r of the "dejavu" predictors
    (None: min(128, K // 8), K the MLP's input width); predictor_steps: their Adam steps; predictor_rows:
    calibration rows sampled per MLP, three quarters to train on, the rest held out for the threshold and
    the report.
    calibration_tokens: at most this many calibration tokens are run;
    min_calibration_tokens: fewer than this is an error. recover: a DistillConfig (flashc.distill)
    to distil the pruned weights against the unpruned model on the calibration text afterwards
    (weight methods and experts; `passes/prune/recover.py`), recover_plot: a PNG path for its loss curve,
    recover_checkpoint: a directory for its checkpoints (the same compile again resumes there).
    """

    method: str = "wanda"
    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None
    count: int | None = None
    experts: bool = False
    lm_head: bool = False
    damp: float = 0.01
    block_size: int = 128
    allocation_step: float = 0.025
    allocation: str = "block"
    score: str = "magnitude"
    sample_rows: int = 2048
    predictor_rank: int | None = None
    predictor_steps: int = 400
    predictor_rows: int = 8192
    calibration_tokens: int = 16384
    min_calibration_tokens: int = 1024
    recover: Any = None  # flashc.distill.DistillConfig
    recover_plot: str | None = None
    recover_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.recover is not None:
            from flashc.distill import DistillConfig

            if not isinstance(self.recover, DistillConfig):
                raise FlashcError(f"PruneConfig.recover takes a flashc.distill.DistillConfig, got "
                                  f"{type(self.recover).__name__}")
            if self.method == "heads":
                raise FlashcError("recovery distillation is not built for head pruning: heads are removed from the "
                                  "model before capture, and recovery distils a pruned program against its own "
                                  "unpruned graph; drop recover=")
            if self.method not in RECOVERABLE:
                raise FlashcError(f"recovery distillation is built for {', '.join(RECOVERABLE)} pruning; "
                                  f"{self.method!r} pruning has none yet: drop recover=")
        if self.method not in METHODS:
            raise FlashcError(f"PruneConfig.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.n_m is not None:
            if self.method not in WEIGHT_METHODS:
                raise FlashcError(f"PruneConfig.n_m: N:M patterns apply to {', '.join(WEIGHT_METHODS)}, "
                                  f"not {self.method!r}")
            n, m = self.n_m
            if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
                raise FlashcError(f"PruneConfig.n_m: an N:M pattern keeps N of every M weights with 0 < N < M, "
                                  f"got {n}:{m}")
            object.__setattr__(self, "sparsity", 1 - n / m)  # what the pattern removes
        if self.count is not None:
            if self.method != "experts":
                raise FlashcError(f"PruneConfig.count (experts removed per MoE layer) applies to 'experts', not "
                                  f"{self.method!r}")
            if not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 0:
                raise FlashcError(f"PruneConfig.count: the number of experts to remove per MoE layer must be an "
                                  f"integer >= 0, got {self.count!r}")
            object.__setattr__(self, "sparsity", 0.0)  # the count decides; each layer's share is in the report
        if not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity <= MAX_SPARSITY:
            raise FlashcError(f"PruneConfig.sparsity must be within 0-{MAX_SPARSITY:.0%}, got "
                              + (f"{self.sparsity:.4g} ({_percent(self.sparsity)})"
                                 if isinstance(self.sparsity, (int, float)) else repr(self.sparsity))
                              + (f" (the {self.n_m[0]}:{self.n_m[1]} pattern)" if self.n_m else ""))
        if not 0 < self.damp < 1:
            raise FlashcError(f"PruneConfig.damp must be in (0, 1), got {self.damp!r}")
        if self.block_size < 1 or self.sample_rows < 2:
            raise FlashcError("PruneConfig.block_size must be positive and sample_rows at least 2")
        if self.score not in SCORES:
            raise FlashcError(f"PruneConfig.score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.allocation not in ALLOCATIONS:
            raise FlashcError(f"PruneConfig.allocation must be one of {', '.join(ALLOCATIONS)}, got "
                              f"{self.allocation!r}")
        if not 0 < self.allocation_step <= MAX_SPARSITY:
            raise FlashcError(f"PruneConfig.allocation_step must be in (0, {MAX_SPARSITY}], got "
                              f"{self.allocation_step!r}")
        if self.predictor_rank is not None and (not isinstance(self.predictor_rank, int) or self.predictor_rank < 1):
            raise FlashcError(f"PruneConfig.predictor_rank must be a positive integer or None (min(128, K // 8)), "
                              f"got {self.predictor_rank!r}")
        if self.predictor_steps < 1 or self.predictor_rows < 8:
            raise FlashcError(f"PruneConfig.predictor_steps must be positive and predictor_rows at least 8, got "
                              f"{self.predictor_steps} and {self.predictor_rows}")
        if self.min_calibration_tokens < 1 or self.calibration_tokens < self.min_calibration_tokens:
            raise FlashcError(f"PruneConfig.calibration_tokens ({self.calibration_tokens}) must be at least "
                              f"min_calibration_tokens ({self.min_calibration_tokens}), which must be positive")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude" or self.recover is not None

    @property
    def pattern(self) -> str:
        """'2:4', 'unstructured', 'online' (activations), 'predicted' (Deja Vu), 'ffn channels', 'attention
        heads' or 'experts'."""
        if self.n_m is not None:
            return f"{self.n_m[0]}:{self.n_m[1]}"
        return {"online": "online", "dejavu": "predicted", "ffn": "ffn channels", "heads": "attention heads",
                "experts": "experts"}.get(self.method, "unstructured")

    @property
    def spec(self) -> str:
        """A readable name that parse() reads back: 'wanda-50%', 'sparsegpt-2:4', 'online-40%', 'experts-2'."""
        if self.count is not None:
            return f"{self.method}-{self.count}"
        if self.n_m is not None:
            return f"{self.method}-{self.n_m[0]}:{self.n_m[1]}"
        return f"{self.method}-{_percent(self.sparsity)}"

    @classmethod
    def parse(cls, text: "str | PruneConfig") -> "PruneConfig":
        """A config from a spec: 'magnitude-50%', 'wanda-50%', 'sparsegpt-50%', '2:4' (SparseGPT),
        'wanda-2:4', 'online-40%', 'dejavu-40%', 'ffn-25%', 'heads-25%' (the % sign is optional), 'experts-2' (a count
        of experts per MoE layer: without %) or 'experts-25%'."""
        if isinstance(text, PruneConfig):
            return text
        if not isinstance(text, str):
            raise FlashcError(f"prune must be a spec such as 'wanda-50%' or a PruneConfig, got {type(text).__name__}")
        name = text.strip().lower()
        pattern = re.fullmatch(r"(?:([a-z]+)-)?(\d+):(\d+)", name)
        if pattern:
            method = pattern.group(1) or "sparsegpt"
            _check_method(method, text)
            if method not in WEIGHT_METHODS:
                raise FlashcError(f"prune={text!r}: N:M patterns apply to {', '.join(WEIGHT_METHODS)} "
                                  f"('wanda-2:4'), not {method}")
            n, m = int(pattern.group(2)), int(pattern.group(3))
            if not 0 < n < m:
                raise FlashcError(f"prune={text!r}: an N:M pattern keeps N of every M weights, so 0 < N < M "
                                  "(e.g. '2:4')")
            return _checked(text, lambda: cls(method=method, n_m=(n, m)))
        level = re.fullmatch(r"([a-z]+)-(\d+(?:\.\d+)?)(%?)", name)
        if level:
            method = level.group(1)
            _check_method(method, text)
            if method == "experts" and not level.group(3):  # experts-N: a count, not a percentage
                if "." in level.group(2):
                    raise FlashcError(f"prune={text!r}: experts-N removes N whole experts per MoE layer, so N is an "
                                      "integer ('experts-2'); for a share of each layer's experts write "
                                      "'experts-25%'")
                return _checked(text, lambda: cls(method=method, count=int(level.group(2))))
            sparsity = float(level.group(2)) / 100
            if not 0 <= sparsity <= MAX_SPARSITY:
                raise FlashcError(f"prune={text!r}: the sparsity must be within 0-{MAX_SPARSITY:.0%}, got "
                                  f"{level.group(2)}%")
            return _checked(text, lambda: cls(method=method, sparsity=sparsity))
        head = name.split("-")[0]
        if head in NOT_IMPLEMENTED:
            _check_method(head, text)
        raise FlashcError(f"prune={text!r} is not a pruning spec; known specs: {', '.join(SPECS)} "
                          f"(e.g. 'wanda-50%', '2:4', 'online-40%', 'dejavu-40%', 'ffn-25%', 'heads-25%', "
                          "'experts-2')")


def _check_method(method: str, text: str) -> None:
    if method in NOT_IMPLEMENTED:
        raise FlashcError(f"pruning {text!r} ({NOT_IMPLEMENTED[method]}) is not implemented yet (flashc issue "
                          f"#15); implemented: {', '.join(METHODS)}")
    if method not in METHODS:
        hint = closest_names(method, [*METHODS, *NOT_IMPLEMENTED])
        raise FlashcError(f"prune={text!r}: unknown pruning method {method!r}"
                          + (f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else "")
                          + f" Known methods: {', '.join(METHODS)}; specs: {', '.join(SPECS)}")


def _checked(text: str, build):
    """The config, or the config's own error prefixed with the spec that asked for it."""
    try:
        return build()
    except FlashcError as e:
        raise FlashcError(f"prune={text!r}: {e}") from None


def _percent(sparsity: float) -> str:
    return f"{round(sparsity * 100, 4):g}%"

"""LayerSkip-style self-speculation without training: the target's own first layers draft.

    draft = flashc.layerskip.compile_layerskip(model, "cpu", exit_layer=8, cache_len=512)
    gm.generate(prompt_ids, 64, speculate=draft)                   # gm: the full model, compiled
    choice = flashc.layerskip.choose_exit_layer(model, "cpu", prompts, cache_len=512, batch=1)
    print(choice)                                                  # acceptance and tokens/s per exit

LayerSkip (Elhoushi et al. 2024, arXiv:2404.16710) drafts with the model's first E decoder
layers followed by its own final norm and LM head, and verifies the drafts with all of them.
Here the early exit is a shallow copy of the Hugging Face causal LM that holds the first E
layers (the weights are the target's tensors, not copies), compiled as a draft
GenerationModel and used through the ordinary draft-model path (flashc.speculate.ModelDrafter):
greedy output is token for token plain decoding, since the full model verifies every draft.
Without LayerSkip's training recipe (layer dropout, an early-exit loss) how often an
intermediate layer already predicts the next token depends on the model, so the exit is
chosen by measurement (`choose_exit_layer`), not by a rule.
"""

from __future__ import annotations

import copy
import io
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from flashc.compiled import ModelSource
from flashc.errors import InputError
from flashc.generate import GenerationStats
from flashc.generation import GenerationModel, compile_generation

# Exits tried when none are given, as fractions of the depth ("a handful spread over the
# layers"); LayerSkip's own exits sit in this range too (e.g. layer 8 of 32 for Llama2-7B).
DEFAULT_EXIT_FRACTIONS = (0.25, 0.5, 0.75)


def num_decoder_layers(model: torch.nn.Module) -> int:
    """The decoder layers of a Llama-like Hugging Face causal LM (model.model.layers), checking
    that it has what an early exit needs: the layers, the final norm and the LM head."""
    inner = getattr(model, "model", None)
    missing = None
    if inner is None:
        missing = "model.model"
    elif not isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        missing = "model.model.layers (a torch.nn.ModuleList of decoder layers)"
    elif getattr(inner, "norm", None) is None:
        missing = "model.model.norm (the final norm)"
    elif getattr(model, "lm_head", None) is None:
        missing = "model.lm_head"
    elif getattr(getattr(model, "config", None), "num_hidden_layers", None) is None:
        missing = "model.config.num_hidden_layers"
    if missing is not None:
        raise InputError(f"layerskip: {type(model).__name__} has no {missing}; an early exit needs a Llama-like "
                         "Hugging Face causal LM (model.model.layers, model.model.norm, model.lm_head)")
    return len(inner.layers)


def check_exit_layer(model: torch.nn.Module, exit_layer: int) -> int:
    """The number of decoder layers, once exit_layer is known to leave at least one out."""
    layers = num_decoder_layers(model)
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer <= layers - 1:
        valid = f"1..{layers - 1}" if layers > 1 else "none: the model has one layer"
        raise InputError(f"layerskip: exit_layer must be in {valid} (decoder layers run before the exit; the "
                         f"model has {layers}), got {exit_layer!r}")
    return layers


def early_exit_model(model: torch.nn.Module, exit_layer: int) -> torch.nn.Module:
    """The model cut after its first exit_layer decoder layers: its final norm and LM head read
    layer exit_layer's output. Shares every weight with `model`, which is left unchanged.

    copy.copy of a Module shares its _modules dict, so the two modules on the path to the
    layers (the causal LM and its inner model) get their own dicts before anything is
    reassigned; the config is copied too, since the forward reads num_hidden_layers from it.
    """
    check_exit_layer(model, exit_layer)
    config = copy.copy(model.config)
    config.num_hidden_layers = exit_layer
    for per_layer in ("layer_types", "mlp_layer_types"):  # Qwen2 and others list a type per layer
        types = getattr(config, per_layer, None)
        if isinstance(types, (list, tuple)):
            setattr(config, per_layer, list(types[:exit_layer]))
    inner = _shallow_module_copy(model.model)
    inner.layers = torch.nn.ModuleList(list(model.model.layers[:exit_layer]))
    inner.config = config
    truncated = _shallow_module_copy(model)
    truncated.model = inner
    truncated.config = config
    return truncated


def _shallow_module_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of module whose submodule, parameter and buffer tables are its own (their
    entries are shared), so assigning a submodule on the copy leaves the original alone."""
    new = copy.copy(module)
    for table in ("_modules", "_parameters", "_buffers"):
        new.__dict__[table] = dict(module.__dict__[table])
    return new


CATCH_UP = 16  # tokens of the draft's entry that brings its cache up to date (compile_layerskip)


def compile_layerskip(model: torch.nn.Module, target: str = "cpu", *, exit_layer: int, cache_len: int,
                      batch: int = 1, prefill_chunk: int | None | str = "auto",
                      **compile_kwargs: Any) -> GenerationModel:
    """Compile the model's first exit_layer layers (+ final norm and LM head) as a draft
    GenerationModel for `target_gm.generate(..., speculate=draft)`.

    cache_len and batch as the target's (the draft's cache must be at least the target's);
    compile_kwargs go to compile_generation and flashc.compile (level, tokenizer, ...): give
    the target's tokenizer, if it has one.

    Besides its decode and prefill entries the draft has a CATCH_UP-token entry (compiled as a
    verify entry; it verifies nothing): after plain rounds the drafter feeds the tokens it
    missed before drafting again, and without it those went one token a call wherever the
    prefill chunk did not fit after the sequence (a 512-token chunk in a 512-position cache:
    on an H100, smollm2-135m's layerskip:12 ran at 0.67-0.77x plain decoding, the rounds
    almost all plain; a replay of its loop with one-token catch-up gave the same).
    """
    if "draft_len" in compile_kwargs:
        raise InputError("layerskip: the draft model verifies nothing, so it takes no draft_len; give draft_len "
                         "to the target's compile_generation")
    layers = check_exit_layer(model, exit_layer)
    truncated = early_exit_model(model, exit_layer)
    if compile_kwargs.get("source") is None:
        compile_kwargs["source"] = ModelSource("module", f"{type(model).__name__} (layerskip: first {exit_layer} of "
                                               f"{layers} layers)")
    catch_up = min(CATCH_UP, cache_len) - 1
    return compile_generation(truncated, target, cache_len=cache_len, batch=batch, prefill_chunk=prefill_chunk,
                              draft_len=catch_up if catch_up >= 1 else None, **compile_kwargs)


# -- choosing the exit by measured acceptance and speed -----------------------------------


@dataclass(frozen=True)
class ExitLayerRow:
    """One candidate exit as measured over the calibration prompts (greedy, fixed draft length)."""

    exit_layer: int
    acceptance_rate: float | None  # drafts kept / drafts verified (None: no speculative round ran)
    mean_accepted_length: float | None  # tokens a speculative round emits (kept drafts + the target's own)
    seconds_per_token: float  # decoding time per new token after the first, per sequence
    compile_s: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token if self.seconds_per_token > 0 else float("inf")


@dataclass
class ExitLayerChoice:
    """choose_exit_layer's answer: the exit with the best measured tokens/s and every row.

    beats_plain says whether that exit decodes faster than the full model alone, measured the
    same way; when it does not, plain decoding is the faster choice for these prompts.
    """

    exit_layer: int
    num_layers: int
    rows: list[ExitLayerRow]
    plain_seconds_per_token: float
    draft_len: int
    draft: GenerationModel | None = field(default=None, repr=False)  # the chosen exit, compiled

    @property
    def chosen(self) -> ExitLayerRow:
        return next(r for r in self.rows if r.exit_layer == self.exit_layer)

    @property
    def plain_tokens_per_s(self) -> float:
        return 1.0 / self.plain_seconds_per_token if self.plain_seconds_per_token > 0 else float("inf")

    @property
    def beats_plain(self) -> bool:
        return self.chosen.seconds_per_token < self.plain_seconds_per_token

    def speedup(self, row: ExitLayerRow) -> float:
        """Plain decoding's time per token over the row's."""
        return self.plain_seconds_per_token / row.seconds_per_token if row.seconds_per_token > 0 else float("inf")

    def verdict(self) -> str:
        chosen = self.chosen
        if self.beats_plain:
            return (f"exit after layer {self.exit_layer} of {self.num_layers}: {chosen.tokens_per_s:.1f} tokens/s, "
                    f"{self.speedup(chosen):.2f}x plain decoding ({self.plain_tokens_per_s:.1f} tokens/s)")
        return (f"no exit layer beats plain decoding ({self.plain_tokens_per_s:.1f} tokens/s; the best, after layer "
                f"{self.exit_layer}, gives {chosen.tokens_per_s:.1f}): decode without speculation")

    def render(self, width: int = 100) -> str:
        from rich.console import Console
        from rich.table import Table

        from flashc.cost_model import human_seconds

        console = Console(record=True, width=width, file=io.StringIO(), force_terminal=False, color_system=None)
        table = Table(title=f"layerskip exits ({self.num_layers} layers, draft length {self.draft_len})",
                      title_justify="left")
        for col in ("exit layer", "acceptance", "mean accepted", "ms/token", "tokens/s", "vs plain", "compile"):
            table.add_column(col, justify="left" if col == "exit layer" else "right")
        table.add_row(f"plain ({self.num_layers})", "-", "-", f"{self.plain_seconds_per_token * 1e3:.3f}",
                      f"{self.plain_tokens_per_s:.1f}", "1.00x", "-")
        for r in self.rows:
            mark = " *" if r.exit_layer == self.exit_layer else ""
            table.add_row(f"{r.exit_layer}{mark}", _fmt(r.acceptance_rate, "{:.1%}"),
                          _fmt(r.mean_accepted_length, "{:.2f}"), f"{r.seconds_per_token * 1e3:.3f}",
                          f"{r.tokens_per_s:.1f}", f"{self.speedup(r):.2f}x", human_seconds(r.compile_s))
        console.print(table)
        console.print(self.verdict(), soft_wrap=True)  # one line, however long: a reader greps it
        return console.export_text().rstrip("\n")

    def __str__(self) -> str:
        return self.render()


def _fmt(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def default_exit_layers(num_layers: int) -> list[int]:
    """A handful of exits spread over the depth (DEFAULT_EXIT_FRACTIONS), each in 1..num_layers - 1."""
    return sorted({min(num_layers - 1, max(1, round(num_layers * f))) for f in DEFAULT_EXIT_FRACTIONS})


def choose_exit_layer(model: torch.nn.Module, target: str, prompts, *, candidates: Sequence[int] | None = None,
                      cache_len: int, batch: int, max_new_tokens: int = 32, target_gm: GenerationModel | None = None,
                      prefill_chunk: int | None | str = "auto", draft_len: int | str = "auto", progress: bool = True,
                      **compile_kwargs: Any) -> ExitLayerChoice:
    """Compile a draft at each candidate exit, generate greedily over the calibration prompts
    with it (speculate=draft, adaptive=False: draft_len drafts every round), and pick the exit
    with the best measured tokens/s; plain decoding is measured the same way for comparison.

    prompts: what GenerationModel.generate takes, one item per call (a lone tensor or string is
    one prompt). target_gm: the full model compiled with a verify entry (compiled here from
    model with prefill_chunk and draft_len when not given). candidates: exits in
    1..num_layers - 1 (default: default_exit_layers). compile_kwargs go to every compile.
    Each configuration runs once on the first prompt untimed before it is measured (a first
    call can allocate, capture graphs or tune).
    """
    num_layers = num_decoder_layers(model)
    if num_layers < 2:
        raise InputError(f"layerskip: the model has {num_layers} decoder layer(s); an early exit needs at least 2")
    exits = default_exit_layers(num_layers) if candidates is None else sorted(set(candidates))
    if not exits:
        raise InputError("layerskip: no candidate exit layers given")
    for exit_layer in exits:
        check_exit_layer(model, exit_layer)
    if isinstance(prompts, (torch.Tensor, str)):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("layerskip: choose_exit_layer needs at least one calibration prompt")
    if max_new_tokens < 2:
        raise InputError(f"layerskip: max_new_tokens must be >= 2 (a speculative round follows the first token), "
                         f"got {max_new_tokens}")
    if target_gm is None:
        target_gm = compile_generation(model, target, cache_len=cache_len, batch=batch, prefill_chunk=prefill_chunk,
                                       draft_len=draft_len, **compile_kwargs)
    if target_gm.draft_len is None:
        raise InputError("layerskip: target_gm has no verify entry; compile it with compile_generation(..., "
                         "draft_len=K)")
    if target_gm.batch != batch:
        raise InputError(f"layerskip: batch={batch}, but target_gm was compiled for batch {target_gm.batch}")
    if cache_len < target_gm.cache_len:
        raise InputError(f"layerskip: cache_len={cache_len} is shorter than target_gm's KV cache "
                         f"({target_gm.cache_len} positions); the drafts need at least that")
    compile_kwargs.setdefault("tokenizer", target_gm.tokenizer_name)

    plain = _measure(target_gm, prompts, max_new_tokens, None)
    rows: list[ExitLayerRow] = []
    best_draft = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(exits), desc="layerskip exits", unit="exit")
    try:
        for exit_layer in exits:
            start = time.perf_counter()
            draft = compile_layerskip(model, target, exit_layer=exit_layer, cache_len=cache_len, batch=batch,
                                      prefill_chunk=prefill_chunk, **compile_kwargs)
            compile_s = time.perf_counter() - start
            measured = _measure(target_gm, prompts, max_new_tokens, draft)
            row = ExitLayerRow(exit_layer, measured.acceptance_rate, measured.mean_accepted_length,
                               measured.seconds_per_token, compile_s)
            if all(row.seconds_per_token < r.seconds_per_token for r in rows):
                best_draft = draft  # only the fastest draft so far stays in memory
            rows.append(row)
            if bar is not None:
                bar.set_postfix(exit=exit_layer, tok_s=f"{row.tokens_per_s:.1f}",
                                accept=_fmt(row.acceptance_rate, "{:.0%}"))
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    best = min(rows, key=lambda r: r.seconds_per_token)
    return ExitLayerChoice(best.exit_layer, num_layers, rows, plain.seconds_per_token, target_gm.draft_len,
                           best_draft)


@dataclass
class _Measured:
    """Totals over the calibration prompts: decoding seconds, new tokens after each first
    one (per sequence), and what speculation proposed and kept (summed into a
    GenerationStats, whose acceptance_rate and mean_accepted_length read them)."""

    decode_s: float = 0.0
    tokens: int = 0
    speculation: GenerationStats = field(default_factory=GenerationStats)

    def add(self, stats: GenerationStats) -> None:
        self.decode_s += stats.decode_s
        self.tokens += max(stats.new_tokens - 1, 0)  # the first new token comes from the prefill
        self.speculation.speculative_rounds += stats.speculative_rounds
        self.speculation.proposed += stats.proposed
        self.speculation.accepted += stats.accepted

    @property
    def acceptance_rate(self) -> float | None:
        return self.speculation.acceptance_rate

    @property
    def mean_accepted_length(self) -> float | None:
        return self.speculation.mean_accepted_length

    @property
    def seconds_per_token(self) -> float:
        if self.tokens == 0:
            raise InputError("layerskip: the calibration prompts produced no token after the first (an eos token "
                             "or the end of the KV cache came first): give max_new_tokens room or other prompts")
        return self.decode_s / self.tokens


def _measure(target_gm: GenerationModel, prompts: list, max_new_tokens: int,
             draft: GenerationModel | None) -> _Measured:
    """Greedy generate() over the prompts, after one untimed call on the first."""
    options = {} if draft is None else {"speculate": draft, "adaptive": False}
    target_gm.generate(prompts[0], max_new_tokens, **options)
    total = _Measured()
    for prompt in prompts:
        _, stats = target_gm.generate(prompt, max_new_tokens, return_stats=True, **options)
        total.add(stats)
    return total

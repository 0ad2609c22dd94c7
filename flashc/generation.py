"""A causal LM compiled for generation: several entry points over one resident KV cache.

    gm = flashc.generation.compile_generation(model, "cpu", cache_len=512)
    gm.generate(prompt_ids, max_new_tokens=64)                     # prefill, then decode
    gm.generate(prompt_ids, 64, speculate="ngram")                 # prompt lookup
    gm.generate(prompt_ids, 64, speculate=draft_gm)                # a smaller compiled model drafts
    gm.generate(prompt_ids, 64, speculate="head")                  # compiled with draft_head= (flashc.draft_head)
    gm.generate("Once upon a time", 64)                            # text, with the model's tokenizer
    gm.save("out/gen"); flashc.load("out/gen")

Entries, each a CompiledModel of `flashc.decode.DecodeStep` at a fixed number of tokens:
`decode` (one token), `prefill` (a chunk of the prompt a call) and `verify` (the pending
token and k drafts, for speculation). They are compiled from the same model with the same
passes and share the KV cache tensors at run time; weights equal across entries are held
once in memory (for the backends that run the program's weights: cpu, eager) and stored
once on disk (the decode entry's; the others list them as `external_weights`).

The artifact is a directory with a manifest naming the entries and one CompiledModel
artifact per entry below it; a decode-step artifact of one entry loads as a
CompiledModel and still generates (one prompt token a step).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from flashc.compiled import CompiledModel, ModelSource, tokenizer_output
from flashc.errors import ArtifactError, FlashcError, InputError
from flashc.generate import GenerationStats, Sampling, Steps, check_sampling, generate, generate_rounds

ENTRIES = ("decode", "prefill", "verify")
DRAFT_HEAD_DIR = "draft_head"  # a generation artifact's draft head (flashc.draft_head), when it has one
GENERATION_KIND = "generation"


DEFAULT_PREFILL_CHUNK = 256  # tokens a prefill call writes: a 1,000-token prompt in 4 calls
DEFAULT_DRAFT_LEN = 8  # a 9-token verify step cost what a 5-token one did (H100, smollm2-135m: 1.5 plain steps)


def compile_generation(model: torch.nn.Module, target: str = "cpu", *, cache_len: int, batch: int = 1,
                       prefill_chunk: int | None | str = "auto", draft_len: int | None | str = "auto",
                       source: ModelSource | None = None, tokenizer: str | None = None, ragged: bool = False,
                       progress: bool = False, draft_head=None, exact_verify: bool = False,
                       **compile_kwargs: Any) -> "GenerationModel":
    """Compile a Hugging Face causal LM's decode step at 1, prefill_chunk and draft_len + 1 tokens.

    cache_len: positions of the static KV cache (prompt + new tokens must fit). prefill_chunk:
    prompt tokens a prefill call writes ("auto": DEFAULT_PREFILL_CHUNK or cache_len if shorter;
    None: no prefill entry, the prompt goes through the other entries). draft_len: the most
    drafts a speculative round verifies ("auto": DEFAULT_DRAFT_LEN or cache_len - 1 if fewer;
    None: no verify entry, no speculation). tokenizer: the zoo model whose tokenizer the model
    uses, for text in and out. ragged: a position per sequence (cache_position [batch, T]), so a
    batch holds prompts of different lengths and each sequence keeps its own drafts
    (flashc.ragged). draft_head: a flashc.draft_head.DraftHead for this model: the entries then
    return their hidden states too, and generate(..., speculate="head") drafts with it; it is
    saved with the model. exact_verify (CUDA targets, batch 1): the verify entry computes each of
    its tokens exactly as the decode entry computes one (CudaOptions.row_invariant), so greedy
    speculation is token for token plain decoding in bf16 too, where the verify step's batched
    products would otherwise round differently and part at near-ties of the logits; each weight is
    then read once a token (from L2 for a small model's layers). compile_kwargs go to
    flashc.compile for every entry (level, profile, quantize, calibration, prune, verify, ...).
    """
    from flashc.api import compile as compile_model
    from flashc.decode import DecodeStep, decode_example_inputs, state_layers

    if cache_len < 1:
        raise InputError(f"cache_len must be >= 1, got {cache_len}")
    if prefill_chunk == "auto":
        prefill_chunk = min(DEFAULT_PREFILL_CHUNK, cache_len) if cache_len >= 2 else None
    if draft_len == "auto":
        draft_len = min(DEFAULT_DRAFT_LEN, cache_len - 1) or None
    sizes = {"decode": 1}
    if prefill_chunk is not None:
        if not 2 <= prefill_chunk <= cache_len:
            raise InputError(f"prefill_chunk must be in 2..cache_len ({cache_len}), got {prefill_chunk}")
        sizes["prefill"] = prefill_chunk
    if draft_len is not None:
        if not 1 <= draft_len < cache_len:
            raise InputError(f"draft_len must be in 1..{cache_len - 1} (cache_len - 1), got {draft_len}")
        sizes["verify"] = draft_len + 1
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and cache_len > limit:
        raise InputError(f"cache_len {cache_len}: the model has {limit} positions (config.max_position_embeddings)")
    rewrite = None
    if compile_kwargs.get("ssm") is not None:  # rewrite once; every entry compiles the new model
        from flashc.api import _ssm_rewrite

        rewrite = _ssm_rewrite(compile_kwargs.pop("ssm"), compile_kwargs.get("calibration"), model, source)
        model = rewrite.model
        if compile_kwargs.get("quantize") is None and compile_kwargs.get("prune") is None:
            compile_kwargs.pop("calibration", None)
    compile_kwargs.pop("ssm", None)
    if ragged and state_layers(model):
        raise InputError("ragged=True: this model has state-space layers, and ragged batches feed padding through "
                         "the steps that would change their states; compile it without ragged")
    if draft_head is not None:
        from flashc.draft_head import check_head_fits

        if ragged:
            raise InputError("draft_head: ragged batches (a position per sequence) do not draft with a head yet; "
                             "compile without ragged=True, or without draft_head")
        check_head_fits(draft_head, model)
    step = DecodeStep(model, cache_len, hidden=draft_head is not None)
    base = source or ModelSource("module", type(model).__name__)
    entries = {}
    items = list(sizes.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="compile entries", unit="entry")
    if exact_verify:
        _check_exact_verify(target, batch, draft_len, compile_kwargs)
    for name, tokens in items:
        example = decode_example_inputs(model, batch, cache_len, tokens=tokens, per_sequence=ragged)
        src = ModelSource(base.kind, base.name, base.dtype, base.seed, batch, tokens, "decode", cache_len)
        kwargs = compile_kwargs
        if exact_verify and name == "verify":
            kwargs = {**compile_kwargs, "options": {**(compile_kwargs.get("options") or {}), "row_invariant": True}}
        entries[name] = compile_model(step, target, example, source=src, **kwargs)
    share_weights(entries)
    if rewrite is not None:
        entries["decode"].rewrites = {"attention -> SSM": rewrite.rows()}
    gm = GenerationModel(entries, tokenizer=tokenizer, draft_head=draft_head)
    if gm.on_gpu:
        gm.warm_up()
    return gm


def _check_exact_verify(target: str, batch: int, draft_len, compile_kwargs: dict) -> None:
    from flashc.targets import get_target

    if get_target(target).backend().name != "cuda":
        raise InputError(f"exact_verify: target {target!r} does not run the CUDA backend; the option makes the "
                         "CUDA kernels compute a verify step row by row (other targets: leave it off)")
    if batch != 1:
        raise InputError(f"exact_verify: batch {batch}; the verify step is computed row by row at batch 1 only")
    if draft_len is None:
        raise InputError("exact_verify: draft_len=None compiles no verify entry to make exact")
    if (compile_kwargs.get("options") or {}).get("row_invariant") is False:
        raise InputError("exact_verify: options={'row_invariant': False} contradicts it")


def share_weights(entries: dict[str, CompiledModel]) -> int:
    """Let every entry hold the decode entry's tensor for a weight equal to it (by name, shape,
    dtype and value), so the entries keep one copy in memory; returns how many were shared.

    Backends that run the program's own weights (cpu, eager: flashc.ir.Program.run_flat) then
    read the shared tensors; an executable holding device copies of its own shares them when
    it has `share_weights_from(donor_executable)` (the CUDA target: one set on the GPU).
    """
    donor = entries["decode"].program.params
    shared = 0
    for name, cm in entries.items():
        if name == "decode":
            continue
        params = cm.program.params
        for key, t in params.items():
            d = donor.get(key)
            if d is not None and d is not t and d.shape == t.shape and d.dtype == t.dtype and torch.equal(d, t):
                params[key] = d
                shared += 1
        share_device = getattr(cm.executable, "share_weights_from", None)
        if share_device is not None:
            shared += share_device(entries["decode"].executable)
    return shared


class GenerationModel:
    """Compiled entry points of one causal LM and the KV cache they share; see the module docstring."""

    def __init__(self, entries: dict[str, CompiledModel], tokenizer: str | None = None, draft_head=None) -> None:
        unknown = set(entries) - set(ENTRIES)
        if "decode" not in entries or unknown:
            raise InputError(f"a generation model has entries {', '.join(ENTRIES)} with decode among them; "
                             f"got {', '.join(entries)}")
        decode = entries["decode"]
        for name, cm in entries.items():
            if cm.program.meta.signature != "decode":
                raise InputError(f"entry {name!r} was not compiled from a decode step (flashc.decode.DecodeStep)")
            if [(s.shape, s.dtype) for s in cm.inputs[2:]] != [(s.shape, s.dtype) for s in decode.inputs[2:]]:
                raise InputError(f"entry {name!r} has another KV cache than the decode entry: compile every entry "
                                 "from the same model, batch and cache_len")
            if cm.target != decode.target:
                raise InputError(f"entry {name!r} is compiled for target {cm.target!r}, decode for {decode.target!r}")
        self.entries = dict(entries)
        self.tokenizer_name = tokenizer
        self._tokenizer = None
        self._steps: Steps | None = None
        # what speculation measured (step times, acceptance, probe waits), kept across generate() calls:
        # (drafter, draft length, greedy, adaptive) -> flashc.speculate.Learned
        self._learned: dict[tuple, Any] = {}
        self.last_stats: GenerationStats | None = None  # what the last generate() call did (report())
        self._drafts: dict[str, Any] = {}  # compiled on demand: drafts ('layerskip:E'), early exits (EarlyExitModel)
        self.draft_head = None  # a flashc.draft_head.DraftHead bound to the decode entry's weights
        if draft_head is not None:
            self.attach_draft_head(draft_head)

    @classmethod
    def from_decode(cls, cm: CompiledModel) -> "GenerationModel":
        """A one-entry generation model over a decode-step CompiledModel (an older artifact)."""
        return cls({"decode": cm})

    # -- shape of what was compiled ---------------------------------------------------

    @property
    def decode(self) -> CompiledModel:
        return self.entries["decode"]

    @property
    def ragged(self) -> bool:
        """Whether each sequence has its own positions (prompts of different lengths)."""
        return len(self.decode.inputs[1].shape) == 2

    @property
    def batch(self) -> int:
        return self.decode.inputs[0].shape[0]

    @property
    def cache_len(self) -> int:
        high = self.decode.program.meta.input_high.get("cache_position")
        return int(high) if high else self.decode.inputs[2].shape[2]

    @property
    def stateful(self) -> bool:
        """Whether the model carries recurrent states (state-space layers) beside or instead of a KV cache."""
        return any(s.name.startswith("ssm_state_") for s in self.decode.inputs[2:])

    @property
    def vocab_size(self) -> int:
        size = self.decode.program.meta.vocab_size
        if not size:
            raise InputError("the decode entry does not record its vocabulary size (config.vocab_size)")
        return int(size)

    @property
    def draft_len(self) -> int | None:
        """The most drafts a speculative round verifies (None: no verify entry)."""
        verify = self.entries.get("verify")
        return verify.inputs[0].shape[1] - 1 if verify is not None else None

    @property
    def prefill_chunk(self) -> int | None:
        prefill = self.entries.get("prefill")
        return prefill.inputs[0].shape[1] if prefill is not None else None

    @property
    def tokenizer(self):
        """The tokenizer of the zoo model named at compile time (None without one)."""
        if self._tokenizer is None and self.tokenizer_name is not None:
            from flashc import zoo

            self._tokenizer = zoo.tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def on_gpu(self) -> bool:
        """Whether the entries run on the GPU (a CUDA target, with a GPU here)."""
        return _entry_device(self.decode) == "cuda"

    def warm_up(self) -> None:
        """Call every entry once, so that what a CUDA entry does on its first call (autotuning its
        kernels on their shapes, capturing its CUDA graph) happens now and not inside a generate()
        call that first reaches that entry (a draft's catch-up entry, seconds into a timed run).
        compile_generation does it for CUDA targets; a loaded model may call it. The calls write
        dummy tokens at the first positions; the cache is zeroed after, as it was allocated."""
        steps = self.steps()
        for cm in self.entries.values():
            ids_spec, positions_spec = cm.inputs[0], cm.inputs[1]
            call = steps.calls[ids_spec.shape[1]]
            ids = torch.zeros(ids_spec.shape, dtype=ids_spec.dtype, device=steps.device)
            positions = torch.arange(ids_spec.shape[1], device=steps.device).expand(positions_spec.shape)
            call(ids, positions.to(positions_spec.dtype), *steps.kv_cache)
        for t in steps.kv_cache:
            t.zero_()
        if steps.device.type == "cuda":
            torch.cuda.synchronize(steps.device)

    def steps(self) -> Steps:
        """The entries as a Steps over the resident KV cache (allocated on first use, where the
        entries run)."""
        if self._steps is None:
            device = "cuda" if self.on_gpu else "cpu"
            cache = [torch.zeros(s.shape, dtype=s.dtype, device=device) for s in self.decode.inputs[2:]]
            steps = None

            def record(hidden: torch.Tensor, positions: torch.Tensor) -> None:
                steps.last_hidden, steps.last_positions = hidden, positions

            calls = {cm.inputs[0].shape[1]: _step_call(cm, record) for cm in self.entries.values()}
            steps = self._steps = Steps(calls, cache, cache_len=self.cache_len, stateful=self.stateful)
        return self._steps

    @property
    def returns_hidden(self) -> bool:
        """Whether every entry returns its hidden states beside the logits (what a draft head reads)."""
        return all(_returns_hidden(cm) for cm in self.entries.values())

    def attach_draft_head(self, head) -> None:
        """Use `head` (a flashc.draft_head.DraftHead) for speculate="head": bound to the decode
        entry's embedding and LM head, where the entries run. The entries must return their
        hidden states (compile_generation(..., draft_head=...) compiles them so)."""
        if not self.returns_hidden:
            raise InputError("draft head: this model's entries do not return hidden states; compile it with "
                             "compile_generation(..., draft_head=head) or `flashc compile ... --signature generate "
                             "--draft-head DIR`")
        if head.config.vocab_size != self.vocab_size:
            raise InputError(f"draft head: made for {head.config.vocab_size} tokens, this model has {self.vocab_size}")
        device = self.steps().device if self._steps is not None else _entry_device(self.decode)
        self.draft_head = head.bind_program(self.decode.program, device)

    # -- generation -------------------------------------------------------------------

    def generate(self, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_token_id: int | None = None,
                 speculate: "str | GenerationModel | None" = None, draft_len: int | None = None,
                 adaptive: bool = True, on_tokens: Callable[[torch.Tensor], None] | None = None,
                 progress: bool = False, return_stats: bool = False, ignore_eos: bool = False, early_exit=None):
        """Generate after `prompt`: token ids [B, P] (or [P] for one sequence), a list of 1-D id
        tensors of one length, or text (a string or a list of strings) when the model has a
        tokenizer. Returns what it was given, each prompt followed by its new tokens (ids, or
        text for text); with return_stats, (that, GenerationStats).

        Greedy at temperature 0, else sampled (top_k, top_p; seed for a reproducible draw).
        eos_token_id: a sequence stops there (its later tokens are eos); by default the model's end
        token (its generation config's, as Hugging Face's generate), or for text the tokenizer's;
        ignore_eos generates max_new_tokens. A tokenizer's output (input_ids and attention_mask)
        is taken too: each row's unpadded tokens are one prompt (a padded batch needs a ragged model),
        returned as a list like a list of prompts. speculate: None, "ngram" (prompt lookup), "head" (the
        draft head compiled in: compile_generation(..., draft_head=)), "draft:ARTIFACT" or a
        GenerationModel with the same tokenizer (a smaller model drafts; compile it with a
        verify entry too: after plain rounds it catches up on the tokens it missed through its
        largest entry that fits, else one token a call); speculation needs the verify entry;
        draft_len (at most the entry's) caps the drafts a round; adaptive picks the draft length
        each round from measured acceptance and step times, and plain steps where speculation
        would be slower; what it measured carries over to this model's next calls with the same
        drafter (a drafter that did not pay is probed less and less often). Greedy output is
        token for token that of plain decoding; sampled output keeps the model's distribution
        (flashc.speculate.accept).
        early_exit: 'E', 'E:TAU', a flashc.early_exit.EarlyExit or an EarlyExitModel: a token
        leaves after layer E where the exit is confident (lossy, greedy; flashc.early_exit).
        on_tokens(new[B, n]) is called after every round.
        """
        rows, as_text, one_dim = self._prompt_rows(prompt)
        if eos_token_id is None and not ignore_eos:
            eos_token_id = self.tokenizer.eos_token_id if as_text else self.decode.program.meta.eos_token_id
        exit_model = None
        if early_exit is not None:
            exit_model = self._early_exit(early_exit, speculate, draft_len, temperature)
        speculator = self._speculator(speculate, draft_len, adaptive, temperature, top_k, top_p)
        stats = GenerationStats()
        with torch.no_grad():
            if self.ragged:
                out_rows = self._generate_ragged(rows, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
                                                 speculator, on_tokens, progress, stats)
            else:
                out = generate(self.steps(), self._stack(rows), max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id, progress=progress,
                               speculator=speculator, on_tokens=on_tokens, stats=stats, early_exit=exit_model)
                out_rows = list(out.cpu())
        self.last_stats = stats
        if as_text:
            result = [self._decode_text(row, eos_token_id) for row in out_rows]
            result = result[0] if isinstance(prompt, str) else result
        elif isinstance(prompt, (list, tuple, Mapping)):  # a tokenizer's output: its rows without the padding
            result = out_rows
        else:
            width = max(len(r) for r in out_rows)  # rows that stopped at eos are filled with it
            fill = eos_token_id if eos_token_id is not None else 0
            out = torch.stack([torch.cat([r, r.new_full((width - len(r),), fill)]) for r in out_rows])
            result = out[0] if one_dim else out
        return (result, stats) if return_stats else result

    def _generate_ragged(self, rows, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id, speculator,
                         on_tokens, progress, stats) -> list[torch.Tensor]:
        from flashc.ragged import generate_ragged

        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        steps = self.steps()
        sampling = Sampling.make(temperature, top_k, top_p, seed, steps.device)
        new = [[] for _ in rows]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_new_tokens, desc="generate", unit="tok")
        for news in generate_ragged(steps, rows, max_new_tokens, sampling,
                                    eos_token_id=eos_token_id, speculator=speculator, stats=stats):
            for acc, n in zip(new, news):
                acc += n
            if on_tokens is not None:
                on_tokens(news)
            if bar is not None:
                bar.n = max(len(n) for n in new)
                bar.refresh()
        if bar is not None:
            bar.close()
        return [torch.cat([r, torch.tensor(n, dtype=r.dtype)]) for r, n in zip(rows, new)]

    def _stack(self, rows: list[torch.Tensor]) -> torch.Tensor:
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise InputError(f"prompts of different lengths ({', '.join(map(str, lengths))} tokens): this model's "
                             "steps share one position vector across the batch; compile it with "
                             "compile_generation(..., ragged=True) (a position per sequence), or pass prompts of one "
                             "length")
        return torch.stack(rows)

    def stream(self, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, eos_token_id: int | None = None,
               speculate: "str | GenerationModel | None" = None, draft_len: int | None = None,
               adaptive: bool = True) -> Iterator:
        """Like generate, one item per round as it is produced: the new text of a one-string
        prompt, else the new token ids [B, n]."""
        rows, as_text, _ = self._prompt_rows(prompt)
        if self.ragged:
            raise InputError("stream() takes the shared-position entries; with ragged=True use generate(..., "
                             "on_tokens=callback), which gets each round's new tokens per sequence")
        ids = self._stack(rows)
        if as_text and eos_token_id is None:
            eos_token_id = self.tokenizer.eos_token_id
        if ids.shape[1] + max_new_tokens > self.cache_len:
            raise InputError(f"prompt of {ids.shape[1]} tokens + {max_new_tokens} new tokens does not fit the "
                             f"static KV cache of {self.cache_len} positions; compile with a larger cache_len")
        speculator = self._speculator(speculate, draft_len, adaptive, temperature, top_k, top_p)
        steps = self.steps()
        sampling = Sampling.make(temperature, top_k, top_p, seed, steps.device)
        text_so_far, new_ids = "", []
        with torch.no_grad():
            for new in generate_rounds(steps, ids, max_new_tokens, sampling, eos_token_id=eos_token_id,
                                       speculator=speculator):
                if not (as_text and isinstance(prompt, str)):
                    yield new.cpu()
                    continue
                new_ids += new[0].tolist()
                text = self._decode_text(torch.tensor(new_ids), eos_token_id)
                if text != text_so_far:  # a piece of a multi-byte character waits for the rest
                    yield text[len(text_so_far):] if text.startswith(text_so_far) else text
                    text_so_far = text

    def _decode_text(self, row: torch.Tensor, eos_token_id: int | None) -> str:
        ids = row.tolist()
        if eos_token_id is not None and eos_token_id in ids:
            ids = ids[:ids.index(eos_token_id) + 1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _prompt_rows(self, prompt) -> tuple[list[torch.Tensor], bool, bool]:
        """(one 1-D id tensor per sequence, whether the prompt was text, whether it was one 1-D tensor)."""
        as_text = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                              and all(isinstance(p, str) for p in prompt))
        one_dim = False
        if as_text:
            if self.tokenizer is None:
                raise InputError("a text prompt needs the model's tokenizer: this model was compiled without one "
                                 "(compile a zoo model with real weights, or pass token ids)")
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            rows = [torch.tensor(self.tokenizer(t)["input_ids"], dtype=torch.long) for t in texts]
        elif (given := tokenizer_output(prompt)) is not None:  # one row per sequence, padding dropped
            rows = [row[kept] for row, kept in zip(*given)]
        elif isinstance(prompt, torch.Tensor):
            one_dim = prompt.dim() == 1
            rows = [prompt] if one_dim else list(prompt)
            if prompt.dim() not in (1, 2):
                raise InputError(f"prompt ids must be [prompt_len] or [batch, prompt_len], got {tuple(prompt.shape)}")
        elif isinstance(prompt, (list, tuple)) and all(isinstance(p, torch.Tensor) for p in prompt):
            rows = list(prompt)
            if any(r.dim() != 1 for r in rows):
                raise InputError("a list of prompts holds 1-D token id tensors, one per sequence")
        else:
            raise InputError(f"prompt must be token ids (a tensor or a list of 1-D tensors) or text, "
                             f"got {type(prompt).__name__}")
        if len(rows) != self.batch:
            raise InputError(f"{len(rows)} prompt(s), but this model was compiled for batch {self.batch}")
        if min(len(r) for r in rows) < 1:
            raise InputError("a prompt needs at least one token")
        rows = [r.long().cpu() for r in rows]
        low, high = min(int(r.min()) for r in rows), max(int(r.max()) for r in rows)
        if low < 0 or high >= self.vocab_size:
            raise InputError(f"prompt token ids must be in 0..{self.vocab_size - 1} (the vocabulary), got "
                             f"{low}..{high}")
        return rows, bool(as_text), one_dim

    def _speculator(self, speculate, draft_len: int | None, adaptive: bool, temperature: float,
                    top_k: int | None, top_p: float | None):
        from flashc.speculate import Learned, ModelDrafter, NgramDrafter, Speculator

        if speculate is None:
            if draft_len is not None:
                raise InputError("draft_len applies to speculation: add speculate='ngram' or a draft model")
            return None
        if self.stateful:
            raise InputError(f"speculate={speculate!r}: this model has state-space layers (attention -> SSM), whose "
                             "state a rejected draft would leave changed; flashc does not roll recurrent states "
                             "back yet, so it decodes such models without speculation (drop speculate=)")
        check_sampling(temperature, top_k, top_p)
        if self.draft_len is None:
            raise InputError(f"speculate={_spec_name(speculate)}: this model has no verify entry; compile it with "
                             "flashc.generation.compile_generation(..., draft_len=K) or `flashc compile "
                             "--signature generate --draft-len K`")
        k = self.draft_len if draft_len is None else draft_len
        if not 1 <= k <= self.draft_len:
            raise InputError(f"draft_len must be in 1..{self.draft_len} (the verify entry checks {self.draft_len} "
                             f"drafts), got {k}")
        learned = self._learned.setdefault((speculate if isinstance(speculate, str) else id(speculate), k,
                                            temperature == 0, adaptive), Learned())
        if isinstance(speculate, str) and speculate.startswith("draft:"):
            from flashc.compiled import load

            speculate = load(speculate[len("draft:"):])
            speculate = speculate if isinstance(speculate, GenerationModel) else GenerationModel.from_decode(speculate)
        elif isinstance(speculate, str) and speculate.startswith("layerskip:"):
            speculate = self._layerskip_draft(speculate)
        if isinstance(speculate, GenerationModel):
            drafter = ModelDrafter(speculate.steps(), self._check_drafter(speculate))
        elif speculate == "ngram":
            drafter = NgramDrafter()
        elif speculate == "head":
            from flashc.draft_head import HeadDrafter

            if self.draft_head is None:
                raise InputError("speculate='head': this model has no draft head; train one with `flashc train-draft "
                                 "MODEL -o HEAD_DIR` (or flashc.draft_head.train_draft_head) and compile with "
                                 "`--draft-head HEAD_DIR` (compile_generation(..., draft_head=head))")
            if self.ragged:
                raise InputError("speculate='head': ragged batches (a position per sequence) do not draft with a "
                                 "head yet; use speculate='ngram' or a model compiled without ragged=True")
            drafter = HeadDrafter(self.draft_head, self.steps())
        else:
            raise InputError(f"speculate={speculate!r}: known are 'ngram' (prompt lookup), 'head' (the model's "
                             "draft head), 'draft:ARTIFACT', 'layerskip:E' (the model's first E layers) and a "
                             "GenerationModel (a smaller model with the same tokenizer)")
        return Speculator(drafter, k, adaptive=adaptive, learned=learned)

    def _layerskip_draft(self, spec: str) -> "GenerationModel":
        """speculate='layerskip:E': the model's first E layers as a draft, compiled once from the
        model the entries' source names (a zoo model or a factory file) and kept."""
        from flashc.layerskip import compile_layerskip

        try:
            exit_layer = int(spec.split(":", 1)[1])
        except ValueError:
            raise InputError(f"speculate={spec!r}: layerskip:E takes the exit layer E, e.g. 'layerskip:8'") from None
        cached = self._drafts.get(spec)
        if cached is not None:
            return cached
        model = self._source_model(f"speculate={spec!r}", "draft with flashc.layerskip.compile_layerskip(model, "
                                   "...) and pass it as speculate=")
        draft = compile_layerskip(model, self.decode.target, exit_layer=exit_layer, cache_len=self.cache_len,
                                  batch=self.batch, prefill_chunk=self.prefill_chunk, level=self.decode.level,
                                  profile=self.decode.profile, tokenizer=self.tokenizer_name)
        self._drafts[spec] = draft
        return draft

    def _source_model(self, option: str, instead: str) -> torch.nn.Module:
        """The eager model the entries were compiled from, rebuilt from their source (a zoo model or
        a factory file) with the compiled weights when they were kept; an in-memory module cannot be
        rebuilt: an error naming the option and what to do `instead`."""
        from flashc.models import build_model

        src = self.decode.source
        if src.kind not in ("zoo", "factory"):
            raise InputError(f"{option}: this model was compiled from an in-memory module, which flashc cannot "
                             f"rebuild; {instead}")
        model, _ = build_model(ModelSource(src.kind, src.name, src.dtype, src.seed, self.batch, src.seq_len))
        if self.decode.reference_weights is not None:  # the weights compiled, when they were kept
            model.load_state_dict(self.decode.reference_weights, strict=False)
        return model

    def _early_exit(self, early_exit, speculate, draft_len: int | None, temperature: float):
        """generate(early_exit=...) as a checked flashc.early_exit.EarlyExitModel; 'E[:TAU]' and an
        EarlyExit are compiled (and calibrated, without TAU) from the model the entries' source
        names, once per rule."""
        from flashc.early_exit import EarlyExit, EarlyExitModel, prepare_early_exit

        if speculate is not None or draft_len is not None:
            raise InputError("early_exit and speculate/draft_len do not combine: early exit keeps its own tokens "
                             "(lossy), speculation verifies every draft (lossless); choose one")
        if temperature > 0:
            raise InputError(f"early_exit is greedy only (temperature 0), got temperature={temperature}: a sampled "
                             "token has no single exit decision to calibrate")
        if isinstance(early_exit, EarlyExitModel):
            early_exit.check_target(self)
            return early_exit
        rule = EarlyExit.parse(early_exit)
        key = f"early-exit:{rule}"
        cached = self._drafts.get(key)
        if cached is not None:
            return cached
        model = self._source_model(f"early_exit={early_exit!r}", "use flashc.early_exit.prepare_early_exit(model, "
                                   "gm, ...) and pass its answer as early_exit=")
        exit_model = prepare_early_exit(model, self, rule)
        self._drafts[key] = exit_model
        return exit_model

    def _check_drafter(self, draft: "GenerationModel") -> int:
        """The target's vocabulary size, once the drafter is known to share its tokenizer."""
        if draft is self:
            raise InputError("the draft model is the target itself: it would draft nothing faster")
        if draft.batch != self.batch:
            raise InputError(f"the draft model was compiled for batch {draft.batch}, the target for {self.batch}")
        if draft.cache_len < self.cache_len:
            raise InputError(f"the draft model's KV cache ({draft.cache_len} positions) is shorter than the "
                             f"target's ({self.cache_len}); compile the drafter with cache_len >= {self.cache_len}")
        mine, theirs = self.tokenizer_name, draft.tokenizer_name
        if (mine is None) != (theirs is None):
            raise InputError("the draft model and the target must share a tokenizer: one was compiled with a "
                             f"tokenizer ({mine or theirs}), the other without")
        if mine is not None and mine != theirs and self.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise InputError(f"the draft model's tokenizer ({theirs}) is not the target's ({mine}): drafts would "
                             "be other tokens")
        if draft.vocab_size != self.vocab_size:
            if mine is None:
                raise InputError(f"the draft model has {draft.vocab_size} tokens, the target {self.vocab_size}, and "
                                 "neither has a tokenizer that says they are the same tokens")
            used = len(self.tokenizer)
            if used > min(draft.vocab_size, self.vocab_size):
                raise InputError(f"the tokenizer has {used} tokens but the draft model's vocabulary has "
                                 f"{draft.vocab_size} and the target's {self.vocab_size}")
            warnings.warn(f"the draft model's vocabulary has {draft.vocab_size} rows and the target's "
                          f"{self.vocab_size}: they differ only in padding rows past the tokenizer's {used} tokens, "
                          "which are never drafted", stacklevel=4)
        return self.vocab_size

    # -- reports and artifacts --------------------------------------------------------

    def report(self) -> str:
        """The entries (describe()) and, after a generate() call, what it measured: time to
        first token, tokens/s, acceptance, tokens per speculative round, speedup over plain steps."""
        text = self.describe()
        if self.last_stats is not None:
            import io

            from rich.console import Console

            from flashc.generate import stats_table

            console = Console(record=True, width=100, file=io.StringIO(), color_system=None)
            console.print(stats_table(self.last_stats))
            text += "\n" + console.export_text().rstrip("\n")
        return text

    def describe(self) -> str:
        """One line per entry: tokens per call, target, level, kernels' estimate."""
        lines = [f"generation model: batch {self.batch}, KV cache {self.cache_len} positions, target "
                 f"{self.decode.target}, tokenizer {self.tokenizer_name or '-'}"]
        for name, cm in self.entries.items():
            est = cm.report().estimate
            lines.append(f"  {name:8s} {cm.inputs[0].shape[1]:5d} tokens a call, -O{cm.level}, "
                         f"{est.kernels} kernels, estimated {est.seconds * 1e3:.3f} ms on {cm.profile.name}")
        if self.draft_head is not None:
            c = self.draft_head.config
            own = sum(p.numel() for p in self.draft_head.parameters())
            lines.append(f"  draft head: {own / 1e6:.2f} M weights of its own (hidden {c.hidden_size}, width "
                         f"{c.intermediate_size}), trained {c.trained_steps} steps; speculate='head'")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the entries under one artifact directory, atomically (flashc.artifact)."""
        from flashc.artifact import GENERATION_MANIFEST, write_artifact

        manifest = {"kind": GENERATION_KIND, "entries": {name: name for name in self.entries},
                    "tokenizer": self.tokenizer_name, "batch": self.batch, "cache_len": self.cache_len}
        shared = self.decode.program.params
        writers = {name: (lambda p, cm=cm: cm.save(p, weights_elsewhere=None if cm is self.decode else shared))
                   for name, cm in self.entries.items()}
        if self.draft_head is not None:  # its own small artifact inside, listed (and checksummed) with the files
            writers[DRAFT_HEAD_DIR] = self.draft_head.save
        return write_artifact(path, manifest, writers, schema=GENERATION_MANIFEST)


def _step_call(cm: CompiledModel, record: Callable[[torch.Tensor, torch.Tensor], None] | None = None):
    """The entry's executable as a step: (ids, positions, *kv) -> logits [B, T, V]. An entry
    that returns its hidden states too hands them and the positions to record(hidden, positions)."""
    executable = cm.executable
    if record is None or not _returns_hidden(cm):
        def call(ids: torch.Tensor, positions: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
            return executable(ids, positions, *kv)[0]
        return call

    def call_recording(ids: torch.Tensor, positions: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
        out = executable(ids, positions, *kv)
        record(out[1], positions)
        return out[0]

    return call_recording


def _returns_hidden(cm: CompiledModel) -> bool:
    """Whether the entry was compiled from DecodeStep(hidden=True): (logits, hidden) out."""
    spec = cm.program.out_spec
    return spec is not None and spec.num_leaves == 2


def _entry_device(cm: CompiledModel) -> str:
    from flashc.targets import get_target

    return "cuda" if get_target(cm.target).backend().name == "cuda" and torch.cuda.is_available() else "cpu"


def _spec_name(speculate) -> str:
    return repr(speculate) if isinstance(speculate, str) else type(speculate).__name__


def is_generation_artifact(path: str | os.PathLike) -> bool:
    """Whether the artifact at path is a generation model's (by its manifest's kind)."""
    from flashc.artifact import MANIFEST

    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("kind") == GENERATION_KIND


def load_generation(path: str | os.PathLike) -> GenerationModel:
    """Load what GenerationModel.save wrote (checksums checked, nothing unpickled)."""
    from flashc.artifact import GENERATION_MANIFEST, MANIFEST, read_manifest
    from flashc.compiled import load

    path = Path(path)
    manifest = read_manifest(path, schema=GENERATION_MANIFEST)
    unknown = set(manifest["entries"]) - set(ENTRIES)
    if unknown or "decode" not in manifest["entries"]:
        raise ArtifactError(f"{path / MANIFEST}: field 'entries' must name decode and any of {', '.join(ENTRIES)}, "
                            f"found {', '.join(manifest['entries'])}")
    decode = load(path / manifest["entries"]["decode"])
    entries = {"decode": decode}
    for name, sub in manifest["entries"].items():
        if name != "decode":  # weights equal to the decode entry's are stored (and held) once
            entries[name] = load(path / sub, external_weights=decode.program.params)
    head = None
    if f"{DRAFT_HEAD_DIR}/{MANIFEST}" in manifest["files"]:
        from flashc.draft_head import load_draft_head

        head = load_draft_head(path / DRAFT_HEAD_DIR)
    try:
        return GenerationModel(entries, tokenizer=manifest.get("tokenizer"), draft_head=head)
    except FlashcError as e:
        raise ArtifactError(f"{path}: the entries do not form one generation model ({e}); recompile") from None


"""A small draft head on the target's last hidden state (EAGLE-style speculation, issue #18).

    head = flashc.draft_head.train_draft_head(model, tokens, steps=300)   # minutes on a CPU
    head = train_draft_head(model, tokens, self_distill=64, tokenizer=tok)  # on its own answers
    gm = compile_generation(model, "cpu", cache_len=512, draft_head=head)
    gm.generate(prompt_ids, 64, speculate="head")
    gm.save("out/gen")                                                   # the head goes with it

EAGLE (Li et al. 2024, arXiv:2401.15077) drafts at the level of features, not tokens: from
the target's hidden state f_t (what its LM head reads) and the next token x_{t+1}, a small
network predicts f_{t+1}, and the target's own LM head turns that into draft probabilities.
Drafts 2..k feed the drafted token and the predicted feature back in. The head here has no
attention (Hydra-like, Ankner et al. 2024), to stay a few MB:

    f_{t+1} ~ f_t + W_down silu(W_up [rms(f_t); rms(embed(x_{t+1}))])

with the target's embedding and LM head shared, not copied: the head stores only its norms
and two matrices, and names the target tensors it reads (`HeadConfig.embed`, `.lm_head`).

The compiled entries return their hidden states beside the logits (flashc.decode.DecodeStep
with hidden=True); each call leaves them on the Steps (`last_hidden`, `last_positions`), and
`HeadDrafter` reads the one at the position before the pending token. Speculation stays
lossless whatever the head predicts: the target verifies every draft (flashc.speculate.accept,
with the head's draft probabilities for sampling).

Training (`train_draft_head`) runs the target once over the calibration text to get its
hidden states, then trains the head through flashc.distill.train on windows of them: the KL
divergence of the target's next-token distribution to the head's, plus a smooth-L1 regression
of the predicted feature (EAGLE's two losses), with the head also fed its own predictions
for `unroll` steps, as drafts 2..k are made at generation time.

With `self_distill=N` the head trains on the target's own answers instead (as EAGLE-2 and
HASS do): N prompts made from paragraphs of the text (user messages of a chat model, asking
to continue, summarize, explain or start a story from them), the target's greedy answers to
them (eager generate, batched), and its hidden states over prompt + answer. A head trained on
the text itself learns the text's distribution, and drafts poorly what a chat model answers
(bench/RESULTS.md, session 10). `continuation_agreement` measures exactly that: the first
draft's agreement with the target on the target's own continuation of a prompt.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from flashc.errors import ArtifactError, FlashcError, InputError, UnsupportedOpError

if TYPE_CHECKING:
    from flashc.speculate import Plan

HEAD_KIND = "draft_head"
HEAD_WEIGHTS = "head.safetensors"
DEFAULT_CONTEXT = 256  # tokens per forward of the target when collecting its hidden states
HELD_OUT = 0.1  # share of the calibration tokens kept out of training to measure the head


@dataclass(frozen=True)
class HeadConfig:
    """The head's shape and the target tensors it reads, by their names in the target model
    (`model.named_parameters()`); tied: the LM head is the embedding (one tensor, two names)."""

    hidden_size: int
    vocab_size: int
    intermediate_size: int
    embed: str
    lm_head: str
    lm_head_bias: str | None = None
    tied: bool = False
    eps: float = 1e-6
    model: str = ""  # the target's class, for messages
    trained_steps: int = 0

    @classmethod
    def from_json(cls, data: Any, where: str) -> "HeadConfig":
        names = {f for f in cls.__dataclass_fields__}
        if not isinstance(data, dict) or set(data) - names:
            unknown = sorted(set(data) - names) if isinstance(data, dict) else data
            raise ArtifactError(f"{where}: field 'config' is not a draft head's configuration (unknown {unknown})")
        try:
            config = cls(**data)
        except TypeError as e:
            raise ArtifactError(f"{where}: field 'config' is incomplete ({e})") from None
        for name in ("hidden_size", "vocab_size", "intermediate_size"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArtifactError(f"{where}: field 'config.{name}' must be a positive integer, found {value!r}")
        return config


class DraftHead(torch.nn.Module):
    """f_{t+1} = f_t + MLP([rms(f_t); rms(embed(x_{t+1}))]) and the target's LM head on it.

    Its own weights are float32 and all that it saves; the embedding and LM head are the
    target's, attached by `bind` (a model's tensors, or a compiled program's)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.feature_norm = torch.nn.RMSNorm(h, eps=config.eps)
        self.token_norm = torch.nn.RMSNorm(h, eps=config.eps)
        self.up = torch.nn.Linear(2 * h, config.intermediate_size)
        self.down = torch.nn.Linear(config.intermediate_size, h)
        # The target's tensors: plain attributes, so state_dict() and save hold the head's only.
        self.embed_weight: torch.Tensor | None = None
        self.lm_head_weight: torch.Tensor | None = None
        self.lm_head_bias: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, intermediate_size: int | None = None, seed: int = 0) -> "DraftHead":
        """An untrained head for a Hugging Face causal LM, bound to its embedding and LM head.

        intermediate_size: the MLP's width (default 2 x hidden size: about 6 h^2 weights, 2 M
        for SmolLM2-135M's h = 576)."""
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        if embed is None or head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise InputError(f"draft head: {type(model).__name__} has no input embedding or output embedding (LM "
                             "head) with a weight; a draft head needs a Hugging Face causal LM")
        names = _names_of(model)
        vocab, hidden = head.weight.shape
        if embed.weight.shape[1] != hidden:
            raise InputError(f"draft head: {type(model).__name__}'s embedding has width {embed.weight.shape[1]} and "
                             f"its LM head reads {hidden}: the head feeds one into the other's space")
        bias = getattr(head, "bias", None)
        config = HeadConfig(hidden_size=hidden, vocab_size=vocab,
                            intermediate_size=intermediate_size or 2 * hidden,
                            embed=names[id(embed.weight)][0], lm_head=names[id(head.weight)][-1],
                            lm_head_bias=names[id(bias)][-1] if isinstance(bias, torch.Tensor) else None,
                            tied=embed.weight is head.weight,
                            eps=float(getattr(getattr(model, "config", None), "rms_norm_eps", 1e-6) or 1e-6),
                            model=type(model).__name__)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            new = cls(config).float()
        return new.bind(embed.weight, head.weight, bias)

    # -- the target's tensors ---------------------------------------------------------

    def bind(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
             lm_head_bias: torch.Tensor | None = None) -> "DraftHead":
        """Attach the target's embedding [V, H] and LM head [V, H] (+ bias [V]); returns self."""
        c = self.config
        for name, t, shape in (("embedding", embed_weight, None), ("LM head", lm_head_weight, (c.vocab_size,
                                                                                                c.hidden_size))):
            if t.dim() != 2 or t.shape[1] != c.hidden_size or (shape is not None and tuple(t.shape) != shape):
                raise InputError(f"draft head: the target's {name} is {tuple(t.shape)}, the head was made for hidden "
                                 f"size {c.hidden_size} and {c.vocab_size} tokens ({c.model}); train a head for "
                                 "this model (flashc train-draft)")
            if not t.is_floating_point():
                raise UnsupportedOpError(f"draft head: the target's {name} is {t.dtype} (quantized?); the head reads "
                                         "it as a float matrix: compile without quantizing the embedding and LM head")
        # detached: plain tensors sharing the target's storage, never the head's parameters (training
        # leaves the target alone, and save() writes the head's own weights only)
        self.embed_weight, self.lm_head_weight = embed_weight.detach(), lm_head_weight.detach()
        self.lm_head_bias = lm_head_bias.detach() if lm_head_bias is not None else None
        return self

    def bind_program(self, program, device: torch.device | str) -> "DraftHead":
        """Bind to a compiled decode step's weights (flashc.decode.DecodeStep holds the model as
        `model`, so a target weight `name` is the program's `p_model_<name with _ for .>`)."""
        c = self.config
        params = program.params

        def find(*names: str) -> torch.Tensor:
            for name in names:
                key = "p_model_" + name.replace(".", "_")
                if key in params:
                    return params[key]
            raise UnsupportedOpError(f"draft head: the compiled model has no weight {names[0]!r} (a pass renamed or "
                                     f"rewrote it, e.g. quantized it); the head reads the target's {names[0]} as "
                                     "is: compile without rewriting the embedding and LM head")

        tied = (c.lm_head,) if c.tied else ()
        embed = find(c.embed, *tied)
        head = find(c.lm_head, *((c.embed,) if c.tied else ()))
        bias = find(c.lm_head_bias) if c.lm_head_bias else None
        self.to(device)
        return self.bind(*(t.to(device) if t is not None else None for t in (embed, head, bias)))

    def _check_bound(self) -> None:
        if self.embed_weight is None:
            raise FlashcError("draft head: not bound to a target's embedding and LM head; use DraftHead.for_model, "
                              "bind(...) or compile_generation(..., draft_head=head)")

    # -- the network ------------------------------------------------------------------

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The predicted next features [..., H] from features [..., H] and the tokens that follow [...]."""
        self._check_bound()
        dtype = self.up.weight.dtype
        f = features.to(dtype)
        e = F.embedding(tokens, self.embed_weight).to(dtype)
        return f + self.down(F.silu(self.up(torch.cat([self.feature_norm(f), self.token_norm(e)], -1))))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The target's LM head on (predicted) features: [..., V]."""
        self._check_bound()
        w = self.lm_head_weight
        return F.linear(features.to(w.dtype), w, self.lm_head_bias)

    # -- saving -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the head's own weights (safetensors) and its config (the manifest) atomically."""
        from safetensors.torch import save_file

        from flashc.artifact import write_artifact

        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        manifest = {"kind": HEAD_KIND, "config": asdict(self.config), "weights": HEAD_WEIGHTS}
        return write_artifact(path, manifest, {HEAD_WEIGHTS: lambda p: save_file(tensors, str(p))},
                              schema=DRAFT_HEAD_MANIFEST)


def _names_of(model: torch.nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _head_manifest():
    from flashc.artifact import ARTIFACT_FIELDS, AnyJson, Record, RelPath

    return Record({**ARTIFACT_FIELDS, "kind": str, "config": AnyJson, "weights": RelPath()},
                  optional=frozenset({"flashc_version", "torch_version", "created"}))


DRAFT_HEAD_MANIFEST = _head_manifest()


def load_draft_head(path: str | os.PathLike) -> DraftHead:
    """What DraftHead.save wrote (checksums checked, nothing unpickled), not yet bound."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from flashc.artifact import MANIFEST, read_manifest

    path = Path(path)
    manifest = read_manifest(path, schema=DRAFT_HEAD_MANIFEST)
    where = str(path / MANIFEST)
    if manifest["kind"] != HEAD_KIND:
        raise ArtifactError(f"{where}: an artifact of kind {manifest['kind']!r}, not a draft head "
                            "(train one with `flashc train-draft MODEL -o DIR`)")
    head = DraftHead(HeadConfig.from_json(manifest["config"], where))
    try:
        tensors = load_file(str(path / manifest["weights"]))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path / manifest['weights']}: not a readable safetensors file ({e})") from None
    own = head.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise ArtifactError(f"{path}: the weights do not match the head's config (hidden "
                            f"{head.config.hidden_size}, width {head.config.intermediate_size}); retrain the head")
    head.load_state_dict(tensors)
    return head


def check_head_fits(head: DraftHead, model: torch.nn.Module) -> None:
    """Refuse a head trained for another model: widths, vocabulary and the tensors it reads."""
    c = head.config
    hidden = getattr(model.config, "hidden_size", None)
    vocab = getattr(model.config, "vocab_size", None)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = [n for n in (c.embed, c.lm_head, c.lm_head_bias) if n and n not in names]
    if hidden != c.hidden_size or vocab != c.vocab_size or missing:
        raise InputError(f"draft head: made for {c.model or 'a model'} with hidden size {c.hidden_size} and "
                         f"{c.vocab_size} tokens, reading {c.embed} and {c.lm_head}; this {type(model).__name__} has "
                         f"hidden size {hidden} and {vocab} tokens{f', and no {missing[0]}' if missing else ''}: "
                         "train a head for it (flashc train-draft)")


# -- drafting ----------------------------------------------------------------------------


class HeadDrafter:
    """Drafts k tokens with a DraftHead from the target's hidden state at the position before
    the pending token, which the target's last call left on the Steps (see the module doc)."""

    name = "head"
    cheap = False  # each draft is an LM head matmul: choose k first

    def __init__(self, head: DraftHead, steps) -> None:
        self.head = head
        self.steps = steps

    def reset(self) -> None:
        pass

    def accepted(self, length: int, n: int) -> None:
        pass  # the next round reads the verify call's hidden states: nothing to roll back

    def features(self, position: int) -> torch.Tensor:
        """The target's hidden state at `position`, [B, H], from the last call of its steps.

        The generation loop's last call always fed it: after the prefill it is the prompt's
        last token, after a plain step the token that step fed, after a verify call the last
        kept draft (or the pending token), inside the call."""
        hidden, positions = self.steps.last_hidden, self.steps.last_positions
        if hidden is None:
            raise FlashcError("draft head: the target's steps returned no hidden states; compile the model with "
                              "compile_generation(..., draft_head=head)")
        if positions.dim() != 1:
            raise InputError("draft head: ragged batches (a position per sequence) are not supported yet; compile "
                             "without ragged=True")
        first = int(positions[0])
        i = position - first
        if not 0 <= i < positions.shape[0] or int(positions[i]) != position:
            raise FlashcError(f"draft head: needs the target's hidden state at position {position}, but the last "
                              f"call fed positions {first}..{int(positions[-1])}; the head drafts only inside flashc's "
                              "generation loop, right after the call that fed that position")
        return hidden[:, i]

    @torch.no_grad()
    def propose(self, tokens: torch.Tensor, k: int, sampling, rows=None) -> Plan:
        from flashc.speculate import Plan

        length = tokens.shape[1]  # the pending token sits at length - 1
        f = self.features(length - 2)
        token = tokens[:, -1]
        drafts, qs = [], []
        for _ in range(k):
            f = self.head(f, token)
            token, q = sampling.draft(self.head.logits(f))
            drafts.append(token)
            if q is not None:
                qs.append(q)
        return Plan(torch.stack(drafts, 1).to(tokens.dtype), torch.stack(qs, 1) if qs else None)


# -- training ----------------------------------------------------------------------------


def lm_head_input(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, T, V], the LM head's input [B, T, H]) of an eager forward over ids [B, T]."""
    seen: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        out = model(input_ids=ids, use_cache=False)
    finally:
        hook.remove()
    logits = out if isinstance(out, torch.Tensor) else out.logits
    if len(seen) != 1 or seen[0].shape[:2] != ids.shape:
        raise UnsupportedOpError(f"draft head: {type(model).__name__}'s LM head ran {len(seen)} time(s) or not on "
                                 "every token; the head needs one hidden state per token")
    return logits, seen[0]


@dataclass
class TargetFeatures:
    """The target's hidden states over a token stream cut into segments, one forward each:
    features[i] belongs to tokens[i] and has seen the tokens of its segment before it."""

    tokens: torch.Tensor  # [N]
    features: torch.Tensor  # [N, H] float32
    segments: torch.Tensor  # [N] int64: which forward position i was computed in

    def __len__(self) -> int:
        return self.tokens.numel()


@torch.no_grad()
def target_features(model: torch.nn.Module, tokens: torch.Tensor, context: int = DEFAULT_CONTEXT,
                    batch: int = 4, progress: bool = True) -> TargetFeatures:
    """Run the target eagerly over tokens in windows of `context`; checks on the first batch
    that the LM head on these features gives the model's logits (no softcapping or scaling
    after the head, which the head could not reproduce)."""
    from tqdm.auto import tqdm

    n = tokens.numel() // context * context
    if n == 0:
        raise InputError(f"draft head: {tokens.numel()} calibration tokens, fewer than one window of {context}")
    windows = tokens[:n].view(-1, context)
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    feats = []
    for i in tqdm(range(0, windows.shape[0], batch), desc="target features", unit="batch", disable=not progress):
        ids = windows[i:i + batch].to(device)
        logits, hidden = lm_head_input(model, ids)
        if i == 0:
            _check_logits_are_lm_head(model, head, logits, hidden)
        feats.append(hidden.float().reshape(-1, hidden.shape[-1]).cpu())
    return TargetFeatures(tokens[:n].clone(), torch.cat(feats), torch.arange(n) // context)


def _check_logits_are_lm_head(model, head, logits: torch.Tensor, hidden: torch.Tensor) -> None:
    again = head(hidden)
    if not torch.allclose(again.float(), logits.float(), rtol=1e-3, atol=1e-3 * float(logits.abs().max())):
        raise UnsupportedOpError(f"draft head: {type(model).__name__}'s logits are not its LM head applied to the "
                                 "head's input (a softcap or scale after the head?); the draft head cannot reproduce "
                                 "them")


@torch.no_grad()
def sequence_features(model: torch.nn.Module, sequences: list[torch.Tensor], progress: bool = True) -> TargetFeatures:
    """The target's hidden states over each sequence [T_i] alone, one forward each (no padding,
    so every position sees exactly its own sequence), as one stream with a segment a sequence."""
    from tqdm.auto import tqdm

    if not sequences:
        raise InputError("draft head: no sequences to collect the target's hidden states over")
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    feats = []
    for i, seq in enumerate(tqdm(sequences, desc="target features", unit="seq", disable=not progress)):
        logits, hidden = lm_head_input(model, seq.view(1, -1).to(device))
        if i == 0:
            _check_logits_are_lm_head(model, head, logits, hidden)
        feats.append(hidden[0].float().cpu())
    segments = torch.cat([torch.full((seq.numel(),), i, dtype=torch.long) for i, seq in enumerate(sequences)])
    return TargetFeatures(torch.cat([seq.long() for seq in sequences]), torch.cat(feats), segments)


# -- self-distillation: the target's own answers -----------------------------------------

# What the user asks about a calibration paragraph in a chat prompt; varied, since a chat model
# answers "continue" and "summarize" in different registers and the head should see both.
# Code (the built-in text is half Python source) gets questions about code, kept formatted.
SELF_DISTILL_INSTRUCTIONS = (
    "Continue this text:\n\n{}",
    "Summarize the following in a few sentences:\n\n{}",
    "Explain what this means, simply:\n\n{}",
    "Write a short story that begins: {}",
)
SELF_DISTILL_CODE_INSTRUCTIONS = (
    "Explain what this code does:\n\n```python\n{}\n```",
    "Continue this code:\n\n```python\n{}\n```",
)
SNIPPET_TOKENS = 64  # a paragraph-sized prompt when the text has no tokenizer to find paragraphs with


@dataclass
class OwnAnswers:
    """Prompts and the target's greedy answers to them (padding and anything after the end of
    sequence token stripped): the sequences that self-distillation trains the head on."""

    prompts: list[torch.Tensor]  # [P_i] int64
    answers: list[torch.Tensor]  # [A_i] int64, the model's own tokens
    seconds: float = 0.0

    def sequences(self) -> list[torch.Tensor]:
        return [torch.cat([p, a]) for p, a in zip(self.prompts, self.answers)]

    @property
    def answer_tokens(self) -> int:
        return sum(a.numel() for a in self.answers)


def _has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, text: str) -> torch.Tensor:
    """text as the user's message in the tokenizer's chat template, ready for the answer."""
    wrapped = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)
    return torch.tensor(tokenizer(wrapped, add_special_tokens=False)["input_ids"], dtype=torch.long)


def self_distill_prompts(tokens: torch.Tensor, count: int, tokenizer=None, chat: bool = False) -> list[torch.Tensor]:
    """`count` prompts from a calibration stream, spread evenly over it (the built-in text is
    prose, then code). With a tokenizer: its paragraphs (blank-line separated, 20 to 200
    words), as plain text or, with chat, as a user message asking one of
    SELF_DISTILL_INSTRUCTIONS (SELF_DISTILL_CODE_INSTRUCTIONS for code) in turn; without:
    token windows of SNIPPET_TOKENS / 2 to SNIPPET_TOKENS (paragraphs vary in length too)."""
    if count < 1:
        raise InputError(f"draft head: self-distillation needs at least one prompt, got {count}")
    if chat and tokenizer is None:
        raise InputError("draft head: chat prompts need the model's tokenizer (pass tokenizer=...), or chat=False")
    if tokenizer is None:
        n = tokens.numel()
        if n < SNIPPET_TOKENS:
            raise InputError(f"draft head: {n} calibration tokens, fewer than one prompt of {SNIPPET_TOKENS}")
        starts = torch.linspace(0, n - SNIPPET_TOKENS, count).long().tolist()
        half = SNIPPET_TOKENS // 2
        return [tokens[s:s + half + (i * 7) % (half + 1)].clone() for i, s in enumerate(starts)]
    text = tokenizer.decode(tokens.tolist())
    paragraphs = [p.strip("\n") for p in text.split("\n\n") if 20 <= len(p.split()) <= 200]
    if not paragraphs:
        raise InputError("draft head: the calibration text has no paragraph of 20 to 200 words (blank-line "
                         "separated) to prompt the model with; give prose, or train without self-distillation")
    picks = torch.linspace(0, len(paragraphs) - 1, count).round().long().tolist()
    prompts = []
    for i, k in enumerate(picks):  # more prompts than paragraphs: the same paragraph, another instruction
        if chat:
            para = paragraphs[k]
            if _looks_like_code(para):
                ask = SELF_DISTILL_CODE_INSTRUCTIONS[i % len(SELF_DISTILL_CODE_INSTRUCTIONS)]
            else:  # prose: its hard line wraps undone, as a user would paste it
                ask, para = SELF_DISTILL_INSTRUCTIONS[i % len(SELF_DISTILL_INSTRUCTIONS)], " ".join(para.split())
            prompts.append(chat_prompt(tokenizer, ask.format(para)))
        else:
            prompts.append(torch.tensor(tokenizer(paragraphs[k], add_special_tokens=False)["input_ids"]))
    return prompts


def _looks_like_code(paragraph: str) -> bool:
    return any(_CODE_LINE.search(line) for line in paragraph.splitlines())


# A line of Python, not of prose (licence text is indented and wraps lines starting "if" or "from").
_CODE_LINE = re.compile(r"^\s*(def |class |return\b|raise |yield\b|import |from \S+ import |[#@]|\"\"\"|\'\'\')"
                        r"|self\.|\s=\s|^\s*(if|elif|else|for|while|with|try|except|finally)\b.*:\s*$")


def _end_of_sequence_ids(model) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


@torch.no_grad()
def generate_own_answers(model: torch.nn.Module, prompts: list[torch.Tensor], new_tokens: int, batch: int = 8,
                         progress: bool = True, sample: bool = False, seed: int = 0) -> OwnAnswers:
    """The target's greedy answers (at most new_tokens each, up to and including its end of
    sequence token) to prompts: eager Hugging Face generate, batched with left padding and an
    attention mask; the padding is stripped from what comes back. sample: drawn from the
    model's full distribution instead (temperature 1, no top-k or top-p cut, torch seeded with
    seed): text to distil a student on, more varied than greedy answers, which loop."""
    import time

    from tqdm.auto import tqdm

    if new_tokens < 1:
        raise InputError(f"draft head: new_tokens must be >= 1, got {new_tokens}")
    if not hasattr(model, "generate"):
        raise InputError(f"draft head: self-distillation generates with the target's Hugging Face generate(), "
                         f"which {type(model).__name__} has not")
    device = next(model.parameters()).device
    eos = _end_of_sequence_ids(model)
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else min(eos, default=0)
    start = time.perf_counter()
    answers: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(prompts), batch), desc="own answers", unit="batch", disable=not progress):
            chunk = prompts[i:i + batch]
            width = max(p.numel() for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):
                ids[row, width - p.numel():], mask[row, width - p.numel():] = p, 1
            if sample:
                torch.manual_seed(seed + i)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                 min_new_tokens=0, do_sample=sample, num_beams=1, pad_token_id=pad,
                                 temperature=1.0 if sample else None, top_p=1.0 if sample else None,
                                 top_k=0 if sample else None)
            for row in out[:, width:].cpu():
                # after a row's end of sequence token, generate pads it: cut right after the first one
                ends = [j for j, t in enumerate(row.tolist()) if t in eos]
                answers.append(row[:ends[0] + 1] if ends else row)
    finally:
        model.train(was_training)
    return OwnAnswers([p.long() for p in prompts], answers, time.perf_counter() - start)


def draft_head_loss(head: DraftHead, data: TargetFeatures, feature_weight: float = 1.0, unroll: int = 2):
    """loss(idx) for flashc.distill.train over windows of stream positions idx [B, T]: per
    unrolled step j (fed the true features at j = 0, its own predictions after), the KL
    divergence of the target's next-token distribution to the head's plus feature_weight x
    the smooth-L1 error of the predicted feature. Pairs that cross segments of the features
    (where the target restarted) are left out."""
    def loss(idx: torch.Tensor) -> torch.Tensor:
        device = head.up.weight.device
        idx = idx.to(data.tokens.device)  # the features stay where they were gathered (CPU); the windows may not
        ids = data.tokens[idx].to(device)
        feats = data.features[idx].to(device)
        window = data.segments[idx].to(device)
        f = feats[:, :-1]
        total = 0.0
        for j in range(unroll):
            if f.shape[1] == 0:
                break
            target = feats[:, j + 1:]
            pred = head(f, ids[:, j + 1:])
            # the pair is valid when the feature fed (at position s) and the target (s + j + 1) share a window
            valid = (window[:, :window.shape[1] - j - 1] == window[:, j + 1:]).float()
            with torch.no_grad():
                p = F.log_softmax(head.logits(target).float(), -1)
            logq = F.log_softmax(head.logits(pred).float(), -1)
            kl = (p.exp() * (p - logq)).sum(-1)
            reg = F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
            count = valid.sum().clamp_min(1.0)
            total = total + ((kl + feature_weight * reg) * valid).sum() / count
            f = pred[:, :-1]
        return total / unroll
    return loss


@torch.no_grad()
def draft_agreement(head: DraftHead, data: TargetFeatures, max_tokens: int = 4096,
                    positions: torch.Tensor | None = None) -> float:
    """How often the head's first draft (argmax) is the target's own next token (its argmax),
    over the stream's positions (within segments; default all), at most max_tokens of them."""
    pos = positions if positions is not None else torch.arange(len(data) - 1)
    pos = pos[(pos + 1 < len(data))]
    pos = pos[data.segments[pos] == data.segments[(pos + 1)]][:max_tokens]
    device = head.up.weight.device
    hits = 0
    for chunk in pos.split(512):
        f, nxt = data.features[chunk].to(device), data.tokens[chunk + 1].to(device)
        target = head.logits(data.features[chunk + 1].to(device)).argmax(-1)
        hits += int((head.logits(head(f, nxt)).argmax(-1) == target).sum())
    return hits / max(1, pos.numel())


def continuation_agreement(model: torch.nn.Module, head: DraftHead, prompt: str | torch.Tensor, new_tokens: int = 64,
                           tokenizer=None, chat: bool | None = None) -> float:
    """Teacher-forced agreement of the head's first draft with the target on the target's own
    greedy continuation of prompt: the rate that matters for speculation, where the head drafts
    what the model is about to answer. prompt: text (a user message when the tokenizer has a
    chat template and chat is not False) or token ids [T]. Positions scored: from the last
    prompt token on (its draft is the answer's second token) to the end of the answer."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InputError("draft head: a text prompt needs the model's tokenizer (tokenizer=...), or give ids")
        chat = _has_chat_template(tokenizer) if chat is None else chat
        prompt = chat_prompt(tokenizer, prompt) if chat else torch.tensor(
            tokenizer(prompt, add_special_tokens=False)["input_ids"])
    prompt = torch.as_tensor(prompt).reshape(-1).long()
    check_head_fits(head, model)
    own = generate_own_answers(model, [prompt], new_tokens, progress=False)
    data = sequence_features(model, own.sequences(), progress=False)
    head.bind(model.get_input_embeddings().weight, model.get_output_embeddings().weight,
              getattr(model.get_output_embeddings(), "bias", None))
    return draft_agreement(head, data, positions=torch.arange(prompt.numel() - 1, len(data)))


@dataclass
class HeadTraining:
    """What train_draft_head did: the loss curve and the held-out top-1 agreement of the
    first draft with the target, before and after; with self-distillation, the target's own
    answers it trained on (`own_answers`, the held-out ones included, last)."""

    result: Any  # flashc.distill.TrainResult
    agreement_before: float
    agreement_after: float
    train_tokens: int
    held_out_tokens: int
    seconds_features: float
    own_answers: OwnAnswers | None = None
    held_out_sequences: int = 0

    def summary(self) -> str:
        r, own = self.result, self.own_answers
        data = "" if own is None else (
            f"; trained on the model's own answers to {len(own.answers)} prompts ({own.answer_tokens} answer tokens, "
            f"{own.seconds:.0f} s of generation; the last {self.held_out_sequences} held out)")
        return (f"draft head: {len(r.losses)} steps on {self.train_tokens} tokens in {r.seconds:.0f} s (+ "
                f"{self.seconds_features:.0f} s of target features), loss {r.first_loss:.3f} -> {r.last_loss:.3f}; "
                f"held-out top-1 agreement of draft 1 with the target {self.agreement_before:.1%} -> "
                f"{self.agreement_after:.1%} ({self.held_out_tokens} tokens){data}")


def train_draft_head(model: torch.nn.Module, calibration_tokens: torch.Tensor, *, steps: int = 300,
                     lr: float = 3e-3, batch: int = 8, seq_len: int = 64, context: int = DEFAULT_CONTEXT,
                     intermediate_size: int | None = None, feature_weight: float = 1.0, unroll: int = 2,
                     head: DraftHead | None = None, progress: bool = True,
                     checkpoint_dir: str | os.PathLike | None = None, seed: int = 0,
                     self_distill: int = 0, new_tokens: int = 128, tokenizer=None,
                     chat: bool | None = None) -> DraftHead:
    """Train a draft head for `model` (a Hugging Face causal LM, run eagerly) on a token stream.

    The last HELD_OUT of the tokens are kept out to measure the head; head.training_report (a
    HeadTraining) holds the losses and that held-out agreement. steps x batch windows of
    seq_len positions (flashc.distill.train: AdamW at lr, warm-up, cosine decay, progress bar,
    checkpoints in checkpoint_dir that a rerun resumes). A head given is trained further.

    self_distill = N > 0 trains on the model's own answers instead (EAGLE-2 / HASS style: a head
    trained on the calibration text learns that text's distribution, and drafts poorly for the
    model's answers, bench/RESULTS.md session 10): N prompts from the calibration text
    (self_distill_prompts; chat, default: the tokenizer has a chat template, makes them user
    messages), new_tokens greedy tokens answered to each (generate_own_answers), and the head
    trained on prompt + answer, the last HELD_OUT of the sequences (at least one) held out.
    """
    import time

    from flashc.distill import DistillConfig, train, weights_checksum

    tokens = torch.as_tensor(calibration_tokens).reshape(-1).long()
    vocab = model.get_output_embeddings().weight.shape[0]
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise InputError(f"draft head: calibration token ids must be in 0..{vocab - 1}, got "
                         f"{int(tokens.min())}..{int(tokens.max())}")
    if unroll < 1:
        raise InputError(f"draft head: unroll must be >= 1, got {unroll}")
    if self_distill < 0 or self_distill == 1:
        raise InputError(f"draft head: self_distill must be 0 (train on the text) or at least 2 prompts (one is held "
                         f"out), got {self_distill}")
    chat = _has_chat_template(tokenizer) if chat is None else chat
    head = head if head is not None else DraftHead.for_model(model, intermediate_size, seed=seed)
    head.to(model.get_output_embeddings().weight.device)  # trained where the model runs (its features live there)
    check_head_fits(head, model)
    head.bind(model.get_input_embeddings().weight, model.get_output_embeddings().weight,
              getattr(model.get_output_embeddings(), "bias", None))
    own, held_sequences = None, 0
    if self_distill:
        prompts = self_distill_prompts(tokens, self_distill, tokenizer, chat)  # bad input fails before generating
    else:
        held = max(context, int(tokens.numel() * HELD_OUT) // context * context)
        if tokens.numel() - held < 2 * context:
            raise InputError(f"draft head: {tokens.numel()} calibration tokens; training needs at least "
                             f"{3 * context} (windows of {context}, {held} held out): give more text or a shorter "
                             "context")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        if self_distill:
            batch_answers = 32 if next(model.parameters()).is_cuda else 8  # a GPU generates 32 as fast as 8
            own = generate_own_answers(model, prompts, new_tokens, batch=batch_answers, progress=progress)
            start = time.perf_counter()
            sequences = own.sequences()
            held_sequences = max(1, int(len(sequences) * HELD_OUT))
            train_data = sequence_features(model, sequences[:-held_sequences], progress=progress)
            test_data = sequence_features(model, sequences[-held_sequences:], progress=progress)
        else:
            train_data = target_features(model, tokens[:-held], context, progress=progress)
            test_data = target_features(model, tokens[-held:], context, progress=progress)
    finally:
        model.train(was_training)
    seconds_features = time.perf_counter() - start
    if len(train_data) < 2:
        raise InputError(f"draft head: {len(train_data)} training token(s); give more or longer prompts")
    before = draft_agreement(head, test_data)
    config = DistillConfig(steps=steps, batch=batch, seq_len=min(seq_len, len(train_data) - 1), lr=lr,
                           warmup=max(1, min(20, steps // 10)), seed=seed)
    params = dict(head.named_parameters())
    fingerprint = {"head": asdict(head.config) | {"trained_steps": 0}, "model": weights_checksum(model.parameters()),
                   "tokens": int(tokens.numel()), "feature_weight": feature_weight, "unroll": unroll,
                   "context": context}
    if self_distill:  # the data differ: a checkpoint of another run must not be resumed
        fingerprint |= {"self_distill": self_distill, "new_tokens": new_tokens, "chat": bool(chat)}
    result = train(draft_head_loss(head, train_data, feature_weight, unroll), params,
                   torch.arange(len(train_data)), config, "draft-head", checkpoint_dir=checkpoint_dir,
                   fingerprint=fingerprint, progress=progress)
    after = draft_agreement(head, test_data)
    trained = HeadConfig(**{**asdict(head.config), "trained_steps": head.config.trained_steps + len(result.losses)})
    head.config = trained
    head.training_report = HeadTraining(result, before, after, len(train_data), len(test_data), seconds_features,
                                        own, held_sequences)
    return head

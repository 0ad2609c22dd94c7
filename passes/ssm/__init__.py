"""Attention-to-SSM rewrite: attention layers replaced by a state-space layer, then distilled.

    from flashc.passes.ssm import SSMConfig, rewrite
    result = rewrite(model, SSMConfig.parse("all"), calibration_tokens)   # result.model, result.rows()

One module per idea: layer (SSMAttention, the new layer), gla (GLAAttention, its gated linear
attention kind), convert (finding attention layers and swapping them), choose ("auto": which
layers to convert, measured), and this module, which runs the rewrite: convert, align each
new layer with the attention it replaces, then distil end to end (`flashc.distill`, the
codebase's one training loop), and measure.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from flashc.distill import (
    DistillConfig, TrainResult, layer_alignment_loss, logit_kl_loss, plot_losses, train, weights_checksum,
)
from flashc.errors import FlashcError
from flashc.passes.ssm.convert import LAYER_KINDS, attention_sites, convert, ssm_layers
from flashc.passes.ssm.gla import GLAAttention
from flashc.passes.ssm.layer import SSMAttention


# what end-to-end distillation may train (SSMConfig.train)
TRAIN_SCOPES = {"ssm": "the new layers", "blocks": "the new layers' decoder blocks", "all": "every parameter"}


@dataclass(frozen=True)
class SSMConfig:
    """Which attention layers become state-space layers, and how they are trained.

    layers: "all", "auto" or a list of layer indices; keep_attention: with "all" or "auto",
    the number of attention layers kept (for "auto", the ones whose replacement hurts most);
    ppl_budget: for "auto", the largest perplexity increase allowed on held-out calibration
    text (0.10 = +10%) after layer alignment; align and distill: the two training stages
    (steps=0 skips one); checkpoint_dir: where training checkpoints go (a rerun with the
    same model and settings resumes there); plot: a PNG path for the loss curves; kind: the
    new layers' kind, "mamba2" (SSMAttention, a scalar decay per head) or "gla" (GLAAttention,
    gated linear attention: a decay per key dimension); train: what the end-to-end (logit)
    stage trains, "ssm" (the new layers only), "blocks" (the decoder blocks holding them:
    their MLPs and norms too) or "all" (every parameter of the student); layer alignment
    always trains the new layers only."""

    layers: Any = "all"
    keep_attention: int = 0
    ppl_budget: float = 0.10
    align: DistillConfig = field(default_factory=lambda: DistillConfig(steps=100, lr=1e-3))
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(steps=200, lr=3e-4))
    checkpoint_dir: str | None = None
    plot: str | None = None
    kind: str = "mamba2"
    train: str = "ssm"

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise FlashcError(f"ssm: kind={self.kind!r} is not a state-space layer kind; known: "
                              f"{', '.join(LAYER_KINDS)}")
        if self.train not in TRAIN_SCOPES:
            raise FlashcError(f"ssm: train={self.train!r} is not a training scope; known: {', '.join(TRAIN_SCOPES)}")

    @classmethod
    def parse(cls, spec: Any) -> "SSMConfig":
        """From what compile's ssm= and the CLI's --ssm take: "all", "auto", "1,3,5", a list of
        indices, a dict with the fields above, or an SSMConfig. A string may end in ":<kind>"
        for the layer kind ("all:gla", "1,3:mamba2"); without one the kind is "mamba2"."""
        if isinstance(spec, SSMConfig):
            return spec
        if isinstance(spec, dict):
            unknown = set(spec) - {"layers", "keep_attention", "ppl_budget", "align", "distill", "checkpoint_dir",
                                   "plot", "kind", "train"}
            if unknown:
                raise FlashcError(f"ssm={spec!r}: unknown key(s) {sorted(unknown)}; known: layers, keep_attention, "
                                  "ppl_budget, align, distill, checkpoint_dir, plot, kind, train")
            fields = dict(spec)
            for stage in ("align", "distill"):
                if isinstance(fields.get(stage), dict):
                    fields[stage] = DistillConfig(**fields[stage])
            if isinstance(fields.get("layers"), str) and ":" in fields["layers"]:
                raise FlashcError(f"ssm={spec!r}: give the kind as the dict's 'kind' key, not in 'layers' "
                                  f"({fields['layers']!r})")
            return cls(**{**fields, "layers": cls.parse(fields.get("layers", "all")).layers})
        if isinstance(spec, str):
            text, kind = spec.strip().lower(), "mamba2"
            if ":" in text:
                text, kind = (part.strip() for part in text.rsplit(":", 1))
                if kind not in LAYER_KINDS:
                    raise FlashcError(f"ssm={spec!r}: {kind!r} is not a state-space layer kind; known: "
                                      f"{', '.join(LAYER_KINDS)} (e.g. 'all:gla')")
            if text in ("all", "auto"):
                return cls(layers=text, kind=kind)
            try:
                return cls(layers=sorted({int(x) for x in text.split(",") if x.strip()}), kind=kind)
            except ValueError:
                raise FlashcError(f"ssm={spec!r} is not a layer choice: give 'all', 'auto' or layer indices like "
                                  "'1,3,5', optionally with a layer kind ('all:gla')") from None
        if isinstance(spec, (list, tuple)) and all(isinstance(i, int) for i in spec):
            return cls(layers=sorted(set(spec)))
        raise FlashcError(f"ssm= takes 'all', 'auto', layer indices ('1,3,5' or a list), each optionally with "
                          f"':<kind>' ('all:gla'), or a dict, got {spec!r}")


LAYER_DESCRIPTIONS = {"mamba2": "mamba2 (Mamba-2: a decay per head)",
                      "gla": "gla (gated linear attention: a decay per key dimension)"}


@dataclass
class SSMResult:
    """The rewritten model and what the rewrite did and cost."""

    model: torch.nn.Module
    layers: list[int]
    total_layers: int
    kind: str = "mamba2"  # the new layers' kind (SSMConfig.kind)
    train: str = "ssm"  # what the logit stage trained (SSMConfig.train)
    candidates: int = 0  # layers converted and aligned before a measured choice kept `layers`
    perplexity: dict[str, float] = field(default_factory=dict)  # original / converted / distilled
    training: list[TrainResult] = field(default_factory=list)
    choice: list[dict] = field(default_factory=list)  # "auto": per-layer measured damage
    state_bytes: int = 0  # per sequence, the converted layers' states
    kv_bytes_per_token: int = 0  # per sequence and token, the KV cache those layers no longer keep
    seconds: float = 0.0
    loss_plot: str | None = None

    def rows(self) -> list[list[str]]:
        """The report's table: what was converted and what it cost."""
        rows = [["converted layers", f"{len(self.layers)} of {self.total_layers}: {self.layers}"],
                ["state-space layer", LAYER_DESCRIPTIONS.get(self.kind, self.kind)]]
        labels = {"converted": "converted, untrained" + (f" (all {self.candidates} candidates)"
                                                         if self.candidates != len(self.layers) else "")}
        for key in ("original", "converted", "aligned", "distilled"):
            if key in self.perplexity:
                ppl = self.perplexity[key]
                base = self.perplexity.get("original")
                change = "" if key == "original" or not base else f" ({(ppl / base - 1) * 100:+.1f}%)"
                rows.append([f"perplexity, {labels.get(key, key)}", f"{ppl:.3f}{change}"])
        if any(r.stage == "logits" for r in self.training):
            rows.append(["end-to-end distillation trained", TRAIN_SCOPES.get(self.train, self.train)])
        for r in self.training:
            rows.append([f"distill {r.stage}", f"{len(r.losses)} steps, loss {r.first_loss:.4g} -> "
                         f"{r.last_loss:.4g}, {r.seconds:.0f} s" + (f" (resumed at {r.resumed_from})"
                                                                    if r.resumed_from else "")])
        rows.append(["state per sequence", f"{self.state_bytes / 2**20:.2f} MiB, any context (the converted layers' "
                     f"KV cache: {self.kv_bytes_per_token / 2**10:.1f} KiB a token)"])
        if self.loss_plot:
            rows.append(["loss curve", self.loss_plot])
        return rows


def rewrite(model: torch.nn.Module, config: SSMConfig | Any, tokens: torch.Tensor | None,
            eval_tokens: torch.Tensor | None = None, checkpoint_dir: str | None = None, progress: bool = True,
            plot: str | None = None) -> SSMResult:
    """Convert the layers config asks for and distil them on `tokens` (calibration token ids,
    1-D); perplexity before and after on `eval_tokens` (default: the calibration tail, held
    out of training). The input model is not changed. Training runs in float32 on the
    input's device; the result's model is in eval mode, in the input's dtype."""
    config = SSMConfig.parse(config)
    if tokens is None:
        raise FlashcError("the attention-to-SSM rewrite trains the new layers on calibration text: pass "
                          "calibration='builtin', a text or .safetensors file, or token ids")
    tokens = tokens.reshape(-1).long()
    start = time.perf_counter()
    attention_sites(model)  # refuses unknown attention before any work
    dtype = next(model.parameters()).dtype
    teacher = copy.deepcopy(model).float().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    sites = attention_sites(teacher)
    if eval_tokens is None:
        held = max(len(tokens) // 10, min(len(tokens) // 2, 2 * config.distill.seq_len))
        tokens, eval_tokens = tokens[:-held], tokens[-held:]
    window = min(256, eval_tokens.numel() - 1)
    measure = lambda m=teacher: _perplexity(m, eval_tokens, window)  # noqa: E731
    result = SSMResult(model, [], len(sites), config.kind, train=config.train)
    result.perplexity["original"] = measure()

    measured = config.layers == "auto" or config.keep_attention > 0
    candidates = list(range(len(sites))) if config.layers in ("all", "auto") else list(config.layers)
    if config.keep_attention >= len(candidates) and config.layers in ("all", "auto"):
        raise FlashcError(f"ssm: keep_attention={config.keep_attention} keeps every one of the model's "
                          f"{len(candidates)} attention layers: nothing to convert")
    student = convert(teacher, candidates, config.kind)
    result.candidates = len(candidates)
    match_output_scale(teacher, sites, student, candidates, tokens[: 4 * config.align.seq_len])
    result.perplexity["converted"] = measure(student)
    fingerprint = _fingerprint(model, candidates)
    if config.align.steps:  # each new layer against the attention it replaces (independent: all at once)
        pairs = [(sites[i].module, _ssm_at(student, i)) for i in candidates]
        result.training.append(train(layer_alignment_loss(teacher, pairs), _ssm_params(student), tokens,
                                     config.align, "align", checkpoint_dir=checkpoint_dir,
                                     fingerprint=fingerprint, progress=progress))
        result.perplexity["aligned"] = measure(student)
    layers = candidates
    if measured:
        from flashc.passes.ssm.choose import choose

        modules = {i: _ssm_at(student, i) for i in candidates}
        with torch.no_grad():
            layers, result.choice = choose(sites, modules, measure, result.perplexity["original"], config.ppl_budget,
                                           config.keep_attention, config.layers == "auto", progress)
        if not layers:
            raise FlashcError(f"ssm='auto': converting even the least damaging layer alone raises perplexity "
                              f"beyond the budget (+{config.ppl_budget:.0%}); raise ppl_budget, train "
                              "longer (align steps) or name the layers")
        student = _keep_only(student, teacher, sites, layers)
        result.perplexity["aligned"] = measure(student)
    result.layers = layers
    if config.distill.steps:
        result.training.append(train(logit_kl_loss(student, teacher, config.distill.temperature),
                                     _trainable(student, config.train), tokens, config.distill, "logits",
                                     checkpoint_dir=checkpoint_dir, fingerprint=_fingerprint(model, layers),
                                     progress=progress))
        result.perplexity["distilled"] = measure(student)
    for p in student.parameters():
        p.requires_grad_(False)
    for layer in ssm_layers(student):  # training is over: the norm's weight goes into o_proj
        layer.fold_norm_weight()
    if plot and result.training:
        result.loss_plot = str(plot_losses(result.training, plot, f"attention -> SSM, layers {layers}"))
    result.model = student.to(dtype).eval()
    result.state_bytes, result.kv_bytes_per_token = _memory(sites, layers, dtype)
    result.seconds = time.perf_counter() - start
    return result


def match_output_scale(teacher, sites, student, layers: list[int], ids: torch.Tensor) -> None:
    """Start each new layer's output norm at the scale of what the attention it replaces
    hands its o_proj (per channel, measured on ids): the SSM's normalized heads otherwise
    enter o_proj at unit size, far from the attention's average of values."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [sites[i].module.o_proj.register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, a[0].detach().float().pow(2).flatten(0, -2).mean(0).sqrt()))
        for i in layers]
    try:
        with torch.no_grad():
            teacher(ids.reshape(1, -1).to(next(teacher.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for i in layers:
            _ssm_at(student, i).norm_weight.copy_(seen[i])


def _keep_only(student, teacher, sites, layers: list[int]):
    """student with the attention of every layer not in `layers` put back (the teacher's, copied)."""
    for name, module in list(student.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SSMAttention) and child.layer_index not in layers:
                setattr(module, child_name, copy.deepcopy(sites[child.layer_index].module))
    return student


def _ssm_at(model: torch.nn.Module, index: int) -> SSMAttention:
    for m in ssm_layers(model):
        if m.layer_index == index:
            return m
    raise FlashcError(f"ssm: layer {index} was not converted")


def _ssm_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The converted layers' parameters (their projections and the new dt, A and norm),
    switched to require grad; every other parameter is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = {}
    for name, module in model.named_modules():
        if isinstance(module, SSMAttention):
            for pname, p in module.named_parameters():
                p.requires_grad_(True)
                params[f"{name}.{pname}"] = p
    return params


def _trainable(model: torch.nn.Module, scope: str) -> dict[str, torch.nn.Parameter]:
    """The parameters end-to-end distillation trains (SSMConfig.train), switched to require
    grad; every other parameter is frozen."""
    params = _ssm_params(model)
    if scope == "ssm":
        return params
    blocks = [name for name, module in model.named_modules()
              if any(isinstance(child, SSMAttention) for child in module.children())]
    for name, p in model.named_parameters():
        if scope == "all" or any(name.startswith(f"{block}.") for block in blocks):
            p.requires_grad_(True)
            params[name] = p
    return params


def _fingerprint(model: torch.nn.Module, layers: list[int]) -> dict:
    """What identifies a rewrite for its checkpoints: the model's class and weights, and the converted layers."""
    return {"model": type(model).__name__, "weights": weights_checksum(model.parameters()), "layers": layers}


def _perplexity(model: torch.nn.Module, tokens: torch.Tensor, window: int) -> float:
    from flashc.evaluation import perplexity

    device = next(model.parameters()).device
    with torch.no_grad():
        return perplexity(lambda ids: model(ids), tokens.to(device), window=window, stride=window // 2,
                          progress=False).ppl


def _memory(sites, layers: list[int], dtype: torch.dtype) -> tuple[int, int]:
    state = sum(4 * s.heads * s.head_dim * s.head_dim for s in sites if s.index in layers)  # fp32 [H, d, d]
    elem = torch.finfo(dtype).bits // 8
    kv = sum(2 * s.kv_heads * s.head_dim * elem for s in sites if s.index in layers)
    return state, kv


__all__ = ["GLAAttention", "LAYER_KINDS", "SSMAttention", "SSMConfig", "SSMResult", "attention_sites", "convert",
           "rewrite", "ssm_layers"]

"""Distillation: flashc's one training loop, for the model-level rewrites that need recovery.

A student (a teacher with some layers rewritten: attention replaced by a state-space layer,
pruned weights) learns to compute what the teacher computes, on calibration text:

* `layer_alignment_loss`: each rewritten layer, fed the teacher's own input to the layer it
  replaces, matches that layer's output (mean squared error over the output's variance).
  Layers learn independently, so errors do not compound while they are far off.
* `logit_kl_loss`: the student's next-token distribution matches the teacher's (KL divergence
  at a temperature), end to end.

`train` runs either for a number of steps with AdamW over the parameters given (fp32: the
models are trained in float32 and the caller casts back), with a progress bar, a checkpoint
every `checkpoint_every` steps that a later run with the same models, parameters and config
resumes from (a checkpoint of another model or config is refused, with the reason), and the
loss of every step in the result; `plot_losses` draws the curve. Batches are windows of the
token stream drawn from a generator seeded by the step, so a resumed run sees what an
uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flashc.errors import FlashcError

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"


@dataclass(frozen=True)
class DistillConfig:
    """How long and how to train. steps: optimizer steps of each stage that runs;
    batch x seq_len tokens a step; lr: AdamW's peak learning rate (cosine decay after a
    warm-up of warmup steps); temperature: the logit KL's."""

    steps: int = 200
    batch: int = 4
    seq_len: int = 256
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    temperature: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise FlashcError(f"DistillConfig.steps must be at least 0 (0: skip the stage), got {self.steps}")
        for name in ("batch", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise FlashcError(f"DistillConfig.{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.temperature <= 0:
            raise FlashcError(f"DistillConfig: lr and temperature must be positive, got lr={self.lr}, "
                              f"temperature={self.temperature}")


@dataclass
class TrainResult:
    """What a training run did: the loss of each step (this run's and, when resumed, the
    checkpoint's), the step it started from, and the seconds it took."""

    stage: str
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else None


def token_batch(tokens: torch.Tensor, config: DistillConfig, step: int, device) -> torch.Tensor:
    """The step's batch: config.batch windows of config.seq_len tokens at random offsets
    (a generator seeded by the step: the same batches on a resumed run)."""
    n = tokens.numel()
    if n < config.seq_len + 1:
        raise FlashcError(f"distillation needs at least {config.seq_len + 1} calibration tokens for windows of "
                          f"{config.seq_len}, got {n}: give more calibration text or a shorter seq_len")
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, n - config.seq_len, (config.batch,), generator=g)
    return torch.stack([tokens[s:s + config.seq_len] for s in starts.tolist()]).to(device)


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def logit_kl_loss(student: torch.nn.Module, teacher: torch.nn.Module, temperature: float = 1.0
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """loss(ids): KL(teacher || student) of the next-token distributions, per token, times T^2."""
    def loss(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(_logits(teacher(ids)).float() / temperature, dim=-1)
        logp = F.log_softmax(_logits(student(ids)).float() / temperature, dim=-1)
        kl = F.kl_div(logp.flatten(0, -2), target.flatten(0, -2), log_target=True, reduction="batchmean")
        return kl * temperature ** 2
    return loss


def layer_alignment_loss(teacher: torch.nn.Module, pairs: list[tuple[torch.nn.Module, torch.nn.Module]]
                         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """loss(ids): the mean over pairs (teacher_layer, student_layer) of the student layer's
    squared error against the teacher layer's output, each fed the teacher layer's input and
    keyword arguments (captured by a forward hook in one teacher pass), over the output's variance."""
    def loss(ids: torch.Tensor) -> torch.Tensor:
        seen: dict[int, tuple] = {}
        hooks = [t.register_forward_hook(lambda m, a, kw, out, i=i: seen.__setitem__(i, (a, kw, out)),
                                         with_kwargs=True) for i, (t, _) in enumerate(pairs)]
        try:
            with torch.no_grad():
                teacher(ids)
        finally:
            for h in hooks:
                h.remove()
        total = 0.0
        for i, (_, s) in enumerate(pairs):
            args, kwargs, out = seen[i]
            target = (out[0] if isinstance(out, tuple) else out).float()
            got = s(*args, **kwargs)
            got = (got[0] if isinstance(got, tuple) else got).float()
            total = total + F.mse_loss(got, target) / target.var().clamp_min(1e-12)
        return total / len(pairs)
    return loss


def weights_checksum(tensors) -> str:
    """A cheap identity of a set of weights for checkpoint fingerprints: their count, elements
    and a strided sum of each (a checkpoint of other weights is refused, not resumed)."""
    count = elements = 0
    total = 0.0
    with torch.no_grad():
        for t in tensors:
            if t.is_floating_point() and t.numel():
                count += 1
                elements += t.numel()
                total += float(t.detach().flatten()[:: max(1, t.numel() // 1024)].float().sum())
    return f"{count} tensors, {elements} elements, sum {total:.6e}"


def program_forward(program, weights: dict[str, torch.Tensor] | None = None) -> Callable:
    """A differentiable forward of a flashc Program (a captured, optimized graph): fn(*inputs)
    runs its graph with `weights` in place of the params of the same names, and flashc's own
    ops (fused norms, attention, MoE, ...) through their reference implementations, which
    autograd differentiates. Used to train weights a pass rewrote (pruning's recovery)."""
    import torch.fx as fx
    from torch._library.custom_ops import OPDEFS  # flashc ops by qualified name (torch.library.custom_op)

    weights = weights or {}

    class Differentiable(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if isinstance(target, torch._ops.OpOverload) and target.namespace == "flashc":
                opdef = OPDEFS.get(f"flashc::{target._opname}")
                if opdef is None:
                    raise FlashcError(f"training through flashc.{target._opname}: the op has no reference to "
                                      "differentiate")
                return opdef._init_fn(*args, **kwargs)
            return super().call_function(target, args, kwargs)

    runner = Differentiable(program.graph_module)

    def run(*inputs):
        args = [weights.get(n.name, program.params[n.name]) for n in program.param_nodes()]
        out = runner.run(*args, *inputs)
        return program.unflatten(list(out) if isinstance(out, (tuple, list)) else [out])
    return run


def train(loss_fn: Callable[[torch.Tensor], torch.Tensor], params: dict[str, torch.nn.Parameter],
          tokens: torch.Tensor, config: DistillConfig, stage: str, device=None,
          checkpoint_dir: str | os.PathLike | None = None, fingerprint: dict | None = None,
          progress: bool = True) -> TrainResult:
    """Minimize loss_fn over params for config.steps steps of token batches (see module doc).

    fingerprint: what identifies the run (models, layers, config) for checkpoints: a
    checkpoint whose fingerprint differs is refused rather than resumed."""
    import time

    if not params:
        raise FlashcError(f"distillation stage {stage!r} has no parameters to train")
    bad = [n for n, p in params.items() if p.dtype != torch.float32]
    if bad:
        raise FlashcError(f"distillation trains float32 parameters; {bad[:3]} are not (train a float32 copy and "
                          "cast back)")
    device = device or next(iter(params.values())).device
    opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    stamp = _stamp(stage, params, config, fingerprint)
    result = TrainResult(stage)
    ckpt = Path(checkpoint_dir) / stage if checkpoint_dir is not None else None
    if ckpt is not None and (ckpt / CHECKPOINT_META).exists():
        result.losses = _resume(ckpt, stamp, params, opt, sched)
        result.resumed_from = len(result.losses)
    t0 = time.perf_counter()
    bar = tqdm(range(result.resumed_from, config.steps), desc=f"distill {stage}", unit="step",
               disable=not progress, initial=result.resumed_from, total=config.steps)
    for step in bar:
        ids = token_batch(tokens, config, step, device)
        loss = loss_fn(ids)
        if not torch.isfinite(loss):
            raise FlashcError(f"distillation stage {stage!r}: the loss is {loss.item()} at step {step}; lower the "
                              f"learning rate (lr={config.lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        sched.step()
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
        done = step + 1
        if ckpt is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            _save(ckpt, stamp, params, opt, sched, result.losses)
    result.seconds = time.perf_counter() - t0
    return result


def plot_losses(results: list[TrainResult], path: str | os.PathLike, title: str = "distillation") -> Path:
    """The loss curve of each stage (log scale), saved as a PNG."""
    from flashc.backends.lpu.timeline import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        ax.plot(range(1, len(r.losses) + 1), r.losses, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(r.stage)
        if r.resumed_from:
            ax.axvline(r.resumed_from, color="grey", ls="--", lw=0.8, label="resumed")
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ checkpoints


def _lr_factor(step: int, config: DistillConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    frac = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _stamp(stage: str, params: dict[str, torch.nn.Parameter], config: DistillConfig, fingerprint: dict | None) -> dict:
    shapes = {n: list(p.shape) for n, p in params.items()}
    digest = hashlib.sha256(json.dumps([fingerprint or {}, shapes], sort_keys=True, default=str).encode()).hexdigest()
    return {"stage": stage, "config": asdict(config), "run": digest[:16], "fingerprint": fingerprint or {}}


def _save(ckpt: Path, stamp: dict, params, opt, sched, losses: list[float]) -> None:
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{n}": p.detach().contiguous().cpu() for n, p in params.items()}
    index = {id(p): n for n, p in params.items()}
    for p, state in opt.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"adam/{index[id(p)]}/{key}"] = value.detach().contiguous().cpu().reshape(value.shape)
    tmp = ckpt / f".{CHECKPOINT}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, ckpt / CHECKPOINT)
    meta = {**stamp, "step": len(losses), "losses": losses, "scheduler": sched.state_dict()}
    with tempfile.NamedTemporaryFile("w", dir=ckpt, prefix=f".{CHECKPOINT_META}.", delete=False) as f:
        json.dump(meta, f)
    os.replace(f.name, ckpt / CHECKPOINT_META)


def _resume(ckpt: Path, stamp: dict, params, opt, sched) -> list[float]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((ckpt / CHECKPOINT_META).read_text())
        tensors = load_file(str(ckpt / CHECKPOINT))
    except (OSError, ValueError) as e:
        raise FlashcError(f"checkpoint in {ckpt} cannot be read ({e}); delete it to start over") from None
    if meta.get("run") != stamp["run"] or meta.get("stage") != stamp["stage"]:
        theirs, ours = meta.get("fingerprint", {}), stamp["fingerprint"]
        differs = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        raise FlashcError(f"checkpoint in {ckpt} is from another run ({', '.join(differs) or 'its parameters differ'}"
                          f": {[theirs.get(k) for k in differs][:3]} there, {[ours.get(k) for k in differs][:3]} "
                          "here); resume it with the same model and settings, or choose another checkpoint directory")
    if meta.get("config") != stamp["config"]:
        changed = [k for k in stamp["config"] if meta["config"].get(k) != stamp["config"][k]]
        raise FlashcError(f"checkpoint in {ckpt} was made with other distillation settings ({', '.join(changed)}); "
                          "resume with the same settings, or choose another checkpoint directory")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
    for key, value in tensors.items():  # AdamW's moments and step count, per parameter
        if key.startswith("adam/"):
            name, slot = key[5:].rsplit("/", 1)
            opt.state[params[name]][slot] = value.to(params[name].device)
    sched.load_state_dict(meta["scheduler"])
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):  # the rate the interrupted run had reached
        group["lr"] = lr
    return [float(x) for x in meta["losses"]]

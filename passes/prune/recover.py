"""Recovery after pruning: the pruned program distilled against the program before pruning.

The pruned weights (the new parameters the pruning pass wrote: masked copies for unstructured
and N:M pruning, narrower matrices for FFN channels, fewer experts) are trained with flashc's one
training loop (`flashc.distill.train`) on the calibration text: the loss is the KL divergence
of the pruned program's next-token distribution from the unpruned one's, both run as the
optimized graphs they are (`flashc.distill.program_forward`). Pruned weights stay zero (their
gradients are masked, so AdamW never moves them: the pattern, N:M included, is kept exactly);
the other weights of the model are not trained. Training runs in float32 master weights and
writes back in the weights' own dtype.

Held-out perplexity (the last part of the calibration text, not trained on) is measured for the
unpruned program, the pruned one and the recovered one, so the report says what recovery won
back; the evaluation texts' perplexity is compile's accuracy table.
"""

from __future__ import annotations

import dataclasses

import torch

from flashc.distill import (
    DistillConfig, TrainResult, logit_kl_loss, plot_losses, program_forward, train, weights_checksum,
)
from flashc.errors import FlashcError
from flashc.ir import Program
from flashc.passes.quantize.calibration import DEFAULT_INPUTS, CalibrationData


def recover_pruned(program: Program, teacher: Program, config, calibration: CalibrationData | None,
                   progress: bool = True) -> list[dict]:
    """What a pruning pass run with `PruneConfig.recover` ends with: the weights the pass replaced
    (those of program not in teacher, the unpruned copy) distilled against teacher; report rows."""
    from flashc.passes.prune.config import PruneConfig

    assert isinstance(config, PruneConfig) and config.recover is not None
    pruned = [n for n in program.params if n not in teacher.params]
    rows, _ = recover(program, teacher, pruned, config.recover, calibration, progress, config.recover_plot,
                      config.recover_checkpoint, config.spec)
    return rows


def recover(program: Program, teacher: Program, names: list[str], config: DistillConfig,
            calibration: CalibrationData | None, progress: bool = True, plot: str | None = None,
            checkpoint_dir: str | None = None, spec: str = "") -> tuple[list[dict], TrainResult]:
    """Train program.params[names] (pruned weights) against teacher; returns report rows and the run.
    checkpoint_dir: checkpoints of the training, resumed by a rerun of the same pruning of the same model."""
    ids_spec, fill = _token_input(program)
    if calibration is None or calibration.tokens is None:
        raise FlashcError("pruning recovery distils on calibration text: pass calibration='builtin', a text file "
                          "or token ids")
    batch, seq = ids_spec.shape
    config = dataclasses.replace(config, batch=batch, seq_len=seq)  # the program's own input shape
    tokens = calibration.tokens.reshape(-1)
    held = min(len(tokens) // 5, 8 * seq)
    train_tokens, eval_tokens = tokens[:-held], tokens[-held:]
    device = next(iter(program.params.values())).device
    dtype = {n: program.params[n].dtype for n in names}
    masters = {n: torch.nn.Parameter(program.params[n].detach().float().clone()) for n in names}
    masks = {n: program.params[n] != 0 for n in names}
    for n, p in masters.items():
        p.register_hook(lambda g, m=masks[n]: g * m)

    def student_fn(ids):
        return program_forward(program, {n: p.to(dtype[n]) for n, p in masters.items()})(ids, *fill(ids))

    teacher_run = program_forward(teacher)

    def teacher_fn(ids):
        return teacher_run(ids, *fill(ids))

    with torch.no_grad():
        before = {"original": _perplexity(teacher_fn, eval_tokens, batch, seq, device),
                  "pruned": _perplexity(student_fn, eval_tokens, batch, seq, device)}
    fingerprint = {"pruning": spec, "weights": weights_checksum(teacher.params[n] for n in sorted(teacher.params)),
                   "pruned": len(names), "calibration": calibration.description}
    result = train(logit_kl_loss(student_fn, teacher_fn, config.temperature), masters, train_tokens, config,
                   "recover", device=device, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
                   progress=progress)
    with torch.no_grad():
        for n, p in masters.items():
            program.params[n] = (p * masks[n]).to(dtype[n])
        after = _perplexity(student_fn, eval_tokens, batch, seq, device)
    rows = [{"layer": "-", "op": "recovery", "status": "distilled",
             "note": f"{config.steps} steps of {batch}x{seq} calibration tokens, logit KL "
                     f"{result.first_loss:.4g} -> {result.last_loss:.4g}; held-out perplexity: original "
                     f"{before['original']:.3f}, pruned {before['pruned']:.3f}, recovered {after:.3f}"}]
    if result.resumed_from:
        rows[0]["note"] += f" (resumed at step {result.resumed_from} from {checkpoint_dir})"
    if plot:
        path = plot_losses([result], plot, "pruning recovery (logit KL)")
        rows.append({"layer": "-", "op": "recovery", "status": "loss curve", "note": str(path)})
    return rows, result


def _token_input(program: Program):
    """The program's token-id input spec, and fill(ids): the other inputs a call needs."""
    specs = program.inputs
    first = specs[0] if specs else None
    if first is None or first.dtype.is_floating_point or len(first.shape) != 2:
        raise FlashcError("pruning recovery trains a causal LM on token ids: the program's first input must be "
                          f"token ids [batch, seq], got {', '.join(s.describe() for s in specs) or 'no inputs'}")
    unknown = [s.name for s in specs[1:] if s.name not in DEFAULT_INPUTS]
    if unknown:
        raise FlashcError(f"pruning recovery feeds token ids only; the program also takes {', '.join(unknown)} "
                          "(a decode step's cache?): recover a prefill-signature compile")

    def fill(ids: torch.Tensor) -> list[torch.Tensor]:
        return [DEFAULT_INPUTS[s.name](s).to(ids.device) for s in specs[1:]]
    return first, fill


def _perplexity(fn, tokens: torch.Tensor, batch: int, seq: int, device) -> float:
    from flashc.evaluation import perplexity

    def logits(ids):  # the program takes [batch, seq]: the window repeated, row 0 scored
        out = fn(ids.expand(batch, -1).to(device))
        return (out if isinstance(out, torch.Tensor) else out.logits)[:1]
    return perplexity(logits, tokens, window=seq, stride=max(1, seq // 2), progress=False).ppl

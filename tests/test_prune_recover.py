"""Pruning recovery (issue #15): the pruned weights distilled against the unpruned program with
flashc's one training loop. Zeros stay zeros (the pattern is kept exactly), the loss falls,
and what recovery needs is asked for clearly."""

from __future__ import annotations

import pytest
import torch

import flashc
from flashc import zoo
from flashc.compiled import ModelSource
from flashc.distill import DistillConfig, program_forward
from flashc.errors import FlashcError
from flashc.passes.prune import PruneConfig

SRC = ModelSource("zoo", "llama-tiny")


def _compile(prune, recover=None, level=2):
    model = zoo.build("llama-tiny", seed=0)
    reads_text = recover is not None or PruneConfig.parse(prune).needs_calibration
    return flashc.compile(model, "cpu", torch.zeros(1, 32, dtype=torch.long), level=level, prune=prune,
                          recover=recover, calibration="builtin" if reads_text else None, source=SRC)


def _pruned(cm):
    return {n: t for n, t in cm.program.params.items() if n.endswith("_pruned")}


def _recovery_note(cm):
    for r in cm.records:
        for d in getattr(r, "details", None) or []:
            if d.get("op") == "recovery" and d.get("status") == "distilled":
                return d["note"]
    return None


@pytest.mark.parametrize("spec", ["magnitude-50%", "wanda-2:4"])
def test_recovery_keeps_the_pattern_and_changes_the_kept_weights(spec):
    plain = _compile(spec)
    recovered = _compile(spec, DistillConfig(steps=6, lr=1e-3))
    before, after = _pruned(plain), _pruned(recovered)
    assert before and before.keys() == after.keys()
    changed = 0
    for name in before:
        assert torch.equal(before[name] == 0, after[name] == 0), f"{name}: the zero pattern moved"
        changed += int(not torch.equal(before[name], after[name]))
    assert changed == len(before), "every pruned layer was trained"
    if spec.endswith("2:4"):
        for name, w in after.items():
            groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1) if w.shape[-1] % 4 == 0 else None
            assert groups is None or int(groups.max()) <= 2, name
    note = _recovery_note(recovered)
    assert note and "6 steps" in note and "held-out perplexity" in note


def test_recovery_lowers_the_distillation_loss():
    cm = _compile("magnitude-60%", DistillConfig(steps=25, lr=2e-3))
    first, last = _recovery_note(cm).split("logit KL ")[1].split(";")[0].split(" -> ")
    assert float(last) < float(first)


def test_program_forward_matches_the_program_and_differentiates():
    model = zoo.build("llama-tiny", seed=0)
    cm = flashc.compile(model, "cpu", torch.zeros(2, 16, dtype=torch.long), level=3)
    ops = {str(n.target) for n in cm.program.op_nodes()}
    assert any(o.startswith("flashc.") for o in ops), "the graph holds fused flashc ops"
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    name = next(n for n, t in cm.program.params.items() if t.dim() == 2 and "embed" not in n)
    weight = torch.nn.Parameter(cm.program.params[name].clone())
    out = program_forward(cm.program, {name: weight})(ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    ref = cm.program(ids)
    ref = ref if isinstance(ref, torch.Tensor) else ref.logits
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    logits.float().pow(2).mean().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_recovery_needs_weight_pruning_and_a_prefill_program():
    with pytest.raises(FlashcError, match="recover= distils a pruned model"):
        flashc.compile(zoo.build("llama-tiny"), "cpu", torch.zeros(1, 8, dtype=torch.long),
                       recover=DistillConfig(steps=1))
    with pytest.raises(FlashcError, match="recovery distillation is built for"):
        PruneConfig(method="online", sparsity=0.4, recover=DistillConfig(steps=1))
    with pytest.raises(FlashcError, match="takes a flashc.distill.DistillConfig"):
        PruneConfig(method="wanda", recover={"steps": 3})
    from flashc.decode import DecodeStep, decode_example_inputs

    model = zoo.build("llama-tiny")
    with pytest.raises(FlashcError, match="recover a prefill-signature compile"):
        flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 1, 16), prune="magnitude-50%",
                       recover=DistillConfig(steps=1), calibration="builtin", source=SRC)


def test_recovery_resumes_from_its_checkpoint_and_refuses_another_pruning(tmp_path):
    import dataclasses

    def config(spec, steps):
        return dataclasses.replace(PruneConfig.parse(spec), recover=DistillConfig(steps=steps, checkpoint_every=2),
                                   recover_checkpoint=str(tmp_path))

    whole = _compile(config("magnitude-50%", 4))
    assert (tmp_path / "recover" / "checkpoint.json").exists()
    again = _compile(config("magnitude-50%", 4))  # finished run: resumed at its end, same weights
    assert "resumed at step 4" in _recovery_note(again)
    for name, w in _pruned(whole).items():
        torch.testing.assert_close(_pruned(again)[name], w)
    with pytest.raises(FlashcError, match="from another run"):
        _compile(config("magnitude-60%", 4))

"""A compile whose passes change numerics reports perplexity against the float model."""

import torch

import flashc
import flashc.api
from flashc import zoo
from flashc.compiled import ModelSource
from flashc.pass_manager import PassResult


class _PerturbWeights:
    """A stand-in for quantization: noise of 10% of each matrix's std."""

    name = "perturb_weights"
    requires = ()
    preserves = ("canonical", "shapes")
    changes_numerics = True

    def run(self, program, ctx):
        g = torch.Generator().manual_seed(0)
        for k, v in program.params.items():
            if v.is_floating_point() and v.dim() == 2:
                program.params[k] = v + 0.1 * v.std() * torch.randn(v.shape, generator=g)
        return PassResult(True, {"perturbed": 1})


def test_numerics_changing_pass_adds_accuracy_rows(monkeypatch):
    base = flashc.api.pipeline
    monkeypatch.setattr(flashc.api, "pipeline", lambda level: base(level) + [_PerturbWeights()])
    model = zoo.build("mixtral-ref")
    cm = flashc.compile(model, "cpu", torch.zeros(1, 128, dtype=torch.long), level=2,
                        source=ModelSource("zoo", "mixtral-ref", seq_len=128), accuracy_limit=2)
    assert [row[0] for row in cm.accuracy] == ["perplexity (prose, window 128, stride 64)",
                                              "perplexity (code, window 128, stride 64)"]
    for _, baseline, compiled, change in cm.accuracy:
        assert float(compiled) > float(baseline)  # noise makes the model worse...
        assert 1 < float(change.rstrip("%")) < 500  # ...by a measurable, bounded amount
    assert "accuracy vs the float model" in cm.report().render()


def test_exact_pipeline_reports_no_accuracy(tiny_models):
    cm = flashc.compile(tiny_models["llama-tiny"], "cpu", torch.zeros(1, 8, dtype=torch.long))
    assert cm.accuracy is None

"""A compile whose passes change numerics reports perplexity against the float model."""

import copy
import json
import math

import pytest
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
    assert [row.metric for row in cm.accuracy] == ["perplexity (prose, window 128, stride 64)",
                                                  "perplexity (code, window 128, stride 64)"]
    for row in cm.accuracy:
        assert row.value > row.baseline  # noise makes the model worse...
        assert 0.01 < row.change < 5  # ...by a measurable, bounded amount
    assert cm.report().to_dict()["accuracy"][0]["relative_change"] == cm.accuracy[0].change  # exact, not as printed
    assert "accuracy vs the float model" in cm.report().render()


def test_exact_pipeline_reports_no_accuracy(tiny_models):
    cm = flashc.compile(tiny_models["llama-tiny"], "cpu", torch.zeros(1, 8, dtype=torch.long))
    assert cm.accuracy is None


# --------------------------------------------------------------------------- embedding agreement of artifacts


def _minilm_artifact(model, tokenizer, batch, seq, with_mask):
    enc = tokenizer(["x"] * batch, padding="max_length", max_length=seq, return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"]) if with_mask else (enc["input_ids"],)
    # level 1 without the end-to-end check: what is under test is the feeding, not the compile
    return flashc.compile(model, "cpu", inputs, level=1, verify=False,
                          source=ModelSource("zoo", "minilm-l6", seq_len=seq))


@pytest.fixture(scope="module")
def minilm():
    from flashc import pretrained

    return pretrained.load_minilm()


def test_static_shape_embeddings_match_the_sentence_pipeline(minilm):
    # A faithful artifact with an attention_mask input, fed [3, 16] batches (the last one filled
    # with copies), gives the embeddings minilm_embed gives at dynamic shapes.
    from flashc import pretrained
    from flashc.accuracy import static_shape_embedders
    from flashc.evaluation import load_eval_sentences

    model, tokenizer = minilm
    cm = _minilm_artifact(model, tokenizer, 3, 16, with_mask=True)
    sentences = load_eval_sentences()[:10]  # 3 full batches and one of one sentence
    embed, ref_embed, notes = static_shape_embedders(cm, model, tokenizer, sentences)
    expected = pretrained.minilm_embed(model, tokenizer, sentences)
    got = embed(sentences)
    assert got.shape == (10, 384)
    assert torch.nn.functional.cosine_similarity(got, expected).min() > 1 - 1e-6
    assert (got - expected).abs().max() < 1e-5
    assert (ref_embed(sentences) - expected).abs().max() < 1e-5
    assert not any("attention_mask" in n for n in notes) and not any("truncated" in n for n in notes)


def test_perturbed_artifact_reads_below_one_against_the_float_model(minilm):
    from flashc.accuracy import embedding_evaluation, static_shape_embedders
    from flashc.evaluation import load_eval_sentences

    model, tokenizer = minilm
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in noisy.parameters():
            if w.dim() == 2:
                w.add_(0.1 * w.std() * torch.randn(w.shape, generator=g))
    cm = _minilm_artifact(noisy, tokenizer, 4, 12, with_mask=False)
    sentences = load_eval_sentences()[:24]
    embed, ref_embed, notes = static_shape_embedders(cm, model, tokenizer, sentences)
    ev = embedding_evaluation(embed, ref_embed, sentences, "noisy", "minilm-l6", notes)
    assert ev.headline.metric == "mean cosine vs baseline" and ev.headline.baseline == 1.0
    assert 0.8 < ev.headline.value < 0.995  # 10% weight noise: clearly off, not garbage
    assert ev.to_dict()["relative_change"] == pytest.approx(ev.headline.value - 1, abs=1e-15)
    lengths = [len(ids) for ids in tokenizer(sentences)["input_ids"]]
    assert f"{sum(n > 12 for n in lengths)} of 24 sentences are longer" in notes[1]
    assert "takes no attention_mask" in notes[2]


def test_evaluation_json_without_a_baseline_has_no_change():
    from flashc.accuracy import AccuracyRow, Evaluation, pooled_perplexity

    rows = [AccuracyRow("perplexity (prose, ...)", None, math.exp(2.0), {"text": "prose", "tokens": 30, "nll": 2.0,
                                                                      "baseline_nll": None}),
            AccuracyRow("perplexity (code, ...)", None, math.exp(3.0), {"text": "code", "tokens": 10, "nll": 3.0,
                                                                     "baseline_nll": None})]
    pooled = pooled_perplexity(rows)
    assert pooled.value == pytest.approx(math.exp((30 * 2.0 + 10 * 3.0) / 40), rel=1e-12)
    got = json.loads(json.dumps(Evaluation("ppl", "m", None, pooled, rows).to_dict()))
    assert got["baseline"] is None and got["relative_change"] is None and got["model"] == pooled.value
    assert [r["relative_change"] for r in got["rows"]] == [None, None]
    assert got["figure"].startswith("perplexity (prose+code")

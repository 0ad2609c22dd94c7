"""The compile report as data: CompileReport.to_dict and its atomic JSON writer."""

import json
import os
from dataclasses import asdict, replace

import pytest
import torch

import flashc
from flashc.accuracy import AccuracyRow
from flashc.errors import FlashcError
from flashc.report import REPORT_SCHEMA, write_json

KEYS = {"schema", "kind", "model", "target", "profile", "level", "capture", "warnings", "passes", "fusions",
        "fallbacks", "estimate", "timings", "weights", "accuracy"}


@pytest.fixture(scope="module")
def compiled(tiny_models):
    return flashc.compile(tiny_models["llama-tiny"], "cpu", torch.zeros(1, 8, dtype=torch.long), level=3)


def test_to_dict_round_trips_through_json(compiled):
    report = compiled.report()
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert KEYS <= set(data) and data["schema"] == REPORT_SCHEMA and data["kind"] == "compile"
    assert (data["target"], data["profile"], data["level"]) == ("cpu", "cpu", 3)
    assert data["passes"] == [{"stage": "pipeline", **asdict(r)} for r in compiled.records]
    assert {row["stage"] for row in data["passes"]} <= {"pipeline", "backend"}  # backend: a target's late passes
    assert data["fusions"] == report.fused() and data["fusions"]["attention"] == 2
    assert data["fallbacks"] == [asdict(f) for f in compiled.fallbacks]
    params = compiled.program.params.values()
    assert data["weights"] == {"tensors": len(params), "bytes": sum(t.numel() * t.element_size() for t in params)}
    est = report.estimate
    assert data["estimate"]["seconds"] == pytest.approx(est.seconds, rel=1e-12)
    assert data["estimate"]["kernels"] == est.kernels and len(data["estimate"]["top"]) == 5
    assert data["estimate"]["top"][0]["seconds"] == max(n.seconds for n in est.nodes)
    assert set(data["timings"]) >= {"capture", "passes", "lower", "total"}
    assert data["accuracy"] is None  # an exact pipeline measures no accuracy


def test_non_finite_errors_and_accuracy_rows_stay_json(compiled):
    records = [replace(compiled.records[0], max_error=float("nan")),
               replace(compiled.records[1], max_error=float("inf"))]
    rows = [AccuracyRow("perplexity (code, window 8, stride 4)", 20.0, 21.0),
            ["perplexity (prose, window 8, stride 4)", "10.0000", "10.5000", "+5.00%"],
            ["accuracy", "not measured", "-", "no real-weight baseline for this model"]]
    report = replace(compiled.report(), records=records, accuracy=rows)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [p["max_error"] for p in data["passes"]] == ["nan", "inf"]
    first, printed, missing = data["accuracy"]
    assert first == {"metric": "perplexity (code, window 8, stride 4)", "baseline": 20.0, "model": 21.0,
                     "relative_change": pytest.approx(0.05, rel=1e-12)}
    assert (printed["baseline"], printed["model"]) == (10.0, 10.5)
    assert printed["relative_change"] == pytest.approx(0.05, rel=1e-12)
    assert missing["baseline"] is None and missing["model"] is None and missing["relative_change"] is None
    assert missing["cells"][3] == "no real-weight baseline for this model"
    assert "accuracy vs the float model" in report.render()


def test_write_json_replaces_atomically(tmp_path, compiled):
    path = tmp_path / "report.json"
    path.write_text("old")
    data = compiled.report().to_dict()
    write_json(path, data)
    assert json.loads(path.read_text()) == data
    assert os.listdir(tmp_path) == ["report.json"]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_json_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(FlashcError, match="report.json: cannot write the report .No space left on device."):
        write_json(path, {"a": 1})
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]


def test_write_json_refuses_what_json_cannot_hold(tmp_path):
    with pytest.raises(TypeError, match="not JSON data"):
        write_json(tmp_path / "r.json", {"a": torch.zeros(1)})
    assert not (tmp_path / "r.json").exists()


def test_fused_counts_the_decode_attention_rewrite(tiny_models):
    """report().fused() lists the decode-attention rewrite beside the fusions (it was left out,
    so a decode step's report read as if the rewrite never applied)."""
    import flashc
    from flashc.decode import DecodeStep, decode_example_inputs

    model = tiny_models["llama-tiny"]
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 1, 16), level=2)
    assert cm.report().fused()["decode_attention"] == model.config.num_hidden_layers

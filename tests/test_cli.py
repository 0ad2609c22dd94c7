"""The flashc command line, run as a user runs it (flashc.cli.main with its arguments; the entry point in a
subprocess once)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from flashc_testing import run_cli

FACTORY = '''
import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)
    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x)))
def make():
    return Net(), (torch.randn(4, 16),)
'''


flashc = run_cli  # in this process: a subprocess per command cost seconds of imports


def test_targets_lists_targets_and_profiles():
    """The entry point a user runs, in its own process."""
    r = subprocess.run([sys.executable, "-m", "flashc.cli", "targets"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0
    for needle in ("cpu", "h100", "tvm-cpu", "onnx-cpu", "lpu-v1", "3.35", "989"):
        assert needle in r.stdout


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "llama"
    r = flashc("compile", "llama-tiny", "--target", "cpu", "-O", "3", "-o", str(out),
               "--report-json", str(out.parent / "report.json"))
    assert r.returncode == 0, r.stderr
    assert "attention=2" in r.stdout and "qkv=2" in r.stdout and "artifact written" in r.stdout
    return out


def test_compile_writes_the_report_as_json(artifact):
    report = json.loads((artifact.parent / "report.json").read_text())
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert (report["schema"], report["kind"], report["model"], report["target"], report["level"]) == \
        (1, "compile", "llama-tiny", "cpu", 3)
    assert [{k: v for k, v in p.items() if k != "stage"} for p in report["passes"]] == \
        [{k: v for k, v in p.items() if k != "stage"} for p in manifest["pipeline"]]
    assert report["fusions"]["attention"] == 2 and report["fusions"]["qkv"] == 2
    assert report["estimate"]["kernels"] == manifest["estimate"]["kernels"]


def test_run_compares_with_eager(artifact, tmp_path):
    r = flashc("run", str(artifact), "--repeat", "2", "--report-json", str(tmp_path / "run.json"))
    assert r.returncode == 0, r.stderr
    assert "rel. error" in r.stdout and "time per call" in r.stdout
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["kind"] == "run" and run["passed"] is True and run["compile"]["model"] == "llama-tiny"
    assert len(run["outputs"]) == 1 and run["outputs"][0]["relative_error"] < run["tolerance"] == 1e-3
    assert f"{run['outputs'][0]['relative_error']:.3e}" in r.stdout


def test_inspect_zoo_and_artifact(artifact):
    r = flashc("inspect", "llama-tiny", "--limit", "0")
    assert r.returncode == 0, r.stderr
    assert "top time sinks" in r.stdout and "flashc.attention" in r.stdout and "model.layers.0" in r.stdout
    r = flashc("inspect", str(artifact))
    assert r.returncode == 0 and "estimated time by layer" in r.stdout


def test_inspect_real_size_on_meta():
    r = flashc("inspect", "llama-3.2-1b", "--target", "h100", "--dtype", "bfloat16", "--seq-len", "1", "--limit", "3")
    assert r.returncode == 0, r.stderr
    # a decode step of Llama-3.2-1B reads its 2.47 GB of bf16 weights (design notes)
    assert "2.5 GB moved" in r.stdout


def test_factory_model(tmp_path):
    f = tmp_path / "net.py"
    f.write_text(FACTORY)
    out = tmp_path / "art"
    r = flashc("compile", f"{f}:make", "-o", str(out))
    assert r.returncode == 0, r.stderr
    r = flashc("run", str(out), "--repeat", "2")
    assert r.returncode == 0, r.stderr


def test_errors_are_one_line_and_nonzero(tmp_path):
    r = flashc("compile", "lama-tiny")
    assert r.returncode == 2 and "did you mean 'llama-tiny'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = flashc("compile", "llama-tiny", "--target", "tpu")
    assert r.returncode == 2 and "unknown target 'tpu'" in r.stderr
    r = flashc("run", str(tmp_path / "missing"))
    assert r.returncode == 2 and "no such artifact" in r.stderr


def test_eval_mixtral_ref_perplexity():
    # flashc's own trained MoE: a real model, so the perplexity is far below the
    # 49152-token vocabulary's uniform perplexity
    r = flashc("eval", "mixtral-ref", "--limit", "2", "--texts", "code", "--window", "128")
    assert r.returncode == 0, r.stderr
    value = float(r.stdout.split("stride 64)")[1].split("│")[2])
    assert 1.5 < value < 200


def test_eval_random_weights_has_no_tokenizer():
    r = flashc("eval", "llama-tiny")
    assert r.returncode == 2 and "no tokenizer" in r.stderr


def _eval_json(*args):
    r = flashc("eval", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # the whole of stdout is one JSON object


@pytest.fixture(scope="module")
def minilm_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "minilm"
    r = flashc("compile", "minilm-l6", "--batch", "4", "--seq-len", "12", "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_eval_of_an_encoder_artifact_compares_it_with_the_float_model(minilm_artifact):
    # no --metric: an encoder is scored by embedding agreement, against its float source model
    got = _eval_json(str(minilm_artifact), "--limit", "30")
    assert (got["metric"], got["model_name"], got["baseline_name"]) == ("embed", str(minilm_artifact), "minilm-l6")
    assert got["figure"] == "mean cosine vs baseline" and got["baseline"] == 1.0
    assert 0.999 < got["model"] <= 1 + 1e-9  # fp32, fused attention: the same numbers up to rounding
    assert got["relative_change"] == pytest.approx(got["model"] / got["baseline"] - 1, abs=1e-15)
    rows = {row["metric"]: row for row in got["rows"]}
    assert rows["mean cosine vs baseline"]["model"] == got["model"] and rows["top-1 neighbour agreement"]["model"] > 0.9
    assert all(row["sentences"] == 30 for row in got["rows"])
    assert any("sentences are longer than the artifact's 12 tokens" in n for n in got["notes"])
    assert any("takes no attention_mask" in n for n in got["notes"])


def test_eval_of_an_encoder_alone_has_nothing_to_compare():
    r = flashc("eval", "minilm-l6")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1  # refused before loading anything
    assert "pass --baseline" in r.stderr and "flashc compile minilm-l6 -o DIR" in r.stderr and r.stdout == ""
    r = flashc("eval", "minilm-l6", "--metric", "ppl")
    assert r.returncode == 2 and "minilm-l6 is an encoder (bert)" in r.stderr and "--metric embed" in r.stderr


def test_eval_of_a_causal_lm_artifact_json(tmp_path):
    out = tmp_path / "mixtral"
    r = flashc("compile", "mixtral-ref", "--seq-len", "32", "-o", str(out))
    assert r.returncode == 0, r.stderr
    got = _eval_json(str(out), "--limit", "2")
    assert (got["metric"], got["baseline_name"]) == ("ppl", "mixtral-ref")
    assert [row["text"] for row in got["rows"]] == ["prose", "code"]
    assert got["figure"] == f"perplexity (prose+code, all {sum(row['tokens'] for row in got['rows'])} tokens)"
    for row in [got, *got["rows"]]:
        assert row["relative_change"] == pytest.approx(row["model"] / row["baseline"] - 1, rel=1e-9, abs=1e-15)
        assert abs(row["relative_change"]) < 1e-4  # fp32 fusion only reorders sums


def test_export_onnx_from_artifact(artifact, tmp_path):
    out = tmp_path / "onnx"
    r = flashc("export", str(artifact), "--format", "onnx", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "payload" / "model.onnx").exists()
    r = flashc("run", str(out), "--repeat", "2")
    assert r.returncode == 0, r.stderr
    assert "onnx-cpu" in r.stdout


def test_report_json_path_is_checked_before_compiling(tmp_path):
    r = flashc("compile", "llama-tiny", "--report-json", str(tmp_path))
    assert r.returncode == 2 and f"{tmp_path}: is a directory" in r.stderr
    r = flashc("run", "anything", "--report-json", str(tmp_path / "missing" / "run.json"))
    assert r.returncode == 2 and f"{tmp_path / 'missing'}: no such directory" in r.stderr


def test_inspect_why_not_lists_candidates_and_reasons():
    r = flashc("inspect", "llama-tiny", "--why-not", "flashc.rotary")
    assert r.returncode == 0, r.stderr
    assert "why not rotary: llama-tiny at -O2, pass fuse" in r.stdout
    # every rotary form (rotate-half, pairs, complex) looks at its own candidate places
    assert re.search(r"rotary: fused 4 of \d+ candidate places", r.stdout)
    # the residual adds are candidates too (an add ends the pattern), and say why they are not
    # rope; the table wraps long reasons over lines, whose other cells are empty
    text = " ".join(r.stdout.replace("│", " ").split())
    assert "add_14 model.layers.1 modeling_llama.py:" in text
    assert "pattern expects aten.mul here, found aten.add" in text
    r = flashc("inspect", "llama-tiny", "--why-not", "rotery")
    assert r.returncode == 2 and "did you mean 'rotary'" in r.stderr and "Known fusions: add_rms_norm" in r.stderr

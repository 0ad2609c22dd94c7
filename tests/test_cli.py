"""The flashc command line, run as a user runs it (subprocess)."""

import subprocess
import sys
from pathlib import Path

import pytest

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


def flashc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flashc.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_targets_lists_targets_and_profiles():
    r = flashc("targets")
    assert r.returncode == 0
    for needle in ("cpu", "h100", "tvm-cpu", "onnx-cpu", "lpu-v1", "3.35", "989"):
        assert needle in r.stdout


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "llama"
    r = flashc("compile", "llama-tiny", "--target", "cpu", "-O", "3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "attention=2" in r.stdout and "qkv=2" in r.stdout and "artifact written" in r.stdout
    return out


def test_run_compares_with_eager(artifact):
    r = flashc("run", str(artifact), "--repeat", "2")
    assert r.returncode == 0, r.stderr
    assert "rel. error" in r.stdout and "time per call" in r.stdout


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


def test_export_onnx_from_artifact(artifact, tmp_path):
    out = tmp_path / "onnx"
    r = flashc("export", str(artifact), "--format", "onnx", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "payload" / "model.onnx").exists()
    r = flashc("run", str(out), "--repeat", "2")
    assert r.returncode == 0, r.stderr
    assert "onnx-cpu" in r.stdout


def test_inspect_why_not_lists_candidates_and_reasons():
    r = flashc("inspect", "llama-tiny", "--why-not", "flashc.rotary")
    assert r.returncode == 0, r.stderr
    assert "why not rotary: llama-tiny at -O2, pass fuse" in r.stdout
    assert "rotary: fused 4 of 8 candidate places" in r.stdout
    # the residual adds are candidates too (an add ends the pattern), and say why they are not
    # rope; the table wraps long reasons over lines, whose other cells are empty
    text = " ".join(r.stdout.replace("│", " ").split())
    assert "add_14 model.layers.1 modeling_llama.py:" in text
    assert "pattern expects aten.mul here, found aten.add" in text
    r = flashc("inspect", "llama-tiny", "--why-not", "rotery")
    assert r.returncode == 2 and "did you mean 'rotary'" in r.stderr and "Known fusions: add_rms_norm" in r.stderr

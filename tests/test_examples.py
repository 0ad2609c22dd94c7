"""The scripts in examples/, run as a user runs them (subprocess, --quick sizes), with their numbers checked.

Each example exits non-zero when its own comparison fails; these tests also read the printed
numbers, so a script that printed a wrong result and exited 0 would still fail here. The
selected examples run two at a time, each on one PyTorch thread (unless OMP_NUM_THREADS is set):
that keeps two cores busy without oversubscribing them; on a loaded 2-core machine a 2-thread
process ran SmolLM2's forward 10-20x slower than a 1-thread one (measured: 5-11 s vs 0.5 s).
"""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NUMBER = r"([0-9.]+(?:e[+-]?[0-9]+)?)"


def _run(name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLASHC_EXAMPLES_QUICK": "1", "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--quick"], capture_output=True, text=True,
                          env=env, timeout=600, cwd=EXAMPLES.parent)


@pytest.fixture(scope="module")
def runs(request):
    """Start every example whose test is selected, two at a time in file order (the longest first, so
    the two workers finish close together); name -> future of its run."""
    names = [item.name.removeprefix("test_") for item in request.session.items
             if item.module.__name__ == request.module.__name__]
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(_run, name) for name in names if (EXAMPLES / f"{name}.py").is_file()}


def output_of(runs, name: str) -> str:
    r = runs[name].result()
    assert r.returncode == 0, f"examples/{name}.py exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "RESULT ok" in r.stdout
    return r.stdout


def test_every_example_is_short_documented_and_tested():
    for path in sorted(EXAMPLES.glob("*.py")):
        text = path.read_text()
        assert text.startswith('"""') and "--quick" in text.split('"""')[1], f"{path.name}: docstring with --quick"
        assert len(text.splitlines()) <= 100, f"{path.name}: {len(text.splitlines())} lines"
        assert f"def test_{path.stem}(" in Path(__file__).read_text(), f"{path.name} has no test"


def test_evaluate_accuracy(runs):
    out = output_of(runs, "evaluate_accuracy")
    assert "4-bit Q4_1 GGUF" in out
    rows = re.findall(rf"^perplexity \((prose|code), window 64.*?\s+{NUMBER}\s+{NUMBER}\s+([+-][0-9.]+)%$", out,
                      re.MULTILINE)
    assert [kind for kind, *_ in rows] == ["prose", "code"]
    for _, eager, compiled, change in rows:
        assert 1 < float(eager) < 100  # SmolLM2 on English and Python: tens, not the vocabulary's 49152
        assert abs(float(change)) <= 0.1  # percent


def test_export_onnx_tvm(runs):
    out = output_of(runs, "export_onnx_tvm")
    rows = dict(re.findall(rf"^(cpu|onnx-cpu|tvm-cpu|flashc export --format onnx)\s+{NUMBER}\s+[0-9.]+$", out,
                           re.MULTILINE))
    assert sorted(rows) == ["cpu", "flashc export --format onnx", "onnx-cpu", "tvm-cpu"]
    assert all(float(err) <= 1e-4 for err in rows.values())


def test_compile_handwritten_model(runs):
    out = output_of(runs, "compile_handwritten_model")
    rows = {int(level): (float(err), fused) for level, err, fused in
            re.findall(rf"^\s+([0-3])\s+{NUMBER}\s+(.*)$", out, re.MULTILINE)}
    assert sorted(rows) == [0, 1, 2, 3]
    assert all(err <= 1e-4 for err, _ in rows.values())
    assert rows[0][1] == "-" and "attention x2" in rows[2][1] and "qkv x2" in rows[3][1]  # 2 layers in --quick


def test_decode_and_generate(runs):
    out = output_of(runs, "decode_and_generate")
    assert "16/16 new tokens identical" in out
    ours = re.search(r"^flashc .*: (\[.*\])$", out, re.MULTILINE).group(1)
    theirs = re.search(r"^transformers.*: (\[.*\])$", out, re.MULTILINE).group(1)
    assert ours == theirs and len(ours.split(",")) == 16


def test_compile_hf_model(runs):
    out = output_of(runs, "compile_hf_model")
    assert "flashc compile report" in out and "fused: " in out
    compiled, reloaded = map(float, re.search(rf"compiled {NUMBER}, reloaded artifact {NUMBER}", out).groups())
    assert compiled <= 1e-4 and reloaded <= 1e-4


def test_speculative_generation(runs):
    out = output_of(runs, "speculative_generation")
    rows = dict(re.findall(r"^(plain|ngram|layerskip \(1st layer\))\s+(yes|NO)\s", out, re.MULTILINE))
    assert rows == {"plain": "yes", "ngram": "yes", "layerskip (1st layer)": "yes"}
    assert "output identical: True" in out


def test_attention_to_ssm(runs):
    out = output_of(runs, "attention_to_ssm")
    assert re.search(r"^converted layers\s+4 of 8", out, re.MULTILINE)
    original, hybrid = map(float, re.search(rf"original {NUMBER}, 4 of 8 layers as SSM {NUMBER}", out).groups())
    assert hybrid < 3 * original
    assert "4 SSM states, 4 KV caches" in out
    assert "generation identical to the full forward: True" in out

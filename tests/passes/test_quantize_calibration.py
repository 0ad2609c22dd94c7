"""Calibration data (built-in text, files, tensors) and the one-pass statistics it feeds."""

import re

import pytest
import torch

from flashc import zoo
from flashc.capture import capture
from flashc.errors import FlashcError, InputError
from flashc.evaluation import EVAL_DIR
from flashc.passes.quantize.calibration import (
    BUILTIN_FILES, CalibrationData, InputStatistics, LinearProbe, MoeProbe, calibration_calls, calibration_dir,
    collect_statistics, load_builtin_text, resolve_calibration,
)
from flashc_testing import rel_err


def shingles(text: str, n: int = 8) -> set[str]:
    words = re.findall(r"\S+", text)
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_builtin_text_is_small_documented_and_not_the_evaluation_text():
    directory = calibration_dir()
    sizes = [(directory / f).stat().st_size for f in BUILTIN_FILES]
    assert all(s > 50_000 for s in sizes) and sum(sizes) < 300_000
    assert (directory / "README.md").is_file()
    calibration = load_builtin_text()
    evaluation = "\n".join(p.read_text(encoding="utf-8") for p in sorted(EVAL_DIR.glob("*.txt")))
    assert len(evaluation) > 100_000
    shared = shingles(calibration) & shingles(evaluation)
    assert not shared, f"calibration text repeats the evaluation texts: {sorted(shared)[:3]}"


def test_text_without_a_tokenizer():
    with pytest.raises(FlashcError, match="pass token ids"):
        CalibrationData.from_text("some text", None, None)
    data = CalibrationData.from_text("héllo", None, vocab_size=512)
    assert data.tokens.tolist() == list("héllo".encode()) and data.warnings


def test_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FlashcError, match="does not exist"):
        resolve_calibration(tmp_path / "missing.txt")
    (tmp_path / "c.pt").write_bytes(b"x")
    with pytest.raises(FlashcError, match="never unpickles"):
        resolve_calibration(tmp_path / "c.pt")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(FlashcError, match="not UTF-8"):
        resolve_calibration(tmp_path / "bad.txt", vocab_size=512)
    save_file({"input_ids": torch.arange(100).reshape(4, 25)}, str(tmp_path / "ids.safetensors"))
    assert resolve_calibration(str(tmp_path / "ids.safetensors")).tokens.tolist() == list(range(100))
    (tmp_path / "t.txt").write_text("abc")
    assert resolve_calibration(tmp_path / "t.txt", vocab_size=300).tokens.tolist() == [97, 98, 99]
    with pytest.raises(FlashcError, match="must be 'builtin'"):
        resolve_calibration(3.5)


@pytest.fixture(scope="module")
def llama(tiny_models):
    model = tiny_models["llama-tiny"]
    ids = zoo.example_inputs("llama-tiny", seq_len=16)[0]
    return model, capture(model, (ids,), {"use_cache": False})


def test_calls_cut_tokens_into_the_input_shape(llama):
    _, program = llama
    calls = calibration_calls(program, CalibrationData.from_tensors(torch.arange(100)), max_rows=64)
    made = list(calls.make())
    assert calls.count == len(made) == 4 and calls.rows == 64
    assert made[1][0].tolist() == [list(range(16, 32))]


def test_wrong_shape_and_dtype(llama):
    _, program = llama
    with pytest.raises(InputError, match=r"\['other'\] name no input of the model"):
        calibration_calls(program, CalibrationData.from_tensors({"input_ids": torch.zeros(4, 8).long(),
                                                                  "other": torch.zeros(1)}), 100)
    with pytest.raises(InputError, match=r"\[4, 8\].*give \[N, 16\]"):
        calibration_calls(program, CalibrationData(description="t", tensors={"input_ids": torch.zeros(4, 8).long()}),
                          100)
    with pytest.raises(InputError, match="is float32; the model takes int64"):
        calibration_calls(program, CalibrationData(description="t", tensors={"input_ids": torch.zeros(4, 16)}), 100)


def test_statistics_are_the_layer_inputs(llama):
    """The Hessian and mean |x| gathered for q_proj are those of its input in the eager model."""
    model, program = llama
    node = next(n for n in program.op_nodes() if n.target is torch.ops.aten.linear.default)
    stats = InputStatistics(128, "cpu")
    tokens = torch.randint(0, 512, (48,))
    collect_statistics(program, {node: [LinearProbe(stats)]},
                       calibration_calls(program, CalibrationData.from_tensors(tokens), 48), progress=False)
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    try:
        with torch.no_grad():
            for ids in tokens.reshape(3, 1, 16):
                model(ids, use_cache=False)
    finally:
        hook.remove()
    x = torch.cat(seen).reshape(-1, 128).double()
    assert stats.rows == 48
    assert rel_err(stats.hessian(), x.T @ x / 48) < 1e-5
    assert rel_err(stats.mean_abs(), x.abs().mean(0)) < 1e-6


def test_moe_statistics_per_expert(tiny_models):
    from flashc.pass_manager import PassContext, PassManager
    from flashc.pipelines import pipeline
    from flashc.profiles import get_profile

    program = capture(tiny_models["mixtral-tiny"], zoo.example_inputs("mixtral-tiny", seq_len=16),
                      {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    node = next(n for n in program.op_nodes() if n.target is torch.ops.flashc.moe.default)
    probe = MoeProbe([InputStatistics(128, "cpu") for _ in range(4)], [InputStatistics(256, "cpu") for _ in range(4)])
    calls = calibration_calls(program, CalibrationData.from_tensors(torch.randint(0, 512, (64,))), 64)
    collect_statistics(program, {node: [probe]}, calls, progress=False)
    assert sum(s.rows for s in probe.gate_up) == 64 * 2  # every token reaches top_k = 2 experts
    assert [s.rows for s in probe.gate_up] == [s.rows for s in probe.down]


def test_non_finite_activations_are_refused():
    stats = InputStatistics(4, "cpu")
    with pytest.raises(FlashcError, match="non-finite"):
        stats.add(torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))

"""Weights-and-activations quantization (SmoothQuant W8A8, FP8): grids that hold what they
claim, smoothing that lowers the error where activations have outliers and never raises it,
compiled models close to the float model, artifacts that reload, and the bad-input errors."""

from dataclasses import replace

import pytest
import torch

from flashc_testing import optimized_program

import flashc
from flashc import cli, zoo
from flashc.capture import capture
from flashc.errors import FlashcError
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.quantize import CalibrationData, QuantConfig, QuantizeWeights
from flashc.passes.quantize.fp8 import quantize_weight_fp8
from flashc.passes.quantize.smoothquant import quantize_weight_int8, smoothquant, w8a8_error
from flashc.pipelines import pipeline
from flashc.profiles import get_profile
from flashc.quantized_ops import quantize_rows_fp8, quantize_rows_int8

W8A8 = torch.ops.flashc.linear_w8a8.default
FP8 = torch.ops.flashc.linear_fp8.default


def small(scheme: str, **kwargs) -> QuantConfig:
    return replace(QuantConfig.parse(scheme), **{"min_calibration_tokens": 256, "calibration_tokens": 512,
                                                 "sample_rows": 256, **kwargs})


def outlier_activations(rows: int, k: int, seed: int) -> torch.Tensor:
    """Activations as a transformer's: most channels small, a few 60x larger in every token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:3]] *= 60
    return x


def test_int8_grids_round_to_nearest():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, 40, generator=g).double(), torch.randn(7, 40, generator=g).double()
    x[3] = 0  # a row of zeros quantizes to zeros
    for t in (w, x):
        q, s = quantize_rows_int8(t) if t is x else quantize_weight_int8(t)
        s = s.reshape(-1, 1).double()
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
        assert ((q.double() * s - t).abs() <= s / 2 + 1e-12).all()  # within half a step of its grid
        assert int(q.abs().amax(1)[t.abs().amax(1) > 0].min()) == 127  # each row's largest value uses the range
    assert (quantize_rows_int8(x)[0][3] == 0).all()


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fp8_grids_keep_three_mantissa_bits(granularity):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=g) * torch.logspace(-3, 1, 64)
    q, s = quantize_weight_fp8(w, granularity)
    assert q.dtype == torch.float8_e4m3fn and s.shape == ((16,) if granularity == "row" else (1,))
    back = q.float() * s.reshape(-1, 1)
    # e4m3 keeps 3 explicit mantissa bits: a relative rounding error of at most 2**-4 above its subnormals
    normal = (w.abs() / s.reshape(-1, 1)) >= 2 ** -6
    assert ((back - w).abs()[normal] <= w.abs()[normal] * 2 ** -4 + 1e-9).all()
    xq, xs = quantize_rows_fp8(w, per_token=granularity == "row")
    assert float(xq.float().abs().max()) == 448.0


def test_smoothing_lowers_the_error_on_outlier_channels_and_never_raises_it():
    k = 128
    x = outlier_activations(512, k, seed=3)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(96, k, generator=g) * 0.05, torch.randn(64, k, generator=g) * 0.05]
    plain = w8a8_error(x, weights, None, [quantize_weight_int8(w) for w in weights])
    quantized, inverse, alpha, error = smoothquant(weights, x, x.abs().amax(0))
    assert alpha is not None and inverse is not None and inverse.shape == (k,)
    assert error < plain / 2, (error, plain)  # the outliers moved into the weights
    # the smoothed layer still computes the float product: (x / s) @ (W s)^T
    out = W8A8(x, *quantized[0], None, inverse)
    ref = x @ weights[0].t()
    assert float((out - ref).norm() / ref.norm()) == pytest.approx(w8a8_error(x, weights[:1], inverse,
                                                                              quantized[:1]), rel=1e-5)
    # without outliers the search may keep no smoothing, and is never worse than plain W8A8
    calm = torch.randn(512, k, generator=g)
    plain = w8a8_error(calm, weights, None, [quantize_weight_int8(w) for w in weights])
    assert smoothquant(weights, calm, calm.abs().amax(0))[3] <= plain + 1e-12


@pytest.fixture(scope="module")
def llama(tiny_models):
    model = tiny_models["llama-tiny"]
    return model, optimized_program(model, "llama-tiny", seq_len=16)


@pytest.mark.parametrize("scheme,op", [("w8a8-smoothquant", W8A8), ("w8a8", W8A8), ("fp8", FP8),
                                       ("fp8-tensor", FP8)])
def test_compiled_model_is_close_to_the_float_model(llama, scheme, op):
    model, captured = llama
    program = captured.clone()
    config = small(scheme)
    calibration = CalibrationData.from_tensors(torch.randint(0, 512, (1024,))) if config.needs_calibration else None
    record = PassManager([QuantizeWeights(config, calibration, progress=False)]).run(
        program, PassContext(get_profile("cpu")))[0]
    nodes = [n for n in program.op_nodes() if n.target is op]
    assert len(nodes) == record.stats["layers"] == 14
    assert [d["layer"] for d in record.details if d["status"] == "skipped"] == ["lm_head"]
    assert all(d.get("scheme") == config.scheme for d in record.details if d["status"] == "quantized")
    assert record.stats["bytes_after"] < record.stats["bytes_before"] / 3.5  # fp32 -> 8 bits + row scales
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.double()
        out = program(ids).logits.double()
    assert float((out - ref).norm() / ref.norm()) < (0.05 if scheme.startswith("w8a8") else 0.15)


def test_artifacts_keep_int8_and_fp8_weights(tmp_path, tiny_models):
    model = tiny_models["llama-tiny"]
    ids = zoo.example_inputs("llama-tiny", seq_len=8)
    for scheme in ("w8a8-smoothquant", "fp8"):
        cm = flashc.compile(model, "cpu", ids, example_kwargs={"use_cache": False}, quantize=small(scheme),
                            calibration=torch.randint(0, 512, (1024,)) if scheme.startswith("w8a8") else None)
        dtypes = {t.dtype for t in cm.program.params.values()}
        assert (torch.int8 if scheme.startswith("w8a8") else torch.float8_e4m3fn) in dtypes
        cm.save(tmp_path / scheme)
        loaded = flashc.load(tmp_path / scheme)
        assert {t.dtype for t in loaded.program.params.values()} == dtypes
        fresh = torch.randint(0, 512, ids[0].shape)
        assert torch.equal(loaded(fresh)[0], cm(fresh)[0])
        assert scheme in loaded.report().render(width=160)


@pytest.mark.parametrize("scheme", ["w8a8-smoothquant", "fp8"])
def test_moe_experts_are_quantized_and_close_to_the_float_model(tiny_models, scheme):
    model = tiny_models["mixtral-tiny"]
    program = capture(model, zoo.example_inputs("mixtral-tiny", seq_len=16), {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    config = small(scheme)
    calibration = CalibrationData.from_tensors(torch.randint(0, 512, (1024,))) if config.needs_calibration else None
    record = PassManager([QuantizeWeights(config, calibration, progress=False)]).run(
        program, PassContext(get_profile("cpu")))[0]
    moes = [n for n in program.op_nodes() if n.target is torch.ops.flashc.moe_a8.default]
    assert len(moes) == record.stats["moe_layers"] == 2
    assert not any(n.target is torch.ops.flashc.moe.default for n in program.op_nodes())
    rows = [d for d in record.details if d["op"] == "moe experts"]
    assert all(d["status"] == "quantized" and d["bytes_after"] < d["bytes_before"] / 3.5 for d in rows)
    if scheme == "w8a8-smoothquant":
        assert all("alpha" in d["note"] or "no smoothing" in d["note"] for d in rows)
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits.double()
        out = program(ids).logits.double()
    assert float((out - ref).norm() / ref.norm()) < (0.05 if scheme.startswith("w8a8") else 0.15)


def test_bad_input():
    with pytest.raises(FlashcError, match="takes no group size"):
        QuantConfig.parse("w8a8-smoothquant-g64")
    with pytest.raises(FlashcError, match="alpha"):
        QuantConfig(method="smoothquant", bits=8, group_size=None, symmetric=True, alpha=1.5)
    with pytest.raises(FlashcError, match="8 bits"):
        QuantConfig(method="fp8", bits=4)
    program = capture(zoo.build("llama-tiny", seed=0), zoo.example_inputs("llama-tiny", seq_len=8), {"use_cache": False})
    with pytest.raises(FlashcError, match="a100 profile has no FP8"):
        PassManager([QuantizeWeights("fp8", progress=False)]).run(program, PassContext(get_profile("a100")))
    with pytest.raises(FlashcError, match="needs calibration data"):
        QuantizeWeights("w8a8-smoothquant")


def test_cli_compiles_fp8_and_w8a8(capsys, tmp_path):
    assert cli.main(["compile", "llama-tiny", "--seq-len", "8", "--quantize", "fp8", "-o", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "fp8" in out and "quantization" in out
    assert cli.main(["compile", "llama-tiny", "--seq-len", "8", "--quantize", "w8a8-smoothquant"]) == 0
    assert "w8a8-smoothquant" in capsys.readouterr().out

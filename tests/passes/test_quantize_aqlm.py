"""AQLM (passes/quantize/aqlm.py, flashc.linear_aqlm / flashc.moe_aqlm): the op's layout against a
float64 decode written out element by element, the fit's error falling round over round and below
2-bit round to nearest, quantized models that compute what the float64 decoded model computes,
artifacts that load without fitting again, and what is refused or skipped."""

import copy
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import flashc
from flashc import zoo
from flashc.capture import capture
from flashc.codebook_ops import decode_aqlm
from flashc.errors import FlashcError, UnsupportedOpError
from flashc.ir import module_path
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.quantize import CalibrationData, QuantConfig, QuantizeWeights
from flashc.passes.quantize.aqlm import aqlm_quantize
from flashc.passes.quantize.grid import output_error, quantize_with_grid
from flashc.pipelines import pipeline
from flashc.profiles import get_profile
from flashc_testing import fresh_ids, optimized_program, rel_err

LINEAR_AQLM = torch.ops.flashc.linear_aqlm.default
MOE_AQLM = torch.ops.flashc.moe_aqlm.default


def small(**kwargs) -> QuantConfig:
    """aqlm-2bit with a calibration budget and rounds that keep the tests fast."""
    return replace(QuantConfig.parse("aqlm-2bit"),
                   **{"min_calibration_tokens": 256, "calibration_tokens": 512, "aqlm_rounds": 2, **kwargs})


def tokens(n: int = 1024, vocab: int = 512) -> CalibrationData:
    return CalibrationData.from_tensors(torch.randint(0, vocab, (n,)))


def quantize(program, config, calibration):
    return PassManager([QuantizeWeights(config, calibration, progress=False)]).run(
        program, PassContext(get_profile("cpu")))[0]


def decoded(program, codes, books, scales) -> torch.Tensor:
    """The float64 weight of a linear_aqlm / moe_aqlm part, from the stored parameters."""
    p = program.params
    return decode_aqlm(p[codes.name], p[books.name], p[scales.name], torch.float64)


def test_layout_matches_an_elementwise_float64_decode():
    n, groups, m, g = 5, 6, 2, 8
    codes = torch.randint(0, 256, (n, groups, m), dtype=torch.uint8)
    books, scales, bias = torch.randn(m, 256, g), torch.rand(n) + 0.5, torch.randn(n)
    want = torch.empty(n, groups * g, dtype=torch.float64)
    for row in range(n):
        for j in range(groups):
            for d in range(g):
                value = sum(float(books[i, int(codes[row, j, i]), d]) for i in range(m))
                want[row, j * g + d] = float(scales[row]) * value
    assert torch.allclose(decode_aqlm(codes, books, scales, torch.float64), want, rtol=0, atol=1e-12)
    x = torch.randn(3, 4, groups * g)
    got = LINEAR_AQLM(x, codes, books, scales, bias)
    assert got.dtype == torch.float32 and got.shape == (3, 4, n)
    assert rel_err(got, x.double() @ want.t() + bias.double()) < 1e-6
    y = LINEAR_AQLM(x.bfloat16(), codes, books.bfloat16(), scales.bfloat16(), None)
    assert y.dtype == torch.bfloat16 and rel_err(y, x.double() @ want.t()) < 2e-2


def correlated_layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with heavy-tailed rows and an H from inputs with correlated, unequal channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (0.5 + torch.rand(n, 1, generator=g)) / k ** 0.5
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k ** 0.5
    x = (torch.randn(2048, k, generator=g) * (0.2 + 2 * torch.rand(k, generator=g))) @ mix
    return w, (x.t() @ x / x.shape[0]).double()


def test_fit_lowers_the_error_round_over_round_and_beats_rtn_int2():
    w, h = correlated_layer(96, 128, seed=1)
    fit = aqlm_quantize(w, h, rounds=3)
    rounds = fit.errors[:-1]  # the last entry: after rounding to the storage dtype (float32 here)
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(rounds, rounds[1:])), fit.errors
    assert rounds[-1] < 0.9 * rounds[0]  # the rounds do real work beyond the k-means start
    assert fit.weight.codes.dtype == torch.uint8 and fit.weight.codes.shape == (96, 16, 2)
    assert fit.weight.codebooks.shape == (2, 256, 8) and fit.weight.scales.shape == (96,)

    def error(w_hat):
        return float((output_error(w_hat.double() - w.double(), h) / output_error(w.double(), h)) ** 0.5)

    ours = error(fit.weight.dequantize())
    assert ours == pytest.approx(fit.errors[-1], rel=0.05)  # errors[-1] is on the dampened H
    for group in (16, 128):  # int2 round to nearest, asymmetric, a scale and zero point per group
        rtn = error(quantize_with_grid(w, 2, group, False, torch.float32).dequantize())
        assert ours < 0.8 * rtn, (group, ours, rtn)


def test_unreached_experts_get_plain_squared_error():
    """An H of zeros (an expert no calibration token reached) fits to ||dW||^2: still a fit, no NaN."""
    w = torch.randn(2, 32, 64) / 8
    h = torch.stack([torch.zeros(64, 64, dtype=torch.float64), torch.eye(64, dtype=torch.float64)])
    fit = aqlm_quantize(w, h, rounds=1)
    w_hat = fit.weight.dequantize()
    assert torch.isfinite(w_hat).all()
    assert rel_err(w_hat[0], w[0]) < 0.5 and rel_err(w_hat[1], w[1]) < 0.5


@pytest.fixture(scope="module")
def llama(tiny_models):
    model = tiny_models["llama-tiny"]
    return model, optimized_program(model, "llama-tiny", seq_len=16)


def test_llama_matches_float64_decoded_model(llama):
    model, captured = llama
    program = captured.clone()
    record = quantize(program, small(), tokens())
    nodes = [n for n in program.op_nodes() if n.target is LINEAR_AQLM]
    assert len(nodes) == record.stats["layers"] == 14
    rows = [d for d in record.details if d["status"] == "quantized"]
    assert all(d["bits"] == 2 and d["scheme"] == "aqlm-2bit" and 0 < d["rel_error"] < 0.6 for d in rows)
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        for node in nodes:
            reference.get_submodule(module_path(node)).weight.copy_(decoded(program, *node.args[1:4]))
    for _ in range(2):
        ids = fresh_ids("llama-tiny")
        with torch.no_grad():
            want = reference(ids, use_cache=False).logits
        assert rel_err(program(ids).logits, want) < 1e-5
    assert not any(k.endswith("q_proj_weight") for k in program.params)
    assert record.stats["bytes_after"] < record.stats["bytes_before"] / 3  # codebooks weigh on 64-wide layers


def test_mixtral_experts_match_float64_decoded_model(tiny_models):
    model = tiny_models["mixtral-tiny"]
    program = capture(model, zoo.example_inputs("mixtral-tiny", seq_len=16), {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    record = quantize(program, small(aqlm_rounds=1), tokens())
    moes = [n for n in program.op_nodes() if n.target is MOE_AQLM]
    assert len(moes) == record.stats["moe_layers"] == 2
    reference = copy.deepcopy(model).double()
    reference.config._experts_implementation = "eager"  # the grouped-GEMM one has no float64
    with torch.no_grad():
        for node in program.op_nodes():
            if node.target is LINEAR_AQLM:
                reference.get_submodule(module_path(node)).weight.copy_(decoded(program, *node.args[1:4]))
            elif node.target is MOE_AQLM:
                layer = int(re.search(r"layers_(\d+)_", node.args[2].name).group(1))
                experts = reference.model.layers[layer].mlp.experts
                for key, (codes, books, scales) in (("gate_up_proj", node.args[2:5]), ("down_proj", node.args[5:8])):
                    p = program.params
                    w = torch.stack([decode_aqlm(c, b, s, torch.float64) for c, b, s in
                                     zip(p[codes.name], p[books.name], p[scales.name])])
                    getattr(experts, key).copy_(w)
    ids = fresh_ids("mixtral-tiny")
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
    assert rel_err(program(ids).logits, want) < 1e-5
    moe_rows = [d for d in record.details if d["op"] == "moe experts"]
    assert all(d["status"] == "quantized" and "tokens/expert" in d["note"] and d["rel_error"] < 0.6
               for d in moe_rows)


def test_artifact_keeps_codes_and_codebooks(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(model, "cpu", zoo.example_inputs("llama-tiny", seq_len=16),
                        quantize=small(aqlm_rounds=1), calibration=torch.randint(0, 512, (1024,)))
    cm.save(tmp_path / "q")
    from flashc.passes.quantize import weights

    monkeypatch.setattr(weights, "aqlm_quantize", lambda *a, **k: pytest.fail("load fitted again"))
    loaded = flashc.load(tmp_path / "q")
    for name, t in cm.program.params.items():
        assert loaded.program.params[name].dtype == t.dtype and torch.equal(loaded.program.params[name], t)
    codes = [t for name, t in loaded.program.params.items() if name.endswith("_aqlm_codes")]
    books = [t for name, t in loaded.program.params.items() if name.endswith("_aqlm_codebooks")]
    assert len(codes) == len(books) == 14 and all(c.dtype == torch.uint8 for c in codes)
    assert all(b.shape == (2, 256, 8) for b in books)
    ids = fresh_ids("llama-tiny")
    assert torch.equal(loaded(ids).logits, cm(ids).logits)
    text = loaded.report().render(width=160)
    assert "aqlm-2bit" in text and "model.layers.1.mlp.down_proj" in text


class OddNet(torch.nn.Module):
    """A layer whose input size (100) is not a multiple of AQLM's group of 8, next to one that fits."""

    def __init__(self):
        super().__init__()
        self.fits = torch.nn.Linear(64, 100)
        self.odd = torch.nn.Linear(100, 64)

    def forward(self, x):
        return self.odd(torch.relu(self.fits(x)))


def test_input_size_not_a_multiple_of_the_group_is_skipped_and_listed():
    net = OddNet().eval()
    program = capture(net, (torch.randn(4, 64),), {})
    calibration = CalibrationData.from_tensors({"x": torch.randn(512, 64)})  # samples of the input
    record = quantize(program, small(lm_head=True), calibration)
    notes = {d["layer"]: (d["status"], d["note"]) for d in record.details}
    assert notes["odd"] == ("skipped", "input size 100 is not a multiple of the group size 8")
    assert notes["fits"][0] == "quantized"
    node = next(n for n in program.op_nodes() if n.target is LINEAR_AQLM)
    x = torch.randn(4, 64)
    w = decoded(program, *node.args[1:4])
    want = F.linear(torch.relu(F.linear(x.double(), w, net.fits.bias.double())), net.odd.weight.double(),
                    net.odd.bias.double())
    assert rel_err(program(x), want) < 1e-5


@pytest.mark.parametrize("scheme,match", [
    ("aqlm-2bit-g64", "AQLM schemes are 'aqlm-2bit'"),
    ("aqlm-3x8-g16", "1.5 bits a weight"),
    ("aqlm-2x8-g32", "group_size .* in 4, 8, 16"),
])
def test_bad_schemes(scheme, match):
    with pytest.raises(FlashcError, match=match):
        QuantConfig.parse(scheme)


def test_scheme_names_round_trip():
    config = QuantConfig.parse("aqlm-2bit")
    assert (config.method, config.bits, config.group_size, config.aqlm_codebooks) == ("aqlm", 2, 8, 2)
    assert config.needs_calibration and QuantConfig.parse(config.scheme) == config
    other = QuantConfig.parse("aqlm-1x8-g8")
    assert other.bits == 1 and QuantConfig.parse(other.scheme) == other


def test_needs_calibration_and_onnx_refuses_the_op_by_name(tiny_models):
    model = tiny_models["llama-tiny"]
    ids = zoo.example_inputs("llama-tiny", seq_len=16)
    with pytest.raises(FlashcError, match="pass token ids"):  # an in-memory model: flashc knows no tokenizer
        flashc.compile(model, "cpu", ids, quantize="aqlm-2bit")
    with pytest.raises(UnsupportedOpError, match=r"flashc\.linear_aqlm") as e:
        flashc.compile(model, "onnx-cpu", ids, quantize=small(aqlm_rounds=0), calibration=torch.randint(0, 512, (512,)))
    assert "cpu" in str(e.value)  # names the targets that run every op

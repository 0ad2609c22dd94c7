"""The QuantizeWeights pass: graphs that compute what the dequantized model computes (float64
reference), skipped layers listed, tied weights kept, in-place writes kept, artifacts that
load without quantizing again, and the compile / CLI entry points."""

import copy
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import flashc
from flashc import cli, zoo
from flashc.capture import capture
from flashc.errors import FlashcError
from flashc.ir import module_path
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.quantize import CalibrationData, QuantConfig, QuantizeWeights
from flashc.pipelines import pipeline
from flashc.profiles import get_profile
from flashc.quantized_ops import dequantize
from flashc_testing import fresh_ids, optimized_program, rel_err

LINEAR_WQ = torch.ops.flashc.linear_wq.default
MOE_WQ = torch.ops.flashc.moe_wq.default


def small(scheme: str, **kwargs) -> QuantConfig:
    """A scheme with a calibration budget that keeps the tests fast."""
    return replace(QuantConfig.parse(scheme), **{"min_calibration_tokens": 256, "calibration_tokens": 512, **kwargs})


def tokens(n: int = 2048, vocab: int = 512) -> CalibrationData:
    return CalibrationData.from_tensors(torch.randint(0, vocab, (n,)))


def quantize(program, config, calibration=None):
    records = PassManager([QuantizeWeights(config, calibration, progress=False)]).run(
        program, PassContext(get_profile("cpu")))
    return records[0]


def effective_weight(program, node) -> torch.Tensor:
    """The float64 weight a flashc.linear_wq node multiplies by: dequantized, input scale folded in."""
    qweight, scales, zero_points, _bias, input_scale, bits = node.args[1:]
    p = lambda n: None if n is None else program.params[n.name]  # noqa: E731
    w = dequantize(p(qweight), p(scales), p(zero_points), bits).double()
    return w if input_scale is None else w * p(input_scale).double()


def effective_experts(program, node) -> tuple[torch.Tensor, torch.Tensor]:
    p = lambda n: None if n is None else program.params[n.name]  # noqa: E731
    out = []
    for q, s, z, scale in (node.args[2:6], node.args[6:10]):
        w = dequantize(p(q), p(s), p(z), node.args[-1]).double()
        out.append(w if scale is None else w * p(scale).double().unsqueeze(1))
    return tuple(out)


@pytest.fixture(scope="module")
def llama(tiny_models):
    model = tiny_models["llama-tiny"]
    return model, optimized_program(model, "llama-tiny", seq_len=16)


@pytest.mark.parametrize("config", [small("int4-rtn-g64"), small("int4-gptq"), small("int4-awq-g32"),
                                    small("int8-weight"), small("int4-gptq-g64-sym", act_order=False)],
                         ids=lambda c: c.scheme)
def test_llama_matches_float64_dequantized_model(llama, config):
    model, captured = llama
    program = captured.clone()
    record = quantize(program, config, tokens() if config.needs_calibration else None)
    nodes = [n for n in program.op_nodes() if n.target is LINEAR_WQ]
    assert len(nodes) == record.stats["layers"] == 14
    assert [d["layer"] for d in record.details if d["status"] == "skipped"] == ["lm_head"]
    assert not any(n.target is torch.ops.aten.linear.default and n.args[1].name != "p_lm_head_weight"
                   for n in program.op_nodes())
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        for node in nodes:
            reference.get_submodule(module_path(node)).weight.copy_(effective_weight(program, node))
    for _ in range(2):
        ids = fresh_ids("llama-tiny")
        with torch.no_grad():
            want = reference(ids, use_cache=False).logits
        got = program(ids).logits
        assert rel_err(got, want) < 1e-5
    # what was left behind: the float weights of quantized layers are gone, the head's stays
    assert "p_lm_head_weight" in program.params
    assert not any("q_proj_weight" == k.removeprefix("p_model_layers_0_self_attn_") for k in program.params)
    assert record.stats["bytes_after"] < record.stats["bytes_before"] / (3.5 if config.bits == 4 else 1.9)


@pytest.mark.parametrize("scheme", ["int4-gptq", "int4-awq"])
def test_mixtral_experts_match_float64_dequantized_model(tiny_models, scheme):
    model = tiny_models["mixtral-tiny"]
    program = capture(model, zoo.example_inputs("mixtral-tiny", seq_len=16), {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    record = quantize(program, small(scheme, calibration_tokens=256), tokens())
    moes = [n for n in program.op_nodes() if n.target is MOE_WQ]
    assert len(moes) == record.stats["moe_layers"] == 2
    skipped = {d["layer"]: d["note"] for d in record.details if d["status"] == "skipped"}
    assert sum("router" in why for why in skipped.values()) == 2
    reference = copy.deepcopy(model).double()
    reference.config._experts_implementation = "eager"  # the grouped-GEMM one has no float64
    with torch.no_grad():
        for node in program.op_nodes():
            if node.target is LINEAR_WQ:
                reference.get_submodule(module_path(node)).weight.copy_(effective_weight(program, node))
            elif node.target is MOE_WQ:
                layer = int(re.search(r"layers_(\d+)_", node.args[2].name).group(1))
                experts = reference.model.layers[layer].mlp.experts
                gate_up, down = effective_experts(program, node)
                experts.gate_up_proj.copy_(gate_up)
                experts.down_proj.copy_(down)
    ids = fresh_ids("mixtral-tiny")
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
    assert rel_err(program(ids).logits, want) < 1e-5
    moe_rows = [d for d in record.details if d["op"] == "moe experts"]
    assert all(d["status"] == "quantized" and "tokens/expert" in d["note"] for d in moe_rows)


class TiedNet(torch.nn.Module):
    """matmul with a [K, N] weight, addmm through a transpose, a layer whose K does not fit the
    group, and an output head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(300, 64)
        self.w_t = torch.nn.Parameter(torch.randn(64, 128) / 8)
        self.w = torch.nn.Parameter(torch.randn(64, 128) / 8)
        self.b = torch.nn.Parameter(torch.randn(64))
        self.odd = torch.nn.Linear(96, 64)

    def forward(self, ids):
        h = self.emb(ids)[0]
        a = torch.matmul(h, self.w_t)
        a2 = torch.addmm(self.b, a, self.w.t())
        o = self.odd(torch.cat([a2, a2[:, :32]], -1))
        return F.linear(o, self.emb.weight)


@pytest.mark.parametrize("lm_head", [False, True])
def test_matmul_forms_skips_and_tied_head(lm_head):
    net = TiedNet().eval()
    program = capture(net, (torch.randint(0, 300, (1, 8)),), {})
    record = quantize(program, small("int4-gptq-g64", lm_head=lm_head), tokens(vocab=300))
    nodes = [n for n in program.op_nodes() if n.target is LINEAR_WQ]
    assert len(nodes) == 3 if lm_head else 2
    notes = {d["layer"]: d["note"] for d in record.details}
    assert "not a multiple of the group size 64" in notes["odd"]
    if not lm_head:
        assert "output head" in notes["emb"]  # named after its weight: the root module has no path
    assert "p_emb_weight" in program.params  # the embedding still reads it, tied or not
    w = [effective_weight(program, n) for n in nodes]  # in graph order: matmul, addmm, (head)
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        h = net.emb.weight.double()[ids[0]]
        a = h @ w[0].t()
        a2 = net.b.double() + a @ w[1].t()
        o = F.linear(torch.cat([a2, a2[:, :32]], -1), net.odd.weight.double(), net.odd.bias.double())
        want = o @ (w[2] if lm_head else net.emb.weight.double()).t()
    assert rel_err(program(ids), want) < 1e-5
    if lm_head:
        head = next(d for d in record.details if d.get("op") == "linear" and "tied" in d["note"])
        assert head["status"] == "quantized"


def test_decode_step_keeps_cache_writes(tiny_models):
    """A decode step writes its KV cache in place: the quantized step writes the same values as the
    eager step with the dequantized weights, calibration fed it position by position."""
    from flashc.decode import DecodeStep, decode_example_inputs

    model = zoo.build("llama-tiny", num_layers=1)
    config = replace(QuantConfig.parse("int4-gptq"), min_calibration_tokens=256, calibration_tokens=256)
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 1, 16), quantize=config,
                        calibration=torch.randint(0, 512, (256,)))
    record = next(r for r in cm.records if r.name == "quantize_weights")
    assert record.stats["layers"] == 7
    step = DecodeStep(copy.deepcopy(model), 16)
    with torch.no_grad():
        for node in cm.program.op_nodes():
            if node.target is LINEAR_WQ:
                step.get_submodule(module_path(node)).weight.copy_(effective_weight(cm.program, node).float())
    ours, theirs = decode_example_inputs(model, 1, 16), decode_example_inputs(model, 1, 16)
    for position, token in enumerate([5, 17, 300]):
        ids, pos = torch.tensor([[token]]), torch.tensor([position])
        got = cm(ids, pos, *ours[2:])
        with torch.no_grad():
            want = step(ids, pos, *theirs[2:])
        assert rel_err(got, want) < 1e-4
        for a, b in zip(ours[2:], theirs[2:]):
            assert rel_err(a, b) < 1e-4 and a.abs().sum() > 0


def test_artifact_keeps_packed_weights(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["llama-tiny"]
    cm = flashc.compile(model, "cpu", zoo.example_inputs("llama-tiny", seq_len=16),
                        quantize=small("int4-awq", calibration_tokens=256), calibration=torch.randint(0, 512, (1024,)))
    cm.save(tmp_path / "q")
    from flashc.passes.quantize import weights

    for name in ("rtn_quantize", "gptq_quantize", "awq_quantize"):  # loading must not quantize again
        monkeypatch.setattr(weights, name, lambda *a, **k: pytest.fail("load quantized again"))
    loaded = flashc.load(tmp_path / "q")
    for name, t in cm.program.params.items():
        assert loaded.program.params[name].dtype == t.dtype and torch.equal(loaded.program.params[name], t)
    assert sum(t.dtype == torch.uint8 for t in loaded.program.params.values()) == 14 * 2  # codes, zero points
    ids = fresh_ids("llama-tiny")
    assert torch.equal(loaded(ids).logits, cm(ids).logits)
    record = next(r for r in loaded.records if r.name == "quantize_weights")
    assert len(record.details) == 15
    text = loaded.report().render(width=160)
    assert "quantization" in text and "int4 awq g128" in text and "model.layers.1.mlp.down_proj" in text


def test_meta_model_rtn_only():
    model = zoo.build("llama-tiny", device="meta")
    ids = zoo.example_inputs("llama-tiny", seq_len=8)
    cm = flashc.compile(model, "cpu", ids, quantize="int4-rtn")
    assert sum(n.target is LINEAR_WQ for n in cm.program.op_nodes()) == 14
    with pytest.raises(FlashcError, match="meta device"):
        flashc.compile(model, "cpu", ids, quantize=small("int4-gptq"), calibration=torch.zeros(1024).long())


def test_compile_errors(tiny_models):
    model = tiny_models["llama-tiny"]
    ids = zoo.example_inputs("llama-tiny", seq_len=16)
    with pytest.raises(FlashcError, match="add quantize="):
        flashc.compile(model, "cpu", ids, calibration="builtin")
    with pytest.raises(FlashcError, match="reads no calibration data"):
        flashc.compile(model, "cpu", ids, quantize="int4-rtn", calibration="builtin")
    with pytest.raises(FlashcError, match="pass token ids"):  # an in-memory model: flashc knows no tokenizer
        flashc.compile(model, "cpu", ids, quantize="int4-gptq")
    with pytest.raises(FlashcError, match=r"gives 496 tokens .* needs at least 1024"):
        flashc.compile(model, "cpu", ids, quantize="int4-awq", calibration=torch.randint(0, 512, (500,)))


def test_cli(capsys, tmp_path):
    status = cli.main(["compile", "llama-tiny", "--seq-len", "8", "--quantize", "int4-rtn", "--group-size", "64",
                       "-o", str(tmp_path / "art")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "quantization" in out and "int4 rtn g64" in out
    assert (tmp_path / "art" / "weights.safetensors").is_file()
    assert cli.main(["compile", "llama-tiny", "--group-size", "64"]) == 2
    assert "--group-size applies to --quantize" in capsys.readouterr().err
    assert cli.main(["compile", "llama-tiny", "--quantize", "quip-2bit"]) == 2
    assert "unknown quantization scheme 'quip-2bit'" in capsys.readouterr().err


def test_report_table_merges_skipped_layers():
    import io

    from rich.console import Console

    from flashc.pass_manager import PassRecord
    from flashc.report import _details_table

    router = {"op": "linear", "status": "skipped", "bytes_before": 4096, "bytes_after": 4096, "note": "MoE router"}
    details = [dict(router, layer="layers_0_gate"), dict(router, layer="layers_1_gate"),
               {"layer": "layers.0.q_proj", "op": "linear", "status": "quantized", "method": "gptq", "bits": 4,
                "group_size": 128, "symmetric": False, "bytes_before": 65536, "bytes_after": 8832,
                "rel_error": 0.03, "note": ""}]
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(_details_table(PassRecord("quantize_weights", True, {}, 0.0, 1, 1, details=details)))
    text = console.export_text()
    assert "layers_0_gate and 1 more" in text and "8.2 KB -> 8.2 KB" in text
    assert "int4 gptq g128" in text and "73.7 KB -> 17.0 KB" in text

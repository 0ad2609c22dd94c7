"""The PruneWeights pass: graphs that compute what the model with pruned weights computes,
skipped layers listed, experts only when asked, N:M misfits skipped; and the compile / CLI
entry points, composition with quantization, artifacts and error messages."""

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
from flashc.passes.prune import PruneConfig, PruneWeights
from flashc.passes.quantize import CalibrationData
from flashc.pipelines import pipeline
from flashc.profiles import get_profile
from flashc_testing import fresh_ids, optimized_program, rel_err

LINEAR = torch.ops.aten.linear.default
MOE = torch.ops.flashc.moe.default


def small(spec: str, **kwargs) -> PruneConfig:
    """A spec with a calibration budget that keeps the tests fast."""
    return replace(PruneConfig.parse(spec), **{"min_calibration_tokens": 256, "calibration_tokens": 512, **kwargs})


def tokens(n: int = 1024, vocab: int = 512) -> CalibrationData:
    return CalibrationData.from_tensors(torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)))


def prune(program, config, calibration=None):
    return PassManager([PruneWeights(config, calibration, progress=False)]).run(
        program, PassContext(get_profile("cpu")))[0]


@pytest.fixture(scope="module")
def llama(tiny_models):
    model = tiny_models["llama-tiny"]
    return model, optimized_program(model, "llama-tiny", seq_len=64)


@pytest.mark.parametrize("spec", ["magnitude-50%", "wanda-50%", "sparsegpt-60%", "wanda-2:4", "2:4"])
def test_llama_matches_the_model_with_pruned_weights(llama, spec):
    model, captured = llama
    program = captured.clone()
    config = small(spec)
    record = prune(program, config, tokens() if config.needs_calibration else None)
    linears = [n for n in program.op_nodes() if n.target is LINEAR]
    pruned = [n for n in linears if n.args[1].name.endswith("_pruned")]
    assert len(pruned) == record.stats["layers"] == 14
    assert [d["layer"] for d in record.details if d["status"] == "skipped"] == ["lm_head"]
    for node in pruned:
        w = program.params[node.args[1].name]
        if config.n_m:
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
        assert int((w == 0).sum()) == int(config.sparsity * w.numel() + 1e-9)
    assert record.stats["sparsity"] == pytest.approx(config.sparsity, abs=1e-3)
    assert "p_model_layers_0_mlp_up_proj_weight" not in program.params  # the dense weight is gone
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for node in pruned:
            reference.get_submodule(module_path(node)).weight.copy_(program.params[node.args[1].name])
        ids = fresh_ids("llama-tiny", seq_len=64)
        want = reference(ids, use_cache=False).logits
    assert rel_err(program(ids).logits, want) < 1e-6
    assert not any((p == 0).float().mean() > 0.1 for p in model.parameters())  # the model is untouched


def test_mixtral_experts_pruned_only_when_asked(tiny_models):
    model = tiny_models["mixtral-tiny"]
    program = capture(model, zoo.example_inputs("mixtral-tiny", seq_len=64), {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    default = prune(program.clone(), small("magnitude-50%"))
    skipped = {d["op"]: d["note"] for d in default.details if d["status"] == "skipped"}
    assert "PruneConfig(experts=True)" in skipped["moe experts"] and default.stats["moe_layers"] == 0
    assert sum("router" in d["note"] for d in default.details if d["status"] == "skipped") == 2
    config = small("wanda-2:4", experts=True, min_calibration_tokens=128, calibration_tokens=128)  # few MoE calls
    record = prune(program, config, tokens())
    assert record.stats["moe_layers"] == 2
    reference = copy.deepcopy(model)
    reference.config._experts_implementation = "eager"
    with torch.no_grad():
        for node in program.op_nodes():
            if node.target is LINEAR and node.args[1].name.endswith("_pruned"):
                reference.get_submodule(module_path(node)).weight.copy_(program.params[node.args[1].name])
            elif node.target is MOE:
                gate_up, down = (program.params[node.args[i].name] for i in (2, 3))
                assert ((gate_up.reshape(-1, 4) != 0).sum(-1) == 2).all()
                layer = int(re.search(r"layers_(\d+)_", node.args[2].name).group(1))
                experts = reference.model.layers[layer].mlp.experts
                experts.gate_up_proj.copy_(gate_up)
                experts.down_proj.copy_(down)
        ids = fresh_ids("mixtral-tiny", seq_len=64)
        want = reference(ids, use_cache=False).logits
    assert rel_err(program(ids).logits, want) < 1e-5
    rows = [d for d in record.details if d["op"] == "moe experts"]
    assert all(d["status"] == "pruned" and d["sparsity"] == 0.5 and "tokens/expert" in d["note"] for d in rows)


class Net(torch.nn.Module):
    """A linear whose input (30) does not divide into groups of 4, a matmul with a [K, N] weight,
    and an output projection."""

    def __init__(self):
        super().__init__()
        self.odd = torch.nn.Linear(30, 64)
        self.w_t = torch.nn.Parameter(torch.randn(64, 64))
        self.out = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.out(torch.matmul(F.relu(self.odd(x)), self.w_t))


def test_n_m_skips_inputs_that_do_not_divide_and_mm_weights_keep_their_layout():
    net = Net().eval()
    x = torch.randn(4, 30)
    program = capture(net, (x,), {})
    record = prune(program, small("magnitude-2:4"))
    notes = {d["layer"]: d["note"] for d in record.details if d["status"] == "skipped"}
    assert notes["odd"] == "input size 30 does not divide into groups of 4 (2:4)"
    assert "output head" in notes["out"]
    w_t = next(v for k, v in program.params.items() if k.endswith("_pruned"))
    assert w_t.shape == (64, 64) and ((w_t.t().reshape(64, 16, 4) != 0).sum(-1) == 2).all()
    with torch.no_grad():
        want = net.out(F.relu(net.odd(x)) @ w_t)
    assert rel_err(program(x), want) < 1e-6


def test_compile_prunes_then_quantizes_and_the_artifact_reloads(tiny_models, tmp_path):
    model = tiny_models["llama-tiny"]
    ids = zoo.example_inputs("llama-tiny", seq_len=64)
    calibration = torch.randint(0, 512, (1024,))
    cm = flashc.compile(model, "cpu", ids, prune=small("wanda-50%", calibration_tokens=256), quantize="int8-weight",
                        calibration=calibration)
    names = [r.name for r in cm.records]
    assert names.index("prune_weights") < names.index("quantize_weights")
    assert sum(n.target is torch.ops.flashc.linear_wq.default for n in cm.program.op_nodes()) == 14
    text = cm.report().render(width=200)
    assert "pruning (wanda)" in text and "unstructured" in text and "50.0%" in text and "quantization" in text
    cm.save(tmp_path / "a")
    loaded = flashc.load(tmp_path / "a")
    x = fresh_ids("llama-tiny", seq_len=64)
    assert torch.equal(loaded(x).logits, cm(x).logits)
    assert len(next(r for r in loaded.records if r.name == "prune_weights").details) == 15


def test_compile_errors(tiny_models):
    model = tiny_models["llama-tiny"]
    ids = zoo.example_inputs("llama-tiny", seq_len=16)
    with pytest.raises(FlashcError, match="pass token ids"):  # an in-memory model: flashc knows no tokenizer
        flashc.compile(model, "cpu", ids, prune="wanda-50%")
    with pytest.raises(FlashcError, match="magnitude-50% reads no calibration data"):
        flashc.compile(model, "cpu", ids, prune="magnitude-50%", calibration="builtin")
    with pytest.raises(FlashcError, match=r"gives 496 tokens .* needs at least 1024"):
        flashc.compile(model, "cpu", ids, prune="sparsegpt-50%", calibration=torch.randint(0, 512, (500,)))
    with pytest.raises(FlashcError, match="within 0-95%"):
        flashc.compile(model, "cpu", ids, prune="wanda-99%")
    with pytest.raises(FlashcError, match="meta device"):
        flashc.compile(zoo.build("llama-tiny", device="meta"), "cpu", ids, prune="magnitude-50%")


def test_cli(capsys):
    status = cli.main(["compile", "llama-tiny", "--seq-len", "8", "--prune", "magnitude-50%"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "pruning (magnitude)" in out and "unstructured" in out and "prune_weights" in out
    assert cli.main(["compile", "llama-tiny", "--prune", "wanda-120%"]) == 2
    assert "within 0-95%" in capsys.readouterr().err

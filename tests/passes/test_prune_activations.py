"""Online activation sparsity: the flashc.sparsify op against its reference, and the
SparsifyActivations pass on llama-tiny (the model with its inputs sparsified by hand) and on
mixtral-tiny's experts; artifacts keep the thresholds."""

import copy
from dataclasses import replace

import pytest
import torch

import flashc
from flashc import zoo
from flashc.capture import capture
from flashc.ir import module_path
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.prune import PruneConfig, SparsifyActivations
from flashc.passes.quantize import CalibrationData
from flashc.pipelines import pipeline
from flashc.profiles import get_profile
from flashc_testing import fresh_ids, optimized_program, rel_err

SPARSIFY = torch.ops.flashc.sparsify.default


def small(spec: str, **kwargs) -> PruneConfig:
    """A spec with a calibration budget that keeps the tests fast."""
    return replace(PruneConfig.parse(spec), **{"min_calibration_tokens": 256, "calibration_tokens": 512,
                                               "sample_rows": 256, "allocation_step": 0.05, **kwargs})


def tokens(n: int = 1024, vocab: int = 512, seed: int = 0) -> CalibrationData:
    return CalibrationData.from_tensors(torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)))


def sparsify_pass(program, config, calibration):
    return PassManager([SparsifyActivations(config, calibration, progress=False)]).run(
        program, PassContext(get_profile("cpu")))[0]


def test_sparsify_op_matches_its_reference():
    x = torch.randn(2, 5, 16)
    t = torch.tensor(0.5)
    assert torch.equal(torch.ops.flashc.sparsify(x, t), torch.where(x.abs() > 0.5, x, torch.zeros(())))
    per_channel = torch.linspace(0, 2, 16)
    got = torch.ops.flashc.sparsify(x, per_channel)
    assert torch.equal(got, x * (x.abs() > per_channel))
    half = x.to(torch.bfloat16)
    assert torch.ops.flashc.sparsify(half, t.to(torch.bfloat16)).dtype == torch.bfloat16
    torch.library.opcheck(SPARSIFY, (x, t))
    torch.library.opcheck(SPARSIFY, (x, per_channel))


@pytest.fixture(scope="module")
def llama(tiny_models):
    model = tiny_models["llama-tiny"]
    return model, optimized_program(model, "llama-tiny", seq_len=64)


def hand_sparsified(model, program):
    """A copy of the model whose linear layers sparsify their input by hand with the program's thresholds."""
    reference = copy.deepcopy(model)
    for node in program.op_nodes():
        if node.target is SPARSIFY:
            threshold = program.params[node.args[1].name]
            for reader in node.users:
                module = reference.get_submodule(module_path(reader))
                module.register_forward_pre_hook(
                    lambda m, args, t=threshold: (torch.where(args[0].abs() > t, args[0], 0),))
    return reference


def test_llama_matches_the_model_with_inputs_sparsified_by_hand(llama):
    model, captured = llama
    program = captured.clone()
    record = sparsify_pass(program, small("online-40%"), tokens())
    nodes = [n for n in program.op_nodes() if n.target is SPARSIFY]
    assert len(nodes) == record.stats["inputs"] == 8  # per layer: q/k/v's, o's, gate/up's, down's input
    assert sorted(len(n.users) for n in nodes) == [1, 1, 1, 1, 2, 2, 3, 3]
    assert 0.4 <= record.stats["sparsity"] < 0.4 + 0.05  # model-wide, measured on held-out rows
    rows = [d for d in record.details if d["status"] == "sparsified"]
    assert all(0 < d["sparsity"] < 0.96 and abs(d["sparsity"] - d["calibrated"]) < 0.05 for d in rows)
    assert [d["layer"] for d in record.details if d["status"] == "skipped"] == ["lm_head"]
    reference = hand_sparsified(model, program)
    ids = fresh_ids("llama-tiny", seq_len=64)
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
        dense = model(ids, use_cache=False).logits
    got = program(ids).logits
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, dense) > 1e-3  # the sparsity is real


def test_mixtral_experts_input_only_when_asked(tiny_models):
    model = tiny_models["mixtral-tiny"]
    program = capture(model, zoo.example_inputs("mixtral-tiny", seq_len=64), {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    config = small("online-40%", min_calibration_tokens=128, calibration_tokens=128)  # the MoE reference is slow
    default = sparsify_pass(program.clone(), config, tokens())
    notes = {d["op"]: d["note"] for d in default.details if d["status"] == "skipped"}
    assert "PruneConfig(experts=True)" in notes["moe experts"]
    assert default.stats["inputs"] == 4  # attention only: q/k/v's and o's input per layer
    experts = program.clone()
    record = sparsify_pass(experts, replace(config, experts=True), tokens())
    moe_inputs = [n for n in experts.op_nodes() if n.target is SPARSIFY
                  and next(iter(n.users)).target is torch.ops.flashc.moe.default]
    assert len(moe_inputs) == 2 and record.stats["inputs"] == 6
    router = [n for n in experts.op_nodes() if n.target is torch.ops.flashc.moe.default][0].args[1]
    assert router.args[0].target is not SPARSIFY  # routing reads the dense input
    assert any("down projections" in d["note"] for d in record.details)


def test_compile_and_artifact_keep_the_thresholds(tiny_models, tmp_path):
    model = tiny_models["llama-tiny"]
    ids = zoo.example_inputs("llama-tiny", seq_len=64)
    cm = flashc.compile(model, "cpu", ids, prune=small("online-50%"), calibration=torch.randint(0, 512, (1024,)))
    text = cm.report().render(width=200)
    assert "pruning (online activations)" in text and "held out" in text
    cm.save(tmp_path / "a")
    loaded = flashc.load(tmp_path / "a")
    assert sum(n.target is SPARSIFY for n in loaded.program.op_nodes()) == 8
    thresholds = [k for k in loaded.program.params if k.endswith("_sparsify_threshold")]
    assert len(thresholds) == 8 and all(loaded.program.params[k].dim() == 0 for k in thresholds)
    x = fresh_ids("llama-tiny", seq_len=64)
    assert torch.equal(loaded(x).logits, cm(x).logits)

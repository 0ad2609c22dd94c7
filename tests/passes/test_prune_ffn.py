"""FFN channel pruning: the pruned graph computes what the model with those channels removed
by hand computes (separate and merged gate/up, a plain GELU MLP, MoE experts), its scores
are the Wanda-style sum, and a graph without a recognisable FFN is an error."""

import copy
import re
from dataclasses import replace

import pytest
import torch

from flashc import zoo
from flashc.capture import capture
from flashc.errors import FlashcError
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.prune import PruneConfig, PruneFfnChannels
from flashc.passes.prune.ffn import channel_scores, kept_channels
from flashc.passes.quantize import CalibrationData
from flashc.pipelines import pipeline
from flashc.profiles import get_profile
from flashc_testing import fresh_ids, rel_err

MOE = torch.ops.flashc.moe.default


def small(spec: str = "ffn-25%", **kwargs) -> PruneConfig:
    return replace(PruneConfig.parse(spec), **{"min_calibration_tokens": 128, "calibration_tokens": 256, **kwargs})


def tokens(n: int = 512, vocab: int = 512) -> CalibrationData:
    return CalibrationData.from_tensors(torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)))


def prune(program, config, calibration):
    return PassManager([PruneFfnChannels(config, calibration, progress=False)]).run(
        program, PassContext(get_profile("cpu")))[0]


def kept_rows(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Which rows of old the rows of new are (each must be an exact copy)."""
    match = (new.unsqueeze(1) == old.unsqueeze(0)).all(-1)
    assert (match.sum(1) == 1).all()
    return match.float().argmax(1)


@pytest.mark.parametrize("level", [2, 3])  # -O3 merges gate and up into one linear
def test_llama_matches_the_model_with_channels_removed_by_hand(tiny_models, level):
    model = tiny_models["llama-tiny"]
    program = capture(model, zoo.example_inputs("llama-tiny", seq_len=64), {"use_cache": False})
    PassManager(pipeline(level)).run(program, PassContext(get_profile("cpu")))
    record = prune(program, small(), tokens())
    assert record.stats["ffns"] == 2 and record.stats["sparsity"] == 0.25
    reference = copy.deepcopy(model)
    for i, layer in enumerate(reference.model.layers):
        mlp = layer.mlp
        down = program.params[f"p_model_layers_{i}_mlp_down_proj_weight_pruned"]
        keep = kept_rows(down.t(), mlp.down_proj.weight.t())
        assert len(keep) == 192 and (keep.diff() > 0).all()
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(128, len(keep), bias=False)
            new.weight.data = old.weight.data[keep].clone()
            setattr(mlp, name, new)
        down_new = torch.nn.Linear(len(keep), 128, bias=False)
        down_new.weight.data = mlp.down_proj.weight.data[:, keep].clone()
        mlp.down_proj = down_new
    ids = fresh_ids("llama-tiny", seq_len=64)
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
    assert rel_err(program(ids).logits, want) < 1e-6
    linears = [n for n in program.op_nodes() if n.target is torch.ops.aten.linear.default]
    assert (1, 64, 384 if level == 3 else 192) in {tuple(n.meta["val"].shape) for n in linears}  # shapes propagated


class GeluMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(300, 32)
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 300)

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.fc2(torch.nn.functional.gelu(self.fc1(h))))


def test_plain_mlp_with_biases():
    net = GeluMlp().eval()
    ids = torch.randint(0, 300, (1, 32))
    program = capture(net, (ids,), {})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    record = prune(program, small("ffn-50%"), tokens(vocab=300))
    assert record.stats["ffns"] == 1 and "64 -> 32 channels" in record.details[0]["note"]
    fc1 = next(v for k, v in program.params.items() if "fc1_weight" in k)
    keep = kept_rows(fc1, net.fc1.weight.data)
    with torch.no_grad():
        h = net.emb(ids)
        inner = torch.nn.functional.gelu(h @ net.fc1.weight[keep].t() + net.fc1.bias[keep])
        want = net.head(h + inner @ net.fc2.weight[:, keep].t() + net.fc2.bias)
    assert rel_err(program(ids), want) < 1e-6


def test_mixtral_experts_keep_their_own_channels(tiny_models):
    model = tiny_models["mixtral-tiny"]
    program = capture(model, zoo.example_inputs("mixtral-tiny", seq_len=64), {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    skipped = prune(program.clone(), small(), tokens())  # experts left alone unless asked: no calibration run
    assert not skipped.changed and "PruneConfig(experts=True)" in skipped.details[0]["note"]
    record = prune(program, small(experts=True, calibration_tokens=128), tokens())
    assert record.stats["ffns"] == 2
    reference = copy.deepcopy(model)
    reference.config._experts_implementation = "eager"
    for node in program.op_nodes():
        if node.target is MOE:
            gate_up, down = (program.params[node.args[i].name] for i in (2, 3))
            assert gate_up.shape[1] == 2 * 192 and down.shape[-1] == 192
            layer = int(re.search(r"layers_(\d+)_", node.args[2].name).group(1))
            experts = reference.model.layers[layer].mlp.experts
            experts.gate_up_proj = torch.nn.Parameter(gate_up.clone())
            experts.down_proj = torch.nn.Parameter(down.clone())
    ids = fresh_ids("mixtral-tiny", seq_len=64)
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
    assert rel_err(program(ids).logits, want) < 1e-5


def test_scores_are_the_wanda_style_sum():
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g), torch.randn(4, 8, generator=g)
    x_norm, h_norm = torch.rand(4, generator=g), torch.rand(8, generator=g)
    scores = channel_scores([gate, up], down, x_norm, h_norm)
    for j in range(8):
        want = sum(abs(gate[j, i]) * x_norm[i] + abs(up[j, i]) * x_norm[i] for i in range(4)) + h_norm[j] * sum(
            abs(down[o, j]) for o in range(4))
        assert float(scores[j]) == pytest.approx(float(want), rel=1e-5)
    assert kept_channels(torch.tensor([5.0, 1, 4, 2, 3]), 0.4).tolist() == [0, 2, 4]


def test_no_ffn_is_an_error(tiny_models):
    model = tiny_models["llama-tiny"]
    program = capture(model, zoo.example_inputs("llama-tiny", seq_len=64), {"use_cache": False})
    PassManager(pipeline(1)).run(program, PassContext(get_profile("cpu")))  # -O1: swiglu not fused
    with pytest.raises(FlashcError, match="found no FFN .* compile at -O2 or above"):
        prune(program, small(), tokens())


def test_compile_and_artifact_keep_the_smaller_weights(tiny_models, tmp_path):
    import flashc

    model = tiny_models["llama-tiny"]
    cm = flashc.compile(model, "cpu", zoo.example_inputs("llama-tiny", seq_len=64), prune=small(),
                        calibration=torch.randint(0, 512, (512,)))
    assert "256 -> 192 channels" in cm.report().render(width=200)
    cm.save(tmp_path / "a")
    loaded = flashc.load(tmp_path / "a")
    assert loaded.program.params["p_model_layers_0_mlp_down_proj_weight_pruned"].shape == (128, 192)
    ids = fresh_ids("llama-tiny", seq_len=64)
    assert torch.equal(loaded(ids).logits, cm(ids).logits)


def test_recovery_trains_the_narrower_weights_and_reports_perplexity(tiny_models):
    """ffn-X% with recover=: the kept channels are distilled against the unpruned program."""
    from flashc.distill import DistillConfig

    model = tiny_models["llama-tiny"]
    program = capture(model, zoo.example_inputs("llama-tiny", seq_len=32), {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    original = {n: p.clone() for n, p in program.params.items()}
    record = prune(program, small(recover=DistillConfig(steps=3, lr=1e-3)), tokens(2048))
    rows = [d for d in record.details if d.get("op") == "recovery"]
    assert rows and any("held-out perplexity" in d["note"] for d in rows)
    down = program.params["p_model_layers_0_mlp_down_proj_weight_pruned"]
    assert down.shape == (128, 192)
    # trained: no longer the kept columns of the original weight
    assert not (down.t().unsqueeze(1) == original["p_model_layers_0_mlp_down_proj_weight"].t().unsqueeze(0)).all(
        -1).any(1).all()
    ids = fresh_ids("llama-tiny", seq_len=32)
    assert torch.isfinite(program(ids).logits).all()

"""Expert pruning: the pruned graph computes what the MoE model with those experts (and their
router rows) removed by hand computes, the experts dropped are the least routed ones, dropping
none changes nothing, and impossible or unsafe cases are refused or skipped with the reason."""

import copy
import re
from dataclasses import replace

import pytest
import torch

from flashc import zoo
from flashc.capture import capture
from flashc.errors import FlashcError
from flashc.ops import moe_routing
from flashc.pass_manager import PassContext, PassManager
from flashc.passes.prune import PruneConfig, PruneExperts
from flashc.passes.prune.experts import kept_experts
from flashc.passes.quantize import CalibrationData
from flashc.pipelines import pipeline
from flashc.profiles import get_profile
from flashc_testing import fresh_ids, rel_err

MOE = torch.ops.flashc.moe.default
SEQ = 64


def small(spec: str = "experts-1", **kwargs) -> PruneConfig:
    return replace(PruneConfig.parse(spec), **{"min_calibration_tokens": 128, "calibration_tokens": 256, **kwargs})


def token_ids(n: int = 512, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def prune(program, config, calibration):
    return PassManager([PruneExperts(config, calibration, progress=False)]).run(
        program, PassContext(get_profile("cpu")))[0]


def mixtral_program(model, level: int = 2):
    program = capture(model, zoo.example_inputs("mixtral-tiny", seq_len=SEQ), {"use_cache": False})
    PassManager(pipeline(level)).run(program, PassContext(get_profile("cpu")))
    return program


def eager_routing_mass(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the routing weight each expert gets over ids (windows of SEQ), computed from
    the Hugging Face model's own router outputs."""
    masses = [torch.zeros(layer.mlp.gate.num_experts, dtype=torch.float64) for layer in model.model.layers]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def record(module, args, out, i=i):
            weights, experts = moe_routing(out[0], module.top_k, True, torch.float32)
            masses[i].index_add_(0, experts.reshape(-1), weights.reshape(-1).double())
        hooks.append(layer.mlp.gate.register_forward_hook(record))
    with torch.no_grad():
        for window in ids.reshape(-1, SEQ):
            model(window[None], use_cache=False)
    for h in hooks:
        h.remove()
    return masses


@pytest.mark.parametrize("level", [2, 3])
def test_mixtral_matches_the_model_with_experts_removed_by_hand(tiny_models, level):
    model = tiny_models["mixtral-tiny"]
    program = mixtral_program(model, level)
    calibration = token_ids()
    record = prune(program, small("experts-1"), CalibrationData.from_tensors(calibration))
    assert record.stats["moe_layers"] == 2 and (record.stats["experts_before"], record.stats["experts_after"]) == (8, 6)
    masses = eager_routing_mass(model, calibration[:256])  # the pass reads calibration_tokens=256
    reference = copy.deepcopy(model)
    reference.config._experts_implementation = "eager"
    rows = {r["layer"]: r for r in record.details if r.get("status") == "pruned"}
    for node in program.op_nodes():
        if node.target is not MOE:
            continue
        index = int(re.search(r"layers_(\d+)_", node.args[2].name).group(1))
        keep = kept_experts(masses[index], 1)
        dropped = sorted(set(range(4)) - set(keep.tolist()))
        row = next(r for name, r in rows.items() if f"layers_{index}_" in name)
        assert row["dropped"] == dropped  # the least routed expert, by the model's own router
        assert row["routing_mass_removed"] == pytest.approx(float(masses[index][dropped].sum() / masses[index].sum()),
                                                            rel=1e-4)
        mlp = reference.model.layers[index].mlp
        mlp.gate.weight = torch.nn.Parameter(mlp.gate.weight.data[keep].clone())
        mlp.experts.gate_up_proj = torch.nn.Parameter(mlp.experts.gate_up_proj.data[keep].clone())
        mlp.experts.down_proj = torch.nn.Parameter(mlp.experts.down_proj.data[keep].clone())
        mlp.gate.num_experts = mlp.experts.num_experts = 3
        assert program.params[node.args[2].name].shape == (3, 512, 128)
        assert tuple(node.args[1].meta["val"].shape) == (SEQ, 3)  # router logits: shapes propagated
    ids = fresh_ids("mixtral-tiny", seq_len=SEQ)
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
    assert rel_err(program(ids).logits, want) < 1e-5


def test_dropping_no_expert_is_the_identity(tiny_models):
    model = tiny_models["mixtral-tiny"]
    program = mixtral_program(model)
    unpruned = program.clone()
    params = dict(program.params)
    record = prune(program, small("experts-0"), CalibrationData.from_tensors(token_ids()))
    assert all(r["experts_after"] == 4 and r["routing_mass_removed"] == 0 for r in record.details
               if r.get("status") == "pruned")
    assert program.params.keys() == params.keys() and all(program.params[k] is params[k] for k in params)
    ids = fresh_ids("mixtral-tiny", seq_len=SEQ)
    with torch.no_grad():
        assert torch.equal(program(ids).logits, unpruned(ids).logits)


class ToyMoe(torch.nn.Module):
    """Embedding -> router (with bias) -> flashc.moe -> head; expert `dead` is never routed."""

    def __init__(self, experts: int = 4, dead: int = 2, written: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.emb = torch.nn.Embedding(300, 32)
        self.router = torch.nn.Linear(32, experts)
        with torch.no_grad():
            self.router.bias[dead] = -1e4  # its softmax probability underflows to 0: never in any top-2
        gate_up = torch.randn(experts, 2 * 48, 32, generator=g) * 0.2
        down = torch.randn(experts, 32, 48, generator=g) * 0.2
        if written:  # a weight the graph writes in place: its shape must not change
            self.register_buffer("gate_up", gate_up)
        else:
            self.gate_up = torch.nn.Parameter(gate_up)
        self.down = torch.nn.Parameter(down)
        self.head = torch.nn.Linear(32, 300)
        self.written = written

    def forward(self, ids):
        h = self.emb(ids).reshape(-1, 32)
        out = torch.ops.flashc.moe(h, self.router(h), self.gate_up, self.down, 2, True)
        if self.written:  # after the MoE read it, so the MoE reads the stored weight itself
            self.gate_up.mul_(1.0)
        return self.head(out + h).reshape(*ids.shape, -1)


def test_the_never_routed_expert_goes_first_and_the_bias_is_sliced():
    net = ToyMoe().eval()
    ids = torch.randint(0, 300, (1, 64))
    program = capture(net, (ids,), {})
    record = prune(program, small("experts-1"), CalibrationData.from_tensors(token_ids(vocab=300)))
    row = next(r for r in record.details if r.get("status") == "pruned")
    assert row["dropped"] == [2] and row["routing_mass_removed"] == 0.0
    assert "4 -> 3 experts" in row["note"] and row["bytes_after"] < row["bytes_before"]
    keep = torch.tensor([0, 1, 3])
    fresh = torch.randint(0, 300, (1, 64))
    with torch.no_grad():
        h = net.emb(fresh).reshape(-1, 32)
        logits = torch.nn.functional.linear(h, net.router.weight[keep], net.router.bias[keep])
        out = torch.ops.flashc.moe(h, logits, net.gate_up[keep], net.down[keep], 2, True)
        want = net.head(out + h)
        unpruned = net(fresh)
    got = program(fresh)
    assert rel_err(got, want) < 1e-6
    assert rel_err(got, unpruned) < 1e-6  # the dropped expert never ran: the model computes the same


def test_a_weight_written_in_place_is_skipped_and_listed():
    net = ToyMoe(written=True).eval()
    program = capture(net, (torch.randint(0, 300, (1, 64)),), {})
    record = prune(program, small("experts-1"), CalibrationData.from_tensors(token_ids(vocab=300)))
    assert not record.changed
    assert [(d["status"], d["note"]) for d in record.details] == [
        ("skipped", "a weight is written in place by the graph")]


def test_too_many_experts_is_an_error_naming_the_layer(tiny_models):
    program = mixtral_program(tiny_models["mixtral-tiny"])
    with pytest.raises(FlashcError, match=r"MoE layer model_layers_0_mlp_experts has 4 experts and routes each token "
                                          r"to 2; removing 3 would leave 1, fewer than top_k: remove at most 2"):
        prune(program, small("experts-3"), CalibrationData.from_tensors(token_ids()))


def test_a_graph_without_moe_is_an_error(tiny_models):
    program = capture(tiny_models["llama-tiny"], zoo.example_inputs("llama-tiny", seq_len=SEQ), {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    with pytest.raises(FlashcError, match="found no fused MoE layer"):
        prune(program, small(), CalibrationData.from_tensors(token_ids()))


def test_kept_experts_order():
    assert kept_experts(torch.tensor([5.0, 0.0, 3.0, 0.0]), 2).tolist() == [0, 2]  # ties: the later goes first
    assert kept_experts(torch.tensor([5.0, 1.0, 3.0, 2.0]), 1).tolist() == [0, 2, 3]


def test_compile_with_a_fraction(tiny_models):
    import flashc

    model = tiny_models["mixtral-tiny"]
    cm = flashc.compile(model, "cpu", zoo.example_inputs("mixtral-tiny", seq_len=SEQ), prune=small("experts-25%"),
                        calibration=token_ids(1024))
    record = next(r for r in cm.records if r.name == "prune_experts")
    assert record.stats["experts_after"] == 6 and record.stats["sparsity"] > 0.2
    assert "4 -> 3 experts" in cm.report().render(width=250)
    moe = next(n for n in cm.program.op_nodes() if n.target is MOE)
    assert cm.program.params[moe.args[2].name].shape[0] == 3
    ids = fresh_ids("mixtral-tiny", seq_len=SEQ)
    assert torch.isfinite(cm(ids).logits).all()


def test_recovery_trains_the_kept_experts():
    from flashc.distill import DistillConfig

    net = ToyMoe().eval()
    program = capture(net, (torch.randint(0, 300, (1, 64)),), {})
    config = small("experts-1", recover=DistillConfig(steps=3, lr=1e-3))
    record = prune(program, config, CalibrationData.from_tensors(token_ids(2048, vocab=300)))
    assert any("held-out perplexity" in d["note"] for d in record.details if d.get("op") == "recovery")
    gate_up = next(v for k, v in program.params.items() if "gate_up" in k)
    assert gate_up.shape[0] == 3 and not torch.equal(gate_up, net.gate_up.detach()[[0, 1, 3]])  # trained

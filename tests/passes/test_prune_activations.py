"""Online activation sparsity: the flashc.sparsify op against its reference, and the
SparsifyActivations pass on llama-tiny (the model with its inputs sparsified by hand) and on
mixtral-tiny's experts (their input and, through flashc.moe_sparse, their intermediate);
artifacts keep the thresholds."""

import copy
import re
from types import SimpleNamespace
from dataclasses import replace

import pytest
import torch

import flashc
from flashc import zoo
from flashc.capture import capture
from flashc.ir import module_path
from flashc.pass_manager import PassContext, PassManager
from flashc.errors import FlashcError
from flashc.passes.prune import PruneConfig, SparsifyActivations
from flashc.passes.prune.activations import allocation_groups
from flashc.passes.quantize import CalibrationData
from flashc.pipelines import pipeline
from flashc.profiles import get_profile
from flashc_testing import fresh_ids, optimized_program, rel_err

SPARSIFY = torch.ops.flashc.sparsify.default
MOE_SPARSE = torch.ops.flashc.moe_sparse.default


def small(spec: str, **kwargs) -> PruneConfig:
    """A spec with a calibration budget that keeps the tests fast."""
    return replace(PruneConfig.parse(spec), **{"min_calibration_tokens": 256, "calibration_tokens": 512,
                                               "sample_rows": 256, "allocation_step": 0.05, **kwargs})


def tokens(n: int = 1024, vocab: int = 512, seed: int = 0) -> CalibrationData:
    return CalibrationData.from_tensors(torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)))


def sparsify_pass(program, config, calibration):
    return PassManager([SparsifyActivations(config, calibration, progress=False)]).run(
        program, PassContext(get_profile("cpu")))[0]


def assert_matches_reference_not_dense(program, reference, model, name: str) -> None:
    """The pruned program equals the model sparsified by hand (reference) on fresh ids and
    differs from the dense model: the thresholds are the hand-made ones, and they bite.

    An entry within float rounding of its threshold may be kept by one and dropped by the other
    (the program's activations round unlike eager's; seen once, in a fresh-clone run: rel. err.
    0.018), and the flip reaches every later token: a draw that is not exact must stay far
    closer to the reference than to the dense model, and the next fresh draw must be exact."""
    for draw in range(2):
        ids = fresh_ids(name, seq_len=64)
        with torch.no_grad():
            want = reference(ids, use_cache=False).logits
            dense = model(ids, use_cache=False).logits
        got = program(ids).logits
        assert rel_err(got, dense) > 1e-3  # the sparsity is real
        if rel_err(got, want) < 1e-5:
            return
        assert draw == 0, f"two fresh draws differ from the reference (rel. err. {rel_err(got, want):.2e})"
        assert rel_err(got, want) < 0.25 * rel_err(want, dense), (rel_err(got, want), rel_err(want, dense))

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
                if reader.target is MOE_SPARSE:  # the experts' input: see mixtral_sparsified_by_hand
                    continue
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
    assert_matches_reference_not_dense(program, reference, model, "llama-tiny")


def moe_float64(x, logits, gate_up, down, top_k, threshold):
    """Mixtral's experts in float64, token by token: top-k of the softmax, renormalised, each
    chosen expert's intermediate silu(gate) * up zeroed where |.| <= threshold before down."""
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    f = down.shape[-1]
    out = torch.zeros_like(x)
    probs = torch.softmax(logits.double(), -1)
    for t in range(x.shape[0]):
        weights, experts = probs[t].topk(top_k)
        for w, e in zip(weights / weights.sum(), experts.tolist()):
            gu = gate_up[e] @ x[t]
            h = torch.nn.functional.silu(gu[:f]) * gu[f:]
            out[t] += w * (down[e] @ (h * (h.abs() > threshold.double())))
    return out


@pytest.mark.parametrize("per_channel", [False, True])
def test_moe_sparse_matches_a_float64_reference(per_channel):
    g = torch.Generator().manual_seed(3)
    t, h, f, e, k = 37, 24, 40, 5, 2
    x, logits = torch.randn(t, h, generator=g), torch.randn(t, e, generator=g)
    gate_up, down = torch.randn(e, 2 * f, h, generator=g) / h ** 0.5, torch.randn(e, h, f, generator=g) / f ** 0.5
    threshold = torch.rand(f, generator=g) * 0.6 if per_channel else torch.tensor(0.3)
    got = torch.ops.flashc.moe_sparse(x, logits, gate_up, down, k, True, threshold)
    want = moe_float64(x, logits, gate_up, down, k, threshold)
    assert rel_err(got.double(), want) < 1e-5
    dense = torch.ops.flashc.moe(x, logits, gate_up, down, k, True)
    assert rel_err(got, dense) > 0.05  # the threshold zeroes a real share of the intermediate
    zero = torch.ops.flashc.moe_sparse(x, logits, gate_up, down, k, True, torch.tensor(0.0))
    assert torch.equal(zero, dense)  # threshold 0 zeroes only exact zeros: flashc.moe itself
    torch.library.opcheck(MOE_SPARSE, (x, logits, gate_up, down, k, True, threshold))


@pytest.fixture(scope="module")
def mixtral(tiny_models):
    model = tiny_models["mixtral-tiny"]
    program = capture(model, zoo.example_inputs("mixtral-tiny", seq_len=64), {"use_cache": False})
    PassManager(pipeline(2)).run(program, PassContext(get_profile("cpu")))
    return model, program


# the MoE reference is slow: a small calibration run
MOE_CONFIG = small("online-40%", min_calibration_tokens=128, calibration_tokens=128)


def test_mixtral_experts_only_when_asked(mixtral):
    _, program = mixtral
    default = sparsify_pass(program.clone(), MOE_CONFIG, tokens())
    notes = {d["op"]: d["note"] for d in default.details if d["status"] == "skipped"}
    assert "PruneConfig(experts=True)" in notes["moe experts"]
    assert default.stats["inputs"] == 4  # attention only: q/k/v's and o's input per layer
    experts = program.clone()
    record = sparsify_pass(experts, replace(MOE_CONFIG, experts=True), tokens())
    moes = [n for n in experts.op_nodes() if n.target is MOE_SPARSE]
    assert len(moes) == 2 and not any(n.target is torch.ops.flashc.moe.default for n in experts.op_nodes())
    assert all(n.args[0].target is SPARSIFY for n in moes)  # the experts' token input
    assert record.stats["inputs"] == 8  # per layer: q/k/v's, o's, the experts' input and their intermediate
    assert all(n.args[1].args[0].target is not SPARSIFY for n in moes)  # routing reads the dense input


def test_mixtral_experts_intermediate_reports_its_measured_sparsity(mixtral):
    _, program = mixtral
    experts = program.clone()
    record = sparsify_pass(experts, replace(MOE_CONFIG, experts=True), tokens())
    down = [d for d in record.details if d["op"] == "moe experts down"]
    assert len(down) == 2 and all(d["status"] == "sparsified" for d in down)
    for d in down:
        assert 0.05 <= d["sparsity"] < 0.96 and abs(d["sparsity"] - d["calibrated"]) < 0.05  # held-out rows
        assert d["threshold_param"].endswith("_sparsify_threshold") and 0 < d["rel_error"] < 1
        assert d["params_after"] < d["params_before"]
    thresholds = {n.args[6].name for n in experts.op_nodes() if n.target is MOE_SPARSE}
    assert thresholds == {d["threshold_param"] for d in down}
    assert 0.4 <= record.stats["sparsity"] < 0.4 + 0.05  # the target now spans the experts' down reads too


def mixtral_sparsified_by_hand(model, program):
    """A copy of mixtral whose attention linears and experts sparsify their inputs and
    intermediates by hand with the program's thresholds (HF's MixtralExperts, rewritten)."""
    import types

    import torch.nn.functional as F

    reference = hand_sparsified(model, program)  # q/k/v and o: hooks on the linears
    for node in program.op_nodes():
        if node.target is not MOE_SPARSE:
            continue
        t_in = program.params[node.args[0].args[1].name] if node.args[0].target is SPARSIFY else torch.tensor(0.0)
        t_mid = program.params[node.args[6].name]
        layer = int(re.search(r"layers_(\d+)_", node.args[2].name).group(1))  # p_model_layers_0_mlp_experts_...
        experts = reference.model.layers[layer].mlp.experts

        def forward(self, hidden, top_k_index, top_k_weights, t_in=t_in, t_mid=t_mid):
            hidden = torch.where(hidden.abs() > t_in, hidden, 0)
            out = torch.zeros_like(hidden)
            for e in range(self.num_experts):
                token, slot = torch.where(top_k_index == e)
                gate, up = F.linear(hidden[token], self.gate_up_proj[e]).chunk(2, dim=-1)
                h = self.act_fn(gate) * up
                h = torch.where(h.abs() > t_mid, h, 0)
                out.index_add_(0, token, F.linear(h, self.down_proj[e]) * top_k_weights[token, slot, None])
            return out

        experts.forward = types.MethodType(forward, experts)
    return reference


@pytest.mark.parametrize("score", ["magnitude", "weighted"])
def test_mixtral_matches_the_model_with_experts_sparsified_by_hand(mixtral, score):
    model, captured = mixtral
    program = captured.clone()
    record = sparsify_pass(program, replace(MOE_CONFIG, experts=True, score=score), tokens())
    assert 0.4 <= record.stats["sparsity"] < 0.45
    thresholds = [program.params[n.args[6].name] for n in program.op_nodes() if n.target is MOE_SPARSE]
    # weighted: one threshold per intermediate channel, shared by the experts
    assert all(t.dim() == (score == "weighted") for t in thresholds)
    reference = mixtral_sparsified_by_hand(model, program)
    assert_matches_reference_not_dense(program, reference, model, "mixtral-tiny")


def test_block_allocation_meets_the_target_in_every_block(mixtral):
    _, program = mixtral
    record = sparsify_pass(program.clone(), replace(MOE_CONFIG, experts=True, allocation="block"), tokens())
    rows = [d for d in record.details if d["status"] in ("sparsified", "dense")]
    blocks: dict[str, list] = {}
    for d in rows:
        block = d["layer"].replace(".", "_").split("_layers_")[1].split("_")[0]
        blocks.setdefault(block, []).append(d)
    assert sorted(blocks) == ["0", "1"] and all(len(b) == 4 for b in blocks.values())
    for b in blocks.values():  # the calibrated levels, weighted by the reads of each input
        reached = sum(d["calibrated"] * d["params_before"] for d in b) / sum(d["params_before"] for d in b)
        assert 0.4 - 1e-6 <= reached < 0.4 + 0.05


def test_allocation_groups_are_transformer_blocks():
    names = ["model.layers.0.self_attn.q_proj (+k_proj, v_proj)", "model.layers.0.self_attn.o_proj",
             "model_layers_0_mlp_experts", "model_layers_0_mlp_experts", "model.layers.1.self_attn.o_proj",
             "model_layers_1_mlp_experts", "model.layers.10.mlp.down_proj", "lm_head"]
    sites = [SimpleNamespace(name=n) for n in names]
    assert allocation_groups(sites, "block") == [[0, 1, 2, 3], [4, 5], [6], [7]]
    assert allocation_groups(sites, "model") == [list(range(8))]
    with pytest.raises(FlashcError, match="allocation must be one of block, model"):
        replace(PruneConfig.parse("online-40%"), allocation="layer")


def test_mixtral_artifact_keeps_the_experts_thresholds(tiny_models, tmp_path):
    model = tiny_models["mixtral-tiny"]
    ids = zoo.example_inputs("mixtral-tiny", seq_len=64)
    cm = flashc.compile(model, "cpu", ids, prune=replace(MOE_CONFIG, experts=True),
                        calibration=torch.randint(0, 512, (512,)))
    cm.save(tmp_path / "a")
    loaded = flashc.load(tmp_path / "a")
    assert sum(n.target is MOE_SPARSE for n in loaded.program.op_nodes()) == 2
    x = fresh_ids("mixtral-tiny", seq_len=64)
    assert torch.equal(loaded(x).logits, cm(x).logits)  # weights load aligned: see artifact.load_tensors


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


def test_weighted_score_thresholds_each_channel_by_its_weight_column(llama):
    """score="weighted" (WINA): entry i of an input survives when |x_i| c_i > t, c_i the norm of the weight
    column it multiplies (channel-normalized readers): a threshold per channel, t / c_i; the target is met and
    the program is the model with those per-channel thresholds applied by hand."""
    model, captured = llama
    program = captured.clone()
    record = sparsify_pass(program, small("online-40%", score="weighted"), tokens())
    assert 0.4 <= record.stats["sparsity"] < 0.45
    nodes = [n for n in program.op_nodes() if n.target is SPARSIFY]
    assert len(nodes) == 8
    for node in nodes:
        threshold = program.params[node.args[1].name]
        weights = [program.params[r.args[1].name].float() for r in node.users]
        assert threshold.shape == (weights[0].shape[1],)
        # t_i * c_i is one number: the readers' column norms, up to the per-output-channel normalization
        # (which rescales whole rows, so the columns' ratios within one reader are kept only approximately)
        raw = sum((w ** 2).sum(0) for w in weights).sqrt()
        assert torch.corrcoef(torch.stack([threshold.double().log(), -raw.double().log()]))[0, 1] > 0.5
    reference = hand_sparsified(model, program)
    assert_matches_reference_not_dense(program, reference, model, "llama-tiny")


def test_column_scale_keeps_zero_columns_finite():
    from flashc.passes.prune.activations import column_scale

    gram = torch.diag(torch.tensor([4.0, 0.0, 9.0]))
    assert torch.equal(column_scale(gram), torch.tensor([2.0, 2.0, 3.0]))
    with pytest.raises(FlashcError, match="score"):
        PruneConfig(method="online", sparsity=0.4, score="wina")

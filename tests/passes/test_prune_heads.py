"""Attention-head pruning: the pruned model computes what the model with those query heads
(and, without GQA, their key/value heads) removed by hand computes, the least important heads
go first, the layers that lose heads are the least damaging by measurement (not by score
shares), dropping none changes nothing, the KV cache keeps its layout under GQA, a decode
step compiles and generates, and what cannot be pruned is refused naming the layer."""

import copy
from dataclasses import replace

import pytest
import torch
from flashc_testing import fresh_ids, rel_err

import flashc
from flashc import zoo
from flashc.decode import DecodeStep, decode_example_inputs, empty_kv_cache
from flashc.errors import FlashcError
from flashc.passes.prune import PruneConfig, prune_heads
from flashc.passes.prune.heads import _allocate, _Plan, head_scores, head_sites
from flashc.passes.quantize import CalibrationData

SEQ = 32


def small(spec: str = "heads-50%", **kwargs) -> PruneConfig:
    return replace(PruneConfig.parse(spec), **{"min_calibration_tokens": 128, "calibration_tokens": 512, **kwargs})


def token_ids(n: int = 1024, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))


def calibration(vocab: int = 512) -> CalibrationData:
    return CalibrationData.from_tensors(token_ids(vocab=vocab))


def by_hand(model, dropped: list[list[int]], kv_too: bool = False):
    """A copy of model with the listed query heads of each layer removed by slicing its weights."""
    reference = copy.deepcopy(model)
    for layer, heads in zip(reference.model.layers, dropped):
        attention = layer.self_attn
        d = attention.head_dim
        total = attention.q_proj.out_features // d
        keep = [h for h in range(total) if h not in heads]
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])

        def sliced(linear, rows=rows, columns=False):
            w = linear.weight.data[:, rows] if columns else linear.weight.data[rows]
            new = torch.nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
            new.weight.data = w.clone()
            if linear.bias is not None:
                new.bias.data = (linear.bias.data if columns else linear.bias.data[rows]).clone()
            return new

        attention.q_proj, attention.o_proj = sliced(attention.q_proj), sliced(attention.o_proj, columns=True)
        if kv_too:
            attention.k_proj, attention.v_proj = sliced(attention.k_proj), sliced(attention.v_proj)
        else:
            attention.num_key_value_groups = len(keep) // (attention.k_proj.out_features // d)
    return reference


@pytest.mark.parametrize("family", ["llama-tiny", "mixtral-tiny", "qwen2-tiny"])  # qwen2: q/k/v biases
def test_pruned_model_matches_the_heads_removed_by_hand(tiny_models, family):
    model = tiny_models[family]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_heads(model, small(), calibration(), progress=False)
    assert [(r["heads_after"], r["kv_heads_after"]) for r in result.layers] == [(2, 2), (2, 2)]
    for r in result.layers:  # one query head of each group of two
        assert {h // 2 for h in r["dropped"]} == {0, 1}
    reference = by_hand(model, [r["dropped"] for r in result.layers])
    ids = fresh_ids(family, seq_len=SEQ)
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
        assert rel_err(result.model(ids, use_cache=False).logits, want) < 1e-5
    cm = flashc.compile(model, "cpu", zoo.example_inputs(family, seq_len=SEQ), prune=small(),
                        calibration=token_ids())
    assert rel_err(cm(ids).logits, want) < 1e-5
    assert "pruning (heads-50%)" in cm.rewrites and "8 -> 4 query heads" in cm.report().render(width=250)
    q = next(v for k, v in cm.program.params.items() if "layers_0_self_attn_q_proj_weight" in k or
             "layers_0_self_attn_qkv" in k)
    assert q.shape[0] in (64, 64 + 2 * 64)  # q alone, or q|k|v merged at -O3
    # the caller's model is untouched
    assert model.config.num_attention_heads == 4 and model.model.layers[0].self_attn.num_key_value_groups == 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dropping_no_head_is_the_identity(tiny_models):
    model = tiny_models["llama-tiny"]
    result = prune_heads(model, small("heads-0%"), calibration(), progress=False)
    assert all(r["dropped"] == [] for r in result.layers)
    ids = fresh_ids("llama-tiny", seq_len=SEQ)
    with torch.no_grad():
        assert torch.equal(result.model(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_heads_with_no_output_go_first(tiny_models):
    model = copy.deepcopy(tiny_models["llama-tiny"])
    d = model.model.layers[0].self_attn.head_dim
    with torch.no_grad():  # layer 0: heads 0 (group 0) and 3 (group 1) write nothing
        model.model.layers[0].self_attn.o_proj.weight[:, 0:d] = 0
        model.model.layers[0].self_attn.o_proj.weight[:, 3 * d:4 * d] = 0
    half = prune_heads(model, small("heads-50%"), calibration(), progress=False)
    assert half.layers[0]["dropped"] == [0, 3] and half.layers[0]["importance_removed"] == 0.0
    # heads-25% of 2 layers x groups of 2: one layer loses one head per group, the one whose heads matter least
    quarter = prune_heads(model, small("heads-25%"), calibration(), progress=False)
    assert [r["dropped"] for r in quarter.layers] == [[0, 3], []]
    assert quarter.layers[0]["damage"] == [{"per_group": 1, "heads": [0, 3], "kl": 0.0, "loss_increase": 0.0}]
    assert quarter.layers[1]["damage"][0]["kl"] > 0
    assert quarter.config_note.startswith("config.num_attention_heads left at 4")
    assert quarter.model.model.layers[1].self_attn.num_key_value_groups == 2
    assert quarter.model.model.layers[0].self_attn.num_key_value_groups == 1


def test_layers_are_chosen_by_measured_damage_not_score_shares(tiny_models):
    model = copy.deepcopy(tiny_models["llama-tiny"])
    d = model.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(0.01)  # layer 0 barely writes to the residual
        o = model.model.layers[1].self_attn.o_proj.weight  # layer 1 writes a lot, heads 1 and 3 least of it
        o[:, d:2 * d].mul_(0.25)
        o[:, 3 * d:].mul_(0.25)
        o.mul_(10)
    config = small("heads-25%")
    sites = head_sites(model)
    scores, _ = head_scores(model, sites, token_ids(), config, progress=False)
    lowest_share = [sum(float(min(s[2 * g:2 * g + 2])) for g in range(2)) / float(s.sum()) for s in scores]
    assert lowest_share[1] < 0.6 * lowest_share[0]  # by score shares layer 1 would lose its heads
    result = prune_heads(model, config, calibration(), progress=False)
    kl = [r["damage"][0]["kl"] for r in result.layers]
    assert kl[0] < 0.01 * kl[1]  # measured, layer 0 is the one to prune
    assert [r["dropped"] for r in result.layers][1] == [] and len(result.layers[0]["dropped"]) == 2
    assert "damage measured with this layer alone pruned: 1 per group" in result.rows()[0][1]


def kl_and_loss(reference, model, ids: torch.Tensor) -> tuple[float, float]:
    """Mean KL(reference || model) of the next-token distributions, in float64, and the
    relative increase of the next-token loss."""
    with torch.no_grad():
        p = torch.log_softmax(reference(ids, use_cache=False).logits[:, :-1].double(), -1)
        q = torch.log_softmax(model(ids, use_cache=False).logits[:, :-1].double(), -1)
    targets = ids[:, 1:].unsqueeze(-1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    return kl, float(q.gather(-1, targets).sum() / p.gather(-1, targets).sum()) - 1


def test_the_least_damaging_layers_go_and_damage_is_what_removal_does():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # layers of clearly different weight in the output
        for layer, scale in zip(model.model.layers, (1.0, 0.2, 3.0, 0.5)):
            layer.self_attn.o_proj.weight.mul_(scale)
    result = prune_heads(model, small("heads-25%"), calibration(), progress=False)  # 2 of 4 layers lose 1 per group
    kl = [r["damage"][0]["kl"] for r in result.layers]
    least = sorted(sorted(range(4), key=lambda i: kl[i])[:2])
    assert [i for i, r in enumerate(result.layers) if r["dropped"]] == least
    # each measurement is what removing that candidate's heads from that layer alone computes, on the first
    # calibration windows (512 tokens: 4 windows of the model's 128 positions)
    ids = token_ids()[:512].reshape(4, 128)
    for i, r in enumerate(result.layers):
        damage = r["damage"][0]
        alone = by_hand(model, [damage["heads"] if j == i else [] for j in range(4)])
        want_kl, want_loss = kl_and_loss(model, alone, ids)
        assert damage["kl"] == pytest.approx(want_kl, rel=1e-3)
        assert damage["loss_increase"] == pytest.approx(want_loss, rel=1e-3, abs=1e-6)
        assert len(damage["heads"]) == 2 and {h // 2 for h in damage["heads"]} == {0, 1}
        if r["dropped"]:
            assert r["dropped"] == damage["heads"]


def test_units_go_to_the_least_added_damage():
    # groups of 4: a layer can lose 1-3 heads per group; what a unit costs is the damage it adds
    damage = {(0, 1): 0.10, (0, 2): 0.15, (0, 3): 1.0, (1, 1): 0.12, (1, 2): 0.5, (1, 3): 0.6}
    damage = {k: {"kl": v} for k, v in damage.items()}
    taken = [_allocate(_Plan(units, choice=True), 2, 4, damage) for units in (1, 2, 3, 4, 5)]
    assert taken == [[1, 0], [2, 0], [2, 1], [2, 2], [2, 3]]
    assert _allocate(_Plan(6, choice=False), 2, 4, {}) == [3, 3]


def test_decode_step_keeps_the_cache_layout_and_generates(tiny_models):
    model = tiny_models["llama-tiny"]
    step = DecodeStep(model, max_cache_len=32)
    cm = flashc.compile(step, "cpu", decode_example_inputs(model, 1, 32), level=3, prune=small(),
                        calibration=token_ids())
    assert [tuple(s.shape) for s in cm.inputs[2:]] == [(1, 2, 32, 32)] * 4  # k/v per layer, as before
    pruned = prune_heads(model, small(), calibration(), progress=False).model
    tokens = torch.randint(0, 512, (1, 7))
    kv = empty_kv_cache(model, 1, 32)
    steps = [cm(tokens[:, t:t + 1], torch.tensor([t]), *kv) for t in range(tokens.shape[1])]
    with torch.no_grad():
        full = pruned(tokens, use_cache=False).logits
    assert rel_err(torch.cat(steps, 1), full) < 1e-5
    out = cm.generate(tokens, 5)
    ids = tokens
    with torch.no_grad():
        for _ in range(5):  # greedy decoding of the pruned eager model
            ids = torch.cat([ids, pruned(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out[:, -5:], ids[:, -5:])


def test_without_gqa_key_value_heads_go_too_and_the_cache_shrinks():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    result = prune_heads(model, small("heads-25%"), calibration(), progress=False)
    assert [(r["heads_after"], r["kv_heads_after"]) for r in result.layers] == [(3, 3), (3, 3)]
    pruned = result.model
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads, pruned.config.head_dim) == (3, 3, 32)
    assert model.config.num_key_value_heads == 4  # the caller's config is untouched
    reference = by_hand(model, [r["dropped"] for r in result.layers], kv_too=True)
    ids = torch.randint(0, 512, (1, SEQ))
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
        assert rel_err(pruned(ids, use_cache=False).logits, want) < 1e-5
    cm = flashc.compile(DecodeStep(model, 16), "cpu", decode_example_inputs(model, 1, 16), level=2,
                        prune=small("heads-25%"), calibration=token_ids())
    assert [tuple(s.shape) for s in cm.inputs[2:]] == [(1, 3, 16, 32)] * 4  # the cache has 3 heads now
    kv = empty_kv_cache(pruned, 1, 16)
    steps = [cm(ids[:, t:t + 1], torch.tensor([t]), *kv) for t in range(6)]
    assert rel_err(torch.cat(steps, 1), want[:, :6]) < 1e-5


@pytest.mark.parametrize("spec, message", [
    ("heads-10%", r"rounds to no head .* the smallest step is heads-25%"),
    ("heads-75%", r"would remove every query head of a group of 2 .* at most heads-50%"),
])
def test_impossible_shares_are_refused(tiny_models, spec, message):
    with pytest.raises(FlashcError, match=message):
        prune_heads(tiny_models["llama-tiny"], small(spec), calibration(), progress=False)


class OwnAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        return self.qkv(x)[..., :16]


class OwnLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = OwnAttention()


class OwnModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([OwnLayer(), OwnLayer()])


def test_unknown_attention_is_refused_naming_the_layer():
    with pytest.raises(FlashcError, match=r"heads: layer 0 \(layers.0.self_attn, OwnAttention\) has no nn.Linear "
                                          r"q_proj, k_proj, v_proj, o_proj"):
        prune_heads(OwnModel(), small(), calibration(), progress=False)


def test_recovery_and_ssm_are_refused(tiny_models):
    from flashc.distill import DistillConfig

    with pytest.raises(FlashcError, match="recovery distillation is not built for head pruning"):
        replace(PruneConfig.parse("heads-25%"), recover=DistillConfig(steps=1))
    model = tiny_models["llama-tiny"]
    with pytest.raises(FlashcError, match="both rewrite the attention layers"):
        flashc.compile(model, "cpu", zoo.example_inputs("llama-tiny", seq_len=SEQ), prune="heads-50%", ssm="all",
                       calibration=token_ids())

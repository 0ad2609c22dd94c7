"""flashc.layerskip: the target's own first layers as its drafter.

The early-exit model is checked against the original's first k layers + final norm + LM head
run by hand in float64; greedy generation with it drafting against an eager full-forward
argmax loop on fresh random prompts.
"""

import copy

import pytest
import torch
from flashc_testing import fresh_ids
from test_generate import greedy_reference

from flashc import zoo
from flashc.errors import InputError
from flashc.generation import GenerationModel, compile_generation
from flashc.layerskip import (
    CATCH_UP, choose_exit_layer, compile_layerskip, default_exit_layers, early_exit_model,
)

CACHE_LEN = 48


def deep_llama(seed: int = 0):
    """A 4-layer Llama, so there are exits on both sides of the middle."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: compared over the full length
    return model


def with_identity_layers(model, start: int):
    """A copy whose layers from `start` on add zero to the residual stream (attention and MLP
    outputs projected to zero), so an exit at `start` or later computes the full model."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.layers[start:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


@pytest.fixture(scope="module")
def deep():
    model = deep_llama()
    return model, compile_generation(model, "cpu", cache_len=CACHE_LEN, batch=2, prefill_chunk=None, draft_len=4,
                                     level=1)


def by_hand(model, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Logits of the model's first k decoder layers, final norm and LM head, called one by one."""
    inner = model.model
    positions = torch.arange(ids.shape[1])[None]
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()[None, None]  # True: visible
    hidden = inner.embed_tokens(ids)
    rotary = inner.rotary_emb(hidden, positions)
    for layer in inner.layers[:k]:
        hidden = layer(hidden, attention_mask=causal, position_ids=positions, position_embeddings=rotary)
    return model.lm_head(inner.norm(hidden))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_early_exit_logits_are_the_first_layers_then_norm_and_head(k):
    model = deep_llama().double()
    ids = fresh_ids("llama-tiny", batch=2, seq_len=9)
    with torch.no_grad():
        got = early_exit_model(model, k)(ids, use_cache=False).logits
        want = by_hand(model, ids, k)
        full = model(ids, use_cache=False).logits
    assert got.dtype == torch.float64 and got.shape == (2, 9, 512)
    assert (got - want).abs().max().item() < 1e-10
    assert (got - full).abs().max().item() > 1e-3  # the exit really skips layers


def test_the_original_model_is_unchanged_and_shares_its_weights():
    model = deep_llama()
    ids = fresh_ids("llama-tiny", batch=1, seq_len=7)
    layers = list(model.model.layers)
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        truncated = early_exit_model(model, 2)
        truncated(ids, use_cache=False)
        after = model(ids, use_cache=False).logits
    assert len(model.model.layers) == 4 and all(a is b for a, b in zip(model.model.layers, layers))
    assert model.config.num_hidden_layers == 4 and model.model.config.num_hidden_layers == 4
    assert torch.equal(before, after)
    assert len(truncated.model.layers) == 2 and truncated.config.num_hidden_layers == 2
    assert truncated.model.config is truncated.config and truncated.config is not model.config
    assert truncated.model.layers[1] is model.model.layers[1]
    assert truncated.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert truncated.model.norm is model.model.norm and truncated.lm_head.weight is model.lm_head.weight


def test_per_layer_config_lists_are_cut_on_the_copy_only():
    model = zoo.build("qwen2-tiny", seed=0)  # its config lists a type per layer
    truncated = early_exit_model(model, 1)
    assert truncated.config.layer_types == ["full_attention"]
    assert model.config.layer_types == ["full_attention", "full_attention"]
    ids = fresh_ids("qwen2-tiny", seq_len=5)
    with torch.no_grad():
        assert truncated(ids, use_cache=False).logits.shape == (1, 5, 512)


@pytest.fixture(scope="module")
def two_layers():
    model = zoo.build("llama-tiny", seed=0)
    gm = compile_generation(model, "cpu", cache_len=CACHE_LEN, batch=1, prefill_chunk=8, draft_len=3, level=1)
    draft = compile_layerskip(model, "cpu", exit_layer=1, cache_len=CACHE_LEN, batch=1, prefill_chunk=8, level=1)
    return model, gm, draft


def test_the_draft_is_a_generation_model_of_the_first_layers(two_layers):
    _, _, draft = two_layers
    assert isinstance(draft, GenerationModel) and draft.draft_len == CATCH_UP - 1  # its catch-up entry
    assert set(draft.entries) == {"decode", "prefill", "verify"} and draft.prefill_chunk == 8
    assert len(draft.decode.inputs) == 2 + 2 * 1  # ids, positions, then one layer's k and v caches
    assert "first 1 of 2 layers" in draft.decode.source.name


def test_the_draft_catches_up_in_few_calls(two_layers):
    """After plain rounds the drafter feeds the tokens it missed: 20 of them in two calls (its catch-up
    entry, then the padded tail), where one-token calls took 20 whenever the prefill chunk did not fit."""
    from flashc.generate import Sampling
    from flashc.speculate import ModelDrafter

    _, _, draft = two_layers
    steps = draft.steps()
    sizes = []
    for size, call in list(steps.calls.items()):
        steps.calls[size] = lambda *a, _call=call, _size=size: sizes.append(_size) or _call(*a)
    drafter = ModelDrafter(steps, vocab_size=512)
    ids = fresh_ids("llama-tiny", batch=1, seq_len=26)
    drafter.propose(ids[:, :6], 1, Sampling())  # the prompt, then one draft
    sizes.clear()
    drafter.accepted(6, 0)
    drafter.propose(ids, 1, Sampling())  # 20 tokens later: catch up, then draft
    assert sizes == [CATCH_UP, 8], sizes


@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_with_an_early_exit_drafter_is_plain_greedy_two_layers(two_layers, adaptive):
    model, gm, draft = two_layers
    prompt = fresh_ids("llama-tiny", batch=1, seq_len=11)  # through the prefill chunk of 8 and a padded one
    got, stats = gm.generate(prompt, 20, speculate=draft, adaptive=adaptive, return_stats=True)
    assert torch.equal(got, greedy_reference(model, prompt, 20))
    if not adaptive:
        assert stats.speculative_rounds > 0 and 0 <= stats.acceptance_rate <= 1


@pytest.mark.parametrize("exit_layer", [1, 3])
def test_greedy_with_an_early_exit_drafter_is_plain_greedy_four_layers(deep, exit_layer):
    model, gm = deep
    draft = compile_layerskip(model, "cpu", exit_layer=exit_layer, cache_len=CACHE_LEN, batch=2, prefill_chunk=None,
                              level=1)
    assert len(draft.decode.inputs) == 2 + 2 * exit_layer
    for adaptive in (False, True):
        prompt = fresh_ids("llama-tiny", batch=2, seq_len=6)
        got, stats = gm.generate(prompt, 24, speculate=draft, adaptive=adaptive, return_stats=True)
        assert torch.equal(got, greedy_reference(model, prompt, 24)), (exit_layer, adaptive)
        assert stats.new_tokens == 24


def test_choose_exit_layer_measures_every_candidate():
    model = with_identity_layers(deep_llama(), 2)  # exits 2 and 3 compute the full model: every draft is kept
    prompts = [fresh_ids("llama-tiny", batch=2, seq_len=6) for _ in range(2)]
    choice = choose_exit_layer(model, "cpu", prompts, cache_len=CACHE_LEN, batch=2, max_new_tokens=16,
                               prefill_chunk=None, draft_len=4, progress=False, level=1)
    assert [r.exit_layer for r in choice.rows] == [1, 2, 3] and choice.num_layers == 4
    assert all(0.0 <= r.acceptance_rate <= 1.0 for r in choice.rows)
    by_exit = {r.exit_layer: r for r in choice.rows}
    assert by_exit[1].acceptance_rate < 1.0
    for exit_layer in (2, 3):  # 1 token from the prefill, then 3 rounds of 4 kept drafts + 1
        assert by_exit[exit_layer].acceptance_rate == 1.0 and by_exit[exit_layer].mean_accepted_length == 5.0
    fastest = min(choice.rows, key=lambda r: r.seconds_per_token)
    assert choice.exit_layer == fastest.exit_layer and choice.chosen is fastest
    assert choice.beats_plain == (fastest.seconds_per_token < choice.plain_seconds_per_token)
    assert all(r.seconds_per_token > 0 and r.compile_s > 0 for r in choice.rows)
    text = choice.render()
    assert "plain (4)" in text and f"{choice.exit_layer} *" in text and choice.verdict() in text
    assert ("no exit layer beats plain decoding" in text) != choice.beats_plain
    prompt = fresh_ids("llama-tiny", batch=2, seq_len=5)
    target = compile_generation(model, "cpu", cache_len=CACHE_LEN, batch=2, prefill_chunk=None, draft_len=4, level=1)
    got = target.generate(prompt, 10, speculate=choice.draft, adaptive=False)  # the chosen draft, kept compiled
    assert len(choice.draft.decode.inputs) == 2 + 2 * choice.exit_layer
    assert torch.equal(got, greedy_reference(model, prompt, 10))


def test_default_exits_spread_over_the_depth():
    assert default_exit_layers(2) == [1]
    assert default_exit_layers(4) == [1, 2, 3]
    assert default_exit_layers(32) == [8, 16, 24]


@pytest.mark.parametrize("exit_layer", [0, 4, 9, -1])
def test_exit_layers_outside_the_model_are_refused(exit_layer):
    model = deep_llama()
    with pytest.raises(InputError, match=r"exit_layer must be in 1\.\.3"):
        early_exit_model(model, exit_layer)
    with pytest.raises(InputError, match=r"exit_layer must be in 1\.\.3"):
        compile_layerskip(model, "cpu", exit_layer=exit_layer, cache_len=16)
    assert len(model.model.layers) == 4


def test_bad_candidates_and_options_are_refused_before_compiling(deep):
    model, gm = deep
    prompts = [fresh_ids("llama-tiny", batch=2, seq_len=4)]
    with pytest.raises(InputError, match=r"exit_layer must be in 1\.\.3.*got 4"):
        choose_exit_layer(model, "cpu", prompts, candidates=[2, 4], cache_len=CACHE_LEN, batch=2, target_gm=gm)
    with pytest.raises(InputError, match="batch 2"):
        choose_exit_layer(model, "cpu", [prompts[0][:1]], candidates=[2], cache_len=CACHE_LEN, batch=1, target_gm=gm)
    with pytest.raises(InputError, match="shorter than target_gm's KV cache"):
        choose_exit_layer(model, "cpu", prompts, candidates=[2], cache_len=16, batch=2, target_gm=gm)
    with pytest.raises(InputError, match="no verify entry"):
        choose_exit_layer(model, "cpu", prompts, candidates=[2], cache_len=CACHE_LEN, batch=2,
                          target_gm=GenerationModel({"decode": gm.decode}))
    with pytest.raises(InputError, match="takes no draft_len"):
        compile_layerskip(model, "cpu", exit_layer=2, cache_len=16, draft_len=4)


def test_models_without_the_early_exit_parts_are_refused():
    with pytest.raises(InputError, match=r"Linear has no model\.model"):
        early_exit_model(torch.nn.Linear(4, 4), 1)
    headless = deep_llama()
    del headless.lm_head
    with pytest.raises(InputError, match=r"no model\.lm_head"):
        early_exit_model(headless, 1)
    flat = deep_llama()  # a causal LM whose decoder keeps no layers list
    del flat.model.layers
    with pytest.raises(InputError, match=r"no model\.model\.layers"):
        compile_layerskip(flat, "cpu", exit_layer=1, cache_len=16)

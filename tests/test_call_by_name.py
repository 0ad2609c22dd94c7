"""Calling a compiled model as the model is called: inputs by name (`cm(**tokenizer(...))`), a
captured tensor keyword (an encoder-decoder's decoder_input_ids) checked and run, and clear
errors for names the graph does not take."""

import pytest
import torch

import flashc
from flashc import zoo
from flashc.errors import InputError
from flashc_testing import rel_err


@pytest.fixture(scope="module")
def llama_with_mask(tiny_models):
    model = tiny_models["llama-tiny"]
    ids = torch.randint(0, 512, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    cm = flashc.compile(model, "cpu", (ids,), example_kwargs={"attention_mask": mask, "use_cache": False})
    return model, cm


def test_inputs_by_name_equal_inputs_by_position_and_eager(llama_with_mask):
    model, cm = llama_with_mask
    assert [s.name for s in cm.inputs] == ["input_ids", "attention_mask"]
    ids = torch.randint(0, 512, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
    by_name = cm(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(by_name, cm(ids, mask).logits)
    assert torch.equal(by_name, cm(ids, attention_mask=mask).logits)
    assert torch.equal(by_name, cm(**{"input_ids": ids, "attention_mask": mask}).logits)
    assert rel_err(by_name[1, 3:], want[1, 3:]) < 1e-5 and rel_err(by_name[0], want[0]) < 1e-5


def test_a_mask_of_ones_is_accepted_by_a_model_compiled_without_one(tiny_models):
    model = tiny_models["llama-tiny"]
    ids = zoo.example_inputs("llama-tiny", seq_len=8)[0]
    cm = flashc.compile(model, "cpu", (ids,), example_kwargs={"use_cache": False})
    fresh = torch.randint(0, 512, ids.shape)
    ones = torch.ones(ids.shape, dtype=torch.long)
    assert torch.equal(cm(input_ids=fresh, attention_mask=ones).logits, cm(fresh).logits)
    masked = ones.clone()
    masked[0, 0] = 0
    with pytest.raises(InputError, match="compiled without an attention mask"):
        cm(input_ids=fresh, attention_mask=masked)


def test_names_the_graph_does_not_take_are_errors(llama_with_mask):
    _, cm = llama_with_mask
    ids, mask = torch.randint(0, 512, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(InputError, match="takes no input 'position_ids'; its inputs are input_ids, attention_mask"):
        cm(ids, attention_mask=mask, position_ids=mask)
    with pytest.raises(InputError, match="fixed at compile time"):
        cm(ids, attention_mask=mask, use_cache=True)
    with pytest.raises(InputError, match="given twice"):
        cm(ids, input_ids=ids, attention_mask=mask)
    with pytest.raises(InputError, match="missing input"):
        cm(input_ids=ids)


@pytest.mark.parametrize("target", ["cpu", "onnx-cpu", "tvm-cpu"])
def test_encoder_decoder_with_a_tensor_keyword_compiles_and_runs(target):
    """T5: decoder_input_ids given by name at capture become an input on every CPU target (tvm-cpu
    lowers its where(mask, x, finfo.min))."""
    from transformers import T5Config, T5Model

    if target == "tvm-cpu":
        pytest.importorskip("tvm")
    torch.manual_seed(0)
    model = T5Model(T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32, vocab_size=256)).eval()
    ids, dec = torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 4))
    # as a user writes it: flashc adds use_cache=False to the example kwargs (a cache object is no tensor output)
    cm = flashc.compile(model, target, (ids,), example_kwargs={"decoder_input_ids": dec})
    ids, dec = torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 4))
    with torch.no_grad():
        want = model(ids, decoder_input_ids=dec, use_cache=False).last_hidden_state
    assert rel_err(cm(ids, decoder_input_ids=dec).last_hidden_state, want) < 1e-5

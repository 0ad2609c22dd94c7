"""Typed compile options (flashc/options.py): a user's dict becomes the backend's dataclass;
unknown keys and wrong types are errors naming the field."""

import dataclasses

import pytest
import torch

import flashc
from flashc.backends.cuda import CudaOptions
from flashc.backends.onnx.backend import OnnxOptions
from flashc.errors import FlashcError
from flashc.options import NoOptions, parse_options


def test_a_dict_becomes_the_dataclass_and_defaults_fill_the_rest():
    opts = parse_options(OnnxOptions, {"opset": 20, "contrib_ops": False}, "onnx-cpu")
    assert opts == OnnxOptions(opset=20, contrib_ops=False)
    assert parse_options(OnnxOptions, None, "onnx-cpu") == OnnxOptions()
    given = CudaOptions(tune=False)
    assert parse_options(CudaOptions, given, "h100") is given


@pytest.mark.parametrize("given, message", [
    ({"opst": 20}, r"no option 'opst'; did you mean 'opset'\? Its options: providers, opset, contrib_ops, threads"),
    ({"opset": "20"}, r"option 'opset' of target 'onnx-cpu' takes int, got '20' \(str\)"),
    ({"opset": True}, r"option 'opset' .* takes int, got True"),
    ({"threads": 2.5}, r"option 'threads' .* takes int or None"),
    ({"contrib_ops": 1}, r"option 'contrib_ops' .* takes bool"),
    (CudaOptions(), r"target 'onnx-cpu' takes OnnxOptions, not CudaOptions"),
    ([("opset", 20)], r"must be a dict or OnnxOptions"),
])
def test_bad_options_name_the_field_and_what_it_takes(given, message):
    with pytest.raises(FlashcError, match=message):
        parse_options(OnnxOptions, given, "onnx-cpu")


def test_a_target_without_options_says_so():
    with pytest.raises(FlashcError, match=r"target 'cpu' has no option 'tune'.*Its options: none"):
        parse_options(NoOptions, {"tune": True}, "cpu")
    assert dataclasses.fields(NoOptions()) == ()


def test_compile_takes_the_dataclass_as_well_as_a_dict():
    model = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    cm = flashc.compile(model, "onnx-cpu", x, options=OnnxOptions(contrib_ops=False, threads=1))
    with torch.no_grad():
        assert torch.allclose(cm(x), model(x), atol=1e-6)

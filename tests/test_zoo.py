"""The zoo: every entry builds, real sizes on the meta device with the right parameter count."""

import pytest
import torch

from flashc import zoo
from flashc.errors import UnknownNameError

PARAMS = {"llama-3.2-1b": 1.236e9, "llama-3-8b": 8.03e9, "mistral-7b": 7.25e9, "mixtral-8x7b": 46.7e9,
          "gemma-2b": 2.506e9, "qwen2-7b": 7.6e9}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_real_size_shapes_on_meta(name):
    model = zoo.build(name, dtype=torch.bfloat16, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(PARAMS[name], rel=0.02)
    assert next(model.parameters()).device.type == "meta"


def test_unknown_name_suggests():
    with pytest.raises(UnknownNameError, match="did you mean 'mixtral-tiny'"):
        zoo.build("mixtrl-tiny")

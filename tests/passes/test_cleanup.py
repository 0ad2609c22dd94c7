"""Cleanup passes: each removes what it should and leaves the numbers alone."""

import torch
from flashc_testing import fresh_ids, rel_err

from flashc.capture import capture
from flashc.ir import op_name, propagate_shapes
from flashc.pass_manager import PassContext
from flashc.passes.cleanup import Canonicalize, EliminateCommonSubexpressions, EliminateDeadCode, FoldConstants
from flashc.profiles import PROFILES

CTX = PassContext(PROFILES["cpu"])


def _ops(program):
    return [op_name(n) for n in program.op_nodes()]


def test_canonicalize_removes_asserts_and_identity_casts(tiny_models):
    model = tiny_models["llama-tiny"]
    program = capture(model, (fresh_ids("llama-tiny"),), {"use_cache": False})
    assert "aten._assert_tensor_metadata" in _ops(program)
    before = _ops(program).count("aten.to")
    result = Canonicalize().run(program, CTX)
    program.recompile()
    assert "aten._assert_tensor_metadata" not in _ops(program)
    assert result.stats["identities_removed"] > 0 and _ops(program).count("aten.to") < before
    ids = fresh_ids("llama-tiny")
    with torch.no_grad():
        assert rel_err(program(ids).logits, model(ids, use_cache=False).logits) < 1e-6


def test_fold_constants_turns_mask_and_rope_into_weights(tiny_models):
    model = tiny_models["llama-tiny"]
    program = capture(model, (fresh_ids("llama-tiny"),), {"use_cache": False})
    Canonicalize().run(program, CTX)
    result = FoldConstants().run(program, CTX)
    program.recompile()
    ops = _ops(program)
    # the causal mask (arange/index/le...) and the rotary tables (cos/sin) are gone
    for gone in ("aten.arange", "aten.cos", "aten.sin", "aten.le", "aten.cumsum"):
        assert gone not in ops
    assert result.stats["constants_folded"] >= 3
    ids = fresh_ids("llama-tiny")
    with torch.no_grad():
        assert rel_err(program(ids).logits, model(ids, use_cache=False).logits) < 1e-6


class _Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        a = torch.relu(x @ self.w)
        b = torch.relu(x @ self.w)  # same computation again
        unused = torch.sigmoid(x)  # noqa: F841 (dead)
        return a + b


def test_cse_and_dce():
    m = _Twice()
    x = torch.randn(4, 8)
    program = capture(m, (x,))
    propagate_shapes(program)
    n_relu = _ops(program).count("aten.relu")
    assert n_relu == 2
    cse = EliminateCommonSubexpressions().run(program, CTX)
    dce = EliminateDeadCode().run(program, CTX)
    program.recompile()
    assert _ops(program).count("aten.relu") == 1 and cse.stats["nodes_merged"] >= 2
    assert "aten.sigmoid" not in _ops(program)
    x2 = torch.randn(4, 8)
    assert torch.allclose(program(x2), m(x2), atol=1e-6)

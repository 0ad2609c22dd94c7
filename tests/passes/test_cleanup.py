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


# --- in-place writes and aliasing (none of these may be folded, merged or dropped) -----------

import pytest  # noqa: E402
from flashc_testing import assert_matches_eager  # noqa: E402


class KvCacheInBuffer(torch.nn.Module):
    """A hand-written KV cache: a non-persistent buffer written at a position input."""

    def __init__(self):
        super().__init__()
        self.register_buffer("k", torch.zeros(1, 6, 8), persistent=False)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, pos):
        self.k[:, pos] = self.proj(x)
        return (self.k * 2).sum(1)


class ReadBeforeUpdate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("acc", torch.zeros(4))

    def forward(self, x):
        y = self.acc * 1.0 + x
        self.acc.add_(x)
        return y


class ScratchTensors(torch.nn.Module):
    def forward(self, x):
        t = torch.zeros(4, 4)
        t[0] = x
        t[1] += x
        u = torch.zeros(4, 4)  # equal to t as a constant: must not be merged with it
        u[2] = 2 * x
        return t + u


class ArangeWritten(torch.nn.Module):
    def forward(self, x):
        pos = torch.arange(4)
        pos += 1
        return x[pos]


class ReadsAroundViewWrite(torch.nn.Module):
    def forward(self, x):
        h = x * 2
        a = h.sum(-1)
        h[:, 0] = 0
        return a - h.sum(-1)


class SignedZerosAndBools(torch.nn.Module):
    def forward(self, x):
        z = x * 0
        return 1 / (z + 0.0), 1 / (z - 0.0), 1 / (z + -0.0), (x > 0) + True, (x > 0) + 1


class CopiesWrittenLater(torch.nn.Module):
    def forward(self, x):
        a = x.clone()
        a[0] = 5
        b = x.contiguous()
        b.add_(1)
        c = x.to(torch.float32, copy=True)
        c.mul_(3)
        d = x * 1
        d[1] = -1
        e = x + 0
        e.zero_()
        return a + b + c + d + e


class ReturnsState(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("buf", torch.zeros(3))

    def forward(self, x):
        self.buf.copy_(x)
        return self.buf, torch.ones(3), x.clone()


CASES = {
    "kv_cache_in_buffer": (KvCacheInBuffer, lambda: (torch.randn(1, 1, 8), torch.randint(0, 6, (1,)))),
    "read_before_update": (ReadBeforeUpdate, lambda: (torch.randn(4),)),
    "scratch_tensors": (ScratchTensors, lambda: (torch.randn(4),)),
    "arange_written": (ArangeWritten, lambda: (torch.randn(6),)),
    "reads_around_view_write": (ReadsAroundViewWrite, lambda: (torch.randn(3, 4),)),
    "signed_zeros_and_bools": (SignedZerosAndBools, lambda: (torch.randn(5),)),
    "copies_written_later": (CopiesWrittenLater, lambda: (torch.randn(3),)),
    "returns_state": (ReturnsState, lambda: (torch.randn(3),)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cleanup_keeps_in_place_semantics(case):
    cls, make_inputs = CASES[case]
    torch.manual_seed(0)
    assert_matches_eager(cls(), make_inputs, levels=(1, 3))


def test_kv_cache_buffer_is_state_carried_across_calls():
    import flashc

    model = KvCacheInBuffer()
    cm = flashc.compile(model, "cpu", (torch.randn(1, 1, 8), torch.tensor([0])), level=3)
    xs = [torch.randn(1, 1, 8) for _ in range(3)]
    for i, x in enumerate(xs):
        out = cm(x, torch.tensor([i]))
    with torch.no_grad():
        want = sum(2 * model.proj(x)[0, 0] for x in xs)
    assert torch.allclose(out[0], want, atol=1e-5)
    assert torch.equal(model.k, torch.zeros(1, 6, 8))  # the module's own buffer is not the compiled state


def test_canonicalize_turns_one_element_contractions_into_multiplies():
    """Hugging Face's rotary spelling `inv_freq[None, :, None] @ positions[:, None, :]` (a matmul contracting
    over one element) becomes the broadcasting multiply it is; matmuls over more elements stay."""

    class Outer(torch.nn.Module):
        def forward(self, f, p, x, w):
            return (f[None, :, None] @ p[:, None, :].float()).transpose(1, 2), x @ w

    g = torch.Generator().manual_seed(7)
    args = (torch.rand(32, generator=g), torch.randint(0, 512, (2, 6), generator=g),
            torch.randn(3, 5, generator=g), torch.randn(5, 4, generator=g))
    program = capture(Outer(), args)
    assert _ops(program).count("aten.matmul") == 2
    result = Canonicalize().run(program, CTX)
    program.recompile()
    assert result.stats["outer_products_to_multiply"] == 1 and _ops(program).count("aten.matmul") == 1
    fresh = (torch.rand(32, generator=g), torch.randint(0, 512, (2, 6), generator=g),
             torch.randn(3, 5, generator=g), torch.randn(5, 4, generator=g))
    outer, mm = program(*fresh)
    f, p, x, w = fresh
    want = (f.double()[None, :, None] * p.double()[:, None, :]).transpose(1, 2)
    assert outer.shape == want.shape and rel_err(outer, want) < 1e-7
    assert rel_err(mm, x.double() @ w.double()) < 1e-6

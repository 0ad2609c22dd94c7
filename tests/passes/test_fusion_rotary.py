"""Rope in the forms people write fuses into flashc.rotary / flashc.rotary_interleaved, and
look-alikes do not (issue #13).

Each form is a small module written as a model writes it: interleaved pairs by stack and
flatten (a hand-written Llama, with one angle per pair or GPT-J's repeated tables), Meta's
complex numbers, partial rotary, and x as [B, H, S, D] or [B, S, H, D]. At -O2 and -O3 on the
CPU it becomes one op per rope and keeps eager's numbers on fresh random inputs; -O1 fuses
nothing and keeps them too. A near miss stays unfused, keeps eager's numbers, and says why.
"""

from collections import Counter

import pytest
import torch
import torch.nn as nn

import flashc
from flashc.capture import capture
from flashc.ir import op_name
from flashc.pass_manager import PassContext
from flashc.pipelines import pipeline
from flashc.profiles import PROFILES
from flashc.rewrite import why_not

B, H, S, D = 2, 3, 5, 8


def _compile(model, make_inputs, level=2, tol=1e-6):
    """flashc.compile for the CPU at `level`; two calls on fresh inputs match eager. Returns the op counts."""
    cm = flashc.compile(model, "cpu", make_inputs(), level=level)
    for _ in range(2):
        args = make_inputs()
        with torch.no_grad():
            want = model(*args)
        got = cm(*args)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    return Counter(op_name(n) for n in cm.program.op_nodes())


def _angles(positions=S, pairs=D // 2):
    inv = 1.0 / (10000 ** (torch.arange(pairs, dtype=torch.float32) * 2 / (2 * pairs)))
    return torch.outer(torch.arange(positions, dtype=torch.float32), inv)  # [S, D/2]


def _half_tables(shape=(S, D // 2)):
    """Random angles (not a model's: each entry differs), as tables of one angle per pair."""
    a = torch.rand(*shape) * 6
    return a.cos(), a.sin()


# --- The forms ---------------------------------------------------------------------------------

class StackRope(nn.Module):
    """A hand-written Llama's rope (bench/handwritten_decode.py): pairs (2i, 2i + 1) rotated by
    cos/sin [..., D/2], stacked and flattened back; `spelling` picks how the pairs go back."""

    def __init__(self, spelling="flatten(-2)", layout="bhsd"):
        super().__init__()
        self.spelling, self.layout = spelling, layout

    def forward(self, x, cos, sin):
        if self.layout == "bshd":  # rope before the heads move forward, as Meta's code
            x = x.view(x.shape[0], x.shape[1], H, D)
        x1, x2 = x[..., ::2], x[..., 1::2]
        dim = 4 if self.spelling == "stack(dim=4)" else -1
        stacked = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=dim)
        out = {"flatten(-2)": lambda: stacked.flatten(-2), "stack(dim=4)": lambda: stacked.flatten(3),
               "flatten(3, 4)": lambda: stacked.flatten(3, 4), "reshape": lambda: stacked.reshape(x.shape),
               "view": lambda: stacked.view(*x.shape[:-1], D)}[self.spelling]()
        if self.layout == "bshd":  # a view of the result: it must be as contiguous as eager's
            return out.view(out.shape[0], out.shape[1], H * D)
        return out


class GptJRope(nn.Module):
    """Hugging Face's GPT-J: rotate_every_two, x [B, S, H, D], tables [B, S, D/2] repeated
    pairwise by repeat_interleave inside the model."""

    def forward(self, x, cos, sin):
        cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
        sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
        x1, x2 = x[:, :, :, ::2], x[:, :, :, 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return (x * cos) + (rotated * sin)


class MetaRope(nn.Module):
    """Meta's Llama reference: complex freqs_cis [max_len, D/2] in a buffer, x [B, S, H, D]
    as complex pairs in float32, the result cast back by type_as."""

    def __init__(self, start=0):
        super().__init__()
        self.start = start
        self.register_buffer("freqs_cis", torch.polar(torch.ones(16, D // 2), _angles(16)), persistent=False)

    def forward(self, x):
        freqs = self.freqs_cis[self.start:self.start + x.shape[1]]
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        freqs = freqs.view(1, xc.shape[1], 1, xc.shape[-1])  # reshape_for_broadcast
        return torch.view_as_real(xc * freqs).flatten(3).type_as(x)


class PartialRope(nn.Module):
    """Rope on the first R channels of each head, the rest passed on (Phi, GPT-NeoX, GPT-J's
    rotary_dim), rotate-half or interleaved."""

    R = 4

    def __init__(self, interleaved):
        super().__init__()
        self.interleaved = interleaved

    def forward(self, x, cos, sin):
        rot, keep = x[..., :self.R], x[..., self.R:]
        if self.interleaved:
            x1, x2 = rot[..., ::2], rot[..., 1::2]
            rot = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)
        else:
            half = self.R // 2
            rot = rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), -1) * sin
        return torch.cat((rot, keep), dim=-1)


def _bhsd(table_shape=(S, D // 2), dtype=torch.float32):
    def make():
        cos, sin = _half_tables(table_shape)
        return torch.randn(B, H, S, D, dtype=dtype), cos.to(dtype), sin.to(dtype)
    return make


def _bshd_flat():
    return lambda: (torch.randn(B, S, H * D), *_half_tables((1, S, 1, D // 2)))


FORMS = {
    "stack, tables [S, D/2]": (StackRope(), _bhsd()),
    "stack, tables [B, 1, S, D/2]": (StackRope(), _bhsd((B, 1, S, D // 2))),
    "stack, one position broadcast": (StackRope(), _bhsd((1, D // 2))),
    "stack(dim=4).flatten(3)": (StackRope("stack(dim=4)"), _bhsd()),
    "flatten(3, 4)": (StackRope("flatten(3, 4)"), _bhsd()),
    "reshape(x.shape)": (StackRope("reshape"), _bhsd()),
    "view": (StackRope("view"), _bhsd()),
    "stack, [B, S, H, D]": (StackRope(layout="bshd"), _bshd_flat()),
    "gpt-j, [B, S, H, D]": (GptJRope(), lambda: (torch.randn(B, S, H, D), *_half_tables((B, S, D // 2)))),
    "meta complex, [B, S, H, D]": (MetaRope(), lambda: (torch.randn(B, S, H, D),)),
    "meta complex, offset": (MetaRope(start=3), lambda: (torch.randn(B, S, H, D),)),
}


@pytest.mark.parametrize("level", [1, 2, 3])
@pytest.mark.parametrize("form", FORMS)
def test_interleaved_forms_fuse_and_keep_eagers_numbers(form, level):
    model, make = FORMS[form]
    ops = _compile(model, make, level)
    fused = 0 if level == 1 else 1
    assert ops["flashc.rotary_interleaved"] == fused and ops["flashc.rotary"] == 0
    assert (ops["aten.stack"] + ops["aten.view_as_complex"] == 0) == bool(fused)


def test_meta_rope_in_bfloat16_keeps_the_float32_casts():
    """x.float() ... .type_as(x) stay around the op: it computes in float32 as the model did."""
    ops = _compile(MetaRope(), lambda: (torch.randn(B, S, H, D, dtype=torch.bfloat16),), tol=0)
    assert ops["flashc.rotary_interleaved"] == 1 and ops["aten.to"] == 1 and ops["aten.type_as"] == 1


def test_stack_rope_in_bfloat16_rounds_as_eager():
    """The op computes x * cos + rotate_pairs(x) * sin in x's dtype, the same products and sums."""
    ops = _compile(StackRope(), _bhsd(dtype=torch.bfloat16), tol=0)
    assert ops["flashc.rotary_interleaved"] == 1


def test_complex_tables_become_real_constants():
    """Meta's freqs_cis (a constant) is split into cos and sin tables in the pairs' order and folded."""
    cm = flashc.compile(MetaRope(), "cpu", (torch.randn(B, S, H, D),), level=2)
    (node,) = [n for n in cm.program.op_nodes() if op_name(n) == "flashc.rotary_interleaved"]
    cos, sin = (cm.program.params[a.name] for a in node.args[1:])
    angles = _angles(16)[:S].repeat_interleave(2, dim=-1)
    assert cos.shape == (1, S, D) and not cos.is_complex()
    torch.testing.assert_close(cos[0], angles.cos())
    torch.testing.assert_close(sin[0], angles.sin())


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_partial_rotary_fuses_on_the_slice(interleaved, level):
    width = PartialRope.R // 2 if interleaved else PartialRope.R
    make = lambda: (torch.randn(B, H, S, D), *_half_tables((B, 1, S, width)))  # noqa: E731
    ops = _compile(PartialRope(interleaved), make, level)
    op = "flashc.rotary_interleaved" if interleaved else "flashc.rotary"
    assert ops[op] == (0 if level == 1 else 1) and ops["aten.cat"] == (1 if level > 1 else 1 + (not interleaved))


def test_rotate_half_with_x_as_bshd_fuses_transposed():
    """Hugging Face's apply_rotary_pos_emb with unsqueeze_dim=2 (x [B, S, H, D], cos [B, S, 1, D])."""
    class Rope(nn.Module):
        def forward(self, x, cos, sin):
            half = x.shape[-1] // 2
            return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    make = lambda: (torch.randn(B, S, H, D), torch.randn(B, S, 1, D), torch.randn(B, S, 1, D))  # noqa: E731
    ops = _compile(Rope(), make)
    assert ops["flashc.rotary"] == 1 and ops["aten.transpose"] == 2


# --- Look-alikes --------------------------------------------------------------------------------

class NearMiss(nn.Module):
    """Interleaved rope with one thing changed."""

    def __init__(self, miss):
        super().__init__()
        self.miss = miss

    def forward(self, x, cos, sin):
        miss = self.miss
        x1, x2 = x[..., ::2], x[..., 1::2]
        if miss == "swapped halves":
            x1, x2 = x2, x1
        if miss == "step 1":
            x1, x2 = x[..., :D // 2], x[..., D // 2:]
        if miss == "wrong sign":
            return torch.stack((x1 * cos + x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)
        if miss == "cos twice":
            return torch.stack((x1 * cos - x2 * sin, x1 * cos + x2 * sin), -1).flatten(-2)
        if miss == "stacked along dim 3":
            return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), 3).flatten(-2)
        if miss == "gpt-j negates the even channel":
            rotated = torch.stack((-x1, x2), -1).flatten(-2)
            return x * cos.repeat_interleave(2, -1) + rotated * sin.repeat_interleave(2, -1)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


X1 = "x1 (times cos, first in the stack)"
MISSES = {
    "swapped halves": f"{X1} is x[..., 1::2]; rope on interleaved pairs takes x[..., 0::2]",
    "step 1": f"{X1} is x[..., 0:4]; rope on interleaved pairs takes x[..., 0::2]",
    "wrong sign": None,
    "cos twice": None,
    "stacked along dim 3": "the rotated pairs are stacked along dim 3, not the last",
    "gpt-j negates the even channel": "the negated element is x[..., 0::2]; rope on interleaved pairs takes "
                                      "x[..., 1::2]",
    "tables per head": "vary along both dims 1 and 2 of x",
}


def _miss_inputs(miss):
    shape = (1, H, S, D // 2) if miss == "tables per head" else (S, D // 2)
    return lambda: (torch.randn(B, H, S, D), *_half_tables(shape))


@pytest.mark.parametrize("miss", MISSES)
def test_look_alikes_are_not_fused_and_say_why(miss):
    model = NearMiss(miss)
    ops = _compile(model, _miss_inputs(miss), level=3)
    assert ops["flashc.rotary_interleaved"] == 0 and ops["flashc.rotary"] == 0
    report = why_not(capture(model, _miss_inputs(miss)()), pipeline(2), PassContext(PROFILES["cpu"]), "rotary")
    assert report.fused == 0
    if MISSES[miss] is not None:  # a different computation altogether: no candidate gets to the check
        assert any(MISSES[miss] in c.reason for c in report.candidates), str(report)


def test_tables_of_two_dtypes_are_not_fused():
    """cos in x's bfloat16 and sin in float32: the form's result is float32, the op's would take cos's dtype."""
    def make():
        return torch.randn(B, H, S, D, dtype=torch.bfloat16), torch.randn(S, D // 2, dtype=torch.bfloat16), \
            torch.randn(S, D // 2)
    ops = _compile(StackRope(), make, level=3, tol=0)
    assert ops["flashc.rotary_interleaved"] == 0
    report = why_not(capture(StackRope(), make()), pipeline(2), PassContext(PROFILES["cpu"]), "rotary")
    assert any("cos is torch.bfloat16 and sin torch.float32" in c.reason for c in report.candidates), str(report)


def test_why_not_reports_the_interleaved_fusion():
    report = why_not(capture(StackRope(), _bhsd()()), pipeline(2), PassContext(PROFILES["cpu"]), "flashc.rotary")
    assert report.fused == 1 and len(report.candidates) == 1


def test_a_saved_artifact_with_the_interleaved_op_loads_and_runs(tmp_path):
    model, make = FORMS["meta complex, [B, S, H, D]"]
    cm = flashc.compile(model, "cpu", make(), level=3)
    loaded = flashc.load(cm.save(tmp_path / "rope"))
    assert [op_name(n) for n in loaded.program.op_nodes()].count("flashc.rotary_interleaved") == 1
    (x,) = make()
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-6, atol=1e-6)

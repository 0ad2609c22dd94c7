"""Fusions say why they did not happen: `flashc.rewrite.why_not` over the -O2 pipeline.

Each near miss is a small module written as people write it; the reason names what
differs. Where a fusion happens, the explaining run fuses exactly what compile fuses.
"""

import pytest
import torch
import torch.nn.functional as F
from flashc_testing import fresh_ids

from flashc.capture import capture
from flashc.errors import UnknownNameError
from flashc.ops import decode_mask
from flashc.pass_manager import PassContext, PassManager
from flashc.pipelines import pipeline
from flashc.profiles import PROFILES
from flashc.rewrite import explained_names, why_not

CTX = PassContext(PROFILES["cpu"])


def _why_not(model, args, name, level=2):
    return why_not(capture(model, args), pipeline(level), CTX, name)


class Rope(torch.nn.Module):
    """Rotate-half rope, or (negate_first) a look-alike that negates the first half."""

    def __init__(self, negate_first=False):
        super().__init__()
        self.negate_first = negate_first

    def forward(self, x, cos, sin):
        h = x.shape[-1] // 2
        if self.negate_first:
            rotated = torch.cat((-x[..., :h], x[..., h:]), -1)
        else:
            rotated = torch.cat((-x[..., h:], x[..., :h]), -1)
        return x * cos + rotated * sin


def _rope_inputs():
    return torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)


def test_rope_that_negates_the_wrong_half_reports_the_rope_check():
    report = _why_not(Rope(negate_first=True), _rope_inputs(), "rotary")
    assert report.fused == 0 and len(report.candidates) == 1
    (c,) = report.candidates
    assert c.node.target == torch.ops.aten.add.Tensor and not c.fused
    assert c.reason == ("check failed: the negated half is x[..., 0:4]; rotate-half negates the second half, "
                        "x[..., 4:8]")
    assert "test_why_not.py:" in str(report)  # the model's own source line


def test_rope_reports_it_fused():
    report = _why_not(Rope(), _rope_inputs(), "flashc.rotary")
    assert report.name == "rotary" and report.pass_name == "fuse"
    assert report.fused == 1 and [c.fused for c in report.candidates] == [True]


class WriteBetween(torch.nn.Module):
    """Attention written out, with the value cache written between the scores and their use."""

    def __init__(self):
        super().__init__()
        self.register_buffer("v_cache", torch.zeros(1, 2, 6, 8))

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1)
        self.v_cache.copy_(v)
        return p @ self.v_cache


def test_attention_with_a_write_between_reports_the_write():
    args = tuple(torch.randn(1, 2, 6, 8) for _ in range(3))
    report = _why_not(WriteBetween(), args, "attention")
    assert report.fused == 0
    last = report.candidates[-1]  # p @ v_cache: the end of the written-out attention
    assert last.pattern == "attention_unmasked_pattern"
    assert last.reason.startswith("an in-place write to b_v_cache (node copy_ (test_why_not.py:")
    assert last.reason.endswith("aten.copy_) lies between the matched nodes transpose and matmul_1")


class GeluMlp(torch.nn.Module):
    def forward(self, gate, up):
        return F.gelu(gate) * up


def test_other_op_in_the_pattern_names_both_ops():
    report = _why_not(GeluMlp(), (torch.randn(3, 8), torch.randn(3, 8)), "swiglu")
    (c,) = report.candidates
    assert not c.fused and c.reason.startswith("node gelu (")
    assert c.reason.endswith("pattern expects aten.silu here, found aten.gelu")


class CacheAttention(torch.nn.Module):
    def __init__(self, mask_fn):
        super().__init__()
        self.mask_fn = mask_fn

    def forward(self, q, k, v, pos):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask_fn(pos, k.shape[2]), scale=0.3)


def test_decode_attention_reports_a_mask_that_is_not_the_decode_mask():
    args = (torch.randn(1, 2, 1, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8), torch.tensor([7]))
    report = _why_not(CacheAttention(lambda p, n: decode_mask(p, n)[None, None]), args, "decode_attention")
    assert report.fused == 1 and len(report.candidates) == 1
    off_by_one = CacheAttention(lambda p, n: (torch.arange(n) < (p + 2)[:, None])[None, None])
    (c,) = _why_not(off_by_one, args, "decode_attention").candidates
    assert not c.fused and "differs from the decode mask at positions" in c.reason
    assert "key j is visible to the query at position p iff j <= p (True where visible)" in c.reason


@pytest.mark.parametrize("family", ["llama-tiny", "mixtral-tiny"])
def test_explaining_fuses_what_compile_fuses(tiny_models, family):
    model = tiny_models[family]
    captured = capture(model, (fresh_ids(family),), {"use_cache": False})
    compiled = captured.clone()
    fused: dict[str, int] = {}
    for record in PassManager(pipeline(2)).run(compiled, CTX):
        for name, n in record.stats.items():
            fused[name] = fused.get(name, 0) + n
    names = explained_names(pipeline(2))
    assert {"rms_norm", "rotary", "attention", "moe", "decode_attention"} <= set(names)
    for name in names:
        report = why_not(captured.clone(), pipeline(2), CTX, name)
        assert report.fused == fused.get(name, 0), name
        assert all(c.fused or c.reason for c in report.candidates)
    assert fused["rotary"] == 4 and fused["attention"] == 2 and fused.get("moe", 0) == (2 if family == "mixtral-tiny"
                                                                                        else 0)


def test_unknown_fusion_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown fusion 'rotery'; did you mean 'rotary'.*Known fusions: "
                                               "add_rms_norm, attention, decode_attention, geglu"):
        why_not(capture(Rope(), _rope_inputs()), pipeline(2), CTX, "rotery")
    with pytest.raises(UnknownNameError, match="fusions run at -O2 and -O3"):
        why_not(capture(Rope(), _rope_inputs()), pipeline(1), CTX, "rotary")

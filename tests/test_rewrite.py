"""The pattern matcher: commutative operands, scalar binding, self-containment."""

import torch
import torch.nn.functional as F

from flashc.capture import capture
from flashc.ir import op_name, propagate_shapes
from flashc.passes.fusion import FUSE_RMS_NORM, FUSE_SWIGLU
from flashc.rewrite import Match, NoMatch, RewriteRule, apply_rule, explain_matches, find_matches


class _Norm(torch.nn.Module):
    def __init__(self, eps, weight_first=True, leak=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))
        self.eps, self.weight_first, self.leak = eps, weight_first, leak

    def forward(self, x):
        h = x.float()
        var = h.pow(2).mean(-1, keepdim=True)
        n = h * torch.rsqrt(var + self.eps)
        out = self.w * n if self.weight_first else n * self.w
        return (out, var) if self.leak else out


def _program(m, x):
    p = capture(m, (x,))
    propagate_shapes(p)
    return p


def test_rms_norm_binds_eps_and_either_operand_order():
    for weight_first in (True, False):
        m = _Norm(3e-5, weight_first)
        p = _program(m, torch.randn(2, 3, 8))
        matches = find_matches(FUSE_RMS_NORM, p.graph)
        assert len(matches) == 1 and matches[0].bindings["eps"] == 3e-5
        apply_rule(FUSE_RMS_NORM, p.graph)
        p.recompile()
        x = torch.randn(2, 3, 8)
        assert torch.allclose(p(x), m(x), atol=1e-6)


def test_no_match_when_an_interior_value_escapes():
    m = _Norm(1e-6, leak=True)  # the variance is also an output: fusing would lose it
    p = _program(m, torch.randn(2, 3, 8))
    assert find_matches(FUSE_RMS_NORM, p.graph) == []


class _Mlp(torch.nn.Module):
    def forward(self, g, u):
        return u * F.silu(g) + F.silu(u) * g


def test_swiglu_matches_both_orders_without_overlap():
    p2 = capture(_Mlp(), (torch.randn(3, 5), torch.randn(3, 5)))
    propagate_shapes(p2)
    n = apply_rule(FUSE_SWIGLU, p2.graph)
    p2.recompile()
    assert n == 2
    assert sum(op_name(x) == "flashc.swiglu" for x in p2.op_nodes()) == 2
    g, u = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.allclose(p2(g, u), _Mlp()(g, u), atol=1e-6)


def _clamped_pattern(x):
    y = x * 2
    y.clamp_(max=1.0)  # in place: the output does not reach this node through its args
    return torch.relu(y)


def _clamped_replacement(x):
    return torch.ops.aten.relu.default(torch.ops.aten.clamp.default(torch.ops.aten.mul.Tensor(x, 2), None, 1.0))


class _Clamped(torch.nn.Module):
    def forward(self, x):
        return _clamped_pattern(x) + 3


def test_in_place_ops_inside_a_pattern_are_matched_and_removed():
    from flashc.rewrite import RewriteRule

    rule = RewriteRule("clamped", _clamped_pattern, _clamped_replacement,
                       example_inputs=lambda dt: (torch.randn(4, 3, dtype=dt),), dtypes=(torch.float32,))
    p = capture(_Clamped(), (torch.randn(4, 3),))
    propagate_shapes(p)
    assert any(op_name(n) == "aten.clamp_" for n in p.op_nodes())
    assert apply_rule(rule, p.graph) == 1
    p.recompile()
    assert not any(op_name(n) == "aten.clamp_" for n in p.op_nodes())
    x = torch.randn(4, 3)
    assert torch.allclose(p(x), _Clamped()(x))


# --- explaining: why a candidate did not match -------------------------------------------------

def test_explaining_finds_the_same_matches():
    p = _program(_Norm(3e-5), torch.randn(2, 3, 8))
    found = find_matches(FUSE_RMS_NORM, p.graph)
    explained = [o for o in explain_matches(FUSE_RMS_NORM, p.graph) if isinstance(o, Match)]
    assert len(found) == 1 and [m.nodes for m in explained] == [m.nodes for m in found]
    assert explained[0].bindings["eps"] == found[0].bindings["eps"] == 3e-5


def test_an_escaping_intermediate_is_the_reason():
    p = _program(_Norm(1e-6, leak=True), torch.randn(2, 3, 8))
    outcomes = explain_matches(FUSE_RMS_NORM, p.graph)
    assert not any(isinstance(o, Match) for o in outcomes)
    reasons = [o.reason for o in outcomes if "outside the match" in o.reason]
    assert len(reasons) == 1
    assert reasons == ["the pattern's intermediate mean (aten.mean) is also read outside the match, by the "
                       "model's outputs"]


def _doubled_pattern(x):
    return x * 2


def _doubled_replacement(x):
    return torch.ops.aten.add.Tensor(x, x)


class _Doubled(torch.nn.Module):
    def forward(self, x):
        return x * 2


def _refuses_with_a_reason(m):
    return f"x has {m.val('x').dim()} dims"


def _refuses(m):
    return False


def test_a_check_says_why_it_refuses():
    p = _program(_Doubled(), torch.randn(4, 3))
    for check, reason in ((_refuses_with_a_reason, "check failed: x has 2 dims"),
                          (_refuses, "check failed (_refuses)"),
                          (lambda m: False, "check of rule doubled failed")):
        rule = RewriteRule("doubled", _doubled_pattern, _doubled_replacement, check=check,
                           example_inputs=lambda dt: (torch.randn(4, 3, dtype=dt),), dtypes=(torch.float32,))
        assert find_matches(rule, p.graph) == []  # a reason is a refusal, though a non-empty string is truthy
        (outcome,) = explain_matches(rule, p.graph)
        assert isinstance(outcome, NoMatch) and outcome.node.name == "mul" and outcome.reason == reason
    accepting = RewriteRule("doubled", _doubled_pattern, _doubled_replacement, check=lambda m: True,
                            example_inputs=lambda dt: (torch.randn(4, 3, dtype=dt),), dtypes=(torch.float32,))
    assert apply_rule(accepting, p.graph) == 1
    p.recompile()
    x = torch.randn(4, 3)
    assert torch.equal(p(x), x * 2)

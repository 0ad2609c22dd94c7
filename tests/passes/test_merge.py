"""Projection merging: linears sharing an input become one matmul, never across a write."""

import torch
from flashc_testing import assert_matches_eager

import flashc


class TwoProjections(torch.nn.Module):
    def __init__(self, write_between: bool):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 4)
        self.write_between = write_between

    def forward(self, x):
        h = x * 2
        y1 = self.a(h)
        if self.write_between:
            h[:, 0] = 7
        return y1.sum(-1) + self.b(h).sum(-1)


def _merged(cm) -> int:
    return sum(sum(r.stats.values()) for r in cm.records if r.name == "merge_projections")


def test_projections_of_one_input_merge():
    model = TwoProjections(write_between=False)
    cm = flashc.compile(model, "cpu", (torch.randn(2, 8),), level=3)
    assert _merged(cm) == 1
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert torch.allclose(cm(x), model(x), atol=1e-5)


def test_no_merge_across_a_write_to_the_input():
    model = TwoProjections(write_between=True)
    cm = flashc.compile(model, "cpu", (torch.randn(2, 8),), level=3)
    assert _merged(cm) == 0
    assert_matches_eager(model, lambda: (torch.randn(2, 8),), levels=(3,))


class MixedBiases(torch.nn.Module):
    """An SSM layer's shape: q, k, v without a bias and a dt projection with one, all of one input."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(8, n, bias=False) for n in (8, 4, 4))
        self.dt = torch.nn.Linear(8, 2)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x), self.dt(x)], -1)


def test_linears_with_and_without_bias_merge_apart():
    model = MixedBiases()
    cm = flashc.compile(model, "cpu", (torch.randn(3, 8),), level=3)
    linears = [n for n in cm.program.op_nodes() if n.target == torch.ops.aten.linear.default]
    assert _merged(cm) == 1 and len(linears) == 2  # q|k|v one matmul, dt its own
    assert sorted(len(n.args) > 2 and n.args[2] is not None for n in linears) == [False, True]
    assert_matches_eager(model, lambda: (torch.randn(3, 8),), levels=(3,))

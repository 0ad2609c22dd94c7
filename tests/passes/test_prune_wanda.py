"""Wanda: |W| * ||x_j|| compared within each output row, against a direct implementation."""

import pytest
import torch

from flashc.passes.prune.masks import pruned_count
from flashc.passes.prune.wanda import column_norms, wanda_mask


def direct_wanda(w: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The paper's listing: metric = |W| * ||X||_2 per column, sort each row, prune the lowest."""
    metric = w.abs() * x.norm(p=2, dim=0).reshape(1, -1)
    keep = torch.ones_like(w, dtype=torch.bool)
    order = metric.sort(dim=-1, stable=True).indices
    keep.scatter_(1, order[:, : int(w.shape[1] * sparsity + 1e-9)], False)
    return keep


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_wanda_matches_the_paper_listing(sparsity):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=g, dtype=torch.float64)
    x = torch.randn(500, 64, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, 64, dtype=torch.float64)
    hessian = x.t() @ x / x.shape[0]
    mask = wanda_mask(w, column_norms(hessian), sparsity)
    assert torch.equal(mask, direct_wanda(w, x, sparsity))
    assert (mask.sum(1) == 64 - pruned_count(sparsity, 64)).all()  # every row loses the same count


def test_wanda_keeps_weights_on_large_activations_that_magnitude_would_drop():
    w = torch.ones(4, 8) * torch.tensor([1.0, 1, 1, 1, 0.2, 0.2, 0.2, 0.2])
    norms = torch.tensor([1.0, 1, 1, 1, 100, 100, 100, 100])
    mask = wanda_mask(w, norms, 0.5)
    assert mask[:, 4:].all() and not mask[:, :4].any()


def test_wanda_two_four_per_group():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 32, generator=g)
    norms = torch.rand(32, generator=g) + 0.1
    mask = wanda_mask(w, norms, 0.0, (2, 4))
    assert (mask.reshape(16, 8, 4).sum(-1) == 2).all()
    scores = (w.abs() * norms).reshape(16, 8, 4)
    kept = torch.where(mask.reshape(16, 8, 4), scores, torch.inf).amin(-1)
    dropped = torch.where(mask.reshape(16, 8, 4), -torch.inf, scores).amax(-1)
    assert (kept >= dropped).all()

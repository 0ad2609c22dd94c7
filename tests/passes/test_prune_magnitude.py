"""Magnitude pruning and the masks every method shares, against direct implementations."""

import pytest
import torch

from flashc.passes.prune.magnitude import magnitude_mask
from flashc.passes.prune.masks import n_m_mask, pruned_count, unstructured_mask


def direct_magnitude(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The smallest |w| of the matrix go, by a sort of all its weights."""
    flat = w.abs().flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[flat.argsort()[: int(sparsity * flat.numel() + 1e-9)]] = False
    return keep.reshape(w.shape)


def direct_n_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Row by row, group by group: keep the n largest of every m."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            best = scores[r, g:g + m].argsort(descending=True)[:n]
            keep[r, g + best] = True
    return keep


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.95])
def test_magnitude_matches_a_sort_and_hits_the_fraction_exactly(sparsity):
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(1))
    mask = magnitude_mask(w, sparsity)
    assert torch.equal(mask, direct_magnitude(w, sparsity))
    assert int((~mask).sum()) == pruned_count(sparsity, w.numel())
    assert (w[~mask].abs().max() if (~mask).any() else 0) <= w[mask].abs().min()


def test_magnitude_of_stacked_experts_prunes_each_matrix_on_its_own():
    w = torch.randn(3, 16, 32) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1)  # one scale per expert
    mask = magnitude_mask(w, 0.5)
    assert [int(m.sum()) for m in mask] == [256, 256, 256]
    for e in range(3):
        assert torch.equal(mask[e], direct_magnitude(w[e], 0.5))


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_n_m_pattern_holds_in_every_group(n, m):
    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(2))
    mask = magnitude_mask(w, 0.0, (n, m))
    assert torch.equal(mask, direct_n_m(w.abs(), n, m))
    assert (mask.reshape(12, 64 // m, m).sum(-1) == n).all()


def test_masks_per_row_and_per_matrix():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert unstructured_mask(scores, 0.5, per_row=True).tolist() == [[False, False, True, True]] * 2
    assert unstructured_mask(scores, 0.5, per_row=False).tolist() == [[False] * 4, [True] * 4]
    assert pruned_count(0.29, 100) == 29  # not 28: 0.29 * 100 is 28.999... in floating point
    with pytest.raises(ValueError, match="do not divide into groups of 4"):
        n_m_mask(torch.randn(2, 6), 2, 4)

"""SparseGPT against a direct (column by column, no lazy batches) implementation, its masks,
and its reconstruction error against magnitude's and Wanda's on correlated inputs."""

import pytest
import torch

from flashc.errors import FlashcError
from flashc.passes.prune.magnitude import magnitude_mask
from flashc.passes.prune.masks import pruned_count
from flashc.passes.prune.sparsegpt import sparsegpt_prune
from flashc.passes.prune.wanda import column_norms, wanda_mask


def direct_sparsegpt(w, hessian, sparsity, n_m=None, block=128, damp=0.01):
    """Algorithm 1 of the paper written plainly: the full remaining weight updated after every
    column; a block's mask chosen from the current weights at the block's first column."""
    w = w.double().clone()
    h = hessian.double().clone()
    k = w.shape[1]
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.ones_like(w, dtype=torch.bool)
    for i in range(k):
        if n_m is None and i % block == 0:
            cols = slice(i, min(i + block, k))
            score = (w[:, cols] ** 2 / torch.diagonal(u)[cols] ** 2).flatten()
            drop = score.argsort()[: int(sparsity * score.numel() + 1e-9)]
            block_mask = torch.ones_like(score, dtype=torch.bool)
            block_mask[drop] = False
            mask[:, cols] = block_mask.reshape(w.shape[0], -1)
        if n_m is not None and i % n_m[1] == 0:
            cols = slice(i, i + n_m[1])
            score = w[:, cols] ** 2 / torch.diagonal(u)[cols] ** 2
            group = torch.ones_like(score, dtype=torch.bool)
            group.scatter_(1, score.argsort(dim=1)[:, : n_m[1] - n_m[0]], False)
            mask[:, cols] = group
        err = w[:, i] * ~mask[:, i] / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return w * mask


def correlated_inputs(k: int, rows: int = 2048, seed: int = 0) -> torch.Tensor:
    """Activations with strongly correlated features and a few large channels, as LLM inputs have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5 + torch.eye(k, dtype=torch.float64)
    x = torch.randn(rows, k // 4, generator=g, dtype=torch.float64) @ torch.randn(k // 4, k, generator=g,
                                                                                   dtype=torch.float64)
    x = x + 0.1 * torch.randn(rows, k, generator=g, dtype=torch.float64) @ mix
    return x * (1 + 4 * (torch.rand(k, generator=g, dtype=torch.float64) > 0.9))


@pytest.mark.parametrize("n_m, block", [(None, 16), (None, 64), ((2, 4), 16), ((1, 4), 32)])
def test_sparsegpt_matches_the_direct_algorithm(n_m, block):
    x = correlated_inputs(64)
    hessian = x.t() @ x / x.shape[0]
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = sparsegpt_prune(w, hessian, 0.5, n_m, block_size=block)
    want = direct_sparsegpt(w, hessian, 0.5, n_m, block)
    assert torch.equal(got == 0, want == 0)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    if n_m is None:
        assert int((got == 0).sum()) == pruned_count(0.5, w.numel())
    else:
        assert ((got.reshape(24, 16, 4) != 0).sum(-1) == n_m[0]).all()


def error(w, pruned, x):
    return float(((pruned - w) @ x.t()).norm() / (w @ x.t()).norm())


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda_on_correlated_inputs(n_m):
    x = correlated_inputs(128, seed=1)
    hessian = x.t() @ x / x.shape[0]
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    errors = {"sparsegpt": error(w, sparsegpt_prune(w, hessian, 0.5, n_m), x),
              "wanda": error(w, w * wanda_mask(w, column_norms(hessian), 0.5, n_m), x),
              "magnitude": error(w, w * magnitude_mask(w, 0.5, n_m), x)}
    assert errors["sparsegpt"] < 0.8 * min(errors["wanda"], errors["magnitude"]), errors


def test_stacked_experts_and_dead_inputs():
    x = correlated_inputs(32, rows=512, seed=2)
    hessian = x.t() @ x / x.shape[0]
    hessian[:, 3] = hessian[3, :] = 0  # an input that never fired
    w = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(7))
    stacked = torch.stack([hessian, torch.zeros(32, 32, dtype=torch.float64)])  # expert 1: no token routed
    pruned = sparsegpt_prune(w, stacked, 0.5)
    assert pruned.dtype == w.dtype and pruned.shape == w.shape
    assert [int((p == 0).sum()) for p in pruned] == [128, 128]
    # no Hessian at all: no compensation, so the mask is magnitude's and kept weights are unchanged
    assert torch.equal(pruned[1] != 0, magnitude_mask(w[1], 0.5))
    assert torch.equal(pruned[1][pruned[1] != 0], w[1][pruned[1] != 0])
    with pytest.raises(FlashcError, match="do not divide into groups of 4"):
        sparsegpt_prune(torch.randn(4, 6), torch.eye(6), 0.5, (2, 4))

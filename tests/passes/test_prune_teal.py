"""TEAL's pieces: thresholds that hit the target on held-out activations, the error curve, the
greedy allocation, and the calibration sample."""

import pytest
import torch

from flashc.passes.prune.teal import (
    ErrorCurve, channel_normalized, greedy_allocation, sparsified_fraction, sparsity_levels, thresholds_for,
)
from flashc.passes.quantize.calibration import ActivationSample


def activations(rows: int, seed: int) -> torch.Tensor:
    """Heavy-tailed, channel-scaled activations (Student-t, as LLM hidden states are)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(torch.tensor(3.0)).sample((rows, 96))
    return t * (torch.rand(96, generator=g) * 2 + 0.1)


def test_thresholds_hit_the_target_on_held_out_activations():
    torch.manual_seed(0)
    fit, held = activations(2048, 0), activations(2048, 0)  # same channel scales, fresh tokens
    levels = sparsity_levels(0.05, 0.95)
    thresholds = thresholds_for(fit, levels)
    assert len(levels) == 20 and levels[-1] == pytest.approx(0.95)
    assert thresholds[0] == 0 and (thresholds.diff() >= 0).all()
    for level, t in zip(levels.tolist(), thresholds.tolist()):
        assert sparsified_fraction(fit, t) == pytest.approx(level, abs=1 / fit.numel())  # exact on the rows it saw
        assert sparsified_fraction(held, t) == pytest.approx(level, abs=0.01)


def test_error_curve_is_the_relative_output_error():
    x = activations(256, 1)
    w = torch.randn(40, 96)
    levels = sparsity_levels(0.1, 0.9)
    thresholds = thresholds_for(x, levels)
    curve = ErrorCurve(x, w.t() @ w, thresholds)
    for i in (0, 3, 9):
        sparse = torch.where(x.abs() > thresholds[i], x, 0)
        want = ((sparse - x) @ w.t()).norm() ** 2 / (x @ w.t()).norm() ** 2
        assert curve(i) == pytest.approx(float(want), rel=1e-4)


def test_settled_error_curve_keeps_every_level_and_drops_the_gram_matrix():
    x = activations(256, 5)
    w = torch.randn(40, 96)
    thresholds = thresholds_for(x, sparsity_levels(0.1, 0.9))
    lazy, settled = ErrorCurve(x, w.t() @ w, thresholds), ErrorCurve(x, w.t() @ w, thresholds).settle()
    assert settled.gram is None and settled.rows is None  # what a model's curves held at once, K x K each
    assert [settled(i) for i in range(len(thresholds))] == [lazy(i) for i in range(len(thresholds))]
    assert settled(9) > settled(3) > 0


def test_error_curve_per_expert_weighs_each_row_through_its_expert():
    x = activations(300, 2)
    g = torch.Generator().manual_seed(4)
    downs = torch.randn(3, 40, 96, generator=g)
    experts, weights = torch.randint(0, 3, (300,), generator=g), torch.rand(300, generator=g)
    levels = sparsity_levels(0.1, 0.9)
    thresholds = thresholds_for(x, levels)
    curve = ErrorCurve(x, torch.stack([d.t() @ d for d in downs]), thresholds, weights, experts)
    dense = torch.stack([weights[r] * downs[experts[r]] @ x[r] for r in range(300)]).double()
    for i in (2, 5, 9):
        sparse = torch.where(x.abs() > thresholds[i], x, 0)
        got = torch.stack([weights[r] * downs[experts[r]] @ sparse[r] for r in range(300)]).double()
        assert curve(i) == pytest.approx(float((got - dense).norm() ** 2 / dense.norm() ** 2), rel=1e-4)
    with pytest.raises(ValueError, match="each row's expert"):
        ErrorCurve(x, torch.stack([d.t() @ d for d in downs]), thresholds)


def test_greedy_allocation_meets_the_target_and_prefers_cheap_inputs():
    levels = sparsity_levels(0.05, 0.95)
    cheap = lambda i: 0.1 * float(levels[i]) ** 2  # noqa: E731
    dear = lambda i: 1.0 * float(levels[i]) ** 2  # noqa: E731
    weights = [1.0, 1.0, 2.0]
    chosen = greedy_allocation([cheap, dear, dear], weights, levels, 0.4)
    reached = sum(w * float(levels[i]) for w, i in zip(weights, chosen)) / sum(weights)
    assert 0.4 - 1e-9 <= reached < 0.4 + 0.05
    assert levels[chosen[0]] > levels[chosen[1]]  # the cheap input takes more of the sparsity
    assert chosen[2] > chosen[1]  # a step of the larger input buys twice the sparsity for the same error
    assert greedy_allocation([cheap], [1.0], levels, 0.0) == [0]
    assert greedy_allocation([cheap, dear], [1.0, 1.0], levels, 0.95) == [19, 19]


def test_activation_sample_is_spread_over_the_run():
    sample = ActivationSample(stride=3, limit=5)
    for call in range(4):  # calls of 4 rows each: rows 0..15
        sample((torch.arange(call * 4, call * 4 + 4).float().unsqueeze(1),))
    assert sample.tensor().flatten().tolist() == [0, 3, 6, 9, 12]


def test_channel_normalized_errors_are_the_mean_relative_error_of_the_channels():
    """Through channel_normalized weights an error curve is the mean over output channels of each channel's
    relative error; the output's total energy would let one massive channel hide the others' error."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g, dtype=torch.float64)
    w = torch.randn(8, 32, generator=g, dtype=torch.float64)
    x[:, 0] *= 200.0  # one massive input ...
    w[0] = 0.0
    w[0, 0] = 1.0  # ... read by one output channel only
    wn = channel_normalized(w, x)
    assert torch.allclose((x.float() @ wn.t()).norm(dim=0), torch.ones(8), rtol=1e-5)
    levels = torch.tensor([0.0, 0.5], dtype=torch.float64)
    thresholds = thresholds_for(x, levels)
    per_channel = ErrorCurve(x, wn.t() @ wn, thresholds)
    energy = ErrorCurve(x, (w.t() @ w).float(), thresholds)
    removed = x * (x.abs() <= float(thresholds[1]))
    truth = ((removed @ w.t()).norm(dim=0) ** 2 / (x @ w.t()).norm(dim=0) ** 2).mean()
    assert per_channel(1) == pytest.approx(float(truth), rel=1e-4)
    assert energy(1) < 0.1 * per_channel(1)  # the massive channel dominates the energy and hides the rest

"""Divergence math on small tensors, against direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from avgctl.protocol.bounds import MAX_TOP_LAYERS, TOP_LAYERS
from avgctl.worker import divergence as dv


def _samples(flat: torch.Tensor, plan: dv.SamplePlan | dv.DriftPlan) -> torch.Tensor:
    """A plan's coordinates of one flat tensor, as a layout's flat buffer gives them."""
    return flat.clone() if plan.index is None else flat.index_select(0, plan.index)


def _rank_divergence(before: torch.Tensor, after: torch.Tensor, plan: dv.SamplePlan) -> dv.RankDivergence:
    """A round's figures read back, as the round reads them."""
    return dv.RankDivergence.from_figures(dv.round_figures(before, after, plan).tolist())


def _direct(before: torch.Tensor, after: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(before.double() - after.double()))


def test_exact_plan_equals_direct_norm_per_layer_and_total():
    torch.manual_seed(0)
    numels = [7, 300, 1]
    before, after = torch.randn(308), torch.randn(308)
    plan = dv.make_plan(numels, None)
    assert plan.exact
    got = _rank_divergence(before.double()[plan.index], after.double()[plan.index], plan)
    assert math.isclose(math.sqrt(got.squared), _direct(before, after), rel_tol=1e-12)
    assert math.isclose(got.mean_norm_squared, float(after.double().square().sum()), rel_tol=1e-12)
    assert math.isclose(float(got.per_layer[1]), _direct(before[7:307], after[7:307]) ** 2, rel_tol=1e-12)


def test_model_under_the_budget_is_measured_exactly():
    plan = dv.make_plan([10, 20], budget=100)
    assert plan.exact and plan.index.tolist() == list(range(30))


def test_sampled_estimate_is_within_its_documented_error():
    """Relative standard error of the norm is about sqrt(1/(2k)); allow 4 sigma over many draws."""
    torch.manual_seed(1)
    numels = [200_000, 50_000, 16, 4_000]
    total = sum(numels)
    budget = 4096
    before = torch.randn(total, dtype=torch.float64)
    after = before + torch.randn(total, dtype=torch.float64) * 1e-3
    truth = _direct(before, after)
    errors = []
    for seed in range(20):
        plan = dv.make_plan(numels, budget, seed=seed)
        assert not plan.exact and plan.index.numel() <= budget + 32 * len(numels)
        est = math.sqrt(_rank_divergence(before[plan.index], after[plan.index], plan).squared)
        errors.append(est / truth - 1)
    sigma = math.sqrt(1 / (2 * budget))
    assert max(abs(e) for e in errors) < 4 * sigma
    assert abs(sum(errors) / len(errors)) < 2 * sigma  # unbiased


def test_no_cancellation_in_float32():
    """A tiny difference on huge values: the naive sum-of-squares formula in fp32 is all noise."""
    base = torch.full((100_000,), 1000.0, dtype=torch.float32)
    a, b = base + 1e-3, base - 1e-3
    mean = (a + b) / 2
    naive = (a.square().sum() + b.square().sum() - 2 * mean.square().sum()).clamp(min=0).sqrt() / math.sqrt(2)
    plan = dv.make_plan([100_000], None)
    got = math.sqrt(_rank_divergence(_samples(a, plan), _samples(mean, plan), plan).squared)
    truth = _direct(a, mean)  # in float64 from the stored fp32 values (about 1e-3 per coordinate)
    assert math.isclose(got, truth, rel_tol=1e-9)
    assert not math.isclose(float(naive), truth, rel_tol=0.5)


def test_gather_params_matches_gather_on_the_flat_buffer():
    torch.manual_seed(2)
    tensors = [torch.randn(3, 50), torch.randn(2000), torch.randn(5)]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    plan = dv.make_plan([t.numel() for t in tensors], 300, seed=3)
    assert torch.equal(_samples(flat, plan).double(), dv.gather_params(tensors, plan))


def test_drift_and_group_summary():
    plan = dv.make_drift_plan([4], 2048)
    assert plan.index is None  # small models: every coordinate
    assert (
        float(dv.drift(torch.tensor([3.0, 4, 0, 0], dtype=torch.float64), torch.zeros(4, dtype=torch.float64), plan))
        == 5.0
    )
    group = dv.group_divergence([9.0, 16.0], [100.0, 100.0])
    assert (group.mean, group.max) == (3.5, 4.0)
    assert (group.relative_mean, group.relative_max) == (0.35, 0.4)


def test_sampled_drift_estimates_the_full_norm_and_survives_tiny_moves_in_float32():
    torch.manual_seed(4)
    theta = torch.randn(200_000)  # float32, like the parameters it reads
    moved = theta + 1e-4 * torch.randn(200_000)  # a small step: ~1e-4 relative
    truth = float((moved.double() - theta.double()).norm())
    plan = dv.make_drift_plan([theta.numel()], 2048)
    got = float(dv.drift(_samples(moved, plan), _samples(theta, plan), plan))
    assert abs(got / truth - 1) < 0.05  # standard error sqrt(1/(2k)) = 1.6% for Gaussian moves
    exact = dv.make_drift_plan([theta.numel()], theta.numel())
    assert math.isclose(float(dv.drift(moved, theta, exact)), truth, rel_tol=1e-5)


def test_drift_sample_of_separate_tensors_reads_the_same_coordinates_as_the_flat_buffer():
    torch.manual_seed(5)
    params = [torch.randn(300, 7), torch.randn(11), torch.randn(5000)]
    flat = torch.cat([p.reshape(-1) for p in params])
    for budget in (64, 10_000):  # sampled, and every coordinate
        plan = dv.make_drift_plan([p.numel() for p in params], budget)
        assert torch.equal(dv.drift_sample_params(params, plan), _samples(flat, plan).double())


def test_top_layers_are_shares_of_the_total():
    assert dv.top_layers([1.0, 6.0, 3.0], ["a", "b", "c"]) == [("b", 0.6), ("c", 0.3), ("a", 0.1)]
    assert dv.top_layers([0.0, 0.0], ["a", "b"]) == []
    # Every layer's share up to MAX_TOP_LAYERS layers (the heatmap's), the top TOP_LAYERS beyond.
    many = [float(i) for i in range(MAX_TOP_LAYERS + 1)]
    names = [f"l{i}" for i in range(len(many))]
    assert len(dv.top_layers(many[:-1], names[:-1])) == MAX_TOP_LAYERS
    top = dv.top_layers(many, names)
    assert [name for name, _ in top] == names[::-1][:TOP_LAYERS]
    assert sum(share for _, share in dv.top_layers(many[:-1], names[:-1])) == pytest.approx(1.0)

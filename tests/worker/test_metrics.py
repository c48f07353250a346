"""Round metrics from real gloo ranks against a direct computation of every rank's divergence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from avgctl.worker import PeriodicAverager
from tests.support.distributed import run_ranks
from tests.support.workloads import flat_copy, make_model, sgd_step

pytestmark = pytest.mark.dist


def _direct_divergence(model, world):
    mine = flat_copy(model)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    mean = torch.stack(everyone).mean(0)
    per_rank = [float(torch.linalg.vector_norm(x - mean)) for x in everyone]
    diff = mine - mean
    kurtosis = float(diff.pow(4).mean() / diff.pow(2).mean() ** 2)
    return per_rank, float(torch.linalg.vector_norm(mean)), kurtosis


def _metrics(rank, world, exact, sample_size):
    model = make_model()
    if not exact:  # large enough that the default path samples
        model = torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.Tanh(), torch.nn.Linear(512, 4))
        torch.manual_seed(0)
        for p in model.parameters():
            torch.nn.init.normal_(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = PeriodicAverager(3, exact_divergence=exact, sample_size=sample_size)
    checked = []
    for step in range(11):
        sgd_step(model, opt, rank, step)
        direct = _direct_divergence(model, world) if step % 3 == 0 else None
        avg.average_parameters(model.parameters())
        if step == 8:
            drift_rec = avg.metrics.last_step  # drift is measured every 4th step by default
        if direct is not None:
            per_rank, mean_norm, kurtosis = direct
            rec = avg.metrics.last_round
            assert rec.step == step and rec.exact == (exact or sample_size >= 4236)
            checked.append(
                (
                    rec.divergence / per_rank[rank],
                    rec.divergence_mean / (sum(per_rank) / world),
                    rec.divergence_max / max(per_rank),
                    rec.relative_divergence / (per_rank[rank] / mean_norm),
                    kurtosis,
                )
            )
            params_bytes = sum(p.numel() * 4 for p in model.parameters())
            assert params_bytes <= rec.bytes <= params_bytes + 4 * 64  # two ranks: the exchange rides in a small tail
            assert rec.top_layers and abs(sum(share for _, share in rec.top_layers) - 1) < 1e-9
    assert drift_rec.step == 8 and drift_rec.drift is not None and drift_rec.drift > 0
    step_rec = avg.metrics.last_step
    assert step_rec.step == 10 and step_rec.drift is None
    return checked


def test_exact_divergence_matches_direct_computation():
    for ratios in run_ranks(_metrics, 2, True, 16384):
        assert len(ratios) == 4
        assert all(math.isclose(r, 1.0, rel_tol=1e-6) for row in ratios for r in row[:4])


def test_sampled_divergence_is_close_to_direct_computation():
    k = 1024
    for rows in run_ranks(_metrics, 2, False, k):
        for *ratios, kurtosis in rows:
            # The documented standard error on the norm: sqrt((kurtosis - 1) / k) / 2 (Gaussian: sqrt(1/2k)).
            sigma = math.sqrt((kurtosis - 1) / k) / 2
            assert abs(ratios[0] - 1.0) < 4 * sigma, (ratios, kurtosis, sigma)

"""The two-rank all-reduce as one exchange gives gloo's all-reduce results, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from avgctl.worker.pair import MAX_PAIR_BYTES, PairAllReduce, pair_eligible
from tests.support.distributed import run_ranks

pytestmark = pytest.mark.dist


def _pair_vs_all_reduce(rank, world):
    group = dist.group.WORLD
    same = []
    for n, dtype in ((1, torch.float32), (22_050, torch.float32), (100_003, torch.float64), (4096, torch.bfloat16)):
        gen = torch.Generator().manual_seed(rank * 101 + n)
        values = (
            torch.randn(n, generator=gen, dtype=torch.float64) * 10 ** torch.randint(-6, 6, (n,), generator=gen)
        ).to(dtype)
        ours, ref = values.clone(), values.clone()
        PairAllReduce(group, ours)(ours)
        dist.all_reduce(ref)
        same.append(torch.equal(ours, ref))
    big = torch.empty(MAX_PAIR_BYTES // 4 + 1)
    return same, pair_eligible(group, torch.empty(10)), pair_eligible(group, big)


def test_pair_all_reduce_is_bit_identical_to_gloo():
    for same, small_ok, big_ok in run_ranks(_pair_vs_all_reduce, 2):
        assert same == [True] * 4
        assert small_ok and not big_ok  # the receive buffer is bounded


def _three_ranks(rank, world):
    return pair_eligible(dist.group.WORLD, torch.empty(10))


def test_only_two_rank_groups_use_it():
    assert run_ranks(_three_ranks, 3) == [False] * 3

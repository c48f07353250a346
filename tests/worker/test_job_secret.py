"""The job's secret: the ranks agree on it through their own store, and checkpoints carry it."""

from __future__ import annotations

import io
import string

import pytest
import torch

from avgctl.worker import PeriodicAverager
from avgctl.worker import job_secret as js
from tests.support.distributed import run_ranks


def _agree_twice(rank: int, world: int) -> tuple[str, str, str, str]:
    import torch.distributed as dist

    first = js.agree("job-a")  # every rank proposes a fresh secret: the first proposal wins
    again = js.agree("job-a", f"rank-{rank}-proposes-another-secret")  # a restarted attempt's proposal
    other_job = js.agree("job-b")
    root = type(js.root_store(dist.distributed_c10d._get_default_store())).__name__
    return first, again, other_job, root


@pytest.mark.dist
def test_three_ranks_agree_on_one_secret_that_later_proposals_keep():
    results = run_ranks(_agree_twice, 3)
    firsts, agains, others, roots = zip(*results)
    assert len(set(firsts)) == 1 and len(firsts[0]) == 32 and set(firsts[0]) <= set(string.hexdigits)
    assert agains == firsts  # the store keeps the first secret: a later proposal gets it back
    assert len(set(others)) == 1 and others[0] != firsts[0]  # one secret per job id
    assert set(roots) == {"FileStore"}


def test_a_restarted_attempt_behind_another_prefix_gets_the_first_attempts_secret():
    # As under torchrun: the agent's store lives through restarts; each attempt's ranks see it
    # through a PrefixStore of their own (the demo's ``avgctl/attempt-N``).
    agent = torch.distributed.HashStore()
    first = torch.distributed.PrefixStore("avgctl/attempt-0", torch.distributed.PrefixStore("pg", agent))
    second = torch.distributed.PrefixStore("avgctl/attempt-1", agent)
    assert js.root_store(first) is agent
    secret = js.agree_in(first, "job-r", js.new_secret())
    assert js.agree_in(second, "job-r", js.new_secret()) == secret
    assert js.agree_in(second, "job-other", "its-own-first-secret") == "its-own-first-secret"


def _agree_on_checkpoint(rank: int, world: int, saved: str) -> str:
    return js.agree("job-c", saved)


@pytest.mark.dist
def test_ranks_resumed_from_one_checkpoint_agree_on_its_secret():
    saved = js.new_secret()
    assert run_ranks(_agree_on_checkpoint, 2, saved) == [saved, saved]


def test_without_a_process_group_the_candidate_or_a_fresh_secret_is_the_secret():
    assert js.agree("job-d", "a-secret-from-a-checkpoint") == "a-secret-from-a-checkpoint"
    fresh = {js.agree("job-d") for _ in range(3)}
    assert len(fresh) == 3 and all(len(s) == 32 for s in fresh)


def _round_trip(rank: int, world: int) -> tuple[str, str, str, str]:
    averager = PeriodicAverager(4, warmup_steps=0)
    averager.job_secret = js.agree("job-e")
    buffer = io.BytesIO()
    torch.save({"averager": averager.state_dict()}, buffer)
    buffer.seek(0)
    resumed = PeriodicAverager(4, warmup_steps=0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False)["averager"])
    # A checkpoint from before secrets (no key) leaves the averager's own secret alone.
    old = PeriodicAverager(4, warmup_steps=0)
    old.job_secret = "the-secret-it-already-had"
    state = averager.state_dict()
    del state["job_secret"]
    old.load_state_dict(state)
    return averager.job_secret, resumed.job_secret, js.agree("job-e", resumed.job_secret), old.job_secret


@pytest.mark.dist
def test_the_averagers_state_dict_carries_the_job_secret():
    results = run_ranks(_round_trip, 2)
    assert results[0] == results[1]
    secret, resumed, agreed, old = results[0]
    assert resumed == secret == agreed and old == "the-secret-it-already-had"

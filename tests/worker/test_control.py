"""The exchange: its tail encoding, and commands applied once however often they are delivered."""

from __future__ import annotations

import pytest
import torch

from avgctl.protocol import SetPeriod
from avgctl.worker import InProcessControlSource, PeriodicAverager
from avgctl.worker.control import _join, _split
from tests.support.distributed import run_ranks
from tests.support.workloads import make_model, sgd_step


def test_integers_split_into_parts_exact_in_float32_up_to_2_to_the_40():
    values = [0, 1, 7, 2**20 - 1, 2**20, 123_456_789, 2**40 - 1]
    parts = _split(values)
    assert all(0 <= p < 2**20 for p in parts)
    # As one rank's slots plus zeros from the other, summed in float32 the way the all-reduce does.
    summed = (torch.tensor(parts, dtype=torch.float32) + torch.zeros(len(parts))).tolist()
    assert _join(summed) == values


def _redelivery(rank, world):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def train(avg, steps):
        for _ in range(steps):
            sgd_step(model, opt, rank, avg.step)
            avg.average_parameters(model.parameters())

    def attach(avg):
        source = InProcessControlSource() if rank == 0 else None
        if source is not None:
            avg.set_control_source(source)
        return source

    avg = PeriodicAverager(2, control_interval=1)
    source = attach(avg)
    cid = source.submit(SetPeriod(period=4)) if rank == 0 else None
    train(avg, 3)
    first = source.result(cid, timeout=10) if rank == 0 else None

    again = attach(avg)  # the server delivers the id again (here with another body): answered, not applied
    if rank == 0:
        again.submit(SetPeriod(period=6), command_id=cid)
    train(avg, 3)
    repeat = again.result(cid, timeout=10) if rank == 0 else None

    restored = PeriodicAverager(2, control_interval=1)  # a restarted job, from the checkpoint
    restored.load_state_dict(avg.state_dict())
    after_restart = attach(restored)
    if rank == 0:
        after_restart.submit(SetPeriod(period=6), command_id=cid)
    train(restored, 3)
    restarted = after_restart.result(cid, timeout=10) if rank == 0 else None
    return first, repeat, restarted, avg.control.period, restored.control.period, restored.control.version


@pytest.mark.dist
def test_a_redelivered_command_is_answered_with_its_ack_never_applied_again():
    (first, repeat, restarted, period, restored_period, version), other = run_ranks(_redelivery, 2)
    assert first.status == "applied" and first.applied_step is not None
    assert repeat == first
    assert (restarted.status, restarted.applied_step) == ("applied", None)  # only the id survives a restart
    assert period == restored_period == 4 and version == 1
    assert other[3:] == (4, 4, 1)

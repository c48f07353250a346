"""No host read of a tensor on a step that is not a round (real gloo ranks).

On a GPU a host read (``float(t)``, ``.item()``, a blocking copy to the CPU) stalls the CPU until
the device catches up; torch's averager does that only at rounds. On the CPU the same calls go
through the dispatcher as the ops recorded here, so a step that would sync on a GPU is caught.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from avgctl.worker import PeriodicAverager
from tests.support.distributed import run_ranks
from tests.support.workloads import make_model, sgd_step

pytestmark = pytest.mark.dist

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's values on the host, with where in avgctl they came from."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        blocking_to_host = (
            func is aten._to_copy.default
            and kwargs.get("device") == torch.device("cpu")
            and not kwargs.get("non_blocking", False)
        )
        if func in _READS or blocking_to_host:
            site = next(
                (
                    f"{f.filename.split('/')[-1]}:{f.lineno}"
                    for f in reversed(traceback.extract_stack())
                    if "/worker/" in f.filename
                ),
                "?",
            )
            self.seen.append(f"{func} at {site}")
        return func(*args, **kwargs)


def _steps(rank, world):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    averager = PeriodicAverager(period=5, drift_every=2)
    reads_by_step, rounds = {}, []
    for step in range(23):
        sgd_step(model, opt, rank, step)
        loss = torch.nn.functional.mse_loss(model(torch.ones(2, 8)), torch.zeros(2, 4))
        before = averager.metrics.rounds
        mode = HostReads()
        with mode:
            averager.record(loss=loss.detach(), norm=loss.detach() * 2)
            averager.average_parameters(model.parameters())
        if averager.metrics.rounds > before:
            rounds.append(step)
        reads_by_step[step] = mode.seen
    averager.flush()
    last = averager.metrics.last_step
    off_round = {step: seen for step, seen in reads_by_step.items() if step not in rounds and seen}
    return rounds, off_round, isinstance(last.drift, float), last.scalars


@pytest.mark.parametrize("world", [2, 3])
def test_steps_between_rounds_read_nothing_on_the_host(world):
    for rounds, off_round, drift_is_float, scalars in run_ranks(_steps, world):
        assert rounds == [0, 5, 10, 15, 20]
        assert off_round == {}, off_round
        # ... and the figures still arrive, as floats
        assert drift_is_float and isinstance(scalars["norm"], float)

"""Live control across real gloo ranks: every command applies at one step on all ranks, or nowhere."""

from __future__ import annotations

import queue
import random
import threading
import time

import pytest
import torch

from avgctl import protocol as s
from avgctl.worker import HierarchicalAverager, InProcessControlSource, PeriodicAverager
from tests.support.distributed import run_ranks
from tests.support.workloads import RoundLog, flat_copy, make_model, sgd_step

pytestmark = pytest.mark.dist


def _random_command(rng: random.Random, hierarchical: bool, world: int):
    kind = rng.choices(
        [
            "period",
            "bad_period",
            "pause_avg",
            "resume_avg",
            "now",
            "pause_train",
            "resume_train",
            "hier",
            "bad_hier",
            "autotune",
        ],
        weights=[6, 1, 2, 2, 2, 1, 1, 3 if hierarchical else 1, 1, 1],
    )[0]
    if kind == "period":
        return s.SetPeriod(period=rng.randint(3 if hierarchical else 1, 9))
    if kind == "bad_period":  # bypasses pydantic, as a buggy client of the in-process source might
        return s.SetPeriod.model_construct(type="set_period", period=rng.choice([0, -3]))
    if kind == "hier":
        low = rng.randint(1, 4)
        return s.SetHierarchy(periods={"2": low, str(world): low + rng.randint(1, 5)})
    if kind == "bad_hier":
        return s.SetHierarchy(periods={"2": 5, str(world): 3})  # must grow with group size
    if kind == "autotune":
        return s.SetAutotune(enabled=True)  # the server's business, not the worker's
    return {
        "pause_avg": s.PauseAveraging(),
        "resume_avg": s.ResumeAveraging(),
        "now": s.AverageNow(),
        "pause_train": s.PauseTraining(),
        "resume_train": s.ResumeTraining(),
    }[kind]


class _Checksums:
    """Parameter checksums right after each round, to compare across ranks.

    Taken in the training loop, not in ``on_round``: round records arrive one step later.
    """

    def __init__(self, model, avg):
        self.model, self.avg = model, avg
        self.after_round: list[tuple[int, int, float]] = []
        self.rounds = 0

    def after_step(self):
        metrics = self.avg.metrics  # collects the round's record
        if metrics.rounds > self.rounds:
            self.rounds = metrics.rounds
            record = metrics.last_round
            self.after_round.append((record.step, record.group_size, float(flat_copy(self.model).sum())))


def _agreement(rank, world, seed, steps, hierarchical):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if hierarchical:
        avg = HierarchicalAverager({2: 2, 4: world}, warmup_steps=3, control_interval=3, poll_interval=0.01)
    else:
        avg = PeriodicAverager(4, warmup_steps=3, control_interval=3, poll_interval=0.01)
    log, sums = RoundLog(), _Checksums(model, avg)
    avg.add_listener(log)
    submitted: list[tuple[int, str]] = []
    source = None
    if rank == 0:
        source = InProcessControlSource()
        avg.set_control_source(source)
        rng = random.Random(seed)
        pauses: queue.SimpleQueue[int | None] = queue.SimpleQueue()  # None: no more pauses

        def resume_each_pause():  # a person pressing "Resume training" once the pause took effect
            while (pause := pauses.get(timeout=120)) is not None:
                if source.result(pause, timeout=60).status == "applied":
                    submitted.append((source.submit(s.ResumeTraining()), "resume_training"))

        resumer = threading.Thread(target=resume_each_pause, daemon=True)
        resumer.start()
    for step in range(steps):
        sgd_step(model, opt, rank, step)
        if rank == 0 and step < steps - 8:
            for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
                cmd = _random_command(rng, hierarchical, world)
                cid = source.submit(cmd)
                submitted.append((cid, cmd.type))
                if cmd.type == "pause_training":
                    pauses.put(cid)
        avg.average_parameters(model.parameters())
        sums.after_step()
    if rank == 0:
        pauses.put(None)
        resumer.join(timeout=30)
    return {
        "rounds": log.rounds,
        "controls": log.controls,
        "sums": sums.after_round,
        "submitted": submitted,
        "acks": source.acks() if source else None,
        "final": avg.control,
    }


def _check(results, world):
    first = results[0]
    for r in results[1:]:
        assert r["rounds"] == first["rounds"], "ranks averaged at different steps"
        assert r["controls"] == first["controls"], "ranks applied control changes at different steps"
        assert r["final"] == first["final"]
    # Parameters identical within each averaging group right after every round.
    for i, (step, size, _) in enumerate(first["sums"]):
        for group_start in range(0, world, size):
            group = [results[r]["sums"][i] for r in range(group_start, group_start + size)]
            assert all(g[0] == step for g in group)
            assert max(g[2] for g in group) - min(g[2] for g in group) <= 1e-5 * max(1.0, abs(group[0][2])), (
                f"ranks {group_start}..{group_start + size - 1} differ after the round at step {step}"
            )
    acks, submitted = first["acks"], first["submitted"]
    assert len(submitted) >= 200
    assert set(acks) == {cid for cid, _ in submitted}, "some commands were never acknowledged"
    controls = set(first["controls"])
    by_type = {cid: kind for cid, kind in submitted}
    for cid, ack in acks.items():
        if ack.status == "applied":
            assert (ack.applied_step, ack.control.version) in controls or any(
                step == ack.applied_step and version >= ack.control.version for step, version in controls
            )
        else:
            assert ack.reason, f"rejected without a reason: {by_type[cid]}"
    rejected = {by_type[c] for c, a in acks.items() if a.status == "rejected"}
    assert "set_autotune" in rejected
    return acks


def test_random_command_sequences_two_ranks_periodic():
    results = run_ranks(_agreement, 2, 7, 260, False, timeout=240)
    acks = _check(results, 2)
    reasons = [a.reason for a in acks.values() if a.status == "rejected"]
    assert any("positive integer" in r for r in reasons)
    assert any("hierarchical averager" in r for r in reasons)


def test_random_command_sequences_four_ranks_hierarchical():
    results = run_ranks(_agreement, 4, 11, 220, True, timeout=300)
    acks = _check(results, 4)
    assert any("grow with the group size" in (a.reason or "") for a in acks.values())


def _long_pause(rank, world, hold_seconds):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = PeriodicAverager(2, poll_interval=0.1)
    held = None
    if rank == 0:
        source = InProcessControlSource()
        avg.set_control_source(source)
    for step in range(12):
        sgd_step(model, opt, rank, step)
        if rank == 0 and step == 3:
            pause = source.submit(s.PauseTraining())

            def resume_later():
                source.result(pause, timeout=30)
                time.sleep(hold_seconds)  # the hold itself is what is under test
                source.submit(s.ResumeTraining())

            threading.Thread(target=resume_later, daemon=True).start()
        started = time.monotonic()
        avg.average_parameters(model.parameters())
        if time.monotonic() - started > 1.0:
            held = (step, time.monotonic() - started)
    return held, avg.step, float(flat_copy(model).sum())


def test_pause_outlasts_process_group_timeout():
    results = run_ranks(_long_pause, 2, 5.0, pg_timeout=2.0, timeout=60)
    (held0, steps0, sum0), (held1, steps1, sum1) = results
    # Taken by the exchange after the round at step 4, which settles (applies) at step 5.
    assert held0 is not None and held0[0] == 5 and held0[1] >= 5.0
    assert held1 is not None and held1[0] == 5
    assert steps0 == steps1 == 12


def _layout_mismatch(rank, world):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = PeriodicAverager(2)
    for step in range(4):
        sgd_step(model, opt, rank, step)
        if rank == 1 and step == 2:
            model[0].bias.grad = None  # this rank would average one tensor fewer
        avg.average_parameters(model.parameters())


@pytest.mark.parametrize("world", [2, 3])  # the exchange in the buffer's tail, and on its own
def test_ranks_with_different_parameter_sets_fail_clearly_not_hang(world):
    with pytest.raises(RuntimeError) as err:
        run_ranks(_layout_mismatch, world, timeout=60)
    assert all(f"rank {r} failed" in str(err.value) for r in range(world))
    assert str(err.value).count("disagree on the parameters") == world


def _changing_params(rank, world):
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    ref, mine = make_model(), make_model()
    ref_opt, my_opt = torch.optim.SGD(ref.parameters(), lr=0.05), torch.optim.SGD(mine.parameters(), lr=0.05)
    ref_avg, my_avg = PeriodicModelAverager(2), PeriodicAverager(2)
    for step in range(20):
        if step == 7:  # freeze the first layer everywhere: the set of parameters to average shrinks
            for model in (ref, mine):
                model[0].weight.requires_grad_(False)
                model[0].weight.grad = None
        if step == 13:  # someone re-points a parameter, as load_state_dict(assign=True) would
            for model in (ref, mine):
                model[2].bias.data = model[2].bias.data.clone()
        sgd_step(ref, ref_opt, rank, step)
        sgd_step(mine, my_opt, rank, step)
        ref_avg.average_parameters(ref.parameters())
        my_avg.average_parameters(mine.parameters())
        assert torch.equal(flat_copy(ref), flat_copy(mine)), step
    return True


def test_parameter_set_changes_rebuild_the_buffer():
    assert run_ranks(_changing_params, 2) == [True, True]


def _checkpoint(rank, world):
    def train(avg, model, opt, steps, start):
        for step in range(start, start + steps):
            sgd_step(model, opt, rank, step)
            avg.average_parameters(model.parameters())

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    avg = PeriodicAverager(3, warmup_steps=2, control_interval=2)
    if rank == 0:
        source = InProcessControlSource()
        avg.set_control_source(source)
        source.submit(s.SetPeriod(period=5))
        source.submit(s.PauseAveraging())
    train(avg, model, opt, 6, 0)
    if rank == 0:
        source.submit(s.ResumeAveraging())
    train(avg, model, opt, 4, 6)
    saved_state, saved_model = avg.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}

    twin = make_model()
    twin.load_state_dict(saved_model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    restored = PeriodicAverager(3, warmup_steps=2, control_interval=2)
    restored.load_state_dict(saved_state)
    assert restored.control == avg.control and restored.step == avg.step == 10
    train(avg, model, opt, 12, 10)
    train(restored, twin, twin_opt, 12, 10)
    assert torch.equal(flat_copy(model), flat_copy(twin))
    return avg.control.period, avg.control.version


def test_checkpoint_round_trip_keeps_step_and_control():
    assert run_ranks(_checkpoint, 2) == [(5, 3), (5, 3)]

"""The schedule and command semantics, as pure functions."""

from __future__ import annotations

import dataclasses
import json

import pytest

from avgctl import protocol as s
from avgctl.worker import control_state as cs


def _torch_periodic(step, period, warmup):
    return step >= warmup and (step - warmup) % period == 0


def _torch_hierarchical(step, periods, warmup):
    if step < warmup:
        return None
    for level in reversed(range(len(periods))):
        if step % periods[level] == 0:
            return level
    return None


@pytest.mark.parametrize("period,warmup", [(1, 0), (3, 0), (4, 5), (7, 2)])
def test_periodic_schedule_is_torchs(period, warmup):
    state = cs.periodic_state(period, warmup)
    assert [cs.round_level(state, t) is not None for t in range(60)] == [
        _torch_periodic(t, period, warmup) for t in range(60)
    ]


@pytest.mark.parametrize("periods,warmup", [((2, 6), 0), ((2, 4, 8), 3), ((3, 5), 7)])
def test_hierarchical_schedule_is_torchs(periods, warmup):
    state = cs.hierarchical_state(periods, tuple(2**i for i in range(1, len(periods) + 1)), warmup)
    assert [cs.round_level(state, t) for t in range(80)] == [_torch_hierarchical(t, periods, warmup) for t in range(80)]


def test_set_period_restarts_the_grid_at_the_applied_step():
    state = cs.apply_command(cs.periodic_state(4, 0), s.SetPeriod(period=5), step=10)
    assert (state.period, state.anchor, state.version) == (5, 10, 1)
    assert [t for t in range(10, 22) if cs.round_level(state, t) is not None] == [10, 15, 20]


def test_pause_resume_and_average_now():
    paused = cs.apply_command(cs.periodic_state(2, 0), s.PauseAveraging(), step=4)
    assert all(cs.round_level(paused, t) is None for t in range(4, 40))
    now = cs.apply_command(paused, s.AverageNow(), step=9)
    assert cs.round_level(now, 9) == 0  # one round even while paused
    resumed = cs.apply_command(paused, s.ResumeAveraging(), step=11)
    assert [t for t in range(11, 16) if cs.round_level(resumed, t) is not None] == [11, 13, 15]
    assert resumed.version == 2


def test_exchanges_happen_at_rounds_and_every_control_interval():
    paused = cs.apply_command(cs.periodic_state(100, 0), s.PauseAveraging(), step=0)
    assert [t for t in range(1, 40) if cs.needs_exchange(paused, t, 16 * (t // 16), 16)] == []
    last = 0
    exchanged = []
    for t in range(1, 40):
        if cs.needs_exchange(paused, t, last, 16):
            exchanged.append(t)
            last = t
    assert exchanged == [16, 32]


@pytest.mark.parametrize(
    "state,command,reason",
    [
        (cs.periodic_state(4, 0), s.SetPeriod.model_construct(type="set_period", period=0), "positive integer"),
        (cs.periodic_state(4, 0), s.SetHierarchy(periods={"2": 2}), "hierarchical averager"),
        (cs.hierarchical_state((2, 8), (2, 4), 0), s.SetHierarchy(periods={"2": 2, "8": 4}), "exactly the group sizes"),
        (
            cs.hierarchical_state((2, 8), (2, 4), 0),
            s.SetHierarchy(periods={"2": 4, "4": 4}),
            "grow with the group size",
        ),
        (cs.hierarchical_state((2, 8), (2, 4), 0), s.SetPeriod(period=2), "larger than the next level"),
        (cs.periodic_state(4, 0), s.SetAutotune(enabled=True), "does not carry out"),
    ],
)
def test_invalid_commands_are_rejected_with_a_reason(state, command, reason):
    with pytest.raises(cs.CommandRejected, match=reason):
        cs.apply_command(state, command, step=3)


def test_set_hierarchy_and_view():
    state = cs.apply_command(cs.hierarchical_state((2, 8), (2, 4), 1), s.SetHierarchy(periods={"2": 3, "4": 12}), 5)
    view = cs.to_view(state)
    assert view.hierarchy == {"2": 3, "4": 12} and view.period == 12 and view.version == 1


def test_encode_decode_round_trip():
    state = cs.hierarchical_state((2, 8), (2, 4), 3)
    for command in (s.PauseTraining(), s.SetHierarchy(periods={"2": 5, "4": 9}), s.AverageNow()):
        state = cs.apply_command(state, command, 7)
    assert cs.decode(cs.encode(state), cs.hierarchical_state((2, 8), (2, 4), 3)) == state
    assert len(cs.encode(state)) == cs.encoded_size(2)


def test_a_checkpointed_state_comes_back_equal_tuples_and_all():
    state = cs.hierarchical_state((2, 8), (2, 4), 3)
    saved = json.loads(json.dumps(dataclasses.asdict(state)))  # as a checkpoint holds it: lists
    assert cs.from_dict(saved) == state


def test_the_hello_config_names_the_kind_and_group_sizes():
    assert cs.to_config(cs.periodic_state(4, 1)).model_dump() == {
        "kind": "periodic",
        "period": 4,
        "warmup_steps": 1,
        "group_sizes": None,
    }
    hierarchical = cs.to_config(cs.hierarchical_state((2, 8), (2, 4), 0))
    assert (hierarchical.kind, hierarchical.period, hierarchical.group_sizes) == ("hierarchical", 8, [2, 4])

"""Control state and the averaging schedule: pure functions, no processes, no torch.

Every rank holds an identical ``ControlState``; the schedule is a function of ``(state, step)`` so all
ranks know where collectives happen without talking.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from typing import Any

from avgctl.protocol import (
    AverageNow,
    AveragerConfig,
    ControlView,
    PauseAveraging,
    PauseTraining,
    ResumeAveraging,
    ResumeTraining,
    SetHierarchy,
    SetOuterLr,
    SetPeriod,
    WorkerCommand,
)
from avgctl.protocol.commands import NOT_DILOCO
from avgctl.protocol.hierarchy import InvalidHierarchy, hierarchy_periods


class CommandRejected(ValueError):
    """A command that cannot be applied to the current state; nothing was changed."""


@dataclass(frozen=True, slots=True)
class ControlState:
    """What decides, at each step, whether ranks average.

    ``periods`` has one entry per level: a periodic averager has one level (the whole group); a
    hierarchical one has one per group size in ``group_sizes`` (ascending, the last is the world).
    """

    periods: tuple[int, ...]
    warmup_steps: int
    anchor: int
    group_sizes: tuple[int, ...] | None = None
    averaging_paused: bool = False
    training_paused: bool = False
    average_now: bool = False
    version: int = 0
    diloco: bool = False
    """A DiLoCo averager: rounds are outer optimizer steps, ``set_outer_lr`` applies."""
    outer_lr: float | None = None
    """The outer lr every rank sets once a ``set_outer_lr`` applied (None: the optimizer's own)."""

    def __post_init__(self) -> None:
        if not self.periods or min(self.periods) < 1:
            raise ValueError(f"periods must be positive, got {self.periods}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be a non-negative number")
        if self.group_sizes is not None and len(self.group_sizes) != len(self.periods):
            raise ValueError("one period per group size")

    @property
    def period(self) -> int:
        """The period of the top level (the whole process group)."""
        return self.periods[-1]

    @property
    def hierarchical(self) -> bool:
        return self.group_sizes is not None


def periodic_state(period: int, warmup_steps: int) -> ControlState:
    """Torch's ``PeriodicModelAverager`` anchors its grid at the end of warm-up."""
    return ControlState(periods=(period,), warmup_steps=warmup_steps, anchor=warmup_steps)


def diloco_state(period: int, warmup_steps: int) -> ControlState:
    """DiLoCo's rounds fall where ``PeriodicModelAverager``'s do; ``set_outer_lr`` applies to it."""
    return ControlState(periods=(period,), warmup_steps=warmup_steps, anchor=warmup_steps, diloco=True)


def hierarchical_state(periods: tuple[int, ...], group_sizes: tuple[int, ...], warmup_steps: int) -> ControlState:
    """Torch's ``HierarchicalModelAverager`` anchors its grid at step 0 (``step % period``)."""
    return ControlState(periods=periods, warmup_steps=warmup_steps, anchor=0, group_sizes=group_sizes)


_CANONICAL_HORIZON = 1 << 20
"""Steps over which two hierarchies are compared (one whole cycle of their periods must fit)."""


def canonical_hierarchy(periods: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The same schedule as torch's ``{period: group_size}`` levels, with one level per group size.

    torch accepts a group size on several levels (``{2: 4, 4: 4}``); ``set_hierarchy`` and the
    dashboard address a level by its group size, so such levels are merged by dropping those whose
    rounds another level of the same size already takes: the same steps, the same groups, so the
    same values. Raises ``ValueError`` when no such merge keeps the schedule.
    """
    levels = list(zip(periods, sizes))
    if len(set(sizes)) == len(sizes):
        return periods, sizes
    cycle = math.lcm(*periods)
    if cycle > _CANONICAL_HORIZON:
        raise ValueError(f"cannot compare hierarchies whose periods repeat only every {cycle} steps")
    target = _schedule(levels, cycle)
    while len({size for _, size in levels}) != len(levels):
        repeated = [i for i, (_, size) in enumerate(levels) if [s for _, s in levels].count(size) > 1]
        for i in repeated:
            candidate = levels[:i] + levels[i + 1 :]
            if _schedule(candidate, cycle) == target:
                levels = candidate
                break
        else:
            raise ValueError(
                f"the hierarchy {dict(zip(periods, sizes))} (period: group size) averages one group size at "
                "several periods that no single period reproduces; avgctl needs one period per group size"
            )
    return tuple(p for p, _ in levels), tuple(s for _, s in levels)


def _schedule(levels: list[tuple[int, int]], cycle: int) -> list[int]:
    """The group size that averages at each step of one cycle (0: none), by torch's rule."""
    out = [0] * cycle
    for period, size in levels:  # later levels win, as torch searches them from the last
        out[::period] = [size] * len(range(0, cycle, period))
    return out


def round_level(state: ControlState, step: int) -> int | None:
    """The level that averages at ``step`` (index into ``periods``), or None for no round.

    ``average_now`` averages the whole group. Otherwise, like torch, the largest period that divides
    the distance from the anchor wins, so at most one group averages per step.
    """
    if state.average_now:
        return len(state.periods) - 1
    if state.averaging_paused or step < state.warmup_steps or step < state.anchor:
        return None
    offset = step - state.anchor
    for level in reversed(range(len(state.periods))):
        if offset % state.periods[level] == 0:
            return level
    return None


def needs_exchange(state: ControlState, step: int, last_exchange: int, control_interval: int) -> bool:
    """Control exchanges ride on averaging rounds, plus one every ``control_interval`` idle steps."""
    return round_level(state, step) is not None or step - last_exchange >= control_interval


def apply_command(state: ControlState, command: WorkerCommand, step: int) -> ControlState:
    """The state after ``command`` takes effect at ``step``; raises ``CommandRejected`` with a reason."""
    bump = {"version": state.version + 1}
    if isinstance(command, SetPeriod):
        periods = _checked_top_period(state, command.period)
        return dataclasses.replace(state, periods=periods, anchor=step, **bump)
    if isinstance(command, SetHierarchy):
        periods = _checked_hierarchy(state, command.periods)
        return dataclasses.replace(state, periods=periods, anchor=step, **bump)
    if isinstance(command, PauseAveraging):
        return dataclasses.replace(state, averaging_paused=True, **bump)
    if isinstance(command, ResumeAveraging):
        return dataclasses.replace(state, averaging_paused=False, anchor=step, **bump)
    if isinstance(command, PauseTraining):
        return dataclasses.replace(state, training_paused=True, **bump)
    if isinstance(command, ResumeTraining):
        return dataclasses.replace(state, training_paused=False, **bump)
    if isinstance(command, AverageNow):
        return dataclasses.replace(state, average_now=True, **bump)
    if isinstance(command, SetOuterLr):
        if not state.diloco:
            raise CommandRejected(NOT_DILOCO)
        if not (math.isfinite(command.lr) and command.lr > 0):
            raise CommandRejected(f"the outer lr must be finite and above 0, got {command.lr!r}")
        return dataclasses.replace(state, outer_lr=float(command.lr), **bump)
    raise CommandRejected(f"the worker does not carry out {getattr(command, 'type', command)!r} commands")


def _checked_top_period(state: ControlState, period: int) -> tuple[int, ...]:
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise CommandRejected(f"period must be a positive integer, got {period!r}")
    periods = state.periods[:-1] + (period,)
    if len(periods) > 1 and periods[-2] >= period:
        raise CommandRejected(
            f"period {period} must be larger than the next level's period {periods[-2]} "
            "(use set_hierarchy to retune every level)"
        )
    return periods


def _checked_hierarchy(state: ControlState, by_size: dict[str, int]) -> tuple[int, ...]:
    # The rule is the protocol's, so the server refuses (422) exactly what rank 0 would reject.
    try:
        return hierarchy_periods(state.group_sizes, by_size)
    except InvalidHierarchy as err:
        raise CommandRejected(str(err)) from None


def to_view(state: ControlState) -> ControlView:
    """The state as the server and the dashboard show it."""
    hierarchy = None
    if state.group_sizes is not None:
        hierarchy = {str(size): period for size, period in zip(state.group_sizes, state.periods)}
    return ControlView(
        period=state.period,
        warmup_steps=state.warmup_steps,
        averaging_paused=state.averaging_paused,
        training_paused=state.training_paused,
        hierarchy=hierarchy,
        outer_lr=state.outer_lr,
        version=state.version,
    )


def to_config(state: ControlState) -> AveragerConfig:
    """How the averager was built, as a worker's ``hello`` tells the server."""
    return AveragerConfig(
        kind="diloco" if state.diloco else "hierarchical" if state.hierarchical else "periodic",
        period=state.period,
        warmup_steps=state.warmup_steps,
        group_sizes=list(state.group_sizes) if state.group_sizes else None,
    )


def from_dict(saved: dict[str, Any]) -> ControlState:
    """Inverse of ``dataclasses.asdict`` (a checkpoint's lists become the tuples again)."""
    control = dict(saved)
    control["periods"] = tuple(control["periods"])
    if control.get("group_sizes") is not None:
        control["group_sizes"] = tuple(control["group_sizes"])
    return ControlState(**control)


# The exchange vector: fixed fields, then one slot per level period.
_FIELDS = ("version", "warmup_steps", "anchor", "averaging_paused", "training_paused", "average_now")


def encode(state: ControlState) -> list[float]:
    """Numbers rank 0 broadcasts; exact in float64 for any value below 2**53. Every one is an
    integer (a tail carries integers only): the outer lr travels as the two halves of its bits."""
    lr_bits = struct.unpack("<Q", struct.pack("<d", state.outer_lr or 0.0))[0]
    fields = [float(getattr(state, name)) for name in _FIELDS]
    return fields + [float(lr_bits >> 32), float(lr_bits & 0xFFFFFFFF)] + [float(p) for p in state.periods]


def encoded_size(levels: int) -> int:
    """Length of ``encode``'s vector for a state with ``levels`` periods."""
    return len(_FIELDS) + 2 + levels


def decode(values: list[float], template: ControlState) -> ControlState:
    """Inverse of ``encode``; group sizes come from the template (they never change)."""
    fields = dict(zip(_FIELDS, values))
    high, low = (int(v) for v in values[len(_FIELDS) : len(_FIELDS) + 2])
    outer_lr = struct.unpack("<d", struct.pack("<Q", (high << 32) | low))[0]
    periods = tuple(int(v) for v in values[len(_FIELDS) + 2 :])
    return dataclasses.replace(
        template,
        version=int(fields["version"]),
        warmup_steps=int(fields["warmup_steps"]),
        anchor=int(fields["anchor"]),
        averaging_paused=bool(fields["averaging_paused"]),
        training_paused=bool(fields["training_paused"]),
        average_now=bool(fields["average_now"]),
        outer_lr=outer_lr or None,
        periods=periods,
    )

"""Drop-in model averagers: torch's schedule and values, an in-place fast path, metrics, live control.

``PeriodicAverager`` and ``HierarchicalAverager`` subclass torch's ``ModelAverager`` and take the same
constructor arguments as ``PeriodicModelAverager`` and ``HierarchicalModelAverager``, so they work
inside ``PostLocalSGDOptimizer`` and with the ``post_localSGD_hook`` recipe unchanged. What they share
is ``LiveAverager`` (``worker/base.py``); here they only check torch's arguments and build the groups.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch.distributed as dist

from avgctl.worker import control_state
from avgctl.worker.base import LiveAverager
from avgctl.worker.options import AveragerOptions
from avgctl.worker.recorder import AveragerMetrics, MetricsListener

__all__ = [
    "AveragerMetrics",
    "AveragerOptions",
    "HierarchicalAverager",
    "LiveAverager",
    "MetricsListener",
    "PeriodicAverager",
]


def _warn_period_one(when: str) -> None:
    """torch's own warning, word for word, for a period that only duplicates DDP's all-reduce."""
    warnings.warn(
        f"{when} no need to use model averaging because the communication cost "
        "of all-reducing parameters will be no less than the cost of all-reducing gradients "
        "by DistributedDataParallel in the backward pass. Therefore, only "
        "DistributedDataParallel should be used for this case.",
        stacklevel=3,
    )


_EXTRAS_DOC = """
    Keyword-only options (not in torch), the fields of ``AveragerOptions`` with its defaults:
        exact_divergence: measure divergence on every coordinate instead of a stratified sample.
        sample_size: coordinates sampled for divergence; drift reads at most 2,048.
        control_interval: most steps without a control exchange when no round happens.
        poll_interval: seconds rank 0 waits for a command between exchanges while training is held.
        drift_every: compute the drift since the last round every this many steps.
"""


class PeriodicAverager(LiveAverager):
    __doc__ = (
        """Averages parameters every ``period`` steps after ``warmup_steps``, like torch's
    ``PeriodicModelAverager`` (same rounds, same values), with live control and divergence metrics.

    Args:
        period: steps per averaging round.
        warmup_steps: steps before the first round; rounds fall on ``warmup_steps + k * period``.
        process_group: the group to average over (default: the world).
"""
        + _EXTRAS_DOC
    )

    def __init__(
        self,
        period: int,
        warmup_steps: int = 0,
        process_group: dist.ProcessGroup | None = None,
        **options: Any,
    ):
        settings = AveragerOptions(**options)
        if warmup_steps < 0:
            raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")
        if period < 1:
            raise ValueError("Arg ``period`` must be a positive value.")
        if period == 1:
            _warn_period_one("When period is 1,")
        group = process_group if process_group is not None else dist.group.WORLD
        super().__init__(
            control_state.periodic_state(period, warmup_steps),
            process_group,
            [group],
            settings,
        )


class HierarchicalAverager(LiveAverager):
    __doc__ = (
        """Hierarchical averaging like torch's ``HierarchicalModelAverager``: groups of each size
    average every period in ``period_group_size_dict`` (``{period: group_size}``); at a step several
    periods divide, only the largest period's group averages. Like torch, the grid is anchored at
    step 0 (``step % period``), not at the end of warm-up.

    Group sizes are fixed here; ``set_hierarchy`` commands retune their periods. Mind the
    orientation: set_hierarchy takes {group_size: period}, while torch's HierarchicalModelAverager
    takes {period: group_size} (as this constructor does).

    Args:
        period_group_size_dict: ordered ``{period: group_size}``; the last size is the whole group's.
        warmup_steps: steps before the first round.
        process_group: the group to average over (default: the world).
"""
        + _EXTRAS_DOC
    )

    def __init__(
        self,
        period_group_size_dict: dict[int, int] | None = None,
        warmup_steps: int = 0,
        process_group: dist.ProcessGroup | None = None,
        **options: Any,
    ):
        settings = AveragerOptions(**options)
        if not period_group_size_dict:
            raise ValueError("Arg ``period_group_size_dict`` must not be empty.")
        periods = list(period_group_size_dict.keys())
        sizes = list(period_group_size_dict.values())
        if periods[0] <= 0:
            raise ValueError("The minimum period in arg ``period_group_size_dict`` must be a positive value.")
        if periods[-1] == 1:
            _warn_period_one("When the maximum period in arg ``period_group_size_dict`` is 1,")
        group = process_group if process_group is not None else dist.group.WORLD
        overall = dist.get_world_size(group=group)
        if sizes[-1] != overall:
            raise ValueError(
                f"The last value in arg ``period_group_size_dict`` {sizes[-1]} "
                f"must be equal to the size of arg ``process_group`` {overall}."
            )
        canonical = control_state.canonical_hierarchy(tuple(periods), tuple(sizes))
        if canonical != (tuple(periods), tuple(sizes)):
            warnings.warn(
                f"avgctl: {dict(period_group_size_dict)} repeats a group size; averaging as "
                f"{dict(zip(*canonical))} (the same steps and groups), one period per group size, "
                "which set_hierarchy can address",
                stacklevel=2,
            )
            periods, sizes = list(canonical[0]), list(canonical[1])
        if warmup_steps < 0:
            raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")
        # The same subgroup calls as torch, in the same order, so ranks build identical groups.
        level_groups = []
        for size in sizes:
            if size != overall:
                subgroup, _ = dist.new_subgroups(group_size=size, group=group)
                level_groups.append(subgroup)
            else:
                level_groups.append(group)
        super().__init__(
            control_state.hierarchical_state(tuple(periods), tuple(sizes), warmup_steps),
            process_group,
            level_groups,
            settings,
        )

    @property
    def period_process_group_dict(self) -> OrderedDict[int, dist.ProcessGroup]:
        """torch's attribute: ``{period: process group}`` per level, with the live periods."""
        return OrderedDict(zip(self._state.periods, self._level_groups))

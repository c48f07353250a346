"""Drop-in model averagers: torch's schedule and values, an in-place fast path, metrics, live control.

``PeriodicAverager`` and ``HierarchicalAverager`` subclass torch's ``ModelAverager`` and take the same
constructor arguments as ``PeriodicModelAverager`` and ``HierarchicalModelAverager``, so they work
inside ``PostLocalSGDOptimizer`` and with the ``post_localSGD_hook`` recipe unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging import utils as torch_utils
from torch.distributed.algorithms.model_averaging.averagers import ModelAverager

from avgctl.protocol import AveragerConfig, ControlEvent, ControlView, RoundRecord, StepRecord
from avgctl.worker import control_state as cs
from avgctl.worker import divergence as dv
from avgctl.worker.control import ControlExchange, ControlSource, PendingExchange
from avgctl.worker.flat import FlatParams, fallback_reason, layout_fingerprint
from avgctl.worker.pair import PairAllReduce, pair_eligible

log = logging.getLogger(__name__)

DRIFT_SAMPLE_SIZE = 2048
"""Coordinates read every step for the drift (about 1.6% standard error for Gaussian-like moves)."""
MAX_SCALARS = 32
"""User figures per step (``StepRecord.scalars``)."""

Params = Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]


class MetricsListener(Protocol):
    """Receives metrics on the training thread: implementations must return at once."""

    def on_step(self, record: StepRecord) -> None: ...
    def on_round(self, record: RoundRecord) -> None: ...
    def on_control(self, event: ControlEvent) -> None: ...


@dataclass(slots=True)
class AveragerMetrics:
    """The latest figures, for code that wants them without a server."""

    rounds: int = 0
    bytes_moved: int = 0
    averaging_seconds: float = 0.0
    fallback_reason: str | None = None
    """Why torch's own averaging path is used instead of the flat buffer (None on the fast path)."""
    listener_errors: int = 0
    # The latest records, or their fields until someone asks: with no listener attached, building
    # pydantic objects every step would be most of what the metrics cost. The averager computed
    # every field, so the records skip validation.
    _step: StepRecord | dict | None = None
    _round: RoundRecord | dict | None = None

    @property
    def last_step(self) -> StepRecord | None:
        if isinstance(self._step, dict):
            self._step = StepRecord.model_construct(**self._step)
        return self._step

    @property
    def last_round(self) -> RoundRecord | None:
        if isinstance(self._round, dict):
            self._round = RoundRecord.model_construct(**self._round)
        return self._round


@dataclass(slots=True)
class _Layout:
    """What the current parameter set needs: its flat buffer (or None), sample plan and names."""

    params: list[torch.nn.Parameter]
    flat: FlatParams | None
    plan: dv.SamplePlan
    drift_plan: dv.DriftPlan  # a smaller, uniform sample: drift is read every step
    names: list[str]
    fingerprint: int
    ids: tuple[int, ...] = field(default=())
    pairs: dict[int, PairAllReduce | None] = field(default_factory=dict)
    """Per level: the one-exchange all-reduce for two-rank groups (None: use ``dist.all_reduce``)."""
    agreed: bool = False
    """Every rank confirmed the same layout at a waited-for exchange: rounds may skip the pre-check."""


@dataclass(slots=True)
class _RoundDraft:
    """A round's local figures, waiting for the group's: they ride on the exchange that follows."""

    step: int
    group_size: int
    seconds: float
    moved: int
    exact: bool
    top_layers: list[tuple[str, float]]


class _LiveAverager(ModelAverager):
    """The machinery both public averagers share; subclasses only build the initial control state."""

    def __init__(
        self,
        state: cs.ControlState,
        process_group: dist.ProcessGroup | None,
        level_groups: list[dist.ProcessGroup],
        *,
        exact_divergence: bool,
        sample_size: int,
        control_interval: int,
        poll_interval: float,
        drift_every: int,
    ):
        super().__init__(process_group)
        if control_interval < 1:
            raise ValueError("Arg ``control_interval`` must be a positive number of steps.")
        if sample_size < 1:
            raise ValueError("Arg ``sample_size`` must be positive.")
        self._state = state
        self._level_groups = level_groups
        self._level_sizes = [dist.get_world_size(g) for g in level_groups]
        self.exact_divergence = exact_divergence
        self.sample_size = sample_size
        self.control_interval = control_interval
        self.poll_interval = poll_interval
        self.drift_every = drift_every
        self.rank = dist.get_rank(self.process_group)
        self.world_size = dist.get_world_size(self.process_group)
        self._metrics = AveragerMetrics()
        self._exchange = ControlExchange(self.process_group, levels=len(state.periods))
        self._last_exchange = 0
        self._layout: _Layout | None = None
        self._last_average: torch.Tensor | None = None  # drift-plan coordinates right after the last round
        self._listeners: list[MetricsListener] = []
        self._names_by_id: dict[int, str] = {}
        self._pending_scalars: dict[str, float] = {}
        self._pending_loss: float | None = None
        self._last_call_end: float | None = None
        self._pending: tuple[PendingExchange, _RoundDraft | None] | None = None
        self._in_call = False
        self._owner = threading.get_ident()

    # ------------------------------------------------------------------ public API

    @property
    def control(self) -> cs.ControlState:
        """The live control state (identical on every rank)."""
        return self._state

    @property
    def metrics(self) -> AveragerMetrics:
        """The latest figures. Read on the training thread, it first collects the last round's group figures."""
        if self._pending is not None and not self._in_call and threading.get_ident() == self._owner:
            self._settle(self.step)
        return self._metrics

    def average_parameters(self, params: Params) -> None:
        """Average when the schedule says so, apply agreed commands, then count the step.

        Call once per training step on every rank, after ``optimizer.step()`` (as with torch's averagers).
        """
        step = self.step
        started = time.perf_counter()
        step_time = None if self._last_call_end is None else started - self._last_call_end
        self._in_call = True
        try:
            self._settle(step)
            state = self._state
            plist = None
            averaged = False
            if cs.needs_exchange(state, step, self._last_exchange, self.control_interval):
                plist = torch_utils.get_params_to_average(params)
                level = cs.round_level(state, step)
                if level is not None and self._fast_path_ready():
                    self._fast_round(plist, level, step)
                    averaged = True
                else:
                    layout = self._layout_for(plist)
                    state = self._agree(state, step, layout)
                    level = cs.round_level(state, step)
                    if level is not None:
                        self._round(layout, level, step)
                        averaged = True
            self._emit_step(step, step_time, averaged)
            if self._state.training_paused:
                self._hold(plist if plist is not None else torch_utils.get_params_to_average(params), step)
            self.step += 1
        finally:
            self._in_call = False
        self._last_call_end = time.perf_counter()

    def flush(self) -> None:
        """Wait for the exchange that follows the last round: its group figures and command acks.

        Rounds report their group figures (divergence mean and max) one step late, when the next
        step collects the exchange; call this once after the training loop so the last round's
        figures reach ``metrics`` and the listeners too. Every rank already started that exchange, so
        ranks need not call this together.
        """
        if self._in_call:
            raise RuntimeError("flush() cannot be called from inside average_parameters (a listener)")
        self._settle(self.step)

    def record(self, loss: float | None = None, **scalars: float) -> None:
        """Attach figures (the loss, accuracy...) to this step's metrics; call before ``average_parameters``."""
        if loss is not None:
            self._pending_loss = float(loss)
        self._pending_scalars.update({str(k): float(v) for k, v in scalars.items()})
        if len(self._pending_scalars) > MAX_SCALARS:
            raise ValueError(f"at most {MAX_SCALARS} scalars per step, got {sorted(self._pending_scalars)}")

    def name_parameters(self, model: torch.nn.Module) -> None:
        """Use the model's parameter names in per-layer divergence reports."""
        self._names_by_id = {id(p): name for name, p in model.named_parameters()}
        self._layout = None

    def add_listener(self, listener: MetricsListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: MetricsListener) -> None:
        self._listeners.remove(listener)

    def set_control_source(self, source: ControlSource | None) -> None:
        """Where rank 0 takes commands from; other ranks follow rank 0 and ignore theirs."""
        self._exchange.source = source

    def hello_config(self) -> AveragerConfig:
        state = self._state
        return AveragerConfig(
            kind="hierarchical" if state.hierarchical else "periodic",
            period=state.period,
            warmup_steps=state.warmup_steps,
            group_sizes=list(state.group_sizes) if state.group_sizes else None,
        )

    def control_view(self) -> ControlView:
        return cs.to_view(self._state)

    def state_dict(self) -> dict[str, Any]:
        """The step and the live control state, for checkpoints (each rank saves its own)."""
        if not self._in_call:
            self._settle(self.step)
        return {
            "step": self.step,
            "control": dataclasses.asdict(self._state),
            "last_exchange": self._last_exchange,
            "exchange": self._exchange.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        control = dict(state_dict["control"])
        control["periods"] = tuple(control["periods"])
        if control.get("group_sizes") is not None:
            control["group_sizes"] = tuple(control["group_sizes"])
        loaded = cs.ControlState(**control)
        if loaded.group_sizes != self._state.group_sizes or len(loaded.periods) != len(self._state.periods):
            raise ValueError("checkpoint was saved by an averager with a different hierarchy")
        self.step = int(state_dict["step"])
        self._state = loaded
        self._last_exchange = int(state_dict.get("last_exchange", self.step))
        self._exchange.load_state_dict(state_dict.get("exchange", {}))
        self._last_average = None
        self._pending = None

    # ------------------------------------------------------------------ internals

    def _layout_for(self, params: list[torch.nn.Parameter]) -> _Layout:
        """Reuse the flat buffer while the parameter set is unchanged; rebuild it when it changes."""
        layout = self._layout
        ids = tuple(id(p) for p in params)
        if layout is not None and layout.ids == ids:
            if layout.flat is None or layout.flat.still_views():
                return layout
        reason = fallback_reason(params)
        flat = FlatParams(params, tail=self._tail_size(params)) if reason is None else None
        if reason is not None and reason != self._metrics.fallback_reason:
            log.warning("avgctl: averaging with torch's path (%s)", reason)
        self._metrics.fallback_reason = reason
        numels = [p.numel() for p in params]
        self._layout = _Layout(
            params=list(params),
            flat=flat,
            plan=dv.make_plan(numels, None if self.exact_divergence else self.sample_size),
            drift_plan=dv.make_drift_plan(numels, min(self.sample_size, DRIFT_SAMPLE_SIZE)),
            names=[self._names_by_id.get(id(p), f"param{i}{list(p.shape)}") for i, p in enumerate(params)],
            fingerprint=flat.fingerprint if flat else layout_fingerprint(params),
            ids=ids,
        )
        self._last_average = None
        return self._layout

    def _agree(self, state: cs.ControlState, step: int, layout: _Layout) -> cs.ControlState:
        """A waited-for exchange at ``step``: needed before the first round and after a layout change."""
        new_state = self._exchange.exchange(state, step, layout.fingerprint)
        layout.agreed = True
        self._last_exchange = step
        self._state = new_state
        if new_state.version != state.version:
            self._emit("on_control", ControlEvent(step=step, control=self.control_view()))
        return new_state

    def _settle(self, step: int) -> None:
        """Collect the exchange started after the last round; its state governs from ``step`` on."""
        if self._pending is None:
            return
        pending, draft = self._pending
        self._pending = None
        old = self._state
        result = self._exchange.finish(pending, old, step)
        self._state = result.state
        self._last_exchange = step
        if result.layout_changed:  # every rank's new set agrees: rebuild at the next exchange
            self._layout = None
            self._last_average = None
        if draft is not None and result.stats is not None:
            self._report_round(draft, result.stats)
        if result.state.version != old.version:
            self._emit("on_control", ControlEvent(step=step, control=self.control_view()))

    def _fast_path_ready(self) -> bool:
        layout = self._layout
        return layout is not None and layout.flat is not None and layout.agreed

    def _fast_round(self, params: list[torch.nn.Parameter], level: int, step: int) -> None:
        """A round on the agreed flat buffer, its checks riding on the exchange that follows.

        A rank whose parameter set changed still averages the agreed set (its old parameters' live
        values), so the all-reduce sizes match on every rank; the exchange then tells every rank, which
        either agree on the new set (rebuilt at the next exchange) or all fail with a clear error.
        """
        layout = self._layout
        assert layout is not None and layout.flat is not None
        views = layout.flat.readopt()  # parameters re-pointed elsewhere come back, values and all
        if views and layout.ids == tuple(id(p) for p in params):
            self._round(layout, level, step)
        else:
            self._round(layout, level, step, changed_to=layout_fingerprint(params))

    def _samples(self, layout: _Layout, plan: dv.SamplePlan) -> torch.Tensor:
        if layout.flat is not None:
            return dv.gather(layout.flat.buffer, plan)
        return dv.gather_params(layout.params, plan)

    def _tail_size(self, params: list[torch.nn.Parameter]) -> int:
        """Room for the exchange in the averaging buffer: two-rank jobs in float32/float64 only."""
        if self.world_size != 2 or params[0].dtype not in (torch.float32, torch.float64):
            return 0
        return self._exchange.tail_size

    def _drift_sample(self, layout: _Layout) -> torch.Tensor:
        if layout.flat is not None:
            return dv.drift_sample(layout.flat.buffer, layout.drift_plan)
        return dv.drift_sample_params(layout.params, layout.drift_plan)

    def _round(self, layout: _Layout, level: int, step: int, changed_to: int | None = None) -> None:
        """Average over the level's group; the exchange that follows carries commands, checks, figures.

        In a two-rank job it rides in the averaging all-reduce's tail and both ranks' divergences
        are known locally (``theta_0 - theta_bar = -(theta_1 - theta_bar)``): no collective of its own.
        Otherwise it is its own small all-reduce, started without waiting.
        """
        started = time.perf_counter()
        group, size = self._level_groups[level], self._level_sizes[level]
        fingerprint = layout.fingerprint if changed_to is None else changed_to
        if self._state.average_now:
            self._state = dataclasses.replace(self._state, average_now=False)
        in_tail = layout.flat is not None and layout.flat.tail is not None and group is self._level_groups[-1]
        pending = None
        if in_tail:
            pending = self._exchange.start(
                self._state, step, fingerprint, anchor=step, changed=changed_to is not None, tail=layout.flat.tail
            )
        before = self._samples(layout, layout.plan)
        if layout.flat is not None:
            _synchronize_accelerator()
            layout.flat.buffer.div_(size)  # same arithmetic as torch: divide, then all-reduce SUM
            self._all_reduce(layout, level, layout.flat.storage)
            moved = layout.flat.storage.numel() * layout.flat.storage.element_size()
        else:
            torch_utils.average_parameters(iter(layout.params), group)
            moved = sum(p.numel() * p.element_size() for p in layout.params)
        after = self._samples(layout, layout.plan)
        mine = dv.rank_divergence(before, after, layout.plan)
        self._last_average = self._drift_sample(layout)
        seconds = time.perf_counter() - started
        metrics = self._metrics
        metrics.rounds += 1
        metrics.bytes_moved += moved
        metrics.averaging_seconds += seconds
        draft = _RoundDraft(step, size, seconds, moved, layout.plan.exact, dv.top_layers(mine.per_layer, layout.names))
        if pending is not None:
            pending.payload = pending.payload.clone()  # the tail as reduced; the buffer is reused next round
            self._report_round(draft, [mine.squared] * 2 + [mine.mean_norm_squared] * 2)
            self._pending = (pending, None)
        else:
            pending = self._exchange.start(
                self._state,
                step,
                fingerprint,
                anchor=step,  # a period set here restarts its grid at this round, not one step later
                changed=changed_to is not None,
                stats=(mine.squared, mine.mean_norm_squared),
            )
            self._pending = (pending, draft)
        self._last_exchange = step

    def _all_reduce(self, layout: _Layout, level: int, storage: torch.Tensor) -> None:
        if level not in layout.pairs:
            group = self._level_groups[level]
            layout.pairs[level] = PairAllReduce(group, storage) if pair_eligible(group, storage) else None
        pair = layout.pairs[level]
        if pair is not None:
            pair(storage)
        else:
            dist.all_reduce(storage, group=self._level_groups[level])

    def _report_round(self, draft: _RoundDraft, stats: list[float]) -> None:
        world = self.world_size
        group_div = dv.group_divergence(stats[:world], stats[world:])
        fields = dict(
            step=draft.step,
            group_size=draft.group_size,
            divergence=group_div.per_rank[self.rank],
            relative_divergence=group_div.relative_per_rank[self.rank],
            divergence_mean=group_div.mean,
            divergence_max=group_div.max,
            relative_mean=group_div.relative_mean,
            relative_max=group_div.relative_max,
            seconds=draft.seconds,
            bytes=draft.moved,
            exact=draft.exact,
            top_layers=draft.top_layers,
        )
        self._metrics._round = fields
        if self._listeners:
            self._emit("on_round", self._metrics.last_round)

    def _hold(self, params: list[torch.nn.Parameter], step: int) -> None:
        """Keep every rank at this step until resumed, never sitting in one collective for long.

        Rank 0 waits on its source for at most ``poll_interval`` seconds between exchanges, so the
        others wait inside the exchange's all-reduce for about that long: far below any
        process-group timeout, however long the hold lasts.
        """
        top = len(self._state.periods) - 1
        while True:
            try:
                self._settle(step)  # commands that arrive during a hold apply at the held step
                if not self._state.training_paused:
                    return
                source = self._exchange.source
                if self._exchange.is_leader:
                    if source is not None:
                        source.wait(self.poll_interval)
                    else:
                        time.sleep(self.poll_interval)  # nothing can resume us but a loaded checkpoint's caller
                layout = self._layout_for(params)
                state = self._agree(self._state, step, layout)
                if state.average_now:
                    self._round(layout, top, step)
            except RuntimeError as err:
                raise RuntimeError(
                    f"avgctl: the process group failed while training was held at step {step} "
                    f"(a rank probably died); restart the job from a checkpoint. Cause: {err}"
                ) from err

    def _emit_step(self, step: int, step_time: float | None, averaged: bool = False) -> None:
        drift = None
        layout = self._layout
        if averaged:
            drift = 0.0  # nothing moved since the round that just ended
        elif self._last_average is not None and layout is not None and step % self.drift_every == 0:
            drift = dv.drift(self._drift_sample(layout), self._last_average, layout.drift_plan)
        fields = dict(
            step=step,
            time=time.time(),
            step_time=step_time,
            drift=drift,
            loss=self._pending_loss,
            scalars=self._pending_scalars,
        )
        self._pending_loss, self._pending_scalars = None, {}
        self._metrics._step = fields
        if self._listeners:
            self._emit("on_step", self._metrics.last_step)

    def _emit(self, method: str, record: Any) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, method)(record)
            except Exception:  # a broken listener must never stop training
                self._metrics.listener_errors += 1
                if self._metrics.listener_errors == 1:
                    log.exception("avgctl: metrics listener failed; training goes on")


def _warn_period_one(when: str) -> None:
    """torch's own warning, word for word, for a period that only duplicates DDP's all-reduce."""
    warnings.warn(
        f"{when} no need to use model averaging because the communication cost "
        "of all-reducing parameters will be no less than the cost of all-reducing gradients "
        "by DistributedDataParallel in the backward pass. Therefore, only "
        "DistributedDataParallel should be used for this case.",
        stacklevel=3,
    )


def _synchronize_accelerator() -> None:
    """torch synchronizes before its all-reduce so it cannot overlap other process groups' work."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        accelerator.synchronize()
    elif torch.cuda.is_available():
        torch.cuda.synchronize()


_EXTRAS_DOC = """
    Extra keyword-only arguments (not in torch):
        exact_divergence: measure divergence on every coordinate (a float64 copy of the parameters
            per round) instead of the default stratified sample.
        sample_size: coordinates sampled for divergence (default 16,384); drift reads at most 2,048.
        control_interval: at most this many steps pass without a control exchange when no averaging
            round happens (warm-up, paused averaging, long periods). Default 16.
        poll_interval: seconds rank 0 waits for a command between exchanges while training is held.
        drift_every: compute the drift since the last round every this many steps (default 4: a
            dashboard curve needs no more, and it keeps the per-step cost near zero).
"""


class PeriodicAverager(_LiveAverager):
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
        *,
        exact_divergence: bool = False,
        sample_size: int = 16384,
        control_interval: int = 16,
        poll_interval: float = 0.2,
        drift_every: int = 4,
    ):
        if warmup_steps < 0:
            raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")
        if period < 1:
            raise ValueError("Arg ``period`` must be a positive value.")
        if period == 1:
            _warn_period_one("When period is 1,")
        group = process_group if process_group is not None else dist.group.WORLD
        super().__init__(
            cs.periodic_state(period, warmup_steps),
            process_group,
            [group],
            exact_divergence=exact_divergence,
            sample_size=sample_size,
            control_interval=control_interval,
            poll_interval=poll_interval,
            drift_every=drift_every,
        )

    @property
    def period(self) -> int:
        return self._state.period

    @property
    def warmup_steps(self) -> int:
        return self._state.warmup_steps


class HierarchicalAverager(_LiveAverager):
    __doc__ = (
        """Hierarchical averaging like torch's ``HierarchicalModelAverager``: groups of each size
    average every period in ``period_group_size_dict`` (``{period: group_size}``); at a step several
    periods divide, only the largest period's group averages. Like torch, the grid is anchored at
    step 0 (``step % period``), not at the end of warm-up.

    Group sizes are fixed here; ``set_hierarchy`` commands retune their periods.

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
        *,
        exact_divergence: bool = False,
        sample_size: int = 16384,
        control_interval: int = 16,
        poll_interval: float = 0.2,
        drift_every: int = 4,
    ):
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
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"Group sizes in ``period_group_size_dict`` must differ, got {sizes}.")
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
        self.period_process_group_dict = OrderedDict(zip(periods, level_groups))
        super().__init__(
            cs.hierarchical_state(tuple(periods), tuple(sizes), warmup_steps),
            process_group,
            level_groups,
            exact_divergence=exact_divergence,
            sample_size=sample_size,
            control_interval=control_interval,
            poll_interval=poll_interval,
            drift_every=drift_every,
        )

    @property
    def warmup_steps(self) -> int:
        return self._state.warmup_steps

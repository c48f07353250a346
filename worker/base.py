"""``LiveAverager``: the schedule and rounds both public averagers share, with live control.

It decides at each step whether ranks exchange control or average, runs the round on the current
``Layout``, and leaves figures to its ``Recorder`` and agreement on commands to its ``ControlExchange``.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging import utils as torch_utils
from torch.distributed.algorithms.model_averaging.averagers import ModelAverager

from avgctl.protocol import AveragerConfig, ControlView
from avgctl.worker import control_state, divergence
from avgctl.worker.control import ControlExchange, ControlSource, PendingExchange
from avgctl.worker.control_state import ControlState
from avgctl.worker.device import RoundClock, control_group, read_at_sync_point
from avgctl.worker.flat import layout_fingerprint
from avgctl.worker.layout import Layout, average_in, build_layout
from avgctl.worker.options import AveragerOptions
from avgctl.worker.recorder import AveragerMetrics, MetricsListener, Recorder, RoundDraft

Params = Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]
_TAGS = 1 << 20
"""Distinct tags a changed parameter set gets in a two-rank tail (exact in float32)."""


class LiveAverager(ModelAverager):
    """torch's averaging schedule and values, in place on a flat buffer, with metrics and live control.

    Subclasses give the initial control state and one process group per level. A subclass whose
    round goes on after the mean (an outer optimizer step) overrides ``_after_mean``.

    Args:
        state: the initial control state (periods, warm-up, hierarchy).
        process_group: the group the averager belongs to (None: the world).
        level_groups: per level of ``state.periods``, the group that averages at that level.
        options: measurement and control options.
    """

    def __init__(
        self,
        state: ControlState,
        process_group: dist.ProcessGroup | None,
        level_groups: list[dist.ProcessGroup],
        options: AveragerOptions,
    ):
        super().__init__(process_group)
        self.options = options
        self._state = state
        self._level_groups = level_groups
        self._level_sizes = [dist.get_world_size(g) for g in level_groups]
        self.rank = dist.get_rank(self.process_group)
        self.world_size = dist.get_world_size(self.process_group)
        self._recorder = Recorder(self.rank, self.world_size)
        group, device = control_group(self.process_group)
        self._exchange = ControlExchange(group, levels=len(state.periods), device=device)
        self._last_exchange = 0
        self._layout: Layout | None = None
        self._last_average: torch.Tensor | None = None  # drift-plan coordinates right after the last round
        self._names_by_id: dict[int, str] = {}
        self._last_call_end: float | None = None
        self._pending: tuple[PendingExchange, RoundDraft | None] | None = None
        self._in_call = False
        self._owner = threading.get_ident()
        self.job_secret: str | None = None
        """The secret the job's ranks share (set by ``connect()``, kept in ``state_dict()``): what
        proves to the server that this process is one of the job's ranks."""

    # ------------------------------------------------------------------ public API

    @property
    def period(self) -> int:
        """The live period of the top level (torch's ``PeriodicModelAverager.period``)."""
        return self._state.period

    @property
    def warmup_steps(self) -> int:
        """torch's attribute: steps before the first round."""
        return self._state.warmup_steps

    @property
    def control(self) -> ControlState:
        """The live control state (identical on every rank)."""
        return self._state

    @property
    def metrics(self) -> AveragerMetrics:
        """The latest figures. Read on the training thread, it first collects the last round's group figures."""
        if self._pending is not None and not self._in_call and threading.get_ident() == self._owner:
            self._settle(self.step)
        return self._recorder.metrics

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
            plist = None
            averaged = False
            if control_state.needs_exchange(self._state, step, self._last_exchange, self.options.control_interval):
                plist = torch_utils.get_params_to_average(params)
                averaged = self._exchange_or_round(plist, step)
            self._recorder.step(step, step_time, self._drift(step, averaged))
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
        self._recorder.send_landed(wait=True)

    def record(self, loss: float | torch.Tensor | None = None, **scalars: float | torch.Tensor) -> None:
        """Attach figures (the loss, accuracy...) to this step's metrics; call before ``average_parameters``.

        Pass tensors as they are (``loss=loss``, not ``loss.item()``): they are read once their copy
        to the host has landed, so recording costs no synchronisation on a GPU.
        """
        self._recorder.record(loss, **scalars)

    def name_parameters(self, model: torch.nn.Module) -> None:
        """Use the model's parameter names in per-layer divergence reports."""
        self._names_by_id = {id(p): name for name, p in model.named_parameters()}
        self._layout = None

    def add_listener(self, listener: MetricsListener) -> None:
        """Send every step, round and control record to ``listener`` too (on the training thread)."""
        self._recorder.add_listener(listener)

    def remove_listener(self, listener: MetricsListener) -> None:
        """Stop sending records to ``listener``."""
        self._recorder.remove_listener(listener)

    def set_control_source(self, source: ControlSource | None) -> None:
        """Where rank 0 takes commands from; other ranks follow rank 0 and ignore theirs."""
        self._exchange.source = source

    def hello_config(self) -> AveragerConfig:
        """How this averager was built, as the server's ``hello`` frame carries it."""
        return control_state.to_config(self._state)

    def control_view(self) -> ControlView:
        """The live control state as the server and the dashboard show it."""
        return control_state.to_view(self._state)

    def state_dict(self) -> dict[str, Any]:
        """The step, the live control state and the job's secret, for checkpoints (each rank saves its own)."""
        if not self._in_call:
            self._settle(self.step)
        return {
            "step": self.step,
            "control": dataclasses.asdict(self._state),
            "last_exchange": self._last_exchange,
            "exchange": self._exchange.state_dict(),
            "job_secret": self.job_secret,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict()``'s output; the hierarchy must be the one this averager was built with."""
        loaded = control_state.from_dict(state_dict["control"])
        if loaded.group_sizes != self._state.group_sizes or len(loaded.periods) != len(self._state.periods):
            raise ValueError("checkpoint was saved by an averager with a different hierarchy")
        if loaded.diloco != self._state.diloco:
            raise ValueError("checkpoint was saved by another kind of averager (DiLoCo and plain averaging differ)")
        self.step = int(state_dict["step"])
        self._state = loaded
        self._last_exchange = int(state_dict.get("last_exchange", self.step))
        self._exchange.load_state_dict(state_dict.get("exchange", {}))
        # A job resumed in a new torchrun presents the secret its server knows it by (at the next
        # hello when the link is already running).
        if state_dict.get("job_secret"):
            self.job_secret = str(state_dict["job_secret"])
        self._last_average = None
        self._pending = None

    # ------------------------------------------------------------------ the seam for other rounds

    def _after_mean(self, layout: Layout, level: int, step: int) -> torch.Tensor | None:
        """What a round does once the averaged parameters hold their mean over the level's group:
        nothing here. An averager whose round goes on (DiLoCo's outer optimizer step on the
        pseudo-gradient) overrides it, and may return figures (a 1-d float64 tensor on the
        parameters' device) that the round reads with its own, in one copy."""
        return None

    def _control_changed(self, step: int) -> None:
        """A new control version took effect at ``step`` (the same step on every rank)."""
        self._recorder.control(step, self.control_view())

    def _round_fields(self, figures: list[float]) -> dict[str, float | None]:
        """Round-record fields from ``_after_mean``'s figures, read on the host."""
        return {}

    # ------------------------------------------------------------------ schedule

    def _exchange_or_round(self, params: list[torch.nn.Parameter], step: int) -> bool:
        """At a step that needs an exchange: a round on the agreed buffer, else agree first. True if averaged."""
        level = control_state.round_level(self._state, step)
        if level is not None and self._fast_path_ready():
            self._fast_round(params, level, step)
            return True
        layout = self._layout_for(params)
        state = self._agree(self._state, step, layout)
        level = control_state.round_level(state, step)
        if level is None:
            return False
        self._round(layout, level, step)
        return True

    def _layout_for(self, params: list[torch.nn.Parameter]) -> Layout:
        """Reuse the flat buffer while the parameter set is unchanged; rebuild it when it changes."""
        if self._layout is not None and self._layout.fits(params):
            return self._layout
        layout = build_layout(params, names_by_id=self._names_by_id, options=self.options, tail=self._tail_size(params))
        self._recorder.note_fallback(layout.fallback_reason)
        self._layout = layout
        self._last_average = None
        return layout

    def _tail_size(self, params: list[torch.nn.Parameter]) -> int:
        """Room for the exchange in the averaging buffer: two-rank jobs in float32/float64 only."""
        dtypes = {p.dtype for p in params}
        if self.world_size != 2 or len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.float64):
            return 0
        return self._exchange.tail_size

    def _fast_path_ready(self) -> bool:
        layout = self._layout
        return layout is not None and layout.flat is not None and layout.agreed

    def _agree(self, state: ControlState, step: int, layout: Layout) -> ControlState:
        """A waited-for exchange at ``step``: needed before the first round and after a layout change."""
        new_state = self._exchange.exchange(state, step, layout.fingerprint)
        layout.agreed = True
        self._last_exchange = step
        self._state = new_state
        if new_state.version != state.version:
            self._control_changed(step)
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
            self._recorder.round(draft, result.stats)
        if result.state.version != old.version:
            self._control_changed(step)

    # ------------------------------------------------------------------ rounds

    def _fast_round(self, params: list[torch.nn.Parameter], level: int, step: int) -> None:
        """A round on the agreed flat buffer, taking in a parameter set that changed on every rank alike.

        A set that changed the same way on every rank (a layer unfrozen, a ``.grad`` gone) is
        averaged at this round, as torch averages whatever has a gradient. Ranks whose sets differ
        all average the agreed set (their old parameters' live values), so the all-reduce sizes match;
        the exchange that follows tells every rank, which then agree on the new set at the next
        exchange or all fail with a clear error.
        """
        layout = self._layout
        assert layout is not None and layout.flat is not None
        views = layout.flat.readopt()  # parameters re-pointed elsewhere come back, values and all
        same = views and layout.ids == tuple(id(p) for p in params)
        mine = layout.fingerprint if same else layout_fingerprint(params)
        if self._rides_in_tail(layout, level):
            self._tail_round(layout, params, level, step, None if same else mine)
            return
        # Otherwise the ranks compare their sets first: one tiny all-reduce at the round (a sync point).
        if not self._sets_agree(level, mine, layout.device):
            self._round(layout, level, step, changed_to=None if same else mine)
            return
        if not same:  # every rank's set changed alike: average the new one
            layout = self._layout_for(params)
            layout.agreed = True
        self._round(layout, level, step)

    def _rides_in_tail(self, layout: Layout, level: int) -> bool:
        return layout.tail is not None and self._level_groups[level] is self._level_groups[-1]

    def _tail_round(
        self, layout: Layout, params: list[torch.nn.Parameter], level: int, step: int, changed_to: int | None
    ) -> None:
        """Two ranks: the exchange in the buffer's tail compares the sets after the all-reduce, for free.

        When both changed alike, the round is completed to torch's: parameters that left the set get
        their values from before the round back, those that joined are averaged on their own (with
        two operands a sum has one order, so this equals torch's one all-reduce of the new set).
        """
        if changed_to is None:
            self._round(layout, level, step)
            return
        now = {id(p) for p in params}
        leaving = [(p, p.detach().clone()) for p in layout.params if id(p) not in now]
        joining = [p for p in params if id(p) not in set(layout.ids)]
        self._round(layout, level, step, changed_to=changed_to, changed_tag=1 + layout_fingerprint(joining) % _TAGS)
        pending = self._pending[0] if self._pending is not None else None
        if pending is None or not self._exchange.changed_alike(pending):
            return
        with torch.no_grad():
            for p, before in leaving:
                p.copy_(before)
        group = self._level_groups[level]
        average_in(
            joining, group, self._level_sizes[level], functools.reduce(torch.promote_types, [p.dtype for p in params])
        )
        rebuilt = self._layout_for(params)
        rebuilt.agreed = True
        self._last_average = rebuilt.drift_sample()
        pending.layout_settled = True

    def _sets_agree(self, level: int, fingerprint: int, device: torch.device) -> bool:
        """Every rank of the level's group holds a parameter set with this fingerprint."""
        pair = torch.tensor([fingerprint, -fingerprint], dtype=torch.float64, device=device)
        dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=self._level_groups[level])
        high, low = read_at_sync_point(pair)
        return high == -low

    def _round(
        self, layout: Layout, level: int, step: int, changed_to: int | None = None, changed_tag: int = 1
    ) -> None:
        """Average over the level's group; the exchange that follows carries commands, checks, figures.

        In a two-rank job it rides in the averaging all-reduce's tail and both ranks' divergences
        are known locally (``theta_0 - theta_bar = -(theta_1 - theta_bar)``): no collective of its own.
        Otherwise it is its own small all-reduce, started without waiting.
        """
        clock = RoundClock(layout.device)
        fingerprint = layout.fingerprint if changed_to is None else changed_to
        changed = 0 if changed_to is None else changed_tag
        if self._state.average_now:
            self._state = dataclasses.replace(self._state, average_now=False)
        pending = None
        if self._rides_in_tail(layout, level):
            pending = self._exchange.start(
                self._state, step, fingerprint, anchor=step, changed=changed, tail=layout.tail
            )
        before = layout.samples()
        moved = layout.average(level, self._level_groups[level], self._level_sizes[level])
        figures = divergence.round_figures(before, layout.samples(), layout.plan)
        extra = self._after_mean(layout, level, step)
        self._last_average = layout.drift_sample()
        clock.stop()
        # The round's one read: its figures, the reduced tail when the exchange rode in it, and
        # what the round did after the mean.
        tail = layout.tail.double() if pending is not None else figures[:0]
        parts = [tail, figures] if extra is None else [tail, figures, extra]
        values = read_at_sync_point(torch.cat(parts))
        if pending is not None:
            pending.values = values[: tail.numel()]
        figures_read = values[tail.numel() : tail.numel() + figures.numel()]
        fields = self._round_fields(values[tail.numel() + figures.numel() :]) if extra is not None else {}
        self._recorder.send_landed(wait=True)  # the read above waited for every earlier copy
        mine = divergence.RankDivergence.from_figures(figures_read)
        top = divergence.top_layers(mine.per_layer, layout.names)
        draft = RoundDraft(
            step, self._level_sizes[level], clock.seconds(), moved, layout.plan.exact, top, len(layout.names), fields
        )
        self._recorder.count_round(draft)
        if pending is not None:
            self._recorder.round(draft, [mine.squared] * 2 + [mine.mean_norm_squared] * 2)
            self._pending = (pending, None)
        else:
            pending = self._exchange.start(
                self._state,
                step,
                fingerprint,
                anchor=step,  # a period set here restarts its grid at this round, not one step later
                changed=changed,
                stats=(mine.squared, mine.mean_norm_squared),
            )
            self._pending = (pending, draft)
        self._last_exchange = step

    def _drift(self, step: int, averaged: bool) -> float | torch.Tensor | None:
        """How far this rank moved since the last round, every ``drift_every`` steps (else None); a
        tensor on the parameters' device, which the recorder reads once it has reached the host."""
        if averaged:
            return 0.0  # nothing moved since the round that just ended
        layout = self._layout
        if self._last_average is None or layout is None or step % self.options.drift_every != 0:
            return None
        return divergence.drift(layout.drift_sample(), self._last_average, layout.drift_plan)

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
                        source.wait(self.options.poll_interval)
                    else:
                        time.sleep(self.options.poll_interval)  # nothing can resume us but a loaded checkpoint's caller
                layout = self._layout_for(params)
                state = self._agree(self._state, step, layout)
                if state.average_now:
                    self._round(layout, top, step)
            except RuntimeError as err:
                raise RuntimeError(
                    f"avgctl: the process group failed while training was held at step {step} "
                    f"(a rank probably died); restart the job from a checkpoint. Cause: {err}"
                ) from err

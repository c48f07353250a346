"""An averager's figures: the latest step and round records, and the listeners they go to.

Figures given as tensors (a 0-dim loss on the GPU, the drift) are never read on the step they
belong to: a step's record waits, in order, until its figures' copy to the host has landed
(``device.Staged``), and is sent then; a sync point (a round, ``flush``) sends every one waiting.
On the CPU the copy lands at once, so records go out on their own step.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from avgctl.protocol import ControlEvent, ControlView, RoundRecord, StepRecord
from avgctl.protocol.bounds import MAX_SCALARS, SCALAR_NAME_CHARS, SCALAR_NAME_MAX_LENGTH
from avgctl.worker import divergence
from avgctl.worker.device import Staged

log = logging.getLogger(__name__)
_SCALAR_NAME = re.compile(f"{SCALAR_NAME_CHARS}{{1,{SCALAR_NAME_MAX_LENGTH}}}")  # StepRecord's bound


Figure = float | torch.Tensor
"""A figure a step carries: a float, or a one-element tensor read later without a synchronisation."""


def _figure(name: str, value: Figure) -> Figure:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:  # metadata only: no read
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {list(value.shape)}")
        return value.detach()
    return float(value)


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
        """The last step's record (``step``, ``loss``, ``drift``, ``scalars``...)."""
        if isinstance(self._step, dict):
            self._step = StepRecord.model_construct(**self._step)
        return self._step

    @property
    def last_round(self) -> RoundRecord | None:
        """The last round whose group figures arrived (``divergence``, ``divergence_mean``...)."""
        if isinstance(self._round, dict):
            self._round = RoundRecord.model_construct(**self._round)
        return self._round


@dataclass(slots=True)
class RoundDraft:
    """A round's local figures, waiting for the group's: they ride on the exchange that follows."""

    step: int
    group_size: int
    seconds: float
    moved: int
    exact: bool
    top_layers: list[tuple[str, float]]
    layers_total: int
    extra: dict[str, float | None] = dataclasses.field(default_factory=dict)
    """Fields a round that does more than a mean adds (DiLoCo's pseudo-gradient figures)."""


class Recorder:
    """Turns an averager's figures into records: kept in ``metrics``, sent to every listener.

    Args:
        rank: this rank in the averager's process group (its slot in the group's figures).
        world_size: ranks in that group.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.metrics = AveragerMetrics()
        self._listeners: list[MetricsListener] = []
        self._pending_loss: Figure | None = None
        self._pending_scalars: dict[str, Figure] = {}
        self._in_flight: collections.deque[tuple[dict, Staged]] = collections.deque()

    def add_listener(self, listener: MetricsListener) -> None:
        """Send every later record to ``listener`` too; one that raises is counted, never fatal."""
        self._listeners.append(listener)

    def remove_listener(self, listener: MetricsListener) -> None:
        """Stop sending records to ``listener``."""
        self._listeners.remove(listener)

    def record(self, loss: Figure | None = None, **scalars: Figure) -> None:
        """Attach figures to the next step record: floats, or one-element tensors on any device,
        which are read later without a synchronisation (pass ``loss``, not ``loss.item()``)."""
        bad = [name for name in scalars if _SCALAR_NAME.fullmatch(name) is None]
        if bad:  # the server would refuse the whole batch (and the link would stop)
            raise ValueError(
                f"scalar names must be 1-{SCALAR_NAME_MAX_LENGTH} characters without control characters, got {bad!r}"
            )
        merged = {**self._pending_scalars, **{k: _figure(k, v) for k, v in scalars.items()}}
        if len(merged) > MAX_SCALARS:
            raise ValueError(f"at most {MAX_SCALARS} scalars per step, got {sorted(merged)}")
        if loss is not None:
            self._pending_loss = _figure("loss", loss)
        self._pending_scalars = merged

    def note_fallback(self, reason: str | None) -> None:
        """The averaging path the current layout takes; a new reason for torch's path is logged once."""
        if reason is not None and reason != self.metrics.fallback_reason:
            log.warning("avgctl: averaging with torch's path (%s)", reason)
        self.metrics.fallback_reason = reason

    def step(self, step: int, step_time: float | None, drift: Figure | None) -> None:
        """Close a step's record with the figures ``record`` attached since the last one.

        Tensor figures are copied to the host without blocking; the record goes out once they land.
        """
        fields = dict(step=step, time=time.time(), step_time=step_time, drift=drift, loss=self._pending_loss)
        scalars = self._pending_scalars
        self._pending_loss, self._pending_scalars = None, {}
        figures = [drift, fields["loss"], *scalars.values()]
        if any(isinstance(f, torch.Tensor) for f in figures):
            fields["scalars"] = list(scalars)  # names, until the values land
            self._in_flight.append((fields, Staged(figures)))
        else:
            fields["scalars"] = scalars
            self._close(fields)
        self.send_landed()

    def send_landed(self, wait: bool = False) -> None:
        """Send, in order, the step records whose figures reached the host (``wait``: all of them;
        only at a sync point, where waiting costs nothing more)."""
        while self._in_flight:
            fields, staged = self._in_flight[0]
            if not wait and not staged.ready():
                return
            self._in_flight.popleft()
            drift, loss, *values = staged.values(wait=True)
            fields.update(drift=drift, loss=loss, scalars=dict(zip(fields["scalars"], values)))
            self._close(fields)

    def _close(self, fields: dict) -> None:
        self.metrics._step = fields
        if self._listeners:
            self._emit("on_step", self.metrics.last_step)

    def count_round(self, draft: RoundDraft) -> None:
        """Add a round that just ended to the running totals (its record waits for the group's figures)."""
        metrics = self.metrics
        metrics.rounds += 1
        metrics.bytes_moved += draft.moved
        metrics.averaging_seconds += draft.seconds

    def round(self, draft: RoundDraft, stats: list[float]) -> None:
        """A round's record, from its local figures and every rank's ``[squared...] + [mean_norm_squared...]``."""
        world = self.world_size
        group = divergence.group_divergence(stats[:world], stats[world:])
        fields = dict(
            step=draft.step,
            group_size=draft.group_size,
            divergence=group.per_rank[self.rank],
            relative_divergence=group.relative_per_rank[self.rank],
            divergence_mean=group.mean,
            divergence_max=group.max,
            relative_mean=group.relative_mean,
            relative_max=group.relative_max,
            seconds=draft.seconds,
            bytes=draft.moved,
            exact=draft.exact,
            top_layers=draft.top_layers,
            layers_total=draft.layers_total,
            **draft.extra,
        )
        self.metrics._round = fields
        if self._listeners:
            self._emit("on_round", self.metrics.last_round)

    def control(self, step: int, view: ControlView) -> None:
        """The control state changed, taking effect at ``step``."""
        self._emit("on_control", ControlEvent(step=step, control=view))

    def _emit(self, method: str, record: Any) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, method)(record)
            except Exception:  # a broken listener must never stop training
                self.metrics.listener_errors += 1
                if self.metrics.listener_errors == 1:
                    log.exception("avgctl: metrics listener failed; training goes on")

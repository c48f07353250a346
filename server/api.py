"""The server's REST and dashboard models: what people, the CLI and the dashboard read.

The wire protocol both sides share lives in ``avgctl.protocol``; these models are the server's own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from avgctl.protocol import AveragerConfig, ControlEvent, ControlView, RoundRecord, StepRecord

CommandStatus = Literal["pending", "applied", "rejected"]


# Non-finite figures are data: written as the strings "NaN", "Infinity", "-Infinity" (as the
# protocol's), so every answer is valid JSON and reads back into the same model.
_FIGURES = ConfigDict(ser_json_inf_nan="strings")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", **_FIGURES)


def _unset(value: object) -> bool:
    return value is None


class AutotuneProposalView(_Message):
    """The autopilot's latest proposal for a job (see ``server/autotune.py``)."""

    step: int  # the round it was made at
    period: int  # proposed; equal to ``current`` when the autopilot holds
    current: int  # the period in force when it was made
    reason: str  # one line: delta, growth, target, delta*/g and what limited the change
    delta: float  # delta_r: mean over ranks of relative divergence squared
    growth: float  # g: EMA of delta_r / tau_r, per step
    target: float  # delta*: the budget in force
    raw_period: float  # delta* / g before limits
    tau_cost: int | None = None  # least period keeping averaging under its share of wall time
    communication_bound: bool = False  # the proposed period is under tau_cost
    pending_command: int | None = None  # the autopilot's set_period still pending, if any


class AutotuneView(_Message):
    """The autopilot of a job: the person's settings, then the autopilot's own report.

    ``enabled`` and ``target_divergence`` are what ``set_autotune`` stored. The report fields are
    absent until the autopilot has something to say since the last switch (its first round, or a
    suspension): ``state`` is ``calibrating | active | suspended | off`` (``suspended`` reads as
    ``enabled: false``: a person's command stopped it until it is switched on again).
    """

    enabled: bool = False
    target_divergence: float | None = None
    state: Literal["off", "calibrating", "active", "suspended"] | None = Field(default=None, exclude_if=_unset)
    calibrated_target: float | None = Field(default=None, exclude_if=_unset)  # delta* found by calibration
    last_proposal: AutotuneProposalView | None = Field(default=None, exclude_if=_unset)
    note: str | None = Field(default=None, exclude_if=_unset)  # why the state is what it is


class JobControl(ControlView):
    """A job's control state as the server shows it: the ranks' view (``outer_lr``: a DiLoCo job's
    outer lr once a ``set_outer_lr`` applied, else None) plus the autopilot's."""

    autotune: AutotuneView = Field(default_factory=AutotuneView)


JobStatus = Literal["running", "finished", "disconnected"]


class CommandOut(BaseModel):
    """One entry of a job's command log."""

    id: int
    job_id: str
    type: str
    status: CommandStatus
    author: str
    created_at: float  # unix seconds
    updated_at: float
    applied_step: int | None = None
    reason: str | None = None
    command: dict  # the command body as posted
    note: str | None = None  # why its author sent it (the autopilot's reason for a set_period)
    control_version: int | None = None  # the ranks' control version with it applied (rank 0's ack)
    # A restore from a checkpoint undid it (the job came back with a lower control version): the
    # step the job resumed at, and when. Its status stays "applied": it was, until then.
    rolled_back_at_step: int | None = None
    rolled_back_at: float | None = None  # unix seconds


class RankOut(BaseModel):
    """One rank of a job as the server last heard from it."""

    rank: int
    host: str
    pid: int
    step: int
    last_seen: float  # unix seconds of the last frame
    connected: bool
    dropped: int  # metric records this rank's link dropped (bounded buffer)


class JobOut(BaseModel):
    """A job in the list: its live control state, with the server's autopilot settings."""

    model_config = _FIGURES

    id: str
    world_size: int
    status: JobStatus
    step: int
    control: JobControl
    config: AveragerConfig | None = None  # rank 0's averager; ``kind``: periodic, hierarchical or diloco
    created_at: float
    updated_at: float
    divergence_mean: float | None = None  # of the latest averaging round, over the job's ranks
    divergence_max: float | None = None
    last_seen: float | None = None  # unix seconds of the latest frame from any rank


class JobDetail(JobOut):
    """A job with its ranks."""

    ranks: list[RankOut] = Field(default_factory=list)


class RankMetrics(BaseModel):
    """One rank's records in a dashboard ``metrics_batch``."""

    rank: int
    steps: list[StepRecord] = Field(default_factory=list)
    step_weight: float = 1.0
    """How many of the rank's steps each of ``steps`` stands for: above ``live_steps`` per second
    the live stream is thinned, and sums over steps (time spent) must count each record this often."""
    rounds: list[RoundRecord] = Field(default_factory=list)
    control: list[ControlEvent] = Field(default_factory=list)


class DashboardMetrics(BaseModel):
    """Server -> dashboard (WS /ws/jobs/{job_id}): what a job's ranks sent since the last tick, one
    frame per job per tick (``dashboard_interval``), serialized once for every client of the job."""

    kind: Literal["metrics_batch"] = "metrics_batch"
    items: list[RankMetrics] = Field(default_factory=list)


class MetricsOut(BaseModel):
    """Stored series of a job (GET /api/jobs/{job_id}/metrics); each record carries its rank."""

    job_id: str
    steps: list[dict] = Field(default_factory=list)
    rounds: list[dict] = Field(default_factory=list)
    control_events: list[dict] = Field(default_factory=list)


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class LimitsOut(BaseModel):
    """The bounds the server enforces (GET /api/limits), for clients that check input before sending."""

    max_period: int  # steps, for set_period and each level of set_hierarchy
    max_hierarchy_levels: int  # group levels in one set_hierarchy
    max_target_divergence: float  # set_autotune's target_divergence
    max_outer_lr: float  # set_outer_lr's lr (DiLoCo jobs)
    max_ranks: int  # a job's world size
    max_scalars: int  # user figures per step record
    max_batch_records: int  # records of one kind in one metric batch
    job_id_max_length: int
    job_id_pattern: str  # a regular expression a job id matches in full

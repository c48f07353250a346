"""Messages shared by the server, the worker link and the dashboard.

One module, imported by both sides, so the wire format is written once. It needs only pydantic:
the worker imports it without pulling in FastAPI.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A job id is a torchrun run id or a name a person chose: keep it printable and short.
# At least one letter, digit or underscore: ids of dots only ("..") would be rewritten by browsers.
JOB_ID_PATTERN = r"^[A-Za-z0-9_.:@+-]*[A-Za-z0-9_][A-Za-z0-9_.:@+-]*$"
JOB_ID_MAX_LENGTH = 128
MAX_BATCH_RECORDS = 10_000  # records of one kind in one metric batch
MAX_SCALARS = 32  # user figures per step record
SQLITE_INT_MAX = 2**63 - 1  # SQLite's INTEGER: a worker's larger int could not be stored
# A step, pid, batch number or version from a worker: checked on arrival, so it cannot fail the
# SQLite writer later (and take the other batches of its transaction with it).
StorableInt = Annotated[int, Field(ge=0, le=SQLITE_INT_MAX)]
JobId = Annotated[str, Field(min_length=1, max_length=JOB_ID_MAX_LENGTH, pattern=JOB_ID_PATTERN)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Commands (REST body of POST /api/jobs/{job_id}/commands; also what rank 0 receives)
# --------------------------------------------------------------------------------------------


class SetPeriod(_Message):
    """Average every ``period`` steps from the step the command is applied at."""

    type: Literal["set_period"] = "set_period"
    period: int = Field(ge=1, le=1_000_000)


class PauseAveraging(_Message):
    """Stop averaging rounds; training goes on locally."""

    type: Literal["pause_averaging"] = "pause_averaging"


class ResumeAveraging(_Message):
    """Start averaging again; the period grid restarts at the applied step."""

    type: Literal["resume_averaging"] = "resume_averaging"


class PauseTraining(_Message):
    """Hold every rank at the end of the applied step until resumed."""

    type: Literal["pause_training"] = "pause_training"


class ResumeTraining(_Message):
    """Release ranks held by ``pause_training``."""

    type: Literal["resume_training"] = "resume_training"


class AverageNow(_Message):
    """One averaging round over the whole process group at the applied step."""

    type: Literal["average_now"] = "average_now"


class SetHierarchy(_Message):
    """New periods for a hierarchical averager: ``{group_size: period}``.

    Group sizes are fixed when the averager is built; only their periods change. Keys are JSON
    strings (``{"2": 2, "8": 4}``: groups of 2 ranks average every 2 steps, groups of 8 every 4).
    """

    type: Literal["set_hierarchy"] = "set_hierarchy"
    periods: dict[str, Annotated[int, Field(ge=1, le=1_000_000)]] = Field(min_length=1, max_length=16)

    @field_validator("periods")
    @classmethod
    def _keys_are_group_sizes(cls, periods: dict[str, int]) -> dict[str, int]:
        for key in periods:
            if not key.isdigit() or int(key) < 1:
                raise ValueError(f"group size {key!r} is not a positive integer")
        return periods


class SetAutotune(_Message):
    """Switch the server's autopilot; ``target_divergence`` None means calibrate it."""

    type: Literal["set_autotune"] = "set_autotune"
    enabled: bool
    target_divergence: float | None = Field(default=None, gt=0, le=1e6)


Command = Annotated[
    Union[
        SetPeriod,
        PauseAveraging,
        ResumeAveraging,
        PauseTraining,
        ResumeTraining,
        AverageNow,
        SetHierarchy,
        SetAutotune,
    ],
    Field(discriminator="type"),
]

# Commands the worker itself carries out; set_autotune lives in the server.
WORKER_COMMAND_TYPES = frozenset(
    {
        "set_period",
        "pause_averaging",
        "resume_averaging",
        "pause_training",
        "resume_training",
        "average_now",
        "set_hierarchy",
    }
)

CommandStatus = Literal["pending", "applied", "rejected"]


# --------------------------------------------------------------------------------------------
# Control state as users and the dashboard see it
# --------------------------------------------------------------------------------------------


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


class ControlView(_Message):
    """The live control state of a job, versioned: every applied command adds one."""

    period: int
    warmup_steps: int
    averaging_paused: bool = False
    training_paused: bool = False
    hierarchy: dict[str, int] | None = None  # group_size -> period, hierarchical averagers only
    autotune: AutotuneView = Field(default_factory=AutotuneView)
    version: StorableInt = 0


# --------------------------------------------------------------------------------------------
# Worker -> server (WS /ws/worker). Every frame is one JSON object with a ``kind``.
# --------------------------------------------------------------------------------------------


class AveragerConfig(_Message):
    kind: Literal["periodic", "hierarchical"]
    period: int
    warmup_steps: int
    group_sizes: list[int] | None = None  # hierarchical: fixed at construction, ascending


class Hello(_Message):
    """First frame of every worker connection."""

    kind: Literal["hello"] = "hello"
    job_id: JobId
    rank: int = Field(ge=0, lt=1_000_000)
    world_size: int = Field(ge=1, le=1_000_000)
    host: str = Field(max_length=255)
    pid: StorableInt
    config: AveragerConfig
    control: ControlView
    step: StorableInt = 0
    # A random id of the sending link, the same on each of its connections: with it the server knows
    # a batch ``seq`` it already had from this link as one sent again (see ``MetricsBatch.seq``).
    link: str | None = Field(default=None, max_length=64)


class StepRecord(_Message):
    """Per-step figures of one rank (sent in batches)."""

    step: StorableInt
    time: float  # unix seconds when the step ended
    step_time: float | None = None  # seconds since the previous step ended
    drift: float | None = None  # ||theta_i - theta_bar(last sync)|| (local, no communication)
    loss: float | None = None
    scalars: dict[str, float] = Field(default_factory=dict, max_length=MAX_SCALARS)  # user figures


class RoundRecord(_Message):
    """One averaging round as seen by one rank."""

    step: StorableInt
    group_size: int = Field(ge=1, le=1_000_000)
    divergence: float  # ||theta_i - theta_bar|| of this rank
    relative_divergence: float  # divergence / ||theta_bar||
    divergence_mean: float  # over the ranks of the whole job
    divergence_max: float
    relative_mean: float
    relative_max: float
    seconds: float  # time spent averaging (communication + metrics)
    bytes: int  # bytes all-reduced by this rank
    exact: bool  # False when divergence is estimated from a coordinate sample
    top_layers: list[tuple[str, float]] = Field(default_factory=list, max_length=16)


class ControlEvent(_Message):
    """A rank reports a control change it applied, with the step it took effect at."""

    step: StorableInt
    control: ControlView


class MetricsBatch(_Message):
    kind: Literal["metrics"] = "metrics"
    steps: list[StepRecord] = Field(default_factory=list, max_length=MAX_BATCH_RECORDS)
    rounds: list[RoundRecord] = Field(default_factory=list, max_length=MAX_BATCH_RECORDS)
    control: list[ControlEvent] = Field(default_factory=list, max_length=MAX_BATCH_RECORDS)
    dropped: StorableInt = 0  # metric records this rank dropped so far (bounded buffer)
    # The link's batch number, rising by one per batch over the link's life. With it the server
    # answers ``stored`` and the link sends the batch again after a reconnect until then.
    seq: StorableInt | None = None


class CommandAck(_Message):
    """Rank 0 reports what became of a command it received."""

    kind: Literal["ack"] = "ack"
    command_id: StorableInt
    status: Literal["applied", "rejected"]
    applied_step: StorableInt | None = None
    reason: str | None = None
    control: ControlView | None = None


WorkerMessage = Annotated[Union[Hello, MetricsBatch, CommandAck], Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------
# Server -> rank 0 (WS /ws/worker)
# --------------------------------------------------------------------------------------------


class CommandDelivery(_Message):
    """A command for rank 0. ``id`` makes delivery idempotent: a rank applies an id at most once."""

    kind: Literal["command"] = "command"
    id: int
    command: Command


class MetricsStored(_Message):
    """Every batch of this link up to ``seq`` is committed (or was counted as dropped by the
    server): the link may forget them. Sent to every rank, at most every ``ACK_INTERVAL``."""

    kind: Literal["stored"] = "stored"
    seq: int


ServerMessage = Annotated[Union[CommandDelivery, MetricsStored], Field(discriminator="kind")]


# --------------------------------------------------------------------------------------------
# REST and dashboard output (server -> people, the CLI and the dashboard)
# --------------------------------------------------------------------------------------------

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

    id: str
    world_size: int
    status: JobStatus
    step: int
    control: ControlView
    config: AveragerConfig | None = None
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

"""Frames on ``WS /ws/worker``: every one is a JSON object with a ``kind``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from avgctl.protocol.bounds import (
    JOB_SECRET_MAX_LENGTH,
    JOB_SECRET_MIN_LENGTH,
    MAX_BATCH_RECORDS,
    MAX_RANKS,
    MAX_SCALARS,
    MAX_TOP_LAYERS,
    JobId,
    ScalarName,
    StorableInt,
)
from avgctl.protocol.commands import Message, WorkerCommand


class ControlView(Message):
    """The live control state of a job as its ranks hold it, versioned: every applied command adds one."""

    period: int
    warmup_steps: int
    averaging_paused: bool = False
    training_paused: bool = False
    hierarchy: dict[str, int] | None = None  # group_size -> period, hierarchical averagers only
    outer_lr: float | None = None  # DiLoCo: the outer optimizer's lr once a set_outer_lr applied
    version: StorableInt = 0


class AveragerConfig(Message):
    kind: Literal["periodic", "hierarchical", "diloco"]
    period: int
    warmup_steps: int
    group_sizes: list[int] | None = None  # hierarchical: fixed at construction, ascending


# ------------------------------------------------------------------ worker -> server


class Hello(Message):
    """First frame of every worker connection."""

    kind: Literal["hello"] = "hello"
    job_id: JobId
    rank: int = Field(ge=0, lt=MAX_RANKS)
    world_size: int = Field(ge=1, le=MAX_RANKS)
    host: str = Field(max_length=255)
    pid: StorableInt
    config: AveragerConfig
    control: ControlView
    step: StorableInt = 0
    # A random id of the sending link, the same on each of its connections: with it the server knows
    # a batch ``seq`` it already had from this link as one sent again (see ``MetricsBatch.seq``).
    # Never disclosed: a second hello for a live rank replaces it only with the same link id.
    link: str | None = Field(default=None, max_length=64)
    # The secret the job's ranks agreed on through their own torch.distributed store: it proves
    # this process belongs to the job (the worker token is shared by every job's workers). The
    # server binds the job to it at the first hello and refuses any other (close 4403).
    job_secret: str = Field(min_length=JOB_SECRET_MIN_LENGTH, max_length=JOB_SECRET_MAX_LENGTH)


class StepRecord(Message):
    """Per-step figures of one rank (sent in batches)."""

    step: StorableInt
    time: float  # unix seconds when the step ended
    step_time: float | None = None  # seconds since the previous step ended
    drift: float | None = None  # ||theta_i - theta_bar(last sync)|| (local, no communication)
    loss: float | None = None
    scalars: dict[ScalarName, float] = Field(default_factory=dict, max_length=MAX_SCALARS)  # user figures


class RoundRecord(Message):
    """One averaging round as seen by one rank."""

    step: StorableInt
    group_size: int = Field(ge=1, le=MAX_RANKS)
    divergence: float  # ||theta_i - theta_bar|| of this rank
    relative_divergence: float  # divergence / ||theta_bar||
    divergence_mean: float  # over the ranks of the whole job
    divergence_max: float
    relative_mean: float
    relative_max: float
    seconds: float  # time spent averaging (communication + metrics)
    bytes: int  # bytes all-reduced by this rank
    exact: bool  # False when divergence is estimated from a coordinate sample
    # Layers' shares of this rank's squared divergence, the largest first: every layer's when the
    # model has at most MAX_TOP_LAYERS, else the top TOP_LAYERS; layers_total says how many it has.
    top_layers: list[tuple[str, float]] = Field(default_factory=list, max_length=MAX_TOP_LAYERS)
    layers_total: int | None = Field(default=None, ge=0)
    # DiLoCo rounds (None for plain averaging): the pseudo-gradient Delta = theta_g - mean_i theta_i
    pseudo_gradient_norm: float | None = None  # ||Delta||
    pseudo_gradient_relative: float | None = None  # ||Delta|| / ||theta_g||
    outer_lr: float | None = None  # the outer optimizer's lr (first param group) at this round


class ControlEvent(Message):
    """A rank reports a control change it applied, with the step it took effect at."""

    step: StorableInt
    control: ControlView


class MetricsBatch(Message):
    kind: Literal["metrics"] = "metrics"
    steps: list[StepRecord] = Field(default_factory=list, max_length=MAX_BATCH_RECORDS)
    rounds: list[RoundRecord] = Field(default_factory=list, max_length=MAX_BATCH_RECORDS)
    control: list[ControlEvent] = Field(default_factory=list, max_length=MAX_BATCH_RECORDS)
    dropped: StorableInt = 0  # metric records this rank dropped so far (bounded buffer)
    # The link's batch number, rising by one per batch over the link's life. With it the server
    # answers ``stored`` and the link sends the batch again after a reconnect until then.
    seq: StorableInt | None = None


class CommandAck(Message):
    """Rank 0 reports what became of a command it received."""

    kind: Literal["ack"] = "ack"
    command_id: StorableInt
    status: Literal["applied", "rejected"]
    applied_step: StorableInt | None = None
    reason: str | None = None
    control: ControlView | None = None


WorkerMessage = Annotated[Hello | MetricsBatch | CommandAck, Field(discriminator="kind")]


# ------------------------------------------------------------------ server -> worker


class CommandDelivery(Message):
    """A command for rank 0. ``id`` makes delivery idempotent: a rank applies an id at most once."""

    kind: Literal["command"] = "command"
    id: int
    command: WorkerCommand


class MetricsStored(Message):
    """Every batch of this link up to ``seq`` is committed: the link may forget them. Sent to
    every rank, at most every ``ACK_INTERVAL``. A batch the server could not store is never covered:
    it closes that connection with 1011 instead, and the link sends what is unconfirmed again."""

    kind: Literal["stored"] = "stored"
    seq: int


ServerMessage = Annotated[CommandDelivery | MetricsStored, Field(discriminator="kind")]

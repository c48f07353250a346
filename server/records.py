"""A worker's metric batch: decoded on the fast path, then encoded once for SQLite and dashboards.

Decoding: metric batches are nearly every frame a server takes, and validating and encoding one
with pydantic took 19-35 µs, a third or more of the event loop's time per batch (5-7 µs here).
``decode_metrics`` reads a batch with msgspec into ``StepFigures`` (a mirror of
``protocol.StepRecord``, kept equal to it by a test) and validates the rarer rounds and control events with their pydantic models. Anything the fast path does not take
(another kind of message, lax input such as ``"5"`` for an int, an error) goes to the pydantic
models, which decide and word the error: the fast path can only be faster, never different.

Encoding: keeping the models until the writer stored them and the hub sent them would serialize
every record twice, and under load those objects piled up in the writer's queue, where the
garbage collector spent as long walking them as validation took. An ``EncodedBatch`` is a few
lists of ``(step, text)`` tuples: the store writes the texts as they are and the hub splices them
into its frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
from pydantic import TypeAdapter, ValidationError

from avgctl.protocol import ControlEvent, MetricsBatch, RoundRecord
from avgctl.protocol.bounds import MAX_BATCH_RECORDS, MAX_SCALARS, SQLITE_INT_MAX

_STORABLE = msgspec.Meta(ge=0, le=SQLITE_INT_MAX)  # protocol.StorableInt


class StepFigures(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """``protocol.StepRecord`` as msgspec reads it: the same fields, defaults and bounds.

    ``gc=False``: these hold no reference cycles, so the garbage collector need not track them.
    """

    step: Annotated[int, _STORABLE]
    time: float
    step_time: float | None = None
    drift: float | None = None
    loss: float | None = None
    scalars: Annotated[dict[str, float], msgspec.Meta(max_length=MAX_SCALARS)] = {}


class _WireBatch(msgspec.Struct, forbid_unknown_fields=True):
    """``protocol.MetricsBatch`` with its rounds and control events left as raw JSON."""

    kind: Literal["metrics"]  # required: in the models' union it picks the message type
    steps: Annotated[list[StepFigures], msgspec.Meta(max_length=MAX_BATCH_RECORDS)] = []
    rounds: Annotated[list[msgspec.Raw], msgspec.Meta(max_length=MAX_BATCH_RECORDS)] = []
    control: Annotated[list[msgspec.Raw], msgspec.Meta(max_length=MAX_BATCH_RECORDS)] = []
    dropped: Annotated[int, _STORABLE] = 0
    seq: Annotated[int, _STORABLE] | None = None


@dataclass(slots=True)
class Received:
    """A validated metric batch, whichever path read it."""

    steps: list[StepFigures]
    rounds: list[RoundRecord]
    control: list[ControlEvent]
    dropped: int
    seq: int | None


_DECODER = msgspec.json.Decoder(_WireBatch)
_ENCODER = msgspec.json.Encoder()
_ROUNDS = TypeAdapter(list[RoundRecord])
_CONTROL = TypeAdapter(list[ControlEvent])


def decode_metrics(data: str | bytes) -> Received | None:
    """The batch in ``data``, or None when the fast path does not take it (ask the models)."""
    try:
        wire = _DECODER.decode(data)
        rounds = _ROUNDS.validate_json(_array(wire.rounds)) if wire.rounds else []
        control = _CONTROL.validate_json(_array(wire.control)) if wire.control else []
    except (msgspec.DecodeError, ValidationError):
        return None
    return Received(wire.steps, rounds, control, wire.dropped, wire.seq)


def _array(raws: list[msgspec.Raw]) -> bytes:
    return b"[" + b",".join(raws) + b"]"


def received(batch: MetricsBatch) -> Received:
    """A batch the pydantic models validated, in the fast path's form."""
    steps = [StepFigures(**record.model_dump()) for record in batch.steps]
    return Received(steps, list(batch.rounds), list(batch.control), batch.dropped, batch.seq)


@dataclass(slots=True)
class LatestRound:
    """The job-wide divergence of the newest round in a batch (every rank reports the same)."""

    step: int
    divergence_mean: float
    divergence_max: float


@dataclass(slots=True)
class EncodedBatch:
    steps: list[tuple[int, str]]  # (step, StepRecord JSON)
    rounds: list[tuple[int, int, str]]  # (step, group_size, RoundRecord JSON)
    control: list[ControlEvent]  # rare; the store applies the last one to the job
    dropped: int  # records the rank dropped so far
    top: int | None  # the highest step of any record in the batch
    latest: LatestRound | None


# The model's own serializer: ``model_dump_json`` without its per-call argument handling (twice as fast).
_ROUND_JSON = RoundRecord.__pydantic_serializer__.to_json


def encode(batch: Received) -> EncodedBatch:
    steps = [(r.step, _ENCODER.encode(r).decode()) for r in batch.steps]
    rounds = [(r.step, r.group_size, _ROUND_JSON(r).decode()) for r in batch.rounds]
    top = max((s for s, _ in steps), default=None)
    latest = None
    if batch.rounds:
        newest = max(batch.rounds, key=lambda r: r.step)
        latest = LatestRound(newest.step, newest.divergence_mean, newest.divergence_max)
        top = newest.step if top is None else max(top, newest.step)
    if batch.control:
        top = max(top if top is not None else 0, max(e.step for e in batch.control))
    return EncodedBatch(steps, rounds, batch.control, batch.dropped, top, latest)

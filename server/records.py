"""A worker's metric batch: decoded on the fast path, then encoded once for SQLite and dashboards.

Decoding: metric batches are nearly every frame a server takes, and validating and encoding one
with pydantic took 19-35 µs, a third or more of the event loop's time per batch (5-7 µs here).
``decode_metrics`` reads a batch with msgspec into ``StepFigures`` (a mirror of
``protocol.StepRecord``, kept equal to it by a test) and validates the rarer rounds and control events with their pydantic models. Anything the fast path does not take
(another kind of message, lax input such as ``"5"`` for an int, a non-finite figure spelled
``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, an error) goes to the pydantic models, which decide
and word the error: the fast path can only be faster, never different.

Encoding: keeping the models until the writer stored them and the hub sent them would serialize
every record twice, and under load those objects piled up in the writer's queue, where the
garbage collector spent as long walking them as validation took. An ``EncodedBatch`` is a few
lists of ``(step, text)`` tuples: the store writes the texts as they are and the hub splices them
into its frames. Non-finite figures are data: every text spells them as the protocol does (the
strings above), so what is stored, served and spliced stays valid JSON (``figure``, ``json_text``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from pydantic import TypeAdapter, ValidationError

from avgctl.protocol import ControlEvent, MetricsBatch, RoundRecord
from avgctl.protocol.bounds import (
    MAX_BATCH_RECORDS,
    MAX_SCALARS,
    SCALAR_NAME_CHARS,
    SCALAR_NAME_MAX_LENGTH,
    SQLITE_INT_MAX,
)

_STORABLE = msgspec.Meta(ge=0, le=SQLITE_INT_MAX)  # protocol.StorableInt
# protocol.ScalarName; msgspec matches with Python's re.search, hence \Z where pydantic has $.
_SCALAR_NAME = Annotated[
    str, msgspec.Meta(min_length=1, max_length=SCALAR_NAME_MAX_LENGTH, pattern=f"^{SCALAR_NAME_CHARS}+\\Z")
]


class StepFigures(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """``protocol.StepRecord`` as msgspec reads it: the same fields, defaults and bounds.

    ``gc=False``: these hold no reference cycles, so the garbage collector need not track them.
    """

    step: Annotated[int, _STORABLE]
    time: float
    step_time: float | None = None
    drift: float | None = None
    loss: float | None = None
    scalars: Annotated[dict[_SCALAR_NAME, float], msgspec.Meta(max_length=MAX_SCALARS)] = {}


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
    finite_steps: bool = False
    """Every figure of ``steps`` is finite: so they are when msgspec read them (it takes no
    ``NaN``/``Infinity``, spelled or bare, and refuses ``1e999`` as out of range)."""


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
    return Received(wire.steps, rounds, control, wire.dropped, wire.seq, finite_steps=True)


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
    # The figures the store rolls up, one per record above: (loss, drift, step_time, scalars or None)
    # per step, (divergence, relative divergence) per round.
    step_values: list[tuple]
    round_values: list[tuple[float, float]]


# The model's own serializer: ``model_dump_json`` without its per-call argument handling (twice as fast).
_ROUND_JSON = RoundRecord.__pydantic_serializer__.to_json


def encode(batch: Received) -> EncodedBatch:
    if batch.finite_steps:  # nearly every batch: msgspec's text is the record's
        steps = [(r.step, _ENCODER.encode(r).decode()) for r in batch.steps]
    else:
        steps = [(r.step, _step_json(r)) for r in batch.steps]
    rounds = [(r.step, r.group_size, _ROUND_JSON(r).decode()) for r in batch.rounds]
    top = max((s for s, _ in steps), default=None)
    latest = None
    if batch.rounds:
        newest = max(batch.rounds, key=lambda r: r.step)
        latest = LatestRound(newest.step, newest.divergence_mean, newest.divergence_max)
        top = newest.step if top is None else max(top, newest.step)
    if batch.control:
        top = max(top if top is not None else 0, max(e.step for e in batch.control))
    step_values = [(r.loss, r.drift, r.step_time, r.scalars or None) for r in batch.steps]
    round_values = [(r.divergence, r.relative_divergence) for r in batch.rounds]
    return EncodedBatch(steps, rounds, batch.control, batch.dropped, top, latest, step_values, round_values)


# ------------------------------------------------------------------ non-finite figures


def figure(value: float | None) -> float | str | None:
    """A figure as JSON carries it: a finite float as it is, a non-finite one as the protocol's
    string (``"NaN"``, ``"Infinity"``, ``"-Infinity"``: what ``ser_json_inf_nan="strings"`` writes)."""
    if value is None or math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def _step_json(record: StepFigures) -> str:
    text = _ENCODER.encode(record)
    # msgspec writes a non-finite float as null, which a figure's reader could not tell from "not
    # recorded" (and a required one would refuse). No "null" in the text: every figure is finite.
    if b"null" in text and not _finite(record):
        spelled = {name: figure(getattr(record, name)) for name in _FIGURE_FIELDS}
        spelled["scalars"] = {name: figure(v) for name, v in record.scalars.items()}
        text = _ENCODER.encode({"step": record.step, **spelled})
    return text.decode()


_FIGURE_FIELDS = ("time", "step_time", "drift", "loss")
assert StepFigures.__struct_fields__ == ("step", *_FIGURE_FIELDS, "scalars")  # the text keeps their order


def _finite(record: StepFigures) -> bool:
    figures = (record.time, record.step_time, record.drift, record.loss, *record.scalars.values())
    return all(v is None or math.isfinite(v) for v in figures)


def json_text(value: Any) -> str:
    """``json.dumps(value)`` that is always valid JSON: a non-finite float anywhere in ``value``
    (a job's divergence, an autopilot figure) is written as the protocol's string, never as a bare
    ``NaN``/``Infinity`` token, which ``JSON.parse`` refuses (and a page would draw nothing)."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:  # rare: only a diverged job's messages
        return json.dumps(_spelled(value), allow_nan=False)


def _spelled(value: Any) -> Any:
    if isinstance(value, float):
        return figure(value)
    if isinstance(value, dict):
        return {k: _spelled(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_spelled(v) for v in value]
    return value

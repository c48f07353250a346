"""A validated metric batch, encoded once: each record's JSON text, for SQLite and for dashboards.

Ingest used to keep the pydantic models until the writer stored them and the hub sent them,
serializing every record twice. Under load those models (five objects per record) piled up in
the writer's queue, and the garbage collector spent as long walking them as validation took. An
``EncodedBatch`` is a few lists of ``(step, text)`` tuples: the store writes the texts as they
are and the hub splices them into its frames.
"""

from __future__ import annotations

from dataclasses import dataclass

from avgctl.server.schemas import ControlEvent, MetricsBatch, RoundRecord, StepRecord


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


# The models' own serializers: ``model_dump_json`` without its per-call argument handling (twice as fast).
_STEP_JSON = StepRecord.__pydantic_serializer__.to_json
_ROUND_JSON = RoundRecord.__pydantic_serializer__.to_json


def encode(batch: MetricsBatch) -> EncodedBatch:
    steps = [(r.step, _STEP_JSON(r).decode()) for r in batch.steps]
    rounds = [(r.step, r.group_size, _ROUND_JSON(r).decode()) for r in batch.rounds]
    top = max((s for s, _ in steps), default=None)
    latest = None
    if batch.rounds:
        newest = max(batch.rounds, key=lambda r: r.step)
        latest = LatestRound(newest.step, newest.divergence_mean, newest.divergence_max)
        top = newest.step if top is None else max(top, newest.step)
    if batch.control:
        top = max(top if top is not None else 0, max(e.step for e in batch.control))
    return EncodedBatch(steps, rounds, list(batch.control), batch.dropped, top, latest)

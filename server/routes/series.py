"""A job's history at any zoom: a series in buckets per rank, and the layers' shares per round."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response

from avgctl.protocol.bounds import MAX_RANKS, SQLITE_INT_MAX
from avgctl.server.deps import JobIdPath, StoreDep
from avgctl.server.routes.metrics import MAX_NAME_LENGTH, rank_list
from avgctl.server.store import history

router = APIRouter(prefix="/api/jobs/{job_id}", tags=["metrics"])

Step = Annotated[int | None, Query(ge=0, le=SQLITE_INT_MAX)]


@router.get("/series")
def get_series(
    job_id: JobIdPath,
    store: StoreDep,
    name: Annotated[str, Query(min_length=1, max_length=MAX_NAME_LENGTH, description=history.NAMES_HELP)],
    from_step: Step = None,
    to_step: Step = None,
    points: Annotated[int, Query(ge=1, le=history.MAX_POINTS)] = history.DEFAULT_POINTS,
    ranks: Annotated[list[str], Query(max_length=64)] = [],  # noqa: B006 (FastAPI copies defaults)
) -> Response:
    """One series over ``from_step``..``to_step`` (default: the whole run) in at most ``points``
    buckets of ``bucket_steps`` steps (a power of two): per rank its records' min, mean and max in
    each bucket, and over the ranks' means the group's min, median and max (null: no record).

    Read from rollups kept as records are written, so a whole-run query costs about
    ``points x ranks`` rows however long the run; short ranges come from the records themselves
    while they are kept at full resolution. Non-finite figures are spelled ``"NaN"``,
    ``"Infinity"``, ``"-Infinity"``.
    """
    query = history.SeriesQuery(name, from_step, to_step, points, rank_list(ranks) or None)
    try:
        text = store.series_json(job_id, query)
    except history.BadQuery as err:
        raise HTTPException(422, str(err)) from None
    if text is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return Response(text, media_type="application/json")


@router.get("/layers")
def get_layers(
    job_id: JobIdPath,
    store: StoreDep,
    from_step: Step = None,
    to_step: Step = None,
    points: Annotated[int, Query(ge=1, le=history.MAX_POINTS)] = history.DEFAULT_LAYER_COLUMNS,
    rank: Annotated[int, Query(ge=0, lt=MAX_RANKS)] = 0,
) -> dict:
    """Each layer's share of ``rank``'s squared divergence per round, in at most ``points`` columns
    (``layers`` x ``steps``; ``complete`` false when rounds carried only their top layers, so the
    others' cells are null). For the dashboard's heatmap."""
    try:
        answer = store.layers(job_id, from_step, to_step, points, rank)
    except history.BadQuery as err:
        raise HTTPException(422, str(err)) from None
    if answer is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return answer

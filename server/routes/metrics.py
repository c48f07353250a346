"""Stored metric series of a job."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from avgctl.server.api import MetricsOut
from avgctl.server.deps import JobIdPath, StoreDep

router = APIRouter(prefix="/api/jobs/{job_id}/metrics", tags=["metrics"])


def _split(values: list[str]) -> list[str]:
    # Accept both ``?ranks=0,1`` and ``?ranks=0&ranks=1``.
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@router.get("", response_model=MetricsOut)
def get_metrics(
    job_id: JobIdPath,
    store: StoreDep,
    since_step: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ranks: Annotated[list[str], Query(max_length=64)] = [],  # noqa: B006 (FastAPI copies defaults)
    names: Annotated[list[str], Query(max_length=64)] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=1_000_000)] = 100_000,
) -> MetricsOut:
    """Step records, averaging rounds and control events from ``since_step`` on.

    ``ranks`` keeps those ranks; ``names`` keeps those fields (a name that is not a field is looked
    up among the user's scalars); each record keeps ``rank`` and ``step``.
    """
    try:
        rank_list = [int(r) for r in _split(ranks)]
    except ValueError:
        raise HTTPException(422, "ranks must be integers, e.g. ranks=0,1") from None
    if any(r < 0 for r in rank_list) or len(rank_list) > 4096:
        raise HTTPException(422, "ranks must be non-negative (at most 4096 of them)")
    name_list = _split(names)
    if any(len(n) > 128 for n in name_list):
        raise HTTPException(422, "a name is longer than 128 characters")
    if store.get_job(job_id) is None:
        raise HTTPException(404, f"no job {job_id!r}")
    series = store.metrics(job_id, since_step, rank_list or None, name_list or None, limit)
    return MetricsOut(job_id=job_id, **series)

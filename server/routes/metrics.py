"""Stored metric series of a job."""

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse

from avgctl.protocol.bounds import MAX_RANKS
from avgctl.server.api import MetricsOut
from avgctl.server.deps import JobIdPath, StoreDep
from avgctl.server.store import reads

router = APIRouter(prefix="/api/jobs/{job_id}/metrics", tags=["metrics"])

MAX_RANK_FILTER = 4096  # ranks in one ``ranks`` filter (each is a bound SQL parameter)
MAX_NAMES = 64  # names in one ``names`` filter
MAX_NAME_LENGTH = 128


def _split(values: list[str]) -> list[str]:
    # Accept both ``?ranks=0,1`` and ``?ranks=0&ranks=1``.
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def rank_list(values: list[str]) -> list[int]:
    """A ``ranks`` filter (``0,1`` or repeated), checked: 422 with the reason."""
    parts = _split(values)
    if len(parts) > MAX_RANK_FILTER:
        raise HTTPException(422, f"at most {MAX_RANK_FILTER} ranks, got {len(parts)}")
    if any(len(p) > 7 or not (p.isascii() and p.isdigit()) for p in parts):  # 7 digits: MAX_RANKS - 1 = 999999 has 6
        raise HTTPException(422, f"ranks must be integers from 0 to {MAX_RANKS - 1}, e.g. ranks=0,1")
    ranks = [int(p) for p in parts]
    if any(r >= MAX_RANKS for r in ranks):
        raise HTTPException(422, f"ranks must be integers from 0 to {MAX_RANKS - 1}, e.g. ranks=0,1")
    return ranks


@router.get("", response_model=MetricsOut)
def get_metrics(
    job_id: JobIdPath,
    store: StoreDep,
    since_step: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ranks: Annotated[list[str], Query(max_length=64)] = [],  # noqa: B006 (FastAPI copies defaults)
    names: Annotated[list[str], Query(max_length=64)] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=1_000_000)] = 100_000,
) -> StreamingResponse:
    """Step records, averaging rounds and control events from ``since_step`` on.

    ``ranks`` keeps those ranks; ``names`` keeps those fields (a name that is not a field is looked
    up among the user's scalars); each record keeps ``rank`` and ``step``. The answer is streamed as
    SQLite yields the records (a million records are ~150 MB of JSON, which the server never holds).
    """
    wanted_ranks = rank_list(ranks)
    name_list = _split(names)
    if len(name_list) > MAX_NAMES:
        raise HTTPException(422, f"at most {MAX_NAMES} names, got {len(name_list)}")
    if any(len(n) > MAX_NAME_LENGTH for n in name_list):
        raise HTTPException(422, f"a name is longer than {MAX_NAME_LENGTH} characters")
    if store.get_job(job_id) is None:
        raise HTTPException(404, f"no job {job_id!r}")
    pieces = reads.stream_metrics(store.path, job_id, since_step, wanted_ranks or None, name_list or None, limit)
    return StreamingResponse(pieces, media_type="application/json")

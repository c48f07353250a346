"""Jobs: what runs, its live control state and its ranks."""

from fastapi import APIRouter, HTTPException

from avgctl.server.api import JobDetail, JobOut
from avgctl.server.deps import JobIdPath, StoreDep

router = APIRouter(prefix="/api/jobs", tags=["jobs"])


# Plain ``def``: FastAPI runs these in its thread pool, so SQLite reads never block the event loop.
@router.get("", response_model=list[JobOut])
def list_jobs(store: StoreDep) -> list[JobOut]:
    """Every job the server has seen, most recently active first."""
    return store.list_jobs()


@router.get("/{job_id}", response_model=JobDetail)
def get_job(job_id: JobIdPath, store: StoreDep) -> JobDetail:
    """One job with its ranks."""
    job = store.get_job(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job

"""``GET /api/limits``: the protocol's bounds, so that clients check input with the server's numbers."""

from fastapi import APIRouter
from pydantic import BaseModel

from avgctl.protocol import SetAutotune, SetOuterLr, bounds
from avgctl.server.api import LimitsOut

router = APIRouter(tags=["limits"])


def _upper_bound(model: type[BaseModel], field: str) -> float:
    # Read off the model's own ``Field(le=...)``: the bound stays written once, where it is checked.
    return next(m.le for m in model.model_fields[field].metadata if getattr(m, "le", None) is not None)


LIMITS = LimitsOut(
    max_period=bounds.MAX_PERIOD,
    max_hierarchy_levels=bounds.MAX_HIERARCHY_LEVELS,
    max_target_divergence=_upper_bound(SetAutotune, "target_divergence"),
    max_outer_lr=_upper_bound(SetOuterLr, "lr"),
    max_ranks=bounds.MAX_RANKS,
    max_scalars=bounds.MAX_SCALARS,
    max_batch_records=bounds.MAX_BATCH_RECORDS,
    job_id_max_length=bounds.JOB_ID_MAX_LENGTH,
    job_id_pattern=bounds.JOB_ID_PATTERN,
)


@router.get("/api/limits", response_model=LimitsOut)
async def get_limits() -> LimitsOut:
    """What commands and records may hold: constants of this server, the same for every job."""
    return LIMITS

"""``GET /api/health``: the one endpoint that needs no token."""

from fastapi import APIRouter

from avgctl.server.api import Health

router = APIRouter(tags=["health"])


@router.get("/api/health", response_model=Health)
def health() -> Health:
    """Liveness: the server answers."""
    return Health()

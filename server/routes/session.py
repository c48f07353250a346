"""``GET /api/session``: the role of the token the caller presented, so a page offers only what it may do."""

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

router = APIRouter(tags=["session"])


class SessionOut(BaseModel):
    """What the presented token may do: ``control`` (everything) or ``read`` (look, not act)."""

    role: Literal["control", "read"]


@router.get("/api/session", response_model=SessionOut)
def get_session(request: Request) -> SessionOut:
    """The caller's own role, which ``AuthMiddleware`` found for its token (a worker token may not
    ask: 403, as for every read). It names no other token and no setting of the server."""
    return SessionOut(role=request.state.role.value)

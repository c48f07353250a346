"""The bearer tokens every test server is started with, and the header that carries one."""

from __future__ import annotations

CONTROL, READ, WORKER = "control-secret", "read-secret", "worker-secret"


def auth(token: str = CONTROL) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}

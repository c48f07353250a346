"""The one place the worker reads its environment (torchrun's variables and ``AVGCTL_*``)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from avgctl.protocol.env import RESTART_COUNT, RUN_ID, SERVER, TOKEN


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEnv:
    """What torchrun and the user told this process through the environment."""

    rank: int
    """Global rank (``RANK``), 0 outside torchrun."""
    local_rank: int
    """Rank on this node (``LOCAL_RANK``)."""
    world_size: int
    """Number of ranks (``WORLD_SIZE``)."""
    local_world_size: int
    """Ranks on this node (``LOCAL_WORLD_SIZE``)."""
    run_id: str | None
    """torchrun's ``TORCHELASTIC_RUN_ID``; the default job id."""
    restart_count: int
    """``TORCHELASTIC_RESTART_COUNT``: how often torchrun restarted this job."""
    host: str
    """This machine's host name."""
    server: str | None
    """``AVGCTL_SERVER``: the server URL, e.g. ``http://127.0.0.1:8000``."""
    token: str | None
    """``AVGCTL_TOKEN``: the worker (or control) token."""


def read_env(environ: dict[str, str] | None = None) -> WorkerEnv:
    """This process's ``WorkerEnv``, from ``environ`` (default: ``os.environ``)."""
    env = os.environ if environ is None else environ
    run_id = env.get(RUN_ID)
    # torchrun --standalone sets a random run id; "none" is its placeholder when none was given.
    if run_id in ("", "none"):
        run_id = None
    return WorkerEnv(
        rank=int(env.get("RANK", "0")),
        local_rank=int(env.get("LOCAL_RANK", "0")),
        world_size=int(env.get("WORLD_SIZE", "1")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
        run_id=run_id,
        restart_count=int(env.get(RESTART_COUNT, "0")),
        host=socket.gethostname(),
        server=env.get(SERVER) or None,
        token=env.get(TOKEN) or None,
    )


def default_job_id(env: WorkerEnv) -> str:
    """torchrun's run id, else a generated one (ranks must then be given the same id explicitly)."""
    return env.run_id or f"job-{uuid.uuid4().hex[:12]}"

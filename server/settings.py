"""Server settings: every field is an ``AVGCTL_*`` environment variable and a ``serve`` flag."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """What ``avgctl serve`` needs; ``AVGCTL_PORT=9000`` and ``--port 9000`` set the same field."""

    model_config = SettingsConfigDict(env_prefix="AVGCTL_", extra="ignore")

    host: str = "127.0.0.1"
    """Interface to listen on; loopback unless you mean to expose the server."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port (0 picks a free one)."""
    db: str = "./avgctl.db"
    """SQLite file (WAL mode); ``:memory:`` is not supported because two connections share it."""
    control_token: str | None = None
    """May do everything. If no token at all is set, one is generated at start and printed."""
    read_token: str | None = None
    """May read: GET endpoints, /metrics, the dashboard and its websocket."""
    worker_token: str | None = None
    """May only send metrics on /ws/worker."""
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest REST request body accepted (413 above)."""
    max_frame_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest websocket frame accepted from a worker (closed with 1009 above)."""
    metrics_queue: int = Field(default=10_000, ge=10)
    """Metric batches waiting for the SQLite writer; more are dropped (and counted)."""
    dashboard_interval: float = Field(default=0.05, gt=0, le=5)
    """Seconds between coalesced dashboard sends."""
    dashboard_queue: int = Field(default=100, ge=8)
    """Messages waiting per dashboard client; a client that falls further behind skips messages
    (oldest metrics first). Live metrics are one message per job per ``dashboard_interval``, so the
    default holds about 5 s of them."""
    live_steps: int = Field(default=200, ge=1)
    """Step records per rank per second a dashboard gets live; a faster rank's are thinned evenly
    (the store keeps every one, and snapshots and the REST API read from it)."""
    retention_steps: int | None = Field(default=20_000, ge=1)
    """Each rank's latest steps kept at full resolution; older step and round records are thinned to
    at most ``history_records`` per rank, so the SQLite file stays bounded. None keeps everything."""
    history_records: int = Field(default=5_000, ge=10)
    """Thinned records kept per rank older than ``retention_steps`` (evenly spaced steps)."""
    snapshot_records: int = Field(default=20_000, ge=100)
    """Step (and round) records in a dashboard snapshot, over all ranks: the recent half at full
    resolution, older history downsampled."""


def browsable_host(host: str) -> str:
    """The address at which a browser on this machine reaches a server listening on ``host``:
    loopback for the any-address (``0.0.0.0``, ``::`` or empty), ``host`` itself otherwise."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

"""What crosses the worker websocket, built for tests: a rank's hello, a metrics batch, the
server's view of a batch (``encoded``), a store with two ranks, and the close a server answers with."""

from __future__ import annotations

import time

import pytest
from websockets.exceptions import ConnectionClosed

from avgctl.protocol import AveragerConfig, ControlEvent, ControlView, Hello, MetricsBatch, RoundRecord, StepRecord
from avgctl.server import store as st
from avgctl.server.records import EncodedBatch, decode_metrics, encode

JOB_SECRET = "0123456789abcdef" * 2
"""The job secret ``hello`` sends unless told otherwise: every test job's ranks share it."""


def hello(
    job_id: str = "job-1",
    rank: int = 0,
    world_size: int = 2,
    pid: int = 100,
    control: ControlView | None = None,
    link: str | None = None,
    job_secret: str = JOB_SECRET,
    host: str = "h",
    config: AveragerConfig | None = None,
    step: int = 0,
) -> str:
    return Hello(
        job_id=job_id,
        rank=rank,
        world_size=world_size,
        host=host,
        pid=pid,
        config=config or AveragerConfig(kind="periodic", period=4, warmup_steps=0),
        control=control or ControlView(period=4, warmup_steps=0),
        step=step,
        link=link,
        job_secret=job_secret,
    ).model_dump_json()


def batch(
    first: int,
    n: int,
    rank_loss: float = 1.0,
    rounds: bool = True,
    seq: int | None = None,
    control: list[ControlEvent] | None = None,
) -> str:
    steps = [
        StepRecord(step=s, time=1000.0 + s, loss=rank_loss, drift=0.5, scalars={"lr": 0.1})
        for s in range(first, first + n)
    ]
    rnds = [
        RoundRecord(
            step=s,
            group_size=2,
            divergence=0.1,
            relative_divergence=0.01,
            divergence_mean=0.1,
            divergence_max=0.3,
            relative_mean=0.01,
            relative_max=0.03,
            seconds=0.0,
            bytes=8,
            exact=True,
        )
        for s in range(first, first + n)
        if rounds and s % 4 == 0
    ]
    return MetricsBatch(steps=steps, rounds=rnds, control=control or [], dropped=3, seq=seq).model_dump_json()


def uniform_round(step: int, relative: float, group_size: int = 1, seconds: float = 0.001) -> RoundRecord:
    """A round whose every divergence figure is ``relative`` (for the autopilot, which reads them)."""
    return RoundRecord(
        step=step,
        group_size=group_size,
        divergence=relative,
        relative_divergence=relative,
        divergence_mean=relative,
        divergence_max=relative,
        relative_mean=relative,
        relative_max=relative,
        seconds=seconds,
        bytes=8,
        exact=True,
    )


def encoded(text: str) -> EncodedBatch:
    """A batch frame as the server keeps it once it has read it."""
    batch = decode_metrics(text)
    assert batch is not None
    return encode(batch)


def store_with_two_ranks(tmp_path) -> st.Store:
    """A started store (``tmp_path/s.db``) where ranks 0 and 1 of ``job-1`` have said hello."""
    store = st.Store(str(tmp_path / "s.db"))
    store.start()
    for rank in (0, 1):
        store.submit(
            lambda c, rank=rank: st.hello(c, Hello.model_validate_json(hello(rank=rank, pid=100 + rank)), time.time())
        ).result()
    return store


def close_of(ws, timeout: float = 10.0) -> tuple[int | None, str]:
    """Read until the server closes; its close code and reason."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=timeout)
    rcvd = info.value.rcvd
    return (rcvd.code, rcvd.reason) if rcvd else (None, "")

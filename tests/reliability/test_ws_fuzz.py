"""Both websockets fuzzed against a real ``avgctl serve``: every bad frame or claim is closed with
a code and a reason, the server stays healthy, and nothing of it is stored."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.support.frames import batch, close_of, hello
from tests.support.processes import CONTROL, WORKER, ServerProcess, wait_for

READ_ONLY = "not-a-token"
HUGE = 2 * 1024 * 1024  # over the default 1 MiB max_frame_bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("wsfuzz") / "ws.db").start()
    yield srv
    srv.stop()


def ws_url(server, path: str = "/ws/worker") -> str:
    return server.base.replace("http", "ws", 1) + path


def open_ws(server, path: str = "/ws/worker", token: str | None = WORKER):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(ws_url(server, path), additional_headers=headers, max_size=None, open_timeout=10, close_timeout=5)


def job_ids(server) -> set[str]:
    return {j["id"] for j in server.api.get("/api/jobs")}


def refusal(ws, frame: str | bytes) -> tuple[int | None, str]:
    """Send ``frame``; the server's close code and reason."""
    oversized = len(frame) > HUGE // 2
    try:
        ws.send(frame)
    except (ConnectionClosed, OSError):
        # The server closed (1009) while our oversized frame was still going out: the reset can
        # beat its close frame to us. Only an oversized frame may end this way.
        assert oversized
        return (1009, "")
    code, reason = close_of(ws)
    if code is None and oversized:
        # The same reset, landing after the send returned: the server never read the payload
        # it refused, so closing its socket resets ours and the client drops the close frame.
        return (1009, "")
    return code, reason


def refused(server, frame: str, binary: bool = False) -> tuple[int | None, str]:
    before = job_ids(server)
    with open_ws(server) as ws:
        code = refusal(ws, frame.encode() if binary else frame)
    assert server.api.get("/api/health") == {"status": "ok"}
    assert job_ids(server) == before, "a refused connection stored a job"
    return code


BAD_HELLOS = {
    "malformed JSON": ("{not json", 1008, "malformed JSON"),
    "truncated": (hello()[:-5], 1008, "malformed JSON"),
    "not an object": ('"hello"', 1008, "invalid message"),
    "array": ("[1, 2, 3]", 1008, "invalid message"),
    "null": ("null", 1008, "invalid message"),
    "no kind": ('{"job_id": "x"}', 1008, "invalid message"),
    "unknown kind": ('{"kind": "exec", "cmd": "rm -rf /"}', 1008, "invalid message"),
    "rank as text": (hello().replace('"rank":0', '"rank":"0; DROP TABLE jobs"'), 1008, "rank"),
    "rank as float": (hello().replace('"rank":0', '"rank":0.5'), 1008, "rank"),
    "world size as list": (hello().replace('"world_size":2', '"world_size":[2]'), 1008, "world_size"),
    "negative rank": (hello().replace('"rank":0', '"rank":-1'), 1008, "rank"),
    "zero world size": (hello(world_size=1).replace('"world_size":1', '"world_size":0'), 1008, "world_size"),
    "absurd world size": (hello().replace('"world_size":2', '"world_size":1000000000'), 1008, "world_size"),
    "rank not below world size": (hello(rank=2, world_size=2), 1008, "not below world size"),
    "huge rank": (hello().replace('"rank":0', '"rank":999999999999'), 1008, "rank"),
    "bad job id": (hello(job_id="x").replace('"job_id":"x"', '"job_id":"a/../b"'), 1008, "job_id"),
    "empty job id": (hello(job_id="x").replace('"job_id":"x"', '"job_id":""'), 1008, "job_id"),
    "long job id": (hello(job_id="x").replace('"job_id":"x"', '"job_id":"' + "j" * 129 + '"'), 1008, "job_id"),
    "extra field": (hello()[:-1] + ', "admin": true}', 1008, "admin"),
    "long host": (hello().replace('"host":"h"', '"host":"' + "h" * 300 + '"'), 1008, "host"),
    "metrics first": (batch(1, 2), 1008, "first frame must be a hello"),
    "ack first": ('{"kind": "ack", "command_id": 1, "status": "applied"}', 1008, "first frame must be a hello"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, 1008, ""),
    "huge frame": ("x" * HUGE, 1009, ""),
    "huge valid-looking hello": (hello()[:-1] + ', "pad": "' + "p" * HUGE + '"}', 1009, ""),
}


@pytest.mark.parametrize("name", list(BAD_HELLOS))
def test_bad_first_frame_is_closed_with_a_reason(server, name):
    frame, want_code, want_reason = BAD_HELLOS[name]
    code, reason = refused(server, frame)
    assert code == want_code, (code, reason)
    assert want_reason in reason
    if code == 1008:
        assert reason, "a policy close says why"


def test_binary_garbage_is_refused(server):
    code, reason = refused(server, "\xff\xfe\x00garbage", binary=True)
    assert code == 1008 and reason == "malformed JSON"


@pytest.mark.parametrize(
    "path,token,status",
    [("/ws/worker", None, 401), ("/ws/worker", READ_ONLY, 401), ("/ws/jobs/x", None, 401), ("/ws/jobs/x", "", 401)],
)
def test_missing_or_wrong_token_is_refused_at_the_handshake(server, path, token, status):
    with pytest.raises(InvalidStatus) as info:
        with open_ws(server, path, token):
            pass
    assert info.value.response.status_code == status
    assert b"token" in info.value.response.body


def test_bad_later_frames_close_and_keep_what_was_stored(server):
    job = "fuzz-later"
    for frame, code, reason in [
        ("{not json", 1008, "malformed JSON"),
        ('{"kind": "metrics", "steps": [{"step": "ten", "time": 0}]}', 1008, "steps.0.step"),
        ('{"kind": "metrics", "steps": {"step": 1}}', 1008, "steps"),
        ('{"kind": "metrics", "dropped": -5}', 1008, "dropped"),
        ('{"kind": "ack", "command_id": "one", "status": "applied"}', 1008, "command_id"),
        ('{"kind": "ack", "command_id": 1, "status": "applied", "applied_step": -1e400}', 1008, "applied_step"),
        (hello(job_id=job, world_size=1), 1008, "hello sent twice"),
        ("z" * HUGE, 1009, ""),
    ]:
        with open_ws(server) as ws:
            ws.send(hello(job_id=job, world_size=1))
            ws.send(batch(1, 5))
            wait_for(lambda: (server.api.try_get(f"/api/jobs/{job}") or {}).get("step") == 5, 10, what="stored")
            got_code, got_reason = refusal(ws, frame)
            assert got_code == code and reason in got_reason, (frame[:60], got_code, got_reason)
        detail = wait_for(lambda: (j := server.api.get(f"/api/jobs/{job}"))["status"] == "disconnected" and j, 10)
        assert detail["step"] == 5 and len(server.api.get(f"/api/jobs/{job}/metrics")["steps"]) == 5


def test_impossible_world_size_change_and_second_process_on_a_live_rank(server):
    job = "fuzz-claims"
    with open_ws(server) as r0:
        r0.send(hello(job_id=job, rank=0, world_size=2, pid=100))
        wait_for(lambda: server.api.try_get(f"/api/jobs/{job}"), 10, what="job")
        # Another world size while a rank is connected.
        with open_ws(server) as other:
            other.send(hello(job_id=job, rank=1, world_size=8, pid=7))
            code, reason = close_of(other)
        assert code == 1008 and "contradicts the running job" in reason and "2" not in reason
        # A second process claiming the live rank 0 (tests/reliability/test_takeover.py: all the ways).
        with open_ws(server) as other:
            other.send(hello(job_id=job, rank=0, world_size=2, pid=999))
            code, reason = close_of(other)
        assert code == 4409 and "100" not in reason
        # The live rank is untouched: still connected, still its own pid, still sending.
        r0.send(batch(1, 3))
        detail = wait_for(lambda: (j := server.api.get(f"/api/jobs/{job}"))["step"] == 3 and j, 10)
        assert detail["world_size"] == 2 and [(r["rank"], r["pid"], r["connected"]) for r in detail["ranks"]] == [
            (0, 100, True)
        ]


def test_flood_of_frames_and_connections(server):
    job = "fuzz-flood"
    # One connection sends 2,000 batches (10,000 records) as fast as it can.
    with open_ws(server) as ws:
        ws.send(hello(job_id=job, world_size=1))
        for i in range(2000):
            ws.send(batch(1 + 5 * i, 5, rounds=False))
    detail = wait_for(lambda: (j := server.api.get(f"/api/jobs/{job}"))["status"] == "finished" and j, 60)
    stored = len(server.api.get(f"/api/jobs/{job}/metrics?limit=1000000")["steps"])
    assert stored == 10_000 and detail["step"] == 10_000
    # 100 connections at once, each sending garbage: each is refused, the server stays up.
    codes: list[int | None] = []
    lock = threading.Lock()

    def garbage(i: int) -> None:
        with open_ws(server) as conn:
            conn.send("{" * (i + 1))
            code = close_of(conn)[0]
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=garbage, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [1008] * 100
    assert server.api.get("/api/health") == {"status": "ok"}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(
    field=st.sampled_from(
        ["kind", "job_id", "rank", "world_size", "host", "pid", "config", "control", "step", "extra"]
    ),
    value=JSON,
)
def test_random_hello_fields(server, field, value):
    """One hello field replaced by any JSON value: a valid hello or a 1008 with a reason, never an error."""
    body = json.loads(hello(job_id="fuzz-random", world_size=4))
    body[field] = value
    before = job_ids(server)
    with open_ws(server) as ws:
        ws.send(json.dumps(body))
        with contextlib.suppress(ConnectionClosed):  # then a bad frame, so every connection ends with our close
            ws.send('{"kind": "nonsense"}')
        code, reason = close_of(ws)
    assert code == 1008 and reason
    assert job_ids(server) <= before | {"fuzz-random"}


def live_steps(msg: dict) -> list[int]:
    """Steps in a live dashboard message: one ``metrics`` per rank, or a ``metrics_batch`` per job."""
    if msg["kind"] == "metrics":
        return [s["step"] for s in msg["steps"]]
    if msg["kind"] == "metrics_batch":
        return [s["step"] for item in msg["items"] for s in item["steps"]]
    return []


def test_dashboard_socket_fuzz(server):
    job = "fuzz-dash"
    with open_ws(server) as rank0:
        rank0.send(hello(job_id=job, world_size=1))
        wait_for(lambda: server.api.try_get(f"/api/jobs/{job}"), 10, what="job")
        # An unknown job, and job ids the path pattern refuses.
        with open_ws(server, "/ws/jobs/nope", CONTROL) as dash:
            assert close_of(dash) == (4404, "no job 'nope'")
        # Job ids outside the JobId pattern: closed with a policy code and the reason.
        for bad in ("%3Cscript%3E", "a%20b", "x" * 200, "%27%20OR%201%3D1", ".."):
            with open_ws(server, f"/ws/jobs/{bad}", CONTROL) as dash:
                assert close_of(dash) == (1008, "invalid job id")
        # A dashboard that sends garbage, floods and huge frames: ignored, or closed when too big.
        with open_ws(server, f"/ws/jobs/{job}", CONTROL) as dash:
            assert json.loads(dash.recv(timeout=10))["kind"] == "snapshot"
            for i in range(500):
                dash.send("{garbage" * (i % 7))
            dash.send(b"\x00\x01binary")
            rank0.send(batch(1, 4))
            steps: list[int] = []
            while len(steps) < 4:
                steps += live_steps(json.loads(dash.recv(timeout=10)))
            assert steps == [1, 2, 3, 4]
            # As for a worker: closed with 1009, or reset while the frame was still going out.
            assert refusal(dash, "x" * HUGE)[0] == 1009
    assert server.api.get("/api/health") == {"status": "ok"}
    assert server.api.get(f"/api/jobs/{job}")["step"] == 4

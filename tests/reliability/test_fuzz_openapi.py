"""The OpenAPI schema fuzzed with schemathesis against a real uvicorn: no input gets a 5xx.

Every operation gets ``EXAMPLES`` generated cases (derandomized, so a failure reproduces); half
of the cases that name a job name the real one, so handlers run past the 404.
"""

from __future__ import annotations

import collections

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from tests.support.frames import batch, hello
from tests.support.processes import CONTROL, WORKER, ServerProcess, wait_for

schemathesis = pytest.importorskip("schemathesis")

JOB = "fuzz-job"
EXAMPLES = 200
MIN_CASES = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A separate process: the fuzzer's generation does not compete with the server for one GIL.
    srv = ServerProcess(tmp_path_factory.mktemp("fuzz") / "fuzz.db").start()
    try:
        with connect(srv.base.replace("http", "ws", 1) + "/ws/worker", additional_headers=auth(WORKER)) as ws:
            # World size 2 with one rank: the job is left disconnected, not finished, so it takes commands.
            ws.send(hello(world_size=2).replace("job-1", JOB))
            ws.send(batch(1, 20))
            wait_for(lambda: (srv.api.try_get(f"/api/jobs/{JOB}") or {}).get("step") == 20, 10, what="the fuzz job")
            srv.api.command(JOB, {"type": "average_now"})
        yield srv
    finally:
        srv.stop()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_input_gets_a_server_error(server):
    schema_doc = server.api.get("/openapi.json")
    schema = schemathesis.openapi.from_dict(schema_doc)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    cases: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    failures: list[str] = []
    session = requests.Session()

    for operation in operations:

        @given(case=operation.as_strategy(), real_job=st.booleans())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case, real_job):
            if real_job and "job_id" in (case.path_parameters or {}):
                case.path_parameters["job_id"] = JOB
            response = case.call(base_url=server.base, session=session, headers=auth(CONTROL), timeout=10)
            cases[operation.label] += 1
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                failures.append(f"{operation.label}: {response.status_code} for {case.as_curl_command()}")

        fuzz()

    session.close()
    assert failures == [], "\n".join(failures[:10])
    assert sum(cases.values()) >= MIN_CASES, cases
    # Every endpoint was called; those with parameters got their full share (the others have
    # nothing to vary: hypothesis stops once it has tried every distinct case).
    assert set(cases) == {op.label for op in operations}
    assert all(cases[op.label] == EXAMPLES for op in operations if op.path_parameters or op.query or op.body), cases
    assert statuses[200] and statuses[202] and statuses[422], statuses  # past validation, and refused by it
    assert server.api.get("/api/health") == {"status": "ok"}

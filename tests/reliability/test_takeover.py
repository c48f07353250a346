"""A worker token cannot take over a job: it proves a role, not membership of a job.

Every worker of every job holds the same worker token. What only a job's own processes hold is
the job's secret, agreed through their own torch.distributed store: without it a hello is refused
(4403), a live rank is replaced only by its own link (else 4409), and no refusal names the real
rank's host, pid or the job's world size. Acks count only for commands delivered to that very
connection, and control versions move only as far as the job's own commands can take them.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from avgctl.protocol import CommandAck, ControlEvent, ControlView, Hello
from avgctl.server import store as st
from avgctl.server.store import schema, writes
from avgctl.worker.link import connect as link_connect
from tests.support.fakes import FakeAverager
from tests.support.frames import JOB_SECRET, batch, close_of, hello
from tests.support.polling import wait_for as wait_briefly
from tests.support.processes import CONTROL, WORKER, ServerProcess, Workers, stop_tree, torchrun_demo, wait_for
from tests.support.servers import make_settings, running_server

GUESSED = "a-guessed-secret-0123456789abcdef"
REAL_LINK = "the-real-links-id-never-disclosed"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("takeover") / "takeover.db").start()
    yield srv
    srv.stop()


def worker_url(base: str) -> str:
    return base.replace("http", "ws", 1) + "/ws/worker"


def open_ws(base: str):
    return connect(worker_url(base), additional_headers={"Authorization": f"Bearer {WORKER}"}, max_size=None)


def attempt(base: str, frame: str) -> tuple[int | None, str, list[dict]]:
    """Say ``frame`` as a newcomer: the close code and reason, and every frame received before."""
    received: list[dict] = []
    with open_ws(base) as ws:
        ws.send(frame)
        try:
            while True:
                received.append(json.loads(ws.recv(timeout=10)))
        except ConnectionClosed as err:
            rcvd = err.rcvd
    return (rcvd.code, rcvd.reason, received) if rcvd else (None, "", received)


def ack(command_id: int, control: ControlView | None, step: int = 1) -> str:
    return CommandAck(command_id=command_id, status="applied", applied_step=step, control=control).model_dump_json()


def job_of(server, job: str) -> dict | None:
    return server.api.try_get(f"/api/jobs/{job}")


# ------------------------------------------------------------------------------ one connection at a time


def test_a_live_rank_is_replaced_only_by_its_own_link_and_no_refusal_names_its_process(server):
    job = "live-rank"
    real_hello = hello(job_id=job, world_size=2, host="real-host-7", pid=31337, link=REAL_LINK)
    with open_ws(server.base) as real:
        real.send(real_hello)
        wait_for(lambda: job_of(server, job), 10, what="job")
        attacks = {
            "another process": (hello(job_id=job, world_size=2, host="attacker", pid=999, job_secret=GUESSED), 4409),
            "its host and pid replayed": (
                hello(job_id=job, world_size=2, host="real-host-7", pid=31337, job_secret=GUESSED),
                4409,
            ),
            "replayed with a guessed link": (
                hello(job_id=job, world_size=2, host="real-host-7", pid=31337, link="guessed", job_secret=GUESSED),
                4409,
            ),
            "the job's secret from another link": (
                hello(job_id=job, world_size=2, host="real-host-7", pid=31337, link="another"),
                4409,
            ),
            "its link without the secret": (
                hello(job_id=job, world_size=2, host="real-host-7", pid=31337, link=REAL_LINK, job_secret=GUESSED),
                4403,
            ),
        }
        for name, (frame, expected) in attacks.items():
            code, reason, received = attempt(server.base, frame)
            assert code == expected, (name, code, reason)
            assert received == [], name
            for secret in ("real-host-7", "31337", "world size", REAL_LINK):
                assert secret not in reason, (name, reason)
        # The live rank is untouched: still connected, still its own process, still sending.
        real.send(batch(1, 3))
        detail = wait_for(lambda: (j := job_of(server, job)) and j["step"] == 3 and j, 10, what="steps")
        assert [(r["rank"], r["host"], r["pid"], r["connected"]) for r in detail["ranks"]] == [
            (0, "real-host-7", 31337, True)
        ]
        # The link's own reconnection (its old socket half-open after a blip) takes the rank over.
        with open_ws(server.base) as again:
            again.send(real_hello)
            assert close_of(real)[0] == 4000
            again.send(batch(4, 2))
            wait_for(lambda: job_of(server, job)["step"] == 5, 10, what="steps after the reconnection")


def test_another_world_size_is_refused_without_naming_the_jobs(server):
    job = "world-size"
    with open_ws(server.base) as r0:
        r0.send(hello(job_id=job, rank=0, world_size=2))
        wait_for(lambda: job_of(server, job), 10, what="job")
        code, reason, _ = attempt(server.base, hello(job_id=job, rank=1, world_size=8, pid=7))
        assert (code, reason) == (1008, "world size 8 contradicts the running job")
        # Without the secret nothing about the job is compared at all.
        code, reason, _ = attempt(server.base, hello(job_id=job, rank=1, world_size=8, pid=7, job_secret=GUESSED))
        assert (code, reason) == (4403, "not a process of this job")
    assert job_of(server, job)["world_size"] == 2


def test_acks_count_only_for_delivered_commands_and_reachable_versions(server):
    job, api = "acks", server.api

    def control() -> dict:
        return job_of(server, job)["control"]

    with open_ws(server.base) as r0:
        r0.send(hello(job_id=job, world_size=1, link="acks-link"))
        wait_for(lambda: job_of(server, job), 10, what="job")
        # An ack for a command id never delivered: ignored, and the connection stays open.
        r0.send(ack(999999, ControlView(period=777, warmup_steps=0, version=10**9)))
        r0.send(batch(1, 2))
        wait_for(lambda: job_of(server, job)["step"] == 2, 10, what="steps after the ack")
        assert (control()["period"], control()["version"]) == (4, 0)
        scrape = httpx.get(server.base + "/metrics", headers={"Authorization": f"Bearer {CONTROL}"}).text
        assert "avgctl_ignored_acks_total 1.0" in scrape
        # Delivered, but with a version the job's own commands cannot have reached: the command is
        # resolved, the control view ignored (it would hide every real update after it).
        first = api.command(job, {"type": "set_period", "period": 8})
        assert json.loads(r0.recv(timeout=10))["id"] == first["id"]
        r0.send(ack(first["id"], ControlView(period=777, warmup_steps=0, version=10**9)))
        assert api.wait_done(job, first, 10)["status"] == "applied"
        assert (control()["period"], control()["version"]) == (4, 0)
        # The next one, one version on: taken.
        second = api.command(job, {"type": "set_period", "period": 8})
        assert json.loads(r0.recv(timeout=10))["id"] == second["id"]
        r0.send(ack(second["id"], ControlView(period=8, warmup_steps=0, version=1)))
        api.wait_done(job, second, 10)
        wait_for(lambda: control()["version"] == 1, 10, what="control version 1")
        assert control()["period"] == 8
        # A control event past reach in a metrics batch: stored as history, not taken as the job's view.
        far = ControlEvent(step=3, control=ControlView(period=777, warmup_steps=0, version=10**9))
        r0.send(batch(3, 2, control=[far]))
        wait_for(lambda: job_of(server, job)["step"] == 4, 10, what="steps with the event")
        assert (control()["period"], control()["version"]) == (8, 1)


def stored_steps(srv: ServerProcess, job: str) -> int:
    found = srv.api.try_get(f"/api/jobs/{job}/metrics")  # None (404) until the job's first hello is stored
    return len(found["steps"]) if found else 0


def test_a_finished_jobs_history_and_commands_are_closed_to_hellos_without_its_secret(tmp_path):
    job = "finished-job"
    srv = ServerProcess(tmp_path / "finished.db").start()
    try:
        for rank in (0, 1):
            with open_ws(srv.base) as ws:
                ws.send(hello(job_id=job, rank=rank, world_size=2, pid=100 + rank))
                ws.send(batch(0, 50))
                wait_for(lambda: stored_steps(srv, job) == 50 * (rank + 1), 10)
                if rank == 1:  # rank 0 has left: the command waits for it until the job finishes
                    pending = srv.api.command(job, {"type": "average_now"})
        wait_for(lambda: job_of(srv, job)["status"] == "finished", 10, what="finished")
        rejected = srv.api.get(f"/api/jobs/{job}/commands/{pending['id']}")
        assert (rejected["status"], rejected["reason"]) == ("rejected", writes.FINISHED_REASON)
        history = srv.api.get(f"/api/jobs/{job}/metrics")
        srv.stop()  # the binding is in the store: a restarted server keeps it
        srv.start()
        for frame in (
            hello(job_id=job, rank=0, world_size=2, pid=100, job_secret=GUESSED),  # the rank's own identity
            hello(job_id=job, rank=0, world_size=5, pid=100, job_secret=GUESSED),  # a new world size
        ):
            with open_ws(srv.base) as ws:
                ws.send(frame)
                # Whatever it sends after its hello finds the door closed.
                for message in (batch(0, 50, rank_loss=9.0), ack(pending["id"], ControlView(period=9, warmup_steps=0))):
                    try:
                        ws.send(message)
                    except ConnectionClosed:
                        break
                code, reason = close_of(ws)
            assert (code, reason) == (4403, "not a process of this job")
        detail = job_of(srv, job)
        assert (detail["status"], detail["world_size"], [r["rank"] for r in detail["ranks"]]) == ("finished", 2, [0, 1])
        assert srv.api.get(f"/api/jobs/{job}/metrics") == history
        assert srv.api.get(f"/api/jobs/{job}/commands/{pending['id']}") == rejected
        # The job's own process (its secret) is still welcome; the first command it gets is a new one.
        with open_ws(srv.base) as ws:
            ws.send(hello(job_id=job, rank=0, world_size=2, pid=100))
            wait_for(lambda: job_of(srv, job)["status"] == "running", 10, what="running again")
            fresh = srv.api.command(job, {"type": "average_now"})
            assert json.loads(ws.recv(timeout=10))["id"] == fresh["id"]
    finally:
        srv.stop()


def test_a_job_stored_before_secrets_is_bound_by_its_next_hello(tmp_path):
    path = str(tmp_path / "v2.db")
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in schema.MIGRATIONS[:2]:
        migration(conn)
    conn.execute("PRAGMA user_version = 2")
    conn.execute(
        "INSERT INTO jobs (id, world_size, status, control, autotune, created_at, updated_at)"
        " VALUES ('old', 1, 'finished', ?, '{\"enabled\":false,\"target_divergence\":null}', 1.0, 1.0)",
        (ControlView(period=4, warmup_steps=0).model_dump_json(),),
    )
    conn.close()
    store = st.Store(path)
    store.start()
    try:

        def say(secret: str) -> None:
            frame = Hello.model_validate_json(hello(job_id="old", world_size=1, job_secret=secret))
            store.submit(lambda c: st.hello(c, frame, time.time())).result()

        say(JOB_SECRET)  # binds the job
        with pytest.raises(writes.NotMember):
            say(GUESSED)
        say(JOB_SECRET)
    finally:
        store.close()
    ((stored,),) = sqlite3.connect(path).execute("SELECT secret_hash FROM jobs").fetchall()
    assert stored == writes.secret_hash(JOB_SECRET) and JOB_SECRET not in stored


# ------------------------------------------------------------------------------ the link's side


FAST = {"refused_delays": lambda: iter([0.05, 0.1, 0.2] + [0.3] * 1000), "send_interval": 0.05}


def steps_of(base: str, job: str) -> list[int]:
    out = httpx.get(f"{base}/api/jobs/{job}/metrics", headers={"Authorization": f"Bearer {CONTROL}"}, timeout=5)
    return [s["step"] for s in out.json()["steps"]] if out.status_code == 200 else []


def test_a_link_refused_for_its_secret_keeps_trying_and_gets_in_with_its_checkpoints_secret(tmp_path, caplog):
    with running_server(make_settings(tmp_path)) as server:
        with open_ws(server.url) as first:  # the job's first run bound it to JOB_SECRET
            first.send(hello(job_id="late-secret", world_size=1))
            first.send(batch(1, 2))
            wait_briefly(lambda: steps_of(server.url, "late-secret") == [1, 2])
        averager = FakeAverager(rank=0, world_size=1)
        averager.job_secret = "a-fresh-secret-before-the-checkpoint"
        link = link_connect(averager, server=server.url, job_id="late-secret", token=WORKER, **FAST)
        try:
            wait_briefly(lambda: link.refused is not None and link.refused[0] == 4403, what="refused with 4403")
            assert link.error is None and link._thread.is_alive()
            wait_briefly(lambda: "not a process of this job" in caplog.text, what="a warning saying why")
            assert any(
                r.levelname == "WARNING" and "refused rank 0 of job late-secret" in r.message for r in caplog.records
            )
            averager.job_secret = JOB_SECRET  # what load_state_dict does with the job's checkpoint
            for _ in range(3):
                averager.train_step()
            wait_briefly(lambda: steps_of(server.url, "late-secret") == [1, 2, 3], what="the link got in")
        finally:
            link.close()


def test_a_link_refused_because_its_rank_is_connected_elsewhere_gets_in_once_that_closes(tmp_path):
    with running_server(make_settings(tmp_path)) as server:
        averager = FakeAverager(rank=0, world_size=1)
        with open_ws(server.url) as holder:  # a restarted rank's predecessor, its connection not yet closed
            holder.send(hello(job_id="held", world_size=1, link="the-predecessors-link"))
            wait_briefly(lambda: _exists(server.url, "held"))
            link = link_connect(averager, server=server.url, job_id="held", token=WORKER, **FAST)
            wait_briefly(lambda: link.refused is not None and link.refused[0] == 4409, what="refused with 4409")
            assert link.error is None and link._thread.is_alive()
        try:
            for _ in range(2):
                averager.train_step()
            wait_briefly(lambda: steps_of(server.url, "held") == [1, 2], what="the link got in")
        finally:
            link.close()


def _exists(base: str, job: str) -> bool:
    return (
        httpx.get(f"{base}/api/jobs/{job}", headers={"Authorization": f"Bearer {CONTROL}"}, timeout=5).status_code
        == 200
    )


# ------------------------------------------------------------------------------ real jobs

# A second process that plays the impostor as fast as it can: connect, hello as rank 0 with the
# real rank 0's host and pid (read from the API) and a guessed secret and link, close, again.
ATTACKER = textwrap.dedent(
    """
    import json, secrets, sys, time
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect
    from avgctl.protocol import AveragerConfig, ControlView, Hello

    url, token, job, host, pid, seconds, out = sys.argv[1:]
    codes, commands, attempts = {}, 0, 0
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        frame = Hello(
            job_id=job, rank=0, world_size=2, host=host, pid=int(pid),
            config=AveragerConfig(kind="periodic", period=4, warmup_steps=0),
            control=ControlView(period=4, warmup_steps=0),
            link=secrets.token_hex(16), job_secret=secrets.token_hex(16),
        ).model_dump_json()
        code = None
        try:
            with connect(url, additional_headers={"Authorization": "Bearer " + token}, open_timeout=5) as ws:
                ws.send(frame)
                try:
                    while True:
                        if json.loads(ws.recv(timeout=0.3)).get("kind") == "command":
                            commands += 1
                except ConnectionClosed as err:
                    code = err.rcvd.code if err.rcvd else None
                except TimeoutError:
                    code = "accepted"
        except Exception as err:
            code = type(err).__name__
        codes[str(code)] = codes.get(str(code), 0) + 1
        attempts += 1
    with open(out, "w") as f:
        json.dump({"attempts": attempts, "codes": codes, "commands": commands}, f)
    """
)


def start_attacker(server, job: str, rank0: dict, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            ATTACKER,
            worker_url(server.base),
            WORKER,
            job,
            rank0["host"],
            str(rank0["pid"]),
            str(seconds),
            str(out),
        ]
    )


def both_connected(api, job: str) -> dict | None:
    data = api.try_get(f"/api/jobs/{job}")
    return data if data and len(data["ranks"]) == 2 and all(r["connected"] for r in data["ranks"]) else None


def rank_of(job: dict, r: int) -> dict:
    return next(x for x in job["ranks"] if x["rank"] == r)


def replayed_identity_is_refused(server, job: str, rank0: dict) -> None:
    frame = hello(job_id=job, world_size=2, host=rank0["host"], pid=rank0["pid"], job_secret=GUESSED)
    code, reason, received = attempt(server.base, frame)
    assert code in (4403, 4409) and received == [], (code, reason)


@pytest.mark.dist
def test_an_impostor_racing_a_real_two_rank_job_gets_nothing_and_costs_it_nothing(server, tmp_path):
    api, job = server.api, "race"
    workers = Workers(
        server.base, job, "--steps", "100000", "--step-delay", "0.01", "--period", "4", log=tmp_path / "w.log"
    )
    try:
        first = wait_for(lambda: both_connected(api, job), 60, what="both ranks connected")
        pids = {r["rank"]: r["pid"] for r in first["ranks"]}
        out = tmp_path / "attacker.json"
        attacker = start_attacker(server, job, rank_of(first, 0), 8.0, out)
        samples, applied = [], []
        try:
            start_step = api.get(f"/api/jobs/{job}")["step"]
            for body in (
                {"type": "set_period", "period": 8},
                {"type": "pause_averaging"},
                {"type": "resume_averaging"},
            ):
                applied.append(api.wait_done(job, api.command(job, body), 30))
                samples.append(api.get(f"/api/jobs/{job}"))
            while attacker.poll() is None:
                samples.append(api.get(f"/api/jobs/{job}"))
                time.sleep(0.2)  # a sampling rate, not a wait for an event
        finally:
            attacker.wait(60)
        result = json.loads(out.read_text())
        assert result["commands"] == 0, result
        assert result["attempts"] >= 10 and set(result["codes"]) <= {"4403", "4409"}, result
        assert [c["status"] for c in applied] == ["applied"] * 3
        # The job's own ranks never left: every sample has both connected, as the same processes.
        for sample in samples:
            assert {r["rank"]: (r["pid"], r["connected"]) for r in sample["ranks"]} == {
                r: (pid, True) for r, pid in pids.items()
            }
        end = api.get(f"/api/jobs/{job}")
        assert end["control"]["period"] == 8 and not end["control"]["averaging_paused"]
        assert end["step"] > start_step + 50  # metrics kept arriving through the attack
    finally:
        workers.stop()


@pytest.mark.dist
def test_a_torchrun_restart_keeps_the_job_under_its_secret(server, tmp_path):
    # No checkpoint: the restarted attempt's ranks find the secret in torchrun's agent store.
    api, job = server.api, "restarted"
    proc = torchrun_demo(
        server, job, tmp_path / "w.log", "--steps", "300", "--step-delay", "0.02", "--quiet", restarts=1
    )
    try:
        first = wait_for(lambda: both_connected(api, job), 60, what="both ranks connected")
        wait_for(lambda: api.get(f"/api/jobs/{job}")["step"] >= 40, 60, what="step 40")
        os.kill(rank_of(first, 1)["pid"], signal.SIGKILL)
        again = wait_for(
            lambda: (
                (j := both_connected(api, job))
                and all(r["pid"] != rank_of(first, r["rank"])["pid"] for r in j["ranks"])
                and j
            ),
            90,
            what="both ranks back with new pids",
        )
        replayed_identity_is_refused(server, job, rank_of(again, 0))
        assert proc.wait(120) == 0, (tmp_path / "w.log").read_text()[-3000:]
        final = api.get(f"/api/jobs/{job}")
        assert final["status"] == "finished" and final["step"] == 299
    finally:
        stop_tree(proc)


@pytest.mark.dist
def test_a_server_restart_keeps_the_job_under_its_secret(tmp_path):
    srv = ServerProcess(tmp_path / "restart.db").start()
    api, job = srv.api, "server-restart"
    workers = Workers(
        srv.base, job, "--steps", "100000", "--step-delay", "0.01", "--period", "4", log=tmp_path / "w.log"
    )
    try:
        first = wait_for(lambda: both_connected(api, job), 60, what="both ranks connected")
        srv.kill()
        srv.start()
        back = wait_for(lambda: both_connected(api, job), 60, what="both ranks back")
        assert {r["pid"] for r in back["ranks"]} == {r["pid"] for r in first["ranks"]}
        step = back["step"]
        wait_for(lambda: api.get(f"/api/jobs/{job}")["step"] > step + 20, 30, what="metrics after the restart")
        assert api.wait_done(job, api.command(job, {"type": "set_period", "period": 6}), 30)["status"] == "applied"
        replayed_identity_is_refused(srv, job, rank_of(back, 0))
        assert both_connected(api, job)
    finally:
        workers.stop()
        srv.stop()

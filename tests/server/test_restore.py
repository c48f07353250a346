"""A job resumed from a checkpoint: the commands its restored control state lacks are marked rolled
back (still ``applied``), the job's control is the restored one, and a labelled control event at the
resume step says so, in REST, in dashboards' streams and snapshots, and in ``avgctl commands``."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import pytest
from websockets.sync.client import connect as ws_connect

from avgctl.protocol import ControlView, Hello
from avgctl.server import cli
from avgctl.server import store as st
from avgctl.server.cli.client import Client
from tests.support.fakes import SteppedRank
from tests.support.frames import batch, encoded, hello
from tests.support.polling import wait_for
from tests.support.servers import CONTROL, ServerThread, make_settings, running_server

JOB = "restore-job"
LABEL = "restored from checkpoint (version 3 -> 1)"


@pytest.fixture
def server(tmp_path) -> Iterator[ServerThread]:
    with running_server(make_settings(tmp_path)) as srv:
        yield srv


@pytest.fixture
def api(server) -> Client:
    return Client(server.url, CONTROL)


def _command(api: Client, rank: SteppedRank, body: dict) -> dict:
    """Post ``body``, have the rank apply it at its step, and return it once the server stored that."""
    cmd = api.request("POST", f"/api/jobs/{JOB}/commands", body)
    ack = rank.apply()
    assert ack.status == "applied", ack
    path = f"/api/jobs/{JOB}/commands/{cmd['id']}"
    return wait_for(lambda: (c := api.get(path))["status"] == "applied" and c, what=f"command {cmd['id']} applied")


def _crash_and_resume(api: Client, rank: SteppedRank, checkpoint) -> None:
    rank.crash()
    wait_for(lambda: not api.get(f"/api/jobs/{JOB}")["ranks"][0]["connected"], what="rank 0 gone")
    rank.resume(checkpoint)
    wait_for(lambda: api.get(f"/api/jobs/{JOB}")["ranks"][0]["connected"], what="rank 0 back")


def _events(api: Client) -> list[dict]:
    return api.get(f"/api/jobs/{JOB}/metrics")["control_events"]


def _history(api: Client, rank: SteppedRank) -> tuple[dict, tuple]:
    """Periods 8 (version 1, step 100), a checkpoint at step 150, then 16 (2, step 200) and paused
    averaging (3, step 332); returns the commands by version and the checkpoint."""
    rank.connect()
    wait_for(lambda: api.try_get(f"/api/jobs/{JOB}"), what="the job's hello stored")
    rank.run(100)
    v1 = _command(api, rank, {"type": "set_period", "period": 8})
    rank.run(50)
    checkpoint = rank.checkpoint()
    rank.run(50)
    v2 = _command(api, rank, {"type": "set_period", "period": 16})
    rank.run(132)
    v3 = _command(api, rank, {"type": "pause_averaging"})
    wait_for(lambda: api.get(f"/api/jobs/{JOB}")["step"] == 332, what="step 332 stored")
    return {1: v1, 2: v2, 3: v3}, checkpoint


def test_a_resume_from_a_checkpoint_rolls_back_the_commands_it_lacks(server, api, capsys):
    rank = SteppedRank(server.url, JOB)
    with contextlib.ExitStack() as sockets:
        sockets.callback(rank.close)
        by_version, checkpoint = _history(api, rank)
        assert [(c["control_version"], c["applied_step"]) for c in by_version.values()] == [
            (1, 100),
            (2, 200),
            (3, 332),
        ]
        url = server.url.replace("http", "ws", 1) + f"/ws/jobs/{JOB}"
        dashboard = sockets.enter_context(ws_connect(url, additional_headers={"Authorization": f"Bearer {CONTROL}"}))
        assert json.loads(dashboard.recv(10))["kind"] == "snapshot"
        pending = api.request("POST", f"/api/jobs/{JOB}/commands", {"type": "average_now"})  # never applied

        _crash_and_resume(api, rank, checkpoint)  # step 150, version 1

        log = {c["id"]: c for c in api.get(f"/api/jobs/{JOB}/commands")}
        kept, undone = by_version[1], [by_version[2], by_version[3]]
        assert log[kept["id"]]["rolled_back_at_step"] is None and log[kept["id"]]["rolled_back_at"] is None
        for cmd in undone:
            now = log[cmd["id"]]
            assert now["status"] == "applied" and now["applied_step"] == cmd["applied_step"]  # as the contract says
            assert now["rolled_back_at_step"] == 150 and now["rolled_back_at"] >= cmd["updated_at"]
        assert log[pending["id"]]["status"] == "pending" and log[pending["id"]]["rolled_back_at_step"] is None

        job = api.get(f"/api/jobs/{JOB}")
        assert (job["control"]["version"], job["control"]["period"], job["control"]["averaging_paused"]) == (
            1,
            8,
            False,
        )
        restored = _events(api)[-1]
        assert restored == {
            "rank": 0,
            "step": 150,
            "control": ControlView(period=8, warmup_steps=0, version=1).model_dump(mode="json"),
            "note": LABEL,
        }
        assert all("note" not in e for e in _events(api)[:-1])  # the ranks' own events carry none

        # A dashboard watching gets the event and the two commands as they are now.
        events, rolled_back = [], []
        while len(rolled_back) < 2 or not events:
            msg = json.loads(dashboard.recv(10))
            if msg["kind"] == "control_event":
                events.append(msg["event"])
            elif msg["kind"] == "command" and msg["command"]["id"] != pending["id"]:
                rolled_back.append(msg["command"])
        assert events == [restored]
        assert [(c["id"], c["rolled_back_at_step"]) for c in rolled_back] == [(c["id"], 150) for c in undone]
        # A dashboard opening now finds them in its snapshot.
        with ws_connect(url, additional_headers={"Authorization": f"Bearer {CONTROL}"}) as late:
            snapshot = json.loads(late.recv(10))
        assert snapshot["control_events"][-1] == restored
        assert [c["rolled_back_at_step"] for c in snapshot["commands"]] == [None, 150, 150, None]

        # avgctl commands JOB: their status reads "rolled back", and why.
        capsys.readouterr()
        assert cli.main(["commands", JOB, "--server", server.url, "--token", CONTROL]) == 0
        rows = {int(line.split()[0]): line for line in capsys.readouterr().out.splitlines()[1:]}
        assert "rolled back" not in rows[kept["id"]]
        for cmd in undone:
            assert rows[cmd["id"]].split()[4:6] == ["rolled", "back"]
            assert "rolled back at step 150 (the job resumed from a checkpoint taken before it)" in rows[cmd["id"]]

        # The resumed job reconnecting at its own state undoes nothing more.
        rank.run(10)
        _crash_and_resume(api, rank, rank.checkpoint())
        assert len(_events(api)) == len(snapshot["control_events"])
        assert [c["rolled_back_at_step"] for c in api.get(f"/api/jobs/{JOB}/commands")] == [None, 150, 150, None]


def test_a_second_resume_rolls_back_only_what_was_applied_since_the_first(server, api):
    rank = SteppedRank(server.url, JOB)
    try:
        by_version, checkpoint = _history(api, rank)
        _crash_and_resume(api, rank, checkpoint)
        rank.run(20)
        again = _command(api, rank, {"type": "set_period", "period": 12})  # version 2 once more
        assert again["control_version"] == 2 and again["applied_step"] == 170
        _crash_and_resume(api, rank, checkpoint)
        steps = {c["id"]: c["rolled_back_at_step"] for c in api.get(f"/api/jobs/{JOB}/commands")}
        assert steps == {
            by_version[1]["id"]: None,
            by_version[2]["id"]: 150,
            by_version[3]["id"]: 150,
            again["id"]: 150,
        }
        notes = [e["note"] for e in _events(api) if "note" in e]
        assert notes == [LABEL, "restored from checkpoint (version 2 -> 1)"]
    finally:
        rank.close()


def _say_hello(store: st.Store, **kw) -> st.writes.Restore | None:
    msg = Hello.model_validate_json(hello(world_size=1, **kw))
    return store.submit(lambda c: st.hello(c, msg, time.time())).result()


def test_a_step_behind_at_the_same_version_is_a_restore_with_nothing_to_roll_back(tmp_path):
    store = st.Store(str(tmp_path / "s.db"))
    store.start()
    try:
        view = ControlView(period=4, warmup_steps=0, version=2)
        assert _say_hello(store, control=view) is None  # the job's first hello
        assert store.add_metrics("job-1", 0, encoded(batch(1, 40)))
        store.submit(lambda c: None).result()
        assert _say_hello(store, control=view, step=40) is None  # a reconnect where it was
        assert _say_hello(store, control=view) is None  # step 0 at the same version: a new start, nothing undone
        store.add_metrics("job-1", 0, encoded(batch(1, 40)))
        store.submit(lambda c: None).result()
        restore = _say_hello(store, control=view, step=24)
        assert restore is not None and restore.rolled_back == [] and (restore.step, restore.from_step) == (24, 40)
        assert restore.event["note"] == "restored from checkpoint (version 2)"
        assert _say_hello(store, control=ControlView(period=4, warmup_steps=0, version=0)).event["note"] == (
            "restarted from step 0 (version 2 -> 0)"
        )
    finally:
        store.close()

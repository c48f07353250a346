"""``avgctl set-outer-lr`` and a DiLoCo job's ``avgctl status``, end to end against a real server
(uvicorn on a free port, SQLite) and fake ranks that apply commands with the workers' own rules."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from avgctl.protocol.commands import NOT_DILOCO
from avgctl.server import cli
from avgctl.server.cli.client import Client
from avgctl.worker import control_state as cs
from tests.support.fakes import FakeJob, stored_fake_job
from tests.support.polling import wait_for
from tests.support.servers import CONTROL, ServerThread, make_settings, running_server

DILOCO, FLAT = "cli-diloco", "cli-flat"


@pytest.fixture
def server(tmp_path) -> Iterator[ServerThread]:
    with running_server(make_settings(tmp_path)) as srv:
        yield srv


def _job(server: ServerThread, job_id: str, state: cs.ControlState) -> Iterator[FakeJob]:
    yield from stored_fake_job(server.url, CONTROL, job_id, state, world_size=2, outer_lr=0.7)


@pytest.fixture
def diloco(server) -> Iterator[FakeJob]:
    yield from _job(server, DILOCO, cs.diloco_state(4, 0))


@pytest.fixture
def flat(server) -> Iterator[FakeJob]:
    yield from _job(server, FLAT, cs.periodic_state(4, 0))


def run(capsys, server: ServerThread, *argv: str) -> tuple[int, str, str]:
    """``avgctl ARGV --server URL --token T`` in this process: exit code, stdout, stderr."""
    code = cli.main([*argv, "--server", server.url, "--token", CONTROL])
    out, err = capsys.readouterr()
    return code, out, err


def test_set_outer_lr_is_applied_and_status_shows_the_outer_lr_in_force(server, diloco, capsys):
    api = Client(server.url, CONTROL)
    wait_for(lambda: api.get(f"/api/jobs/{DILOCO}/metrics?ranks=0&names=outer_lr")["rounds"], what="a DiLoCo round")
    code, out, _ = run(capsys, server, "status", DILOCO)
    assert code == 0
    assert "DiLoCo: outer lr 0.7 (the optimizer's, at the round of step " in out  # what its rounds report

    code, out, err = run(capsys, server, "set-outer-lr", DILOCO, "0.35")
    assert (code, err) == (0, ""), err
    assert out.startswith("command 1 (set_outer_lr) applied at step ")

    code, out, _ = run(capsys, server, "status", DILOCO)
    assert "DiLoCo: outer lr 0.35 (set_outer_lr)" in out
    code, out, _ = run(capsys, server, "commands", DILOCO)
    assert "set_outer_lr  lr=0.35" in out

    code, out, err = run(capsys, server, "--json", "set-outer-lr", DILOCO, "2e-1")
    assert (code, err) == (0, ""), err
    sent = json.loads(out)
    assert (sent["status"], sent["command"]) == ("applied", {"type": "set_outer_lr", "lr": 0.2})
    assert sent["control_version"] == 2
    assert api.get(f"/api/jobs/{DILOCO}")["control"]["outer_lr"] == 0.2


@pytest.mark.parametrize("bad", ["x", "0", "-1", "nan", "inf", "1e999", ""])
def test_a_bad_lr_is_refused_by_the_cli_with_the_argument_named(bad, capsys):
    with pytest.raises(SystemExit) as exited:  # before any request: no server needed
        cli.main(["set-outer-lr", DILOCO, bad, "--server", "http://127.0.0.1:9"])
    assert exited.value.code == 2
    assert f"argument LR: expected a finite number above 0, got {bad!r}" in capsys.readouterr().err


def test_what_the_server_refuses_is_a_usage_error_with_its_reason(server, diloco, flat, capsys):
    code, out, err = run(capsys, server, "set-outer-lr", FLAT, "0.35")
    assert (code, out) == (2, "")
    assert NOT_DILOCO in err
    code, out, err = run(capsys, server, "set-outer-lr", DILOCO, "2e6")  # above the protocol's bound
    assert (code, out) == (2, "")
    assert "lr" in err and "1000000" in err
    code, out, _ = run(capsys, server, "status", FLAT)
    assert code == 0 and "outer lr" not in out
    assert Client(server.url, CONTROL).get(f"/api/jobs/{FLAT}/commands") == []

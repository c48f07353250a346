"""The CLI's whole surface against a real server (uvicorn on a free port, SQLite) and fake ranks that
apply commands with the workers' own rules: every REST command has a subcommand that waits for its
outcome, ``--json`` prints what scripts parse, and arguments the CLI or the server refuse read well."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from avgctl.protocol.bounds import MAX_PERIOD
from avgctl.server import cli
from avgctl.server.cli.client import Client
from avgctl.worker import control_state as cs
from tests.support.fakes import FakeJob, stored_fake_job
from tests.support.servers import CONTROL, READ, ServerThread, make_settings, running_server

FLAT, TIERED = "cli-flat", "cli-tiered"  # a periodic job; a hierarchical one (groups of 2 and of 4)


@pytest.fixture
def server(tmp_path) -> Iterator[ServerThread]:
    with running_server(make_settings(tmp_path)) as srv:
        yield srv


def _job(server: ServerThread, job_id: str, state: cs.ControlState) -> Iterator[FakeJob]:
    yield from stored_fake_job(server.url, CONTROL, job_id, state, world_size=4)


@pytest.fixture
def flat(server) -> Iterator[FakeJob]:
    yield from _job(server, FLAT, cs.periodic_state(4, 0))


@pytest.fixture
def tiered(server) -> Iterator[FakeJob]:
    yield from _job(server, TIERED, cs.hierarchical_state((2, 4), (2, 4), 0))


def run(capsys, server: ServerThread, *argv: str, token: str = CONTROL) -> tuple[int, str, str]:
    """``avgctl ARGV --server URL --token T`` in this process: exit code, stdout, stderr."""
    code = cli.main([*argv, "--server", server.url, "--token", token])
    out, err = capsys.readouterr()
    return code, out, err


def test_set_hierarchy_is_applied_and_status_shows_every_level(server, tiered, capsys):
    code, out, _ = run(capsys, server, "status", TIERED)
    assert code == 0
    assert "hierarchy (group size -> period): groups of 2 every 2 steps, groups of 4 every 4 steps" in out
    assert "period 4," not in out  # one period would hide the lower level's

    code, out, err = run(capsys, server, "set-hierarchy", TIERED, "4=6", "2=3")
    assert (code, err) == (0, ""), err
    assert out.startswith("command 1 (set_hierarchy) applied at step ")

    code, out, _ = run(capsys, server, "status", TIERED)
    assert "groups of 2 every 3 steps, groups of 4 every 6 steps" in out
    code, out, _ = run(capsys, server, "jobs")
    assert "2=3 4=6" in out  # the form set-hierarchy takes
    log = Client(server.url, CONTROL).get(f"/api/jobs/{TIERED}/commands")
    assert log[0]["command"] == {"type": "set_hierarchy", "periods": {"2": 3, "4": 6}}


def test_autotune_switches_the_autopilot_on_with_a_target_and_off(server, flat, capsys):
    api = Client(server.url, CONTROL)
    code, out, err = run(capsys, server, "autotune", FLAT, "on", "--target", "0.25")
    assert (code, err) == (0, ""), err
    assert "(set_autotune) applied" in out
    assert api.get(f"/api/jobs/{FLAT}")["control"]["autotune"]["enabled"] is True
    assert api.get(f"/api/jobs/{FLAT}")["control"]["autotune"]["target_divergence"] == 0.25
    code, out, _ = run(capsys, server, "status", FLAT)
    assert "autotune " in out and "target 0.25" in out

    code, out, err = run(capsys, server, "autotune", FLAT, "off", "--json")
    assert (code, err) == (0, "")
    answer = json.loads(out)
    assert answer["status"] == "applied"
    assert answer["command"] == {"type": "set_autotune", "enabled": False, "target_divergence": None}
    assert api.get(f"/api/jobs/{FLAT}")["control"]["autotune"]["enabled"] is False


def test_commands_shows_the_log_with_args_status_and_reasons(server, tiered, capsys):
    assert run(capsys, server, "set-period", TIERED, "8")[0] == 0
    # A top period under the lower level's: the server takes it, rank 0 rejects it with a reason.
    # With --json the command as it ended is on stdout all the same; the reason on stderr, exit 1.
    code, out, err = run(capsys, server, "set-period", TIERED, "2", "--json")
    assert code == 1 and "command 2 (set_period) rejected: " in err
    assert json.loads(out)["status"] == "rejected" and json.loads(out)["reason"] in err
    assert run(capsys, server, "pause", TIERED, "--no-wait")[0] == 0

    code, out, _ = run(capsys, server, "commands", TIERED)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "TYPE", "ARGS", "AUTHOR", "STATUS", "APPLIED", "CREATED", "REASON"]
    assert len(rows) == 3
    first, second, third = (row.split() for row in rows)
    assert first[:5] == ["1", "set_period", "period=8", "cli", "applied"] and first[5].isdigit()
    assert second[:6] == ["2", "set_period", "period=2", "cli", "rejected", "-"]
    reason = rows[1].split(maxsplit=8)[-1]
    assert reason and reason == err.split("rejected: ", 1)[1].strip()  # the reason rank 0 gave
    assert third[:3] == ["3", "pause_averaging", "-"]

    code, out, _ = run(capsys, server, "--json", "commands", TIERED)
    assert [c["id"] for c in json.loads(out)] == [1, 2, 3]


def test_json_goes_before_or_after_the_subcommand_and_parses(server, flat, capsys):
    for argv in (("--json", "jobs"), ("jobs", "--json")):
        code, out, _ = run(capsys, server, *argv)
        assert code == 0 and [j["id"] for j in json.loads(out)] == [FLAT]
    for argv in (("--json", "status", FLAT), ("status", FLAT, "--json")):
        code, out, _ = run(capsys, server, *argv)
        assert code == 0 and json.loads(out)["control"]["period"] == 4

    code, out, _ = run(capsys, server, "--json", "set-period", FLAT, "6")
    applied = json.loads(out)
    assert code == 0 and applied["status"] == "applied" and isinstance(applied["applied_step"], int)
    for argv in (("pause", FLAT), ("resume", FLAT), ("pause", FLAT, "--training"), ("resume", FLAT, "--training")):
        code, out, _ = run(capsys, server, "--json", *argv)
        assert code == 0 and json.loads(out)["status"] == "applied"
    code, out, _ = run(capsys, server, "average-now", FLAT, "--json", "--no-wait")
    queued = json.loads(out)
    assert code == 0 and queued["type"] == "average_now" and queued["status"] in ("pending", "applied")


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"avgctl {importlib.metadata.version('avgctl')}\n"
    script = os.path.join(os.path.dirname(sys.executable), "avgctl")
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, f"avgctl {importlib.metadata.version('avgctl')}\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["set-period", "j", "abc"], "argument PERIOD: expected a positive integer, got 'abc'"),
        (["set-period", "j", "0"], "argument PERIOD: expected a positive integer, got '0'"),
        (
            ["set-period", "j", "4", "--timeout", "soon"],
            "argument --timeout: expected a finite number above 0, got 'soon'",
        ),
        (["set-hierarchy", "j"], "the following arguments are required: GROUP_SIZE=PERIOD"),
        (["set-hierarchy", "j", "2:2"], "argument GROUP_SIZE=PERIOD: expected GROUP_SIZE=PERIOD (e.g. 8=4), got '2:2'"),
        (["set-hierarchy", "j", "2=x"], "two positive integers (e.g. 8=4), got '2=x'"),
        (["set-hierarchy", "j", "2=2", "2=4"], "argument GROUP_SIZE=PERIOD: group size 2 is given twice"),
        (["autotune", "j", "maybe"], "argument on|off: invalid choice: 'maybe'"),
        (["autotune", "j", "on", "--target", "-1"], "argument --target: expected a finite number above 0, got '-1'"),
        (["autotune", "j", "on", "--target", "nan"], "argument --target: expected a finite number above 0, got 'nan'"),
        (["autotune", "j", "off", "--target", "1"], "argument --target: only with 'on'"),
        (["--json", "serve"], "argument --json: serve has no result to print as JSON"),
    ],
)
def test_bad_arguments_say_what_was_expected_and_exit_2(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "invalid _" not in err  # no helper function's name


def test_server_refusals_print_its_reason_and_the_documented_exit_code(server, flat, capsys):
    # 422: the arguments are bad by the server's bounds (which the CLI does not repeat): exit 2.
    code, _, err = run(capsys, server, "set-period", FLAT, str(MAX_PERIOD + 1))
    assert code == 2
    assert f"422 period: Input should be less than or equal to {MAX_PERIOD}" in err
    code, _, err = run(capsys, server, "autotune", FLAT, "on", "--target", "1e9")
    assert code == 2 and "422 target_divergence: Input should be less than or equal to" in err
    # Any other refusal: the server's detail, exit 1.
    code, _, err = run(capsys, server, "average-now", "no-such-job")
    assert code == 1 and "404 no job 'no-such-job'" in err
    code, _, err = run(capsys, server, "average-now", FLAT, token=READ)
    assert code == 1 and "403 a read token may not do this" in err
    assert Client(server.url, CONTROL).get(f"/api/jobs/{FLAT}/commands") == []  # none of them was logged

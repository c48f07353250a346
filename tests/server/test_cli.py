"""The avgctl command line: argument errors, settings mapping, the REST client against a real server."""

from __future__ import annotations

import argparse
import threading

import pytest

from avgctl.server import cli
from avgctl.server.cli.serve import add_serve_parser, serve_settings
from avgctl.server.settings import Settings
from avgctl.worker.link import connect  # the full signature (with link options)
from tests.support.fakes import FakeAverager
from tests.support.polling import wait_for
from tests.support.servers import CONTROL, WORKER, make_settings, running_server


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["set-period", "j"],
        ["set-period", "j", "0"],
        ["set-period", "j", "x"],
        ["serve", "--port", "x"],
        ["pause"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "--help"])
    assert info.value.code == 0


def test_serve_flags_map_onto_settings(monkeypatch):
    monkeypatch.setenv("AVGCTL_PORT", "9001")
    args = cli.build_parser().parse_args(["serve", "--db", "/tmp/x.db", "--control-token", "t"])
    settings = serve_settings(args)
    assert (settings.port, settings.db, settings.control_token, settings.host) == (9001, "/tmp/x.db", "t", "127.0.0.1")


def test_client_commands_against_a_live_job(tmp_path, capsys):
    with running_server(make_settings(tmp_path)) as server:
        averager = FakeAverager(world_size=1)
        link = connect(averager, server=server.url, job_id="job-c", token=WORKER, send_interval=0.05)
        stop = threading.Event()

        def train():  # a training loop that applies commands as they come
            while not stop.is_set():
                averager.train_step()
                link.wait(0.02)

        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        try:
            wait_for(lambda: link.connected.is_set())
            base = ["--server", server.url, "--token", CONTROL]
            assert cli.main(["set-period", "job-c", "3", *base]) == 0
            assert "applied at step" in capsys.readouterr().out
            assert cli.main(["pause", "job-c", "--training", *base]) == 0
            assert cli.main(["resume", "job-c", "--training", *base]) == 0
            assert cli.main(["average-now", "job-c", "--no-wait", *base]) == 0
            assert cli.main(["jobs", *base]) == 0
            assert "job-c" in capsys.readouterr().out
            assert cli.main(["status", "job-c", *base]) == 0
            assert "period 3" in capsys.readouterr().out
            # A periodic averager takes no hierarchy: the server says so (422), the CLI prints it, exit 2.
            assert cli.main(["set-hierarchy", "job-c", "2=2", *base]) == 2
            assert "422 set_hierarchy needs a hierarchical averager" in capsys.readouterr().err
            assert cli.main(["status", "nope", *base]) == 1
            assert "404" in capsys.readouterr().err
            assert cli.main(["jobs", "--server", server.url, "--token", "wrong"]) == 1
            assert "401" in capsys.readouterr().err
        finally:
            stop.set()
            trainer.join(5)
            link.close()


def test_unreachable_server(capsys):
    assert cli.main(["jobs", "--server", "http://127.0.0.1:9", "--token", "x"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_serve_help_shows_the_settings_defaults_and_environment_variables():
    subparsers = argparse.ArgumentParser().add_subparsers()
    add_serve_parser(subparsers)
    serve = subparsers.choices["serve"]
    help_of = {a.dest: a.help for a in serve._actions}
    assert help_of["port"] == f"TCP port (default {Settings.model_fields['port'].default}, env AVGCTL_PORT)"
    assert help_of["control_token"] == "token with every right (env AVGCTL_CONTROL_TOKEN)"
    assert serve.parse_args([]).port is None  # not given: the environment, then Settings, decide

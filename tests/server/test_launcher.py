"""``avgctl demo``'s launcher: the progress bar (sparse off a terminal, never without the final line), the
server's arguments, the URL it prints."""

from __future__ import annotations

import io

import pytest

from avgctl.server.cli import build_parser
from avgctl.server.cli.demo import DemoLaunch, ProgressBar, serve_args, serve_env
from avgctl.server.cli.serve import serve_settings
from avgctl.server.settings import browsable_host


def _job(step: int) -> dict:
    return {"step": step - 1, "control": {"period": 8}}  # the server keeps the last step index


def test_plain_output_is_throttled_but_the_final_line_always_prints():
    out = io.StringIO()
    bar = ProgressBar(60, stream=out)
    bar.show(_job(10))
    bar.show(_job(20))  # within the throttle window: not printed
    bar.show(_job(60), final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "step 10/60" in lines[0] and "step 60/60" in lines[1] and "period 8" in lines[1]


def test_a_missing_job_prints_nothing():
    out = io.StringIO()
    ProgressBar(60, stream=out).show(None, final=True)
    assert out.getvalue() == ""


def test_generated_tokens_that_start_with_a_dash_reach_the_server_intact(monkeypatch):
    # secrets.token_urlsafe() starts with "-" one time in 64; the demo hands its tokens to the
    # server in the environment (not argv, which ps shows), where a dash means nothing.
    env = serve_env("-ctl_token", "--wrk")
    for name in ("AVGCTL_CONTROL_TOKEN", "AVGCTL_WORKER_TOKEN"):
        monkeypatch.setenv(name, env[name])
    settings = serve_settings(build_parser().parse_args(serve_args(DemoLaunch())))
    assert (settings.control_token, settings.worker_token) == ("-ctl_token", "--wrk")


@pytest.mark.parametrize(
    ("host", "browsed"), [("0.0.0.0", "127.0.0.1"), ("::", "127.0.0.1"), ("", "127.0.0.1"), ("10.1.2.3", "10.1.2.3")]
)
def test_a_server_on_every_interface_is_browsed_on_loopback(host, browsed):
    assert browsable_host(host) == browsed

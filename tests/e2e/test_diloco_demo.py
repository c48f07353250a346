"""``avgctl demo --averager diloco``: real torchrun DiLoCo ranks behind a real server, whose outer lr
``avgctl set-outer-lr`` (its own process) sets on every rank at one step."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.support.processes import DASHBOARD_LINE, Api, launch_demo, output_line, wait_for

pytestmark = pytest.mark.dist

NEW_LR = 0.35


def test_set_outer_lr_reaches_every_rank_of_a_diloco_demo_at_one_step(tmp_path):
    demo, _ = launch_demo(
        tmp_path, "--averager", "diloco", "--period", "4", "--steps", "100000", "--step-delay", "0.01"
    )
    try:
        base, token = output_line(demo, DASHBOARD_LINE).groups()
        job = output_line(demo, r"job (\S+),").group(1)
        api = Api(base, token)
        # A few DiLoCo rounds first: each rank's round records carry the pseudo-gradient figures.
        rounds = f"/api/jobs/{job}/metrics?ranks=0&names=pseudo_gradient_norm"
        wait_for(
            lambda: len((api.try_get(rounds) or {"rounds": []})["rounds"]) >= 3,  # 404 until the job's hello
            90,
            what="DiLoCo rounds",
        )
        assert api.get(f"/api/jobs/{job}")["config"]["kind"] == "diloco"

        cli = [sys.executable, "-m", "avgctl.server.cli", "--json", "set-outer-lr", job, str(NEW_LR)]
        sent = subprocess.run([*cli, "--server", base, "--token", token], capture_output=True, text=True, timeout=90)
        assert sent.returncode == 0, sent.stderr
        command = json.loads(sent.stdout)
        assert command["status"] == "applied", command
        step = command["applied_step"]

        def after() -> dict | None:
            """The records from a little before the change, once both ranks have a round after it."""
            metrics = api.get(f"/api/jobs/{job}/metrics?since_step={max(0, step - 20)}")
            return {r["rank"] for r in metrics["rounds"] if r["step"] > step} == {0, 1} and metrics

        # Both ranks report the change at the applied step, then run their rounds with the new lr.
        metrics = wait_for(after, 60, what="rounds after the change on both ranks")
        events = {(e["rank"], e["step"], e["control"]["outer_lr"]) for e in metrics["control_events"]}
        assert events == {(0, step, NEW_LR), (1, step, NEW_LR)}
        rounds = [r for r in metrics["rounds"] if r["step"] > step]
        assert all(r["outer_lr"] == NEW_LR and r["pseudo_gradient_norm"] > 0 for r in rounds), rounds
        before = [r for r in metrics["rounds"] if r["step"] < step]
        assert before and all(r["outer_lr"] == 0.7 for r in before), before  # the demo's own outer lr

        status = subprocess.run(
            [sys.executable, "-m", "avgctl.server.cli", "status", job, "--server", base, "--token", token],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert f"DiLoCo: outer lr {NEW_LR} (set_outer_lr)" in status.stdout, status
        demo.send_signal(signal.SIGINT)
        out, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
        demo.stdout.close()
    assert demo.returncode == 0, out

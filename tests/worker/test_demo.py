"""The demo under a real ``torchrun --standalone`` (smoke test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dist


def test_demo_runs_under_torchrun_and_prints_the_round_table(tmp_path):
    result = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "avgctl.worker.demo",
            "--steps",
            "120",
            "--period",
            "4",
            "--result",
            str(result),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "div mean" in proc.stdout and "done: 120 steps, 30 averaging rounds" in proc.stdout
    figures = json.loads(result.read_text())
    assert figures["rounds"] == 30 and figures["steps"] == 120 and 0 < figures["accuracy"] <= 1


def test_demo_rejects_bad_arguments_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "avgctl.worker.demo", "--period", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "period must be a positive integer" in proc.stderr


def _demo(tmp_path, *args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "avgctl.worker.demo",
            "--checkpoint",
            str(tmp_path / "ck"),
            "--checkpoint-every",
            "30",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_resumes_from_the_newest_checkpoint_every_rank_has(tmp_path):
    first = _demo(tmp_path, "--steps", "100", "--quiet")
    assert first.returncode == 0, first.stderr[-3000:]
    # As if rank 1 died between saves: its newest file is gone, its previous one (step 60) remains.
    (tmp_path / "ck.rank1.prev.pt").replace(tmp_path / "ck.rank1.pt")
    proc = _demo(tmp_path, "--steps", "120")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {tmp_path / 'ck.rank0.prev.pt'} at step 60" in proc.stdout
    assert "done: 120 steps" in proc.stdout

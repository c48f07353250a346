"""The demo under a real ``torchrun --standalone`` (smoke test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.dist

SUMMARY_KEYS = ["task", "steps", "rounds", "initial_eval_loss", "final_eval_loss", "wall_seconds"]
"""``--summary``'s JSON, as ../shared/CONTRACT.md ("Demo task flags") gives it."""


def _two_ranks(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` with 2 ranks of the worker demo, its output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run([*command, "-m", "avgctl.worker.demo", *args], capture_output=True, text=True, timeout=120)


def test_demo_runs_under_torchrun_and_prints_the_round_table(tmp_path):
    result = tmp_path / "result.json"
    proc = _two_ranks(
        "--steps", "120", "--period", "4", "--result", str(result), "--summary", str(tmp_path / "summary.json")
    )
    assert proc.returncode == 0, proc.stderr
    assert "div mean" in proc.stdout and "done: 120 steps, 30 averaging rounds" in proc.stdout
    figures = json.loads(result.read_text())
    assert figures["rounds"] == 30 and figures["steps"] == 120 and 0 < figures["accuracy"] <= 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == SUMMARY_KEYS
    assert (summary["task"], summary["steps"], summary["rounds"]) == ("gauss", 120, 30)
    assert summary["final_eval_loss"] == figures["final_loss"] < summary["initial_eval_loss"]


def test_the_lm_task_trains_a_gpt_whose_held_out_bits_per_byte_fall(tmp_path):
    summary = tmp_path / "summary.json"
    proc = _two_ranks("--task", "lm", "--steps", "60", "--period", "4", "--batch-size", "4", "--summary", str(summary))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval" in proc.stdout.splitlines()[0] and "bits per byte" in proc.stdout
    figures = json.loads(summary.read_text())
    assert list(figures) == SUMMARY_KEYS
    assert (figures["task"], figures["steps"], figures["rounds"]) == ("lm", 60, 15)
    assert abs(figures["initial_eval_loss"] - 8.0) < 0.2  # a uniform guess over 256 bytes
    assert figures["final_eval_loss"] < 5.0  # 60 steps learn the commonest bytes (about 4.3 on 2 cores)


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

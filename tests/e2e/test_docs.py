"""Every command in the README and docs/ is run here, or named below with the test that runs it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import CONTROL, WORKER, ServerProcess, Workers, wait_for

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Commands the docs show that this file does not run, and where the same thing is run.
ELSEWHERE = {
    "make demo": "Makefile runs `avgctl demo`: tests/e2e/test_demo_cli.py",
    "make test": ".ci/run runs it on every submission",
    "docker compose up --build": "no Docker engine here: tests/e2e/test_compose.py validates the file and runs its worker command",
    "avgctl serve --port 8000 --db avgctl.db": "tests/support/processes.py ServerProcess runs `avgctl serve --port P --db D`",
    "export AVGCTL_TOKEN=secret     # or avgctl serve --token secret": "tests/e2e/test_one_token.py starts `avgctl serve` with AVGCTL_TOKEN, and with --token",
    "torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node0:29400 --rdzv-id my-job train.py": "the same flags as docker-compose.yml's worker command, run as two nodes in tests/e2e/test_compose.py",
    "avgctl set-hierarchy $JOB 2=2 8=4": "needs a hierarchical job (the docs' job is periodic): tests/server/test_cli_commands.py runs set-hierarchy",
    "avgctl set-outer-lr $JOB 0.35": "needs a DiLoCo job (the docs' job is periodic): tests/e2e/test_diloco_demo.py runs set-outer-lr",
    "srun --nodes 2 --ntasks-per-node 1 torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint "
    "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29400 --rdzv-id $SLURM_JOB_ID train.py": "needs a SLURM cluster: not exercised here",
}


def _blocks(lang: str) -> list[str]:
    out = []
    for doc in DOCS:
        out += re.findall(rf"```{lang}\n(.*?)```", doc.read_text(), flags=re.S)
    return out


def _commands() -> list[str]:
    return [line.strip() for block in _blocks("bash") for line in block.splitlines() if line.strip()]


def _runs_here(command: str) -> bool:
    return (
        command.startswith(
            (
                "curl ",
                "avgctl jobs",
                "avgctl status",
                "avgctl set-period",
                "avgctl pause",
                "avgctl resume",
                "avgctl average-now",
                "avgctl commands",
                "avgctl autotune",
                "avgctl --json",
                "avgctl --version",
            )
        )
        or "docs/examples/" in command
    )


def test_every_doc_command_is_run_or_accounted_for():
    elsewhere = {c for c in _commands() if not _runs_here(c)}
    assert elsewhere == set(ELSEWHERE), "a command in the docs is neither run by this file nor listed in ELSEWHERE"


def test_python_examples_in_the_docs_are_the_files_that_run():
    examples = [b for b in _blocks("python") if "docs/examples/" in b.split("\n", 3)[1] + b.split("\n", 3)[2]]
    assert len(examples) == 2
    for block in examples:
        path = re.search(r"docs/examples/\S+\.py", block).group(0)
        assert block == (ROOT / path).read_text(), f"{path} and its copy in the docs differ"


@pytest.mark.dist
def test_doc_commands_run_against_a_live_job(tmp_path):
    server = ServerProcess(tmp_path / "avgctl.db").start()
    job = "docs-job"
    workers = Workers(server.base, job, "--steps", "100000", "--step-delay", "0.01", log=tmp_path / "w.log")
    env = {
        **os.environ,
        "AVGCTL_SERVER": server.base,
        "AVGCTL_TOKEN": CONTROL,
        "JOB": job,
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    try:
        wait_for(lambda: (j := server.api.try_get(f"/api/jobs/{job}")) and j["step"] > 5, 90, what="job running")
        for command in _commands():
            if not _runs_here(command) or "docs/examples/" in command:
                continue
            proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=90)
            assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    finally:
        workers.stop()
        server.stop()


@pytest.mark.dist
def test_doc_examples_run_under_torchrun_and_stream_to_a_server(tmp_path):
    server = ServerProcess(tmp_path / "avgctl.db").start()
    env = {
        **os.environ,
        "AVGCTL_SERVER": server.base,
        "AVGCTL_TOKEN": WORKER,  # the examples' ranks are workers: /ws/worker takes the worker token
        "OMP_NUM_THREADS": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    try:
        for command in _commands():
            if "docs/examples/" in command:
                proc = subprocess.run(
                    shlex.split(command), cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
                )
                assert proc.returncode == 0, proc.stderr[-3000:]
                assert "rounds" in proc.stdout
        jobs = server.api.get("/api/jobs")
        assert len(jobs) == 2 and all(j["status"] == "finished" for j in jobs)
    finally:
        server.stop()

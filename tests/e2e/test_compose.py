"""docker-compose.yml without a Docker engine: valid against the Compose schema, every file and
command it names exists, and its exact worker command runs as two torchrun "nodes" on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml

from tests.support.processes import WORKER, ServerProcess, free_port, stop_tree, wait_for

ROOT = Path(__file__).resolve().parents[2]
# Debian's docker-compose package ships the Compose specification's JSON schema (Makefile installs it).
COMPOSE_SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")


def _rendered(**env: str) -> dict:
    """The file as Compose renders it (variables substituted), via `docker-compose config`."""
    out = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=60,
    ).stdout
    return yaml.safe_load(out)


def test_compose_file_validates_against_the_compose_schema():
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft201909Validator(schema).validate(raw)  # the draft its $schema names
    assert (
        subprocess.run(
            ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], timeout=60
        ).returncode
        == 0
    )


def test_compose_services_ports_health_and_tokens():
    spec = _rendered(AVGCTL_CONTROL_TOKEN="c", AVGCTL_WORKER_TOKEN="w")
    services = spec["services"]
    assert set(services) == {"server", "node0", "node1"}
    server = services["server"]
    assert (
        server["ports"][0]["host_ip"] == "127.0.0.1"
        if isinstance(server["ports"][0], dict)
        else server["ports"][0].startswith("127.0.0.1:")
    )
    assert "/api/health" in " ".join(server["healthcheck"]["test"])
    assert server["environment"]["AVGCTL_CONTROL_TOKEN"] == "c"
    for node in ("node0", "node1"):
        assert services[node]["depends_on"]["server"]["condition"] == "service_healthy"
        assert services[node]["environment"]["AVGCTL_TOKEN"] == "w"
        assert services[node]["command"] == services["node0"]["command"]  # one command, two nodes


def test_every_referenced_file_and_command_exists():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = [src for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, flags=re.M) for src in line.split()[:-1]]
    for source in copied + ["web/package.json", "web/package-lock.json"]:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # `pip install .` in the image needs every package folder and the build hook.
    folders = {path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()}
    for needed in folders | {"build_web.py", "MANIFEST.in"}:
        assert needed in copied, f"the image's `pip install .` needs {needed}, which the Dockerfile does not copy"
    scripts = pyproject["project"]["scripts"]
    spec = _rendered()
    assert spec["services"]["server"]["command"][0] in scripts  # `avgctl`
    worker = spec["services"]["node0"]["command"]
    assert worker[0] == "torchrun" and shutil.which("torchrun", path=os.path.dirname(sys.executable))
    module = worker[worker.index("-m") + 1]
    assert subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.dist
def test_the_compose_worker_command_runs_as_two_nodes_against_a_real_server(tmp_path):
    spec = _rendered(AVGCTL_WORKER_TOKEN=WORKER, DEMO_STEPS="160", DEMO_STEP_DELAY="0")
    rdzv_port = free_port()
    server = ServerProcess(tmp_path / "avgctl.db").start()
    nodes = []
    try:
        for name in ("node0", "node1"):
            service = spec["services"][name]
            # The only change: Compose's host names become loopback.
            argv = [a.replace("node0:29400", f"127.0.0.1:{rdzv_port}") for a in service["command"]]
            env = {
                **os.environ,
                **service["environment"],
                "AVGCTL_SERVER": server.base,
                "OMP_NUM_THREADS": "1",
                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
            }
            log = open(tmp_path / f"{name}.log", "w")
            nodes.append(
                (subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log)
            )
        codes = [proc.wait(240) for proc, _ in nodes]
        assert codes == [0, 0], [(tmp_path / f"{n}.log").read_text()[-3000:] for n in ("node0", "node1")]
        job_id = "avgctl-compose-demo"  # torchrun's --rdzv-id is the job id
        job = wait_for(
            lambda: (j := server.api.try_get(f"/api/jobs/{job_id}")) and j["status"] == "finished" and j,
            30,
            what="finished",
        )
        assert job["world_size"] == 4 and sorted(r["rank"] for r in job["ranks"]) == [0, 1, 2, 3]
        assert job["control"]["hierarchy"] == {"2": 4, "4": 32}
        rounds = server.api.get(f"/api/jobs/{job_id}/metrics?ranks=0")["rounds"]
        sizes = {r["step"]: r["group_size"] for r in rounds}
        assert (
            sizes[4] == 2 and sizes[32] == 4 and sizes[64] == 4 and sizes[36] == 2
        )  # within nodes often, across rarely
    finally:
        for proc, log in nodes:
            stop_tree(proc)
            log.close()
        server.stop()

"""``avgctl serve`` stopped by SIGTERM or a hangup (its terminal closed) shuts down as Ctrl-C does:
the lifespan's shutdown runs, the SQLite writer process finishes and exits, the port is free."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from websockets.sync.client import connect as ws_connect

from tests.support.frames import batch, encoded, hello, store_with_two_ranks
from tests.support.processes import WORKER, ServerProcess, alive, descendants, listening


def _writer_of(pid: int) -> int:
    """The pid of the server's metric writer process."""
    (writer,) = [p for p in descendants(pid) if b"process.py" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return writer


@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGHUP, True)],
    ids=["SIGTERM", "SIGHUP", "SIGHUP-to-the-group"],
)
def test_serve_shuts_down_cleanly_on_a_stop_signal(tmp_path, sig, to_group):
    # to_group: a closed terminal hangs up its whole foreground process group, writer included.
    log = tmp_path / "serve.log"
    server = ServerProcess(tmp_path / "avgctl.db", args=("--log-level", "info"), log=log).start()
    try:
        url = server.base.replace("http", "ws", 1) + "/ws/worker"
        with ws_connect(url, additional_headers={"Authorization": f"Bearer {WORKER}"}) as ws:
            ws.send(hello(world_size=1))
            ws.send(batch(1, 4, seq=0))
            assert json.loads(ws.recv(10)) == {"kind": "stored", "seq": 0}  # committed by the writer process
            writer = _writer_of(server.proc.pid)
            if to_group:
                os.killpg(server.proc.pid, sig)
            else:
                server.proc.send_signal(sig)
            code = server.proc.wait(20)
        assert "Application shutdown complete" in log.read_text()
        assert code == -sig  # raised again once shut down: the exit status names the signal
        assert not alive(writer)
        assert not listening(server.port)
    finally:
        server.kill()


def test_a_hangup_to_the_process_group_leaves_the_writer_to_its_server(tmp_path):
    store = store_with_two_ranks(tmp_path)
    try:
        assert store.add_metrics("job-1", 0, encoded(batch(1, 4)))
        store.submit(lambda c: None).result()  # the process is up and serving
        pid = store._writer.process.pid
        os.kill(pid, signal.SIGHUP)
        assert store.add_metrics("job-1", 0, encoded(batch(5, 4)))
        store.submit(lambda c: None).result()
        assert store.get_job("job-1").ranks[0].step == 8 and store._writer.process.pid == pid
        assert store.dropped_batches == 0
    finally:
        store.close()

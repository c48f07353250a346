"""The control token a server with no configured token generates: kept in ``<db>.token`` (mode
0600) and read back at the next start, so a restart does not lock out what it let in."""

from __future__ import annotations

import logging
import os
import stat

import httpx
import pytest

from avgctl.server.app import generated_token, token_file
from tests.support.polling import wait_for
from tests.support.processes import ServerProcess
from tests.support.servers import auth, make_settings, running_server

NO_TOKENS = dict(control_token=None, read_token=None, worker_token=None)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_restarted_server_on_the_same_database_keeps_its_generated_token(tmp_path, capsys):
    settings = make_settings(tmp_path, **NO_TOKENS)
    kept = tmp_path / "avgctl.db.token"
    tokens = []
    for _ in range(2):
        with running_server(settings) as server:
            token = server.server.config.app.state.settings.control_token
            tokens.append(token)
            assert httpx.get(f"{server.url}/api/jobs", headers=auth(token), timeout=5).status_code == 200
            assert httpx.get(f"{server.url}/api/jobs", timeout=5).status_code == 401
        printed = capsys.readouterr().err
        assert f"control token kept in {kept}" in printed and f"?token={token}" in printed
    assert tokens[0] == tokens[1] and len(tokens[0]) >= 32
    assert kept.read_text() == tokens[0] + "\n" and mode_of(kept) == 0o600


def test_avgctl_serve_restarted_keeps_its_token_and_says_where(tmp_path):
    log = tmp_path / "serve.log"
    server = ServerProcess(tmp_path / "s.db", log=log, default_tokens=False)
    kept = tmp_path / "s.db.token"
    for start in range(2):
        server.start()
        try:
            token = wait_for(lambda: kept.exists() and kept.read_text().strip(), what="the token file")
            assert httpx.get(f"{server.base}/api/jobs", headers=auth(token), timeout=5).status_code == 200
            lines = wait_for(
                lambda: [line for line in log.read_text().splitlines() if "no token configured" in line][start:],
                what="the start's line",
            )
            assert f"control token kept in {kept}" in lines[0] and f"?token={token}" in lines[0]
        finally:
            server.kill()  # as a crash: the token outlives it in the file
    assert mode_of(kept) == 0o600


def test_the_token_file_is_created_exclusively_with_mode_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        made = generated_token(str(tmp_path / "a.db"))
    finally:
        os.umask(old)
    assert made.kept_in == tmp_path / "a.db.token" and mode_of(made.kept_in) == 0o600
    assert generated_token(str(tmp_path / "a.db")) == made


def test_a_token_file_others_may_read_is_used_with_a_warning(tmp_path, caplog):
    path = tmp_path / "b.db.token"
    path.write_text("an-old-token\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="avgctl.server.app"):
        assert generated_token(str(tmp_path / "b.db")).token == "an-old-token"
    assert "may be read by other users (mode 0o644): chmod 600" in caplog.text


def test_an_empty_token_file_left_by_a_crash_is_replaced(tmp_path):
    path = tmp_path / "c.db.token"
    path.touch(0o600)
    made = generated_token(str(tmp_path / "c.db"))
    assert made.token and path.read_text() == made.token + "\n" and mode_of(path) == 0o600


@pytest.mark.parametrize("db", [":memory:", "", "file::memory:?cache=shared", "file:x?mode=memory"])
def test_a_database_that_is_no_file_gets_a_token_for_this_run_only(db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert token_file(db) is None
    first, second = generated_token(db), generated_token(db)
    assert first.kept_in is None and first.token != second.token and "not a file" in first.why
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_written_gets_a_token_for_this_run_only(tmp_path, caplog):
    missing = tmp_path / "no-such-folder" / "d.db"
    with caplog.at_level(logging.WARNING, logger="avgctl.server.app"):
        made = generated_token(str(missing))
    assert made.kept_in is None and "cannot be written" in made.why
    assert "cannot keep the generated control token" in caplog.text

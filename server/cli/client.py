"""The one REST client of the ``avgctl`` commands, the demo launcher and the end-to-end tests (stdlib only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from avgctl.server.cli.exits import CliError, for_status


def job_path(job_id: str) -> str:
    """The REST path of a job, its id quoted."""
    return f"/api/jobs/{urllib.parse.quote(job_id, safe='')}"


class Client:
    """JSON over HTTP to one server, with ``token`` as ``Authorization: Bearer`` when there is one.

    ``author`` goes as ``X-Avgctl-Author``: the name the server records on the commands posted
    (None: the server's default, ``api``).
    """

    def __init__(self, server: str, token: str | None = None, timeout: float = 10.0, author: str | None = "cli"):
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.author = author

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request and its decoded answer; urllib's errors propagate (``HTTPError.code`` is the status)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if self.author:
            req.add_header("X-Avgctl-Author", self.author)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            return json.loads(resp.read() or b"null")

    def get(self, path: str) -> Any:
        """The answer to ``GET path``, errors as ``call``'s."""
        return self.call("GET", path)

    def try_get(self, path: str) -> Any:
        """``get``, or None when the server is unreachable or answers with an error (for polling)."""
        try:
            return self.get(path)
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """``call`` with its failures as a one-line ``CliError``: what the commands print. A 4xx or
        5xx answer's ``detail`` is the server's reason; its exit code is ``exits.for_status``'s."""
        try:
            return self.call(method, path, body)
        except urllib.error.HTTPError as err:
            raise CliError(f"{method} {path}: {err.code} {_detail(err, body)}", for_status(err.code)) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise CliError(f"cannot reach the server at {self.server}: {reason}") from None


def _detail(err: urllib.error.HTTPError, body: Any = None) -> str:
    """The server's reason: its ``detail`` (a string, or FastAPI's validation errors, each as
    ``field: message``), else the status line's reason."""
    try:
        detail = json.loads(err.read()).get("detail")
    except Exception:
        return str(err.reason)
    if isinstance(detail, list) and detail:
        return "; ".join(_validation_error(d, body) for d in detail)
    return str(detail) if detail else str(err.reason)


def _validation_error(error: Any, body: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    loc = [str(part) for part in error.get("loc") or () if part != "body"]
    if loc and isinstance(body, dict) and loc[0] == body.get("type"):
        loc = loc[1:]  # the member of the command union FastAPI names: the type the body says
    msg = str(error.get("msg", error))
    return f"{'.'.join(loc)}: {msg}" if loc else msg

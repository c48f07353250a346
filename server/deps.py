"""``Annotated`` dependency aliases: what a route needs from the running app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path
from starlette.requests import HTTPConnection

from avgctl.protocol.bounds import JOB_ID_MAX_LENGTH, JOB_ID_PATTERN
from avgctl.server.autopilot import Autopilot
from avgctl.server.commands import CommandService
from avgctl.server.hub import Hub
from avgctl.server.settings import Settings
from avgctl.server.store import Store
from avgctl.server.workers import WorkerRegistry


def _store(conn: HTTPConnection) -> Store:
    return conn.app.state.store


def _hub(conn: HTTPConnection) -> Hub:
    return conn.app.state.hub


def _commands(conn: HTTPConnection) -> CommandService:
    return conn.app.state.commands


def _workers(conn: HTTPConnection) -> WorkerRegistry:
    return conn.app.state.workers


def _autopilot(conn: HTTPConnection) -> Autopilot:
    return conn.app.state.autopilot


def _settings(conn: HTTPConnection) -> Settings:
    return conn.app.state.settings


StoreDep = Annotated[Store, Depends(_store)]
HubDep = Annotated[Hub, Depends(_hub)]
CommandsDep = Annotated[CommandService, Depends(_commands)]
WorkersDep = Annotated[WorkerRegistry, Depends(_workers)]
SettingsDep = Annotated[Settings, Depends(_settings)]
AutopilotDep = Annotated[Autopilot, Depends(_autopilot)]
JobIdPath = Annotated[str, Path(min_length=1, max_length=JOB_ID_MAX_LENGTH, pattern=JOB_ID_PATTERN)]

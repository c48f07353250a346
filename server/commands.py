"""The command service: log a command, deliver it to rank 0, record what became of it.

Both REST (people, the CLI, the dashboard) and the server's autopilot submit here; ``author``
tells them apart, so a person's command can later suspend the autopilot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from pydantic import TypeAdapter

from avgctl.protocol import (
    WORKER_COMMAND_TYPES,
    Command,
    CommandAck,
    CommandDelivery,
    SetAutotune,
)
from avgctl.server.announce import JobAnnouncer
from avgctl.server.api import AutotuneView, CommandOut
from avgctl.server.hub import Hub
from avgctl.server.store import Store, writes
from avgctl.server.workers import WorkerConnection, WorkerRegistry

log = logging.getLogger(__name__)
AUTOPILOT = "autopilot"
_COMMAND = TypeAdapter(Command)


class CommandObserver(Protocol):
    """Told about commands on the event loop; must not block it."""

    async def on_submitted(self, out: CommandOut, command: Command) -> None: ...
    async def on_resolved(self, out: CommandOut) -> None: ...


class CommandService:
    """Submits commands and handles rank 0's acks; runs on the event loop."""

    def __init__(self, store: Store, workers: WorkerRegistry, hub: Hub):
        self.store = store
        self.workers = workers
        self.hub = hub
        self.announcer = JobAnnouncer(store, hub)
        self._observers: list[CommandObserver] = []
        self.ignored_acks = 0  # acks for a command id not delivered to the connection that sent it

    def add_observer(self, observer: CommandObserver) -> None:
        """Tell ``observer`` (the autopilot) about every command logged and every one resolved."""
        self._observers.append(observer)

    async def submit(self, job_id: str, command: Command, author: str, note: str | None = None) -> CommandOut:
        """Log ``command`` as pending and deliver it if rank 0 is connected.

        Nothing is logged for a command that can never apply: ``UnknownJob`` (no such job),
        ``JobFinished`` (the job finished), ``InapplicableCommand`` (a ``set_hierarchy`` that does not
        fit the job's group sizes, by the rule rank 0 applies: ``protocol.hierarchy``; a
        ``set_outer_lr`` for a job that is not DiLoCo).
        ``note`` says why, in the log (the autopilot's reason for a ``set_period``).
        """
        body = command.model_dump(mode="json")
        now = time.time()
        out = await self.store.write(lambda conn: writes.insert_command(conn, job_id, body, author, now, note))
        self._announce(out)
        if isinstance(command, SetAutotune):
            out = await self._set_autotune(job_id, out, command)
        else:
            assert command.type in WORKER_COMMAND_TYPES
            self.workers.send_to_leader(job_id, CommandDelivery(id=out.id, command=command))
        for observer in self._observers:
            await observer.on_submitted(out, command)
        return out

    async def _set_autotune(self, job_id: str, out: CommandOut, command: SetAutotune) -> CommandOut:
        # The autopilot lives in the server: storing its settings is the whole of applying it.
        # server/autotune.py reads them from the job's control.autotune.
        view = AutotuneView(enabled=command.enabled, target_divergence=command.target_divergence)
        now = time.time()

        def apply(conn):
            step = writes.set_autotune(conn, job_id, view, now)
            ack = CommandAck(command_id=out.id, status="applied", applied_step=step)
            return writes.resolve_command(conn, job_id, ack, now)

        applied = await self.store.write(apply)
        if applied is not None:
            self._announce(applied)
            self.announce_job(job_id)
            return applied
        return out

    async def deliver_pending(self, job_id: str) -> int:
        """Re-send every pending worker command in id order (after a rank-0 hello)."""
        pending = await asyncio.to_thread(self.store.pending_commands, job_id)
        sent = 0
        for cmd in pending:
            if cmd.type not in WORKER_COMMAND_TYPES:
                continue
            delivery = CommandDelivery(id=cmd.id, command=_COMMAND.validate_python(cmd.command))
            if self.workers.send_to_leader(job_id, delivery):
                sent += 1
        return sent

    async def on_ack(self, conn: WorkerConnection, ack: CommandAck) -> None:
        """Rank 0 applied or rejected a command; a repeated ack changes nothing.

        Taken only for a command delivered to ``conn`` and not yet acknowledged on it; any other
        is ignored (logged and counted, the connection stays open). Its control view moves the
        job's version forward by at most the commands delivered to ``conn`` and not acknowledged.
        """
        if ack.command_id not in conn.delivered:
            self.ignored_acks += 1
            # Also a link's second answer to a re-delivered command: harmless, so not a warning.
            log.info(
                "ignored an ack of job %s for command %d: not delivered to this connection",
                conn.job_id,
                ack.command_id,
            )
            return
        ahead = len(conn.delivered)
        conn.delivered.discard(ack.command_id)
        job_id, now = conn.job_id, time.time()
        out = await self.store.write(lambda c: writes.resolve_command(c, job_id, ack, now, max_ahead=ahead))
        if out is not None:
            self._announce(out)
            for observer in self._observers:
                await observer.on_resolved(out)
            self.announce_job(job_id)

    async def on_disconnect(self, job_id: str, rank: int, normal: bool) -> None:
        """A rank's connection ended: store it; if that finished the job, its pending commands were
        rejected in the same write, and each is announced as a resolution (dashboards, autopilot)."""
        now = time.time()
        rejected = await self.store.write(lambda c: writes.disconnect(c, job_id, rank, normal, now))
        for out in rejected:
            self._announce(out)
            for observer in self._observers:
                await observer.on_resolved(out)
        self.announce_job(job_id)

    def announce_restore(self, restore: writes.Restore) -> None:
        """Show dashboards what a job's restore from a checkpoint undid: the control event with
        the restored state, and each command it rolled back. The autopilot is not told: those
        commands resolved long ago, and the hello that follows tells it the restored period."""
        self.hub.publish(restore.job_id, {"kind": "control_event", "event": restore.event})
        for out in restore.rolled_back:
            self._announce(out)

    def _announce(self, out: CommandOut) -> None:
        self.hub.publish(out.job_id, {"kind": "command", "command": out.model_dump(mode="json")})

    def announce_job(self, job_id: str) -> None:
        """Have the job's dashboards get its current state (coalesced; never waits)."""
        self.announcer.announce(job_id)

    async def close(self) -> None:
        await self.announcer.close()

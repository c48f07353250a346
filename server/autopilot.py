"""The autopilot: runs the rule of ``server/autotune.py`` for every job, on the server's event loop.

Ingest hands it each metric batch (``on_metrics``: arithmetic only, no I/O per record); the command
service tells it about every command (``on_submitted``) and what became of it (``on_resolved``).
It acts as one more client of the command path: each change is an ordinary ``set_period`` in the
job's log, authored ``autopilot``, with the proposal's reason as the command's ``note``; at most
one of its ``set_period`` commands per job is pending at a time. A person's command (anything but
``set_autotune``) suspends it until ``set_autotune`` switches it on again.

What it shows lives in the job's ``control.autotune``: the person's settings (``enabled``,
``target_divergence``) as ``set_autotune`` stored them, plus the autopilot's own report (``state``,
``calibrated_target``, ``last_proposal``, ``note``), written when its state changes, when it acts,
and otherwise at most every ``status_interval`` seconds; absent until it has seen a round since the
switch (or was suspended).

An error in the rule or in this bookkeeping never reaches ingest or the command path: it is caught
per job, logged once, counted (``errors``, Prometheus' ``avgctl_autopilot_errors_total``), and the
autopilot suspends itself for that job (state ``suspended``, note ``autopilot error: ...``) until
``set_autotune`` switches it on again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from avgctl.protocol import Command, Hello, SetAutotune, SetPeriod
from avgctl.server import autotune
from avgctl.server.api import AutotuneProposalView, AutotuneView, CommandOut
from avgctl.server.commands import AUTOPILOT, CommandService
from avgctl.server.records import Received
from avgctl.server.store import Store, writes

log = logging.getLogger(__name__)

# Rounds waiting for the other ranks' records; beyond this the oldest is closed with what it has.
_OPEN_ROUNDS = 16
_ISSUING = -1  # pending placeholder while the autopilot's own submit is in flight


@dataclass(slots=True)
class _Job:
    """What the autopilot keeps in memory for one job."""

    state: autotune.AutotuneState
    world_size: int = 1
    period: int = 1
    hierarchical: bool = False
    pending: int | None = None  # id of the autopilot's set_period still pending
    stored: tuple[bool, float | None] = (False, None)  # (enabled, target_divergence) as last stored
    open_rounds: dict[int, list] = field(default_factory=dict)  # step -> [{rank: relative}, relative_mean, seconds]
    proposal: autotune.Proposal | None = None
    published: tuple | None = None  # what the last status write said (mode, targets, note)
    published_at: float = 0.0
    failed: bool = False  # the autopilot erred on this job: it stays out until switched on again


class Autopilot:
    """Per-job controllers behind one ``AutotuneConfig``; every method runs on the event loop."""

    def __init__(
        self,
        store: Store,
        commands: CommandService,
        config: autotune.AutotuneConfig | None = None,
        status_interval: float = 2.0,
    ):
        self.store = store
        self.commands = commands
        self.config = config if config is not None else autotune.AutotuneConfig()
        self.status_interval = status_interval
        self.jobs: dict[str, _Job] = {}
        self.errors: dict[str, int] = {}
        """Errors caught per job since the server started (each suspended the autopilot there)."""
        self._tasks: set[asyncio.Task] = set()
        commands.add_observer(self)

    # ------------------------------------------------------------------ hooks

    async def on_hello(self, hello: Hello) -> None:
        """A rank connected: learn the job (its settings and pending commands, once) and its period."""
        job = self.jobs.get(hello.job_id)
        if job is None:
            try:
                job = await asyncio.to_thread(self._load, hello.job_id)
            except Exception:  # the rank's connection goes on; the autopilot sits this job out
                log.exception("autopilot: loading job %s failed", hello.job_id)
                return
            job = self.jobs.setdefault(hello.job_id, job)
        job.world_size = hello.world_size
        if hello.rank == 0:
            job.period = hello.control.period
            job.hierarchical = hello.config.kind != "periodic"

    def on_metrics(self, job_id: str, rank: int, batch: Received) -> None:
        """Fold a metric batch into the job's controller; cheap arithmetic, never waits, never raises."""
        job = self.jobs.get(job_id)
        if job is None or job.failed:
            return
        try:
            self._fold(job_id, job, rank, batch)
        except Exception as err:  # the batch is ingest's: it is stored whatever the autopilot makes of it
            self._fail(job_id, job, err)

    def _fold(self, job_id: str, job: _Job, rank: int, batch: Received) -> None:
        if rank == 0 and batch.control:
            job.period = batch.control[-1].control.period
        if job.state.mode == "off" or job.hierarchical:
            return
        if batch.steps:
            job.state = autotune.observe_steps(
                job.state, self.config, ((s.step, s.loss, s.step_time) for s in batch.steps)
            )
        last = job.state.last_round
        for record in batch.rounds:
            if record.group_size != job.world_size or (last is not None and record.step <= last):
                continue  # another level's round, or a late record of a round already closed
            entry = job.open_rounds.setdefault(record.step, [{}, record.relative_mean, record.seconds])
            entry[0][rank] = record.relative_divergence
            if rank == 0:
                entry[2] = record.seconds
        self._close_rounds(job_id, job)

    async def on_submitted(self, out: CommandOut, command: Command) -> None:
        """Every command logged for a job: ``set_autotune`` switches, a person's command suspends.

        Never raises: the command is logged already, and its poster gets its answer either way."""
        try:
            job = self.jobs.get(out.job_id)
            if job is None:
                job = await asyncio.to_thread(self._load, out.job_id)
                job = self.jobs.setdefault(out.job_id, job)
        except Exception:
            log.exception("autopilot: loading job %s failed", out.job_id)
            return
        try:
            await self._submitted(out, command, job)
        except Exception as err:
            self._fail(out.job_id, job, err)

    async def _submitted(self, out: CommandOut, command: Command, job: _Job) -> None:
        if isinstance(command, SetAutotune):
            job.failed = False  # switched on (or off) again: a fresh start after an error
            job.state = autotune.switch(job.state, command.enabled, command.target_divergence)
            job.stored = (command.enabled, command.target_divergence)
            job.open_rounds.clear()
            # set_autotune stored the bare settings; our report follows with the next round.
            job.published, job.proposal = None, None
            if command.enabled and job.hierarchical:
                note = "hierarchical averagers are not retuned: their levels' periods are set with set_hierarchy"
                job.state = dataclasses.replace(job.state, note=note)
                self._publish(out.job_id, job, force=True)
        elif out.author != AUTOPILOT and job.state.mode in ("calibrating", "active"):
            job.state = autotune.suspend(job.state, f"suspended by {out.author}'s {out.type} (command {out.id})")
            self._publish(out.job_id, job, force=True)

    async def on_resolved(self, out: CommandOut) -> None:
        """Rank 0 applied or rejected a command (never raises: rank 0's ack is stored already)."""
        job = self.jobs.get(out.job_id)
        if job is None:
            return
        try:
            self._resolved(out, job)
        except Exception as err:
            self._fail(out.job_id, job, err)

    def _resolved(self, out: CommandOut, job: _Job) -> None:
        if out.status == "applied" and out.type == "set_period":
            job.period = out.command["period"]  # rank 0's control event will say the same
        # While its own submit is in flight the id is not known yet; only one can be in flight.
        issuing = job.pending == _ISSUING and out.author == AUTOPILOT
        if job.pending != out.id and not issuing:
            return
        job.pending = None
        if out.status == "rejected":
            job.state = dataclasses.replace(job.state, note=f"set_period rejected: {out.reason}")
            self._publish(out.job_id, job, force=True)

    # ------------------------------------------------------------------ internals

    def _fail(self, job_id: str, job: _Job, err: Exception) -> None:
        """The autopilot erred on this job: log it (once: the job is left alone from now on),
        count it, and suspend the autopilot there with the error as the reason."""
        self.errors[job_id] = self.errors.get(job_id, 0) + 1
        log.error("autopilot: suspended for job %s after an error", job_id, exc_info=err)
        job.failed = True
        job.open_rounds.clear()
        note = f"autopilot error: {type(err).__name__}: {err}"[:300]
        mode = "suspended" if job.state.mode in ("calibrating", "active") else job.state.mode
        try:
            job.state = dataclasses.replace(job.state, mode=mode, note=note)
            self._publish(job_id, job, force=True)
        except Exception:
            log.exception("autopilot: reporting the error of job %s failed", job_id)

    def _load(self, job_id: str) -> _Job:
        job_out = self.store.get_job(job_id)
        state = autotune.AutotuneState()
        job = _Job(state=state)
        if job_out is None:
            return job
        view = job_out.control.autotune
        if view.enabled:
            # After a server restart the evidence is gone; calibrate again unless the person set a target.
            state = autotune.switch(state, True, view.target_divergence)
        elif view.state == "suspended":
            state = autotune.suspend(autotune.switch(state, True, view.target_divergence), view.note or "suspended")
        job.state = state
        job.stored = (view.enabled, view.target_divergence)
        job.world_size = job_out.world_size
        job.period = job_out.control.period
        job.hierarchical = job_out.config is not None and job_out.config.kind != "periodic"
        for cmd in self.store.pending_commands(job_id):
            if cmd.author == AUTOPILOT and cmd.type == "set_period":
                job.pending = cmd.id
        return job

    def _close_rounds(self, job_id: str, job: _Job) -> None:
        for step in sorted(job.open_rounds):
            relative, relative_mean, seconds = job.open_rounds[step]
            complete = len(relative) >= job.world_size
            if not complete and len(job.open_rounds) <= _OPEN_ROUNDS:
                break  # rounds close in step order: wait for the other ranks' records
            del job.open_rounds[step]
            delta = autotune.round_delta(relative.values(), job.world_size, relative_mean)
            job.state, proposal = autotune.observe_round(
                job.state, self.config, step=step, delta=delta, seconds=seconds, period=job.period
            )
            if proposal is not None:
                self._act(job_id, job, proposal)
            else:
                self._publish(job_id, job)

    def _act(self, job_id: str, job: _Job, proposal: autotune.Proposal) -> None:
        job.proposal = proposal
        if not proposal.changed or job.pending is not None:
            self._publish(job_id, job)
            return
        job.pending = _ISSUING
        self._spawn(self._issue(job_id, job, proposal))

    async def _issue(self, job_id: str, job: _Job, proposal: autotune.Proposal) -> None:
        try:
            out = await self.commands.submit(job_id, SetPeriod(period=proposal.period), AUTOPILOT, note=proposal.reason)
        except writes.JobFinished:
            # The job's last rank left while the round that prompted this was being read: nothing
            # to retune, and nothing went wrong.
            log.info("autopilot: job %s finished before its set_period to %d was logged", job_id, proposal.period)
            job.pending = None
            return
        except Exception:
            log.exception("autopilot: set_period for job %s failed", job_id)
            job.pending = None
            return
        if job.pending == _ISSUING:  # not resolved meanwhile
            job.pending = out.id if out.status == "pending" else None
        self._publish(job_id, job, force=True)

    def _view(self, job: _Job) -> AutotuneView:
        s = job.state
        p = job.proposal
        return AutotuneView(
            # Suspended reads as off (switch it on again to resume), with the state saying why.
            enabled=s.mode in ("calibrating", "active"),
            target_divergence=s.user_target,
            state=s.mode,
            calibrated_target=s.target if s.user_target is None else None,
            last_proposal=None
            if p is None
            else AutotuneProposalView(
                step=p.step,
                period=p.period,
                current=p.current,
                reason=p.reason,
                delta=p.delta,
                growth=p.growth,
                target=p.target,
                raw_period=p.raw_period,
                tau_cost=p.tau_cost,
                communication_bound=p.communication_bound,
                pending_command=job.pending if job.pending != _ISSUING else None,
            ),
            note=s.note,
        )

    def _publish(self, job_id: str, job: _Job, force: bool = False) -> None:
        """Store the job's autotune report when it changed, or every ``status_interval`` seconds."""
        s = job.state
        key = (s.mode, s.user_target, s.target, s.note, job.pending)
        now = time.monotonic()
        if not force and key == job.published and now - job.published_at < self.status_interval:
            return  # only the figures moved: they go out with the next write
        if s.mode == "off" and job.published is None and not force:
            return
        job.published, job.published_at = key, now
        view = self._view(job)
        expected, job.stored = job.stored, (view.enabled, view.target_divergence)
        self._spawn(self._write_status(job_id, view, expected))

    async def _write_status(self, job_id: str, view: AutotuneView, expected: tuple[bool, float | None]) -> None:
        try:
            await self.store.write(lambda conn: writes.report_autotune(conn, job_id, view, expected))
        except Exception:
            log.exception("autopilot: storing the status of job %s failed", job_id)
            return
        self.commands.announce_job(job_id)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Let status writes in flight finish (the store closes after this)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

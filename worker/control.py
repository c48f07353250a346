"""Where rank 0 gets commands, and the exchange that makes every rank apply them at one step."""

from __future__ import annotations

import collections
import itertools
import queue
import threading
from typing import Protocol

import torch
import torch.distributed as dist

from avgctl.server.schemas import Command, CommandAck
from avgctl.worker import control_state as cs

# How many acks rank 0 remembers so a re-delivered command is acked again, not applied again.
_REMEMBERED_ACKS = 4096


def drain(inbox: queue.SimpleQueue) -> list:
    """Everything in ``inbox`` now, in order, without blocking (for ``ControlSource.poll``)."""
    out = []
    while True:
        try:
            out.append(inbox.get_nowait())
        except queue.Empty:
            return out


class ControlSource(Protocol):
    """Rank 0's inbox. Implementations must never block in ``poll`` or ``report``."""

    def poll(self) -> list[tuple[int, Command]]:
        """Commands received since the last poll, as ``(command_id, command)`` in arrival order."""

    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when a command arrives."""

    def report(self, ack: CommandAck) -> None:
        """What became of a command: applied (with its step) or rejected (with a reason)."""


class InProcessControlSource:
    """A thread-safe ``ControlSource`` for tests, notebooks and the local demo."""

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[tuple[int, Command]] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._acks: dict[int, CommandAck] = {}
        self._acked = threading.Condition()

    def submit(self, command: Command, command_id: int | None = None) -> int:
        """Queue a command; returns its id (give ``command_id`` to re-deliver one)."""
        cid = next(self._ids) if command_id is None else command_id
        self._inbox.put((cid, command))
        return cid

    def poll(self) -> list[tuple[int, Command]]:
        return drain(self._inbox)

    def wait(self, timeout: float) -> None:
        try:
            self._inbox.put(self._inbox.get(timeout=timeout))
        except queue.Empty:
            pass

    def report(self, ack: CommandAck) -> None:
        with self._acked:
            self._acks[ack.command_id] = ack
            self._acked.notify_all()

    def result(self, command_id: int, timeout: float | None = None) -> CommandAck:
        """Wait for a command's ack (``TimeoutError`` after ``timeout`` seconds)."""
        with self._acked:
            if not self._acked.wait_for(lambda: command_id in self._acks, timeout):
                raise TimeoutError(f"command {command_id} not acknowledged within {timeout}s")
            return self._acks[command_id]

    def acks(self) -> dict[int, CommandAck]:
        with self._acked:
            return dict(self._acks)


class ControlExchange:
    """One small ``all_reduce(MAX)`` that broadcasts rank 0's new state and checks the others.

    Layout: ``[state (rank 0) or -1 ...] + [step, -step] + [fingerprint, -fingerprint]``. MAX of a pair
    ``(x, -x)`` gives the largest and the negated smallest value, so any rank that disagrees on the step
    or the parameter layout is found by every rank at once.
    """

    def __init__(self, process_group: dist.ProcessGroup, levels: int, source: ControlSource | None = None):
        self.process_group = process_group
        self.source = source
        self.is_leader = dist.get_rank(process_group) == 0
        self._state_len = cs.encoded_size(levels)
        self._acks: collections.OrderedDict[int, CommandAck] = collections.OrderedDict()

    def exchange(self, state: cs.ControlState, step: int, fingerprint: int) -> cs.ControlState:
        """All ranks call this at the same step; returns the state every rank now holds."""
        applied: list[int] = []
        proposed = state
        if self.is_leader:
            proposed, applied = self._take_commands(state, step)
        head = cs.encode(proposed) if self.is_leader else [-1.0] * self._state_len
        payload = torch.tensor(head + [step, -step, fingerprint, -fingerprint], dtype=torch.float64)
        dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=self.process_group)
        values = payload.tolist()
        tail = values[self._state_len :]
        if tail[0] != -tail[1]:
            raise RuntimeError(
                f"ranks disagree on the averager step (from {int(-tail[1])} to {int(tail[0])}): "
                "every rank must call average_parameters once per step"
            )
        if tail[2] != -tail[3]:
            raise RuntimeError(
                "ranks disagree on the parameters to average (different shapes, dtypes, or a different "
                "set of parameters with .grad): averaging them would mix unrelated values"
            )
        new_state = cs.decode(values[: self._state_len], state)
        if self.is_leader:
            self._ack_applied(applied, step, new_state)
        return new_state

    def _take_commands(self, state: cs.ControlState, step: int) -> tuple[cs.ControlState, list[int]]:
        if self.source is None:
            return state, []
        applied = []
        for command_id, command in self.source.poll():
            if command_id in self._acks:  # re-delivered after a reconnect: answer, never re-apply
                self.source.report(self._acks[command_id])
                continue
            try:
                state = cs.apply_command(state, command, step)
            except cs.CommandRejected as err:
                self._remember(CommandAck(command_id=command_id, status="rejected", reason=str(err)))
                continue
            applied.append(command_id)
        return state, applied

    def _ack_applied(self, applied: list[int], step: int, state: cs.ControlState) -> None:
        view = cs.to_view(state)
        for command_id in applied:
            self._remember(CommandAck(command_id=command_id, status="applied", applied_step=step, control=view))

    def _remember(self, ack: CommandAck) -> None:
        self._acks[ack.command_id] = ack
        while len(self._acks) > _REMEMBERED_ACKS:
            self._acks.popitem(last=False)
        assert self.source is not None
        self.source.report(ack)

    def state_dict(self) -> dict:
        return {"acked": list(self._acks)}

    def load_state_dict(self, state: dict) -> None:
        # Only ids survive a restart: a re-delivered one is acked as applied without its old details.
        for command_id in state.get("acked", []):
            self._acks[command_id] = CommandAck(command_id=command_id, status="applied")

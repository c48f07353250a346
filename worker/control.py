"""Where rank 0 gets commands, and the exchange that makes every rank apply them at one step."""

from __future__ import annotations

import array
import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from pydantic import TypeAdapter

from avgctl.protocol import CommandAck, WorkerCommand
from avgctl.worker import control_state
from avgctl.worker.control_state import CommandRejected, ControlState
from avgctl.worker.ledger import CommandLedger

_WORKER_COMMAND = TypeAdapter(WorkerCommand)


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

    def poll(self) -> list[tuple[int, WorkerCommand]]:
        """Commands received since the last poll, as ``(command_id, command)`` in arrival order."""

    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when a command arrives."""

    def report(self, ack: CommandAck) -> None:
        """What became of a command: applied (with its step) or rejected (with a reason)."""


class InProcessControlSource:
    """A thread-safe ``ControlSource`` for tests, notebooks and the local demo."""

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[tuple[int, WorkerCommand]] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._acks: dict[int, CommandAck] = {}
        self._acked = threading.Condition()

    def submit(self, command: WorkerCommand | dict, command_id: int | None = None) -> int:
        """Queue a command (a model, or its JSON body as a dict: ``{"type": "set_period", "period": 8}``);
        returns its id (give ``command_id`` to re-deliver one). A malformed dict raises ``ValueError``."""
        if isinstance(command, dict):
            command = _WORKER_COMMAND.validate_python(command)
        cid = next(self._ids) if command_id is None else command_id
        self._inbox.put((cid, command))
        return cid

    def poll(self) -> list[tuple[int, WorkerCommand]]:
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


@dataclass(slots=True)
class ExchangeResult:
    """What an exchange told every rank."""

    state: ControlState
    layout_changed: bool
    """Some rank's parameter set changed since the agreed one (all ranks' new sets agree)."""
    stats: list[float] | None
    """Every rank's figures for the round the exchange follows: ``[squared...] + [mean_norm_squared...]``."""


@dataclass(slots=True)
class PendingExchange:
    """An exchange in flight: started on every rank, finished later (``ControlExchange.finish``)."""

    payload: torch.Tensor
    work: dist.Work | None
    proposed: ControlState
    applied: list[int]
    carries_stats: bool
    in_tail: bool = False
    """The payload rides in the tail of the averaging all-reduce (SUM) instead of its own (MAX)."""
    values: list[float] | None = None
    """The reduced payload, when the round already read it (with its figures, in one copy)."""
    layout_settled: bool = False
    """The round already moved every rank to their new parameter set: nothing to rebuild later."""


_SPLIT = 1 << 20
"""Integers travel in a tail as two parts below 2**20 each: exact in float32 up to 2**40."""


def _split(values: list[float]) -> list[float]:
    return [float(part) for v in values for part in divmod(int(v), _SPLIT)]


def _join(parts: list[float]) -> list[float]:
    return [hi * _SPLIT + lo for hi, lo in zip(parts[::2], parts[1::2])]


class ControlExchange:
    """Agreement on the control state, the step and the parameter layout, at chosen steps.

    Two encodings of the same content:

    - its own ``all_reduce(MAX)`` of float64s: ``[state (rank 0) or -1 ...] + [step, -step]``
      ``+ [fingerprint, -fingerprint] + [changed] + [squared per rank] + [mean_norm_squared per rank]``.
      MAX of a pair ``(x, -x)`` gives the largest and the negated smallest value, so any rank that
      disagrees on the step or the layout is found by every rank at once; each rank writes its round
      figures into its own slots (-1 elsewhere, figures are never negative). ``start`` can launch it
      without waiting (``async_op``) so it overlaps the next step's compute; ``finish`` waits.
    - a tail of the averaging all-reduce itself (SUM, in the parameters' float32/float64): rank 0
      writes the state, every rank its step, fingerprint and changed flag into its own slots, zeros
      elsewhere; integers are split into parts that stay exact. No collective of its own. Used only
      for two-rank groups, where a sum has one order, so the longer buffer leaves the averaged values
      bit-identical to torch's.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup,
        levels: int,
        source: ControlSource | None = None,
        device: torch.device | None = None,
    ):
        self.process_group = process_group
        self.device = device if device is not None else torch.device("cpu")
        """Where the payload lives (``device.control_group``): the CPU unless no CPU backend exists."""
        self.source = source
        self.is_leader = dist.get_rank(process_group) == 0
        self._rank = dist.get_rank(process_group)
        self._world = dist.get_world_size(process_group)
        self._state_len = control_state.encoded_size(levels)
        self._ledger = CommandLedger()

    @property
    def tail_size(self) -> int:
        """Elements of an averaging buffer's tail that carries this exchange."""
        return 2 * self._state_len + 5 * self._world

    def exchange(self, state: ControlState, step: int, fingerprint: int) -> ControlState:
        """All ranks call this at the same step and wait; returns the state every rank now holds."""
        return self.finish(self.start(state, step, fingerprint, anchor=step, wait=True), state, step).state

    def start(
        self,
        state: ControlState,
        step: int,
        fingerprint: int,
        *,
        anchor: int,
        changed: int = 0,
        stats: tuple[float, float] | None = None,
        wait: bool = False,
        tail: torch.Tensor | None = None,
    ) -> PendingExchange:
        """Propose (rank 0: commands applied with ``anchor`` as their grid start) and launch the exchange.

        With ``tail``, only fill it: the caller's all-reduce of the buffer it belongs to carries it.
        ``changed`` is nonzero when this rank's parameter set changed (in a tail: a tag below 2**20
        of how, so ranks can tell whether they changed alike).
        """
        applied: list[int] = []
        proposed = state
        if self.is_leader:
            proposed, applied = self._take_commands(state, anchor)
        if tail is not None:
            values = array.array("d", self._tail_values(proposed, step, fingerprint, changed))
            tail.copy_(torch.frombuffer(values, dtype=torch.float64))
            return PendingExchange(tail, None, proposed, applied, carries_stats=False, in_tail=True)
        head = control_state.encode(proposed) if self.is_leader else [-1.0] * self._state_len
        figures = [-1.0] * (2 * self._world)
        if stats is not None:
            figures[self._rank], figures[self._world + self._rank] = stats
        payload = torch.tensor(
            head + [step, -step, fingerprint, -fingerprint, 1.0 if changed else 0.0] + figures,
            dtype=torch.float64,
            device=self.device,
        )
        work = dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=self.process_group, async_op=not wait)
        return PendingExchange(payload, work, proposed, applied, stats is not None)

    def finish(self, pending: PendingExchange, state: ControlState, applied_step: int) -> ExchangeResult:
        """Wait for ``pending``; every rank adopts the result at ``applied_step`` (rank 0 acks with it)."""
        if pending.work is not None:
            pending.work.wait()
        # A CPU payload, or a tail the round read: no device sync (see device.exchange_placement).
        values = pending.values if pending.values is not None else pending.payload.tolist()
        if pending.in_tail:
            head, steps, fingerprints, flags = self._read_tail(values)
            changed = any(flags)
            stats = None
        else:
            head = values[: self._state_len]
            tail = values[self._state_len : self._state_len + 5]
            steps, fingerprints, changed = (tail[0], -tail[1]), (tail[2], -tail[3]), tail[4] > 0
            stats = values[self._state_len + 5 :] if pending.carries_stats else None
        if len(set(steps)) > 1:
            raise RuntimeError(
                f"ranks disagree on the averager step (from {int(min(steps))} to {int(max(steps))}): "
                "every rank must call average_parameters once per step"
            )
        if len(set(fingerprints)) > 1:
            raise RuntimeError(
                "ranks disagree on the parameters to average (different shapes, dtypes, or a different "
                "set of parameters with .grad): averaging them would mix unrelated values"
            )
        new_state = state if head == control_state.encode(state) else control_state.decode(head, state)
        if self.is_leader and pending.applied:
            self._ack_applied(pending.applied, applied_step, new_state)
        return ExchangeResult(new_state, changed and not pending.layout_settled, stats)

    def changed_alike(self, pending: PendingExchange) -> bool:
        """A tail read at its round says every rank's parameter set changed, and in the same way."""
        assert pending.in_tail and pending.values is not None
        _, _, fingerprints, flags = self._read_tail(pending.values)
        return len(set(fingerprints)) == 1 and len(set(flags)) == 1 and flags[0] > 0

    def _tail_values(self, proposed: ControlState, step: int, fingerprint: int, changed: int) -> list[float]:
        head = _split(control_state.encode(proposed)) if self.is_leader else [0.0] * (2 * self._state_len)
        mine = [0.0] * (5 * self._world)
        mine[5 * self._rank : 5 * self._rank + 5] = _split([step, fingerprint % (_SPLIT * _SPLIT)]) + [float(changed)]
        return head + mine

    def _read_tail(self, values: list[float]) -> tuple[list[float], list[float], list[float], list[float]]:
        head = _join(values[: 2 * self._state_len])
        ranks = values[2 * self._state_len :]
        steps, fingerprints, flags = [], [], []
        for r in range(self._world):
            step, fingerprint = _join(ranks[5 * r : 5 * r + 4])
            steps.append(step)
            fingerprints.append(fingerprint)
            flags.append(ranks[5 * r + 4])
        return head, steps, fingerprints, flags

    def _take_commands(self, state: ControlState, anchor: int) -> tuple[ControlState, list[int]]:
        if self.source is None:
            return state, []
        applied = []
        for command_id, command in self.source.poll():
            ack = self._ledger.ack_for(command_id)
            if ack is not None:  # re-delivered after a reconnect: answer, never re-apply
                self.source.report(ack)
                continue
            try:
                state = control_state.apply_command(state, command, anchor)
            except CommandRejected as err:
                self._remember(CommandAck(command_id=command_id, status="rejected", reason=str(err)))
                continue
            applied.append(command_id)
        return state, applied

    def _ack_applied(self, applied: list[int], step: int, state: ControlState) -> None:
        view = control_state.to_view(state)
        for command_id in applied:
            self._remember(CommandAck(command_id=command_id, status="applied", applied_step=step, control=view))

    def _remember(self, ack: CommandAck) -> None:
        self._ledger.remember(ack)
        assert self.source is not None
        self.source.report(ack)

    def state_dict(self) -> dict:
        """The ids rank 0 acked, so a restarted job answers their re-delivery instead of applying it."""
        return self._ledger.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ledger.load_state_dict(state)

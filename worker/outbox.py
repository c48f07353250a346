"""A rank's metric records on their way to the server: buffered, numbered, kept until stored.

No sockets here. The training thread adds records to bounded deques (the oldest go first when the
server is away, and are counted as dropped). The link thread packs them into numbered
``MetricsBatch`` frames under the frame limit, sends what ``after`` returns, and forgets a batch only
once the server's ``stored`` confirms it, so batches sent on a connection that broke are sent again
on the next one.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from avgctl.protocol import ControlEvent, MetricsBatch, RoundRecord, StepRecord
from avgctl.protocol.bounds import MAX_BATCH_RECORDS

MAX_FRAME = 1024 * 1024
"""Bytes in one frame: the server's default ``max_frame_bytes``."""


@dataclass(slots=True)
class Batch:
    """One numbered ``MetricsBatch`` frame, kept as text until the server confirms it."""

    seq: int
    text: str
    """The frame, sent again as it is after a reconnect."""
    records: int


class Outbox:
    """Bounded buffers of one rank's records and the batches the server has not confirmed.

    ``add_*`` are for the training thread (deque appends are atomic, O(1)); ``pack``, ``after`` and
    ``confirm`` for the one thread that talks to the server.

    Args:
        max_records: step records kept while the server is away (rounds: a tenth, at least 100;
            control events: 1,000). Sent batches the server has not confirmed are kept too, up to
            twice as many records.
        max_frame: the largest frame, in characters of JSON.
    """

    def __init__(self, max_records: int = 10_000, max_frame: int = MAX_FRAME):
        self._steps: collections.deque[StepRecord] = collections.deque(maxlen=max_records)
        self._rounds: collections.deque[RoundRecord] = collections.deque(maxlen=max(100, max_records // 10))
        self._control: collections.deque[ControlEvent] = collections.deque(maxlen=1000)
        self.max_frame = max_frame
        self.dropped = 0
        """Records dropped so far: a buffer was full, or a batch the server never confirmed was pushed
        out of the resend buffer (it may have been stored). Every batch carries it."""
        self._unconfirmed: collections.deque[Batch] = collections.deque()
        self._unconfirmed_records = 0
        self._max_unconfirmed = 2 * max_records
        self._seq = -1

    @property
    def unconfirmed(self) -> int:
        """Records in batches the server has not yet confirmed as stored."""
        return self._unconfirmed_records

    @property
    def all_stored(self) -> bool:
        """No batch waits for the server's confirmation."""
        return not self._unconfirmed

    # ------------------------------------------------------------ training thread

    def add_step(self, record: StepRecord) -> None:
        """Buffer a step record (the oldest goes, counted, when the buffer is full)."""
        self._append(self._steps, record)

    def add_round(self, record: RoundRecord) -> None:
        """Buffer a round record (as ``add_step``)."""
        self._append(self._rounds, record)

    def add_control(self, event: ControlEvent) -> None:
        """Buffer a control event (as ``add_step``)."""
        self._append(self._control, event)

    def _append(self, buffer: collections.deque, item: object) -> None:
        if len(buffer) == buffer.maxlen:
            self.dropped += 1
        buffer.append(item)

    # ------------------------------------------------------------ the link's thread

    def pack(self) -> int:
        """Turn the buffered records into numbered batches; returns how many were made."""
        steps, rounds, control = _drain(self._steps), _drain(self._rounds), _drain(self._control)
        if not (steps or rounds or control):
            return 0
        made = 0
        for text, records in _frames(steps, rounds, control, self._encode, self.max_frame):
            self._seq += 1
            self._keep(Batch(self._seq, text, records))
            made += 1
        return made

    def after(self, seq: int) -> list[Batch]:
        """The unconfirmed batches numbered above ``seq``, oldest first (a new connection: ``after(-1)``)."""
        return [batch for batch in self._unconfirmed if batch.seq > seq]

    def confirm(self, seq: int) -> None:
        """The server stored every batch up to ``seq``: forget them."""
        while self._unconfirmed and self._unconfirmed[0].seq <= seq:
            self._unconfirmed_records -= self._unconfirmed.popleft().records

    def _encode(self, steps: list, rounds: list, control: list) -> str:
        # Numbered as the next batch: _frames asks for a text only once the previous one is kept.
        batch = MetricsBatch(steps=steps, rounds=rounds, control=control, dropped=self.dropped, seq=self._seq + 1)
        return batch.model_dump_json()

    def _keep(self, batch: Batch) -> None:
        self._unconfirmed.append(batch)
        self._unconfirmed_records += batch.records
        while self._unconfirmed_records > self._max_unconfirmed and len(self._unconfirmed) > 1:
            oldest = self._unconfirmed.popleft()
            self._unconfirmed_records -= oldest.records
            self.dropped += oldest.records


def _drain(buffer: collections.deque) -> list:
    out = []
    with contextlib.suppress(IndexError):
        for _ in range(len(buffer)):
            out.append(buffer.popleft())
    return out


def _frames(
    steps: list, rounds: list, control: list, encode: Callable[[list, list, list], str], max_frame: int
) -> Iterator[tuple[str, int]]:
    """``(text, records)`` of ``encode``d batches under the frame limit: one too large is split in halves."""
    text = encode(steps[:MAX_BATCH_RECORDS], rounds[:MAX_BATCH_RECORDS], control[:MAX_BATCH_RECORDS])
    total = len(steps) + len(rounds) + len(control)
    if (len(text) <= max_frame and max(len(steps), len(rounds), len(control)) <= MAX_BATCH_RECORDS) or total <= 1:
        yield text, total
        return
    half = len(steps) // 2, len(rounds) // 2, len(control) // 2
    yield from _frames(steps[: half[0]], rounds[: half[1]], control[: half[2]], encode, max_frame)
    yield from _frames(steps[half[0] :], rounds[half[1] :], control[half[2] :], encode, max_frame)

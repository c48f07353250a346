"""The one rule for command ids: apply an id once; answer a re-delivered id with its remembered ack.

The server delivers a command again after a reconnect until it holds the command's ack, so the same
id can reach rank 0 more than once. Rank 0's exchange (``worker/control.py``) and its link
(``worker/link.py``) both keep a ``CommandLedger``; so do the test fakes that stand in for them.
"""

from __future__ import annotations

import collections

from avgctl.protocol import CommandAck

REMEMBERED_COMMANDS = 4096
"""Ids a ledger remembers: far more than a person sends between two reconnects, and a few hundred KiB."""


class CommandLedger:
    """Bounded memory of the command ids seen and the acks they got, oldest forgotten first.

    Args:
        capacity: ids remembered; beyond it the least recently seen or acked id is forgotten.
    """

    def __init__(self, capacity: int = REMEMBERED_COMMANDS):
        if capacity < 1:
            raise ValueError("a ledger must remember at least one id")
        self.capacity = capacity
        # id -> its ack, or None while it is taken but not yet acked.
        self._entries: collections.OrderedDict[int, CommandAck | None] = collections.OrderedDict()

    def __contains__(self, command_id: int) -> bool:
        return command_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def ack_for(self, command_id: int) -> CommandAck | None:
        """The ack an id already got (send it again instead of applying the command), else None."""
        return self._entries.get(command_id)

    def take(self, command_id: int) -> bool:
        """Mark an id as on its way to be applied; False when it was taken or acked before.

        For a relay that queues commands before they are applied (the link), so an id delivered
        again while it waits in the queue is not queued twice.
        """
        if command_id in self._entries:
            return False
        self._put(command_id, None)
        return True

    def remember(self, ack: CommandAck) -> None:
        """Record an id's ack: every later delivery of that id is answered with it."""
        self._put(ack.command_id, ack)

    def acked_ids(self) -> list[int]:
        """The ids that got an ack, oldest first."""
        return [command_id for command_id, ack in self._entries.items() if ack is not None]

    def state_dict(self) -> dict:
        """The acked ids, for checkpoints (``{"acked": [...]}``)."""
        return {"acked": self.acked_ids()}

    def load_state_dict(self, state: dict) -> None:
        """Add a checkpoint's acked ids to what this ledger remembers.

        Only ids survive a restart: a re-delivered one is acked as applied without its old details.
        """
        for command_id in state.get("acked", []):
            self.remember(CommandAck(command_id=command_id, status="applied"))

    def _put(self, command_id: int, ack: CommandAck | None) -> None:
        self._entries[command_id] = ack
        self._entries.move_to_end(command_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

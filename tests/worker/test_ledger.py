"""The command ledger: an id is applied once, a repeat gets the remembered ack, memory is bounded."""

from __future__ import annotations

import pytest

from avgctl.protocol import CommandAck
from avgctl.worker.ledger import CommandLedger


def _applied(command_id: int, step: int = 5) -> CommandAck:
    return CommandAck(command_id=command_id, status="applied", applied_step=step)


def test_an_unseen_id_has_no_ack_and_can_be_taken_once():
    ledger = CommandLedger()
    assert ledger.ack_for(7) is None
    assert ledger.take(7) is True
    assert ledger.take(7) is False  # delivered again while it waits: not queued twice
    assert ledger.ack_for(7) is None  # taken, not yet answered


def test_a_repeat_is_answered_with_the_remembered_ack():
    ledger = CommandLedger()
    ledger.take(3)
    ledger.remember(_applied(3, step=12))
    assert ledger.ack_for(3) == _applied(3, step=12)
    assert ledger.take(3) is False


def test_a_rejected_ack_is_remembered_as_it_was():
    ledger = CommandLedger()
    rejected = CommandAck(command_id=9, status="rejected", reason="period out of range")
    ledger.remember(rejected)
    assert ledger.ack_for(9) == rejected


def test_memory_is_bounded_and_forgets_the_oldest_first():
    ledger = CommandLedger(capacity=3)
    for command_id in range(5):
        ledger.remember(_applied(command_id))
    assert len(ledger) == 3
    assert ledger.ack_for(0) is None and ledger.ack_for(1) is None
    assert [ledger.ack_for(i).command_id for i in (2, 3, 4)] == [2, 3, 4]


def test_acking_a_taken_id_makes_it_the_newest():
    ledger = CommandLedger(capacity=2)
    ledger.take(1)
    ledger.take(2)
    ledger.remember(_applied(1))  # 1 was taken first but answered last: 2 goes first
    ledger.take(3)
    assert 1 in ledger and 2 not in ledger and 3 in ledger


def test_checkpoint_carries_acked_ids_only_and_answers_them_as_applied():
    ledger = CommandLedger()
    ledger.remember(CommandAck(command_id=1, status="rejected", reason="no"))
    ledger.take(2)  # not yet answered: a restart applies it if it comes again
    ledger.remember(_applied(4))
    assert ledger.state_dict() == {"acked": [1, 4]}
    restored = CommandLedger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.ack_for(4) == CommandAck(command_id=4, status="applied")
    assert restored.ack_for(1).status == "applied"  # only ids survive: details are gone
    assert restored.ack_for(2) is None


def test_loading_adds_to_what_the_ledger_remembers():
    ledger = CommandLedger()
    ledger.remember(_applied(10))
    ledger.load_state_dict({"acked": [20]})
    assert ledger.ack_for(10) is not None and ledger.ack_for(20) is not None


def test_a_ledger_must_remember_something():
    with pytest.raises(ValueError):
        CommandLedger(capacity=0)

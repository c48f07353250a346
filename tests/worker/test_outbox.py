"""The link's outbox without a socket: bounded buffers, numbered batches, resends, frame splitting."""

from __future__ import annotations

import json

from avgctl.protocol import ControlEvent, ControlView, MetricsBatch, RoundRecord, StepRecord
from avgctl.protocol.bounds import MAX_BATCH_RECORDS
from avgctl.worker.outbox import MAX_FRAME, Outbox


def _step(step: int, **scalars: float) -> StepRecord:
    return StepRecord(step=step, time=1.0, loss=0.5, scalars=scalars)


def _round(step: int) -> RoundRecord:
    return RoundRecord(
        step=step,
        group_size=2,
        divergence=0.1,
        relative_divergence=0.01,
        divergence_mean=0.1,
        divergence_max=0.2,
        relative_mean=0.01,
        relative_max=0.02,
        seconds=0.001,
        bytes=64,
        exact=True,
    )


def _batches(outbox: Outbox, after: int = -1) -> list[MetricsBatch]:
    return [MetricsBatch.model_validate_json(b.text) for b in outbox.after(after)]


def test_nothing_buffered_makes_no_batch():
    outbox = Outbox()
    assert outbox.pack() == 0
    assert outbox.after(-1) == [] and outbox.all_stored


def test_a_full_buffer_drops_the_oldest_records_and_counts_them():
    outbox = Outbox(max_records=3)
    for s in range(5):
        outbox.add_step(_step(s))
    assert outbox.dropped == 2
    outbox.pack()
    (batch,) = _batches(outbox)
    assert [r.step for r in batch.steps] == [2, 3, 4]
    assert batch.dropped == 2  # the server learns how many never reached it


def test_batches_are_numbered_by_one_over_the_outbox_life():
    outbox = Outbox()
    for s in range(3):
        outbox.add_step(_step(s))
        outbox.pack()
    assert [b.seq for b in outbox.after(-1)] == [0, 1, 2]
    assert [b.seq for b in _batches(outbox)] == [0, 1, 2]  # the number travels in the frame


def test_one_batch_carries_steps_rounds_and_control_together():
    outbox = Outbox()
    outbox.add_step(_step(4))
    outbox.add_round(_round(4))
    outbox.add_control(ControlEvent(step=4, control=ControlView(period=8, warmup_steps=0, version=1)))
    assert outbox.pack() == 1
    (batch,) = _batches(outbox)
    assert (len(batch.steps), len(batch.rounds), len(batch.control)) == (1, 1, 1)
    assert outbox.unconfirmed == 3


def test_a_batch_is_kept_until_stored_confirms_it_or_a_later_one():
    outbox = Outbox()
    for s in range(3):
        outbox.add_step(_step(s))
        outbox.pack()
    outbox.confirm(0)
    assert [b.seq for b in outbox.after(-1)] == [1, 2] and outbox.unconfirmed == 2
    outbox.confirm(2)  # "stored" up to 2 covers 1 too
    assert outbox.after(-1) == [] and outbox.unconfirmed == 0 and outbox.all_stored


def test_a_new_connection_resends_every_unconfirmed_batch_the_same_one_only_new_ones():
    outbox = Outbox()
    for s in range(3):
        outbox.add_step(_step(s))
        outbox.pack()
    sent = outbox.after(-1)  # all three went out on a connection that broke
    outbox.add_step(_step(3))
    outbox.pack()
    assert [b.seq for b in outbox.after(sent[-1].seq)] == [3]  # the same connection: only the new one
    resent = outbox.after(-1)  # a new connection: everything unconfirmed, as it was first sent
    assert [b.seq for b in resent] == [0, 1, 2, 3]
    assert [b.text for b in resent[:3]] == [b.text for b in sent]


def test_unconfirmed_batches_beyond_twice_max_records_push_out_the_oldest_as_dropped():
    outbox = Outbox(max_records=2)  # keeps at most 4 unconfirmed records
    for s in range(6):
        outbox.add_step(_step(s))
        outbox.pack()
    assert [b.seq for b in outbox.after(-1)] == [2, 3, 4, 5]
    assert outbox.unconfirmed == 4 and outbox.dropped == 2


def test_the_newest_batch_stays_even_when_it_alone_is_over_the_limit():
    outbox = Outbox(max_records=2)
    outbox.pack()
    for s in range(2):
        outbox.add_step(_step(s))
    for s in range(2):
        outbox.add_round(_round(s))
    outbox.pack()  # 4 records in one batch: at the limit, kept
    for s in range(2, 4):
        outbox.add_step(_step(s))
    for s in range(2, 5):
        outbox.add_round(_round(s))
    outbox.pack()  # 5 records: over the limit alone, the older batch goes, this one stays
    assert [b.seq for b in outbox.after(-1)] == [1] and outbox.unconfirmed == 5


def test_a_batch_too_large_for_a_frame_is_split_keeping_every_record_in_order():
    outbox = Outbox(max_frame=2_000)
    for s in range(40):
        outbox.add_step(_step(s, accuracy=0.5))
    made = outbox.pack()
    assert made > 1
    texts = [b.text for b in outbox.after(-1)]
    assert all(len(t) <= 2_000 for t in texts)
    batches = _batches(outbox)
    assert [r.step for b in batches for r in b.steps] == list(range(40))
    assert [b.seq for b in batches] == list(range(made))  # each piece is numbered in turn
    assert sum(b.records for b in outbox.after(-1)) == 40 == outbox.unconfirmed


def test_default_frames_stay_under_the_server_limit():
    outbox = Outbox(max_records=20_000)
    many = {f"figure{i}": float(i) for i in range(30)}  # about 1 KiB per step record
    for s in range(2_000):
        outbox.add_step(_step(s, **many))
    outbox.pack()
    texts = [b.text for b in outbox.after(-1)]
    assert len(texts) > 1 and all(len(t) <= MAX_FRAME for t in texts)
    assert sum(len(json.loads(t)["steps"]) for t in texts) == 2_000


def test_more_records_of_one_kind_than_a_batch_may_hold_are_split():
    outbox = Outbox(max_records=MAX_BATCH_RECORDS + 10)
    for s in range(MAX_BATCH_RECORDS + 10):
        outbox.add_step(StepRecord(step=s, time=1.0))
    outbox.pack()
    batches = _batches(outbox)  # each one validates against the protocol's bound
    assert len(batches) == 2 and all(len(b.steps) <= MAX_BATCH_RECORDS for b in batches)
    assert sum(len(b.steps) for b in batches) == MAX_BATCH_RECORDS + 10

"""The queue's de-duplication key is the event's identity: the same Jetstream event served again by
another instance (another receive clock, so another ``time_us``) is not a second queue item."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from consumers.base import Consumed
from consumers.queue import QueueSink
from producers.jetstream.decode import decode_message
from runtime.contract.records import Event, RecordEvent
from runtime.simulator.jetstream import shift_clock, synthetic_events

EVENTS = synthetic_events(300, seed=5, accounts=20, real_cids=False)


def consumed(event: Event, offset: int) -> Consumed:
    return Consumed("t", 0, offset, "x", event, 0)


def test_a_replay_through_another_instance_adds_no_second_item(tmp_path: Path) -> None:
    sink = QueueSink("q", tmp_path / "q.sqlite")
    try:
        first = [decode_message(e.text) for e in EVENTS]
        other = [decode_message(e.text) for e in shift_clock(EVENTS, 2_500_000)]  # an instance 2.5 s ahead
        assert all(a.time_us != b.time_us for a, b in zip(first, other, strict=True))
        for i, e in enumerate(first):
            sink.add(consumed(e, i))
        assert sink.flush("g", {("t", 0): len(first)}) == len(first)
        for i, e in enumerate(other):
            sink.add(consumed(e, len(first) + i))
        assert sink.flush("g", {("t", 0): 2 * len(first)}) == 0, "the other instance's replay is no new item"
        assert sink.queue_length() == len(first)
        # A new revision of a record is a new item, whatever its time.
        e = next(e for e in first if isinstance(e, RecordEvent))
        sink.add(consumed(replace(e, rev="3zzzzzzzzzzzz"), 10**6))
        assert sink.flush("g", {("t", 0): 10**6 + 1}) == 1
    finally:
        sink.close()

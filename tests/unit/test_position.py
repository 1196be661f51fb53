"""StreamPosition: what a resume or reconnect may skip, and what it must not."""

from __future__ import annotations

from producers.source import StreamPosition
from runtime.contract.records import RecordEvent


def ev(t: int, rkey: str = "k") -> RecordEvent:
    return RecordEvent("did:plc:a", "app.bsky.feed.like", rkey, "create", "r", "c", {}, "jetstream", t, t)


def test_fresh_position_has_seen_nothing() -> None:
    pos = StreamPosition(rewind=100)
    assert not pos.seen(ev(5))
    assert pos.cursor is None and pos.resume_from is None


def test_out_of_order_events_within_the_window() -> None:
    pos = StreamPosition(rewind=100)
    for t in (1000, 990, 1010):
        pos.advance(ev(t, str(t)))
    assert pos.cursor == 1010 and pos.resume_from == 910
    assert pos.seen(ev(990, "990")) and pos.seen(ev(1010, "1010"))
    assert not pos.seen(ev(995, "995")), "a late event not yet delivered must not be skipped"
    assert pos.seen(ev(900, "old")), "older than the window: delivered before or never coming"


def test_snapshot_restore_keeps_exactly_the_window() -> None:
    pos = StreamPosition(rewind=100)
    for t in range(0, 1000, 10):
        pos.advance(ev(t, str(t)))
    snap = pos.snapshot()
    assert snap["cursor"] == 990
    assert len(snap["window"]) == 11  # cursors 890..990
    again = StreamPosition.restore(snap, rewind=100)
    assert again.cursor == 990
    assert all(again.seen(ev(t, str(t))) for t in range(890, 1000, 10))
    assert not again.seen(ev(995, "new"))


def test_rewind_zero_keeps_the_same_cursor_events() -> None:
    """A relay frame carries several ops with one seq: a partial frame must resume exactly."""
    pos = StreamPosition(rewind=0)
    pos.advance(ev(7, "a"))
    pos.advance(ev(7, "b"))
    again = StreamPosition.restore(pos.snapshot(), rewind=0)
    assert again.seen(ev(7, "a")) and again.seen(ev(7, "b")) and not again.seen(ev(7, "c"))
    assert again.seen(ev(6, "z")) and not again.seen(ev(8, "a"))


def test_identities_are_the_checkpointed_fingerprints() -> None:
    """In memory a tuple stands for the event; the checkpoint holds the same fingerprints as ever."""
    from producers.source import _fingerprint_of, _identity, fingerprint
    from runtime.contract.records import AccountEvent, IdentityEvent, event_key

    events = [ev(7), RecordEvent("did:plc:b", "app.bsky.feed.post", "3k", "delete", None, None, None, "firehose", 9, 9),
              IdentityEvent(did="did:plc:c", handle="h.test", seq=None, time=None, source="jetstream", cursor=3,
                            time_us=3),
              AccountEvent(did="did:plc:d", active=False, status="deleted", seq=12, time=None, source="firehose",
                           cursor=12, time_us=4)]
    # Jetstream v2: clock-free keys shared with v1, fallback keys of its own (records.event_key)
    events += [RecordEvent("did:plc:e", "app.bsky.feed.post", "3k", "create", "3rev", "c", {}, "jetstream2", 5, 6,
                           witnessed_at=7, indexed_at=6),
               RecordEvent("did:plc:e", "app.bsky.feed.post", "3k", "delete", None, None, None, "jetstream2", 5, 6),
               IdentityEvent("did:plc:f", "h.test", 44, None, "jetstream2", 8, 9, witnessed_at=9),
               AccountEvent("did:plc:f", True, None, None, None, "jetstream2", 8, 9, indexed_at=9)]
    for e in events:
        assert "|".join(map(str, _identity(e))) == event_key(e)
        assert _fingerprint_of(_identity(e)) == fingerprint(e)
    pos = StreamPosition(rewind=100)
    pos.advance(events[0])
    assert pos.snapshot()["window"] == [fingerprint(events[0]).hex()]


def test_a_restored_window_dedups_the_overlap_then_expires() -> None:
    pos = StreamPosition(rewind=100)
    for t in (1000, 990):
        pos.advance(ev(t, str(t)))
    restored = set(pos.snapshot()["window"])
    again = StreamPosition.restore(pos.snapshot(), rewind=100)
    assert again.seen(ev(990, "990")) and again.seen(ev(1000, "1000"))
    assert not again.seen(ev(995, "995"))
    again.advance(ev(1050, "1050"))
    snap = again.snapshot()["window"]
    assert len(snap) == 3 and restored <= set(snap)  # two restored, one new
    assert again.seen(ev(1000, "1000"))  # still within the window
    again.advance(ev(1101, "1101"))  # the floor (1001) passed the restored cursor (1000)
    assert set(again.snapshot()["window"]).isdisjoint(restored)
    assert len(again.snapshot()["window"]) == 2
    assert again.seen(ev(1000, "1000"))  # below the floor: delivered before

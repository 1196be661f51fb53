"""The Jetstream position: identities independent of an instance's clock, the failover rule, late
events, and the bounds of what is held in memory and in checkpoints."""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from dataclasses import replace

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producers.jetstream.decode import decode_message
from producers.jetstream.position import (
    BUCKETS,
    DUPLICATE,
    LATE,
    NEW,
    WINDOW_IDENTITIES,
    JetstreamPosition,
    identity,
)
from producers.source import StreamPosition
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent, event_key
from runtime.simulator.jetstream import synthetic_events

S = 1_000_000  # one second in µs
A, B = "ws://a/subscribe", "ws://b/subscribe"


def rec(i: int, t: int, did: str = "did:plc:a") -> RecordEvent:
    """Event ``i`` of a repository as an instance with its receive time ``t`` serves it."""
    return RecordEvent(did, "app.bsky.feed.like", f"rk{i:06d}", "create", f"rev{i:06d}", f"cid{i}", {},
                       "jetstream", t, t)


def served(event: RecordEvent, t: int) -> RecordEvent:
    """The same event served by another instance, whose receive clock said ``t``."""
    return replace(event, cursor=t, time_us=t)


# ------------------------------------------------------------------------------------ identity


def test_a_jetstream_identity_leaves_the_instance_clock_out() -> None:
    e = rec(1, 5 * S)
    assert event_key(e) == event_key(served(e, 9 * S)) == "jetstream|did:plc:a|app.bsky.feed.like|rk000001|rev000001"
    assert identity(e) == identity(served(e, 1))
    assert identity(e) != identity(replace(e, rev="rev000002")), "a new revision of the record is another event"
    assert identity(e) != identity(replace(e, rkey="other"))
    ident = IdentityEvent(did="did:plc:a", handle="a.test", seq=77, time=None, source="jetstream", cursor=3,
                          time_us=3)
    acct = AccountEvent(did="did:plc:a", active=True, status=None, seq=77, time=None, source="jetstream",
                        cursor=3, time_us=3)
    assert event_key(ident) == event_key(replace(ident, cursor=8, time_us=8)) == "jetstream|did:plc:a|identity|77"
    assert event_key(acct) == "jetstream|did:plc:a|account|77" and identity(ident) != identity(acct)


def test_without_rev_or_seq_the_clock_is_all_there_is() -> None:
    e = replace(rec(1, 5), rev=None)
    assert event_key(e) != event_key(served(e, 6))
    ident = IdentityEvent(did="did:plc:a", handle=None, seq=None, time=None, source="jetstream", cursor=3,
                          time_us=3)
    assert event_key(ident) != event_key(replace(ident, time_us=4))


def test_relay_and_repository_keys_are_unchanged() -> None:
    e = RecordEvent("did:plc:a", "app.bsky.feed.like", "k", "create", "r", "c", {}, "firehose", 9, 1234)
    assert event_key(e) == "firehose|did:plc:a|app.bsky.feed.like|k|create|r|c|1234"
    acct = AccountEvent(did="did:plc:a", active=True, status=None, seq=9, time=None, source="firehose", cursor=9,
                        time_us=1234)
    assert event_key(acct) == "firehose|did:plc:a|account|9|1234"


def test_the_synthetic_stream_has_distinct_identities() -> None:
    events = [decode_message(e.text) for e in synthetic_events(5000, seed=3, accounts=40, real_cids=False)]
    assert len({identity(e) for e in events}) == len(events)


# ------------------------------------------------------------------------------------ one instance


def test_reorder_within_the_lateness_is_neither_late_nor_duplicate() -> None:
    pos = JetstreamPosition(lateness=100, failover_rewind=1000)
    assert pos.connected(A) is None
    for i, t in enumerate((1000, 990, 1010, 950)):
        assert pos.check(rec(i, t)) == NEW
        pos.advance(rec(i, t))
    assert pos.late == 0 and pos.cursor == 1010 and pos.clock == 1010
    assert pos.check(rec(1, 990)) == DUPLICATE
    assert pos.connected(A) == 910, "a reconnect to the same instance rewinds the lateness"
    assert pos.connected(B) == 10, "a connection to another instance rewinds the failover rewind"


def test_a_late_event_is_delivered_once_and_counted_not_taken_for_a_duplicate() -> None:
    pos = JetstreamPosition(lateness=100, failover_rewind=10_000)
    pos.connected(A)
    for i in range(10):
        pos.check(rec(i, 1000 + 100 * i))
        pos.advance(rec(i, 1000 + 100 * i))
    late = rec(99, 1200)  # 1,700 µs behind the newest: far more than the lateness
    assert pos.check(late) == LATE and pos.late == 1
    pos.advance(late)
    assert pos.check(late) == DUPLICATE, "the same late event again is a duplicate"
    assert pos.check(rec(3, 1300)) == DUPLICATE and pos.late == 1
    assert pos.cursor == 1900, "a late event does not move the cursor back"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 5000)), min_size=1, max_size=120),
       st.integers(0, 2000))
def test_any_arrival_order_delivers_each_event_once(arrivals: list[tuple[int, int]], lateness: int) -> None:
    """Events arrive in any order, replays included, on one instance, all within the hold: each is
    delivered exactly once, and exactly the first arrivals more than the lateness behind the newest
    cursor received are counted late."""
    pos = JetstreamPosition(lateness=lateness, failover_rewind=10_000)
    pos.connected(A)
    delivered: Counter[int] = Counter()
    cursors = []
    late = 0
    newest: int | None = None
    for i, t in arrivals:
        e = rec(i, t)
        verdict = pos.check(e)
        if i not in delivered and newest is not None and t < newest - lateness:
            late += 1
        newest = t if newest is None else max(newest, t)
        if verdict != DUPLICATE:
            delivered[i] += 1
            cursors.append(t)
            pos.advance(e)
    assert delivered == Counter({i for i, _ in arrivals})
    assert pos.late == late
    assert pos.cursor == max(cursors)


# ------------------------------------------------------------------------------------ failover


def serve(times: list[int], cursor: int | None) -> list[int]:
    """What an instance with these receive times (in arrival order) sends from ``cursor``: like
    the simulator, events with a time at or after the cursor, in arrival order."""
    return [i for i, t in enumerate(times) if cursor is None or t >= cursor]


def run(pos: JetstreamPosition, instance: str, times: list[int], delivered: list[int], limit: int,
        events: list[RecordEvent]) -> None:
    cursor = pos.connected(instance)
    for n, i in enumerate(serve(times, cursor)):
        if n >= limit:
            return
        e = served(events[i], times[i])
        if pos.check(e) != DUPLICATE:
            delivered.append(i)
            pos.advance(e)


@settings(max_examples=300, deadline=None)
@given(gaps=st.lists(st.integers(1, 40_000), min_size=5, max_size=300), data=st.data(),
       lateness=st.integers(0, 50_000), rewind=st.integers(0, 3 * S), resume=st.booleans())
def test_failover_to_an_instance_behind_or_ahead_neither_duplicates_nor_drops(
        gaps: list[int], data: st.DataObject, lateness: int, rewind: int, resume: bool) -> None:
    """Instance A serves part of the stream (with a reconnect), then the job fails over to B, whose
    receive clock is behind or ahead of A's by up to ``failover_rewind - lateness``, continuing in
    the same process or after a checkpoint (``resume``). Every event is delivered exactly once and
    none is taken for late: each instance's receive delays stay within half the lateness."""
    pos = JetstreamPosition(lateness, rewind, checkpoint_identities=10_000)
    skew_bound = pos.failover_rewind - lateness
    skew = data.draw(st.integers(-skew_bound, skew_bound), label="skew")
    jitter = st.integers(0, lateness // 2)
    base = []
    t = 1_700_000_000 * S
    for g in gaps:
        t += g
        base.append(t)
    events = [rec(i, b) for i, b in enumerate(base)]
    a_times = [b + data.draw(jitter) for b in base]
    b_times = [b + skew + data.draw(jitter) for b in base]
    first = data.draw(st.integers(0, len(base)), label="delivered from A before a reconnect")
    second = data.draw(st.integers(0, len(base)), label="received from A after it")
    delivered: list[int] = []
    run(pos, A, a_times, delivered, first, events)
    run(pos, A, a_times, delivered, second, events)
    if resume:
        pos = JetstreamPosition.restore(pos.snapshot(), lateness, rewind, checkpoint_identities=10_000)
    run(pos, B, b_times, delivered, len(base), events)
    assert Counter(delivered) == Counter(range(len(base)))
    assert pos.late == 0


def test_the_first_event_from_the_new_instance_takes_over_the_clock() -> None:
    pos = JetstreamPosition(lateness=100, failover_rewind=5000)
    pos.connected(A)
    for i in range(5):
        pos.check(rec(i, 10_000 + i * 10))
        pos.advance(rec(i, 10_000 + i * 10))
    assert pos.connected(B) == 10_040 - 5000
    assert pos.connected(B) == 10_040 - 5000, "still A's clock until B sent something"
    assert pos.check(served(rec(2, 0), 7000)) == DUPLICATE
    assert (pos.instance, pos.clock) == (B, 7000)
    assert pos.check(served(rec(5, 0), 7100)) == NEW
    pos.advance(served(rec(5, 0), 7100))
    assert pos.cursor == 10_040, "the headline cursor never goes back"
    assert pos.connected(B) == 7000 and pos.connected(A) == 7100 - 5000


# ------------------------------------------------------------------------------------ bounds


def test_identities_are_held_for_twice_the_failover_rewind_then_forgotten() -> None:
    pos = JetstreamPosition(lateness=10, failover_rewind=1000)
    pos.connected(A)
    first = rec(0, 0)
    pos.check(first)
    pos.advance(first)
    t = 0
    for i in range(1, 400):
        t = i * 10
        pos.check(rec(i, t))
        pos.advance(rec(i, t))
        if t <= pos.hold:
            assert pos.seen(first), f"forgotten at {t}, within the hold"
    assert t > pos.hold * (1 + 2 / BUCKETS)
    assert not pos.seen(first)
    assert pos.held <= (pos.hold * (1 + 2 / BUCKETS)) // 10


def test_the_cap_bounds_what_is_held_and_what_a_checkpoint_holds() -> None:
    pos = JetstreamPosition(lateness=50, failover_rewind=10**9, max_identities=1000, checkpoint_identities=300)
    pos.connected(A)
    for i in range(20_000):
        pos.check(rec(i, i))
        pos.advance(rec(i, i))
        assert pos.held <= 1000
    assert pos.seen(rec(19_999, 0)) and not pos.seen(rec(0, 0))
    snap = pos.snapshot()
    window = base64.b64decode(snap["window"])
    held = base64.b64decode(snap["held"])
    assert len(window) == 51 * 8, "every identity within the lateness of the clock"
    assert len(held) == 300 * 8, "then newest first up to the cap"


def test_snapshot_restore_on_the_same_instance_drops_the_overlap_exactly() -> None:
    pos = JetstreamPosition(lateness=100, failover_rewind=1000)
    pos.connected(A)
    for i in range(50):
        pos.check(rec(i, i * 10))
        pos.advance(rec(i, i * 10))
    again = JetstreamPosition.restore(pos.snapshot(), 100, 1000)
    assert (again.cursor, again.clock, again.instance) == (490, 490, A)
    assert again.connected(A) == 390
    assert all(again.check(rec(i, i * 10)) == DUPLICATE for i in range(39, 50))
    assert again.check(rec(50, 500)) == NEW
    assert again.connected(B) == 490 - 1000 if 490 > 1000 else again.connected(B) == 0


def test_a_checkpoint_of_the_earlier_format_still_drops_its_overlap() -> None:
    """A StreamPosition checkpoint (fingerprints of keys with time_us) resumes without duplicates."""
    old = StreamPosition(rewind=100)
    events = [rec(i, i * 10) for i in range(50)]

    def old_fingerprint(e: Event) -> bytes:
        assert isinstance(e, RecordEvent)
        key = f"jetstream|{e.did}|{e.collection}|{e.rkey}|{e.operation}|{e.rev}|{e.cid}|{e.time_us}"
        return hashlib.blake2b(key.encode(), digest_size=8).digest()

    for e in events:
        old.advance(e)
    snap = {"cursor": 490, "rewind": 100, "window": sorted(old_fingerprint(e).hex() for e in events[39:])}
    pos = JetstreamPosition.restore(snap, 100, 1000)
    assert pos.connected(A) == 390
    assert all(pos.check(e) == DUPLICATE for e in events[39:])
    assert pos.check(rec(50, 500)) == NEW
    again = JetstreamPosition.restore(pos.snapshot(), 100, 1000)
    assert again.check(events[45]) == DUPLICATE, "carried by the next checkpoint while within the lateness"


def test_a_dense_lateness_window_keeps_the_checkpoint_within_a_kafka_message(
        caplog: pytest.LogCaptureFixture) -> None:
    # A burst: 150,000 events inside half a second of time_us (a replay, a busy instance). Every
    # identity of the lateness window would take 1.6 MB of base64, over Kafka's 1 MB message limit.
    pos = JetstreamPosition(S, 120 * S)
    pos.connected(A)
    events = [rec(i, 10 * S + i * 3) for i in range(150_000)]
    with caplog.at_level("WARNING", logger="producers.jetstream.position"):
        for e in events:
            pos.check(e)
            pos.advance(e)
    warned = [r for r in caplog.records if "within the allowed lateness" in r.getMessage()]
    assert len(warned) == 1  # once, not per event
    snap = pos.snapshot()
    assert len(orjson.dumps(snap)) < 600_000
    # A resume on the same instance: the newest window identities are recognised...
    back = JetstreamPosition.restore(orjson.loads(orjson.dumps(snap)), S, 120 * S)
    back.connected(A)
    assert all(back.check(e) == DUPLICATE for e in events[-WINDOW_IDENTITIES:])
    # ... the older ones of the window may come again (the sinks de-duplicate), never skipped
    assert back.check(events[0]) != DUPLICATE


@given(source=st.sampled_from(["jetstream", "jetstream2", "firehose", "repo"]),
       did=st.text(max_size=12), collection=st.text(max_size=12), rkey=st.text(max_size=8),
       rev=st.one_of(st.none(), st.just(""), st.text(max_size=8)), time_us=st.integers(0, 2**62))
@settings(max_examples=300, deadline=None)
def test_the_identity_is_the_blake2b_of_the_event_key(source: str, did: str, collection: str, rkey: str,
                                                      rev: str | None, time_us: int) -> None:
    """identity()'s inline common case keys exactly as event_key does (checkpoints hold these hashes)."""
    event = RecordEvent(did=did, collection=collection, rkey=rkey, operation="create", rev=rev, cid="c",
                        record={}, source=source, cursor=time_us, time_us=time_us)
    key = event_key(event).encode()
    assert identity(event) == int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")

"""The pure transform of the PostgreSQL sink: typed rows, in-batch reduction by revision, drops."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from consumers.postgres.rows import (
    POSTS,
    RECORD_TABLES,
    RECORDS,
    Batch,
    TransformOptions,
    add_event,
    naive_utc,
    post_type,
    uri_did,
)
from runtime.atproto.tid import make_tid
from runtime.contract.created_at import Outcome, OutOfRange, TimestampPolicy
from runtime.contract.records import AccountEvent, IdentityEvent, RecordEvent, SyncEvent
from runtime.contract.typed import record_datum
from runtime.errors import DropError, InvalidRecordError

CID = "bafyreidc6sydkkbchcyg62v77wbhzvb2mvytlmsychqgwf2xojjtirmzj4"
A = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
B = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"
C = "did:plc:cccccccccccccccccccccccc"
OPTS = TransformOptions()


def rec_event(collection: str, record: dict[str, Any] | None, *, rkey: str = "3kaaa", rev: str = "3kr0001",
              op: str = "create", did: str = A, cursor: int = 1, job: str = "j") -> RecordEvent:
    return RecordEvent(did=did, collection=collection, rkey=rkey, operation=op, rev=rev,
                       cid=None if record is None else CID, record=record, source="jetstream", cursor=cursor,
                       time_us=cursor, job=job)


def post(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"$type": "app.bsky.feed.post", "text": text, "createdAt": "2024-05-02T03:04:05.678Z", **extra}


def ref(did: str, n: int = 1) -> dict[str, str]:
    return {"uri": f"at://{did}/app.bsky.feed.post/{n}", "cid": CID}


def only_row(batch: Batch, table: str) -> tuple[Any, ...]:
    rows = batch.upserts()[table]
    assert len(rows) == 1
    return rows[0]


def named(table_name: str, row: tuple[Any, ...]) -> dict[str, Any]:
    table = next(t for t in RECORD_TABLES if t.name == table_name)
    return dict(zip(table.column_names, row, strict=True))


def test_post_reply_quote_types_and_typed_columns() -> None:
    b = Batch()
    add_event(b, rec_event("app.bsky.feed.post", post(langs=["en"]), rkey="1"), OPTS)
    add_event(b, rec_event("app.bsky.feed.post", post(reply={"root": ref(B), "parent": ref(C, 2)}), rkey="2"), OPTS)
    add_event(b, rec_event("app.bsky.feed.post", post(embed={"$type": "app.bsky.embed.record", "record": ref(C, 3)}),
                           rkey="3"), OPTS)
    rows = {r[1]: named("posts", r) for r in b.upserts()["posts"]}
    assert rows["1"]["record_type"] == "post"
    assert rows["1"]["langs"] == ["en"]
    assert rows["1"]["text"] == "hi"
    assert rows["2"]["record_type"] == "reply"
    assert rows["2"]["reply_root_uri"] == f"at://{B}/app.bsky.feed.post/1"
    assert rows["2"]["reply_parent_uri"] == f"at://{C}/app.bsky.feed.post/2"
    assert rows["2"]["reply_parent_cid"] == CID
    assert rows["3"]["record_type"] == "quote"
    assert rows["3"]["quote_uri"] == f"at://{C}/app.bsky.feed.post/3"
    assert rows["3"]["embed_kind"] == "record"
    assert rows["1"]["created_at"] == datetime(2024, 5, 2, 3, 4, 5, 678000, tzinfo=UTC)
    # every row keeps the lossless record, rev, CID and source cursor
    assert orjson.loads(rows["2"]["record"])["reply"]["parent"] == ref(C, 2)
    assert rows["1"]["rev"] == "3kr0001"
    assert rows["1"]["cid"] == CID
    assert rows["1"]["cursor"] == 1
    # authors and referenced DIDs are actors
    assert b.actors == {A, B, C}


def test_reply_that_quotes_is_a_reply() -> None:
    rec = post(reply={"root": ref(B), "parent": ref(B)},
               embed={"$type": "app.bsky.embed.record", "record": ref(C)})
    assert post_type(rec, record_datum(rec_event("app.bsky.feed.post", rec))) == "reply"


def test_subject_collections_and_generic_records() -> None:
    b = Batch()
    like = {"$type": "app.bsky.feed.like", "subject": ref(B), "createdAt": "2024-01-01T00:00:00Z"}
    follow = {"$type": "app.bsky.graph.follow", "subject": C, "createdAt": "2024-01-01T00:00:00Z"}
    handle_like = {"$type": "app.bsky.feed.repost", "subject": {"uri": "at://alice.test/app.bsky.feed.post/1",
                                                                 "cid": CID}, "createdAt": "x"}
    other = {"$type": "app.bsky.graph.listitem", "subject": B, "list": "at://x/y/z"}
    add_event(b, rec_event("app.bsky.feed.like", like), OPTS)
    add_event(b, rec_event("app.bsky.graph.follow", follow), OPTS)
    add_event(b, rec_event("app.bsky.feed.repost", handle_like), OPTS)
    add_event(b, rec_event("app.bsky.graph.listitem", other), OPTS)
    assert named("likes", only_row(b, "likes"))["subject_did"] == B
    assert named("follows", only_row(b, "follows"))["subject_did"] == C
    assert named("reposts", only_row(b, "reposts"))["subject_did"] is None  # a handle authority, not a DID
    generic = named("records", only_row(b, "records"))
    assert generic["collection"] == "app.bsky.graph.listitem"
    assert orjson.loads(generic["record"]) == other
    assert generic["created_at"] is None
    assert b.actors == {A, B, C}


def test_newest_revision_wins_within_a_batch_in_any_order() -> None:
    older = rec_event("app.bsky.feed.post", post("old"), rev="3kr0001", cursor=1)
    newer = rec_event("app.bsky.feed.post", post("new"), rev="3kr0002", cursor=2, op="update")
    delete = rec_event("app.bsky.feed.post", None, rev="3kr0003", op="delete", cursor=3)
    for order in ([older, newer], [newer, older], [newer, older, newer]):
        b = Batch()
        for e in order:
            add_event(b, e, OPTS)
        assert named("posts", only_row(b, "posts"))["text"] == "new"
        assert b.superseded == len(order) - 1
    b = Batch()
    for e in (delete, newer, older):
        add_event(b, e, OPTS)
    assert b.upserts() == {}
    assert b.deletes() == [(A, "app.bsky.feed.post", "3kaaa", "3kr0003", "jetstream", 3, 3, "j")]
    assert b.delete_tables() == {"posts"}


def test_same_rkey_in_different_collections_are_different_keys() -> None:
    b = Batch()
    add_event(b, rec_event("app.bsky.feed.post", post()), OPTS)
    add_event(b, rec_event("app.bsky.graph.listitem", {"$type": "app.bsky.graph.listitem"}), OPTS)
    add_event(b, rec_event("fyi.unravel.frontpage.post", {"x": 1}), OPTS)
    assert len(b.upserts()["posts"]) == 1
    assert len(b.upserts()["records"]) == 2


def test_datum_fields_are_used_as_the_contract() -> None:
    event = rec_event("app.bsky.feed.post", post("from record"))
    datum = record_datum(event, '{"text":"verbatim"}')
    datum["text"] = "from datum"
    b = Batch()
    add_event(b, event, OPTS, datum, "app.bsky.feed.post")
    row = named("posts", only_row(b, "posts"))
    assert row["text"] == "from datum"
    assert row["record"] == '{"text":"verbatim"}'
    # a datum of another schema (generic) is not trusted for typed fields
    b = Batch()
    add_event(b, event, OPTS, {"record_json": '{"a":1}'}, "generic")
    assert named("posts", only_row(b, "posts"))["text"] == "from record"


@pytest.mark.parametrize(("policy", "created", "outcome", "expected"), [
    (TimestampPolicy(), "2024-05-02T03:04:05Z", Outcome.IN_RANGE, datetime(2024, 5, 2, 3, 4, 5, tzinfo=UTC)),
    (TimestampPolicy(), "garbage", Outcome.KEPT, None),
    (TimestampPolicy(start=datetime(2024, 6, 1, tzinfo=UTC)), "2024-05-20T03:04:05Z", Outcome.KEPT,
     datetime(2024, 5, 20, 3, 4, 5, tzinfo=UTC)),
    (TimestampPolicy(start=datetime(2024, 6, 1, tzinfo=UTC), out_of_range=OutOfRange.STANDARDIZE),
     "2024-05-20T03:04:05Z", Outcome.STANDARDIZED, datetime(2024, 5, 15, tzinfo=UTC)),
    (TimestampPolicy(end=datetime(2024, 6, 1, tzinfo=UTC), out_of_range=OutOfRange.DROP),
     "2024-07-01T00:00:00Z", Outcome.DROPPED, None),
])
def test_created_at_policy(policy: TimestampPolicy, created: str, outcome: Outcome,
                           expected: datetime | None) -> None:
    b = Batch()
    like = {"$type": "app.bsky.feed.like", "subject": ref(B), "createdAt": created}
    got = add_event(b, rec_event("app.bsky.feed.like", like), TransformOptions(policy=policy))
    assert got is outcome
    assert b.outcomes == {outcome: 1}
    if outcome is Outcome.DROPPED:
        assert b.upserts() == {}
        assert not b.progress
    else:
        assert named("likes", only_row(b, "likes"))["created_at"] == expected


def test_generic_records_use_their_own_created_at() -> None:
    b = Batch()
    policy = TimestampPolicy(start=datetime(2024, 1, 1, tzinfo=UTC), out_of_range=OutOfRange.DROP)
    add_event(b, rec_event("app.bsky.graph.listitem", {"createdAt": "2023-01-01T00:00:00Z"}),
              TransformOptions(policy=policy))
    assert b.outcomes == {Outcome.DROPPED: 1}
    assert b.upserts() == {}


def test_nul_characters_are_dropped_not_stored() -> None:
    with pytest.raises(DropError) as err:
        add_event(Batch(), rec_event("app.bsky.feed.post", post("a\x00b")), OPTS)
    assert err.value.reason == "transform_failed"
    with pytest.raises(DropError):
        add_event(Batch(), rec_event("app.bsky.graph.listitem", {"k\x00": 1}), OPTS)
    with pytest.raises(DropError):
        add_event(Batch(), rec_event("app.bsky.feed.post", post(), rkey="a\x00"), OPTS)
    # an escaped backslash followed by "u0000" is ordinary text
    b = Batch()
    add_event(b, rec_event("app.bsky.feed.post", post("a\\u0000b")), OPTS)
    assert named("posts", only_row(b, "posts"))["text"] == "a\\u0000b"


def test_oversized_keys_and_records_without_body_are_dropped() -> None:
    with pytest.raises(DropError):
        add_event(Batch(), rec_event("app.bsky.feed.post", post(), rkey="k" * 513), OPTS)
    with pytest.raises(DropError):
        add_event(Batch(), rec_event("app.bsky.feed.post", post(), did="did:plc:" + "x" * 2048), OPTS)
    long_nsid = "com." + ".".join(["n" * 60] * 5)
    with pytest.raises(DropError):  # each part within its limit, the index key too long
        add_event(Batch(), rec_event(long_nsid, {}, did="did:web:" + "x" * 2000, rkey="k" * 500), OPTS)
    add_event(Batch(), rec_event(long_nsid, {}, did="did:web:" + "x" * 1500, rkey="k" * 500), OPTS)
    with pytest.raises(InvalidRecordError):
        add_event(Batch(), rec_event("app.bsky.feed.post", None, op="create"), OPTS)
    with pytest.raises(InvalidRecordError):  # not an object, even with a datum of its own schema
        add_event(Batch(), rec_event("app.bsky.feed.post", [1, 2]), OPTS, {"record_json": "[1,2]"},  # type: ignore[arg-type]
                  "app.bsky.feed.post")
    with pytest.raises(InvalidRecordError):
        add_event(Batch(), rec_event("app.bsky.graph.listitem", "text"), OPTS)  # type: ignore[arg-type]
    with pytest.raises(InvalidRecordError):  # a typed field of the wrong JSON type
        add_event(Batch(), rec_event("app.bsky.feed.post", post(text=5)), OPTS)


def test_identity_and_account_events() -> None:
    b = Batch()
    opts = TransformOptions(removal_statuses=frozenset({"deleted"}))
    add_event(b, IdentityEvent(did=A, handle="old.test", seq=1, time="t", source="jetstream", cursor=10,
                               time_us=10, job="j"), opts)
    add_event(b, IdentityEvent(did=A, handle="new.test", seq=2, time="t", source="jetstream", cursor=20,
                               time_us=20, job="j"), opts)
    add_event(b, IdentityEvent(did=A, handle="new.test", seq=2, time="t", source="jetstream", cursor=20,
                               time_us=20, job="j"), opts)  # replayed
    add_event(b, AccountEvent(did=B, active=False, status="deleted", seq=3, time="t", source="jetstream",
                              cursor=15, time_us=15, job="j"), opts)
    add_event(b, AccountEvent(did=C, active=False, status="takendown", seq=4, time="t", source="jetstream",
                              cursor=16, time_us=16, job="j"), opts)
    assert len(b.identities) == 2
    assert len(b.accounts) == 2
    assert b.actor_updates[A].handle == "new.test"
    assert b.actor_updates[A].handle_time_us == 20
    assert b.actor_updates[B].active is False
    assert b.actor_updates[B].status == "deleted"
    assert b.removals == {B: 15}  # takendown is not a removal status here
    assert b.progress == {}  # positions are noted per partition, by the sink (Batch.note_partition)


def test_progress_is_the_newest_cursor_per_job_and_partition() -> None:
    b = Batch()
    for cursor, job, part in ((5, "a", 0), (9, "a", 0), (7, "a", 0), (6, "a", 1), (3, "b", 0), (4, "", 0)):
        add_event(b, rec_event("app.bsky.feed.post", post(), rkey=str(cursor), cursor=cursor, job=job), OPTS)
        b.note_partition("t.posts", part)
    assert b.progress == {("a", "t.posts", 0): (9, 9), ("a", "t.posts", 1): (6, 6), ("b", "t.posts", 0): (3, 3),
                          ("jetstream", "t.posts", 0): (4, 4)}
    assert sorted(b.event_times) == [3, 4, 5, 6, 7, 9]


def test_helpers() -> None:
    assert uri_did(f"at://{A}/app.bsky.feed.post/1") == A
    assert uri_did("at://alice.test/app.bsky.feed.post/1") is None
    assert uri_did("https://x") is None
    assert uri_did(None) is None
    assert naive_utc(1_700_000_000_123_456) == datetime(2023, 11, 14, 22, 13, 20, 123456)
    assert POSTS.key == ("did", "rkey")
    assert RECORDS.key == ("did", "collection", "rkey")
    assert RECORDS.column_names[:3] == ("did", "collection", "rkey")


def test_job_positions_are_noted_per_partition_and_status_times_come_from_the_relay() -> None:
    b = Batch()
    opts = TransformOptions(removal_statuses=frozenset({"deleted"}))
    # Jetstream's time_us is its own receive clock; the relay's `time` orders status changes.
    late_clock = AccountEvent(did=A, active=False, status="deleted", seq=9, time="2024-01-01T00:00:02Z",
                              source="jetstream", cursor=10, time_us=10, job="j")
    add_event(b, late_clock, opts)
    b.note_partition("t.account", 0)
    early_clock = AccountEvent(did=A, active=True, status=None, seq=8, time="2024-01-01T00:00:01Z",
                               source="jetstream", cursor=99, time_us=99, job="j")
    add_event(b, early_clock, opts)
    b.note_partition("t.account", 1)
    assert b.actor_updates[A].active is False  # the relay's newer status wins, whatever time_us says
    assert b.actor_updates[A].status_time_us == 1_704_067_202_000_000
    assert b.removals == {A: 1_704_067_202_000_000}
    assert b.progress == {("j", "t.account", 0): (10, 10), ("j", "t.account", 1): (99, 99)}
    b.note_partition("t.account", 0)  # nothing added since: no change
    assert b.progress[("j", "t.account", 0)] == (10, 10)


def _sync(rev: str) -> SyncEvent:
    return SyncEvent("did:plc:s", rev, 77, "2026-01-01T00:00:00Z", "jetstream2", 9, 1_700_000_000_000_000, "j")


def test_a_sync_is_logged_and_with_resync_purge_is_a_removal_before_its_rev() -> None:
    rev = make_tid(1_750_000_000_000_000, 3)
    keep, purge = Batch(), Batch()
    add_event(keep, _sync(rev), TransformOptions())
    add_event(purge, _sync(rev), TransformOptions(resync_purge=True))
    row = ("did:plc:s", "jetstream2", 9, 1_700_000_000_000_000, 77, "2026-01-01T00:00:00Z", rev, "j")
    assert list(keep.syncs.values()) == list(purge.syncs.values()) == [row]
    assert keep.removals == {} and "did:plc:s" in keep.actors
    assert purge.removals == {"did:plc:s": 1_750_000_000_000_000 - 1}
    assert TransformOptions(resync_purge=True).purges and not TransformOptions().purges
    # two syncs of one DID in a batch: the newest rev's R
    add_event(purge, _sync(make_tid(1_760_000_000_000_000, 3)), TransformOptions(resync_purge=True))
    add_event(purge, _sync(make_tid(1_740_000_000_000_000, 3)), TransformOptions(resync_purge=True))
    assert purge.removals == {"did:plc:s": 1_760_000_000_000_000 - 1}


def test_a_sync_whose_rev_is_not_a_tid_is_logged_and_removes_nothing() -> None:
    batch = Batch()
    add_event(batch, _sync("not-a-tid"), TransformOptions(resync_purge=True))
    assert len(batch.syncs) == 1 and batch.removals == {}

"""The queue's fold (issue 17, item 2): items carry their fold metadata, the sink keeps the newest
version of every record and each DID's newest removal in the queue database (so a stale version
is never queued, whatever the order it arrives in), account events reach every type queue, the
sink's state is bounded, an old database is migrated, and the readers' fold gives the live records.

Each test feeds ``QueueSink`` directly with consumed events, on a real SQLite file."""

from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from consumers.base import Consumed
from consumers.options import removal_statuses
from consumers.queue import (
    RECORD_TYPES,
    STATE_TABLES,
    Queue,
    QueueFold,
    QueueSink,
    by_type_router,
)
from runtime.atproto.tid import make_tid
from runtime.commands.cli import build_parser
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent, SyncEvent, event_key
from runtime.errors import ConfigError
from runtime.process.metrics import Metrics
from tests.fold_history import relay_time

DID = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"
POST = "app.bsky.feed.post"
LIKE = "app.bsky.feed.like"
T0 = 1_700_000_000_000_000
PURGE = frozenset({"deleted", "takendown"})

#: The schema the queue database had before the fold (``seen`` without its sequence, offsets
#: without their origin): a file made by that version must open and keep working.
OLD_SCHEMA = """
CREATE TABLE queues (name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, payload TEXT NOT NULL,
    metadata TEXT, created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
CREATE INDEX items_queue_id ON items (queue, id);
CREATE TABLE seen (queue TEXT NOT NULL, key BLOB NOT NULL, PRIMARY KEY (queue, key)) WITHOUT ROWID;
CREATE TABLE kafka_offsets (group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL, PRIMARY KEY (group_id, topic, partition)) WITHOUT ROWID;
"""


def commit(op: str, at: int, *, rkey: str = "3kpost", collection: str = POST, did: str = DID,
           source: str = "firehose", reply: bool = False) -> RecordEvent:
    """A commit at true time ``at`` (its rev is the TID of ``at``)."""
    record: dict[str, Any] | None = None
    if op != "delete":
        record = {"$type": collection, "text": f"at {at}", "createdAt": relay_time(at)}
        if reply:
            parent = {"uri": f"at://{did}/{POST}/3kparent", "cid": "bafyparent"}
            record["reply"] = {"root": parent, "parent": parent}
    return RecordEvent(did, collection, rkey, op, make_tid(at, 1), None if record is None else f"bafy{at}",
                       record, source, at - T0, at)


def snapshot_row(head_at: int, fetched_at: int, *, rkey: str = "3kpost", collection: str = POST) -> RecordEvent:
    """A getRepo row of the repository at head rev ``head_at``, fetched at ``fetched_at``."""
    record = {"$type": collection, "text": "snapshot", "createdAt": relay_time(head_at)}
    return RecordEvent(DID, collection, rkey, "create", make_tid(head_at, 1), f"bafy{head_at}", record, "repo", 0,
                       fetched_at)


def account(at: int, status: str | None, *, did: str = DID, seq: int | None = None) -> AccountEvent:
    """An account event with the relay's time ``at`` (its receive time is later: never used)."""
    return AccountEvent(did, status is None, status, seq if seq is not None else at - T0, relay_time(at),
                        "jetstream", at - T0, at + 5_000_000)


class Feed:
    """A sink fed one batch at a time, each stored with its offsets."""

    def __init__(self, sink: QueueSink) -> None:
        self.sink = sink
        self.offset = 0

    def batch(self, *events: Event, topic: str = "t") -> int:
        for e in events:
            self.sink.add(Consumed(topic, 0, self.offset, "x", e, 0))
            self.offset += 1
        return self.sink.flush("g", {(topic, 0): self.offset})


def items(path: Path, queue: str = "q") -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    q = Queue(queue, path=path)
    try:
        return [(i.payload, i.metadata) for i in q.peek(10_000)]
    finally:
        q.close()


def fold(path: Path, queue: str = "q") -> QueueFold:
    q = Queue(queue, path=path)
    try:
        return q.fold()
    finally:
        q.close()


def ops(path: Path, queue: str = "q") -> list[str]:
    return [p["commit"]["operation"] if p["kind"] == "commit" else p["kind"] for p, _ in items(path, queue)]


def skipped(metrics: Metrics, reason: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value(
        "atproto_backfill_consumer_messages_skipped_total", {"sink": "queue", "reason": reason})
    return value


def test_a_delete_arriving_before_an_older_create_drops_the_create(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    metrics = Metrics(registry=CollectorRegistry())
    sink = QueueSink("q", path, metrics=metrics)
    try:
        feed = Feed(sink)
        assert feed.batch(commit("delete", T0 + 2_000_000)) == 1
        # the create (an older rev) arrives later: a replayed job, or another topic's replica
        assert feed.batch(commit("create", T0 + 1_000_000)) == 0
        assert feed.batch(commit("update", T0 + 1_500_000)) == 0
    finally:
        sink.close()
    assert ops(path) == ["delete"]
    assert skipped(metrics, "stale_rev") == 2
    assert fold(path).live() == {}


def test_a_delete_in_the_same_batch_as_an_older_create_after_it_drops_the_create(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    sink = QueueSink("q", path)
    try:
        Feed(sink).batch(commit("delete", T0 + 2_000_000), commit("create", T0 + 1_000_000),
                         commit("create", T0 + 3_000_000))  # created again after the delete: a new version
    finally:
        sink.close()
    assert ops(path) == ["delete", "create"]
    assert set(fold(path).live()) == {(DID, POST, "3kpost")}


def test_an_account_deletion_before_an_older_create_drops_it_with_purge(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    removed = T0 + 10_000_000
    sink = QueueSink("q", path, removal_statuses=PURGE)
    try:
        feed = Feed(sink)
        feed.batch(account(removed, "deleted"), topic="account")
        # older than the removal, from the post and like topics: not queued
        assert feed.batch(commit("create", T0 + 1_000_000)) == 0
        assert feed.batch(commit("create", T0 + 2_000_000, rkey="3klike", collection=LIKE), topic="like") == 0
        # written after the removal (the account came back): queued
        feed.batch(account(removed + 1_000_000, None), topic="account")
        assert feed.batch(commit("create", removed + 2_000_000, rkey="3knew")) == 1
        assert sink.skipped == {"filtered": 2}
    finally:
        sink.close()
    assert ops(path) == ["account", "account", "create"]
    meta = items(path)[0][1]
    assert meta is not None
    assert meta["removal"] is True
    assert meta["status_us"] == removed
    got = fold(path)
    assert set(got.live()) == {(DID, POST, "3knew")}
    assert got.accounts[DID].payload["account"]["active"] is True


def test_an_account_deletion_after_a_create_removes_it_in_the_readers_fold(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    sink = QueueSink("q", path, removal_statuses=PURGE)
    try:
        feed = Feed(sink)
        feed.batch(commit("create", T0 + 1_000_000))  # queued: the removal is not known yet
        feed.batch(account(T0 + 2_000_000, "takendown"), topic="account")
    finally:
        sink.close()
    assert ops(path) == ["create", "account"]
    assert fold(path).live() == {}


def sync(at: int) -> SyncEvent:
    """A repository replaced at true time ``at`` (its rev is the TID of ``at``), as Jetstream v2 archives it."""
    return SyncEvent(DID, make_tid(at, 1), at - T0, relay_time(at), "jetstream2", at - T0, at)


def test_a_sync_drops_older_versions_in_any_order_and_keeps_its_replacement_rows(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    at = T0 + 10_000_000
    sink = QueueSink("q", path, resync_purge=True)
    try:
        feed = Feed(sink)
        assert feed.batch(commit("create", T0 + 1_000_000, rkey="3kold")) == 1  # before the sync is known
        feed.batch(sync(at), topic="sync")
        # an older version arriving after the sync (another topic, a lagging replica): not queued
        assert feed.batch(commit("create", T0 + 2_000_000, rkey="3klike", collection=LIKE), topic="like") == 0
        # the replacement row at the sync's rev, and a later commit: queued
        replacement = replace(commit("create", at, rkey="3kkept"), source="jetstream2")
        assert feed.batch(replacement, commit("create", at + 1_000_000, rkey="3knew")) == 2
        assert sink.skipped == {"filtered": 1}
    finally:
        sink.close()
    assert ops(path) == ["create", "sync", "create", "create"]
    payload, meta = items(path)[1]
    assert payload == {"did": DID, "time_us": at, "kind": "sync",
                       "sync": {"did": DID, "rev": make_tid(at, 1), "seq": at - T0, "time": relay_time(at)}}
    assert meta is not None and meta["op"] == "sync" and meta["removal"] is True
    assert meta["removal_us"] == at - 1
    # the reader's fold: the create queued before the sync is gone too
    assert set(fold(path).live()) == {(DID, POST, "3kkept"), (DID, POST, "3knew")}


def test_resync_keep_queues_the_sync_and_removes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    sink = QueueSink("q", path)
    try:
        feed = Feed(sink)
        feed.batch(sync(T0 + 10_000_000), topic="sync")
        assert feed.batch(commit("create", T0 + 1_000_000)) == 1
    finally:
        sink.close()
    meta = items(path)[0][1]
    assert meta is not None and meta["removal"] is False
    assert set(fold(path).live()) == {(DID, POST, "3kpost")}


def test_a_sync_whose_rev_is_not_a_tid_removes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    sink = QueueSink("q", path, resync_purge=True)
    try:
        feed = Feed(sink)
        feed.batch(replace(sync(T0 + 10_000_000), rev="not-a-tid"), topic="sync")
        assert feed.batch(commit("create", T0 + 1_000_000)) == 1
    finally:
        sink.close()
    meta = items(path)[0][1]
    assert meta is not None and meta["removal"] is False and meta["removal_us"] is None


def test_keep_queues_every_version_whatever_the_account_status(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    sink = QueueSink("q", path)
    try:
        feed = Feed(sink)
        feed.batch(account(T0 + 2_000_000, "deleted"), topic="account")
        assert feed.batch(commit("create", T0 + 1_000_000)) == 1
    finally:
        sink.close()
    assert items(path)[0][1] == {"op": "account", "status_us": T0 + 2_000_000, "seq": 2_000_000, "removal": False,
                                 "source": "jetstream", "cursor": 2_000_000}
    assert set(fold(path).live()) == {(DID, POST, "3kpost")}


def test_a_snapshot_row_after_a_newer_delete_in_the_same_stream_is_not_queued(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    sink = QueueSink("q", path)
    head, fetched, deleted = T0 + 1_000_000, T0 + 1_500_000, T0 + 3_000_000
    try:
        feed = Feed(sink)
        feed.batch(commit("create", head))
        feed.batch(commit("delete", deleted))
        # the repository job's row of a getRepo taken before the delete (head rev older than it)
        assert feed.batch(snapshot_row(head, fetched)) == 0
        assert sink.skipped == {"stale_rev": 1}
    finally:
        sink.close()
    assert ops(path) == ["create", "delete"]
    assert fold(path).live() == {}


def test_a_snapshot_after_a_reversed_takedown_brings_back_the_head_commits_record(tmp_path: Path) -> None:
    """The commit at the head rev and the snapshot row at that rev are one version: the later as-of
    time (the fetch, after the reversal) wins in either order, so the record is live after all."""
    head, removed, back, fetched = T0 + 1_000_000, T0 + 2_000_000, T0 + 3_000_000, T0 + 4_000_000
    for order in ("commit first", "snapshot first"):
        path = tmp_path / f"{order}.sqlite"
        sink = QueueSink("q", path, removal_statuses=PURGE)
        try:
            feed = Feed(sink)
            feed.batch(account(removed, "takendown"), account(back, None), topic="account")
            rows = [commit("create", head), snapshot_row(head, fetched)]
            for row in rows if order == "commit first" else rows[::-1]:
                feed.batch(row)
        finally:
            sink.close()
        assert ops(path) == ["account", "account", "create"], order
        live = fold(path).live()
        assert set(live) == {(DID, POST, "3kpost")}, order
        assert live[(DID, POST, "3kpost")]["time_us"] == fetched, order


def test_the_readers_fold_keeps_the_later_asof_of_one_version_in_either_order() -> None:
    head, removed, fetched = T0 + 1_000_000, T0 + 2_000_000, T0 + 3_000_000
    rev = make_tid(head, 1)
    payload = {"did": DID, "kind": "commit", "time_us": head,
               "commit": {"collection": POST, "rkey": "r", "operation": "create", "rev": rev, "cid": "c"}}
    removal = {"did": DID, "kind": "account", "time_us": removed,
               "account": {"did": DID, "active": False, "status": "deleted", "seq": 1, "time": relay_time(removed)}}
    as_commit = {"op": "create", "rev": rev, "asof_us": head, "source": "firehose", "cursor": 1}
    as_row = {"op": "create", "rev": rev, "asof_us": fetched, "source": "repo", "cursor": 0}
    removal_meta = {"op": "account", "status_us": removed, "seq": 1, "removal": True, "source": "firehose",
                    "cursor": 2}
    for metas in ((as_commit, as_row), (as_row, as_commit)):
        reader = QueueFold()
        reader.apply_payload(removal, removal_meta)
        for meta in metas:
            reader.apply_payload(payload, meta)
        assert reader.is_live((DID, POST, "r"))
        assert reader.versions[(DID, POST, "r")].asof_us == fetched


def test_split_by_type_sends_account_events_to_every_queue_and_post_deletes_to_post_and_reply(
        tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    sink = QueueSink("s", path, route=by_type_router("s"), removal_statuses=PURGE)
    try:
        feed = Feed(sink)
        feed.batch(commit("create", T0 + 1_000_000, reply=True), commit("create", T0 + 1_100_000, rkey="3klike",
                                                                       collection=LIKE))
        feed.batch(commit("delete", T0 + 1_500_000))  # a reply's delete: no record says it was one
        feed.batch(account(T0 + 2_000_000, "deleted"), topic="account")
        feed.batch(IdentityEvent(DID, "me.test", 9, relay_time(T0), "jetstream", 9, T0), topic="identity")
    finally:
        sink.close()
    for queue in ["s", *(f"s_{kind}" for kind in RECORD_TYPES)]:
        assert "account" in ops(path, queue), queue
        got = fold(path, queue)  # each queue folds alone: the removal is in every one
        assert got.removals == {DID: T0 + 2_000_000}, queue
        assert got.live() == {}, queue
    assert ops(path, "s_reply") == ["create", "delete", "account"]
    assert ops(path, "s_post") == ["delete", "account"]
    assert ops(path, "s_like") == ["create", "account"]
    assert ops(path, "s") == ["account", "identity"]


def test_seen_and_fold_state_stay_within_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    cap = 100
    sink = QueueSink("q", path, removal_statuses=PURGE, state_max=cap)
    events: list[Event] = []
    for i in range(1000):
        did = f"did:plc:{i:024d}"
        events.append(commit("create", T0 + 1_000_000 + i, rkey=f"r{i}", did=did))
        events.append(account(T0 + 5_000_000 + i, "deleted", did=did))
    try:
        feed = Feed(sink)
        with closing(sqlite3.connect(path)) as conn:
            for start in range(0, len(events), 50):
                feed.batch(*events[start:start + 50])
                for table in STATE_TABLES:
                    assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] <= cap, table
            assert conn.execute("SELECT count(*) FROM seen").fetchone()[0] == cap
            assert conn.execute("SELECT count(*) FROM fold_versions").fetchone()[0] == cap
            assert conn.execute("SELECT count(*) FROM fold_removals").fetchone()[0] == cap
        assert sink.stored == len(events)
        # A forgotten record's create delivered again is queued again; a remembered one is not.
        assert feed.batch(events[0]) == 1
        assert feed.batch(events[-2]) == 0
        stored = sink.load_offsets("g", [("t", 0)])[("t", 0)].offset
    finally:
        sink.close()
    assert stored == len(events) + 2  # exactly once of the offsets is unaffected
    # the reader's fold drops what the sink forgot: every DID was removed after its create
    assert fold(path).live() == {}


def test_a_database_made_by_the_old_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    old = [commit("create", T0 + i * 1_000_000, rkey=f"r{i}") for i in range(5)]
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO queues (name) VALUES ('q')")
        for e in old:
            conn.execute("INSERT INTO seen (queue, key) VALUES ('q', ?)",
                         (hashlib.blake2b(event_key(e).encode(), digest_size=16).digest(),))
            conn.execute("INSERT INTO items (queue, payload) VALUES ('q', ?)", (f'{{"n": "{e.rkey}"}}',))
        conn.execute("INSERT INTO kafka_offsets VALUES ('g', 't', 0, 5)")
        conn.commit()
    sink = QueueSink("q", path)
    try:
        assert sink.load_offsets("g", [("t", 0)])[("t", 0)].offset == 5
        feed = Feed(sink)
        feed.offset = 5
        # the old keys still de-duplicate: a re-delivery of an event stored by the old version is no item
        assert feed.batch(*old) == 0
        assert feed.batch(commit("create", T0 + 9_000_000, rkey="new")) == 1
    finally:
        sink.close()
    with closing(sqlite3.connect(path)) as conn:
        numbers = [row[0] for row in conn.execute("SELECT n FROM seen ORDER BY n")]
        assert numbers == list(range(1, 7))  # the old keys numbered first, then the new one
        assert {row[1] for row in conn.execute("PRAGMA table_info(kafka_offsets)")} >= {"cluster_id", "topic_id"}
    # and the old keys are the first pruned once bounded
    sink = QueueSink("q", path, state_max=2)
    try:
        Feed(sink).batch(commit("create", T0 + 10_000_000, rkey="newer"))
    finally:
        sink.close()
    with closing(sqlite3.connect(path)) as conn:
        assert [row[0] for row in conn.execute("SELECT n FROM seen ORDER BY n")] == [6, 7]
    assert len(items(path)) == 7


def test_every_item_carries_its_fold_metadata(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    sink = QueueSink("q", path, removal_statuses=PURGE)
    created = commit("create", T0 + 1_000_000)
    try:
        Feed(sink).batch(created, snapshot_row(T0 + 1_000_000, T0 + 2_000_000, rkey="other"),
                         account(T0 + 3_000_000, "deactivated"),
                         IdentityEvent(DID, "me.test", 7, relay_time(T0 + 4_000_000), "firehose", 7, T0 + 4_500_000))
    finally:
        sink.close()
    assert [m for _, m in items(path)] == [
        {"op": "create", "rev": created.rev, "asof_us": T0 + 1_000_000, "source": "firehose", "cursor": 1_000_000},
        {"op": "create", "rev": created.rev, "asof_us": T0 + 2_000_000, "source": "repo", "cursor": 0},
        {"op": "account", "status_us": T0 + 3_000_000, "seq": 3_000_000, "removal": False, "source": "jetstream",
         "cursor": 3_000_000},
        {"op": "identity", "status_us": T0 + 4_000_000, "seq": 7, "source": "firehose", "cursor": 7},
    ]


def test_the_readers_fold_of_items_without_metadata_uses_their_payload(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    queue = Queue("seed", create_new_queue=True, path=path)
    rev1, rev2 = make_tid(T0 + 1_000_000, 1), make_tid(T0 + 2_000_000, 1)
    try:
        queue.batch_add_items_to_queue([
            {"did": DID, "time_us": T0, "kind": "commit",
             "commit": {"rev": rev2, "operation": "delete", "collection": POST, "rkey": "a"}},
            {"did": DID, "time_us": T0, "kind": "commit",
             "commit": {"rev": rev1, "operation": "create", "collection": POST, "rkey": "a", "record": {}, "cid": "x"}},
            {"did": DID, "time_us": T0, "kind": "commit",
             "commit": {"rev": rev1, "operation": "create", "collection": POST, "rkey": "b", "record": {}, "cid": "y"}},
            {"not": "an event"},
        ])
        reader = queue.fold(remove=True, batch=2)
        assert queue.get_queue_length() == 0
    finally:
        queue.close()
    assert set(reader.live()) == {(DID, POST, "b")}


def test_the_queue_options() -> None:
    parser = build_parser()
    ns = parser.parse_args(["consume", "queue"])
    assert (ns.account_removal, ns.removal_statuses, ns.queue_state_max) == ("keep", "deleted,takendown", 2_000_000)
    assert removal_statuses(ns) == frozenset()
    ns = parser.parse_args(["consume", "queue", "--account-removal", "purge", "--removal-statuses", "deleted",
                            "--queue-state-max", "50"])
    assert removal_statuses(ns) == frozenset({"deleted"})
    assert ns.queue_state_max == 50
    ns = parser.parse_args(["consume", "queue", "--account-removal", "purge", "--removal-statuses", " "])
    with pytest.raises(ConfigError, match="removal-statuses"):
        removal_statuses(ns)

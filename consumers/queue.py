"""The durable queue sink and the seeds' queue API (``Queue``), on one SQLite file.

Every queue is a named FIFO of JSON payloads (the Jetstream-shaped event) in one SQLite database
(``BACKFILL_QUEUE_PATH``; default ``$XDG_DATA_HOME/atproto-backfill/queues.sqlite``), so a batch
for several queues, its de-duplication keys, the fold state and the consumer group's next offsets
commit in one transaction: exactly once, even when the broker re-delivers.

The fold (:mod:`runtime.contract.order`): the topics are per collection, so one DID's record changes,
account events and identity changes reach the sink in any relative order, through any replica.
Every item's ``metadata`` carries what a reader needs to fold it (:func:`fold_metadata`):

* a record version: ``{"op": "create"|"update"|"delete", "rev", "asof_us", "source", "cursor"}``;
* an account event: ``{"op": "account", "status_us", "seq", "removal", "source", "cursor"}``;
* an identity event: ``{"op": "identity", "status_us", "seq", "source", "cursor"}``;
* a repository replacement (Jetstream v2 ``#sync``): ``{"op": "sync", "rev", "removal_us", "seq",
  "removal", "source", "cursor"}``: ``removal_us`` is rule 5's R (null when the rev is not a usable
  TID), and ``removal`` is true under ``--resync purge`` (the default) when R is known.

``source`` is the event's (``jetstream``, ``jetstream2``, ``firehose``, ``repo``) and ``cursor`` its
source's own position (for ``jetstream2`` the serving instance's ``seq``, not a time): kept for
readers, never folded on. Jetstream v2's ``witnessed_at``/``indexed_at`` are not queued (the payload
is the v1 shape); a jetstream2 event and the same event from Jetstream v1 have one de-duplication key
(:func:`~runtime.contract.records.event_key`), so a queue holds it once.

The sink folds as well, in the same database and transaction as the items and offsets: per record
(did, collection, rkey) the newest version seen (``fold_versions``: rev, delete, as-of time) and,
with ``--account-removal purge`` or ``--resync purge``, per DID the newest removal time R
(``fold_removals``: an account removal's status time, a sync's R).
A record version that does not supersede the stored one (:func:`runtime.contract.order.supersedes`) is not
queued (``consumer_messages_skipped{reason="stale_rev"}``, or ``duplicate`` for the same version),
so a delete or a newer version that arrived first drops an older one arriving later; a version
whose as-of time is <= R is not queued (``reason="filtered"``). Account, identity and sync events
are always queued (a reader needs them), and with ``--split-by-type`` every account event reaches the
base queue and every type queue, so each queue folds alone. A post delete carries no record, so it
reaches both ``<queue>_post`` and ``<queue>_reply``.

The reader's rule (:class:`QueueFold`, :meth:`Queue.fold`): apply the items of a queue in order,
keeping per record the version that supersedes the others and per DID the newest removal time R;
a record is live when its kept version is not a delete and, when R is set, its ``asof_us`` > R.
The reader's fold gives the same live records whatever order the items were queued in, and whether
or not the sink dropped the stale ones (under :mod:`runtime.contract.order`'s one assumption, one clock).
While the sink forgets nothing, each queue also holds every record's versions in increasing order,
none as of a removal queued before it: a reader applying items as they come only has to apply
each removal to the records queued before it.

Bounded state (``--queue-state-max``, default 2,000,000): ``seen`` (the de-duplication keys),
``fold_versions`` and ``fold_removals`` each keep at most that many keys, the oldest inserted ones
pruned first inside the batch's transaction. At the bound, a re-delivered or stale event whose key
was forgotten reaches the queue again, and the reader's fold drops it (the reader keeps the newer
version or removal that made it stale); exactly once of the stored offsets is unaffected (they are
stored with the batch, never pruned). A reader keeps its own fold state for as long as it reads.

A full disk (``SQLITE_FULL``) stops the consumer loudly with :class:`QueueFullError`: the batch's
transaction is rolled back whole (SQLite rolls it back itself; nothing of it, items or offsets, is
kept), the command exits with status 1 and one line naming the file, and a restart once there is
room resumes after the last stored batch.

Seed API::

    from consumers.queue import Queue, QueueFold
    queue = Queue(queue_name="jetstream_sync", create_new_queue=False)
    items = queue.batch_remove_items_from_queue(limit=100)
    for item in items:
        print(item.payload)
    fold = QueueFold()          # the reader's rule, kept across batches
    fold.apply_all(items)
    fold.live()                 # {(did, collection, rkey): payload} of the live records
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from consumers.base import TP, Consumed, ConsumerOptions, GroupConsumer, group_name
from consumers.cli import add_consumer_arguments, consumer_settings, run_consumer
from consumers.options import account_removal_options, removal_statuses, resync_purge
from runtime.contract.codec import AvroCodec
from runtime.contract.keyhash import key_digest
from runtime.contract.order import asof_us, is_delete, removes, status_time_us, supersedes, sync_removal_us
from runtime.contract.records import (
    AccountEvent,
    Event,
    IdentityEvent,
    RecordEvent,
    SyncEvent,
    event_key,
    to_jetstream_json,
)
from runtime.errors import BackfillError, CommitError, ConfigError, SinkUnavailableError
from runtime.kafka.offsets import UNKNOWN, Origin, StoredOffset
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from runtime.process.options import Opt, add_options

log = logging.getLogger(__name__)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    payload TEXT NOT NULL,
    metadata TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS items_queue_id ON items (queue, id);
CREATE TABLE IF NOT EXISTS seen (
    queue TEXT NOT NULL,
    key BLOB NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (queue, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kafka_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    cluster_id TEXT,
    topic_id TEXT,
    PRIMARY KEY (group_id, topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fold_versions (
    key BLOB PRIMARY KEY,
    rev TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    asof_us INTEGER NOT NULL,
    n INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS fold_versions_n ON fold_versions (n);
CREATE TABLE IF NOT EXISTS fold_removals (
    did TEXT PRIMARY KEY,
    removed_us INTEGER NOT NULL,
    n INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS fold_removals_n ON fold_removals (n);
"""

#: The bounded tables (every one has the insertion sequence ``n``, unique, pruned oldest first).
STATE_TABLES: Final = ("seen", "fold_versions", "fold_removals")
#: ``--queue-state-max``: keys kept in each of :data:`STATE_TABLES`.
DEFAULT_STATE_MAX: Final = 2_000_000

#: Seed 002's record types, for type-specific queues.
RECORD_TYPES: Final = ("post", "reply", "like", "follow", "repost", "block")

#: A record's identity in a fold: (did, collection, rkey).
RecordKey = tuple[str, str, str]


class QueueNotFoundError(BackfillError, LookupError):
    """``Queue(..., create_new_queue=False)`` named a queue that does not exist."""


class QueueFullError(CommitError):
    """The disk under the queue's SQLite file is full: a batch was not stored (nor its offsets).

    An operational condition, not a bug: the message names the file and says what to do, so the
    command logs it in one line, without a traceback.
    """


def _primary_code(e: sqlite3.Error) -> int | None:
    code = getattr(e, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def disk_full(e: sqlite3.Error) -> bool:
    """True for ``SQLITE_FULL`` ("database or disk is full")."""
    return _primary_code(e) == sqlite3.SQLITE_FULL or "database or disk is full" in str(e)


def _busy(e: sqlite3.Error) -> bool:
    return _primary_code(e) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(e) or "busy" in str(e)


def write_failure(path: Path, what: str, e: sqlite3.Error) -> BackfillError:
    """The project error for a failed write of ``what`` into the queue database at ``path``.

    Busy or locked: :class:`SinkUnavailableError` (retried). A full disk: :class:`QueueFullError`.
    Anything else: :class:`CommitError`.
    """
    if disk_full(e):
        return QueueFullError(f"the disk under the queue database {path} is full ({e}): {what} was not stored; "
                              f"free some space and start again, it resumes after the last stored batch")
    if _busy(e):
        return SinkUnavailableError(f"queue database {path} busy: {e}")
    return CommitError(f"queue database {path}: {what} failed: {e}")


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any.

    SQLite ends a transaction itself on some errors (``SQLITE_FULL`` among them): a ROLLBACK then
    would fail and hide the error that ended it.

    Raises:
        CommitError: the rollback itself failed (the connection cannot be trusted any more).
    """
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        raise CommitError(f"queue database: rollback failed: {e}") from e


def default_queue_path() -> Path:
    """``BACKFILL_QUEUE_PATH`` or ``$XDG_DATA_HOME/atproto-backfill/queues.sqlite``."""
    env = os.environ.get("BACKFILL_QUEUE_PATH")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "atproto-backfill" / "queues.sqlite"


def _outdated(conn: sqlite3.Connection) -> bool:
    """True when the database was made by an earlier version of this module (see :func:`_migrate`)."""
    offsets = {row[1] for row in conn.execute("PRAGMA table_info(kafka_offsets)")}
    seen = {row[1] for row in conn.execute("PRAGMA table_info(seen)")}
    index = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'seen_n'").fetchone()
    return not {"cluster_id", "topic_id"} <= offsets or "n" not in seen or index is None


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database made by an earlier version up to date, in one transaction.

    Offsets stored before they carried their origin get the two origin columns; de-duplication
    keys stored before the state was bounded get their insertion sequence (numbered in no
    particular order, all before every later key, so they are the first pruned). Several processes
    may open the file at once: the checks are made again under the write lock.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(kafka_offsets)")}
        for column in ("cluster_id", "topic_id"):
            if column not in columns:
                conn.execute(f"ALTER TABLE kafka_offsets ADD COLUMN {column} TEXT")
        if "n" not in {row[1] for row in conn.execute("PRAGMA table_info(seen)")}:
            conn.execute("CREATE TABLE seen_numbered (queue TEXT NOT NULL, key BLOB NOT NULL, n INTEGER NOT NULL, "
                         "PRIMARY KEY (queue, key)) WITHOUT ROWID")
            conn.execute("INSERT INTO seen_numbered (queue, key, n) SELECT queue, key, row_number() OVER () FROM seen")
            conn.execute("DROP TABLE seen")
            conn.execute("ALTER TABLE seen_numbered RENAME TO seen")
        conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS seen_n ON seen (n)")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def connect(path: Path | str | None = None) -> sqlite3.Connection:
    """Open (creating or migrating if needed) the queue database in WAL mode."""
    p = Path(path) if path is not None else default_queue_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(p, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.executescript(_SCHEMA)
    if _outdated(conn):
        _migrate(conn)
    return conn


@dataclass(frozen=True)
class QueueItem:
    """One queued item; ``payload`` is the parsed JSON, ``metadata`` the fold metadata (module docstring)."""

    id: int
    payload: Any
    metadata: dict[str, Any] | None
    created_at: str


def _item(row: tuple[Any, ...]) -> QueueItem:
    return QueueItem(row[0], orjson.loads(row[1]), orjson.loads(row[2]) if row[2] else None, row[3])


# ------------------------------------------------------------------------------------ the fold

def fold_metadata(event: Event, removal_statuses: frozenset[str] = frozenset(),
                  resync_purge: bool = False) -> dict[str, Any]:
    """What a reader needs to fold ``event`` (the item's ``metadata``).

    ``removal``: the account event is a removal (:func:`runtime.contract.order.removes`) under a sink
    purging on ``removal_statuses`` (empty: ``--account-removal keep``, never a removal); the sync
    event is one under ``resync_purge`` (``--resync purge``) when its R is known.
    """
    if isinstance(event, RecordEvent):
        return {"op": event.operation, "rev": event.rev, "asof_us": asof_us(event), "source": event.source,
                "cursor": event.cursor}
    if isinstance(event, SyncEvent):
        when = sync_removal_us(event)
        return {"op": "sync", "rev": event.rev, "removal_us": when, "seq": event.seq,
                "removal": resync_purge and when is not None, "source": event.source, "cursor": event.cursor}
    if isinstance(event, AccountEvent):
        return {"op": "account", "status_us": status_time_us(event), "seq": event.seq,
                "removal": removes(event, removal_statuses), "source": event.source, "cursor": event.cursor}
    return {"op": "identity", "status_us": status_time_us(event), "seq": event.seq, "source": event.source,
            "cursor": event.cursor}


def _metadata_from_payload(payload: Any) -> dict[str, Any] | None:
    """The fold metadata of an item queued without it (by an earlier version, or by hand), rebuilt
    from its Jetstream-shaped payload: a commit's as-of time is its rev's, and no account event is
    a removal. None: the payload is not an event."""
    if not isinstance(payload, dict):
        return None
    kind = payload.get("kind")
    try:
        did = payload["did"]
        time_us = int(payload.get("time_us") or 0)
        if kind == "commit":
            c = payload["commit"]
            return fold_metadata(RecordEvent(did, c["collection"], c["rkey"], c["operation"], c.get("rev"),
                                             c.get("cid"), c.get("record"), "jetstream", 0, time_us))
        if kind == "account":
            a = payload["account"]
            return fold_metadata(AccountEvent(did, bool(a.get("active")), a.get("status"), a.get("seq"),
                                              a.get("time"), "jetstream", 0, time_us))
        if kind == "identity":
            i = payload["identity"]
            return fold_metadata(IdentityEvent(did, i.get("handle"), i.get("seq"), i.get("time"), "jetstream", 0,
                                               time_us))
        if kind == "sync":
            s = payload["sync"]
            return fold_metadata(SyncEvent(did, str(s["rev"]), s.get("seq"), s.get("time"), "jetstream", 0, time_us))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return None


@dataclass(frozen=True, slots=True)
class FoldedVersion:
    """The version of one record a fold keeps (a delete is a tombstone)."""

    rev: str
    deleted: bool
    asof_us: int
    payload: Any


@dataclass(frozen=True, slots=True)
class FoldedStatus:
    """The newest account (or identity) event of one DID, by status time then relay seq."""

    status_us: int
    seq: int
    payload: Any


@dataclass
class QueueFold:
    """The reader's rule (:mod:`runtime.contract.order`): items applied in queue order give the live records.

    Per record the version that supersedes every other is kept (newest rev, a delete winning a tie,
    then the later as-of time); per DID the newest removal's status time R. A record is live when
    its kept version is not a delete and its as-of time is > R (when the DID has one). Whatever
    order the items were queued in, and whether or not the sink already dropped the stale ones,
    the result is the same. State is in memory and grows with the distinct records and DIDs
    applied; keep one fold for as long as a queue is read (a fold started halfway through a queue
    knows nothing of the tombstones and removals before it).

    Attributes:
        versions: record key -> the kept version (tombstones included).
        removals: DID -> the newest removal's status time R (unix microseconds).
        accounts: DID -> the newest account event (its payload's ``account``: active, status).
        identities: DID -> the newest identity event (its payload's ``identity``: handle).
    """

    versions: dict[RecordKey, FoldedVersion] = field(default_factory=dict)
    removals: dict[str, int] = field(default_factory=dict)
    accounts: dict[str, FoldedStatus] = field(default_factory=dict)
    identities: dict[str, FoldedStatus] = field(default_factory=dict)

    def apply(self, item: QueueItem) -> bool:
        """Apply one item; True when it changed the state (False: superseded, a duplicate, not an event)."""
        return self.apply_payload(item.payload, item.metadata)

    def apply_all(self, items: Iterable[QueueItem]) -> int:
        """Apply ``items`` in order; return how many changed the state."""
        return sum(self.apply_payload(i.payload, i.metadata) for i in items)

    def apply_payload(self, payload: Any, metadata: Mapping[str, Any] | None) -> bool:
        """Apply one item given as its payload and metadata (see :meth:`apply`).

        An item without fold metadata is folded from its payload alone (a commit's as-of time is
        its rev's; no account event is a removal).
        """
        meta = metadata if metadata is not None and "op" in metadata else _metadata_from_payload(payload)
        if meta is None:
            return False
        try:
            did: str = payload["did"]
            op = meta["op"]
            if op in ("account", "identity"):
                status = FoldedStatus(int(meta["status_us"]), -1 if meta.get("seq") is None else int(meta["seq"]),
                                      payload)
                table = self.accounts if op == "account" else self.identities
                old = table.get(did)
                changed = old is None or (status.status_us, status.seq) > (old.status_us, old.seq)
                if changed:
                    table[did] = status
                if meta.get("removal"):
                    changed = self._raise(did, status.status_us) or changed
                return changed
            if op == "sync":
                when = meta.get("removal_us")
                return bool(meta.get("removal")) and when is not None and self._raise(did, int(when))
            commit = payload["commit"]
            key = (did, commit["collection"], commit["rkey"])
            version = FoldedVersion(meta.get("rev") or "", op == "delete", int(meta["asof_us"]), payload)
        except (KeyError, TypeError, ValueError):
            return False
        kept = self.versions.get(key)
        if kept is not None and not supersedes(version.rev, version.deleted, version.asof_us,
                                               kept.rev, kept.deleted, kept.asof_us):
            return False
        self.versions[key] = version
        return True

    def _raise(self, did: str, when: int) -> bool:
        removed = self.removals.get(did)
        if removed is None or when > removed:
            self.removals[did] = when
            return True
        return False

    def is_live(self, key: RecordKey) -> bool:
        """True when the record ``key`` (did, collection, rkey) is live."""
        kept = self.versions.get(key)
        if kept is None or kept.deleted:
            return False
        removed = self.removals.get(key[0])
        return removed is None or kept.asof_us > removed

    def live(self) -> dict[RecordKey, Any]:
        """The live records: (did, collection, rkey) -> the payload of the kept version."""
        return {key: v.payload for key, v in self.versions.items() if self.is_live(key)}


class Queue:
    """A named durable FIFO (the seeds' ``lib.db.queue.Queue``).

    Args:
        queue_name: the queue.
        create_new_queue: create it if absent; when False a missing queue raises QueueNotFoundError.
        path: the SQLite file (default :func:`default_queue_path`).
    """

    def __init__(self, queue_name: str, create_new_queue: bool = False, *, path: Path | str | None = None) -> None:
        self.queue_name = queue_name
        self.path = Path(path) if path is not None else default_queue_path()
        self._lock = threading.Lock()
        self._conn = connect(self.path)
        exists = self._conn.execute("SELECT 1 FROM queues WHERE name = ?", (queue_name,)).fetchone()
        if not exists:
            if not create_new_queue:
                self._conn.close()
                raise QueueNotFoundError(f"no queue {queue_name!r} in {self.path}")
            self._conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue_name,))

    def batch_add_items_to_queue(self, items: Iterable[Any], metadata: dict[str, Any] | None = None,
                                 batch_size: int | None = None) -> int:
        """Append ``items`` (JSON-serialisable) in one transaction per ``batch_size``; return how many."""
        meta = orjson.dumps(metadata).decode() if metadata is not None else None
        rows = [(self.queue_name, orjson.dumps(i).decode(), meta) for i in items]
        step = batch_size or len(rows) or 1
        with self._lock:
            for start in range(0, len(rows), step):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany("INSERT INTO items (queue, payload, metadata) VALUES (?, ?, ?)",
                                           rows[start:start + step])
                    self._conn.execute("COMMIT")
                except BaseException:
                    rollback(self._conn)
                    raise
        return len(rows)

    def batch_remove_items_from_queue(self, limit: int = 100) -> list[QueueItem]:
        """Remove and return up to ``limit`` items, oldest first."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                rows = self._conn.execute(
                    "SELECT id, payload, metadata, created_at FROM items WHERE queue = ? ORDER BY id LIMIT ?",
                    (self.queue_name, limit)).fetchall()
                if rows:
                    self._conn.execute(
                        "DELETE FROM items WHERE queue = ? AND id <= ?", (self.queue_name, rows[-1][0]))
                self._conn.execute("COMMIT")
            except BaseException:
                rollback(self._conn)
                raise
        return [_item(r) for r in rows]

    def peek(self, limit: int = 100) -> list[QueueItem]:
        """Return up to ``limit`` items without removing them."""
        return self._page(0, limit)

    def _page(self, after_id: int, limit: int) -> list[QueueItem]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, payload, metadata, created_at FROM items WHERE queue = ? AND id > ? ORDER BY id LIMIT ?",
                (self.queue_name, after_id, limit)).fetchall()
        return [_item(r) for r in rows]

    def fold(self, into: QueueFold | None = None, *, remove: bool = False, batch: int = 1000) -> QueueFold:
        """Apply every item waiting in the queue, oldest first, to ``into`` (default a new fold); return it.

        Args:
            into: a fold to continue (the reader's state from the items it read before).
            remove: take the items out of the queue as they are applied; else leave them.
            batch: items read per transaction.
        """
        fold = into if into is not None else QueueFold()
        after = 0
        while True:
            items = self.batch_remove_items_from_queue(batch) if remove else self._page(after, batch)
            if not items:
                return fold
            fold.apply_all(items)
            after = items[-1].id

    def get_queue_length(self) -> int:
        """Number of items waiting."""
        with self._lock:
            row = self._conn.execute("SELECT count(*) FROM items WHERE queue = ?", (self.queue_name,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()


def record_type(event: RecordEvent) -> str | None:
    """Seed 002's record type: post, reply, like, follow, repost, block (None for other collections)."""
    coll = event.collection
    if coll == "app.bsky.feed.post":
        rec = event.record or {}
        return "reply" if isinstance(rec, dict) and rec.get("reply") else "post"
    return {
        "app.bsky.feed.like": "like", "app.bsky.feed.repost": "repost",
        "app.bsky.graph.follow": "follow", "app.bsky.graph.block": "block",
    }.get(coll)


#: What a router returns: one queue, several, or None (skip the event).
Route = str | tuple[str, ...] | None


def by_type_router(base: str) -> Callable[[Event], Route]:
    """Route records to ``<base>_<type>`` queues (seed 002's type-specific queues); others to ``base``.

    Every queue folds alone: an account or sync event (DID-level, a removal among them) reaches
    ``base`` and every type queue; a post delete (no record, so reply or not is unknown) reaches
    ``<base>_post`` and ``<base>_reply``. Identity events and other collections go to ``base``.
    """
    everywhere = (base, *(f"{base}_{kind}" for kind in RECORD_TYPES))
    post_delete = (f"{base}_post", f"{base}_reply")

    def route(event: Event) -> Route:
        if isinstance(event, RecordEvent):
            kind = record_type(event)
            if kind is None:
                return base
            if kind == "post" and is_delete(event):
                return post_delete
            return f"{base}_{kind}"
        if isinstance(event, (AccountEvent, SyncEvent)):
            return everywhere
        return base
    return route


@dataclass(slots=True)
class _Pending:
    """One buffered event: its queues, de-duplication key, item, and what the sink folds of it."""

    queues: tuple[str, ...]
    key: bytes
    payload: str
    metadata: str
    #: A record version: (fold key, did, rev, deleted, as-of time).
    version: tuple[bytes, str, str, bool, int] | None
    #: A removal (purge mode): (did, status time).
    removal: tuple[str, int] | None


def _fold_key(event: RecordEvent) -> bytes:
    return key_digest(f"{event.did}\x00{event.collection}\x00{event.rkey}", 16)


#: Keys per ``IN (...)`` list of the fold's reads (well under SQLite's limit on parameters).
_READ_CHUNK: Final = 500


class _FoldTx:
    """The sink's fold and bounded state for one batch, inside its open write transaction.

    The batch's keys are read in a few statements, the events folded in memory in batch order, and
    the resulting state written back with one statement per table (:meth:`write`).
    """

    def __init__(self, conn: sqlite3.Connection, state_max: int, rows: list[_Pending], purge: bool) -> None:
        self.conn = conn
        self.state_max = state_max
        #: Next insertion sequence of each bounded table (read under the write lock).
        self.next = {t: int(conn.execute(f"SELECT coalesce(max(n), 0) FROM {t}").fetchone()[0]) + 1  # noqa: S608
                     for t in STATE_TABLES}
        by_queue: dict[str, set[bytes]] = {}
        for p in rows:
            for queue in p.queues:
                by_queue.setdefault(queue, set()).add(p.key)
        self.seen: set[tuple[str, bytes]] = set()
        for queue, keys in by_queue.items():
            self.seen.update((queue, k) for (k,) in self._read("SELECT key FROM seen WHERE queue = ? AND key IN",
                                                               keys, (queue,)))
        self.versions: dict[bytes, tuple[str, bool, int]] = {
            k: (rev, bool(deleted), asof) for k, rev, deleted, asof in self._read(
                "SELECT key, rev, deleted, asof_us FROM fold_versions WHERE key IN",
                {p.version[0] for p in rows if p.version is not None})}
        dids = {p.removal[0] for p in rows if p.removal is not None}
        if purge:
            dids |= {p.version[1] for p in rows if p.version is not None}
        self.removals: dict[str, int] = dict(self._read("SELECT did, removed_us FROM fold_removals WHERE did IN", dids))
        #: Writes: seen rows in batch order (n None: already seen, ignored), and the changed keys
        #: of the fold tables with their sequence (None: the row exists and keeps its own).
        self.seen_rows: list[tuple[str, bytes, int | None]] = []
        self.changed_versions: dict[bytes, int | None] = {}
        self.changed_removals: dict[str, int | None] = {}

    def _read(self, sql: str, keys: set[Any], params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        ordered = list(keys)
        for start in range(0, len(ordered), _READ_CHUNK):
            chunk = ordered[start:start + _READ_CHUNK]
            out += self.conn.execute(f"{sql} ({','.join('?' * len(chunk))})", (*params, *chunk)).fetchall()
        return out

    def _sequence(self, table: str) -> int:
        n = self.next[table]
        self.next[table] = n + 1
        return n

    def see(self, queue: str, key: bytes) -> bool:
        """Record ``key`` as seen in ``queue``; False when it was already."""
        fresh = (queue, key) not in self.seen
        if fresh:
            self.seen.add((queue, key))
        # Written either way (an already seen key is ignored): every message of a committed batch
        # reaches the ``seen`` table once per queue, which instrumentation triggers count on.
        self.seen_rows.append((queue, key, self._sequence("seen") if fresh else None))
        return fresh

    def raise_removal(self, did: str, status_us: int) -> None:
        """Rule 3: the DID's removal time R becomes the newest of R and ``status_us``."""
        removed = self.removals.get(did)
        if removed is not None and status_us <= removed:
            return
        self.removals[did] = status_us
        if did not in self.changed_removals:
            self.changed_removals[did] = self._sequence("fold_removals") if removed is None else None

    def admit(self, version: tuple[bytes, str, str, bool, int], purge: bool) -> str | None:
        """Fold one record version in; None when it is to be queued, else why not (a skip reason).

        The stored version becomes the newest of it and ``version`` (rules 1 and 4), whether or not
        ``version`` is queued: a version the removal time R drops is still the one older versions
        must beat.
        """
        key, did, rev, deleted, asof = version
        kept = self.versions.get(key)
        if kept is not None and not supersedes(rev, deleted, asof, *kept):
            return "duplicate" if (rev, deleted) == kept[:2] else "stale_rev"
        self.versions[key] = (rev, deleted, asof)
        if key not in self.changed_versions:
            self.changed_versions[key] = self._sequence("fold_versions") if kept is None else None
        if purge:
            removed = self.removals.get(did)
            if removed is not None and asof <= removed:
                return "filtered"
        return None

    def write(self) -> None:
        """Write the batch's fold state, then keep at most ``state_max`` keys in each bounded table,
        the newest inserted."""
        conn = self.conn
        conn.executemany("INSERT OR IGNORE INTO seen (queue, key, n) VALUES (?, ?, ?)", self.seen_rows)
        versions, removals = self.versions, self.removals
        conn.executemany("INSERT INTO fold_versions (key, rev, deleted, asof_us, n) VALUES (?, ?, ?, ?, ?)",
                         [(k, versions[k][0], int(versions[k][1]), versions[k][2], n)
                          for k, n in self.changed_versions.items() if n is not None])
        conn.executemany("UPDATE fold_versions SET rev = ?, deleted = ?, asof_us = ? WHERE key = ?",
                         [(versions[k][0], int(versions[k][1]), versions[k][2], k)
                          for k, n in self.changed_versions.items() if n is None])
        conn.executemany("INSERT INTO fold_removals (did, removed_us, n) VALUES (?, ?, ?)",
                         [(did, removals[did], n) for did, n in self.changed_removals.items() if n is not None])
        conn.executemany("UPDATE fold_removals SET removed_us = ? WHERE did = ?",
                         [(removals[did], did) for did, n in self.changed_removals.items() if n is None])
        for table, nxt in self.next.items():
            below = nxt - 1 - self.state_max
            if below > 0:
                conn.execute(f"DELETE FROM {table} WHERE n <= ?", (below,))  # noqa: S608


class QueueSink:
    """Consumer-group sink into queues: items, de-duplication keys, fold state and offsets in one transaction.

    Args:
        queue_name: the queue (or base name when ``route`` splits by type).
        path: the SQLite file.
        route: event -> queue name, several names, or None (skip); default everything to ``queue_name``.
        metrics: counts stored items as ``rows_written{sink="queue", table=<queue>}`` and events not
            queued as ``consumer_messages_skipped{sink="queue", reason=duplicate|stale_rev|filtered}``.
        removal_statuses: account statuses that are removals (``--account-removal purge``): a record
            version of the DID with an as-of time <= the newest removal's is not queued. Empty
            (``keep``): no account event removes anything.
        resync_purge: a sync event is a removal at its R (``--resync purge``; runtime.contract.order
            rule 5).
        state_max: keys kept in each of :data:`STATE_TABLES` (module docstring: bounded state).

    Raises:
        ValueError: ``state_max`` < 1.
    """

    name = "queue"

    def __init__(self, queue_name: str, path: Path | str | None = None,
                 route: Callable[[Event], Route] | None = None, metrics: Metrics | None = None, *,
                 removal_statuses: frozenset[str] = frozenset(), state_max: int = DEFAULT_STATE_MAX,
                 resync_purge: bool = False) -> None:
        if state_max < 1:
            raise ValueError(f"state_max must be >= 1, not {state_max}")
        self.queue_name = queue_name
        self._metrics = metrics
        self.path = Path(path) if path is not None else default_queue_path()
        self._route: Callable[[Event], Route] = route or (lambda _e: queue_name)
        self._removal_statuses = removal_statuses
        self._resync_purge = resync_purge
        self._state_max = state_max
        self._rows: list[_Pending] = []
        #: Queues known to be in the ``queues`` table (committed).
        self._queues: set[str] = set()
        self.stored = 0
        #: Events not queued, by skip reason (since the sink started; committed batches only).
        self.skipped: dict[str, int] = {}
        #: Set once a batch failed for good (not busy): no later batch is stored.
        self._failed: BackfillError | None = None
        try:
            self._conn = connect(self.path)
        except sqlite3.Error as e:
            if disk_full(e):
                raise write_failure(self.path, "the queue database's schema", e) from e
            raise
        try:
            self._conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue_name,))
        except sqlite3.Error as e:
            self._conn.close()
            if disk_full(e):
                raise write_failure(self.path, f"queue {queue_name!r}", e) from e
            raise
        self._queues.add(queue_name)

    def load_offsets(self, group: str, partitions: list[TP]) -> dict[TP, StoredOffset]:
        """Stored next offsets of ``group``, with their origins."""
        out: dict[TP, StoredOffset] = {}
        wanted = set(partitions)
        try:
            for topic, partition, nxt, cluster_id, topic_id in self._conn.execute(
                    "SELECT topic, partition, next_offset, cluster_id, topic_id FROM kafka_offsets "
                    "WHERE group_id = ?", (group,)):
                if (topic, partition) in wanted:
                    out[(topic, partition)] = StoredOffset(nxt, Origin(cluster_id, topic_id))
        except sqlite3.OperationalError as e:
            raise SinkUnavailableError(f"queue database: {e}") from e
        return out

    def forget_offsets(self, group: str, partitions: list[TP]) -> None:
        """Delete the stored offsets of ``partitions`` (see :class:`~consumers.base.Sink`).

        Raises:
            SinkUnavailableError: the database is busy.
            CommitError: it refused the change.
        """
        try:
            self._conn.executemany("DELETE FROM kafka_offsets WHERE group_id = ? AND topic = ? AND partition = ?",
                                   [(group, t, p) for t, p in partitions])
        except sqlite3.Error as e:
            rollback(self._conn)
            raise write_failure(self.path, f"forgetting {len(partitions)} stored offsets", e) from e

    def add(self, item: Consumed) -> None:
        """Buffer the event's Jetstream-shaped payload and fold metadata for its queues."""
        event = item.event
        route = self._route(event)
        if not route:
            return
        queues = (route,) if isinstance(route, str) else route
        # The event's identity, the same through any replay: a Jetstream event served again by
        # another instance (another time_us) is the same item.
        key = key_digest(event_key(event), 16)
        meta = fold_metadata(event, self._removal_statuses, self._resync_purge)
        version: tuple[bytes, str, str, bool, int] | None = None
        removal: tuple[str, int] | None = None
        if isinstance(event, RecordEvent):
            version = (_fold_key(event), event.did, event.rev or "", is_delete(event), meta["asof_us"])
        elif meta["op"] == "account" and meta["removal"]:
            removal = (event.did, meta["status_us"])
        elif meta["op"] == "sync" and meta["removal"]:
            removal = (event.did, meta["removal_us"])
        self._rows.append(_Pending(queues, key, orjson.dumps(to_jetstream_json(event)).decode(),
                                   orjson.dumps(meta).decode(), version, removal))

    def flush(self, group: str, offsets: dict[TP, int], origins: Mapping[str, Origin] | None = None) -> int:
        """Fold the buffered events in and write the items to queue and ``offsets``, in one transaction.

        An event already seen in a queue is not queued there again; a record version the fold
        state makes stale, or (purge mode) removed, is not queued at all (module docstring).
        ``origins``: per topic, the cluster and topic ids the offsets count (stored with them).
        Returns the items written.

        Raises:
            SinkUnavailableError: the database is busy (nothing was stored; the buffer is kept).
            QueueFullError: the disk is full (nothing was stored; this sink stores nothing more).
            CommitError: any other failure, or an earlier one (nothing was stored; this sink stores
                nothing more).
        """
        if self._failed is not None:
            raise CommitError(f"queue database {self.path}: an earlier batch failed, so no later one is stored "
                              f"({self._failed})") from self._failed
        conn = self._conn
        stored = 0
        per_queue: dict[str, int] = {}
        skipped: dict[str, int] = {}
        new_queues: set[str] = set()
        purge = bool(self._removal_statuses) or self._resync_purge
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                fold = _FoldTx(conn, self._state_max, self._rows, purge)
                items: list[tuple[str, str, str]] = []
                for p in self._rows:
                    for queue in p.queues:
                        if queue not in self._queues and queue not in new_queues:
                            conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,))
                            new_queues.add(queue)
                    fresh = [q for q in p.queues if fold.see(q, p.key)]
                    if p.removal is not None:
                        fold.raise_removal(*p.removal)  # idempotent: a re-delivery changes nothing
                    reason = "duplicate" if not fresh else None
                    if reason is None and p.version is not None:
                        reason = fold.admit(p.version, purge)
                    if reason is not None:
                        skipped[reason] = skipped.get(reason, 0) + 1
                        continue
                    for queue in fresh:
                        items.append((queue, p.payload, p.metadata))
                        per_queue[queue] = per_queue.get(queue, 0) + 1
                fold.write()
                conn.executemany("INSERT INTO items (queue, payload, metadata) VALUES (?, ?, ?)", items)
                stored = len(items)
                known = origins or {}
                conn.executemany(
                    "INSERT INTO kafka_offsets (group_id, topic, partition, next_offset, cluster_id, topic_id) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (group_id, topic, partition) DO UPDATE SET "
                    # an offset of another origin replaces the row; within one origin offsets only grow
                    "next_offset = CASE WHEN (excluded.cluster_id IS NOT NULL AND cluster_id IS NOT "
                    "excluded.cluster_id) OR (excluded.topic_id IS NOT NULL AND topic_id IS NOT excluded.topic_id) "
                    "THEN excluded.next_offset ELSE max(next_offset, excluded.next_offset) END, "
                    "cluster_id = coalesce(excluded.cluster_id, cluster_id), "
                    "topic_id = coalesce(excluded.topic_id, topic_id)",
                    [(group, t, p, o, known.get(t, UNKNOWN).cluster_id, known.get(t, UNKNOWN).topic_id)
                     for (t, p), o in offsets.items()])
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
        except sqlite3.Error as e:
            failure = write_failure(self.path, f"a batch of {len(self._rows)} items and its offsets", e)
            if not isinstance(failure, SinkUnavailableError):
                # Fatal: this sink stores nothing more. A later flush (the consumer flushes what is
                # pending when its partitions are revoked on the way out) must not store the offsets
                # of this batch, or of any later one, without its items.
                self._failed = failure
                self._rows.clear()
            raise failure from e
        self._queues |= new_queues
        self._rows.clear()
        self.stored += stored
        for reason, n in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        if self._metrics is not None:
            for queue, n in per_queue.items():
                self._metrics.rows_written.labels(self.name, queue).inc(n)
            for reason, n in skipped.items():
                self._metrics.consumer_skipped.inc(self.name, reason, amount=n)
        return stored

    def discard(self) -> None:
        """Forget buffered items."""
        self._rows.clear()

    def queue_length(self, name: str | None = None) -> int:
        """Items waiting in ``name`` (default the main queue)."""
        row = self._conn.execute("SELECT count(*) FROM items WHERE queue = ?",
                                 (name or self.queue_name,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        """Close the database."""
        self._conn.close()


# ------------------------------------------------------------------------------------ combined mode

class QueueCompanion:
    """Seed 000's combined mode: a queue consumer group run in a thread beside a producer.

    The ``queue`` entry point of ``atproto_backfill.companions`` (the producer's side of the
    contract is :class:`producers.companion.Companion`): ``backfill jetstream`` starts it after
    preparing its job, shows :attr:`stored` in its progress, and at the end has it consume up to
    the job's final offsets (:meth:`finish`) for the seed's ``records_stored`` and ``queue_length``.

    Args:
        queue_name: the queue to fill (its group is ``group_name("queue", queue_name)``).
        queue_path: the SQLite file (None: :func:`default_queue_path`).
        collections: NSID patterns of the collection topics to consume (no account topics).
        batch_size: messages per sink transaction.
    """

    def __init__(self, *, queue_name: str, queue_path: Path | None, collections: Sequence[str],
                 batch_size: int) -> None:
        self.queue_name = queue_name
        self.path = queue_path if queue_path is not None else default_queue_path()
        self.options = ConsumerOptions(group=group_name("queue", queue_name), collections=list(collections),
                                       include_account_events=False, batch_size=batch_size, linger=0.2,
                                       topic_refresh=1.0)
        self._stop = threading.Event()
        self._sink: QueueSink | None = None
        self._consumer: GroupConsumer | None = None
        self._thread: threading.Thread | None = None
        self._error: list[BaseException] = []

    @property
    def stored(self) -> int:
        """Items the sink stored so far (0 before :meth:`start`)."""
        return self._sink.stored if self._sink is not None else 0

    def start(self, kafka: KafkaSettings, metrics: Metrics) -> None:
        """Open the queue and start the consumer group in a daemon thread."""
        self._sink = QueueSink(self.queue_name, self.path)
        self._consumer = GroupConsumer(kafka, self._sink, self.options, metrics,
                                       AvroCodec.from_config(kafka.registry_config()), stop_event=self._stop)
        self._thread = threading.Thread(target=self._consume, name="queue-consumer", daemon=True)
        self._thread.start()

    def _consume(self) -> None:
        assert self._consumer is not None
        try:
            self._consumer.run()
        except BaseException as e:  # noqa: BLE001 - re-raised by finish() in the producer's thread
            self._error.append(e)

    def finish(self, offsets: Mapping[str, Mapping[str, int]]) -> None:
        """Consume up to ``offsets`` (topic -> partition -> next offset), then wait for the thread.

        Raises:
            BaseException: what stopped the consumer thread, re-raised.
        """
        if self._consumer is None or self._thread is None:
            raise RuntimeError("QueueCompanion.finish() before start()")
        self._consumer.opts.until_offsets = {topic: dict(parts) for topic, parts in offsets.items()}
        self._thread.join()
        if self._error:
            raise self._error[0]

    def abort(self) -> None:
        """Stop the consumer at its next batch (the producer failed); does not wait."""
        self._stop.set()

    def queue_length(self) -> int:
        """Items waiting in the queue."""
        if self._sink is None:
            raise RuntimeError("QueueCompanion.queue_length() before start()")
        return self._sink.queue_length()

    def close(self) -> None:
        """Close the queue database."""
        if self._sink is not None:
            self._sink.close()


# ------------------------------------------------------------------------------------ CLI

#: ``--queue-path``: the SQLite file of the queues (None: :func:`default_queue_path`).
QUEUE_PATH_OPTION: Final = Opt(("--queue-path",), "queue_path", "BACKFILL_QUEUE_PATH", None,
                               "SQLite file of the queues (default $XDG_DATA_HOME/atproto-backfill/queues.sqlite)")

QUEUE_OPTIONS: Final = (
    Opt(("--queue-name",), "queue_name", "BACKFILL_QUEUE_NAME", "jetstream_sync", "queue to fill"),
    QUEUE_PATH_OPTION,
    Opt(("--split-by-type",), "split_by_type", "BACKFILL_SPLIT_BY_TYPE", False,
        "seed 002's type-specific queues: <queue>_post, _reply, _like, _follow, _repost, _block "
        "(account events reach every queue)", action="store_true"),
    *account_removal_options(
        "what an account deletion/takedown event does to that account's records: keep them, or purge: "
        "queue no record version of the DID as of that time or older (the event is queued either way)",
        "what a repository replacement (Jetstream v2 #sync) does: purge: queue no record version of the DID "
        "written by an older commit (the sync is queued either way, with removal=true for readers), or keep"),
    Opt(("--queue-state-max",), "queue_state_max", "BACKFILL_QUEUE_STATE_MAX", DEFAULT_STATE_MAX,
        "keys kept in each of the queue database's de-duplication and fold tables, the oldest pruned first",
        type=int, metavar="KEYS"),
)


#: One line for ``backfill --help``.
HELP: Final = "consumer group into the durable queue"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill consume queue``."""
    add_options(parser, QUEUE_OPTIONS)
    add_consumer_arguments(parser)


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill consume queue``."""
    settings = consumer_settings(ns, default_group=f"atproto-backfill-queue-{ns.queue_name}", default_batch=100)
    statuses = removal_statuses(ns)
    if ns.queue_state_max < 1:
        raise ConfigError("--queue-state-max must be >= 1")
    path = Path(ns.queue_path) if ns.queue_path else default_queue_path()
    route = by_type_router(ns.queue_name) if ns.split_by_type else None
    metrics = Metrics()
    try:
        run_consumer(settings, lambda: QueueSink(ns.queue_name, path, route=route, metrics=metrics,
                                                 removal_statuses=statuses, state_max=ns.queue_state_max,
                                                 resync_purge=resync_purge(ns)),
                     metrics=metrics)
    except QueueFullError as e:
        log.critical("stopping: %s", e)  # the message says it all: no traceback
        return 1
    return 0


if __name__ == "__main__":
    import sys

    from runtime.commands.cli import main as cli_main

    sys.exit(cli_main(["consume", "queue", *sys.argv[1:]], own_process=True))

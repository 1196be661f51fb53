"""The durable queue sink and the seeds' queue API (``Queue``), on one SQLite file.

Every queue is a named FIFO of JSON payloads (the Jetstream-shaped event) in one SQLite database
(``BACKFILL_QUEUE_PATH``; default ``$XDG_DATA_HOME/atproto-backfill/queues.sqlite``), so a batch
for several queues, its de-duplication keys and the consumer group's next offsets commit in one
transaction: exactly once, even when the broker re-delivers.

A full disk (``SQLITE_FULL``) stops the consumer loudly with :class:`QueueFullError`: the batch's
transaction is rolled back whole (SQLite rolls it back itself; nothing of it, items or offsets, is
kept), the command exits with status 1 and one line naming the file, and a restart once there is
room resumes after the last stored batch.

Seed API::

    from consumers.queue import Queue
    queue = Queue(queue_name="jetstream_sync", create_new_queue=False)
    items = queue.batch_remove_items_from_queue(limit=100)
    for item in items:
        print(item.payload)
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from consumers.base import TP, Consumed
from consumers.cli import add_consumer_arguments, consumer_settings, run_consumer
from runtime.errors import BackfillError, CommitError, SinkUnavailableError
from runtime.metrics import Metrics
from runtime.offsets import UNKNOWN, Origin, StoredOffset
from runtime.records import Event, RecordEvent, event_key, to_jetstream_json
from runtime.settings import Opt, add_options

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
"""

#: Seed 002's record types, for type-specific queues.
RECORD_TYPES: Final = ("post", "reply", "like", "follow", "repost", "block")


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


def connect(path: Path | str | None = None) -> sqlite3.Connection:
    """Open (creating if needed) the queue database in WAL mode."""
    p = Path(path) if path is not None else default_queue_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(p, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.executescript(_SCHEMA)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(kafka_offsets)")}
    for column in ("cluster_id", "topic_id"):  # a database made before offsets carried their origin
        if column not in columns:
            conn.execute(f"ALTER TABLE kafka_offsets ADD COLUMN {column} TEXT")
    return conn


@dataclass(frozen=True)
class QueueItem:
    """One queued item; ``payload`` is the parsed JSON."""

    id: int
    payload: Any
    metadata: dict[str, Any] | None
    created_at: str


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
        return [QueueItem(r[0], orjson.loads(r[1]), orjson.loads(r[2]) if r[2] else None, r[3]) for r in rows]

    def peek(self, limit: int = 100) -> list[QueueItem]:
        """Return up to ``limit`` items without removing them."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, payload, metadata, created_at FROM items WHERE queue = ? ORDER BY id LIMIT ?",
                (self.queue_name, limit)).fetchall()
        return [QueueItem(r[0], orjson.loads(r[1]), orjson.loads(r[2]) if r[2] else None, r[3]) for r in rows]

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


def by_type_router(base: str) -> Callable[[Event], str | None]:
    """Route records to ``<base>_<type>`` queues (seed 002's type-specific queues); others to ``base``."""
    def route(event: Event) -> str | None:
        if isinstance(event, RecordEvent):
            kind = record_type(event)
            if kind is None:
                return base
            if kind == "post" and event.operation == "delete":
                return f"{base}_post"
            return f"{base}_{kind}"
        return base
    return route


class QueueSink:
    """Consumer-group sink into queues: items, de-duplication keys and offsets in one transaction.

    Args:
        queue_name: the queue (or base name when ``route`` splits by type).
        path: the SQLite file.
        route: event -> queue name (None: skip); default everything to ``queue_name``.
        metrics: counts stored items as ``rows_written{sink="queue", table=<queue>}`` when given.
    """

    name = "queue"

    def __init__(self, queue_name: str, path: Path | str | None = None,
                 route: Callable[[Event], str | None] | None = None, metrics: Metrics | None = None) -> None:
        self.queue_name = queue_name
        self._metrics = metrics
        self.path = Path(path) if path is not None else default_queue_path()
        self._route = route or (lambda _e: queue_name)
        self._rows: list[tuple[str, bytes, str]] = []
        #: Queues known to be in the ``queues`` table (committed).
        self._queues: set[str] = set()
        self.stored = 0
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
        """Buffer the event's Jetstream-shaped payload for its queue."""
        event = item.event
        queue = self._route(event)
        if queue is None:
            return
        # The event's identity, the same through any replay: a Jetstream event served again by
        # another instance (another time_us) is the same item.
        key = hashlib.blake2b(event_key(event).encode(), digest_size=16).digest()
        self._rows.append((queue, key, orjson.dumps(to_jetstream_json(event)).decode()))

    def flush(self, group: str, offsets: dict[TP, int], origins: Mapping[str, Origin] | None = None) -> int:
        """Write buffered items (skipping already-seen ones) and ``offsets`` in one transaction.

        ``origins``: per topic, the cluster and topic ids the offsets count (stored with them).

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
        new_queues: set[str] = set()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for queue, key, payload in self._rows:
                    if queue not in self._queues and queue not in new_queues:
                        conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,))
                        new_queues.add(queue)
                    cur = conn.execute("INSERT OR IGNORE INTO seen (queue, key) VALUES (?, ?)", (queue, key))
                    if cur.rowcount:
                        conn.execute("INSERT INTO items (queue, payload) VALUES (?, ?)", (queue, payload))
                        stored += 1
                        per_queue[queue] = per_queue.get(queue, 0) + 1
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
        if self._metrics is not None:
            for queue, n in per_queue.items():
                self._metrics.rows_written.labels(self.name, queue).inc(n)
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


# ------------------------------------------------------------------------------------ CLI

QUEUE_OPTIONS: Final = (
    Opt(("--queue-name",), "queue_name", "BACKFILL_QUEUE_NAME", "jetstream_sync", "queue to fill"),
    Opt(("--queue-path",), "queue_path", "BACKFILL_QUEUE_PATH", None,
        "SQLite file of the queues (default $XDG_DATA_HOME/atproto-backfill/queues.sqlite)"),
    Opt(("--split-by-type",), "split_by_type", "BACKFILL_SPLIT_BY_TYPE", False,
        "seed 002's type-specific queues: <queue>_post, _reply, _like, _follow, _repost, _block",
        action="store_true"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill consume queue``."""
    add_options(parser, QUEUE_OPTIONS)
    add_consumer_arguments(parser)


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill consume queue``."""
    settings = consumer_settings(ns, default_group=f"atproto-backfill-queue-{ns.queue_name}", default_batch=100)
    path = Path(ns.queue_path) if ns.queue_path else default_queue_path()
    route = by_type_router(ns.queue_name) if ns.split_by_type else None
    metrics = Metrics()
    try:
        run_consumer(settings, lambda: QueueSink(ns.queue_name, path, route=route, metrics=metrics),
                     metrics=metrics)
    except QueueFullError as e:
        log.critical("stopping: %s", e)  # the message says it all: no traceback
        return 1
    return 0


if __name__ == "__main__":
    import sys

    from runtime.cli import main as cli_main

    sys.exit(cli_main(["consume", "queue", *sys.argv[1:]]))

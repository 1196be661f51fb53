"""The durable queue sink and the seeds' queue API (``Queue``), on one SQLite file.

Every queue is a named FIFO of JSON payloads (the Jetstream-shaped event) in one SQLite database
(``BACKFILL_QUEUE_PATH``; default ``$XDG_DATA_HOME/atproto-backfill/queues.sqlite``), so a batch
for several queues, its de-duplication keys and the consumer group's next offsets commit in one
transaction: exactly once, even when the broker re-delivers.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from consumers.base import TP, Consumed
from consumers.cli import add_consumer_arguments, consumer_settings, run_consumer
from runtime.errors import BackfillError, CommitError, SinkUnavailableError
from runtime.metrics import Metrics
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
    PRIMARY KEY (group_id, topic, partition)
) WITHOUT ROWID;
"""

#: Seed 002's record types, for type-specific queues.
RECORD_TYPES: Final = ("post", "reply", "like", "follow", "repost", "block")


class QueueNotFoundError(BackfillError, LookupError):
    """``Queue(..., create_new_queue=False)`` named a queue that does not exist."""


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
                    self._conn.execute("ROLLBACK")
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
                self._conn.execute("ROLLBACK")
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
        self._conn = connect(self.path)
        self._route = route or (lambda _e: queue_name)
        self._rows: list[tuple[str, bytes, str]] = []
        self._queues: set[str] = set()
        self.stored = 0
        self._ensure_queue(queue_name)

    def _ensure_queue(self, name: str) -> None:
        if name not in self._queues:
            self._conn.execute("INSERT OR IGNORE INTO queues (name) VALUES (?)", (name,))
            self._queues.add(name)

    def load_offsets(self, group: str, partitions: list[TP]) -> dict[TP, int]:
        """Stored next offsets of ``group``."""
        out: dict[TP, int] = {}
        try:
            for topic, partition, nxt in self._conn.execute(
                    "SELECT topic, partition, next_offset FROM kafka_offsets WHERE group_id = ?", (group,)):
                if (topic, partition) in partitions:
                    out[(topic, partition)] = nxt
        except sqlite3.OperationalError as e:
            raise SinkUnavailableError(f"queue database: {e}") from e
        return out

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

    def flush(self, group: str, offsets: dict[TP, int]) -> int:
        """Write buffered items (skipping already-seen ones) and ``offsets`` in one transaction."""
        conn = self._conn
        stored = 0
        per_queue: dict[str, int] = {}
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for queue, key, payload in self._rows:
                    if queue not in self._queues:
                        self._ensure_queue(queue)
                    cur = conn.execute("INSERT OR IGNORE INTO seen (queue, key) VALUES (?, ?)", (queue, key))
                    if cur.rowcount:
                        conn.execute("INSERT INTO items (queue, payload) VALUES (?, ?)", (queue, payload))
                        stored += 1
                        per_queue[queue] = per_queue.get(queue, 0) + 1
                conn.executemany(
                    "INSERT INTO kafka_offsets (group_id, topic, partition, next_offset) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (group_id, topic, partition) DO UPDATE SET "
                    "next_offset = max(next_offset, excluded.next_offset)",
                    [(group, t, p, o) for (t, p), o in offsets.items()])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise SinkUnavailableError(f"queue database busy: {e}") from e
            raise CommitError(f"queue database write failed: {e}") from e
        except sqlite3.DatabaseError as e:
            raise CommitError(f"queue database write failed: {e}") from e
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
    run_consumer(settings, lambda: QueueSink(ns.queue_name, path, route=route, metrics=metrics), metrics=metrics)
    return 0


if __name__ == "__main__":
    import sys

    from runtime.cli import main as cli_main

    sys.exit(cli_main(["consume", "queue", *sys.argv[1:]]))

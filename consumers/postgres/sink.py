"""The PostgreSQL sink: one transaction per batch holding the rows, the offsets and the job cursor.

A batch is written as: new actors (sorted, ``ON CONFLICT DO NOTHING``, so replicas racing on the
same DID wait for each other instead of failing the foreign key), actor handle/status updates,
account purges, deletes (tombstones first, then the rows), one ``COPY`` into a temporary staging
table and one ``INSERT ... ON CONFLICT ... WHERE rev < EXCLUDED.rev`` per record table, the
identity/account event logs, each partition's next offset, each partition's newest job position,
and last the ``firehose_cursor`` row of every producer job in the batch: the low watermark over the
job's partitions. A row is replaced only by a newer revision, and never resurrected
by a change older than its tombstone, so replays, rebalances and out-of-order duplicates are no-ops.

Concurrency (``BACKFILL_MAX_CONCURRENT``): with 1, :meth:`PostgresSink.flush` returns once the
batch committed. With N > 1, up to N - 1 sealed batches commit in the background, in order, on one
writer connection, while the consumer reads and transforms the next one; the stored offsets still
only ever cover committed rows, so a kill loses nothing. Background batches retry transient
database failures themselves; if the retries run out, the next ``flush``/``close`` raises
:class:`~runtime.errors.CommitError` and no later batch is written. The rows of a batch are
formatted (binary COPY) on the consumer thread, so the writer thread mostly waits on the socket;
while it runs, the interpreter's switch interval is lowered to 0.5 ms so the writer gets the GIL
back promptly after each round trip.

Errors: psycopg ``OperationalError`` (connection lost, server restarting, deadlock, serialization
failure) and ``InterfaceError`` become :class:`~runtime.errors.SinkUnavailableError` (the batch is
kept and retried on a new connection); anything else is a :class:`~runtime.errors.CommitError`.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.copy import FileWriter
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from consumers.base import TP, Consumed
from consumers.postgres.rows import (
    ACCOUNT_COLUMNS,
    DELETE_COLUMNS,
    IDENTITY_COLUMNS,
    RECORD_TABLES,
    SYNC_COLUMNS,
    Batch,
    Table,
    TransformOptions,
    add_event,
    naive_utc,
)
from consumers.postgres.schema import lock_key, migrate
from runtime.contract.created_at import Outcome
from runtime.errors import CommitError, ConfigError, SinkUnavailableError
from runtime.kafka.offsets import UNKNOWN, Origin, StoredOffset
from runtime.process.metrics import Metrics
from runtime.process.options import Secret

log = logging.getLogger(__name__)

SINK: Final = "postgres"
#: Known-committed actors remembered per process (skips re-inserting them), in two generations of
#: at most this many DIDs each (about 11 MB per generation): recently seen actors stay known.
KNOWN_ACTORS_GENERATION: Final = 100_000
#: GIL switch interval (seconds) while a background writer runs.
SWITCH_INTERVAL: Final = 0.0005
#: Waits between connection attempts while the database is unreachable at start: doubling from
#: the first, capped (a database coming back is noticed within this many seconds).
START_BACKOFF_FIRST: Final = 0.5
START_BACKOFF_MAX: Final = 5.0


class KnownActors:
    """The DIDs whose ``actors`` row is committed, bounded: two generations of ``generation`` each.

    Lookups see both generations; new and re-seen DIDs go to the young one. When it is full it
    becomes the old one and the previous old one is dropped, so memory stays under
    ``2 * generation`` DIDs whatever the input, and an actor seen in the last generation stays
    known (a hot actor is never re-inserted just because the cache turned over).
    """

    def __init__(self, generation: int) -> None:
        if generation < 1:
            raise ValueError("generation must be positive")
        self.generation = generation
        self._young: set[str] = set()
        self._old: set[str] = set()

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def __contains__(self, did: object) -> bool:
        return did in self._young or did in self._old

    def unknown(self, dids: Iterable[str]) -> list[str]:
        """The DIDs of ``dids`` not known to be committed, in their order."""
        young, old = self._young, self._old
        return [d for d in dids if d not in young and d not in old]

    def add(self, dids: Iterable[str]) -> None:
        """Remember ``dids`` as committed (after the transaction that inserted them)."""
        young, limit = self._young, self.generation
        for did in dids:
            if did in young:
                continue
            if len(young) >= limit:
                self._old, young = young, set()
                self._young = young
            young.add(did)

    def clear(self) -> None:
        """Forget every DID (the database may have lost rows)."""
        self._young = set()
        self._old = set()


@dataclass(frozen=True)
class PostgresSettings:
    """Where and how the sink writes.

    Args:
        database_url: libpq URL or DSN (a secret: never logged).
        db_schema: PostgreSQL schema holding every table.
        deletes: ``delete`` removes a deleted record's row; ``flag`` keeps it with ``deleted = true``.
        transform: createdAt policy and account-removal statuses.
        max_concurrent: batches in progress at once (see the module docstring).
        connect_timeout: seconds to wait for a connection.
        retries: attempts of a background batch before giving up (fatal).
        connect_wait: seconds to wait at start for an unreachable database, trying again with
            backoff (0: one attempt).
    """

    database_url: Secret
    db_schema: str = "public"
    deletes: str = "delete"
    transform: TransformOptions = field(default_factory=TransformOptions)
    max_concurrent: int = 1
    connect_timeout: float = 10.0
    retries: int = 30
    connect_wait: float = 60.0

    def __post_init__(self) -> None:
        if self.deletes not in ("delete", "flag"):
            raise ConfigError(f"deletes must be 'delete' or 'flag', not {self.deletes!r}")
        if self.connect_wait < 0:
            raise ConfigError("the database wait must be >= 0 seconds")
        if self.max_concurrent < 1:
            raise ConfigError("max_concurrent must be >= 1")
        if not self.db_schema or len(self.db_schema) > 63:
            raise ConfigError("the database schema name must have 1 to 63 characters")


@dataclass(frozen=True)
class Committed:
    """What one committed transaction wrote (given to the ``on_commit`` hook)."""

    changes: int
    rows: int
    event_times_us: list[int]
    committed_at: float


#: Column type in the target table -> type in the binary staging table (and psycopg's dumper).
STAGE_TYPES: Final[dict[str, str]] = {
    "text": "text", "jsonb": "text", "timestamptz": "timestamptz", "bigint": "int8", "text[]": "text[]",
    "boolean": "bool",
}


def describe_dsn(dsn: str) -> str:
    """``user@host:port/dbname`` of a libpq URL or key=value DSN, never its password."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "**********"
    user = str(parts.get("user") or "")
    host = str(parts.get("host") or "localhost")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"{user + '@' if user else ''}{host}{port}/{parts.get('dbname') or ''}"


def describe_error(e: BaseException, secret: Secret | None = None) -> str:
    """``e`` as one line (libpq's messages span several), the secret's value masked if it occurs."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    if secret is not None and secret.get():
        text = text.replace(secret.get(), str(secret))
        password = conninfo_password(secret.get())
        if password:
            text = text.replace(password, str(secret))
    return text


def conninfo_password(dsn: str) -> str | None:
    """The password of a libpq URL or key=value DSN (None: none, or unparseable)."""
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        return None
    return str(password) if password else None


class DatabaseUnreachableError(SinkUnavailableError):
    """The database stayed unreachable through the wait at start; the message is one line naming
    user@host:port/dbname and the last connection error (never the password)."""


class StartStoppedError(SinkUnavailableError):
    """The process was told to stop (SIGTERM, SIGINT) while it waited for the database at start."""


def transient(e: BaseException) -> bool:
    """True for database failures worth retrying on a new connection."""
    return isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError))


def _columns(cols: Iterable[tuple[str, str]]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(name) for name, _ in cols)


#: First key of the advisory lock that orders the job positions' writes (ASCII "atbc"; the
#: second is the schema's, as the migrations' lock, whose first key differs).
PROGRESS_LOCK_CLASS: Final = 0x61746263

#: Purge mode: the DID buckets of the advisory locks a batch transaction takes (at most this many
#: locks each). PostgreSQL's lock table holds max_locks_per_transaction (64 by default) times
#: max_connections locks in all: 64 per transaction keeps every connection within its share.
PURGE_LOCK_BUCKETS: Final = 64


def purge_lock_keys(base: int, dids: Iterable[str], purged: Iterable[str]) -> tuple[list[int], list[bool]]:
    """The advisory locks of a purge-mode batch writing or purging ``dids``: the keys (``base`` plus
    each DID's bucket, ascending) and whether each is exclusive (a DID of ``purged`` is in it)."""
    exclusive = {zlib.crc32(d.encode()) % PURGE_LOCK_BUCKETS for d in purged}
    buckets = sorted({zlib.crc32(d.encode()) % PURGE_LOCK_BUCKETS for d in dids} | exclusive)
    return [base + b for b in buckets], [b in exclusive for b in buckets]


class Statements:
    """Every SQL statement of the sink for one schema and mode (built once)."""

    def __init__(self, schema: str, *, flag_deletes: bool, purge: bool) -> None:
        self.schema = schema
        self.purge_mode = purge
        s = sql.Identifier(schema)
        # Purge mode: a transaction first takes an advisory lock on each PURGE_LOCK_BUCKETS bucket
        # its DIDs hash to (see purge_lock_keys): exclusive on the buckets of the DIDs it purges,
        # shared on the others, in key order (no deadlock between replicas; nothing else is locked
        # before them). A purge and a write of the same DID's older record then run one after the
        # other, whichever topic and replica each came from: the write waits for the purge's commit
        # and its guard sees the removal, or the purge waits for the write's commit and its DELETE
        # sees the row; writes never wait for writes. The locks live in the server's memory: unlike
        # a lock on each DID's actor row (what this was), they write no tuple and no WAL, which cost
        # about 10% of the consumer's throughput with 20,000 accounts a run (4,000 rows locked per
        # batch). Once they are held, no other removal can reach the batch's DIDs, so the removal
        # times read next guard the upserts as a parameter, a few DIDs, instead of an anti-join with
        # the whole actors table per record table; a batch none of whose actors has a removal is not
        # guarded at all. (Function calls are made in the rows' order: the keys come sorted.)
        self.lock_dids = sql.SQL(
            "SELECT count(CASE WHEN u.x THEN pg_advisory_xact_lock(u.k) ELSE pg_advisory_xact_lock_shared(u.k) END) "
            "FROM unnest(%s::bigint[], %s::boolean[]) AS u(k, x)")
        self.removal_times = sql.SQL(
            "SELECT a.did, a.removed_time_us FROM {s}.actors AS a "
            "WHERE a.did = ANY(%b::text[]) AND a.removed_time_us IS NOT NULL").format(s=s)
        # (The batch's DIDs, a few thousand, travel as a binary array here and in the new actors'
        # insert: the text form cost 4-5 ms a batch to quote and parse, the binary 1 ms.)
        #: the first advisory-lock key of this schema's DID buckets (see purge_lock_keys)
        self.lock_base = lock_key(schema) * PURGE_LOCK_BUCKETS
        self.stage_ddl: list[sql.Composed] = []
        self.copy: dict[str, sql.Composed] = {}
        #: the upserts: guarded by tombstones, and in purge mode by the removals given as two
        #: parameters (DIDs, removal times; see lock_dids)
        self.upsert: dict[str, sql.Composed] = {}
        #: the upserts without the removal guard (purge mode: no actor of the batch has a removal)
        self.upsert_unguarded: dict[str, sql.Composed] = {}
        self.delete: dict[str, sql.Composed] = {}
        self.purge: dict[str, sql.Composed] = {}

        self.copy_types: dict[str, list[str]] = {}

        def stage(name: str, cols: Sequence[tuple[str, str]]) -> sql.Identifier:
            # Staged in binary COPY format; jsonb travels as text and is cast by the upsert.
            ident = sql.Identifier(f"_stage_{name}")
            types = [STAGE_TYPES[t] for _, t in cols]
            self.stage_ddl.append(sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {stage} ({defs}) ON COMMIT DELETE ROWS").format(
                    stage=ident, defs=sql.SQL(", ").join(
                        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t))
                        for (c, _), t in zip(cols, types, strict=True))))
            self.copy[name] = sql.SQL("COPY pg_temp.{stage} ({cols}) FROM STDIN (FORMAT BINARY)").format(
                stage=ident, cols=_columns(cols))
            self.copy_types[name] = types
            return ident

        for table in RECORD_TABLES:
            st = stage(table.name, table.columns)
            self.upsert[table.name] = self._upsert(s, table, st, purge)
            # without purge the guarded upsert has no removal guard: the same statement serves
            self.upsert_unguarded[table.name] = self._upsert(s, table, st, False) if purge else self.upsert[table.name]
            match: sql.Composable
            if table.collection is not None:
                match = sql.SQL("d.collection = {c}").format(c=sql.Literal(table.collection))
            else:
                match = sql.SQL("t.collection = d.collection")
            if flag_deletes:
                self.delete[table.name] = sql.SQL(
                    "UPDATE {s}.{t} AS t SET deleted = true, rev = d.rev, source = d.source, "
                    "cursor = d.cursor, time_us = d.time_us, job = d.job, updated_at = now() "
                    "FROM pg_temp._stage_deletes AS d "
                    "WHERE {match} AND t.did = d.did AND t.rkey = d.rkey "
                    "AND (t.rev < d.rev OR (t.rev = d.rev AND NOT t.deleted))").format(
                        s=s, t=sql.Identifier(table.name), match=match)
            else:
                self.delete[table.name] = sql.SQL(
                    "DELETE FROM {s}.{t} AS t USING pg_temp._stage_deletes AS d "
                    "WHERE {match} AND t.did = d.did AND t.rkey = d.rkey AND t.rev <= d.rev").format(
                        s=s, t=sql.Identifier(table.name), match=match)  # a delete wins a tie
            self.purge[table.name] = sql.SQL(
                "DELETE FROM {s}.{t} AS t USING unnest(%s::text[], %s::bigint[]) AS r(did, t_us) "
                "WHERE t.did = r.did AND coalesce(t.asof_us, t.time_us) <= r.t_us").format(
                    s=s, t=sql.Identifier(table.name))

        stage("deletes", DELETE_COLUMNS)
        delete_cols = _columns(DELETE_COLUMNS)
        self.tombstones = sql.SQL(
            "INSERT INTO {s}.tombstones AS t ({cols}) SELECT {cols} FROM pg_temp._stage_deletes "
            "ON CONFLICT (did, collection, rkey) DO UPDATE SET rev = EXCLUDED.rev, source = EXCLUDED.source, "
            "cursor = EXCLUDED.cursor, time_us = EXCLUDED.time_us, job = EXCLUDED.job, deleted_at = now() "
            "WHERE t.rev < EXCLUDED.rev").format(s=s, cols=delete_cols)

        stage("identity", IDENTITY_COLUMNS)
        stage("account", ACCOUNT_COLUMNS)
        stage("sync", SYNC_COLUMNS)
        self.events = {
            name: sql.SQL("INSERT INTO {s}.{t} ({cols}) SELECT {cols} FROM pg_temp.{st} "
                          "ON CONFLICT DO NOTHING").format(
                s=s, t=sql.Identifier(target), cols=_columns(cols), st=sql.Identifier(f"_stage_{name}"))
            for name, target, cols in (("identity", "identity_events", IDENTITY_COLUMNS),
                                       ("account", "account_events", ACCOUNT_COLUMNS),
                                       ("sync", "sync_events", SYNC_COLUMNS))}

        self.actors = sql.SQL(
            "INSERT INTO {s}.actors (did) SELECT d FROM unnest(%b::text[]) AS d ORDER BY d "
            "ON CONFLICT DO NOTHING").format(s=s)
        self.actor_updates = sql.SQL(
            "INSERT INTO {s}.actors AS a (did, handle, handle_time_us, active, status, status_time_us) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::boolean[], %s::text[], %s::bigint[]) "
            "AS u(did, handle, handle_time_us, active, status, status_time_us) ORDER BY did "
            "ON CONFLICT (did) DO UPDATE SET "
            "handle = CASE WHEN EXCLUDED.handle_time_us > coalesce(a.handle_time_us, -1) "
            "THEN EXCLUDED.handle ELSE a.handle END, "
            "handle_time_us = greatest(a.handle_time_us, EXCLUDED.handle_time_us), "
            "active = CASE WHEN EXCLUDED.status_time_us > coalesce(a.status_time_us, -1) "
            "THEN EXCLUDED.active ELSE a.active END, "
            "status = CASE WHEN EXCLUDED.status_time_us > coalesce(a.status_time_us, -1) "
            "THEN EXCLUDED.status ELSE a.status END, "
            "status_time_us = greatest(a.status_time_us, EXCLUDED.status_time_us) "
            "WHERE EXCLUDED.handle_time_us > coalesce(a.handle_time_us, -1) "
            "OR EXCLUDED.status_time_us > coalesce(a.status_time_us, -1)").format(s=s)
        self.removals = sql.SQL(
            "UPDATE {s}.actors AS a SET removed_time_us = r.t_us "
            "FROM unnest(%s::text[], %s::bigint[]) AS r(did, t_us) "
            "WHERE a.did = r.did AND (a.removed_time_us IS NULL OR a.removed_time_us < r.t_us)").format(s=s)
        self.offsets = sql.SQL(
            "INSERT INTO {s}.kafka_offsets AS o (group_id, topic, partition, next_offset, cluster_id, topic_id) "
            "SELECT %s, u.topic, u.partition, u.next_offset, u.cluster_id, u.topic_id "
            "FROM unnest(%s::text[], %s::int[], %s::bigint[], %s::text[], %s::text[]) "
            "AS u(topic, partition, next_offset, cluster_id, topic_id) "
            "ORDER BY u.topic, u.partition "
            "ON CONFLICT (group_id, topic, partition) DO UPDATE SET "
            # an offset of another origin replaces the row; within one origin offsets only grow
            "next_offset = CASE WHEN (EXCLUDED.cluster_id IS NOT NULL AND o.cluster_id IS DISTINCT FROM "
            "EXCLUDED.cluster_id) OR (EXCLUDED.topic_id IS NOT NULL AND o.topic_id IS DISTINCT FROM "
            "EXCLUDED.topic_id) THEN EXCLUDED.next_offset ELSE greatest(o.next_offset, EXCLUDED.next_offset) END, "
            "cluster_id = coalesce(EXCLUDED.cluster_id, o.cluster_id), "
            "topic_id = coalesce(EXCLUDED.topic_id, o.topic_id), updated_at = now()").format(s=s)
        self.load_offsets = sql.SQL(
            "SELECT topic, partition, next_offset, cluster_id, topic_id FROM {s}.kafka_offsets "
            "WHERE group_id = %s").format(s=s)
        self.forget_offsets = sql.SQL(
            "DELETE FROM {s}.kafka_offsets AS o USING unnest(%s::text[], %s::int[]) AS u(topic, partition) "
            "WHERE o.group_id = %s AND o.topic = u.topic AND o.partition = u.partition").format(s=s)
        # Each partition's newest job position, then the job's firehose_cursor as the low
        # watermark over its partitions: resuming a source from it skips nothing that a lagging
        # partition (or replica) has not committed. It may move back when a partition delivers its
        # first event of the job. A replica reading the other partitions' rows before their
        # concurrent commits computes a lower value, never a higher one.
        self.partitions = sql.SQL(
            "INSERT INTO {s}.job_partitions AS j (service, topic, partition, cursor, last_event_time) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::bigint[], %s::timestamp[]) "
            "AS u(service, topic, partition, cursor, t) ORDER BY 1, 2, 3 "
            "ON CONFLICT (service, topic, partition) DO UPDATE SET cursor = EXCLUDED.cursor, "
            "last_event_time = EXCLUDED.last_event_time, updated_at = now() "
            "WHERE j.cursor < EXCLUDED.cursor").format(s=s)
        # A job's low watermark (firehose_cursor) is the minimum over its partitions' rows, which
        # other replicas' transactions update at the same time: each transaction takes this lock
        # before it writes its partitions' positions, so the minimum it computes sees every committed
        # position (else of two replicas committing together the later would store a minimum without
        # the earlier's position). It is held from there to the commit: the batches' rows are written
        # concurrently, only their last statements and commits in turn.
        self.lock_progress = sql.SQL("SELECT pg_advisory_xact_lock({c}, {k})").format(
            c=sql.Literal(PROGRESS_LOCK_CLASS), k=sql.Literal(lock_key(schema)))
        self.cursor = sql.SQL(
            "INSERT INTO {s}.firehose_cursor AS f (service, cursor, last_event_time, updated_at) "
            "SELECT j.service, min(j.cursor)::text, (array_agg(j.last_event_time ORDER BY j.cursor))[1], "
            "now() AT TIME ZONE 'UTC' FROM {s}.job_partitions AS j WHERE j.service = ANY(%s::text[]) "
            "GROUP BY j.service ORDER BY j.service "
            "ON CONFLICT (service) DO UPDATE SET cursor = EXCLUDED.cursor, "
            "last_event_time = EXCLUDED.last_event_time, updated_at = EXCLUDED.updated_at").format(s=s)

    @staticmethod
    def _upsert(s: sql.Identifier, table: Table, st: sql.Identifier, purge: bool) -> sql.Composed:
        cols = table.column_names
        key = table.key
        if table.collection is not None:
            coll: sql.Composable = sql.Literal(table.collection)
        else:
            coll = sql.SQL("x.collection")
        guards: list[sql.Composable] = [sql.SQL(
            "NOT EXISTS (SELECT 1 FROM {s}.tombstones AS tb WHERE tb.did = x.did AND tb.collection = {coll} "
            "AND tb.rkey = x.rkey AND tb.rev >= x.rev)").format(s=s, coll=coll)]
        if purge:
            guards.append(sql.SQL(
                "NOT EXISTS (SELECT 1 FROM unnest(%s::text[], %s::bigint[]) AS r(did, t_us) "
                "WHERE r.did = x.did AND r.t_us >= x.asof_us)"))
        updates = sql.SQL(", ").join(
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in cols if c not in key)
        return sql.SQL(
            "INSERT INTO {s}.{t} AS t ({cols}) SELECT {xcols} FROM pg_temp.{st} AS x WHERE {guards} "
            "ON CONFLICT ({key}) DO UPDATE SET {updates}, deleted = false, updated_at = now() "
            # runtime.contract.order rule 1; of two writes of one rev (a commit, a snapshot row) the
            # later-observed one, whose as-of time a removal is compared with (rule 4)
            "WHERE t.rev < EXCLUDED.rev OR (t.rev = EXCLUDED.rev AND NOT t.deleted "
            "AND coalesce(t.asof_us, t.time_us) < EXCLUDED.asof_us)").format(
                s=s, t=sql.Identifier(table.name), cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
                xcols=sql.SQL(", ").join(
                    sql.SQL("{}::jsonb").format(sql.Identifier("x", c)) if t == "jsonb" else sql.Identifier("x", c)
                    for c, t in table.columns), st=st,
                guards=sql.SQL(" AND ").join(guards), key=sql.SQL(", ").join(map(sql.Identifier, key)),
                updates=updates)


@dataclass
class WriteResult:
    """Rows affected per table by one transaction, and how many staged rows were stale no-ops."""

    rows: dict[str, int] = field(default_factory=dict)
    stale: int = 0

    @property
    def total(self) -> int:
        """Rows inserted, updated or deleted in every table."""
        return sum(self.rows.values())


@dataclass
class Prepared:
    """A batch formatted for the database on the consumer thread: COPY data and statement parameters.

    The writer then only sends bytes and statements, so it needs the GIL very little and overlaps
    with the consumer's decoding.
    """

    copies: dict[str, bytes] = field(default_factory=dict)
    staged: dict[str, int] = field(default_factory=dict)
    delete_tables: list[str] = field(default_factory=list)
    actors: list[str] = field(default_factory=list)
    actor_updates: tuple[list[Any], ...] | None = None
    removals: tuple[list[str], list[int]] | None = None
    #: Purge mode: the DIDs whose rows the batch writes or purges, sorted (their removal times
    #: guard the upserts), and the advisory locks taken first (keys, exclusive; see
    #: Statements.lock_dids), None when it has no such DID.
    locked: list[str] = field(default_factory=list)
    lock_keys: tuple[list[int], list[bool]] | None = None
    #: (services, topics, partitions, cursors, event times) of the partitions' newest positions.
    progress: tuple[list[str], list[str], list[int], list[int], list[datetime]] | None = None
    changes: int = 0
    superseded: int = 0
    event_times: list[int] = field(default_factory=list)
    outcomes: dict[Outcome, int] = field(default_factory=dict)


def prepare(batch: Batch, cursor: psycopg.Cursor[Any], statements: Statements) -> Prepared:
    """Format ``batch`` (binary COPY rows through psycopg's adapters, sorted parameter arrays).

    Args:
        cursor: any cursor; only its adaptation context is used (no I/O happens on it).
        statements: the stage column types.

    Raises:
        psycopg.DataError: a value psycopg cannot adapt (a bug: rows are validated when added).
    """
    out = Prepared(changes=len(batch), superseded=batch.superseded, event_times=batch.event_times,
                   outcomes=batch.outcomes)

    def copy(name: str, rows: Iterable[tuple[Any, ...]]) -> None:
        buf = io.BytesIO()
        n = 0
        with psycopg.Copy(cursor, writer=FileWriter(buf), binary=True) as cp:
            cp.set_types(statements.copy_types[name])
            for row in rows:
                cp.write_row(row)
                n += 1
        out.copies[name] = buf.getvalue()
        out.staged[name] = n

    deletes = batch.deletes()
    if deletes:
        copy("deletes", deletes)
        out.delete_tables = sorted(batch.delete_tables())
    for name, rows in batch.upserts().items():
        copy(name, rows)
    if batch.identities:
        copy("identity", batch.identities.values())
    if batch.accounts:
        copy("account", batch.accounts.values())
    if batch.syncs:
        copy("sync", batch.syncs.values())
    out.actors = sorted(batch.actors)
    if statements.purge_mode:
        out.locked = sorted({did for did, _, _ in batch.changes} | set(batch.removals))
        if out.locked:
            out.lock_keys = purge_lock_keys(statements.lock_base, out.locked, batch.removals)
    if batch.actor_updates:
        dids = sorted(batch.actor_updates)
        ups = [batch.actor_updates[d] for d in dids]
        out.actor_updates = (dids, [u.handle for u in ups], [u.handle_time_us for u in ups],
                             [u.active for u in ups], [u.status for u in ups], [u.status_time_us for u in ups])
    if batch.removals:
        dids = sorted(batch.removals)
        out.removals = (dids, [batch.removals[d] for d in dids])
    if batch.progress:
        keys = sorted(batch.progress)
        out.progress = ([k[0][:255] for k in keys], [k[1] for k in keys], [k[2] for k in keys],
                        [batch.progress[k][0] for k in keys], [naive_utc(batch.progress[k][1]) for k in keys])
    return out


class Writer:
    """Owns one database connection and writes prepared batches in single transactions.

    Args:
        settings: the sink settings.
        statements: the SQL.
        connect: ``psycopg.connect``-compatible factory (tests inject failures through it).
    """

    def __init__(self, settings: PostgresSettings, statements: Statements,
                 connect: Callable[..., psycopg.Connection[Any]] = psycopg.connect) -> None:
        self.settings = settings
        self.sql = statements
        self._connect = connect
        self._conn: psycopg.Connection[Any] | None = None
        self.known_actors = KnownActors(KNOWN_ACTORS_GENERATION)

    def connection(self) -> psycopg.Connection[Any]:
        """The open connection (reconnecting and re-creating the staging tables when needed).

        Raises:
            SinkUnavailableError: the database cannot be reached.
        """
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.reset()
        try:
            conn = self._connect(self.settings.database_url.get(), autocommit=True,
                                 connect_timeout=max(1, int(self.settings.connect_timeout)),
                                 application_name="atproto-backfill-postgres")
            for ddl in self.sql.stage_ddl:
                conn.execute(ddl)
        except psycopg.Error as e:
            raise SinkUnavailableError(f"cannot connect to PostgreSQL: {type(e).__name__}: {e}") from e
        self._conn = conn
        return conn

    def reset(self) -> None:
        """Drop the connection (the next write reconnects)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error as e:  # closing a broken connection may fail again
                log.debug("closing a broken connection: %s", e)

    def write(self, prepared: Prepared, group: str, offsets: dict[TP, StoredOffset]) -> WriteResult:
        """Write ``prepared`` and ``offsets`` in one transaction.

        Raises:
            SinkUnavailableError: a transient failure (nothing was committed; retry).
            CommitError: any other database failure.
        """
        conn = self.connection()
        known = self.known_actors
        new_actors = known.unknown(prepared.actors)
        try:
            with conn.transaction():
                result = self._write(conn, prepared, group, offsets, new_actors)
        except psycopg.Error as e:
            if transient(e):
                if conn.closed or conn.broken:
                    self.reset()
                raise SinkUnavailableError(f"PostgreSQL: {type(e).__name__}: {e}") from e
            raise CommitError(f"PostgreSQL refused a batch: {type(e).__name__}: {e}") from e
        known.add(prepared.actors)
        return result

    def _copy(self, cur: psycopg.Cursor[Any], name: str, data: bytes) -> None:
        with cur.copy(self.sql.copy[name]) as copy:
            copy.write(data)

    def _write(self, conn: psycopg.Connection[Any], p: Prepared, group: str, offsets: dict[TP, StoredOffset],
               new_actors: list[str]) -> WriteResult:
        st = self.sql
        result = WriteResult()
        rows = result.rows
        cur = conn.cursor()
        if p.lock_keys is not None:
            cur.execute(st.lock_dids, p.lock_keys)  # before any other lock (see Statements.lock_dids)
        if new_actors:
            cur.execute(st.actors, (new_actors,))
            rows["actors"] = max(0, cur.rowcount)
        upsert, guard = st.upsert_unguarded, None
        if p.locked:
            cur.execute(st.removal_times, (p.locked,))
            removed: dict[str, int] = dict(cur.fetchall())
            if p.removals is not None:
                for did, t_us in zip(*p.removals, strict=True):
                    removed[did] = max(t_us, removed.get(did, t_us))
            if removed:
                dids = sorted(removed)
                upsert, guard = st.upsert, (dids, [removed[d] for d in dids])
        if p.actor_updates is not None:
            cur.execute(st.actor_updates, p.actor_updates)
        if p.removals is not None:
            cur.execute(st.removals, p.removals)
            for table in RECORD_TABLES:
                cur.execute(st.purge[table.name], p.removals)
                if cur.rowcount > 0:
                    rows[table.name] = rows.get(table.name, 0) + cur.rowcount
        if "deletes" in p.copies:
            self._copy(cur, "deletes", p.copies["deletes"])
            cur.execute(st.tombstones)
            rows["tombstones"] = max(0, cur.rowcount)
            for name in p.delete_tables:
                cur.execute(st.delete[name])
                rows[name] = rows.get(name, 0) + max(0, cur.rowcount)
        for table in RECORD_TABLES:
            data = p.copies.get(table.name)
            if data is None:
                continue
            self._copy(cur, table.name, data)
            cur.execute(upsert[table.name], guard)
            written = max(0, cur.rowcount)
            rows[table.name] = rows.get(table.name, 0) + written
            result.stale += p.staged[table.name] - written
        for name in ("identity", "account", "sync"):
            data = p.copies.get(name)
            if data is not None:
                self._copy(cur, name, data)
                cur.execute(st.events[name])
                rows[f"{name}_events"] = max(0, cur.rowcount)
        if offsets:
            tps = sorted(offsets)
            cur.execute(st.offsets, (group, [t for t, _ in tps], [p for _, p in tps],
                                     [offsets[tp].offset for tp in tps], [offsets[tp].origin.cluster_id for tp in tps],
                                     [offsets[tp].origin.topic_id for tp in tps]))
        if p.progress is not None:
            cur.execute(st.lock_progress)  # see Statements.lock_progress
            cur.execute(st.partitions, p.progress)
            cur.execute(st.cursor, (sorted(set(p.progress[0])),))
        return result

    def close(self) -> None:
        """Close the connection."""
        self.reset()


class PostgresSink:
    """The consumer-group sink into PostgreSQL (implements :class:`consumers.base.Sink`).

    Args:
        settings: where and how to write.
        metrics: counters (created_at outcomes, skipped, rows written, retries).
        connect: connection factory (``psycopg.connect``; tests inject failures).
        retry_wait: tenacity wait strategy for background and offset-loading retries.
        on_commit: called (on the writer thread) after every committed batch.
        migrate_schema: create/upgrade the schema on start (every replica may; it is locked).
        wall: unix seconds (the commit time given to ``on_commit``).
        clock: monotonic seconds (the start wait's deadline).
        sleep: waits the given seconds between connection attempts at start; returns True when the
            process was told to stop meanwhile (default: ``stop.wait``).
        stop: set by SIGTERM/SIGINT; ends the start wait.

    Raises:
        DatabaseUnreachableError: the database stayed unreachable through the start wait
            (``connect_wait``).
        SinkUnavailableError: it failed through the retries of the schema migration.
        StartStoppedError: ``stop`` was set during the start wait.
        ConfigError: the database is not UTF8, or was migrated by a newer version of this tool.
    """

    name = SINK

    def __init__(self, settings: PostgresSettings, metrics: Metrics, *,
                 connect: Callable[..., psycopg.Connection[Any]] = psycopg.connect,
                 retry_wait: wait_base | None = None,
                 on_commit: Callable[[Committed], None] | None = None,
                 migrate_schema: bool = True,
                 wall: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], bool] | None = None,
                 stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._connect = connect
        self._wait = retry_wait if retry_wait is not None else wait_exponential_jitter(multiplier=0.2, max=10)
        self._on_commit = on_commit
        self._wall = wall
        self._clock = clock
        self._sleep = sleep if sleep is not None else (stop or threading.Event()).wait
        opts = settings.transform
        self.sql = Statements(settings.db_schema, flag_deletes=settings.deletes == "flag",
                              purge=opts.purges)
        self._control: psycopg.Connection[Any] | None = None
        try:
            self._wait_for_database()
            if migrate_schema:
                self._with_control(self._migrate)
            # Formatting COPY rows needs only a cursor's adaptation context, never its connection.
            self._fmt_cursor: psycopg.Cursor[Any] = self._with_control(lambda conn: conn.cursor())
        except BaseException:
            self._close_control()
            raise
        self._writer = Writer(settings, self.sql, connect)
        self._batch = Batch()
        self._prepared: Prepared | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: list[Future[WriteResult]] = []
        # Set once a background batch failed for good: later batches must not store offsets past it.
        self._failed: BaseException | None = None
        self.rows_written = 0
        self._outcomes = {o: metrics.created_at_outcomes.child(SINK, o.value) for o in Outcome}
        self._skipped_range = metrics.consumer_skipped.child(SINK, "out_of_range_timestamp")
        self._skipped_stale = metrics.consumer_skipped.child(SINK, "stale_rev")
        self._retries = metrics.db_retries.child(SINK)
        log.info("PostgreSQL sink on %s schema %s (deletes: %s, account removal: %s, resync: %s, max concurrent %d)",
                 describe_dsn(settings.database_url.get()), settings.db_schema, settings.deletes,
                 ",".join(sorted(opts.removal_statuses)) or "keep", "purge" if opts.resync_purge else "keep",
                 settings.max_concurrent)

    # ------------------------------------------------------------------ control connection

    def _control_conn(self) -> psycopg.Connection[Any]:
        conn = self._control
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        try:
            conn = self._connect(self.settings.database_url.get(), autocommit=True,
                                 connect_timeout=max(1, int(self.settings.connect_timeout)),
                                 application_name="atproto-backfill-postgres-control")
        except psycopg.Error as e:
            raise SinkUnavailableError(f"cannot connect to PostgreSQL: {type(e).__name__}: {e}") from e
        self._control = conn
        return conn

    def _wait_for_database(self) -> None:
        """Open the control connection, waiting up to ``connect_wait`` seconds with backoff.

        One line says the database is unreachable and for how long it is waited for; one more that
        it answered. Neither names more than user@host:port/dbname (never the password).

        Raises:
            DatabaseUnreachableError: still unreachable when the wait ran out.
            StartStoppedError: told to stop meanwhile.
        """
        secret = self.settings.database_url
        where = describe_dsn(secret.get())
        wait = self.settings.connect_wait
        started = self._clock()
        deadline = started + wait
        delay = START_BACKOFF_FIRST
        waiting = False
        while True:
            try:
                self._control_conn()
            except SinkUnavailableError as e:
                reason = describe_error(e.__cause__ or e, secret)
                left = deadline - self._clock()
                if left <= 0:
                    if wait <= 0:
                        raise DatabaseUnreachableError(f"PostgreSQL at {where} is unreachable ({reason}); not "
                                                       f"waiting for it (--db-wait 0)") from e
                    raise DatabaseUnreachableError(
                        f"PostgreSQL at {where} is still unreachable after waiting {wait:g} s ({reason}); "
                        f"giving up (--db-wait / BACKFILL_DB_WAIT)") from e
                if not waiting:
                    waiting = True
                    log.warning("PostgreSQL at %s is unreachable (%s); waiting up to %g s for it "
                                "(--db-wait / BACKFILL_DB_WAIT)", where, reason, wait)
                else:
                    log.debug("PostgreSQL at %s still unreachable: %s", where, reason)
                if self._sleep(min(delay, left)):
                    raise StartStoppedError(f"stopped while waiting for PostgreSQL at {where}") from e
                delay = min(delay * 2, START_BACKOFF_MAX)
                continue
            if waiting:
                log.info("PostgreSQL at %s reachable after %.1f s", where, self._clock() - started)
            return

    def _with_control(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run ``fn`` on the control connection, retrying transient failures."""
        for attempt in Retrying(retry=retry_if_exception_type(SinkUnavailableError), wait=self._wait,
                                stop=stop_after_attempt(self.settings.retries), reraise=True):
            with attempt:
                conn = self._control_conn()
                try:
                    return fn(conn)
                except psycopg.Error as e:
                    if transient(e):
                        self._retries.inc()
                        self._close_control()
                        raise SinkUnavailableError(f"PostgreSQL: {type(e).__name__}: {e}") from e
                    raise CommitError(f"PostgreSQL: {type(e).__name__}: {e}") from e
        raise AssertionError("unreachable: tenacity reraises")

    def _close_control(self) -> None:
        conn, self._control = self._control, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error as e:
                log.debug("closing the control connection: %s", e)

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        encoding = conn.execute("SHOW server_encoding").fetchone()
        if encoding is None or str(encoding[0]).upper() not in ("UTF8", "UTF-8"):
            raise ConfigError(f"the database encoding is {encoding[0] if encoding else '?'}; UTF8 is required")
        migrate(conn, self.settings.db_schema)

    # ------------------------------------------------------------------ Sink protocol

    def load_offsets(self, group: str, partitions: list[TP]) -> dict[TP, StoredOffset]:
        """The stored next offset of each partition, with its origin (after this process's own
        batches committed)."""
        self._drain()
        wanted = set(partitions)

        def load(conn: psycopg.Connection[Any]) -> dict[TP, StoredOffset]:
            out: dict[TP, StoredOffset] = {}
            for topic, partition, nxt, cluster_id, topic_id in conn.execute(self.sql.load_offsets, (group,)):
                if (topic, partition) in wanted:
                    out[(topic, partition)] = StoredOffset(int(nxt), Origin(cluster_id, topic_id))
            return out

        result: dict[TP, StoredOffset] = self._with_control(load)
        return result

    def forget_offsets(self, group: str, partitions: list[TP]) -> None:
        """Delete the stored offsets of ``partitions`` (see :class:`~consumers.base.Sink`)."""
        self._drain()
        tps = sorted(partitions)
        self._with_control(lambda conn: conn.execute(
            self.sql.forget_offsets, ([t for t, _ in tps], [p for _, p in tps], group)))

    def add(self, item: Consumed) -> None:
        """Transform one message into the current batch.

        Raises:
            DropError: the record cannot be stored (dead-lettered by the caller).
        """
        add_event(self._batch, item.event, self.settings.transform, item.datum, item.schema)
        self._batch.note_partition(item.topic, item.partition)

    def flush(self, group: str, offsets: dict[TP, int], origins: Mapping[str, Origin] | None = None) -> int:
        """Write the batch and ``offsets`` in one transaction; return the changes written or submitted.

        ``origins``: per topic, the cluster and topic ids the offsets count (stored with them).

        Raises:
            SinkUnavailableError: (synchronous mode) transient failure; the batch is kept for the retry.
            CommitError: a database failure that retrying does not fix, or background retries ran out.
        """
        if self._failed is not None:
            raise CommitError("a background batch failed; stopping") from self._failed
        stamped = {tp: StoredOffset(o, (origins or {}).get(tp[0], UNKNOWN)) for tp, o in offsets.items()}
        if self.settings.max_concurrent == 1:
            # Kept across a SinkUnavailableError: GroupConsumer retries with the same batch.
            prepared = self._prepared
            if prepared is None:
                prepared = self._prepared = self._prepare()
            result = self._writer.write(prepared, group, stamped)
            self._batch = Batch()
            self._prepared = None
            self._committed(prepared, result)
            return result.total
        prepared = self._prepare()
        self._batch = Batch()
        self._wait_capacity(self.settings.max_concurrent - 1)
        pool = self._pool
        if pool is None:
            # The writer must get the GIL back promptly whenever the database answers, or every
            # round trip waits out the consumer thread's switch interval (5 ms by default).
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
            pool = self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-writer")
        self._inflight.append(pool.submit(self._write_retrying, prepared, group, stamped))
        return prepared.changes

    def discard(self) -> None:
        """Forget the rows not yet submitted (their offsets were not stored)."""
        self._batch = Batch()
        self._prepared = None

    def close(self) -> None:
        """Wait for background batches, then close the connections.

        Raises:
            CommitError: a background batch could not be written (its offsets were not stored).
        """
        try:
            self._drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._writer.close()
            self._close_control()

    # ------------------------------------------------------------------ internals

    def _prepare(self) -> Prepared:
        batch = self._batch
        for outcome, n in batch.outcomes.items():
            self._outcomes[outcome].inc(n)
            if outcome is Outcome.DROPPED:
                self._skipped_range.inc(n)
        batch.outcomes = {}
        try:
            return prepare(batch, self._fmt_cursor, self.sql)
        except psycopg.Error as e:  # values are validated when added: this is our bug, stop loudly
            raise CommitError(f"cannot format a batch for COPY: {type(e).__name__}: {e}") from e

    def _committed(self, batch: Prepared, result: WriteResult) -> None:
        self.rows_written += result.total
        for table, n in result.rows.items():
            if n:
                self.metrics.rows_written.labels(SINK, table).inc(n)
        stale = result.stale + batch.superseded
        if stale:
            self._skipped_stale.inc(stale)
        if self._on_commit is not None:
            self._on_commit(Committed(batch.changes, result.total, batch.event_times, self._wall()))

    def _write_retrying(self, batch: Prepared, group: str, offsets: dict[TP, StoredOffset]) -> WriteResult:
        if self._failed is not None:
            raise CommitError("an earlier batch failed; not writing later ones") from self._failed
        try:
            return self._write_with_retries(batch, group, offsets)
        except BaseException as e:
            self._failed = e
            raise

    def _write_with_retries(self, batch: Prepared, group: str, offsets: dict[TP, StoredOffset]) -> WriteResult:
        logged = False
        for attempt in Retrying(retry=retry_if_exception_type(SinkUnavailableError), wait=self._wait,
                                stop=stop_after_attempt(self.settings.retries), reraise=True):
            with attempt:
                try:
                    result = self._writer.write(batch, group, offsets)
                except SinkUnavailableError as e:
                    self._retries.inc()
                    if not logged:
                        log.warning("PostgreSQL unavailable, retrying the batch: %s", e)
                        logged = True
                    raise
        if logged:
            log.info("PostgreSQL reachable again; batch written")
        self._committed(batch, result)
        return result

    def _wait_capacity(self, limit: int) -> None:
        while len(self._inflight) >= max(1, limit):
            oldest = self._inflight.pop(0)
            self._result(oldest)

    @staticmethod
    def _result(future: Future[WriteResult]) -> None:
        try:
            future.result()
        except SinkUnavailableError as e:
            raise CommitError(f"a batch could not be written after retrying: {e}") from e

    def _drain(self) -> None:
        """Wait for every background batch.

        Raises:
            CommitError: one of them failed (it and every later one stored no offsets).
        """
        while self._inflight:
            self._result(self._inflight.pop(0))

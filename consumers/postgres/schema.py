"""The PostgreSQL schema and its versioned migrations, safe to run from several replicas at once.

:func:`migrate` takes a transaction-scoped advisory lock (one per database schema), creates the
``schema_migrations`` table, applies the migrations it has not recorded yet, records them, and
commits: a second replica starting at the same moment waits on the lock and then finds nothing to
do. A database already migrated by a newer version of this tool is refused, so an old replica never
writes into tables it does not know.

Migrations are literal SQL, frozen once released; a change is a new migration. ``{s}`` is replaced
by the quoted schema name. The ``firehose_cursor`` table is exactly seed 004's DDL.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg import sql

from runtime.errors import ConfigError

log = logging.getLogger(__name__)

#: First key of the advisory lock (ASCII "atbp"); the second is a hash of the schema name.
LOCK_CLASS: Final = 0x61746270


@dataclass(frozen=True)
class Migration:
    """One schema version: its number, a name, and the statements that reach it."""

    version: int
    name: str
    statements: tuple[str, ...]


_RECORD_ENVELOPE: Final = """
    rev TEXT NOT NULL,
    cid TEXT,
    record JSONB NOT NULL,
    created_at TIMESTAMPTZ,
    source TEXT NOT NULL,
    cursor BIGINT NOT NULL,
    time_us BIGINT NOT NULL,
    job TEXT NOT NULL,"""

_RECORD_TAIL: Final = """
    deleted BOOLEAN NOT NULL DEFAULT false,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),"""


def _record_table(name: str, typed: str) -> str:
    return (f"CREATE TABLE {{s}}.{name} (\n    did TEXT NOT NULL REFERENCES {{s}}.actors (did),\n"
            f"    rkey TEXT NOT NULL,{_RECORD_ENVELOPE}{typed}{_RECORD_TAIL}\n    PRIMARY KEY (did, rkey)\n)")


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "typed tables, actors, tombstones, event logs, offsets, firehose_cursor", (
        """CREATE TABLE {s}.actors (
    did TEXT PRIMARY KEY,
    handle TEXT,
    handle_time_us BIGINT,
    active BOOLEAN,
    status TEXT,
    status_time_us BIGINT,
    removed_time_us BIGINT,
    first_seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
)""",
        _record_table("posts", """
    record_type TEXT NOT NULL,
    text TEXT,
    langs TEXT[] NOT NULL DEFAULT '{{}}',
    reply_root_uri TEXT,
    reply_root_cid TEXT,
    reply_parent_uri TEXT,
    reply_parent_cid TEXT,
    quote_uri TEXT,
    quote_cid TEXT,
    embed_kind TEXT,"""),
        _record_table("likes", """
    subject_uri TEXT,
    subject_cid TEXT,
    subject_did TEXT,
    via_uri TEXT,"""),
        _record_table("reposts", """
    subject_uri TEXT,
    subject_cid TEXT,
    subject_did TEXT,
    via_uri TEXT,"""),
        _record_table("follows", """
    subject_did TEXT,"""),
        _record_table("blocks", """
    subject_did TEXT,"""),
        _record_table("profiles", """
    display_name TEXT,
    description TEXT,
    avatar_cid TEXT,
    banner_cid TEXT,
    pinned_post_uri TEXT,"""),
        """CREATE TABLE {s}.records (
    did TEXT NOT NULL REFERENCES {s}.actors (did),
    collection TEXT NOT NULL,
    rkey TEXT NOT NULL,""" + _RECORD_ENVELOPE + _RECORD_TAIL + """
    PRIMARY KEY (did, collection, rkey)
)""",
        """CREATE TABLE {s}.tombstones (
    did TEXT NOT NULL,
    collection TEXT NOT NULL,
    rkey TEXT NOT NULL,
    rev TEXT NOT NULL,
    source TEXT NOT NULL,
    cursor BIGINT NOT NULL,
    time_us BIGINT NOT NULL,
    job TEXT NOT NULL,
    deleted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (did, collection, rkey)
)""",
        """CREATE TABLE {s}.identity_events (
    did TEXT NOT NULL,
    source TEXT NOT NULL,
    cursor BIGINT NOT NULL,
    time_us BIGINT NOT NULL,
    seq BIGINT,
    time TEXT,
    handle TEXT,
    job TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (did, source, cursor, time_us)
)""",
        """CREATE TABLE {s}.account_events (
    did TEXT NOT NULL,
    source TEXT NOT NULL,
    cursor BIGINT NOT NULL,
    time_us BIGINT NOT NULL,
    seq BIGINT,
    time TEXT,
    active BOOLEAN NOT NULL,
    status TEXT,
    job TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (did, source, cursor, time_us)
)""",
        """CREATE TABLE {s}.kafka_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
)""",
        # Seed 004's table, verbatim (it may already exist when shared with the AppView).
        """CREATE TABLE IF NOT EXISTS {s}.firehose_cursor (
    id SERIAL PRIMARY KEY,
    service VARCHAR(255) NOT NULL UNIQUE,
    cursor TEXT,
    last_event_time TIMESTAMP,
    updated_at TIMESTAMP DEFAULT NOW() NOT NULL
)""",
    )),
    Migration(2, "kafka_offsets: the cluster and topic ids each offset was taken from", (
        "ALTER TABLE {s}.kafka_offsets ADD COLUMN cluster_id TEXT, ADD COLUMN topic_id TEXT",
    )),
    Migration(3, "record as-of times (the ordering rule); per-partition job positions (low watermark)", (
        *(f"ALTER TABLE {{s}}.{t} ADD COLUMN asof_us BIGINT"
          for t in ("posts", "likes", "reposts", "follows", "blocks", "profiles", "records")),
        """CREATE TABLE {s}.job_partitions (
    service VARCHAR(255) NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    cursor BIGINT NOT NULL,
    last_event_time TIMESTAMP,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (service, topic, partition)
)""",
    )),
    Migration(4, "repository replacements (Jetstream v2 #sync): the sync_events log", (
        """CREATE TABLE {s}.sync_events (
    did TEXT NOT NULL,
    source TEXT NOT NULL,
    cursor BIGINT NOT NULL,
    time_us BIGINT NOT NULL,
    seq BIGINT,
    time TEXT,
    rev TEXT NOT NULL,
    job TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (did, source, cursor, time_us)
)""",
    )),
    # Purge mode reads the removal times of each batch's DIDs (thousands) among the removed actors
    # only: with a million actors and no such index the lookup was a parallel scan of the table,
    # 44 ms a batch; with it, 4 ms.
    Migration(5, "a partial index of the removed actors (purge mode's removal-time lookup)", (
        "CREATE INDEX IF NOT EXISTS actors_removed ON {s}.actors (did) WHERE removed_time_us IS NOT NULL",
    )),
)

#: The schema version this code writes.
CURRENT_VERSION: Final = MIGRATIONS[-1].version


def lock_key(schema: str) -> int:
    """The second advisory-lock key for ``schema`` (a signed 32-bit hash of its name)."""
    value = zlib.crc32(schema.encode())
    return value - 2**32 if value >= 2**31 else value


def migrate(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> list[int]:
    """Bring ``schema`` to :data:`CURRENT_VERSION` in one transaction; return the versions applied.

    ``conn`` must be in autocommit mode (the function opens and commits its own transaction).

    Raises:
        ConfigError: the database was migrated by a newer version of this tool.
        psycopg.Error: the database refused a statement.
    """
    s = sql.Identifier(schema)
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, lock_key(schema)))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())").format(s))
        done = {int(str(row[0])) for row in conn.execute(
            sql.SQL("SELECT version FROM {}.schema_migrations").format(s))}
        newest = max(done, default=0)
        if newest > CURRENT_VERSION:
            raise ConfigError(f"database schema {schema!r} is at version {newest}, newer than this tool's "
                              f"{CURRENT_VERSION}; upgrade atproto-backfill")
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            for statement in migration.statements:
                conn.execute(sql.SQL(statement).format(s=s))
            conn.execute(sql.SQL("INSERT INTO {}.schema_migrations (version, name) VALUES (%s, %s)").format(s),
                         (migration.version, migration.name))
            applied.append(migration.version)
    if applied:
        log.info("schema %s migrated to version %d (applied %s)", schema, CURRENT_VERSION, applied)
    return applied

"""``backfill consume postgres``: a consumer group from the typed topics into PostgreSQL tables.

Options are flags bound to environment variables (``DATABASE_URL``, ``BACKFILL_BATCH_SIZE``,
``BACKFILL_BATCH_DELAY_MS``, ``BACKFILL_MAX_CONCURRENT``, ``BACKFILL_MAX_MEMORY_MB``, ...); the
shared consumer options (collections, group, stop conditions) come from :mod:`consumers.cli`.
"""

from __future__ import annotations

import argparse
import logging
import threading
from typing import Final

from consumers.base import group_name
from consumers.cli import add_consumer_arguments, consumer_settings, run_consumer
from consumers.options import account_removal_options, removal_statuses, resync_purge
from consumers.postgres.rows import TransformOptions
from consumers.postgres.sink import DatabaseUnreachableError, PostgresSettings, PostgresSink, StartStoppedError
from runtime.contract.created_at import OutOfRange, TimestampPolicy
from runtime.contract.timeparse import parse_timestamp
from runtime.errors import ConfigError, SinkUnavailableError
from runtime.process.metrics import Metrics
from runtime.process.options import Opt, Secret, add_options, parse_secret

log = logging.getLogger(__name__)

DEFAULT_BATCH: Final = 5000

POSTGRES_OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--database-url",), "database_url", "DATABASE_URL", None,
        "PostgreSQL connection URL (postgresql://user:password@host:5432/db); never logged",
        type=parse_secret, metavar="URL"),
    Opt(("--db-wait",), "db_wait", "BACKFILL_DB_WAIT", 60.0,
        "seconds to wait at start for an unreachable database, trying again with backoff, before "
        "exiting with status 1 (0 = exit at once)", type=float, metavar="SECONDS"),
    Opt(("--db-schema",), "db_schema", "BACKFILL_DB_SCHEMA", "public",
        "PostgreSQL schema of every table (created if missing)"),
    Opt(("--deletes",), "deletes", "BACKFILL_DELETES", "delete",
        "a deleted record's row is removed (delete) or kept with deleted = true (flag); either way a "
        "tombstone stops an older change from bringing it back", choices=("delete", "flag")),
    *account_removal_options(
        "what an account deletion/takedown event does to that account's rows: keep them (the event and "
        "the actor's status are recorded either way) or purge them (and skip older ones arriving later)",
        "what a repository replacement (Jetstream v2 #sync, followed by the repository's current records) does "
        "to the DID's rows written by older commits: purge them (and skip older ones arriving later), or keep "
        "them; the event is recorded in sync_events either way"),
    Opt(("--created-at-start",), "created_at_start", "BACKFILL_CREATED_AT_START", None,
        "seed 002's range: records whose createdAt is before this are out of range"),
    Opt(("--created-at-end",), "created_at_end", "BACKFILL_CREATED_AT_END", None,
        "seed 002's range: records whose createdAt is at or after this are out of range"),
    Opt(("--out-of-range",), "out_of_range", "BACKFILL_OUT_OF_RANGE", "keep",
        "records outside the createdAt range (or with an unparseable one): keep them, drop them, or "
        "standardize their created_at to the 1st/15th of the month", choices=("keep", "drop", "standardize")),
    Opt(("--migrate-only",), "migrate_only", "BACKFILL_MIGRATE_ONLY", False,
        "create or upgrade the schema, then exit", action="store_true"),
)


#: One line for ``backfill --help``.
HELP: Final = "consumer group into PostgreSQL tables"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill consume postgres``."""
    add_options(parser.add_argument_group("postgres"), POSTGRES_OPTIONS)
    add_consumer_arguments(parser)


def postgres_settings(ns: argparse.Namespace, max_concurrent: int) -> PostgresSettings:
    """Validate the PostgreSQL options.

    Raises:
        ConfigError: no database URL, or a malformed value.
    """
    url = ns.database_url
    if not isinstance(url, Secret) or not url.get():
        raise ConfigError("no database: set DATABASE_URL or --database-url")
    policy = TimestampPolicy(
        start=parse_timestamp(ns.created_at_start) if ns.created_at_start else None,
        end=parse_timestamp(ns.created_at_end) if ns.created_at_end else None,
        out_of_range=OutOfRange(ns.out_of_range))
    if ns.db_wait < 0:
        raise ConfigError("--db-wait must be >= 0 seconds")
    transform = TransformOptions(policy=policy, removal_statuses=removal_statuses(ns), resync_purge=resync_purge(ns))
    return PostgresSettings(database_url=url, db_schema=ns.db_schema, deletes=ns.deletes, transform=transform,
                            max_concurrent=max_concurrent, connect_wait=ns.db_wait)



def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill consume postgres``; returns the exit code."""
    settings = consumer_settings(ns, default_group=group_name("postgres", ns.db_schema),
                                 default_batch=DEFAULT_BATCH)
    pg = postgres_settings(ns, settings.max_concurrent)
    metrics = Metrics()
    # Set by SIGTERM/SIGINT (run_consumer's handlers): also ends a wait for the database at start.
    stop = threading.Event()
    try:
        if ns.migrate_only:
            PostgresSink(pg, metrics, stop=stop).close()
            log.info("schema %s is up to date", pg.db_schema)
            return 0
        run_consumer(settings, lambda: PostgresSink(pg, metrics, stop=stop), metrics=metrics, stop_event=stop)
    except StartStoppedError as e:
        log.info("%s", e)
        return 0
    except DatabaseUnreachableError as e:
        log.critical("%s", e)  # one line: host:port, the wait, the last error
        return 1
    except SinkUnavailableError as e:
        # Retried with backoff already (batches, offset loading): give up loudly in one line;
        # nothing was lost (no offset past an unwritten row was stored).
        log.critical("PostgreSQL stayed unreachable: %s", " ".join(str(e).split()))
        return 1
    return 0

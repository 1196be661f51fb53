"""``backfill discover-dids``: enqueue the authors others interacted with who are not backfilled yet.

Seed 002's ``determine_dids_to_backfill``: from what the PostgreSQL consumer stored (tables of
:mod:`consumers.postgres`), take the authors of posts that were liked (``likes.subject_uri``),
reposted (``reposts.subject_uri``), replied to (``posts.reply_parent_uri`` / ``reply_root_uri``) or
quoted (``posts.quote_uri``, with ``--include quotes``), drop those whose backfill is done (a
terminal status of ``--job`` in ``<prefix>.backfill.repo_status``), and append the rest to the DID
work topic, where ``backfill repos --from-topic`` replicas pick them up. ``--dry-run`` prints them
instead. The query runs on a server-side cursor, so millions of rows stream through.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, TextIO

import psycopg
from psycopg import sql

from producers.options import add_producer_arguments, job_option
from producers.repos.worktopic import DoneSet, enqueue_dids
from runtime.contract.codec import AvroCodec
from runtime.contract.topics import TopicMap
from runtime.errors import ConfigError, SinkUnavailableError
from runtime.kafka.broker import resolve_bootstrap
from runtime.kafka.settings import KafkaSettings
from runtime.process.options import Opt, Secret, parse_secret

log = logging.getLogger(__name__)

#: Interaction -> (table, URI column, extra condition).
INTERACTIONS: Final[dict[str, tuple[tuple[str, str, str], ...]]] = {
    "likes": (("likes", "subject_uri", "subject_uri LIKE 'at://%%/app.bsky.feed.post/%%'"),),
    "reposts": (("reposts", "subject_uri", "subject_uri LIKE 'at://%%/app.bsky.feed.post/%%'"),),
    "replies": (("posts", "reply_parent_uri", "TRUE"), ("posts", "reply_root_uri", "TRUE")),
    "quotes": (("posts", "quote_uri", "quote_uri LIKE 'at://%%/app.bsky.feed.post/%%'"),),
}

DISCOVER_OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--database-url",), "database_url", "DATABASE_URL", None,
        "PostgreSQL URL of the consumer's database; never logged", type=parse_secret, metavar="URL"),
    Opt(("--db-schema",), "db_schema", "BACKFILL_DB_SCHEMA", "public", "PostgreSQL schema of the tables"),
    Opt(("--include",), "include", "BACKFILL_DISCOVER_INCLUDE", "likes,reposts,replies",
        f"interactions whose subjects' authors are wanted ({', '.join(INTERACTIONS)})"),
    job_option("repos", "the repo job whose finished DIDs are left out"),
    Opt(("--limit",), "limit", "BACKFILL_DID_LIMIT", 0, "enqueue at most this many DIDs (0 = all)", type=int),
    Opt(("--dry-run",), "dry_run", "BACKFILL_DRY_RUN", False, "print the DIDs instead of enqueueing them",
        action="store_true"),
)


@dataclass
class DiscoverResult:
    """What a run found."""

    referenced: int
    already_done: int
    enqueued: int


def discovery_query(schema: str, include: list[str]) -> sql.Composed:
    """The SQL selecting distinct referenced author DIDs, sorted.

    Raises:
        ConfigError: an unknown interaction name.
    """
    unknown = [i for i in include if i not in INTERACTIONS]
    if unknown or not include:
        raise ConfigError(f"--include takes {', '.join(INTERACTIONS)}; got {include}")
    s = sql.Identifier(schema)
    parts = []
    for name in include:
        for table, column, cond in INTERACTIONS[name]:
            col = sql.Identifier(column)
            # cond comes from the fixed INTERACTIONS table, never from input.
            parts.append(sql.SQL(
                "SELECT split_part(substr({col}, 6), '/', 1) AS did FROM {s}.{t} "
                "WHERE {col} LIKE 'at://did:%%' AND {cond}").format(col=col, s=s, t=sql.Identifier(table),
                                                                   cond=sql.SQL(cond)))
    union = sql.SQL(" UNION ").join(parts)
    return sql.SQL("SELECT did FROM ({u}) AS referenced WHERE did <> '' ORDER BY did").format(u=union)


def referenced_dids(url: str, schema: str, include: list[str], *, batch: int = 10_000) -> Iterator[str]:
    """Stream the referenced author DIDs from PostgreSQL (a server-side cursor).

    Raises:
        ConfigError: the consumer's tables are not there (run ``backfill consume postgres`` first).
        SinkUnavailableError: the database cannot be reached.
    """
    query = discovery_query(schema, include)
    try:
        with psycopg.connect(url, application_name="atproto-backfill-discover") as conn, \
                conn.cursor(name="discover_dids") as cur:
            cur.itersize = batch
            cur.execute(query)
            for (did,) in cur:
                yield str(did)
    except psycopg.errors.UndefinedTable as e:
        raise ConfigError(f"the consumer's tables are missing in schema {schema!r}: {e}") from e
    except psycopg.OperationalError as e:
        raise SinkUnavailableError(f"cannot query PostgreSQL: {e}") from e


def discover(url: str, schema: str, include: list[str], kafka: KafkaSettings, *, job: str, limit: int = 0,
             dry_run: bool = False, out: TextIO | None = None) -> DiscoverResult:
    """Find referenced authors not yet done and enqueue (or print) them."""
    codec = AvroCodec.from_config(kafka.registry_config())
    done = DoneSet(job, codec)
    done.catch_up(kafka.consumer_config("unused"), TopicMap(kafka.topic_prefix).repo_status)
    counts = {"referenced": 0, "done": 0, "kept": 0}

    def wanted() -> Iterator[str]:
        for did in referenced_dids(url, schema, include):
            counts["referenced"] += 1
            if done.is_done(did):
                counts["done"] += 1
                continue
            if limit and counts["kept"] >= limit:
                return
            counts["kept"] += 1
            yield did

    if dry_run:
        stream = out if out is not None else sys.stdout
        for did in wanted():
            print(did, file=stream)
        enqueued = 0
    else:
        enqueued = enqueue_dids(kafka, wanted(), origin="discover")
    log.info("discover-dids: %d referenced authors, %d already backfilled, %d %s", counts["referenced"],
             counts["done"], counts["kept"], "listed" if dry_run else "enqueued")
    return DiscoverResult(counts["referenced"], counts["done"], enqueued)


#: One line for ``backfill --help``.
HELP: Final = "enqueue referenced authors not yet backfilled"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill discover-dids``."""
    add_producer_arguments(parser, DISCOVER_OPTIONS)


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill discover-dids``."""
    url = ns.database_url
    if not isinstance(url, Secret) or not url.get():
        raise ConfigError("no database: set DATABASE_URL or --database-url")
    include = [i.strip() for i in ns.include.split(",") if i.strip()]
    discovery_query(ns.db_schema, include)  # validates --include before connecting
    kafka = KafkaSettings.from_namespace(ns)
    with resolve_bootstrap(kafka.bootstrap_servers) as servers:
        result = discover(url.get(), ns.db_schema, include, kafka.with_bootstrap(servers), job=ns.job,
                          limit=ns.limit, dry_run=ns.dry_run)
    print(f"referenced authors: {result.referenced}, already backfilled: {result.already_done}, "
          f"enqueued: {result.enqueued}", file=sys.stderr)
    return 0

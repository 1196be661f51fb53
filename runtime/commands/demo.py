"""``backfill demo``: the whole pipeline on one machine, offline.

Starts the embedded Kafka-API broker (Tansu), the Jetstream simulator serving generated events
from the last hour, runs ``backfill jetstream`` from an hour ago to an end watermark with its queue
consumer, then (when a PostgreSQL URL is given or ``DATABASE_URL`` is set) a PostgreSQL consumer
group until the job is fully consumed, and prints the statistics, a few queued items (through
``backfill inspect queue``), the job status and the table counts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from runtime.kafka.broker import start_embedded_broker
from runtime.process.options import Opt, add_options, log_level_option, parse_secret
from runtime.simulator.jetstream import JetstreamSimulator, synthetic_events

log = logging.getLogger(__name__)

OPTIONS: Final = (
    Opt(("--events",), "events", "BACKFILL_DEMO_EVENTS", 20000, "events the simulator generates", type=int),
    Opt(("--seed",), "seed", "BACKFILL_DEMO_SEED", 1, "random seed of the generated events", type=int),
    Opt(("--collections", "-c"), "collections", None, "app.bsky.*",
        "comma-separated collection patterns to backfill"),
    Opt(("--data-dir",), "data_dir", "BACKFILL_DEMO_DIR", None,
        "where the queue file goes (default: a new temporary directory)"),
    Opt(("--database-url",), "database_url", "DATABASE_URL", None,
        "also run the PostgreSQL consumer into this database", type=parse_secret),
    log_level_option("WARNING"),
)


#: One line for ``backfill --help``.
HELP: Final = "run the local demo: broker, simulator, producer, consumer, summary"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill demo``."""
    add_options(parser, OPTIONS)


def main(ns: argparse.Namespace) -> int:
    """Run the demo; returns 0 when every stage finished and the counts agree."""
    from runtime.commands.cli import main as cli  # noqa: PLC0415 - the CLI imports this module

    data = Path(ns.data_dir) if ns.data_dir else Path(tempfile.mkdtemp(prefix="atproto-backfill-demo-"))
    data.mkdir(parents=True, exist_ok=True)
    queue_path = data / "queues.sqlite"
    now_us = int(time.time() * 1e6)
    rate = max(1.0, ns.events / 3600)
    start_us = now_us - 3600 * 1_000_000
    events = synthetic_events(ns.events, seed=ns.seed, start_us=start_us, rate=rate)
    end_us = events[int(len(events) * 0.9)].time_us
    print(f"demo: {len(events):,} simulated Jetstream events over the last hour; backfilling "
          f"{ns.collections} until the watermark {time.strftime('%H:%M:%S', time.gmtime(end_us / 1e6))} UTC",
          flush=True)
    broker = start_embedded_broker()
    sim = JetstreamSimulator(events).start_in_thread()
    try:
        common = ["--bootstrap-servers", broker.bootstrap, "--log-level", ns.log_level]
        argv = ["jetstream", "--instance", sim.url, "--cursor", str(start_us), "--end-timestamp",
                _iso(end_us), "-n", "0", "-t", "600", "--queue-path", str(queue_path), "--queue-name", "demo",
                "--job", "demo", "--progress", "log", "--checkpoint-interval", "0.5"]
        for pattern in ns.collections.split(","):
            argv += ["-c", pattern.strip()]
        code = cli(argv + common)
        if code:
            return code
        print(flush=True)
        code = cli(["inspect", "queue", "demo", "--queue-path", str(queue_path), "--limit", "3", "--width", "160",
                    "--log-level", ns.log_level])
        if code:
            return code
        if ns.database_url:
            _ensure_database(ns.database_url.get())
            print("\nPostgreSQL consumer group (until the demo job is fully consumed):", flush=True)
            code = cli(["consume", "postgres", "--until-done", "demo", "--database-url", ns.database_url.get(),
                        *common])
            if code:
                return code
            _print_tables(ns.database_url.get())
        print("\njob status:", flush=True)
        return cli(["status", "--bootstrap-servers", broker.bootstrap])
    finally:
        sim.stop_thread()
        broker.stop()


def _iso(us: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us / 1e6)) + f".{us % 1_000_000:06d}Z"


def _ensure_database(url: str) -> None:
    """Create the demo's database when it does not exist yet (through the server's ``postgres`` db)."""
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    try:
        psycopg.connect(url, connect_timeout=5).close()
        return
    except psycopg.OperationalError as e:
        if "does not exist" not in str(e):
            raise
    info = psycopg.conninfo.conninfo_to_dict(url)
    name = str(info.get("dbname"))
    maintenance = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    print(f"created database {name}")


def _print_tables(url: str) -> None:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(url) as conn:
        for table in ("posts", "likes", "reposts", "follows", "blocks", "profiles", "records", "actors",
                      "identity_events", "account_events"):
            try:
                count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608 - fixed names
            except psycopg.Error:
                conn.rollback()
                continue
            print(f"  {table:<16} {count[0] if count else 0:>8,}")
        row = conn.execute("SELECT service, cursor, last_event_time FROM firehose_cursor "
                           "WHERE service = 'demo'").fetchone()
        if row:
            print(f"  firehose_cursor  service={row[0]} cursor={row[1]} last_event_time={row[2]}")


if __name__ == "__main__":
    from runtime.commands.cli import main as _main

    sys.exit(_main(["demo", *sys.argv[1:]]))

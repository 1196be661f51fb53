"""``backfill consume postgres`` as real processes: kill -9 mid-batch (frozen while it holds its
database transaction open, then killed), SIGTERM, three replicas with one killed. After every
interruption the tables and the stored offsets must end identical to the expected ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from runtime.kafka.settings import KafkaSettings
from tests.integration.test_postgres_consumer import (
    assert_tables_equal,
    expected,
    make_events,
    produce,
    replayed,
    snapshot,
    stored_offsets,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


ROOT = Path(__file__).resolve().parents[2]


def command() -> list[str]:
    """The ``backfill`` entry point of this environment."""
    exe = Path(sys.executable).parent / "backfill"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "runtime"]


class Replicas:
    """Starts consumer processes and makes sure none outlives the test."""

    def __init__(self, kafka: KafkaSettings, pg_url: str, db_schema: str, group: str, logs: Path) -> None:
        self.kafka = kafka
        self.pg_url = pg_url
        self.schema = db_schema
        self.group = group
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        args = [*command(), "consume", "postgres", "--database-url", self.pg_url, "--db-schema", self.schema,
                "--bootstrap-servers", self.kafka.bootstrap_servers, "--topic-prefix", self.kafka.topic_prefix,
                "--group", self.group, "--log-level", "INFO", *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "DATABASE_URL", "KAFKA_"))}
        env["PYTHONUNBUFFERED"] = "1"
        with (self.logs / f"{name}.log").open("ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def progress(self) -> int:
        return sum(sum(p.values()) for p in stored_offsets(self.pg_url, self.schema, self.group).values())

    def wait_progress(self, above: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
        """Wait until the stored offsets passed ``above`` (or ``proc`` exited); return the progress."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.progress()
            if now > above or proc.poll() is not None:
                return now
            time.sleep(0.02)
        raise AssertionError(f"no progress past {above} within {timeout} s")

    def kill_mid_batch(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> bool:
        """SIGKILL ``proc`` at a moment one of its sink connections is inside a transaction (it has
        read a batch and is writing it with its offsets); False when it finished first.

        The process is frozen (SIGSTOP) while pg_stat_activity is looked at, so the transaction
        seen open is still open when the kill lands; else it goes on and is tried again.
        """
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the consumer was never caught inside a transaction"
                proc.send_signal(signal.SIGSTOP)
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'atproto-backfill-postgres' AND xact_start IS NOT NULL").fetchone()
                if row is not None and row[0] > 0:
                    proc.kill()
                    proc.wait(10)
                    return True
                proc.send_signal(signal.SIGCONT)
                time.sleep(0.005)
        return False

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def replicas(kafka: KafkaSettings, pg_url: str, schema: str, tmp_path: Path) -> Iterator[Replicas]:
    r = Replicas(kafka, pg_url, schema, f"g-{schema}", tmp_path)
    yield r
    r.close()


def data_offsets(offsets: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """A job's final offsets without the control topic its checkpoints went to."""
    return {t: p for t, p in offsets.items() if ".control." not in t}


def total(offsets: dict[str, dict[str, int]]) -> int:
    return sum(sum(p.values()) for p in offsets.values())


SLOW = ("--batch-size", "100", "--batch-delay-ms", "20", "--linger", "0.1")
#: For the classic group protocol: a killed member's partitions move to the others 6 s after its
#: last heartbeat (the default session is 45 s).
FAST_EVICTION = ("--kafka-config", "session.timeout.ms=6000")


def test_sigterm_and_repeated_kill_9_neither_lose_nor_duplicate(
        kafka: KafkaSettings, pg_url: str, schema: str, replicas: Replicas) -> None:
    events = make_events(3000, seed=21, job="k1")
    produce(kafka, events, "k1")
    replay = replayed(events, "k2", seed=22)
    final = data_offsets(produce(kafka, replay, "k2"))  # it wrote every partition: its offsets are the ends
    end = total(final)

    # a graceful stop: the batch is finished, committed, and the group left
    proc = replicas.start("term", *SLOW, *FAST_EVICTION, "--until-done", "k2")
    seen = replicas.wait_progress(0, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, replicas.log("term")
    assert 0 < replicas.progress() < end

    # kill -9 in the middle of a batch: while the consumer holds its database transaction open
    kills = 0
    for round_ in range(3):
        seen = replicas.progress()
        proc = replicas.start(f"kill{round_}", *SLOW, *FAST_EVICTION, "--max-concurrent", str(1 + round_ % 2),
                              "--until-done", "k2")
        now = replicas.wait_progress(seen, proc)
        kills += replicas.kill_mid_batch(proc)
        proc.wait(10)
        assert replicas.progress() >= now
    assert kills >= 2
    assert replicas.progress() < end, "the kills came too late to interrupt anything"

    proc = replicas.start("final", *FAST_EVICTION, "--batch-size", "500", "--until-done", "k2")
    assert proc.wait(120) == 0, replicas.log("final")
    assert stored_offsets(pg_url, schema, replicas.group) == final
    assert_tables_equal(snapshot(pg_url, schema), expected(events + replay))


def test_three_replicas_one_killed_end_exact(
        kafka: KafkaSettings, pg_url: str, schema: str, replicas: Replicas) -> None:
    events = make_events(4000, seed=31, job="r3")
    final = data_offsets(produce(kafka, events, "r3"))
    procs = [replicas.start(f"r{i}", *SLOW, *FAST_EVICTION, "--until-done", "r3") for i in range(3)]
    deadline = time.monotonic() + 60
    while not all("assigned" in replicas.log(f"r{i}") for i in range(3)):
        assert time.monotonic() < deadline, "the replicas never all got partitions"
        time.sleep(0.05)
    replicas.wait_progress(replicas.progress(), procs[1])
    assert procs[1].poll() is None
    procs[1].kill()
    procs[1].wait(10)
    assert replicas.progress() < total(final), "the kill came too late to matter"
    for i in (0, 2):
        assert procs[i].wait(120) == 0, replicas.log(f"r{i}")
    assert stored_offsets(pg_url, schema, replicas.group) == final
    assert_tables_equal(snapshot(pg_url, schema), expected(events))

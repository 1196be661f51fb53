"""``backfill consume postgres`` as real processes, for the integration tests: the command, the replicas
(started, watched, killed mid-batch, never outliving the test) and a job's data offsets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from runtime.kafka.settings import KafkaSettings
from tests.integration.pg_pipeline import stored_offsets

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


def data_offsets(offsets: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """A job's final offsets without the control topic its checkpoints went to."""
    return {t: p for t, p in offsets.items() if ".control." not in t}


SLOW = ("--batch-size", "100", "--batch-delay-ms", "20", "--linger", "0.1")

"""PostgreSQL outages (issue 13): a server restarted mid-run, a server unreachable at start.

A restart is real: a private server (``pg_private.py``) is stopped while the consumer writes and
started again a few seconds later; the tables must end exact. At start, an unreachable server is
waited for (``--db-wait``, one clear line naming host:port) and used once it answers, or the
process exits with status 1 and one line, never a traceback, never the password.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from consumers.base import ConsumerOptions, ConsumerStats, GroupConsumer
from consumers.postgres.sink import PostgresSettings, PostgresSink
from runtime.contract.codec import AvroCodec
from runtime.errors import SinkUnavailableError
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from runtime.process.options import Secret
from tests.integration import pg_private
from tests.integration.pg_pipeline import assert_tables_equal, expected, make_events, produce, snapshot
from tests.integration.pg_private import PrivatePostgres, free_port

pytestmark = pytest.mark.integration

#: The private server fixture (stopped and started by the tests here).
private_pg = pg_private.private_pg

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-Pa55word"


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60,
              alive: threading.Thread | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert alive is None or alive.is_alive(), f"the consumer stopped before: {what}"
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# ----------------------------------------------------------------------------- restarted mid-run

@pytest.mark.parametrize("max_concurrent", [1, 2])
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restarted_mid_run_is_ridden_out_with_exact_tables(
        kafka: KafkaSettings, private_pg: PrivatePostgres, max_concurrent: int, mode: str) -> None:
    events = make_events(4000, seed=31, job="restart")
    offsets = produce(kafka, events, "restart")
    url, schema = private_pg.url, "restarted"
    metrics = Metrics()
    sink = PostgresSink(PostgresSettings(Secret(url), db_schema=schema, max_concurrent=max_concurrent), metrics)
    opts = ConsumerOptions(group="g-restart", batch_size=40, linger=0.05, until_offsets=offsets, batch_delay=0.02)
    consumer = GroupConsumer(kafka, sink, opts, metrics, AvroCodec())
    failure: list[BaseException] = []
    result: list[ConsumerStats] = []

    def run() -> None:
        try:
            result.append(consumer.run())
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=run, name="consumer")
    thread.start()
    try:
        _wait_for(lambda: consumer.stats.batches >= 3, "no batch written before the restart", alive=thread)
        private_pg.stop(mode)
        down_at = consumer.stats.consumed
        assert down_at < len(events), "everything was consumed before the server stopped"
        time.sleep(4)
        assert thread.is_alive(), f"the consumer died while the server was down: {failure}"
        private_pg.start()
        thread.join(180)
        assert not thread.is_alive(), "the consumer did not finish after the server came back"
    finally:
        consumer.stop_event.set()
        thread.join(30)
        sink.close()
    assert not failure, f"the consumer failed: {failure[0]!r}"
    assert result[0].stop_reason == "until_done"
    assert metrics.registry.get_sample_value("atproto_backfill_consumer_sink_retries_total",
                                             {"sink": "postgres"}) >= 1
    assert_tables_equal(snapshot(url, schema), expected(events))


# ----------------------------------------------------------------------------- unreachable at start

def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False)


@pytest.mark.parametrize(("entry", "wait"), [
    (("-m", "runtime", "consume", "postgres"), ("--db-wait", "2")),
    (("-m", "consumers.postgres"), ("--db-wait", "0")),
    (("-m", "consumers.postgres"), ()),  # BACKFILL_DB_WAIT=1.5 from the environment
])
def test_unreachable_database_at_start_exits_with_one_line_and_no_traceback(
        entry: tuple[str, ...], wait: tuple[str, ...]) -> None:
    port = free_port()
    url = f"postgresql://backfill:{PASSWORD}@127.0.0.1:{port}/nowhere"
    started = time.monotonic()
    proc = _cli(*entry, "--database-url", url, *wait, "--bootstrap-servers", "127.0.0.1:1",
                env={"BACKFILL_DB_WAIT": "1.5"})
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout
    critical = [line for line in proc.stderr.splitlines() if "CRITICAL" in line]
    assert len(critical) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in critical[0]
    assert "unreachable" in critical[0]
    # nothing but log lines: the message is one line (libpq's two-line message is joined)
    assert all(line[:4].isdigit() for line in proc.stderr.splitlines()), proc.stderr
    if wait != ("--db-wait", "0"):
        waiting = [line for line in proc.stderr.splitlines() if "waiting up to" in line]
        assert len(waiting) == 1, proc.stderr
        assert f"127.0.0.1:{port}" in waiting[0]
    assert took < 30


def test_a_database_reachable_during_the_start_wait_is_used(private_pg: PrivatePostgres) -> None:
    private_pg.stop()
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{private_pg.port}/postgres"  # trust: password unused
    lines: list[str] = []
    with subprocess.Popen([sys.executable, "-m", "consumers.postgres", "--database-url", url, "--db-wait", "120",
                           "--db-schema", "waited", "--migrate-only"], cwd=ROOT, stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, text=True) as proc:
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
        reader.start()
        try:
            _wait_for(lambda: any("waiting up to" in line for line in lines), "no waiting line", timeout=30)
            assert proc.poll() is None, "".join(lines)
            private_pg.start()
            assert proc.wait(90) == 0, "".join(lines)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(10)
    text = "".join(lines)
    assert "Traceback" not in text
    assert PASSWORD not in text
    assert any("reachable after" in line for line in lines), text
    with psycopg.connect(private_pg.url) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'waited'")}
    assert {"posts", "kafka_offsets"} <= tables


class FakeTime:
    """A clock that advances only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.sleeps.append(seconds)
        self.now += seconds
        return False


def _refusing(times: int, then: Callable[..., Any] | None = None) -> Callable[..., Any]:
    calls = {"n": 0}

    def connect(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if then is None or calls["n"] <= times:
            raise psycopg.OperationalError('connection to server at "127.0.0.1", port 9 failed: Connection refused\n'
                                           '\tIs the server running on that host and accepting TCP/IP connections?')
        return then(*args, **kwargs)

    return connect


def test_start_wait_backs_off_and_uses_the_database_once_it_answers(pg_url: str, schema: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    settings = PostgresSettings(Secret(pg_url), db_schema=schema, connect_wait=60)
    with caplog.at_level("INFO", logger="consumers.postgres.sink"):
        sink = PostgresSink(settings, Metrics(), connect=_refusing(5, psycopg.connect), clock=fake.clock,
                            sleep=fake.sleep)
    sink.close()
    assert len(fake.sleeps) == 5
    assert fake.sleeps == sorted(fake.sleeps), "the waits do not back off"
    assert fake.sleeps[-1] > fake.sleeps[0]
    waiting = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waiting) == 1
    assert "\n" not in waiting[0]
    assert any("reachable after" in r.getMessage() for r in caplog.records)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}.posts").format(sql.Identifier(schema))).fetchone() == (0,)


def test_start_wait_gives_up_when_the_wait_runs_out(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTime()
    settings = PostgresSettings(Secret(f"postgresql://u:{PASSWORD}@127.0.0.1:9/db"), connect_wait=60)
    with pytest.raises(SinkUnavailableError) as info:
        PostgresSink(settings, Metrics(), connect=_refusing(0), clock=fake.clock, sleep=fake.sleep)
    message = str(info.value)
    assert "127.0.0.1:9" in message and "60" in message
    assert "\n" not in message and PASSWORD not in message
    assert 60 <= fake.now - 1000.0 <= 61
    assert max(fake.sleeps) <= 10
    assert PASSWORD not in caplog.text


def test_start_wait_stops_on_sigterm_without_using_up_the_wait() -> None:
    fake = FakeTime()
    stop = threading.Event()

    def sleep(seconds: float) -> bool:
        fake.sleep(seconds)
        stop.set()  # SIGTERM arrives during the first wait
        return True

    settings = PostgresSettings(Secret("postgresql://u@127.0.0.1:9/db"), connect_wait=60)
    with pytest.raises(SinkUnavailableError, match="stopped"):
        PostgresSink(settings, Metrics(), connect=_refusing(0), clock=fake.clock, sleep=sleep)
    assert len(fake.sleeps) == 1

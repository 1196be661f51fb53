"""The queue sink's exactly-once rule with seed 002's type-specific queues: a crash between batches,
a resume from the stored offsets, and a replayed job still leave every event in its queue once; and
``backfill consume queue`` killed with SIGKILL in the middle of writing a batch, then restarted,
ends with the exact queue, each message written by one committed batch only."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumers.base import TP, Consumed, ConsumerOptions, GroupConsumer
from consumers.queue import RECORD_TYPES, QueueSink, by_type_router, connect
from runtime.contract.codec import AvroCodec
from runtime.contract.records import event_key, to_jetstream_json
from runtime.kafka.offsets import Origin, StoredOffset
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from tests.integration.eos import queue_in_write
from tests.integration.pg_pipeline import make_events, produce, replayed

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class Crash(Exception):
    """Stands for a kill between reading a batch and storing it."""


class CrashingSink:
    """Delegates to a queue sink and dies before storing its ``crash_at``-th batch."""

    name = "queue"

    def __init__(self, inner: QueueSink, crash_at: int) -> None:
        self.inner = inner
        self.crash_at = crash_at
        self.flushes = 0

    def load_offsets(self, group: str, partitions: list[TP]) -> dict[TP, StoredOffset]:
        return self.inner.load_offsets(group, partitions)

    def forget_offsets(self, group: str, partitions: list[TP]) -> None:
        self.inner.forget_offsets(group, partitions)

    def add(self, item: Consumed) -> None:
        self.inner.add(item)

    def flush(self, group: str, offsets: dict[TP, int], origins: Mapping[str, Origin] | None = None) -> int:
        self.flushes += 1
        if self.flushes == self.crash_at:
            raise Crash
        return self.inner.flush(group, offsets, origins)

    def discard(self) -> None:
        self.inner.discard()

    def close(self) -> None:
        self.inner.close()


def run(kafka: KafkaSettings, sink: Any, **options: Any) -> None:
    consumer = GroupConsumer(kafka, sink, ConsumerOptions(group="queue-eo", batch_size=150, linger=0.1, **options),
                             Metrics(), AvroCodec())
    try:
        consumer.run()
    finally:
        sink.close()


def test_crash_resume_and_replay_leave_each_event_once_in_its_type_queue(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    events = make_events(1500, seed=41, job="q1")
    produce(kafka, events, "q1")
    again = replayed(events, "q2", seed=42)
    final = produce(kafka, again, "q2")
    path = tmp_path / "queues.sqlite"
    crashing = CrashingSink(QueueSink("sync", path, route=by_type_router("sync")), crash_at=4)
    with pytest.raises(Crash):
        run(kafka, crashing, until_done="q2")
    with closing(connect(path)) as conn:
        stored = conn.execute("SELECT count(*) FROM items").fetchone()[0]
    assert 0 < stored < len(events)
    run(kafka, QueueSink("sync", path, route=by_type_router("sync")), until_done="q2")

    with closing(connect(path)) as conn:
        rows = conn.execute("SELECT queue, payload FROM items").fetchall()
        offsets = {(t, p): o for t, p, o in conn.execute(
            "SELECT topic, partition, next_offset FROM kafka_offsets WHERE group_id = 'queue-eo'")}
    want: Counter[tuple[str, bytes]] = Counter()
    route = by_type_router("sync")  # account events reach every queue; a post delete both post queues
    for e in {orjson.dumps(to_jetstream_json(e), option=orjson.OPT_SORT_KEYS): e for e in events}.values():
        queues = route(e)
        for queue in (queues,) if isinstance(queues, str) else queues or ():
            want[(queue, orjson.dumps(to_jetstream_json(e), option=orjson.OPT_SORT_KEYS))] += 1
    got = Counter((q, orjson.dumps(orjson.loads(p), option=orjson.OPT_SORT_KEYS)) for q, p in rows)
    assert got == want
    assert {q for q, _ in got} == {"sync", *(f"sync_{k}" for k in RECORD_TYPES)}
    data = {(t, int(p)): o for t, parts in final.items() if ".control." not in t for p, o in parts.items()}
    assert offsets == data


#: Test instrumentation in the real queue database: every key the sink writes, by a committed batch
#: only (the trigger's row is part of the batch's transaction). A BEFORE trigger fires for the rows
#: INSERT OR IGNORE then ignores too, so a message the sink got twice shows twice.
_ATTEMPTS = """
CREATE TABLE attempts (queue TEXT NOT NULL, key BLOB NOT NULL);
CREATE TRIGGER seen_attempt BEFORE INSERT ON seen BEGIN
    INSERT INTO attempts (queue, key) VALUES (NEW.queue, NEW.key);
END;
"""


def _stored(path: Path, group: str) -> int:
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        n: int = conn.execute("SELECT coalesce(sum(next_offset), 0) FROM kafka_offsets WHERE group_id = ?",
                              (group,)).fetchone()[0]
        return n


@pytest.mark.slow
def test_sigkill_of_the_queue_consumer_mid_batch_then_restart_leaves_the_exact_queue(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    events = make_events(3000, seed=43, job="qk")
    assert len({event_key(e) for e in events}) == len(events)
    final = produce(kafka, events, "qk")
    data = {(t, int(p)): o for t, parts in final.items() if ".control." not in t for p, o in parts.items()}
    path = tmp_path / "queues.sqlite"
    group = "queue-kill"
    QueueSink("kq", path).close()  # the schema, then the instrumentation
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(_ATTEMPTS)
    args = [sys.executable, "-m", "runtime", "consume", "queue", "--queue-path", str(path), "--queue-name", "kq",
            "--group", group, "--until-done", "qk", "--batch-size", "200", "--linger", "0.05",
            "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
            "--log-level", "INFO",
            # the killed member's partitions move to the restarted one 6 s after it died (default 45 s)
            "--kafka-config", "session.timeout.ms=6000"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "KAFKA_"))}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    logs = [tmp_path / "killed.log", tmp_path / "restarted.log"]
    with logs[0].open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        # Frozen (SIGSTOP) at a moment it holds the database's write transaction: it has read a batch
        # from Kafka and is writing it with its offsets. Killed there; else it goes on and is tried again.
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, "the consumer was never caught writing a batch"
            if _stored(path, group) > 0:
                proc.send_signal(signal.SIGSTOP)
                if queue_in_write(path):
                    proc.kill()
                    break
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    stored_at_kill = _stored(path, group)
    assert 0 < stored_at_kill < sum(data.values()), "the kill came too late to interrupt anything"
    with logs[1].open("wb") as out:
        restarted = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=180,
                                   check=False)
    assert restarted.returncode == 0, logs[1].read_text()[-3000:]

    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT queue, payload FROM items").fetchall()
        offsets = {(t, p): o for t, p, o in conn.execute(
            "SELECT topic, partition, next_offset FROM kafka_offsets WHERE group_id = ?", (group,))}
        attempts = Counter(conn.execute("SELECT queue, key FROM attempts").fetchall())
    want = Counter(("kq", orjson.dumps(to_jetstream_json(e), option=orjson.OPT_SORT_KEYS)) for e in events)
    got = Counter((q, orjson.dumps(orjson.loads(p), option=orjson.OPT_SORT_KEYS)) for q, p in rows)
    assert got == want  # every event exactly once in the queue
    assert offsets == data  # the stored offsets reached every partition's end
    # No message was written by two committed batches: the restart resumed exactly where the last
    # committed batch ended, the killed batch was rolled back whole (nothing left to de-duplicate).
    assert sum(attempts.values()) == len(events)
    assert max(attempts.values()) == 1

"""A full disk under the queue's SQLite file (issue 13): a loud stop, no partial commit, a clean resume.

The full disk is SQLite's own: ``PRAGMA max_page_count`` on the sink's connection makes a write
that needs more pages fail with ``SQLITE_FULL`` ("database or disk is full"), the very error a full
file system gives. The consumer must stop with a :class:`~runtime.errors.CommitError` naming the
file and the full disk (the CLI: status 1, one line, no traceback), the batch's items and offsets
must be all or nothing, and once there is room again the consumer resumes with every item once.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

import orjson
import pytest

from consumers.base import ConsumerOptions, GroupConsumer
from consumers.queue import QueueFullError, QueueSink, connect
from runtime.contract.codec import AvroCodec
from runtime.contract.records import Event, to_jetstream_json
from runtime.contract.typed import event_from_datum
from runtime.errors import CommitError
from runtime.kafka import clients as kafka_util
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from tests.integration.pg_pipeline import make_events, produce

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

#: Pages the queue file may grow by before its "disk" is full: a few batches of 100 items.
ROOM = 60

#: Test instrumentation: every key a committed batch wrote (the trigger's row is part of the batch's
#: transaction, so a rolled-back batch leaves none). A message written by two batches shows twice.
_ATTEMPTS = """
CREATE TABLE attempts (queue TEXT NOT NULL, key BLOB NOT NULL);
CREATE TRIGGER seen_attempt BEFORE INSERT ON seen BEGIN
    INSERT INTO attempts (queue, key) VALUES (NEW.queue, NEW.key);
END;
"""

#: ``backfill`` with the queue file's "disk" nearly full: every connection the queue module opens
#: may grow the file by ``sys.argv[1]`` pages only.
_FULL_DISK_CLI = """
import sys

import consumers.queue as queue
from runtime.commands.cli import main

room = int(sys.argv[1])
plain = queue.connect


def nearly_full(path=None):
    conn = plain(path)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + room}")
    return conn


queue.connect = nearly_full
sys.exit(main(sys.argv[2:]))
"""


def _canonical(payload: str | bytes) -> bytes:
    return orjson.dumps(orjson.loads(payload), option=orjson.OPT_SORT_KEYS)


def _payload(event: Event) -> bytes:
    return orjson.dumps(to_jetstream_json(event), option=orjson.OPT_SORT_KEYS)


def _data_offsets(final: dict[str, dict[str, int]]) -> dict[tuple[str, int], int]:
    return {(t, int(p)): o for t, parts in final.items() if ".control." not in t for p, o in parts.items()}


def _queue_state(path: Path, group: str) -> tuple[Counter[bytes], dict[tuple[str, int], int], Counter[bytes]]:
    """Items (canonical payloads), the group's stored offsets, and the keys committed batches wrote."""
    with closing(sqlite3.connect(path)) as conn:
        items = Counter(_canonical(p) for (p,) in conn.execute("SELECT payload FROM items"))
        offsets = {(t, p): o for t, p, o in conn.execute(
            "SELECT topic, partition, next_offset FROM kafka_offsets WHERE group_id = ?", (group,))}
        attempts = Counter(k for (k,) in conn.execute("SELECT key FROM attempts"))
    return items, offsets, attempts


def _below(kafka: KafkaSettings, offsets: dict[tuple[str, int], int]) -> Counter[bytes]:
    """The payloads of the messages before ``offsets`` (what exactly the stored offsets cover)."""
    codec = AvroCodec()
    out: Counter[bytes] = Counter()
    for topic in sorted({t for t, _ in offsets}):
        for msg in kafka_util.read_to_end(kafka.consumer_config("disk-full-reader"), topic, settle=5):
            if (msg.offset() or 0) < offsets.get((topic, msg.partition() or 0), 0):
                schema, datum = codec.decode(msg.value() or b"")
                out[_payload(event_from_datum(schema, datum))] += 1
    return out


def _new_queue(path: Path, name: str) -> None:
    QueueSink(name, path).close()  # the schema, then the instrumentation
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(_ATTEMPTS)


def test_a_full_disk_stops_the_consumer_loudly_without_a_partial_batch_and_it_resumes_once(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    events = make_events(2000, seed=51, job="full")
    final = produce(kafka, events, "full")
    data = _data_offsets(final)
    path = tmp_path / "queues.sqlite"
    group = "queue-full"
    _new_queue(path, "full")
    sink = QueueSink("full", path)
    conn = sink._conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + ROOM}")
    opts = ConsumerOptions(group=group, batch_size=100, linger=0.05, until_offsets=final)
    try:
        with pytest.raises(CommitError) as info:
            GroupConsumer(kafka, sink, opts, Metrics(), AvroCodec()).run()
        assert isinstance(info.value, QueueFullError)
        message = str(info.value)
        assert str(path) in message
        assert "disk is full" in message
        assert "\n" not in message
        assert not conn.in_transaction, "the failed batch's transaction was left open"

        # The failed sink stores nothing more, not even offsets without items.
        with pytest.raises(CommitError, match="an earlier batch failed"):
            sink.flush(group, {(next(iter(data))[0], 0): 10**9})
    finally:
        sink.close()
    items, offsets, attempts = _queue_state(path, group)
    assert 0 < sum(items.values()) < len(events), "the disk was full too early or too late"
    # all or nothing: the items are exactly the messages the stored offsets cover
    assert items == _below(kafka, offsets)
    assert max(attempts.values()) == 1

    # Room again (a new process: its connection has no page limit): it resumes after the last batch.
    resumed = QueueSink("full", path)
    try:
        stats = GroupConsumer(kafka, resumed, opts, Metrics(), AvroCodec()).run()
    finally:
        resumed.close()
    assert stats.stop_reason == "until_done"
    items, offsets, attempts = _queue_state(path, group)
    assert items == Counter(_payload(e) for e in events)  # every event exactly once
    assert offsets == data
    assert max(attempts.values()) == 1  # nothing was written by two committed batches


def test_backfill_consume_queue_exits_1_with_one_line_on_a_full_disk_then_resumes_once(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    events = make_events(1500, seed=52, job="fullcli")
    final = produce(kafka, events, "fullcli")
    path = tmp_path / "queues.sqlite"
    group = "queue-full-cli"
    _new_queue(path, "fq")
    args = ["consume", "queue", "--queue-path", str(path), "--queue-name", "fq", "--group", group,
            "--until-done", "fullcli", "--batch-size", "100", "--linger", "0.05",
            "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "KAFKA_"))}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")

    full = subprocess.run([sys.executable, "-c", _FULL_DISK_CLI, str(ROOM), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180, check=False)
    assert full.returncode == 1, full.stderr[-3000:]
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    critical = [line for line in full.stderr.splitlines() if "CRITICAL" in line]
    assert len(critical) == 1, full.stderr[-3000:]
    assert str(path) in critical[0]
    assert "disk is full" in critical[0]
    assert all(line[:4].isdigit() for line in full.stderr.splitlines()), "a log record spans several lines"
    items, offsets, attempts = _queue_state(path, group)
    assert 0 < sum(items.values()) < len(events)
    assert items == _below(kafka, offsets)

    # Space is back: a new process resumes.
    again = subprocess.run([sys.executable, "-m", "runtime", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=180, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    items, offsets, attempts = _queue_state(path, group)
    assert items == Counter(_payload(e) for e in events)
    assert offsets == _data_offsets(final)
    assert max(attempts.values()) == 1


def test_a_full_disk_fails_the_seed_queue_api_with_the_real_error_and_keeps_nothing(tmp_path: Path) -> None:
    from consumers.queue import Queue

    path = tmp_path / "seed.sqlite"
    queue = Queue("seed", create_new_queue=True, path=path)
    try:
        conn = queue._conn
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 5}")
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            queue.batch_add_items_to_queue([{"n": i, "text": "x" * 400} for i in range(500)])
        assert not conn.in_transaction
        assert queue.get_queue_length() == 0
        conn.execute("PRAGMA max_page_count = 1073741823")
        assert queue.batch_add_items_to_queue([{"n": 1}]) == 1
        assert [i.payload for i in queue.batch_remove_items_from_queue(10)] == [{"n": 1}]
    finally:
        queue.close()
    with closing(connect(path)) as check:
        assert check.execute("SELECT count(*) FROM items").fetchone() == (0,)

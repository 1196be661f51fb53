"""The queue sink's exactly-once rule with seed 002's type-specific queues: a crash between batches,
a resume from the stored offsets, and a replayed job still leave every event in its queue once."""

from __future__ import annotations

from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumers.base import TP, Consumed, ConsumerOptions, GroupConsumer
from consumers.queue import RECORD_TYPES, QueueSink, by_type_router, connect, record_type
from runtime.codec import AvroCodec
from runtime.metrics import Metrics
from runtime.records import RecordEvent, to_jetstream_json
from runtime.settings import KafkaSettings
from tests.integration.test_postgres_consumer import make_events, produce, replayed

pytestmark = pytest.mark.integration


class Crash(Exception):
    """Stands for a kill between reading a batch and storing it."""


class CrashingSink:
    """Delegates to a queue sink and dies before storing its ``crash_at``-th batch."""

    name = "queue"

    def __init__(self, inner: QueueSink, crash_at: int) -> None:
        self.inner = inner
        self.crash_at = crash_at
        self.flushes = 0

    def load_offsets(self, group: str, partitions: list[TP]) -> dict[TP, int]:
        return self.inner.load_offsets(group, partitions)

    def add(self, item: Consumed) -> None:
        self.inner.add(item)

    def flush(self, group: str, offsets: dict[TP, int]) -> int:
        self.flushes += 1
        if self.flushes == self.crash_at:
            raise Crash
        return self.inner.flush(group, offsets)

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
    for e in {orjson.dumps(to_jetstream_json(e), option=orjson.OPT_SORT_KEYS): e for e in events}.values():
        kind = record_type(e) if isinstance(e, RecordEvent) else None
        if isinstance(e, RecordEvent) and kind == "post" and e.operation == "delete":
            queue = "sync_post"
        else:
            queue = f"sync_{kind}" if kind else "sync"
        want[(queue, orjson.dumps(to_jetstream_json(e), option=orjson.OPT_SORT_KEYS))] += 1
    got = Counter((q, orjson.dumps(orjson.loads(p), option=orjson.OPT_SORT_KEYS)) for q, p in rows)
    assert got == want
    assert {q for q, _ in got} == {"sync", *(f"sync_{k}" for k in RECORD_TYPES)}
    data = {(t, int(p)): o for t, parts in final.items() if ".control." not in t for p, o in parts.items()}
    assert offsets == data

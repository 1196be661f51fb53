"""Offsets a sink stored are trusted only for the cluster and the topic they were taken from.

On Apache Kafka: a sink database kept while the topics are deleted and created again (``docker
compose down -v && up`` keeps a host-mounted queue or an external PostgreSQL) must not seek to the
old topics' offsets. By default those partitions start from the beginning with a warning naming
both identities; ``offset_mismatch="refuse"`` stops with a clear error instead. An offset past a
partition's end, or stamped with another cluster's id, is a mismatch too.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import NewTopic
from psycopg import sql

from consumers.base import ConsumerOptions, ConsumerStats, GroupConsumer
from consumers.queue import QueueSink
from runtime.contract.codec import AvroCodec
from runtime.contract.records import Event, event_key
from runtime.errors import OffsetMismatchError
from runtime.kafka import clients as kafka_util
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from tests.integration.pg_pipeline import consume, make_events, produce

pytestmark = pytest.mark.integration


def _consume_queue(kafka: KafkaSettings, path: Path, until: dict[str, dict[str, int]], *,
                   mismatch: str = "restart") -> ConsumerStats:
    sink = QueueSink("q", path)
    try:
        consumer = GroupConsumer(kafka, sink, ConsumerOptions(group="g", until_offsets=until, linger=0.1,
                                                              offset_mismatch=mismatch), Metrics(), AvroCodec())
        return consumer.run()
    finally:
        sink.close()


def _items(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM items WHERE queue = 'q'").fetchone()[0])


def _stored(path: Path) -> list[tuple[str, int, int, str | None, str | None]]:
    with sqlite3.connect(path) as conn:
        return [(t, p, o, c, i) for t, p, o, c, i in conn.execute(
            "SELECT topic, partition, next_offset, cluster_id, topic_id FROM kafka_offsets ORDER BY 1, 2")]


def _keys(events: list[Event]) -> set[str]:
    return {event_key(e) for e in events}


def _recreate_topics(kafka: KafkaSettings) -> list[str]:
    """Delete every topic of the prefix and create each again, empty (same name, partitions)."""
    admin = kafka_util.admin(kafka.client_config())
    described = admin.list_topics(timeout=10).topics
    topics = {t: len(md.partitions) for t, md in described.items() if t.startswith(f"{kafka.topic_prefix}.")}
    for fut in admin.delete_topics(sorted(topics), operation_timeout=30).values():
        fut.result()
    deadline = time.monotonic() + 60
    pending = dict(topics)
    while pending:
        assert time.monotonic() < deadline, f"topics not created again: {sorted(pending)}"
        for name, fut in admin.create_topics([NewTopic(t, n, 1) for t, n in pending.items()]).items():
            try:
                fut.result()
                pending.pop(name)
            except KafkaException:
                pass  # still being deleted
        time.sleep(0.2)
    return sorted(topics)


def test_a_topic_created_again_is_read_from_its_beginning(kafka: KafkaSettings, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "queue.sqlite"
    first = make_events(400, seed=1, job="first")
    _consume_queue(kafka, path, produce(kafka, first, "first"))
    assert _items(path) == len(_keys(first))
    before = _stored(path)
    assert before and all(c and i for *_, c, i in before)  # stamped with the cluster and topic ids
    _recreate_topics(kafka)
    # Fewer events than before: every stored offset is past the new partitions' ends, and the
    # topic ids changed. Either way the new records are read, all of them.
    second = make_events(150, seed=2, job="second")
    with caplog.at_level(logging.WARNING, logger="consumers.base"):
        stats = _consume_queue(kafka, path, produce(kafka, second, "second"))
    assert stats.consumed == len(second)
    assert _items(path) == len(_keys(first) | _keys(second))
    warning = "\n".join(r.getMessage() for r in caplog.records if "not from" in r.getMessage())
    old_ids = {i for *_, i in before}
    assert any(old in warning for old in old_ids), warning
    after = _stored(path)
    assert {i for *_, i in after}.isdisjoint(old_ids)


def test_more_records_in_the_new_topic_are_not_skipped(kafka: KafkaSettings, tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    first = make_events(150, seed=3, job="first")
    _consume_queue(kafka, path, produce(kafka, first, "first"))
    _recreate_topics(kafka)
    # More events than before: the old offsets are inside the new partitions, where seeking to them
    # would silently skip the records before them.
    second = make_events(400, seed=4, job="second")
    stats = _consume_queue(kafka, path, produce(kafka, second, "second"))
    assert stats.consumed == len(second)
    assert _items(path) == len(_keys(first) | _keys(second))


def test_refuse_stops_with_both_identities(kafka: KafkaSettings, tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    first = make_events(100, seed=5, job="first")
    _consume_queue(kafka, path, produce(kafka, first, "first"))
    old_ids = {i for *_, i in _stored(path)}
    _recreate_topics(kafka)
    second = make_events(100, seed=6, job="second")
    until = produce(kafka, second, "second")
    with pytest.raises(OffsetMismatchError) as info:
        _consume_queue(kafka, path, until, mismatch="refuse")
    assert any(old in str(info.value) for old in old_ids), str(info.value)
    assert "--offset-mismatch" in str(info.value)
    assert _items(path) == len(_keys(first))  # nothing written
    # The default policy then reads the new topics from their beginning.
    assert _consume_queue(kafka, path, until).consumed == len(second)


def test_offsets_of_another_cluster_or_past_the_end_are_not_used(kafka: KafkaSettings, tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    events = make_events(200, seed=7, job="j")
    until = produce(kafka, events, "j")
    assert _consume_queue(kafka, path, until).consumed == len(events)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE kafka_offsets SET cluster_id = 'another-cluster'")
    assert _consume_queue(kafka, path, until).consumed == len(events)  # read again, from the beginning
    assert {c for *_, c, _ in _stored(path)} != {"another-cluster"}
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE kafka_offsets SET next_offset = next_offset + 1000")
    assert _consume_queue(kafka, path, until).consumed == len(events)  # not waited on
    assert _items(path) == len(_keys(events))  # and still each item once
    # Stored offsets that match are used: nothing is read again.
    assert _consume_queue(kafka, path, until).consumed == 0


def test_postgres_sink_reads_a_topic_created_again(kafka: KafkaSettings, pg_url: str, schema: str) -> None:
    first = make_events(300, seed=8, job="first")
    stats, _ = consume(kafka, pg_url, schema, until_offsets=produce(kafka, first, "first"))
    assert stats.consumed == len(first)
    _recreate_topics(kafka)
    second = make_events(120, seed=9, job="second")
    stats, metrics = consume(kafka, pg_url, schema, until_offsets=produce(kafka, second, "second"))
    assert stats.consumed == len(second)
    mismatches = metrics.registry.get_sample_value("atproto_backfill_consumer_offset_mismatches_total",
                                                   {"sink": "postgres"})
    assert mismatches is not None and mismatches > 0
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(sql.SQL("SELECT count(*) FROM {}.kafka_offsets WHERE cluster_id IS NULL "
                                    "OR topic_id IS NULL").format(sql.Identifier(schema))).fetchone()
    assert rows == (0,)

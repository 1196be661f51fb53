"""Producer -> typed topics -> consumer group -> PostgreSQL, in process: exact tables, until-done,
the end watermark, dead letters, and the memory limit's pause.

The helpers (an in-test source, the expected-table model, the table snapshot) are in pg_pipeline.py.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from psycopg import sql

from consumers.base import ConsumerOptions, GroupConsumer
from consumers.postgres.sink import PostgresSettings, PostgresSink
from runtime.contract.codec import AvroCodec
from runtime.contract.records import RecordEvent
from runtime.contract.topics import TopicMap
from runtime.kafka import clients as kafka_util
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from runtime.process.options import Secret
from tests.integration.pg_pipeline import (
    START_US,
    assert_tables_equal,
    consume,
    expected,
    make_events,
    produce,
    replayed,
    snapshot,
    stored_offsets,
)

pytestmark = pytest.mark.integration


@pytest.mark.tansu_smoke
def test_until_done_with_replayed_and_shuffled_duplicates_gives_exact_tables(
        kafka: KafkaSettings, pg_url: str, schema: str) -> None:
    events = make_events(2500, seed=3, job="orig")
    produce(kafka, events, "orig")
    replay = replayed(events, "again", seed=4)
    produce(kafka, replay, "again")
    stats, metrics = consume(kafka, pg_url, schema, until_done="again", batch_size=700)
    assert stats.stop_reason == "until_done"
    assert stats.consumed == 2 * len(events)
    want = expected(events + replay)
    got = snapshot(pg_url, schema)
    assert_tables_equal(got, want)
    assert sum(len(v) for v in want.records.values()) > 1000
    assert want.identities
    assert want.accounts
    # the typed columns: the post types seed 002 distinguishes all occur
    with psycopg.connect(pg_url) as conn:
        kinds = dict(conn.execute(sql.SQL("SELECT record_type, count(*) FROM {}.posts GROUP BY 1").format(
            sql.Identifier(schema))).fetchall())
    assert set(kinds) == {"post", "reply", "quote"}
    assert metrics.registry.get_sample_value("atproto_backfill_consumer_messages_skipped_total",
                                             {"sink": "postgres", "reason": "stale_rev"}) > 0


def test_end_timestamp_skips_and_counts_events_past_the_watermark(
        kafka: KafkaSettings, pg_url: str, schema: str) -> None:
    events = make_events(1200, seed=5, job="wm")
    offsets = produce(kafka, events, "wm")
    cut = sorted(e.time_us for e in events)[800]
    stats, metrics = consume(kafka, pg_url, schema, until_offsets=offsets, end_time_us=cut)
    before = [e for e in events if e.time_us < cut]
    assert stats.skipped == {"after_end": len(events) - len(before)}
    assert metrics.registry.get_sample_value("atproto_backfill_consumer_messages_skipped_total",
                                             {"sink": "postgres", "reason": "after_end"}) == len(events) - len(before)
    assert_tables_equal(snapshot(pg_url, schema), expected(before))


def test_bad_messages_are_dead_lettered_with_their_origin(kafka: KafkaSettings, pg_url: str, schema: str) -> None:
    events = make_events(300, seed=6, job="dl")
    bad = RecordEvent(did="did:plc:nul", collection="app.bsky.feed.post", rkey="3kbad", operation="create",
                      rev="3kbadrev", cid="bafy", record={"$type": "app.bsky.feed.post", "text": "nul\x00here",
                                                          "createdAt": "2024-01-01T00:00:00Z"},
                      source="jetstream", cursor=START_US, time_us=START_US, job="dl")
    offsets = produce(kafka, [*events[:150], bad, *events[150:]], "dl")
    post_topic = TopicMap(kafka.topic_prefix).for_collection("app.bsky.feed.post")
    raw = Producer(kafka.producer_config())
    written: list[int] = []
    raw.produce(post_topic, b"\xc3\x01 not avro at all", b"did:plc:garbage", partition=0,
                on_delivery=lambda err, msg: written.append(msg.offset()) if err is None else None)
    assert raw.flush(10) == 0
    offsets[post_topic]["0"] = max(offsets[post_topic].get("0", 0), written[0] + 1)
    stats, metrics = consume(kafka, pg_url, schema, until_offsets=offsets)
    assert stats.dropped == {"transform_failed": 1, "decode_avro": 1}
    assert_tables_equal(snapshot(pg_url, schema), expected(events))
    letters = list(kafka_util.read_to_end(kafka.consumer_config("dlq-reader"), post_topic + ".dlq", settle=30))
    codec = AvroCodec()
    decoded = [codec.decode(m.value())[1] for m in letters]
    assert sorted(d["reason"] for d in decoded) == ["decode_avro", "transform_failed"]
    for d in decoded:
        assert d["topic"] == post_topic
        assert d["origin"] == f"{post_topic}/{d['partition']}/{d['offset']}"
        assert d["stage"] == "consumer:postgres"
    garbage = next(d for d in decoded if d["reason"] == "decode_avro")
    assert garbage["payload"] == b"\xc3\x01 not avro at all"
    assert metrics.registry.get_sample_value("atproto_backfill_dlq_messages_total",
                                             {"stage": "consumer:postgres", "reason": "transform_failed"}) == 1


@contextlib.contextmanager
def consumer_thread(kafka: KafkaSettings, pg_url: str, schema: str, offsets: dict[str, dict[str, int]], *,
                    max_memory_mb: int) -> Iterator[tuple[GroupConsumer, ConsumerOptions, threading.Thread]]:
    """A consumer group member into ``schema`` running until ``offsets`` in a thread, under a memory
    limit the test may change through the options; stopped and closed at the end."""
    metrics = Metrics()
    sink = PostgresSink(PostgresSettings(Secret(pg_url), db_schema=schema), metrics)
    opts = ConsumerOptions(group=f"g-{schema}", batch_size=20, linger=0.05, until_offsets=offsets,
                           max_memory_mb=max_memory_mb)
    consumer = GroupConsumer(kafka, sink, opts, metrics, AvroCodec())
    thread = threading.Thread(target=consumer.run)
    thread.start()
    try:
        yield consumer, opts, thread
    finally:
        consumer.stop_event.set()
        thread.join(30)
        sink.close()


def test_memory_limit_pauses_consumption_until_memory_is_back(
        kafka: KafkaSettings, pg_url: str, schema: str) -> None:
    events = make_events(3000, seed=8, job="mem")
    offsets = produce(kafka, events, "mem")

    def wait_for(condition: Any, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    with consumer_thread(kafka, pg_url, schema, offsets, max_memory_mb=1_000_000) as (consumer, opts, thread):
        paused = consumer.metrics.registry.get_sample_value
        wait_for(lambda: consumer.stats.consumed > 0, "nothing consumed")
        opts.max_memory_mb = 1  # far below the real RSS: the next check pauses every partition
        wait_for(lambda: paused("atproto_backfill_consumer_paused", {"sink": "postgres"}) == 1, "never paused")
        time.sleep(0.5)
        held = consumer.stats.consumed
        time.sleep(1.5)
        assert consumer.stats.consumed == held, "consumption went on while paused"
        assert held < len(events)
        opts.max_memory_mb = 1_000_000  # memory is back: the next check resumes
        thread.join(60)
        assert not thread.is_alive()
    assert consumer.stats.stop_reason == "until_done"
    assert paused("atproto_backfill_consumer_paused", {"sink": "postgres"}) == 0
    assert_tables_equal(snapshot(pg_url, schema), expected(events))


def test_partitions_assigned_while_over_the_memory_limit_stay_paused(
        kafka: KafkaSettings, pg_url: str, schema: str) -> None:
    events = make_events(200, seed=9, job="mem2")
    offsets = produce(kafka, events, "mem2")
    # over the limit before the group assigns anything
    with consumer_thread(kafka, pg_url, schema, offsets, max_memory_mb=1) as (consumer, opts, thread):
        deadline = time.monotonic() + 30
        while not consumer.health.ready:
            assert time.monotonic() < deadline, "never assigned"
            time.sleep(0.02)
        time.sleep(1.5)
        assert consumer.stats.consumed == 0
        opts.max_memory_mb = 1_000_000
        thread.join(60)
        assert not thread.is_alive()
    assert_tables_equal(snapshot(pg_url, schema), expected(events))


def test_collection_wildcards_choose_the_topics(kafka: KafkaSettings, pg_url: str, schema: str) -> None:
    events = make_events(600, seed=10, job="wild")
    offsets = produce(kafka, events, "wild")
    stats, _ = consume(kafka, pg_url, schema, until_offsets=offsets, collections=["app.bsky.feed.*"],
                       include_account_events=False)
    chosen = [e for e in events if isinstance(e, RecordEvent) and e.collection.startswith("app.bsky.feed.")]
    assert stats.consumed == len(chosen)
    want = expected(chosen)
    got = snapshot(pg_url, schema)
    assert_tables_equal(got, want)
    assert not got.records["follows"]
    assert not got.identities
    assert {c for _, c, _ in got.records["records"]} == {"app.bsky.feed.threadgate"}


@pytest.mark.parametrize("max_concurrent", [1, 2])
def test_database_connections_dropped_mid_run_lose_nothing(
        kafka: KafkaSettings, pg_url: str, schema: str, max_concurrent: int) -> None:
    events = make_events(2000, seed=12, job="drop")
    offsets = produce(kafka, events, "drop")
    metrics = Metrics()
    done = threading.Event()

    def saboteur() -> None:
        # Terminate the writer's connection a few times while batches are being written.
        drops = 0
        with psycopg.connect(pg_url, autocommit=True) as conn:
            while not done.is_set() and drops < 3:
                row = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = "
                    "'atproto-backfill-postgres' AND datname = current_database() AND state = 'active'").fetchone()
                drops += row[0] if row else 0
                time.sleep(0.01)

    thread = threading.Thread(target=saboteur)
    thread.start()
    try:
        stats, _ = consume(kafka, pg_url, schema, metrics=metrics, until_offsets=offsets, batch_size=50,
                           max_concurrent=max_concurrent)
    finally:
        done.set()
        thread.join()
    assert stats.stop_reason == "until_done"
    assert metrics.registry.get_sample_value("atproto_backfill_consumer_sink_retries_total",
                                             {"sink": "postgres"}) >= 1
    assert_tables_equal(snapshot(pg_url, schema), expected(events))


def _visitor_holding(kafka: KafkaSettings, group: str, topics: list[str], release: threading.Event,
                     took: list[tuple[str, int]], left: threading.Event) -> None:
    """A second member of ``group``: takes its share of the partitions, reads nothing of them (its
    position is never stored anywhere), holds them until ``release``, then leaves the group."""
    def on_assign(c: Consumer, parts: list[TopicPartition]) -> None:
        took.extend((p.topic, p.partition) for p in parts)
        c.incremental_assign(parts)
        c.pause(parts)

    visitor = Consumer(kafka.consumer_config(group))
    visitor.subscribe(topics, on_assign=on_assign)
    try:
        while not release.is_set():
            visitor.poll(0.1)
    finally:
        visitor.unsubscribe()
        deadline = time.monotonic() + 30
        while visitor.assignment() and time.monotonic() < deadline:
            visitor.poll(0.1)
        visitor.close()
        left.set()


@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_a_partition_revoked_while_paused_is_consumed_when_it_comes_back(
        kafka: KafkaSettings, pg_url: str, schema: str, protocol: str) -> None:
    """librdkafka keeps a partition's pause across its revocation. The memory guard pauses every
    partition; a second member joins and takes some of them (revoked while paused); memory comes back
    under the limit while they are away (only the current assignment is resumed); the second member
    leaves and they come back. They must be consumed to the end: exact tables and stored offsets."""
    kafka = replace(kafka, group_protocol=protocol)
    events = make_events(1500, seed=18, job="away")
    offsets = produce(kafka, events, "away")
    metrics = Metrics()
    sink = PostgresSink(PostgresSettings(Secret(pg_url), db_schema=schema), metrics)
    group = f"g-{schema}"
    opts = ConsumerOptions(group=group, batch_size=50, linger=0.05, until_offsets=offsets,
                           max_memory_mb=1)  # over the limit from the start: every partition pauses
    consumer = GroupConsumer(kafka, sink, opts, metrics, AvroCodec())
    paused = metrics.registry.get_sample_value
    thread = threading.Thread(target=consumer.run)
    release, left = threading.Event(), threading.Event()
    took: list[tuple[str, int]] = []
    visitor: threading.Thread | None = None

    def wait_for(condition: Any, what: str, timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert thread.is_alive(), f"the consumer stopped: {consumer.stats}"
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    thread.start()
    try:
        topics = consumer.wanted_topics()
        every = sum(n for t, n in kafka_util.list_topics(consumer._admin).items() if t in topics)
        wait_for(lambda: len(consumer._consumer.assignment()) == every, "the consumer never got every partition")
        wait_for(lambda: paused("atproto_backfill_consumer_paused", {"sink": "postgres"}) == 1, "never paused")
        visitor = threading.Thread(target=_visitor_holding,
                                   args=(kafka, group, topics, release, took, left))
        visitor.start()
        # The second member's share is revoked from the consumer while paused.
        wait_for(lambda: bool(took) and len(consumer._consumer.assignment()) == every - len(took),
                 "the second member got no partition")
        assert consumer.stats.consumed == 0
        opts.max_memory_mb = 1_000_000  # memory is back: the consumer resumes what it holds now
        wait_for(lambda: paused("atproto_backfill_consumer_paused", {"sink": "postgres"}) == 0, "never resumed")
        release.set()  # the second member leaves: its partitions go back to the consumer
        wait_for(left.is_set, "the second member did not leave")
        thread.join(60)
        stored = stored_offsets(pg_url, schema, group)
        back = {(t, p): (stored.get(t, {}).get(str(p)), offsets.get(t, {}).get(str(p))) for t, p in took
                if stored.get(t, {}).get(str(p)) != offsets.get(t, {}).get(str(p))}
        assert not thread.is_alive(), (f"partitions taken away while paused and assigned back were not consumed "
                                       f"(partition: stored offset, end): {back}")
    finally:
        release.set()
        consumer.stop_event.set()
        thread.join(30)
        if visitor is not None:
            visitor.join(30)
        sink.close()
    assert consumer.stats.stop_reason == "until_done"
    assert consumer.stats.consumed == len(events)
    assert_tables_equal(snapshot(pg_url, schema), expected(events))
    topic_map = TopicMap(kafka.topic_prefix)
    assert stored_offsets(pg_url, schema, group) == {t: parts for t, parts in offsets.items()
                                                     if topic_map.collection_of(t) is not None}

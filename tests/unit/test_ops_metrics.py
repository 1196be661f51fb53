"""The metric wiring the dashboard relies on: sampled produce latency, lag from librdkafka statistics
(forgotten on revoke), rows per queue. No broker: the clients are created but never connect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import TopicPartition
from prometheus_client import CollectorRegistry

from consumers.base import Consumed, ConsumerOptions, GroupConsumer
from consumers.queue import QueueSink
from producers.jetstream.decode import decode_message
from producers.job import JobOptions, JobRunner
from producers.publish import LATENCY_SAMPLE_EVERY
from runtime.contract.codec import AvroCodec
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from runtime.simulator.jetstream import synthetic_events

NOWHERE = KafkaSettings(bootstrap_servers="127.0.0.1:9", topic_prefix="m")


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value(name, labels)
    return value


class Delivered:
    """A delivery report as librdkafka hands it to the callback."""

    def __init__(self, offset: int, latency: float) -> None:
        self._offset = offset
        self._latency = latency

    def topic(self) -> str:
        return "m.app.bsky.feed.post"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def latency(self) -> float:
        return self._latency


def test_produce_latency_is_sampled_from_delivery_reports() -> None:
    metrics = Metrics(registry=CollectorRegistry())
    runner = JobRunner(NOWHERE, JobOptions(job="j", source="jetstream"), metrics, AvroCodec())
    n = 3 * LATENCY_SAMPLE_EVERY + 5
    for i in range(n):
        runner.publisher.on_delivery(None, Delivered(i, 0.004))  # type: ignore[arg-type]
    count = sample(metrics, "atproto_backfill_producer_produce_latency_seconds_count", source="jetstream")
    assert count == 4  # deliveries 1, 65, 129, 193
    total = sample(metrics, "atproto_backfill_producer_produce_latency_seconds_sum", source="jetstream")
    assert total is not None
    assert abs(total - 4 * 0.004) < 1e-9
    bucket = sample(metrics, "atproto_backfill_producer_produce_latency_seconds_bucket", source="jetstream", le="0.005")
    assert bucket == 4


class FakeSink:
    name = "queue"

    def load_offsets(self, group: str, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        return {}


class FakeConsumer:
    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        return

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        return

    def resume(self, partitions: list[TopicPartition]) -> None:
        return


def stats(lags: dict[tuple[str, str], int]) -> str:
    topics: dict[str, Any] = {}
    for (topic, pid), lag in lags.items():
        topics.setdefault(topic, {"partitions": {}})["partitions"][pid] = {"consumer_lag": lag}
    return orjson.dumps({"topics": topics}).decode()


def test_consumer_lag_comes_from_statistics_and_is_forgotten_on_revoke() -> None:
    metrics = Metrics(registry=CollectorRegistry())
    consumer = GroupConsumer(NOWHERE, FakeSink(), ConsumerOptions(group="g"), metrics, AvroCodec())  # type: ignore[arg-type]
    fake = FakeConsumer()
    parts = [TopicPartition("m.app.bsky.feed.post", 0), TopicPartition("m.app.bsky.feed.post", 1)]
    consumer._on_assign(fake, parts)  # type: ignore[arg-type]
    consumer._on_stats(stats({("m.app.bsky.feed.post", "0"): 7, ("m.app.bsky.feed.post", "1"): 3,
                              ("m.app.bsky.feed.post", "-1"): 99, ("m.app.bsky.feed.post", "2"): 5}))
    lag = "atproto_backfill_consumer_lag_messages"
    assert sample(metrics, lag, sink="queue", topic="m.app.bsky.feed.post", partition="0") == 7
    assert sample(metrics, lag, sink="queue", topic="m.app.bsky.feed.post", partition="1") == 3
    # the internal partition -1 and partitions not assigned here are not this member's lag
    assert sample(metrics, lag, sink="queue", topic="m.app.bsky.feed.post", partition="-1") is None
    assert sample(metrics, lag, sink="queue", topic="m.app.bsky.feed.post", partition="2") is None
    consumer._on_revoke(fake, [parts[0]])  # type: ignore[arg-type]
    assert sample(metrics, lag, sink="queue", topic="m.app.bsky.feed.post", partition="0") is None
    assert sample(metrics, lag, sink="queue", topic="m.app.bsky.feed.post", partition="1") == 3
    consumer._on_lost(fake, [parts[1]])  # type: ignore[arg-type]
    assert sample(metrics, lag, sink="queue", topic="m.app.bsky.feed.post", partition="1") is None
    assert consumer.health.ready


def test_queue_sink_counts_rows_per_queue(tmp_path: Path) -> None:
    metrics = Metrics(registry=CollectorRegistry())
    sink = QueueSink("ops", tmp_path / "q.sqlite", metrics=metrics)
    events = [decode_message(e.text) for e in synthetic_events(20, seed=3, accounts=5, start_us=1_700_000_000_000_000)]
    try:
        for i, ev in enumerate(events):
            sink.add(Consumed("m.x", 0, i, "generic", ev, 0))
        for ev in events[:5]:  # a re-delivery is not a new row
            sink.add(Consumed("m.x", 0, 99, "generic", ev, 0))
        stored = sink.flush("g", {("m.x", 0): 100})
    finally:
        sink.close()
    assert stored == 20
    assert sample(metrics, "atproto_backfill_consumer_rows_written_total", sink="queue", table="ops") == 20

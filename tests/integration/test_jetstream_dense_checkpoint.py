"""A Jetstream job whose lateness window holds more events than a checkpoint message could name
(a burst: 160,000 events within 0.8 s of time_us) checkpoints on Apache Kafka and finishes; before,
the checkpoint outgrew the broker's 1 MB message limit and the job died with a traceback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from producers.jetstream.position import JetstreamPosition
from producers.job import JobOptions, JobRunner
from producers.source import End, SourceItem
from runtime.contract.codec import AvroCodec
from runtime.contract.records import RecordEvent, event_key
from runtime.contract.topics import CONTROL_TOPIC_CONFIG, TopicMap
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import load_job
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from tests.integration.eos import committed_event_keys
from tests.integration.pg_pipeline import make_events

pytestmark = pytest.mark.integration

S = 1_000_000
#: Kafka's default max.message.bytes.
KAFKA_DEFAULT_MAX_MESSAGE = 1_048_588


class BurstSource:
    """Jetstream events of one instance, all of them 5 µs apart."""

    name = "jetstream"

    def __init__(self, events: list[RecordEvent]) -> None:
        self.events = events
        self._position = JetstreamPosition(S, 120 * S)
        self._position.connected("ws://burst/subscribe")

    @property
    def position(self) -> JetstreamPosition:
        return self._position

    async def items(self) -> AsyncIterator[SourceItem]:
        for event in self.events:
            self._position.check(event)
            yield event
        yield End("exhausted")


def test_a_dense_lateness_window_checkpoints_within_the_message_limit(kafka: KafkaSettings) -> None:
    base = [e for e in make_events(175_000, seed=11, job="burst", accounts=500) if isinstance(e, RecordEvent)]
    events = [replace(e, cursor=1_700_000_000_000_000 + i * 5, time_us=1_700_000_000_000_000 + i * 5)
              for i, e in enumerate(base[:160_000])]
    # Every identity of the window would be 1.7 MB of base64, 1.3 MB compressed: over the broker's
    # 1 MB message limit (max.message.bytes), so that checkpoint would be refused.
    assert len(events) == 160_000
    n = len(events)
    # The control topic with Kafka's default message limit (the test broker allows 5 MB).
    kafka_util.ensure_topics(kafka_util.admin(kafka.client_config()), [TopicMap(kafka.topic_prefix).control],
                             partitions=1, replication=1,
                             config={**CONTROL_TOPIC_CONFIG, "max.message.bytes": str(KAFKA_DEFAULT_MAX_MESSAGE)})
    # One checkpoint in the middle of the burst, and the final one.
    runner = JobRunner(kafka, JobOptions(job="burst", source="jetstream", checkpoint_events=n // 2,
                                         checkpoint_interval=3600, num_records=0), Metrics(), AvroCodec())
    try:
        state = asyncio.run(runner.run(lambda _prev: BurstSource(events)))
    finally:
        runner.close()
    assert (state.status, state.counts.get("produced")) == ("finished", n), state.counts
    stored = load_job(kafka.consumer_config("t"), TopicMap(kafka.topic_prefix).control, "burst", settle=30)
    assert stored is not None and stored.status == "finished"
    assert len(stored.to_bytes()) < 1_000_000
    keys = committed_event_keys(kafka)
    assert set(keys) == {event_key(e) for e in events} and set(keys.values()) == {1}

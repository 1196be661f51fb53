"""Shared by the tests that run their own Apache Kafka and take a broker away mid-run
(test_kafka_broker_failure, test_kafka_restart): the private cluster, waiting, and the exactly-once
check of the topics."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producers.jetstream.decode import decode_message
from runtime.contract.nsid import CollectionFilter
from runtime.contract.records import Event, event_key
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.jetstream import StoredEvent
from tests.integration.eos import committed_event_keys
from tests.kafka.cluster import KafkaCluster


def not_on_tansu(reason: str) -> pytest.MarkDecorator:
    """Skip on the embedded Tansu broker (``BACKFILL_TEST_BROKER=tansu``): the test runs its own Kafka."""
    return pytest.mark.skipif(os.environ.get("BACKFILL_TEST_BROKER", "kafka").strip().lower() == "tansu",
                              reason=reason)


def own_cluster(path: Path, nodes: int) -> Iterator[KafkaCluster]:
    """A private Apache Kafka cluster of ``nodes`` nodes for one test (the body of its fixture)."""
    c = KafkaCluster(path, nodes=nodes, heap_mb=384)
    c.start()
    try:
        yield c
    finally:
        c.stop(grace=5)


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def job_events(stored: list[StoredEvent], start: int, end: int, collections: str, job: str) -> list[Event]:
    """The events the job must deliver: its range, its collections, identity and account events."""
    wanted = CollectionFilter([collections])
    return [decode_message(e.text, job=job) for e in stored
            if start <= e.time_us < end and (e.collection is None or wanted(e.collection))]


def assert_committed_exactly_once(kafka: KafkaSettings, events: list[Event]) -> None:
    """Every one of ``events`` is in the topics exactly once (read_committed), and nothing else is."""
    want = Counter(event_key(e) for e in events)
    assert max(want.values()) == 1
    got = committed_event_keys(kafka)
    missing, extra = want - got, got - want
    assert not missing and not extra, (
        f"{sum(missing.values())} events missing, {sum(extra.values())} extra or twice: {list(missing)[:2]} "
        f"{list(extra)[:2]}")

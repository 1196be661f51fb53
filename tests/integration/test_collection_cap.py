"""Bounded state whatever the input (issue 13): the topic flood.

A source may send events of any number of distinct valid collection NSIDs; each would cost the job
a route, codec entries, a place in its statistics and its checkpoint's offsets, and a topic. A job
produces to ``--max-collections`` collections at most and creates a topic for a new collection
only while its prefix has fewer collection topics. Events of further collections are counted
(``producer_events_dropped_total{reason="too_many_collections"}``, ``dlq_messages_total``) and
dead-lettered with that reason; the job goes on and finishes.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
import pytest

from producers.job import JobOptions, JobRunner
from runtime.contract.codec import AvroCodec
from runtime.contract.records import RecordEvent
from runtime.contract.topics import DID_LEVEL, TopicMap
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import JobState
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from tests.integration.eos import committed, prefix_topics
from tests.integration.pg_pipeline import START_US, ListSource

pytestmark = pytest.mark.integration

CAP = 4


def flood(collections: list[str], rounds: int, job: str) -> list[RecordEvent]:
    """``rounds`` events of each collection, the collections interleaved in every round."""
    out = []
    for r in range(rounds):
        for i, collection in enumerate(collections):
            n = r * len(collections) + i
            out.append(RecordEvent(
                did=f"did:plc:flood{i % 7:020d}", collection=collection, rkey=f"3k{n:011d}", operation="create",
                rev=f"3k{n:011d}", cid=None, record={"$type": collection, "n": n}, source="jetstream",
                cursor=START_US + n, time_us=START_US + n, job=job))
    return out


def run_job(kafka: KafkaSettings, job: str, events: list[RecordEvent], metrics: Metrics,
            cap: int = CAP) -> tuple[JobRunner, JobState]:
    runner = JobRunner(kafka, JobOptions(job=job, source="jetstream", checkpoint_events=7, max_collections=cap),
                       metrics, AvroCodec())
    try:
        state = asyncio.run(runner.run(lambda _prev: ListSource(list(events))))
    finally:
        runner.close()
    return runner, state


def collection_topics(kafka: KafkaSettings) -> set[str]:
    topics = TopicMap(kafka.topic_prefix)
    return {t for t in prefix_topics(kafka) if topics.collection_of(t) not in (None, *DID_LEVEL)}


def dead_letters(kafka: KafkaSettings) -> list[dict[str, object]]:
    codec = AvroCodec()
    return [codec.decode(m.value() or b"")[1] for m in kafka_util.read_to_end(
        kafka.consumer_config("t-dlq"), TopicMap(kafka.topic_prefix).dead_letters, settle=30)]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_events_past_the_collection_cap_are_dead_lettered_and_the_job_goes_on(kafka: KafkaSettings) -> None:
    collections = [f"com.example.flood{i}.record" for i in range(CAP + 6)]
    events = flood(collections, rounds=3, job="flood")
    accepted, refused = set(collections[:CAP]), set(collections[CAP:])
    metrics = Metrics()
    runner, state = run_job(kafka, "flood", events, metrics)

    # The job went on to its end, past every refused event.
    assert (state.status, state.stop_reason) == ("finished", "exhausted")
    n_refused = sum(e.collection in refused for e in events)
    n_accepted = len(events) - n_refused
    assert state.counts["records"] == n_accepted and state.counts["dropped"] == n_refused
    assert state.counts["received"] == len(events)
    # The cap held: routes, statistics, topics, checkpoint offsets.
    assert runner.stats.collections == accepted
    assert set(runner.stats.by_collection) == accepted
    assert runner.stats.dropped == {"too_many_collections": n_refused}
    assert collection_topics(kafka) == {f"{kafka.topic_prefix}.{c}" for c in accepted}
    topics = TopicMap(kafka.topic_prefix)
    assert {topics.collection_of(t) for t in state.offsets} - {None} == accepted
    # Counted in the metrics (closed label sets), and the gauge shows the collections in use.
    assert sample(metrics, "atproto_backfill_producer_events_dropped_total", source="jetstream",
                  reason="too_many_collections") == n_refused
    assert sample(metrics, "atproto_backfill_dlq_messages_total", stage="producer:jetstream",
                  reason="too_many_collections") == n_refused
    assert sample(metrics, "atproto_backfill_producer_collections", source="jetstream") == CAP
    # Every refused event is in the dead-letter topic with its reason, raw event and origin.
    letters = dead_letters(kafka)
    assert len(letters) == n_refused
    assert {d["reason"] for d in letters} == {"too_many_collections"}
    assert all("--max-collections 4" in str(d["detail"]) for d in letters)
    payloads = [orjson.loads(d["payload"]) for d in letters]  # type: ignore[arg-type]
    assert Counter(p["commit"]["collection"] for p in payloads) == Counter(
        e.collection for e in events if e.collection in refused)
    assert {(d["did"], d["cursor"]) for d in letters} == {(e.did, e.cursor) for e in events if e.collection in refused}
    # The accepted collections' events are all in their topics, once each.
    got = Counter((d["collection"], d["rkey"]) for _, _, d in committed(kafka, sorted(collection_topics(kafka))))
    assert got == Counter((e.collection, e.rkey) for e in events if e.collection in accepted)


def test_no_new_collection_topic_once_the_prefix_has_as_many_as_the_cap(kafka: KafkaSettings) -> None:
    """The bound holds across jobs and runs sharing the prefix: a job whose prefix already has
    ``--max-collections`` collection topics still produces to them, and dead-letters the events of
    collections that would need a new topic."""
    first = [f"com.example.first{i}.record" for i in range(CAP)]
    run_job(kafka, "filler", flood(first, rounds=1, job="filler"), Metrics())
    assert len(collection_topics(kafka)) == CAP

    known, new = first[:2], [f"com.example.second{i}.record" for i in range(3)]
    events = flood([*known, *new], rounds=2, job="second")
    metrics = Metrics()
    runner, state = run_job(kafka, "second", events, metrics)
    assert state.status == "finished"
    assert runner.stats.collections == set(known)
    n_new = sum(e.collection in new for e in events)
    assert runner.stats.dropped == {"too_many_collections": n_new}
    assert len(collection_topics(kafka)) == CAP  # none created
    letters = [d for d in dead_letters(kafka) if d["cursor"] in {e.cursor for e in events}]
    assert len(letters) == n_new
    assert all("already has 4 collection topics" in str(d["detail"]) for d in letters)

"""``runtime.kafka.clients.read_to_end`` on Apache Kafka: it reads exactly to each partition's last stable
offset, never waits for an open transaction, skips aborted records and commit markers, and raises
instead of returning part of a topic."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from runtime.errors import SourceError
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import JobState, load_job
from runtime.kafka.settings import KafkaSettings

pytestmark = pytest.mark.integration


def _topic(kafka: KafkaSettings, name: str, partitions: int = 3) -> str:
    topic = f"{kafka.topic_prefix}.{name}"
    kafka_util.ensure_topics(kafka_util.admin(kafka.client_config()), [topic], partitions=partitions,
                             replication=1)
    return topic


@pytest.fixture
def txn_producer(kafka: KafkaSettings) -> Iterator[Producer]:
    producer = Producer(kafka.producer_config(transactional_id=f"t-{uuid.uuid4().hex}", **{"linger.ms": 5}))
    producer.init_transactions(30)
    yield producer
    producer.flush(10)


def _values(kafka: KafkaSettings, topic: str, **kw: float) -> list[bytes]:
    return sorted(m.value() or b"" for m in kafka_util.read_to_end(kafka.consumer_config("t-read"), topic, **kw))


def _send(producer: Producer, topic: str, tag: str, n: int) -> list[bytes]:
    values = [f"{tag}-{i:04d}".encode() for i in range(n)]
    for i, v in enumerate(values):
        producer.produce(topic, v, f"k{i}".encode())
    return values


def test_reads_to_the_last_stable_offset_without_waiting_for_an_open_transaction(
        kafka: KafkaSettings, txn_producer: Producer) -> None:
    topic = _topic(kafka, "rte.open")
    txn_producer.begin_transaction()
    committed = _send(txn_producer, topic, "a", 300)
    txn_producer.commit_transaction(30)
    txn_producer.begin_transaction()
    aborted = _send(txn_producer, topic, "x", 50)
    txn_producer.abort_transaction(30)
    txn_producer.begin_transaction()
    committed += _send(txn_producer, topic, "b", 200)
    txn_producer.commit_transaction(30)
    # a running producer: its transaction is open at the end of every partition
    txn_producer.begin_transaction()
    open_values = _send(txn_producer, topic, "c", 100)
    assert txn_producer.flush(30) == 0

    t0 = time.monotonic()
    got = _values(kafka, topic, max_wait=20)
    took = time.monotonic() - t0
    assert got == sorted(committed), "not exactly the committed records"
    assert not set(aborted) & set(got)
    assert took < 10, f"the read waited for the open transaction ({took:.1f} s)"

    txn_producer.commit_transaction(30)
    assert _values(kafka, topic) == sorted(committed + open_values)


def test_empty_partitions_and_a_missing_topic_read_as_empty(kafka: KafkaSettings) -> None:
    topic = _topic(kafka, "rte.empty")
    assert _values(kafka, topic, max_wait=10) == []
    assert _values(kafka, f"{kafka.topic_prefix}.rte.absent", max_wait=10) == []


def test_a_read_that_cannot_reach_the_end_in_time_raises(kafka: KafkaSettings, txn_producer: Producer) -> None:
    topic = _topic(kafka, "rte.late", partitions=1)
    txn_producer.begin_transaction()
    _send(txn_producer, topic, "v", 500)
    txn_producer.commit_transaction(30)

    now = [0.0]
    reader = kafka_util.read_to_end(kafka.consumer_config("t-read"), topic, max_wait=30, clock=lambda: now[0])
    first = next(reader)
    assert first.offset() == 0
    now[0] = 31.0  # the deadline passes with most of the partition unread (its end: 500 records + the commit marker)
    with pytest.raises(SourceError, match=r"end was not reached within 30 s \(\[0\] at \d+ of 501\)"):
        list(reader)


def test_load_job_reads_the_checkpoint_behind_a_running_producers_open_transaction(
        kafka: KafkaSettings, txn_producer: Producer) -> None:
    control = _topic(kafka, "control.jobs", partitions=1)
    txn_producer.begin_transaction()
    txn_producer.produce(control, JobState(job="a", source="jetstream", checkpoint=1, cursor=10).to_bytes(), b"a")
    txn_producer.produce(control, JobState(job="b", source="jetstream", checkpoint=1, cursor=5).to_bytes(), b"b")
    txn_producer.produce(control, JobState(job="a", source="jetstream", checkpoint=2, cursor=20).to_bytes(), b"a")
    txn_producer.commit_transaction(30)
    txn_producer.begin_transaction()
    txn_producer.produce(control, JobState(job="a", source="jetstream", checkpoint=3, cursor=30).to_bytes(), b"a")
    assert txn_producer.flush(30) == 0

    # Without settling, the read ends where the open transaction begins (a consumer polling for a
    # job's end looks again soon); a resume settles (see the test below).
    state = load_job(kafka.consumer_config("t-read"), control, "a", settle=0)
    assert state is not None and (state.checkpoint, state.cursor) == (2, 20)
    txn_producer.abort_transaction(30)
    state = load_job(kafka.consumer_config("t-read"), control, "a")
    assert state is not None and (state.checkpoint, state.cursor) == (2, 20)


def _checkpoint(job: str, n: int) -> bytes:
    return JobState(job=job, source="jetstream", status="running", checkpoint=n, cursor=1000 + n).to_bytes()


def test_a_resume_waits_for_another_jobs_open_transaction_and_sees_what_was_committed_after_it(
        kafka: KafkaSettings) -> None:
    """One partition, two jobs: job A's checkpoint transaction is open (a producer killed mid-commit)
    when job B commits its newest checkpoint. Read to the last stable offset, B's newest checkpoint
    is hidden behind A's open transaction; a resume settles and sees it."""
    control = _topic(kafka, "control.jobs", partitions=1)
    a = Producer(kafka.producer_config(transactional_id=f"a-{uuid.uuid4().hex}", **{"transaction.timeout.ms": 4000}))
    b = Producer(kafka.producer_config(transactional_id=f"b-{uuid.uuid4().hex}"))
    a.init_transactions(30)
    b.init_transactions(30)
    b.begin_transaction()
    b.produce(control, _checkpoint("b", 1), b"b")
    b.commit_transaction(30)
    a.begin_transaction()
    a.produce(control, _checkpoint("a", 1), b"a")
    assert a.flush(30) == 0  # open, never committed: A "dies" here
    b.begin_transaction()
    b.produce(control, _checkpoint("b", 2), b"b")
    b.commit_transaction(30)

    conf = kafka.consumer_config("t-read")
    hidden = load_job(conf, control, "b", settle=0)
    assert hidden is not None and hidden.checkpoint == 1, "the open transaction should hide checkpoint 2"
    with pytest.raises(SourceError, match="did not end within"):
        load_job(conf, control, "b", settle=0.5)
    # The broker aborts A's transaction once its timeout (4 s) passes; the resume then sees B's newest.
    t0 = time.monotonic()
    state = load_job(conf, control, "b", settle=60)
    assert state is not None and state.checkpoint == 2
    assert 1.0 < time.monotonic() - t0 < 60
    assert load_job(conf, control, "a", settle=60) is None  # A's checkpoint was aborted


def test_a_settled_read_does_not_wait_for_transactions_begun_after_it(kafka: KafkaSettings,
                                                                       txn_producer: Producer) -> None:
    topic = _topic(kafka, "rte.later", partitions=1)
    txn_producer.begin_transaction()
    first = _send(txn_producer, topic, "a", 10)
    txn_producer.commit_transaction(30)
    t0 = time.monotonic()
    got = [m.value() for m in kafka_util.read_to_end(kafka.consumer_config("t-read"), topic, settle=30)]
    assert sorted(got) == sorted(first)
    assert time.monotonic() - t0 < 10

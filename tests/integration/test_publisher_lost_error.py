"""A producer call that fails without an error (confluent-kafka returns NULL and sets nothing: it can lose
the fatal error its error callback raised inside a long ``flush()``) still stops the instance with what
Kafka meant: fenced when a newer instance took over, a fatal producer error otherwise. The SystemError is
raised by hand here (the client loses its error only in a rare race); the producers and the broker are
real."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer

from producers.publish import Publisher
from runtime.contract.codec import AvroCodec
from runtime.errors import CommitError, DeliveryError, FencedError
from runtime.kafka import clients as kafka_util
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics

pytestmark = pytest.mark.integration

LOST = "<method 'flush' of 'cimpl.Producer' objects> returned NULL without setting an exception"


def _publisher(kafka: KafkaSettings, tid: str) -> Publisher:
    pub = Publisher(kafka, AvroCodec(), Metrics(), source="jetstream", owner="job lost", id_kind="job",
                    transactional_id=tid)
    assert pub.start("on")
    return pub


def _in_transaction(pub: Publisher, topic: str) -> None:
    pub.begin()
    pub.produce(topic, b"did:plc:a", b"value")
    assert pub.producer is not None and pub.producer.flush(30) == 0


def test_a_lost_error_of_a_fenced_instance_stops_it_as_fenced(kafka: KafkaSettings) -> None:
    topic = f"{kafka.topic_prefix}.lost"
    kafka_util.ensure_topics(kafka_util.admin(kafka.client_config()), [topic], partitions=1, replication=1)
    tid = f"lost-{uuid.uuid4().hex[:8]}"
    first = _publisher(kafka, tid)
    _in_transaction(first, topic)
    newer = Producer(kafka.producer_config(transactional_id=tid))
    newer.init_transactions(30)  # takes the transactional id over: the first instance is fenced
    with pytest.raises(FencedError) as caught, first.kafka_call("flushing", DeliveryError):
        raise SystemError(LOST)
    assert "fenced" in str(caught.value) and isinstance(caught.value.__cause__, SystemError)


def test_a_lost_error_of_a_producer_that_is_not_fenced_aborts_and_stops_loudly(kafka: KafkaSettings) -> None:
    topic = f"{kafka.topic_prefix}.lost"
    kafka_util.ensure_topics(kafka_util.admin(kafka.client_config()), [topic], partitions=1, replication=1)
    pub = _publisher(kafka, f"lost-{uuid.uuid4().hex[:8]}")
    _in_transaction(pub, topic)
    with pytest.raises(CommitError) as caught, pub.kafka_call("flushing", DeliveryError):
        raise SystemError(LOST)
    assert not isinstance(caught.value, FencedError)
    assert "failed without saying why" in str(caught.value) and not pub.in_txn
    pub.begin()  # the open transaction was aborted, not left open: a new one begins
    assert pub.in_txn


def test_other_errors_pass_through_unchanged(kafka: KafkaSettings) -> None:
    pub = _publisher(kafka, f"lost-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ValueError, match="not Kafka"), pub.kafka_call("flushing", DeliveryError):
        raise ValueError("not Kafka")

"""Kafka SASL settings reach the wire: a client configured from the environment authenticates with SASL
against the session broker (whose listener has no SASL, so the attempt fails and says so)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, Producer

from runtime.kafka.settings import KafkaSettings
from tests.ops_tools import parse_cli

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_sasl_settings_make_the_client_authenticate(kafka_bootstrap: str, mechanism: str) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "KAFKA_SASL_MECHANISM": mechanism, "KAFKA_SASL_USERNAME": "backfill",
           "KAFKA_SASL_PASSWORD": "sasl-pw-0c9d"}
    kafka = KafkaSettings.from_namespace(parse_cli(["status"], env))
    errors: list[KafkaError] = []
    producer = Producer({**kafka.producer_config(), "error_cb": errors.append})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any("SASL" in e.str() for e in errors):
        producer.poll(0.2)
    assert any("SASL" in e.str() for e in errors), [e.str() for e in errors]
    assert all("sasl-pw-0c9d" not in e.str() for e in errors)


def test_plaintext_settings_connect(kafka_bootstrap: str) -> None:
    # the same client without SASL reaches the broker: the failure above is the authentication
    kafka = KafkaSettings.from_namespace(parse_cli(["status"], {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}))
    producer = Producer(kafka.producer_config())
    metadata = producer.list_topics(timeout=10)
    assert metadata.brokers

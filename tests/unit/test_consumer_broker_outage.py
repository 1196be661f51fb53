"""A consumer rides out a broker away for longer than ``--control-timeout`` (issue 13, found by
tests/integration/test_kafka_restart.py with a 25 s outage): the ``--until-done`` check that cannot
read the control topic asks again later (for up to ``CONTROL_PATIENCE`` seconds) instead of
stopping the consumer, and a topic refresh that gets no metadata keeps the subscription."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

import consumers.base as base
from consumers.base import CONTROL_PATIENCE, ConsumerOptions, GroupConsumer
from runtime.contract.codec import AvroCodec
from runtime.errors import SourceError
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoSink:
    name = "queue"

    def load_offsets(self, group: str, partitions: list[Any]) -> dict[Any, Any]:
        return {}


def consumer(clock: Clock) -> GroupConsumer:
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="t")
    return GroupConsumer(kafka, NoSink(), ConsumerOptions(group="g", until_done="job"),  # type: ignore[arg-type]
                         Metrics(), AvroCodec(), clock=clock)


def test_an_unreadable_control_topic_is_asked_again_until_the_patience_runs_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    c = consumer(clock)
    calls = []

    def unreadable(*_args: object, **_kwargs: object) -> dict[str, object]:
        calls.append(clock.now)
        raise SourceError("reading t.control.jobs: no end offsets within 30 s (broker transport failure)")

    monkeypatch.setattr(base, "load_jobs", unreadable)
    try:
        assert c._job_done() is False  # not known now: not done, and no error
        clock.now += 0.5
        assert c._job_done() is False and len(calls) == 1  # checked again only after a second
        clock.now += CONTROL_PATIENCE - 1
        assert c._job_done() is False and len(calls) == 2
        # The broker answers again: the patience starts over.
        monkeypatch.setattr(base, "load_jobs", lambda *_a, **_k: {})
        clock.now += 2
        assert c._job_done() is False  # the job has no checkpoint yet
        monkeypatch.setattr(base, "load_jobs", unreadable)
        clock.now += 2
        assert c._job_done() is False
        clock.now += CONTROL_PATIENCE
        with pytest.raises(SourceError, match="no end offsets"):
            c._job_done()
    finally:
        c._close()


def test_a_topic_refresh_without_metadata_keeps_the_subscription(monkeypatch: pytest.MonkeyPatch) -> None:
    c = consumer(Clock())
    c._subscribed = ["t.app.bsky.feed.post"]

    def no_metadata() -> list[str]:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata: broker transport failure"))

    monkeypatch.setattr(c, "wanted_topics", no_metadata)
    try:
        c._refresh_subscription()
        assert c._subscribed == ["t.app.bsky.feed.post"]
    finally:
        c._close()

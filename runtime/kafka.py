"""Kafka plumbing shared by producers and consumers: topic creation, watermarks, reading a topic to its end.

Works on Apache Kafka and on the Tansu test broker; where Tansu is known to differ (the ListOffsets
high watermark after multi-record batches), only fetch-derived watermarks are trusted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from runtime.errors import SourceError

log = logging.getLogger(__name__)


def admin(conf: dict[str, Any]) -> AdminClient:
    """An admin client for ``conf`` (from KafkaSettings.client_config())."""
    return AdminClient(conf)


def existing_topics(admin_client: AdminClient, timeout: float = 30.0) -> set[str]:
    """Names of every topic the cluster has now."""
    return set(admin_client.list_topics(timeout=timeout).topics)


def ensure_topics(
    admin_client: AdminClient,
    topics: Iterable[str],
    *,
    partitions: int,
    replication: int,
    config: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet; return the ones created.

    Raises:
        SourceError: the broker refused to create a topic (other than "already exists").
    """
    wanted = sorted(set(topics))
    existing = existing_topics(admin_client, timeout)
    missing = [t for t in wanted if t not in existing]
    if not missing:
        return []
    futures = admin_client.create_topics(
        [NewTopic(t, partitions, replication, config=dict(config or {})) for t in missing],
        operation_timeout=timeout, request_timeout=timeout)
    created = []
    for topic, fut in futures.items():
        try:
            fut.result()
            created.append(topic)
        except KafkaException as e:
            err = e.args[0]
            if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise SourceError(f"cannot create topic {topic}: {err}") from e
    if created:
        log.info("created topics %s", ", ".join(created))
        _wait_metadata(admin_client, created, timeout)
    return created


def _wait_metadata(admin_client: AdminClient, topics: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        md = admin_client.list_topics(timeout=timeout).topics
        if all(t in md and md[t].partitions and not md[t].error for t in topics):
            return
        time.sleep(0.05)


def check_reachable(admin_client: AdminClient, servers: str, timeout: float = 15.0) -> None:
    """Fail fast with a clear error when no broker answers.

    Raises:
        SourceError: no metadata from ``servers`` within ``timeout`` seconds.
    """
    try:
        admin_client.list_topics(timeout=timeout)
    except KafkaException as e:
        raise SourceError(f"cannot reach Kafka at {servers} within {timeout:.0f} s: {e.args[0]}") from e


def list_topics(admin_client: AdminClient, timeout: float = 30.0) -> dict[str, int]:
    """Every topic and its partition count."""
    return {name: len(t.partitions) for name, t in admin_client.list_topics(timeout=timeout).topics.items()}


def read_to_end(
    conf: dict[str, Any],
    topic: str,
    *,
    idle_timeout: float = 1.0,
    max_wait: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Message]:
    """Yield every committed message of ``topic`` from the beginning, stopping at its end.

    The end is reached when every partition's position is at the fetch-derived high watermark
    (or the partition is empty and nothing arrived for ``idle_timeout``).

    Args:
        conf: a consumer config (group.id is set to a throwaway value if absent; nothing is committed).
    """
    conf = {**conf, "enable.auto.commit": False, "isolation.level": "read_committed",
            "enable.partition.eof": True}
    conf.setdefault("group.id", "atproto-backfill-reader")
    md_consumer = Consumer(conf)
    try:
        md = md_consumer.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            return
        parts = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(md.partitions)]
        md_consumer.assign(parts)
        done: set[int] = set()
        deadline = clock() + max_wait
        last_msg = clock()
        while len(done) < len(parts) and clock() < deadline:
            msg = md_consumer.poll(0.2)
            if msg is None:
                if clock() - last_msg >= idle_timeout:
                    # idle: a partition whose cached high watermark is reached (or unknown) is done
                    for tp in parts:
                        _low, high = md_consumer.get_watermark_offsets(tp, cached=True)
                        pos = md_consumer.position([TopicPartition(topic, tp.partition)])[0].offset
                        if high < 0 or pos < 0 or pos >= high:
                            done.add(tp.partition)
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    done.add(msg.partition() or 0)
                    continue
                raise SourceError(f"reading {topic}: {err}")
            last_msg = clock()
            yield msg
    finally:
        md_consumer.close()

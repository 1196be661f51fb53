"""Kafka plumbing shared by producers and consumers: topic creation, reading a topic to its end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

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


#: Errors no retry mends: a read fails at once on these. Every other error is ridden out until the
#: read's deadline: while a broker dies or restarts, its partitions' leaders move to other brokers
#: (NOT_LEADER, LEADER_NOT_AVAILABLE, connection refused, and _DESTROY_BROKER when the dead broker
#: leaves the metadata) and librdkafka retries against the new leaders.
_PERMANENT: Final = frozenset({
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._SSL, KafkaError._INVALID_ARG, KafkaError._UNSUPPORTED_FEATURE, KafkaError.UNSUPPORTED_VERSION,
})


def _transient(err: KafkaError) -> bool:
    return not err.fatal() and err.code() not in _PERMANENT


def read_to_end(
    conf: dict[str, Any],
    topic: str,
    *,
    max_wait: float = 30.0,
    settle: float = 0.0,
    missing_ok: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Message]:
    """Yield every committed message of ``topic`` from its beginning up to its end when the read starts.

    The end of each partition is its last stable offset, listed up front (ListOffsets with
    read_committed isolation): everything committed before the call is read, and a transaction
    still open at the end (a running producer holds one) ends the read where it begins instead of
    being waited for. Messages past the end are not yielded. A missing topic yields nothing, unless
    ``missing_ok`` is False.

    Args:
        conf: a consumer config (group.id is set to a throwaway value if absent; nothing is committed).
        max_wait: seconds to reach the end of every partition, the broker's failovers included.
        settle: when above 0, first wait up to this many seconds for every transaction open when the
            read starts to end (committed or aborted), so that the read covers everything written
            before it, another producer's open transaction notwithstanding. A transaction ends within
            the broker's transaction timeout (a dead producer's is aborted then); a resume reads
            with ``settle`` above it.
        missing_ok: False for a topic known to exist (the caller just made sure of it): a broker
            that does not know it yet (its metadata lagging) is asked again until ``max_wait``
            instead of the topic being read as empty.

    Raises:
        SourceError: the end was not reached within ``max_wait`` seconds, a transaction open at the
            start did not end within ``settle`` seconds, the topic does not exist and ``missing_ok``
            is False, or the broker refused the read. Never a partial result: a caller that got no
            error saw everything.
    """
    conf = {**conf, "enable.auto.commit": False, "isolation.level": "read_committed",
            "enable.partition.eof": False}
    conf.setdefault("group.id", "atproto-backfill-reader")
    deadline = clock() + max_wait
    consumer = Consumer(conf)
    try:
        ends = _stable_ends(consumer, topic, deadline, clock, max_wait, missing_ok)
        if settle > 0 and ends:
            ends = _settled_ends(conf, consumer, topic, ends, settle, clock)
            deadline = max(deadline, clock() + max_wait)
        pending = {p for p, (low, end) in ends.items() if end > low}
        if not pending:
            return
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(pending)])
        last_error: KafkaError | None = None
        while pending:
            now = clock()
            if now >= deadline:
                raise SourceError(_unfinished(topic, consumer, ends, pending, max_wait, last_error))
            msg = consumer.poll(min(0.2, deadline - now))
            if msg is not None:
                err = msg.error()
                if err is None:
                    p = msg.partition() or 0
                    offset = msg.offset()
                    if p in pending and offset is not None and offset < ends[p][1]:
                        yield msg
                elif _transient(err):
                    last_error = err
                else:
                    raise SourceError(f"reading {topic}: {err}")
            # The position passes commit markers and aborted records too, which are never delivered.
            for tp in consumer.position([TopicPartition(topic, p) for p in sorted(pending)]):
                if tp.offset >= ends[tp.partition][1]:
                    pending.discard(tp.partition)
                    consumer.pause([TopicPartition(topic, tp.partition)])
    finally:
        consumer.close()


def _stable_ends(consumer: Consumer, topic: str, deadline: float, clock: Callable[[], float],
                 max_wait: float, missing_ok: bool = True) -> dict[int, tuple[int, int]]:
    """partition -> (log start offset, last stable offset) of ``topic`` (empty when it does not exist).

    A read_committed consumer's ListOffsets gives the last stable offset as the high watermark.

    Raises:
        SourceError: no answer from every partition's leader before ``deadline`` (or, unless
            ``missing_ok``, no broker knew the topic).
    """
    last: object = None
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            raise SourceError(f"reading {topic}: no end offsets within {max_wait:g} s ({last})")
        try:
            md = consumer.list_topics(topic, timeout=min(remaining, 10.0)).topics.get(topic)
            if md is not None and md.error is not None and md.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                if missing_ok:
                    return {}
                last = f"{md.error}: the topic does not exist or this broker does not know it yet"
            elif md is None or md.error is not None or not md.partitions:
                last = md.error if md is not None else "no metadata"
            else:
                ends = {}
                for p in sorted(md.partitions):
                    ends[p] = consumer.get_watermark_offsets(
                        TopicPartition(topic, p), timeout=max(0.1, min(deadline - clock(), 10.0)), cached=False)
                return ends
        except KafkaException as e:
            err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
            if err is not None and not _transient(err):
                raise SourceError(f"reading {topic}: {err}") from e
            last = err or e
        time.sleep(min(0.2, max(0.0, deadline - clock())))  # the leader is moving: ask again shortly


def _settled_ends(conf: dict[str, Any], consumer: Consumer, topic: str, ends: dict[int, tuple[int, int]],
                  settle: float, clock: Callable[[], float]) -> dict[int, tuple[int, int]]:
    """Wait until each partition's last stable offset reaches its high watermark of now; the new ends.

    The last stable offset stops at the first record of the oldest open transaction, so records
    committed after it (another job's checkpoint, say) are not readable yet. Transactions begun
    after this call start past today's high watermark and do not hold the wait.

    Raises:
        SourceError: a transaction open now is still open after ``settle`` seconds.
    """
    peek = Consumer({**conf, "isolation.level": "read_uncommitted"})
    try:
        high = {p: peek.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1] for p in ends}
    except KafkaException as e:
        raise SourceError(f"reading {topic}: no high watermark: {e.args[0]}") from e
    finally:
        peek.close()
    deadline = clock() + settle
    logged = False
    while True:
        waiting = {p: (ends[p][1], high[p]) for p in ends if ends[p][1] < high[p]}
        if not waiting:
            return ends
        if not logged:
            log.info("reading %s: waiting up to %.0f s for open transactions to end (partition: last stable "
                     "offset, high watermark: %s)", topic, settle, waiting)
            logged = True
        if clock() >= deadline:
            raise SourceError(f"reading {topic}: transactions open at {waiting} (partition: last stable offset, "
                              f"high watermark) did not end within {settle:.0f} s")
        time.sleep(0.1)
        try:
            for p in waiting:
                ends[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
        except KafkaException as e:
            if not _transient(e.args[0]):
                raise SourceError(f"reading {topic}: {e.args[0]}") from e


def _unfinished(topic: str, consumer: Consumer, ends: dict[int, tuple[int, int]], pending: set[int],
                max_wait: float, last_error: KafkaError | None) -> str:
    at = {tp.partition: tp.offset for tp in consumer.position([TopicPartition(topic, p) for p in sorted(pending)])}
    parts = ", ".join(f"[{p}] at {at.get(p)} of {ends[p][1]}" for p in sorted(pending))
    tail = f"; last error: {last_error}" if last_error is not None else ""
    return f"reading {topic}: the end was not reached within {max_wait:g} s ({parts}){tail}"

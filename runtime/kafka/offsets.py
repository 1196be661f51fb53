"""Offsets: a partition's three ends, and what a stored offset counts.

Ends, from ListOffsets: log start, last stable offset, high watermark.

* ``low``: the log start offset (retention and compaction move it forward);
* ``stable``: the last stable offset, what a ``read_committed`` consumer can read up to (before the
  first record of a transaction still open);
* ``high``: the high watermark (what Kafka's own tools call the log-end offset and count lag from).

Offsets between two records are not always records: each transaction ends with a commit or abort
marker taking one offset, and an aborted transaction's records are skipped by ``read_committed``
readers. Counting the records in a range therefore needs reading it (``runtime.commands.status``).

Origins. An offset stored outside Kafka (a sink's table, next to the rows it covers) counts the
records of one incarnation of one topic in one cluster: :class:`StoredOffset` keeps that
:class:`Origin` with it, and :func:`mismatch` says when it must not be used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import IsolationLevel, KafkaException, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

TP = tuple[str, int]


@dataclass(frozen=True)
class Ends:
    """The ends of one partition (see the module docstring)."""

    low: int
    stable: int
    high: int


def _spec(which: str) -> Any:
    if which == "earliest":
        return OffsetSpec.earliest()  # type: ignore[no-untyped-call]
    return OffsetSpec.latest()  # type: ignore[no-untyped-call]


def list_ends(admin: AdminClient, partitions: Iterable[TP], timeout: float) -> dict[TP, Ends]:
    """The ends of ``partitions`` (three ListOffsets requests, all partitions in each).

    A partition the broker does not answer for is left out (and logged).
    """
    tps = sorted(set(partitions))
    if not tps:
        return {}
    earliest, latest = _spec("earliest"), _spec("latest")
    requests = {
        "low": (earliest, IsolationLevel.READ_UNCOMMITTED),
        "stable": (latest, IsolationLevel.READ_COMMITTED),
        "high": (latest, IsolationLevel.READ_UNCOMMITTED),
    }
    futures = {name: admin.list_offsets({TopicPartition(t, p): spec for t, p in tps}, isolation_level=level,
                                        request_timeout=timeout)
               for name, (spec, level) in requests.items()}
    values: dict[TP, dict[str, int]] = {}
    for name, by_tp in futures.items():
        for tp, future in by_tp.items():
            try:
                values.setdefault((tp.topic, tp.partition), {})[name] = future.result(timeout=timeout + 5).offset
            except (KafkaException, TimeoutError) as e:
                log.warning("ListOffsets (%s) failed for %s[%d]: %s", name, tp.topic, tp.partition, e)
    return {tp: Ends(**v) for tp, v in values.items() if len(v) == 3}


# ------------------------------------------------------------------ what a stored offset counts

#: A topic id of all zeros: the broker has none for the topic (Kafka before topic ids).
_NO_TOPIC_ID: Final = "AAAAAAAAAAAAAAAAAAAAAA"


@dataclass(frozen=True)
class Origin:
    """What an offset counts: the Kafka cluster, and the incarnation of the topic in it.

    A topic deleted and created again under the same name gets a new topic id; a cluster created
    anew (``docker compose down -v``) a new cluster id. Offsets of one are meaningless in the other.
    None: not known (the broker gives no topic id, or the offset was stored before identities were).
    """

    cluster_id: str | None = None
    topic_id: str | None = None

    def __str__(self) -> str:
        return f"cluster {self.cluster_id or '?'}, topic id {self.topic_id or '?'}"


UNKNOWN: Final = Origin()


@dataclass(frozen=True)
class StoredOffset:
    """A partition's next offset as a sink stored it, with the origin it was taken from."""

    offset: int
    origin: Origin = UNKNOWN


def topic_origins(admin: AdminClient, topics: Iterable[str], timeout: float) -> dict[str, Origin]:
    """The current origin of each of ``topics`` (a topic the broker does not describe is left out).

    The cluster id comes from a Metadata response, which any broker answers (DescribeCluster needs
    the controller, which is away while a killed controller fails over); the topic ids from
    DescribeTopics, also served from metadata.

    Raises:
        KafkaException: no broker answered for the cluster id (what every check needs).
    """
    names = sorted(set(topics))
    out: dict[str, Origin] = {}
    if not names:
        return out
    cluster_id = admin.list_topics(topic=names[0], timeout=timeout).cluster_id or None
    futures = admin.describe_topics(TopicCollection(names), request_timeout=timeout)
    for name, future in futures.items():
        try:
            described = future.result(timeout=timeout + 5)
        except (KafkaException, TimeoutError) as e:
            log.warning("DescribeTopics failed for %s: %s", name, e)
            continue
        raw = described.topic_id
        topic_id = str(raw) if raw is not None else None
        out[name] = Origin(cluster_id, None if topic_id in (None, "", _NO_TOPIC_ID) else topic_id)
    return out


def mismatch(stored: StoredOffset, current: Origin, ends: Ends | None) -> str | None:
    """Why ``stored`` must not be used as the next offset of a partition now at ``current`` with
    ``ends``, or None if it may.

    A stored offset is trusted only for the cluster and the topic incarnation it was taken from
    (compared where both sides know them) and only if the partition reaches it: an offset past the
    high watermark counts records that are not there (a topic emptied and created again, a broker
    that lost its log), so it is a mismatch too, never waited for.
    """
    old = stored.origin
    if old.cluster_id and current.cluster_id and old.cluster_id != current.cluster_id:
        return f"stored for cluster {old.cluster_id}, the cluster is now {current.cluster_id}"
    if old.topic_id and current.topic_id and old.topic_id != current.topic_id:
        return f"stored for topic id {old.topic_id}, the topic is now {current.topic_id} (deleted and created again)"
    if ends is not None and stored.offset > ends.high:
        return f"stored offset {stored.offset} is past the partition's end {ends.high}"
    return None

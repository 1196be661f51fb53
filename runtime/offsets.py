"""A partition's three ends, from ListOffsets: log start, last stable offset, high watermark.

* ``low``: the log start offset (retention and compaction move it forward);
* ``stable``: the last stable offset, what a ``read_committed`` consumer can read up to (before the
  first record of a transaction still open);
* ``high``: the high watermark (what Kafka's own tools call the log-end offset and count lag from).

Offsets between two records are not always records: each transaction ends with a commit or abort
marker taking one offset, and an aborted transaction's records are skipped by ``read_committed``
readers. Counting the records in a range therefore needs reading it (``runtime.status``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import IsolationLevel, KafkaException, TopicPartition
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

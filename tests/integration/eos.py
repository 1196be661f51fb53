"""Exactly-once checks on the real broker, shared by the kill -9 and fencing tests (no tests here).

* :func:`committed` reads what the topics of a prefix hold for read_committed readers: what a
  producer really committed, whatever the sinks would de-duplicate.
* :func:`queue_in_write` tells whether a queue consumer holds its SQLite write transaction now.
* :func:`kill_in_transaction` kills a producer process with SIGKILL at a moment when the broker
  holds data of its open transaction: the process (group) is frozen with SIGSTOP, the topics are
  checked for a transaction in progress (a partition's last stable offset behind its high
  watermark), and only then killed; otherwise it is resumed and checked again a little later.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from runtime.contract.codec import AvroCodec
from runtime.contract.records import event_key
from runtime.contract.topics import TopicMap
from runtime.contract.typed import event_from_datum
from runtime.kafka import clients as kafka_util
from runtime.kafka.settings import KafkaSettings


def prefix_topics(kafka: KafkaSettings) -> dict[str, int]:
    """Every topic of ``kafka.topic_prefix`` and its partition count."""
    names = kafka_util.list_topics(kafka_util.admin(kafka.client_config()))
    return {t: n for t, n in names.items() if t.startswith(kafka.topic_prefix + ".")}


def event_topics(kafka: KafkaSettings) -> list[str]:
    """The topics of the prefix that hold events: one per collection, identity, account and sync."""
    topics = TopicMap(kafka.topic_prefix)
    return sorted(t for t in prefix_topics(kafka) if topics.collection_of(t) is not None)


def committed(kafka: KafkaSettings, topics: Iterable[str], *,
              settle: float = 30.0) -> list[tuple[str, str, dict[str, Any]]]:
    """``(topic, schema name, datum)`` of every committed message of ``topics`` (read_committed, to
    each partition's end), once no transaction is in progress on them: call it when the producers
    are done.

    Kafka answers a transaction's commit once the commit is decided, and writes the markers that
    make its records readable just after: until they are written a partition's last stable offset
    stays before the transaction. So the read first waits (up to ``settle`` seconds) until every
    partition's last stable offset reached its high watermark.
    """
    topics = list(topics)
    deadline = time.monotonic() + settle
    while pending := open_transaction(kafka, topics):
        assert time.monotonic() < deadline, f"transactions still open after {settle} s: {pending[:5]}"
        time.sleep(0.05)
    codec = AvroCodec()
    out: list[tuple[str, str, dict[str, Any]]] = []
    for topic in topics:
        for msg in kafka_util.read_to_end(kafka.consumer_config("eos-reader"), topic, max_wait=60):
            value = msg.value()
            assert value is not None, f"a null value in {topic}"
            name, datum = codec.decode(value)
            out.append((topic, name, datum))
    return out


def committed_event_keys(kafka: KafkaSettings) -> Counter[str]:
    """How many times each event (by its identity, ``event_key``) is committed in the event topics."""
    return Counter(event_key(event_from_datum(name, datum)) for _, name, datum in committed(kafka, event_topics(kafka)))


def _watermark(consumer: Consumer, tp: TopicPartition, wait: float = 10.0) -> int:
    """The high watermark ``consumer`` sees (the last stable offset for a read_committed one), asked
    again while a topic created a moment ago has no leader known yet."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1])
        except KafkaException as e:
            err = e.args[0] if e.args else None
            retriable = isinstance(err, KafkaError) and err.code() in (
                KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                KafkaError.UNKNOWN_TOPIC_OR_PART)
            if not retriable or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def open_transaction(kafka: KafkaSettings, topics: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """Partitions holding data of a transaction still in progress: last stable offset < high watermark."""
    names = prefix_topics(kafka)
    wanted = sorted(names) if topics is None else sorted(t for t in topics if t in names)
    committed_view = Consumer(kafka.consumer_config("eos-lso", **{"isolation.level": "read_committed"}))
    raw_view = Consumer(kafka.consumer_config("eos-hw", **{"isolation.level": "read_uncommitted"}))
    out: list[tuple[str, int]] = []
    try:
        for t in wanted:
            for p in range(names[t]):
                tp = TopicPartition(t, p)
                lso, hw = _watermark(committed_view, tp), _watermark(raw_view, tp)
                if lso < hw:
                    out.append((t, p))
    finally:
        committed_view.close()
        raw_view.close()
    return out


def kill_in_transaction(proc: subprocess.Popen[bytes], kafka: KafkaSettings, *, group: bool = False,
                        others: Sequence[subprocess.Popen[bytes]] = (), timeout: float = 60.0,
                        ready: Callable[[], bool] | None = None) -> list[tuple[str, int]]:
    """SIGKILL ``proc`` (its whole process group with ``group``) while the broker holds data of its
    open transaction; return the partitions that held it.

    ``others``: producers writing to the same topics meanwhile. To tell their transactions from
    ``proc``'s, they are frozen at a moment when no transaction is open at all, and stay frozen
    (two seconds at most per try) while ``proc`` is watched alone.
    ``ready``: killed only once this also holds (checked while the processes run).

    Raises:
        AssertionError: a process exited first, or no moment was found within ``timeout``.
    """
    def send(p: subprocess.Popen[bytes], sig: signal.Signals, whole_group: bool = False) -> None:
        if whole_group:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)

    def freeze_others(sig: signal.Signals) -> None:
        for other in others:
            send(other, sig)

    deadline = time.monotonic() + timeout
    while True:
        for p in (proc, *others):
            assert p.poll() is None, f"a producer exited with {p.returncode} before the kill"
        assert time.monotonic() < deadline, f"no open transaction of the producer seen within {timeout} s"
        if ready is not None and not ready():
            time.sleep(0.05)
            continue
        watch_until = time.monotonic() + 2.0
        if others:
            freeze_others(signal.SIGSTOP)
            send(proc, signal.SIGSTOP, group)
            clean = not open_transaction(kafka)
            send(proc, signal.SIGCONT, group)
            if not clean:
                freeze_others(signal.SIGCONT)
                time.sleep(0.05)
                continue
        try:
            while True:
                send(proc, signal.SIGSTOP, group)  # frozen: its transaction can neither commit nor grow
                try:
                    held = open_transaction(kafka)
                except BaseException:
                    send(proc, signal.SIGKILL, group)
                    raise
                if held:
                    send(proc, signal.SIGKILL, group)
                    proc.wait(30)
                    return held
                send(proc, signal.SIGCONT, group)
                if not others or time.monotonic() >= watch_until:
                    break
                time.sleep(0.02)
        finally:
            if others:
                freeze_others(signal.SIGCONT)
        time.sleep(0.05)


def queue_in_write(path: Path) -> bool:
    """True when another connection holds the queue database's write transaction now."""
    with contextlib.closing(sqlite3.connect(path, timeout=0, isolation_level=None)) as conn:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                return True
            raise
        conn.execute("ROLLBACK")
        return False

"""The consumer-group loop every sink runs in, and the contract every sink implements.

Flow: poll a batch -> decode Avro (either wire format) -> rebuild the event -> skip what is past
the end watermark -> ``sink.add`` (transform; a failure is dead-lettered to ``<topic>.dlq``) ->
``sink.flush(offsets)`` writes the rows *and* each partition's next offset in one transaction ->
the offsets are also committed to Kafka (for lag monitoring and ``backfill status`` only).

Transaction markers: a producer's transaction ends with a commit marker that takes an offset no
consumer ever receives, so "last message + 1" stops short of a partition's end. Once nothing is
pending, the consumer's position (which librdkafka moves past the markers it fetched) is committed
to Kafka as well, so a group that has read everything shows a lag of 0 in Kafka's own tools. The
sink keeps "last message + 1": seeking to either reads the same messages.

Exactly once: on assignment the consumer seeks every partition to the offset the sink stored, so a
kill -9, a rebalance or a replayed topic neither loses nor duplicates a row. Dead letters are
flushed before the batch whose offsets pass them.

Stored offsets are trusted only for what they count: each is stored with its topic's origin (the
cluster id and the topic id), and on assignment an offset of another origin, or one past its
partition's end, is not sought to (a cluster or topic created anew while the sink's database was
kept): the partition is read from its beginning, which the sinks' de-duplication makes safe, or the
consumer refuses to start (``offset_mismatch``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from runtime.contract.codec import AvroCodec
from runtime.contract.nsid import CollectionFilter
from runtime.contract.records import Event, RecordEvent
from runtime.contract.topics import DID_LEVEL, TopicMap
from runtime.contract.typed import event_from_datum
from runtime.errors import (
    CommitError,
    ConfigError,
    DecodeError,
    DropError,
    OffsetMismatchError,
    SinkUnavailableError,
    SourceError,
)
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import FINISHED, JobState, load_jobs
from runtime.kafka.deadletter import DeadLetters
from runtime.kafka.offsets import UNKNOWN, Origin, StoredOffset, list_ends, mismatch, topic_origins
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Health, Metrics, collection_label

log = logging.getLogger(__name__)

TP = tuple[str, int]

#: Seconds an assignment waits for the topics' ids (leaders moving after a broker failure).
DESCRIBE_PATIENCE: Final = 120.0
#: Seconds an ``--until-done`` consumer goes on asking for its job's checkpoint while the control
#: topic cannot be read (a broker restarting); past them the failure stops it.
CONTROL_PATIENCE: Final = 300.0
#: Seconds a consume call waits for messages at most (less while a batch's linger runs out).
POLL_TIMEOUT: Final = 0.1
#: ``--offset-mismatch``: what a consumer does with stored offsets of another cluster or topic.
OFFSET_MISMATCH_POLICIES: Final = ("restart", "refuse")


@dataclass(slots=True)
class Consumed:
    """One decoded message with its origin."""

    topic: str
    partition: int
    offset: int
    schema: str
    event: Event
    kafka_timestamp_ms: int
    #: The decoded Avro datum (the schema's typed fields and the producer's ``record_json``).
    datum: dict[str, Any] | None = None


class Sink(Protocol):
    """Where a consumer group writes. One transaction per batch, offsets stored with the rows."""

    name: str

    def load_offsets(self, group: str, partitions: list[TP]) -> dict[TP, StoredOffset]:
        """The next offset stored for each partition, with the origin it was stored for (absent:
        never written)."""

    def forget_offsets(self, group: str, partitions: list[TP]) -> None:
        """Delete the stored offsets of ``partitions`` (they count records of another cluster or
        topic incarnation): the partitions are read from their beginning and stored afresh."""

    def add(self, item: Consumed) -> None:
        """Transform and buffer one message.

        Raises:
            DropError: the message cannot be transformed (it is dead-lettered by the caller).
        """

    def flush(self, group: str, offsets: dict[TP, int], origins: Mapping[str, Origin] | None = None) -> int:
        """Write the buffered rows and ``offsets`` in one transaction; return rows written.

        ``origins``: per topic, the cluster and topic ids the offsets count (stored with them).

        Raises:
            SinkUnavailableError: transient failure; the buffer is kept and the call retried.
            CommitError: any other failure (fatal).
        """

    def discard(self) -> None:
        """Forget the buffered rows (their offsets were not stored, so they will be re-read)."""

    def close(self) -> None:
        """Release connections."""


@dataclass
class ConsumerOptions:
    """How a consumer group member batches, stops and throttles.

    Args:
        collections: NSID patterns selecting collection topics (empty = every collection topic).
        include_account_events: also consume the DID-level topics: ``<prefix>.identity``,
            ``<prefix>.account`` and ``<prefix>.sync``.
        batch_size: messages per sink transaction.
        linger: seconds to wait for a batch to fill.
        end_time_us: skip (and count) events whose time is at or past this watermark.
        until_done: exit once this producer job is finished and fully consumed.
        batch_delay: pause between batches (seed 004's gentle mode).
        max_memory_mb: pause the partitions while RSS is above this (0 = no limit).
        idle_exit: exit after this many seconds without messages (0 = never; for tests/demos).
        offset_mismatch: what to do with stored offsets that are not from this cluster and topic
            incarnation, or past a partition's end: ``restart`` reads those partitions from their
            beginning (a warning names both identities), ``refuse`` stops with
            :class:`~runtime.errors.OffsetMismatchError`.
    """

    group: str
    collections: list[str] = field(default_factory=list)
    include_account_events: bool = True
    batch_size: int = 5000
    linger: float = 0.5
    end_time_us: int | None = None
    until_done: str | None = None
    until_offsets: dict[str, dict[str, int]] | None = None
    batch_delay: float = 0.0
    max_memory_mb: int = 0
    idle_exit: float = 0.0
    topic_refresh: float = 5.0
    dlq: bool = True
    offset_mismatch: str = "restart"
    #: Seconds an until-done consumer reads on to its partitions' ends so its positions pass the
    #: trailing transaction markers before it commits them and exits.
    settle: float = 2.0


@dataclass
class ConsumerStats:
    """Counters of one consumer run."""

    consumed: int = 0
    written_rows: int = 0
    batches: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    by_collection: dict[str, int] = field(default_factory=dict)
    stop_reason: str = ""


class GroupConsumer:
    """One member of a consumer group writing into a sink.

    Args:
        kafka: Kafka settings with resolved bootstrap servers.
        sink: the sink.
        options: batching/stop options.
        metrics, health: observability.
        codec: decoder (reads both wire formats).
        stop_event: set it to stop gracefully (SIGTERM handler, combined mode).
        clock: monotonic seconds.
    """

    def __init__(self, kafka: KafkaSettings, sink: Sink, options: ConsumerOptions, metrics: Metrics,
                 codec: AvroCodec, *, health: Health | None = None,
                 stop_event: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 extra_consumer_config: dict[str, Any] | None = None) -> None:
        self.kafka = kafka
        self.sink = sink
        self.opts = options
        self.metrics = metrics
        self.codec = codec
        self.health = health or Health()
        self.stop_event = stop_event or threading.Event()
        self.clock = clock
        self.topics = TopicMap(kafka.topic_prefix)
        self.filter = CollectionFilter(options.collections)
        self.stats = ConsumerStats()
        conf = kafka.consumer_config(options.group, **(extra_consumer_config or {}))
        conf["statistics.interval.ms"] = 5000
        conf["stats_cb"] = self._on_stats
        conf["on_commit"] = self._on_commit
        self._protocol = str(conf.get("group.protocol", "classic"))
        self._consumer = Consumer(conf)
        self._admin = kafka_util.admin(kafka.client_config())
        self._dlq_producer: Producer | None = None
        self._dead: DeadLetters | None = None
        self._subscribed: list[str] = []
        self._assigned: set[TP] = set()
        self._pending_offsets: dict[TP, int] = {}
        #: messages handled per collection label since the last poll's messages were counted into metrics
        self._message_counts: dict[str, int] = {}
        self._pending: list[Consumed] = []
        self._positions: dict[TP, int] = {}
        #: The offsets last committed to Kafka (informational) per partition.
        self._informed: dict[TP, int] = {}
        self._last_inform = 0.0
        self._paused = False
        self._proc = psutil.Process()
        self._last_job_check = 0.0
        self._control_unreadable_since: float | None = None
        self._no_offsets_warned = False
        self._beyond_warned = False
        self._fatal: BaseException | None = None
        #: Per assigned topic, the cluster and topic ids its offsets are stored with.
        self._origins: dict[str, Origin] = {}
        self._stamp_retry_at = 0.0
        if options.offset_mismatch not in OFFSET_MISMATCH_POLICIES:
            raise ConfigError(f"offset_mismatch must be one of {', '.join(OFFSET_MISMATCH_POLICIES)}, "
                              f"not {options.offset_mismatch!r}")

    # ------------------------------------------------------------------ topics

    def wanted_topics(self) -> list[str]:
        """Data topics that exist and match the collection filter."""
        existing = kafka_util.list_topics(self._admin)
        out = []
        for topic in existing:
            coll = self.topics.collection_of(topic)
            if coll is None:
                continue
            if coll in DID_LEVEL:
                if self.opts.include_account_events:
                    out.append(topic)
            elif self.filter(coll):
                out.append(topic)
        return sorted(out)

    def _refresh_subscription(self) -> None:
        try:
            wanted = self.wanted_topics()
        except KafkaException as e:
            # No broker answers (one restarting): the subscription stays, librdkafka reconnects.
            log.info("topics not listed now (%s); the subscription stays as it is", e.args[0] if e.args else e)
            return
        if wanted and wanted != self._subscribed:
            log.info("subscribing %s to %d topics (%s group protocol)", self.opts.group, len(wanted), self._protocol)
            self._consumer.subscribe(wanted, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                     on_lost=self._on_lost)
            self._subscribed = wanted

    # ------------------------------------------------------------------ rebalance

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        stored: dict[TP, int] = {}
        try:
            stored = self._trusted_offsets([(p.topic, p.partition) for p in partitions])
        except Exception as e:  # noqa: BLE001 - must not escape into librdkafka's callback
            self._fatal = e
        for p in partitions:
            nxt = stored.get((p.topic, p.partition))
            p.offset = nxt if nxt is not None else OFFSET_BEGINNING
            self._assigned.add((p.topic, p.partition))
            if nxt is not None:
                self._positions[(p.topic, p.partition)] = nxt
        consumer.incremental_assign(partitions)
        if self._paused:
            # Over the memory limit: partitions gained in a rebalance stay paused like the rest.
            consumer.pause(partitions)
        else:
            # Already over it at assignment: pause before the first fetch returns anything.
            self._check_memory()
        self.health.set_ready(True)
        log.info("assigned %d partitions (%d with stored offsets)", len(partitions), len(stored))

    def _trusted_offsets(self, partitions: list[TP]) -> dict[TP, int]:
        """The stored next offsets of ``partitions`` that count records of these very partitions.

        Each assigned topic's origin (cluster id, topic id) is looked up afresh; a stored offset
        of another origin, or past its partition's end, is a mismatch: forgotten (the partition
        reads from its beginning; the sink de-duplicates what it already holds) with one warning
        naming both identities, or refused (``offset_mismatch="refuse"``).

        Raises:
            OffsetMismatchError: a mismatch under ``refuse``.
            SourceError: the topics' origins could not be read (nothing can be verified).
        """
        stored = self.sink.load_offsets(self.opts.group, partitions)
        for topic in {t for t, _ in partitions} - {t for t, _ in stored}:
            self._origins.pop(topic, None)  # looked up afresh when its first offsets are stored
        if not stored:
            return {}
        self._origins.update(self._describe({t for t, _ in stored}))
        ends = list_ends(self._admin, stored, timeout=15)
        bad: dict[TP, str] = {}
        for tp, s in stored.items():
            why = mismatch(s, self._origins.get(tp[0], UNKNOWN), ends.get(tp))
            if why is not None:
                bad[tp] = why
        if bad:
            by_topic: dict[str, list[int]] = {}
            for t, p in sorted(bad):
                by_topic.setdefault(t, []).append(p)
            lines = "; ".join(
                f"{t} {parts}: {bad[(t, parts[0])]} (stored for {stored[(t, parts[0])].origin}, now "
                f"{self._origins.get(t, UNKNOWN)})" for t, parts in list(by_topic.items())[:5])
            more = f"; and {len(by_topic) - 5} more topics" if len(by_topic) > 5 else ""
            self.metrics.consumer_offset_mismatches.inc(self.sink.name, amount=len(bad))
            if self.opts.offset_mismatch == "refuse":
                raise OffsetMismatchError(
                    f"group {self.opts.group}: {len(bad)} stored offsets are not from this cluster and topic "
                    f"(a cluster or topic created anew while the sink's database was kept): {lines}{more}. "
                    f"Not starting (--offset-mismatch refuse); --offset-mismatch restart reads those "
                    f"partitions from their beginning")
            log.warning("group %s: %d stored offsets are not from this cluster and topic, so not used: %s%s; "
                        "those partitions are read from their beginning", self.opts.group, len(bad), lines, more)
            self.sink.forget_offsets(self.opts.group, sorted(bad))
        return {tp: s.offset for tp, s in stored.items() if tp not in bad}

    def _stamp(self, topics: set[str]) -> None:
        """Look up the origin of ``topics`` to store with their offsets; offsets stored without one
        (no answer now) are checked against their partition's end only."""
        try:
            self._origins.update(topic_origins(self._admin, topics, timeout=10))
        except (KafkaException, TimeoutError) as e:
            self._stamp_retry_at = self.clock() + 30.0  # not on every batch while the brokers recover
            log.warning("topic ids of %s not readable now (%s): their offsets are stored without them",
                        ", ".join(sorted(topics)[:3]), e)

    def _describe(self, topics: set[str]) -> dict[str, Origin]:
        """The current origin of ``topics``, asked again for up to :data:`DESCRIBE_PATIENCE` seconds.

        Raises:
            SourceError: no answer.
        """
        last: Exception | None = None
        deadline = self.clock() + DESCRIBE_PATIENCE
        while True:
            try:
                return topic_origins(self._admin, topics, timeout=10)
            except (KafkaException, TimeoutError) as e:
                last = e
            if self.clock() >= deadline:
                raise SourceError(f"cannot read the cluster and topic ids of {len(topics)} topics within "
                                  f"{DESCRIBE_PATIENCE:g} s, so stored offsets cannot be verified: {last}") from last
            time.sleep(1.0)  # a broker failing over: leaders move within seconds

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(p.topic, p.partition) for p in partitions}
        if self._pending and any((c.topic, c.partition) in revoked for c in self._pending):
            try:
                self._flush()
            except Exception as e:  # noqa: BLE001 - keep it out of librdkafka's callback
                self._fatal = e
        self._assigned -= revoked
        self._forget_lag(revoked)
        for tp in revoked:
            self._positions.pop(tp, None)
            self._informed.pop(tp, None)
        self._leave(consumer, partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may already own them: drop the batch, its offsets were not stored.
        lost = {(p.topic, p.partition) for p in partitions}
        if any((c.topic, c.partition) in lost for c in self._pending):
            self.sink.discard()
            self._pending.clear()
            self._pending_offsets.clear()
        self._assigned -= lost
        self._forget_lag(lost)
        for tp in lost:
            self._positions.pop(tp, None)
            self._informed.pop(tp, None)
        self._leave(consumer, partitions)

    @staticmethod
    def _leave(consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # librdkafka keeps a partition's pause across unassignment: one paused by the memory guard
        # would come back paused in a later assignment and never be read. It leaves resumed.
        consumer.resume(partitions)
        consumer.incremental_unassign(partitions)

    def _forget_lag(self, partitions: Iterable[TP]) -> None:
        # Another member reports these partitions now; a stale gauge here would be summed twice.
        for topic, partition in partitions:
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(self.sink.name, topic, str(partition))

    def _on_stats(self, raw: str) -> None:
        import orjson  # noqa: PLC0415 - cold path, every few seconds

        try:
            stats = orjson.loads(raw)
            for tname, t in stats.get("topics", {}).items():
                for pid, pdata in t.get("partitions", {}).items():
                    if pid == "-1" or (tname, int(pid)) not in self._assigned:
                        continue
                    lag = pdata.get("consumer_lag", -1)
                    if lag >= 0:
                        self.metrics.consumer_lag.labels(self.sink.name, tname, pid).set(lag)
        except (orjson.JSONDecodeError, ValueError, AttributeError):
            log.debug("unreadable librdkafka statistics")

    # ------------------------------------------------------------------ dead letters

    def _dead_letters(self) -> DeadLetters:
        if self._dead is None:
            self._dlq_producer = Producer(self.kafka.producer_config())

            def produce(topic: str, key: bytes | None, value: bytes) -> None:
                kafka_util.ensure_topics(self._admin, [topic], partitions=1,
                                         replication=self.kafka.topic_replication)
                assert self._dlq_producer is not None
                self._dlq_producer.produce(topic, value, key)

            self._dead = DeadLetters(produce, self.codec, self.metrics, f"consumer:{self.sink.name}")
        return self._dead

    def _drop(self, msg: Message, reason: str, detail: str) -> None:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
        self.metrics.consumer_dropped.inc(self.sink.name, reason)
        if self.opts.dlq:
            topic = msg.topic() or ""
            self._dead_letters().send(
                self.topics.dlq_for(topic), reason=reason, detail=detail, payload=msg.value() or b"",
                origin=f"{topic}/{msg.partition()}/{msg.offset()}", src_topic=topic,
                partition=msg.partition(), offset=msg.offset(),
                did=(msg.key() or b"").decode(errors="replace") or None)

    # ------------------------------------------------------------------ the loop

    def _handle(self, msg: Message) -> None:
        topic = msg.topic() or ""
        partition = msg.partition() or 0
        offset = msg.offset() or 0
        self._pending_offsets[(topic, partition)] = offset + 1
        self.stats.consumed += 1
        try:
            schema, datum = self.codec.decode(msg.value() or b"")
            event = event_from_datum(schema, datum)
        except DecodeError as e:
            self._drop(msg, e.reason, e.detail)
            return
        except DropError as e:
            self._drop(msg, e.reason, e.detail)
            return
        except (KeyError, TypeError) as e:
            self._drop(msg, "decode_avro", f"datum misses fields: {e}")
            return
        label = collection_label(event.collection if isinstance(event, RecordEvent) else schema)
        counts = self._message_counts
        counts[label] = counts.get(label, 0) + 1
        end = self.opts.end_time_us
        if end is not None and event.time_us >= end:
            self.stats.skipped["after_end"] = self.stats.skipped.get("after_end", 0) + 1
            self.metrics.consumer_skipped.inc(self.sink.name, "after_end")
            return
        ts_type, ts = msg.timestamp()
        item = Consumed(topic, partition, offset, schema, event, ts if ts_type else 0, datum)
        try:
            self.sink.add(item)
        except DropError as e:
            self._drop(msg, e.reason, e.detail)
            return
        self._pending.append(item)
        key = event.collection if isinstance(event, RecordEvent) else schema
        self.stats.by_collection[key] = self.stats.by_collection.get(key, 0) + 1

    def _flush(self) -> None:
        if not self._pending_offsets:
            return
        offsets = dict(self._pending_offsets)
        unstamped = {t for t, _ in offsets if t not in self._origins}
        if unstamped and self.clock() >= self._stamp_retry_at:
            self._stamp(unstamped)
        t0 = self.clock()
        if self._dlq_producer is not None and self._dlq_producer.flush(30):
            raise CommitError("dead letters not delivered within 30 s; not storing offsets past them")
        rows = 0
        try:
            for attempt in Retrying(retry=retry_if_exception_type(SinkUnavailableError),
                                    wait=wait_exponential_jitter(multiplier=0.2, max=10),
                                    stop=stop_after_attempt(30), reraise=True):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.metrics.db_retries.inc(self.sink.name)
                        self.health.beat()
                    rows = self.sink.flush(self.opts.group, offsets, self._origins)
        except BaseException:
            # The batch is not stored and the run stops: forget it, so that leaving the group
            # (which flushes what revoked partitions hold) does not try it again. The next owner of
            # those partitions reads it again from the stored offsets.
            self.sink.discard()
            self._pending.clear()
            self._pending_offsets.clear()
            raise
        elapsed = self.clock() - t0
        n = len(self._pending)
        self.stats.written_rows += rows
        self.stats.batches += 1
        self.metrics.batch_duration.labels(self.sink.name).observe(elapsed)
        self.metrics.batch_size.labels(self.sink.name).observe(n)
        now_us = time.time() * 1e6
        lat = self.metrics.end_to_end_latency.labels(self.sink.name)
        for item in self._pending[-32:]:
            if item.event.time_us:
                lat.observe(max(0.0, (now_us - item.event.time_us) / 1e6))
        self._positions.update(offsets)
        self._pending.clear()
        self._pending_offsets.clear()
        self._inform(offsets)

    def _inform(self, offsets: dict[TP, int], *, asynchronous: bool = True) -> bool:
        """Commit ``offsets`` to Kafka (informational: the sink holds the authoritative offsets).

        Returns False when a synchronous commit failed. What Kafka confirmed is recorded (by
        :meth:`_on_commit` for asynchronous commits), so a commit refused meanwhile (a classic
        group refuses commits while it rebalances) is made again at the next idle moment.
        """
        if not offsets:
            return True
        parts = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            if asynchronous:
                self._consumer.commit(offsets=parts, asynchronous=True)
                return True
            self._on_commit(None, self._consumer.commit(offsets=parts, asynchronous=False))
        except KafkaException as e:
            log.debug("Kafka offset commit failed: %s", e)
            return False
        return True

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if err is not None:
            log.debug("Kafka offset commit failed: %s", err)
            return
        for tp in partitions:
            if tp.error is None and tp.offset >= 0:
                key = (tp.topic, tp.partition)
                self._informed[key] = max(tp.offset, self._informed.get(key, -1))

    def _positions_ahead(self) -> dict[TP, int]:
        """Assigned partitions whose position is past the offset last committed to Kafka.

        Only with nothing pending: then every message before a position is in the sink, and the
        position is past the transaction markers librdkafka fetched after the last message.
        """
        if self._pending_offsets:
            return {}
        try:
            positions = self._consumer.position(self._consumer.assignment())
        except KafkaException as e:
            log.debug("positions unavailable: %s", e)
            return {}
        return {(tp.topic, tp.partition): tp.offset for tp in positions
                if tp.offset >= 0 and tp.offset > self._informed.get((tp.topic, tp.partition), -1)}

    def _inform_positions(self, *, asynchronous: bool = True) -> bool:
        return self._inform(self._positions_ahead(), asynchronous=asynchronous)

    def _stable_ends(self, partitions: list[TopicPartition], timeout: float) -> dict[TP, int]:
        """Last stable offsets of ``partitions`` that hold anything (past their log start)."""
        ends = list_ends(self._admin, [(p.topic, p.partition) for p in partitions], timeout)
        return {tp: e.stable for tp, e in ends.items() if e.stable > e.low}

    def _settle(self) -> None:
        """Read on to every assigned partition's end (bounded by ``settle`` seconds).

        librdkafka moves a position past a transaction's commit marker only once a fetch returned
        the marker, which may come after the last message was delivered. Whatever arrives meanwhile
        is handled like any message (and flushed before the positions are committed).
        """
        if self.opts.settle <= 0:
            return
        assignment = self._consumer.assignment()
        if not assignment:
            return
        ends = self._stable_ends(assignment, timeout=max(1.0, self.opts.settle))
        deadline = self.clock() + self.opts.settle
        while ends and self.clock() < deadline:
            try:
                # A partition assigned at its end (nothing fetched since) has no position yet: it is
                # where the sink's stored offset put it.
                positions = {(tp.topic, tp.partition): tp.offset if tp.offset >= 0
                             else self._positions.get((tp.topic, tp.partition), -1)
                             for tp in self._consumer.position(self._consumer.assignment())}
            except KafkaException:
                return
            if all(positions[tp] >= end for tp, end in ends.items() if tp in positions):
                return
            self._consume_some()
            if len(self._pending) >= self.opts.batch_size:
                self._flush()

    def _check_memory(self) -> None:
        limit = self.opts.max_memory_mb
        if not limit:
            return
        rss_mb = self._proc.memory_info().rss / 2**20
        assignment = self._consumer.assignment()
        if not self._paused and rss_mb > limit:
            self._consumer.pause(assignment)
            self._paused = True
            self.metrics.consumer_paused.labels(self.sink.name).set(1)
            log.warning("RSS %.0f MB over the %d MB limit: partitions paused", rss_mb, limit)
        elif self._paused and rss_mb < limit * 0.9:
            self._consumer.resume(assignment)
            self._paused = False
            self.metrics.consumer_paused.labels(self.sink.name).set(0)
            log.info("RSS %.0f MB: partitions resumed", rss_mb)

    def _job_done(self) -> bool:
        """True once the until-done job is finished and every partition it wrote is consumed.

        A finished job's checkpoint says where its data ends (``offsets``, for a sharded firehose
        job the highest of its workers'). One that produced events but records no offsets is never
        taken as consumed. A DID work topic (``backfill repos --from-topic``) has no such end: its
        replicas record progress only, each goes idle on its own and more DIDs can come at any
        time; waiting for one (``<job>`` or ``<job>@<replica>``) is refused.

        Raises:
            ConfigError: the job is a DID work topic or one of its replicas.
            SourceError: the control topic could not be read for :data:`CONTROL_PATIENCE` seconds.
        """
        if self.opts.until_offsets is not None:
            target_raw: dict[str, dict[str, int]] | None = self.opts.until_offsets
        else:
            job = self.opts.until_done
            if job is None:
                return False
            now = self.clock()
            if now - self._last_job_check < 1.0:
                return False
            self._last_job_check = now
            try:
                jobs = load_jobs(self.kafka.consumer_config("atproto-backfill-control-reader"), self.topics.control,
                                 settle=0, max_wait=self.kafka.control_timeout)
            except SourceError as e:
                # A broker restarting: whether the job is done is not known now; asked again at the
                # next check, for up to CONTROL_PATIENCE seconds.
                since = self._control_unreadable_since
                if since is None:
                    since = self._control_unreadable_since = now
                if self.clock() - since >= CONTROL_PATIENCE:
                    raise
                log.warning("job %s: its checkpoint is not readable now (%s); checking again", job, e)
                self._last_job_check = self.clock()
                return False
            self._control_unreadable_since = None
            state: JobState | None = jobs.get(job)
            replicas = sorted(name for name, st in jobs.items() if st.filters.get("mode") == "work-topic"
                              and (name == job or (state is None and name.startswith(f"{job}@"))))
            if replicas:
                raise ConfigError(
                    f"--until-done {job}: {', '.join(replicas)}: replica progress of a DID work topic (backfill "
                    f"repos --from-topic), which records no end of its data and never finishes (more DIDs can be "
                    f"enqueued at any time); use --idle-exit, or backfill status")
            if state is None or state.status != FINISHED:
                return False
            if not state.offsets and (state.counts.get("produced", 0) or state.counts.get("records", 0)):
                if not self._no_offsets_warned:
                    self._no_offsets_warned = True
                    log.warning("job %s finished but its checkpoint records no offsets for the %d events it "
                                "produced (written by an older version?): waiting, since it cannot tell when "
                                "they are consumed", job, state.counts.get("produced", 0))
                return False
            target_raw = state.offsets
        target = {(t, int(p)): o for t, parts in (target_raw or {}).items() for p, o in parts.items()
                  if t in self._subscribed or self._wanted(t)}
        if not target:
            return True
        ends = list_ends(self._admin, target, timeout=10)
        beyond = {tp: (off, ends[tp].high) for tp, off in target.items() if tp in ends and off > ends[tp].high}
        if beyond:
            # The job's offsets count records these partitions do not have (a topic created anew
            # since): not waited for; their current end is the target.
            if not self._beyond_warned:
                self._beyond_warned = True
                log.warning("job %s: its checkpoint's offsets are past the end of %d partitions (%s), whose "
                            "topics were created anew since: waiting for their current end instead",
                            self.opts.until_done, len(beyond),
                            ", ".join(f"{t}[{p}] {o} > {h}" for (t, p), (o, h) in sorted(beyond.items())[:5]))
            target.update({tp: high for tp, (_, high) in beyond.items()})
        unknown = {t for t, _ in target if t not in self._origins}
        if unknown:
            try:
                self._origins.update(topic_origins(self._admin, unknown, timeout=10))
            except (KafkaException, TimeoutError) as e:
                # a broker failing over: asked again at the next check
                log.info("job %s: topic ids not readable now (%s); checking again", self.opts.until_done, e)
                return False
        stored = self.sink.load_offsets(self.opts.group, list(target))
        # only offsets of these very topics count (not a stale row a new assignment will replace)
        done = {tp: s.offset for tp, s in stored.items()
                if mismatch(s, self._origins.get(tp[0], UNKNOWN), None) is None}
        return all(done.get(tp, 0) >= off for tp, off in target.items())

    def _wanted(self, topic: str) -> bool:
        coll = self.topics.collection_of(topic)
        if coll is None:
            return False
        if coll in DID_LEVEL:
            return self.opts.include_account_events
        return self.filter(coll)

    def run(self) -> ConsumerStats:
        """Consume until stopped (stop_event, until-done, idle exit); returns the counters.

        Raises:
            FatalError: a commit failed or our state is inconsistent.
        """
        consumer = self._consumer
        last_refresh = 0.0
        last_msg = self.clock()
        batch_started: float | None = None
        batch_msgs = 0
        check_every = 0
        try:
            while not self.stop_event.is_set():
                now = self.clock()
                if now - last_refresh >= self.opts.topic_refresh or not self._subscribed:
                    self._refresh_subscription()
                    last_refresh = now
                if not self._subscribed:
                    self.health.beat()
                    if self._until_satisfied():
                        self.stats.stop_reason = "until_done"
                        break
                    self.stop_event.wait(0.2)
                    continue
                # A batch consume waits out its whole timeout unless it fills: never past the open
                # batch's linger, and a new batch's linger counts from this call (its first message
                # may have come at once).
                polled = now
                msgs = consumer.consume(num_messages=min(self.opts.batch_size, 5000),
                                        timeout=poll_timeout(batch_started, now, self.opts.linger))
                self.health.beat()
                if self._fatal is not None:
                    raise self._fatal
                self._handle_all(msgs)
                now = self.clock()
                if msgs:
                    last_msg = now
                    if batch_started is None:
                        batch_started = polled
                batch_msgs += len(msgs)
                if self._pending_offsets and (
                        batch_msgs >= self.opts.batch_size or not msgs
                        or (batch_started is not None and now - batch_started >= self.opts.linger)):
                    self._flush()
                    batch_started = None
                    batch_msgs = 0
                    if self.opts.batch_delay:
                        self.stop_event.wait(self.opts.batch_delay)
                check_every += 1
                if check_every % 10 == 0:
                    self._check_memory()
                if not msgs and not self._pending_offsets:
                    if now - self._last_inform >= 1.0:
                        self._last_inform = now
                        self._inform_positions()
                    if self._until_satisfied():
                        self.stats.stop_reason = "until_done"
                        self._settle()
                        break
                    if self.opts.idle_exit and now - last_msg >= self.opts.idle_exit:
                        self.stats.stop_reason = "idle"
                        break
            else:
                self.stats.stop_reason = self.stats.stop_reason or "stopped"
            self._flush()
            self._inform_at_exit()
        finally:
            self._close()
        return self.stats

    def _inform_at_exit(self) -> None:
        """Commit the positions to Kafka before leaving the group.

        A classic group refuses commits while it rebalances (a member leaving, as this one or a
        sibling that finished too): the commit is retried, serving the rebalance, for up to
        ``settle`` seconds. Anything read meanwhile is handled and flushed like any message.
        """
        deadline = self.clock() + max(self.opts.settle, 0.5)
        while not self._inform_positions(asynchronous=False):
            if self.clock() >= deadline:
                log.info("offsets not committed to Kafka at exit (informational; the sink has them)")
                return
            self._consume_some()
            self._flush()

    def _consume_some(self) -> None:
        """Read and handle what arrives within ``POLL_TIMEOUT`` (outside the main loop: draining to
        the ends, committing at exit); a fatal error of the handling raises.
        """
        self._handle_all(self._consumer.consume(num_messages=min(self.opts.batch_size, 5000), timeout=POLL_TIMEOUT))
        if self._fatal is not None:
            raise self._fatal

    def _handle_all(self, msgs: list[Message]) -> None:
        try:
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() in (KafkaError._PARTITION_EOF,):
                        continue
                    if err.fatal():
                        raise CommitError(f"fatal consumer error: {err}")
                    log.warning("consumer error: %s", err)
                    continue
                self._handle(msg)
        finally:
            # counted once per poll, not once per message (a labelled inc costs about 2 us)
            counts = self._message_counts
            for label, n in counts.items():
                self.metrics.consumer_messages.inc(self.sink.name, label, amount=n)
            counts.clear()

    def _until_satisfied(self) -> bool:
        if self.opts.until_done is None and self.opts.until_offsets is None:
            return False
        return self._job_done()

    def _close(self) -> None:
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as e:
            log.debug("consumer close: %s", e)
        if self._dlq_producer is not None:
            self._dlq_producer.flush(10)


_SAFE_GROUP = re.compile(r"[^A-Za-z0-9._-]")


def poll_timeout(batch_started: float | None, now: float, linger: float) -> float:
    """Seconds the next consume call may wait: ``POLL_TIMEOUT`` at most, never past the open
    batch's linger (``batch_started`` + ``linger``) nor longer than a linger."""
    wait = POLL_TIMEOUT if batch_started is None else batch_started + linger - now
    return max(0.0, min(wait, linger, POLL_TIMEOUT))


def group_name(kind: str, suffix: str) -> str:
    """A consumer group id ``atproto-backfill-<kind>-<suffix>`` with unsafe characters replaced."""
    return _SAFE_GROUP.sub("_", f"atproto-backfill-{kind}-{suffix}")

"""Runs one producer job: a source's events into the typed topics, with checkpoints.

Order of things per event: encode (Avro, schema by collection) -> produce to
``<prefix>.<collection>`` keyed by DID -> advance the source position. Every
``checkpoint_events`` events or ``checkpoint_interval`` seconds the job checkpoints: with Kafka
transactions, the data and the job state commit atomically; without, the producer is flushed, every
delivery is confirmed, and only then the state is written. Either way the checkpoint never covers
data that is not durably in Kafka, so a kill -9 replays a little and never skips.

A running checkpoint does not stop the loop: the job state is taken at once (position, counts),
and the flush and commit run on a thread while the loop goes on reading and encoding; what it
produces meanwhile is held (at most ``MAX_PENDING`` messages) and sent in the next transaction
as soon as the commit is done. The final checkpoint is synchronous.

Fencing: the transactional id is ``atproto-backfill-<job>``, so a second instance of the same job
fences the first when it starts (and aborts the first one's open transaction). The first learns it
from its next produce, poll or commit, stops with :class:`FencedError` (exit status 1, no traceback)
and writes nothing more: the second resumes from the last checkpoint the first committed.

Outages (a broker restarting): a checkpoint waits for the brokers and retries its commit for up
to ``COMMIT_PATIENCE`` seconds. The open transaction's messages are kept (up to ``REDO_MAX_MESSAGES``
and ``REDO_MAX_BYTES``), so a transaction the outage broke (messages undelivered within
``transaction.timeout.ms``) is aborted and redone: its messages sent again in a new one. When Kafka
itself aborted it (open past its timeout), this producer is fenced: a new one with the same
transactional id takes over, but only when the control topic's last checkpoint of the job is this
instance's own (else another instance took over, and this one stops as fenced).

Bounded state: events of more than ``max_collections`` distinct collections (``--max-collections``),
or of a new collection when the topic prefix already has that many collection topics, are dead-lettered
(reason ``too_many_collections``): a source cannot make the job keep or create without bound.

Stops: the source's own end (watermark reached, bounded source exhausted), ``num_records``
record events produced (exactly), ``max_time`` seconds, or SIGINT/SIGTERM. Every stop flushes and
writes a final checkpoint recording the next offset of every partition the job wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from producers.source import Drop, End, Skip, Source
from runtime.contract.codec import AvroCodec
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent, to_jetstream_json
from runtime.contract.timeparse import us_to_date
from runtime.contract.topics import ACCOUNT, CONTROL_TOPIC_CONFIG, IDENTITY, TopicMap, schema_name_for_collection
from runtime.errors import (
    CommitError,
    ConfigError,
    DeliveryError,
    DropError,
    FatalError,
    FencedError,
    SourceError,
)
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import FINISHED, RUNNING, JobState, load_job
from runtime.kafka.deadletter import DeadLetters
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics, collection_label
from runtime.process.options import Opt

log = logging.getLogger(__name__)

STOPPED = "stopped"
#: Every Nth delivery report feeds the produce-latency histogram.
LATENCY_SAMPLE_EVERY = 64
_DAY_US = 86_400_000_000
#: Messages held while a checkpoint commits in the background; at this many the loop waits for it.
MAX_PENDING = 100_000
#: A transaction Kafka aborts (one of its messages undelivered within ``transaction.timeout.ms``: a
#: broker away that long) is redone: its messages are sent again in a new one. The job keeps the open
#: transaction's messages for that, up to this many and REDO_MAX_BYTES of values; a larger
#: transaction is not kept, and its abort stops the job (a resume redoes it).
REDO_MAX_MESSAGES: Final = 100_000
REDO_MAX_BYTES: Final = 64 * 2**20
#: Seconds a checkpoint goes on flushing, committing and redoing its transaction while the brokers
#: are away before it fails.
COMMIT_PATIENCE: Final = 300.0
#: ``--max-collections``: the distinct collections a job produces to, and the collection topics of
#: its prefix it lets exist (it creates a topic for a new collection only while fewer do).
DEFAULT_MAX_COLLECTIONS: Final = 1000
MAX_COLLECTIONS_OPTION: Final = Opt(
    ("--max-collections",), "max_collections", "BACKFILL_MAX_COLLECTIONS", DEFAULT_MAX_COLLECTIONS,
    "the most distinct collections a job produces to, one topic each; it creates a topic for a new "
    "collection only while the topic prefix has fewer collection topics. Past it, events of further "
    "collections are dead-lettered (reason too_many_collections)", type=int)
#: Error codes by which Kafka tells a transactional producer that a newer instance with its
#: transactional id took over: librdkafka's fatal ``_FENCED``, the broker's ``PRODUCER_FENCED``, and
#: ``INVALID_PRODUCER_EPOCH`` in the delivery reports of the fenced instance's last messages.
FENCED_CODES: Final = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})


#: Delivery failures of a transaction's messages that pass: the brokers away (timeouts, lost
#: connections), or the transaction aborted meanwhile (purged, an epoch bumped). A transaction that
#: failed only of these is redone; any other failure (a refusal) stops the job.
_TRANSIENT_FAILURES: Final = frozenset({
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TIMED_OUT_QUEUE, KafkaError._TRANSPORT,
    KafkaError.REQUEST_TIMED_OUT, KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT,
    KafkaError.INVALID_PRODUCER_EPOCH, KafkaError.TRANSACTION_ABORTABLE,
})


def _transient_failure(err: KafkaError) -> bool:
    return not err.fatal() and (err.code() in _TRANSIENT_FAILURES or err.retriable())


def kafka_error_of(exc: BaseException | None) -> KafkaError | None:
    """The KafkaError behind ``exc``: its own, or that of an exception it was raised from.

    confluent-kafka raises a producer's fatal error from inside ``flush()`` or
    ``commit_transaction()`` and then still runs the pending delivery callbacks, where the first
    call into C fails with a SystemError raised from that error: so it can sit in the chain.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
            return exc.args[0]
        exc = exc.__cause__ or exc.__context__
    return None


@dataclass
class JobOptions:
    """What a job does and when it stops.

    Args:
        job: the job name (key in the control topic; transactional id ``atproto-backfill-<job>``).
        source: ``jetstream``, ``firehose`` or ``repo``.
        filters: recorded in the checkpoint for status and resume checks.
        num_records: stop after exactly this many record events (0 = no limit).
        max_time: stop after this many seconds (0 = no limit).
        transactions: ``auto`` (use them when the broker supports them), ``on``, ``off``.
        max_collections: the most distinct collections the job produces to, and the most collection
            topics of its prefix it creates topics up to (``--max-collections``).
    """

    job: str
    source: str
    filters: dict[str, Any] = field(default_factory=dict)
    num_records: int = 0
    max_time: float = 0
    resume: bool = False
    start_cursor: int | None = None
    end_time_us: int | None = None
    checkpoint_events: int = 5000
    checkpoint_interval: float = 2.0
    transactions: str = "auto"
    max_collections: int = DEFAULT_MAX_COLLECTIONS


@dataclass
class JobStats:
    """Counters of one run (the seed's statistics are derived from these)."""

    messages_received: int = 0
    records_produced: int = 0
    events_produced: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    collections: set[str] = field(default_factory=set)
    by_collection: dict[str, int] = field(default_factory=dict)
    latest_cursor: int | None = None
    latest_time_us: int | None = None
    current_date: str | None = None
    target_reached: bool = False
    end_cursor_reached: bool = False
    stop_reason: str = ""
    started: float = 0.0
    ended: float = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds from start to end (or to now while running)."""
        return (self.ended or time.monotonic()) - self.started


def resolve_fatal(producer: Producer | None, err: KafkaError,
                  fatal: KafkaError | None) -> tuple[KafkaError, KafkaError | None]:
    """``err`` made precise, and the producer's fatal error (``fatal``, or ``err`` once it is one).

    produce() reports a fatal producer error only as ``_FATAL`` ("fatal error"); the next poll()
    raises the error itself (fenced, say).
    """
    if err.code() == KafkaError._FATAL and fatal is None and producer is not None:
        try:
            producer.poll(0)
        except Exception as e:  # noqa: BLE001 - whatever poll raises, only its KafkaError matters
            err = kafka_error_of(e) or err
    if err.fatal() or err.code() == KafkaError._FATAL:
        fatal = fatal or err
    return err, fatal


def transactional_id(job: str) -> str:
    """The Kafka transactional id of ``job``'s producer."""
    return f"atproto-backfill-{job}"


class JobRunner:
    """Drives one source into Kafka with checkpoints.

    Args:
        kafka: Kafka settings with resolved bootstrap servers.
        options: the job's options.
        metrics: where to count.
        codec: Avro codec (registry or single-object).
        clock: monotonic seconds (intervals); wall: unix seconds (timestamps).
        on_date_change: called with ``YYYY-MM-DD`` whenever the event date changes.
        on_progress: called with the stats about every second.
    """

    def __init__(self, kafka: KafkaSettings, options: JobOptions, metrics: Metrics, codec: AvroCodec, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 on_date_change: Callable[[str], None] | None = None,
                 on_progress: Callable[[JobStats], None] | None = None,
                 health: Any | None = None) -> None:
        if options.max_collections < 1:
            raise ConfigError(f"--max-collections must be positive, not {options.max_collections}")
        self.kafka = kafka
        self.opts = options
        self.metrics = metrics
        self.codec = codec
        self.topics = TopicMap(kafka.topic_prefix)
        self.clock = clock
        self.wall = wall
        self.on_date_change = on_date_change
        self.on_progress = on_progress
        self.health = health
        self.stats = JobStats()
        self.state: JobState | None = None
        self.previous: JobState | None = None
        self._admin = kafka_util.admin(kafka.client_config())
        self._known_topics: set[str] = set()
        # The collection topics of the prefix known to exist, and those routed to be created: a topic
        # for a new collection is created only while there are fewer than max_collections.
        self._collection_topics: set[str] = set()
        self._producer: Producer | None = None
        self._transactional = False
        self._in_txn = False
        self._written: dict[tuple[str, int], int] = {}
        # Failed delivery reports, read (and formatted) later: after a fatal producer error
        # confluent-kafka may run the callback with that error pending, when any call there fails.
        self._failed_reports: list[tuple[KafkaError, Message]] = []
        self._refusals_counted = 0
        self._fatal: KafkaError | None = None  # the producer's fatal error, once seen
        self._since_checkpoint = 0
        self._last_checkpoint = 0.0
        self._stop_reason: str | None = None
        self._first_time_us: int | None = None
        self._source: Source | None = None
        self._dead: DeadLetters | None = None
        src = options.source
        self._m_received = metrics.events_received.child(src)
        self._m_produced = {c: metrics.events_produced.child(src, c)
                            for c in ("identity", "account", "other")}
        self._m_latency = metrics.produce_latency.labels(src)
        self._deliveries = 0
        # Per-event counts are added to the Prometheus counters in bulk (_flush_counts): every 128
        # items, every tick (0.2 s), at each checkpoint and at the end, so a scrape lags 0.2 s at most.
        self._n_produced: dict[str, int] = {}
        self._n_received = 0
        self._day = (0, 0)  # the UTC day (start, end in unix us) stats.current_date was made for
        # collection -> (topic, value encoder, metric label): at most max_collections of them.
        self._routes: dict[str, tuple[str, Callable[[RecordEvent], bytes], str]] = {}
        self._m_collections = metrics.producer_collections.labels(src)
        # The checkpoint committing on the checkpoint thread, its state, and what the loop produced
        # meanwhile (topic, key, value), sent once it is done.
        self._committing: Future[float] | None = None
        self._committing_state: JobState | None = None
        self._pending: list[tuple[str, bytes | None, bytes]] = []
        self._executor: ThreadPoolExecutor | None = None
        # The open transaction's messages, to send again if Kafka aborts it (None: too many to keep,
        # or no transactions), and the bytes of their values.
        self._txn_log: list[tuple[str, bytes | None, bytes]] | None = None
        self._txn_bytes = 0
        self._txn_started: float | None = None  # when the open transaction began (clock)

    # ------------------------------------------------------------------ setup

    @property
    def transactional_id(self) -> str:
        """The job's transactional id: a second instance of the job fences the first."""
        return transactional_id(self.opts.job)

    def _ensure(self, topics: list[str], config: dict[str, str] | None = None,
                partitions: int | None = None) -> None:
        missing = [t for t in topics if t not in self._known_topics]
        if not missing:
            return
        # One metadata request learns every existing topic, so the first event of each collection
        # that already has its topic costs nothing more.
        self._learn(kafka_util.existing_topics(self._admin))
        missing = [t for t in missing if t not in self._known_topics]
        if not missing:
            return
        kafka_util.ensure_topics(self._admin, missing, partitions=partitions or self.kafka.topic_partitions,
                                 replication=self.kafka.topic_replication, config=config)
        self._learn(missing)

    def _learn(self, topics: Iterable[str]) -> None:
        """Record ``topics`` as existing (and count the collection topics of the prefix among them)."""
        topics = list(topics)
        self._known_topics.update(topics)
        collection_of = self.topics.collection_of
        self._collection_topics.update(t for t in topics if collection_of(t) not in (None, IDENTITY, ACCOUNT))

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failed_reports.append((err, msg))  # nothing else here: see self._failed_reports
            return
        self._deliveries += 1
        if self._deliveries % LATENCY_SAMPLE_EVERY == 1:
            # Sampled: the first delivery and every Nth after it keep the histogram cheap.
            latency = msg.latency()
            if latency is not None:
                self._m_latency.observe(latency)
        # The producer is idempotent: a partition's delivery reports come in offset order, so the
        # latest is the highest (and merge_offsets only ever raises a checkpointed offset).
        self._written[(msg.topic(), msg.partition())] = msg.offset()  # type: ignore[index,assignment]

    def _make_producer(self) -> Producer:
        mode = self.opts.transactions
        tid = self.transactional_id if mode in ("auto", "on") else None
        conf = self.kafka.producer_config(transactional_id=tid, on_delivery=self._on_delivery)
        producer = Producer(conf)
        if tid is None:
            return producer
        try:
            # Fences a previous instance of this job and aborts its open transaction, so the
            # checkpoint read next is the last committed one.
            producer.init_transactions(30)
            self._transactional = True
            self._txn_log = []
            log.info("job %s: Kafka transactions enabled (data and checkpoint commit atomically)",
                     self.opts.job)
            return producer
        except KafkaException as e:
            if mode == "on":
                raise CommitError(f"transactions requested but unavailable: {e}") from e
            log.warning("job %s: broker has no usable transactions (%s); checkpoints follow confirmed "
                        "deliveries instead", self.opts.job, e)
        return Producer(self.kafka.producer_config(on_delivery=self._on_delivery))

    def prepare(self) -> JobState | None:
        """Create the internal topics, the producer, and load the previous checkpoint.

        Returns:
            the previous state of this job (None if it never ran).

        Raises:
            SourceError: the control topic was not read to its end within ``--control-timeout``:
                whether the job has a checkpoint is unknown, so it does not start.
        """
        kafka_util.check_reachable(self._admin, self.kafka.bootstrap_servers)
        self._ensure([self.topics.control], config=CONTROL_TOPIC_CONFIG, partitions=1)
        self._ensure([self.topics.dead_letters, f"{self.kafka.topic_prefix}.identity",
                      f"{self.kafka.topic_prefix}.account"])
        self._producer = self._make_producer()
        try:
            self.previous = load_job(self.kafka.consumer_config("atproto-backfill-control-reader"),
                                     self.topics.control, self.opts.job, max_wait=self.kafka.control_timeout,
                                     must_exist=True)
        except SourceError as e:
            raise SourceError(
                f"job {self.opts.job}: cannot tell whether it has a checkpoint ({e}); not starting without "
                f"it (a resume would start over, a new run would number its checkpoints from 1): raise "
                f"--control-timeout (now {self.kafka.control_timeout:g} s) or check the brokers") from e
        self._dead = DeadLetters(self._produce_raw, self.codec, self.metrics, f"producer:{self.opts.source}",
                                 wall=self.wall)
        return self.previous

    # ------------------------------------------------------------------ producing

    def _produce_raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        if self._committing is not None:
            # A checkpoint is committing: this message belongs to the next transaction.
            pending = self._pending
            pending.append((topic, key, value))
            if len(pending) >= MAX_PENDING:
                self._finish_checkpoint()
            return
        self._send(topic, key, value)

    def _send(self, topic: str, key: bytes | None, value: bytes) -> None:
        assert self._producer is not None
        if self._transactional and not self._in_txn:
            self._begin()
        if topic not in self._known_topics:
            self._ensure([topic])
        producer = self._producer
        while True:
            try:
                producer.produce(topic, value, key)
                txn_log = self._txn_log
                if txn_log is not None:
                    txn_log.append((topic, key, value))
                    self._txn_bytes += len(value)
                    if len(txn_log) > REDO_MAX_MESSAGES or self._txn_bytes > REDO_MAX_BYTES:
                        self._txn_log = None  # too large to keep: an abort of it stops the job
                return
            except BufferError:
                # local queue full: serve delivery reports until there is room
                self._poll(0.05)
            except KafkaException as e:  # not _kafka_call: this is the hot path
                err = kafka_error_of(e) or KafkaError(KafkaError._FAIL)
                txn_log = self._txn_log
                if err.code() == KafkaError._STATE and self._transactional and txn_log is not None \
                        and self._fatal is None:
                    # The open transaction failed meanwhile (a message of it undelivered while the
                    # brokers were away), and librdkafka takes nothing more into it until it is
                    # aborted. The message stays with the transaction's others: the next
                    # checkpoint aborts it and sends them all again (see _commit).
                    txn_log.append((topic, key, value))
                    self._txn_bytes += len(value)
                    if len(txn_log) > REDO_MAX_MESSAGES or self._txn_bytes > REDO_MAX_BYTES:
                        raise self._meaning(err, "producing", DeliveryError) from e
                    return
                raise self._meaning(err, "producing", DeliveryError) from e

    def _begin(self) -> None:
        if self._transactional and not self._in_txn:
            assert self._producer is not None
            with self._kafka_call("beginning a transaction"):
                self._producer.begin_transaction()
            self._in_txn = True
            self._txn_started = self.clock()

    def _poll(self, timeout: float) -> None:
        """Serve delivery reports (a fatal producer error raises as FatalError)."""
        assert self._producer is not None
        with self._kafka_call("serving delivery reports", DeliveryError):
            self._producer.poll(timeout)

    @contextlib.contextmanager
    def _kafka_call(self, doing: str, error: type[FatalError] = CommitError) -> Iterator[None]:
        """Turn a Kafka failure of the producer calls inside into the FatalError it means.

        Raises:
            FencedError: a newer instance of this job took over its transactional id.
            CommitError: a fatal producer error; ``error``: any other Kafka error.
        """
        try:
            yield
        except Exception as e:
            err = kafka_error_of(e)
            if err is None:
                raise
            raise self._meaning(err, doing, error) from e

    def _meaning(self, err: KafkaError, doing: str, error: type[FatalError] = CommitError) -> FatalError:
        """The FatalError that ``err``, raised by a producer call while ``doing``, means."""
        err, self._fatal = resolve_fatal(self._producer, err, self._fatal)
        codes = {err.code(), *(e.code() for e, _ in self._failed_reports)}
        if self._fatal is not None:
            codes.add(self._fatal.code())
        if codes & FENCED_CODES:
            return FencedError.of(f"job {self.opts.job}", "job name", self.transactional_id,
                                  f"while {doing}: {err.str()}")
        if self._fatal is not None:
            return CommitError(f"job {self.opts.job}: fatal Kafka producer error while {doing}: {self._fatal.str()}")
        return error(f"job {self.opts.job}: {doing} failed: {err.str()}")

    def _refusals(self) -> str:
        """The first failed delivery reports, readable (counted in the delivery-errors metric once)."""
        refused = self._failed_reports
        if len(refused) > self._refusals_counted:
            self.metrics.delivery_errors.inc(self.opts.source, amount=len(refused) - self._refusals_counted)
            self._refusals_counted = len(refused)
        return "; ".join(f"{msg.topic()}: {err.str()}" for err, msg in refused[:3])

    def _route(self, collection: str) -> tuple[str, Callable[[RecordEvent], bytes], str]:
        """(topic, value encoder, metric label) of a collection, worked out once per collection.

        A hostile or broken source can send events of any number of distinct valid collections;
        each would cost a route, its codec entries, its place in the statistics and the checkpoint's
        offsets, and a topic. So the job produces to ``max_collections`` collections at most, and
        creates a topic for a new one only while its prefix has fewer collection topics (so that
        runs after runs, and jobs sharing the prefix, do not add up to more). Refused events are
        dead-lettered; nothing about their collection is kept.

        Raises:
            DropError: ``too_many_collections``: the job is at its cap of collections, or the
                collection has no topic and the prefix is at the cap of collection topics.
            InvalidRecordError: the collection makes a topic name longer than Kafka allows.
        """
        limit = self.opts.max_collections
        if len(self._routes) >= limit:
            raise DropError("too_many_collections",
                            f"collection {collection[:300]!r}: the job already produces to {limit} collections "
                            f"(--max-collections {limit}); events of further collections are dead-lettered")
        topic = self.topics.for_collection(collection)
        if topic not in self._known_topics and topic not in self._collection_topics:
            if len(self._collection_topics) >= limit:
                raise DropError("too_many_collections",
                                f"collection {collection[:300]!r} has no topic this job knows of, and the topic prefix "
                                f"{self.kafka.topic_prefix!r} already has {len(self._collection_topics)} collection "
                                f"topics (--max-collections {limit}); none more is created")
            self._collection_topics.add(topic)  # created by its first send
        route = (topic, self.codec.record_encoder_for(schema_name_for_collection(collection), topic),
                 collection_label(collection))
        self._routes[collection] = route
        self._m_collections.set(len(self._routes))
        self.stats.collections.add(collection)
        return route

    def _emit(self, event: Event) -> None:
        st = self.stats
        if type(event) is RecordEvent:
            coll = event.collection
            topic, encode, label = self._routes.get(coll) or self._route(coll)
            value = encode(event)
            st.records_produced += 1
            by_collection = st.by_collection
            by_collection[coll] = by_collection.get(coll, 0) + 1
        else:
            topic = self.topics.for_event(event)
            value = self.codec.encode_event(event, topic)
            label = "identity" if isinstance(event, IdentityEvent) else "account"
        self._produce_raw(topic, event.did.encode(), value)
        st.events_produced += 1
        n_produced = self._n_produced
        n_produced[label] = n_produced.get(label, 0) + 1
        st.latest_cursor = event.cursor
        if event.time_us and (st.latest_time_us is None or event.time_us > st.latest_time_us):
            st.latest_time_us = event.time_us
            if self._first_time_us is None:
                self._first_time_us = event.time_us
            t = event.time_us
            if not self._day[0] <= t < self._day[1]:  # a new UTC day: format the date once per day
                day_start = t - t % _DAY_US
                self._day = (day_start, day_start + _DAY_US)
                date = us_to_date(t)
                if date != st.current_date:
                    st.current_date = date
                    if self.on_date_change is not None:
                        self.on_date_change(date)

    def _flush_counts(self) -> None:
        """Add the locally counted received/produced events to their Prometheus counters."""
        if self._n_received:
            self._m_received.inc(self._n_received)
            self._n_received = 0
        if self._n_produced:
            for label, n in self._n_produced.items():
                child = self._m_produced.get(label)
                if child is None:
                    child = self._m_produced[label] = self.metrics.events_produced.child(self.opts.source, label)
                child.inc(n)
            self._n_produced = {}

    def _drop(self, drop: Drop) -> None:
        assert self._dead is not None
        self.stats.dropped[drop.reason] = self.stats.dropped.get(drop.reason, 0) + 1
        self.metrics.events_dropped.inc(self.opts.source, drop.reason)
        self._dead.send(self.topics.dead_letters, reason=drop.reason, detail=drop.detail,
                        payload=drop.payload, origin=drop.origin, did=drop.did, cursor=drop.cursor)

    def _skip(self, skip: Skip) -> None:
        self.stats.skipped[skip.reason] = self.stats.skipped.get(skip.reason, 0) + skip.count
        self.metrics.events_skipped.inc(self.opts.source, skip.reason, amount=skip.count)

    # ------------------------------------------------------------------ checkpoints

    @property
    def run_number(self) -> int:
        """The run of the job name this process is part of: its checkpoint's when resuming, else a
        new one (the previous run's plus one). A new run starts wherever it is asked to: its
        checkpoints continue the numbering, never the previous run's cursor (JobState.check_forward)."""
        prev = self.previous
        if prev is None:
            return 1
        return prev.run if self.opts.resume else prev.run + 1

    def _build_state(self, status: str) -> JobState:
        assert self._source is not None
        prev = self.state or self.previous
        same_run = self.state or (self.previous if self.opts.resume else None)
        pos = self._source.position
        now_us = int(self.wall() * 1e6)
        return JobState(
            job=self.opts.job, source=self.opts.source, status=status, filters=self.opts.filters,
            start_cursor=self.opts.start_cursor, end_time_us=self.opts.end_time_us,
            position=pos.snapshot(), cursor=pos.cursor,
            cursor_time_us=self.stats.latest_time_us or (same_run.cursor_time_us if same_run else None),
            counts=self._counts(prev), offsets={t: dict(p) for t, p in (prev.offsets if prev else {}).items()},
            started_at_us=(self.state.started_at_us if self.state else now_us),
            updated_at_us=now_us, finished_at_us=now_us if status != RUNNING else None,
            stop_reason=self._stop_reason if status != RUNNING else None,
            checkpoint=(prev.checkpoint + 1) if prev else 1,
            runs=(self.previous.runs + 1 if (self.previous and self.opts.resume) else 1)
            if self.state is None else self.state.runs,
            run=self.run_number,
        )

    def _counts(self, prev: JobState | None) -> dict[str, int]:
        base = dict(self.previous.counts) if (self.previous and self.opts.resume) else {}
        st = self.stats
        counts = dict(base)
        for k, v in (("received", st.messages_received), ("produced", st.events_produced),
                     ("records", st.records_produced)):
            counts[k] = base.get(k, 0) + v
        counts["skipped"] = base.get("skipped", 0) + sum(st.skipped.values())
        counts["dropped"] = base.get("dropped", 0) + sum(st.dropped.values())
        return counts

    @property
    def next_checkpoint(self) -> int:
        """The number of the checkpoint that will cover what is produced now."""
        last = self._committing_state or self.state or self.previous
        return (last.checkpoint if last else 0) + 1

    def checkpoint(self, status: str = RUNNING) -> JobState:
        """Make everything produced so far durable, then record the job state covering it.

        Waits for a checkpoint committing in the background first.

        Raises:
            DeliveryError: Kafka refused some produced data.
            CommitError: the transaction could not commit.
            CursorRegressionError: the new state would move backwards.
        """
        self._finish_checkpoint()
        t0 = self.clock()
        state = self._start_state(status)
        self._commit(state)
        self._committed(state, self.clock() - t0)
        return state

    def checkpoint_in_background(self) -> None:
        """Start a running checkpoint: the state is taken now, the flush and commit run on the
        checkpoint thread, and what the loop produces until it is done waits for the next
        transaction. Does nothing while the previous one is still committing."""
        fut = self._committing
        if fut is not None:
            if not fut.done():
                return
            self._finish_checkpoint()
        t0 = self.clock()
        state = self._start_state(RUNNING)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._committing_state = state
        self._committing = self._executor.submit(self._commit_timed, state, t0)

    def _finish_checkpoint(self) -> None:
        """Wait for the background checkpoint (if any), then send what was held meanwhile.

        Raises:
            what the commit raised (DeliveryError, CommitError, CursorRegressionError).
        """
        fut = self._committing
        if fut is None:
            return
        state = self._committing_state
        try:
            seconds = fut.result()
        finally:
            self._committing = None
            self._committing_state = None
        assert state is not None
        self._committed(state, seconds)
        pending, self._pending = self._pending, []
        send = self._send
        for topic, key, value in pending:
            send(topic, key, value)

    def _start_state(self, status: str) -> JobState:
        """The state covering everything produced so far (offsets are added once delivered)."""
        self._flush_counts()
        self._begin()
        state = self._build_state(status)
        self._since_checkpoint = 0
        self._last_checkpoint = self.clock()
        return state

    def _commit_timed(self, state: JobState, t0: float) -> float:
        self._commit(state)
        return self.clock() - t0

    def _commit(self, state: JobState) -> None:
        """Flush, add the delivered offsets to ``state``, and commit it with the data it covers.

        Runs on the checkpoint thread for a background checkpoint; the loop sends nothing to the
        producer meanwhile, so every delivery report it serves belongs to this checkpoint.

        While the brokers are away (one restarting) it keeps flushing and committing, for up to
        :data:`COMMIT_PATIENCE` seconds. A transaction that failed meanwhile (a message of it not
        delivered within the transaction timeout) is aborted and redone: its messages are sent
        again in a new transaction, which this checkpoint then commits. When Kafka itself aborted it
        (open past ``transaction.timeout.ms``), this producer is fenced or fails fatally on it: a
        new one takes over, once the control topic shows that no other instance of the job
        committed meanwhile.
        """
        deadline = self.clock() + COMMIT_PATIENCE
        while True:
            try:
                if self._commit_once(state, deadline):
                    return
            except CommitError as e:
                # Fenced, or another fatal error (INVALID_TXN_STATE when the abort came after Kafka's)
                unusable = isinstance(e, FencedError) or self._fatal is not None
                if not (unusable and self._timed_out_by_kafka(deadline)):
                    raise
                self._reincarnate(deadline)
                self._resend()

    def _commit_once(self, state: JobState, deadline: float) -> bool:
        """One try of :meth:`_commit`: True once committed, False after a redone transaction."""
        producer = self._producer
        assert producer is not None
        with self._kafka_call("flushing", DeliveryError):
            remaining = producer.flush(60)
        if self._failed_reports:
            if not self._redoable(deadline):
                raise self._refused_error("Kafka refused data")
            self._redo(f"{len(self._failed_reports)} messages not delivered: {self._refusals()}", deadline)
            return False
        if remaining:
            if self._transactional and self.clock() < deadline:
                log.warning("job %s: %d messages still undelivered after 60 s; waiting for the brokers",
                            self.opts.job, remaining)
                return False
            raise DeliveryError(f"{remaining} messages still undelivered after 60 s")
        state.merge_offsets(self._written)
        state.check_forward(self.state or self.previous)
        self._send(self.topics.control, self.opts.job.encode(), state.to_bytes())
        if not self._transactional:
            with self._kafka_call("flushing the checkpoint", DeliveryError):
                remaining = producer.flush(60)
            if remaining or self._failed_reports:
                raise self._refused_error(f"checkpoint of job {self.opts.job} not delivered")
            return True
        err = self._commit_transaction(deadline)
        if err is None:
            self._in_txn = False
            self._txn_started = None
            self._txn_log = []
            self._txn_bytes = 0
            return True
        if err.txn_requires_abort() and self._redoable(deadline):
            self._redo(err.str(), deadline)
            return False
        raise self._meaning(err, "committing the transaction")

    def _commit_transaction(self, deadline: float) -> KafkaError | None:
        """Commit the open transaction, again while the error says to retry (until ``deadline``);
        None when committed, else the error that stopped it."""
        producer = self._producer
        assert producer is not None
        while True:
            try:
                producer.commit_transaction(60)
                return None
            except Exception as e:
                err = kafka_error_of(e)
                if err is None:
                    raise
            if not (err.retriable() and not err.fatal() and self.clock() < deadline):
                return err
            log.warning("job %s: committing the transaction: %s; trying again", self.opts.job, err.str())

    def _redoable(self, deadline: float) -> bool:
        """True when the open transaction failed for a passing reason and can be redone: every
        message of it kept, every failed delivery a timeout or another transient error, time left."""
        if not self._transactional or self._txn_log is None or self.clock() >= deadline:
            return False
        return all(_transient_failure(err) for err, _ in self._failed_reports)

    def _timed_out_by_kafka(self, deadline: float) -> bool:
        """True when a fence may be Kafka's own abort of the open transaction (open longer than
        ``transaction.timeout.ms``, the brokers away meanwhile) and it can be redone."""
        started = self._txn_started
        return (self._transactional and self._txn_log is not None and started is not None
                and self.clock() - started >= self.kafka.transaction_timeout() and self.clock() < deadline)

    def _redo(self, why: str, deadline: float) -> None:
        """Abort the open transaction and send its messages again in a new one.

        Raises:
            FencedError: the producer was fenced (by a newer instance, or by Kafka's own abort of a
                transaction open too long).
            CommitError: the abort failed.
        """
        producer = self._producer
        assert producer is not None
        assert self._txn_log is not None
        log.warning("job %s: the transaction failed (%s); aborting it and sending its %d messages again",
                    self.opts.job, why, len(self._txn_log))
        while True:
            try:
                producer.abort_transaction(60)
                break
            except Exception as e:
                err = kafka_error_of(e)
                if err is None:
                    raise
            if not (err.retriable() and not err.fatal() and self.clock() < deadline):
                raise self._meaning(err, "aborting a failed transaction")
            log.warning("job %s: aborting the transaction: %s; trying again", self.opts.job, err.str())
        self._in_txn = False
        self._txn_started = None
        self._forget_failures(producer)
        self._resend()

    def _forget_failures(self, producer: Producer) -> None:
        """Serve the reports of what an abort purged, then forget every failed delivery of the
        aborted transaction (none of its data is in a partition's committed part). Messages sent
        right after an abort may be purged too (librdkafka bumps the producer's epoch): their
        failures make the next flush redo the transaction once more."""
        with contextlib.suppress(Exception):
            producer.flush(10)  # nothing is queued after an abort: this serves the purge reports
        self._refusals()  # counted in the delivery-errors metric
        self._failed_reports.clear()
        self._refusals_counted = 0

    def _resend(self) -> None:
        """Send the aborted transaction's messages again (in a new transaction, begun by the first);
        the checkpoint's own message is not among them: the caller sends the state again."""
        messages = self._txn_log
        assert messages is not None
        self.metrics.transactions_redone.inc(self.opts.source)
        self._txn_log, self._txn_bytes = [], 0
        control = self.topics.control
        send = self._send
        try:
            for topic, key, value in messages:
                if topic != control:
                    send(topic, key, value)
        except BaseException:
            self._txn_log = messages  # the new transaction failed too: all of them are still to redo
            raise

    def _reincarnate(self, deadline: float) -> None:
        """Replace the producer Kafka fenced when it aborted the open transaction by its timeout.

        When the control topic's last checkpoint of the job is not this instance's last, a newer
        instance took over and committed: this one stops as fenced, and starts no producer (which
        would fence the newer one). Else the new producer's ``init_transactions`` fences every other
        producer of the job's transactional id, after which the control topic is read once more: what
        it holds of the job is then final.

        Raises:
            FencedError: another instance of the job committed a checkpoint.
            CommitError: the new producer could not start its transactions.
            SourceError: the control topic could not be read.
        """
        old = self._producer
        age = self.clock() - (self._txn_started or self.clock())
        log.warning("job %s: Kafka aborted the transaction open for %.0f s (past transaction.timeout.ms, the brokers "
                    "away) and fenced this producer; a new one takes over and redoes it", self.opts.job, age)
        self._check_not_superseded()
        self._producer = None
        if old is not None:
            with contextlib.suppress(Exception):
                old.purge()
            self._forget_failures(old)
        self._fatal = None
        self._in_txn = False
        self._txn_started = None
        producer = Producer(self.kafka.producer_config(transactional_id=self.transactional_id,
                                                       on_delivery=self._on_delivery))
        while True:
            try:
                producer.init_transactions(30)
                break
            except KafkaException as e:
                err = kafka_error_of(e)
                if err is None or err.fatal() or not err.retriable() or self.clock() >= deadline:
                    raise CommitError(f"job {self.opts.job}: a new producer could not start its transactions: "
                                      f"{e}") from e
        self._producer = producer
        self._check_not_superseded()

    def _check_not_superseded(self) -> None:
        """Raise FencedError when the job's last checkpoint in the control topic is not this
        instance's last (another instance committed one).

        Raises:
            FencedError: another instance of the job committed a checkpoint.
            SourceError: the control topic could not be read.
        """
        latest = load_job(self.kafka.consumer_config("atproto-backfill-control-reader"), self.topics.control,
                          self.opts.job, max_wait=self.kafka.control_timeout, must_exist=True)
        mine = self.state or self.previous
        if (latest and (latest.run, latest.checkpoint)) != (mine and (mine.run, mine.checkpoint)):
            self._fatal = KafkaError(KafkaError._FENCED)  # nothing more is written (close() aborts nothing)
            raise FencedError.of(f"job {self.opts.job}", "job name", self.transactional_id,
                                 f"its checkpoint {latest.checkpoint if latest else None} of run "
                                 f"{latest.run if latest else None} is not this instance's")

    def _refused_error(self, what: str) -> FatalError:
        """The error for failed delivery reports: FencedError when they say this job was fenced."""
        detail = self._refusals()
        for err, _ in self._failed_reports:
            if err.code() in FENCED_CODES:
                return self._meaning(err, "delivering")
        return DeliveryError(f"{what}: {detail}")

    def _committed(self, state: JobState, seconds: float) -> None:
        """Record ``state`` as the job's committed state (its flush and commit took ``seconds``)."""
        self.state = state
        self.metrics.checkpoints.inc(self.opts.source)
        self.metrics.flush_duration.labels(self.opts.source).observe(seconds)
        if state.cursor is not None:
            self.metrics.source_cursor.labels(self.opts.source).set(state.cursor)
        self._update_progress_metrics()

    def _update_progress_metrics(self) -> None:
        end = self.opts.end_time_us
        latest = self.stats.latest_time_us
        if end and latest and self._first_time_us is not None and end > self._first_time_us:
            ratio = (latest - self._first_time_us) / (end - self._first_time_us)
            self.metrics.watermark_progress.labels(self.opts.source).set(min(1.0, max(0.0, ratio)))
        if latest:
            self.metrics.observe_event_time(self.opts.source, latest)

    # ------------------------------------------------------------------ the loop

    def stop(self, reason: str) -> None:
        """Ask the run to stop gracefully (from a signal handler or another task)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        task = self._main_task
        if task is not None and not task.done():
            task.cancel()

    _main_task: asyncio.Task[None] | None = None
    _failure: Exception | None = None

    async def _consume(self, source: Source) -> None:
        assert self._producer is not None
        opts = self.opts
        limit = opts.num_records
        every = opts.checkpoint_events
        position = source.position
        stats = self.stats
        n = 0
        self._begin()
        async for item in source.items():
            n += 1
            if isinstance(item, (RecordEvent, IdentityEvent, AccountEvent)):
                stats.messages_received += 1
                self._n_received += 1
                try:
                    self._emit(item)
                except DropError as e:
                    self._drop(Drop(e.reason, e.detail, _raw_of(item), f"{opts.source}:{opts.job}",
                                    did=item.did, cursor=item.cursor))
                position.advance(item)
                self._since_checkpoint += 1
                if limit and stats.records_produced >= limit:
                    stats.target_reached = True
                    self._stop_reason = "target_reached"
                    return
                if self._since_checkpoint >= every and self._committing is None:
                    self.checkpoint_in_background()
            elif isinstance(item, Drop):
                stats.messages_received += 1
                self._n_received += 1
                self._drop(item)
            elif isinstance(item, Skip):
                stats.messages_received += item.count
                self._n_received += item.count
                self._skip(item)
            elif isinstance(item, End):
                if item.reason == "end_cursor_reached":
                    stats.end_cursor_reached = True
                self._stop_reason = item.reason
                return
            if n & 127 == 0:
                self._flush_counts()
                committing = self._committing
                if committing is None:
                    self._poll(0)
                elif committing.done():
                    self._finish_checkpoint()
                if self.health is not None:
                    self.health.beat()
        self._stop_reason = self._stop_reason or "exhausted"

    async def _ticker(self) -> None:
        """Checkpoints by time, the max-time stop, progress; a failure here stops the loop too."""
        try:
            await self._tick()
        except Exception as e:
            self._failure = e
            task = self._main_task
            if task is not None and not task.done():
                task.cancel()
            raise

    async def _tick(self) -> None:
        interval = self.opts.checkpoint_interval
        deadline = (self.clock() + self.opts.max_time) if self.opts.max_time else None
        last_progress = self.clock()
        while True:
            await asyncio.sleep(0.2)
            now = self.clock()
            assert self._producer is not None
            committing = self._committing
            if committing is None:
                self._poll(0)
            elif committing.done():
                self._finish_checkpoint()
            self._flush_counts()
            if self.health is not None:
                self.health.beat()
            if deadline is not None and now >= deadline:
                self.stop("max_time")
                return
            if now - self._last_checkpoint >= interval and self._since_checkpoint and self._committing is None:
                self.checkpoint_in_background()
            if self.on_progress is not None and now - last_progress >= 1.0:
                last_progress = now
                self.on_progress(self.stats)

    async def run(self, make_source: Callable[[JobState | None], Source]) -> JobState:
        """Run the job to one of its stops and return the final checkpoint.

        Args:
            make_source: builds the source from the previous state when resuming (None otherwise).
        """
        if self._producer is None:
            self.prepare()
        resume_from = self.previous if self.opts.resume else None
        if self.opts.resume and self.previous is None:
            log.warning("job %s has no checkpoint to resume from; starting fresh", self.opts.job)
        if resume_from is not None:
            log.info("job %s: resuming run %d from cursor %s (checkpoint %d, status %s)", self.opts.job,
                     resume_from.run, resume_from.cursor, resume_from.checkpoint, resume_from.status)
        elif self.previous is not None:
            log.info("job %s: starting run %d anew; run %d (%s at cursor %s) is not continued "
                     "(--resume continues a run)", self.opts.job, self.run_number, self.previous.run,
                     self.previous.status, self.previous.cursor)
        source = make_source(resume_from)
        self._source = source
        if self.opts.end_time_us:
            self.metrics.watermark_end.labels(self.opts.source).set(self.opts.end_time_us / 1e6)
        if self.health is not None:
            self.health.set_ready(True)
        self.stats.started = self.clock()
        self._last_checkpoint = self.clock()
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop, "signal")
                installed.append(sig)
        self._main_task = asyncio.ensure_future(self._consume(source))
        ticker = asyncio.ensure_future(self._ticker())
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main_task
            if self._failure is not None:
                raise self._failure  # the ticker's checkpoint failed: no final checkpoint
            if self._main_task.cancelled() and self._stop_reason is None:
                raise asyncio.CancelledError
        finally:
            self._flush_counts()
            ticker.cancel()
            # A failure of the ticker is raised above (it stopped the loop), not a second time here.
            with contextlib.suppress(asyncio.CancelledError, *((Exception,) if self._failure else ())):
                await ticker
            for sig in installed:
                loop.remove_signal_handler(sig)
            closer = getattr(source, "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()
        if self.health is not None:
            self.health.set_ready(False, "stopping")
        self.stats.stop_reason = self._stop_reason or "exhausted"
        finished = self.stats.stop_reason in ("target_reached", "end_cursor_reached", "exhausted")
        final = self.checkpoint(FINISHED if finished else STOPPED)
        self.stats.ended = self.clock()
        if self.on_progress is not None:
            self.on_progress(self.stats)
        log.info("job %s %s (%s): %d records, %d events produced, cursor %s", self.opts.job, final.status,
                 final.stop_reason, self.stats.records_produced, self.stats.events_produced, final.cursor)
        return final

    def close(self) -> None:
        """Abort any open transaction and release the producer."""
        fut = self._committing
        if fut is not None:
            with contextlib.suppress(Exception):
                fut.result()  # a failed commit leaves the transaction open: aborted below
            self._committing = None
            self._committing_state = None
            self._pending = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        producer = self._producer
        if producer is not None and self._fatal is not None:
            # Fenced, or otherwise unusable: it can neither abort nor deliver anything (a newer
            # instance aborted its open transaction when it fenced it; Kafka aborts it otherwise
            # after transaction.timeout.ms).
            log.debug("job %s: producer closed after its fatal error %s", self.opts.job, self._fatal)
            self._in_txn = False
            return
        if producer is not None and self._in_txn:
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(10)
            self._in_txn = False
        if producer is not None:
            # close() runs in finally blocks: it never masks the error that is propagating
            with contextlib.suppress(Exception), self._kafka_call("closing", DeliveryError):
                producer.flush(10)


def _raw_of(event: Event) -> bytes:
    try:
        return orjson.dumps(to_jetstream_json(event))
    except TypeError:
        return repr(event).encode()

"""The one publisher of the producer runners: everything between an event and a Kafka partition.

A :class:`Publisher` serves one runner (a job of :mod:`producers.job`, a replica of
:mod:`producers.repos.worktopic`) and owns:

* routing: the topic, value encoder and metric label of an event, worked out once per collection
  (once for identity, once for account events) and cached here only; the Kafka key from
  :meth:`~runtime.contract.topics.TopicMap.key_for` (the DID); a job's bound on the collections it
  produces to and the collection topics it creates (``--max-collections``);
* topics: the topic of a collection created as the collection appears (one metadata request first
  learns every topic that exists), and the runner's internal topics;
* the producer: transactional or not, its delivery reports (the offsets written, the produce
  latency, the refusals), what a Kafka error means (fenced, fatal, refused), and a new producer
  when Kafka fenced this one by aborting a transaction open past its timeout;
* producing: ``produce()`` again while librdkafka's local queue is full, messages held while a
  checkpoint commits on another thread, dead letters through the same producer (so they share
  its transactions), and the produced-events counter;
* transactions: begin; a job's checkpoint commit, which rides out a broker restart for up to
  :data:`COMMIT_PATIENCE` seconds and redoes a transaction that failed meanwhile from its kept
  messages (:data:`REDO_MAX_MESSAGES`, :data:`REDO_MAX_BYTES`); a replica's commit with its consumer
  group's offsets; abort.

:func:`deliver` sends a few messages outside any runner (the DID work queue, a coordinator's
checkpoint) with the same produce loop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from producers.source import Drop
from runtime.contract.codec import AvroCodec
from runtime.contract.records import Event, RecordEvent
from runtime.contract.topics import DID_LEVEL, TopicMap, schema_name_for, schema_name_for_collection
from runtime.contract.typed import datum_for
from runtime.errors import CommitError, DeliveryError, DropError, FatalError, FencedError
from runtime.kafka import clients as kafka_util
from runtime.kafka.deadletter import DeadLetters
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics, collection_label

log = logging.getLogger(__name__)

#: Every Nth delivery report feeds the produce-latency histogram.
LATENCY_SAMPLE_EVERY: Final = 64
#: Messages held while a checkpoint commits in the background; at this many the runner waits for it.
#: About a second of a full-speed job: 100,000 held messages made the Jetstream producer's RSS peak
#: at 314 MB, 20,000 keep it at 187 MB at the same 27,000 events/s (bench/bench_memory.py, issue 16).
MAX_PENDING: Final = 20_000
#: A transaction Kafka aborts (one of its messages undelivered within ``transaction.timeout.ms``: a
#: broker away that long) is redone: its messages are sent again in a new one. The publisher keeps the
#: open transaction's messages for that, up to this many and REDO_MAX_BYTES of values; a larger
#: transaction is not kept, and its abort stops the job (a resume redoes it).
REDO_MAX_MESSAGES: Final = 100_000
REDO_MAX_BYTES: Final = 64 * 2**20
#: Seconds a checkpoint goes on flushing, committing and redoing its transaction while the brokers
#: are away before it fails.
COMMIT_PATIENCE: Final = 300.0
#: Seconds an abort may take when it is asked only to learn a fatal error the client lost.
ABORT_PATIENCE: Final = 10.0
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
#: How librdkafka reports the messages an abort purged (queued or in flight): not refusals.
_PURGED: Final = frozenset((KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT))

#: A message as the publisher keeps it: topic, key, value.
Msg = tuple[str, bytes | None, bytes]


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


def produce_retrying(producer: Producer, topic: str, key: bytes | None, value: bytes,
                     serve: Callable[[float], object]) -> None:
    """``producer.produce()``, serving delivery reports (``serve(seconds)``) while the local queue is full.

    Raises:
        KafkaException: the producer refused the message.
    """
    while True:
        try:
            producer.produce(topic, value, key)
            return
        except BufferError:
            serve(0.05)


def deliver(kafka: KafkaSettings, messages: Iterable[Msg], *, timeout: float = 60.0) -> tuple[int, list[str]]:
    """Send ``messages`` with a plain (non-transactional) producer and wait for every delivery.

    Returns:
        how many messages were sent, and what went wrong (refusals, then how many messages were still
        undelivered after ``timeout`` seconds): empty when every message was delivered.
    """
    errors: list[str] = []

    def report(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    producer = Producer(kafka.producer_config(on_delivery=report))
    n = 0
    for topic, key, value in messages:
        produce_retrying(producer, topic, key, value, producer.poll)
        n += 1
        if n % 10000 == 0:
            producer.poll(0)
    remaining = producer.flush(timeout)
    if remaining:
        errors.append(f"{remaining} messages still undelivered after {timeout:g} s")
    return n, errors


@dataclass(frozen=True, slots=True)
class Route:
    """Where events of one collection (or identity, or account events) go.

    Attributes:
        topic: the topic they are written to.
        encode: their value encoder (Avro, with the schema of the collection).
        label: the collection label of the produced-events metric.
    """

    topic: str
    encode: Callable[[Any], bytes]  # takes the route's own event type (RecordEvent, IdentityEvent...)
    label: str


class Publisher:
    """Routes events, produces them and commits them for one runner; see the module docstring.

    Args:
        kafka: Kafka settings with resolved bootstrap servers.
        codec: Avro codec of the values.
        metrics: where to count (labels ``source`` and stage ``producer:<source>``).
        source: the runner's source label (``jetstream``, ``firehose``, ``repo``).
        owner: how errors and logs name the runner (``job J``, ``replica R``).
        id_kind: what a second instance shares with this one when it fences it (``job name``).
        transactional_id: the producer's transactional id (used when transactions are on).
        max_collections: the most distinct collections routed, and the most collection topics of the
            prefix a new collection's topic is created under (None: no bound).
        redo: keep the open transaction's messages, so that :meth:`commit` can redo it.
        on_route: called with each collection as its route is made.
        clock: monotonic seconds; wall: unix seconds (dead letters' times).
    """

    def __init__(self, kafka: KafkaSettings, codec: AvroCodec, metrics: Metrics, *, source: str, owner: str,
                 id_kind: str, transactional_id: str, max_collections: int | None = None, redo: bool = False,
                 on_route: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.kafka = kafka
        self.codec = codec
        self.metrics = metrics
        self.source = source
        self.owner = owner
        self.id_kind = id_kind
        self.transactional_id = transactional_id
        self.max_collections = max_collections
        self.clock = clock
        self.topics = TopicMap(kafka.topic_prefix)
        self.admin = kafka_util.admin(kafka.client_config())
        self.dead = DeadLetters(self.produce, codec, metrics, f"producer:{source}", wall=wall)
        self.producer: Producer | None = None
        self.transactional = False
        self.in_txn = False
        #: The producer's fatal error, once seen.
        self.fatal: KafkaError | None = None
        #: Next offset of every partition written to, from the delivery reports.
        self.written: dict[tuple[str, int], int] = {}
        #: Failed delivery reports, read (and formatted) later: after a fatal producer error
        #: confluent-kafka may run the callback with that error pending, when any call there fails.
        self.failures: list[tuple[KafkaError, Message]] = []
        self._refusals_counted = 0
        self._keep_txn = redo
        self._on_route = on_route
        self._known_topics: set[str] = set()
        # The collection topics of the prefix known to exist, and those routed to be created: a topic
        # for a new collection is created only while there are fewer than max_collections.
        self._collection_topics: set[str] = set()
        # collection -> route (at most max_collections of them), and the routes of the other events.
        self._routes: dict[str, Route] = {}
        self._event_routes: dict[type, Route] = {}
        self._m_collections = metrics.producer_collections.labels(source)
        self._m_latency = metrics.produce_latency.labels(source)
        self._m_produced: dict[str, Any] = {}
        self._deliveries = 0
        # Produced events by metric label, added to the counter in bulk (flush_counts).
        self._n_produced: dict[str, int] = {}
        # Messages held while a checkpoint commits on another thread (None: not holding), and what to
        # call once MAX_PENDING are held.
        self._held: list[Msg] | None = None
        self._on_full: Callable[[], None] | None = None
        # The open transaction's messages, to send again if Kafka aborts it (None: too many to keep,
        # or no redo), and the bytes of their values.
        self._txn_log: list[Msg] | None = None
        self._txn_bytes = 0
        self._txn_started: float | None = None  # when the open transaction began (clock)

    # ------------------------------------------------------------------ topics

    def ensure(self, topics: list[str], config: dict[str, str] | None = None, partitions: int | None = None) -> None:
        """Create those of ``topics`` that do not exist yet."""
        missing = [t for t in topics if t not in self._known_topics]
        if not missing:
            return
        # One metadata request learns every existing topic, so the first event of each collection
        # that already has its topic costs nothing more.
        self._learn(kafka_util.existing_topics(self.admin))
        missing = [t for t in missing if t not in self._known_topics]
        if not missing:
            return
        kafka_util.ensure_topics(self.admin, missing, partitions=partitions or self.kafka.topic_partitions,
                                 replication=self.kafka.topic_replication, config=config)
        self._learn(missing)

    def _learn(self, topics: Iterable[str]) -> None:
        """Record ``topics`` as existing (and count the collection topics of the prefix among them)."""
        topics = list(topics)
        self._known_topics.update(topics)
        collection_of = self.topics.collection_of
        self._collection_topics.update(t for t in topics if collection_of(t) not in (None, *DID_LEVEL))

    # ------------------------------------------------------------------ routing

    def _route_collection(self, collection: str) -> Route:
        """The route of a collection's record events.

        A hostile or broken source can send events of any number of distinct valid collections;
        each would cost a route, its codec entries, its place in the statistics and the checkpoint's
        offsets, and a topic. So a bounded publisher routes ``max_collections`` collections at most,
        and creates a topic for a new one only while its prefix has fewer collection topics (so that
        runs after runs, and jobs sharing the prefix, do not add up to more). Refused events are
        dead-lettered by the runner; nothing about their collection is kept.

        Raises:
            DropError: ``too_many_collections``: the cap of collections is reached, or the
                collection has no topic and the prefix is at the cap of collection topics.
            InvalidRecordError: the collection makes a topic name longer than Kafka allows.
        """
        limit = self.max_collections
        if limit is not None and len(self._routes) >= limit:
            raise DropError("too_many_collections",
                            f"collection {collection[:300]!r}: the job already produces to {limit} collections "
                            f"(--max-collections {limit}); events of further collections are dead-lettered")
        topic = self.topics.for_collection(collection)
        if limit is not None and topic not in self._known_topics and topic not in self._collection_topics:
            if len(self._collection_topics) >= limit:
                raise DropError("too_many_collections",
                                f"collection {collection[:300]!r} has no topic this job knows of, and the topic prefix "
                                f"{self.kafka.topic_prefix!r} already has {len(self._collection_topics)} collection "
                                f"topics (--max-collections {limit}); none more is created")
            self._collection_topics.add(topic)  # created by its first send
        route = Route(topic, self.codec.record_encoder_for(schema_name_for_collection(collection), topic),
                      collection_label(collection))
        self._routes[collection] = route
        self._m_collections.set(len(self._routes))
        if self._on_route is not None:
            self._on_route(collection)
        return route

    def _route_event(self, event: Event) -> Route:
        """The route of DID-level events (identity, account, sync)."""
        schema = schema_name_for(event)
        topic = self.topics.for_event(event)
        encode_datum = self.codec.encoder_for(schema, topic)

        def encode(e: Event) -> bytes:
            return encode_datum(datum_for(e))

        route = Route(topic, encode, collection_label(schema))
        self._event_routes[type(event)] = route
        return route

    def publish(self, event: Event) -> None:
        """Encode ``event`` and produce it to its topic, keyed by its DID, and count it.

        The route is worked out at the first event of a collection (or the first identity or account
        event) and kept: the only routing cache.

        Raises:
            DropError: the event is refused (``too_many_collections``, an invalid record): it is not
                produced; the runner dead-letters it.
            DeliveryError, CommitError, FencedError: as :meth:`produce`.
        """
        if type(event) is RecordEvent:
            route = self._routes.get(event.collection) or self._route_collection(event.collection)
        else:
            route = self._event_routes.get(type(event)) or self._route_event(event)
        topic, key, value = route.topic, self.topics.key_for(event), route.encode(event)
        if self._held is None:
            self._send(topic, key, value)  # produce()'s common case, one call less once per event
        else:
            self.produce(topic, key, value)
        n_produced = self._n_produced
        n_produced[route.label] = n_produced.get(route.label, 0) + 1

    def flush_counts(self) -> None:
        """Add the events published since the last call to the produced-events counter."""
        if not self._n_produced:
            return
        for label, n in self._n_produced.items():
            child = self._m_produced.get(label)
            if child is None:
                child = self._m_produced[label] = self.metrics.events_produced.child(self.source, label)
            child.inc(n)
        self._n_produced = {}

    def dead_letter(self, drop: Drop) -> None:
        """Count ``drop`` and write it to the dead-letter topic (in the open transaction)."""
        self.metrics.events_dropped.inc(self.source, drop.reason)
        self.dead.send(self.topics.dead_letters, reason=drop.reason, detail=drop.detail, payload=drop.payload,
                       origin=drop.origin, did=drop.did, cursor=drop.cursor)

    # ------------------------------------------------------------------ the producer

    def start(self, transactions: str = "on", *, timeout: float = 30.0,
              required: str = "transactions requested but unavailable") -> bool:
        """Create the producer; with transactions (``auto`` or ``on``), initialising them fences every
        earlier producer of the transactional id and aborts its open transaction.

        Returns:
            True when the producer is transactional (``auto`` falls back to a plain producer when the
            broker has no usable transactions).

        Raises:
            CommitError: ``on``, and transactions are unavailable (``required`` says why they are needed).
        """
        tid = self.transactional_id if transactions in ("auto", "on") else None
        producer = Producer(self.kafka.producer_config(transactional_id=tid, on_delivery=self.on_delivery))
        if tid is not None:
            try:
                producer.init_transactions(timeout)
                self.transactional = True
                self._txn_log = [] if self._keep_txn else None
            except KafkaException as e:
                if transactions == "on":
                    raise CommitError(f"{required}: {e}") from e
                log.warning("%s: broker has no usable transactions (%s); checkpoints follow confirmed "
                            "deliveries instead", self.owner, e)
                producer = Producer(self.kafka.producer_config(on_delivery=self.on_delivery))
        self.producer = producer
        return self.transactional

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        """The producer's delivery report callback."""
        if err is not None:
            self.failures.append((err, msg))  # nothing else here: see self.failures
            return
        self._deliveries += 1
        if self._deliveries % LATENCY_SAMPLE_EVERY == 1:
            # Sampled: the first delivery and every Nth after it keep the histogram cheap.
            latency = msg.latency()
            if latency is not None:
                self._m_latency.observe(latency)
        # The producer is idempotent: a partition's delivery reports come in offset order, so the
        # latest is the highest (and merge_offsets only ever raises a checkpointed offset).
        self.written[(msg.topic(), msg.partition())] = msg.offset()  # type: ignore[index,assignment]

    def poll(self, timeout: float) -> None:
        """Serve delivery reports (a fatal producer error raises as FatalError)."""
        assert self.producer is not None
        with self.kafka_call("serving delivery reports", DeliveryError):
            self.producer.poll(timeout)

    @contextlib.contextmanager
    def kafka_call(self, doing: str, error: type[FatalError] = CommitError) -> Iterator[None]:
        """Turn a Kafka failure of the producer calls inside into the FatalError it means.

        Raises:
            FencedError: a newer instance took over the transactional id.
            CommitError: a fatal producer error; ``error``: any other Kafka error.
        """
        try:
            yield
        except Exception as e:
            err = kafka_error_of(e)
            if err is None and isinstance(e, SystemError):
                err = self._lost_error()
            if err is None:
                raise
            raise self.meaning(err, doing, error) from e

    def _lost_error(self) -> KafkaError | None:
        """The Kafka error behind a producer call that returned NULL with no exception set.

        confluent-kafka can lose the fatal error its error callback raised inside a long ``flush()``
        (the call goes on polling, and another callback clears it): the call then fails with a bare
        SystemError. The producer still knows. In a transaction, ``abort_transaction()`` raises the fatal
        error (fenced, say); aborting is safe here: the caller stops, and a resume redoes the open
        transaction from the last checkpoint. Otherwise the error is ``_FATAL``, which :meth:`resolve`
        makes precise with the next ``poll()``.
        """
        producer = self.producer
        if producer is None:
            return None
        if self.fatal is None and self.transactional and self.in_txn:
            try:
                producer.abort_transaction(ABORT_PATIENCE)
                self.in_txn = False
            except Exception as e:  # noqa: BLE001 - only the KafkaError it carries matters
                err = kafka_error_of(e)
                if err is not None:
                    return err
        return KafkaError(KafkaError._FATAL, "the Kafka client failed without saying why")

    def resolve(self, err: KafkaError) -> KafkaError:
        """``err`` made precise (see :func:`resolve_fatal`), noting the producer's fatal error."""
        err, self.fatal = resolve_fatal(self.producer, err, self.fatal)
        return err

    def fenced(self, err: KafkaError) -> bool:
        """True when ``err``, a failed delivery or the fatal error says a newer instance took over."""
        codes = {err.code(), *(e.code() for e, _ in self.failures)}
        if self.fatal is not None:
            codes.add(self.fatal.code())
        return bool(codes & FENCED_CODES)

    def fenced_error(self, detail: str) -> FencedError:
        """The error that stops this instance: a newer one took over its transactional id."""
        return FencedError.of(self.owner, self.id_kind, self.transactional_id, detail)

    def meaning(self, err: KafkaError, doing: str, error: type[FatalError] = CommitError) -> FatalError:
        """The FatalError that ``err``, raised by a producer call while ``doing``, means."""
        err = self.resolve(err)
        if self.fenced(err):
            return self.fenced_error(f"while {doing}: {err.str()}")
        if self.fatal is not None:
            return CommitError(f"{self.owner}: fatal Kafka producer error while {doing}: {self.fatal.str()}")
        return error(f"{self.owner}: {doing} failed: {err.str()}")

    def refusals(self) -> str:
        """The first failed delivery reports, readable (counted in the delivery-errors metric once)."""
        refused = self.failures
        if len(refused) > self._refusals_counted:
            self.metrics.delivery_errors.inc(self.source, amount=len(refused) - self._refusals_counted)
            self._refusals_counted = len(refused)
        return "; ".join(f"{msg.topic()}: {err.str()}" for err, msg in refused[:3])

    def refused_error(self, what: str) -> FatalError:
        """The error for failed delivery reports: FencedError when they say this instance was fenced."""
        detail = self.refusals()
        for err, _ in self.failures:
            if err.code() in FENCED_CODES:
                return self.meaning(err, "delivering")
        return DeliveryError(f"{what}: {detail}")

    # ------------------------------------------------------------------ producing

    def produce(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Produce one message (held while :meth:`hold` says a checkpoint commits).

        Raises:
            DeliveryError, CommitError, FencedError: the producer refused it (see :meth:`meaning`).
        """
        held = self._held
        if held is not None:
            # A checkpoint is committing: this message belongs to the next transaction.
            held.append((topic, key, value))
            if len(held) >= MAX_PENDING and self._on_full is not None:
                self._on_full()
            return
        self._send(topic, key, value)

    def hold(self, on_full: Callable[[], None]) -> None:
        """Hold what :meth:`produce` gets from now on (a checkpoint commits on another thread);
        ``on_full`` is called once :data:`MAX_PENDING` messages are held."""
        self._held = []
        self._on_full = on_full

    def release(self) -> list[Msg]:
        """Stop holding; return the messages held (for :meth:`send_all`, once the commit is done)."""
        held, self._held = self._held or [], None
        self._on_full = None
        return held

    def send_all(self, messages: Iterable[Msg]) -> None:
        """Send ``messages`` now (into the open transaction, begun by the first)."""
        send = self._send
        for topic, key, value in messages:
            send(topic, key, value)

    def _send(self, topic: str, key: bytes | None, value: bytes) -> None:
        producer = self.producer
        assert producer is not None
        if self.transactional and not self.in_txn:
            self.begin()
        if topic not in self._known_topics:
            self.ensure([topic])
        try:
            try:
                producer.produce(topic, value, key)  # produce_retrying's first try, inline
            except BufferError:
                produce_retrying(producer, topic, key, value, self.poll)
        except KafkaException as e:  # not kafka_call: this is the hot path
            err = kafka_error_of(e) or KafkaError(KafkaError._FAIL)
            txn_log = self._txn_log
            if not (err.code() == KafkaError._STATE and self.transactional and txn_log is not None
                    and self.fatal is None):
                raise self.meaning(err, "producing", DeliveryError) from e
            # The open transaction failed meanwhile (a message of it undelivered while the brokers
            # were away), and librdkafka takes nothing more into it until it is aborted. The message
            # stays with the transaction's others: the next commit aborts it and sends them all again.
            txn_log.append((topic, key, value))
            self._txn_bytes += len(value)
            if len(txn_log) > REDO_MAX_MESSAGES or self._txn_bytes > REDO_MAX_BYTES:
                raise self.meaning(err, "producing", DeliveryError) from e
            return
        txn_log = self._txn_log
        if txn_log is not None:
            txn_log.append((topic, key, value))
            self._txn_bytes += len(value)
            if len(txn_log) > REDO_MAX_MESSAGES or self._txn_bytes > REDO_MAX_BYTES:
                self._txn_log = None  # too large to keep: an abort of it stops the job

    # ------------------------------------------------------------------ transactions

    def begin(self) -> None:
        """Begin a transaction unless one is open (or the producer is not transactional)."""
        if self.transactional and not self.in_txn:
            assert self.producer is not None
            with self.kafka_call("beginning a transaction"):
                self.producer.begin_transaction()
            self.in_txn = True
            self._txn_started = self.clock()

    def commit_now(self, timeout: float, offsets: list[TopicPartition] | None = None, group: Any = None) -> None:
        """Commit the open transaction, with a consumer group's ``offsets`` (``group``: its metadata).

        No retry and no redo: a failure raises the Kafka exception as it is, for the caller to judge
        (with :meth:`resolve`, :meth:`fenced`, :meth:`abort_now`).
        """
        producer = self.producer
        assert producer is not None
        if offsets is not None:
            producer.send_offsets_to_transaction(offsets, group, 60)
        producer.commit_transaction(timeout)
        self.in_txn = False
        self._txn_started = None

    def abort_now(self, timeout: float = 30.0) -> None:
        """Abort the open transaction (best effort) and forget the reports of the messages it purged."""
        producer = self.producer
        assert producer is not None
        with contextlib.suppress(KafkaException):
            producer.abort_transaction(timeout)
        with contextlib.suppress(KafkaException):
            producer.poll(0)  # serve the aborted messages' delivery reports
        # librdkafka reports each message an abort purged (queued or in flight) with _PURGE_QUEUE or
        # _PURGE_INFLIGHT: the caller redoes that transaction, so these are not refusals.
        self.failures[:] = [(err, msg) for err, msg in self.failures if err.code() not in _PURGED]
        self._refusals_counted = min(self._refusals_counted, len(self.failures))
        self.in_txn = False
        self._txn_started = None

    def commit(self, last: Callable[[], Msg], superseded: Callable[[], str | None]) -> None:
        """Flush, then produce ``last()`` (a checkpoint made once every delivery is confirmed) and
        commit it with the data it covers.

        While the brokers are away (one restarting) it keeps flushing and committing, for up to
        :data:`COMMIT_PATIENCE` seconds. A transaction that failed meanwhile (a message of it not
        delivered within the transaction timeout) is aborted and redone: its messages are sent again
        in a new transaction, which this commit then commits. When Kafka itself aborted it (open past
        ``transaction.timeout.ms``), this producer is fenced or fails fatally on it: a new one takes
        over, once ``superseded()`` (None, or what says that another instance took over) shows that
        no other instance committed meanwhile.

        Raises:
            DeliveryError: Kafka refused some produced data.
            CommitError: the transaction could not commit; FencedError: another instance took over.
        """
        deadline = self.clock() + COMMIT_PATIENCE
        while True:
            try:
                if self._commit_once(last, deadline):
                    return
            except CommitError as e:
                # Fenced, or another fatal error (INVALID_TXN_STATE when the abort came after Kafka's)
                unusable = isinstance(e, FencedError) or self.fatal is not None
                if not (unusable and self._timed_out_by_kafka(deadline)):
                    raise
                self._reincarnate(deadline, superseded)
                self._resend()

    def _commit_once(self, last: Callable[[], Msg], deadline: float) -> bool:
        """One try of :meth:`commit`: True once committed, False after a redone transaction."""
        producer = self.producer
        assert producer is not None
        with self.kafka_call("flushing", DeliveryError):
            remaining = producer.flush(60)
        if self.failures:
            if not self._redoable(deadline):
                raise self.refused_error("Kafka refused data")
            self._redo(f"{len(self.failures)} messages not delivered: {self.refusals()}", deadline)
            return False
        if remaining:
            if self.transactional and self.clock() < deadline:
                log.warning("%s: %d messages still undelivered after 60 s; waiting for the brokers",
                            self.owner, remaining)
                return False
            raise DeliveryError(f"{remaining} messages still undelivered after 60 s")
        self._send(*last())
        if not self.transactional:
            with self.kafka_call("flushing the checkpoint", DeliveryError):
                remaining = producer.flush(60)
            if remaining or self.failures:
                raise self.refused_error(f"checkpoint of {self.owner} not delivered")
            return True
        err = self._commit_transaction(deadline)
        if err is None:
            self.in_txn = False
            self._txn_started = None
            self._txn_log = [] if self._keep_txn else None
            self._txn_bytes = 0
            return True
        if err.txn_requires_abort() and self._redoable(deadline):
            self._redo(err.str(), deadline)
            return False
        raise self.meaning(err, "committing the transaction")

    def _commit_transaction(self, deadline: float) -> KafkaError | None:
        """Commit the open transaction, again while the error says to retry (until ``deadline``);
        None when committed, else the error that stopped it."""
        producer = self.producer
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
            log.warning("%s: committing the transaction: %s; trying again", self.owner, err.str())

    def _redoable(self, deadline: float) -> bool:
        """True when the open transaction failed for a passing reason and can be redone: every
        message of it kept, every failed delivery a timeout or another transient error, time left."""
        if not self.transactional or self._txn_log is None or self.clock() >= deadline:
            return False
        return all(_transient_failure(err) for err, _ in self.failures)

    def _timed_out_by_kafka(self, deadline: float) -> bool:
        """True when a fence may be Kafka's own abort of the open transaction (open longer than
        ``transaction.timeout.ms``, the brokers away meanwhile) and it can be redone."""
        started = self._txn_started
        return (self.transactional and self._txn_log is not None and started is not None
                and self.clock() - started >= self.kafka.transaction_timeout() and self.clock() < deadline)

    def _redo(self, why: str, deadline: float) -> None:
        """Abort the open transaction and send its messages again in a new one.

        Raises:
            FencedError: the producer was fenced (by a newer instance, or by Kafka's own abort of a
                transaction open too long).
            CommitError: the abort failed.
        """
        producer = self.producer
        assert producer is not None
        assert self._txn_log is not None
        log.warning("%s: the transaction failed (%s); aborting it and sending its %d messages again",
                    self.owner, why, len(self._txn_log))
        while True:
            try:
                producer.abort_transaction(60)
                break
            except Exception as e:
                err = kafka_error_of(e)
                if err is None:
                    raise
            if not (err.retriable() and not err.fatal() and self.clock() < deadline):
                raise self.meaning(err, "aborting a failed transaction")
            log.warning("%s: aborting the transaction: %s; trying again", self.owner, err.str())
        self.in_txn = False
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
        self.refusals()  # counted in the delivery-errors metric
        self.failures.clear()
        self._refusals_counted = 0

    def _resend(self) -> None:
        """Send the aborted transaction's messages again (in a new transaction, begun by the first);
        the checkpoint's own message is not among them: the commit sends it again."""
        messages = self._txn_log
        assert messages is not None
        self.metrics.transactions_redone.inc(self.source)
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

    def _reincarnate(self, deadline: float, superseded: Callable[[], str | None]) -> None:
        """Replace the producer Kafka fenced when it aborted the open transaction by its timeout.

        When ``superseded()`` says another instance took over (its checkpoint is the last), this one
        stops as fenced, and starts no producer (which would fence the newer one). Else the new
        producer's ``init_transactions`` fences every other producer of the transactional id, after
        which ``superseded()`` is asked once more: what it reads is then final.

        Raises:
            FencedError: another instance took over.
            CommitError: the new producer could not start its transactions.
        """
        old = self.producer
        age = self.clock() - (self._txn_started or self.clock())
        log.warning("%s: Kafka aborted the transaction open for %.0f s (past transaction.timeout.ms, the brokers "
                    "away) and fenced this producer; a new one takes over and redoes it", self.owner, age)
        self._check(superseded)
        self.producer = None
        if old is not None:
            with contextlib.suppress(Exception):
                old.purge()
            self._forget_failures(old)
        self.fatal = None
        self.in_txn = False
        self._txn_started = None
        producer = Producer(self.kafka.producer_config(transactional_id=self.transactional_id,
                                                       on_delivery=self.on_delivery))
        while True:
            try:
                producer.init_transactions(30)
                break
            except KafkaException as e:
                err = kafka_error_of(e)
                if err is None or err.fatal() or not err.retriable() or self.clock() >= deadline:
                    raise CommitError(f"{self.owner}: a new producer could not start its transactions: "
                                      f"{e}") from e
        self.producer = producer
        self._check(superseded)

    def _check(self, superseded: Callable[[], str | None]) -> None:
        """Raise FencedError when ``superseded()`` says another instance took over."""
        detail = superseded()
        if detail is not None:
            self.fatal = KafkaError(KafkaError._FENCED)  # nothing more is written (close() aborts nothing)
            raise self.fenced_error(detail)

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        """Abort any open transaction and release the producer (never raises)."""
        self.release()
        producer = self.producer
        if producer is None:
            return
        if self.fatal is not None:
            # Fenced, or otherwise unusable: it can neither abort nor deliver anything (a newer
            # instance aborted its open transaction when it fenced it; Kafka aborts it otherwise
            # after transaction.timeout.ms).
            log.debug("%s: producer closed after its fatal error %s", self.owner, self.fatal)
            self.in_txn = False
            return
        if self.in_txn:
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(10)
            self.in_txn = False
        # close() runs in finally blocks: it never masks the error that is propagating
        with contextlib.suppress(Exception), self.kafka_call("closing", DeliveryError):
            producer.flush(10)

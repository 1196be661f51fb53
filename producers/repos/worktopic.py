"""The DID work topic ``<prefix>.backfill.dids``: enqueue DIDs, and backfill them as a consumer group.

``backfill repos --from-topic`` replicas join one consumer group, so N replicas on N machines
share the partitions of the work topic. Per partition, DIDs are fetched concurrently (a bounded
prefetch window, CARs on disk) but *produced in offset order*: a transaction holds the records and
repo_status of the ready DIDs at the head of their partitions, plus (``send_offsets_to_transaction``)
the work-topic offsets just past them, and commits them atomically. So:

* kill -9 of a replica loses nothing and duplicates nothing: its open transaction never commits
  (Kafka aborts it on the transaction timeout, or when the replica restarts with the same
  ``--replica-id`` and fences it), and the partition resumes from the last committed offset;
* a restart, or a DID enqueued twice, skips DIDs already done: at start (and on every new
  partition assignment) the replica reads the repo_status topic (read_committed: statuses of
  aborted transactions are never seen) into a done-set, and a DID whose latest status is terminal
  (``ok``, ``not_found``) is skipped (``--redo`` backfills it again). ``deactivated`` and
  ``takendown`` are reversible (an account can be reactivated, a takedown reversed): such a DID,
  enqueued again, is fetched again;
* a DID that keeps failing is retried with backoff, then dead-lettered with its reason and its
  offset committed (status ``failed``; enqueue it again to retry).

A slow DID holds back only the commits of its own partition (the prefetch window bounds how far
the others of that partition run ahead). Events carry ``cursor`` = the DID's work-item offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from producers.publish import Publisher, deliver, kafka_error_of
from producers.repos.decode import record_type
from producers.repos.source import Fetched, RepoFetcher, RepoProcessor, RepoResult, count_outcome
from producers.source import Drop, Skip
from runtime.contract.codec import AvroCodec
from runtime.contract.records import RecordEvent
from runtime.contract.topics import CONTROL_TOPIC_CONFIG, TopicMap
from runtime.errors import CommitError, DeliveryError, DropError, FencedError, SourceError
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import FINISHED, RUNNING, STOPPED, JobState
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Health, Metrics

log = logging.getLogger(__name__)

#: Outcomes after which a DID needs no more work.
TERMINAL: Final = frozenset({"ok", "not_found"})
#: Outcomes an account can come back from (reactivation, a reversed takedown): not done.
REVERSIBLE: Final = frozenset({"deactivated", "takendown"})
#: Aborted transactions in a row (each redone) before the replica gives up loudly.
MAX_ABORTS_IN_A_ROW: Final = 5
#: How long close() serves the revocation of this replica's partitions before closing anyway.
CLOSE_DRAIN_SECONDS: Final = 10.0


class _TransactionAbortedError(Exception):
    """A transaction failed with an abortable error (a rebalance moved the group on); redo its items.

    ``redo``: the items the transaction took (fetched again); ``kept``: the items after them that it
    left for the next transaction (their downloads untouched).
    """

    def __init__(self, batch: int, redo: list[_Item], kept: list[_Item], reason: str) -> None:
        super().__init__(f"transaction {batch} aborted: {reason}")
        self.batch = batch
        self.redo = redo
        self.kept = kept
        self.dids = [i.did for i in redo if i.did]
        self.reason = reason


def _did_hash(did: str) -> int:
    return int.from_bytes(hashlib.blake2b(did.encode(), digest_size=8).digest(), "big")


def work_value(did: str, origin: str, now_us: int) -> bytes:
    """The value of a work item (JSON; the key is the DID, so one DID always maps to one partition)."""
    return orjson.dumps({"did": did, "origin": origin, "enqueued_us": now_us})


def parse_work_value(key: bytes | None, value: bytes | None) -> str:
    """The DID of a work item.

    Raises:
        DropError: reason ``malformed_json`` (not a work item) or ``invalid_record`` (no DID).
    """
    did: Any = None
    if value:
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError as e:
            raise DropError("malformed_json", f"work item is not JSON: {e}") from e
        did = obj.get("did") if isinstance(obj, dict) else None
    if did is None and key:
        did = key.decode(errors="replace")
    if not isinstance(did, str) or not did.startswith("did:") or len(did) > 2048:
        raise DropError("invalid_record", f"work item has no valid DID: {str(did)[:100]!r}")
    return did


def enqueue_dids(kafka: KafkaSettings, dids: Iterable[str], *, origin: str,
                 wall: Callable[[], float] = time.time) -> int:
    """Append DIDs to the work topic (created if missing); return how many were written.

    Raises:
        DeliveryError: Kafka refused some of them.
    """
    topics = TopicMap(kafka.topic_prefix)
    kafka_util.ensure_topics(kafka_util.admin(kafka.client_config()), [topics.dids],
                             partitions=kafka.topic_partitions, replication=kafka.topic_replication)
    now_us = int(wall() * 1e6)
    n, errors = deliver(kafka, ((topics.dids, did.encode(), work_value(did, origin, now_us)) for did in dids))
    if errors:
        raise DeliveryError(f"could not enqueue every DID: {errors[:3]}")
    log.info("enqueued %d DIDs into %s (origin %s)", n, topics.dids, origin)
    return n


class DoneSet:
    """DIDs whose backfill finished: their latest committed repo_status is terminal.

    Memory: about 60 bytes per DID (a 64-bit hash in a set).
    """

    def __init__(self, job: str, codec: AvroCodec) -> None:
        self.job = job
        self._codec = codec
        self._done: set[int] = set()
        self._offsets: dict[int, int] = {}
        self.read = 0

    def __len__(self) -> int:
        return len(self._done)

    def add(self, did: str) -> None:
        """Record ``did`` as done."""
        self._done.add(_did_hash(did))

    def discard(self, did: str) -> None:
        """Forget ``did`` (its latest status is a failure, or a state it can come back from)."""
        self._done.discard(_did_hash(did))

    def is_done(self, did: str) -> bool:
        """True when ``did`` has a terminal status."""
        return _did_hash(did) in self._done

    def apply(self, datum: dict[str, Any]) -> None:
        """Fold one repo_status datum in (records of other jobs are ignored)."""
        if datum.get("job") != self.job:
            return
        outcome = datum.get("outcome")
        if outcome in TERMINAL:
            self.add(datum["did"])
        elif outcome == "failed" or outcome in REVERSIBLE:
            self.discard(datum["did"])

    def catch_up(self, conf: dict[str, Any], topic: str, *, max_wait: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> int:
        """Read the status topic (read_committed) from where the last call stopped to its current end.

        A fresh consumer reports end-of-partition only after a fetch, so everything committed
        before this call is read. Returns the number of records read.

        Raises:
            SourceError: the topic cannot be read.
        """
        conf = {**conf, "enable.auto.commit": False, "isolation.level": "read_committed",
                "enable.partition.eof": True, "group.id": f"atproto-backfill-done-{self.job}"}
        consumer = Consumer(conf)
        n = 0
        try:
            md = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if md is None or md.error is not None or not md.partitions:
                return 0
            parts = [TopicPartition(topic, p, self._offsets.get(p, OFFSET_BEGINNING)) for p in sorted(md.partitions)]
            consumer.assign(parts)
            pending = {p.partition for p in parts}
            deadline = clock() + max_wait
            while pending and clock() < deadline:
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(msg.partition())
                        continue
                    raise SourceError(f"reading {topic}: {err}")
                self._offsets[msg.partition() or 0] = (msg.offset() or 0) + 1
                value = msg.value()
                if value is None:
                    continue
                try:
                    name, datum = self._codec.decode(value)
                except DropError as e:
                    log.warning("unreadable repo_status at %s/%d/%d: %s", topic, msg.partition(), msg.offset(), e)
                    continue
                if name == "repo_status":
                    self.apply(datum)
                    n += 1
            if pending:
                raise SourceError(f"{topic}: partitions {sorted(pending)} not read to their end in {max_wait} s")
        finally:
            consumer.close()
        self.read += n
        return n


@dataclass
class WorkOptions:
    """How a work-topic replica runs.

    Args:
        job: the job name (consumer group ``atproto-backfill-repos-<job>``).
        replica: this replica's stable id (transactional id ``atproto-backfill-repos-<job>-<replica>``);
            restart a killed replica with the same id so it fences its open transaction.
        concurrency: DIDs fetched at once.
        prefetch: work items held per partition before the partition is paused.
        txn_max_dids: DIDs per transaction at most.
        txn_max_records: records per transaction at most. A repository counts with the entries of its
            tree (an upper bound of its records, known before any is produced) and joins an open
            transaction only if it fits; a repository larger than the bound commits alone.
        txn_max_seconds: a transaction takes no further DID once it has been open this long. Each
            repository commits whole, so one that takes longer keeps its transaction open longer:
            the transaction timeout (``transaction.timeout.ms``) must cover the largest repository.
        idle_exit: exit once the whole work topic is drained (every partition's committed offset at
            its end) and this replica had no work for this many seconds (0 = run forever).
        max_time: stop after this many seconds (0 = no limit).
        skip_done: skip DIDs with a terminal status from another work item.
        stuck_check: without ``idle_exit``, how often an idle replica checks for partitions of its
            own that have work but deliver none (and restarts their fetch).
        stuck_after: a partition is restarted only after it delivered nothing for this long (since
            it was assigned or since its last work item).
    """

    job: str
    replica: str
    concurrency: int = 32
    prefetch: int = 64
    txn_max_dids: int = 200
    txn_max_records: int = 200_000
    txn_max_seconds: float = 20.0
    idle_exit: float = 0.0
    max_time: float = 0.0
    skip_done: bool = True
    stuck_check: float = 30.0
    stuck_after: float = 10.0


@dataclass
class _Item:
    partition: int
    offset: int
    did: str
    task: asyncio.Task[Fetched] | None = None
    skip: str | None = None  # "done" (done-set) or a drop reason (malformed work item)
    detail: str = ""
    raw: bytes = b""


@dataclass
class WorkStats:
    """Counters of one replica run."""

    items: int = 0
    dids_done: int = 0
    skipped: int = 0
    records: int = 0
    transactions: int = 0
    aborted: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    stop_reason: str = ""
    #: Committed transactions that left ready DIDs for the next one, by the bound that ended them
    #: (``records``, ``seconds``).
    cut: dict[str, int] = field(default_factory=dict)
    #: The most records one committed transaction carried, and the longest one was open (seconds).
    txn_records_max: int = 0
    txn_seconds_max: float = 0.0


class WorkTopicRunner:
    """One replica of ``backfill repos --from-topic``.

    Args:
        kafka: Kafka settings (resolved bootstrap servers).
        opts: the replica's options.
        fetcher, processor: the per-DID work (see :mod:`producers.repos.source`).
        metrics, codec, health: as elsewhere.
        clock: monotonic seconds; wall: unix seconds.
        on_result: called with every DID result after its transaction committed.
    """

    def __init__(self, kafka: KafkaSettings, opts: WorkOptions, fetcher: RepoFetcher, processor: RepoProcessor,
                 metrics: Metrics, codec: AvroCodec, *, health: Health | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 on_result: Callable[[RepoResult], None] | None = None) -> None:
        self.kafka = kafka
        self.opts = opts
        self.fetcher = fetcher
        self.processor = processor
        self.metrics = metrics
        self.codec = codec
        self.health = health or Health()
        self.clock = clock
        self.wall = wall
        self.on_result = on_result
        #: Routes, produces and commits the replica's records, statuses and dead letters.
        self.publisher = Publisher(kafka, codec, metrics, source="repo", owner=f"replica {opts.replica}",
                                   id_kind="replica id",
                                   transactional_id=f"atproto-backfill-repos-{opts.job}-{opts.replica}",
                                   clock=clock, wall=wall)
        self.topics = self.publisher.topics
        self.group = f"atproto-backfill-repos-{opts.job}"
        self.stats = WorkStats()
        self.done = DoneSet(opts.job, codec)
        self._parts: dict[int, deque[_Item]] = {}
        self._paused: set[int] = set()
        self._quiet_since: dict[int, float] = {}  # per partition: assignment or last delivery
        self._need_catch_up = True
        self._consumer: Consumer | None = None
        self._stop: str | None = None
        self._batch = 0
        self._aborts_in_a_row = 0
        self._work_offsets: dict[int, int] = {}
        self._started_us = int(wall() * 1e6)
        self._txn_records = 0  # records (and dead-lettered record entries) in the open transaction
        #: Seconds after which the broker aborts an open transaction of this replica.
        self._txn_timeout = kafka.transaction_timeout()

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        """Create the topics, fence an earlier instance of this replica, join the group.

        Raises:
            CommitError: transactions are unavailable (this mode needs them).
        """
        publisher = self.publisher
        publisher.ensure([self.topics.dids, self.topics.dead_letters])
        publisher.ensure([self.topics.repo_status], config={"cleanup.policy": "compact"})
        # The transactional id fences an earlier instance with this replica id and aborts its open
        # transaction.
        publisher.start("on", timeout=60, required="the work-topic mode needs Kafka transactions")
        consumer = Consumer(self.kafka.consumer_config(self.group, **{"auto.offset.reset": "earliest"}))
        consumer.subscribe([self.topics.dids], on_assign=self._on_assign, on_revoke=self._on_revoke,
                           on_lost=self._on_lost)
        self._consumer = consumer
        log.info("replica %s joined group %s on %s (transactional id %s)", self.opts.replica, self.group,
                 self.topics.dids, publisher.transactional_id)

    # ------------------------------------------------------------------ rebalance

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        now = self.clock()
        for p in partitions:
            self._parts.setdefault(p.partition, deque())
            self._quiet_since[p.partition] = now
        self._need_catch_up = True
        consumer.incremental_assign(partitions)
        self.health.set_ready(True)
        log.info("replica %s assigned partitions %s", self.opts.replica, sorted(p.partition for p in partitions))

    def _drop_partitions(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        paused = [p for p in partitions if p.partition in self._paused]
        if paused:
            # librdkafka keeps a partition's pause across its revocation: were it assigned to this
            # replica again, it would stay paused for good while this replica, holding none of its
            # items, would never resume it. So a partition leaves resumed.
            consumer.resume([TopicPartition(p.topic, p.partition) for p in paused])
        for p in partitions:
            items = self._parts.pop(p.partition, deque())
            self._paused.discard(p.partition)
            self._quiet_since.pop(p.partition, None)
            for item in items:
                _close_item(item)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # No transaction is open here (every cycle commits before the consumer is polled again):
        # items not yet produced are simply left to the partition's next owner.
        self._drop_partitions(consumer, partitions)
        consumer.incremental_unassign(partitions)
        log.info("replica %s revoked partitions %s", self.opts.replica, sorted(p.partition for p in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The group moved on without this member (session expired): another member owns them now.
        self._drop_partitions(consumer, partitions)
        consumer.incremental_unassign(partitions)
        log.warning("replica %s lost partitions %s (its session with the group expired)", self.opts.replica,
                    sorted(p.partition for p in partitions))

    # ------------------------------------------------------------------ producing

    def _process(self, item: _Item) -> RepoResult | None:
        """Produce one work item's records and status into the open transaction."""
        if item.skip == "done":
            self.stats.skipped += 1
            self.metrics.repos_done.inc("skipped")
            return None
        if item.skip is not None:
            origin = f"{self.topics.dids}/{item.partition}/{item.offset}"
            self.publisher.dead_letter(Drop(item.skip, item.detail, item.raw, origin, cursor=item.offset))
            return None
        assert item.task is not None
        fetched = item.task.result()
        result = RepoResult(did=item.did, cursor=item.offset, outcome="failed")
        refused: list[tuple[str, str]] = []
        publisher = self.publisher
        try:
            for it in self.processor.items(fetched, result):
                if isinstance(it, RecordEvent):
                    self._txn_records += 1
                    try:
                        publisher.publish(it)
                    except DropError as e:
                        publisher.dead_letter(Drop(e.reason, e.detail, orjson.dumps(it.record), f"repo:{it.uri}",
                                                   did=it.did, cursor=it.cursor))
                        refused.append((record_type(it.collection, it.record), e.reason))
                elif isinstance(it, Drop):
                    publisher.dead_letter(it)
                elif isinstance(it, Skip):
                    self.metrics.events_skipped.inc("repo", it.reason, amount=it.count)
        finally:
            fetched.close()
            publisher.flush_counts()
        for kind, reason in refused:
            result.not_produced(kind, reason)
        datum = result.status_datum(self.opts.job, int(self.wall() * 1e6), replica=self.opts.replica,
                                    work_partition=item.partition, work_offset=item.offset, batch=self._batch)
        self.publisher.produce(self.topics.repo_status, item.did.encode(),
                               self.codec.encode("repo_status", self.topics.repo_status, datum))
        return result

    def _records_bound(self, item: _Item) -> int:
        """At most how many records ``item`` produces (0 for an item that is skipped or dead-lettered)."""
        if item.skip is not None or item.task is None:
            return 0
        return self.processor.records_bound(item.task.result())

    def _cut(self, item: _Item, records: int, began: float) -> str | None:
        """Why the open transaction takes no further item (``item`` is the next), or None."""
        if self.clock() - began >= self.opts.txn_max_seconds:
            return "seconds"
        if records + self._records_bound(item) > self.opts.txn_max_records:
            return "records"
        return None

    def _cycle(self, batch: list[_Item]) -> tuple[list[tuple[_Item, RepoResult | None]], list[_Item]]:
        """One transaction: the records and statuses of the batch's first items, and the offsets past them.

        The transaction takes the batch's items in order while its bounds allow (the first always:
        a repository's records, status and work offset commit together, whatever its size). Returns
        the results, and the items left for the next transaction (their downloads untouched).
        """
        publisher = self.publisher
        consumer = self._consumer
        assert consumer is not None
        self._batch += 1
        out: list[tuple[_Item, RepoResult | None]] = []
        offsets: dict[int, int] = {}
        kept: list[_Item] = []
        cut: str | None = None
        self._txn_records = 0
        began = self.clock()
        try:
            publisher.begin()
            try:
                for n, item in enumerate(batch):
                    if out and (cut := self._cut(item, self._txn_records, began)) is not None:
                        kept = batch[n:]
                        break
                    if not out and (bound := self._records_bound(item)) > self.opts.txn_max_records:
                        log.info("replica %s: repository %s has up to %d records, over --txn-max-records %d: "
                                 "it commits alone in transaction %d", self.opts.replica, item.did, bound,
                                 self.opts.txn_max_records, self._batch)
                    out.append((item, self._process(item)))
                    offsets[item.partition] = item.offset + 1
            except BaseException:
                # Dying with the transaction open (it is aborted by the next instance of this replica):
                # release the downloads this batch still holds.
                for item in batch[len(out):]:
                    _close_item(item)
                raise
            # Every transaction also carries this replica's progress record (control topic, compacted),
            # which ``backfill status`` shows.
            self._produce_progress(out, offsets, RUNNING)
            publisher.commit_now(120, [TopicPartition(self.topics.dids, p, o) for p, o in sorted(offsets.items())],
                                 consumer.consumer_group_metadata())
        except Exception as e:
            err = kafka_error_of(e)
            if err is None:
                raise
            raise self._failed(err, batch[:len(batch) - len(kept)], kept, self.clock() - began) from e
        if publisher.failures:
            raise DeliveryError(f"Kafka refused data: {publisher.refusals()}")
        st = self.stats
        if cut is not None:
            st.cut[cut] = st.cut.get(cut, 0) + 1
        st.txn_records_max = max(st.txn_records_max, self._txn_records)
        open_for = self.clock() - began
        st.txn_seconds_max = max(st.txn_seconds_max, open_for)
        if open_for > self._txn_timeout / 2:
            log.warning("replica %s: transaction %d was open %.1f s (%d DIDs, %d records), more than half the "
                        "transaction timeout (%.0f s, transaction.timeout.ms)", self.opts.replica, self._batch,
                        open_for, len(out), self._txn_records, self._txn_timeout)
        return out, kept

    def _failed(self, err: KafkaError, batch: list[_Item], kept: list[_Item] | None = None,
                open_for: float = 0.0) -> Exception:
        """What a Kafka error of transaction ``self._batch`` means: redo it (a rebalance aborted it),
        or stop (fenced by a newer instance of this replica id, or another failure).

        ``batch``: the items the transaction took; ``kept``: those it left for the next one;
        ``open_for``: seconds the transaction was open.
        """
        publisher = self.publisher
        err = publisher.resolve(err)
        if publisher.fatal is None:
            publisher.abort_now(30)
            if err.txn_requires_abort() or err.retriable():
                # A rebalance moved the group's generation on (a replica joined or left) while this
                # transaction was open: nothing of it counts; its work items are done again.
                return _TransactionAbortedError(self._batch, batch, kept or [], err.str() + self._overtime(open_for))
        if publisher.fenced(err) and not self._overtime(open_for):
            return publisher.fenced_error(err.str())
        return CommitError(f"replica {self.opts.replica}: transaction {self._batch} failed: {err.str()}"
                           f"{self._overtime(open_for)}")

    def _overtime(self, open_for: float) -> str:
        """What to say of a failed transaction that was open past the transaction timeout ('' if it was not)."""
        if open_for < self._txn_timeout:
            return ""
        return (f" (it was open {open_for:.0f} s, past the transaction timeout of {self._txn_timeout:.0f} s, "
                f"after which the broker aborts it; a repository that alone takes longer needs a longer one: "
                f"--kafka-config transaction.timeout.ms=..., at most the broker's transaction.max.timeout.ms)")

    def _final_progress(self) -> None:
        """Record the replica's end in the control topic (best effort: losing it loses no data)."""
        publisher = self.publisher
        if publisher.producer is None:
            return
        try:
            publisher.begin()
            self._produce_progress([], {}, FINISHED if self._stop == "idle" else STOPPED)
            publisher.commit_now(30)
        except Exception as e:
            err = kafka_error_of(e)
            if err is None:
                raise
            failure = self._failed(err, [])
            if isinstance(failure, FencedError):
                raise failure from e  # another instance of this replica id runs: say so, loudly
            log.warning("replica %s: could not record its end in the control topic: %s", self.opts.replica,
                        err.str())

    def _produce_progress(self, out: list[tuple[_Item, RepoResult | None]], offsets: dict[int, int],
                          status: str) -> None:
        now_us = int(self.wall() * 1e6)
        self._work_offsets.update(offsets)
        done = self.stats.dids_done + sum(1 for _, r in out if r is not None)
        records = self.stats.records + sum(r.records for _, r in out if r is not None)
        skipped = self.stats.skipped + sum(1 for i, r in out if r is None and i.skip == "done")
        state = JobState(
            job=f"{self.opts.job}@{self.opts.replica}", source="repo", status=status,
            filters={"mode": "work-topic", "group": self.group, "topic": self.topics.dids},
            position={"work_offsets": {str(p): o for p, o in sorted(self._work_offsets.items())}},
            cursor=done, counts={"dids": done, "records": records, "skipped_done": skipped,
                                 "transactions": self._batch},
            started_at_us=self._started_us, updated_at_us=now_us,
            finished_at_us=now_us if status != RUNNING else None,
            stop_reason=self._stop if status != RUNNING else None,
            # Increasing across restarts of the replica (the reader keeps the highest).
            checkpoint=now_us)
        self.publisher.ensure([self.topics.control], partitions=1, config=CONTROL_TOPIC_CONFIG)
        self.publisher.produce(self.topics.control, state.job.encode(), state.to_bytes())

    # ------------------------------------------------------------------ the loop

    def _poll(self) -> int:
        consumer = self._consumer
        assert consumer is not None
        msgs = consumer.consume(num_messages=500, timeout=0)
        now = self.clock()
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise CommitError(f"fatal consumer error: {err}")
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("work topic consumer: %s", err)
                continue
            partition, offset = msg.partition() or 0, msg.offset() or 0
            part = self._parts.get(partition)
            if part is None:
                continue  # revoked meanwhile
            try:
                did = parse_work_value(msg.key(), msg.value())
                item = _Item(partition, offset, did)
            except DropError as e:
                item = _Item(partition, offset, "", skip=e.reason, detail=e.detail, raw=msg.value() or b"")
            part.append(item)
            self._quiet_since[partition] = now
            self.stats.items += 1
        self._pause_full()
        return len(msgs)

    def _pause_full(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        for p, items in self._parts.items():
            if p not in self._paused and len(items) >= self.opts.prefetch:
                consumer.pause([TopicPartition(self.topics.dids, p)])
                self._paused.add(p)
            elif p in self._paused and len(items) < self.opts.prefetch // 2:
                consumer.resume([TopicPartition(self.topics.dids, p)])
                self._paused.discard(p)

    def _start_fetches(self) -> None:
        running = sum(1 for items in self._parts.values() for i in items if i.task is not None and not i.task.done())
        free = self.opts.concurrency - running
        if free <= 0:
            return
        # Earliest unstarted item of each partition in turn, so every partition makes progress.
        cursors = {p: iter(items) for p, items in self._parts.items()}
        while free > 0 and cursors:
            for p in list(cursors):
                item = next((i for i in cursors[p] if i.task is None and i.skip is None), None)
                if item is None:
                    del cursors[p]
                    continue
                if self.opts.skip_done and self.done.is_done(item.did):
                    item.skip = "done"
                    continue
                item.task = asyncio.ensure_future(self.fetcher.fetch(item.did, item.offset))
                free -= 1
                if free <= 0:
                    break

    def _ready(self) -> list[_Item]:
        batch: list[_Item] = []
        in_batch: set[str] = set()
        for items in self._parts.values():
            while items and len(batch) < self.opts.txn_max_dids:
                head = items[0]
                if head.skip is None and (head.task is None or not head.task.done()):
                    break
                if head.skip is None and head.did in in_batch:
                    break  # enqueued twice: decide after this transaction committed the first one
                if head.skip is None and self.opts.skip_done and self.done.is_done(head.did):
                    # Done by an earlier item of this partition (committed meanwhile): drop the fetch.
                    head.skip = "done"
                    if head.task is not None:
                        head.task.add_done_callback(_close_result)
                batch.append(items.popleft())
                in_batch.add(head.did)
        return batch

    def _owed(self, max_wait: float = 15.0) -> dict[int, int] | None:
        """Partitions of the work topic with work past the group's committed offset, and that offset.

        Empty: the whole topic is drained (whoever owns its partitions). None: not every partition
        answered within ``max_wait``. A separate consumer outside the group is assigned at the
        committed offsets: a partition is drained when it reports its end (fetch-derived) before
        delivering any message.
        """
        consumer = self._consumer
        assert consumer is not None
        topic = self.topics.dids
        try:
            md = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if md is None or not md.partitions:
                return {}
            committed = consumer.committed([TopicPartition(topic, p) for p in sorted(md.partitions)], timeout=10)
        except KafkaException as e:
            err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
            if err is not None and err.fatal():
                raise
            # A coordinator moving or busy (a timeout): not known now, asked again at the next idle check.
            log.info("replica %s: the group's committed offsets are not readable now (%s); checking again later",
                     self.opts.replica, e)
            return None
        starts = {tp.partition: tp.offset if tp.offset >= 0 else OFFSET_BEGINNING for tp in committed}
        peek = Consumer({**self.kafka.consumer_config(f"{self.group}-drain-check"), "enable.partition.eof": True,
                         "fetch.wait.max.ms": 50})
        owed: dict[int, int] = {}
        try:
            peek.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
            pending = set(starts)
            deadline = self.clock() + max_wait
            while pending and self.clock() < deadline:
                msg = peek.poll(0.2)
                if msg is None:
                    continue
                p = msg.partition() or 0
                if p not in pending:
                    continue
                err = msg.error()
                if err is None:
                    owed[p] = starts[p]  # a work item past the committed offset: someone owes it
                    pending.discard(p)
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(p)
            return None if pending else owed
        finally:
            peek.close()

    def _restart_stuck(self, owed: dict[int, int]) -> None:
        """Restart the fetch of this replica's partitions that have work yet deliver none.

        Called after this replica had nothing to do for a while: a partition it owns and holds no
        item of, with work past its committed offset, is not being delivered (librdkafka can leave a
        partition paused or its fetch stopped across a rebalance). Holding no item of it means every
        item taken from it was committed, so the committed offset is exactly where to resume.
        """
        consumer = self._consumer
        assert consumer is not None
        now = self.clock()
        stuck = [TopicPartition(self.topics.dids, p, o) for p, o in sorted(owed.items())
                 if p in self._parts and not self._parts[p]
                 and now - self._quiet_since.get(p, now) >= self.opts.stuck_after]
        if not stuck:
            return
        positions = {tp.partition: tp.offset for tp in consumer.position(
            [TopicPartition(tp.topic, tp.partition) for tp in stuck])}
        log.warning("replica %s: partitions %s have work past their committed offsets %s but delivered none "
                    "(positions %s, paused here %s); restarting their fetch at the committed offsets",
                    self.opts.replica, [tp.partition for tp in stuck], [tp.offset for tp in stuck],
                    [positions.get(tp.partition) for tp in stuck], sorted(self._paused))
        self.metrics.repo_fetch_restarts.inc(len(stuck))
        consumer.resume([TopicPartition(tp.topic, tp.partition) for tp in stuck])
        for tp in stuck:
            self._paused.discard(tp.partition)
            self._quiet_since[tp.partition] = now
            try:
                consumer.seek(tp)
            except KafkaException as e:
                log.warning("replica %s: could not restart partition %d: %s", self.opts.replica, tp.partition, e)

    def stop(self, reason: str) -> None:
        """Ask the run to stop after the current cycle."""
        self._stop = self._stop or reason

    async def run(self) -> WorkStats:
        """Consume and backfill until stopped, idle (``idle_exit``) or out of time.

        Raises:
            CommitError: a transaction failed (fenced by another instance of this replica id, or the
                group moved on); nothing of it was committed.
            DeliveryError: Kafka refused data.
        """
        if self._consumer is None:
            self.prepare()
        loop = asyncio.get_running_loop()
        started = self.clock()
        last_work = started
        # After this long with nothing to do, check whether the topic is drained (idle_exit) and
        # whether a partition of this replica has work it is not delivering; then every ``recheck``.
        check_after = self.opts.idle_exit or self.opts.stuck_check
        recheck = min(check_after, 2.0) if self.opts.idle_exit else self.opts.stuck_check
        try:
            while self._stop is None:
                now = self.clock()
                self.health.beat()
                if self.opts.max_time and now - started >= self.opts.max_time:
                    self.stop("max_time")
                    break
                polled = self._poll()
                if self._need_catch_up:
                    self._need_catch_up = False
                    last_work = self.clock()  # a new assignment: give its partitions time to deliver
                    n = await loop.run_in_executor(
                        None, lambda: self.done.catch_up(self.kafka.consumer_config("unused"),
                                                         self.topics.repo_status))
                    log.info("replica %s: done-set has %d DIDs (%d status records read)", self.opts.replica,
                             len(self.done), n)
                self._start_fetches()
                batch = self._ready()
                if batch:
                    try:
                        results, kept = await loop.run_in_executor(None, self._cycle, batch)
                    except _TransactionAbortedError as e:
                        self._put_back(e.kept)
                        self._requeue(e.redo, e)
                        continue
                    self._aborts_in_a_row = 0
                    self._put_back(kept)
                    self._after_commit(results)
                    last_work = self.clock()
                    continue
                held = sum(len(items) for items in self._parts.values())
                if polled or held:
                    last_work = self.clock()
                elif self.clock() - last_work >= check_after:
                    # Idle here; but only a drained topic (every partition's committed offset at its
                    # end, whoever owns it) ends the run: a dead member's partitions are still owed.
                    owed = await loop.run_in_executor(None, self._owed)
                    if owed == {} and self.opts.idle_exit:
                        self.stop("idle")
                        break
                    if owed:
                        self._restart_stuck(owed)
                    last_work = self.clock() - check_after + recheck
                await self._wait_for_progress()
            self._final_progress()
        finally:
            self._close()
        self.stats.stop_reason = self._stop or "stopped"
        log.info("replica %s stopped (%s): %d DIDs done, %d skipped, %d records, %d transactions",
                 self.opts.replica, self.stats.stop_reason, self.stats.dids_done, self.stats.skipped,
                 self.stats.records, self.stats.transactions)
        return self.stats

    async def _wait_for_progress(self) -> None:
        tasks = [i.task for items in self._parts.values() for i in items if i.task is not None and not i.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(0.05)

    def _requeue(self, batch: list[_Item], aborted: _TransactionAbortedError) -> None:
        """Put an aborted transaction's items back at the head of their partitions, to be fetched
        and produced again (those of partitions revoked meanwhile are left to their new owner)."""
        self._aborts_in_a_row += 1
        self.stats.aborted += 1
        self.metrics.repo_txn_aborts.inc()
        log.warning("replica %s: transaction %d aborted (%s); its %d work items are redone: %s",
                    self.opts.replica, aborted.batch, aborted.reason, len(batch), aborted.dids)
        if self._aborts_in_a_row > MAX_ABORTS_IN_A_ROW:
            raise CommitError(f"replica {self.opts.replica}: {self._aborts_in_a_row} transactions in a row "
                              f"aborted, the last with {aborted.reason}")
        for item in reversed(batch):
            items = self._parts.get(item.partition)
            if items is None:
                continue
            item.task = None  # its download was consumed by the aborted transaction: fetch it again
            items.appendleft(item)

    def _put_back(self, items: list[_Item]) -> None:
        """Put items a transaction left for the next one back at the head of their partitions, in order."""
        for item in reversed(items):
            part = self._parts.get(item.partition)
            if part is None:
                _close_item(item)  # revoked meanwhile: its next owner does it
            else:
                part.appendleft(item)

    def _after_commit(self, results: list[tuple[_Item, RepoResult | None]]) -> None:
        self.stats.transactions += 1
        for item, result in results:
            if result is None:
                continue
            count_outcome(self.metrics, result)
            self.stats.dids_done += 1
            self.stats.records += result.records
            self.stats.outcomes[result.outcome] = self.stats.outcomes.get(result.outcome, 0) + 1
            if result.outcome in TERMINAL:
                self.done.add(item.did)
            elif result.outcome in REVERSIBLE:
                self.done.discard(item.did)
            if self.on_result is not None:
                self.on_result(result)

    def _close(self) -> None:
        for items in self._parts.values():
            for item in items:
                _close_item(item)
        self._parts.clear()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(KafkaException, RuntimeError):
                # librdkafka can hang for good in close() when a cooperative assignment arrives
                # while it closes (librdkafka#4527): leave the group first, serve the revocation,
                # then close with nothing assigned.
                consumer.unsubscribe()
                deadline = self.clock() + CLOSE_DRAIN_SECONDS
                while consumer.assignment() and self.clock() < deadline:
                    consumer.poll(0.1)
                consumer.close()
        self.publisher.close()


def _close_item(item: _Item) -> None:
    """Release an item's download, now if it finished, else when its cancelled fetch ends."""
    task = item.task
    if task is None:
        return
    if task.done():
        _close_result(task)
    else:
        task.cancel()
        task.add_done_callback(_close_result)


def _close_result(task: asyncio.Task[Fetched]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()

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

This module drives the source, the statistics and the checkpoints; routing, topics, the producer,
its transactions and the outage handling above are the job's :class:`~producers.publish.Publisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from producers.publish import Msg, Publisher
from producers.source import Drop, End, Skip, Source
from runtime.contract.codec import AvroCodec
from runtime.contract.records import AccountEvent, Event, IdentityEvent, RecordEvent, SyncEvent, to_jetstream_json
from runtime.contract.timeparse import us_to_date
from runtime.contract.topics import CONTROL_TOPIC_CONFIG
from runtime.errors import ConfigError, DropError, SourceError
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import FINISHED, RUNNING, STOPPED, JobState, load_job
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from runtime.process.options import Opt
from runtime.process.signals import handle_stop_signals

log = logging.getLogger(__name__)

_DAY_US = 86_400_000_000
#: ``--max-collections``: the distinct collections a job produces to, and the collection topics of
#: its prefix it lets exist (it creates a topic for a new collection only while fewer do).
DEFAULT_MAX_COLLECTIONS: Final = 1000
MAX_COLLECTIONS_OPTION: Final = Opt(
    ("--max-collections",), "max_collections", "BACKFILL_MAX_COLLECTIONS", DEFAULT_MAX_COLLECTIONS,
    "the most distinct collections a job produces to, one topic each; it creates a topic for a new "
    "collection only while the topic prefix has fewer collection topics. Past it, events of further "
    "collections are dead-lettered (reason too_many_collections)", type=int)
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

    def seed_statistics(self, stored: int | None = None) -> dict[str, Any]:
        """The seeds' statistics dict (every field of seed 001's), plus the job's own counts.

        ``stored``: the records a sink stored, when one ran alongside (else the records produced).
        """
        total = self.elapsed
        records = stored if stored is not None else self.records_produced
        return {
            "records_stored": records,
            "messages_received": self.messages_received,
            "total_time": round(total, 3),
            "records_per_second": round(records / total, 1) if total > 0 else 0.0,
            "collections": sorted(self.collections),
            "target_reached": self.target_reached,
            "latest_cursor": self.latest_cursor,
            "current_date": self.current_date,
            "end_cursor_reached": self.end_cursor_reached,
            "records_produced": self.records_produced,
            "events_produced": self.events_produced,
            "stop_reason": self.stop_reason,
            "skipped": dict(self.skipped),
            "dropped": dict(self.dropped),
        }


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
        self.clock = clock
        self.wall = wall
        self.on_date_change = on_date_change
        self.on_progress = on_progress
        self.health = health
        self.stats = JobStats()
        self.state: JobState | None = None
        self.previous: JobState | None = None
        #: Routes, produces and commits the job's events: its producer, topics and transactions.
        self.publisher = Publisher(kafka, codec, metrics, source=options.source, owner=f"job {options.job}",
                                   id_kind="job name", transactional_id=transactional_id(options.job),
                                   max_collections=options.max_collections, redo=True,
                                   on_route=self.stats.collections.add, clock=clock, wall=wall)
        self.topics = self.publisher.topics
        self._since_checkpoint = 0
        self._last_checkpoint = 0.0
        self._stop_reason: str | None = None
        self._first_time_us: int | None = None
        self._source: Source | None = None
        self._m_received = metrics.events_received.child(options.source)
        # Received events are added to their Prometheus counter in bulk (_flush_counts), and so are
        # produced ones (the publisher's): every 128 items, every tick (0.2 s), at each checkpoint and
        # at the end, so a scrape lags 0.2 s at most.
        self._n_received = 0
        self._day = (0, 0)  # the UTC day (start, end in unix us) stats.current_date was made for
        # The checkpoint committing on the checkpoint thread and its state; what the loop produces
        # meanwhile the publisher holds, and sends once it is done.
        self._committing: Future[float] | None = None
        self._committing_state: JobState | None = None
        self._executor: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ setup

    @property
    def transactional_id(self) -> str:
        """The job's transactional id: a second instance of the job fences the first."""
        return transactional_id(self.opts.job)

    def prepare(self) -> JobState | None:
        """Create the internal topics, the producer, and load the previous checkpoint.

        Returns:
            the previous state of this job (None if it never ran).

        Raises:
            SourceError: the control topic was not read to its end within ``--control-timeout``:
                whether the job has a checkpoint is unknown, so it does not start.
        """
        publisher = self.publisher
        kafka_util.check_reachable(publisher.admin, self.kafka.bootstrap_servers)
        publisher.ensure([self.topics.control], config=CONTROL_TOPIC_CONFIG, partitions=1)
        publisher.ensure([self.topics.dead_letters, f"{self.kafka.topic_prefix}.identity",
                          f"{self.kafka.topic_prefix}.account", f"{self.kafka.topic_prefix}.sync"])
        if publisher.start(self.opts.transactions):
            log.info("job %s: Kafka transactions enabled (data and checkpoint commit atomically)",
                     self.opts.job)
        try:
            self.previous = load_job(self.kafka.consumer_config("atproto-backfill-control-reader"),
                                     self.topics.control, self.opts.job, max_wait=self.kafka.control_timeout,
                                     must_exist=True)
        except SourceError as e:
            raise SourceError(
                f"job {self.opts.job}: cannot tell whether it has a checkpoint ({e}); not starting without "
                f"it (a resume would start over, a new run would number its checkpoints from 1): raise "
                f"--control-timeout (now {self.kafka.control_timeout:g} s) or check the brokers") from e
        return self.previous

    # ------------------------------------------------------------------ producing

    def _emit(self, event: Event) -> None:
        """Publish ``event`` and count it in the statistics.

        Raises:
            DropError: the publisher refused it (``too_many_collections``, an invalid record).
        """
        st = self.stats
        self.publisher.publish(event)
        if type(event) is RecordEvent:
            coll = event.collection
            st.records_produced += 1
            by_collection = st.by_collection
            by_collection[coll] = by_collection.get(coll, 0) + 1
        st.events_produced += 1
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
        self.publisher.flush_counts()

    def _drop(self, drop: Drop) -> None:
        self.stats.dropped[drop.reason] = self.stats.dropped.get(drop.reason, 0) + 1
        self.publisher.dead_letter(drop)

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
        self.publisher.hold(self._finish_checkpoint)
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
            pending = self.publisher.release()
        assert state is not None
        self._committed(state, seconds)
        self.publisher.send_all(pending)

    def _start_state(self, status: str) -> JobState:
        """The state covering everything produced so far (offsets are added once delivered)."""
        self._flush_counts()
        self.publisher.begin()
        state = self._build_state(status)
        self._since_checkpoint = 0
        self._last_checkpoint = self.clock()
        return state

    def _commit_timed(self, state: JobState, t0: float) -> float:
        self._commit(state)
        return self.clock() - t0

    def _commit(self, state: JobState) -> None:
        """Flush, add the delivered offsets to ``state``, and commit it with the data it covers
        (see :meth:`Publisher.commit`: outages are ridden out, failed transactions redone).

        Runs on the checkpoint thread for a background checkpoint; the loop sends nothing to the
        producer meanwhile, so every delivery report it serves belongs to this checkpoint.
        """

        def checkpoint_message() -> Msg:
            # Every delivery confirmed: the offsets are final.
            state.merge_offsets(self.publisher.written)
            state.check_forward(self.state or self.previous)
            return self.topics.control, self.opts.job.encode(), state.to_bytes()

        self.publisher.commit(checkpoint_message, self._superseded)

    def _superseded(self) -> str | None:
        """What says that another instance of the job took over (None if none did): the job's last
        checkpoint in the control topic is not this instance's last.

        Raises:
            SourceError: the control topic could not be read.
        """
        latest = load_job(self.kafka.consumer_config("atproto-backfill-control-reader"), self.topics.control,
                          self.opts.job, max_wait=self.kafka.control_timeout, must_exist=True)
        mine = self.state or self.previous
        if (latest and (latest.run, latest.checkpoint)) != (mine and (mine.run, mine.checkpoint)):
            return (f"its checkpoint {latest.checkpoint if latest else None} of run "
                    f"{latest.run if latest else None} is not this instance's")
        return None

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
        assert self.publisher.producer is not None
        opts = self.opts
        limit = opts.num_records
        every = opts.checkpoint_events
        position = source.position
        stats = self.stats
        n = 0
        self.publisher.begin()
        async for item in source.items():
            n += 1
            if isinstance(item, (RecordEvent, IdentityEvent, AccountEvent, SyncEvent)):
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
                    self.publisher.poll(0)
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
            # No producer check here: while a background checkpoint commits, the publisher may be
            # replacing its producer (see Publisher.commit); the producer is polled only between them.
            committing = self._committing
            if committing is None:
                self.publisher.poll(0)
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
        if self.publisher.producer is None:
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
        try:
            with handle_stop_signals(self.stop, "signal"):
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
            # What was held while a checkpoint committed goes out now, to be delivered while the
            # source closes (a websocket's closing handshake can take its whole close timeout),
            # instead of after it, in the final checkpoint's flush.
            self._finish_checkpoint()
        finally:
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
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.publisher.close()


def _raw_of(event: Event) -> bytes:
    try:
        return orjson.dumps(to_jetstream_json(event))
    except TypeError:
        return repr(event).encode()

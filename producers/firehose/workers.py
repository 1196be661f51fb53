"""``--workers N``: one relay connection, N processes that decode, verify and produce a DID share each.

Design. The coordinator (the ``backfill firehose`` process) holds the only websocket. For each
frame it parses the header and body just enough to know the account (``repo``/``did``) and the
time, and hands the frame's *raw bytes* to worker ``crc32(did) % N`` through that worker's OS pipe
(length-prefixed records in batches of ``--batch-size`` frames; nothing is pickled per frame). A
worker is a full single-process job of its own: job name ``<job>.w<i>``, its own Kafka
transactional id, its own checkpoints and position; it decodes, filters, verifies and produces
exactly as the single-process mode does. Every account belongs to one worker, which sees that
account's frames in relay order, so per-DID order holds end to end.

Marks. With each batch the coordinator sends every worker a mark "all frames up to seq S were
dispatched"; a worker that has handled everything before the mark moves its position to S, so a
worker whose accounts are quiet still advances its checkpoint.

Start. The coordinator's own checkpoint (under ``<job>``) records the job's start cursor. A live
start (no ``--start-cursor``, ``--days`` or start time) has none until the relay sends its first
frame: the coordinator then records that frame's seq - 1 as the start, and only then hands the
frame to a worker, so no worker can checkpoint past a frame before the job's start is known.

Resume. Each worker resumes from its own checkpoint. A worker checkpoints only once it produced
something (its final checkpoint always), so a worker may have none: it counts with the job's start
cursor. The coordinator connects at the smallest of these cursors, so the resume never starts after
a frame some worker has not committed; a worker drops the replayed frames it had already delivered
(seq below its cursor, or its fingerprints at the cursor). A job whose start was never recorded and
none of whose workers checkpointed produced nothing: it starts live again. The coordinator's
checkpoint also records that smallest cursor: the job's resume cursor. Resuming with a different
``--workers`` is refused (the DID shares would move).

End. The coordinator's final checkpoint carries every worker's offsets (per partition the highest
of the workers' next offsets) and the sum of their counts, so a consumer waiting for the job
(``--until-done <job>``) knows where its data ends.

Stops. The coordinator detects the end watermark and sends every worker an end; ``--max-time`` and
signals end the workers the same way (status ``stopped``); ``-n`` applies per worker share
(``ceil(n / N)``). A worker that loses its coordinator (pipe closed: the coordinator was killed)
checkpoints and stops. A worker that fails makes the whole job fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import queue
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

import orjson
from confluent_kafka import KafkaException, Producer

from producers.firehose.decode import parse_frame, parse_time_us
from producers.firehose.settings import (
    FirehoseSettings,
    RunResult,
    check_resume,
    close_resolver,
    initial_cursor,
    job_options,
    make_resolver,
)
from producers.firehose.source import (
    FirehosePosition,
    FrameHandler,
    RelayStream,
    StreamOptions,
)
from producers.firehose.verify import CommitVerifier
from producers.job import JobRunner, transactional_id
from producers.publish import deliver
from producers.source import Drop, End, SourceItem
from runtime.contract.codec import AvroCodec
from runtime.contract.topics import CONTROL_TOPIC_CONFIG, TopicMap
from runtime.errors import ConfigError, DropError, FatalError, FencedError
from runtime.kafka import clients as kafka_util
from runtime.kafka.broker import resolve_bootstrap
from runtime.kafka.checkpoint import FINISHED, STOPPED, JobState, load_jobs
from runtime.kafka.settings import KafkaSettings
from runtime.process.logs import configure
from runtime.process.memory import set_up_service
from runtime.process.metrics import Health, Metrics, MetricsServer
from runtime.process.progress import print_statistics
from runtime.process.signals import handle_stop_signals

log = logging.getLogger(__name__)

#: Pipe record types: a frame, a dispatch mark, an end, a drop noticed by the coordinator.
_FRAME: Final = 0x46
_MARK: Final = 0x4D
_END: Final = 0x45
_DROP: Final = 0x44
_HEAD: Final = struct.Struct("<BI")
_SEQ: Final = struct.Struct("<q")


def worker_job(job: str, index: int) -> str:
    """The job name of worker ``index`` (its checkpoint key and transactional id suffix)."""
    return f"{job}.w{index}"


def shard_of(did: str | None, count: int) -> int:
    """The worker that owns ``did`` (stable across processes and runs); frames without a DID go to worker 0."""
    if did is None or count == 1:
        return 0
    return zlib.crc32(did.encode()) % count


def encode_records(records: list[tuple[int, bytes]]) -> bytes:
    """A pipe batch: ``[type u8][length u32 LE][payload]`` records back to back."""
    out = bytearray()
    for kind, payload in records:
        out += _HEAD.pack(kind, len(payload))
        out += payload
    return bytes(out)


def decode_records(batch: bytes) -> list[tuple[int, bytes]]:
    """Inverse of :func:`encode_records`.

    Raises:
        FatalError: a truncated batch (our own pipe protocol broke).
    """
    out: list[tuple[int, bytes]] = []
    pos = 0
    end = len(batch)
    size = _HEAD.size
    while pos < end:
        if pos + size > end:
            raise FatalError("truncated worker pipe batch")
        kind, n = _HEAD.unpack_from(batch, pos)
        pos += size
        if pos + n > end:
            raise FatalError("truncated worker pipe record")
        out.append((kind, batch[pos:pos + n]))
        pos += n
    return out


# --------------------------------------------------------------------------------------- worker


class PipeSource:
    """A worker's source: frames from the coordinator's pipe through a :class:`FrameHandler`."""

    name = "firehose"

    def __init__(self, conn: Connection, handler: FrameHandler, origin: str) -> None:
        self._conn = conn
        self.handler = handler
        self._origin = origin
        self._thread: threading.Thread | None = None

    @property
    def position(self) -> FirehosePosition:
        """What was yielded so far."""
        return self.handler.position

    def _start_reader(self) -> asyncio.Queue[bytes | None]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
        conn = self._conn

        def read() -> None:
            while True:
                try:
                    data: bytes | None = conn.recv_bytes()
                except (EOFError, OSError):
                    data = None
                try:
                    # Blocks while the queue is full: the pipe fills and the coordinator waits.
                    asyncio.run_coroutine_threadsafe(q.put(data), loop).result()
                except RuntimeError:
                    return  # the loop is gone: the worker is finishing
                if data is None:
                    return

        self._thread = threading.Thread(target=read, name="pipe-reader", daemon=True)
        self._thread.start()
        return q

    async def items(self) -> AsyncIterator[SourceItem]:
        """Items of the frames the coordinator sends, until its end (or its loss)."""
        q = self._start_reader()
        handler = self.handler
        position = handler.position
        origin = self._origin
        while True:
            batch = await q.get()
            if batch is None:
                log.warning("the coordinator closed the pipe; stopping")
                yield End("coordinator_lost")
                return
            for kind, payload in decode_records(batch):
                if kind == _FRAME:
                    try:
                        frame = parse_frame(payload)
                        error: DropError | None = None
                    except DropError as e:
                        frame, error = None, e
                    handled = await handler.handle(payload, frame, error, origin)
                    for item in handled.items:
                        yield item
                        if isinstance(item, End):
                            return
                    if handled.seq is not None:
                        position.frame_done(handled.seq)
                elif kind == _MARK:
                    (seq,) = _SEQ.unpack(payload)
                    position.frame_done(seq)
                elif kind == _END:
                    yield End(payload.decode())
                    return
                elif kind == _DROP:
                    d = orjson.loads(payload)
                    yield Drop(d["reason"], d["detail"], b"", d["origin"], cursor=d.get("cursor"))
                    if d.get("cursor") is not None:
                        position.frame_done(int(d["cursor"]))


async def _worker_async(settings: FirehoseSettings, kafka: KafkaSettings, index: int, count: int,
                        conn: Connection, end_us: int | None) -> dict[str, Any]:
    metrics = Metrics()
    health = Health()
    server = None
    if settings.obs.metrics_port:
        server = MetricsServer(metrics, health, settings.obs.metrics_host, settings.obs.metrics_port + 1 + index)
        server.start()
    job = worker_job(settings.job, index)
    limit = math.ceil(settings.num_records / count) if settings.num_records else 0
    options = job_options(settings, job, limit)
    options.end_time_us = end_us
    runner = JobRunner(kafka, options, metrics, AvroCodec.from_config(kafka.registry_config()), health=health)
    previous = runner.prepare()
    health.set_ready(True)
    position = FirehosePosition.restore(previous.position if (settings.resume and previous) else None)
    resolver = make_resolver(settings, metrics) if settings.verify else None
    verifier = CommitVerifier(resolver) if resolver is not None else None
    handler = FrameHandler(position, collections=settings.collections, dids=settings.dids,
                           start_us=settings.start_us, end_us=end_us, lateness_us=settings.lateness_us,
                           verifier=verifier, job=job, metrics=metrics)
    source = PipeSource(conn, handler, settings.relay_url)
    try:
        final = await runner.run(lambda _prev: source)
    finally:
        runner.close()
        await close_resolver(resolver)
        if server is not None:
            server.stop()
    st = runner.stats
    return {"job": job, "state": final.to_bytes().decode(), "status": final.status, "stop_reason": final.stop_reason,
            "cursor": final.cursor,
            "resume_cursor": position.resume_cursor, "records": st.records_produced,
            "events": st.events_produced, "received": st.messages_received, "skipped": st.skipped,
            "dropped": st.dropped, "collections": sorted(st.collections), "latest_time_us": st.latest_time_us,
            "target_reached": st.target_reached, "end_cursor_reached": st.end_cursor_reached,
            "verified": verifier.stats.verified if verifier is not None else None}


def worker_main(settings: FirehoseSettings, servers: str, index: int, count: int, conn: Connection,
                end_us: int | None) -> None:
    """Entry point of worker process ``index`` (spawned; exits 1 when the job failed)."""
    configure(settings.obs.log_level, settings.obs.log_format)
    set_up_service(settings.obs.heap_trim_interval)
    kafka = settings.kafka.with_bootstrap(servers)
    try:
        result = asyncio.run(_worker_async(settings, kafka, index, count, conn, end_us))
    except FencedError as e:  # another instance of this job started: the message says it all
        log.critical("worker %d stopping: %s", index, e)
        raise SystemExit(1) from None
    except BaseException:
        log.critical("worker %d failed", index, exc_info=True)
        raise SystemExit(1) from None
    with contextlib.suppress(OSError):
        conn.send_bytes(orjson.dumps(result))
    conn.close()


# ---------------------------------------------------------------------------------- coordinator


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    outbox: queue.Queue[bytes | None] = field(default_factory=lambda: queue.Queue(maxsize=8))
    records: list[tuple[int, bytes]] = field(default_factory=list)
    frames: int = 0
    dead: bool = False
    sender: threading.Thread | None = None
    result: dict[str, Any] | None = None

    def start_sender(self) -> None:
        def send() -> None:
            while True:
                batch = self.outbox.get()
                if batch is None:
                    return
                try:
                    self.conn.send_bytes(batch)
                except (OSError, ValueError):
                    self.dead = True
                    return

        self.sender = threading.Thread(target=send, name=f"pipe-w{self.index}", daemon=True)
        self.sender.start()


class Coordinator:
    """Reads the relay and feeds the workers; see the module docstring."""

    def __init__(self, settings: FirehoseSettings, kafka: KafkaSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.kafka = kafka
        self.metrics = metrics
        self.topics = TopicMap(kafka.topic_prefix)
        self.workers: list[_Worker] = []
        self.stream: RelayStream | None = None
        self._lock = asyncio.Lock()
        self._last_seq: int | None = None
        self._stop: str | None = None
        self._stop_event: asyncio.Event | None = None
        self.frames = 0
        self.end_us: int | None = None
        #: The coordinator's checkpoint of this run (rewritten when a live start learns its start seq).
        self._base: JobState | None = None
        #: A live start: the first seq from the relay becomes the job's start (minus one), recorded
        #: before any frame goes to a worker.
        self._record_start = False

    # ------------------------------------------------------------------ checkpoints

    def _write_state(self, state: JobState) -> None:
        _, errors = deliver(self.kafka, [(self.topics.control, self.settings.job.encode(), state.to_bytes())],
                            timeout=30)
        if errors:
            raise FatalError(f"job {self.settings.job}: coordinator checkpoint not delivered: {errors[0]}")

    def _fence_workers(self) -> None:
        """Fence the previous run's workers, aborting the transactions they left open.

        The control topic has one partition: a killed worker's open transaction hides every
        checkpoint committed after it from read_committed readers (the other workers' too) until the
        broker's transaction timeout aborts it. Initialising each worker's transactional id aborts it
        now, so the resume reads every worker's last checkpoint at once; a worker of that run still
        alive is fenced and stops.
        """
        if self.settings.transactions == "off":
            return
        for i in range(self.settings.workers):
            producer = Producer(self.kafka.producer_config(
                transactional_id=transactional_id(worker_job(self.settings.job, i))))
            try:
                producer.init_transactions(30)
            except KafkaException as e:
                if self.settings.transactions == "on":
                    raise FatalError(f"job {self.settings.job}: cannot fence worker {i}: {e.args[0]}") from e
                log.warning("job %s: worker %d not fenced (%s); the resume waits for its open transaction",
                            self.settings.job, i, e.args[0])
                return

    def _load(self) -> dict[str, JobState]:
        kafka_util.ensure_topics(kafka_util.admin(self.kafka.client_config()), [self.topics.control],
                                 partitions=1, replication=self.kafka.topic_replication,
                                 config=CONTROL_TOPIC_CONFIG)
        return load_jobs(self.kafka.consumer_config("atproto-backfill-control-reader"), self.topics.control,
                         max_wait=self.kafka.control_timeout, must_exist=True)

    def _resume_cursor(self, states: dict[str, JobState], previous: JobState) -> int | None:
        """Where a resume connects: the smallest resume cursor over the workers, a worker without a
        checkpoint counting with the job's start (None: nothing was produced; a live start again).

        Raises:
            ConfigError: some workers have no checkpoint and the job's start was never recorded (a
                live start by a version that did not record it): where their frames begin is unknown.
        """
        s = self.settings
        cursors: list[int | None] = []
        for i in range(s.workers):
            st = states.get(worker_job(s.job, i))
            cursors.append(FirehosePosition.restore(st.position).resume_cursor if st is not None else None)
        start = previous.start_cursor
        if start is not None:
            return min(start if c is None else c for c in cursors)
        known = [c for c in cursors if c is not None]
        if not known:
            return None
        if len(known) < len(cursors):
            missing = ", ".join(worker_job(s.job, i) for i, c in enumerate(cursors) if c is None)
            raise ConfigError(f"job {s.job}: {missing} never checkpointed and the job's start seq was not recorded "
                              f"(a live start by an older version), so a resume cannot tell where their frames "
                              f"begin; start a new job (--start-cursor) instead")
        return min(known)

    async def _start_at(self, seq: int) -> None:
        """A live start: record ``seq`` (the first frame's seq - 1) as the job's start cursor.

        Called before the first frame goes to a worker: a resume then never connects after a frame
        that a worker without a checkpoint has not committed.
        """
        base = self._base
        assert base is not None
        self._base = replace(base, start_cursor=seq, cursor=seq, position={**base.position, "cursor": seq},
                             updated_at_us=int(time.time() * 1e6), checkpoint=base.checkpoint + 1)
        await asyncio.to_thread(self._write_state, self._base)
        self._record_start = False
        log.info("job %s: live start at relay seq %d (recorded as the job's start cursor)", self.settings.job, seq)

    # ------------------------------------------------------------------ dispatch

    async def _flush(self) -> None:
        async with self._lock:
            mark = _SEQ.pack(self._last_seq) if self._last_seq is not None else None
            for w in self.workers:
                if w.dead:
                    continue
                if mark is not None:
                    w.records.append((_MARK, mark))
                if not w.records:
                    continue
                batch = encode_records(w.records)
                w.records = []
                while not w.dead:
                    try:
                        w.outbox.put_nowait(batch)
                        break
                    except queue.Full:
                        if not w.process.is_alive():
                            w.dead = True
                        await asyncio.sleep(0.002)

    async def _ticker(self) -> None:
        started = time.monotonic()
        max_time = self.settings.max_time
        while True:
            await asyncio.sleep(0.05)
            await self._flush()
            for w in self.workers:
                if not w.dead and not w.process.is_alive():
                    w.dead = True
                    if w.process.exitcode not in (0, None):
                        self._request_stop("worker_failed")
            if all(w.dead for w in self.workers):
                self._request_stop("workers_done")
            if max_time and time.monotonic() - started >= max_time:
                self._request_stop("max_time")

    def _request_stop(self, reason: str) -> None:
        if self._stop is None:
            self._stop = reason
        if self._stop_event is not None:
            self._stop_event.set()

    async def _dispatch(self) -> str:
        stream = self.stream
        assert stream is not None
        workers = self.workers
        count = len(workers)
        batch_size = self.settings.batch_size
        hard_end = self.end_us + self.settings.lateness_us if self.end_us is not None else None
        async for raw in stream.frames():
            if isinstance(raw, Drop):
                if self._record_start and raw.cursor is not None:
                    await self._start_at(raw.cursor - 1)
                w = workers[0]
                w.records.append((_DROP, orjson.dumps({"reason": raw.reason, "detail": raw.detail,
                                                       "origin": raw.origin, "cursor": raw.cursor})))
                if raw.cursor is not None:
                    self._last_seq = raw.cursor
                continue
            frame = raw.frame
            self.frames += 1
            if frame is not None and hard_end is not None:
                when = frame.body.get("time")
                if isinstance(when, str):
                    try:
                        if parse_time_us(when) >= hard_end:
                            return "end_cursor_reached"
                    except DropError:
                        pass  # the worker dead-letters the frame
            seq = frame.seq if frame is not None else None
            if self._record_start and seq is not None:
                await self._start_at(seq - 1)
            w = workers[shard_of(frame.did if frame is not None else None, count)]
            w.records.append((_FRAME, raw.data))
            w.frames += 1
            if seq is not None:
                self._last_seq = seq
                stream.done(seq)
            if len(w.records) >= batch_size:
                await self._flush()
        return "exhausted"

    # ------------------------------------------------------------------ the run

    async def run(self) -> RunResult:
        """Start the workers, feed them until a stop, collect their results.

        Raises:
            ConfigError: a resume with another worker count.
            FatalError: a worker failed.
            SourceError: the relay refused the cursor or stayed unreachable.
        """
        s = self.settings
        n = s.workers
        if s.resume:
            self._fence_workers()
        states = self._load()
        previous = states.get(s.job)
        check_resume(s, previous)
        resuming = s.resume and previous is not None
        if s.end_us is not None or s.follow or not resuming:
            self.end_us = s.default_end_us
        else:
            assert previous is not None
            self.end_us = previous.end_time_us
        if resuming:
            assert previous is not None
            cursor = self._resume_cursor(states, previous)
            start_cursor = previous.start_cursor
        else:
            cursor = await initial_cursor(s, FirehosePosition())
            start_cursor = cursor
        self._record_start = cursor is None
        now_us = int(time.time() * 1e6)
        base = JobState(
            job=s.job, source="firehose", filters=s.filters(), start_cursor=start_cursor, end_time_us=self.end_us,
            position={"workers": n, "cursor": cursor}, cursor=cursor, started_at_us=now_us, updated_at_us=now_us,
            checkpoint=(previous.checkpoint + 1) if previous else 1,
            runs=(previous.runs + 1) if resuming and previous else 1,
            offsets=_merge_offsets([previous]) if resuming and previous else {})
        self._base = base
        self._write_state(base)
        log.info("job %s: %d workers, relay %s, cursor %s, end %s", s.job, n, s.relay_url, cursor, self.end_us)
        ctx = multiprocessing.get_context("spawn")
        servers = self.kafka.bootstrap_servers
        for i in range(n):
            parent, child = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=worker_main, args=(s, servers, i, n, child, self.end_us),
                               name=f"firehose-w{i}", daemon=False)
            proc.start()
            child.close()
            w = _Worker(i, proc, parent)
            w.start_sender()
            self.workers.append(w)
        try:
            reason = await self._feed(cursor)
        except BaseException:
            await self._finish("failed")
            raise
        results = await self._finish(reason)
        # Each worker's final state as it committed it (reading the control topic right after the
        # commit may not show it yet); the control topic only for workers that did not report.
        reported = {i: JobState.from_bytes(r["state"].encode()) for i, r in enumerate(results) if r is not None}
        final_states = self._load() if len(reported) < n else {}
        worker_states = [reported[i] if i in reported else final_states[worker_job(s.job, i)]
                         for i in range(n) if i in reported or worker_job(s.job, i) in final_states]
        base = self._base  # with the start seq of a live start
        assert base is not None
        resume_cursors = [FirehosePosition.restore(st.position).resume_cursor for st in worker_states]
        known = [c for c in resume_cursors if c is not None]
        fallback = base.start_cursor if base.start_cursor is not None else cursor
        job_cursor = min(known) if len(known) == n else fallback
        failed = [r for r in results if r is None]
        finished = not failed and all(r is not None and r["status"] == FINISHED for r in results)
        # The workers' offsets and counts: where the job's data ends, for consumers waiting for it.
        end_state = replace(base, status=FINISHED if finished else STOPPED, stop_reason=reason,
                            position={**base.position, "cursor": job_cursor, "worker_cursors": resume_cursors},
                            cursor=job_cursor, updated_at_us=int(time.time() * 1e6),
                            finished_at_us=int(time.time() * 1e6), checkpoint=base.checkpoint + 1,
                            counts=_sum_counts(worker_states), offsets=_merge_offsets([base, *worker_states]))
        self._write_state(end_state)
        if failed:
            raise FatalError(f"job {s.job}: {len(failed)} of {n} workers failed; see their logs")
        return RunResult(self._statistics(results, reason, job_cursor), end_state, worker_states)

    async def _feed(self, cursor: int | None) -> str:
        s = self.settings
        self.stream = RelayStream(StreamOptions(s.relay_url, max_frame_size=s.max_frame_size,
                                                stall_timeout=s.stall_timeout, max_attempts=s.max_reconnects),
                                  cursor, metrics=self.metrics)
        self.stream.on_reconnect = lambda: self.metrics.reconnects.inc("firehose")
        self._stop_event = asyncio.Event()
        try:
            with handle_stop_signals(self._request_stop, "signal"):
                dispatch = asyncio.ensure_future(self._dispatch())
                ticker = asyncio.ensure_future(self._ticker())
                stopper = asyncio.ensure_future(self._stop_event.wait())
                try:
                    done, _ = await asyncio.wait({dispatch, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    # dispatch.result() re-raises a SourceError from the stream
                    reason = dispatch.result() if dispatch in done else self._stop or "stopped"
                finally:
                    for task in (dispatch, ticker, stopper):
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task
        finally:
            await self.stream.aclose()
        await self._flush()
        return reason

    async def _finish(self, reason: str) -> list[dict[str, Any] | None]:
        for w in self.workers:
            if not w.dead:
                with contextlib.suppress(queue.Full):
                    w.outbox.put(encode_records([(_END, reason.encode())]), timeout=30)
            with contextlib.suppress(queue.Full):
                w.outbox.put(None, timeout=30)
        results: list[dict[str, Any] | None] = []
        for w in self.workers:
            results.append(await asyncio.to_thread(self._collect, w))
        return results

    @staticmethod
    def _collect(w: _Worker) -> dict[str, Any] | None:
        result = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if w.conn.poll(0.2):
                    result = orjson.loads(w.conn.recv_bytes())
                    break
            except (EOFError, OSError):
                break
            if not w.process.is_alive() and not w.conn.poll(0):
                break
        w.process.join(30)
        if w.process.is_alive():
            log.error("worker %d did not exit; terminating it", w.index)
            w.process.terminate()
            w.process.join(10)
        with contextlib.suppress(OSError):
            w.conn.close()
        if w.process.exitcode != 0:
            log.error("worker %d exited with status %s", w.index, w.process.exitcode)
            return None
        return result

    def _statistics(self, results: list[dict[str, Any] | None], reason: str, job_cursor: int | None) -> dict[str, Any]:
        ok = [r for r in results if r is not None]
        skipped: dict[str, int] = {}
        dropped: dict[str, int] = {}
        for r in ok:
            for k, v in r["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
            for k, v in r["dropped"].items():
                dropped[k] = dropped.get(k, 0) + v
        c = self.stream.counters if self.stream is not None else None
        verified = [r["verified"] for r in ok if r["verified"] is not None]
        return {
            "records_stored": sum(r["records"] for r in ok),
            "messages_received": sum(r["received"] for r in ok),
            "collections": sorted({col for r in ok for col in r["collections"]}),
            "target_reached": any(r["target_reached"] for r in ok),
            "end_cursor_reached": reason == "end_cursor_reached",
            "events_produced": sum(r["events"] for r in ok),
            "stop_reason": reason,
            "skipped": skipped,
            "dropped": dropped,
            "commits_verified": sum(verified) if verified else None,
            "frames_received": c.frames if c else 0,
            "seq_gaps": c.gaps if c else 0,
            "missing_seqs": c.missing if c else 0,
            "outdated_cursor": c.outdated if c else 0,
            "workers": len(results),
            "frames_per_worker": [w.frames for w in self.workers],
            "resume_cursor": job_cursor,
        }


def _sum_counts(states: list[JobState]) -> dict[str, int]:
    """The workers' counts added up (each worker's counts cover all its runs)."""
    out: dict[str, int] = {}
    for st in states:
        for k, v in st.counts.items():
            out[k] = out.get(k, 0) + v
    return out


def _merge_offsets(states: list[JobState]) -> dict[str, dict[str, int]]:
    """Per topic and partition the highest next offset of ``states``: the end of all their data."""
    out: dict[str, dict[str, int]] = {}
    for st in states:
        for topic, parts in st.offsets.items():
            merged = out.setdefault(topic, {})
            for partition, offset in parts.items():
                if offset > merged.get(partition, 0):
                    merged[partition] = offset
    return out


def run_workers(settings: FirehoseSettings, *, metrics: Metrics | None = None,
                print_table: bool = True) -> RunResult:
    """``backfill firehose --workers N`` (N > 1); see the module docstring.

    Raises:
        ConfigError: a resume with another worker count.
        FatalError: a worker failed.
        SourceError: the relay refused the cursor or stayed unreachable.
    """
    metrics = metrics or Metrics()
    health = Health()
    server = None
    if settings.obs.metrics_port:
        server = MetricsServer(metrics, health, settings.obs.metrics_host, settings.obs.metrics_port).start()
    try:
        with resolve_bootstrap(settings.kafka.bootstrap_servers) as servers:
            kafka = settings.kafka.with_bootstrap(servers)
            health.set_ready(True)
            result = asyncio.run(Coordinator(replace(settings, kafka=kafka), kafka, metrics).run())
    finally:
        if server is not None:
            server.stop()
    if print_table:
        print_statistics(result.statistics, title=f"Firehose backfill statistics (job {settings.job}, "
                                                  f"{settings.workers} workers)")
    return result


__all__ = ["Coordinator", "PipeSource", "decode_records", "encode_records", "run_workers", "shard_of",
           "worker_job", "worker_main"]

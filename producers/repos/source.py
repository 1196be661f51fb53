"""Per-DID repository work: resolve, download to disk, decode; and the list-mode source for JobRunner.

The work on one DID has a network half and a CPU half:

* :class:`RepoFetcher` (async, many at once): resolve the DID (PLC directory or did:web), take
  its PDS endpoint, download ``getRepo`` to a temporary file (streamed, capped) through the
  polite :class:`~producers.repos.pds.PdsClient`, and index the CAR on disk
  (:func:`runtime.atproto.car.open_car`: memory bounded by the block index, never the CAR's size).
  Transient failures (5xx, timeouts, truncated transfers, a CAR cut short) are retried with
  backoff; then the DID is *failed* with the reason. ``RepoNotFound`` / ``RepoDeactivated`` /
  ``RepoTakendown`` and unregistered DIDs are outcomes, not failures.
* :class:`RepoProcessor` (sync, one at a time): decode the CAR into events (pure
  :mod:`producers.repos.decode`), or one :class:`~producers.source.Drop` carrying a failed
  repository's reason, and fill in the :class:`RepoResult` (seed 002's per-user metadata).

:class:`RepoSource` is the source protocol over a fixed list of DIDs (``--dids``, ``--dids-file``,
handles, ``--from-relay``) for :class:`producers.job.JobRunner`: DIDs are fetched concurrently and
produced as each completes; all of one DID's items are yielded without awaiting, so a checkpoint
(the runner's ticker) only ever falls between DIDs, and the position records which DIDs are done.
Events carry ``cursor`` = the DID's ordinal in the list.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from producers.identity.resolver import DidResolutionError, DidResolver
from producers.repos.decode import RecordFilter, RepoDecodeError, RepoDecoder
from producers.repos.pds import PdsClient, PdsError, RepoUnavailableError
from producers.source import Drop, End, Skip, SourceItem
from runtime.atproto.car import Car, CarFile, open_car, read_car
from runtime.atproto.errors import AtprotoFormatError, CarTooLargeError
from runtime.atproto.identity import Identity
from runtime.contract.records import Event, RecordEvent
from runtime.errors import FatalError
from runtime.process.metrics import Metrics

log = logging.getLogger(__name__)

OUTCOMES: Final = ("ok", "not_found", "deactivated", "takendown", "failed", "skipped")
#: CARs up to this size are parsed in memory; larger ones stay on disk (see RepoFetcher).
IN_MEMORY_CAR_BYTES: Final = 16 * 1024 * 1024
#: How much of a failed repository's CAR goes into its dead letter.
DEAD_LETTER_PAYLOAD: Final = 256 * 1024


class _RetryFetchError(Exception):
    """A fetch attempt that may succeed when repeated (internal to the retry loop)."""

    def __init__(self, reason: str, detail: str, payload: bytes = b"") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.payload = payload


@dataclass
class Fetched:
    """A DID after its network half: a CAR on disk, or why there is none.

    ``outcome``: ``ok`` (``car`` is open), ``not_found``/``deactivated``/``takendown``, or
    ``failed`` (``reason`` is a drop reason, ``payload`` what the dead letter keeps).
    ``opened``: the CAR's checked repository (a ``RepoDecoder``) or why it cannot be used (a
    ``RepoDecodeError``), once :class:`RepoProcessor` opened it.
    """

    did: str
    cursor: int
    started: float
    identity: Identity | None = None
    car: Car | CarFile | None = None
    path: Path | None = None
    size: int = 0
    attempts: int = 0
    fetch_seconds: float = 0.0
    #: Unix microseconds when the repository was requested: its records' as-of time
    #: (``runtime.contract.order`` rule 4; None before a successful request).
    observed_us: int | None = None
    outcome: str = "ok"
    reason: str | None = None
    detail: str | None = None
    payload: bytes = b""
    opened: RepoDecoder | RepoDecodeError | None = None

    def close(self) -> None:
        """Close and delete the downloaded CAR."""
        self.opened = None
        if isinstance(self.car, CarFile):
            self.car.close()
        self.car = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


@dataclass
class RepoResult:
    """What happened to one DID (seed 002's per-user metadata and the repo_status record)."""

    did: str
    cursor: int
    outcome: str
    reason: str | None = None
    detail: str | None = None
    pds: str | None = None
    rev: str | None = None
    commit_cid: str | None = None
    records: int = 0
    record_bytes: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    timestamps: dict[str, int] = field(default_factory=dict)
    car_bytes: int = 0
    fetch_ms: int = 0
    duration_ms: int = 0
    attempts: int = 0

    def metadata(self) -> dict[str, Any]:
        """The per-user metadata returned by :func:`producers.repos.run_batched_backfill`."""
        return {
            "did": self.did, "outcome": self.outcome, "reason": self.reason, "pds": self.pds, "rev": self.rev,
            "records": self.records, "counts_by_type": dict(self.by_type), "skipped": dict(self.skipped),
            "dropped": dict(self.dropped), "timestamps": dict(self.timestamps), "car_bytes": self.car_bytes,
            "record_bytes": self.record_bytes, "fetch_seconds": self.fetch_ms / 1000,
            "duration_seconds": self.duration_ms / 1000, "attempts": self.attempts,
        }

    def not_produced(self, kind: str, reason: str) -> None:
        """Account for a record the producer refused after decoding (its typed fields did not fit)."""
        self.records -= 1
        left = self.by_type.get(kind, 0) - 1
        if left > 0:
            self.by_type[kind] = left
        else:
            self.by_type.pop(kind, None)
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def status_datum(self, job: str, time_us: int, *, replica: str | None = None,
                     work_partition: int | None = None, work_offset: int | None = None,
                     batch: int | None = None) -> dict[str, Any]:
        """The ``repo_status`` Avro datum."""
        return {
            "did": self.did, "job": job, "outcome": self.outcome, "reason": self.reason,
            "detail": (self.detail or "")[:2000] or None, "pds": self.pds, "rev": self.rev,
            "commit_cid": self.commit_cid, "records": self.records, "by_type": dict(self.by_type),
            "skipped": dict(self.skipped), "dropped": dict(self.dropped), "timestamps": dict(self.timestamps),
            "car_bytes": self.car_bytes, "record_bytes": self.record_bytes, "fetch_ms": self.fetch_ms,
            "duration_ms": self.duration_ms, "attempts": self.attempts, "cursor": self.cursor,
            "time_us": time_us, "replica": replica, "work_partition": work_partition, "work_offset": work_offset,
            "batch": batch,
        }


class RepoFetcher:
    """The network half of a DID: resolve, download, index (with DID-level retries).

    Args:
        resolver: DID resolution.
        pds: the polite PDS client.
        workdir: where CARs are downloaded (one temporary file per DID in flight).
        attempts: tries of the whole fetch for transient failures (each try also retries its
            requests inside the PDS client).
        wait, sleep: backoff between tries (injected in tests).
        clock: monotonic seconds.
        wall: unix seconds (when a repository was requested: the as-of time of its records).
        max_car_bytes: refuse larger repositories.
        in_memory_bytes: CARs up to this size are read into memory whole; larger ones are indexed on
            disk and read block by block (memory bounded by the index, not the CAR).
    """

    def __init__(self, resolver: DidResolver, pds: PdsClient, workdir: Path, *, attempts: int = 3,
                 wait: wait_base | None = None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic, max_car_bytes: int | None = None,
                 in_memory_bytes: int = IN_MEMORY_CAR_BYTES, wall: Callable[[], float] = time.time) -> None:
        self.resolver = resolver
        self.pds = pds
        self.workdir = workdir
        self.attempts = max(1, attempts)
        self._wait = wait if wait is not None else wait_exponential_jitter(multiplier=2.0, max=60.0)
        self._sleep = sleep
        self._clock = clock
        self._wall = wall
        self.max_car_bytes = max_car_bytes if max_car_bytes is not None else pds.limits.max_car_bytes
        self.in_memory_bytes = in_memory_bytes

    async def fetch(self, did: str, cursor: int) -> Fetched:
        """Fetch ``did``'s repository; never raises for upstream problems (see :class:`Fetched`)."""
        out = Fetched(did=did, cursor=cursor, started=self._clock())
        try:
            async for attempt in AsyncRetrying(retry=retry_if_exception_type(_RetryFetchError),
                                               stop=stop_after_attempt(self.attempts), wait=self._wait,
                                               sleep=self._sleep, reraise=True):
                with attempt:
                    out.attempts += 1
                    await self._attempt(out)
        except _RetryFetchError as e:
            out.outcome, out.reason, out.payload = "failed", e.reason, e.payload
            out.detail = f"{e.detail} (gave up after {out.attempts} attempts)"
        out.fetch_seconds = self._clock() - out.started
        return out

    async def _attempt(self, out: Fetched) -> None:
        did = out.did
        try:
            identity = await self.resolver.resolve(did)
        except DidResolutionError as e:
            if e.reason in ("not_found", "tombstoned"):
                out.outcome, out.reason, out.detail = "not_found", e.reason, str(e)
                return
            if e.retryable:
                raise _RetryFetchError("retries_exhausted", str(e)) from e
            out.outcome, out.reason, out.detail = "failed", e.drop_reason, str(e)
            return
        out.identity = identity
        if identity.pds_endpoint is None:
            out.outcome, out.reason, out.detail = "failed", "invalid_record", f"the DID document of {did} names no PDS"
            return
        requested = int(self._wall() * 1_000_000)
        try:
            car = await self.pds.get_repo(identity.pds_endpoint, did, self.workdir)
        except RepoUnavailableError as e:
            out.outcome, out.reason, out.detail = e.outcome, e.error, e.detail
            return
        except PdsError as e:
            if e.retryable:
                # The PDS may have moved: resolve again on the next try.
                self.resolver.invalidate(did)
                raise _RetryFetchError(e.reason, e.detail, e.body) from e
            out.outcome, out.reason, out.detail, out.payload = "failed", e.reason, e.detail, e.body
            return
        out.path, out.size, out.observed_us = car.path, car.size, requested
        max_blocks = self.pds.limits.max_car_blocks
        opener: Callable[[Path], Car | CarFile] = \
            functools.partial(_read_small, max_blocks=max_blocks) if car.size <= self.in_memory_bytes else \
            functools.partial(open_car, max_bytes=self.max_car_bytes, verify=False, max_blocks=max_blocks)
        indexing: asyncio.Future[Car | CarFile] = asyncio.get_running_loop().run_in_executor(None, opener, car.path)
        try:
            out.car = await asyncio.shield(indexing)
        except asyncio.CancelledError:
            # The indexing thread cannot be interrupted: close what it opens once it finishes.
            indexing.add_done_callback(_close_indexed)
            raise
        except CarTooLargeError as e:
            # over a cap, whichever time it is fetched: dead-lettered at once, not fetched again
            out.outcome, out.reason, out.payload = "failed", e.reason, _head(car.path)
            out.detail = f"repository CAR of {did} from {identity.pds_endpoint}: {e}"
            car.path.unlink(missing_ok=True)
            out.path = None
            return
        except (AtprotoFormatError, OSError) as e:
            payload = _head(car.path)
            car.path.unlink(missing_ok=True)
            out.path = None
            reason = e.reason if isinstance(e, AtprotoFormatError) else "malformed_car"
            # A CAR cut short in transit looks like a malformed one: fetch it again before giving up.
            raise _RetryFetchError(reason, f"repository CAR of {did} from {identity.pds_endpoint}: {e}",
                                   payload) from e
        out.outcome = "ok"


def _read_small(path: Path, *, max_blocks: int | None = None) -> Car:
    """A small CAR read whole into memory (faster than block-by-block reads from disk)."""
    return read_car(path.read_bytes(), verify=False, max_blocks=max_blocks)


def _close_indexed(fut: asyncio.Future[Car | CarFile]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        car = fut.result()
        if isinstance(car, CarFile):
            car.close()


def _head(path: Path, size: int = DEAD_LETTER_PAYLOAD) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(size)
    except OSError:
        return b""


class RepoProcessor:
    """The CPU half of a DID: a fetched repository into items, and its :class:`RepoResult`.

    Args:
        flt: which records to produce.
        job: the job name put into events.
        verify: check the commit signature against the DID document's key.
        clock: monotonic seconds (durations).
    """

    def __init__(self, flt: RecordFilter, *, job: str, verify: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.flt = flt
        self.job = job
        self.verify = verify
        self._clock = clock

    def items(self, fetched: Fetched, result: RepoResult) -> Iterator[RecordEvent | Drop | Skip]:
        """Yield the repository's items and complete ``result`` when exhausted."""
        ident = fetched.identity
        result.pds = ident.pds_endpoint if ident is not None else None
        result.car_bytes = fetched.size
        result.attempts = fetched.attempts
        result.fetch_ms = int(fetched.fetch_seconds * 1000)
        try:
            if fetched.outcome == "ok":
                yield from self._decode(fetched, result)
            else:
                result.outcome, result.reason, result.detail = fetched.outcome, fetched.reason, fetched.detail
                if fetched.outcome == "failed":
                    yield self._failed_drop(fetched, fetched.reason or "retries_exhausted", fetched.detail or "",
                                            fetched.payload)
        finally:
            result.duration_ms = int((self._clock() - fetched.started) * 1000)

    def records_bound(self, fetched: Fetched) -> int:
        """At most how many records :meth:`items` yields for ``fetched``, known before any is produced.

        The repository is opened here (its commit read, its whole tree walked and checked, as
        :meth:`items` would first do, and only once): the bound is the number of entries of its tree.
        0 for a DID without a usable repository.
        """
        if fetched.outcome != "ok" or fetched.car is None:
            return 0
        opened = self._open(fetched)
        return opened.summary.entries if isinstance(opened, RepoDecoder) else 0

    def _open(self, fetched: Fetched) -> RepoDecoder | RepoDecodeError:
        if fetched.opened is None:
            assert fetched.car is not None
            key: str | None = None
            if self.verify:
                key = fetched.identity.signing_key if fetched.identity is not None else None
                if key is None:
                    fetched.opened = _NoSigningKeyError(
                        "bad_signature", f"--verify: the DID document of {fetched.did} has no #atproto signing key")
                    return fetched.opened
            try:
                fetched.opened = RepoDecoder(fetched.car, fetched.did, self.flt, job=self.job, cursor=fetched.cursor,
                                             signing_key=key, observed_us=fetched.observed_us)
            except RepoDecodeError as e:
                fetched.opened = e
        return fetched.opened

    def _decode(self, fetched: Fetched, result: RepoResult) -> Iterator[RecordEvent | Drop | Skip]:
        decoder = self._open(fetched)
        if isinstance(decoder, RepoDecodeError):
            e = decoder
            result.outcome, result.reason, result.detail = "failed", e.reason, e.detail
            payload = b"" if isinstance(e, _NoSigningKeyError) or not fetched.path else _head(fetched.path)
            yield self._failed_drop(fetched, e.reason, e.detail, payload)
            return
        s = decoder.summary
        result.rev, result.commit_cid = s.rev, s.commit_cid
        yield from decoder.items()
        result.outcome = "ok"
        result.records, result.record_bytes = s.records, s.record_bytes
        result.by_type, result.skipped = dict(s.by_type), dict(s.skipped)
        result.dropped, result.timestamps = dict(s.dropped), dict(s.timestamps)

    @staticmethod
    def _failed_drop(fetched: Fetched, reason: str, detail: str, payload: bytes) -> Drop:
        pds = fetched.identity.pds_endpoint if fetched.identity is not None else None
        return Drop(reason, f"repository {fetched.did}: {detail}", payload[:DEAD_LETTER_PAYLOAD],
                    f"repo:{pds or 'unresolved'}/{fetched.did}", did=fetched.did, cursor=fetched.cursor)


class _NoSigningKeyError(RepoDecodeError):
    """``--verify`` and the DID document names no key to check the commit against."""


def count_outcome(metrics: Metrics | None, result: RepoResult) -> None:
    """``repos_completed_total{outcome}``."""
    if metrics is not None:
        metrics.repos_done.inc(result.outcome)


def dids_fingerprint(dids: Sequence[str]) -> str:
    """A short hash of a DID list (a resume must see the same list)."""
    h = hashlib.blake2b(digest_size=8)
    for d in dids:
        h.update(d.encode())
        h.update(b"\n")
    return h.hexdigest()


class RepoPosition:
    """Which DIDs of a list job are done: a contiguous prefix of ordinals plus the done ones above it.

    ``cursor`` (the checkpoint's headline) is the prefix: every DID below it is done.
    """

    def __init__(self, total: int, fingerprint: str) -> None:
        self.total = total
        self.fingerprint = fingerprint
        self.prefix = 0
        self.above: set[int] = set()

    @property
    def cursor(self) -> int | None:
        """DIDs done without a gap from the start of the list."""
        return self.prefix

    def seen(self, event: Event) -> bool:
        """Never: the source itself skips DIDs that are done."""
        return False

    def advance(self, event: Event) -> None:
        """Nothing: a DID counts as done only once all its items were produced (:meth:`complete`)."""

    def is_done(self, ordinal: int) -> bool:
        """Whether the DID at ``ordinal`` is done."""
        return ordinal < self.prefix or ordinal in self.above

    def complete(self, ordinal: int) -> None:
        """Mark the DID at ``ordinal`` done."""
        if self.is_done(ordinal):
            raise FatalError(f"repo list position: DID #{ordinal} completed twice")
        self.above.add(ordinal)
        while self.prefix in self.above:
            self.above.discard(self.prefix)
            self.prefix += 1

    @property
    def done(self) -> int:
        """How many DIDs are done."""
        return self.prefix + len(self.above)

    def snapshot(self) -> dict[str, Any]:
        """JSON state for the job checkpoint."""
        return {"cursor": self.prefix, "done": sorted(self.above), "total": self.total,
                "dids": self.fingerprint}

    @classmethod
    def restore(cls, state: dict[str, Any] | None, total: int, fingerprint: str) -> RepoPosition:
        """Rebuild from :meth:`snapshot` output (None: a fresh position).

        Raises:
            FatalError: the checkpoint was taken over a different DID list.
        """
        pos = cls(total, fingerprint)
        if state:
            if state.get("dids") not in (None, fingerprint):
                raise FatalError("the job's checkpoint covers a different DID list; use a new --job name "
                                 "or the same list to resume")
            pos.prefix = int(state.get("cursor") or 0)
            pos.above = {int(x) for x in state.get("done", [])}
        return pos


class RepoSource:
    """Source of a list job: every DID of ``dids`` backfilled, in batches.

    Args:
        dids: the DIDs (their index is the events' cursor).
        fetcher: the network half.
        processor: the CPU half.
        position: which DIDs are done (restored on ``--resume``).
        concurrency: DIDs fetched at once.
        batch_size: DIDs per batch (0 = one batch); a batch finishes before the next starts, and
            memory is released between batches.
        on_done: called with each DID's result right after its items were produced (before the
            next item): the app produces the repo_status record there, in the same transaction.
        on_batch: called with (batch number, results of the batch) when a batch completes.
    """

    name = "repo"

    def __init__(self, dids: Sequence[str], fetcher: RepoFetcher, processor: RepoProcessor, *,
                 position: RepoPosition, concurrency: int = 32, batch_size: int = 0,
                 on_done: Callable[[RepoResult], None] | None = None,
                 on_batch: Callable[[int, list[RepoResult]], None] | None = None) -> None:
        self.dids = list(dids)
        self.fetcher = fetcher
        self.processor = processor
        self._position = position
        self.concurrency = max(1, concurrency)
        self.batch_size = batch_size if batch_size > 0 else max(1, len(self.dids))
        self.on_done = on_done
        self.on_batch = on_batch
        self._tasks: set[asyncio.Task[Fetched]] = set()
        self.results: list[RepoResult] = []

    @property
    def position(self) -> RepoPosition:
        """Which DIDs are done."""
        return self._position

    async def items(self) -> AsyncIterator[SourceItem]:
        """Yield every DID's items, batch by batch, then ``End("exhausted")``."""
        pos = self._position
        total = len(self.dids)
        for batch_no, start in enumerate(range(0, total, self.batch_size)):
            todo = [i for i in range(start, min(total, start + self.batch_size)) if not pos.is_done(i)]
            batch_results: list[RepoResult] = []
            async for fetched in self._fetch_all(todo):
                result = RepoResult(did=fetched.did, cursor=fetched.cursor, outcome="failed")
                try:
                    for item in self.processor.items(fetched, result):
                        yield item
                finally:
                    fetched.close()
                if self.on_done is not None:
                    self.on_done(result)
                pos.complete(fetched.cursor)
                batch_results.append(result)
                self.results.append(result)
            if self.on_batch is not None:
                self.on_batch(batch_no, batch_results)
            # Between batches: drop what the batch held (resolver cache, results' buffers, CARs).
            self.fetcher.resolver.clear_cache()
            gc.collect()
        yield End("exhausted")

    async def _fetch_all(self, ordinals: list[int]) -> AsyncIterator[Fetched]:
        """Fetch with at most ``concurrency`` in flight; yield each as it completes."""
        it = iter(ordinals)
        pending = self._tasks

        def launch() -> bool:
            i = next(it, None)
            if i is None:
                return False
            task = asyncio.ensure_future(self.fetcher.fetch(self.dids[i], i))
            pending.add(task)
            return True

        while len(pending) < self.concurrency and launch():
            pass
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                pending.discard(task)
                if len(pending) < self.concurrency:
                    launch()
            for task in done:
                yield task.result()

    async def aclose(self) -> None:
        """Cancel fetches in flight and delete their files."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                fetched = await t
                fetched.close()
        self._tasks.clear()

"""The Jetstream v2 source: the archive's sealed history through ``planSnapshot``, then the live tail.

The flow (``../shared/JETSTREAM-V2.md``, "History then live")::

    planSnapshot(afterSeq=C)            pin S = sealedTipSeq of the first page
    for each unit of each page:         getSegment (parallel Range stripes) or getBlock per block
        decode the blocks               producers.jetstream.archive: rows -> typed events, exact filter
        yield rows with C < seq <= S    in seq order (so per-DID order is the archive's)
    next page from plannedThroughSeq   until plannedThroughSeq >= S; a page that does not advance is fatal
    subscribeEvents(cursor=max(S, C)+1) drop seq <= what was delivered; CursorTooOld -> plan again

Every row comes out in seq order, history and live, so the position is one number per instance
(:mod:`producers.jetstream.replaypos`). ``-s`` is a witnessed time turned into a seq through
``listSegments``; rows witnessed before it are skipped exactly. ``-e`` (a time) ends the replay at the
first row witnessed at or after it (witnessed times grow with seq, so nothing later can be older). A
live frame carries only the row's display ``time``: its ``witnessed_at``, or an older imported
``indexed_at`` (the instance's server gives no other); the live tail compares that, and ends once the
wall clock is past the end and no row came for ``end_idle`` seconds, as v1's stream does.

A block that cannot be decoded is fetched once more by ``getBlock``; if it is still bad it becomes one
dead letter (its rows are not emitted) and the replay goes on. A ``#sync`` row is a
:class:`~runtime.contract.records.SyncEvent`, produced like the others.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from producers.jetstream.archive import ORIGIN, RowFilter, iter_block_chunks
from producers.jetstream.replaypos import ReplayPosition
from producers.jetstream.v2client import ArchiveClient, PlanPage, PlanUnit, SegmentChangedError
from producers.jetstream.v2live import CursorTooOldError, LiveTail
from producers.netsafety import status_class
from producers.source import Drop, End, Skip, SourceItem
from runtime.atproto.segment import Block, Segment, SegmentError, decode_block
from runtime.errors import SourceError
from runtime.process.metrics import ARCHIVE_ENDPOINTS, Metrics

log = logging.getLogger(__name__)

#: Units fetched ahead of the one being decoded (downloads overlap decoding).
PREFETCH: Final = 2
#: Plan/replay cycles after a ``CursorTooOld`` that may end without delivering anything new.
MAX_IDLE_REPLANS: Final = 3
#: ``getBlock`` requests in flight ahead of the block being decoded (a blocks unit).
BLOCKS_AHEAD: Final = 4
#: Rows decoded per chunk (bounded live objects; see ``iter_block_chunks``).
CHUNK_ROWS: Final = 512
#: Bytes of a bad block kept in its dead letter.
DEAD_LETTER_BYTES: Final = 64 * 1024


@dataclass
class ReplayOptions:
    """What one v2 replay reads.

    Attributes:
        instance: the instance's base URL (http(s) or ws(s)).
        collections, dids, kinds: the exact filter (empty: everything).
        end_us: stop at the first row witnessed at or after this time (None: no end; the live tail
            follows the history). A live frame carries only the row's display ``time`` (its
            ``witnessed_at``, or an imported older ``indexed_at``), so the live tail compares that.
        end_seq: stop after this seq (inclusive; rows above it are not delivered).
        live: follow the history with the live tail (when no ``end_us`` has been reached).
        verify: check each segment's checksum and recompute each record's CID from its payload.
        job: the job name carried by every event.
        api_key: the bearer key of the hosted service.
        compress: ask the live tail for dictionary-compressed frames.
        lateness_us: how far past ``end_us`` the wall clock must be before the idle end below.
        end_idle: with ``end_us`` passed by the wall clock (plus ``lateness_us``), end the live tail
            after this many seconds without a row (0 = never): a sparse filter, or a row whose imported
            time hid that it was past the end, may leave nothing more to come.
    """

    instance: str
    collections: Sequence[str] = ()
    dids: Sequence[str] = ()
    kinds: Sequence[str] = ()
    end_us: int | None = None
    end_seq: int | None = None
    live: bool = True
    verify: bool = False
    job: str = ""
    api_key: str | None = None
    compress: bool = False
    max_message_size: int = 0
    lateness_us: int = 1_000_000
    end_idle: float = 10.0


@dataclass
class ReplayStats:
    """What the replay did, beyond the events (for the closing statistics and tests)."""

    pages: int = 0
    units: int = 0
    blocks: int = 0
    refetched_blocks: int = 0
    bad_blocks: int = 0
    replans: int = 0
    live_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


class _EndReachedError(Exception):
    """The end time was reached inside a block."""


class ReplaySource:
    """A :class:`producers.source.Source` over a Jetstream v2 instance.

    Args:
        opts: what to read.
        position: where to continue (see :meth:`ReplayPosition.restore`).
        client: the archive client (made from ``opts`` when None; closed by :meth:`aclose` only then).
        live_factory: builds the live tail client (tests inject one); default :class:`LiveTail`.
        clock, wall: monotonic and wall-clock seconds (injected for tests).
    """

    name = "jetstream2"

    def __init__(self, opts: ReplayOptions, position: ReplayPosition, *, client: ArchiveClient | None = None,
                 live_factory: Callable[..., LiveTail] | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.opts = opts
        self._clock = clock
        self._wall = wall
        self._last_live = 0.0  # clock() when the live tail last began waiting for a row
        self._waiting = False  # the live tail is waiting for the server (not held by the job)
        self._idle_end = False
        self._position = position
        self._metrics = metrics
        self._own_client = client is None
        self.client = client or ArchiveClient(opts.instance, api_key=opts.api_key,
                                              on_request=self._on_request if metrics is not None else None)
        self._live_factory = live_factory or LiveTail
        self._live: LiveTail | None = None
        self.stats = ReplayStats()
        self._flt = RowFilter.of(collections=opts.collections, dids=opts.dids, kinds=opts.kinds)
        #: The collection patterns the server is asked for: none when they cover everything (``*``).
        self._server_collections: list[str] = [] if self._flt.collections is None else list(opts.collections)
        #: Rows with a seq at or below this were covered (delivered, filtered, or before the start).
        self._covered: int = -1
        self._start_witnessed: int | None = None
        self.on_reconnect: Callable[[], None] | None = None

    def _on_request(self, endpoint: str, status: int, _seconds: float, nbytes: int) -> None:
        m = self._metrics
        if m is None or endpoint not in ARCHIVE_ENDPOINTS:
            return
        m.archive_requests.inc(endpoint, status_class(status))
        if nbytes:
            m.archive_bytes.inc(endpoint, amount=nbytes)

    def _block(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.archive_blocks.inc(outcome)

    @property
    def position(self) -> ReplayPosition:
        """What was yielded so far."""
        return self._position

    async def aclose(self) -> None:
        """Close the live tail and (when this source made it) the archive client."""
        if self._live is not None:
            with contextlib.suppress(Exception):
                await self._live.aclose()
        if self._own_client:
            await self.client.aclose()

    # ------------------------------------------------------------------ the stream

    async def items(self) -> AsyncIterator[SourceItem]:
        """History, then (unless ended) the live tail; see the module docstring."""
        pos = self._position
        await self._resolve_start()
        idle_replans = 0
        while True:
            before = self._covered
            try:
                async for item in self._history():
                    yield item
            except _EndReachedError:
                yield End("end_cursor_reached")
                return
            if self.opts.end_seq is not None and self._covered >= self.opts.end_seq:
                yield End("end_cursor_reached")
                return
            if not self.opts.live:
                yield End("exhausted")
                return
            try:
                async for item in self._tail():
                    yield item
                return
            except _EndReachedError:
                yield End("end_cursor_reached")
                return
            except CursorTooOldError as e:
                self.stats.replans += 1
                idle_replans = idle_replans + 1 if self._covered <= before else 0
                if idle_replans > MAX_IDLE_REPLANS:
                    raise SourceError(f"{self.opts.instance}: the live tail refused cursor {self._covered + 1} as "
                                      f"too old {idle_replans} times without the archive advancing: {e}") from e
                log.info("live tail: %s; planning the archive again from seq %d", e, self._covered)
                pos.live = False

    async def _resolve_start(self) -> None:
        """Turn the position's start (a seq, a time, or nothing) into the covered seq."""
        pos = self._position
        after = pos.after
        if after is not None:
            self._covered = after
            if pos.seq is None and pos.start_time_us is not None:
                # resumed before anything was delivered: the start time still cuts the first rows
                self._start_witnessed = pos.start_time_us
            return
        if pos.start_time_us is not None:
            seq = await self.client.seq_at(pos.start_time_us)
            self._covered = seq - 1
            self._start_witnessed = pos.start_time_us
            pos.start_after = self._covered
            log.info("start time %d is seq %d on %s", pos.start_time_us, seq, self.opts.instance)
            return
        self._covered = 0

    async def _history(self) -> AsyncIterator[SourceItem]:
        """Every sealed row after the covered seq, page by page, unit by unit."""
        pos = self._position
        opts = self.opts
        page_after = self._covered
        tip: int | None = None
        if opts.end_seq is not None and opts.end_seq <= page_after:
            return
        while True:
            page = await self.client.plan_snapshot(after_seq=page_after, before_seq=tip or opts.end_seq,
                                                   kinds=opts.kinds, dids=opts.dids,
                                                   collections=self._server_collections)
            self.stats.pages += 1
            if tip is None:
                pos.sealed_tip = page.sealed_tip_seq
                # the plan stops at the sealed tip pinned now, or at the end seq when that comes first
                tip = page.sealed_tip_seq if opts.end_seq is None else min(page.sealed_tip_seq, opts.end_seq)
            pos.page_after = page_after
            async for item in self._page(page, tip):
                yield item
            through = page.planned_through_seq
            if through >= tip:
                self._covered = max(self._covered, tip)
                return
            if through <= page_after:
                raise SourceError(f"{opts.instance}: planSnapshot did not advance past seq {page_after} "
                                  f"(plannedThroughSeq {through}, sealed tip {tip})")
            page_after = through

    async def _page(self, page: PlanPage, tip: int) -> AsyncIterator[SourceItem]:
        """The page's units in plan order. Whole segments are fetched :data:`PREFETCH` units ahead (a
        large one into a temporary file, mapped: the heap holds one block's rows at a time); a blocks
        unit fetches its blocks just ahead of their decoding."""
        units = [u for u in page.units if u.max_seq > self._covered]
        # a finished unit's task is dropped (None): the segment it holds is freed (or unmapped) then
        tasks: list[asyncio.Task[Segment | Drop | None] | None] = []
        try:
            for i in range(min(PREFETCH + 1, len(units))):
                tasks.append(asyncio.ensure_future(self._prepare(units[i])))
            for i, unit in enumerate(units):
                task = tasks[i]
                assert task is not None
                prepared = await task
                tasks[i] = None
                nxt = i + PREFETCH + 1
                if nxt < len(units):
                    tasks.append(asyncio.ensure_future(self._prepare(units[nxt])))
                self.stats.units += 1
                blocks = self._segment_blocks(unit, prepared) if prepared is not None else self._unit_blocks(unit)
                async for block in blocks:
                    if isinstance(block, Drop):
                        yield block
                        continue
                    self.stats.blocks += 1
                    self._block("decoded")
                    for item in self._decode_block(block, tip):
                        if isinstance(item, End):
                            raise _EndReachedError
                        yield item
                    await asyncio.sleep(0)  # let the fetches and the job's ticker run
        finally:
            pending = [t for t in tasks if t is not None]
            for t in pending:
                if not t.done():
                    t.cancel()
            for t in pending:
                with contextlib.suppress(BaseException):
                    await t

    async def _prepare(self, unit: PlanUnit) -> Segment | Drop | None:
        """A whole segment unit fetched (or the drop it became); None for a blocks unit."""
        if unit.mode != "segment":
            return None
        return await self._whole(unit)

    async def _whole(self, unit: PlanUnit) -> Segment | Drop:
        fetched = await self.client.get_segment(unit.name, unit.checksum)
        try:
            seg = Segment(fetched.data)
            if self.opts.verify:
                seg.verify_checksum()
        except SegmentError as e:
            head = bytes(fetched.data[:DEAD_LETTER_BYTES])
            return Drop("malformed_frame", f"segment {unit.name}: {e}", head, ORIGIN, None, unit.min_seq)
        return seg

    async def _segment_blocks(self, unit: PlanUnit, seg: Segment | Drop) -> AsyncIterator[Block | Drop]:
        """The blocks of a whole segment not yet covered, decoded one at a time."""
        if isinstance(seg, Drop):
            yield seg
            return
        for info in seg.blocks:
            if info.count and info.max_seq <= self._covered:
                continue
            try:
                block: Block | Drop = seg.block(info.index)
            except SegmentError as e:
                block = await self._refetch(unit, info.index, e)
            yield block

    async def _unit_blocks(self, unit: PlanUnit) -> AsyncIterator[Block | Drop]:
        """A blocks unit's blocks by ``getBlock``, :data:`BLOCKS_AHEAD` requests ahead of the decoding.

        When the segment was rewritten since the plan (its block numbers no longer apply), the whole
        new version is read instead: rows already covered are skipped by seq, so nothing repeats.
        """
        indices = [i for first, last in unit.blocks for i in range(first, last + 1)]
        ahead: deque[tuple[int, asyncio.Task[bytes]]] = deque()
        pos = 0
        try:
            while pos < len(indices) or ahead:
                while pos < len(indices) and len(ahead) < BLOCKS_AHEAD:
                    index = indices[pos]
                    ahead.append((index, asyncio.ensure_future(
                        self.client.get_block(unit.name, index, expected_checksum=unit.checksum))))
                    pos += 1
                index, task = ahead.popleft()
                try:
                    frame = await task
                except SegmentChangedError as e:
                    log.info("%s: %s; reading its new version whole", unit.name, e)
                    async for whole in self._segment_blocks(unit, await self._whole(unit)):
                        yield whole
                    return
                try:
                    block: Block | Drop = decode_block(frame)
                except SegmentError as e:
                    block = await self._refetch(unit, index, e, frame)
                yield block
        finally:
            for _, task in ahead:
                task.cancel()
            for _, task in ahead:
                with contextlib.suppress(BaseException):
                    await task

    async def _refetch(self, unit: PlanUnit, index: int, first_error: SegmentError,
                       frame: bytes | None = None) -> Block | Drop:
        """One more try of a bad block through ``getBlock``; a drop when it is bad again."""
        self.stats.refetched_blocks += 1
        self._block("refetched")
        try:
            frame = await self.client.get_block(unit.name, index)
            return decode_block(frame)
        except SegmentError as e:
            self.stats.bad_blocks += 1
            self._block("dead_lettered")
            detail = f"segment {unit.name} block {index}: {first_error}; fetched again: {e}"
            return Drop("malformed_frame", detail, bytes(frame or b"")[:DEAD_LETTER_BYTES], ORIGIN, None, unit.min_seq)

    def _decode_block(self, block: Block, tip: int) -> Iterator[SourceItem]:
        n = len(block)
        if not n:
            return
        seqs = block.seq
        # rows already covered (a resume mid-block) and rows past the pinned tip
        start = bisect.bisect_right(seqs, self._covered)
        stop = bisect.bisect_right(seqs, tip)
        if start:
            self._skip("before_cursor", start)
        if self._start_witnessed is not None and start < stop:
            # -s: rows witnessed before the start time (witnessed_at grows with seq)
            w = block.witnessed_at
            first = bisect.bisect_left(w, self._start_witnessed, lo=start, hi=stop)
            if first > start:
                self._skip("before_start", first - start)
                start = first
            if first < stop:
                self._start_witnessed = None
        end_at: int | None = None
        if self.opts.end_us is not None and start < stop:
            w = block.witnessed_at
            cut = bisect.bisect_left(w, self.opts.end_us, lo=start, hi=stop)
            if cut < stop:
                end_at, stop = cut, cut
        if start < stop:
            yield from self._emit(block, start, stop)
        if end_at is not None:
            self._covered = seqs[end_at] - 1
            yield End("end_cursor_reached")
            return
        if stop < n:
            self._skip("after_end", n - stop)
        self._covered = max(self._covered, seqs[stop - 1] if stop else self._covered)

    def _emit(self, block: Block, start: int, stop: int) -> Iterator[SourceItem]:
        sub = Block(block.seq[start:stop], block.witnessed_at[start:stop], block.indexed_at[start:stop],
                    block.kind[start:stop], block.collection[start:stop], block.did[start:stop],
                    block.rkey[start:stop], block.rev[start:stop], block.payload[start:stop])
        for chunk in iter_block_chunks(sub, CHUNK_ROWS, job=self.opts.job, flt=self._flt, verify_cid=self.opts.verify):
            for reason, count in chunk.skipped.items():
                self._skip(reason, count)
                yield Skip(reason, count)
            if chunk.drops:
                # keep seq order between the events and the dead letters
                yield from _merge(chunk.items, chunk.drops)
            else:
                yield from chunk.items
            if chunk.last_seq is not None:
                self._covered = max(self._covered, chunk.last_seq)

    def _skip(self, reason: str, count: int) -> None:
        self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + count

    # ------------------------------------------------------------------ live

    async def _tail(self) -> AsyncIterator[SourceItem]:
        """The live rows after everything covered, until stopped or ``end_us``."""
        pos = self._position
        opts = self.opts
        pos.live = True
        live = self._live = self._live_factory(
            opts.instance, collections=self._server_collections, dids=list(opts.dids), kinds=list(opts.kinds),
            job=opts.job, api_key=opts.api_key, max_message_size=opts.max_message_size,
            dictionary=await self._dictionary() if opts.compress else None,
            refetch_dictionary=self._refetch_dictionary if opts.compress else None,
            on_reconnect=self.on_reconnect)
        watch = asyncio.ensure_future(self._idle_watch(live)) if opts.end_us is not None and opts.end_idle else None
        self._last_live = self._clock()
        self._waiting = True
        try:
            async for item in live.rows(self._covered):
                # idle only counts while waiting for the server: not while the job holds this generator
                self._waiting = False
                try:
                    if isinstance(item, (Drop, Skip, End)):
                        past = getattr(item, "seq", -1)
                        if opts.end_seq is not None and isinstance(item, Skip) and past > opts.end_seq:
                            raise _EndReachedError  # a filtered row past the end seq: nothing wanted can follow
                        yield item
                        continue
                    seq, event = item.seq, item.item
                    if seq <= self._covered:
                        continue
                    if opts.end_seq is not None and seq > opts.end_seq:
                        raise _EndReachedError
                    if opts.end_us is not None and _witnessed(event) >= opts.end_us:
                        raise _EndReachedError
                    self._covered = seq
                    self.stats.live_rows += 1
                    yield event
                finally:
                    self._last_live = self._clock()
                    self._waiting = True
        finally:
            if watch is not None:
                watch.cancel()
            self._live = None
            with contextlib.suppress(Exception):
                await live.aclose()
        if self._idle_end:
            log.info("no live row for %.0f s and the wall clock is past the end: done", opts.end_idle)
            raise _EndReachedError

    async def _idle_watch(self, live: LiveTail) -> None:
        """Close the live tail once the wall clock is past the end (by the lateness) and no row came for
        ``end_idle`` seconds; :meth:`_tail` then ends."""
        opts = self.opts
        assert opts.end_us is not None
        hard_end = opts.end_us + opts.lateness_us
        tick = max(0.05, opts.end_idle / 4)
        armed = False  # idle at the last tick too: rows a blocked event loop left unread came in between
        while True:
            await asyncio.sleep(tick)
            idle = (self._waiting and self._clock() - self._last_live >= opts.end_idle
                    and self._wall() * 1e6 >= hard_end)
            if idle and armed:
                self._idle_end = True
                await live.aclose()
                return
            armed = idle

    async def _dictionary(self) -> tuple[int, bytes]:
        return await self.client.get_dictionary()

    async def _refetch_dictionary(self) -> tuple[int, bytes]:
        return await self.client.get_dictionary()


def _witnessed(item: Any) -> int:
    w = getattr(item, "witnessed_at", None)
    return w if isinstance(w, int) and w > 0 else int(item.time_us)


def _merge(items: list[Any], drops: list[Drop]) -> Iterator[SourceItem]:
    """Events and drops of one chunk in seq order."""
    queue = sorted(drops, key=lambda d: d.cursor or 0)
    j = 0
    for item in items:
        while j < len(queue) and (queue[j].cursor or 0) < item.cursor:
            yield queue[j]
            j += 1
        yield item
    yield from queue[j:]

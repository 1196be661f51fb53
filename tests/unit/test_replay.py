"""The Jetstream v2 source (:mod:`producers.jetstream.replay`) against the v2 simulator on loopback, no
Kafka: exactly the wanted rows in seq order from any start (a seq mid-block, a time), through bad
blocks, changed ETags, pages that do not advance, and a ``CursorTooOld`` on the live tail."""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Iterator
from typing import Any

import pytest

from producers.jetstream.archive import RowFilter, decode_row
from producers.jetstream.replay import BLOCKS_AHEAD, ReplayOptions, ReplaySource
from producers.jetstream.replaypos import ReplayPosition
from producers.jetstream.v2client import ArchiveClient, PlanPage
from producers.jetstream.v2live import LiveRow
from producers.source import Drop, End, Skip
from runtime.errors import CursorRegressionError, SourceError
from runtime.process.metrics import Metrics
from runtime.simulator.jetstream2 import Faults, Jetstream2Simulator, build_simulator
from tests.jetstream2_support import served, without_faults

EVENTS = 900
TAIL = 60
LIKE = "app.bsky.feed.like"


@pytest.fixture(scope="module")
def shared() -> Iterator[Jetstream2Simulator]:
    yield from served(seed=12, accounts=12, events=EVENTS, tail=TAIL, rows_per_segment=200, rows_per_block=25,
                      plan_page_size=2)


@pytest.fixture
def sim(shared: Jetstream2Simulator) -> Iterator[Jetstream2Simulator]:
    yield from without_faults(shared)


def _expected(sim: Jetstream2Simulator, *, after: int = 0, start_us: int = 0, through: int | None = None,
              collections: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    flt = RowFilter.of(collections=collections)
    out = []
    for row in sim.rows:
        if row.seq <= after or row.witnessed_at < start_us or (through is not None and row.seq > through):
            continue
        if flt.wants(row):
            out.append((row.seq, type(decode_row(row)).__name__))
    return out


def _collect(source: ReplaySource, *, stop_at: int | None = None) -> tuple[list[Any], list[Any]]:
    """(events as (seq, class name), the other items) until the source ends or ``stop_at`` is delivered."""

    async def go() -> tuple[list[Any], list[Any]]:
        events: list[Any] = []
        other: list[Any] = []
        gen = source.items()
        try:
            async for item in gen:
                if isinstance(item, (Drop, Skip, End)):
                    other.append(item)
                    continue
                source.position.advance(item)
                events.append((item.cursor, type(item).__name__))
                if stop_at is not None and item.cursor >= stop_at:
                    break
        finally:
            await gen.aclose()
            await source.aclose()
        return events, other

    return asyncio.run(go())


def _source(sim: Jetstream2Simulator, position: ReplayPosition | None = None, **options: Any) -> ReplaySource:
    opts = ReplayOptions(instance=sim.url, **{"live": False, **options})
    return ReplaySource(opts, position or ReplayPosition(sim.url, start_after=0))


def test_the_whole_history_in_seq_order_then_exhausted(sim: Jetstream2Simulator) -> None:
    source = _source(sim)
    events, other = _collect(source)
    assert events == _expected(sim, through=sim.sealed_tip)
    assert isinstance(other[-1], End) and other[-1].reason == "exhausted"
    assert source.stats.pages >= 2 and source.position.cursor == events[-1][0]


def test_a_resume_mid_block_continues_after_its_seq_with_a_collection_filter(sim: Jetstream2Simulator) -> None:
    after = 437  # inside a block of the third segment
    source = _source(sim, ReplayPosition(sim.url, start_after=after), collections=[LIKE])
    events, _ = _collect(source)
    assert events == _expected(sim, after=after, through=sim.sealed_tip, collections=(LIKE,))
    assert events[0][0] > after


def test_a_start_time_is_exact_to_the_row(sim: Jetstream2Simulator) -> None:
    start = sim.rows[333].witnessed_at
    source = _source(sim, ReplayPosition(sim.url, start_time_us=start))
    events, _ = _collect(source)
    assert events == _expected(sim, start_us=start, through=sim.sealed_tip)


def test_a_corrupt_block_is_fetched_again_and_a_twice_bad_one_is_one_dead_letter(sim: Jetstream2Simulator) -> None:
    after = 410  # mid-segment: the first unit is served block by block (getBlock)
    sim.faults = Faults(corrupt_block_next=1)
    source = _source(sim, ReplayPosition(sim.url, start_after=after))
    events, _ = _collect(source)
    assert events == _expected(sim, after=after, through=sim.sealed_tip)
    assert source.stats.refetched_blocks == 1 and source.stats.bad_blocks == 0

    # the first BLOCKS_AHEAD answers (the blocks requested ahead) and the first block's second try
    sim.faults = Faults(corrupt_block_next=BLOCKS_AHEAD + 1)
    source = _source(sim, ReplayPosition(sim.url, start_after=after))
    events, other = _collect(source)
    drops = [d for d in other if isinstance(d, Drop)]
    assert len(drops) == 1 and drops[0].reason == "malformed_frame" and source.stats.bad_blocks == 1
    want = _expected(sim, after=after, through=sim.sealed_tip)
    assert set(events) < set(want)  # only the bad block's rows are missing, nothing else
    assert events == [e for e in want if e in set(events)]


def test_an_etag_change_mid_replay_restarts_the_segment_and_loses_nothing(sim: Jetstream2Simulator) -> None:
    sim.faults = Faults(etag_change_after=1)
    events, _ = _collect(_source(sim))
    assert events == _expected(sim, through=sim.sealed_tip)
    assert sim.faults.rewrites == 1


def test_a_plan_page_that_does_not_advance_stops_the_replay_loudly(sim: Jetstream2Simulator) -> None:
    sim.faults = Faults(stall_plan_next=1)
    with pytest.raises(SourceError, match="did not advance"):
        _collect(_source(sim))


def test_history_then_live_through_a_cursor_too_old_loses_and_repeats_nothing(sim: Jetstream2Simulator) -> None:
    sim.faults = Faults(cursor_too_old_next=1)
    last = sim.rows[-1].seq
    source = _source(sim, ReplayPosition(sim.url, start_after=700), live=True)
    events, _ = _collect(source, stop_at=last)
    assert events == _expected(sim, after=700, through=last)
    assert source.stats.replans == 1 and source.stats.live_rows > 0


def test_the_position_refuses_a_seq_that_goes_backwards() -> None:
    pos = ReplayPosition("http://x")
    event = decode_row(build_simulator(seed=1, accounts=2, events=5, tail=0, rows_per_segment=5,
                                       rows_per_block=5).rows[0])
    pos.advance(event)
    with pytest.raises(CursorRegressionError):
        pos.advance(event)


def test_a_checkpoint_of_another_instance_restarts_from_its_time_not_its_seq() -> None:
    pos = ReplayPosition("http://a", seq=500, witnessed_us=1_760_000_123_000_000)
    same = ReplayPosition.restore(pos.snapshot(), "http://a")
    assert same.after == 500 and same.start_time_us is None
    other = ReplayPosition.restore(pos.snapshot(), "http://b")
    assert other.after is None and other.start_time_us == 1_760_000_123_000_000
    fresh = ReplayPosition.restore({"protocol": "v1"}, "http://b", start_after=9)
    assert fresh.after == 9


def test_an_end_seq_in_the_archive_ends_there_and_one_in_the_tail_ends_there_live(sim: Jetstream2Simulator) -> None:
    source = _source(sim, ReplayPosition(sim.url, start_after=150), end_seq=522, live=True)
    events, other = _collect(source)
    assert events == _expected(sim, after=150, through=522)
    assert isinstance(other[-1], End) and other[-1].reason == "end_cursor_reached"
    assert source.stats.live_rows == 0

    end = sim.sealed_tip + TAIL // 2
    source = _source(sim, ReplayPosition(sim.url, start_after=800), end_seq=end, live=True)
    events, other = _collect(source)
    assert events == _expected(sim, after=800, through=end)
    assert isinstance(other[-1], End) and other[-1].reason == "end_cursor_reached"
    assert source.stats.live_rows > 0


def test_end_points_from_the_command_line() -> None:
    from producers.jetstream.app import end_point, v2_start

    assert end_point(None) == (None, None)
    assert end_point("4500") == (None, 4500)
    assert end_point("1760000000000000") == (1_760_000_000_000_000, None)
    assert end_point("2025-10-09")[0] == 1_759_968_000_000_000
    assert v2_start(1, None) == (0, None)  # --days -1: the archive's beginning
    assert v2_start(300, None) == (299, None)  # a seq cursor is inclusive
    assert v2_start(1_760_000_000_000_000, None) == (None, 1_760_000_000_000_000)
    assert v2_start(None, 1_700_000_000_000_000) == (None, 1_700_000_000_000_000)


def test_a_segment_rewritten_after_the_plan_is_read_whole_in_its_new_version(sim: Jetstream2Simulator) -> None:
    """getBlock's ETag names another version than the plan's: the block numbers no longer apply, so the
    unit is read whole (rows already covered skipped by seq): nothing lost, nothing twice."""
    after = 420

    class Rewriting(ArchiveClient):
        async def plan_snapshot(self, **kwargs: Any) -> PlanPage:
            page = await super().plan_snapshot(**kwargs)
            for unit in page.units:
                if unit.mode == "blocks":
                    sim.archive.rewrite(unit.name)
            return page

    async def go() -> list[int]:
        async with Rewriting(sim.url) as client:
            source = ReplaySource(ReplayOptions(instance=sim.url, live=False),
                                  ReplayPosition(sim.url, start_after=after), client=client)
            seqs = []
            async for item in source.items():
                if not isinstance(item, (Drop, Skip, End)):
                    source.position.advance(item)
                    seqs.append(item.cursor)
            return seqs

    assert asyncio.run(go()) == [seq for seq, _ in _expected(sim, after=after, through=sim.sealed_tip)]


def test_a_large_segment_is_spooled_to_a_mapped_file_with_the_same_bytes(sim: Jetstream2Simulator) -> None:
    seg = sim.archive.segments[1]

    async def go() -> tuple[bool, bytes]:
        async with ArchiveClient(sim.url, stripes=3, stripe_bytes=4096, spool_bytes=8192) as client:
            fetched = await client.get_segment(seg.name, seg.checksum)
            return isinstance(fetched.data, mmap.mmap), bytes(fetched.data[:])

    mapped, data = asyncio.run(go())
    assert mapped and len(data) > 8192
    assert data == bytes(seg.data)


def test_the_archive_is_measured(sim: Jetstream2Simulator) -> None:
    metrics = Metrics()
    sim.faults = Faults(corrupt_block_next=1)
    _collect(ReplaySource(ReplayOptions(instance=sim.url, live=False), ReplayPosition(sim.url, start_after=410),
                          metrics=metrics))
    value = metrics.registry.get_sample_value
    p = "atproto_backfill_jetstream2_archive"
    assert (value(f"{p}_requests_total", {"endpoint": "planSnapshot", "status": "2xx"}) or 0) >= 2
    assert (value(f"{p}_requests_total", {"endpoint": "getBlock", "status": "2xx"}) or 0) >= 2
    assert (value(f"{p}_received_bytes_total", {"endpoint": "getSegment"}) or 0) > 0
    assert value(f"{p}_blocks_total", {"outcome": "refetched"}) == 1
    assert (value(f"{p}_blocks_total", {"outcome": "decoded"}) or 0) > 10


def test_a_resume_before_anything_was_delivered_still_starts_at_the_start_time(sim: Jetstream2Simulator) -> None:
    start = sim.rows[333].witnessed_at
    first = ReplayPosition(sim.url, start_time_us=start)

    async def resolve() -> int | None:
        source = ReplaySource(ReplayOptions(instance=sim.url, live=False), first)
        try:
            await source._resolve_start()
        finally:
            await source.aclose()
        return first.start_after

    assert asyncio.run(resolve()) is not None  # the checkpoint now holds the seq the time became
    resumed = ReplayPosition.restore(first.snapshot(), sim.url)
    events, _ = _collect(_source(sim, resumed))
    assert events == _expected(sim, start_us=start, through=sim.sealed_tip)


@pytest.mark.timeout(30)
def test_an_end_time_past_the_last_live_row_ends_when_the_tail_goes_quiet(sim: Jetstream2Simulator) -> None:
    """-e after every row the instance has (the wall clock past it): every row is delivered, then the live
    tail ends after ``end_idle`` seconds without a row, as v1's does (a sparse filter, or a row whose
    imported time hid that it was past the end, may leave nothing more to come)."""
    end_us = sim.rows[-1].witnessed_at + 1
    source = _source(sim, ReplayPosition(sim.url, start_after=800), end_us=end_us, live=True, end_idle=0.2)
    events, other = _collect(source)
    assert events == _expected(sim, after=800)
    assert events[-1][0] == sim.rows[-1].seq and source.stats.live_rows > 0
    assert isinstance(other[-1], End) and other[-1].reason == "end_cursor_reached"


def test_the_live_tail_waits_while_the_wall_clock_has_not_passed_the_end(sim: Jetstream2Simulator) -> None:
    """The same end, but the wall clock still before it (by less than the lateness): the tail keeps waiting
    for rows, however long it is quiet."""
    end_us = sim.rows[-1].witnessed_at + 1
    opts = ReplayOptions(instance=sim.url, end_us=end_us, live=True, end_idle=0.05, lateness_us=1_000_000)
    source = ReplaySource(opts, ReplayPosition(sim.url, start_after=800), wall=lambda: end_us / 1e6 + 0.5)
    seen: list[int] = []

    async def go() -> None:
        gen = source.items()
        try:
            async for item in gen:
                if not isinstance(item, (Drop, Skip, End)):
                    seen.append(item.cursor)
                else:
                    assert not isinstance(item, End), item
        finally:
            await gen.aclose()
            await source.aclose()

    async def bounded() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(go(), 1.0)

    asyncio.run(bounded())
    assert seen and seen[-1] == sim.rows[-1].seq


@pytest.mark.timeout(30)
def test_idleness_counts_only_while_waiting_for_the_server_not_while_the_job_holds_a_row(
        sim: Jetstream2Simulator) -> None:
    """The job takes longer than ``end_idle`` over one row (a slow commit, back-pressure) while the server
    has not sent the next rows yet: the tail is not closed under it, and every row comes."""
    tail = [r for r in sim.rows if r.seq > sim.sealed_tip][:5]

    class SlowTail:
        """A live tail whose server sends a row 50 ms after the job asked for the next one."""

        def __init__(self, *_: Any, **__: Any) -> None:
            self.closed = False

        async def rows(self, after: int) -> Any:
            for row in tail:
                await asyncio.sleep(0.05)
                if self.closed:
                    return
                yield LiveRow(row.seq, decode_row(row))
            while not self.closed:  # then quiet, as a live server is, until closed
                await asyncio.sleep(0.01)

        async def aclose(self) -> None:
            self.closed = True

    end_us = tail[-1].witnessed_at + 1
    opts = ReplayOptions(instance=sim.url, end_us=end_us, live=True, end_idle=0.1)
    source = ReplaySource(opts, ReplayPosition(sim.url, start_after=sim.sealed_tip), live_factory=SlowTail)
    seen: list[int] = []
    ends: list[End] = []

    async def go() -> None:
        gen = source.items()
        try:
            async for item in gen:
                if isinstance(item, End):
                    ends.append(item)
                elif not isinstance(item, (Drop, Skip)):
                    if not seen:
                        await asyncio.sleep(0.6)  # six times end_idle, holding the generator
                    seen.append(item.cursor)
        finally:
            await gen.aclose()
            await source.aclose()

    asyncio.run(go())
    assert seen == [r.seq for r in tail]
    assert len(ends) == 1 and ends[0].reason == "end_cursor_reached"

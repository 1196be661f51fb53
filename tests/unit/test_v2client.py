"""The Jetstream v2 archive client against the project's v2 simulator (in-process, on loopback): listing,
seq_at, planning, striped segment downloads (and a segment rewritten mid-download), blocks, the dictionary,
retries (503, 429, 5xx, dropped bodies), errors, the API key and the probe.

Waits go to a recording fake ``sleep``, so no test waits for backoff time.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import orjson
import pytest

from producers.jetstream.v2client import (
    ArchiveAuthError,
    ArchiveClient,
    ArchiveError,
    ArchiveProtocolError,
    ArchiveUnavailableError,
    PlanPage,
    SegmentChangedError,
    normalize_base_url,
    parse_retry_after,
)
from runtime.atproto.segment import Segment
from runtime.errors import ConfigError, SourceError
from runtime.simulator.httpd import HttpServer, Request, Response
from runtime.simulator.jetstream2 import Faults, Jetstream2Simulator, build_simulator
from tests.jetstream2_support import START_US, served, without_faults

T = TypeVar("T")
EVENTS = 1200


def _options(**options: Any) -> dict[str, Any]:
    return {"seed": 5, "accounts": 15, "events": EVENTS, "tail": 30, "rows_per_segment": 300, "rows_per_block": 40,
            "start_us": START_US, **options}


def _sim(**options: Any) -> Jetstream2Simulator:
    return build_simulator(**_options(**options))


@pytest.fixture(scope="module")
def shared() -> Iterator[Jetstream2Simulator]:
    yield from served(**_options(plan_page_size=1))


@pytest.fixture
def sim(shared: Jetstream2Simulator) -> Iterator[Jetstream2Simulator]:
    """The shared simulator without faults (tests that rewrite segments use a fresh one)."""
    yield from without_faults(shared)


@pytest.fixture
def fresh() -> Iterator[Jetstream2Simulator]:
    sim = _sim().start_in_thread()
    yield sim
    sim.stop_thread()


class Sleeps:
    """A fake ``sleep`` that records the waits."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def run(url: str, body: Callable[[ArchiveClient], Awaitable[T]], sleeps: Sleeps | None = None, **options: Any) -> T:
    """Run ``body`` with a client of ``url`` in a new event loop."""

    async def go() -> T:
        async with ArchiveClient(url, sleep=sleeps or Sleeps(), rng=random.Random(3), **options) as client:
            return await body(client)

    return asyncio.run(go())


def mock(handler: Callable[[httpx.Request], httpx.Response], body: Callable[[ArchiveClient], Awaitable[T]],
         **options: Any) -> T:
    """Run ``body`` with a client whose HTTP answers come from ``handler``."""

    async def go() -> T:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            client = ArchiveClient("https://jetstream.example", client=http, sleep=Sleeps(), rng=random.Random(3),
                                   **options)
            return await body(client)

    return asyncio.run(go())


def _seg_requests(sim: Jetstream2Simulator, method: str) -> int:
    return sum(1 for _, target in sim.requests if f"jetstream.{method}?" in target)


# ------------------------------------------------------------------------------------- helpers


def test_base_url_and_retry_after() -> None:
    assert normalize_base_url("wss://js.example/xrpc/network.bsky.jetstream.subscribeEvents?cursor=5") == \
        "https://js.example"
    assert normalize_base_url("ws://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert normalize_base_url("https://host/prefix/") == "https://host/prefix"
    with pytest.raises(ConfigError):
        normalize_base_url("ftp://host")
    with pytest.raises(ConfigError):
        ArchiveClient("https://host", stripes=0)
    assert parse_retry_after("3", 0.0) == 3.0
    assert parse_retry_after("nan", 0.0) is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", 4.0) == pytest.approx(6.0)
    assert parse_retry_after("soon", 0.0) is None
    assert issubclass(ArchiveAuthError, ArchiveError) and issubclass(ArchiveError, SourceError)


# ------------------------------------------------------------------------------------- listing


def test_list_segments_pages(sim: Jetstream2Simulator) -> None:
    async def body(c: ArchiveClient) -> tuple[list[Any], list[Any], list[str | None]]:
        cursors: list[str | None] = []
        paged: list[Any] = []
        cursor = None
        while True:
            page, cursor = await c.list_segments(limit=1, cursor=cursor)
            assert len(page) == 1
            paged += page
            cursors.append(cursor)
            if cursor is None:
                break
        every = [s async for s in c.iter_segments(page_size=3)]
        return paged, every, cursors

    paged, every, cursors = run(sim.url, body)
    assert paged == every
    assert cursors[-1] is None and len(set(cursors)) == len(cursors)
    segs = sim.archive.segments
    assert [s.name for s in every] == [s.name for s in segs]
    for got, seg in zip(every, segs, strict=True):
        assert (got.index, got.size_bytes, got.checksum, got.event_count) == \
            (seg.index, len(seg.data), seg.checksum, seg.header.event_count)
        assert (got.min_seq, got.max_seq, got.min_witnessed_at, got.max_witnessed_at) == \
            (seg.min_seq, seg.max_seq, seg.header.min_witnessed_at, seg.header.max_witnessed_at)


def test_seq_at_boundaries(sim: Jetstream2Simulator) -> None:
    segs = sim.archive.segments
    h0, h1, last = segs[0].header, segs[1].header, segs[-1].header
    assert h0.max_witnessed_at + 1 < h1.min_witnessed_at  # a gap between two segments to probe
    cases = {
        h0.min_witnessed_at - 1_000_000: segs[0].min_seq,  # before the first segment
        h0.min_witnessed_at: segs[0].min_seq,
        h1.min_witnessed_at + 1: segs[1].min_seq,  # inside
        h1.max_witnessed_at: segs[1].min_seq,  # the last event of a segment
        h0.max_witnessed_at + 1: segs[1].min_seq,  # between two segments
        last.max_witnessed_at: segs[-1].min_seq,
        last.max_witnessed_at + 1: last.max_seq + 1,  # after the last sealed segment
    }

    async def body(c: ArchiveClient) -> dict[int, int]:
        return {t: await c.seq_at(t) for t in cases}

    assert run(sim.url, body) == cases
    # the contract: every seq below the answer was witnessed before t, every event at or after t is >= it
    rows = sim.rows[:EVENTS]
    for t, seq in cases.items():
        assert all(r.witnessed_at < t for r in rows if r.seq < seq)
        assert all(r.seq >= seq for r in rows if r.witnessed_at >= t)


# ------------------------------------------------------------------------------------ planning


def _plan_all(c: ArchiveClient, after: int | None, **filters: Any) -> Awaitable[list[PlanPage]]:
    async def go() -> list[PlanPage]:
        pages = [await c.plan_snapshot(after_seq=after, **filters)]
        tip = pages[0].sealed_tip_seq
        while pages[-1].planned_through_seq < tip:
            prev = pages[-1].planned_through_seq
            pages.append(await c.plan_snapshot(after_seq=prev, before_seq=tip, **filters))
            assert pages[-1].planned_through_seq > prev, "a page that does not advance"
        return pages

    return go()


@pytest.mark.parametrize("after", [None, 450])
def test_plan_snapshot_pages_cover_every_seq_once(sim: Jetstream2Simulator, after: int | None) -> None:
    pages = run(sim.url, lambda c: _plan_all(c, after))
    assert len(pages) == len(sim.archive.segments) - (1 if after else 0)  # one segment per page here
    assert pages[-1].planned_through_seq == pages[0].sealed_tip_seq == sim.sealed_tip
    covered: list[int] = []
    for page in pages:
        for unit in page.units:
            seg = sim.archive.get(unit.name)
            assert seg is not None and unit.checksum == seg.checksum and unit.index == seg.index
            if unit.mode == "segment":
                assert unit.blocks == ()
                covered += [r.seq for r in seg.rows]
            else:
                for first, last in unit.blocks:
                    for info in seg.blocks[first:last + 1]:
                        covered += range(info.min_seq, info.max_seq + 1) if info.count else []
    start = after or 0
    wanted = [s for s in covered if s > start]
    assert sorted(wanted) == list(range(start + 1, sim.sealed_tip + 1))  # every seq, once
    if after:
        assert pages[0].units[0].mode == "blocks"  # the segment cut by afterSeq comes as blocks


def test_plan_snapshot_body_omits_empty_fields() -> None:
    bodies: list[Any] = []

    def handler(req: httpx.Request) -> httpx.Response:
        bodies.append(orjson.loads(req.content))
        return httpx.Response(200, json={"segments": [
            {"name": "seg_0000000000.jss", "index": 0, "checksum": "00" * 8, "minSeq": 1, "maxSeq": 9,
             "mode": "blocks", "blocks": [{"first": 0, "last": 2}, {"first": 4, "last": 4}]}],
            "sealedTipSeq": 9, "plannedThroughSeq": 9, "stats": {}})

    async def body(c: ArchiveClient) -> PlanPage:
        await c.plan_snapshot()
        return await c.plan_snapshot(after_seq=0, before_seq=9, collections=("app.bsky.feed.post",))

    page = mock(handler, body)
    assert bodies == [{}, {"afterSeq": 0, "beforeSeq": 9, "collections": ["app.bsky.feed.post"]}]
    assert page.units[0].blocks == ((0, 2), (4, 4)) and page.planned_through_seq == 9


def test_plan_snapshot_invalid_request(sim: Jetstream2Simulator) -> None:
    with pytest.raises(ArchiveError) as info:
        run(sim.url, lambda c: c.plan_snapshot(kinds=["bogus"]))
    assert info.value.error == "InvalidRequest" and info.value.status == 400
    assert not isinstance(info.value, ArchiveAuthError)


# ------------------------------------------------------------------------------------ segments


@pytest.mark.parametrize(("stripes", "stripe_bytes"), [(3, 4096), (1, 10_000), (4, 1 << 20)])
def test_whole_segment_in_stripes(sim: Jetstream2Simulator, stripes: int, stripe_bytes: int) -> None:
    seg = sim.archive.segments[1]
    before = _seg_requests(sim, "getSegment")
    fetched = run(sim.url, lambda c: c.get_segment(seg.name, seg.checksum), stripes=stripes,
                  stripe_bytes=stripe_bytes)
    assert fetched.data == seg.data and fetched.checksum == seg.checksum and fetched.name == seg.name
    expected_requests = -(-len(seg.data) // stripe_bytes)
    assert _seg_requests(sim, "getSegment") - before == expected_requests
    assert list(Segment(fetched.data).rows()) == seg.rows


def test_segment_over_the_cap(sim: Jetstream2Simulator) -> None:
    seg = sim.archive.segments[0]
    with pytest.raises(ArchiveProtocolError, match="over the cap"):
        run(sim.url, lambda c: c.get_segment(seg.name, seg.checksum), stripe_bytes=4096,
            max_segment_bytes=len(seg.data) - 1)


def test_segment_rewritten_mid_download_restarts(fresh: Jetstream2Simulator) -> None:
    old = fresh.archive.segments[2]
    fresh.faults = Faults(etag_change_after=2)  # rewritten after the second stripe answered
    calls: list[tuple[str, int, float, int]] = []
    stripe = len(old.data) // 5
    fetched = run(fresh.url, lambda c: c.get_segment(old.name, old.checksum), stripes=2, stripe_bytes=stripe,
                  on_request=lambda *a: calls.append(a))
    new = fresh.archive.get(old.name)
    assert new is not None and new.checksum != old.checksum and fresh.faults.rewrites == 1
    statuses = [status for _, status, _, _ in calls]
    assert statuses[:2] == [206, 206] and 200 in statuses and 0 not in statuses  # If-Range failed: restart
    restart = len(statuses) - statuses[::-1].index(200)
    assert statuses[restart:] == [206] * -(-len(new.data) // stripe)  # the new version from scratch
    assert all(n == 0 for _, status, _, n in calls if status == 200)  # the 200s' bodies were not read
    assert fetched.checksum == new.checksum and fetched.data == new.data
    assert list(Segment(fetched.data).rows()) == old.rows  # the same events in another layout


def test_segment_expected_checksum_already_stale(fresh: Jetstream2Simulator) -> None:
    seg = fresh.archive.segments[0]
    fetched = run(fresh.url, lambda c: c.get_segment(seg.name, "0123456789abcdef"), stripe_bytes=8192)
    assert fetched.checksum == seg.checksum and fetched.data == seg.data


def test_segment_that_keeps_changing_gives_up(fresh: Jetstream2Simulator) -> None:
    seg = fresh.archive.segments[1]
    fresh.faults = Faults(etag_change_after=1, etag_change_times=1000)
    with pytest.raises(SegmentChangedError) as info:
        run(fresh.url, lambda c: c.get_segment(seg.name, seg.checksum), stripes=2, stripe_bytes=4096)
    assert info.value.retryable


def test_segment_not_found(sim: Jetstream2Simulator) -> None:
    with pytest.raises(ArchiveError) as info:
        run(sim.url, lambda c: c.get_segment("seg_00000000ff.jss", "00" * 8))
    assert info.value.error == "SegmentNotFound" and info.value.status == 404
    assert not isinstance(info.value, ArchiveUnavailableError | ArchiveAuthError)


# -------------------------------------------------------------------------------------- blocks


def test_get_block_is_the_stored_frame(sim: Jetstream2Simulator) -> None:
    seg = sim.archive.segments[2]
    parsed = Segment(seg.data)
    empty = [b.index for b in seg.blocks if b.count == 0]
    indices = sorted({0, 1, len(seg.blocks) - 1, *empty})

    async def body(c: ArchiveClient) -> list[bytes]:
        return [await c.get_block(seg.name, i, expected_checksum=seg.checksum) for i in indices]

    assert run(sim.url, body) == [bytes(parsed.frame(i)) for i in indices]
    with pytest.raises(SegmentChangedError):
        run(sim.url, lambda c: c.get_block(seg.name, 0, expected_checksum="0123456789abcdef"))
    with pytest.raises(ArchiveError) as info:
        run(sim.url, lambda c: c.get_block(seg.name, len(seg.blocks)))
    assert info.value.error == "BlockNotFound" and info.value.status == 404


def test_truncated_block_is_retried_and_reported(sim: Jetstream2Simulator) -> None:
    seg = sim.archive.segments[0]
    sim.faults.truncate_block_next = 1
    calls: list[tuple[str, int, float, int]] = []
    sleeps = Sleeps()
    frame = run(sim.url, lambda c: c.get_block(seg.name, 1), sleeps, on_request=lambda *a: calls.append(a))
    assert frame == bytes(Segment(seg.data).frame(1))
    assert len(sleeps.waits) == 1
    assert [(e, s) for e, s, _, _ in calls] == [("getBlock", 200), ("getBlock", 200)]
    assert calls[0][3] < len(frame) == calls[1][3]
    assert all(sec >= 0 for _, _, sec, _ in calls)


# ---------------------------------------------------------------------------------- dictionary


def test_dictionary_id_agrees(sim: Jetstream2Simulator) -> None:
    dict_id, data = run(sim.url, lambda c: c.get_dictionary())
    assert dict_id == sim.dictionary_id and data == sim.dictionary
    assert int.from_bytes(data[4:8], "little") == dict_id
    assert run(sim.url, lambda c: c.get_dictionary(dict_id)) == (dict_id, data)
    with pytest.raises(ArchiveError) as info:
        run(sim.url, lambda c: c.get_dictionary(dict_id + 1))
    assert info.value.error == "DictionaryNotFound" and info.value.status == 404


def test_dictionary_ids_that_disagree() -> None:
    blob = (0xEC30A437).to_bytes(4, "little") + (42).to_bytes(4, "little") + b"\0" * 64

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=blob, headers={"X-Zstd-Dictionary-Id": "43"})

    with pytest.raises(ArchiveProtocolError, match="43"):
        mock(handler, lambda c: c.get_dictionary())


# ------------------------------------------------------------------------------------- retries


def test_not_ready_then_ready(sim: Jetstream2Simulator) -> None:
    sim.faults.unready_requests = 2
    sleeps = Sleeps()
    page, _ = run(sim.url, lambda c: c.list_segments(limit=2), sleeps)
    assert len(page) == 2
    assert sleeps.waits == [1.0, 1.0]  # the simulator's Retry-After


def test_rate_limited_honours_retry_after(sim: Jetstream2Simulator) -> None:
    sim.faults.rate_limit_next = 2
    sim.faults.retry_after = 7
    sleeps = Sleeps()
    seg = sim.archive.segments[0]
    frame = run(sim.url, lambda c: c.get_block(seg.name, 0), sleeps)
    assert frame == bytes(Segment(seg.data).frame(0))
    assert sleeps.waits == [7.0, 7.0]
    sim.faults.rate_limit_next = 1
    sim.faults.retry_after = 600
    capped = Sleeps()
    run(sim.url, lambda c: c.list_segments(limit=1), capped, backoff_max=5.0)
    assert capped.waits == [5.0]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_back_off_with_jitter(sim: Jetstream2Simulator, status: int) -> None:
    sim.faults.error_next = 3
    sim.faults.error_status = status
    sleeps = Sleeps()
    pages = run(sim.url, lambda c: _plan_all(c, None), sleeps, backoff_base=0.5, backoff_max=1.5)
    assert pages[-1].planned_through_seq == sim.sealed_tip
    assert len(sleeps.waits) == 3
    for k, wait in enumerate(sleeps.waits, start=1):
        assert 0 <= wait <= min(1.5, 0.5 * 2 ** (k - 1))


def test_retries_run_out(sim: Jetstream2Simulator) -> None:
    sim.faults.error_next = 100
    sim.faults.error_status = 502
    sleeps = Sleeps()
    with pytest.raises(ArchiveUnavailableError) as info:
        run(sim.url, lambda c: c.list_segments(), sleeps, max_attempts=3)
    assert info.value.status == 502 and info.value.error == "InternalServerError" and info.value.retryable
    assert len(sleeps.waits) == 2


def test_connection_refused_retries_then_raises() -> None:
    async def go() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        sleeps = Sleeps()
        async with ArchiveClient(f"http://127.0.0.1:{port}", sleep=sleeps, max_attempts=2) as c:
            with pytest.raises(ArchiveUnavailableError) as info:
                await c.list_segments()
        assert info.value.status is None and len(sleeps.waits) == 1
        with pytest.raises(ArchiveUnavailableError):
            await ArchiveClient(f"http://127.0.0.1:{port}").probe()

    asyncio.run(go())


def test_malformed_answers() -> None:
    def not_json(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>hello</html>")

    with pytest.raises(ArchiveProtocolError):
        mock(not_json, lambda c: c.list_segments())

    def wrong_shape(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"segments": [{"name": "x", "index": "0"}]})

    with pytest.raises(ArchiveProtocolError, match="index"):
        mock(wrong_shape, lambda c: c.list_segments())

    def huge(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b" " * (16 * 1024 * 1024 + 1))

    with pytest.raises(ArchiveProtocolError, match="cap"):
        mock(huge, lambda c: c.list_segments())


# ---------------------------------------------------------------------------------- auth, probe


def test_api_key(fresh: Jetstream2Simulator) -> None:
    fresh.api_key = "sekrit"
    seg = fresh.archive.segments[0]
    with pytest.raises(ArchiveAuthError) as info:
        run(fresh.url, lambda c: c.get_segment(seg.name, seg.checksum))
    assert info.value.status == 401 and info.value.error == "AuthenticationRequired"
    with pytest.raises(ArchiveAuthError):
        run(fresh.url, lambda c: c.plan_snapshot(), api_key="wrong")
    got = run(fresh.url, lambda c: c.get_segment(seg.name, seg.checksum), api_key="sekrit", stripe_bytes=8192)
    assert got.data == seg.data
    page = run(fresh.url, lambda c: c.plan_snapshot(), api_key="sekrit")
    assert page.units
    assert run(fresh.url, lambda c: c.get_block(seg.name, 0), api_key="sekrit") == bytes(Segment(seg.data).frame(0))


def test_probe(sim: Jetstream2Simulator) -> None:
    assert run(sim.url, lambda c: c.probe()) is True
    sim.faults.unready_requests = 1
    assert run(sim.url.replace("http://", "ws://"), lambda c: c.probe()) is True  # 503 NotReady is still v2

    async def plain(req: Request) -> Response:
        if req.path == "/":
            return Response(200, b"<html>a v1 jetstream</html>", content_type="text/html")
        return Response(404, b"404 page not found", content_type="text/plain")

    async def go() -> tuple[bool, bool]:
        server = HttpServer(plain, "127.0.0.1", 0, name="plain")
        await server.start()
        try:
            async with ArchiveClient(server.url) as c:
                not_found = await c.probe()

            def html(req: httpx.Request) -> httpx.Response:
                return httpx.Response(200, content=b"<html>hi</html>", headers={"content-type": "text/html"})

            async with httpx.AsyncClient(transport=httpx.MockTransport(html)) as http:
                not_xrpc = await ArchiveClient("https://x.example", client=http).probe()
            return not_found, not_xrpc
        finally:
            await server.stop()

    assert asyncio.run(go()) == (False, False)

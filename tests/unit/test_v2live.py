"""The Jetstream v2 live tail: pure frame decoding (the same events as the archive decoder makes of the same
rows) and the client against the in-process simulator (cursors, filters, reconnects, compression, refusals)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import zstandard

from producers.jetstream.archive import RowFilter, decode_row
from producers.jetstream.decode import MAX_DECOMPRESSED, Decompressor
from producers.jetstream.v2live import (
    CursorTooOldError,
    ErrorFrame,
    Info,
    LiveRequestError,
    LiveRow,
    LiveTail,
    RowSkip,
    UnknownFrame,
    decode_frame,
    dictionary_id,
    subscribe_url,
)
from producers.source import Drop, Skip
from runtime.atproto.segment import KIND_DELETE, Row
from runtime.contract.records import AccountEvent, IdentityEvent, RecordEvent, SyncEvent
from runtime.errors import DROP_REASONS, ConfigError
from runtime.simulator.jetstream2 import (
    NSID_PREFIX,
    Faults,
    Jetstream2Simulator,
    RowFactory,
    build_simulator,
    row_frame,
    row_payload_json,
    train_dictionary,
)

ALL = RowFilter()
COMMIT_TYPE = f"{NSID_PREFIX}subscribeEvents#commit"


@functools.cache
def _rows() -> tuple[Row, ...]:
    return tuple(RowFactory(seed=5, accounts=8, marker_rate=0.1).rows(600))


@functools.cache
def _dictionary() -> bytes:
    return train_dictionary(_rows())


def _compress(text: str | bytes, dictionary: bytes | None = None) -> bytes:
    cctx = zstandard.ZstdCompressor(dict_data=zstandard.ZstdCompressionDict(dictionary or _dictionary()))
    return cctx.compress(text.encode() if isinstance(text, str) else text)


def _expected(row: Row, job: str = "") -> Any:
    """What the archive decoder makes of ``row``, with the times a frame cannot tell apart left unknown."""
    item = decode_row(row, job=job)
    for name in ("witnessed_at", "indexed_at"):
        if hasattr(item, name):
            setattr(item, name, None)
    return item


def _message(payload: dict[str, Any]) -> str:
    return orjson.dumps({"$type": "message", "payload": payload}).decode()


def _decode(data: bytes | str, **kw: Any) -> Any:
    kw.setdefault("decompressor", None)
    kw.setdefault("flt", ALL)
    return decode_frame(data, job="j", **kw)


# -------------------------------------------------------------------------------- pure decoding


@pytest.mark.parametrize("compressed", [False, True])
def test_every_row_decodes_as_the_archive_decodes_it(compressed: bool) -> None:
    dec = Decompressor(_dictionary()) if compressed else None
    kinds: Counter[str] = Counter()
    for row in _rows():
        text = row_frame(row)
        frame = decode_frame(_compress(text) if compressed else text, decompressor=dec, job="j", flt=ALL)
        assert type(frame) is LiveRow, (row, frame)
        assert frame.seq == row.seq
        assert frame.item == _expected(row, "j")
        assert frame.item.cursor == row.seq
        assert frame.item.time_us == (row.indexed_at or row.witnessed_at)
        assert frame.item.job == "j"
        item = frame.item
        kinds[type(item).__name__ + (f":{item.operation}" if isinstance(item, RecordEvent) else "")] += 1
    assert set(kinds) == {"RecordEvent:create", "RecordEvent:update", "RecordEvent:delete", "IdentityEvent",
                          "AccountEvent", "SyncEvent"}, kinds


def test_commit_frames_create_update_delete() -> None:
    rows = _rows()
    create = next(r for r in rows if r.kind == 1)
    update = next(r for r in rows if r.kind == 2)
    delete = next(r for r in rows if r.kind == KIND_DELETE)
    resync = next(r for r in rows if r.kind == 7)
    for row, op in ((create, "create"), (update, "update"), (delete, "delete"), (resync, "create")):
        ev = _decode(row_frame(row)).item
        assert isinstance(ev, RecordEvent)
        assert (ev.did, ev.collection, ev.rkey, ev.operation, ev.rev) == (row.did, row.collection, row.rkey, op,
                                                                           row.rev)
        ref = decode_row(row)
        assert isinstance(ref, RecordEvent) and ev.source == ref.source == "jetstream2"
        assert ev.witnessed_at is None and ev.indexed_at is None
        if op == "delete":
            assert ev.record is None and ev.cid is None
        else:
            payload = row_payload_json(row)
            assert ev.record == payload["record"] and ev.cid == payload["cid"]


def test_identity_account_and_sync_frames() -> None:
    rows = _rows()
    for kind, cls in ((4, IdentityEvent), (5, AccountEvent), (6, SyncEvent)):
        row = next(r for r in rows if r.kind == kind)
        item = _decode(row_frame(row)).item
        assert isinstance(item, cls)
        assert item == _expected(row, "j")
        assert item.did == row.did and item.cursor == row.seq and item.time_us == row.witnessed_at
        if isinstance(item, SyncEvent):
            assert item.rev


def test_info_unknown_and_error_frames() -> None:
    info = _message({"$type": f"{NSID_PREFIX}subscribeEvents#info", "name": "OutdatedCursor",
                     "message": "cursor clamped"})
    assert _decode(info) == Info("OutdatedCursor", "cursor clamped")
    assert _decode(_message({"$type": f"{NSID_PREFIX}subscribeEvents#info", "name": "X"})) == Info("X", None)
    assert _decode(_message({"$type": f"{NSID_PREFIX}subscribeEvents#hint", "seq": 9})) == \
        UnknownFrame(f"{NSID_PREFIX}subscribeEvents#hint")
    assert _decode(_message({"$type": "com.example.other#commit", "seq": 9})) == \
        UnknownFrame("com.example.other#commit")
    assert _decode(orjson.dumps({"$type": "heartbeat"}).decode()) == UnknownFrame("heartbeat")
    for name in ("ConsumerTooSlow", "InternalError"):
        text = orjson.dumps({"$type": "error", "error": name, "message": "reconnect with cursor=3"}).decode()
        assert _decode(text) == ErrorFrame(name, "reconnect with cursor=3")
        compressed = _decode(_compress(text), decompressor=Decompressor(_dictionary()))
        assert compressed == ErrorFrame(name, "reconnect with cursor=3")
    assert _decode('{"$type":"error"}') == ErrorFrame("Unknown", None)


def _drop(data: bytes | str, reason: str, **kw: Any) -> Drop:
    frame = _decode(data, **kw)
    assert type(frame) is Drop, frame
    assert frame.reason == reason and reason in DROP_REASONS, frame
    assert frame.origin == "jetstream2"
    return frame


def test_bad_frames_are_drops() -> None:
    row = next(r for r in _rows() if r.kind == 1)
    good = row_payload_json(row)
    _drop("{not json", "malformed_json")
    _drop("[1, 2]", "malformed_frame")
    _drop('{"$type":"message"}', "malformed_frame")
    _drop(_message({"seq": 1}), "malformed_frame")
    _drop(_message({**good, "seq": "7"}), "malformed_frame")
    _drop(_message({**good, "seq": -1}), "malformed_frame")
    d = _drop(_message({**good, "time": "yesterday"}), "malformed_frame")
    assert d.cursor == row.seq and d.did == row.did  # the seq is known: the tail steps past it
    assert d.payload == _message({**good, "time": "yesterday"}).encode()
    _drop(_message({**good, "did": "alice"}), "invalid_record")
    _drop(_message({**good, "did": 7}), "malformed_frame")
    _drop(_message({**good, "collection": "not an nsid"}), "invalid_record")
    _drop(_message({**good, "rkey": ""}), "invalid_record")
    _drop(_message({**good, "operation": "upsert"}), "malformed_frame")
    _drop(_message({**good, "rev": 5}), "malformed_frame")
    _drop(_message({k: v for k, v in good.items() if k != "record"}), "missing_block")
    _drop(_message({**good, "record": [1]}), "invalid_record")
    _drop(_message({**good, "cid": "not-a-cid"}), "bad_cid")
    _drop(_message({k: v for k, v in good.items() if k != "cid"}), "bad_cid")
    marker = next(r for r in _rows() if r.kind == 5)
    body = row_payload_json(marker)
    _drop(_message({**body, "account": "x"}), "malformed_frame")
    _drop(_message({**body, "account": {**body["account"], "active": "yes"}}), "malformed_frame")
    _drop(_message({**body, "account": {**body["account"], "did": "did:plc:someoneelse"}}), "invalid_record")


def test_oversize_and_undecodable_binary_frames_are_drops() -> None:
    text = row_frame(_rows()[0])
    _drop(text, "oversize", max_size=len(text) - 1)
    assert type(_decode(text, max_size=len(text))) is LiveRow
    dec = Decompressor(_dictionary())
    _drop(_compress(text), "oversize", decompressor=dec, max_size=len(text) - 1)
    bomb = _compress(b" " * (MAX_DECOMPRESSED + 1))
    assert len(bomb) < 10_000
    _drop(bomb, "oversize", decompressor=dec)
    _drop(_compress(text), "decompress_failed")  # binary, no dictionary asked for
    _drop(b"\x00\x01garbage", "decompress_failed", decompressor=dec)
    other = train_dictionary(RowFactory(seed=77, accounts=5).rows(400), dict_id=4242)
    _drop(_compress(text, other), "decompress_failed", decompressor=dec)


def test_filters_are_exact_and_give_the_row_seq() -> None:
    rows = _rows()
    did = rows[0].did
    cases = [
        RowFilter.of(collections=["app.bsky.feed.*"]),
        RowFilter.of(collections=["app.bsky.graph.follow"]),
        RowFilter.of(dids=[did]),
        RowFilter.of(kinds=["identity", "sync"]),
        RowFilter.of(kinds=["commit"], collections=["app.bsky.feed.like"], dids=[did, rows[5].did]),
        RowFilter.of(after_seq=100, before_seq=200),
    ]
    for flt in cases:
        kept = 0
        for row in rows:
            frame = decode_frame(row_frame(row), decompressor=None, job="", flt=flt)
            if flt.wants(row):
                kept += 1
                assert type(frame) is LiveRow and frame.item == _expected(row)
            else:
                assert type(frame) is RowSkip and isinstance(frame, Skip) and frame.seq == row.seq
                expected = "before_cursor" if row.seq <= flt.after_seq else (
                    "after_end" if flt.before_seq is not None and row.seq > flt.before_seq else "filtered")
                assert frame.reason == expected
        assert 0 < kept < len(rows), flt
    markers = [r for r in rows if r.kind in (4, 5, 6)]
    flt = RowFilter.of(collections=["app.bsky.feed.post"])
    assert all(type(decode_frame(row_frame(r), decompressor=None, flt=flt)) is LiveRow for r in markers)


# ------------------------------------------------------------------------------------ URL, query


def test_subscribe_url_and_query() -> None:
    path = "/xrpc/network.bsky.jetstream.subscribeEvents"
    assert subscribe_url("http://127.0.0.1:8080") == "ws://127.0.0.1:8080" + path
    assert subscribe_url("https://js.example/") == "wss://js.example" + path
    assert subscribe_url("wss://js.example" + path) == "wss://js.example" + path
    assert subscribe_url("ws://h/base") == "ws://h/base" + path
    for bad in ("ftp://x", "js.example", "http://"):
        with pytest.raises(ConfigError):
            subscribe_url(bad)
    tail = LiveTail("http://h", collections=["app.bsky.feed.*", "app.bsky.graph.follow"], dids=["did:plc:a"],
                    kinds=["commit", "account"], max_message_size=5000, dictionary=_dictionary())
    from urllib.parse import parse_qs
    q = parse_qs(tail.query(42))
    assert q == {"cursor": ["42"], "kinds": ["account", "commit"],
                 "collections": ["app.bsky.feed.*", "app.bsky.graph.follow"], "dids": ["did:plc:a"],
                 "maxMessageSizeBytes": ["5000"], "zstdDictionary": [str(dictionary_id(_dictionary()))]}
    assert "cursor" not in parse_qs(LiveTail("http://h").query(None))
    # collections constrain commits only: the server refuses them with kinds that exclude commit
    assert "collections" not in parse_qs(LiveTail("http://h", collections=["a.b.c"], kinds=["sync"]).query(1))
    # too many DIDs for a URL: filtered here only
    many = [f"did:plc:{i:024d}" for i in range(500)]
    wide = LiveTail("http://h", dids=many, collections=["app.bsky.feed.post"])
    q = parse_qs(wide.query(1))
    assert "dids" not in q and q["collections"] == ["app.bsky.feed.post"]
    assert wide.flt.dids == frozenset(many)
    flt = RowFilter.of(kinds=["identity"])
    assert LiveTail("http://h", flt=flt, collections=["x.y.z"]).flt is flt
    assert LiveTail("http://h", dictionary=(7, _dictionary())).query(None).endswith("zstdDictionary=7")
    with pytest.raises(ConfigError):
        LiveTail("http://h", dictionary=b"not a dictionary")


def test_backoff_doubles_from_250_ms_to_30_s_with_jitter() -> None:
    tail = LiveTail("http://h", rng=random.Random(1))
    for attempt in range(12):
        ceiling = min(30.0, 0.25 * 2 ** attempt)
        delays = [tail._backoff(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
    assert tail._backoff(100) <= 30.0


# ------------------------------------------------------------------------------ against the simulator


def _sim(**options: Any) -> Jetstream2Simulator:
    return build_simulator(seed=21, accounts=10, events=300, tail=60, rows_per_segment=100, rows_per_block=32,
                           **options)


class _Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


async def _take(tail: LiveTail, after: int | None, n: int, *, on_first: Callable[[], None] | None = None,
                timeout: float = 30.0) -> tuple[list[LiveRow], list[Any]]:
    """The first ``n`` rows of ``tail.rows(after)`` and everything else it yielded meanwhile."""
    rows: list[LiveRow] = []
    other: list[Any] = []

    async def run() -> None:
        async with contextlib.aclosing(tail.rows(after)) as stream:
            async for item in stream:
                if isinstance(item, LiveRow):
                    rows.append(item)
                    if len(rows) == 1 and on_first is not None:
                        on_first()
                    if len(rows) >= n:
                        return
                else:
                    other.append(item)

    try:
        await asyncio.wait_for(run(), timeout)
    finally:
        await tail.aclose()
    return rows, other


def _check(rows: list[LiveRow], expected: list[Row]) -> None:
    assert [r.seq for r in rows] == [r.seq for r in expected]
    assert [r.item for r in rows] == [_expected(r) for r in expected]


def test_tail_from_a_cursor_then_live_rows() -> None:
    async def main() -> None:
        async with _sim() as sim:
            last = sim.rows[-1]
            factory = RowFactory(seed=99, accounts=4, first_seq=last.seq + 1, start_us=last.witnessed_at + 1)
            new = factory.rows(25)
            tail = LiveTail(sim.url, sleep=_Sleeps())
            start = 250  # sealed history and the unsealed tail, then live rows
            n = len(sim.rows) - start + 1 + len(new)
            rows, other = await _take(tail, start - 1, n, on_first=lambda: sim.append_live(new))
            _check(rows, [r for r in sim.rows if r.seq >= start])
            assert other == []
            assert sim.ws_requests[-1]["cursor"] == [str(start)]
            assert tail.connects == 1 and tail.reconnects == 0 and tail.last_seq == new[-1].seq

    asyncio.run(main())


def test_filters_against_the_simulator() -> None:
    async def main() -> None:
        async with _sim() as sim:
            did = sim.rows[3].did
            for kw in ({"collections": ["app.bsky.feed.*"]}, {"dids": [did, sim.rows[9].did]},
                       {"kinds": ["identity", "account", "sync"]},
                       {"collections": ["app.bsky.graph.follow"], "kinds": ["commit"]}):
                tail = LiveTail(sim.url, sleep=_Sleeps(), **kw)  # type: ignore[arg-type]
                expected = [r for r in sim.rows if tail.flt.wants(r) and r.seq > 10]
                assert 0 < len(expected) < len(sim.rows) - 10, kw
                rows, other = await _take(tail, 10, len(expected))
                _check(rows, expected)
                assert other == []  # the server filtered the same rows
                for key, values in kw.items():
                    assert sorted(sim.ws_requests[-1][key]) == sorted(values)
            # a filter the server cannot take (too many DIDs for the URL) is applied here, exactly
            dids = [did] + [f"did:plc:{i:024d}" for i in range(400)]
            tail = LiveTail(sim.url, dids=dids, sleep=_Sleeps())
            expected = [r for r in sim.rows if r.did == did and r.seq > 100]
            rows, other = await _take(tail, 100, len(expected))
            _check(rows, expected)
            assert "dids" not in sim.ws_requests[-1]
            assert other and all(type(o) is RowSkip and o.reason == "filtered" for o in other)

    asyncio.run(main())


@pytest.mark.parametrize("fault", [
    Faults(drop_after_frames=37),
    Faults(drop_after_frames=11, drop_times=3),
    Faults(error_frame_after=23, error_frame="ConsumerTooSlow"),
    Faults(error_frame_after=17, error_frame="InternalError", error_frame_times=2),
], ids=["drop", "drop-3", "too-slow", "internal-2"])
def test_reconnects_without_duplicates_or_gaps(fault: Faults) -> None:
    async def main() -> None:
        async with _sim(faults=fault) as sim:
            sleeps = _Sleeps()
            reconnects: list[int] = []
            tail = LiveTail(sim.url, sleep=sleeps, on_reconnect=lambda: reconnects.append(1))
            rows, _ = await _take(tail, 99, len(sim.rows) - 99)
            _check(rows, list(sim.rows[99:]))
            times = fault.drop_times if fault.drop_after_frames else fault.error_frame_times
            assert tail.reconnects == len(reconnects) == times
            assert len(sleeps.delays) == times
            assert all(0.125 <= d <= 0.25 for d in sleeps.delays)  # progress in between: the backoff restarts
            cursors = [int(q["cursor"][0]) for q in sim.ws_requests]
            delivered = {r.seq for r in rows}
            assert len(cursors) == times + 1 and cursors[0] == 100
            assert all(c - 1 in delivered for c in cursors[1:])  # resumed right after the last row delivered
            if fault.error_frame_after:
                assert tail.error_frames == Counter({fault.error_frame: times})

    asyncio.run(main())


def test_at_least_once_redelivery_is_dropped_by_seq() -> None:
    """A server that resumes earlier than asked (at-least-once) repeats rows: they are skipped."""
    async def main() -> None:
        async with _sim(faults=Faults(drop_after_frames=30, drop_times=2)) as sim:
            def rewind(url: str, **kw: Any) -> Any:
                head, _, cursor = url.partition("cursor=")
                value, sep, rest = cursor.partition("&")
                url = f"{head}cursor={max(1, int(value) - 8)}{sep}{rest}"
                from websockets.asyncio.client import connect
                return connect(url, **kw)

            tail = LiveTail(sim.url, sleep=_Sleeps(), connector=rewind)
            rows, other = await _take(tail, 199, len(sim.rows) - 199)
            _check(rows, list(sim.rows[199:]))
            assert tail.reconnects == 2
            dups = [o for o in other if type(o) is RowSkip]
            assert len(dups) == 3 * 8 and {o.reason for o in dups} == {"duplicate"}  # 8 on each connection

    asyncio.run(main())


def test_compressed_frames_with_the_dictionary() -> None:
    async def main() -> None:
        async with _sim() as sim:
            tail = LiveTail(sim.url, dictionary=sim.dictionary, sleep=_Sleeps(),
                            collections=["app.bsky.feed.post", "app.bsky.feed.like"])
            assert tail.compressed
            expected = [r for r in sim.rows if tail.flt.wants(r) and r.seq > 50]
            rows, other = await _take(tail, 50, len(expected))
            _check(rows, expected)
            assert other == []
            assert sim.ws_requests[-1]["zstdDictionary"] == [str(sim.dictionary_id)]

    asyncio.run(main())


def test_cursor_too_old_raises_with_the_floor() -> None:
    async def main() -> None:
        async with _sim(cursor_floor=120) as sim:
            tail = LiveTail(sim.url, sleep=_Sleeps())
            with pytest.raises(CursorTooOldError) as err:
                await _take(tail, 50, 1)
            assert err.value.cursor == 51 and err.value.floor == 120
            rows, _ = await _take(LiveTail(sim.url, sleep=_Sleeps()), 119, 3)
            assert [r.seq for r in rows] == [120, 121, 122]
            sim.faults.cursor_too_old_next = 1
            with pytest.raises(CursorTooOldError):
                await _take(LiveTail(sim.url, sleep=_Sleeps()), 200, 1)

    asyncio.run(main())


def test_unknown_dictionary_refetch_once_then_uncompressed() -> None:
    async def main() -> None:
        async with _sim() as sim:
            fetched: list[int] = []

            async def refetch() -> tuple[int, bytes]:
                fetched.append(1)
                return sim.dictionary_id, sim.dictionary

            # a stale dictionary: refetched once, compressed from then on
            stale = train_dictionary(list(sim.rows[:300]), dict_id=1234)
            tail = LiveTail(sim.url, dictionary=stale, refetch_dictionary=refetch, sleep=_Sleeps())
            rows, _ = await _take(tail, 0, 40)
            _check(rows, list(sim.rows[:40]))
            assert fetched == [1] and tail.compressed
            assert [q.get("zstdDictionary") for q in sim.ws_requests[-2:]] == [["1234"], [str(sim.dictionary_id)]]
            # refused again after the refetch: uncompressed
            sim.faults.unknown_dictionary_next = 2
            tail = LiveTail(sim.url, dictionary=sim.dictionary, refetch_dictionary=refetch, sleep=_Sleeps())
            rows, _ = await _take(tail, 0, 40)
            _check(rows, list(sim.rows[:40]))
            assert fetched == [1, 1] and not tail.compressed and "zstdDictionary" not in sim.ws_requests[-1]
            # no way to refetch (or the refetch fails): uncompressed at once
            async def broken() -> bytes:
                raise OSError("down")

            for refetcher in (None, broken):
                sim.faults.unknown_dictionary_next = 1
                tail = LiveTail(sim.url, dictionary=sim.dictionary, refetch_dictionary=refetcher, sleep=_Sleeps())
                rows, _ = await _take(tail, 10, 5)
                assert [r.seq for r in rows] == [11, 12, 13, 14, 15] and not tail.compressed

    asyncio.run(main())


def test_invalid_request_is_fatal_with_the_server_message() -> None:
    async def main() -> None:
        async with _sim() as sim:
            def v1(url: str, **kw: Any) -> Any:
                from websockets.asyncio.client import connect
                return connect(url + "&wantedCollections=app.bsky.feed.post", **kw)

            tail = LiveTail(sim.url, sleep=_Sleeps(), connector=v1)
            with pytest.raises(LiveRequestError) as err:
                await _take(tail, 0, 1)
            assert isinstance(err.value, ConfigError)
            assert err.value.error == "InvalidRequest" and "wantedCollections" in err.value.message

    asyncio.run(main())


def test_unreachable_server_backs_off_then_gives_up() -> None:
    async def main() -> None:
        sleeps = _Sleeps()
        tail = LiveTail("ws://127.0.0.1:9", sleep=sleeps, rng=random.Random(3), max_failures=5, open_timeout=2)
        from runtime.errors import SourceError
        with pytest.raises(SourceError):
            await _take(tail, 0, 1)
        assert len(sleeps.delays) == 4
        assert [0.125 * 2 ** i <= d <= 0.25 * 2 ** i for i, d in enumerate(sleeps.delays)] == [True] * 4

    asyncio.run(main())


def test_a_seq_cursor_is_never_a_time_cursor() -> None:
    tail = LiveTail("http://h")
    with pytest.raises(ConfigError):
        asyncio.run(_take(tail, 10**15, 1))

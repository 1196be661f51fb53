"""The Jetstream v2 simulator over real HTTP and websockets on loopback: every endpoint, its faults, and a
whole history-then-live walk (plan, fetch, decode with ``runtime.atproto.segment``, cutover)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import httpx
import orjson
import pytest
import zstandard
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from runtime.atproto.segment import BlockDecompressError, Row, Segment, decode_block
from runtime.simulator.jetstream2 import (
    NSID_PREFIX,
    SUBPROTOCOL,
    Faults,
    Jetstream2Simulator,
    PlanRequest,
    RowFactory,
    Selection,
    build_simulator,
    dictionary_id,
    row_frame,
)
from tests.jetstream2_support import START_US, served, without_faults

M = NSID_PREFIX
EVENTS = 1200
TAIL = 90


def _options(seed: int = 21, **options: Any) -> dict[str, Any]:
    return {"seed": seed, "accounts": 15, "events": EVENTS, "tail": TAIL, "rows_per_segment": 300,
            "rows_per_block": 40, "start_us": START_US, **options}


def _sim(seed: int = 21, **options: Any) -> Jetstream2Simulator:
    return build_simulator(**_options(seed, **options))


@pytest.fixture(scope="module")
def shared() -> Iterator[Jetstream2Simulator]:
    yield from served(**_options(plan_page_size=2))


@pytest.fixture
def sim(shared: Jetstream2Simulator) -> Iterator[Jetstream2Simulator]:
    """The shared simulator with no faults (faults are undone after each test)."""
    yield from without_faults(shared)


@pytest.fixture
def client(sim: Jetstream2Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url + "/xrpc", timeout=10) as c:
        yield c


def _ws(sim: Jetstream2Simulator, query: str = "") -> ClientConnection:
    return connect(f"{sim.ws_url}?{query}" if query else sim.ws_url, subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                   open_timeout=10, max_size=1 << 22, max_queue=None, close_timeout=2)


def _refusal(sim: Jetstream2Simulator, query: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info, _ws(sim, query):
        pass
    response = info.value.response
    return response.status_code, orjson.loads(response.body or b"{}")


def _payloads(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        msg = ws.recv(timeout=10)
        assert isinstance(msg, str)
        obj = orjson.loads(msg)
        assert obj["$type"] == "message"
        out.append(obj["payload"])
    return out


# ---------------------------------------------------------------------------------------- archive


def test_list_segments_pages(sim: Jetstream2Simulator, client: httpx.Client) -> None:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        r = client.get(M + "listSegments", params=params)
        assert r.status_code == 200
        body = r.json()
        items += body["segments"]
        cursor = body.get("cursor")
        if cursor is None:
            break
    assert [i["name"] for i in items] == [s.name for s in sim.archive.segments]
    for item, seg in zip(items, sim.archive.segments, strict=True):
        assert item == seg.listing()
        assert item["sizeBytes"] == len(seg.data) and item["eventCount"] == 300
    assert all(a["maxWitnessedAt"] < b["minWitnessedAt"] for a, b in pairwise(items))
    r = client.get(M + "listSegments", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"] == "InvalidRequest"


def test_get_segment_etag_range_if_range(sim: Jetstream2Simulator, client: httpx.Client) -> None:
    seg = sim.archive.segments[1]
    full = client.get(M + "getSegment", params={"name": seg.name})
    assert full.status_code == 200 and full.content == seg.data
    assert full.headers["etag"] == f'"{seg.checksum}"'
    Segment(full.content).verify_checksum()
    part = client.get(M + "getSegment", params={"name": seg.name}, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == seg.data[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(seg.data)}"
    same = client.get(M + "getSegment", params={"name": seg.name},
                      headers={"Range": "bytes=100-", "If-Range": seg.etag})
    assert same.status_code == 206 and part.content + same.content == seg.data[10:]
    stale = client.get(M + "getSegment", params={"name": seg.name},
                       headers={"Range": "bytes=100-", "If-Range": '"0000000000000000"'})
    assert stale.status_code == 200 and stale.content == seg.data
    cached = client.get(M + "getSegment", params={"name": seg.name}, headers={"If-None-Match": seg.etag})
    assert cached.status_code == 304 and cached.content == b""
    bad = client.get(M + "getSegment", params={"name": seg.name}, headers={"Range": f"bytes={len(seg.data)}-"})
    assert bad.status_code == 416
    missing = client.get(M + "getSegment", params={"name": "seg_00000000ff.jss"})
    assert missing.status_code == 404 and missing.json()["error"] == "SegmentNotFound"


def test_get_block(sim: Jetstream2Simulator, client: httpx.Client) -> None:
    seg = sim.archive.segments[2]
    parsed = Segment(seg.data)
    for i in (0, 1, len(seg.blocks) - 1):
        r = client.get(M + "getBlock", params={"segment": seg.name, "blockIndex": i})
        assert r.status_code == 200 and r.headers["etag"] == f'"{seg.checksum}:{i}"'
        assert r.content == bytes(parsed.frame(i))
        assert list(decode_block(r.content).rows()) == list(parsed.block(i).rows())
    empty = [b.index for b in seg.blocks if b.count == 0]
    assert empty, "segment 2 carries an empty block"
    r = client.get(M + "getBlock", params={"segment": seg.name, "blockIndex": empty[0]})
    assert len(decode_block(r.content)) == 0
    r = client.get(M + "getBlock", params={"segment": seg.name, "blockIndex": len(seg.blocks)})
    assert r.status_code == 404 and r.json()["error"] == "BlockNotFound"
    r = client.get(M + "getBlock", params={"segment": "seg_00000000ff.jss", "blockIndex": 0})
    assert r.status_code == 404 and r.json()["error"] == "SegmentNotFound"
    r = client.get(M + "getBlock", params={"segment": seg.name})
    assert r.status_code == 400 and r.json()["error"] == "InvalidRequest"


def test_dictionary(sim: Jetstream2Simulator, client: httpx.Client) -> None:
    r = client.get(M + "getZstdDictionary")
    assert r.status_code == 200
    assert int(r.headers["x-zstd-dictionary-id"]) == dictionary_id(r.content) == sim.dictionary_id
    assert client.get(M + "getZstdDictionary", params={"id": sim.dictionary_id}).content == r.content
    r = client.get(M + "getZstdDictionary", params={"id": 1})
    assert r.status_code == 404 and r.json()["error"] == "DictionaryNotFound"


def test_plan_snapshot_http(sim: Jetstream2Simulator, client: httpx.Client) -> None:
    r = client.post(M + "planSnapshot", json={"collections": ["app.bsky.feed.*"], "afterSeq": 100})
    assert r.status_code == 200
    body = r.json()
    assert body["sealedTipSeq"] == sim.sealed_tip == EVENTS
    assert len(body["segments"]) == 2 and body["plannedThroughSeq"] == body["segments"][-1]["maxSeq"]
    assert body["segments"][0]["mode"] == "blocks"
    assert client.get(M + "planSnapshot").status_code == 405
    r = client.post(M + "planSnapshot", content=b"[]")
    assert r.status_code == 400 and r.json()["error"] == "InvalidRequest"
    assert client.get(M + "noSuchMethod").json()["error"] == "MethodNotImplemented"


def test_api_key() -> None:
    sim = _sim(api_key="s3cret").start_in_thread()
    try:
        with httpx.Client(base_url=sim.url + "/xrpc", timeout=10) as c:
            name = sim.archive.segments[0].name
            calls: list[Callable[[dict[str, str]], httpx.Response]] = [
                lambda h: c.post(M + "planSnapshot", json={}, headers=h),
                lambda h: c.get(M + "getSegment", params={"name": name}, headers=h),
                lambda h: c.get(M + "getBlock", params={"segment": name, "blockIndex": 0}, headers=h)]
            for call in calls:
                assert call({}).status_code == 401
                assert call({"Authorization": "Bearer wrong"}).json()["error"] == "AuthenticationRequired"
                assert call({"Authorization": "Bearer s3cret"}).status_code == 200
            assert c.get(M + "listSegments").status_code == 200
            assert c.get(M + "getZstdDictionary").status_code == 200
    finally:
        sim.stop_thread()


# ----------------------------------------------------------------------------------------- faults


def test_unready_for_n_requests_dictionary_exempt(sim: Jetstream2Simulator, client: httpx.Client) -> None:
    sim.faults.unready_requests = 2
    assert client.get(M + "getZstdDictionary").status_code == 200
    for _ in range(2):
        r = client.get(M + "listSegments")
        assert r.status_code == 503 and r.json()["error"] == "NotReady"
    assert client.get(M + "listSegments").status_code == 200


def test_unready_for_seconds_on_the_injected_clock() -> None:
    now = [1000.0]
    sim = _sim(faults=Faults(unready_seconds=30), clock=lambda: now[0]).start_in_thread()
    try:
        with httpx.Client(base_url=sim.url + "/xrpc", timeout=10) as c:
            assert c.post(M + "planSnapshot", json={}).status_code == 503
            now[0] += 29.9
            assert c.get(M + "listSegments").status_code == 503
            assert c.get(M + "getZstdDictionary").status_code == 200
            now[0] += 0.2
            assert c.post(M + "planSnapshot", json={}).status_code == 200
    finally:
        sim.stop_thread()


def test_rate_limit_and_errors_next(sim: Jetstream2Simulator, client: httpx.Client) -> None:
    sim.faults.rate_limit_next = 2
    sim.faults.retry_after = 7
    for _ in range(2):
        r = client.get(M + "listSegments")
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"] == "RateLimitExceeded"
    sim.faults.error_next = 1
    sim.faults.error_status = 502
    assert client.get(M + "listSegments").status_code == 502
    assert client.get(M + "listSegments").status_code == 200


def test_fractional_faults_are_deterministic_for_a_seed() -> None:
    def statuses(seed: int) -> list[int]:
        sim = _sim(seed=seed, faults=Faults(rate_limit_fraction=0.3, error_fraction=0.2)).start_in_thread()
        try:
            with httpx.Client(base_url=sim.url + "/xrpc", timeout=10) as c:
                return [c.get(M + "listSegments", params={"limit": 1}).status_code for _ in range(40)]
        finally:
            sim.stop_thread()

    a, b = statuses(5), statuses(5)
    assert a == b
    assert {200, 429, 503} <= set(a)
    assert statuses(6) != a


def test_etag_changes_mid_download(sim: Jetstream2Simulator, client: httpx.Client) -> None:
    seg = sim.archive.segments[3]
    rows = list(Segment(seg.data).rows())
    sim.faults.etag_change_after = 1
    first = client.get(M + "getSegment", params={"name": seg.name}, headers={"Range": "bytes=0-999"})
    assert first.status_code == 206 and first.headers["etag"] == seg.etag
    rest = client.get(M + "getSegment", params={"name": seg.name},
                      headers={"Range": "bytes=1000-", "If-Range": seg.etag})
    new = sim.archive.get(seg.name)
    assert new is not None and new.checksum != seg.checksum
    assert rest.status_code == 200 and rest.headers["etag"] == new.etag != seg.etag
    assert rest.content == new.data
    assert list(Segment(rest.content).rows()) == rows
    listed = client.get(M + "listSegments", params={"limit": 1000}).json()["segments"][3]
    assert listed["checksum"] == new.checksum
    assert sim.faults.etag_change_times == 1
    again = client.get(M + "getSegment", params={"name": seg.name})
    assert again.headers["etag"] == sim.archive.get(seg.name).etag  # type: ignore[union-attr]
    assert client.get(M + "getSegment", params={"name": seg.name}).headers["etag"] == again.headers["etag"]


def test_truncated_and_corrupted_blocks(sim: Jetstream2Simulator, client: httpx.Client) -> None:
    seg = sim.archive.segments[0]
    params: dict[str, str | int] = {"segment": seg.name, "blockIndex": 1}
    sim.faults.truncate_block_next = 1
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(M + "getBlock", params=params)
    sim.faults.corrupt_block_next = 1
    bad = client.get(M + "getBlock", params=params)
    assert bad.status_code == 200 and len(bad.content) == seg.blocks[1].csize
    with pytest.raises(BlockDecompressError):
        decode_block(bad.content)
    good = client.get(M + "getBlock", params=params)
    assert len(decode_block(good.content)) == seg.blocks[1].count


def test_plan_page_that_does_not_advance(sim: Jetstream2Simulator, client: httpx.Client) -> None:
    sim.faults.stall_plan_next = 1
    page = client.post(M + "planSnapshot", json={"afterSeq": 50}).json()
    assert page["segments"] == [] and page["plannedThroughSeq"] == 50 < page["sealedTipSeq"]
    assert client.post(M + "planSnapshot", json={"afterSeq": 50}).json()["plannedThroughSeq"] > 50


# -------------------------------------------------------------------------------------- websocket


def test_subscribe_frames_and_filters(sim: Jetstream2Simulator) -> None:
    with _ws(sim, "cursor=10") as ws:
        assert ws.subprotocol == SUBPROTOCOL
        got = _payloads(ws, 30)
    assert [p["seq"] for p in got] == list(range(10, 40))
    assert [orjson.dumps({"$type": "message", "payload": p}).decode() for p in got] == \
        [row_frame(r) for r in sim.rows[9:39]]
    with _ws(sim, "cursor=1&kinds=account&kinds=sync") as ws:
        got = _payloads(ws, 5)
    assert {p["$type"].rsplit("#", 1)[1] for p in got} <= {"account", "sync"}
    assert all(("account" in p) != ("sync" in p) for p in got)
    did = sim.rows[0].did
    with _ws(sim, f"cursor=1&dids={did}&collections=app.bsky.feed.like") as ws:
        got = _payloads(ws, 3)
    assert all(p["did"] == did for p in got)
    assert all(p.get("collection", "app.bsky.feed.like") == "app.bsky.feed.like" for p in got)
    sizes = [len(row_frame(r)) for r in sim.rows[:50]]
    cap = sorted(sizes)[25]
    with _ws(sim, f"cursor=1&maxMessageSizeBytes={cap}") as ws:
        got = _payloads(ws, 10)
    assert all(len(row_frame(sim.rows[p["seq"] - 1])) <= cap for p in got)


def test_subscribe_refusals(sim: Jetstream2Simulator) -> None:
    for query in ("wantedCollections=app.bsky.feed.post", "compress=true", "kinds=commits",
                  "kinds=identity&collections=app.bsky.feed.post", "cursor=abc"):
        status, body = _refusal(sim, query)
        assert (status, body["error"]) == (400, "InvalidRequest"), query
    status, body = _refusal(sim, "zstdDictionary=1")
    assert (status, body["error"]) == (400, "UnknownZstdDictionary")
    assert str(sim.dictionary_id) in body["message"]
    sim.faults.unknown_dictionary_next = 1
    status, body = _refusal(sim, f"zstdDictionary={sim.dictionary_id}")
    assert body["error"] == "UnknownZstdDictionary"
    sim.faults.cursor_too_old_next = 1
    status, body = _refusal(sim, "cursor=500")
    assert (status, body["error"]) == (400, "CursorTooOld")
    with _ws(sim, "cursor=500") as ws:
        assert _payloads(ws, 1)[0]["seq"] == 500


def test_cursor_floor_and_time_cursor() -> None:
    sim = _sim(cursor_floor=200).start_in_thread()
    try:
        status, body = _refusal(sim, "cursor=199")
        assert (status, body["error"]) == (400, "CursorTooOld") and "200" in body["message"]
        with _ws(sim, "cursor=200") as ws:
            assert _payloads(ws, 1)[0]["seq"] == 200
        at = sim.rows[299].witnessed_at
        with _ws(sim, f"cursor={at}") as ws:
            assert _payloads(ws, 1)[0]["seq"] == 300
        with _ws(sim, f"cursor={sim.rows[0].witnessed_at}") as ws:
            info, first = _payloads(ws, 2)
        assert info["$type"].endswith("#info") and info["name"] == "OutdatedCursor" and "seq" not in info
        assert first["seq"] == 200
    finally:
        sim.stop_thread()


def test_compressed_frames(sim: Jetstream2Simulator) -> None:
    dctx = zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(sim.dictionary))
    with _ws(sim, f"cursor=1&zstdDictionary={sim.dictionary_id}") as ws:
        frames = [ws.recv(timeout=10) for _ in range(20)]
    assert all(isinstance(f, bytes) for f in frames)
    texts = [dctx.decompress(f, max_output_size=1 << 20).decode() for f in frames]  # type: ignore[arg-type]
    assert texts == [row_frame(r) for r in sim.rows[:20]]
    assert sum(map(len, frames)) < sum(map(len, texts))


def test_dropped_websocket_and_error_frames(sim: Jetstream2Simulator) -> None:
    sim.faults.drop_after_frames = 5
    with _ws(sim, "cursor=1") as ws:
        assert len(_payloads(ws, 5)) == 5
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    with _ws(sim, "cursor=1") as ws:  # drop_times = 1: the next connection is whole
        assert len(_payloads(ws, 8)) == 8
    for name in ("ConsumerTooSlow", "InternalError"):
        sim.faults = Faults(error_frame_after=3, error_frame=name)
        with _ws(sim, "cursor=1") as ws:
            assert len(_payloads(ws, 3)) == 3
            err = orjson.loads(ws.recv(timeout=10))
            assert err["$type"] == "error" and err["error"] == name
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
    sim.faults = Faults(error_frame_after=2)  # with compression the error frame is compressed too
    dctx = zstandard.ZstdDecompressor(dict_data=zstandard.ZstdCompressionDict(sim.dictionary))
    with _ws(sim, f"cursor=1&zstdDictionary={sim.dictionary_id}") as ws:
        frames = [ws.recv(timeout=10) for _ in range(3)]
    texts = [orjson.loads(dctx.decompress(f, max_output_size=1 << 20)) for f in frames]  # type: ignore[arg-type]
    assert [t["$type"] for t in texts] == ["message", "message", "error"]
    assert texts[2]["error"] == "ConsumerTooSlow" and "cursor=3" in texts[2]["message"]


def test_live_tail(sim: Jetstream2Simulator) -> None:
    factory = RowFactory(seed=99, accounts=3, first_seq=sim.rows[-1].seq + 1,
                         start_us=sim.rows[-1].witnessed_at + 1)
    new = factory.rows(4)
    with _ws(sim) as ws:  # no cursor: from the live tip
        sim.call(lambda: sim.append_live(new))
        got = _payloads(ws, 4)
    assert [p["seq"] for p in got] == [r.seq for r in new]


# ------------------------------------------------------------------------------------ the walk


def _fetch_unit(c: httpx.Client, unit: dict[str, Any]) -> list[Row]:
    """A plan unit's rows: a whole segment in two Range stripes (restarted on an ETag change), or its blocks."""
    if unit["mode"] == "segment":
        while True:
            head = c.get(M + "getSegment", params={"name": unit["name"]}, headers={"Range": "bytes=0-4095"})
            assert head.status_code == 206
            etag = head.headers["etag"]
            size = int(head.headers["content-range"].rsplit("/", 1)[1])
            tail = c.get(M + "getSegment", params={"name": unit["name"]},
                         headers={"Range": "bytes=4096-", "If-Range": etag})
            if tail.status_code == 206:
                data = head.content + tail.content
                assert len(data) == size
                break
            assert tail.status_code == 200 and tail.headers["etag"] != etag  # the segment was rewritten
        seg = Segment(data)
        seg.verify_checksum()
        assert f"{seg.header.checksum:016x}" == etag.strip('"')
        return list(seg.rows())
    rows: list[Row] = []
    for r in unit["blocks"]:
        for i in range(r["first"], r["last"] + 1):
            resp = c.get(M + "getBlock", params={"segment": unit["name"], "blockIndex": i})
            assert resp.status_code == 200
            rows += decode_block(resp.content).rows()
    return rows


def _walk(sim: Jetstream2Simulator, after: int, body: dict[str, Any], selection: Selection,
          live: list[Row]) -> list[int]:
    delivered: list[int] = []
    last = after
    with httpx.Client(base_url=sim.url + "/xrpc", timeout=10) as c:
        page = c.post(M + "planSnapshot", json=body | {"afterSeq": after}).json()
        tip = page["sealedTipSeq"]
        while True:
            for unit in page["segments"]:
                for row in sorted(_fetch_unit(c, unit), key=lambda r: r.seq):
                    if row.seq > last and row.seq <= tip and selection.wants(row):
                        delivered.append(row.seq)
                        last = row.seq
            through = page["plannedThroughSeq"]
            if through >= tip:
                break
            page = c.post(M + "planSnapshot", json=body | {"afterSeq": through, "beforeSeq": tip}).json()
            assert page["plannedThroughSeq"] > through
    query = f"cursor={max(tip, last)}"
    for key in ("kinds", "dids", "collections"):
        query += "".join(f"&{key}={v}" for v in body.get(key, []))
    end = live[-1].seq
    with _ws(sim, query) as ws:
        sim.call(lambda: sim.append_live(live))
        while last < end:
            payload = orjson.loads(ws.recv(timeout=10))["payload"]
            seq = payload["seq"]
            if seq <= last:
                continue
            delivered.append(seq)
            last = seq
            if seq == max(r.seq for r in sim.rows if selection.wants(r)):
                break
    return delivered


def test_plan_fetch_decode_cutover_walk() -> None:
    sim = _sim(plan_page_size=2, faults=Faults(etag_change_after=3)).start_in_thread()
    try:
        factory = RowFactory(seed=77, accounts=4, first_seq=sim.rows[-1].seq + 1,
                             start_us=sim.rows[-1].witnessed_at + 1)
        live = factory.rows(30)
        expected_all = [r.seq for r in sim.rows] + [r.seq for r in live]
        got = _walk(sim, 0, {}, Selection(), live)
        assert got == expected_all  # every event exactly once, in seq order
        assert sim.archive.segments[0].version + sim.archive.segments[1].version >= 1  # an ETag change happened

        more = RowFactory(seed=78, accounts=4, first_seq=live[-1].seq + 1,
                          start_us=live[-1].witnessed_at + 1).rows(40)
        body = {"collections": ["app.bsky.feed.*"]}
        sel = PlanRequest.from_json(orjson.dumps(body)).selection
        got = _walk(sim, 333, body, sel, more)
        want = [r.seq for r in sim.rows if r.seq > 333 and sel.wants(r)]
        assert got == want
        assert any(r.kind >= 4 for r in sim.rows if r.seq in set(got))  # DID-level markers pass the filter
    finally:
        sim.stop_thread()

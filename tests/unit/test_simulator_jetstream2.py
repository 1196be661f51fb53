"""The Jetstream v2 simulator's pure parts: generated rows, sealed segments, planning and its paging."""

from __future__ import annotations

import argparse
import functools
from collections import Counter
from itertools import pairwise
from typing import Any

import libipld
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.jetstream.archive import RowFilter, decode_row
from runtime.atproto.car import read_car
from runtime.atproto.segment import (
    KIND_ACCOUNT,
    KIND_DELETE,
    KIND_IDENTITY,
    KIND_RESYNC_CREATE,
    KIND_SYNC,
    Row,
    Segment,
)
from runtime.contract.records import SyncEvent
from runtime.simulator import jetstream2_cli
from runtime.simulator.jetstream2 import (
    Archive,
    Faults,
    InvalidRequestError,
    PlanRequest,
    RowFactory,
    SealedSegment,
    Selection,
    collection_matches,
    dictionary_id,
    parse_range,
    plan_page,
    row_payload_json,
    seal_segment,
    segment_name,
    train_dictionary,
)

ROWS_PER_SEGMENT = 90
ROWS_PER_BLOCK = 16


@functools.cache
def _archive() -> tuple[Archive, tuple[Row, ...]]:
    rows = RowFactory(seed=11, accounts=12, marker_rate=0.08).rows(700)
    return Archive.from_rows(rows, rows_per_segment=ROWS_PER_SEGMENT, rows_per_block=ROWS_PER_BLOCK,
                             empty_block_every=2), tuple(rows)


# ---------------------------------------------------------------------------------------- rows


def test_rows_are_deterministic_and_cover_every_kind() -> None:
    a = RowFactory(seed=3, accounts=10).rows(1500)
    b = RowFactory(seed=3, accounts=10).rows(1500)
    assert a == b
    assert [r.seq for r in a] == list(range(1, 1501))
    assert all(x.witnessed_at < y.witnessed_at for x, y in pairwise(a))
    kinds = Counter(r.kind for r in a)
    assert set(kinds) == set(range(1, 8)), kinds
    assert any(r.indexed_at for r in a) and any(not r.indexed_at for r in a)
    assert all(r.payload == b"" for r in a if r.kind == KIND_DELETE)
    assert RowFactory(seed=4, accounts=10).rows(50) != a[:50]


def test_every_row_decodes_with_the_producer_decoder() -> None:
    rows = RowFactory(seed=5, accounts=8, marker_rate=0.1).rows(800)
    seen: Counter[str] = Counter()
    for row in rows:
        item = decode_row(row, verify_cid=True)
        seen[type(item).__name__] += 1
        if isinstance(item, SyncEvent):
            assert item.did == row.did and item.cursor == row.seq
    assert {"RecordEvent", "IdentityEvent", "AccountEvent", "SyncEvent"} <= set(seen), seen


def test_marker_payloads_are_upstream_shaped() -> None:
    rows = RowFactory(seed=6, accounts=5, marker_rate=0.2).rows(400)
    for row in rows:
        if row.kind not in (KIND_IDENTITY, KIND_ACCOUNT, KIND_SYNC):
            continue
        body = libipld.decode_dag_cbor(row.payload)
        assert body["did"] == row.did and isinstance(body["seq"], int) and body["time"].endswith("Z")
        if row.kind == KIND_ACCOUNT:
            assert isinstance(body["active"], bool)
            assert ("status" in body) == (not body["active"])
        if row.kind == KIND_SYNC:
            car = read_car(body["blocks"])
            assert len(car.roots) == 1
        payload = row_payload_json(row)
        name = payload["$type"].rsplit("#", 1)[1]
        assert payload[name]["did"] == row.did and payload["seq"] == row.seq


def test_commit_payload_time_is_imported_when_present() -> None:
    rows = RowFactory(seed=7, accounts=5, imported_rate=1.0, marker_rate=0).rows(30)
    for row in rows:
        p = row_payload_json(row)
        assert row.indexed_at
        assert p["time"].startswith("20") and len(p["time"].split(".")[1]) == 7  # 6 digits and Z
        assert p["operation"] == ("create" if row.kind == KIND_RESYNC_CREATE else p["operation"])
        assert ("record" in p) == (row.kind != KIND_DELETE)


def test_trained_dictionary_has_an_id() -> None:
    rows = RowFactory(seed=8, accounts=20).rows(1500)
    d = train_dictionary(rows, size=16 * 1024, dict_id=4242)
    assert dictionary_id(d) == 4242
    with pytest.raises(ValueError, match="magic"):
        dictionary_id(b"not a dictionary")


# ------------------------------------------------------------------------------------ segments


def test_sealed_segments_verify_and_hold_their_rows() -> None:
    archive, rows = _archive()
    assert [s.name for s in archive.segments[:2]] == ["seg_0000000000.jss", "seg_0000000001.jss"]
    assert segment_name(42) == "seg_000000002a.jss"
    got: list[Row] = []
    for seg in archive.segments:
        parsed = Segment(seg.data)
        assert parsed.verify() == []
        got += parsed.rows()
    assert tuple(got) == rows
    assert archive.sealed_tip == rows[-1].seq
    with_empty = [s for s in archive.segments if any(b.count == 0 for b in s.blocks)]
    assert with_empty and len(with_empty) == len(archive.segments) // 2


def test_block_names_carry_the_marker_sentinels() -> None:
    archive, _ = _archive()
    for seg in archive.segments:
        for info, block in Segment(seg.data).iter_blocks():
            names = seg.block_names[info.index]
            for row in block.rows():
                if row.kind == KIND_IDENTITY:
                    assert "$identity" in names
                elif row.kind == KIND_SYNC:
                    assert "$sync" in names
                elif row.collection:
                    assert row.collection in names


def test_rewrite_changes_the_checksum_not_the_rows() -> None:
    rows = RowFactory(seed=9, accounts=5).rows(100)
    archive = Archive.from_rows(rows, rows_per_segment=50, rows_per_block=10, empty_block_every=0)
    old = archive.segments[1]
    new = archive.rewrite(old.name)
    assert new.checksum != old.checksum and new.etag != old.etag
    assert archive.get(old.name) is new and archive.segments[1] is new
    assert list(Segment(new.data).rows()) == rows[50:]
    with pytest.raises(ValueError, match="at least one row"):
        seal_segment(0, [], rows_per_block=4)


# ------------------------------------------------------------------------------------ planning


def _unit_rows(seg: SealedSegment, unit: dict[str, Any]) -> list[Row]:
    parsed = Segment(seg.data)
    if unit["mode"] == "segment":
        assert "blocks" not in unit
        return list(parsed.rows())
    out: list[Row] = []
    last = -1
    for r in unit["blocks"]:
        assert last < r["first"] <= r["last"] < len(seg.blocks)
        last = r["last"]
        for i in range(r["first"], r["last"] + 1):
            out += parsed.block(i).rows()
    return out


_KNOWN = ("app.bsky.feed.like", "app.bsky.feed.post", "app.bsky.graph.follow", "app.bsky.actor.profile",
          "app.bsky.graph.*", "app.bsky.feed.*", "chat.bsky.*", "com.example.none")


@st.composite
def _requests(draw: st.DrawFn) -> tuple[PlanRequest, int]:
    archive, rows = _archive()
    tip = archive.sealed_tip
    kinds = draw(st.sets(st.sampled_from(("commit", "identity", "account", "sync"))))
    collections = draw(st.lists(st.sampled_from(_KNOWN), max_size=3, unique=True)) \
        if not kinds or "commit" in kinds else []
    all_dids = sorted({r.did for r in rows})
    dids = draw(st.lists(st.sampled_from(all_dids), max_size=3, unique=True))
    after = draw(st.integers(0, tip + 5))
    before = draw(st.none() | st.integers(0, tip + 5))
    size = draw(st.integers(1, 4))
    return PlanRequest(Selection.of(kinds, dids, collections), after, before), size


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_requests())
def test_plan_pages_cover_the_range_once_and_never_miss(case: tuple[PlanRequest, int]) -> None:
    req, size = case
    archive, rows = _archive()
    by_name = {s.name: s for s in archive.segments}
    first = plan_page(archive.segments, req, max_entries=size)
    tip = first["sealedTipSeq"]
    assert tip == (archive.sealed_tip if req.before_seq is None else min(archive.sealed_tip, req.before_seq))
    after = req.after_seq
    page = first
    seen_units: list[int] = []
    collected: list[int] = []
    pages = 0
    while True:
        pages += 1
        assert pages <= len(archive.segments) + 2
        through = page["plannedThroughSeq"]
        assert page["sealedTipSeq"] == tip
        assert len(page["segments"]) <= size
        for unit in page["segments"]:
            seg = by_name[unit["name"]]
            assert unit["index"] == seg.index and unit["checksum"] == seg.checksum
            assert (unit["minSeq"], unit["maxSeq"]) == (seg.min_seq, seg.max_seq)
            assert seg.max_seq > after and seg.min_seq <= through  # inside this page's range
            if unit["mode"] == "segment":
                assert seg.min_seq > after and seg.max_seq <= tip
            seen_units.append(seg.index)
            collected += [r.seq for r in _unit_rows(seg, unit) if after < r.seq <= through]
        if len(page["segments"]) == size and through < tip:
            assert through == page["segments"][-1]["maxSeq"]  # a full page ends at its last unit
        else:
            assert through == max(after, tip)
        if through >= tip:
            break
        assert through > after  # every page advances
        after = through
        page = plan_page(archive.segments, PlanRequest(req.selection, after, tip), max_entries=size)
    assert seen_units == sorted(set(seen_units))  # each unit once, in unit order
    assert len(collected) == len(set(collected)) and collected == sorted(collected)
    wanted = {r.seq for r in rows if req.after_seq < r.seq <= tip and req.selection.wants(r)}
    assert wanted <= set(collected)


def test_plan_without_filter_is_every_segment_whole() -> None:
    archive, _ = _archive()
    page = plan_page(archive.segments, PlanRequest(), max_entries=1000)
    assert [u["mode"] for u in page["segments"]] == ["segment"] * len(archive.segments)
    assert page["plannedThroughSeq"] == page["sealedTipSeq"] == archive.sealed_tip
    assert page["stats"]["segmentsMatched"] == len(archive.segments)


def test_plan_mid_segment_resume_is_blocks() -> None:
    archive, _ = _archive()
    after = ROWS_PER_SEGMENT + 40
    page = plan_page(archive.segments, PlanRequest(after_seq=after), max_entries=1)
    unit = page["segments"][0]
    assert unit["index"] == 1 and unit["mode"] == "blocks"
    seg = archive.segments[1]
    first = unit["blocks"][0]["first"]
    assert seg.blocks[first].max_seq > after and (first == 0 or seg.blocks[first - 1].max_seq <= after
                                                 or seg.blocks[first - 1].count == 0)
    assert page["plannedThroughSeq"] == seg.max_seq


def test_collection_filter_keeps_marker_blocks_unless_kinds_exclude_them() -> None:
    archive, rows = _archive()
    sel = Selection.of(None, None, ["com.example.none"])
    page = plan_page(archive.segments, PlanRequest(sel), max_entries=1000)
    marker_seqs = {r.seq for r in rows if r.kind in (KIND_IDENTITY, KIND_ACCOUNT, KIND_SYNC)}
    got = {r.seq for u in page["segments"] for r in _unit_rows(archive.segments[u["index"]], u)}
    assert marker_seqs <= got
    commits_only = Selection.of(["commit"], None, ["com.example.none"])
    assert plan_page(archive.segments, PlanRequest(commits_only), max_entries=1000)["segments"] == []


def test_plan_past_the_tip_is_empty_and_done() -> None:
    archive, _ = _archive()
    tip = archive.sealed_tip
    page = plan_page(archive.segments, PlanRequest(after_seq=tip + 10), max_entries=5)
    assert page["segments"] == [] and page["plannedThroughSeq"] == tip + 10 and page["sealedTipSeq"] == tip
    assert plan_page([], PlanRequest(), max_entries=5)["sealedTipSeq"] == 0


@pytest.mark.parametrize(("body", "message"), [
    (b"[1]", "object"),
    (b"{not json", "not JSON"),
    (b'{"kinds": "commit"}', "array"),
    (b'{"kinds": ["commits"]}', "unknown kinds"),
    (b'{"afterSeq": -1}', "non-negative"),
    (b'{"beforeSeq": "3"}', "non-negative"),
    (b'{"kinds": ["identity"], "collections": ["app.bsky.feed.post"]}', "excludes commit"),
    (b'{"collections": ["app"]}', "NSIDs"),
    (b'{"dids": ["nope"]}', "DIDs"),
])
def test_plan_request_refusals(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        PlanRequest.from_json(body)


def test_plan_request_parse() -> None:
    req = PlanRequest.from_json(b'{"kinds": ["commit"], "collections": ["app.bsky.feed.*"], "afterSeq": 5, '
                                b'"beforeSeq": 9, "dids": []}')
    assert req.after_seq == 5 and req.before_seq == 9
    assert req.selection == Selection(frozenset({"commit"}), None, ("app.bsky.feed.*",))
    assert PlanRequest.from_json(b"") == PlanRequest()
    with pytest.raises(InvalidRequestError, match="at most"):
        Selection.of(None, [f"did:plc:{i}" for i in range(10_001)], None)


def test_collection_patterns() -> None:
    assert collection_matches("app.bsky.feed.like", ["app.bsky.feed.*"])
    assert collection_matches("app.bsky.feed.like", ["app.bsky.feed.like"])
    assert not collection_matches("app.bsky.feedx.like", ["app.bsky.feed.*"])
    assert not collection_matches("app.bsky.feed.likes", ["app.bsky.feed.like"])


def test_parse_range() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None
    assert parse_range("items=0-1", 100) is None
    for bad in ("bytes=100-", "bytes=5-2", "bytes=-0", "bytes=a-b"):
        with pytest.raises(ValueError, match="range"):
            parse_range(bad, 100)


@settings(max_examples=40, deadline=None)
@given(_requests())
def test_selection_agrees_with_the_producer_filter(case: tuple[PlanRequest, int]) -> None:
    sel = case[0].selection
    flt = RowFilter.of(collections=sel.collections or (), dids=sel.dids or (), kinds=sel.kinds or ())
    _, rows = _archive()
    assert [r.seq for r in rows if sel.wants(r)] == [r.seq for r in rows if flt.wants(r)]


# ------------------------------------------------------------------------------------------- CLI


def test_cli_builds_the_simulator_with_its_faults() -> None:
    parser = argparse.ArgumentParser()
    jetstream2_cli.add_arguments(parser)
    assert jetstream2_cli.build(parser.parse_args(["--events", "50", "--tail", "5"])).faults == Faults()
    ns = parser.parse_args(["--port", "0", "--events", "300", "--tail", "7", "--accounts", "9", "--seed", "4",
                            "--rows-per-segment", "100", "--rows-per-block", "25", "--api-key", "k",
                            "--cursor-floor", "12", "--plan-page-size", "3", "--unready-requests", "2",
                            "--rate-limit-next", "1", "--retry-after", "9", "--error-status", "502",
                            "--etag-change-after", "4", "--truncate-blocks", "1", "--corrupt-blocks", "2",
                            "--stall-plan-pages", "1", "--cursor-too-old", "1", "--unknown-dictionary", "1",
                            "--drop-after-frames", "10", "--error-frame", "InternalError",
                            "--error-frame-after", "3", "--log-level", "DEBUG"])
    sim = jetstream2_cli.build(ns)
    f = sim.faults
    assert (f.unready_requests, f.rate_limit_next, f.retry_after, f.error_status, f.etag_change_after) == \
        (2, 1, 9, 502, 4)
    assert (f.truncate_block_next, f.corrupt_block_next, f.stall_plan_next, f.cursor_too_old_next,
            f.unknown_dictionary_next, f.drop_after_frames, f.error_frame, f.error_frame_after) == \
        (1, 2, 1, 1, 1, 10, "InternalError", 3)
    assert (sim.api_key, sim.cursor_floor, sim.plan_page_size) == ("k", 12, 3)
    assert [s.max_seq for s in sim.archive.segments] == [100, 200, 300]
    assert len(sim.rows) == 307 and sim.sealed_tip == 300
    assert all(b.count <= 25 for s in sim.archive.segments for b in s.blocks)
    assert "3 segments" in jetstream2_cli.banner(sim) and jetstream2_cli.HELP
    with pytest.raises(SystemExit):
        parser.parse_args(["--error-frame", "Nope"])

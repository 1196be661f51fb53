"""The pure firehose frame decoder, on the captured real frames and on hand-built ones."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import libipld
import pytest

from producers.firehose.decode import (
    KIND_ACCOUNT,
    KIND_COMMIT,
    KIND_ERROR,
    KIND_IDENTITY,
    KIND_INFO,
    KIND_SYNC,
    KIND_UNKNOWN,
    decode_frame,
    find_block,
    parse_frame,
    parse_time_us,
)
from runtime.atproto.capture import read_capture
from runtime.atproto.car import read_car, write_car
from runtime.atproto.cid import CID
from runtime.atproto.dagcbor import encode, from_json_form
from runtime.contract.records import AccountEvent, IdentityEvent, RecordEvent
from runtime.contract.timeparse import timestamp_us
from runtime.errors import DecodeError
from runtime.simulator.relay import encode_frame, error_frame, info_frame


@pytest.fixture(scope="module")
def frames(fixtures_dir: Path) -> list[bytes]:
    return read_capture(fixtures_dir / "frames.bin.zst")


@pytest.fixture(scope="module")
def manifest(fixtures_dir: Path) -> dict[str, Any]:
    return json.loads((fixtures_dir / "manifest.json").read_text())


def test_every_fixture_frame_decodes_to_the_manifest_counts(frames: list[bytes], manifest: dict[str, Any]) -> None:
    counts: Counter[str] = Counter()
    dids = set()
    for data in frames:
        decoded = decode_frame(data, job="j")
        counts[decoded.kind] += 1
        if decoded.kind == KIND_COMMIT:
            dids.add(decoded.did)
        for ev in decoded.events:
            counts["events"] += 1
            if isinstance(ev, RecordEvent):
                counts[ev.operation + "s"] += 1
    assert len(frames) == manifest["frames"]
    assert counts[KIND_COMMIT] == manifest["commit_frames"]
    assert counts["creates"] == manifest["creates"]
    assert counts["updates"] == manifest["updates"]
    assert counts["deletes"] == manifest["deletes"]
    assert counts[KIND_IDENTITY] == manifest["identity"]
    assert counts[KIND_ACCOUNT] == manifest["account"]
    assert counts["events"] == manifest["v1_events"]
    assert dids == set(manifest["commit_dids"])


def test_events_carry_seq_time_and_the_firehose_source(frames: list[bytes], manifest: dict[str, Any]) -> None:
    seqs = []
    for data in frames:
        _, body = libipld.decode_dag_cbor_multi(data)
        decoded = decode_frame(data, job="job1")
        seqs.append(decoded.seq)
        assert decoded.seq == body["seq"]
        assert decoded.time_us == timestamp_us(body["time"])
        for ev in decoded.events:
            assert ev.source == "firehose"
            assert ev.cursor == body["seq"]
            assert ev.time_us == timestamp_us(body["time"])
            assert ev.job == "job1"
            if isinstance(ev, RecordEvent):
                assert ev.did == body["repo"]
                assert ev.rev == body["rev"]
    assert seqs == list(range(manifest["seq_first"], manifest["seq_last"] + 1))


def test_records_are_exact_json_forms_of_their_blocks(frames: list[bytes]) -> None:
    """Re-encoding each record's JSON form gives back the block its CID names: links stay links."""
    checked = links = 0
    for data in frames:
        for ev in decode_frame(data).events:
            if not isinstance(ev, RecordEvent) or ev.record is None:
                continue
            block = encode(from_json_form(ev.record))
            assert str(CID.for_dag_cbor(block)) == ev.cid
            assert ev.record["$type"] == ev.collection
            checked += 1
            links += json.dumps(ev.record).count('"$link"')
    assert checked == 146
    assert links > 0


def test_find_block_agrees_with_the_car_reader(frames: list[bytes]) -> None:
    found = 0
    for data in frames:
        _, body = libipld.decode_dag_cbor_multi(data)
        if "blocks" not in body:
            continue
        car = read_car(body["blocks"])
        for cid, block in car.blocks.items():
            assert find_block(body["blocks"], cid.raw) == block
            found += 1
        assert find_block(body["blocks"], CID.for_dag_cbor(b"\xa0").raw) is None
    assert found > 148


def _commit_body(records: dict[str, dict[str, Any]], *, too_big: bool = False,
                 omit: set[str] = frozenset(), extra_ops: list[dict[str, Any]] | None = None) -> bytes:
    """A hand-built #commit frame (no signature; decoding does not need one)."""
    blocks = []
    ops = []
    for path, rec in records.items():
        block = encode(from_json_form(rec))
        cid = CID.for_dag_cbor(block)
        if path not in omit:
            blocks.append((cid, block))
        ops.append({"action": "create", "path": path, "cid": cid})
    ops.extend(extra_ops or [])
    commit_cid = CID.for_dag_cbor(b"\xa0")
    body = {"seq": 7, "rebase": False, "tooBig": too_big, "repo": "did:plc:abc", "commit": commit_cid,
            "rev": "3kabcdefghij2", "since": None, "blocks": write_car([commit_cid], blocks), "ops": ops,
            "blobs": [], "time": "2024-01-02T03:04:05.678Z"}
    return encode_frame({"op": 1, "t": "#commit"}, body)


def test_byte_strings_and_links_keep_their_json_forms() -> None:
    link = str(CID.for_raw(b"image"))
    record = {"$type": "com.example.thing", "blob": {"$type": "blob", "ref": {"$link": link}, "mimeType": "image/png",
                                                     "size": 5},
              "raw": {"$bytes": "AAEC/w"}, "n": 3}
    decoded = decode_frame(_commit_body({"com.example.thing/3k2abc": record}))
    (ev,) = decoded.events
    assert isinstance(ev, RecordEvent)
    assert ev.record == record
    assert ev.time_us == timestamp_us("2024-01-02T03:04:05.678Z")


def test_collection_filter_skips_before_decoding_records() -> None:
    data = _commit_body({"app.bsky.feed.like/3k2a": {"$type": "app.bsky.feed.like"},
                         "app.bsky.feed.post/3k2b": {"$type": "app.bsky.feed.post", "text": "hi"}})
    decoded = decode_frame(data, collections=lambda c: c == "app.bsky.feed.post")
    assert [e.collection for e in decoded.events if isinstance(e, RecordEvent)] == ["app.bsky.feed.post"]
    assert decoded.filtered == 1


def test_missing_record_block_is_a_drop_unless_too_big() -> None:
    recs = {"app.bsky.feed.like/3k2a": {"$type": "app.bsky.feed.like"}}
    with pytest.raises(DecodeError) as e:
        decode_frame(_commit_body(recs, omit={"app.bsky.feed.like/3k2a"}))
    assert e.value.reason == "missing_block"
    decoded = decode_frame(_commit_body(recs, omit={"app.bsky.feed.like/3k2a"}, too_big=True))
    assert decoded.events == []
    assert decoded.too_big == 1


def test_a_deleted_record_needs_no_block() -> None:
    decoded = decode_frame(_commit_body({}, extra_ops=[
        {"action": "delete", "path": "app.bsky.feed.like/3k2z", "cid": None}]))
    (ev,) = decoded.events
    assert isinstance(ev, RecordEvent)
    assert (ev.operation, ev.record, ev.cid, ev.rkey) == ("delete", None, None, "3k2z")


def test_a_corrupted_record_block_is_bad_cid(frames: list[bytes]) -> None:
    data = frames[0]
    _, body = libipld.decode_dag_cbor_multi(data)
    block = read_car(body["blocks"]).get(CID.from_bytes(body["ops"][0]["cid"]))
    assert block is not None
    at = data.index(block) + len(block) - 3
    corrupted = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
    with pytest.raises(DecodeError) as e:
        decode_frame(corrupted)
    assert e.value.reason == "bad_cid"


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "malformed_frame"),
    (b"\xff\x00garbage", "malformed_cbor"),
    (encode({"op": 1, "t": "#commit"}), "malformed_frame"),
    (encode({"op": 1, "t": "#commit"}) + encode({}) + encode({}), "malformed_frame"),
    (encode({"op": 2, "t": "#commit"}) + encode({}), "malformed_frame"),
    (encode({"op": 1}) + encode({}), "malformed_frame"),
    (encode([1]) + encode({}), "malformed_frame"),
    (encode({"op": 1, "t": "#commit"}) + encode({"seq": 1}), "malformed_frame"),
    (encode({"op": 1, "t": "#identity"}) + encode({"seq": 1, "did": "did:plc:x", "time": "yesterday"}),
     "malformed_frame"),
    (encode({"op": 1, "t": "#account"}) + encode({"seq": 1, "did": "did:plc:x", "time": "2024-01-01T00:00:00Z",
                                                 "active": "yes"}), "malformed_frame"),
    (encode({"op": 1, "t": "#identity"}) + encode({"seq": -1, "did": "did:plc:x", "time": "2024-01-01T00:00:00Z"}),
     "malformed_frame"),
])
def test_bad_frames_raise_drop_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as e:
        decode_frame(data)
    assert e.value.reason == reason


def test_the_other_message_types() -> None:
    info = decode_frame(info_frame("OutdatedCursor", "too old"))
    assert (info.kind, info.name, info.message, info.seq) == (KIND_INFO, "OutdatedCursor", "too old", None)
    err = decode_frame(error_frame("FutureCursor"))
    assert (err.kind, err.name) == (KIND_ERROR, "FutureCursor")
    sync = decode_frame(encode_frame({"op": 1, "t": "#sync"}, {"seq": 9, "did": "did:plc:x", "blocks": b"",
                                                               "rev": "3k", "time": "2024-01-01T00:00:00Z"}))
    assert (sync.kind, sync.seq, sync.did, sync.events) == (KIND_SYNC, 9, "did:plc:x", [])
    unknown = decode_frame(encode_frame({"op": 1, "t": "#tombstone"}, {"seq": 10, "did": "did:plc:y"}))
    assert (unknown.kind, unknown.type, unknown.seq, unknown.did) == (KIND_UNKNOWN, "#tombstone", 10, "did:plc:y")
    ident = decode_frame(encode_frame({"op": 1, "t": "#identity"}, {"seq": 11, "did": "did:plc:z",
                                                                    "time": "2024-01-01T00:00:00Z",
                                                                    "handle": "z.test"}))
    (ev,) = ident.events
    assert isinstance(ev, IdentityEvent)
    assert (ev.handle, ev.seq, ev.cursor) == ("z.test", 11, 11)
    acct = decode_frame(encode_frame({"op": 1, "t": "#account"}, {"seq": 12, "did": "did:plc:z", "active": False,
                                                                  "status": "takendown",
                                                                  "time": "2024-01-01T00:00:00Z"}))
    (ev2,) = acct.events
    assert isinstance(ev2, AccountEvent)
    assert (ev2.active, ev2.status) == (False, "takendown")


def test_parse_frame_reports_the_account() -> None:
    frame = parse_frame(encode_frame({"op": 1, "t": "#commit"}, {"seq": 3, "repo": "did:plc:r"}))
    assert (frame.type, frame.seq, frame.did) == ("#commit", 3, "did:plc:r")
    frame = parse_frame(error_frame("ConsumerTooSlow"))
    assert (frame.op, frame.type, frame.seq, frame.did) == (-1, None, None, None)


def test_parse_time_us() -> None:
    assert parse_time_us("1970-01-01T00:00:01.5Z") == 1_500_000
    assert parse_time_us("2024-01-01T01:00:00+01:00") == timestamp_us("2024-01-01T00:00:00Z")
    with pytest.raises(DecodeError):
        parse_time_us("2024-01-01T00:00:00")  # no zone
    with pytest.raises(DecodeError):
        parse_time_us(12)


# Regressions found by the fuzz targets (tests/fuzz).


def _frame_with(ops: list[dict[str, Any]] | None = None, **body: Any) -> bytes:
    base = {"seq": 7, "rebase": False, "tooBig": False, "repo": "did:plc:abc", "commit": CID.for_dag_cbor(b"\xa0"),
            "rev": "3kabcdefghij2", "since": None, "blocks": write_car([CID.for_dag_cbor(b"\xa0")], []),
            "ops": ops if ops is not None else [], "blobs": [], "time": "2024-01-02T03:04:05.678Z"}
    base.update(body)
    return encode_frame({"op": 1, "t": "#commit"}, base)


def test_fuzz_an_unhashable_op_action_is_malformed() -> None:
    # an action of ["app.bsky.richtext.facet#mention", None] raised TypeError (unhashable 'list')
    data = _frame_with([{"action": ["app.bsky.richtext.facet#mention", None], "path": "app.bsky.feed.like/3k",
                         "cid": None}])
    with pytest.raises(DecodeError) as info:
        decode_frame(data)
    assert info.value.reason == "malformed_frame"


def test_fuzz_a_seq_beyond_an_avro_long_is_malformed() -> None:
    # seq 2**64 - 1 decoded, then crashed the producer's Avro encoder with OverflowError
    with pytest.raises(DecodeError) as info:
        decode_frame(_frame_with(seq=(1 << 64) - 1))
    assert info.value.reason == "malformed_frame"
    identity = encode_frame({"op": 1, "t": "#identity"},
                            {"seq": 1 << 63, "did": "did:plc:abc", "time": "2024-01-02T03:04:05.678Z"})
    with pytest.raises(DecodeError):
        decode_frame(identity)


@pytest.mark.parametrize("collection", ["#account", "a:b.c", "app~bsky.feed.like", "x" * 400])
def test_fuzz_an_op_collection_that_is_not_an_nsid_is_malformed(collection: str) -> None:
    # it would have become the illegal Kafka topic "atproto.<collection>"
    data = _frame_with([{"action": "delete", "path": f"{collection}/3k", "cid": None}])
    with pytest.raises(DecodeError) as info:
        decode_frame(data)
    assert info.value.reason == "malformed_frame"


@pytest.mark.timeout(30)
def test_fuzz_a_slice_repeating_the_cid_before_long_lengths_stays_linear() -> None:
    # Every copy of the CID preceded by ff ff 7f offered a 2 MB candidate to hash: 80,000 copies
    # (3 MB) took 70 s of sha256, an 8 MB frame hours. The fast path now stops at its hash budget.
    cid = CID.for_dag_cbor(b"\xa1arb")
    blocks = (b"\xff\xff\x7f" + cid.raw) * 80_000
    assert find_block(blocks, cid.raw) is None
    data = _frame_with([{"action": "create", "path": "app.bsky.feed.like/3k", "cid": cid}], blocks=blocks,
                       tooBig=True)
    with pytest.raises(DecodeError) as info:
        decode_frame(data)
    assert info.value.reason == "malformed_car"


def test_fuzz_many_ops_on_one_block_all_find_it() -> None:
    # the fast path and the slice share one hashing budget per frame: ops of one block still all decode
    record = encode(from_json_form({"$type": "app.bsky.feed.like", "createdAt": "2024-01-01T00:00:00Z"}))
    cid = CID.for_dag_cbor(record)
    blocks = write_car([cid], [(cid, record)])
    ops = [{"action": "create", "path": f"app.bsky.feed.like/3k{i}", "cid": cid} for i in range(2000)]
    decoded = decode_frame(_frame_with(ops, blocks=blocks))
    assert len(decoded.events) == 2000

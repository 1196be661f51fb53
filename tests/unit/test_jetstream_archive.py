"""Jetstream v2 archive rows -> typed events (``producers.jetstream.archive``): kinds, CIDs, filters,
drops, the native and Python paths, and the events' Avro encoding."""

from __future__ import annotations

from typing import Final

import orjson
import pytest

from producers.jetstream.archive import (
    ORIGIN,
    RowFilter,
    decode_block_rows,
    decode_row,
    event_json,
    iter_block_chunks,
)
from runtime.atproto import native
from runtime.atproto.cid import CID
from runtime.atproto.dagcbor import encode
from runtime.atproto.segment import (
    KIND_ACCOUNT,
    KIND_CREATE,
    KIND_DELETE,
    KIND_IDENTITY,
    KIND_RESYNC_CREATE,
    KIND_SYNC,
    KIND_UPDATE,
    Block,
    Row,
    Segment,
    encode_block,
    parse_block,
)
from runtime.contract.codec import AvroCodec
from runtime.contract.records import AccountEvent, IdentityEvent, RecordEvent, Source, SyncEvent
from runtime.contract.topics import TopicMap
from runtime.errors import DROP_REASONS, DropError
from tests.unit.jetstream2_golden import CORPUS_RECORD_CIDS, GOLDEN_CORPUS_SEGMENT

DID = "did:plc:alice"
POST = {"$type": "app.bsky.feed.post", "text": "hello", "createdAt": "2026-01-01T00:00:00.000Z"}
LIKE = {"$type": "app.bsky.feed.like", "createdAt": "2026-01-01T00:00:00.000Z",
        "subject": {"uri": "at://did:plc:bob/app.bsky.feed.post/3k", "cid": str(CID.for_dag_cbor(b"\xa0"))}}
WITNESSED = 1_760_000_000_000_000


def _row(seq: int, kind: int = KIND_CREATE, *, did: str = DID, collection: str = "app.bsky.feed.post",
         rkey: str = "3kabc", rev: str = "3lrev", payload: bytes | None = None, indexed: int = 0,
         witnessed: int | None = None) -> Row:
    if payload is None:
        payload = b"" if kind in (KIND_DELETE,) else encode(POST)
    return Row(seq, WITNESSED + seq if witnessed is None else witnessed, indexed, kind, collection, did, rkey, rev,
               payload)


#: A #sync body (the upstream subscribeRepos event) whose rev is a real TID.
SYNC_BODY: Final = {"seq": 903, "did": DID, "time": "2026-01-01T00:00:03.000Z", "rev": "3lnewrev22222",
                    "blocks": b"\x00"}


def _marker_row(seq: int, kind: int, body: dict[str, object], did: str = DID) -> Row:
    return Row(seq, WITNESSED + seq, 0, kind, "", did, "", "", encode(body))


def _block(rows: list[Row]) -> Block:
    return parse_block(encode_block(rows))


@pytest.fixture
def path(atproto_path: str) -> str:
    return atproto_path


def test_golden_corpus_rows_become_events_with_the_listed_cids(path: str) -> None:
    seg = Segment(GOLDEN_CORPUS_SEGMENT)
    events = []
    for _info, block in seg.iter_blocks():
        result = decode_block_rows(block, job="j")
        assert result.drops == [] and not result.skipped
        events += result.items
    assert len(events) == 23
    assert all(isinstance(e, RecordEvent) for e in events)
    records = [e for e in events if isinstance(e, RecordEvent)]
    assert {f"{e.collection}/{e.rkey}": e.cid for e in records} == CORPUS_RECORD_CIDS
    for i, e in enumerate(records, start=1):
        assert (e.cursor, e.time_us, e.operation, e.source, e.job) == (i, 1_750_000_000_000_000 + i, "create",
                                                                       Source.JETSTREAM2.value, "j")
        assert e.time_us in (e.indexed_at, e.witnessed_at)
        assert e.record is not None and e.record["$type"] == e.collection
        if e.record_json is not None:
            assert orjson.loads(e.record_json) == e.record


def test_native_and_python_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    if native.NATIVE is None:
        pytest.skip("the native extension is not built")
    block = Segment(GOLDEN_CORPUS_SEGMENT).block(1)
    fast = decode_block_rows(block).items
    monkeypatch.setattr(native, "NATIVE", None)
    assert decode_block_rows(block).items == fast


def test_every_kind(path: str) -> None:
    rows = [
        _row(1, KIND_CREATE),
        _row(2, KIND_UPDATE, payload=encode({**POST, "text": "edited"}), indexed=1_700_000_000_000_000),
        _row(3, KIND_DELETE),
        _row(4, KIND_RESYNC_CREATE, collection="app.bsky.feed.like", payload=encode(LIKE)),
        _marker_row(5, KIND_IDENTITY, {"seq": 900, "did": DID, "time": "2026-01-01T00:00:00.000Z",
                                       "handle": "alice.test"}),
        _marker_row(6, KIND_ACCOUNT, {"seq": 901, "did": DID, "time": "2026-01-01T00:00:01.000Z",
                                      "active": False, "status": "deleted"}),
        _marker_row(7, KIND_SYNC, {"seq": 902, "did": DID, "time": "2026-01-01T00:00:02.000Z", "rev": "3lnew",
                                   "blocks": b"\x00"}),
    ]
    result = decode_block_rows(_block(rows), job="j")
    assert result.drops == [] and result.last_seq == 7
    create, update, delete, resync, ident, acct, sync = result.items
    assert isinstance(create, RecordEvent) and create.operation == "create" and create.record == POST
    assert create.cid == str(CID.for_dag_cbor(encode(POST)))
    assert isinstance(update, RecordEvent) and update.operation == "update"
    assert update.time_us == 1_700_000_000_000_000  # indexed_at wins over witnessed_at
    assert create.time_us == WITNESSED + 1
    # both row times travel as they are; an indexed_at of 0 is unknown: None
    assert (update.witnessed_at, update.indexed_at) == (WITNESSED + 2, 1_700_000_000_000_000)
    assert (create.witnessed_at, create.indexed_at) == (WITNESSED + 1, None)
    assert (delete.witnessed_at, delete.indexed_at) == (WITNESSED + 3, None)
    assert all(e.source == Source.JETSTREAM2.value for e in (create, update, delete, resync, ident, acct))
    assert isinstance(delete, RecordEvent) and delete.operation == "delete"
    assert (delete.record, delete.cid, delete.rev) == (None, None, "3lrev")
    assert isinstance(resync, RecordEvent) and resync.operation == "create" and resync.record == LIKE
    assert isinstance(ident, IdentityEvent)
    assert (ident.did, ident.handle, ident.seq, ident.cursor, ident.time_us, ident.source, ident.job) == (
        DID, "alice.test", 900, 5, WITNESSED + 5, Source.JETSTREAM2.value, "j")
    assert (ident.witnessed_at, ident.indexed_at) == (WITNESSED + 5, None)
    assert ident.time == "2026-01-01T00:00:00.000Z"
    assert isinstance(acct, AccountEvent)
    assert (acct.active, acct.status, acct.seq, acct.cursor) == (False, "deleted", 901, 6)
    assert (acct.witnessed_at, acct.indexed_at) == (WITNESSED + 6, None)
    assert sync == SyncEvent(DID, "3lnew", 902, "2026-01-01T00:00:02.000Z", Source.JETSTREAM2.value, 7,
                             WITNESSED + 7, "j", witnessed_at=WITNESSED + 7, indexed_at=None)
    assert [e.cursor for e in result.items] == list(range(1, 8))


def test_event_json_is_the_v1_shape_plus_seq() -> None:
    items = decode_block_rows(_block([
        _row(1), _row(2, KIND_DELETE),
        _marker_row(3, KIND_SYNC, {"seq": 9, "did": DID, "time": "2026-01-01T00:00:02.000Z", "rev": "3r"}),
    ])).items
    first = event_json(items[0])
    assert first == {"did": DID, "time_us": WITNESSED + 1, "kind": "commit", "seq": 1,
                     "commit": {"rev": "3lrev", "operation": "create", "collection": "app.bsky.feed.post",
                                "rkey": "3kabc", "record": POST, "cid": str(CID.for_dag_cbor(encode(POST)))}}
    assert event_json(items[1])["commit"] == {"rev": "3lrev", "operation": "delete",
                                              "collection": "app.bsky.feed.post", "rkey": "3kabc"}
    assert event_json(items[2]) == {"did": DID, "time_us": WITNESSED + 3, "kind": "sync", "seq": 3,
                                    "sync": {"did": DID, "rev": "3r", "seq": 9, "time": "2026-01-01T00:00:02.000Z"}}


def _mixed() -> Block:
    return _block([
        _row(1, collection="app.bsky.feed.post"),
        _row(2, collection="app.bsky.feed.like", payload=encode(LIKE)),
        _row(3, collection="app.bsky.graph.follow", did="did:plc:bob",
             payload=encode({"$type": "app.bsky.graph.follow", "subject": DID, "createdAt": "2026-01-01T00:00:00Z"})),
        _row(4, KIND_DELETE, collection="app.bsky.feed.postgate"),
        _marker_row(5, KIND_ACCOUNT, {"seq": 1, "did": "did:plc:bob", "time": "2026-01-01T00:00:00Z",
                                      "active": True}, did="did:plc:bob"),
        _marker_row(6, KIND_IDENTITY, {"seq": 2, "did": DID, "time": "2026-01-01T00:00:00Z"}),
    ])


def _seqs(flt: RowFilter) -> list[int]:
    return [e.cursor for e in decode_block_rows(_mixed(), flt=flt).items]


def test_filters_are_exact() -> None:
    assert _seqs(RowFilter()) == [1, 2, 3, 4, 5, 6]
    # exact collection: markers pass every collection filter; app.bsky.feed.postgate is not app.bsky.feed.post
    assert _seqs(RowFilter.of(collections=["app.bsky.feed.post"])) == [1, 5, 6]
    assert _seqs(RowFilter.of(collections=["app.bsky.feed.*"])) == [1, 2, 4, 5, 6]
    assert _seqs(RowFilter.of(collections=["app.bsky.graph.*", "app.bsky.feed.like"])) == [2, 3, 5, 6]
    assert _seqs(RowFilter.of(dids=["did:plc:bob"])) == [3, 5]
    assert _seqs(RowFilter.of(kinds=["commit"])) == [1, 2, 3, 4]
    assert _seqs(RowFilter.of(kinds=["account", "identity"])) == [5, 6]
    assert _seqs(RowFilter.of(collections=["app.bsky.feed.like"], kinds=["commit"])) == [2]
    assert _seqs(RowFilter.of(after_seq=2, before_seq=5)) == [3, 4, 5]
    result = decode_block_rows(_mixed(), flt=RowFilter.of(after_seq=2, collections=["app.bsky.feed.like"]))
    assert [e.cursor for e in result.items] == [5, 6]
    assert result.skipped == {"before_cursor": 2, "filtered": 2}
    assert result.last_seq == 6
    with pytest.raises(ValueError, match="unknown kinds"):
        RowFilter.of(kinds=["commits"])


def _drops(rows: list[Row], **kwargs: object) -> list[tuple[str, int | None]]:
    result = decode_block_rows(_block(rows), **kwargs)  # type: ignore[arg-type]
    assert all(d.reason in DROP_REASONS and d.origin == ORIGIN for d in result.drops)
    return [(d.reason, d.cursor) for d in result.drops]


def test_bad_rows_are_dropped_and_the_block_goes_on(path: str) -> None:
    rows = [
        _row(1),
        _row(2, collection="not an nsid"),
        _row(3, payload=b""),                                   # a create without its record
        _row(4, payload=b"\xff\x00"),                           # not DAG-CBOR
        _row(5, payload=encode(["a", "list"])),                 # not a map
        _row(6, did="plc:nodid"),
        _row(7, rkey=""),
        _row(8, witnessed=-5),
        _marker_row(9, KIND_IDENTITY, {"seq": 1, "did": "did:plc:someone-else", "time": "2026-01-01T00:00:00Z"}),
        Row(10, WITNESSED, 0, KIND_ACCOUNT, "", DID, "", "", b"\xff"),
        _marker_row(11, KIND_SYNC, {"seq": 3, "did": DID, "time": "2026-01-01T00:00:00Z"}),
        _marker_row(12, KIND_ACCOUNT, {"seq": 4, "did": DID, "time": "2026-01-01T00:00:00Z"}),  # no active
        _row(13, payload=encode(POST) + b"x" * 100),             # trailing bytes after the record
        _row(14),
    ]
    result = decode_block_rows(_block(rows))
    assert [e.cursor for e in result.items] == [1, 14]
    assert [(d.reason, d.cursor) for d in result.drops] == [
        ("invalid_record", 2), ("missing_block", 3), ("malformed_cbor", 4), ("malformed_cbor", 5),
        ("invalid_record", 6), ("invalid_record", 7), ("invalid_record", 8), ("invalid_record", 9),
        ("malformed_cbor", 10), ("malformed_frame", 11), ("malformed_frame", 12), ("malformed_cbor", 13),
    ]
    assert result.drops[2].payload == b"\xff\x00" and result.drops[2].did == DID


def test_oversize_record() -> None:
    big = encode({**POST, "text": "x" * 2000})
    assert _drops([_row(1, payload=big)], max_record_bytes=1000) == [("oversize", 1)]
    assert _drops([_row(1, payload=big)]) == []


def test_unknown_kind_in_a_row_is_a_drop() -> None:
    with pytest.raises(DropError) as e:
        decode_row(_row(1)._replace(kind=9))
    assert e.value.reason == "unknown_event"


def test_cid_is_recomputed_and_a_non_canonical_payload_is_caught(path: str) -> None:
    canonical = encode({"$type": "app.bsky.feed.post", "n": 1})
    # the same record with a non-shortest integer head (0x18 0x01 for 1): libipld accepts it
    loose = canonical.replace(b"an\x01", b"an\x18\x01")
    assert loose != canonical
    plain = decode_block_rows(_block([_row(1, payload=loose)]))
    assert plain.drops == []
    event = plain.items[0]
    assert isinstance(event, RecordEvent)
    assert event.cid == str(CID.for_dag_cbor(loose)) != str(CID.for_dag_cbor(canonical))
    checked = decode_block_rows(_block([_row(1, payload=loose), _row(2, payload=canonical)]), verify_cid=True)
    assert [(d.reason, d.cursor) for d in checked.drops] == [("bad_cid", 1)]
    assert str(CID.for_dag_cbor(canonical)) in checked.drops[0].detail
    ok = checked.items[0]
    assert isinstance(ok, RecordEvent) and ok.cid == str(CID.for_dag_cbor(canonical))


def test_events_encode_as_avro() -> None:
    codec, topics = AvroCodec(), TopicMap("t")
    items = decode_block_rows(Segment(GOLDEN_CORPUS_SEGMENT).block(0)).items + decode_block_rows(_block([
        _marker_row(1, KIND_IDENTITY, {"seq": 1, "did": DID, "time": "2026-01-01T00:00:00Z", "handle": "a.test"}),
        _marker_row(2, KIND_ACCOUNT, {"seq": 2, "did": DID, "time": "2026-01-01T00:00:00Z", "active": True}),
        _row(3, KIND_DELETE), _marker_row(4, KIND_SYNC, SYNC_BODY)])).items
    assert any(isinstance(item, SyncEvent) for item in items)
    for item in items:
        topic = topics.for_event(item)
        _schema, datum = codec.decode(codec.encode_event(item, topic))
        assert datum["did"] == item.did


def test_chunks_decode_the_same_rows() -> None:
    block = _mixed()
    whole = decode_block_rows(block)
    chunks = list(iter_block_chunks(block, 4))
    assert [len(c.items) for c in chunks] == [4, 2]
    assert [e for c in chunks for e in c.items] == whole.items
    assert [c.last_seq for c in chunks] == [4, 6]
    part = decode_block_rows(block, start=1, stop=3, flt=RowFilter.of(after_seq=2))
    assert [e.cursor for e in part.items] == [3] and part.skipped == {"before_cursor": 1} and part.last_seq == 3
    with pytest.raises(ValueError, match="size"):
        list(iter_block_chunks(block, 0))

"""Pure repository decoding: commit -> MST -> records, filters, timestamp policy, per-record drops."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from producers.repos.decode import RecordFilter, RepoDecodeError, RepoDecoder, record_type
from producers.source import Drop, Skip
from runtime.atproto.car import Car, open_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import UnsignedCommit, sign_commit
from runtime.atproto.crypto import KeyPair
from runtime.atproto.mst import build
from runtime.atproto.repo import build_repo_blocks
from runtime.atproto.tid import make_tid, tid_to_time_us
from runtime.contract.created_at import OutOfRange, TimestampPolicy
from runtime.contract.records import RecordEvent
from runtime.errors import ConfigError

DID = "did:plc:decodertestaaaaaaaaaaaaa"
KEY = KeyPair.generate("k256", random.Random(9))
T0 = 1_727_395_200_000_000


def _records() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for i in range(40):
        t = T0 + i * 86_400_000_000
        created = datetime.fromtimestamp(t / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        kind = i % 5
        if kind == 0:
            rec: dict[str, Any] = {"$type": "app.bsky.feed.post", "text": f"post {i}", "createdAt": created}
        elif kind == 1:
            rec = {"$type": "app.bsky.feed.post", "text": f"reply {i}", "createdAt": created,
                   "reply": {"root": {"uri": "at://did:plc:x/app.bsky.feed.post/1", "cid": "bafy"},
                             "parent": {"uri": "at://did:plc:x/app.bsky.feed.post/1", "cid": "bafy"}}}
        elif kind == 2:
            rec = {"$type": "app.bsky.feed.like", "createdAt": created,
                   "subject": {"uri": "at://did:plc:x/app.bsky.feed.post/1", "cid": "bafy"}}
        elif kind == 3:
            rec = {"$type": "app.bsky.graph.follow", "subject": "did:plc:x", "createdAt": created}
        else:
            rec = {"$type": "com.example.thing", "createdAt": created, "blob": {"$bytes": "AAEC"}}
        out[f"{rec['$type']}/{make_tid(t)}"] = rec
    out["app.bsky.actor.profile/self"] = {"$type": "app.bsky.actor.profile", "displayName": "x"}
    return out


RECORDS = _records()
REV = make_tid(T0 + 50 * 86_400_000_000)


def _car(records: dict[str, dict[str, Any]] | None = None, did: str = DID) -> tuple[Car, Any]:
    built = build_repo_blocks(did, KEY, records or RECORDS, REV)
    return Car(roots=[built.commit_cid], blocks=dict(built.blocks)), built


def _events(items: list[Any]) -> list[RecordEvent]:
    return [i for i in items if isinstance(i, RecordEvent)]


def test_every_record_with_the_envelope() -> None:
    car, built = _car()
    dec = RepoDecoder(car, DID, RecordFilter(), job="j", cursor=7, signing_key=KEY.did_key())
    items = list(dec.items())
    events = _events(items)
    assert len(events) == len(RECORDS)
    assert [f"{e.collection}/{e.rkey}" for e in events] == sorted(RECORDS)  # MST (key) order
    for e in events:
        assert e.operation == "create"
        assert e.source == "repo"
        assert e.rev == REV
        assert e.job == "j"
        assert e.cursor == 7
        assert e.time_us == tid_to_time_us(REV)
        assert e.cid == str(built.record_cids[f"{e.collection}/{e.rkey}"])
        assert e.record == RECORDS[f"{e.collection}/{e.rkey}"]  # links and bytes in JSON form
    s = dec.summary
    assert s.records == len(RECORDS)
    assert s.entries == len(RECORDS)
    assert s.by_type == {"post": 8, "reply": 8, "like": 8, "follow": 8, "other": 8, "profile": 1}
    assert not [i for i in items if isinstance(i, Skip)]


def test_record_types_and_collections_filter() -> None:
    car, _ = _car()
    flt = RecordFilter(types=frozenset({"reply", "like"}), collections=("com.example.*",))
    dec = RepoDecoder(car, DID, flt)
    items = list(dec.items())
    kinds = {record_type(e.collection, e.record) for e in _events(items)}
    assert kinds == {"reply", "like", "other"}
    skips = {i.reason: i.count for i in items if isinstance(i, Skip)}
    assert skips == {"collection_filter": 8 + 8 + 1}  # posts (decoded, not replies), follows, profile
    with pytest.raises(ConfigError):
        RecordFilter(types=frozenset({"tweet"}))


def test_timestamp_policy_drop_and_keep() -> None:
    car, _ = _car()
    start = datetime.fromtimestamp((T0 + 10 * 86_400_000_000) / 1e6, UTC)
    end = datetime.fromtimestamp((T0 + 20 * 86_400_000_000) / 1e6, UTC)
    drop = RepoDecoder(car, DID, RecordFilter(policy=TimestampPolicy(start, end, OutOfRange.DROP)))
    items = list(drop.items())
    assert len(_events(items)) == 10
    # the profile has no createdAt: unparseable, so out of range
    assert {i.reason: i.count for i in items if isinstance(i, Skip)} == {"out_of_range_timestamp": 31}
    assert drop.summary.timestamps == {"in_range": 10, "dropped": 31}
    keep = RepoDecoder(car, DID, RecordFilter(policy=TimestampPolicy(start, end, OutOfRange.KEEP)))
    assert len(_events(list(keep.items()))) == len(RECORDS)
    assert keep.summary.timestamps == {"in_range": 10, "kept": 31}


def _corrupt(car: Car, path: str, built: Any, block: bytes | None) -> None:
    cid = built.record_cids[path]
    if block is None:
        del car.blocks[cid]
    else:
        car.blocks[cid] = block


def test_bad_records_are_dropped_one_by_one() -> None:
    car, built = _car()
    paths = sorted(RECORDS)
    _corrupt(car, paths[0], built, None)  # missing
    _corrupt(car, paths[1], built, b"\xa1\x61x\x01different")  # bytes that do not match the CID
    _corrupt(car, paths[2], built, b"\xff\xff")  # garbage under a record's CID
    dec = RepoDecoder(car, DID, RecordFilter())
    items = list(dec.items())
    drops = [i for i in items if isinstance(i, Drop)]
    assert [d.reason for d in drops] == ["missing_block", "bad_cid", "bad_cid"]
    assert all(d.did == DID and d.origin.startswith(f"repo:{DID}/") for d in drops)
    assert len(_events(items)) == len(RECORDS) - 3
    assert dec.summary.dropped == {"missing_block": 1, "bad_cid": 2}


def test_malformed_record_that_matches_its_cid_is_dropped() -> None:
    _, built = _car()
    path = sorted(RECORDS)[5]
    junk = b"\x9f\x01\xff"  # indefinite-length array: not DAG-CBOR
    # Point the tree at a CID that matches the junk: rebuild blocks with the junk as a record.
    cids = dict(built.record_cids)
    junk_cid = CID.for_dag_cbor(junk)
    cids[path] = junk_cid
    root, nodes = build(cids.items())
    commit_cid, commit_block = sign_commit(UnsignedCommit(did=DID, data=root, rev=REV), KEY)
    blocks = {**built.blocks, **nodes, junk_cid: junk, commit_cid: commit_block}
    dec = RepoDecoder(Car([commit_cid], blocks), DID, RecordFilter())
    drops = [i for i in dec.items() if isinstance(i, Drop)]
    assert [d.reason for d in drops] == ["malformed_cbor"]
    assert drops[0].payload == junk


def test_oversize_record_is_dropped() -> None:
    records = dict(RECORDS)
    records["app.bsky.feed.post/3zzzzzzzzzzzz"] = {"$type": "app.bsky.feed.post", "text": "x" * 5000,
                                                     "createdAt": "2024-10-01T00:00:00Z"}
    car, _ = _car(records)
    dec = RepoDecoder(car, DID, RecordFilter(max_record_bytes=1000))
    drops = [i for i in dec.items() if isinstance(i, Drop)]
    assert [d.reason for d in drops] == ["oversize"]


def test_deep_nesting_is_dropped() -> None:
    records = dict(RECORDS)
    deep: dict[str, Any] = {"x": 1}
    for _ in range(30):
        deep = {"x": deep}
    records["com.example.deep/3zzzzzzzzzzzz"] = {"$type": "com.example.deep", "v": deep}
    car, _ = _car(records)
    dec = RepoDecoder(car, DID, RecordFilter(max_depth=16))
    drops = [i for i in dec.items() if isinstance(i, Drop)]
    assert [d.reason for d in drops] == ["malformed_cbor"]


def test_whole_repository_failures_raise_before_anything_is_produced() -> None:
    car, built = _car()
    # a missing MST node
    node = next(c for c in built.blocks if c not in built.record_cids.values() and c != built.commit_cid)
    broken = Car(car.roots, {c: b for c, b in car.blocks.items() if c != node})
    with pytest.raises(RepoDecodeError) as info:
        RepoDecoder(broken, DID, RecordFilter())
    assert info.value.reason == "missing_block"
    # the commit is for someone else
    with pytest.raises(RepoDecodeError) as info:
        RepoDecoder(car, "did:plc:someoneelseaaaaaaaaaaaaa", RecordFilter())
    assert info.value.reason == "invalid_record"
    # a signature by another key
    other = KeyPair.generate("p256", random.Random(10))
    with pytest.raises(RepoDecodeError) as info:
        RepoDecoder(car, DID, RecordFilter(), signing_key=other.did_key())
    assert info.value.reason == "bad_signature"
    # no commit block at all
    with pytest.raises(RepoDecodeError) as info:
        RepoDecoder(Car(car.roots, {}), DID, RecordFilter())
    assert info.value.reason == "missing_block"


def test_fixture_repo_car(fixtures_dir: Path) -> None:
    with open_car(fixtures_dir / "repo.car", verify=False) as car:
        dec = RepoDecoder(car, "did:plc:53iucmf5ldftgqyf2ac7hmhd", RecordFilter())
        events = _events(list(dec.items()))
    assert len(events) == 23
    assert dec.summary.by_type == {"like": 10, "post": 5, "repost": 3, "follow": 3, "profile": 1, "reply": 1}
    assert events[0].collection == "app.bsky.actor.profile"
    assert dec.commit.rev == "3migo7fijwi2k"


def test_huge_trees_are_walked_twice_with_the_same_result() -> None:
    car, _ = _car()
    cached = [(e.collection, e.rkey, e.cid) for e in _events(list(RepoDecoder(car, DID, RecordFilter()).items()))]
    dec = RepoDecoder(car, DID, RecordFilter(), max_cached_entries=5)
    assert dec._entries is None  # nothing kept beyond the cap
    walked = [(e.collection, e.rkey, e.cid) for e in _events(list(dec.items()))]
    assert walked == cached



def test_fuzz_an_mst_key_whose_collection_is_not_an_nsid_is_dropped() -> None:
    # an MST key admits ":" and "~"; such a record would have gone to an illegal Kafka topic
    records = {"app.bsky.feed.like:x/3kaaaaaaaaaa2": {"$type": "app.bsky.feed.like"},
               "app.bsky.feed.like/3kaaaaaaaaaa2": {"$type": "app.bsky.feed.like"}}
    car, _ = _car(records)
    items = list(RepoDecoder(car, DID, RecordFilter()).items())
    drops = [i for i in items if isinstance(i, Drop)]
    assert [d.reason for d in drops] == ["invalid_record"]
    assert [e.collection for e in _events(items)] == ["app.bsky.feed.like"]

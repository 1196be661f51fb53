"""Whole repositories: build and read back, the real export, and firehose commit verification."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from runtime.atproto.car import open_car, read_car, write_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import verify_commit
from runtime.atproto.crypto import KeyPair
from runtime.atproto.dagcbor import encode
from runtime.atproto.errors import (
    BlockMismatchError,
    CarError,
    CommitFormatError,
    InversionError,
    MissingBlockError,
    MSTError,
    SignatureError,
)
from runtime.atproto.identity import parse_did_document
from runtime.atproto.mst import build
from runtime.atproto.repo import (
    build_repo,
    build_repo_blocks,
    iter_repo_records,
    read_commit,
    verify_commit_event,
)
from runtime.atproto.tid import make_tid

from .atproto_corpus import REPO_DID, commit_bodies, did_docs, fixture_path, repo_car_bytes

DID = "did:plc:testrepo000000000000000"
BLOB = {"$link": "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"}


def _records(n: int = 30) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {
        "app.bsky.actor.profile/self": {
            "$type": "app.bsky.actor.profile",
            "displayName": "Test",
            "avatar": {"$type": "blob", "ref": BLOB, "mimeType": "image/png", "size": 123},
        },
        "com.example.binary/3k2aaaaaaaaa2": {"$type": "com.example.binary", "data": {"$bytes": "AAECAw"}},
    }
    for i in range(n):
        rkey = make_tid(1_700_000_000_000_000 + i * 1_000_003, i % 32)
        records[f"app.bsky.feed.post/{rkey}"] = {
            "$type": "app.bsky.feed.post",
            "text": f"post {i} é🙂",
            "createdAt": "2026-07-04T14:38:07.517Z",
            "langs": ["en"],
        }
        records[f"app.bsky.feed.like/{rkey}"] = {
            "$type": "app.bsky.feed.like",
            "subject": {
                "uri": f"at://{DID}/app.bsky.feed.post/{rkey}",
                "cid": str(CID.for_dag_cbor(b"%d" % i)),
            },
            "createdAt": "2026-07-04T14:38:07.517Z",
        }
    return records


def test_build_and_read_back() -> None:
    key = KeyPair.generate("k256", b"simulated account")
    records = _records()
    rev = make_tid(1_783_000_000_000_000, 5)
    commit_cid, car_bytes = build_repo(DID, key, records, rev)
    car = read_car(car_bytes)
    assert car.roots == [commit_cid]
    # The commit is the first block, then the root MST node (the streamable order).
    first, second = list(car.blocks)[:2]
    assert first == commit_cid
    commit = verify_commit(car.blocks[commit_cid], key.did_key(), expected_did=DID)
    assert second == commit.data
    assert commit.rev == rev
    read = list(iter_repo_records(car))
    assert len(read) == len(records)
    assert {f"{r.collection}/{r.rkey}": r.record for r in read} == records
    assert [f"{r.collection}/{r.rkey}" for r in read] == sorted(records)
    for r in read:
        assert r.cid == CID.for_dag_cbor(car.blocks[r.cid])
    assert Counter(r.collection for r in read) == {
        "app.bsky.feed.post": 30,
        "app.bsky.feed.like": 30,
        "app.bsky.actor.profile": 1,
        "com.example.binary": 1,
    }
    # Deterministic: the same input gives the same bytes.
    assert build_repo(DID, key, records, rev) == (commit_cid, car_bytes)


def test_build_repo_blocks_exposes_the_parts() -> None:
    key = KeyPair.generate("p256", b"k")
    built = build_repo_blocks(DID, key, _records(3), make_tid(1, 0))
    assert built.commit.data == build(built.record_cids.items())[0]
    assert read_car(built.to_car()).blocks == built.blocks


def test_build_repo_rejects_bad_input() -> None:
    key = KeyPair.generate("k256", b"k")
    with pytest.raises(MSTError):
        build_repo(DID, key, {"no-slash": {"$type": "x"}}, make_tid(1, 0))
    with pytest.raises(CommitFormatError):
        build_repo(DID, key, {"a.b/c": [1]}, make_tid(1, 0))  # type: ignore[dict-item]
    with pytest.raises(CommitFormatError):
        build_repo(DID, key, {"a.b/c": {}}, "not-a-tid")


def test_empty_repo() -> None:
    key = KeyPair.generate("k256", b"k")
    _, car_bytes = build_repo(DID, key, {}, make_tid(1, 0))
    assert list(iter_repo_records(read_car(car_bytes))) == []


def test_reads_the_real_export() -> None:
    car = read_car(repo_car_bytes())
    commit = read_commit(car)
    assert commit.did == REPO_DID
    records = list(iter_repo_records(car))
    assert len(records) == 23
    assert Counter(r.collection for r in records) == {
        "app.bsky.feed.like": 10,
        "app.bsky.feed.post": 6,
        "app.bsky.feed.repost": 3,
        "app.bsky.graph.follow": 3,
        "app.bsky.actor.profile": 1,
    }
    assert all(r.record["$type"] == r.collection for r in records)
    with open_car(fixture_path("repo.car")) as on_disk:
        assert list(iter_repo_records(on_disk)) == records


def test_damaged_exports_fail_loudly() -> None:
    car = read_car(repo_car_bytes())
    commit = read_commit(car)
    records = list(iter_repo_records(car))
    victim = records[5].cid
    without = {c: b for c, b in car.blocks.items() if c != victim}
    with pytest.raises(MissingBlockError):
        list(iter_repo_records(read_car(write_car(car.roots, without.items()))))
    tampered = dict(car.blocks)
    tampered[victim] = encode({"$type": "evil"})
    with pytest.raises(BlockMismatchError):
        list(iter_repo_records(read_car(write_car(car.roots, tampered.items()), verify=False)))
    no_commit = {c: b for c, b in car.blocks.items() if c != car.root}
    with pytest.raises(MissingBlockError):
        read_commit(read_car(write_car(car.roots, no_commit.items())))
    with pytest.raises(CarError):
        read_commit(read_car(write_car([], car.blocks.items())))
    no_root_node = {c: b for c, b in car.blocks.items() if c != commit.data}
    with pytest.raises(MissingBlockError):
        list(iter_repo_records(read_car(write_car(car.roots, no_root_node.items()))))


def test_verify_every_captured_commit_event() -> None:
    docs = did_docs()
    verified = 0
    for body in commit_bodies():
        key = parse_did_document(docs[body["repo"]]).signing_key
        result = verify_commit_event(body, signing_key=key)
        assert result.commit.did == body["repo"]
        assert result.prev_data == CID.from_bytes(body["prevData"])
        assert len(result.ops) == len(body["ops"])
        verified += 1
    assert verified == 148


def test_commit_event_tampering_is_caught() -> None:
    docs = did_docs()
    body = next(b for b in commit_bodies() if len(b["ops"]) >= 1)
    key = parse_did_document(docs[body["repo"]]).signing_key
    other = KeyPair.generate("k256", b"not theirs").did_key()
    cases: list[tuple[dict[str, Any], type[Exception], str | None]] = [
        (dict(body, prevData=CID.for_dag_cbor(b"x").raw), InversionError, key),
        (dict(body, prevData=None), InversionError, key),
        (dict(body, ops=[]), InversionError, key),
        (dict(body, rev="3zzzzzzzzzzzz"), CommitFormatError, key),
        (dict(body, repo="did:plc:someoneelse"), CommitFormatError, key),
        (dict(body, commit=CID.for_dag_cbor(b"x").raw), CommitFormatError, key),
        (dict(body, blocks=body["blocks"][:-3]), CarError, key),
        (dict(body, blocks="text"), CarError, key),
        (dict(body, ops="nope"), CommitFormatError, key),
        (dict(body, ops=[5]), CommitFormatError, key),
        (body, SignatureError, other),
    ]
    for bad, error, signing_key in cases:
        with pytest.raises(error):
            verify_commit_event(bad, signing_key=signing_key)
    # Without inversion and without a key, only structure is checked.
    assert verify_commit_event(dict(body, prevData=None), signing_key=None, invert=False).prev_data is None


def test_commit_event_needs_created_records() -> None:
    body = next(b for b in commit_bodies() if any(op["action"] == "create" for op in b["ops"]))
    car = read_car(body["blocks"])
    created = {CID.from_bytes(op["cid"]) for op in body["ops"] if op["action"] == "create"}
    slim = write_car(car.roots, [(c, b) for c, b in car.blocks.items() if c not in created])
    with pytest.raises(MissingBlockError):
        verify_commit_event(dict(body, blocks=slim), signing_key=None)


def test_iter_repo_records_accepts_a_path_opened_car(tmp_path: Path) -> None:
    key = KeyPair.generate("k256", b"k")
    _, car_bytes = build_repo(DID, key, _records(5), make_tid(1, 0))
    path = tmp_path / "repo.car"
    path.write_bytes(car_bytes)
    with open_car(path, max_bytes=len(car_bytes)) as car:
        assert len(list(iter_repo_records(car))) == 12

"""``--verify``: commit signatures against DID documents and Sync 1.1 MST proofs, on real and generated frames.

Each test runs twice: with the native fast path and with the pure-Python path alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import libipld
import pytest

from producers.firehose.decode import Decoded, decode_frame, parse_frame
from producers.firehose.verify import CommitVerifier, DictResolver
from runtime.atproto import native
from runtime.atproto.capture import read_capture
from runtime.atproto.car import read_car, write_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import parse_commit
from runtime.atproto.crypto import KeyPair
from runtime.atproto.dagcbor import decode, encode
from runtime.errors import DecodeError
from runtime.simulator.plc import did_document
from runtime.simulator.relay import RelayGenerator, encode_frame


@pytest.fixture(autouse=True)
def path(atproto_path: str) -> str:
    """Every test runs on the native fast path and on the pure-Python path alone: same verdicts."""
    return atproto_path


@pytest.fixture(scope="module")
def frames(fixtures_dir: Path) -> list[bytes]:
    return read_capture(fixtures_dir / "frames.bin.zst")


@pytest.fixture
def resolver(fixtures_dir: Path) -> DictResolver:
    return DictResolver.from_file(fixtures_dir / "did_docs.json.zst")


def _check(verifier: CommitVerifier, data: bytes) -> None:
    asyncio.run(verifier.check(decode_frame(data)))


def _reason(verifier: CommitVerifier, data: bytes) -> str:
    with pytest.raises(DecodeError) as e:
        _check(verifier, data)
    return e.value.reason


def _split(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """A frame's header and its body decoded exactly (links as CID, bytes as bytes)."""
    header = libipld.decode_dag_cbor_multi(data)[0]
    body = decode(data[len(encode(header)):])
    return header, body


def _first_commit(frames: list[bytes], action: str = "create") -> bytes:
    for data in frames:
        _, body = libipld.decode_dag_cbor_multi(data)
        if body.get("ops") and body["ops"][0]["action"] == action:
            return data
    raise AssertionError(f"no {action} commit")


def test_every_fixture_commit_verifies(frames: list[bytes], resolver: DictResolver) -> None:
    verifier = CommitVerifier(resolver)
    for data in frames:
        _check(verifier, data)
    assert verifier.stats.verified == 148
    assert verifier.stats.failed == {}
    assert verifier.stats.identity_refreshes == 1


def test_a_flipped_record_byte_is_caught(frames: list[bytes], resolver: DictResolver) -> None:
    data = _first_commit(frames)
    _, body = libipld.decode_dag_cbor_multi(data)
    block = read_car(body["blocks"]).get(CID.from_bytes(body["ops"][0]["cid"]))
    assert block is not None
    at = data.index(block) + 5
    flipped = data[:at] + bytes([data[at] ^ 0x20]) + data[at + 1:]
    verifier = CommitVerifier(resolver)
    assert _reason(verifier, flipped) == "bad_cid"  # the decoder already checks record hashes
    # and the verifier on its own catches it too (it checks every block of the slice)
    frame = parse_frame(flipped)
    with pytest.raises(DecodeError) as e:
        asyncio.run(verifier.check(Decoded("commit", frame, seq=frame.seq, did=frame.did)))
    assert e.value.reason == "bad_cid"
    assert verifier.stats.failed == {"bad_cid": 1}


def _resigned(data: bytes, mutate_sig: bool = False, key: KeyPair | None = None,
              prev_data: CID | None = None) -> bytes:
    """The frame with its commit block rebuilt (signature changed or re-signed), CIDs kept consistent."""
    header, body = _split(data)
    car = read_car(body["blocks"])
    commit = parse_commit(car.blocks[body["commit"]])
    sig = commit.sig
    if mutate_sig:
        sig = sig[:10] + bytes([sig[10] ^ 0x01]) + sig[11:]
    if key is not None:
        sig = key.sign(commit.unsigned().signing_bytes())
    block = encode({**commit.unsigned().to_dict(), "sig": sig})
    cid = CID.for_dag_cbor(block)
    blocks = {k: v for k, v in car.blocks.items() if k != body["commit"]}
    body["blocks"] = write_car([cid], [(cid, block), *blocks.items()])
    body["commit"] = cid
    if prev_data is not None:
        body["prevData"] = prev_data
    return encode_frame(header, body)


def test_a_flipped_signature_byte_is_caught(frames: list[bytes], resolver: DictResolver) -> None:
    data = _first_commit(frames)
    verifier = CommitVerifier(resolver)
    _check(verifier, _resigned(data))  # rebuilding alone keeps the commit valid
    assert _reason(verifier, _resigned(data, mutate_sig=True)) == "bad_signature"
    # and a flip in the raw frame's signature bytes breaks the commit block's CID first
    _, body = libipld.decode_dag_cbor_multi(data)
    sig = parse_commit(read_car(body["blocks"]).blocks[CID.from_bytes(body["commit"])]).sig
    at = data.index(sig) + 3
    assert _reason(verifier, data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]) == "bad_cid"


def test_a_commit_signed_by_another_key_is_caught_and_the_key_re_resolved_once(
        frames: list[bytes], resolver: DictResolver) -> None:
    data = _resigned(_first_commit(frames), key=KeyPair.generate("k256", b"impostor"))
    verifier = CommitVerifier(resolver)
    assert _reason(verifier, data) == "bad_signature"
    assert verifier.stats.key_refreshes == 1


def test_a_rotated_key_is_picked_up(frames: list[bytes], fixtures_dir: Path) -> None:
    data = _first_commit(frames)
    did = libipld.decode_dag_cbor_multi(data)[1]["repo"]
    new_key = KeyPair.generate("k256", b"rotated")
    resolver = DictResolver.from_file(fixtures_dir / "did_docs.json.zst")
    verifier = CommitVerifier(resolver)
    _check(verifier, data)  # caches the old key
    resolver.set_document(did, did_document(did, new_key.multikey(), "https://pds.example.com"))
    _check(verifier, _resigned(data, key=new_key))  # fails with the cached key, re-resolves, verifies
    assert verifier.stats.key_refreshes == 1
    assert verifier.stats.verified == 2


def test_an_identity_frame_drops_the_cached_document(frames: list[bytes], resolver: DictResolver) -> None:
    verifier = CommitVerifier(resolver)
    identity = next(d for d in frames if libipld.decode_dag_cbor_multi(d)[0]["t"] == "#identity")
    _check(verifier, identity)
    assert resolver.invalidations == 1


def test_a_wrong_prev_data_is_a_bad_mst_proof(frames: list[bytes], resolver: DictResolver) -> None:
    data = _resigned(_first_commit(frames), prev_data=CID.for_dag_cbor(b"\xa0"))
    assert _reason(CommitVerifier(resolver), data) == "bad_mst_proof"
    assert asyncio.run(_no_invert(resolver, data)) is None


async def _no_invert(resolver: DictResolver, data: bytes) -> None:
    await CommitVerifier(resolver, invert=False).check(decode_frame(data))


def test_a_missing_proof_block_is_caught(frames: list[bytes], resolver: DictResolver) -> None:
    data = _first_commit(frames, "delete")
    header, body = _split(data)
    car = read_car(body["blocks"])
    root = parse_commit(car.blocks[body["commit"]]).data
    blocks = {k: v for k, v in car.blocks.items() if k != root}
    body["blocks"] = write_car(car.roots, blocks.items())
    assert _reason(CommitVerifier(resolver), encode_frame(header, body)) in ("missing_block", "bad_mst_proof")


def test_an_unknown_author_is_dead_lettered(frames: list[bytes]) -> None:
    verifier = CommitVerifier(DictResolver({}))
    assert _reason(verifier, _first_commit(frames)) == "repo_unavailable"


def test_generated_commits_verify_and_tampering_is_caught() -> None:
    gen = RelayGenerator(seed=11, accounts=8)
    frames = gen.frames(300)
    verifier = CommitVerifier(DictResolver(gen.did_documents()))
    for f in frames:
        _check(verifier, f.data)
    assert verifier.stats.verified == gen.commits
    assert verifier.stats.failed == {}
    impostor = CommitVerifier(DictResolver({
        did: did_document(did, KeyPair.generate("k256", did.encode()).multikey(), "https://pds.example.com")
        for did in gen.accounts}))
    commit = next(f for f in frames if libipld.decode_dag_cbor_multi(f.data)[0]["t"] == "#commit")
    assert _reason(impostor, commit.data) == "bad_signature"


def _batched_verdicts(verifier: CommitVerifier, datas: list[bytes]) -> list[str | None]:
    """Begin every frame, then finish them in order: each frame's failure reason, or None."""

    async def go() -> list[str | None]:
        begun = [await verifier.begin(decode_frame(d)) for d in datas]
        verifier.flush()
        out: list[str | None] = []
        for pending in begun:
            try:
                await verifier.finish(pending)
                out.append(None)
            except DecodeError as e:
                out.append(e.reason)
        return out

    try:
        return asyncio.run(go())
    finally:
        verifier.close()


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batched_signatures_give_the_whole_checks_verdicts(frames: list[bytes], resolver: DictResolver,
                                                           batch: int) -> None:
    """Signatures verified in native batches on a thread: the same verdicts, in frame order, as
    every frame checked whole (a bad signature, a foreign key, a bad proof among good frames)."""
    data = _first_commit(frames)
    bad_sig = _resigned(data, mutate_sig=True)
    foreign = _resigned(data, key=KeyPair.generate("k256", b"another key"))
    bad_proof = _resigned(data, prev_data=CID.for_dag_cbor(b"\xa0"))
    mixed = [*frames[:40], bad_sig, *frames[40:90], foreign, bad_proof, *frames[90:]]
    batched = CommitVerifier(resolver, batch_size=batch)
    assert batched.batching == (native.NATIVE is not None)  # the pure-Python path checks whole
    got = _batched_verdicts(batched, mixed)
    reference = CommitVerifier(resolver)
    want: list[str | None] = []
    for d in mixed:
        try:
            _check(reference, d)
            want.append(None)
        except DecodeError as e:
            want.append(e.reason)
    assert got == want
    assert want.count(None) == len(mixed) - 3 and {"bad_signature", "bad_mst_proof"} <= set(want)
    assert batched.stats.verified == reference.stats.verified
    assert batched.stats.failed == reference.stats.failed

"""Signing keys, did:key encoding, low-S signatures, and signed commits (incl. every captured commit)."""

from __future__ import annotations

import random

import libipld
import pytest
from atproto_crypto.consts import P256_CURVE_ORDER, SECP256K1_CURVE_ORDER
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.atproto.car import read_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import Commit, UnsignedCommit, parse_commit, sign_commit, verify_commit
from runtime.atproto.crypto import Curve, KeyPair, did_key_curve, parse_did_key, verify_signature
from runtime.atproto.dagcbor import encode
from runtime.atproto.errors import CommitFormatError, KeyFormatError, SignatureError
from runtime.atproto.identity import parse_did_document

from .test_atproto_corpus import REPO_DID, commit_bodies, did_docs, repo_car_bytes

ORDERS: dict[str, int] = {"p256": P256_CURVE_ORDER, "k256": SECP256K1_CURVE_ORDER}
DATA = CID.from_str("bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm")


@pytest.mark.parametrize(("curve", "prefix"), [("p256", "did:key:zDn"), ("k256", "did:key:zQ3s")])
def test_deterministic_keys_and_did_key(curve: Curve, prefix: str) -> None:
    a = KeyPair.generate(curve, random.Random(42))
    b = KeyPair.generate(curve, random.Random(42))
    c = KeyPair.generate(curve, b"other seed")
    assert a.did_key() == b.did_key() != c.did_key()
    assert a.did_key().startswith(prefix)
    assert a.did_key() == "did:key:" + a.multikey()
    assert did_key_curve(a.did_key()) == curve
    assert len(a.public_key_bytes()) == 33
    assert KeyPair.from_private_bytes(a.curve, a.private_bytes()).did_key() == a.did_key()
    assert curve in repr(a)


@pytest.mark.parametrize("curve", ["p256", "k256"])
def test_signatures_are_compact_low_s_and_verify(curve: Curve) -> None:
    key = KeyPair.generate(curve, b"seed")
    order = ORDERS[curve]
    for i in range(40):
        msg = f"message {i}".encode()
        sig = key.sign(msg)
        assert len(sig) == 64
        assert sig == key.sign(msg)  # RFC 6979: deterministic
        s = int.from_bytes(sig[32:], "big")
        assert s <= order // 2
        assert verify_signature(key.did_key(), msg, sig)
        assert not verify_signature(key.did_key(), msg + b"!", sig)
        # The high-S twin is the same ECDSA signature, and atproto must refuse it.
        high = sig[:32] + (order - s).to_bytes(32, "big")
        assert not verify_signature(key.did_key(), msg, high)


def test_verify_rejects_wrong_keys_lengths_and_der() -> None:
    key = KeyPair.generate("k256", b"a")
    other = KeyPair.generate("k256", b"b")
    sig = key.sign(b"x")
    assert not verify_signature(other.did_key(), b"x", sig)
    assert not verify_signature(key.did_key(), b"x", sig[:-1])
    assert not verify_signature(key.did_key(), b"x", sig + b"\x00")
    der = key._key.sign(b"x", ec.ECDSA(hashes.SHA256()))
    assert not verify_signature(key.did_key(), b"x", der)


@pytest.mark.parametrize(
    "did_key",
    [
        "",
        "did:web:example.com",
        "did:key:",
        "did:key:zzzz",
        "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
    ],
)
def test_bad_did_keys_raise(did_key: str) -> None:
    with pytest.raises(KeyFormatError):
        parse_did_key(did_key)
    with pytest.raises(KeyFormatError):
        verify_signature(did_key, b"x", bytes(64))


def test_bad_private_keys_raise() -> None:
    with pytest.raises(KeyFormatError):
        KeyPair.from_private_bytes("k256", b"short")
    with pytest.raises(KeyFormatError):
        KeyPair.from_private_bytes("p256", bytes(32))
    with pytest.raises(KeyFormatError):
        KeyPair.generate("k256", b"")
    with pytest.raises(KeyFormatError):
        KeyPair.generate("ed25519", b"x")  # type: ignore[arg-type]
    with pytest.raises(KeyFormatError):
        KeyPair("p256", ec.generate_private_key(ec.SECP256K1()))


# -------------------------------------------------------------------------------------------- commits


@pytest.mark.parametrize("curve", ["p256", "k256"])
def test_sign_parse_verify_commit(curve: Curve) -> None:
    key = KeyPair.generate(curve, b"repo key")
    unsigned = UnsignedCommit(did="did:plc:abc", data=DATA, rev="3mptbypluud2a")
    cid, block = sign_commit(unsigned, key)
    assert cid == CID.for_dag_cbor(block)
    commit = verify_commit(block, key.did_key(), expected_did="did:plc:abc")
    assert commit == parse_commit(block)
    assert commit.unsigned() == unsigned
    assert commit.version == 3
    assert commit.prev is None
    assert libipld.decode_dag_cbor(block)["data"] == DATA.raw
    with pytest.raises(SignatureError):
        verify_commit(block, KeyPair.generate(curve, b"other").did_key())
    with pytest.raises(CommitFormatError):
        verify_commit(block, key.did_key(), expected_did="did:plc:other")


def _with(commit: Commit, **fields: object) -> bytes:
    body: dict[str, object] = {
        "did": commit.did,
        "version": commit.version,
        "data": commit.data,
        "rev": commit.rev,
        "prev": commit.prev,
        "sig": commit.sig,
    }
    body.update(fields)
    return encode({k: v for k, v in body.items() if v is not ...})


def test_parse_commit_rejects_malformed_blocks() -> None:
    key = KeyPair.generate("k256", b"k")
    _, block = sign_commit(UnsignedCommit(did="did:plc:abc", data=DATA, rev="3mptbypluud2a"), key)
    commit = parse_commit(block)
    for bad in [
        _with(commit, version=2),
        _with(commit, rev="not-a-tid"),
        _with(commit, did="plc:abc"),
        _with(commit, data=DATA.raw),  # bytes instead of a link: re-encoding differs
        _with(commit, data="bafy"),
        _with(commit, sig=DATA),  # a link instead of bytes
        _with(commit, prev=...),  # prev must be present (null) in v3
        _with(commit, extra=1),
        encode([1]),
        b"\xff",
    ]:
        with pytest.raises(CommitFormatError):
            parse_commit(bad)


def test_every_captured_commit_signature_verifies_and_a_flipped_byte_fails() -> None:
    docs = did_docs()
    verified = 0
    for body in commit_bodies():
        identity = parse_did_document(docs[body["repo"]], expected_did=body["repo"])
        assert identity.signing_key is not None
        car = read_car(body["blocks"])
        block = car.blocks[car.root]
        commit = verify_commit(block, identity.signing_key, expected_did=body["repo"])
        assert commit.rev == body["rev"]
        # Flip one byte of the signature inside the block.
        sig_at = block.rindex(commit.sig)
        for offset in (0, 63):
            tampered = bytearray(block)
            tampered[sig_at + offset] ^= 0x01
            with pytest.raises(SignatureError):
                verify_commit(bytes(tampered), identity.signing_key)
        verified += 1
    assert verified == 148


def test_repo_export_commit_parses() -> None:
    car = read_car(repo_car_bytes())
    commit = parse_commit(car.blocks[car.root])
    assert commit.did == REPO_DID
    assert commit.version == 3
    assert len(commit.sig) == 64
    docs = did_docs()
    if REPO_DID in docs:
        key = parse_did_document(docs[REPO_DID]).signing_key
        assert key is not None
        verify_commit(car.blocks[car.root], key)

"""Signing keys, did:key encoding, low-S signatures, and signed commits (incl. every captured commit)."""

from __future__ import annotations

import random

import libipld
import pytest
from atproto_crypto.consts import P256_CURVE_ORDER, SECP256K1_CURVE_ORDER
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.atproto import crypto
from runtime.atproto.car import read_car
from runtime.atproto.cid import CID
from runtime.atproto.commit import Commit, UnsignedCommit, parse_commit, sign_commit, verify_commit
from runtime.atproto.crypto import (
    VERIFIER_CACHE_SIZE,
    Curve,
    KeyPair,
    _cached_verifier,
    _compressed_point,
    did_key_curve,
    parse_did_key,
    signature_verifier,
    verify_signature,
)
from runtime.atproto.dagcbor import encode
from runtime.atproto.errors import CommitFormatError, KeyFormatError, SignatureError
from runtime.atproto.identity import parse_did_document

from .atproto_corpus import REPO_DID, commit_bodies, did_docs, repo_car_bytes

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


# ------------------------------------------------------------------------- verifier backends, cache

BACKENDS = [pytest.param(True, id="libsecp256k1"), pytest.param(False, id="openssl")]


def _variants(curve: Curve, key: KeyPair, msg: bytes) -> list[tuple[bytes, bytes]]:
    """``(message, signature)`` pairs: a good one and every kind of bad one, for both backends."""
    order = ORDERS[curve]
    sig = key.sign(msg)
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    half = order // 2
    return [
        (msg, sig),
        (msg + b"!", sig),
        (msg, sig[:32] + (order - s).to_bytes(32, "big")),  # the high-S twin
        (msg, sig[:5] + bytes([sig[5] ^ 1]) + sig[6:]),
        (msg, bytes(64)),  # r = s = 0
        (msg, sig[:32] + bytes(32)),
        (msg, bytes(32) + sig[32:]),
        (msg, (r + order).to_bytes(33, "big")[1:] + sig[32:] if r + order < 1 << 256 else sig[:32] + bytes(32)),
        (msg, order.to_bytes(32, "big") + sig[32:]),  # r = n
        (msg, sig[:32] + half.to_bytes(32, "big")),  # s = n // 2: low, but not this signature
        (msg, sig[:32] + (half + 1).to_bytes(32, "big")),  # the first high s
        (msg, b"\xff" * 64),
        (msg, b"\x80" + sig[1:]),  # r with its top bit set: DER needs a leading zero
    ]


@pytest.mark.parametrize("curve", ["p256", "k256"])
def test_both_verifier_backends_agree_with_the_sdk(curve: Curve) -> None:
    from atproto_crypto.verify import verify_signature as sdk_verify

    for seed in range(12):
        key = KeyPair.generate(curve, random.Random(seed))
        did_key = key.did_key()
        for msg, sig in _variants(curve, key, f"message {seed}".encode()):
            expected = sdk_verify(did_key, msg, sig)
            assert signature_verifier(did_key, libsecp256k1=True)(msg, sig) is expected, (seed, sig.hex())
            assert signature_verifier(did_key, libsecp256k1=False)(msg, sig) is expected, (seed, sig.hex())
            assert verify_signature(did_key, msg, sig) is expected
        assert verify_signature(did_key, f"message {seed}".encode(), key.sign(f"message {seed}".encode()))


@pytest.mark.parametrize("libsecp256k1", BACKENDS)
def test_every_captured_commit_verifies_on_both_backends(libsecp256k1: bool) -> None:
    docs = did_docs()
    for body in commit_bodies():
        identity = parse_did_document(docs[body["repo"]], expected_did=body["repo"])
        assert identity.signing_key is not None
        car = read_car(body["blocks"])
        commit = parse_commit(car.blocks[car.root])
        verifier = signature_verifier(identity.signing_key, libsecp256k1=libsecp256k1)
        data = commit.unsigned().signing_bytes()
        assert verifier(data, commit.sig)
        assert not verifier(data + b"\x00", commit.sig)
        assert not verifier(data, commit.sig[:63] + bytes([commit.sig[63] ^ 1]))


def test_the_fast_did_key_parse_agrees_with_the_sdk() -> None:
    keys = [KeyPair.generate(c, random.Random(i)).did_key() for c in ("p256", "k256") for i in range(20)]
    keys += [parse_did_document(doc).signing_key or "" for doc in list(did_docs().values())[:40]]
    for did_key in keys:
        curve, point = _compressed_point(did_key)
        sdk_curve, uncompressed = parse_did_key(did_key)
        assert curve == sdk_curve
        assert ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256K1() if curve == "k256" else ec.SECP256R1(), point).public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint) == uncompressed


@pytest.mark.parametrize(
    "did_key",
    [
        "",
        "did:web:example.com",
        "did:key:",
        "did:key:z",
        "did:key:zzzz",
        "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",  # ed25519
        "did:key:b" + "a" * 50,  # not base58btc
        # a secp256k1 codec prefix with an x that is not on the curve (x = 5)
        "did:key:z" + libipld.encode_multibase("z", b"\xe7\x01\x02" + (5).to_bytes(32, "big"))[1:],
        # a P-256 codec prefix with an uncompressed point
        "did:key:z" + libipld.encode_multibase("z", b"\x80\x24\x04" + bytes(64))[1:],
        "did:key:z" + libipld.encode_multibase("z", b"\xe7\x01\x02" + bytes(31))[1:],  # short
    ],
)
@pytest.mark.parametrize("libsecp256k1", BACKENDS)
def test_bad_did_keys_are_refused_by_every_path(did_key: str, libsecp256k1: bool) -> None:
    with pytest.raises(KeyFormatError):
        parse_did_key(did_key)
    with pytest.raises(KeyFormatError):
        signature_verifier(did_key, libsecp256k1=libsecp256k1)
    with pytest.raises(KeyFormatError):
        verify_signature(did_key, b"x", bytes(64))


def test_the_verifier_cache_is_bounded_and_keyed_by_the_key() -> None:
    info = _cached_verifier.cache_info()
    assert info.maxsize == VERIFIER_CACHE_SIZE <= 100_000
    key = KeyPair.generate("k256", b"cache")
    before = _cached_verifier.cache_info().misses
    sig = key.sign(b"m")
    for _ in range(3):
        assert verify_signature(key.did_key(), b"m", sig)
    assert _cached_verifier.cache_info().misses == before + 1  # parsed once, then reused
    # a rotated key is another did:key string, so another entry: never a stale verifier
    rotated = KeyPair.generate("k256", b"rotated")
    assert not verify_signature(rotated.did_key(), b"m", sig)
    assert verify_signature(rotated.did_key(), b"m", rotated.sign(b"m"))


def test_the_openssl_backend_alone_verifies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypto, "LIBSECP256K1", False)
    _cached_verifier.cache_clear()
    try:
        key = KeyPair.generate("k256", b"openssl only")
        assert type(_cached_verifier(key.did_key())).__name__ == "_OpenSSLVerifier"
        assert verify_signature(key.did_key(), b"m", key.sign(b"m"))
        assert not verify_signature(key.did_key(), b"n", key.sign(b"m"))
    finally:
        _cached_verifier.cache_clear()


@pytest.mark.skipif(not crypto.verify_batch_available(), reason="the native extension is not built")
def test_native_batches_agree_with_single_verification() -> None:
    """verify_batch on valid, tampered, high-S, foreign-key, zero and malformed items: every True is a
    valid signature, and for well-formed items the verdicts are verify_signature's."""
    rng = random.Random(5)
    keys = [KeyPair.generate("k256", rng) for _ in range(6)]
    order = ORDERS["k256"]
    items: list[tuple[bytes, bytes, bytes]] = []
    want: list[bool] = []
    for i in range(300):
        key = keys[i % len(keys)]
        msg = rng.randbytes(rng.randrange(0, 600))
        sig = key.sign(msg)
        kind = i % 6
        signer = key
        if kind == 1:
            msg += b"!"
        elif kind == 2:
            sig = sig[:32] + (order - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")  # high-S twin
        elif kind == 3:
            signer = keys[(i + 1) % len(keys)]
        elif kind == 4:
            sig = bytes(64)
        parsed = crypto.batch_key(signer.did_key())
        assert parsed is not None and len(parsed) == 64
        items.append((parsed, sig, msg))
        want.append(verify_signature(signer.did_key(), msg, sig))
    assert crypto.verify_batch(items) == want
    assert want.count(True) == 100  # only kinds 0 and 5 verify
    # malformed items are False, never an error; an empty batch is empty
    good = items[0]
    assert crypto.verify_batch([(good[0][:63], good[1], good[2]), (good[0], good[1][:63], good[2]),
                                 ("x", good[1], good[2]), (good[0], good[1]), good]) == [False] * 4 + [True]  # type: ignore[list-item]
    assert crypto.verify_batch([]) == []


def test_p256_keys_have_no_batch_form() -> None:
    assert crypto.batch_key(KeyPair.generate("p256", b"p").did_key()) is None
    assert crypto.batch_key("did:key:zzzz") is None

"""CID parsing, printing, hashing and validation."""

from __future__ import annotations

import copy
import hashlib
import pickle

import libipld
import pytest

from runtime.atproto.cid import CID, DAG_CBOR, RAW, SHA2_256, parse_cid_at
from runtime.atproto.errors import AtprotoFormatError, CIDError

EMPTY_NODE = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
BLOB = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


def test_string_round_trip_and_fields() -> None:
    cid = CID.from_str(EMPTY_NODE)
    assert str(cid) == EMPTY_NODE
    assert repr(cid) == f"CID({EMPTY_NODE!r})"
    assert cid.version == 1
    assert cid.codec == DAG_CBOR
    assert cid.hash_code == SHA2_256
    assert len(cid.digest) == 32
    assert CID.from_bytes(cid.raw) == cid
    assert bytes(cid) == cid.raw
    assert libipld.encode_cid(cid.raw) == EMPTY_NODE
    blob = CID.from_str(BLOB)
    assert blob.codec == RAW


def test_for_dag_cbor_and_raw_hash_the_bytes() -> None:
    block = b"\xa2aea\x80alf6"
    cid = CID.for_dag_cbor(block)
    assert cid.codec == DAG_CBOR
    assert cid.digest == hashlib.sha256(block).digest()
    assert cid.matches(block)
    assert not cid.matches(block + b"x")
    raw = CID.for_raw(b"blob bytes")
    assert raw.codec == RAW
    assert raw.matches(b"blob bytes")
    assert raw != CID.for_dag_cbor(b"blob bytes")
    assert str(CID.for_dag_cbor(bytes.fromhex("a2616580616cf6"))) == EMPTY_NODE


def test_hashable_ordered_immutable() -> None:
    a = CID.for_dag_cbor(b"a")
    b = CID.for_dag_cbor(b"b")
    assert len({a, CID.from_bytes(a.raw), b}) == 2
    assert sorted([a, b]) == sorted([b, a])
    assert (a < b) == (a.raw < b.raw)
    assert a <= a
    assert a >= a
    assert a != a.raw  # a link is never equal to a byte string
    with pytest.raises(AttributeError):
        a.raw = b""
    with pytest.raises(AttributeError):
        del a.raw
    assert pickle.loads(pickle.dumps(a)) == a
    assert copy.deepcopy(a) is a


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01",
        b"\x01\x71\x12\x20" + bytes(31),  # truncated digest
        b"\x01\x71\x12\x20" + bytes(33),  # trailing byte
        b"\x12\x20" + bytes(32),  # CIDv0
        b"\x02\x71\x12\x20" + bytes(32),  # unknown version
        b"\x01\x71\x12\x10" + bytes(16),  # sha2-256 with a 16-byte digest
        b"\x01\xff",  # truncated varint
        b"\x01\x71\x13\xff\x01" + bytes(255),  # digest too long
    ],
)
def test_bad_binary_cids_raise(raw: bytes) -> None:
    with pytest.raises(CIDError):
        CID.from_bytes(raw)


@pytest.mark.parametrize(
    "text",
    ["", "b", "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n", "bafy!!!", "xyz", EMPTY_NODE[:-3]],
)
def test_bad_strings_raise(text: str) -> None:
    with pytest.raises(AtprotoFormatError):
        CID.from_str(text)


def test_wrong_types_raise() -> None:
    with pytest.raises(CIDError):
        CID.from_str(b"bafy")
    with pytest.raises(CIDError):
        CID("bafy")


def test_other_hash_functions_parse_but_never_match() -> None:
    sha512 = b"\x01\x55\x13\x40" + bytes(64)
    cid = CID.from_bytes(sha512)
    assert cid.hash_code == 0x13
    assert not cid.matches(b"")
    assert CID.from_str(str(cid)) == cid


def test_parse_cid_at_inside_a_buffer() -> None:
    cid = CID.for_dag_cbor(b"x")
    buf = b"junk" + cid.raw + b"tail"
    parsed, end = parse_cid_at(buf, 4)
    assert parsed == cid
    assert buf[end:] == b"tail"
    with pytest.raises(CIDError):
        parse_cid_at(buf[:20], 4)

"""DAG-CBOR encoding/decoding and the atproto JSON form, against libipld and the captured records."""

from __future__ import annotations

import random
from typing import Any

import libipld
import orjson
import pytest

from runtime.atproto.cid import CID
from runtime.atproto.dagcbor import decode, encode, from_json_form, record_json_form, to_json_form
from runtime.atproto.errors import AtprotoFormatError, CBORError, CIDError

from .atproto_corpus import record_blocks

LINK = CID.from_str("bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm")
BLOB = CID.from_str("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")

INT_EDGES = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]
PLAIN_VALUES: list[Any] = [
    *INT_EDGES,
    *[-1 - n for n in INT_EDGES],
    None,
    True,
    False,
    "",
    "a",
    "é🙂 unicode",
    "x" * 23,
    "x" * 24,
    "x" * 300,
    "y" * 70000,
    b"",
    b"\x00\xff",
    bytes(range(256)) * 300,
    [],
    [1, [2, [3, []]]],
    list(range(30)),
    {},
    {"b": 1, "a": 2, "aa": 3, "ab": {"z": [], "": None}, "é": 4, "z": 5, "bb": b"x"},
    {f"k{i}": i for i in range(40)},
    1.5,
    -2.25,
    1e300,
]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda v: type(v).__name__)
def test_encode_matches_libipld_and_round_trips(value: Any) -> None:
    data = encode(value)
    assert data == libipld.encode_dag_cbor(value)
    assert decode(data) == value
    assert libipld.decode_dag_cbor(data) == value


def test_encode_matches_libipld_on_random_documents() -> None:
    rng = random.Random(7)

    def gen(depth: int) -> Any:
        kind = rng.randrange(8 if depth < 4 else 5)
        if kind == 0:
            return rng.choice([None, True, False])
        if kind == 1:
            return rng.randrange(-(2**64), 2**64)
        if kind == 2:
            return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(30)))
        if kind == 3:
            return rng.randbytes(rng.randrange(40))
        if kind == 4:
            return rng.randrange(-30, 30)
        if kind == 5:
            return [gen(depth + 1) for _ in range(rng.randrange(6))]
        keys = ["".join(rng.choice("abcé$_") for _ in range(rng.randrange(1, 6))) for _ in range(6)]
        return {k: gen(depth + 1) for k in keys}

    for _ in range(300):
        value = {"doc": gen(0)}
        data = encode(value)
        assert data == libipld.encode_dag_cbor(value)
        assert decode(data) == value


def test_links_encode_as_tag_42_and_decode_as_cid() -> None:
    value = {"ref": LINK, "raw": LINK.raw, "list": [LINK, None]}
    data = encode(value)
    assert b"\xd8\x2a\x58\x25\x00" + LINK.raw in data
    decoded = decode(data)
    assert decoded == value
    assert type(decoded["ref"]) is CID
    assert type(decoded["raw"]) is bytes
    # libipld reads our links too, as raw CID bytes.
    assert libipld.decode_dag_cbor(data) == {"ref": LINK.raw, "raw": LINK.raw, "list": [LINK.raw, None]}


def test_tuples_and_mappings_encode_like_lists_and_dicts() -> None:
    assert encode((1, "a")) == encode([1, "a"])
    assert encode({"a": (1,)}) == libipld.encode_dag_cbor({"a": [1]})


@pytest.mark.parametrize(
    "value",
    [{1: "int key"}, float("nan"), float("inf"), 2**64, -(2**64) - 1, object(), {"a": {1, 2}}, "\ud800"],
    ids=repr,
)
def test_encode_rejects_values_outside_the_data_model(value: Any) -> None:
    with pytest.raises(CBORError):
        encode(value)


def test_encode_depth_cap() -> None:
    value: Any = []
    for _ in range(70):
        value = [value]
    with pytest.raises(CBORError):
        encode(value)
    assert encode(value, max_depth=100) == libipld.encode_dag_cbor(value)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"\x01\x01", "trailing data"),
        (b"\x9f\xff", "indefinite array"),
        (b"\x5f\xff", "indefinite bytes"),
        (b"\xc1\x01", "tag 1"),
        (b"\xd8\x2a\x41\x01", "tag 42 without identity prefix"),
        (b"\xd8\x2a\x01", "tag 42 wrapping an int"),
        (b"\xd8\x2a\x58\x25\x00" + bytes(36), "tag 42 wrapping a non-CID"),
        (b"\xa1\x01\x01", "int map key"),
        (b"\xa2\x61b\x01\x61a\x02", "unsorted keys"),
        (b"\xa2\x62aa\x01\x61b\x02", "longer key first"),
        (b"\xa2\x61a\x01\x61a\x02", "duplicate keys"),
        (b"\x61\xff", "invalid UTF-8"),
        (b"\xa1\x61\xff\x01", "invalid UTF-8 key"),
        (b"\xf7", "undefined"),
        (b"\xe0", "simple value"),
        (b"\xf8\x20", "one-byte simple value"),
        (b"\xf9\x3c\x00", "half float"),
        (b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00", "NaN"),
        (b"\xfb\x7f\xf0\x00\x00\x00\x00\x00\x00", "infinity"),
        (b"\x1c", "reserved additional info"),
        (b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", "huge array length"),
        (b"\xbb\x00\x00\x00\x01\x00\x00\x00\x00", "huge map length"),
        (b"\x5a\xff\xff\xff\xff", "byte string past the end"),
        (b"\x18", "truncated head"),
        (b"\x82\x01", "truncated array"),
    ],
)
def test_decode_rejects(data: bytes, why: str) -> None:
    with pytest.raises(CBORError):
        decode(data)
    with pytest.raises(CBORError):
        decode(data, strict=False)


@pytest.mark.parametrize(
    "data", [b"\x18\x01", b"\x78\x01a", b"\xfa\x3f\x80\x00\x00", b"\xd8\x2a\x58\x01\x00"]
)
def test_strict_mode_rejects_what_libipld_tolerates(data: bytes) -> None:
    with pytest.raises(CBORError):
        decode(data)
    try:
        expected = libipld.decode_dag_cbor(data)
    except ValueError:
        return  # libipld rejects it as well
    assert decode(data, strict=False) == expected


def test_every_truncation_of_a_record_fails_cleanly() -> None:
    data = encode({"$type": "x", "ref": LINK, "n": [1, 2**40, "abc"], "b": b"12345"})
    for cut in range(len(data)):
        with pytest.raises(CBORError):
            decode(data[:cut])


def test_nesting_cap() -> None:
    ok = b"\x81" * 63 + b"\x80"  # 64 nested arrays
    assert decode(ok) is not None
    with pytest.raises(CBORError):
        decode(b"\x81" * 64 + b"\x80")
    assert decode(b"\x81" * 64 + b"\x80", max_depth=65) is not None


def test_hostile_depth_never_escapes_as_recursion_error() -> None:
    deep = b"\xa1\x61a" + b"\x81" * 100_000 + b"\x80"
    with pytest.raises(CBORError):
        decode(deep)
    with pytest.raises(CBORError):
        record_json_form(deep)
    # Even a caller's cap above the interpreter's recursion limit ends in CBORError.
    with pytest.raises(CBORError):
        decode(b"\x81" * 5000 + b"\x80", max_depth=10**6)
    with pytest.raises(CBORError):
        encode(_nested(5000), max_depth=10**6)
    with pytest.raises(CBORError):
        record_json_form(b"\xa1\x61a" + b"\x81" * 5000 + b"\x80", max_depth=10**6)
    shallow_enough_for_libipld = b"\xa1\x61a" + b"\x81" * 500 + b"\x80"
    with pytest.raises(CBORError):
        record_json_form(shallow_enough_for_libipld)


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def test_json_form_of_links_and_bytes() -> None:
    value = {"blob": {"$type": "blob", "ref": LINK, "size": 3}, "sig": b"\x00\x01\x02\x03", "l": [BLOB]}
    form = to_json_form(value)
    assert form == {
        "blob": {"$type": "blob", "ref": {"$link": str(LINK)}, "size": 3},
        "sig": {"$bytes": "AAECAw"},  # the data model's base64 without padding
        "l": [{"$link": str(BLOB)}],
    }
    assert from_json_form(form) == value
    assert from_json_form(orjson.loads(orjson.dumps(form))) == value


def test_bytes_json_form_matches_the_spec_example() -> None:
    example = "nFERjvLLiw9qm45JrqH9QTzyC2Lu1Xb4ne6+sBrCzI0"  # from the atproto data-model spec
    raw = from_json_form({"$bytes": example})
    assert isinstance(raw, bytes)
    assert len(raw) == 32
    assert to_json_form(raw) == {"$bytes": example}
    assert from_json_form({"$bytes": example + "="}) == raw  # padding is optional


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"$link": "not a cid"}, CIDError),
        ({"$link": 5}, CIDError),
        ({"$bytes": "***"}, CBORError),
        ({"$bytes": 5}, CBORError),
        ({"$bytes": "A"}, CBORError),
    ],
)
def test_from_json_form_rejects_bad_special_objects(form: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        from_json_form(form)


def test_from_json_form_keeps_objects_that_only_look_special() -> None:
    value = {"$link": str(LINK), "other": 1}
    assert from_json_form(value) == value


def test_record_json_form_rejects_non_maps_and_garbage() -> None:
    with pytest.raises(CBORError):
        record_json_form(encode([1, 2]))
    with pytest.raises(CBORError):
        record_json_form(b"\xff\xff")
    with pytest.raises(CBORError):
        record_json_form(encode({"a": 1}) + b"\x00")


def test_record_json_form_tells_links_from_bytes() -> None:
    block = encode({"$type": "x", "ref": LINK, "data": LINK.raw, "plain": "s"})
    assert record_json_form(block) == {
        "$type": "x",
        "ref": {"$link": str(LINK)},
        "data": {"$bytes": to_json_form(LINK.raw)["$bytes"]},
        "plain": "s",
    }


def test_record_json_form_on_every_captured_record() -> None:
    blocks = record_blocks()
    assert len(blocks) > 150
    with_links = 0
    for block in blocks:
        fast = record_json_form(block)
        exact = to_json_form(decode(block))
        assert fast == exact
        if fast != libipld.decode_dag_cbor(block):
            with_links += 1
        # The JSON form re-encodes to the same block, hence the same CID (Jetstream record check).
        assert encode(from_json_form(orjson.loads(orjson.dumps(fast)))) == block
    assert with_links > 0


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="trailing"):
        decode(b"\x01\x01")
    assert issubclass(CBORError, AtprotoFormatError)


def _exact(block: bytes) -> Any:
    return to_json_form(decode(block, strict=False))


def test_links_and_bytes_are_told_apart_without_the_exact_decoder_and_agree_with_it() -> None:
    sig = bytes(range(64))
    cases = [
        {"$type": "x", "ref": LINK, "sig": sig},
        {"$type": "x", "images": [{"image": {"$type": "blob", "ref": LINK, "size": 9}}, {"image": BLOB}]},
        {"$type": "x", "short": b"ab", "empty": b"", "nested": [[{"b": b"\x00" * 30}]]},
        # the same 36 bytes as a link and as a byte string: only the exact decoder can tell
        {"$type": "x", "ref": LINK, "data": LINK.raw},
        # a byte string holding the encoding of a link to the same CID
        {"$type": "x", "ref": LINK, "data": b"\xd8\x2a\x58\x25\x00" + LINK.raw},
        # a byte string holding the encoding of a byte string equal to a link's bytes
        {"$type": "x", "ref": LINK, "data": b"\x58\x24" + LINK.raw},
    ]
    for value in cases:
        block = encode(value)
        assert record_json_form(block) == _exact(block), value


def test_non_minimal_lengths_cannot_fool_the_link_test() -> None:
    # libipld accepts non-minimal lengths: a byte string with a 2-byte length equal to a link's
    # bytes elsewhere must still come out as bytes.
    link = b"\xd8\x2a\x58\x25\x00" + LINK.raw
    for as_bytes in (b"\x59\x00\x24" + LINK.raw, b"\x5a\x00\x00\x00\x24" + LINK.raw,
                     b"\x5b" + (36).to_bytes(8, "big") + LINK.raw):
        block = b"\xa2\x61a" + link + b"\x61b" + as_bytes
        assert record_json_form(block) == _exact(block) == {"a": {"$link": str(LINK)},
                                                             "b": {"$bytes": to_json_form(LINK.raw)["$bytes"]}}
    # and a link written with a non-minimal length is still a link
    block = b"\xa1\x61a\xd8\x2a\x59\x00\x25\x00" + LINK.raw
    assert record_json_form(block) == _exact(block) == {"a": {"$link": str(LINK)}}


def test_random_records_with_links_and_bytes_agree_with_the_exact_decoder() -> None:
    rng = random.Random(7)
    pool: list[Any] = [LINK, BLOB, LINK.raw, BLOB.raw, b"", b"\x00", bytes(rng.randrange(256) for _ in range(40))]

    def value(depth: int) -> Any:
        kind = rng.randrange(6 if depth < 4 else 3)
        if kind == 0:
            return rng.choice(pool)
        if kind == 1:
            return rng.choice(["s", "é", 5, -3, True, None])
        if kind == 2:
            return rng.choice(pool[:2])
        if kind == 3:
            return [value(depth + 1) for _ in range(rng.randrange(4))]
        return {f"k{i}": value(depth + 1) for i in range(rng.randrange(4))}

    for _ in range(2000):
        block = encode({"$type": "x", **{f"f{i}": value(1) for i in range(rng.randrange(1, 5))}})
        assert record_json_form(block) == _exact(block)

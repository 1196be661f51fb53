"""The compiled Avro decoders read exactly what fastavro reads, and refuse what is not a value.

Every test runs twice: with the native reader (``_avrowire.decode``) and with the straight-line Python.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.jetstream.decode import decode_event
from producers.repos.source import RepoResult
from runtime.contract import avrowrite
from runtime.contract.avroread import DECODE_ERRORS, compile_decoder, native_program, read_long
from runtime.contract.avrowrite import resolve_named
from runtime.contract.codec import AvroCodec, shipped
from runtime.contract.topics import schema_name_for
from runtime.contract.typed import datum_for
from runtime.errors import DecodeError
from runtime.simulator.synthetic import Generator
from tests.avro_samples import ALL_TYPES, captured_events
from tests.native import select_wire


@pytest.fixture(autouse=True, params=["native", "python"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The decoders compiled in a test are native (``_avrowire.c``) or the pure-Python ones."""
    select_wire(request.param, monkeypatch)
    param: str = request.param
    return param


def _write(parsed: Any, datum: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, datum)
    return buf.getvalue()


def _same(parsed: Any, datum: dict[str, Any]) -> None:
    body = _write(parsed, datum)
    decoder = compile_decoder(parsed)
    assert decoder is not None
    assert decoder(body) == fastavro.schemaless_reader(io.BytesIO(body), parsed, parsed)


def test_every_shipped_schema_compiles() -> None:
    for name, s in shipped().items():
        assert s.decoder is not None, name


def test_synthetic_events_decode_like_fastavro() -> None:
    for raw in Generator(seed=11, accounts=50, real_cids=False).events(3000):
        event = decode_event(raw, job="t")
        _same(shipped()[schema_name_for(event)].parsed, datum_for(event))


def test_captured_firehose_events_decode_like_fastavro(fixtures_dir: Path) -> None:
    events = captured_events(fixtures_dir)
    assert len(events) >= 150
    for event in events:
        _same(shipped()[schema_name_for(event)].parsed, datum_for(event))


def test_other_shipped_records_and_every_supported_type_decode_like_fastavro() -> None:
    status = RepoResult(did="did:plc:x", cursor=3, outcome="ok", by_type={"post": 3, "like": 70_000},
                        timestamps={"first": 1_700_000_000_000_000})
    _same(shipped()["repo_status"].parsed, status.status_datum("repos", 5, replica="r", work_partition=1,
                                                                work_offset=2, batch=3))
    _same(shipped()["dead_letter"].parsed, {
        "reason": "r", "detail": "é" * 5000, "stage": "s", "origin": "o", "topic": "t", "partition": 3,
        "offset": 2**40, "did": None, "cursor": -5, "time_us": 1, "payload": bytes(range(256)) * 50})
    schema = fastavro.parse_schema(ALL_TYPES)
    _same(schema, {"b": True, "i": -5, "f": 1.5, "d": -2.25, "fx": b"abcd", "e": "c", "e2": "a", "sn": None,
                   "ln": 2**40, "en": "b", "inner": {"x": [None, "q", ""], "m": {"k": [1, -2], "": []}},
                   "rs": [{"x": ["a"], "m": {"z": [0]}}], "by": b"\x00\xff"})


def test_longs_at_every_varint_boundary() -> None:
    for n in (0, 1, -1, 63, -64, 64, 8191, 8192, 2**31, -(2**31), 2**53, 2**63 - 1, -(2**63)):
        body = _write(fastavro.parse_schema({"type": "long"}), n)  # type: ignore[arg-type]
        assert read_long(body, 0) == (n, len(body))


def test_truncated_and_corrupt_bytes_raise() -> None:
    like = shipped()["app.bsky.feed.like"]
    assert like.decoder is not None
    raw = next(e for e in Generator(seed=3).events(200)
               if e.get("commit", {}).get("collection") == "app.bsky.feed.like")
    datum = datum_for(decode_event(raw, job="t"))
    body = _write(like.parsed, datum)
    for cut in range(len(body)):
        with pytest.raises(DECODE_ERRORS):
            like.decoder(body[:cut])
    with pytest.raises(DECODE_ERRORS):
        like.decoder(b"\xff" * 12)  # a varint that never ends
    union = compile_decoder(fastavro.parse_schema(
        {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["null", "string"]}]}))
    assert union is not None
    assert union(b"\x02\x02x") == {"u": "x"}
    with pytest.raises(DECODE_ERRORS):
        union(b"\x04\x02x")  # branch 2 of a 2-branch union
    with pytest.raises(DECODE_ERRORS):
        union(b"\x02\x03x")  # a negative length
    # the codec: a good value round-trips, a cut one is a DecodeError
    codec = AvroCodec()
    good = codec.encode("app.bsky.feed.like", "t", datum)
    assert codec.decode(good) == ("app.bsky.feed.like", datum)
    for cut in (11, len(good) // 2, len(good) - 1):
        with pytest.raises(DecodeError):
            codec.decode(good[:cut])


def test_jetstream2_events_decode_like_fastavro() -> None:
    """(d) The compiled readers read what fastavro reads of a jetstream2 event whose times are set or None,
    and the codec gives back the event."""
    import dataclasses

    from runtime.contract.records import AccountEvent, IdentityEvent, RecordEvent
    from runtime.contract.typed import event_from_datum

    codec = AvroCodec()
    events = [decode_event(raw, job="t") for raw in Generator(seed=12, accounts=30, real_cids=False).events(600)]
    seen = set()
    for event in events:
        for witnessed, indexed in ((1_760_000_000_123_456, 1_700_000_000_000_001), (3, None), (None, None),
                                   (-(2**63), 2**63 - 1)):
            v2 = dataclasses.replace(event, source="jetstream2", witnessed_at=witnessed, indexed_at=indexed)
            assert isinstance(v2, (RecordEvent, IdentityEvent, AccountEvent))
            name = schema_name_for(v2)
            seen.add(name)
            datum = datum_for(v2)
            _same(shipped()[name].parsed, datum)
            decoder = shipped()[name].decoder
            assert decoder is not None
            decoded = decoder(_write(shipped()[name].parsed, datum))
            assert (decoded["source"], decoded["witnessed_at"], decoded["indexed_at"]) == (
                "jetstream2", witnessed, indexed)
            got_name, got = codec.decode(codec.encode_event(v2, "t"))
            assert got_name == name and got == decoded
            assert event_from_datum(name, got) == v2
    assert {"identity", "account", "generic", "app.bsky.feed.post"} <= seen


def test_the_native_reader_is_the_one_compiled_where_built(reader: str) -> None:
    decoder = shipped()["app.bsky.feed.like"].decoder
    assert decoder is not None
    native = avrowrite.WIRE is not None and getattr(decoder, "func", None) is avrowrite.WIRE.decode
    assert native == (reader == "native")


def test_native_reader_refuses_longs_beyond_64_bits_and_bad_programs(reader: str) -> None:
    w = avrowrite.WIRE
    if w is None:
        return
    program = native_program({"type": "record", "name": "L", "fields": [{"name": "n", "type": "long"}]})
    assert w.decode(program, b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01") == {"n": 2**63 - 1}
    with pytest.raises(DECODE_ERRORS):
        w.decode(program, b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x03")  # a 65th bit
    with pytest.raises(DECODE_ERRORS):
        w.decode(program, b"\xff" * 10 + b"\x00")  # 11 bytes
    with pytest.raises(TypeError):
        w.decode((11, ("n",), "not a tuple"), b"\x00")
    with pytest.raises(ValueError, match="unknown program op"):
        w.decode((99, None, None), b"\x00")
    deep: tuple[object, ...] = (2, None, None)
    for _ in range(70):
        deep = (11, ("x",), (deep,))
    with pytest.raises(ValueError, match="deeper"):
        w.decode(deep, b"\x00")


_SAMPLE_SCHEMA = resolve_named(fastavro.parse_schema(ALL_TYPES), {})
_SAMPLE = _write(fastavro.parse_schema(ALL_TYPES), {
    "b": True, "i": -5, "f": 1.5, "d": -2.25, "fx": b"abcd", "e": "c", "e2": "a", "sn": None, "ln": 2**40, "en": "b",
    "inner": {"x": [None, "q", ""], "m": {"k": [1, -2], "": []}}, "rs": [{"x": ["a"], "m": {"z": [0]}}],
    "by": b"\x00\xff"})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200),
                 st.tuples(st.integers(0, len(_SAMPLE) - 1), st.integers(0, 255)).map(
                     lambda t: _SAMPLE[:t[0]] + bytes([t[1]]) + _SAMPLE[t[0] + 1:])))
def test_native_and_python_readers_agree_on_any_bytes(reader: str, data: bytes) -> None:
    """Whatever the bytes: what the native reader returns, the Python one returns too, and what the
    Python one refuses, the native one refuses (it also refuses longs beyond 64 bits, which fastavro then decides)."""
    if reader == "python" or avrowrite.WIRE is None:
        return
    native = compile_decoder(_SAMPLE_SCHEMA)
    python = compile_decoder(_SAMPLE_SCHEMA, native=False)
    assert native is not None and python is not None
    try:
        got = native(data)
    except DECODE_ERRORS:
        got = None
    try:
        want = python(data)
    except DECODE_ERRORS:
        want = None
    if got is not None:
        assert repr(got) == repr(want)  # NaN floats compare by their text
    if want is None:
        assert got is None

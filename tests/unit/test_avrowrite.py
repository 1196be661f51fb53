"""The compiled Avro encoders write exactly fastavro's bytes, and the codec falls back to fastavro
for anything they do not take (which then encodes it, or explains why it cannot)."""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import schemas
from producers.jetstream.decode import decode_event
from producers.repos.source import RepoResult
from runtime.contract import avrowrite
from runtime.contract.avrowrite import (
    _HIGH_MAX,
    ENCODE_ERRORS,
    compile_encoder,
    compile_parts_encoder,
    parts_fields,
    zz_long,
)
from runtime.contract.codec import AvroCodec, shipped
from runtime.contract.records import RecordEvent
from runtime.contract.topics import TYPED_COLLECTIONS, schema_name_for, schema_name_for_collection
from runtime.contract.typed import ENVELOPE, TYPED, datum_for, record_datum
from runtime.errors import InvalidRecordError
from runtime.simulator.synthetic import Generator
from tests.avro_samples import ALL_TYPES, captured_events
from tests.native import select_wire


@pytest.fixture(autouse=True, params=["native", "python"])
def wire(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the native writers (``_avrowire.c``) and with the pure-Python code."""
    select_wire(request.param, monkeypatch)
    param: str = request.param
    return param


def test_native_writers_refuse_what_does_not_fit(wire: str) -> None:
    w = avrowrite.WIRE
    if w is None:
        return
    out = bytearray()
    w.string(out, "é")
    w.opt_string(out, None, 0)
    w.opt_string(out, "a", 0)
    w.opt_string(out, None, 1)
    w.opt_utf8(out, b"b", 1)
    w.long(out, -(1 << 63))
    w.long(out, (1 << 63) - 1)
    assert bytes(out) == (b"\x04\xc3\xa9" + b"\x00" + b"\x02\x02a" + b"\x02" + b"\x00\x02b"
                          + zz_long(-(1 << 63)) + zz_long((1 << 63) - 1))
    for call, error in [
        (lambda: w.string(out, b"x"), TypeError),
        (lambda: w.string(out, "\ud800"), UnicodeEncodeError),
        (lambda: w.utf8(out, "x"), TypeError),
        (lambda: w.long(out, 1 << 63), ValueError),
        (lambda: w.long(out, 1.0), TypeError),
        (lambda: w.opt_string(out, "x", 2), ValueError),
        (lambda: w.string(b"", "x"), TypeError),
        (lambda: w.string(out), TypeError),
    ]:
        with pytest.raises(error):
            call()


def _fastavro(parsed: Any, datum: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, datum)
    return buf.getvalue()


def _compiled(parsed: Any, datum: dict[str, Any]) -> bytes:
    encoder = compile_encoder(parsed)
    assert encoder is not None
    out = bytearray()
    encoder(datum, out)
    return bytes(out)


def _same(parsed: Any, datum: dict[str, Any]) -> None:
    assert _compiled(parsed, datum) == _fastavro(parsed, datum)


def test_every_shipped_schema_compiles() -> None:
    for name, s in shipped().items():
        assert s.encoder is not None, name


def test_synthetic_events_of_every_collection_encode_like_fastavro() -> None:
    seen: set[str] = set()
    for raw in Generator(seed=9, accounts=50, real_cids=False).events(4000):
        event = decode_event(raw, job="t")
        name = schema_name_for(event)
        seen.add(name)
        _same(shipped()[name].parsed, datum_for(event))
    assert {"app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.actor.profile", "generic", "identity",
            "account"} <= seen


def test_captured_firehose_events_encode_like_fastavro(fixtures_dir: Path) -> None:
    events = captured_events(fixtures_dir)
    assert len(events) >= 150
    for event in events:
        _same(shipped()[schema_name_for(event)].parsed, datum_for(event))


def test_edge_values_encode_like_fastavro() -> None:
    like = shipped()["app.bsky.feed.like"].parsed
    base = datum_for(RecordEvent(did="did:plc:x", collection="app.bsky.feed.like", rkey="3k", operation="create",
                                 rev="3k", cid="bafy", record={"$type": "app.bsky.feed.like", "subject": {
                                     "uri": "at://did:plc:y/app.bsky.feed.post/3j", "cid": "bafz"},
                                     "createdAt": "2024-01-01T00:00:00Z"},
                                 source="jetstream", cursor=0, time_us=0))
    for text in ("", "é", "日本語 🦋", "x" * 8191, "y" * 8192, "z" * 100_000, "\x00"):
        _same(like, {**base, "record_json": text, "subject_uri": text})
    for n in (0, 1, -1, 63, 64, 8191, 8192, 16383, 16384, -8193, 2**31, 2**53 + 1, 2**63 - 1, -(2**63),
              1_700_000_000_123_456, -1_700_000_000_123_456):
        _same(like, {**base, "cursor": n, "time_us": n})
    _same(like, {k: v for k, v in base.items() if k not in ("rev", "via_uri", "job")})  # defaults
    dead = shipped()["dead_letter"].parsed
    _same(dead, {"reason": "r", "detail": "d", "stage": "s", "origin": "o", "topic": None, "partition": None,
                 "offset": None, "did": None, "cursor": None, "time_us": 5, "payload": bytes(range(256)) * 40})
    status = shipped()["repo_status"].parsed
    result = RepoResult(did="did:plc:x", cursor=3, outcome="ok", by_type={"post": 3, "like": 70_000},
                        skipped={"out_of_range": 1}, timestamps={"first": 1_700_000_000_000_000})
    _same(status, result.status_datum("repos", 1_700_000_000_000_000, replica="r1", work_partition=2,
                                      work_offset=99, batch=7))
    _same(status, RepoResult(did="did:plc:z", cursor=0, outcome="failed").status_datum("repos", 1))


def test_large_longs_stay_exact_when_their_cache_turns_over() -> None:
    rng = random.Random(3)
    values = [rng.randrange(-(2**63), 2**63) for _ in range(3 * _HIGH_MAX)]
    values += [1_700_000_000_000_000 + i * 17_000 for i in range(3 * _HIGH_MAX)]
    schema = fastavro.parse_schema({"type": "record", "name": "L", "fields": [{"name": "v", "type": "long"}]})
    for v in values:
        expected = _fastavro(schema, {"v": v})
        assert zz_long(v) == expected
        assert _compiled(schema, {"v": v}) == expected  # the encoders' inline form of the same


@pytest.mark.parametrize("datum", [
    {"b": True, "i": -5, "f": 1.5, "d": -2.25, "fx": b"abcd", "e": "c", "e2": "a", "sn": None, "ln": 2**40,
     "en": "b", "inner": {"x": [None, "q", ""], "m": {"k": [1, -2], "": []}}, "rs": [], "by": b""},
    {"b": False, "i": 2**31 - 1, "f": 0.0, "d": 1e300, "fx": bytearray(b"wxyz"), "e": "a", "e2": "b",
     "inner": {"x": [], "m": {}}, "rs": [{"x": ["a"], "m": {"z": [0]}}], "by": b"\x00\xff"},
])
def test_every_supported_type_encodes_like_fastavro(datum: dict[str, Any]) -> None:
    _same(fastavro.parse_schema(ALL_TYPES), datum)


def test_unsupported_schemas_are_left_to_fastavro() -> None:
    three = {"type": "record", "name": "U", "fields": [{"name": "u", "type": ["null", "string", "long"]}]}
    logical = {"type": "record", "name": "D", "fields": [
        {"name": "t", "type": {"type": "long", "logicalType": "timestamp-micros"}}]}
    assert compile_encoder(fastavro.parse_schema(three)) is None
    assert compile_encoder(fastavro.parse_schema(logical)) is None
    assert compile_encoder(fastavro.parse_schema({"type": "array", "items": "long"})) is None


@pytest.mark.parametrize("bad", [
    {"subject_uri": 5}, {"cursor": "1"}, {"cursor": 1.5}, {"operation": "upsert"}, {"did": None},
    {"did": b"did:plc:x"}, {"record_json": "\ud800"},
])
def test_a_datum_the_compiled_encoder_refuses_is_left_to_fastavro(bad: dict[str, Any]) -> None:
    like = shipped()["app.bsky.feed.like"]
    datum = {"did": "did:plc:x", "collection": "app.bsky.feed.like", "rkey": "3k", "operation": "create",
             "rev": None, "cid": None, "source": "repo", "cursor": 1, "time_us": 2, "job": "",
             "record_json": None, **bad}
    assert like.encoder is not None
    with pytest.raises(ENCODE_ERRORS):
        like.encoder(datum, bytearray())
    # The codec then does what fastavro does: encode it (fastavro truncates a float long) or refuse.
    try:
        expected = _fastavro(like.parsed, datum)
    except (ValueError, TypeError, AttributeError):
        with pytest.raises((ValueError, TypeError, AttributeError)):
            AvroCodec().encode("app.bsky.feed.like", "t", datum)
    else:
        assert AvroCodec().encode("app.bsky.feed.like", "t", datum)[10:] == expected


def test_the_codec_writes_compiled_bytes_behind_its_header() -> None:
    codec = AvroCodec()
    for name in schemas.names():
        s = shipped()[name]
        if name not in ("app.bsky.graph.follow", "identity"):
            continue
        datum = {"did": "did:plc:x", "source": "firehose", "cursor": 7, "time_us": 8, "job": "j", "seq": 7,
                 "time": None, "handle": "a.b", "collection": "app.bsky.graph.follow", "rkey": "r",
                 "operation": "delete", "rev": None, "cid": None, "record_json": None, "subject": None,
                 "created_at": None}
        value = codec.encode(name, "t", datum)
        assert value[10:] == _fastavro(s.parsed, datum)
        assert codec.decode(value)[0] == name


def _record_events() -> list[RecordEvent]:
    events = [e for e in (decode_event(raw, job="t") for raw in Generator(seed=5, accounts=40).events(3000))
              if isinstance(e, RecordEvent)]
    like = {"$type": "app.bsky.feed.like", "subject": {"uri": "at://did:plc:y/app.bsky.feed.post/3j", "cid": "b"},
            "createdAt": "2024-01-01T00:00:00Z", "via": {"uri": "at://did:plc:y/app.bsky.feed.repost/3", "cid": "c"}}
    for n in (0, -1, 8192, 16383, 16384, 2**63 - 1, -(2**63)):
        events.append(RecordEvent(did="did:plc:é", collection="app.bsky.feed.like", rkey="3k", operation="update",
                                  rev=None, cid="bafy", record=like, source="repo", cursor=n, time_us=-n - 1,
                                  job="日本"))
    return events


def test_the_typed_fields_follow_their_schemas() -> None:
    for collection in TYPED_COLLECTIONS:
        parsed = shipped()[schema_name_for_collection(collection)].parsed
        assert TYPED[collection].names == parts_fields(parsed, ENVELOPE, "record_json"), collection
        assert len(TYPED[collection].empty) == len(TYPED[collection].names)
    assert parts_fields(shipped()["generic"].parsed, ENVELOPE, "record_json") == ()


def test_record_events_encode_without_a_datum_to_the_same_bytes() -> None:
    codec = AvroCodec()
    events = _record_events()
    assert {e.operation for e in events} == {"create", "update", "delete"}
    assert {e.collection for e in events} >= set(TYPED_COLLECTIONS)
    for event in events:
        name = schema_name_for(event)
        topic = f"t.{event.collection}"
        assert shipped()[name].parts_encoder is not None
        assert codec.record_encoder_for(name, topic)(event) == codec.encode(name, topic, record_datum(event)), event


def test_captured_firehose_records_encode_without_a_datum_to_the_same_bytes(fixtures_dir: Path) -> None:
    codec = AvroCodec()
    for event in captured_events(fixtures_dir):
        if isinstance(event, RecordEvent):
            name = schema_name_for(event)
            assert codec.record_encoder_for(name, "t")(event) == codec.encode(name, "t", record_datum(event))


def test_a_parts_encoder_refuses_what_does_not_fit() -> None:
    parsed = shipped()["app.bsky.graph.follow"].parsed
    encoder = compile_parts_encoder(parsed, ENVELOPE, "record_json")
    assert encoder is not None
    event = RecordEvent(did="did:plc:x", collection="app.bsky.graph.follow", rkey="3k", operation="create",
                        rev="r", cid="c", record={"$type": "app.bsky.graph.follow", "subject": "did:plc:y"},
                        source="jetstream", cursor=1, time_us=2)
    bad: list[tuple[Any, tuple[Any, ...]]] = [(b"{}", ("did:plc:y",)), (b"{}", ("did:plc:y", None, "extra")),
                                              ("{}", ("did:plc:y", None)), (b"{}", (5, None))]
    for utf8, values in bad:
        with pytest.raises(ENCODE_ERRORS):
            encoder(event, utf8, values, bytearray())
    with pytest.raises(ENCODE_ERRORS):
        encoder(dataclasses.replace(event, cursor=2**63), b"{}", ("x", None), bytearray())
    # the codec's own encoder explains it through fastavro instead of writing wrong bytes
    with pytest.raises((ValueError, TypeError)):
        AvroCodec().record_encoder_for("app.bsky.graph.follow", "t")(
            dataclasses.replace(event, cursor="1"))  # type: ignore[arg-type]
    assert compile_parts_encoder(shipped()["identity"].parsed, ENVELOPE, "record_json") is None


def test_a_record_without_a_json_form_is_invalid_not_a_crash() -> None:
    event = RecordEvent(did="did:plc:x", collection="com.example.thing", rkey="3k", operation="create", rev=None,
                        cid="c", record={"n": 2**70}, source="firehose", cursor=1, time_us=2)
    with pytest.raises(InvalidRecordError):
        AvroCodec().record_encoder_for("generic", "t")(event)


def _jetstream2_events() -> list[RecordEvent]:
    """Record events of every schema from Jetstream v2, with both times, one, or none."""
    out: list[RecordEvent] = []
    for event in _record_events()[:400]:
        for witnessed, indexed in ((1_760_000_000_123_456, 1_700_000_000_000_001), (5, None), (None, None),
                                   (-(2**63), 2**63 - 1), (0, 8191)):
            out.append(dataclasses.replace(event, source="jetstream2", witnessed_at=witnessed, indexed_at=indexed))
    return out


def test_jetstream2_events_encode_like_fastavro() -> None:
    """(d) The compiled writers, with a datum and without one, write fastavro's bytes for a jetstream2
    event whose times are set or None."""
    codec = AvroCodec()
    events = _jetstream2_events()
    assert {schema_name_for(e) for e in events} >= set(TYPED_COLLECTIONS) | {"generic"}
    for event in events:
        name = schema_name_for(event)
        datum = record_datum(event)
        assert (datum["source"], datum["witnessed_at"], datum["indexed_at"]) == (
            "jetstream2", event.witnessed_at, event.indexed_at)
        _same(shipped()[name].parsed, datum)
        value = codec.record_encoder_for(name, "t")(event)
        assert value[10:] == _fastavro(shipped()[name].parsed, datum)
    from runtime.contract.records import AccountEvent, IdentityEvent

    for witnessed, indexed in ((1_760_000_000_123_456, 1_700_000_000_000_001), (None, None), (7, None)):
        for other in (IdentityEvent("did:plc:a", "a.test", 1, None, "jetstream2", 3, 4, "j", witnessed, indexed),
                      AccountEvent("did:plc:a", True, None, 1, None, "jetstream2", 3, 4, "j", witnessed, indexed)):
            datum = datum_for(other)
            _same(shipped()[schema_name_for(other)].parsed, datum)
            assert codec.encode_event(other, "t")[10:] == _fastavro(shipped()[schema_name_for(other)].parsed, datum)


def test_the_jetstream2_times_come_from_the_event_not_the_typed_values() -> None:
    for collection in (*TYPED_COLLECTIONS, "com.example.x"):
        parsed = shipped()[schema_name_for_collection(collection)].parsed
        assert not {"witnessed_at", "indexed_at"} & set(parts_fields(parsed, ENVELOPE, "record_json"))
        assert [f["name"] for f in parsed["fields"][-2:]] == ["witnessed_at", "indexed_at"]


def test_a_time_that_is_not_a_long_is_left_to_fastavro() -> None:
    event = dataclasses.replace(_record_events()[0], source="jetstream2", witnessed_at=2**63)
    with pytest.raises((ValueError, TypeError, OverflowError)):
        AvroCodec().encode_event(event, "t")
    with pytest.raises(ENCODE_ERRORS):
        AvroCodec().encode_event(dataclasses.replace(event, witnessed_at=None, source="jetstream3"), "t")


# ---------------------------------------------------------------- the native parts writer

_ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                       st.text(max_size=6), st.binary(max_size=6), st.floats(allow_nan=False),
                       st.lists(st.text(max_size=4), max_size=3), st.tuples(st.text(max_size=3)),
                       st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=3),
                       st.sampled_from(["create", "update", "delete", "jetstream", "repo", "\ud800"]))
_LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _valid(schema: Any) -> st.SearchStrategy[Any]:
    """Values of a field schema (of the types the record-event schemas use)."""
    if isinstance(schema, list):
        return st.one_of(st.none(), _valid(next(b for b in schema if b != "null")))
    if schema == "string":
        return st.text(max_size=6)
    if schema == "long":
        return _LONGS
    if isinstance(schema, dict) and schema.get("type") == "enum":
        return st.sampled_from(schema["symbols"])
    if isinstance(schema, dict) and schema.get("type") == "array":
        return st.lists(st.text(max_size=4), max_size=3)
    raise AssertionError(f"no strategy for {schema!r}")


def _python_parts(name: str) -> Any:
    encoder = compile_parts_encoder(shipped()[name].parsed, ENVELOPE, "record_json")
    assert encoder is not None
    return encoder


@given(data=st.data(), name=st.sampled_from(sorted({schema_name_for_collection(c) for c in TYPED_COLLECTIONS}
                                                   | {"generic"})))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_native_parts_writer_writes_what_the_compiled_one_does(wire: str, data: st.DataObject,
                                                                  name: str) -> None:
    """Valid envelopes, record JSON and typed values, or with one thing wrong: the same bytes, or both refuse."""
    if wire != "native":
        return
    program = shipped()[name].parts_program
    assert program is not None
    fields = avrowrite.resolve_named(shipped()[name].parsed, {})["fields"]
    env = {f["name"]: data.draw(_valid(f["type"]), label=f["name"]) for f in fields if f["name"] in ENVELOPE}
    typed = [data.draw(_valid(f["type"]), label=f["name"]) for f in fields
             if f["name"] not in ENVELOPE and f["name"] != "record_json"]
    utf8: Any = data.draw(st.one_of(st.none(), st.binary(max_size=8)), label="utf8")
    wrong = data.draw(st.sampled_from(["nothing", "nothing", "envelope", "value", "utf8", "count"]), label="wrong")
    if wrong == "envelope":
        env[data.draw(st.sampled_from(sorted(env)), label="field")] = data.draw(_ANY_VALUE, label="bad")
    elif wrong == "value" and typed:
        typed[data.draw(st.integers(0, len(typed) - 1), label="index")] = data.draw(_ANY_VALUE, label="bad")
    elif wrong == "utf8":
        utf8 = data.draw(_ANY_VALUE, label="bad utf8")
    elif wrong == "count":
        typed = typed[:-1] if typed and data.draw(st.booleans(), label="fewer") else [*typed, "extra"]
    # a RecordEvent (its slots read directly) or another object with the same attributes (looked up)
    event: Any = (RecordEvent(record=None, **env) if data.draw(st.booleans(), label="slots")
                  else SimpleNamespace(**env))
    values = tuple(typed)
    header = b"\xc3\x01" + bytes(8)
    expected: bytes | None
    try:
        out = bytearray(header)
        _python_parts(name)(event, utf8, values, out)
        expected = bytes(out)
    except ENCODE_ERRORS:
        expected = None  # refused: the codec's fallback explains it, whichever error was raised
    got: bytes | None
    try:
        got = avrowrite.WIRE.encode_parts(program, header, event, utf8, values)
    except ENCODE_ERRORS:
        got = None
    assert got == expected
    if wrong == "nothing":
        assert got is not None


def test_a_parts_program_is_refused_when_it_is_not_one(wire: str) -> None:
    w = avrowrite.WIRE
    if w is None:
        return
    for fields, count in [((("x",),), 0), (((0, 5, 0, None),), 0), (((2, 3, 0, None),), 2), (((9, 0, 0, None),), 1),
                          (((0, "a", 99, None),), 0), (((2, 0, 1, 7),), 1), (((0, "a", 7, None),), 0)]:
        with pytest.raises((TypeError, ValueError)):
            w.compile_parts(fields, count, None)
    program = w.compile_parts(((2, 0, 0, None),), 1, None)
    with pytest.raises((TypeError, ValueError)):
        w.encode_parts(("not", "a program"), b"", None, None, ("a",))
    with pytest.raises(TypeError):
        w.encode_parts(program, b"", None, None, ["a"])  # values come as a tuple
    assert w.encode_parts(program, b"h", None, None, ("ab",)) == b"h\x04ab"
    # a string longer than the writer's first buffer
    assert w.encode_parts(program, b"", None, None, ("é" * 3000,)) == zz_long(6000) + "é".encode() * 3000

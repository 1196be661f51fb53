"""The compiled Avro encoders write exactly fastavro's bytes, and the codec falls back to fastavro
for anything they do not take (which then encodes it, or explains why it cannot)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import fastavro
import pytest

import schemas
from producers.firehose.decode import decode_frame
from producers.jetstream.decode import decode_event
from producers.repos.source import RepoResult
from runtime.avrowrite import _HIGH_MAX, ENCODE_ERRORS, compile_encoder, zz_long
from runtime.codec import AvroCodec, shipped
from runtime.errors import DropError
from runtime.records import Event, RecordEvent
from runtime.simulator.relay import read_capture
from runtime.simulator.synthetic import Generator
from runtime.topics import schema_name_for
from runtime.typed import datum_for


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


def captured_events(fixtures_dir: Path) -> list[Event]:
    """Every event of the captured firehose frames (shared with test_avroread)."""
    out: list[Event] = []
    for frame in read_capture(fixtures_dir / "frames.bin.zst"):
        try:
            out.extend(decode_frame(frame, job="fx").events)
        except DropError:
            continue
    return out


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
        assert zz_long(v) == _fastavro(schema, {"v": v})


ALL_TYPES = {
    "type": "record", "name": "All", "namespace": "t", "fields": [
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "fx", "type": {"type": "fixed", "name": "F4", "size": 4}},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["a", "b", "c"]}},
        {"name": "e2", "type": "t.E"},
        {"name": "sn", "type": ["string", "null"], "default": "x"},
        {"name": "ln", "type": ["null", "long"], "default": None},
        {"name": "en", "type": ["null", "E"], "default": None},
        {"name": "inner", "type": {"type": "record", "name": "In", "fields": [
            {"name": "x", "type": {"type": "array", "items": ["null", "string"]}},
            {"name": "m", "type": {"type": "map", "values": {"type": "array", "items": "long"}}}]}},
        {"name": "rs", "type": {"type": "array", "items": "t.In"}},
        {"name": "by", "type": ["null", "bytes"], "default": None},
    ]}


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

"""The Avro contract: every schema parses, names its record type, round-trips in both wire
formats, and evolves backward compatibly from the released baseline (tests/schema_baseline)."""

from __future__ import annotations

import json
from pathlib import Path

import avro.schema
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

import schemas
from runtime.contract.codec import SINGLE_OBJECT_MAGIC, AvroCodec, shipped
from runtime.contract.records import AccountEvent, IdentityEvent, RecordEvent, SyncEvent
from runtime.contract.topics import TYPED_COLLECTIONS, TopicMap, schema_name_for
from runtime.contract.typed import datum_for, event_from_datum
from runtime.errors import DecodeError, InvalidRecordError
from runtime.simulator.synthetic import Generator

BASELINE = Path(__file__).resolve().parent.parent / "schema_baseline"


def test_every_schema_is_a_named_record() -> None:
    names = schemas.names()
    assert set(TYPED_COLLECTIONS) | {"generic", "identity", "account", "dead_letter"} <= set(names)
    full_names = set()
    for name in names:
        raw = schemas.load(name)
        assert raw["type"] == "record", name
        assert raw["name"] and raw["namespace"] == "atproto.backfill", name
        assert raw.get("doc"), f"{name} has no doc"
        full_names.add(f"{raw['namespace']}.{raw['name']}")
    assert len(full_names) == len(names), "two schemas share a record name"


@pytest.mark.parametrize("name", [n for n in schemas.names() if n not in ("dead_letter", "repo_status")])
def test_record_schemas_carry_the_envelope(name: str) -> None:
    fields = {f["name"] for f in schemas.load(name)["fields"]}
    assert {"did", "source", "cursor", "time_us", "job"} <= fields
    if name == "sync":
        assert "rev" in fields
    elif name not in ("identity", "account"):
        assert {"collection", "rkey", "operation", "rev", "cid", "record_json"} <= fields


def _events(n: int = 3000) -> list[RecordEvent | IdentityEvent | AccountEvent]:
    from producers.jetstream.decode import decode_event

    gen = Generator(seed=5, accounts=40, real_cids=False)
    return [decode_event(e, job="t") for e in gen.events(n)]


@pytest.mark.parametrize("registry", [False, True])
def test_round_trip_every_event_kind(registry: bool) -> None:
    codec = AvroCodec.from_config({"url": "mock://schemas-test"} if registry else None)
    topics = TopicMap("rt")
    seen: set[str] = set()
    for event in _events():
        name = schema_name_for(event)
        seen.add(name)
        value = codec.encode(name, topics.for_event(event), datum_for(event))
        assert value[:1] == (b"\x00" if registry else SINGLE_OBJECT_MAGIC[:1])
        got_name, datum = codec.decode(value)
        assert got_name == name
        assert event_from_datum(got_name, datum) == event
    assert seen >= set(TYPED_COLLECTIONS) | {"generic", "identity", "account"}


def test_a_single_object_codec_reads_registry_values_only_with_a_registry() -> None:
    event = _events(5)[0]
    reg = AvroCodec.from_config({"url": "mock://schemas-test-2"})
    value = reg.encode(schema_name_for(event), "x", datum_for(event))
    with pytest.raises(DecodeError):
        AvroCodec().decode(value)
    assert reg.decode(value)[0] == schema_name_for(event)


def test_dead_letter_round_trip() -> None:
    codec = AvroCodec()
    datum = {"reason": "malformed_json", "detail": "x", "stage": "producer:jetstream", "origin": "ws://h",
             "topic": None, "partition": None, "offset": None, "did": None, "cursor": 5, "time_us": 1,
             "payload": b"\x00\xff"}
    assert codec.decode(codec.encode("dead_letter", "d", datum)) == ("dead_letter", datum)


@pytest.mark.parametrize("corrupt", [b"", b"\xc3\x01" + b"\x00" * 8 + b"\x01", b"\x07abcdef", b"\xc3"])
def test_corrupt_values_raise_decode_error(corrupt: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        AvroCodec().decode(corrupt)
    assert info.value.reason == "decode_avro"


def test_truncated_avro_body_raises_decode_error() -> None:
    event = _events(5)[0]
    value = AvroCodec().encode(schema_name_for(event), "x", datum_for(event))
    with pytest.raises(DecodeError):
        AvroCodec().decode(value[: len(value) // 2])


def _compatible(reader: dict, writer: dict) -> bool:
    checker = ReaderWriterCompatibilityChecker()
    result = checker.get_compatibility(avro.schema.parse(json.dumps(reader)), avro.schema.parse(json.dumps(writer)))
    return result.compatibility is SchemaCompatibilityType.compatible


@pytest.mark.parametrize("name", sorted(p.stem for p in BASELINE.glob("*.avsc")))
def test_current_schema_reads_the_released_baseline(name: str) -> None:
    """Backward compatibility: consumers on the current schema read data written with the baseline."""
    baseline = json.loads((BASELINE / f"{name}.avsc").read_text())
    assert _compatible(schemas.load(name), baseline), f"{name}.avsc is not backward compatible"


def test_the_compatibility_check_catches_a_breaking_change() -> None:
    base = schemas.load("app.bsky.feed.like")
    broken = json.loads(json.dumps(base))
    broken["fields"].append({"name": "new_required", "type": "string"})  # no default: breaks old data
    assert not _compatible(broken, base)
    fine = json.loads(json.dumps(base))
    fine["fields"].append({"name": "new_optional", "type": ["null", "string"], "default": None})
    assert _compatible(fine, base)


def test_fingerprints_are_distinct() -> None:
    fps = [s.fingerprint for s in shipped().values()]
    assert len(set(fps)) == len(fps)



def test_fuzz_a_registry_id_nobody_registered_is_a_decode_error() -> None:
    # found by tests/fuzz: the registry's 404 (SchemaRegistryError) escaped the consumer's decode
    codec = AvroCodec.from_config({"url": "mock://schemas-test-fuzz"})
    with pytest.raises(DecodeError) as info:
        codec.decode(b"\x00\x00\x00\x22\x00\x07@did:plc:a")
    assert info.value.reason == "decode_avro"


def test_fuzz_a_registry_schema_of_another_kind_is_a_decode_error() -> None:
    from confluent_kafka.schema_registry import Schema

    codec = AvroCodec.from_config({"url": "mock://schemas-test-fuzz-2"})
    registry = codec._registry
    primitive = registry.register_schema("other-value", Schema('"string"', "AVRO"))
    with pytest.raises(DecodeError):
        codec.decode(b"\x00" + int(primitive).to_bytes(4, "big") + b"\x02a")


def test_fuzz_a_collection_too_long_for_a_topic_name_is_invalid() -> None:
    topics = TopicMap("atproto")
    longest = "a." + "b" * 235  # "atproto." + it + ".dlq" is Kafka's 249 characters
    assert topics.for_collection(longest) == f"atproto.{longest}"
    with pytest.raises(InvalidRecordError):
        topics.for_collection(longest + "b")


# --- the Jetstream v2 change: the ``jetstream2`` source symbol, the enum default, two envelope times ---

_EVENT_SCHEMAS = [n for n in schemas.names() if n not in ("dead_letter", "repo_status")]
#: The event schemas the Jetstream v2 change evolved (those released before it, in the baseline).
_EVOLVED = [n for n in _EVENT_SCHEMAS if (BASELINE / f"{n}.avsc").exists()]
_TIMES = ("witnessed_at", "indexed_at")
_W, _I = 1_760_000_000_123_456, 1_700_000_000_000_001


def _old_text(name: str) -> dict:
    """The schema as the last commit has it (before this change), or the released baseline."""
    import subprocess

    try:
        text = subprocess.run(["git", "show", f"HEAD:schemas/{name}.avsc"], capture_output=True, check=True,
                              cwd=BASELINE.parent.parent, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = (BASELINE / f"{name}.avsc").read_text()
    old: dict = json.loads(text)
    if "witnessed_at" in {f["name"] for f in old["fields"]}:  # HEAD already has the change: use the baseline
        old = json.loads((BASELINE / f"{name}.avsc").read_text())
    return old


def _with_enum_default(schema: dict) -> dict:
    out = json.loads(json.dumps(schema))
    for f in out["fields"]:
        if f["name"] == "source":
            f["type"]["default"] = "jetstream"
    return out


def _v2_events(witnessed: int | None = _W, indexed: int | None = _I) -> dict[str, RecordEvent | IdentityEvent
                                                                               | AccountEvent | SyncEvent]:
    """A jetstream2 event for every event schema, with the two times given."""
    records: dict[str, dict | None] = {
        "app.bsky.feed.post": {"$type": "app.bsky.feed.post", "text": "hé", "createdAt": "2026-01-01T00:00:00Z",
                               "langs": ["en"]},
        "app.bsky.feed.like": {"$type": "app.bsky.feed.like", "createdAt": "2026-01-01T00:00:00Z",
                               "subject": {"uri": "at://did:plc:b/app.bsky.feed.post/3k", "cid": "bafy"}},
        "app.bsky.feed.repost": None,
        "app.bsky.graph.follow": {"$type": "app.bsky.graph.follow", "subject": "did:plc:b", "createdAt": "x"},
        "app.bsky.graph.block": {"$type": "app.bsky.graph.block", "subject": "did:plc:b", "createdAt": "x"},
        "app.bsky.actor.profile": {"$type": "app.bsky.actor.profile", "displayName": "A"},
        "generic": {"$type": "com.example.thing", "n": 1},
    }
    out: dict[str, RecordEvent | IdentityEvent | AccountEvent | SyncEvent] = {}
    for name, record in records.items():
        collection = "com.example.thing" if name == "generic" else name
        out[name] = RecordEvent("did:plc:a", collection, "3kabc", "create" if record else "delete", "3lrev",
                                "bafyrec" if record else None, record, "jetstream2", 42, indexed or witnessed or 0,
                                "j", witnessed_at=witnessed, indexed_at=indexed)
    out["identity"] = IdentityEvent("did:plc:a", "a.test", 900, "2026-01-01T00:00:00Z", "jetstream2", 43,
                                    _W, "j", witnessed_at=witnessed, indexed_at=indexed)
    out["account"] = AccountEvent("did:plc:a", False, "deleted", 901, None, "jetstream2", 44, _W, "j",
                                  witnessed_at=witnessed, indexed_at=indexed)
    out["sync"] = SyncEvent("did:plc:a", "3lrevsync2222", 902, "2026-01-01T00:00:00Z", "jetstream2", 45, _W, "j",
                            witnessed_at=witnessed, indexed_at=indexed)
    assert set(out) == set(_EVENT_SCHEMAS)
    return out


def _fa_write(schema: dict, datum: dict) -> bytes:
    import io

    import fastavro

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), datum)
    return buf.getvalue()


def _fa_read(body: bytes, writer: dict, reader: dict) -> dict:
    import io

    import fastavro

    datum: dict = fastavro.schemaless_reader(io.BytesIO(body), fastavro.parse_schema(writer),
                                             fastavro.parse_schema(reader))
    return datum


@pytest.mark.parametrize("name", _EVENT_SCHEMAS)
def test_the_source_enum_has_jetstream2_and_a_default(name: str) -> None:
    import fastavro

    raw = schemas.load(name)
    fastavro.parse_schema(raw)  # (a): every schema parses
    source = next(f for f in raw["fields"] if f["name"] == "source")["type"]
    assert source["name"] == "Source"
    assert source["symbols"] == ["jetstream", "firehose", "repo", "jetstream2"]  # appended: old indexes kept
    assert source["default"] == "jetstream"
    assert [f["name"] for f in raw["fields"][-2:]] == list(_TIMES)  # at the end of the record
    for f in raw["fields"][-2:]:
        assert f["type"] == ["null", "long"] and f["default"] is None and f["doc"]


@pytest.mark.parametrize("name", ["dead_letter", "repo_status"])
def test_the_other_schemas_have_no_source_enum_and_no_times(name: str) -> None:
    raw = schemas.load(name)
    assert raw == _old_text(name)  # unchanged
    assert "Source" not in json.dumps(raw) and not set(_TIMES) & {f["name"] for f in raw["fields"]}


def test_only_the_sync_schema_is_newer_than_the_baseline() -> None:
    assert set(_EVENT_SCHEMAS) - set(_EVOLVED) == {"sync"}
    assert shipped()["sync"].earlier == ()  # born with the times: no earlier version to read


@pytest.mark.parametrize("name", _EVOLVED)
def test_new_data_read_with_the_old_schema(name: str) -> None:
    """(b) A jetstream2 event with both times, written with the new schema: a reader whose schema has the
    enum default (every reader from this change on) reads ``jetstream`` and drops the times; a reader of
    the schema before the change, which has no default, cannot take the new symbol (it must be upgraded
    first), and reads the events of the old sources, dropping the times."""
    from fastavro.read import SchemaResolutionError

    new, old = schemas.load(name), _old_text(name)
    event = _v2_events()[name]
    datum = datum_for(event)
    body = _fa_write(new, datum)
    got = _fa_read(body, new, _with_enum_default(old))
    assert got["source"] == "jetstream"
    assert not set(_TIMES) & set(got)
    assert got == {k: v for k, v in datum.items() if k not in _TIMES} | {"source": "jetstream"}
    with pytest.raises(SchemaResolutionError):
        _fa_read(body, new, old)
    from dataclasses import replace

    firehose = datum_for(replace(event, source="firehose"))
    got = _fa_read(_fa_write(new, firehose), new, old)
    assert got == {k: v for k, v in firehose.items() if k not in _TIMES}


@pytest.mark.parametrize("name", _EVOLVED)
def test_old_data_read_with_the_new_schema(name: str) -> None:
    """(c) Data the old schema wrote reads with the new one: null times, the source as written."""
    new, old = schemas.load(name), _old_text(name)
    from dataclasses import replace

    datum = {k: v for k, v in datum_for(replace(_v2_events(None, None)[name], source="jetstream")).items()
             if k not in _TIMES}
    got = _fa_read(_fa_write(old, datum), old, new)
    assert got == datum | {"witnessed_at": None, "indexed_at": None}
    assert event_from_datum(name, got).witnessed_at is None


@pytest.mark.parametrize("name", _EVOLVED)
def test_the_change_is_backward_and_forward_compatible(name: str) -> None:
    """The registry's checks: BACKWARD (new reader, old writer) holds against the schema before the change;
    FORWARD (old reader, new writer) holds for a reader with the enum default, and only the new symbol keeps
    it from holding against the schema before the change (no default there). From now on, a symbol added
    at the end is FORWARD compatible too."""
    new, old = schemas.load(name), _old_text(name)
    assert _compatible(new, old)
    assert _compatible(_with_enum_default(old), new)
    assert not _compatible(old, new)
    without_symbol = json.loads(json.dumps(new))
    for f in without_symbol["fields"]:
        if f["name"] == "source":
            f["type"]["symbols"].remove("jetstream2")
    assert _compatible(old, without_symbol)  # the fields alone are FORWARD compatible with the old reader
    later = json.loads(json.dumps(new))
    for f in later["fields"]:
        if f["name"] == "source":
            f["type"]["symbols"].append("jetstream3")
    assert _compatible(new, later) and _compatible(later, new)


@pytest.mark.parametrize("registry", [False, True])
def test_jetstream2_events_round_trip_with_and_without_times(registry: bool) -> None:
    codec = AvroCodec.from_config({"url": "mock://schemas-test-v2"} if registry else None)
    for times in ((_W, _I), (_W, None), (None, None)):
        for name, event in _v2_events(*times).items():
            value = codec.encode_event(event, f"v2.{name}")
            got_name, datum = codec.decode(value)
            assert got_name == name
            assert (datum["source"], datum["witnessed_at"], datum["indexed_at"]) == ("jetstream2", *times)
            assert event_from_datum(name, datum) == event


def test_the_earlier_versions_are_the_released_baseline() -> None:
    """The codec's derived earlier versions have the fingerprints of the schemas before the change."""
    import fastavro
    import fastavro.schema

    from runtime.contract.codec import earlier_versions

    for name, s in shipped().items():
        base = json.loads((BASELINE / f"{name}.avsc").read_text()) if (BASELINE / f"{name}.avsc").exists() else None
        if name in ("dead_letter", "repo_status", "sync"):
            assert s.earlier == ()
            if name != "sync":
                assert earlier_versions(schemas.load(name)) == []
            continue
        assert base is not None
        canonical = fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(base))
        assert [e.fingerprint for e in s.earlier] == [bytes.fromhex(fastavro.schema.fingerprint(canonical,
                                                                                                 "CRC-64-AVRO"))]
        assert s.earlier[0].fingerprint != s.fingerprint
    fps = [s.fingerprint for s in shipped().values()] + [e.fingerprint for s in shipped().values() for e in s.earlier]
    assert len(set(fps)) == len(fps)


@pytest.mark.parametrize("name", _EVOLVED)
def test_single_object_values_of_the_old_schema_still_decode(name: str) -> None:
    """A backlog written before the change (the old fingerprint) reads after an upgrade: null times;
    the compiled path and fastavro's resolution agree."""
    import fastavro.schema

    from runtime.contract import codec as codec_module

    old = _old_text(name)
    from dataclasses import replace

    event = replace(_v2_events(None, None)[name], source="jetstream")
    datum = {k: v for k, v in datum_for(event).items() if k not in _TIMES}
    canonical = fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(old))
    fp = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
    value = SINGLE_OBJECT_MAGIC + fp + _fa_write(old, datum)
    got_name, got = AvroCodec().decode(value)
    assert (got_name, got) == (name, datum | {"witnessed_at": None, "indexed_at": None})
    assert event_from_datum(name, got) == event
    assert got == _fa_read(value[10:], old, schemas.load(name))
    assert codec_module._read(value[10:], fastavro.parse_schema(old), shipped()[name].parsed) == got
    with pytest.raises(DecodeError):  # a truncated old value is still an error
        AvroCodec().decode(value[:-1] if name != "account" else value[:12])


def test_event_keys_of_jetstream2_events() -> None:
    """(e) Clock-free keys are v1's (one event whichever Jetstream served it); fallbacks keep their source."""
    from dataclasses import replace

    from runtime.contract.records import Source, event_key

    v2 = _v2_events()
    like = v2["app.bsky.feed.like"]
    assert event_key(like) == "jetstream|did:plc:a|app.bsky.feed.like|3kabc|3lrev"
    # the instance's seq, its clocks and the imported time do not change the key
    again = replace(like, cursor=7, time_us=1, witnessed_at=2, indexed_at=None)
    assert event_key(again) == event_key(like) == event_key(replace(like, source=Source.JETSTREAM.value))
    assert event_key(replace(like, source="firehose")) != event_key(like)
    ident, acct = v2["identity"], v2["account"]
    assert event_key(ident) == "jetstream|did:plc:a|identity|900"
    assert event_key(replace(ident, cursor=1, time_us=1, witnessed_at=None)) == event_key(ident)
    assert event_key(acct) == "jetstream|did:plc:a|account|901" == event_key(replace(acct, source="jetstream"))
    # no rev / no seq: the key falls back to time_us, on Jetstream v2's clock: its own prefix
    norev = replace(like, rev=None)
    assert event_key(norev) == f"jetstream2|did:plc:a|app.bsky.feed.like|3kabc|create||bafyrec|{like.time_us}"
    assert event_key(norev) != event_key(replace(norev, source="jetstream"))
    assert event_key(replace(norev, time_us=5)) != event_key(norev)
    assert event_key(replace(acct, seq=None)) == f"jetstream2|did:plc:a|account|None|{acct.time_us}"
    # a repository replacement is one per (DID, rev), whichever instance served it
    sync = v2["sync"]
    assert event_key(sync) == "jetstream|did:plc:a|sync|3lrevsync2222"
    assert event_key(replace(sync, cursor=1, seq=None, time_us=3)) == event_key(sync)


def test_registry_values_of_the_old_schema_resolve_to_null_times() -> None:
    """With a registry, a value the old schema wrote names it by id: resolved against the new one."""
    from dataclasses import replace

    from confluent_kafka.schema_registry import Schema

    codec = AvroCodec.from_config({"url": "mock://schemas-test-v2-old"})
    registry = codec._registry
    assert registry is not None
    for name in _EVOLVED:
        old = _old_text(name)
        schema_id = registry.register_schema(f"old.{name}-value", Schema(json.dumps(old), "AVRO"))
        event = replace(_v2_events(None, None)[name], source="firehose")
        datum = {k: v for k, v in datum_for(event).items() if k not in _TIMES}
        got_name, got = codec.decode(b"\x00" + int(schema_id).to_bytes(4, "big") + _fa_write(old, datum))
        assert (got_name, got) == (name, datum | {"witnessed_at": None, "indexed_at": None})
        assert event_from_datum(name, got) == event

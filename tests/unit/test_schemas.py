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
from runtime.contract.records import AccountEvent, IdentityEvent, RecordEvent
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
    if name not in ("identity", "account"):
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

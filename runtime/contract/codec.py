"""Avro encoding of message values, in either of two wire formats, and decoding of both.

The Avro body is written by an encoder compiled from each shipped schema
(:mod:`runtime.contract.avrowrite`, byte-identical to fastavro and about twice as fast); fastavro writes
what that encoder does not take. Values written with a shipped schema are read by a decoder
compiled the same way (:mod:`runtime.contract.avroread`); fastavro reads the rest (schema resolution) and
anything the compiled decoder refuses, so corrupt bytes still raise fastavro's error.

* With a schema registry: the Confluent wire format, ``0x00`` + 4-byte big-endian schema id +
  Avro binary; schemas are registered under ``<topic>-value`` (TopicNameStrategy).
* Without: Avro single-object encoding (Avro specification), ``0xC3 0x01`` + 8-byte little-endian
  CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form + Avro binary, resolved against
  the schemas shipped in ``schemas/``, or against an earlier version of one (below).

A decoder reads both, whatever the codec was configured with.

Schema changes are compatible ones (fields added with defaults, ``Source`` symbols added at the end;
the ``Source`` enum has a default, ``jetstream``, so a reader that does not know a symbol added later
reads it as that). A registry-framed value names its writer schema, which is resolved against the
shipped one. A single-object value names it by fingerprint only: so the codec also knows the
fingerprints of the shipped schemas' earlier versions (:data:`CHANGES`), and a value written before
a change (a backlog still in a topic when consumers are upgraded) reads as the current schema with
the added fields at their defaults. The other way round (a consumer older than its producers) needs
a registry: an old consumer does not know a newer fingerprint. Upgrade consumers first.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import fastavro
import fastavro.schema

import schemas
from runtime.contract.avroread import DECODE_ERRORS, Decoder, compile_decoder
from runtime.contract.avrowrite import (
    ENCODE_ERRORS,
    WIRE,
    Encoder,
    PartsEncoder,
    PartsProgram,
    compile_encoder,
    compile_parts_encoder,
    parts_program,
)
from runtime.contract.records import Event, RecordEvent
from runtime.contract.topics import schema_name_for, schema_name_for_collection
from runtime.contract.typed import ENVELOPE, ENVELOPE_HEAD, datum_for, record_datum, record_parts
from runtime.errors import DecodeError

SINGLE_OBJECT_MAGIC: Final = b"\xc3\x01"
REGISTRY_MAGIC: Final = 0


#: The compatible changes made to the shipped schemas since values were first written, oldest first:
#: each one's added fields (record fields with defaults) and ``Source`` symbols. The Parsing Canonical
#: Form, hence the fingerprint, ignores docs and defaults, so the versions before each change are the
#: shipped schemas without what the changes since added (the tests check them against the released
#: baseline). Append a change here when it adds to a schema.
CHANGES: Final[tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = (
    # Jetstream v2: its source and its two envelope times
    (("witnessed_at", "indexed_at"), ("jetstream2",)),
)
#: Schemas added after some of :data:`CHANGES`: how many of them came before the schema existed (no
#: value of it was ever written without what those changes added).
BORN_AFTER: Final[dict[str, int]] = {
    "sync": 1,  # Jetstream v2's #sync rows (issue 14), with the times from the start
}


@dataclass(frozen=True)
class EarlierSchema:
    """An earlier version of a shipped schema, values of which may still be in a topic."""

    parsed: Any
    fingerprint: bytes
    #: Reads a value written with it as the current schema does (the added fields at their defaults).
    decoder: Decoder | None = None


def earlier_versions(raw: dict[str, Any], born: int = 0) -> list[dict[str, Any]]:
    """The earlier versions of the schema ``raw`` (parsed JSON), newest first, each one before one of
    :data:`CHANGES` (the changes that did not touch it are left out, and so are the first ``born``:
    the schema did not exist before them; see :data:`BORN_AFTER`)."""
    out: list[dict[str, Any]] = []
    current = raw
    for fields, symbols in reversed(CHANGES[born:]):
        older = json.loads(json.dumps(current))
        older["fields"] = [f for f in older.get("fields", ()) if f["name"] not in fields]
        for f in older["fields"]:
            ftype = f["type"]
            if isinstance(ftype, dict) and ftype.get("type") == "enum" and ftype.get("name") == "Source":
                ftype["symbols"] = [s for s in ftype["symbols"] if s not in symbols]
        if older != current:
            out.append(older)
            current = older
    return out


def _fingerprint(parsed: Any) -> tuple[str, bytes]:
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    return canonical, bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


def _resolving(decoder: Decoder | None, reader: Any, writer: Any) -> Decoder | None:
    """``decoder`` (of ``writer``'s values) completed with the defaults of ``reader``'s fields that
    ``writer`` lacks: schema resolution, for a writer that is the reader less fields with defaults
    (and less enum symbols, which its values cannot hold)."""
    if decoder is None:
        return None
    have = {f["name"] for f in writer["fields"]}
    defaults = {f["name"]: f["default"] for f in reader["fields"] if f["name"] not in have}
    if any(isinstance(v, (dict, list)) for v in defaults.values()):
        return None  # a mutable default would be shared between datums: fastavro resolves those
    inner = decoder

    def decode(data: bytes) -> dict[str, Any]:
        datum = inner(data)
        datum.update(defaults)
        return datum

    return decode


@dataclass(frozen=True)
class ShippedSchema:
    """A schema from ``schemas/`` parsed for fastavro."""

    name: str
    full_name: str
    parsed: Any
    fingerprint: bytes
    canonical: str
    encoder: Encoder | None = None
    decoder: Decoder | None = None
    #: For a record-event schema: the encoder taking the event, its record's JSON and its typed
    #: values (:func:`runtime.contract.typed.record_parts`) without a datum dict.
    parts_encoder: PartsEncoder | None = None
    #: The same encoder as a program of the native writer (``_avrowire.encode_parts``), which
    #: returns the whole value in one call; None without the extension.
    parts_program: PartsProgram | None = None
    #: Its earlier versions (:data:`CHANGES`), newest first: single-object values name them too.
    earlier: tuple[EarlierSchema, ...] = ()


def _load_shipped() -> dict[str, ShippedSchema]:
    out: dict[str, ShippedSchema] = {}
    for name in schemas.names():
        raw = schemas.load(name)
        parsed = fastavro.parse_schema(raw)
        canonical, fp = _fingerprint(parsed)
        full = f"{raw.get('namespace')}.{raw['name']}" if raw.get("namespace") else raw["name"]
        earlier = []
        for old_raw in earlier_versions(raw, BORN_AFTER.get(name, 0)):
            old = fastavro.parse_schema(old_raw)
            earlier.append(EarlierSchema(old, _fingerprint(old)[1],
                                         _resolving(compile_decoder(old), parsed, old)))
        out[name] = ShippedSchema(name=name, full_name=full, parsed=parsed, fingerprint=fp,
                                  canonical=canonical, encoder=compile_encoder(parsed),
                                  decoder=compile_decoder(parsed),
                                  parts_encoder=compile_parts_encoder(parsed, ENVELOPE, "record_json")
                                  if _is_record_event_schema(parsed) else None,
                                  parts_program=parts_program(parsed, ENVELOPE, "record_json", RecordEvent)
                                  if _is_record_event_schema(parsed) else None,
                                  earlier=tuple(earlier))
    return out


def _is_record_event_schema(parsed: Any) -> bool:
    names = [f["name"] for f in parsed.get("fields", ())] if isinstance(parsed, dict) else []
    return names[:len(ENVELOPE_HEAD) + 1] == [*ENVELOPE_HEAD, "record_json"] and set(ENVELOPE) <= set(names)


_SHIPPED: dict[str, ShippedSchema] | None = None
_SHIPPED_LOCK = threading.Lock()


def shipped() -> dict[str, ShippedSchema]:
    """Every shipped schema by name (parsed once per process)."""
    global _SHIPPED  # noqa: PLW0603 - a process-wide parse cache
    if _SHIPPED is None:
        with _SHIPPED_LOCK:
            if _SHIPPED is None:
                _SHIPPED = _load_shipped()
    return _SHIPPED


class AvroCodec:
    """Encodes datums for a topic and decodes values of either wire format.

    Args:
        registry: a ``confluent_kafka.schema_registry.SchemaRegistryClient``, or None for
            single-object encoding. Decoding registry-framed values needs it too.

    Not thread-safe for encoding (it reuses one buffer); use one codec per thread.
    """

    def __init__(self, registry: Any | None = None) -> None:
        self._registry = registry
        self._shipped = shipped()
        #: fingerprint -> (the shipped schema, the writer schema, its compiled decoder)
        self._by_fp: dict[bytes, tuple[ShippedSchema, Any, Decoder | None]] = {}
        for s in self._shipped.values():
            for e in s.earlier:
                self._by_fp.setdefault(e.fingerprint, (s, e.parsed, e.decoder))
        self._by_fp.update({s.fingerprint: (s, s.parsed, s.decoder) for s in self._shipped.values()})
        self._by_full = {s.full_name: s for s in self._shipped.values()}
        self._headers: dict[tuple[str, str], bytes] = {}
        self._encoders: dict[tuple[str, str], Callable[[dict[str, Any]], bytes]] = {}
        self._by_id: dict[int, tuple[ShippedSchema, Any, bool]] = {}
        self._buf = io.BytesIO()
        #: Record events encoded by the native writer when the extension is built (tests turn it
        #: off to compare with the compiled Python encoder).
        self.native_parts = True

    @classmethod
    def from_config(cls, registry_conf: dict[str, Any] | None) -> AvroCodec:
        """A codec using a registry built from ``registry_conf`` (see KafkaSettings.registry_config)."""
        if registry_conf is None:
            return cls(None)
        from confluent_kafka.schema_registry import SchemaRegistryClient  # noqa: PLC0415 - optional path

        # new_client() also understands mock:// URLs (an in-process registry for tests).
        return cls(SchemaRegistryClient.new_client(registry_conf))

    def _header(self, schema_name: str, topic: str) -> bytes:
        key = (schema_name, topic)
        header = self._headers.get(key)
        if header is None:
            s = self._shipped[schema_name]
            if self._registry is None:
                header = SINGLE_OBJECT_MAGIC + s.fingerprint
            else:
                from confluent_kafka.schema_registry import Schema  # noqa: PLC0415 - optional path

                schema_id = self._registry.register_schema(
                    f"{topic}-value", Schema(json.dumps(schemas.load(s.name)), "AVRO"))
                header = bytes([REGISTRY_MAGIC]) + int(schema_id).to_bytes(4, "big")
            self._headers[key] = header
        return header

    def encode(self, schema_name: str, topic: str, datum: dict[str, Any]) -> bytes:
        """Encode ``datum`` with schema ``schema_name`` for ``topic``.

        Raises:
            ValueError: the datum does not fit the schema (a bug in the producer, not bad input).
        """
        key = (schema_name, topic)
        encode = self._encoders.get(key)
        if encode is None:
            encode = self._encoders[key] = self.encoder_for(schema_name, topic)
        return encode(datum)

    def encoder_for(self, schema_name: str, topic: str) -> Callable[[dict[str, Any]], bytes]:
        """:meth:`encode` bound to one schema and topic (what :meth:`encode` caches per pair).

        Raises:
            KeyError: no such shipped schema.
        """
        header = self._header(schema_name, topic)
        shipped_schema = self._shipped[schema_name]
        compiled = shipped_schema.encoder
        parsed = shipped_schema.parsed

        def encode(datum: dict[str, Any]) -> bytes:
            if compiled is not None:
                out = bytearray(header)
                try:
                    compiled(datum, out)
                    return bytes(out)
                except ENCODE_ERRORS:
                    pass  # fastavro below encodes what it accepts and explains what it does not
            buf = self._buf
            buf.seek(0)
            buf.truncate()
            buf.write(header)
            fastavro.schemaless_writer(buf, parsed, datum)
            return buf.getvalue()

        return encode

    def record_encoder_for(self, schema_name: str, topic: str) -> Callable[[RecordEvent], bytes]:
        """The value encoder of record events of one collection and topic (a producer's hot path):
        the same bytes as :meth:`encode` of :func:`runtime.contract.typed.record_datum`, without the datum.

        The returned function raises :class:`~runtime.errors.InvalidRecordError` for a record
        that does not fit its collection's typed fields.

        Raises:
            KeyError: no such shipped schema.
        """
        header = self._header(schema_name, topic)
        shipped_schema = self._shipped[schema_name]
        parts = shipped_schema.parts_encoder
        if parts is None:
            raise KeyError(f"schema {schema_name} is not a record-event schema")
        program = shipped_schema.parts_program
        if program is not None and self.native_parts:
            write = WIRE.encode_parts

            def encode_native(event: RecordEvent) -> bytes:
                record_json, values = record_parts(event)
                try:
                    value: bytes = write(program, header, event, record_json, values)
                    return value
                except ENCODE_ERRORS:
                    return self.encode(schema_name, topic, record_datum(event))

            return encode_native

        def encode(event: RecordEvent) -> bytes:
            record_json, values = record_parts(event)
            out = bytearray(header)
            try:
                parts(event, record_json, values, out)
                return bytes(out)
            except ENCODE_ERRORS:
                # the datum path, whose fastavro fallback encodes what it accepts and explains the rest
                return self.encode(schema_name, topic, record_datum(event))

        return encode

    def encode_event(self, event: Event, topic: str) -> bytes:
        """Encode any event for ``topic`` with its schema (record events without a datum dict).

        One event at a time: a producer keeps each collection's :meth:`record_encoder_for` in its
        route (:class:`producers.publish.Publisher`) instead.

        Raises:
            InvalidRecordError: a record that does not fit its collection's typed fields.
        """
        if type(event) is RecordEvent:
            return self.record_encoder_for(schema_name_for_collection(event.collection), topic)(event)
        return self.encode(schema_name_for(event), topic, datum_for(event))

    def decode(self, value: bytes) -> tuple[str, dict[str, Any]]:
        """Decode a value of either wire format into ``(schema name, datum)``.

        Raises:
            DecodeError: unknown framing, unknown schema, or Avro bytes that do not decode.
        """
        if value is None or len(value) < 5:
            raise DecodeError("decode_avro", "value too short or null")
        if value[:2] == SINGLE_OBJECT_MAGIC:
            hit = self._by_fp.get(bytes(value[2:10]))
            if hit is None:
                raise DecodeError("decode_avro", f"unknown schema fingerprint {value[2:10].hex()}")
            s, writer, decoder = hit
            return s.name, _read(bytes(value[10:]), writer, s.parsed, decoder)
        if value[0] == REGISTRY_MAGIC:
            s, writer, same = self._registry_schema(int.from_bytes(value[1:5], "big"))
            return s.name, _read(bytes(value[5:]), writer, s.parsed, s.decoder if same else None)
        raise DecodeError("decode_avro", f"unknown framing byte 0x{value[0]:02x}")

    def _registry_schema(self, schema_id: int) -> tuple[ShippedSchema, Any, bool]:
        """The shipped schema a registry id stands for, its writer schema, and whether the two are one."""
        hit = self._by_id.get(schema_id)
        if hit is not None:
            return hit
        if self._registry is None:
            raise DecodeError("decode_avro", f"registry-framed value (schema id {schema_id}) but no registry")
        from confluent_kafka.schema_registry.error import SchemaRegistryError  # noqa: PLC0415 - optional path

        try:
            registered = self._registry.get_schema(schema_id)
        except SchemaRegistryError as e:
            if e.http_status_code == 404:  # an id nobody registered: the bytes are not one of our values
                raise DecodeError("decode_avro", f"schema id {schema_id} is not in the registry") from e
            raise  # the registry itself failed: not the message's fault
        if (registered.schema_type or "AVRO") != "AVRO":
            raise DecodeError("decode_avro", f"registry schema {schema_id} is a {registered.schema_type} schema")
        try:
            writer_raw = json.loads(registered.schema_str)
            writer = fastavro.parse_schema(writer_raw)
            full = (f"{writer_raw.get('namespace')}.{writer_raw['name']}"
                    if writer_raw.get("namespace") else writer_raw["name"])
        except (ValueError, TypeError, KeyError, AttributeError, fastavro.schema.SchemaParseException) as e:
            # another tool's schema under our topic (a primitive, a union, an unnamed type...)
            raise DecodeError("decode_avro", f"registry schema {schema_id} is not a named Avro schema: {e}") from e
        s = self._by_full.get(full)
        if s is None:
            raise DecodeError("decode_avro", f"registry schema {schema_id} is {full}, not a shipped schema")
        same = fastavro.schema.to_parsing_canonical_form(writer) == s.canonical
        self._by_id[schema_id] = (s, writer, same)
        return s, writer, same


def _read(body: bytes, writer: Any, reader: Any, compiled: Decoder | None = None) -> dict[str, Any]:
    if compiled is not None:
        try:
            return compiled(body)
        except DECODE_ERRORS:
            pass  # fastavro below decides: it reads what it can, and explains what it cannot
    try:
        datum = fastavro.schemaless_reader(io.BytesIO(body), writer, reader)
    except Exception as e:  # fastavro raises many types on corrupt input
        raise DecodeError("decode_avro", f"{type(e).__name__}: {e}") from e
    if not isinstance(datum, dict):
        raise DecodeError("decode_avro", "value is not an Avro record")
    return datum

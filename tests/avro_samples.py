"""Samples shared by the Avro encoder and decoder tests (test_avrowrite, test_avroread)."""

from __future__ import annotations

from pathlib import Path

from producers.firehose.decode import decode_frame
from runtime.atproto.capture import read_capture
from runtime.contract.records import Event
from runtime.errors import DropError

#: A record schema holding every type the compiled encoders and decoders take.
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


def captured_events(fixtures_dir: Path) -> list[Event]:
    """Every event of the captured firehose frames."""
    out: list[Event] = []
    for frame in read_capture(fixtures_dir / "frames.bin.zst"):
        try:
            out.extend(decode_frame(frame, job="fx").events)
        except DropError:
            continue
    return out

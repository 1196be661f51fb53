"""Avro binary decoding compiled per schema: the reading twin of :mod:`runtime.contract.avrowrite`.

fastavro's ``schemaless_reader`` interprets the schema for every value (about 8 us for one of our
typed records); the consumers decode every message they read. This module turns a parsed record
schema into straight-line Python that reads the same datum fastavro reads when the writer's schema
is the reader's (single-object values written with the shipped schemas, or registry values whose
writer schema is a shipped one). Schema resolution between different writer and reader schemas
stays with fastavro. The tests compare both readers on every shipped schema, and check that
truncated or corrupt bytes raise instead of returning a short datum.

Supported: what :mod:`runtime.contract.avrowrite` supports. :func:`compile_decoder` returns None otherwise.

Where the C extension ``_avrowire`` is built, the same schemas are read natively instead: the schema
becomes a small program of nested tuples (:func:`native_program`) that ``_avrowire.decode`` walks,
about four times faster than the straight-line Python. Both read the same bytes into the same datum
(the tests run both); bytes either refuses go to fastavro, which decides.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any, Final

from runtime.contract import avrowrite
from runtime.contract.avrowrite import CodeGen, UnsupportedSchemaError, null_union, resolve_named

#: ``decode(data) -> datum``; raises one of :data:`DECODE_ERRORS` on bytes that do not decode.
Decoder = Callable[[bytes], dict[str, Any]]


class CorruptError(ValueError):
    """Bytes that are not a value of the schema (truncated, bad union index, bad length)."""


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """An Avro ``long`` (zigzag varint) at ``pos``: ``(value, next position)``.

    Raises:
        CorruptError: more than 10 bytes of varint.
        IndexError: the bytes end inside it.
    """
    b = data[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if shift > 70:
            raise CorruptError("varint longer than 10 bytes")
    return (n >> 1) ^ -(n & 1), pos


#: What a decoder raises for bytes that do not decode.
DECODE_ERRORS: Final = (CorruptError, IndexError, UnicodeDecodeError, KeyError, struct.error, MemoryError)

_FLOAT = struct.Struct("<f").unpack_from
_DOUBLE = struct.Struct("<d").unpack_from


class _Gen(CodeGen):
    """Emits the body of one decoder function."""

    def __init__(self) -> None:
        super().__init__({"read_long": read_long, "CorruptError": CorruptError, "unpack_float": _FLOAT,
                          "unpack_double": _DOUBLE})

    def long(self, target: str, indent: int) -> None:
        """``target = <long at pos>``, one byte inline (the common case)."""
        self.emit(indent, "b = data[pos]")
        self.emit(indent, "if b < 0x80:")
        self.emit(indent + 1, f"{target} = (b >> 1) ^ -(b & 1)")
        self.emit(indent + 1, "pos += 1")
        self.emit(indent, "else:")
        self.emit(indent + 1, f"{target}, pos = read_long(data, pos)")

    def value(self, schema: Any, target: str, indent: int) -> None:
        """Emit code reading one value of ``schema`` at ``pos`` into the local ``target``."""
        if isinstance(schema, list):
            self.union(schema, target, indent)
            return
        kind = schema if isinstance(schema, str) else schema.get("type")
        if isinstance(schema, dict) and schema.get("logicalType"):
            raise UnsupportedSchemaError(f"logical type {schema['logicalType']}")
        if kind == "null":
            self.emit(indent, f"{target} = None")
        elif kind == "boolean":
            self.emit(indent, f"{target} = data[pos] == 1")
            self.emit(indent, "pos += 1")
        elif kind in ("int", "long"):
            self.long(target, indent)
        elif kind == "float":
            self.emit(indent, f"{target} = unpack_float(data, pos)[0]")
            self.emit(indent, "pos += 4")
        elif kind == "double":
            self.emit(indent, f"{target} = unpack_double(data, pos)[0]")
            self.emit(indent, "pos += 8")
        elif kind in ("string", "bytes"):
            n = self.var("n")
            self.long(n, indent)
            self.emit(indent, f"if {n} < 0: raise CorruptError('negative length')")
            decode = ".decode()" if kind == "string" else ""
            self.emit(indent, f"{target} = data[pos:pos + {n}]{decode}")
            self.emit(indent, f"pos += {n}")
        elif kind == "enum":
            symbols = self.const(tuple(schema["symbols"]))
            i = self.var("e")
            self.long(i, indent)
            self.emit(indent, f"if {i} < 0: raise CorruptError('negative enum index')")
            self.emit(indent, f"{target} = {symbols}[{i}]")
        elif kind == "fixed":
            size = int(schema["size"])
            self.emit(indent, f"{target} = data[pos:pos + {size}]")
            self.emit(indent, f"pos += {size}")
        elif kind in ("array", "map"):
            self.block(schema, kind, target, indent)
        elif kind == "record":
            self.record(schema, target, indent)
        else:
            raise UnsupportedSchemaError(f"type {kind!r}")

    def union(self, branches: list[Any], target: str, indent: int) -> None:
        null_index = null_union(branches)
        self.emit(indent, "b = data[pos]")
        self.emit(indent, "pos += 1")
        self.emit(indent, f"if b == {2 * null_index}:")
        self.emit(indent + 1, f"{target} = None")
        self.emit(indent, f"elif b == {2 * (1 - null_index)}:")
        self.value(branches[1 - null_index], target, indent + 1)
        self.emit(indent, "else:")
        self.emit(indent + 1, "raise CorruptError('bad union index')")

    def block(self, schema: dict[str, Any], kind: str, target: str, indent: int) -> None:
        count = self.var("c")
        item = self.var("i")
        self.emit(indent, f"{target} = {{}}" if kind == "map" else f"{target} = []")
        self.emit(indent, "while True:")
        self.long(count, indent + 1)
        self.emit(indent + 1, f"if {count} == 0: break")
        self.emit(indent + 1, f"if {count} < 0:")
        self.emit(indent + 2, f"{count} = -{count}")
        self.emit(indent + 2, "_, pos = read_long(data, pos)  # the block's size in bytes")
        self.emit(indent + 1, f"if {count} > len(data): raise CorruptError('block count beyond the value')")
        self.emit(indent + 1, f"for _ in range({count}):")
        if kind == "map":
            key = self.var("k")
            self.value("string", key, indent + 2)
            self.value(schema["values"], item, indent + 2)
            self.emit(indent + 2, f"{target}[{key}] = {item}")
        else:
            self.value(schema["items"], item, indent + 2)
            self.emit(indent + 2, f"{target}.append({item})")

    def record(self, schema: dict[str, Any], target: str, indent: int) -> None:
        names = []
        for f in schema["fields"]:
            v = self.var("v")
            self.value(f["type"], v, indent)
            names.append((f["name"], v))
        self.emit(indent, f"{target} = {{" + ", ".join(f"{n!r}: {v}" for n, v in names) + "}")


#: The ops of a native program node ``(op, a, b)`` (``_avrowire.c`` has the same numbers).
_OPS: Final = {"null": 0, "boolean": 1, "int": 2, "long": 2, "float": 3, "double": 4, "string": 5, "bytes": 6,
               "enum": 7, "fixed": 8, "array": 9, "map": 10, "record": 11}
_OPT: Final = 12

#: A program node: ``(op, a, b)``.
Program = tuple[int, Any, Any]


def native_program(schema: Any) -> Program:
    """The program ``_avrowire.decode`` reads a value of the resolved ``schema`` with.

    Raises:
        UnsupportedSchemaError: a type the compiled decoders do not read.
    """
    if isinstance(schema, list):
        null_index = null_union(schema)
        return (_OPT, null_index, native_program(schema[1 - null_index]))
    kind = schema if isinstance(schema, str) else schema.get("type")
    if isinstance(schema, dict) and schema.get("logicalType"):
        raise UnsupportedSchemaError(f"logical type {schema['logicalType']}")
    op = _OPS.get(kind) if isinstance(kind, str) else None
    if op is None:
        raise UnsupportedSchemaError(f"type {kind!r}")
    if kind == "enum":
        return (op, tuple(schema["symbols"]), None)
    if kind == "fixed":
        return (op, int(schema["size"]), None)
    if kind == "array":
        return (op, native_program(schema["items"]), None)
    if kind == "map":
        return (op, native_program(schema["values"]), None)
    if kind == "record":
        fields = schema["fields"]
        return (op, tuple(f["name"] for f in fields), tuple(native_program(f["type"]) for f in fields))
    return (op, None, None)


def _native_reader() -> Any:
    """``_avrowire`` when it is built with its reader (None: the pure-Python decoders)."""
    wire = avrowrite.WIRE
    if wire is None or not hasattr(wire, "decode"):
        return None
    wire.set_corrupt_error(CorruptError)
    return wire


def compile_decoder(parsed: Any, *, native: bool = True) -> Decoder | None:
    """A decoder for values written with the parsed record schema ``parsed`` (None if unsupported).

    Args:
        parsed: a parsed record schema.
        native: read with ``_avrowire.decode`` when the extension is built (False: always the
            straight-line Python; the tests compare both).
    """
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        return None
    wire = _native_reader() if native else None
    if wire is not None:
        try:
            program = native_program(resolve_named(parsed, {}))
        except UnsupportedSchemaError:
            return None
        return functools.partial(wire.decode, program)
    gen = _Gen()
    try:
        gen.record(resolve_named(parsed, {}), "datum", 1)
    except UnsupportedSchemaError:
        return None
    body = "\n".join(gen.lines)
    source = (f"def decode(data):\n    pos = 0\n{body}\n"
              "    if pos > len(data): raise CorruptError('value truncated')\n    return datum\n")
    decoder: Decoder = gen.build(source, f"decoder {parsed.get('name')}", "decode")
    return decoder

"""Avro binary encoding compiled per schema: one generated Python function per record schema.

fastavro interprets the schema for every datum and spends about 0.8 us on each ``["null",
"string"]`` union (it validates the value against each branch); our schemas have up to 20 of them,
so encoding cost more than everything else a producer does per event. This module turns a parsed
record schema into straight-line Python (one block per field, no dispatch, unions decided by one
``is None`` test) that writes the same bytes as ``fastavro.schemaless_writer``. The test suite
checks byte equality against fastavro on every shipped schema. Decoding is compiled the same way
in :mod:`runtime.contract.avroread`.

:func:`compile_parts_encoder` compiles the same for a record whose fields come from three places
instead of one dict: attributes of an object (an event's envelope), one string already encoded
as UTF-8 (the record's JSON), and a tuple holding the remaining fields in schema order (the typed
fields). A producer's hot path then builds no datum dict at all.

Supported: records (nested too) of null, boolean, int, long, float, double, bytes, string, enum,
fixed, arrays, maps and unions of ``null`` with one other type. :func:`compile_encoder` returns None
for any other schema, and the codec falls back to fastavro for it.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any, Final

#: ``encode(datum, out)`` appends the Avro binary form of ``datum`` to the bytearray ``out``.
Encoder = Callable[[dict[str, Any], bytearray], None]
#: ``encode(obj, utf8, rest, out)``: see :func:`compile_parts_encoder`.
PartsEncoder = Callable[[Any, bytes | None, Sequence[Any], bytearray], None]

_SMALL: Final = 1 << 13


def _load_wire() -> Any:
    try:
        import runtime.contract._avrowire as _avrowire  # noqa: PLC0415, PLR0402 - mypy skips this form of a C module
    except ImportError:  # pragma: no cover - built by every install that has a C compiler
        return None
    return _avrowire


#: The native writers of strings, null-or-string unions and longs (``_avrowire.c``), or None when
#: the extension is not built; read when an encoder is compiled (tests set it to None to compare).
WIRE: Any = _load_wire()


def _varint(n: int) -> bytes:
    """Unsigned LEB128 of a non-negative int."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


#: varint(zigzag(n)) for 0 <= n < _SMALL (string/bytes lengths, block counts, small longs).
_ZZ: Final = tuple(_varint(n << 1) for n in range(_SMALL))
#: The same with a union branch index in front (index 1, then index 0): ``["null", "string"]``
#: values take one append.
_BRANCH1: Final = tuple(b"\x02" + z for z in _ZZ)
_BRANCH0: Final = tuple(b"\x00" + z for z in _ZZ)
#: The low 14 bits of a zigzagged long of 15 bits or more, as two varint bytes with continuation.
_LOW14: Final = tuple(bytes(((x & 0x7F) | 0x80, (x >> 7) | 0x80)) for x in range(1 << 14))
#: varint of the high part of recent large longs: timestamps and cursors share it for a while.
_HIGH: dict[int, bytes] = {}
_HIGH_MAX: Final = 4096


_LONG_MIN: Final = -(1 << 63)
_LONG_END: Final = 1 << 63
#: The last large long encoded: an event's cursor and time are often the same number.
_last_long: tuple[int, bytes] = (-1, b"")


def zz_long(n: int) -> bytes:
    """Avro ``long``: zigzag, then varint.

    Raises:
        ValueError: ``n`` needs more than 64 bits.
    """
    global _last_long  # noqa: PLW0603 - a one-entry memo of this hot function
    if 0 <= n < _SMALL:
        return _ZZ[n]
    last, encoded = _last_long
    if n == last:
        return encoded
    if not _LONG_MIN <= n < _LONG_END:
        raise ValueError(f"{n} does not fit an Avro long")
    z = (n << 1) ^ (n >> 63)
    if z < 0x4000:
        encoded = _varint(z)
    else:
        h = _HIGH.get(z >> 14)
        encoded = _LOW14[z & 0x3FFF] + (h if h is not None else _high_part(z >> 14))
    _last_long = (n, encoded)
    return encoded


def _high_part(high: int) -> bytes:
    """The varint of the part of a zigzagged long above its low 14 bits, cached."""
    if len(_HIGH) >= _HIGH_MAX:
        _HIGH.clear()
    h = _HIGH[high] = _varint(high)
    return h


def zz_int(n: int) -> bytes:
    """Avro ``int``: as a long, range-checked to 32 bits.

    Raises:
        ValueError: ``n`` needs more than 32 bits.
    """
    if not -(1 << 31) <= n < (1 << 31):
        raise ValueError(f"{n} does not fit an Avro int")
    return zz_long(n)


#: What an encoder raises for a datum that does not fit its schema.
ENCODE_ERRORS: Final = (TypeError, AttributeError, KeyError, ValueError, IndexError, OverflowError, struct.error)

_FLOAT = struct.Struct("<f").pack
_DOUBLE = struct.Struct("<d").pack


class UnsupportedSchemaError(Exception):
    """The schema uses something the compilers here do not handle (fastavro will)."""


class CodeGen:
    """What both compilers (this module's writers, :mod:`runtime.contract.avroread`'s readers) share: lines
    of generated code, fresh local names, and constants the generated function sees as globals."""

    def __init__(self, consts: dict[str, Any]) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = dict(consts)
        self._n = 0

    def var(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def const(self, value: Any) -> str:
        name = self.var("C")
        self.consts[name] = value
        return name

    def build(self, source: str, label: str, name: str) -> Any:
        """Compile ``source`` (which defines ``name``) with the constants as its globals."""
        namespace: dict[str, Any] = dict(self.consts)
        exec(compile(source, f"<avro {label}>", "exec"), namespace)  # noqa: S102 - generated from our schemas
        return namespace[name]


def null_union(branches: list[Any]) -> int:
    """The index of ``null`` in a two-branch union with ``null`` (the only unions compiled).

    Raises:
        UnsupportedSchemaError: any other union.
    """
    kinds = [b if isinstance(b, str) else b.get("type") for b in branches]
    if len(branches) != 2 or "null" not in kinds or kinds[0] == kinds[1]:
        raise UnsupportedSchemaError(f"union {kinds}")
    return kinds.index("null")


class _Gen(CodeGen):
    """Emits the body of one encoder function.

    The generated code does not check types one by one: a value of the wrong type fails on the
    operation it cannot do (``.encode`` of a non-string, a table index of a non-int, a missing
    key), and the caller encodes such a datum with fastavro instead, which explains the error.
    """

    def __init__(self) -> None:
        super().__init__({"zz_long": zz_long, "zz_int": zz_int, "ZZ": _ZZ, "SMALL": _SMALL, "BR0": _BRANCH0,
                          "BR1": _BRANCH1, "pack_float": _FLOAT, "pack_double": _DOUBLE, "LMIN": _LONG_MIN,
                          "LEND": _LONG_END, "HIGH": _HIGH, "LOW14": _LOW14, "high_part": _high_part})
        self.wire = WIRE
        if self.wire is not None:
            self.consts.update({"W_STR": self.wire.string, "W_OPT_STR": self.wire.opt_string,
                                "W_UTF8": self.wire.utf8, "W_OPT_UTF8": self.wire.opt_utf8, "W_LONG": self.wire.long})

    def _native(self, schema: Any, expr: str, indent: int, *, utf8: bool, null_index: int | None = None) -> bool:
        """Emit one call of a native writer for a string or long (optionally in a null union)."""
        if self.wire is None or not isinstance(schema, str) or schema not in ("string", "long"):
            return False
        if schema == "long":
            if null_index is not None:
                return False
            self.emit(indent, f"W_LONG(out, {expr})")
            return True
        name = "UTF8" if utf8 else "STR"
        if null_index is None:
            self.emit(indent, f"W_{name}(out, {expr})")
        else:
            self.emit(indent, f"W_OPT_{name}(out, {expr}, {null_index})")
        return True

    def value(self, schema: Any, expr: str, indent: int, prefix: str | None = None, *, utf8: bool = False) -> None:
        """Emit code appending ``expr`` (a local name) encoded with ``schema`` to ``out``.

        ``prefix``: the union branch table (``BR0``/``BR1``) whose entry also carries the length of
        a string or bytes value; other types get the branch byte appended first. ``utf8``: a
        string value arrives already encoded (bytes).
        """
        if isinstance(schema, list):
            self.union(schema, expr, indent, utf8=utf8)
            return
        if prefix is None and self._native(schema, expr, indent, utf8=utf8):
            return
        kind = schema if isinstance(schema, str) else schema.get("type")
        if isinstance(schema, dict) and schema.get("logicalType"):
            raise UnsupportedSchemaError(f"logical type {schema['logicalType']}")
        if prefix is not None and kind not in ("string", "bytes"):
            self.emit(indent, f"out += {prefix}[0][:1]")
            prefix = None
        if kind == "null":
            self.emit(indent, f"if {expr} is not None: raise TypeError('expected null')")
        elif kind == "boolean":
            self.emit(indent, f"out += (b'\\x00', b'\\x01')[{expr}.__index__() if type({expr}) is bool else 2]")
        elif kind == "long":
            # Inline: timestamps and cursors are large longs, and a call per field costs more than
            # the encoding. High parts come from the shared cache (see zz_long).
            z = self.var("z")
            h = self.var("h")
            self.emit(indent, f"if 0 <= {expr} < SMALL:")
            self.emit(indent + 1, f"out += ZZ[{expr}]")
            self.emit(indent, f"elif LMIN <= {expr} < LEND:")
            self.emit(indent + 1, f"{z} = ({expr} << 1) ^ ({expr} >> 63)")
            self.emit(indent + 1, f"if {z} < 16384:")
            self.emit(indent + 2, f"out += zz_long({expr})")
            self.emit(indent + 1, "else:")
            self.emit(indent + 2, f"{h} = HIGH.get({z} >> 14)")
            self.emit(indent + 2, f"out += LOW14[{z} & 16383]")
            self.emit(indent + 2, f"out += {h} if {h} is not None else high_part({z} >> 14)")
            self.emit(indent, "else:")
            self.emit(indent + 1, f"raise ValueError('{{}} does not fit an Avro long'.format({expr}))")
        elif kind == "int":
            self.emit(indent, f"out += zz_int({expr}.__index__())")
        elif kind == "float":
            self.emit(indent, f"out += pack_float({expr})")
        elif kind == "double":
            self.emit(indent, f"out += pack_double({expr})")
        elif kind in ("string", "bytes"):
            table = prefix or "ZZ"
            b = self.var("b")
            n = self.var("n")
            if kind == "string" and utf8:
                self.emit(indent, f"{b} = {expr}")  # bytes (a str fails on ``out +=``)
            elif kind == "string":
                self.emit(indent, f"{b} = {expr}.encode()")
            else:
                self.emit(indent, f"{b} = bytes({expr}) if type({expr}) is not bytes else {expr}")
            self.emit(indent, f"{n} = len({b})")
            if prefix is None:
                self.emit(indent, f"out += ZZ[{n}] if {n} < SMALL else zz_long({n})")
            else:
                self.emit(indent, f"out += {table}[{n}] if {n} < SMALL else {table}[0][:1] + zz_long({n})")
            self.emit(indent, f"out += {b}")
        elif kind == "enum":
            table = self.const({sym: zz_long(i) for i, sym in enumerate(schema["symbols"])})
            self.emit(indent, f"out += {table}[{expr}]")
        elif kind == "fixed":
            size = int(schema["size"])
            self.emit(indent, f"if len({expr}) != {size}: raise TypeError('fixed size')")
            self.emit(indent, f"out += bytes({expr})")
        elif kind == "array":
            self.block(schema["items"], expr, indent, is_map=False)
        elif kind == "map":
            self.block(schema["values"], expr, indent, is_map=True)
        elif kind == "record":
            self.record(schema, expr, indent)
        else:
            raise UnsupportedSchemaError(f"type {kind!r}")

    def union(self, branches: list[Any], expr: str, indent: int, *, utf8: bool = False) -> None:
        null_index = null_union(branches)
        if self._native(branches[1 - null_index], expr, indent, utf8=utf8, null_index=null_index):
            return
        self.emit(indent, f"if {expr} is None:")
        self.emit(indent + 1, f"out += {zz_long(null_index)!r}")
        self.emit(indent, "else:")
        self.value(branches[1 - null_index], expr, indent + 1, prefix="BR0" if null_index == 1 else "BR1",
                   utf8=utf8)

    def block(self, item_schema: Any, expr: str, indent: int, *, is_map: bool) -> None:
        # An array is a list or tuple, a map a dict (what fastavro accepts); a str is not an array.
        check = "type({0}) is not dict" if is_map else "type({0}) is not list and not isinstance({0}, (list, tuple))"
        self.emit(indent, f"if {check.format(expr)}: raise TypeError('container')")
        self.emit(indent, f"if {expr}:")
        self.emit(indent + 1, f"out += zz_long(len({expr}))")
        item = self.var("i")
        if is_map:
            key = self.var("k")
            self.emit(indent + 1, f"for {key}, {item} in {expr}.items():")
            self.value("string", key, indent + 2)
        else:
            self.emit(indent + 1, f"for {item} in {expr}:")
        self.value(item_schema, item, indent + 2)
        self.emit(indent, "out += b'\\x00'")

    def record(self, schema: dict[str, Any], expr: str, indent: int) -> None:
        self.emit(indent, f"if type({expr}) is not dict: raise TypeError('record')")
        for f in schema["fields"]:
            v = self.var("v")
            if "default" in f:
                self.emit(indent, f"{v} = {expr}.get({f['name']!r}, {self.const(f['default'])})")
            else:
                self.emit(indent, f"{v} = {expr}[{f['name']!r}]")
            self.value(f["type"], v, indent)


    def parts(self, schema: dict[str, Any], attrs: Collection[str], utf8_field: str) -> None:
        """The body of a parts encoder ``encode(e, u, t, out)`` (see :func:`compile_parts_encoder`)."""
        index = 0
        for f in schema["fields"]:
            name = f["name"]
            v = self.var("v")
            if name in attrs:
                if not name.isidentifier():
                    raise UnsupportedSchemaError(f"field {name!r} is not an attribute name")
                self.emit(1, f"{v} = e.{name}")
            elif name == utf8_field:
                self.emit(1, f"{v} = u")
                self.value(f["type"], v, 1, utf8=True)
                continue
            else:
                self.emit(1, f"{v} = t[{index}]")
                index += 1
            self.value(f["type"], v, 1)
        self.emit(1, f"if len(t) != {index}: raise IndexError('{index} values expected')")


def parts_fields(parsed: Any, attrs: Collection[str], utf8_field: str) -> tuple[str, ...]:
    """The fields of record schema ``parsed`` a parts encoder takes from its tuple, in order."""
    return tuple(f["name"] for f in parsed["fields"] if f["name"] not in attrs and f["name"] != utf8_field)


def compile_parts_encoder(parsed: Any, attrs: Collection[str], utf8_field: str) -> PartsEncoder | None:
    """An encoder of record schema ``parsed`` whose fields come from three places.

    ``encode(e, u, t, out)`` appends to ``out`` the record whose fields named in ``attrs`` are
    attributes of ``e``, whose field ``utf8_field`` (a string, or a union of null and string) is
    ``u`` already encoded as UTF-8 (or None), and whose other fields are the values of the
    sequence ``t`` in schema order (:func:`parts_fields`). The bytes are those
    :func:`compile_encoder`'s encoder writes for the same values as one dict. Returns None for a
    schema that is not such a record or uses an unsupported type; raises like the other encoder.
    """
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        return None
    if utf8_field not in {f["name"] for f in parsed["fields"]}:
        return None
    gen = _Gen()
    try:
        gen.parts(resolve_named(parsed, {}), attrs, utf8_field)
    except UnsupportedSchemaError:
        return None
    encoder: PartsEncoder = gen.build("def encode(e, u, t, out):\n" + "\n".join(gen.lines) + "\n",
                                      f"parts encoder {parsed.get('name')}", "encode")
    return encoder


#: Where a field of a parts program comes from, and how it is written (``_avrowire.c``'s P_* and K_*).
_P_ATTR, _P_UTF8, _P_ITEM = 0, 1, 2
_K_STRING, _K_OPT_STRING, _K_LONG, _K_OPT_LONG, _K_INT, _K_OPT_INT, _K_BOOL, _K_ENUM, _K_STRING_ARRAY, \
    _K_UTF8, _K_OPT_UTF8 = range(11)
_PLAIN: Final = {"string": _K_STRING, "long": _K_LONG, "int": _K_INT, "boolean": _K_BOOL}
_OPTIONAL: Final = {"string": _K_OPT_STRING, "long": _K_OPT_LONG, "int": _K_OPT_INT}

#: The program of ``_avrowire.encode_parts`` (made by ``_avrowire.compile_parts``; opaque here).
PartsProgram = Any


def _kind(schema: Any, utf8: bool) -> tuple[int, Any]:
    """The native writer's kind (and its argument) for a field schema.

    Raises:
        UnsupportedSchemaError: a type the native writer does not handle.
    """
    if isinstance(schema, list):
        null_index = null_union(schema)
        inner = schema[1 - null_index]
        if utf8 and inner == "string":
            return _K_OPT_UTF8, null_index
        if isinstance(inner, str) and inner in _OPTIONAL and not utf8:
            return _OPTIONAL[inner], null_index
        raise UnsupportedSchemaError(f"union with {inner!r}")
    if utf8:
        if schema == "string":
            return _K_UTF8, None
        raise UnsupportedSchemaError(f"UTF-8 field of type {schema!r}")
    if isinstance(schema, str) and schema in _PLAIN:
        return _PLAIN[schema], None
    if isinstance(schema, dict) and not schema.get("logicalType"):
        if schema.get("type") == "enum":
            return _K_ENUM, {sym: i for i, sym in enumerate(schema["symbols"])}
        if schema.get("type") == "array" and schema.get("items") == "string":
            return _K_STRING_ARRAY, None
    raise UnsupportedSchemaError(f"type {schema!r}")


def parts_program(parsed: Any, attrs: Collection[str], utf8_field: str, cls: type | None = None) -> PartsProgram:
    """The program of ``_avrowire.encode_parts`` for what :func:`compile_parts_encoder` compiles
    (same fields, same sources, same bytes), or None when the native writer lacks a field's type
    or the extension is not built (the compiled encoder then does it all).

    ``encode_parts(program, header, e, u, t)`` returns ``header`` followed by the value as bytes.
    ``cls``: the class of the ``e`` it is mostly given (its slots are then read directly).
    """
    if WIRE is None or not hasattr(WIRE, "encode_parts"):
        return None
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        return None
    schema = resolve_named(parsed, {})
    if utf8_field not in {f["name"] for f in schema["fields"]}:
        return None
    fields: list[tuple[int, Any, int, Any]] = []
    index = 0
    try:
        for f in schema["fields"]:
            name = f["name"]
            if name in attrs:
                fields.append((_P_ATTR, sys.intern(name), *_kind(f["type"], False)))
            elif name == utf8_field:
                fields.append((_P_UTF8, None, *_kind(f["type"], True)))
            else:
                fields.append((_P_ITEM, index, *_kind(f["type"], False)))
                index += 1
    except UnsupportedSchemaError:
        return None
    return WIRE.compile_parts(tuple(fields), index, cls)


def compile_encoder(parsed: Any) -> Encoder | None:
    """An encoder for the parsed record schema ``parsed``, or None if it uses an unsupported type.

    The encoder raises (TypeError, AttributeError, KeyError, ValueError, ...) for a datum that does
    not fit the schema, possibly after appending part of it: see :data:`ENCODE_ERRORS`.
    """
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        return None
    gen = _Gen()
    try:
        gen.record(resolve_named(parsed, {}), "d", 1)
    except UnsupportedSchemaError:
        return None
    encoder: Encoder = gen.build("def encode(d, out):\n" + "\n".join(gen.lines) + "\n",
                                 f"encoder {parsed.get('name')}", "encode")
    return encoder


def resolve_named(schema: Any, named: dict[str, Any]) -> Any:
    """The schema with references to named types replaced by their definitions."""
    if isinstance(schema, str):
        if schema in named:
            return named[schema]
        return schema
    if isinstance(schema, list):
        return [resolve_named(s, named) for s in schema]
    out = {k: v for k, v in schema.items() if not k.startswith("__")}
    kind = out.get("type")
    if kind in ("record", "enum", "fixed") and "name" in out:
        full = out["name"] if "." in out["name"] or not out.get("namespace") else f"{out['namespace']}.{out['name']}"
        named[full] = out
        named[out["name"]] = out
    if kind == "record":
        out["fields"] = [{**f, "type": resolve_named(f["type"], named)} for f in out["fields"]]
    elif kind == "array":
        out["items"] = resolve_named(out["items"], named)
    elif kind == "map":
        out["values"] = resolve_named(out["values"], named)
    elif isinstance(kind, (dict, list)):
        return resolve_named(kind, named)
    return out

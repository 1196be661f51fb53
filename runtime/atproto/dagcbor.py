"""DAG-CBOR, the atproto data model's binary encoding, and its JSON form (``$link`` / ``$bytes``).

* :func:`encode` writes strict DAG-CBOR (shortest-form heads, map keys sorted length-first then
  bytewise, 64-bit floats only, tag 42 for :class:`~runtime.atproto.cid.CID` links).
* :func:`decode` is an exact pure-Python reader that returns :class:`CID` for links and ``bytes`` for
  byte strings (libipld returns raw bytes for both), with a nesting cap.
* :func:`record_json_form` is the hot path: libipld's fast decoder, and the exact decoder only for
  the rare record that holds byte strings (where a link and a byte string must be told apart).
* :func:`to_json_form` / :func:`from_json_form` convert between decoded values and the atproto
  JSON form, so a Jetstream JSON record can be re-encoded and its CID checked.
"""

from __future__ import annotations

import binascii
import functools
import math
import struct
from collections.abc import Mapping
from typing import Any, Final, NoReturn

import libipld

from runtime.atproto.cid import CID
from runtime.atproto.errors import AtprotoFormatError, CBORError

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "decode",
    "encode",
    "from_json_form",
    "record_json_form",
    "to_json_form",
    "write_head",
]

#: Default cap on nested maps/lists, far above any real record and far below the interpreter's limit.
DEFAULT_MAX_DEPTH: Final = 64

_MAX_U64: Final = (1 << 64) - 1
_TAG_CID: Final = 42
_F64: Final = struct.Struct(">d")
_F32: Final = struct.Struct(">f")


def _fail(message: str, cause: BaseException | None = None) -> NoReturn:
    raise CBORError(message) from cause


# --------------------------------------------------------------------------------------------- encode


def write_head(out: bytearray, major: int, n: int) -> None:
    """Append a CBOR head (major type already shifted into the top 3 bits) in shortest form.

    Raises:
        CBORError: ``n`` does not fit in 64 bits.
    """
    if n < 24:
        out.append(major | n)
    elif n < 0x100:
        out.append(major | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(major | 25)
        out += n.to_bytes(2, "big")
    elif n < 0x100000000:
        out.append(major | 26)
        out += n.to_bytes(4, "big")
    elif n <= _MAX_U64:
        out.append(major | 27)
        out += n.to_bytes(8, "big")
    else:
        _fail(f"integer {n} does not fit in 64 bits")


def _sort_key(item: tuple[bytes, Any]) -> tuple[int, bytes]:
    return len(item[0]), item[0]


def _encode_into(obj: Any, out: bytearray, depth: int) -> None:
    t = type(obj)
    if t is str:
        try:
            b = obj.encode("utf-8")
        except UnicodeEncodeError as e:
            _fail("string is not valid Unicode (lone surrogate)", e)
        write_head(out, 0x60, len(b))
        out += b
    elif t is dict:
        if depth <= 0:
            _fail("value nested too deeply to encode")
        items: list[tuple[bytes, Any]] = []
        for k, v in obj.items():
            if type(k) is not str:
                _fail(f"map key must be a string, got {type(k).__name__}")
            try:
                items.append((k.encode("utf-8"), v))
            except UnicodeEncodeError as e:
                _fail("map key is not valid Unicode (lone surrogate)", e)
        items.sort(key=_sort_key)
        write_head(out, 0xA0, len(items))
        for kb, v in items:
            write_head(out, 0x60, len(kb))
            out += kb
            _encode_into(v, out, depth - 1)
    elif t is int:
        if obj >= 0:
            write_head(out, 0x00, obj)
        else:
            write_head(out, 0x20, -1 - obj)
    elif t is CID:
        raw = obj.raw
        out += b"\xd8\x2a"
        write_head(out, 0x40, len(raw) + 1)
        out.append(0)
        out += raw
    elif t is list or t is tuple:
        if depth <= 0:
            _fail("value nested too deeply to encode")
        write_head(out, 0x80, len(obj))
        for v in obj:
            _encode_into(v, out, depth - 1)
    elif t is bytes or t is bytearray or t is memoryview:
        b = bytes(obj)
        write_head(out, 0x40, len(b))
        out += b
    elif obj is None:
        out.append(0xF6)
    elif obj is True:
        out.append(0xF5)
    elif obj is False:
        out.append(0xF4)
    elif t is float:
        if not math.isfinite(obj):
            _fail("NaN and infinities have no DAG-CBOR encoding")
        # DAG-CBOR always writes 64-bit floats; libipld writes -0.0 as 0.0 and so do we.
        out.append(0xFB)
        out += _F64.pack(obj if obj != 0 else 0.0)
    elif isinstance(obj, Mapping):
        _encode_into(dict(obj), out, depth)
    elif isinstance(obj, bool):  # pragma: no cover - bool cannot be subclassed
        out.append(0xF5 if obj else 0xF4)
    elif isinstance(obj, int):
        _encode_into(int(obj), out, depth)
    elif isinstance(obj, str):
        _encode_into(str(obj), out, depth)
    else:
        _fail(f"cannot encode {t.__name__} as DAG-CBOR")


def encode(obj: Any, *, max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """Encode a value as strict DAG-CBOR.

    Args:
        obj: ``None``, ``bool``, ``int`` (64-bit range), ``float`` (finite), ``str``, ``bytes``,
            ``list``/``tuple``, ``dict`` with ``str`` keys, or :class:`CID` (written as tag 42).
        max_depth: cap on nested maps/lists.

    Returns:
        The canonical encoding; for values without CIDs it equals ``libipld.encode_dag_cbor``.

    Raises:
        CBORError: a value with no DAG-CBOR encoding, or nesting deeper than ``max_depth``.
    """
    out = bytearray()
    try:
        _encode_into(obj, out, max_depth)
    except RecursionError as e:  # only reachable with a max_depth near the interpreter's limit
        _fail("value nested too deeply to encode", e)
    return bytes(out)


# --------------------------------------------------------------------------------------------- decode


class _Decoder:
    """One decode of one buffer; methods instead of closures so the state is explicit."""

    __slots__ = ("data", "end", "max_depth", "strict")

    def __init__(self, data: bytes, max_depth: int, strict: bool) -> None:
        self.data = data
        self.end = len(data)
        self.max_depth = max_depth
        self.strict = strict

    def _arg(self, ai: int, pos: int) -> tuple[int, int]:
        """Read the head argument for additional info ``ai`` (integers, lengths, tags)."""
        if ai < 24:
            return ai, pos
        if ai == 24:
            size, minimum = 1, 24
        elif ai == 25:
            size, minimum = 2, 0x100
        elif ai == 26:
            size, minimum = 4, 0x10000
        elif ai == 27:
            size, minimum = 8, 0x100000000
        elif ai == 31:
            _fail("indefinite-length items are not allowed in DAG-CBOR")
        else:
            _fail(f"reserved additional information {ai}")
        nxt = pos + size
        if nxt > self.end:
            _fail("truncated CBOR head")
        value = int.from_bytes(self.data[pos:nxt], "big")
        if self.strict and value < minimum:
            _fail("integer or length not in shortest form")
        return value, nxt

    def item(self, pos: int, depth: int) -> tuple[Any, int]:
        """Decode the item at ``pos`` found at nesting ``depth``; return it and the next position."""
        data = self.data
        if pos >= self.end:
            _fail("truncated CBOR: item expected")
        ib = data[pos]
        major = ib >> 5
        ai = ib & 0x1F
        pos += 1
        if major == 7:
            return self._simple(ai, pos)
        arg, pos = self._arg(ai, pos)
        if major == 0:
            return arg, pos
        if major == 1:
            return -1 - arg, pos
        if major == 2:
            nxt = pos + arg
            if nxt > self.end:
                _fail("truncated byte string")
            return data[pos:nxt], nxt
        if major == 3:
            return self._text(pos, arg)
        if major == 4:
            if depth >= self.max_depth:
                _fail(f"nesting deeper than {self.max_depth}")
            if arg > self.end - pos:
                _fail("array length exceeds the remaining data")
            out: list[Any] = []
            append = out.append
            for _ in range(arg):
                value, pos = self.item(pos, depth + 1)
                append(value)
            return out, pos
        if major == 5:
            return self._map(pos, arg, depth)
        # major == 6: tag
        if arg != _TAG_CID:
            _fail(f"tag {arg} is not allowed in DAG-CBOR (only 42)")
        return self._link(pos)

    def _text(self, pos: int, length: int) -> tuple[str, int]:
        nxt = pos + length
        if nxt > self.end:
            _fail("truncated text string")
        try:
            return self.data[pos:nxt].decode("utf-8"), nxt
        except UnicodeDecodeError as e:
            _fail("text string is not valid UTF-8", e)

    def _map(self, pos: int, count: int, depth: int) -> tuple[dict[str, Any], int]:
        if depth >= self.max_depth:
            _fail(f"nesting deeper than {self.max_depth}")
        if count > (self.end - pos) // 2:
            _fail("map length exceeds the remaining data")
        data = self.data
        out: dict[str, Any] = {}
        prev_len = -1
        prev = b""
        for _ in range(count):
            if pos >= self.end:
                _fail("truncated CBOR: map key expected")
            ib = data[pos]
            if ib >> 5 != 3:
                _fail("map keys must be text strings")
            klen, kpos = self._arg(ib & 0x1F, pos + 1)
            knext = kpos + klen
            if knext > self.end:
                _fail("truncated map key")
            kb = data[kpos:knext]
            if klen < prev_len or (klen == prev_len and kb <= prev):
                _fail("map keys must be sorted (length first, then bytewise) and unique")
            prev_len, prev = klen, kb
            try:
                key = kb.decode("utf-8")
            except UnicodeDecodeError as e:
                _fail("map key is not valid UTF-8", e)
            out[key], pos = self.item(knext, depth + 1)
        return out, pos

    def _link(self, pos: int) -> tuple[CID, int]:
        if pos >= self.end:
            _fail("truncated CID link")
        ib = self.data[pos]
        if ib >> 5 != 2:
            _fail("tag 42 must wrap a byte string")
        length, pos = self._arg(ib & 0x1F, pos + 1)
        nxt = pos + length
        if nxt > self.end:
            _fail("truncated CID link")
        if length == 0 or self.data[pos] != 0:
            _fail("CID link must start with the 0x00 identity multibase prefix")
        try:
            return CID.from_bytes(self.data[pos + 1 : nxt]), nxt
        except AtprotoFormatError as e:
            _fail(f"bad CID link: {e}", e)

    def _simple(self, ai: int, pos: int) -> tuple[Any, int]:
        if ai == 20:
            return False, pos
        if ai == 21:
            return True, pos
        if ai == 22:
            return None, pos
        if ai == 27 or (ai == 26 and not self.strict):
            fmt = _F64 if ai == 27 else _F32
            nxt = pos + fmt.size
            if nxt > self.end:
                _fail("truncated float")
            value: float = fmt.unpack_from(self.data, pos)[0]
            if not math.isfinite(value):
                _fail("NaN and infinities are not allowed in DAG-CBOR")
            return value, nxt
        if ai in (25, 26):
            _fail("DAG-CBOR floats must be 64-bit")
        _fail(f"simple value {ai} is not allowed in DAG-CBOR")


def decode(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH, strict: bool = True) -> Any:
    """Decode one DAG-CBOR item exactly: tag-42 links become :class:`CID`, byte strings ``bytes``.

    Args:
        data: exactly one encoded item.
        max_depth: cap on nested maps/lists (a hostile record cannot exhaust the stack).
        strict: also reject non-shortest heads and 32-bit floats. With ``strict=False`` the decoder
            accepts exactly what libipld accepts (it tolerates those two).

    Raises:
        CBORError: truncated or trailing data, indefinite lengths, tags other than 42, non-string,
            unsorted or duplicate map keys, invalid UTF-8, NaN/infinity, or nesting past the cap.
    """
    if not isinstance(data, bytes):
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        else:
            _fail(f"bytes expected, got {type(data).__name__}")
    try:
        value, pos = _Decoder(data, max_depth, strict).item(0, 0)
    except RecursionError as e:  # only reachable with a max_depth near the interpreter's limit
        _fail("data nested too deeply", e)
    if pos != len(data):
        _fail(f"{len(data) - pos} bytes of trailing data after the item")
    return value


# ------------------------------------------------------------------------------------------ JSON form


def _b64(data: bytes) -> str:
    # The data-model spec makes "=" padding optional; the reference implementations omit it.
    return binascii.b2a_base64(data, newline=False).decode("ascii").rstrip("=")


def to_json_form(obj: Any, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Convert a decoded value to the atproto JSON form.

    :class:`CID` becomes ``{"$link": "b..."}`` and ``bytes`` becomes ``{"$bytes": base64}`` (standard
    alphabet, no padding), recursively; everything else is kept. Returns a new structure.

    Raises:
        CBORError: nesting deeper than ``max_depth``.
    """
    t = type(obj)
    if t is dict:
        if max_depth <= 0:
            _fail("value nested too deeply")
        return {k: to_json_form(v, max_depth=max_depth - 1) for k, v in obj.items()}
    if t is list:
        if max_depth <= 0:
            _fail("value nested too deeply")
        return [to_json_form(v, max_depth=max_depth - 1) for v in obj]
    if t is CID:
        return {"$link": str(obj)}
    if t is bytes:
        return {"$bytes": _b64(obj)}
    return obj


def _from_b64(text: Any) -> bytes:
    if type(text) is not str:
        _fail("$bytes value must be a string")
    try:
        return binascii.a2b_base64(text + "=" * (-len(text) % 4), strict_mode=True)
    except (binascii.Error, ValueError) as e:
        _fail(f"$bytes value is not base64: {e}", e)


def from_json_form(obj: Any, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Inverse of :func:`to_json_form`: ``{"$link": s}`` -> :class:`CID`, ``{"$bytes": s}`` -> bytes.

    Only an object whose single key is ``$link`` or ``$bytes`` is converted (as the reference
    implementation does); base64 padding is optional. Returns a new structure ready for
    :func:`encode`.

    Raises:
        CIDError: a ``$link`` that is not a CID string.
        CBORError: a ``$bytes`` that is not base64, or nesting deeper than ``max_depth``.
    """
    t = type(obj)
    if t is dict:
        if len(obj) == 1:
            if "$link" in obj:
                return CID.from_str(obj["$link"])
            if "$bytes" in obj:
                return _from_b64(obj["$bytes"])
        if max_depth <= 0:
            _fail("value nested too deeply")
        return {k: from_json_form(v, max_depth=max_depth - 1) for k, v in obj.items()}
    if t is list:
        if max_depth <= 0:
            _fail("value nested too deeply")
        return [from_json_form(v, max_depth=max_depth - 1) for v in obj]
    return obj


def _bytes_values(obj: Any, depth: int, max_depth: int, out: set[bytes]) -> None:
    """Add to ``out`` every ``bytes`` value (a link or a byte string) of a libipld-decoded value."""
    if depth > max_depth:
        _fail(f"nesting deeper than {max_depth}")
    values = obj.values() if type(obj) is dict else obj
    for v in values:
        t = type(v)
        if t is bytes:
            out.add(v)
        elif (t is dict or t is list) and v:
            _bytes_values(v, depth + 1, max_depth, out)


@functools.lru_cache(maxsize=256)
def _byte_string_headers(n: int) -> tuple[bytes, ...]:
    """Every header of a byte string of ``n`` bytes that libipld accepts (any length width)."""
    out = [bytes((0x40 | n,))] if n < 24 else []
    for major, width in ((0x58, 1), (0x59, 2), (0x5A, 4), (0x5B, 8)):
        if n < 1 << (8 * width):
            out.append(bytes((major,)) + n.to_bytes(width, "big"))
    return tuple(out)


def _links_in(block: bytes, values: set[bytes]) -> dict[bytes, bool] | None:
    """Which of the ``bytes`` values libipld decoded from ``block`` are links, read off the block.

    A link is tag 42 over a byte string of ``00`` + the CID; a byte string is its own header + its
    bytes. When the block holds no byte-string encoding of a value (in any header width), every
    occurrence of it is a link; when it holds no link encoding of it, every occurrence is a byte
    string. Returns None when a value could be either (then the block must be decoded exactly).
    """
    kinds: dict[bytes, bool] = {}
    for value in values:
        as_bytes = any(h + value in block for h in _byte_string_headers(len(value)))
        as_link = any(h + b"\x00" + value in block for h in _byte_string_headers(len(value) + 1))
        if as_bytes == as_link:
            return None
        kinds[value] = as_link
    return kinds


def _with_kinds(obj: Any, kinds: dict[bytes, bool]) -> Any:
    """The JSON form of a libipld-decoded value whose ``bytes`` are classified by ``kinds``."""
    t = type(obj)
    if t is dict:
        return {k: _with_kinds(v, kinds) for k, v in obj.items()}
    if t is list:
        return [_with_kinds(v, kinds) for v in obj]
    if t is bytes:
        if kinds[obj]:
            try:
                return {"$link": str(CID.from_bytes(obj))}
            except AtprotoFormatError as e:
                _fail(f"bad CID link: {e}", e)
        return {"$bytes": _b64(obj)}
    return obj


def record_json_form(block: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH) -> dict[str, Any]:
    """Decode a record block (a DAG-CBOR map) straight to its atproto JSON form.

    libipld decodes first; a record with no bytes anywhere is already its JSON form and is returned
    as is. libipld returns links and byte strings both as ``bytes``: each such value is told apart
    by the encodings the block holds (:func:`_links_in`), and in the rare block where that cannot
    tell, the record is decoded again by the exact :func:`decode` and converted with
    :func:`to_json_form`.

    Raises:
        CBORError: malformed DAG-CBOR, a top level that is not a map, or nesting past ``max_depth``.
    """
    try:
        value = libipld.decode_dag_cbor(block)
    except ValueError as e:
        _fail(f"record is not DAG-CBOR: {e}", e)
    except RecursionError as e:
        _fail("record nested too deeply", e)
    except TypeError as e:
        _fail(f"record block must be bytes: {e}", e)
    if type(value) is not dict:
        _fail(f"record must be a map, got {type(value).__name__}")
    try:
        found: set[bytes] = set()
        _bytes_values(value, 1, max_depth, found)
        if not found:
            return value
        kinds = _links_in(block, found)
        if kinds is not None:
            classified: dict[str, Any] = _with_kinds(value, kinds)
            return classified
        converted: dict[str, Any] = to_json_form(
            decode(block, max_depth=max_depth, strict=False), max_depth=max_depth
        )
    except RecursionError as e:  # only reachable with a max_depth near the interpreter's limit
        _fail("record nested too deeply", e)
    return converted

"""Content identifiers (CIDv1) as atproto uses them: links between blocks, records and blobs.

A :class:`CID` wraps the raw binary CID (``version | codec | multihash``) and is a distinct type from
``bytes``, so decoded data can tell a link from a byte string. Its string form is the base32
multibase (``b...``) that atproto writes everywhere.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final, NoReturn

import libipld

from runtime.atproto._varint import VarintError, read_uvarint
from runtime.atproto.errors import CIDError

__all__ = ["CID", "DAG_CBOR", "RAW", "SHA2_256", "parse_cid_at"]

#: Multicodec of DAG-CBOR blocks (records, MST nodes, commits).
DAG_CBOR: Final = 0x71
#: Multicodec of raw bytes (blobs).
RAW: Final = 0x55
#: Multihash code of SHA2-256, the only hash atproto blesses for repository data.
SHA2_256: Final = 0x12

_SHA256_LEN: Final = 32
_MAX_DIGEST_LEN: Final = 128
_PREFIX_DAG_CBOR: Final = bytes((1, DAG_CBOR, SHA2_256, _SHA256_LEN))
_PREFIX_RAW: Final = bytes((1, RAW, SHA2_256, _SHA256_LEN))
_FAST_PREFIXES: Final = frozenset((_PREFIX_DAG_CBOR, _PREFIX_RAW))
_FAST_LEN: Final = 4 + _SHA256_LEN


def _fail(message: str, cause: BaseException | None = None) -> NoReturn:
    raise CIDError(message) from cause


def _cid_end(data: bytes | memoryview, pos: int) -> tuple[int, int, int]:
    """Parse the CID starting at ``pos``; return ``(end, codec, digest start)`` or raise CIDError."""
    if bytes(data[pos : pos + 4]) in _FAST_PREFIXES:
        end = pos + _FAST_LEN
        if end > len(data):
            _fail("truncated CID")
        return end, data[pos + 1], pos + 4
    try:
        version, p = read_uvarint(data, pos)
        if version != 1:
            if version == SHA2_256:
                _fail("CIDv0 is not supported (atproto uses CIDv1)")
            _fail(f"unsupported CID version {version}")
        codec, p = read_uvarint(data, p)
        hash_code, p = read_uvarint(data, p)
        digest_len, p = read_uvarint(data, p)
    except VarintError as e:
        _fail(f"bad CID: {e}", e)
    if hash_code == SHA2_256 and digest_len != _SHA256_LEN:
        _fail(f"sha2-256 digest of {digest_len} bytes")
    if digest_len > _MAX_DIGEST_LEN:
        _fail(f"digest of {digest_len} bytes is too long")
    end = p + digest_len
    if end > len(data):
        _fail("truncated CID")
    return end, codec, p


class CID:
    """An immutable CIDv1 (raw binary form in :attr:`raw`), hashable, ordered by its bytes.

    Construct with :meth:`from_bytes`, :meth:`from_str`, :meth:`for_dag_cbor` or :meth:`for_raw`.
    """

    __slots__ = ("_str", "raw")
    raw: bytes
    _str: str | None

    def __init__(self, raw: bytes) -> None:
        """Wrap binary CID bytes; raises :class:`CIDError` if they are not exactly one CIDv1."""
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            _fail(f"CID bytes expected, got {type(raw).__name__}")
        raw = bytes(raw)
        end, _, _ = _cid_end(raw, 0)
        if end != len(raw):
            _fail(f"{len(raw) - end} trailing bytes after CID")
        _SET_RAW(self, raw)
        _SET_STR(self, None)

    @classmethod
    def _trusted(cls, raw: bytes) -> CID:
        """Wrap bytes already known to be one well-formed CIDv1 (skips the parse)."""
        obj = _NEW(cls)
        _SET_RAW(obj, raw)  # the slots' own setters: a CID is built per MST entry
        _SET_STR(obj, None)
        return obj

    @classmethod
    def from_bytes(cls, raw: bytes) -> CID:
        """Parse a binary CID (no multibase prefix). Raises :class:`CIDError`."""
        if type(raw) is bytes and len(raw) == _FAST_LEN and raw[:4] in _FAST_PREFIXES:
            return cls._trusted(raw)
        return cls(raw)

    @classmethod
    def from_str(cls, text: str) -> CID:
        """Parse a multibase CID string (atproto uses base32, ``b...``). Raises :class:`CIDError`."""
        if not isinstance(text, str):
            _fail(f"CID string expected, got {type(text).__name__}")
        try:
            _, raw = libipld.decode_multibase(text)
        except ValueError as e:
            _fail(f"bad CID string {text[:80]!r}: {e}", e)
        return cls.from_bytes(raw)

    @classmethod
    def for_dag_cbor(cls, block: bytes) -> CID:
        """The CID (sha2-256, codec DAG-CBOR) of an encoded DAG-CBOR block."""
        return cls._trusted(_PREFIX_DAG_CBOR + hashlib.sha256(block).digest())

    @classmethod
    def for_raw(cls, data: bytes) -> CID:
        """The CID (sha2-256, codec raw) of a blob's bytes."""
        return cls._trusted(_PREFIX_RAW + hashlib.sha256(data).digest())

    @property
    def version(self) -> int:
        """Always 1."""
        return 1

    @property
    def codec(self) -> int:
        """The multicodec of the linked data (:data:`DAG_CBOR` or :data:`RAW` in atproto)."""
        raw = self.raw
        if raw[1] < 0x80:
            return raw[1]
        return read_uvarint(raw, 1)[0]

    @property
    def hash_code(self) -> int:
        """The multihash function code (:data:`SHA2_256` in atproto)."""
        _, p = read_uvarint(self.raw, 1)
        return read_uvarint(self.raw, p)[0]

    @property
    def digest(self) -> bytes:
        """The hash digest."""
        _, _, start = _cid_end(self.raw, 0)
        return self.raw[start:]

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` hashes to this CID (sha2-256 only; other hash functions never match)."""
        raw = self.raw
        if raw[:4] in _FAST_PREFIXES:
            return hashlib.sha256(data).digest() == raw[4:]
        if self.hash_code != SHA2_256:
            return False
        return hashlib.sha256(data).digest() == self.digest

    def __str__(self) -> str:
        s = self._str
        if s is None:  # first use: the string form is made once, on demand
            s = libipld.encode_multibase("b", self.raw)
            _SET_STR(self, s)
        return s

    def __repr__(self) -> str:
        return f"CID({str(self)!r})"

    def __bytes__(self) -> bytes:
        return self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __eq__(self, other: object) -> bool:
        if type(other) is CID:
            return self.raw == other.raw
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        if type(other) is CID:
            return self.raw != other.raw
        return NotImplemented

    def __lt__(self, other: CID) -> bool:
        if type(other) is CID:
            return self.raw < other.raw
        return NotImplemented

    def __le__(self, other: CID) -> bool:
        if type(other) is CID:
            return self.raw <= other.raw
        return NotImplemented

    def __gt__(self, other: CID) -> bool:
        if type(other) is CID:
            return self.raw > other.raw
        return NotImplemented

    def __ge__(self, other: CID) -> bool:
        if type(other) is CID:
            return self.raw >= other.raw
        return NotImplemented

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("CID is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("CID is immutable")

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (CID.from_bytes, (self.raw,))

    def __copy__(self) -> CID:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CID:
        return self


_NEW: Final = object.__new__
_SET_RAW: Final = CID.__dict__["raw"].__set__
_SET_STR: Final = CID.__dict__["_str"].__set__


def parse_cid_at(data: bytes | memoryview, pos: int) -> tuple[CID, int]:
    """Parse a binary CID that starts at ``pos`` inside a larger buffer (a CAR section).

    Returns:
        ``(cid, position after it)``.

    Raises:
        CIDError: the bytes at ``pos`` are not a CIDv1.
    """
    end, _, _ = _cid_end(data, pos)
    return CID._trusted(bytes(data[pos:end])), end

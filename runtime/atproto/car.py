"""CAR v1 archives: repository exports (``getRepo``) and the ``blocks`` slices of firehose commits.

A CAR is ``varint(len) | DAG-CBOR header {version: 1, roots: [links]}`` followed by sections
``varint(len) | binary CID | block bytes``. :func:`read_car` parses one held in memory;
:func:`open_car` indexes one on disk and reads blocks on demand so a large export never has to sit in
memory; :func:`write_car` and :class:`CarWriter` produce them.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Final, NoReturn, Protocol

import libipld

from runtime.atproto import native
from runtime.atproto._varint import VarintError, encode_uvarint, read_uvarint
from runtime.atproto.cid import CID, parse_cid_at
from runtime.atproto.dagcbor import encode
from runtime.atproto.errors import AtprotoFormatError, BlockMismatchError, CarError, CarTooLargeError

__all__ = ["BlockStore", "Car", "CarFile", "CarWriter", "open_car", "raw_lookup", "read_car", "write_car"]

#: Largest header we accept: a real header is ~60 bytes per root.
_MAX_HEADER_LEN: Final = 1 << 20
#: Index entries pack ``offset << _LEN_BITS | length``.
_LEN_BITS: Final = 32
_LEN_MASK: Final = (1 << _LEN_BITS) - 1
_CHUNK: Final = 1 << 20


def _fail(message: str, cause: BaseException | None = None) -> NoReturn:
    raise CarError(message) from cause


def _too_large(message: str) -> NoReturn:
    raise CarTooLargeError(message)


class BlockStore(Protocol):
    """What repository walking needs: the CAR's roots and block lookup (``None`` when absent)."""

    @property
    def roots(self) -> list[CID]: ...  # pragma: no cover - protocol

    def get(self, cid: CID) -> bytes | None: ...  # pragma: no cover - protocol


class Car:
    """A CAR held in memory.

    Attributes:
        roots: the header's root CIDs (for a repo export or a commit slice, the commit first).
        blocks: every block by CID (a duplicated block is kept once).

    A CAR read by the native fast path keeps its blocks by binary CID and makes :attr:`blocks`
    (CID objects) only when something asks for it; :meth:`get` and :meth:`raw_lookup` need neither.
    """

    __slots__ = ("_blocks", "_raw", "roots")

    def __init__(self, roots: list[CID], blocks: dict[CID, bytes] | None = None) -> None:
        self.roots = roots
        self._blocks: dict[CID, bytes] | None = {} if blocks is None else blocks
        self._raw: dict[bytes, bytes] | None = None

    @classmethod
    def from_raw(cls, roots: list[CID], raw: dict[bytes, bytes]) -> Car:
        """A CAR whose blocks are keyed by binary CID (each key already known to be a CID)."""
        car = cls(roots)
        car._blocks = None
        car._raw = raw
        return car

    @property
    def blocks(self) -> dict[CID, bytes]:
        """Every block by CID (made once from the binary keys, then the CAR's own dict)."""
        if self._blocks is None:
            raw = self._raw or {}
            self._blocks = {CID.from_bytes(k): b for k, b in raw.items()}
            self._raw = None
        return self._blocks

    @property
    def root(self) -> CID:
        """The first root; raises :class:`CarError` when the header lists none."""
        if not self.roots:
            _fail("CAR has no root")
        return self.roots[0]

    def get(self, cid: CID) -> bytes | None:
        """The block for ``cid``, or ``None`` if the CAR does not hold it."""
        if self._raw is not None:
            return self._raw.get(cid.raw)
        return self.blocks.get(cid)

    def raw_lookup(self) -> dict[bytes, bytes]:
        """Blocks by binary CID: the CAR's own dict, or a snapshot of :attr:`blocks`."""
        if self._raw is not None:
            return self._raw
        return {c.raw: b for c, b in self.blocks.items()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Car):
            return NotImplemented
        return self.roots == other.roots and self.raw_lookup() == other.raw_lookup()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Car(roots={self.roots!r}, blocks={len(self.raw_lookup())})"


def raw_lookup(store: BlockStore) -> dict[bytes, bytes] | Callable[[bytes], bytes | None]:
    """Block lookup by binary CID for any store: its own ``raw_lookup()``, else through :meth:`get`."""
    own = getattr(store, "raw_lookup", None)
    if own is not None:
        lookup: dict[bytes, bytes] | Callable[[bytes], bytes | None] = own()
        return lookup
    return lambda raw: store.get(CID.from_bytes(raw))


def _parse_header(header: bytes) -> list[CID]:
    try:
        decoded = libipld.decode_dag_cbor(header)
    except (ValueError, RecursionError) as e:
        _fail(f"CAR header is not DAG-CBOR: {e}", e)
    if type(decoded) is not dict:
        _fail("CAR header is not a map")
    version = decoded.get("version")
    if version != 1:
        _fail(f"unsupported CAR version {version!r} (only CAR v1)")
    roots = decoded.get("roots")
    if type(roots) is not list:
        _fail("CAR header has no roots list")
    try:
        return [CID.from_bytes(r) for r in roots]
    except (AtprotoFormatError, TypeError) as e:
        _fail(f"CAR header root is not a CID: {e}", e)


def _read_section_len(data: bytes | memoryview, pos: int, what: str) -> tuple[int, int]:
    try:
        return read_uvarint(data, pos)
    except VarintError as e:
        _fail(f"bad {what} length varint at offset {pos}: {e}", e)


def read_car(data: bytes, *, verify: bool = True, max_blocks: int | None = None) -> Car:
    """Parse a CAR v1 held in memory.

    Args:
        data: the whole CAR.
        verify: check that every block hashes to its CID (sha2-256); cheap next to decoding.
        max_blocks: optional cap on the number of sections.

    Returns:
        The roots and blocks.

    Raises:
        CarTooLargeError: more than ``max_blocks`` blocks (reason ``oversize``).
        CarError: empty, truncated (the message says where), bad header.
        BlockMismatchError: with ``verify``, a block whose bytes do not match its CID.
    """
    if not isinstance(data, bytes):
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        else:
            _fail(f"CAR must be bytes, got {type(data).__name__}")
    fast = native.NATIVE
    if fast is not None:
        indexed = fast.car_index(data, verify, -1 if max_blocks is None else max_blocks)
        if indexed is not None:  # None: not the canonical case; the loop below says why
            header, raw = indexed
            return Car.from_raw(_parse_header(header), raw)
    end = len(data)
    if end == 0:
        _fail("empty CAR")
    header_len, pos = _read_section_len(data, 0, "header")
    if header_len == 0 or header_len > _MAX_HEADER_LEN:
        _fail(f"CAR header length {header_len} out of range")
    if pos + header_len > end:
        _fail(f"truncated CAR: header needs {header_len} bytes, {end - pos} left")
    roots = _parse_header(data[pos : pos + header_len])
    pos += header_len
    blocks: dict[CID, bytes] = {}
    count = 0
    while pos < end:
        section_start = pos
        length, pos = _read_section_len(data, pos, "section")
        section_end = pos + length
        if section_end > end:
            _fail(f"truncated CAR: section at offset {section_start} needs {length} bytes, {end - pos} left")
        try:
            cid, block_start = parse_cid_at(data, pos)
        except AtprotoFormatError as e:
            _fail(f"bad CID in section at offset {section_start}: {e}", e)
        if block_start > section_end:
            _fail(f"section at offset {section_start} is shorter than its CID")
        block = data[block_start:section_end]
        if verify and not cid.matches(block):
            raise BlockMismatchError(f"block at offset {section_start} does not match its CID {cid}")
        blocks.setdefault(cid, block)
        pos = section_end
        count += 1
        if max_blocks is not None and count > max_blocks:
            _too_large(f"CAR holds more than {max_blocks} blocks")
    return Car(roots=roots, blocks=blocks)


class _ChunkReader:
    """Sequential reads over a file in large chunks, tracking the absolute offset."""

    __slots__ = ("_buf", "_file", "_pos", "_start")

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._buf = b""
        self._start = 0  # file offset of _buf[0]
        self._pos = 0  # read position inside _buf

    @property
    def offset(self) -> int:
        return self._start + self._pos

    def at_eof(self) -> bool:
        return not self._fill(1)

    def _fill(self, n: int) -> bool:
        """Make ``n`` bytes available at the read position; False if the file ends first."""
        if len(self._buf) - self._pos >= n:
            return True
        rest = self._buf[self._pos :]
        self._start += self._pos
        self._pos = 0
        more = self._file.read(max(n - len(rest), _CHUNK))
        self._buf = rest + more
        return len(self._buf) >= n

    def varint(self, what: str) -> int:
        start = self.offset
        self._fill(10)
        try:
            value, pos = read_uvarint(self._buf, self._pos)
        except VarintError as e:
            _fail(f"bad {what} length varint at offset {start}: {e}", e)
        self._pos = pos
        return value

    def cid(self, section_start: int, section_len: int) -> CID:
        self._fill(min(section_len, 200))
        window = self._buf[self._pos : self._pos + min(section_len, 200)]
        try:
            cid, used = parse_cid_at(window, 0)
        except AtprotoFormatError as e:
            _fail(f"bad CID in section at offset {section_start}: {e}", e)
        self._pos += used
        return cid

    def read(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            _fail(f"truncated CAR: {what} at offset {self.offset} needs {n} bytes")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def hash_and_skip(self, n: int, what: str) -> bytes:
        """Consume ``n`` bytes, returning their sha256 digest, without holding them all at once."""
        h = hashlib.sha256()
        left = n
        while left:
            if not self._fill(1):
                _fail(f"truncated CAR: {what} ends {left} bytes early")
            take = min(left, len(self._buf) - self._pos)
            h.update(memoryview(self._buf)[self._pos : self._pos + take])
            self._pos += take
            left -= take
        return h.digest()

    def skip(self, n: int, what: str) -> None:
        avail = len(self._buf) - self._pos
        if n <= avail:
            self._pos += n
            return
        target = self.offset + n
        size = os.fstat(self._file.fileno()).st_size
        if target > size:
            _fail(f"truncated CAR: {what} needs {n} bytes, {size - self.offset} left")
        self._file.seek(target)
        self._buf = b""
        self._start = target
        self._pos = 0


class CarFile:
    """A CAR v1 on disk, indexed in one pass; blocks are read on demand with ``pread``.

    Memory stays bounded by the index (about 150 bytes per block) whatever the file size; the file
    is not mapped, so its pages never count against the process's resident memory. Use
    :func:`open_car` to construct; close it (or use ``with``) when done.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int | None = None, verify: bool = True,
                 max_blocks: int | None = None):
        """Open and index ``path``; see :func:`open_car` for the arguments and errors."""
        self.path = Path(path)
        self._file: IO[bytes] | None = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        try:
            size = os.fstat(self._file.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                _too_large(f"CAR of {size} bytes exceeds the cap of {max_bytes} bytes")
            self.size = size
            self._index: dict[bytes, int] = {}
            self._roots = self._build_index(verify, max_blocks)
        except BaseException:
            self.close()
            raise

    def _build_index(self, verify: bool, max_blocks: int | None) -> list[CID]:
        assert self._file is not None
        if self.size == 0:
            _fail("empty CAR")
        reader = _ChunkReader(self._file)
        header_len = reader.varint("header")
        if header_len == 0 or header_len > _MAX_HEADER_LEN:
            _fail(f"CAR header length {header_len} out of range")
        roots = _parse_header(reader.read(header_len, "header"))
        index = self._index
        while not reader.at_eof():
            section_start = reader.offset
            length = reader.varint("section")
            body_start = reader.offset
            cid = reader.cid(section_start, length)
            block_start = reader.offset
            block_len = length - (block_start - body_start)
            if block_len < 0:
                _fail(f"section at offset {section_start} is shorter than its CID")
            if block_len > _LEN_MASK:
                _fail(f"block at offset {section_start} is larger than 4 GiB")
            if verify:
                digest = reader.hash_and_skip(block_len, f"block at offset {section_start}")
                if not (cid.hash_code == 0x12 and cid.digest == digest):
                    raise BlockMismatchError(f"block at offset {section_start} does not match its CID {cid}")
            else:
                reader.skip(block_len, f"block at offset {section_start}")
            index.setdefault(cid.raw, (block_start << _LEN_BITS) | block_len)
            if max_blocks is not None and len(index) > max_blocks:
                _too_large(f"CAR holds more than {max_blocks} blocks (its index would too)")
        return roots

    @property
    def roots(self) -> list[CID]:
        """The header's root CIDs."""
        return list(self._roots)

    @property
    def root(self) -> CID:
        """The first root; raises :class:`CarError` when the header lists none."""
        if not self._roots:
            _fail("CAR has no root")
        return self._roots[0]

    def get(self, cid: CID) -> bytes | None:
        """Read the block for ``cid`` from disk, or ``None`` if the CAR does not hold it."""
        return self.get_raw(cid.raw)

    def raw_lookup(self) -> Callable[[bytes], bytes | None]:
        """Block lookup by binary CID (reads from disk)."""
        return self.get_raw

    def get_raw(self, raw: bytes) -> bytes | None:
        """Read the block whose binary CID is ``raw``, or ``None`` if the CAR does not hold it."""
        packed = self._index.get(raw)
        if packed is None:
            return None
        if self._file is None:
            raise ValueError("CarFile is closed")
        offset, length = packed >> _LEN_BITS, packed & _LEN_MASK
        data = os.pread(self._file.fileno(), length, offset)
        if len(data) != length:
            _fail(f"CAR file shrank while open: block {CID.from_bytes(raw)} is cut short")
        return data

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, CID) and cid.raw in self._index

    def __len__(self) -> int:
        return len(self._index)

    def cids(self) -> Iterator[CID]:
        """Every block CID, in file order (duplicates once)."""
        for raw in self._index:
            yield CID.from_bytes(raw)

    def close(self) -> None:
        """Close the file; further :meth:`get` calls raise ``ValueError``."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CarFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_car(path: str | os.PathLike[str], *, max_bytes: int | None = None, verify: bool = True,
             max_blocks: int | None = None) -> CarFile:
    """Index a CAR file on disk for on-demand block reads.

    Args:
        path: the file.
        max_bytes: refuse files larger than this.
        verify: hash every block against its CID during the indexing pass.
        max_blocks: refuse files of more distinct blocks than this (the index is the memory a
            CarFile holds: about 150 bytes per block).

    Raises:
        CarTooLargeError: over ``max_bytes`` or ``max_blocks`` (reason ``oversize``).
        CarError: empty, truncated, or malformed.
        BlockMismatchError: with ``verify``, a block that does not match its CID.
        OSError: the file cannot be opened.
    """
    return CarFile(path, max_bytes=max_bytes, verify=verify, max_blocks=max_blocks)


def _header_bytes(roots: Iterable[CID]) -> bytes:
    header = encode({"version": 1, "roots": list(roots)})
    return encode_uvarint(len(header)) + header


def _section(cid: CID, block: bytes) -> bytes:
    raw = cid.raw
    return encode_uvarint(len(raw) + len(block)) + raw + block


class CarWriter:
    """Stream a CAR v1 to a binary file object, one block at a time."""

    def __init__(self, out: IO[bytes], roots: Iterable[CID]) -> None:
        """Write the header for ``roots`` to ``out`` straight away."""
        self._out = out
        self.bytes_written = 0
        self._write(_header_bytes(roots))

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.bytes_written += len(data)

    def write_block(self, cid: CID, block: bytes) -> None:
        """Append one block (the caller is responsible for ``cid`` matching ``block``)."""
        self._write(_section(cid, block))

    def write_blocks(self, blocks: Iterable[tuple[CID, bytes]]) -> None:
        """Append blocks in order."""
        for cid, block in blocks:
            self.write_block(cid, block)


def write_car(roots: Iterable[CID], blocks: Iterable[tuple[CID, bytes]]) -> bytes:
    """Serialise a CAR v1 in memory, blocks in the given order."""
    buf = io.BytesIO()
    CarWriter(buf, roots).write_blocks(blocks)
    return buf.getvalue()

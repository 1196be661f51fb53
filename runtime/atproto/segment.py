"""Jetstream v2 sealed segment files (``.jss``): parse, verify and write them. Bytes in, values out.

The layout (little-endian), as ``bluesky-social/jetstream`` ``segment/*.go`` writes it and its golden
files pin it:

* a 256-byte header: ``b"jss0"``, the checksum (u64 at 4), then from offset 12 ``version`` u16 (1),
  ``block_count``, ``event_count``, ``unique_dids`` (u32 each), ``min_seq``, ``max_seq`` (u64),
  ``min_witnessed_at``, ``max_witnessed_at`` (i64), and the u64 offsets of the footer, the segment
  DID bloom, the per-block DID blooms, the collection index and the block index; zero padding;
* blocks from offset 256, each a u64 length and one zstd frame (no dictionary, content checksum);
* the footer: the block index (52-byte entries, at the footer offset), the segment DID bloom, the
  per-block DID blooms region (``u32 count, u32 bloom size`` then equal-size filters) and the
  collection index (16-byte header, then a zstd body: ``(u8 len, u32 count, nsid)`` per collection in
  first-seen order, then one bitmask per block; identity/account/sync rows mark their block with the
  sentinel collections ``$identity``/``$account``/``$sync``, not counted);
* ``checksum = xxh3_64(header[12:256] + file[footer_offset:])``: metadata only, 0 = an active segment.

A decompressed block is ``u32 n``, the fixed columns ``seq[n] u64``, ``witnessed_at[n] i64``,
``indexed_at[n] i64``, ``kind[n] u8``, ``collection_len[n] u8``, ``did_len[n] u16``, ``rkey_len[n] u8``,
``rev_len[n] u8``, ``payload_len[n] u32``, then the variable columns **column by column** (every
collection, then every DID, every rkey, every rev, every payload), as the Go encoder writes them.

The DID blooms are ``github.com/jcalabro/gloom`` v0.1.0 filters (its ``MarshalBinary`` form: version
1, k, block count, item count, 512-bit blocks, CRC-32C trailer; xxh3-128 of the DID picks the block
and, through k prime partitions, the bits), sized for 0.1 % false positives: the writer builds them
bit for bit as the Go code does. Its zstd frames are valid but not byte-identical to the Go encoder's.

A block's variable columns are split natively when the extension is built
(:mod:`runtime.atproto.native`, ``split_column``); it bails on anything unusual and the Python split
here decides and names the error.

Everything is bounded: block counts, event counts and the decompressed size of a block are capped
before anything is allocated from them, and every error is a :class:`SegmentError`.
"""

from __future__ import annotations

import math
import mmap
import operator
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate, islice, pairwise
from typing import IO, Any, ClassVar, Final, Literal, NamedTuple

import xxhash
import zstandard

from runtime.atproto import native
from runtime.atproto.errors import AtprotoFormatError
from runtime.atproto.native import Native

__all__ = [
    "BLOCK_INDEX_ENTRY_SIZE",
    "HEADER_SIZE",
    "KIND_ACCOUNT",
    "KIND_CREATE",
    "KIND_DELETE",
    "KIND_IDENTITY",
    "KIND_RESYNC_CREATE",
    "KIND_SYNC",
    "KIND_UPDATE",
    "MAGIC",
    "MAX_BLOCK_BYTES",
    "MAX_BLOCK_COUNT",
    "MAX_BLOCK_EVENTS",
    "ActiveSegmentError",
    "Block",
    "BlockChecksumError",
    "BlockDecompressError",
    "BlockFormatError",
    "BlockIndexError",
    "BlockInfo",
    "BlockTooLargeError",
    "Bloom",
    "ChecksumMismatchError",
    "CollectionIndex",
    "Problem",
    "Row",
    "Segment",
    "SegmentError",
    "SegmentHeader",
    "SegmentHeaderError",
    "SegmentWriter",
    "UnknownKindError",
    "decode_block",
    "decompress_block",
    "encode_block",
    "parse_block",
    "parse_block_index",
    "parse_collection_index",
    "parse_header",
    "segment_checksum",
    "write_segment",
]

MAGIC: Final = b"jss0"
HEADER_SIZE: Final = 256
VERSION: Final = 1
BLOCK_INDEX_ENTRY_SIZE: Final = 52
_LEN_PREFIX: Final = 8
#: Bytes per row of the fixed columns.
_FIXED_PER_ROW: Final = 8 + 8 + 8 + 1 + 1 + 2 + 1 + 1 + 4

KIND_CREATE: Final = 1
KIND_UPDATE: Final = 2
KIND_DELETE: Final = 3
KIND_IDENTITY: Final = 4
KIND_ACCOUNT: Final = 5
KIND_SYNC: Final = 6
#: A Sync 1.1 resync replacement row: shown to subscribers as operation ``create``.
KIND_RESYNC_CREATE: Final = 7
_MAX_KIND: Final = 7

#: Hard ceiling on a block's row count (Go: ``maxBlockEventsLimit``; real blocks hold 4,096 at most).
MAX_BLOCK_EVENTS: Final = 1 << 18
#: Hard ceiling on a segment's block count (Go: ``maxBlockCountLimit``).
MAX_BLOCK_COUNT: Final = 1 << 20
#: Ceiling on the collections of one collection index (Go: ``maxCollectionCountLimit``).
MAX_COLLECTIONS: Final = 1 << 20
#: Default cap on one block's decompressed size (a block holds at most 4,096 rows of 30 s).
MAX_BLOCK_BYTES: Final = 64 * 1024 * 1024
#: The first four bytes of a zstd dictionary (``0xEC30A437`` little-endian).
ZSTD_DICT_MAGIC: Final = b"\x37\xa4\x30\xec"

_SENTINELS: Final = {KIND_IDENTITY: "$identity", KIND_ACCOUNT: "$account", KIND_SYNC: "$sync"}
_BLOOM_FP_RATE: Final = 0.001
_COLLECTION_INDEX_HEADER: Final = 16
_BLOOM_REGION_HEADER: Final = 8
_GLOOM_HEADER: Final = 21
_LITTLE: Final = sys.byteorder == "little"
_U64_MAX: Final = (1 << 64) - 1
_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1

_HEADER = struct.Struct("<4sQHIIIQQqqQQQQQ")
_INDEX_ENTRY = struct.Struct("<QIIIQQqq")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


# --- errors ---------------------------------------------------------------------------------------

class SegmentError(AtprotoFormatError):
    """Root of every segment error: the bytes are not a valid sealed ``.jss`` segment (or block)."""

    reason: ClassVar[str] = "malformed_frame"


class SegmentHeaderError(SegmentError):
    """A header that is short, has a bad magic or version, or offsets that do not fit the file."""


class ActiveSegmentError(SegmentHeaderError):
    """A header whose checksum is 0: an active (unsealed) segment, never served."""


class BlockIndexError(SegmentError):
    """A block index entry whose range, sizes or seq envelope break the format's rules."""


class ChecksumMismatchError(SegmentError):
    """The segment checksum (xxh3 of the metadata) differs from the header's."""


class BlockFormatError(SegmentError):
    """A decompressed block whose columns do not add up (truncated, trailing bytes, bad lengths)."""


class UnknownKindError(BlockFormatError):
    """A row whose kind is not 1-7 (the Go decoder refuses the whole block too)."""

    reason: ClassVar[str] = "unknown_event"


class BlockDecompressError(SegmentError):
    """A block frame that is not one valid zstd frame."""

    reason: ClassVar[str] = "decompress_failed"


class BlockChecksumError(BlockDecompressError):
    """A block frame without a content checksum, or whose content does not match it."""


class BlockTooLargeError(SegmentError):
    """A block that declares (or decompresses to) more than the caller's cap."""

    reason: ClassVar[str] = "oversize"


# --- values ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SegmentHeader:
    """The parsed 256-byte header (offsets are absolute file offsets)."""

    checksum: int
    version: int
    block_count: int
    event_count: int
    unique_dids: int
    min_seq: int
    max_seq: int
    min_witnessed_at: int
    max_witnessed_at: int
    footer_offset: int
    did_bloom_offset: int
    block_did_bloom_offset: int
    collection_index_offset: int
    block_index_offset: int

    def encode(self) -> bytes:
        """The 256 header bytes."""
        head = _HEADER.pack(MAGIC, self.checksum, self.version, self.block_count, self.event_count,
                            self.unique_dids, self.min_seq, self.max_seq, self.min_witnessed_at,
                            self.max_witnessed_at, self.footer_offset, self.did_bloom_offset,
                            self.block_did_bloom_offset, self.collection_index_offset, self.block_index_offset)
        return head + bytes(HEADER_SIZE - len(head))


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One block index entry: ``offset`` is the block's length prefix, the frame starts 8 bytes later."""

    index: int
    offset: int
    csize: int
    usize: int
    count: int
    min_seq: int
    max_seq: int
    min_witnessed_at: int
    max_witnessed_at: int

    @property
    def frame_start(self) -> int:
        """Where the zstd frame starts."""
        return self.offset + _LEN_PREFIX

    @property
    def frame_end(self) -> int:
        """Where the zstd frame ends (exclusive)."""
        return self.offset + _LEN_PREFIX + self.csize


class Row(NamedTuple):
    """One row of a block. ``payload`` is b"" for a delete (and whenever the row has none)."""

    seq: int
    witnessed_at: int
    indexed_at: int
    kind: int
    collection: str
    did: str
    rkey: str
    rev: str
    payload: bytes

    @property
    def time_us(self) -> int:
        """The display time: ``indexed_at``, or ``witnessed_at`` when it is 0."""
        return self.indexed_at or self.witnessed_at


@dataclass(slots=True)
class Block:
    """A decoded block, kept as columns (the fast form); :meth:`rows` gives :class:`Row` values."""

    seq: list[int]
    witnessed_at: list[int]
    indexed_at: list[int]
    kind: bytes
    collection: list[str]
    did: list[str]
    rkey: list[str]
    rev: list[str]
    payload: list[bytes]

    def __len__(self) -> int:
        return len(self.seq)

    def rows(self) -> Iterator[Row]:
        """The rows in stored order."""
        return map(Row._make, zip(self.seq, self.witnessed_at, self.indexed_at, self.kind, self.collection,
                                  self.did, self.rkey, self.rev, self.payload, strict=True))


@dataclass(frozen=True, slots=True)
class Problem:
    """A verification finding: ``what`` names it (``segment_checksum``, ``block_checksum``, ...)."""

    what: str
    detail: str
    block: int | None = None


# --- header and block index -----------------------------------------------------------------------

def parse_header(data: bytes | memoryview, *, file_size: int | None = None) -> SegmentHeader:
    """Parse and validate the 256-byte header (``data`` may be the whole file).

    Args:
        data: at least the first 256 bytes of the segment.
        file_size: the whole file's size, to check every offset against (None: only their order).

    Raises:
        ActiveSegmentError: the checksum field is 0.
        SegmentHeaderError: short, bad magic or version, offsets out of order or past the file, or a
            block count over :data:`MAX_BLOCK_COUNT`.
    """
    if len(data) < HEADER_SIZE:
        raise SegmentHeaderError(f"segment is {len(data)} bytes, shorter than its {HEADER_SIZE}-byte header")
    (magic, checksum, version, block_count, event_count, unique_dids, min_seq, max_seq, min_w, max_w,
     footer, did_bloom, block_bloom, coll_index, block_index) = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise SegmentHeaderError(f"bad segment magic {bytes(magic)!r}")
    if checksum == 0:
        raise ActiveSegmentError("checksum field is 0: an active (unsealed) segment")
    if version != VERSION:
        raise SegmentHeaderError(f"segment version {version}, expected {VERSION}")
    if block_count > MAX_BLOCK_COUNT:
        raise SegmentHeaderError(f"block_count {block_count} exceeds {MAX_BLOCK_COUNT}")
    if footer < HEADER_SIZE:
        raise SegmentHeaderError(f"footer_offset {footer} is inside the header")
    if block_index != footer:
        raise SegmentHeaderError(f"block_index_offset {block_index} != footer_offset {footer}")
    if not block_index + block_count * BLOCK_INDEX_ENTRY_SIZE <= did_bloom <= block_bloom <= coll_index:
        raise SegmentHeaderError("footer section offsets out of order")
    if file_size is not None and coll_index + _COLLECTION_INDEX_HEADER > file_size:
        raise SegmentHeaderError(f"footer sections run past the end of the {file_size}-byte file")
    if block_count and (max_seq < min_seq or max_w < min_w):
        raise SegmentHeaderError("header seq or witnessed_at envelope is inverted")
    return SegmentHeader(checksum, version, block_count, event_count, unique_dids, min_seq, max_seq, min_w,
                         max_w, footer, did_bloom, block_bloom, coll_index, block_index)


def parse_block_index(data: bytes | memoryview, header: SegmentHeader) -> list[BlockInfo]:
    """The block index entries, validated as the Go reader does.

    ``data`` is the whole segment (or at least through the end of the block index).

    Raises:
        BlockIndexError: an entry outside ``[256, footer_offset)``, overlapping the previous one,
            with an inverted envelope, or a non-empty block whose seqs do not follow the previous
            non-empty block's; or an index that runs past the data.
    """
    start = header.block_index_offset
    end = start + header.block_count * BLOCK_INDEX_ENTRY_SIZE
    if end > len(data):
        raise BlockIndexError(f"block index [{start}, {end}) runs past the {len(data)}-byte segment")
    footer = header.footer_offset
    out: list[BlockInfo] = []
    prev_end = HEADER_SIZE
    prev_max: int | None = None
    for i, entry in enumerate(_INDEX_ENTRY.iter_unpack(data[start:end])):
        info = BlockInfo(i, *entry)
        if not HEADER_SIZE <= info.offset < footer or info.frame_end > footer:
            raise BlockIndexError(f"block {i} range [{info.offset}, {info.frame_end}) outside "
                                  f"[{HEADER_SIZE}, {footer})")
        if info.offset < prev_end:
            raise BlockIndexError(f"block {i} at {info.offset} overlaps the previous block ending at {prev_end}")
        if info.max_seq < info.min_seq or info.max_witnessed_at < info.min_witnessed_at:
            raise BlockIndexError(f"block {i} has an inverted seq or witnessed_at envelope")
        if info.count > MAX_BLOCK_EVENTS:
            raise BlockIndexError(f"block {i} claims {info.count} rows (cap {MAX_BLOCK_EVENTS})")
        if info.count:
            if prev_max is not None and info.min_seq <= prev_max:
                raise BlockIndexError(f"block {i} min_seq {info.min_seq} is not above the previous "
                                      f"block's max_seq {prev_max}")
            prev_max = info.max_seq
        prev_end = info.frame_end
        out.append(info)
    return out


def segment_checksum(header: bytes | memoryview, footer: bytes | memoryview) -> int:
    """``xxh3_64(header[12:256] + footer)``: what a sealed header stores at offset 4."""
    h = xxhash.xxh3_64()
    h.update(header[12:HEADER_SIZE])
    h.update(footer)
    return h.intdigest()


# --- blocks ---------------------------------------------------------------------------------------

_LOCAL = threading.local()


def zstd_dictionary_id(data: bytes) -> int | None:
    """The id of a zstd dictionary (Jetstream's ``getZstdDictionary``): the little-endian u32 after
    its magic; None when ``data`` is not a zstd dictionary."""
    if len(data) < 8 or data[:4] != ZSTD_DICT_MAGIC:
        return None
    return int.from_bytes(data[4:8], "little")


def _dctx() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (a ``ZstdDecompressor`` must not be shared between threads)."""
    dctx: zstandard.ZstdDecompressor | None = getattr(_LOCAL, "dctx", None)
    if dctx is None:
        dctx = _LOCAL.dctx = zstandard.ZstdDecompressor()
    return dctx


def decompress_block(frame: bytes | memoryview, *, max_size: int = MAX_BLOCK_BYTES,
                     expected_size: int | None = None, require_checksum: bool = True,
                     strict: bool = False) -> bytes:
    """Decompress one stored block frame (without its length prefix), checking its content checksum.

    Memory stays bounded by ``max_size``: a frame declaring more is refused before any allocation, a
    frame without a declared size is read at most ``max_size + 1`` bytes far first.

    Args:
        frame: the zstd frame.
        max_size: cap on the decompressed size.
        expected_size: the block index's ``usize`` (checked when given).
        require_checksum: refuse a frame without a content checksum (the format always writes one).
        strict: also refuse bytes after the frame (a second decompression pass; ``--verify`` uses it).

    Raises:
        BlockTooLargeError: over ``max_size``.
        BlockChecksumError: no content checksum, or the content does not match it.
        BlockDecompressError: not one zstd frame, or a size other than ``expected_size``.
    """
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as e:
        raise BlockDecompressError(f"block is not a zstd frame: {e}") from e
    if params.dict_id:
        raise BlockDecompressError(f"block frame names zstd dictionary {params.dict_id}; blocks have none")
    if require_checksum and not params.has_checksum:
        raise BlockChecksumError("block frame has no content checksum")
    declared = params.content_size
    known = declared != zstandard.CONTENTSIZE_UNKNOWN
    if known and declared > max_size:
        raise BlockTooLargeError(f"block declares {declared} decompressed bytes (cap {max_size})")
    if expected_size is not None and expected_size > max_size:
        raise BlockTooLargeError(f"block index says {expected_size} decompressed bytes (cap {max_size})")
    dctx = _dctx()
    try:
        if known:
            body: bytes = dctx.decompress(frame)
        else:
            probe = dctx.stream_reader(frame, read_across_frames=False).read(max_size + 1)
            if len(probe) > max_size:
                raise BlockTooLargeError(f"block decompresses past the cap of {max_size} bytes")
        if strict or not known:
            # bounded now: the first frame's content is known to be at most max_size
            dobj = dctx.decompressobj()
            body = dobj.decompress(frame)
            if not dobj.eof:
                raise BlockDecompressError("block frame is truncated")
            if dobj.unused_data:
                raise BlockDecompressError(f"{len(dobj.unused_data)} bytes after the block's zstd frame")
    except zstandard.ZstdError as e:
        if "checksum" in str(e).lower():
            raise BlockChecksumError(f"block content does not match its checksum: {e}") from e
        raise BlockDecompressError(f"block does not decompress: {e}") from e
    if expected_size is not None and len(body) != expected_size:
        raise BlockDecompressError(f"block decompressed to {len(body)} bytes, the index says {expected_size}")
    return body


def _ints(view: memoryview, code: Literal["Q", "q", "H", "I"], n: int) -> list[int]:
    """A little-endian column of ``n`` integers (one C call per column)."""
    if _LITTLE:
        values: list[int] = view.cast(code).tolist()
        return values
    return list(struct.unpack(f"<{n}{code}", view))  # pragma: no cover - big-endian hosts


def _strings(blob: bytes, lengths: list[int], what: str) -> list[str]:
    """Split a concatenated string column by byte lengths (one decode when it is ASCII, as NSIDs,
    DIDs, rkeys and revs are)."""
    if not lengths:
        return []
    try:
        text = blob.decode("ascii")
    except UnicodeDecodeError:
        offsets = [0, *accumulate(lengths)]
        try:
            return [blob[a:b].decode("utf-8") for a, b in pairwise(offsets)]
        except UnicodeDecodeError as e:
            raise BlockFormatError(f"{what} column holds a string that is not UTF-8") from e
    offsets = [0, *accumulate(lengths)]
    return [text[a:b] for a, b in pairwise(offsets)]


#: A block's variable-length columns: collection, did, rkey, rev, payload.
Columns = tuple[list[str], list[str], list[str], list[str], list[bytes]]
#: The variable-length columns in block order: the width of a row's length, and whether the values
#: are text (collection, did, rkey, rev) or bytes (payload).
_VARIABLE_COLUMNS: Final = ((1, True), (2, True), (1, True), (1, True), (4, False))
#: Bytes of a row's lengths of those columns (the values follow every length column).
_LENGTH_BYTES_PER_ROW: Final = sum(width for width, _ in _VARIABLE_COLUMNS)


def _split_native(fast: Native, body: bytes, p: int, n: int) -> Columns | None:
    """The variable-length columns of a block whose length columns begin at ``p``, through the
    native path; None when it bails (a column overruns the block, a string is not UTF-8, bytes are
    left over): the Python path then decides, and names the error."""
    at = p + _LENGTH_BYTES_PER_ROW * n
    out: list[list[Any]] = []
    for width, text in _VARIABLE_COLUMNS:
        got = fast.split_column(body, p, n, width, at, text)
        if got is None:
            return None
        values, at = got
        out.append(values)
        p += width * n
    if at != len(body):
        return None
    return out[0], out[1], out[2], out[3], out[4]


def parse_block(body: bytes) -> Block:
    """Parse a decompressed block into its columns.

    Raises:
        BlockFormatError: truncated, trailing bytes, a row count over :data:`MAX_BLOCK_EVENTS`, or a
            string column that is not UTF-8.
        UnknownKindError: a kind outside 1-7.
    """
    size = len(body)
    if size < 4:
        raise BlockFormatError(f"block is {size} bytes, too short for its row count")
    (n,) = _U32.unpack_from(body, 0)
    if n > MAX_BLOCK_EVENTS:
        raise BlockFormatError(f"block claims {n} rows (cap {MAX_BLOCK_EVENTS})")
    if size - 4 < n * _FIXED_PER_ROW:
        raise BlockFormatError(f"block of {size} bytes cannot hold the fixed columns of {n} rows")
    if n == 0:
        if size != 4:
            raise BlockFormatError(f"empty block has {size - 4} trailing bytes")
        return Block([], [], [], b"", [], [], [], [], [])
    view = memoryview(body)
    p = 4
    seq = _ints(view[p:p + 8 * n], "Q", n)
    p += 8 * n
    witnessed = _ints(view[p:p + 8 * n], "q", n)
    p += 8 * n
    indexed = _ints(view[p:p + 8 * n], "q", n)
    p += 8 * n
    kinds = body[p:p + n]
    p += n
    if min(kinds) < KIND_CREATE or max(kinds) > _MAX_KIND:
        bad = next(k for k in kinds if not KIND_CREATE <= k <= _MAX_KIND)
        raise UnknownKindError(f"row kind {bad} is not 1-{_MAX_KIND}")
    fast = native.NATIVE
    if fast is not None:
        columns = _split_native(fast, body, p, n)
        if columns is not None:
            return Block(seq, witnessed, indexed, kinds, *columns)
    coll_len = list(body[p:p + n])
    p += n
    did_len = _ints(view[p:p + 2 * n], "H", n)
    p += 2 * n
    rkey_len = list(body[p:p + n])
    p += n
    rev_len = list(body[p:p + n])
    p += n
    pay_len = _ints(view[p:p + 4 * n], "I", n)
    p += 4 * n
    totals = (sum(coll_len), sum(did_len), sum(rkey_len), sum(rev_len), sum(pay_len))
    if p + sum(totals) != size:
        raise BlockFormatError(f"block columns add up to {p + sum(totals)} bytes, the block has {size}")
    blobs = []
    for total in totals:
        blobs.append(body[p:p + total])
        p += total
    payload_blob = blobs[4]
    offsets = [0, *accumulate(pay_len)]
    payloads = [payload_blob[a:b] for a, b in pairwise(offsets)]
    return Block(seq, witnessed, indexed, kinds, _strings(blobs[0], coll_len, "collection"),
                 _strings(blobs[1], did_len, "did"), _strings(blobs[2], rkey_len, "rkey"),
                 _strings(blobs[3], rev_len, "rev"), payloads)


def decode_block(frame: bytes | memoryview, *, max_size: int = MAX_BLOCK_BYTES,
                 expected_size: int | None = None, strict: bool = False) -> Block:
    """:func:`decompress_block` then :func:`parse_block` (what a ``getBlock`` response decodes with)."""
    return parse_block(decompress_block(frame, max_size=max_size, expected_size=expected_size, strict=strict))


def encode_block(rows: Sequence[Row]) -> bytes:
    """The uncompressed columnar body of ``rows`` (an empty sequence gives the empty block ``n = 0``).

    Raises:
        SegmentError: a kind outside 1-7, or a field too long for its column (or a number out of range).
    """
    n = len(rows)
    try:
        encoded = [(r.collection.encode(), r.did.encode(), r.rkey.encode(), r.rev.encode()) for r in rows]
        for r, (c, d, k, v) in zip(rows, encoded, strict=True):
            if not KIND_CREATE <= r.kind <= _MAX_KIND:
                raise UnknownKindError(f"row kind {r.kind} is not 1-{_MAX_KIND}")
            if len(c) > 255 or len(d) > 65535 or len(k) > 255 or len(v) > 255 or len(r.payload) > 0xFFFFFFFF:
                raise SegmentError(f"row {r.seq}: a field is too long for its column")
        out = bytearray(_U32.pack(n))
        out += struct.pack(f"<{n}Q{n}q{n}q", *(r.seq for r in rows), *(r.witnessed_at for r in rows),
                           *(r.indexed_at for r in rows))
        out += bytes(r.kind for r in rows)
        out += bytes(len(e[0]) for e in encoded)
        out += struct.pack(f"<{n}H", *(len(e[1]) for e in encoded))
        out += bytes(len(e[2]) for e in encoded)
        out += bytes(len(e[3]) for e in encoded)
        out += struct.pack(f"<{n}I", *(len(r.payload) for r in rows))
    except (struct.error, ValueError, AttributeError) as e:
        if isinstance(e, SegmentError):
            raise
        raise SegmentError(f"rows do not fit the block columns: {e}") from e
    for column in range(4):
        out += b"".join(e[column] for e in encoded)
    out += b"".join(bytes(r.payload) for r in rows)
    return bytes(out)


# --- DID blooms (github.com/jcalabro/gloom v0.1.0) -------------------------------------------------

_PRIMES: Final[dict[int, tuple[int, ...]]] = {
    3: (167, 173, 172),
    4: (109, 127, 137, 139),
    5: (97, 101, 103, 109, 102),
    6: (61, 79, 83, 89, 97, 103),
    7: (61, 67, 71, 79, 83, 89, 62),
    8: (37, 47, 53, 61, 67, 71, 79, 97),
    9: (41, 43, 47, 53, 59, 67, 71, 73, 58),
    10: (31, 37, 41, 43, 47, 53, 59, 61, 67, 73),
    11: (29, 31, 37, 41, 43, 44, 47, 53, 59, 61, 67),
    12: (17, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 71),
    13: (17, 19, 23, 29, 31, 37, 41, 43, 47, 52, 53, 59, 61),
    14: (11, 13, 17, 19, 23, 29, 31, 37, 41, 47, 53, 59, 61, 71),
    15: (11, 13, 17, 19, 23, 28, 29, 31, 37, 41, 43, 47, 53, 59, 61),
    16: (5, 7, 11, 13, 17, 19, 23, 27, 29, 31, 37, 41, 43, 47, 53, 109),
    17: (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 32, 37, 41, 43, 47, 53, 101),
}
_OFFSETS: Final = {k: tuple(accumulate(p, initial=0))[:-1] for k, p in _PRIMES.items()}
#: Cap on a parsed bloom's 512-bit blocks (2 GiB of filter): past it the bytes are not a real bloom.
_MAX_BLOOM_BLOCKS: Final = 1 << 22
_LN2_SQUARED: Final = 0.4804530139182014


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C: Final = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli), as Go's ``crc32.Checksum(data, crc32.MakeTable(crc32.Castagnoli))``."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _estimate_fp(num_blocks: int, k: int, items: int) -> float:
    """gloom's ``EstimateFalsePositiveRate``: Poisson-weighted per-block false positive rate."""
    if num_blocks == 0 or items == 0:
        return 0.0
    primes = _PRIMES[k]
    lam = items / num_blocks

    def block_fp(j: float) -> float:
        fp = 1.0
        for p in primes:
            fp *= 1 - math.pow(1 - 1 / p, j)
        return fp

    if lam > 10000:
        return block_fp(lam)
    max_j = int(lam + 10 * math.sqrt(lam) + 20)
    total = 0.0
    log_fact = 0.0
    log_lam = math.log(lam)
    for j in range(max_j + 1):
        if j > 0:
            log_fact += math.log(j)
        prob = math.exp(-lam + j * log_lam - log_fact)
        if prob < 1e-15 and j > int(lam):
            break
        if j > 0:
            total += prob * block_fp(j)
    return total


def _best_k(num_blocks: int, items: int) -> int:
    best, best_fp = 3, math.inf
    for k in range(3, 18):
        fp = _estimate_fp(num_blocks, k, items)
        if fp < best_fp:
            best, best_fp = k, fp
    return best


def bloom_params(expected: int, fp_rate: float = _BLOOM_FP_RATE) -> tuple[int, int]:
    """``(num_blocks, k)`` as gloom's ``OptimalParams`` chooses them."""
    expected = max(expected, 1)
    bits_per_item = -math.log(fp_rate) / _LN2_SQUARED
    base = math.ceil(expected * bits_per_item / 512)
    cap = math.ceil(base * 4.0)
    num_blocks = base
    k = _best_k(num_blocks, expected)
    while _estimate_fp(num_blocks, k, expected) > fp_rate and num_blocks < cap:
        num_blocks = min(num_blocks + num_blocks // 8 + 1, cap)
        k = _best_k(num_blocks, expected)
    return num_blocks, k


@dataclass(slots=True)
class Bloom:
    """A blocked bloom filter in gloom's layout: 512-bit blocks, k prime partitions per block; a key's
    xxh3-128 picks the block (multiply-shift of the high half) and the bits (the folded low half
    modulo each partition)."""

    k: int
    num_blocks: int
    count: int = 0
    bits: bytearray = field(default_factory=bytearray)

    @classmethod
    def for_items(cls, expected: int, fp_rate: float = _BLOOM_FP_RATE) -> Bloom:
        """An empty filter sized as ``gloom.New(expected, fp_rate)`` sizes it."""
        num_blocks, k = bloom_params(expected, fp_rate)
        return cls(k, num_blocks, 0, bytearray(num_blocks * 64))

    @classmethod
    def parse(cls, data: bytes | memoryview) -> Bloom:
        """Parse gloom's ``MarshalBinary`` form (header, 512-bit blocks, CRC-32C trailer).

        Raises:
            SegmentError: bad version, k, block count, length or checksum.
        """
        if len(data) < _GLOOM_HEADER + 4 or data[0] != 1:
            raise SegmentError("DID bloom is not a version-1 gloom filter")
        k, num_blocks, count = struct.unpack_from("<IQQ", data, 1)
        if k not in _PRIMES or not 0 < num_blocks <= _MAX_BLOOM_BLOCKS:
            raise SegmentError(f"DID bloom has k={k}, {num_blocks} blocks")
        if len(data) != _GLOOM_HEADER + num_blocks * 64 + 4:
            raise SegmentError(f"DID bloom is {len(data)} bytes, {num_blocks} blocks need "
                               f"{_GLOOM_HEADER + num_blocks * 64 + 4}")
        (stored,) = _U32.unpack_from(data, len(data) - 4)
        if crc32c(data[:-4]) != stored:
            raise SegmentError("DID bloom does not match its CRC-32C")
        return cls(k, num_blocks, count, bytearray(data[_GLOOM_HEADER:-4]))

    def _positions(self, item: str) -> list[int]:
        h = xxhash.xxh3_128_intdigest(item.encode())
        base = ((h >> 64) * self.num_blocks >> 64) * 512
        lo = h & _U64_MAX
        intra = (lo ^ (lo >> 32)) & 0xFFFFFFFF
        return [base + off + intra % p for off, p in zip(_OFFSETS[self.k], _PRIMES[self.k], strict=True)]

    def add(self, item: str) -> None:
        """Add one item (a DID)."""
        bits = self.bits
        for pos in self._positions(item):
            bits[pos >> 3] |= 1 << (pos & 7)
        self.count += 1

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, str):
            return False
        bits = self.bits
        return all(bits[pos >> 3] & (1 << (pos & 7)) for pos in self._positions(item))

    def encode(self) -> bytes:
        """gloom's ``MarshalBinary`` bytes (words little-endian, so the bit layout is byte order)."""
        body = struct.pack("<BIQQ", 1, self.k, self.num_blocks, self.count) + bytes(self.bits)
        return body + _U32.pack(crc32c(body))


# --- collection index ------------------------------------------------------------------------------

@dataclass(slots=True)
class CollectionIndex:
    """The collection index: NSIDs in first-seen order, their row counts, and each block's NSID ids."""

    names: list[str]
    counts: list[int]
    blocks: list[list[int]]

    def encode(self) -> bytes:
        """16-byte header, then the zstd body (with a content checksum)."""
        count = len(self.names)
        mask_len = (count + 7) // 8
        body = bytearray()
        for name, n in zip(self.names, self.counts, strict=True):
            raw = name.encode()
            if len(raw) > 255:
                raise SegmentError(f"collection {name[:80]!r} is longer than 255 bytes")
            body += bytes((len(raw),)) + _U32.pack(n) + raw
        for ids in self.blocks:
            mask = bytearray(mask_len)
            for i in ids:
                mask[i >> 3] |= 1 << (i & 7)
            body += mask
        packed = _CCTX.compress(bytes(body))
        return struct.pack("<IIII", count, len(self.blocks), mask_len, len(body)) + packed


def parse_collection_index(data: bytes | memoryview, *, max_size: int = MAX_BLOCK_BYTES) -> CollectionIndex:
    """Parse the collection index region (its header and zstd body, to the end of the file).

    Raises:
        SegmentError: counts over their caps, a body that does not decompress to its declared size,
            truncated entries, bitmask bits past the table, or trailing bytes.
    """
    if len(data) < _COLLECTION_INDEX_HEADER:
        raise SegmentError("collection index is shorter than its header")
    count, block_count, mask_len, usize = struct.unpack_from("<IIII", data, 0)
    if count > MAX_COLLECTIONS or block_count > MAX_BLOCK_COUNT or usize > max_size:
        raise SegmentError(f"collection index claims {count} collections, {block_count} blocks, {usize} bytes")
    if mask_len != (count + 7) // 8:
        raise SegmentError(f"collection index bitmask length {mask_len} does not fit {count} collections")
    try:
        body = decompress_block(data[_COLLECTION_INDEX_HEADER:], max_size=usize, expected_size=usize,
                                require_checksum=False, strict=True)
    except SegmentError as e:
        raise SegmentError(f"collection index does not decompress to its {usize} bytes: {e}") from e
    names: list[str] = []
    counts: list[int] = []
    p = 0
    try:
        for _ in range(count):
            n = body[p]
            (c,) = _U32.unpack_from(body, p + 1)
            if p + 5 + n > usize:
                raise SegmentError("collection index entry is truncated")
            names.append(body[p + 5:p + 5 + n].decode())
            counts.append(c)
            p += 5 + n
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise SegmentError(f"collection index entry is truncated or not UTF-8: {e}") from e
    if p + block_count * mask_len != usize:
        raise SegmentError("collection index bitmasks do not fill its body")
    blocks: list[list[int]] = []
    for _ in range(block_count):
        mask = int.from_bytes(body[p:p + mask_len], "little")
        p += mask_len
        if mask >> count:
            raise SegmentError("collection index bitmask names a collection past its table")
        blocks.append([i for i in range(count) if mask >> i & 1])
    return CollectionIndex(names, counts, blocks)


# --- reading a whole segment -----------------------------------------------------------------------

class Segment:
    """A sealed segment held in a buffer (bytes or an ``mmap``): header and block index parsed and
    validated on construction; blocks decoded on demand.

    Args:
        data: the whole segment file.
        max_block_bytes: cap on one block's decompressed size.

    Raises:
        SegmentHeaderError, ActiveSegmentError, BlockIndexError: see :func:`parse_header` and
            :func:`parse_block_index`.
    """

    def __init__(self, data: bytes | bytearray | memoryview | mmap.mmap, *,
                 max_block_bytes: int = MAX_BLOCK_BYTES) -> None:
        self.data = memoryview(data)
        if self.data.ndim != 1 or self.data.itemsize != 1:
            self.data = self.data.cast("B")
        self.max_block_bytes = max_block_bytes
        self.header = parse_header(self.data, file_size=len(self.data))
        self.blocks = parse_block_index(self.data, self.header)

    def verify_checksum(self) -> None:
        """Check the header's checksum against the metadata.

        Raises:
            ChecksumMismatchError: they differ.
        """
        got = segment_checksum(self.data[:HEADER_SIZE], self.data[self.header.footer_offset:])
        if got != self.header.checksum:
            raise ChecksumMismatchError(f"segment checksum is {got:016x}, the header says {self.header.checksum:016x}")

    def frame(self, index: int) -> memoryview:
        """Block ``index``'s stored zstd frame (what ``getBlock`` serves).

        Raises:
            BlockIndexError: no such block, or its length prefix disagrees with the block index.
        """
        if not 0 <= index < len(self.blocks):
            raise BlockIndexError(f"block {index} is out of range (the segment has {len(self.blocks)})")
        info = self.blocks[index]
        (length,) = _U64.unpack_from(self.data, info.offset)
        if length != info.csize:
            raise BlockIndexError(f"block {index} length prefix {length} != index csize {info.csize}")
        return self.data[info.frame_start:info.frame_end]

    def block(self, index: int, *, strict: bool = False) -> Block:
        """Decode block ``index`` and check it against its index entry (row count, size, seqs, times);
        ``strict`` also refuses bytes after the zstd frame.

        Raises:
            SegmentError: any subclass: the frame, its decompression or its columns are bad, or the
                rows are not what the index says.
        """
        info = self.blocks[index] if 0 <= index < len(self.blocks) else None
        frame = self.frame(index)
        assert info is not None  # frame() raised otherwise
        block = decode_block(frame, max_size=self.max_block_bytes, expected_size=info.usize, strict=strict)
        n = len(block)
        if n != info.count:
            raise BlockIndexError(f"block {index} holds {n} rows, the index says {info.count}")
        if n:
            seqs = block.seq
            if not all(map(operator.lt, seqs, islice(seqs, 1, None))):
                raise BlockFormatError(f"block {index} seqs are not strictly ascending")
            if seqs[0] < info.min_seq or seqs[-1] > info.max_seq:
                raise BlockIndexError(f"block {index} seqs [{seqs[0]}, {seqs[-1]}] outside its index envelope")
            w = block.witnessed_at
            if min(w) < info.min_witnessed_at or max(w) > info.max_witnessed_at:
                raise BlockIndexError(f"block {index} witnessed_at outside its index envelope")
        return block

    def iter_blocks(self) -> Iterator[tuple[BlockInfo, Block]]:
        """Every block in order (see :meth:`block` for the errors)."""
        for info in self.blocks:
            yield info, self.block(info.index)

    def rows(self) -> Iterator[Row]:
        """Every row in seq order."""
        for _info, block in self.iter_blocks():
            yield from block.rows()

    def collection_index(self) -> CollectionIndex:
        """The parsed collection index (see :func:`parse_collection_index`)."""
        return parse_collection_index(self.data[self.header.collection_index_offset:],
                                      max_size=self.max_block_bytes)

    def did_bloom(self) -> Bloom:
        """The segment-level DID bloom."""
        h = self.header
        return Bloom.parse(self.data[h.did_bloom_offset:h.block_did_bloom_offset])

    def block_blooms(self) -> list[Bloom]:
        """The per-block DID blooms.

        Raises:
            SegmentError: the region's count or size does not fit the header.
        """
        h = self.header
        region = self.data[h.block_did_bloom_offset:h.collection_index_offset]
        if len(region) < _BLOOM_REGION_HEADER:
            raise SegmentError("per-block bloom region is shorter than its header")
        count, size = struct.unpack_from("<II", region, 0)
        if count != h.block_count or len(region) != _BLOOM_REGION_HEADER + count * size:
            raise SegmentError(f"per-block bloom region ({count} x {size} bytes) does not fit the header")
        return [Bloom.parse(region[_BLOOM_REGION_HEADER + i * size:_BLOOM_REGION_HEADER + (i + 1) * size])
                for i in range(count)]

    def verify(self) -> list[Problem]:
        """Check everything the format lets a reader check, and name each problem found.

        The segment checksum, each block (its frame, content checksum, columns, index entry), the
        header's counts and envelope against the rows, and the footer's blooms and collection index.
        """
        problems: list[Problem] = []
        try:
            self.verify_checksum()
        except ChecksumMismatchError as e:
            problems.append(Problem("segment_checksum", str(e)))
        total = 0
        dids: set[str] = set()
        seqs: list[int] = []
        for info in self.blocks:
            try:
                block = self.block(info.index, strict=True)
            except BlockChecksumError as e:
                problems.append(Problem("block_checksum", str(e), info.index))
                continue
            except SegmentError as e:
                problems.append(Problem("block", f"{type(e).__name__}: {e}", info.index))
                continue
            total += len(block)
            dids.update(d for d in block.did if d)
            if len(block):
                seqs += (block.seq[0], block.seq[-1])
        h = self.header
        # with a block missing, the rows are incomplete and the header's counts cannot be checked
        if not any(p.block is not None for p in problems):
            if total != h.event_count:
                problems.append(Problem("header", f"header event_count {h.event_count}, the blocks hold {total}"))
            if seqs and (min(seqs) != h.min_seq or max(seqs) != h.max_seq):
                problems.append(Problem("header", f"header seqs [{h.min_seq}, {h.max_seq}], rows "
                                                  f"[{min(seqs)}, {max(seqs)}]"))
            if len(dids) != h.unique_dids:
                problems.append(Problem("header", f"header unique_dids {h.unique_dids}, rows {len(dids)}"))
        try:
            bloom = self.did_bloom()
            missing = next((d for d in dids if d not in bloom), None)
            if missing is not None:
                problems.append(Problem("did_bloom", f"segment bloom lacks {missing}"))
            self.block_blooms()
            index = self.collection_index()
            if len(index.blocks) != h.block_count:
                problems.append(Problem("collection_index", f"{len(index.blocks)} block bitmasks for "
                                                            f"{h.block_count} blocks"))
        except SegmentError as e:
            problems.append(Problem("footer", str(e)))
        return problems


# --- writing ---------------------------------------------------------------------------------------

_CCTX = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)


class SegmentWriter:
    """Writes a sealed segment to a seekable binary file: blocks as rows come, the footer and the
    header on :meth:`close`.

    Rows must come in strictly ascending seq order (the reader and the planner rely on it).

    Args:
        out: a seekable binary file positioned anywhere (the segment starts at offset 0).
        max_rows_per_block: a block is flushed when it holds this many rows.
        level: the zstd level of the blocks.
    """

    def __init__(self, out: IO[bytes], *, max_rows_per_block: int = 4096, level: int = 3) -> None:
        if not 0 < max_rows_per_block <= MAX_BLOCK_EVENTS:
            raise ValueError(f"max_rows_per_block must be 1..{MAX_BLOCK_EVENTS}")
        self._out = out
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        self._max_rows = max_rows_per_block
        self._pending: list[Row] = []
        self._infos: list[BlockInfo] = []
        self._offset = HEADER_SIZE
        self._last_seq: int | None = None
        self._dids: set[str] = set()
        self._block_dids: list[set[str]] = []
        self._names: dict[str, int] = {}
        self._counts: list[int] = []
        self._block_names: list[list[int]] = []
        self._events = 0
        self._min_w: int | None = None
        self._max_w: int | None = None
        self._closed = False
        out.seek(0)
        out.write(bytes(HEADER_SIZE))

    def append(self, row: Row) -> None:
        """Add one row (flushing a full block).

        Raises:
            SegmentError: seq not above the last one, a kind outside 1-7, a field too long for its
                column or a number out of its column's range.
        """
        if self._closed:
            raise SegmentError("writer is closed")
        if not 0 <= row.seq <= _U64_MAX or not _I64_MIN <= row.witnessed_at <= _I64_MAX \
                or not _I64_MIN <= row.indexed_at <= _I64_MAX:
            raise SegmentError(f"row {row.seq}: a number is out of its column's range")
        if self._last_seq is not None and row.seq <= self._last_seq:
            raise SegmentError(f"row seq {row.seq} is not above the previous {self._last_seq}")
        if not KIND_CREATE <= row.kind <= _MAX_KIND:
            raise UnknownKindError(f"row kind {row.kind} is not 1-{_MAX_KIND}")
        self._last_seq = row.seq
        self._pending.append(row)
        if len(self._pending) >= self._max_rows:
            self.flush()

    def flush(self) -> None:
        """End the current block (nothing when it is empty)."""
        if self._pending:
            rows, self._pending = self._pending, []
            self._write_block(rows)

    def append_empty_block(self) -> None:
        """Write an empty block (``n = 0``), as compaction leaves them."""
        self.flush()
        self._write_block([])

    def _write_block(self, rows: list[Row]) -> None:
        body = encode_block(rows)
        frame = self._cctx.compress(body)
        if rows:
            w = [r.witnessed_at for r in rows]
            envelope = (rows[0].seq, rows[-1].seq, min(w), max(w))
            self._min_w = envelope[2] if self._min_w is None else min(self._min_w, envelope[2])
            self._max_w = envelope[3] if self._max_w is None else max(self._max_w, envelope[3])
        else:
            envelope = (0, 0, 0, 0)
        self._infos.append(BlockInfo(len(self._infos), self._offset, len(frame), len(body), len(rows), *envelope))
        self._out.write(_U64.pack(len(frame)))
        self._out.write(frame)
        self._offset += _LEN_PREFIX + len(frame)
        self._events += len(rows)
        dids: set[str] = set()
        ids: set[int] = set()
        for r in rows:
            if r.did:
                dids.add(r.did)
            if r.collection:
                ids.add(self._intern(r.collection, counted=True))
            sentinel = _SENTINELS.get(r.kind)
            if sentinel is not None:
                ids.add(self._intern(sentinel, counted=False))
        self._dids |= dids
        self._block_dids.append(dids)
        self._block_names.append(sorted(ids))

    def _intern(self, name: str, *, counted: bool) -> int:
        i = self._names.get(name)
        if i is None:
            i = self._names[name] = len(self._counts)
            self._counts.append(0)
        if counted:
            self._counts[i] += 1
        return i

    def close(self) -> SegmentHeader:
        """Flush, write the footer and the sealed header; returns the header written."""
        if self._closed:
            raise SegmentError("writer is closed")
        self.flush()
        self._closed = True
        footer_offset = self._offset
        index = b"".join(_INDEX_ENTRY.pack(i.offset, i.csize, i.usize, i.count, i.min_seq, i.max_seq,
                                           i.min_witnessed_at, i.max_witnessed_at) for i in self._infos)
        bloom = Bloom.for_items(len(self._dids))
        for did in self._dids:
            bloom.add(did)
        segment_bloom = bloom.encode()
        capacity = max([1, *(len(d) for d in self._block_dids)])
        filters = []
        for dids in self._block_dids:
            b = Bloom.for_items(capacity)
            for did in dids:
                b.add(did)
            filters.append(b.encode())
        size = len(filters[0]) if filters else 0
        region = struct.pack("<II", len(filters), size) + b"".join(filters)
        collections = CollectionIndex(list(self._names), self._counts, self._block_names).encode()
        footer = index + segment_bloom + region + collections
        non_empty = [i for i in self._infos if i.count]
        header = SegmentHeader(
            0, VERSION, len(self._infos), self._events, len(self._dids),
            non_empty[0].min_seq if non_empty else 0, non_empty[-1].max_seq if non_empty else 0,
            self._min_w or 0, self._max_w or 0, footer_offset,
            footer_offset + len(index), footer_offset + len(index) + len(segment_bloom),
            footer_offset + len(index) + len(segment_bloom) + len(region), footer_offset)
        raw = header.encode()
        header = replace(header, checksum=segment_checksum(raw, footer))
        self._out.write(footer)
        self._out.seek(0)
        self._out.write(header.encode())
        self._out.seek(0, 2)
        return header



def write_segment(out: IO[bytes], rows: Sequence[Row] | Iterator[Row], *,
                  max_rows_per_block: int = 4096) -> SegmentHeader:
    """Write ``rows`` as one sealed segment to ``out`` (see :class:`SegmentWriter`)."""
    writer = SegmentWriter(out, max_rows_per_block=max_rows_per_block)
    for row in rows:
        writer.append(row)
    return writer.close()

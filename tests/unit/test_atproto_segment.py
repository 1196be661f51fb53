"""Jetstream v2 segment files (``runtime.atproto.segment``): the Go code's golden files, writer/reader
round trips, and corruption of every kind ending in a typed :class:`SegmentError`."""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.atproto import native
from runtime.atproto.cid import CID
from runtime.atproto.errors import AtprotoFormatError
from runtime.atproto.segment import (
    HEADER_SIZE,
    KIND_ACCOUNT,
    KIND_CREATE,
    KIND_DELETE,
    KIND_IDENTITY,
    KIND_RESYNC_CREATE,
    KIND_SYNC,
    KIND_UPDATE,
    MAX_BLOCK_EVENTS,
    ActiveSegmentError,
    Block,
    BlockChecksumError,
    BlockDecompressError,
    BlockFormatError,
    BlockIndexError,
    BlockTooLargeError,
    Bloom,
    ChecksumMismatchError,
    Row,
    Segment,
    SegmentError,
    SegmentHeaderError,
    SegmentWriter,
    UnknownKindError,
    bloom_params,
    crc32c,
    decode_block,
    decompress_block,
    encode_block,
    parse_block,
    write_segment,
)
from runtime.errors import DROP_REASONS
from tests.unit.jetstream2_golden import CORPUS_RECORD_CIDS, GOLDEN_BLOCK, GOLDEN_CORPUS_SEGMENT, GOLDEN_SEAL

CORPUS_DID = "did:plc:53iucmf5ldftgqyf2ac7hmhd"


def _segment_bytes(rows: Sequence[Row], per_block: int = 4096) -> bytes:
    out = io.BytesIO()
    write_segment(out, rows, max_rows_per_block=per_block)
    return out.getvalue()


def _row(seq: int, kind: int = KIND_CREATE, *, did: str = "did:plc:alice", collection: str = "app.bsky.feed.post",
         rkey: str = "3k", rev: str = "3r", payload: bytes = b"\xa1ahb", witnessed: int | None = None,
         indexed: int = 0) -> Row:
    return Row(seq, 1_700_000_000_000_000 + seq if witnessed is None else witnessed, indexed, kind, collection,
               did, rkey, rev, payload)


def _footer(seg: Segment) -> bytes:
    return bytes(seg.data[seg.header.did_bloom_offset:seg.header.collection_index_offset])


# --- the Go code's golden files ---------------------------------------------------------------------

def test_golden_corpus_segment_reads_and_verifies() -> None:
    seg = Segment(GOLDEN_CORPUS_SEGMENT)
    seg.verify_checksum()
    assert seg.verify() == []
    h = seg.header
    assert (h.block_count, h.event_count, h.unique_dids, h.min_seq, h.max_seq) == (3, 23, 1, 1, 23)
    assert [b.count for b in seg.blocks] == [8, 8, 7]
    rows = list(seg.rows())
    assert [r.seq for r in rows] == list(range(1, 24))
    assert all(r.witnessed_at == 1_750_000_000_000_000 + r.seq and r.indexed_at == 0 for r in rows)
    assert all(r.kind == KIND_CREATE and r.did == CORPUS_DID for r in rows)
    # the payloads hash to the CIDs indigo's goat listed for the same repository
    assert {f"{r.collection}/{r.rkey}": str(CID.for_dag_cbor(r.payload)) for r in rows} == CORPUS_RECORD_CIDS
    index = seg.collection_index()
    assert index.names == ["app.bsky.actor.profile", "app.bsky.feed.like", "app.bsky.feed.post",
                           "app.bsky.feed.repost", "app.bsky.graph.follow"]
    assert index.counts == [1, 10, 6, 3, 3]
    assert index.blocks == [[0, 1], [1, 2], [2, 3, 4]]
    assert CORPUS_DID in seg.did_bloom()
    assert all(CORPUS_DID in b for b in seg.block_blooms())


def test_writer_reproduces_the_go_writers_metadata() -> None:
    golden = Segment(GOLDEN_CORPUS_SEGMENT)
    ours = Segment(_segment_bytes(list(golden.rows()), per_block=8))
    assert ours.verify() == []
    # blooms are bit for bit the Go code's (gloom v0.1.0); zstd frames are only equivalent
    assert _footer(ours) == _footer(golden)
    assert ours.collection_index() == golden.collection_index()
    strip = [(b.usize, b.count, b.min_seq, b.max_seq, b.min_witnessed_at, b.max_witnessed_at) for b in golden.blocks]
    assert [(b.usize, b.count, b.min_seq, b.max_seq, b.min_witnessed_at, b.max_witnessed_at)
            for b in ours.blocks] == strip
    for i in range(3):
        assert decompress_block(ours.frame(i)) == decompress_block(golden.frame(i))
    g, o = golden.header, ours.header
    assert (g.block_count, g.event_count, g.unique_dids, g.min_seq, g.max_seq, g.min_witnessed_at,
            g.max_witnessed_at) == (o.block_count, o.event_count, o.unique_dids, o.min_seq, o.max_seq,
                                    o.min_witnessed_at, o.max_witnessed_at)


def test_golden_seal_rows_and_blooms() -> None:
    seg = Segment(GOLDEN_SEAL)
    assert seg.verify() == []
    assert list(seg.rows()) == [
        Row(1, 100, 0, KIND_CREATE, "app.bsky.feed.post", "did:plc:a", "k1", "v1", b"p1"),
        Row(2, 200, 250, KIND_CREATE, "app.bsky.feed.like", "did:plc:b", "k2", "v2", b"p2"),
    ]
    assert list(seg.rows())[1].time_us == 250
    ours = Segment(_segment_bytes(list(seg.rows()), per_block=2))
    assert _footer(ours) == _footer(seg)


def test_golden_block() -> None:
    rows = list(decode_block(GOLDEN_BLOCK).rows())
    assert rows == [
        Row(1, 1_700_000_000_000_000, 0, KIND_CREATE, "app.bsky.feed.post", "did:plc:abcdefghijklmnopqrstuvwx",
            "3l3qo2vuowo2b", "3l3qo2vutsw2b", bytes([0xA1, 0x65, 0x68, 0x65, 0x6C, 0x6C, 0x6F, 0x05])),
        Row(2, 1_700_000_001_000_000, 1_700_000_000_500_000, KIND_IDENTITY, "", "did:web:example.com", "", "", b""),
        Row(3, 1_700_000_002_000_000, 0, KIND_DELETE, "app.bsky.feed.like", "did:plc:zzzzzzzzzzzzzzzzzzzzzzzz",
            "3l3qo2vuowo2c", "3l3qo2vutsw2c", b""),
    ]
    # the uncompressed body is exactly what our encoder writes for the same rows
    assert encode_block(rows) == zstandard.ZstdDecompressor().decompress(GOLDEN_BLOCK)


def test_bloom_params_and_crc_match_gloom() -> None:
    assert bloom_params(1) == (1, 15)       # the golden segment's blooms
    assert bloom_params(4096) == (131, 9)   # the Go repository's legacy fixed-capacity blooms
    assert crc32c(b"123456789") == 0xE3069283
    bloom = Bloom.for_items(100)
    for i in range(100):
        bloom.add(f"did:plc:{i}")
    parsed = Bloom.parse(bloom.encode())
    assert all(f"did:plc:{i}" in parsed for i in range(100))
    assert sum(f"did:plc:x{i}" in parsed for i in range(2000)) < 20  # ~0.1 % false positives
    broken = bytearray(bloom.encode())
    broken[30] ^= 1
    with pytest.raises(SegmentError, match="CRC"):
        Bloom.parse(bytes(broken))


# --- round trips ------------------------------------------------------------------------------------

def test_round_trip_every_kind_empty_blocks_and_unicode() -> None:
    rows = [
        _row(10, KIND_CREATE, payload=b"\xa1ax\x01"),
        _row(11, KIND_UPDATE, indexed=5),
        _row(12, KIND_DELETE, payload=b""),
        _row(13, KIND_IDENTITY, collection="", rkey="", rev="", payload=b"\xa0"),
        _row(14, KIND_ACCOUNT, collection="", rkey="", rev="", did="did:web:ex\u00e9mple.com"),
        _row(15, KIND_SYNC, collection="", rkey="", rev="3s"),
        _row(16, KIND_RESYNC_CREATE, rkey="r\u00e9sum\u00e9"),
    ]
    out = io.BytesIO()
    w = SegmentWriter(out, max_rows_per_block=3)
    w.append_empty_block()
    for r in rows:
        w.append(r)
    w.append_empty_block()
    header = w.close()
    seg = Segment(out.getvalue())
    assert seg.verify() == []
    assert seg.header == header
    assert [b.count for b in seg.blocks] == [0, 3, 3, 1, 0]
    assert list(seg.rows()) == rows
    assert len(seg.block(0)) == 0
    assert (header.min_seq, header.max_seq, header.event_count, header.unique_dids) == (10, 16, 7, 2)
    index = seg.collection_index()
    assert "$identity" in index.names and "$account" in index.names and "$sync" in index.names
    assert index.counts[index.names.index("$sync")] == 0  # sentinels mark blocks, they count nothing
    assert index.counts[index.names.index("app.bsky.feed.post")] == 4


def test_empty_segment() -> None:
    seg = Segment(_segment_bytes([]))
    assert seg.verify() == []
    assert seg.blocks == [] and list(seg.rows()) == []


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)


@st.composite
def _rows(draw: st.DrawFn) -> list[Row]:
    n = draw(st.integers(0, 40))
    seqs = sorted(draw(st.sets(st.integers(0, 2**64 - 1), min_size=n, max_size=n)))
    out = []
    for seq in seqs:
        out.append(Row(seq, draw(st.integers(-(2**63), 2**63 - 1)), draw(st.integers(-(2**63), 2**63 - 1)),
                       draw(st.integers(1, 7)), draw(_text), draw(_text), draw(_text), draw(_text),
                       draw(st.binary(max_size=64))))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows(), per_block=st.integers(1, 9))
def test_round_trip_property(rows: list[Row], per_block: int) -> None:
    seg = Segment(_segment_bytes(rows, per_block))
    assert list(seg.rows()) == rows
    assert seg.verify() == []
    assert seg.header.event_count == len(rows)
    assert seg.header.unique_dids == len({r.did for r in rows if r.did})
    for info in seg.blocks:
        assert list(decode_block(seg.frame(info.index)).rows()) == rows[info.index * per_block:
                                                                       (info.index + 1) * per_block]


# --- corruption: always a typed error ----------------------------------------------------------------

def _sample() -> bytes:
    rows = [_row(i, (i % 7) + 1, did=f"did:plc:u{i % 5}") for i in range(1, 40)]
    return _segment_bytes(rows, per_block=8)


def _read_all(data: bytes) -> None:
    seg = Segment(data)
    seg.verify()
    for _ in seg.rows():
        pass


def test_header_corruption() -> None:
    data = _sample()
    with pytest.raises(SegmentHeaderError, match="magic"):
        Segment(b"jss1" + data[4:])
    with pytest.raises(ActiveSegmentError):
        Segment(data[:4] + bytes(8) + data[12:])
    with pytest.raises(SegmentHeaderError, match="version"):
        Segment(data[:12] + struct.pack("<H", 2) + data[14:])
    with pytest.raises(SegmentHeaderError, match="shorter"):
        Segment(data[:100])
    footer = struct.unpack_from("<Q", data, 58)[0]
    with pytest.raises(SegmentHeaderError, match="block_index_offset"):
        Segment(data[:90] + struct.pack("<Q", footer + 1) + data[98:])
    with pytest.raises(SegmentHeaderError, match="past the end"):
        Segment(data[:82] + struct.pack("<Q", len(data) + 10) + data[90:])
    with pytest.raises(SegmentHeaderError, match="block_count"):
        Segment(data[:14] + struct.pack("<I", 1 << 21) + data[18:])


def test_block_index_corruption() -> None:
    data = bytearray(_sample())
    seg = Segment(bytes(data))
    entry = seg.header.block_index_offset + 52  # the second block's entry
    bad = bytearray(data)
    struct.pack_into("<Q", bad, entry, seg.blocks[0].offset)  # overlaps the first block
    with pytest.raises(BlockIndexError, match="overlaps"):
        Segment(bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<Q", bad, entry, seg.header.footer_offset)
    with pytest.raises(BlockIndexError, match="outside"):
        Segment(bytes(bad))
    bad = bytearray(data)
    struct.pack_into("<Q", bad, entry + 20, seg.blocks[0].min_seq)  # min_seq back inside block 0
    with pytest.raises(BlockIndexError, match="previous"):
        Segment(bytes(bad))
    # an index entry whose count disagrees with its block: caught when the block is read
    bad = bytearray(data)
    struct.pack_into("<I", bad, entry + 16, seg.blocks[1].count + 1)
    corrupt = Segment(bytes(bad))
    with pytest.raises(BlockIndexError, match="holds"):
        corrupt.block(1)
    # and the checksum over the metadata notices the edit
    with pytest.raises(ChecksumMismatchError):
        corrupt.verify_checksum()
    assert [p.what for p in corrupt.verify()][:1] == ["segment_checksum"]


def test_checksum_mismatch_is_named() -> None:
    data = bytearray(_sample())
    data[-1] ^= 0xFF  # the collection index's last byte: covered by the segment checksum
    seg = Segment(bytes(data))
    problems = seg.verify()
    assert "segment_checksum" in [p.what for p in problems]


def test_block_content_checksum_mismatch() -> None:
    data = bytearray(_sample())
    seg = Segment(bytes(data))
    info = seg.blocks[2]
    data[info.frame_end - 1] ^= 0x01  # the frame's content checksum (its last 4 bytes)
    corrupt = Segment(bytes(data))
    with pytest.raises(BlockChecksumError):
        corrupt.block(2)
    problems = corrupt.verify()
    assert [(p.what, p.block) for p in problems] == [("block_checksum", 2)]
    corrupt.verify_checksum()  # blocks are outside the segment checksum


def test_block_without_checksum_or_with_trailing_bytes() -> None:
    body = encode_block([_row(1)])
    with pytest.raises(BlockChecksumError, match="no content checksum"):
        decompress_block(zstandard.ZstdCompressor(write_checksum=False).compress(body))
    framed = zstandard.ZstdCompressor(write_checksum=True).compress(body)
    assert decompress_block(framed + b"xx") == body  # the fast path ignores what follows the frame
    with pytest.raises(BlockDecompressError, match="after"):
        decompress_block(framed + b"xx", strict=True)
    with pytest.raises(BlockDecompressError):
        decompress_block(framed[:-6])
    with pytest.raises(BlockDecompressError):
        decompress_block(b"not zstd at all")
    with pytest.raises(BlockDecompressError, match="says"):
        decompress_block(framed, expected_size=len(body) + 1)


def test_oversize_blocks_are_refused_before_allocating() -> None:
    big = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(1 << 20))
    with pytest.raises(BlockTooLargeError) as e:
        decompress_block(big, max_size=1000)
    assert e.value.reason == "oversize"
    # a frame whose header lies about a huge size: refused from the header alone
    lying = bytearray(zstandard.ZstdCompressor(write_checksum=True, write_content_size=True).compress(bytes(100)))
    params = zstandard.get_frame_parameters(bytes(big))
    assert params.content_size == 1 << 20
    with pytest.raises(BlockTooLargeError):
        decompress_block(big, max_size=(1 << 20) - 1)
    unsized = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(bytes(1 << 20))
    with pytest.raises(BlockTooLargeError):
        decompress_block(unsized, max_size=1000)
    assert len(decompress_block(unsized)) == 1 << 20
    assert decompress_block(bytes(lying)) == bytes(100)
    with pytest.raises(BlockTooLargeError):
        decompress_block(bytes(lying), max_size=100, expected_size=1 << 40)


def test_parse_block_bounds() -> None:
    with pytest.raises(BlockFormatError, match="cap"):
        parse_block(struct.pack("<I", MAX_BLOCK_EVENTS + 1) + bytes(64))
    with pytest.raises(BlockFormatError, match="cannot hold"):
        parse_block(struct.pack("<I", 1000) + bytes(64))
    with pytest.raises(BlockFormatError, match="too short"):
        parse_block(b"\x00")
    assert len(parse_block(bytes(4))) == 0
    with pytest.raises(BlockFormatError, match="trailing"):
        parse_block(bytes(5))
    body = encode_block([_row(1), _row(2)])
    with pytest.raises(BlockFormatError, match="add up"):
        parse_block(body + b"x")
    with pytest.raises(BlockFormatError, match="add up"):
        parse_block(body[:-1])
    bad_utf8 = bytearray(body)
    did_at = bytes(body).index(b"did:plc:alice")
    bad_utf8[did_at] = 0xFF
    with pytest.raises(BlockFormatError, match="UTF-8"):
        parse_block(bytes(bad_utf8))


def test_unknown_kind() -> None:
    body = bytearray(encode_block([_row(1), _row(2)]))
    body[4 + 2 * 24 + 1] = 9  # the second row's kind
    with pytest.raises(UnknownKindError) as e:
        parse_block(bytes(body))
    assert e.value.reason == "unknown_event"
    body[4 + 2 * 24 + 1] = 0
    with pytest.raises(UnknownKindError):
        parse_block(bytes(body))
    with pytest.raises(UnknownKindError):
        encode_block([_row(1, 8)])
    w = SegmentWriter(io.BytesIO())
    with pytest.raises(UnknownKindError):
        w.append(_row(1, 0))


def test_writer_refuses_bad_rows() -> None:
    w = SegmentWriter(io.BytesIO())
    w.append(_row(5))
    with pytest.raises(SegmentError, match="not above"):
        w.append(_row(5))
    with pytest.raises(SegmentError, match="column"):
        encode_block([_row(6, collection="x" * 256)])
    with pytest.raises(SegmentError, match="range"):
        w.append(_row(6, witnessed=2**63))
    w.close()
    with pytest.raises(SegmentError, match="closed"):
        w.append(_row(7))


def test_every_truncation_is_a_typed_error() -> None:
    data = _sample()
    for cut in range(0, len(data), 7):
        try:
            seg = Segment(data[:cut])
        except SegmentError:
            continue
        assert seg.verify() != []  # past the header checks, verification names what is missing


def _parse_both(body: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """parse_block of ``body`` through the native column split and through Python alone: the block,
    or the type and message of the error."""
    def parse() -> object:
        try:
            return parse_block(body)
        except SegmentError as e:
            return type(e), str(e)

    fast = parse()
    with monkeypatch.context() as m:
        m.setattr(native, "NATIVE", None)
        return fast, parse()


@pytest.mark.skipif(native.NATIVE is None, reason="the native extension is not built")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(rows=_rows(), flips=st.lists(st.tuples(st.integers(0, 10**5), st.integers(1, 255)), max_size=3),
       cut=st.integers(0, 8), tail=st.binary(max_size=2))
def test_native_column_split_parses_as_python_does(rows: list[Row], flips: list[tuple[int, int]], cut: int,
                                                   tail: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole blocks (non-ASCII text, empty values), blocks with flipped bytes (lengths overrunning
    the block, invalid UTF-8), truncated ones and ones with bytes left over: the same block or the
    same error."""
    body = bytearray(encode_block(rows))
    for pos, mask in flips:
        body[pos % len(body)] ^= mask
    body = body[:len(body) - cut] if cut < len(body) else body
    fast, python = _parse_both(bytes(body) + tail, monkeypatch)
    assert fast == python
    if not flips and not cut and not tail:
        assert isinstance(fast, Block) and list(fast.rows()) == rows


@settings(max_examples=300, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_random_corruption_is_a_typed_error(flips: list[tuple[int, int]]) -> None:
    data = bytearray(_sample())
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    reason = None
    try:
        _read_all(bytes(data))
    except SegmentError as e:
        reason = e.reason
    assert reason is None or reason in DROP_REASONS


def test_error_tree() -> None:
    for cls in (SegmentHeaderError, ActiveSegmentError, BlockIndexError, ChecksumMismatchError, BlockFormatError,
                UnknownKindError, BlockDecompressError, BlockChecksumError, BlockTooLargeError):
        assert issubclass(cls, SegmentError) and issubclass(cls, AtprotoFormatError)
        assert cls.reason in DROP_REASONS
    assert HEADER_SIZE == 256


# --- the SDK's reader on our segments ---------------------------------------------------------------

def test_sdk_reader_agrees_on_our_segments() -> None:
    sdk = pytest.importorskip("atproto_jetstream.archive.segment")
    rows = [_row(i, (i % 7) + 1, did=f"did:plc:u{i % 5}", payload=b"" if i % 7 == 2 else b"\xa1ax\x01")
            for i in range(1, 60)]
    data = _segment_bytes(rows, per_block=16)
    seg = Segment(data)
    header = sdk.read_sealed_header(data)
    assert (header.block_count, header.event_count, header.footer_offset) == (
        seg.header.block_count, seg.header.event_count, seg.header.footer_offset)
    theirs = []
    for info in seg.blocks:
        theirs += sdk.decode_block(bytes(seg.frame(info.index)))
    assert [(e.seq, e.witnessed_at, e.indexed_at, e.kind, e.collection, e.did, e.rkey, e.rev, e.payload or b"")
            for e in theirs] == [tuple(r) for r in rows]
    # the SDK does not know kind 7 (resync-create) as a commit: it would drop or misreport those rows
    resync = [e for e in theirs if e.kind == KIND_RESYNC_CREATE]
    assert resync and all(not e.is_commit and e.operation is None for e in resync)

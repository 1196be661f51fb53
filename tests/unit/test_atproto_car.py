"""CAR v1 reading (in memory and from disk) and writing, on the real export and firehose slices."""

from __future__ import annotations

import io
from pathlib import Path

import libipld
import pytest

from runtime.atproto._varint import encode_uvarint, read_uvarint
from runtime.atproto.car import CarWriter, open_car, read_car, write_car
from runtime.atproto.cid import CID
from runtime.atproto.dagcbor import encode
from runtime.atproto.errors import BlockMismatchError, CarError, CarTooLargeError

from .atproto_corpus import commit_bodies, fixture_path, repo_car_bytes


def _blocks(n: int, size: int = 40) -> list[tuple[CID, bytes]]:
    out = []
    for i in range(n):
        block = encode({"i": i, "pad": "x" * size})
        out.append((CID.for_dag_cbor(block), block))
    return out


def _section_ends(data: bytes) -> list[int]:
    """Offsets at which the CAR's header and each section end."""
    ends = []
    pos = 0
    while pos < len(data):
        length, pos = read_uvarint(data, pos)
        pos += length
        ends.append(pos)
    return ends


def test_reads_the_real_repo_export() -> None:
    data = repo_car_bytes()
    car = read_car(data)
    header, blocks = libipld.decode_car(data)
    assert [r.raw for r in car.roots] == header["roots"]
    assert len(car.blocks) == len(blocks) == 29
    assert {c.raw for c in car.blocks} == set(blocks)
    for cid, block in car.blocks.items():
        assert libipld.decode_dag_cbor(block) == blocks[cid.raw]
    assert car.get(car.root) is not None
    # Writing the same roots and blocks back gives the file byte for byte.
    assert write_car(car.roots, car.blocks.items()) == data


def test_reads_every_firehose_blocks_slice() -> None:
    bodies = commit_bodies()
    assert len(bodies) == 148
    for body in bodies:
        car = read_car(body["blocks"])
        assert car.roots[0] == CID.from_bytes(body["commit"])
        assert car.root in car.blocks


def test_verify_catches_a_corrupted_block() -> None:
    cid, block = _blocks(1)[0]
    bad = write_car([cid], [(cid, block[:-1] + b"y")])
    with pytest.raises(BlockMismatchError):
        read_car(bad)
    assert read_car(bad, verify=False).blocks[cid].endswith(b"y")


def test_every_truncation_fails_with_a_car_error() -> None:
    data = repo_car_bytes()
    boundaries = set(_section_ends(data))
    for cut in range(0, len(data), 7):
        if cut in boundaries:
            assert read_car(data[:cut]) is not None  # a cut between sections is a shorter, valid CAR
            continue
        with pytest.raises(CarError):
            read_car(data[:cut])
    small = write_car([_blocks(1)[0][0]], _blocks(2))
    small_ends = set(_section_ends(small))
    for cut in range(len(small)):
        if cut in small_ends:  # a cut exactly between sections is a valid, shorter CAR
            assert len(read_car(small[:cut]).blocks) < 2
            continue
        with pytest.raises(CarError, match=r"\w"):
            read_car(small[:cut])


def test_truncation_message_is_clear() -> None:
    data = repo_car_bytes()
    with pytest.raises(CarError, match=r"truncated CAR: section at offset \d+ needs \d+ bytes"):
        read_car(data[:-10])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x80",  # unterminated varint
        encode_uvarint(3) + b"\xa0",  # header shorter than declared
        encode_uvarint(1) + b"\xa0",  # header without version or roots
        encode_uvarint(len(encode({"roots": [], "version": 2}))) + encode({"roots": [], "version": 2}),
        encode_uvarint(len(encode({"roots": [1], "version": 1}))) + encode({"roots": [1], "version": 1}),
        encode_uvarint(len(encode([1]))) + encode([1]),
        encode_uvarint(0),
    ],
)
def test_bad_headers(data: bytes) -> None:
    with pytest.raises(CarError):
        read_car(data)


def test_bad_sections() -> None:
    header = write_car([], [])
    with pytest.raises(CarError, match="bad CID"):
        read_car(header + encode_uvarint(4) + b"\x12\x20\x00\x00")
    cid = CID.for_dag_cbor(b"x")
    with pytest.raises(CarError, match="shorter than its CID"):
        read_car(header + encode_uvarint(10) + cid.raw, verify=False)
    with pytest.raises(CarError, match="more than 1 blocks"):
        read_car(write_car([], _blocks(2)), max_blocks=1)


def test_duplicate_blocks_are_kept_once() -> None:
    blocks = _blocks(2)
    car = read_car(write_car([blocks[0][0]], [*blocks, blocks[0]]))
    assert len(car.blocks) == 2


def test_streaming_writer_matches_write_car() -> None:
    blocks = _blocks(10)
    buf = io.BytesIO()
    writer = CarWriter(buf, [blocks[0][0]])
    writer.write_blocks(blocks)
    assert buf.getvalue() == write_car([blocks[0][0]], blocks)
    assert writer.bytes_written == len(buf.getvalue())


def test_open_car_reads_the_real_export_from_disk() -> None:
    in_memory = read_car(repo_car_bytes())
    with open_car(fixture_path("repo.car")) as car:
        assert car.roots == in_memory.roots
        assert car.root == in_memory.root
        assert len(car) == len(in_memory.blocks)
        assert set(car.cids()) == set(in_memory.blocks)
        for cid, block in in_memory.blocks.items():
            assert cid in car
            assert car.get(cid) == block
        assert car.get(CID.for_dag_cbor(b"absent")) is None
    with pytest.raises(ValueError, match="closed"):
        car.get(in_memory.root)


def test_open_car_handles_blocks_larger_than_its_read_chunk(tmp_path: Path) -> None:
    big = [(CID.for_raw(b), b) for b in (bytes([i]) * 1_500_000 for i in range(3))]
    blocks = [*_blocks(5), *big, *_blocks(5, size=10)]
    path = tmp_path / "big.car"
    with path.open("wb") as f:
        CarWriter(f, [blocks[0][0]]).write_blocks(blocks)
    for verify in (True, False):
        with open_car(path, verify=verify) as car:
            assert len(car) == len(blocks)
            for cid, block in blocks:
                assert car.get(cid) == block


def test_open_car_caps_and_errors(tmp_path: Path) -> None:
    blocks = _blocks(20)
    data = write_car([blocks[0][0]], blocks)
    path = tmp_path / "repo.car"
    path.write_bytes(data)
    with pytest.raises(CarError, match="exceeds the cap"):
        open_car(path, max_bytes=len(data) - 1)
    with open_car(path, max_bytes=len(data)) as car:
        assert len(car) == 20
    path.write_bytes(data[:-7])
    for verify in (True, False):
        with pytest.raises(CarError, match="truncated"):
            open_car(path, verify=verify)
    corrupt = bytearray(data)
    corrupt[-3] ^= 1
    path.write_bytes(bytes(corrupt))
    with pytest.raises(BlockMismatchError):
        open_car(path)
    with open_car(path, verify=False) as car:
        assert len(car) == 20
    path.write_bytes(b"")
    with pytest.raises(CarError, match="empty"):
        open_car(path)


def test_block_caps_are_oversize_just_over_them(tmp_path: Path) -> None:
    blocks = _blocks(30)
    data = write_car([blocks[0][0]], blocks)
    path = tmp_path / "repo.car"
    path.write_bytes(data)
    assert len(read_car(data, max_blocks=30).blocks) == 30
    with open_car(path, max_blocks=30) as car:
        assert len(car) == 30
    with pytest.raises(CarTooLargeError, match="more than 29 blocks") as info:
        read_car(data, max_blocks=29)
    assert info.value.reason == "oversize"
    with pytest.raises(CarTooLargeError, match="more than 29 blocks") as info:
        open_car(path, max_blocks=29)
    assert info.value.reason == "oversize"
    with pytest.raises(CarTooLargeError, match="exceeds the cap"):
        open_car(path, max_bytes=len(data) - 1)

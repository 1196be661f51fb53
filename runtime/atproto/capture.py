"""The capture format of relay frames: length-prefixed frames, optionally one zstd stream."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

import zstandard

_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_LEN: Final = struct.Struct("<I")

class CaptureError(ValueError):
    """A capture file that is truncated or not in the ``[u32 LE length][frame]`` format."""


def split_capture(data: bytes) -> Iterator[bytes]:
    """The frames of an uncompressed capture (records of ``[u32 little-endian length][frame]``).

    Raises:
        CaptureError: a record runs past the end of the data.
    """
    pos = 0
    end = len(data)
    while pos < end:
        if pos + 4 > end:
            raise CaptureError(f"truncated length prefix at offset {pos}")
        (n,) = _LEN.unpack_from(data, pos)
        pos += 4
        if pos + n > end:
            raise CaptureError(f"frame at offset {pos - 4} claims {n} bytes, only {end - pos} left")
        yield data[pos:pos + n]
        pos += n


def read_capture_bytes(path: str | Path) -> bytes:
    """A capture file's records, decompressed when the file is zstd (by its magic, not its name)."""
    data = Path(path).read_bytes()
    if data[:4] == _ZSTD_MAGIC:
        with zstandard.ZstdDecompressor().stream_reader(data) as reader:
            return reader.read()
    return data


def read_capture(path: str | Path) -> list[bytes]:
    """Every frame of a capture file (zstd-compressed or not).

    Raises:
        CaptureError: the file is truncated.
        OSError: it cannot be read.
    """
    return list(split_capture(read_capture_bytes(path)))


def write_capture(frames: Iterable[bytes], path: str | Path, *, compress: bool = True) -> int:
    """Write frames as a capture file (zstd-compressed when ``compress``); returns the frame count."""
    out = bytearray()
    n = 0
    for frame in frames:
        out += _LEN.pack(len(frame))
        out += frame
        n += 1
    data = zstandard.ZstdCompressor(level=3).compress(bytes(out)) if compress else bytes(out)
    Path(path).write_bytes(data)
    return n


# ----------------------------------------------------------------------------------------- frames



"""Unsigned LEB128 varints as the multiformats spec defines them (CIDs, multicodecs, CAR sections).

The spec caps a varint at 9 bytes (63 bits) and requires the minimal encoding; both are enforced so
that one value has exactly one byte form.
"""

from __future__ import annotations

__all__ = ["VarintError", "encode_uvarint", "read_uvarint"]

_MAX_VARINT_BYTES = 9


class VarintError(Exception):
    """A varint that is truncated, too long or not minimally encoded (wrapped by the callers)."""


def read_uvarint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Read one unsigned varint.

    Args:
        data: the buffer.
        pos: where the varint starts.

    Returns:
        ``(value, position after the varint)``.

    Raises:
        VarintError: truncated, longer than 9 bytes, or not minimal.
    """
    end = len(data)
    if pos < end:
        first = data[pos]
        if first < 0x80:  # the common single-byte case
            return first, pos + 1
    value = 0
    shift = 0
    start = pos
    while True:
        if pos >= end:
            raise VarintError("truncated varint")
        if pos - start >= _MAX_VARINT_BYTES:
            raise VarintError("varint longer than 9 bytes")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and pos - start > 1:
                raise VarintError("varint not minimally encoded")
            return value, pos
        shift += 7


def encode_uvarint(value: int) -> bytes:
    """Encode a non-negative integer below 2**63 as a minimal unsigned varint."""
    if value < 0 or value >= 1 << 63:
        raise ValueError(f"varint out of range: {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)

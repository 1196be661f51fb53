"""Timestamp identifiers (TIDs): record keys and repository revisions (``rev``).

A TID is a 64-bit integer (top bit 0, then 53 bits of microseconds since the UNIX epoch, then a
10-bit clock id) written as 13 characters of base32-sortable (``234567a-z``), so string order is
time order. Syntax checks follow the spec's pattern (first character ``234567a-j``), which admits
any 64-bit value; TIDs made here keep the top bit 0 (first character at most ``b``).
:class:`TidClock` issues strictly increasing TIDs from an injected clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from runtime.atproto.errors import TIDError

__all__ = [
    "MAX_CLOCK_ID",
    "MAX_TIME_US",
    "TidClock",
    "int_to_tid",
    "is_valid_tid",
    "make_tid",
    "parse_tid",
    "tid_to_int",
    "tid_to_time_us",
    "validate_tid",
]

_ALPHABET: Final = "234567abcdefghijklmnopqrstuvwxyz"
#: The TID alphabet mapped onto ``int(..., 32)``'s digits (0-9, a-v), digit for digit.
_TO_BASE32: Final = str.maketrans(_ALPHABET, "0123456789abcdefghijklmnopqrstuv")
_TID_RE: Final = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")
_LEN: Final = 13
_CLOCK_BITS: Final = 10

#: Largest clock identifier (10 bits).
MAX_CLOCK_ID: Final = (1 << _CLOCK_BITS) - 1
#: Largest timestamp a TID can hold (53 bits of microseconds).
MAX_TIME_US: Final = (1 << 53) - 1


def is_valid_tid(text: str) -> bool:
    """Whether ``text`` is a syntactically valid TID."""
    return type(text) is str and _TID_RE.fullmatch(text) is not None


def validate_tid(text: str) -> str:
    """Return ``text`` if it is a valid TID; raise :class:`TIDError` otherwise."""
    if not is_valid_tid(text):
        raise TIDError(f"invalid TID {text!r}")
    return text


def int_to_tid(value: int) -> str:
    """Encode an integer below 2**64 as a TID string (TIDs made by :func:`make_tid` stay below 2**63)."""
    if not 0 <= value < 1 << 64:
        raise TIDError(f"TID integer out of range: {value}")
    chars = []
    for _ in range(_LEN):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def tid_to_int(text: str) -> int:
    """Decode a TID string to its integer. Raises :class:`TIDError`."""
    validate_tid(text)
    return int(text.translate(_TO_BASE32), 32)


def make_tid(time_us: int, clock_id: int = 0) -> str:
    """The TID for a timestamp (microseconds since the epoch) and a clock id (0..1023)."""
    if not 0 <= time_us <= MAX_TIME_US:
        raise TIDError(f"timestamp out of range: {time_us}")
    if not 0 <= clock_id <= MAX_CLOCK_ID:
        raise TIDError(f"clock id out of range: {clock_id}")
    return int_to_tid((time_us << _CLOCK_BITS) | clock_id)


def parse_tid(text: str) -> tuple[int, int]:
    """Split a TID into ``(microseconds since the epoch, clock id)``. Raises :class:`TIDError`."""
    value = tid_to_int(text)
    return value >> _CLOCK_BITS, value & MAX_CLOCK_ID


def tid_to_time_us(text: str) -> int:
    """The timestamp of a TID in microseconds since the epoch. Raises :class:`TIDError`."""
    return tid_to_int(text) >> _CLOCK_BITS


class TidClock:
    """Issues strictly increasing TIDs from an injected microsecond clock.

    If the clock stalls or steps back, the next TID is the previous timestamp plus one microsecond,
    so revisions never repeat or regress.
    """

    def __init__(self, clock_us: Callable[[], int], clock_id: int = 0) -> None:
        """Args:
        clock_us: returns the current time in microseconds since the epoch.
        clock_id: the 10-bit clock identifier written into every TID.
        """
        if not 0 <= clock_id <= MAX_CLOCK_ID:
            raise TIDError(f"clock id out of range: {clock_id}")
        self._clock_us = clock_us
        self._clock_id = clock_id
        self._last_us = -1

    def next(self) -> str:
        """A TID greater than every TID issued or observed before."""
        now = self._clock_us()
        self._last_us = max(now, self._last_us + 1)
        return make_tid(self._last_us, self._clock_id)

    def observe(self, tid: str) -> None:
        """Make later TIDs sort after ``tid`` (e.g. a repo's current ``rev``)."""
        self._last_us = max(self._last_us, tid_to_time_us(tid))

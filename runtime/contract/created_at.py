"""Seed 002's timestamp policy for a record's ``createdAt``, shared by the repo producer and the sinks.

A record's ``createdAt`` is validated against an optional ``[start, end)`` range. Records outside it
(or with an unparseable ``createdAt``) are kept as they are, dropped, or given the seed's
standardized timestamp: the 1st or the 15th of the record's month (00:00:00 UTC), whichever is the
latest not after the record's own date; an unparseable date standardizes to the range start.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final

from runtime.errors import ConfigError


class OutOfRange(StrEnum):
    """What to do with a record whose createdAt is outside the range or unparseable."""

    KEEP = "keep"
    DROP = "drop"
    STANDARDIZE = "standardize"


class Outcome(StrEnum):
    """What happened to one record's timestamp (the metric label)."""

    IN_RANGE = "in_range"
    KEPT = "kept"
    DROPPED = "dropped"
    STANDARDIZED = "standardized"


OUTCOMES: Final = tuple(o.value for o in Outcome)


def parse_created_at(value: str | None) -> datetime | None:
    """Parse an atproto datetime (RFC 3339 / ISO 8601, ``Z`` or offset); None when unparseable."""
    if not value or not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def standardized(dt: datetime) -> datetime:
    """The seed's standardized timestamp: the 1st or 15th of ``dt``'s month, not after ``dt``."""
    day = 15 if dt.day >= 15 else 1
    return datetime(dt.year, dt.month, day, tzinfo=UTC)


@dataclass(frozen=True)
class TimestampPolicy:
    """A ``[start, end)`` range on createdAt (either bound optional) and the out-of-range action."""

    start: datetime | None = None
    end: datetime | None = None
    out_of_range: OutOfRange = OutOfRange.KEEP

    def __post_init__(self) -> None:
        if self.start and self.end and self.end <= self.start:
            raise ConfigError("the createdAt range end must be after its start")

    @property
    def active(self) -> bool:
        """True when a range is set."""
        return self.start is not None or self.end is not None

    def apply(self, created_at: str | None) -> tuple[Outcome, datetime | None]:
        """Classify one record.

        Returns:
            ``(outcome, timestamp)``: the timestamp to store (parsed createdAt, standardized one, or
            None when unparseable and kept); for ``DROPPED`` the record must not be written.
        """
        dt = parse_created_at(created_at)
        if not self.active:
            return Outcome.IN_RANGE if dt is not None else Outcome.KEPT, dt
        inside = dt is not None and (self.start is None or dt >= self.start) and (self.end is None or dt < self.end)
        if inside:
            return Outcome.IN_RANGE, dt
        if self.out_of_range is OutOfRange.DROP:
            return Outcome.DROPPED, None
        if self.out_of_range is OutOfRange.STANDARDIZE:
            base = dt if dt is not None else self.start
            return Outcome.STANDARDIZED, standardized(base) if base is not None else None
        return Outcome.KEPT, dt

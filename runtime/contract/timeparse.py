"""Parsing of the seeds' timestamp formats and conversions to unix microseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from runtime.errors import ConfigError

_FORMATS = ("%Y-%m-%d-%H:%M:%S", "%Y-%m-%d")


def parse_timestamp(value: str) -> datetime:
    """Parse ``YYYY-MM-DD``, ``YYYY-MM-DD-HH:MM:SS`` (UTC) or ISO 8601 into an aware datetime.

    Raises:
        ConfigError: the value is none of those forms.
    """
    text = value.strip()
    for fmt in _FORMATS:
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    try:
        iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
        dt = datetime.fromisoformat(iso)
    except ValueError as e:
        raise ConfigError(
            f"invalid timestamp {value!r}: use YYYY-MM-DD, YYYY-MM-DD-HH:MM:SS (UTC) or ISO 8601"
        ) from e
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def to_us(dt: datetime) -> int:
    """Unix microseconds of an aware datetime."""
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    """Aware UTC datetime of unix microseconds."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def timestamp_us(value: str) -> int:
    """Parse a timestamp string (see :func:`parse_timestamp`) straight to unix microseconds."""
    return to_us(parse_timestamp(value))


def us_to_date(us: int) -> str:
    """``YYYY-MM-DD`` of unix microseconds (the seeds' ``current_date``)."""
    return from_us(us).strftime("%Y-%m-%d")


def us_to_iso(us: int) -> str:
    """ISO 8601 with a ``Z`` of unix microseconds."""
    return from_us(us).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

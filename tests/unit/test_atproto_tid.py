"""Timestamp identifiers: syntax, encoding, ordering, and the monotonic clock."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from runtime.atproto.errors import TIDError
from runtime.atproto.tid import (
    MAX_CLOCK_ID,
    MAX_TIME_US,
    TidClock,
    int_to_tid,
    is_valid_tid,
    make_tid,
    parse_tid,
    tid_to_int,
    tid_to_time_us,
    validate_tid,
)

from .atproto_corpus import commit_bodies, manifest


@pytest.mark.parametrize(
    "tid", ["3jzfcijpj2z2a", "7777777777777", "3zzzzzzzzzzzz", "2222222222222", "jzzzzzzzzzzzz"]
)
def test_valid_tids(tid: str) -> None:
    assert is_valid_tid(tid)
    assert validate_tid(tid) == tid
    assert int_to_tid(tid_to_int(tid)) == tid


@pytest.mark.parametrize(
    "tid",
    [
        "3jzfcijpj2z21",
        "0000000000000",
        "3JZFCIJPJ2Z2A",
        "3jzfcijpj2z2aa",
        "3jzfcijpj2z2",
        "kzzzzzzzzzzzz",
        "",
    ],
)
def test_invalid_tids(tid: str) -> None:
    assert not is_valid_tid(tid)
    with pytest.raises(TIDError):
        tid_to_int(tid)


def test_make_and_parse() -> None:
    when = datetime(2026, 7, 4, 14, 38, 7, 517000, tzinfo=UTC)
    us = int(when.timestamp()) * 1_000_000 + when.microsecond
    tid = make_tid(us, 17)
    assert parse_tid(tid) == (us, 17)
    assert tid_to_time_us(tid) == us
    assert make_tid(0, 0) == "2222222222222"
    assert make_tid(MAX_TIME_US, MAX_CLOCK_ID) == "bzzzzzzzzzzzz"  # the top bit stays 0
    for bad in [(-1, 0), (MAX_TIME_US + 1, 0), (0, -1), (0, MAX_CLOCK_ID + 1)]:
        with pytest.raises(TIDError):
            make_tid(*bad)
    with pytest.raises(TIDError):
        int_to_tid(1 << 64)


def test_string_order_is_time_order() -> None:
    rng = random.Random(1)
    pairs = [(rng.randrange(MAX_TIME_US), rng.randrange(MAX_CLOCK_ID + 1)) for _ in range(500)]
    tids = [make_tid(t, c) for t, c in pairs]
    assert sorted(tids) == [make_tid(t, c) for t, c in sorted(pairs)]


def test_clock_is_strictly_monotonic_with_an_injected_clock() -> None:
    readings = iter([1_000, 1_000, 999, 5_000, 4_000, 4_000])
    clock = TidClock(lambda: next(readings), clock_id=3)
    issued = [clock.next() for _ in range(6)]
    assert issued == sorted(issued)
    assert len(set(issued)) == 6
    assert [parse_tid(t)[0] for t in issued] == [1_000, 1_001, 1_002, 5_000, 5_001, 5_002]
    assert {parse_tid(t)[1] for t in issued} == {3}


def test_clock_observes_foreign_revisions() -> None:
    clock = TidClock(lambda: 10, clock_id=0)
    theirs = make_tid(1_000_000, 900)
    clock.observe(theirs)
    assert clock.next() > theirs
    with pytest.raises(TIDError):
        TidClock(lambda: 0, clock_id=MAX_CLOCK_ID + 1)


def test_captured_revisions_are_tids_near_the_capture_time() -> None:
    captured = datetime.fromisoformat(manifest()["captured_at"].replace("Z", "+00:00")).timestamp()
    for body in commit_bodies():
        seconds = tid_to_time_us(body["rev"]) / 1e6
        assert abs(seconds - captured) < 24 * 3600
        if body.get("since"):
            assert body["since"] < body["rev"]

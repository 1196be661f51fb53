"""A consumer's batch consume never waits past the open batch's linger."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.base import POLL_TIMEOUT, poll_timeout


def test_an_idle_consumer_waits_the_poll_timeout_or_one_linger() -> None:
    assert poll_timeout(None, 100.0, 0.5) == POLL_TIMEOUT
    assert poll_timeout(None, 100.0, 0.02) == 0.02


def test_an_open_batch_waits_only_what_is_left_of_its_linger() -> None:
    assert poll_timeout(100.0, 100.03, 0.05) == pytest.approx(0.02)
    assert poll_timeout(100.0, 100.2, 0.05) == 0.0  # overdue: take what is there and flush


@given(st.none() | st.floats(0, 1000), st.floats(0, 1000), st.floats(0, 5))
def test_the_wait_is_bounded(started: float | None, now: float, linger: float) -> None:
    t = poll_timeout(started, now, linger)
    assert 0.0 <= t <= min(POLL_TIMEOUT, linger)
    if started is not None:
        assert now + t <= max(now, started + linger) + 1e-9

"""The PostgreSQL sink's known-actor cache: bounded whatever the input, recent actors stay known."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.postgres.sink import KNOWN_ACTORS_GENERATION, KnownActors


def test_unknown_keeps_order_and_skips_known() -> None:
    known = KnownActors(10)
    known.add(["did:plc:b"])
    assert known.unknown(["did:plc:c", "did:plc:b", "did:plc:a"]) == ["did:plc:c", "did:plc:a"]


def test_turnover_drops_the_oldest_generation_only() -> None:
    known = KnownActors(3)
    known.add(["a", "b", "c"])
    known.add(["d"])  # young {a,b,c} becomes old
    assert all(d in known for d in "abcd")
    known.add(["e", "f", "g"])  # {d,e,f} full -> old; {a,b,c} dropped
    assert [d for d in "abcdefg" if d in known] == list("defg")


def test_a_hot_actor_survives_any_number_of_turnovers() -> None:
    known = KnownActors(4)
    for i in range(1000):
        known.add(["hot", f"cold{i}"])
        assert "hot" in known
    assert len(known) <= 8


def test_clear_forgets_everything() -> None:
    known = KnownActors(2)
    known.add(["a", "b", "c"])
    known.clear()
    assert len(known) == 0 and known.unknown(["a"]) == ["a"]


def test_generation_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KnownActors(0)


def test_default_bound_is_small_enough_for_a_256_mb_process() -> None:
    # two generations of DID strings (~110 bytes each with the set slot) stay under ~25 MB
    assert 2 * KNOWN_ACTORS_GENERATION * 110 < 25_000_000


@given(st.integers(1, 6), st.lists(st.lists(st.integers(0, 40), max_size=8), max_size=60))
def test_bounded_and_the_last_generation_is_known(generation: int, batches: list[list[int]]) -> None:
    known = KnownActors(generation)
    added: list[str] = []
    for batch in batches:
        dids = [f"did:plc:{n}" for n in batch]
        known.add(dids)
        added.extend(dids)
        assert len(known) <= 2 * generation
    # the most recent `generation` distinct DIDs added are all still known
    recent: list[str] = []
    for did in reversed(added):
        if did not in recent:
            recent.append(did)
        if len(recent) == generation:
            break
    assert all(d in known for d in recent)
    # never claims a DID that was never added
    assert "did:plc:never" not in known

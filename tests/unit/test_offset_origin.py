"""When a stored offset may be sought to: the same cluster, the same topic incarnation, inside the partition."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from runtime.kafka.offsets import UNKNOWN, Ends, Origin, StoredOffset, mismatch

HERE = Origin("cluster-a", "topic-1")
ENDS = Ends(low=0, stable=90, high=100)


def test_an_offset_of_the_same_origin_inside_the_partition_is_used() -> None:
    assert mismatch(StoredOffset(100, HERE), HERE, ENDS) is None
    assert mismatch(StoredOffset(0, HERE), HERE, ENDS) is None


def test_another_cluster_is_a_mismatch_naming_both() -> None:
    why = mismatch(StoredOffset(10, Origin("cluster-b", "topic-1")), HERE, ENDS)
    assert why is not None and "cluster-b" in why and "cluster-a" in why


def test_a_topic_created_again_is_a_mismatch_naming_both_ids() -> None:
    why = mismatch(StoredOffset(10, Origin("cluster-a", "topic-0")), HERE, ENDS)
    assert why is not None and "topic-0" in why and "topic-1" in why


def test_an_offset_past_the_end_is_a_mismatch_not_a_wait() -> None:
    why = mismatch(StoredOffset(101, HERE), HERE, ENDS)
    assert why is not None and "101" in why and "100" in why


def test_unknown_sides_are_not_compared() -> None:
    # stored before offsets carried their origin, or a broker without topic ids: only the end counts
    assert mismatch(StoredOffset(50, UNKNOWN), HERE, ENDS) is None
    assert mismatch(StoredOffset(50, HERE), Origin("cluster-a", None), ENDS) is None
    assert mismatch(StoredOffset(500, UNKNOWN), HERE, ENDS) is not None
    assert mismatch(StoredOffset(500, HERE), HERE, None) is None  # ends unknown: not a reason


ids = st.sampled_from([None, "a", "b"])


@given(ids, ids, ids, ids, st.integers(0, 200), st.integers(0, 200))
def test_a_mismatch_exactly_when_a_known_identity_differs_or_the_offset_is_past_the_end(
        c1: str | None, t1: str | None, c2: str | None, t2: str | None, offset: int, high: int) -> None:
    stored, now = StoredOffset(offset, Origin(c1, t1)), Origin(c2, t2)
    differs = (c1 and c2 and c1 != c2) or (t1 and t2 and t1 != t2)
    assert (mismatch(stored, now, Ends(0, high, high)) is not None) == bool(differs or offset > high)

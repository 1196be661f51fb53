"""Planning ``--workers N`` (:mod:`producers.jetstream.parts`): seq ranges at segment boundaries,
balanced by rows, covering every seq after the start exactly once; the plan survives a resume."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from producers.jetstream.parts import Part, PartResult, merged_offsets, merged_statistics, plan_filters, plan_of, split
from producers.jetstream.v2client import SegmentListing


def _segments(sizes: list[int], t0: int = 1_000_000) -> list[SegmentListing]:
    out = []
    seq = 1
    for i, n in enumerate(sizes):
        out.append(SegmentListing(f"seg_{i:010d}.jss", i, n * 100, "0" * 16, n, seq, seq + n - 1,
                                  t0 + seq, t0 + seq + n - 1))
        seq += n
    return out


def test_parts_are_contiguous_balanced_and_cut_at_segment_ends() -> None:
    segs = _segments([100] * 10)
    plan = split(segs, 0, 3)
    assert [p.after for p in plan] == [0, 400, 700]
    assert [p.through for p in plan] == [400, 700, None]
    assert {p.through for p in plan[:-1]} <= {s.max_seq for s in segs}


def test_a_start_inside_a_segment_and_an_end_leave_out_what_is_outside() -> None:
    segs = _segments([100] * 10)
    plan = split(segs, 250, 2, end_seq=600)
    assert plan[0].after == 250 and plan[-1].through is None
    assert all(p.through is None or 250 < p.through <= 600 for p in plan)
    # an end time before the 5th segment: only segments 0-3 are split
    plan = split(segs, 0, 4, end_us=1_000_000 + 401)
    assert len(plan) == 4 and plan[-1].after == 300


def test_one_worker_or_one_segment_is_one_open_part() -> None:
    assert split(_segments([100] * 5), 0, 1) == [Part(0, 0, None)]
    assert split(_segments([100]), 0, 4) == [Part(0, 0, None)]
    assert split(_segments([100] * 3), 300, 4) == [Part(0, 300, None)]


@given(st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=40),
       st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=2000))
def test_every_seq_after_the_start_is_in_exactly_one_part(sizes: list[int], workers: int, after: int) -> None:
    sizes = [max(1, n) for n in sizes]
    segs = _segments(sizes)
    plan = split(segs, after, workers)
    assert 1 <= len(plan) <= workers
    assert plan[0].after == after and plan[-1].through is None
    for a, b in itertools.pairwise(plan):
        assert a.through is not None and a.through == b.after and a.after < a.through
    assert [p.index for p in plan] == list(range(len(plan)))


def test_the_plan_round_trips_through_job_filters() -> None:
    plan = split(_segments([50, 80, 120, 40]), 10, 3)
    assert plan_of({"parts": plan_filters(plan)}) == plan
    assert plan_of({}) is None and plan_of({"parts": [["x", 1]]}) is None


def test_results_merge_offsets_by_maximum_and_counts_by_sum() -> None:
    a = PartResult(Part(0, 0, 10), True, {"records_produced": 5, "messages_received": 6, "total_time": 2.0,
                                          "skipped": {"filtered": 1}, "collections": ["x.y.z"]},
                   {"t": {"0": 4, "1": 9}})
    b = PartResult(Part(1, 10, None), True, {"records_produced": 7, "messages_received": 8, "total_time": 1.0,
                                             "skipped": {"filtered": 2, "before_cursor": 1}, "collections": ["a.b.c"]},
                   {"t": {"0": 6}, "u": {"0": 1}})
    assert merged_offsets([a, b]) == {"t": {"0": 6, "1": 9}, "u": {"0": 1}}
    stats = merged_statistics([a, b])
    assert stats["records_produced"] == 12 and stats["messages_received"] == 14 and stats["total_time"] == 2.0
    assert stats["skipped"] == {"filtered": 3, "before_cursor": 1} and stats["collections"] == ["a.b.c", "x.y.z"]
    assert stats["parts"] == 2 and stats["records_per_second"] == 6.0

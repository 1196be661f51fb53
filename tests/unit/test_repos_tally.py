"""The run statistics of ``backfill repos`` are counted as results come, none of them kept."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from producers.repos.app import Tally
from producers.repos.source import RepoResult

results = st.lists(st.builds(
    RepoResult, did=st.sampled_from(["did:plc:a", "did:plc:b", "did:plc:c"]), cursor=st.integers(0, 10),
    outcome=st.sampled_from(["ok", "failed", "not_found"]), records=st.integers(0, 50),
    car_bytes=st.integers(0, 10_000),
    by_type=st.dictionaries(st.sampled_from(["post", "like", "follow"]), st.integers(0, 20), max_size=3)),
    max_size=40)


@given(results)
def test_the_tally_counts_what_the_results_hold(rs: list[RepoResult]) -> None:
    tally = Tally()
    for r in rs:
        tally.add(r)
    stats = tally.statistics(2.0, "idle", 3)
    assert stats["users"] == len(rs)
    assert stats["records_produced"] == sum(r.records for r in rs)
    assert stats["car_bytes"] == sum(r.car_bytes for r in rs)
    assert stats["outcomes"] == {o: sum(r.outcome == o for r in rs) for o in {r.outcome for r in rs}}
    by_type: dict[str, int] = {}
    for r in rs:
        for k, v in r.by_type.items():
            by_type[k] = by_type.get(k, 0) + v
    assert {k: v for k, v in stats["records_by_type"].items() if v} == {k: v for k, v in by_type.items() if v}
    assert stats["records_per_second"] == round(stats["records_produced"] / 2.0, 1)
    assert stats["repos_per_second"] == round(len(rs) / 2.0, 2)
    assert (stats["batches"], stats["stop_reason"]) == (3, "idle")


def test_a_tally_holds_no_result() -> None:
    tally = Tally()
    for i in range(10_000):
        tally.add(RepoResult(did=f"did:plc:{i}", cursor=i, outcome="ok", records=1, by_type={"post": 1}))
    assert vars(tally).keys() == {"users", "records", "car_bytes", "by_type", "outcomes"}
    assert (tally.users, tally.records, dict(tally.by_type)) == (10_000, 10_000, {"post": 10_000})

"""``backfill status``: progress, rate, ETA and lag arithmetic, and both output formats."""

from __future__ import annotations

import io
import json

import pytest

from runtime.commands.status import (
    GroupReport,
    PartitionReport,
    Scan,
    StatusReport,
    group_report,
    job_report,
    job_start_us,
    partition_lag,
    plan_scans,
    records_between,
    remaining_for_job,
    render_json,
    render_text,
)
from runtime.kafka.checkpoint import FINISHED, RUNNING, JobState
from runtime.kafka.offsets import Ends

S = 1_000_000  # one second in microseconds
START = 1_700_000_000 * S
END = START + 1000 * S


def state(checkpoint: int, *, cursor_s: float, updated_s: float, produced: int, status: str = RUNNING,
          started_s: float = 0.0, runs: int = 1, **kw: object) -> JobState:
    return JobState(job="j", source="jetstream", status=status, start_cursor=START, end_time_us=END,
                    cursor=int(START + cursor_s * S), cursor_time_us=int(START + cursor_s * S),
                    counts={"produced": produced}, started_at_us=int(START + started_s * S),
                    updated_at_us=int(START + updated_s * S), checkpoint=checkpoint, runs=runs,
                    filters={"collections": ["app.bsky.feed.post"], "start_us": START}, **kw)  # type: ignore[arg-type]


def test_rate_speed_progress_and_eta_from_the_last_two_checkpoints() -> None:
    prev = state(1, cursor_s=100, updated_s=10, produced=1000)
    cur = state(2, cursor_s=200, updated_s=20, produced=3000)
    r = job_report([prev, cur], now_us=START + 25 * S)
    assert r.progress == pytest.approx(0.2)
    assert r.rate == pytest.approx(200.0)
    assert r.speed == pytest.approx(10.0)
    assert r.eta_s == pytest.approx(80.0)
    assert r.age_s == pytest.approx(5.0)
    assert r.stale is False


def test_first_checkpoint_uses_the_run_average() -> None:
    cur = state(1, cursor_s=50, updated_s=10, produced=500)
    r = job_report([cur], now_us=START + 10 * S)
    assert r.rate == pytest.approx(50.0)
    assert r.speed == pytest.approx(5.0)
    assert r.eta_s == pytest.approx(190.0)


def test_a_resumed_run_has_no_rate_until_two_checkpoints_of_the_same_run() -> None:
    old_run = state(5, cursor_s=100, updated_s=10, produced=1000)
    new_run = state(6, cursor_s=120, updated_s=500, produced=1500, started_s=490, runs=2)
    r = job_report([old_run, new_run], now_us=START + 500 * S)
    assert r.rate is None
    assert r.eta_s is None
    assert r.progress == pytest.approx(0.12)


def test_finished_job_is_complete() -> None:
    done = state(9, cursor_s=1001, updated_s=100, produced=10, status=FINISHED, stop_reason="end_cursor_reached")
    r = job_report([done], now_us=START + 10_000 * S)
    assert r.progress == 1.0
    assert r.eta_s == 0.0
    assert r.stale is False, "only running jobs go stale"


def test_running_job_without_recent_checkpoint_is_stale() -> None:
    r = job_report([state(1, cursor_s=10, updated_s=10, produced=1)], now_us=START + 10_000 * S)
    assert r.stale is True


def test_progress_is_clamped_and_unknown_without_an_end() -> None:
    late = state(1, cursor_s=1500, updated_s=10, produced=1)
    assert job_report([late], now_us=START).progress == 1.0
    live = JobState(job="live", source="firehose", cursor=42, cursor_time_us=START, updated_at_us=START,
                    started_at_us=START - S)
    r = job_report([live], now_us=START)
    assert r.progress is None
    assert r.eta_s is None


def test_start_time_of_a_job() -> None:
    assert job_start_us(JobState(job="a", source="jetstream", filters={"start_us": 7})) == 7
    assert job_start_us(JobState(job="b", source="jetstream", start_cursor=99)) == 99
    # a relay sequence number is not a time: the run's start stands in on a first run
    assert job_start_us(JobState(job="c", source="firehose", start_cursor=99, started_at_us=5)) == 5
    assert job_start_us(JobState(job="d", source="firehose", start_cursor=99, started_at_us=5, runs=2)) is None


def test_lag_arithmetic() -> None:
    assert partition_lag(40, 100) == 60
    assert partition_lag(None, 100, low=10) == 90
    assert partition_lag(-1001, 100) == 100
    assert partition_lag(120, 100) == 0
    committed = {("p.app.bsky.feed.post", 0): 10, ("p.app.bsky.feed.post", 2): 30}
    ends = {("p.app.bsky.feed.post", 0): Ends(0, 15, 15), ("p.app.bsky.feed.post", 1): Ends(5, 25, 25),
            ("p.app.bsky.feed.post", 2): Ends(0, 30, 30)}
    g = group_report("g", "stable", committed, {"p.app.bsky.feed.post": 3}, ends)
    assert g.topics == {"p.app.bsky.feed.post": 5 + 20 + 0}
    assert g.lag == 25
    # nothing was read: the records left are the offset ranges, upper bounds
    assert g.records_left == 25
    assert g.records_left_exact is False
    assert [p.committed for p in g.partitions] == [10, None, 30]
    assert g.partitions[2].exact is True, "nothing left is exact without reading"


# Partition 0 of a topic written in transactions: records at 0-2 and 4-5, commit markers at 3 and 6,
# an aborted transaction's records at 7-8 and its abort marker at 9, records 10-11 and a marker at 12,
# then an open transaction's record at 13 (the last stable offset is 13, the high watermark 14).
TXN = Ends(low=0, stable=13, high=14)
RECORDS = (0, 1, 2, 4, 5, 10, 11)


def test_records_left_are_counted_where_the_partition_was_read() -> None:
    scan = Scan(start=2, stop=13, offsets=tuple(o for o in RECORDS if o >= 2))
    assert records_between(2, 13, scan) == (5, True)
    assert records_between(4, 13, scan) == (4, True)
    assert records_between(6, 13, scan) == (2, True), "markers and aborted records are not records"
    assert records_between(13, 13, scan) == (0, True)
    assert records_between(0, 13, scan) == (13, False), "before the scan: the offset range, an upper bound"
    assert records_between(4, 13, None) == (9, False)

    committed = {("t", 0): 4}
    g = group_report("g", "empty", committed, {"t": 1}, {("t", 0): TXN}, {("t", 0): scan})
    assert g.lag == 10, "Kafka's tool counts to the high watermark: markers and the open transaction too"
    assert g.records_left == 4
    assert g.records_left_exact is True
    assert g.partitions == [PartitionReport("t", 0, 4, 0, 13, 14, lag=10, records_left=4, exact=True)]

    # a group that read everything committed its position past the last marker: nothing left
    done = group_report("g", "empty", {("t", 0): 13}, {"t": 1}, {("t", 0): TXN}, {})
    assert (done.lag, done.records_left, done.records_left_exact) == (1, 0, True)
    # the producer committed its open transaction: the high watermark passed the marker
    done = group_report("g", "empty", {("t", 0): 15}, {"t": 1}, {("t", 0): Ends(0, 15, 15)}, {})
    assert (done.lag, done.records_left) == (0, 0)


def test_scans_are_planned_within_the_limit_once_per_partition() -> None:
    ends = {("t", 0): TXN, ("t", 1): Ends(100, 50_100, 50_100), ("t", 2): Ends(0, 7, 7), ("t", 3): Ends(0, 0, 0)}
    groups = [{("t", 0): 4, ("t", 1): 49_000, ("t", 2): 7}, {("t", 0): 6, ("t", 1): 200}]
    plans = plan_scans(groups, sorted(ends), ends, limit=10_000)
    # t0: from the lowest of both groups; t1: only the group near the end; t2: one group done, the
    # other never committed (from the log start); t3: empty
    assert plans == {("t", 0): (4, 13), ("t", 1): (49_000, 50_100), ("t", 2): (0, 7)}
    assert plan_scans(groups, sorted(ends), ends, limit=0) == {}


def test_remaining_of_a_job_for_a_group() -> None:
    job = JobState(job="j", source="jetstream",
                   offsets={"p.app.bsky.feed.post": {"0": 50, "1": 20}, "p.identity": {"0": 3}})
    assert remaining_for_job(job, {("p.app.bsky.feed.post", 0): 50, ("p.app.bsky.feed.post", 1): 5}) == (15, False)
    assert remaining_for_job(job, {("p.app.bsky.feed.post", 0): 60, ("p.app.bsky.feed.post", 1): 20}) == (0, True)
    assert remaining_for_job(job, {("p.other", 0): 1}) is None, "the group reads none of the job's topics"
    # counted where read: the job's records up to its recorded end, not the transactions' markers
    txn_job = JobState(job="j", source="jetstream", offsets={"t": {"0": 12}})
    scan = Scan(start=4, stop=13, offsets=(4, 5, 10, 11))
    assert remaining_for_job(txn_job, {("t", 0): 4}, {("t", 0): scan}, {("t", 0): TXN}) == (4, True)
    assert remaining_for_job(txn_job, {("t", 0): 13}, {}, {("t", 0): TXN}) == (0, True)


def report() -> StatusReport:
    running = job_report([state(1, cursor_s=100, updated_s=10, produced=1000),
                          state(2, cursor_s=200, updated_s=20, produced=3000)], now_us=START + 20 * S)
    running.remaining = {"atproto-backfill-postgres": 1234, "atproto-backfill-queue": 90_000}
    running.remaining_exact = {"atproto-backfill-postgres": True, "atproto-backfill-queue": False}
    finished = job_report([JobState(job="done-job", source="jetstream", status=FINISHED, cursor=5,
                                    cursor_time_us=END, end_time_us=END, updated_at_us=START,
                                    stop_reason="end_cursor_reached")], now_us=START + 20 * S)
    finished.remaining = {"atproto-backfill-postgres": 0}
    finished.remaining_exact = {"atproto-backfill-postgres": True}
    post = "p.app.bsky.feed.post"
    return StatusReport(prefix="p", generated_at_us=START + 20 * S, jobs=[finished, running], groups=[
        GroupReport("atproto-backfill-postgres", "stable", 1300, {post: 1300}, records_left=1234,
                    topics_records_left={post: 1234},
                    partitions=[PartitionReport(post, 0, 100, 0, 1400, 1400, 1300, 1234, True)]),
        GroupReport("atproto-backfill-queue", "empty", 95_000, {post: 95_000}, records_left=95_000,
                    records_left_exact=False, topics_records_left={post: 95_000},
                    partitions=[PartitionReport(post, 0, None, 0, 95_000, 95_000, 95_000, 95_000, False)]),
    ])


def rendered(*, verbose: bool = False, width: int | None = 100) -> str:
    out = io.StringIO()
    render_text(report(), out, verbose=verbose, width=width)
    return out.getvalue()


def has_row(text: str, *cells: str) -> bool:
    """Some line of ``text`` holds ``cells`` as whole cells, in this order."""
    for line in text.splitlines():
        words = line.split("  ")
        found = [w.strip() for w in words if w.strip()]
        it = iter(found)
        if all(any(c == w for w in it) for c in cells):
            return True
    return False


def test_text_output_shows_every_job_and_group() -> None:
    text = rendered()
    assert "done-job" in text
    assert "finished (end_cursor_reached)" in text
    assert "100.0%" in text
    assert "20.0%" in text
    assert "1m20s" in text  # ETA
    assert has_row(text, "j", "atproto-backfill-postgres", "1,234")
    assert has_row(text, "j", "atproto-backfill-queue", "≤90,000"), "an upper bound is marked"
    assert has_row(text, "done-job", "atproto-backfill-postgres", "0")
    assert "app.bsky.feed.post=1,234" in text
    assert "app.bsky.feed.post=≤95,000" in text
    assert "1,300" in text, "the offset lag"


def test_text_output_fits_the_terminal_and_details_are_verbose() -> None:
    for verbose in (False, True):
        for width in (100, 80):
            assert max(len(line) for line in rendered(verbose=verbose, width=width).splitlines()) <= width
    assert "collections=" not in rendered()
    details = rendered(verbose=True, width=200)
    assert "collections=app.bsky.feed.post" in details
    assert has_row(details, "j", "jetstream", str(report().jobs[1].cursor))


def test_text_output_width_follows_columns_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "90")
    assert max(len(line) for line in rendered(width=None).splitlines()) <= 90


def test_text_output_without_jobs_or_groups() -> None:
    out = io.StringIO()
    render_text(StatusReport(prefix="p", generated_at_us=0, jobs=[], groups=[]), out)
    assert "no jobs in p.control.jobs" in out.getvalue()
    assert "no consumer group" in out.getvalue()


def test_json_output_is_machine_readable() -> None:
    doc = json.loads(render_json(report()))
    assert doc["prefix"] == "p"
    by_job = {j["job"]: j for j in doc["jobs"]}
    assert by_job["done-job"]["progress"] == 1.0
    assert by_job["j"]["eta_s"] == pytest.approx(80.0)
    assert [j["job"] for j in doc["jobs"]] == ["done-job", "j"]
    assert doc["jobs"][1]["remaining"] == {"atproto-backfill-postgres": 1234, "atproto-backfill-queue": 90_000}
    assert doc["jobs"][1]["remaining_exact"] == {"atproto-backfill-postgres": True, "atproto-backfill-queue": False}
    g = doc["groups"][0]
    assert (g["group"], g["lag"], g["records_left"], g["records_left_exact"]) == \
        ("atproto-backfill-postgres", 1300, 1234, True)
    assert g["topics"] == {"p.app.bsky.feed.post": 1300}
    assert g["topics_records_left"] == {"p.app.bsky.feed.post": 1234}
    assert g["partitions"] == [{"topic": "p.app.bsky.feed.post", "partition": 0, "committed": 100, "low": 0,
                                "stable": 1400, "high": 1400, "lag": 1300, "records_left": 1234, "exact": True}]
    assert doc["groups"][1]["partitions"][0]["committed"] is None
    assert doc["jobs"][1]["rate"] == pytest.approx(200.0)

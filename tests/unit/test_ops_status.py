"""``backfill status``: progress, rate, ETA and lag arithmetic, and both output formats."""

from __future__ import annotations

import io
import json

import pytest

from runtime.checkpoint import FINISHED, RUNNING, JobState
from runtime.status import (
    GroupReport,
    StatusReport,
    group_report,
    job_report,
    job_start_us,
    partition_lag,
    remaining_for_job,
    render_json,
    render_text,
)

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
    watermarks = {("p.app.bsky.feed.post", 0): (0, 15), ("p.app.bsky.feed.post", 1): (5, 25),
                  ("p.app.bsky.feed.post", 2): (0, 30)}
    g = group_report("g", "stable", committed, {"p.app.bsky.feed.post": 3}, watermarks)
    assert g.topics == {"p.app.bsky.feed.post": 5 + 20 + 0}
    assert g.lag == 25


def test_remaining_of_a_job_for_a_group() -> None:
    job = JobState(job="j", source="jetstream",
                   offsets={"p.app.bsky.feed.post": {"0": 50, "1": 20}, "p.identity": {"0": 3}})
    assert remaining_for_job(job, {("p.app.bsky.feed.post", 0): 50, ("p.app.bsky.feed.post", 1): 5}) == 15
    assert remaining_for_job(job, {("p.app.bsky.feed.post", 0): 60, ("p.app.bsky.feed.post", 1): 20}) == 0
    assert remaining_for_job(job, {("p.other", 0): 1}) is None, "the group reads none of the job's topics"


def report() -> StatusReport:
    running = job_report([state(1, cursor_s=100, updated_s=10, produced=1000),
                          state(2, cursor_s=200, updated_s=20, produced=3000)], now_us=START + 20 * S)
    running.remaining = {"atproto-backfill-postgres": 1234}
    finished = job_report([JobState(job="done-job", source="jetstream", status=FINISHED, cursor=5,
                                    cursor_time_us=END, end_time_us=END, updated_at_us=START,
                                    stop_reason="end_cursor_reached")], now_us=START + 20 * S)
    finished.remaining = {"atproto-backfill-postgres": 0}
    return StatusReport(prefix="p", generated_at_us=START + 20 * S, jobs=[finished, running],
                        groups=[GroupReport("atproto-backfill-postgres", "stable", 1234,
                                            {"p.app.bsky.feed.post": 1234})])


def test_text_output_shows_every_job_and_group() -> None:
    out = io.StringIO()
    render_text(report(), out)
    text = out.getvalue()
    assert "done-job" in text
    assert "finished (end_cursor_reached)" in text
    assert "100.0%" in text
    assert "20.0%" in text
    assert "1m20s" in text  # ETA
    assert "atproto-backfill-postgres: 1,234" in text
    assert "app.bsky.feed.post=1,234" in text


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
    assert by_job["j"]["remaining"] == {"atproto-backfill-postgres": 1234}
    assert doc["groups"][0]["lag"] == 1234

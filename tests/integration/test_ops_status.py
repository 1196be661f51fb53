"""``backfill status`` on the session broker: a finished job consumed by a group, and a running job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from runtime.settings import KafkaSettings
from runtime.simulator.jetstream import JetstreamSimulator, synthetic_events
from runtime.status import collect
from tests.ops_tools import ROOT, Procs, wait_for

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "runtime.cli"]


@pytest.fixture
def sim() -> Iterator[JetstreamSimulator]:
    events = synthetic_events(1000, seed=31, accounts=40, start_us=int((time.time() - 20) * 1e6), rate=100)
    simulator = JetstreamSimulator(events, live_rate=100).start_in_thread()
    try:
        yield simulator
    finally:
        time.sleep(0.5)  # let the server finish the handlers of the connections just closed
        simulator.stop_thread()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def env_for(kafka: KafkaSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "BACKFILL_", "SCHEMA_REGISTRY"))}
    env.update({"KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "BACKFILL_TOPIC_PREFIX": kafka.topic_prefix,
                "BACKFILL_TOPIC_PARTITIONS": "3", "BACKFILL_PROGRESS": "none"})
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_status_shows_a_finished_and_a_running_job(kafka: KafkaSettings, sim: JetstreamSimulator, procs: Procs,
                                                   tmp_path: Path) -> None:
    env = env_for(kafka)
    start = datetime.fromtimestamp(sim.events[0].time_us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    end = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    jetstream = [*CLI, "jetstream", "--consumer", "none", "--instance", sim.url, "--start-timestamp", start,
                 "--wanted-collections", "app.bsky.feed.post", "--checkpoint-interval", "0.5"]
    group = f"{kafka.topic_prefix}-status-group"

    # a bounded job runs to its record limit and finishes; a consumer group reads all of it
    run([*jetstream, "--job", "finished-job", "--num-records", "150", "--max-time", "60"], env)
    run([*CLI, "consume", "queue", "--group", group, "--until-done", "finished-job", "--queue-path",
         str(tmp_path / "q.sqlite"), "--linger", "0.2"], env)

    # a live job keeps running towards an end watermark an hour away
    procs.start("running", [*jetstream, "--job", "running-job", "--num-records", "0", "--max-time", "0",
                            "--end-timestamp", end], env)

    def running_has_a_rate() -> bool:
        procs.alive("running")
        jobs = {j.job: j for j in collect(kafka, timeout=5).jobs}
        return "running-job" in jobs and jobs["running-job"].rate is not None and jobs["running-job"].written > 0

    wait_for("two checkpoints of the running job", running_has_a_rate, timeout=60, every=0.5)

    result = run([*CLI, "status", "--json"], env)
    doc = json.loads(result.stdout)
    assert doc["prefix"] == kafka.topic_prefix
    jobs = {j["job"]: j for j in doc["jobs"]}
    assert set(jobs) == {"finished-job", "running-job"}

    finished = jobs["finished-job"]
    assert finished["status"] == "finished"
    assert finished["stop_reason"] == "target_reached"
    assert finished["progress"] == 1.0
    assert finished["counts"]["records"] == 150
    assert finished["filters"]["collections"] == ["app.bsky.feed.post"]
    assert finished["written"] >= 150
    assert finished["remaining"] == {group: 0}, "the group consumed every record the job wrote"

    running = jobs["running-job"]
    assert running["status"] == "running"
    assert running["stale"] is False
    assert running["cursor"] > sim.events[0].time_us
    assert running["end_time_us"] > running["cursor_time_us"]
    assert 0 < running["progress"] < 1
    assert running["rate"] > 0
    assert running["eta_s"] > 0
    assert running["remaining"][group] > 0, "the group stopped before the running job's records"

    (g,) = [g for g in doc["groups"] if g["group"] == group]
    assert g["lag"] > 0
    assert set(g["topics"]) == {f"{kafka.topic_prefix}.app.bsky.feed.post", f"{kafka.topic_prefix}.identity",
                                f"{kafka.topic_prefix}.account"} & set(g["topics"])
    assert g["lag"] == sum(g["topics"].values())

    # the table for people, one job
    text = run([*CLI, "status", "--job", "finished-job"], env).stdout
    assert "finished-job" in text
    assert "running-job" not in text
    assert "100.0%" in text
    assert group in text

    assert procs.stop("running") == 0, procs.log("running")[-3000:]
    after = {j.job: j for j in collect(kafka, timeout=5).jobs}
    assert after["running-job"].status == "stopped"

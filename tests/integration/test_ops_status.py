"""``backfill status`` on the session broker: a finished job consumed by a group, and a running job;
Kafka's own consumer-group tool and ``backfill status`` agreeing on a group's lag in transactional data."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from consumers.base import ConsumerOptions, ConsumerStats, GroupConsumer
from consumers.queue import QueueSink
from producers.job import JobOptions, JobRunner
from runtime.commands.status import collect
from runtime.contract.codec import AvroCodec
from runtime.contract.records import Event
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from runtime.simulator.jetstream import JetstreamSimulator, synthetic_events
from tests.integration.pg_pipeline import ListSource, make_events, replayed
from tests.kafka.cluster import consumer_groups_tool, jars_present
from tests.ops_tools import ROOT, Procs, wait_for

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "runtime"]


@pytest.fixture
def sim() -> Iterator[JetstreamSimulator]:
    events = synthetic_events(1000, seed=31, accounts=40, start_us=int((time.time() - 20) * 1e6), rate=100)
    simulator = JetstreamSimulator(events, live_rate=100).start_in_thread()
    try:
        yield simulator
    finally:
        time.sleep(0.5)  # let the server finish the handlers of the connections just closed
        simulator.stop_thread()


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


# ------------------------------------------------------------------ Kafka's own tool agrees


def tool_partitions(bootstrap: str, group: str) -> dict[tuple[str, int], tuple[int | None, int, int | None]]:
    """``kafka-consumer-groups --describe --offsets``: (topic, partition) -> (current offset, log-end offset, lag)."""
    out: dict[tuple[str, int], tuple[int | None, int, int | None]] = {}
    for line in consumer_groups_tool(bootstrap, group).splitlines():
        cols = line.split()
        if len(cols) < 6 or cols[0] != group:
            continue
        current, end, lag = (None if c == "-" else int(c) for c in cols[3:6])
        assert end is not None, line
        out[(cols[1], int(cols[2]))] = (current, end, lag)
    return out


def produce_in_transactions(kafka: KafkaSettings, events: list[Event], job: str, per_transaction: int) -> None:
    """A job over ``events`` committing a transaction (with its checkpoint) every ``per_transaction`` events."""
    runner = JobRunner(kafka, JobOptions(job=job, source="jetstream", checkpoint_events=per_transaction,
                                         checkpoint_interval=3600, transactions="on"), Metrics(), AvroCodec())
    try:
        state = asyncio.run(runner.run(lambda _prev: ListSource(events)))
    finally:
        runner.close()
    assert state.status == "finished"


def consume_queue(kafka: KafkaSettings, group: str, path: Path, job: str) -> ConsumerStats:
    sink = QueueSink("status", path)
    try:
        return GroupConsumer(kafka, sink, ConsumerOptions(group=group, until_done=job, linger=0.1, batch_size=50),
                             Metrics(), AvroCodec()).run()
    finally:
        sink.close()


def status_json(kafka: KafkaSettings) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run([*CLI, "status", "--json"], env_for(kafka)).stdout)
    return doc


def test_kafkas_consumer_group_tool_and_status_agree_on_transactional_data(kafka: KafkaSettings,
                                                                         tmp_path: Path) -> None:
    if not jars_present():
        pytest.skip("Kafka's jars (tests/kafka/lib) are not here for its consumer-group tool")
    group = f"{kafka.topic_prefix}-tool"
    first = make_events(300, seed=51, job="first")
    produce_in_transactions(kafka, first, "first", per_transaction=25)
    assert consume_queue(kafka, group, tmp_path / "q.sqlite", "first").stop_reason == "until_done"

    # A group that read everything: its position passed the trailing commit markers.
    tool = tool_partitions(kafka.bootstrap_servers, group)
    assert tool and all(lag == 0 for _, _, lag in tool.values()), tool
    doc = status_json(kafka)
    (g,) = [g for g in doc["groups"] if g["group"] == group]
    assert (g["lag"], g["records_left"], g["records_left_exact"]) == (0, 0, True)
    assert {j["job"]: j["remaining"] for j in doc["jobs"]} == {"first": {group: 0}}

    # Part-way: a second job wrote the same events again, in many transactions, on the same topics.
    second = replayed(first, "second", seed=52)
    produce_in_transactions(kafka, second, "second", per_transaction=20)
    tool = tool_partitions(kafka.bootstrap_servers, group)
    doc = status_json(kafka)
    (g,) = [g for g in doc["groups"] if g["group"] == group]
    ours = {(p["topic"], p["partition"]): p for p in g["partitions"]}
    assert {tp for tp, p in ours.items() if p["committed"] is not None} == set(tool)
    for tp, (current, end, lag) in tool.items():
        assert (ours[tp]["committed"], ours[tp]["high"], ours[tp]["lag"]) == (current, end, lag), tp
    assert g["lag"] == sum(lag or 0 for _, _, lag in tool.values())
    # records, not offsets: every event of the second job is one record left; the lag also counts
    # the commit marker of each of its transactions on each partition
    assert g["records_left"] == len(second)
    assert g["records_left_exact"] is True
    assert g["lag"] > g["records_left"]
    assert g["records_left"] == sum(g["topics_records_left"].values())
    jobs = {j["job"]: j for j in doc["jobs"]}
    assert jobs["second"]["remaining"] == {group: len(second)}
    assert jobs["second"]["remaining_exact"] == {group: True}
    assert jobs["first"]["remaining"] == {group: 0}

    # Read to the end again: both show nothing left.
    assert consume_queue(kafka, group, tmp_path / "q.sqlite", "second").stop_reason == "until_done"
    tool = tool_partitions(kafka.bootstrap_servers, group)
    assert tool and all(lag == 0 for _, _, lag in tool.values()), tool
    doc = status_json(kafka)
    (g,) = [g for g in doc["groups"] if g["group"] == group]
    assert (g["lag"], g["records_left"], g["records_left_exact"]) == (0, 0, True)
    assert all(p["committed"] == p["high"] for p in g["partitions"] if p["high"] > p["low"])

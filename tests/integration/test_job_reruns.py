"""Running a job name again, on the real broker: without ``--resume`` it is a new run of the job
(numbered one more), which starts wherever it is asked to, an earlier start included; with
``--resume`` it continues its run. The same for the three producers: they share the job runner
and its checkpoint check (``JobState.check_forward``).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from consumers.queue import Queue
from producers.firehose import app as firehose_app
from producers.repos import run_batched_backfill
from runtime.commands.cli import main
from runtime.contract.timeparse import us_to_iso
from runtime.contract.topics import TopicMap
from runtime.kafka.checkpoint import JobState, load_job
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.jetstream import JetstreamSimulator, synthetic_events
from runtime.simulator.pds import PdsNetwork
from runtime.simulator.relay import RelayGenerator, RelaySimulator

pytestmark = pytest.mark.integration

START = 1_700_000_000_000_000
EVENTS = synthetic_events(2000, seed=41, accounts=30, start_us=START, rate=1000, real_cids=False)
END = EVENTS[1500].time_us


def job_state(kafka: KafkaSettings, job: str) -> JobState:
    state = load_job(kafka.consumer_config("t-reader"), TopicMap(kafka.topic_prefix).control, job)
    assert state is not None
    return state


@pytest.fixture(scope="module")
def jetstream() -> Iterator[JetstreamSimulator]:
    sim = JetstreamSimulator(EVENTS).start_in_thread()
    yield sim
    sim.stop_thread()


def test_seed_000_run_twice_with_the_same_start_is_a_new_run(jetstream: JetstreamSimulator, kafka: KafkaSettings,
                                                             tmp_path: Path) -> None:
    """``backfill jetstream -s ... -n N`` twice with the default job name: the second run starts
    at the same (earlier) cursor again instead of failing with a cursor regression; the queue holds
    each event once."""
    queue = tmp_path / "q.sqlite"
    args = ["jetstream", "--instance", jetstream.url, "--start-timestamp", us_to_iso(START), "-n", "600",
            "-c", "app.bsky.feed.like", "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix",
            kafka.topic_prefix, "--queue-path", str(queue), "--progress", "none", "--checkpoint-interval", "0.2",
            "--checkpoint-every", "100"]
    assert main(args) == 0
    first = job_state(kafka, "jetstream")
    assert main([*args, "-n", "300"]) == 0, "the second run of the job name failed"
    second = job_state(kafka, "jetstream")
    assert (first.status, first.run, first.runs) == ("finished", 1, 1)
    assert (second.status, second.run, second.runs, second.stop_reason) == ("finished", 2, 1, "target_reached")
    assert second.cursor is not None and first.cursor is not None and second.cursor < first.cursor
    assert second.counts["records"] == 300, "a new run counts its own records"
    assert second.checkpoint > first.checkpoint
    # --resume continues the newest run.
    assert main([*args, "-n", "100", "--resume"]) == 0
    resumed = job_state(kafka, "jetstream")
    assert (resumed.run, resumed.runs, resumed.counts["records"]) == (2, 2, 400)
    assert resumed.cursor is not None and resumed.cursor >= second.cursor
    q = Queue("jetstream_sync", path=queue)
    try:
        items = [i.payload for i in q.peek(10**6)]
    finally:
        q.close()
    identities = Counter((p["did"], p["commit"]["rkey"], p["commit"]["rev"]) for p in items)
    # Each event once: the runs after the first repeat its events, and the queue keeps one of each.
    # (The resume rewinds the lateness below START, so it may add the events just before START
    # that the first run's cursor did not ask for.)
    assert set(identities.values()) == {1} and len(identities) >= 600


def _firehose_settings(kafka: KafkaSettings, *args: str) -> firehose_app.FirehoseSettings:
    parser = argparse.ArgumentParser()
    firehose_app.add_arguments(parser)
    ns = parser.parse_args([*args, "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix",
                            kafka.topic_prefix, "--topic-partitions", "3", "--progress", "none",
                            "--checkpoint-interval", "0.2", "--checkpoint-every", "20"])
    firehose_app.finish_namespace(ns)
    return firehose_app.settings_from_namespace(ns)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_firehose_job_run_again_from_an_earlier_cursor_is_a_new_run(kafka: KafkaSettings, workers: int) -> None:
    gen = RelayGenerator(seed=43, accounts=8, start_us=1_760_000_000_000_000, rate=50)
    frames = gen.frames(200)
    sim = RelaySimulator(frames, rate_limit=400).start_in_thread()
    states: list[list[JobState]] = []
    try:
        # The second run stops earlier than the first: its checkpoints' cursors are all behind.
        for end in (frames[180].time_us, frames[90].time_us):
            result = firehose_app.run(_firehose_settings(
                kafka, "--relay-url", sim.url, "--start-cursor", "0", "--end-timestamp", us_to_iso(end),
                "--allowed-lateness", "0.1", "--job", "fh", "--workers", str(workers)), print_table=False)
            assert result.state is not None and result.state.status == "finished"
            jobs = ["fh"] if workers == 1 else [f"fh.w{i}" for i in range(workers)]
            states.append([job_state(kafka, job) for job in jobs])
    finally:
        sim.stop_thread()
    for number, run_states in enumerate(states, 1):
        for state in run_states:
            assert (state.run, state.runs, state.status) == (number, 1, "finished"), state.job


def test_a_repos_job_run_again_is_a_new_run(kafka: KafkaSettings) -> None:
    net = PdsNetwork(accounts=9, hosts=2, seed=5).start_in_thread()
    common: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers, "topic_prefix": kafka.topic_prefix,
                              "topic_partitions": 3, "plc_url": net.plc_url, "allow_private_network": True,
                              "did_web_scheme": "http", "retry_backoff": 0.01, "job": "list",
                              # slow enough for checkpoints while a run goes (their cursors: DIDs done)
                              "rate": 4.0, "burst": 1, "concurrency": 2, "checkpoint_interval": 0.1}
    try:
        dids = net.dids_in_state("active")
        run_batched_backfill(dids, batch_size=2, **common)
        first = job_state(kafka, "list")
        run_batched_backfill(dids, batch_size=2, **common)
        second = job_state(kafka, "list")
    finally:
        net.stop_thread()
    assert (first.run, first.status) == (1, "finished")
    assert (second.run, second.runs, second.status) == (2, 1, "finished")
    assert second.cursor == first.cursor == len(dids)

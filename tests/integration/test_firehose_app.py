"""``backfill firehose`` end to end: the relay simulator, the PLC simulator and the real broker.

* ``--days 1`` fills the same topics the Jetstream producer fills, with verified commits.
* bad input (garbage frames, a commit signed with the wrong key) is dead-lettered with its raw frame.
* kill -9 of the producer process in the middle of a transaction, then ``--resume``: every event
  exactly once in the topics (read_committed).
* ``--workers 2``: the same events, per-worker checkpoints, a resume that refuses another worker
  count, and a kill -9 of the whole process group mid-transaction followed by a resume: every
  event exactly once.
* ``--workers 2`` and ``backfill consume queue --until-done`` (started before the job, and after
  it): the job's final checkpoint holds its workers' offsets, so each consumer ends with every event.
* ``--workers 2`` started live, killed -9 while one worker has no checkpoint yet, then resumed: the
  resume starts at the job's recorded start, and every event of the range is committed once.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from producers.firehose import app
from producers.firehose.decode import decode_frame
from producers.firehose.workers import shard_of
from runtime.atproto.crypto import KeyPair
from runtime.commands.cli import main
from runtime.contract.records import Event, RecordEvent, event_key
from runtime.contract.timeparse import us_to_iso
from runtime.contract.topics import TopicMap
from runtime.contract.typed import event_from_datum
from runtime.errors import ConfigError
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import JobState, load_job, load_jobs
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.plc import PlcDirectory, PlcSimulator, did_document
from runtime.simulator.relay import RelayFaults, RelayGenerator, RelaySimulator, StoredFrame
from tests.integration.eos import committed, committed_event_keys, event_topics, kill_in_transaction

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def settings(kafka: KafkaSettings, *args: str) -> app.FirehoseSettings:
    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    ns = parser.parse_args([*args, "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix",
                            kafka.topic_prefix, "--topic-partitions", "3", "--progress", "none",
                            "--checkpoint-interval", "0.3"])
    app.finish_namespace(ns)
    return app.settings_from_namespace(ns)


def read_topics(kafka: KafkaSettings, *, dlq: bool = False) -> list[tuple[str, Any]]:
    """``(topic, Event)`` of every committed message of the prefix's event topics (or ``(topic,
    datum)`` of its dead-letter topic), each topic read to its end (read_committed)."""
    if dlq:
        return [(topic, datum) for topic, _, datum in committed(kafka, [TopicMap(kafka.topic_prefix).dead_letters])]
    return [(topic, event_from_datum(name, datum)) for topic, name, datum in committed(kafka, event_topics(kafka))]


def expected_events(frames: list[StoredFrame], end_us: int | None, start_seq: int = 0) -> list[Event]:
    out: list[Event] = []
    for f in frames:
        if f.seq <= start_seq or (end_us is not None and f.time_us >= end_us):
            continue
        out.extend(decode_frame(f.data).events)
    return out


def keys(events: list[Event]) -> Counter[str]:
    return Counter(event_key(e) for e in events)


@pytest.fixture(scope="module")
def live_relay() -> Iterator[tuple[RelaySimulator, PlcSimulator, RelayGenerator]]:
    """A relay with 20 s of history ending 3 s ago and live frames after it, and its PLC directory."""
    rate = 20.0
    n = 400
    gen = RelayGenerator(seed=31, accounts=12, start_us=int((time.time() - n / rate - 3) * 1e6), rate=rate)
    sim = RelaySimulator(gen.frames(n), generator=gen, live_rate=30).start_in_thread()
    plc = PlcSimulator(PlcDirectory(gen.did_documents())).start_in_thread()
    try:
        yield sim, plc, gen
    finally:
        sim.stop_thread()
        plc.stop_thread()


def test_days_backfill_fills_the_jetstream_topics_with_verified_commits(
        kafka: KafkaSettings, live_relay: tuple[RelaySimulator, PlcSimulator, RelayGenerator]) -> None:
    sim, plc, _ = live_relay
    result = app.run(settings(kafka, "--relay-url", sim.url, "--days", "1", "--verify", "--plc-url", plc.url),
                     print_table=False)
    final = result.state
    assert final is not None
    assert (final.status, final.stop_reason) == ("finished", "end_cursor_reached")
    assert final.end_time_us is not None
    expected = expected_events(sim.frames, final.end_time_us)
    got = read_topics(kafka)
    events = [e for _, e in got]
    assert keys(events) == keys(expected)
    topics = TopicMap(kafka.topic_prefix)
    assert all(topic == topics.for_event(e) for topic, e in got)
    assert all(e.source == "firehose" and e.job == "firehose" for e in events)
    records = {event_key(e): e for e in expected if isinstance(e, RecordEvent)}
    for e in events:
        if isinstance(e, RecordEvent):
            assert e.record == records[event_key(e)].record
    commits = sum(1 for e in expected if isinstance(e, RecordEvent))
    assert result.statistics["commits_verified"] == commits
    assert result.statistics["dropped"] == {}
    assert read_topics(kafka, dlq=True) == []
    assert final.cursor is not None
    assert final.cursor >= max(e.cursor for e in expected)
    by_did: dict[tuple[str, str], list[int]] = {}
    for topic, e in got:
        by_did.setdefault((topic, e.did), []).append(e.cursor)
    assert all(seqs == sorted(seqs) for seqs in by_did.values())  # per-DID order within each topic
    state = load_job(kafka.consumer_config("t"), topics.control, "firehose")
    assert state is not None
    assert state.position["resume_cursor"] == final.cursor


def test_bad_frames_and_bad_signatures_are_dead_lettered(kafka: KafkaSettings, tmp_path: Path) -> None:
    gen = RelayGenerator(seed=32, accounts=6, start_us=1_760_000_000_000_000, rate=50)
    frames = gen.frames(150)
    docs = gen.did_documents()
    victim = next(iter(gen.accounts))
    docs[victim] = did_document(victim, KeyPair.generate("k256", b"not the key").multikey(), "https://pds.test")
    path = tmp_path / "docs.json"
    path.write_bytes(orjson.dumps(docs))
    end = frames[120].time_us
    sim = RelaySimulator(frames, faults=RelayFaults(garbage_every=25)).start_in_thread()
    try:
        result = app.run(settings(kafka, "--relay-url", sim.url, "--start-cursor", "0", "--end-timestamp",
                                  us_to_iso(end), "--allowed-lateness", "0.1", "--verify", "--did-docs",
                                  str(path)), print_table=False)
    finally:
        sim.stop_thread()
    in_window = [f for f in frames if f.time_us < end]
    victim_commits = [f for f in in_window if f.did == victim and decode_frame(f.data).kind == "commit"]
    dropped = result.statistics["dropped"]
    assert dropped["bad_signature"] == len(victim_commits) > 0
    assert dropped["malformed_cbor"] >= 4
    dead = [d for _, d in read_topics(kafka, dlq=True)]
    assert len(dead) == sum(dropped.values())
    bad_sig = [d for d in dead if d["reason"] == "bad_signature"]
    assert sorted(d["payload"] for d in bad_sig) == sorted(f.data for f in victim_commits)
    assert all(d["did"] == victim and d["stage"] == "producer:firehose" for d in bad_sig)
    assert {d["payload"] for d in dead if d["reason"] == "malformed_cbor"} == {b"\xff\x00garbage, not DAG-CBOR"}
    produced = [e for _, e in read_topics(kafka)]
    expected = [e for e in expected_events(frames, end) if e.did != victim or not isinstance(e, RecordEvent)]
    assert keys(produced) == keys(expected)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "producers.firehose", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "KAFKA_", "RELAY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _sent(sim: RelaySimulator, frames: int) -> Callable[[], bool]:
    """True once the relay sent ``frames`` frames to the producer."""
    return lambda: sim.frames_sent >= frames


@pytest.mark.slow
def test_kill_minus_nine_mid_transaction_then_resume_gives_every_event_once(kafka: KafkaSettings,
                                                                           tmp_path: Path) -> None:
    gen = RelayGenerator(seed=33, accounts=10, start_us=1_760_000_000_000_000, rate=50)
    frames = gen.frames(700)
    end = frames[600].time_us
    # 60 frames/s: after the 200th frame the watcher has about six seconds to catch an open
    # transaction, even on a loaded machine (at 120/s it once ran out of frames first)
    sim = RelaySimulator(frames, rate_limit=60).start_in_thread()
    common = ["--relay-url", sim.url, "--start-cursor", "0", "--end-timestamp", us_to_iso(end),
              "--allowed-lateness", "0.2", "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix",
              kafka.topic_prefix, "--topic-partitions", "3", "--progress", "none", "--checkpoint-interval", "0.2",
              "--checkpoint-every", "40", "--job", "killed"]
    log = tmp_path / "first.log"
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(_command(*common), stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        try:
            # SIGKILL after 200 frames, while the broker holds data of the open transaction
            held = kill_in_transaction(proc, kafka, ready=_sent(sim, 200))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL, log.read_text()
        assert held
        before = load_job(kafka.consumer_config("t"), TopicMap(kafka.topic_prefix).control, "killed", settle=0)
        assert before is not None
        assert before.status == "running"
        assert (before.cursor or 0) > 0
        resumed = app.run(settings(kafka, "--relay-url", sim.url, "--resume", "--job", "killed",
                                   "--start-cursor", "0", "--end-timestamp", us_to_iso(end),
                                   "--allowed-lateness", "0.2"), print_table=False)
        assert sim.cursors[-1] == before.position["resume_cursor"]
    finally:
        sim.stop_thread()
    assert resumed.state is not None
    assert (resumed.state.status, resumed.state.runs) == ("finished", 2)
    # Every event exactly once: the killed run's open transaction was aborted, the resume replayed
    # from its last checkpoint and dropped what that checkpoint covered.
    assert committed_event_keys(kafka) == keys(expected_events(frames, end))


def _jobs_so_far(kafka: KafkaSettings, control: str) -> set[str]:
    """Jobs with a committed checkpoint, read while producers keep writing (the read ends at the
    last stable offset, where a running producer's open transaction begins)."""
    return {JobState.from_bytes(value).job for m in kafka_util.read_to_end(kafka.consumer_config("t"), control)
            if (value := m.value())}


@pytest.mark.slow
def test_workers_share_the_dids_and_resume_with_the_same_count(kafka: KafkaSettings, tmp_path: Path) -> None:
    gen = RelayGenerator(seed=34, accounts=16, start_us=1_760_000_000_000_000, rate=50)
    frames = gen.frames(700)
    end = frames[600].time_us
    # 40 frames/s: the workers checkpoint many times before the end (frame 600), however loaded the
    # machine (at 60/s a loaded CI machine once finished the job before its first open transaction was seen)
    sim = RelaySimulator(frames, rate_limit=40).start_in_thread()
    args = ["--relay-url", sim.url, "--start-cursor", "0", "--end-timestamp", us_to_iso(end),
            "--allowed-lateness", "0.2", "--job", "sharded"]
    expected = expected_events(frames, end)
    try:
        common = [*args, "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
                  "--topic-partitions", "3", "--progress", "none", "--checkpoint-interval", "0.2",
                  "--checkpoint-every", "40", "--batch-size", "20"]
        log = tmp_path / "workers.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(_command(*common, "--workers", "2"), stdout=out, stderr=subprocess.STDOUT,
                                    env=_env(), cwd=ROOT, start_new_session=True)
        control = TopicMap(kafka.topic_prefix).control
        sent = _sent(sim, 200)

        def ready() -> bool:  # 200 frames, and each worker's first checkpoint (however loaded the machine)
            return sent() and {"sharded.w0", "sharded.w1"} <= _jobs_so_far(kafka, control)

        try:
            # the coordinator and both workers, while the broker holds data of an open transaction
            held = kill_in_transaction(proc, kafka, group=True, ready=ready)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL, log.read_text()
        assert held
        with pytest.raises(ConfigError, match="--workers 2"):
            app.run(settings(kafka, *args, "--resume", "--workers", "3"), print_table=False)
        states = load_jobs(kafka.consumer_config("t"), control, settle=0)  # the killed workers' transactions are open
        first = min(st.position["resume_cursor"] for name, st in states.items() if name.startswith("sharded.w"))
        result = app.run(settings(kafka, *args, "--resume", "--workers", "2", "--batch-size", "20"),
                         print_table=False)
        assert sim.cursors[-1] <= first
    finally:
        sim.stop_thread()
    assert result.state is not None
    assert (result.state.status, result.state.job) == ("finished", "sharded")
    assert [st.job for st in result.states] == ["sharded.w0", "sharded.w1"]
    assert all(st.status == "finished" for st in result.states), [(st.job, st.status, st.stop_reason)
                                                                   for st in result.states]
    got = [e for _, e in read_topics(kafka)]
    assert keys(got) == keys(expected), (tmp_path / "workers.log").read_text()[-3000:]  # each event once
    owners: dict[str, set[str]] = {}
    for e in got:
        owners.setdefault(e.did, set()).add(e.job)
    assert all(len(jobs) == 1 for jobs in owners.values())  # one worker per account
    assert set().union(*owners.values()) == {"sharded.w0", "sharded.w1"}


def test_a_cursor_the_relay_never_had_stops_with_status_1(kafka: KafkaSettings) -> None:
    gen = RelayGenerator(seed=35, accounts=3, start_us=1_760_000_000_000_000)
    sim = RelaySimulator(gen.frames(20)).start_in_thread()
    try:
        code = main(["firehose", "--relay-url", sim.url, "--start-cursor", "5000", "--bootstrap-servers",
                     kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix, "--progress", "none"])
    finally:
        sim.stop_thread()
    assert code == 1
    assert sim.cursors == [5000]


def _wait(what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _queue_consumer(kafka: KafkaSettings, path: Path, group: str, job: str, log: Path) -> subprocess.Popen[bytes]:
    """``backfill consume queue --until-done job`` in its own process."""
    args = [sys.executable, "-m", "runtime", "consume", "queue", "--queue-path", str(path), "--queue-name", "q",
            "--group", group, "--until-done", job, "--linger", "0.1", "--bootstrap-servers",
            kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix]
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)


def _queued(path: Path) -> tuple[int, set[bytes]]:
    """How many items the queue holds, and the event keys it has seen (blake2b, as the sink stores them)."""
    with closing(sqlite3.connect(path)) as conn:
        items: int = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        seen = {bytes(k) for (k,) in conn.execute("SELECT key FROM seen")}
    return items, seen


@pytest.mark.slow
def test_until_done_consumers_of_a_sharded_job_end_with_every_event(kafka: KafkaSettings, tmp_path: Path) -> None:
    gen = RelayGenerator(seed=37, accounts=12, start_us=1_760_000_000_000_000, rate=50)
    frames = gen.frames(450)
    end = frames[400].time_us
    expected = expected_events(frames, end)
    want = {hashlib.blake2b(event_key(e).encode(), digest_size=16).digest() for e in expected}
    assert len(want) == len(expected)
    sim = RelaySimulator(frames, rate_limit=150).start_in_thread()
    # one consumer waits for the job from before it starts, another starts once it is over
    early = _queue_consumer(kafka, tmp_path / "early.sqlite", f"{kafka.topic_prefix}-early", "done",
                            tmp_path / "early.log")
    consumers = [early]
    try:
        result = app.run(settings(kafka, "--relay-url", sim.url, "--start-cursor", "0", "--end-timestamp",
                                  us_to_iso(end), "--allowed-lateness", "0.2", "--job", "done", "--workers", "2",
                                  "--batch-size", "20"), print_table=False)
        final = result.state
        assert final is not None
        assert (final.status, final.stop_reason) == ("finished", "end_cursor_reached")
        late = _queue_consumer(kafka, tmp_path / "late.sqlite", f"{kafka.topic_prefix}-late", "done",
                               tmp_path / "late.log")
        consumers.append(late)
        for proc in consumers:
            proc.wait(60)
    finally:
        sim.stop_thread()
        for proc in consumers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    # Each consumer ran until it had read all of the job's data, not merely until the job finished ...
    for name in ("early", "late"):
        log = (tmp_path / f"{name}.log").read_text()
        items, seen = _queued(tmp_path / f"{name}.sqlite")
        assert (items, seen == want) == (len(expected), True), (name, log[-3000:])
        assert "until_done" in log, log[-3000:]
    assert [proc.returncode for proc in consumers] == [0, 0]
    # ... since the job's checkpoint says where its workers' data ends.
    merged: dict[str, dict[str, int]] = {}
    for st in result.states:
        for topic, parts in st.offsets.items():
            for p, o in parts.items():
                merged.setdefault(topic, {})[p] = max(o, merged.get(topic, {}).get(p, 0))
    assert final.offsets == merged != {}
    assert final.counts["produced"] == len(expected)


@pytest.mark.slow
def test_a_live_sharded_start_killed_before_a_worker_checkpointed_resumes_at_the_jobs_start(
        kafka: KafkaSettings, tmp_path: Path) -> None:
    gen = RelayGenerator(seed=38, accounts=8, start_us=1_760_000_000_000_000, rate=50)
    history = gen.frames(20)  # before the live start: never part of the job
    # The first frames after the start belong to worker 0's accounts only: worker 1 gets none, so
    # it has no checkpoint when the job is killed.
    first: list[StoredFrame] = []
    while len(first) < 600:
        frame = gen.frame()
        if shard_of(frame.did, 2) == 0:
            first.append(frame)
    rest = gen.frames(200)
    end = rest[120].time_us
    expected = expected_events([*first, *rest], end)
    assert {shard_of(e.did, 2) for e in expected_events(rest, end)} == {0, 1}
    # 50 frames/s: worker 0 is busy for 12 s, and its records reach the broker at once (linger 5 ms),
    # so however loaded the machine a moment with its data in an open transaction comes up.
    sim = RelaySimulator(history, rate_limit=50).start_in_thread()
    control = TopicMap(kafka.topic_prefix).control
    args = ["--relay-url", sim.url, "--end-timestamp", us_to_iso(end), "--allowed-lateness", "0.2", "--job", "live",
            "--workers", "2", "--batch-size", "20", "--bootstrap-servers", kafka.bootstrap_servers,
            "--topic-prefix", kafka.topic_prefix, "--topic-partitions", "3", "--progress", "none",
            "--checkpoint-interval", "0.5", "--checkpoint-every", "40", "--kafka-config", "linger.ms=5"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with (tmp_path / "first.log").open("wb") as out:
            procs.append(subprocess.Popen(_command(*args), stdout=out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                                          start_new_session=True))
        _wait("the live connection", lambda: sim.cursors == [None])  # no cursor: live, at the head
        sim.call(lambda: sim.append(first))
        # killed with worker 0's data in an open transaction, after its first checkpoint
        held = kill_in_transaction(procs[0], kafka, group=True, ready=lambda: "live.w0" in _jobs_so_far(kafka, control))
        assert procs[0].returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
        assert held
        states = load_jobs(kafka.consumer_config("t"), control, settle=0)
        assert "live.w1" not in states  # worker 1 never checkpointed
        assert states["live.w0"].position["resume_cursor"] > history[-1].seq
        with (tmp_path / "resumed.log").open("wb") as out:
            procs.append(subprocess.Popen(_command(*args, "--resume"), stdout=out, stderr=subprocess.STDOUT,
                                          env=_env(), cwd=ROOT, start_new_session=True))
        _wait("the resume's connection", lambda: len(sim.cursors) == 2 or procs[1].poll() is not None)
        sim.call(lambda: sim.append(rest))
        procs[1].wait(60)
        assert procs[1].returncode == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    finally:
        sim.stop_thread()
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
    # Every event of the range exactly once: worker 1's share of the frames before the kill too.
    assert committed_event_keys(kafka) == keys(expected), (tmp_path / "resumed.log").read_text()[-3000:]
    # The first run recorded its start (the first frame's seq - 1), and the resume connected there.
    job = load_job(kafka.consumer_config("t"), control, "live")
    assert job is not None
    assert (job.status, job.start_cursor, job.runs) == ("finished", history[-1].seq, 2)
    assert sim.cursors == [None, history[-1].seq]

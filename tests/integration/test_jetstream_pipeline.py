"""The spine end to end: Jetstream simulator -> producer -> typed topics -> queue, on the real broker.

Covers the seed's run and statistics, kill -9 in the middle of a transaction and ``--resume``
ending with every event exactly once in the topics (read_committed) and in the queue, a second
instance of a running job fencing the first, ``--until-done``, dead letters, ``inspect topic`` and
the non-transactional mode.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumers.queue import Queue
from producers.jetstream import run_backfill_sync
from producers.jetstream.decode import decode_message
from runtime.commands.cli import main
from runtime.contract.codec import AvroCodec
from runtime.contract.nsid import CollectionFilter
from runtime.contract.records import Event, RecordEvent, event_key
from runtime.contract.timeparse import us_to_iso
from runtime.contract.typed import event_from_datum
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import load_job
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.jetstream import Faults, JetstreamSimulator, StoredEvent, synthetic_events
from tests.integration.eos import committed, committed_event_keys, event_topics, kill_in_transaction

pytestmark = pytest.mark.integration

START = 1_700_000_000_000_000
EVENTS = synthetic_events(6000, seed=21, accounts=80, start_us=START, rate=1000, real_cids=False)
END = EVENTS[5000].time_us
ROOT = Path(__file__).resolve().parents[2]


def canon(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()


def expected(collections: list[str], end: int = END, events: list[StoredEvent] = EVENTS) -> list[str]:
    f = CollectionFilter(collections)
    return sorted(canon(orjson.loads(e.text)) for e in events
                  if START <= e.time_us < end and e.collection is not None and f(e.collection))


def expected_keys(collections: list[str], job: str, end: int = END) -> Counter[str]:
    """The events a job must commit to the topics, once each: the wanted collections' commits and
    every identity and account event in the window."""
    f = CollectionFilter(collections)
    return Counter(event_key(decode_message(e.text, job=job)) for e in EVENTS
                   if START <= e.time_us < end and (e.collection is None or f(e.collection)))


def queued(path: Path, name: str) -> list[str]:
    q = Queue(name, path=path)
    try:
        return sorted(canon(i.payload) for i in q.peek(10**7))
    finally:
        q.close()


@pytest.fixture(scope="module")
def sim() -> Any:
    s = JetstreamSimulator(EVENTS).start_in_thread()
    yield s
    s.stop_thread()


def base_args(sim: JetstreamSimulator, kafka: KafkaSettings, job: str, queue: Path) -> list[str]:
    return ["jetstream", "--instance", sim.url, "--cursor", str(START), "--end-timestamp", us_to_iso(END),
            "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
            "--topic-partitions", "3", "--job", job, "--queue-path", str(queue), "--progress", "none",
            "--checkpoint-interval", "0.3", "--end-idle", "1"]


@pytest.mark.tansu_smoke
def test_seed_api_fills_the_queue_with_the_seed_statistics(sim: JetstreamSimulator, kafka: KafkaSettings,
                                                           tmp_path: Path) -> None:
    dates: list[str] = []
    stats = run_backfill_sync(
        wanted_collections=["app.bsky.feed.post", "app.bsky.feed.like"], num_records=500,
        instance=sim.url, start_timestamp=us_to_iso(START), queue_name="seed_q", on_date_change=dates.append,
        bootstrap_servers=kafka.bootstrap_servers, topic_prefix=kafka.topic_prefix,
        queue_path=str(tmp_path / "q.sqlite"), job="seed-api")
    for field in ("records_stored", "messages_received", "total_time", "records_per_second", "collections",
                  "target_reached", "latest_cursor", "queue_length", "current_date", "end_cursor_reached"):
        assert field in stats
    assert stats["records_stored"] == stats["queue_length"] == 500
    assert stats["target_reached"] is True and stats["end_cursor_reached"] is False
    assert stats["collections"] == ["app.bsky.feed.like", "app.bsky.feed.post"]
    assert stats["current_date"] == "2023-11-14" and dates == ["2023-11-14"]
    got = queued(tmp_path / "q.sqlite", "seed_q")
    want = expected(["app.bsky.feed.post", "app.bsky.feed.like"], end=END)
    assert len(got) == 500 and set(got) <= set(want)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "KAFKA_", "JETSTREAM_"))}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _producer(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m producers.jetstream`` with ``args`` (without the leading ``jetstream``), in its own
    process group, logging to ``log``."""
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "producers.jetstream", *args[1:]], env=_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def _sent(sim: JetstreamSimulator, n: int) -> Callable[[], bool]:
    """True once ``sim`` sent ``n`` messages in all."""
    return lambda: sim.messages_sent >= n


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.mark.slow
def test_kill_9_mid_transaction_then_resume_gives_every_event_exactly_once(kafka: KafkaSettings,
                                                                         tmp_path: Path) -> None:
    slow_sim = JetstreamSimulator(EVENTS, rate_limit=400).start_in_thread()
    queue = tmp_path / "q.sqlite"
    collections = ["app.bsky.feed.like", "app.bsky.graph.*"]
    args = [*base_args(slow_sim, kafka, "killed", queue), "-n", "0", "-t", "120", "--queue-name", "kq",
            *(a for c in collections for a in ("-c", c))]
    try:
        for run in range(2):
            # The killed runs produce only: a queue consumer killed with them would hold its group's
            # partitions until its session expired (the queue consumer's own kill test is elsewhere).
            proc = _producer([*args, "--consumer", "none", *(["--resume"] if run else [])],
                             tmp_path / f"run{run}.log")
            try:
                # Killed once the simulator sent this run 1,500 messages (a third of the stream), at a
                # moment the broker holds data of the run's open transaction.
                held = kill_in_transaction(proc, kafka, group=True, timeout=90,
                                           ready=_sent(slow_sim, slow_sim.messages_sent + 1500))
            finally:
                _stop(proc)
            assert held, "the kill left no open transaction"
        # The last run completes the job and fills the queue.
        code = main([*args, "--resume"])
        assert code == 0
    finally:
        slow_sim.stop_thread()
    # The topics: every event exactly once (the killed runs' open transactions were aborted).
    assert committed_event_keys(kafka) == expected_keys(collections, "killed")
    # The queue: the same, each event once.
    got = queued(queue, "kq")
    assert len(got) == len(set(got)), "an event reached the queue twice"
    assert got == expected(collections)
    state = load_job(kafka.consumer_config("t-reader"), f"{kafka.topic_prefix}.control.jobs", "killed")
    assert state is not None and state.status == "finished" and state.runs == 3
    assert state.stop_reason == "end_cursor_reached"


@pytest.mark.slow
def test_a_second_instance_of_a_running_job_fences_the_first(kafka: KafkaSettings, tmp_path: Path) -> None:
    """Two instances of one job (one transactional id): the second fences the first, which stops
    loudly (status 1, one clear line, no traceback); the second resumes from the first one's last
    checkpoint and completes; the topics hold every event exactly once."""
    slow_sim = JetstreamSimulator(EVENTS, rate_limit=400).start_in_thread()
    collections = ["app.bsky.feed.post", "app.bsky.graph.follow"]
    args = [*base_args(slow_sim, kafka, "twin", tmp_path / "unused.sqlite"), "--consumer", "none", "-n", "0",
            "-t", "120", "--resume", *(a for c in collections for a in ("-c", c))]
    control = f"{kafka.topic_prefix}.control.jobs"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    try:
        first = _producer(args, logs[0])
        second: subprocess.Popen[bytes] | None = None
        try:
            deadline = time.monotonic() + 60
            while (state := load_job(kafka.consumer_config("t-reader"), control, "twin", settle=0)) is None \
                    or state.checkpoint < 3:
                assert first.poll() is None, logs[0].read_text()[-3000:]
                assert time.monotonic() < deadline, "the first instance never checkpointed"
                time.sleep(0.1)
            second = _producer(args, logs[1])
            assert first.wait(60) == 1, logs[0].read_text()[-3000:]
            assert second.wait(120) == 0, logs[1].read_text()[-3000:]
        finally:
            _stop(first)
            if second is not None:
                _stop(second)
    finally:
        slow_sim.stop_thread()
    text = logs[0].read_text()
    [line] = [ln for ln in text.splitlines() if "CRITICAL" in ln]
    assert ("job twin: fenced by a newer instance with the same job name "
            "(transactional id atproto-backfill-twin)") in line
    assert "Traceback" not in text, text[-3000:]
    assert committed_event_keys(kafka) == expected_keys(collections, "twin")
    state = load_job(kafka.consumer_config("t-reader"), control, "twin")
    assert state is not None and (state.status, state.stop_reason, state.runs) == ("finished", "end_cursor_reached", 2)


def identity_of(event: Event) -> tuple[str, ...]:
    """What makes an event the same through every instance (the instance's time_us is not part of it)."""
    if isinstance(event, RecordEvent):
        return (event.did, event.collection, event.rkey, event.rev or "")
    return (event.did, type(event).__name__, str(event.seq))


def _stop_when(sim: JetstreamSimulator, sent: int) -> threading.Thread:
    """Stop ``sim`` (its server and every connection) once it sent ``sent`` messages."""
    def watch() -> None:
        deadline = time.monotonic() + 120
        while sim.messages_sent < sent and time.monotonic() < deadline:
            time.sleep(0.01)
        sim.stop_thread()

    thread = threading.Thread(target=watch, name="stop-first-instance", daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("offset_first", "offset_second"), [(-1_500_000, 1_500_000), (1_500_000, -1_500_000)],
                         ids=["to-an-instance-ahead", "to-an-instance-behind"])
def test_failover_between_instances_with_other_clocks_is_exactly_once(
        kafka: KafkaSettings, tmp_path: Path, offset_first: int, offset_second: int) -> None:
    """Two Jetstream instances of one stream whose receive clocks differ by 3 s (the lateness is
    0.1 s). The first goes away in the middle of the stream; the job fails over to the second, whose
    replay of the failover rewind repeats what was delivered. The topics hold every event exactly
    once (read_committed), and so does the queue filled by the job's queue consumer."""
    first = JetstreamSimulator(EVENTS, clock_offset_us=offset_first, rate_limit=1500).start_in_thread()
    second = JetstreamSimulator(EVENTS, clock_offset_us=offset_second).start_in_thread()
    queue = tmp_path / "q.sqlite"
    collections = ["app.bsky.feed.like", "app.bsky.graph.*"]
    args = ["jetstream", "--instance", f"{first.url},{second.url}", "--cursor", str(START + offset_first),
            "--end-timestamp", us_to_iso(START + 3600 * 10**6), "--end-idle", "1", "--allowed-lateness", "0.1",
            "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
            "--topic-partitions", "3", "--job", "failover", "--queue-path", str(queue), "--queue-name", "fq",
            "--progress", "none", "--checkpoint-interval", "0.3", "-n", "0", "-t", "120",
            *(a for c in collections for a in ("-c", c))]
    watcher = _stop_when(first, 2000)
    try:
        assert main(args) == 0
    finally:
        watcher.join(30)
        first.stop_thread()
        second.stop_thread()
    assert first.messages_sent >= 2000 and second.connections == 1, "the job did not fail over"
    f = CollectionFilter(collections)
    events = [decode_message(e.text) for e in EVENTS]
    want = Counter(identity_of(e) for e in events if not isinstance(e, RecordEvent) or f(e.collection))
    got = Counter(identity_of(event_from_datum(name, datum))
                  for _, name, datum in committed(kafka, event_topics(kafka)))
    assert got == want
    # The queue (the job's queue consumer takes records only): each once.
    queued_items = Counter(identity_of(decode_message(orjson.dumps(i))) for i in _queue_payloads(queue, "fq"))
    assert queued_items == Counter(identity_of(e) for e in events if isinstance(e, RecordEvent) and f(e.collection))
    state = load_job(kafka.consumer_config("t-reader"), f"{kafka.topic_prefix}.control.jobs", "failover")
    assert state is not None and (state.status, state.stop_reason) == ("finished", "end_cursor_reached")
    assert state.position["instance"] == second.url


def _queue_payloads(path: Path, name: str) -> list[Any]:
    q = Queue(name, path=path)
    try:
        return [i.payload for i in q.peek(10**7)]
    finally:
        q.close()


@pytest.mark.tansu_smoke
def test_producer_only_then_until_done_consumer(sim: JetstreamSimulator, kafka: KafkaSettings, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    queue = tmp_path / "q.sqlite"
    assert main([*base_args(sim, kafka, "solo", queue), "--consumer", "none", "-n", "0",
                 "-c", "app.bsky.graph.follow"]) == 0
    assert not queue.exists(), "producer-only mode writes no queue"
    assert main(["consume", "queue", "--until-done", "solo", "--queue-name", "follows", "--queue-path", str(queue),
                 "-c", "app.bsky.graph.follow", "--no-account-events", "--bootstrap-servers", kafka.bootstrap_servers,
                 "--topic-prefix", kafka.topic_prefix]) == 0
    assert queued(queue, "follows") == expected(["app.bsky.graph.follow"])
    capsys.readouterr()
    assert main(["inspect", "topic", f"{kafka.topic_prefix}.app.bsky.graph.follow", "-n", "3",
                 "--bootstrap-servers", kafka.bootstrap_servers]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert line["schema"] == "app.bsky.graph.follow"
        assert line["value"]["subject"].startswith("did:plc:") and line["value"]["source"] == "jetstream"
        assert line["key"] == line["value"]["did"]


def test_without_transactions_the_queue_is_still_exact(sim: JetstreamSimulator, kafka: KafkaSettings,
                                                       tmp_path: Path) -> None:
    queue = tmp_path / "q.sqlite"
    assert main([*base_args(sim, kafka, "notx", queue), "--transactions", "off", "-n", "0",
                 "--queue-name", "nq", "-c", "app.bsky.feed.repost"]) == 0
    assert queued(queue, "nq") == expected(["app.bsky.feed.repost"])


def test_garbage_frames_go_to_the_dead_letter_topic(kafka: KafkaSettings, tmp_path: Path) -> None:
    bad_sim = JetstreamSimulator(EVENTS, faults=Faults(garbage_every=1000)).start_in_thread()
    try:
        assert main([*base_args(bad_sim, kafka, "dlq", tmp_path / "q.sqlite"), "--consumer", "none", "-n", "0",
                     "-c", "app.bsky.feed.like"]) == 0
    finally:
        bad_sim.stop_thread()
    codec = AvroCodec()
    letters = [codec.decode(m.value() or b"")[1]
               for m in kafka_util.read_to_end(kafka.consumer_config("t-dlq"), f"{kafka.topic_prefix}.dlq",
                                                        settle=30)]
    assert letters, "no dead letters"
    assert {d["reason"] for d in letters} == {"malformed_json"}
    assert all(d["payload"] == b"{not json" and d["stage"] == "producer:jetstream" for d in letters)
    assert all(d["origin"] == bad_sim.url for d in letters)
    state = load_job(kafka.consumer_config("t-reader"), f"{kafka.topic_prefix}.control.jobs", "dlq")
    assert state is not None and state.counts["dropped"] == len(letters)

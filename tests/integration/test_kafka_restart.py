"""The broker restarts mid-run (issue 13, "Outages ridden out"): a private single-node Apache Kafka,
``backfill jetstream`` producing from the Jetstream simulator, ``backfill consume postgres`` and
``backfill consume queue`` consuming, all as processes. In the middle of the run the only broker is
stopped (SIGTERM: a controlled shutdown; SIGKILL: a crash), kept down for several seconds, and
started again on the same ports and data directory.

None of the three processes is restarted: each rides the outage out and exits 0 at the end. The
job's open transaction either waits for the broker and commits, or (the cases that make it fail:
messages timing out in librdkafka's queue, or the broker away past the transaction timeout so that
Kafka aborts it and fences the producer) is aborted and redone by the job itself. At the end the
topics hold every event exactly once (read_committed), the tables hold exactly the expected rows,
the queue holds every item once and folds to the expected records, and both sinks stored the
job's final offsets.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import orjson
import pytest

from consumers.queue import Queue, QueueFold, fold_metadata
from runtime.contract.records import Event, to_jetstream_json
from runtime.contract.timeparse import us_to_iso
from runtime.contract.topics import TopicMap
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import load_job
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.jetstream import JetstreamSimulator, synthetic_events
from tests.integration import broker_outage
from tests.integration.broker_outage import assert_committed_exactly_once, not_on_tansu, own_cluster, wait_for
from tests.integration.pg_pipeline import assert_tables_equal, expected, snapshot, stored_offsets
from tests.integration.replicas import command, data_offsets
from tests.kafka.cluster import KafkaCluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    not_on_tansu("starts and restarts its own Apache Kafka node"),
]

ROOT = Path(__file__).resolve().parents[2]
START = 1_700_000_000_000_000
EVENTS = synthetic_events(5500, seed=91, accounts=80, start_us=START, rate=1000, real_cids=False)
END = EVENTS[4000].time_us
COLLECTIONS = "app.bsky.*"
JOB = "restart"
#: The simulator's pace: the stream lasts about 25 s, so the broker is away in its middle and the
#: job still has events to produce once it is back.
RATE = 200
#: Where the stream waits for both sinks: after the job's first checkpoints, before its middle.
HOLD_AT = 1500
#: Seconds the broker stays down (and then it takes some more to start).
DOWN = 6.0
#: The job's transaction timeout in the case where the broker stays away longer: a message waiting
#: for the broker that long fails, and Kafka aborts the transaction (the job redoes it).
SHORT_TXN_TIMEOUT_MS = 8000


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KafkaCluster]:
    yield from own_cluster(tmp_path / "kafka", nodes=1)


def job_events() -> list[Event]:
    """The events the job must deliver: its range, its collections, identity and account events."""
    return broker_outage.job_events(EVENTS, START, END, COLLECTIONS, JOB)


class Processes:
    """The job and the consumers as processes, logging to files; none outlives the test."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("BACKFILL_", "DATABASE_URL", "KAFKA_", "JETSTREAM_"))}
        self.env["PYTHONUNBUFFERED"] = "1"

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen([*command(), *args], stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=ROOT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{self.log(name)[-5000:]}"

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout} s:\n{self.log(name)[-5000:]}") from None

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def queue_offsets(path: Path, group: str) -> dict[str, dict[str, int]]:
    with closing(sqlite3.connect(path, timeout=30)) as conn:
        rows = conn.execute("SELECT topic, partition, next_offset FROM kafka_offsets WHERE group_id = ?",
                            (group,)).fetchall()
    out: dict[str, dict[str, int]] = {}
    for topic, partition, nxt in rows:
        out.setdefault(topic, {})[str(partition)] = nxt
    return out


def canon(obj: object) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def queue_payloads(path: Path, name: str) -> list[bytes]:
    q = Queue(name, path=path)
    try:
        return [canon(i.payload) for i in q.peek(10**7)]
    finally:
        q.close()


#: The job's log line when it aborted a failed transaction and sent its messages again.
REDONE = "aborting it and sending its"
#: ... and when Kafka had aborted it itself and a new producer took over.
TAKEN_OVER = "a new one takes over and redoes it"


@pytest.mark.parametrize(("how", "down", "job_args", "expect"), [
    # The transaction stays open through the outage and commits once the broker is back.
    pytest.param("sigterm", DOWN, (), None, id="sigterm"),
    pytest.param("sigkill", DOWN, (), None, id="sigkill"),
    # Messages in librdkafka's queue (checkpoints 5 s apart) time out during the outage: the
    # transaction fails, and the job aborts it and redoes it with the same producer.
    pytest.param("sigkill", DOWN, ("--checkpoint-interval", "5", "--kafka-config", "message.timeout.ms=3000"),
                 REDONE, id="sigkill-messages-time-out"),
    # Away past the transaction timeout: Kafka aborts the transaction and fences the producer; a new
    # producer of the job takes over and redoes it. (SIGTERM: after a SIGKILL, a single combined
    # node's coordinator may complete that abort before the restarted broker is registered again,
    # and the abort markers are lost: a hanging transaction in Kafka, which the next commit of the
    # same producer id commits; a resume of the job would commit it just the same.)
    pytest.param("sigterm", 2 * DOWN, ("--kafka-config", f"transaction.timeout.ms={SHORT_TXN_TIMEOUT_MS}"),
                 TAKEN_OVER, id="sigterm-past-the-transaction-timeout"),
])
def test_producer_and_consumers_ride_out_a_broker_restart(
        how: str, down: float, job_args: tuple[str, ...], expect: str | None, cluster: KafkaCluster,
        pg_url: str, schema: str, tmp_path: Path, prefix: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=cluster.bootstrap, topic_prefix=prefix, topic_partitions=3)
    admin = kafka_util.admin(kafka.client_config())
    control = TopicMap(prefix).control
    queue = tmp_path / "q.sqlite"
    pg_group, q_group = f"pg-{schema}", f"q-{schema}"
    common = ["--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", prefix, "--log-level", "INFO"]
    sim = JetstreamSimulator(EVENTS, rate_limit=RATE)
    # The stream holds here until both sinks wrote, so the broker always goes away mid-stream
    # however slowly the machine starts the consumers.
    sim.hold_after = HOLD_AT
    sim.start_in_thread()
    procs = Processes(tmp_path)
    try:
        procs.start("job", "jetstream", "--instance", sim.url, "--cursor", str(START), "--end-timestamp",
                    us_to_iso(END), "--topic-partitions", "3", "--job", JOB, "--consumer", "none",
                    "--progress", "none", "-n", "0", "--end-idle", "60", "--stall-timeout", "120",
                    "--checkpoint-interval", "0.3", "-c", COLLECTIONS, *job_args, *common)

        def checkpointed(at_least: int) -> Callable[[], bool]:
            def check() -> bool:
                procs.alive()
                if control not in kafka_util.existing_topics(admin):
                    return False
                state = load_job(kafka.consumer_config("t-ctl"), control, JOB, settle=0)
                return state is not None and state.counts.get("produced", 0) >= at_least
            return check

        wait_for("the job's first checkpoints", checkpointed(300), 60)
        procs.start("postgres", "consume", "postgres", "--database-url", pg_url, "--db-schema", schema,
                    "--group", pg_group, "--batch-size", "200", "--linger", "0.2", "--until-done", JOB, *common)
        procs.start("queue", "consume", "queue", "--queue-path", str(queue), "--queue-name", "rq",
                    "--group", q_group, "--batch-size", "200", "--linger", "0.2", "--until-done", JOB, *common)

        def both_sinks_wrote() -> bool:
            procs.alive()
            return bool(stored_offsets(pg_url, schema, pg_group)) and queue.exists() and bool(
                queue_offsets(queue, q_group))

        wait_for("batches in both sinks", both_sinks_wrote, 60)

        # The only broker goes away in the middle of the stream, stays away, and comes back.
        sent_at_stop = sim.messages_sent
        assert sent_at_stop <= HOLD_AT
        sim.hold_after = None
        if how == "sigterm":
            cluster.terminate(1)
        else:
            cluster.kill(1)
        stopped_at = time.monotonic()
        down_until = stopped_at + down
        while time.monotonic() < down_until:
            procs.alive()
            time.sleep(0.2)
        procs.alive()
        cluster.restart(1)
        outage = time.monotonic() - stopped_at
        procs.alive()

        assert procs.wait("job", 120) == 0, procs.log("job")[-5000:]
        for name in ("postgres", "queue"):
            assert procs.wait(name, 120) == 0, procs.log(name)[-5000:]
        assert sim.messages_sent > sent_at_stop
    finally:
        procs.close()
        sim.stop_thread()

    final = load_job(kafka.consumer_config("t-ctl"), control, JOB)
    assert final is not None and (final.status, final.stop_reason) == ("finished", "end_cursor_reached")
    assert final.runs == 1, "the job was run more than once"
    events = job_events()
    # The topics: every event exactly once (what a broken transaction wrote was aborted and redone).
    assert_committed_exactly_once(kafka, events)
    # The sinks: exactly the expected rows and items, and the job's final offsets stored.
    assert stored_offsets(pg_url, schema, pg_group) == data_offsets(final.offsets)
    assert_tables_equal(snapshot(pg_url, schema), expected(events))
    assert queue_offsets(queue, q_group) == data_offsets(final.offsets)
    items = queue_payloads(queue, "rq")
    assert len(items) == len(set(items)), "an item is in the queue twice"
    payloads = {canon(to_jetstream_json(e)): e for e in events}
    assert set(items) <= payloads.keys(), "the queue holds an item that is no event of the job"
    # The queue folds (a version superseded by one queued before it is not queued): its reader's
    # fold gives what the fold of every event of the job gives.
    reader = Queue("rq", path=queue)
    try:
        got_fold = reader.fold()
    finally:
        reader.close()
    want_fold = QueueFold()
    for e in events:
        want_fold.apply_payload(to_jetstream_json(e), fold_metadata(e))
    assert got_fold.live() == want_fold.live()
    assert {d: s.payload for d, s in got_fold.accounts.items()} == {d: s.payload for d, s in want_fold.accounts.items()}
    assert ({d: s.payload for d, s in got_fold.identities.items()}
            == {d: s.payload for d, s in want_fold.identities.items()})
    # Nobody was restarted: the job's one run and every consumer's log tell of one process each.
    for name in ("job", "postgres", "queue"):
        assert "Traceback" not in procs.log(name), procs.log(name)[-5000:]
    if expect is not None:
        # The open transaction failed, and the job itself aborted and redid it. Away past the
        # transaction timeout, which of the two happens first depends on the machine's speed: the
        # transaction's messages time out (the same producer redoes it) or Kafka aborts it (a new
        # producer takes over and redoes it); either way it is redone.
        assert outage > 3.0
        job_log = procs.log("job")
        assert expect in job_log or (expect == TAKEN_OVER and REDONE in job_log), job_log[-5000:]
    if expect == TAKEN_OVER:
        assert outage * 1000 > SHORT_TXN_TIMEOUT_MS

"""A broker dies mid-run: three Apache Kafka nodes on loopback (replication factor 3,
min.insync.replicas 2), ``backfill jetstream`` producing and three ``backfill consume postgres``
replicas consuming, and SIGKILL of the node that coordinates the job's transactions.

The job finishes with status 0, the tables hold exactly the expected rows, every event is in the
topics exactly once (read_committed), a read of a partition whose only replica died raises instead
of returning the rest, and the restarted node rejoins: registered and back in the ISR of every
partition it hosts.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from runtime.contract.records import Event
from runtime.contract.timeparse import us_to_iso
from runtime.contract.topics import TopicMap
from runtime.errors import SourceError
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import load_job
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.jetstream import JetstreamSimulator, synthetic_events
from tests.integration import broker_outage
from tests.integration.broker_outage import assert_committed_exactly_once, not_on_tansu, own_cluster, wait_for
from tests.integration.pg_pipeline import assert_tables_equal, expected, snapshot, stored_offsets
from tests.integration.replicas import Replicas, command, data_offsets
from tests.kafka.cluster import KafkaCluster

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    not_on_tansu("starts its own Apache Kafka cluster"),
]

ROOT = Path(__file__).resolve().parents[2]
START = 1_700_000_000_000_000
EVENTS = synthetic_events(5500, seed=57, accounts=80, start_us=START, rate=1000, real_cids=False)
END = EVENTS[4000].time_us
COLLECTIONS = "app.bsky.*"
JOB = "failover"
#: The simulator's pace: the job runs for about 15 s, long enough to lose a broker in the middle.
RATE = 300
#: Where the stream waits for the consumers: after the job's first checkpoints, well before its end.
HOLD_AT = 1500
#: A consumer's log line when the group gave it partitions.
ASSIGNED = re.compile(r"assigned [1-9][0-9]* partitions")
#: Partitions of the transaction state log (tests/kafka/cluster.py TEST_SETTINGS).
TXN_LOG_PARTITIONS = 5


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[KafkaCluster]:
    yield from own_cluster(tmp_path / "kafka", nodes=3)


def java_hash(text: str) -> int:
    """Java's ``String.hashCode`` (of a string of BMP characters)."""
    h = 0
    for ch in text:
        h = (31 * h + ord(ch)) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def transaction_coordinator(admin: AdminClient, transactional_id: str) -> int:
    """The node leading the transaction state log partition of ``transactional_id``."""
    h = java_hash(transactional_id)
    partition = (0 if h == -(1 << 31) else abs(h)) % TXN_LOG_PARTITIONS
    md = admin.list_topics("__transaction_state", timeout=10).topics["__transaction_state"]
    return md.partitions[partition].leader


def replicas_of(admin: AdminClient, node: int) -> dict[tuple[str, int], tuple[int, list[int], list[int]]]:
    """(topic, partition) -> (leader, replicas, ISR) of every partition ``node`` holds a replica of."""
    out = {}
    for name, t in admin.list_topics(timeout=10).topics.items():
        for p, md in t.partitions.items():
            if node in md.replicas:
                out[(name, p)] = (md.leader, list(md.replicas), list(md.isrs))
    return out


def job_events() -> list[Event]:
    """The events the job must deliver: its range, its collections, identity and account events."""
    return broker_outage.job_events(EVENTS, START, END, COLLECTIONS, JOB)


def test_a_killed_broker_loses_and_duplicates_nothing_and_rejoins(
        cluster: KafkaCluster, pg_url: str, schema: str, tmp_path: Path, prefix: str) -> None:
    kafka = KafkaSettings(bootstrap_servers=cluster.bootstrap, topic_prefix=prefix, topic_partitions=3,
                          topic_replication=3)
    admin = kafka_util.admin(kafka.client_config())
    # A topic with one replica per partition: the one on the killed node cannot be read meanwhile.
    single = f"single-{prefix}"  # outside the prefix: no consumer subscribes to it
    kafka_util.ensure_topics(admin, [single], partitions=3, replication=1)
    producer = Producer(kafka.producer_config())
    for i in range(300):
        producer.produce(single, b"x%d" % i, b"k%d" % i, partition=i % 3)
    assert producer.flush(30) == 0

    sim = JetstreamSimulator(EVENTS, rate_limit=RATE)
    # The stream holds here until the consumers run, so the kill always lands mid-run
    # however slowly the machine starts three consumer processes.
    sim.hold_after = HOLD_AT
    sim.start_in_thread()
    replicas = Replicas(kafka, pg_url, schema, f"g-{schema}", tmp_path)
    job: subprocess.Popen[bytes] | None = None
    try:
        args = [*command(), "jetstream", "--instance", sim.url, "--cursor", str(START),
                "--end-timestamp", us_to_iso(END), "--bootstrap-servers", kafka.bootstrap_servers,
                "--topic-prefix", prefix, "--topic-partitions", "3", "--topic-replication", "3", "--job", JOB,
                "--consumer", "none", "--progress", "none", "-n", "0", "--end-idle", "60", "--stall-timeout", "120",
                "--checkpoint-interval", "0.3", "-c", COLLECTIONS, "--log-level", "INFO"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "DATABASE_URL", "KAFKA_"))}
        with (tmp_path / "job.log").open("ab") as out:
            job = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        control = TopicMap(prefix).control

        def job_checkpointed() -> bool:
            assert job is not None and job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            if control not in kafka_util.existing_topics(admin):
                return False
            state = load_job(kafka.consumer_config("t-ctl"), control, JOB, settle=0)
            return state is not None and state.counts.get("produced", 0) >= 300

        wait_for("the job's first checkpoints", job_checkpointed, 60)
        consumers = [replicas.start(f"c{i}", "--batch-size", "200", "--linger", "0.2", "--until-done", JOB)
                     for i in range(3)]
        wait_for("partitions for every consumer and the first rows",
                 lambda: all(ASSIGNED.search(replicas.log(f"c{i}")) for i in range(3)) and replicas.progress() > 0,
                 60)

        # SIGKILL the node coordinating the job's transactions while everything runs.
        victim = transaction_coordinator(admin, f"atproto-backfill-{JOB}")
        hosted = replicas_of(admin, victim)
        led = [tp for tp, (leader, _, _) in hosted.items() if leader == victim and tp[0].startswith(prefix)]
        assert led, f"node {victim} leads none of the job's partitions"
        sent_at_kill = sim.messages_sent
        assert sent_at_kill <= HOLD_AT
        sim.hold_after = None
        cluster.kill(victim)
        assert job.poll() is None, "the job ended before the kill"

        # Meanwhile: the partition that lived only on the dead node cannot be read, and the read says so.
        survivors = kafka.with_bootstrap(",".join(f"127.0.0.1:{n.port}" for n in cluster.members
                                                  if n.node_id != victim))
        with pytest.raises(SourceError, match=r"single"):
            list(kafka_util.read_to_end(survivors.consumer_config("t-single"), single, max_wait=5))

        # The cluster noticed: the node's replicated partitions have other leaders and an ISR without it.
        def failed_over() -> bool:
            return all(leader != victim and victim not in isr
                       for leader, nodes, isr in replicas_of(admin, victim).values() if len(nodes) > 1)

        wait_for(f"the partitions of node {victim} to fail over", failed_over, 60)
        assert job.wait(180) == 0, (tmp_path / "job.log").read_text()[-5000:]
        for i, proc in enumerate(consumers):
            assert proc.wait(180) == 0, replicas.log(f"c{i}")[-5000:]
        assert sim.messages_sent > sent_at_kill
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait(10)
        replicas.close()
        sim.stop_thread()

    final = load_job(kafka.consumer_config("t-ctl"), TopicMap(prefix).control, JOB)
    assert final is not None and final.status == "finished" and final.stop_reason == "end_cursor_reached"
    events = job_events()
    assert stored_offsets(pg_url, schema, replicas.group) == data_offsets(final.offsets)
    assert_tables_equal(snapshot(pg_url, schema), expected(events))
    assert_committed_exactly_once(kafka, events)

    # The node comes back: registered, and in the ISR of every partition it holds a replica of.
    cluster.restart(victim)
    assert victim in cluster.brokers_registered()

    def back_in_sync() -> bool:
        now = replicas_of(kafka_util.admin(kafka.client_config()), victim)
        return bool(now) and all(victim in isr for _, _, isr in now.values())

    wait_for(f"node {victim} back in the ISR of its partitions", back_in_sync, 90)
    assert len(list(kafka_util.read_to_end(kafka.consumer_config("t-single"), single, max_wait=30))) == 300

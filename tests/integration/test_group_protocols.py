"""Both consumer-group protocols on the session's Apache Kafka: the classic protocol and Kafka 4's
consumer protocol (KIP-848, ``--group-protocol consumer``), each with two members sharing the work.

* ``backfill consume postgres``: two processes of one group end with the exact tables and offsets,
  and ``backfill status`` shows the group done (no records left, no lag).
* ``backfill repos --from-topic``: two replicas share the DID work topic, each DID done once.
* the embedded broker (Tansu, the demo's): why its consumers keep a short session timeout.

Under the consumer protocol the broker assigns the partitions and sets the session timeout and
heartbeat (the test broker: 6 s and 0.5 s); the rebalance callbacks are incremental either way.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, ConsumerGroupType

from runtime.commands.status import collect
from runtime.contract.topics import TopicMap
from runtime.errors import ConfigError
from runtime.kafka import clients as kafka_util
from runtime.kafka.broker import start_embedded_broker
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.pds import PdsNetwork
from tests.integration.pg_pipeline import (
    assert_tables_equal,
    expected,
    make_events,
    produce,
    snapshot,
    stored_offsets,
)
from tests.integration.replicas import SLOW, Replicas, data_offsets
from tests.integration.repos_support import assert_limits_kept
from tests.integration.work_replicas import check_exact, run_two, simulated_network

pytestmark = [pytest.mark.integration, pytest.mark.slow]


PROTOCOLS = ["classic", "consumer"]
GROUP_TYPE = {"classic": ConsumerGroupType.CLASSIC, "consumer": ConsumerGroupType.CONSUMER}
ASSIGNED = re.compile(r"assigned (\d+) partitions")


def group_type(kafka: KafkaSettings, group: str) -> ConsumerGroupType | None:
    """The protocol the broker runs ``group`` with (an empty group keeps its last members' one)."""
    admin = kafka_util.admin(kafka.client_config())
    listed = admin.list_consumer_groups(request_timeout=10).result()
    types = [g.type for g in listed.valid if g.group_id == group]
    return types[0] if types else None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_two_postgres_consumers_end_exact(kafka: KafkaSettings, pg_url: str, schema: str, replicas: Replicas,
                                          protocol: str) -> None:
    events = make_events(3000, seed=61, job="gp")
    # Both members join before the data exists, so neither can finish it alone before the other is in.
    topics = TopicMap(kafka.topic_prefix)
    kafka_util.ensure_topics(kafka_util.admin(kafka.client_config()),
                             {topics.for_event(e) for e in events}, partitions=kafka.topic_partitions, replication=1)
    procs = [replicas.start(f"m{i}", *SLOW, "--group-protocol", protocol, "--until-done", "gp") for i in range(2)]
    deadline = time.monotonic() + 90
    while not all(any(int(n) for n in ASSIGNED.findall(replicas.log(f"m{i}"))) for i in range(2)):
        for i, proc in enumerate(procs):
            assert proc.poll() is None, replicas.log(f"m{i}")[-3000:]
        assert time.monotonic() < deadline, f"both members never held partitions under the {protocol} protocol"
        time.sleep(0.1)
    final = data_offsets(produce(kafka, events, "gp"))
    for i, proc in enumerate(procs):
        assert proc.wait(180) == 0, replicas.log(f"m{i}")[-3000:]
    for i in range(2):
        got = [int(n) for n in ASSIGNED.findall(replicas.log(f"m{i}"))]
        assert any(got), f"member m{i} never got a partition under the {protocol} protocol: {got}"
    assert group_type(kafka, replicas.group) == GROUP_TYPE[protocol]
    assert stored_offsets(pg_url, schema, replicas.group) == final
    assert_tables_equal(snapshot(pg_url, schema), expected(events))
    # the group is done: its committed positions passed the commit markers
    (g,) = [g for g in collect(kafka, timeout=10).groups if g.group == replicas.group]
    assert (g.records_left, g.records_left_exact, g.lag) == (0, True, 0), g


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_two_repo_replicas_share_the_work(kafka: KafkaSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          protocol: str) -> None:
    monkeypatch.setenv("BACKFILL_GROUP_PROTOCOL", protocol)  # the replicas' environment
    net: PdsNetwork = simulated_network(200, seed=71)
    try:
        started = time.monotonic()
        out, aborted = run_two(kafka, net, tmp_path, timeout=150)  # both replicas did some of it
        check_exact(out, net, set(), kafka)  # Kafka hides aborted transactions: nothing twice
        assert_limits_kept(net)
        assert group_type(kafka, "atproto-backfill-repos-repos") == GROUP_TYPE[protocol]
        print(f"\n{protocol}: {len(net.dids)} DIDs by 2 replicas in {time.monotonic() - started:.1f} s, "
              f"{len(aborted)} DIDs of rebalance-aborted transactions redone")
    finally:
        net.stop_thread()


def _first_assignment_s(conf: dict[str, object], topic: str) -> float:
    consumer = Consumer(conf)
    started = time.monotonic()
    try:
        consumer.subscribe([topic])
        while not consumer.assignment():
            assert time.monotonic() - started < 60, "never assigned"
            consumer.poll(0.05)
        return time.monotonic() - started
    finally:
        consumer.close()


def test_the_embedded_broker_answers_a_join_after_half_the_session_timeout(tmp_path: Path) -> None:
    """Why consumers of an embedded broker (the demo) get a 6 s session: Tansu answers JoinGroup
    only after half the member's session timeout, where Kafka answers at once."""
    try:
        broker = start_embedded_broker(log_path=tmp_path / "tansu.log")
    except ConfigError as e:
        pytest.skip(str(e))
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, topic_prefix="tansu")
        admin = kafka_util.admin(kafka.client_config())
        kafka_util.ensure_topics(admin, ["tansu.join"], partitions=1, replication=1)
        default = kafka.consumer_config("g-default")
        assert default["session.timeout.ms"] == 6000
        short = _first_assignment_s(default, "tansu.join")
        longer = _first_assignment_s(kafka.consumer_config("g-longer", **{"session.timeout.ms": 16000}), "tansu.join")
        assert short < 6.0
        assert longer >= 7.5, f"a 16 s session joined in {longer:.1f} s"
    finally:
        broker.stop()

"""A resume behind a slow broker (issue 18): the checkpoint read either sees the stored checkpoint or
fails loudly; it is never taken for "no checkpoint".

A dedicated Apache Kafka node advertises a second listener at the address of a delaying TCP proxy
(``tests/integration/proxy.py``): clients that bootstrap through the proxy send every request
through it, and each response waits ``delay`` seconds. The checks read the topics directly, past
the proxy.

* ``read_to_end`` through the slow broker reads everything when its time allows, else raises.
* A Jetstream job stopped after a few checkpoints, resumed (``backfill jetstream --resume``) at 0.4 s
  per response: it resumes from its checkpoint and the topics hold every event exactly once.
* The same with a ``--control-timeout`` the read cannot meet: the resume exits 1 with a message
  saying it cannot tell whether the job has a checkpoint, writes nothing, and never starts fresh;
  a later resume completes the job exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from producers.jetstream.decode import decode_message
from runtime.contract.nsid import CollectionFilter
from runtime.contract.records import event_key
from runtime.contract.timeparse import us_to_iso
from runtime.contract.topics import TopicMap
from runtime.errors import SourceError
from runtime.kafka import clients as kafka_util
from runtime.kafka.checkpoint import JobState, load_job
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.jetstream import JetstreamSimulator, synthetic_events
from tests.integration.eos import committed_event_keys
from tests.integration.proxy import DelayProxy
from tests.kafka.cluster import KafkaCluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
START = 1_700_000_000_000_000
EVENTS = synthetic_events(3000, seed=31, accounts=60, start_us=START, rate=1000, real_cids=False)
END = EVENTS[2500].time_us
COLLECTIONS = ["app.bsky.feed.like", "app.bsky.graph.*"]
#: Seconds each response of the slow broker waits (the review's reproduction: 0.4 s).
SLOW = 0.4


class SlowBroker:
    """A one-node Kafka whose clients go through a delaying proxy (``slow``) or straight to it (``direct``)."""

    def __init__(self, cluster: KafkaCluster, proxy: DelayProxy) -> None:
        self.cluster = cluster
        self.proxy = proxy

    def settings(self, prefix: str, *, through_proxy: bool) -> KafkaSettings:
        servers = self.proxy.address if through_proxy else self.cluster.bootstrap
        return KafkaSettings(bootstrap_servers=servers, topic_prefix=prefix, topic_partitions=3)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlowBroker]:
    proxy = DelayProxy().start()
    cluster = KafkaCluster(tmp_path_factory.mktemp("slow-kafka"), nodes=1, heap_mb=384, external={1: proxy.address})
    try:
        cluster.start()
        proxy.target = ("127.0.0.1", cluster.node(1).external_port or 0)
        yield SlowBroker(cluster, proxy)
    finally:
        cluster.stop(grace=5)
        proxy.stop()


@pytest.fixture
def slow(broker: SlowBroker) -> Iterator[SlowBroker]:
    """The broker, fast again after the test."""
    broker.proxy.delay = 0.0
    yield broker
    broker.proxy.delay = 0.0


@pytest.fixture(scope="module")
def sim() -> Iterator[JetstreamSimulator]:
    s = JetstreamSimulator(EVENTS, rate_limit=500).start_in_thread()  # 5 s to the end
    yield s
    s.stop_thread()


def _expected_keys(job: str) -> Counter[str]:
    """The events the job commits to the topics, once each: the wanted collections' commits and every
    identity and account event before the end."""
    f = CollectionFilter(COLLECTIONS)
    return Counter(event_key(decode_message(e.text, job=job)) for e in EVENTS
                   if START <= e.time_us < END and (e.collection is None or f(e.collection)))


def _jetstream(sim: JetstreamSimulator, kafka: KafkaSettings, job: str, log: Path, *extra: str) -> int:
    """``backfill jetstream`` (a subprocess) producing only; its exit status."""
    args = [sys.executable, "-m", "runtime", "jetstream", "--instance", sim.url, "--cursor", str(START),
            "--end-timestamp", us_to_iso(END), "--bootstrap-servers", kafka.bootstrap_servers,
            "--topic-prefix", kafka.topic_prefix, "--topic-partitions", "3", "--job", job, "--consumer", "none",
            "--progress", "none", "--checkpoint-every", "150", "--checkpoint-interval", "0.3", "--end-idle", "1",
            *(a for c in COLLECTIONS for a in ("-c", c)), *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "KAFKA_", "JETSTREAM_"))}
    with log.open("ab") as out:
        proc = subprocess.run(args, env={**env, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT, timeout=240, check=False)
    return proc.returncode


def _state(kafka: KafkaSettings, job: str) -> JobState | None:
    return load_job(kafka.consumer_config("t-reader"), TopicMap(kafka.topic_prefix).control, job)


def _stopped_job(slow: SlowBroker, sim: JetstreamSimulator, tmp_path: Path) -> tuple[KafkaSettings, str, JobState]:
    """A job that ran through the proxy (fast) for 2 of the stream's 5 seconds and stopped, after a few
    checkpoints."""
    prefix, job = f"s{uuid.uuid4().hex[:8]}", "slowjob"
    through = slow.settings(prefix, through_proxy=True)
    assert _jetstream(sim, through, job, tmp_path / "run1.log", "-n", "0", "-t", "2") == 0, \
        (tmp_path / "run1.log").read_text()[-3000:]
    state = _state(slow.settings(prefix, through_proxy=False), job)
    assert state is not None, "the first run wrote no checkpoint"
    assert state.checkpoint >= 3 and (state.status, state.stop_reason) == ("stopped", "max_time"), state
    return through, job, state


def test_a_read_through_a_slow_broker_reads_everything_in_its_time_or_raises(slow: SlowBroker) -> None:
    prefix = f"s{uuid.uuid4().hex[:8]}"
    direct = slow.settings(prefix, through_proxy=False)
    control = TopicMap(prefix).control
    kafka_util.ensure_topics(kafka_util.admin(direct.client_config()), [control], partitions=1, replication=1)
    producer = Producer(direct.producer_config(transactional_id=f"w-{prefix}"))
    producer.init_transactions(30)
    for n in range(1, 4):
        producer.begin_transaction()
        producer.produce(control, JobState(job="j", source="jetstream", checkpoint=n).to_bytes(), b"j")
        producer.commit_transaction(30)
    through = slow.settings(prefix, through_proxy=True).consumer_config("t-slow")
    slow.proxy.delay = SLOW
    delayed = slow.proxy.delayed
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"within 1 s"):
        load_job(through, control, "j", max_wait=1, must_exist=True)
    assert time.monotonic() - t0 < 10
    state = load_job(through, control, "j", max_wait=30, must_exist=True)
    assert state is not None and state.checkpoint == 3
    assert slow.proxy.delayed > delayed, "the reads did not go through the proxy"


def test_a_resume_behind_a_slow_broker_resumes_exactly(slow: SlowBroker, sim: JetstreamSimulator,
                                                       tmp_path: Path) -> None:
    through, job, stopped = _stopped_job(slow, sim, tmp_path)
    slow.proxy.delay = SLOW
    delayed = slow.proxy.delayed
    log = tmp_path / "run2.log"
    code = _jetstream(sim, through, job, log, "--resume", "-n", "0", "-t", "150")
    text = log.read_text()
    assert slow.proxy.delayed - delayed > 50, "the resume did not go through the slow proxy"
    slow.proxy.delay = 0.0
    assert "starting fresh" not in text, text[-3000:]
    assert code == 0, text[-3000:]
    [resumed] = [ln for ln in text.splitlines() if f"job {job}: resuming" in ln]
    assert f"from cursor {stopped.cursor} (checkpoint {stopped.checkpoint}," in resumed, resumed
    direct = slow.settings(through.topic_prefix, through_proxy=False)
    final = _state(direct, job)
    assert final is not None
    assert (final.status, final.runs) == ("finished", stopped.runs + 1)
    assert final.checkpoint > stopped.checkpoint
    assert committed_event_keys(direct) == _expected_keys(job)


def test_a_resume_that_cannot_read_its_checkpoint_in_time_refuses_loudly(
        slow: SlowBroker, sim: JetstreamSimulator, tmp_path: Path) -> None:
    through, job, stopped = _stopped_job(slow, sim, tmp_path)
    direct = slow.settings(through.topic_prefix, through_proxy=False)
    before = committed_event_keys(direct)
    slow.proxy.delay = SLOW
    log = tmp_path / "run2.log"
    code = _jetstream(sim, through, job, log, "--resume", "-n", "0", "-t", "150", "--control-timeout", "1")
    slow.proxy.delay = 0.0
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert "starting fresh" not in text, text[-3000:]
    [line] = [ln for ln in text.splitlines() if "stopping:" in ln]
    assert f"job {job}: cannot tell whether it has a checkpoint" in line, line
    assert "raise --control-timeout (now 1 s)" in line, line
    assert "Traceback" not in text, text[-3000:]
    # Nothing was written: the checkpoint and the topics are as the stopped run left them.
    assert _state(direct, job) == stopped
    assert committed_event_keys(direct) == before
    # A resume that can read its checkpoint completes the job exactly.
    assert _jetstream(sim, through, job, tmp_path / "run3.log", "--resume", "-n", "0", "-t", "150") == 0, \
        (tmp_path / "run3.log").read_text()[-3000:]
    final = _state(direct, job)
    assert final is not None and (final.status, final.runs) == ("finished", stopped.runs + 1)
    assert committed_event_keys(direct) == _expected_keys(job)

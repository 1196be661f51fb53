"""``backfill repos --from-topic`` replicas (subprocesses) sharing the DID work topic.

Two replicas backfill the simulated network's accounts with no DID done twice or missed, the hosts'
rate limits are never exceeded (the simulator counts), and kill -9 of a replica in the middle of a
transaction, restarted with its id, leaves every DID's status and every record exactly once in
the topics (read_committed): what the replicas commit, not what a sink would de-duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry
from tenacity import wait_none

from producers.identity.resolver import DidResolver
from producers.netsafety import NetworkPolicy
from producers.repos.decode import RecordFilter
from producers.repos.pds import PdsClient, PdsLimits
from producers.repos.source import Fetched, RepoFetcher, RepoProcessor, RepoResult
from producers.repos.worktopic import WorkOptions, WorkTopicRunner, enqueue_dids
from producers.source import Drop, Skip
from runtime.contract.codec import AvroCodec
from runtime.contract.records import RecordEvent
from runtime.contract.topics import TopicMap
from runtime.kafka.checkpoint import load_job, load_jobs
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from runtime.simulator.pds import PdsNetwork
from tests.integration.eos import kill_in_transaction
from tests.integration.repos_support import (
    assert_limits_kept,
    assert_same_keys,
    expected_keys,
    poison,
    read_back,
)
from tests.integration.work_replicas import (
    aborted_dids,
    check_exact,
    run_two,
    simulated_network,
    start_replica,
    wait_replicas,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def net(request: pytest.FixtureRequest) -> Iterator[PdsNetwork]:
    accounts = getattr(request, "param", 200)
    network = simulated_network(accounts, seed=accounts)
    try:
        yield network
    finally:
        network.stop_thread()


@contextlib.contextmanager
def _enqueued(kafka: KafkaSettings, accounts: int, seed: int, records_mean: int) -> Iterator[PdsNetwork]:
    """A small simulated network on 2 hosts, started, with every DID in the work topic."""
    network = PdsNetwork(accounts=accounts, hosts=2, seed=seed, records_mean=records_mean).start_in_thread()
    try:
        assert enqueue_dids(kafka, network.dids, origin="test") == accounts
        yield network
    finally:
        network.stop_thread()


#: For the classic group protocol: a killed replica's partitions move to the others 6 s after its
#: last heartbeat (the default session is 45 s).
FAST_EVICTION = ("--kafka-config", "session.timeout.ms=6000")


@pytest.mark.slow
def test_two_replicas_share_the_work(kafka: KafkaSettings, net: PdsNetwork, tmp_path: Path) -> None:
    out, redone = run_two(kafka, net, tmp_path, timeout=150)
    check_exact(out, net, redone, kafka)
    assert_limits_kept(net)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("net", [1000], indirect=True)
def test_two_replicas_backfill_1000_accounts(kafka: KafkaSettings, net: PdsNetwork, tmp_path: Path) -> None:
    started = time.monotonic()
    out, redone = run_two(kafka, net, tmp_path, timeout=360)
    elapsed = time.monotonic() - started
    check_exact(out, net, redone, kafka)
    assert_limits_kept(net)
    print(f"\n1000 accounts, {len(out.events)} records by 2 replicas in {elapsed:.1f} s "
          f"({len(net.dids) / elapsed:.1f} repos/s)")


@pytest.mark.slow
def test_kill_9_of_a_replica_mid_transaction_loses_and_duplicates_nothing(kafka: KafkaSettings, net: PdsNetwork,
                                                                        tmp_path: Path) -> None:
    assert enqueue_dids(kafka, net.dids, origin="test") == len(net.dids)
    logs = [tmp_path / "r1.log", tmp_path / "r2.log"]
    procs = [start_replica(kafka, net, f"r{i + 1}", logs[i], extra=FAST_EVICTION) for i in range(2)]
    try:
        # Once a third of the repositories were served, kill -9 replica r1 while the broker holds data
        # of its open transaction (r2 is frozen meanwhile, so the open transaction is r1's).
        held = kill_in_transaction(procs[0], kafka, others=[procs[1]], timeout=90,
                                   ready=lambda: sum(h.stats.statuses[200] for h in net.hosts) >= len(net.dids) // 3)
    finally:
        if procs[0].poll() is None:
            procs[0].kill()
            procs[0].wait(10)
    assert held
    # Restart it with the same id (as a StatefulSet would): its open transaction is fenced and aborted.
    procs[0] = start_replica(kafka, net, "r1", logs[0], extra=FAST_EVICTION)
    wait_replicas(procs, 150, logs)
    out = read_back(kafka)
    # Exactly once: the aborted transaction's statuses and records are invisible, its work items
    # were done again by whoever owned their partitions next.
    check_exact(out, net, aborted_dids(logs), kafka)
    assert {s["replica"] for s in out.statuses} == {"r1", "r2"}
    assert_limits_kept(net)


@pytest.mark.slow
def test_a_second_instance_of_a_replica_id_fences_the_first(kafka: KafkaSettings, net: PdsNetwork,
                                                           tmp_path: Path) -> None:
    """Two processes with one replica id (one transactional id): the second fences the first, which
    stops loudly (status 1, one clear line, no traceback); the second backfills the rest; every DID's
    status and every record exactly once."""
    assert enqueue_dids(kafka, net.dids, origin="test") == len(net.dids)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = start_replica(kafka, net, "f1", logs[0])
    second: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 60
        control = TopicMap(kafka.topic_prefix).control
        while load_job(kafka.consumer_config("t"), control, "repos@f1", settle=0) is None:  # it committed a transaction
            assert first.poll() is None, logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, "the first instance made no progress"
            time.sleep(0.05)
        second = start_replica(kafka, net, "f1", logs[1])
        assert first.wait(60) == 1, logs[0].read_text()[-3000:]
        wait_replicas([second], 150, [logs[1]])
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = logs[0].read_text()
    [line] = [ln for ln in text.splitlines() if "CRITICAL" in ln]
    assert "replica f1: fenced by a newer instance with the same replica id" in line, line
    assert "Traceback" not in text, text[-3000:]
    check_exact(read_back(kafka), net, aborted_dids(logs), kafka)


class _CrashingProcessor(RepoProcessor):
    """Dies (like a kill -9) in the middle of the ``crash_at``-th repository of a transaction."""

    def __init__(self, crash_at: int) -> None:
        super().__init__(RecordFilter(), job="repos")
        self.crash_at = crash_at
        self.seen: list[str] = []

    def items(self, fetched: Fetched, result: RepoResult) -> Iterator[RecordEvent | Drop | Skip]:
        self.seen.append(fetched.did)
        for n, item in enumerate(super().items(fetched, result)):
            if len(self.seen) == self.crash_at and n == 1:
                raise RuntimeError("simulated crash inside an open transaction")
            yield item


class _InProcess:
    """A replica in this process, with its own HTTP clients on the simulated network."""

    def __init__(self, kafka: KafkaSettings, net: PdsNetwork, tmp: Path, opts: WorkOptions, *,
                 processor: RepoProcessor | None = None, metrics: Metrics | None = None,
                 make_fetcher: Callable[..., RepoFetcher] = RepoFetcher, rate: float = 50, burst: int = 10) -> None:
        self.resolver = DidResolver(net.plc_url, policy=NetworkPolicy(allow_private=True))
        self.pds = PdsClient(PdsLimits(rate=rate, burst=burst), policy=NetworkPolicy(allow_private=True),
                             wait=wait_none())
        self.metrics = metrics or Metrics(CollectorRegistry())
        self.runner = WorkTopicRunner(kafka, opts, make_fetcher(self.resolver, self.pds, tmp, wait=wait_none()),
                                      processor or RepoProcessor(RecordFilter(), job="repos"), self.metrics,
                                      AvroCodec())

    async def run(self) -> None:
        try:
            await self.runner.run()
        finally:
            await self.pds.aclose()
            await self.resolver.aclose()


async def _replica_in_process(kafka: KafkaSettings, net: PdsNetwork, tmp: Path, processor: RepoProcessor,
                              replica: str) -> WorkTopicRunner:
    replica_ = _InProcess(kafka, net, tmp, WorkOptions(job="repos", replica=replica, idle_exit=1.0, txn_max_dids=50),
                          processor=processor)
    await replica_.run()
    return replica_.runner


@pytest.mark.parametrize("net", [30], indirect=True)
def test_a_crash_inside_a_transaction_is_redone(kafka: KafkaSettings, net: PdsNetwork, tmp_path: Path) -> None:
    """The open transaction of a crashed replica is aborted when it restarts with its id, and its DIDs
    are done again: every status and record exactly once."""
    active = net.dids_in_state("active")
    assert enqueue_dids(kafka, active, origin="test") == len(active)
    crashing = _CrashingProcessor(crash_at=8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        asyncio.run(_replica_in_process(kafka, net, tmp_path, crashing, "c1"))
    crashed_at = time.time() * 1e6
    runner = asyncio.run(_replica_in_process(kafka, net, tmp_path, RepoProcessor(RecordFilter(), job="repos"), "c1"))
    assert runner.stats.dids_done > 0
    out = read_back(kafka)
    statuses = out.status_by_did()
    assert set(statuses) == set(active)
    assert all(len(ss) == 1 for ss in statuses.values()), {d: len(ss) for d, ss in statuses.items() if len(ss) > 1}
    crashed_did = crashing.seen[-1]
    [status] = statuses[crashed_did]
    assert status["time_us"] > crashed_at  # done after the crash, by the restarted replica
    assert_same_keys(out.keys(), expected_keys(net, active), kafka)


def test_a_refused_record_is_dead_lettered_by_a_replica(kafka: KafkaSettings, tmp_path: Path) -> None:
    network = PdsNetwork(accounts=3, hosts=1, seed=12, records_mean=10).start_in_thread()
    try:
        did = network.dids[0]
        bad = poison(network, did)
        assert enqueue_dids(kafka, network.dids, origin="test") == 3
        asyncio.run(_replica_in_process(kafka, network, tmp_path, RepoProcessor(RecordFilter(), job="repos"), "p1"))
        out = read_back(kafka)
        want = expected_keys(network)
        del want[(did, bad, network.accounts[did].record_cids[bad])]
        assert_same_keys(out.keys(), want)
        [status] = out.status_by_did()[did]
        assert status["records"] == len(network.accounts[did].record_cids) - 1
        assert status["dropped"] == {"invalid_record": 1}
        assert [d["reason"] for d in out.dead] == ["invalid_record"]
    finally:
        network.stop_thread()


def test_dids_enqueued_twice_are_done_once(kafka: KafkaSettings, tmp_path: Path) -> None:
    network = PdsNetwork(accounts=6, hosts=2, seed=13, records_mean=5).start_in_thread()
    try:
        assert enqueue_dids(kafka, network.dids + network.dids, origin="test") == 12
        runner = asyncio.run(_replica_in_process(kafka, network, tmp_path,
                                                 RepoProcessor(RecordFilter(), job="repos"), "d1"))
        assert runner.stats.dids_done == 6
        assert runner.stats.skipped == 6
        # and a later run of the same job (a restart) skips them all: the done-set comes from repo_status
        assert enqueue_dids(kafka, network.dids[:3], origin="test") == 3
        again = asyncio.run(_replica_in_process(kafka, network, tmp_path,
                                                RepoProcessor(RecordFilter(), job="repos"), "d2"))
        assert again.stats.dids_done == 0
        assert again.stats.skipped == 3
        out = read_back(kafka)
        assert all(len(s) == 1 for s in out.status_by_did().values())
        assert_same_keys(out.keys(), expected_keys(network))
        # each replica's progress is in the control topic (what ``backfill status`` shows)
        jobs = load_jobs(kafka.consumer_config("progress-reader"), TopicMap(kafka.topic_prefix).control)
        assert jobs["repos@d1"].status == "finished"
        assert jobs["repos@d1"].counts["dids"] == 6
        assert jobs["repos@d2"].counts["skipped_done"] == 3
    finally:
        network.stop_thread()


class _AbortOnce:
    """The replica's real producer, except that the first offsets commit fails the way a rebalance
    makes it fail on a real Kafka (an abortable transaction error)."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer
        self.failed = 0

    def send_offsets_to_transaction(self, *args: Any, **kwargs: Any) -> None:
        if not self.failed:
            self.failed += 1
            raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION, "generation moved on",
                                            txn_requires_abort=True))
        self._producer.send_offsets_to_transaction(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


def test_a_transaction_aborted_by_a_rebalance_is_redone(kafka: KafkaSettings, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    with _enqueued(kafka, 8, seed=14, records_mean=6) as network:
        metrics = Metrics(CollectorRegistry())
        replica = _InProcess(kafka, network, tmp_path, WorkOptions(job="repos", replica="a1", idle_exit=1.0,
                                                                   txn_max_dids=3), metrics=metrics)
        runner = replica.runner
        runner.prepare()
        wrapped = _AbortOnce(runner.publisher.producer)
        runner.publisher.producer = wrapped  # type: ignore[assignment]
        asyncio.run(replica.run())
        assert wrapped.failed == 1
        assert runner.stats.aborted == 1
        assert runner.stats.dids_done == 8  # the aborted transaction's DIDs were done again
        assert metrics.registry.get_sample_value("atproto_backfill_repos_transactions_aborted_total") == 1
        out = read_back(kafka)
        statuses = out.status_by_did()
        assert set(statuses) == set(network.dids)
        # The aborted transaction is invisible (read_committed): every status and record once.
        assert all(len(ss) == 1 for ss in statuses.values())
        assert_same_keys(out.keys(), expected_keys(network), kafka)
        assert "transaction 1 aborted" in caplog.text  # the warning names the transaction and its DIDs


class _GatedFetcher(RepoFetcher):
    """Fetches nothing until ``gate`` opens, so the replica's partitions fill up and pause."""

    def __init__(self, gate: threading.Event, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    async def fetch(self, did: str, cursor: int) -> Fetched:
        while not self.gate.is_set():
            await asyncio.sleep(0.05)
        return await super().fetch(did, cursor)


def _visit_group(kafka: KafkaSettings, group: str, topic: str, until: float) -> list[int]:
    """Join ``group`` as a second member, take a share of its partitions, then leave; return that share."""
    got: list[int] = []

    def on_assign(c: Consumer, parts: list[TopicPartition]) -> None:
        got.extend(p.partition for p in parts)
        c.incremental_assign(parts)

    visitor = Consumer(kafka.consumer_config(group, **{"enable.auto.commit": False}))
    visitor.subscribe([topic], on_assign=on_assign)
    try:
        while not got and time.monotonic() < until:
            visitor.poll(0.1)  # its messages are not committed: the partitions go back unprocessed
    finally:
        visitor.unsubscribe()
        while visitor.assignment() and time.monotonic() < until:
            visitor.poll(0.1)
        visitor.close()
    return got


def test_paused_partitions_come_back_resumed_after_a_rebalance(kafka: KafkaSettings, tmp_path: Path) -> None:
    """librdkafka keeps a partition's pause across its revocation; a replica that paused a partition
    (its prefetch window full), lost it to another member and got it back must still consume it."""
    network = PdsNetwork(accounts=30, hosts=2, seed=15, records_mean=3).start_in_thread()
    gate = threading.Event()
    try:
        assert enqueue_dids(kafka, network.dids, origin="test") == 30
        replica = _InProcess(kafka, network, tmp_path,
                             WorkOptions(job="repos", replica="z1", idle_exit=1.0, prefetch=2, max_time=90),
                             make_fetcher=functools.partial(_GatedFetcher, gate), rate=100, burst=20)
        runner = replica.runner
        visited: list[int] = []

        def visit() -> None:
            deadline = time.monotonic() + 60
            while len(runner._paused) < kafka.topic_partitions and time.monotonic() < deadline:
                time.sleep(0.05)  # the replica holds a full window of every partition, paused
            visited.extend(_visit_group(kafka, runner.group, runner.topics.dids, deadline))
            gate.set()

        async def go() -> None:
            visitor = asyncio.create_task(asyncio.to_thread(visit))
            try:
                await replica.run()
            finally:
                gate.set()
                await visitor

        asyncio.run(go())
        assert visited, "the visitor got no partition"
        assert runner.stats.stop_reason == "idle"
        assert runner.stats.dids_done == 30
        assert set(read_back(kafka).status_by_did()) == set(network.dids)
    finally:
        gate.set()
        network.stop_thread()


def test_a_partition_that_stops_delivering_is_restarted(kafka: KafkaSettings, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A partition librdkafka stops delivering (here: paused behind the replica's back, as a pause
    kept across a rebalance leaves it) is found by the idle replica and restarted at its committed
    offset, so the replica still finishes the whole topic."""
    with _enqueued(kafka, 12, seed=16, records_mean=3) as network:
        metrics = Metrics(CollectorRegistry())
        replica = _InProcess(kafka, network, tmp_path, WorkOptions(job="repos", replica="s1", idle_exit=1.0,
                                                                   max_time=90, stuck_after=3.0),
                             metrics=metrics, rate=100, burst=20)
        runner = replica.runner
        real_on_assign = runner._on_assign
        hidden: list[int] = []

        def on_assign(consumer: Consumer, partitions: list[TopicPartition]) -> None:
            real_on_assign(consumer, partitions)
            if not hidden and partitions:
                hidden.append(partitions[0].partition)
                consumer.pause([partitions[0]])  # the replica does not know of this pause

        runner._on_assign = on_assign  # type: ignore[method-assign]
        runner.prepare()
        asyncio.run(replica.run())
        assert hidden
        assert runner.stats.stop_reason == "idle"
        assert runner.stats.dids_done == 12
        # only the hidden partition: the others were delivering (a fresh assignment gets stuck_after)
        assert f"partitions [{hidden[0]}] have work past their committed offsets" in caplog.text
        assert metrics.registry.get_sample_value("atproto_backfill_repos_fetch_restarts_total") == 1
        assert set(read_back(kafka).status_by_did()) == set(network.dids)


def test_each_transaction_moves_the_group_offsets_to_the_ones_it_carried(kafka: KafkaSettings,
                                                                        tmp_path: Path) -> None:
    """Kafka stores a transaction's work offsets with its records: once ``commit_transaction``
    returned, the group's committed offsets (an OffsetFetch that waits for stable offsets) are the
    ones the transaction carried, so a replica needs no check or repair after it."""
    with _enqueued(kafka, 24, seed=17, records_mean=3) as network:
        replica = _InProcess(kafka, network, tmp_path, WorkOptions(job="repos", replica="o1", idle_exit=1.0,
                                                                   txn_max_dids=2, max_time=90), rate=100, burst=20)
        runner = replica.runner
        real_cycle = runner._cycle
        seen: list[tuple[dict[int, int], dict[int, int]]] = []

        def cycle(batch: list[Any]) -> tuple[list[Any], list[Any]]:
            out, kept = real_cycle(batch)
            carried = {i.partition: i.offset + 1 for i, _ in out}
            assert runner._consumer is not None
            got = runner._consumer.committed([TopicPartition(runner.topics.dids, p) for p in sorted(carried)],
                                             timeout=30)
            seen.append((carried, {tp.partition: tp.offset for tp in got}))
            return out, kept

        runner._cycle = cycle  # type: ignore[method-assign]
        asyncio.run(replica.run())
        assert runner.stats.stop_reason == "idle"
        assert runner.stats.dids_done == 24
        assert len(seen) >= 12  # at most 2 DIDs per transaction
        assert [got for _, got in seen] == [carried for carried, _ in seen]
        statuses = read_back(kafka).status_by_did()
        assert set(statuses) == set(network.dids)
        assert all(len(s) == 1 for s in statuses.values())


class _SlowProcessor(RepoProcessor):
    """Each repository takes ``seconds`` on the replica's clock (``skew`` moves it on; no real wait)."""

    def __init__(self, skew: list[float], seconds: float) -> None:
        super().__init__(RecordFilter(), job="repos")
        self.skew = skew
        self.seconds = seconds

    def items(self, fetched: Fetched, result: RepoResult) -> Iterator[RecordEvent | Drop | Skip]:
        yield from super().items(fetched, result)
        self.skew[0] += self.seconds


def test_transactions_are_bounded_by_records_and_time(kafka: KafkaSettings, tmp_path: Path) -> None:
    """A transaction takes DIDs while its records (counted with each repository's tree entries, before
    any is produced) stay within --txn-max-records and it has been open less than --txn-max-seconds; a
    repository larger than the record bound commits alone, whole. The result is exact."""
    network = PdsNetwork(accounts=40, hosts=2, seed=19, records_mean=8, big_every=9, big_records=120,
                         inactive={"deactivated": 0.05}).start_in_thread()
    try:
        assert enqueue_dids(kafka, network.dids, origin="test") == 40
        skew = [0.0]
        replica = _InProcess(kafka, network, tmp_path,
                             WorkOptions(job="repos", replica="b1", idle_exit=1.0, max_time=120, concurrency=64,
                                         txn_max_dids=200, txn_max_records=50, txn_max_seconds=1.0),
                             processor=_SlowProcessor(skew, 0.3), rate=100, burst=20)
        runner = replica.runner
        runner.clock = lambda: time.monotonic() + skew[0]
        runner.prepare()
        # Every repository is fetched before the first transaction, so the bounds alone cut them.
        runner.fetcher = _Prefetched(runner.fetcher, len(network.dids))  # type: ignore[assignment]
        asyncio.run(replica.run())
        assert runner.stats.stop_reason == "idle"
        out = read_back(kafka)
        check_exact(out, network, kafka=kafka)
        by_batch: dict[int, list[dict[str, Any]]] = {}
        for status in out.statuses:
            by_batch.setdefault(status["batch"], []).append(status)
        big = {d for d, a in network.accounts.items() if a.state == "active" and len(a.record_cids) > 50}
        assert big, "no repository larger than the record bound"
        for batch, statuses in sorted(by_batch.items()):
            records = sum(s["records"] for s in statuses)
            dids = [s["did"] for s in statuses]
            # 0.3 s per repository: one starts at 0, 0.3, 0.6 and 0.9 s at the latest, none at 1.2 s
            assert len(dids) <= 4, f"transaction {batch} took DIDs after 1 s: {len(dids)} DIDs"
            if set(dids) & big:
                assert len(dids) == 1, f"transaction {batch}: a repository over the bound shared it: {dids}"
                assert records == len(network.accounts[dids[0]].record_cids) > 50
            else:
                assert records <= 50, f"transaction {batch} carried {records} records: {dids}"
        assert runner.stats.cut.get("records", 0) > 0 and runner.stats.cut.get("seconds", 0) > 0, runner.stats.cut
        assert runner.stats.txn_records_max == max(len(network.accounts[d].record_cids) for d in big)
    finally:
        network.stop_thread()


class _Prefetched:
    """The replica's fetcher, holding every fetch back until ``n`` of them are done."""

    def __init__(self, fetcher: RepoFetcher, n: int) -> None:
        self._fetcher = fetcher
        self._n = n
        self._done = 0
        self._all: asyncio.Event | None = None

    async def fetch(self, did: str, cursor: int) -> Fetched:
        if self._all is None:
            self._all = asyncio.Event()
        fetched = await self._fetcher.fetch(did, cursor)
        self._done += 1
        if self._done >= self._n:
            self._all.set()
        await self._all.wait()
        return fetched


def test_a_reactivated_account_enqueued_again_is_fetched_again(kafka: KafkaSettings, tmp_path: Path) -> None:
    """Issue 17 #4: ``deactivated`` and ``takendown`` are reversible; a DID enqueued again after its
    account came back is fetched again (``ok`` and ``not_found`` stay done)."""
    network = PdsNetwork(accounts=24, hosts=1, seed=23, records_mean=4,
                         inactive={"deactivated": 0.25, "takendown": 0.25}).start_in_thread()
    try:
        assert enqueue_dids(kafka, network.dids, origin="test") == 24
        first = _InProcess(kafka, network, tmp_path, WorkOptions(job="repos", replica="r1", idle_exit=1.0))
        asyncio.run(first.run())
        reversible = sorted(network.dids_in_state("deactivated") + network.dids_in_state("takendown"))
        done = sorted(network.dids_in_state("active"))
        assert reversible and done
        for did in reversible:
            network.accounts[did].state = "active"  # reactivated, takedown reversed
        assert enqueue_dids(kafka, reversible + done, origin="test") == len(reversible) + len(done)
        second = _InProcess(kafka, network, tmp_path, WorkOptions(job="repos", replica="r1", idle_exit=1.0))
        asyncio.run(second.run())
        statuses = read_back(kafka).status_by_did()
        for did in reversible:
            outcomes = [s["outcome"] for s in statuses[did]]
            assert outcomes[0] in ("deactivated", "takendown") and outcomes[-1] == "ok", (did, outcomes)
            assert statuses[did][-1]["records"] == len(network.accounts[did].record_cids)
        assert all(len(statuses[did]) == 1 for did in done)  # done DIDs are not fetched again
        assert second.runner.stats.skipped == len(done)
    finally:
        network.stop_thread()

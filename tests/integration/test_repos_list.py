"""List jobs against the simulated PDS network and the real broker: every record once, outcomes,
dead letters, politeness, resume, and kill -9 of a ``backfill repos`` process in the middle of a
transaction followed by ``--resume``: every record and every status exactly once in the topics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producers.repos import run_batched_backfill
from runtime.atproto.tid import tid_to_time_us
from runtime.contract.topics import TopicMap
from runtime.kafka.checkpoint import load_job
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.pds import HostFaults, PdsNetwork
from tests.integration.eos import kill_in_transaction
from tests.integration.repos_support import (
    assert_limits_kept,
    assert_same_keys,
    expected_keys,
    poison,
    read_back,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def net() -> Iterator[PdsNetwork]:
    faults = HostFaults(rate_limit=30, rate_window=2.0, error_rate=0.05, truncate_rate=0.05, corrupt_rate=0.03,
                        bare_429_every=17, slow_rate=0.05, slow_seconds=0.2)
    network = PdsNetwork(accounts=40, hosts=3, seed=3, did_web=True, faults=faults,
                         inactive={"deactivated": 0.05, "takendown": 0.05, "deleted": 0.05})
    network.start_in_thread()
    # one repository that is always broken: served as complete, but cut short
    broken = network.dids_in_state("active")[0]
    network.accounts[broken].car = network.accounts[broken].car[:200]
    try:
        yield network
    finally:
        network.stop_thread()


def _common(kafka: KafkaSettings, net: PdsNetwork) -> dict[str, Any]:
    return {"bootstrap_servers": kafka.bootstrap_servers, "topic_prefix": kafka.topic_prefix,
            "topic_partitions": 3, "plc_url": net.plc_url, "allow_private_network": True,
            "did_web_scheme": "http", "retry_backoff": 0.01, "rate": 6.0, "burst": 3}


def test_batched_backfill_produces_every_record_once(kafka: KafkaSettings, net: PdsNetwork) -> None:
    broken = net.dids_in_state("active")[0]
    started_us = int(time.time() * 1_000_000)
    result = run_batched_backfill(net.dids, batch_size=15, verify=True, **_common(kafka, net))
    ended_us = int(time.time() * 1_000_000)
    users = result["users"]
    assert set(users) == set(net.dids)
    stats = result["statistics"]
    assert stats["batches"] == 3

    out = read_back(kafka)
    want = expected_keys(net)
    del_broken = {k: v for k, v in want.items() if k[0] != broken}
    assert_same_keys(out.keys(), Counter(del_broken))  # every record of every healthy active repo, exactly once
    for e in out.events:
        acct = net.accounts[e.did]
        assert e.source == "repo"
        assert e.operation == "create"
        assert e.rev == acct.rev
        # a snapshot row's time is when its repository was requested (runtime.contract.order rule 4)
        assert started_us <= e.time_us <= ended_us
        assert e.time_us > tid_to_time_us(acct.rev)
        assert e.job == "repos"
        assert e.cursor == net.dids.index(e.did)

    statuses = out.status_by_did()
    assert set(statuses) == set(net.dids)
    for did, [status] in statuses.items():
        state = net.accounts[did].state
        expected = {"active": "ok", "deleted": "not_found"}.get(state, state)
        if did == broken:
            expected = "failed"
        assert status["outcome"] == expected, did
        assert users[did]["outcome"] == expected
        if expected == "ok":
            assert status["records"] == len(net.accounts[did].record_cids)
            assert sum(status["by_type"].values()) == status["records"]
            assert users[did]["counts_by_type"] == status["by_type"]
    assert statuses[broken][0]["reason"] == "malformed_car"
    dead = [d for d in out.dead if d["did"] == broken]
    assert len(dead) == 1
    assert dead[0]["reason"] == "malformed_car"
    assert dead[0]["payload"] == net.accounts[broken].car
    assert_limits_kept(net)
    injected = sum((h.stats.injected for h in net.hosts), start=type(net.hosts[0].stats.injected)())
    assert injected["503"]
    assert injected["bare_429"]


def test_record_types_and_timestamp_range(kafka: KafkaSettings, net: PdsNetwork) -> None:
    dids = net.dids_in_state("active")[1:11]
    result = run_batched_backfill(dids, batch_size=50, start_timestamp="2024-10-01",
                                  end_timestamp="2024-11-01", record_types="post,reply,like",
                                  out_of_range="drop", **_common(kafka, net))
    out = read_back(kafka)
    assert out.events
    assert {e.collection for e in out.events} <= {"app.bsky.feed.post", "app.bsky.feed.like"}
    assert all("2024-10-01" <= (e.record or {})["createdAt"] < "2024-11-01" for e in out.events)
    skipped = sum(u["skipped"].get("out_of_range_timestamp", 0) for u in result["users"].values())
    assert skipped > 0
    assert sum(u["records"] for u in result["users"].values()) == len(out.events)


def test_resume_after_a_stop_skips_done_repositories(kafka: KafkaSettings, net: PdsNetwork) -> None:
    dids = net.dids_in_state("active")[1:25]
    first = run_batched_backfill(dids, batch_size=0, max_time=1.0, rate=2.0, burst=1, concurrency=2,
                                 **{k: v for k, v in _common(kafka, net).items() if k not in ("rate", "burst")})
    done_first = set(first["users"])
    assert 0 < len(done_first) < len(dids)
    second = run_batched_backfill(dids, batch_size=0, resume=True, **_common(kafka, net))
    assert set(second["users"]).isdisjoint(done_first)
    assert set(second["users"]) | done_first == set(dids)
    out = read_back(kafka)
    assert_same_keys(out.keys(), expected_keys(net, dids))  # nothing lost, nothing twice


def test_a_record_the_producer_refuses_is_dead_lettered_and_not_counted(kafka: KafkaSettings) -> None:
    network = PdsNetwork(accounts=3, hosts=1, seed=12, records_mean=10).start_in_thread()
    try:
        did = network.dids[0]
        bad = poison(network, did)
        result = run_batched_backfill(network.dids, bootstrap_servers=kafka.bootstrap_servers,
                                      topic_prefix=kafka.topic_prefix, plc_url=network.plc_url,
                                      allow_private_network=True, retry_backoff=0)
        user = result["users"][did]
        assert user["outcome"] == "ok"
        assert user["dropped"] == {"invalid_record": 1}
        assert user["records"] == len(network.accounts[did].record_cids) - 1
        out = read_back(kafka)
        want = expected_keys(network)
        del want[(did, bad, network.accounts[did].record_cids[bad])]
        assert_same_keys(out.keys(), want)
        [status] = out.status_by_did()[did]
        assert status["records"] == user["records"]
        assert status["dropped"] == {"invalid_record": 1}
        assert [d["reason"] for d in out.dead] == ["invalid_record"]
    finally:
        network.stop_thread()


@pytest.mark.slow
def test_kill_9_mid_transaction_then_resume_gives_every_record_once(kafka: KafkaSettings, tmp_path: Path) -> None:
    network = PdsNetwork(accounts=40, hosts=2, seed=18, records_mean=15).start_in_thread()
    try:
        dids = network.dids_in_state("active")
        dids_file = tmp_path / "dids.txt"
        dids_file.write_text("\n".join(dids) + "\n")
        # 2 requests/s per host (2 requests per DID): the job runs for about 20 s and checkpoints
        # (between DIDs) several times before the kill. A transaction stays open 1.5 s and its records
        # reach the broker at once (linger 5 ms): most of the time the broker holds data of an open
        # transaction, so a loaded machine still finds such a moment before the job ends.
        args = [sys.executable, "-m", "producers.repos", "--dids-file", str(dids_file), "--job", "killed",
                "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
                "--topic-partitions", "3", "--plc-url", network.plc_url, "--allow-private-network",
                "--rate", "2", "--burst", "1", "--retry-backoff", "0.05", "--checkpoint-interval", "1.5",
                "--kafka-config", "linger.ms=5", "--progress", "none"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKFILL_", "KAFKA_"))}
        log = tmp_path / "killed.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**env, "PYTHONPATH": str(ROOT)})
        try:
            # once a third of the repositories were served, while the broker holds data of the open transaction
            def ready() -> bool:
                return sum(h.stats.statuses[200] for h in network.hosts) >= len(dids) // 3

            held = kill_in_transaction(proc, kafka, timeout=90, ready=ready)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        assert held, log.read_text()[-3000:]
        before = load_job(kafka.consumer_config("t"), TopicMap(kafka.topic_prefix).control, "killed", settle=0)
        assert before is not None and before.status == "running"
        resumed = run_batched_backfill(dids, batch_size=0, resume=True, job="killed", checkpoint_interval=0.3,
                                       bootstrap_servers=kafka.bootstrap_servers, topic_prefix=kafka.topic_prefix,
                                       topic_partitions=3, plc_url=network.plc_url, allow_private_network=True,
                                       retry_backoff=0.05)
        # the resume did only what the killed run had not committed
        assert 0 < len(resumed["users"]) < len(dids)
        out = read_back(kafka)
        statuses = out.status_by_did()
        assert set(statuses) == set(dids)
        assert all(len(ss) == 1 for ss in statuses.values()), \
            sorted((d, len(ss)) for d, ss in statuses.items() if len(ss) > 1)[:5]
        assert_same_keys(out.keys(), expected_keys(network, dids), kafka)  # every record exactly once
        state = load_job(kafka.consumer_config("t"), TopicMap(kafka.topic_prefix).control, "killed")
        assert state is not None and (state.status, state.runs) == ("finished", 2)
    finally:
        network.stop_thread()


def test_a_repository_of_more_blocks_than_the_cap_is_dead_lettered_once(kafka: KafkaSettings) -> None:
    """--max-car-blocks: a repository whose CAR holds more blocks than the cap (its index is the memory
    a repository takes while decoded) is dead-lettered as ``oversize`` after one fetch, not retried;
    the others are backfilled. (The on-disk and in-memory readers' caps: tests/unit/test_atproto_car.py.)"""
    network = PdsNetwork(accounts=12, hosts=1, seed=29, records_mean=3, big_every=4,
                         big_records=150).start_in_thread()
    try:
        big = sorted(d for d, a in network.accounts.items() if len(a.record_cids) >= 150)
        small = sorted(set(network.dids) - set(big))
        assert big and small
        result = run_batched_backfill(network.dids, batch_size=0, max_car_blocks=100, job="cap",
                                      **{**_common(kafka, network), "did_web_scheme": "https"})
        users = result["users"]
        for did in big:
            assert (users[did]["outcome"], users[did]["reason"]) == ("failed", "oversize"), users[did]
        assert all(users[did]["outcome"] == "ok" for did in small)
        # each repository fetched once: the oversize ones were not fetched again
        assert network.hosts[0].stats.endpoints["/xrpc/com.atproto.sync.getRepo"] == len(network.dids)
        out = read_back(kafka)
        assert {d["did"] for d in out.dead if d["reason"] == "oversize"} == set(big)
        assert {e.did for e in out.events} == set(small)
    finally:
        network.stop_thread()

"""``backfill repos --from-topic`` replicas as processes sharing the DID work topic, for the integration
tests (test_repos_worktopic, test_group_protocols): a simulated network, the replicas, their end, and the
check that every DID and record is in the topics exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producers.repos.worktopic import enqueue_dids
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.pds import HostFaults, PdsNetwork
from tests.integration.repos_support import Backfilled, assert_same_keys, expected_keys, read_back

ROOT = Path(__file__).resolve().parents[2]


def simulated_network(accounts: int, seed: int) -> PdsNetwork:
    # 40 requests per 2 s per host; two replicas at 6/s (burst 2) each stay under it together.
    faults = HostFaults(rate_limit=40, rate_window=2.0, error_rate=0.02, truncate_rate=0.01)
    return PdsNetwork(accounts=accounts, hosts=4, seed=seed, records_mean=20, faults=faults,
                      inactive={"deactivated": 0.02, "deleted": 0.01}).start_in_thread()


def start_replica(kafka: KafkaSettings, net: PdsNetwork, replica: str, log: Path,
                  idle_exit: float = 3.0, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "producers.repos", "--from-topic", "--replica-id", replica,
            "--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
            "--topic-partitions", "4", "--plc-url", net.plc_url, "--allow-private-network",
            "--rate", "6", "--burst", "2", "--per-host-concurrency", "2", "--retry-backoff", "0.05",
            "--idle-exit", str(idle_exit), "--txn-max-dids", "20", "--progress", "log", "--log-level", "INFO",
            *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_replicas(procs: list[subprocess.Popen[bytes]], timeout: float, logs: list[Path]) -> None:
    """Wait for every replica to exit 0 within ``timeout``; none is left running."""
    deadline = time.monotonic() + timeout
    try:
        for p, log in zip(procs, logs, strict=True):
            left = max(1.0, deadline - time.monotonic())
            try:
                code = p.wait(left)
            except subprocess.TimeoutExpired:
                for q in procs:  # each live replica logs where its tasks wait (producers.repos.taskdump)
                    if q.poll() is None:
                        q.send_signal(signal.SIGUSR1)
                time.sleep(2)
                pytest.fail("replica did not finish; log tails:\n" +
                            "\n".join(f"== {lg.name}\n{lg.read_text()[-6000:]}" for lg in logs))
            assert code == 0, log.read_text()[-3000:]
    finally:
        for p in procs:  # a failed wait leaves no replica behind to disturb the next test
            if p.poll() is None:
                p.kill()
                p.wait(10)


_ABORTED = re.compile(r"transaction \d+ aborted .*?; its \d+ work items are redone: \[(.*)\]")


def aborted_dids(logs: list[Path]) -> set[str]:
    """DIDs of the transactions the replicas aborted after a rebalance (and redid), from their logs."""
    out: set[str] = set()
    for log in logs:
        for m in _ABORTED.finditer(log.read_text()):
            out.update(d.strip(" '") for d in m.group(1).split(",") if d.strip())
    return out


def check_exact(out: Backfilled, net: PdsNetwork, redone: set[str] | None = None,
                 kafka: KafkaSettings | None = None) -> None:
    """Every DID has exactly one status, every active repository's records are there exactly once
    (transactions a replica aborted, after a rebalance or a kill, are invisible to read_committed).

    ``redone``: DIDs of transactions the replicas aborted and redid (from their logs), named in a failure.
    """
    statuses = out.status_by_did()
    assert set(statuses) == set(net.dids), set(net.dids) ^ set(statuses)
    twice = {d: [(s["replica"], s["batch"], s["work_offset"]) for s in ss] for d, ss in statuses.items() if len(ss) > 1}
    assert not twice, (f"DIDs with more than one status: {sorted(twice.items())[:5]}; of them in rebalance-aborted "
                       f"transactions: {sorted(set(twice) & (redone or set()))[:5]}")
    assert_same_keys(out.keys(), expected_keys(net), kafka)
    for did, ss in statuses.items():
        state = net.accounts[did].state
        assert ss[-1]["outcome"] == {"active": "ok", "deleted": "not_found"}.get(state, state)
    assert not out.dead


def run_two(kafka: KafkaSettings, net: PdsNetwork, tmp_path: Path, timeout: float) -> tuple[Backfilled, set[str]]:
    """Two replicas to the end; what they wrote, and the DIDs of transactions they aborted and redid."""
    assert enqueue_dids(kafka, net.dids, origin="test") == len(net.dids)
    logs = [tmp_path / "r1.log", tmp_path / "r2.log"]
    procs = [start_replica(kafka, net, f"r{i + 1}", logs[i]) for i in range(2)]
    wait_replicas(procs, timeout, logs)
    out = read_back(kafka)
    replicas = {s["replica"] for s in out.statuses}
    assert replicas == {"r1", "r2"}  # the work was shared
    return out, aborted_dids(logs)

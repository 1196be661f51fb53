"""Where DIDs come from (relay listRepos, per-PDS listRepos, handles) and the client's manners
toward a host whose limit is lower than its own budget."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from tenacity import wait_none

from producers.netsafety import NetworkPolicy
from producers.repos import app
from producers.repos.pds import PdsClient, PdsLimits
from runtime.kafka.settings import KafkaSettings
from runtime.simulator.pds import HostFaults, PdsNetwork

pytestmark = pytest.mark.integration


@pytest.fixture
def net() -> Iterator[PdsNetwork]:
    network = PdsNetwork(accounts=30, hosts=2, seed=8, relay_omit=0.3, records_mean=5,
                         inactive={"deactivated": 0.1}).start_in_thread()
    try:
        yield network
    finally:
        network.stop_thread()


def _settings(kafka: KafkaSettings, net: PdsNetwork, *args: str, private: bool = True) -> app.ReposSettings:
    parser = argparse.ArgumentParser()
    app.add_arguments(parser)
    ns = parser.parse_args(["--bootstrap-servers", kafka.bootstrap_servers, "--topic-prefix", kafka.topic_prefix,
                            "--plc-url", net.plc_url, "--progress", "none", "--retry-backoff", "0", *args,
                            *(["--allow-private-network"] if private else [])])
    app.finish_namespace(ns)
    return app.settings_from_namespace(ns)


@pytest.mark.tansu_smoke
def test_relay_pds_lists_and_handles(kafka: KafkaSettings, net: PdsNetwork) -> None:
    listed = [d for d in net.relay_listing if net.accounts[d].state == "active"]
    assert len(listed) < len(net.dids_in_state("active"))  # the relay's list is incomplete
    relay_only = app.run(_settings(kafka, net, "--from-relay", "--relay-url", net.relay_url), print_table=False)
    assert sorted(relay_only.users) == sorted(listed)  # inactive repos are not even asked for
    # per-PDS listRepos completes the picture; -u adds handles resolved through resolveHandle
    handles = [net.accounts[d].handle for d in net.dids[:2]]
    every = app.run(_settings(kafka, net, "--from-pds", net.hosts[0].url, "--from-pds", net.hosts[1].url,
                              "-u", ",".join(handles), "--handle-resolver", net.relay_url, "--job", "all"),
                    print_table=False)
    assert set(every.users) == set(net.dids_in_state("active")) | set(net.dids[:2])
    assert every.statistics["outcomes"]["ok"] == len(net.dids_in_state("active"))


def test_enqueue_writes_the_list_to_the_work_topic(kafka: KafkaSettings, net: PdsNetwork, tmp_path: Path) -> None:
    f = tmp_path / "dids.txt"
    f.write_text("\n".join(net.dids[:7]) + "\n")
    result = app.run(_settings(kafka, net, "--dids-file", str(f), "--enqueue"), print_table=False)
    assert result.statistics == {"enqueued": 7}


def test_a_client_faster_than_the_host_limit_adapts_to_its_headers(tmp_path: Path) -> None:
    """The host allows 16 requests per 2 s; the client's own budget is 50/s. The RateLimit
    headers (policy, remaining, reset) slow it down: everything is fetched with at most a couple of
    429s, each honoured by pausing the host until the window resets."""
    network = PdsNetwork(accounts=40, hosts=1, seed=9, records_mean=3,
                         faults=HostFaults(rate_limit=16, rate_window=2.0)).start_in_thread()
    try:
        host = network.hosts[0]

        async def go() -> int:
            pds = PdsClient(PdsLimits(rate=50, burst=10, per_host_concurrency=4),
                            policy=NetworkPolicy(allow_private=True), wait=wait_none())
            try:
                cars = await asyncio.gather(*(pds.get_repo(host.url, d, tmp_path) for d in network.dids))
            finally:
                await pds.aclose()
            return len(cars)

        assert asyncio.run(go()) == 40
        assert host.stats.over_limit <= 4  # only the first window, before the headers were seen
        late = {w: n for w, n in host.stats.windows.items() if w > min(host.stats.windows)}
        assert max(late.values()) <= 16
    finally:
        network.stop_thread()


def test_pds_endpoints_on_private_addresses_are_refused(kafka: KafkaSettings, net: PdsNetwork) -> None:
    """The DID documents point at 127.0.0.1: without --allow-private-network every repository fails
    with unsafe_endpoint (dead-lettered, not retried) and no PDS host sees a request."""
    dids = net.dids_in_state("active")[:5]
    result = app.run(_settings(kafka, net, "--dids", ",".join(dids), private=False), print_table=False)
    assert {u["outcome"] for u in result.users.values()} == {"failed"}
    assert {u["reason"] for u in result.users.values()} == {"unsafe_endpoint"}
    assert result.statistics["dropped"] == {"unsafe_endpoint": 5}
    assert sum(h.stats.requests for h in net.hosts) == 0

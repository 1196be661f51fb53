"""``backfill simulate pds``: a PLC directory, several PDS hosts and a relay serving generated accounts.

Prints the PLC, relay and host URLs and (``--write-dids``) writes every DID to a file, then serves
until interrupted, logging each host's request counts every ``--stats-every`` seconds. Point
``backfill repos`` at it with ``--plc-url <printed PLC URL> --allow-private-network``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Final

from runtime.process.options import Opt, add_options, log_level_option
from runtime.process.signals import stop_signal_event
from runtime.simulator.pds import HostFaults, PdsNetwork

log = logging.getLogger(__name__)

OPTIONS: Final = (
    Opt(("--accounts",), "accounts", "SIM_ACCOUNTS", 1000, "generated did:plc accounts", type=int),
    Opt(("--hosts",), "hosts", "SIM_PDS_HOSTS", 4, "PDS hosts", type=int),
    Opt(("--seed",), "seed", "SIM_SEED", 1, "random seed", type=int),
    Opt(("--records-mean",), "records_mean", "SIM_RECORDS_MEAN", 30, "mean records per account", type=int),
    Opt(("--big-every",), "big_every", "SIM_BIG_EVERY", 0,
        "every Nth account gets --big-records records (0 = none)", type=int),
    Opt(("--big-records",), "big_records", "SIM_BIG_RECORDS", 2000, "records of a big account", type=int),
    Opt(("--did-web",), "did_web", "SIM_DID_WEB", False,
        "each host also serves one did:web account (/.well-known/did.json)", action="store_true"),
    Opt(("--deactivated",), "deactivated", "SIM_DEACTIVATED", 0.0, "fraction of deactivated accounts", type=float),
    Opt(("--takendown",), "takendown", "SIM_TAKENDOWN", 0.0, "fraction of taken-down accounts", type=float),
    Opt(("--deleted",), "deleted", "SIM_DELETED", 0.0, "fraction of deleted accounts (RepoNotFound)", type=float),
    Opt(("--relay-omit",), "relay_omit", "SIM_RELAY_OMIT", 0.0,
        "fraction of accounts the relay's listRepos leaves out", type=float),
    Opt(("--rate-limit",), "rate_limit", "SIM_RATE_LIMIT", 3000,
        "requests per window per host (0 = unlimited; hosted PDSes: 3000 per 300 s)", type=int),
    Opt(("--rate-window",), "rate_window", "SIM_RATE_WINDOW", 300.0, "rate-limit window in seconds", type=float),
    Opt(("--bare-429-every",), "bare_429_every", "SIM_BARE_429_EVERY", 0,
        "fault: every Nth request answers a 429 without headers", type=int),
    Opt(("--error-rate",), "error_rate", "SIM_ERROR_RATE", 0.0, "fault: probability of a 503", type=float),
    Opt(("--slow-rate",), "slow_rate", "SIM_SLOW_RATE", 0.0, "fault: probability of a slow answer", type=float),
    Opt(("--slow-seconds",), "slow_seconds", "SIM_SLOW_SECONDS", 2.0, "fault: how slow", type=float),
    Opt(("--truncate-rate",), "truncate_rate", "SIM_TRUNCATE_RATE", 0.0,
        "fault: probability that a CAR body is cut short", type=float),
    Opt(("--corrupt-rate",), "corrupt_rate", "SIM_CORRUPT_RATE", 0.0,
        "fault: probability that a CAR is truncated but served as complete", type=float),
    Opt(("--host",), "host", "SIM_HOST", "127.0.0.1", "listen address"),
    Opt(("--plc-port",), "plc_port", "SIM_PLC_PORT", 0, "PLC directory port (0 = any free port)", type=int),
    Opt(("--base-port",), "base_port", "SIM_PDS_BASE_PORT", 0,
        "PDS host i listens on base+i, the relay on base+hosts (0 = any free ports)", type=int),
    Opt(("--write-dids",), "write_dids", None, None, "write every DID to this file, one per line"),
    Opt(("--stats-every",), "stats_every", None, 10.0, "log per-host request counts this often (0 = never)",
        type=float),
    log_level_option(),
)


#: One line for ``backfill --help``.
HELP: Final = "serve a simulated PLC directory and PDS hosts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill simulate pds``."""
    add_options(parser, OPTIONS)


def build(ns: argparse.Namespace) -> PdsNetwork:
    """The simulated network from parsed options."""
    faults = HostFaults(rate_limit=ns.rate_limit, rate_window=ns.rate_window, bare_429_every=ns.bare_429_every,
                        error_rate=ns.error_rate, slow_rate=ns.slow_rate, slow_seconds=ns.slow_seconds,
                        truncate_rate=ns.truncate_rate, corrupt_rate=ns.corrupt_rate)
    inactive = {"deactivated": ns.deactivated, "takendown": ns.takendown, "deleted": ns.deleted}
    return PdsNetwork(ns.accounts, ns.hosts, seed=ns.seed, records_mean=ns.records_mean, big_every=ns.big_every,
                      big_records=ns.big_records, faults=faults, inactive=inactive, did_web=ns.did_web,
                      relay_omit=ns.relay_omit, host=ns.host, plc_port=ns.plc_port, base_port=ns.base_port)


async def _serve(net: PdsNetwork, ns: argparse.Namespace) -> None:
    with stop_signal_event() as stop:
        async with net:
            if ns.write_dids:
                Path(ns.write_dids).write_text("\n".join(net.dids) + "\n", encoding="utf-8")
            records = sum(len(a.record_cids) for a in net.accounts.values())
            print(f"PLC directory: {net.plc_url}\nrelay:         {net.relay_url}", flush=True)
            for h in net.hosts:
                print(f"PDS {h.index}:         {h.url}  ({len(h.accounts)} accounts)", flush=True)
            print(f"{len(net.accounts)} accounts, {records} records; backfill with: backfill repos --plc-url "
                  f"{net.plc_url} --allow-private-network --from-relay --relay-url {net.relay_url}", flush=True)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), ns.stats_every or None)
                if ns.stats_every:
                    for url, st in net.host_stats().items():
                        log.info("%s: %d requests, statuses %s, over the limit %d, injected %s", url, st.requests,
                                 dict(st.statuses), st.over_limit, dict(st.injected))


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill simulate pds``."""
    asyncio.run(_serve(build(ns), ns))
    return 0

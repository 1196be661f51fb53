"""``backfill simulate jetstream``: serve a Jetstream simulator until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Final

from runtime.contract.timeparse import timestamp_us
from runtime.process.options import Opt, add_options, log_level_option
from runtime.simulator.jetstream import Faults, JetstreamSimulator, read_events_file, synthetic_events

log = logging.getLogger(__name__)

OPTIONS: Final = (
    Opt(("--events",), "events", "SIM_JETSTREAM_EVENTS", None,
        "JSON-lines file of Jetstream events to serve (.zst allowed)"),
    Opt(("--synthetic",), "synthetic", "SIM_JETSTREAM_SYNTHETIC", 10000,
        "number of generated events when no --events file is given", type=int),
    Opt(("--seed",), "seed", "SIM_SEED", 1, "random seed of the generated events", type=int),
    Opt(("--accounts",), "accounts", "SIM_ACCOUNTS", 200, "generated accounts", type=int),
    Opt(("--start",), "start", "SIM_START", None, "event time of the first generated event (default: "
        "so that the last one is now)"),
    Opt(("--event-rate",), "event_rate", "SIM_EVENT_RATE", 1000.0,
        "generated events per second of event time", type=float),
    Opt(("--live-rate",), "live_rate", "SIM_LIVE_RATE", 0.0,
        "after the stored events, generate live ones at this rate (0 = none)", type=float),
    Opt(("--send-rate",), "send_rate", "SIM_SEND_RATE", 0.0,
        "cap on messages per second per connection (0 = as fast as possible)", type=float),
    Opt(("--host",), "host", "SIM_HOST", "127.0.0.1", "listen address"),
    Opt(("--port",), "port", "SIM_PORT", 6008, "listen port (0 = any free port)", type=int),
    Opt(("--dictionary",), "dictionary", "SIM_ZSTD_DICTIONARY", None,
        "zstd dictionary for compress=true (default: trained from the events)"),
    Opt(("--write-dictionary",), "write_dictionary", None, None,
        "write the dictionary in use to this file (give it to the client's --zstd-dictionary)"),
    Opt(("--disconnect-after",), "disconnect_after", None, 0, "fault: drop connections after N messages",
        type=int),
    Opt(("--disconnect-times",), "disconnect_times", None, 1, "fault: how many connections to drop (0 = all)",
        type=int),
    Opt(("--stall-after",), "stall_after", None, 0, "fault: stall after N messages", type=int),
    Opt(("--stall-seconds",), "stall_seconds", None, 0.0, "fault: stall duration", type=float),
    Opt(("--garbage-every",), "garbage_every", None, 0, "fault: a malformed frame every N messages", type=int),
    Opt(("--oversize-every",), "oversize_every", None, 0, "fault: an oversize frame every N messages", type=int),
)


#: One line for ``backfill --help``.
HELP: Final = "serve a simulated Jetstream"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill simulate jetstream``."""
    add_options(parser, OPTIONS)
    add_options(parser, (log_level_option(),))


def build(ns: argparse.Namespace) -> JetstreamSimulator:
    """A simulator from parsed options."""
    if ns.events:
        events = read_events_file(Path(ns.events))
    else:
        start = timestamp_us(ns.start) if ns.start else None
        events = synthetic_events(ns.synthetic, seed=ns.seed, accounts=ns.accounts, start_us=start,
                                  rate=ns.event_rate)
    dictionary = Path(ns.dictionary).read_bytes() if ns.dictionary else None
    faults = Faults(disconnect_after=ns.disconnect_after, disconnect_times=ns.disconnect_times,
                    stall_after=ns.stall_after, stall_seconds=ns.stall_seconds, garbage_every=ns.garbage_every,
                    oversize_every=ns.oversize_every)
    sim = JetstreamSimulator(events, dictionary=dictionary, live_rate=ns.live_rate, faults=faults,
                             rate_limit=ns.send_rate, host=ns.host, port=ns.port)
    if ns.write_dictionary:
        Path(ns.write_dictionary).write_bytes(sim.dictionary)
    return sim


def banner(sim: JetstreamSimulator) -> str:
    """The line printed once the simulator listens."""
    first = sim.events[0].time_us if sim.events else None
    last = sim.events[-1].time_us if sim.events else None
    return f"Jetstream simulator: {sim.url}  ({len(sim.events)} events, time_us {first}..{last})"


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill simulate jetstream``."""
    sim = build(ns)
    asyncio.run(sim.serve_until_signal(lambda: banner(sim)))
    return 0

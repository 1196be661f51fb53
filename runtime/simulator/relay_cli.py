"""``backfill simulate relay``: serve a relay firehose simulator (and optionally its PLC directory)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path
from typing import Final

import orjson

from runtime.atproto.capture import CaptureError, read_capture
from runtime.contract.timeparse import timestamp_us
from runtime.errors import ConfigError
from runtime.process.options import Opt, add_options, log_level_option
from runtime.simulator.plc import PlcDirectory, PlcSimulator
from runtime.simulator.relay import RelayFaults, RelayGenerator, RelaySimulator, stored_from_bytes

log = logging.getLogger(__name__)

OPTIONS: Final = (
    Opt(("--capture",), "capture", "SIM_RELAY_CAPTURE", None,
        "capture file of frames to serve ([u32 LE length][frame] records, zstd allowed)"),
    Opt(("--synthetic",), "synthetic", "SIM_RELAY_SYNTHETIC", 5000,
        "number of generated frames when no --capture is given", type=int),
    Opt(("--seed",), "seed", "SIM_SEED", 1, "random seed of the generated accounts and frames", type=int),
    Opt(("--accounts",), "accounts", "SIM_ACCOUNTS", 50, "generated accounts", type=int),
    Opt(("--start",), "start", "SIM_START", None,
        "event time of the first generated frame (default: so that the last one is now)"),
    Opt(("--event-rate",), "event_rate", "SIM_EVENT_RATE", 1000.0,
        "generated frames per second of event time", type=float),
    Opt(("--first-seq",), "first_seq", "SIM_RELAY_FIRST_SEQ", 1, "seq of the first generated frame", type=int),
    Opt(("--live-rate",), "live_rate", "SIM_LIVE_RATE", 0.0,
        "after the stored frames, generate live ones at this rate (0 = none; generated mode only)", type=float),
    Opt(("--retain",), "retain", "SIM_RELAY_RETAIN", 0,
        "keep only the newest N frames (0 = all); older cursors get #info OutdatedCursor", type=int),
    Opt(("--send-rate",), "send_rate", "SIM_SEND_RATE", 0.0,
        "cap on frames per second per connection (0 = as fast as possible)", type=float),
    Opt(("--host",), "host", "SIM_HOST", "127.0.0.1", "listen address"),
    Opt(("--port",), "port", "SIM_RELAY_PORT", 6009, "listen port (0 = any free port)", type=int),
    Opt(("--pds-endpoint",), "pds_endpoint", "SIM_PDS_ENDPOINT", "http://127.0.0.1:2583",
        "PDS URL written into the generated accounts' DID documents"),
    Opt(("--plc-port",), "plc_port", "SIM_PLC_PORT", None,
        "also serve the generated accounts' DID documents as a PLC directory on this port", type=int),
    Opt(("--write-did-docs",), "write_did_docs", None, None,
        "write the generated DID documents (JSON object DID -> document) to this file, for "
        "'backfill simulate plc --documents'"),
    Opt(("--disconnect-after",), "disconnect_after", None, 0, "fault: drop connections after N frames", type=int),
    Opt(("--disconnect-times",), "disconnect_times", None, 1, "fault: how many connections to drop (0 = all)",
        type=int),
    Opt(("--mid-frame",), "mid_frame", None, False, "fault: drop the connection in the middle of a frame",
        action="store_true"),
    Opt(("--too-slow-after",), "too_slow_after", None, 0,
        "fault: send ConsumerTooSlow and close after N frames", type=int),
    Opt(("--garbage-every",), "garbage_every", None, 0, "fault: a malformed frame every N frames", type=int),
    Opt(("--oversize-seq",), "oversize_seqs", None, None, "fault: serve this seq as an oversize frame; repeatable",
        action="append", type=int),
    log_level_option(),
)


#: One line for ``backfill --help``.
HELP: Final = "serve a simulated relay firehose"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill simulate relay``."""
    add_options(parser, OPTIONS)


def build(ns: argparse.Namespace, now: float | None = None) -> tuple[RelaySimulator, RelayGenerator | None]:
    """A relay simulator (and its generator, in generated mode) from parsed options.

    Raises:
        ConfigError: an unreadable capture file.
    """
    generator: RelayGenerator | None = None
    if ns.capture:
        try:
            frames = stored_from_bytes(read_capture(ns.capture))
        except (OSError, CaptureError, ValueError) as e:
            raise ConfigError(f"cannot read capture {ns.capture}: {e}") from e
    else:
        if ns.start:
            start = timestamp_us(ns.start)
        else:
            start = int(((now if now is not None else time.time()) - ns.synthetic / ns.event_rate) * 1e6)
        generator = RelayGenerator(seed=ns.seed, accounts=ns.accounts, start_us=start, rate=ns.event_rate,
                                   first_seq=ns.first_seq, pds_endpoint=ns.pds_endpoint)
        frames = generator.frames(ns.synthetic)
    faults = RelayFaults(disconnect_after=ns.disconnect_after, disconnect_times=ns.disconnect_times,
                         mid_frame=bool(ns.mid_frame), too_slow_after=ns.too_slow_after,
                         garbage_every=ns.garbage_every, oversize_seqs=frozenset(ns.oversize_seqs or ()))
    sim = RelaySimulator(frames, generator=generator, live_rate=ns.live_rate if generator else 0.0,
                         retain=ns.retain, faults=faults, rate_limit=ns.send_rate, host=ns.host, port=ns.port)
    if generator is not None and ns.write_did_docs:
        Path(ns.write_did_docs).write_bytes(orjson.dumps(generator.did_documents()))
    return sim, generator


async def _serve(sim: RelaySimulator, generator: RelayGenerator | None, plc_port: int | None, host: str) -> None:
    plc: PlcSimulator | None = None
    if plc_port is not None and generator is not None:
        plc = PlcSimulator(PlcDirectory(generator.did_documents()), host, plc_port)
        await plc.start()
        print(f"PLC directory simulator: {plc.url}  ({len(generator.accounts)} documents)", flush=True)
    try:
        await sim.serve_until_signal(lambda: f"relay simulator: {sim.subscribe_url}  ({len(sim.frames)} frames, "
                                             f"seq {sim.oldest_seq}..{sim.head_seq})")
    finally:
        if plc is not None:
            await plc.stop()


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill simulate relay``."""
    sim, generator = build(ns)
    asyncio.run(_serve(sim, generator, ns.plc_port, ns.host))
    return 0

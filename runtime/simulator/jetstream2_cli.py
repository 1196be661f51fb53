"""``backfill simulate jetstream2``: serve a Jetstream v2 ("Network Replay") simulator until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Final

from runtime.contract.timeparse import timestamp_us
from runtime.process.options import Opt, add_options, log_level_option
from runtime.simulator.jetstream2 import FIXTURE_DICTIONARY, Faults, Jetstream2Simulator, build_simulator

log = logging.getLogger(__name__)

OPTIONS: Final = (
    Opt(("--host",), "host", "SIM_HOST", "127.0.0.1", "listen address"),
    Opt(("--port",), "port", "SIM_PORT", 6009, "listen port (0 = any free port)", type=int),
    Opt(("--events",), "events", "SIM_JETSTREAM2_EVENTS", 20000, "generated rows sealed into segments", type=int),
    Opt(("--tail",), "tail", "SIM_JETSTREAM2_TAIL", 500,
        "generated rows after the sealed tip (websocket only)", type=int),
    Opt(("--accounts",), "accounts", "SIM_ACCOUNTS", 200, "generated accounts", type=int),
    Opt(("--seed",), "seed", "SIM_SEED", 1, "random seed of the rows and of the faults", type=int),
    Opt(("--start",), "start", "SIM_START", None,
        "witnessed time of the first row (default: so that the last one is now)"),
    Opt(("--event-rate",), "event_rate", "SIM_EVENT_RATE", 1000.0,
        "generated rows per second of witnessed time", type=float),
    Opt(("--rows-per-segment",), "rows_per_segment", "SIM_ROWS_PER_SEGMENT", 5000, "rows per sealed segment",
        type=int),
    Opt(("--rows-per-block",), "rows_per_block", "SIM_ROWS_PER_BLOCK", 512, "rows per block (the service: 4096)",
        type=int),
    Opt(("--empty-block-every",), "empty_block_every", None, 3,
        "every N-th segment carries an empty block (0 = none)", type=int),
    Opt(("--plan-page-size",), "plan_page_size", None, 100, "segments per planSnapshot page", type=int),
    Opt(("--live-rate",), "live_rate", "SIM_LIVE_RATE", 0.0,
        "generate live (unsealed) rows at this rate per second (0 = none)", type=float),
    Opt(("--api-key",), "api_key", "SIM_JETSTREAM2_API_KEY", None,
        "require Authorization: Bearer KEY on planSnapshot, getSegment and getBlock"),
    Opt(("--cursor-floor",), "cursor_floor", None, 0,
        "subscribeEvents retention floor seq (a lower cursor: CursorTooOld)", type=int),
    Opt(("--dictionary",), "dictionary", "SIM_ZSTD_DICTIONARY", None,
        f"zstd dictionary file (default: {FIXTURE_DICTIONARY} when present, else trained from the rows)"),
    Opt(("--unready-requests",), "unready_requests", None, 0, "fault: 503 for the first N archive requests",
        type=int),
    Opt(("--unready-seconds",), "unready_seconds", None, 0.0, "fault: 503 for S seconds after start", type=float),
    Opt(("--rate-limit-fraction",), "rate_limit_fraction", None, 0.0,
        "fault: answer this fraction of archive requests 429", type=float),
    Opt(("--rate-limit-next",), "rate_limit_next", None, 0, "fault: answer the first N archive requests 429",
        type=int),
    Opt(("--retry-after",), "retry_after", None, 1, "fault: Retry-After seconds of a 429", type=int),
    Opt(("--error-fraction",), "error_fraction", None, 0.0,
        "fault: answer this fraction of archive requests --error-status", type=float),
    Opt(("--error-next",), "error_next", None, 0, "fault: answer the first N archive requests --error-status",
        type=int),
    Opt(("--error-status",), "error_status", None, 503, "fault: the 5xx status", type=int),
    Opt(("--etag-change-after",), "etag_change_after", None, 0,
        "fault: rewrite a segment (its ETag changes) after N getSegment answers", type=int),
    Opt(("--etag-change-times",), "etag_change_times", None, 1, "fault: how many rewrites", type=int),
    Opt(("--truncate-blocks",), "truncate_block_next", None, 0, "fault: cut the first N getBlock answers short",
        type=int),
    Opt(("--corrupt-blocks",), "corrupt_block_next", None, 0, "fault: corrupt the first N getBlock answers",
        type=int),
    Opt(("--stall-plan-pages",), "stall_plan_next", None, 0, "fault: the first N plan pages do not advance",
        type=int),
    Opt(("--cursor-too-old",), "cursor_too_old_next", None, 0,
        "fault: refuse the first N subscribeEvents opens CursorTooOld", type=int),
    Opt(("--unknown-dictionary",), "unknown_dictionary_next", None, 0,
        "fault: refuse the first N compressed opens UnknownZstdDictionary", type=int),
    Opt(("--drop-after-frames",), "drop_after_frames", None, 0, "fault: drop websockets after N frames", type=int),
    Opt(("--drop-times",), "drop_times", None, 1, "fault: how many websockets to drop (0 = all)", type=int),
    Opt(("--error-frame-after",), "error_frame_after", None, 0,
        "fault: send a terminal error frame after N frames", type=int),
    Opt(("--error-frame",), "error_frame", None, "ConsumerTooSlow", "fault: the error frame's name",
        choices=("ConsumerTooSlow", "InternalError")),
    Opt(("--error-frame-times",), "error_frame_times", None, 1, "fault: how many connections get it (0 = all)",
        type=int),
)

_FAULT_FIELDS: Final = ("unready_requests", "unready_seconds", "rate_limit_fraction", "rate_limit_next",
                        "retry_after", "error_fraction", "error_next", "error_status", "etag_change_after",
                        "etag_change_times", "truncate_block_next", "corrupt_block_next", "stall_plan_next",
                        "cursor_too_old_next", "unknown_dictionary_next", "drop_after_frames", "drop_times",
                        "error_frame_after", "error_frame", "error_frame_times")

#: One line for ``backfill --help``.
HELP: Final = "serve a simulated Jetstream v2 (segments over HTTP, subscribeEvents)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill simulate jetstream2``."""
    add_options(parser, OPTIONS)
    add_options(parser, (log_level_option(),))


def build(ns: argparse.Namespace) -> Jetstream2Simulator:
    """A simulator from parsed options."""
    faults = Faults(**{name: getattr(ns, name) for name in _FAULT_FIELDS})
    dictionary = Path(ns.dictionary).read_bytes() if ns.dictionary else None
    return build_simulator(seed=ns.seed, accounts=ns.accounts, events=ns.events, tail=ns.tail,
                           rows_per_segment=ns.rows_per_segment, rows_per_block=ns.rows_per_block,
                           empty_block_every=ns.empty_block_every,
                           start_us=timestamp_us(ns.start) if ns.start else None, rate=ns.event_rate,
                           dictionary=dictionary, api_key=ns.api_key, faults=faults, live_rate=ns.live_rate,
                           cursor_floor=ns.cursor_floor, plan_page_size=ns.plan_page_size, host=ns.host,
                           port=ns.port)


def banner(sim: Jetstream2Simulator) -> str:
    """The line printed once the simulator listens."""
    return (f"Jetstream v2 simulator: {sim.url}  ({len(sim.archive.segments)} segments, sealed tip seq "
            f"{sim.sealed_tip}, {len(sim.rows)} rows; websocket {sim.ws_url})")


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill simulate jetstream2``."""
    sim = build(ns)
    asyncio.run(sim.serve_until_signal(lambda: banner(sim)))
    return 0

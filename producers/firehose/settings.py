"""Settings of ``backfill firehose`` and the run setup that the single-process run and the workers share
(start cursor, resume checks, identity resolver, job options, statistics)."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from producers.firehose.source import (
    DEFAULT_MAX_FRAME,
    DEFAULT_RELAY,
    FirehosePosition,
    relay_url,
    seek_time,
)
from producers.firehose.verify import DEFAULT_BATCH, DictResolver, IdentityResolver
from producers.identity.didlist import parse_dids
from producers.job import DEFAULT_MAX_COLLECTIONS, JobOptions, JobStats
from producers.options import add_producer_arguments, check_producer_options, producer_options
from runtime.contract.nsid import validate_pattern
from runtime.contract.timeparse import timestamp_us
from runtime.errors import ConfigError
from runtime.kafka.checkpoint import JobState
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Metrics
from runtime.process.options import ObservabilitySettings, Opt, resolve_appends

log = logging.getLogger(__name__)

DAY_US: Final = 86_400 * 1_000_000


FIREHOSE_OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--relay-url",), "relay_url", "RELAY_URL", DEFAULT_RELAY,
        "AT Protocol relay, with or without the /xrpc/com.atproto.sync.subscribeRepos path"),
    Opt(("--days",), "days", "BACKFILL_DAYS", None,
        "days to backfill: 0 = disabled, -1 = everything the relay keeps, N = the last N days", type=int),
    Opt(("--start-cursor",), "start_cursor", "BACKFILL_START_CURSOR", None,
        "relay seq to start after (the relay sends the frames with seq > N); 0 = the oldest it keeps",
        type=int),
    Opt(("--start-timestamp", "-s"), "start_timestamp", "BACKFILL_START_TIMESTAMP", None,
        "start time instead of --days: YYYY-MM-DD, YYYY-MM-DD-HH:MM:SS (UTC) or ISO 8601"),
    Opt(("--end-timestamp", "-e"), "end_timestamp", "BACKFILL_END_TIMESTAMP", None,
        "end watermark: keep frames before it, stop once the stream passed it by the allowed lateness "
        "(default for --days/--start-timestamp: the moment the run started; see --follow)"),
    Opt(("--follow",), "follow", "BACKFILL_FOLLOW", False,
        "no default end watermark: keep following the live stream after catching up", action="store_true"),
    Opt(("--workers",), "workers", "BACKFILL_WORKERS", 1,
        "decode/produce processes; each owns a DID-hash share of the frames (1 = this process)", type=int),
    Opt(("--batch-size",), "batch_size", "BACKFILL_BATCH_SIZE", 100,
        "frames per batch handed to a worker process (--workers > 1)", type=int),
    Opt(("--wanted-collections", "-c"), "wanted_collections", "BACKFILL_WANTED_COLLECTIONS", ["*"],
        "collection to include; repeatable; NSID prefix wildcards like app.bsky.feed.* allowed; * = all",
        action="append", metavar="NSID"),
    Opt(("--wanted-dids", "-d"), "wanted_dids", "BACKFILL_WANTED_DIDS", None,
        "comma-separated DIDs to include, or @FILE with one DID per line"),
    Opt(("--num-records", "-n"), "num_records", "BACKFILL_NUM_RECORDS", 0,
        "stop after this many records (0 = no limit; with --workers, per worker share)", type=int),
    Opt(("--verify",), "verify", "BACKFILL_VERIFY", False,
        "check every commit's signature against its author's DID document and its MST proof (Sync 1.1)",
        action="store_true"),
    Opt(("--verify-batch",), "verify_batch", "BACKFILL_VERIFY_BATCH", DEFAULT_BATCH,
        "with --verify: secp256k1 signatures checked per native call on a thread, while the next frames "
        "are decoded (0 = each frame checked whole, in turn)", type=int, metavar="N"),
    Opt(("--plc-url",), "plc_url", "BACKFILL_PLC_URL", "https://plc.directory",
        "PLC directory that resolves did:plc for --verify"),
    Opt(("--did-docs",), "did_docs", "BACKFILL_DID_DOCS", None,
        "JSON object of DID -> DID document (.zst allowed) to verify against instead of resolving"),
    Opt(("--seek",), "seek", "BACKFILL_SEEK", "probe",
        "how a start time becomes a cursor: probe (binary search over seqs) or scan (from the oldest frame)",
        choices=("probe", "scan")),
    Opt(("--allowed-lateness",), "allowed_lateness", "BACKFILL_ALLOWED_LATENESS", 1.0,
        "seconds a frame's time may lag behind newer frames before the end watermark closes", type=float),
    Opt(("--max-frame-size",), "max_frame_size", "BACKFILL_MAX_FRAME_SIZE", DEFAULT_MAX_FRAME,
        "largest frame accepted; bigger ones are dead-lettered and stepped over", type=int),
    Opt(("--stall-timeout",), "stall_timeout", "BACKFILL_STALL_TIMEOUT", 60.0,
        "reconnect when no frame arrived for this many seconds", type=float),
    Opt(("--max-reconnects",), "max_reconnects", "BACKFILL_MAX_RECONNECTS", 0,
        "give up after this many consecutive failed connects (0 = never)", type=int),
    *producer_options("firehose",
                      help={"resume": "resume from the job's last checkpoint (the last fully delivered seq)"}),
)


@dataclass
class FirehoseSettings:
    """Settings of one ``backfill firehose`` process (picklable: worker processes receive it)."""

    kafka: KafkaSettings
    obs: ObservabilitySettings
    relay_url: str
    collections: list[str]
    dids: list[str]
    start_cursor: int | None
    start_us: int | None
    all_history: bool
    end_us: int | None
    follow: bool
    resume: bool
    workers: int
    batch_size: int
    num_records: int
    max_time: float
    job: str
    verify: bool
    verify_batch: int
    plc_url: str
    did_docs: str | None
    seek: str
    lateness_us: int
    max_frame_size: int
    stall_timeout: float
    max_reconnects: int
    transactions: str
    checkpoint_events: int
    checkpoint_interval: float
    progress: str
    started_us: int = 0
    max_collections: int = DEFAULT_MAX_COLLECTIONS
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def default_end_us(self) -> int | None:
        """The end watermark: explicit, or the run's start for a time-bounded backfill (unless following)."""
        if self.end_us is not None:
            return self.end_us
        if self.follow:
            return None
        if self.start_us is not None or self.all_history:
            return self.started_us
        return None

    def filters(self) -> dict[str, Any]:
        """What the checkpoint records about this job's scope."""
        return {"collections": self.collections, "dids": len(self.dids), "relay": self.relay_url,
                "start_us": self.start_us, "end_us": self.default_end_us, "workers": self.workers,
                "verify": self.verify}


def start_time_us(days: int | None, start_timestamp: str | None, now_us: int) -> tuple[int | None, bool]:
    """``(start time, all history)`` from ``--start-timestamp`` or ``--days``.

    Raises:
        ConfigError: ``--days`` below -1.
    """
    if start_timestamp:
        return timestamp_us(start_timestamp), False
    if days is None or days == 0:
        return None, False
    if days == -1:
        return None, True
    if days < -1:
        raise ConfigError("--days must be -1, 0 or a positive number")
    return now_us - days * DAY_US, False


def settings_from_namespace(ns: argparse.Namespace, now: Callable[[], float] = time.time) -> FirehoseSettings:
    """Validate parsed flags into settings before anything connects.

    Raises:
        ConfigError: a malformed value or a contradictory combination.
    """
    now_us = int(now() * 1e6)
    patterns = [validate_pattern(c) for c in (ns.wanted_collections or [])]
    collections = [] if (not patterns or "*" in patterns) else patterns
    start_us, all_history = start_time_us(ns.days, ns.start_timestamp, now_us)
    end_us = timestamp_us(ns.end_timestamp) if ns.end_timestamp else None
    if end_us is not None and start_us is not None and end_us <= start_us:
        raise ConfigError("--end-timestamp must be after the start")
    if ns.start_cursor is not None and ns.start_cursor < 0:
        raise ConfigError("--start-cursor must be >= 0")
    if ns.verify_batch < 0:
        raise ConfigError("--verify-batch must be >= 0")
    if ns.workers < 1 or ns.batch_size < 1:
        raise ConfigError("--workers and --batch-size must be >= 1")
    check_producer_options(ns)
    if ns.num_records < 0:
        raise ConfigError("--num-records must be >= 0")
    if ns.allowed_lateness < 0:
        raise ConfigError("--allowed-lateness must be >= 0")
    if ns.did_docs and not Path(ns.did_docs).is_file():
        raise ConfigError(f"--did-docs {ns.did_docs}: no such file")
    return FirehoseSettings(
        kafka=KafkaSettings.from_namespace(ns), obs=ObservabilitySettings.from_namespace(ns),
        relay_url=relay_url(ns.relay_url), collections=collections, dids=parse_dids(ns.wanted_dids),
        start_cursor=ns.start_cursor, start_us=start_us, all_history=all_history, end_us=end_us,
        follow=bool(ns.follow), resume=bool(ns.resume), workers=ns.workers, batch_size=ns.batch_size,
        num_records=ns.num_records, max_time=ns.max_time, job=ns.job, verify=bool(ns.verify),
        verify_batch=ns.verify_batch, plc_url=ns.plc_url, did_docs=ns.did_docs, seek=ns.seek,
        lateness_us=int(ns.allowed_lateness * 1e6), max_frame_size=ns.max_frame_size,
        stall_timeout=ns.stall_timeout, max_reconnects=ns.max_reconnects, transactions=ns.transactions,
        checkpoint_events=max(1, ns.checkpoint_events), checkpoint_interval=ns.checkpoint_interval,
        progress=ns.progress, started_us=now_us, max_collections=ns.max_collections,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``backfill firehose`` option."""
    add_producer_arguments(parser, FIREHOSE_OPTIONS)


def finish_namespace(ns: argparse.Namespace) -> None:
    """Resolve append-options from the environment when absent on the command line."""
    resolve_appends(ns, FIREHOSE_OPTIONS)


def make_resolver(settings: FirehoseSettings, metrics: Metrics | None) -> IdentityResolver:
    """The identity resolver for ``--verify``: the fixed documents of ``--did-docs``, else the PLC directory."""
    if settings.did_docs:
        try:
            return DictResolver.from_file(settings.did_docs)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"cannot read --did-docs {settings.did_docs}: {e}") from e
    from producers.identity.resolver import DidResolver  # noqa: PLC0415 - only needed with --verify

    return DidResolver(settings.plc_url, metrics=metrics)


async def close_resolver(resolver: IdentityResolver | None) -> None:
    """Close a resolver's HTTP client, when it has one."""
    closer = getattr(resolver, "aclose", None)
    if closer is not None:
        await closer()


async def initial_cursor(settings: FirehoseSettings, position: FirehosePosition) -> int | None:
    """The cursor of the first connection (see the module docstring for the precedence).

    Raises:
        SourceError: probing the relay failed.
    """
    resume = position.resume_cursor
    if resume is not None:
        return resume
    if settings.start_cursor is not None:
        return settings.start_cursor
    if settings.all_history:
        return 0
    if settings.start_us is not None:
        if settings.seek == "scan":
            return 0
        return await seek_time(settings.relay_url, settings.start_us)
    return None


@dataclass
class RunResult:
    """What a run returns: the statistics table's values and the final checkpoint(s)."""

    statistics: dict[str, Any]
    state: JobState | None
    states: list[JobState] = field(default_factory=list)


def statistics(stats: JobStats, stream_counts: dict[str, Any], verified: int | None) -> dict[str, Any]:
    """The seed's statistics plus the firehose's own (frames, gaps, verification)."""
    return {**stats.seed_statistics(), "commits_verified": verified, **stream_counts}


def job_options(settings: FirehoseSettings, job: str, num_records: int) -> JobOptions:
    """The job runner's options for ``job``."""
    return JobOptions(job=job, source="firehose", filters=settings.filters(), num_records=num_records,
                      max_time=settings.max_time, resume=settings.resume, start_cursor=settings.start_cursor,
                      end_time_us=settings.default_end_us, checkpoint_events=settings.checkpoint_events,
                      checkpoint_interval=settings.checkpoint_interval, transactions=settings.transactions,
                      max_collections=settings.max_collections)


def check_resume(settings: FirehoseSettings, previous: JobState | None) -> None:
    """Refuse to resume a job with a different worker count (the DID shares would move).

    Raises:
        ConfigError: the checkpoint was written by a run with another ``--workers``.
    """
    if previous is None or not settings.resume:
        return
    before = previous.filters.get("workers", 1)
    if before != settings.workers:
        raise ConfigError(f"job {settings.job} was checkpointed with --workers {before}; resume it with the "
                          f"same number (the DID shares of the workers would otherwise move)")



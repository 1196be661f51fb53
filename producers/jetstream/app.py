"""``backfill jetstream``: replay Jetstream into the typed topics (seeds 000 and 001, on Kafka).

Run as in seed 000 it also runs a queue consumer, so ``backfill jetstream -n 5000`` alone fills the
queue ``jetstream_sync`` and prints the seed's statistics. ``--consumer none`` runs the producer
only (compose and Helm do that; consumers run as their own groups).

Python API (seed 001)::

    from producers.jetstream import run_backfill_sync
    stats = run_backfill_sync(wanted_collections=["app.bsky.feed.post"], num_records=5000)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import httpx

from producers.companion import Companion, CompanionFactory
from producers.identity.didlist import parse_dids, split_csv
from producers.identity.handles import DEFAULT_RESOLVER, resolve_handles
from producers.jetstream.parts import (
    PLAN_KEY,
    Part,
    merged_offsets,
    merged_statistics,
    part_job,
    plan_filters,
    plan_of,
    run_parts,
    split,
)
from producers.jetstream.position import JetstreamPosition
from producers.jetstream.replay import ReplayOptions, ReplaySource
from producers.jetstream.replaypos import ReplayPosition
from producers.jetstream.source import PUBLIC_INSTANCES, JetstreamOptions, JetstreamSource, instance_url
from producers.jetstream.v2client import ArchiveClient
from producers.job import DEFAULT_MAX_COLLECTIONS, JobOptions, JobRunner, JobStats
from producers.options import add_producer_arguments, api_namespace, check_producer_options, producer_options
from runtime.contract.codec import AvroCodec
from runtime.contract.nsid import validate_pattern
from runtime.contract.timeparse import timestamp_us
from runtime.contract.topics import TopicMap
from runtime.errors import ConfigError
from runtime.kafka.broker import resolve_bootstrap
from runtime.kafka.checkpoint import FINISHED, JobState, load_job
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Health, Metrics, MetricsServer
from runtime.process.options import (
    ObservabilitySettings,
    Opt,
    Secret,
    parse_bool,
    parse_secret,
    resolve_appends,
)
from runtime.process.plugins import COMPANIONS, load
from runtime.process.progress import Progress, print_statistics

log = logging.getLogger(__name__)

DICTIONARY_URL: Final = "https://raw.githubusercontent.com/bluesky-social/jetstream/main/pkg/models/zstd_dictionary"
DAY_US: Final = 86_400 * 1_000_000
#: A v2 cursor at or above this is unix microseconds of ``witnessed_at``, below it a seq.
TIME_CURSOR_MIN: Final = 10**15


JETSTREAM_OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--wanted-collections", "-c"), "wanted_collections", "BACKFILL_WANTED_COLLECTIONS",
        ["app.bsky.feed.post"], "collection to include; repeatable; NSID prefix wildcards like "
        "app.bsky.feed.* allowed", action="append", metavar="NSID"),
    Opt(("--wanted-dids", "-d"), "wanted_dids", "BACKFILL_WANTED_DIDS", None,
        "comma-separated DIDs to include, or @FILE with one DID per line"),
    Opt(("--bluesky-user-handles", "-u"), "user_handles", "BACKFILL_USER_HANDLES", None,
        "comma-separated Bluesky handles, resolved to DIDs and added to the DID filter"),
    Opt(("--handle-resolver",), "handle_resolver", "BACKFILL_HANDLE_RESOLVER", DEFAULT_RESOLVER,
        "service answering com.atproto.identity.resolveHandle"),
    Opt(("--start-timestamp", "-s"), "start_timestamp", "BACKFILL_START_TIMESTAMP", None,
        "start timestamp: YYYY-MM-DD, YYYY-MM-DD-HH:MM:SS (UTC) or ISO 8601"),
    Opt(("--end-timestamp", "-e"), "end_timestamp", "BACKFILL_END_TIMESTAMP", None,
        "end watermark: keep events before it, stop once the stream passed it by the allowed lateness; "
        "with v2 also a seq (a plain number below 1e15: rows up to it)"),
    Opt(("--days",), "days", "BACKFILL_DAYS", None,
        "start N days ago (-1 = as far back as the instance keeps, 0 = disabled)", type=int),
    Opt(("--cursor",), "cursor", "BACKFILL_CURSOR", None, "start cursor in raw unix microseconds", type=int),
    Opt(("--num-records", "-n"), "num_records", "BACKFILL_NUM_RECORDS", 10000,
        "number of records to collect (0 = no limit)", type=int),
    Opt(("--instance", "-i"), "instance", "JETSTREAM_INSTANCE", None,
        "Jetstream instance name (jetstream1.us-east) or ws(s):// URL, or several comma-separated, "
        "used in turn (the next on failure); default: the public instances in turn"),
    Opt(("--queue-name",), "queue_name", "BACKFILL_QUEUE_NAME", "jetstream_sync", "name for the queue"),
    Opt(("--queue-path",), "queue_path", "BACKFILL_QUEUE_PATH", None,
        "SQLite file of the queues (default $XDG_DATA_HOME/atproto-backfill/queues.sqlite)"),
    Opt(("--batch-size",), "batch_size", "BACKFILL_BATCH_SIZE", 100,
        "records to batch for queue insertion", type=int),
    Opt(("--compress",), "compress", "BACKFILL_COMPRESS", False,
        "use zstd compression for the stream", action="store_true"),
    Opt(("--zstd-dictionary",), "zstd_dictionary", "BACKFILL_ZSTD_DICTIONARY", None,
        "Jetstream's zstd dictionary file (default: downloaded once from the Jetstream repository "
        "and cached)"),
    Opt(("--allowed-lateness",), "allowed_lateness", "BACKFILL_ALLOWED_LATENESS", 1.0,
        "seconds an event may arrive behind newer ones (Jetstream's time_us is not monotonic)",
        type=float),
    Opt(("--failover-rewind",), "failover_rewind", "BACKFILL_FAILOVER_REWIND", 120.0,
        "seconds a connection to another instance rewinds (each instance's time_us is its own "
        "receive clock); replayed events are dropped by identity", type=float),
    Opt(("--max-message-size",), "max_message_size", "BACKFILL_MAX_MESSAGE_SIZE", 0,
        "maxMessageSizeBytes asked of the server (0 = no limit)", type=int),
    Opt(("--consumer",), "consumer", "BACKFILL_JETSTREAM_CONSUMER", "queue",
        "run a queue consumer alongside the producer (queue) or the producer only (none)",
        choices=("queue", "none")),
    Opt(("--stall-timeout",), "stall_timeout", "BACKFILL_STALL_TIMEOUT", 30.0,
        "reconnect when no message arrived for this many seconds", type=float),
    Opt(("--end-idle",), "end_idle", "BACKFILL_END_IDLE", 10.0,
        "with an end watermark already in the past: stop after this many seconds without a message",
        type=float),
    Opt(("--protocol",), "protocol", "BACKFILL_JETSTREAM_PROTOCOL", "auto",
        "Jetstream protocol: v2 replays the archive (any start date) then the live tail; v1 the live "
        "window only; auto asks the first instance whether it speaks v2", choices=("auto", "v1", "v2")),
    Opt(("--api-key",), "api_key", "BACKFILL_JETSTREAM_API_KEY", None,
        "v2: bearer key for the archive endpoints of a hosted instance", type=parse_secret),
    Opt(("--workers",), "workers", "BACKFILL_JETSTREAM_WORKERS", 1,
        "v2: replay the archive as this many seq ranges in parallel processes (jobs <job>.part<i>; per-DID "
        "order holds within a range)", type=int),
    Opt(("--verify",), "verify", "BACKFILL_JETSTREAM_VERIFY", False,
        "v2: check each segment's checksum and recompute each record's CID from its payload (a "
        "mismatch is dead-lettered, never produced)", action="store_true"),
    *producer_options("jetstream", max_time=900.0),
)


@dataclass
class JetstreamSettings:
    """Settings of one ``backfill jetstream`` process."""

    kafka: KafkaSettings
    obs: ObservabilitySettings
    collections: list[str]
    dids: list[str]
    handles: list[str]
    handle_resolver: str
    start_us: int | None
    end_us: int | None
    resume: bool
    job: str
    num_records: int
    instances: list[str]
    max_time: float
    queue_name: str
    queue_path: Path | None
    batch_size: int
    compress: bool
    zstd_dictionary: str | None
    lateness_us: int
    failover_rewind_us: int
    max_message_size: int
    consumer: str
    transactions: str
    checkpoint_events: int
    checkpoint_interval: float
    stall_timeout: float
    end_idle: float
    progress: str
    max_collections: int = DEFAULT_MAX_COLLECTIONS
    protocol: str = "auto"
    api_key: Secret | None = None
    verify: bool = False
    #: ``--cursor`` as given (v2 reads a value below 1e15 as a seq).
    raw_cursor: int | None = None
    #: ``-e`` given as a seq (v2 only).
    end_seq: int | None = None
    workers: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def start_cursor(cursor: int | None, start_timestamp: str | None, days: int | None,
                 now: Callable[[], float] = time.time) -> int | None:
    """The start cursor from ``--cursor``, ``--start-timestamp`` or ``--days`` (in that precedence)."""
    if cursor is not None:
        if cursor < 0:
            raise ConfigError("--cursor must be >= 0")
        return cursor
    if start_timestamp:
        return timestamp_us(start_timestamp)
    if days is None or days == 0:
        return None
    if days == -1:
        return 1  # the oldest event the instance keeps
    if days < -1:
        raise ConfigError("--days must be -1, 0 or a positive number")
    return int(now() * 1e6) - days * DAY_US


def end_point(value: str | None) -> tuple[int | None, int | None]:
    """``(end_us, end_seq)`` from ``-e``: a timestamp, unix microseconds (digits >= 1e15), or a v2 seq
    (digits below that).

    Raises:
        ConfigError: not a timestamp.
    """
    if not value:
        return None, None
    text = value.strip()
    if text.isdigit():
        n = int(text)
        return (n, None) if n >= TIME_CURSOR_MIN else (None, n)
    return timestamp_us(text), None


def settings_from_namespace(ns: argparse.Namespace) -> JetstreamSettings:
    """Validate parsed flags into settings (timestamps, DIDs, NSIDs) before anything connects.

    Raises:
        ConfigError: a malformed value.
    """
    collections = [validate_pattern(c) for c in (ns.wanted_collections or [])]
    end_us, end_seq = end_point(ns.end_timestamp)
    start_us = start_cursor(ns.cursor, ns.start_timestamp, ns.days)
    if end_us is not None and start_us is not None and end_us <= start_us:
        raise ConfigError("--end-timestamp must be after the start")
    instances = [instance_url(i) for i in (split_csv(ns.instance) or PUBLIC_INSTANCES)]
    check_producer_options(ns)
    if ns.num_records < 0:
        raise ConfigError("--num-records must be >= 0")
    if ns.allowed_lateness < 0:
        raise ConfigError("--allowed-lateness must be >= 0")
    if ns.failover_rewind < 0:
        raise ConfigError("--failover-rewind must be >= 0")
    if ns.workers < 1:
        raise ConfigError("--workers must be at least 1")
    return JetstreamSettings(
        kafka=KafkaSettings.from_namespace(ns), obs=ObservabilitySettings.from_namespace(ns),
        collections=collections, dids=parse_dids(ns.wanted_dids),
        handles=split_csv(ns.user_handles), handle_resolver=ns.handle_resolver,
        start_us=start_us, end_us=end_us, resume=bool(ns.resume), job=ns.job, num_records=ns.num_records,
        instances=instances, max_time=ns.max_time, queue_name=ns.queue_name,
        queue_path=Path(ns.queue_path) if ns.queue_path else None,
        batch_size=max(1, ns.batch_size), compress=bool(ns.compress), zstd_dictionary=ns.zstd_dictionary,
        lateness_us=int(ns.allowed_lateness * 1e6), failover_rewind_us=int(ns.failover_rewind * 1e6),
        max_message_size=ns.max_message_size,
        consumer=ns.consumer, transactions=ns.transactions, checkpoint_events=max(1, ns.checkpoint_events),
        checkpoint_interval=ns.checkpoint_interval, stall_timeout=ns.stall_timeout, end_idle=ns.end_idle,
        progress=ns.progress, max_collections=ns.max_collections,
        protocol=ns.protocol, api_key=ns.api_key, verify=bool(ns.verify), raw_cursor=ns.cursor, end_seq=end_seq,
        workers=ns.workers,
    )


#: One line for ``backfill --help``.
HELP: Final = "replay Jetstream into the typed topics (seeds 000/001)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``backfill jetstream`` option."""
    add_producer_arguments(parser, JETSTREAM_OPTIONS)


def finish_namespace(ns: argparse.Namespace) -> None:
    """Resolve append-options from the environment when absent on the command line."""
    resolve_appends(ns, JETSTREAM_OPTIONS)


def load_zstd_dictionary(path: str | None, *, url: str = DICTIONARY_URL,
                         cache_dir: Path | None = None) -> bytes:
    """Jetstream's zstd dictionary from ``path``, or downloaded once from ``url`` and cached.

    Raises:
        ConfigError: the file is unreadable, or the download failed and nothing is cached.
    """
    if path:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read zstd dictionary {path}: {e}") from e
    cache = (cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
             / "atproto-backfill" / "jetstream_zstd_dictionary")
    if cache.exists():
        return cache.read_bytes()
    try:
        resp = httpx.get(url, timeout=30, follow_redirects=True)
        resp.raise_for_status()
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot download Jetstream's zstd dictionary from {url}: {e}; "
                          "pass --zstd-dictionary PATH") from e
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(resp.content)
    return resp.content


@dataclass
class RunResult:
    """What a run returns: the seed's statistics plus the final checkpoint."""

    statistics: dict[str, Any]
    state: JobState


def seed_statistics(stats: JobStats, stored: int | None, queue_length: int | None,
                    late_events: int = 0) -> dict[str, Any]:
    """Seed 001's statistics dict (every field), plus a few more.

    ``late_events``: events that arrived more than the allowed lateness late, delivered (they are
    in the produced counts too; a late event seen before counts as a ``duplicate`` skip).
    """
    return {**stats.seed_statistics(stored), "queue_length": queue_length, "late_events": late_events}


def run(settings: JetstreamSettings, *, metrics: Metrics | None = None,
        on_date_change: Callable[[str], None] | None = None, print_table: bool = True) -> RunResult:
    """Run ``backfill jetstream`` with resolved settings and return the statistics.

    Raises:
        ConfigError: a usage error (unresolvable handle, missing dictionary).
        FatalError: our own state broke (failed commit, cursor regression).
    """
    dids = list(settings.dids)
    if settings.handles:
        resolved = resolve_handles(settings.handles, settings.handle_resolver)
        log.info("resolved %d handles to DIDs", len(resolved))
        dids.extend(d for d in resolved.values() if d not in dids)
    dictionary = load_zstd_dictionary(settings.zstd_dictionary) if settings.compress else None
    metrics = metrics or Metrics()
    health = Health()
    server = None
    if settings.obs.metrics_port:
        server = MetricsServer(metrics, health, settings.obs.metrics_host, settings.obs.metrics_port).start()
    progress = Progress(settings.progress, title=f"jetstream job {settings.job}")

    def date_changed(date: str) -> None:
        progress.note(f"now at {date}")
        if on_date_change is not None:
            on_date_change(date)

    try:
        with resolve_bootstrap(settings.kafka.bootstrap_servers) as servers:
            kafka = settings.kafka.with_bootstrap(servers)
            return _run(settings, kafka, dids, dictionary, metrics, health, progress, date_changed, print_table)
    finally:
        progress.close()
        if server is not None:
            server.stop()


def archive_base(instance: str) -> str:
    """The HTTP root of a v2 instance from its websocket URL (``wss://host/subscribe`` -> ``https://host``)."""
    parts = urlsplit(instance_url(instance))
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def v2_start(cursor: int | None, start_us: int | None) -> tuple[int | None, int | None]:
    """``(start_after, start_time_us)`` of a v2 replay from ``--cursor`` and ``-s``/``--days``.

    A ``--cursor`` below 1e15 is a seq (inclusive, as the server reads it: the replay starts after
    ``cursor - 1``), at or above it unix microseconds of ``witnessed_at``, like a start time.
    ``--days -1`` (cursor 1) is the beginning of the archive.
    """
    if cursor is not None and cursor < TIME_CURSOR_MIN:
        return max(0, cursor - 1), None
    if cursor is not None:
        return None, cursor
    return None, start_us


def choose_protocol(settings: JetstreamSettings, *, timeout: float = 10.0) -> str:
    """``v1`` or ``v2``: ``--protocol``, or for ``auto`` what the first instance answers.

    ``auto`` asks ``listSegments`` of the first instance; an instance that does not know it (or
    cannot be asked) is read as v1, which keeps the seeds' behaviour against v1 instances.
    """
    if settings.protocol in ("v1", "v2"):
        return settings.protocol
    base = archive_base(settings.instances[0])

    async def probe() -> bool:
        client = ArchiveClient(base, api_key=settings.api_key.get() if settings.api_key else None,
                               timeout=timeout, max_attempts=1)
        try:
            return await client.probe()
        finally:
            await client.aclose()

    try:
        v2 = asyncio.run(probe())
    except Exception as e:  # noqa: BLE001 - auto: anything but a clear v2 answer means v1
        log.info("protocol auto: %s did not answer as Jetstream v2 (%s); using v1", base, e)
        return "v1"
    log.info("protocol auto: %s speaks %s", base, "v2" if v2 else "v1")
    return "v2" if v2 else "v1"


def make_companion(settings: JetstreamSettings) -> Companion | None:
    """The consumer run alongside the producer (``--consumer``; None for ``none``), loaded by name from
    the ``atproto_backfill.companions`` entry points (``queue``: seed 000's queue consumer).

    Raises:
        ConfigError: no companion of that name is installed.
    """
    if settings.consumer == "none":
        return None
    factory: CompanionFactory = load(COMPANIONS, settings.consumer)
    return factory(queue_name=settings.queue_name, queue_path=settings.queue_path,
                   collections=settings.collections, batch_size=settings.batch_size)


def _run(settings: JetstreamSettings, kafka: KafkaSettings, dids: list[str], dictionary: bytes | None,
         metrics: Metrics, health: Health, progress: Progress, date_changed: Callable[[str], None],
         print_table: bool) -> RunResult:
    codec = AvroCodec.from_config(kafka.registry_config())
    protocol = choose_protocol(settings)
    if protocol == "v1" and settings.end_seq is not None:
        raise ConfigError(f"-e {settings.end_seq} is a v2 seq; Jetstream v1 ends at a time (-e YYYY-MM-DD...)")
    if protocol == "v1" and settings.workers > 1:
        raise ConfigError("--workers needs Jetstream v2 (the archive); v1 is one live stream")
    if protocol == "v2" and settings.workers > 1:
        return _run_parts(settings, kafka, progress)
    filters = {"collections": settings.collections, "dids": len(dids), "instance": settings.instances[0],
               "start_us": settings.start_us, "end_us": settings.end_us, "protocol": protocol}
    if settings.end_seq is not None:
        filters["end_seq"] = settings.end_seq
    filters.update({k: v for k, v in settings.extra.items() if k in (PLAN_KEY, "part")})
    options = JobOptions(job=settings.job, source="jetstream2" if protocol == "v2" else "jetstream", filters=filters,
                         num_records=settings.num_records, max_time=settings.max_time, resume=settings.resume,
                         start_cursor=settings.start_us, end_time_us=settings.end_us,
                         checkpoint_events=settings.checkpoint_events,
                         checkpoint_interval=settings.checkpoint_interval, transactions=settings.transactions,
                         max_collections=settings.max_collections)
    companion = make_companion(settings)

    def show(stats: JobStats) -> None:
        health.beat()
        fields = {"records": stats.records_produced, "rate/s": stats.records_produced / max(stats.elapsed, 1e-9),
                  "received": stats.messages_received, "date": stats.current_date or "-",
                  "cursor": stats.latest_cursor or "-"}
        if companion is not None:
            fields["stored"] = companion.stored
        progress.update(fields, stats.by_collection)

    runner = JobRunner(kafka, options, metrics, codec, on_date_change=date_changed, on_progress=show,
                       health=health)
    runner.prepare()
    if companion is not None:
        companion.start(kafka, metrics)

    sources: list[JetstreamSource] = []

    def make_source(prev: JobState | None) -> JetstreamSource:
        position = JetstreamPosition.restore(prev.position if prev else None, settings.lateness_us,
                                             settings.failover_rewind_us)
        jopts = JetstreamOptions(
            instances=settings.instances, collections=settings.collections, dids=dids,
            # a resume without --cursor/-s keeps the start the job was checkpointed with
            start_us=settings.start_us if settings.start_us is not None else (prev.start_cursor if prev else None),
            end_us=settings.end_us, lateness_us=settings.lateness_us,
            failover_rewind_us=settings.failover_rewind_us, compress=settings.compress,
            zstd_dictionary=dictionary, max_message_size=settings.max_message_size,
            stall_timeout=settings.stall_timeout, end_idle=settings.end_idle, job=settings.job)
        source = JetstreamSource(jopts, position)
        source.on_reconnect = lambda: metrics.reconnects.inc("jetstream")
        source.on_late = metrics.late_events.child("jetstream").inc
        sources.append(source)
        return source

    def make_replay(prev: JobState | None) -> ReplaySource:
        base = archive_base(settings.instances[0])
        start_after, start_time = v2_start(settings.raw_cursor, settings.start_us)
        if prev is not None and start_after is None and start_time is None and prev.start_cursor is not None:
            # a resume without --cursor/-s keeps the start the job was checkpointed with
            start_after, start_time = v2_start(prev.start_cursor, None)
        position = ReplayPosition.restore(prev.position if prev else None, base, start_after=start_after,
                                          start_time_us=start_time)
        ropts = ReplayOptions(instance=base, collections=settings.collections, dids=dids, end_us=settings.end_us,
                              end_seq=settings.end_seq,
                              verify=settings.verify, job=settings.job,
                              api_key=settings.api_key.get() if settings.api_key else None,
                              compress=settings.compress, max_message_size=settings.max_message_size,
                              lateness_us=settings.lateness_us, end_idle=settings.end_idle)
        source = ReplaySource(ropts, position, metrics=metrics)
        source.on_reconnect = lambda: metrics.reconnects.inc("jetstream2")
        return source

    try:
        final = asyncio.run(runner.run(make_replay if protocol == "v2" else make_source))
    except BaseException:
        if companion is not None:
            companion.abort()
        raise
    finally:
        runner.close()
    stored = None
    queue_length = None
    if companion is not None:
        companion.finish(final.offsets)
        stored = companion.stored
        queue_length = companion.queue_length()
        companion.close()
    stats = seed_statistics(runner.stats, stored, queue_length, sum(s.position.late for s in sources))
    if print_table:
        progress.close()
        print_statistics(stats, title=f"Backfill statistics (job {settings.job})")
    return RunResult(stats, final)


def _plan(settings: JetstreamSettings, kafka: KafkaSettings) -> list[Part]:
    """The parts of a ``--workers`` run: a resume's stored plan, else a new split of the archive."""
    if settings.resume:
        control = TopicMap(kafka.topic_prefix).control
        previous = load_job(kafka.consumer_config("atproto-backfill-control-reader"), control,
                            part_job(settings.job, 0), max_wait=kafka.control_timeout)
        stored = plan_of(previous.filters) if previous is not None else None
        if stored is not None:
            log.info("job %s: resuming its %d parts", settings.job, len(stored))
            return stored
    base = archive_base(settings.instances[0])

    async def listing() -> list[Part]:
        async with ArchiveClient(base, api_key=settings.api_key.get() if settings.api_key else None) as client:
            after, start_time = v2_start(settings.raw_cursor, settings.start_us)
            if after is None:
                after = (await client.seq_at(start_time)) - 1 if start_time is not None else 0
            segments = [seg async for seg in client.iter_segments()]
        return split(segments, after, settings.workers, end_us=settings.end_us, end_seq=settings.end_seq)

    return asyncio.run(listing())


def _run_parts(settings: JetstreamSettings, kafka: KafkaSettings, progress: Progress) -> RunResult:
    """``--workers N``: the parts in parallel processes, the companion (if any) here."""
    plan = _plan(settings, kafka)
    companion = make_companion(settings)
    if companion is not None:
        companion.start(kafka, Metrics())
    child = dataclasses.replace(settings, kafka=kafka)
    try:
        results = run_parts(child, plan)
    except BaseException:
        if companion is not None:
            companion.abort()
        raise
    offsets = merged_offsets(results)
    stats = merged_statistics(results)
    if companion is not None:
        companion.finish(offsets)
        stats["records_stored"] = companion.stored
        stats["queue_length"] = companion.queue_length()
        companion.close()
    progress.close()
    print_statistics(stats, title=f"Backfill statistics (job {settings.job}, {len(plan)} parts)")
    state = JobState(job=settings.job, source="jetstream2", status=FINISHED, filters={PLAN_KEY: plan_filters(plan)},
                     offsets=offsets)
    return RunResult(stats, state)


def run_backfill_sync(
    wanted_dids: Sequence[str] | None = None,
    start_timestamp: str | None = None,
    end_timestamp: str | None = None,
    wanted_collections: Sequence[str] | None = None,
    num_records: int = 10000,
    instance: str | None = None,
    max_time: int = 900,
    queue_name: str = "jetstream_sync",
    batch_size: int = 100,
    compress: bool = False,
    *,
    on_date_change: Callable[[str], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Seed 001's API: backfill from Jetstream into a queue and return the statistics dict.

    Keyword ``overrides`` accept any ``backfill jetstream`` option by its dest name
    (``bootstrap_servers``, ``job``, ``resume``, ``queue_path``, ``zstd_dictionary``, ...).

    Returns:
        records_stored, messages_received, total_time, records_per_second, collections,
        target_reached, latest_cursor, queue_length, current_date, end_cursor_reached (and more).
    """
    given = {"wanted_dids": ",".join(wanted_dids) if wanted_dids else None, "start_timestamp": start_timestamp,
             "end_timestamp": end_timestamp, "wanted_collections": list(wanted_collections or ["app.bsky.feed.post"]),
             "num_records": num_records, "instance": instance, "max_time": float(max_time), "queue_name": queue_name,
             "batch_size": batch_size, "compress": compress}
    settings = settings_from_namespace(api_namespace(add_arguments, finish_namespace, given, overrides))
    return run(settings, on_date_change=on_date_change, print_table=False).statistics


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill jetstream`` (after argument parsing)."""
    finish_namespace(ns)
    settings = settings_from_namespace(ns)
    run(settings)
    return 0


__all__ = ["JETSTREAM_OPTIONS", "RunResult", "add_arguments", "main", "parse_bool", "run", "run_backfill_sync"]

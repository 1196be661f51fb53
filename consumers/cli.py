"""``backfill consume <sink>``: options shared by every consumer group, and the run wrapper.

SIGTERM/SIGINT finish the current batch, store its offsets, and leave the group.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from consumers.base import OFFSET_MISMATCH_POLICIES, ConsumerOptions, ConsumerStats, GroupConsumer, Sink
from consumers.cgroup import default_memory_guard_mb
from runtime.contract.codec import AvroCodec
from runtime.contract.nsid import validate_pattern
from runtime.contract.timeparse import timestamp_us
from runtime.errors import ConfigError
from runtime.kafka.broker import resolve_bootstrap
from runtime.kafka.settings import KAFKA_OPTIONS, KafkaSettings
from runtime.process.metrics import Health, Metrics, MetricsServer
from runtime.process.options import OBSERVABILITY_OPTIONS, ObservabilitySettings, Opt, add_options, resolve_appends
from runtime.process.progress import print_statistics
from runtime.process.signals import set_on_stop_signals

log = logging.getLogger(__name__)

CONSUMER_OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--collections", "-c"), "collections", "BACKFILL_COLLECTIONS", [],
        "collection topics to consume; repeatable; NSID prefix wildcards allowed (default: all)",
        action="append", metavar="NSID"),
    Opt(("--group",), "group", "BACKFILL_CONSUMER_GROUP", None, "consumer group id"),
    Opt(("--batch-size",), "batch_size", "BACKFILL_BATCH_SIZE", None,
        "messages per sink transaction", type=int),
    Opt(("--linger",), "linger", "BACKFILL_LINGER", 0.5, "seconds to wait for a batch to fill", type=float),
    Opt(("--end-timestamp", "-e"), "end_timestamp", "BACKFILL_END_TIMESTAMP", None,
        "skip (and count) events at or past this time"),
    Opt(("--until-done",), "until_done", "BACKFILL_UNTIL_DONE", None,
        "exit once this producer job is finished and fully consumed", metavar="JOB"),
    Opt(("--batch-delay-ms",), "batch_delay_ms", "BACKFILL_BATCH_DELAY_MS", 0,
        "pause between batches, for shared databases", type=int),
    Opt(("--max-concurrent",), "max_concurrent", "BACKFILL_MAX_CONCURRENT", 1,
        "concurrent sink writers", type=int),
    Opt(("--max-memory-mb",), "max_memory_mb", "BACKFILL_MAX_MEMORY_MB", None,
        "pause the partitions while RSS is above this; 0 = no limit (default: 75% of the container's "
        "memory limit from its cgroup, none without one)", type=int),
    Opt(("--idle-exit",), "idle_exit", "BACKFILL_IDLE_EXIT", 0.0,
        "exit after this many seconds without messages (0 = never)", type=float),
    Opt(("--no-account-events",), "no_account_events", "BACKFILL_NO_ACCOUNT_EVENTS", False,
        "do not consume the DID-level topics (identity, account and sync)", action="store_true"),
    Opt(("--offset-mismatch",), "offset_mismatch", "BACKFILL_OFFSET_MISMATCH", "restart",
        "stored offsets of another Kafka cluster or topic incarnation, or past a partition's end (a "
        "cluster or topic created anew while the sink's database was kept): restart reads those "
        "partitions from their beginning (with a warning), refuse stops", choices=OFFSET_MISMATCH_POLICIES),
)


@dataclass
class ConsumerSettings:
    """Settings shared by every consumer process."""

    kafka: KafkaSettings
    obs: ObservabilitySettings
    options: ConsumerOptions
    max_concurrent: int


def add_consumer_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the shared consumer, Kafka and observability options."""
    add_options(parser, CONSUMER_OPTIONS)
    add_options(parser.add_argument_group("kafka"), KAFKA_OPTIONS)
    add_options(parser.add_argument_group("observability"), OBSERVABILITY_OPTIONS)


def consumer_settings(ns: argparse.Namespace, *, default_group: str, default_batch: int) -> ConsumerSettings:
    """Validate the shared options.

    Raises:
        ConfigError: a malformed value.
    """
    resolve_appends(ns, CONSUMER_OPTIONS)
    collections = [validate_pattern(c) for c in ns.collections]
    end_us = timestamp_us(ns.end_timestamp) if ns.end_timestamp else None
    batch = ns.batch_size if ns.batch_size is not None else default_batch
    if batch < 1:
        raise ConfigError("--batch-size must be >= 1")
    options = ConsumerOptions(
        group=ns.group or default_group, collections=collections,
        include_account_events=not ns.no_account_events, batch_size=batch, linger=ns.linger,
        end_time_us=end_us, until_done=ns.until_done, batch_delay=ns.batch_delay_ms / 1000.0,
        max_memory_mb=ns.max_memory_mb if ns.max_memory_mb is not None else default_memory_guard_mb(),
        idle_exit=ns.idle_exit, offset_mismatch=ns.offset_mismatch)
    return ConsumerSettings(kafka=KafkaSettings.from_namespace(ns), obs=ObservabilitySettings.from_namespace(ns),
                            options=options, max_concurrent=max(1, ns.max_concurrent))


def run_consumer(settings: ConsumerSettings, make_sink: Callable[[], Sink], *,
                 metrics: Metrics | None = None, stop_event: threading.Event | None = None,
                 print_table: bool = True, extra: dict[str, Any] | None = None) -> ConsumerStats:
    """Run one consumer group member until it stops; print its statistics.

    Raises:
        FatalError: a commit failed or internal state broke (exit loudly).
    """
    metrics = metrics or Metrics()
    health = Health()
    stop = stop_event or threading.Event()
    server = None
    if settings.obs.metrics_port:
        server = MetricsServer(metrics, health, settings.obs.metrics_host, settings.obs.metrics_port).start()
    with set_on_stop_signals(stop):  # also ends a sink's wait for its database at start
        sink = make_sink()
        try:
            with resolve_bootstrap(settings.kafka.bootstrap_servers) as servers:
                kafka = settings.kafka.with_bootstrap(servers)
                consumer = GroupConsumer(kafka, sink, settings.options, metrics,
                                         AvroCodec.from_config(kafka.registry_config()), health=health,
                                         stop_event=stop, extra_consumer_config=extra)
                stats = consumer.run()
        finally:
            sink.close()
            if server is not None:
                server.stop()
    if print_table:
        print_statistics({
            "consumed": stats.consumed, "rows_written": stats.written_rows, "batches": stats.batches,
            "stop_reason": stats.stop_reason, "skipped": stats.skipped, "dropped": stats.dropped,
            "by_collection": stats.by_collection,
        }, title=f"Consumer {settings.options.group} ({sink.name})")
    return stats

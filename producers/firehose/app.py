"""``backfill firehose``: replay the relay firehose (``subscribeRepos``) into the typed topics (seeds 003/004).

The events are the ones the Jetstream producer writes (same topics, schemas and keys; ``source`` is
``firehose``, ``cursor`` the relay seq, ``time_us`` the frame's time), so every consumer works
unchanged. Options keep the seeds' names: ``--days`` (0 = disabled, -1 = everything the relay keeps,
N = the last N days), ``--start-cursor``, ``--resume``, ``--workers``, ``--batch-size``,
``--relay-url`` / ``RELAY_URL``.

Where a run starts: ``--resume`` continues the job from its checkpoint (the last fully delivered
seq); else ``--start-cursor N`` asks the relay for the frames after seq N; else ``--days``/
``--start-timestamp`` turn a time into a cursor (``--seek probe``: a binary search over seqs, one
short connection per probe; ``--seek scan``: from the oldest frame) and drop the frames before the
start time; else the live stream. Where it ends: ``--end-timestamp``, or, for a time-bounded
backfill (``--days``/``--start-timestamp``) without ``--follow``, the moment the run started: the
job finishes once a frame at or past that time plus the allowed lateness arrives. ``-n`` and
``--max-time`` stop earlier.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from typing import Final

from producers.firehose.settings import (
    FIREHOSE_OPTIONS,
    FirehoseSettings,
    RunResult,
    add_arguments,
    check_resume,
    close_resolver,
    finish_namespace,
    initial_cursor,
    job_options,
    make_resolver,
    settings_from_namespace,
    statistics,
)
from producers.firehose.source import (
    FirehosePosition,
    FirehoseSource,
    FrameHandler,
    RelayStream,
    StreamOptions,
)
from producers.firehose.verify import CommitVerifier
from producers.job import JobRunner, JobStats
from runtime.contract.codec import AvroCodec
from runtime.errors import SourceError
from runtime.kafka.broker import resolve_bootstrap
from runtime.kafka.checkpoint import JobState
from runtime.kafka.settings import KafkaSettings
from runtime.process.metrics import Health, Metrics, MetricsServer
from runtime.process.progress import Progress, print_statistics

log = logging.getLogger(__name__)

async def run_job(settings: FirehoseSettings, kafka: KafkaSettings, metrics: Metrics, health: Health,
                  progress: Progress | None) -> tuple[JobRunner, JobState, FirehoseSource]:
    """Run the single-process job to its end and return the runner, final state and source."""
    codec = AvroCodec.from_config(kafka.registry_config())
    runner = JobRunner(kafka, job_options(settings, settings.job, settings.num_records), metrics, codec,
                       on_progress=_progress_fn(progress, health), health=health)
    previous = runner.prepare()
    check_resume(settings, previous)
    if settings.resume and previous is not None and settings.end_us is None and not settings.follow:
        runner.opts.end_time_us = previous.end_time_us  # the original run's end, not a new "now"
    position = FirehosePosition.restore(previous.position if (settings.resume and previous) else None)
    cursor = await initial_cursor(settings, position)
    resolver = make_resolver(settings, metrics) if settings.verify else None
    verifier = CommitVerifier(resolver, batch_size=settings.verify_batch) if resolver is not None else None
    stream = RelayStream(StreamOptions(settings.relay_url, max_frame_size=settings.max_frame_size,
                                       stall_timeout=settings.stall_timeout,
                                       max_attempts=settings.max_reconnects), cursor, metrics=metrics)
    stream.on_reconnect = lambda: metrics.reconnects.inc("firehose")
    handler = FrameHandler(position, collections=settings.collections, dids=settings.dids,
                           start_us=settings.start_us, end_us=runner.opts.end_time_us,
                           lateness_us=settings.lateness_us, verifier=verifier, job=settings.job, metrics=metrics)
    source = FirehoseSource(stream, handler)
    log.info("job %s: relay %s, cursor %s, start %s, end %s, verify %s", settings.job, settings.relay_url,
             cursor, settings.start_us, runner.opts.end_time_us, settings.verify)
    try:
        final = await runner.run(lambda _prev: source)
    finally:
        runner.close()
        if verifier is not None:
            verifier.close()
        await close_resolver(resolver)
    return runner, final, source


def _progress_fn(progress: Progress | None, health: Health) -> Callable[[JobStats], None]:
    def show(stats: JobStats) -> None:
        health.beat()
        if progress is None:
            return
        progress.update({"records": stats.records_produced,
                         "rate/s": stats.records_produced / max(stats.elapsed, 1e-9),
                         "received": stats.messages_received, "date": stats.current_date or "-",
                         "seq": stats.latest_cursor or "-"}, stats.by_collection)
    return show


def run(settings: FirehoseSettings, *, metrics: Metrics | None = None, print_table: bool = True) -> RunResult:
    """Run ``backfill firehose`` with resolved settings and return the statistics.

    Raises:
        ConfigError: a usage error.
        SourceError: the relay refused (``FutureCursor``) or stayed unreachable.
        FatalError: our own state broke (failed commit, cursor regression).
    """
    if settings.workers > 1:
        from producers.firehose.workers import run_workers  # noqa: PLC0415 - multi-process mode only

        return run_workers(settings, metrics=metrics, print_table=print_table)
    metrics = metrics or Metrics()
    health = Health()
    server = None
    if settings.obs.metrics_port:
        server = MetricsServer(metrics, health, settings.obs.metrics_host, settings.obs.metrics_port).start()
    progress = Progress(settings.progress, title=f"firehose job {settings.job}")
    try:
        with resolve_bootstrap(settings.kafka.bootstrap_servers) as servers:
            kafka = settings.kafka.with_bootstrap(servers)
            health.set_ready(True)
            runner, final, source = asyncio.run(run_job(settings, kafka, metrics, health, progress))
    finally:
        progress.close()
        if server is not None:
            server.stop()
    c = source.stream.counters
    verifier = source.handler.verifier
    stats = statistics(runner.stats, {"frames_received": c.frames, "connects": c.connects, "seq_gaps": c.gaps,
                                      "missing_seqs": c.missing, "outdated_cursor": c.outdated,
                                      "resume_cursor": source.position.resume_cursor},
                       verifier.stats.verified if verifier is not None else None)
    if print_table:
        print_statistics(stats, title=f"Firehose backfill statistics (job {settings.job})")
    return RunResult(stats, final, [final])


#: One line for ``backfill --help``.
HELP: Final = "replay the relay firehose (subscribeRepos) into the typed topics"


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill firehose`` (after argument parsing)."""
    finish_namespace(ns)
    settings = settings_from_namespace(ns)
    try:
        run(settings)
    except SourceError as e:
        # Not our corruption, but the job cannot go on (FutureCursor, relay unreachable): exit 1, no traceback.
        log.error("stopping: %s", e)  # noqa: TRY400 - an upstream refusal, the traceback adds nothing
        return 1
    return 0


__all__ = ["FIREHOSE_OPTIONS", "FirehoseSettings", "RunResult", "add_arguments", "main", "run",
           "settings_from_namespace"]

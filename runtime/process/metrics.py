"""Prometheus metrics with closed label sets, and the HTTP endpoint serving them with health probes.

Every metric is named ``atproto_backfill_<subsystem>_<name>_<unit>`` and built from an injected
``CollectorRegistry`` (tests pass a fresh one). Label values come from closed sets declared here,
pre-registered at start-up: a value outside its set raises, so a typo fails loudly and no DID ever
becomes a label. Hot loops count in plain integers and call the ``inc`` of a pre-resolved child.

``/metrics`` serves the registry, ``/healthz`` fails when the owning loop stopped beating (not when
Kafka is briefly away), ``/readyz`` succeeds once the process declared itself ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from runtime.contract.created_at import OUTCOMES as CREATED_AT_OUTCOMES
from runtime.contract.topics import DID_LEVEL, TYPED_COLLECTIONS
from runtime.errors import DROP_REASONS

log = logging.getLogger(__name__)

PREFIX: Final = "atproto_backfill"

SOURCES: Final = ("jetstream", "firehose", "repo", "jetstream2")
#: Collection label values: the typed collections, the DID-level events, and "other" for the rest.
COLLECTION_LABELS: Final = (*sorted(TYPED_COLLECTIONS), *sorted(DID_LEVEL), "other")
#: Why a well-formed event was not produced (filters and stop conditions; not errors).
SKIP_REASONS: Final = (
    "collection_filter", "did_filter", "before_start", "after_end", "duplicate",
    "over_limit", "out_of_range_timestamp", "too_big", "unknown_type", "sync_frame",
    # Jetstream v2: rows the exact client-side filter left out (collections, DIDs, kinds), and rows
    # at or below the resume seq
    "filtered", "before_cursor",
)
#: Things a stream source tells us about the stream itself (relay firehose: info/error frames, gaps).
STREAM_NOTICES: Final = (
    "outdated_cursor", "future_cursor", "consumer_too_slow", "error_frame", "info_frame",
    "seq_gap", "seq_regression", "oversize_skip",
)
SINKS: Final = ("postgres", "queue")
STAGES: Final = ("producer:jetstream", "producer:firehose", "producer:repo",
                 "consumer:postgres", "consumer:queue", "consumer:repos")
HOST_CLASSES: Final = ("plc", "relay", "bsky_hosted", "self_hosted", "did_web")
STATUS_CLASSES: Final = ("2xx", "3xx", "4xx", "429", "5xx", "error", "timeout")
#: The Jetstream v2 archive's HTTP endpoints.
ARCHIVE_ENDPOINTS: Final = ("listSegments", "planSnapshot", "getSegment", "getBlock", "getZstdDictionary")

LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def collection_label(collection: str) -> str:
    """The closed label value for a collection (typed collections by name, the rest ``other``)."""
    if collection in TYPED_COLLECTIONS or collection in DID_LEVEL:
        return collection
    return "other"


class ClosedCounter:
    """A labelled counter whose label values are a closed, pre-registered product of sets."""

    def __init__(self, counter: Counter, label_sets: Sequence[Sequence[str]]) -> None:
        self._children: dict[tuple[str, ...], Any] = {}
        combos: list[tuple[str, ...]] = [()]
        for values in label_sets:
            combos = [(*c, v) for c in combos for v in values]
        for combo in combos:
            self._children[combo] = counter.labels(*combo)

    def inc(self, *labels: str, amount: float = 1) -> None:
        """Increment the child for ``labels``.

        Raises:
            ValueError: a label value outside its closed set.
        """
        try:
            child = self._children[labels]
        except KeyError:
            raise ValueError(f"label values {labels!r} are not in the closed set") from None
        child.inc(amount)

    def child(self, *labels: str) -> Any:
        """The pre-resolved child (for hot loops)."""
        return self._children[labels]


class Metrics:
    """Every metric of the project, registered on one registry.

    Args:
        registry: where to register (a fresh ``CollectorRegistry()`` in tests).
        clock: wall-clock seconds, injected for the event-time lag computation.
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        r = self.registry
        p = PREFIX

        # -- producers
        self.events_received = ClosedCounter(Counter(
            f"{p}_producer_events_received_total", "Events received from the source.",
            ["source"], registry=r), [SOURCES])
        self.events_produced = ClosedCounter(Counter(
            f"{p}_producer_events_produced_total", "Events written to Kafka (delivery confirmed).",
            ["source", "collection"], registry=r), [SOURCES, COLLECTION_LABELS])
        self.events_skipped = ClosedCounter(Counter(
            f"{p}_producer_events_skipped_total", "Well-formed events not produced (filters, watermark).",
            ["source", "reason"], registry=r), [SOURCES, SKIP_REASONS])
        self.events_dropped = ClosedCounter(Counter(
            f"{p}_producer_events_dropped_total", "Bad upstream input, dead-lettered.",
            ["source", "reason"], registry=r), [SOURCES, DROP_REASONS])
        self.delivery_errors = ClosedCounter(Counter(
            f"{p}_producer_delivery_errors_total", "Kafka delivery reports with an error.",
            ["source"], registry=r), [SOURCES])
        self.checkpoints = ClosedCounter(Counter(
            f"{p}_producer_checkpoints_total", "Job checkpoints written to the control topic.",
            ["source"], registry=r), [SOURCES])
        self.reconnects = ClosedCounter(Counter(
            f"{p}_producer_reconnects_total", "Reconnections to the source.",
            ["source"], registry=r), [SOURCES])
        self.late_events = ClosedCounter(Counter(
            f"{p}_producer_late_events_total",
            "Events that arrived more than the allowed lateness behind newer ones from the same "
            "instance and were not seen before: delivered (a late duplicate is a skip).",
            ["source"], registry=r), [SOURCES])
        self.produce_latency = Histogram(
            f"{p}_producer_produce_latency_seconds", "Time from produce() to the delivery report.",
            ["source"], registry=r, buckets=LATENCY_BUCKETS)
        self.flush_duration = Histogram(
            f"{p}_producer_flush_duration_seconds", "Duration of a checkpoint (flush + commit).",
            ["source"], registry=r, buckets=LATENCY_BUCKETS)
        self.source_cursor = Gauge(
            f"{p}_producer_source_cursor", "Newest source cursor durably checkpointed.",
            ["source"], registry=r)
        self.event_time = Gauge(
            f"{p}_producer_event_time_seconds", "Event time of the newest produced event (unix seconds).",
            ["source"], registry=r)
        self.event_time_lag = Gauge(
            f"{p}_producer_event_time_lag_seconds", "Now minus the newest produced event time.",
            ["source"], registry=r)
        self.watermark_progress = Gauge(
            f"{p}_producer_watermark_progress_ratio",
            "Progress from the start position to the end watermark (0..1).", ["source"], registry=r)
        self.watermark_end = Gauge(
            f"{p}_producer_watermark_end_seconds", "The job's end watermark (unix seconds; 0 = none).",
            ["source"], registry=r)
        self.stream_notices = ClosedCounter(Counter(
            f"{p}_producer_stream_notices_total",
            "Notices about the stream itself (relay info/error frames, sequence gaps, skipped frames).",
            ["source", "kind"], registry=r), [SOURCES, STREAM_NOTICES])
        self.seq_gap_frames = ClosedCounter(Counter(
            f"{p}_producer_seq_gap_frames_total", "Sequence numbers missing from the stream (seq gaps).",
            ["source"], registry=r), [SOURCES])
        self.commits_verified = ClosedCounter(Counter(
            f"{p}_producer_commits_verified_total",
            "Commits whose signature and MST proof verified (--verify); failures are drops.",
            ["source"], registry=r), [SOURCES])
        self.transactions_redone = ClosedCounter(Counter(
            f"{p}_producer_transactions_redone_total",
            "Transactions aborted (a message undelivered within the transaction timeout: the brokers "
            "away that long) whose messages the job sent again in a new one.",
            ["source"], registry=r), [SOURCES])
        self.producer_collections = Gauge(
            f"{p}_producer_collections",
            "Distinct collections the job produces to (at most --max-collections; events of further "
            "collections are dropped with reason too_many_collections).", ["source"], registry=r)
        for s in SOURCES:
            self.producer_collections.labels(s)
            self.produce_latency.labels(s)
            self.flush_duration.labels(s)
            self.source_cursor.labels(s)
            self.event_time.labels(s)
            self.watermark_progress.labels(s)
            self.watermark_end.labels(s)
            self.event_time_lag.labels(s).set_function(self._lag_fn(s))

        # -- dead letters (both sides)
        self.dead_letters = ClosedCounter(Counter(
            f"{p}_dlq_messages_total", "Messages written to a dead-letter topic.",
            ["stage", "reason"], registry=r), [STAGES, DROP_REASONS])

        # -- consumers
        self.consumer_messages = ClosedCounter(Counter(
            f"{p}_consumer_messages_total", "Messages consumed from Kafka.",
            ["sink", "collection"], registry=r), [SINKS, COLLECTION_LABELS])
        self.consumer_skipped = ClosedCounter(Counter(
            f"{p}_consumer_messages_skipped_total", "Messages consumed but not written (watermark, policy).",
            ["sink", "reason"], registry=r),
            [SINKS, ("after_end", "out_of_range_timestamp", "stale_rev", "duplicate", "filtered")])
        self.consumer_dropped = ClosedCounter(Counter(
            f"{p}_consumer_messages_dropped_total", "Messages that failed to decode or transform.",
            ["sink", "reason"], registry=r), [SINKS, DROP_REASONS])
        self.rows_written = Counter(
            f"{p}_consumer_rows_written_total", "Rows written to the sink, by table.",
            ["sink", "table"], registry=r)
        self.batch_duration = Histogram(
            f"{p}_consumer_batch_duration_seconds", "Duration of one sink transaction.",
            ["sink"], registry=r, buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram(
            f"{p}_consumer_batch_size_messages", "Messages per sink transaction.", ["sink"], registry=r,
            buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 50000))
        self.end_to_end_latency = Histogram(
            f"{p}_consumer_end_to_end_latency_seconds",
            "Source event time to committed row (live mode).", ["sink"], registry=r, buckets=LATENCY_BUCKETS)
        self.consumer_lag = Gauge(
            f"{p}_consumer_lag_messages", "Messages behind the high watermark, per partition.",
            ["sink", "topic", "partition"], registry=r)
        self.consumer_paused = Gauge(
            f"{p}_consumer_paused", "1 while partitions are paused (memory limit).", ["sink"], registry=r)
        self.created_at_outcomes = ClosedCounter(Counter(
            f"{p}_consumer_created_at_records_total",
            "Records by the outcome of the createdAt range policy (seed 002).",
            ["sink", "outcome"], registry=r), [SINKS, CREATED_AT_OUTCOMES])
        self.consumer_offset_mismatches = ClosedCounter(Counter(
            f"{p}_consumer_offset_mismatches_total",
            "Stored offsets not used: stored for another cluster or topic incarnation, or past the "
            "partition's end (the partition is read from its beginning, or the consumer refuses).",
            ["sink"], registry=r), [SINKS])
        self.db_retries = ClosedCounter(Counter(
            f"{p}_consumer_sink_retries_total", "Sink transactions retried after a transient failure.",
            ["sink"], registry=r), [SINKS])
        for sink in SINKS:
            self.batch_duration.labels(sink)
            self.batch_size.labels(sink)
            self.end_to_end_latency.labels(sink)
            self.consumer_paused.labels(sink)

        # -- PDS / PLC / relay HTTP
        self.http_requests = ClosedCounter(Counter(
            f"{p}_pds_requests_total", "HTTP requests to PDS hosts, the PLC directory and relays.",
            ["host_class", "status"], registry=r), [HOST_CLASSES, STATUS_CLASSES])
        self.http_retries = ClosedCounter(Counter(
            f"{p}_pds_retries_total", "HTTP requests retried.", ["host_class", "reason"], registry=r),
            [HOST_CLASSES, ("429", "5xx", "timeout", "connection")])
        self.rate_limit_wait = ClosedCounter(Counter(
            f"{p}_pds_rate_limit_wait_seconds_total", "Time spent waiting on rate limits.",
            ["host_class"], registry=r), [HOST_CLASSES])
        self.repos_done = ClosedCounter(Counter(
            f"{p}_repos_completed_total", "Repositories backfilled, by outcome.", ["outcome"], registry=r),
            [("ok", "not_found", "deactivated", "takendown", "failed", "skipped")])

        self.repo_txn_aborts = Counter(
            f"{p}_repos_transactions_aborted_total",
            "Work-topic transactions aborted by a rebalance and redone.", registry=r)
        self.repo_fetch_restarts = Counter(
            f"{p}_repos_fetch_restarts_total",
            "Work-topic partitions of a replica that had work but delivered none, restarted at their "
            "committed offset.", registry=r)

        # -- Jetstream v2 archive
        self.archive_requests = ClosedCounter(Counter(
            f"{p}_jetstream2_archive_requests_total", "HTTP requests to a Jetstream v2 instance's archive.",
            ["endpoint", "status"], registry=r), [ARCHIVE_ENDPOINTS, STATUS_CLASSES])
        self.archive_bytes = ClosedCounter(Counter(
            f"{p}_jetstream2_archive_received_bytes_total", "Body bytes received from the archive endpoints.",
            ["endpoint"], registry=r), [ARCHIVE_ENDPOINTS])
        self.archive_blocks = ClosedCounter(Counter(
            f"{p}_jetstream2_archive_blocks_total",
            "Archive blocks replayed: decoded, fetched a second time, or dead-lettered after the second try.",
            ["outcome"], registry=r), [("decoded", "refetched", "dead_lettered")])

        # -- process
        self.memory = Gauge(f"{p}_process_resident_memory_bytes", "Resident set size.", registry=r)
        proc = psutil.Process()
        self.memory.set_function(lambda: float(proc.memory_info().rss))

        self._newest_event: dict[str, float] = {}

    def _lag_fn(self, source: str) -> Callable[[], float]:
        def lag() -> float:
            newest = self._newest_event.get(source)
            return 0.0 if newest is None else max(0.0, self._clock() - newest)
        return lag

    def observe_event_time(self, source: str, time_us: int) -> None:
        """Record the newest produced event time of ``source`` (drives the time-lag gauge)."""
        seconds = time_us / 1e6
        self._newest_event[source] = seconds
        self.event_time.labels(source).set(seconds)


class Health:
    """Liveness and readiness of a process's main loop.

    The loop calls :meth:`beat` every iteration; ``/healthz`` fails once no beat came for
    ``stall_after`` seconds. :meth:`set_ready` flips ``/readyz``.
    """

    def __init__(self, stall_after: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_after = stall_after
        self._clock = clock
        self._last_beat = clock()
        self._ready = False
        self.reason = "starting"

    def beat(self) -> None:
        """Mark the loop as alive."""
        self._last_beat = self._clock()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Declare readiness (assigned and connected) or its loss."""
        self._ready = ready
        self.reason = reason

    @property
    def alive(self) -> bool:
        """True unless the loop stalled."""
        return self._clock() - self._last_beat < self.stall_after

    @property
    def ready(self) -> bool:
        """True once declared ready and alive."""
        return self._ready and self.alive


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` from a daemon thread."""

    def __init__(self, metrics: Metrics, health: Health, host: str = "127.0.0.1", port: int = 0) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body = generate_latest(registry)
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = health.alive
                    self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n", "text/plain")
                elif path == "/readyz":
                    ok = health.ready
                    text = b"ready\n" if ok else f"not ready: {health.reason}\n".encode()
                    self._send(200 if ok else 503, text, "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        """Start serving; returns self."""
        self._thread.start()
        log.info("metrics, /healthz and /readyz on port %d", self.port)
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


#: Sample name suffixes of each metric type (prometheus_client's exposition).
_SAMPLE_SUFFIXES: Final[dict[str, tuple[str, ...]]] = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def metric_names(metrics: Metrics) -> Iterable[str]:
    """Every sample name the registry exposes (for dashboard checks).

    Metrics with open label sets (rows per table, lag per partition) expose no sample before their
    first use; their names are derived from the metric type so that checks still find them.
    """
    for family in metrics.registry.collect():
        if family.samples:
            for sample in family.samples:
                yield sample.name
        else:
            for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",)):
                yield family.name + suffix

"""``backfill status``: every job in the control topic with its progress, and the consumer groups' lag.

Sources of truth:

* jobs: the checkpoints in ``<prefix>.control.jobs`` (the newest per job, plus the one before it
  for the current rate);
* consumer groups: the groups that committed offsets on this prefix's topics (committed offsets are
  informational for our sinks, which store their own, but they are what lag monitoring sees);
* high watermarks: taken from fetch responses (a consumer's cached watermark after one fetch), never
  from ListOffsets alone, which some Kafka-API brokers answer wrongly after multi-record batches;
  a watermark is never taken lower than an offset a job recorded as written, which is exact.

``--json`` prints one JSON document for scripts; the default is two tables.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from runtime import kafka as kafka_util
from runtime.broker import port_open
from runtime.checkpoint import FINISHED, RUNNING, JobState
from runtime.errors import ConfigError, SourceError
from runtime.settings import KAFKA_OPTIONS, KafkaSettings, Opt, add_options, resolve_appends
from runtime.topics import TopicMap

log = logging.getLogger(__name__)

TP = tuple[str, int]

#: A running job whose last checkpoint is older than this is shown as stale (its process may be gone).
STALE_AFTER_S: Final = 300.0

OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--json",), "json", None, False, "print one JSON document instead of tables", action="store_true"),
    Opt(("--job",), "jobs", None, None, "only this job; repeatable (default: every job)", action="append",
        metavar="JOB"),
    Opt(("--timeout",), "timeout", "BACKFILL_STATUS_TIMEOUT", 10.0,
        "seconds to wait for the broker's answers", type=float),
)


# ------------------------------------------------------------------------------------------ model


@dataclass
class GroupReport:
    """One consumer group's committed position on this prefix's topics.

    Attributes:
        lag: messages between the committed offset (or the partition start) and the high watermark.
        topics: topic -> its lag.
    """

    group: str
    state: str
    lag: int
    topics: dict[str, int] = field(default_factory=dict)


@dataclass
class JobReport:
    """One job as ``backfill status`` shows it.

    Attributes:
        progress: 0..1 from the start to the end watermark (1 once finished; None when unknown).
        rate: produced events per second (between the last two checkpoints, else the run average).
        speed: event-time seconds replayed per wall-clock second.
        eta_s: seconds until the cursor reaches the end watermark at the current speed.
        age_s: seconds since the last checkpoint.
        remaining: consumer group -> messages of this job's written offsets it has not committed yet.
    """

    job: str
    source: str
    status: str
    stale: bool
    filters: dict[str, Any]
    cursor: int | None
    cursor_time_us: int | None
    start_time_us: int | None
    end_time_us: int | None
    progress: float | None
    rate: float | None
    speed: float | None
    eta_s: float | None
    age_s: float
    counts: dict[str, int]
    stop_reason: str | None
    runs: int
    checkpoint: int
    written: int
    remaining: dict[str, int] = field(default_factory=dict)


@dataclass
class StatusReport:
    """Everything ``backfill status`` prints."""

    prefix: str
    generated_at_us: int
    jobs: list[JobReport]
    groups: list[GroupReport]


# ------------------------------------------------------------------------------------------ pure parts


def job_start_us(state: JobState) -> int | None:
    """The event time a job started from, when its source's cursor is a time (else the run start)."""
    start = state.filters.get("start_us") if isinstance(state.filters, Mapping) else None
    if isinstance(start, int) and start > 1:
        return start
    if state.source == "jetstream" and state.start_cursor and state.start_cursor > 1:
        return state.start_cursor
    if state.runs <= 1 and state.started_at_us:
        # A live start ("from now"): the first events are about as old as the run.
        return state.started_at_us
    return None


def job_report(history: list[JobState], now_us: int) -> JobReport:
    """Progress, rate and ETA of one job from its newest checkpoints (oldest first, at least one)."""
    state = history[-1]
    prev = history[-2] if len(history) > 1 else None
    start_us = job_start_us(state)
    end_us = state.end_time_us
    cur_us = state.cursor_time_us
    produced = state.counts.get("produced", 0)

    rate: float | None = None
    speed: float | None = None
    if prev is not None and prev.started_at_us == state.started_at_us and state.updated_at_us > prev.updated_at_us:
        dt = (state.updated_at_us - prev.updated_at_us) / 1e6
        rate = max(0.0, (produced - prev.counts.get("produced", 0)) / dt)
        if cur_us is not None and prev.cursor_time_us is not None:
            speed = max(0.0, (cur_us - prev.cursor_time_us) / 1e6 / dt)
    elif state.runs <= 1 and state.updated_at_us > state.started_at_us > 0:
        dt = (state.updated_at_us - state.started_at_us) / 1e6
        rate = produced / dt
        if cur_us is not None and start_us is not None and cur_us >= start_us:
            speed = (cur_us - start_us) / 1e6 / dt

    progress: float | None = None
    eta: float | None = None
    if state.status == FINISHED:
        progress, eta = 1.0, 0.0
    elif end_us is not None and start_us is not None and cur_us is not None and end_us > start_us:
        progress = min(1.0, max(0.0, (cur_us - start_us) / (end_us - start_us)))
        if state.status == RUNNING and speed:
            eta = max(0.0, (end_us - cur_us) / 1e6 / speed)
    age = max(0.0, (now_us - state.updated_at_us) / 1e6)
    written = sum(sum(parts.values()) for parts in state.offsets.values())
    return JobReport(
        job=state.job, source=state.source, status=state.status,
        stale=state.status == RUNNING and age > STALE_AFTER_S, filters=dict(state.filters),
        cursor=state.cursor, cursor_time_us=cur_us, start_time_us=start_us, end_time_us=end_us,
        progress=progress, rate=rate, speed=speed, eta_s=eta, age_s=age, counts=dict(state.counts),
        stop_reason=state.stop_reason, runs=state.runs, checkpoint=state.checkpoint, written=written)


def partition_lag(committed: int | None, high: int, low: int = 0) -> int:
    """Messages a group still has to read in one partition (from its start when it never committed)."""
    position = committed if committed is not None and committed >= 0 else low
    return max(0, high - position)


def group_report(group: str, state: str, committed: Mapping[TP, int], partitions: Mapping[str, int],
                 watermarks: Mapping[TP, tuple[int, int]]) -> GroupReport:
    """Lag of ``group`` over every partition of the topics it committed on.

    Args:
        committed: the group's committed offsets.
        partitions: topic -> partition count.
        watermarks: (topic, partition) -> (low, high).
    """
    topics: dict[str, int] = {}
    for topic in sorted({t for t, _ in committed}):
        lag = 0
        for p in range(partitions.get(topic, 0)):
            low, high = watermarks.get((topic, p), (0, 0))
            lag += partition_lag(committed.get((topic, p)), high, low)
        topics[topic] = lag
    return GroupReport(group=group, state=state, lag=sum(topics.values()), topics=topics)


def remaining_for_job(state: JobState, committed: Mapping[TP, int]) -> int | None:
    """Messages of the job's recorded output the group has not committed (None: it reads none of it)."""
    consumed_topics = {t for t, _ in committed}
    total = 0
    seen = False
    for topic, parts in state.offsets.items():
        if topic not in consumed_topics:
            continue
        seen = True
        for p, end in parts.items():
            total += partition_lag(committed.get((topic, int(p))), end)
    return total if seen else None


# ------------------------------------------------------------------------------------------ Kafka


def read_job_history(conf: dict[str, Any], control_topic: str, keep: int = 2) -> dict[str, list[JobState]]:
    """The newest ``keep`` checkpoints of every job, oldest first (last value per checkpoint wins).

    Like :func:`runtime.checkpoint.load_jobs`, but keeps the checkpoint before the newest so the
    current rate can be computed.
    """
    history: dict[str, list[JobState]] = {}
    for msg in kafka_util.read_to_end(conf, control_topic):
        value = msg.value()
        if msg.key() is None or value is None:
            continue
        try:
            state = JobState.from_bytes(value)
        except (orjson.JSONDecodeError, TypeError) as e:
            log.warning("ignoring an unreadable checkpoint at offset %d: %s", msg.offset() or 0, e)
            continue
        states = [s for s in history.get(state.job, []) if s.checkpoint != state.checkpoint]
        states.append(state)
        states.sort(key=lambda s: s.checkpoint)
        history[state.job] = states[-keep:]
    return history


def committed_offsets(admin: AdminClient, prefix: str, timeout: float) -> dict[str, tuple[str, dict[TP, int]]]:
    """group -> (state, committed offsets on ``<prefix>.*`` topics except the control topic).

    Raises:
        SourceError: the broker did not answer.
    """
    head = prefix + "."
    control = TopicMap(prefix).control
    try:
        listed = admin.list_consumer_groups(request_timeout=timeout).result()
    except KafkaException as e:
        raise SourceError(f"cannot list consumer groups: {e.args[0]}") from e
    out: dict[str, tuple[str, dict[TP, int]]] = {}
    for g in sorted(listed.valid, key=lambda g: g.group_id):
        request = [ConsumerGroupTopicPartitions(g.group_id)]
        try:
            # One group per request: librdkafka's ListConsumerGroupOffsets takes a single group.
            result = admin.list_consumer_group_offsets(request, request_timeout=timeout)[g.group_id].result()
        except KafkaException as e:
            log.warning("cannot read the offsets of group %s: %s", g.group_id, e.args[0])
            continue
        offsets = {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions or []
                   if tp.topic.startswith(head) and tp.topic != control and tp.offset >= 0}
        if offsets:
            state = g.state.name.lower() if g.state is not None else "unknown"
            out[g.group_id] = (state, offsets)
    return out


def fetch_watermarks(conf: dict[str, Any], partitions: Mapping[str, int], known: Mapping[TP, int],
                     timeout: float, clock: Callable[[], float] = time.monotonic) -> dict[TP, tuple[int, int]]:
    """(low, high) watermarks from fetch responses for every partition of ``partitions``.

    Each partition is fetched from the highest offset already known for it (so little data moves);
    the high watermark of the response is taken, never lower than the known offset.
    """
    tps = [(t, p) for t, n in sorted(partitions.items()) for p in range(n)]
    if not tps:
        return {}
    consumer = Consumer({**conf, "enable.auto.commit": False, "enable.partition.eof": True,
                         "auto.offset.reset": "earliest", "fetch.max.bytes": 1 << 20,
                         "max.partition.fetch.bytes": 64 << 10, "fetch.wait.max.ms": 100})
    out: dict[TP, tuple[int, int]] = {}
    try:
        consumer.assign([TopicPartition(t, p, known.get((t, p), OFFSET_BEGINNING)) for t, p in tps])
        deadline = clock() + timeout
        pending = set(tps)
        while pending and clock() < deadline:
            consumer.poll(0.1)
            for tp in list(pending):
                low, high = consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)
                if high >= 0:
                    out[tp] = (max(low, 0), max(high, known.get(tp, 0)))
                    pending.discard(tp)
        for tp in pending:
            log.warning("no fetch response for %s[%d] within %.0f s; using the offsets known", *tp, timeout)
            out[tp] = (0, known.get(tp, 0))
    finally:
        consumer.close()
    return out


def collect(kafka: KafkaSettings, *, jobs: Iterable[str] = (), timeout: float = 10.0,
            wall: Callable[[], float] = time.time) -> StatusReport:
    """Read jobs, groups and watermarks and build the report.

    Raises:
        SourceError: the broker is unreachable.
    """
    topics = TopicMap(kafka.topic_prefix)
    admin = kafka_util.admin(kafka.client_config())
    try:
        existing = kafka_util.list_topics(admin, timeout=timeout)
    except KafkaException as e:
        raise SourceError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {e.args[0]}") from e
    conf = kafka.consumer_config("atproto-backfill-status")
    history = read_job_history(conf, topics.control) if topics.control in existing else {}
    wanted = set(jobs)
    if wanted:
        history = {j: h for j, h in history.items() if j in wanted}
    groups = committed_offsets(admin, kafka.topic_prefix, timeout)

    known: dict[TP, int] = {}
    for states in history.values():
        for topic, parts in states[-1].offsets.items():
            for p, off in parts.items():
                known[(topic, int(p))] = max(known.get((topic, int(p)), 0), off)
    for _, committed in groups.values():
        for tp, off in committed.items():
            known[tp] = max(known.get(tp, 0), off)
    partitions = {t: existing[t] for t in {t for t, _ in known} if t in existing}
    watermarks = fetch_watermarks(conf, partitions, known, timeout)

    now_us = int(wall() * 1e6)
    job_reports = []
    for name in sorted(history):
        report = job_report(history[name], now_us)
        for group, (_, committed) in groups.items():
            left = remaining_for_job(history[name][-1], committed)
            if left is not None:
                report.remaining[group] = left
        job_reports.append(report)
    group_reports = [group_report(g, state, committed, partitions, watermarks)
                     for g, (state, committed) in sorted(groups.items())]
    return StatusReport(prefix=kafka.topic_prefix, generated_at_us=now_us, jobs=job_reports,
                        groups=group_reports)


# ------------------------------------------------------------------------------------------ output


def _time(us: int | None) -> str:
    if not us:
        return "-"
    return datetime.fromtimestamp(us / 1e6, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _filters(filters: Mapping[str, Any]) -> str:
    parts = []
    for k, v in sorted(filters.items()):
        if v in (None, [], {}, ""):
            continue
        if k in ("start_us", "end_us") and isinstance(v, int):
            shown = _time(v)
        elif isinstance(v, list):
            shown = ",".join(str(x) for x in v)
        else:
            shown = str(v)
        parts.append(f"{k}={shown}")
    return " ".join(parts) or "-"


def render_text(report: StatusReport, out: TextIO) -> None:
    """The jobs table and the consumer-groups table."""
    # Not a terminal: wide enough that a line holds a whole row (for grep and logs).
    console = Console(file=out, width=None if out.isatty() else 300, highlight=False)
    if not report.jobs:
        console.print(f"no jobs in {report.prefix}.control.jobs")
    else:
        table = Table(title=f"jobs ({report.prefix})")
        for col in ("job", "source", "status", "filters", "cursor", "cursor time", "end watermark", "progress",
                    "rate/s", "ETA", "updated", "consumers (left)"):
            table.add_column(col, overflow="fold", no_wrap=col not in ("filters", "consumers (left)"))
        for j in report.jobs:
            status = j.status + (" (stale)" if j.stale else "")
            if j.stop_reason and j.status != RUNNING:
                status += f" ({j.stop_reason})"
            table.add_row(
                j.job, j.source, status, _filters(j.filters), "-" if j.cursor is None else str(j.cursor),
                _time(j.cursor_time_us), _time(j.end_time_us),
                "-" if j.progress is None else f"{j.progress * 100:.1f}%",
                "-" if j.rate is None else f"{j.rate:,.1f}", _duration(j.eta_s), f"{_duration(j.age_s)} ago",
                ", ".join(f"{g}: {n:,}" for g, n in sorted(j.remaining.items())) or "-")
        console.print(table)
    if not report.groups:
        console.print(f"no consumer group has committed offsets on {report.prefix}.* topics")
        return
    table = Table(title="consumer groups")
    for col in ("group", "state", "lag", "lag by topic"):
        table.add_column(col, overflow="fold")
    for g in report.groups:
        table.add_row(g.group, g.state, f"{g.lag:,}",
                      ", ".join(f"{t.removeprefix(report.prefix + '.')}={n:,}" for t, n in g.topics.items()))
    console.print(table)


def render_json(report: StatusReport) -> bytes:
    """The report as one JSON document."""
    return orjson.dumps(asdict(report), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill status``."""
    add_options(parser, OPTIONS)
    add_options(parser.add_argument_group("kafka"), KAFKA_OPTIONS)


def _bootstrap(kafka: KafkaSettings) -> KafkaSettings:
    if kafka.bootstrap_servers == "embedded":
        raise ConfigError("status reads the broker the jobs ran on; an embedded broker would be empty")
    if kafka.bootstrap_servers == "auto":
        if not port_open("127.0.0.1", 9092):
            raise ConfigError("no Kafka listens on localhost:9092; set KAFKA_BOOTSTRAP_SERVERS")
        return kafka.with_bootstrap("localhost:9092")
    return kafka


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill status``."""
    resolve_appends(ns, OPTIONS)
    kafka = _bootstrap(KafkaSettings.from_namespace(ns))
    report = collect(kafka, jobs=ns.jobs, timeout=ns.timeout)
    if ns.json:
        sys.stdout.buffer.write(render_json(report) + b"\n")
        sys.stdout.flush()
    else:
        render_text(report, sys.stdout)
    return 0

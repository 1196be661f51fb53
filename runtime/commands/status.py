"""``backfill status``: every job in the control topic with its progress, and the consumer groups' lag.

Sources of truth:

* jobs: the checkpoints in ``<prefix>.control.jobs`` (the newest per job, plus the one before it
  for the current rate);
* consumer groups: the groups that committed offsets on this prefix's topics (committed offsets are
  informational for our sinks, which store their own, but they are what lag monitoring sees; our
  consumers commit their position, past the transaction markers, once they have read everything);
* partition ends: ListOffsets (``runtime.kafka.offsets``): the high watermark and the last stable offset.

Two figures per group, per partition and summed:

* **lag** counts offsets from the committed offset to the high watermark, exactly as Kafka's
  ``kafka-consumer-groups.sh --describe`` does (a partition the group never committed on counts
  from its log start; Kafka's tool shows ``-`` there). Each producer transaction's commit marker
  takes an offset that is no record, and an open transaction's records count before they commit.
* **records left** counts the committed records the group has still to read: those between its
  committed offset and the last stable offset. Counting needs reading them, so a partition is read
  when that range is at most ``--count-limit`` offsets (from the lowest committed offset of the
  groups within the limit, once for all of them); beyond the limit, or when the read does not end
  within ``--timeout``, the figure is the offset range, an upper bound, and marked so (``≤`` in the
  table, ``records_left_exact: false`` in JSON). A job's "consumers (left)" counts the same way,
  up to the final offsets the job recorded.

``--json`` prints one JSON document for scripts, with every figure; the default is tables that fit
the terminal (the jobs, what each group has left of each job, the groups), ``--verbose`` adds the
jobs' details (filters, raw cursor, end watermark).
"""

from __future__ import annotations

import argparse
import bisect
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from rich import box
from rich.console import Console
from rich.table import Table

from runtime.contract.topics import TopicMap
from runtime.errors import ConfigError, SourceError
from runtime.kafka import clients as kafka_util
from runtime.kafka.broker import port_open
from runtime.kafka.checkpoint import FINISHED, RUNNING, JobState
from runtime.kafka.offsets import Ends, list_ends
from runtime.kafka.settings import DEFAULT_CONTROL_TIMEOUT, KAFKA_OPTIONS, KafkaSettings
from runtime.process.options import Opt, add_options, log_level_option, resolve_appends

log = logging.getLogger(__name__)

TP = tuple[str, int]

#: A running job whose last checkpoint is older than this is shown as stale (its process may be gone).
STALE_AFTER_S: Final = 300.0

#: Offsets of one partition read at most to count the records left in it exactly.
DEFAULT_COUNT_LIMIT: Final = 10_000

OPTIONS: Final[tuple[Opt, ...]] = (
    Opt(("--json",), "json", None, False, "print one JSON document (everything) instead of tables",
        action="store_true"),
    Opt(("--verbose", "-v"), "verbose", None, False,
        "also show each job's source, filters, raw cursor, end watermark, runs and records written",
        action="store_true"),
    Opt(("--job",), "jobs", None, None, "only this job; repeatable (default: every job)", action="append",
        metavar="JOB"),
    Opt(("--timeout",), "timeout", "BACKFILL_STATUS_TIMEOUT", 10.0,
        "seconds to wait for the broker's answers (and for the records counted)", type=float),
    Opt(("--count-limit",), "count_limit", "BACKFILL_STATUS_COUNT_LIMIT", DEFAULT_COUNT_LIMIT,
        "count a group's records left exactly by reading a partition when at most this many offsets "
        "are left in it; beyond, the offset range is shown as an upper bound (0: never read)", type=int),
)


# ------------------------------------------------------------------------------------------ model


@dataclass
class PartitionReport:
    """One partition as one group sees it.

    Attributes:
        committed: the group's committed offset (None: it never committed on this partition).
        low, stable, high: the log start, last stable offset and high watermark.
        lag: offsets from the committed offset (else the log start) to the high watermark.
        records_left: committed records from there to the last stable offset.
        exact: False when ``records_left`` is the offset range (an upper bound), not a count.
    """

    topic: str
    partition: int
    committed: int | None
    low: int
    stable: int
    high: int
    lag: int
    records_left: int
    exact: bool


@dataclass
class GroupReport:
    """One consumer group's committed position on this prefix's topics.

    Attributes:
        lag: offsets between the committed offsets (or the partitions' start) and the high
            watermarks, as Kafka's consumer-group tool counts them.
        topics: topic -> its lag.
        records_left: committed records the group has still to read (see the module docstring).
        records_left_exact: False when some partition's figure is an upper bound.
        topics_records_left: topic -> its records left.
        partitions: every partition of the topics the group committed on.
    """

    group: str
    state: str
    lag: int
    topics: dict[str, int] = field(default_factory=dict)
    records_left: int = 0
    records_left_exact: bool = True
    topics_records_left: dict[str, int] = field(default_factory=dict)
    partitions: list[PartitionReport] = field(default_factory=list)


@dataclass
class JobReport:
    """One job as ``backfill status`` shows it.

    Attributes:
        progress: 0..1 from the start to the end watermark (1 once finished; None when unknown).
        rate: produced events per second (between the last two checkpoints, else the run average).
        speed: event-time seconds replayed per wall-clock second.
        eta_s: seconds until the cursor reaches the end watermark at the current speed.
        age_s: seconds since the last checkpoint.
        remaining: consumer group -> records of this job's output it has not committed yet.
        remaining_exact: consumer group -> False when its ``remaining`` is an offset range (an upper bound).
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
    remaining_exact: dict[str, bool] = field(default_factory=dict)


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
    """Offsets a group still has to pass in one partition (from its start when it never committed)."""
    position = committed if committed is not None and committed >= 0 else low
    return max(0, high - position)


@dataclass(frozen=True)
class Scan:
    """Every committed record's offset in ``[start, stop)`` of one partition (read, so exact)."""

    start: int
    stop: int
    offsets: tuple[int, ...]

    def covers(self, begin: int, end: int) -> bool:
        return self.start <= begin and end <= self.stop

    def count(self, begin: int, end: int) -> int:
        """Records in ``[begin, end)`` (within what was read)."""
        return max(0, bisect.bisect_left(self.offsets, end) - bisect.bisect_left(self.offsets, begin))


def records_between(begin: int, end: int, scan: Scan | None) -> tuple[int, bool]:
    """(records in ``[begin, end)``, exact): counted when ``scan`` covers the range, else the offset range."""
    if begin >= end:
        return 0, True
    if scan is not None and scan.covers(begin, end):
        return scan.count(begin, end), True
    return end - begin, False


def read_from(committed: int | None, ends: Ends) -> int:
    """Where a group reads a partition from: its committed offset, never before the log start."""
    return max(committed if committed is not None and committed >= 0 else ends.low, ends.low)


def plan_scans(groups: Iterable[Mapping[TP, int]], partitions: Iterable[TP], ends: Mapping[TP, Ends],
               limit: int) -> dict[TP, tuple[int, int]]:
    """The ranges to read for exact counts: per partition, from the lowest position of a group that
    has at most ``limit`` offsets left there, to the last stable offset."""
    wanted = list(groups)
    plans: dict[TP, tuple[int, int]] = {}
    if limit <= 0:
        return plans
    for tp in partitions:
        e = ends.get(tp)
        if e is None:
            continue
        starts = [read_from(committed.get(tp), e) for committed in wanted]
        near = [p for p in starts if 0 < e.stable - p <= limit]
        if near:
            plans[tp] = (min(near), e.stable)
    return plans


def group_report(group: str, state: str, committed: Mapping[TP, int], partitions: Mapping[str, int],
                 ends: Mapping[TP, Ends], scans: Mapping[TP, Scan] | None = None) -> GroupReport:
    """Lag and records left of ``group`` over every partition of the topics it committed on.

    Args:
        committed: the group's committed offsets.
        partitions: topic -> partition count.
        ends: (topic, partition) -> its ends (a partition missing here is left out).
        scans: the partitions read for exact counts.
    """
    scans = scans or {}
    report = GroupReport(group=group, state=state, lag=0)
    for topic in sorted({t for t, _ in committed}):
        lag = left = 0
        for p in range(partitions.get(topic, 0)):
            e = ends.get((topic, p))
            if e is None:
                continue
            c = committed.get((topic, p))
            n, exact = records_between(read_from(c, e), e.stable, scans.get((topic, p)))
            part = PartitionReport(topic=topic, partition=p, committed=c, low=e.low, stable=e.stable, high=e.high,
                                   lag=partition_lag(c, e.high, e.low), records_left=n, exact=exact)
            report.partitions.append(part)
            lag += part.lag
            left += n
            report.records_left_exact &= exact
        report.topics[topic] = lag
        report.topics_records_left[topic] = left
    report.lag = sum(report.topics.values())
    report.records_left = sum(report.topics_records_left.values())
    return report


def remaining_for_job(state: JobState, committed: Mapping[TP, int], scans: Mapping[TP, Scan] | None = None,
                      ends: Mapping[TP, Ends] | None = None) -> tuple[int, bool] | None:
    """(records of the job's output the group has not committed, exact); None: it reads none of it.

    Counted up to the final offsets the job recorded, from the group's committed offset (else the
    partition's log start, when known).
    """
    scans = scans or {}
    ends = ends or {}
    consumed_topics = {t for t, _ in committed}
    total = 0
    exact = True
    seen = False
    for topic, parts in state.offsets.items():
        if topic not in consumed_topics:
            continue
        seen = True
        for p, end in parts.items():
            tp = (topic, int(p))
            e = ends.get(tp)
            begin = read_from(committed.get(tp), e) if e is not None else max(committed.get(tp, 0), 0)
            n, ok = records_between(begin, end, scans.get(tp))
            total += n
            exact &= ok
    return (total, exact) if seen else None


# ------------------------------------------------------------------------------------------ Kafka


def read_job_history(conf: dict[str, Any], control_topic: str, keep: int = 2, *,
                     max_wait: float = DEFAULT_CONTROL_TIMEOUT) -> dict[str, list[JobState]]:
    """The newest ``keep`` checkpoints of every job, oldest first (last value per checkpoint wins).

    Like :func:`runtime.kafka.checkpoint.load_jobs`, but keeps the checkpoint before the newest so the
    current rate can be computed.
    """
    history: dict[str, list[JobState]] = {}
    for msg in kafka_util.read_to_end(conf, control_topic, max_wait=max_wait):
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


def scan_partitions(conf: dict[str, Any], plans: Mapping[TP, tuple[int, int]], timeout: float,
                    clock: Callable[[], float] = time.monotonic) -> dict[TP, Scan]:
    """Read each planned range ``[start, stop)`` with read_committed isolation and list its records.

    A range is complete once the consumer's position reaches ``stop`` (librdkafka moves it past
    commit markers and aborted records, which are never delivered) or the partition's end. Ranges
    not complete within ``timeout`` are left out (their figures stay upper bounds).
    """
    if not plans:
        return {}
    consumer = Consumer({**conf, "enable.auto.commit": False, "enable.partition.eof": True,
                         "isolation.level": "read_committed", "fetch.wait.max.ms": 100})
    found: dict[TP, list[int]] = {tp: [] for tp in plans}
    pending = set(plans)
    done: dict[TP, Scan] = {}

    def finish(tp: TP) -> None:
        pending.discard(tp)
        consumer.pause([TopicPartition(*tp)])
        done[tp] = Scan(plans[tp][0], plans[tp][1], tuple(sorted(found[tp])))

    try:
        consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in sorted(plans.items())])
        deadline = clock() + timeout
        while pending and clock() < deadline:
            for msg in consumer.consume(num_messages=10_000, timeout=0.1):
                tp = (msg.topic() or "", msg.partition() or 0)
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and tp in pending:
                        finish(tp)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("counting records of %s[%d]: %s", *tp, err)
                    continue
                offset = msg.offset()
                if tp in pending and offset is not None and offset < plans[tp][1]:
                    found[tp].append(offset)
            if pending:
                for pos in consumer.position([TopicPartition(*tp) for tp in sorted(pending)]):
                    tp = (pos.topic, pos.partition)
                    if pos.offset >= plans[tp][1]:
                        finish(tp)
        for tp in sorted(pending):
            log.warning("counting the records of %s[%d] did not finish within %.0f s; showing the offset range",
                        *tp, timeout)
    finally:
        consumer.close()
    return done


def collect(kafka: KafkaSettings, *, jobs: Iterable[str] = (), timeout: float = 10.0,
            count_limit: int = DEFAULT_COUNT_LIMIT, wall: Callable[[], float] = time.time) -> StatusReport:
    """Read jobs, groups and partition ends, count the records left, and build the report.

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
    history = (read_job_history(conf, topics.control, max_wait=kafka.control_timeout)
               if topics.control in existing else {})
    wanted = set(jobs)
    if wanted:
        history = {j: h for j, h in history.items() if j in wanted}
    groups = committed_offsets(admin, kafka.topic_prefix, timeout)

    partitions = {t: existing[t] for _, committed in groups.values() for t, _ in committed if t in existing}
    tps = [(t, p) for t, n in sorted(partitions.items()) for p in range(n)]
    ends = list_ends(admin, tps, timeout)
    plans = plan_scans([committed for _, committed in groups.values()], tps, ends, count_limit)
    scans = scan_partitions(conf, plans, timeout)

    now_us = int(wall() * 1e6)
    job_reports = []
    for name in sorted(history):
        report = job_report(history[name], now_us)
        for group, (_, committed) in groups.items():
            left = remaining_for_job(history[name][-1], committed, scans, ends)
            if left is not None:
                report.remaining[group], report.remaining_exact[group] = left
        job_reports.append(report)
    group_reports = [group_report(g, state, committed, partitions, ends, scans)
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


def _count(n: int, exact: bool) -> str:
    """A count, or ``≤n`` for an upper bound."""
    return f"{n:,}" if exact or n == 0 else f"≤{n:,}"


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


#: Columns of the tables when the output is no terminal and ``COLUMNS`` is not set.
DEFAULT_WIDTH: Final = 100


#: Columns whose values are short and read as one piece (figures, durations): never wrapped.
_WHOLE: Final = frozenset({"status", "progress", "ETA", "rate/s", "updated", "cursor", "runs", "written",
                           "records left", "state", "lag (offsets)"})
#: The narrowest a column of text (names, times, filters) gets in a narrow terminal.
_MIN_TEXT_WIDTH: Final = 10


def _table(title: str, *columns: str) -> Table:
    """A borderless table: long text (names, filters) wraps and folds in its column, nothing is cut off."""
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, collapse_padding=True)
    for col in columns:
        whole = col in _WHOLE
        table.add_column(col, overflow="fold", no_wrap=whole, min_width=None if whole else _MIN_TEXT_WIDTH)
    return table


def _status(j: JobReport) -> str:
    status = j.status + (" (stale)" if j.stale else "")
    if j.stop_reason and j.status != RUNNING:
        status += f" ({j.stop_reason})"
    return status


def render_text(report: StatusReport, out: TextIO, *, verbose: bool = False, width: int | None = None) -> None:
    """The jobs, what each consumer group has left of each job, and the groups' lag, in tables as
    wide as the terminal (``width``; else ``COLUMNS``, else :data:`DEFAULT_WIDTH`). ``verbose`` adds
    each job's source, filters, raw cursor, end watermark, runs and records written."""
    if width is None:
        width = None if out.isatty() else shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    console = Console(file=out, width=width, highlight=False)
    if not report.jobs:
        console.print(f"no jobs in {report.prefix}.control.jobs")
    else:
        table = _table(f"jobs ({report.prefix})", "job", "status", "progress", "cursor time", "ETA", "rate/s",
                       "updated")
        for j in report.jobs:
            table.add_row(j.job, _status(j), "-" if j.progress is None else f"{j.progress * 100:.1f}%",
                          _time(j.cursor_time_us), _duration(j.eta_s),
                          "-" if j.rate is None else f"{j.rate:,.1f}", f"{_duration(j.age_s)} ago")
        console.print(table)
        if verbose:
            table = _table("job details", "job", "source", "filters", "cursor", "end watermark", "runs", "written")
            for j in report.jobs:
                table.add_row(j.job, j.source, _filters(j.filters), "-" if j.cursor is None else str(j.cursor),
                              _time(j.end_time_us), str(j.runs), f"{j.written:,}")
            console.print(table)
        left = [(j.job, g, _count(n, j.remaining_exact.get(g, True)))
                for j in report.jobs for g, n in sorted(j.remaining.items())]
        if left:
            table = _table("records left of each job, by consumer group", "job", "group", "records left")
            for row in left:
                table.add_row(*row)
            console.print(table)
    if not report.groups:
        console.print(f"no consumer group has committed offsets on {report.prefix}.* topics")
        return
    table = _table("consumer groups", "group", "state", "records left", "lag (offsets)", "records left by topic")
    for g in report.groups:
        inexact = {p.topic for p in g.partitions if not p.exact}
        table.add_row(g.group, g.state, _count(g.records_left, g.records_left_exact), f"{g.lag:,}",
                      "\n".join(f"{t.removeprefix(report.prefix + '.')}={_count(n, t not in inexact)}"
                                for t, n in g.topics_records_left.items()) or "-")
    console.print(table)


def render_json(report: StatusReport) -> bytes:
    """The report as one JSON document."""
    return orjson.dumps(asdict(report), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


# ------------------------------------------------------------------------------------------ CLI


#: One line for ``backfill --help``.
HELP: Final = "show every job, its progress and the consumer groups' lag"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill status``."""
    add_options(parser, (*OPTIONS, log_level_option("WARNING")))
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
    report = collect(kafka, jobs=ns.jobs, timeout=ns.timeout, count_limit=ns.count_limit)
    if ns.json:
        sys.stdout.buffer.write(render_json(report) + b"\n")
        sys.stdout.flush()
    else:
        render_text(report, sys.stdout, verbose=ns.verbose)
    return 0

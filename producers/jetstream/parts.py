"""``backfill jetstream --protocol v2 --workers N``: the archive replayed as N seq ranges in parallel.

Sealed segments are independent, so the replay's range of seqs is cut at segment boundaries into N
contiguous parts of about the same number of rows (``listSegments``' event counts), and each part
runs as its own job, ``<job>.part<i>``, in its own process: its own producer, transactions and
checkpoints, exactly once like any job. Parts 0..N-2 end at their last seq; the last part carries
the run's own end (a time, a seq, or none: then it goes on into the live tail).

Within a part every DID's rows reach Kafka in seq order; across parts they may interleave (part 1's
rows of a DID can land before part 0's). The consumers' fold does not depend on arrival order (it
keeps the newest version by revision), so the sinks end the same; a reader of the raw topics that
needs one DID's rows in seq order sorts by ``cursor`` (the seq) or runs with ``--workers 1``.

The plan (every part's range) is stored in every part's job filters, so ``--resume`` runs the same
parts even after the instance sealed more segments.

Pure planning (:func:`split`) plus the process plumbing; no Kafka here besides reading the control
topic for a resume.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Final

from producers.jetstream.v2client import SegmentListing
from runtime.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from producers.jetstream.app import JetstreamSettings

log = logging.getLogger(__name__)

#: The job filters key holding the plan.
PLAN_KEY: Final = "parts"


@dataclass(frozen=True, slots=True)
class Part:
    """Seqs ``after < seq <= through`` (``through`` None: to the run's own end)."""

    index: int
    after: int
    through: int | None


def part_job(job: str, index: int) -> str:
    """The job name of part ``index``."""
    return f"{job}.part{index}"


def split(segments: Sequence[SegmentListing], after: int, workers: int, *, end_us: int | None = None,
          end_seq: int | None = None) -> list[Part]:
    """Cut the seqs after ``after`` into at most ``workers`` parts at segment boundaries, balanced by rows.

    Only sealed segments holding seqs past ``after`` (and before the end: a segment witnessed wholly
    at or after ``end_us``, or starting past ``end_seq``, is out) are counted; the last part is open
    (``through`` None) so that it also takes what was sealed since and the live tail. A first segment
    cut by ``after`` counts its rows past it pro rata.
    """
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    inside: list[tuple[SegmentListing, float]] = []
    for seg in segments:
        if seg.max_seq <= after:
            continue
        if end_seq is not None and seg.min_seq > end_seq:
            break
        if end_us is not None and seg.min_witnessed_at >= end_us:
            break
        span = max(1, seg.max_seq - seg.min_seq + 1)
        share = min(1.0, (seg.max_seq - max(after, seg.min_seq - 1)) / span)
        inside.append((seg, seg.event_count * share))
    if workers == 1 or len(inside) < 2:
        return [Part(0, after, None)]
    total = sum(w for _, w in inside) or float(len(inside))
    parts: list[Part] = []
    start = after
    acc = 0.0
    for k, (seg, weight) in enumerate(inside[:-1]):
        acc += weight
        remaining_parts = workers - len(parts) - 1
        remaining_segments = len(inside) - k - 1
        if remaining_parts <= 0:
            break
        if acc >= total * (len(parts) + 1) / workers or remaining_segments <= remaining_parts - 1:
            parts.append(Part(len(parts), start, seg.max_seq))
            start = seg.max_seq
    parts.append(Part(len(parts), start, None))
    return parts


def plan_of(filters: dict[str, Any]) -> list[Part] | None:
    """The plan stored in a part's job filters (None when there is none)."""
    raw = filters.get(PLAN_KEY)
    if not isinstance(raw, list) or not raw:
        return None
    try:
        return [Part(i, int(a), None if b is None else int(b)) for i, (a, b) in enumerate(raw)]
    except (TypeError, ValueError):
        return None


def plan_filters(plan: Sequence[Part]) -> list[list[int | None]]:
    """The plan as stored in job filters."""
    return [[p.after, p.through] for p in plan]


def part_settings(settings: JetstreamSettings, part: Part, plan: Sequence[Part]) -> JetstreamSettings:
    """The settings of the process running ``part``: its own job, seq range, no companion, no display."""
    last = part.index == len(plan) - 1
    obs = settings.obs
    if obs.metrics_port:
        obs = dataclasses.replace(obs, metrics_port=obs.metrics_port + 1 + part.index)
    return dataclasses.replace(
        settings, job=part_job(settings.job, part.index), workers=1, protocol="v2", consumer="none",
        progress="none", raw_cursor=part.after + 1, start_us=part.after + 1,
        end_seq=settings.end_seq if last else part.through, end_us=settings.end_us if last else None,
        obs=obs, extra={**settings.extra, PLAN_KEY: plan_filters(plan), "part": part.index})


def _part_main(settings: JetstreamSettings, conn: Connection) -> None:
    """A part's process: run the job, send back its statistics and final offsets."""
    from producers.jetstream.app import run  # noqa: PLC0415 - the app imports this module
    from runtime.process.logs import configure  # noqa: PLC0415
    from runtime.process.memory import set_up_service  # noqa: PLC0415

    configure(settings.obs.log_level, settings.obs.log_format)
    set_up_service(settings.obs.heap_trim_interval)
    try:
        result = run(settings, print_table=False)
        conn.send(("ok", result.statistics, result.state.offsets))
    except BaseException as e:
        conn.send(("error", f"{type(e).__name__}: {e}", {}))
        raise
    finally:
        conn.close()


@dataclass
class PartResult:
    """What one part's process reported."""

    part: Part
    ok: bool
    statistics: dict[str, Any]
    offsets: dict[str, dict[str, int]]
    error: str | None = None


def run_parts(settings: JetstreamSettings, plan: Sequence[Part]) -> list[PartResult]:
    """Run every part in its own process (spawned), wait for all, return what each reported.

    SIGINT/SIGTERM to this process are passed on to the parts (each stops at a checkpoint).

    Raises:
        SourceError: a part failed (the others ran to their end; ``--resume`` continues the failed ones).
    """
    ctx = multiprocessing.get_context("spawn")
    procs: list[tuple[Part, Any, Connection]] = []
    for part in plan:
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_part_main, args=(part_settings(settings, part, plan), child_end),
                           name=f"jetstream2-part{part.index}")
        proc.start()
        child_end.close()
        procs.append((part, proc, parent_end))
    log.info("replaying %d parts in parallel: %s", len(plan),
             ", ".join(f"part{p.index} ({p.after}, {'end' if p.through is None else p.through}]" for p in plan))

    def forward(signum: int, _frame: object) -> None:
        for _, proc, _ in procs:
            if proc.is_alive():
                proc.terminate() if signum == signal.SIGTERM else _interrupt(proc.pid)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    results: list[PartResult] = []
    try:
        for part, proc, conn in procs:
            report: tuple[str, Any, Any] | None = None
            try:
                report = conn.recv()
            except EOFError:
                report = None
            proc.join()
            if report is not None and report[0] == "ok" and proc.exitcode == 0:
                results.append(PartResult(part, True, report[1], report[2]))
            else:
                detail = report[1] if report is not None else f"exit status {proc.exitcode}"
                results.append(PartResult(part, False, {}, {}, str(detail)))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    failed = [r for r in results if not r.ok]
    if failed:
        raise SourceError("parts failed (the others finished; --resume continues them): " + "; ".join(
            f"{part_job(settings.job, r.part.index)}: {r.error}" for r in failed))
    return results


def _interrupt(pid: int) -> None:
    import os  # noqa: PLC0415

    os.kill(pid, signal.SIGINT)


def merged_offsets(results: Sequence[PartResult]) -> dict[str, dict[str, int]]:
    """Per topic and partition, the highest next offset any part wrote (what a consumer must reach)."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        for topic, parts in r.offsets.items():
            mine = out.setdefault(topic, {})
            for p, offset in parts.items():
                mine[p] = max(mine.get(p, 0), offset)
    return out


def merged_statistics(results: Sequence[PartResult]) -> dict[str, Any]:
    """The seed statistics of the whole run: counts summed, the last part's cursor and end."""
    if not results:
        return {}
    out: dict[str, Any] = dict(results[-1].statistics)
    for key in ("records_stored", "messages_received", "records_produced", "events_produced", "late_events"):
        values = [r.statistics.get(key) for r in results]
        if all(isinstance(v, int) for v in values):
            out[key] = sum(v for v in values if isinstance(v, int))
    total_time = max((float(r.statistics.get("total_time") or 0) for r in results), default=0.0)
    out["total_time"] = total_time
    produced = out.get("records_produced")
    if isinstance(produced, int) and total_time > 0:
        out["records_per_second"] = round(produced / total_time, 1)
    for key in ("skipped", "dropped"):
        merged: dict[str, int] = {}
        for r in results:
            for reason, n in (r.statistics.get(key) or {}).items():
                merged[reason] = merged.get(reason, 0) + int(n)
        out[key] = merged
    out["collections"] = sorted({c for r in results for c in (r.statistics.get("collections") or [])})
    out["parts"] = len(results)
    return out

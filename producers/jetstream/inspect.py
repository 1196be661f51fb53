"""``backfill inspect segment FILE.jss``: a Jetstream v2 segment file as Jetstream-shaped JSON lines.

Each row is decoded by :mod:`producers.jetstream.archive` and printed the way Jetstream serves it
(:func:`runtime.contract.records.to_jetstream_json`) plus its ``seq``, in seq order; a ``#sync`` row
prints as ``{"kind": "sync", ...}``. ``--blocks`` prints the header and the block index instead of
the rows. ``--verify`` checks the segment checksum, every block's zstd content checksum and
columns against the block index, the header's counts, the footer, and that every record payload is
the canonical encoding its recomputed CID names; each problem is named on stderr and the exit
status is 1. Rows that do not decode are reported on stderr with their reason (exit status 1 too).
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import IO, Final

import orjson

from producers.jetstream.archive import RowFilter, decode_block_rows, event_json
from runtime.atproto.segment import Problem, Segment, SegmentError
from runtime.errors import ConfigError
from runtime.process.options import Opt, add_options

OPTIONS: Final = (
    Opt(("--output", "-o"), "output", None, None, "write the JSON lines to this file (default stdout)"),
    Opt(("--verify",), "verify", None, False,
        "verify the segment checksum, every block's content checksum and every record's CID; "
        "problems are named and make the exit status 1", action="store_true"),
    Opt(("--blocks",), "blocks", None, False, "print the header and the block index instead of the rows",
        action="store_true"),
    Opt(("--wanted-collections", "-c"), "wanted_collections", None, None,
        "only these collections (repeatable, wildcards allowed)", action="append", metavar="NSID"),
    Opt(("--summary",), "summary", None, False, "print the counts of rows, events and failures to stderr",
        action="store_true"),
)

#: One line for ``backfill --help``.
HELP: Final[str] = "decode a Jetstream v2 segment file (.jss) to JSON lines"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill inspect segment``."""
    parser.add_argument("file", help="a sealed Jetstream v2 segment file (.jss)")
    add_options(parser, OPTIONS)


class Report:
    """What an inspection found: counts, verification problems and rows that did not decode."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.problems: list[Problem] = []
        self.failures: list[tuple[int | None, str, str]] = []

    @property
    def ok(self) -> bool:
        """No problem and no failure."""
        return not self.problems and not self.failures


def _write(out: IO[bytes], line: object) -> None:
    out.write(orjson.dumps(line) + b"\n")


def run(data: bytes | mmap.mmap | memoryview, out: IO[bytes], *, verify: bool = False, blocks: bool = False,
        collections: list[str] | None = None) -> Report:
    """Write the JSON lines of the segment in ``data`` to ``out`` and return what was found.

    Raises:
        SegmentError: the header or the block index is not valid (nothing can be read).
    """
    seg = Segment(data)
    report = Report()
    if verify:
        report.problems = seg.verify()
    if blocks:
        header = asdict(seg.header)
        header["checksum"] = f"{seg.header.checksum:016x}"
        _write(out, {"header": header})
        for info in seg.blocks:
            _write(out, {"block": asdict(info)})
        out.flush()
        return report
    flt = RowFilter.of(collections=collections or ())
    for info in seg.blocks:
        try:
            block = seg.block(info.index)
        except SegmentError as e:
            report.counts[f"failed:{e.reason}"] += info.count
            report.failures.append((None, e.reason, f"block {info.index}: {e}"))
            continue
        result = decode_block_rows(block, flt=flt, verify_cid=verify)
        report.counts["rows"] += len(block)
        report.counts["filtered"] += sum(result.skipped.values())
        for drop in result.drops:
            report.counts[f"failed:{drop.reason}"] += 1
            report.failures.append((drop.cursor, drop.reason, drop.detail))
        for item in result.items:
            line = event_json(item)
            report.counts[str(line["kind"])] += 1
            _write(out, line)
    out.flush()
    return report


def _problem_line(problem: Problem) -> str:
    where = "segment" if problem.block is None else f"block {problem.block}"
    return f"{where}: {problem.what}: {problem.detail}"


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill inspect segment``."""
    path = Path(ns.file)
    try:
        with open(path, "rb") as f:
            data: mmap.mmap | bytes = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    try:
        if ns.output:
            with open(ns.output, "wb") as out:
                report = run(data, out, verify=ns.verify, blocks=ns.blocks, collections=ns.wanted_collections)
        else:
            report = run(data, sys.stdout.buffer, verify=ns.verify, blocks=ns.blocks,
                         collections=ns.wanted_collections)
    except SegmentError as e:
        print(f"{path}: not a readable sealed segment: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if isinstance(data, mmap.mmap):
            with contextlib.suppress(BufferError):  # a view still referenced (a traceback): gc closes it
                data.close()
    for problem in report.problems:
        print(_problem_line(problem), file=sys.stderr)
    for seq, reason, detail in report.failures:
        print(f"{'row ' + str(seq) if seq is not None else 'block'}: {reason}: {detail}", file=sys.stderr)
    if ns.summary:
        print(orjson.dumps(dict(sorted(report.counts.items()))).decode(), file=sys.stderr)
    return 0 if report.ok else 1


__all__ = ["HELP", "OPTIONS", "Report", "add_arguments", "main", "run"]

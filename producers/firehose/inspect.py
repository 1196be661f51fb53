"""``backfill inspect frames FILE``: a firehose capture file as Jetstream-shaped JSON lines.

A capture is a sequence of ``[u32 little-endian length][frame bytes]`` records, zstd-compressed or
not (told apart by the zstd magic). Each frame is decoded by :mod:`producers.firehose.decode` and
each event printed the way Jetstream serves it (:func:`runtime.contract.records.to_jetstream_json`), with
``time_us`` from the frame's ``time``. ``--all`` also prints the frames that carry no event
(``#sync``, ``#info``, error frames, unknown types); ``--verify`` checks every commit against DID
documents from ``--did-docs``. Frames that do not decode are reported on stderr with their reason;
the exit status is 1 when there was any.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

import orjson

from producers.firehose.decode import KIND_ERROR, KIND_INFO, Decoded, decode_frame
from producers.firehose.verify import CommitVerifier, DictResolver
from runtime.atproto.capture import CaptureError, read_capture_bytes, split_capture
from runtime.contract.nsid import CollectionFilter
from runtime.contract.records import RecordEvent, to_jetstream_json
from runtime.errors import ConfigError, DropError
from runtime.process.options import Opt, add_options

log = logging.getLogger(__name__)

OPTIONS: Final = (
    Opt(("--output", "-o"), "output", None, None, "write the JSON lines to this file (default stdout)"),
    Opt(("--all",), "all_frames", None, False, "also print frames without events (sync, info, error, unknown)",
        action="store_true"),
    Opt(("--wanted-collections", "-c"), "wanted_collections", None, None,
        "only these collections (repeatable, wildcards allowed)", action="append", metavar="NSID"),
    Opt(("--verify",), "verify", None, False, "verify every commit (signature, MST proof)", action="store_true"),
    Opt(("--did-docs",), "did_docs", None, None, "JSON object of DID -> DID document (.zst allowed) for --verify"),
    Opt(("--summary",), "summary", None, False, "print the counts of frames, events and failures to stderr",
        action="store_true"),
    Opt(("--log-level",), "log_level", "BACKFILL_LOG_LEVEL", "WARNING", "logging level"),
)


#: One line for ``backfill --help``.
HELP: Final = "decode a firehose capture file to JSON lines"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill inspect frames``."""
    parser.add_argument("file", help="capture file: [u32 LE length][frame] records, zstd-compressed or not")
    add_options(parser, OPTIONS)


def frame_line(decoded: Decoded) -> dict[str, Any]:
    """The JSON line of a frame that carries no event (``--all``)."""
    line: dict[str, Any] = {"kind": decoded.kind, "type": decoded.type}
    if decoded.seq is not None:
        line["seq"] = decoded.seq
    if decoded.did is not None:
        line["did"] = decoded.did
    if decoded.time_us is not None:
        line["time_us"] = decoded.time_us
    if decoded.kind in (KIND_INFO, KIND_ERROR):
        line["name"] = decoded.name
        line["message"] = decoded.message
    return line


class Inspector:
    """Decodes capture frames into JSON lines and counts what it saw.

    Args:
        verifier: verify commits too (None = no).
        collections: keep only these collections (None = all).
        all_frames: emit lines for frames without events.
    """

    def __init__(self, *, verifier: CommitVerifier | None = None, collections: list[str] | None = None,
                 all_frames: bool = False) -> None:
        self.verifier = verifier
        coll = CollectionFilter(collections or [])
        self._collections = None if coll.matches_all else coll
        self.all_frames = all_frames
        self.counts: Counter[str] = Counter()
        self.failures: list[tuple[int, str, str]] = []

    async def lines(self, frames: Iterator[bytes]) -> list[dict[str, Any]]:
        """Every output line for ``frames`` (failures are recorded in :attr:`failures`)."""
        out: list[dict[str, Any]] = []
        for index, data in enumerate(frames):
            self.counts["frames"] += 1
            try:
                decoded = decode_frame(data, collections=self._collections)
                if self.verifier is not None:
                    await self.verifier.check(decoded)
            except DropError as e:
                self.counts[f"failed:{e.reason}"] += 1
                self.failures.append((index, e.reason, e.detail))
                continue
            self.counts[f"{decoded.kind}_frames"] += 1
            if not decoded.events and self.all_frames:
                out.append(frame_line(decoded))
            for event in decoded.events:
                if isinstance(event, RecordEvent):
                    self.counts[f"{event.operation}s"] += 1
                else:
                    self.counts[decoded.kind] += 1
                self.counts["events"] += 1
                out.append(to_jetstream_json(event))
        return out


def _frames(path: Path) -> Iterator[bytes]:
    try:
        data = read_capture_bytes(path)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    return split_capture(data)


def run(path: Path, out: IO[bytes], *, verifier: CommitVerifier | None = None,
        collections: list[str] | None = None, all_frames: bool = False) -> Inspector:
    """Write the JSON lines of the capture at ``path`` to ``out`` and return the inspector (counts).

    Raises:
        ConfigError: the file cannot be read or is truncated.
    """
    inspector = Inspector(verifier=verifier, collections=collections, all_frames=all_frames)
    try:
        lines = asyncio.run(inspector.lines(_frames(path)))
    except CaptureError as e:
        raise ConfigError(f"{path}: {e}") from e
    for line in lines:
        out.write(orjson.dumps(line) + b"\n")
    out.flush()
    return inspector


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill inspect frames``."""
    verifier = None
    if ns.verify:
        if not ns.did_docs:
            raise ConfigError("--verify needs --did-docs (the DID documents of the commits' authors)")
        try:
            verifier = CommitVerifier(DictResolver.from_file(ns.did_docs))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"cannot read --did-docs {ns.did_docs}: {e}") from e
    path = Path(ns.file)
    if ns.output:
        with open(ns.output, "wb") as f:
            inspector = run(path, f, verifier=verifier, collections=ns.wanted_collections, all_frames=ns.all_frames)
    else:
        inspector = run(path, sys.stdout.buffer, verifier=verifier, collections=ns.wanted_collections,
                        all_frames=ns.all_frames)
    for index, reason, detail in inspector.failures:
        print(f"frame {index}: {reason}: {detail}", file=sys.stderr)
    if ns.summary:
        print(orjson.dumps(dict(sorted(inspector.counts.items()))).decode(), file=sys.stderr)
    return 1 if inspector.failures else 0


__all__ = ["Inspector", "add_arguments", "frame_line", "main", "run"]

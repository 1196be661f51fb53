"""``backfill inspect queue NAME``: print a durable queue's length and its first items, one JSON line each.

Reads the queue without taking anything out of it (:meth:`consumers.queue.Queue.peek`)::

    $ backfill inspect queue jetstream_sync --limit 2
    queue 'jetstream_sync' in /home/me/.local/share/atproto-backfill/queues.sqlite: 5,000 items; the first 2:
      {"did":"did:plc:...","time_us":...,"kind":"commit","commit":{...}}
      {"did":"did:plc:...","time_us":...,"kind":"commit","commit":{...}}
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Final

import orjson

from consumers.queue import QUEUE_PATH_OPTION, Queue, QueueNotFoundError, default_queue_path
from runtime.errors import ConfigError
from runtime.process.options import Opt, add_options, log_level_option

OPTIONS: Final[tuple[Opt, ...]] = (
    QUEUE_PATH_OPTION,
    Opt(("--limit", "-n"), "limit", None, 10, "items to print, oldest first (0 = only the length)", type=int),
    Opt(("--width",), "width", None, 0,
        "cut each item's line after this many characters, ending it with '...' (0 = whole items)", type=int),
    log_level_option("WARNING"),
)

#: One line for ``backfill --help``.
HELP: Final = "print a durable queue's length and first items as JSON lines"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``backfill inspect queue``."""
    parser.add_argument("queue_name", metavar="NAME", help="the queue to inspect")
    add_options(parser, OPTIONS)


def item_line(payload: object, width: int = 0) -> str:
    """One item as the command prints it: its JSON, indented, cut after ``width`` characters (0 = whole)."""
    text = orjson.dumps(payload).decode()
    if width and len(text) > width:
        text = text[:width] + "..."
    return "  " + text


def main(ns: argparse.Namespace) -> int:
    """Entry point of ``backfill inspect queue``.

    Raises:
        ConfigError: a negative ``--limit``/``--width``, no queue database at the path, or no such queue.
    """
    if ns.limit < 0 or ns.width < 0:
        raise ConfigError("--limit and --width must be >= 0")
    path = Path(ns.queue_path) if ns.queue_path else default_queue_path()
    if not path.is_file():
        raise ConfigError(f"no queue database at {path}")
    try:
        queue = Queue(ns.queue_name, path=path)
    except QueueNotFoundError as e:
        raise ConfigError(str(e)) from e
    try:
        length = queue.get_queue_length()
        items = queue.peek(ns.limit) if ns.limit else []
    finally:
        queue.close()
    head = f"queue {ns.queue_name!r} in {path}: {length:,} items"
    print(head + (f"; the first {len(items)}:" if items else ""))
    for item in items:
        print(item_line(item.payload, ns.width))
    return 0

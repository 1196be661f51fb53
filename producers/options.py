"""Options every producer command shares, declared once: its job (name, resume, transactions,
checkpoints), its stops (``--max-time``, ``--max-collections``) and its progress display.

Each producer splices :func:`producer_options` into its own option tuple, choosing its job's default
name and time limit, leaving out what it does not take, and rewording a help text where the option
means something narrower for it::

    REPOS_OPTIONS = (..., *producer_options("repos", leave_out=("checkpoint_events", "max_collections"),
                                            help={"resume": "continue a list job from its checkpoint"}))
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from producers.job import MAX_COLLECTIONS_OPTION
from runtime.errors import ConfigError
from runtime.kafka.settings import KAFKA_OPTIONS
from runtime.process.options import OBSERVABILITY_OPTIONS, Opt, add_options


def job_option(default: str, help: str = "job name (checkpoint key)") -> Opt:
    """``--job`` / ``BACKFILL_JOB``: the job's name, ``default`` unless given."""
    return Opt(("--job",), "job", "BACKFILL_JOB", default, help)


#: The shared options, in the order ``--help`` lists them (``--job`` and ``--max-time`` get their
#: defaults from :func:`producer_options`).
PRODUCER_OPTIONS: Final[tuple[Opt, ...]] = (
    job_option("backfill"),
    Opt(("--resume",), "resume", "BACKFILL_RESUME", False, "continue the job from its checkpoint",
        action="store_true"),
    Opt(("--max-time", "-t"), "max_time", "BACKFILL_MAX_TIME", 0.0,
        "maximum time to run in seconds (0 = no limit)", type=float),
    Opt(("--transactions",), "transactions", "BACKFILL_TRANSACTIONS", "auto",
        "commit data and checkpoints atomically with Kafka transactions", choices=("auto", "on", "off")),
    Opt(("--checkpoint-every",), "checkpoint_events", "BACKFILL_CHECKPOINT_EVENTS", 5000,
        "checkpoint after this many events", type=int),
    Opt(("--checkpoint-interval",), "checkpoint_interval", "BACKFILL_CHECKPOINT_INTERVAL", 2.0,
        "checkpoint at least this often (seconds)", type=float),
    Opt(("--progress",), "progress", "BACKFILL_PROGRESS", "auto", "progress display",
        choices=("auto", "rich", "log", "none")),
    MAX_COLLECTIONS_OPTION,
)


def producer_options(job: str, *, max_time: float = 0.0, leave_out: Collection[str] = (),
                     help: Mapping[str, str] | None = None) -> tuple[Opt, ...]:
    """The shared options of one producer command.

    Args:
        job: the default of ``--job``.
        max_time: the default of ``--max-time`` in seconds (0 = no limit).
        leave_out: dests of options the command does not take (``checkpoint_events``, ``max_collections``).
        help: dest -> the command's own help text of that option.

    Raises:
        ValueError: ``leave_out`` or ``help`` names no shared option.
    """
    known = {opt.dest for opt in PRODUCER_OPTIONS}
    texts = dict(help or {})
    unknown = (set(leave_out) | set(texts)) - known
    if unknown:
        raise ValueError(f"no shared producer option {', '.join(sorted(unknown))}")
    out: list[Opt] = []
    for shared in PRODUCER_OPTIONS:
        if shared.dest in leave_out:
            continue
        changes: dict[str, Any] = {}
        if shared.dest == "job":
            changes["default"] = job
        elif shared.dest == "max_time":
            changes["default"] = float(max_time)
        if shared.dest in texts:
            changes["help"] = texts[shared.dest]
        out.append(replace(shared, **changes) if changes else shared)
    return tuple(out)


def check_producer_options(ns: argparse.Namespace) -> None:
    """Refuse values of the shared options no job can run with (those the command takes).

    Raises:
        ConfigError: a negative time or count, or a collection cap below 1.
    """
    for dest, flag in (("max_time", "--max-time"), ("checkpoint_events", "--checkpoint-every"),
                       ("checkpoint_interval", "--checkpoint-interval")):
        if getattr(ns, dest, 0) < 0:
            raise ConfigError(f"{flag} must be >= 0")
    if getattr(ns, "max_collections", 1) < 1:
        raise ConfigError("--max-collections must be positive")


def add_producer_arguments(parser: argparse.ArgumentParser, options: Sequence[Opt]) -> None:
    """Add a producer command's ``options``, then the Kafka and observability groups every producer has."""
    add_options(parser, options)
    add_options(parser.add_argument_group("kafka"), KAFKA_OPTIONS)
    add_options(parser.add_argument_group("observability"), OBSERVABILITY_OPTIONS)


def api_namespace(add_arguments: Callable[[argparse.ArgumentParser], None],
                  finish: Callable[[argparse.Namespace], None], given: Mapping[str, Any],
                  overrides: Mapping[str, Any]) -> argparse.Namespace:
    """The options a producer's Python API (``run_backfill_sync``, ...) runs with.

    Every option of the command (``add_arguments``, then ``finish``) at its default, the environment
    included; then ``given`` (the API's named arguments); the progress display off; then
    ``overrides``, any option by its dest name (``progress`` too).

    Raises:
        ConfigError: an override names no option of the command.
    """
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    ns = parser.parse_args([])
    finish(ns)
    for key, value in given.items():
        setattr(ns, key, value)
    ns.progress = "none"
    for key, value in overrides.items():
        if not hasattr(ns, key):
            raise ConfigError(f"unknown option {key!r}")
        setattr(ns, key, value)
    return ns

"""The ``backfill`` command: one entry point, one subcommand per producer, consumer and tool.

Each subcommand lives in the module that owns it, which exposes ``add_arguments(parser)`` and
``main(namespace) -> exit code``; this module only dispatches. Exit codes: 0 done, 1 fatal
(our own state broke: a failed commit, a cursor going backwards), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Final

from runtime import __version__
from runtime.errors import BackfillError, ConfigError, FatalError, FencedError, HandleResolutionError
from runtime.process.logs import configure
from runtime.process.options import redacted_namespace

log = logging.getLogger(__name__)

#: (command words, module, help). A module missing from this installation is left out.
COMMANDS: Final[tuple[tuple[tuple[str, ...], str, str], ...]] = (
    (("jetstream",), "producers.jetstream.app", "replay Jetstream into the typed topics (seeds 000/001)"),
    (("firehose",), "producers.firehose.app", "replay the relay firehose (subscribeRepos) into the typed topics"),
    (("repos",), "producers.repos.app", "backfill whole repositories (getRepo) into the typed topics"),
    (("discover-dids",), "producers.repos.discover", "enqueue referenced authors not yet backfilled"),
    (("consume", "queue"), "consumers.queue", "consumer group into the durable queue"),
    (("consume", "postgres"), "consumers.postgres", "consumer group into PostgreSQL tables"),
    (("simulate", "jetstream"), "runtime.simulator.jetstream_cli", "serve a simulated Jetstream"),
    (("simulate", "relay"), "runtime.simulator.relay_cli", "serve a simulated relay firehose"),
    (("simulate", "plc"), "runtime.simulator.plc_cli", "serve a simulated PLC directory"),
    (("simulate", "pds"), "runtime.simulator.pds_cli", "serve a simulated PLC directory and PDS hosts"),
    (("inspect", "topic"), "runtime.commands.inspect_topic", "print a topic's messages decoded to JSON lines"),
    (("inspect", "frames"), "producers.firehose.inspect", "decode a firehose capture file to JSON lines"),
    (("inspect", "car"), "producers.repos.inspect", "list a repository CAR file's records"),
    (("status",), "runtime.commands.status", "show every job, its progress and the consumer groups' lag"),
    (("demo",), "runtime.commands.demo", "run the local demo: broker, simulator, producer, consumer, summary"),
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (modules that are not installed are skipped)."""
    parser = argparse.ArgumentParser(prog="backfill", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"atproto-backfill {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for words, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue
            raise
        if len(words) == 1:
            sub = subs.add_parser(words[0], help=help_text, description=help_text)
        else:
            group = groups.get(words[0])
            if group is None:
                top = subs.add_parser(words[0], help=f"{words[0]} commands")
                group = top.add_subparsers(dest=f"{words[0]}_command", metavar="KIND", required=True)
                groups[words[0]] = group
            sub = group.add_parser(words[1], help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``backfill`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = parser.parse_args(args)
    except ConfigError as e:
        parser.error(str(e))
    configure(getattr(ns, "log_level", "INFO"), getattr(ns, "log_format", "text"))
    command = " ".join(str(v) for k, v in sorted(vars(ns).items()) if k == "command" or k.endswith("_command"))
    log.info("backfill %s %s: settings %s", __version__, command, redacted_namespace(ns))
    try:
        code: int = ns._main(ns)
        return code
    except (ConfigError, HandleResolutionError) as e:
        print(f"backfill: error: {e}", file=sys.stderr)
        return 2
    except FencedError as e:
        log.critical("stopping: %s", e)  # fenced by a newer instance: the message says it all
        return 1
    except FatalError as e:
        log.critical("stopping: %s", e, exc_info=True)
        return 1
    except BackfillError as e:
        log.error("stopping: %s", e)  # noqa: TRY400 - an upstream failure, explained by its message
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

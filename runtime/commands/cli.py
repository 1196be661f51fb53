"""The ``backfill`` command: one entry point, one subcommand per producer, consumer and tool.

Each subcommand lives in the module that owns it, which exposes ``HELP``, ``add_arguments(parser)``
and ``main(namespace) -> exit code``, and is declared as an ``atproto_backfill.commands`` entry point
in ``pyproject.toml``; this module only dispatches. Exit codes: 0 done, 1 fatal
(our own state broke: a failed commit, a cursor going backwards), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
from collections.abc import Sequence

from runtime import __version__
from runtime.errors import BackfillError, ConfigError, FatalError, FencedError, HandleResolutionError
from runtime.process.logs import configure
from runtime.process.memory import set_up_service
from runtime.process.options import redacted_namespace
from runtime.process.plugins import COMMANDS, declared

log = logging.getLogger(__name__)

def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one subcommand per installed ``atproto_backfill.commands`` entry point."""
    parser = argparse.ArgumentParser(prog="backfill", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"atproto-backfill {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for ep in declared(COMMANDS):
        words = tuple(ep.name.split("."))
        module = ep.load()
        help_text: str = module.HELP
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


def main(argv: Sequence[str] | None = None, *, own_process: bool | None = None) -> int:
    """Run ``backfill`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    ``own_process``: the process is this command's own (started from its command line), so a
    service sets the process up for its loop (the cyclic GC); default: when ``argv`` is None. A
    caller running a command inside its own process (a test) passes ``argv`` and is left as it is.
    """
    if not faulthandler.is_enabled():
        # A crash in native code (librdkafka, zstd, SQLite, the C extensions) prints every thread's
        # Python stack to stderr before the process dies, instead of only an exit status of -11.
        faulthandler.enable(all_threads=True)
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = parser.parse_args(args)
    except ConfigError as e:
        parser.error(str(e))
    configure(getattr(ns, "log_level", "INFO"), getattr(ns, "log_format", "text"))
    command = " ".join(str(v) for k, v in sorted(vars(ns).items()) if k == "command" or k.endswith("_command"))
    # A service (a command with the observability options: producers, consumers) starts its log with
    # its settings; a tool a user reads in a terminal (status, inspect, demo) keeps them for DEBUG.
    level = logging.INFO if hasattr(ns, "metrics_port") else logging.DEBUG
    log.log(level, "backfill %s %s: settings %s", __version__, command, redacted_namespace(ns))
    own = argv is None if own_process is None else own_process
    # a service in its own process runs its loop with the cyclic GC tuned
    set_up_service(getattr(ns, "heap_trim_interval", 0.0), tune=own and hasattr(ns, "heap_trim_interval"))
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

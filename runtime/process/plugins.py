"""Where the runtime finds what the layers above it provide: the ``backfill`` commands and the
companions a producer may run alongside itself, declared as entry points in ``pyproject.toml``.

The runtime never imports ``producers`` or ``consumers``; an installation names them here.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any, Final

from runtime.errors import ConfigError

#: ``"word"`` or ``"word.kind"`` = a module with ``HELP``, ``add_arguments`` and ``main``.
COMMANDS: Final = "atproto_backfill.commands"
#: name = a factory of a companion (see :mod:`producers.companion`).
COMPANIONS: Final = "atproto_backfill.companions"


def declared(group: str) -> tuple[EntryPoint, ...]:
    """The entry points of ``group`` in this installation, by name."""
    return tuple(sorted(entry_points(group=group), key=lambda ep: ep.name))


def load(group: str, name: str) -> Any:
    """Load the entry point ``name`` of ``group``.

    Raises:
        ConfigError: no such entry point is installed.
    """
    for ep in declared(group):
        if ep.name == name:
            return ep.load()
    raise ConfigError(f"{name!r} is not installed (entry point group {group})")

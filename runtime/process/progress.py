"""Progress reporting: a rich live display on a terminal, a log line every few seconds otherwise,
and the statistics table printed at the end of a run."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

log = logging.getLogger(__name__)


class Progress:
    """Shows a run's progress.

    Args:
        mode: ``auto`` (rich on a TTY, log lines otherwise), ``rich``, ``log`` or ``none``.
        title: shown in the display.
        every: seconds between log lines in ``log`` mode.
    """

    def __init__(self, mode: str = "auto", title: str = "backfill", every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode == "auto":
            mode = "rich" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.title = title
        self.every = every
        self._clock = clock
        self._last_log = 0.0
        self._live: Live | None = None
        self._console = Console(stderr=True)

    def update(self, fields: Mapping[str, Any], per_collection: Mapping[str, int] | None = None) -> None:
        """Show the current figures."""
        if self.mode == "none":
            return
        if self.mode == "rich":
            table = Table(title=self.title, show_header=False, expand=False)
            for k, v in fields.items():
                table.add_row(k, _fmt(v))
            for k, v in sorted((per_collection or {}).items(), key=lambda kv: -kv[1])[:12]:
                table.add_row(f"  {k}", f"{v:,}")
            if self._live is None:
                self._live = Live(table, console=self._console, refresh_per_second=4, transient=True)
                self._live.start()
            else:
                self._live.update(table)
            return
        now = self._clock()
        if now - self._last_log >= self.every:
            self._last_log = now
            log.info("%s: %s", self.title, ", ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))

    def note(self, message: str) -> None:
        """A one-off message (a date change)."""
        if self.mode == "rich" and self._live is not None:
            self._live.console.print(message)
        elif self.mode != "none":
            log.info("%s", message)

    def close(self) -> None:
        """Remove the live display."""
        if self._live is not None:
            self._live.stop()
            self._live = None


def _fmt(v: Any) -> str:
    if isinstance(v, Mapping):
        return ", ".join(f"{a}={_fmt(b)}" for a, b in sorted(v.items())) or "-"
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, (list, tuple, set)):
        return ", ".join(str(x) for x in v)
    return str(v)


def print_statistics(stats: Mapping[str, Any], title: str = "Backfill statistics", file: Any = None) -> None:
    """Print the statistics table (stdout by default)."""
    console = Console(file=file or sys.stdout, width=100)
    table = Table(title=title)
    table.add_column("statistic")
    table.add_column("value", overflow="fold")
    for k, v in stats.items():
        table.add_row(k, _fmt(v))
    console.print(table)

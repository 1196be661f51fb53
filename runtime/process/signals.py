"""SIGINT and SIGTERM as a graceful stop, the same way in every process.

A signal only asks: the handler sets an event or calls a ``stop`` method, and the process finishes
its batch or checkpoint and exits on its own. Handlers are installed only for the duration of a
``with`` block and the previous ones come back after it. Only the main thread of a process takes
signals: anywhere else (a replica run from a test thread, a platform without loop signal support)
nothing is installed, and the block runs without them.

* :func:`handle_stop_signals`: in a running event loop, call ``callback(*args)`` on a signal.
* :func:`stop_signal_event`: in a running event loop, an :class:`asyncio.Event` a signal sets.
* :func:`set_on_stop_signals`: in synchronous code, a :class:`threading.Event` a signal sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Final

#: The signals that ask a process to stop.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def handle_stop_signals(callback: Callable[..., object], *args: Any) -> Iterator[tuple[signal.Signals, ...]]:
    """Call ``callback(*args)`` in the running event loop on SIGINT/SIGTERM while inside the block.

    Yields the signals it installed a handler for (none outside the main thread); removes them on exit.

    Raises:
        RuntimeError: no event loop is running.
    """
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in STOP_SIGNALS:
        # NotImplementedError: no loop signals on this platform; RuntimeError/ValueError: not the main thread.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, callback, *args)
            installed.append(sig)
    try:
        yield tuple(installed)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def stop_signal_event() -> Iterator[asyncio.Event]:
    """An event of the running loop that SIGINT/SIGTERM set while inside the block (serve until it is set).

    Raises:
        RuntimeError: no event loop is running.
    """
    stop = asyncio.Event()
    with handle_stop_signals(stop.set):
        yield stop


@contextlib.contextmanager
def set_on_stop_signals(stop: threading.Event) -> Iterator[bool]:
    """Set ``stop`` on SIGINT/SIGTERM while inside the block (synchronous code, e.g. a consumer loop).

    Yields whether the handlers were installed (only from the main thread); the previous handlers
    are restored on exit.
    """
    previous: dict[signal.Signals, Any] = {}

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield bool(previous)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

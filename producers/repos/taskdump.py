"""``kill -USR1 <pid>``: log where every asyncio task of a running process is waiting.

A process that stops making progress without failing (a wait that never ends) shows nothing in
thread dumps: its event loop idles. This logs each task's coroutine stack instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

log = logging.getLogger(__name__)


def log_tasks() -> None:
    """Log the stack of every task of the running loop (one WARNING per task)."""
    tasks = asyncio.all_tasks()
    log.warning("%d asyncio tasks", len(tasks))
    for task in tasks:
        log.warning("task %s (%s) waits at:\n%s", task.get_name(), task.get_coro(), "".join(await_chain(task)))


def await_chain(task: asyncio.Task[Any]) -> list[str]:
    """Where ``task`` waits: each coroutine it awaits through, innermost last, then what it awaits.

    ``Task.get_stack()`` shows only the outermost frame of a suspended task; the ``cr_await``
    links lead to the await that does not return.
    """
    out: list[str] = []
    obj: Any = task.get_coro()
    for _ in range(64):
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "ag_frame", None) or getattr(obj, "gi_frame", None)
        if frame is None:
            break
        out.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n")
        nxt = getattr(obj, "cr_await", None) or getattr(obj, "ag_await", None) or getattr(obj, "gi_yieldfrom", None)
        if nxt is None:
            break
        obj = nxt
    out.append(f"  awaiting {obj!r}\n")
    return out


def install(loop: asyncio.AbstractEventLoop) -> bool:
    """Log the tasks on SIGUSR1; False where signals cannot be taken (not the main thread)."""
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
        loop.add_signal_handler(signal.SIGUSR1, log_tasks)
        return True
    return False

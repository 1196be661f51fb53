"""``kill -USR1 <pid>``: log where every asyncio task of a running process is waiting.

A process that stops making progress without failing (a wait that never ends) shows nothing in
thread dumps: its event loop idles. This logs each task's coroutine stack instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import traceback

log = logging.getLogger(__name__)


def log_tasks() -> None:
    """Log the stack of every task of the running loop (one WARNING per task)."""
    tasks = asyncio.all_tasks()
    log.warning("%d asyncio tasks", len(tasks))
    for task in tasks:
        frames = task.get_stack(limit=20)
        stack = "".join(traceback.format_list(traceback.StackSummary.extract((f, f.f_lineno) for f in frames)))
        log.warning("task %s (%s):\n%s", task.get_name(), task.get_coro(), stack)


def install(loop: asyncio.AbstractEventLoop) -> bool:
    """Log the tasks on SIGUSR1; False where signals cannot be taken (not the main thread)."""
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError, AttributeError):
        loop.add_signal_handler(signal.SIGUSR1, log_tasks)
        return True
    return False

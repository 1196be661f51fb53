"""kill -USR1 logs where each asyncio task waits."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from producers.repos import taskdump


async def _waits_for_ever(event: asyncio.Event) -> None:
    await event.wait()


def test_sigusr1_logs_every_task_stack(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        event = asyncio.Event()
        task = asyncio.ensure_future(_waits_for_ever(event), loop=asyncio.get_running_loop())
        task.set_name("stuck-one")
        assert taskdump.install(asyncio.get_running_loop())
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.sleep(0.05)  # the handler runs on the loop
        event.set()
        await task
        asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)

    with caplog.at_level(logging.WARNING, logger="producers.repos.taskdump"):
        asyncio.run(main())
    text = caplog.text
    assert "asyncio tasks" in text
    assert "stuck-one" in text and "_waits_for_ever" in text
    assert "test_taskdump.py" in text  # the chain reaches the coroutine's own frame and line

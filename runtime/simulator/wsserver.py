"""What the two websocket simulators (Jetstream, relay firehose) share: listening, the pace of one
connection's sends, and the ticks of live generation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response


async def listen(handler: Callable[[ServerConnection], Awaitable[None]], host: str, port: int,
                 process_request: Callable[[ServerConnection, Request], Response | None],
                 **options: Any) -> tuple[Server, int]:
    """Serve ``handler`` on ``host:port`` (a free port when 0); return the server and its port.

    No per-message compression and no pings (a simulator answers as fast as it can, and the clients'
    own stall timeouts are under test); ``options`` go to :func:`websockets.asyncio.server.serve`.
    """
    server = await serve(handler, host, port, process_request=process_request, compression=None,
                         ping_interval=None, **options)
    return server, next(iter(server.sockets)).getsockname()[1]


async def close(server: Server | None, handlers: Collection[asyncio.Task[Any]] = ()) -> None:
    """Stop listening and close the open connections (waiting at most 5 s for them).

    ``handlers``: connection handlers to cancel (and wait for) once the server is closed, such as
    those waiting for live items, which would never return on their own.
    """
    if server is None:
        return
    server.close()
    tasks = list(handlers)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 5)


class Pacer:
    """Spaces one connection's sends at most ``rate`` per second (0 = as fast as possible)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._next = clock()

    async def wait(self) -> None:
        """Return when the next send is due."""
        if not self.interval:
            return
        now = self._clock()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self.interval


async def live_ticks(rate: float, tick: float = 0.05) -> AsyncIterator[int]:
    """Every ``tick`` seconds, how many live items are due at ``rate`` per second (ticks with none skipped)."""
    carry = 0.0
    while True:
        await asyncio.sleep(tick)
        carry += rate * tick
        due = int(carry)
        carry -= due
        if due:
            yield due

"""A TCP proxy for tests that makes a broker slow: every chunk it relays back to the client waits
``delay`` seconds first (no tests here).

Kafka clients learn the brokers' addresses from the metadata, so a proxy in front of a bootstrap
address alone is left after the first metadata response. Put it in front of a listener that
advertises the proxy's own address (``tests.kafka.cluster.KafkaCluster(external=...)``): every
request of the clients that bootstrap through it then goes through it.

The delay applies in order on each connection: a response is relayed ``delay`` seconds after the
one before it was, so pipelined requests wait in turn, as behind a slow broker or link. Requests
go through at once. ``delay`` and ``target`` may be changed while the proxy runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any


class DelayProxy:
    """Listens on 127.0.0.1 and relays every connection to ``target`` (``(host, port)``).

    Args:
        target: where connections go; may be set after :meth:`start` (a connection made before it is
            closed at once).
        delay: seconds each chunk of the target's responses waits before it is relayed.
    """

    def __init__(self, target: tuple[str, int] | None = None, *, delay: float = 0.0) -> None:
        self.target = target
        self.delay = delay
        #: Chunks relayed back to clients, and how many of them were delayed.
        self.responses = 0
        self.delayed = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``: what the broker advertises for the proxy."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> DelayProxy:
        """Start relaying on a background thread (the port is bound already)."""
        self._thread = threading.Thread(target=self._run, name=f"delay-proxy-{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def stop(self) -> None:
        """Close the listener and every relayed connection."""
        loop = self._loop
        if loop is not None and self._thread is not None:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)
        self._sock.close()

    def drop_connections(self) -> None:
        """Close every relayed connection (clients reconnect, through the proxy)."""
        loop = self._loop
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._close_all(), loop).result(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(asyncio.start_server(self._relay, sock=self._sock))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._close_all()

    async def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        target = self.target
        if target is None:
            client_w.close()
            return
        try:
            broker_r, broker_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        self._writers.update((client_w, broker_w))
        try:
            await asyncio.gather(self._pump(client_r, broker_w, delayed=False),
                                 self._pump(broker_r, client_w, delayed=True))
        finally:
            for w in (client_w, broker_w):
                self._writers.discard(w)
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool) -> None:
        try:
            while chunk := await reader.read(1 << 16):
                if delayed:
                    self.responses += 1
                    delay = self.delay
                    if delay > 0:
                        self.delayed += 1
                        await asyncio.sleep(delay)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

"""A small HTTP/1.1 server on asyncio streams, shared by the PLC directory and PDS simulators, and
the event-loop thread every simulator runs in beside synchronous code (:class:`LoopThread`,
:class:`ThreadServed`).

Keep-alive, ``Content-Length`` bodies (in memory or streamed from a file), and the faults a
simulator needs to misbehave like a real server: a delay before answering, a body cut short
after its headers promised more (the connection is then dropped), or a stall. Handlers are
``async def handler(Request) -> Response``; an exception in a handler answers 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, Final, Self
from urllib.parse import parse_qs, urlsplit

import orjson

from runtime.process.signals import stop_signal_event

log = logging.getLogger(__name__)

MAX_REQUEST_BODY: Final = 4 * 1024 * 1024
_CHUNK: Final = 1 << 20


@dataclass(slots=True)
class Request:
    """One parsed request."""

    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    peer: str

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default


@dataclass(slots=True)
class Response:
    """What to send back.

    Args:
        status: HTTP status code.
        body: the body (ignored when ``file`` is set).
        headers: extra headers.
        content_type: the ``Content-Type``.
        file: stream this file as the body (bounded memory for huge CARs).
        delay: seconds to wait before answering (a slow server).
        truncate_to: send only this many body bytes, then drop the connection (headers still
            announce the full length).
    """

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    file: Path | None = None
    delay: float = 0.0
    truncate_to: int | None = None

    @classmethod
    def json(cls, status: int, obj: Any, headers: dict[str, str] | None = None) -> Response:
        """A JSON response."""
        return cls(status, orjson.dumps(obj), dict(headers or {}))

    @classmethod
    def xrpc_error(cls, status: int, error: str, message: str, headers: dict[str, str] | None = None) -> Response:
        """An XRPC error body ``{"error": ..., "message": ...}``."""
        return cls.json(status, {"error": error, "message": message}, headers)


Handler = Callable[[Request], Awaitable[Response]]


def _parse_head(head: bytes, peer: str) -> tuple[Request, int]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    parts = urlsplit(target)
    length = int(headers.get("content-length", "0") or 0)
    req = Request(method=method.upper(), target=target, path=parts.path, query=parse_qs(parts.query),
                  headers=headers, body=b"", peer=peer)
    return req, length


class HttpServer:
    """Serves ``handler`` on ``host:port`` (a free port when 0) inside a running event loop."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0, name: str = "http") -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.name = name
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Start listening."""
        self._server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop open connections."""
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            for t in list(self._tasks):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_info = writer.get_extra_info("peername")
        peer = f"{peer_info[0]}:{peer_info[1]}" if peer_info else "?"
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                try:
                    req, length = _parse_head(head, peer)
                except ValueError:
                    await self._write(writer, Response(400, b"bad request\n", content_type="text/plain"), False)
                    return
                if length > MAX_REQUEST_BODY:
                    await self._write(writer, Response(413, b"too large\n", content_type="text/plain"), False)
                    return
                if length:
                    try:
                        req.body = await reader.readexactly(length)
                    except (asyncio.IncompleteReadError, ConnectionError):
                        return
                try:
                    resp = await self.handler(req)
                except Exception:
                    log.exception("%s: handler failed for %s %s", self.name, req.method, req.target)
                    resp = Response(500, b'{"error":"InternalServerError"}')
                keep = req.headers.get("connection", "").lower() != "close"
                if not await self._write(writer, resp, keep):
                    return
                if not keep:
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, resp: Response, keep: bool) -> bool:
        """Send ``resp``; False when the connection must be dropped afterwards."""
        if resp.delay:
            await asyncio.sleep(resp.delay)
        size = resp.file.stat().st_size if resp.file is not None else len(resp.body)
        phrase = HTTPStatus(resp.status).phrase if resp.status in HTTPStatus._value2member_map_ else "Status"
        lines = [f"HTTP/1.1 {resp.status} {phrase}", f"Content-Type: {resp.content_type}",
                 f"Content-Length: {size}", f"Connection: {'keep-alive' if keep else 'close'}"]
        lines += [f"{k}: {v}" for k, v in resp.headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        limit = size if resp.truncate_to is None else min(size, resp.truncate_to)
        if resp.file is not None:
            with resp.file.open("rb") as f:
                left = limit
                while left:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        break
                    writer.write(chunk)
                    left -= len(chunk)
                    await writer.drain()
        else:
            writer.write(resp.body[:limit])
        await writer.drain()
        if resp.truncate_to is not None and resp.truncate_to < size:
            # Headers promised more: drop the connection mid-body, as a crashed server would.
            transport = writer.transport
            transport.abort()
            return False
        return True


class LoopThread:
    """An event loop in a daemon thread, for running simulators beside synchronous code (tests)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> LoopThread:
        """Start the thread (idempotent)."""
        if not self._started:
            self._thread.start()
            self._started = True
        return self

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop and join the thread."""
        if self._started:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self._started = False
            if not self._thread.is_alive():
                self.loop.close()


class ThreadServed:
    """``async with`` and :meth:`start_in_thread` for a server with async ``start()`` and ``stop()``.

    A simulator inherits this and implements :meth:`start` and :meth:`stop`; inside an event loop it
    is used as ``async with sim:``, from synchronous code (tests, the demo) it is served from a
    :class:`LoopThread` of its own: ``sim.start_in_thread()`` ... ``sim.stop_thread()``.
    """

    #: The name of the serving thread.
    thread_name: ClassVar[str] = "simulator"
    #: Seconds :meth:`start` may take in :meth:`start_in_thread`.
    start_timeout: ClassVar[float] = 60.0
    _loop_thread: LoopThread | None = None
    _stop_lock: threading.Lock | None = None

    async def start(self) -> None:
        """Start serving (the subclass's)."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop serving (the subclass's)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_until_signal(self, banner: Callable[[], str]) -> None:
        """Serve in the running loop until SIGINT or SIGTERM (``backfill simulate ...``); once listening,
        print ``banner()`` (the URL to give the client)."""
        with stop_signal_event() as stop:
            async with self:
                print(banner(), flush=True)
                await stop.wait()

    def start_in_thread(self) -> Self:
        """Serve from a daemon thread's event loop; returns once :meth:`start` returned.

        Raises:
            RuntimeError: it did not start within :attr:`start_timeout` seconds.
        """
        thread = LoopThread(self.thread_name).start()
        try:
            thread.run(self.start(), timeout=self.start_timeout)
        except TimeoutError as e:
            thread.stop()
            raise RuntimeError(f"{self.thread_name} did not start within {self.start_timeout:g} s") from e
        except BaseException:
            thread.stop()
            raise
        self._stop_lock = threading.Lock()
        self._loop_thread = thread
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (or await the coroutine it returns) on the serving thread's loop; return its result.

        Raises:
            RuntimeError: not started with :meth:`start_in_thread`.
        """
        thread = self._loop_thread
        if thread is None:
            raise RuntimeError(f"{self.thread_name} is not served from a thread")

        async def wrapper() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return thread.run(wrapper(), timeout=30)

    def stop_thread(self) -> None:
        """Stop serving from the thread (from any thread; a second call waits for the first, then does nothing)."""
        lock = self._stop_lock
        if lock is None:
            return
        with lock:
            thread = self._loop_thread
            if thread is None:
                return
            try:
                thread.run(self.stop())
            finally:
                thread.stop()
                self._loop_thread = None

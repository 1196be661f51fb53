"""A Jetstream simulator speaking the real ``/subscribe`` websocket protocol on loopback.

It serves a JSON-lines file of Jetstream events or generated synthetic ones, with the server's
semantics: ``wantedCollections`` (prefix wildcards), ``wantedDids``, ``cursor`` (replay of events
with ``time_us >= cursor``; no cursor = live tail only), ``compress`` (zstd with a dictionary),
``maxMessageSizeBytes``, ``requireHello`` and ``options_update``; identity and account events
ignore the collection filter. After the stored events it can keep generating live ones.

Faults on demand: disconnect after N messages, stall for S seconds, garbage frames, oversize
frames. ``clock_offset_us`` makes another instance of the same stream: each instance stamps
``time_us`` with its own receive clock, so a second simulator serving the same events with an
offset is an instance behind (negative) or ahead (positive) of the first, for failover tests.
``backfill simulate jetstream`` runs it; the demo and the tests use it in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import zstandard
from websockets.asyncio.server import Server, ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from runtime.simulator.httpd import ThreadServed
from runtime.simulator.synthetic import Generator
from runtime.simulator.wsserver import Pacer, close, listen, live_ticks

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StoredEvent:
    """One event as served: its time, routing fields and pre-serialised text."""

    time_us: int
    did: str
    collection: str | None
    text: str


@dataclass
class Faults:
    """Injected misbehaviour (per connection unless noted).

    Args:
        disconnect_after: drop the TCP connection abruptly after this many messages (0 = never).
        disconnect_times: how many connections get disconnected (0 = every one).
        stall_after: stop sending for ``stall_seconds`` after this many messages (0 = never).
        garbage_every: send a malformed frame every N messages (0 = never).
        oversize_every: send a frame of ``oversize_bytes`` every N messages (0 = never).
    """

    disconnect_after: int = 0
    disconnect_times: int = 1
    stall_after: int = 0
    stall_seconds: float = 0.0
    garbage_every: int = 0
    oversize_every: int = 0
    oversize_bytes: int = 2 * 1024 * 1024


def shift_clock(events: Iterable[StoredEvent], offset_us: int) -> list[StoredEvent]:
    """The events as an instance whose receive clock is ``offset_us`` ahead (negative: behind) serves them."""
    out: list[StoredEvent] = []
    for e in events:
        obj = orjson.loads(e.text)
        obj["time_us"] = e.time_us + offset_us
        out.append(StoredEvent(e.time_us + offset_us, e.did, e.collection, orjson.dumps(obj).decode()))
    return out


def load_events(lines: Iterable[str | bytes]) -> list[StoredEvent]:
    """Parse Jetstream JSON lines into stored events (blank lines ignored)."""
    out: list[StoredEvent] = []
    for line in lines:
        if not line.strip():
            continue
        obj = orjson.loads(line)
        coll = obj.get("commit", {}).get("collection") if obj.get("kind") == "commit" else None
        out.append(StoredEvent(int(obj["time_us"]), obj["did"], coll, orjson.dumps(obj).decode()))
    return out


def synthetic_events(n: int, *, seed: int = 1, accounts: int = 200, start_us: int | None = None,
                     rate: float = 1000.0, real_cids: bool = True) -> list[StoredEvent]:
    """``n`` generated events starting at ``start_us`` (default: n/rate seconds before now)."""
    if start_us is None:
        start_us = int(time.time() * 1e6) - int(n / rate * 1e6)
    gen = Generator(seed=seed, accounts=accounts, start_us=start_us, rate=rate, real_cids=real_cids)
    return load_events(orjson.dumps(e) for e in gen.events(n))


def train_dictionary(events: list[StoredEvent], size: int = 110 * 1024) -> bytes:
    """A zstd dictionary trained on the events (the simulator's stand-in for Jetstream's own)."""
    samples: list[bytes | bytearray | memoryview] = [e.text.encode() for e in events[:20000]]
    return bytes(zstandard.train_dictionary(size, samples).as_bytes())


@dataclass
class _Conn:
    collections: list[str] = field(default_factory=list)
    dids: frozenset[str] = frozenset()
    max_size: int = 0
    hello: asyncio.Event = field(default_factory=asyncio.Event)


def _matches(ev: StoredEvent, conn: _Conn) -> bool:
    if conn.dids and ev.did not in conn.dids:
        return False
    if ev.collection is None or not conn.collections:
        return True
    c = ev.collection
    for pat in conn.collections:
        if pat.endswith("*"):
            if c.startswith(pat[:-1]):
                return True
        elif c == pat:
            return True
    return False


class JetstreamSimulator(ThreadServed):
    """The simulator. Use as ``async with`` or :meth:`start_in_thread`.

    Args:
        events: stored events in arrival order.
        dictionary: zstd dictionary for ``compress=true`` (trained from the events if None).
        live_rate: after the stored events, generate this many live events per second (0 = none).
        faults: injected faults.
        rate_limit: cap on messages per second per connection (0 = as fast as possible).
        clock_offset_us: this instance's receive clock minus the true time: every ``time_us`` it
            serves (stored and live) and every cursor it is asked for are on that clock.
    """

    thread_name = "jetstream-sim"
    start_timeout = 30.0

    def __init__(self, events: list[StoredEvent], *, dictionary: bytes | None = None, live_rate: float = 0.0,
                 faults: Faults | None = None, rate_limit: float = 0.0, host: str = "127.0.0.1",
                 port: int = 0, seed: int = 7, clock: Callable[[], float] = time.time,
                 clock_offset_us: int = 0) -> None:
        self.clock_offset_us = clock_offset_us
        self.events = shift_clock(events, clock_offset_us) if clock_offset_us else events
        self._dictionary = dictionary
        self.live_rate = live_rate
        self.faults = faults or Faults()
        self.rate_limit = rate_limit
        self.host = host
        self.port = port
        self._seed = seed
        self._clock = clock
        self._server: Server | None = None
        self._cctx: zstandard.ZstdCompressor | None = None
        self._running_max: list[int] = []
        self._live: list[StoredEvent] = []
        self._live_cond: asyncio.Condition | None = None
        self._live_task: asyncio.Task[None] | None = None
        self.connections = 0
        self.disconnects_done = 0
        self.messages_sent = 0
        #: Sending pauses once ``messages_sent`` reaches this (None = never): a test holds the
        #: stream at a known point, does what must happen mid-run, then sets it back to None.
        self.hold_after: int | None = None
        self.requests: list[dict[str, list[str]]] = []
        self.options_updates: list[dict[str, Any]] = []
        self._prepare()

    def _prepare(self) -> None:
        m = -(2**63)
        rm = []
        for e in self.events:
            m = max(m, e.time_us)
            rm.append(m)
        self._running_max = rm
        # The zstd form of each stored event, made at its first compressed send: like the real
        # Jetstream, which compresses an event once and serves those bytes to every subscriber.
        self._zcache: list[bytes | None] = [None] * len(self.events)

    @property
    def dictionary(self) -> bytes:
        """The zstd dictionary used for ``compress=true``."""
        if self._dictionary is None:
            self._dictionary = train_dictionary(self.events) if self.events else b""
        return self._dictionary

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT/subscribe``."""
        return f"ws://{self.host}:{self.port}/subscribe"

    def _compressor(self) -> zstandard.ZstdCompressor:
        if self._cctx is None:
            self._cctx = zstandard.ZstdCompressor(level=3, dict_data=zstandard.ZstdCompressionDict(self.dictionary))
        return self._cctx

    # ------------------------------------------------------------------ server

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path != "/subscribe":
            return connection.respond(404, "not found\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)
        self.requests.append(query)
        self.connections += 1
        conn = _Conn(collections=query.get("wantedCollections", []),
                     dids=frozenset(query.get("wantedDids", [])),
                     max_size=int(query.get("maxMessageSizeBytes", ["0"])[0] or 0))
        compress = query.get("compress", ["false"])[0] == "true"
        cursor_raw = query.get("cursor", [None])[0]
        require_hello = query.get("requireHello", ["false"])[0] == "true"
        reader = asyncio.ensure_future(self._read_client(ws, conn))
        if not require_hello:
            conn.hello.set()
        try:
            await conn.hello.wait()
            await self._stream(ws, conn, compress, int(cursor_raw) if cursor_raw else None)
        except ConnectionClosed:
            pass
        finally:
            reader.cancel()

    async def _read_client(self, ws: ServerConnection, conn: _Conn) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for msg in ws:
                try:
                    obj = orjson.loads(msg)
                except orjson.JSONDecodeError:
                    continue
                if obj.get("type") == "options_update":
                    payload = obj.get("payload") or {}
                    self.options_updates.append(payload)
                    if "wantedCollections" in payload:
                        conn.collections = list(payload["wantedCollections"] or [])
                    if "wantedDids" in payload:
                        conn.dids = frozenset(payload["wantedDids"] or [])
                    if "maxMessageSizeBytes" in payload:
                        conn.max_size = int(payload["maxMessageSizeBytes"] or 0)
                    conn.hello.set()

    def _start_index(self, cursor: int | None) -> int:
        if cursor is None:
            return len(self.events)
        import bisect  # noqa: PLC0415

        return bisect.bisect_left(self._running_max, cursor)

    async def _stream(self, ws: ServerConnection, conn: _Conn, compress: bool, cursor: int | None) -> None:
        f = self.faults
        cctx = self._compressor() if compress else None
        disconnect_this = f.disconnect_after and (f.disconnect_times == 0 or self.disconnects_done < f.disconnect_times)
        sent = 0
        stalled = False
        pacer = Pacer(self.rate_limit)

        zcache = self._zcache

        async def send(ev: StoredEvent, index: int = -1) -> None:
            nonlocal sent, stalled
            if disconnect_this and sent >= f.disconnect_after:
                self.disconnects_done += 1
                ws.transport.abort()  # abrupt: no close frame
                raise ConnectionClosed(None, None)
            if f.stall_after and not stalled and sent >= f.stall_after:
                stalled = True
                await asyncio.sleep(f.stall_seconds)
            if f.garbage_every and sent and sent % f.garbage_every == 0:
                await ws.send(b"\x00garbage{" if cctx else "{not json")
            if f.oversize_every and sent and sent % f.oversize_every == 0:
                await ws.send("x" * f.oversize_bytes)
            while self.hold_after is not None and self.messages_sent >= self.hold_after:
                await asyncio.sleep(0.01)
            await pacer.wait()
            data: str | bytes
            if cctx is None:
                data = ev.text
            elif index >= 0:  # a stored event: compressed once, served to every subscriber
                data = zcache[index] or cctx.compress(ev.text.encode())
                zcache[index] = data
            else:
                data = cctx.compress(ev.text.encode())
            await ws.send(data)
            sent += 1
            self.messages_sent += 1

        events = self.events
        i = self._start_index(cursor)
        n = len(events)
        while i < n:
            ev = events[i]
            i += 1
            if cursor is not None and ev.time_us < cursor:
                continue
            if not _matches(ev, conn):
                continue
            if conn.max_size and len(ev.text) > conn.max_size:
                continue
            await send(ev, i - 1)
            if sent & 255 == 0:
                await asyncio.sleep(0)  # let other connections and the client reader run
        # live tail
        if self._live_cond is None:
            await ws.wait_closed()
            return
        j = 0 if cursor is not None else len(self._live)
        while True:
            async with self._live_cond:
                while j >= len(self._live):
                    await self._live_cond.wait()
                batch = self._live[j:]
                j = len(self._live)
            for ev in batch:
                if _matches(ev, conn) and not (conn.max_size and len(ev.text) > conn.max_size):
                    await send(ev)

    async def _generate_live(self) -> None:
        assert self._live_cond is not None
        offset = self.clock_offset_us
        start = int(self._clock() * 1e6) + offset
        if self.events:
            start = max(start, self._running_max[-1] + 1)
        gen = Generator(seed=self._seed, start_us=start, rate=self.live_rate, real_cids=False)
        async for k in live_ticks(self.live_rate):
            new = []
            for _ in range(k):
                ev = gen.event()
                ev["time_us"] = max(int(self._clock() * 1e6) + offset, ev["time_us"])
                new.extend(load_events([orjson.dumps(ev)]))
            async with self._live_cond:
                self._live.extend(new)
                self._live_cond.notify_all()

    async def start(self) -> None:
        """Start listening (on a free port when ``port`` is 0)."""
        if self.live_rate:
            self._live_cond = asyncio.Condition()
            self._live_task = asyncio.ensure_future(self._generate_live())
        self._server, self.port = await listen(self._handler, self.host, self.port, self._process_request,
                                               max_size=1 << 20)
        log.info("Jetstream simulator on %s (%d stored events)", self.url, len(self.events))

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._live_task is not None:
            self._live_task.cancel()
        await close(self._server)


def read_events_file(path: Path) -> list[StoredEvent]:
    """Load a Jetstream JSON-lines file (optionally zstd-compressed, ``.zst``)."""
    data = path.read_bytes()
    if path.suffix == ".zst":
        data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return load_events(data.splitlines())

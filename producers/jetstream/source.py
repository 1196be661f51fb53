"""The Jetstream source: ``/subscribe`` over a websocket, filtered, resumable, reconnecting.

Server-side filters are used where the server accepts them (at most 100 collection patterns and
10,000 DIDs, sent in an ``options_update`` after connecting when the URL would be too long); the
client always applies the same filters itself, so a larger filter is enforced locally, never
silently narrowed. Reconnects back off with jitter and start where the position says
(:meth:`~producers.jetstream.position.JetstreamPosition.connected`): on the same instance, the
newest ``time_us`` received from it minus the allowed lateness; on another instance (a failover),
minus the wider ``failover_rewind``, since each instance's ``time_us`` is its own receive clock. The
position drops what the overlap repeats by the events' clock-independent identities, and counts the
events arriving more than the lateness late (delivered unless seen).

The end watermark is an event-time watermark: Jetstream's ``time_us`` is not monotonic (about a
quarter of adjacent events go backwards, by up to ~32 ms), so events at or past the end are
skipped, and the stream ends only once an event arrives at or past ``end + lateness``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake, InvalidURI, PayloadTooBig

from producers.jetstream import decode as _decode
from producers.jetstream.decode import Decompressor, decode_message
from producers.jetstream.position import DUPLICATE, FAILOVER_REWIND_US, LATE, JetstreamPosition
from producers.source import Drop, End, Skip, SourceItem, WebsocketHolder
from runtime.contract.nsid import CollectionFilter
from runtime.contract.records import RecordEvent
from runtime.errors import ConfigError, DropError

log = logging.getLogger(__name__)

#: Public Jetstream instances, tried in this order.
PUBLIC_INSTANCES: Final = (
    "jetstream1.us-east.bsky.network",
    "jetstream2.us-east.bsky.network",
    "jetstream1.us-west.bsky.network",
    "jetstream2.us-west.bsky.network",
)
_SHORT_NAME: Final = re.compile(r"jetstream\d+\.us-(?:east|west)")
MAX_SERVER_COLLECTIONS: Final = 100
MAX_SERVER_DIDS: Final = 10_000
#: Above this many DIDs the filter goes in an options_update instead of the URL.
MAX_URL_DIDS: Final = 50


def instance_url(instance: str) -> str:
    """A websocket URL for an instance name (``jetstream1.us-east``), host, or ws(s):// or http(s):// URL.

    Raises:
        ConfigError: not a usable instance.
    """
    inst = instance.strip()
    if not inst:
        raise ConfigError("empty Jetstream instance")
    if inst.startswith(("http://", "https://")):
        inst = "ws" + inst[4:]  # a v2 instance is often named by its HTTP root
    if inst.startswith(("ws://", "wss://")):
        parts = urlsplit(inst)
        path = parts.path if parts.path not in ("", "/") else "/subscribe"
        return urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    if "://" in inst:
        raise ConfigError(f"Jetstream instance must be a name or a ws(s):// or http(s):// URL, not {instance!r}")
    host = f"{inst}.bsky.network" if _SHORT_NAME.fullmatch(inst) else inst
    return f"wss://{host}/subscribe"


@dataclass
class JetstreamOptions:
    """Everything the source needs besides its position.

    Args:
        instances: websocket URLs, tried in turn (the next on failure).
        collections: NSID patterns (wildcards allowed); empty = all.
        dids: DIDs; empty = all.
        start_us: first cursor (None = live).
        end_us: the end watermark (None = none).
        lateness_us: allowed lateness of the watermark and of a reconnect to the same instance.
        failover_rewind_us: how far a connection to another instance rewinds (its clock differs).
        compress: ask for zstd-compressed messages (needs ``zstd_dictionary``).
        max_message_size: ``maxMessageSizeBytes`` for the server (0 = no limit) and the client's cap.
        stall_timeout: reconnect when no message arrived for this long.
        end_idle: with an end watermark that the wall clock has passed by the lateness, end the
            stream after this many seconds without a message (a sparse filter may never deliver an
            event past the end; a caught-up stream has nothing older left to send).
        max_reconnects: give up after this many consecutive failed connects (0 = never).
    """

    instances: list[str]
    collections: list[str] = field(default_factory=list)
    dids: list[str] = field(default_factory=list)
    start_us: int | None = None
    end_us: int | None = None
    lateness_us: int = 1_000_000
    failover_rewind_us: int = FAILOVER_REWIND_US
    compress: bool = False
    zstd_dictionary: bytes | None = None
    max_message_size: int = 0
    stall_timeout: float = 30.0
    max_reconnects: int = 0
    job: str = ""
    end_idle: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


def build_query(opts: JetstreamOptions, cursor: int | None, *, hello: bool) -> str:
    """The ``/subscribe`` query string for these options (filters in the URL unless ``hello``)."""
    params: list[tuple[str, str]] = []
    if not hello:
        for c in server_collections(opts):
            params.append(("wantedCollections", c))
        for d in server_dids(opts):
            params.append(("wantedDids", d))
    else:
        params.append(("requireHello", "true"))
    if cursor is not None:
        params.append(("cursor", str(cursor)))
    if opts.compress:
        params.append(("compress", "true"))
    if opts.max_message_size:
        params.append(("maxMessageSizeBytes", str(opts.max_message_size)))
    return urlencode(params)


def server_collections(opts: JetstreamOptions) -> list[str]:
    """Collection patterns the server can take (all of them, or none if too many)."""
    pats = [p for p in opts.collections if p != "*"]
    if "*" in opts.collections or len(pats) > MAX_SERVER_COLLECTIONS:
        return []
    return pats


def server_dids(opts: JetstreamOptions) -> list[str]:
    """DIDs the server can take (all of them, or none if too many)."""
    return list(opts.dids) if len(opts.dids) <= MAX_SERVER_DIDS else []


def options_update(opts: JetstreamOptions) -> bytes:
    """The ``options_update`` message carrying the server-side filters."""
    payload: dict[str, Any] = {
        "wantedCollections": server_collections(opts),
        "wantedDids": server_dids(opts),
    }
    if opts.max_message_size:
        payload["maxMessageSizeBytes"] = opts.max_message_size
    return orjson.dumps({"type": "options_update", "payload": payload})


Connector = Callable[..., Any]


class JetstreamSource(WebsocketHolder):
    """Async source of Jetstream events.

    Args:
        opts: the options.
        position: resume state (see :class:`~producers.jetstream.position.JetstreamPosition`); a
            resume starts on the instance it was checkpointed on when that one is in the list.
        rng: jitter source (inject a seeded one in tests).
        sleep: the backoff sleep (inject a no-wait one in tests).
        connector: ``websockets.asyncio.client.connect`` or a stand-in.
    """

    name = "jetstream"

    def __init__(self, opts: JetstreamOptions, position: JetstreamPosition | None = None, *,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 connector: Connector = connect,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        if not opts.instances:
            raise ConfigError("no Jetstream instance to connect to")
        if opts.compress and not opts.zstd_dictionary:
            raise ConfigError("--compress needs Jetstream's zstd dictionary")
        self.opts = opts
        self._position = position or JetstreamPosition(opts.lateness_us, opts.failover_rewind_us)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._sleep = sleep
        self._connector = connector
        self._clock = clock
        self._wall = wall
        self._idle_end = False
        self._collections = CollectionFilter(opts.collections)
        self._dids = frozenset(opts.dids)
        self._decompressor = Decompressor(opts.zstd_dictionary) if opts.compress and opts.zstd_dictionary else None
        self._ws: ClientConnection | None = None
        self._instance = 0
        if self._position.instance in opts.instances:
            self._instance = opts.instances.index(self._position.instance)
        self.connects = 0
        self.reconnects = 0
        self.messages = 0
        self._oversize_at: tuple[int | None, int] = (None, 0)
        self.on_reconnect: Callable[[], None] | None = None
        #: Called for each late event delivered (more than the lateness behind, not seen before).
        self.on_late: Callable[[], None] | None = None
        self._last_message = 0.0

    @property
    def position(self) -> JetstreamPosition:
        """What was yielded so far."""
        return self._position

    @property
    def url(self) -> str:
        """The instance currently in use."""
        return self.opts.instances[self._instance % len(self.opts.instances)]

    async def update_filters(self, collections: list[str] | None = None, dids: list[str] | None = None) -> None:
        """Change the filters of the running stream (sends Jetstream's ``options_update``)."""
        if collections is not None:
            self.opts.collections = list(collections)
            self._collections = CollectionFilter(collections)
        if dids is not None:
            self.opts.dids = list(dids)
            self._dids = frozenset(dids)
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(options_update(self.opts).decode())

    def _cursor(self) -> int | None:
        """The cursor for a connection to the current instance (see JetstreamPosition.connected)."""
        resume = self._position.connected(self.url)
        return resume if resume is not None else self.opts.start_us

    def _backoff(self, attempt: int) -> float:
        base = min(self.opts.backoff_max, self.opts.backoff_initial * (2 ** min(attempt, 16)))
        return float(base * (0.5 + self._rng.random()))

    async def items(self) -> AsyncIterator[SourceItem]:
        """Events, drops and skips, until the end watermark (then an End) or forever."""
        failures = 0
        while True:
            cursor = self._cursor()
            if self._oversize_at[1] >= 3 and self._oversize_at[0] == cursor and cursor is not None:
                # The same oversize message keeps killing the connection: step past it.
                log.warning("skipping past an oversize message at cursor %d", cursor)
                cursor += 1
            hello = len(server_dids(self.opts)) > MAX_URL_DIDS
            url = f"{self.url}?{build_query(self.opts, cursor, hello=hello)}"
            limit = (self.opts.max_message_size + 65536) if self.opts.max_message_size else 16 * 2**20
            try:
                async with self._connector(url, max_size=limit, open_timeout=15, ping_interval=20,
                                           ping_timeout=20, close_timeout=0.5, compression=None,
                                           user_agent_header="atproto-backfill") as ws:
                    self._ws = ws
                    self.connects += 1
                    if self.connects > 1:
                        self.reconnects += 1
                        if self.on_reconnect is not None:
                            self.on_reconnect()
                    failures = 0
                    if hello:
                        await ws.send(options_update(self.opts).decode())
                    log.info("connected to %s (cursor %s)", self.url, cursor)
                    # The read loop is inline (not a nested generator): it runs once per event.
                    position = self._position
                    # A resume or reconnect rewinds (by the lateness, or --failover-rewind on
                    # another instance), possibly to before the start: those events were skipped,
                    # never delivered, so the duplicate check would let them through. On the
                    # instance the position's clock is on, the start is exact; on another, events
                    # within the allowed clock drift below it may be after it on the first clock.
                    start = self.opts.start_us
                    if start is not None and position.instance not in (None, self.url):
                        start -= self.opts.failover_rewind_us - self.opts.lateness_us
                    end = self.opts.end_us
                    hard_end = end + self.opts.lateness_us if end is not None else None
                    decompressor = self._decompressor
                    job = self.opts.job
                    origin = self.url
                    clock = self._clock
                    self._last_message = clock()
                    watchdog = asyncio.ensure_future(self._watchdog(ws)) if self.opts.stall_timeout or end else None
                    # Without compression, text frames arrive as bytes (orjson checks their UTF-8 itself,
                    # and invalid UTF-8 is then a dead letter, not a broken connection); with it, text and
                    # binary frames stay apart (only binary frames are compressed).
                    decode = None if decompressor is not None else False
                    fast = _decode.FAST if decompressor is None else None
                    recv = ws.recv
                    try:
                        while True:
                            try:
                                raw = await recv(decode)
                            except ConnectionClosedOK:
                                break  # what ``async for`` over the connection does
                            self._last_message = clock()
                            self.messages += 1
                            # decode_message's native first step, called here (once per event)
                            event = fast(raw, job) if fast is not None else None
                            try:
                                if event is None:
                                    event = decode_message(raw, job=job, decompressor=decompressor)
                            except DropError as e:
                                yield Drop(e.reason, e.detail, raw if isinstance(raw, bytes) else raw.encode(), origin)
                                continue
                            # The filters are read per event so update_filters() applies at once.
                            dids = self._dids
                            if dids and event.did not in dids:
                                yield Skip("did_filter")
                                continue
                            coll_filter = self._collections
                            if isinstance(event, RecordEvent) and not coll_filter.matches_all \
                                    and not coll_filter(event.collection):
                                yield Skip("collection_filter")
                                continue
                            verdict = position.check(event)
                            if verdict:
                                if verdict == DUPLICATE:
                                    yield Skip("duplicate")
                                    continue
                                if verdict == LATE and self.on_late is not None:
                                    self.on_late()
                            t = event.time_us
                            if start is not None and t < start:
                                yield Skip("before_start")
                                continue
                            if end is not None and t >= end:
                                assert hard_end is not None
                                if t >= hard_end:
                                    yield End("end_cursor_reached")
                                    return
                                yield Skip("after_end")
                                continue
                            yield event
                    finally:
                        if watchdog is not None:
                            watchdog.cancel()
                    if self._idle_end:
                        log.info("no event for %.0f s and the wall clock is past the end watermark: done",
                                 self.opts.end_idle)
                        yield End("end_cursor_reached")
                        return
                    log.info("Jetstream %s closed the stream; reconnecting", self.url)
            except PayloadTooBig as e:
                yield self._oversize(str(e), cursor)
            except ConnectionClosed as e:
                if (e.rcvd is not None and e.rcvd.code == 1009) or (e.sent is not None and e.sent.code == 1009):
                    yield self._oversize(str(e), cursor)
                else:
                    log.warning("Jetstream %s connection closed: %s; reconnecting", self.url, e)
            except (OSError, InvalidHandshake, TimeoutError, InvalidURI) as e:
                failures += 1
                log.warning("cannot connect to %s (%s); attempt %d", self.url, e, failures)
                if self.opts.max_reconnects and failures >= self.opts.max_reconnects:
                    raise
                if len(self.opts.instances) > 1:
                    self._instance += 1
            finally:
                self._ws = None
            await self._sleep(self._backoff(failures))

    def _oversize(self, detail: str, cursor: int | None) -> Drop:
        prev_cursor, n = self._oversize_at
        self._oversize_at = (cursor, n + 1 if prev_cursor == cursor else 1)
        return Drop("oversize", f"message over the size limit: {detail}", b"", self.url,
                    cursor=self._position.cursor)

    async def _watchdog(self, ws: ClientConnection) -> None:
        stall = self.opts.stall_timeout or float("inf")
        end = self.opts.end_us
        hard_end = None if end is None else end + self.opts.lateness_us
        idle_limit = self.opts.end_idle
        tick = max(0.05, min(stall / 4, idle_limit / 4 if hard_end is not None else stall))
        while True:
            await asyncio.sleep(tick)
            idle = self._clock() - self._last_message
            if hard_end is not None and idle >= idle_limit and self._wall() * 1e6 >= hard_end:
                self._idle_end = True
                await ws.close()
                return
            if idle >= stall:
                log.warning("no message from %s for %.0f s; reconnecting", self.url, stall)
                await ws.close()
                return


__all__ = ["PUBLIC_INSTANCES", "JetstreamOptions", "JetstreamSource", "instance_url", "websockets"]

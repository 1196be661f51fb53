"""The relay firehose source: ``subscribeRepos`` over a websocket, resumable, gap-aware, verified.

Three layers, so the multi-process mode (:mod:`producers.firehose.workers`) can reuse the first two:

* :class:`RelayStream` owns the connection: it connects (retries declared with tenacity), asks for
  ``cursor`` = the last fully handled seq, parses each frame's header and body, and handles what is
  about the stream itself: ``#info OutdatedCursor`` (the relay no longer holds our cursor and
  restarts from its oldest frame: counted, the lost range logged), error frames (``FutureCursor``
  stops the job loudly, ``ConsumerTooSlow`` reconnects), sequence gaps and regressions (counted,
  the first one per connection logged), oversize frames (dead-lettered without payload and stepped
  over), stalls and disconnects (reconnect from the last fully handled seq).
* :class:`FrameHandler` turns one parsed frame into source items: events, or ``Skip`` (DID and
  collection filters, before the start time, after the end watermark, duplicates of a replay,
  ``tooBig`` ops, ``#sync`` and unknown types), or ``Drop`` (undecodable, failed verification), or
  ``End`` once a frame's time passes the end watermark by the allowed lateness.
* :class:`FirehoseSource` is the :class:`~producers.source.Source` the job runner drives.

Position and resume: the cursor is the relay ``seq``. :class:`FirehosePosition` is a
:class:`~producers.source.StreamPosition` with rewind 0 that also knows whether the frame at its
cursor was delivered completely; a frame stops half way only when the job stops there (``-n``), so
a resume asks for ``cursor = last complete seq`` (the seq before a partial frame) and drops the
events of the partial frame that were delivered, by their fingerprints. Frames that yield no event
(filtered, skipped, dead-lettered) move the position too, once their items were handed over.

Time and sequence: the relay cursor is not a time. A frame's ``time`` field is its event time
(``time_us`` of every event). ``--days N`` finds the first seq at or after the start time by
probing (:func:`seek_time`: a binary search over seqs, one short connection per probe, the upper
bound found by galloping until ``FutureCursor``), then drops the frames before the start time
(``before_start``); ``--days -1`` starts at cursor 0, the oldest frame the relay keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_never
from tenacity.wait import wait_base, wait_exponential, wait_random
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI, PayloadTooBig

from producers.firehose.decode import (
    ACCOUNT,
    COMMIT,
    IDENTITY,
    KIND_ERROR,
    KIND_INFO,
    KIND_SYNC,
    KIND_UNKNOWN,
    SYNC,
    Decoded,
    Frame,
    decode,
    parse_frame,
    parse_time_us,
)
from producers.firehose.verify import CommitVerifier, PendingCheck
from producers.source import Drop, End, Skip, SourceItem, StreamPosition, WebsocketHolder
from runtime.contract.nsid import CollectionFilter
from runtime.contract.records import Event
from runtime.contract.timeparse import us_to_iso
from runtime.errors import ConfigError, DecodeError, DropError, SourceError
from runtime.process.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_RELAY: Final = "wss://bsky.network"
SUBSCRIBE_PATH: Final = "/xrpc/com.atproto.sync.subscribeRepos"
#: Largest frame accepted by default; relays cap commits at a few MB.
DEFAULT_MAX_FRAME: Final = 8 * 1024 * 1024
_SOURCE: Final = "firehose"


def relay_url(url: str) -> str:
    """The subscribeRepos websocket URL for a relay given with or without the XRPC path.

    ``bsky.network``, ``wss://bsky.network`` and ``wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos``
    all name the same endpoint; ``https://`` / ``http://`` become ``wss://`` / ``ws://``.

    Raises:
        ConfigError: not a host or a ws(s)/http(s) URL, or a URL with another path.
    """
    text = url.strip()
    if not text:
        raise ConfigError("empty relay URL")
    if "://" not in text:
        text = "wss://" + text
    parts = urlsplit(text)
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(f"relay URL must be a host or a ws(s):// URL, not {url!r}")
    path = parts.path.rstrip("/")
    if path not in ("", SUBSCRIBE_PATH):
        raise ConfigError(f"relay URL path must be empty or {SUBSCRIBE_PATH}, not {parts.path!r}")
    return urlunsplit((scheme, parts.netloc, SUBSCRIBE_PATH, "", ""))


# ------------------------------------------------------------------------------------- position


@dataclass
class FirehosePosition(StreamPosition):
    """Resume state: the highest seq delivered, whether its frame was complete, and fingerprints.

    ``rewind`` is 0: every event of a frame shares its seq, and seqs only grow.
    """

    complete: bool = True

    def advance(self, event: Event) -> None:
        """Record ``event`` as delivered (a newer seq starts an incomplete frame)."""
        if self.max_cursor is None or event.cursor > self.max_cursor:
            self.complete = False
        super().advance(event)

    def frame_done(self, seq: int) -> None:
        """Every item of the frame ``seq`` was handed over (delivered, skipped or dead-lettered)."""
        if self.max_cursor is None or seq > self.max_cursor:
            self.max_cursor = seq
            self._forget()
            self.complete = True
        elif seq == self.max_cursor:
            self.complete = True

    @property
    def resume_cursor(self) -> int | None:
        """The ``cursor`` to ask the relay for: the last seq whose frame was delivered completely."""
        if self.max_cursor is None:
            return None
        return self.max_cursor if self.complete else self.max_cursor - 1

    def snapshot(self) -> dict[str, Any]:
        """JSON state (:meth:`StreamPosition.snapshot` plus ``complete`` and ``resume_cursor``)."""
        out = super().snapshot()
        out["complete"] = self.complete
        out["resume_cursor"] = self.resume_cursor
        return out

    @classmethod
    def restore(cls, state: dict[str, Any] | None, rewind: int = 0) -> FirehosePosition:
        """Rebuild from :meth:`snapshot` output (None: a fresh position)."""
        pos = cls(rewind=0)
        pos._load(state)
        if state and state.get("cursor") is not None:
            pos.complete = bool(state.get("complete", False))
        return pos


# ---------------------------------------------------------------------------------- frame handler


@dataclass(slots=True)
class Handled:
    """What one frame became: its seq (when known), its kind and the items to yield."""

    seq: int | None
    kind: str
    items: list[SourceItem]
    decoded: Decoded | None = None


def _count_ops(frame: Frame) -> int:
    if frame.type == COMMIT:
        ops = frame.body.get("ops")
        return len(ops) if isinstance(ops, list) and ops else 1
    return 1


class FrameHandler:
    """Turns parsed frames into source items (filters, time window, dedup, verification).

    Args:
        position: decides what was delivered already.
        collections: NSID patterns (wildcards allowed); empty = all.
        dids: DIDs to keep; empty = all.
        start_us: frames with an earlier time are skipped (None = no start).
        end_us: the end watermark (None = none); frames at or past it are skipped and the first
            frame at or past ``end_us + lateness_us`` ends the stream.
        verifier: checks commits (None = ``--verify`` off).
        job: written into every event.
    """

    def __init__(self, position: FirehosePosition, *, collections: list[str] | None = None,
                 dids: list[str] | None = None, start_us: int | None = None, end_us: int | None = None,
                 lateness_us: int = 1_000_000, verifier: CommitVerifier | None = None, job: str = "",
                 metrics: Metrics | None = None) -> None:
        self.position = position
        coll = CollectionFilter(collections or [])
        self._collections: Callable[[str], bool] | None = None if coll.matches_all else coll
        self._dids = frozenset(dids or ())
        self.start_us = start_us
        self.end_us = end_us
        self.hard_end_us = end_us + lateness_us if end_us is not None else None
        self.verifier = verifier
        self.job = job
        # The start time only bounds a fresh run; a resumed position already knows where it is.
        self._start_us = start_us if position.cursor is None else None
        self._verified = metrics.commits_verified.child(_SOURCE) if metrics is not None else None

    async def handle(self, raw: bytes, frame: Frame | None, error: DropError | None, origin: str) -> Handled:
        """Items for one frame (``frame`` parsed from ``raw``, or ``error`` when it did not parse)."""
        begun = await self.begin(raw, frame, error, origin)
        if self.verifier is not None:
            self.verifier.flush()
        return await self.finish(begun)

    async def begin(self, raw: bytes, frame: Frame | None, error: DropError | None, origin: str) -> Begun:
        """Everything of :meth:`handle` but waiting for a batched signature (:meth:`finish` does)."""
        if frame is None:
            assert error is not None
            return Begun(Handled(None, "malformed", [Drop(error.reason, error.detail, raw, origin)]))
        seq = frame.seq
        if self._dids and frame.op == 1 and frame.type in (COMMIT, IDENTITY, ACCOUNT, SYNC):
            did = frame.did
            if did is not None and did not in self._dids:
                return Begun(Handled(seq, "filtered", [Skip("did_filter", _count_ops(frame))]))
        try:
            decoded = decode(frame, job=self.job, collections=self._collections)
        except DropError as e:
            return Begun(Handled(seq, "malformed", [Drop(e.reason, e.detail, raw, origin, did=frame.did, cursor=seq)]))
        kind = decoded.kind
        if kind in (KIND_INFO, KIND_ERROR):
            return Begun(Handled(None, kind, [], decoded))
        if kind == KIND_UNKNOWN:
            return Begun(Handled(seq, kind, [Skip("unknown_type")], decoded))
        items: list[SourceItem] = []
        t = decoded.time_us
        events = decoded.events
        if t is not None:
            if self._start_us is not None and t < self._start_us:
                return Begun(Handled(seq, kind, [Skip("before_start", max(1, len(events)))], decoded))
            if self.end_us is not None and t >= self.end_us:
                assert self.hard_end_us is not None
                if t >= self.hard_end_us:
                    return Begun(Handled(seq, kind, [End("end_cursor_reached")], decoded))
                return Begun(Handled(seq, kind, [Skip("after_end", max(1, len(events)))], decoded))
        if decoded.filtered:
            items.append(Skip("collection_filter", decoded.filtered))
        if decoded.too_big:
            items.append(Skip("too_big", decoded.too_big))
        if kind == KIND_SYNC:
            items.append(Skip("sync_frame"))
        fresh = events
        position = self.position
        if events and position.cursor is not None and seq is not None and seq <= position.cursor:
            fresh = [e for e in events if not position.seen(e)]
            if len(fresh) < len(events):
                items.append(Skip("duplicate", len(events) - len(fresh)))
        handled = Handled(seq, kind, items, decoded)
        verifier = self.verifier
        if verifier is not None and (fresh or kind in (KIND_SYNC,) or decoded.type == IDENTITY):
            return Begun(handled, fresh, await verifier.begin(decoded), raw, origin)
        items.extend(fresh)
        return Begun(handled)

    async def finish(self, begun: Begun) -> Handled:
        """The items of a begun frame, once its verification (if any) is decided."""
        handled, check = begun.handled, begun.check
        if check is not None:
            assert self.verifier is not None
            decoded = check.decoded
            try:
                await self.verifier.finish(check)
            except DecodeError as e:
                handled.items.append(Drop(e.reason, e.detail, begun.raw, begun.origin, did=decoded.did,
                                          cursor=handled.seq))
                return handled
            if self._verified is not None and decoded.type in (COMMIT, SYNC):
                self._verified.inc()
        handled.items.extend(begun.fresh)
        return handled


@dataclass(slots=True)
class Begun:
    """A frame :meth:`FrameHandler.begin` handled up to its verification: ``check`` (None: nothing
    to wait for, ``handled`` is final) and the events that follow a passed check."""

    handled: Handled
    fresh: list[Event] = field(default_factory=list)
    check: PendingCheck | None = None
    raw: bytes = b""
    origin: str = ""


# ------------------------------------------------------------------------------------ the stream


@dataclass(slots=True)
class RawFrame:
    """One websocket message: its bytes, and the parsed frame or why it did not parse."""

    data: bytes
    frame: Frame | None
    error: DropError | None


@dataclass
class StreamOptions:
    """How to talk to the relay.

    Args:
        url: the subscribeRepos URL (see :func:`relay_url`).
        max_frame_size: largest accepted frame (bigger ones are dead-lettered and stepped over).
        stall_timeout: reconnect when nothing arrived for this long (0 = never).
        max_attempts: consecutive failed connects before giving up (0 = never give up).
        backoff_initial, backoff_max: the jittered exponential backoff between attempts.
    """

    url: str
    max_frame_size: int = DEFAULT_MAX_FRAME
    stall_timeout: float = 60.0
    max_attempts: int = 0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


Connector = Callable[..., Awaitable[ClientConnection]]


def _retryable(exc: BaseException) -> bool:
    """Connection failures worth another attempt: network errors, timeouts, 5xx and 429 handshakes."""
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        return status == 429 or status >= 500
    return isinstance(exc, (OSError, InvalidHandshake, TimeoutError))


@dataclass
class StreamCounters:
    """Per-process counts of stream-level happenings (the metrics hold the same)."""

    connects: int = 0
    frames: int = 0
    gaps: int = 0
    missing: int = 0
    outdated: int = 0
    info: dict[str, int] = field(default_factory=dict)


class RelayStream(WebsocketHolder):
    """Frames from a relay across reconnects, resuming after the last fully handled frame.

    Args:
        opts: connection options.
        cursor: the first ``cursor`` to ask for (None = live).
        metrics: counts notices, gaps and reconnects.
        sleep: backoff sleep (tests inject a no-wait one).
        wait: tenacity wait strategy (default: jittered exponential from the options).
        connector: ``websockets.asyncio.client.connect`` or a stand-in.
        clock: monotonic seconds (the stall watchdog).
    """

    def __init__(self, opts: StreamOptions, cursor: int | None, *, metrics: Metrics | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, wait: wait_base | None = None,
                 connector: Connector | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.opts = opts
        self.last_seq: int | None = cursor
        #: The newest seq received (handled or not): with a pipelined consumer it runs ahead of last_seq.
        self.received_seq: int | None = cursor
        self._metrics = metrics
        self._sleep = sleep
        self._wait = wait or (wait_exponential(multiplier=opts.backoff_initial, max=opts.backoff_max)
                                   + wait_random(0, opts.backoff_initial))
        self._connector: Connector = connector or connect
        self._clock = clock
        self._ws: ClientConnection | None = None
        self._last_message = 0.0
        self.counters = StreamCounters()
        self.on_reconnect: Callable[[], None] | None = None
        self._logged: set[str] = set()

    def _notice(self, kind: str, amount: int = 1) -> None:
        if self._metrics is not None:
            self._metrics.stream_notices.inc(_SOURCE, kind, amount=amount)

    def _log_once(self, key: str, level: int, msg: str, *args: Any) -> None:
        if key in self._logged:
            log.debug(msg, *args)
            return
        self._logged.add(key)
        log.log(level, "%s (further ones are only counted)", msg % args)

    def _url(self, cursor: int | None) -> str:
        return self.opts.url if cursor is None else f"{self.opts.url}?cursor={cursor}"

    async def _connect(self, url: str) -> ClientConnection:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            log.warning("cannot connect to %s (%s); attempt %d", self.opts.url, exc, state.attempt_number)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.opts.max_attempts) if self.opts.max_attempts else stop_never,
            wait=self._wait, sleep=self._sleep, reraise=True, before_sleep=before_sleep,
            retry=retry_if_exception(_retryable))
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._connector(url, max_size=self.opts.max_frame_size, open_timeout=15,
                                               ping_interval=20, ping_timeout=30, close_timeout=0.5,
                                               compression=None, user_agent_header="atproto-backfill")
        except (OSError, InvalidHandshake, TimeoutError) as e:
            raise SourceError(f"cannot connect to relay {self.opts.url}: {e}") from e
        raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover

    async def frames(self) -> AsyncIterator[RawFrame | Drop]:
        """Raw frames (and ``Drop`` items for oversize frames), forever; reconnects on its own.

        ``last_seq`` must be kept current by the consumer (:meth:`done`) so a reconnect resumes
        after the last fully handled frame.

        Raises:
            SourceError: ``FutureCursor`` from the relay, or no connection after ``max_attempts``.
        """
        first = True
        while True:
            cursor = self.last_seq
            if not first and self.on_reconnect is not None:
                self.on_reconnect()
            first = False
            ws = await self._connect(self._url(cursor))
            self._ws = ws
            self.counters.connects += 1
            log.info("connected to %s (cursor %s)", self.opts.url, cursor)
            oversize = False
            try:
                async for item in self._read(ws, cursor):
                    yield item
                log.info("relay %s closed the stream; reconnecting", self.opts.url)
            except PayloadTooBig:
                oversize = True
            except ConnectionClosed as e:
                codes = {c.code for c in (e.rcvd, e.sent) if c is not None}
                if 1009 in codes:
                    oversize = True
                else:
                    log.warning("relay %s connection closed: %s; reconnecting from cursor %s",
                                self.opts.url, e, self.last_seq)
            finally:
                self._ws = None
                with contextlib.suppress(Exception):
                    await ws.close()
            if oversize:
                drop = self._oversize()
                if drop is not None:
                    yield drop
            await self._sleep(0)

    def _oversize(self) -> Drop | None:
        # the oversize frame follows the last one received (a pipelined consumer may not be done with it)
        known = [s for s in (self.last_seq, self.received_seq) if s is not None]
        last = max(known) if known else None
        skipped = last + 1 if last is not None else None
        self._notice("oversize_skip")
        self._log_once("oversize", logging.WARNING, "a frame after seq %s is over %d bytes; stepping over seq %s",
                       last, self.opts.max_frame_size, skipped)
        if skipped is None:
            return Drop("oversize", f"frame over {self.opts.max_frame_size} bytes on the live stream", b"",
                        self.opts.url)
        self.last_seq = skipped
        return Drop("oversize", f"frame over {self.opts.max_frame_size} bytes (seq {skipped} skipped)", b"",
                    self.opts.url, cursor=skipped)

    def buffered(self) -> int:
        """Messages received and not read yet (0 when unknown: then none are assumed)."""
        ws = self._ws
        try:
            return len(ws.recv_messages.frames) if ws is not None else 0
        except (AttributeError, TypeError):  # another websockets layout
            return 0

    def done(self, seq: int) -> None:
        """Frame ``seq`` was fully handled: a reconnect resumes after it."""
        if self.last_seq is None or seq > self.last_seq:
            self.last_seq = seq

    async def _read(self, ws: ClientConnection, cursor: int | None) -> AsyncIterator[RawFrame]:
        watchdog = asyncio.ensure_future(self._watchdog(ws)) if self.opts.stall_timeout else None
        expected = cursor + 1 if cursor is not None else None
        outdated = False
        gap_logged = False
        counters = self.counters
        clock = self._clock
        self._last_message = clock()
        try:
            async for raw in ws:
                self._last_message = clock()
                counters.frames += 1
                data = raw if isinstance(raw, bytes) else raw.encode()
                try:
                    frame: Frame | None = parse_frame(data)
                    error: DropError | None = None
                except DropError as e:
                    frame, error = None, e
                if frame is not None:
                    if frame.op == -1:
                        self._error_frame(frame, cursor)
                        continue
                    if frame.type == "#info":
                        outdated = self._info_frame(frame, cursor) or outdated
                        continue
                    seq = frame.seq
                    if seq is not None:
                        if expected is not None and seq != expected:
                            if seq > expected:
                                missing = seq - expected
                                counters.missing += missing
                                if self._metrics is not None:
                                    self._metrics.seq_gap_frames.inc(_SOURCE, amount=missing)
                                if outdated:
                                    log.warning("relay %s resumed at seq %d: seqs %d..%d are lost (no longer "
                                                "held by the relay)", self.opts.url, seq, expected, seq - 1)
                                else:
                                    counters.gaps += 1
                                    self._notice("seq_gap")
                                    if not gap_logged:
                                        gap_logged = True
                                        self._log_once("gap", logging.WARNING,
                                                       "sequence gap: expected seq %d, got %d (%d missing)",
                                                       expected, seq, missing)
                            else:
                                self._notice("seq_regression")
                                self._log_once("regression", logging.WARNING,
                                               "relay sequence went back: expected seq %d, got %d", expected, seq)
                        outdated = False
                        expected = seq + 1
                        if self.received_seq is None or seq > self.received_seq:
                            self.received_seq = seq
                yield RawFrame(data, frame, error)
        finally:
            if watchdog is not None:
                watchdog.cancel()

    def _info_frame(self, frame: Frame, cursor: int | None) -> bool:
        name = frame.body.get("name")
        message = frame.body.get("message")
        key = str(name)
        self.counters.info[key] = self.counters.info.get(key, 0) + 1
        if name == "OutdatedCursor":
            self.counters.outdated += 1
            self._notice("outdated_cursor")
            level = logging.INFO if not cursor else logging.WARNING
            log.log(level, "relay %s no longer holds cursor %s (%s); it streams from its oldest frame",
                    self.opts.url, cursor, message)
            return True
        self._notice("info_frame")
        self._log_once(f"info:{name}", logging.INFO, "relay info %s: %s", name, message)
        return False

    def _error_frame(self, frame: Frame, cursor: int | None) -> None:
        error = frame.body.get("error")
        message = frame.body.get("message")
        if error == "FutureCursor":
            self._notice("future_cursor")
            raise SourceError(f"relay {self.opts.url} says cursor {cursor} is in the future ({message}); "
                              "is this the relay the checkpoint came from?")
        if error == "ConsumerTooSlow":
            self._notice("consumer_too_slow")
            log.warning("relay %s: ConsumerTooSlow (%s); reconnecting from seq %s", self.opts.url, message,
                        self.last_seq)
        else:
            self._notice("error_frame")
            self._log_once(f"error:{error}", logging.WARNING, "relay %s sent error %s: %s", self.opts.url,
                           error, message)

    async def _watchdog(self, ws: ClientConnection) -> None:
        stall = self.opts.stall_timeout
        while True:
            await asyncio.sleep(max(0.05, stall / 4))
            if self._clock() - self._last_message >= stall:
                log.warning("no frame from %s for %.0f s; reconnecting", self.opts.url, stall)
                await ws.close()
                return


# ------------------------------------------------------------------------------------ the source


class FirehoseSource:
    """The job runner's source: a :class:`RelayStream` through a :class:`FrameHandler`.

    Args:
        stream: the relay stream (its start cursor is the position's resume cursor, or the start).
        handler: turns frames into items (holds the position).
    """

    name = "firehose"

    def __init__(self, stream: RelayStream, handler: FrameHandler) -> None:
        self.stream = stream
        self.handler = handler

    @property
    def position(self) -> FirehosePosition:
        """What was yielded so far."""
        return self.handler.position

    async def items(self) -> AsyncIterator[SourceItem]:
        """Events, drops and skips, until the end watermark (then an End) or forever."""
        verifier = self.handler.verifier
        if verifier is not None and verifier.batching:
            async for item in self._pipelined(verifier):
                yield item
            return
        stream = self.stream
        handler = self.handler
        position = handler.position
        origin = stream.opts.url
        async for raw in stream.frames():
            if isinstance(raw, Drop):
                yield raw
                if raw.cursor is not None:
                    position.frame_done(raw.cursor)
                continue
            handled = await handler.handle(raw.data, raw.frame, raw.error, origin)
            for item in handled.items:
                yield item
                if isinstance(item, End):
                    return
            seq = handled.seq
            if seq is not None:
                position.frame_done(seq)
                stream.done(seq)

    async def _pipelined(self, verifier: CommitVerifier) -> AsyncIterator[SourceItem]:
        """:meth:`items` with ``--verify`` signatures checked in batches on a thread.

        Frames are begun (decoded, filtered, checked but for their signature) while more are at
        hand; a group of them is finished (its verdicts awaited, its items yielded, in frame order)
        once the next group is begun, so the thread verifies one group while the interpreter
        decodes the next. Whenever the connection has nothing more buffered, every begun frame is
        finished before waiting for the network: a reconnect, an oversize frame or the end of the
        stream never finds a frame half handled, and a quiet stream is not held back. A frame the
        relay sends again after a reconnect while its first copy was still begun is left out (the
        first copy is delivered); older ones are de-duplicated by the position as without batches.
        """
        stream = self.stream
        handler = self.handler
        position = handler.position
        origin = stream.opts.url
        group: list[Begun] = []
        groups: deque[list[Begun]] = deque()
        begun_seq: int | None = None

        async def finished(keep: int) -> list[Handled]:
            """Finish the oldest groups until ``keep`` are left (their frames in order)."""
            out: list[Handled] = []
            while len(groups) > keep:
                for begun in groups.popleft():
                    out.append(await handler.finish(begun))
            return out

        async for raw in stream.frames():
            done: list[Handled] = []
            if isinstance(raw, Drop):
                verifier.flush()
                groups.append(group)
                group = []
                done = await finished(0)
            else:
                seq = raw.frame.seq if raw.frame is not None else None
                if seq is not None and begun_seq is not None and seq <= begun_seq and (
                        position.cursor is None or seq > position.cursor):
                    continue  # sent again after a reconnect while its first copy was begun
                group.append(await handler.begin(raw.data, raw.frame, raw.error, origin))
                if seq is not None and (begun_seq is None or seq > begun_seq):
                    begun_seq = seq
                idle = stream.buffered() == 0
                if idle or len(group) >= verifier.batch_size:
                    verifier.flush()
                    groups.append(group)
                    group = []
                    done = await finished(0 if idle else 1)
            # a frame's items are handed over before the position counts the frame (checkpoints)
            for handled in done:
                for item in handled.items:
                    yield item
                    if isinstance(item, End):
                        return
                if handled.seq is not None:
                    position.frame_done(handled.seq)
                    stream.done(handled.seq)
            if isinstance(raw, Drop):
                yield raw
                if raw.cursor is not None:
                    position.frame_done(raw.cursor)

    async def aclose(self) -> None:
        """Close the connection."""
        await self.stream.aclose()


# ------------------------------------------------------------------------------------- seeking


async def probe(url: str, cursor: int, *, connector: Connector | None = None, timeout: float = 15.0,
                idle_timeout: float = 3.0) -> tuple[int, int] | None:
    """``(seq, time_us)`` of the first frame after ``cursor``; None when nothing follows it.

    Nothing follows a cursor in the future (``FutureCursor``) or at the head of the stream (no frame
    within ``idle_timeout`` seconds: a live relay sends several per second).

    Raises:
        SourceError: the connection failed or closed without a frame.
    """
    conn = connector or connect
    target = f"{url}?cursor={cursor}"
    try:
        ws = await asyncio.wait_for(conn(target, max_size=DEFAULT_MAX_FRAME * 4, open_timeout=timeout,
                                         close_timeout=0.5, compression=None,
                                         user_agent_header="atproto-backfill"), timeout)
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as e:
        raise SourceError(f"probing {url} at cursor {cursor}: {e}") from e
    try:
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), idle_timeout)
            except TimeoutError:
                return None
            if not isinstance(raw, bytes):
                continue
            try:
                frame = parse_frame(raw)
            except DropError:
                continue
            if frame.op == -1:
                if frame.body.get("error") == "FutureCursor":
                    return None
                continue
            seq = frame.seq
            when = frame.body.get("time")
            if seq is not None and isinstance(when, str):
                try:
                    return seq, parse_time_us(when)
                except DropError:
                    continue
    except ConnectionClosed as e:
        raise SourceError(f"probing {url} at cursor {cursor}: closed without a frame ({e})") from e
    finally:
        # The relay keeps streaming after the one frame we wanted; a close handshake would wait behind
        # that backlog, so the probe just drops the connection.
        with contextlib.suppress(Exception):
            ws.transport.abort()


async def seek_time(url: str, target_us: int, *, connector: Connector | None = None, timeout: float = 15.0,
                    idle_timeout: float = 3.0, margin: int = 0) -> int:
    """The cursor to ask for so the stream starts at the first frame with ``time >= target_us``.

    Binary search over seqs: the oldest frame the relay keeps (cursor 0) is the lower bound; the upper
    bound is found by galloping until a probe lands past the target or on ``FutureCursor``. Frame
    times are nearly monotonic in seq; ``margin`` seqs are subtracted for safety (the extra frames
    are dropped as ``before_start``).

    Returns:
        The cursor (0 when even the oldest frame is at or after the target).

    Raises:
        SourceError: a probe failed.
    """
    first = await probe(url, 0, connector=connector, timeout=timeout, idle_timeout=idle_timeout)
    if first is None:
        return 0  # an empty relay: nothing is older than the target
    lo_seq, lo_time = first
    if lo_time >= target_us:
        if lo_time > target_us + 60_000_000:
            log.warning("relay %s keeps frames from %s on (seq %d), after the requested start %s: the backfill "
                        "starts there", url, us_to_iso(lo_time), lo_seq, us_to_iso(target_us))
        return 0
    lo = lo_seq  # a seq whose frame is before the target
    step = 1024
    hi: int | None = None
    while hi is None:
        found = await probe(url, lo + step - 1, connector=connector, timeout=timeout,
                            idle_timeout=idle_timeout)
        if found is None or found[1] >= target_us:
            hi = lo + step
        else:
            lo = found[0]
            step *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = await probe(url, mid - 1, connector=connector, timeout=timeout, idle_timeout=idle_timeout)
        if found is None or found[1] >= target_us:
            hi = mid
        elif found[0] >= hi:
            hi = mid  # a gap from mid up to hi: everything in it is missing
        else:
            lo = found[0]
    cursor = max(0, lo - margin)
    log.info("seeking %s: the frames from seq %d on are at or after the start time; cursor %d",
             url, lo + 1, cursor)
    return cursor


__all__ = [
    "DEFAULT_RELAY",
    "SUBSCRIBE_PATH",
    "FirehosePosition",
    "FirehoseSource",
    "FrameHandler",
    "Handled",
    "RawFrame",
    "RelayStream",
    "StreamOptions",
    "probe",
    "relay_url",
    "seek_time",
]

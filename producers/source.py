"""The contract every source implements, and the resume position shared by the streaming sources.

A source is an async iterator of items: :class:`~runtime.contract.records.Event` values to produce,
:class:`Drop` values for bad upstream input (dead-lettered), and a final :class:`End` telling why
the stream ended. Its position object decides what has already been delivered (so a resume or a
reconnect never re-delivers, and never skips) and serialises into the job checkpoint.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection

from runtime.contract.keyhash import key_digest
from runtime.contract.records import JETSTREAM_SOURCES, Event, IdentityEvent, RecordEvent, event_key
from runtime.contract.records import Source as Origin

_JETSTREAM = Origin.JETSTREAM.value


@dataclass(slots=True)
class Drop:
    """Bad upstream input: counted under ``reason``, written to the dead-letter topic, skipped."""

    reason: str
    detail: str
    payload: bytes
    origin: str
    did: str | None = None
    cursor: int | None = None


@dataclass(slots=True)
class Skip:
    """A well-formed event not produced (filtered, outside the window); counted only."""

    reason: str
    count: int = 1


@dataclass(slots=True)
class End:
    """The source finished on its own.

    ``reason``: ``end_cursor_reached`` (the watermark), ``exhausted`` (a bounded source ran out).
    """

    reason: str


SourceItem = Event | Drop | Skip | End


class Position(Protocol):
    """A source's resume state."""

    @property
    def cursor(self) -> int | None:
        """The headline cursor (for status and ``firehose_cursor``)."""

    def seen(self, event: Event) -> bool:
        """True if ``event`` was already delivered before (a replay after reconnect or resume)."""

    def advance(self, event: Event) -> None:
        """Record that ``event`` is about to be delivered."""

    def snapshot(self) -> dict[str, Any]:
        """JSON-serialisable state for the checkpoint."""


class Source(Protocol):
    """A producer input: Jetstream, the relay firehose, or per-DID repositories."""

    name: str

    @property
    def position(self) -> Position:
        """The position of what was yielded so far."""

    def items(self) -> AsyncIterator[SourceItem]:
        """Yield events, drops, skips, and possibly a final End."""


def fingerprint(event: Event) -> bytes:
    """8 bytes identifying ``event`` across replays (and across processes: it is checkpointed)."""
    return key_digest(event_key(event), 8)


def _identity(event: Event) -> tuple[Any, ...]:
    """The fields of :func:`~runtime.contract.records.event_key`, as a tuple: cheap to build and to hash."""
    if type(event) is RecordEvent:
        if event.source in JETSTREAM_SOURCES:
            if event.rev:
                return (_JETSTREAM, event.did, event.collection, event.rkey, event.rev)
            return (event.source, event.did, event.collection, event.rkey, event.operation, "", event.cid or "",
                    event.time_us)
        return (event.source, event.did, event.collection, event.rkey, event.operation, event.rev or "",
                event.cid or "", event.time_us)
    kind = "identity" if isinstance(event, IdentityEvent) else "account"
    seq = getattr(event, "seq", None)
    if event.source in JETSTREAM_SOURCES and seq is not None:
        return (_JETSTREAM, event.did, kind, seq)
    return (event.source, event.did, kind, seq, event.time_us)


def _fingerprint_of(identity: tuple[Any, ...]) -> bytes:
    """:func:`fingerprint` of the event whose :func:`_identity` this is."""
    return key_digest("|".join(map(str, identity)), 8)


@dataclass
class StreamPosition:
    """Resume state of a cursor-ordered stream whose cursors may arrive slightly out of order.

    A relay frame carries several events with one ``seq``. So the position keeps the highest
    cursor delivered plus the identities of the events delivered within ``rewind`` below it. A
    resume asks the source for events from ``cursor - rewind`` and drops those seen. (Jetstream,
    whose cursor is each instance's own clock, has its own position:
    :class:`~producers.jetstream.position.JetstreamPosition`.)

    In memory an event's identity is a tuple of its key fields (hashed by the set); the stable
    8-byte :func:`fingerprint` is computed only for the checkpoint (:meth:`snapshot`) and, after a
    :meth:`restore`, for the events at or below the restored cursor (the replayed overlap).

    Args:
        rewind: how far below the highest cursor an undelivered event can still arrive (relay: 0).
    """

    rewind: int = 0
    max_cursor: int | None = None
    _window: deque[tuple[int, tuple[Any, ...]]] = field(default_factory=deque)
    _set: set[tuple[Any, ...]] = field(default_factory=set)
    # The identity seen() computed, reused by the advance() of the same event that follows it.
    _last: tuple[Event | None, tuple[Any, ...]] = (None, ())
    # Fingerprints of a restored checkpoint's window, all at cursor _restored_at.
    _restored: frozenset[bytes] = frozenset()
    _restored_at: int = -1

    @property
    def cursor(self) -> int | None:
        """The highest cursor delivered."""
        return self.max_cursor

    @property
    def resume_from(self) -> int | None:
        """Where a reconnect should start reading (inclusive)."""
        return None if self.max_cursor is None else self.max_cursor - self.rewind

    def seen(self, event: Event) -> bool:
        """True if ``event`` was delivered already (or is older than anything still expected)."""
        if self.max_cursor is None:
            return False
        c = event.cursor
        if c < self.max_cursor - self.rewind:
            return True
        identity = _identity(event)
        self._last = (event, identity)
        if identity in self._set:
            return True
        return c <= self._restored_at and _fingerprint_of(identity) in self._restored

    def advance(self, event: Event) -> None:
        """Record ``event`` as delivered."""
        c = event.cursor
        if self.max_cursor is None or c > self.max_cursor:
            self.max_cursor = c
        last, identity = self._last
        if last is not event:
            identity = _identity(event)
        self._last = (None, ())
        self._window.append((c, identity))
        self._set.add(identity)
        floor = self.max_cursor - self.rewind
        window = self._window
        while window and window[0][0] < floor:
            _, old = window.popleft()
            self._set.discard(old)
        if self._restored_at < floor and self._restored:
            self._restored = frozenset()

    def snapshot(self) -> dict[str, Any]:
        """JSON state: cursor, rewind and the window's fingerprints (hex)."""
        floor = (self.max_cursor or 0) - self.rewind
        fps = {_fingerprint_of(identity) for c, identity in self._window if c >= floor}
        if self._restored_at >= floor:
            fps |= self._restored
        return {"cursor": self.max_cursor, "rewind": self.rewind, "window": sorted(fp.hex() for fp in fps)}

    @classmethod
    def restore(cls, state: dict[str, Any] | None, rewind: int) -> StreamPosition:
        """Rebuild from :meth:`snapshot` output (None: a fresh position)."""
        pos = cls(rewind=rewind)
        pos._load(state)
        return pos

    def _load(self, state: dict[str, Any] | None) -> None:
        if state and state.get("cursor") is not None:
            self.max_cursor = int(state["cursor"])
            self._restored = frozenset(bytes.fromhex(h) for h in state.get("window", []))
            self._restored_at = self.max_cursor

    def _forget(self) -> None:
        """Drop every identity held (a newer cursor made them all obsolete)."""
        self._window.clear()
        self._set.clear()
        self._restored = frozenset()


class WebsocketHolder:
    """A stream that holds at most one websocket connection at a time (``_ws``) and closes it on
    :meth:`aclose`, whatever state it is in."""

    _ws: ClientConnection | None = None

    async def aclose(self) -> None:
        """Close the websocket if open."""
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

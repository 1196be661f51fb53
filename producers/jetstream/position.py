"""The Jetstream job's position: what was delivered, by identities no instance's clock changes.

A Jetstream event's ``time_us`` (its cursor) is the receive time on the clock of the instance that
served it: another instance serves the same event with another ``time_us``, ahead or behind by
that instance's lag and clock. So the position keeps two things apart:

* **Identities** (:func:`identity`): a 64-bit hash of :func:`~runtime.contract.records.event_key`, which
  for Jetstream is the record's did, collection, rkey and rev (the relay's seq for identity and
  account events): the same on every instance. An event is a duplicate exactly when its identity
  was delivered.
* **Clocks**: the highest cursor received from the instance in use (``clock``, on ``instance``'s
  clock), and the highest cursor ever delivered (``cursor``, the headline, never decreasing).

The failover rule (:meth:`JetstreamPosition.connected`): a connection to the instance whose clock
``clock`` is on starts at ``clock - lateness``; a connection to any other instance starts at
``clock - failover_rewind``, and the identities drop what that wider replay repeats. It neither
duplicates nor drops as long as the new instance's clock is within ``failover_rewind - lateness``
of the old one's, behind or ahead. The first event received from the new instance makes its clock
the one ``clock`` is on.

A **late** event arrives more than ``lateness`` behind the newest cursor already received from the
same instance. It is not a duplicate for being late: it is dropped only if its identity was
delivered, otherwise delivered and counted (:attr:`JetstreamPosition.late`).

Bounds (ARCHITECTURE: every piece of state is bounded):

* In memory, identities are kept in a few rotating sets of 64-bit hashes for ``hold = 2 *
  failover_rewind`` of event time (the replay of an instance ahead by up to ``failover_rewind``
  reaches that far back), and at most :data:`MAX_IDENTITIES` of them (about 70 bytes each): past
  that the oldest set goes first, and a failover to an instance far ahead may then repeat events
  older than what is held (logged once; the sinks de-duplicate by the same identity).
* A checkpoint holds 8-byte hashes in base64: the identities within the lateness of the clock
  (what a resume on the same instance replays), the newest :data:`WINDOW_IDENTITIES` of them at
  most, and, newest sets first, held identities up to :data:`CHECKPOINT_IDENTITIES` in all (what a
  resume on another instance can recognise of its wider replay): at most about 470 KB, whatever
  the event density, so a checkpoint always fits a Kafka message (1 MB by default). When more
  events than that share the lateness window (a burst, a replay), a resume may produce the oldest
  of them again (logged once; the sinks de-duplicate by the same identity); none is skipped.
"""

from __future__ import annotations

import base64
import logging
import sys
from array import array
from collections import deque
from typing import Any, Final

from runtime.contract.keyhash import key_digest, key_hash64
from runtime.contract.records import JETSTREAM_SOURCES, Event, IdentityEvent, RecordEvent, Source, event_key

log = logging.getLogger(__name__)

#: Hashes a checkpoint holds beyond the lateness window's (8 bytes each, base64: about 44 KB).
CHECKPOINT_IDENTITIES: Final = 4096
#: Hashes of the lateness window a checkpoint (and memory) holds at most: the newest (base64:
#: about 430 KB). Bluesky's full rate is about 2,000 events/s, 2,000 in the default 1 s window.
WINDOW_IDENTITIES: Final = 40_000
#: Hashes held in memory at most (about 70 bytes each: about 35 MB). At Bluesky's full rate (about
#: 2,000 events/s) the default hold of 240 s of event time needs about 480,000.
MAX_IDENTITIES: Final = 500_000
#: The hold is kept in this many rotating sets (plus the one filling): an identity lives between
#: ``hold`` and ``hold * (1 + 1/BUCKETS)`` of event time.
BUCKETS: Final = 4
#: Default of ``--failover-rewind``: 120 s.
FAILOVER_REWIND_US: Final = 120_000_000
#: What :meth:`JetstreamPosition.check` says of an event.
NEW: Final = 0
DUPLICATE: Final = 1
LATE: Final = 2
#: Version of the checkpointed state (a state without it is a StreamPosition's, from before).
VERSION: Final = 2

_BIG_ENDIAN: Final = sys.byteorder == "big"
_JETSTREAM: Final = Source.JETSTREAM.value


def identity(event: Event) -> int:
    """The event's identity: 64 bits of blake2b over its clock-independent ``event_key``."""
    if type(event) is RecordEvent and event.rev and event.source in JETSTREAM_SOURCES:
        # event_key's common case, inline (once per event); tests compare the two on random events
        return key_hash64(f"{_JETSTREAM}|{event.did}|{event.collection}|{event.rkey}|{event.rev}")
    return key_hash64(event_key(event))


def _legacy_fingerprint(event: Event) -> bytes:
    """The fingerprint a checkpoint of the earlier format holds (its key included ``time_us``)."""
    if isinstance(event, RecordEvent):
        key = (f"{event.source}|{event.did}|{event.collection}|{event.rkey}|{event.operation}|"
               f"{event.rev or ''}|{event.cid or ''}|{event.time_us}")
    else:
        kind = "identity" if isinstance(event, IdentityEvent) else "account"
        key = f"{event.source}|{event.did}|{kind}|{event.seq}|{event.time_us}"
    return key_digest(key, 8)


def _pack(ids: list[int]) -> str:
    arr = array("Q", ids)
    if _BIG_ENDIAN:
        arr.byteswap()
    return base64.b64encode(arr.tobytes()).decode()


def _unpack(text: str | None) -> list[int]:
    if not text:
        return []
    arr = array("Q")
    arr.frombytes(base64.b64decode(text))
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tolist()


class JetstreamPosition:
    """Resume state of a Jetstream job (see the module docstring for the rules and bounds).

    Args:
        lateness: how far (µs) an event may arrive behind newer ones on one instance.
        failover_rewind: how far (µs) a connection to another instance rewinds (at least the
            lateness); identities are held for twice that.
        max_identities: the cap of identities held in memory.
        checkpoint_identities: identities a checkpoint holds beyond the lateness window.
        window_identities: identities of the lateness window held for a checkpoint (the newest).
    """

    def __init__(self, lateness: int = 1_000_000, failover_rewind: int = FAILOVER_REWIND_US, *,
                 max_identities: int = MAX_IDENTITIES,
                 checkpoint_identities: int = CHECKPOINT_IDENTITIES,
                 window_identities: int = WINDOW_IDENTITIES) -> None:
        self.lateness = max(0, lateness)
        self.failover_rewind = max(failover_rewind, self.lateness)
        self.hold = 2 * self.failover_rewind
        self.max_identities = max(1, max_identities)
        self.checkpoint_identities = max(0, checkpoint_identities)
        self._width = max(1, self.hold // BUCKETS)
        self._bucket_cap = max(1, self.max_identities // BUCKETS)
        #: The highest cursor delivered, on whichever clock (the headline; never decreases).
        self.max_cursor: int | None = None
        #: The instance whose clock ``clock`` is on (None: not known, taken as the next one's).
        self.instance: str | None = None
        #: The highest cursor received from ``instance``.
        self.clock: int | None = None
        #: Late events delivered (not seen before) since this position was made.
        self.late = 0
        self._connected: str | None = None
        # Event time elapsed: the forward moves of ``clock`` added up (a switch of clock adds none).
        self._elapsed = 0
        self._current: set[int] = set()
        self._current_start = 0
        self._sealed: deque[tuple[int, set[int]]] = deque()
        self._count = 0
        self._capped = False
        # (cursor, identity) delivered within the lateness of ``clock``, oldest first; the newest
        # ``window_identities`` at most.
        self.window_identities = max(1, window_identities)
        self._window: deque[tuple[int, int]] = deque(maxlen=self.window_identities)
        self._window_full_logged = False
        # The restored checkpoint's lateness window, all at cursor _restored_at (persisted again
        # while still within the lateness), and a checkpoint of the earlier format's fingerprints.
        self._restored: list[int] = []
        self._restored_at = -1
        self._legacy: frozenset[bytes] = frozenset()
        self._legacy_at = -1
        # The event check() saw last and its identity, for advance() to reuse.
        self._last_event: Event | None = None
        self._last_fp = 0

    # ------------------------------------------------------------------ connections

    @property
    def cursor(self) -> int | None:
        """The highest cursor delivered (on any instance's clock)."""
        return self.max_cursor

    @property
    def held(self) -> int:
        """How many identities are held in memory (at most ``max_identities``)."""
        return self._count

    @property
    def resume_from(self) -> int | None:
        """Where a connection to the instance of ``clock`` starts (inclusive)."""
        return None if self.clock is None else max(self.clock - self.lateness, 0)

    def rewind_for(self, instance: str) -> int:
        """How far below ``clock`` a connection to ``instance`` starts."""
        same = self.instance is None or self.instance == instance
        return self.lateness if same else self.failover_rewind

    def connected(self, instance: str) -> int | None:
        """A connection to ``instance`` opens: the cursor to ask it for (None: nothing received yet)."""
        self._connected = instance
        if self.clock is None:
            return None
        back = self.rewind_for(instance)
        if back != self.lateness:
            log.info("failover from %s to %s: rewinding %.1f s; identities held: %d", self.instance, instance,
                     back / 1e6, self._count)
        return max(self.clock - back, 0)

    def _observe(self, cursor: int) -> None:
        """An event of the current connection was received: move its instance's clock."""
        conn = self._connected
        if conn != self.instance:
            if self.instance is not None or self.clock is None:
                # The first event from another instance: its clock is the one in use from now on.
                self.instance = conn
                self.clock = cursor
                self._window.clear()
                return
            self.instance = conn  # a restored clock of an unknown instance: taken as this one's
        clock = self.clock
        if clock is None:
            self.clock = cursor
        elif cursor > clock:
            self.clock = cursor
            self._elapsed += cursor - clock

    # ------------------------------------------------------------------ events

    def _held(self, fp: int) -> bool:
        if fp in self._current:
            return True
        return any(fp in ids for _, ids in self._sealed)

    def _legacy_seen(self, event: Event) -> bool:
        return event.cursor <= self._legacy_at and _legacy_fingerprint(event) in self._legacy

    def seen(self, event: Event) -> bool:
        """True if ``event`` (by its identity) was delivered already."""
        return self._held(identity(event)) or (bool(self._legacy) and self._legacy_seen(event))

    def check(self, event: Event) -> int:
        """:data:`DUPLICATE`, :data:`LATE` (not seen, but more than the lateness behind the newest
        cursor received from this instance) or :data:`NEW`; records the event's cursor on its
        instance's clock. The source calls it once per event; :meth:`advance` follows if delivered."""
        fp = identity(event)
        c = event.cursor
        dup = fp in self._current
        if not dup:
            for _, ids in self._sealed:  # _held, unrolled: once per event
                if fp in ids:
                    dup = True
                    break
            else:
                dup = bool(self._legacy) and self._legacy_seen(event)
        clock = self.clock
        instance = self.instance
        late = (not dup and clock is not None and c < clock - self.lateness
                and (instance is None or instance == self._connected))
        if clock is not None and instance is not None and instance == self._connected:
            if c > clock:  # _observe's common case, inline: once per event
                self.clock = c
                self._elapsed += c - clock
        else:
            self._observe(c)
        self._last_event = event
        self._last_fp = fp
        if dup:
            return DUPLICATE
        if late:
            self.late += 1
            return LATE
        return NEW

    def advance(self, event: Event) -> None:
        """Record ``event`` as delivered."""
        c = event.cursor
        if self.max_cursor is None or c > self.max_cursor:
            self.max_cursor = c
        fp = self._last_fp
        if self._last_event is not event:  # not checked first (a caller of the Position protocol only)
            fp = identity(event)
            self._observe(c)
        self._last_event = None
        current = self._current
        if fp not in current:
            current.add(fp)
            self._count += 1
        clock = self.clock if self.clock is not None else c
        window = self._window
        floor = clock - self.lateness
        # The window drops what falls below the floor lazily: when full (here) and when read
        # (snapshot); the floor only rises, so what it holds above the floor is the same.
        if len(window) == self.window_identities:
            self._prune_window(floor)
            if len(window) == self.window_identities and not self._window_full_logged:
                self._window_full_logged = True
                cap = self.window_identities
                log.warning("more than %d events within the allowed lateness (%.1f s of time_us): checkpoints "
                            "keep the newest %d identities, so a resume may produce older ones of that window "
                            "again (the sinks de-duplicate them)", cap, self.lateness / 1e6, cap)
        window.append((c, fp))
        if self._restored and self._restored_at < floor:
            self._restored = []
        if self._legacy and self._legacy_at < floor:
            self._legacy = frozenset()
        if (self._elapsed - self._current_start >= self._width or len(current) >= self._bucket_cap
                or self._count > self.max_identities):
            self._rotate()

    def _prune_window(self, floor: int) -> None:
        """Drop the window's identities whose cursor is below ``floor``."""
        window = self._window
        while window and window[0][0] < floor:
            window.popleft()

    def _rotate(self) -> None:
        """Seal the filling set, and forget the sets older than the hold (or over the cap)."""
        now = self._elapsed
        if self._current:
            self._sealed.append((now, self._current))
            self._current = set()
        self._current_start = now
        floor = now - self.hold
        sealed = self._sealed
        while sealed and (sealed[0][0] < floor or self._count > self.max_identities):
            at, ids = sealed.popleft()
            self._count -= len(ids)
            if at >= floor and not self._capped:
                self._capped = True
                log.warning("more than %d identities in %.0f s of event time: a failover may repeat "
                            "events older than %.0f s (the sinks de-duplicate them)", self.max_identities,
                            self.hold / 1e6, (now - at) / 1e6)

    # ------------------------------------------------------------------ checkpoints

    def snapshot(self) -> dict[str, Any]:
        """JSON state: the cursors, the instance, and identities as base64 8-byte hashes."""
        if self.clock is not None:
            self._prune_window(self.clock - self.lateness)
        window = {fp for _, fp in self._window}
        for fp in reversed(self._restored):  # the restored window's newest first, within the cap
            if len(window) >= self.window_identities:
                break
            window.add(fp)
        held: list[int] = []
        room = self.checkpoint_identities
        if room:
            for ids in (self._current, *(s for _, s in reversed(self._sealed))):
                for fp in ids:
                    if fp not in window:
                        held.append(fp)
                        if len(held) >= room:
                            break
                if len(held) >= room:
                    break
        out: dict[str, Any] = {"v": VERSION, "cursor": self.max_cursor, "instance": self.instance,
                               "clock": self.clock, "lateness": self.lateness,
                               "failover_rewind": self.failover_rewind,
                               "window": _pack(sorted(window)), "held": _pack(held)}
        if self._legacy:
            out["legacy"] = sorted(fp.hex() for fp in self._legacy)
            out["legacy_at"] = self._legacy_at
        return out

    @classmethod
    def restore(cls, state: dict[str, Any] | None, lateness: int = 1_000_000,
                failover_rewind: int = FAILOVER_REWIND_US, **kw: Any) -> JetstreamPosition:
        """Rebuild from :meth:`snapshot` output, or from a StreamPosition's (None: a fresh position)."""
        pos = cls(lateness, failover_rewind, **kw)
        if not state or state.get("cursor") is None:
            return pos
        cursor = int(state["cursor"])
        pos.max_cursor = cursor
        if state.get("v") != VERSION:
            # The earlier format: its fingerprints include time_us; its instance was not recorded.
            pos.clock = cursor
            pos._legacy = frozenset(bytes.fromhex(h) for h in state.get("window", []))
            pos._legacy_at = cursor
            return pos
        clock = state.get("clock")
        pos.clock = int(clock) if clock is not None else cursor
        pos.instance = state.get("instance")
        pos._restored = _unpack(state.get("window"))[-pos.window_identities:]
        pos._restored_at = pos.clock
        ids = set(pos._restored)
        ids.update(_unpack(state.get("held")))
        if ids:
            pos._sealed.append((0, ids))
            pos._count = len(ids)
        if state.get("legacy"):
            pos._legacy = frozenset(bytes.fromhex(h) for h in state["legacy"])
            pos._legacy_at = int(state.get("legacy_at", cursor))
        return pos

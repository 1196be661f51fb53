"""The Jetstream v2 live tail: ``network.bsky.jetstream.subscribeEvents`` over a websocket.

Two layers:

* :func:`decode_frame` is pure (no sockets, no clock): one websocket message (a JSON text frame, or a
  binary frame holding one zstd frame made with the instance's dictionary whose content is exactly
  that text) becomes a :class:`LiveRow` (an event, a :class:`~runtime.contract.records.SyncEvent` for ``#sync``
  with its ``seq``), a :class:`RowSkip` (a row the filter rejects), an :class:`Info` (``#info``, such as
  ``OutdatedCursor``), an :class:`UnknownFrame` (a ``$type`` this version does not know), an
  :class:`ErrorFrame` (terminal: ``ConsumerTooSlow``, ``InternalError``) or a
  :class:`~producers.source.Drop` (malformed JSON, bad fields, an oversize or undecodable frame).
  A row comes out exactly as :func:`producers.jetstream.archive.decode_row` makes the same archive
  row: the row's fields go through ``decode_row`` itself (a create's or update's ``record`` and
  ``cid`` are the frame's: the server made them from the payload the archive row holds; an identity,
  account or sync body is turned back into the DAG-CBOR the archive row carries and decoded by the
  relay decoder). ``cursor`` is the row's ``seq``; ``time_us`` is the frame's ``time``, which the server
  writes from the row's ``indexed_at`` or else ``witnessed_at``, as the archive decoder chooses.
  Filtering is exact, with the same :class:`~producers.jetstream.archive.RowFilter` as archive rows.
  One difference is unavoidable: a frame does not say whether its ``time`` is the row's imported
  ``indexed_at`` or its ``witnessed_at``, so a live event's ``witnessed_at`` and ``indexed_at`` are None
  (unknown); every other field is the archive event's.

* :class:`LiveTail` holds the connection: ``cursor`` (inclusive), ``kinds``, ``dids``, ``collections``,
  ``maxMessageSizeBytes`` and ``zstdDictionary`` in the query, subprotocol ``xrpc.v1.json``.
  :meth:`LiveTail.rows` yields the rows after a seq in seq order, dropping every seq at or below the
  highest one seen (delivery is at least once, across reconnects too). A dropped connection or a
  terminal error frame reconnects with ``cursor = last + 1`` after a jittered backoff (250 ms doubling
  to 30 s). Pre-upgrade 400s: ``CursorTooOld`` raises :class:`CursorTooOldError` (the caller goes back
  to the archive), ``UnknownZstdDictionary`` refetches the dictionary once and retries, then goes
  uncompressed, ``InvalidRequest`` raises :class:`LiveRequestError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import re
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI, PayloadTooBig

from producers.firehose.decode import parse_time_us
from producers.jetstream.archive import ALL, ORIGIN, Item, RowFilter, decode_row
from producers.jetstream.decode import MAX_DECOMPRESSED, Decompressor
from producers.jetstream.v2client import normalize_base_url
from producers.source import Drop, Skip, WebsocketHolder
from runtime.atproto import dagcbor
from runtime.atproto.cid import CID
from runtime.atproto.errors import AtprotoFormatError
from runtime.atproto.segment import (
    KIND_ACCOUNT,
    KIND_CREATE,
    KIND_DELETE,
    KIND_IDENTITY,
    KIND_SYNC,
    KIND_UPDATE,
    Row,
    zstd_dictionary_id,
)
from runtime.contract.records import RecordEvent
from runtime.errors import ConfigError, DecodeError, DropError, SourceError

log = logging.getLogger(__name__)

METHOD: Final = "network.bsky.jetstream.subscribeEvents"
PATH: Final = f"/xrpc/{METHOD}"
SUBPROTOCOL: Final = "xrpc.v1.json"
#: Server-side filter limits of ``subscribeEvents`` (past them the filter is applied client-side only).
MAX_SERVER_DIDS: Final = 10_000
MAX_SERVER_COLLECTIONS: Final = 100
#: A request line longer than this is refused by common servers (8 KiB): filters that would not fit
#: in the URL are applied client-side only (DIDs go first, then collections).
MAX_URL_LENGTH: Final = 8000
#: A ``cursor`` at or above this is read by the server as unix microseconds, not a seq.
TIME_CURSOR_MIN: Final = 10**15
BACKOFF_INITIAL: Final = 0.25
BACKOFF_MAX: Final = 30.0
#: After this many oversize closes at the same cursor, the cursor steps past the message.
_OVERSIZE_REPEATS: Final = 3
_ROW_KINDS: Final = {"identity": KIND_IDENTITY, "account": KIND_ACCOUNT, "sync": KIND_SYNC}
_OPERATIONS: Final = {"create": KIND_CREATE, "update": KIND_UPDATE, "delete": KIND_DELETE}
_LONG_END: Final = 1 << 63
_FLOOR: Final = re.compile(r"floor\D{0,40}?(\d+)")


# ------------------------------------------------------------------------------------------ errors


class CursorTooOldError(SourceError):
    """``subscribeEvents`` refused the cursor: it is below the retention floor (about 36 h).

    Attributes:
        cursor: the refused cursor (inclusive seq).
        floor: the floor seq when the server's message gives it, else None.
    """

    def __init__(self, message: str, *, cursor: int | None, floor: int | None) -> None:
        super().__init__(message)
        self.cursor = cursor
        self.floor = floor


class LiveRequestError(ConfigError):
    """``subscribeEvents`` refused the request itself (``InvalidRequest``, authentication, no such method):
    retrying cannot help.

    Attributes:
        error: the XRPC error name; message: the server's message.
    """

    def __init__(self, error: str, message: str) -> None:
        super().__init__(f"subscribeEvents refused the request ({error}): {message}")
        self.error = error
        self.message = message


# ------------------------------------------------------------------------------------------ frames


@dataclass(slots=True)
class LiveRow:
    """A row of the stream: its ``seq`` and what it decodes to (exactly as the archive row would)."""

    seq: int
    item: Item


@dataclass(slots=True)
class RowSkip(Skip):
    """A well-formed row not delivered: ``filtered`` (the filter), ``before_cursor`` / ``after_end`` (the
    filter's seq window), ``duplicate`` (at or below the last seq delivered)."""

    seq: int = -1


@dataclass(slots=True, frozen=True)
class Info:
    """An ``#info`` frame (``OutdatedCursor``: the cursor was clamped to the retention floor)."""

    name: str
    message: str | None


@dataclass(slots=True, frozen=True)
class UnknownFrame:
    """A frame or message ``$type`` this version does not know (skipped, counted)."""

    type: str


@dataclass(slots=True, frozen=True)
class ErrorFrame:
    """A terminal error frame (``ConsumerTooSlow``, ``InternalError``): the server closes; reconnect."""

    error: str
    message: str | None


LiveFrame = LiveRow | RowSkip | Info | UnknownFrame | ErrorFrame | Drop
#: A zstd dictionary: its bytes, or ``(id, bytes)`` as ``getZstdDictionary`` answers (the id from its header).
Dictionary = bytes | tuple[int, bytes]


def dictionary_id(dictionary: bytes) -> int:
    """The id of a zstd dictionary: the little-endian u32 after the magic ``0xEC30A437``.

    Raises:
        ConfigError: not a zstd dictionary.
    """
    found = zstd_dictionary_id(dictionary)
    if found is None:
        raise ConfigError("not a zstd dictionary (bad magic)")
    return found


def _seq(payload: dict[str, Any]) -> int:
    seq = payload.get("seq")
    if type(seq) is not int or not 0 <= seq < _LONG_END:
        raise DecodeError("malformed_frame", f"seq is {type(seq).__name__}, expected a non-negative integer")
    return seq


def _str(payload: dict[str, Any], key: str, name: str) -> str:
    value = payload.get(key)
    if type(value) is not str:
        raise DecodeError("malformed_frame", f"#{name}.{key} is {type(value).__name__}, expected a string")
    return value


def _live_times(item: Item) -> Item:
    """``witnessed_at``/``indexed_at`` unknown: a frame's ``time`` is the row's ``indexed_at`` or, when it has
    none, its ``witnessed_at``, and nothing says which."""
    for name in ("witnessed_at", "indexed_at"):
        if hasattr(item, name):
            setattr(item, name, None)
    return item


def _filtered(flt: RowFilter, row: Row) -> RowSkip | None:
    if flt.wants(row):
        return None
    if row.seq <= flt.after_seq:
        return RowSkip("before_cursor", seq=row.seq)
    if flt.before_seq is not None and row.seq > flt.before_seq:
        return RowSkip("after_end", seq=row.seq)
    return RowSkip("filtered", seq=row.seq)


def _row(payload: dict[str, Any], name: str, seq: int, job: str, flt: RowFilter) -> LiveRow | RowSkip:
    """A ``#commit``/``#identity``/``#account``/``#sync`` payload as the archive decoder makes its row.

    Raises:
        DropError: bad fields (``malformed_frame``, ``invalid_record``, ``bad_cid``, ...).
    """
    did = _str(payload, "did", name)
    time_us = parse_time_us(payload.get("time"))
    if name == "commit":
        op = _str(payload, "operation", name)
        kind = _OPERATIONS.get(op)
        if kind is None:
            raise DecodeError("malformed_frame", f"#commit.operation is {op[:40]!r}")
        rev = payload.get("rev")
        if rev is not None and type(rev) is not str:
            raise DecodeError("malformed_frame", "#commit.rev is not a string")
        collection, rkey = _str(payload, "collection", name), _str(payload, "rkey", name)
        # the row without its payload: a delete's shape, which decode_row checks and builds
        skeleton = Row(seq, time_us, 0, KIND_DELETE, collection, did, rkey, rev or "", b"")
        skip = _filtered(flt, skeleton if kind == KIND_DELETE else skeleton._replace(kind=kind))
        if skip is not None:
            return skip
        event = _live_times(decode_row(skeleton, job=job))
        if kind == KIND_DELETE:
            return LiveRow(seq, event)
        record = payload.get("record")
        if record is None:
            raise DropError("missing_block", f"row {seq}: {op} of {collection}/{rkey} without a record")
        if type(record) is not dict:
            raise DropError("invalid_record", f"row {seq}: record is {type(record).__name__}, expected an object")
        cid = payload.get("cid")
        if type(cid) is not str:
            raise DecodeError("bad_cid", f"row {seq}: {op} of {collection}/{rkey} without a CID string")
        try:
            CID.from_str(cid)
        except AtprotoFormatError as e:
            raise DropError("bad_cid", f"row {seq}: {e}") from e
        assert isinstance(event, RecordEvent)
        return LiveRow(seq, dataclasses.replace(event, operation=op, cid=cid, record=record))
    kind = _ROW_KINDS[name]
    row = Row(seq, time_us, 0, kind, "", did, "", "", b"")
    skip = _filtered(flt, row)
    if skip is not None:
        return skip
    body = payload.get(name)
    if type(body) is not dict:
        raise DecodeError("malformed_frame", f"#{name}.{name} is {type(body).__name__}, expected an object")
    try:
        cbor = dagcbor.encode(dagcbor.from_json_form(body))
    except AtprotoFormatError as e:
        raise DropError(e.reason, f"row {seq}: #{name} body: {e}") from e
    return LiveRow(seq, _live_times(decode_row(row._replace(payload=cbor), job=job)))


def decode_frame(data: bytes | str, *, decompressor: Decompressor | None, job: str = "",
                 flt: RowFilter = ALL, max_size: int = MAX_DECOMPRESSED) -> LiveFrame:
    """One ``subscribeEvents`` websocket message, decoded.

    Args:
        data: a text frame, or a binary frame (one zstd frame made with the dictionary).
        decompressor: for binary frames (None: a binary frame is a ``decompress_failed`` drop).
        job: written into the events.
        flt: the rows wanted (the rest come back as :class:`RowSkip`).
        max_size: the largest JSON text accepted, decompressed (past it: an ``oversize`` drop).

    Never raises on bad input: a bad frame is a :class:`~producers.source.Drop` (``cursor`` = its seq when
    it has one).
    """
    raw = data
    seq: int | None = None
    did: str | None = None
    try:
        if not isinstance(data, str):
            if decompressor is None:
                raise DecodeError("decompress_failed", "a binary frame, and no zstd dictionary was asked for")
            data = decompressor.decompress(bytes(data))
        if len(data) > max_size:
            raise DecodeError("oversize", f"frame of {len(data)} bytes (cap {max_size})")
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise DecodeError("malformed_json", str(e)) from e
        if type(obj) is not dict:
            raise DecodeError("malformed_frame", f"frame is {type(obj).__name__}, expected an object")
        top = obj.get("$type")
        if top == "error":
            error, message = obj.get("error"), obj.get("message")
            return ErrorFrame(error if type(error) is str else "Unknown", message if type(message) is str else None)
        if top != "message":
            return UnknownFrame(str(top)[:200])
        payload = obj.get("payload")
        if type(payload) is not dict:
            raise DecodeError("malformed_frame", "message frame without a payload object")
        ptype = payload.get("$type")
        if type(ptype) is not str:
            raise DecodeError("malformed_frame", "payload without a $type")
        method, _, name = ptype.rpartition("#")
        if method not in ("", METHOD):
            return UnknownFrame(ptype[:200])
        if name == "info":
            info_name, message = payload.get("name"), payload.get("message")
            if type(info_name) is not str:
                raise DecodeError("malformed_frame", "#info.name is not a string")
            return Info(info_name, message if type(message) is str else None)
        if name != "commit" and name not in _ROW_KINDS:
            return UnknownFrame(ptype[:200])
        seq = _seq(payload)
        did = payload.get("did") if type(payload.get("did")) is str else None
        return _row(payload, name, seq, job, flt)
    except DropError as e:
        body = raw.encode() if isinstance(raw, str) else bytes(raw)
        return Drop(e.reason, e.detail, body[:max_size], ORIGIN, did, seq)


# -------------------------------------------------------------------------------------------- tail


def subscribe_url(base: str) -> str:
    """The ``subscribeEvents`` websocket URL of an instance root (``ws``, ``wss``, ``http`` or ``https``).

    Raises:
        ConfigError: another scheme, or no host.
    """
    parts = urlsplit(normalize_base_url(base))
    return urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc, parts.path + PATH, "", ""))


def _server_patterns(flt: RowFilter) -> list[str] | None:
    """The collection patterns to send (None: none can be sent, filter client-side only)."""
    if flt.collections is None:
        return []
    patterns = list(flt.collections.patterns)
    if len(patterns) > MAX_SERVER_COLLECTIONS or any("*" in p[:-2] or (p.endswith("*") and not p.endswith(".*"))
                                                      for p in patterns):
        return None
    return patterns


class LiveTail(WebsocketHolder):
    """The live tail of one Jetstream v2 instance.

    Args:
        base: the instance root (``wss://host``, ``https://host``, ``http://127.0.0.1:8080``) or the
            full ``subscribeEvents`` URL.
        flt: the rows wanted: sent to the server where it can take them, always applied exactly here.
        collections, dids, kinds: the filter as option values (when ``flt`` is not given; see
            :meth:`RowFilter.of <producers.jetstream.archive.RowFilter.of>`).
        dictionary: the instance's zstd dictionary (``getZstdDictionary``; bytes or ``(id, bytes)``): ask
            for compressed frames.
        refetch_dictionary: called (once per refusal) when the server does not know the dictionary's id;
            returns the current dictionary.
        max_message_size: ``maxMessageSizeBytes`` for the server (0 = none) and the client's cap.
        api_key: sent as ``Authorization: Bearer``.
        job: written into the events.
        open_timeout, close_timeout, max_queue, ping_interval, ping_timeout: of the websocket client.
        backoff_initial, backoff_max: the reconnect backoff (doubling, jittered).
        max_failures: give up (``SourceError``) after this many consecutive failed connects (0 = never).
        on_reconnect: called at each connection after the first.
        sleep, rng, connector: injected for tests.
    """

    name = "jetstream2"

    def __init__(self, base: str, *, flt: RowFilter | None = None, collections: Iterable[str] = (),
                 dids: Iterable[str] = (), kinds: Iterable[str] = (), dictionary: Dictionary | None = None,
                 refetch_dictionary: Callable[[], Awaitable[Dictionary]] | None = None, max_message_size: int = 0,
                 api_key: str | None = None, job: str = "", open_timeout: float = 15.0,
                 close_timeout: float = 2.0, max_queue: int | None = None, ping_interval: float | None = 20.0,
                 ping_timeout: float | None = 20.0, backoff_initial: float = BACKOFF_INITIAL,
                 backoff_max: float = BACKOFF_MAX, max_failures: int = 0,
                 on_reconnect: Callable[[], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, rng: random.Random | None = None,
                 connector: Callable[..., Any] = connect) -> None:
        if max_message_size < 0:
            raise ConfigError("max_message_size must be non-negative")
        self.url = subscribe_url(base)
        self.flt = flt if flt is not None else RowFilter.of(collections=collections, dids=dids, kinds=kinds)
        self.job = job
        self.api_key = api_key
        self.max_message_size = max_message_size
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.max_queue = max_queue
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_failures = max_failures
        self.on_reconnect = on_reconnect
        self._refetch = refetch_dictionary
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._connector = connector
        self._dict_id: int | None = None
        self._decompressor: Decompressor | None = None
        self._set_dictionary(dictionary)
        self._ws: ClientConnection | None = None
        self._closing = False
        #: The highest seq seen (delivered, skipped or dropped); None before the first.
        self.last_seq: int | None = None
        self.connects = 0
        self.reconnects = 0
        self.infos: Counter[str] = Counter()
        self.unknown_types: Counter[str] = Counter()
        self.error_frames: Counter[str] = Counter()

    @property
    def compressed(self) -> bool:
        """Whether compressed frames are asked for."""
        return self._decompressor is not None

    def _set_dictionary(self, dictionary: Dictionary | None) -> None:
        if isinstance(dictionary, tuple):
            dict_id, data = dictionary
        else:
            data = dictionary or b""
            dict_id = dictionary_id(data) if data else 0
        self._dict_id = dict_id if data else None
        self._decompressor = Decompressor(data) if data else None

    def query(self, cursor: int | None) -> str:
        """The query string of a connection from ``cursor`` (inclusive; None = the live tip)."""
        flt = self.flt
        params: list[tuple[str, str]] = []
        if cursor is not None:
            params.append(("cursor", str(cursor)))
        kinds = sorted(flt.kinds) if flt.kinds is not None else []
        params += [("kinds", k) for k in kinds]
        collections = _server_patterns(flt)
        if collections and (not kinds or "commit" in kinds):
            params += [("collections", c) for c in collections]
        if self.max_message_size:
            params.append(("maxMessageSizeBytes", str(self.max_message_size)))
        if self._dict_id is not None:
            params.append(("zstdDictionary", str(self._dict_id)))
        dids = sorted(flt.dids) if flt.dids is not None and len(flt.dids) <= MAX_SERVER_DIDS else []
        with_dids = params + [("dids", d) for d in dids]
        if len(self.url) + 1 + len(urlencode(with_dids)) <= MAX_URL_LENGTH:
            return urlencode(with_dids)
        if len(self.url) + 1 + len(urlencode(params)) > MAX_URL_LENGTH:
            params = [(k, v) for k, v in params if k != "collections"]
        return urlencode(params)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(attempt, 30))
        return float(ceiling * (0.5 + 0.5 * self._rng.random()))

    async def aclose(self) -> None:
        """Stop: close the connection; :meth:`rows` returns."""
        self._closing = True
        await super().aclose()

    def _refusal(self, e: InvalidStatus, cursor: int | None) -> tuple[str, str]:
        """``(error, message)`` of a pre-upgrade refusal; raises the fatal ones.

        Raises:
            CursorTooOldError: ``CursorTooOld``.
            LiveRequestError: ``InvalidRequest`` or another 4xx but 408/429.
        """
        status = e.response.status_code
        error, message = f"HTTP{status}", ""
        with contextlib.suppress(orjson.JSONDecodeError, TypeError):
            obj = orjson.loads(e.response.body or b"")
            if type(obj) is dict:
                e_name, e_text = obj.get("error"), obj.get("message")
                error = e_name if type(e_name) is str else error
                message = e_text if type(e_text) is str else message
        if error == "CursorTooOld":
            m = _FLOOR.search(message)
            raise CursorTooOldError(f"cursor {cursor} is too old: {message}", cursor=cursor,
                                    floor=int(m.group(1)) if m else None)
        if error == "UnknownZstdDictionary":
            return error, message
        if 400 <= status < 500 and status not in (408, 429):
            raise LiveRequestError(error, message)
        return error, message

    async def rows(self, after_seq: int | None = None) -> AsyncGenerator[LiveRow | Skip | Drop, None]:
        """Rows with ``seq > after_seq`` in seq order (None: from the live tip), each once, plus the skips
        and drops; reconnects until :meth:`aclose`.

        Raises:
            CursorTooOldError: the server no longer holds the rows after ``after_seq`` (or after the last
                seq seen, on a reconnect).
            LiveRequestError: the server refused the request.
            SourceError: ``max_failures`` consecutive connects failed.
        """
        if after_seq is not None and after_seq + 1 >= TIME_CURSOR_MIN:
            raise ConfigError(f"seq {after_seq} would be read as a time cursor")
        self.last_seq = after_seq
        self._closing = False
        attempt = 0  # reconnects since the last row: the backoff's exponent
        failures = 0  # consecutive failed connects
        refetched = False
        oversize_at: tuple[int | None, int] = (None, 0)
        limit = self.max_message_size + 65536 if self.max_message_size else MAX_DECOMPRESSED
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        while not self._closing:
            cursor = None if self.last_seq is None else self.last_seq + 1
            if oversize_at[1] >= _OVERSIZE_REPEATS and oversize_at[0] == cursor and cursor is not None:
                log.warning("skipping past an oversize message at cursor %d", cursor)
                cursor += 1
            url = f"{self.url}?{self.query(cursor)}"
            try:
                async with self._connector(url, subprotocols=[SUBPROTOCOL], additional_headers=headers,
                                           max_size=limit, max_queue=self.max_queue,
                                           open_timeout=self.open_timeout, close_timeout=self.close_timeout,
                                           ping_interval=self.ping_interval, ping_timeout=self.ping_timeout,
                                           compression=None, user_agent_header="atproto-backfill") as ws:
                    self._ws = ws
                    failures = 0
                    self.connects += 1
                    if self.connects > 1:
                        self.reconnects += 1
                        if self.on_reconnect is not None:
                            self.on_reconnect()
                    if self._decompressor is not None:
                        refetched = False
                    log.info("subscribed to %s (cursor %s, %s)", self.url, cursor,
                             "compressed" if self._decompressor is not None else "uncompressed")
                    decompressor, job, flt = self._decompressor, self.job, self.flt
                    max_size = self.max_message_size or MAX_DECOMPRESSED
                    async for message in ws:
                        frame = decode_frame(message, decompressor=decompressor, job=job, flt=flt,
                                             max_size=max_size)
                        last = self.last_seq
                        if type(frame) is LiveRow or type(frame) is RowSkip:
                            attempt = 0
                            if last is not None and frame.seq <= last:
                                yield RowSkip("duplicate", seq=frame.seq)
                                continue
                            self.last_seq = frame.seq
                            yield frame
                        elif type(frame) is Drop:
                            if frame.cursor is not None:
                                if last is not None and frame.cursor <= last:
                                    yield RowSkip("duplicate", seq=frame.cursor)
                                    continue
                                self.last_seq = frame.cursor
                            yield frame
                        elif type(frame) is Info:
                            self.infos[frame.name] += 1
                            log.warning("%s: %s: %s", self.url, frame.name, frame.message)
                        elif type(frame) is UnknownFrame:
                            self.unknown_types[frame.type] += 1
                            yield Skip("unknown_type")
                        elif type(frame) is ErrorFrame:
                            self.error_frames[frame.error] += 1
                            log.warning("%s sent error %s (%s); reconnecting", self.url, frame.error, frame.message)
                            break
                    if not self._closing:
                        log.info("%s closed the stream; reconnecting", self.url)
            except InvalidStatus as e:
                error, message = self._refusal(e, cursor)
                if error == "UnknownZstdDictionary" and self._decompressor is not None:
                    if not refetched and self._refetch is not None:
                        refetched = True
                        try:
                            self._set_dictionary(await self._refetch())
                            log.info("refetched the zstd dictionary (id %s)", self._dict_id)
                            continue
                        except Exception as err:  # noqa: BLE001 - any failure: go uncompressed
                            log.warning("cannot refetch the zstd dictionary (%s)", err)
                    log.warning("%s does not know the zstd dictionary (%s); going uncompressed", self.url, message)
                    self._set_dictionary(None)
                    continue
                failures += 1
                log.warning("%s refused the subscription (%s: %s); attempt %d", self.url, error, message, failures)
                self._give_up(failures, f"{error}: {message}")
            except PayloadTooBig as e:
                oversize_at = self._oversize(oversize_at, cursor)
                yield Drop("oversize", f"message over the size limit: {e}", b"", ORIGIN, cursor=cursor)
            except ConnectionClosed as e:
                codes = {c.code for c in (e.rcvd, e.sent) if c is not None}
                if 1009 in codes:
                    oversize_at = self._oversize(oversize_at, cursor)
                    yield Drop("oversize", f"message over the size limit: {e}", b"", ORIGIN, cursor=cursor)
                elif not self._closing:
                    log.warning("%s connection closed: %s; reconnecting", self.url, e)
            except (OSError, InvalidHandshake, TimeoutError, InvalidURI) as e:
                failures += 1
                log.warning("cannot connect to %s (%s); attempt %d", self.url, e, failures)
                self._give_up(failures, str(e))
            finally:
                self._ws = None
            if self._closing:
                return
            await self._sleep(self._backoff(attempt))
            attempt += 1

    @staticmethod
    def _oversize(at: tuple[int | None, int], cursor: int | None) -> tuple[int | None, int]:
        return cursor, at[1] + 1 if at[0] == cursor else 1

    def _give_up(self, failures: int, detail: str) -> None:
        if self.max_failures and failures >= self.max_failures:
            raise SourceError(f"{self.url}: {failures} connects failed in a row; last: {detail}")


__all__ = [
    "METHOD",
    "SUBPROTOCOL",
    "CursorTooOldError",
    "Dictionary",
    "ErrorFrame",
    "Info",
    "LiveFrame",
    "LiveRequestError",
    "LiveRow",
    "LiveTail",
    "RowSkip",
    "UnknownFrame",
    "decode_frame",
    "dictionary_id",
    "subscribe_url",
]

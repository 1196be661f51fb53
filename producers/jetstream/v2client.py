"""An HTTP client for a Jetstream v2 ("Network Replay") instance's sealed archive.

The archive endpoints are XRPC methods under ``/xrpc/network.bsky.jetstream.*``: ``listSegments``,
``planSnapshot``, ``getSegment``, ``getBlock`` and ``getZstdDictionary`` (see ``/work/shared/JETSTREAM-V2.md``).
:class:`ArchiveClient` speaks them over one ``httpx.AsyncClient``:

* every call is retried: ``503`` (not ready) and ``429`` wait ``Retry-After`` seconds (capped at
  ``backoff_max``; without the header they back off like a 5xx), other 5xx, timeouts and dropped
  connections (including a body cut short) back off exponentially with full jitter, up to ``max_attempts``
  tries in all; then :class:`ArchiveUnavailableError`;
* a 4xx other than 429 is not retried: :class:`ArchiveAuthError` for 401/403 (a wrong or missing API key),
  else :class:`ArchiveError` carrying the XRPC ``error`` name and ``message`` (``SegmentNotFound``,
  ``InvalidRequest``, ``DictionaryNotFound``, ...);
* every response body is read under a cap (JSON answers 16 MiB, blocks 64 MiB, segments
  ``max_segment_bytes``), so a hostile server cannot exhaust memory; an answer that is not what the
  protocol promises raises :class:`ArchiveProtocolError`;
* whole segments are downloaded as parallel HTTP Range stripes pinned to one ETag with ``If-Range``
  (:meth:`ArchiveClient.get_segment`).

Nothing is logged per request: ``on_request(endpoint, status, seconds, bytes)`` is called once per HTTP
exchange (status 0 when no response arrived) for metrics.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import mmap
import random
import re
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from runtime.atproto.segment import SegmentError, zstd_dictionary_id
from runtime.atproto.segment import parse_header as parse_segment_header
from runtime.errors import ConfigError, SourceError

log = logging.getLogger(__name__)

T = TypeVar("T")

NSID_PREFIX: Final = "network.bsky.jetstream."
XRPC_PATH: Final = "/xrpc/" + NSID_PREFIX
MiB: Final = 1 << 20
#: Cap on a JSON answer (listSegments and planSnapshot pages) and on a dictionary.
MAX_JSON_BYTES: Final = 16 * MiB
#: Cap on one ``getBlock`` answer (a stored zstd frame).
MAX_BLOCK_BYTES: Final = 64 * MiB
#: Cap on the part of an error answer that is read (for its XRPC ``error`` and ``message``).
MAX_ERROR_BYTES: Final = 64 * 1024
#: How many times :meth:`ArchiveClient.get_segment` starts a segment over after it changed under it.
MAX_SEGMENT_RESTARTS: Final = 3
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+)\s*$", re.IGNORECASE)
_CHECKSUM = re.compile(r"^[0-9a-f]{16}$")
_USER_AGENT: Final = "atproto-backfill (jetstream v2 archive client)"

OnRequest = Callable[[str, int, float, int], None]


# ---------------------------------------------------------------------------------------- errors


class ArchiveError(SourceError):
    """A Jetstream v2 archive request failed.

    Attributes:
        endpoint: the XRPC method (``getSegment``, ...).
        status: the HTTP status of the (last) answer; None when no answer arrived.
        error: the XRPC ``error`` name of the answer's body (``SegmentNotFound``, ...); None without one.
        message: the XRPC ``message``, or other context.
        retryable: True when repeating later (or re-planning) may succeed.
    """

    def __init__(self, endpoint: str, status: int | None, error: str | None, message: str, *,
                 retryable: bool = False) -> None:
        parts = [f"{endpoint}"]
        if status is not None:
            parts.append(f"answered {status}")
        if error:
            parts.append(error)
        super().__init__(f"{' '.join(parts)}: {message}")
        self.endpoint = endpoint
        self.status = status
        self.error = error
        self.message = message
        self.retryable = retryable


class ArchiveAuthError(ArchiveError):
    """401 or 403: the API key (``--api-key``) is missing or wrong."""


class ArchiveProtocolError(ArchiveError):
    """An answer that is not what the protocol promises: a body that is not the expected JSON, a missing
    or malformed header, a range that does not fit, a body over its cap."""


class ArchiveUnavailableError(ArchiveError):
    """The retries ran out (503, 429, 5xx, timeouts, dropped connections); ``retryable`` is True."""


class SegmentChangedError(ArchiveError):
    """A segment kept changing (compaction rewrites it: a new checksum and ETag) while it was fetched, or a
    block was asked of a segment that is no longer the planned one; re-plan. ``retryable`` is True."""


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True, slots=True)
class SegmentListing:
    """One ``listSegments`` item: a sealed segment and its seq and witnessed-time bounds (unix µs)."""

    name: str
    index: int
    size_bytes: int
    checksum: str
    event_count: int
    min_seq: int
    max_seq: int
    min_witnessed_at: int
    max_witnessed_at: int


@dataclass(frozen=True, slots=True)
class PlanUnit:
    """One unit of a ``planSnapshot`` page: a whole segment (``mode == "segment"``, ``blocks`` empty) or
    inclusive ``(first, last)`` block index ranges of it (``mode == "blocks"``)."""

    name: str
    index: int
    checksum: str
    min_seq: int
    max_seq: int
    mode: Literal["segment", "blocks"]
    blocks: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class PlanPage:
    """One ``planSnapshot`` page: it covers seqs ``(afterSeq, planned_through_seq]``; ``sealed_tip_seq`` is
    the sealed tip (capped by ``beforeSeq``). Page on until ``planned_through_seq >= sealed_tip_seq``."""

    units: tuple[PlanUnit, ...]
    sealed_tip_seq: int
    planned_through_seq: int


@dataclass(frozen=True, slots=True)
class FetchedSegment:
    """A whole sealed segment file and the checksum of the version that was downloaded (its ETag)."""

    name: str
    checksum: str
    #: the file: bytes, or for a segment past ``spool_bytes`` a read-only map of a temporary file (its
    #: pages are the page cache's, not the process heap's; unmapped when the last reference goes).
    data: bytes | mmap.mmap

    def __repr__(self) -> str:
        return f"FetchedSegment(name={self.name!r}, checksum={self.checksum!r}, {len(self.data)} bytes)"


# -------------------------------------------------------------------------------------- internals


class _RetryableError(Exception):
    """One attempt to repeat after ``delay`` seconds (None: back off with jitter)."""

    def __init__(self, status: int | None, detail: str, delay: float | None = None, error: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.delay = delay
        self.error = error


class _SegmentChangedError(Exception):
    """A stripe saw another version of the segment (``checksum``; None when its ETag was unusable)."""

    def __init__(self, checksum: str | None) -> None:
        super().__init__(checksum)
        self.checksum = checksum


class _Meter:
    """Counts the body bytes one exchange read (for ``on_request``)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def normalize_base_url(url: str) -> str:
    """The instance's ``http(s)://host[:port][/prefix]`` root from an ``http``, ``https``, ``ws`` or ``wss``
    URL: ``ws`` maps to ``http`` and ``wss`` to ``https``; a path from ``/xrpc/`` on (a websocket URL such
    as ``wss://host/xrpc/network.bsky.jetstream.subscribeEvents``), the query and the fragment are dropped.

    Raises:
        ConfigError: another scheme, or no host.
    """
    parts = urlsplit(url.strip())
    scheme = {"http": "http", "https": "https", "ws": "http", "wss": "https"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ConfigError(f"Jetstream v2 URL {url!r}: expected http(s):// or ws(s):// and a host")
    path = parts.path
    cut = path.find("/xrpc/")
    if cut >= 0:
        path = path[:cut]
    return urlunsplit((scheme, parts.netloc, path.rstrip("/"), "", ""))


def parse_retry_after(value: str | None, wall: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds, or an HTTP date); None when absent or
    unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        return max(0.0, when.timestamp() - wall)
    return seconds if 0 <= seconds < float("inf") else None  # NaN and infinity are not waits


def _strong_etag_checksum(value: str | None, endpoint: str, status: int) -> str:
    """The checksum of a ``getSegment`` ETag (``"<16 hex>"``).

    Raises:
        ArchiveProtocolError: missing, weak or not a checksum.
    """
    text = (value or "").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"' and _CHECKSUM.match(text[1:-1]):
        return text[1:-1]
    raise ArchiveProtocolError(endpoint, status, None, f"ETag {value!r} is not a quoted 16-hex-digit checksum")


async def _read_capped(resp: httpx.Response, cap: int, meter: _Meter, endpoint: str, *,
                       what: str = "body") -> bytes:
    """The whole body, refusing more than ``cap`` bytes.

    Raises:
        ArchiveProtocolError: the declared or the actual length is over ``cap``.
    """
    declared = resp.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > cap:
        raise ArchiveProtocolError(endpoint, resp.status_code, None,
                                   f"{what} of {declared} bytes is over the cap of {cap}")
    out = bytearray()
    async for chunk in resp.aiter_bytes():
        out += chunk
        meter.n = len(out)
        if len(out) > cap:
            raise ArchiveProtocolError(endpoint, resp.status_code, None, f"{what} is over the cap of {cap} bytes")
    return bytes(out)


async def _read_error_body(resp: httpx.Response, meter: _Meter) -> bytes:
    """Up to :data:`MAX_ERROR_BYTES` of an error answer (the rest is dropped with the connection)."""
    out = bytearray()
    async for chunk in resp.aiter_bytes():
        out += chunk
        meter.n = len(out)
        if len(out) >= MAX_ERROR_BYTES:
            break
    return bytes(out[:MAX_ERROR_BYTES])


def _xrpc_error(body: bytes) -> tuple[str | None, str | None]:
    """``(error, message)`` of an XRPC error body; ``(None, None)`` when it is not one."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), str):
        return None, None
    message = obj.get("message")
    return obj["error"], message if isinstance(message, str) else ""


def _parse_json_object(body: bytes, endpoint: str) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ArchiveProtocolError(endpoint, 200, None, f"body is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ArchiveProtocolError(endpoint, 200, None, "body is not a JSON object")
    return obj


def _get(obj: dict[str, Any], key: str, kind: type[T], endpoint: str, where: str) -> T:
    """``obj[key]`` checked to be a ``kind`` (ints are never bools; ints are non-negative).

    Raises:
        ArchiveProtocolError: missing or of another type.
    """
    value = obj.get(key)
    ok = isinstance(value, kind) and not (kind is int and (isinstance(value, bool) or value < 0))  # type: ignore[operator]
    if not ok:
        raise ArchiveProtocolError(endpoint, 200, None, f"{where}: {key!r} is {value!r}, expected a {kind.__name__}")
    return value  # type: ignore[return-value]


def _listing(item: Any, endpoint: str) -> SegmentListing:
    if not isinstance(item, dict):
        raise ArchiveProtocolError(endpoint, 200, None, f"segment item {item!r} is not an object")
    w = "segment item"
    return SegmentListing(
        name=_get(item, "name", str, endpoint, w), index=_get(item, "index", int, endpoint, w),
        size_bytes=_get(item, "sizeBytes", int, endpoint, w), checksum=_get(item, "checksum", str, endpoint, w),
        event_count=_get(item, "eventCount", int, endpoint, w), min_seq=_get(item, "minSeq", int, endpoint, w),
        max_seq=_get(item, "maxSeq", int, endpoint, w),
        min_witnessed_at=_get(item, "minWitnessedAt", int, endpoint, w),
        max_witnessed_at=_get(item, "maxWitnessedAt", int, endpoint, w))


def _plan_unit(item: Any, endpoint: str) -> PlanUnit:
    if not isinstance(item, dict):
        raise ArchiveProtocolError(endpoint, 200, None, f"plan unit {item!r} is not an object")
    w = "plan unit"
    mode = item.get("mode")
    blocks: list[tuple[int, int]] = []
    if mode == "blocks":
        raw = item.get("blocks")
        if not isinstance(raw, list) or not raw:
            raise ArchiveProtocolError(endpoint, 200, None, f"{w} in blocks mode without block ranges: {raw!r}")
        for r in raw:
            if not isinstance(r, dict):
                raise ArchiveProtocolError(endpoint, 200, None, f"block range {r!r} is not an object")
            first, last = _get(r, "first", int, endpoint, "block range"), _get(r, "last", int, endpoint, "block range")
            if last < first:
                raise ArchiveProtocolError(endpoint, 200, None, f"block range {first}..{last} is reversed")
            blocks.append((first, last))
    elif mode != "segment":
        raise ArchiveProtocolError(endpoint, 200, None, f"{w} mode {mode!r} is neither segment nor blocks")
    min_seq, max_seq = _get(item, "minSeq", int, endpoint, w), _get(item, "maxSeq", int, endpoint, w)
    if max_seq < min_seq:
        raise ArchiveProtocolError(endpoint, 200, None, f"{w} seqs {min_seq}..{max_seq} are reversed")
    return PlanUnit(name=_get(item, "name", str, endpoint, w), index=_get(item, "index", int, endpoint, w),
                    checksum=_get(item, "checksum", str, endpoint, w), min_seq=min_seq, max_seq=max_seq,
                    mode=mode, blocks=tuple(blocks))


# ---------------------------------------------------------------------------------------- client


class ArchiveClient:
    """The archive endpoints of one Jetstream v2 instance.

    Args:
        base_url: the instance's root (``https://host``; ``ws://``/``wss://`` are mapped to ``http``/``https``,
            see :func:`normalize_base_url`).
        api_key: sent as ``Authorization: Bearer <api_key>`` on every request when set.
        timeout: seconds for connecting and between body bytes.
        max_attempts: tries of one request in all (the first included).
        backoff_base, backoff_max: full-jitter backoff: attempt ``k`` (from 1) waits a uniform
            ``[0, min(backoff_max, backoff_base * 2**(k-1))]``; ``Retry-After`` waits are capped at ``backoff_max``.
        stripes: Range requests in flight for one segment.
        stripe_bytes: the size of one Range request.
        max_segment_bytes: refuse a segment larger than this.
        sleep: how to wait (tests inject one that does not).
        rng: the jitter's randomness.
        on_request: called once per HTTP exchange with ``(endpoint, status, seconds, body bytes read)``;
            status 0 when no answer arrived (connection error, timeout); a request cancelled before its
            answer (the other stripes of a segment that changed) is not reported.
        client: an ``httpx.AsyncClient`` to use instead of one of its own (it is not closed by :meth:`aclose`).

    Raises:
        ConfigError: a bad URL or a non-positive setting.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 30.0, max_attempts: int = 8,
                 backoff_base: float = 0.25, backoff_max: float = 30.0, stripes: int = 4,
                 stripe_bytes: int = 8 * MiB, max_segment_bytes: int = 1 << 30, spool_bytes: int = 32 * MiB,
                 spool_dir: str | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, rng: random.Random | None = None,
                 on_request: OnRequest | None = None, client: httpx.AsyncClient | None = None) -> None:
        if max_attempts < 1 or stripes < 1 or stripe_bytes < 1 or max_segment_bytes < 1:
            raise ConfigError("max_attempts, stripes, stripe_bytes and max_segment_bytes must be positive")
        if timeout <= 0 or backoff_base < 0 or backoff_max < 0:
            raise ConfigError("timeout must be positive, backoff_base and backoff_max non-negative")
        self.base_url = normalize_base_url(base_url)
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stripes = stripes
        self.stripe_bytes = stripe_bytes
        self.max_segment_bytes = max_segment_bytes
        self.spool_bytes = spool_bytes
        self.spool_dir = spool_dir
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._on_request = on_request
        self._headers = {"user-agent": _USER_AGENT}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, pool=None), follow_redirects=False,
            limits=httpx.Limits(max_connections=max(16, stripes * 4), max_keepalive_connections=max(8, stripes * 2)))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client (when this client created it)."""
        if self._own_client:
            await self._client.aclose()

    def _url(self, endpoint: str) -> str:
        return f"{self.base_url}{XRPC_PATH}{endpoint}"

    # ------------------------------------------------------------------ public API

    async def probe(self) -> bool:
        """Whether the instance speaks Jetstream v2: one ``listSegments?limit=1``, not retried.

        Returns:
            True for a 200 with a segment list, or an XRPC error body with 503 (not ready yet), 429,
            401 or 403; False for a 404, a 501, any other 4xx, or an answer that is not XRPC (not JSON,
            or JSON without the expected shape).

        Raises:
            ArchiveUnavailableError: no answer (connection error, timeout), or a 5xx other than 501/503
                (the instance cannot tell now).
        """
        endpoint = "listSegments"
        meter = _Meter()
        status = 0
        started = time.monotonic()
        try:
            async with self._client.stream("GET", self._url(endpoint), params={"limit": "1"},
                                           headers=self._headers) as resp:
                status = resp.status_code
                body = await _read_error_body(resp, meter)
        except httpx.TransportError as e:
            raise ArchiveUnavailableError(endpoint, None, None, f"probe: {type(e).__name__}: {e}",
                                          retryable=True) from e
        finally:
            self._report(endpoint, status, time.monotonic() - started, meter.n)
        if status == 200:
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                return False
            return isinstance(obj, dict) and isinstance(obj.get("segments"), list)
        error, _ = _xrpc_error(body)
        if status in (503, 429, 401, 403):
            return error is not None
        if status >= 500 and status != 501:
            raise ArchiveUnavailableError(endpoint, status, error, "probe: the instance cannot tell now",
                                          retryable=True)
        return False

    async def list_segments(self, limit: int = 1000,
                            cursor: str | None = None) -> tuple[list[SegmentListing], str | None]:
        """One ``listSegments`` page (segments in index order) and the cursor of the next (None: last page).

        Raises:
            ValueError: ``limit`` outside 1..1000.
            ArchiveError: see the module.
        """
        if not 1 <= limit <= 1000:
            raise ValueError(f"limit {limit} is outside 1..1000")
        endpoint = "listSegments"
        params = {"limit": str(limit)}
        if cursor:
            params["cursor"] = cursor
        obj = await self._json(endpoint, "GET", params=params)
        items = obj.get("segments")
        if not isinstance(items, list):
            raise ArchiveProtocolError(endpoint, 200, None, "page without a segments list")
        nxt = obj.get("cursor")
        if nxt is not None and not isinstance(nxt, str):
            raise ArchiveProtocolError(endpoint, 200, None, f"cursor {nxt!r} is not a string")
        return [_listing(i, endpoint) for i in items], nxt or None

    async def iter_segments(self, *, page_size: int = 1000) -> AsyncIterator[SegmentListing]:
        """Every sealed segment, in index order, page by page.

        Raises:
            ArchiveProtocolError: a cursor repeated (the server would page forever).
            ArchiveError: see the module.
        """
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            page, cursor = await self.list_segments(page_size, cursor)
            for item in page:
                yield item
            if cursor is None or not page:
                return
            if cursor in seen:
                raise ArchiveProtocolError("listSegments", 200, None, f"cursor {cursor!r} repeated")
            seen.add(cursor)

    async def seq_at(self, time_us: int) -> int:
        """The seq from which every event witnessed at or after ``time_us`` (unix µs) is found.

        ``witnessed_at`` grows with seq, so the answer ``S`` is exact at segment granularity: every seq
        below ``S`` was witnessed before ``time_us``, and every event witnessed at or after ``time_us`` has
        a seq ``>= S``. It is the ``minSeq`` of the first sealed segment whose ``maxWitnessedAt >= time_us``
        (the events of that segment from ``S`` up to the first one witnessed at ``time_us`` are older: filter
        by ``witnessed_at`` when exactness matters). When ``time_us`` is after every sealed
        segment, it is the last segment's ``maxSeq + 1`` (the first unsealed seq); with no sealed segment, 1.
        A start time becomes the exclusive ``afterSeq = seq_at(t) - 1`` of :meth:`plan_snapshot`.

        Raises:
            ArchiveError: see the module.
        """
        last: SegmentListing | None = None
        async for seg in self.iter_segments():
            if seg.max_witnessed_at >= time_us:
                return seg.min_seq
            last = seg
        return last.max_seq + 1 if last is not None else 1

    async def plan_snapshot(self, *, after_seq: int | None = None, before_seq: int | None = None,
                            kinds: Iterable[str] = (), dids: Iterable[str] = (),
                            collections: Iterable[str] = ()) -> PlanPage:
        """One ``planSnapshot`` page of the sealed seqs in ``(after_seq, before_seq]`` (after_seq exclusive,
        before_seq inclusive; None: unbounded) that may hold an event of the filter (it may over-include,
        never misses: filter rows exactly yourself). Empty filters and None bounds are left out of the body.

        Page on with ``after_seq = page.planned_through_seq, before_seq = first page's sealed_tip_seq`` until
        ``planned_through_seq >= sealed_tip_seq``; a page that does not advance is the caller's to refuse.

        Raises:
            ArchiveProtocolError: a malformed page (including units outside their own seq bounds).
            ArchiveError: ``InvalidRequest`` (a bad filter), see the module.
        """
        endpoint = "planSnapshot"
        body: dict[str, Any] = {}
        for key, values in (("kinds", kinds), ("dids", dids), ("collections", collections)):
            listed = list(values)
            if listed:
                body[key] = listed
        if after_seq is not None:
            body["afterSeq"] = after_seq
        if before_seq is not None:
            body["beforeSeq"] = before_seq
        obj = await self._json(endpoint, "POST", body=orjson.dumps(body))
        items = obj.get("segments")
        if not isinstance(items, list):
            raise ArchiveProtocolError(endpoint, 200, None, "page without a segments list")
        tip = _get(obj, "sealedTipSeq", int, endpoint, "page")
        through = _get(obj, "plannedThroughSeq", int, endpoint, "page")
        return PlanPage(tuple(_plan_unit(i, endpoint) for i in items), tip, through)

    async def get_segment(self, unit_name: str, expected_checksum: str) -> FetchedSegment:
        """The whole sealed segment ``unit_name``, as parallel Range stripes pinned to one version.

        The first stripe (``Range: bytes=0-<stripe_bytes-1>``, ``If-Range: "<expected_checksum>"``) learns
        the size (``Content-Range``) and the ETag; the others go ``stripes`` at a time with ``If-Range`` of
        that ETag. When a stripe answers 200 instead of 206 (the segment changed: ``If-Range`` failed) or the
        ETag is not the checksum wanted, the segment is started over from scratch with the new ETag, at most
        :data:`MAX_SEGMENT_RESTARTS` times. A server that ignores ``Range`` but answers the wanted version
        whole is accepted. The assembled file must have the ``Content-Range`` total, be at most
        ``max_segment_bytes``, and carry the ETag's checksum in its header.

        Returns:
            the bytes and the checksum of the version downloaded; it differs from ``expected_checksum``
            when the segment was rewritten (the same events, another layout: block indices of a plan made
            for the old checksum do not apply to it).

        Raises:
            SegmentChangedError: it changed more than :data:`MAX_SEGMENT_RESTARTS` times.
            ArchiveProtocolError: bad ``Content-Range``/ETag, sizes that do not add up, over the cap, or a
                file whose header does not carry the ETag's checksum.
            ArchiveError: ``SegmentNotFound`` (404), see the module.
        """
        want: str | None = expected_checksum.lower() if _CHECKSUM.match(expected_checksum.lower()) else None
        for restart in range(MAX_SEGMENT_RESTARTS + 1):
            try:
                checksum, data = await self._fetch_segment_once(unit_name, want)
            except _SegmentChangedError as e:
                log.info("segment %s changed while it was fetched (checksum %s, wanted %s); starting over (%d)",
                         unit_name, e.checksum, want, restart + 1)
                want = e.checksum
                continue
            return FetchedSegment(unit_name, checksum, data)
        raise SegmentChangedError("getSegment", None, None,
                                  f"{unit_name} changed {MAX_SEGMENT_RESTARTS + 1} times while it was fetched",
                                  retryable=True)

    async def get_block(self, segment: str, block_index: int, *, expected_checksum: str | None = None) -> bytes:
        """The stored zstd frame of block ``block_index`` of ``segment`` (without its 8-byte length prefix).

        With ``expected_checksum`` (the plan unit's checksum), the ETag (``"<checksum>:<index>"``) must name
        that version of the segment, else :class:`SegmentChangedError` (the block indices of the plan no
        longer apply: re-plan). The body must match its ``Content-Length`` (a short body is retried).

        Raises:
            SegmentChangedError: see above.
            ArchiveError: ``SegmentNotFound``, ``BlockNotFound`` (404), see the module.
        """
        endpoint = "getBlock"
        if block_index < 0:
            raise ValueError(f"block index {block_index} is negative")

        async def consume(resp: httpx.Response, meter: _Meter) -> bytes:
            if expected_checksum is not None:
                etag = (resp.headers.get("etag") or "").strip()
                if etag != f'"{expected_checksum.lower()}:{block_index}"':
                    raise SegmentChangedError(endpoint, resp.status_code, None,
                                              f"{segment} block {block_index} has ETag {etag!r}, the plan "
                                              f"expected checksum {expected_checksum}", retryable=True)
            return await _read_capped(resp, MAX_BLOCK_BYTES, meter, endpoint, what="block")

        params = {"segment": segment, "blockIndex": str(block_index)}
        return await self._call(endpoint, consume, params=params, headers={"accept-encoding": "identity"})

    async def get_dictionary(self, dict_id: int | None = None) -> tuple[int, bytes]:
        """The instance's zstd dictionary for ``subscribeEvents`` (``dict_id``: that one, else the current).

        The id comes from the ``X-Zstd-Dictionary-Id`` header and from the dictionary's bytes 4..8 (the
        little-endian u32 after the magic ``0xEC30A437``); when both are there they must agree, and with
        ``dict_id`` the answer must be that one.

        Returns:
            ``(id, the dictionary's bytes)``.

        Raises:
            ArchiveProtocolError: no id at all, ids that disagree, a header that is not a number.
            ArchiveError: ``DictionaryNotFound`` (404), see the module.
        """
        endpoint = "getZstdDictionary"

        async def consume(resp: httpx.Response, meter: _Meter) -> tuple[int, bytes]:
            data = await _read_capped(resp, MAX_JSON_BYTES, meter, endpoint, what="dictionary")
            header = resp.headers.get("x-zstd-dictionary-id")
            from_header: int | None = None
            if header is not None:
                if not header.strip().isdigit():
                    raise ArchiveProtocolError(endpoint, 200, None, f"X-Zstd-Dictionary-Id {header!r} is not a number")
                from_header = int(header)
            from_bytes = zstd_dictionary_id(data)
            if from_header is not None and from_bytes is not None and from_header != from_bytes:
                raise ArchiveProtocolError(endpoint, 200, None, f"X-Zstd-Dictionary-Id {from_header} but the "
                                                                f"dictionary says {from_bytes}")
            got = from_header if from_header is not None else from_bytes
            if got is None:
                raise ArchiveProtocolError(endpoint, 200, None, "neither the header nor the bytes give the "
                                                                "dictionary's id")
            if dict_id is not None and got != dict_id:
                raise ArchiveProtocolError(endpoint, 200, None, f"asked for dictionary {dict_id}, got {got}")
            return got, data

        params = {"id": str(dict_id)} if dict_id is not None else None
        return await self._call(endpoint, consume, params=params)

    # ------------------------------------------------------------------ segments

    async def _fetch_segment_once(self, name: str, want: str | None) -> tuple[str, bytes | mmap.mmap]:
        """One try at a whole segment pinned to checksum ``want`` (None: whatever the server has).

        Raises:
            _SegmentChangedError: another version answered; start over with its checksum.
        """
        endpoint = "getSegment"
        stripe = self.stripe_bytes
        first: dict[str, Any] = {}

        async def consume_first(resp: httpx.Response, meter: _Meter) -> bytes:
            checksum = _strong_etag_checksum(resp.headers.get("etag"), endpoint, resp.status_code)
            first["checksum"] = checksum
            if want is not None and checksum != want:
                raise _SegmentChangedError(checksum)
            if resp.status_code == 200:  # the server ignored Range: the wanted version, whole
                data = await _read_capped(resp, self.max_segment_bytes, meter, endpoint, what="segment")
                first["total"] = len(data)
                return data
            start, end, total = self._content_range(resp, endpoint)
            if start != 0 or end != min(stripe, total) - 1:
                raise ArchiveProtocolError(endpoint, 206, None, f"asked for bytes 0-{stripe - 1}, got "
                                                                f"{start}-{end}/{total}")
            if total > self.max_segment_bytes:
                raise ArchiveProtocolError(endpoint, 206, None, f"{name} is {total} bytes, over the cap of "
                                                                f"{self.max_segment_bytes}")
            first["total"] = total
            return await self._read_exact(resp, end - start + 1, meter, endpoint)

        headers = {"range": f"bytes=0-{stripe - 1}", "accept-encoding": "identity"}
        if want is not None:
            headers["if-range"] = f'"{want}"'
        head = await self._call(endpoint, consume_first, params={"name": name}, headers=headers, ok=(200, 206))
        checksum: str = first["checksum"]
        total: int = first["total"]
        if len(head) == total:
            return checksum, self._checked_segment(name, checksum, head)
        # A large segment (real ones are about 256 MB) goes to a temporary file mapped in memory, not
        # to the heap: the stripes write into the map, and nothing is copied afterwards.
        buf: bytearray | mmap.mmap = bytearray(total) if total <= self.spool_bytes else _spool(total, self.spool_dir)
        buf[:len(head)] = head
        del head
        gate = asyncio.Semaphore(self.stripes)

        async def fetch(a: int, b: int) -> None:
            async def consume(resp: httpx.Response, meter: _Meter) -> None:
                if resp.status_code == 200:
                    etag = resp.headers.get("etag")
                    try:
                        new: str | None = _strong_etag_checksum(etag, endpoint, 200)
                    except ArchiveProtocolError:
                        new = None
                    raise _SegmentChangedError(new)
                got = _strong_etag_checksum(resp.headers.get("etag"), endpoint, 206)
                if got != checksum:
                    raise _SegmentChangedError(got)
                start, end, tot = self._content_range(resp, endpoint)
                if (start, end, tot) != (a, b, total):
                    raise ArchiveProtocolError(endpoint, 206, None, f"asked for bytes {a}-{b}/{total}, got "
                                                                    f"{start}-{end}/{tot}")
                buf[a:b + 1] = await self._read_exact(resp, b - a + 1, meter, endpoint)

            async with gate:
                await self._call(endpoint, consume, params={"name": name}, ok=(200, 206),
                                 headers={"range": f"bytes={a}-{b}", "if-range": f'"{checksum}"',
                                          "accept-encoding": "identity"})

        spans = [(a, min(a + stripe, total) - 1) for a in range(stripe, total, stripe)]
        try:
            await _all_or_nothing([fetch(a, b) for a, b in spans])
        except BaseException:
            if isinstance(buf, mmap.mmap):
                buf.close()
            raise
        if isinstance(buf, mmap.mmap):
            return checksum, self._checked_segment(name, checksum, buf)
        return checksum, self._checked_segment(name, checksum, bytes(buf))

    @staticmethod
    def _content_range(resp: httpx.Response, endpoint: str) -> tuple[int, int, int]:
        value = resp.headers.get("content-range") or ""
        m = _CONTENT_RANGE.match(value)
        if m is None:
            raise ArchiveProtocolError(endpoint, resp.status_code, None, f"Content-Range {value!r} is not "
                                                                         "bytes A-B/TOTAL")
        start, end, total = int(m[1]), int(m[2]), int(m[3])
        if not start <= end < total:
            raise ArchiveProtocolError(endpoint, resp.status_code, None, f"Content-Range {value!r} is inconsistent")
        return start, end, total

    @staticmethod
    async def _read_exact(resp: httpx.Response, n: int, meter: _Meter, endpoint: str) -> bytes:
        """Exactly ``n`` body bytes (a longer body is refused at ``n + 1``; a shorter one is retried)."""
        data = await _read_capped(resp, n, meter, endpoint, what="range body")
        if len(data) != n:
            raise _RetryableError(resp.status_code, f"range body of {len(data)} bytes, expected {n}")
        return data

    def _checked_segment(self, name: str, checksum: str, data: _Buffer) -> _Buffer:
        """``data`` after checking its header carries ``checksum`` (the header and block index parse)."""
        endpoint = "getSegment"
        try:
            header = parse_segment_header(memoryview(data), file_size=len(data))
        except SegmentError as e:
            raise ArchiveProtocolError(endpoint, None, None, f"{name}: not a sealed segment: {e}") from e
        if f"{header.checksum:016x}" != checksum:
            raise ArchiveProtocolError(endpoint, None, None, f"{name}: the header's checksum is "
                                                             f"{header.checksum:016x}, the ETag's {checksum}")
        return data

    # ------------------------------------------------------------------ requests

    async def _json(self, endpoint: str, method: str, *, params: dict[str, str] | None = None,
                    body: bytes | None = None) -> dict[str, Any]:
        async def consume(resp: httpx.Response, meter: _Meter) -> dict[str, Any]:
            return _parse_json_object(await _read_capped(resp, MAX_JSON_BYTES, meter, endpoint), endpoint)

        headers = {"accept": "application/json"}
        if body is not None:
            headers["content-type"] = "application/json"
        return await self._call(endpoint, consume, method=method, params=params, body=body, headers=headers)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in ``[0, min(backoff_max, backoff_base * 2**(attempt-1))]``."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt - 1, 62))
        return self._rng.uniform(0.0, ceiling)

    def _report(self, endpoint: str, status: int, seconds: float, nbytes: int) -> None:
        if self._on_request is not None:
            self._on_request(endpoint, status, seconds, nbytes)

    async def _call(self, endpoint: str, consume: Callable[[httpx.Response, _Meter], Awaitable[T]], *,
                    method: str = "GET", params: dict[str, str] | None = None, body: bytes | None = None,
                    headers: dict[str, str] | None = None, ok: Sequence[int] = (200,)) -> T:
        """One request with the retries of the module; ``consume`` reads an answer whose status is in ``ok``.

        Raises:
            ArchiveAuthError, ArchiveError: a 4xx other than 429.
            ArchiveUnavailableError: the retries ran out.
            whatever ``consume`` raises (other than a retryable transport error).
        """
        url = self._url(endpoint)
        all_headers = {**self._headers, **(headers or {})}
        last: _RetryableError | None = None
        for attempt in range(1, self.max_attempts + 1):
            meter = _Meter()
            status = 0
            cancelled = False
            started = time.monotonic()
            try:
                try:
                    async with self._client.stream(method, url, params=params, content=body,
                                                   headers=all_headers) as resp:
                        status = resp.status_code
                        if status in ok:
                            return await consume(resp, meter)
                        raise await self._failure(endpoint, resp, meter)
                except httpx.TimeoutException as e:
                    raise _RetryableError(None, f"timeout ({type(e).__name__})") from e
                except httpx.TransportError as e:  # dropped connections and bodies cut short land here
                    raise _RetryableError(None, f"{type(e).__name__}: {e}") from e
                except httpx.DecodingError as e:
                    raise ArchiveProtocolError(endpoint, status or None, None, f"undecodable body: {e}") from e
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                finally:
                    if status or not cancelled:  # a stripe cancelled before its answer is no exchange
                        self._report(endpoint, status, time.monotonic() - started, meter.n)
            except _RetryableError as e:
                last = e
            if attempt == self.max_attempts:
                break
            delay = min(last.delay, self.backoff_max) if last.delay is not None else self._backoff(attempt)
            log.debug("%s: %s; attempt %d of %d, waiting %.2f s", endpoint, last, attempt, self.max_attempts, delay)
            await self._sleep(delay)
        assert last is not None
        raise ArchiveUnavailableError(endpoint, last.status, last.error,
                                      f"{last} (after {self.max_attempts} attempts)", retryable=True) from last

    async def _failure(self, endpoint: str, resp: httpx.Response, meter: _Meter) -> Exception:
        """The exception for an answer not in ``ok``: a :class:`_RetryableError` (429, 5xx) or an ArchiveError."""
        status = resp.status_code
        raw = await _read_error_body(resp, meter)
        error, message = _xrpc_error(raw)
        if status == 429 or status >= 500:
            delay = None
            if status in (429, 503):
                delay = parse_retry_after(resp.headers.get("retry-after"), time.time())
            return _RetryableError(status, f"{error or 'HTTP ' + str(status)}: {message or raw[:200]!r}",
                                   delay, error)
        if message is None:
            message = f"(not an XRPC error body) {raw[:200]!r}"
        if status in (401, 403):
            return ArchiveAuthError(endpoint, status, error, f"{message} (wrong or missing --api-key?)")
        if 400 <= status < 500:
            return ArchiveError(endpoint, status, error, message)
        return ArchiveProtocolError(endpoint, status, error, f"unexpected status: {message}")


_Buffer = TypeVar("_Buffer", bytes, mmap.mmap)


def _spool(size: int, directory: str | None) -> mmap.mmap:
    """A writable map of a new temporary file of ``size`` bytes (the file is unlinked at once: it
    lives as long as the map)."""
    with tempfile.TemporaryFile(prefix="atproto-backfill-segment-", dir=directory) as f:
        f.truncate(size)
        return mmap.mmap(f.fileno(), size)


async def _all_or_nothing(coros: Sequence[Awaitable[None]]) -> None:
    """Run ``coros`` concurrently; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise exc
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

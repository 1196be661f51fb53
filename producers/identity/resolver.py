"""DID -> atproto identity (signing key, PDS endpoint, handle), cached, safe against hostile documents.

* ``did:plc:...`` is fetched from a PLC directory (``GET {plc_url}/{did}``; default
  ``https://plc.directory``, env ``BACKFILL_PLC_URL``): 404 = not registered, 410 = tombstoned.
* ``did:web:host`` (host-level only, as atproto allows; a port is percent-encoded,
  ``did:web:localhost%3A8080``) is fetched from ``https://host/.well-known/did.json``.

The document is parsed by :func:`runtime.atproto.identity.parse_did_document` (its ``id`` must be
the DID asked for). Results are cached for ``ttl`` seconds on an injected clock, concurrent
lookups of one DID share one request, and :meth:`DidResolver.invalidate` drops an entry (a
firehose ``#identity`` event). A did:web host is untrusted input: its connection goes through the
:mod:`producers.netsafety` guard; the PLC directory is operator configuration and trusted. 5xx,
429, timeouts and connection errors are retried with jittered exponential backoff (tenacity; the
``wait`` is injectable so tests never sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote

import httpx
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from producers.netsafety import (
    NetworkPolicy,
    Resolver,
    UnsafeEndpointError,
    guarded_client,
    status_class,
    system_resolver,
)
from runtime.atproto.errors import IdentityError
from runtime.atproto.identity import Identity, parse_did_document
from runtime.errors import SourceError
from runtime.process.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_PLC_URL: Final = "https://plc.directory"
PLC_URL_ENV: Final = "BACKFILL_PLC_URL"
#: A DID document is a few hundred bytes; anything near this is hostile.
MAX_DOCUMENT_BYTES: Final = 256 * 1024
#: The reasons a resolution fails (closed set; ``drop_reason`` maps them to DROP_REASONS).
RESOLUTION_REASONS: Final = ("not_found", "tombstoned", "invalid_document", "unsupported_did",
                             "unsafe_endpoint", "oversize", "http_error", "unavailable")
_DROP_REASON: Final = {
    "not_found": "repo_unavailable", "tombstoned": "repo_unavailable", "invalid_document": "invalid_record",
    "unsupported_did": "invalid_record", "unsafe_endpoint": "unsafe_endpoint", "oversize": "oversize",
    "http_error": "http_error", "unavailable": "retries_exhausted",
}


class DidResolutionError(SourceError):
    """A DID could not be resolved to an identity.

    Attributes:
        did: the DID.
        reason: one of :data:`RESOLUTION_REASONS`.
        retryable: True when a later attempt may succeed (5xx, 429, timeouts after our own retries).
    """

    def __init__(self, did: str, reason: str, detail: str, *, retryable: bool = False) -> None:
        if reason not in RESOLUTION_REASONS:
            raise ValueError(f"unknown resolution failure reason {reason!r}")
        super().__init__(f"cannot resolve {did}: {reason}: {detail}")
        self.did = did
        self.reason = reason
        self.detail = detail
        self.retryable = retryable

    @property
    def drop_reason(self) -> str:
        """The matching :data:`runtime.errors.DROP_REASONS` value (dead letters, metrics)."""
        return _DROP_REASON[self.reason]


class _TransientError(Exception):
    """An attempt that may succeed when repeated (internal to the retry loop).

    ``status`` is the retry metric's reason label: ``429``, ``5xx``, ``timeout`` or ``connection``.
    """

    def __init__(self, detail: str, status: str) -> None:
        super().__init__(detail)
        self.status = status


def did_web_url(did: str, scheme: str = "https") -> str:
    """The well-known document URL of a host-level ``did:web``.

    Raises:
        DidResolutionError: reason ``unsupported_did`` (a path-based did:web, an empty host).
    """
    rest = did[len("did:web:"):]
    if not rest or ":" in rest or "/" in rest:
        raise DidResolutionError(did, "unsupported_did", "atproto allows only host-level did:web")
    host = unquote(rest)
    if not host or any(c in host for c in "/?#@ ") or host.startswith("."):
        raise DidResolutionError(did, "unsupported_did", f"bad did:web host {host!r}")
    return f"{scheme}://{host}/.well-known/did.json"


class DidResolver:
    """Resolves DIDs to :class:`~runtime.atproto.identity.Identity`, with a TTL cache.

    Args:
        plc_url: the PLC directory base URL (trusted: operator configuration); default
            ``$BACKFILL_PLC_URL`` or ``https://plc.directory``.
        ttl: seconds a resolved identity stays cached.
        max_entries: cache size (least recently used entries are evicted).
        clock: monotonic seconds (injected in tests).
        policy: which addresses did:web hosts may resolve to (see :mod:`producers.netsafety`).
        client: an ``httpx.AsyncClient`` to use instead of the guarded one (tests); the caller then
            owns network safety.
        timeout: per-request timeout in seconds.
        attempts: tries per resolution for retryable failures.
        wait: tenacity wait strategy between tries (``wait_none()`` in tests).
        metrics: counts ``pds_requests_total{host_class=plc|did_web}`` and retries.
        did_web_scheme: ``https`` (the spec); ``http`` only for simulators.
        resolver: name resolution for the guard (tests).
    """

    def __init__(self, plc_url: str | None = None, *, ttl: float = 3600.0, max_entries: int = 200_000,
                 clock: Callable[[], float] = time.monotonic, policy: NetworkPolicy | None = None,
                 client: httpx.AsyncClient | None = None, timeout: float = 15.0, attempts: int = 4,
                 wait: wait_base | None = None, metrics: Metrics | None = None,
                 did_web_scheme: str = "https", resolver: Resolver = system_resolver) -> None:
        self.plc_url = (plc_url or os.environ.get(PLC_URL_ENV) or DEFAULT_PLC_URL).rstrip("/")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._policy = (policy or NetworkPolicy()).with_trusted([self.plc_url])
        self._own_client = client is None
        self._client = client or guarded_client(self._policy, timeout=timeout, resolver=resolver,
                                                headers={"accept": "application/did+ld+json, application/json"})
        self._attempts = max(1, attempts)
        self._wait = wait if wait is not None else wait_exponential_jitter(multiplier=0.5, max=10.0)
        self._metrics = metrics
        self._scheme = did_web_scheme
        self._cache: OrderedDict[str, tuple[float, Identity]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[Identity]] = {}
        self.requests = 0

    # ------------------------------------------------------------------ public API

    async def resolve(self, did: str) -> Identity:
        """The identity of ``did`` (cached for ``ttl`` seconds).

        Raises:
            DidResolutionError: not registered, tombstoned, malformed document, unsafe did:web host,
                oversize document, or the directory kept failing after the retries.
        """
        hit = self._cache.get(did)
        now = self._clock()
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(did)
                return hit[1]
            del self._cache[did]
        pending = self._inflight.get(did)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Identity] = asyncio.get_running_loop().create_future()
        self._inflight[did] = fut
        try:
            identity = await self._fetch(did)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except BaseException as e:
            fut.set_exception(e)
            # The waiters (if any) consume the exception; this retrieves it for the no-waiter case.
            with contextlib.suppress(BaseException):
                fut.exception()
            raise
        finally:
            self._inflight.pop(did, None)
        fut.set_result(identity)
        self._store(did, identity)
        return identity

    def invalidate(self, did: str) -> None:
        """Forget the cached identity of ``did`` (its document changed)."""
        self._cache.pop(did, None)

    def clear_cache(self) -> None:
        """Forget every cached identity (between batches, to release memory)."""
        self._cache.clear()

    async def aclose(self) -> None:
        """Close the HTTP client (when the resolver created it)."""
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> DidResolver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    def _store(self, did: str, identity: Identity) -> None:
        self._cache[did] = (self._clock() + self.ttl, identity)
        self._cache.move_to_end(did)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def _url(self, did: str) -> tuple[str, str]:
        if did.startswith("did:plc:"):
            ident = did[len("did:plc:"):]
            if not ident or not ident.isalnum():
                raise DidResolutionError(did, "unsupported_did", "malformed did:plc")
            return f"{self.plc_url}/{did}", "plc"
        if did.startswith("did:web:"):
            return did_web_url(did, self._scheme), "did_web"
        raise DidResolutionError(did, "unsupported_did", "only did:plc and did:web are atproto DID methods")

    async def _fetch(self, did: str) -> Identity:
        url, host_class = self._url(did)
        metrics = self._metrics

        def count_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            if metrics is not None and isinstance(exc, _TransientError):
                metrics.http_retries.inc(host_class, exc.status)

        try:
            async for attempt in AsyncRetrying(retry=retry_if_exception(lambda e: isinstance(e, _TransientError)),
                                               stop=stop_after_attempt(self._attempts), wait=self._wait,
                                               before_sleep=count_retry, reraise=True):
                with attempt:
                    return await self._attempt(did, url, host_class)
        except _TransientError as e:
            raise DidResolutionError(did, "unavailable", f"{url}: {e}", retryable=True) from e
        raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover

    def _count(self, host_class: str, status: str) -> None:
        if self._metrics is not None:
            self._metrics.http_requests.inc(host_class, status)

    async def _attempt(self, did: str, url: str, host_class: str) -> Identity:
        self.requests += 1
        try:
            async with self._client.stream("GET", url) as resp:
                code = resp.status_code
                self._count(host_class, status_class(code))
                if code in (404, 410):
                    kind = "not_found" if code == 404 else "tombstoned"
                    raise DidResolutionError(did, kind, f"{url} answered {code}")
                if code == 429 or code >= 500:
                    raise _TransientError(f"{url} answered {code}", "429" if code == 429 else "5xx")
                if code != 200:
                    raise DidResolutionError(did, "http_error", f"{url} answered {code}")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > MAX_DOCUMENT_BYTES:
                    raise DidResolutionError(did, "oversize", f"document of {declared} bytes")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise DidResolutionError(did, "oversize", f"document over {MAX_DOCUMENT_BYTES} bytes")
        except UnsafeEndpointError as e:
            self._count(host_class, "error")
            raise DidResolutionError(did, "unsafe_endpoint", str(e)) from e
        except httpx.TimeoutException as e:
            self._count(host_class, "timeout")
            raise _TransientError(f"timeout: {e}", "timeout") from e
        except httpx.TooManyRedirects as e:
            raise DidResolutionError(did, "http_error", f"too many redirects: {e}") from e
        except httpx.TransportError as e:
            self._count(host_class, "error")
            raise _TransientError(f"{type(e).__name__}: {e}", "connection") from e
        return parse_document_body(did, bytes(body))


def parse_document_body(did: str, body: bytes) -> Identity:
    """The identity in a DID document response body (PLC directory or did:web), pure.

    Args:
        did: the DID that was asked for (the document's ``id`` must be it).
        body: the response body, at most :data:`MAX_DOCUMENT_BYTES` (the caller enforces the cap).

    Raises:
        DidResolutionError: reason ``invalid_document`` (not JSON, or not a DID document of ``did``).
    """
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise DidResolutionError(did, "invalid_document", f"not JSON: {e}") from e
    try:
        return parse_did_document(doc, expected_did=did)
    except IdentityError as e:
        raise DidResolutionError(did, "invalid_document", str(e)) from e

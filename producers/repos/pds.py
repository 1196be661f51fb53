"""A polite HTTP client for PDS hosts and relays: ``getRepo`` to disk, ``listRepos`` pages.

Politeness, per host (a host is ``scheme://host:port``):

* a token bucket (``rate`` requests/s, ``burst``) so a host sees at most ``burst + rate * W``
  requests in any ``W`` seconds (defaults 9/s, burst 5: 2,705 per 5 minutes, under the ~3,000
  per 5 minutes hosted PDSes allow);
* the server's own ``RateLimit-*`` headers: when ``RateLimit-Remaining`` drops to the number of
  requests that may still be in flight, the host is paused until ``RateLimit-Reset`` (epoch
  seconds as the atproto PDS sends them, or delta seconds as the IETF draft has them), and a
  ``RateLimit-Policy`` of ``L;w=W`` lowers the bucket's rate to ``L/W`` when that is slower;
* ``429``: the host is paused for ``Retry-After`` (seconds or an HTTP date), else until
  ``RateLimit-Reset``, else (a bare 429) for a jittered exponential backoff; the request is then
  repeated (up to ``max_rate_limit_waits`` times);
* at most ``per_host_concurrency`` requests in flight.

A request holds a slot of the global concurrency only while it is actually on the wire, never
while it waits for its host, so a slow or throttled host never idles the others. 5xx, timeouts,
dropped connections and truncated bodies are retried with jittered exponential backoff
(tenacity; ``wait`` and ``sleep`` are injected so tests never sleep). Time comes from injected
clocks. Every request is counted in ``pds_requests_total{host_class,status}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tenacity.wait import wait_base

from producers.netsafety import (
    NetworkPolicy,
    Resolver,
    UnsafeEndpointError,
    guarded_client,
    status_class,
    system_resolver,
)
from runtime.errors import SourceError
from runtime.process.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

#: getRepo error names and the repository outcome they mean.
REPO_STATES: Final = {
    "RepoNotFound": "not_found",
    "RepoDeactivated": "deactivated",
    "RepoTakendown": "takendown",
    "RepoSuspended": "takendown",
}
CAR_MEDIA_TYPE: Final = "application/vnd.ipld.car"
#: Values of RateLimit-Reset above this are epoch seconds, below it delta seconds.
_EPOCH_THRESHOLD: Final = 100_000_000


def host_class_of(url: str) -> str:
    """The metric label of a PDS URL: ``bsky_hosted`` (Bluesky's own PDSes) or ``self_hosted``."""
    host = (httpx.URL(url).host or "").lower()
    if host.endswith(".host.bsky.network") or host in ("bsky.social", "bsky.network"):
        return "bsky_hosted"
    return "self_hosted"


class PdsError(SourceError):
    """A request to a PDS or relay failed.

    Attributes:
        reason: a drop reason (``http_error``, ``oversize``, ``retries_exhausted``, ``unsafe_endpoint``,
            ``malformed_json``).
        detail: context for logs and dead letters.
        retryable: True when repeating later may succeed.
        body: the start of the response body, when there was one.
    """

    def __init__(self, reason: str, detail: str, *, retryable: bool = False, body: bytes = b"") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
        self.body = body


class RepoUnavailableError(PdsError):
    """getRepo answered that the repository is not there to fetch.

    Attributes:
        outcome: ``not_found``, ``deactivated`` or ``takendown``.
        error: the XRPC error name (``RepoNotFound``, ``RepoDeactivated``, ...).
    """

    def __init__(self, outcome: str, error: str, detail: str) -> None:
        super().__init__("repo_unavailable", detail)
        self.outcome = outcome
        self.error = error


class _TransientError(Exception):
    """An attempt to repeat: 5xx, timeout, dropped connection, truncated body.

    ``label`` is the retry metric's reason (``5xx``, ``timeout``, ``connection``).
    """

    def __init__(self, detail: str, label: str) -> None:
        super().__init__(detail)
        self.label = label


class _RateLimitedError(Exception):
    """A 429: the host is paused; the request is repeated without using up an attempt."""


@dataclass(frozen=True)
class PdsLimits:
    """Politeness and robustness settings.

    Args:
        rate: requests per second per host (token bucket refill).
        burst: token bucket size.
        per_host_concurrency: requests in flight per host.
        global_concurrency: requests in flight over all hosts.
        attempts: tries of one request for 5xx, timeouts and truncated bodies.
        max_rate_limit_waits: 429s one request may wait out before giving up.
        max_pause: longest pause a server can impose by one header (longer ones are capped).
        max_car_bytes: refuse a repository CAR larger than this.
        max_car_blocks: refuse a repository CAR of more blocks than this (its index is the memory a
            repository holds while it is decoded: about 150 bytes per block).
        connect_timeout, read_timeout: seconds (read: inactivity between body chunks).
        page_size: ``limit`` of listRepos pages.
    """

    rate: float = 9.0
    burst: int = 5
    per_host_concurrency: int = 4
    global_concurrency: int = 32
    attempts: int = 4
    max_rate_limit_waits: int = 20
    max_pause: float = 900.0
    max_car_bytes: int = 1 << 30
    max_car_blocks: int = 4_000_000
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    page_size: int = 1000


def parse_retry_after(value: str | None, wall: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or an HTTP date)."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - wall)


def parse_reset(value: str | None, wall: float) -> float | None:
    """Seconds until a ``RateLimit-Reset`` (epoch seconds when large, else delta seconds)."""
    if not value:
        return None
    try:
        num = float(value.strip())
    except ValueError:
        return None
    if num < 0:
        return None
    return max(0.0, num - wall) if num > _EPOCH_THRESHOLD else num


def parse_policy(value: str | None) -> tuple[int, float] | None:
    """``(limit, window seconds)`` of the first policy in ``RateLimit-Policy: L;w=W[, ...]``."""
    if not value:
        return None
    first = value.split(",", 1)[0]
    parts = [p.strip() for p in first.split(";")]
    try:
        limit = int(parts[0])
        window = next(float(p[2:]) for p in parts[1:] if p.startswith("w="))
    except (ValueError, StopIteration):
        return None
    if limit <= 0 or window <= 0:
        return None
    return limit, window


class HostBudget:
    """One host's request budget: a token bucket plus pauses the server asked for.

    Args:
        rate: tokens per second.
        burst: bucket size.
        clock: monotonic seconds.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._tokens = float(self.burst)
        self._stamp = clock()
        self.paused_until = 0.0
        self.lock = asyncio.Lock()
        self.backoff_level = 0

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def delay(self) -> float:
        """Seconds until a request may go; 0 means one token was just taken."""
        now = self._clock()
        self._refill(now)
        if self.paused_until > now:
            return self.paused_until - now
        if self._tokens >= 1.0 - 1e-9:  # tolerance: float refills land a hair under a whole token
            self._tokens = max(0.0, self._tokens - 1.0)
            return 0.0
        return max((1.0 - self._tokens) / self.rate, 1e-3)

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (the bucket is emptied, so no burst follows the pause)."""
        now = self._clock()
        until = now + seconds
        if until > self.paused_until:
            self.paused_until = until
            self._tokens = 0.0
            self._stamp = until

    def slow_to(self, rate: float) -> None:
        """Lower the refill rate (never raises it)."""
        if 0 < rate < self.rate:
            self.rate = rate


@dataclass
class FetchedCar:
    """A repository CAR downloaded to disk."""

    path: Path
    size: int
    attempts: int


@dataclass
class ListedRepo:
    """One entry of ``com.atproto.sync.listRepos``."""

    did: str
    head: str | None = None
    rev: str | None = None
    active: bool = True
    status: str | None = None


@dataclass
class _HostState:
    budget: HostBudget
    slots: asyncio.Semaphore
    requests: int = 0
    rate_limited: int = 0
    waited: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class PdsClient:
    """Requests to PDS hosts and relays under per-host budgets and a global concurrency cap.

    Args:
        limits: the politeness settings.
        policy: which addresses may be reached (DID documents name PDS hosts: untrusted).
        client: an ``httpx.AsyncClient`` to use instead of the guarded one (tests).
        clock: monotonic seconds; wall: unix seconds (for epoch ``RateLimit-Reset``).
        sleep: how to wait (injected in tests, so no test sleeps for time to pass).
        wait: tenacity wait between transient retries.
        rng: jitter of bare-429 backoff.
        metrics: request/retry/wait counters.
    """

    def __init__(self, limits: PdsLimits | None = None, *, policy: NetworkPolicy | None = None,
                 client: httpx.AsyncClient | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 wait: wait_base | None = None, rng: random.Random | None = None,
                 metrics: Metrics | None = None, resolver: Resolver = system_resolver,
                 user_agent: str = "atproto-backfill (+https://github.com/)") -> None:
        self.limits = limits or PdsLimits()
        lim = self.limits
        self._own_client = client is None
        timeout = httpx.Timeout(connect=lim.connect_timeout, read=lim.read_timeout, write=30.0, pool=None)
        self._client = client or guarded_client(
            policy or NetworkPolicy(), timeout=timeout, resolver=resolver, headers={"user-agent": user_agent},
            limits=httpx.Limits(max_connections=max(lim.global_concurrency * 2, 16),
                                max_keepalive_connections=lim.global_concurrency))
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self._wait = wait if wait is not None else wait_exponential_jitter(multiplier=0.5, max=30.0)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._metrics = metrics
        self._global = asyncio.Semaphore(lim.global_concurrency)
        self._hosts: dict[str, _HostState] = {}

    # ------------------------------------------------------------------ public API

    async def get_repo(self, pds: str, did: str, dest_dir: Path) -> FetchedCar:
        """Download ``did``'s repository from ``pds`` into a new file under ``dest_dir``.

        Returns:
            the file (the caller deletes it), its size and the attempts it took.

        Raises:
            RepoUnavailableError: RepoNotFound / RepoDeactivated / RepoTakendown (400 or 404).
            PdsError: oversize (not retried), other 4xx (not retried), 5xx/timeouts/truncation after
                the retries (``retries_exhausted``, retryable), an unsafe endpoint.
        """
        url = f"{pds.rstrip('/')}/xrpc/com.atproto.sync.getRepo"
        attempts = 0

        async def consume(resp: httpx.Response) -> FetchedCar:
            nonlocal attempts
            attempts += 1
            return await self._save_car(resp, did, dest_dir, attempts)

        result: FetchedCar = await self._request(url, {"did": did}, host_class_of(pds), consume,
                                                 accept=CAR_MEDIA_TYPE, on_error=self._repo_error)
        return result

    async def list_repos(self, service: str, *, host_class: str | None = None) -> AsyncIterator[ListedRepo]:
        """Every repository ``service`` hosts (a PDS) or knows (a relay), page by page.

        Raises:
            PdsError: a page failed after the retries, or a page is malformed.
        """
        url = f"{service.rstrip('/')}/xrpc/com.atproto.sync.listRepos"
        cls = host_class or host_class_of(service)
        cursor: str | None = None
        seen_cursors: set[str] = set()
        while True:
            params = {"limit": str(self.limits.page_size)}
            if cursor:
                params["cursor"] = cursor
            page: dict[str, Any] = await self._request(url, params, cls, _read_json, accept="application/json")
            repos = page.get("repos")
            if not isinstance(repos, list):
                raise PdsError("malformed_json", f"{url}: listRepos page without a repos list")
            for entry in repos:
                if not isinstance(entry, dict) or not isinstance(entry.get("did"), str):
                    log.warning("%s: skipping a malformed listRepos entry %r", url, str(entry)[:200])
                    continue
                status = entry.get("status")
                yield ListedRepo(did=entry["did"], head=_opt_str(entry.get("head")), rev=_opt_str(entry.get("rev")),
                                 active=entry.get("active") is not False,
                                 status=status if isinstance(status, str) else None)
            nxt = page.get("cursor")
            if not repos or not isinstance(nxt, str) or not nxt or nxt in seen_cursors:
                return
            seen_cursors.add(nxt)
            cursor = nxt

    def host_stats(self) -> dict[str, dict[str, float]]:
        """Requests, 429s and seconds waited per host (for statistics and tests)."""
        return {h: {"requests": s.requests, "rate_limited": s.rate_limited, "waited": s.waited}
                for h, s in self._hosts.items()}

    async def aclose(self) -> None:
        """Close the HTTP client (when this client created it)."""
        if self._own_client:
            await self._client.aclose()

    # ------------------------------------------------------------------ internals

    def _host(self, url: str) -> tuple[str, _HostState]:
        u = httpx.URL(url)
        key = f"{u.scheme}://{u.host}:{u.port or (443 if u.scheme == 'https' else 80)}"
        state = self._hosts.get(key)
        if state is None:
            lim = self.limits
            state = self._hosts[key] = _HostState(HostBudget(lim.rate, lim.burst, self._clock),
                                                  asyncio.Semaphore(lim.per_host_concurrency))
        return key, state

    def _count(self, host_class: str, status: str) -> None:
        if self._metrics is not None:
            self._metrics.http_requests.inc(host_class, status)

    async def _take(self, state: _HostState, host_class: str) -> None:
        """Wait until the host's budget allows one request."""
        budget = state.budget
        async with budget.lock:
            while True:
                delay = budget.delay()
                if delay <= 0:
                    return
                state.waited += delay
                if self._metrics is not None:
                    self._metrics.rate_limit_wait.inc(host_class, amount=delay)
                await self._sleep(delay)

    def _observe(self, state: _HostState, resp: httpx.Response) -> None:
        """Follow the server's RateLimit-* headers."""
        headers = resp.headers
        policy = parse_policy(headers.get("ratelimit-policy"))
        if policy is not None:
            state.budget.slow_to(policy[0] / policy[1])
        remaining = headers.get("ratelimit-remaining")
        if remaining is None or not remaining.strip().isdigit():
            return
        if int(remaining) <= self.limits.per_host_concurrency - 1:
            reset = parse_reset(headers.get("ratelimit-reset"), self._wall())
            if reset is not None and reset > 0:
                state.budget.pause(min(reset, self.limits.max_pause))

    def _on_429(self, state: _HostState, resp: httpx.Response) -> float:
        """Pause the host as the 429 asks; return the pause."""
        wall = self._wall()
        pause = parse_retry_after(resp.headers.get("retry-after"), wall)
        if pause is None:
            pause = parse_reset(resp.headers.get("ratelimit-reset"), wall)
        budget = state.budget
        if pause is None or pause <= 0:
            # A bare 429: back off exponentially with jitter (1 s, 2 s, 4 s, ... up to a minute).
            base = min(60.0, 2.0 ** budget.backoff_level)
            pause = base * (0.5 + self._rng.random() / 2)
            budget.backoff_level += 1
        pause = min(pause, self.limits.max_pause)
        budget.pause(pause)
        state.rate_limited += 1
        return pause

    async def _request(self, url: str, params: dict[str, str], host_class: str,
                       consume: Callable[[httpx.Response], Awaitable[T]], *, accept: str,
                       on_error: Callable[[httpx.Response, bytes], Exception] | None = None) -> T:
        _, state = self._host(url)
        metrics = self._metrics

        def count_retry(rs: RetryCallState) -> None:
            exc = rs.outcome.exception() if rs.outcome is not None else None
            if metrics is not None and isinstance(exc, _TransientError):
                metrics.http_retries.inc(host_class, exc.label)

        rate_limited = 0
        try:
            async for attempt in AsyncRetrying(retry=retry_if_exception_type(_TransientError),
                                               stop=stop_after_attempt(self.limits.attempts), wait=self._wait,
                                               sleep=self._sleep, before_sleep=count_retry, reraise=True):
                with attempt:
                    while True:
                        try:
                            return await self._once(url, params, host_class, state, consume, accept, on_error)
                        except _RateLimitedError:
                            rate_limited += 1
                            if metrics is not None:
                                metrics.http_retries.inc(host_class, "429")
                            if rate_limited > self.limits.max_rate_limit_waits:
                                raise PdsError("retries_exhausted",
                                               f"{url}: still rate limited after {rate_limited} waits",
                                               retryable=True) from None
        except _TransientError as e:
            raise PdsError("retries_exhausted", f"{url}: {e} (after {self.limits.attempts} attempts)",
                           retryable=True) from e
        raise AssertionError("unreachable: tenacity returns or re-raises")  # pragma: no cover

    async def _once(self, url: str, params: dict[str, str], host_class: str, state: _HostState,
                    consume: Callable[[httpx.Response], Awaitable[T]], accept: str,
                    on_error: Callable[[httpx.Response, bytes], Exception] | None) -> T:
        async with state.slots:
            await self._take(state, host_class)
            async with self._global:
                state.requests += 1
                try:
                    async with self._client.stream("GET", url, params=params, headers={"accept": accept}) as resp:
                        code = resp.status_code
                        self._count(host_class, status_class(code))
                        self._observe(state, resp)
                        if code == 429:
                            pause = self._on_429(state, resp)
                            log.debug("%s rate limited us: pausing the host %.1f s", url, pause)
                            raise _RateLimitedError
                        state.budget.backoff_level = 0
                        if code >= 500:
                            raise _TransientError(f"{url} answered {code}", "5xx")
                        if code != 200:
                            body = await _read_capped(resp, 64 * 1024)
                            if on_error is not None:
                                raise on_error(resp, body)
                            raise PdsError("http_error", f"{url} answered {code}: {body[:300]!r}", body=body)
                        return await consume(resp)
                except UnsafeEndpointError as e:
                    self._count(host_class, "error")
                    raise PdsError("unsafe_endpoint", str(e)) from e
                except httpx.TimeoutException as e:
                    self._count(host_class, "timeout")
                    raise _TransientError(f"{url}: timeout ({type(e).__name__})", "timeout") from e
                except httpx.TooManyRedirects as e:
                    raise PdsError("http_error", f"{url}: too many redirects") from e
                except (httpx.TransportError, httpx.StreamError) as e:
                    # dropped connections and bodies cut short (RemoteProtocolError) land here
                    self._count(host_class, "error")
                    raise _TransientError(f"{url}: {type(e).__name__}: {e}", "connection") from e

    @staticmethod
    def _repo_error(resp: httpx.Response, body: bytes) -> Exception:
        error = ""
        message = ""
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            obj = orjson.loads(body)
            error = str(obj.get("error") or "")
            message = str(obj.get("message") or "")
        outcome = REPO_STATES.get(error)
        if outcome is None and resp.status_code == 404:
            outcome, error = "not_found", error or "RepoNotFound"
        if outcome is not None and resp.status_code in (400, 404):
            return RepoUnavailableError(outcome, error, f"getRepo answered {resp.status_code} {error}: {message}")
        return PdsError("http_error", f"getRepo answered {resp.status_code} {error}: {message or body[:200]!r}",
                        body=body)

    async def _save_car(self, resp: httpx.Response, did: str, dest_dir: Path, attempt: int) -> FetchedCar:
        cap = self.limits.max_car_bytes
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise PdsError("oversize", f"repository of {did} is {declared} bytes, over the cap of {cap}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="repo-", suffix=".car", dir=dest_dir)
        path = Path(name)
        size = 0
        ok = False
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > cap:
                        raise PdsError("oversize", f"repository of {did} exceeds the cap of {cap} bytes")
                    out.write(chunk)
            if declared is not None and declared.isdigit() and size != int(declared):
                # the transport should have said so; a CAR cut at a block boundary would still parse
                raise _TransientError(f"getRepo of {did}: {size} of {declared} bytes", "connection")
            ok = True
            return FetchedCar(path, size, attempt)
        finally:
            if not ok:
                path.unlink(missing_ok=True)


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


async def _read_capped(resp: httpx.Response, cap: int) -> bytes:
    out = bytearray()
    async for chunk in resp.aiter_bytes():
        out += chunk
        if len(out) >= cap:
            break
    return bytes(out[:cap])


async def _read_json(resp: httpx.Response) -> dict[str, Any]:
    body = await _read_capped(resp, 16 * 1024 * 1024)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise PdsError("malformed_json", f"{resp.url}: not JSON: {e}", body=body[:1000]) from e
    if not isinstance(obj, dict):
        raise PdsError("malformed_json", f"{resp.url}: not a JSON object", body=body[:1000])
    return obj

"""The polite PDS client: budgets, RateLimit headers, 429s, retries, getRepo to disk, listRepos.

Time is a fake clock advanced by the injected sleep, so nothing here waits for real time.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from tenacity import wait_none

from producers.repos.pds import (
    HostBudget,
    PdsClient,
    PdsError,
    PdsLimits,
    RepoUnavailableError,
    host_class_of,
    parse_policy,
    parse_reset,
    parse_retry_after,
)
from runtime.process.metrics import Metrics

WALL0 = 1_700_000_000.0
DID = "did:plc:pdsclienttestaaaaaaaaaaa"


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL0 + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


Handler = Callable[[httpx.Request], Any]


def client(handler: Handler, t: FakeTime, limits: PdsLimits | None = None,
           metrics: Metrics | None = None) -> PdsClient:
    transport = httpx.MockTransport(handler)
    return PdsClient(limits or PdsLimits(), client=httpx.AsyncClient(transport=transport), clock=t.clock,
                     wall=t.wall, sleep=t.sleep, wait=wait_none(), rng=random.Random(1), metrics=metrics)


def test_header_parsing() -> None:
    assert parse_retry_after("7", WALL0) == 7
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", WALL0) == pytest.approx(10.0)
    assert parse_retry_after("soon", WALL0) is None
    assert parse_reset(str(int(WALL0) + 42), WALL0) == 42  # epoch seconds (atproto PDS)
    assert parse_reset("30", WALL0) == 30  # delta seconds (IETF draft)
    assert parse_reset("x", WALL0) is None
    assert parse_policy("3000;w=300") == (3000, 300.0)
    assert parse_policy("100;w=60, 10;w=1") == (100, 60.0)
    assert parse_policy("garbage") is None
    assert host_class_of("https://morel.us-east.host.bsky.network") == "bsky_hosted"
    assert host_class_of("https://pds.example.com") == "self_hosted"


def test_token_bucket() -> None:
    t = FakeTime()
    b = HostBudget(rate=2.0, burst=2, clock=t.clock)
    assert b.delay() == 0
    assert b.delay() == 0
    assert b.delay() == pytest.approx(0.5)
    t.now += 0.5
    assert b.delay() == 0
    b.pause(10)
    t.now += 3
    assert b.delay() == pytest.approx(7)
    t.now += 7
    assert b.delay() == pytest.approx(0.5)  # the pause emptied the bucket: no burst right after it
    b.slow_to(1.0)
    b.slow_to(5.0)  # never raised
    assert b.rate == 1.0


def test_requests_never_exceed_the_budget(tmp_path: Path) -> None:
    t = FakeTime()
    sent: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(t.now)
        return httpx.Response(200, json={"repos": []})

    limits = PdsLimits(rate=4.0, burst=3, per_host_concurrency=8)
    pds = client(handler, t, limits)

    async def go() -> None:
        await asyncio.gather(*(pds._request("http://h.test/x", {}, "self_hosted", _ok, accept="*/*")
                               for _ in range(40)))

    asyncio.run(go())
    assert len(sent) == 40
    for i, start in enumerate(sent):
        in_window = sum(1 for s in sent[i:] if s < start + 1.0)
        assert in_window <= 3 + 4  # burst + rate * 1 s
    assert sent[-1] >= (40 - 3) / 4.0 - 1e-9


async def _ok(resp: httpx.Response) -> int:
    return resp.status_code


def test_429_retry_after_pauses_the_host(tmp_path: Path) -> None:
    t = FakeTime()
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(t.now)
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "30"}, json={"error": "RateLimitExceeded"})
        return httpx.Response(200, json={"repos": []})

    metrics = Metrics(CollectorRegistry())
    pds = client(handler, t, metrics=metrics)
    assert asyncio.run(pds._request("http://h.test/x", {}, "self_hosted", _ok, accept="*/*")) == 200
    assert calls[1] - calls[0] >= 30
    assert pds.host_stats()["http://h.test:80"]["rate_limited"] == 1
    reg = metrics.registry
    assert reg.get_sample_value("atproto_backfill_pds_requests_total",
                                {"host_class": "self_hosted", "status": "429"}) == 1
    assert reg.get_sample_value("atproto_backfill_pds_rate_limit_wait_seconds_total",
                                {"host_class": "self_hosted"}) >= 30


def test_429_with_ratelimit_reset_and_bare_429() -> None:
    t = FakeTime()
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(t.now)
        n = len(calls)
        if n == 1:
            return httpx.Response(429, headers={"RateLimit-Reset": str(int(WALL0 + t.now) + 12)})
        if n in (2, 3, 4):
            return httpx.Response(429)  # bare: exponential backoff with jitter
        return httpx.Response(200)

    pds = client(handler, t)
    assert asyncio.run(pds._request("http://h.test/x", {}, "self_hosted", _ok, accept="*/*")) == 200
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 12
    assert 0.5 <= gaps[1] <= 1.0 + 0.5  # 1 s x [0.5, 1) plus a token refill
    assert 1.0 <= gaps[2] <= 2.0 + 0.5
    assert 2.0 <= gaps[3] <= 4.0 + 0.5


def test_low_remaining_pauses_until_reset_and_policy_slows_the_rate() -> None:
    t = FakeTime()
    calls: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(t.now)
        headers = {"RateLimit-Limit": "100", "RateLimit-Policy": "100;w=50",
                   "RateLimit-Remaining": "0" if len(calls) == 1 else "50",
                   "RateLimit-Reset": str(int(WALL0 + t.now) + 20)}
        return httpx.Response(200, headers=headers)

    pds = client(handler, t, PdsLimits(rate=9.0, burst=1))

    async def go() -> None:
        for _ in range(3):
            await pds._request("http://h.test/x", {}, "self_hosted", _ok, accept="*/*")

    asyncio.run(go())
    assert calls[1] - calls[0] >= 20  # paused until the reset
    assert calls[2] - calls[1] == pytest.approx(0.5)  # 100 per 50 s = 2/s


def test_too_many_429s_give_up() -> None:
    t = FakeTime()
    pds = client(lambda r: httpx.Response(429, headers={"Retry-After": "1"}), t,
                 PdsLimits(max_rate_limit_waits=3))
    with pytest.raises(PdsError) as info:
        asyncio.run(pds._request("http://h.test/x", {}, "self_hosted", _ok, accept="*/*"))
    assert info.value.reason == "retries_exhausted"
    assert info.value.retryable


def test_5xx_and_timeouts_are_retried() -> None:
    t = FakeTime()
    seq = iter([503, "timeout", 502, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        v = next(seq)
        if v == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(int(v))

    metrics = Metrics(CollectorRegistry())
    pds = client(handler, t, metrics=metrics)
    assert asyncio.run(pds._request("http://h.test/x", {}, "self_hosted", _ok, accept="*/*")) == 200
    reg = metrics.registry
    assert reg.get_sample_value("atproto_backfill_pds_retries_total",
                                {"host_class": "self_hosted", "reason": "5xx"}) == 2
    assert reg.get_sample_value("atproto_backfill_pds_retries_total",
                                {"host_class": "self_hosted", "reason": "timeout"}) == 1
    pds2 = client(lambda r: httpx.Response(500), t, PdsLimits(attempts=3))
    with pytest.raises(PdsError) as info:
        asyncio.run(pds2._request("http://h.test/x", {}, "self_hosted", _ok, accept="*/*"))
    assert info.value.reason == "retries_exhausted"


@pytest.mark.parametrize(("status", "error", "outcome"), [
    (400, "RepoNotFound", "not_found"), (400, "RepoDeactivated", "deactivated"),
    (400, "RepoTakendown", "takendown"), (400, "RepoSuspended", "takendown"), (404, "", "not_found"),
])
def test_get_repo_unavailable(tmp_path: Path, status: int, error: str, outcome: str) -> None:
    t = FakeTime()
    pds = client(lambda r: httpx.Response(status, json={"error": error, "message": "m"} if error else {}), t)
    with pytest.raises(RepoUnavailableError) as info:
        asyncio.run(pds.get_repo("http://h.test", DID, tmp_path))
    assert info.value.outcome == outcome


def test_get_repo_other_4xx_is_not_retried(tmp_path: Path) -> None:
    t = FakeTime()
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(403, json={"error": "Forbidden"})

    with pytest.raises(PdsError) as info:
        asyncio.run(client(handler, t).get_repo("http://h.test", DID, tmp_path))
    assert info.value.reason == "http_error"
    assert not info.value.retryable
    assert len(calls) == 1


def test_get_repo_streams_to_disk(tmp_path: Path) -> None:
    t = FakeTime()
    body = bytes(range(256)) * 1000

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["did"] == DID
        assert request.url.path == "/xrpc/com.atproto.sync.getRepo"
        return httpx.Response(200, content=body, headers={"content-type": "application/vnd.ipld.car"})

    car = asyncio.run(client(handler, t).get_repo("http://h.test/", DID, tmp_path))
    assert car.path.read_bytes() == body
    assert car.size == len(body)


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes], fail: bool) -> None:
        self.chunks = chunks
        self.fail = fail

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c
        if self.fail:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def test_cut_short_body_is_retried_and_oversize_refused(tmp_path: Path) -> None:
    t = FakeTime()
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, stream=_Chunks([b"a" * 100, b"b" * 100], fail=len(calls) == 1))

    car = asyncio.run(client(handler, t).get_repo("http://h.test", DID, tmp_path))
    assert car.size == 200
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == [car.path]  # the cut-short download was deleted

    big = client(lambda r: httpx.Response(200, stream=_Chunks([b"x" * 600] * 3, fail=False)), t,
                 PdsLimits(max_car_bytes=1000))
    with pytest.raises(PdsError) as info:
        asyncio.run(big.get_repo("http://h.test", DID, tmp_path / "big"))
    assert info.value.reason == "oversize"
    assert not info.value.retryable
    assert list((tmp_path / "big").iterdir()) == []
    declared = client(lambda r: httpx.Response(200, content=b"x" * 2000), t, PdsLimits(max_car_bytes=1000))
    with pytest.raises(PdsError) as info:
        asyncio.run(declared.get_repo("http://h.test", DID, tmp_path / "big"))
    assert info.value.reason == "oversize"


def test_list_repos_paginates() -> None:
    t = FakeTime()
    pages = {None: {"cursor": "c1", "repos": [{"did": "did:plc:a", "head": "h", "rev": "r"},
                                              {"did": "did:plc:b", "active": False, "status": "takendown"}]},
             "c1": {"cursor": "c2", "repos": [{"did": "did:plc:c"}, {"nodid": 1}]},
             "c2": {"repos": []}}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    async def go() -> list[Any]:
        return [r async for r in client(handler, t).list_repos("http://relay.test", host_class="relay")]

    repos = asyncio.run(go())
    assert [(r.did, r.active, r.status) for r in repos] == [
        ("did:plc:a", True, None), ("did:plc:b", False, "takendown"), ("did:plc:c", True, None)]
    bad = client(lambda r: httpx.Response(200, content=b"[1,2]"), t)

    async def go_bad() -> None:
        async for _ in bad.list_repos("http://relay.test"):
            pass

    with pytest.raises(PdsError) as info:
        asyncio.run(go_bad())
    assert info.value.reason == "malformed_json"


def test_a_slow_host_does_not_idle_the_others() -> None:
    """Requests waiting for a busy host hold no global slot: another host is served meanwhile."""
    t = FakeTime()

    async def go() -> list[str]:
        release = asyncio.Event()
        order: list[str] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            if request.url.host == "slow.test":
                await release.wait()
            order.append(request.url.host)
            return httpx.Response(200)

        pds = PdsClient(PdsLimits(per_host_concurrency=1, global_concurrency=2, rate=100, burst=100),
                        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)), clock=t.clock,
                        wall=t.wall, sleep=t.sleep, wait=wait_none())
        slow = [asyncio.ensure_future(pds._request("http://slow.test/x", {}, "self_hosted", _ok, accept="*/*"))
                for _ in range(3)]
        await asyncio.sleep(0.01)
        fast = await asyncio.wait_for(
            asyncio.gather(*(pds._request("http://fast.test/x", {}, "self_hosted", _ok, accept="*/*")
                             for _ in range(3))), 5)
        assert fast == [200, 200, 200]
        release.set()
        await asyncio.gather(*slow)
        return order

    order = asyncio.run(go())
    assert order[:3] == ["fast.test"] * 3

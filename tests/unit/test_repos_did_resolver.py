"""DID resolution: did:plc through a PLC directory, did:web, TTL cache, retries, hostile documents."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry
from tenacity import wait_none

from producers.identity.resolver import MAX_DOCUMENT_BYTES, DidResolutionError, DidResolver, did_web_url
from runtime.atproto.crypto import KeyPair
from runtime.process.metrics import Metrics

DID = "did:plc:abcdefghijklmnopqrstuvwx"
KEY = KeyPair.generate("k256", random.Random(1))


def doc(did: str = DID, pds: str = "https://pds.example.com", handle: str = "alice.test") -> dict[str, Any]:
    return {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": did,
        "alsoKnownAs": [f"at://{handle}"],
        "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did,
                                "publicKeyMultibase": KEY.multikey()}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(handler: Any, **kw: Any) -> tuple[DidResolver, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        result: httpx.Response = handler(request)
        return result

    client = httpx.AsyncClient(transport=httpx.MockTransport(record))
    kw.setdefault("wait", wait_none())
    return DidResolver("https://plc.test", client=client, **kw), seen


def test_resolves_plc_and_caches_until_ttl() -> None:
    clock = Clock()
    resolver, seen = make(lambda r: httpx.Response(200, json=doc()), ttl=60, clock=clock)

    async def go() -> None:
        ident = await resolver.resolve(DID)
        assert ident.pds_endpoint == "https://pds.example.com"
        assert ident.signing_key == KEY.did_key()
        assert ident.handle == "alice.test"
        assert str(seen[0].url) == f"https://plc.test/{DID}"
        await resolver.resolve(DID)
        assert len(seen) == 1
        clock.now += 61
        await resolver.resolve(DID)
        assert len(seen) == 2
        resolver.invalidate(DID)
        await resolver.resolve(DID)
        assert len(seen) == 3

    asyncio.run(go())


def test_concurrent_lookups_share_one_request() -> None:
    async def go() -> None:
        gate = asyncio.Event()
        calls = 0

        async def handler(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            await gate.wait()
            return httpx.Response(200, json=doc())

        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        resolver = DidResolver("https://plc.test", client=client)
        tasks = [asyncio.ensure_future(resolver.resolve(DID)) for _ in range(5)]
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert calls == 1
        assert {r.did for r in results} == {DID}

    asyncio.run(go())


@pytest.mark.parametrize(("status", "reason"), [(404, "not_found"), (410, "tombstoned"), (400, "http_error")])
def test_client_errors_are_not_retried(status: int, reason: str) -> None:
    resolver, seen = make(lambda r: httpx.Response(status, json={"message": "nope"}))
    with pytest.raises(DidResolutionError) as info:
        asyncio.run(resolver.resolve(DID))
    assert info.value.reason == reason
    assert not info.value.retryable
    assert len(seen) == 1


def test_5xx_and_429_are_retried_then_reported() -> None:
    codes = iter([503, 429, 200])
    metrics = Metrics(CollectorRegistry())
    resolver, seen = make(lambda r: httpx.Response(next(codes), json=doc()), metrics=metrics)
    ident = asyncio.run(resolver.resolve(DID))
    assert ident.did == DID
    assert len(seen) == 3
    reg = metrics.registry
    assert reg.get_sample_value("atproto_backfill_pds_retries_total",
                                {"host_class": "plc", "reason": "5xx"}) == 1
    assert reg.get_sample_value("atproto_backfill_pds_retries_total",
                                {"host_class": "plc", "reason": "429"}) == 1
    assert reg.get_sample_value("atproto_backfill_pds_requests_total",
                                {"host_class": "plc", "status": "2xx"}) == 1

    resolver2, seen2 = make(lambda r: httpx.Response(502), attempts=3)
    with pytest.raises(DidResolutionError) as info:
        asyncio.run(resolver2.resolve(DID))
    assert info.value.reason == "unavailable"
    assert info.value.retryable
    assert len(seen2) == 3


def test_timeouts_are_retried() -> None:
    state = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        state["n"] += 1
        if state["n"] == 1:
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(200, json=doc())

    resolver, _ = make(handler)
    assert asyncio.run(resolver.resolve(DID)).did == DID
    assert state["n"] == 2


@pytest.mark.parametrize("body", [
    b"not json",
    orjson.dumps(doc(did="did:plc:someoneelseentirelyxxxx")),  # a document for another DID
    orjson.dumps({"id": DID, "service": "not a list"}),
    orjson.dumps(doc(pds="https://pds.example.com/path?q=1")),
])
def test_malformed_documents_are_invalid(body: bytes) -> None:
    resolver, _ = make(lambda r: httpx.Response(200, content=body))
    with pytest.raises(DidResolutionError) as info:
        asyncio.run(resolver.resolve(DID))
    assert info.value.reason == "invalid_document"
    assert info.value.drop_reason == "invalid_record"


def test_oversize_document_is_refused() -> None:
    big = b" " * (MAX_DOCUMENT_BYTES + 10) + orjson.dumps(doc())
    resolver, _ = make(lambda r: httpx.Response(200, content=big))
    with pytest.raises(DidResolutionError) as info:
        asyncio.run(resolver.resolve(DID))
    assert info.value.reason == "oversize"


def test_did_web_urls() -> None:
    assert did_web_url("did:web:example.com") == "https://example.com/.well-known/did.json"
    assert did_web_url("did:web:localhost%3A8080", "http") == "http://localhost:8080/.well-known/did.json"
    for bad in ("did:web:", "did:web:example.com:user:alice", "did:web:ex%2Fample.com"):
        with pytest.raises(DidResolutionError) as info:
            did_web_url(bad)
        assert info.value.reason == "unsupported_did"


def test_did_web_resolution() -> None:
    did = "did:web:pds.example.com"
    resolver, seen = make(lambda r: httpx.Response(200, json=doc(did=did)))
    assert asyncio.run(resolver.resolve(did)).did == did
    assert str(seen[0].url) == "https://pds.example.com/.well-known/did.json"


def test_unsupported_methods() -> None:
    resolver, seen = make(lambda r: httpx.Response(200, json=doc()))
    for did in ("did:key:z6Mkfoo", "did:plc:bad/../x", "notadid"):
        with pytest.raises(DidResolutionError) as info:
            asyncio.run(resolver.resolve(did))
        assert info.value.reason == "unsupported_did"
    assert not seen


def test_lru_bound() -> None:
    dids = [f"did:plc:{'a' * 23}{c}" for c in "bcdef"]
    resolver, seen = make(lambda r: httpx.Response(200, json=doc(did=r.url.path.strip("/"))), max_entries=2)

    async def go() -> None:
        for d in dids:
            await resolver.resolve(d)
        await resolver.resolve(dids[-1])
        await resolver.resolve(dids[0])

    asyncio.run(go())
    assert len(seen) == 6  # the newest stayed cached, the oldest was evicted

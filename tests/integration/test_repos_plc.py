"""The PLC directory simulator against the DID resolver, over loopback HTTP."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from producers.identity.resolver import DidResolutionError, DidResolver
from producers.netsafety import NetworkPolicy
from runtime.atproto.crypto import KeyPair
from runtime.simulator.plc import PlcDirectory, PlcSimulator, did_document, load_documents

pytestmark = pytest.mark.integration

DID = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"


@pytest.fixture
def plc() -> Iterator[PlcSimulator]:
    sim = PlcSimulator().start_in_thread()
    try:
        yield sim
    finally:
        sim.stop_thread()


def test_resolve_register_tombstone(plc: PlcSimulator) -> None:
    key = KeyPair.generate("p256", random.Random(3))
    plc.directory.register(did_document(DID, key.multikey(), "https://pds.example.com", "bob.test"))

    async def go() -> None:
        async with DidResolver(plc.url) as resolver:
            ident = await resolver.resolve(DID)
            assert ident.signing_key == key.did_key()
            assert ident.pds_endpoint == "https://pds.example.com"
            with pytest.raises(DidResolutionError) as info:
                await resolver.resolve("did:plc:bbbbbbbbbbbbbbbbbbbbbbbb")
            assert info.value.reason == "not_found"
            plc.directory.tombstone(DID)
            resolver.invalidate(DID)
            with pytest.raises(DidResolutionError) as info:
                await resolver.resolve(DID)
            assert info.value.reason == "tombstoned"

    asyncio.run(go())
    assert plc.directory.requests[DID] == 2


def test_register_over_http(plc: PlcSimulator) -> None:
    key = KeyPair.generate("k256", random.Random(4))
    doc = did_document(DID, key.multikey(), "https://pds.example.com")
    resp = httpx.post(f"{plc.url}/{DID}", json=doc)
    assert resp.status_code == 200
    assert httpx.get(f"{plc.url}/{DID}").json() == doc
    assert httpx.post(f"{plc.url}/did:plc:other", json=doc).status_code == 400


def test_did_web_host_on_loopback_is_refused_without_allow_private(plc: PlcSimulator) -> None:
    # plc.url's host (127.0.0.1) is trusted as configuration; a did:web naming another name that
    # resolves to loopback is untrusted input and hits the guard.
    port = plc.server.port
    did = f"did:web:localhost%3A{port}"

    async def go(policy: NetworkPolicy) -> str:
        async with DidResolver(plc.url, policy=policy, did_web_scheme="http", attempts=1) as resolver:
            try:
                await resolver.resolve(did)
            except DidResolutionError as e:
                return e.reason
        return "ok"

    assert asyncio.run(go(NetworkPolicy())) == "unsafe_endpoint"
    # allowed: the PLC simulator answers 404 for /.well-known/did.json (not a DID path)
    assert asyncio.run(go(NetworkPolicy(allow_private=True))) == "not_found"


def test_serves_the_captured_did_documents(fixtures_dir: Path) -> None:
    docs = load_documents(fixtures_dir / "did_docs.json.zst")
    sim = PlcSimulator(PlcDirectory(docs)).start_in_thread()
    try:
        async def go() -> int:
            async with DidResolver(sim.url) as resolver:
                idents = [await resolver.resolve(did) for did in list(docs)[:20] if did.startswith("did:plc:")]
            assert all(i.signing_key and i.pds_endpoint for i in idents)
            return len(idents)

        assert asyncio.run(go()) > 0
    finally:
        sim.stop_thread()

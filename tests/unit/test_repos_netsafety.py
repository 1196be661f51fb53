"""The outbound-connection guard: non-public addresses refused at connect time, redirects included."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from producers.netsafety import NetworkPolicy, UnsafeEndpointError, guarded_client, is_public_address


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True),
    ("2606:4700:4700::1111", True),
    ("127.0.0.1", False),
    ("10.1.2.3", False),
    ("172.16.0.1", False),
    ("192.168.1.1", False),
    ("169.254.169.254", False),  # cloud metadata
    ("100.64.0.1", False),  # CGNAT
    ("0.0.0.0", False),
    ("224.0.0.1", False),
    ("::1", False),
    ("fe80::1", False),
    ("fd00:ec2::254", False),  # AWS IPv6 metadata
    ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
    ("::ffff:8.8.8.8", True),
    ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
])
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(address) is public


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"http://internal.test:{self.server.server_address[1]}/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def server() -> Iterator[int]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _resolver(table: dict[str, list[str]]) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        return table[host]
    return resolve


def test_loopback_refused_unless_allowed(server: int) -> None:
    async def go(policy: NetworkPolicy) -> str:
        async with guarded_client(policy) as client:
            resp = await client.get(f"http://127.0.0.1:{server}/ok")
            return resp.text

    with pytest.raises(UnsafeEndpointError):
        asyncio.run(go(NetworkPolicy()))
    assert asyncio.run(go(NetworkPolicy(allow_private=True))) == "ok"
    assert asyncio.run(go(NetworkPolicy(trusted_hosts=frozenset({"127.0.0.1"})))) == "ok"


def test_names_resolving_to_private_addresses_are_refused(server: int) -> None:
    # "pds.test" resolves to a public and a private address: refused (every address is vetted).
    table = {"pds.test": ["8.8.8.8", "127.0.0.1"]}

    async def go() -> None:
        async with guarded_client(NetworkPolicy(), resolver=_resolver(table)) as client:
            await client.get(f"http://pds.test:{server}/ok")

    with pytest.raises(UnsafeEndpointError) as info:
        asyncio.run(go())
    assert info.value.address == "127.0.0.1"


def test_redirect_to_private_address_is_refused(server: int) -> None:
    # The first hop is a trusted host; the redirect target resolves to loopback and is refused.
    table = {"internal.test": ["127.0.0.1"]}
    policy = NetworkPolicy(trusted_hosts=frozenset({"127.0.0.1"}))

    async def go() -> None:
        async with guarded_client(policy, resolver=_resolver(table)) as client:
            await client.get(f"http://127.0.0.1:{server}/redirect")

    with pytest.raises(UnsafeEndpointError):
        asyncio.run(go())


def test_unresolvable_name_is_a_connect_error() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return []

    async def go() -> None:
        async with guarded_client(NetworkPolicy(), resolver=resolve) as client:
            await client.get("http://nowhere.test/")

    with pytest.raises(httpx.ConnectError):
        asyncio.run(go())

"""Outbound HTTP to hosts named by untrusted input (DID documents, did:web) without SSRF.

A DID document names its PDS, and a ``did:web`` names its own host: both are attacker-chosen. A
:class:`NetworkPolicy` refuses every address that is not globally routable (loopback, RFC 1918
private, link-local including the cloud metadata address ``169.254.169.254``, CGNAT, unique-local
IPv6, multicast, reserved, unspecified, and IPv4-mapped forms of those) unless private networks
are explicitly allowed (the simulators and tests set ``allow_private``).

The check runs inside the HTTP client's connection step (:class:`GuardedTransport`): the host is
resolved once, *every* address is vetted, and the TCP connection goes to a vetted address, while
TLS still verifies the original host name. So a DNS answer that changes between check and connect
(rebinding) and a redirect to a private address are refused the same way as the first request.
Hosts the operator configured (the PLC directory, the relay) are trusted as they are.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import httpcore
import httpx

from runtime.errors import SourceError

log = logging.getLogger(__name__)

#: Resolves ``(host, port)`` to IP address strings.
Resolver = Callable[[str, int], Awaitable[list[str]]]

#: Blocks the stdlib does not mark as non-global on every Python version we support.
_EXTRA_BLOCKED: Final = (
    ipaddress.ip_network("100.64.0.0/10"),  # carrier-grade NAT (RFC 6598)
    ipaddress.ip_network("fd00:ec2::/32"),  # AWS IPv6 metadata service (also inside fc00::/7)
)


class UnsafeEndpointError(SourceError):
    """A host named by untrusted input resolves to an address we must not connect to.

    Attributes:
        host: the host name (or literal) that was refused.
        address: the offending address.
        reason: always ``unsafe_endpoint`` (the drop reason).
    """

    reason: Final = "unsafe_endpoint"

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"refusing to connect to {host!r}: it resolves to non-public address {address} "
                         "(pass --allow-private-network to allow)")
        self.host = host
        self.address = address


def is_public_address(address: str) -> bool:
    """True when ``address`` (an IPv4/IPv6 literal) is globally routable and not a metadata address.

    Raises:
        ValueError: ``address`` is not an IP literal.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return is_public_address(str(mapped))
    if not ip.is_global or ip.is_multicast:
        return False
    return not any(ip in net for net in _EXTRA_BLOCKED if net.version == ip.version)


def _ip_literal(host: str) -> str | None:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    return text


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the operating system (``getaddrinfo``), TCP addresses, de-duplicated in order.

    Raises:
        httpcore.ConnectError: the name does not resolve.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise httpcore.ConnectError(f"cannot resolve {host}: {e}") from e
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in out:
            out.append(addr)
    return out


@dataclass(frozen=True)
class NetworkPolicy:
    """Which hosts outbound connections may reach.

    Args:
        allow_private: allow every address (tests, the simulator, a private deployment).
        trusted_hosts: host names configured by the operator (PLC directory, relay); never vetted.
    """

    allow_private: bool = False
    trusted_hosts: frozenset[str] = field(default_factory=frozenset)

    def with_trusted(self, urls: Iterable[str]) -> NetworkPolicy:
        """A copy that also trusts the hosts of ``urls`` (operator-configured endpoints)."""
        hosts = {h.lower() for h in (httpx.URL(u).host for u in urls) if h}
        return NetworkPolicy(self.allow_private, self.trusted_hosts | hosts)

    def trusts(self, host: str) -> bool:
        """True when ``host`` needs no vetting."""
        return self.allow_private or host.lower().strip("[]") in self.trusted_hosts

    async def vet(self, host: str, port: int, resolver: Resolver = system_resolver) -> list[str]:
        """The addresses to connect to for ``host``; every one of them is public.

        Raises:
            UnsafeEndpointError: some address of ``host`` is not public.
            httpcore.ConnectError: ``host`` does not resolve.
        """
        literal = _ip_literal(host)
        if self.trusts(host):
            return [literal or host]
        addresses = [literal] if literal is not None else await resolver(host, port)
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        for addr in addresses:
            if not is_public_address(addr):
                raise UnsafeEndpointError(host, addr)
        return addresses


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to addresses the policy allows.

    Args:
        policy: the network policy.
        inner: the backend doing the real I/O (httpcore's anyio backend by default).
        resolver: name resolution (injected in tests).
    """

    def __init__(self, policy: NetworkPolicy, inner: httpcore.AsyncNetworkBackend | None = None,
                 resolver: Resolver = system_resolver) -> None:
        self._policy = policy
        self._inner = inner or httpcore.AnyIOBackend()
        self._resolver = resolver

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        """Vet ``host``, then connect to its first reachable vetted address."""
        addresses = await self._policy.vet(host, port, self._resolver)
        last: Exception | None = None
        for addr in addresses:
            try:
                return await self._inner.connect_tcp(addr, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                last = e
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        """Unix sockets are never reachable from untrusted input."""
        raise UnsafeEndpointError(path, "unix socket")

    async def sleep(self, seconds: float) -> None:
        """Delegate to the inner backend."""
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport whose connection pool dials through a :class:`GuardedBackend`.

    httpx exposes no network-backend option, so the pool it builds is replaced by an identical one
    with the guarded backend; request mapping and exception translation stay httpx's own.
    """

    def __init__(self, policy: NetworkPolicy, *, limits: httpx.Limits | None = None,
                 resolver: Resolver = system_resolver, verify: bool = True, retries: int = 0) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(limits=limits, verify=verify, trust_env=False, retries=retries)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            retries=retries,
            network_backend=GuardedBackend(policy, resolver=resolver),
        )


def status_class(code: int) -> str:
    """The status label of an HTTP answer in the request metrics: ``429``, ``2xx`` .. ``5xx``, or ``error``."""
    if code == 429:
        return "429"
    return f"{code // 100}xx" if 200 <= code < 600 else "error"


def guarded_client(policy: NetworkPolicy, *, timeout: httpx.Timeout | float = 30.0,
                   limits: httpx.Limits | None = None, resolver: Resolver = system_resolver,
                   headers: dict[str, str] | None = None, follow_redirects: bool = True,
                   max_redirects: int = 3) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` whose every connection (redirects included) obeys ``policy``."""
    lim = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
    transport = GuardedTransport(policy, limits=lim, resolver=resolver)
    return httpx.AsyncClient(transport=transport, timeout=timeout, headers=headers,
                             follow_redirects=follow_redirects, max_redirects=max_redirects, trust_env=False)

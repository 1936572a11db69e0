"""Server-side request forgery guard for registry hosts.

An image name is user input: whoever can create a Pod chooses the host pinhook sends HTTP
requests to. Without a guard, ``169.254.169.254/latest:meta-data`` or ``10.0.0.7:2379/x``
would make the webhook probe cloud metadata services and cluster-internal endpoints from
inside the control plane. The guard refuses, unless allow-listed, hosts that are IP literals
or that resolve to non-public addresses.

It is applied twice: before a request (so the error names the host plainly), and when the
connection is made (:class:`GuardedBackend`), which connects only to addresses the guard
checked, from the same lookup. A DNS server that answers a public address to the check and a
private one to the connection (DNS rebinding) has nothing to exploit; the egress
NetworkPolicy stays the second line of defence.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable

import httpcore

from .. import errors
from .dns import HostResolver, IPAddress
from .streams import AsyncioBackend

DEFAULT_LOOKUP_SECONDS = 10.0
# Not covered by the ipaddress module's is_private in every Python version.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def is_forbidden_address(ip: IPAddress) -> bool:
    """Whether connecting to ``ip`` could reach something that is not the public internet."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return is_forbidden_address(ip.ipv4_mapped)
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return True
    return (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_private
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or not ip.is_global
    )


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address if ``host`` is an IP literal (IPv6 with or without brackets), else None."""
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    # A zone index ("fe80::1%eth0") still names a link-local address.
    candidate = candidate.split("%", 1)[0]
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        return None


def _allow_keys(host: str, port: int | None) -> set[str]:
    bare = host.lower().strip("[]")
    written = f"[{bare}]" if ":" in bare else bare  # IPv6 entries are written with brackets
    keys = {bare, written}
    if port is not None:
        keys.add(f"{written}:{port}")
    return keys


class HostGuard:
    """Decides whether pinhook may send requests to a host, and at which addresses.

    ``allowed_hosts`` holds ``host`` or ``host:port`` entries (``[::1]:5000`` for IPv6) that
    skip every check: in-cluster registries, mirrors on private addresses, test registries.
    """

    def __init__(self, allowed_hosts: Iterable[str] = (), *, resolver: HostResolver) -> None:
        self._allowed = frozenset(entry.strip().lower() for entry in allowed_hosts)
        self._resolver = resolver

    def is_allow_listed(self, host: str, port: int | None = None) -> bool:
        return not _allow_keys(host, port).isdisjoint(self._allowed)

    async def check(
        self, host: str, port: int | None = None, *, deadline: float | None = None
    ) -> None:
        """Return if ``host`` may be contacted; raise :class:`errors.ForbiddenHost` if not.

        ``deadline`` (an absolute ``loop.time()``) bounds the name resolution; past it,
        :class:`errors.DeadlineExceeded`. An allow-listed host passes without a lookup: the
        connection resolves it.
        """
        if not self.is_allow_listed(host, port):
            await self.addresses(host, port, deadline=deadline)

    async def addresses(
        self, host: str, port: int | None = None, *, deadline: float | None = None
    ) -> tuple[IPAddress, ...]:
        """The addresses pinhook may connect to for ``host``; ForbiddenHost when none."""
        literal = parse_ip_literal(host)
        allowed = self.is_allow_listed(host, port)
        if literal is not None:
            if allowed:
                return (literal,)
            raise errors.ForbiddenHost(
                f"registry host {_shown(host, port)} is an IP address; only hosts listed in"
                " registry.allowedHosts may be addressed by IP"
            )
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + DEFAULT_LOOKUP_SECONDS
        found = await self._resolver.resolve(host, port or 443, deadline)
        if allowed:
            return found
        forbidden = sorted({str(ip) for ip in found if is_forbidden_address(ip)})
        if forbidden:
            raise errors.ForbiddenHost(
                f"registry host {_shown(host, port)} resolves to non-public address(es) "
                f"{', '.join(forbidden)}; add it to registry.allowedHosts if this is intended"
            )
        return found


def _shown(host: str, port: int | None) -> str:
    return f"{host}:{port}" if port is not None else host


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses the guard allows.

    TLS still verifies the certificate against the name (httpcore passes the URL's host as
    the server name), so connecting by address changes nothing for the registry.
    """

    def __init__(self, guard: HostGuard, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._guard = guard
        self._inner = inner or AsyncioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else DEFAULT_LOOKUP_SECONDS)
        addresses = await self._guard.addresses(host, port, deadline=deadline)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=max(deadline - loop.time(), 0.001),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc  # try the next address, as getaddrinfo-based connects do
        assert failure is not None  # the resolver never returns an empty answer
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("registries are reached over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)

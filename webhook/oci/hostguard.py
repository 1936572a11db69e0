"""Server-side request forgery guard for registry hosts.

An image name is user input: whoever can create a Pod chooses the host pinhook sends HTTP
requests to. Without a guard, ``169.254.169.254/latest:meta-data`` or ``10.0.0.7:2379/x``
would make the webhook probe cloud metadata services and cluster-internal endpoints from
inside the control plane. The guard refuses, unless allow-listed, hosts that are IP literals
or that resolve to non-public addresses.

Limits, stated honestly: the check resolves the name, and the HTTP client resolves it again
when it connects. A DNS server under an attacker's control can answer a public address to
the guard and a private one to the connection (DNS rebinding); positive caching here narrows
that window only for repeat lookups. Closing it fully needs connecting to the exact address
that was checked (pinning the resolved IP in the transport, with SNI/Host kept on the name),
or an egress NetworkPolicy for the webhook's Pods, which is the recommended deployment.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Iterable

from ..errors import DeadlineExceeded, ForbiddenHost, RegistryUnavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Not covered by the ipaddress module's is_private in every Python version.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")

POSITIVE_CACHE_SECONDS = 30.0


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
    """Decides whether pinhook may send requests to a host.

    ``allowed_hosts`` holds ``host`` or ``host:port`` entries (``[::1]:5000`` for IPv6) that
    skip every check: in-cluster registries, mirrors on private addresses, test registries.
    """

    def __init__(
        self,
        allowed_hosts: Iterable[str] = (),
        *,
        cache_seconds: float = POSITIVE_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._allowed = frozenset(entry.strip().lower() for entry in allowed_hosts)
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._allowed_until: dict[tuple[str, int | None], float] = {}

    def is_allow_listed(self, host: str, port: int | None = None) -> bool:
        return not _allow_keys(host, port).isdisjoint(self._allowed)

    async def check(
        self, host: str, port: int | None = None, *, deadline: float | None = None
    ) -> None:
        """Return if ``host`` may be contacted; raise :class:`ForbiddenHost` if not.

        ``deadline`` (an absolute ``loop.time()``) bounds the name resolution; past it,
        :class:`DeadlineExceeded`.
        """
        if self.is_allow_listed(host, port):
            return
        shown = f"{host}:{port}" if port is not None else host
        if parse_ip_literal(host) is not None:
            raise ForbiddenHost(
                f"registry host {shown} is an IP address; only allow-listed hosts may be "
                "addressed by IP"
            )
        key = (host.lower(), port)
        if self._allowed_until.get(key, 0.0) > self._clock():
            return
        addresses = await self._resolve(host, port, deadline)
        forbidden = sorted({str(ip) for ip in addresses if is_forbidden_address(ip)})
        if forbidden:
            raise ForbiddenHost(
                f"registry host {shown} resolves to non-public address(es) "
                f"{', '.join(forbidden)}; add it to the allowed hosts if this is intended"
            )
        self._forget_expired()
        self._allowed_until[key] = self._clock() + self._cache_seconds

    async def _resolve(
        self, host: str, port: int | None, deadline: float | None
    ) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                infos = await loop.getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
        except TimeoutError as exc:
            raise DeadlineExceeded(f"resolving registry host {host} timed out") from exc
        except OSError as exc:
            raise RegistryUnavailable(f"cannot resolve registry host {host}: {exc}") from exc
        addresses: list[IPAddress] = []
        for info in infos:
            literal = parse_ip_literal(str(info[4][0]))
            if literal is not None:
                addresses.append(literal)
        if not addresses:
            raise RegistryUnavailable(f"registry host {host} resolves to no IP address")
        return addresses

    def _forget_expired(self) -> None:
        now = self._clock()
        for key in [key for key, until in self._allowed_until.items() if until <= now]:
            del self._allowed_until[key]

"""Name lookups for registry hosts: bounded, timed and cached.

Every host an image names is looked up here, both for the private-address guard and for the
connection itself, so the address the guard checked is the address pinhook connects to (no DNS
rebinding between the two). The system resolver blocks a thread per lookup; these lookups get
their own small pool instead of the loop's default executor, one lookup per name however many
callers want it at once, each caller bounded by its own deadline, answers kept for a short TTL
and served stale while they are refreshed, and failures remembered briefly. Names that have
resolved before get a pool of their own, so a flood of names whose DNS hangs (a hostile Pod
can name sixty) can fill only the pool for new names: the registries in use keep resolving.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import DeadlineExceeded, RegistryUnavailable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Lookup = Callable[[str, int], list[IPAddress]]  # blocking, like getaddrinfo

POSITIVE_TTL_SECONDS = 30.0
NEGATIVE_TTL_SECONDS = 5.0
STALE_MAX_SECONDS = 300.0
LOOKUP_THREADS = 16  # for names never resolved before
KNOWN_LOOKUP_THREADS = 4  # refreshing names that resolved before
MAX_NAMES = 4096


def system_lookup(host: str, port: int) -> list[IPAddress]:
    """The system resolver (getaddrinfo, so /etc/hosts and search domains apply)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = []
    for info in infos:
        try:
            addresses.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    return list(dict.fromkeys(addresses))


@dataclass(slots=True)
class _Answer:
    addresses: tuple[IPAddress, ...]  # empty: the lookup failed with ``error``
    error: str
    fresh_until: float
    usable_until: float  # served stale (while a refresh runs) until then


class HostResolver:
    def __init__(
        self,
        *,
        lookup: Lookup = system_lookup,
        threads: int = LOOKUP_THREADS,
        known_threads: int = KNOWN_LOOKUP_THREADS,
        ttl: float = POSITIVE_TTL_SECONDS,
        negative_ttl: float = NEGATIVE_TTL_SECONDS,
        stale_max: float = STALE_MAX_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pinhook-dns")
        self._known_pool = ThreadPoolExecutor(known_threads, thread_name_prefix="pinhook-dns-known")
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._stale_max = stale_max
        self._clock = clock
        self._answers: dict[str, _Answer] = {}
        self._pending: dict[str, asyncio.Future[_Answer]] = {}

    async def resolve(self, host: str, port: int, deadline: float) -> tuple[IPAddress, ...]:
        """The addresses of ``host``; RegistryUnavailable when it has none, DeadlineExceeded
        when the lookup does not end before ``deadline`` (the loop's clock)."""
        name = host.lower().rstrip(".")
        now = self._clock()
        answer = self._answers.get(name)
        if answer is not None and answer.fresh_until > now:
            return _addresses(host, answer)
        if answer is not None and answer.addresses and answer.usable_until > now:
            self._start(name, port)  # refresh behind the caller's back
            return answer.addresses
        future = self._start(name, port)
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            answer = await asyncio.wait_for(asyncio.shield(future), max(remaining, 0))
        except TimeoutError:
            raise DeadlineExceeded(f"resolving registry host {host} timed out") from None
        return _addresses(host, answer)

    def _start(self, name: str, port: int) -> asyncio.Future[_Answer]:
        pending = self._pending.get(name)
        if pending is not None:
            return pending
        loop = asyncio.get_running_loop()
        previous = self._answers.get(name)
        pool = self._known_pool if previous is not None and previous.addresses else self._pool
        future = loop.run_in_executor(pool, self._ask, name, port)
        self._pending[name] = future
        future.add_done_callback(lambda done: self._settle(name, done))
        return future

    def _ask(self, name: str, port: int) -> _Answer:
        """Runs on a pool thread; never raises."""
        try:
            addresses = tuple(self._lookup(name, port))
            error = "" if addresses else "no IP address"
        except OSError as exc:
            addresses, error = (), str(exc) or type(exc).__name__
        now = self._clock()
        if not addresses:
            return _Answer((), error, now + self._negative_ttl, now + self._negative_ttl)
        return _Answer(addresses, "", now + self._ttl, now + self._ttl + self._stale_max)

    def _settle(self, name: str, future: asyncio.Future[_Answer]) -> None:
        self._pending.pop(name, None)
        if future.cancelled():
            return
        answer = future.result()
        previous = self._answers.get(name)
        if not answer.addresses and previous is not None and previous.addresses:
            # A failed refresh keeps the last good answer until it is no longer usable.
            return
        if len(self._answers) >= MAX_NAMES:
            self._forget_expired()
        self._answers[name] = answer

    def _forget_expired(self) -> None:
        now = self._clock()
        for name in [n for n, a in self._answers.items() if a.usable_until <= now]:
            del self._answers[name]
        if len(self._answers) >= MAX_NAMES:
            self._answers.clear()

    def close(self) -> None:
        for pool in (self._pool, self._known_pool):
            pool.shutdown(wait=False, cancel_futures=True)


def _addresses(host: str, answer: _Answer) -> tuple[IPAddress, ...]:
    if not answer.addresses:
        raise RegistryUnavailable(f"cannot resolve registry host {host}: {answer.error}")
    return answer.addresses

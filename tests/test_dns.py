"""Name lookups cannot starve each other, and pinhook connects to the addresses it checked.

The system resolver is replaced by a lookup function of the test's own (fault injection): one
that hangs for some names, as a DNS server that never answers does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NoReturn

import httpcore
import pytest

from tests.harness.fixtures import RegistryEnv
from tests.harness.push import OCI_INDEX
from webhook import errors
from webhook.oci.credential import ANONYMOUS
from webhook.oci.dns import HostResolver, IPAddress
from webhook.oci.hostguard import GuardedBackend, HostGuard
from webhook.oci.reference import ImageRef
from webhook.oci.registry import RegistryClient
from webhook.oci.transport import RegistryOptions

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@dataclass
class FakeDns:
    """Answers ``good`` names with loopback; names ending in ``.hang.test`` never answer."""

    good: set[str] = field(default_factory=set)
    released: threading.Event = field(default_factory=threading.Event)
    asked: list[str] = field(default_factory=list)

    def lookup(self, host: str, port: int) -> list[IPAddress]:
        self.asked.append(host)
        if host.endswith(".hang.test"):
            self.released.wait(30)
            raise OSError("timed out")
        if host in self.good:
            return [LOOPBACK]
        raise OSError(f"no such host {host}")


@pytest.fixture
async def dns() -> AsyncIterator[FakeDns]:
    fake = FakeDns()
    yield fake
    fake.released.set()


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_one_name_is_looked_up_once_however_many_ask(dns: FakeDns) -> None:
    dns.good.add("registry.test")
    resolver = HostResolver(lookup=dns.lookup)
    answers = await asyncio.gather(
        *(resolver.resolve("registry.test", 443, deadline_in(5)) for _ in range(50))
    )
    assert answers == [(LOOPBACK,)] * 50
    assert dns.asked == ["registry.test"]
    resolver.close()


async def test_each_caller_is_bounded_by_its_own_deadline(dns: FakeDns) -> None:
    resolver = HostResolver(lookup=dns.lookup)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.DeadlineExceeded, match=r"a\.hang\.test"):
        await resolver.resolve("a.hang.test", 443, deadline_in(0.2))
    assert loop.time() - started < 2
    resolver.close()


async def test_a_failed_lookup_is_remembered_briefly(dns: FakeDns) -> None:
    clock = Clock()
    resolver = HostResolver(lookup=dns.lookup, negative_ttl=5, clock=clock)
    for _ in range(3):
        with pytest.raises(errors.RegistryUnavailable, match="no such host"):
            await resolver.resolve("gone.test", 443, deadline_in(5))
    assert dns.asked == ["gone.test"]
    clock.now += 6
    with pytest.raises(errors.RegistryUnavailable):
        await resolver.resolve("gone.test", 443, deadline_in(5))
    assert dns.asked == ["gone.test", "gone.test"]
    resolver.close()


async def test_names_whose_dns_hangs_do_not_delay_a_registry_in_use(dns: FakeDns) -> None:
    # Before: guard and connections shared the loop's six-thread executor, so a Pod with 60
    # images on hanging names made an unrelated, allow-listed registry time out.
    dns.good.add("registry.test")
    clock = Clock()
    resolver = HostResolver(lookup=dns.lookup, ttl=30, stale_max=0, clock=clock)
    assert await resolver.resolve("registry.test", 443, deadline_in(5)) == (LOOPBACK,)
    flood = [
        asyncio.ensure_future(resolver.resolve(f"n{i}.hang.test", 443, deadline_in(30)))
        for i in range(60)
    ]
    await asyncio.sleep(0)
    clock.now += 31  # the registry's answer expired: it must be looked up again now
    assert await resolver.resolve("registry.test", 443, deadline_in(1)) == (LOOPBACK,)
    assert dns.asked.count("registry.test") == 2
    dns.released.set()
    await asyncio.gather(*flood, return_exceptions=True)
    resolver.close()


async def test_an_expired_answer_is_served_while_it_is_refreshed(dns: FakeDns) -> None:
    dns.good.add("registry.test")
    clock = Clock()
    resolver = HostResolver(lookup=dns.lookup, ttl=30, stale_max=300, clock=clock)
    await resolver.resolve("registry.test", 443, deadline_in(5))
    clock.now += 31
    dns.good.clear()  # the refresh will fail: the last good answer stays usable
    assert await resolver.resolve("registry.test", 443, deadline_in(5)) == (LOOPBACK,)
    await asyncio.sleep(0.05)  # the refresh runs on a pool thread; nothing to await
    assert await resolver.resolve("registry.test", 443, deadline_in(5)) == (LOOPBACK,)
    resolver.close()


@pytest.fixture
async def client_with(dns: FakeDns) -> AsyncIterator[Callable[[RegistryOptions], RegistryClient]]:
    made: list[RegistryClient] = []

    def make(options: RegistryOptions) -> RegistryClient:
        made.append(RegistryClient(options, resolver=HostResolver(lookup=dns.lookup)))
        return made[-1]

    yield make
    dns.released.set()
    for client in made:
        await client.aclose()


async def test_a_pod_of_hanging_names_leaves_a_named_registry_resolving(
    registry: RegistryEnv,
    dns: FakeDns,
    client_with: Callable[[RegistryOptions], RegistryClient],
) -> None:
    port = registry.host.rsplit(":", 1)[1]
    named = f"registry.test:{port}"
    dns.good.add("registry.test")
    pushed = registry.push.index("dns/app", "1.0", OCI_INDEX)
    hanging = [f"n{i}.hang.test:{port}" for i in range(60)]
    options = RegistryOptions(
        insecure_registries=frozenset([named, *hanging]),
        allowed_hosts=frozenset([named, *hanging]),
    )
    client = client_with(options)
    ref = ImageRef.parse(f"{named}/dns/app:1.0")
    assert await client.resolve_digest(ref, ANONYMOUS, deadline=deadline_in(5)) == pushed.digest
    flood = [
        asyncio.ensure_future(
            client.resolve_digest(ImageRef.parse(f"{h}/x:1"), ANONYMOUS, deadline=deadline_in(20))
        )
        for h in hanging
    ]
    await asyncio.sleep(0)
    # The registry in use answers while sixty lookups hang.
    assert await client.resolve_digest(ref, ANONYMOUS, deadline=deadline_in(2)) == pushed.digest
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Where connections were asked to go; none is made."""

    def __init__(self) -> None:
        self.addresses: list[str] = []

    async def connect_tcp(self, host: str, port: int, **_options: object) -> NoReturn:  # type: ignore[override]
        self.addresses.append(host)
        raise httpcore.ConnectError("recorded, not connected")


PUBLIC = ipaddress.ip_address("93.184.216.34")


async def test_the_connection_goes_to_the_address_that_was_checked() -> None:
    # DNS rebinding: the check sees a public address, a second lookup would see loopback.
    # One lookup serves both, so the connection is made to the address that was checked.
    answers = [[PUBLIC], [LOOPBACK]]
    resolver = HostResolver(lookup=lambda host, port: answers.pop(0))
    guard = HostGuard(resolver=resolver)
    inner = RecordingBackend()
    await guard.check("rebind.test", 443, deadline=deadline_in(5))
    with pytest.raises(httpcore.ConnectError):
        await GuardedBackend(guard, inner).connect_tcp("rebind.test", 443, timeout=5)
    assert inner.addresses == [str(PUBLIC)]
    resolver.close()


async def test_a_name_resolving_to_a_private_address_is_never_connected_to() -> None:
    resolver = HostResolver(lookup=lambda host, port: [LOOPBACK])
    inner = RecordingBackend()
    backend = GuardedBackend(HostGuard(resolver=resolver), inner)
    with pytest.raises(errors.ForbiddenHost, match="non-public"):
        await backend.connect_tcp("private.test", 443, timeout=5)
    assert inner.addresses == []
    resolver.close()


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterator

import pytest

from webhook import errors
from webhook.oci.dns import HostResolver
from webhook.oci.hostguard import HostGuard, is_forbidden_address, parse_ip_literal
from webhook.oci.reference import split_host_port


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "169.254.169.254",
        "fe80::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "fc00::1",
        "fd12:3456::1",
        "100.64.0.1",
        "100.127.255.254",
        "224.0.0.1",
        "ff02::1",
        "0.0.0.0",
        "::",
        "240.0.0.1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
    ],
)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "100.128.0.1"])
def test_public_addresses_are_not_forbidden(address: str) -> None:
    assert not is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("registry.example.com:5000", ("registry.example.com", 5000)),
        ("registry.example.com", ("registry.example.com", None)),
        ("[::1]:5000", ("::1", 5000)),
        ("[fe80::1]", ("fe80::1", None)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(text) == expected


@pytest.fixture
def guard() -> Iterator[Callable[..., HostGuard]]:
    resolvers: list[HostResolver] = []

    def make(*allowed: str) -> HostGuard:
        resolvers.append(HostResolver())
        return HostGuard(allowed, resolver=resolvers[-1])

    yield make
    for resolver in resolvers:
        resolver.close()


def test_ip_literal_recognises_bracketed_and_zoned_ipv6() -> None:
    assert parse_ip_literal("[::1]") == ipaddress.ip_address("::1")
    assert parse_ip_literal("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert parse_ip_literal("quay.io") is None


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("127.0.0.1", 5000),
        ("::1", None),
        ("169.254.169.254", None),
        ("fe80::1", 443),
        ("10.0.0.7", 2379),
        ("192.168.0.1", None),
        ("100.64.1.1", None),
        ("fd00::5", None),
        ("239.1.2.3", None),
        ("8.8.8.8", None),  # public, but still an IP literal
    ],
)
async def test_ip_literals_are_refused(
    guard: Callable[..., HostGuard], host: str, port: int | None
) -> None:
    with pytest.raises(errors.ForbiddenHost, match="IP address"):
        await guard().check(host, port)


async def test_localhost_is_refused_because_it_resolves_to_loopback(
    guard: Callable[..., HostGuard],
) -> None:
    with pytest.raises(errors.ForbiddenHost, match="non-public"):
        await guard().check("localhost", 5000)


@pytest.mark.parametrize(
    ("allowed", "host", "port"),
    [
        ("127.0.0.1:5000", "127.0.0.1", 5000),
        ("127.0.0.1", "127.0.0.1", 5000),
        ("localhost", "localhost", None),
        ("LOCALHOST:5000", "localhost", 5000),
        ("[::1]:5000", "::1", 5000),
        ("::1", "[::1]", None),
        ("registry.internal", "Registry.Internal", 443),
    ],
)
async def test_allow_listed_hosts_pass(
    guard: Callable[..., HostGuard], allowed: str, host: str, port: int | None
) -> None:
    await guard(allowed).check(host, port)


async def test_allow_listing_a_port_does_not_allow_other_ports(
    guard: Callable[..., HostGuard],
) -> None:
    allowed = guard("127.0.0.1:5000")
    await allowed.check("127.0.0.1", 5000)
    with pytest.raises(errors.ForbiddenHost):
        await allowed.check("127.0.0.1", 5001)


async def test_passed_deadline_bounds_resolution(guard: Callable[..., HostGuard]) -> None:
    deadline = asyncio.get_running_loop().time() - 1
    with pytest.raises(errors.DeadlineExceeded):
        await guard().check("localhost", 5000, deadline=deadline)

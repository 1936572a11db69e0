"""The authenticator's bookkeeping: its caches and locks stay bounded, whatever repositories
objects name, and every token request is counted.

Against the loopback fault server acting as registry and token service; the Authenticator is
driven directly, with a small cache limit, so the limit is reached with a few repositories.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import pytest

from tests.faults import FaultServer, Reply, error_reply
from tests.test_registry import MANIFEST_PATH, deadline_in, fault_ref, loopback_options
from webhook import errors
from webhook.metrics import Metrics
from webhook.oci.auth import Authenticator, Target
from webhook.oci.credential import ANONYMOUS, Credential
from webhook.oci.registry import RegistryClient
from webhook.oci.transport import Transport

URL_PATH = MANIFEST_PATH


@pytest.fixture
async def faults() -> AsyncIterator[FaultServer]:
    async with FaultServer() as server:
        yield server


@pytest.fixture
async def transport(faults: FaultServer) -> AsyncIterator[Transport]:
    transport = Transport(loopback_options(faults.host, max_attempts=1))
    try:
        yield transport
    finally:
        await transport.aclose()


def target(faults: FaultServer, repository: str, credential: Credential | None = None) -> Target:
    return Target(
        registry=faults.host,
        host=faults.host,
        base_url=faults.url,
        repository=repository,
        credential=credential,
        deadline=deadline_in(5),
    )


def challenge(faults: FaultServer) -> Reply:
    realm = f'Bearer realm="{faults.url}/token",service="s"'
    return error_reply(401, headers={"WWW-Authenticate": realm})


def token(access: str, refresh: str | None = None, *, gate: asyncio.Event | None = None) -> Reply:
    document: dict[str, object] = {"access_token": access, "expires_in": 300}
    if refresh is not None:
        document["refresh_token"] = refresh
    body = json.dumps(document).encode()
    return Reply(200, {"Content-Type": "application/json"}, body, gate=gate)


async def ask(auth: Authenticator, faults: FaultServer, where: Target) -> int:
    reply = await auth.exchange(where, "GET", f"{faults.url}{URL_PATH}", {})
    return reply.status


def presented_refresh_tokens(faults: FaultServer) -> list[str]:
    posts = [r for r in faults.requests_to("/token") if r.method == "POST"]
    return [parse_qs(r.body.decode())["refresh_token"][0] for r in posts]


async def test_failing_token_requests_leave_no_lock_behind(
    faults: FaultServer, transport: Transport
) -> None:
    # Before: one lock per (host, repository, credential) was kept until a token for it
    # expired, and a token that never came never expired: an object naming new repositories
    # grew the table without end.
    faults.route(URL_PATH, challenge(faults))
    faults.route("/token", Reply(200, {"Content-Type": "application/json"}, b"not json"))
    auth = Authenticator(transport, cache_limit=4)
    for n in range(20):
        with pytest.raises(errors.ProtocolError, match="invalid JSON"):
            await ask(auth, faults, target(faults, f"team/r{n}"))
    assert faults.count(path="/token") == 20
    assert len(auth._token_locks) == 0


async def test_the_token_cache_holds_at_most_its_limit(
    faults: FaultServer, transport: Transport
) -> None:
    # Before: only expired tokens were shed, so tokens of five minutes for new repositories
    # grew the cache past its limit.
    faults.route(URL_PATH, challenge(faults), error_reply(404, "MANIFEST_UNKNOWN"))
    faults.route("/token", token("t"))
    auth = Authenticator(transport, cache_limit=4)
    for n in range(6):
        assert await ask(auth, faults, target(faults, f"team/r{n}")) == 404
    assert faults.count(path="/token") == 6
    assert len(auth._tokens) == 4
    assert await ask(auth, faults, target(faults, "team/r5")) == 404  # the newest: kept
    assert faults.count(path="/token") == 6
    assert await ask(auth, faults, target(faults, "team/r0")) == 404  # the oldest: evicted
    assert faults.count(path="/token") == 7


async def test_the_challenges_proven_per_host_are_bounded_too(faults: FaultServer) -> None:
    # Before: the challenge each host answered with was kept per host with no limit, so
    # images naming ever new registry hosts grew it without end.
    hosts = [f"registry-{n}.example" for n in range(10)]
    # Each host challenges once, then answers.
    faults.route(URL_PATH, *[challenge(faults), error_reply(404, "MANIFEST_UNKNOWN")] * 10)
    faults.route("/token", token("t"))
    transport = Transport(loopback_options(faults.host, *hosts, max_attempts=1))
    try:
        auth = Authenticator(transport, cache_limit=4)
        for host in hosts:
            where = dataclasses.replace(target(faults, "team/app"), host=host)
            assert await ask(auth, faults, where) == 404
        assert 0 < len(auth._proven) <= 4
    finally:
        await transport.aclose()


async def test_a_held_refresh_lock_is_not_evicted(
    faults: FaultServer, transport: Transport
) -> None:
    # Before: keeping another credential's rotated refresh token evicted the lock of one
    # whose exchange was in flight; the next exchange for it took a new lock and presented a
    # refresh token the token service was about to retire.
    alice = Credential("", "", source="test alice", identity_token="a0")
    bob = Credential("", "", source="test bob", identity_token="b0")
    released = asyncio.Event()
    faults.route(URL_PATH, challenge(faults), error_reply(404, "MANIFEST_UNKNOWN"))
    faults.route(
        "/token",
        token("t0", "a1"),
        token("t1", "a2", gate=released),
        token("t2", "b1"),
        token("t3", "a3"),
        method="POST",
    )
    auth = Authenticator(transport, cache_limit=1)
    assert await ask(auth, faults, target(faults, "team/r0", alice)) == 404
    first = asyncio.create_task(ask(auth, faults, target(faults, "team/r1", alice)))
    await faults.hanging.wait()  # alice's exchange of a1 is in flight
    assert await ask(auth, faults, target(faults, "team/r2", bob)) == 404
    second = asyncio.create_task(ask(auth, faults, target(faults, "team/r3", alice)))
    released.set()
    assert await asyncio.gather(first, second) == [404, 404]
    # The second exchange for alice waited for the first, and presented what it rotated to.
    assert presented_refresh_tokens(faults) == ["a0", "a1", "b0", "a2"]


# -- every token request is counted ---------------------------------------------------------


def token_requests(metrics: Metrics, host: str, result: str) -> float | None:
    labels = {"host": host, "result": result}
    return metrics.registry.get_sample_value("pinhook_registry_token_requests_total", labels)


@pytest.mark.parametrize(
    ("realm", "answer", "seconds", "result", "error"),
    [
        ("/token", token("t"), 5, "ok", None),
        ("/token", error_reply(401), 5, "rejected", errors.Unauthorized),
        ("/token", Reply(200, {}, b"not json"), 5, "error", errors.ProtocolError),
        ("/token", error_reply(503), 5, "unavailable", errors.RegistryUnavailable),
        ("/token", Reply(hang=True), 0.5, "timeout", errors.DeadlineExceeded),
        ("http://10.0.0.1/token", token("t"), 5, "forbidden-host", errors.ForbiddenHost),
    ],
    ids=["ok", "rejected", "protocol", "unavailable", "timeout", "forbidden-host"],
)
async def test_every_token_request_is_counted(
    faults: FaultServer,
    realm: str,
    answer: Reply,
    seconds: float,
    result: str,
    error: type[errors.ResolveError] | None,
) -> None:
    # Before: only ok, rejected and protocol errors were counted; a token service that was
    # down, slow or forbidden left no trace in the metric.
    url = realm if realm.startswith("http:") else f"{faults.url}{realm}"
    bearer = error_reply(401, headers={"WWW-Authenticate": f'Bearer realm="{url}",service="s"'})
    faults.route(URL_PATH, bearer, error_reply(404, "MANIFEST_UNKNOWN"))
    faults.route("/token", answer)
    metrics = Metrics()
    options = loopback_options(faults.host, max_attempts=1)
    async with RegistryClient(options, events=metrics) as client:
        lookup = client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(seconds))
        if error is None:
            with pytest.raises(errors.NotFound):
                await lookup
        else:
            with pytest.raises(error):
                await lookup
    assert token_requests(metrics, faults.host, result) == 1.0


async def test_a_cancelled_token_request_is_not_counted(faults: FaultServer) -> None:
    faults.route(URL_PATH, challenge(faults))
    faults.route("/token", Reply(hang=True))
    metrics = Metrics()
    async with RegistryClient(loopback_options(faults.host), events=metrics) as client:
        lookup = asyncio.create_task(
            client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
        )
        await faults.hanging.wait()
        lookup.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lookup
    counted = metrics.registry.get_sample_value
    assert not any(
        counted("pinhook_registry_token_requests_total", {"host": faults.host, "result": r})
        for r in ("ok", "rejected", "error", "unavailable", "timeout", "forbidden-host")
    )

"""The registry client's connection pool (``webhook.oci.pool``): its limit, its queue, and no
connection lost to a caller that gives up."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from functools import partial

import httpcore
import pytest

from tests.faults import FaultServer, Reply, manifest_reply, sample_index
from webhook.oci.connection import RegistryConnection, new_connection
from webhook.oci.pool import ConnectionPool
from webhook.oci.streams import AsyncioBackend

SLOW = "/v2/team/slow/manifests/v1"
FAST = "/v2/team/fast/manifests/v1"

pytestmark = pytest.mark.both_loops


@pytest.fixture
async def faults() -> AsyncIterator[FaultServer]:
    async with FaultServer() as server:
        server.route(FAST, manifest_reply(sample_index()))
        yield server


def _pool(limit: int, *, keepalive: float = 5.0) -> ConnectionPool:
    connect = partial(
        new_connection,
        backend=AsyncioBackend(),
        ssl_context=httpcore.default_ssl_context(),
        keepalive_expiry=keepalive,
    )
    return ConnectionPool(connect, limit)


def _request(server: FaultServer, path: str, wait: float) -> httpcore.Request:
    return httpcore.Request(
        "GET",
        f"{server.url}{path}",
        headers=[(b"Host", server.host.encode())],
        extensions={"timeout": {"pool": wait, "connect": 5, "read": 5, "write": 5}},
    )


async def _get(pool: ConnectionPool, server: FaultServer, path: str, wait: float = 5.0) -> bytes:
    response = await pool.send(_request(server, path, wait))
    try:
        return await response.aread()
    finally:
        await response.aclose()


async def _queued(
    pool: ConnectionPool, server: FaultServer, count: int
) -> list[asyncio.Task[bytes]]:
    """``count`` requests waiting for a connection, in this order."""
    waiters = []
    for _ in range(count):
        waiters.append(asyncio.ensure_future(_get(pool, server, FAST)))
        await asyncio.sleep(0)  # each reaches the queue before the next
    return waiters


async def test_waiters_are_served_in_turn_on_the_connection_handed_over(
    faults: FaultServer,
) -> None:
    pool = _pool(1)
    try:
        held = await pool.send(_request(faults, FAST, 5))  # the one connection, busy
        waiters = await _queued(pool, faults, 5)
        assert not any(waiter.done() for waiter in waiters)
        await held.aread()
        await held.aclose()
        assert await asyncio.gather(*waiters) == [sample_index()] * 5
        assert len(pool.connections) == 1
    finally:
        await pool.aclose()
    assert faults.connections == 1


async def test_no_connection_free_in_time_is_a_pool_timeout(faults: FaultServer) -> None:
    pool = _pool(1)
    try:
        held = await pool.send(_request(faults, FAST, 5))
        with pytest.raises(httpcore.PoolTimeout):
            await _get(pool, faults, FAST, wait=0.05)
        await held.aclose()
        assert await _get(pool, faults, FAST, wait=0.05) == sample_index()  # no waiter left
    finally:
        await pool.aclose()


async def test_a_waiter_cancelled_as_the_connection_came_hands_it_on(
    faults: FaultServer,
) -> None:
    pool = _pool(1)
    try:
        held = await pool.send(_request(faults, FAST, 5))
        first, second = await _queued(pool, faults, 2)
        await held.aread()
        await held.aclose()  # handed to the first waiter, which has yet to run
        first.cancel()
        assert await second == sample_index()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await _get(pool, faults, FAST, wait=0.05) == sample_index()
        assert len(pool.connections) == 1
    finally:
        await pool.aclose()
    assert faults.connections == 1  # the connection handed over was passed on, not lost


async def test_a_failed_request_gives_its_place_to_a_waiter(faults: FaultServer) -> None:
    reset = "/v2/team/reset/manifests/v1"
    faults.route(reset, Reply(reset=True))
    pool = _pool(1)
    try:
        held = await pool.send(_request(faults, FAST, 5))
        failing = asyncio.ensure_future(_get(pool, faults, reset))
        await asyncio.sleep(0)
        (waiting,) = await _queued(pool, faults, 1)
        await held.aclose()
        with pytest.raises(httpcore.NetworkError):
            await failing
        assert await waiting == sample_index()
        assert len(pool.connections) == 1
    finally:
        await pool.aclose()


async def test_at_the_limit_an_idle_connection_gives_way_to_another_registry(
    faults: FaultServer,
) -> None:
    async with FaultServer() as other:
        other.route(FAST, manifest_reply(sample_index()))
        pool = _pool(1)
        try:
            await _get(pool, faults, FAST)
            assert await _get(pool, other, FAST, wait=0.05) == sample_index()
            assert len(pool.connections) == 1
        finally:
            await pool.aclose()
        await faults.closed.wait()  # the idle one was closed, not left open


async def test_a_connection_past_its_keepalive_is_not_reused(faults: FaultServer) -> None:
    pool = _pool(4, keepalive=0.0)
    try:
        await _get(pool, faults, FAST)
        await _get(pool, faults, FAST)
        assert len(pool.connections) == 1
    finally:
        await pool.aclose()
    assert faults.connections == 2


async def test_closing_the_pool_fails_its_waiters(faults: FaultServer) -> None:
    pool = _pool(1)
    await pool.send(_request(faults, FAST, 5))
    (waiting,) = await _queued(pool, faults, 1)
    await pool.aclose()
    with pytest.raises(httpcore.ConnectError, match="closed"):
        await waiting
    assert pool.connections == []


CLOSING = "/v2/team/closing/manifests/v1"


async def test_a_connection_the_server_closed_is_not_handed_to_a_waiter(
    faults: FaultServer,
) -> None:
    """The server closes after answering, without saying so (an idle timeout): the next
    request would fail on that connection, and spend a retry."""
    faults.route(CLOSING, Reply(200, {}, b"bye", close=True))
    pool = _pool(1)
    try:
        held = await pool.send(_request(faults, CLOSING, 5))
        (waiting,) = await _queued(pool, faults, 1)
        assert await held.aread() == b"bye"
        await faults.closed.wait()
        await held.aclose()
        assert await waiting == sample_index()
    finally:
        await pool.aclose()
    assert faults.connections == 2


async def test_room_handed_to_a_waiter_that_gave_up_goes_to_the_next(
    faults: FaultServer,
) -> None:
    faults.route(CLOSING, Reply(200, {}, b"bye", close=True))
    pool = _pool(1)
    try:
        held = await pool.send(_request(faults, CLOSING, 5))
        first, second = await _queued(pool, faults, 2)
        await held.aread()
        await faults.closed.wait()
        await held.aclose()  # the connection is dropped: room for one, handed to the first
        first.cancel()
        assert await second == sample_index()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await _get(pool, faults, FAST, wait=0.05) == sample_index()  # no room lost
    finally:
        await pool.aclose()


@pytest.mark.parametrize("gives_up", [False, True])
async def test_closing_the_pool_under_a_connection_just_handed_over(
    faults: FaultServer, gives_up: bool
) -> None:
    pool = _pool(1)
    held = await pool.send(_request(faults, FAST, 5))
    (waiting,) = await _queued(pool, faults, 1)
    await held.aread()
    await held.aclose()  # handed to the waiter, which has yet to run
    await pool.aclose()
    if gives_up:
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    else:
        with pytest.raises(httpcore.ConnectError, match="closed"):
            await waiting
    assert pool.connections == []


async def test_httpcores_connection_that_could_not_connect_is_dropped() -> None:
    """httpcore's connection (without httptools) calls itself idle once its connect failed."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # closed again below: nothing listens there
    connect = partial(
        new_connection,
        backend=AsyncioBackend(),
        ssl_context=httpcore.default_ssl_context(),
        keepalive_expiry=5.0,
        parser=False,
    )
    pool = ConnectionPool(connect, 1)
    request = httpcore.Request(
        "GET", f"http://127.0.0.1:{port}/v2/", headers=[(b"Host", f"127.0.0.1:{port}".encode())]
    )
    try:
        with pytest.raises(httpcore.ConnectError):
            await pool.send(request)
        assert pool.connections == []
    finally:
        await pool.aclose()


class _SlowToClose(RegistryConnection):
    """A connection whose close yields to the loop (as a TLS shutdown would): the pool's
    books must hold across that wait."""

    async def aclose(self) -> None:
        for _ in range(2):  # a close that takes a couple of the loop's turns
            await asyncio.sleep(0)
        await super().aclose()


def _slow_pool(limit: int, *, keepalive: float = 5.0) -> ConnectionPool:
    tls = httpcore.default_ssl_context()
    return ConnectionPool(
        lambda origin: _SlowToClose(origin, AsyncioBackend(), tls, keepalive), limit
    )


async def test_room_from_a_connection_closed_for_another_registry_is_not_lost(
    faults: FaultServer,
) -> None:
    async with FaultServer() as other:
        other.route(FAST, manifest_reply(sample_index()))
        pool = _slow_pool(1)
        try:
            held = await pool.send(_request(faults, FAST, 5))
            (waiting,) = await _queued(pool, other, 1)
            await held.aread()
            # The waiter gives up while the connection to the first registry is closing.
            asyncio.get_running_loop().call_soon(waiting.cancel)
            await held.aclose()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert await _get(pool, other, FAST, wait=0.05) == sample_index()
        finally:
            await pool.aclose()


async def test_no_connection_is_opened_for_a_pool_closed_meanwhile(faults: FaultServer) -> None:
    pool = _slow_pool(1, keepalive=0.0)  # the idle connection is past its keep-alive at once
    await _get(pool, faults, FAST)
    loop = asyncio.get_running_loop()
    closing: list[asyncio.Task[None]] = []
    # The pool is closed while the request closes the stale connection it found.
    loop.call_soon(lambda: closing.append(loop.create_task(pool.aclose())))
    with pytest.raises(httpcore.ConnectError, match="closed"):
        await _get(pool, faults, FAST)
    await asyncio.gather(*closing)
    assert pool.connections == []
    assert faults.connections == 1

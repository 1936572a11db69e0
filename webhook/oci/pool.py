"""Keep-alive connections to registries and token services, pooled on the running loop.

httpcore's pool kept its books with anyio events, cancel scopes and locks around every
request, and swept every connection twice per request: a quarter of what a registry request
cost pinhook once its own connections (``.connection``) had taken h11 away. This pool keeps
httpcore's rules and its errors (a ``PoolTimeout`` when no connection frees up in time) with
asyncio's own primitives:

* a request gets the most recently used idle connection to its origin that is still good
  (not past its keep-alive, not closed by the server, as its socket tells), else a new
  connection within the limit, else one in place of an idle connection to another origin,
  else it waits, first come first served, for one to be handed over;
* a connection whose answer is read back in full, and that the server keeps, goes back to
  the pool; any other is closed, and its place handed to whoever waits;
* idle connections past their keep-alive are closed at most once a second, as requests come.

A waiter that gives up (its pool timeout, or its caller's cancellation) after a connection was
handed to it hands that connection on: none is ever lost.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpcore

from .connection import RegistryConnection
from .streams import AsyncioStream

Connection = httpcore.AsyncConnectionInterface
Origin = tuple[bytes, bytes, int]  # scheme, host, port: httpcore's Origin is not hashable
# How often idle connections to every origin are checked for their keep-alive (a reused one is
# checked each time).
SWEEP_SECONDS = 1.0


class ConnectionPool:
    """At most ``max_connections`` connections, made by ``connect`` for an origin."""

    def __init__(self, connect: Callable[[httpcore.Origin], Connection], max_connections: int):
        self._connect = connect
        self._max = max_connections
        self._origins: dict[Connection, Origin] = {}  # every open connection
        self._idle: dict[Origin, list[Connection]] = {}  # most recently used last
        self._waiting: deque[tuple[Origin, asyncio.Future[Connection | None]]] = deque()
        self._reserved = 0  # room handed to waiters that have yet to open their connection
        self._next_sweep = 0.0
        self.is_closed = False

    @property
    def connections(self) -> list[Connection]:
        return list(self._origins)

    async def send(self, request: httpcore.Request) -> httpcore.Response:
        """The answer with its body still to be read; closing it returns the connection."""
        if self.is_closed:  # a retired pool: its connections would never be closed again
            raise _closed()
        await self._sweep()
        connection = await self._acquire(request)
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            await self._release(connection)
            raise
        response.stream = _Returned(self, connection, response.stream)
        return response

    async def aclose(self) -> None:
        self.is_closed = True
        connections, self._origins = list(self._origins), {}
        self._idle.clear()
        self._reserved = 0
        for _, waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(_closed())
        self._waiting.clear()
        for connection in connections:
            await connection.aclose()

    # -- taking and giving back ---------------------------------------------------------------

    async def _acquire(self, request: httpcore.Request) -> Connection:
        target = request.url.origin
        origin = _key(target)
        if not self._waiting:  # first come, first served: with waiters, wait behind them
            connection = await self._idle_connection(origin)
            if connection is not None:
                return connection
            if self._has_room() or await self._close_one_idle():
                return self._opened(target)
        handed = await self._wait(origin, request.extensions.get("timeout", {}).get("pool"))
        if handed is not None:
            return handed
        self._reserved -= 1
        return self._opened(target)

    def _has_room(self) -> bool:
        return len(self._origins) + self._reserved < self._max

    async def _idle_connection(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if _stale(connection):
                await self._drop(connection)
                continue
            return connection
        return None

    def _opened(self, origin: httpcore.Origin) -> Connection:
        if self.is_closed:  # closed while this caller waited: no socket for a retired pool
            raise _closed()
        connection = self._connect(origin)
        self._origins[connection] = _key(origin)
        return connection

    async def _close_one_idle(self) -> bool:
        for idle in self._idle.values():
            if idle:
                await self._drop(idle.pop(0))
                return True
        return False

    async def _wait(self, origin: Origin, seconds: float | None) -> Connection | None:
        """A connection to ``origin`` handed over, or None: room for a new one, reserved."""
        waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        entry = (origin, waiter)
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(seconds):
                handed = await waiter
        except BaseException as exc:
            if entry in self._waiting:
                self._waiting.remove(entry)
            elif self.is_closed:
                pass  # what was handed over went with the pool
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()  # handed over as this caller gave up: pass it on
                if handed is None:
                    self._reserved -= 1
                await self._hand_on(handed)
            if isinstance(exc, TimeoutError):
                raise httpcore.PoolTimeout("no connection free before the pool timeout") from exc
            raise
        if self.is_closed:  # closed between the hand-over and this caller's turn
            raise _closed()
        return handed

    async def _release(self, connection: Connection) -> None:
        """After an answer: back to the pool if the connection may serve again."""
        if connection not in self._origins:  # closed with the pool
            return
        if (
            self.is_closed
            or connection.is_closed()  # httpcore's, when it could not connect, is also "idle"
            or not connection.is_idle()
            or (self._waiting and _stale(connection))  # handed over unchecked otherwise
        ):
            await self._drop(connection)
            await self._hand_on(None)
        else:
            await self._hand_on(connection)

    async def _hand_on(self, connection: Connection | None) -> None:
        """A connection (or, for None, room for one) to the first waiter, else to the pool."""
        if self.is_closed:
            return
        while self._waiting:
            wanted, waiter = self._waiting.popleft()
            if waiter.done():
                continue
            dropped = None
            if connection is not None and wanted != self._origins[connection]:
                # Its place serves the waiter's origin. Handed over before the close is
                # awaited: a waiter that gives up meanwhile still passes the room on.
                self._origins.pop(connection)
                dropped, connection = connection, None
            if connection is None:
                self._reserved += 1
            waiter.set_result(connection)
            if dropped is not None:
                await dropped.aclose()
            return
        if connection is not None:
            self._idle.setdefault(self._origins[connection], []).append(connection)

    async def _drop(self, connection: Connection) -> None:
        self._origins.pop(connection, None)
        await connection.aclose()

    async def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_SECONDS
        for origin, idle in list(self._idle.items()):
            for connection in [c for c in idle if c.has_expired()]:
                idle.remove(connection)
                await self._drop(connection)
                await self._hand_on(None)
            if not idle:  # origins come and go (token services, redirects): forget them
                del self._idle[origin]


class _Returned:
    """An answer's body; closing it gives the connection back to the pool."""

    def __init__(self, pool: ConnectionPool, connection: Connection, stream: Any) -> None:
        self._pool = pool
        self._connection = connection
        self._stream = stream
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if hasattr(self._stream, "aclose"):
                await self._stream.aclose()
        finally:
            await self._pool._release(self._connection)


def _closed() -> httpcore.ConnectError:
    """What a request to (or a waiter of) a closed pool gets: a connect error, as httpcore's
    transport errors are classified."""
    return httpcore.ConnectError("the connection pool was closed")


def _key(origin: httpcore.Origin) -> Origin:
    return (origin.scheme, origin.host, origin.port)


def _stale(connection: Connection) -> bool:
    """Past its keep-alive, or closed by the server (as far as the loop or the socket tell)."""
    return connection.has_expired() or _went_away(connection)


def _went_away(connection: Connection) -> bool:
    """Whether the server closed this idle connection, asked of its socket: the expiry check
    reads only what the loop has, and a close that arrived since would fail the request
    about to reuse it."""
    if isinstance(connection, RegistryConnection):
        return connection.went_away()
    stream = getattr(getattr(connection, "_connection", None), "_network_stream", None)
    return isinstance(stream, AsyncioStream) and stream.went_away()

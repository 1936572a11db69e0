"""httpcore's network streams on the running asyncio loop, without anyio in between.

httpcore's default backend goes through anyio, whose cancel scopes, task lookups and stream
wrappers cost about 100 µs of CPU per registry request: an eighth of what a request costs
pinhook, on every cache miss. These streams are a protocol on the loop's own transport, with
the same errors httpcore's backends raise (``ConnectError``, ``ReadTimeout``, ...), so the
pool and the transport's error handling see no difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any, cast

import httpcore

# Bytes buffered from the socket before reading from it pauses: more than any manifest or
# token answer needs at once, and the cap on what a fast sender can make pinhook hold.
_HIGH_WATER = 256 * 1024


class _Stream(asyncio.Protocol):
    """One connection's buffer, end of stream and flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._lost: Exception | None = None
        self._closed = False
        self._reading_paused = False
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._writing_paused = False

    # -- the loop's side ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake_reader()
        if len(self._buffer) > _HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake_reader()
        return None  # close the transport: HTTP/1.1 has no use for a half-open connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._eof = True
        self._lost = exc
        self._wake_reader()
        # A write waiting to drain did not go out, however the connection ended.
        self._wake_writer(exc or ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer(None)

    def _wake_reader(self) -> None:
        waiter, self._data_waiter = self._data_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self, exc: Exception | None) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is None or waiter.done():
            return
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)

    # -- httpcore's side ------------------------------------------------------------------

    async def receive(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes; b"" at the end of the stream."""
        while not self._buffer:
            if self._eof:
                if self._lost is not None:
                    raise self._lost
                return b""
            self._data_waiter = asyncio.get_running_loop().create_future()
            await self._data_waiter
        data = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        if self._reading_paused and len(self._buffer) <= _HIGH_WATER // 4 and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def send(self, data: bytes) -> None:
        if self._closed or self.transport is None or self.transport.is_closing():
            raise self._lost or ConnectionResetError("connection closed")
        self.transport.write(data)
        if self._writing_paused:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    def readable(self) -> bool:
        """Whether an idle connection has anything to read: the peer closed it, or sent what
        no request asked for. Either way it must not be reused."""
        return bool(self._buffer) or self._eof or self._closed


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(
        self, stream: _Stream, transport: asyncio.Transport, raw: asyncio.Transport | None = None
    ) -> None:
        self._stream = stream
        self._transport = transport
        self._raw = raw  # the TCP transport under a TLS one

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            if timeout is None:  # bounded by the caller (a timer less per read)
                return await self._stream.receive(max_bytes)
            async with asyncio.timeout(timeout):
                return await self._stream.receive(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        try:
            if timeout is None:
                await self._stream.send(buffer)
                return
            async with asyncio.timeout(timeout):
                await self._stream.send(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        # Under TLS, the TCP connection is closed (what is written still goes out) without a
        # TLS shutdown, as httpcore's own backends do: waiting for the peer's close_notify
        # would hold a hung registry's socket for the loop's 30 s.
        (self._raw or self._transport).close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        if self._stream.readable() or self._transport.is_closing():
            # The peer closed first (a balancer with no backend): handing a closing transport
            # to TLS would fail inside the loop, or wait for a handshake that cannot come.
            self._transport.abort()
            raise httpcore.ConnectError("connection closed before the TLS handshake")
        loop = asyncio.get_running_loop()
        stream = _Stream()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    self._transport, stream, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError as exc:
            self._transport.abort()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except (OSError, ssl.SSLError) as exc:
            self._transport.abort()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        if transport is None or transport.get_extra_info("ssl_object") is None:
            # Closed during the handshake: some loops then return a transport all the same.
            self._transport.abort()
            raise httpcore.ConnectError("connection closed during the TLS handshake")
        stream.connection_made(transport)
        return AsyncioStream(stream, transport, raw=self._transport)

    def get_extra_info(self, info: str) -> Any:
        transport = self._transport
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        if info == "is_readable":
            # What the loop has read: the pool's sweep asks it of every idle connection (as
            # httpcore's pool did each time a request came or went), and asking the socket
            # too was a poll per idle connection, a tenth of a burst's CPU. The socket is
            # asked only of a connection about to be reused (``went_away``).
            return self._stream.readable()
        return None

    def went_away(self) -> bool:
        """Whether the peer closed the connection (or sent what no request asked for), as
        far as the socket tells, even before the loop has read it."""
        return self._stream.readable() or _socket_readable(self._transport)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """TCP connections made by the running loop (asyncio's or uvloop's)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        try:
            async with asyncio.timeout(timeout):
                transport, stream = await loop.create_connection(
                    _Stream, host, port, local_addr=local
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            with contextlib.suppress(OSError):
                sock.setsockopt(*option)
        return AsyncioStream(stream, transport)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _socket_readable(transport: asyncio.BaseTransport) -> bool:
    """Whether the socket under ``transport`` has something to read (or is gone), for a
    loop that has not read it yet."""
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))

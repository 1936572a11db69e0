"""The accepting side of the server: a connection cap, TLS handshakes and request deadlines in
front of uvicorn's HTTP protocol.

uvicorn leaves three things open that a webhook in the write path of every Pod cannot:

* no deadline on the TLS handshake beyond asyncio's 60 s;
* no deadline on receiving a request: its keep-alive timer is reset by every byte, and not armed
  at all before a connection's first response, so a client that connects and stays silent, or
  sends a byte every few seconds, holds its connection for ever (slowloris);
* no cap on open connections, each of which holds a 256 KiB TLS read buffer.

So uvicorn listens on plain TCP, and :class:`GuardedConnection`, its protocol class, counts each
accepted connection against the cap, performs the TLS handshake itself (``loop.start_tls`` with
a timeout) and only then hands the encrypted transport to uvicorn's HTTP protocol, extended with
a request deadline. Keep-alive still works: the API server reuses its connections, and one that
is idle between requests is closed only after ``idle_seconds``, longer than the 90 s Go's HTTP
client keeps an idle connection, so the server never closes one the client is about to reuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional: the pure-Python parser serves too, more slowly
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

# The ASGI scope key holding when a request began to arrive, on ``time.monotonic()``: not the
# loop's clock, which uvloop keeps to the millisecond, and admissions take less.
ARRIVED: Final = "pinhook.arrived"


# What a connection's TLS layer decrypts in one read; more waits for the next read.
DECRYPTED_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    handshake_seconds: float = 10.0  # TCP accept to TLS established
    request_seconds: float = 10.0  # first byte of a request (or a new connection) to its end
    idle_seconds: float = 120.0  # keep-alive between requests
    max_connections: int = 256  # open connections, handshakes included


class ConnectionEvents(Protocol):
    """Where refused and timed-out connections are counted (the metrics)."""

    def connection_closed(self, reason: str) -> None: ...


class RequestDeadlines:
    """The request deadlines of every connection of one listener, checked by one timer.

    A timer per request (``call_later``, then ``cancel``) costs more than parsing the request;
    setting a number in a dict does not. A deadline fires up to one sweep interval late, a
    tenth of the deadline at most: a shorter deadline (a reloaded limit) shortens the
    interval at once.
    """

    def __init__(self) -> None:
        self._due: dict[_RequestDeadline, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._interval = 0.0

    def arm(self, connection: _RequestDeadline, seconds: float) -> None:
        loop = connection.loop
        self._due[connection] = loop.time() + seconds
        interval = min(1.0, max(0.01, seconds / 10))
        if self._timer is None or interval < self._interval:
            if self._timer is not None:
                self._timer.cancel()
            self._interval = interval
            self._timer = loop.call_later(interval, self._sweep, loop)

    def disarm(self, connection: _RequestDeadline) -> None:
        self._due.pop(connection, None)

    def __len__(self) -> int:
        return len(self._due)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            now = loop.time()
            expired = [connection for connection, due in self._due.items() if due <= now]
            for connection in expired:
                del self._due[connection]
                try:
                    connection.expired()
                except Exception:  # one connection's failure must not end every deadline
                    log.exception("closing a connection past its request deadline failed")
        finally:
            self._timer = loop.call_later(self._interval, self._sweep, loop) if self._due else None


@dataclass(slots=True)
class ListenerState:
    """Shared by every connection of one listening socket."""

    tls: ssl.SSLContext
    limits: ConnectionLimits
    events: ConnectionEvents
    open_connections: int = 0
    deadlines: RequestDeadlines = field(default_factory=RequestDeadlines)
    # Where every connection's TLS layer puts what it decrypts (see _Decrypted).
    decrypted: memoryview = field(default_factory=lambda: memoryview(bytearray(DECRYPTED_BYTES)))


def guarded_protocol(state: ListenerState, parser: str = "auto") -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn's ``Config(http=...)`` for one listener.

    ``parser``: ``httptools`` (C, fast), ``h11`` (pure Python), or ``auto``: httptools when it
    is installed.
    """
    http = _http_protocol_class(parser)

    class Bound(GuardedConnection):
        listener = state
        http_class = http

    return Bound


class GuardedConnection(asyncio.Protocol):
    """One accepted TCP connection until its TLS handshake is done; then uvicorn's protocol."""

    # Set on the subclass made by guarded_protocol().
    listener: ListenerState
    http_class: type[_RequestDeadline]

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._http_arguments = {
            "config": config,
            "server_state": server_state,
            "app_state": app_state,
            "_loop": _loop,
        }
        self._counted = False
        self._accepted = 0.0
        self._handshake: asyncio.Task[None] | None = None
        self._early: list[bytes] = []  # read before start_tls took the transport over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        transport = cast(asyncio.Transport, transport)
        state = self.listener
        if state.open_connections >= state.limits.max_connections:
            state.events.connection_closed("over-limit")
            transport.abort()
            return
        state.open_connections += 1
        self._counted = True
        loop = asyncio.get_running_loop()
        self._accepted = time.monotonic()
        _no_delay(transport)
        self._handshake = loop.create_task(self._start_tls(transport))

    def data_received(self, data: bytes) -> None:
        # uvloop reads the ClientHello before start_tls can pause the transport (asyncio does
        # not); it is handed to the TLS protocol once that is in place, see _replay_early.
        self._early.append(data)

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        limits = self.listener.limits
        pending = _Pending()
        # start_tls installs its protocol and queues its connection_made before it first
        # waits; this runs two turns later, after that connection_made.
        loop.call_soon(loop.call_soon, self._replay_early, raw)
        try:
            tls = await loop.start_tls(
                raw,
                pending,
                self.listener.tls,
                server_side=True,
                ssl_handshake_timeout=limits.handshake_seconds,
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # Both loops report their handshake timeout as ConnectionAbortedError.
            late = isinstance(exc, ConnectionAbortedError | TimeoutError)
            reason = "handshake-timeout" if late else "handshake-failed"
            self.listener.events.connection_closed(reason)
            log.debug("TLS handshake with %s failed: %r", _peer(raw), exc)
            tls = None
        except BaseException:
            raw.abort()
            self._release()
            raise
        if tls is None or pending.lost:  # failed, or the peer went away as it ended
            raw.abort()
            self._release()
            return
        http = self.http_class(**self._http_arguments)
        http.listener = self.listener
        http.arrived = self._accepted
        # From here the TLS transport talks to `http`, whose connection_lost frees the slot.
        http.on_lost = self._release
        tls.set_protocol(_Decrypted(http, self.listener.decrypted))
        http.connection_made(_Coalesced(tls, loop))
        pending.hand_over(http)

    def _replay_early(self, raw: asyncio.Transport) -> None:
        if self._early and not raw.is_closing():
            _feed(raw.get_protocol(), b"".join(self._early))
        self._early = []

    def connection_lost(self, exc: Exception | None) -> None:
        # Called only while the raw transport is still ours: before start_tls took it over.
        if self._handshake is not None:
            self._handshake.cancel()
        self._release()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.listener.open_connections -= 1


class _Decrypted(asyncio.BufferedProtocol):
    """The TLS transport's protocol, in front of uvicorn's: what it decrypts is read into one
    buffer shared by the listener's connections and handed on as ``data_received``.

    For a protocol that takes ``data_received``, both loops' TLS layers read each record into a
    new 256 KiB bytes object. Under the fixed mmap threshold (``memory.py``) that is a mapping
    made, shrunk and unmapped on every request, three system calls and a page fault. Reading
    into a buffer the protocol gives costs none; the buffer can be shared because each read is
    copied out before the next one starts.
    """

    __slots__ = ("_buffer", "_http")

    def __init__(self, http: _RequestDeadline, buffer: memoryview) -> None:
        self._http = http
        self._buffer = buffer

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._http.data_received(bytes(self._buffer[:nbytes]))

    def eof_received(self) -> bool | None:
        return self._http.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._http.connection_lost(exc)

    def pause_writing(self) -> None:
        self._http.pause_writing()

    def resume_writing(self) -> None:
        self._http.resume_writing()


class _Coalesced(asyncio.Transport):
    """The TLS transport as uvicorn's protocol sees it: what is written in one turn of the loop
    is sent at the end of that turn, as one TLS record and one system call.

    uvicorn writes a response's head and its body separately, and both loops' TLS layers
    encrypt and send each write at once: two records and two ``write`` calls for every answer,
    and a client that has the head waits for the body in a second segment. Sent together, a
    warm admission cost 27 µs less and its p99 latency nearly halved (the README's
    "Performance"). A write is never held past the turn it was made in, so nothing waits on
    anything else.
    """

    __slots__ = ("_loop", "_pending", "_tls")

    def __init__(self, tls: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._tls = tls
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        if not self._tls.is_closing():
            self._tls.write(data)

    def close(self) -> None:
        self._flush()  # a closing TLS transport still sends what it was given before
        self._tls.close()

    def abort(self) -> None:
        self._pending.clear()
        self._tls.abort()

    def is_closing(self) -> bool:
        return self._tls.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._tls.pause_reading()

    def resume_reading(self) -> None:
        self._tls.resume_reading()

    def is_reading(self) -> bool:
        return self._tls.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._tls.get_write_buffer_size() + sum(map(len, self._pending))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return False


class _Pending(asyncio.Protocol):
    """Holds what arrives with the end of the handshake, before the HTTP protocol is attached.

    A client sends its request right behind its last handshake message, so the first bytes can
    be decrypted before ``start_tls`` returns; uvicorn's protocol must see ``connection_made``
    before any data.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return True  # keep the transport open until the HTTP protocol decides

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def hand_over(self, http: _RequestDeadline) -> None:
        for chunk in self.chunks:
            http.data_received(chunk)
        self.chunks.clear()
        if self.eof and not http.eof_received():
            http.transport.close()


def _no_delay(transport: asyncio.Transport) -> None:
    """Answers go out at once: a response written in two parts must not wait for an ACK.

    Both loops set TCP_NODELAY on accepted sockets themselves; setting it here makes it hold
    whatever loop or version runs pinhook.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Deliver ``data`` as the transport would: TLS protocols take it into their own buffer."""
    if isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)
        return
    # A buffered protocol (both loops' SSLProtocol; uvloop's without deriving from the class).
    buffered = cast(asyncio.BufferedProtocol, protocol)
    view = memoryview(data)
    while view:
        buffer = memoryview(buffered.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        buffered.buffer_updated(size)
        view = view[size:]


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "a client"


class _RequestDeadline(asyncio.Protocol):
    """uvicorn HTTP protocol mixin: each request must arrive whole within ``request_seconds``.

    Armed when the connection is established (the first request must follow at once) and at
    the first byte of each later request; disarmed once the request's body is complete.
    Between requests, uvicorn's keep-alive timer (``idle_seconds``) applies.

    It also tells the app when each request began to arrive (``ARRIVED`` in the ASGI scope,
    on ``time.monotonic()``; for a connection's first request, when it was accepted): a request
    that waited behind others has that much less of the API server's timeout left.
    """

    transport: asyncio.Transport
    cycle: Any
    loop: asyncio.AbstractEventLoop
    listener: ListenerState
    on_lost: Callable[[], None] | None = None
    arrived: float = 0.0
    _armed: bool = False
    _received: Any = None  # the cycle whose request arrived whole
    _stamped: Any = None  # the cycle whose scope has its arrival time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._armed and (self.cycle is None or self.cycle is self._received):
            self.arrived = time.monotonic()
            self._arm()
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not self._stamped:
            self._stamped = cycle
            cycle.scope[ARRIVED] = self.arrived
        if cycle is not None and cycle is not self._received and not cycle.more_body:
            self._received = cycle
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
        if self.on_lost is not None:
            self.on_lost()
            self.on_lost = None

    def _arm(self) -> None:
        self._armed = True
        self.listener.deadlines.arm(self, self.listener.limits.request_seconds)

    def _disarm(self) -> None:
        if self._armed:
            self._armed = False
            self.listener.deadlines.disarm(self)

    def expired(self) -> None:
        self._armed = False
        if not self.transport.is_closing():
            self.listener.events.connection_closed("request-timeout")
            log.debug("closing a connection that sent no complete request in time")
            self.transport.abort()


class _H11(_RequestDeadline, H11Protocol):
    pass


if HttpToolsProtocol is not None:

    class _HttpTools(_RequestDeadline, HttpToolsProtocol):
        pass


def _http_protocol_class(parser: str) -> type[_RequestDeadline]:
    if parser == "h11" or (parser == "auto" and HttpToolsProtocol is None):
        return _H11
    if HttpToolsProtocol is None:
        raise ValueError("the httptools parser is not installed")
    return _HttpTools

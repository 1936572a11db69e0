"""Slow, silent and too many clients are cut off; a normal client is served meanwhile.

A real uvicorn server with the guarded protocol, on loopback, driven by raw TCP and TLS
clients. Timeouts are shortened so that each case takes a fraction of a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from webhook import certs
from webhook.listener import ConnectionLimits, ListenerState, RequestDeadlines, guarded_protocol
from webhook.tls import server_context

LIMITS = ConnectionLimits(
    handshake_seconds=0.3, request_seconds=0.3, idle_seconds=0.8, max_connections=4
)
# How long a test waits for something that must happen: generous, for a loaded CI machine.
MUST_HAPPEN_S = 5.0

pytestmark = pytest.mark.both_loops

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers every request with the length of its body (at /digest: its SHA-256)."""
    if scope["type"] != "http":
        return
    size = 0
    digest = hashlib.sha256()
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        digest.update(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = digest.hexdigest().encode() if scope["path"] == "/digest" else str(size).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Recorder:
    reasons: list[str] = field(default_factory=list)

    def connection_closed(self, reason: str) -> None:
        self.reasons.append(reason)


@dataclass
class Running:
    port: int
    client_tls: ssl.SSLContext
    state: ListenerState
    events: Recorder

    async def tcp(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def tls(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.client_tls, server_hostname="localhost"
        )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Running]:
    """uvloop with httptools, as in production; asyncio's loop with h11, the fallback."""
    uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    parser = "httptools" if uvloop else "h11"
    paths = certs.ensure_self_signed(tmp_path / "certs")
    events = Recorder()
    state = ListenerState(server_context(paths.cert, paths.key), LIMITS, events)
    config = uvicorn.Config(
        echo_length,
        host="127.0.0.1",
        port=0,
        http=guarded_protocol(state, parser),
        lifespan="off",
        log_level="warning",
        timeout_keep_alive=int(LIMITS.idle_seconds) or 1,
    )
    served = uvicorn.Server(config)
    served.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(served.serve())
    while not served.started:
        await asyncio.sleep(0.01)  # uvicorn publishes no event for "listening"
    port = served.servers[0].sockets[0].getsockname()[1]
    client_tls = ssl.create_default_context(cafile=str(paths.ca_cert))
    try:
        yield Running(port, client_tls, state, events)
    finally:
        served.should_exit = True
        await task


def request(body: bytes = b"", path: str = "/mutate") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: pinhook\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the server closed the connection; fails if it stays open."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1024):
                pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {seconds}s")
    except (ConnectionResetError, ssl.SSLError):
        pass  # an abort reads as a reset
    return loop.time() - started


async def served_normally(running: Running) -> None:
    reader, writer = await running.tls()
    writer.write(request(b"12345"))
    assert await response(reader) == b"5"
    writer.close()


async def test_keep_alive_connection_serves_requests_one_after_another(server: Running) -> None:
    reader, writer = await server.tls()
    for body in (b"a", b"bb"):
        writer.write(request(body))
        assert await response(reader) == str(len(body)).encode()
        # Idle between requests for longer than a request may take to arrive: still open,
        # because the request deadline runs only from a request's first byte.
        await asyncio.sleep(LIMITS.request_seconds * 1.5)
        # Nothing armed while the connection waits between requests.
        assert len(server.state.deadlines) == 0
    assert not reader.at_eof()
    writer.close()


async def test_what_each_connection_sends_arrives_whole_and_unmixed(server: Running) -> None:
    """Every connection's TLS layer decrypts into one shared buffer: bodies several times its
    size, sent at once on several connections, each arrive whole and only where sent."""
    bodies = [os.urandom(200 * 1024) for _ in range(3)]

    async def send(body: bytes) -> bytes:
        reader, writer = await server.tls()
        writer.write(request(body, "/digest"))
        answer = await response(reader)
        writer.close()
        return answer

    answers = await asyncio.gather(*(send(body) for body in bodies))
    assert answers == [hashlib.sha256(body).hexdigest().encode() for body in bodies]


async def test_a_request_is_read_without_a_fresh_quarter_megabyte(server: Running) -> None:
    """The loops' TLS layers read into a new 256 KiB object per read unless the protocol
    gives a buffer; with the mmap threshold pinhook sets, that was three system calls and a
    page fault for every request."""

    def exchange(tls: ssl.SSLSocket) -> bytes:
        tls.sendall(request(b"x" * 2000))
        answer = b""
        while not answer.endswith(b"\r\n\r\n2000"):
            chunk = tls.recv(4096)  # small reads: the client allocates little itself
            assert chunk, answer
            answer += chunk
        return answer

    def client() -> tuple[int, int]:
        # A blocking client on a thread: the loop must serve while the client waits.
        raw = socket.create_connection(("127.0.0.1", server.port))
        with server.client_tls.wrap_socket(raw, server_hostname="localhost") as tls:
            exchange(tls)  # the connection's first request sets it up
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                exchange(tls)
                return before, tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    before, peak = await asyncio.to_thread(client)
    assert peak - before < 128 * 1024


async def test_an_answer_leaves_in_one_tls_record(server: Running) -> None:
    """uvicorn writes an answer's head and its body apart; the listener sends what was
    written in one turn of the loop together: one TLS record, one system call."""

    def records_per_answer() -> list[int]:
        raw = socket.create_connection(("127.0.0.1", server.port))
        with raw:
            client = _RecordCountingClient(raw, server.client_tls)
            return [client.exchange(request(body)) for body in (b"first", b"second", b"3")]

    # The first answer may share its records with the session tickets TLS 1.3 sends.
    assert (await asyncio.to_thread(records_per_answer))[1:] == [1, 1]


async def test_an_answer_written_just_before_the_close_still_arrives(server: Running) -> None:
    """A client that asks for the connection to close gets its answer, then the close: the
    answer waiting for the end of the turn goes out before the TLS transport closes."""
    reader, writer = await server.tls()
    writer.write(request(b"abc").replace(b"Host: pinhook", b"Host: pinhook\r\nConnection: close"))
    assert await response(reader) == b"3"
    assert await reader.read() == b""
    writer.close()


class _RecordCountingClient:
    """A blocking TLS client that counts the records each answer arrives in."""

    def __init__(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        self._raw = raw
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname="localhost")
        self._unread = b""
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send()
                self._receive_record()
        self._send()

    def exchange(self, message: bytes) -> int:
        """Sends ``message``, reads one whole answer; how many records it came in."""
        self._tls.write(message)
        self._send()
        answer, records = b"", 0
        while not _whole(answer):
            try:
                answer += self._tls.read(65536)
            except ssl.SSLWantReadError:
                records += self._receive_record()
        return records

    def _send(self) -> None:
        data = self._outgoing.read()
        if data:
            self._raw.sendall(data)

    def _receive_record(self) -> int:
        """Feeds the next whole TLS record to the client; 1 if it carried application data."""
        while len(self._unread) < 5 or len(self._unread) < 5 + _record_length(self._unread):
            chunk = self._raw.recv(65536)
            assert chunk, "the server closed the connection"
            self._unread += chunk
        size = 5 + _record_length(self._unread)
        record, self._unread = self._unread[:size], self._unread[size:]
        self._incoming.write(record)
        return 1 if record[0] == 23 else 0  # TLS application data


def _record_length(header: bytes) -> int:
    return int.from_bytes(header[3:5], "big")


def _whole(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return len(body) >= length


async def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(
    server: Running,
) -> None:
    reader, writer = await server.tls()
    writer.write(request())
    await response(reader)
    waited = await closed_within(reader, MUST_HAPPEN_S)
    assert waited >= LIMITS.idle_seconds * 0.5
    writer.close()


async def test_silent_client_after_handshake_is_cut_off(server: Running) -> None:
    reader, writer = await server.tls()
    waited = await closed_within(reader, MUST_HAPPEN_S)
    assert LIMITS.request_seconds * 0.8 <= waited < LIMITS.idle_seconds
    assert "request-timeout" in server.events.reasons
    writer.close()


async def test_silent_clients_are_all_cut_off_by_one_sweep(server: Running) -> None:
    clients = [await server.tls() for _ in range(3)]
    for reader, _writer in clients:
        waited = await closed_within(reader, MUST_HAPPEN_S)
        assert waited < LIMITS.idle_seconds
    assert server.events.reasons.count("request-timeout") == 3
    assert len(server.state.deadlines) == 0
    for _reader, writer in clients:
        writer.close()


async def test_slow_headers_are_cut_off_while_a_normal_client_is_served(server: Running) -> None:
    reader, writer = await server.tls()
    trickle = request(b"x")

    async def send_slowly() -> None:
        for byte in trickle:
            if writer.is_closing():
                return
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(send_slowly())
    await served_normally(server)
    await closed_within(reader, MUST_HAPPEN_S)
    sender.cancel()
    assert "request-timeout" in server.events.reasons
    writer.close()


async def test_slow_body_is_cut_off(server: Running) -> None:
    reader, writer = await server.tls()
    writer.write(b"POST /mutate HTTP/1.1\r\nHost: pinhook\r\nContent-Length: 100\r\n\r\nab")
    await closed_within(reader, MUST_HAPPEN_S)
    assert "request-timeout" in server.events.reasons
    writer.close()


async def test_client_that_never_starts_tls_is_cut_off(server: Running) -> None:
    reader, writer = await server.tcp()
    waited = await closed_within(reader, MUST_HAPPEN_S)
    assert waited >= LIMITS.handshake_seconds * 0.8
    assert server.events.reasons == ["handshake-timeout"]
    assert server.state.open_connections == 0
    writer.close()


async def test_connections_over_the_cap_are_refused_and_the_slots_come_back(
    server: Running,
) -> None:
    held = [await server.tls() for _ in range(LIMITS.max_connections)]
    assert server.state.open_connections == LIMITS.max_connections
    reader, writer = await server.tcp()
    await closed_within(reader, MUST_HAPPEN_S)
    assert server.events.reasons == ["over-limit"]
    writer.close()
    for _reader, held_writer in held:
        held_writer.close()
        await held_writer.wait_closed()
    # Released as each connection went: new clients are served again.
    while server.state.open_connections:
        await asyncio.sleep(0.01)  # connection_lost runs on the server's next turn
    await served_normally(server)


async def test_accepted_connections_send_without_nagle() -> None:
    # Both loops set TCP_NODELAY on accepted sockets today; the listener sets it whatever the
    # loop or version, so an answer written in two parts never waits for a delayed ACK.
    from webhook.listener import _no_delay

    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
            _no_delay(transport)  # type: ignore[arg-type]
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    server = await asyncio.get_running_loop().create_server(Probe, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(seen, MUST_HAPPEN_S) == 1
    writer.close()
    server.close()


class _Armed:
    """What RequestDeadlines needs of a connection: its loop, and what to do when it expires."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fails: bool = False) -> None:
        self.loop = loop
        self.fails = fails
        self.closed = asyncio.Event()

    def expired(self) -> None:
        self.closed.set()
        if self.fails:
            raise RuntimeError("closing failed")


async def test_a_shorter_deadline_shortens_the_sweep_at_once() -> None:
    # Before: the sweep kept the interval of the first deadline armed (a tenth of 10 s) until
    # no connection was armed, so a limit reloaded to 0.2 s fired up to a second late.
    loop = asyncio.get_running_loop()
    deadlines = RequestDeadlines()
    deadlines.arm(_Armed(loop), 10.0)  # type: ignore[arg-type]
    short = _Armed(loop)
    deadlines.arm(short, 0.2)  # type: ignore[arg-type]
    assert deadlines._timer is not None
    assert deadlines._timer.when() - loop.time() <= 0.02 + 0.005
    await asyncio.wait_for(short.closed.wait(), MUST_HAPPEN_S)


async def test_a_failure_closing_one_connection_does_not_end_the_sweeps() -> None:
    # Before: an exception from one connection ended the sweep before it scheduled the next,
    # and the timer it left behind kept arm() from starting another: no slow client was ever
    # cut off again.
    loop = asyncio.get_running_loop()
    deadlines = RequestDeadlines()
    failing, other = _Armed(loop, fails=True), _Armed(loop)
    deadlines.arm(failing, 0.05)  # type: ignore[arg-type]
    deadlines.arm(other, 0.05)  # type: ignore[arg-type]
    await asyncio.wait_for(other.closed.wait(), MUST_HAPPEN_S)
    later = _Armed(loop)
    deadlines.arm(later, 0.05)  # type: ignore[arg-type]
    await asyncio.wait_for(later.closed.wait(), MUST_HAPPEN_S)
    assert len(deadlines) == 0

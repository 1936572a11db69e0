"""The registry client's own network streams (``webhook.oci.streams``): what httpcore's
backend did for it, done on the loop itself."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import select
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpcore
import pytest

from tests.faults import FaultServer, Reply, manifest_reply, sample_index
from tests.test_registry import deadline_in, fault_ref, loopback_options
from webhook import certs, errors
from webhook.oci.connection import RegistryConnection
from webhook.oci.credential import ANONYMOUS
from webhook.oci.registry import RegistryClient
from webhook.oci.streams import _HIGH_WATER, AsyncioBackend, _Stream
from webhook.oci.transport import MANIFEST_SIZE_LIMIT, RegistryOptions, Transport

MANIFEST_PATH = "/v2/team/app/manifests/v1"

# pinhook serves on uvloop in production: its transports and TLS are its own.
pytestmark = pytest.mark.both_loops


@pytest.fixture
async def faults() -> AsyncIterator[FaultServer]:
    async with FaultServer() as server:
        yield server


async def test_a_connection_the_registry_closed_is_not_reused(faults: FaultServer) -> None:
    body = sample_index()
    faults.route(MANIFEST_PATH, Reply(200, manifest_reply(body).headers, body, close=True))
    transport = Transport(loopback_options(faults.host))
    url = f"{faults.url}{MANIFEST_PATH}"
    try:
        first = await transport.exchange("GET", url, {}, deadline_in(5), attempts=1)
        await faults.closed.wait()
        # One attempt only: a reused dead connection would fail, not be retried.
        second = await transport.exchange("GET", url, {}, deadline_in(5), attempts=1)
    finally:
        await transport.aclose()
    assert first.body == second.body == body
    assert faults.count("GET", MANIFEST_PATH) == 2


class _Paused:
    """The two calls of a transport that flow control makes."""

    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def test_reading_pauses_while_too_much_is_buffered_and_resumes_as_it_is_read() -> None:
    stream = _Stream()
    transport = _Paused()
    stream.connection_made(transport)  # type: ignore[arg-type]
    stream.data_received(b"x" * (_HIGH_WATER + 1))
    assert not transport.reading  # a fast sender cannot make pinhook buffer without end
    assert await stream.receive(_HIGH_WATER // 2) == b"x" * (_HIGH_WATER // 2)
    assert not transport.reading
    await stream.receive(_HIGH_WATER // 2)
    assert transport.reading
    assert await stream.receive(10) == b"x"
    stream.eof_received()
    assert await stream.receive(10) == b""


async def test_a_body_larger_than_the_read_buffer_arrives_whole(faults: FaultServer) -> None:
    body = bytes(range(256)) * (4 * 1024 * 3 // 2)  # 1.5 MiB
    faults.route("/v2/team/app/blobs/big", Reply(200, {}, body))
    transport = Transport(loopback_options(faults.host))
    try:
        reply = await transport.exchange(
            "GET", f"{faults.url}/v2/team/app/blobs/big", {}, deadline_in(5)
        )
    finally:
        await transport.aclose()
    assert reply.body == body


async def test_a_body_over_the_limit_is_refused(faults: FaultServer) -> None:
    faults.route("/v2/team/app/blobs/huge", Reply(200, {}, b"x" * (MANIFEST_SIZE_LIMIT + 1)))
    transport = Transport(loopback_options(faults.host))
    try:
        with pytest.raises(errors.ProtocolError, match="larger than"):
            await transport.exchange(
                "GET", f"{faults.url}/v2/team/app/blobs/huge", {}, deadline_in(5)
            )
    finally:
        await transport.aclose()


async def test_a_body_encoded_though_identity_was_asked_for_is_decoded(
    faults: FaultServer,
) -> None:
    """pinhook asks for identity; a server that gzips anyway is still read as httpx read it."""
    body = sample_index()
    headers = {**manifest_reply(body).headers, "Content-Encoding": "gzip"}
    faults.route(MANIFEST_PATH, Reply(200, headers, gzip.compress(body)))
    transport = Transport(loopback_options(faults.host))
    try:
        reply = await transport.exchange("GET", f"{faults.url}{MANIFEST_PATH}", {}, deadline_in(5))
    finally:
        await transport.aclose()
    assert reply.body == body
    assert faults.requests[-1].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("encoded", "refusal"),
    [
        # 4 MiB of zeros gzip to a few KiB: the limit holds for what it inflates to.
        (gzip.compress(b"\0" * (MANIFEST_SIZE_LIMIT + 1)), "decoded body larger than"),
        (b"not gzip at all", "undecodable body"),
    ],
)
async def test_an_encoded_body_is_refused_past_the_limit_or_when_undecodable(
    faults: FaultServer, encoded: bytes, refusal: str
) -> None:
    faults.route(MANIFEST_PATH, Reply(200, {"Content-Encoding": "gzip"}, encoded))
    transport = Transport(loopback_options(faults.host))
    try:
        with pytest.raises(errors.ProtocolError, match=refusal):
            await transport.exchange("GET", f"{faults.url}{MANIFEST_PATH}", {}, deadline_in(5))
    finally:
        await transport.aclose()


async def test_a_registry_that_stops_answering_ends_at_the_deadline(faults: FaultServer) -> None:
    faults.route(MANIFEST_PATH, Reply(hang=True))
    async with RegistryClient(loopback_options(faults.host)) as client:
        with pytest.raises(errors.DeadlineExceeded):
            await client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(0.3))


async def test_a_tls_registry_answers_over_the_same_connection(
    tls_files: certs.CertPaths,
) -> None:
    paths = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths.cert, paths.key)
    body = sample_index()
    options = RegistryOptions(allowed_hosts=frozenset({"127.0.0.1"}), ca_bundle=str(paths.ca_cert))
    async with FaultServer(tls=context) as server:
        server.route(MANIFEST_PATH, manifest_reply(body))
        transport = Transport(options)
        try:
            for _ in range(3):
                reply = await transport.exchange(
                    "GET", f"{server.url}{MANIFEST_PATH}", {}, deadline_in(5)
                )
                assert reply.body == body
        finally:
            await transport.aclose()
        assert server.connections == 1  # kept alive


@pytest.fixture
def tls_files(tmp_path: Path) -> certs.CertPaths:
    return certs.write(certs.generate(["localhost"], ["127.0.0.1"]), tmp_path / "tls")


async def test_a_peer_that_closed_before_the_handshake_is_a_connect_error(
    tls_files: certs.CertPaths,
) -> None:
    """A balancer with no backend accepts and closes: no TLS stream comes of it, and nothing
    fails inside the loop (uvloop would log a traceback, asyncio wait for its timeout)."""
    closed = asyncio.Event()

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
        await writer.wait_closed()
        closed.set()

    loop = asyncio.get_running_loop()
    failures: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        tcp = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        await closed.wait()
        client = ssl.create_default_context(cafile=str(tls_files.ca_cert))
        with pytest.raises(httpcore.ConnectError):  # not ConnectTimeout: no wait
            await tcp.start_tls(client, "localhost", timeout=5)
    finally:
        server.close()
        await server.wait_closed()
        loop.set_exception_handler(None)
    assert failures == []


async def test_closing_a_tls_stream_closes_its_socket_at_once(tls_files: certs.CertPaths) -> None:
    """No wait for a close_notify the registry may never send (the loop would hold the socket
    for 30 s): the registry sees the connection end at once."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(tls_files.cert, tls_files.key)
    listener = socket.create_server(("127.0.0.1", 0))
    ended = threading.Event()
    failures: list[BaseException] = []

    def registry() -> None:  # answers one request, then says nothing more
        try:
            connection, _ = listener.accept()
            with server_tls.wrap_socket(connection, server_side=True) as tls:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += tls.recv(4096)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                raw = socket.socket(fileno=os.dup(tls.fileno()))  # below TLS, as the kernel
                raw.settimeout(10)
                with raw, contextlib.suppress(ConnectionResetError):
                    while raw.recv(4096):  # a close_notify, if the client sends one
                        pass
                ended.set()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=registry, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        tcp = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        client = ssl.create_default_context(cafile=str(tls_files.ca_cert))
        stream = await tcp.start_tls(client, "localhost", timeout=5)
        await stream.write(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n\r\n", timeout=5)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await stream.read(4096, timeout=5)
        await stream.aclose()
        await asyncio.to_thread(thread.join, 15)
    finally:
        listener.close()
    assert failures == [] and ended.is_set()


async def test_plain_http_where_tls_was_expected_says_so() -> None:
    """The TLS error keeps its cause, so the answer names the likely fix."""

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # the ClientHello
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    host = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    options = RegistryOptions(allowed_hosts=frozenset({"127.0.0.1"}))  # https: not insecure
    try:
        transport = Transport(options)
        try:
            with pytest.raises(errors.ProtocolError, match="plain HTTP"):
                await transport.exchange("GET", f"https://{host}/v2/", {}, deadline_in(5))
        finally:
            await transport.aclose()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_retired_pool_opens_no_connection(faults: FaultServer) -> None:
    """A pool replaced after wedging is closed for good: a straggler's request through it would
    open a connection nothing closes again."""
    transport = Transport(loopback_options(faults.host))
    retired = transport.http
    await retired.aclose()
    try:
        with pytest.raises(httpcore.ConnectError, match="closed"):
            await retired.send(httpcore.Request("GET", f"{faults.url}{MANIFEST_PATH}"))
    finally:
        await transport.aclose()
    assert faults.connections == 0


async def _fetch_at_once(transport: Transport, url: str, count: int) -> None:
    await asyncio.gather(
        *(transport.exchange("GET", url, {}, deadline_in(5), attempts=1) for _ in range(count))
    )


async def test_the_pool_keeps_its_books_in_one_pass_over_its_connections(
    faults: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's bookkeeping does not grow with the pool's connections: httpcore 1.0's pool
    listed all of them again for each idle one, on every request added or removed, a quarter
    of pinhook's CPU in a burst of new tags."""
    body = sample_index()
    faults.route(MANIFEST_PATH, Reply(200, manifest_reply(body).headers, body))
    transport = Transport(loopback_options(faults.host))
    url = f"{faults.url}{MANIFEST_PATH}"
    calls = 0

    def counted(method: Callable[[RegistryConnection], bool]) -> Any:
        def count(connection: RegistryConnection) -> bool:
            nonlocal calls
            calls += 1
            return method(connection)

        return count

    try:
        await _fetch_at_once(transport, url, 30)  # 30 connections, then idle in the pool
        opened = faults.connections
        for name in ("is_idle", "has_expired", "is_closed"):
            monkeypatch.setattr(
                RegistryConnection, name, counted(getattr(RegistryConnection, name))
            )
        await transport.exchange("GET", url, {}, deadline_in(5), attempts=1)
    finally:
        await transport.aclose()
    assert opened >= 20 and faults.connections == opened  # one of them was reused
    # The connection reused and given back, and at most one sweep of the idle ones for their
    # keep-alive (once a second), not a pass over all of them for each.
    assert 0 < calls <= opened + 6


async def test_the_pool_asks_the_socket_only_of_the_connection_it_reuses(
    faults: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether an idle connection was closed by the registry is asked of its socket (a
    poll) only when a request is about to reuse it, not of every idle connection each time
    the pool keeps its books: that was a tenth of a burst's CPU."""
    body = sample_index()
    faults.route(MANIFEST_PATH, Reply(200, manifest_reply(body).headers, body))
    transport = Transport(loopback_options(faults.host))
    url = f"{faults.url}{MANIFEST_PATH}"
    polls = 0
    poll = select.poll

    def counted() -> Any:
        nonlocal polls
        polls += 1
        return poll()

    try:
        await _fetch_at_once(transport, url, 30)
        monkeypatch.setattr(select, "poll", counted)
        for _ in range(3):
            await transport.exchange("GET", url, {}, deadline_in(5), attempts=1)
    finally:
        await transport.aclose()
    assert faults.connections >= 20
    assert polls <= 3


async def test_the_pool_holds_its_limit_and_serves_every_queued_request(
    faults: FaultServer,
) -> None:
    body = sample_index()
    faults.route(MANIFEST_PATH, Reply(200, manifest_reply(body).headers, body))
    transport = Transport(loopback_options(faults.host, max_connections=4))
    try:
        await _fetch_at_once(transport, f"{faults.url}{MANIFEST_PATH}", 40)
    finally:
        await transport.aclose()
    assert faults.count("GET", MANIFEST_PATH) == 40
    assert faults.connections == 4

"""The registry client's own network streams (``webhook.oci.streams``): what httpcore's
backend did for it, done on the loop itself."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.faults import FaultServer, Reply, manifest_reply, sample_index
from tests.test_registry import deadline_in, fault_ref, loopback_options
from webhook import certs, errors
from webhook.oci.credential import ANONYMOUS
from webhook.oci.registry import RegistryClient
from webhook.oci.streams import _HIGH_WATER, _Stream
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


async def test_a_registry_that_stops_answering_ends_at_the_deadline(faults: FaultServer) -> None:
    faults.route(MANIFEST_PATH, Reply(hang=True))
    async with RegistryClient(loopback_options(faults.host)) as client:
        with pytest.raises(errors.DeadlineExceeded):
            await client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(0.3))


async def test_a_tls_registry_answers_over_the_same_connection(tmp_path: Path) -> None:
    paths = certs.write(certs.generate(["localhost"], ["127.0.0.1"]), tmp_path / "tls")
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

"""A loopback HTTP/1.1 server that misbehaves on request, for registry client fault tests.

It runs on the test's own event loop. Each path gets a script of replies, served in order
(the last one repeats), so "two 503s then a manifest" is one line. Every request is recorded,
so tests can count retries and see the headers that were sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_REASONS = {
    200: "OK",
    301: "Moved Permanently",
    302: "Found",
    307: "Temporary Redirect",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Reply:
    """One scripted answer.

    ``hang`` never answers until the server is released (at stop); ``gate`` answers once the
    test sets it; ``reset`` aborts the connection with a TCP RST; ``close`` closes it once
    answered, without saying so (as a server's idle timeout does); ``raw_head`` replaces the
    status line and headers verbatim. A HEAD request gets the headers of ``body`` without
    the body.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False
    gate: asyncio.Event | None = None
    reset: bool = False
    close: bool = False
    raw_head: bytes | None = None


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes = b""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sample_index() -> bytes:
    """A small OCI index body; its content does not need to point at real manifests."""
    child = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha256_digest(b"child"),
        "size": 5,
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]}
    return json.dumps(document).encode()


def manifest_reply(
    body: bytes,
    *,
    media_type: str = OCI_INDEX,
    digest: str | None = "",
    status: int = 200,
) -> Reply:
    """A manifest answer; ``digest=""`` sends the true digest, ``None`` omits the header."""
    headers = {"Content-Type": media_type}
    if digest is not None:
        headers["Docker-Content-Digest"] = digest or sha256_digest(body)
    return Reply(status, headers, body)


def error_reply(
    status: int, code: str = "UNKNOWN", *, headers: dict[str, str] | None = None
) -> Reply:
    body = json.dumps({"errors": [{"code": code, "message": code.lower(), "detail": None}]})
    return Reply(status, {"Content-Type": "application/json", **(headers or {})}, body.encode())


class FaultServer:
    """``async with FaultServer() as server``; ``server.host`` is ``127.0.0.1:PORT``."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._routes: dict[tuple[str | None, str], list[Reply]] = {}
        self._served: dict[tuple[str | None, str], int] = {}
        self.requests: list[Recorded] = []
        self.released = asyncio.Event()
        self.hanging = asyncio.Event()  # set when a request starts hanging or waits at a gate
        self.closed = asyncio.Event()  # set when the server has closed a connection
        self.connections = 0  # accepted so far
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("fault server is not running")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}"

    def route(self, path: str, *replies: Reply, method: str | None = None) -> None:
        """Script ``replies`` for ``path`` (any method unless ``method`` is given)."""
        if not replies:
            raise ValueError("a route needs at least one reply")
        self._routes[(method, path)] = list(replies)
        self._served[(method, path)] = 0

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and (path is None or r.path == path)
        )

    def requests_to(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    async def __aenter__(self) -> FaultServer:
        self._server = await asyncio.start_server(
            self._on_connection, "127.0.0.1", 0, ssl=self._tls
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.released.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _next_reply(self, method: str, path: str) -> Reply:
        key: tuple[str | None, str] = (method, path)
        if key not in self._routes:
            key = (None, path)
        if key not in self._routes:
            return error_reply(404, "NAME_UNKNOWN")
        script = self._routes[key]
        index = min(self._served[key], len(script) - 1)
        self._served[key] += 1
        return script[index]

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.connections += 1
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            self.closed.set()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = b""
        if headers.get("content-length", "0").isdigit():
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        path, _, query = target.partition("?")
        self.requests.append(Recorded(method, path, query, headers, body))
        reply = self._next_reply(method, path)
        if reply.hang:
            self.hanging.set()
            await self.released.wait()
            return False
        if reply.gate is not None:
            self.hanging.set()
            await reply.gate.wait()
        if reply.reset:
            _abort_with_reset(writer)
            return False
        writer.write(_encode(reply, method))
        await writer.drain()
        return not reply.close


def _encode(reply: Reply, method: str) -> bytes:
    if reply.raw_head is not None:
        return reply.raw_head
    headers = {"Content-Length": str(len(reply.body)), **reply.headers}
    lines = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if method == "HEAD" else head + reply.body


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # Linger 0: close() sends RST, which the client sees as a connection reset.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def scripted(*statuses: int, then: Reply) -> Sequence[Reply]:
    """``statuses`` as error replies, followed by ``then``."""
    return [*(error_reply(status) for status in statuses), then]

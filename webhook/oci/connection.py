"""One keep-alive HTTP/1.1 connection to a registry or token service, for ``.pool``.

httpcore's own connection runs each request through h11's state machine, with anyio locks,
cancel shields and a trace around every step: measured on one loopback HEAD, about ten times
the CPU of writing the request and parsing the answer on the same socket, and on a cache miss
that CPU is the admission's latency. This connection writes the request as bytes and parses
the answer with httptools (llhttp, the parser uvicorn already serves admissions with), and
keeps httpcore's interface and errors, so the pool, its limits and the transport's error
handling see no difference.

What it keeps of h11's care: the request line and header names and values are checked before
anything is sent (a pull secret holding a line break cannot add a header); an answer's head is
limited in size; only the first answer counts (no second one, no trailers, can change its
status or headers); and a body that ends early, bytes no request asked for, ``Connection:
close`` or any version but HTTP/1.1 close the connection instead of returning it to the pool,
as h11 decides. llhttp cannot be told an answer is to a HEAD, so a HEAD's answer ends with its
head, and its parser is never fed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final, cast

import httpcore

from .streams import AsyncioStream

try:
    import httptools
except ImportError:  # optional, as for the listener: httpcore's own connections serve then
    httptools = None  # type: ignore[assignment]

PARSER_AVAILABLE: Final = httptools is not None

# What httpcore's trace said of each step, for ``--log-http-trace`` (see ..logs).
trace = logging.getLogger(__name__)

READ_BYTES = 64 * 1024
# h11's limit for a head (httpcore's MAX_INCOMPLETE_EVENT_SIZE): a server sending headers
# without end is cut off here.
HEAD_SIZE_LIMIT = 100 * 1024
# What h11 allows: a method and field name are tokens (RFC 9110 tchar); a target is visible
# ASCII; a field value is visible characters with spaces and tabs inside, none at its ends.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
# (Checked by deleting the allowed bytes: a regular expression took 40 µs for a 600-byte
# token, a fair share of a request.)
_FIELD_VALUE_BYTES = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100)) + b" \t"
# Answers that never have a body, whatever their headers say.
_NO_BODY = frozenset({204, 304})


class _State(enum.Enum):
    NEW = "NEW"
    ACTIVE = "ACTIVE"
    IDLE = "IDLE"
    CLOSED = "CLOSED"


class RegistryConnection(httpcore.AsyncConnectionInterface):
    """A connection made on its first request, then reused while the server keeps it."""

    def __init__(
        self,
        origin: httpcore.Origin,
        backend: httpcore.AsyncNetworkBackend,
        ssl_context: ssl.SSLContext | None,
        keepalive_expiry: float | None,
    ) -> None:
        self._origin = origin
        self._backend = backend
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._stream: httpcore.AsyncNetworkStream | None = None
        self._state = _State.NEW
        self._expire_at: float | None = None
        self._requests = 0

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if request.url.origin != self._origin:
            raise RuntimeError(
                f"a request to {request.url.origin} on a connection to {self._origin}"
            )
        if self._state not in (_State.NEW, _State.IDLE):
            raise httpcore.ConnectionNotAvailable()
        self._state = _State.ACTIVE
        self._expire_at = None
        self._requests += 1
        timeouts = request.extensions.get("timeout", {})
        try:
            head = request_head(request)
            body = b"".join([chunk async for chunk in cast(AsyncIterable[bytes], request.stream)])
            if self._stream is None:
                self._stream = await self._connect(request, seconds=timeouts.get("connect"))
            stream = self._stream
            answer = Answer(head_only=request.method == b"HEAD")
            read_timeout = timeouts.get("read")
            await _exchange_head(stream, head + body, answer, read_timeout)
        except BaseException as exc:
            if trace.isEnabledFor(logging.DEBUG):
                trace.debug("%s: closed on %s", self.info(), type(exc).__name__)
            await self.aclose()
            raise
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("%s: %s answered %d", self.info(), request.method.decode(), answer.status)
        return httpcore.Response(
            status=answer.status,
            headers=answer.headers,
            content=_Body(self, stream, answer, read_timeout),
            extensions={
                "http_version": answer.http_version,
                "reason_phrase": answer.reason,
                "network_stream": stream,
            },
        )

    async def _connect(
        self, request: httpcore.Request, *, seconds: float | None
    ) -> httpcore.AsyncNetworkStream:
        host = self._origin.host.decode("ascii")
        stream = await self._backend.connect_tcp(host, self._origin.port, timeout=seconds)
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("%s: connected", self.info())
        if self._origin.scheme != b"https":
            return stream
        context = self._ssl_context or ssl.create_default_context()
        server_name = request.extensions.get("sni_hostname") or host
        try:
            stream = await stream.start_tls(context, server_hostname=server_name, timeout=seconds)
        except BaseException:
            await stream.aclose()  # the TCP connection under the failed handshake
            raise
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("%s: TLS with %s", self.info(), server_name)
        return stream

    async def response_closed(self, answer: Answer) -> None:
        """Back to the pool if the answer ended as HTTP says and the server keeps the
        connection; closed otherwise."""
        if self._state is _State.ACTIVE and answer.reusable():
            self._state = _State.IDLE
            if self._keepalive_expiry is not None:
                self._expire_at = time.monotonic() + self._keepalive_expiry
        else:
            await self.aclose()
        if trace.isEnabledFor(logging.DEBUG):
            trace.debug("%s: answer closed", self.info())

    async def aclose(self) -> None:
        self._state = _State.CLOSED
        if self._stream is not None:
            await self._stream.aclose()

    def went_away(self) -> bool:
        """Whether the server closed this idle connection, asked of the socket itself."""
        return isinstance(self._stream, AsyncioStream) and self._stream.went_away()

    def can_handle_request(self, origin: httpcore.Origin) -> bool:
        return origin == self._origin

    def is_available(self) -> bool:
        return self._state is _State.IDLE

    def has_expired(self) -> bool:
        if self._state is not _State.IDLE:
            return False
        if self._expire_at is not None and time.monotonic() > self._expire_at:
            return True
        return self._stream is not None and bool(self._stream.get_extra_info("is_readable"))

    def is_idle(self) -> bool:
        return self._state is _State.IDLE

    def is_closed(self) -> bool:
        return self._state is _State.CLOSED

    def info(self) -> str:
        return f"{self._origin!s}, HTTP/1.1, {self._state.value}, Request Count: {self._requests}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} [{self.info()}]>"


async def _exchange_head(
    stream: httpcore.AsyncNetworkStream, sent: bytes, answer: Answer, seconds: float | None
) -> None:
    """Write the request and read the answer's head, all within ``seconds``: one timer for
    both, not one per read and write (a timer is a fair share of a request's CPU)."""
    try:
        async with asyncio.timeout(seconds):
            # As httpcore does: the server may have answered (a 413) before it closed.
            with contextlib.suppress(httpcore.WriteError):
                await stream.write(sent)
            while not answer.head_done:
                answer.feed(await stream.read(READ_BYTES))
    except TimeoutError as exc:
        raise httpcore.ReadTimeout("no answer before the timeout") from exc


def request_head(request: httpcore.Request) -> bytes:
    """The request line and headers, as h11 would write them; LocalProtocolError for a
    header that would change the request's meaning on the wire."""
    method, target = request.method, request.url.target
    if _TOKEN.fullmatch(method) is None or _TARGET.fullmatch(target) is None:
        raise httpcore.LocalProtocolError(f"illegal request line {method!r} {target!r}")
    if not any(name.lower() == b"host" for name, _ in request.headers):
        raise httpcore.LocalProtocolError("Missing mandatory Host: header")
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    for name, value in request.headers:
        if _TOKEN.fullmatch(name) is None:
            raise httpcore.LocalProtocolError(f"illegal header name {name!r}")
        if value.translate(None, _FIELD_VALUE_BYTES) or value.strip(b" \t") != value:
            raise httpcore.LocalProtocolError(f"illegal header value for {name.decode()}")
        lines.append(b"%s: %s" % (name, value))
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


class Answer:
    """One answer as httptools parses it: the callbacks' target, and what ends it."""

    def __init__(self, *, head_only: bool) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._head_bytes = 0
        self._fed = 0  # bytes parsed, against the body's: what the head and framing took
        self._body_bytes = 0
        self._closes = False
        self._no_length = True
        self.head_done = False
        self.complete = False
        self.unasked = False  # bytes after the answer: nothing a reused connection can trust
        self.status = 0
        self.reason = b""
        self.http_version = b"HTTP/1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        """Parse what arrived; b"" is the end of the stream."""
        if not data:
            self._ended()
            return
        if not self.head_done:  # the head is parsed up to its limit, and no further
            room = HEAD_SIZE_LIMIT - self._head_bytes
            self._head_bytes += min(len(data), room)
            if len(data) > room:
                self._parse(data[:room])
                if not self.head_done:
                    raise httpcore.RemoteProtocolError(
                        f"answer head larger than {HEAD_SIZE_LIMIT} bytes"
                    )
                data = data[room:]
        self._fed += len(data)
        self._parse(data)
        # Chunk lines, extensions and trailers carry no body and fall under neither the
        # head's limit nor the body's: endless ones would be parsed (and a trailer held) until
        # the deadline. Beyond what the body brings, the head (at most its limit) and as much
        # again are enough.
        if self._fed - 2 * self._body_bytes > 2 * HEAD_SIZE_LIMIT:
            raise httpcore.RemoteProtocolError(
                f"answer framing larger than {HEAD_SIZE_LIMIT} bytes beyond its body"
            )

    def _parse(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.complete:  # what follows the answer is not part of it (_Unasked)
                self.unasked = True
                return
            if isinstance(exc.__context__, httpcore.RemoteProtocolError):
                raise exc.__context__ from None  # a callback's own verdict
            if isinstance(exc, httptools.HttpParserUpgrade):
                raise httpcore.RemoteProtocolError("the server switched protocols") from exc
            raise httpcore.RemoteProtocolError(f"malformed answer: {exc}") from exc

    def _ended(self) -> None:
        if not self.head_done:
            raise httpcore.RemoteProtocolError("Server disconnected without sending a response.")
        if not self.complete:
            if not self._no_length:
                raise httpcore.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            self.complete = True  # a body without a length ends where the connection does
        self._closes = True

    def reusable(self) -> bool:
        return self.complete and not self._closes and not self.unasked

    # -- httptools' callbacks -------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # after the head: a chunked body's trailers, which h11 drops
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: the real one follows
            self.headers = []
            self.reason = b""
            return
        if status < 100:
            raise httpcore.RemoteProtocolError(f"status {status} is not an HTTP status")
        self.head_done = True
        self.status = status
        version = self._parser.get_http_version()
        self.http_version = b"HTTP/" + version.encode("ascii")
        delimited = any(_delimits(name, value) for name, value in self.headers)
        # h11's rule: kept only at HTTP/1.1 without Connection: close. llhttp reads that
        # header too, but says "close" of every answer without a length, a HEAD's included,
        # which h11 keeps: there it is asked of the headers themselves.
        if version != "1.1":
            self._closes = True
        elif delimited or status in _NO_BODY:
            self._closes = not self._parser.should_keep_alive()
        else:
            self._closes = any(_says_close(name, value) for name, value in self.headers)
        self._no_length = not delimited
        if self._head_only or status in _NO_BODY:
            self.complete = True
            self._no_length = False

    def on_body(self, body: bytes) -> None:
        if self.complete:  # a body after a HEAD's answer, or one that has none
            self.unasked = True
        else:
            self._body_bytes += len(body)
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.head_done:  # not the end of an interim answer
            self.complete = True

    def on_message_begin(self) -> None:
        if self.head_done:  # a second answer to one request: stop before it changes this one
            self.unasked = True
            raise _Unasked()


class _Unasked(Exception):
    """Stops the parser at an answer nobody asked for."""


def _says_close(name: bytes, value: bytes) -> bool:
    return name.lower() == b"connection" and any(
        token.strip().lower() == b"close" for token in value.split(b",")
    )


def _delimits(name: bytes, value: bytes) -> bool:
    """Whether this header says where the body ends: a length, or chunked coding last."""
    name = name.lower()
    if name == b"content-length":
        return True
    return name == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked")


class _Body:
    """The answer's body as it arrives; closing it returns the connection or closes it."""

    def __init__(
        self,
        connection: RegistryConnection,
        stream: httpcore.AsyncNetworkStream,
        answer: Answer,
        timeout: float | None,
    ) -> None:
        self._connection = connection
        self._stream = stream
        self._answer = answer
        self._timeout = timeout
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        answer = self._answer
        try:
            while True:
                if answer.chunks:
                    chunks, answer.chunks = answer.chunks, []
                    for chunk in chunks:
                        yield chunk
                if answer.complete:
                    return
                answer.feed(await self._stream.read(READ_BYTES, timeout=self._timeout))
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._connection.response_closed(self._answer)


def new_connection(
    origin: httpcore.Origin,
    *,
    backend: httpcore.AsyncNetworkBackend,
    ssl_context: ssl.SSLContext,
    keepalive_expiry: float,
    parser: bool = PARSER_AVAILABLE,
) -> httpcore.AsyncConnectionInterface:
    """A connection of pinhook's own, or httpcore's (through h11) without httptools."""
    if parser:
        return RegistryConnection(origin, backend, ssl_context, keepalive_expiry)
    return httpcore.AsyncHTTPConnection(
        origin, ssl_context=ssl_context, keepalive_expiry=keepalive_expiry, network_backend=backend
    )

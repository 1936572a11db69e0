"""The registry client's HTTP/1.1 connection (``webhook.oci.connection``): requests written
as bytes, answers parsed by httptools, with what h11 guarded kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import httpcore
import pytest

from tests.faults import FaultServer, Reply, manifest_reply, sample_index
from tests.test_registry import deadline_in, loopback_options
from webhook import errors
from webhook.oci.connection import (
    HEAD_SIZE_LIMIT,
    Answer,
    RegistryConnection,
    new_connection,
    request_head,
)
from webhook.oci.pool import ConnectionPool
from webhook.oci.streams import AsyncioBackend
from webhook.oci.transport import KEEPALIVE_SECONDS, Transport

MANIFEST_PATH = "/v2/team/app/manifests/v1"
HOST = (b"Host", b"registry.test")

pytestmark = pytest.mark.both_loops


@pytest.fixture
async def faults() -> AsyncIterator[FaultServer]:
    async with FaultServer() as server:
        yield server


def _parsed(raw: bytes, *, head_only: bool = False, piece: int = 0) -> Answer:
    """``raw`` fed at once, or ``piece`` bytes at a time (answers arrive in any pieces)."""
    answer = Answer(head_only=head_only)
    step = piece or max(len(raw), 1)
    for start in range(0, len(raw), step):
        answer.feed(raw[start : start + step])
    return answer


def _body(answer: Answer) -> bytes:
    return b"".join(answer.chunks)


OK_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDocker-Content-Digest: sha256:ab\r\n\r\nhello"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"


@pytest.mark.parametrize("piece", [0, 1, 7])
@pytest.mark.parametrize(
    ("raw", "head_only", "status", "body", "reusable"),
    [
        pytest.param(OK_BODY, False, 200, b"hello", True, id="length"),
        pytest.param(CHUNKED, False, 200, b"hello", True, id="chunked"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True, 200, b"", True, id="head"
        ),
        pytest.param(OK_BODY, True, 200, b"", False, id="a body after a HEAD's answer"),
        pytest.param(
            b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n" + OK_BODY,
            False,
            200,
            b"hello",
            True,
            id="interim answer first",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
            False,
            200,
            b"hello",
            False,
            id="connection close",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            False,
            200,
            b"hello",
            False,
            id="http/1.0",
        ),
        pytest.param(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello",
            False,
            200,
            b"hello",
            False,
            id="http/1.0 keep-alive, closed as h11 closes it",
        ),
        pytest.param(
            b"HTTP/1.1 401 Unauthorized\r\nWww-Authenticate: Basic realm=x\r\n\r\n",
            True,
            401,
            b"",
            True,
            id="head without a length",
        ),
        pytest.param(OK_BODY + OK_BODY, False, 200, b"hello", False, id="a second answer"),
        pytest.param(OK_BODY + b"x", False, 200, b"hello", False, id="bytes after the body"),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", False, 204, b"", True, id="no content"),
    ],
)
def test_an_answer_is_parsed_and_reused_only_when_it_ended_cleanly(
    raw: bytes, head_only: bool, status: int, body: bytes, reusable: bool, piece: int
) -> None:
    answer = _parsed(raw, head_only=head_only, piece=piece)
    assert answer.head_done and answer.complete
    assert answer.status == status
    assert _body(answer) == body
    assert answer.reusable() is reusable


@pytest.mark.parametrize("piece", [0, 1, 7])
@pytest.mark.parametrize(
    "after",
    [
        pytest.param(
            b"HTTP/1.1 500 Oops\r\nDocker-Content-Digest: sha256:evil\r\n\r\n", id="answer"
        ),
        pytest.param(b"garbage", id="garbage"),
    ],
)
def test_what_follows_an_answer_changes_nothing_of_it(after: bytes, piece: int) -> None:
    answer = _parsed(OK_BODY + after, piece=piece)
    assert (answer.status, answer.reason) == (200, b"OK")
    assert answer.headers == [(b"Content-Length", b"5"), (b"Docker-Content-Digest", b"sha256:ab")]
    assert _body(answer) == b"hello" and not answer.reusable()


def test_a_chunked_bodys_trailers_are_not_headers() -> None:
    """h11 drops trailers: a trailer must not add a second digest to the answer."""
    answer = _parsed(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nDocker-Content-Digest: sha256:ab\r\n"
        b"\r\n2\r\nhi\r\n0\r\nDocker-Content-Digest: sha256:evil\r\n\r\n"
    )
    assert answer.complete and _body(answer) == b"hi"
    assert [value for name, value in answer.headers if name == b"Docker-Content-Digest"] == [
        b"sha256:ab"
    ]


def test_only_the_final_answers_headers_are_kept() -> None:
    answer = _parsed(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK_BODY)
    assert answer.headers == [(b"Content-Length", b"5"), (b"Docker-Content-Digest", b"sha256:ab")]
    assert answer.reason == b"OK"


def test_a_body_without_a_length_ends_with_the_connection() -> None:
    answer = _parsed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhel")
    answer.feed(b"lo")
    assert not answer.complete
    answer.feed(b"")
    assert answer.complete and _body(answer) == b"hello"
    assert not answer.reusable()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"", "without sending a response", id="nothing"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Le", "without sending a response", id="half"),
        pytest.param(OK_BODY[:-2], "peer closed connection", id="short body"),
        pytest.param(CHUNKED[:-7], "peer closed connection", id="unfinished chunks"),
    ],
)
def test_an_answer_cut_short_is_an_error_worth_a_retry(raw: bytes, message: str) -> None:
    """The words the transport reads as a connection closed under a request (retried)."""
    answer = _parsed(raw)
    with pytest.raises(httpcore.RemoteProtocolError, match=message):
        answer.feed(b"")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", id="not http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", id="negative length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", id="header without colon"),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
            id="switching protocols",
        ),
        pytest.param(b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n", id="status below 100"),
    ],
)
def test_a_malformed_answer_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(httpcore.RemoteProtocolError):
        _parsed(raw)


def _endless_head(answer: Answer) -> None:
    answer.feed(b"HTTP/1.1 200 OK\r\n")
    for _ in range(HEAD_SIZE_LIMIT // 1000 + 1):
        answer.feed(b"X-Padding: " + b"a" * 1000 + b"\r\n")


def test_an_endless_head_is_cut_off() -> None:
    with pytest.raises(httpcore.RemoteProtocolError, match="head larger"):
        _endless_head(Answer(head_only=False))


def test_the_head_limit_holds_within_one_read() -> None:
    """A read brings up to 64 KiB: the limit is the head's size, not the reads' count."""
    padding = b"X-Padding: " + b"a" * (HEAD_SIZE_LIMIT - 100) + b"\r\n"
    Answer(head_only=True).feed(b"HTTP/1.1 200 OK\r\n" + padding + b"\r\n" + b"x" * 1000)
    with pytest.raises(httpcore.RemoteProtocolError, match="head larger"):
        Answer(head_only=True).feed(b"HTTP/1.1 200 OK\r\n" + padding + padding + b"\r\n")


def test_a_request_is_written_as_h11_writes_it() -> None:
    request = httpcore.Request(
        "GET",
        "http://registry.test:5000/v2/app/manifests/v1?x=1",
        headers=[(b"Host", b"registry.test:5000"), (b"Accept", b"a/b")],
    )
    assert request_head(request) == (
        b"GET /v2/app/manifests/v1?x=1 HTTP/1.1\r\nHost: registry.test:5000\r\nAccept: a/b\r\n\r\n"
    )


@pytest.mark.parametrize(
    "header",
    [
        (b"Authorization", b"Bearer x\r\nX-Injected: 1"),
        (b"Authorization", b"Bearer x\nX-Injected: 1"),
        (b"Authorization", b"Bearer \x00"),
        (b"Authorization", b"Bearer \x0bx"),
        (b"Accept", b" a/b"),
        (b"Accept", b"a/b "),
        (b"X Injected", b"1"),
        (b"X-Injected:", b"1"),
    ],
)
def test_a_header_that_would_change_the_request_is_refused(header: tuple[bytes, bytes]) -> None:
    request = httpcore.Request("GET", "http://registry.test/v2/", headers=[HOST, header])
    with pytest.raises(httpcore.LocalProtocolError):
        request_head(request)


@pytest.mark.parametrize(("method", "target"), [(b"GET", b"/v2/a b"), (b"G ET", b"/v2/")])
def test_a_request_line_that_would_change_the_request_is_refused(
    method: bytes, target: bytes
) -> None:
    url = httpcore.URL(scheme=b"http", host=b"registry.test", port=None, target=target)
    with pytest.raises(httpcore.LocalProtocolError, match="request line"):
        request_head(httpcore.Request(method, url, headers=[HOST]))


def test_a_request_without_a_host_is_refused() -> None:
    """HTTP/1.1 requires one (h11 refused such a request too)."""
    request = httpcore.Request("GET", "http://registry.test/v2/", headers=[(b"Accept", b"*/*")])
    with pytest.raises(httpcore.LocalProtocolError, match="Host"):
        request_head(request)


async def test_a_credential_holding_a_line_break_sends_nothing(faults: FaultServer) -> None:
    """A pull secret is the cluster user's data: it must not add a header to the request."""
    transport = Transport(loopback_options(faults.host))
    try:
        with pytest.raises(errors.ProtocolError, match="illegal header value"):
            await transport.exchange(
                "GET",
                f"{faults.url}{MANIFEST_PATH}",
                {"Authorization": "Basic eDp5\r\nX-Injected: 1"},
                deadline_in(5),
            )
    finally:
        await transport.aclose()
    assert faults.requests == []


async def test_heads_of_one_registry_share_one_connection(faults: FaultServer) -> None:
    body = sample_index()
    faults.route(MANIFEST_PATH, manifest_reply(body))
    transport = Transport(loopback_options(faults.host))
    try:
        for _ in range(3):
            reply = await transport.exchange(
                "HEAD", f"{faults.url}{MANIFEST_PATH}", {}, deadline_in(5)
            )
            assert reply.status == 200 and reply.body == b""
            assert reply.headers["docker-content-digest"].startswith("sha256:")
        got = await transport.exchange("GET", f"{faults.url}{MANIFEST_PATH}", {}, deadline_in(5))
    finally:
        await transport.aclose()
    assert got.body == body
    assert faults.connections == 1
    assert faults.count("HEAD") == 3


async def test_a_connection_that_sent_what_no_request_asked_for_is_not_reused(
    faults: FaultServer,
) -> None:
    """A registry answering a HEAD with a body: those bytes would be read as the next
    request's answer."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDocker-Content-Digest: sha256:ab\r\n\r\n"
    faults.route(MANIFEST_PATH, Reply(raw_head=head + b"hello"), method="HEAD")
    transport = Transport(loopback_options(faults.host))
    try:
        for _ in range(2):
            reply = await transport.exchange(
                "HEAD", f"{faults.url}{MANIFEST_PATH}", {}, deadline_in(5)
            )
            assert reply.headers["docker-content-digest"] == "sha256:ab"
    finally:
        await transport.aclose()
    assert faults.connections == 2


async def test_a_body_ending_with_the_connection_is_read_whole(faults: FaultServer) -> None:
    faults.route(
        MANIFEST_PATH,
        Reply(raw_head=b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello", close=True),
    )
    transport = Transport(loopback_options(faults.host))
    try:
        reply = await transport.exchange("GET", f"{faults.url}{MANIFEST_PATH}", {}, deadline_in(5))
        again = await transport.exchange("GET", f"{faults.url}{MANIFEST_PATH}", {}, deadline_in(5))
    finally:
        await transport.aclose()
    assert reply.body == again.body == b"hello"
    assert faults.connections == 2


@pytest.mark.parametrize(
    ("parser", "kind"), [(True, RegistryConnection), (False, httpcore.AsyncHTTPConnection)]
)
async def test_connections_are_pinhooks_own_or_httpcores_without_httptools(
    faults: FaultServer, parser: bool, kind: type
) -> None:
    """Without httptools (optional, as for the listener) httpcore's own connections serve."""
    body = sample_index()
    faults.route(MANIFEST_PATH, manifest_reply(body))
    connect = partial(
        new_connection,
        backend=AsyncioBackend(),
        ssl_context=httpcore.default_ssl_context(),
        keepalive_expiry=KEEPALIVE_SECONDS,
        parser=parser,
    )
    pool = ConnectionPool(connect, 4)
    try:
        for _ in range(2):
            request = httpcore.Request(
                "GET", f"{faults.url}{MANIFEST_PATH}", headers=[(b"Host", faults.host.encode())]
            )
            response = await pool.send(request)
            assert await response.aread() == body
            await response.aclose()
        assert [type(c) for c in pool.connections] == [kind]
    finally:
        await pool.aclose()
    assert faults.connections == 1


async def test_an_answer_not_begun_in_time_is_a_read_timeout_and_closes(
    faults: FaultServer,
) -> None:
    """One timer bounds the request and the answer's head (the transport sets it to the
    time left before the deadline)."""
    faults.route(MANIFEST_PATH, Reply(hang=True))
    connection = new_connection(
        httpcore.Origin(b"http", b"127.0.0.1", faults.port),
        backend=AsyncioBackend(),
        ssl_context=httpcore.default_ssl_context(),
        keepalive_expiry=KEEPALIVE_SECONDS,
    )
    request = httpcore.Request(
        "GET",
        f"{faults.url}{MANIFEST_PATH}",
        headers=[(b"Host", faults.host.encode())],
        extensions={"timeout": {"read": 0.05}},
    )
    with pytest.raises(httpcore.ReadTimeout):
        await connection.handle_async_request(request)
    assert connection.is_closed()
    assert faults.count("GET", MANIFEST_PATH) == 1


def _flood(answer: Answer, start: bytes, filler: bytes) -> int:
    """Feed ``start``, then ``filler`` until the answer is refused; the bytes fed."""
    fed = len(start)
    answer.feed(start)
    while fed < 4 * HEAD_SIZE_LIMIT:
        answer.feed(filler)
        fed += len(filler)
    return fed


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(b"0\r\nX-Trailer: ", id="endless trailer"),
        pytest.param(b"1;ext=", id="endless chunk extension"),
        pytest.param(b"0000", id="endless chunk size"),
    ],
)
def test_endless_framing_is_cut_off(start: bytes) -> None:
    """Chunk lines and trailers carry no body: neither the head's limit nor the body's
    covers them (h11 held them to its event size)."""
    answer = Answer(head_only=False)
    answer.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
    filler = b"0" if start == b"0000" else b"a"
    with pytest.raises(httpcore.RemoteProtocolError, match="framing larger"):
        _flood(answer, start, filler * 16384)


def test_a_head_near_its_limit_leaves_room_for_framing() -> None:
    padding = b"X-Padding: " + b"a" * (HEAD_SIZE_LIMIT - 100) + b"\r\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + padding + b"\r\n"
    chunks = b"".join(b"1;ext=" + b"e" * 1000 + b"\r\nx\r\n" for _ in range(50)) + b"0\r\n\r\n"
    answer = _parsed(head + chunks, piece=65536)
    assert answer.complete and _body(answer) == b"x" * 50


def test_many_small_chunks_are_not_framing_abuse() -> None:
    body = b"".join(b"40\r\n" + b"x" * 64 + b"\r\n" for _ in range(4096)) + b"0\r\n\r\n"
    answer = _parsed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, piece=65536)
    assert answer.complete and len(_body(answer)) == 64 * 4096

"""The transport under the registry client: one pooled HTTP client and the rules every request
to a registry or token service follows.

After go-containerregistry's ``remote/transport`` retry and redirect handling: 5xx, 429
(honouring ``Retry-After``) and connection failures are retried with jittered backoff while the
deadline allows; redirects are followed by hand, each target checked by the host guard, plain
HTTP only to an insecure host, and never with the Authorization header to another host. Every
wait is bounded by an absolute deadline on the running loop's clock, every body by a size limit.

A caller's deadline never cancels a request inside the connection pool: each send runs in a
task of its own, with the connection's timeouts set to the time that is left; a caller that
gives up stops waiting for it, and the task ends on those timeouts, returning its connection
(httpcore's pool, used before :mod:`.pool`, leaked connection slots to cancellation landing
while it assigned them). Should the pool wedge anyway (only pool timeouts, nothing
answered), the client is replaced by a fresh one. Connections go through
:class:`~.hostguard.GuardedBackend`, so only to addresses the host guard checked.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from functools import partial
from typing import Protocol

import httpcore
import httpx

from ..errors import DeadlineExceeded, ProtocolError, RegistryUnavailable
from ..redact import scrub
from .connection import new_connection
from .dns import HostResolver
from .hostguard import GuardedBackend, HostGuard
from .mirror import Mirror
from .pool import ConnectionPool
from .ratelimit import RateLimitWatch
from .reference import DOCKER_HUB_API_HOST

log = logging.getLogger(__name__)

MANIFEST_SIZE_LIMIT = 4 * 1024 * 1024  # distribution's own limit for manifests, for any body
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    insecure_registries: frozenset[str] = frozenset()  # host[:port] contacted over plain http
    allowed_hosts: frozenset[str] = frozenset()  # SSRF allow-list, see .hostguard
    max_attempts: int = 3  # per HTTP exchange, for 5xx, 429 and connection errors
    backoff_base: float = 0.1  # seconds, jittered exponential
    user_agent: str = "pinhook/0.1"
    max_connections: int = 100
    ca_bundle: str | None = None  # extra PEM roots for registries with a private CA
    # Lookups at once, in all and per registry: one object or one slow registry cannot take
    # every connection (see registry.RegistryClient).
    concurrency: int = 64
    concurrency_per_registry: int = 16
    # Where docker.io's distribution API is served (tests point it at a loopback server).
    docker_hub_host: str = DOCKER_HUB_API_HOST
    # Registry name -> the mirrors asked first, in order (see .mirror).
    mirrors: Mapping[str, tuple[Mirror, ...]] = field(default_factory=dict)


class TransportEvents(Protocol):
    """What the transport reports (the metrics): each response, a replaced client, the pull
    rate limit Docker Hub states, and each token fetched (by ``auth``)."""

    def registry_request(self, host: str, method: str, status: str, seconds: float) -> None: ...

    def registry_client_rebuilt(self) -> None: ...

    def registry_ratelimit(self, host: str, remaining: int, limit: int) -> None: ...

    def token_request(self, host: str, result: str) -> None: ...


class _Silent:
    def registry_request(self, host: str, method: str, status: str, seconds: float) -> None:
        pass

    def registry_client_rebuilt(self) -> None:
        pass

    def registry_ratelimit(self, host: str, remaining: int, limit: int) -> None:
        pass

    def token_request(self, host: str, result: str) -> None:
        pass


# Consecutive pool timeouts, with no answer in between, after which the pool is taken to be
# wedged and the client is replaced; the old one is closed once its requests are past.
POOL_TIMEOUTS_BEFORE_REBUILD = 5
RETIRED_CLIENT_GRACE_SECONDS = 35.0
# A body still arriving this long after the deadline is cut off (a trickling server).
BODY_GRACE_SECONDS = 1.0
# An idle keep-alive connection is closed after this long (httpx's default).
KEEPALIVE_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Reply:
    method: str
    url: httpx.URL
    status: int
    headers: httpx.Headers
    body: bytes


class MalformedAnswer(ProtocolError):
    """The HTTP answer itself could not be parsed (e.g. ``Content-Length: -1``)."""


class _Transient(Exception):
    """A connection-level failure worth retrying."""


class Transport:
    """One pool of keep-alive connections for the process, with the host guard."""

    def __init__(
        self,
        options: RegistryOptions,
        *,
        resolver: HostResolver | None = None,
        events: TransportEvents | None = None,
    ) -> None:
        self._options = options
        self._insecure = frozenset(host.strip().lower() for host in options.insecure_registries)
        self._resolver = resolver or HostResolver()
        self.guard = HostGuard(options.allowed_hosts, resolver=self._resolver)
        self._events: TransportEvents = events or _Silent()
        self._hub_host = options.docker_hub_host.lower()
        self._hub_limit = RateLimitWatch(self._events.registry_ratelimit)
        self._verify: ssl.SSLContext | bool = True
        if options.ca_bundle is not None:
            self._verify = ssl.create_default_context(cafile=options.ca_bundle)
        self._headers = {"User-Agent": options.user_agent, "Accept-Encoding": "identity"}
        self.http = self._new_pool()
        self._pool_timeouts = 0
        self._background: set[asyncio.Task[object]] = set()

    def _new_pool(self) -> ConnectionPool:
        tls = httpx.create_ssl_context(verify=self._verify)
        tls.set_alpn_protocols(["http/1.1"])
        connect = partial(
            new_connection,
            backend=GuardedBackend(self.guard),
            ssl_context=tls,
            keepalive_expiry=KEEPALIVE_SECONDS,
        )
        return ConnectionPool(connect, self._options.max_connections)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.http.aclose()
        self._resolver.close()

    @property
    def events(self) -> TransportEvents:
        return self._events

    def is_insecure(self, host: str) -> bool:
        """Whether ``host`` (``host[:port]``) is listed to be reached over plain HTTP."""
        return host.lower() in self._insecure

    async def exchange(
        self,
        method: str,
        url: str | httpx.URL,
        headers: Mapping[str, str],
        deadline: float,
        *,
        content: bytes | None = None,
        attempts: int | None = None,
        query: str = "",
    ) -> Reply:
        """One logical request, retried on 5xx, 429 and connection failures up to ``attempts``
        times in all (by default the configured ``max_attempts``).

        A request with ``content`` (a token request's form, which may hold a refresh token)
        follows no redirect: its body would go wherever the answer points. ``query``, already
        encoded, is added to ``url``'s own as sent (not to a redirect's target), and left out
        of the reply's URL, as errors show it.
        """
        loop = asyncio.get_running_loop()
        url = httpx.URL(url)
        limit = self._options.max_attempts if attempts is None else attempts
        attempt = 0
        while True:
            attempt += 1
            reply: Reply | None = None
            try:
                if content is None:
                    reply = await self._follow_redirects(method, url, headers, deadline, query)
                else:
                    reply = await self._send(method, url, headers, deadline, content, query)
            except _Transient as exc:
                problem = str(exc)
            else:
                if not _is_retryable(reply.status):
                    return reply
                problem = describe(reply)
                self._refuse_exhausted_pull_limit(method, url, reply)
            shown = _shown(url)
            if attempt >= limit:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise RegistryUnavailable(f"{method} {shown}: {problem}{tries}")
            delay = parse_retry_after(reply.headers.get("retry-after")) if reply else None
            if delay is None:
                delay = self._options.backoff_base * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            if loop.time() + delay >= deadline:
                raise RegistryUnavailable(
                    f"{method} {shown}: {problem}; no time left before the deadline to retry"
                )
            log.debug("%s %s: %s; retrying in %.2fs", method, shown, problem, delay)
            await asyncio.sleep(delay)

    async def _follow_redirects(
        self,
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str],
        deadline: float,
        query: str = "",
    ) -> Reply:
        current, current_headers = url, dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            reply = await self._send(method, current, current_headers, deadline, query=query)
            query = ""  # a redirect's target carries its own
            location = reply.headers.get("location")
            if reply.status not in _REDIRECT_STATUSES or not location:
                return reply
            following = current.join(location)
            await self._check_redirect(following, deadline)
            if not same_origin(following, current):
                current_headers.pop("Authorization", None)  # never hand a secret to another host
            current = following
        raise ProtocolError(f"{method} {_shown(url)}: more than {MAX_REDIRECTS} redirects")

    async def _check_redirect(self, url: httpx.URL, deadline: float) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise ProtocolError(f"redirect to unsupported URL {_shown(url)}")
        await self.guard.check(url.host, url.port, deadline=deadline)
        hostport = url.netloc.decode("ascii")
        if url.scheme == "http" and not (self.is_insecure(hostport) or self.is_insecure(url.host)):
            raise ProtocolError(f"refusing a redirect to plain http {_shown(url)}")

    def _refuse_exhausted_pull_limit(self, method: str, url: httpx.URL, reply: Reply) -> None:
        """A 429 from Docker Hub with no pulls left: the window is hours long, so retrying
        within a deadline of seconds only adds requests."""
        if reply.status != 429 or _hostport(reply.url) != self._hub_host:
            return
        stated = self._hub_limit.observe(self._hub_host, reply.headers)
        if stated is not None and stated.exhausted:
            raise RegistryUnavailable(
                f"{method} {_shown(url)}: Docker Hub's pull rate limit is exhausted"
                f" ({stated.describe()})"
            )

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        headers: Mapping[str, str],
        deadline: float,
        content: bytes | None = None,
        query: str = "",
    ) -> Reply:
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise DeadlineExceeded(f"{method} {_shown(url)}: deadline exceeded")
        request = _request(method, url, {**self._headers, **headers}, content, remaining, query)
        task = loop.create_task(self._fetch(self.http, request, method, url, deadline))
        self._background.add(task)
        task.add_done_callback(self._settled)
        try:
            # shield: the deadline ends this wait, never the request inside the pool.
            return await asyncio.wait_for(asyncio.shield(task), remaining)
        except TimeoutError:
            raise DeadlineExceeded(f"{method} {_shown(url)}: deadline exceeded") from None

    def _settled(self, task: asyncio.Task[object]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a caller that gave up already has its answer

    async def _fetch(
        self,
        pool: ConnectionPool,
        request: httpcore.Request,
        method: str,
        url: httpx.URL,
        deadline: float,
    ) -> Reply:
        """One request and its body, in its own task; errors classified for the caller."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            response = await pool.send(request)
            try:
                async with asyncio.timeout_at(deadline + BODY_GRACE_SECONDS):
                    body = await _read_limited(response, method, url, MANIFEST_SIZE_LIMIT)
            finally:
                await response.aclose()
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"{method} {_shown(url)}: body still arriving at the deadline"
            ) from exc
        except httpcore.PoolTimeout as exc:
            self._pool_timed_out(pool)
            raise DeadlineExceeded(
                f"{method} {_shown(url)}: no connection free before the deadline"
            ) from exc
        except httpcore.TimeoutException as exc:
            if loop.time() >= deadline:
                raise DeadlineExceeded(f"{method} {_shown(url)}: deadline exceeded") from exc
            raise _Transient(type(exc).__name__) from exc
        except _TRANSPORT_ERRORS as exc:
            raise _classify_transport_error(method, _shown(url), exc) from exc
        self._pool_timeouts = 0
        host = _hostport(url)
        status = response.status
        self._events.registry_request(host, method, str(status), time.monotonic() - started)
        answered = httpx.Headers(response.headers)
        if host == self._hub_host and status != 429:  # 429: see exchange
            self._hub_limit.observe(host, answered)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s -> %d", method, _shown(url), status)
        return Reply(method, url, status, answered, body)

    def _pool_timed_out(self, pool: ConnectionPool) -> None:
        if pool is not self.http:
            return  # a retired pool's stragglers
        self._pool_timeouts += 1
        if self._pool_timeouts < POOL_TIMEOUTS_BEFORE_REBUILD:
            return
        log.warning(
            "registry connection pool answered nothing but pool timeouts %d times in a row;"
            " replacing it",
            self._pool_timeouts,
        )
        self._pool_timeouts = 0
        self.http = self._new_pool()
        self._events.registry_client_rebuilt()
        retire = asyncio.get_running_loop().create_task(_close_later(pool))
        self._background.add(retire)
        retire.add_done_callback(self._settled)


async def _close_later(pool: ConnectionPool) -> None:
    await asyncio.sleep(RETIRED_CLIENT_GRACE_SECONDS)
    await pool.aclose()


def _shown(url: httpx.URL) -> httpx.URL:
    """``url`` as errors and logs show it: without its query, which may carry a token
    service's account or scope. Built only when shown: parsing URLs is a good part of what
    a registry request costs pinhook."""
    return url.copy_with(query=None)


def _hostport(url: httpx.URL) -> str:
    return url.netloc.decode("ascii", errors="replace").lower()


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port) == (b.scheme, b.host, b.port)


def describe(reply: Reply) -> str:
    """A short account of an error reply, with the distribution error code when there is one.

    The code and message are the registry's text: scrubbed of anything like a credential (a
    token service may echo the Authorization header) and cut short.
    """
    text = f"HTTP {reply.status}"
    try:
        document = json.loads(reply.body) if reply.body else None
    except ValueError:
        return text
    if isinstance(document, dict) and isinstance(document.get("errors"), list):
        first = document["errors"][0] if document["errors"] else None
        if isinstance(first, dict):
            said = f"{first.get('code', '')}: {first.get('message', '')}".rstrip(": ")
            return f"{text} {scrub(said, limit=200)}"
    return text


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# What httpcore raises for a failed exchange (a timeout is handled before these).
_TRANSPORT_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
)


def _classify_transport_error(method: str, url: httpx.URL, exc: Exception) -> Exception:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpcore.ConnectError) and _is_certificate_error(exc):
        return RegistryUnavailable(f"{method} {url}: TLS certificate not trusted: {text}")
    if isinstance(exc, httpcore.ConnectError) and _is_plain_http(exc):
        # Retrying cannot help: the server speaks plain HTTP where TLS was expected.
        return ProtocolError(
            f"{method} {url}: TLS handshake failed, the server seems to speak plain HTTP; if"
            f" it does, list {url.netloc.decode('ascii', 'replace')} in registry.insecure"
        )
    if isinstance(exc, httpcore.RemoteProtocolError):
        lowered = text.lower()
        if "disconnect" in lowered or "peer closed" in lowered:
            return _Transient(f"connection closed: {text}")
        return MalformedAnswer(f"{method} {url}: malformed HTTP answer: {text}")
    if isinstance(exc, httpcore.NetworkError | httpcore.ProxyError):
        return _Transient(f"{type(exc).__name__}: {text}")
    return ProtocolError(f"{method} {url}: {text}")


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_plain_http(exc: BaseException) -> bool:
    """An SSL error that means the peer answered a ClientHello with something not TLS."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) and not isinstance(seen, ssl.SSLCertVerificationError):
            text = f"{getattr(seen, 'reason', None) or ''} {seen}".upper()
            if any(sign in text for sign in _PLAIN_HTTP_SIGNS):
                return True
        seen = seen.__cause__ or seen.__context__
    return False


# What OpenSSL says when the "ServerHello" is an HTTP answer (1.1 and 3.x spellings).
_PLAIN_HTTP_SIGNS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "RECORD LAYER FAILURE")


def _is_retryable(status: int) -> bool:
    return status == 429 or (status >= 500 and status not in (501, 505))


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _request(
    method: str,
    url: httpx.URL,
    headers: Mapping[str, str],
    content: bytes | None,
    timeout: float,
    query: str = "",
) -> httpcore.Request:
    """The request httpx's transport would hand httpcore, from the URL already parsed (and
    ``query``, encoded, added to its own)."""
    target = url.raw_path
    if query:
        if url.query:
            target += b"&"
        elif not target.endswith(b"?"):  # a realm may end in an empty query
            target += b"?"
        target += query.encode("ascii")
    sent = [(b"Host", url.netloc)]
    sent += [(name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()]
    if content is not None or method in _BODY_METHODS:  # httpx's rule: a POST says it is empty
        sent.append((b"Content-Length", str(len(content or b"")).encode("ascii")))
    return httpcore.Request(
        method.encode("ascii"),
        httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=target),
        headers=sent,
        content=content or b"",
        extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), timeout)},
    )


async def _read_limited(
    response: httpcore.Response, method: str, url: httpx.URL, limit: int
) -> bytes:
    """The body as sent, at most ``limit`` bytes, then decoded should the server have
    encoded it though asked for identity."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"{method} {_shown(url)}: body larger than {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not _is_encoded(response.headers):
        return body
    return _decoded(response, method, url, body, limit)


def _is_encoded(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        name.lower() == b"content-encoding" and value.strip().lower() not in (b"", b"identity")
        for name, value in headers
    )


# Deflate inflates at most about 1,000-fold: a piece this size stays near the limit.
_DECODED_PIECE = 4 * 1024


class _Pieces(httpx.SyncByteStream):
    """A body in pieces, so that httpx's decoder inflates a bounded piece at a time."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self._body), _DECODED_PIECE):
            yield self._body[start : start + _DECODED_PIECE]


def _decoded(
    response: httpcore.Response, method: str, url: httpx.URL, body: bytes, limit: int
) -> bytes:
    """httpx's decoding of an encoded body, stopped at ``limit`` decoded bytes."""
    encoded = httpx.Response(response.status, headers=response.headers, stream=_Pieces(body))
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in encoded.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(
                    f"{method} {_shown(url)}: decoded body larger than {limit} bytes"
                )
            chunks.append(chunk)
    except httpx.DecodingError as exc:
        raise ProtocolError(f"{method} {_shown(url)}: undecodable body") from exc
    return b"".join(chunks)

"""An OCI distribution client that resolves image tags to manifest digests.

Modelled on go-containerregistry's ``remote/transport`` (challenge cache, bearer token
exchange, retries) with the registry quirks collected in ``shared/notes/registry-protocol.md``.
Every network wait is bounded by an absolute deadline on the running loop's clock.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType

import httpx

from .. import errors
from .credential import Credential
from .hostguard import HostGuard
from .reference import (
    DOCKER_HUB,
    DOCKER_HUB_API_HOST,
    ImageRef,
    is_valid_digest,
    split_host_port,
)

log = logging.getLogger(__name__)

# Index and list types first: asking for all four keeps multi-arch digests intact. Never
# schema1: registries convert to it with a different, ephemeral digest.
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
MANIFEST_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)
SCHEMA1_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)

MANIFEST_SIZE_LIMIT = 4 * 1024 * 1024  # distribution's own limit for manifests
MAX_REDIRECTS = 5
TOKEN_DEFAULT_LIFETIME = 60.0
TOKEN_CACHE_LIMIT = 4096
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME_RE = re.compile(rf"\s*({_TCHARS})(?:\s+|$)")
_PARAM_RE = re.compile(rf'[\s,]*({_TCHARS})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    insecure_registries: frozenset[str] = frozenset()  # host[:port] contacted over plain http
    allowed_hosts: frozenset[str] = frozenset()  # SSRF allow-list, see .hostguard
    max_attempts: int = 3  # per HTTP exchange, for 5xx, 429 and connection errors
    backoff_base: float = 0.1  # seconds, jittered exponential
    user_agent: str = "pinhook/0.1"
    max_connections: int = 100
    ca_bundle: str | None = None  # extra PEM roots for registries with a private CA


@dataclass(frozen=True, slots=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: lower-case scheme and its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str | None:
        return self.params.get(name)


def parse_challenge(header: str) -> Challenge | None:
    """Parse the first challenge of a ``WWW-Authenticate`` value (RFC 7235 auth-params)."""
    match = _SCHEME_RE.match(header)
    if match is None:
        return None
    params: dict[str, str] = {}
    position = match.end()
    while position < len(header):
        param = _PARAM_RE.match(header, position)
        if param is None:  # a token68 or a second challenge: the first one is complete
            break
        quoted, bare = param.group(2), param.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[param.group(1).lower()] = value
        position = param.end()
    return Challenge(match.group(1).lower(), params)


def pick_challenge(headers: httpx.Headers) -> Challenge | None:
    """The challenge to answer among all ``WWW-Authenticate`` headers (Bearer preferred)."""
    parsed = [parse_challenge(value) for value in headers.get_list("www-authenticate")]
    usable = [c for c in parsed if c is not None and c.scheme in ("bearer", "basic")]
    usable.sort(key=lambda c: c.scheme != "bearer")
    return usable[0] if usable else None


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


def digest_matches(body: bytes, digest: str) -> bool:
    algorithm, _, expected = digest.partition(":")
    return hashlib.new(algorithm, body).hexdigest() == expected


def api_host(registry: str) -> str:
    """The host that serves the distribution API for a registry name."""
    return DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    expires_at: float  # time.monotonic()


@dataclass(frozen=True, slots=True)
class _Reply:
    method: str
    url: httpx.URL
    status: int
    headers: httpx.Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class _Target:
    """Where one resolution goes, with which credential, until when."""

    registry: str
    host: str
    base_url: str
    repository: str
    credential: Credential | None
    deadline: float

    @property
    def scope(self) -> str:
        return f"repository:{self.repository}:pull"

    @property
    def identity(self) -> str:
        return "anonymous" if self.credential is None else self.credential.identity()


@dataclass(frozen=True, slots=True)
class _Sent:
    """The authorization attached to a request, to decide what a 401 means."""

    headers: Mapping[str, str] = field(default_factory=dict)
    scheme: str | None = None
    token: _Token | None = None
    token_was_cached: bool = False


class MalformedAnswer(errors.ProtocolError):
    """The HTTP answer itself could not be parsed (e.g. ``Content-Length: -1``)."""


class _Rejected(Exception):
    """The registry or its token service refused the current credential (401/403)."""

    def __init__(self, status: int, where: str) -> None:
        super().__init__(f"HTTP {status} from {where}")
        self.status = status


class _Transient(Exception):
    """A connection-level failure worth retrying."""


def _basic_header(credential: Credential) -> dict[str, str]:
    pair = f"{credential.username}:{credential.password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}


def _describe(reply: _Reply) -> str:
    """A short account of an error reply, with the distribution error code when there is one."""
    text = f"HTTP {reply.status}"
    try:
        document = json.loads(reply.body) if reply.body else None
    except ValueError:
        return text
    if isinstance(document, dict) and isinstance(document.get("errors"), list):
        first = document["errors"][0] if document["errors"] else None
        if isinstance(first, dict):
            return f"{text} {first.get('code', '')}: {first.get('message', '')}".rstrip(": ")
    return text


class RegistryClient:
    """One pooled ``httpx.AsyncClient`` (keep-alive) for the process; an async context manager.

    Holds the per-registry challenge cache and the bearer token cache, so one instance should
    serve the whole process.
    """

    def __init__(self, options: RegistryOptions, *, guard: HostGuard | None = None) -> None:
        self._options = options
        self._insecure = frozenset(host.strip().lower() for host in options.insecure_registries)
        self._guard = guard if guard is not None else HostGuard(options.allowed_hosts)
        verify: ssl.SSLContext | bool = True
        if options.ca_bundle is not None:
            verify = ssl.create_default_context(cafile=options.ca_bundle)
        self._http = httpx.AsyncClient(
            headers={"User-Agent": options.user_agent, "Accept-Encoding": "identity"},
            follow_redirects=False,
            verify=verify,
            # The asyncio deadline is the real bound; this only caps a single read or connect.
            timeout=httpx.Timeout(30.0),
            limits=httpx.Limits(
                max_connections=options.max_connections,
                max_keepalive_connections=options.max_connections,
            ),
        )
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._token_locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def resolve_digest(
        self, ref: ImageRef, credentials: Sequence[Credential], *, deadline: float
    ) -> str:
        """The digest of the manifest the registry serves for ``ref``'s tag (or digest).

        A reference with both a tag and a digest is looked up by digest (the digest is what
        a runtime pulls); with neither, by ``latest``. Credentials are tried in order; with
        none, the request is anonymous.
        """
        reference = ref.digest or ref.tag or "latest"
        return await self._with_credentials(
            ref, credentials, deadline, lambda target: self._digest_of(target, reference, ref)
        )

    async def manifest_exists(
        self, ref: ImageRef, credentials: Sequence[Credential], *, deadline: float
    ) -> bool:
        """Whether the registry has the manifest ``ref`` names by digest."""
        if ref.digest is None:
            raise ValueError(f"manifest_exists needs a reference with a digest, got {ref}")
        try:
            await self.resolve_digest(ref, credentials, deadline=deadline)
        except errors.NotFound:
            return False
        return True

    # -- credentials -------------------------------------------------------------------------

    async def _with_credentials(
        self,
        ref: ImageRef,
        credentials: Sequence[Credential],
        deadline: float,
        operation: Callable[[_Target], Awaitable[str]],
    ) -> str:
        if asyncio.get_running_loop().time() >= deadline:
            raise errors.DeadlineExceeded(f"no time left to resolve {ref}")
        base = await self._target(ref, deadline)
        # Every matching credential, then anonymous: a public image must still resolve when a
        # stale credential for its registry is lying around.
        candidates: list[Credential | None] = [*credentials, None]
        refusals: list[str] = []
        for credential in candidates:
            try:
                return await operation(replace(base, credential=credential))
            except _Rejected as rejected:
                refusals.append(str(rejected))
                log.debug("%s refused a credential for %s: %s", base.host, ref.repository, rejected)
        raise errors.Unauthorized(self._unauthorized_message(ref, credentials, refusals))

    @staticmethod
    def _unauthorized_message(
        ref: ImageRef, credentials: Sequence[Credential], refusals: list[str]
    ) -> str:
        if credentials:
            sources = ", ".join(c.source for c in credentials if c.source)
            tried = f"{len(credentials)} credential(s) tried" + (f" ({sources})" if sources else "")
            tried += ", then anonymous access"
        else:
            tried = "anonymous access, no credentials configured"
        message = f"registry {ref.registry} refused {ref}: {tried}; {refusals[-1]}"
        if ref.registry == DOCKER_HUB:
            message += (
                "; note that Docker Hub also answers 401 for repositories that do not exist, "
                "so check the image name"
            )
        return message

    async def _target(self, ref: ImageRef, deadline: float) -> _Target:
        host = api_host(ref.registry)
        bare, port = split_host_port(host)
        await self._guard.check(bare, port, deadline=deadline)
        scheme = "http" if self._is_insecure(ref.registry) or self._is_insecure(host) else "https"
        return _Target(
            registry=ref.registry,
            host=host,
            base_url=f"{scheme}://{host}",
            repository=ref.repository,
            credential=None,
            deadline=deadline,
        )

    def _is_insecure(self, host: str) -> bool:
        return host.lower() in self._insecure

    # -- digests -----------------------------------------------------------------------------

    async def _digest_of(self, target: _Target, reference: str, ref: ImageRef) -> str:
        url = f"{target.base_url}/v2/{target.repository}/manifests/{reference}"
        try:
            head: _Reply | None = await self._authorized(target, "HEAD", url)
        except MalformedAnswer as exc:  # e.g. an unparseable Content-Length
            log.debug("HEAD %s was malformed (%s); falling back to GET", url, exc)
            head = None
        if head is not None:
            if head.status == 404:
                raise errors.NotFound(f"{ref} not found ({_describe(head)})")
            if head.status == 200:
                _refuse_schema1(head)
                digest = _trusted_head_digest(head)
                if digest is not None:
                    return _expect(ref, digest)
            elif head.status != 405:
                raise errors.ProtocolError(f"HEAD {url} answered {_describe(head)}")
        reply = await self._authorized(target, "GET", url)
        if reply.status == 404:
            raise errors.NotFound(f"{ref} not found ({_describe(reply)})")
        if reply.status != 200:
            raise errors.ProtocolError(f"GET {url} answered {_describe(reply)}")
        _refuse_schema1(reply)
        return _expect(ref, _verified_body_digest(reply, ref.digest))

    # -- authorization -----------------------------------------------------------------------

    async def _authorized(self, target: _Target, method: str, url: str) -> _Reply:
        """One exchange, answering a 401 challenge once; raises _Rejected on 401/403."""
        headers = {"Accept": MANIFEST_ACCEPT}
        sent = await self._upfront_authorization(target)
        reply = await self._exchange(method, url, {**headers, **sent.headers}, target.deadline)
        if reply.status == 403:
            raise _Rejected(403, target.host)
        if reply.status != 401:
            return reply
        challenge = (
            pick_challenge(reply.headers)
            or self._challenges.get(target.host)
            or await self._ping_challenge(target)
        )
        if challenge is None:
            raise _Rejected(401, f"{target.host} (no usable WWW-Authenticate challenge)")
        self._challenges[target.host] = challenge
        if sent.token is not None:
            self._drop_token(target, sent.token)
        answered_fresh = sent.scheme == challenge.scheme and not sent.token_was_cached
        if answered_fresh:
            raise _Rejected(401, target.host)
        retry = await self._authorization(challenge, target, stale=sent.token)
        if retry.scheme is None:
            raise _Rejected(401, f"{target.host} (wants {challenge.scheme} credentials)")
        reply = await self._exchange(method, url, {**headers, **retry.headers}, target.deadline)
        if reply.status in (401, 403):
            raise _Rejected(reply.status, target.host)
        return reply

    async def _upfront_authorization(self, target: _Target) -> _Sent:
        """Authorize before the first request when this registry's challenge is known."""
        challenge = self._challenges.get(target.host)
        if challenge is None:
            return _Sent()
        return await self._authorization(challenge, target, stale=None)

    async def _authorization(
        self, challenge: Challenge, target: _Target, *, stale: _Token | None
    ) -> _Sent:
        if challenge.scheme == "basic":
            if target.credential is None:
                return _Sent()
            return _Sent(_basic_header(target.credential), scheme="basic")
        if challenge.scheme == "bearer":
            token, was_cached = await self._bearer_token(challenge, target, stale)
            return _Sent(
                {"Authorization": f"Bearer {token.value}"},
                scheme="bearer",
                token=token,
                token_was_cached=was_cached,
            )
        raise errors.ProtocolError(f"{target.host} asks for unsupported auth {challenge.scheme}")

    async def _ping_challenge(self, target: _Target) -> Challenge | None:
        """gcr.io may send 401 without a challenge; the ``/v2/`` ping carries it."""
        reply = await self._exchange("GET", f"{target.base_url}/v2/", {}, target.deadline)
        return pick_challenge(reply.headers) if reply.status == 401 else None

    # -- bearer tokens -----------------------------------------------------------------------

    def _token_key(self, target: _Target) -> tuple[str, str, str]:
        return (target.host, target.scope, target.identity)

    def _drop_token(self, target: _Target, token: _Token) -> None:
        key = self._token_key(target)
        if self._tokens.get(key) is token:
            del self._tokens[key]

    async def _bearer_token(
        self, challenge: Challenge, target: _Target, stale: _Token | None
    ) -> tuple[_Token, bool]:
        """A valid token for the target's scope and credential, and whether it was cached."""
        key = self._token_key(target)
        cached = self._usable_token(key, stale)
        if cached is not None:
            return cached, True
        # One fetch per key at a time: concurrent admissions of one image share a token.
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        try:
            async with asyncio.timeout_at(target.deadline):
                await lock.acquire()
        except TimeoutError as exc:
            raise errors.DeadlineExceeded(f"waiting for a token for {target.host}") from exc
        try:
            cached = self._usable_token(key, stale)
            if cached is not None:
                return cached, True
            token = await self._fetch_token(challenge, target)
            self._store_token(key, token)
            return token, False
        finally:
            lock.release()

    def _usable_token(self, key: tuple[str, str, str], stale: _Token | None) -> _Token | None:
        token = self._tokens.get(key)
        if token is None or token is stale or token.expires_at <= time.monotonic():
            return None
        return token

    def _store_token(self, key: tuple[str, str, str], token: _Token) -> None:
        if len(self._tokens) >= TOKEN_CACHE_LIMIT:
            now = time.monotonic()
            for old in [k for k, t in self._tokens.items() if t.expires_at <= now]:
                del self._tokens[old]
                self._token_locks.pop(old, None)
        self._tokens[key] = token

    async def _fetch_token(self, challenge: Challenge, target: _Target) -> _Token:
        realm = challenge.param("realm")
        if not realm:
            raise errors.ProtocolError(f"{target.host} sent a Bearer challenge without a realm")
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL as exc:
            raise errors.ProtocolError(f"{target.host} sent an invalid token realm") from exc
        if url.scheme == "http" and not self._is_insecure(target.host):
            raise errors.ProtocolError(
                f"token realm {realm} of {target.host} is plain http; credentials would be sent "
                "in clear (list the registry as insecure to allow it)"
            )
        if url.scheme not in ("http", "https") or not url.host:
            raise errors.ProtocolError(f"token realm {realm} of {target.host} is not an http URL")
        await self._guard.check(url.host, url.port, deadline=target.deadline)
        params = {"scope": target.scope}
        service = challenge.param("service")
        if service:
            params["service"] = service
        headers = _basic_header(target.credential) if target.credential else {}
        reply = await self._exchange("GET", url.copy_merge_params(params), headers, target.deadline)
        if reply.status in (401, 403):
            raise _Rejected(reply.status, f"token service {url.host}")
        if reply.status != 200:
            raise errors.ProtocolError(f"token service {url.host} answered {_describe(reply)}")
        return _parse_token(reply.body, target.host)

    # -- HTTP exchanges: retries, redirects, deadline ----------------------------------------

    async def _exchange(
        self, method: str, url: str | httpx.URL, headers: Mapping[str, str], deadline: float
    ) -> _Reply:
        """One logical request, retried on 5xx, 429 and connection failures."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            reply: _Reply | None = None
            try:
                reply = await self._follow_redirects(method, httpx.URL(url), headers, deadline)
            except _Transient as exc:
                problem = str(exc)
            else:
                if not _is_retryable(reply.status):
                    return reply
                problem = _describe(reply)
            shown = httpx.URL(url).copy_with(query=None)
            if attempt >= self._options.max_attempts:
                raise errors.RegistryUnavailable(
                    f"{method} {shown}: {problem} (after {attempt} attempts)"
                )
            delay = parse_retry_after(reply.headers.get("retry-after")) if reply else None
            if delay is None:
                delay = self._options.backoff_base * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            if loop.time() + delay >= deadline:
                raise errors.RegistryUnavailable(
                    f"{method} {shown}: {problem}; no time left before the deadline to retry"
                )
            log.debug("%s %s: %s; retrying in %.2fs", method, shown, problem, delay)
            await asyncio.sleep(delay)

    async def _follow_redirects(
        self, method: str, url: httpx.URL, headers: Mapping[str, str], deadline: float
    ) -> _Reply:
        current, current_headers = url, dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            reply = await self._send(method, current, current_headers, deadline)
            location = reply.headers.get("location")
            if reply.status not in _REDIRECT_STATUSES or not location:
                return reply
            following = current.join(location)
            await self._check_redirect(following, deadline)
            if (following.scheme, following.host, following.port) != (
                current.scheme,
                current.host,
                current.port,
            ):
                current_headers.pop("Authorization", None)  # never hand a secret to another host
            current = following
        raise errors.ProtocolError(f"{method} {url}: more than {MAX_REDIRECTS} redirects")

    async def _check_redirect(self, url: httpx.URL, deadline: float) -> None:
        if url.scheme not in ("http", "https") or not url.host:
            raise errors.ProtocolError(f"redirect to unsupported URL {url}")
        await self._guard.check(url.host, url.port, deadline=deadline)
        hostport = url.netloc.decode("ascii")
        if url.scheme == "http" and not (
            self._is_insecure(hostport) or self._is_insecure(url.host)
        ):
            raise errors.ProtocolError(f"refusing a redirect to plain http {url}")

    async def _send(
        self, method: str, url: httpx.URL, headers: Mapping[str, str], deadline: float
    ) -> _Reply:
        loop = asyncio.get_running_loop()
        shown = url.copy_with(query=None)
        try:
            async with asyncio.timeout_at(deadline):
                request = self._http.build_request(method, url, headers=headers)
                response = await self._http.send(request, stream=True)
                try:
                    body = await _read_limited(response, MANIFEST_SIZE_LIMIT)
                finally:
                    await response.aclose()
        except TimeoutError as exc:
            raise errors.DeadlineExceeded(f"{method} {shown}: deadline exceeded") from exc
        except httpx.TimeoutException as exc:
            if loop.time() >= deadline:
                raise errors.DeadlineExceeded(f"{method} {shown}: deadline exceeded") from exc
            raise _Transient(f"{type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise _classify_transport_error(method, shown, exc) from exc
        except httpx.DecodingError as exc:
            raise errors.ProtocolError(f"{method} {shown}: undecodable body") from exc
        log.debug("%s %s -> %d", method, url, response.status_code)
        return _Reply(method, url, response.status_code, response.headers, body)


def _classify_transport_error(method: str, url: httpx.URL, exc: httpx.TransportError) -> Exception:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and _is_certificate_error(exc):
        return errors.RegistryUnavailable(f"{method} {url}: TLS certificate not trusted: {text}")
    if isinstance(exc, httpx.RemoteProtocolError):
        lowered = text.lower()
        if "disconnect" in lowered or "peer closed" in lowered:
            return _Transient(f"connection closed: {text}")
        return MalformedAnswer(f"{method} {url}: malformed HTTP answer: {text}")
    if isinstance(exc, httpx.NetworkError | httpx.ProxyError):
        return _Transient(f"{type(exc).__name__}: {text}")
    return errors.ProtocolError(f"{method} {url}: {text}")


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _is_retryable(status: int) -> bool:
    return status == 429 or (status >= 500 and status not in (501, 505))


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise errors.ProtocolError(f"{response.url}: body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_token(body: bytes, host: str) -> _Token:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise errors.ProtocolError(f"token service of {host} answered invalid JSON") from exc
    if not isinstance(document, dict):
        raise errors.ProtocolError(f"token service of {host} answered a non-object")
    value = document.get("token") or document.get("access_token")
    if not isinstance(value, str) or not value:
        raise errors.ProtocolError(f"token service of {host} answered no token")
    lifetime = document.get("expires_in")
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool) or lifetime <= 0:
        lifetime = TOKEN_DEFAULT_LIFETIME
    remaining = float(lifetime) - _age(document.get("issued_at"))
    # Renew shortly before expiry so a token never dies in flight.
    margin = min(10.0, float(lifetime) / 10)
    return _Token(value, time.monotonic() + min(float(lifetime), remaining) - margin)


def _age(issued_at: object) -> float:
    """Seconds since ``issued_at`` (RFC 3339); 0 when absent, invalid or in the future."""
    if not isinstance(issued_at, str):
        return 0.0
    try:
        issued = datetime.fromisoformat(issued_at.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if issued.tzinfo is None:
        issued = issued.replace(tzinfo=UTC)
    return max(0.0, datetime.now(UTC).timestamp() - issued.timestamp())


def _trusted_head_digest(reply: _Reply) -> str | None:
    """The HEAD answer's digest if it can be trusted without fetching the body."""
    digest = str(reply.headers.get("docker-content-digest", "")).strip()
    length = str(reply.headers.get("content-length", "")).strip()
    if not is_valid_digest(digest) or not length.isdigit():
        return None
    return digest


def _verified_body_digest(reply: _Reply, expected: str | None) -> str:
    header = reply.headers.get("docker-content-digest", "").strip()
    if header:
        if not is_valid_digest(header):
            raise errors.ProtocolError(f"{reply.url}: invalid Docker-Content-Digest {header!r}")
        if not digest_matches(reply.body, header):
            raise errors.DigestMismatch(
                f"{reply.url}: body does not match its Docker-Content-Digest {header}"
            )
    if expected is not None and is_valid_digest(expected):
        if not digest_matches(reply.body, expected):
            raise errors.DigestMismatch(f"{reply.url}: body does not match {expected}")
        return expected
    return header or "sha256:" + hashlib.sha256(reply.body).hexdigest()


def _expect(ref: ImageRef, digest: str) -> str:
    if ref.digest is not None and digest != ref.digest:
        raise errors.DigestMismatch(f"{ref}: registry serves {digest}, not the requested digest")
    return digest


def _refuse_schema1(reply: _Reply) -> None:
    media_type = reply.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type in SCHEMA1_MEDIA_TYPES:
        raise errors.ProtocolError(
            f"{reply.url} serves a schema1 manifest, whose digest is not stable; "
            "push the image with a current client"
        )

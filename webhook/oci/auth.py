"""Registry authorisation: the 401 → challenge → token flow, and its caches.

After go-containerregistry's ``remote/transport`` (``ping.go``, ``bearer.go``, ``basic.go``): a
registry's ``WWW-Authenticate`` challenge is remembered, so later requests carry the right
``Authorization`` up front; bearer tokens are fetched from the challenge's realm (with the
credential as Basic auth, if any) and cached per host, repository scope and credential until
shortly before they expire. :meth:`Authenticator.exchange` decides, from what was sent and the
401 that came back, the one retry worth making, or that the credential is refused.

Credentials go only to the registry they are for and to the token realm that registry's own
challenge names: a 401 from a host a request was redirected to is not the registry's
challenge, and is never answered. A challenge is remembered per repository, and for the whole
host only once it has worked, so one repository's unusable challenge (a realm on a private
address, a token service answering garbage) can never fail another repository's lookups.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from ..errors import DeadlineExceeded, ForbiddenHost, ProtocolError
from .credential import Credential
from .transport import Reply, Transport, describe, same_origin

log = logging.getLogger(__name__)

TOKEN_DEFAULT_LIFETIME = 60.0
TOKEN_CACHE_LIMIT = 4096
CHALLENGE_SECONDS = 3600.0  # a registry may move its token service; look again hourly
_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME_RE = re.compile(rf"\s*({_TCHARS})(?:\s+|$)")
_PARAM_RE = re.compile(rf'[\s,]*({_TCHARS})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


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


@dataclass(frozen=True, slots=True)
class Target:
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


class Rejected(Exception):
    """The registry or its token service refused the current credential (401/403)."""

    def __init__(self, status: int, where: str) -> None:
        super().__init__(f"HTTP {status} from {where}")
        self.status = status


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    expires_at: float  # time.monotonic()


@dataclass(frozen=True, slots=True)
class _Sent:
    """The authorization attached to a request, to decide what a 401 means."""

    headers: Mapping[str, str] = field(default_factory=dict)
    scheme: str | None = None
    challenge: Challenge | None = None  # the one answered
    token: _Token | None = None
    token_was_cached: bool = False


_TokenKey = tuple[str, str, str]  # host, scope, credential identity


class Authenticator:
    """The challenge and token caches of one registry client; one per process."""

    def __init__(
        self, transport: Transport, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._transport = transport
        self._clock = clock
        # (host, repository) -> the challenge last seen for it; host -> one that worked.
        self._challenges: dict[tuple[str, str], tuple[Challenge, float]] = {}
        self._proven: dict[str, tuple[Challenge, float]] = {}
        self._tokens: dict[_TokenKey, _Token] = {}
        self._token_locks: dict[_TokenKey, asyncio.Lock] = {}

    async def exchange(
        self, target: Target, method: str, url: str, headers: Mapping[str, str]
    ) -> Reply:
        """One request with the authorization its registry asks for: up front when the
        challenge is known, else after the 401, once. Raises :class:`Rejected` on 401/403."""
        sent = await self._upfront(target)
        reply = await self._send(target, method, url, headers, sent)
        if reply.status == 401:
            _refuse_foreign_challenge(target, reply)
            retry = await self._answer(target, sent, reply)
            reply = await self._send(target, method, url, headers, retry)
            if reply.status == 401:
                _refuse_foreign_challenge(target, reply)
                raise Rejected(401, target.host)
            if retry.challenge is not None:
                self._remember(target, retry.challenge)
        elif sent.challenge is not None and reply.status != 403:
            self._remember(target, sent.challenge)
        if reply.status == 403:
            raise Rejected(403, target.host)
        return reply

    async def _upfront(self, target: Target) -> _Sent:
        """The authorization to send before any 401, from a challenge known to apply."""
        challenge = self._known(target)
        if challenge is None:
            return _Sent()
        try:
            return await self._authorization(target, challenge)
        except (ProtocolError, ForbiddenHost, Rejected) as exc:
            # A challenge that worked elsewhere on this host does not work here: ask the
            # registry for this repository's own, rather than failing on another's.
            log.debug("up-front authorization for %s failed (%s); asking afresh", target.host, exc)
            self._forget(target)
            return _Sent()

    def _known(self, target: Target) -> Challenge | None:
        now = self._clock()
        for entry in (self._challenges.get(_repo_key(target)), self._proven.get(target.host)):
            if entry is not None and entry[1] > now:
                return entry[0]
        return None

    def _remember(self, target: Target, challenge: Challenge) -> None:
        expires = self._clock() + CHALLENGE_SECONDS
        if len(self._challenges) >= TOKEN_CACHE_LIMIT:
            self._challenges.clear()
        self._challenges[_repo_key(target)] = (challenge, expires)
        self._proven[target.host] = (challenge, expires)

    def _forget(self, target: Target) -> None:
        self._challenges.pop(_repo_key(target), None)

    async def _send(
        self, target: Target, method: str, url: str, headers: Mapping[str, str], sent: _Sent
    ) -> Reply:
        return await self._transport.exchange(
            method, url, {**headers, **sent.headers}, target.deadline
        )

    async def _answer(self, target: Target, sent: _Sent, reply: Reply) -> _Sent:
        """What to retry a 401 with; :class:`Rejected` when nothing is worth sending."""
        challenge = (
            pick_challenge(reply.headers)
            or self._known(target)
            or await self._ping_challenge(target)
        )
        if challenge is None:
            raise Rejected(401, f"{target.host} (no usable WWW-Authenticate challenge)")
        if sent.token is not None:
            self._drop_token(target, sent.token)
        if sent.scheme == challenge.scheme and not sent.token_was_cached:
            raise Rejected(401, target.host)  # just answered this challenge, and was refused
        retry = await self._authorization(target, challenge, stale=sent.token)
        if retry.scheme is None:
            raise Rejected(401, f"{target.host} (wants {challenge.scheme} credentials)")
        return retry

    async def _authorization(
        self, target: Target, challenge: Challenge, *, stale: _Token | None = None
    ) -> _Sent:
        if challenge.scheme == "basic":
            if target.credential is None:
                return _Sent()
            return _Sent(_basic_header(target.credential), "basic", challenge)
        if challenge.scheme == "bearer":
            token, was_cached = await self._bearer_token(challenge, target, stale)
            return _Sent(
                {"Authorization": f"Bearer {token.value}"},
                "bearer",
                challenge,
                token=token,
                token_was_cached=was_cached,
            )
        raise ProtocolError(f"{target.host} asks for unsupported auth {challenge.scheme}")

    async def _ping_challenge(self, target: Target) -> Challenge | None:
        """gcr.io may send 401 without a challenge; the ``/v2/`` ping carries it."""
        reply = await self._transport.exchange("GET", f"{target.base_url}/v2/", {}, target.deadline)
        if reply.status != 401:
            return None
        _refuse_foreign_challenge(target, reply)
        return pick_challenge(reply.headers)

    # -- bearer tokens -----------------------------------------------------------------------

    def _drop_token(self, target: Target, token: _Token) -> None:
        key = _token_key(target)
        if self._tokens.get(key) is token:
            del self._tokens[key]

    async def _bearer_token(
        self, challenge: Challenge, target: Target, stale: _Token | None
    ) -> tuple[_Token, bool]:
        """A valid token for the target's scope and credential, and whether it was cached."""
        key = _token_key(target)
        cached = self._usable_token(key, stale)
        if cached is not None:
            return cached, True
        # One fetch per key at a time: concurrent admissions of one image share a token.
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        try:
            async with asyncio.timeout_at(target.deadline):
                await lock.acquire()
        except TimeoutError as exc:
            raise DeadlineExceeded(f"waiting for a token for {target.host}") from exc
        try:
            cached = self._usable_token(key, stale)
            if cached is not None:
                return cached, True
            token = await self._fetch_token(challenge, target)
            self._store_token(key, token)
            return token, False
        finally:
            lock.release()

    def _usable_token(self, key: _TokenKey, stale: _Token | None) -> _Token | None:
        token = self._tokens.get(key)
        if token is None or token is stale or token.expires_at <= time.monotonic():
            return None
        return token

    def _store_token(self, key: _TokenKey, token: _Token) -> None:
        if len(self._tokens) >= TOKEN_CACHE_LIMIT:
            now = time.monotonic()
            for old in [k for k, t in self._tokens.items() if t.expires_at <= now]:
                del self._tokens[old]
                self._token_locks.pop(old, None)
        self._tokens[key] = token

    async def _fetch_token(self, challenge: Challenge, target: Target) -> _Token:
        realm = challenge.param("realm")
        if not realm:
            raise ProtocolError(f"{target.host} sent a Bearer challenge without a realm")
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL as exc:
            raise ProtocolError(f"{target.host} sent an invalid token realm") from exc
        if url.scheme == "http" and not self._transport.is_insecure(target.host):
            raise ProtocolError(
                f"token realm {realm} of {target.host} is plain http; credentials would be sent "
                "in clear (list the registry as insecure to allow it)"
            )
        if url.scheme not in ("http", "https") or not url.host:
            raise ProtocolError(f"token realm {realm} of {target.host} is not an http URL")
        await self._transport.guard.check(url.host, url.port, deadline=target.deadline)
        params = {"scope": target.scope}
        service = challenge.param("service")
        if service:
            params["service"] = service
        headers = _basic_header(target.credential) if target.credential else {}
        reply = await self._transport.exchange(
            "GET", url.copy_merge_params(params), headers, target.deadline
        )
        events = self._transport.events
        if reply.status in (401, 403):
            events.token_request(target.host, "rejected")
            raise Rejected(reply.status, f"token service {url.host}")
        try:
            if reply.status != 200:
                raise ProtocolError(f"token service {url.host} answered {describe(reply)}")
            token = _parse_token(reply.body, target.host)
        except ProtocolError:
            events.token_request(target.host, "error")
            raise
        events.token_request(target.host, "ok")
        return token


def _token_key(target: Target) -> _TokenKey:
    return (target.host, target.scope, target.identity)


def _repo_key(target: Target) -> tuple[str, str]:
    return (target.host, target.repository)


def _refuse_foreign_challenge(target: Target, reply: Reply) -> None:
    """A 401 from a host the request was redirected to is not the registry's challenge:
    answering it would send the registry's credentials, or a token, where they do not belong."""
    if not same_origin(reply.url, httpx.URL(target.base_url)):
        raise ProtocolError(
            f"{target.host} redirected to {reply.url.host}, which asks for authentication;"
            f" credentials for {target.host} are never sent to another host"
        )


def _basic_header(credential: Credential) -> dict[str, str]:
    pair = f"{credential.username}:{credential.password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}


def _parse_token(body: bytes, host: str) -> _Token:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"token service of {host} answered invalid JSON") from exc
    if not isinstance(document, dict):
        raise ProtocolError(f"token service of {host} answered a non-object")
    value = document.get("token") or document.get("access_token")
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"token service of {host} answered no token")
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

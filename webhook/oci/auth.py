"""Registry authorisation: the 401 → challenge → token flow, and its caches.

After go-containerregistry's ``remote/transport`` (``ping.go``, ``bearer.go``, ``basic.go``): a
registry's ``WWW-Authenticate`` challenge is remembered, so later requests carry the right
``Authorization`` up front; bearer tokens are fetched from the challenge's realm (with the
credential as Basic auth, if any) and cached per host, repository scope and credential until
shortly before they expire. :meth:`Authenticator.exchange` decides, from what was sent and the
401 that came back, the one retry worth making, or that the credential is refused.

Docker's two tokens (see :class:`~.credential.Credential`):

* a registry token is sent as the bearer token itself, with no token request; it does not
  answer a Basic challenge, so there the credential does not apply;
* an identity token is an OAuth2 refresh token, exchanged as containerd does (``auth/fetch.go``,
  ``authorizer.go``): a form POST to the realm with ``grant_type=refresh_token``, falling back
  to the GET token request (Basic ``username:identity token``) when the token service answers
  400, 401 or 404 (ACR, Artifactory and GCR do), or 405 for a credential with a username. A new
  refresh token in the answer replaces the old one, in memory, for the next exchange.

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
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar
from urllib.parse import urlencode

import httpx

from ..errors import DeadlineExceeded, ForbiddenHost, ProtocolError, RegistryUnavailable
from .credential import Credential
from .transport import Reply, Transport, describe, same_origin

log = logging.getLogger(__name__)

# distribution's minimumTokenLifetimeSeconds: a shorter (or missing) expires_in counts as this.
TOKEN_MIN_LIFETIME = 60.0
OAUTH_CLIENT_ID = "pinhook"
# Token services that take no OAuth2 POST say so with these (containerd's list).
_POST_UNSUPPORTED = frozenset({400, 401, 404})
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
    ns: str | None = None  # the registry a mirror is asked for (containerd's ``?ns=``)

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


class NotApplicable(Rejected):
    """The credential cannot answer the registry's challenge (a token, asked for Basic)."""

    def __init__(self, host: str, credential: Credential) -> None:
        Exception.__init__(
            self,
            f"{host} asks for Basic credentials, and {credential.source or 'the credential'}"
            " holds only a token",
        )
        self.status = 401


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
_RefreshKey = tuple[str, str, str]  # credential identity, realm, service
K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class _Users:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    count: int = 0  # holding or waiting


class _LockTable(Generic[K]):
    """One lock per key, kept only while someone holds or awaits it.

    The keys hold repositories from image names, so a table that kept them would grow with
    every new name; evicting a lock that is held or awaited would let a second holder in.
    Dropping each lock as its last user leaves does neither: the table holds no more locks
    than there are lookups under way (see ``registry._Permits``).
    """

    def __init__(self) -> None:
        self._users: dict[K, _Users] = {}

    def __len__(self) -> int:
        return len(self._users)

    @asynccontextmanager
    async def hold(self, key: K, deadline: float, host: str) -> AsyncIterator[None]:
        users = self._users.setdefault(key, _Users())
        users.count += 1
        try:
            await _acquire_within(users.lock, deadline, host)
            try:
                yield
            finally:
                users.lock.release()
        finally:
            users.count -= 1
            if users.count == 0:
                del self._users[key]


async def _acquire_within(lock: asyncio.Lock, deadline: float, host: str) -> None:
    try:
        async with asyncio.timeout_at(deadline):
            await lock.acquire()
    except TimeoutError as exc:
        raise DeadlineExceeded(f"waiting for a token for {host}") from exc


class Authenticator:
    """The challenge and token caches of one registry client; one per process."""

    def __init__(
        self,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.monotonic,
        cache_limit: int = TOKEN_CACHE_LIMIT,
    ) -> None:
        self._transport = transport
        self._clock = clock
        self._limit = cache_limit  # entries in each cache below
        # (host, repository) -> the challenge last seen for it; host -> one that worked.
        self._challenges: dict[tuple[str, str], tuple[Challenge, float]] = {}
        self._proven: dict[str, tuple[Challenge, float]] = {}
        self._tokens: dict[_TokenKey, _Token] = {}  # oldest first
        self._token_locks: _LockTable[_TokenKey] = _LockTable()
        # (credential identity, realm, service) -> the refresh token that replaced the
        # credential's identity token; one exchange at a time for each, so none uses a token
        # another just rotated away.
        self._refresh_tokens: dict[_RefreshKey, str] = {}
        self._refresh_locks: _LockTable[_RefreshKey] = _LockTable()

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
        except NotApplicable:
            raise  # this credential cannot answer; the challenge is still right
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
        for known in (self._challenges, self._proven):
            if len(known) >= self._limit:
                known.clear()
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
        credential = target.credential
        if challenge.scheme == "basic":
            if credential is None:
                return _Sent()
            if credential.registry_token or (credential.identity_token and not credential.password):
                raise NotApplicable(target.host, credential)
            header = _basic_header(credential.username, credential.password)
            return _Sent(header, "basic", challenge)
        if challenge.scheme == "bearer":
            if credential is not None and credential.registry_token:
                # Sent as it is: there is nothing to fetch, nor to fetch again after a 401.
                header = {"Authorization": f"Bearer {credential.registry_token}"}
                return _Sent(header, "bearer", challenge)
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
        async with self._token_locks.hold(key, target.deadline, target.host):
            cached = self._usable_token(key, stale)
            if cached is not None:
                return cached, True
            token = await self._fetch_token(challenge, target)
            self._store_token(key, token)
            return token, False

    def _usable_token(self, key: _TokenKey, stale: _Token | None) -> _Token | None:
        token = self._tokens.get(key)
        if token is None or token is stale or token.expires_at <= time.monotonic():
            return None
        return token

    def _store_token(self, key: _TokenKey, token: _Token) -> None:
        """Keep ``token``, within the limit: expired tokens go first, then the oldest."""
        self._tokens.pop(key, None)  # stored again last, as the newest
        if len(self._tokens) >= self._limit:
            now = time.monotonic()
            for old in [k for k, t in self._tokens.items() if t.expires_at <= now]:
                del self._tokens[old]
        while len(self._tokens) >= self._limit:
            del self._tokens[next(iter(self._tokens))]
        self._tokens[key] = token

    async def _fetch_token(self, challenge: Challenge, target: Target) -> _Token:
        events = self._transport.events
        try:
            token = await self._token_for(challenge, target)
        except Exception as exc:  # every failure counts; a cancellation is none
            events.token_request(target.host, _token_failure(exc))
            raise
        events.token_request(target.host, "ok")
        return token

    async def _token_for(self, challenge: Challenge, target: Target) -> _Token:
        url = await self._realm(challenge, target)
        service = challenge.param("service") or ""
        credential = target.credential
        if credential is not None and credential.identity_token:
            return await self._refresh(url, service, target, credential)
        login = None if credential is None else (credential.username, credential.password)
        reply = await self._get_token(url, service, target, login)
        return _parse_token(reply.body, target.host, oauth=False)[0]

    async def _realm(self, challenge: Challenge, target: Target) -> httpx.URL:
        """The challenge's token realm, if credentials may be sent there."""
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
        return url

    async def _get_token(
        self, url: httpx.URL, service: str, target: Target, login: tuple[str, str] | None
    ) -> Reply:
        """The token request every token service takes: GET, with Basic auth if any."""
        params = {"scope": target.scope}
        if service:
            params["service"] = service
        headers = _basic_header(*login) if login is not None and any(login) else {}
        if url.query:  # rare: the realm's own parameters, ours in place of any of theirs
            reply = await self._transport.exchange(
                "GET", url.copy_merge_params(params), headers, target.deadline
            )
        else:  # sent as encoded here, not parsed again: most of what building it cost
            reply = await self._transport.exchange(
                "GET", url, headers, target.deadline, query=urlencode(params)
            )
        _check_token_reply(reply, url)
        return reply

    async def _refresh(
        self, url: httpx.URL, service: str, target: Target, credential: Credential
    ) -> _Token:
        """A bearer token for an identity token (an OAuth2 refresh token)."""
        key = (credential.identity(), str(url), service)
        async with self._refresh_locks.hold(key, target.deadline, target.host):
            refresh_token = self._refresh_tokens.get(key, credential.identity_token)
            try:
                reply, oauth = await self._exchange_refresh_token(
                    url, service, target, credential.username, refresh_token
                )
            except Rejected:
                # A rotated token that stopped working: start again from the configured one.
                self._refresh_tokens.pop(key, None)
                raise
            token, rotated = _parse_token(reply.body, target.host, oauth=oauth)
            if rotated and rotated != refresh_token:
                self._keep_refresh_token(key, rotated)
            return token

    async def _exchange_refresh_token(
        self, url: httpx.URL, service: str, target: Target, username: str, refresh_token: str
    ) -> tuple[Reply, bool]:
        """The token service's answer, and whether it came from the OAuth2 POST."""
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "service": service,
            "scope": target.scope,  # space-separated when there are several
            "client_id": OAUTH_CLIENT_ID,
        }
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
        # Once: a token service that rotated the refresh token and lost its answer would
        # refuse a retry, which presents the token it just retired.
        reply = await self._transport.exchange(
            "POST", url, headers, target.deadline, content=urlencode(form).encode(), attempts=1
        )
        if reply.status in _POST_UNSUPPORTED or (reply.status == 405 and username):
            log.debug("token service %s answered POST with %d; GET", url.host, reply.status)
            return await self._get_token(url, service, target, (username, refresh_token)), False
        _check_token_reply(reply, url)
        return reply, True

    def _keep_refresh_token(self, key: _RefreshKey, refresh_token: str) -> None:
        if key not in self._refresh_tokens and len(self._refresh_tokens) >= self._limit:
            del self._refresh_tokens[next(iter(self._refresh_tokens))]
        self._refresh_tokens[key] = refresh_token


def _token_failure(exc: Exception) -> str:
    """The result label of a failed token request, one of a few: a metric keeps every value."""
    if isinstance(exc, Rejected):
        return "rejected"
    if isinstance(exc, DeadlineExceeded | RegistryUnavailable | ForbiddenHost):
        return exc.reason  # timeout, unavailable, forbidden-host
    return "error"  # the token service's answer was unusable, or something unforeseen


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


def _basic_header(username: str, password: str) -> dict[str, str]:
    pair = f"{username}:{password}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}


def _check_token_reply(reply: Reply, url: httpx.URL) -> None:
    if reply.status in (401, 403):
        raise Rejected(reply.status, f"token service {url.host}")
    if reply.status != 200:
        raise ProtocolError(f"token service {url.host} answered {describe(reply)}")


def _parse_token(body: bytes, host: str, *, oauth: bool) -> tuple[_Token, str | None]:
    """The bearer token of a token service's answer, and the refresh token it may hold.

    An OAuth2 answer carries ``access_token``; a GET answer ``token`` or ``access_token``
    (which wins, as in containerd and distribution).
    """
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"token service of {host} answered invalid JSON") from exc
    if not isinstance(document, dict):
        raise ProtocolError(f"token service of {host} answered a non-object")
    value = document.get("access_token") or (None if oauth else document.get("token"))
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"token service of {host} answered no token")
    lifetime = document.get("expires_in")
    if not isinstance(lifetime, int | float) or isinstance(lifetime, bool):
        lifetime = 0.0
    lifetime = max(float(lifetime), TOKEN_MIN_LIFETIME)
    remaining = lifetime - _age(document.get("issued_at"))
    # Renew shortly before expiry so a token never dies in flight.
    margin = min(10.0, lifetime / 10)
    refresh = document.get("refresh_token")
    rotated = refresh if isinstance(refresh, str) and refresh else None
    return _Token(value, time.monotonic() + min(lifetime, remaining) - margin), rotated


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

"""The shared cache: Redis as the second level behind every replica's own digest cache.

Each replica keeps its local ``CachingResolver`` in front; on a local miss it asks Redis
(``recall``), and every registry answer is written there (``record``), so one registry
request serves the whole fleet. A new tag is resolved by one replica while the others wait
for its answer (``turn``): a short lock with expiry, kept alive while its holder resolves,
released compare-and-delete, and announced on one pub/sub channel that each replica
subscribes to once (a poll is the fallback). Pods of one owner get one digest per tag
(``owner_digest``, ``decide_owner``: the first decision wins).

Redis is an optimisation, never a dependency: every operation gives up after
``timeoutSeconds`` (an owner's digest also at the admission's deadline, if sooner), and a
circuit breaker leaves Redis alone for ``openSeconds`` after ``failuresToOpen`` failures in
a row, then lets one operation probe it. Meanwhile every method answers "unknown" and the
replica works from its local cache and the registries.

Key schema, ``<p>`` being ``keyPrefix``:

- ``<p>digest:<name>:<tag>``: ``{"digest", "resolvedAt" (Unix seconds), "ttlSeconds"}``,
  expiring with the cache TTL (Redis's own expiry, so every replica's copy expires together).
  Shared by every pull scope, as in the local cache: a digest is not a secret, and the kubelet
  checks the Pod's own credentials when it pulls.
- ``<p>failure:<name>:<tag>:<scope>``: ``{"reason", "message", "ttlSeconds"}`` for a not found
  or unauthorised answer, expiring with the negative TTL.
- ``<p>lock:<name>:<tag>:<scope>``: a random token; one lookup in the fleet at a time.
- ``<p>owner:<owner>:<name>:<tag>``: the digest the owner's Pods get.
- channel ``<p>done``: ``{"lock", "reason", "message"}``, a lookup finished (or failed).

``<scope>`` tells pull credentials apart without naming them: ``anonymous``, or 16 hex digits
of a SHA-256 over the credentials' key (itself only usernames and hashes).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import urlsplit

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider, UsernamePasswordCredentialProvider
from redis.exceptions import RedisError

from .config import REDIS_PASSWORD_ENV, RedisSettings, check_redis_url
from .errors import ConfigError, DeadlineExceeded, ResolveError, error_for
from .files import read_secret
from .metrics import Metrics
from .oci.reference import is_valid_digest
from .redact import scrub

log = logging.getLogger(__name__)

T = TypeVar("T")

ANONYMOUS_SCOPE: Final = "anonymous"
# Failures worth sharing: answers that will not change within seconds.
REMEMBERED_REASONS: Final = frozenset({"not-found", "unauthorized"})
_POLL_CAP_SECONDS: Final = 0.25
_LISTEN_BACKOFF_SECONDS: Final = (0.05, 5.0)
_CLOSE_GRACE_SECONDS: Final = 2.0


def scope_of(credentials_key: str) -> str:
    """The pull scope as it appears in keys: never a secret, never a username."""
    if not credentials_key:
        return ANONYMOUS_SCOPE
    return hashlib.sha256(credentials_key.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SharedDigest:
    """A digest some replica got from the registry."""

    digest: str
    resolved_at: float  # Unix seconds: when the registry answered
    remaining: float  # seconds until it expires everywhere


@dataclass(frozen=True, slots=True)
class SharedFailure:
    """A not found or unauthorised answer some replica got, for one pull scope."""

    reason: str
    message: str
    remaining: float

    def error(self) -> ResolveError:
        return error_for(self.reason, self.message)


SharedAnswer = SharedDigest | SharedFailure


class SharedDigests(Protocol):
    """What ``CachingResolver`` asks of a shared cache. Every method answers "unknown" (None,
    or a turn of one's own) rather than fail when the cache cannot be reached."""

    async def recall(self, name: str, tag: str, scope: str) -> SharedAnswer | None:
        """The fleet's answer for ``name:tag`` in ``scope``, if there is one."""
        ...

    def turn(
        self, name: str, tag: str, scope: str, deadline: float
    ) -> AbstractAsyncContextManager[SharedAnswer | None]:
        """Wait until no other replica looks ``name:tag`` up in ``scope``: yields the answer
        one of them found meanwhile, or None when it is this replica's turn to ask the
        registry (and ``record`` the answer inside the block). Raises DeadlineExceeded at
        ``deadline`` (loop time), or the error another replica's lookup failed with."""
        ...

    async def record(self, name: str, tag: str, digest: str, ttl: float) -> None: ...

    async def record_failure(
        self, name: str, tag: str, scope: str, error: ResolveError, ttl: float
    ) -> None: ...


class SharedOwners(Protocol):
    """Where the digest decided for each owner's Pods is kept for the whole fleet.

    Both are asked on an admission's behalf: they give up at ``deadline`` (loop time), the
    admission's, and answer None (unknown) then."""

    async def owner_digest(self, owner: str, image: str, deadline: float) -> str | None:
        """The digest decided for ``owner``'s Pods and ``image`` (``name:tag``), if any."""
        ...

    async def decide_owner(
        self, owner: str, image: str, digest: str, ttl: float, deadline: float
    ) -> str | None:
        """Record ``digest`` unless a decision exists; the one that holds (None: unknown)."""
        ...


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def digest(self, name: str, tag: str) -> str:
        return f"{self.prefix}digest:{name}:{tag}"

    def failure(self, name: str, tag: str, scope: str) -> str:
        return f"{self.prefix}failure:{name}:{tag}:{scope}"

    def lock(self, name: str, tag: str, scope: str) -> str:
        return f"{self.prefix}lock:{name}:{tag}:{scope}"

    def owner(self, owner: str, image: str) -> str:
        return f"{self.prefix}owner:{owner}:{image}"

    @property
    def channel(self) -> str:
        return f"{self.prefix}done"


# -- circuit breaker -------------------------------------------------------------------------


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Closed: every operation goes through. ``failures_to_open`` failures in a row open it:
    nothing goes through for ``open_seconds``; then one operation probes (half-open), and its
    success closes it, its failure opens it again."""

    def __init__(
        self,
        failures_to_open: int,
        open_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._failures_to_open = failures_to_open
        self._open_seconds = open_seconds
        self._clock = clock
        self._on_change = on_change or (lambda _state: None)
        self.state = BreakerState.CLOSED
        self.since = clock()
        self._failures = 0
        self._probing = False

    def allow(self) -> bool:
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self.since < self._open_seconds:
                return False
            self._become(BreakerState.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._probing = False
        if self.state is not BreakerState.CLOSED:
            self._become(BreakerState.CLOSED)

    def failed(self) -> None:
        self._failures += 1
        self._probing = False
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self._failures >= self._failures_to_open
        ):
            self._become(BreakerState.OPEN)

    def abandoned(self) -> None:
        """An operation ended without an outcome (its caller was cancelled): a probe may be
        tried again."""
        self._probing = False

    def _become(self, state: BreakerState) -> None:
        self.state = state
        self.since = self._clock()
        self._on_change(state)


# -- the Redis client ------------------------------------------------------------------------


class _Unavailable(Exception):
    """Redis did not answer, answered an error, or the breaker is open: counted already."""


@dataclass(slots=True)
class _Wakeup:
    """What waiters on one lock hear from the channel."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    error: tuple[str, str] | None = None  # reason, message of a failed lookup
    waiters: int = 0


class _Mine:
    """The lock is this replica's: ask the registry."""


_MINE: Final = _Mine()

# Compare-and-delete, then announce: a lock whose token changed (it expired and another
# replica took it) is left alone; waiters are told either way.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end
if ARGV[2] ~= '' then redis.call('publish', ARGV[2], ARGV[3]) end
return 1
"""
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
# The first decision wins, and is returned to whoever asks later.
_DECIDE = """
local current = redis.call('get', KEYS[1])
if current then return current end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""


class RedisSharedCache:
    """``SharedDigests`` and ``SharedOwners`` in one Redis; an async context manager that owns
    the connection pool and the channel subscription."""

    def __init__(
        self,
        settings: RedisSettings,
        *,
        metrics: Metrics | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Raises ConfigError when ``urlFile`` or ``passwordFile`` cannot be used."""
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._keys = Keys(settings.key_prefix)
        self._timeout = settings.timeout_seconds
        self._lock_ms = max(1, round(settings.lock_seconds * 1000))
        self._poll = min(_POLL_CAP_SECONDS, settings.lock_seconds / 4)
        self._clock = clock
        self._wall_clock = wall_clock
        url = _url(settings)
        self.where = _where(url)
        self._pool = _connection_pool(settings, url, {} if environ is None else environ)
        self._client = Redis(connection_pool=self._pool)
        self._release_script = self._client.register_script(_RELEASE)
        self._extend_script = self._client.register_script(_EXTEND)
        self._decide_script = self._client.register_script(_DECIDE)
        self._breaker = CircuitBreaker(
            settings.failures_to_open,
            settings.open_seconds,
            clock=clock,
            on_change=self._breaker_changed,
        )
        self._last_error = ""
        self._wakeups: dict[str, _Wakeup] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self.subscribed = False
        self._metrics.shared_cache_breaker_state(BreakerState.CLOSED)

    async def __aenter__(self) -> RedisSharedCache:
        # Nothing is awaited here: a Redis that is down must not keep pinhook from starting.
        self._listener = asyncio.create_task(self._listen(), name="shared-cache-listener")
        log.info("shared digest cache: %s", self.where)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        # The flag as well as the cancellation: a cancellation that arrives as redis-py's
        # own read timeout expires can be lost (seen on Python 3.11), and the listener then
        # stops at its next turn, within a second; closing its connection ends a read too.
        self._closing = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.wait({listener}, timeout=_CLOSE_GRACE_SECONDS)
        await self._client.aclose()
        await self._pool.disconnect()
        if listener is not None and not listener.done():
            await asyncio.wait({listener}, timeout=_CLOSE_GRACE_SECONDS)
            if not listener.done():
                log.warning("shared cache: the channel listener did not stop; left behind")

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    def describe(self) -> str:
        """One line for /readyz."""
        if self._breaker.state is BreakerState.CLOSED:
            return f"shared cache {self.where}: in use"
        seconds = self._clock() - self._breaker.since
        state = "probing" if self._breaker.state is BreakerState.HALF_OPEN else "unavailable"
        return (
            f"shared cache {self.where}: {state} ({self._last_error}; {seconds:.0f}s),"
            " the local cache and the registries answer"
        )

    # -- digests -------------------------------------------------------------------------------

    async def recall(self, name: str, tag: str, scope: str) -> SharedAnswer | None:
        def read(client: Redis) -> Awaitable[list[Any]]:
            pipe = client.pipeline(transaction=False)
            self._queue_reads(pipe, name, tag, scope)
            return pipe.execute()

        try:
            replies = await self._call("recall", read)
        except _Unavailable:
            return None
        answer = self._answer(replies, name, tag)
        self._count("recall", "miss" if answer is None else "hit")
        return answer

    @asynccontextmanager
    async def turn(
        self, name: str, tag: str, scope: str, deadline: float
    ) -> AsyncIterator[SharedAnswer | None]:
        lock = self._keys.lock(name, tag, scope)
        token = secrets.token_hex(16)
        outcome = await self._wait_for_turn(name, tag, scope, lock, token, deadline)
        if not isinstance(outcome, _Mine):
            yield outcome
            return
        keeper = asyncio.create_task(self._keep(lock, token), name="shared-cache-lock")
        failure: ResolveError | None = None
        try:
            yield None
        except ResolveError as exc:
            failure = exc
            raise
        finally:
            keeper.cancel()
            await self._release(lock, token, failure)

    async def record(self, name: str, tag: str, digest: str, ttl: float) -> None:
        value = {"digest": digest, "resolvedAt": self._wall_clock(), "ttlSeconds": ttl}
        await self._write("record", self._keys.digest(name, tag), value, ttl)

    async def record_failure(
        self, name: str, tag: str, scope: str, error: ResolveError, ttl: float
    ) -> None:
        if error.reason not in REMEMBERED_REASONS or ttl <= 0:
            return
        value = {"reason": error.reason, "message": str(error), "ttlSeconds": ttl}
        await self._write("record-failure", self._keys.failure(name, tag, scope), value, ttl)

    async def _write(self, operation: str, key: str, value: object, ttl: float) -> None:
        data = orjson.dumps(value)
        try:
            await self._call(operation, lambda client: client.set(key, data, px=_ms(ttl)))
        except _Unavailable:
            return
        self._count(operation, "ok")

    def _queue_reads(self, pipe: Any, name: str, tag: str, scope: str) -> None:
        digest, failure = self._keys.digest(name, tag), self._keys.failure(name, tag, scope)
        pipe.get(digest)
        pipe.pttl(digest)
        pipe.get(failure)
        pipe.pttl(failure)

    def _answer(self, replies: list[Any], name: str, tag: str) -> SharedAnswer | None:
        """The answer in the replies of ``_queue_reads``: a digest before a failure, as in the
        local cache. A value that is not pinhook's is ignored (and said so once per read)."""
        digest_value, digest_ms, failure_value, failure_ms = replies
        try:
            if digest_value is not None and digest_ms > 0:
                return _digest_from(orjson.loads(digest_value), digest_ms / 1000)
            if failure_value is not None and failure_ms > 0:
                return _failure_from(orjson.loads(failure_value), failure_ms / 1000)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("shared cache: ignoring an unreadable entry for %s:%s: %s", name, tag, exc)
            self._count("recall", "invalid")
        return None

    # -- the fleet-wide lock -----------------------------------------------------------------

    async def _wait_for_turn(
        self, name: str, tag: str, scope: str, lock: str, token: str, deadline: float
    ) -> SharedAnswer | _Mine | None:
        """Claim the lock, or wait for its holder's answer: woken by the channel, or by the
        poll (a lost message, a holder that died and whose lock expired)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        waited = False
        failed: tuple[str, str] | None = None
        while True:
            wakeup = self._expect(lock)  # before claiming: an answer in between is heard
            try:
                try:
                    acquired, answer = await self._claim(name, tag, scope, lock, token)
                except _Unavailable:
                    if waited:
                        self._waited("unavailable", began)
                    return None
                if acquired and (answer is not None or failed is not None):
                    await self._release(lock, token, None)
                if answer is not None:
                    if waited:
                        self._waited("answered", began)
                    return answer
                if failed is not None:
                    self._waited("failed", began)
                    raise error_for(*failed)
                if acquired:
                    if waited:
                        self._waited("expired", began)
                    return _MINE
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._waited("deadline", began)
                    raise DeadlineExceeded(
                        f"{name}:{tag}: another replica's lookup did not finish in time"
                    )
                waited = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self._poll, remaining)):
                        await wakeup.event.wait()
                failed = wakeup.error
            finally:
                self._forget(lock, wakeup)

    async def _claim(
        self, name: str, tag: str, scope: str, lock: str, token: str
    ) -> tuple[bool, SharedAnswer | None]:
        """Take the lock if free, and read the answer, in one round trip: a holder writes its
        answer before it lets go, so either the lock is held or the answer is there (or the
        holder failed or died)."""

        def claim(client: Redis) -> Awaitable[list[Any]]:
            pipe = client.pipeline(transaction=False)
            pipe.set(lock, token, nx=True, px=self._lock_ms)
            self._queue_reads(pipe, name, tag, scope)
            return pipe.execute()

        replies = await self._call("claim", claim)
        acquired = bool(replies[0])
        answer = self._answer(replies[1:], name, tag)
        self._count("claim", "hit" if answer is not None else "ok" if acquired else "busy")
        return acquired, answer

    async def _keep(self, lock: str, token: str) -> None:
        """Keep the lock while its holder resolves: a lookup may take the registry's whole
        deadline, and the lock itself only ``lockSeconds``."""
        while True:
            await asyncio.sleep(self._lock_ms / 3000)
            with contextlib.suppress(_Unavailable):
                await self._call(
                    "extend",
                    lambda client: self._extend_script(
                        keys=[lock], args=[token, self._lock_ms], client=client
                    ),
                )

    async def _release(self, lock: str, token: str, failure: ResolveError | None) -> None:
        news = {"lock": lock}
        if failure is not None:
            news |= {"reason": failure.reason, "message": str(failure)}
        args: list[str | bytes] = [token, self._keys.channel, orjson.dumps(news)]
        with contextlib.suppress(_Unavailable):
            await self._call(
                "release", lambda client: self._release_script([lock], args, client=client)
            )
            self._count("release", "ok")

    def _expect(self, lock: str) -> _Wakeup:
        wakeup = self._wakeups.get(lock)
        if wakeup is None:
            wakeup = self._wakeups[lock] = _Wakeup()
        wakeup.waiters += 1
        return wakeup

    def _forget(self, lock: str, wakeup: _Wakeup) -> None:
        wakeup.waiters -= 1
        if wakeup.waiters <= 0 and self._wakeups.get(lock) is wakeup:
            del self._wakeups[lock]

    def _waited(self, outcome: str, began: float) -> None:
        self._metrics.shared_cache_lock_wait(outcome, asyncio.get_running_loop().time() - began)

    async def _listen(self) -> None:
        """One subscription per replica, dispatching to the local waiters; re-established
        with backoff whenever the connection drops. Without it, waiters poll."""
        backoff = _LISTEN_BACKOFF_SECONDS[0]
        while not self._closing:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.channel)
                self.subscribed = True
                backoff = _LISTEN_BACKOFF_SECONDS[0]
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        self._dispatch(message.get("data"))
            except (RedisError, OSError) as exc:
                log.debug("shared cache subscription lost: %s", _describe_error(exc))
            finally:
                self.subscribed = False
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call] # redis-py's own
            if self._closing:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _LISTEN_BACKOFF_SECONDS[1])

    def _dispatch(self, data: object) -> None:
        try:
            news = orjson.loads(data) if isinstance(data, bytes | str) else None
            lock = news["lock"] if isinstance(news, dict) else None
        except (ValueError, KeyError):
            return
        wakeup = self._wakeups.pop(lock, None) if isinstance(lock, str) else None
        if wakeup is None:
            return
        assert isinstance(news, dict)
        reason, message = news.get("reason"), news.get("message")
        if isinstance(reason, str) and isinstance(message, str):
            wakeup.error = (reason, message)
        wakeup.event.set()

    # -- owners --------------------------------------------------------------------------------

    async def owner_digest(self, owner: str, image: str, deadline: float) -> str | None:
        key = self._keys.owner(owner, image)
        try:
            value = await self._call("owner", lambda client: client.get(key), deadline)
        except _Unavailable:
            return None
        digest = _valid_digest(value)
        self._count("owner", "miss" if digest is None else "hit")
        return digest

    async def decide_owner(
        self, owner: str, image: str, digest: str, ttl: float, deadline: float
    ) -> str | None:
        key = self._keys.owner(owner, image)
        try:
            value = await self._call(
                "decide",
                lambda client: self._decide_script([key], [digest, _ms(ttl)], client=client),
                deadline,
            )
        except _Unavailable:
            return None
        decided = _valid_digest(value)
        self._count("decide", "ok" if decided == digest else "hit")
        return decided

    # -- every operation -----------------------------------------------------------------------

    async def _call(
        self,
        operation: str,
        action: Callable[[Redis], Awaitable[T]],
        deadline: float | None = None,
    ) -> T:
        """``action`` under the timeout, the caller's ``deadline`` (loop time) if sooner, and
        the breaker; raises _Unavailable (counted)."""
        now = asyncio.get_running_loop().time()
        if deadline is not None and deadline <= now:
            self._count(operation, "deadline")
            raise _Unavailable
        if not self._breaker.allow():
            self._count(operation, "skipped")
            raise _Unavailable
        give_up = now + self._timeout
        until = give_up if deadline is None else min(deadline, give_up)
        outcome = False
        try:
            async with asyncio.timeout_at(until):
                result = await action(self._client)
            outcome = True
        except TimeoutError:
            outcome = True
            if until < give_up:
                # The caller's time ran out first: says nothing of Redis, so no failure.
                self._count(operation, "deadline")
                self._breaker.abandoned()
            else:
                self._failed(operation, "timeout", f"no answer within {self._timeout:g}s")
            raise _Unavailable from None
        except (RedisError, OSError) as exc:
            outcome = True
            self._failed(operation, "error", _describe_error(exc))
            raise _Unavailable from None
        finally:
            if not outcome:
                self._breaker.abandoned()
        self._breaker.succeeded()
        return result

    def _failed(self, operation: str, result: str, why: str) -> None:
        self._count(operation, result)
        self._last_error = why
        self._breaker.failed()

    def _count(self, operation: str, result: str) -> None:
        self._metrics.shared_cache_operation(operation, result)

    def _breaker_changed(self, state: BreakerState) -> None:
        self._metrics.shared_cache_breaker_state(state)
        if state is BreakerState.OPEN:
            log.warning(
                "shared cache %s unavailable (%s): answering from the local cache and the"
                " registries; next try in %gs",
                self.where,
                self._last_error,
                self._settings.open_seconds,
            )
        elif state is BreakerState.CLOSED:
            log.info("shared cache %s available again", self.where)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _digest_from(value: Any, remaining: float) -> SharedDigest:
    digest, resolved_at = value["digest"], value["resolvedAt"]
    if not isinstance(digest, str) or not is_valid_digest(digest):
        raise ValueError("not a digest")
    if not isinstance(resolved_at, int | float):
        raise ValueError("no resolvedAt")
    return SharedDigest(digest, float(resolved_at), remaining)


def _failure_from(value: Any, remaining: float) -> SharedFailure:
    reason, message = value["reason"], value["message"]
    if reason not in REMEMBERED_REASONS or not isinstance(message, str):
        raise ValueError("not a failure pinhook shares")
    return SharedFailure(reason, message, remaining)


def _valid_digest(value: object) -> str | None:
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    return text if isinstance(text, str) and is_valid_digest(text) else None


def _describe_error(exc: BaseException) -> str:
    return scrub(f"{type(exc).__name__}: {exc}", limit=200)


# -- connecting ------------------------------------------------------------------------------


def _url(settings: RedisSettings) -> str:
    if settings.url is not None:
        return settings.url
    assert settings.url_file is not None
    url = read_secret(settings.url_file, "cache.redis.urlFile")
    try:
        check_redis_url(url, secret=True)
    except ValueError as exc:
        raise ConfigError(f"cache.redis.urlFile {settings.url_file}: {exc}") from None
    return url


def _where(url: str) -> str:
    """The URL without its userinfo: what logs and /readyz may show."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()


def _connection_pool(
    settings: RedisSettings, url: str, environ: Mapping[str, str]
) -> BlockingConnectionPool:
    parts = urlsplit(url)
    tls = settings.tls or parts.scheme.lower() == "rediss"
    if tls and parts.scheme.lower() == "redis":
        parts = parts._replace(scheme="rediss")
    options: dict[str, Any] = {
        "max_connections": settings.max_connections,
        # How long an operation may wait for a free connection: as long as for an answer.
        "timeout": settings.timeout_seconds,
        "socket_timeout": settings.timeout_seconds,
        "socket_connect_timeout": settings.timeout_seconds,
        # No retries: the breaker decides when to try again, and a request cannot wait.
        "retry": Retry(NoBackoff(), 0),
        "client_name": "pinhook",
    }
    if tls and settings.ca_file is not None:
        options["ssl_ca_certs"] = str(settings.ca_file)
    provider = _credentials(settings, parts.username, parts.password, environ)
    if provider is not None:
        options["credential_provider"] = provider
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    elif settings.username is not None:
        options["username"] = settings.username
    return BlockingConnectionPool.from_url(parts.geturl(), **options)


def _credentials(
    settings: RedisSettings,
    url_username: str | None,
    url_password: str | None,
    environ: Mapping[str, str],
) -> CredentialProvider | None:
    """Where the password comes from: the URL (``urlFile`` only), ``passwordFile`` or
    $PINHOOK_REDIS_PASSWORD, in that order; two at once is a mistake to report."""
    username = settings.username or url_username
    if settings.password_file is not None:
        if url_password is not None:
            raise ConfigError("cache.redis: a password in urlFile and a passwordFile; keep one")
        return _PasswordFile(username, settings.password_file)
    if url_password is not None:
        return None
    password = environ.get(REDIS_PASSWORD_ENV)
    if password:
        return UsernamePasswordCredentialProvider(username, password)
    return None


class _PasswordFile(CredentialProvider):
    """The password read from its file at every new connection: a rotated Secret is used
    from the next connection on, without a restart."""

    def __init__(self, username: str | None, path: Path) -> None:
        self._username = username
        self._path = path
        read_secret(path, "cache.redis.passwordFile")  # unreadable: refuse the config now

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        try:
            password = read_secret(self._path, "cache.redis.passwordFile")
        except ConfigError as exc:
            # Raised inside redis-py's connect: fails this connection, counted by the breaker.
            raise RedisError(str(exc)) from None
        return (self._username, password) if self._username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()

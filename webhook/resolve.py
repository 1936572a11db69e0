"""Digest resolvers: from a tagged reference to the digest a registry serves for it.

``DigestResolver`` is the one interface the admission pipeline sees. Implementations:

- ``StaticDigestResolver`` answers from the config's ``digests:`` table (air-gapped clusters,
  tests of the pipeline);
- ``CachingResolver`` puts a TTL/LRU cache, a negative cache, singleflight (one registry request
  per tag however many admissions ask at once) and stale-on-error in front of a
  ``DigestSource``: ``RegistryDigestResolver``, which asks the registry over the OCI
  distribution API with the pull credentials that apply to the object, or the static table.

Lookups and their failures are keyed by the credentials that apply, not by who asked:
admissions in namespaces without pull secrets, or with the same ones, share one lookup.

With a ``SharedDigests`` (Redis, see ``sharedcache``) the cache is the first of two levels:
a local miss asks the shared cache, whose answer is kept locally until it expires
fleet-wide, and a tag nobody knows is looked up by one replica while the others wait for it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from .config import CacheSettings
from .errors import NotFound, ResolveError, Unauthorized
from .kube import PullSecretSource
from .metrics import EVICTED
from .oci.credential import ANONYMOUS, Credential, Credentials, PullContext
from .oci.credhelper import DockerConfig
from .oci.credprovider import CredentialProviders
from .oci.reference import ImageRef
from .oci.registry import RegistryClient
from .sharedcache import SharedAnswer, SharedDigest, SharedDigests, scope_of
from .singleflight import SingleFlight


@dataclass(frozen=True, slots=True)
class PullScope:
    """Whose credentials apply: the object's namespace and its pod-spec pull context."""

    namespace: str | None
    pull: PullContext = field(default_factory=PullContext)


@dataclass(frozen=True, slots=True)
class Resolution:
    digest: str
    # True when the registry failed and an expired cache entry answered instead.
    stale: bool = False


class Held(NamedTuple):
    """A digest a cache holds now, and what tells later, without looking it up again, that
    it still holds the same one: its entry under ``key`` (an entry is replaced, never changed,
    while it is fresh) and when that entry expires."""

    digest: str
    key: Any  # whatever its holder keys entries by
    entry: object
    expires: float


# Entries found still held are moved to the recent end at most this often: a cache of
# thousands turns over far slower, and a Pod of a ReplicaSet each millisecond would otherwise
# move the same few every time.
TOUCH_SECONDS: Final = 1.0


class Holding:
    """Entries held together (one admission's images), to tell at once that they still are:
    while their holder's count of changes (``Holder.holding``) has not moved, each one is
    there as it was, and only their time is checked."""

    __slots__ = ("changes", "held", "touched", "until")

    def __init__(self, held: tuple[Held, ...], changes: int) -> None:
        self.held = held
        self.until = min([h.expires for h in held], default=float("inf"))  # the first to expire
        self.changes = changes  # the holder's, when each was last seen there as it was
        self.touched = float("-inf")  # when they were last moved to the recent end


def still_held(entries: OrderedDict[Any, Any], holding: Holding, now: float, changes: int) -> bool:
    """Whether ``entries`` (by recency; changed ``changes`` times) still hold each of
    ``holding``'s as it was, and ``now`` is before the first expires; if so they count as
    used, as a lookup would have them (``TOUCH_SECONDS``)."""
    if now >= holding.until:
        return False
    if holding.changes != changes:
        for h in holding.held:
            if entries.get(h.key) is not h.entry:
                return False
        holding.changes = changes
    if now - holding.touched >= TOUCH_SECONDS:
        for h in holding.held:
            entries.move_to_end(h.key)
        holding.touched = now
    return True


class Holder(Protocol):
    def holding(self, held: tuple[Held, ...]) -> Holding:
        """``held``, just found held here (``hold``), to be checked later (``holds``)."""
        ...

    def holds(self, holding: Holding) -> bool:
        """Whether each of ``holding``'s entries is still held as it was, none of them stale
        or expired (on the holder's clock): what looking each up again would give, in a
        fraction of its time. They count as used."""
        ...


class DigestResolver(Holder, Protocol):
    def peek(self, ref: ImageRef) -> str | None:
        """The digest for ``ref``'s tag if known without any I/O (a fresh cache entry).

        Not counted as a cache event: the caller counts hits, once per request."""
        ...

    def hold(self, ref: ImageRef) -> Held | None:
        """``peek``, with what tells later that the digest is still held (``holds``)."""
        ...

    async def resolve(self, ref: ImageRef, scope: PullScope, deadline: float) -> Resolution:
        """The digest for ``ref``'s tag (``latest`` when it has none); raises ResolveError."""
        ...

    async def exists(self, ref: ImageRef, scope: PullScope, deadline: float) -> bool:
        """Whether ``ref``'s digest exists in its repository; raises ResolveError on failure."""
        ...


class DigestSource(Protocol):
    """Where a cache gets what it does not know, asked with explicit credentials."""

    async def credentials(self, ref: ImageRef, scope: PullScope, deadline: float) -> Credentials:
        """The credentials that apply to ``ref`` for an object in ``scope``, in order."""
        ...

    async def digest(self, ref: ImageRef, credentials: Credentials, deadline: float) -> str:
        """The digest for ``ref``'s tag (``latest`` when it has none); raises ResolveError."""
        ...

    async def has(self, ref: ImageRef, credentials: Credentials, deadline: float) -> bool:
        """Whether ``ref``'s digest exists in its repository; raises ResolveError."""
        ...


class StaticDigestResolver:
    """Answers from a fixed table of normalised ``registry/repo:tag`` → digest.

    A resolver on its own, and a source for a cache in front of it (tests of the cache)."""

    def __init__(self, table: dict[ImageRef, str]) -> None:
        self._table = table
        self._known = {(ref.name, digest) for ref, digest in table.items()}

    def peek(self, ref: ImageRef) -> str | None:
        return self._table.get(_tagged(ref))

    def hold(self, ref: ImageRef) -> Held | None:
        key = _tagged(ref)
        digest = self._table.get(key)
        return None if digest is None else Held(digest, key, digest, float("inf"))

    def holding(self, held: tuple[Held, ...]) -> Holding:
        return Holding(held, 0)

    def holds(self, holding: Holding) -> bool:
        table = self._table
        return all(table.get(h.key) == h.digest for h in holding.held)

    async def resolve(self, ref: ImageRef, scope: PullScope, deadline: float) -> Resolution:
        return Resolution(await self.digest(ref, ANONYMOUS, deadline))

    async def exists(self, ref: ImageRef, scope: PullScope, deadline: float) -> bool:
        return await self.has(ref, ANONYMOUS, deadline)

    async def credentials(self, ref: ImageRef, scope: PullScope, deadline: float) -> Credentials:
        return ANONYMOUS

    async def digest(self, ref: ImageRef, credentials: Credentials, deadline: float) -> str:
        digest = self._table.get(_tagged(ref))
        if digest is None:
            raise NotFound(f"{ref.familiar()}: not in the static digests table")
        return digest

    async def has(self, ref: ImageRef, credentials: Credentials, deadline: float) -> bool:
        return (ref.name, ref.digest) in self._known


class RegistryDigestResolver:
    """Asks the registry with the credentials the kubelet would pull with, in its order: the
    object's pull secrets, then the mounted docker config (the node's, for the kubelet), then
    the credential provider plugins."""

    def __init__(
        self,
        client: RegistryClient,
        secrets: PullSecretSource,
        docker_config: DockerConfig | None = None,
        providers: CredentialProviders | None = None,
    ) -> None:
        self._client = client
        self._secrets = secrets
        # Replaced whole when the mounted file changes; readers see the old or the new one.
        self.docker_config = docker_config
        self._providers = providers

    def peek(self, ref: ImageRef) -> str | None:
        return None

    def hold(self, ref: ImageRef) -> Held | None:
        return None

    def holding(self, held: tuple[Held, ...]) -> Holding:
        return Holding(held, 0)

    def holds(self, holding: Holding) -> bool:
        return False

    async def resolve(self, ref: ImageRef, scope: PullScope, deadline: float) -> Resolution:
        credentials = await self.credentials(ref, scope, deadline)
        return Resolution(await self.digest(ref, credentials, deadline))

    async def exists(self, ref: ImageRef, scope: PullScope, deadline: float) -> bool:
        return await self.has(ref, await self.credentials(ref, scope, deadline), deadline)

    async def credentials(self, ref: ImageRef, scope: PullScope, deadline: float) -> Credentials:
        """The credentials the kubelet would pull with, in its order: the object's pull
        secrets (its own, then its ServiceAccount's), the mounted docker config, then the
        credential provider plugins (which may run a program, within ``deadline``). Each
        mirror of the registry gets those found for its own name."""
        found = await self._matching(ref, scope, deadline)
        mirrors = tuple(
            [
                (mirror.registry, await self._matching(mirror, scope, deadline))
                for mirror in self._client.mirrors_of(ref)
            ]
        )
        if not found and not any(items for _, items in mirrors):
            return ANONYMOUS
        return Credentials(found, mirrors)

    async def _matching(
        self, ref: ImageRef, scope: PullScope, deadline: float
    ) -> tuple[Credential, ...]:
        found: list[Credential] = []
        if scope.namespace is not None:
            keyring = await self._secrets.keyring_for(scope.namespace, scope.pull)
            found.extend(keyring.lookup(ref))
        if self.docker_config is not None:
            found.extend(await self.docker_config.lookup(ref, deadline))
        if self._providers is not None:
            found.extend(await self._providers.lookup(ref, deadline))
        return tuple(found)

    async def digest(self, ref: ImageRef, credentials: Credentials, deadline: float) -> str:
        return await self._client.resolve_digest(_tagged(ref), credentials, deadline=deadline)

    async def has(self, ref: ImageRef, credentials: Credentials, deadline: float) -> bool:
        return await self._client.manifest_exists(ref, credentials, deadline=deadline)


def _tagged(ref: ImageRef) -> ImageRef:
    # Trusted: the fields come from a reference that was validated when it was made.
    return ImageRef._trusted(ref.registry, ref.repository, ref.tag_or_latest(), None)


K = TypeVar("K")
V = TypeVar("V")


@dataclass(slots=True)
class _Entry:
    digest: str
    fetched: float  # when the registry last answered with this digest
    expires: float
    stale: bool = False  # served after a registry failure, until ``expires``


_TagKey = tuple[str, str]
_ScopedKey = tuple[str, str, str]  # name, tag or digest, credentials key


@dataclass(frozen=True, slots=True)
class _Failure:
    """A remembered refusal: its kind and message, not the exception with its traceback."""

    kind: type[ResolveError]
    message: str
    expires: float

    def error(self) -> ResolveError:
        return self.kind(self.message)


class CachingResolver:
    """TTL + LRU digest cache with negative entries, singleflight and stale-on-error.

    Digests are shared by every namespace: a digest is not a secret, and the kubelet still
    checks pull credentials when the Pod starts. Failures and in-flight lookups are kept per
    set of credentials that apply: one namespace without credentials must not make another,
    with them, fail, while namespaces with the same credentials (or none) share one lookup.
    Negative entries are kept only for answers that will not change within seconds (not
    found, unauthorised), as their kind and message.

    ``shared``, when given, is the second level: consulted on a local miss, written with
    every registry answer (the digest for everyone; a failure for its credentials only), and
    the place where replicas take turns to look a tag up. Its entries are copied here with
    the time they have left, so every replica's copy expires at the same moment.
    """

    def __init__(
        self,
        inner: DigestSource,
        settings: CacheSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str], None] | None = None,
        lookup_seconds: float = 8.0,
        shared: SharedDigests | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._inner = inner
        self._shared = shared
        self._wall_clock = wall_clock
        self._settings = settings
        # A shared lookup runs under its own deadline, not its first caller's: a caller with
        # little time left must not cut short the lookup others wait on with more.
        self._lookup_seconds = lookup_seconds
        self._clock = clock
        self._on_event = on_event or (lambda _event: None)
        self._entries: OrderedDict[_TagKey, _Entry] = OrderedDict()
        self._changes = 0  # entries added, replaced, dropped or marked stale (``holds``)
        self._failures: OrderedDict[_ScopedKey, _Failure] = OrderedDict()
        self._resolving: SingleFlight[_ScopedKey, Resolution] = SingleFlight()
        self._known_digests: OrderedDict[_TagKey, None] = OrderedDict()
        self._missing_digests: OrderedDict[_ScopedKey, float] = OrderedDict()
        self._checking: SingleFlight[_ScopedKey, bool] = SingleFlight()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def source(self) -> DigestSource:
        """What the cache asks on a miss (``pinhook report`` asks it per set of credentials)."""
        return self._inner

    def peek(self, ref: ImageRef) -> str | None:
        entry = self._fresh((ref.name, ref.tag_or_latest()))
        return None if entry is None else entry.digest

    def hold(self, ref: ImageRef) -> Held | None:
        key = (ref.name, ref.tag_or_latest())
        entry = self._fresh(key)
        return None if entry is None else Held(entry.digest, key, entry, entry.expires)

    def _fresh(self, key: _TagKey) -> _Entry | None:
        """The entry under ``key`` if fresh (then it counts as used), else None."""
        entry = self._entries.get(key)
        if entry is None or entry.stale or entry.expires <= self._clock():
            return None
        self._entries.move_to_end(key)
        return entry

    def holding(self, held: tuple[Held, ...]) -> Holding:
        return Holding(held, self._changes)

    def holds(self, holding: Holding) -> bool:
        # Sound because an entry changes in place only once stale or expired (_serve_stale):
        # one held fresh is either the very same object, fresh until it expires, or gone.
        return still_held(self._entries, holding, self._clock(), self._changes)

    async def resolve(self, ref: ImageRef, scope: PullScope, deadline: float) -> Resolution:
        key = (ref.name, ref.tag_or_latest())
        entry = self._entries.get(key)
        if entry is not None and entry.expires > self._clock():
            self._entries.move_to_end(key)
            self._on_event("stale" if entry.stale else "hit")
            return Resolution(entry.digest, stale=entry.stale)
        credentials = await self._inner.credentials(ref, scope, deadline)
        scoped = (*key, credentials.key)
        failure = self._failures.get(scoped)
        if failure is not None and failure.expires > self._clock():
            self._on_event("hit")
            raise failure.error()
        self._on_event("shared" if scoped in self._resolving else "miss")
        return await self._resolving.run(
            scoped, lambda: self._fetch(scoped, ref, credentials), deadline, ref.familiar()
        )

    def _lookup_deadline(self) -> float:
        return asyncio.get_running_loop().time() + self._lookup_seconds

    async def _fetch(
        self, scoped: _ScopedKey, ref: ImageRef, credentials: Credentials
    ) -> Resolution:
        key = (scoped[0], scoped[1])
        try:
            entry = await self._lookup(scoped, ref, credentials)
        except (NotFound, Unauthorized):
            raise  # remembered by _lookup
        except ResolveError:
            current = self._entries.get(key)
            if current is not None and not current.stale and current.expires > self._clock():
                # Another lookup (other credentials) refreshed it meanwhile: fresh, not stale.
                return Resolution(current.digest)
            stale = self._serve_stale(key)
            if stale is None:
                raise
            self._on_event("stale")
            return Resolution(stale, stale=True)
        self._changes += 1
        if _bounded_put(self._entries, key, entry, self._settings.max_entries):
            self._on_event(EVICTED)
        self._failures.pop(scoped, None)
        return Resolution(entry.digest)

    async def _lookup(self, scoped: _ScopedKey, ref: ImageRef, credentials: Credentials) -> _Entry:
        """The entry from the shared cache, or from the registry; raises ResolveError, having
        remembered a not found or unauthorised answer."""
        shared = self._shared
        if shared is None:
            return await self._ask(scoped, ref, credentials, None)
        name, tag = scoped[0], scoped[1]
        scope = scope_of(credentials.key)
        answer = await shared.recall(name, tag, scope)
        if answer is None:
            async with shared.turn(name, tag, scope, self._lookup_deadline()) as answer:
                if answer is None:
                    return await self._ask(scoped, ref, credentials, shared)
        return self._adopt(scoped, answer)

    async def _ask(
        self,
        scoped: _ScopedKey,
        ref: ImageRef,
        credentials: Credentials,
        shared: SharedDigests | None,
    ) -> _Entry:
        name, tag = scoped[0], scoped[1]
        settings = self._settings
        try:
            digest = await self._inner.digest(ref, credentials, self._lookup_deadline())
        except (NotFound, Unauthorized) as exc:
            self._remember_failure(scoped, exc, settings.negative_ttl_seconds)
            if shared is not None:
                scope = scope_of(credentials.key)
                await shared.record_failure(name, tag, scope, exc, settings.negative_ttl_seconds)
            raise
        if shared is not None:
            await shared.record(name, tag, digest, settings.ttl_seconds)
        now = self._clock()
        return _Entry(digest, now, now + settings.ttl_seconds)

    def _adopt(self, scoped: _ScopedKey, answer: SharedAnswer) -> _Entry:
        """Another replica's answer, kept here for the time it has left everywhere."""
        now = self._clock()
        if isinstance(answer, SharedDigest):
            # When the registry answered, on this clock: stale-on-error counts from then.
            fetched = now - max(0.0, self._wall_clock() - answer.resolved_at)
            return _Entry(answer.digest, fetched, now + answer.remaining)
        error = answer.error()
        self._remember_failure(scoped, error, answer.remaining)
        raise error

    def _remember_failure(self, scoped: _ScopedKey, error: ResolveError, ttl: float) -> None:
        failure = _Failure(type(error), str(error), self._clock() + ttl)
        _bounded_put(self._failures, scoped, failure, self._settings.max_entries)

    def _serve_stale(self, key: _TagKey) -> str | None:
        """The last good digest while the registry fails, for a while, without asking again.

        Marked stale for ``negativeTtlSeconds``, so the admissions that follow get it at once
        (with the warning) instead of each waiting out the registry's retries.
        """
        settings = self._settings
        entry = self._entries.get(key)
        if not settings.stale_on_error or entry is None:
            return None
        now = self._clock()
        if now - (entry.fetched + settings.ttl_seconds) > settings.stale_max_seconds:
            return None
        self._changes += 1
        entry.stale = True
        entry.expires = now + settings.negative_ttl_seconds
        return entry.digest

    async def exists(self, ref: ImageRef, scope: PullScope, deadline: float) -> bool:
        key = (ref.name, ref.digest or "")
        if key in self._known_digests:
            # A digest is immutable: once seen in a repository it stays valid to cache.
            self._known_digests.move_to_end(key)
            return True
        credentials = await self._inner.credentials(ref, scope, deadline)
        scoped = (*key, credentials.key)
        missing_until = self._missing_digests.get(scoped)
        if missing_until is not None and missing_until > self._clock():
            return False
        return await self._checking.run(
            scoped, lambda: self._check(scoped, ref, credentials), deadline, ref.familiar()
        )

    async def _check(self, scoped: _ScopedKey, ref: ImageRef, credentials: Credentials) -> bool:
        found = await self._inner.has(ref, credentials, self._lookup_deadline())
        if found:
            key = (scoped[0], scoped[1])
            _bounded_put(self._known_digests, key, None, self._settings.max_entries)
        else:
            # The gcr.io kubebuilder digests will never appear on quay.io; ask again only after
            # the negative TTL. Per credentials: a registry may hide a repository from some.
            expires = self._clock() + self._settings.negative_ttl_seconds
            _bounded_put(self._missing_digests, scoped, expires, self._settings.max_entries)
        return found


def _bounded_put(table: OrderedDict[K, V], key: K, value: V, limit: int) -> int:
    """Insert as most recently used, evicting the least recently used past ``limit``; returns
    how many were evicted."""
    table[key] = value
    table.move_to_end(key)
    evicted = 0
    while len(table) > limit:
        table.popitem(last=False)
        evicted += 1
    return evicted

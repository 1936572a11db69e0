"""Digest resolvers: from a tagged reference to the digest a registry serves for it.

``DigestResolver`` is the one interface the admission pipeline sees. Implementations:

- ``StaticDigestResolver`` answers from the config's ``digests:`` table (air-gapped clusters,
  tests of the pipeline);
- ``RegistryDigestResolver`` asks the registry over the OCI distribution API with the pull
  credentials that apply to the object;
- ``CachingResolver`` wraps either with a TTL/LRU cache, a negative cache, singleflight (one
  registry request per tag however many admissions ask at once) and stale-on-error.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .config import CacheSettings
from .errors import DeadlineExceeded, NotFound, ResolveError, Unauthorized
from .locate import PullContext
from .reference import ImageRef

if TYPE_CHECKING:
    from .credential import Credential
    from .keychain import DockerKeyring
    from .kube import PullSecretSource
    from .registry import RegistryClient


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


class DigestResolver(Protocol):
    def peek(self, ref: ImageRef) -> str | None:
        """The digest for ``ref``'s tag if known without any I/O (a fresh cache entry).

        Not counted as a cache event: the caller counts hits, once per request."""
        ...

    async def resolve(self, ref: ImageRef, scope: PullScope, deadline: float) -> Resolution:
        """The digest for ``ref``'s tag (``latest`` when it has none); raises ResolveError."""
        ...

    async def exists(self, ref: ImageRef, scope: PullScope, deadline: float) -> bool:
        """Whether ``ref``'s digest exists in its repository; raises ResolveError on failure."""
        ...


class StaticDigestResolver:
    """Answers from a fixed table of normalised ``registry/repo:tag`` → digest."""

    def __init__(self, table: dict[ImageRef, str]) -> None:
        self._table = table
        self._known = {(ref.name, digest) for ref, digest in table.items()}

    def peek(self, ref: ImageRef) -> str | None:
        return self._table.get(_tagged(ref))

    async def resolve(self, ref: ImageRef, scope: PullScope, deadline: float) -> Resolution:
        digest = self._table.get(_tagged(ref))
        if digest is None:
            raise NotFound(f"{ref.familiar()}: not in the static digests table")
        return Resolution(digest)

    async def exists(self, ref: ImageRef, scope: PullScope, deadline: float) -> bool:
        return (ref.name, ref.digest) in self._known


class RegistryDigestResolver:
    """Asks the registry, with the pull secrets of the object and the mounted docker config."""

    def __init__(
        self,
        client: RegistryClient,
        secrets: PullSecretSource,
        docker_config: DockerKeyring | None = None,
    ) -> None:
        self._client = client
        self._secrets = secrets
        self._docker_config = docker_config

    def peek(self, ref: ImageRef) -> str | None:
        return None

    async def resolve(self, ref: ImageRef, scope: PullScope, deadline: float) -> Resolution:
        credentials = await self._credentials(ref, scope)
        digest = await self._client.resolve_digest(_tagged(ref), credentials, deadline=deadline)
        return Resolution(digest)

    async def exists(self, ref: ImageRef, scope: PullScope, deadline: float) -> bool:
        credentials = await self._credentials(ref, scope)
        return await self._client.manifest_exists(ref, credentials, deadline=deadline)

    async def _credentials(self, ref: ImageRef, scope: PullScope) -> list[Credential]:
        found: list[Credential] = []
        if scope.namespace is not None:
            keyring = await self._secrets.keyring_for(scope.namespace, scope.pull)
            found.extend(keyring.lookup(ref))
        if self._docker_config is not None:
            found.extend(self._docker_config.lookup(ref))
        return found


def _tagged(ref: ImageRef) -> ImageRef:
    return ImageRef(ref.registry, ref.repository, ref.tag_or_latest(), None)


@dataclass(slots=True)
class _Entry:
    digest: str | None
    error: ResolveError | None
    expires: float


class CachingResolver:
    """TTL + LRU digest cache with negative entries, singleflight and stale-on-error.

    The cache is shared by every namespace: a digest is not a secret, and the kubelet still
    checks pull credentials when the Pod starts. Negative entries are kept only for answers
    that will not change within seconds (not found, unauthorised).
    """

    def __init__(
        self,
        inner: DigestResolver,
        settings: CacheSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self._inner = inner
        self._settings = settings
        self._clock = clock
        self._on_event = on_event or (lambda _event: None)
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._in_flight: dict[tuple[str, str], asyncio.Future[Resolution]] = {}
        self._known_digests: OrderedDict[tuple[str, str], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, ref: ImageRef) -> str | None:
        entry = self._entries.get((ref.name, ref.tag_or_latest()))
        if entry is None or entry.digest is None or entry.expires <= self._clock():
            return None
        return entry.digest

    async def resolve(self, ref: ImageRef, scope: PullScope, deadline: float) -> Resolution:
        key = (ref.name, ref.tag_or_latest())
        entry = self._entries.get(key)
        now = self._clock()
        if entry is not None and entry.expires > now:
            self._entries.move_to_end(key)
            self._on_event("hit")
            if entry.error is not None:
                raise entry.error
            assert entry.digest is not None
            return Resolution(entry.digest)
        future = self._in_flight.get(key)
        if future is None:
            self._on_event("miss")
            future = asyncio.ensure_future(self._fetch(key, ref, scope, deadline))
            self._in_flight[key] = future
            future.add_done_callback(lambda f: self._settle(key, f))
        else:
            self._on_event("shared")
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            # shield: one caller giving up must not cancel the request the others wait on.
            return await asyncio.wait_for(asyncio.shield(future), max(remaining, 0))
        except TimeoutError:
            raise DeadlineExceeded(f"{ref.familiar()}: no answer within the deadline") from None

    def _settle(self, key: tuple[str, str], future: asyncio.Future[Resolution]) -> None:
        self._in_flight.pop(key, None)
        if not future.cancelled():
            # Retrieve it so an error nobody waited for (all callers timed out) is not reported
            # as "never retrieved"; every waiter got its own copy already.
            future.exception()

    async def _fetch(
        self, key: tuple[str, str], ref: ImageRef, scope: PullScope, deadline: float
    ) -> Resolution:
        try:
            resolution = await self._inner.resolve(ref, scope, deadline)
        except (NotFound, Unauthorized) as exc:
            self._store(key, _Entry(None, exc, self._clock() + self._settings.negative_ttl_seconds))
            raise
        except ResolveError:
            stale = self._stale(key)
            if stale is None:
                raise
            self._on_event("stale")
            return Resolution(stale, stale=True)
        self._store(
            key, _Entry(resolution.digest, None, self._clock() + self._settings.ttl_seconds)
        )
        return resolution

    def _stale(self, key: tuple[str, str]) -> str | None:
        if not self._settings.stale_on_error:
            return None
        entry = self._entries.get(key)
        if entry is None or entry.digest is None:
            return None
        if self._clock() - entry.expires > self._settings.stale_max_seconds:
            return None
        return entry.digest

    def _store(self, key: tuple[str, str], entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._settings.max_entries:
            self._entries.popitem(last=False)

    async def exists(self, ref: ImageRef, scope: PullScope, deadline: float) -> bool:
        key = (ref.name, ref.digest or "")
        if key in self._known_digests:
            # A digest is immutable: once seen in a repository it stays valid to cache.
            self._known_digests.move_to_end(key)
            return True
        found = await self._inner.exists(ref, scope, deadline)
        if found:
            self._known_digests[key] = None
            while len(self._known_digests) > self._settings.max_entries:
                self._known_digests.popitem(last=False)
        return found

"""An OCI distribution client that resolves image tags to manifest digests.

After go-containerregistry's ``remote.Head``/``remote.Get``, with the registry quirks collected
in ``shared/notes/registry-protocol.md``. This module holds the request logic only: which
host to ask (a registry's mirrors first, see :mod:`.mirror`), which manifest to ask for, with
which credential, and which digest to trust; ``auth`` answers the registry's challenges,
``transport`` retries, follows redirects and keeps the deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import lru_cache
from types import TracebackType
from urllib.parse import quote

import httpx

from ..errors import (
    DeadlineExceeded,
    DigestMismatch,
    NotFound,
    ProtocolError,
    ResolveError,
    Unauthorized,
)
from .auth import Authenticator, Rejected, Target
from .credential import Credential, Credentials
from .dns import HostResolver
from .mirror import Mirror
from .reference import DOCKER_HUB, ImageRef, is_valid_digest, split_host_port
from .transport import (
    MalformedAnswer,
    RegistryOptions,
    Reply,
    Transport,
    TransportEvents,
    describe,
    same_origin,
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
MANIFEST_ACCEPT = {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}
SCHEMA1_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)


# A mirror may take at most this share of the time left, so the registry itself still has
# time when a mirror hangs.
MIRROR_TIME_SHARE = 0.5
MIRROR_WARNING_SECONDS = 60.0  # a failing mirror is reported at most this often


class RegistryClient:
    """One per process (an async context manager): it holds the pooled connections and the
    challenge and token caches."""

    def __init__(
        self,
        options: RegistryOptions,
        *,
        resolver: HostResolver | None = None,
        events: TransportEvents | None = None,
    ) -> None:
        self._options = options
        self._transport = Transport(options, resolver=resolver, events=events)
        self._auth = Authenticator(self._transport)
        self._permits = _Permits(options.concurrency, options.concurrency_per_registry)
        self._mirror_warned: dict[str, float] = {}

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
        await self._transport.aclose()

    def api_host(self, registry: str) -> str:
        """The host that serves the distribution API for a registry name."""
        return self._options.docker_hub_host if registry == DOCKER_HUB else registry

    def mirrors_of(self, ref: ImageRef) -> tuple[ImageRef, ...]:
        """``ref`` as found on each mirror of its registry, in order: what a mirror's
        credentials are looked up for."""
        return tuple(m.image(ref) for m in self._options.mirrors.get(ref.registry.lower(), ()))

    async def resolve_digest(
        self, ref: ImageRef, credentials: Credentials, *, deadline: float
    ) -> str:
        """The digest of the manifest the registry serves for ``ref``'s tag (or digest).

        A reference with both a tag and a digest is looked up by digest (the digest is what
        a runtime pulls); with neither, by ``latest``. The registry's mirrors are asked first,
        in order, each with the credentials found for its own name; any failure moves on to
        the next, and last to the registry itself. At each host every credential is tried in
        order, then anonymous access: a public image must still resolve when a stale
        credential for its registry is lying around.
        """
        if asyncio.get_running_loop().time() >= deadline:
            raise DeadlineExceeded(f"no time left to resolve {ref}")
        failures: list[str] = []
        for mirror in self._options.mirrors.get(ref.registry.lower(), ()):
            try:
                return await self._resolve_at(
                    await self._mirror_target(mirror, ref, deadline),
                    ref,
                    credentials.for_mirror(mirror.host),
                )
            except ResolveError as exc:
                failures.append(f"mirror {mirror.host}: {exc}")
                self._mirror_failed(mirror, ref, exc)
        try:
            return await self._resolve_at(await self._target(ref, deadline), ref, credentials.items)
        except ResolveError as exc:
            if failures:
                raise type(exc)(f"{exc} (after {'; '.join(failures)})") from exc
            raise

    async def _resolve_at(
        self, base: Target, ref: ImageRef, credentials: Sequence[Credential]
    ) -> str:
        # A credential with nothing in it is anonymous access (containerd sends none), tried
        # once at the end like any.
        tried = [credential for credential in credentials if not credential.is_empty]
        async with self._permits.take(base.host, base.deadline, str(ref)):
            refusals: list[str] = []
            for credential in (*tried, None):
                try:
                    return await self._digest_of(replace(base, credential=credential), ref)
                except Rejected as rejected:
                    refusals.append(str(rejected))
                    log.debug(
                        "%s refused a credential for %s: %s", base.host, ref.repository, rejected
                    )
        raise Unauthorized(_unauthorized_message(ref, base, tried, refusals))

    def _mirror_failed(self, mirror: Mirror, ref: ImageRef, exc: ResolveError) -> None:
        if isinstance(exc, NotFound):
            log.debug("mirror %s has no %s; trying the next host", mirror.host, ref)
            return
        now = time.monotonic()
        if now < self._mirror_warned.get(mirror.host, 0.0):
            log.debug("mirror %s failed for %s: %s", mirror.host, ref, exc)
            return
        self._mirror_warned[mirror.host] = now + MIRROR_WARNING_SECONDS
        log.warning(
            "mirror %s failed for %s (%s): %s; resolving from the next host",
            mirror.host,
            ref.registry,
            exc.reason,
            exc,
        )

    async def manifest_exists(
        self, ref: ImageRef, credentials: Credentials, *, deadline: float
    ) -> bool:
        """Whether the registry has the manifest ``ref`` names by digest."""
        if ref.digest is None:
            raise ValueError(f"manifest_exists needs a reference with a digest, got {ref}")
        try:
            await self.resolve_digest(ref, credentials, deadline=deadline)
        except NotFound:
            return False
        return True

    async def _target(self, ref: ImageRef, deadline: float) -> Target:
        host = self.api_host(ref.registry)
        bare, port = split_host_port(host)
        await self._transport.guard.check(bare, port, deadline=deadline)
        insecure = self._transport.is_insecure(ref.registry) or self._transport.is_insecure(host)
        return Target(
            registry=ref.registry,
            host=host,
            base_url=f"{'http' if insecure else 'https'}://{host}",
            repository=ref.repository,
            credential=None,
            deadline=deadline,
        )

    async def _mirror_target(self, mirror: Mirror, ref: ImageRef, deadline: float) -> Target:
        """Where to ask a mirror: its own host, guarded like any, within a share of the time."""
        now = asyncio.get_running_loop().time()
        share = min(deadline, now + (deadline - now) * MIRROR_TIME_SHARE)
        bare, port = split_host_port(mirror.host)
        await self._transport.guard.check(bare, port, deadline=share)
        scheme = mirror.scheme or ("http" if self._transport.is_insecure(mirror.host) else "https")
        return Target(
            registry=mirror.host,
            host=mirror.host,
            base_url=f"{scheme}://{mirror.host}",
            repository=ref.repository,
            credential=None,
            deadline=share,
            ns=ref.registry,
        )

    async def _digest_of(self, target: Target, ref: ImageRef) -> str:
        """HEAD the manifest and trust its digest header; GET and hash the body otherwise.

        A GET from Docker Hub counts against its pull rate limit and a HEAD does not, so
        there a HEAD without a usable digest is asked once more before the GET.
        """
        reference = ref.digest or ref.tag_or_latest()
        url = f"{target.base_url}/v2/{target.repository}/manifests/{reference}"
        if target.ns is not None:
            url += f"?ns={quote(target.ns, safe='')}"
        heads = 2 if target.registry == DOCKER_HUB else 1
        for attempt in range(1, heads + 1):
            try:
                head = await self._auth.exchange(target, "HEAD", url, MANIFEST_ACCEPT)
            except MalformedAnswer as exc:  # e.g. an unparseable Content-Length
                log.debug("HEAD %s was malformed (%s)", url, exc)
            else:
                if head.status == 405:
                    break
                digest = _head_digest(head, target, ref)
                if digest is not None:
                    return _expect(ref, digest)
            if attempt < heads:
                log.debug("HEAD %s gave no usable digest; asking again before a GET", url)
        reply = await self._auth.exchange(target, "GET", url, MANIFEST_ACCEPT)
        if reply.status == 404:
            raise NotFound(f"{ref} not found ({describe(reply)})")
        if reply.status != 200:
            raise ProtocolError(f"GET {url} answered {describe(reply)}")
        _refuse_schema1(reply)
        _check_manifest(reply, target, ref)
        return _expect(ref, _verified_body_digest(reply, ref.digest))


class _Permits:
    """At most ``total`` lookups at once, and ``per_registry`` of them to one registry host.

    Waiting for a permit is bounded by the caller's deadline (and safe to cancel: no
    connection is held yet). A host's semaphore is dropped when nobody holds or awaits it, so
    a hostile object naming thousands of hosts leaves nothing behind.
    """

    def __init__(self, total: int, per_registry: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_registry = per_registry
        self._hosts: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @asynccontextmanager
    async def take(self, host: str, deadline: float, what: str) -> AsyncIterator[None]:
        semaphore, users = self._hosts.get(host) or (asyncio.Semaphore(self._per_registry), 0)
        self._hosts[host] = (semaphore, users + 1)
        try:
            await self._acquire(semaphore, deadline, f"{what}: too many lookups under way")
            try:
                yield
            finally:
                self._total.release()
                semaphore.release()
        finally:
            semaphore, users = self._hosts[host]
            if users == 1:
                del self._hosts[host]
            else:
                self._hosts[host] = (semaphore, users - 1)

    async def _acquire(self, semaphore: asyncio.Semaphore, deadline: float, problem: str) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await semaphore.acquire()
                try:
                    await self._total.acquire()
                except BaseException:
                    semaphore.release()
                    raise
        except TimeoutError:
            raise DeadlineExceeded(problem) from None


def _unauthorized_message(
    ref: ImageRef, target: Target, credentials: Sequence[Credential], refusals: list[str]
) -> str:
    if credentials:
        sources = ", ".join(c.source for c in credentials if c.source)
        tried = f"{len(credentials)} credential(s) tried" + (f" ({sources})" if sources else "")
        tried += ", then anonymous access"
    else:
        tried = "anonymous access, no credentials configured"
    message = f"registry {target.registry} refused {ref}: {tried}; {refusals[-1]}"
    if target.registry == DOCKER_HUB:
        message += (
            "; note that Docker Hub also answers 401 for repositories that do not exist, "
            "so check the image name"
        )
    return message


def digest_matches(body: bytes, digest: str) -> bool:
    algorithm, _, expected = digest.partition(":")
    return hashlib.new(algorithm, body).hexdigest() == expected


def _head_digest(head: Reply, target: Target, ref: ImageRef) -> str | None:
    """The digest a HEAD answer gives, None when it gives none that can be trusted."""
    if head.status == 404:
        raise NotFound(f"{ref} not found ({describe(head)})")
    if head.status != 200:
        raise ProtocolError(f"HEAD {head.url} answered {describe(head)}")
    _refuse_schema1(head)
    return _trusted_head_digest(head, target)


@lru_cache(maxsize=256)
def _base_url(text: str) -> httpx.URL:
    """A registry's base URL, parsed once: every answer is checked against it."""
    return httpx.URL(text)


def _trusted_head_digest(reply: Reply, target: Target) -> str | None:
    """The HEAD answer's digest if it can be trusted without fetching the body: a valid
    digest of one of the manifest types asked for, from the registry itself."""
    digest = str(reply.headers.get("docker-content-digest", "")).strip()
    length = str(reply.headers.get("content-length", "")).strip()
    if not is_valid_digest(digest) or not length.isdigit():
        return None
    if _media_type(reply) not in MANIFEST_MEDIA_TYPES:
        return None
    if not same_origin(reply.url, _base_url(target.base_url)):
        return None
    return digest


def _check_manifest(reply: Reply, target: Target, ref: ImageRef) -> None:
    """Only a manifest is ever pinned: one of the types asked for, whose body parses as one.

    A body hashed here (the registry sent no usable digest) must come from the registry
    itself; a page from a login proxy or a redirect target is not an image.
    """
    media_type = _media_type(reply)
    if media_type not in MANIFEST_MEDIA_TYPES:
        shown = media_type or "no Content-Type"
        raise ProtocolError(
            f"GET {reply.url.copy_with(query=None)} answered {shown}, not a manifest"
        )
    try:
        document = json.loads(reply.body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or document.get("schemaVersion") != 2:
        raise ProtocolError(f"{ref}: the registry's {media_type} answer is not a manifest")
    declared = document.get("mediaType")
    if declared is not None and declared != media_type:
        raise ProtocolError(f"{ref}: a {declared} manifest served as {media_type}")
    if ref.digest is None and not same_origin(reply.url, _base_url(target.base_url)):
        raise ProtocolError(
            f"{ref}: the manifest came from {reply.url.host}, not {target.host}; a digest is"
            " only taken from the registry itself"
        )


def _media_type(reply: Reply) -> str:
    return str(reply.headers.get("content-type", "")).split(";")[0].strip().lower()


def _verified_body_digest(reply: Reply, expected: str | None) -> str:
    header = reply.headers.get("docker-content-digest", "").strip()
    if header:
        if not is_valid_digest(header):
            raise ProtocolError(f"{reply.url}: invalid Docker-Content-Digest {header!r}")
        if not digest_matches(reply.body, header):
            raise DigestMismatch(
                f"{reply.url}: body does not match its Docker-Content-Digest {header}"
            )
    if expected is not None and is_valid_digest(expected):
        if not digest_matches(reply.body, expected):
            raise DigestMismatch(f"{reply.url}: body does not match {expected}")
        return expected
    return header or "sha256:" + hashlib.sha256(reply.body).hexdigest()


def _expect(ref: ImageRef, digest: str) -> str:
    if ref.digest is not None and digest != ref.digest:
        raise DigestMismatch(f"{ref}: registry serves {digest}, not the requested digest")
    return digest


def _refuse_schema1(reply: Reply) -> None:
    if _media_type(reply) in SCHEMA1_MEDIA_TYPES:
        raise ProtocolError(
            f"{reply.url} serves a schema1 manifest, whose digest is not stable; "
            "push the image with a current client"
        )

"""The running webhook: long-lived clients, the current configuration, and live reload.

Everything with a lifetime (the pooled registry client, the pull-secret watch, the digest
cache, the shared cache's connections) is created here once and closed on exit. A
configuration change builds a new ``Mutator`` and swaps it in with one assignment, so a
request in flight finishes on the config it started with; the resolver and its cache are
kept unless the change touches them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from . import version
from .conditionsync import ConfigSync
from .config import Settings, load_settings_file
from .configfiles import config_stamp
from .errors import ConfigError
from .files import FileStamp, file_stamp
from .kube import KubePullSecrets, NoPullSecrets, PullSecretSource
from .metrics import Metrics
from .mutate import Mutator
from .oci.credential import Credentials
from .oci.credhelper import DockerConfig
from .oci.credprovider import CredentialProviders
from .oci.reference import ImageRef
from .oci.registry import RegistryClient
from .oci.transport import RegistryOptions
from .owners import OwnerPins
from .resolve import (
    CachingResolver,
    DigestResolver,
    DigestSource,
    PullScope,
    RegistryDigestResolver,
    StaticDigestResolver,
)
from .sharedcache import RedisSharedCache

log = logging.getLogger(__name__)


def _resolver_inputs(settings: Settings) -> tuple[object, ...]:
    """The parts of the settings a resolver is built from; other changes keep the resolver."""
    return (settings.resolver, settings.registry, settings.cache, tuple(settings.digests.items()))


def registry_options(settings: Settings) -> RegistryOptions:
    registry = settings.registry
    return RegistryOptions(
        insecure_registries=frozenset(registry.insecure),
        allowed_hosts=frozenset(registry.allowed_hosts),
        max_attempts=registry.max_attempts,
        concurrency=registry.concurrency,
        concurrency_per_registry=registry.concurrency_per_registry,
        mirrors=registry.mirrors,
    )


def config_hash(settings: Settings) -> str:
    """A short fingerprint of the configuration, for ``pinhook_build_info``: replicas that
    serve different configurations show different hashes."""
    text = settings.model_dump_json(by_alias=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class _CountedSource:
    """A digest source that counts its lookups under way (the in-flight lookups gauge)."""

    def __init__(self, inner: DigestSource, metrics: Metrics) -> None:
        self._inner = inner
        self._in_flight = metrics.lookups_in_flight

    async def credentials(self, ref: ImageRef, scope: PullScope, deadline: float) -> Credentials:
        return await self._inner.credentials(ref, scope, deadline)

    async def digest(self, ref: ImageRef, credentials: Credentials, deadline: float) -> str:
        with self._in_flight.track_inprogress():
            return await self._inner.digest(ref, credentials, deadline)

    async def has(self, ref: ImageRef, credentials: Credentials, deadline: float) -> bool:
        with self._in_flight.track_inprogress():
            return await self._inner.has(ref, credentials, deadline)


@dataclass(frozen=True, slots=True)
class _Resolving:
    """What a resolver is built of, replaced whole when the settings it depends on change."""

    resolver: DigestResolver
    client: RegistryClient | None = None
    shared: RedisSharedCache | None = None
    owners: OwnerPins | None = None

    async def aclose(self) -> None:
        # Each is closed even when closing another fails (the stack raises once all have run).
        async with AsyncExitStack() as closing:
            if self.shared is not None:
                closing.push_async_callback(self.shared.aclose)
            if self.client is not None:
                closing.push_async_callback(self.client.aclose)  # first: the stack unwinds


class Runtime:
    """Async context manager that owns the webhook's state; implements ``app.Service``."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: Path | None = None,
        pull_secrets: PullSecretSource | None = None,
        docker_config: Path | None = None,
        metrics: Metrics | None = None,
        config_syncs: Sequence[ConfigSync] = (),
        environ: Mapping[str, str] | None = None,
        config_stamp: Hashable | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        # Where the shared cache's password may come from ($PINHOOK_REDIS_PASSWORD).
        self._environ = os.environ if environ is None else environ
        self.config_path = config_path
        self._pull_secrets = pull_secrets or NoPullSecrets()
        self._docker_config_path = docker_config
        self._stack = AsyncExitStack()
        self._config_syncs = tuple(config_syncs)
        self._settings = settings
        self._resolver_key: tuple[object, ...] = ()
        self._resolving: _Resolving | None = None
        self._registry_resolver: RegistryDigestResolver | None = None
        self._retiring: dict[asyncio.Task[None], Callable[[], Awaitable[None]]] = {}
        self._docker_stamp: FileStamp | None = None
        self._mutator: Mutator | None = None
        self._config_error: str | None = None
        self._followers: list[Callable[[Settings], None]] = []
        # The config file's stamp when ``settings`` were read from it (None: read it at
        # start). A runtime started later than that (a restarted worker) catches up at start.
        self._config_stamp: Hashable = config_stamp
        self.metrics.cache_entries.set_function(self._cached_digests)

    async def __aenter__(self) -> Runtime:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        if isinstance(self._pull_secrets, KubePullSecrets):
            await self._stack.enter_async_context(self._pull_secrets)
        if self._config_stamp is None:
            self._config_stamp = self._stamp()
        await self._apply(self._settings)
        for sync in self._config_syncs:
            self._stack.push_async_callback(sync.aclose)
        if not await self.reload_config():  # applied and synced when the file changed since
            for sync in self._config_syncs:
                await sync(self._settings)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task, aclose in list(self._retiring.items()):
            task.cancel()
            await aclose()
        if self._resolving is not None:
            await self._resolving.aclose()
        await self._stack.aclose()

    def on_settings(self, follow: Callable[[Settings], None]) -> None:
        """Call ``follow`` with every configuration applied from now on."""
        self._followers.append(follow)

    @property
    def mutator(self) -> Mutator:
        if self._mutator is None:
            raise RuntimeError("Runtime used outside its 'async with' block")
        return self._mutator

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def shared_cache(self) -> RedisSharedCache | None:
        return None if self._resolving is None else self._resolving.shared

    def readiness(self) -> tuple[bool, str]:
        if isinstance(self._pull_secrets, KubePullSecrets) and not self._pull_secrets.ready():
            # Until the first list, private images would fail to resolve for want of secrets.
            return False, "pull secrets not listed yet"
        # A rejected config does not make the pod unready: every replica would see the same
        # file and go unready together, leaving no endpoint; the last good config serves on.
        reason = "ok"
        if self._config_error is not None:
            reason = f"serving the last good config; a newer one was rejected: {self._config_error}"
        # Nor does Redis: every replica shares it, and each answers without it.
        shared = self.shared_cache
        if shared is not None:
            reason = f"{reason}; {shared.describe()}"
        return True, reason

    async def _apply(self, settings: Settings) -> None:
        key = _resolver_inputs(settings)
        if self._resolving is None or key != self._resolver_key:
            previous = self._resolving
            self._resolving = await self._build_resolver(settings)
            self._resolver_key = key
            if previous is not None:
                self._retire(previous.aclose, settings.registry.timeout_seconds + 5)
        resolving = self._resolving
        self._settings = settings
        self._mutator = Mutator(settings, resolving.resolver, self.metrics, resolving.owners)
        self.metrics.configuration(version(), config_hash(settings))
        for follow in self._followers:
            follow(settings)

    def _cached_digests(self) -> int:
        resolving = self._resolving
        if resolving is None or not isinstance(resolving.resolver, CachingResolver):
            return 0
        return len(resolving.resolver)

    def _retire(self, aclose: Callable[[], Awaitable[None]], grace: float) -> None:
        """Close replaced clients once requests that started on them are past their deadline."""

        async def close_later() -> None:
            await asyncio.sleep(grace)
            self._retiring.pop(task, None)
            await aclose()

        task = asyncio.create_task(close_later())
        self._retiring[task] = aclose

    async def _build_resolver(self, settings: Settings) -> _Resolving:
        """Raises ConfigError (an unreadable docker config, credential provider config or
        shared cache secret) before anything is opened."""
        if settings.resolver == "static":
            self._registry_resolver = None
            return _Resolving(StaticDigestResolver(settings.digest_table))
        docker_config = self._load_docker_config(settings)
        providers = self._credential_providers(settings)
        cache = settings.cache
        shared = None
        if cache.redis is not None:
            shared = RedisSharedCache(cache.redis, metrics=self.metrics, environ=self._environ)
        client = RegistryClient(registry_options(settings), events=self.metrics)
        await client.__aenter__()
        if shared is not None:
            await shared.__aenter__()
        inner = RegistryDigestResolver(client, self._pull_secrets, docker_config, providers)
        self._registry_resolver = inner
        resolver = CachingResolver(
            _CountedSource(inner, self.metrics),
            cache,
            on_event=self.metrics.cache_event,
            lookup_seconds=settings.registry.timeout_seconds,
            shared=shared,
        )
        owners = OwnerPins(cache.owner_pinning, cache.max_entries, shared, metrics=self.metrics)
        return _Resolving(resolver, client, shared, owners)

    def _docker_config_file(self, settings: Settings) -> Path | None:
        return settings.registry.docker_config or self._docker_config_path

    def _load_docker_config(self, settings: Settings) -> DockerConfig | None:
        path = self._docker_config_file(settings)
        if path is None:
            return None
        stamp = file_stamp(path)
        config = DockerConfig.from_file(
            path, timeout=settings.registry.credential_exec_timeout_seconds
        )
        self._docker_stamp = stamp
        return config

    def _credential_providers(self, settings: Settings) -> CredentialProviders | None:
        """The kubelet's credential provider plugins, read (like the kubelet) when the resolver
        is built: at start and when the registry settings change."""
        registry = settings.registry
        config, bin_dir = (
            registry.image_credential_provider_config,
            registry.image_credential_provider_bin_dir,
        )
        if config is None or bin_dir is None:
            return None
        providers = CredentialProviders.from_config(
            config,
            bin_dir,
            timeout=registry.credential_exec_timeout_seconds,
            on_exec=self.metrics.credential_provider_exec,
        )
        log.info("credential providers from %s: %s", config, ", ".join(providers.names))
        return providers

    def reload_docker_config(self) -> None:
        """Mounted credentials rotate (ECR tokens last 12 hours): follow the file."""
        path = self._docker_config_file(self._settings)
        resolver = self._registry_resolver
        if path is None or resolver is None or file_stamp(path) == self._docker_stamp:
            return
        try:
            resolver.docker_config = self._load_docker_config(self._settings)
        except ConfigError as exc:
            log.error("docker config not reloaded, the previous credentials stay: %s", exc)
            return
        log.info("docker config reloaded from %s", path)

    def _stamp(self) -> Hashable:
        # A file, or a directory of them (the ConfigMap volume): see configfiles.
        return None if self.config_path is None else config_stamp(self.config_path)

    async def reload_config(self) -> bool:
        """Load the config file again if it changed. Returns True when a new config applies.

        Every outcome is counted and logged: applied, rejected (the last good config keeps
        serving, visibly in the metrics and /readyz), and a file that disappeared.
        """
        stamp = self._stamp()
        if self.config_path is None or stamp == self._config_stamp:
            return False
        previous, self._config_stamp = self._config_stamp, stamp
        if stamp is None:
            if previous is not None:
                log.warning(
                    "configuration file %s is gone; the last good config keeps serving",
                    self.config_path,
                )
            return False
        try:
            # Off the event loop: a map of thousands of rules takes a while to validate, and
            # admissions must not wait for it.
            settings = await asyncio.to_thread(load_settings_file, self.config_path)
            await self._apply(settings)
        except ConfigError as exc:
            self._reject(str(exc))
            return False
        except Exception as exc:  # a bug in validation is still a rejection, counted
            log.exception("validating %s failed unexpectedly", self.config_path)
            self._reject(f"{self.config_path}: {type(exc).__name__}: {exc}")
            return False
        self._config_error = None
        for sync in self._config_syncs:
            await sync(settings)
        self.metrics.config_reloads.labels("applied").inc()
        self.metrics.config_valid.set(1)
        log.info("configuration reloaded from %s", self.config_path)
        return True

    def _reject(self, reason: str) -> None:
        self._config_error = reason
        self.metrics.config_reloads.labels("rejected").inc()
        self.metrics.config_valid.set(0)
        log.error("configuration rejected, the last good one keeps serving: %s", reason)

    async def watch_config(self, interval: float = 2.0) -> None:
        """Poll the config file; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload_config()
                self.reload_docker_config()
            except Exception:  # a bug here must not stop future reloads
                log.exception("configuration reload failed")

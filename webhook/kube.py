"""Pull secrets for an admitted object: which docker credentials its pods would pull with.

``KubePullSecrets`` keeps cluster-wide, watch-backed caches (list, then watch from the list's
resourceVersion, relist on 410 Gone or any watch failure, as client-go's reflector does) of

* ServiceAccounts, reduced to their ``imagePullSecrets`` names, and
* Secrets of type ``kubernetes.io/dockerconfigjson`` and ``kubernetes.io/dockercfg``, stored
  as parsed :class:`DockerKeyring` objects (the raw data is not kept),

so that :meth:`keyring_for` answers from memory and the admission hot path makes no API
request. The credentials for an object are its own ``imagePullSecrets`` followed by those of
its ServiceAccount (``default`` when none is named), folded into one keyring the way the
kubelet folds a pod's pull secrets. A missing secret is skipped, as the kubelet does; one the
kubelet would refuse (:class:`UnusableSecrets`) is reported once and resolved without.

Secret data is never logged: messages name the secret and the registry key only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Secret, ServiceAccount

from .errors import ConfigError
from .kubeerrors import KubeExpired, KubeRefused, as_kube_error
from .oci.credential import PullContext
from .oci.keychain import DockerKeyring

log = logging.getLogger(__name__)

DOCKERCONFIGJSON_TYPE = "kubernetes.io/dockerconfigjson"
DOCKERCFG_TYPE = "kubernetes.io/dockercfg"
DEFAULT_SERVICE_ACCOUNT = "default"

# The data key each pull-secret type keeps its document under, and how to parse it.
_PULL_SECRET_FORMATS: dict[str, tuple[str, Callable[..., DockerKeyring]]] = {
    DOCKERCONFIGJSON_TYPE: (".dockerconfigjson", DockerKeyring.from_dockerconfigjson),
    DOCKERCFG_TYPE: (".dockercfg", DockerKeyring.from_dockercfg),
}

ObjectKey = tuple[str, str]  # (namespace, name)


def async_client(kubeconfig: Path | None = None) -> AsyncClient:
    """A client for the API server of ``kubeconfig``; without one, of the in-cluster
    configuration, else of $KUBECONFIG (or ~/.kube/config). ConfigError naming both when
    there is neither."""
    try:
        if kubeconfig is not None:
            return AsyncClient(config=KubeConfig.from_file(kubeconfig), field_manager="pinhook")
        return AsyncClient(field_manager="pinhook")
    except Exception as exc:  # lightkube raises several kinds for a missing kubeconfig
        raise ConfigError(
            "no Kubernetes API configuration found: not running in a cluster (no in-cluster"
            " service account config), and no kubeconfig (set KUBECONFIG or pass --kubeconfig)",
            [str(exc)],
        ) from exc


class PullSecretSource(Protocol):
    async def keyring_for(self, namespace: str, pull: PullContext) -> DockerKeyring:
        """The credentials pods of an object in ``namespace`` would pull with."""
        ...


def parse_pull_secret(
    namespace: str, name: str, secret_type: str | None, data: Mapping[str, str] | None
) -> DockerKeyring | None:
    """Parse a pull secret from its type and base64 ``data``, as the kubelet reads it.

    None when it is not a docker pull secret or holds no document (the kubelet ignores those);
    ConfigError when the kubelet would refuse it. Neither the data nor a credential is ever
    part of a message.
    """
    fmt = _PULL_SECRET_FORMATS.get(secret_type or "")
    if fmt is None:
        return None
    data_key, parse = fmt
    source = f"secret {namespace}/{name}"
    encoded = (data or {}).get(data_key)
    if not encoded:
        log.warning("%s has no %s data; it gives no credentials", source, data_key)
        return None
    try:
        document = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source}: {data_key} is not base64") from None
    return parse(document, source=source)


class UnusableSecrets:
    """Reports each pull secret the kubelet would refuse: a warning naming the secret and the
    problem, and the ``pinhook_pull_secrets_unusable_total`` count; once per content, so a
    relist or a watch event that changes nothing says nothing new.

    The kubelet fails every pull of a Pod that names such a secret; pinhook resolves without it
    (digests are not per-namespace, so failing here would depend on what is cached).
    """

    def __init__(self, count: Callable[[str], None] | None = None, limit: int = 10_000) -> None:
        self._count = count or (lambda _namespace: None)
        self._limit = limit
        self._reported: OrderedDict[ObjectKey, str] = OrderedDict()

    def parse(
        self, namespace: str, name: str, secret_type: str | None, data: Mapping[str, str] | None
    ) -> DockerKeyring | None:
        """:func:`parse_pull_secret`, reporting (not raising) a secret the kubelet refuses."""
        key = (namespace, name)
        try:
            keyring = parse_pull_secret(namespace, name, secret_type, data)
        except ConfigError as exc:
            self._report(key, _fingerprint(secret_type, data), exc)
            return None
        self._reported.pop(key, None)
        return keyring

    def _report(self, key: ObjectKey, fingerprint: str, problem: ConfigError) -> None:
        if self._reported.get(key) == fingerprint:
            return
        self._reported[key] = fingerprint
        self._reported.move_to_end(key)
        while len(self._reported) > self._limit:
            self._reported.popitem(last=False)
        log.warning(
            "%s; the kubelet fails every pull of a Pod that uses this pull secret, and pinhook"
            " resolves without it",
            problem,
        )
        self._count(key[0])


def _fingerprint(secret_type: str | None, data: Mapping[str, str] | None) -> str:
    digest = hashlib.sha256((secret_type or "").encode())
    for name, value in sorted((data or {}).items()):
        digest.update(f"\0{name}\0{value}".encode())
    return digest.hexdigest()


def _keyring_for(
    namespace: str,
    pull: PullContext,
    service_account_secrets: Callable[[ObjectKey], Sequence[str] | None],
    secret_keyring: Callable[[ObjectKey], DockerKeyring | None],
) -> DockerKeyring:
    """The object's own pull secrets, then its ServiceAccount's, folded into one keyring."""
    service_account = pull.service_account or DEFAULT_SERVICE_ACCOUNT
    from_account = service_account_secrets((namespace, service_account))
    if from_account is None:
        log.debug("service account %s/%s not found", namespace, service_account)
    names = dict.fromkeys([*pull.image_pull_secrets, *(from_account or ())])
    keyrings: list[DockerKeyring] = []
    for name in names:
        keyring = secret_keyring((namespace, name))
        if keyring is None:
            log.debug("pull secret %s/%s not found or not usable; skipped", namespace, name)
        else:
            keyrings.append(keyring)
    return DockerKeyring.merge(keyrings)


class NoPullSecrets:
    """Anonymous pulls only."""

    async def keyring_for(self, namespace: str, pull: PullContext) -> DockerKeyring:
        return DockerKeyring()


class StaticPullSecrets:
    """Pull secrets and ServiceAccounts held in memory (offline ``resolve``/``review``, tests)."""

    def __init__(
        self,
        secrets: Mapping[ObjectKey, DockerKeyring] | None = None,
        service_accounts: Mapping[ObjectKey, Sequence[str]] | None = None,
    ) -> None:
        self._secrets = dict(secrets or {})
        self._service_accounts = {
            key: tuple(names) for key, names in (service_accounts or {}).items()
        }

    @classmethod
    def from_manifests(
        cls,
        objects: Iterable[Mapping[str, Any]],
        *,
        default_namespace: str = "default",
        unusable: UnusableSecrets | None = None,
    ) -> StaticPullSecrets:
        """Build from Secret and ServiceAccount manifests (as parsed from YAML); other kinds
        are ignored. Secrets may use ``data`` (base64) or ``stringData`` (plain text)."""
        unusable = unusable or UnusableSecrets()
        secrets: dict[ObjectKey, DockerKeyring] = {}
        accounts: dict[ObjectKey, Sequence[str]] = {}
        for obj in objects:
            metadata = obj.get("metadata") or {}
            if not metadata.get("name"):
                continue
            key = (str(metadata.get("namespace") or default_namespace), str(metadata["name"]))
            if obj.get("kind") == "ServiceAccount":
                refs = obj.get("imagePullSecrets") or []
                accounts[key] = [str(ref["name"]) for ref in refs if ref.get("name")]
            elif obj.get("kind") == "Secret":
                keyring = unusable.parse(*key, obj.get("type"), _manifest_data(obj))
                if keyring is not None:
                    secrets[key] = keyring
        return cls(secrets, accounts)

    async def keyring_for(self, namespace: str, pull: PullContext) -> DockerKeyring:
        return _keyring_for(namespace, pull, self._service_accounts.get, self._secrets.get)


def _manifest_data(obj: Mapping[str, Any]) -> dict[str, str]:
    data = {str(k): str(v) for k, v in (obj.get("data") or {}).items()}
    for key, value in (obj.get("stringData") or {}).items():
        data[str(key)] = base64.b64encode(str(value).encode()).decode()
    return data


V = TypeVar("V")


class _Backoff:
    """Exponential delay between failed attempts, reset by any success."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self._initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._maximum)
        return delay


class _Reflector(Generic[V]):
    """One cluster-wide list+watch cache of a resource, reduced to ``convert(obj)`` per object.

    Objects for which ``convert`` returns None are not kept.
    """

    def __init__(
        self,
        client: AsyncClient,
        resource: Any,
        convert: Callable[[Any], V | None],
        *,
        label: str,
        fields: dict[str, Any] | None,
        resync_seconds: float,
        backoff: _Backoff,
    ) -> None:
        self._client = client
        self._resource = resource
        self._convert = convert
        self.label = label
        self._fields = fields
        self._resync_seconds = resync_seconds
        self._backoff = backoff
        self.store: dict[ObjectKey, V] = {}
        self.synced = asyncio.Event()
        self._expired_in_a_row = 0
        # What to log at INFO once the next list succeeds: the first connect and every
        # reconnect after a failure, not the periodic resyncs.
        self._connecting: str | None = "watching"

    async def run(self) -> None:
        while True:
            try:
                resource_version = await self._list()
                if self._connecting is not None:
                    log.info("%s %s (%d listed)", self._connecting, self.label, len(self.store))
                    self._connecting = None
                await self._watch(resource_version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = as_kube_error(exc, f"list/watch of {self.label}")
                if isinstance(error, KubeExpired):
                    # The resourceVersion we watch from was compacted away: a relist is due.
                    log.info("watch of %s expired (410 Gone); relisting", self.label)
                    # Relist at once, unless the last watch also expired before any event.
                    if self._expired_in_a_row:
                        await asyncio.sleep(self._backoff.next_delay())
                    self._expired_in_a_row += 1
                    continue
                delay = self._backoff.next_delay()
                self._connecting = "watch reconnected:"
                if isinstance(error, KubeRefused) and not self.synced.is_set():
                    # RBAC withholds this resource (perhaps on purpose, see rbac.yaml): resolve
                    # without it rather than keep every replica unready; keep asking.
                    log.error(
                        "not allowed to list %s; pull secrets from it are not used: %s",
                        self.label,
                        exc,
                    )
                    self.synced.set()
                log.warning(
                    "list/watch of %s failed (%s: %s); relisting in %.1fs",
                    self.label,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _list(self) -> str:
        listing = self._client.list(self._resource, namespace="*", fields=self._fields)
        store: dict[ObjectKey, V] = {}
        async for obj in listing:
            value = self._convert(obj)
            if value is not None:
                store[_object_key(obj)] = value
        self.store = store
        self.synced.set()
        resource_version = str(listing.resourceVersion)
        log.debug("listed %d %s at %s", len(store), self.label, resource_version)
        return resource_version

    async def _watch(self, resource_version: str) -> None:
        events = self._client.watch(
            self._resource, namespace="*", fields=self._fields, resource_version=resource_version
        )
        try:
            # A periodic relist repairs anything a missed event could have left stale.
            async with asyncio.timeout(self._resync_seconds):
                async for event_type, obj in events:
                    self._apply(event_type, obj)
                    self._backoff.reset()
                    self._expired_in_a_row = 0
        except TimeoutError:
            log.debug("resyncing %s", self.label)
            self._expired_in_a_row = 0
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    def _apply(self, event_type: str, obj: Any) -> None:
        key = _object_key(obj)
        if event_type in ("ADDED", "MODIFIED"):
            value = self._convert(obj)
            if value is None:
                self.store.pop(key, None)
            else:
                self.store[key] = value
        elif event_type == "DELETED":
            self.store.pop(key, None)


def _object_key(obj: Any) -> ObjectKey:
    return (str(obj.metadata.namespace), str(obj.metadata.name))


def _service_account_pull_secrets(obj: Any) -> tuple[str, ...]:
    return tuple(ref.name for ref in obj.imagePullSecrets or () if ref.name)


class KubePullSecrets:
    """Pull secrets from the Kubernetes API through watch-backed caches.

    An async context manager: entering starts the list+watch tasks, leaving cancels them and,
    with ``owns_client``, closes the client. Until :meth:`ready`, lookups see whatever has been
    listed so far.
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        owns_client: bool = False,
        resync_seconds: float = 300,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        unusable: UnusableSecrets | None = None,
    ) -> None:
        self._unusable = unusable or UnusableSecrets()

        def reflector(
            resource: Any, convert: Callable[[Any], V | None], label: str, secret_type: str | None
        ) -> _Reflector[V]:
            return _Reflector(
                client,
                resource,
                convert,
                label=label,
                fields={"type": secret_type} if secret_type else None,
                resync_seconds=resync_seconds,
                backoff=_Backoff(backoff_initial, backoff_max),
            )

        self._service_accounts = reflector(
            ServiceAccount, _service_account_pull_secrets, "serviceaccounts", None
        )
        # Field selectors cannot OR two values, so each pull-secret type has its own watch.
        self._secret_caches = [
            reflector(Secret, self._secret_keyring, f"secrets of type {t}", t)
            for t in (DOCKERCONFIGJSON_TYPE, DOCKERCFG_TYPE)
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._client = client if owns_client else None

    async def __aenter__(self) -> KubePullSecrets:
        self._tasks = [
            asyncio.create_task(r.run(), name=f"pinhook-watch {r.label}")
            for r in self._reflectors()
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._client is not None:
            await self._client.close()

    def ready(self) -> bool:
        """Whether every cache has completed its initial list."""
        return all(r.synced.is_set() for r in self._reflectors())

    async def keyring_for(self, namespace: str, pull: PullContext) -> DockerKeyring:
        return _keyring_for(namespace, pull, self._service_accounts.store.get, self._secret)

    def _secret_keyring(self, obj: Any) -> DockerKeyring | None:
        namespace, name = _object_key(obj)
        return self._unusable.parse(namespace, name, obj.type, obj.data)

    def _secret(self, key: ObjectKey) -> DockerKeyring | None:
        for cache in self._secret_caches:
            keyring = cache.store.get(key)
            if keyring is not None:
                return keyring
        return None

    def _reflectors(self) -> list[_Reflector[Any]]:
        return [self._service_accounts, *self._secret_caches]

"""Self-managed serving certificate: one CA and leaf shared by every replica through a Secret.

Without cert-manager and without mounted files, pinhook keeps its own certificate in the
``kubernetes.io/tls`` Secret ``pinhook-tls`` (``ca.crt``, ``tls.crt``, ``tls.key``) and writes the
CA into ``clientConfig.caBundle`` of every webhook of its MutatingWebhookConfiguration. Each pass
of :meth:`SelfManagedCertificates.ensure`:

1. reads the Secret; when it is missing, unusable, does not cover the Service's DNS names or is
   in the last third of its lifetime, generates a new CA and leaf and stores them with
   optimistic concurrency (create, or update at the resourceVersion read). A replica that loses
   the race (409 AlreadyExists or Conflict) re-reads and adopts the winner's certificate, so the
   replicas converge on one CA;
2. patches the caBundles from what is finally in the Secret (skipped when they already hold it),
   then re-reads the Secret: if another replica rotated it meanwhile, our patch may have put an
   older CA over theirs, so the pass repeats. Every writer patches after it writes the Secret
   and checks after it patches, so the last patch always carries the last Secret's CA;
3. writes the three files for :class:`webhook.tls.ReloadingTLS`, only when they differ, and only
   after the caBundle trusts the new CA, so this replica never serves a leaf the API server
   cannot verify.

Rotation overlap: a new Secret's ``ca.crt`` holds the new CA followed by the previous one. The
API server trusts every certificate in ``caBundle``, so the replicas still serving the old leaf
(until their next check reads the Secret) stay verifiable while the others serve the new one;
the previous CA is dropped at the next rotation. ``caBundle`` is always exactly ``ca.crt``.

Key material is never logged: messages name the Secret and say why it is (not) used.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import ipaddress
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from lightkube import AsyncClient
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.admissionregistration_v1 import MutatingWebhookConfiguration
from lightkube.resources.core_v1 import Secret
from lightkube.types import PatchType

from . import certs
from .certs import CertPaths
from .errors import CertificateError
from .kubeerrors import (
    KubeConflict,
    KubeError,
    KubeInvalid,
    KubeNotFound,
    KubeRefused,
    KubeUnreachable,
    kube_errors,
)

log = logging.getLogger(__name__)

TLS_SECRET_TYPE = "kubernetes.io/tls"  # noqa: S105 - a Secret type, not a password
# Each race lost costs one re-read; more losses in a row than this means something keeps
# rewriting the objects, which waiting will not fix.
_MAX_ATTEMPTS = 5
_MIN_CA_DAYS = 3650
_LABELS = {"app.kubernetes.io/name": "pinhook", "app.kubernetes.io/managed-by": "pinhook"}


@dataclass(frozen=True, slots=True)
class SelfManagedOptions:
    namespace: str = "pinhook-system"
    service: str = "pinhook"
    secret_name: str = "pinhook-tls"  # noqa: S105 - a name, not a password
    webhook_name: str = "pinhook"
    out_dir: Path = Path("/tmp/pinhook-tls")  # noqa: S108 - an emptyDir in the Deployment
    # Names besides the Service's, for an API server that calls a URL rather than the Service
    # (pinhook on a developer's machine, `pinhook install --url https://127.0.0.1:8443/mutate`).
    extra_dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    days: int = 365
    check_interval: float = 3600.0
    # After a failed pass, or while the webhook configuration does not exist yet (it may be
    # applied after the Deployment), the next pass comes this soon instead.
    retry_interval: float = 60.0


@dataclass(frozen=True, slots=True)
class ServingMaterial:
    """The PEM contents of the Secret: the CA bundle (current CA first), leaf and its key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def secret_data(self) -> dict[str, str]:
        """The base64 ``data`` of a ``kubernetes.io/tls`` Secret."""
        return {
            certs.CA_CERT_FILE: _b64(self.ca_pem),
            certs.CERT_FILE: _b64(self.cert_pem),
            certs.KEY_FILE: _b64(self.key_pem),
        }

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str] | None) -> ServingMaterial | None:
        """None when a key is missing or not base64."""
        data = data or {}
        try:
            return cls(
                ca_pem=base64.b64decode(data[certs.CA_CERT_FILE], validate=True),
                cert_pem=base64.b64decode(data[certs.CERT_FILE], validate=True),
                key_pem=base64.b64decode(data[certs.KEY_FILE], validate=True),
            )
        except (KeyError, binascii.Error, ValueError):
            return None


def check_material(
    material: ServingMaterial | None,
    dns_names: Sequence[str],
    now: datetime | None = None,
    ip_addresses: Sequence[str] = (),
) -> str | None:
    """Why ``material`` should not serve (a reason fit for a log line), or None when it is sound.

    Sound: parseable, the key belongs to the leaf, the leaf is signed by the first CA of the
    bundle, is valid now, covers ``dns_names`` and ``ip_addresses``, and neither it nor the CA
    is in the last third of its lifetime.
    """
    if material is None:
        return f"it lacks one of {certs.CA_CERT_FILE}, {certs.CERT_FILE}, {certs.KEY_FILE}"
    moment = now or datetime.now(UTC)
    try:
        ca = x509.load_pem_x509_certificates(material.ca_pem)[0]
        leaf = x509.load_pem_x509_certificate(material.cert_pem)
        key = serialization.load_pem_private_key(material.key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return "its certificates or key cannot be parsed"
    if key.public_key() != leaf.public_key():
        return f"{certs.KEY_FILE} does not belong to {certs.CERT_FILE}"
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return f"{certs.CERT_FILE} is not signed by the first CA in {certs.CA_CERT_FILE}"
    if leaf.not_valid_before_utc > moment:
        return f"{certs.CERT_FILE} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M}Z"
    info = certs.load_cert_info(material.cert_pem)
    missing = sorted(set(dns_names) - set(info.dns_names))
    missing += sorted(set(map(_canonical_ip, ip_addresses)) - set(map(_canonical_ip, info.ips)))
    if missing:
        return f"{certs.CERT_FILE} does not cover {', '.join(missing)}"
    if certs.needs_renewal(material.cert_pem, moment):
        return (
            f"{certs.CERT_FILE} expires {leaf.not_valid_after_utc:%Y-%m-%d} and is due for renewal"
        )
    if certs.needs_renewal(ca.public_bytes(serialization.Encoding.PEM), moment):
        return f"the CA expires {ca.not_valid_after_utc:%Y-%m-%d} and is due for renewal"
    return None


class _Bundle(enum.Enum):
    MISSING = "webhook configuration not found"
    UNCHANGED = "caBundle already current"
    PATCHED = "caBundle patched"


class SelfManagedCertificates:
    """Keeps the shared serving certificate valid, trusted by the webhook and on local disk."""

    def __init__(self, client: AsyncClient, options: SelfManagedOptions) -> None:
        if options.days < 1:
            raise CertificateError(f"days must be at least 1, got {options.days}")
        if options.check_interval <= 0 or options.retry_interval <= 0:
            raise CertificateError("check_interval and retry_interval must be positive")
        self._client = client
        self._options = options
        service_names = certs.service_dns_names(options.service, options.namespace)
        self._dns_names = list(dict.fromkeys([*service_names, *options.extra_dns_names]))
        try:
            self._ips = list(dict.fromkeys(map(_canonical_ip, options.ip_addresses)))
        except ValueError as exc:
            raise CertificateError(f"not a valid IP address for a certificate: {exc}") from exc
        self._secret_label = f"secret {options.namespace}/{options.secret_name}"
        self._webhook_label = f"MutatingWebhookConfiguration {options.webhook_name}"
        # True after a failed pass or while the webhook configuration is missing.
        self._retry_soon = False
        self._lock = asyncio.Lock()

    async def ensure(self) -> CertPaths:
        """One pass: Secret valid (created or renewed as needed), caBundles patched, files
        written. Raises :class:`CertificateError` when any of it cannot be done."""
        async with self._lock:
            material = await self._settle()
            return await asyncio.to_thread(self._write_files, material)

    async def run(self) -> None:
        """Check again every ``check_interval`` seconds, forever; failures are logged and
        retried after ``retry_interval``, never raised."""
        options = self._options
        while True:
            retry = self._retry_soon
            await asyncio.sleep(
                min(options.retry_interval, options.check_interval)
                if retry
                else options.check_interval
            )
            try:
                await self.ensure()
            except CertificateError as exc:
                self._retry_soon = True
                log.warning("self-managed certificate check failed: %s", exc)
            except Exception:
                self._retry_soon = True
                log.exception("self-managed certificate check failed unexpectedly")

    # -- one pass ------------------------------------------------------------------------

    async def _settle(self) -> ServingMaterial:
        for _ in range(_MAX_ATTEMPTS):
            material, version = await self._settle_secret()
            state = await self._apply_ca_bundle(material.ca_pem)
            self._retry_soon = state is _Bundle.MISSING
            # Only our own patch can have put a stale CA over a newer one; see the module doc.
            if state is not _Bundle.PATCHED or await self._secret_version() == version:
                return material
            log.info(
                "%s changed while the caBundle was patched; patching again", self._secret_label
            )
        raise CertificateError(
            f"{self._secret_label} kept changing while its CA was written to the "
            f"{self._webhook_label}; gave up after {_MAX_ATTEMPTS} attempts"
        )

    async def _settle_secret(self) -> tuple[ServingMaterial, str | None]:
        """The Secret's valid material and resourceVersion, creating or renewing it if needed."""
        for _ in range(_MAX_ATTEMPTS):
            current = await self._read_secret()
            stored = ServingMaterial.from_secret_data(current.data) if current else None
            problem = (
                "it does not exist"
                if current is None
                else check_material(stored, self._dns_names, ip_addresses=self._ips)
            )
            if current is not None and stored is not None and problem is None:
                return stored, _version(current)
            log.info(
                "%s is not usable (%s); generating a new certificate", self._secret_label, problem
            )
            fresh = await asyncio.to_thread(self._generate, stored)
            written = await (
                self._create_secret(fresh)
                if current is None
                else self._replace_secret(current, fresh)
            )
            if written is not None:
                log.info(
                    "%s stored with a new certificate for %s",
                    self._secret_label,
                    ", ".join([*self._dns_names, *self._ips]),
                )
                return fresh, _version(written)
            log.info("another writer changed %s first; reading it again", self._secret_label)
        raise CertificateError(
            f"{self._secret_label} kept changing under concurrent writers; "
            f"gave up after {_MAX_ATTEMPTS} attempts"
        )

    def _generate(self, previous: ServingMaterial | None) -> ServingMaterial:
        options = self._options
        generated = certs.generate(
            self._dns_names,
            self._ips,
            days=options.days,
            ca_days=max(_MIN_CA_DAYS, options.days),
        )
        return ServingMaterial(
            ca_pem=generated.ca_cert_pem + _previous_ca(previous, generated.ca_cert_pem),
            cert_pem=generated.cert_pem,
            key_pem=generated.key_pem,
        )

    async def _apply_ca_bundle(self, ca_pem: bytes) -> _Bundle:
        bundle = certs.ca_bundle_b64(ca_pem)
        for _ in range(_MAX_ATTEMPTS):
            config = await self._read_webhook()
            if config is None:
                log.warning(
                    "%s not found; its caBundle will be set on a later check",
                    self._webhook_label,
                )
                return _Bundle.MISSING
            ops = ca_bundle_patch(config, bundle)
            if not ops:
                return _Bundle.UNCHANGED
            if await self._patch_webhook(ops):
                log.info("%s: caBundle set on %d webhook(s)", self._webhook_label, len(ops) // 2)
                return _Bundle.PATCHED
            log.info("%s changed while it was patched; retrying", self._webhook_label)
        raise CertificateError(
            f"{self._webhook_label} kept changing; could not set its caBundle "
            f"after {_MAX_ATTEMPTS} attempts"
        )

    def _write_files(self, material: ServingMaterial) -> CertPaths:
        out = self._options.out_dir
        paths = certs.cert_paths(out)
        if _files_hold(paths, material):
            return paths
        # write() writes no CA key, so none is passed: renewals generate a new CA.
        certs.write(
            certs.GeneratedCerts(
                ca_cert_pem=material.ca_pem,
                ca_key_pem=b"",
                cert_pem=material.cert_pem,
                key_pem=material.key_pem,
                not_after=certs.load_cert_info(material.cert_pem).not_after,
            ),
            out,
        )
        log.info("serving certificate from %s written to %s", self._secret_label, out)
        return paths

    # -- API calls: each returns None/False for the outcomes a pass handles, else raises ----

    async def _read_secret(self) -> Secret | None:
        options = self._options
        with _api_call(f"reading {self._secret_label}", expected=(KubeNotFound,)):
            return await self._client.get(Secret, options.secret_name, namespace=options.namespace)
        return None

    async def _secret_version(self) -> str | None:
        current = await self._read_secret()
        return _version(current) if current is not None else None

    async def _create_secret(self, material: ServingMaterial) -> Secret | None:
        options = self._options
        secret = Secret(
            metadata=ObjectMeta(
                name=options.secret_name, namespace=options.namespace, labels=dict(_LABELS)
            ),
            type=TLS_SECRET_TYPE,
            data=material.secret_data(),
        )
        # AlreadyExists: another replica created it.
        with _api_call(f"creating {self._secret_label}", expected=(KubeConflict,)):
            return await self._client.create(secret)
        return None

    async def _replace_secret(self, current: Secret, material: ServingMaterial) -> Secret | None:
        meta = current.metadata or ObjectMeta()
        # The resourceVersion read makes the update conditional: 409 if anyone wrote since.
        updated = Secret(
            metadata=ObjectMeta(
                name=self._options.secret_name,
                namespace=self._options.namespace,
                resourceVersion=meta.resourceVersion,
                labels=meta.labels,
                annotations=meta.annotations,
            ),
            # The type of a Secret cannot change; keep whatever it was created with.
            type=current.type or TLS_SECRET_TYPE,
            data={**(current.data or {}), **material.secret_data()},
        )
        # Deleted or rewritten since it was read.
        with _api_call(f"updating {self._secret_label}", expected=(KubeNotFound, KubeConflict)):
            return await self._client.replace(updated)
        return None

    async def _read_webhook(self) -> MutatingWebhookConfiguration | None:
        with _api_call(f"reading {self._webhook_label}", expected=(KubeNotFound,)):
            return await self._client.get(MutatingWebhookConfiguration, self._options.webhook_name)
        return None

    async def _patch_webhook(self, ops: list[dict[str, Any]]) -> bool:
        # 422: a `test` op failed (the webhooks moved); 409: changed concurrently;
        # 404: deleted since it was read. A fresh read sorts out each.
        with _api_call(
            f"patching the caBundle of {self._webhook_label}",
            expected=(KubeInvalid, KubeConflict, KubeNotFound),
        ):
            await self._client.patch(
                MutatingWebhookConfiguration,
                self._options.webhook_name,
                ops,
                patch_type=PatchType.JSON,
            )
            return True
        return False


@contextmanager
def _api_call(what: str, *, expected: tuple[type[KubeError], ...]) -> Iterator[None]:
    """One API call: an ``expected`` outcome ends the block quietly (the code after it
    handles it), any other failure is a CertificateError that says what to do."""
    try:
        with kube_errors(what):
            yield
    except expected:
        pass
    except KubeError as exc:
        raise _failure(exc) from exc


def ca_bundle_patch(config: MutatingWebhookConfiguration, bundle: str) -> list[dict[str, Any]]:
    """JSON patch ops setting ``caBundle`` on each webhook that lacks ``bundle``.

    Each ``add`` (which replaces an existing value) is guarded by a ``test`` of the webhook's
    name at that index, so a list reordered since the read fails with 422 instead of patching
    the wrong webhook.
    """
    ops: list[dict[str, Any]] = []
    for index, webhook in enumerate(config.webhooks or ()):
        if webhook.clientConfig.caBundle == bundle:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": webhook.name})
        ops.append(
            {"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": bundle}
        )
    return ops


def _previous_ca(previous: ServingMaterial | None, new_ca_pem: bytes) -> bytes:
    """The CA that signed the outgoing leaf, kept in the bundle for the rotation overlap."""
    if previous is None:
        return b""
    try:
        ca = x509.load_pem_x509_certificates(previous.ca_pem)[0]
    except (ValueError, IndexError):
        return b""
    pem = ca.public_bytes(serialization.Encoding.PEM)
    if ca.not_valid_after_utc <= datetime.now(UTC) or pem == new_ca_pem:
        return b""
    return pem


def _canonical_ip(text: str) -> str:
    """One spelling per address (``::1`` and ``0:0::1`` are the same SAN); ValueError if none."""
    return str(ipaddress.ip_address(text))


def _files_hold(paths: CertPaths, material: ServingMaterial) -> bool:
    try:
        return (
            paths.ca_cert.read_bytes() == material.ca_pem
            and paths.cert.read_bytes() == material.cert_pem
            and paths.key.read_bytes() == material.key_pem
        )
    except OSError:
        return False


def _version(obj: Secret) -> str | None:
    return obj.metadata.resourceVersion if obj.metadata is not None else None


def _failure(exc: KubeError) -> CertificateError:
    if isinstance(exc, KubeUnreachable):
        return CertificateError(
            f"{exc.what} failed: cannot reach the Kubernetes API server ({exc.detail})"
        )
    if isinstance(exc, KubeRefused):
        return CertificateError(
            f"{exc.what} was refused ({exc.detail}); self-managed TLS needs the Role "
            "pinhook-tls and the ClusterRole pinhook-webhook-ca of manifests/base/rbac.yaml "
            "bound to pinhook's ServiceAccount"
        )
    return CertificateError(f"{exc.what} failed: {exc.detail}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")

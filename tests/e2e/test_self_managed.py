"""``pinhook serve --self-managed`` against the real API: its Secret, its caBundle, a second
replica and renewal, each proven by the API server calling pinhook successfully.

The webhook configurations are installed without a caBundle (except where the test plays a
pinhook that was already running): only pinhook's own patch lets the API server verify it. The
API server calls ``https://$PINHOOK_E2E_HOST:PORT/mutate``, not a Service, so pinhook runs with
``--cert-ip`` (or ``--cert-dns-name``) for that address.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lightkube import Client
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Secret

from tests.e2e import cluster
from tests.e2e.cluster import Namespaces, container_images
from tests.e2e.conftest import E2ERegistry, PinhookSetup, webhook_installed
from tests.e2e.metrics import scrape
from tests.e2e.pinhook import (
    Pinhook,
    SelfManaged,
    Tls,
    free_port,
    is_ip,
    listen_port,
    mutate_url,
    write_config,
)
from webhook.certs import key_usage
from webhook.config import load_settings_file
from webhook.policysync import covers
from webhook.validatingpolicy import armed, policy_object

pytestmark = pytest.mark.e2e

SECRET: Final = "pinhook-tls"  # the Secret a self-managed pinhook keeps
SERVICE: Final = "pinhook"  # `pinhook serve --service`, its default


@dataclass(frozen=True)
class Site:
    """One self-managed installation: the namespace of its Secret (``name``), a namespace for
    the Pods it admits, and its webhook configuration (also ``name``)."""

    kube: Client
    setup: PinhookSetup
    registry: E2ERegistry
    name: str

    @property
    def pods_namespace(self) -> str:
        return f"{self.name}-pods"

    def replica(self, label: str, port: int | None = None) -> Pinhook:
        managed = SelfManaged(
            namespace=self.name,
            webhook_name=self.name,
            kubeconfig=self.setup.kubeconfig,
            cert_dir=self.setup.workdir / f"{self.name}-{label}",
        )
        return Pinhook(
            host=self.setup.host,
            config=self.setup.config,
            workdir=self.setup.workdir,
            self_managed=managed,
            port=port or free_port(),
        )

    def secret(self) -> Secret:
        return self.kube.get(Secret, SECRET, namespace=self.name)

    def secret_data(self) -> dict[str, bytes]:
        data = self.secret().data or {}
        return {key: base64.b64decode(value) for key, value in data.items()}

    def ca_bundles(self) -> list[bytes]:
        webhooks = cluster.get_webhook_configuration(self.kube, self.name)["webhooks"]
        return [base64.b64decode(hook["clientConfig"].get("caBundle", "")) for hook in webhooks]

    def point_at(self, pinhook: Pinhook) -> None:
        cluster.patch_webhooks(self.kube, self.name, "/clientConfig/url", pinhook.url)

    def wait_until_answered_by(self, pinhook: Pinhook, *, all_pinned: bool = True) -> None:
        """Create Pods until ``pinhook`` answered one more.

        ``all_pinned``: every one of them must be pinned, by whichever replica the API server
        still calls: the webhook never stops working. Not so right after the configuration was
        written, which the API server sees a moment later.
        """
        pinned = self.registry.pinned
        before = scrape(pinhook).admissions("Pod", "CREATE", "patched")

        def answered(stored: dict[str, Any]) -> bool:
            images = container_images(stored, "spec", "containers")
            name = stored["metadata"]["name"]
            assert images == [pinned] or not all_pinned, f"{name} stored unpinned: {images}"
            return scrape(pinhook).admissions("Pod", "CREATE", "patched") > before

        cluster.wait_until_stored(
            self.kube,
            lambda name: cluster.pod(name, self.registry.app.tag_ref, self.pods_namespace),
            answered,
            f"the API server did not call the pinhook on port {pinhook.port}",
            prefix=f"port-{pinhook.port}-{cluster.run_id()}",
        )


@contextlib.contextmanager
def installed_site(
    kube: Client,
    setup: PinhookSetup,
    registry: E2ERegistry,
    namespaces: Namespaces,
    name: str,
    *,
    url: str,
    ca: Path | None = None,
) -> Iterator[Site]:
    """The namespaces and a webhook configuration calling ``url`` (caBundle ``ca`` if any)."""
    namespaces.create(name)
    namespaces.create(f"{name}-pods")
    with webhook_installed(kube, setup, name, url=url, ca=ca):
        yield Site(kube, setup, registry, name)


def service_names(namespace: str) -> list[str]:
    """The Service's names a self-managed certificate covers (webhook/certs.py)."""
    service = f"{SERVICE}.{namespace}"
    return [SERVICE, service, f"{service}.svc", f"{service}.svc.cluster.local"]


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def assert_bundles_are(site: Site, ca_pem: bytes) -> None:
    bundles = site.ca_bundles()
    assert bundles and set(bundles) == {ca_pem}


# --- first start and a second replica ---------------------------------------------------


@dataclass(frozen=True)
class Started:
    site: Site
    first: Pinhook


@pytest.fixture(scope="module")
def started(
    kube: Client,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
) -> Iterator[Started]:
    # The webhook configuration exists before pinhook starts, as in the manifests: pinhook
    # patches its caBundle before it listens.
    port = listen_port()
    name = f"pinhook-e2e-{cluster.run_id()}-tls"
    url = mutate_url(pinhook_setup.host, port)
    with (
        installed_site(kube, pinhook_setup, e2e_registry, namespaces, name, url=url) as site,
        site.replica("first", port) as first,
    ):
        site.wait_until_answered_by(first, all_pinned=False)
        yield Started(site, first)


def test_first_replica_creates_its_secret_and_sets_the_ca_bundle(started: Started) -> None:
    site, first = started.site, started.first
    secret = site.secret()
    assert secret.type == "kubernetes.io/tls"
    assert secret.metadata is not None and secret.metadata.labels is not None
    assert secret.metadata.labels["app.kubernetes.io/managed-by"] == "pinhook"
    assert f"{SECRET} is not usable (it does not exist)" in first.log()
    data = site.secret_data()
    # Installed without a caBundle: the API server verifies pinhook through pinhook's patch.
    assert_bundles_are(site, data["ca.crt"])
    assert first.serving_certificate() == der(data["tls.crt"])
    info = x509.load_pem_x509_certificate(data["tls.crt"]).extensions
    san = info.get_extension_for_class(x509.SubjectAlternativeName).value
    host = site.setup.host
    assert set(san.get_values_for_type(x509.DNSName)) == {
        *service_names(site.name),
        *([] if is_ip(host) else [host]),
    }
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == (
        [host] if is_ip(host) else []
    )


def test_second_replica_reuses_the_secret_and_is_called_by_the_api_server(
    started: Started,
) -> None:
    site = started.site
    version = _version(site.secret())
    with site.replica("second") as second:
        assert "generating a new certificate" not in second.log()
        assert _version(site.secret()) == version
        assert second.serving_certificate() == started.first.serving_certificate()
        site.point_at(second)
        site.wait_until_answered_by(second)
    assert _version(site.secret()) == version


def _version(secret: Secret) -> str | None:
    return secret.metadata.resourceVersion if secret.metadata else None


# --- renewal ----------------------------------------------------------------------------


def test_renewal_before_expiry_keeps_the_webhook_working(
    kube: Client,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
) -> None:
    """A Secret in the last third of its lifetime is renewed by the next replica to start, and
    the API server keeps calling both the replica still serving the old certificate and the
    one serving the new.

    The due certificate is made by the test: pinhook's own last a year and are checked hourly.
    The old replica serves the Secret's files, as a replica does between two checks (a plain
    ``pinhook serve --cert``: one that would not renew them). The new replica renews at its
    start, as any replica would at its next check.
    """
    name = f"pinhook-e2e-{cluster.run_id()}-renew"
    old_tls = write_aging_certificate(
        pinhook_setup.workdir / f"{name}-old", service_names(name), pinhook_setup.host
    )
    old_ca = old_tls.ca.read_bytes()
    with (
        Pinhook(
            host=pinhook_setup.host,
            config=pinhook_setup.config,
            tls=old_tls,
            workdir=pinhook_setup.workdir,
            port=free_port(),
        ) as old,
        installed_site(
            kube, pinhook_setup, e2e_registry, namespaces, name, url=old.url, ca=old_tls.ca
        ) as site,
    ):
        kube.create(tls_secret(name, old_tls))
        site.wait_until_answered_by(old, all_pinned=False)
        with site.replica("renewed") as new:
            assert f"{SECRET} is not usable" in new.log()
            assert "due for renewal" in new.log()
            data = site.secret_data()
            # The new CA first, then the outgoing one, so the old leaf stays trusted.
            [new_ca, kept_ca] = x509.load_pem_x509_certificates(data["ca.crt"])
            assert kept_ca.public_bytes(serialization.Encoding.PEM) == old_ca
            assert new_ca.public_bytes(serialization.Encoding.PEM) != old_ca
            assert_bundles_are(site, data["ca.crt"])
            assert data["tls.crt"] != old_tls.cert.read_bytes()
            assert new.serving_certificate() == der(data["tls.crt"])
            # The API server still calls the old replica (the URL has not moved)...
            site.wait_until_answered_by(old)
            # ...and, once pointed at it, the new one: its leaf verifies only by the new CA.
            site.point_at(new)
            site.wait_until_answered_by(new)


# --- the backstop policy -----------------------------------------------------------------


def test_a_replica_brings_the_validating_policy_to_the_config_it_serves(
    kube: Client,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
) -> None:
    """Installed from another config (requireDigest in one namespace), the policy is patched
    at start to the served config's, which enforces nothing: disarmed, not deleted."""
    name = f"pinhook-e2e-{cluster.run_id()}-policy"
    namespaces.create(name)
    enforcing = write_config(
        pinhook_setup.workdir / f"{name}.yaml",
        e2e_registry.host,
        require_digest_in=[f"{name}-pods"],
    )
    port = free_port()
    url = mutate_url(pinhook_setup.host, port)
    with webhook_installed(
        kube, pinhook_setup, name, url=url, config=enforcing, validating_policy=True
    ):
        installed = cluster.get_validating_policy(kube, name)
        assert armed(installed)
        site = Site(kube, pinhook_setup, e2e_registry, name)
        with site.replica("policy", port) as replica:
            live = cluster.get_validating_policy(kube, name)
            served = load_settings_file(pinhook_setup.config)
            wanted = policy_object(served, name=name, own_namespace=name)
            assert covers(live["spec"], wanted["spec"]), replica.log()
            assert not armed(live)
            assert f"ValidatingAdmissionPolicy {name} updated" in replica.log()


def tls_secret(namespace: str, tls: Tls) -> Secret:
    data = {
        "ca.crt": tls.ca.read_bytes(),
        "tls.crt": tls.cert.read_bytes(),
        "tls.key": tls.key.read_bytes(),
    }
    return Secret(
        metadata=ObjectMeta(name=SECRET, namespace=namespace),
        type="kubernetes.io/tls",
        data={key: base64.b64encode(value).decode() for key, value in data.items()},
    )


def write_aging_certificate(directory: Path, dns_names: list[str], host: str) -> Tls:
    """A CA and a leaf for ``dns_names`` and ``host``, valid now but five of its six hours
    gone: in the last third of its lifetime, where pinhook renews. Written as ca.crt, tls.crt
    and tls.key in ``directory``."""
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pinhook-e2e aging CA")])
    ca = _signed(
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .public_key(ca_key.public_key())
        .not_valid_before(now - timedelta(hours=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True),
        ca_name,
        ca_key,
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    alt_names.append(
        x509.IPAddress(ipaddress.ip_address(host)) if is_ip(host) else x509.DNSName(host)
    )
    leaf = _signed(
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .public_key(key.public_key())
        .not_valid_before(now - timedelta(hours=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False),
        ca_name,
        ca_key,
    )
    directory.mkdir(parents=True)
    tls = Tls.in_dir(directory)
    tls.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tls


def _signed(
    builder: x509.CertificateBuilder, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    return (
        builder.issuer_name(issuer)
        .serial_number(x509.random_serial_number())
        .sign(key, hashes.SHA256())
    )

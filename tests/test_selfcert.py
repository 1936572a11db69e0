"""Self-managed TLS against the loopback fake apiserver: Secret, caBundle, files, races, loop."""

from __future__ import annotations

import asyncio
import base64
import logging
import stat
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User

from tests.fake_apiserver import FakeApiServer, RecordedRequest
from webhook import certs
from webhook.errors import CertificateError
from webhook.selfcert import (
    TLS_SECRET_TYPE,
    SelfManagedCertificates,
    SelfManagedOptions,
    ServingMaterial,
    check_material,
)

NAMESPACE = "pinhook-system"
SECRET = "pinhook-tls"
WEBHOOK_CONFIG = "pinhook"
NAMES = certs.service_dns_names("pinhook", NAMESPACE)
WRITES = ("POST", "PUT", "PATCH")

ClientFactory = Callable[[], AsyncClient]


# -- fixtures and builders -----------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    fake = FakeApiServer()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def new_client(server: FakeApiServer) -> AsyncIterator[ClientFactory]:
    """Each call is another replica's client (its own connection pool)."""
    clients: list[AsyncClient] = []

    def make() -> AsyncClient:
        # KubeConfig.from_server gives a config without a user, which lightkube 1.0 rejects.
        config = KubeConfig.from_one(cluster=Cluster(server=server.url), user=User(token="t"))
        clients.append(AsyncClient(config=config, trust_env=False))
        return clients[-1]

    yield make
    for client in clients:
        await client.close()


def _options(out_dir: Path, **overrides: Any) -> SelfManagedOptions:
    return SelfManagedOptions(out_dir=out_dir, **overrides)


def _webhook_config(*names: str, ca_bundle: str | None = None) -> dict[str, Any]:
    webhooks = []
    for name in names:
        client_config: dict[str, Any] = {
            "service": {"name": "pinhook", "namespace": NAMESPACE, "path": "/mutate"}
        }
        if ca_bundle is not None:
            client_config["caBundle"] = ca_bundle
        webhooks.append(
            {
                "name": name,
                "clientConfig": client_config,
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
            }
        )
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIG},
        "webhooks": webhooks,
    }


def _tls_secret(material: ServingMaterial) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"namespace": NAMESPACE, "name": SECRET},
        "type": TLS_SECRET_TYPE,
        "data": material.secret_data(),
    }


def _fresh_material() -> ServingMaterial:
    generated = certs.generate(NAMES, days=30)
    return ServingMaterial(generated.ca_cert_pem, generated.cert_pem, generated.key_pem)


def _crafted_material(
    *, age: timedelta, remaining: timedelta, names: list[str] = NAMES
) -> ServingMaterial:
    """A CA and leaf issued ``age`` ago that expire in ``remaining`` (certs.generate cannot
    backdate)."""
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - age)
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(certs.key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - age)
        .not_valid_after(now + remaining)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(certs.key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ServingMaterial(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=leaf.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _aging_material() -> ServingMaterial:
    """Valid now, but 300 of its 365 days are gone: in the last third of its lifetime."""
    return _crafted_material(age=timedelta(days=300), remaining=timedelta(days=65))


def _stored(server: FakeApiServer) -> ServingMaterial:
    secret = server.get("secrets", NAMESPACE, SECRET)
    assert secret is not None
    material = ServingMaterial.from_secret_data(secret["data"])
    assert material is not None
    return material


def _secret_version(server: FakeApiServer) -> str:
    secret = server.get("secrets", NAMESPACE, SECRET)
    assert secret is not None
    return str(secret["metadata"]["resourceVersion"])


def _bundles(server: FakeApiServer) -> list[str | None]:
    config = server.get("mutatingwebhookconfigurations", "", WEBHOOK_CONFIG)
    assert config is not None
    return [w["clientConfig"].get("caBundle") for w in config["webhooks"]]


def _on_disk(out_dir: Path) -> ServingMaterial:
    paths = certs.cert_paths(out_dir)
    return ServingMaterial(
        paths.ca_cert.read_bytes(), paths.cert.read_bytes(), paths.key.read_bytes()
    )


def _ca_pems(ca_pem: bytes) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.PEM) for c in _cas(ca_pem)]


def _cas(ca_pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(ca_pem)


def _verify_chain(cert_pem: bytes, ca_pem: bytes, name: str) -> None:
    """Full path validation as a TLS client would do it; raises VerificationError."""
    verifier = PolicyBuilder().store(Store(_cas(ca_pem))).build_server_verifier(x509.DNSName(name))
    verifier.verify(x509.load_pem_x509_certificate(cert_pem), [])


def _writes(server: FakeApiServer, plural: str | None = None) -> list[RecordedRequest]:
    return [
        r for r in server.requests if r.method in WRITES and (plural is None or r.plural == plural)
    ]


def _put_before(
    server: FakeApiServer,
    method: str,
    plural: str,
    make: Callable[[], dict[str, Any]],
    *,
    times: int = 1,
) -> None:
    """Before the next ``method`` on ``plural``, another writer stores ``make()``."""

    def put(_request: RecordedRequest) -> None:
        server.put(make())

    server.before(method, plural, put, times=times)


async def _eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# -- first start, reuse, renewal -----------------------------------------------------------


async def test_first_start_creates_the_secret_patches_the_bundle_and_writes_files(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_webhook_config("pin.pinhook.dev"))
    paths = await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()

    secret = server.get("secrets", NAMESPACE, SECRET)
    assert secret is not None
    assert secret["type"] == TLS_SECRET_TYPE
    assert set(secret["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    stored = _stored(server)
    assert check_material(stored, NAMES) is None
    assert len(_cas(stored.ca_pem)) == 1  # nothing to overlap with on a first start
    assert _bundles(server) == [base64.b64encode(stored.ca_pem).decode()]
    assert paths == certs.cert_paths(tmp_path)
    assert _on_disk(tmp_path) == stored
    assert stat.S_IMODE(paths.key.stat().st_mode) == 0o600
    # The files form a chain a TLS client accepts for every Service name, and only those.
    assert set(certs.load_cert_info(paths.cert.read_bytes()).dns_names) == set(NAMES)
    for name in NAMES:
        _verify_chain(paths.cert.read_bytes(), paths.ca_cert.read_bytes(), name)
    with pytest.raises(x509.verification.VerificationError):
        _verify_chain(paths.cert.read_bytes(), paths.ca_cert.read_bytes(), "other.example")
    # Created once, patched once; the create carried no resourceVersion.
    assert [(r.method, r.plural) for r in _writes(server)] == [
        ("POST", "secrets"),
        ("PATCH", "mutatingwebhookconfigurations"),
    ]


async def test_a_valid_secret_is_reused_without_any_write(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_webhook_config("pin.pinhook.dev"))
    await SelfManagedCertificates(new_client(), _options(tmp_path / "first")).ensure()
    version = _secret_version(server)
    before = len(server.requests)

    second = tmp_path / "second"
    await SelfManagedCertificates(new_client(), _options(second)).ensure()

    requests = server.requests[before:]
    assert [(r.method, r.plural) for r in requests] == [
        ("GET", "secrets"),
        ("GET", "mutatingwebhookconfigurations"),
    ]
    assert _secret_version(server) == version
    assert _on_disk(second) == _stored(server)


async def test_unchanged_files_are_not_rewritten(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    manager = SelfManagedCertificates(new_client(), _options(tmp_path))
    paths = await manager.ensure()
    stamps = [p.stat().st_ino for p in (paths.ca_cert, paths.cert, paths.key)]
    await manager.ensure()
    # ReloadingTLS reloads on a new inode or mtime; an hourly no-op must not cause one.
    assert [p.stat().st_ino for p in (paths.ca_cert, paths.cert, paths.key)] == stamps


async def test_a_secret_in_its_last_third_is_renewed_with_both_cas_trusted(
    server: FakeApiServer,
    new_client: ClientFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    old = _aging_material()
    old_version = server.put(_tls_secret(old))["metadata"]["resourceVersion"]
    server.put(_webhook_config("pin.pinhook.dev", ca_bundle=base64.b64encode(old.ca_pem).decode()))

    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()

    new = _stored(server)
    assert new.cert_pem != old.cert_pem
    assert check_material(new, NAMES) is None
    # New CA first, the outgoing one after it: replicas still serving the old leaf stay trusted.
    assert _ca_pems(new.ca_pem)[1:] == _ca_pems(old.ca_pem)
    assert _ca_pems(new.ca_pem)[0] != _ca_pems(old.ca_pem)[0]
    _verify_chain(old.cert_pem, new.ca_pem, NAMES[-1])
    _verify_chain(new.cert_pem, new.ca_pem, NAMES[-1])
    assert _bundles(server) == [base64.b64encode(new.ca_pem).decode()]
    assert _on_disk(tmp_path) == new
    # The update was conditional on the version read.
    (update,) = _writes(server, "secrets")
    assert update.method == "PUT"
    assert update.json()["metadata"]["resourceVersion"] == old_version
    # No key material in the logs, old or new, PEM or base64.
    for material in (old, new):
        key_body = material.key_pem.decode().splitlines()[1]
        assert key_body not in caplog.text
        assert base64.b64encode(material.key_pem).decode()[:40] not in caplog.text
    assert "due for renewal" in caplog.text


async def test_a_second_renewal_drops_the_oldest_ca(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    oldest, old = _aging_material(), _aging_material()
    server.put(_tls_secret(ServingMaterial(old.ca_pem + oldest.ca_pem, old.cert_pem, old.key_pem)))
    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()
    cas = _ca_pems(_stored(server).ca_pem)
    assert len(cas) == 2
    assert cas[1] == _ca_pems(old.ca_pem)[0]


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(
            lambda: _crafted_material(
                age=timedelta(days=1), remaining=timedelta(days=300), names=["other.example"]
            ),
            id="wrong-names",
        ),
        pytest.param(
            lambda: ServingMaterial(b"not a cert", b"garbage", b"garbage"), id="unparseable"
        ),
        pytest.param(
            lambda: _crafted_material(age=timedelta(days=400), remaining=-timedelta(days=1)),
            id="expired",
        ),
        pytest.param(
            lambda: ServingMaterial(
                _fresh_material().ca_pem, _fresh_material().cert_pem, _fresh_material().key_pem
            ),
            id="mismatched-parts",
        ),
    ],
)
async def test_an_unusable_secret_is_replaced(
    server: FakeApiServer,
    new_client: ClientFactory,
    tmp_path: Path,
    broken: Callable[[], ServingMaterial],
) -> None:
    bad = broken()
    assert check_material(bad, NAMES) is not None
    server.put(_tls_secret(bad))
    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()
    stored = _stored(server)
    assert check_material(stored, NAMES) is None
    assert _on_disk(tmp_path) == stored


async def test_a_secret_missing_a_key_is_replaced(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    secret = _tls_secret(_fresh_material())
    del secret["data"]["tls.key"]
    server.put(secret)
    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()
    assert check_material(_stored(server), NAMES) is None


async def test_extra_names_and_addresses_are_covered_and_required_of_a_stored_secret(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    # Made for the Service names only, as a replica without the extra names would store it.
    server.put(_tls_secret(_fresh_material()))
    options = _options(
        tmp_path, extra_dns_names=("pinhook.dev.local",), ip_addresses=("127.0.0.1", "0:0::1")
    )
    await SelfManagedCertificates(new_client(), options).ensure()

    stored = _stored(server)
    info = certs.load_cert_info(stored.cert_pem)
    assert set(info.dns_names) == {*NAMES, "pinhook.dev.local"}
    assert set(info.ips) == {"127.0.0.1", "::1"}  # one spelling per address
    problem = check_material(stored, NAMES, ip_addresses=["127.0.0.2"])
    assert problem == "tls.crt does not cover 127.0.0.2"
    assert check_material(stored, NAMES, ip_addresses=["::1"]) is None
    version = _secret_version(server)
    # A second replica with the same names adopts it.
    await SelfManagedCertificates(new_client(), options).ensure()
    assert _secret_version(server) == version


def test_an_invalid_extra_ip_is_a_certificate_error() -> None:
    config = KubeConfig.from_one(cluster=Cluster(server="http://127.0.0.1:1"), user=User(token="t"))
    client = AsyncClient(config=config, trust_env=False)
    with pytest.raises(CertificateError, match="not-an-ip"):
        SelfManagedCertificates(client, SelfManagedOptions(ip_addresses=("not-an-ip",)))


# -- races between replicas ----------------------------------------------------------------


async def test_concurrent_first_starts_converge_on_one_ca(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_webhook_config("pin.pinhook.dev"))
    # Hold both replicas' first reads until both have asked: each sees no Secret.
    barrier = asyncio.Barrier(2)

    async def both_read(_request: RecordedRequest) -> None:
        await barrier.wait()

    server.before("GET", "secrets", both_read, times=2)
    replicas = [
        SelfManagedCertificates(new_client(), _options(tmp_path / f"replica-{i}")) for i in (0, 1)
    ]
    await asyncio.gather(*(r.ensure() for r in replicas))

    stored = _stored(server)
    assert len(_cas(stored.ca_pem)) == 1
    assert _on_disk(tmp_path / "replica-0") == stored
    assert _on_disk(tmp_path / "replica-1") == stored
    assert _bundles(server) == [base64.b64encode(stored.ca_pem).decode()]
    # Both created; exactly one of them lost with AlreadyExists and adopted the winner's.
    assert server.count("secrets", method="POST") == 2
    assert server.count("secrets", method="PUT") == 0


async def test_concurrent_renewals_converge_on_one_ca(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_tls_secret(_aging_material()))
    server.put(_webhook_config("a.pinhook.dev", "b.pinhook.dev"))
    barrier = asyncio.Barrier(2)

    async def both_read(_request: RecordedRequest) -> None:
        await barrier.wait()

    server.before("GET", "secrets", both_read, times=2)
    replicas = [
        SelfManagedCertificates(new_client(), _options(tmp_path / f"replica-{i}")) for i in (0, 1)
    ]
    await asyncio.gather(*(r.ensure() for r in replicas))

    stored = _stored(server)
    assert check_material(stored, NAMES) is None
    assert _on_disk(tmp_path / "replica-0") == stored == _on_disk(tmp_path / "replica-1")
    assert set(_bundles(server)) == {base64.b64encode(stored.ca_pem).decode()}
    assert server.count("secrets", method="PUT") == 2  # one of them got 409 Conflict


async def test_create_losing_to_another_replica_adopts_its_certificate(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    winner = _fresh_material()
    _put_before(server, "POST", "secrets", lambda: _tls_secret(winner))
    server.put(_webhook_config("pin.pinhook.dev"))

    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()

    assert _stored(server) == winner
    assert _on_disk(tmp_path) == winner
    assert _bundles(server) == [base64.b64encode(winner.ca_pem).decode()]
    assert server.count("secrets", method="POST") == 1
    assert server.count("secrets", method="PUT") == 0


async def test_update_conflict_adopts_a_valid_winner(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_tls_secret(_aging_material()))
    server.put(_webhook_config("pin.pinhook.dev"))
    winner = _fresh_material()
    _put_before(server, "PUT", "secrets", lambda: _tls_secret(winner))

    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()

    assert _stored(server) == winner  # our stale update was refused with 409 Conflict
    assert _on_disk(tmp_path) == winner
    assert _bundles(server) == [base64.b64encode(winner.ca_pem).decode()]
    assert server.count("secrets", method="PUT") == 1


async def test_update_conflict_with_an_unusable_winner_retries(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_tls_secret(_aging_material()))
    other_aging = _aging_material()
    _put_before(server, "PUT", "secrets", lambda: _tls_secret(other_aging))

    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()

    stored = _stored(server)
    assert check_material(stored, NAMES) is None
    assert stored.cert_pem != other_aging.cert_pem
    # The retry overlaps with the CA it replaced: the one the other writer stored.
    assert _ca_pems(stored.ca_pem)[1:] == _ca_pems(other_aging.ca_pem)
    assert server.count("secrets", method="PUT") == 2


async def test_endless_conflicts_give_up_with_a_clear_error(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_tls_secret(_aging_material()))
    _put_before(server, "PUT", "secrets", lambda: _tls_secret(_aging_material()), times=100)
    with pytest.raises(CertificateError, match="kept changing"):
        await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()
    assert not certs.cert_paths(tmp_path).cert.exists()


async def test_a_rotation_during_our_patch_is_patched_over_again(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_webhook_config("pin.pinhook.dev"))
    rotated = _fresh_material()
    # Another replica rotates the Secret (and patches its CA) just before our patch lands:
    # our patch would leave a CA no longer in the Secret, unless we check again.
    rotated_bundle = base64.b64encode(rotated.ca_pem).decode()

    def rotate(_request: RecordedRequest) -> None:
        server.put(_tls_secret(rotated))
        server.put(_webhook_config("pin.pinhook.dev", ca_bundle=rotated_bundle))

    server.before("PATCH", "mutatingwebhookconfigurations", rotate)

    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()

    assert _stored(server) == rotated
    assert _bundles(server) == [rotated_bundle]
    assert _on_disk(tmp_path) == rotated


# -- the webhook configuration -------------------------------------------------------------


async def test_every_webhook_gets_the_bundle_and_only_stale_ones_are_patched(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_webhook_config("a.pinhook.dev", "b.pinhook.dev"))
    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()
    bundle = base64.b64encode(_stored(server).ca_pem).decode()
    assert _bundles(server) == [bundle, bundle]

    # A re-apply of the manifest reset the second webhook's caBundle.
    config = server.get("mutatingwebhookconfigurations", "", WEBHOOK_CONFIG)
    assert config is not None
    del config["webhooks"][1]["clientConfig"]["caBundle"]
    server.put(config)
    before = len(server.requests)
    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()

    assert _bundles(server) == [bundle, bundle]
    (patch,) = [r for r in server.requests[before:] if r.method == "PATCH"]
    assert patch.content_type == "application/json-patch+json"
    assert patch.json() == [
        {"op": "test", "path": "/webhooks/1/name", "value": "b.pinhook.dev"},
        {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": bundle},
    ]


async def test_webhooks_reordered_before_the_patch_are_read_again(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_webhook_config("a.pinhook.dev"))
    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()
    bundle = base64.b64encode(_stored(server).ca_pem).decode()
    # Webhook b is added without a caBundle; between our read and our patch, someone re-applies
    # the configuration with b first. A patch by index alone would set a's bundle again and
    # leave b untrusted; the name-guarded patch fails (422), is read again and lands on b.
    stale = _webhook_config("a.pinhook.dev", "b.pinhook.dev")
    stale["webhooks"][0]["clientConfig"]["caBundle"] = bundle
    server.put(stale)
    reordered = _webhook_config("b.pinhook.dev", "a.pinhook.dev")
    reordered["webhooks"][1]["clientConfig"]["caBundle"] = bundle
    _put_before(server, "PATCH", "mutatingwebhookconfigurations", lambda: reordered)
    patches = server.count("mutatingwebhookconfigurations", method="PATCH")

    await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()

    assert _bundles(server) == [bundle, bundle]
    assert server.count("mutatingwebhookconfigurations", method="PATCH") == patches + 2


async def test_a_missing_webhook_configuration_warns_and_is_patched_once_it_appears(
    server: FakeApiServer,
    new_client: ClientFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = _options(tmp_path, check_interval=3600.0, retry_interval=0.02)
    manager = SelfManagedCertificates(new_client(), options)
    paths = await manager.ensure()  # the Deployment may start before the webhook is applied
    assert paths.cert.exists()
    assert "MutatingWebhookConfiguration pinhook not found" in caplog.text

    server.put(_webhook_config("pin.pinhook.dev"))
    bundle = base64.b64encode(_stored(server).ca_pem).decode()
    task = asyncio.create_task(manager.run())
    try:
        # Far sooner than check_interval: the missing configuration is retried quickly.
        await _eventually(lambda: _bundles(server) == [bundle])
    finally:
        task.cancel()
    assert server.count("secrets", method="POST") == 1


# -- errors and the loop -------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_access_is_a_clear_certificate_error(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path, status: int
) -> None:
    server.fail_next("secrets", watch=False, status=status)
    with pytest.raises(CertificateError, match=rf"reading secret {NAMESPACE}/{SECRET} was refused"):
        await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()


async def test_refused_create_and_patch_name_the_rbac_rules(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.fail_next("secrets", watch=False, status=403, method="POST")
    with pytest.raises(CertificateError, match=r"creating secret .* refused .*pinhook-tls"):
        await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()
    server.put(_webhook_config("pin.pinhook.dev"))
    server.fail_next("mutatingwebhookconfigurations", watch=False, status=403, method="PATCH")
    with pytest.raises(CertificateError, match=r"patching the caBundle .* pinhook-webhook-ca"):
        await SelfManagedCertificates(new_client(), _options(tmp_path)).ensure()
    # Never serve a certificate the webhook does not trust yet.
    assert not certs.cert_paths(tmp_path).cert.exists()


async def test_an_unreachable_api_server_is_a_certificate_error(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    client = new_client()
    await server.close()
    with pytest.raises(CertificateError, match="cannot reach the Kubernetes API server"):
        await SelfManagedCertificates(client, _options(tmp_path)).ensure()


async def test_run_picks_up_a_rotation_by_another_replica(
    server: FakeApiServer, new_client: ClientFactory, tmp_path: Path
) -> None:
    server.put(_webhook_config("pin.pinhook.dev"))
    manager = SelfManagedCertificates(new_client(), _options(tmp_path, check_interval=0.02))
    await manager.ensure()
    rotated = _fresh_material()
    rotated_bundle = base64.b64encode(rotated.ca_pem).decode()
    server.put(_tls_secret(rotated))
    server.put(_webhook_config("pin.pinhook.dev", ca_bundle=rotated_bundle))

    task = asyncio.create_task(manager.run())
    try:
        await _eventually(lambda: _on_disk(tmp_path) == rotated)
    finally:
        task.cancel()
    assert _bundles(server) == [rotated_bundle]
    assert server.count("secrets", method="PUT") == 0  # adopted, not renewed again


async def test_run_survives_failures_and_recovers(
    server: FakeApiServer,
    new_client: ClientFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for _ in range(3):
        server.fail_next("secrets", watch=False, status=500)
    manager = SelfManagedCertificates(
        new_client(), _options(tmp_path, check_interval=0.02, retry_interval=0.02)
    )
    task = asyncio.create_task(manager.run())
    try:
        await _eventually(lambda: certs.cert_paths(tmp_path).cert.exists())
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert caplog.text.count("self-managed certificate check failed") == 3
    assert _on_disk(tmp_path) == _stored(server)


def test_invalid_options_are_rejected() -> None:
    config = KubeConfig.from_one(cluster=Cluster(server="http://127.0.0.1:1"), user=User(token="t"))
    client = AsyncClient(config=config, trust_env=False)
    with pytest.raises(CertificateError, match="days"):
        SelfManagedCertificates(client, SelfManagedOptions(days=0))
    with pytest.raises(CertificateError, match="interval"):
        SelfManagedCertificates(client, SelfManagedOptions(check_interval=0))
    with pytest.raises(CertificateError, match="non-empty"):
        SelfManagedCertificates(client, SelfManagedOptions(service=""))

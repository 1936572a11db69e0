from __future__ import annotations

import base64
import ipaddress
import socket
import ssl
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from webhook import certs
from webhook.errors import CertificateError


@pytest.fixture(scope="module")
def generated() -> certs.GeneratedCerts:
    return certs.generate(
        ["pinhook", "pinhook.pinhook-system.svc", "localhost"], ["127.0.0.1", "::1"]
    )


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_service_dns_names_lists_every_cluster_name() -> None:
    assert certs.service_dns_names("pinhook", "pinhook-system") == [
        "pinhook",
        "pinhook.pinhook-system",
        "pinhook.pinhook-system.svc",
        "pinhook.pinhook-system.svc.cluster.local",
    ]


def test_service_dns_names_rejects_empty() -> None:
    with pytest.raises(CertificateError):
        certs.service_dns_names("", "ns")


def test_leaf_is_signed_by_ca(generated: certs.GeneratedCerts) -> None:
    ca, leaf = _cert(generated.ca_cert_pem), _cert(generated.cert_pem)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert leaf.signature_hash_algorithm is not None
    # Raises InvalidSignature when the leaf was not signed by the CA's key.
    ca_key.verify(
        leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm)
    )
    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)


def test_chain_passes_a_strict_server_verifier(generated: certs.GeneratedCerts) -> None:
    ca, leaf = _cert(generated.ca_cert_pem), _cert(generated.cert_pem)
    store = Store([ca])
    for identity in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("::1"))):
        verifier = PolicyBuilder().store(store).build_server_verifier(identity)
        chain = verifier.verify(leaf, [])
        assert chain[-1] == ca
    wrong = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("example.com"))
    with pytest.raises(VerificationError):
        wrong.verify(leaf, [])


def test_ca_is_a_p256_signing_only_ca(generated: certs.GeneratedCerts) -> None:
    ca = _cert(generated.ca_cert_pem)
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert ca.subject == ca.issuer


def test_leaf_identity_and_usage(generated: certs.GeneratedCerts) -> None:
    leaf = _cert(generated.cert_pem)
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    common_names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [attr.value for attr in common_names] == ["pinhook"]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "pinhook",
        "pinhook.pinhook-system.svc",
        "localhost",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_validity_window(generated: certs.GeneratedCerts) -> None:
    leaf, ca = _cert(generated.cert_pem), _cert(generated.ca_cert_pem)
    now = datetime.now(UTC)
    assert leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(days=365)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == timedelta(days=3650)
    assert generated.not_after == leaf.not_valid_after_utc


def test_private_key_matches_leaf(generated: certs.GeneratedCerts) -> None:
    key = serialization.load_pem_private_key(generated.key_pem, password=None)
    assert key.public_key() == _cert(generated.cert_pem).public_key()
    ca_key = serialization.load_pem_private_key(generated.ca_key_pem, password=None)
    assert ca_key.public_key() == _cert(generated.ca_cert_pem).public_key()


def test_long_first_name_is_kept_out_of_the_common_name() -> None:
    long_name = "a" * 60 + ".example.com"
    leaf = _cert(certs.generate([long_name]).cert_pem)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.DNSName) == [long_name]


def test_ip_only_certificate_uses_the_ip_as_common_name() -> None:
    leaf = _cert(certs.generate([], ["10.0.0.1"]).cert_pem)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "10.0.0.1"


@pytest.mark.parametrize(
    ("names", "ips", "kwargs", "message"),
    [
        ([], [], {}, "at least one"),
        (["Bad_Name"], [], {}, "DNS name"),
        (["ok.example"], ["300.1.1.1"], {}, "IP address"),
        (["ok.example"], [], {"days": 0}, "days"),
        (["ok.example"], [], {"days": 30, "ca_days": 10}, "ca_days"),
        ("localhost", [], {}, "sequences"),
    ],
)
def test_generate_rejects_bad_input(
    names: list[str], ips: list[str], kwargs: dict[str, int], message: str
) -> None:
    with pytest.raises(CertificateError, match=message):
        certs.generate(names, ips, **kwargs)


def test_wildcard_name_is_accepted() -> None:
    info = certs.load_cert_info(certs.generate(["*.pinhook.example"]).cert_pem)
    assert info.dns_names == ("*.pinhook.example",)


def test_needs_renewal_boundaries() -> None:
    pem = certs.generate(["localhost"], days=3, ca_days=3).cert_pem
    info = certs.load_cert_info(pem)
    assert info.not_after - info.not_before == timedelta(days=3)
    renew_from = info.not_after - timedelta(days=1)
    second = timedelta(seconds=1)
    assert not certs.needs_renewal(pem, info.not_before)
    assert not certs.needs_renewal(pem, renew_from - second)
    assert certs.needs_renewal(pem, renew_from)
    assert certs.needs_renewal(pem, info.not_after)
    assert certs.needs_renewal(pem, info.not_after + second)
    # A naive datetime is read as UTC.
    assert certs.needs_renewal(pem, renew_from.replace(tzinfo=None))
    assert not certs.needs_renewal(pem, (renew_from - second).replace(tzinfo=None))
    assert not certs.needs_renewal(pem)


def test_needs_renewal_rejects_garbage() -> None:
    with pytest.raises(CertificateError, match="PEM"):
        certs.needs_renewal(b"not a certificate")


def test_load_cert_info(generated: certs.GeneratedCerts) -> None:
    info = certs.load_cert_info(generated.cert_pem)
    assert info.dns_names == ("pinhook", "pinhook.pinhook-system.svc", "localhost")
    assert info.ips == ("127.0.0.1", "::1")
    assert info.not_after == generated.not_after
    assert info.not_before < info.not_after


def test_load_cert_info_without_sans(generated: certs.GeneratedCerts) -> None:
    info = certs.load_cert_info(generated.ca_cert_pem)
    assert (info.dns_names, info.ips) == ((), ())


def test_ca_bundle_b64_round_trips(generated: certs.GeneratedCerts) -> None:
    encoded = certs.ca_bundle_b64(generated.ca_cert_pem)
    assert base64.b64decode(encoded, validate=True) == generated.ca_cert_pem
    with pytest.raises(CertificateError):
        certs.ca_bundle_b64(b"-----BEGIN NOTHING-----\n")


def test_write_creates_files_with_modes(generated: certs.GeneratedCerts, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "certs"
    paths = certs.write(generated, out)
    assert paths == certs.cert_paths(out)
    assert paths.ca_cert.read_bytes() == generated.ca_cert_pem
    assert paths.cert.read_bytes() == generated.cert_pem
    assert paths.key.read_bytes() == generated.key_pem
    assert _mode(paths.key) == 0o600
    assert _mode(paths.cert) == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]


def test_write_replaces_a_world_readable_key(
    generated: certs.GeneratedCerts, tmp_path: Path
) -> None:
    old_key = tmp_path / "tls.key"
    old_key.write_bytes(b"old")
    old_key.chmod(0o644)
    certs.write(generated, tmp_path)
    assert _mode(old_key) == 0o600
    assert old_key.read_bytes() == generated.key_pem


def test_write_reports_unwritable_directory(
    generated: certs.GeneratedCerts, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CertificateError, match="cannot create"):
        certs.write(generated, blocker / "certs")


def test_ensure_self_signed_generates_then_reuses(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    paths = certs.ensure_self_signed(out)
    first = paths.cert.read_bytes()
    assert certs.load_cert_info(first).dns_names == ("localhost",)
    assert certs.load_cert_info(first).ips == ("127.0.0.1",)
    assert _mode(paths.key) == 0o600
    assert certs.ensure_self_signed(out) == paths
    assert paths.cert.read_bytes() == first


def _leaf_signed_by(
    generated: certs.GeneratedCerts, not_before: datetime, not_after: datetime
) -> tuple[bytes, bytes]:
    """A localhost leaf with a chosen validity, signed by the CA of ``generated``."""
    ca = _cert(generated.ca_cert_pem)
    ca_key = serialization.load_pem_private_key(generated.ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return leaf.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.mark.parametrize(
    ("start", "end"),
    [
        pytest.param(timedelta(days=-30), timedelta(days=-1), id="expired"),
        pytest.param(timedelta(days=-25), timedelta(days=5), id="last-third"),
        pytest.param(timedelta(days=1), timedelta(days=30), id="not-yet-valid"),
    ],
)
def test_ensure_self_signed_regenerates_stale_certificates(
    tmp_path: Path, start: timedelta, end: timedelta
) -> None:
    paths = certs.ensure_self_signed(tmp_path)
    first_ca = paths.ca_cert.read_bytes()
    generated = certs.generate(["localhost"], ["127.0.0.1"])
    now = datetime.now(UTC)
    stale_cert, stale_key = _leaf_signed_by(generated, now + start, now + end)
    paths.ca_cert.write_bytes(generated.ca_cert_pem)
    paths.cert.write_bytes(stale_cert)
    paths.key.write_bytes(stale_key)

    certs.ensure_self_signed(tmp_path)

    fresh = paths.cert.read_bytes()
    assert fresh != stale_cert
    assert paths.ca_cert.read_bytes() not in (generated.ca_cert_pem, first_ca)
    assert not certs.needs_renewal(fresh)


def test_ensure_self_signed_reuses_a_sound_foreign_certificate(tmp_path: Path) -> None:
    generated = certs.generate(["localhost"], ["127.0.0.1"])
    now = datetime.now(UTC)
    sound_cert, sound_key = _leaf_signed_by(
        generated, now - timedelta(days=1), now + timedelta(days=30)
    )
    paths = certs.cert_paths(tmp_path)
    paths.ca_cert.write_bytes(generated.ca_cert_pem)
    paths.cert.write_bytes(sound_cert)
    paths.key.write_bytes(sound_key)
    certs.ensure_self_signed(tmp_path)
    assert paths.cert.read_bytes() == sound_cert


@pytest.mark.parametrize("broken", ["missing-key", "garbage-cert", "wrong-key", "wrong-ca"])
def test_ensure_self_signed_regenerates_unusable_files(tmp_path: Path, broken: str) -> None:
    paths = certs.ensure_self_signed(tmp_path)
    before = paths.cert.read_bytes()
    other = certs.generate(["localhost"], ["127.0.0.1"])
    if broken == "missing-key":
        paths.key.unlink()
    elif broken == "garbage-cert":
        paths.cert.write_bytes(b"garbage")
    elif broken == "wrong-key":
        paths.key.write_bytes(other.key_pem)
    else:
        paths.ca_cert.write_bytes(other.ca_cert_pem)

    certs.ensure_self_signed(tmp_path)

    after = paths.cert.read_bytes()
    assert after != before
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert key.public_key() == _cert(after).public_key()
    _cert(after).verify_directly_issued_by(_cert(paths.ca_cert.read_bytes()))


def test_ensure_self_signed_keeps_certificates_made_for_other_names(tmp_path: Path) -> None:
    # `pinhook certs generate` for the Service names, then `pinhook serve`: keep them.
    names = certs.service_dns_names("pinhook", "pinhook-system")
    written = certs.write(certs.generate(names, ["10.0.0.7"]), tmp_path)
    before = written.cert.read_bytes()
    assert certs.ensure_self_signed(tmp_path) == written
    assert written.cert.read_bytes() == before


def test_ensure_self_signed_generates_for_the_given_names(tmp_path: Path) -> None:
    paths = certs.ensure_self_signed(
        tmp_path, dns_names=("localhost", "pinhook.test"), ip_addresses=("127.0.0.1", "::1")
    )
    info = certs.load_cert_info(paths.cert.read_bytes())
    assert info.dns_names == ("localhost", "pinhook.test")
    assert info.ips == ("127.0.0.1", "::1")


def test_ensure_self_signed_reports_an_unusable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CertificateError, match="cannot create certificate directory"):
        certs.ensure_self_signed(blocker / "certs")


def test_write_failure_names_the_file_and_leaves_no_temporary(
    generated: certs.GeneratedCerts, tmp_path: Path
) -> None:
    (tmp_path / "tls.key").mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(CertificateError, match=r"cannot write .*tls\.key"):
        certs.write(generated, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "tls.key"]


class _OneShotTLSServer:
    """Accepts TLS connections on 127.0.0.1 and answers b"ok" once a handshake succeeds."""

    def __init__(self, paths: certs.CertPaths) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(paths.cert, paths.key)
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> _OneShotTLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # On Linux close() alone does not wake a thread blocked in accept(); shutdown() does.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with conn:
                try:
                    with self._context.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError) as exc:
                    self.errors.append(exc)


def _client_context(ca_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    # Strict RFC 5280 checks, as Python 3.13 enables by default and Go applies anyway.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _fetch(port: int, context: ssl.SSLContext, server_hostname: str) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        return tls.recv(2)


def test_tls_handshake_verifies_against_the_ca(tmp_path: Path) -> None:
    paths = certs.ensure_self_signed(tmp_path)
    context = _client_context(paths.ca_cert)
    with _OneShotTLSServer(paths) as server:
        assert _fetch(server.port, context, "localhost") == b"ok"
        assert _fetch(server.port, context, "127.0.0.1") == b"ok"
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            _fetch(server.port, context, "pinhook.example")
    # The server saw the client abort the third handshake, and only that one.
    assert len(server.errors) == 1


def test_tls_handshake_fails_against_another_ca(tmp_path: Path) -> None:
    paths = certs.ensure_self_signed(tmp_path / "served")
    stranger = certs.write(certs.generate(["localhost"]), tmp_path / "stranger")
    with (
        _OneShotTLSServer(paths) as server,
        pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"),
    ):
        _fetch(server.port, _client_context(stranger.ca_cert), "localhost")

"""Serving certificates for the webhook: a small private CA and a leaf signed by it.

The Kubernetes API server only talks to a webhook over TLS and verifies the serving
certificate against the ``caBundle`` of the webhook configuration, by Subject Alternative
Name (Go ignores the Common Name). Files use the names of a ``kubernetes.io/tls`` Secret
as cert-manager writes it (``ca.crt``, ``tls.crt``, ``tls.key``), so one directory layout
serves development, self-managed and cert-manager deployments.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CertificateError

CA_CERT_FILE = "ca.crt"
CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"

# Certificates start a little in the past so that an API server whose clock is slightly
# behind ours does not reject a certificate that was generated a moment ago.
_CLOCK_SKEW = timedelta(minutes=5)
_CA_COMMON_NAME = "pinhook self-signed CA"
# X.509 caps the Common Name at 64 characters; longer names live only in the SANs.
_MAX_COMMON_NAME = 64
_DNS_NAME = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_MAX_DNS_NAME = 253


@dataclass(frozen=True, slots=True)
class CertPaths:
    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class GeneratedCerts:
    ca_cert_pem: bytes
    ca_key_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    not_after: datetime


@dataclass(frozen=True, slots=True)
class CertInfo:
    not_before: datetime
    not_after: datetime
    dns_names: tuple[str, ...]
    ips: tuple[str, ...]


def cert_paths(out: Path) -> CertPaths:
    """The three file paths inside a certificate directory."""
    return CertPaths(ca_cert=out / CA_CERT_FILE, cert=out / CERT_FILE, key=out / KEY_FILE)


def service_dns_names(service: str, namespace: str) -> list[str]:
    """Every name by which a Service is reached in cluster DNS, shortest first."""
    if not service or not namespace:
        raise CertificateError("service and namespace must both be non-empty")
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def generate(
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    *,
    days: int = 365,
    ca_days: int = 3650,
) -> GeneratedCerts:
    """Create a fresh CA and a serving certificate for ``dns_names`` and ``ip_addresses``."""
    if isinstance(dns_names, str) or isinstance(ip_addresses, str):
        raise CertificateError("dns_names and ip_addresses must be sequences, not strings")
    names = [_checked_dns_name(name) for name in dns_names]
    ips = [_checked_ip(ip) for ip in ip_addresses]
    if not names and not ips:
        raise CertificateError("a serving certificate needs at least one DNS name or IP address")
    if days < 1:
        raise CertificateError(f"days must be at least 1, got {days}")
    if ca_days < days:
        raise CertificateError(f"ca_days ({ca_days}) must not be shorter than days ({days})")

    start = datetime.now(UTC) - _CLOCK_SKEW
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _build_ca(ca_key, start, start + timedelta(days=ca_days))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_leaf(key, ca_key, ca_cert, names, ips, start, start + timedelta(days=days))
    return GeneratedCerts(
        ca_cert_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        ca_key_pem=_private_pem(ca_key),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=_private_pem(key),
        not_after=cert.not_valid_after_utc,
    )


def write(certs: GeneratedCerts, out: Path) -> CertPaths:
    """Write ``ca.crt``, ``tls.key`` and ``tls.crt`` into ``out``, each atomically.

    The CA key is not written: nothing here signs again, a renewal makes a new CA.
    ``tls.crt`` is written last so that a reader that reloads when it changes finds the
    matching key already in place.
    """
    paths = cert_paths(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CertificateError(f"cannot create certificate directory {out}: {exc}") from exc
    _write_atomic(paths.ca_cert, certs.ca_cert_pem, mode=0o644)
    _write_atomic(paths.key, certs.key_pem, mode=0o600)
    _write_atomic(paths.cert, certs.cert_pem, mode=0o644)
    return paths


def ensure_self_signed(
    out: Path,
    *,
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
) -> CertPaths:
    """Reuse the certificates in ``out`` while they are sound, else generate new ones.

    Sound means: all three files readable, the key belongs to the certificate, the
    certificate is signed by ``ca.crt``, is valid now and is not in the last third of its
    lifetime. The names are used only when generating: certificates made for other names
    (``pinhook certs generate``, a mounted cert-manager Secret) are kept, not overwritten.
    """
    paths = cert_paths(out)
    if _reusable(paths):
        return paths
    return write(generate(dns_names, ip_addresses), out)


def ca_bundle_b64(ca_pem: bytes) -> str:
    """The base64 text for ``clientConfig.caBundle`` of a webhook configuration."""
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise CertificateError(f"CA bundle is not PEM-encoded certificates: {exc}") from exc
    return base64.b64encode(ca_pem).decode("ascii")


def needs_renewal(cert_pem: bytes, now: datetime | None = None) -> bool:
    """True when the certificate has expired or is in the last third of its lifetime."""
    cert = _load_cert(cert_pem)
    moment = _aware(now) if now is not None else datetime.now(UTC)
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    renew_from = not_after - (not_after - not_before) / 3
    return moment >= renew_from


def load_cert_info(cert_pem: bytes) -> CertInfo:
    """Validity window and Subject Alternative Names of the first certificate in the PEM."""
    cert = _load_cert(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return CertInfo(cert.not_valid_before_utc, cert.not_valid_after_utc, (), ())
    return CertInfo(
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        dns_names=tuple(san.get_values_for_type(x509.DNSName)),
        ips=tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    )


def _build_ca(key: ec.EllipticCurvePrivateKey, start: datetime, end: datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_COMMON_NAME)])
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(start)
        .not_valid_after(end)
        # path_length=0: this CA signs serving certificates, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _build_leaf(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns_names: Sequence[str],
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    start: datetime,
    end: datetime,
) -> x509.Certificate:
    first_name = dns_names[0] if dns_names else str(ips[0])
    subject = (
        [x509.NameAttribute(NameOID.COMMON_NAME, first_name)]
        if len(first_name) <= _MAX_COMMON_NAME
        else []
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    alt_names += [x509.IPAddress(ip) for ip in ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # An empty subject makes the SAN extension the only identity, so it must be critical.
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=not subject)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """Key usage of a CA (``cert_sign``) or of a serving certificate."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _serial() -> int:
    # 159 random bits: positive and within the 20 octets RFC 5280 allows.
    return secrets.randbits(159) | 1


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _checked_dns_name(name: str) -> str:
    if len(name) > _MAX_DNS_NAME or not _DNS_NAME.fullmatch(name):
        raise CertificateError(f"not a valid lower-case DNS name for a certificate: {name!r}")
    return name


def _checked_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise CertificateError(f"not a valid IP address for a certificate: {text!r}") from exc


def _load_cert(cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertificateError(f"not a PEM-encoded X.509 certificate: {exc}") from exc


def _aware(moment: datetime) -> datetime:
    # A naive datetime is taken as UTC, the way cryptography reports validity.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # O_EXCL with the final mode: the key is never readable by others, not even briefly.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CertificateError(f"cannot write {path}: {exc}") from exc


def _reusable(paths: CertPaths) -> bool:
    try:
        ca_pem = paths.ca_cert.read_bytes()
        cert_pem = paths.cert.read_bytes()
        key_pem = paths.key.read_bytes()
    except OSError:
        return False
    try:
        cert = _load_cert(cert_pem)
        ca_cert = _load_cert(ca_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (CertificateError, ValueError, TypeError):
        return False
    now = datetime.now(UTC)
    return (
        key.public_key() == cert.public_key()
        and _signed_by(cert, ca_cert)
        and cert.not_valid_before_utc <= now
        and not needs_renewal(cert_pem, now)
        and not needs_renewal(ca_pem, now)
    )


def _signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True

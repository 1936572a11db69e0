"""A Docker-style token issuer on loopback, trusted by the test registry.

It signs ES256 JWTs the way distribution 2.8 checks them: ``iss``, a single-string ``aud``,
``exp``/``nbf``/``iat``, an ``access`` list, an ``x5c`` header naming a certificate from the
registry's ``rootcertbundle``, and a raw ``r||s`` signature.

Besides the GET token request it takes the OAuth2 form POST of distribution's ``oauth.md``
with ``grant_type=refresh_token``, for refresh tokens it issued (:meth:`TokenIssuer.
issue_refresh_token`), and a refresh token as the Basic password of a GET (as ACR does). With
``rotate`` each exchange hands out a new refresh token and retires the one used; with
``post_status`` the POST answers that status instead, like a token service that takes no POST.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.harness.wire import OneWriteHandler

DEFAULT_SERVICE = "pinhook-test-registry"
DEFAULT_ISSUER = "pinhook-test-issuer"


@dataclass(frozen=True)
class Access:
    """One entry of a token's ``access`` claim."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, object]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class TokenRequest:
    """What a client asked the issuer for."""

    service: str | None
    scopes: tuple[str, ...]
    username: str | None
    status: int
    method: str = "GET"
    grant_type: str | None = None  # POST only
    client_id: str | None = None  # POST only
    refresh_token: str | None = None  # the one presented (POST form or GET Basic password)


@dataclass
class _Log:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[TokenRequest] = field(default_factory=list)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_scope(scope: str) -> Access | None:
    """``repository:NAME:pull,push``; the name may contain one ``:`` (a port)."""
    kind, _, rest = scope.partition(":")
    name, sep, actions = rest.rpartition(":")
    if not kind or not sep or not name:
        return None
    return Access(kind, name, tuple(a for a in actions.split(",") if a))


def _self_signed_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pinhook test token signer")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


class TokenIssuer:
    """Issue tokens at ``{url}/token``; a context manager running a server thread.

    ``username``/``password`` are the only accepted Basic credentials. Anonymous requests get
    pull-only tokens when ``allow_anonymous``, else 401. ``expires_in=None`` leaves the field
    out of the answer (as ghcr.io does).
    """

    def __init__(
        self,
        *,
        username: str = "bob",
        password: str = "builder",
        allow_anonymous: bool = False,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        expires_in: int | None = 300,
    ) -> None:
        self.username = username
        self.password = password
        self.allow_anonymous = allow_anonymous
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = _self_signed_certificate(self._key)
        self._log = _Log()
        self._refresh_tokens: dict[str, str] = {}  # valid refresh token -> subject
        self.rotate = False
        self.post_status: int | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("token issuer is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write_rootcertbundle(self, path: Path) -> Path:
        path.write_bytes(self.certificate_pem())
        return path

    @property
    def request_count(self) -> int:
        with self._log.lock:
            return len(self._log.requests)

    @property
    def requests(self) -> list[TokenRequest]:
        with self._log.lock:
            return list(self._log.requests)

    def reset_counts(self) -> None:
        with self._log.lock:
            self._log.requests.clear()

    def issue_refresh_token(self, subject: str = "") -> str:
        """A refresh token (docker's identity token) the issuer accepts for ``subject``."""
        token = f"refresh-{secrets.token_hex(12)}"
        with self._log.lock:
            self._refresh_tokens[token] = subject or self.username
        return token

    def refresh_token_valid(self, token: str) -> bool:
        with self._log.lock:
            return token in self._refresh_tokens

    @contextmanager
    def oauth(self, *, rotate: bool = False, post_status: int | None = None) -> Iterator[None]:
        """Change how refresh tokens are handled, for one test (the issuer is shared)."""
        self.rotate, self.post_status = rotate, post_status
        try:
            yield
        finally:
            self.rotate, self.post_status = False, None

    def __enter__(self) -> TokenIssuer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.02,), name="token-issuer", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def mint(
        self,
        access: Sequence[Access],
        *,
        subject: str = "",
        audience: str | None = None,
        lifetime_s: int | None = None,
        not_before: float | None = None,
    ) -> str:
        """A signed JWT; tests may mint expired or foreign-audience tokens directly."""
        now = int(time.time())
        lifetime = lifetime_s if lifetime_s is not None else (self.expires_in or 60)
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience if audience is not None else self.service,
            "exp": now + lifetime,
            "nbf": int(not_before) if not_before is not None else now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [entry.claim() for entry in access],
        }
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [
                base64.b64encode(self.certificate.public_bytes(serialization.Encoding.DER)).decode()
            ],
        }
        signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}".encode()
        der = self._key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input.decode()}.{b64url(signature)}"

    def answer(
        self, authorization: str | None, service: str | None, scopes: list[str]
    ) -> tuple[int, dict[str, object]]:
        """Status and JSON body for one GET token request; records it."""
        username, authenticated, presented = self._check_basic(authorization)
        if not authenticated and not (self.allow_anonymous and username is None):
            self._record(
                TokenRequest(service, tuple(scopes), username, 401, "GET", None, None, presented)
            )
            return 401, {"details": "incorrect username or password"}
        body = self._token_body(scopes, username)
        if presented is not None:
            body.update(self._rotate(presented))
        self._record(
            TokenRequest(service, tuple(scopes), username, 200, "GET", None, None, presented)
        )
        return 200, body

    def answer_oauth(self, form: dict[str, str]) -> tuple[int, dict[str, object]]:
        """Status and JSON body for one OAuth2 POST; records it."""
        grant, presented = form.get("grant_type"), form.get("refresh_token")
        scopes = [s for s in form.get("scope", "").split(" ") if s]
        status, body = self._oauth(grant, presented, scopes)
        self._record(
            TokenRequest(
                form.get("service"),
                tuple(scopes),
                None,
                status,
                "POST",
                grant,
                form.get("client_id"),
                presented,
            )
        )
        return status, body

    def _oauth(
        self, grant: str | None, presented: str | None, scopes: list[str]
    ) -> tuple[int, dict[str, object]]:
        if self.post_status is not None:
            return self.post_status, {"details": "no OAuth2 here"}
        if grant != "refresh_token":
            return 400, {"error": "unsupported_grant_type"}
        with self._log.lock:
            subject = self._refresh_tokens.get(presented or "")
        if subject is None:
            return 400, {"error": "invalid_grant"}
        body = self._token_body(scopes, subject)
        body.pop("token")  # the OAuth2 answer names it access_token only
        body["scope"] = " ".join(scopes)
        body.update(self._rotate(presented or ""))
        return 200, body

    def _token_body(self, scopes: list[str], username: str | None) -> dict[str, object]:
        granted = [self._grant(scope, anonymous=username is None) for scope in scopes]
        token = self.mint([a for a in granted if a is not None], subject=username or "")
        body: dict[str, object] = {
            "token": token,
            "access_token": token,
            "issued_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        }
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return body

    def _rotate(self, used: str) -> dict[str, object]:
        """With ``rotate``, a new refresh token replaces the one used."""
        if not self.rotate:
            return {}
        with self._log.lock:
            subject = self._refresh_tokens.pop(used)
        return {"refresh_token": self.issue_refresh_token(subject)}

    def _grant(self, scope: str, *, anonymous: bool) -> Access | None:
        access = parse_scope(scope)
        if access is None or not anonymous:
            return access
        return Access(access.type, access.name, tuple(a for a in access.actions if a == "pull"))

    def _check_basic(self, authorization: str | None) -> tuple[str | None, bool, str | None]:
        """Username, whether accepted, and the refresh token if one was the password."""
        if not authorization or not authorization.lower().startswith("basic "):
            return None, False, None
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return "", False, None
        user, _, password = decoded.partition(":")
        if self.refresh_token_valid(password):
            return user, True, password
        return user, (user == self.username and password == self.password), None

    def _record(self, request: TokenRequest) -> None:
        with self._log.lock:
            self._log.requests.append(request)


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _handler_for(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class TokenHandler(OneWriteHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != "/token":
                self._reply(404, {"details": "not found"})
                return
            query = parse_qs(url.query)
            service = query.get("service", [None])[0]
            status, body = issuer.answer(
                self.headers.get("Authorization"), service, query.get("scope", [])
            )
            headers = {"WWW-Authenticate": 'Basic realm="pinhook-test-issuer"'}
            self._reply(status, body, headers if status == 401 else {})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            if urlsplit(self.path).path != "/token":
                self._reply(404, {"details": "not found"})
                return
            self._reply(*issuer.answer_oauth(form))

        def _reply(
            self, status: int, body: dict[str, object], headers: dict[str, str] | None = None
        ) -> None:
            content = {"Content-Type": "application/json", **(headers or {})}
            self.answer(status, content, _json(body))

        def log_message(self, format: str, *args: Any) -> None:
            pass  # pytest output stays readable; requests are recorded on the issuer

    return TokenHandler

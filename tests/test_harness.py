"""The test harness itself: a real registry, real auth, a real token issuer, a real proxy."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import socketserver
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.harness.fixtures import SKIP_ENV, RegistryEnv, docker_config, require_registry
from tests.harness.proxy import CannedResponse, CountingProxy, ProxiedRequest
from tests.harness.push import (
    ACCEPT_ALL,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    parse_challenge,
    push_image,
    sha256_digest,
)
from tests.harness.registry import (
    RegistryStartError,
    RunningRegistry,
    TokenAuthSettings,
    bcrypt_hash,
)
from tests.harness.tokens import Access, TokenIssuer, parse_scope


def _repo() -> str:
    return f"harness/{uuid.uuid4().hex[:12]}"


def _head(
    url: str,
    repo: str,
    ref: str,
    *,
    auth: tuple[str, str] | None = None,
    bearer: str | None = None,
) -> httpx.Response:
    headers = {"Accept": ACCEPT_ALL}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    return httpx.head(f"{url}/v2/{repo}/manifests/{ref}", headers=headers, auth=auth)


def test_anonymous_head_of_index_gives_pushed_digest(registry: RegistryEnv) -> None:
    repo = _repo()
    pushed = registry.push.index(repo, "v1")

    response = _head(registry.url, repo, "v1")

    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == pushed.digest
    assert response.headers["Content-Type"] == OCI_INDEX
    assert int(response.headers["Content-Length"]) == len(pushed.manifest)
    assert pushed.digest == sha256_digest(pushed.manifest)
    assert len(pushed.manifest_digests) == 2
    assert pushed.tag_ref == f"{registry.host}/{repo}:v1"


@pytest.mark.parametrize(
    ("kind", "media_type"),
    [("image", OCI_MANIFEST), ("image", DOCKER_MANIFEST), ("index", DOCKER_LIST)],
)
def test_each_manifest_kind_round_trips(registry: RegistryEnv, kind: str, media_type: str) -> None:
    repo = _repo()
    push = registry.push.image if kind == "image" else registry.push.index
    pushed = push(repo, "t", media_type)

    response = httpx.get(f"{registry.url}/v2/{repo}/manifests/t", headers={"Accept": ACCEPT_ALL})

    assert response.headers["Content-Type"] == media_type
    assert response.content == pushed.manifest
    assert response.headers["Docker-Content-Digest"] == pushed.digest


def test_platform_manifests_are_pullable_by_digest(registry: RegistryEnv) -> None:
    repo = _repo()
    pushed = registry.push.index(repo, "multi")

    for digest in pushed.manifest_digests:
        response = _head(registry.url, repo, digest)
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.headers["Content-Type"] == OCI_MANIFEST


def test_move_tag_and_delete(registry: RegistryEnv) -> None:
    repo = _repo()
    first = registry.push.index(repo, "moving")
    second = registry.push.move_tag(first)
    assert second.digest != first.digest
    assert _head(registry.url, repo, "moving").headers["Docker-Content-Digest"] == second.digest

    registry.push.tag(first, "moving")
    assert _head(registry.url, repo, "moving").headers["Docker-Content-Digest"] == first.digest

    registry.push.delete(first)
    assert _head(registry.url, repo, first.digest).status_code == 404


def test_registry_access_log_counts_manifest_requests(registry: RegistryEnv) -> None:
    repo = _repo()
    registry.push.image(repo, "counted")
    before = registry.count_requests("HEAD", f"/v2/{repo}/manifests/")

    for _ in range(3):
        _head(registry.url, repo, "counted")

    assert registry.count_requests("HEAD", f"/v2/{repo}/manifests/") == before + 3
    assert registry.count_requests("PUT", f"/v2/{repo}/manifests/counted") == 1
    assert "response completed" in registry.registry.logs()


def test_htpasswd_rejects_anonymous_with_basic_challenge(basic_registry: RegistryEnv) -> None:
    response = httpx.get(f"{basic_registry.url}/v2/")

    assert response.status_code == 401
    assert parse_challenge(response.headers["WWW-Authenticate"])["scheme"] == "basic"


def test_htpasswd_accepts_alice_and_rejects_wrong_password(basic_registry: RegistryEnv) -> None:
    repo = _repo()
    pushed = basic_registry.push.index(repo, "v1")

    good = _head(basic_registry.url, repo, "v1", auth=("alice", "wonderland"))
    bad = _head(basic_registry.url, repo, "v1", auth=("alice", "looking-glass"))

    assert good.headers["Docker-Content-Digest"] == pushed.digest
    assert bad.status_code == 401


def test_token_registry_challenges_with_bearer_realm(token_registry: RegistryEnv) -> None:
    repo = _repo()
    response = _head(token_registry.url, repo, "v1")

    challenge = parse_challenge(response.headers["WWW-Authenticate"])
    assert response.status_code == 401
    assert token_registry.issuer is not None
    assert challenge["scheme"] == "bearer"
    assert challenge["realm"] == token_registry.issuer.realm
    assert challenge["service"] == token_registry.issuer.service
    assert challenge["scope"] == f"repository:{repo}:pull"


def test_token_from_issuer_opens_the_registry(token_registry: RegistryEnv) -> None:
    issuer = token_registry.issuer
    assert issuer is not None
    repo = _repo()
    pushed = token_registry.push.index(repo, "v1")
    before = issuer.request_count

    answer = httpx.get(
        issuer.realm,
        params={"service": issuer.service, "scope": f"repository:{repo}:pull"},
        auth=("bob", "builder"),
    )
    body = answer.json()
    response = _head(token_registry.url, repo, "v1", bearer=body["token"])

    assert answer.status_code == 200
    assert body["access_token"] == body["token"]
    assert body["expires_in"] == 300
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == pushed.digest
    assert issuer.request_count == before + 1
    assert issuer.requests[-1].scopes == (f"repository:{repo}:pull",)


def test_token_claims_follow_distribution_rules(token_registry: RegistryEnv) -> None:
    issuer = token_registry.issuer
    assert issuer is not None
    token = issuer.mint([Access("repository", "a/b", ("pull",))])
    header_b64, claims_b64, signature_b64 = token.split(".")

    def decode(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    header, claims = json.loads(decode(header_b64)), json.loads(decode(claims_b64))
    assert header["alg"] == "ES256"
    assert len(header["x5c"]) == 1
    assert claims["aud"] == issuer.service
    assert claims["iss"] == issuer.issuer
    assert claims["access"] == [{"type": "repository", "name": "a/b", "actions": ["pull"]}]
    assert len(decode(signature_b64)) == 64


def test_token_for_another_repository_is_refused(token_registry: RegistryEnv) -> None:
    issuer = token_registry.issuer
    assert issuer is not None
    repo = _repo()
    token_registry.push.image(repo, "v1")
    wrong = issuer.mint([Access("repository", "someone/else", ("pull",))])
    expired = issuer.mint([Access("repository", repo, ("pull",))], lifetime_s=-120, not_before=0)

    for token in (wrong, expired):
        response = _head(token_registry.url, repo, "v1", bearer=token)
        assert response.status_code == 401


def test_issuer_rejects_bad_password_and_anonymous(token_registry: RegistryEnv) -> None:
    issuer = token_registry.issuer
    assert issuer is not None
    params = {"service": issuer.service, "scope": "repository:x/y:pull"}

    bad = httpx.get(issuer.realm, params=params, auth=("bob", "wrong"))
    anonymous = httpx.get(issuer.realm, params=params)

    assert bad.status_code == 401
    assert anonymous.status_code == 401
    assert issuer.requests[-1].status == 401


def test_parse_scope_keeps_port_in_name() -> None:
    assert parse_scope("repository:127.0.0.1:5000/a/b:pull,push") == Access(
        "repository", "127.0.0.1:5000/a/b", ("pull", "push")
    )


def test_proxy_counts_and_forwards_head_and_get(
    registry: RegistryEnv, registry_proxy: CountingProxy
) -> None:
    repo = _repo()
    pushed = registry.push.index(repo, "v1")

    with httpx.Client(base_url=registry_proxy.url) as client:
        heads = [
            client.head(f"/v2/{repo}/manifests/v1", headers={"Accept": ACCEPT_ALL})
            for _ in range(3)
        ]
        got = client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": ACCEPT_ALL})

    assert all(h.headers["Docker-Content-Digest"] == pushed.digest for h in heads)
    assert all(h.headers["Content-Length"] == str(len(pushed.manifest)) for h in heads)
    assert got.content == pushed.manifest
    assert registry_proxy.count("HEAD", f"/v2/{repo}/manifests/v1") == 3
    assert registry_proxy.count("GET", "/manifests/") == 1
    assert registry.count_requests("HEAD", f"/v2/{repo}/manifests/v1") == 3


def test_proxy_can_push_through_and_rewrites_nothing(registry: RegistryEnv) -> None:
    repo = _repo()
    with CountingProxy(registry.url) as proxy, httpx.Client(base_url=proxy.url) as client:
        pushed = push_image(client, repo, "via-proxy")
        assert pushed.host == proxy.host
        assert proxy.count("PUT", "/blobs/uploads/") == 2

    direct = _head(registry.url, repo, "via-proxy")
    assert direct.headers["Docker-Content-Digest"] == pushed.digest


def test_proxy_hold_keeps_concurrent_callers_in_flight(
    registry: RegistryEnv, registry_proxy: CountingProxy
) -> None:
    repo = _repo()
    pushed = registry.push.image(repo, "v1")
    results: list[str] = []
    registry_proxy.hold()

    def call() -> None:
        response = _head(registry_proxy.url, repo, "v1")
        results.append(response.headers["Docker-Content-Digest"])

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    assert registry_proxy.wait_for_count(20, "HEAD", repo) == 20
    assert results == []
    registry_proxy.release()
    for thread in threads:
        thread.join(timeout=10)

    assert results == [pushed.digest] * 20


def test_proxy_interceptor_and_header_stripping(registry: RegistryEnv) -> None:
    repo = _repo()
    registry.push.image(repo, "v1")

    def too_many(request: ProxiedRequest) -> CannedResponse | None:
        if request.method == "GET":
            return CannedResponse(429, {"Retry-After": "1"})
        return None

    with CountingProxy(
        registry.url, interceptor=too_many, strip_response_headers=["Docker-Content-Digest"]
    ) as proxy:
        head = _head(proxy.url, repo, "v1")
        get = httpx.get(f"{proxy.url}/v2/{repo}/manifests/v1")

    assert head.status_code == 200
    assert "Docker-Content-Digest" not in head.headers
    assert get.status_code == 429
    assert get.headers["Retry-After"] == "1"


def test_docker_config_file_format(tmp_path: Path, basic_registry: RegistryEnv) -> None:
    assert basic_registry.credentials is not None
    path = docker_config(tmp_path, {basic_registry.host: basic_registry.credentials})

    auths = json.loads(path.read_text())["auths"]
    user, password = base64.b64decode(auths[basic_registry.host]["auth"]).decode().split(":", 1)
    response = httpx.get(f"{basic_registry.url}/v2/", auth=(user, password))
    assert response.status_code == 200


def test_bearer_auth_reuses_one_token_per_repository(token_registry: RegistryEnv) -> None:
    issuer = token_registry.issuer
    assert issuer is not None
    repo = _repo()
    before = issuer.request_count
    token_registry.push.image(repo, "v1")
    after_push = issuer.request_count

    for _ in range(3):
        assert token_registry.push.head(repo, "v1").status_code == 200

    assert issuer.request_count == after_push
    [token_request] = issuer.requests[before:after_push]
    [scope] = token_request.scopes
    access = parse_scope(scope)
    assert token_request.username == "bob"
    assert access is not None
    assert access.name == repo
    assert set(access.actions) == {"pull", "push"}  # the registry's order varies


def test_missing_registry_binary_fails_naming_the_script(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(SKIP_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception, match="scripts/ensure-packages"):
        require_registry()

    monkeypatch.setenv(SKIP_ENV, "1")
    with pytest.raises(pytest.skip.Exception, match="scripts/ensure-packages"):
        require_registry()


def test_registry_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    require_registry()
    settings = TokenAuthSettings("http://127.0.0.1:9/token", "s", "i", tmp_path / "missing.pem")

    with pytest.raises(RegistryStartError, match=r"root certificate bundle"):
        RunningRegistry("token", token=settings).start()


def test_bcrypt_hash_is_accepted_format() -> None:
    hashed = bcrypt_hash("wonderland")
    assert hashed.startswith(("$2b$", "$2y$"))
    assert len(hashed) == 60


class _Writes:
    """Every write a harness server makes to its clients, with the socket's TCP_NODELAY."""

    def __init__(self, server: socketserver.BaseServer) -> None:
        self.seen: list[tuple[bytes, int]] = []
        seen = self.seen
        base = server.RequestHandlerClass

        class Recording(base):  # type: ignore[valid-type,misc]
            def setup(self) -> None:
                super().setup()
                nodelay = self.connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                real = self.wfile

                class Writer(io.RawIOBase):
                    def writable(self) -> bool:
                        return True

                    def write(self, data: Any) -> int:
                        seen.append((bytes(data), nodelay))  # before the client can see it
                        return int(real.write(data) or len(data))

                self.wfile = Writer()

        server.RequestHandlerClass = Recording


def _exchange(url: str, method: str, path: str) -> tuple[int, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        connection.request(method, path, headers={"Accept": ACCEPT_ALL})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_token_issuer_sends_each_answer_in_one_write_without_nagle() -> None:
    with TokenIssuer(allow_anonymous=True) as issuer:
        # The harness's own server object: the handler class is what is under test.
        writes = _Writes(issuer._server)  # type: ignore[arg-type]
        status, body = _exchange(issuer.url, "GET", "/token?scope=repository:a/b:pull")
        missing, _ = _exchange(issuer.url, "GET", "/nothing")

    assert (status, missing) == (200, 404)
    assert len(writes.seen) == 2
    whole, nodelay = writes.seen[0]
    assert whole.startswith(b"HTTP/1.1 200 ")
    assert whole.endswith(b"\r\n\r\n" + body)
    assert nodelay


def test_counting_proxy_sends_each_answer_in_one_write_without_nagle(
    registry: RegistryEnv,
) -> None:
    repo = _repo()
    pushed = registry.push.image(repo, "v1")
    with CountingProxy(registry.url) as proxy:
        writes = _Writes(proxy._server)  # type: ignore[arg-type]
        got = _exchange(proxy.url, "GET", f"/v2/{repo}/manifests/v1")
        head = _exchange(proxy.url, "HEAD", f"/v2/{repo}/manifests/v1")

    assert got == (200, pushed.manifest)
    assert head == (200, b"")
    assert [len(writes.seen), *(nodelay for _, nodelay in writes.seen)] == [2, 1, 1]
    assert writes.seen[0][0].endswith(b"\r\n\r\n" + pushed.manifest)
    assert writes.seen[1][0].endswith(b"\r\n\r\n")
    assert f"content-length: {len(pushed.manifest)}".encode() in writes.seen[1][0].lower()

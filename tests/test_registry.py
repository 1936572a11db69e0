from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from tests.faults import (
    DOCKER_MANIFEST as FAULT_DOCKER_MANIFEST,
)
from tests.faults import (
    FaultServer,
    Reply,
    error_reply,
    manifest_reply,
    sample_index,
    scripted,
    sha256_digest,
)
from tests.harness.fixtures import RegistryEnv
from tests.harness.push import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from webhook import certs, errors
from webhook.oci.auth import parse_challenge
from webhook.oci.credential import ANONYMOUS, Credential, Credentials
from webhook.oci.reference import ImageRef
from webhook.oci.registry import MANIFEST_MEDIA_TYPES, RegistryClient
from webhook.oci.transport import RegistryOptions, parse_retry_after

ALICE = Credential("alice", "wonderland", source="test alice")
BOB = Credential("bob", "builder", source="test bob")
WRONG = Credential("alice", "not-the-password", source="test wrong")


def loopback_options(*hosts: str, **overrides: object) -> RegistryOptions:
    """Loopback registries must be both insecure (http) and allow-listed (SSRF guard)."""
    settings: dict[str, object] = {
        "insecure_registries": frozenset(hosts),
        "allowed_hosts": frozenset({*hosts, "127.0.0.1"}),
        "backoff_base": 0.01,
    }
    settings.update(overrides)
    return RegistryOptions(**settings)  # type: ignore[arg-type]


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


def unique_repo(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def faults() -> AsyncIterator[FaultServer]:
    async with FaultServer() as server:
        yield server


@pytest.fixture
async def fault_client(faults: FaultServer) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(loopback_options(faults.host)) as client:
        yield client


# -- against the real registry ------------------------------------------------------------


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
async def test_multi_arch_index_resolves_to_the_pushed_index_digest(
    registry: RegistryEnv, media_type: str
) -> None:
    pushed = registry.push.index(unique_repo("multi"), "v1", media_type)
    async with RegistryClient(loopback_options(registry.host)) as client:
        digest = await client.resolve_digest(
            ImageRef.parse(pushed.tag_ref), ANONYMOUS, deadline=deadline_in(10)
        )
    assert digest == pushed.digest
    assert digest not in pushed.manifest_digests  # not a platform manifest


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
async def test_single_manifest_resolves_to_its_digest(
    registry: RegistryEnv, media_type: str
) -> None:
    pushed = registry.push.image(unique_repo("single"), "v1", media_type)
    async with RegistryClient(loopback_options(registry.host)) as client:
        digest = await client.resolve_digest(
            ImageRef.parse(pushed.tag_ref), ANONYMOUS, deadline=deadline_in(10)
        )
    assert digest == pushed.digest == sha256_digest(pushed.manifest)


async def test_unknown_tag_is_not_found(registry: RegistryEnv) -> None:
    pushed = registry.push.image(unique_repo("missing"), "v1")
    ref = ImageRef.parse(f"{registry.host}/{pushed.repo}:no-such-tag")
    async with RegistryClient(loopback_options(registry.host)) as client:
        with pytest.raises(errors.NotFound):
            await client.resolve_digest(ref, ANONYMOUS, deadline=deadline_in(10))


async def test_manifest_exists_by_digest(registry: RegistryEnv) -> None:
    pushed = registry.push.index(unique_repo("exists"), "v1")
    present = ImageRef.parse(pushed.digest_ref)
    absent = present.with_digest(sha256_digest(b"never pushed"))
    async with RegistryClient(loopback_options(registry.host)) as client:
        assert await client.manifest_exists(present, ANONYMOUS, deadline=deadline_in(10)) is True
        assert await client.manifest_exists(absent, ANONYMOUS, deadline=deadline_in(10)) is False


async def test_resolving_a_digest_reference_returns_that_digest(registry: RegistryEnv) -> None:
    pushed = registry.push.image(unique_repo("bydigest"), "v1")
    async with RegistryClient(loopback_options(registry.host)) as client:
        digest = await client.resolve_digest(
            ImageRef.parse(pushed.digest_ref), ANONYMOUS, deadline=deadline_in(10)
        )
    assert digest == pushed.digest


async def test_basic_auth_with_the_right_credential(basic_registry: RegistryEnv) -> None:
    pushed = basic_registry.push.index(unique_repo("basic"), "v1")
    async with RegistryClient(loopback_options(basic_registry.host)) as client:
        ref = ImageRef.parse(pushed.tag_ref)
        assert (
            await client.resolve_digest(ref, Credentials((ALICE,)), deadline=deadline_in(10))
            == pushed.digest
        )
        # The challenge is remembered: the second resolve sends credentials up front.
        before = basic_registry.count_requests("HEAD", f"/v2/{pushed.repo}/manifests/v1")
        assert (
            await client.resolve_digest(ref, Credentials((ALICE,)), deadline=deadline_in(10))
            == pushed.digest
        )
        after = basic_registry.count_requests("HEAD", f"/v2/{pushed.repo}/manifests/v1")
    assert after - before == 1


async def test_basic_auth_wrong_password_is_unauthorized(basic_registry: RegistryEnv) -> None:
    pushed = basic_registry.push.image(unique_repo("basicwrong"), "v1")
    async with RegistryClient(loopback_options(basic_registry.host)) as client:
        with pytest.raises(errors.Unauthorized) as raised:
            await client.resolve_digest(
                ImageRef.parse(pushed.tag_ref), Credentials((WRONG,)), deadline=deadline_in(10)
            )
    message = str(raised.value)
    assert basic_registry.host in message
    assert "1 credential(s)" in message
    assert WRONG.password not in message


async def test_basic_auth_anonymous_is_unauthorized(basic_registry: RegistryEnv) -> None:
    pushed = basic_registry.push.image(unique_repo("basicanon"), "v1")
    async with RegistryClient(loopback_options(basic_registry.host)) as client:
        with pytest.raises(errors.Unauthorized, match="anonymous"):
            await client.resolve_digest(
                ImageRef.parse(pushed.tag_ref), ANONYMOUS, deadline=deadline_in(10)
            )


async def test_second_credential_is_tried_when_the_first_is_refused(
    basic_registry: RegistryEnv,
) -> None:
    pushed = basic_registry.push.index(unique_repo("basictwo"), "v1")
    async with RegistryClient(loopback_options(basic_registry.host)) as client:
        digest = await client.resolve_digest(
            ImageRef.parse(pushed.tag_ref),
            Credentials(
                (
                    WRONG,
                    ALICE,
                )
            ),
            deadline=deadline_in(10),
        )
    assert digest == pushed.digest


async def test_token_auth_reuses_the_token(token_registry: RegistryEnv) -> None:
    assert token_registry.issuer is not None
    pushed = token_registry.push.index(unique_repo("token"), "v1")
    other = token_registry.push.image(unique_repo("token"), "v1")
    ref = ImageRef.parse(pushed.tag_ref)
    token_registry.issuer.reset_counts()
    async with RegistryClient(loopback_options(token_registry.host)) as client:
        assert (
            await client.resolve_digest(ref, Credentials((BOB,)), deadline=deadline_in(10))
            == pushed.digest
        )
        assert token_registry.issuer.request_count == 1
        assert (
            await client.resolve_digest(ref, Credentials((BOB,)), deadline=deadline_in(10))
            == pushed.digest
        )
        assert token_registry.issuer.request_count == 1
        # Another repository is another scope: a new token.
        await client.resolve_digest(
            ImageRef.parse(other.tag_ref), Credentials((BOB,)), deadline=deadline_in(10)
        )
        assert token_registry.issuer.request_count == 2
    request = token_registry.issuer.requests[0]
    assert request.username == "bob"
    assert request.scopes == (f"repository:{pushed.repo}:pull",)
    assert request.service == token_registry.issuer.service


class _ImportsAsked:
    """A meta path finder that records every import that reaches the finders: one a module
    already imported never does."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        self.names.append(name)


async def test_a_lookup_imports_nothing(token_registry: RegistryEnv) -> None:
    # Before: httpcore tried `import sniffio` on every request, and without sniffio installed
    # each failed import searched sys.path again: 0.4 ms of every registry request.
    pushed = [token_registry.push.image(unique_repo("imports"), "v1") for _ in range(2)]
    asked = _ImportsAsked()
    async with RegistryClient(loopback_options(token_registry.host)) as client:
        first = ImageRef.parse(pushed[0].tag_ref)
        await client.resolve_digest(first, Credentials((BOB,)), deadline=deadline_in(10))
        sys.meta_path.insert(0, asked)
        try:
            # A new repository: a challenge, a token and a HEAD, all on open connections.
            second = ImageRef.parse(pushed[1].tag_ref)
            digest = await client.resolve_digest(
                second, Credentials((BOB,)), deadline=deadline_in(10)
            )
        finally:
            sys.meta_path.remove(asked)
    assert digest == pushed[1].digest
    assert asked.names == []


async def test_token_auth_wrong_then_right_credential(token_registry: RegistryEnv) -> None:
    pushed = token_registry.push.image(unique_repo("tokentwo"), "v1")
    wrong_bob = Credential("bob", "wrong", source="test wrong bob")
    async with RegistryClient(loopback_options(token_registry.host)) as client:
        ref = ImageRef.parse(pushed.tag_ref)
        with pytest.raises(errors.Unauthorized, match="1 credential"):
            await client.resolve_digest(ref, Credentials((wrong_bob,)), deadline=deadline_in(10))
        digest = await client.resolve_digest(
            ref,
            Credentials(
                (
                    wrong_bob,
                    BOB,
                )
            ),
            deadline=deadline_in(10),
        )
    assert digest == pushed.digest


async def test_concurrent_resolves_share_one_token(token_registry: RegistryEnv) -> None:
    assert token_registry.issuer is not None
    pushed = token_registry.push.image(unique_repo("tokenmany"), "v1")
    ref = ImageRef.parse(pushed.tag_ref)
    token_registry.issuer.reset_counts()
    async with RegistryClient(loopback_options(token_registry.host)) as client:
        digests = await asyncio.gather(
            *(
                client.resolve_digest(ref, Credentials((BOB,)), deadline=deadline_in(10))
                for _ in range(8)
            )
        )
    assert set(digests) == {pushed.digest}
    assert token_registry.issuer.request_count == 1


async def test_debug_logs_never_carry_secrets(
    basic_registry: RegistryEnv, token_registry: RegistryEnv, caplog: pytest.LogCaptureFixture
) -> None:
    basic = basic_registry.push.image(unique_repo("logs"), "v1")
    token = token_registry.push.image(unique_repo("logs"), "v1")
    hosts = (basic_registry.host, token_registry.host)
    caplog.set_level(logging.DEBUG)
    async with RegistryClient(loopback_options(*hosts)) as client:
        for pushed, credential in ((basic, ALICE), (token, BOB)):
            ref = ImageRef.parse(pushed.tag_ref)
            await client.resolve_digest(
                ref,
                Credentials(
                    (
                        WRONG,
                        credential,
                    )
                ),
                deadline=deadline_in(10),
            )
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("webhook.oci.")]
    assert any(message.startswith("HEAD ") for message in ours)  # exchanges are logged
    # httpx and httpcore log too, at the same level: nothing anywhere may carry a secret.
    logged = caplog.text
    encoded = [
        base64.b64encode(f"{c.username}:{c.password}".encode()).decode()
        for c in (ALICE, BOB, WRONG)
    ]
    for secret in (ALICE.password, BOB.password, WRONG.password, *encoded):
        assert secret not in logged
    assert "eyJ" not in logged  # no JWT (header and claims start with '{"')


# -- faults --------------------------------------------------------------------------------

MANIFEST_PATH = "/v2/team/app/manifests/v1"


def fault_ref(server: FaultServer, digest: str | None = None) -> ImageRef:
    ref = ImageRef.parse(f"{server.host}/team/app:v1")
    return ref.with_digest(digest) if digest else ref


async def test_head_asks_for_all_four_manifest_types(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, manifest_reply(sample_index()))
    await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    (request,) = faults.requests
    assert request.method == "HEAD"
    assert [t.strip() for t in request.headers["accept"].split(",")] == list(MANIFEST_MEDIA_TYPES)
    assert "distribution.manifest.v1" not in request.headers["accept"]


async def test_5xx_is_retried_then_succeeds(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    body = sample_index()
    faults.route(MANIFEST_PATH, *scripted(503, 502, then=manifest_reply(body)))
    digest = await fault_client.resolve_digest(
        fault_ref(faults), ANONYMOUS, deadline=deadline_in(5)
    )
    assert digest == sha256_digest(body)
    assert faults.count("HEAD", MANIFEST_PATH) == 3


async def test_5xx_after_the_last_attempt_is_unavailable(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, error_reply(500))
    with pytest.raises(errors.RegistryUnavailable, match="after 3 attempts"):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    assert faults.count(path=MANIFEST_PATH) == 3


async def test_429_retry_after_is_honoured(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(
        MANIFEST_PATH,
        error_reply(429, "TOOMANYREQUESTS", headers={"Retry-After": "1"}),
        manifest_reply(sample_index()),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    assert loop.time() - started >= 0.95  # backoff alone would be ~0.01 s
    assert faults.count("HEAD", MANIFEST_PATH) == 2


async def test_retry_after_beyond_the_deadline_fails_without_waiting(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, error_reply(429, headers={"Retry-After": "30"}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.RegistryUnavailable, match="deadline"):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(2))
    assert loop.time() - started < 1
    assert faults.count(path=MANIFEST_PATH) == 1


async def test_slow_upstream_hits_the_deadline(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, Reply(hang=True))
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + 0.3
    with pytest.raises(errors.DeadlineExceeded):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline)
    assert faults.hanging.is_set()
    assert loop.time() < deadline + 0.15


async def test_passed_deadline_sends_nothing(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, manifest_reply(sample_index()))
    with pytest.raises(errors.DeadlineExceeded):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(-1))
    assert faults.requests == []


async def test_missing_digest_header_falls_back_to_hashing_the_get_body(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    body = sample_index()
    faults.route(MANIFEST_PATH, manifest_reply(body, digest=None))
    digest = await fault_client.resolve_digest(
        fault_ref(faults), ANONYMOUS, deadline=deadline_in(5)
    )
    assert digest == sha256_digest(body)
    assert [r.method for r in faults.requests] == ["HEAD", "GET"]
    assert "application/vnd.oci.image.index.v1+json" in faults.requests[1].headers["accept"]


async def test_content_length_minus_one_falls_back_to_get(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    body = sample_index()
    head = (
        "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n"
        f"Docker-Content-Digest: {sha256_digest(b'something else')}\r\n\r\n"
    ).encode()
    faults.route(MANIFEST_PATH, Reply(raw_head=head), method="HEAD")
    faults.route(MANIFEST_PATH, manifest_reply(body), method="GET")
    digest = await fault_client.resolve_digest(
        fault_ref(faults), ANONYMOUS, deadline=deadline_in(5)
    )
    assert digest == sha256_digest(body)
    assert faults.count("HEAD") == 1  # a malformed answer is not retried
    assert faults.count("GET") == 1


async def test_405_on_head_falls_back_to_get(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    body = b'{"schemaVersion":2}'
    faults.route(MANIFEST_PATH, error_reply(405), method="HEAD")
    faults.route(
        MANIFEST_PATH, manifest_reply(body, media_type=FAULT_DOCKER_MANIFEST), method="GET"
    )
    digest = await fault_client.resolve_digest(
        fault_ref(faults), ANONYMOUS, deadline=deadline_in(5)
    )
    assert digest == sha256_digest(body)


async def test_body_not_matching_its_digest_header_is_a_mismatch(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    body = sample_index()
    faults.route(MANIFEST_PATH, Reply(200, {"Content-Type": OCI_INDEX}), method="HEAD")
    faults.route(MANIFEST_PATH, manifest_reply(body, digest=sha256_digest(b"other")), method="GET")
    with pytest.raises(errors.DigestMismatch):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))


async def test_registry_serving_another_digest_than_asked_is_a_mismatch(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    body = sample_index()
    asked = sha256_digest(b"what the pod asked for")
    path = f"/v2/team/app/manifests/{asked}"
    faults.route(path, manifest_reply(body))
    with pytest.raises(errors.DigestMismatch):
        await fault_client.resolve_digest(
            ImageRef.parse(f"{faults.host}/team/app@{asked}"), ANONYMOUS, deadline=deadline_in(5)
        )


async def test_invalid_digest_header_on_get_is_a_protocol_error(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, manifest_reply(sample_index(), digest="md5:abc"))
    with pytest.raises(errors.ProtocolError, match="invalid Docker-Content-Digest"):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))


async def test_schema1_answer_is_refused(faults: FaultServer, fault_client: RegistryClient) -> None:
    media_type = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    faults.route(MANIFEST_PATH, manifest_reply(b"{}", media_type=media_type))
    with pytest.raises(errors.ProtocolError, match="schema1"):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))


async def test_connection_reset_is_retried_then_unavailable(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, Reply(reset=True))
    with pytest.raises(errors.RegistryUnavailable, match="after 3 attempts"):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    assert faults.count(path=MANIFEST_PATH) == 3


async def test_connection_reset_then_success(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    body = sample_index()
    faults.route(MANIFEST_PATH, Reply(reset=True), manifest_reply(body))
    digest = await fault_client.resolve_digest(
        fault_ref(faults), ANONYMOUS, deadline=deadline_in(5)
    )
    assert digest == sha256_digest(body)
    assert faults.count(path=MANIFEST_PATH) == 2


async def test_redirect_to_a_forbidden_host_is_refused(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(
        MANIFEST_PATH, Reply(307, {"Location": "http://169.254.169.254/latest/meta-data/"})
    )
    with pytest.raises(errors.ForbiddenHost):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    assert faults.count() == 1


async def test_redirect_to_an_allowed_host_is_followed(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    body = sample_index()
    faults.route(MANIFEST_PATH, Reply(307, {"Location": "/elsewhere/manifest"}))
    faults.route("/elsewhere/manifest", manifest_reply(body))
    digest = await fault_client.resolve_digest(
        fault_ref(faults), ANONYMOUS, deadline=deadline_in(5)
    )
    assert digest == sha256_digest(body)


async def test_endless_redirects_are_a_protocol_error(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, Reply(302, {"Location": MANIFEST_PATH}))
    with pytest.raises(errors.ProtocolError, match="redirects"):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    assert faults.count() == 6


@pytest.mark.parametrize(
    ("location", "problem"),
    [
        ("ftp://127.0.0.1/m?X-Sig=secret", "unsupported URL ftp://127.0.0.1/m"),
        ("http://127.0.0.1:1/m?X-Sig=secret", "plain http http://127.0.0.1:1/m"),
    ],
)
async def test_a_refused_redirect_is_shown_without_its_query(
    faults: FaultServer, fault_client: RegistryClient, location: str, problem: str
) -> None:
    # Before: the error showed the redirect target whole, and a target's query may hold a
    # signature (presigned storage URLs) or a token service's account.
    faults.route(MANIFEST_PATH, Reply(307, {"Location": location}))
    with pytest.raises(errors.ProtocolError) as refused:
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    assert problem in str(refused.value)
    assert "secret" not in str(refused.value)


async def test_image_host_outside_the_allow_list_is_refused(faults: FaultServer) -> None:
    faults.route(MANIFEST_PATH, manifest_reply(sample_index()))
    options = RegistryOptions(insecure_registries=frozenset({faults.host}))
    async with RegistryClient(options) as client:
        with pytest.raises(errors.ForbiddenHost):
            await client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    assert faults.requests == []


async def test_cached_token_refused_is_dropped_and_refetched_once(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    challenge = (
        f'Bearer realm="{faults.url}/token",service="fault",scope="repository:team/app:pull"'
    )
    unauthorized = error_reply(401, "UNAUTHORIZED", headers={"WWW-Authenticate": challenge})
    ok = manifest_reply(sample_index())
    faults.route(MANIFEST_PATH, unauthorized, ok, unauthorized, ok)
    faults.route(
        "/token",
        Reply(200, {"Content-Type": "application/json"}, b'{"token":"first"}'),
        Reply(200, {"Content-Type": "application/json"}, b'{"access_token":"second"}'),
    )
    await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    sent = [r.headers.get("authorization") for r in faults.requests_to(MANIFEST_PATH)]
    assert sent == [None, "Bearer first", "Bearer first", "Bearer second"]
    assert faults.count(path="/token") == 2
    token_request = faults.requests_to("/token")[0]
    assert "scope=repository%3Ateam%2Fapp%3Apull" in token_request.query
    assert "service=fault" in token_request.query
    assert "authorization" not in token_request.headers  # anonymous


SCOPE = "scope=repository%3Ateam%2Fapp%3Apull"


@pytest.mark.parametrize(
    ("realm", "asked"),
    [
        ("/token", f"{SCOPE}&service=fault"),
        # An empty query: one '?', not two.
        ("/token?", f"{SCOPE}&service=fault"),
        # The realm's own parameters as given, then scope; its own service is replaced by
        # the challenge's, not sent twice.
        ("/token?account=ci&service=old", f"account=ci&service=fault&{SCOPE}"),
    ],
)
async def test_a_token_is_asked_of_the_realm_with_scope_and_service(
    faults: FaultServer, fault_client: RegistryClient, realm: str, asked: str
) -> None:
    _challenged_by(faults, realm, Reply(200, {}, b'{"token":"t"}'))
    await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    assert faults.requests_to("/token")[0].query == asked
    assert faults.requests_to(MANIFEST_PATH)[1].headers["authorization"] == "Bearer t"


async def test_a_redirected_token_request_asks_the_target_as_it_says(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    _challenged_by(faults, "/token", Reply(302, {"Location": "/issued?by=redirect"}))
    faults.route("/issued", Reply(200, {}, b'{"token":"t"}'))
    await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    assert SCOPE in faults.requests_to("/token")[0].query
    assert faults.requests_to("/issued")[0].query == "by=redirect"


def _challenged_by(faults: FaultServer, realm: str, token_reply: Reply) -> None:
    """The manifest asks for a Bearer token from ``realm`` (on ``faults``) once, then is
    served; the realm answers ``token_reply``."""
    challenge = f'Bearer realm="{faults.url}{realm}",service="fault"'
    faults.route(
        MANIFEST_PATH,
        error_reply(401, headers={"WWW-Authenticate": challenge}),
        manifest_reply(sample_index()),
    )
    faults.route("/token", token_reply)


async def test_401_without_challenge_reuses_the_ping_challenge(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, error_reply(401), manifest_reply(sample_index()))
    faults.route("/v2/", error_reply(401, headers={"WWW-Authenticate": 'basic realm="gcr"'}))
    await fault_client.resolve_digest(
        fault_ref(faults), Credentials((ALICE,)), deadline=deadline_in(5)
    )
    sent = [r.headers.get("authorization") for r in faults.requests_to(MANIFEST_PATH)]
    assert sent[0] is None
    assert sent[1] is not None and sent[1].startswith("Basic ")
    assert faults.count(path="/v2/") == 1


async def test_forbidden_for_every_credential_is_unauthorized(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, error_reply(403, "DENIED"))
    with pytest.raises(errors.Unauthorized, match="2 credential"):
        await fault_client.resolve_digest(
            fault_ref(faults),
            Credentials(
                (
                    WRONG,
                    ALICE,
                )
            ),
            deadline=deadline_in(5),
        )
    assert faults.count(path=MANIFEST_PATH) == 3  # both credentials, then anonymous


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    paths = certs.write(certs.generate(["localhost"], ["127.0.0.1"]), tmp_path / "tls")
    return paths.ca_cert, paths.cert, paths.key


@pytest.fixture
async def tls_faults(tls_files: tuple[Path, Path, Path]) -> AsyncIterator[FaultServer]:
    _, cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with FaultServer(tls=context) as server:
        yield server


async def test_https_registry_with_a_private_ca(
    tls_faults: FaultServer, tls_files: tuple[Path, Path, Path]
) -> None:
    body = sample_index()
    tls_faults.route(MANIFEST_PATH, manifest_reply(body))
    options = RegistryOptions(allowed_hosts=frozenset({"127.0.0.1"}), ca_bundle=str(tls_files[0]))
    async with RegistryClient(options) as client:
        digest = await client.resolve_digest(
            fault_ref(tls_faults), ANONYMOUS, deadline=deadline_in(5)
        )
    assert digest == sha256_digest(body)


async def test_https_registry_with_an_untrusted_certificate_is_not_retried(
    tls_faults: FaultServer,
) -> None:
    tls_faults.route(MANIFEST_PATH, manifest_reply(sample_index()))
    options = RegistryOptions(allowed_hosts=frozenset({"127.0.0.1"}))
    async with RegistryClient(options) as client:
        with pytest.raises(errors.RegistryUnavailable, match="certificate"):
            await client.resolve_digest(fault_ref(tls_faults), ANONYMOUS, deadline=deadline_in(5))


async def test_plain_http_realm_of_an_https_registry_is_refused(
    tls_faults: FaultServer, faults: FaultServer, tls_files: tuple[Path, Path, Path]
) -> None:
    challenge = f'Bearer realm="{faults.url}/token",service="fault"'
    tls_faults.route(MANIFEST_PATH, error_reply(401, headers={"WWW-Authenticate": challenge}))
    faults.route("/token", Reply(200, {}, b'{"token":"t"}'))
    options = RegistryOptions(allowed_hosts=frozenset({"127.0.0.1"}), ca_bundle=str(tls_files[0]))
    async with RegistryClient(options) as client:
        with pytest.raises(errors.ProtocolError, match="plain http"):
            await client.resolve_digest(
                fault_ref(tls_faults), Credentials((BOB,)), deadline=deadline_in(5)
            )
    assert faults.requests == []
    assert tls_faults.count("GET") == 0  # a policy refusal is not a reason to try GET


# -- pure parts ----------------------------------------------------------------------------


def test_challenge_with_quoted_commas_and_mixed_case_scheme() -> None:
    challenge = parse_challenge(
        'BEARER realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull,push repository:c:pull",error="invalid_token"'
    )
    assert challenge is not None
    assert challenge.scheme == "bearer"
    assert challenge.param("realm") == "https://auth.example.com/token"
    assert challenge.param("scope") == "repository:a/b:pull,push repository:c:pull"
    assert challenge.param("error") == "invalid_token"


def test_basic_challenge_and_escapes() -> None:
    challenge = parse_challenge(r'Basic realm="say \"hi\"", charset=UTF-8')
    assert challenge is not None
    assert challenge.scheme == "basic"
    assert challenge.param("realm") == 'say "hi"'
    assert challenge.param("charset") == "UTF-8"


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(30.0)
    assert (
        parse_retry_after(format_datetime(now - timedelta(1), usegmt=True), now=now.timestamp())
        == 0.0
    )


async def test_expired_token_is_not_reused_and_missing_expiry_defaults(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    challenge = f'Bearer realm="{faults.url}/token",service="fault"'
    unauthorized = error_reply(401, headers={"WWW-Authenticate": challenge})
    faults.route(MANIFEST_PATH, unauthorized, manifest_reply(sample_index()))
    # Issued an hour ago for a minute: already expired when it arrives.
    stale = b'{"token":"old","expires_in":60,"issued_at":"2020-01-01T00:00:00Z"}'
    fresh = b'{"token":"new"}'  # no expires_in, as ghcr.io answers: 60 s
    faults.route("/token", Reply(200, {}, stale), Reply(200, {}, fresh))
    for _ in range(3):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))
    sent = [r.headers.get("authorization") for r in faults.requests_to(MANIFEST_PATH)]
    assert sent == [None, "Bearer old", "Bearer new", "Bearer new"]
    assert faults.count(path="/token") == 2


async def test_cross_origin_redirect_drops_the_authorization_header(
    faults: FaultServer,
) -> None:
    body = sample_index()
    async with FaultServer() as other:
        basic = error_reply(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        faults.route(MANIFEST_PATH, basic, Reply(307, {"Location": f"{other.url}/m"}))
        other.route("/m", manifest_reply(body))
        options = loopback_options(faults.host, other.host)
        async with RegistryClient(options) as client:
            # The manifest came from the redirect target: a digest is only taken from the
            # registry itself (see test_a_manifest_from_a_redirect_target_is_not_pinned).
            with pytest.raises(errors.ProtocolError, match="only taken from the registry"):
                await client.resolve_digest(
                    fault_ref(faults), Credentials((ALICE,)), deadline=deadline_in(5)
                )
        assert faults.requests_to(MANIFEST_PATH)[1].headers["authorization"].startswith("Basic ")
        assert all("authorization" not in r.headers for r in other.requests_to("/m"))


# -- credentials go only where they belong; one repository cannot poison another ------------


async def test_a_redirect_targets_challenge_is_never_answered_with_the_registrys_credential(
    faults: FaultServer,
) -> None:
    # Before: B's 401 was taken for A's challenge, A's Basic credential went to B's realm,
    # and B's token came back to A.
    async with FaultServer() as other:
        faults.route(MANIFEST_PATH, Reply(307, {"Location": f"{other.url}/m"}))
        realm = f'Bearer realm="{other.url}/token",service="b"'
        other.route("/m", error_reply(401, headers={"WWW-Authenticate": realm}))
        other.route("/token", Reply(200, {"Content-Type": "application/json"}, b'{"token":"b"}'))
        async with RegistryClient(loopback_options(faults.host, other.host)) as client:
            with pytest.raises(errors.ProtocolError, match="never sent to another host"):
                await client.resolve_digest(
                    fault_ref(faults), Credentials((ALICE,)), deadline=deadline_in(5)
                )
        assert other.requests_to("/token") == []
        assert all("authorization" not in r.headers for r in other.requests)
        assert all("authorization" not in r.headers for r in faults.requests)


async def test_one_repositorys_unusable_challenge_does_not_fail_another(
    faults: FaultServer,
) -> None:
    # Before: repository x's challenge (a realm on a private address) was cached for the whole
    # host, and every later lookup on it failed with no request sent, until restart.
    body = sample_index()
    poisoned = 'Bearer realm="http://10.0.0.1/token",service="s"'
    faults.route(
        "/v2/team/x/manifests/1.0", error_reply(401, headers={"WWW-Authenticate": poisoned})
    )
    good = f'Bearer realm="{faults.url}/token",service="s"'
    token = Reply(200, {"Content-Type": "application/json"}, b'{"token":"t","expires_in":300}')
    faults.route("/token", token)
    faults.route(
        "/v2/team/y/manifests/1.0",
        error_reply(401, headers={"WWW-Authenticate": good}),
        manifest_reply(body),
    )
    async with RegistryClient(loopback_options(faults.host)) as client:
        for _ in range(2):
            with pytest.raises(errors.ForbiddenHost):
                await client.resolve_digest(
                    ImageRef.parse(f"{faults.host}/team/x:1.0"), ANONYMOUS, deadline=deadline_in(5)
                )
        digest = await client.resolve_digest(
            ImageRef.parse(f"{faults.host}/team/y:1.0"), ANONYMOUS, deadline=deadline_in(5)
        )
    assert digest == sha256_digest(body)
    assert len(faults.requests_to("/v2/team/x/manifests/1.0")) == 2


# -- only a manifest is ever pinned --------------------------------------------------------


async def test_a_page_is_not_pinned_as_a_manifest(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    # Before: HEAD without a digest, then GET 200 text/html, and the page's sha256 was written
    # as the image digest, with no warning, even under deny + requireDigest.
    page = Reply(200, {"Content-Type": "text/html; charset=utf-8"}, b"<html>login</html>")
    faults.route(MANIFEST_PATH, page)
    with pytest.raises(errors.ProtocolError, match="answered text/html, not a manifest"):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))


async def test_json_that_is_not_a_manifest_is_not_pinned(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    faults.route(MANIFEST_PATH, manifest_reply(b'{"hello": "world"}', digest=None))
    with pytest.raises(errors.ProtocolError, match="is not a manifest"):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))


async def test_a_head_digest_with_a_page_content_type_is_not_trusted(
    faults: FaultServer, fault_client: RegistryClient
) -> None:
    digest = sha256_digest(b"anything")
    head = Reply(200, {"Content-Type": "text/html", "Docker-Content-Digest": digest}, b"x")
    faults.route(MANIFEST_PATH, head, method="HEAD")
    faults.route(MANIFEST_PATH, Reply(200, {"Content-Type": "text/html"}, b"x"), method="GET")
    with pytest.raises(errors.ProtocolError, match="not a manifest"):
        await fault_client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))


async def test_a_manifest_from_a_redirect_target_is_not_pinned(faults: FaultServer) -> None:
    async with FaultServer() as other:
        faults.route(MANIFEST_PATH, Reply(302, {"Location": f"{other.url}/m"}))
        other.route("/m", manifest_reply(sample_index(), digest=None))
        async with RegistryClient(loopback_options(faults.host, other.host)) as client:
            with pytest.raises(errors.ProtocolError, match="only taken from the registry itself"):
                await client.resolve_digest(fault_ref(faults), ANONYMOUS, deadline=deadline_in(5))

"""Docker's identity tokens (OAuth2 refresh tokens) and registry tokens in the auth flow.

The happy paths run against the real registry with token auth, whose issuer takes the OAuth2
POST (tests/harness/tokens.py); what it cannot do (redirect a POST, answer Basic to a token)
uses the loopback fault server.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator

import pytest

from tests.faults import FaultServer, Reply, error_reply, manifest_reply, sample_index
from tests.harness.fixtures import RegistryEnv
from tests.harness.push import PushedImage
from tests.harness.tokens import Access, TokenIssuer
from tests.test_registry import ALICE, MANIFEST_PATH, deadline_in, fault_ref, loopback_options
from tests.test_registry import unique_repo as new_repo
from webhook import errors
from webhook.oci.auth import OAUTH_CLIENT_ID
from webhook.oci.credential import Credential, Credentials
from webhook.oci.reference import ImageRef
from webhook.oci.registry import RegistryClient

ACR_USER = "00000000-0000-0000-0000-000000000000"  # what `az acr login` writes with a token


@pytest.fixture
def issuer(token_registry: RegistryEnv) -> TokenIssuer:
    assert token_registry.issuer is not None
    return token_registry.issuer


def pushed_index(registry: RegistryEnv, prefix: str) -> PushedImage:
    """A new index; the issuer's log then holds only what the test asks for."""
    pushed = registry.push.index(new_repo(prefix), "v1")
    assert registry.issuer is not None
    registry.issuer.reset_counts()
    return pushed


@pytest.fixture
async def client(token_registry: RegistryEnv) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(loopback_options(token_registry.host)) as client:
        yield client


def identity(token: str, username: str = "") -> Credential:
    return Credential(username, "", source="test identity token", identity_token=token)


# -- identity tokens ----------------------------------------------------------------------


async def test_an_identity_token_is_exchanged_with_an_oauth2_post(
    token_registry: RegistryEnv, issuer: TokenIssuer, client: RegistryClient
) -> None:
    pushed = pushed_index(token_registry, "identity")
    refresh = issuer.issue_refresh_token()
    ref = ImageRef.parse(pushed.tag_ref)
    for _ in range(2):  # the second one uses the cached bearer token
        assert await client.resolve_digest(
            ref, Credentials((identity(refresh),)), deadline=deadline_in(10)
        ) == (pushed.digest)
    [request] = issuer.requests
    assert (request.method, request.grant_type, request.status) == ("POST", "refresh_token", 200)
    assert request.client_id == OAUTH_CLIENT_ID
    assert request.refresh_token == refresh
    assert request.scopes == (f"repository:{pushed.repo}:pull",)
    assert request.service == issuer.service


async def test_a_rotated_refresh_token_is_kept_for_the_next_exchange(
    token_registry: RegistryEnv, issuer: TokenIssuer, client: RegistryClient
) -> None:
    first = pushed_index(token_registry, "rotate")
    second = pushed_index(token_registry, "rotate")
    configured = issuer.issue_refresh_token()
    credential = identity(configured)
    with issuer.oauth(rotate=True):
        for pushed in (first, second):  # two scopes: two exchanges
            digest = await client.resolve_digest(
                ImageRef.parse(pushed.tag_ref), Credentials((credential,)), deadline=deadline_in(10)
            )
            assert digest == pushed.digest
    presented = [r.refresh_token for r in issuer.requests]
    assert presented[0] == configured
    # The issuer retired the configured token when it rotated it: only the kept one works.
    assert not issuer.refresh_token_valid(configured)
    assert presented[1] != configured and presented[1] is not None
    assert [r.status for r in issuer.requests] == [200, 200]


@pytest.mark.parametrize(
    ("post_status", "username"),
    [(404, ""), (401, ""), (400, ""), (405, ACR_USER)],
    ids=["gcr-404", "artifactory-401", "acr-400", "405-with-username"],
)
async def test_a_token_service_without_oauth2_is_asked_with_get(
    token_registry: RegistryEnv,
    issuer: TokenIssuer,
    client: RegistryClient,
    post_status: int,
    username: str,
) -> None:
    pushed = pushed_index(token_registry, "fallback")
    refresh = issuer.issue_refresh_token()
    with issuer.oauth(post_status=post_status):
        digest = await client.resolve_digest(
            ImageRef.parse(pushed.tag_ref),
            Credentials((identity(refresh, username),)),
            deadline=deadline_in(10),
        )
    assert digest == pushed.digest
    post, get = issuer.requests
    assert (post.method, post.status) == ("POST", post_status)
    # The GET carries the refresh token as the Basic password, as containerd sends it.
    assert (get.method, get.status, get.refresh_token, get.username) == (
        "GET",
        200,
        refresh,
        username,
    )


async def test_405_without_a_username_is_not_retried_with_get(
    token_registry: RegistryEnv, issuer: TokenIssuer, client: RegistryClient
) -> None:
    pushed = pushed_index(token_registry, "nofallback")
    refresh = issuer.issue_refresh_token()
    with issuer.oauth(post_status=405), pytest.raises(errors.ProtocolError, match="405"):
        await client.resolve_digest(
            ImageRef.parse(pushed.tag_ref),
            Credentials((identity(refresh),)),
            deadline=deadline_in(10),
        )
    assert [r.method for r in issuer.requests] == ["POST"]


async def test_a_refused_identity_token_moves_on_and_never_shows(
    token_registry: RegistryEnv,
    issuer: TokenIssuer,
    client: RegistryClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pushed = pushed_index(token_registry, "badidentity")
    bad = "refresh-not-issued-by-anyone"
    good = Credential("bob", "builder", source="test bob")
    caplog.set_level(logging.DEBUG)
    digest = await client.resolve_digest(
        ImageRef.parse(pushed.tag_ref),
        Credentials(
            (
                identity(bad),
                good,
            )
        ),
        deadline=deadline_in(10),
    )
    assert digest == pushed.digest
    # POST refused (400 invalid_grant), GET refused (401): the next credential is tried.
    assert [(r.method, r.status) for r in issuer.requests] == [
        ("POST", 400),
        ("GET", 401),
        ("GET", 200),
    ]
    assert bad not in caplog.text
    with pytest.raises(errors.Unauthorized) as raised:
        await client.resolve_digest(
            ImageRef.parse(pushed.tag_ref), Credentials((identity(bad),)), deadline=deadline_in(10)
        )
    assert bad not in str(raised.value)


async def test_a_token_post_is_never_redirected(faults: FaultServer) -> None:
    async with FaultServer() as other:
        challenge = f'Bearer realm="{faults.url}/token",service="s"'
        faults.route(MANIFEST_PATH, error_reply(401, headers={"WWW-Authenticate": challenge}))
        faults.route("/token", Reply(307, {"Location": f"{other.url}/token"}), method="POST")
        async with RegistryClient(loopback_options(faults.host, other.host)) as client:
            with pytest.raises(errors.ProtocolError, match="307"):
                await client.resolve_digest(
                    fault_ref(faults),
                    Credentials((identity("secret-refresh"),)),
                    deadline=deadline_in(5),
                )
        assert other.requests == []  # the refresh token in the form never left for it
        [post] = faults.requests_to("/token")
        assert post.method == "POST"
        assert post.headers["content-type"].startswith("application/x-www-form-urlencoded")


async def test_a_refresh_token_post_is_sent_once(faults: FaultServer) -> None:
    # The token service may have rotated the refresh token before its answer was lost: a
    # retry would present a token it has just retired, and be refused.
    challenge = f'Bearer realm="{faults.url}/token",service="s"'
    faults.route(MANIFEST_PATH, error_reply(401, headers={"WWW-Authenticate": challenge}))
    faults.route("/token", error_reply(503), method="POST")
    async with RegistryClient(loopback_options(faults.host, max_attempts=3)) as client:
        with pytest.raises(errors.RegistryUnavailable, match="503"):
            await client.resolve_digest(
                fault_ref(faults), Credentials((identity("refresh"),)), deadline=deadline_in(5)
            )
    assert faults.count("POST", "/token") == 1


# -- registry tokens ----------------------------------------------------------------------


async def test_a_registry_token_is_sent_as_the_bearer_token(
    token_registry: RegistryEnv, issuer: TokenIssuer, client: RegistryClient
) -> None:
    pushed = pushed_index(token_registry, "regtoken")
    token = issuer.mint([Access("repository", pushed.repo, ("pull",))], subject="bob")
    credential = Credential("", "", source="test registry token", registry_token=token)
    digest = await client.resolve_digest(
        ImageRef.parse(pushed.tag_ref), Credentials((credential,)), deadline=deadline_in(10)
    )
    assert digest == pushed.digest
    assert issuer.requests == []  # no token request: the registry took it as it is


async def test_a_refused_registry_token_is_not_sent_twice(faults: FaultServer) -> None:
    challenge = f'Bearer realm="{faults.url}/token",service="s"'
    faults.route(MANIFEST_PATH, error_reply(401, headers={"WWW-Authenticate": challenge}))
    faults.route("/token", Reply(200, {"Content-Type": "application/json"}, b'{"token":"anon"}'))
    credential = Credential("", "", source="test stale token", registry_token="stale")
    async with RegistryClient(loopback_options(faults.host)) as client:
        with pytest.raises(errors.Unauthorized):
            await client.resolve_digest(
                fault_ref(faults), Credentials((credential,)), deadline=deadline_in(5)
            )
    sent = [r.headers.get("authorization") for r in faults.requests_to(MANIFEST_PATH)]
    # Unauthenticated, the registry token once, then anonymous access with its own token.
    assert sent == [None, "Bearer stale", None, "Bearer anon"]
    assert all("authorization" not in r.headers for r in faults.requests_to("/token"))


@pytest.mark.parametrize(
    "token_only",
    [
        Credential("", "", source="test registry token", registry_token="opaque"),
        Credential(ACR_USER, "", source="test identity token", identity_token="refresh"),
    ],
    ids=["registry-token", "identity-token"],
)
async def test_a_token_does_not_answer_a_basic_challenge(
    faults: FaultServer, token_only: Credential
) -> None:
    basic = error_reply(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
    faults.route(MANIFEST_PATH, basic, basic, manifest_reply(sample_index()))
    async with RegistryClient(loopback_options(faults.host)) as client:
        await client.resolve_digest(
            fault_ref(faults),
            Credentials(
                (
                    token_only,
                    ALICE,
                )
            ),
            deadline=deadline_in(5),
        )
    sent = [r.headers.get("authorization") for r in faults.requests_to(MANIFEST_PATH)]
    alice = "Basic " + base64.b64encode(b"alice:wonderland").decode()
    # The token credential is skipped without a request of its own; ALICE answers.
    assert sent == [None, None, alice]


async def test_an_empty_credential_is_anonymous_access_tried_once(
    faults: FaultServer,
) -> None:
    faults.route(MANIFEST_PATH, error_reply(401, headers={"WWW-Authenticate": 'Basic realm="r"'}))
    empty = Credential("", "", source="test empty entry")
    async with RegistryClient(loopback_options(faults.host)) as client:
        with pytest.raises(errors.Unauthorized, match="anonymous"):
            await client.resolve_digest(
                fault_ref(faults), Credentials((empty,)), deadline=deadline_in(5)
            )
    assert [r.headers.get("authorization") for r in faults.requests] == [None]


@pytest.fixture
async def faults() -> AsyncIterator[FaultServer]:
    async with FaultServer() as server:
        yield server

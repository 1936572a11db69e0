"""Registry mirrors: asked first, in order, for resolution; the registry itself last.

Mirrors that work are real registries on loopback; an upstream that must not be asked, or a
mirror that fails, is the loopback fault server.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest

from tests.faults import FaultServer, Reply, error_reply, manifest_reply, sample_index
from tests.harness.fixtures import RegistryEnv
from tests.test_registry import ALICE, BOB, deadline_in, loopback_options, unique_repo
from webhook import errors
from webhook.config import Settings, load_settings, warnings_for
from webhook.errors import ConfigError
from webhook.oci.credential import ANONYMOUS, Credentials
from webhook.oci.mirror import Mirror
from webhook.oci.reference import ImageRef
from webhook.oci.registry import RegistryClient
from webhook.oci.transport import RegistryOptions
from webhook.runtime import registry_options


@pytest.fixture
async def upstream() -> AsyncIterator[FaultServer]:
    async with FaultServer() as server:
        yield server


def mirrored(registry: str, *mirrors: str, **overrides: object) -> RegistryOptions:
    hosts = [registry, *(Mirror.parse(m).host for m in mirrors)]
    return loopback_options(
        *hosts, mirrors={registry: tuple(Mirror.parse(m) for m in mirrors)}, **overrides
    )


async def test_the_digest_comes_from_the_mirror(
    registry: RegistryEnv, upstream: FaultServer
) -> None:
    pushed = registry.push.index(unique_repo("mirrored"), "v1")
    ref = ImageRef.parse(f"{upstream.host}/{pushed.repo}:v1")
    async with RegistryClient(mirrored(upstream.host, registry.url)) as client:
        assert (
            await client.resolve_digest(ref, ANONYMOUS, deadline=deadline_in(10)) == pushed.digest
        )
    assert upstream.requests == []
    # containerd's ns= names the registry the mirror is asked for.
    manifests = f"/v2/{pushed.repo}/manifests/v1"
    asked = [
        e.uri
        for e in registry.registry.access_log()
        if e.method in ("HEAD", "GET") and e.uri.startswith(manifests)
    ]
    assert asked and all(f"ns={upstream.host.replace(':', '%3A')}" in uri for uri in asked)


@pytest.mark.parametrize(
    "failure",
    [error_reply(503), error_reply(404, "MANIFEST_UNKNOWN"), error_reply(401)],
    ids=["unavailable", "not-found", "unauthorized"],
)
async def test_a_failing_mirror_falls_through_to_the_registry(
    registry: RegistryEnv, failure: object
) -> None:
    pushed = registry.push.index(unique_repo("fallthrough"), "v1")
    async with FaultServer() as broken:
        broken.route(f"/v2/{pushed.repo}/manifests/v1", failure)  # type: ignore[arg-type]
        options = mirrored(registry.host, broken.url, max_attempts=1)
        async with RegistryClient(options) as client:
            digest = await client.resolve_digest(
                ImageRef.parse(pushed.tag_ref), ANONYMOUS, deadline=deadline_in(10)
            )
        assert digest == pushed.digest
        assert broken.count(path=f"/v2/{pushed.repo}/manifests/v1") >= 1


async def test_a_mirror_that_is_down_falls_through_in_order(
    registry: RegistryEnv, basic_registry: RegistryEnv, upstream: FaultServer
) -> None:
    pushed = registry.push.index(unique_repo("second"), "v1")
    async with FaultServer() as gone:
        dead = gone.url
    # First a mirror nobody listens on, then one without the image, then one with it.
    mirrors = (dead, basic_registry.url, registry.url)
    ref = ImageRef.parse(f"{upstream.host}/{pushed.repo}:v1")
    async with RegistryClient(mirrored(upstream.host, *mirrors, max_attempts=1)) as client:
        digest = await client.resolve_digest(
            ref,
            Credentials(mirrors=((basic_registry.host, (ALICE,)),)),
            deadline=deadline_in(10),
        )
    assert digest == pushed.digest
    assert basic_registry.count_requests("HEAD", f"/v2/{pushed.repo}/manifests/v1") >= 1
    assert upstream.requests == []


async def test_when_every_mirror_fails_the_registry_answers_and_the_error_names_them(
    upstream: FaultServer,
) -> None:
    async with FaultServer() as broken:
        broken.route("/v2/team/app/manifests/v1", error_reply(503))
        upstream.route("/v2/team/app/manifests/v1", error_reply(404, "MANIFEST_UNKNOWN"))
        ref = ImageRef.parse(f"{upstream.host}/team/app:v1")
        async with RegistryClient(mirrored(upstream.host, broken.url, max_attempts=1)) as client:
            with pytest.raises(errors.NotFound, match=f"mirror {broken.host}: .*503"):
                await client.resolve_digest(ref, ANONYMOUS, deadline=deadline_in(5))
        assert upstream.count(path="/v2/team/app/manifests/v1") == 1


async def test_a_hanging_mirror_leaves_the_registry_time(
    registry: RegistryEnv,
) -> None:
    pushed = registry.push.index(unique_repo("hang"), "v1")
    async with FaultServer() as hanging:
        hanging.route(f"/v2/{pushed.repo}/manifests/v1", Reply(hang=True))
        async with RegistryClient(mirrored(registry.host, hanging.url)) as client:
            digest = await client.resolve_digest(
                ImageRef.parse(pushed.tag_ref), ANONYMOUS, deadline=deadline_in(2)
            )
        assert digest == pushed.digest
        assert hanging.hanging.is_set()


async def test_the_registrys_credentials_never_go_to_a_mirror(upstream: FaultServer) -> None:
    body = sample_index()
    basic = error_reply(401, headers={"WWW-Authenticate": 'Basic realm="mirror"'})
    upstream.route("/v2/team/app/manifests/v1", basic, manifest_reply(body))
    async with FaultServer() as mirror:
        mirror.route("/v2/team/app/manifests/v1", basic)
        ref = ImageRef.parse(f"{upstream.host}/team/app:v1")
        async with RegistryClient(mirrored(upstream.host, mirror.url)) as client:
            # BOB is for the registry; the mirror has no credential of its own.
            await client.resolve_digest(ref, Credentials((BOB,)), deadline=deadline_in(5))
        assert all("authorization" not in r.headers for r in mirror.requests)
    bob = "Basic " + base64.b64encode(b"bob:builder").decode()
    assert upstream.requests[-1].headers["authorization"] == bob


async def test_a_mirror_on_a_private_address_needs_the_allow_list(
    registry: RegistryEnv, upstream: FaultServer
) -> None:
    body = sample_index()
    upstream.route("/v2/team/app/manifests/v1", manifest_reply(body))
    options = RegistryOptions(
        insecure_registries=frozenset({upstream.host, registry.host}),
        allowed_hosts=frozenset({upstream.host}),  # not the mirror's
        mirrors={upstream.host: (Mirror.parse(registry.url),)},
    )
    before = len(registry.registry.access_log())
    async with RegistryClient(options) as client:
        ref = ImageRef.parse(f"{upstream.host}/team/app:v1")
        assert await client.resolve_digest(ref, ANONYMOUS, deadline=deadline_in(5)) != ""
    assert len(registry.registry.access_log()) == before  # never contacted
    assert upstream.count(path="/v2/team/app/manifests/v1") == 1


# -- configuration ------------------------------------------------------------------------


def test_mirror_settings_are_normalised() -> None:
    settings = load_settings(
        "registry:\n"
        "  insecure: [cache.internal:5000]\n"
        "  allowedHosts: [10.0.0.5]\n"
        "  mirrors:\n"
        "    index.docker.io: [https://Mirror.GCR.io/, cache.internal:5000]\n"
        "    quay.io: [http://cache.internal:5000, 10.0.0.5:443]\n"
    )
    # Parsed once, when the settings are validated: what the registry client is given.
    assert settings.registry.mirrors == {
        "docker.io": (Mirror("https", "mirror.gcr.io"), Mirror(None, "cache.internal:5000")),
        "quay.io": (Mirror("http", "cache.internal:5000"), Mirror(None, "10.0.0.5:443")),
    }
    assert registry_options(settings).mirrors == settings.registry.mirrors
    assert warnings_for(settings) == []
    # Written back as URLs (config_hash dumps the settings), which read as the same settings.
    dumped = settings.model_dump(by_alias=True)
    assert dumped["registry"]["mirrors"]["docker.io"] == (
        "https://mirror.gcr.io",
        "cache.internal:5000",
    )
    assert Settings.model_validate(dumped).registry == settings.registry
    assert "https://mirror.gcr.io" in settings.model_dump_json(by_alias=True)


@pytest.mark.parametrize(
    ("mirrors", "problem"),
    [
        ("{docker.io: [http://m.example]}", "plain HTTP: list m.example in registry.insecure"),
        ("{docker.io: [https://m.example/v2/hub]}", "no path or query"),
        ("{docker.io: [ftp://m.example]}", "scheme must be https or http"),
        ("{docker.io: ['https://user:hunter2@m.example']}", "must not hold a user or password"),
        ("{team: [https://m.example]}", "'team' is not a registry name"),
        (
            "{docker.io: [m0.example, m1.example, m2.example, m3.example, m4.example, m5.example,"
            " m6.example, m7.example, m8.example]}",
            "at most 8 mirrors",
        ),
        ("{docker.io: [{scheme: http, host: m.example}]}", "a mirror is a string"),
        ("{docker.io: [m.example], index.docker.io: [n.example]}", "given twice"),
    ],
)
def test_bad_mirror_settings_are_refused(mirrors: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(f"registry:\n  mirrors: {mirrors}\n")
    assert problem in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_an_ip_mirror_outside_the_allow_list_is_warned_about() -> None:
    settings = load_settings("registry:\n  mirrors: {docker.io: ['192.168.1.5:5000']}\n")
    [warning] = warnings_for(settings)
    assert "192.168.1.5:5000" in warning and "allowedHosts" in warning


def test_a_mirrors_credentials_tell_lookups_apart() -> None:
    # Failures and in-flight lookups are cached by this key: a namespace with a credential
    # for the mirror must not share another's failure.
    plain = Credentials((BOB,))
    assert Credentials((BOB,), mirrors=(("m.example", ()),)).key == plain.key
    with_mirror = Credentials((BOB,), mirrors=(("m.example", (ALICE,)),))
    assert with_mirror.key != plain.key
    assert with_mirror.for_mirror("m.example") == (ALICE,)
    assert with_mirror.for_mirror("other.example") == ()

"""KubePullSecrets against a loopback fake apiserver; StaticPullSecrets and NoPullSecrets."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User

from tests.fake_apiserver import FakeApiServer, secret, service_account
from webhook.kube import (
    DOCKERCFG_TYPE,
    KubePullSecrets,
    NoPullSecrets,
    PullSecretSource,
    StaticPullSecrets,
    UnusableSecrets,
)
from webhook.metrics import Metrics
from webhook.oci.credential import PullContext
from webhook.oci.keychain import DockerKeyring
from webhook.oci.reference import ImageRef

REGISTRY = "registry.example.com"
APP = ImageRef.parse(f"{REGISTRY}/team/app:1.0")


def _auth(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


def _pull_secret(
    namespace: str, name: str, user: str, registry: str = REGISTRY
) -> dict[str, object]:
    return secret(namespace, name, {"auths": {registry: {"auth": _auth(user, f"{user}-pw")}}})


def _users(keyring: DockerKeyring, image: ImageRef = APP) -> list[str]:
    return [c.username for c in keyring.lookup(image)]


async def _eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


async def _ready_within(pull_secrets: KubePullSecrets, seconds: float) -> bool:
    """Whether every cache of ``pull_secrets`` completes its first list within ``seconds``."""
    try:
        await _eventually(pull_secrets.ready, seconds)
    except TimeoutError:
        return False
    return True


async def _users_eventually(
    cache: KubePullSecrets, namespace: str, pull: PullContext, expected: list[str]
) -> None:
    last: list[str] = []

    async def check() -> bool:
        nonlocal last
        last = _users(await cache.keyring_for(namespace, pull))
        return last == expected

    try:
        async with asyncio.timeout(5.0):
            while not await check():
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"users stayed {last}, expected {expected}")


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    fake = FakeApiServer()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def client(server: FakeApiServer) -> AsyncIterator[AsyncClient]:
    # KubeConfig.from_server gives a config without a user, which lightkube 1.0 rejects.
    config = KubeConfig.from_one(cluster=Cluster(server=server.url), user=User(token="t0ken"))
    kube = AsyncClient(config=config, trust_env=False)
    yield kube
    await kube.close()


@pytest.fixture
async def cache(server: FakeApiServer, client: AsyncClient) -> AsyncIterator[KubePullSecrets]:
    async with KubePullSecrets(client, backoff_initial=0.01, backoff_max=0.05) as pull_secrets:
        assert await _ready_within(pull_secrets, 5.0)
        # Each of the three caches has a watch open before a test changes anything.
        await _eventually(
            lambda: (
                server.open_watches("secrets") == 2 and server.open_watches("serviceaccounts") == 1
            )
        )
        yield pull_secrets


async def test_initial_list_populates_the_caches(
    server: FakeApiServer, client: AsyncClient
) -> None:
    server.put(_pull_secret("apps", "regcred", "pod-user"))
    server.put(service_account("apps", "default", ["sa-cred"]))
    server.put(_pull_secret("apps", "sa-cred", "sa-user"))
    server.put({**_pull_secret("apps", "opaque", "x"), "type": "Opaque"})
    pull_secrets = KubePullSecrets(client)
    assert not pull_secrets.ready()
    async with pull_secrets:
        assert await _ready_within(pull_secrets, 5.0)
        assert pull_secrets.ready()
        keyring = await pull_secrets.keyring_for("apps", PullContext(("regcred", "opaque")))
    assert _users(keyring) == ["pod-user", "sa-user"]
    assert [c.source for c in keyring.lookup(APP)] == ["secret apps/regcred", "secret apps/sa-cred"]
    # Secrets are listed by type with a field selector, cluster-wide.
    secret_lists = [r for r in server.requests if r.plural == "secrets" and not r.watch]
    assert sorted(r.params["fieldSelector"] for r in secret_lists) == [
        "type=kubernetes.io/dockercfg",
        "type=kubernetes.io/dockerconfigjson",
    ]
    assert all(r.path == "/api/v1/secrets" for r in secret_lists)


async def test_wait_ready_times_out_while_the_list_keeps_failing(
    server: FakeApiServer, client: AsyncClient
) -> None:
    for _ in range(1000):
        server.fail_next("serviceaccounts", watch=False, status=500)
    async with KubePullSecrets(client, backoff_initial=0.01, backoff_max=0.02) as pull_secrets:
        assert not await _ready_within(pull_secrets, 0.3)
        assert not pull_secrets.ready()
        assert server.count("serviceaccounts", watch=False) >= 2  # it retried


async def test_forbidden_secrets_count_as_listed_and_are_asked_again(
    server: FakeApiServer, client: AsyncClient
) -> None:
    server.put(_pull_secret("apps", "regcred", "u"))
    for _ in range(1000):
        server.fail_next("secrets", watch=False, status=403)
    async with KubePullSecrets(client, backoff_initial=0.01, backoff_max=0.02) as pull_secrets:
        # RBAC without Secrets must not leave every replica unready forever.
        assert await _ready_within(pull_secrets, 5.0)
        assert _users(await pull_secrets.keyring_for("apps", PullContext(("regcred",)))) == []
        before = server.count("secrets", watch=False)
        await asyncio.sleep(0.1)  # a real interval: the retry loop has no event to await
        assert server.count("secrets", watch=False) > before  # still asking


async def test_list_failure_is_retried_with_backoff(
    server: FakeApiServer, client: AsyncClient
) -> None:
    server.put(_pull_secret("apps", "regcred", "u"))
    server.fail_next("secrets", watch=False, status=503)
    server.fail_next("secrets", watch=False, status=503)
    async with KubePullSecrets(client, backoff_initial=0.01, backoff_max=0.05) as pull_secrets:
        assert await _ready_within(pull_secrets, 5.0)
        keyring = await pull_secrets.keyring_for("apps", PullContext(("regcred",)))
    assert _users(keyring) == ["u"]


async def test_added_modified_deleted_secret_is_reflected(
    server: FakeApiServer, cache: KubePullSecrets
) -> None:
    pull = PullContext(("regcred",))
    assert _users(await cache.keyring_for("apps", pull)) == []
    server.put(_pull_secret("apps", "regcred", "first"))
    await _users_eventually(cache, "apps", pull, ["first"])
    server.put(_pull_secret("apps", "regcred", "rotated"))
    await _users_eventually(cache, "apps", pull, ["rotated"])
    server.delete("secrets", "apps", "regcred")
    await _users_eventually(cache, "apps", pull, [])


async def test_legacy_dockercfg_secret_is_watched_too(
    server: FakeApiServer, cache: KubePullSecrets
) -> None:
    document = {REGISTRY: {"auth": _auth("legacy", "pw")}}
    server.put(secret("apps", "old", document, secret_type=DOCKERCFG_TYPE))
    await _users_eventually(cache, "apps", PullContext(("old",)), ["legacy"])


async def test_service_account_changes_are_reflected(
    server: FakeApiServer, cache: KubePullSecrets
) -> None:
    server.put(_pull_secret("apps", "a", "user-a"))
    server.put(_pull_secret("apps", "b", "user-b"))
    builder = PullContext(service_account="builder")
    server.put(service_account("apps", "builder", ["a"]))
    await _users_eventually(cache, "apps", builder, ["user-a"])
    server.put(service_account("apps", "builder", ["b", "a"]))
    await _users_eventually(cache, "apps", builder, ["user-b", "user-a"])
    server.delete("serviceaccounts", "apps", "builder")
    await _users_eventually(cache, "apps", builder, [])


async def test_pod_secrets_come_before_service_account_secrets(
    server: FakeApiServer, cache: KubePullSecrets
) -> None:
    server.put(_pull_secret("apps", "sa-cred", "sa-user"))
    server.put(_pull_secret("apps", "pod-cred-2", "pod-user-2"))
    server.put(_pull_secret("apps", "pod-cred-1", "pod-user-1"))
    server.put(service_account("apps", "default", ["sa-cred", "missing-sa-cred"]))
    server.put(service_account("apps", "runner", ["pod-cred-1"]))
    # Same registry key in every secret: the kubelet keeps the order the secrets were given.
    pull = PullContext(("pod-cred-1", "missing", "pod-cred-2"))
    await _users_eventually(cache, "apps", pull, ["pod-user-1", "pod-user-2", "sa-user"])
    # A named ServiceAccount replaces "default"; a secret named twice counts once.
    named = PullContext(("pod-cred-2",), service_account="runner")
    assert _users(await cache.keyring_for("apps", named)) == ["pod-user-2", "pod-user-1"]
    # Other namespaces' objects never apply.
    assert _users(await cache.keyring_for("other", pull)) == []


async def test_410_error_event_triggers_a_relist(
    server: FakeApiServer, cache: KubePullSecrets
) -> None:
    pull = PullContext(("regcred",))
    server.put(_pull_secret("apps", "regcred", "before"))
    server.put(_pull_secret("apps", "doomed", "doomed-user"))
    await _users_eventually(cache, "apps", pull, ["before"])
    await _users_eventually(cache, "apps", PullContext(("doomed",)), ["doomed-user"])
    lists_before = server.count("secrets", watch=False)
    # These changes reach no watch (their events are compacted away); only a relist sees them.
    server.put(_pull_secret("apps", "regcred", "after"), notify=False)
    server.put(_pull_secret("apps", "extra", "extra-user"), notify=False)
    server.delete("secrets", "apps", "doomed", notify=False)
    assert _users(await cache.keyring_for("apps", pull)) == ["before"]
    server.expire()
    await _users_eventually(cache, "apps", pull, ["after"])
    await _users_eventually(cache, "apps", PullContext(("extra",)), ["extra-user"])
    assert _users(await cache.keyring_for("apps", PullContext(("doomed",)))) == []
    assert server.count("secrets", watch=False) >= lists_before + 2  # both secret caches


async def test_http_410_on_rewatch_triggers_a_relist(
    server: FakeApiServer, cache: KubePullSecrets
) -> None:
    pull = PullContext(service_account="builder")
    server.put(_pull_secret("apps", "regcred", "u"))
    server.put(service_account("apps", "builder", []), notify=False)
    lists_before = server.count("serviceaccounts", watch=False)
    server.fail_next("serviceaccounts", watch=True, status=410)
    server.put(service_account("apps", "builder", ["regcred"]), notify=False)
    server.close_watches()  # the client rewatches from its last version and gets HTTP 410
    await _users_eventually(cache, "apps", pull, ["u"])
    assert server.count("serviceaccounts", watch=False) == lists_before + 1


async def test_watch_server_error_backs_off_and_recovers(
    server: FakeApiServer, cache: KubePullSecrets, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webhook.kube")
    pull = PullContext(("regcred",))
    for _ in range(3):
        server.fail_next("secrets", watch=True, status=500)
    server.put(_pull_secret("apps", "regcred", "late"), notify=False)
    server.close_watches()
    await _users_eventually(cache, "apps", pull, ["late"])
    # One line when the watch is back, after the warnings about each failure.
    await _eventually(lambda: "watch reconnected:" in caplog.text)
    reconnected = [r for r in caplog.records if "watch reconnected:" in r.getMessage()]
    assert all(r.levelno == logging.INFO for r in reconnected)
    assert any("dockerconfigjson (1 listed)" in r.getMessage() for r in reconnected), caplog.text


async def test_clean_watch_close_rewatches_without_relisting(
    server: FakeApiServer, cache: KubePullSecrets
) -> None:
    lists = server.count(watch=False)
    server.close_watches()
    server.put(_pull_secret("apps", "regcred", "after-reconnect"))
    await _users_eventually(cache, "apps", PullContext(("regcred",)), ["after-reconnect"])
    assert server.count(watch=False) == lists


async def test_keyring_for_makes_no_api_requests(
    server: FakeApiServer, cache: KubePullSecrets
) -> None:
    server.put(_pull_secret("apps", "regcred", "u"))
    server.put(service_account("apps", "default", ["regcred"]))
    await _users_eventually(cache, "apps", PullContext(), ["u"])
    requests = len(server.requests)
    for i in range(2000):
        pull = PullContext((f"secret-{i % 7}", "regcred"), service_account=None)
        keyring = await cache.keyring_for("apps" if i % 2 else f"ns-{i % 13}", pull)
        assert len(keyring) <= 1
    assert len(server.requests) == requests


async def test_a_secret_the_kubelet_refuses_is_reported_once_and_resolved_without(
    server: FakeApiServer, client: AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    metrics = Metrics()
    # One undecodable entry: the kubelet refuses the whole secret, its good entry too.
    bad = secret(
        "apps",
        "bad",
        {"auths": {REGISTRY: {"auth": _auth("bad-user", "SECRETPW")}, "x.io": {"auth": "SECRET!"}}},
    )
    server.put(bad)
    server.put(_pull_secret("apps", "good", "good-user"))
    pull = PullContext(("bad", "good"))
    unusable = UnusableSecrets(metrics.pull_secret_unusable)
    async with KubePullSecrets(client, resync_seconds=0.1, unusable=unusable) as cache:
        await _users_eventually(cache, "apps", pull, ["good-user"])
        # Relists read it again and again; it is reported once.
        lists = server.count("secrets", watch=False)
        await _eventually(lambda: server.count("secrets", watch=False) >= lists + 4)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("secret apps/bad" in r.getMessage() for r in warnings) == 1
        assert _unusable_count(metrics, "apps") == 1.0
        # Fixed, it is used; broken again (other content), it is reported again.
        server.put(_pull_secret("apps", "bad", "fixed"))
        await _users_eventually(cache, "apps", pull, ["fixed", "good-user"])
        server.put(secret("apps", "bad", {"auths": {REGISTRY: {"username": 1}}}))
        await _users_eventually(cache, "apps", pull, ["good-user"])
        assert _unusable_count(metrics, "apps") == 2.0
    assert "registry 'x.io': \"auth\" is not base64" in caplog.text
    assert "the kubelet fails every pull" in caplog.text
    for secret_text in ("SECRET", "bad-user", "good-user-pw", bad["data"][".dockerconfigjson"]):
        assert secret_text not in caplog.text


def _unusable_count(metrics: Metrics, namespace: str) -> float:
    value = metrics.registry.get_sample_value(
        "pinhook_pull_secrets_unusable_total", {"namespace": namespace}
    )
    return value or 0.0


async def test_a_secret_the_kubelet_reads_is_never_skipped(
    server: FakeApiServer, cache: KubePullSecrets
) -> None:
    # Forms the kubelet tolerates: unpadded base64 with a newline, upper-case field names, a
    # null entry, unknown fields, an "auth" that overrides username and password.
    auth = base64.b64encode(b"tolerated:pw").decode().rstrip("=")
    document = {
        "Auths": {
            REGISTRY: {"AUTH": auth[:4] + "\n" + auth[4:], "username": "x", "identitytoken": 1},
            "null.io": None,
        },
        "credHelpers": {"r.io": "ignored"},
    }
    server.put(secret("apps", "tolerated", document))
    await _users_eventually(cache, "apps", PullContext(("tolerated",)), ["tolerated"])


async def test_static_pull_secrets_report_a_refused_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = secret("apps", "bad", {"auths": {REGISTRY: {"auth": "SECRETVALUE"}}})
    reported: list[str] = []
    source = StaticPullSecrets.from_manifests([bad], unusable=UnusableSecrets(reported.append))
    assert _users(await source.keyring_for("apps", PullContext(("bad",)))) == []
    assert reported == ["apps"]
    assert "secret apps/bad" in caplog.text
    assert "SECRETVALUE" not in caplog.text


async def test_exit_cancels_the_watch_tasks(server: FakeApiServer, client: AsyncClient) -> None:
    before = {t for t in asyncio.all_tasks() if t.get_name().startswith("pinhook-watch")}
    async with KubePullSecrets(client) as pull_secrets:
        assert await _ready_within(pull_secrets, 5.0)
        running = {t for t in asyncio.all_tasks() if t.get_name().startswith("pinhook-watch")}
        assert len(running - before) == 3
    assert all(t.done() for t in running - before)


# -- StaticPullSecrets / NoPullSecrets ------------------------------------------------------


async def test_static_pull_secrets_follow_the_same_rules() -> None:
    def keyring(user: str) -> DockerKeyring:
        document = {"auths": {REGISTRY: {"auth": _auth(user, "pw")}}}
        return DockerKeyring.from_dockerconfigjson(json.dumps(document).encode(), source=user)

    source: PullSecretSource = StaticPullSecrets(
        {("apps", "pod"): keyring("pod-user"), ("apps", "sa"): keyring("sa-user")},
        {("apps", "default"): ["sa", "missing"]},
    )
    found = await source.keyring_for("apps", PullContext(("pod", "nope")))
    assert _users(found) == ["pod-user", "sa-user"]
    assert _users(await source.keyring_for("apps", PullContext(service_account="x"))) == []


async def test_static_pull_secrets_from_manifests() -> None:
    string_data = {"auths": {REGISTRY: {"username": "plain", "password": "pw"}}}
    manifests: list[dict[str, Any]] = [
        _pull_secret("apps", "b64", "from-data"),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "plain"},  # namespace defaults
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": json.dumps(string_data)},
        },
        service_account("apps", "default", ["b64"]),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ignored"}},
    ]
    source = StaticPullSecrets.from_manifests(manifests, default_namespace="apps")
    assert _users(await source.keyring_for("apps", PullContext(("plain",)))) == [
        "plain",
        "from-data",
    ]


async def test_no_pull_secrets_is_anonymous() -> None:
    source: PullSecretSource = NoPullSecrets()
    assert len(await source.keyring_for("apps", PullContext(("anything",)))) == 0


async def test_periodic_resync_relists(server: FakeApiServer, client: AsyncClient) -> None:
    async with KubePullSecrets(client, resync_seconds=0.2) as pull_secrets:
        assert await _ready_within(pull_secrets, 5.0)
        # No watch will ever see this change; only the periodic relist can.
        server.put(_pull_secret("apps", "regcred", "silent"), notify=False)
        await _users_eventually(pull_secrets, "apps", PullContext(("regcred",)), ["silent"])

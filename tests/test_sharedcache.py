"""Several replicas, one Redis: a real ``redis-server`` on loopback (tests/harness/redisserver.py),
a real registry behind the counting proxy, and each replica a ``Runtime`` of its own with its
own registry client, as ``pinhook serve`` builds it (test_scale_out.py runs real processes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from tests.harness.fixtures import RegistryEnv
from tests.harness.proxy import CountingProxy, ProxiedRequest
from tests.harness.redisserver import RunningRedis
from tests.reviews import apply_response, body, review
from tests.test_hostile_objects import arrived_long_ago
from webhook.admission import parse_review
from webhook.app import create_app
from webhook.config import CacheSettings, RedisSettings, load_settings
from webhook.errors import ConfigError, NotFound
from webhook.kube import NoPullSecrets
from webhook.metrics import Metrics
from webhook.mutate import Mutator
from webhook.oci.reference import ImageRef
from webhook.oci.registry import RegistryClient
from webhook.owners import OwnerPins
from webhook.resolve import CachingResolver, PullScope, RegistryDigestResolver
from webhook.runtime import Runtime, registry_options
from webhook.sharedcache import (
    ANONYMOUS_SCOPE,
    BreakerState,
    CircuitBreaker,
    Keys,
    RedisSharedCache,
    scope_of,
)

PREFIX = "pinhook:"
KEYS = Keys(PREFIX)
PASSWORD = "open-sesame"


@pytest.fixture
def redis_server() -> Iterator[RunningRedis]:
    with RunningRedis() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RunningRedis) -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    yield client
    client.close()


def address(server: RunningRedis) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


def config(registry_host: str, server: RunningRedis | None, redis_extra: str = "") -> str:
    text = (
        f'registry:\n  insecure: ["{registry_host}"]\n  allowedHosts: ["{registry_host}"]\n'
        "  timeoutSeconds: 5\n"
    )
    if server is not None:
        # Generous operation timeouts: the machine is shared, and these tests are about
        # answers, not speed (the slow-Redis test sets its own).
        text += (
            f"cache:\n  redis:\n    url: {address(server)}\n    timeoutSeconds: 1\n"
            f"    lockSeconds: 1\n    openSeconds: 0.2\n{redis_extra}"
        )
    return text


@asynccontextmanager
async def fleet(
    text: str, replicas: int = 3, environ: dict[str, str] | None = None
) -> AsyncIterator[list[Runtime]]:
    """``replicas`` webhooks built from one config, as a Deployment's Pods are."""
    settings = load_settings(text)
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(Runtime(settings, environ=environ or {}))
            for _ in range(replicas)
        ]


def pod(image: str, owner: str | None = None, name: str = "p") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if owner is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": f"web-{owner[:5]}",
                "uid": owner,
                "controller": True,
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "c", "image": image}]},
    }


async def admit(runtime: Runtime, obj: dict[str, Any]) -> str:
    """The image the API server would store, after this replica's answer."""
    outcome = await runtime.mutator.review(parse_review(orjson.dumps(review(obj))))
    for op in outcome.patch:
        if op["path"] == "/spec/containers/0/image":
            image: str = op["value"]
            return image
    image = obj["spec"]["containers"][0]["image"]
    return image


def metric(runtime: Runtime, name: str, **labels: str) -> float:
    value = runtime.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def operations(runtime: Runtime, operation: str, result: str) -> float:
    return metric(
        runtime, "pinhook_shared_cache_operations_total", operation=operation, result=result
    )


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for a state another task or process reaches; fails naming it."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


def cooled_down(runtime: Runtime, open_seconds: float = 0.2) -> bool:
    """The breaker will let a probe through (``openSeconds`` in ``config``)."""
    return time.monotonic() - runtime.shared_cache.breaker.since >= open_seconds


def manifest_requests(proxy: CountingProxy) -> int:
    return proxy.count(None, "/manifests/")


# -- one registry request per new tag, whatever the number of replicas ----------------------


async def test_one_manifest_request_per_new_tag_across_replicas_under_200_admissions(
    registry: RegistryEnv, registry_proxy: CountingProxy, redis_server: RunningRedis
) -> None:
    pushed = registry.push.index("fleet/burst", "1.0")
    image = f"{registry_proxy.host}/fleet/burst:1.0"
    async with fleet(config(registry_proxy.host, redis_server)) as replicas:
        await eventually(lambda: all(r.shared_cache.subscribed for r in replicas), "subscribed")
        registry_proxy.reset()
        registry_proxy.hold()  # the first lookup waits at the registry while the rest arrive
        admissions = [
            asyncio.create_task(admit(replicas[i % 3], pod(image, name=f"p{i}")))
            for i in range(200)
        ]
        await asyncio.to_thread(registry_proxy.wait_for_count, 1, "HEAD", "/manifests/")
        # The two replicas that did not get the lookup wait for the one that did.
        await eventually(
            lambda: (
                sum(
                    metric(
                        r, "pinhook_shared_cache_operations_total", operation="claim", result="busy"
                    )
                    > 0
                    for r in replicas
                )
                == 2
            ),
            "two replicas waiting on the fleet's lookup",
        )
        registry_proxy.release()
        images = await asyncio.gather(*admissions)
        waits = [
            metric(r, "pinhook_shared_cache_lock_waits_total", outcome="answered") for r in replicas
        ]
    assert set(images) == {f"{image}@{pushed.digest}"}
    assert manifest_requests(registry_proxy) == 1
    assert registry_proxy.count(None, "/v2/fleet/burst/") == 1
    assert sorted(waits) == [0, 1, 1]  # one lookup per replica: the local singleflight


async def test_without_redis_each_replica_asks_the_registry(
    registry: RegistryEnv, registry_proxy: CountingProxy
) -> None:
    registry.push.index("fleet/alone", "1.0")
    image = f"{registry_proxy.host}/fleet/alone:1.0"
    async with fleet(config(registry_proxy.host, None)) as replicas:
        registry_proxy.reset()
        await asyncio.gather(*(admit(replicas[i % 3], pod(image)) for i in range(30)))
    assert manifest_requests(registry_proxy) == 3  # the figure the shared cache brings to 1


# -- one digest across the fleet ----------------------------------------------------------


async def test_replicas_agree_on_a_digest_after_the_tag_moved(
    registry: RegistryEnv, registry_proxy: CountingProxy, redis_server: RunningRedis
) -> None:
    first = registry.push.image("fleet/moving", "v1")
    image = f"{registry_proxy.host}/fleet/moving:v1"
    async with fleet(config(registry_proxy.host, redis_server)) as replicas:
        assert await admit(replicas[0], pod(image)) == f"{image}@{first.digest}"
        moved = registry.push.move_tag(first)
        assert moved.digest != first.digest
        # Replicas that never saw the tag take the fleet's answer, not the registry's new one.
        assert await admit(replicas[1], pod(image)) == f"{image}@{first.digest}"
        assert await admit(replicas[2], pod(image)) == f"{image}@{first.digest}"
    assert manifest_requests(registry_proxy) == 1


async def test_a_shared_entry_expires_here_when_it_expires_everywhere(
    redis_server: RunningRedis, redis_client: redis.Redis
) -> None:
    """A replica that copies an entry late keeps it only for the time it has left in Redis,
    and counts stale-on-error from when the registry answered, not from the copy."""

    class NoRegistry:
        async def credentials(self, ref: ImageRef, scope: PullScope, deadline: float) -> Any:
            from webhook.oci.credential import ANONYMOUS

            return ANONYMOUS

        async def digest(self, ref: ImageRef, credentials: Any, deadline: float) -> str:
            raise AssertionError("the shared entry must answer")

        async def has(self, ref: ImageRef, credentials: Any, deadline: float) -> bool:
            raise AssertionError("not asked")

    ref = ImageRef.parse("registry.example/team/app:1")
    digest = "sha256:" + "a" * 64
    written = time.time() - 250  # by another replica, 250 s ago, with a TTL of 300 s
    value = {"digest": digest, "resolvedAt": written, "ttlSeconds": 300}
    redis_client.set(KEYS.digest(ref.name, "1"), orjson.dumps(value), px=50_000)

    now = [1000.0]
    settings = CacheSettings(ttl_seconds=300)
    shared_settings = RedisSettings(url=address(redis_server), timeout_seconds=1)
    async with RedisSharedCache(shared_settings) as shared:
        cache = CachingResolver(NoRegistry(), settings, clock=lambda: now[0], shared=shared)
        answer = await cache.resolve(ref, PullScope(None), asyncio.get_running_loop().time() + 5)
        assert answer.digest == digest
        now[0] += 45
        assert cache.peek(ref) == digest
        now[0] += 10  # 55 s later: gone here as in Redis, not 300 s after the copy
        assert cache.peek(ref) is None
        entry = cache._entries[(ref.name, "1")]
        assert 745 <= entry.fetched <= 755  # 250 s before the copy, on this clock


# -- one digest per rollout, across the fleet ---------------------------------------------

RS_A = "0d0c4c52-0000-4000-8000-00000000000a"
RS_B = "0d0c4c52-0000-4000-8000-00000000000b"


async def test_pods_of_one_replicaset_get_one_digest_on_every_replica(
    registry: RegistryEnv,
    registry_proxy: CountingProxy,
    redis_server: RunningRedis,
    redis_client: redis.Redis,
) -> None:
    first = registry.push.image("fleet/rollout", "stable")
    image = f"{registry_proxy.host}/fleet/rollout:stable"
    name = ImageRef.parse(image).name
    async with fleet(config(registry_proxy.host, redis_server)) as (r0, r1, r2):
        assert await admit(r0, pod(image, RS_A)) == f"{image}@{first.digest}"
        moved = registry.push.move_tag(first)
        redis_client.delete(KEYS.digest(name, "stable"))  # the fleet's entry expired
        # A bare Pod on r1 gets the new digest, now the fleet's entry for the tag...
        assert await admit(r1, pod(image)) == f"{image}@{moved.digest}"
        # ...but the ReplicaSet's Pods keep its first digest, on a replica that never saw
        # one of them, and on one whose own cache holds the newer digest.
        assert await admit(r2, pod(image, RS_A, name="a2")) == f"{image}@{first.digest}"
        assert r1.mutator.resolver.peek(ImageRef.parse(image)) == moved.digest
        assert await admit(r1, pod(image, RS_A, name="a3")) == f"{image}@{first.digest}"
        # A new ReplicaSet is a new rollout.
        assert await admit(r2, pod(image, RS_B)) == f"{image}@{moved.digest}"
        assert await admit(r0, pod(image, RS_B, name="b2")) == f"{image}@{moved.digest}"
    owner = redis_client.get(KEYS.owner(f"default/{RS_A}", f"{name}:stable"))
    assert owner == first.digest.encode()
    ttl = redis_client.pttl(KEYS.owner(f"default/{RS_A}", f"{name}:stable"))
    assert 23 * 3600 * 1000 < ttl <= 24 * 3600 * 1000  # ownerPinning.ttlSeconds, a day


async def test_an_overloaded_replica_pins_an_owners_first_pod_from_its_cache(
    registry: RegistryEnv,
    registry_proxy: CountingProxy,
    redis_server: RunningRedis,
    redis_client: redis.Redis,
) -> None:
    pushed = registry.push.image("fleet/busy", "1")
    image = f"{registry_proxy.host}/fleet/busy:1"
    text = config(registry_proxy.host, redis_server) + "requireDigest: true\n"
    async with fleet(text, replicas=1) as (replica,):
        assert await admit(replica, pod(image)) == f"{image}@{pushed.digest}"  # cached here
        # The owner's first Pod waited 9 s behind a saturated CPU: no time to ask Redis for
        # the owner's decision, but the cache knows the digest; a denial would be by policy.
        late = arrived_long_ago(create_app(replica), seconds=9.0)
        transport = httpx.ASGITransport(app=late)
        async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as client:
            answer = await client.post(
                "/mutate?timeout=10s", content=body(review(pod(image, RS_A)))
            )
        response = answer.json()["response"]
        assert response["allowed"], response
        stored = apply_response(pod(image, RS_A), response)
        assert stored["spec"]["containers"][0]["image"] == f"{image}@{pushed.digest}"
        # Not recorded as the owner's decision: the fleet's first decision may differ.
        assert replica.mutator.owners is not None and len(replica.mutator.owners) == 0
    name = ImageRef.parse(image).name
    assert redis_client.get(KEYS.owner(f"default/{RS_A}", f"{name}:1")) is None


async def test_the_first_owner_decision_in_the_fleet_wins(redis_server: RunningRedis) -> None:
    settings = RedisSettings(url=address(redis_server), timeout_seconds=1)
    one, other = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    async with RedisSharedCache(settings) as a, RedisSharedCache(settings) as b:
        deadline = asyncio.get_running_loop().time() + 5
        assert await a.owner_digest("web/rs", "r.example/app:1", deadline) is None
        decided = await asyncio.gather(
            a.decide_owner("web/rs", "r.example/app:1", one, 60, deadline),
            b.decide_owner("web/rs", "r.example/app:1", other, 60, deadline),
        )
        assert decided[0] == decided[1] in (one, other)
        assert await b.owner_digest("web/rs", "r.example/app:1", deadline) == decided[0]


# -- Redis down, slow, or back ------------------------------------------------------------


async def test_answers_stay_right_while_redis_is_stopped_and_after_it_returns(
    registry: RegistryEnv, registry_proxy: CountingProxy, redis_server: RunningRedis
) -> None:
    pushed = {tag: registry.push.image("fleet/outage", tag) for tag in ("a", "b", "c", "d")}

    def image(tag: str) -> str:
        return f"{registry_proxy.host}/fleet/outage:{tag}"

    async with fleet(config(registry_proxy.host, redis_server)) as replicas:
        assert await admit(replicas[0], pod(image("a"))) == f"{image('a')}@{pushed['a'].digest}"
        redis_server.stop()
        for i, replica in enumerate(replicas):
            for tag in ("b", "c"):
                assert await admit(replica, pod(image(tag))) == f"{image(tag)}@{pushed[tag].digest}"
            assert replica.shared_cache.breaker.state is BreakerState.OPEN, i
            assert metric(replica, "pinhook_shared_cache_breaker_state") == 2
            ready, reason = replica.readiness()
            assert ready
            assert "unavailable" in reason and "the local cache and the registries" in reason
        # Each replica asked the registry itself meanwhile: 3 replicas x 2 tags.
        assert registry_proxy.count(None, "/manifests/b") == 3

        redis_server.start()
        # After openSeconds a probe finds Redis again and the breaker closes.
        await eventually(lambda: cooled_down(replicas[0]), "breaker cooldown")
        assert await admit(replicas[0], pod(image("d"))) == f"{image('d')}@{pushed['d'].digest}"
        assert replicas[0].shared_cache.breaker.state is BreakerState.CLOSED
        assert replicas[0].readiness()[1].endswith(": in use")
        # The answer went to Redis again: another replica takes it from there.
        await eventually(lambda: cooled_down(replicas[1]), "breaker cooldown")
        assert await admit(replicas[1], pod(image("d"))) == f"{image('d')}@{pushed['d'].digest}"
    assert registry_proxy.count(None, "/manifests/d") == 1


async def test_a_hanging_redis_costs_each_request_at_most_its_timeout(
    registry: RegistryEnv, registry_proxy: CountingProxy, redis_server: RunningRedis
) -> None:
    pushed = {tag: registry.push.image("fleet/hang", tag) for tag in ("a", "b", "c", "d")}

    def image(tag: str) -> str:
        return f"{registry_proxy.host}/fleet/hang:{tag}"

    text = config(registry_proxy.host, None) + (
        f"cache:\n  redis:\n    url: {address(redis_server)}\n    timeoutSeconds: 0.2\n"
        "    openSeconds: 60\n    failuresToOpen: 2\n"
    )
    async with fleet(text, replicas=1) as (replica,):
        assert await admit(replica, pod(image("a"))) == f"{image('a')}@{pushed['a'].digest}"
        redis_server.pause()
        try:
            # The first lookup waits out two Redis timeouts and opens the breaker...
            assert await admit(replica, pod(image("b"))) == f"{image('b')}@{pushed['b'].digest}"
            assert replica.shared_cache.breaker.state is BreakerState.OPEN
            timeouts = metric(
                replica,
                "pinhook_shared_cache_operations_total",
                operation="recall",
                result="timeout",
            )
            # ...after which Redis is not asked at all.
            for tag in ("c", "d"):
                assert await admit(replica, pod(image(tag))) == f"{image(tag)}@{pushed[tag].digest}"
            skipped = metric(
                replica,
                "pinhook_shared_cache_operations_total",
                operation="recall",
                result="skipped",
            )
        finally:
            redis_server.resume()
    assert timeouts == 1
    assert skipped == 2


# An owner's digest is asked on an admission's behalf: within its deadline, however long
# timeoutSeconds (5 s here) would let Redis take. ?timeout=3s leaves the admission 1.5 s to
# resolve, and app.py gives up on the whole review 0.75 s after that.
HANGING_REDIS = "    timeoutSeconds: 5\n    openSeconds: 60\n    failuresToOpen: 5\n"


def redis_config(registry_host: str, server: RunningRedis) -> str:
    return config(registry_host, None) + (
        f"cache:\n  redis:\n    url: {address(server)}\n{HANGING_REDIS}"
    )


async def admitted_in_time(service: Any, obj: dict[str, Any]) -> str:
    """The image the API server would store after the webhook's answer over HTTP, with the
    API server's ``?timeout=3s``."""
    transport = httpx.ASGITransport(app=create_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://webhook") as client:
        answer = await client.post("/mutate?timeout=3s", content=body(review(obj)))
    response = answer.json()["response"]
    assert response["allowed"], response
    image: str = apply_response(obj, response)["spec"]["containers"][0]["image"]
    return image


async def test_a_hanging_redis_does_not_cost_an_owner_pod_its_pin(
    registry: RegistryEnv, registry_proxy: CountingProxy, redis_server: RunningRedis
) -> None:
    pushed = registry.push.image("fleet/owned", "1")
    image = f"{registry_proxy.host}/fleet/owned:1"
    async with fleet(redis_config(registry_proxy.host, redis_server), replicas=1) as (replica,):
        assert await admit(replica, pod(image)) == f"{image}@{pushed.digest}"  # cached here
        redis_server.pause()
        try:
            # The owner's decision is not known by the deadline: the cached digest, recorded
            # here only (Redis is not asked again once the deadline has passed).
            pinned = await admitted_in_time(replica, pod(image, RS_A))
        finally:
            redis_server.resume()
        assert pinned == f"{image}@{pushed.digest}"
        assert operations(replica, "owner", "deadline") == 1
        assert operations(replica, "decide", "deadline") == 1
        assert replica.shared_cache.breaker.state is BreakerState.CLOSED


async def test_redis_hanging_while_an_owner_decides_leaves_the_resolved_digest(
    registry: RegistryEnv, registry_proxy: CountingProxy, redis_server: RunningRedis
) -> None:
    pushed = registry.push.image("fleet/deciding", "1")
    image = f"{registry_proxy.host}/fleet/deciding:1"
    settings = load_settings(redis_config(registry_proxy.host, redis_server))
    assert settings.cache.redis is not None
    metrics = Metrics()

    class Replica:
        """Owner decisions in Redis; digests in this replica's own cache only, so that the
        registry's answer does not wait on Redis."""

        def __init__(self, mutator: Mutator) -> None:
            self.metrics = metrics
            self.mutator = mutator

        def readiness(self) -> tuple[bool, str]:
            return True, "ok"

    def pause_redis_at_the_registry(request: ProxiedRequest) -> None:
        if "/manifests/" in request.path:
            redis_server.pause()  # after the owner's recall, before its decision

    async with (
        RegistryClient(registry_options(settings)) as client,
        RedisSharedCache(settings.cache.redis, metrics=metrics) as shared,
    ):
        cache = CachingResolver(RegistryDigestResolver(client, NoPullSecrets()), settings.cache)
        owners = OwnerPins(settings.cache.owner_pinning, 100, shared, metrics=metrics)
        replica = Replica(Mutator(settings, cache, metrics, owners))
        registry_proxy.interceptor = pause_redis_at_the_registry
        try:
            pinned = await admitted_in_time(replica, pod(image, RS_A))
        finally:
            redis_server.resume()
    assert pinned == f"{image}@{pushed.digest}"
    value = metrics.registry.get_sample_value
    labels = {"operation": "owner", "result": "miss"}
    assert value("pinhook_shared_cache_operations_total", labels) == 1
    labels = {"operation": "decide", "result": "deadline"}
    assert value("pinhook_shared_cache_operations_total", labels) == 1


async def test_a_replica_that_died_holding_the_lock_delays_the_others_by_its_expiry(
    registry: RegistryEnv,
    registry_proxy: CountingProxy,
    redis_server: RunningRedis,
    redis_client: redis.Redis,
) -> None:
    pushed = registry.push.image("fleet/orphan", "1")
    image = f"{registry_proxy.host}/fleet/orphan:1"
    name = ImageRef.parse(image).name
    async with fleet(config(registry_proxy.host, redis_server)) as replicas:
        # A replica took the lookup (lockSeconds: 1) and died before it answered.
        assert redis_client.set(KEYS.lock(name, "1", ANONYMOUS_SCOPE), "dead", nx=True, px=1000)
        registry_proxy.reset()
        images = await asyncio.gather(*(admit(replicas[i % 3], pod(image)) for i in range(30)))
        expired = [
            metric(r, "pinhook_shared_cache_lock_waits_total", outcome="expired") for r in replicas
        ]
        answered = [
            metric(r, "pinhook_shared_cache_lock_waits_total", outcome="answered") for r in replicas
        ]
    # Within the registry deadline (5 s), so the lock's expiry (1 s) was all they waited.
    assert set(images) == {f"{image}@{pushed.digest}"}
    assert manifest_requests(registry_proxy) == 1  # one of them took over, the others waited
    assert sorted(expired) == [0, 0, 1]
    assert sorted(answered) == [0, 1, 1]
    assert redis_client.get(KEYS.lock(name, "1", ANONYMOUS_SCOPE)) is None


async def test_not_found_is_shared_per_pull_scope(
    registry: RegistryEnv, registry_proxy: CountingProxy, redis_server: RunningRedis
) -> None:
    image = f"{registry_proxy.host}/fleet/missing:1"
    async with fleet(config(registry_proxy.host, redis_server)) as replicas:
        assert await admit(replicas[0], pod(image)) == image  # left as is, by policy
        asked = manifest_requests(registry_proxy)
        for replica in replicas[1:]:
            assert await admit(replica, pod(image)) == image
        assert manifest_requests(registry_proxy) == asked
        cache = replicas[2].shared_cache
        answer = await cache.recall(ImageRef.parse(image).name, "1", ANONYMOUS_SCOPE)
        assert answer is not None and isinstance(answer.error(), NotFound)
        # Other credentials never share it.
        assert await cache.recall(ImageRef.parse(image).name, "1", scope_of("bob:abc")) is None


# -- credentials for Redis ----------------------------------------------------------------


async def test_password_from_a_file_or_the_environment_never_from_plain_config(
    registry: RegistryEnv, registry_proxy: CountingProxy, tmp_path: Path
) -> None:
    pushed = registry.push.image("fleet/auth", "1")
    image = f"{registry_proxy.host}/fleet/auth:1"
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    with RunningRedis(password=PASSWORD) as server:
        with pytest.raises(ConfigError) as rejected:
            load_settings(
                config(registry_proxy.host, None) + f"cache: {{redis: {{url: {server.url}}}}}"
            )
        assert "carries a password" in str(rejected.value)
        assert PASSWORD not in str(rejected.value)

        from_file = config(registry_proxy.host, server, f"    passwordFile: {secret}\n")
        async with fleet(from_file, replicas=1) as (first,):
            assert await admit(first, pod(image)) == f"{image}@{pushed.digest}"
            assert first.shared_cache.breaker.state is BreakerState.CLOSED
        from_env = config(registry_proxy.host, server)
        async with fleet(from_env, 1, {"PINHOOK_REDIS_PASSWORD": PASSWORD}) as (second,):
            registry_proxy.reset()
            assert await admit(second, pod(image)) == f"{image}@{pushed.digest}"
            assert manifest_requests(registry_proxy) == 0  # the first replica's answer
        wrong = tmp_path / "wrong"
        wrong.write_text("guess")
        async with fleet(
            config(registry_proxy.host, server, f"    passwordFile: {wrong}\n"), 1
        ) as (third,):
            assert await admit(third, pod(image)) == f"{image}@{pushed.digest}"
            assert third.shared_cache.breaker.state is BreakerState.OPEN
            assert "guess" not in third.readiness()[1]


async def test_an_unreadable_url_file_is_a_config_error_that_names_no_secret(
    tmp_path: Path,
) -> None:
    url_file = tmp_path / "url"
    url_file.write_text("http://user:hunter2@example")
    settings = load_settings(f"cache: {{redis: {{urlFile: {url_file}}}}}")
    with pytest.raises(ConfigError) as rejected:
        async with Runtime(settings, environ={}):
            pass
    assert "cache.redis.urlFile" in str(rejected.value) and "hunter2" not in str(rejected.value)
    missing = load_settings(f"cache: {{redis: {{urlFile: {tmp_path / 'none'}}}}}")
    with pytest.raises(ConfigError, match="cannot read"):
        async with Runtime(missing, environ={}):
            pass


# -- the breaker on its own ---------------------------------------------------------------


def test_breaker_opens_after_failures_in_a_row_and_probes_once_after_cooldown() -> None:
    now = [0.0]
    states: list[BreakerState] = []
    breaker = CircuitBreaker(3, 10, clock=lambda: now[0], on_change=states.append)
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    breaker.succeeded()  # a success in between: the count starts again
    for _ in range(3):
        assert breaker.allow()
        breaker.failed()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN and not breaker.allow()
    breaker.failed()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 20.0
    assert breaker.allow()
    breaker.abandoned()  # the probe's caller gave up: another may probe
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    assert states == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_keys_hold_no_credentials() -> None:
    scope = scope_of("bob:0123456789abcdef|alice:fedcba9876543210")
    assert len(scope) == 16 and "bob" not in scope and "alice" not in scope
    assert scope_of("") == ANONYMOUS_SCOPE
    assert KEYS.lock("r.example/a", "1", scope) == f"pinhook:lock:r.example/a:1:{scope}"


async def test_metrics_start_closed() -> None:
    metrics = Metrics()
    cache = RedisSharedCache(RedisSettings(url="redis://127.0.0.1:1/0"), metrics=metrics)
    assert metrics.registry.get_sample_value("pinhook_shared_cache_breaker_state") == 0
    await cache.aclose()


@pytest.mark.parametrize(
    ("redis_yaml", "message"),
    [
        ("{}", "give exactly one of url and urlFile"),
        ("{url: 'redis://h:6379', urlFile: /run/url}", "give exactly one of url and urlFile"),
        ("{url: 'http://h:6379'}", "must be a redis://, rediss://, unix:// URL"),
        ("{url: 'redis://'}", "names no host"),
        ("{url: 'redis://h/0?password=x'}", "carries a password"),
        ("{url: 'redis://h', keyPrefix: 'a b'}", "must not contain whitespace"),
        ("{url: 'redis://h', lockSeconds: 0}", "greater than or equal to 0.1"),
        ("{url: 'redis://h', timeoutSeconds: 30}", "less than or equal to 5"),
    ],
)
def test_redis_settings_are_checked(redis_yaml: str, message: str) -> None:
    with pytest.raises(ConfigError) as rejected:
        load_settings(f"cache: {{redis: {redis_yaml}}}")
    assert message in str(rejected.value)
    assert "cache.redis" in str(rejected.value)

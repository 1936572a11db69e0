"""One object, or one registry, cannot take pinhook out of service for everyone else.

Against the real registry (tests/harness) for the happy path; a loopback server of our own
plays the registry that never answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import orjson
import pytest

from tests.faults import FaultServer, Reply, manifest_reply, sample_index, sha256_digest
from tests.harness.fixtures import RegistryEnv
from tests.reviews import body, review
from webhook import errors
from webhook.admission import parse_review
from webhook.app import create_app
from webhook.config import Settings, load_settings
from webhook.kube import NoPullSecrets
from webhook.metrics import Metrics
from webhook.mutate import Mutator
from webhook.oci.credential import ANONYMOUS
from webhook.oci.reference import ImageRef
from webhook.oci.registry import RegistryClient
from webhook.oci.transport import RegistryOptions
from webhook.resolve import CachingResolver, RegistryDigestResolver
from webhook.runtime import registry_options


def config_for(*hosts: str, extra: str = "") -> Settings:
    listed = ", ".join(f'"{host}"' for host in hosts)
    return load_settings(
        f"registry:\n  insecure: [{listed}]\n  allowedHosts: [{listed}]\n"
        "  timeoutSeconds: 3\n" + extra
    )


Build = Callable[[Settings], Any]


@pytest.fixture
async def build() -> AsyncIterator[Callable[[Settings], Any]]:
    async with AsyncExitStack() as stack:

        async def make(settings: Settings) -> Mutator:
            client = await stack.enter_async_context(RegistryClient(registry_options(settings)))
            inner = RegistryDigestResolver(client, NoPullSecrets())
            cache = CachingResolver(inner, settings.cache)
            return Mutator(settings, cache, Metrics())

        yield make


def pod(*images: str) -> dict[str, Any]:
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": containers},
    }


async def admit(mutator: Mutator, obj: dict[str, Any]) -> Any:
    return await mutator.review(parse_review(orjson.dumps(review(obj, namespace="apps"))))


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_thousands_of_new_tags_in_one_object_then_a_normal_admission_pins(
    registry: RegistryEnv, build: Build
) -> None:
    # Before: one task per image fed one pool; 1,000 distinct tags sent twice left it wedged
    # and every later lookup timed out until restart. Now the distinct lookups of one object
    # are capped and the rest answered by policy.
    pushed = registry.push.index("flood/app", "1.0")
    mutator = await build(config_for(registry.host))
    flood = pod(*(f"{registry.host}/flood/app:t{i}" for i in range(3000)))
    for _ in range(2):
        outcome = await admit(mutator, flood)
        assert outcome.allowed
        assert outcome.warnings[:2] == [
            "pinhook: the object has more than 1000 image fields; those past them were left as"
            " they are",
            "pinhook: 936 images not looked up: the object names more than 64 new images",
        ]
        assert len(outcome.warnings) <= 20
    # Each flood made at most 64 manifest lookups (HEAD, then no GET: the tags are missing).
    assert registry.registry.count_requests("HEAD", "/v2/flood/app/manifests/t") <= 2 * 64
    started = time.monotonic()
    outcome = await admit(mutator, pod(pushed.tag_ref))
    assert outcome.patch == [
        {
            "op": "replace",
            "path": "/spec/containers/0/image",
            "value": f"{pushed.tag_ref}@{pushed.digest}",
        }
    ]
    assert time.monotonic() - started < 3  # its own deadline, not queued behind the flood


async def test_the_lookup_limit_is_a_denial_under_on_failure_deny(
    registry: RegistryEnv, build: Build
) -> None:
    mutator = await build(config_for(registry.host, extra="onFailure: deny\n"))
    outcome = await admit(mutator, pod(*(f"{registry.host}/flood/deny:t{i}" for i in range(70))))
    assert not outcome.allowed
    metrics = mutator.metrics.render().decode()
    assert 'pinhook_resolve_failures_total{reason="limit"} 6.0' in metrics


async def test_lookups_to_one_registry_are_bounded(faults: FaultServer) -> None:
    faults.route("/v2/slow/app/manifests/1", Reply(hang=True))
    options = RegistryOptions(
        insecure_registries=frozenset([faults.host]),
        allowed_hosts=frozenset([faults.host]),
        concurrency_per_registry=4,
    )
    async with RegistryClient(options) as client:
        lookups = [
            asyncio.ensure_future(
                client.resolve_digest(
                    ImageRef.parse(f"{faults.host}/slow/app:1"), ANONYMOUS, deadline=deadline_in(1)
                )
            )
            for _ in range(40)
        ]
        results = await asyncio.gather(*lookups, return_exceptions=True)
    assert all(isinstance(result, errors.DeadlineExceeded) for result in results)
    # Forty waited; four at a time ever reached the registry.
    assert faults.count(path="/v2/slow/app/manifests/1") == 4


async def test_a_registry_that_never_answers_leaves_the_pool_usable(
    faults: FaultServer, registry: RegistryEnv
) -> None:
    faults.route("/v2/hang/app/manifests/1", Reply(hang=True))
    pushed = registry.push.index("after/hang", "1.0")
    options = RegistryOptions(
        insecure_registries=frozenset([faults.host, registry.host]),
        allowed_hosts=frozenset([faults.host, registry.host]),
        max_connections=8,
    )
    async with RegistryClient(options) as client:
        for _round in range(3):  # deadlines land, again and again, while requests are open
            hanging = [
                client.resolve_digest(
                    ImageRef.parse(f"{faults.host}/hang/app:1"),
                    ANONYMOUS,
                    deadline=deadline_in(0.3),
                )
                for _ in range(8)
            ]
            outcome = await asyncio.gather(*hanging, return_exceptions=True)
            assert all(isinstance(result, errors.DeadlineExceeded) for result in outcome)
        digest = await client.resolve_digest(
            ImageRef.parse(pushed.tag_ref), ANONYMOUS, deadline=deadline_in(5)
        )
    assert digest == pushed.digest


class Rebuilds:
    def __init__(self) -> None:
        self.count = 0

    def registry_request(self, host: str, method: str, status: str, seconds: float) -> None:
        pass

    def registry_client_rebuilt(self) -> None:
        self.count += 1

    def registry_ratelimit(self, host: str, remaining: int, limit: int) -> None:
        pass


async def test_a_wedged_pool_is_replaced(faults: FaultServer) -> None:
    # Two requests that never end hold the only two connections: nothing but pool timeouts
    # follow, until the client is replaced by a fresh one.
    faults.route("/v2/hang/app/manifests/1", Reply(hang=True))
    faults.route("/v2/good/app/manifests/1", manifest_reply(sample_index()))
    events = Rebuilds()
    options = RegistryOptions(
        insecure_registries=frozenset([faults.host]),
        allowed_hosts=frozenset([faults.host]),
        max_connections=2,
    )
    async with RegistryClient(options, events=events) as client:
        stuck = [
            asyncio.ensure_future(
                client.resolve_digest(
                    ImageRef.parse(f"{faults.host}/hang/app:1"), ANONYMOUS, deadline=deadline_in(60)
                )
            )
            for _ in range(2)
        ]
        while faults.count(path="/v2/hang/app/manifests/1") < 2:
            await asyncio.sleep(0.01)  # the fault server's side, in the same loop
        good = ImageRef.parse(f"{faults.host}/good/app:1")
        failures = 0
        while True:
            try:
                digest = await client.resolve_digest(good, ANONYMOUS, deadline=deadline_in(0.2))
                break
            except errors.DeadlineExceeded:
                failures += 1
                assert failures <= 10, "the pool was never replaced"
        for task in stuck:
            task.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
    assert digest == sha256_digest(sample_index())
    assert events.count == 1


@pytest.fixture
async def faults() -> AsyncIterator[FaultServer]:
    async with FaultServer() as server:
        yield server


# --- one huge object -----------------------------------------------------------------------


def huge_pod(images: int) -> dict[str, Any]:
    return pod(*(f"example.com/huge/app:t{i}" for i in range(images)))


STATIC = "resolver: static\ndigests:\n  'example.com/small/app:1': 'sha256:" + "a" * 64 + "'\n"


class Service:
    def __init__(self, settings: Settings) -> None:
        from webhook.resolve import StaticDigestResolver

        self.metrics = Metrics()
        self._mutator = Mutator(settings, StaticDigestResolver(settings.digest_table), self.metrics)

    @property
    def mutator(self) -> Mutator:
        return self._mutator

    def readiness(self) -> tuple[bool, str]:
        return True, "ok"


async def test_a_huge_object_gets_a_bounded_answer() -> None:
    # Before: 50,000 images gave 50,000 patch operations, a 6.5 MB audit annotation and
    # 50,000 warnings, 17.6 MB in all.
    app = create_app(Service(load_settings(STATIC)))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        answer = await client.post("/mutate", content=body(review(huge_pod(50_000))))
    assert answer.status_code == 200
    assert len(answer.content) < 64 * 1024
    response = answer.json()["response"]
    assert response["allowed"] is True
    assert len(response["warnings"]) == 20
    assert response["warnings"][0] == (
        "pinhook: the object has more than 1000 image fields; those past them were left as they are"
    )
    assert response["warnings"][-1] == "pinhook: 47 more warnings like these not shown"
    assert all(len(value) <= 4096 for value in response.get("auditAnnotations", {}).values())


async def test_a_huge_object_is_denied_under_require_digest() -> None:
    app = create_app(Service(load_settings(STATIC + "requireDigest: true\n")))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        answer = await client.post("/mutate", content=body(review(huge_pod(5_000))))
    response = answer.json()["response"]
    assert response["allowed"] is False
    assert "more than 1000 image fields" in response["status"]["message"]


# --- a request that waited too long is answered by policy at once -------------------------


def arrived_long_ago(app: Any, seconds: float) -> Any:
    """The app, seeing every request as having begun to arrive ``seconds`` ago (as the
    listener stamps it), like one that waited behind a saturated CPU."""
    from webhook.listener import ARRIVED

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope[ARRIVED] = time.monotonic() - seconds
        await app(scope, receive, send)

    return wrapped


@pytest.mark.parametrize(("extra", "allowed"), [("", True), ("requireDigest: true\n", False)])
async def test_a_request_with_no_time_left_is_answered_by_policy_without_a_lookup(
    faults: FaultServer, extra: str, allowed: bool
) -> None:
    settings = config_for(faults.host, extra=extra)
    async with RegistryClient(registry_options(settings)) as client:
        cache = CachingResolver(RegistryDigestResolver(client, NoPullSecrets()), settings.cache)

        class Late:
            metrics = Metrics()
            mutator = Mutator(settings, cache, metrics)

            def readiness(self) -> tuple[bool, str]:
                return True, "ok"

        app = arrived_long_ago(create_app(Late()), seconds=9.0)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            answer = await http.post(
                "/mutate?timeout=10s", content=body(review(pod(f"{faults.host}/late/app:1")))
            )
    response = answer.json()["response"]
    assert response["allowed"] is allowed
    if allowed:
        assert response["warnings"] == [
            "pinhook: overloaded; images not resolved; object left as is"
        ]
    else:
        assert "overloaded" in response["status"]["message"]
    assert faults.requests == []  # no registry was asked

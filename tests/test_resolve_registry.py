"""The admission pipeline against real registries: the registry resolver, its cache and policy.

Happy paths use Debian's docker-registry (tests/harness); only faults the real registry cannot
produce (a registry that never answers) use the loopback fault server.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.faults import FaultServer, Reply
from tests.harness.fixtures import RegistryEnv, docker_config
from tests.harness.proxy import CountingProxy
from tests.reviews import apply_response, review
from webhook.admission import AdmissionOutcome, parse_review
from webhook.config import Settings, load_settings
from webhook.kube import NoPullSecrets, PullSecretSource, StaticPullSecrets
from webhook.metrics import Metrics
from webhook.mutate import Mutator
from webhook.oci.credhelper import DockerConfig
from webhook.oci.keychain import DockerKeyring
from webhook.oci.registry import RegistryClient
from webhook.resolve import CachingResolver, RegistryDigestResolver
from webhook.runtime import registry_options


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def config_for(*hosts: str, extra: str = "") -> Settings:
    listed = ", ".join(f'"{host}"' for host in hosts)
    return load_settings(
        f"registry:\n  insecure: [{listed}]\n  allowedHosts: [{listed}]\n"
        "  timeoutSeconds: 3\n" + extra
    )


Build = Callable[..., Any]


@pytest.fixture
async def build() -> AsyncIterator[Build]:
    """Make a Mutator on the real registry resolver; every client is closed at the end."""
    async with AsyncExitStack() as stack:

        async def make(
            settings: Settings,
            *,
            secrets: PullSecretSource | None = None,
            docker: Path | None = None,
            clock: Clock | None = None,
        ) -> Mutator:
            client = await stack.enter_async_context(RegistryClient(registry_options(settings)))
            config = DockerConfig.from_file(docker) if docker else None
            inner = RegistryDigestResolver(client, secrets or NoPullSecrets(), config)
            metrics = Metrics()
            cache = CachingResolver(
                inner, settings.cache, clock=clock or time.monotonic, on_event=metrics.cache_event
            )
            return Mutator(settings, cache, metrics)

        yield make


def pod(*images: str, secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    }
    if secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in secrets]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}


async def admit(mutator: Mutator, obj: dict[str, Any], namespace: str = "apps") -> Any:
    doc = review(obj, namespace=namespace)
    outcome = await mutator.review(parse_review(orjson.dumps(doc)))
    return outcome, apply_response(obj, _response(outcome))


def _response(outcome: AdmissionOutcome) -> dict[str, Any]:
    if not outcome.patch:
        return {}
    encoded = base64.b64encode(orjson.dumps(outcome.patch)).decode()
    return {"patchType": "JSONPatch", "patch": encoded}


def image_of(obj: dict[str, Any], index: int = 0) -> str:
    image: str = obj["spec"]["containers"][index]["image"]
    return image


async def test_multi_arch_index_pinned_to_the_index_digest(
    registry: RegistryEnv, build: Build
) -> None:
    pushed = registry.push.index("pipeline/multiarch", "2.0")
    mutator = await build(config_for(registry.host))
    outcome, stored = await admit(mutator, pod(pushed.tag_ref))
    assert image_of(stored) == f"{pushed.tag_ref}@{pushed.digest}"
    assert pushed.digest not in pushed.manifest_digests  # not one platform's manifest
    assert outcome.warnings == []


async def test_tag_moved_new_digest_only_after_ttl(registry: RegistryEnv, build: Build) -> None:
    first = registry.push.index("pipeline/moving", "stable")
    clock = Clock()
    mutator = await build(
        config_for(registry.host, extra="cache:\n  ttlSeconds: 60\n"), clock=clock
    )
    _, stored = await admit(mutator, pod(first.tag_ref))
    assert image_of(stored).endswith(first.digest)
    moved = registry.push.move_tag(first)
    assert moved.digest != first.digest
    clock.now += 30
    _, stored = await admit(mutator, pod(first.tag_ref))
    assert image_of(stored).endswith(first.digest)
    clock.now += 31
    _, stored = await admit(mutator, pod(first.tag_ref))
    assert image_of(stored).endswith(moved.digest)


async def test_unknown_tag_follows_policy(registry: RegistryEnv, build: Build) -> None:
    registry.push.image("pipeline/known", "1")
    missing = f"{registry.host}/pipeline/known:does-not-exist"
    allow = await build(config_for(registry.host))
    outcome, stored = await admit(allow, pod(missing))
    assert outcome.allowed and image_of(stored) == missing
    assert any("not pinned" in warning for warning in outcome.warnings)
    assert "not-found" in outcome.audit["unpinned"]
    deny = await build(config_for(registry.host, extra="onFailure: deny\n"))
    outcome, _ = await admit(deny, pod(missing))
    assert not outcome.allowed
    assert missing in (outcome.message or "")


async def test_credentials_from_docker_config_and_wrong_password_policy(
    basic_registry: RegistryEnv, build: Build, tmp_path: Path
) -> None:
    pushed = basic_registry.push.index("private/app", "1.0")
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = docker_config(tmp_path / "good", {basic_registry.host: ("alice", "wonderland")})
    bad = docker_config(tmp_path / "bad", {basic_registry.host: ("alice", "wrong")})
    settings = config_for(basic_registry.host)
    _, stored = await admit(await build(settings, docker=good), pod(pushed.tag_ref))
    assert image_of(stored) == f"{pushed.tag_ref}@{pushed.digest}"
    outcome, stored = await admit(await build(settings, docker=bad), pod(pushed.tag_ref))
    assert outcome.allowed and image_of(stored) == pushed.tag_ref
    assert "unauthorized" in outcome.audit["unpinned"]
    strict = config_for(basic_registry.host, extra="namespaces:\n  apps:\n    onFailure: deny\n")
    outcome, _ = await admit(await build(strict, docker=bad), pod(pushed.tag_ref))
    assert not outcome.allowed


async def test_token_auth_with_the_pods_pull_secret(
    token_registry: RegistryEnv, build: Build
) -> None:
    pushed = token_registry.push.index("team/model", "3")
    config = orjson.dumps(
        {
            "auths": {
                token_registry.host: {
                    "auth": base64.b64encode(b"bob:builder").decode(),
                }
            }
        }
    )
    secrets = StaticPullSecrets(
        {("apps", "regcred"): DockerKeyring.from_dockerconfigjson(config, source="secret")}
    )
    assert token_registry.issuer is not None
    realm = token_registry.issuer.url.removeprefix("http://").rstrip("/")
    mutator = await build(config_for(token_registry.host, realm), secrets=secrets)
    outcome, stored = await admit(mutator, pod(pushed.tag_ref, secrets=("regcred",)))
    assert image_of(stored) == f"{pushed.tag_ref}@{pushed.digest}", outcome.warnings
    # Another namespace without the secret cannot use it for a new tag.
    other = token_registry.push.index("team/model", "4")
    outcome, stored = await admit(mutator, pod(other.tag_ref), namespace="elsewhere")
    assert image_of(stored) == other.tag_ref
    assert "unauthorized" in outcome.audit["unpinned"]


async def test_hundred_concurrent_admissions_make_one_manifest_request(
    registry: RegistryEnv, registry_proxy: CountingProxy, build: Build
) -> None:
    pushed = registry.push.index("burst/app", "1.0")
    image = f"{registry_proxy.host}/burst/app:1.0"
    mutator = await build(config_for(registry_proxy.host))
    registry_proxy.reset()
    registry_proxy.hold()  # every admission arrives before the registry answers
    admissions = [asyncio.create_task(admit(mutator, pod(image))) for _ in range(100)]
    await asyncio.to_thread(registry_proxy.wait_for_count, 1, "HEAD", "/manifests/")
    registry_proxy.release()
    results = await asyncio.gather(*admissions)
    assert {image_of(stored) for _, stored in results} == {f"{image}@{pushed.digest}"}
    assert registry_proxy.count(None, "/manifests/") == 1
    assert registry_proxy.count(None, "/v2/burst/app/") == 1


async def test_rewrite_keeps_digest_that_exists_at_target(
    registry: RegistryEnv, build: Build
) -> None:
    # Rebuilt images: the same tag has another digest in the new home (as on quay.io).
    source = registry.push.index("old-home/proxy", "v1")
    moved = registry.push.index("new-home/proxy", "v1")
    settings = config_for(
        registry.host,
        extra=(
            f"rewrites:\n  - from: {registry.host}/old-home/\n    to: {registry.host}/new-home\n"
        ),
    )
    mutator = await build(settings)
    pinned_elsewhere = f"{registry.host}/old-home/proxy:v1@{source.digest}"
    outcome, stored = await admit(mutator, pod(pinned_elsewhere))
    # The old digest is not at new-home: the tag is resolved there instead, with a warning.
    assert image_of(stored) == f"{registry.host}/new-home/proxy:v1@{moved.digest}"
    assert any("does not exist" in warning for warning in outcome.warnings)
    at_target = f"{registry.host}/old-home/proxy:v1@{moved.digest}"
    outcome, stored = await admit(mutator, pod(at_target))
    assert image_of(stored) == f"{registry.host}/new-home/proxy:v1@{moved.digest}"
    assert outcome.warnings == []


async def test_deadline_respected_when_the_registry_hangs(build: Build) -> None:
    async with FaultServer() as faults:
        faults.route("/v2/slow/app/manifests/1.0", Reply(hang=True))
        mutator = await build(config_for(faults.host))
        started = asyncio.get_running_loop().time()
        outcome = await mutator.review(
            parse_review(orjson.dumps(review(pod(f"{faults.host}/slow/app:1.0")))), budget=0.5
        )
        elapsed = asyncio.get_running_loop().time() - started
        faults.released.set()
    assert outcome.allowed
    assert elapsed < 1.5
    assert "timeout" in outcome.audit["unpinned"]


async def test_ssrf_guard_refuses_unlisted_private_hosts(
    registry: RegistryEnv, build: Build
) -> None:
    pushed = registry.push.image("guarded/app", "1")
    mutator = await build(load_settings(f'registry:\n  insecure: ["{registry.host}"]\n'))
    outcome, stored = await admit(mutator, pod(pushed.tag_ref))
    assert image_of(stored) == pushed.tag_ref
    assert "forbidden-host" in outcome.audit["unpinned"]
    assert registry.count_requests("HEAD", "/v2/guarded/app/") == 0


async def test_namespaces_with_the_same_credentials_share_one_lookup_and_one_token(
    token_registry: RegistryEnv, build: Build, tmp_path: Path
) -> None:
    # Before: lookups were keyed by namespace, so 20 namespaces rolling out the same new tag
    # made 20 registry requests (and fetched 20 tokens) where one would do.
    pushed = token_registry.push.index("rollout/app", "2.0")
    assert token_registry.issuer is not None
    realm = token_registry.issuer.url.removeprefix("http://").rstrip("/")
    config = docker_config(tmp_path, {token_registry.host: ("bob", "builder")})
    mutator = await build(config_for(token_registry.host, realm), docker=config)
    token_registry.issuer.reset_counts()
    admissions = [
        admit(mutator, pod(pushed.tag_ref), namespace=f"team-{i % 20}") for i in range(200)
    ]
    results = await asyncio.gather(*admissions)
    assert {image_of(stored) for _, stored in results} == {f"{pushed.tag_ref}@{pushed.digest}"}
    answered = [
        entry
        for entry in token_registry.registry.access_log()
        if entry.uri == "/v2/rollout/app/manifests/2.0" and entry.status == 200
    ]
    assert len(answered) == 1  # one manifest lookup (after its 401 challenge)
    assert token_registry.issuer.request_count == 1


async def test_a_failure_is_shared_only_by_the_same_credentials(
    basic_registry: RegistryEnv, build: Build
) -> None:
    pushed = basic_registry.push.index("shared/app", "1.0")
    good = orjson.dumps(
        {"auths": {basic_registry.host: {"auth": base64.b64encode(b"alice:wonderland").decode()}}}
    )
    bad = orjson.dumps(
        {"auths": {basic_registry.host: {"auth": base64.b64encode(b"alice:nope").decode()}}}
    )
    secrets = StaticPullSecrets(
        {
            ("a", "regcred"): DockerKeyring.from_dockerconfigjson(good, source="secret a"),
            ("b", "regcred"): DockerKeyring.from_dockerconfigjson(good, source="secret b"),
            ("c", "regcred"): DockerKeyring.from_dockerconfigjson(bad, source="secret c"),
        }
    )
    mutator = await build(config_for(basic_registry.host), secrets=secrets)
    outcome, stored = await admit(mutator, pod(pushed.tag_ref, secrets=("regcred",)), namespace="c")
    assert image_of(stored) == pushed.tag_ref and "unauthorized" in outcome.audit["unpinned"]
    # a and b hold the same credential: they share its (good) answer, never c's refusal.
    for namespace in ("a", "b"):
        _, stored = await admit(
            mutator, pod(pushed.tag_ref, secrets=("regcred",)), namespace=namespace
        )
        assert image_of(stored) == f"{pushed.tag_ref}@{pushed.digest}"


async def test_a_mirror_resolves_and_the_written_image_keeps_the_registrys_name(
    basic_registry: RegistryEnv, build: Build, tmp_path: Path
) -> None:
    pushed = basic_registry.push.index("mirrored/app", "v1")
    # The mounted docker config has a credential for the mirror, and none for the registry.
    docker = docker_config(tmp_path, {basic_registry.host: ("alice", "wonderland")})
    async with FaultServer() as upstream:
        upstream.route(f"/v2/{pushed.repo}/manifests/v1", Reply(503))
        hosts = f'"{upstream.host}", "{basic_registry.host}"'
        settings = load_settings(
            f"registry:\n  insecure: [{hosts}]\n  allowedHosts: [{hosts}]\n"
            f'  mirrors:\n    "{upstream.host}": ["http://{basic_registry.host}"]\n'
        )
        image = f"{upstream.host}/{pushed.repo}:v1"
        outcome, stored = await admit(await build(settings, docker=docker), pod(image))
        assert image_of(stored) == f"{image}@{pushed.digest}", outcome.warnings
        assert upstream.requests == []

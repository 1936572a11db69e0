"""One digest per rollout on one replica: the owner's first decision, kept in a local map,
against a real registry whose tag moves between the Pods (test_sharedcache.py has the fleet)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import orjson
import pytest

from tests.harness.fixtures import RegistryEnv
from tests.reviews import review
from webhook.admission import parse_review
from webhook.config import CacheSettings, OwnerPinningSettings, load_settings
from webhook.kube import NoPullSecrets
from webhook.metrics import Metrics
from webhook.mutate import Mutator
from webhook.oci.reference import ImageRef
from webhook.oci.registry import RegistryClient
from webhook.owners import OwnerPins
from webhook.plan import pod_owner
from webhook.resolve import (
    CachingResolver,
    PullScope,
    RegistryDigestResolver,
    StaticDigestResolver,
)
from webhook.runtime import registry_options

RS_A = "5a1d0c3e-0000-4000-8000-00000000000a"
RS_B = "5a1d0c3e-0000-4000-8000-00000000000b"


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def owned_pod(image: str, uid: str | None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"generateName": "web-", "labels": labels or {}}
    if uid is not None:
        metadata["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": uid,
             "controller": True, "blockOwnerDeletion": True}
        ]  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "c", "image": image}]},
    }


@pytest.fixture
async def build() -> AsyncIterator[Callable[..., Any]]:
    async with AsyncExitStack() as stack:

        async def make(host: str, extra: str = "", clock: Clock | None = None) -> Mutator:
            settings = load_settings(
                f'registry:\n  insecure: ["{host}"]\n  allowedHosts: ["{host}"]\n'
                f"cache:\n  ttlSeconds: 60\n{extra}"
            )
            client = await stack.enter_async_context(RegistryClient(registry_options(settings)))
            now = clock or time.monotonic
            inner = RegistryDigestResolver(client, NoPullSecrets())
            cache = CachingResolver(inner, settings.cache, clock=now)
            metrics = Metrics()
            owners = OwnerPins(settings.cache.owner_pinning, 100, metrics=metrics, clock=now)
            return Mutator(settings, cache, metrics, owners)

        yield make


async def admit(mutator: Mutator, obj: dict[str, Any]) -> str:
    outcome = await mutator.review(parse_review(orjson.dumps(review(obj, namespace="web"))))
    (op,) = [op for op in outcome.patch if op["path"] == "/spec/containers/0/image"]
    image: str = op["value"]
    return image


async def test_pods_of_one_replicaset_keep_its_digest_after_the_tag_moved(
    registry: RegistryEnv, build: Callable[..., Any]
) -> None:
    clock = Clock()
    first = registry.push.image("rollout/web", "stable")
    image = first.tag_ref
    mutator = await build(registry.host, "  ownerPinning: {ttlSeconds: 3600}\n", clock)
    assert await admit(mutator, owned_pod(image, RS_A)) == f"{image}@{first.digest}"

    moved = registry.push.move_tag(first)
    clock.now += 61  # the cached digest expired: a bare Pod gets the new one, and caches it
    assert await admit(mutator, owned_pod(image, None)) == f"{image}@{moved.digest}"
    # The ReplicaSet's next Pod keeps its decision over the fresher entry (the fast path).
    assert mutator.resolver.peek(ImageRef.parse(image)) == moved.digest
    assert await admit(mutator, owned_pod(image, RS_A)) == f"{image}@{first.digest}"
    # A new ReplicaSet is a new rollout: it resolves afresh.
    assert await admit(mutator, owned_pod(image, RS_B)) == f"{image}@{moved.digest}"
    assert await admit(mutator, owned_pod(image, RS_A)) == f"{image}@{first.digest}"

    clock.now += 3600  # past ownerPinning.ttlSeconds: the decision is gone
    assert await admit(mutator, owned_pod(image, RS_A)) == f"{image}@{moved.digest}"
    counts = mutator.metrics.registry.get_sample_value
    assert counts("pinhook_owner_pins_total", {"event": "decided"}) == 3


async def test_an_owners_first_pod_takes_the_fast_path_when_the_cache_knows_the_digest(
    registry: RegistryEnv, build: Callable[..., Any]
) -> None:
    clock = Clock()
    first = registry.push.image("rollout/fast", "stable")
    image = first.tag_ref
    mutator = await build(registry.host, "", clock)
    assert await admit(mutator, owned_pod(image, None)) == f"{image}@{first.digest}"  # cached
    request = parse_review(orjson.dumps(review(owned_pod(image, RS_A), namespace="web")))
    results = mutator.settled(mutator.plan(request))
    assert results is not None and [r.final for r in results] == [f"{image}@{first.digest}"]
    # Taken as the owner's decision: it holds after the tag moved and the cache learnt it.
    assert mutator.owners is not None
    assert mutator.owners.peek(f"web/{RS_A}", ImageRef.parse(image)) == first.digest
    moved = registry.push.move_tag(first)
    clock.now += 61
    assert await admit(mutator, owned_pod(image, None)) == f"{image}@{moved.digest}"
    assert await admit(mutator, owned_pod(image, RS_A)) == f"{image}@{first.digest}"
    counts = mutator.metrics.registry.get_sample_value
    assert counts("pinhook_owner_pins_total", {"event": "decided"}) == 1
    assert counts("pinhook_owner_pins_total", {"event": "kept"}) == 1


async def test_decisions_kept_on_the_fast_path_are_counted(
    registry: RegistryEnv, build: Callable[..., Any]
) -> None:
    pushed = [registry.push.image("rollout/two", tag) for tag in ("a", "b")]
    mutator = await build(registry.host)
    pod = owned_pod(pushed[0].tag_ref, RS_A)
    pod["spec"]["containers"].append({"name": "d", "image": pushed[1].tag_ref})
    for _ in range(3):
        outcome = await mutator.review(parse_review(orjson.dumps(review(pod, namespace="web"))))
        assert [op["value"] for op in outcome.patch] == [f"{p.tag_ref}@{p.digest}" for p in pushed]
    counts = mutator.metrics.registry.get_sample_value
    assert counts("pinhook_owner_pins_total", {"event": "decided"}) == 2
    assert counts("pinhook_owner_pins_total", {"event": "kept"}) == 4  # two Pods, two images


async def test_owner_pinning_can_be_turned_off(
    registry: RegistryEnv, build: Callable[..., Any]
) -> None:
    clock = Clock()
    first = registry.push.image("rollout/off", "stable")
    image = first.tag_ref
    mutator = await build(registry.host, "  ownerPinning: {enabled: false}\n", clock)
    assert mutator.owners is None
    assert await admit(mutator, owned_pod(image, RS_A)) == f"{image}@{first.digest}"
    moved = registry.push.move_tag(first)
    clock.now += 61
    assert await admit(mutator, owned_pod(image, RS_A)) == f"{image}@{moved.digest}"


async def test_audit_mode_records_no_owner_decision(
    registry: RegistryEnv, build: Callable[..., Any]
) -> None:
    clock = Clock()
    first = registry.push.image("rollout/audit", "stable")
    image = first.tag_ref
    audit = await build(registry.host, "mode: audit\n", clock)
    request = parse_review(orjson.dumps(review(owned_pod(image, RS_A), namespace="web")))
    assert audit.plan(request).owner is None
    outcome = await audit.review(request)
    assert outcome.audit["would-patch"] == f'["{image} -> {image}@{first.digest}"]'
    assert audit.owners is not None and len(audit.owners) == 0
    # After the switch to pin, the ReplicaSet's Pods get the tag's digest of now.
    moved = registry.push.move_tag(first)
    pin = await build(registry.host, "", clock)
    pin.owners = audit.owners  # the same replica's owner map, carried over the reload
    assert await admit(pin, owned_pod(image, RS_A)) == f"{image}@{moved.digest}"


def test_the_owner_is_the_controller_and_its_revision() -> None:
    def owner(obj: dict[str, Any]) -> str | None:
        return pod_owner(obj, "web")

    image = "nginx:1.27"
    assert owner(owned_pod(image, RS_A)) == f"web/{RS_A}"
    assert owner(owned_pod(image, None)) is None
    # StatefulSets and DaemonSets own the Pods of every revision: the revision is the rollout.
    revision = {"controller-revision-hash": "web-6d4cf56db6"}
    assert owner(owned_pod(image, RS_A, revision)) == f"web/{RS_A}/web-6d4cf56db6"
    # Only the controlling reference counts, and only one that looks like a controller's.
    not_controller = owned_pod(image, RS_A)
    not_controller["metadata"]["ownerReferences"][0]["controller"] = False
    assert owner(not_controller) is None
    strange = owned_pod(image, "a uid:with spaces")
    assert owner(strange) is None
    assert owner({"metadata": {"ownerReferences": "nonsense"}}) is None
    assert owner({"metadata": []}) is None


async def test_only_pods_have_an_owner_in_the_plan(build: Callable[..., Any]) -> None:
    mutator = await build("registry.example")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"ownerReferences": owned_pod("x", RS_A)["metadata"]["ownerReferences"]},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "nginx:1"}]}}},
    }
    request = parse_review(orjson.dumps(review(deployment)))
    assert mutator.plan(request).owner is None
    request = parse_review(orjson.dumps(review(owned_pod("nginx:1", RS_A), namespace="web")))
    assert mutator.plan(request).owner == f"web/{RS_A}"


async def test_a_recalled_pod_answer_ends_with_its_owners_decision(
    registry: RegistryEnv, build: Callable[..., Any]
) -> None:
    """Once one ReplicaSet's answer stands on its decisions, later Pods check only that those
    are still the ones kept: past the decision's time, the next Pod resolves afresh."""
    clock = Clock()
    first = registry.push.image("rollout/held", "stable")
    image = first.tag_ref
    mutator = await build(registry.host, "  ownerPinning: {ttlSeconds: 120}\n", clock)
    for _ in range(4):  # by the fourth Pod, the answer stands on the decision it holds
        assert await admit(mutator, owned_pod(image, RS_A)) == f"{image}@{first.digest}"
    moved = registry.push.move_tag(first)
    clock.now += 121  # both the cached digest and the owner's decision expired
    assert await admit(mutator, owned_pod(image, RS_A)) == f"{image}@{moved.digest}"


def test_a_held_entry_counts_as_used() -> None:
    """Checking that entries still hold keeps them, as looking them up would: the least
    recently used entry is the one dropped for a new one."""
    refs = [ImageRef.parse(f"example.com/app:{n}") for n in range(3)]
    table = {ref: f"sha256:{n:064x}" for n, ref in enumerate(refs)}
    clock = Clock()
    cache = CachingResolver(StaticDigestResolver(table), CacheSettings(max_entries=2), clock=clock)
    owners = OwnerPins(OwnerPinningSettings(), 2, clock=clock)
    for ref in refs[:2]:
        owners.adopt(RS_A, ref, table[ref])
        assert cache.peek(ref) is None
        asyncio.run(cache.resolve(ref, PullScope(None), clock.now + 5))
    held = cache.hold(refs[0])
    decided = owners.hold(RS_A, refs[0])
    assert held is not None and decided is not None
    cache.peek(refs[1])  # now the first is the least recently used
    owners.peek(RS_A, refs[1])
    assert cache.holds(cache.holding((held,))) and owners.holds(owners.holding((decided,)))
    asyncio.run(cache.resolve(refs[2], PullScope(None), clock.now + 5))
    owners.adopt(RS_A, refs[2], table[refs[2]])
    assert cache.peek(refs[0]) == table[refs[0]] and cache.peek(refs[1]) is None
    assert owners.peek(RS_A, refs[0]) == table[refs[0]] and owners.peek(RS_A, refs[1]) is None


def test_a_holding_holds_until_one_of_its_own_entries_changes() -> None:
    """Another entry coming or going does not end a holding; its own entry replaced,
    dropped or expired does. Entries found held count as used at most once a second."""
    refs = [ImageRef.parse(f"example.com/app:{n}") for n in range(4)]
    table = {ref: f"sha256:{n:064x}" for n, ref in enumerate(refs)}
    clock = Clock()
    cache = CachingResolver(StaticDigestResolver(table), CacheSettings(max_entries=2), clock=clock)
    scope = PullScope(None)
    asyncio.run(cache.resolve(refs[0], scope, clock.now + 5))
    held = cache.hold(refs[0])
    assert held is not None
    holding = cache.holding((held,))
    asyncio.run(cache.resolve(refs[1], scope, clock.now + 5))  # another entry comes
    assert cache.holds(holding)  # refs[0] counts as used: the most recent again
    cache.peek(refs[1])
    assert cache.holds(holding)  # within the second: not moved again
    asyncio.run(cache.resolve(refs[2], scope, clock.now + 5))  # the least recent goes
    assert not cache.holds(holding)
    asyncio.run(cache.resolve(refs[3], scope, clock.now + 5))
    assert cache.peek(refs[0]) is None and cache.peek(refs[2]) == table[refs[2]]
    # Expiry: held until the first of its entries expires, on the holder's clock.
    owners = OwnerPins(OwnerPinningSettings(ttl_seconds=60), 10, clock=clock)
    owners.adopt(RS_A, refs[0], table[refs[0]])
    decided = owners.hold(RS_A, refs[0])
    assert decided is not None
    kept = owners.holding((decided,))
    owners.adopt(RS_A, refs[1], table[refs[1]])
    assert owners.holds(kept)
    clock.now += 61
    assert not owners.holds(kept)

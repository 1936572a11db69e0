"""Like objects answered alike (``webhook.recall``): the plan and decision of the first Pod of a
template serve the next ones while the cache holds the same digests, and never a moment
longer. Against a real registry whose tags move."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import orjson
import pytest

from tests.harness.fixtures import RegistryEnv
from tests.harness.push import PushedImage
from tests.registry_mutators import Clock, registry_mutator
from tests.reviews import plain_pod, review
from webhook.admission import AdmissionOutcome, parse_review
from webhook.config import load_settings
from webhook.kinds import Mode
from webhook.locate import ImageField
from webhook.mutate import Mutator
from webhook.oci.credential import PullContext
from webhook.oci.reference import ImageRef
from webhook.plan import Action, ImagePlan, RequestPlan
from webhook.recall import Recall

Build = Callable[..., Any]


@pytest.fixture
async def build() -> AsyncIterator[Build]:
    async with AsyncExitStack() as stack:

        async def make(host: str, clock: Clock, extra: str = "") -> Mutator:
            return await registry_mutator(stack, host, clock, extra)

        yield make


def pod(name: str, *images: str) -> dict[str, Any]:
    return plain_pod(*images, name=name)


async def admit(mutator: Mutator, obj: dict[str, Any], **kwargs: Any) -> AdmissionOutcome:
    request = parse_review(orjson.dumps(review(obj, namespace="web", **kwargs)))
    return await mutator.review(request)


def pinned(outcome: AdmissionOutcome) -> list[str]:
    return [op["value"] for op in outcome.patch]


def at(image: PushedImage) -> list[str]:
    return [f"{image.tag_ref}@{image.digest}"]


async def test_like_pods_get_the_first_ones_answer(registry: RegistryEnv, build: Build) -> None:
    images = [registry.push.image("recall/app", "v1"), registry.push.image("recall/side", "v2")]
    mutator: Mutator = await build(registry.host, Clock())
    refs = [image.tag_ref for image in images]
    first = await admit(mutator, pod("web-a", *refs))
    second = await admit(mutator, pod("web-b", *refs))
    third = await admit(mutator, pod("web-c", *refs))
    assert pinned(first) == [f"{image.tag_ref}@{image.digest}" for image in images]
    assert second == first
    assert third is second  # decided once for the template, then recalled
    hits = mutator.metrics.registry.get_sample_value
    assert hits("pinhook_digest_cache_events_total", {"event": "hit"}) == 4  # 2 images, 2 Pods


async def test_a_moved_tag_is_pinned_anew_once_the_cache_learns_it(
    registry: RegistryEnv, build: Build
) -> None:
    clock = Clock()
    image = registry.push.image("recall/moving", "stable")
    mutator: Mutator = await build(registry.host, clock)
    assert pinned(await admit(mutator, pod("a", image.tag_ref))) == [
        f"{image.tag_ref}@{image.digest}"
    ]
    assert pinned(await admit(mutator, pod("b", image.tag_ref))) == [
        f"{image.tag_ref}@{image.digest}"
    ]
    moved = registry.push.move_tag(image)
    clock.now += 61  # the cache entry expires: the next Pod asks the registry again
    assert pinned(await admit(mutator, pod("c", image.tag_ref))) == [
        f"{moved.tag_ref}@{moved.digest}"
    ]
    assert pinned(await admit(mutator, pod("d", image.tag_ref))) == [
        f"{moved.tag_ref}@{moved.digest}"
    ]


async def test_a_recalled_answer_ends_with_any_entry_it_rests_on(
    registry: RegistryEnv, build: Build
) -> None:
    """Once a template's answer is known to stand, later Pods check only that the cache still
    holds the very entries it rests on: an entry that expired, or was dropped and fetched
    again with another digest, ends it at once."""
    clock = Clock()
    image = registry.push.image("recall/held", "stable")
    other = registry.push.image("recall/other", "v1")
    mutator: Mutator = await build(registry.host, clock, "  maxEntries: 1\n")
    for name in "abcd":  # by the fourth Pod, the answer stands on the entries it holds
        assert pinned(await admit(mutator, pod(name, image.tag_ref))) == at(image)
    moved = registry.push.move_tag(image)
    await mutator.pin([other.tag_ref])  # the cache's one entry is now the other image's
    (fetched,) = await mutator.pin([image.tag_ref])  # and again this tag's: the new digest
    assert fetched.digest == moved.digest
    assert pinned(await admit(mutator, pod("e", image.tag_ref))) == at(moved)
    for name in "fgh":
        assert pinned(await admit(mutator, pod(name, image.tag_ref))) == at(moved)
    again = registry.push.move_tag(moved)
    clock.now += 61  # the entry expires, though nothing else changed
    assert pinned(await admit(mutator, pod("i", image.tag_ref))) == at(again)


async def test_a_recalled_answer_ends_with_the_first_entry_to_expire(
    registry: RegistryEnv, build: Build
) -> None:
    """Of the entries an answer rests on, the first to expire ends it; each Pod's images are
    counted as cache hits on the way, however the answer was found to stand."""
    clock = Clock()
    early, late = (registry.push.image(f"recall/{name}", "v1") for name in ("early", "late"))
    mutator: Mutator = await build(registry.host, clock)
    await mutator.pin([early.tag_ref])
    clock.now += 30
    await mutator.pin([late.tag_ref])
    for name in "abcd":  # by the fourth Pod, the answer stands on the entries it holds
        assert pinned(await admit(mutator, pod(name, early.tag_ref, late.tag_ref))) == [
            *at(early),
            *at(late),
        ]
    hits = mutator.metrics.registry.get_sample_value
    assert hits("pinhook_digest_cache_events_total", {"event": "hit"}) == 8  # 2 images, 4 Pods
    moved = registry.push.move_tag(early)
    clock.now += 31  # the early entry expired, the late one not
    assert pinned(await admit(mutator, pod("e", early.tag_ref, late.tag_ref))) == [
        *at(moved),
        *at(late),
    ]


async def test_a_standing_answer_looks_no_image_up(registry: RegistryEnv, build: Build) -> None:
    """Once an answer is found to stand, a like Pod's images are not looked up one by one in
    the cache (the check of the entries held is the whole cost), with an owner or without."""
    image = registry.push.image("recall/looks", "v1")
    mutator: Mutator = await build(registry.host, Clock())
    looked_up: list[str] = []
    for holder in (mutator.resolver, mutator.owners):
        hold = holder.hold  # type: ignore[union-attr]

        def counted(*args: Any, _hold: Any = hold) -> Any:
            looked_up.append(str(args[-1]))
            return _hold(*args)

        holder.hold = counted  # type: ignore[union-attr]
    for owner in (None, "5a1d0c3e-0000-4000-8000-00000000000a"):
        obj = pod("a", image.tag_ref)
        if owner is not None:
            obj["metadata"]["ownerReferences"] = [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "a", "uid": owner,
                 "controller": True}
            ]  # fmt: skip
        for _ in range(3):  # the third Pod finds that the answer stands, and holds its entries
            assert pinned(await admit(mutator, obj)) == at(image)
        looked_up.clear()
        assert pinned(await admit(mutator, obj)) == at(image)
        assert looked_up == []


async def test_a_failed_lookup_is_never_recalled(registry: RegistryEnv, build: Build) -> None:
    clock = Clock()
    mutator: Mutator = await build(registry.host, clock)
    missing = f"{registry.host}/recall/later:v1"
    first = await admit(mutator, pod("a", missing))
    assert first.patch == [] and "not pinned" in first.warnings[0]
    pushed = registry.push.image("recall/later", "v1")
    clock.now += 31  # past the negative entry
    assert pinned(await admit(mutator, pod("b", missing))) == at(pushed)


async def test_an_update_is_planned_against_its_old_object_every_time(
    registry: RegistryEnv, build: Build
) -> None:
    images = [registry.push.image("recall/up", tag) for tag in ("v1", "v2")]
    mutator: Mutator = await build(registry.host, Clock())
    new = pod("a", images[0].tag_ref, images[1].tag_ref)
    unchanged_first = pod("a", images[0].tag_ref, "nginx:1.27")
    unchanged_both = pod("a", images[0].tag_ref, images[1].tag_ref)
    one = await admit(mutator, new, operation="UPDATE", old=unchanged_first)
    assert [op["path"] for op in one.patch] == ["/spec/containers/1/image"]
    none = await admit(mutator, new, operation="UPDATE", old=unchanged_both)
    assert none.patch == []


def test_recall_forgets_everything_past_its_size() -> None:
    recall = Recall(size=2)
    plans = [RequestPlan(Mode.PIN, load_settings("").policy_for(None), f"ns{i}") for i in range(3)]
    for i, plan in enumerate(plans[:2]):
        recall.keep_plan(i, plan)
    recall.keep_settled(plans[0], (), [])
    recall.keep_plan(2, plans[2])
    assert recall.plan(0) is None and recall.plan(1) is None and recall.plan(2) is plans[2]
    assert not recall.kept(plans[0]) and recall.kept(plans[2])
    assert recall.settled(plans[0], ()) is None


def test_recall_holds_a_bounded_amount_of_text_whatever_the_objects() -> None:
    policy = load_settings("").policy_for(None)

    def plan_of(namespace: str, image: str, count: int = 1) -> RequestPlan:
        field = ImageField("/spec/containers/0/image", image, PullContext())
        ref = ImageRef.parse("nginx:1.27")
        entry = ImagePlan(field, ref, ref, False, Action.RESOLVE, "nginx")
        return RequestPlan(Mode.PIN, policy, namespace, (entry,) * count)

    recall = Recall(size=100, characters=1000, object_characters=400)
    huge = plan_of("huge", "x" * 1_000_000)  # an invalid image of a megabyte
    recall.keep_plan("huge", huge)
    assert recall.plan("huge") is None and not recall.kept(huge)
    many = plan_of("many", "nginx:1.27", 50)  # 50 fields of 35 characters
    recall.keep_plan("many", many)
    assert recall.plan("many") is None
    plans = [plan_of(f"ns{i}", "n" * 300) for i in range(4)]  # 325 characters each
    for i, plan in enumerate(plans):
        recall.keep_plan(i, plan)
    # Three fit in 1000 characters; the fourth makes everything go.
    assert [recall.plan(i) for i in range(4)] == [None, None, None, plans[3]]

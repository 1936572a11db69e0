"""What one configuration planned and decided for recent objects, to answer their like again.

The Pods of one ReplicaSet, and any object created over and over from one template, have the
same image fields: they are planned alike and, while every digest they need is cached, decided
alike. Planning each image, rendering its final string and tallying the decision are most of
what a cached admission costs pinhook, so :class:`Recall` keeps, per set of image fields, the
plan and the results and decision of the last admission that was answered from the cache, and
gives them back while the cache still holds the very same digests.

Only the pure path is kept: a decision is recalled for results that came from the cache with
nothing to resolve, never for one made from a registry's answer (which may carry a failure or
a stale digest's warning). Owned by one ``Mutator``, so a new configuration starts afresh.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

from .decide import Decision
from .plan import ImageResult, RequestPlan

# Sets of image fields remembered, and image fields in all of them; past either, all are
# forgotten at once (a cluster runs far fewer templates than this, and forgetting only costs
# planning them again). The second bound holds memory to a few MiB whatever the objects are:
# a thousand objects of a thousand images each would otherwise be a gigabyte.
RECALL_SIZE = 1024
RECALL_IMAGES = 8192


class _Settled(NamedTuple):
    plan: RequestPlan  # kept, so that no other plan can take its id while this is here
    digests: tuple[str | None, ...]  # each valid image's digest from the cache, in order
    results: list[ImageResult]
    decision: Decision | None  # made once, by the first conclude of these results


class Recall:
    def __init__(self, size: int = RECALL_SIZE, images: int = RECALL_IMAGES) -> None:
        self._size = size
        self._max_images = images
        self._images = 0  # image fields in the plans kept
        self._plans: dict[Hashable, RequestPlan] = {}
        # The plans above by id: they are held there, so no other object can have their id.
        self._kept: dict[int, RequestPlan] = {}
        self._settled: dict[int, _Settled] = {}

    def plan(self, key: Hashable) -> RequestPlan | None:
        return self._plans.get(key)

    def keep_plan(self, key: Hashable, plan: RequestPlan) -> None:
        images = len(plan.images)
        if images > self._max_images:
            return
        if len(self._plans) >= self._size or self._images + images > self._max_images:
            # Planning may run on a worker thread (a huge object): a race loses an entry at
            # worst, and every plan recalled is a whole one.
            self._settled.clear()
            self._kept.clear()
            self._plans.clear()
            self._images = 0
        self._plans[key] = plan
        self._kept[id(plan)] = plan
        self._images += images

    def kept(self, plan: RequestPlan) -> bool:
        """Whether ``plan`` came from here: only those are settled and decided again."""
        return self._kept.get(id(plan)) is plan

    def settled(self, plan: RequestPlan, digests: tuple[str | None, ...]) -> _Settled | None:
        """The last results settled for ``plan``, if they rest on exactly ``digests``."""
        settled = self._settled.get(id(plan))
        if settled is None or settled.plan is not plan or settled.digests != digests:
            return None
        return settled

    def keep_settled(
        self,
        plan: RequestPlan,
        digests: tuple[str | None, ...],
        results: list[ImageResult],
    ) -> None:
        if self.kept(plan):
            self._settled[id(plan)] = _Settled(plan, digests, results, None)

    def decision(self, plan: RequestPlan, results: Sequence[ImageResult]) -> Decision | None:
        """The decision made for these very ``results`` of ``plan``, if one was."""
        settled = self._settled.get(id(plan))
        if settled is None or settled.plan is not plan or settled.results is not results:
            return None
        return settled.decision

    def keep_decision(
        self, plan: RequestPlan, results: Sequence[ImageResult], decision: Decision
    ) -> None:
        settled = self._settled.get(id(plan))
        if settled is not None and settled.plan is plan and settled.results is results:
            self._settled[id(plan)] = settled._replace(decision=decision)

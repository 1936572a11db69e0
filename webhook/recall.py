"""What one configuration planned and decided for recent objects, to answer their like again.

The Pods of one ReplicaSet, and any object created over and over from one template, have the
same image fields: they are planned alike and, while every digest they need is cached, decided
alike. Planning each image, rendering its final string and tallying the decision are most of
what a cached admission costs pinhook, so :class:`Recall` keeps, per set of image fields, the
plan and the results and decision of the last admission that was answered from the cache, and
gives them back while the cache still holds the very same digests. Once they are found to
stand, the cache entries they rest on are kept with them (``Holding``): the next like object
checks that those very entries are still there and fresh, rather than looking each image up,
and while the cache has not changed at all since they were, only that they are fresh.

Only the pure path is kept: a decision is recalled for results that came from the cache with
nothing to resolve, never for one made from a registry's answer (which may carry a failure or
a stale digest's warning). Owned by one ``Mutator``, so a new configuration starts afresh.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

from .decide import Decision
from .metrics import Counts
from .plan import ImageResult, RequestPlan
from .resolve import Holder, Holding

# Sets of image fields remembered, and the characters of their image fields (pointers, images,
# pull secret and service account names, problems); past either, all are forgotten at once (a
# cluster runs far fewer templates than this, and forgetting only costs planning them again).
# The second bound holds memory to a few MiB whatever the objects are: a thousand objects of a
# thousand images, or of one invalid image of a megabyte, would otherwise be gigabytes. A
# Pod's fields are a few hundred characters each.
RECALL_SIZE = 1024
RECALL_CHARACTERS = 1024 * 1024
# An object whose fields come to more than this is planned afresh every time.
RECALL_OBJECT_CHARACTERS = 16 * 1024


class Standing(NamedTuple):
    """A decision that still stands, and what answering with it adds to the metrics."""

    decision: Decision
    counts: Counts


class _Settled(NamedTuple):
    plan: RequestPlan  # kept, so that no other plan can take its id while this is here
    digests: tuple[str | None, ...]  # each valid image's digest from the cache, in order
    results: list[ImageResult]
    decision: Decision | None  # made once, by the first conclude of these results
    holding: Holding | None = None  # once the results were found to stand on these
    standing: Standing | None = None  # the decision and its counts, once worked out


class Recall:
    def __init__(
        self,
        size: int = RECALL_SIZE,
        characters: int = RECALL_CHARACTERS,
        object_characters: int = RECALL_OBJECT_CHARACTERS,
    ) -> None:
        self._size = size
        self._max_characters = characters
        self._max_object_characters = object_characters
        self._characters = 0  # in the plans kept
        self._plans: dict[Hashable, RequestPlan] = {}
        # The plans above by id: they are held there, so no other object can have their id.
        self._kept: dict[int, RequestPlan] = {}
        self._settled: dict[int, _Settled] = {}

    def plan(self, key: Hashable) -> RequestPlan | None:
        return self._plans.get(key)

    def keep_plan(self, key: Hashable, plan: RequestPlan) -> None:
        characters = _characters(plan)
        if characters > self._max_object_characters:
            return
        if len(self._plans) >= self._size or (self._characters + characters > self._max_characters):
            # Planning may run on a worker thread (a huge object): a race loses an entry, or
            # miscounts one, at worst; every plan recalled is a whole one.
            self._settled.clear()
            self._kept.clear()
            self._plans.clear()
            self._characters = 0
        self._plans[key] = plan
        self._kept[id(plan)] = plan
        self._characters += characters

    def kept(self, plan: RequestPlan) -> bool:
        """Whether ``plan`` came from here: only those are settled and decided again."""
        return self._kept.get(id(plan)) is plan

    def settled(self, plan: RequestPlan, digests: tuple[str | None, ...]) -> _Settled | None:
        """The last results settled for ``plan``, if they rest on exactly ``digests``."""
        settled = self._settled.get(id(plan))
        if settled is None or settled.plan is not plan or settled.digests != digests:
            return None
        return settled

    def standing(self, plan: RequestPlan, holder: Holder) -> _Settled | None:
        """The last results settled for ``plan``, if ``holder`` still holds the very entries
        they were last found to rest on (``hold``)."""
        settled = self._settled.get(id(plan))
        if settled is None or settled.plan is not plan or settled.holding is None:
            return None
        return settled if holder.holds(settled.holding) else None

    def hold(self, settled: _Settled, holding: Holding) -> None:
        """Remember that ``settled``, just found in ``settled()``, rests on ``holding``."""
        plan = settled.plan
        if self._settled.get(id(plan)) is settled:
            self._settled[id(plan)] = settled._replace(holding=holding)

    def keep_standing(self, settled: _Settled, standing: Standing) -> None:
        """Remember ``standing`` for ``settled``, just found in ``standing()``: the one
        answer to it from then on (made once, not for each admission)."""
        plan = settled.plan
        if self._settled.get(id(plan)) is settled:
            self._settled[id(plan)] = settled._replace(standing=standing)

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


def _characters(plan: RequestPlan) -> int:
    """The text of ``plan``'s image fields and problems, which everything kept for it (its key,
    final images, patch and annotations) is a small multiple of."""
    total = sum(len(problem) for problem in plan.warnings)
    for entry in plan.images:
        field = entry.field
        pull = field.pull
        total += len(field.pointer) + len(field.image) + len(pull.service_account or "")
        total += sum(len(name) for name in pull.image_pull_secrets)
    return total

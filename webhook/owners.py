"""One digest per rollout: the Pods of one owner get the digest the first of them got.

A tag can move while a ReplicaSet creates its Pods. Without this, a Pod admitted after the
digest cache's entry expired would be pinned to the new digest, and one Deployment would run
two versions. The owner is the Pod's controlling ownerReference (see ``plan.pod_owner``): a
ReplicaSet (Deployments, and so Knative revisions and KServe predictors), a Job, or the
revision of a StatefulSet or DaemonSet. A new ReplicaSet is a new rollout and resolves
afresh. The decision is kept for ``ownerPinning.ttlSeconds``: in the shared cache when there
is one (the first decision in the fleet wins), and in a bounded local map in any case, which
is what answers the fast path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .config import OwnerPinningSettings
from .metrics import Metrics
from .oci.reference import ImageRef
from .resolve import Held, Holding, still_held
from .sharedcache import SharedOwners

_Key = tuple[str, str]  # owner, name:tag


class OwnerPins:
    """The digest decided for each (owner, image): local first, then the shared cache."""

    def __init__(
        self,
        settings: OwnerPinningSettings,
        max_entries: int,
        shared: SharedOwners | None = None,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = settings.ttl_seconds
        self._max_entries = max_entries
        self._shared = shared
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._decided: OrderedDict[_Key, tuple[str, float]] = OrderedDict()
        self._changes = 0  # decisions kept or dropped (``holds``)

    def __len__(self) -> int:
        return len(self._decided)

    @property
    def alone(self) -> bool:
        """Whether this replica's decisions are all there are (no shared cache): then one it
        has not made yet was made by nobody."""
        return self._shared is None

    def peek(self, owner: str, ref: ImageRef) -> str | None:
        """The decision known here, without I/O (the fast path; its caller counts what it
        kept, once per request)."""
        known = self._known((owner, _image(ref)))
        return None if known is None else known[0]

    def hold(self, owner: str, ref: ImageRef) -> Held | None:
        """``peek``, with what tells later that the decision still holds (``holds``)."""
        key = (owner, _image(ref))
        known = self._known(key)
        return None if known is None else Held(known[0], key, known, known[1])

    def _known(self, key: _Key) -> tuple[str, float] | None:
        """The decision and its expiry under ``key``, if not expired (then it counts as
        used); an expired one is dropped."""
        known = self._decided.get(key)
        if known is None:
            return None
        if known[1] <= self._clock():
            del self._decided[key]
            self._changes += 1
            return None
        self._decided.move_to_end(key)
        return known

    def holding(self, held: tuple[Held, ...]) -> Holding:
        return Holding(held, self._changes)

    def holds(self, holding: Holding) -> bool:
        """Whether each of ``holding``'s is still the decision kept, none expired."""
        return still_held(self._decided, holding, self._clock(), self._changes)

    def adopt(self, owner: str, ref: ImageRef, digest: str) -> None:
        """Record ``digest``, from the local cache, as the owner's first decision. Only when
        ``alone``: with a shared cache another replica may have decided otherwise."""
        self._metrics.owner_pin("decided")
        self._keep(owner, ref, digest)

    async def recall(self, owner: str, ref: ImageRef, deadline: float) -> str | None:
        """The decision known here or in the fleet; None when there is none, or the fleet did
        not say by ``deadline`` (loop time)."""
        digest = self.peek(owner, ref)
        if digest is None and self._shared is not None:
            digest = await self._shared.owner_digest(owner, _image(ref), deadline)
            if digest is not None:
                # Kept here no longer than the TTL from now: close enough to the fleet's.
                self._keep(owner, ref, digest)
        if digest is not None:
            self._metrics.owner_pin("kept")
        return digest

    async def decide(self, owner: str, ref: ImageRef, digest: str, deadline: float) -> str:
        """Record ``digest`` for the owner unless another replica decided first; the digest
        that holds (``digest`` itself when the fleet did not say by ``deadline``)."""
        decided = None
        if self._shared is not None:
            decided = await self._shared.decide_owner(
                owner, _image(ref), digest, self._ttl, deadline
            )
        decided = decided or digest
        self._metrics.owner_pin("decided" if decided == digest else "kept")
        self._keep(owner, ref, decided)
        return decided

    def _keep(self, owner: str, ref: ImageRef, digest: str) -> None:
        key = (owner, _image(ref))
        self._changes += 1
        self._decided[key] = (digest, self._clock() + self._ttl)
        self._decided.move_to_end(key)
        while len(self._decided) > self._max_entries:
            self._decided.popitem(last=False)


def _image(ref: ImageRef) -> str:
    return f"{ref.name}:{ref.tag_or_latest()}"

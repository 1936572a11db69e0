"""The admission pipeline: plan → resolve → decide.

``Mutator.plan`` (pure) reads the request's image fields and plans each image;
``Mutator.resolve`` is the one I/O step, asking the resolver for every image that needs a
registry, all of a request concurrently under one deadline, with failures kept as data;
``decide`` (pure, in ``decide``) turns the results into the answer and the tally.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Final

import jsonpointer

from .admission import AdmissionOutcome, AdmissionRequest
from .config import SKIP_ANNOTATION, FailurePolicy, Settings
from .decide import INTERNAL_ERROR, OVERLOADED, TIMED_OUT, Decision, Unknown, decide
from .errors import InvalidReference, ResolveError
from .kinds import DEFAULT_MODES, Mode, kind_info
from .locate import ImageField, locate
from .metrics import Metrics
from .oci.credential import PullContext
from .oci.reference import ImageRef
from .owners import OwnerPins
from .plan import (
    LIMIT,
    Action,
    ImagePlan,
    ImageResult,
    InvalidImage,
    RequestPlan,
    moved_digest_warning,
    plan_image,
    pod_owner,
    render,
)
from .recall import Recall, Standing
from .resolve import DigestResolver, Held, Holder, PullScope, Resolution

log = logging.getLogger(__name__)

OPERATIONS = frozenset({"CREATE", "UPDATE"})
# Leave this much of the API server's timeout for answering and the network.
TIMEOUT_MARGIN: Final = 1.5
# The API server appends ?timeout=10s (its webhook timeout) to the URL it calls.
_TIMEOUT: Final = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")
_PLAN_MEMO_SIZE = 10_000
SKIP_IGNORED: Final = (
    f"pinhook: annotation {SKIP_ANNOTATION} ignored: opting out is not allowed in this namespace"
)


class Mutator:
    """Answers one AdmissionRequest under one configuration; holds no per-request state."""

    def __init__(
        self,
        settings: Settings,
        resolver: DigestResolver,
        metrics: Metrics | None = None,
        owners: OwnerPins | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.metrics = metrics or Metrics()
        # One digest per rollout (``owners``): only when on, so Pods pay nothing otherwise.
        self.owners = owners if settings.cache.owner_pinning.enabled else None
        # Read once: settings are a validated model whose attribute access is not free, and
        # these are consulted for every image of every Pod.
        self._rewrites = settings.rewrite_map
        self._skip = frozenset(settings.registry.skip)
        self._excluded = frozenset(settings.excluded_namespaces)
        self._output = settings.output
        self._limits = settings.limits
        self._budget = settings.registry.timeout_seconds
        self._modes = {key: settings.mode_for(key) for key in DEFAULT_MODES}
        self._namespace_modes = {
            namespace: {key: settings.mode_for(key, namespace) for key in DEFAULT_MODES}
            for namespace, policy in settings.namespaces.items()
            if policy.mode is not None
        }
        self._policies: dict[str | None, FailurePolicy] = {}
        # Parsing and rewriting depend only on the image string and the mode under one config,
        # and a cluster runs few distinct images: remember the plan of each.
        self._plans: dict[tuple[str, Mode], tuple[ImageRef, ImageRef, bool, Action, str]] = {}
        # Whole requests alike: the plan of a set of image fields, and the last decision
        # answered for it from the cache while its digests stay the same.
        self._recall = Recall()

    def budget(self, timeout: str | None = None) -> float:
        """Seconds the registries may take: the configured deadline, or less when the API
        server's ``?timeout=`` for this call leaves less."""
        if not timeout:
            return self._budget
        match = _TIMEOUT.match(timeout)
        if match is None:
            return self._budget
        value = float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2) or "s"]
        return max(0.5, min(self._budget, value - TIMEOUT_MARGIN))

    async def review(
        self, request: AdmissionRequest, *, budget: float | None = None
    ) -> AdmissionOutcome:
        """Answer one request; registry work ends within ``budget`` seconds (default: config)."""
        plan = self.plan(request)
        results = self.settled(plan)
        if results is None:
            results = await self.resolve(plan, budget)
        return self.conclude(plan, results).outcome

    def conclude(
        self,
        plan: RequestPlan,
        results: Sequence[ImageResult] | None,
        unknown: Unknown = TIMED_OUT,
    ) -> Decision:
        """The decision for ``plan`` (``decide``): the answer, and what became of each image
        for the admission log; counted in the metrics."""
        if results is None and unknown is OVERLOADED and plan.owner is not None:
            # No time to ask the fleet for the owner's decision, but this replica's cache may
            # know every digest: better than an answer by policy (a denial under
            # requireDigest). Only an owner's Pod can get here with everything cached.
            results = self._from_cache(plan)
        if results is not None:
            recalled = self._recall.decision(plan, results)
            if recalled is not None:
                return self._record(recalled)
        decision = decide(plan, results, unknown=unknown)
        if results is not None:
            self._recall.keep_decision(plan, results, decision)
        return self._record(decision)

    def failed(self, request: AdmissionRequest) -> Decision:
        """The decision when a review failed in pinhook itself: by policy, never an error.

        Needs only the kind's mode and the namespace's policy; when even those cannot be
        had, the global policy and pin mode, the strictest reading.
        """
        try:
            info = kind_info(request.group, request.kind)
            mode = Mode.OFF if info is None else self._mode(info.key, request.namespace)
            policy = self._policy(request.namespace)
        except Exception:  # a bug in the very steps that failed: fall back to the global rule
            mode, policy = Mode.PIN, self.settings.policy_for(None)
        return self.conclude(RequestPlan(mode, policy), None, INTERNAL_ERROR)

    # -- plan ----------------------------------------------------------------------------------

    def plan(self, request: AdmissionRequest) -> RequestPlan:
        """What to do with each image field of the request; no I/O."""
        info = kind_info(request.group, request.kind)
        policy = self._policy(request.namespace)
        if info is None:
            return RequestPlan(Mode.OFF, policy, skipped="kind not handled")
        mode = self._mode(info.key, request.namespace)
        if mode is Mode.OFF:
            return RequestPlan(mode, policy, skipped="mode off")
        if request.operation not in OPERATIONS:
            return RequestPlan(mode, policy, skipped=f"operation {request.operation}")
        if (request.namespace or "") in self._excluded:
            return RequestPlan(mode, policy, skipped="namespace excluded")
        obj = request.obj
        if not isinstance(obj, dict):
            warning = "pinhook: object is not a JSON object; left as is"
            return RequestPlan(mode, policy, warnings=(warning,))
        skip_ignored = False
        if _skip_requested(obj):
            # Under a digest-only policy the annotation would let anyone opt out (auto).
            if self.settings.skip_honoured(policy):
                reason = f"annotation {SKIP_ANNOTATION}"
                return RequestPlan(mode, policy, audit={"skipped": reason}, skipped=reason)
            skip_ignored = True
        located = locate(info, obj, self._limits.images_per_object)
        owner = None
        # Only pin records an owner's decision: one taken in audit mode would outlive the
        # switch to pin by ownerPinning.ttlSeconds and pin the owner's next Pods to it.
        if self.owners is not None and mode is Mode.PIN and info.key == "pods":
            owner = pod_owner(obj, request.namespace)
        # The first Pod of a ReplicaSet plans for all of them; not an UPDATE, whose plan
        # depends on the old object too.
        recall_key: tuple[object, ...] | None = None
        if request.operation == "CREATE":
            recall_key = (
                info.key,
                request.namespace,
                owner,
                skip_ignored,
                located.fields,
                located.problems,
                located.fields_over_limit,
                located.problems_over_limit,
            )
            recalled = self._recall.plan(recall_key)
            if recalled is not None:
                return recalled
        fields = located.fields
        if request.operation == "UPDATE":
            fields = tuple(field for field in fields if not _unchanged(field, request.old_obj))
        problems = [f"pinhook: {problem}; left as is" for problem in located.problems]
        if located.problems_over_limit:
            problems.append(f"pinhook: {located.problems_over_limit} more fields were unreadable")
        if skip_ignored:
            problems.insert(0, SKIP_IGNORED)
        plan = RequestPlan(
            mode,
            policy,
            request.namespace,
            tuple([self._plan_image(field, mode) for field in fields]),
            tuple(problems),
            limits=self._limits,
            images_over_limit=located.fields_over_limit,
            owner=owner,
        )
        if recall_key is not None:
            self._recall.keep_plan(recall_key, plan)
        return plan

    def plan_fields(
        self, fields: Sequence[ImageField], mode: Mode = Mode.PIN
    ) -> list[ImagePlan | InvalidImage]:
        """Plan image fields found outside an admission (``pinhook report``) under ``mode``."""
        return [self._plan_image(field, mode) for field in fields]

    def _plan_image(self, field: ImageField, mode: Mode) -> ImagePlan | InvalidImage:
        key = (field.image, mode)
        known = self._plans.get(key)
        if known is not None:
            return ImagePlan(field, *known)
        try:
            ref = ImageRef.parse(field.image)
        except InvalidReference as exc:
            return InvalidImage(field, exc)
        plan = plan_image(field, ref, self._rewrites, self._skip, mode)
        if len(self._plans) >= _PLAN_MEMO_SIZE:
            self._plans.clear()
        self._plans[key] = (plan.original, plan.target, plan.rewritten, plan.action, plan.name)
        return plan

    def _mode(self, kind_key: str, namespace: str | None) -> Mode:
        modes = self._namespace_modes.get(namespace) if namespace is not None else None
        return (modes or self._modes)[kind_key]

    def _policy(self, namespace: str | None) -> FailurePolicy:
        policy = self._policies.get(namespace)
        if policy is None:
            if len(self._policies) >= _PLAN_MEMO_SIZE:
                self._policies.clear()
            policy = self._policies[namespace] = self.settings.policy_for(namespace)
        return policy

    # -- resolve -------------------------------------------------------------------------------

    def settled(self, plan: RequestPlan) -> list[ImageResult] | None:
        """Every image's result when none needs a registry (all digests cached), else None:
        the common request is answered without awaiting anything."""
        if self._recall.kept(plan):
            return self._settled_again(plan)
        return self._settled_now(plan)

    def standing(self, plan: RequestPlan) -> Standing | None:
        """The decision last made for ``plan``, while the very entries its results rest on
        are still held (``Recall.standing``): no lookup, no decision made. With what
        ``settled`` and ``conclude`` would have counted for it, for the caller to count
        (``Metrics.count``) with its own; None when it does not stand (or was never found
        to)."""
        settled = self._recall.standing(plan, self._holder(plan))
        if settled is None or settled.decision is None:
            return None
        standing = settled.standing
        if standing is None:
            decision = settled.decision
            hits, owner_kept = _hits(settled.digests, plan.owner)
            counts = self.metrics.settled_counts(decision.images, hits, owner_kept)
            standing = Standing(decision, counts)
            self._recall.keep_standing(settled, standing)
        if standing.decision.failures:  # not in its counts: the library's own counter
            self._count_failures(standing.decision)
        return standing

    def _holder(self, plan: RequestPlan) -> Holder:
        """Who holds the digests of ``plan``'s results: the owner's decisions, or the cache."""
        if plan.owner is not None and self.owners is not None:
            return self.owners
        return self.resolver

    def _count_hits(self, digests: tuple[str | None, ...], owner: str | None) -> None:
        hits, owner_kept = _hits(digests, owner)
        if hits:
            self.metrics.cache_event("hit", hits)
        if owner_kept:
            self.metrics.owner_pin("kept", owner_kept)

    def _settled_again(self, plan: RequestPlan) -> list[ImageResult] | None:
        """For a plan made before: the results last settled for it while the cache (or the
        owner's decisions) hold the same digests, else settled now (and kept). Once found
        to stand, the entries they rest on are remembered: the next time is one look each."""
        owner, owners = plan.owner, self.owners
        holder = self._holder(plan)
        hold = self.resolver.hold
        if owner is not None and owners is not None:
            hold = partial(owners.hold, owner)
        settled = self._recall.standing(plan, holder)
        if settled is None:
            digests: list[str | None] = []
            held: list[Held] = []
            for entry in plan.images:
                if isinstance(entry, InvalidImage):
                    continue
                action = entry.action
                if action is Action.RESOLVE:
                    found = hold(entry.target)
                    if found is None:  # not known, or an owner's first Pod (see _adopt)
                        break
                    digests.append(found.digest)
                    held.append(found)
                elif action is Action.VERIFY:
                    return None
                else:
                    digests.append(None)
            else:
                settled = self._recall.settled(plan, tuple(digests))
                if settled is not None:
                    self._recall.hold(settled, holder.holding(tuple(held)))
        if settled is not None:
            self._count_hits(settled.digests, owner)
            return settled.results
        results = self._settled_now(plan)
        if results is not None:
            # From the results: an owner's first Pod may have adopted a digest just now.
            self._recall.keep_settled(plan, tuple([r.digest for r in results]), results)
        return results

    def _settled_now(self, plan: RequestPlan) -> list[ImageResult] | None:
        owner = plan.owner
        results: list[ImageResult] = []
        hits = adopted = 0
        for entry in plan.images:
            if isinstance(entry, InvalidImage):
                continue
            result = self._settle(entry, owner)
            if result is None and owner is not None:
                result = self._adopt(entry, owner)
                adopted += result is not None
            if result is None:
                return None
            hits += entry.action is Action.RESOLVE
            results.append(result)
        if hits:
            self.metrics.cache_event("hit", hits)
            if owner is not None and hits > adopted:
                self.metrics.owner_pin("kept", hits - adopted)
        return results

    async def resolve(self, plan: RequestPlan, budget: float | None = None) -> list[ImageResult]:
        """What became of each valid image of ``plan``, in order; a failure is a result too."""
        plans = [entry for entry in plan.images if isinstance(entry, ImagePlan)]
        return await self._resolve(plans, plan.namespace, budget or self._budget, plan.owner)

    async def pin(self, images: Sequence[str], *, mode: Mode = Mode.PIN) -> list[ImageResult]:
        """Rewrite and resolve bare image strings, as for a Pod (``pinhook resolve``).

        Raises InvalidReference for the first invalid one.
        """
        plans: list[ImagePlan] = []
        for index, image in enumerate(images):
            entry = self._plan_image(ImageField(f"/images/{index}", image, PullContext()), mode)
            if isinstance(entry, InvalidImage):
                raise entry.error
            plans.append(entry)
        return await self._resolve(plans, None, self._budget)

    async def _resolve(
        self,
        plans: list[ImagePlan],
        namespace: str | None,
        budget: float,
        owner: str | None = None,
    ) -> list[ImageResult]:
        results: list[ImageResult | None] = [self._settle(plan, owner) for plan in plans]
        pending = [i for i, result in enumerate(results) if result is None]
        hits = sum(
            plan.action is Action.RESOLVE and result is not None
            for plan, result in zip(plans, results, strict=True)
        )
        if hits:
            self.metrics.cache_event("hit", hits)
            if owner is not None:
                self.metrics.owner_pin("kept", hits)
        if pending:
            pending = self._within_lookup_limit(plans, pending, results)
        if pending:
            # Only cache misses cost a task each; the common all-cached request creates none.
            deadline = asyncio.get_running_loop().time() + budget
            resolved = await asyncio.gather(
                *(self._ask(plans[i], namespace, deadline, owner) for i in pending)
            )
            for i, result in zip(pending, resolved, strict=True):
                results[i] = result
        return [result for result in results if result is not None]

    def _within_lookup_limit(
        self, plans: list[ImagePlan], pending: list[int], results: list[ImageResult | None]
    ) -> list[int]:
        """The pending images whose targets are among the first ``lookups_per_object``
        distinct ones; the others fail with reason ``limit``, for the policy to decide."""
        limit = self._limits.lookups_per_object
        targets: dict[ImageRef, None] = {}
        kept: list[int] = []
        for i in pending:
            target = plans[i].target
            if target in targets or len(targets) < limit:
                targets[target] = None
                kept.append(i)
                continue
            failure = ResolveError(
                f"not looked up: the object names more than {limit} new images", reason=LIMIT
            )
            results[i] = ImageResult(
                plans[i], render(plans[i], None, self._output), None, None, failure
            )
        return kept

    def _settle(self, plan: ImagePlan, owner: str | None = None) -> ImageResult | None:
        """The result without waiting, when no registry is needed or the cache knows it.

        For a Pod with an owner, only the owner's decision will do: a fresher cache entry
        (the tag moved) must not give one of its Pods another digest. (``_adopt`` makes the
        owner's first decision from the cache where that is safe.)"""
        if plan.action in (Action.KEEP, Action.REWRITE):
            final = render(plan, plan.target.digest, self._output)
            return ImageResult(plan, final, None, moved_digest_warning(plan))
        if plan.action is Action.RESOLVE:
            if owner is not None and self.owners is not None:
                digest = self.owners.peek(owner, plan.target)
            else:
                digest = self.resolver.peek(plan.target)
            if digest is not None:
                final = render(plan, digest, self._output)
                return ImageResult(plan, final, digest, moved_digest_warning(plan))
        return None

    def _adopt(self, plan: ImagePlan, owner: str) -> ImageResult | None:
        """For an owner with no decision yet, the local cache's digest, recorded as its
        decision, when this replica's decisions are all there are (``OwnerPins.alone``).

        With a shared cache, not: another replica may have decided this owner's digest
        before the tag moved, and this cache may already hold the new one. The first Pod
        of each owner on a replica then asks Redis (a round trip) rather than guess."""
        owners = self.owners
        if owners is None or not owners.alone:
            return None
        result = self._settle(plan)
        if result is not None and result.digest is not None:
            owners.adopt(owner, plan.target, result.digest)
        return result

    def _from_cache(self, plan: RequestPlan) -> list[ImageResult] | None:
        """Every image's result from what this replica knows, owners' decisions first and
        then the digest cache, recording nothing; None when something is not known."""
        results: list[ImageResult] = []
        hits = 0
        for entry in plan.images:
            if isinstance(entry, InvalidImage):
                continue
            result = self._settle(entry, plan.owner) or self._settle(entry)
            if result is None:
                return None
            hits += entry.action is Action.RESOLVE
            results.append(result)
        if hits:
            self.metrics.cache_event("hit", hits)
        return results

    async def _ask(
        self, plan: ImagePlan, namespace: str | None, deadline: float, owner: str | None = None
    ) -> ImageResult:
        """Resolve (or verify, then resolve) one image at its registry; for a Pod with an
        owner, the owner's digest, decided by the first of its Pods."""
        target = plan.target
        scope = PullScope(namespace, plan.field.pull)
        warning = moved_digest_warning(plan) if plan.action is Action.RESOLVE else None
        digest: str | None = None
        failure: ResolveError | None = None
        try:
            if plan.action is Action.VERIFY and await self.resolver.exists(target, scope, deadline):
                digest = target.digest
            elif plan.action is Action.VERIFY and target.tag is None:
                raise ResolveError(
                    f"digest {target.digest} does not exist at {target.name}",
                    reason="digest-not-at-target",
                )
            else:
                if plan.action is Action.VERIFY:
                    warning = (
                        f"pinhook: {plan.original.digest} does not exist at "
                        f"{target.familiar_name()}; pinned tag {target.tag} there instead"
                    )
                tagged = target.with_digest(None)
                digest = await self._owner_digest(owner, tagged, deadline)
                if digest is not None:
                    resolution = Resolution(digest)
                else:
                    resolution = await self.resolver.resolve(tagged, scope, deadline)
                    digest = await self._decide(owner, tagged, resolution.digest, deadline)
                if resolution.stale:
                    stale = f"registry failing for {target.familiar()}; used a cached digest"
                    warning = f"pinhook: {stale}" if warning is None else f"{warning}; {stale}"
        except ResolveError as exc:
            failure = exc
        except Exception as exc:  # a bug must become a policy decision, like any failure
            log.exception("resolving %s failed unexpectedly", target)
            failure = ResolveError(f"internal error ({type(exc).__name__})", reason="internal")
        return ImageResult(plan, render(plan, digest, self._output), digest, warning, failure)

    async def _owner_digest(self, owner: str | None, ref: ImageRef, deadline: float) -> str | None:
        if owner is None or self.owners is None:
            return None
        return await self.owners.recall(owner, ref, deadline)

    async def _decide(self, owner: str | None, ref: ImageRef, digest: str, deadline: float) -> str:
        if owner is None or self.owners is None:
            return digest
        return await self.owners.decide(owner, ref, digest, deadline)

    # -- decide --------------------------------------------------------------------------------

    def _record(self, decision: Decision) -> Decision:
        self.metrics.images_seen(decision.images)
        self._count_failures(decision)
        return decision

    def _count_failures(self, decision: Decision) -> None:
        for reason, count in decision.failures.items():
            self.metrics.resolve_failures.labels(reason).inc(count)


def _hits(digests: tuple[str | None, ...], owner: str | None) -> tuple[int, int]:
    """The cache hits of settled results (``digests``: None where nothing was looked up),
    and of those the owner's digests kept."""
    hits = len(digests) - digests.count(None)
    return hits, hits if owner is not None else 0


def _skip_requested(obj: Mapping[str, Any]) -> bool:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return False
    annotations = metadata.get("annotations")
    return isinstance(annotations, dict) and annotations.get(SKIP_ANNOTATION) == "true"


def _unchanged(field: ImageField, old: Any) -> bool:
    """On UPDATE, leave an image the user did not change: re-pinning it would roll the workload
    out again (a Pod would even restart the container) because a tag moved upstream."""
    return bool(jsonpointer.resolve_pointer(old, field.pointer, None) == field.image)

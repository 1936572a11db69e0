"""The admission pipeline: image fields → rewrite → resolve → JSON patch → outcome.

``plan_image`` and ``render_image`` are pure; ``Mutator`` adds the one I/O step (asking the
resolver, all images of a request concurrently under one deadline).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

import orjson

from .admission import AdmissionOutcome, AdmissionRequest
from .config import SKIP_ANNOTATION, FailurePolicy, OnFailure, OutputForm, Settings
from .errors import InvalidReference, ResolveError
from .kinds import KINDS, Mode, kind_info
from .locate import ImageField, locate_images
from .metrics import Metrics
from .oci.credential import PullContext
from .oci.reference import ImageRef
from .resolve import DigestResolver, PullScope
from .rewrite import RewriteMap

log = logging.getLogger(__name__)

OPERATIONS = frozenset({"CREATE", "UPDATE"})
_PLAN_MEMO_SIZE = 10_000


class Action(Enum):
    KEEP = "keep"  # nothing to do: pinned already and no rule applies
    REWRITE = "rewrite"  # rewrite only, no registry request
    RESOLVE = "resolve"  # resolve the (rewritten) tag to a digest
    VERIFY = "verify"  # a digest moved to another repository: check it exists there


@dataclass(frozen=True, slots=True)
class ImagePlan:
    field: ImageField
    original: ImageRef
    target: ImageRef
    rewritten: bool
    action: Action
    # The name as it will be written: the user's spelling unless a rule moved it.
    name: str


@dataclass(frozen=True, slots=True)
class ImageResult:
    plan: ImagePlan
    final: str
    digest: str | None
    warning: str | None = None
    failure: ResolveError | None = None


def plan_image(
    field: ImageField, ref: ImageRef, rewrites: RewriteMap, skip: frozenset[str], mode: Mode
) -> ImagePlan:
    """What to do with one image: pure, from the map, the registries never resolved, the mode."""
    rewrite = rewrites.apply(ref)
    target = rewrite.result
    if mode is Mode.REWRITE or target.registry in skip:
        action = Action.REWRITE if rewrite.changed else Action.KEEP
    elif target.digest is None:
        action = Action.RESOLVE
    elif rewrite.moved_digest:
        action = Action.VERIFY
    else:
        action = Action.REWRITE if rewrite.changed else Action.KEEP
    name = target.familiar_name() if rewrite.changed else _name_as_written(field.image)
    return ImagePlan(field, ref, target, rewrite.changed, action, name)


def render_image(plan: ImagePlan, digest: str | None, output: OutputForm) -> str:
    """The final reference, with ``digest`` when there is one."""
    target = plan.target
    if plan.action is Action.KEEP:
        return plan.field.image
    name = plan.name
    if digest is None:
        return name + (f":{target.tag}" if target.tag else "")
    if output is OutputForm.DIGEST_ONLY or not target.tag:
        return f"{name}@{digest}"
    return f"{name}:{target.tag}@{digest}"


def _name_as_written(image: str) -> str:
    name = image.split("@", 1)[0]
    colon = name.rfind(":")
    return name[:colon] if colon > name.rfind("/") else name


class Mutator:
    """Answers one AdmissionRequest; holds no per-request state."""

    def __init__(
        self, settings: Settings, resolver: DigestResolver, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.metrics = metrics or Metrics()
        # Read once: settings are a validated model whose attribute access is not free, and
        # these are consulted for every image of every Pod.
        self._rewrites = settings.rewrite_map
        self._skip = frozenset(settings.registry.skip)
        self._excluded = frozenset(settings.excluded_namespaces)
        self._output = settings.output
        self._budget = settings.registry.timeout_seconds
        self._modes = {info.key: settings.mode_for(info.key) for info in KINDS}
        self._policies: dict[str | None, FailurePolicy] = {}
        # Parsing and rewriting depend only on the image string and the mode under one config,
        # and a cluster runs few distinct images: remember the plan of each.
        self._plans: dict[tuple[str, Mode], tuple[ImageRef, ImageRef, bool, Action, str]] = {}

    def _plan(self, field: ImageField, mode: Mode) -> ImagePlan:
        """Raises InvalidReference; see ``plan_image``."""
        key = (field.image, mode)
        known = self._plans.get(key)
        if known is not None:
            return ImagePlan(field, *known)
        plan = plan_image(field, ImageRef.parse(field.image), self._rewrites, self._skip, mode)
        if len(self._plans) >= _PLAN_MEMO_SIZE:
            self._plans.clear()
        self._plans[key] = (plan.original, plan.target, plan.rewritten, plan.action, plan.name)
        return plan

    def _policy(self, namespace: str | None) -> FailurePolicy:
        policy = self._policies.get(namespace)
        if policy is None:
            if len(self._policies) >= _PLAN_MEMO_SIZE:
                self._policies.clear()
            policy = self._policies[namespace] = self.settings.policy_for(namespace)
        return policy

    async def review(
        self, request: AdmissionRequest, *, budget: float | None = None
    ) -> AdmissionOutcome:
        """Answer one request; registry work ends within ``budget`` seconds (default: config)."""
        info = kind_info(request.group, request.kind)
        if info is None or request.operation not in OPERATIONS:
            return AdmissionOutcome()
        mode = self._modes.get(info.key, Mode.OFF)
        if mode is Mode.OFF or (request.namespace or "") in self._excluded:
            return AdmissionOutcome()
        obj = request.obj
        if not isinstance(obj, dict):
            return AdmissionOutcome(warnings=["pinhook: object is not a JSON object; left as is"])
        if _skip_requested(obj):
            return AdmissionOutcome(audit={"skipped": f"annotation {SKIP_ANNOTATION}"})
        located = locate_images(request.group, request.kind, obj)
        if located is None:
            return AdmissionOutcome()
        outcome = AdmissionOutcome(warnings=[f"pinhook: {p}; left as is" for p in located.problems])
        plans: list[ImagePlan] = []
        policy = self._policy(request.namespace)
        for field in located.fields:
            if request.operation == "UPDATE" and _unchanged(field, request.old_obj):
                continue
            try:
                plans.append(self._plan(field, mode))
            except InvalidReference as exc:
                self.metrics.image("invalid")
                outcome.warnings.append(f"pinhook: {field.pointer}: {exc}; left as is")
                if policy.require_digest and mode is Mode.PIN:
                    return _deny(f"{field.image!r} at {field.pointer} is not a valid reference")
        results = await self._execute(plans, request.namespace, budget or self._budget)
        return self._conclude(results, outcome, policy, mode)

    def timed_out(self, request: AdmissionRequest) -> AdmissionOutcome:
        """The answer when a review overran its budget: the same policy as a failed resolve."""
        info = kind_info(request.group, request.kind)
        mode = self._modes.get(info.key, Mode.OFF) if info is not None else Mode.OFF
        policy = self._policy(request.namespace)
        if mode is Mode.PIN and (policy.require_digest or policy.on_failure is OnFailure.DENY):
            return _deny("timed out resolving images")
        return AdmissionOutcome(warnings=["pinhook: timed out; object left as is"])

    async def pin(self, images: Sequence[str], *, mode: Mode = Mode.PIN) -> list[ImageResult]:
        """Rewrite and resolve bare image strings, as for a Pod (``pinhook resolve``).

        Raises InvalidReference for the first invalid one.
        """
        fields = (
            ImageField(f"/images/{i}", image, PullContext()) for i, image in enumerate(images)
        )
        return await self._execute([self._plan(f, mode) for f in fields], None, self._budget)

    async def _execute(
        self, plans: list[ImagePlan], namespace: str | None, budget: float
    ) -> list[ImageResult]:
        results: list[ImageResult | None] = [self._settle(plan) for plan in plans]
        pending = [i for i, result in enumerate(results) if result is None]
        hits = sum(
            plan.action is Action.RESOLVE and result is not None
            for plan, result in zip(plans, results, strict=True)
        )
        if hits:
            self.metrics.cache_event("hit", hits)
        if pending:
            # Only cache misses cost a task each; the common all-cached request creates none.
            deadline = asyncio.get_running_loop().time() + budget
            resolved = await asyncio.gather(
                *(self._run(plans[i], namespace, deadline) for i in pending)
            )
            for i, result in zip(pending, resolved, strict=True):
                results[i] = result
        return [result for result in results if result is not None]

    def _settle(self, plan: ImagePlan) -> ImageResult | None:
        """The result without waiting, when no registry is needed or the cache knows it."""
        if plan.action in (Action.KEEP, Action.REWRITE):
            final = render_image(plan, plan.target.digest, self._output)
            return ImageResult(plan, final, None, _moved_digest_warning(plan))
        if plan.action is Action.RESOLVE:
            digest = self.resolver.peek(plan.target)
            if digest is not None:
                final = render_image(plan, digest, self._output)
                return ImageResult(plan, final, digest, _moved_digest_warning(plan))
        return None

    async def _run(self, plan: ImagePlan, namespace: str | None, deadline: float) -> ImageResult:
        output = self._output
        scope = PullScope(namespace, plan.field.pull)
        warning = _moved_digest_warning(plan) if plan.action is Action.RESOLVE else None
        try:
            if plan.action is Action.VERIFY:
                if await self.resolver.exists(plan.target, scope, deadline):
                    return ImageResult(
                        plan, render_image(plan, plan.target.digest, output), plan.target.digest
                    )
                if plan.target.tag is None:
                    raise ResolveError(
                        f"digest {plan.target.digest} does not exist at {plan.target.name}",
                        reason="digest-not-at-target",
                    )
                warning = (
                    f"pinhook: {plan.original.digest} does not exist at "
                    f"{plan.target.familiar_name()}; pinned tag {plan.target.tag} there instead"
                )
            resolution = await self.resolver.resolve(plan.target.with_digest(None), scope, deadline)
        except ResolveError as exc:
            if plan.target.tag is None and plan.target.digest is not None:
                # A digest-only reference that cannot be shown to exist at the target: writing
                # it there would make a pull that is certain to fail. Leave it as it came.
                return ImageResult(plan, plan.field.image, None, warning, exc)
            # Unpinned, but still rewritten; a moved digest is dropped, the tag stands in.
            fallback = plan.target.with_digest(None)
            rewrite_only = replace(plan, target=fallback, action=Action.REWRITE)
            return ImageResult(plan, render_image(rewrite_only, None, output), None, warning, exc)
        if resolution.stale:
            stale = f"pinhook: registry failing for {plan.target.familiar()}; used a cached digest"
            warning = stale if warning is None else f"{warning}; {stale.removeprefix('pinhook: ')}"
        return ImageResult(
            plan, render_image(plan, resolution.digest, output), resolution.digest, warning
        )

    def _conclude(
        self,
        results: list[ImageResult],
        outcome: AdmissionOutcome,
        policy: FailurePolicy,
        mode: Mode,
    ) -> AdmissionOutcome:
        changed: list[str] = []
        unpinned: list[str] = []
        tally: dict[str, int] = {}
        for result in results:
            field = result.plan.field
            if result.warning:
                outcome.warnings.append(result.warning)
            if result.failure is not None:
                reason = result.failure.reason
                self.metrics.resolve_failures.labels(reason).inc()
                tally["unpinned"] = tally.get("unpinned", 0) + 1
                if policy.on_failure is OnFailure.DENY:
                    return _deny(f"cannot pin {field.image} ({field.pointer}): {result.failure}")
                outcome.warnings.append(f"pinhook: {field.image} not pinned: {result.failure}")
                unpinned.append(f"{field.image} ({reason})")
            elif mode is Mode.PIN and "@" not in result.final and policy.require_digest:
                return _deny(
                    f"{field.image} ({field.pointer}) would not be pinned to a digest"
                    " and requireDigest is set"
                )
            else:
                kind = _image_outcome(result)
                tally[kind] = tally.get(kind, 0) + 1
            if result.final != field.image:
                outcome.patch.append(
                    {"op": "replace", "path": field.pointer, "value": result.final}
                )
                changed.append(f"{field.image} -> {result.final}")
        self.metrics.images_seen(tally)
        if unpinned and policy.require_digest and mode is Mode.PIN:
            return _deny(f"cannot pin {', '.join(unpinned)} and requireDigest is set")
        if changed:
            outcome.audit["images"] = orjson.dumps(changed).decode()
        if unpinned:
            outcome.audit["unpinned"] = orjson.dumps(unpinned).decode()
        return outcome


def _moved_digest_warning(plan: ImagePlan) -> str | None:
    if plan.original.digest is None or not plan.rewritten:
        return None
    if plan.target.digest is None:
        return (
            f"pinhook: a rule set tag {plan.target.tag} for {plan.original.familiar()}; its"
            " digest belonged to the old tag and was dropped"
        )
    if plan.target.name == plan.original.name:
        return None
    return (
        f"pinhook: kept digest {plan.original.digest} across registries for "
        f"{plan.target.familiar_name()}; it may not exist there"
    )


def _image_outcome(result: ImageResult) -> str:
    if result.final == result.plan.field.image:
        return "unchanged"
    return "pinned" if result.digest is not None else "rewritten"


def _deny(message: str) -> AdmissionOutcome:
    return AdmissionOutcome(allowed=False, code=403, message=f"pinhook: {message}")


def _skip_requested(obj: Mapping[str, Any]) -> bool:
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return False
    annotations = metadata.get("annotations")
    return isinstance(annotations, dict) and annotations.get(SKIP_ANNOTATION) == "true"


def _unchanged(field: ImageField, old: Any) -> bool:
    """On UPDATE, leave an image the user did not change: re-pinning it would roll the workload
    out again (a Pod would even restart the container) because a tag moved upstream."""
    node = old
    for token in field.pointer.split("/")[1:]:
        key = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return False
    return bool(node == field.image)

"""The first step of an admission, and its vocabulary: what to do with each image.

Pure. ``plan_image`` decides, from the rewrite map, the mode and the registries never
resolved, whether an image is kept, rewritten, resolved to a digest or has a moved digest
verified; a :class:`RequestPlan` holds that for every image field of one request, an invalid
reference included as an entry of its own. ``render`` writes every final image string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, NamedTuple

from .config import FailurePolicy, LimitSettings, OutputForm
from .errors import InvalidReference, ResolveError
from .kinds import Mode
from .locate import ImageField
from .oci.reference import ImageRef
from .rewrite import RewriteMap

# The reason of a failure that is pinhook's own limit, not the registry's answer.
LIMIT = "limit"


class Action(Enum):
    KEEP = "keep"  # nothing to do: pinned already and no rule applies
    REWRITE = "rewrite"  # rewrite only, no registry request
    RESOLVE = "resolve"  # resolve the (rewritten) tag to a digest
    VERIFY = "verify"  # a digest moved to another repository: check it exists there


class ImagePlan(NamedTuple):
    field: ImageField
    original: ImageRef
    target: ImageRef
    rewritten: bool
    action: Action
    # The name as it will be written: the user's spelling unless a rule moved it.
    name: str


@dataclass(frozen=True, slots=True)
class InvalidImage:
    """An image field whose value is no valid reference: left as it is, or denied."""

    field: ImageField
    error: InvalidReference


_NO_AUDIT: Mapping[str, str] = MappingProxyType({})
_DEFAULT_LIMITS = LimitSettings()


class RequestPlan(NamedTuple):
    """Everything decided about one request before any registry is asked."""

    mode: Mode  # of the object's kind in its namespace; OFF for a kind pinhook does not know
    policy: FailurePolicy  # of the object's namespace
    namespace: str | None = None
    images: tuple[ImagePlan | InvalidImage, ...] = ()  # in field order
    warnings: tuple[str, ...] = ()  # what could not be read
    audit: Mapping[str, str] = _NO_AUDIT
    limits: LimitSettings = _DEFAULT_LIMITS
    images_over_limit: int = 0  # 1 when there are image fields past limits.imagesPerObject
    skipped: str | None = None  # why pinhook does not look at the object, when it does not
    # The rollout a Pod belongs to (``pod_owner``), when owner pinning is on: its images get
    # the digests its first Pod got.
    owner: str | None = None


class ImageResult(NamedTuple):
    """What became of one planned image (resolve's output, decide's input)."""

    plan: ImagePlan
    final: str  # the image string to write, from ``render``
    digest: str | None  # found or confirmed at the registry; None when none was asked for
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


def render(plan: ImagePlan, digest: str | None, output: OutputForm) -> str:
    """The final image string of ``plan``, pinned to ``digest`` when there is one.

    Without a digest (rewritten only, or resolving failed) it is the name with the target's
    tag, so a digest a rule carried to another repository is dropped and the tag stands in;
    a reference with a digest and no tag, whose digest cannot be written, stays as it came:
    written elsewhere, it would make a pull that is certain to fail.
    """
    target = plan.target
    if plan.action is Action.KEEP:
        return plan.field.image
    if digest is None:
        if target.tag is None and target.digest is not None:
            return plan.field.image
        return plan.name + (f":{target.tag}" if target.tag else "")
    if output is OutputForm.DIGEST_ONLY or not target.tag:
        return f"{plan.name}@{digest}"
    return f"{plan.name}:{target.tag}@{digest}"


def moved_digest_warning(plan: ImagePlan) -> str | None:
    """What a user should know about a digest a rule moved or dropped."""
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


# uids are UUIDs and revision hashes short hex-like names; anything else is not a controller's.
_OWNER_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def pod_owner(obj: Mapping[str, Any], namespace: str | None) -> str | None:
    """The rollout a Pod belongs to: ``namespace/uid`` of its controlling ownerReference (a
    ReplicaSet, which is one rollout of a Deployment, a Knative revision or a KServe
    predictor; a Job), and ``/revision`` for owners that keep Pods of several revisions under
    one uid (StatefulSets and DaemonSets label them ``controller-revision-hash``). None for a
    Pod without a controller."""
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return None
    references = metadata.get("ownerReferences")
    if not isinstance(references, list):
        return None
    uid = next(
        (
            ref.get("uid")
            for ref in references
            if isinstance(ref, dict) and ref.get("controller") is True
        ),
        None,
    )
    if not isinstance(uid, str) or not _OWNER_PART.match(uid):
        return None
    owner = f"{namespace or ''}/{uid}"
    labels = metadata.get("labels")
    revision = labels.get("controller-revision-hash") if isinstance(labels, dict) else None
    if isinstance(revision, str) and _OWNER_PART.match(revision):
        owner += f"/{revision}"
    return owner


def _name_as_written(image: str) -> str:
    name = image.split("@", 1)[0]
    colon = name.rfind(":")
    return name[:colon] if colon > name.rfind("/") else name

"""The last step of an admission: allow, deny or patch, from what became of each image.

Pure, and the only place that denies. Under ``requireDigest`` (in a kind that is pinned), an
object is denied when any image would end up without a digest: an invalid reference, one in a
registry never resolved, one whose resolution failed. Under ``onFailure: deny`` a failed
resolution denies in any kind. A review that ran out of time in a pinned kind is denied under
either. Everything else is admitted, patched where an image changed, with a warning for what
was not pinned.

In ``audit`` mode everything above is decided as in ``pin`` mode and then nothing is done:
no patch, no denial; what pin would have done goes to the warnings, to the audit annotations
``would-patch`` and ``would-deny``, and to the result ``audited``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

import orjson

from .admission import AdmissionOutcome
from .config import FailurePolicy, LimitSettings, OnFailure
from .kinds import PINNING, Mode
from .plan import LIMIT, ImageResult, InvalidImage, RequestPlan

# What pinhook did with a request: the admission log's ``outcome`` and the metrics' ``result``.
PATCHED: Final = "patched"
UNCHANGED: Final = "unchanged"  # looked at, nothing to change (or nothing could be)
DENIED: Final = "denied"
SKIPPED: Final = "skipped"  # not looked at: kind off or unknown, excluded, skip annotation
# Audit mode: computed, reported, not applied. Also, in the images tally, the images audit
# mode would have changed.
AUDITED: Final = "audited"
# Room for "... (N more bytes)" at the end of a cut text: N is below the 8 MiB body limit.
_CUT_MARK_BYTES: Final = 32


class Decision(NamedTuple):
    outcome: AdmissionOutcome
    # Images by outcome (pinned, rewritten, unchanged, unpinned, invalid, audited) and resolve
    # failures by reason, for the metrics: every image of the request counted once.
    images: Mapping[str, int]
    failures: Mapping[str, int]
    result: str = UNCHANGED  # one of PATCHED, UNCHANGED, DENIED, SKIPPED, AUDITED
    # What became of each valid image, in field order (for the admission log; not copied).
    results: Sequence[ImageResult] = ()


class Unknown(NamedTuple):
    """Why a review's images are not known: the denial, and the warning when admitted."""

    denial: str
    warning: str


TIMED_OUT: Final = Unknown("timed out resolving images", "timed out")
OVERLOADED: Final = Unknown(
    "overloaded: no time left before the API server's timeout to resolve images",
    "overloaded; images not resolved",
)
INTERNAL_ERROR: Final = Unknown(
    "internal error; see pinhook's log", "internal error; see pinhook's log"
)


def decide(
    plan: RequestPlan,
    results: Sequence[ImageResult] | None,
    *,
    unknown: Unknown = TIMED_OUT,
) -> Decision:
    """The answer to a request planned as ``plan`` whose images became ``results``; None when
    they are not known (the review ran out of time, or failed in pinhook itself: ``unknown``
    says which).

    One pass over the results, in field order: the first deny rule an image meets decides
    the message; the tally counts every image either way.
    """
    if plan.skipped is not None:
        return Decision(AdmissionOutcome(audit=dict(plan.audit)), {}, {}, SKIPPED)
    if results is None:
        outcome = _unresolved(plan.policy, plan.mode, unknown)
        return Decision(outcome, {}, {}, _result(outcome, plan.mode is Mode.AUDIT))
    return _conclude(plan, results, _tally(plan, results))


@dataclass(slots=True)
class _Tally:
    """What the pass over a request's images found: the answer in the making (its warnings
    and patch), the counts, and the first denial (None while nothing denies)."""

    outcome: AdmissionOutcome
    images: dict[str, int]
    failures: dict[str, int]
    changed: list[str]  # "image -> final"
    unpinned: list[str]  # "image (reason)"
    # Images not looked up for pinhook's lookup limit: how many, and why (all alike).
    not_looked_up: int = 0
    not_looked_up_why: str = ""
    denial: str | None = None


def _tally(plan: RequestPlan, results: Sequence[ImageResult]) -> _Tally:
    """Every image of the request counted, with its warning and patch, in field order."""
    policy = plan.policy
    require_digest = policy.require_digest and plan.mode in PINNING
    audit = plan.mode is Mode.AUDIT
    invalid = [entry for entry in plan.images if isinstance(entry, InvalidImage)]
    tally = _Tally(
        AdmissionOutcome(warnings=list(plan.warnings), audit=dict(plan.audit)),
        images={"invalid": len(invalid)} if invalid else {},
        failures={},
        changed=[],
        unpinned=[],
        denial=_object_denial(plan, invalid) if require_digest else None,
    )
    # Locals for the loop, which runs for every image of every request.
    warnings = tally.outcome.warnings
    patch = tally.outcome.patch
    images = tally.images
    failures = tally.failures
    warnings += [f"pinhook: {e.field.pointer}: {e.error}; left as is" for e in invalid]
    for result in results:
        field, failure = result.plan.field, result.failure
        if result.warning:
            warnings.append(result.warning)
        if failure is not None:
            kind = "unpinned"
            failures[failure.reason] = failures.get(failure.reason, 0) + 1
            if tally.denial is None and policy.on_failure is OnFailure.DENY:
                tally.denial = f"cannot pin {field.image} ({field.pointer}): {failure}"
            if failure.reason == LIMIT:
                # One warning for all of them: they fail alike, and may be thousands.
                if not tally.not_looked_up:
                    tally.not_looked_up_why = str(failure)
                tally.not_looked_up += 1
            else:
                warnings.append(f"pinhook: {field.image} not pinned: {failure}")
            tally.unpinned.append(f"{field.image} ({failure.reason})")
        else:
            kind = _image_outcome(result)
            if tally.denial is None and require_digest and "@" not in result.final:
                # In a registry never resolved (registry.skip), or rewritten without a digest.
                tally.denial = (
                    f"{field.image} ({field.pointer}) would not be pinned to a digest"
                    " and requireDigest is set"
                )
        if result.final != field.image:
            if audit and failure is None:
                kind = AUDITED  # would have changed; nothing did
            patch.append({"op": "replace", "path": field.pointer, "value": result.final})
            tally.changed.append(f"{field.image} -> {result.final}")
        images[kind] = images.get(kind, 0) + 1
    if tally.denial is None and tally.unpinned and require_digest:
        tally.denial = f"cannot pin {_some(tally.unpinned)} and requireDigest is set"
    return tally


def _object_denial(plan: RequestPlan, invalid: list[InvalidImage]) -> str | None:
    """Under requireDigest, what denies the object before any image is looked at."""
    if plan.images_over_limit:
        return (
            f"the object has more than {plan.limits.images_per_object} image fields, the most"
            " pinhook handles in one object, and requireDigest is set"
        )
    if invalid:
        # The error quotes the image cut short: the image itself may be a megabyte.
        return f"{invalid[0].field.pointer}: {invalid[0].error}"
    return None


def _conclude(plan: RequestPlan, results: Sequence[ImageResult], tally: _Tally) -> Decision:
    """The answer from the tally: the denial, or the patch with its warnings and audit
    annotations, all within the limits; in audit mode, what pin would have done, said."""
    limits = plan.limits
    images, failures, outcome = tally.images, tally.failures, tally.outcome
    denial = tally.denial
    if denial is not None:
        # It becomes the status message, or the would-deny annotation and a warning.
        denial = _cut(denial, limits.audit_annotation_bytes)
    audit = plan.mode is Mode.AUDIT
    if denial is not None and not audit:
        return Decision(_deny(denial), images, failures, DENIED, results)
    # What was left undone by pinhook's own limits comes first: a cap on warnings must not
    # hide it behind a thousand alike.
    summary: list[str] = []
    if plan.images_over_limit:
        images["over-limit"] = plan.images_over_limit
        summary.append(
            f"pinhook: the object has more than {limits.images_per_object} image fields;"
            " those past them were left as they are"
        )
    if tally.not_looked_up:
        summary.append(f"pinhook: {tally.not_looked_up} images {tally.not_looked_up_why}")
    if summary:
        outcome.warnings[:0] = summary
    outcome.warnings = _capped(outcome.warnings, limits.warnings_per_response)
    if tally.changed:
        outcome.audit["images"] = _bounded_json(tally.changed, limits.audit_annotation_bytes)
    if tally.unpinned:
        outcome.audit["unpinned"] = _bounded_json(tally.unpinned, limits.audit_annotation_bytes)
    if audit:
        outcome = _audited(outcome, tally.changed, denial, limits)
        return Decision(outcome, images, failures, AUDITED, results)
    return Decision(outcome, images, failures, PATCHED if outcome.patch else UNCHANGED, results)


def _result(outcome: AdmissionOutcome, audit: bool) -> str:
    if audit:
        return AUDITED
    if not outcome.allowed:
        return DENIED
    return PATCHED if outcome.patch else UNCHANGED


def _audited(
    outcome: AdmissionOutcome, changed: list[str], denial: str | None, limits: LimitSettings
) -> AdmissionOutcome:
    """What pin would have answered, said and not done: no patch, never a denial."""
    audit = dict(outcome.audit)
    said: list[str] = []
    if "images" in audit:
        audit["would-patch"] = audit.pop("images")
        said.append(f"pinhook (audit mode): would change {_some(changed, 3)}")
    if denial is not None:
        audit["would-deny"] = denial
        said.append(f"pinhook (audit mode): would deny: {denial}")
    warnings = _capped(said + outcome.warnings, limits.warnings_per_response)
    return AdmissionOutcome(warnings=warnings, audit=audit)


def _some(items: list[str], shown: int = 5) -> str:
    text = ", ".join(items[:shown])
    return text if len(items) <= shown else f"{text} and {len(items) - shown} more"


def _capped(warnings: list[str], cap: int) -> list[str]:
    """At most ``cap`` warnings, the last one saying how many more there were: a huge object
    must not get a huge answer."""
    if len(warnings) <= cap:
        return warnings
    more = len(warnings) - (cap - 1)
    return [*warnings[: cap - 1], f"pinhook: {more} more warnings like these not shown"]


def _cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` bytes of UTF-8, cut with a count of what was left out."""
    data = text.encode()
    if len(data) <= limit:
        return text
    kept = data[: limit - _CUT_MARK_BYTES].decode(errors="ignore")
    return f"{kept}... ({len(data) - len(kept.encode())} more bytes)"


def _bounded_json(items: list[str], limit: int) -> str:
    """A JSON list of ``items`` no longer than ``limit`` bytes, the rest counted at its end."""
    text = orjson.dumps(items).decode()
    if len(text.encode()) <= limit:
        return text
    kept: list[str] = []
    size = 2  # []
    for item in items:
        size += len(orjson.dumps(item)) + 1
        if size + 32 > limit:  # room for the count
            break
        kept.append(item)
    return orjson.dumps([*kept, f"... and {len(items) - len(kept)} more"]).decode()


def _unresolved(policy: FailurePolicy, mode: Mode, reason: Unknown) -> AdmissionOutcome:
    """A review whose images are not known: the same policy as a failed resolution."""
    strict = policy.require_digest or policy.on_failure is OnFailure.DENY
    if mode is Mode.PIN and strict:
        return _deny(reason.denial)
    outcome = AdmissionOutcome(warnings=[f"pinhook: {reason.warning}; object left as is"])
    if mode is Mode.AUDIT and strict:
        outcome.audit["would-deny"] = reason.denial
        outcome.warnings.insert(0, f"pinhook (audit mode): would deny: {reason.denial}")
    return outcome


def _image_outcome(result: ImageResult) -> str:
    if result.final == result.plan.field.image:
        return "unchanged"
    return "pinned" if result.digest is not None else "rewritten"


def _deny(message: str) -> AdmissionOutcome:
    return AdmissionOutcome(allowed=False, code=403, message=f"pinhook: {message}")

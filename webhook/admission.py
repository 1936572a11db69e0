"""The AdmissionReview envelope: decode a request once, answer in the version it was asked.

Only the envelope is validated (apiVersion, kind, request.uid and the fields pinhook reads);
the object itself stays a plain decoded dict, walked by the locators. Decoding the whole
object into models would cost more than the rest of the request on a large Pod.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from .errors import InvalidReview

API_VERSIONS = frozenset({"admission.k8s.io/v1", "admission.k8s.io/v1beta1"})
MAX_BODY_BYTES = 8 * 1024 * 1024


class AdmissionRequest(NamedTuple):
    """The fields pinhook reads. A dry run is answered like a real request; ``dry_run`` and
    ``name`` are read for the admission log only."""

    api_version: str
    uid: str
    group: str
    kind: str
    operation: str
    namespace: str | None
    obj: Any
    old_obj: Any
    name: str = ""  # empty on CREATE of an object named by generateName
    dry_run: bool = False


@dataclass(slots=True)
class AdmissionOutcome:
    allowed: bool = True
    patch: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    audit: dict[str, str] = field(default_factory=dict)
    message: str | None = None
    code: int = 200


def parse_review(body: bytes) -> AdmissionRequest:
    """Decode and check the envelope; raises InvalidReview with a reason a person can act on."""
    return read_review(decode_review(body))


def decode_review(body: bytes) -> Any:
    """The body as JSON, not yet checked (see ``read_review``)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidReview(f"body is not JSON: {exc}") from None


def read_review(review: Any) -> AdmissionRequest:
    """Check a decoded body's envelope; raises InvalidReview with a reason a person can act on."""
    if not isinstance(review, dict):
        raise InvalidReview("body is not a JSON object")
    api_version = review.get("apiVersion")
    if api_version not in API_VERSIONS:
        raise InvalidReview(
            f"apiVersion must be one of {sorted(API_VERSIONS)}, got {api_version!r}"
        )
    if review.get("kind") != "AdmissionReview":
        raise InvalidReview(f"kind must be 'AdmissionReview', got {review.get('kind')!r}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise InvalidReview("request is missing or not an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise InvalidReview("request.uid is missing or not a non-empty string")
    kind = request.get("kind")
    if not isinstance(kind, dict):
        raise InvalidReview("request.kind is missing or not an object")
    return AdmissionRequest(
        api_version=api_version,
        uid=uid,
        group=_text(kind.get("group")) or "",
        kind=_text(kind.get("kind")) or "",
        operation=_text(request.get("operation")) or "",
        namespace=_text(request.get("namespace")) or None,
        obj=request.get("object"),
        old_obj=request.get("oldObject"),
        name=_text(request.get("name")) or "",
        dry_run=request.get("dryRun") is True,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def render_response(api_version: str, uid: str, outcome: AdmissionOutcome) -> bytes:
    response: dict[str, Any] = {"uid": uid, "allowed": outcome.allowed}
    if outcome.patch and outcome.allowed:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(outcome.patch)).decode("ascii")
    if not outcome.allowed:
        response["status"] = {
            "code": outcome.code,
            "reason": "Forbidden" if outcome.code == 403 else "BadRequest",
            "message": outcome.message or "denied by pinhook",
        }
    if outcome.warnings:
        response["warnings"] = outcome.warnings
    if outcome.audit:
        response["auditAnnotations"] = outcome.audit
    return orjson.dumps(
        {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}
    )

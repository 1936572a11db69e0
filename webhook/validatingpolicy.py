"""The ValidatingAdmissionPolicy that backs pinhook up inside the API server: a digest-only
policy that holds when pinhook is down, when its webhook fails open (``failurePolicy:
Ignore``), when its webhook configuration is deleted, and for objects that never reach it.

Pure: no I/O. Generated from the same settings and kind table as the webhook configuration.
Validating admission runs after every mutating webhook, so with pinhook up the objects it sees
are already pinned and the policy never denies; it denies what would be stored unpinned.

* What: every image field of every kind in ``pin`` mode somewhere (``cel.cel_image_fields``)
  must end in a valid digest (``webhookconfig.PINNED``, the test pinhook itself uses). One
  validation per field, so that the message names the kind and the field (and, where CEL can,
  the image).
* Where: for each kind, the namespaces where ``requireDigest`` applies (globally or per
  namespace) and the kind's mode there (``Settings.mode_for``, a namespace's ``mode`` included)
  is ``pin``: never where pinhook only audits, rewrites or is off, as pinhook denies nothing
  there, nor in the excluded namespaces, pinhook's own or kube-system; cluster-scoped objects
  under the global settings (``webhookconfig.namespaces_where``). As a ``matchCondition`` on
  ``request.namespace``, one per group of kinds enforced in the same namespaces when they
  differ. Where ``skipAnnotation`` honours ``pinhook.dev/skip`` under ``requireDigest``
  (never, unless set to ``honoured``), annotated objects are let through too, as pinhook lets
  them through.
* UPDATE: an unpinned image that the old object already had (in any of its fields) passes,
  as pinhook leaves unchanged images alone: objects stored before the policy (or in a namespace
  enforced later) can still be labelled, have finalizers removed or be deleted; an UPDATE cannot
  bring in an unpinned image the object did not have.
* Cost: the API server does not estimate the cost of an admission policy over untyped objects
  (it accepted one of nested comprehensions without complaint), but stops an evaluation over
  budget (1,000,000 per expression, 10,000,000 per policy): each validation first compares
  ``request.resource.resource`` (a few units), so only the kind's own fields are read, each
  image once (``matches`` costs about its length over ten). A Pod of 200 containers stays far
  below the budget (tests/e2e/test_backstop.py).
* Size: one validation per field is some 150 KiB for the default kinds, under the 256 KiB that
  ``kubectl apply`` (client-side) can keep in its last-applied annotation.
* A policy that nothing is enforced by (no namespace with ``requireDigest`` where some kind
  pins) is kept disarmed
  by a ``false`` matchCondition rather than left out, so that syncing it (``policysync``) can
  switch enforcement off with a patch.
"""

from __future__ import annotations

import re
from typing import Any, Final

from .cel import CelImages, cel_image_fields, cel_images, cel_list, cel_string
from .config import Settings
from .kinds import KINDS, KindInfo, Mode
from .webhookconfig import (
    NOT_SKIPPED,
    PINNED,
    NamespaceSet,
    excluded_namespaces,
    namespaces_where,
)

API_VERSION: Final = "admissionregistration.k8s.io/v1"
POLICY_KIND: Final = "ValidatingAdmissionPolicy"
BINDING_KIND: Final = "ValidatingAdmissionPolicyBinding"
DISARMED: Final = "require-digest-applies-nowhere"


def build_validating_policy(
    settings: Settings, *, name: str = "pinhook", own_namespace: str | None = "pinhook-system"
) -> list[dict[str, Any]]:
    """The policy and its binding, both named ``name``."""
    return [policy_object(settings, name=name, own_namespace=own_namespace), binding_object(name)]


def policy_object(
    settings: Settings, *, name: str = "pinhook", own_namespace: str | None = "pinhook-system"
) -> dict[str, Any]:
    excluded = excluded_namespaces(settings, own_namespace)
    enforced = {
        info: where
        for info in KINDS
        if Mode.PIN in settings.modes_for(info.key)
        and not (where := enforced_namespaces(settings, info, excluded)).empty
    }
    kinds = list(enforced)
    armed = bool(kinds)
    checked = kinds or [KINDS[0]]  # a policy needs a rule and a validation, armed or not
    variables: list[dict[str, str]] = []
    validations: list[dict[str, str]] = []
    for info in checked:
        old = _variable_name(info, "old")
        variables.append({"name": old, "expression": _old_images(info)})
        for index, (path, field) in enumerate(cel_image_fields(info)):
            variable, validation = _field_check(info, index, path, field, f"variables.{old}")
            if variable is not None:
                variables.append(variable)
            validations.append(validation)
    spec: dict[str, Any] = {
        "failurePolicy": "Fail",
        "matchConstraints": {
            "matchPolicy": "Equivalent",
            "resourceRules": [_rule(info) for info in checked],
        },
        "matchConditions": _conditions(settings, enforced, excluded) if armed else [_disarmed()],
        "variables": variables,
        "validations": validations,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": POLICY_KIND,
        "metadata": {"name": name},
        "spec": spec,
    }


def binding_object(name: str = "pinhook") -> dict[str, Any]:
    """The binding: static, everything that depends on the settings is in the policy."""
    return {
        "apiVersion": API_VERSION,
        "kind": BINDING_KIND,
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }


def armed(policy: dict[str, Any]) -> bool:
    """Whether a generated policy denies anything."""
    conditions = policy["spec"].get("matchConditions") or []
    return all(condition["name"] != DISARMED for condition in conditions)


def _rule(info: KindInfo) -> dict[str, Any]:
    resources = [info.resource]
    if info.key == "pods":
        # `kubectl debug` adds ephemeral containers through this subresource only.
        resources.append("pods/ephemeralcontainers")
    return {
        "apiGroups": [info.group],
        "apiVersions": ["*"],
        "operations": ["CREATE", "UPDATE"],
        "resources": resources,
        "scope": "*",
    }


def enforced_namespaces(
    settings: Settings, info: KindInfo, excluded: tuple[str, ...]
) -> NamespaceSet:
    """Where the policy checks objects of ``info``: ``requireDigest`` applies and the kind is
    pinned. Audit promises never to deny, and rewrite and off pin nothing."""

    def holds(namespace: str | None) -> bool:
        return (
            settings.policy_for(namespace).require_digest
            and settings.mode_for(info.key, namespace) is Mode.PIN
        )

    return namespaces_where(settings, holds, excluded)


def _conditions(
    settings: Settings, enforced: dict[KindInfo, NamespaceSet], excluded: tuple[str, ...]
) -> list[dict[str, str]]:
    conditions = [{"name": "require-digest-applies", "expression": _applies(enforced)}]

    def honoured_here(namespace: str | None) -> bool:
        policy = settings.policy_for(namespace)
        return policy.require_digest and settings.skip_honoured(policy)

    honoured = namespaces_where(settings, honoured_here, excluded)
    if not honoured.empty:
        expression = f"{honoured.lacks_request()} ||\n{NOT_SKIPPED}"
        conditions.append({"name": "not-skipped", "expression": expression})
    return conditions


def _applies(enforced: dict[KindInfo, NamespaceSet]) -> str:
    """CEL: the request is for a kind enforced in its namespace. When every kind is enforced in
    the same namespaces (the usual case), a test of the namespace alone."""
    groups: dict[NamespaceSet, list[str]] = {}
    for info, where in enforced.items():
        groups.setdefault(where, []).append(info.resource)
    if len(groups) == 1:
        return next(iter(groups)).has_request()
    return " ||\n".join(
        f"(request.resource.resource in {cel_list(resources)} && {where.has_request()})"
        for where, resources in groups.items()
    )


def _disarmed() -> dict[str, str]:
    return {"name": DISARMED, "expression": "false"}


def _pinned(s: str) -> str:
    return f"type({s}) == string && {s}.matches({cel_string(PINNED)})"


def _old_images(info: KindInfo) -> str:
    """CEL: lists of the old object's image values, on UPDATE; none on CREATE."""
    return f"oldObject == null ? [] :\n{cel_images(info, 'oldObject').lists}"


def _field_check(
    info: KindInfo, index: int, path: str, field: CelImages, old: str
) -> tuple[dict[str, str] | None, dict[str, str]]:
    """The variable (when the field's values form one list) and the validation of one field.

    ``old`` is the variable holding lists of the old object's images: one that is already
    there (in any field) passes on UPDATE.
    """
    # The resource names of the kinds differ, and the rules admit only their groups.
    gate = f"request.resource.resource == {cel_string(info.resource)}"
    message = f"pinhook: {info.kind} {path}: an image is not pinned to a digest (requireDigest)"
    validation = {"message": message, "reason": "Forbidden"}

    def kept(s: str) -> str:
        return f"{old}.exists(l, {s} in l)"

    values = field.values
    if values is None:
        # Repeated parts (an InferenceService's canaries): no flat list to name an image from.
        allowed = field.all(lambda s: f"{_pinned(s)} || {kept(s)}")
        validation["expression"] = f"!({gate}) ||\n({allowed})"
        return None, validation
    variable = _variable_name(info, str(index))
    unpinned = f"{values}.filter(s, !({_pinned('s')}) && !{kept('s')})"
    validation["expression"] = f"!({gate}) ||\nsize(variables.{variable}) == 0"
    # An image that is not a string makes this fail, and the API server then uses `message`.
    validation["messageExpression"] = (
        f"{cel_string(f'pinhook: {info.kind} {path}: ')} + variables.{variable}[0] +"
        f" {cel_string(' is not pinned to a digest (requireDigest)')}"
    )
    return {"name": variable, "expression": unpinned}, validation


def _variable_name(info: KindInfo, suffix: str) -> str:
    short = info.webhook_name.removesuffix(".pinhook.dev")
    return re.sub(r"[^A-Za-z0-9]", "_", short) + f"_{suffix}"

"""Tests for webhook.validatingpolicy: the ValidatingAdmissionPolicy behind requireDigest.

The policy's CEL is evaluated for real with cel-python against the realistic objects in
tests/data/objects, the way the API server evaluates a policy: matchConditions first, then the
variables, then each validation, with ``message`` standing in when a ``messageExpression``
fails. Each image field is unpinned in turn: exactly one validation must deny, naming the kind
and the field the locator reports. The end-to-end suite checks the same policy in a real API
server (tests/e2e/test_backstop.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import celpy
import pytest

from tests.test_webhookconfig import (
    ALL_PIN,
    PINNED_UNMATCHED,
    UNPINNED,
    all_objects,
    load,
    with_images,
)
from webhook.config import Settings, load_settings
from webhook.kinds import KINDS, KindInfo, Mode, kind_info
from webhook.locate import locate_images
from webhook.validatingpolicy import (
    DISARMED,
    armed,
    binding_object,
    build_validating_policy,
    policy_object,
)

Obj = dict[str, Any]
ENFORCE_ALL = Settings.model_validate(ALL_PIN.model_dump(by_alias=True) | {"requireDigest": True})
ENFORCE = load_settings("requireDigest: true")


@lru_cache(maxsize=1024)
def _program(expression: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(expression))


def _evaluate(expression: str, activation: Mapping[str, Any]) -> Any:
    return _program(expression).evaluate(dict(activation))


@dataclass(frozen=True)
class Answer:
    matched: bool  # the policy's matchConditions held
    denials: list[str]  # messages of the validations that failed


def review(
    policy: Obj,
    obj: Obj,
    *,
    old: Obj | None = None,
    namespace: str = "default",
    info: KindInfo | None = None,
) -> Answer:
    """What the API server makes of ``obj`` (UPDATE when ``old`` is given) under ``policy``."""
    info = info or _info(obj)
    assert _matches_rules(policy, info), f"{info.key} is not in the policy's rules"
    request = {
        "namespace": namespace,
        "operation": "CREATE" if old is None else "UPDATE",
        "resource": {"group": info.group, "version": "v1", "resource": info.resource},
    }
    activation: dict[str, Any] = {
        "object": celpy.json_to_cel(obj),
        "oldObject": celpy.json_to_cel(old),
        "request": celpy.json_to_cel(request),
    }
    spec = policy["spec"]
    for condition in spec.get("matchConditions", []):
        result = _evaluate(condition["expression"], activation)
        assert isinstance(result, celpy.celtypes.BoolType), (condition["name"], result)
        if not result:
            return Answer(False, [])
    activation["variables"] = _Variables(spec.get("variables", []), activation)
    denials = []
    for validation in spec["validations"]:
        gate = re.match(
            r"!\(request\.resource\.resource == '([a-z]+)'\) \|\|\n", validation["expression"]
        )
        assert gate is not None, validation["expression"]
        if gate.group(1) != info.resource:
            continue  # true at once: CEL's || does not look further (quicker in cel-python)
        result = _evaluate(validation["expression"], activation)
        # An error is a denial under failurePolicy Fail: the policy must never make one.
        assert isinstance(result, celpy.celtypes.BoolType), (validation["expression"], result)
        if not result:
            denials.append(_message(validation, activation))
    return Answer(True, denials)


class _Variables(celpy.celtypes.MapType):
    """``variables``, each evaluated when first read, as the API server does."""

    def __init__(self, declared: list[dict[str, str]], activation: dict[str, Any]) -> None:
        super().__init__()
        self._declared = {variable["name"]: variable["expression"] for variable in declared}
        self._activation = activation

    def __contains__(self, key: object) -> bool:
        return key in self._declared

    def __missing__(self, key: str) -> Any:
        value = _evaluate(self._declared[key], self._activation)
        assert isinstance(value, list), (key, value)
        self[celpy.celtypes.StringType(key)] = value
        return value


def _message(validation: Mapping[str, str], activation: Mapping[str, Any]) -> str:
    expression = validation.get("messageExpression")
    if expression is not None:
        try:
            message = _evaluate(expression, activation)
        except celpy.CELEvalError:
            message = None
        if isinstance(message, str):
            return str(message)
    return validation["message"]


def _matches_rules(policy: Obj, info: KindInfo) -> bool:
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    return any(
        info.group in rule["apiGroups"] and info.resource in rule["resources"] for rule in rules
    )


def _info(obj: Mapping[str, Any]) -> KindInfo:
    found = kind_info(obj["apiVersion"].rpartition("/")[0], obj["kind"])
    assert found is not None
    return found


def _field_path(pointer: str) -> str:
    """The locator's JSON pointer as the policy names the field: indexes become ``[*]``."""
    return re.sub(r"\.(\d+)(?=\.|$)", "[*]", pointer.strip("/").replace("/", "."))


def _pinned_everywhere(obj: Obj) -> tuple[Obj, list[str]]:
    info = _info(obj)
    located = locate_images(info.group, info.kind, obj)
    assert located is not None
    pointers = [field.pointer for field in located.fields]
    return with_images(obj, dict.fromkeys(pointers, PINNED_UNMATCHED)), pointers


def _only(info: KindInfo) -> Settings:
    """requireDigest, and only ``info`` pinned."""
    kinds = {other.key: "pin" if other is info else "off" for other in KINDS}
    return Settings.model_validate({"requireDigest": True, "kinds": kinds})


def _pod(*images: str, namespace: str = "default") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": namespace},
        "spec": {
            "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
        },
    }


# --- what is checked ------------------------------------------------------------------------


OBJECTS = all_objects()


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_pinned_objects_are_admitted_and_tags_denied(obj: Obj) -> None:
    policy = policy_object(ENFORCE_ALL)
    pinned, pointers = _pinned_everywhere(obj)
    assert pointers
    assert review(policy, pinned) == Answer(True, [])
    tagged = with_images(pinned, dict.fromkeys(pointers, UNPINNED))
    assert review(policy, tagged).denials


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_each_unpinned_field_is_denied_by_its_own_message(obj: Obj) -> None:
    # Only this kind pinned: a smaller policy, quicker to evaluate (the one with every kind is
    # checked against each object above).
    policy = policy_object(_only(_info(obj)))
    pinned, pointers = _pinned_everywhere(obj)
    kind = obj["kind"]
    for pointer in pointers:
        path = _field_path(pointer)
        for image in (UNPINNED, 7):
            [message] = review(policy, with_images(pinned, {pointer: image})).denials
            assert message.startswith(f"pinhook: {kind} {path}: "), (pointer, message)
            if isinstance(image, str) and "canary" not in path:
                # Where the field's values form one list, the message names the image too.
                assert f": {image} is not pinned to a digest" in message, message


@pytest.mark.parametrize(
    "image", [UNPINNED, PINNED_UNMATCHED[:-1], f"{PINNED_UNMATCHED}x", "", "x@sha256:1"]
)
def test_only_a_valid_digest_at_the_end_is_pinned(image: str) -> None:
    policy = policy_object(ENFORCE)
    assert review(policy, _pod(PINNED_UNMATCHED, image)).denials == [
        f"pinhook: Pod spec.containers[*].image: {image} is not pinned to a digest (requireDigest)"
    ]
    isvc = load("isvc-canary.yaml")
    pinned, pointers = _pinned_everywhere(isvc)
    canary = [pointer for pointer in pointers if "/canary/" in pointer]
    assert canary and len(review(policy, with_images(pinned, {canary[0]: image})).denials) == 1


def test_the_policy_checks_every_field_the_locator_knows() -> None:
    # Each field's validation appears once in the policy (the fixtures reach every field).
    messages = [v["message"] for v in policy_object(ENFORCE_ALL)["spec"]["validations"]]
    assert len(set(messages)) == len(messages)
    reached = set()
    for obj in OBJECTS:
        _, pointers = _pinned_everywhere(obj)
        reached |= {f"pinhook: {obj['kind']} {_field_path(p)}: " for p in pointers}
    for prefix in reached:
        assert any(message.startswith(prefix) for message in messages), prefix


@pytest.mark.parametrize(
    "spec",
    [
        "not a map",
        {"containers": "not a list"},
        {"containers": [7, "x", None, {"name": "no-image"}]},
        {"volumes": [{"name": "v", "rbd": {"image": "ceph-disk"}}, "x"]},
        {"volumes": [{"name": "v", "image": {"pullPolicy": "Always"}}]},
    ],
)
def test_malformed_objects_without_images_never_fail_the_policy(spec: Any) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}
    assert review(policy_object(ENFORCE_ALL), pod) == Answer(True, [])


@pytest.mark.parametrize(
    "spec",
    [
        {"predictor": "x", "canary": "x", "transformer": 7, "explainer": []},
        {"predictor": {"model": "x", "custom": "x", "workerSpec": "x", "containers": {}}},
        {"canary": [7, {"predictor": "x"}, {"predictor": {"model": 5}}]},
    ],
)
def test_malformed_inference_services_never_fail_the_policy(spec: Any) -> None:
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "i"},
        "spec": spec,
    }
    assert review(policy_object(ENFORCE_ALL), isvc) == Answer(True, [])


# --- UPDATE ------------------------------------------------------------------------------------


def test_update_lets_images_the_object_already_had_through() -> None:
    policy = policy_object(ENFORCE)
    old = _pod(UNPINNED, PINNED_UNMATCHED)
    # Stored unpinned before the policy: a label or a finalizer can still change.
    relabelled = old | {"metadata": {**old["metadata"], "labels": {"a": "b"}}}
    assert review(policy, relabelled, old=old).denials == []
    # A new unpinned image cannot come in, by a new container or in place of a pinned one.
    added = _pod(UNPINNED, PINNED_UNMATCHED, "nginx:1.27")
    assert review(policy, added, old=old).denials == [
        "pinhook: Pod spec.containers[*].image: nginx:1.27 is not pinned to a digest"
        " (requireDigest)"
    ]
    assert review(policy, _pod(UNPINNED, "nginx:1.27"), old=old).denials
    # Pinning the old one is always fine.
    assert review(policy, _pod(PINNED_UNMATCHED, PINNED_UNMATCHED), old=old).denials == []


def test_update_of_canaries_compares_with_the_old_object_too() -> None:
    policy = policy_object(ENFORCE)
    isvc = load("isvc-canary.yaml")
    info = _info(isvc)
    located = locate_images(info.group, info.kind, isvc)
    assert located is not None
    canary = next(field.pointer for field in located.fields if "/canary/" in field.pointer)
    pinned, _ = _pinned_everywhere(isvc)
    old = with_images(pinned, {canary: UNPINNED})
    assert review(policy, old, old=old).denials == []
    assert len(review(policy, with_images(pinned, {canary: "nginx:1"}), old=old).denials) == 1


# --- where -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "own", "enforced", "not_enforced"),
    [
        ("requireDigest: true", "pinhook-system",
         ["default", "team-a", ""], ["kube-system", "pinhook-system"]),
        ("{requireDigest: true, excludedNamespaces: [batch],"
         " namespaces: {legacy: {requireDigest: false}}}",
         "webhooks", ["default", ""],
         ["batch", "legacy", "webhooks", "kube-system", "pinhook-system"]),
        # Per namespace only: cluster-scoped objects fall under the global policy (off).
        ("namespaces: {payments: {requireDigest: true}, kube-system: {requireDigest: true}}",
         "pinhook-system", ["payments"], ["default", "", "kube-system", "pinhook-system"]),
    ],
)  # fmt: skip
def test_enforced_in_the_namespaces_where_require_digest_applies(
    config: str, own: str, enforced: list[str], not_enforced: list[str]
) -> None:
    settings = load_settings(config)
    policy = policy_object(settings, own_namespace=own)
    tagged = _pod(UNPINNED)
    for namespace in enforced:
        assert review(policy, tagged, namespace=namespace).denials, namespace
    for namespace in not_enforced:
        assert review(policy, tagged, namespace=namespace) == Answer(False, []), namespace


@pytest.mark.parametrize(
    ("config", "enforced", "not_enforced"),
    [
        # A namespace in audit, rewrite or off mode is never denied by pinhook: nor by the policy.
        ("{requireDigest: true, namespaces: {team-a: {mode: audit}, team-r: {mode: rewrite},"
         " team-o: {mode: 'off'}}}",
         ["default", "team-p"], ["team-a", "team-r", "team-o"]),
        # Audit everywhere but one namespace that pins under requireDigest: armed for that one.
        ("{mode: audit, namespaces: {payments: {mode: pin, requireDigest: true}}}",
         ["payments"], ["default", "team-a", ""]),
        # Pinned there, but requireDigest does not apply there.
        ("{mode: audit, requireDigest: true, namespaces: {shop: {mode: pin, requireDigest: false},"
         " payments: {mode: pin}}}",
         ["payments"], ["shop", "default"]),
    ],
)  # fmt: skip
def test_enforced_only_where_the_namespace_pins(
    config: str, enforced: list[str], not_enforced: list[str]
) -> None:
    policy = policy_object(load_settings(config))
    assert armed(policy)
    tagged = _pod(UNPINNED)
    for namespace in enforced:
        assert review(policy, tagged, namespace=namespace).denials, namespace
    for namespace in not_enforced:
        assert review(policy, tagged, namespace=namespace) == Answer(False, []), namespace


def test_kinds_pinned_in_different_namespaces_are_enforced_each_in_its_own() -> None:
    # Pods pin everywhere; the other kinds audit, except in `payments`, where everything pins.
    settings = load_settings(
        "{mode: audit, kinds: {pods: pin}, requireDigest: true,"
        " namespaces: {payments: {mode: pin}, lab: {mode: audit}}}"
    )
    policy = policy_object(settings)
    isvc, pointers = _pinned_everywhere(load("isvc-canary.yaml"))
    tagged_isvc = with_images(isvc, {pointers[0]: UNPINNED})
    assert review(policy, _pod(UNPINNED), namespace="default").denials
    assert review(policy, tagged_isvc, namespace="payments").denials
    assert review(policy, _pod(UNPINNED), namespace="payments").denials
    assert not review(policy, tagged_isvc, namespace="default").matched
    assert not review(policy, _pod(UNPINNED), namespace="lab").matched
    assert not review(policy, tagged_isvc, namespace="lab").matched
    assert review(policy, isvc, namespace="payments") == Answer(True, [])


def test_a_kind_enforced_nowhere_is_not_in_the_rules() -> None:
    # InferenceServices pin only where requireDigest does not apply.
    settings = load_settings(
        "{mode: audit, kinds: {pods: pin}, requireDigest: true,"
        " namespaces: {lab: {mode: pin, requireDigest: false}}}"
    )
    rules = policy_object(settings)["spec"]["matchConstraints"]["resourceRules"]
    assert [rule["resources"][0] for rule in rules] == ["pods"]


def test_cluster_scoped_kinds_fall_under_the_global_policy() -> None:
    storage = load("clusterstoragecontainer.yaml")
    assert "namespace" not in storage["metadata"]
    assert review(policy_object(ENFORCE), storage, namespace="").denials
    per_namespace = load_settings("namespaces: {payments: {requireDigest: true}}")
    assert not review(policy_object(per_namespace), storage, namespace="").matched


def test_skip_annotation_is_ignored_unless_honoured() -> None:
    annotated = _pod(UNPINNED)
    annotated["metadata"]["annotations"] = {"pinhook.dev/skip": "true"}
    assert review(policy_object(ENFORCE), annotated).denials
    honoured = load_settings("{requireDigest: true, skipAnnotation: honoured}")
    assert review(policy_object(honoured), annotated) == Answer(False, [])
    assert review(policy_object(honoured), _pod(UNPINNED)).denials


# --- shape ---------------------------------------------------------------------------------------


def test_rules_cover_the_pinned_kinds_and_ephemeral_containers() -> None:
    policy = policy_object(ENFORCE)
    assert policy["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert policy["spec"]["failurePolicy"] == "Fail"
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    pinned = [info for info in KINDS if ENFORCE.mode_for(info.key) is Mode.PIN]
    assert [(rule["apiGroups"], rule["resources"][0]) for rule in rules] == [
        ([info.group], info.resource) for info in pinned
    ]
    assert rules[0]["resources"] == ["pods", "pods/ephemeralcontainers"]
    for rule in rules:
        assert rule["operations"] == ["CREATE", "UPDATE"]
    assert all(v["reason"] == "Forbidden" for v in policy["spec"]["validations"])


def test_binding_denies_and_names_the_policy() -> None:
    policy, binding = build_validating_policy(ENFORCE, name="pinhook-e2e")
    assert binding == binding_object("pinhook-e2e")
    assert binding["spec"] == {"policyName": "pinhook-e2e", "validationActions": ["Deny"]}
    assert policy["metadata"] == {"name": "pinhook-e2e"}


@pytest.mark.parametrize(
    "config",
    ["", "namespaces: {pinhook-system: {requireDigest: true}}", "{requireDigest: true, kinds: "
     + "{" + ", ".join(f"{info.key}: 'off'" for info in KINDS) + "}}"],
)  # fmt: skip
def test_a_policy_that_enforces_nothing_is_disarmed(config: str) -> None:
    policy = policy_object(load_settings(config))
    assert not armed(policy)
    assert policy["spec"]["matchConditions"] == [{"name": DISARMED, "expression": "false"}]
    assert review(policy, _pod(UNPINNED)) == Answer(False, [])
    assert armed(policy_object(ENFORCE))


def test_the_policy_fits_in_a_client_side_apply() -> None:
    # kubectl apply (client-side) keeps the whole object in an annotation of at most 256 KiB;
    # this is every kind pinned, runtimes and workloads included.
    size = len(json.dumps(policy_object(ENFORCE_ALL), separators=(",", ":")))
    assert size < 224 * 1024, size


def test_the_kinds_resource_names_tell_them_apart() -> None:
    # Each validation is gated on request.resource.resource alone (the rules admit only the
    # kinds' groups), which holds while no two kinds share a resource name.
    resources = [info.resource for info in KINDS]
    assert len(set(resources)) == len(resources)

"""Tests for webhook.webhookconfig: the generated MutatingWebhookConfiguration.

The matchConditions are evaluated for real with cel-python (``celpy``, RE2 regexes through
google-re2) against the realistic objects in tests/data/objects, and compared with what pinhook
itself would do with each image (``plan.plan_image``): an object the conditions skip must be
one pinhook would leave unchanged.
"""

from __future__ import annotations

import argparse
import copy
import shlex
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import celpy
import jsonpointer
import pytest
import yaml

from webhook import install
from webhook.config import Settings, default_settings, load_settings
from webhook.errors import ConfigError
from webhook.kinds import KIND_KEYS, KINDS, KindInfo, Mode, kind_info
from webhook.locate import locate_images
from webhook.oci.reference import ImageRef
from webhook.plan import Action, plan_image
from webhook.webhookconfig import (
    MAX_MATCH_CONDITIONS,
    MAX_RULE_REGEX_LENGTH,
    WebhookTarget,
    build_webhook_configuration,
    match_conditions_for,
    rule_pattern,
)

ROOT = Path(__file__).resolve().parent.parent
OBJECTS = Path(__file__).parent / "data" / "objects"
DIGEST = "sha256:" + "a" * 64
PINNED_UNMATCHED = f"registry.example.com/team/app:1.0@{DIGEST}"
UNPINNED = "registry.example.com/team/app:1.0"
# The built-in rule moves it, digest or not.
MATCHED_PINNED = f"gcr.io/kubebuilder/kube-rbac-proxy:v0.13.1@{DIGEST}"

ALL_PIN = Settings.model_validate(
    {"kinds": {key: "pin" for key in KIND_KEYS if key != "replicasets.apps"}}
)
GENERATED = (
    "manifests/base/mutatingwebhookconfiguration.yaml",
    "manifests/components/enforce/webhook-fail.yaml",
    "manifests/components/enforce/validating-policy.yaml",
    "manifests/components/workloads/webhook-workloads.yaml",
)

Obj = dict[str, Any]


# --- evaluating CEL -----------------------------------------------------------------------


@lru_cache(maxsize=256)
def _program(expression: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(expression))


def _value(expression: str, obj: Obj, namespace: str = "default") -> bool:
    activation = {"object": obj, "request": {"namespace": namespace}}
    result = _program(expression).evaluate(
        {key: celpy.json_to_cel(value) for key, value in activation.items()}
    )
    # An error would skip pinhook (failurePolicy Ignore) or reject the request (Fail).
    assert isinstance(result, celpy.celtypes.BoolType), f"not a bool: {result!r}"
    return bool(result)


def sends(conditions: list[dict[str, str]], obj: Obj, namespace: str = "default") -> bool:
    """Whether the API server would call the webhook: every condition true, none an error."""
    values = [_value(condition["expression"], obj, namespace) for condition in conditions]
    return all(values)


def conditions_for(settings: Settings, obj: Mapping[str, Any]) -> list[dict[str, str]]:
    return match_conditions_for(settings, _info(obj))


def _info(obj: Mapping[str, Any]) -> KindInfo:
    info = kind_info(obj["apiVersion"].rpartition("/")[0], obj["kind"])
    assert info is not None
    return info


def load(name: str) -> Obj:
    loaded = yaml.safe_load((OBJECTS / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def with_images(obj: Obj, images: Mapping[str, Any]) -> Obj:
    changed = copy.deepcopy(obj)
    for pointer, image in images.items():
        jsonpointer.set_pointer(changed, pointer, image)
    return changed


def pinhook_would_act(settings: Settings, obj: Obj) -> bool:
    """pinhook's own decision: some image is not left as it is (CREATE, no skip registries)."""
    info = _info(obj)
    located = locate_images(info.group, info.kind, obj)
    assert located is not None
    mode = settings.mode_for(info.key)
    for field in located.fields:
        plan = plan_image(
            field, ImageRef.parse(field.image), settings.rewrite_map, frozenset(), mode
        )
        if plan.action is not Action.KEEP:
            return True
    return False


OBJECT_FILES = sorted(path.name for path in OBJECTS.glob("*.yaml"))


def _workload_variants() -> list[Obj]:
    # StatefulSet, DaemonSet and Job keep their pod template where a Deployment does.
    deployment = load("deployment.yaml")
    variants = []
    for api_version, kind in (
        ("apps/v1", "StatefulSet"),
        ("apps/v1", "DaemonSet"),
        ("batch/v1", "Job"),
    ):
        variants.append(deployment | {"apiVersion": api_version, "kind": kind})
    return variants


def all_objects() -> list[Obj]:
    return [load(name) for name in OBJECT_FILES] + _workload_variants()


def test_fixtures_cover_every_kind_but_replicasets() -> None:
    covered = {_info(obj).key for obj in all_objects()}
    assert covered == KIND_KEYS - {"replicasets.apps"}


# --- matchConditions against realistic objects -----------------------------------------


@pytest.mark.parametrize("obj", all_objects(), ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_conditions_agree_with_pinhook_on_the_fixture(obj: Obj) -> None:
    conditions = conditions_for(ALL_PIN, obj)
    assert sends(conditions, obj) == pinhook_would_act(ALL_PIN, obj)


@pytest.mark.parametrize("obj", all_objects(), ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_every_image_path_is_seen(obj: Obj) -> None:
    """All pinned and unmatched: skipped. Any one image unpinned or matched: sent."""
    info = _info(obj)
    located = locate_images(info.group, info.kind, obj)
    assert located is not None
    conditions = conditions_for(ALL_PIN, obj)
    pinned = with_images(obj, {field.pointer: PINNED_UNMATCHED for field in located.fields})
    assert not sends(conditions, pinned)
    for field in located.fields:
        for image in (UNPINNED, MATCHED_PINNED, f"{PINNED_UNMATCHED[:-1]}", 7):
            assert sends(conditions, with_images(pinned, {field.pointer: image})), (
                f"{field.pointer} = {image!r} not sent"
            )


def test_fixtures_exercise_the_inference_service_paths() -> None:
    # The canary, worker, legacy and multi-framework fixtures exist to reach those paths.
    pointers = set()
    for name in OBJECT_FILES:
        if name.startswith("isvc"):
            located = locate_images("serving.kserve.io", "InferenceService", load(name))
            assert located is not None
            pointers |= {field.pointer for field in located.fields}
    for fragment in ("/canary/", "/workerSpec/", "/custom/container/", "/explainer/", "/volumes/"):
        assert any(fragment in pointer for pointer in pointers), fragment


def test_skip_annotation_skips_only_when_true() -> None:
    pod = with_images(load("pod-kserve-predictor.yaml"), {"/spec/containers/0/image": UNPINNED})
    conditions = conditions_for(ALL_PIN, pod)
    assert sends(conditions, pod)
    skipped = copy.deepcopy(pod)
    skipped["metadata"].setdefault("annotations", {})["pinhook.dev/skip"] = "true"
    assert not sends(conditions, skipped)
    skipped["metadata"]["annotations"]["pinhook.dev/skip"] = "false"
    assert sends(conditions, skipped)
    del skipped["metadata"]["annotations"]
    assert sends(conditions, skipped)


def _annotated(obj: Obj, value: str = "true") -> Obj:
    annotated = copy.deepcopy(obj)
    annotated["metadata"].setdefault("annotations", {})["pinhook.dev/skip"] = value
    return annotated


@pytest.mark.parametrize(
    "config",
    [
        "requireDigest: true",
        "skipAnnotation: ignored",
        "{requireDigest: true, namespaces: {legacy: {requireDigest: false}},"
        " skipAnnotation: ignored}",
    ],
)
def test_no_skip_condition_where_the_annotation_is_ignored_everywhere(config: str) -> None:
    settings = load_settings(config)
    pod = with_images(load("pod-kserve-predictor.yaml"), {"/spec/containers/0/image": UNPINNED})
    conditions = conditions_for(settings, pod)
    assert "not-skipped" not in [condition["name"] for condition in conditions]
    for namespace in ("default", "legacy", ""):
        assert sends(conditions, _annotated(pod), namespace)


def test_skip_condition_when_honoured_under_require_digest() -> None:
    settings = load_settings("{requireDigest: true, skipAnnotation: honoured}")
    pod = with_images(load("pod-kserve-predictor.yaml"), {"/spec/containers/0/image": UNPINNED})
    conditions = conditions_for(settings, pod)
    assert conditions[0]["name"] == "not-skipped"
    assert not sends(conditions, _annotated(pod))


@pytest.mark.parametrize(
    ("config", "honoured", "ignored"),
    [
        # requireDigest in some namespaces only: the annotation is ignored there alone.
        ("namespaces: {payments: {requireDigest: true}, ml: {onFailure: deny}}",
         ["default", "ml", ""], ["payments"]),
        # requireDigest everywhere but some namespaces (and cluster-scoped objects with it).
        ("{requireDigest: true, namespaces: {legacy: {requireDigest: false}}}",
         ["legacy"], ["default", "payments", ""]),
    ],
)  # fmt: skip
def test_skip_condition_follows_the_policy_of_each_namespace(
    config: str, honoured: list[str], ignored: list[str]
) -> None:
    settings = load_settings(config)
    pod = with_images(load("pod-kserve-predictor.yaml"), {"/spec/containers/0/image": UNPINNED})
    conditions = conditions_for(settings, pod)
    assert conditions[0]["name"] == "not-skipped"
    for namespace in honoured:
        assert settings.skip_honoured(settings.policy_for(namespace or None))
        assert not sends(conditions, _annotated(pod), namespace), namespace
        assert sends(conditions, _annotated(pod, "false"), namespace), namespace
    for namespace in ignored:
        assert not settings.skip_honoured(settings.policy_for(namespace or None))
        assert sends(conditions, _annotated(pod), namespace), namespace


def _pod(spec: Any) -> Obj:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("not a map", False),
        ({"containers": "not a list"}, False),
        ({"containers": [7, "x", None]}, False),
        ({"containers": [{"name": "no-image"}]}, False),
        ({"containers": [{"image": 7}]}, True),  # sent: pinhook warns about it
        ({"containers": [{"image": ["nginx"]}]}, True),
        ({"volumes": "x"}, False),
        ({"volumes": [{"name": "v", "rbd": {"image": "ceph-disk"}}]}, False),
        ({"volumes": [{"name": "v", "image": "nginx"}]}, True),
        ({"volumes": [{"name": "v", "image": {"reference": 7}}]}, True),
        ({"volumes": [{"name": "v", "image": {"pullPolicy": "Always"}}]}, False),
        ({"volumes": [{"name": "v", "image": {"reference": "nginx:1"}}]}, True),
        ({"ephemeralContainers": [{"image": "busybox"}]}, True),
    ],
)
def test_malformed_pods_never_make_the_conditions_fail(spec: Any, expected: bool) -> None:
    conditions = match_conditions_for(ALL_PIN, KINDS[0])
    assert sends(conditions, _pod(spec)) is expected


@pytest.mark.parametrize(
    "spec",
    [
        "x",
        {"predictor": "x", "canary": "x", "transformer": 7, "explainer": []},
        {"predictor": {"model": "x", "custom": "x", "workerSpec": "x", "containers": {}}},
        {"canary": [7, {"predictor": "x"}, {"predictor": {"model": 5}}]},
        {"canary": [{"predictor": {"custom": {"container": "x"}}}]},
    ],
)
def test_malformed_inference_services_never_make_the_conditions_fail(spec: Any) -> None:
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "i"},
        "spec": spec,
    }
    assert not sends(conditions_for(ALL_PIN, isvc), isvc)


def test_rewrite_mode_sends_only_what_a_rule_matches() -> None:
    runtime = load("servingruntime-multinode.yaml")
    settings = default_settings()
    assert settings.mode_for(_info(runtime).key) is Mode.REWRITE
    conditions = conditions_for(settings, runtime)
    assert conditions[-1]["name"] == "has-image-to-rewrite"
    located = locate_images("serving.kserve.io", "ServingRuntime", runtime)
    assert located is not None
    unpinned = with_images(runtime, {field.pointer: UNPINNED for field in located.fields})
    assert not sends(conditions, unpinned)
    first = located.fields[0].pointer
    assert sends(
        conditions, with_images(unpinned, {first: "gcr.io/kubebuilder/kube-rbac-proxy:v0.8.0"})
    )


# --- rule spellings -------------------------------------------------------------------------

RULES = """
rewrites:
  - {from: nginx, to: mirror.example.com/nginx}
  - {from: "busybox:1.36", to: "mirror.example.com/busybox:1.36"}
  - {from: docker.io/kserve/, to: registry.example.com/kserve}
  - {from: gcr.io, to: mirror.example.com/gcr}
  - {from: docker.io/my.org/tool, to: mirror.example.com/tool}
  - {from: "localhost:5000/team", to: mirror.example.com/team}
  - {from: "[::1]:5000/x", to: mirror.example.com/x}
"""
HUB_NAMESPACE_RULE = "rewrites: [{from: docker.io/library/, to: mirror.example.com/library}]"
HUB_RULE = "rewrites: [{from: docker.io, to: mirror.example.com/hub}]"

HOSTS = ("", "docker.io/", "index.docker.io/", "gcr.io/", "localhost:5000/", "[::1]:5000/")
PATHS = (
    "nginx", "library/nginx", "nginx/sub", "nginxx", "kserve/sklearnserver", "kserve",
    "library/kserve", "my.org/tool", "my.org/tool/x", "team/app", "teams/app", "x", "x/y",
    "busybox", "library/busybox", "library/a/b",
)  # fmt: skip
SUFFIXES = ("", ":1.36", ":1.25", f"@{DIGEST}", f":1.36@{DIGEST}")


def _corpus() -> list[str]:
    images = []
    for host in HOSTS:
        for path in PATHS:
            for suffix in SUFFIXES:
                text = host + path + suffix
                try:
                    ImageRef.parse(text)
                except ValueError:
                    continue
                images.append(text)
    return images


def _regex_matches(settings: Settings, image: str) -> bool:
    regex = rule_pattern(rule.source for rule in settings.rewrite_map.rules)
    assert regex is not None
    return _value("object.image.matches(object.regex)", {"image": image, "regex": regex})


@pytest.mark.parametrize("config", [RULES, HUB_NAMESPACE_RULE, HUB_RULE])
def test_every_spelling_a_rule_matches_is_matched_in_cel(config: str) -> None:
    settings = load_settings(config)
    corpus = _corpus()
    assert len(corpus) > 300
    missed = [
        image
        for image in corpus
        if settings.rewrite_map.find(ImageRef.parse(image)) is not None
        and not _regex_matches(settings, image)
    ]
    assert missed == []


@pytest.mark.parametrize(
    "image",
    [
        "nginxx:1",
        "quay.io/nginx:1",
        "docker.io/nginx/sub:1",
        "nginx/sub",
        "gcr.io.evil.com/x:1",
        "my.org/tool:1",  # the registry my.org, not Docker Hub
        "localhost:5001/team/a",
        "localhost:5000/teams/a",
        "quay.io/kserve/x",
        "busybox2:1.36",
        "[::1]:5000/xy",
    ],
)
def test_spellings_no_rule_matches_are_not_matched(image: str) -> None:
    settings = load_settings(RULES)
    assert settings.rewrite_map.find(ImageRef.parse(image)) is None
    assert not _regex_matches(settings, image)


@pytest.mark.parametrize(
    "image",
    ["nginx", "docker.io/nginx:1", "index.docker.io/library/nginx@" + DIGEST, "library/nginx/x",
     "kserve/sklearnserver:v0.14", "docker.io/kserve/x", "gcr.io/a/b:1", "docker.io/my.org/tool",
     "localhost:5000/team/app", "[::1]:5000/x:1", "busybox:1.36"],
)  # fmt: skip
def test_rule_spellings_are_matched(image: str) -> None:
    assert _regex_matches(load_settings(RULES), image)


def test_escaped_rules_survive_the_cel_string_literal() -> None:
    # The IPv6 rule's brackets are escaped for RE2, and the backslashes again for CEL.
    conditions = match_conditions_for(load_settings(RULES), KINDS[0])
    assert "\\\\[" in conditions[-1]["expression"]
    assert sends(conditions, _pod({"containers": [{"image": f"[::1]:5000/x:1@{DIGEST}"}]}))
    assert not sends(conditions, _pod({"containers": [{"image": f"[::1]:5000/xy:1@{DIGEST}"}]}))
    assert sends(conditions, _pod({"containers": [{"image": f"docker.io/nginx@{DIGEST}"}]}))


def test_no_rules_means_only_unpinned_images_are_sent() -> None:
    settings = load_settings("builtinRewrites: false")
    pod = _pod({"containers": [{"image": MATCHED_PINNED}]})
    conditions = match_conditions_for(settings, KINDS[0])
    assert not sends(conditions, pod)
    assert sends(
        conditions, _pod({"containers": [{"image": "gcr.io/kubebuilder/kube-rbac-proxy"}]})
    )


def test_too_many_rules_send_every_object() -> None:
    rules = [{"from": f"registry{i}.example.com/team/app", "to": "quay.io/x"} for i in range(200)]
    settings = Settings.model_validate({"rewrites": rules})
    regex = rule_pattern(rule.source for rule in settings.rewrite_map.rules)
    assert regex is not None and len(regex) > MAX_RULE_REGEX_LENGTH
    conditions = match_conditions_for(settings, KINDS[0])
    assert [c["name"] for c in conditions] == ["not-skipped"]
    assert sends(conditions, _pod({"containers": [{"image": PINNED_UNMATCHED}]}))


# --- the configuration's structure ---------------------------------------------------------


def _webhooks(config: Obj) -> dict[str, Obj]:
    return {webhook["name"]: webhook for webhook in config["webhooks"]}


def test_default_configuration_has_one_webhook_per_active_kind() -> None:
    config = build_webhook_configuration(default_settings(), WebhookTarget())
    assert config["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert config["kind"] == "MutatingWebhookConfiguration"
    assert config["metadata"] == {"name": "pinhook"}
    assert list(_webhooks(config)) == [
        "pods.pinhook.dev",
        "inferenceservices.kserve.pinhook.dev",
        "servingruntimes.kserve.pinhook.dev",
        "clusterservingruntimes.kserve.pinhook.dev",
        "clusterstoragecontainers.kserve.pinhook.dev",
        "llminferenceservices.kserve.pinhook.dev",
        "llminferenceserviceconfigs.kserve.pinhook.dev",
        "services.knative.pinhook.dev",
        "configurations.knative.pinhook.dev",
    ]
    for webhook in config["webhooks"]:
        assert webhook["sideEffects"] == "None"
        assert webhook["admissionReviewVersions"] == ["v1", "v1beta1"]
        assert webhook["timeoutSeconds"] == 10
        assert webhook["reinvocationPolicy"] == "IfNeeded"
        assert webhook["matchPolicy"] == "Equivalent"
        assert webhook["failurePolicy"] == "Ignore"
        assert webhook["clientConfig"] == {
            "service": {
                "namespace": "pinhook-system",
                "name": "pinhook",
                "port": 443,
                "path": "/mutate",
            }
        }
        assert 1 < len(webhook["matchConditions"]) <= MAX_MATCH_CONDITIONS


def test_webhook_names_are_unique_for_every_kind() -> None:
    names = [info.webhook_name for info in KINDS]
    assert len(set(names)) == len(names)
    assert KINDS[0].webhook_name == "pods.pinhook.dev"


def test_rules_per_kind() -> None:
    config = build_webhook_configuration(ALL_PIN, WebhookTarget())
    hooks = _webhooks(config)
    pods = hooks["pods.pinhook.dev"]["rules"]
    assert [(r["resources"], r["operations"]) for r in pods] == [
        (["pods"], ["CREATE", "UPDATE"]),
        (["pods/ephemeralcontainers"], ["UPDATE"]),
    ]
    assert pods[0]["apiGroups"] == [""] and pods[0]["apiVersions"] == ["v1"]
    (isvc,) = hooks["inferenceservices.kserve.pinhook.dev"]["rules"]
    assert isvc == {
        "apiGroups": ["serving.kserve.io"],
        "apiVersions": ["*"],
        "operations": ["CREATE", "UPDATE"],
        "resources": ["inferenceservices"],
        "scope": "*",
    }
    (ksvc,) = hooks["services.knative.pinhook.dev"]["rules"]
    assert ksvc["apiGroups"] == ["serving.knative.dev"] and ksvc["scope"] == "Namespaced"
    (jobs,) = hooks["jobs.batch.pinhook.dev"]["rules"]
    assert jobs["operations"] == ["CREATE"]  # a Job's pod template is immutable
    (cronjobs,) = hooks["cronjobs.batch.pinhook.dev"]["rules"]
    assert cronjobs["operations"] == ["CREATE", "UPDATE"]
    assert "replicasets.apps.pinhook.dev" not in hooks
    resources = {
        res for hook in config["webhooks"] for r in hook["rules"] for res in r["resources"]
    }
    assert "replicasets" not in resources


def test_off_kinds_get_no_webhook() -> None:
    settings = load_settings("kinds: {pods: 'off', services.serving.knative.dev: 'off'}")
    names = set(_webhooks(build_webhook_configuration(settings, WebhookTarget())))
    assert "pods.pinhook.dev" not in names
    assert "services.knative.pinhook.dev" not in names
    assert "configurations.knative.pinhook.dev" in names


def test_namespace_selector_excludes_system_configured_and_target_namespaces() -> None:
    settings = load_settings("excludedNamespaces: [batch-jobs, kube-system]")
    target = WebhookTarget(service=("webhooks", "pinhook", 443, "/mutate"))
    config = build_webhook_configuration(settings, target)
    for webhook in config["webhooks"]:
        # By name only: no label a namespace's owner can set opts it out.
        assert webhook["namespaceSelector"] == {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "NotIn",
                    "values": ["kube-system", "pinhook-system", "batch-jobs", "webhooks"],
                },
            ]
        }


def test_url_target_with_ca_bundle_and_fail_policy() -> None:
    target = WebhookTarget(url="https://172.18.0.1:8443/mutate", service=None, ca_bundle="Q0E=")
    config = build_webhook_configuration(
        default_settings(), target, name="pinhook-dev", failure_policy="Fail"
    )
    assert config["metadata"]["name"] == "pinhook-dev"
    for webhook in config["webhooks"]:
        assert webhook["clientConfig"] == {
            "url": "https://172.18.0.1:8443/mutate",
            "caBundle": "Q0E=",
        }
        assert webhook["failurePolicy"] == "Fail"


def test_a_target_needs_a_url_or_a_service() -> None:
    with pytest.raises(ConfigError, match="URL or a Service"):
        build_webhook_configuration(default_settings(), WebhookTarget(service=None))


def test_unknown_failure_policy_is_refused() -> None:
    with pytest.raises(ConfigError, match="failurePolicy"):
        build_webhook_configuration(default_settings(), WebhookTarget(), failure_policy="ignore")


def test_kinds_select_the_webhooks_of_a_patch() -> None:
    settings = load_settings("kinds: {deployments.apps: pin, jobs.batch: pin}")
    config = build_webhook_configuration(
        settings, WebhookTarget(), kinds=["jobs.batch", "deployments.apps"]
    )
    assert list(_webhooks(config)) == ["deployments.apps.pinhook.dev", "jobs.batch.pinhook.dev"]
    with pytest.raises(ConfigError, match=r"statefulsets\.apps: off"):
        build_webhook_configuration(settings, WebhookTarget(), kinds=["statefulsets.apps"])


def test_without_match_conditions_only_the_conditions_differ() -> None:
    with_conditions = build_webhook_configuration(ALL_PIN, WebhookTarget())
    without = build_webhook_configuration(ALL_PIN, WebhookTarget(), match_conditions=False)
    for hook in without["webhooks"]:
        assert "matchConditions" not in hook
    for hook in with_conditions["webhooks"]:
        del hook["matchConditions"]
    assert without == with_conditions


# --- ReplicaSets ----------------------------------------------------------------------------

REPLICASETS_ON = "kinds: {replicasets.apps: pin}"


def _replica_set(owned: bool) -> Obj:
    metadata: Obj = {"name": "web-5d4f8", "namespace": "shop"}
    if owned:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": "web",
                "uid": "1",
                "controller": True,
            }
        ]
    template = {"spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": metadata,
        "spec": {"template": template},
    }


def test_replicasets_owned_by_a_deployment_never_reach_pinhook() -> None:
    settings = load_settings(REPLICASETS_ON)
    config = build_webhook_configuration(settings, WebhookTarget())
    assert "WARNING" in config["metadata"]["annotations"]["pinhook.dev/replicasets"]
    hook = _webhooks(config)["replicasets.apps.pinhook.dev"]
    assert [c["name"] for c in hook["matchConditions"]] == [
        "not-skipped",
        "not-owned",
        "has-image-to-pin",
    ]
    assert not sends(hook["matchConditions"], _replica_set(owned=True))
    assert sends(hook["matchConditions"], _replica_set(owned=False))


def test_replicasets_need_match_conditions() -> None:
    with pytest.raises(ConfigError, match="replicasets"):
        build_webhook_configuration(
            load_settings(REPLICASETS_ON), WebhookTarget(), match_conditions=False
        )


# --- the checked-in manifests ----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pinhook")
    install.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.parametrize("path", GENERATED)
def test_checked_in_configuration_is_the_generators_output(
    path: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (ROOT / path).read_text()
    first = text.splitlines()[0]
    assert first.startswith(
        ("# Generated by: pinhook webhook-config ", "# Generated by: pinhook validating-policy ")
    )
    argv = shlex.split(first.removeprefix("# Generated by: "))[1:]
    monkeypatch.chdir(ROOT)  # --config paths in the header are relative to the repository
    assert install.run(_parser().parse_args(argv)) == 0
    regenerate = f"{shlex.join(['pinhook', *argv])} > {path}"
    assert capsys.readouterr().out == text, f"{path} is stale: run `{regenerate}`"


def test_audit_kinds_are_sent_what_pin_kinds_are() -> None:
    pod = _pod({"containers": [{"image": UNPINNED}]})
    audit = match_conditions_for(load_settings("kinds: {pods: audit}"), KINDS[0])
    pinned = match_conditions_for(load_settings("kinds: {pods: pin}"), KINDS[0])
    assert audit == pinned
    assert sends(audit, pod)


def test_a_namespace_mode_keeps_the_webhook_of_a_kind_off_elsewhere() -> None:
    def names(config: str) -> set[str]:
        return set(_webhooks(build_webhook_configuration(load_settings(config), WebhookTarget())))

    assert "pods.pinhook.dev" not in names("mode: 'off'\n")
    audited_in_team = names("mode: 'off'\nnamespaces: {team: {mode: audit}}\n")
    assert "pods.pinhook.dev" in audited_in_team
    assert "deployments.apps.pinhook.dev" not in audited_in_team  # off by default, everywhere

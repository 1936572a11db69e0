"""Render the base with every combination of the components under manifests/, with the real
``kubectl kustomize``, and check the properties pinhook relies on in each result."""

from __future__ import annotations

import copy
import ipaddress
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from tests.test_validatingpolicy import review
from webhook.certs import service_dns_names
from webhook.conditionsync import conditions_patch
from webhook.config import OnFailure, Settings, load_settings_files
from webhook.kinds import Mode
from webhook.oci.hostguard import is_forbidden_address
from webhook.policysync import covers
from webhook.validatingpolicy import armed, policy_object
from webhook.webhookconfig import WebhookTarget, build_webhook_configuration

KUBECTL = shutil.which("kubectl")

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
COMPONENTS = ("enforce", "cert-manager", "workloads", "monitoring", "network-policy", "redis")
# Every combination of the components, each in the order of COMPONENTS.
BUILDS = [
    combination
    for size in range(len(COMPONENTS) + 1)
    for combination in itertools.combinations(COMPONENTS, size)
]
# The same components listed in the other order must give the same objects.
REORDERED = [tuple(reversed(build)) for build in BUILDS if len(build) > 1]
NAMESPACE = "pinhook-system"
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}
BASE_RULES = {
    ("", "pods", ("CREATE", "UPDATE")),
    ("", "pods/ephemeralcontainers", ("UPDATE",)),
    *(
        ("serving.kserve.io", resource, ("CREATE", "UPDATE"))
        for resource in (
            "inferenceservices",
            "servingruntimes",
            "clusterservingruntimes",
            "clusterstoragecontainers",
            "llminferenceservices",
            "llminferenceserviceconfigs",
        )
    ),
    ("serving.knative.dev", "services", ("CREATE", "UPDATE")),
    ("serving.knative.dev", "configurations", ("CREATE", "UPDATE")),
}
WORKLOAD_RULES = {
    ("apps", "deployments", ("CREATE", "UPDATE")),
    ("apps", "statefulsets", ("CREATE", "UPDATE")),
    ("apps", "daemonsets", ("CREATE", "UPDATE")),
    ("batch", "cronjobs", ("CREATE", "UPDATE")),
    ("batch", "jobs", ("CREATE",)),
}
WORKLOAD_KINDS = ("deployments.apps", "statefulsets.apps", "daemonsets.apps", "jobs.batch")
DEFAULT_RULE = ("gcr.io/kubebuilder/kube-rbac-proxy", "quay.io/brancz/kube-rbac-proxy")

Doc = dict[str, Any]
Build = tuple[str, ...]


def _name(build: Build) -> str:
    return "+".join(build) or "base"


def _kustomize(kustomization: Doc, files: Mapping[str, str] | None = None) -> list[Doc]:
    """``kubectl kustomize`` of a kustomization written to a fresh directory next to the
    manifests (kustomize refuses absolute paths to other kustomizations)."""
    if KUBECTL is None:
        pytest.skip("kubectl not on PATH: cannot render the kustomizations (kubectl kustomize)")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        relative = Path(os.path.relpath(MANIFESTS, root))
        document = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [str(relative / "base")],
            **kustomization,
        }
        document["components"] = [
            str(relative / "components" / name) for name in document.get("components", [])
        ]
        (root / "kustomization.yaml").write_text(yaml.safe_dump(document))
        for name, text in (files or {}).items():
            (root / name).write_text(text)
        result = subprocess.run(
            [KUBECTL, "kustomize", str(root)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _render(build: Build) -> list[Doc]:
    return _kustomize({"components": list(build)})


@pytest.fixture(scope="module")
def rendered() -> dict[Build, list[Doc]]:
    builds = [*BUILDS, *REORDERED]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(builds, pool.map(_render, builds), strict=True))


def _all(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [doc for doc in _all(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _webhooks(docs: list[Doc]) -> list[Doc]:
    config = _one(docs, "MutatingWebhookConfiguration", "pinhook")
    webhooks: list[Doc] = config["webhooks"]
    assert webhooks
    names = [hook["name"] for hook in webhooks]
    assert len(set(names)) == len(names)
    assert all(name.endswith(".pinhook.dev") for name in names)
    return webhooks


def _rule_set(webhooks: list[Doc]) -> set[tuple[str, str, tuple[str, ...]]]:
    return {
        (group, resource, tuple(rule["operations"]))
        for webhook in webhooks
        for rule in webhook["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def _container(docs: list[Doc]) -> Doc:
    pod = _one(docs, "Deployment", "pinhook")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["pinhook"]
    container: Doc = pod["containers"][0]
    return container


def _selects(selector: Doc, labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics, enough for matchLabels and matchExpressions."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, operator, values = expr["key"], expr["operator"], expr.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def _settings(docs: list[Doc]) -> Settings:
    """What pinhook serves: every *.yaml key of the ConfigMap, merged."""
    data = _one(docs, "ConfigMap", "pinhook-config")["data"]
    with tempfile.TemporaryDirectory() as directory:
        for key, text in data.items():
            (Path(directory) / key).write_text(text)
        return load_settings_files([Path(directory)])


def _failure_policy(build: Build) -> str:
    return "Fail" if "enforce" in build else "Ignore"


def _normalised(docs: list[Doc]) -> list[Doc]:
    """The objects in a stable order, webhooks, volumes and mounts by name: the order kustomize
    leaves them in depends on the order of the components, and means nothing to the API
    server (they are lists keyed by name)."""
    result = []
    for doc in sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"])):
        if doc["kind"] == "MutatingWebhookConfiguration":
            doc = doc | {"webhooks": _by_name(doc["webhooks"])}
        if doc["kind"] == "Deployment":
            doc = copy.deepcopy(doc)
            pod = doc["spec"]["template"]["spec"]
            pod["volumes"] = _by_name(pod.get("volumes", []))
            for container in pod["containers"]:
                container["volumeMounts"] = _by_name(container.get("volumeMounts", []))
        result.append(doc)
    return result


def _by_name(items: list[Doc]) -> list[Doc]:
    return sorted(items, key=lambda item: str(item["name"]))


def test_every_component_is_tested() -> None:
    found = {p.name for p in (MANIFESTS / "components").iterdir() if p.is_dir()}
    assert found == set(COMPONENTS)
    assert not (MANIFESTS / "overlays").exists()
    for name in COMPONENTS:
        kustomization = yaml.safe_load(
            (MANIFESTS / "components" / name / "kustomization.yaml").read_text()
        )
        assert kustomization["kind"] == "Component"
        assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"


@pytest.mark.parametrize("build", REORDERED, ids=_name)
def test_the_order_of_the_components_does_not_matter(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    assert _normalised(rendered[build]) == _normalised(rendered[tuple(reversed(build))])


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_namespaced_objects_live_in_pinhook_system(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    docs = rendered[build]
    _one(docs, "Namespace", NAMESPACE)
    for doc in docs:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, f"{doc['kind']} is cluster-scoped"
        else:
            assert namespace == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pinhook"


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_webhook_settings(rendered: dict[Build, list[Doc]], build: Build) -> None:
    for webhook in _webhooks(rendered[build]):
        assert webhook["sideEffects"] == "None"
        assert webhook["failurePolicy"] == _failure_policy(build)
        assert webhook["admissionReviewVersions"] == ["v1", "v1beta1"]
        assert webhook["timeoutSeconds"] == 10
        assert webhook["reinvocationPolicy"] == "IfNeeded"
        assert webhook["matchPolicy"] == "Equivalent"
        assert webhook["clientConfig"]["service"] == {
            "name": "pinhook",
            "namespace": NAMESPACE,
            "path": "/mutate",
            "port": 443,
        }


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_webhooks_are_generated_from_the_builds_own_config(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    # The ConfigMap and the webhook configuration of one build must agree: the rules and
    # matchConditions are computed from the kinds, rewrite rules and policy in the config.
    settings = _settings(rendered[build])
    webhooks = _webhooks(rendered[build])
    expected = build_webhook_configuration(
        settings, WebhookTarget(), failure_policy=_failure_policy(build)
    )["webhooks"]
    # One difference is allowed, and a self-managed pinhook removes it at start: the workloads
    # component's webhooks are generated where the skip annotation is honoured, so under
    # enforce they keep a `not-skipped` filter. The backstop policy denies what it lets by.
    ops = conditions_patch(webhooks, settings)
    stale = {webhooks[int(op["path"].split("/")[2])]["name"] for op in ops if op["op"] == "test"}
    if "enforce" in build and "workloads" in build:
        assert stale == {
            f"{kind.split('.')[0]}.{kind.split('.')[1]}.pinhook.dev"
            for kind in (*WORKLOAD_KINDS, "cronjobs.batch")
        }
    else:
        assert stale == set()
    synced = jsonpatch.apply_patch({"webhooks": webhooks}, ops)["webhooks"]
    assert sorted(synced, key=lambda w: w["name"]) == sorted(expected, key=lambda w: w["name"])


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_skip_annotation_opts_nothing_out_of_pods_under_enforce(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    pods = next(hook for hook in _webhooks(rendered[build]) if hook["name"] == "pods.pinhook.dev")
    names = [condition["name"] for condition in pods["matchConditions"]]
    assert ("not-skipped" in names) is ("enforce" not in build)


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_namespace_selector_excludes_system_namespaces_by_name_only(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    for webhook in _webhooks(rendered[build]):
        selector = webhook["namespaceSelector"]
        name = "kubernetes.io/metadata.name"
        assert not _selects(selector, {name: NAMESPACE})
        assert not _selects(selector, {name: "kube-system"})
        assert _selects(selector, {name: "team-a"})
        assert _selects(selector, {name: "default", "team": "ml"})
        # A label that a namespace's owner can set opts nothing out any more.
        assert _selects(selector, {name: "team-a", "pinhook.dev/ignore": "true"})
        namespace = _one(rendered[build], "Namespace", NAMESPACE)
        assert "pinhook.dev/ignore" not in namespace["metadata"]["labels"]


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_no_replicasets_or_wildcards_in_webhook_rules(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    for rule in (rule for hook in _webhooks(rendered[build]) for rule in hook["rules"]):
        assert "*" not in rule["apiGroups"]
        assert "*" not in rule["operations"]
        for resource in rule["resources"]:
            assert resource != "*"
            assert not resource.startswith("replicasets")


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_rules_and_kinds_per_build(rendered: dict[Build, list[Doc]], build: Build) -> None:
    expected = BASE_RULES | (WORKLOAD_RULES if "workloads" in build else set())
    assert _rule_set(_webhooks(rendered[build])) == expected
    settings = _settings(rendered[build])
    for key in (*WORKLOAD_KINDS, "cronjobs.batch"):
        assert settings.mode_for(key) is (Mode.PIN if "workloads" in build else Mode.OFF)
    # Left to the base setting: pinning ReplicaSets would loop with the Deployment controller.
    assert settings.mode_for("replicasets.apps") is Mode.OFF
    assert settings.mode_for("pods") is Mode.PIN


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_config_keys_compose(rendered: dict[Build, list[Doc]], build: Build) -> None:
    data = _one(rendered[build], "ConfigMap", "pinhook-config")["data"]
    expected = {"config.yaml"}
    expected |= {"enforce.yaml"} if "enforce" in build else set()
    expected |= {"workloads.yaml"} if "workloads" in build else set()
    expected |= {"redis.yaml"} if "redis" in build else set()
    assert set(data) == expected
    settings = _settings(rendered[build])
    assert [(rule.source, rule.target) for rule in settings.rewrites] == [DEFAULT_RULE]
    enforcing = "enforce" in build
    assert settings.require_digest is enforcing
    assert settings.on_failure is (OnFailure.DENY if enforcing else OnFailure.ALLOW)


def test_rewrite_rules_are_added_without_copying_the_config() -> None:
    rules = "rewrites:\n  - {from: docker.io/library/nginx, to: mirror.example.com/nginx}\n"
    docs = _kustomize(
        {
            "components": ["enforce"],
            "configMapGenerator": [
                {
                    "name": "pinhook-config",
                    "namespace": NAMESPACE,
                    "behavior": "merge",
                    "files": ["rules.yaml"],
                }
            ],
        },
        {"rules.yaml": rules},
    )
    data = _one(docs, "ConfigMap", "pinhook-config")["data"]
    assert set(data) == {"config.yaml", "enforce.yaml", "rules.yaml"}
    settings = _settings(docs)
    assert sorted((str(r.source), str(r.target)) for r in settings.rewrites) == [
        ("docker.io/library/nginx", "mirror.example.com/nginx"),
        DEFAULT_RULE,
    ]
    assert settings.require_digest is True


def test_the_image_is_set_in_one_place() -> None:
    # Only the Deployment names an image, and only kustomize's `images:` sets it.
    named = [
        (path.relative_to(MANIFESTS), line.strip())
        for path in MANIFESTS.rglob("*.yaml")
        for line in path.read_text().splitlines()
        if line.strip().startswith(("image:", "- image:"))
    ]
    assert named == [(Path("base/deployment.yaml"), "image: pinhook")]
    base = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    assert base["images"] == [{"name": "pinhook", "newTag": "0.1.0"}]
    digest = "sha256:" + "b" * 64
    override = [{"name": "pinhook", "newName": "registry.example.com/pinhook", "digest": digest}]
    for components in ([], ["cert-manager", "enforce"]):
        docs = _kustomize({"components": components, "images": override})
        assert _container(docs)["image"] == f"registry.example.com/pinhook@{digest}"


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_container_security_context_is_hardened(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    docs = rendered[build]
    pod = _one(docs, "Deployment", "pinhook")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = _container(docs)["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 65532
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in context
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_deployment_shape(rendered: dict[Build, list[Doc]], build: Build) -> None:
    deployment = _one(rendered[build], "Deployment", "pinhook")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    # The autoscaler owns the replica count: an apply must not reset it.
    assert "replicas" not in spec
    assert _selects(spec["selector"], spec["template"]["metadata"]["labels"])
    assert pod["serviceAccountName"] == "pinhook"
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert _selects(spread["labelSelector"], spec["template"]["metadata"]["labels"])
    expected_priority = "system-cluster-critical" if "enforce" in build else None
    assert pod.get("priorityClassName") == expected_priority

    container = _container(rendered[build])
    assert container["image"] == "pinhook:0.1.0"
    # cert-manager's files are used as they are; elsewhere the replicas manage the
    # certificate themselves through the Secret and write the files under /tmp.
    tls_flags = (
        ["--cert", "/etc/pinhook/tls/tls.crt", "--key", "/etc/pinhook/tls/tls.key"]
        if "cert-manager" in build
        else ["--self-managed", "--cert-dir", "/tmp/pinhook-tls"]
    )
    assert [*container.get("command", []), *container["args"]] == [
        "/opt/venv/bin/pinhook",
        "serve",
        "--config",
        "/etc/pinhook/config",
        *tls_flags,
        "--host",
        "0.0.0.0",
        "--port",
        "8443",
        "--metrics-port",
        "9090",
        "--log-format",
        "json",
    ]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"https": 8443, "metrics": 9090}
    namespace = {env["name"]: env for env in container["env"]}["POD_NAMESPACE"]
    assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_probes_use_https_on_8443(rendered: dict[Build, list[Doc]], build: Build) -> None:
    container = _container(rendered[build])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["scheme"] == "HTTPS"
        assert ports.get(get["port"], get["port"]) == 8443


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_volumes(rendered: dict[Build, list[Doc]], build: Build) -> None:
    pod = _one(rendered[build], "Deployment", "pinhook")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in _container(rendered[build])["volumeMounts"]}

    # A directory mount (no subPath), so ConfigMap edits reach the file pinhook watches.
    config = mounts["/etc/pinhook/config"]
    assert "subPath" not in config
    assert volumes[config["name"]]["configMap"]["name"] == "pinhook-config"

    if "cert-manager" in build:
        tls = mounts["/etc/pinhook/tls"]
        assert tls["readOnly"] is True
        secret = volumes[tls["name"]]["secret"]
        assert secret["secretName"] == "pinhook-tls"
        assert secret["optional"] is False  # start only once cert-manager has issued it
    else:
        assert "/etc/pinhook/tls" not in mounts

    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # A read-only root filesystem leaves /tmp as the only writable path.
    writable = [path for path, mount in mounts.items() if not mount.get("readOnly")]
    assert writable == ["/tmp"]


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_service_and_pdb_target_the_pods(rendered: dict[Build, list[Doc]], build: Build) -> None:
    docs = rendered[build]
    labels = _one(docs, "Deployment", "pinhook")["spec"]["template"]["metadata"]["labels"]
    service = _one(docs, "Service", "pinhook")["spec"]
    (port,) = service["ports"]
    assert port["port"] == 443
    assert port["targetPort"] == 8443
    assert _selects({"matchLabels": service["selector"]}, labels)
    pdb = _one(docs, "PodDisruptionBudget", "pinhook")["spec"]
    # One at a time, whatever number of replicas the autoscaler chose.
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    assert _selects(pdb["selector"], labels)


def _rules_by_role(docs: list[Doc]) -> dict[tuple[str, str], list[Doc]]:
    return {
        (doc["kind"], doc["metadata"]["name"]): doc["rules"]
        for doc in docs
        if doc["kind"] in {"Role", "ClusterRole"}
    }


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_rbac_grants_nothing_broad(rendered: dict[Build, list[Doc]], build: Build) -> None:
    forbidden_verbs = {"*", "delete", "deletecollection", "escalate", "bind", "impersonate"}
    for (kind, name), rules in _rules_by_role(rendered[build]).items():
        for rule in rules:
            assert "*" not in rule["apiGroups"], f"{kind}/{name}"
            assert "*" not in rule["resources"], f"{kind}/{name}"
            assert not forbidden_verbs & set(rule["verbs"]), f"{kind}/{name}"
            if {"update", "patch"} & set(rule["verbs"]):
                assert rule.get("resourceNames"), f"{kind}/{name} writes without resourceNames"


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_bindings_name_existing_roles_and_only_pinhook(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    docs = rendered[build]
    roles = _rules_by_role(docs)
    bindings = _all(docs, "RoleBinding") + _all(docs, "ClusterRoleBinding")
    assert bindings
    for binding in bindings:
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in roles
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "pinhook", "namespace": NAMESPACE}
        ]
    assert {(b["kind"], b["roleRef"]["name"]) for b in bindings} == {
        ("ClusterRoleBinding" if kind == "ClusterRole" else "RoleBinding", name)
        for kind, name in roles
    }


def test_base_rbac_rules(rendered: dict[Build, list[Doc]]) -> None:
    roles = _rules_by_role(rendered[()])
    assert roles[("ClusterRole", "pinhook")] == [
        {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]},
    ]
    assert roles[("ClusterRole", "pinhook-webhook-ca")] == [
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": ["pinhook"],
            "verbs": ["get", "patch"],
        }
    ]
    assert roles[("Role", "pinhook-config")] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["pinhook-config"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    assert roles[("Role", "pinhook-tls")] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["pinhook-tls"],
            "verbs": ["get", "update"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]


@pytest.mark.parametrize("build", [b for b in BUILDS if "cert-manager" in b], ids=_name)
def test_cert_manager_drops_self_managed_rbac(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    # Whatever came with other components: the policy sync's grant goes with the role.
    roles = set(_rules_by_role(rendered[build]))
    assert roles == {("ClusterRole", "pinhook"), ("Role", "pinhook-config")}


def test_cert_manager_issues_the_serving_certificate(
    rendered: dict[Build, list[Doc]],
) -> None:
    docs = rendered[("cert-manager",)]
    annotations = _one(docs, "MutatingWebhookConfiguration", "pinhook")["metadata"]["annotations"]
    namespace, certificate_name = annotations["cert-manager.io/inject-ca-from"].split("/")
    assert namespace == NAMESPACE
    serving = _one(docs, "Certificate", certificate_name)["spec"]
    assert serving["secretName"] == "pinhook-tls"
    assert serving["dnsNames"] == service_dns_names("pinhook", NAMESPACE)
    assert "server auth" in serving["usages"]

    # Follow the issuer chain: serving cert <- CA issuer <- CA certificate <- self-signed.
    ca_issuer = _one(docs, "Issuer", serving["issuerRef"]["name"])["spec"]
    ca_certificate = next(
        cert["spec"]
        for cert in _all(docs, "Certificate")
        if cert["spec"]["secretName"] == ca_issuer["ca"]["secretName"]
    )
    assert ca_certificate["isCA"] is True
    root = _one(docs, "Issuer", ca_certificate["issuerRef"]["name"])["spec"]
    assert root == {"selfSigned": {}}


@pytest.mark.parametrize("build", [b for b in BUILDS if "cert-manager" not in b], ids=_name)
def test_self_managed_builds_have_no_cert_manager_objects(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    docs = rendered[build]
    assert not [doc for doc in docs if doc["apiVersion"].startswith("cert-manager.io/")]
    config = _one(docs, "MutatingWebhookConfiguration", "pinhook")
    assert "cert-manager.io/inject-ca-from" not in config["metadata"].get("annotations", {})


def test_enforce_allows_critical_pods(rendered: dict[Build, list[Doc]]) -> None:
    quota = _one(rendered[("enforce",)], "ResourceQuota", "pinhook-critical-pods")
    (expression,) = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert expression["scopeName"] == "PriorityClass"
    assert expression["values"] == ["system-cluster-critical"]


# --- enforce: the backstop policy -------------------------------------------------------------


def _tagged_pod(namespace: str) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]},
    }


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_enforce_ships_the_policy_and_its_binding(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    docs = rendered[build]
    policies = _all(docs, "ValidatingAdmissionPolicy")
    bindings = _all(docs, "ValidatingAdmissionPolicyBinding")
    if "enforce" not in build:
        assert policies == bindings == []
        return
    policy = _one(docs, "ValidatingAdmissionPolicy", "pinhook")
    binding = _one(docs, "ValidatingAdmissionPolicyBinding", "pinhook")
    assert binding["spec"] == {"policyName": "pinhook", "validationActions": ["Deny"]}
    assert armed(policy)
    # Generated from config.yaml and enforce.yaml; where other components pin more kinds, a
    # self-managed pinhook patches it to the build's whole config (policysync).
    enforce_only = policy_object(_settings(rendered[("enforce",)]))
    assert policy["spec"] == enforce_only["spec"]
    served = policy_object(_settings(docs))["spec"]
    assert covers(policy["spec"], served) is ("workloads" not in build)
    # pinhook can start its own Pods, with the webhook down and failing closed.
    assert review(policy, _tagged_pod("default"), namespace="default").denials
    for namespace in (NAMESPACE, "kube-system"):
        assert not review(policy, _tagged_pod(namespace), namespace=namespace).matched


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_policy_sync_may_patch_only_pinhooks_policy(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    roles = _rules_by_role(rendered[build])
    rules = roles.get(("ClusterRole", "pinhook-webhook-ca"))
    if "cert-manager" in build:
        assert rules is None
        return
    assert rules is not None
    policy_rules = [rule for rule in rules if "validatingadmissionpolicies" in rule["resources"]]
    if "enforce" not in build:
        assert policy_rules == []
        return
    assert policy_rules == [
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["validatingadmissionpolicies"],
            "resourceNames": ["pinhook"],
            "verbs": ["get", "patch"],
        }
    ]


# --- network-policy and monitoring ------------------------------------------------------------


def _allows(rule: Doc, address: str) -> bool:
    """Whether one egress rule's ``to`` admits ``address`` (ipBlocks only)."""
    ip = ipaddress.ip_address(address)
    for peer in rule.get("to", []):
        block = peer["ipBlock"]
        network = ipaddress.ip_network(block["cidr"])
        if ip.version != network.version or ip not in network:
            continue
        if not any(ip in ipaddress.ip_network(cidr) for cidr in block.get("except", [])):
            return True
    return False


# What the private-address guard refuses (webhook/oci/hostguard.py): none of it on 443.
FORBIDDEN = (
    "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "127.0.0.1", "169.254.169.254",
    "0.0.0.0", "224.0.0.1", "240.0.0.1", "::1", "fd00::1", "fe80::1", "ff02::1",
    "::ffff:10.0.0.1",
)  # fmt: skip
PUBLIC = ("8.8.8.8", "104.16.0.1", "2001:4860:4860::8888")


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_network_policy(rendered: dict[Build, list[Doc]], build: Build) -> None:
    docs = rendered[build]
    policies = _all(docs, "NetworkPolicy")
    if "network-policy" not in build:
        assert policies == []
        return
    spec = _one(docs, "NetworkPolicy", "pinhook")["spec"]
    labels = _one(docs, "Deployment", "pinhook")["spec"]["template"]["metadata"]["labels"]
    assert _selects(spec["podSelector"], labels)
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    webhook, metrics = spec["ingress"]
    # The webhook port: the API server cannot be selected, so from anywhere, and only there.
    assert "from" not in webhook
    assert webhook["ports"] == [{"port": 8443, "protocol": "TCP"}]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"] and all("podSelector" in peer for peer in metrics["from"])
    dns, api, registries = spec["egress"]
    assert "to" not in dns and {p["port"] for p in dns["ports"]} == {53}
    assert {p["protocol"] for p in dns["ports"]} == {"UDP", "TCP"}
    assert api["ports"] == [{"port": 6443, "protocol": "TCP"}]
    assert registries["ports"] == [{"port": 443, "protocol": "TCP"}]
    for address in FORBIDDEN:
        assert is_forbidden_address(ipaddress.ip_address(address)), address
        assert not _allows(registries, address), address
    for address in PUBLIC:
        assert _allows(registries, address), address


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_monitoring_scrapes_the_metrics_port(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    docs = rendered[build]
    monitors = _all(docs, "ServiceMonitor")
    if "monitoring" not in build:
        assert monitors == []
        return
    spec = _one(docs, "ServiceMonitor", "pinhook")["spec"]
    metrics = _one(docs, "Service", "pinhook-metrics")
    assert _selects(spec["selector"], metrics["metadata"]["labels"])
    # Not the webhook's Service: its port is TLS and for the API server only.
    assert not _selects(spec["selector"], _one(docs, "Service", "pinhook")["metadata"]["labels"])
    assert [e["port"] for e in spec["endpoints"]] == ["metrics"]
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["metrics"]
    ports = {p["name"]: p["containerPort"] for p in _container(docs)["ports"]}
    assert ports["metrics"] == 9090
    assert "--metrics-port" in _container(docs)["args"]


@pytest.mark.parametrize("build", BUILDS, ids=_name)
def test_autoscaler_scales_the_deployment_on_cpu(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    docs = rendered[build]
    hpa = _one(docs, "HorizontalPodAutoscaler", "pinhook")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "pinhook",
    }
    # Two at least: with the PDB's one at a time, a drain never leaves none.
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    (metric,) = spec["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    # Utilization is of the request: there must be one.
    assert _container(docs)["resources"]["requests"]["cpu"]
    assert "cpu" not in _container(docs)["resources"].get("limits", {})


@pytest.mark.parametrize("build", [b for b in BUILDS if "redis" in b], ids=_name)
def test_redis_component_reads_url_and_password_from_a_secret(
    rendered: dict[Build, list[Doc]], build: Build
) -> None:
    docs = rendered[build]
    settings = _settings(docs)
    redis = settings.cache.redis
    assert redis is not None and redis.url is None
    assert redis.url_file is not None and redis.password_file is not None
    assert settings.cache.owner_pinning.enabled
    pod = _one(docs, "Deployment", "pinhook")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in _container(docs)["volumeMounts"]}
    for path in (redis.url_file, redis.password_file):
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "pinhook-redis"
        assert secret["optional"] is False
    # A key of its own, merged: the rules and the other components' settings still apply.
    without = tuple(name for name in build if name != "redis")
    others = _settings(rendered[without])
    assert settings.rewrites == others.rewrites
    assert settings.require_digest == others.require_digest
    assert settings.kinds == others.kinds
    # Nothing else is added.
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert kinds == {(d["kind"], d["metadata"]["name"]) for d in rendered[without]}

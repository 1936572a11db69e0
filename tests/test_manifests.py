"""Render every kustomization under manifests/ and check the properties pinhook relies on."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from webhook.certs import service_dns_names
from webhook.config import OnFailure, load_settings
from webhook.kinds import Mode
from webhook.webhookconfig import WebhookTarget, build_webhook_configuration

KUBECTL = shutil.which("kubectl")

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
REDIS = "base+components/redis"  # a component, rendered on the base as a user would
BUILDS = ("base", "overlays/enforce", "overlays/cert-manager", "overlays/workloads", REDIS)
NAMESPACE = "pinhook-system"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}
FAILURE_POLICY = {
    "base": "Ignore",
    "overlays/enforce": "Fail",
    "overlays/cert-manager": "Ignore",
    "overlays/workloads": "Ignore",
    REDIS: "Ignore",
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

Doc = dict[str, Any]


def _render(build: str) -> list[Doc]:
    """``build``: a kustomization under manifests/, or ``base+components/NAME``: a
    kustomization of the user's own with the base as resource and the component."""
    if KUBECTL is None:
        pytest.skip("kubectl not on PATH: cannot render the kustomizations (kubectl kustomize)")
    if "+" not in build:
        return _kustomize(MANIFESTS / build, build)
    resource, *components = build.split("+")
    with tempfile.TemporaryDirectory() as directory:
        # kustomize takes relative paths only.
        listed = [os.path.relpath(MANIFESTS / path, directory) for path in (resource, *components)]
        (Path(directory) / "kustomization.yaml").write_text(
            yaml.safe_dump({"resources": listed[:1], "components": listed[1:]})
        )
        return _kustomize(Path(directory), build)


def _kustomize(directory: Path, build: str) -> list[Doc]:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {build} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {build: _render(build) for build in BUILDS}


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


def test_every_overlay_and_component_is_tested() -> None:
    overlays = {f"overlays/{p.name}" for p in (MANIFESTS / "overlays").iterdir() if p.is_dir()}
    assert overlays == {build for build in BUILDS if build.startswith("overlays/")}
    components = {f"base+components/{p.name}" for p in (MANIFESTS / "components").iterdir()}
    assert components == {build for build in BUILDS if "+components/" in build}


@pytest.mark.parametrize("build", BUILDS)
def test_namespaced_objects_live_in_pinhook_system(
    rendered: dict[str, list[Doc]], build: str
) -> None:
    docs = rendered[build]
    _one(docs, "Namespace", NAMESPACE)
    for doc in docs:
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in CLUSTER_SCOPED:
            assert namespace is None, f"{doc['kind']} is cluster-scoped"
        else:
            assert namespace == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("build", BUILDS)
def test_webhook_settings(rendered: dict[str, list[Doc]], build: str) -> None:
    for webhook in _webhooks(rendered[build]):
        assert webhook["sideEffects"] == "None"
        assert webhook["failurePolicy"] == FAILURE_POLICY[build]
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
        assert webhook["matchConditions"][0]["name"] == "not-skipped"


@pytest.mark.parametrize("build", BUILDS)
def test_webhooks_are_generated_from_the_builds_own_config(
    rendered: dict[str, list[Doc]], build: str
) -> None:
    # The ConfigMap and the webhook configuration of one build must agree: the rules and
    # matchConditions are computed from the kinds and rewrite rules in the config.
    config = _one(rendered[build], "MutatingWebhookConfiguration", "pinhook")
    expected = build_webhook_configuration(
        _settings(rendered[build]), WebhookTarget(), failure_policy=FAILURE_POLICY[build]
    )
    assert config["webhooks"] == expected["webhooks"]


@pytest.mark.parametrize("build", BUILDS)
def test_namespace_selector_excludes_system_and_opted_out_namespaces(
    rendered: dict[str, list[Doc]], build: str
) -> None:
    for webhook in _webhooks(rendered[build]):
        selector = webhook["namespaceSelector"]
        name = "kubernetes.io/metadata.name"
        assert not _selects(selector, {name: NAMESPACE})
        assert not _selects(selector, {name: "kube-system"})
        assert not _selects(selector, {name: "team-a", "pinhook.dev/ignore": ""})
        assert not _selects(selector, {name: "team-a", "pinhook.dev/ignore": "false"})
        assert _selects(selector, {name: "team-a"})
        assert _selects(selector, {name: "default", "team": "ml"})
        # The Namespace object itself is excluded twice over, by name and by label.
        namespace = _one(rendered[build], "Namespace", NAMESPACE)
        assert not _selects(selector, namespace["metadata"]["labels"] | {name: NAMESPACE})


@pytest.mark.parametrize("build", BUILDS)
def test_no_replicasets_or_wildcards_in_webhook_rules(
    rendered: dict[str, list[Doc]], build: str
) -> None:
    for rule in (rule for hook in _webhooks(rendered[build]) for rule in hook["rules"]):
        assert "*" not in rule["apiGroups"]
        assert "*" not in rule["operations"]
        for resource in rule["resources"]:
            assert resource != "*"
            assert not resource.startswith("replicasets")


def test_base_rules(rendered: dict[str, list[Doc]]) -> None:
    assert _rule_set(_webhooks(rendered["base"])) == BASE_RULES


@pytest.mark.parametrize("build", ["overlays/enforce", "overlays/cert-manager"])
def test_overlays_keep_base_rules(rendered: dict[str, list[Doc]], build: str) -> None:
    assert _rule_set(_webhooks(rendered[build])) == BASE_RULES


def test_workloads_overlay_adds_controllers(rendered: dict[str, list[Doc]]) -> None:
    assert _rule_set(_webhooks(rendered["overlays/workloads"])) == BASE_RULES | WORKLOAD_RULES


def test_workloads_overlay_config_pins_controllers(rendered: dict[str, list[Doc]]) -> None:
    settings = _settings(rendered["overlays/workloads"])
    for key in ("deployments.apps", "statefulsets.apps", "daemonsets.apps"):
        assert settings.mode_for(key) == Mode.PIN
    for key in ("jobs.batch", "cronjobs.batch"):
        assert settings.mode_for(key) == Mode.PIN
    # Left to the base setting: pinning ReplicaSets would loop with the Deployment controller.
    assert "replicasets.apps" not in settings.kinds
    assert settings.mode_for("replicasets.apps") == Mode.OFF
    assert settings.mode_for("pods") == Mode.PIN


def _settings(docs: list[Doc]) -> Any:
    text = _one(docs, "ConfigMap", "pinhook-config")["data"]["config.yaml"]
    assert isinstance(yaml.safe_load(text), dict)
    return load_settings(text, source="pinhook-config")


@pytest.mark.parametrize("build", BUILDS)
def test_config_holds_default_rewrite(rendered: dict[str, list[Doc]], build: str) -> None:
    text = _one(rendered[build], "ConfigMap", "pinhook-config")["data"]["config.yaml"]
    document = yaml.safe_load(text)
    assert {
        "from": "gcr.io/kubebuilder/kube-rbac-proxy",
        "to": "quay.io/brancz/kube-rbac-proxy",
    } in document["rewrites"]
    settings = _settings(rendered[build])
    assert [(rule.source, rule.target) for rule in settings.rewrites] == [
        ("gcr.io/kubebuilder/kube-rbac-proxy", "quay.io/brancz/kube-rbac-proxy")
    ]


@pytest.mark.parametrize("build", BUILDS)
def test_failure_settings_per_overlay(rendered: dict[str, list[Doc]], build: str) -> None:
    settings = _settings(rendered[build])
    enforcing = build == "overlays/enforce"
    assert settings.require_digest is enforcing
    assert settings.on_failure is (OnFailure.DENY if enforcing else OnFailure.ALLOW)


@pytest.mark.parametrize("build", BUILDS)
def test_container_security_context_is_hardened(rendered: dict[str, list[Doc]], build: str) -> None:
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


@pytest.mark.parametrize("build", BUILDS)
def test_deployment_shape(rendered: dict[str, list[Doc]], build: str) -> None:
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
    expected_priority = "system-cluster-critical" if build == "overlays/enforce" else None
    assert pod.get("priorityClassName") == expected_priority

    container = _container(rendered[build])
    # cert-manager's files are used as they are; elsewhere the replicas manage the
    # certificate themselves through the Secret and write the files under /tmp.
    tls_flags = (
        ["--cert", "/etc/pinhook/tls/tls.crt", "--key", "/etc/pinhook/tls/tls.key"]
        if build == "overlays/cert-manager"
        else ["--self-managed", "--cert-dir", "/tmp/pinhook-tls"]
    )
    assert [*container.get("command", []), *container["args"]] == [
        "/opt/venv/bin/pinhook",
        "serve",
        "--config",
        "/etc/pinhook/config/config.yaml",
        *tls_flags,
        "--host",
        "0.0.0.0",
        "--port",
        "8443",
    ]
    namespace = {env["name"]: env for env in container["env"]}["POD_NAMESPACE"]
    assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]


@pytest.mark.parametrize("build", BUILDS)
def test_probes_use_https_on_8443(rendered: dict[str, list[Doc]], build: str) -> None:
    container = _container(rendered[build])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["scheme"] == "HTTPS"
        assert ports.get(get["port"], get["port"]) == 8443


@pytest.mark.parametrize("build", BUILDS)
def test_volumes(rendered: dict[str, list[Doc]], build: str) -> None:
    pod = _one(rendered[build], "Deployment", "pinhook")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in _container(rendered[build])["volumeMounts"]}

    # A directory mount (no subPath), so ConfigMap edits reach the file pinhook watches.
    config = mounts["/etc/pinhook/config"]
    assert "subPath" not in config
    assert volumes[config["name"]]["configMap"]["name"] == "pinhook-config"

    if build == "overlays/cert-manager":
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


@pytest.mark.parametrize("build", BUILDS)
def test_service_and_pdb_target_the_pods(rendered: dict[str, list[Doc]], build: str) -> None:
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


@pytest.mark.parametrize("build", BUILDS)
def test_autoscaler_scales_the_deployment_on_cpu(
    rendered: dict[str, list[Doc]], build: str
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


def test_redis_component_reads_url_and_password_from_a_secret(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered[REDIS]
    redis = _settings(docs).cache.redis
    assert redis is not None and redis.url is None
    assert redis.url_file is not None and redis.password_file is not None
    pod = _one(docs, "Deployment", "pinhook")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in _container(docs)["volumeMounts"]}
    for path in (redis.url_file, redis.password_file):
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "pinhook-redis"
        assert secret["optional"] is False
    assert _settings(docs).cache.owner_pinning.enabled
    # Everything else is the base's.
    base = {(d["kind"], d["metadata"]["name"]) for d in rendered["base"]}
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == base


def _rules_by_role(docs: list[Doc]) -> dict[tuple[str, str], list[Doc]]:
    return {
        (doc["kind"], doc["metadata"]["name"]): doc["rules"]
        for doc in docs
        if doc["kind"] in {"Role", "ClusterRole"}
    }


@pytest.mark.parametrize("build", BUILDS)
def test_rbac_grants_nothing_broad(rendered: dict[str, list[Doc]], build: str) -> None:
    forbidden_verbs = {"*", "delete", "deletecollection", "escalate", "bind", "impersonate"}
    for (kind, name), rules in _rules_by_role(rendered[build]).items():
        for rule in rules:
            assert "*" not in rule["apiGroups"], f"{kind}/{name}"
            assert "*" not in rule["resources"], f"{kind}/{name}"
            assert not forbidden_verbs & set(rule["verbs"]), f"{kind}/{name}"
            if {"update", "patch"} & set(rule["verbs"]):
                assert rule.get("resourceNames"), f"{kind}/{name} writes without resourceNames"


@pytest.mark.parametrize("build", BUILDS)
def test_bindings_name_existing_roles_and_only_pinhook(
    rendered: dict[str, list[Doc]], build: str
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


def test_base_rbac_rules(rendered: dict[str, list[Doc]]) -> None:
    roles = _rules_by_role(rendered["base"])
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


def test_cert_manager_overlay_drops_self_managed_rbac(rendered: dict[str, list[Doc]]) -> None:
    roles = set(_rules_by_role(rendered["overlays/cert-manager"]))
    assert roles == {("ClusterRole", "pinhook"), ("Role", "pinhook-config")}


def test_cert_manager_overlay_issues_the_serving_certificate(
    rendered: dict[str, list[Doc]],
) -> None:
    docs = rendered["overlays/cert-manager"]
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


@pytest.mark.parametrize("build", ["base", "overlays/enforce", "overlays/workloads"])
def test_self_managed_builds_have_no_cert_manager_objects(
    rendered: dict[str, list[Doc]], build: str
) -> None:
    docs = rendered[build]
    assert not [doc for doc in docs if doc["apiVersion"].startswith("cert-manager.io/")]
    config = _one(docs, "MutatingWebhookConfiguration", "pinhook")
    assert "cert-manager.io/inject-ca-from" not in config["metadata"].get("annotations", {})


def test_enforce_overlay_allows_critical_pods(rendered: dict[str, list[Doc]]) -> None:
    quota = _one(rendered["overlays/enforce"], "ResourceQuota", "pinhook-critical-pods")
    (expression,) = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert expression["scopeName"] == "PriorityClass"
    assert expression["values"] == ["system-cluster-critical"]

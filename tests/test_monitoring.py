"""The monitoring component, rendered by the real kustomize: what it scrapes, and alerts that
name only metrics pinhook exports."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_manifests import KUBECTL, MANIFESTS
from webhook.metrics import Metrics

COMPONENT = MANIFESTS / "components" / "monitoring"
ALERTS = {
    "PinhookCertificateExpiring",
    "PinhookConfigRejected",
    "PinhookUnpinnedAdmissionsRising",
    "PinhookRegistryErrors",
    "PinhookAdmissionLatencyNearDeadline",
}
_METRIC = re.compile(r"\bpinhook_[a-z0-9_]+")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The base with the component, as a user's kustomization would include it."""
    if KUBECTL is None:
        pytest.skip("kubectl not on PATH: cannot render the kustomizations (kubectl kustomize)")
    root = tmp_path_factory.mktemp("install")
    (root / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{_relative(MANIFESTS / 'base', root)}]\n"
        f"components: [{_relative(COMPONENT, root)}]\n"
    )
    result = subprocess.run(
        [KUBECTL, "kustomize", str(root)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _relative(path: Path, start: Path) -> str:
    # kustomize takes no absolute paths to other kustomizations.
    return os.path.relpath(path, start)


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def exported_names() -> set[str]:
    """Every metric and sample name a fresh pinhook exports (HELP lines name labelled
    families that have no sample yet)."""
    names: set[str] = set()
    for line in Metrics().render().decode().splitlines():
        if line.startswith("# HELP "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_servicemonitor_scrapes_the_metrics_port(rendered: list[dict[str, Any]]) -> None:
    monitor = _one(rendered, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    service = next(doc for doc in rendered if doc["metadata"]["name"] == "pinhook-metrics")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert endpoint["port"] == port["name"] == "metrics"
    assert endpoint["scheme"] == "http"
    deployment = _one(rendered, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == 9090
    assert container["args"][container["args"].index("--metrics-port") + 1] == "9090"
    # The webhook's Service stays the API server's alone.
    webhook = next(
        doc for doc in rendered if doc["metadata"]["name"] == "pinhook" and doc["kind"] == "Service"
    )
    assert [p["port"] for p in webhook["spec"]["ports"]] == [443]


def test_alerts_use_only_metrics_that_exist(rendered: list[dict[str, Any]]) -> None:
    rule = _one(rendered, "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == ALERTS
    exported = exported_names()
    for name, alert in alerts.items():
        used = set(_METRIC.findall(alert["expr"]))
        assert used, name
        assert used <= exported, f"{name} uses {sorted(used - exported)}"
        assert alert["labels"]["severity"]
        assert alert["annotations"]["summary"]


def test_exported_names_include_what_the_alerts_need() -> None:
    # The check above would pass on an empty rule file; these names are what it relies on.
    exported = exported_names()
    assert {
        "pinhook_certificate_expires_in_seconds",
        "pinhook_config_last_reload_valid",
        "pinhook_images_total",
        "pinhook_resolve_failures_total",
        "pinhook_registry_requests_total",
        "pinhook_admission_duration_seconds_bucket",
    } <= exported
    assert not any(name.endswith("_created") for name in exported)

"""``pinhook report`` against the real API server: objects created there, images at the
loopback registry, a tag moved under a running Pod."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from lightkube import Client
from lightkube.resources.core_v1 import PodStatus
from lightkube.types import PatchType

from tests.e2e import cluster
from tests.e2e.cluster import InstalledCrds, Namespaces
from tests.e2e.conftest import E2ERegistry, PinhookSetup
from tests.e2e.pinhook import moved_ref, pinhook_cli
from tests.harness.push import PushedImage, move_tag, push_index

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pushed(e2e_registry: E2ERegistry) -> Iterator[tuple[httpx.Client, PushedImage]]:
    with httpx.Client(base_url=f"http://{e2e_registry.host}", timeout=10.0) as client:
        yield client, push_index(client, "e2e/report", "1.0")


def report(setup: PinhookSetup, namespace: str) -> dict[str, Any]:
    result = pinhook_cli(
        "report", "-n", namespace, "--config", str(setup.config),
        "--kubeconfig", str(setup.kubeconfig), "-o", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_report_of_a_live_namespace(
    kube: Client,
    crds: InstalledCrds,
    namespaces: Namespaces,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    pushed: tuple[httpx.Client, PushedImage],
) -> None:
    client, running = pushed
    namespace = namespaces.create(f"report-{cluster.run_id()}")
    app = e2e_registry.app
    missing = f"{e2e_registry.host}/e2e/app:missing"
    objects = [
        cluster.pod("pinned", e2e_registry.pinned, namespace),
        cluster.pod("moved", running.tag_ref, namespace),
        cluster.deployment("missing", missing, namespace, 0, labels={"app": "missing"}),
        cluster.inference_service("isvc", moved_ref(app), namespace),
    ]
    for document in objects:
        cluster.create_and_read_back(kube, document)
    # The Pod runs the tag's first digest (as a kubelet would report it); then the tag moves.
    status = {
        "name": "app",
        "image": running.tag_ref,
        "imageID": f"{e2e_registry.host}/e2e/report@{running.digest}",
        "ready": False,
        "restartCount": 0,
        "state": {"waiting": {"reason": "SchedulingGated"}},
    }
    kube.patch(
        PodStatus,
        "moved",
        {"status": {"containerStatuses": [status]}},
        namespace=namespace,
        patch_type=PatchType.MERGE,
    )
    moved_to = move_tag(client, running)
    assert moved_to.digest != running.digest

    data = report(pinhook_setup, namespace)
    rows = {row["image"]: row for row in data["images"]}
    assert set(rows) == {e2e_registry.pinned, running.tag_ref, missing, moved_ref(app)}

    pinned = rows[e2e_registry.pinned]
    assert pinned["pinned"] is True and pinned["moved"] is False
    assert pinned["tagDigest"] == app.digest
    assert pinned["uses"] == [f"Pod {namespace}/pinned: spec.containers[0].image"]

    moved = rows[running.tag_ref]
    assert moved["pinned"] is False
    assert (moved["runningDigest"], moved["tagDigest"]) == (running.digest, moved_to.digest)
    assert moved["moved"] is True
    assert moved["final"] == f"{running.tag_ref}@{moved_to.digest}"

    gone = rows[missing]
    assert gone["reason"] == "not-found" and gone["tagDigest"] is None
    # The Deployment, and its ReplicaSet once the controller made it.
    deployment_use = f"Deployment {namespace}/missing: spec.template.spec.containers[0].image"
    assert gone["uses"][0] == deployment_use
    assert all(use.startswith(f"ReplicaSet {namespace}/missing-") for use in gone["uses"][1:])

    rewritten = rows[moved_ref(app)]
    assert rewritten["rewrittenTo"] == app.tag_ref
    assert rewritten["tagDigest"] == app.digest
    assert rewritten["uses"] == [f"InferenceService {namespace}/isvc: spec.predictor.model.image"]

    # enforce: the Pods pinhook can pin pass; the Deployment is a template (off by default).
    assert data["enforceWouldDeny"] == []
    assert data["summary"]["objects"] == 3 + len(gone["uses"])
    assert data["summary"]["moved"] == 1 and data["summary"]["unresolvable"] == 1
    assert "llminferenceservices.serving.kserve.io: CRD not installed; skipped" in data["notes"]


def test_report_says_what_enforce_would_deny(
    kube: Client,
    namespaces: Namespaces,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
) -> None:
    namespace = namespaces.create(f"report-deny-{cluster.run_id()}")
    missing = f"{e2e_registry.host}/e2e/app:missing"
    cluster.create_and_read_back(kube, cluster.pod("doomed", missing, namespace))
    data = report(pinhook_setup, namespace)
    (denied,) = data["enforceWouldDeny"]
    assert denied.startswith(f"Pod {namespace}/doomed: cannot pin {missing} (not-found)")
    table = pinhook_cli("report", "-n", namespace, "--config", str(pinhook_setup.config))
    assert table.returncode == 0, table.stderr
    assert "enforce (requireDigest) would deny:" in table.stdout
    assert f"Pod {namespace}/doomed" in table.stdout

"""pinhook registered in a real cluster: what the API server stores after it ran.

One pinhook and one webhook configuration for the module. Every object is read back from
the API server, so each assertion is about the stored object, not pinhook's answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from lightkube import ApiError, Client
from lightkube.resources.core_v1 import Pod

from tests.e2e import cluster
from tests.e2e.cluster import IGNORE_LABEL, PINHOOK_NAMESPACE, Namespaces, container_images
from tests.e2e.conftest import E2ERegistry, PinhookSetup, registered_pinhook
from tests.e2e.pinhook import Pinhook, moved_ref

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Live:
    """pinhook being called by the API server for ``namespace``."""

    kube: Client
    namespace: str
    registry: E2ERegistry
    pinhook: Pinhook
    run: str


@pytest.fixture(scope="module")
def live(
    kube: Client,
    crds: cluster.InstalledCrds,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
) -> Iterator[Live]:
    run = cluster.run_id()
    namespace = namespaces.create(f"pinhook-e2e-{run}")
    with registered_pinhook(kube, pinhook_setup, f"pinhook-e2e-{run}") as pinhook:
        app = e2e_registry.app
        cluster.wait_until_webhook_called(kube, namespace, app.tag_ref, e2e_registry.pinned)
        yield Live(kube, namespace, e2e_registry, pinhook, run)


def test_pod_tag_is_pinned_to_the_index_digest(live: Live) -> None:
    app = live.registry.app
    stored = cluster.create_and_read_back(
        live.kube, cluster.pod("tagged", app.tag_ref, live.namespace)
    )
    [image] = container_images(stored, "spec", "containers")
    assert image == f"{app.tag_ref}@{app.digest}"
    # The index, so every platform pulls its own image, not one platform's manifest.
    assert app.digest not in app.manifest_digests and len(app.manifest_digests) == 2


def test_pod_image_moved_by_a_rule_is_rewritten_and_pinned(live: Live) -> None:
    stored = cluster.create_and_read_back(
        live.kube, cluster.pod("moved", moved_ref(live.registry.app), live.namespace)
    )
    assert container_images(stored, "spec", "containers") == [live.registry.pinned]


def test_skip_annotation_leaves_the_pod_alone(live: Live) -> None:
    document = cluster.pod("skipped", moved_ref(live.registry.app), live.namespace)
    document["metadata"]["annotations"] = {"pinhook.dev/skip": "true"}
    stored = cluster.create_and_read_back(live.kube, document)
    assert container_images(stored, "spec", "containers") == [moved_ref(live.registry.app)]


def test_dry_run_is_answered_like_a_real_create(live: Live) -> None:
    would_store = cluster.dry_run_create(
        live.kube, cluster.pod("dry-run", live.registry.app.tag_ref, live.namespace)
    )
    assert container_images(would_store, "spec", "containers") == [live.registry.pinned]
    with pytest.raises(ApiError) as missing:
        live.kube.get(Pod, "dry-run", namespace=live.namespace)
    assert missing.value.status.code == 404


@pytest.mark.parametrize("predictor", ["model", "sklearn"])
def test_inference_service_predictor_image_is_pinned_in_both_shapes(
    live: Live, predictor: str
) -> None:
    # model: the current shape; sklearn: a framework key, the older one, still stored as is
    # (the CRDs keep unknown fields under spec, as KServe's minimal CRD does).
    sent = cluster.inference_service(
        f"isvc-{predictor}", live.registry.app.tag_ref, live.namespace, predictor
    )
    stored = cluster.create_and_read_back(live.kube, sent)
    implementation = stored["spec"]["predictor"][predictor]
    assert implementation["image"] == live.registry.pinned
    # Nothing else of the spec is touched.
    expected = {**sent["spec"]["predictor"][predictor], "image": live.registry.pinned}
    assert stored["spec"]["predictor"] == {predictor: expected}


def test_serving_runtimes_are_rewritten_keeping_the_tag_without_a_digest(live: Live) -> None:
    moved = moved_ref(live.registry.app)
    runtime = cluster.create_and_read_back(
        live.kube, cluster.serving_runtime("sklearn-runtime", moved, live.namespace)
    )
    assert container_images(runtime, "spec", "containers") == [live.registry.app.tag_ref]
    name = f"pinhook-e2e-{live.run}"
    try:
        cluster_runtime = cluster.create_and_read_back(
            live.kube, cluster.cluster_serving_runtime(name, moved)
        )
        # Cluster-scoped: the namespaceSelector does not apply, the rule still does.
        assert container_images(cluster_runtime, "spec", "containers") == [
            live.registry.app.tag_ref
        ]
    finally:
        cluster.delete_cluster_serving_runtime(live.kube, name)


def test_knative_service_template_is_pinned(live: Live) -> None:
    stored = cluster.create_and_read_back(
        live.kube, cluster.knative_service("predictor", live.registry.app.tag_ref, live.namespace)
    )
    images = container_images(stored, "spec", "template", "spec", "containers")
    assert images == [live.registry.pinned]


def test_pinhook_namespace_is_never_sent_to_pinhook(live: Live, namespaces: Namespaces) -> None:
    # pinhook runs with excludedNamespaces: [], so it would pin here if it were called: the
    # kept tag shows that the webhook configuration's namespaceSelector left it out.
    namespace = namespaces.ensure(PINHOOK_NAMESPACE)
    name = f"pinhook-e2e-{live.run}"
    try:
        stored = cluster.create_and_read_back(
            live.kube, cluster.pod(name, live.registry.app.tag_ref, namespace)
        )
        assert container_images(stored, "spec", "containers") == [live.registry.app.tag_ref]
    finally:
        # The namespace may be a real pinhook's: remove only what this test made.
        cluster.delete_pod(live.kube, name, namespace)


def test_a_namespace_label_opts_nothing_out(live: Live, namespaces: Namespaces) -> None:
    # Anyone who may label a namespace could otherwise take it out of a digest-only policy:
    # namespaces are left out by name only (excludedNamespaces), which admins control.
    namespace = namespaces.create(f"pinhook-e2e-{live.run}-labelled", {IGNORE_LABEL: "true"})
    stored = cluster.create_and_read_back(
        live.kube, cluster.pod("labelled", live.registry.app.tag_ref, namespace)
    )
    assert container_images(stored, "spec", "containers") == [live.registry.pinned]

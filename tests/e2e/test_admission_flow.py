"""The API server's side of the contract: which requests reach pinhook, and in what order.

One pinhook for the module, counted through its own metrics. Each test reads a delta around
its own request: nothing else creates or updates objects while a test runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import pytest
from lightkube import Client, codecs
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

from tests.e2e import cluster
from tests.e2e.cluster import Namespaces, container_images
from tests.e2e.conftest import E2ERegistry, PinhookSetup, registered_pinhook
from tests.e2e.kubectl import Kubectl
from tests.e2e.metrics import ANSWERS_RECALLED, IMAGES, scrape
from tests.e2e.pinhook import NO_MATCH_CONDITIONS_ENV, Pinhook, moved_ref
from tests.e2e.servers import (
    ADD_ANNOTATION,
    ADD_CONTAINER,
    ADDED_ANNOTATION,
    ADDED_CONTAINER,
    ADDER_LABEL,
    AdderWebhook,
    adder_configuration,
)

pytestmark = pytest.mark.e2e

REPLICAS: Final = 2
ROLLOUT_S: Final = 60.0
# How long a Deployment controller in a hot loop would take to add a second ReplicaSet: it
# syncs again as soon as its ReplicaSet changes, so milliseconds; two seconds is plenty.
HOT_LOOP_S: Final = 2.0


@dataclass(frozen=True)
class Live:
    kube: Client
    namespace: str
    registry: E2ERegistry
    pinhook: Pinhook
    name: str  # of pinhook's webhook configuration
    match_conditions: bool


@pytest.fixture(scope="module")
def live(
    kube: Client,
    crds: cluster.InstalledCrds,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
) -> Iterator[Live]:
    run = cluster.run_id()
    name = f"pinhook-e2e-{run}"
    namespace = namespaces.create(f"pinhook-e2e-{run}-flow")
    with registered_pinhook(kube, pinhook_setup, name) as pinhook:
        app = e2e_registry.app
        cluster.wait_until_webhook_called(kube, namespace, app.tag_ref, e2e_registry.pinned)
        with_conditions = os.environ.get(NO_MATCH_CONDITIONS_ENV) != "1"
        yield Live(kube, namespace, e2e_registry, pinhook, name, with_conditions)


def create(live: Live, document: dict[str, Any]) -> dict[str, Any]:
    return cluster.create_and_read_back(live.kube, document)


# --- matchConditions --------------------------------------------------------------------


def test_match_conditions_keep_pinned_objects_away_from_pinhook(live: Live) -> None:
    if not live.match_conditions:
        pytest.skip(f"{NO_MATCH_CONDITIONS_ENV}=1: installed without matchConditions")
    [pods_webhook] = [
        hook
        for hook in cluster.get_webhook_configuration(live.kube, live.name)["webhooks"]
        if hook["name"] == "pods.pinhook.dev"
    ]
    assert pods_webhook["matchConditions"], "installed without matchConditions"
    app, pinned = live.registry.app, live.registry.pinned
    cases = [
        # (image, sent to pinhook, stored as)
        (pinned, False, pinned),  # pinhook's own output, as a re-apply sends it
        (app.digest_ref, False, app.digest_ref),
        (app.tag_ref, True, pinned),
        # Pinned, but a rule moves it: the CEL regex of the rules, run by the API server.
        (f"{moved_ref(app).rsplit(':', 1)[0]}@{app.digest}", True, app.digest_ref),
    ]
    for index, (image, sent, stored_as) in enumerate(cases):
        before = scrape(live.pinhook).admissions("Pod", "CREATE")
        stored = create(live, cluster.pod(f"conditions-{index}", image, live.namespace))
        calls = scrape(live.pinhook).admissions("Pod", "CREATE") - before
        assert (calls, container_images(stored, "spec", "containers")) == (
            int(sent),
            [stored_as],
        ), image


# --- Deployments through the controller-manager -----------------------------------------


def test_deployment_pods_are_pinned_and_its_only_replica_set_keeps_the_tags(
    live: Live,
) -> None:
    app = live.registry.app
    labels = {"app.kubernetes.io/name": "rollout"}
    pods = _deployed_pods(live, "rollout", REPLICAS, labels)
    # The controller-manager created the Pods; the API server sent each to pinhook.
    assert [container_images(p, "spec", "containers") for p in pods] == [
        [live.registry.pinned]
    ] * REPLICAS
    deployment = cluster.wait_for_rollout(live.kube, "rollout", live.namespace, ROLLOUT_S)
    replica_sets, version = cluster.replica_sets(live.kube, live.namespace, labels)
    assert len(replica_sets) == 1, [rs["metadata"]["name"] for rs in replica_sets]
    [replica_set] = replica_sets
    # Its template is the user's: pinhook never saw it, so the Deployment controller finds
    # its ReplicaSet again on every sync instead of creating new ones.
    assert container_images(replica_set, "spec", "template", "spec", "containers") == [app.tag_ref]
    assert replica_set["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "1"
    assert not (deployment.get("status") or {}).get("collisionCount")
    cluster.no_new_replica_set(live.kube, live.namespace, labels, version, HOT_LOOP_S)
    metrics = scrape(live.pinhook)
    assert metrics.admissions("ReplicaSet", "CREATE") == 0
    assert metrics.admissions("Deployment", "CREATE") == 0


def test_the_pods_of_one_scale_up_are_answered_as_the_first_one_was(live: Live) -> None:
    """The API server sends the Pods of one ReplicaSet's scale-up as reviews alike but for
    their uid: one template, one manager, no name yet (generateName, named after admission),
    managed fields stamped to the second. pinhook answers them as it answered the second,
    the first whose answer it keeps (4 of 6 here, when written; at least one whatever seconds
    the scale-up spans, as long as the controller creates more than two Pods a second).
    """
    replicas = 6
    before = scrape(live.pinhook).value(ANSWERS_RECALLED)
    pods = _deployed_pods(live, "scale-up", replicas, {"app.kubernetes.io/name": "scale-up"})
    assert [container_images(p, "spec", "containers") for p in pods] == [
        [live.registry.pinned]
    ] * replicas
    assert scrape(live.pinhook).value(ANSWERS_RECALLED) - before >= 1


def _deployed_pods(
    live: Live, name: str, replicas: int, labels: dict[str, str]
) -> list[dict[str, Any]]:
    """The Pods the controller-manager creates for a new Deployment of the suite's image."""
    document = cluster.deployment(
        name, live.registry.app.tag_ref, live.namespace, replicas, labels=labels
    )
    live.kube.create(codecs.from_dict(document))
    return cluster.wait_for_pods(live.kube, live.namespace, labels, replicas, ROLLOUT_S)


# --- UPDATE -----------------------------------------------------------------------------


def test_update_pins_only_the_image_that_changed(live: Live) -> None:
    app = live.registry.app
    # Admitted with both tags unpinned (as when it was created while pinhook was down).
    document = cluster.pod("update", app.tag_ref, live.namespace)
    document["metadata"]["annotations"] = {"pinhook.dev/skip": "true"}
    second = {**document["spec"]["containers"][0], "name": "sidecar"}
    document["spec"]["containers"].append(second)
    stored = create(live, document)
    assert container_images(stored, "spec", "containers") == [app.tag_ref, app.tag_ref]

    before = scrape(live.pinhook).admissions("Pod", "UPDATE", "patched")
    patch = [
        {"op": "remove", "path": "/metadata/annotations/pinhook.dev~1skip"},
        {"op": "replace", "path": "/spec/containers/0/image", "value": moved_ref(app)},
    ]
    live.kube.patch(Pod, "update", patch, namespace=live.namespace, patch_type=PatchType.JSON)
    updated = cluster.as_dict(live.kube.get(Pod, "update", namespace=live.namespace))
    assert scrape(live.pinhook).admissions("Pod", "UPDATE", "patched") == before + 1
    # The changed image is rewritten and pinned; the untouched one keeps its tag, so an
    # unrelated update never re-pins (and restarts) a running container.
    assert container_images(updated, "spec", "containers") == [
        live.registry.pinned,
        app.tag_ref,
    ]


def test_kubectl_debug_ephemeral_container_is_pinned(live: Live, kubectl: Kubectl) -> None:
    app = live.registry.app
    create(live, cluster.pod("debugged", app.tag_ref, live.namespace))
    # kubectl debug adds the container through the pods/ephemeralcontainers subresource.
    args = ["debug", "-n", live.namespace, "debugged", "--image", app.tag_ref]
    result = kubectl.run(*args, "--container", "debugger", "--", "sleep", "1")
    assert result.returncode == 0, result.stderr
    debugged = cluster.as_dict(live.kube.get(Pod, "debugged", namespace=live.namespace))
    ephemeral = debugged["spec"]["ephemeralContainers"]
    assert [(c["name"], c["image"]) for c in ephemeral] == [("debugger", live.registry.pinned)]
    assert container_images(debugged, "spec", "containers") == [live.registry.pinned]


# --- reinvocation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def adder(live: Live, pinhook_setup: PinhookSetup) -> Iterator[AdderWebhook]:
    """A second mutating webhook, called after pinhook (its configuration's name sorts after
    pinhook's), that adds a container with a tag to Pods labelled for it."""
    name = f"{live.name}-adder"
    assert sorted([name, live.name]) == [live.name, name]
    tls = pinhook_setup.tls
    with AdderWebhook(tls, pinhook_setup.host, live.registry.app.tag_ref) as webhook:
        configuration = adder_configuration(name, webhook, tls.ca.read_bytes(), live.namespace)
        live.kube.create(codecs.from_dict(configuration))
        try:
            cluster.wait_until_stored(
                live.kube,
                lambda pod_name: labelled(live, pod_name, ADD_ANNOTATION),
                lambda stored: ADDED_ANNOTATION in (stored["metadata"].get("annotations") or {}),
                "the adder webhook was not called",
                prefix="adder-probe",
            )
            yield webhook
        finally:
            cluster.delete_webhook_configuration(live.kube, name)


def labelled(live: Live, name: str, how: str) -> dict[str, Any]:
    document = cluster.pod(name, live.registry.app.tag_ref, live.namespace)
    document["metadata"]["labels"][ADDER_LABEL] = how
    return document


def test_reinvocation_pins_a_container_added_after_pinhook(live: Live, adder: AdderWebhook) -> None:
    before = scrape(live.pinhook)
    stored = create(live, labelled(live, "reinvoked", ADD_CONTAINER))
    after = scrape(live.pinhook)

    containers = {c["name"]: c["image"] for c in stored["spec"]["containers"]}
    assert containers == {"app": live.registry.pinned, ADDED_CONTAINER: live.registry.pinned}
    assert [call.patched for call in adder.calls_for("reinvoked")] == [True]

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    # Called twice, each time with a patch: first the user's container, then (reinvoked,
    # reinvocationPolicy IfNeeded) the added one. The second call saw "app" already pinned
    # and left it: one image unchanged.
    assert (
        after.admissions("Pod", "CREATE", "patched") - before.admissions("Pod", "CREATE", "patched")
        == 2
    )
    assert after.admissions("Pod", "CREATE") - before.admissions("Pod", "CREATE") == 2
    assert (delta(IMAGES, outcome="pinned"), delta(IMAGES, outcome="unchanged")) == (2, 1)


def test_a_pinned_object_changed_by_another_webhook_is_not_patched_again(
    live: Live, adder: AdderWebhook
) -> None:
    before = scrape(live.pinhook)
    stored = create(live, labelled(live, "annotated", ADD_ANNOTATION))
    after = scrape(live.pinhook)

    assert stored["metadata"]["annotations"][ADDED_ANNOTATION] == "true"
    assert container_images(stored, "spec", "containers") == [live.registry.pinned]
    patched = after.admissions("Pod", "CREATE", "patched") - before.admissions(
        "Pod", "CREATE", "patched"
    )
    calls = after.admissions("Pod", "CREATE") - before.admissions("Pod", "CREATE")
    # The adder changed the object after pinhook, so the API server reinvokes pinhook, but
    # the object is all pinned now: its matchConditions keep it away (without them, pinhook
    # is called and answers with no patch).
    assert (patched, calls) == (1, 1 if live.match_conditions else 2), json.dumps(
        stored["metadata"]
    )

"""The backstop ValidatingAdmissionPolicy in a real API server.

pinhook is registered with ``failurePolicy: Ignore`` and ``pinhook install
--validating-policy``, then stopped: from then on the API server admits without pinhook, and
only the policy stands between an unpinned image and the store. requireDigest applies in one
namespace of the test's own (the policy's reach stays inside it), and in another in audit mode,
where neither pinhook nor the policy may deny. The API server compiles a new
policy a moment after it is written, with no event for it: the module probes until the policy
denies, as the suite does for webhooks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from lightkube import ApiError, Client
from lightkube.resources.core_v1 import Pod

from tests.e2e import cluster
from tests.e2e.cluster import Namespaces, container_images
from tests.e2e.conftest import E2ERegistry, PinhookSetup, webhook_installed
from tests.e2e.kubectl import Created, Kubectl
from tests.e2e.pinhook import REPO_ROOT, Pinhook, free_port, write_config

pytestmark = pytest.mark.e2e

NOT_PINNED: Final = "is not pinned to a digest (requireDigest)"
MANY: Final = 100  # containers, and as many init containers, in the cost test


@dataclass
class Backstop:
    kube: Client
    setup: PinhookSetup
    registry: E2ERegistry
    name: str  # of the webhook configuration, the policy and its binding
    namespace: str  # where requireDigest applies
    lenient: str  # where it does not
    audited: str  # where it does, in audit mode
    port: int  # where pinhook listened, and listens again when restarted
    config: Path

    @property
    def denied_by(self) -> str:
        return f"ValidatingAdmissionPolicy '{self.name}' with binding '{self.name}' denied request"

    def pinhook(self) -> Pinhook:
        return Pinhook(
            host=self.setup.host,
            config=self.config,
            tls=self.setup.tls,
            workdir=self.setup.workdir,
            port=self.port,
        )


@pytest.fixture(scope="module")
def backstop(
    kube: Client,
    crds: cluster.InstalledCrds,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
) -> Iterator[Backstop]:
    run = cluster.run_id()
    namespace = namespaces.create(f"pinhook-e2e-{run}-backstop")
    lenient = namespaces.create(f"pinhook-e2e-{run}-lenient")
    audited = namespaces.create(f"pinhook-e2e-{run}-audited")
    config = write_config(
        pinhook_setup.workdir / f"backstop-{run}.yaml",
        e2e_registry.host,
        require_digest_in=[namespace],
        audit_in=[audited],
    )
    name = f"pinhook-e2e-{run}-backstop"
    state = Backstop(
        kube, pinhook_setup, e2e_registry, name, namespace, lenient, audited, free_port(), config
    )
    app = e2e_registry.app
    # Stored unpinned before there was any policy: an object an UPDATE may still change.
    cluster.create_and_read_back(kube, cluster.pod("legacy", app.tag_ref, namespace))
    with (
        state.pinhook() as pinhook,
        webhook_installed(
            kube,
            pinhook_setup,
            name,
            url=pinhook.url,
            config=config,
            ca=pinhook_setup.tls.ca,
            failure_policy="Ignore",
            validating_policy=True,
        ),
    ):
        cluster.wait_until_webhook_called(kube, namespace, app.tag_ref, e2e_registry.pinned)
        pinhook.stop()
        assert pinhook.refuses_connections()
        cluster.wait_until_denied(
            kube,
            lambda probe: cluster.pod(probe, app.tag_ref, namespace),
            state.denied_by,
            prefix="backstop-probe",
        )
        yield state


def assert_denied(created: Created, backstop: Backstop, message: str) -> None:
    assert created.returncode != 0, created.stdout
    assert "Error from server (Forbidden)" in created.stderr, created.stderr
    assert f"{backstop.denied_by}: {message}" in created.stderr, created.stderr


def assert_not_stored(backstop: Backstop, name: str) -> None:
    with pytest.raises(ApiError) as missing:
        backstop.kube.get(Pod, name, namespace=backstop.namespace)
    assert missing.value.status.code == 404


def test_with_pinhook_stopped_an_unpinned_pod_is_denied_naming_the_field(
    backstop: Backstop, kubectl: Kubectl
) -> None:
    image = backstop.registry.app.tag_ref
    created = kubectl.create(cluster.pod("tagged", image, backstop.namespace))
    assert_denied(created, backstop, f"pinhook: Pod spec.containers[*].image: {image} {NOT_PINNED}")
    assert_not_stored(backstop, "tagged")


def test_with_pinhook_stopped_a_pinned_pod_is_admitted(backstop: Backstop) -> None:
    app = backstop.registry.app
    for name, image in (("pinned", backstop.registry.pinned), ("digest-only", app.digest_ref)):
        stored = cluster.create_and_read_back(
            backstop.kube, cluster.pod(name, image, backstop.namespace)
        )
        assert container_images(stored, "spec", "containers") == [image]


def test_an_inference_service_with_an_unpinned_predictor_is_denied(
    backstop: Backstop, kubectl: Kubectl
) -> None:
    image = backstop.registry.app.tag_ref
    created = kubectl.create(cluster.inference_service("tagged", image, backstop.namespace))
    field = "InferenceService spec.predictor.model.image"
    assert_denied(created, backstop, f"pinhook: {field}: {image} {NOT_PINNED}")
    pinned = cluster.inference_service("pinned", backstop.registry.pinned, backstop.namespace)
    stored = cluster.create_and_read_back(backstop.kube, pinned)
    assert stored["spec"]["predictor"]["model"]["image"] == backstop.registry.pinned


def test_only_where_require_digest_applies(backstop: Backstop) -> None:
    image = backstop.registry.app.tag_ref
    stored = cluster.create_and_read_back(
        backstop.kube, cluster.pod("tagged", image, backstop.lenient)
    )
    assert container_images(stored, "spec", "containers") == [image]


def test_not_where_pinhook_only_audits(backstop: Backstop) -> None:
    # requireDigest applies there, but audit mode promises never to deny: nor does the policy.
    image = backstop.registry.app.tag_ref
    stored = cluster.create_and_read_back(
        backstop.kube, cluster.pod("audited", image, backstop.audited)
    )
    assert container_images(stored, "spec", "containers") == [image]


def test_an_object_stored_before_the_policy_can_change_but_not_gain_a_tag(
    backstop: Backstop,
) -> None:
    kube, namespace = backstop.kube, backstop.namespace
    image = backstop.registry.app.tag_ref
    labelled = kube.patch(
        Pod, "legacy", {"metadata": {"labels": {"seen": "yes"}}}, namespace=namespace
    )
    assert container_images(cluster.as_dict(labelled), "spec", "containers") == [image]
    moved = f"{backstop.registry.host}/e2e/other:2.0"
    with pytest.raises(ApiError) as denied:
        kube.patch(Pod, "legacy", _image_patch(moved), namespace=namespace)
    assert denied.value.status.code == 403
    assert f"pinhook: Pod spec.containers[*].image: {moved} {NOT_PINNED}" in str(
        denied.value.status.message
    )
    pinned = kube.patch(Pod, "legacy", _image_patch(backstop.registry.pinned), namespace=namespace)
    assert container_images(cluster.as_dict(pinned), "spec", "containers") == [
        backstop.registry.pinned
    ]


def _image_patch(image: str) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "app", "image": image}]}}


def test_kubectl_debug_with_a_tag_is_denied(backstop: Backstop, kubectl: Kubectl) -> None:
    kube, namespace = backstop.kube, backstop.namespace
    cluster.create_and_read_back(kube, cluster.pod("debugged", backstop.registry.pinned, namespace))
    image = backstop.registry.app.tag_ref
    args = ["debug", "-n", namespace, "debugged", "--image", image, "--container", "debugger"]
    result = kubectl.run(*args, "--", "sleep", "1")
    assert result.returncode != 0, result.stdout
    field = "Pod spec.ephemeralContainers[*].image"
    assert f"{backstop.denied_by}: pinhook: {field}: {image} {NOT_PINNED}" in result.stderr
    debugged = cluster.as_dict(kube.get(Pod, "debugged", namespace=namespace))
    assert not debugged["spec"].get("ephemeralContainers")


def test_a_pod_of_many_images_stays_within_the_cost_budget(
    backstop: Backstop, kubectl: Kubectl
) -> None:
    # The API server stops a policy over its CEL cost budget with an error, which under
    # failurePolicy Fail denies: a large Pod must be checked, not refused for its size.
    pinned = backstop.registry.pinned
    document = _many("many", pinned, backstop.namespace)
    stored = cluster.create_and_read_back(backstop.kube, document)
    assert container_images(stored, "spec", "initContainers") == [pinned] * MANY
    tagged = _many("many-tagged", pinned, backstop.namespace)
    image = backstop.registry.app.tag_ref
    tagged["spec"]["initContainers"][-1]["image"] = image
    created = kubectl.create(tagged)
    assert_denied(created, backstop, f"pinhook: Pod spec.initContainers[*].image: {image}")


def _many(name: str, image: str, namespace: str) -> dict[str, Any]:
    document = cluster.pod(name, image, namespace)
    container = document["spec"]["containers"][0]
    document["spec"]["containers"] = [container | {"name": f"c{i}"} for i in range(MANY)]
    document["spec"]["initContainers"] = [container | {"name": f"i{i}"} for i in range(MANY)]
    return document


def test_with_pinhook_up_it_pins_first_and_the_policy_lets_it_through(
    backstop: Backstop,
) -> None:
    registry, namespace = backstop.registry, backstop.namespace
    with backstop.pinhook():
        # Mutating admission runs before validating: the tag is pinned, then admitted.
        cluster.wait_until_webhook_called(
            backstop.kube, namespace, registry.app.tag_ref, registry.pinned, prefix="up"
        )
        # requireDigest applies here: the skip annotation opts nothing out (skipAnnotation:
        # auto), neither from pinhook nor from the policy.
        skipped = cluster.pod("skipped", registry.app.tag_ref, namespace)
        skipped["metadata"]["annotations"] = {"pinhook.dev/skip": "true"}
        stored = cluster.create_and_read_back(backstop.kube, skipped)
        assert container_images(stored, "spec", "containers") == [registry.pinned]


@pytest.mark.parametrize(
    "path",
    [
        "manifests/components/enforce/validating-policy.yaml",
        "manifests/components/enforce/webhook-fail.yaml",
        "manifests/components/workloads/webhook-workloads.yaml",
        "manifests/base/mutatingwebhookconfiguration.yaml",
    ],
)
def test_the_checked_in_manifests_are_accepted_by_the_api_server(
    kubectl: Kubectl, path: str
) -> None:
    # Client-side apply, as `kubectl apply -k` does: the API server validates every object,
    # and the last-applied annotation keeps each whole (at most 256 KiB).
    result = kubectl.run("apply", "--dry-run=server", "-f", str(REPO_ROOT / path))
    assert result.returncode == 0, result.stderr
    assert "(server dry run)" in result.stdout

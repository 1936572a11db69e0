"""The enforce component's lane: failurePolicy Fail, requireDigest and onFailure deny.

What the user sees is kubectl's message, so the creates go through the built kubectl and the
assertions read its stderr. The hanging registry checks that the denial is pinhook's answer,
given before the API server's timeout, and not the API server giving up on the call (which
under failurePolicy Fail would also refuse the Pod, with another message).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import pytest
from lightkube import ApiError, Client
from lightkube.resources.core_v1 import Pod

from tests.e2e import cluster
from tests.e2e.cluster import Namespaces
from tests.e2e.conftest import E2ERegistry, PinhookSetup, registered_pinhook
from tests.e2e.kubectl import Created, Kubectl
from tests.e2e.metrics import scrape
from tests.e2e.pinhook import Pinhook, write_config
from tests.e2e.servers import HangingRegistry

pytestmark = pytest.mark.e2e

WEBHOOK_TIMEOUT_S: Final = 10  # timeoutSeconds of every webhook pinhook installs
LOOKUP_TIMEOUT_S: Final = 30  # longer than the API server waits: see test_deadline.py
DENIED: Final = 'admission webhook "pods.pinhook.dev" denied the request: pinhook: cannot pin'


@dataclass(frozen=True)
class Lane:
    kube: Client
    namespace: str
    pinhook: Pinhook
    registry: E2ERegistry
    hanging: HangingRegistry


@pytest.fixture(scope="module")
def lane(
    kube: Client,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
    hanging_registry: HangingRegistry,
) -> Iterator[Lane]:
    run = cluster.run_id()
    namespace = namespaces.create(f"pinhook-e2e-{run}-enforce")
    config = write_config(
        pinhook_setup.workdir / f"enforce-{run}.yaml",
        e2e_registry.host,
        more_hosts=[hanging_registry.host],
        timeout_seconds=LOOKUP_TIMEOUT_S,
        enforce=True,
    )
    name = f"pinhook-e2e-{run}-enforce"
    with registered_pinhook(kube, pinhook_setup, name, "Fail", config=config) as pinhook:
        webhooks = cluster.get_webhook_configuration(kube, name)["webhooks"]
        assert {hook["failurePolicy"] for hook in webhooks} == {"Fail"}
        # What can be pinned still is, which also shows the webhook is live.
        app = e2e_registry.app
        cluster.wait_until_webhook_called(kube, namespace, app.tag_ref, e2e_registry.pinned)
        yield Lane(kube, namespace, pinhook, e2e_registry, hanging_registry)


def assert_not_stored(lane: Lane, name: str) -> None:
    with pytest.raises(ApiError) as missing:
        lane.kube.get(Pod, name, namespace=lane.namespace)
    assert missing.value.status.code == 404


def assert_denied_by_pinhook(created: Created, image: str) -> None:
    assert created.returncode != 0, created.stdout
    assert "Error from server (Forbidden)" in created.stderr, created.stderr
    assert f"{DENIED} {image} (/spec/containers/0/image)" in created.stderr, created.stderr


def test_unresolvable_image_is_refused_with_the_image_and_the_reason(
    lane: Lane, kubectl: Kubectl
) -> None:
    missing = f"{lane.registry.host}/e2e/missing:1.0"
    before = scrape(lane.pinhook).admissions("Pod", "CREATE", "denied")
    created = kubectl.create(cluster.pod("missing", missing, lane.namespace))
    assert_denied_by_pinhook(created, missing)
    assert "not found" in created.stderr, created.stderr
    assert scrape(lane.pinhook).admissions("Pod", "CREATE", "denied") == before + 1
    assert_not_stored(lane, "missing")


def test_hanging_registry_is_refused_by_pinhook_before_the_api_server_times_out(
    lane: Lane, kubectl: Kubectl
) -> None:
    image = f"{lane.hanging.host}/e2e/app:1.0"
    connections = lane.hanging.connections()
    created = kubectl.create(cluster.pod("hanging", image, lane.namespace))
    assert created.seconds < WEBHOOK_TIMEOUT_S, created
    # pinhook's denial, not the API server's "failed calling webhook ... deadline exceeded".
    assert_denied_by_pinhook(created, image)
    assert "failed calling webhook" not in created.stderr, created.stderr
    assert "deadline" in created.stderr, created.stderr
    assert lane.hanging.connections() > connections
    assert_not_stored(lane, "hanging")

"""A registry that hangs, under failurePolicy Ignore: pinhook answers inside the API server's
timeout and the object is admitted unpinned.

The API server calls pinhook with ``?timeout=10s`` (the webhook's timeoutSeconds) and gives up
after that. Here pinhook's config allows 30 s per lookup, longer than the API server waits, so
an answer in time shows that pinhook took its deadline from the API server's query. An API
server that gave up would admit the Pod too (failurePolicy Ignore), so the test also looks for
pinhook's warning, which only its own answer carries. The enforce lane is in test_enforce.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Pod

from tests.e2e import cluster
from tests.e2e.cluster import Namespaces, container_images
from tests.e2e.conftest import E2ERegistry, PinhookSetup, registered_pinhook
from tests.e2e.kubectl import Kubectl
from tests.e2e.metrics import scrape
from tests.e2e.pinhook import Pinhook, write_config
from tests.e2e.servers import HangingRegistry

pytestmark = pytest.mark.e2e

WEBHOOK_TIMEOUT_S: Final = 10  # timeoutSeconds of every webhook pinhook installs
LOOKUP_TIMEOUT_S: Final = 30  # registry.timeoutSeconds: longer than the API server waits


@dataclass(frozen=True)
class Lane:
    kube: Client
    namespace: str
    pinhook: Pinhook
    hanging: HangingRegistry

    @property
    def image(self) -> str:
        return f"{self.hanging.host}/e2e/app:1.0"


@pytest.fixture(scope="module")
def lane(
    kube: Client,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
    hanging_registry: HangingRegistry,
) -> Iterator[Lane]:
    run = cluster.run_id()
    namespace = namespaces.create(f"pinhook-e2e-{run}-deadline")
    config = write_config(
        pinhook_setup.workdir / f"deadline-{run}.yaml",
        e2e_registry.host,
        more_hosts=[hanging_registry.host],
        timeout_seconds=LOOKUP_TIMEOUT_S,
    )
    name = f"pinhook-e2e-{run}-deadline"
    with registered_pinhook(kube, pinhook_setup, name, config=config) as pinhook:
        webhooks = cluster.get_webhook_configuration(kube, name)["webhooks"]
        assert {hook["timeoutSeconds"] for hook in webhooks} == {WEBHOOK_TIMEOUT_S}
        app = e2e_registry.app
        cluster.wait_until_webhook_called(kube, namespace, app.tag_ref, e2e_registry.pinned)
        yield Lane(kube, namespace, pinhook, hanging_registry)


def test_hanging_registry_is_answered_in_time_and_admitted_unpinned(
    lane: Lane, kubectl: Kubectl
) -> None:
    before = scrape(lane.pinhook).admissions("Pod", "CREATE", "unchanged")
    connections = lane.hanging.connections()
    created = kubectl.create(cluster.pod("hanging", lane.image, lane.namespace))

    assert created.returncode == 0, created.stderr
    assert created.seconds < WEBHOOK_TIMEOUT_S, created
    # pinhook's own answer reached the user: its warning names the image and the reason.
    assert f"Warning: pinhook: {lane.image} not pinned" in created.stderr, created.stderr
    assert "deadline" in created.stderr or "timed out" in created.stderr, created.stderr
    assert scrape(lane.pinhook).admissions("Pod", "CREATE", "unchanged") == before + 1
    assert lane.hanging.connections() > connections  # the wait was the registry's
    stored = cluster.as_dict(lane.kube.get(Pod, "hanging", namespace=lane.namespace))
    assert container_images(stored, "spec", "containers") == [lane.image]

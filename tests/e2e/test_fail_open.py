"""failurePolicy Ignore: a stopped pinhook never blocks a create.

Its own pinhook and webhook configuration, stopped mid-test, so nothing else depends on them.
"""

from __future__ import annotations

import time

import pytest
from lightkube import Client

from tests.e2e import cluster
from tests.e2e.cluster import Namespaces, container_images
from tests.e2e.conftest import E2ERegistry, PinhookSetup, registered_pinhook

pytestmark = pytest.mark.e2e

# The API server fails a call to a closed port at once; even an address that drops packets
# only costs the webhook's timeoutSeconds (10) before the request is admitted.
ADMIT_WITHIN_S = 15.0


def test_stopped_pinhook_with_failure_policy_ignore_admits_unpinned(
    kube: Client,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
) -> None:
    run = cluster.run_id()
    namespace = namespaces.create(f"pinhook-e2e-{run}-failopen")
    name = f"pinhook-e2e-{run}-failopen"
    app = e2e_registry.app
    with registered_pinhook(kube, pinhook_setup, name, failure_policy="Ignore") as pinhook:
        webhooks = cluster.get_webhook_configuration(kube, name)["webhooks"]
        assert webhooks and {hook["failurePolicy"] for hook in webhooks} == {"Ignore"}
        # First it is called, so the unpinned Pod below means "admitted without pinhook".
        cluster.wait_until_webhook_called(kube, namespace, app.tag_ref, e2e_registry.pinned)
        pinhook.stop()
        assert pinhook.refuses_connections()
        started = time.monotonic()
        stored = cluster.create_and_read_back(kube, cluster.pod("unpinned", app.tag_ref, namespace))
        assert time.monotonic() - started < ADMIT_WITHIN_S
    assert container_images(stored, "spec", "containers") == [app.tag_ref]

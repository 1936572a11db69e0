"""The admission.k8s.io/v1beta1 lane: an API server that speaks only v1beta1 to pinhook.

pinhook installs ``admissionReviewVersions: ["v1", "v1beta1"]`` and the API server picks v1.
The test narrows the list to v1beta1 and puts a recording proxy between the API server and
pinhook, since pinhook itself does not record which version it was sent: the proxy shows
that the API server sent v1beta1, that pinhook answered v1beta1, and the stored Pod shows that
the API server applied that answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import pytest
from lightkube import Client

from tests.e2e import cluster
from tests.e2e.cluster import Namespaces, container_images
from tests.e2e.conftest import E2ERegistry, PinhookSetup, running_pinhook, webhook_installed
from tests.e2e.servers import Exchange, RecordingProxy

pytestmark = pytest.mark.e2e

V1: Final = "admission.k8s.io/v1"
V1BETA1: Final = "admission.k8s.io/v1beta1"


@dataclass(frozen=True)
class Proxied:
    kube: Client
    namespace: str
    registry: E2ERegistry
    proxy: RecordingProxy
    name: str

    def exchange_for(self, pod: str) -> Exchange | None:
        found = [
            exchange
            for exchange in self.proxy.exchanged()
            if exchange.request["request"]["object"]["metadata"]["name"] == pod
        ]
        return found[-1] if found else None


@pytest.fixture(scope="module")
def proxied(
    kube: Client,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
) -> Iterator[Proxied]:
    run = cluster.run_id()
    namespace = namespaces.create(f"pinhook-e2e-{run}-v1beta1")
    name = f"pinhook-e2e-{run}-v1beta1"
    with (
        running_pinhook(pinhook_setup) as pinhook,
        RecordingProxy(pinhook_setup.tls, pinhook_setup.host, pinhook.port) as proxy,
        webhook_installed(
            kube, pinhook_setup, name, url=proxy.url("/mutate"), ca=pinhook_setup.tls.ca
        ),
    ):
        app = e2e_registry.app
        cluster.wait_until_webhook_called(kube, namespace, app.tag_ref, e2e_registry.pinned)
        yield Proxied(kube, namespace, e2e_registry, proxy, name)


def test_v1beta1_reviews_are_answered_in_v1beta1_and_applied(proxied: Proxied) -> None:
    # As installed, the API server prefers v1.
    assert {exchange.request["apiVersion"] for exchange in proxied.proxy.exchanged()} == {V1}
    cluster.patch_webhooks(proxied.kube, proxied.name, "/admissionReviewVersions", ["v1beta1"])
    pinned = proxied.registry.pinned

    def pinned_through_v1beta1(stored: dict[str, Any]) -> bool:
        # Until the API server has read the patched configuration, it still sends v1.
        exchange = proxied.exchange_for(stored["metadata"]["name"])
        assert exchange is not None, "the API server did not call pinhook"
        sent_v1beta1 = exchange.request["apiVersion"] == V1BETA1
        return sent_v1beta1 and container_images(stored, "spec", "containers") == [pinned]

    stored = cluster.wait_until_stored(
        proxied.kube,
        lambda name: cluster.pod(name, proxied.registry.app.tag_ref, proxied.namespace),
        pinned_through_v1beta1,
        "no Pod was pinned through a v1beta1 AdmissionReview",
        prefix="v1beta1",
    )
    exchange = proxied.exchange_for(stored["metadata"]["name"])
    assert exchange is not None
    # Answered in the version it was asked in, for the same request, with the patch.
    assert exchange.response["apiVersion"] == V1BETA1
    assert exchange.response["kind"] == "AdmissionReview"
    response = exchange.response["response"]
    assert response["uid"] == exchange.request["request"]["uid"]
    assert (response["allowed"], response["patchType"]) == (True, "JSONPatch")

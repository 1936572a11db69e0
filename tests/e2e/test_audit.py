"""Audit mode through the real API server: the user is told what pin would do, nothing is
changed, and nothing is denied even where requireDigest is set."""

from __future__ import annotations

import pytest
from lightkube import Client
from lightkube.resources.core_v1 import Pod

from tests.e2e import cluster
from tests.e2e.cluster import Namespaces, container_images
from tests.e2e.conftest import E2ERegistry, PinhookSetup, registered_pinhook
from tests.e2e.kubectl import Kubectl
from tests.e2e.metrics import scrape
from tests.e2e.pinhook import config_text

pytestmark = pytest.mark.e2e


def test_audit_namespace_is_told_and_left_alone(
    kube: Client,
    kubectl: Kubectl,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
) -> None:
    run = cluster.run_id()
    pinned_ns = namespaces.create(f"pinhook-e2e-{run}-pin")
    audited_ns = namespaces.create(f"pinhook-e2e-{run}-audit")
    config = pinhook_setup.workdir / f"audit-{run}.yaml"
    config.write_text(
        config_text(e2e_registry.host)
        + f"namespaces:\n  {audited_ns}: {{mode: audit, requireDigest: true}}\n"
    )
    app = e2e_registry.app
    name = f"pinhook-e2e-{run}-audit"
    with registered_pinhook(kube, pinhook_setup, name, config=config) as pinhook:
        # Live: a Pod in the other namespace is pinned.
        cluster.wait_until_webhook_called(kube, pinned_ns, app.tag_ref, e2e_registry.pinned)
        before = scrape(pinhook).admissions("Pod", "CREATE", "audited")

        created = kubectl.create(cluster.pod("audited", app.tag_ref, audited_ns))
        assert created.returncode == 0, created.stderr
        would = f"pinhook (audit mode): would change {app.tag_ref} -> {e2e_registry.pinned}"
        assert would in created.stderr, created.stderr
        stored = cluster.as_dict(kube.get(Pod, "audited", namespace=audited_ns))
        assert container_images(stored, "spec", "containers") == [app.tag_ref]

        missing = f"{e2e_registry.host}/e2e/app:missing"
        kept = kubectl.create(cluster.pod("missing", missing, audited_ns))
        assert kept.returncode == 0, kept.stderr  # requireDigest, yet audit never denies
        assert "pinhook (audit mode): would deny:" in kept.stderr, kept.stderr
        assert scrape(pinhook).admissions("Pod", "CREATE", "audited") == before + 2
        log = pinhook.log()
        assert '"outcome":"audited"' in log or "outcome=audited" in log

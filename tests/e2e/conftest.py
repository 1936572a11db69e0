"""Fixtures of the end-to-end suite. Every one starts from ``kube``, so that without a cluster
the tests skip before anything is started or written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

import httpx
import pytest
from lightkube import Client

from tests.e2e import cluster
from tests.e2e.cluster import InstalledCrds, Namespaces, NoCluster
from tests.e2e.kubectl import Kubectl
from tests.e2e.pinhook import HostNotSet, Pinhook, Tls, e2e_host, generate_certs, write_config
from tests.e2e.pinhook import install as install_webhook
from tests.e2e.pinhook import uninstall as uninstall_webhook
from tests.e2e.servers import HangingRegistry
from tests.harness.fixtures import require_registry
from tests.harness.push import PushedImage, push_index
from tests.harness.registry import RunningRegistry

REQUIRED_ENV: Final = "PINHOOK_E2E_REQUIRED"
APP_REPO = "e2e/app"
APP_TAG = "1.0"


@dataclass(frozen=True)
class E2ERegistry:
    host: str
    app: PushedImage  # a two-platform index under e2e/app:1.0

    @property
    def pinned(self) -> str:
        """What pinhook stores for ``app.tag_ref``: the tag kept, the index digest added."""
        return f"{self.app.tag_ref}@{self.app.digest}"


@dataclass(frozen=True)
class PinhookSetup:
    kubeconfig: Path
    host: str
    config: Path
    tls: Tls
    workdir: Path


def _unavailable(reason: str) -> NoReturn:
    """Skip, or fail where the suite must run (``PINHOOK_E2E_REQUIRED=1``, set by scripts/test):
    in CI a skipped e2e suite would pass while proving nothing."""
    if os.environ.get(REQUIRED_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRED_ENV}=1: the e2e suite must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kubeconfig() -> Path:
    """The first file of $KUBECONFIG; the suite skips, saying why, when there is none."""
    try:
        return cluster.kubeconfig_path()
    except NoCluster as reason:
        _unavailable(f"no Kubernetes cluster for the e2e suite: {reason}")


@pytest.fixture(scope="session")
def kube(kubeconfig: Path) -> Iterator[Client]:
    """A client for that cluster, once its API server answered within a few seconds."""
    try:
        client = cluster.connect(kubeconfig)
    except NoCluster as reason:
        _unavailable(f"no Kubernetes cluster for the e2e suite: {reason}")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def api_host(kube: Client) -> str:
    try:
        return e2e_host()
    except HostNotSet as reason:
        _unavailable(str(reason))


@pytest.fixture(scope="session")
def crds(kube: Client, api_host: str) -> Iterator[InstalledCrds]:
    """Needs ``api_host`` only so that the suite skips before writing to the cluster."""
    installed = InstalledCrds()
    try:
        cluster.install_crds(kube, installed)
        yield installed
    finally:
        cluster.delete_crds(kube, installed.applied)


@pytest.fixture(scope="session")
def e2e_registry(kube: Client, api_host: str) -> Iterator[E2ERegistry]:
    require_registry()
    with (
        RunningRegistry("none") as registry,
        httpx.Client(base_url=registry.url, timeout=10.0) as client,
    ):
        yield E2ERegistry(registry.host, push_index(client, APP_REPO, APP_TAG))


@pytest.fixture(scope="session")
def pinhook_setup(
    kubeconfig: Path,
    api_host: str,
    e2e_registry: E2ERegistry,
    tmp_path_factory: pytest.TempPathFactory,
) -> PinhookSetup:
    workdir = tmp_path_factory.mktemp("pinhook-e2e")
    ca = generate_certs(workdir / "certs", api_host)
    tls = Tls(ca=ca, cert=ca.parent / "tls.crt", key=ca.parent / "tls.key")
    config = write_config(workdir / "config.yaml", e2e_registry.host)
    return PinhookSetup(kubeconfig, api_host, config, tls, workdir)


@pytest.fixture(scope="module")
def namespaces(kube: Client) -> Iterator[Namespaces]:
    made = Namespaces(kube)
    try:
        yield made
    finally:
        made.delete_all()


@contextlib.contextmanager
def running_pinhook(setup: PinhookSetup, config: Path | None = None) -> Iterator[Pinhook]:
    """``pinhook serve`` with the suite's certificate and ``config`` (default: the suite's)."""
    with Pinhook(
        host=setup.host, config=config or setup.config, tls=setup.tls, workdir=setup.workdir
    ) as pinhook:
        yield pinhook


@contextlib.contextmanager
def webhook_installed(
    kube: Client,
    setup: PinhookSetup,
    name: str,
    *,
    url: str,
    config: Path | None = None,
    ca: Path | None = None,
    failure_policy: str = "Ignore",
    validating_policy: bool = False,
) -> Iterator[None]:
    """``pinhook install --url url`` as configuration ``name`` (and the backstop policy and
    its binding of that name, with ``validating_policy``); deleted afterwards."""
    try:
        install_webhook(
            url=url,
            ca=ca,
            name=name,
            config=config or setup.config,
            kubeconfig=setup.kubeconfig,
            failure_policy=failure_policy,
            validating_policy=validating_policy,
        )
        yield
    finally:
        removed = uninstall_webhook(name, kubeconfig=setup.kubeconfig)
        if removed.returncode != 0:
            # Never leave a webhook pointing at a stopped server, or a policy, behind.
            cluster.delete_webhook_configuration(kube, name)
            cluster.delete_validating_policy(kube, name)


@contextlib.contextmanager
def registered_pinhook(
    kube: Client,
    setup: PinhookSetup,
    name: str,
    failure_policy: str = "Ignore",
    *,
    config: Path | None = None,
) -> Iterator[Pinhook]:
    """``pinhook serve`` registered as webhook configuration ``name``; both gone afterwards."""
    with (
        running_pinhook(setup, config) as pinhook,
        webhook_installed(
            kube,
            setup,
            name,
            url=pinhook.url,
            config=config,
            ca=pinhook.tls.ca,
            failure_policy=failure_policy,
        ),
    ):
        yield pinhook


@pytest.fixture(scope="session")
def kubectl(kubeconfig: Path) -> Kubectl:
    """The kubectl on PATH (scripts/test puts the one built with the control plane there)."""
    try:
        return Kubectl.find(kubeconfig)
    except FileNotFoundError as reason:
        _unavailable(str(reason))


@pytest.fixture(scope="session")
def hanging_registry(api_host: str) -> Iterator[HangingRegistry]:
    """A registry on loopback that accepts connections and never answers."""
    with HangingRegistry() as registry:
        yield registry

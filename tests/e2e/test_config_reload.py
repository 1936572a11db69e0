"""Config reload as a cluster does it: the kubelet swaps a ConfigMap volume's ``..data`` symlink,
and pinhook follows without a restart.

pinhook runs on this machine and reads a file, so the test plays the kubelet: each edit is a
new timestamped directory put in place by renaming a symlink over ``..data`` (atomic), with
``config.yaml`` a symlink through it. There is no event for "pinhook reloaded": the new rule
is probed with Pods (bounded), the rejection read from pinhook's metrics.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from lightkube import Client

from tests.e2e import cluster
from tests.e2e.cluster import Namespaces, container_images
from tests.e2e.conftest import E2ERegistry, PinhookSetup, registered_pinhook
from tests.e2e.metrics import CONFIG_RELOADS, CONFIG_VALID, scrape
from tests.e2e.pinhook import Pinhook, config_text

pytestmark = pytest.mark.e2e

# pinhook polls its config every 2 s; "within seconds" is bounded here.
RELOAD_S: Final = 10.0
INVALID: Final = "rewrites: not-a-list\n"


class ConfigVolume:
    """A directory laid out and updated as the kubelet does a ConfigMap volume."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._versions = itertools.count()
        directory.mkdir(parents=True)

    @property
    def path(self) -> Path:
        return self.directory / "config.yaml"

    def write(self, text: str) -> None:
        data, staging = self.directory / "..data", self.directory / "..data_tmp"
        previous = data.resolve() if data.is_symlink() else None
        version = self.directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{next(self._versions)}"
        version.mkdir()
        (version / "config.yaml").write_text(text)
        staging.symlink_to(version.name)
        os.replace(staging, data)  # the one atomic step a reader can observe
        if not self.path.is_symlink():
            self.path.symlink_to("..data/config.yaml")
        if previous is not None:
            shutil.rmtree(previous)


@dataclass(frozen=True)
class Reloading:
    kube: Client
    namespace: str
    registry: E2ERegistry
    pinhook: Pinhook
    volume: ConfigVolume

    def alias(self, name: str) -> tuple[str, str]:
        """An image the registry does not have, and the source of a rule moving it to e2e/app.

        Outside e2e/, which the suite's MOVED_PREFIX rule writes to: pinhook rejects a map in
        which one rule's output would be rewritten again by another.
        """
        host = self.registry.host
        return f"{host}/aliases/{name}:1.0", f"{host}/aliases/{name}"

    def rules(self, *aliases: str) -> str:
        moves = [(self.alias(alias)[1], f"{self.registry.host}/e2e/app") for alias in aliases]
        return config_text(self.registry.host, more_rules=moves)

    def stored_image(self, image: str) -> str:
        document = cluster.pod(f"image-{cluster.run_id()}", image, self.namespace)
        [stored] = container_images(
            cluster.create_and_read_back(self.kube, document), "spec", "containers"
        )
        return stored

    def wait_until_moved(self, image: str) -> float:
        """Seconds until a Pod with ``image`` is stored moved and pinned."""
        started = time.monotonic()
        pinned = self.registry.pinned

        def moved(stored: dict[str, Any]) -> bool:
            return container_images(stored, "spec", "containers") == [pinned]

        try:
            cluster.wait_until_stored(
                self.kube,
                lambda name: cluster.pod(name, image, self.namespace),
                moved,
                f"the rule for {image} did not take effect",
                prefix=f"reload-{cluster.run_id()}",
                seconds=RELOAD_S,
            )
        except AssertionError as failure:
            raise AssertionError(f"{failure}\npinhook's log:\n{self.pinhook.log()}") from None
        return time.monotonic() - started


@pytest.fixture(scope="module")
def reloading(
    kube: Client,
    e2e_registry: E2ERegistry,
    pinhook_setup: PinhookSetup,
    namespaces: Namespaces,
) -> Iterator[Reloading]:
    run = cluster.run_id()
    namespace = namespaces.create(f"pinhook-e2e-{run}-reload")
    volume = ConfigVolume(pinhook_setup.workdir / f"reload-{run}")
    volume.write(config_text(e2e_registry.host))
    name = f"pinhook-e2e-{run}-reload"
    with registered_pinhook(kube, pinhook_setup, name, config=volume.path) as pinhook:
        app = e2e_registry.app
        cluster.wait_until_webhook_called(kube, namespace, app.tag_ref, e2e_registry.pinned)
        yield Reloading(kube, namespace, e2e_registry, pinhook, volume)


def test_a_rule_added_to_the_mounted_config_applies_within_seconds(reloading: Reloading) -> None:
    image, _ = reloading.alias("added")
    # No rule yet: the repository does not exist, so the tag stays as it came.
    assert reloading.stored_image(image) == image
    before = scrape(reloading.pinhook).value(CONFIG_RELOADS, result="applied")
    reloading.volume.write(reloading.rules("added"))
    assert reloading.wait_until_moved(image) <= RELOAD_S
    assert scrape(reloading.pinhook).value(CONFIG_RELOADS, result="applied") == before + 1


def test_an_invalid_edit_is_rejected_and_the_last_good_rules_keep_working(
    reloading: Reloading,
) -> None:
    image, _ = reloading.alias("kept")
    reloading.volume.write(reloading.rules("kept"))
    reloading.wait_until_moved(image)
    rejected = scrape(reloading.pinhook).value(CONFIG_RELOADS, result="rejected")

    reloading.volume.write(INVALID)

    def seen_and_rejected() -> bool | None:
        metrics = scrape(reloading.pinhook)
        done = metrics.value(CONFIG_RELOADS, result="rejected") == rejected + 1
        return True if done and metrics.value(CONFIG_VALID) == 0 else None

    cluster.poll_until("pinhook rejected the invalid config", RELOAD_S, seen_and_rejected)
    assert reloading.stored_image(image) == reloading.registry.pinned
    readiness = reloading.pinhook.get_over_tls("/readyz", reloading.pinhook.tls.ca)
    # Still ready (every replica sees the same file), saying why the config was not taken.
    assert readiness.startswith(b"HTTP/1.1 200"), readiness
    assert b"a newer one was rejected" in readiness and b"rewrites" in readiness, readiness

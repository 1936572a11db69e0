"""Three real ``pinhook serve`` processes behind no load balancer but the test itself, sharing
one real redis-server and one real registry behind the counting proxy: what a Deployment with
three replicas and the redis component looks like to the API server."""

from __future__ import annotations

import asyncio
import base64
import os
import queue
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.harness.fixtures import RegistryEnv
from tests.harness.proxy import CountingProxy
from tests.harness.redisserver import RunningRedis
from tests.harness.registry import free_port
from tests.reviews import review
from webhook import certs
from webhook.certs import CertPaths

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "fleet-password"


class Replica:
    """One ``pinhook serve`` subprocess; its log lines are readable as events."""

    def __init__(self, config: Path, paths: CertPaths, env: dict[str, str]) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.lines: queue.Queue[str] = queue.Queue()
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "webhook.cli", "serve", "--port", str(self.port),
                "--config", str(config), "--cert", str(paths.cert), "--key", str(paths.key),
                "--kube", "off", "--metrics-port", str(self.metrics_port),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} in log: {''.join(seen)}") from None
            seen.append(line)
            if text in line:
                return

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


@pytest.fixture
def replicas(
    registry_proxy: CountingProxy, tmp_path: Path
) -> Iterator[tuple[list[Replica], CertPaths]]:
    paths = certs.ensure_self_signed(tmp_path / "certs")
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD)
    host = registry_proxy.host
    with ExitStack() as stack:
        server = stack.enter_context(RunningRedis(password=PASSWORD))
        config = tmp_path / "config.yaml"
        config.write_text(
            f'registry:\n  insecure: ["{host}"]\n  allowedHosts: ["{host}"]\n'
            "  timeoutSeconds: 5\n"
            f"cache:\n  redis:\n    url: redis://127.0.0.1:{server.port}/0\n"
            f"    passwordFile: {secret}\n    timeoutSeconds: 1\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PINHOOK_", "KUBE"))}
        fleet = [Replica(config, paths, env) for _ in range(3)]
        for replica in fleet:
            stack.callback(replica.stop)
        for replica in fleet:
            replica.wait_for("pinhook listening on")
        yield fleet, paths


def pod(image: str, i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"web-{i}"},
        "spec": {"containers": [{"name": "web", "image": image}]},
    }


def stored_image(answer: dict[str, Any], obj: dict[str, Any]) -> str:
    response = answer["response"]
    assert response["allowed"], response
    if "patch" not in response:
        image: str = obj["spec"]["containers"][0]["image"]
        return image
    patch = orjson.loads(base64.b64decode(response["patch"]))
    (op,) = [op for op in patch if op["path"] == "/spec/containers/0/image"]
    image = op["value"]
    return image


async def test_three_processes_one_registry_request_one_digest(
    registry: RegistryEnv,
    registry_proxy: CountingProxy,
    replicas: tuple[list[Replica], CertPaths],
) -> None:
    fleet, paths = replicas
    first = registry.push.index("scale/web", "1.0")
    image = f"{registry_proxy.host}/scale/web:1.0"
    tls = ssl.create_default_context(cafile=paths.ca_cert)
    clients = [httpx.AsyncClient(base_url=r.url, verify=tls, timeout=30) for r in fleet]
    try:

        async def admit(i: int) -> str:
            obj = pod(image, i)
            answer = await clients[i % 3].post(
                "/mutate?timeout=10s", content=orjson.dumps(review(obj))
            )
            assert answer.status_code == 200, answer.text
            return stored_image(answer.json(), obj)

        registry_proxy.reset()
        registry_proxy.hold()  # the first lookup waits at the registry while the rest arrive
        admissions = [asyncio.create_task(admit(i)) for i in range(200)]
        await asyncio.to_thread(registry_proxy.wait_for_count, 1, "HEAD", "/manifests/")
        registry_proxy.release()
        images = await asyncio.gather(*admissions)
        assert set(images) == {f"{image}@{first.digest}"}
        assert registry_proxy.count(None, "/manifests/") == 1

        # The tag moves: every process still gives the fleet's answer, the registry is not asked.
        registry.push.move_tag(first)
        again = await asyncio.gather(*(admit(i) for i in range(3)))
        assert set(again) == {f"{image}@{first.digest}"}
        assert registry_proxy.count(None, "/manifests/") == 1

        for client, replica in zip(clients, fleet, strict=True):
            ready = (await client.get("/readyz")).json()
            assert ready["ready"] is True and ready["reason"].endswith(": in use"), ready
            assert PASSWORD not in ready["reason"]
            metrics = (await client.get(f"http://127.0.0.1:{replica.metrics_port}/metrics")).text
            assert "pinhook_shared_cache_breaker_state 0.0" in metrics
            assert 'pinhook_shared_cache_operations_total{operation="recall"' in metrics
    finally:
        for client in clients:
            await client.aclose()

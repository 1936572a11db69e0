"""`pinhook serve --self-managed --kube on` as a Deployment runs it, against the loopback API.

There is no real kube-apiserver on this machine; tests/fake_apiserver.py speaks the parts of
the API pinhook uses (Secrets, ServiceAccounts, MutatingWebhookConfigurations, list+watch).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fake_apiserver import FakeApiServer
from webhook.config import load_settings
from webhook.kinds import kind_info
from webhook.webhookconfig import match_conditions_for

NAMESPACE = "pinhook-system"
SERVICE_NAME = "pinhook.pinhook-system.svc"
PODS = kind_info("", "Pod")
assert PODS is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "pinhook", "user": {"token": "test-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "pinhook"}}],
                "current-context": "fake",
            }
        )
    )
    return path


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    fake = FakeApiServer()
    await fake.start()
    fake.put(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "pinhook"},
            "webhooks": [
                {
                    "name": "pods.pinhook.dev",
                    "clientConfig": {
                        "service": {"namespace": NAMESPACE, "name": "pinhook", "path": "/mutate"}
                    },
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    # Generated from an older config: no rewrite rules at all.
                    "matchConditions": match_conditions_for(
                        load_settings("builtinRewrites: false"), PODS
                    ),
                },
                {
                    # Installed with --no-match-conditions: must stay without.
                    "name": "services.knative.pinhook.dev",
                    "clientConfig": {
                        "service": {"namespace": NAMESPACE, "name": "pinhook", "path": "/mutate"}
                    },
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                },
            ],
        }
    )
    yield fake
    await fake.close()


async def wait_for_line(stream: asyncio.StreamReader, text: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while True:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"server exited before logging {text!r}")
            if text.encode() in line:
                return


async def test_self_managed_certificate_and_pull_secret_watch(
    api: FakeApiServer, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text("rewrites:\n  - from: gcr.io/old/\n    to: quay.io/new\n")
    env = os.environ | {
        "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", api.url)),
        "POD_NAMESPACE": NAMESPACE,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhook.cli", "serve", "--self-managed", "--kube", "on",
        "--cert-dir", str(tmp_path / "tls"), "--port", str(port), "--config", str(config),
        "--cert-ip", "127.0.0.1",
        env=env, stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        await wait_for_line(process.stderr, "pinhook listening on")
        secret = api.get("secrets", NAMESPACE, "pinhook-tls")
        assert secret is not None and secret["type"] == "kubernetes.io/tls"
        ca_b64 = secret["data"]["ca.crt"]
        webhook = api.get("mutatingwebhookconfigurations", "", "pinhook")
        assert webhook is not None
        assert webhook["webhooks"][0]["clientConfig"]["caBundle"] == ca_b64
        # The API server's view: it dials the Service name and trusts only the caBundle.
        context = ssl.create_default_context(cadata=base64.b64decode(ca_b64).decode())
        transport = httpx.AsyncHTTPTransport(verify=context)
        async with httpx.AsyncClient(transport=transport) as client:
            ready = await client.get(
                f"https://127.0.0.1:{port}/readyz", extensions={"sni_hostname": SERVICE_NAME}
            )
        assert ready.status_code == 200, ready.text
        # --cert-ip: also valid for an API server that calls https://127.0.0.1:PORT/mutate.
        transport = httpx.AsyncHTTPTransport(verify=context)
        async with httpx.AsyncClient(transport=transport) as client:
            healthy = await client.get(f"https://127.0.0.1:{port}/healthz")
        assert healthy.status_code == 200, healthy.text
        # Pull secrets come from watches, not from requests per admission.
        assert api.open_watches("secrets") >= 1
        assert api.open_watches("serviceaccounts") == 1
        # The conditions follow the config being served, at start and after each reload.
        webhooks = {
            w["name"]: w
            for w in api.get("mutatingwebhookconfigurations", "", "pinhook")["webhooks"]
        }
        assert webhooks["pods.pinhook.dev"]["matchConditions"] == match_conditions_for(
            load_settings(config.read_text()), PODS
        )
        assert "matchConditions" not in webhooks["services.knative.pinhook.dev"]
        config.write_text("rewrites:\n  - from: gcr.io/newer/\n    to: quay.io/newer\n")
        await wait_for_line(process.stderr, "matchConditions of pinhook updated")
        webhook = api.get("mutatingwebhookconfigurations", "", "pinhook")["webhooks"][0]
        assert webhook["matchConditions"] == match_conditions_for(
            load_settings(config.read_text()), PODS
        )
        assert "gcr[.]io/newer" in webhook["matchConditions"][-1]["expression"]
    finally:
        process.terminate()
        await process.wait()

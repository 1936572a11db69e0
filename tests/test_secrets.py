"""Nothing secret reaches a user or a log: marker secrets sent through every path a registry's
text takes are found in no warning, audit annotation, log line or metric."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.faults import FaultServer, Reply, error_reply
from tests.reviews import review
from webhook.admission import parse_review
from webhook.config import load_settings
from webhook.kube import NoPullSecrets
from webhook.metrics import Metrics
from webhook.mutate import Mutator
from webhook.oci.credhelper import DockerConfig
from webhook.oci.registry import RegistryClient
from webhook.redact import scrub
from webhook.resolve import CachingResolver, RegistryDigestResolver
from webhook.runtime import registry_options

USER, PASSWORD, TOKEN = "marker-user", "marker-password-7f3a", "marker-token-9c2e"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
MARKERS = (PASSWORD, TOKEN, BASIC)


def echo(status: int, said: str) -> Reply:
    """An error whose message repeats what the client sent, as careless services do."""
    return (
        error_reply(status, "DENIED", headers={})
        if not said
        else Reply(
            status,
            {"Content-Type": "application/json"},
            json.dumps({"errors": [{"code": "DENIED", "message": said}]}).encode(),
        )
    )


@pytest.fixture
async def faults() -> AsyncIterator[FaultServer]:
    async with FaultServer() as server:
        yield server


async def test_no_marker_secret_in_warnings_annotations_logs_or_metrics(
    faults: FaultServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    realm = f'Bearer realm="{faults.url}/token",service="s"'
    challenge = error_reply(401, headers={"WWW-Authenticate": realm})
    # 1. The token service echoes the Basic credential it was sent.
    faults.route("/v2/team/a/manifests/1", challenge)
    faults.route("/token", echo(500, f"bad request with Authorization: Basic {BASIC}"))
    # 2. With a token, the registry echoes the bearer token and the password.
    good = f'Bearer realm="{faults.url}/good-token",service="s"'
    faults.route(
        "/v2/team/b/manifests/1",
        error_reply(401, headers={"WWW-Authenticate": good}),
        echo(400, f"Bearer {TOKEN} refused; password={PASSWORD}"),
    )
    faults.route(
        "/good-token",
        Reply(200, {"Content-Type": "application/json"}, orjson.dumps({"token": TOKEN})),
    )
    # 3. A docker config key that is no URL, with the credentials in it.
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "auths": {
                    faults.host: {"auth": BASIC},
                    f"https://{USER}:{PASSWORD}@bad host/": {"auth": BASIC},
                }
            }
        )
    )
    settings = load_settings(
        f"registry:\n  insecure: ['{faults.host}']\n  allowedHosts: ['{faults.host}', "
        f"'127.0.0.1']\n  timeoutSeconds: 3\n  maxAttempts: 1\n"
    )
    metrics = Metrics()
    async with RegistryClient(registry_options(settings)) as client:
        keyring = DockerConfig.from_file(config)
        inner = RegistryDigestResolver(client, NoPullSecrets(), keyring)
        mutator = Mutator(settings, CachingResolver(inner, settings.cache), metrics)
        pod = pod_of(f"{faults.host}/team/a:1", f"{faults.host}/team/b:1")
        outcome = await mutator.review(parse_review(orjson.dumps(review(pod))))
    said = [*outcome.warnings, *outcome.audit.values(), outcome.message or ""]
    assert any("[redacted]" in text for text in said), said  # the echoes did arrive
    everything = "\n".join([*said, caplog.text, metrics.render().decode()])
    for marker in MARKERS:
        assert marker not in everything
    assert faults.requests_to("/token")  # the credential was used where it belongs


def pod_of(*images: str) -> dict[str, Any]:
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": containers},
    }


@pytest.mark.parametrize(
    "text",
    [
        f"Basic {BASIC}",
        f"authorization: bearer {TOKEN}",
        f"https://{USER}:{PASSWORD}@registry.example/v2/",
        f'{{"access_token": "{TOKEN}", "expires_in": 60}}',
        f"password={PASSWORD}&user={USER}",
        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJl",
    ],
)
def test_scrub_removes_every_form_of_credential(text: str) -> None:
    scrubbed = scrub(text)
    assert "[redacted]" in scrubbed
    for marker in (*MARKERS, "eyJzdWIiOiJib2IifQ"):
        assert marker not in scrubbed


def test_scrub_cuts_long_text_and_keeps_plain_text() -> None:
    assert scrub("nginx:1.27 not found (HTTP 404)") == "nginx:1.27 not found (HTTP 404)"
    assert len(scrub("x" * 10_000)) == 500

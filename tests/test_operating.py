"""Watching a real ``pinhook serve``: its log lines (one per admission, JSON, no credential at
any level), its metrics port, and how it refuses to start."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.fixtures import (
    BASIC_PASSWORD,
    BASIC_USER,
    TOKEN_PASSWORD,
    TOKEN_USER,
    RegistryEnv,
    docker_config,
)
from tests.reviews import fake_digest, review
from tests.test_server import CONFIG, NGINX, Served, free_port, pod
from webhook import certs


def pod_of(*images: str) -> dict[str, Any]:
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web"},
        "spec": {"containers": containers},
    }


def serve_once(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "webhook.cli", "serve", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def drained(served: Served) -> list[str]:
    """Every line the server logged, once it has stopped."""
    served.stop()
    lines = list(served.seen)
    while not served.lines.empty():
        lines.append(served.lines.get_nowait())
    return lines


def records(lines: list[str]) -> list[dict[str, Any]]:
    """Each line parsed as the one JSON object it must be."""
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture
def json_served(tmp_path: Path) -> Iterator[Served]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    server = Served(["--config", str(config), "--log-format", "json"], cwd=tmp_path)
    yield server
    if server.process.poll() is None:
        server.stop()


def test_like_admissions_on_a_shared_line_each_keep_their_uid(json_served: Served) -> None:
    """A ReplicaSet's Pods answered at once may share a line (``alike``): every admission's
    uid and duration is there, once."""
    ca = json_served.cwd / "certs" / "ca.crt"
    replica = pod(NGINX)
    replica["metadata"]["name"] = ""
    documents = [review(replica, namespace="shop") for _ in range(60)]

    async def admit_at_once() -> None:
        context = ssl.create_default_context(cafile=ca)
        base = f"https://localhost:{json_served.port}"
        async with httpx.AsyncClient(base_url=base, verify=context) as client:
            answers = await asyncio.gather(*[client.post("/mutate", json=d) for d in documents])
        assert {answer.status_code for answer in answers} == {200}

    asyncio.run(admit_at_once())
    logged = [r for r in records(drained(json_served)) if r["msg"] == "admission patched"]
    entries = [*logged, *[alike for r in logged for alike in r.get("alike", [])]]
    assert sorted(entry["uid"] for entry in entries) == sorted(
        d["request"]["uid"] for d in documents
    )
    assert all(entry["durationMs"] > 0 for entry in entries)
    # To the hundredth of a millisecond, as measured: not uvloop's clock, whole milliseconds.
    assert any(entry["durationMs"] != int(entry["durationMs"]) for entry in entries)


def test_one_json_line_per_admission(json_served: Served) -> None:
    ca = json_served.cwd / "certs" / "ca.crt"
    document = review(pod(NGINX), namespace="shop")
    document["request"]["name"] = "web"
    document["request"]["dryRun"] = True
    with json_served.client(ca) as client:
        assert client.post("/mutate", json=document).status_code == 200
        client.post("/mutate", json=review({"apiVersion": "v1", "kind": "ConfigMap"}))
    logged = records(drained(json_served))
    admissions = [r for r in logged if r["msg"].startswith("admission ")]
    assert len(admissions) == 2
    pinned, skipped = admissions
    assert pinned["logger"] == "webhook.app" and pinned["level"] == "info"
    assert pinned["msg"] == "admission patched"
    assert pinned["uid"] == document["request"]["uid"]
    assert (pinned["kind"], pinned["namespace"], pinned["name"]) == ("Pod", "shop", "web")
    assert (pinned["operation"], pinned["dryRun"], pinned["outcome"]) == ("CREATE", True, "patched")
    assert pinned["durationMs"] > 0
    assert pinned["images"] == [f"{NGINX} -> {NGINX}@{fake_digest(NGINX)}"]
    assert skipped["outcome"] == "skipped" and skipped["reason"] == "kind not handled"
    # Listening is said once the socket is bound, and in the same format as everything else.
    assert any(r["msg"].startswith("pinhook listening on https://") for r in logged)


def test_multiline_config_errors_stay_one_line(json_served: Served) -> None:
    config = json_served.cwd / "config.yaml"
    config.write_text("rewrites:\n  - from: gcr.io/a\n  - from: gcr.io/b\n")
    line = json_served.wait_for("configuration rejected")
    record = json.loads(line)
    assert record["level"] == "error"
    assert "rewrites[0].to" in record["msg"] and "rewrites[1].to" in record["msg"]


def test_metrics_port_serves_plain_http_and_not_on_tls(json_served: Served) -> None:
    ca = json_served.cwd / "certs" / "ca.crt"
    with json_served.client(ca) as client:
        client.post("/mutate", json=review(pod(NGINX)))
        assert client.get("/metrics").status_code == 404
    text = json_served.metrics()
    assert (
        'pinhook_admission_requests_total{kind="Pod",operation="CREATE",result="patched"}' in text
    )
    assert "pinhook_build_info{config_hash=" in text
    assert 'pinhook_certificate_expires_in_seconds{certificate="serving"}' in text
    assert 'pinhook_certificate_expires_in_seconds{certificate="ca"}' in text
    assert "process_resident_memory_bytes" in text and "python_info" in text
    assert 'python_gc_collections_total{generation="2"}' in text  # full collections (README)
    assert "_created" not in text
    for name, file in (("serving", "tls.crt"), ("ca", "ca.crt")):
        line = f'pinhook_certificate_expires_in_seconds{{certificate="{name}"}} '
        value = float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])
        not_after = certs.load_cert_info((json_served.cwd / "certs" / file).read_bytes()).not_after
        assert abs(value - (not_after.timestamp() - time.time())) < 60, name


def test_a_busy_port_is_one_clear_line_and_a_failed_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = serve_once("--port", port, "--log-format", "json", cwd=tmp_path)
        metrics = serve_once(
            "--port", str(free_port()), "--metrics-port", port, "--log-format", "text", cwd=tmp_path
        )
    assert result.returncode != 0
    errors = [r for r in records(result.stderr.splitlines()) if r["level"] == "error"]
    assert len(errors) == 1 and f"cannot listen on 127.0.0.1:{port}" in errors[0]["msg"]
    assert "Traceback" not in result.stderr
    assert metrics.returncode != 0
    (line,) = [line for line in metrics.stderr.splitlines() if " ERROR " in line]
    assert f"cannot serve metrics on 127.0.0.1:{port}" in line
    assert "listening" not in metrics.stderr


def test_a_bad_certificate_is_one_clear_line_and_a_failed_start(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    result = serve_once(
        "--cert", str(cert), "--key", str(key), "--log-format", "json", cwd=tmp_path
    )
    assert result.returncode != 0
    (error,) = [r for r in records(result.stderr.splitlines()) if r["level"] == "error"]
    assert f"cannot load certificate {cert}" in error["msg"]
    assert "Traceback" not in result.stderr


def test_no_credential_or_token_in_any_log_line(
    tmp_path: Path, basic_registry: RegistryEnv, token_registry: RegistryEnv
) -> None:
    """A whole run at debug, the HTTP clients' trace included, against registries that take
    Basic and token auth: not one line carries a password, a token or an Authorization."""
    basic = basic_registry.push.index("ops/basic", "1.0")
    token = token_registry.push.index("ops/token", "1.0")
    assert token_registry.issuer is not None
    issuer = httpx.URL(token_registry.issuer.realm).netloc.decode()
    hosts = [basic_registry.host, token_registry.host, issuer]
    listed = ", ".join(f'"{host}"' for host in hosts)
    config = tmp_path / "config.yaml"
    config.write_text(f"registry:\n  insecure: [{listed}]\n  allowedHosts: [{listed}]\n")
    creds = docker_config(
        tmp_path,
        {
            basic_registry.host: (BASIC_USER, BASIC_PASSWORD),
            token_registry.host: (TOKEN_USER, TOKEN_PASSWORD),
        },
    )
    args = ["--config", str(config), "--docker-config", str(creds)]
    args += ["--log-level", "debug", "--log-format", "json", "--log-http-trace"]
    server = Served(args, cwd=tmp_path)
    ca = tmp_path / "certs" / "ca.crt"
    images = [basic.tag_ref, token.tag_ref, f"{token_registry.host}/ops/token:missing"]
    with server.client(ca) as client:
        for _round in range(2):  # the second round answers from the caches
            answer = client.post("/mutate", json=review(pod_of(*images))).json()["response"]
            assert answer["allowed"] is True
        metrics = server.metrics()
    lines = drained(server)
    logged = records(lines)  # every line is one JSON object
    # The trace was on: the registry client's connections and the Kubernetes client's.
    assert any(r["logger"] == "webhook.oci.connection" for r in logged)
    # One debug line per registry request, from pinhook's own transport.
    assert any(r["logger"] == "webhook.oci.transport" and " -> 200" in r["msg"] for r in logged)
    admissions = [r for r in logged if r["msg"] == "admission patched"]
    assert len(admissions) == 2
    assert admissions[0]["images"] == [
        f"{basic.tag_ref} -> {basic.tag_ref}@{basic.digest}",
        f"{token.tag_ref} -> {token.tag_ref}@{token.digest}",
        f"{images[2]} unpinned: not-found",
    ]
    assert f'pinhook_registry_token_requests_total{{host="{token_registry.host}",result="ok"}}' in (
        metrics
    )
    everything = "".join(lines)
    secrets = [
        BASIC_PASSWORD,
        TOKEN_PASSWORD,
        base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode(),
        base64.b64encode(f"{TOKEN_USER}:{TOKEN_PASSWORD}".encode()).decode(),
        "eyJ",  # every token the issuer hands out is a JWT
    ]
    for secret in secrets:
        assert secret not in everything, secret
    assert "authorization" not in everything.lower()

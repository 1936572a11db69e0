"""The offline helpers a policy author uses: resolve, review, check-config, certs."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import orjson

from tests.harness.fixtures import RegistryEnv, docker_config
from tests.reviews import fake_digest, load_object, review


def pinhook(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "webhook.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def registry_config(tmp_path: Path, host: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f'registry:\n  insecure: ["{host}"]\n  allowedHosts: ["{host}"]\n'
        f"rewrites:\n  - from: {host}/old/\n    to: {host}/new\n"
    )
    return path


def test_resolve_prints_rewritten_pinned_images_and_fails_on_any_miss(
    basic_registry: RegistryEnv, tmp_path: Path
) -> None:
    pushed = basic_registry.push.index("new/app", "1.0")
    config = registry_config(tmp_path, basic_registry.host)
    creds = docker_config(tmp_path, {basic_registry.host: ("alice", "wonderland")})
    host = basic_registry.host
    ok = pinhook(
        "resolve", "--config", str(config), "--docker-config", str(creds), f"{host}/old/app:1.0"
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.decode().split() == [
        f"{host}/old/app:1.0",
        f"{pushed.tag_ref}@{pushed.digest}",
    ]
    missing = pinhook(
        "resolve",
        "--config",
        str(config),
        "--docker-config",
        str(creds),
        f"{host}/old/app:1.0",
        f"{host}/new/app:nope",
    )
    assert missing.returncode == 1
    assert b"unpinned" in missing.stdout


def test_review_prints_response_or_patched_object(tmp_path: Path) -> None:
    image = "kserve/sklearnserver:v0.15.2"
    config = tmp_path / "config.yaml"
    config.write_text(f'resolver: static\ndigests:\n  "{image}": "{fake_digest(image)}"\n')
    ksvc = load_object("ksvc-predictor.yaml")
    doc = orjson.dumps(review(ksvc, namespace="models"))
    answered = pinhook("review", "--config", str(config), "-", stdin=doc)
    assert answered.returncode == 0, answered.stderr
    response = orjson.loads(answered.stdout)["response"]
    assert response["allowed"] is True
    ops = orjson.loads(base64.b64decode(response["patch"]))
    assert ops == [
        {
            "op": "replace",
            "path": "/spec/template/spec/containers/0/image",
            "value": f"{image}@{fake_digest(image)}",
        }
    ]
    review_file = tmp_path / "review.json"
    review_file.write_bytes(doc)
    applied = pinhook("review", "--config", str(config), "--apply", str(review_file))
    patched = orjson.loads(applied.stdout)
    assert patched["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        fake_digest(image)
    )
    assert patched["metadata"] == ksvc["metadata"]


def test_check_config_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewrites:\n  - from: gcr.io/x\n    to: 'bad name/with spaces'\n")
    result = pinhook("check-config", str(bad))
    assert result.returncode == 2
    assert b"rewrites[0].to" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text("output: digest-only\n")
    assert pinhook("check-config", str(good)).returncode == 0


def test_certs_generate_and_ca_bundle(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    made = pinhook(
        "certs",
        "generate",
        "--service",
        "pinhook",
        "--namespace",
        "pinhook-system",
        "--out",
        str(out),
    )
    assert made.returncode == 0, made.stderr
    bundle = pinhook("certs", "ca-bundle", "--ca", str(out / "ca.crt"))
    assert base64.b64decode(bundle.stdout.strip()) == (out / "ca.crt").read_bytes()


def test_review_resolves_with_pull_secrets_from_manifests(
    basic_registry: RegistryEnv, tmp_path: Path
) -> None:
    pushed = basic_registry.push.index("private/web", "2.0")
    host = basic_registry.host
    config = registry_config(tmp_path, host)
    auth = base64.b64encode(b"alice:wonderland").decode()
    dockerconfig = orjson.dumps({"auths": {host: {"auth": auth}}}).decode()
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: regcred, namespace: shop}\n"
        "type: kubernetes.io/dockerconfigjson\n"
        f"stringData:\n  .dockerconfigjson: '{dockerconfig}'\n"
        "---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n"
        "imagePullSecrets: [{name: regcred}]\n"
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "serviceAccountName": "web",
            "containers": [{"name": "w", "image": pushed.tag_ref}],
        },
    }
    doc = orjson.dumps(review(pod, namespace="shop"))
    without = pinhook("review", "--config", str(config), "--apply", "-", stdin=doc)
    assert orjson.loads(without.stdout)["spec"]["containers"][0]["image"] == pushed.tag_ref
    with_secrets = pinhook(
        "review", "--config", str(config), "--pull-secrets", str(secrets), "--apply", "-",
        stdin=doc,
    )  # fmt: skip
    image = orjson.loads(with_secrets.stdout)["spec"]["containers"][0]["image"]
    assert image == f"{pushed.tag_ref}@{pushed.digest}", with_secrets.stderr

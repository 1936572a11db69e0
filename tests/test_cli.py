"""The offline helpers a policy author uses: resolve, review, check-config, certs."""

from __future__ import annotations

import argparse
import base64
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpcore
import httpx
import orjson
import pytest
import yaml

from tests.harness.fixtures import RegistryEnv, docker_config
from tests.reviews import fake_digest, load_object, review
from webhook import cli
from webhook.errors import ProtocolError
from webhook.oci import transport


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


# --- the command line as a whole ------------------------------------------------------------


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The error a user sees: exactly one line, no traceback."""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def test_user_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("rewrites: [\n")
    cases = [
        (["check-config", str(tmp_path / "missing.yaml")], "cannot read"),
        (["check-config", str(bad_yaml)], "not valid YAML"),
        (["resolve", "--config", str(bad_yaml), "nginx"], "not valid YAML"),
        (["review", "--config", str(tmp_path / "missing.yaml"), "-"], "cannot read"),
        (["check-config", "--log-level", "verbose", str(bad_yaml)], "invalid choice: 'verbose'"),
        (["review", str(tmp_path / "missing.json")], "No such file"),
        (["no-such-command"], "invalid choice"),
    ]
    for args, said in cases:
        result = pinhook(*args, stdin=b"")
        assert result.returncode == 2, (args, result.stderr)
        assert said in one_line(result), args


def test_a_bad_log_level_from_the_environment_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "webhook.cli", "check-config", "/dev/null"],
        capture_output=True,
        env={**os.environ, "PINHOOK_LOG_LEVEL": "loud"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "log level 'loud'" in one_line(result)


def test_every_command_with_a_config_reads_pinhook_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewrites: [\n")
    good = tmp_path / "good.yaml"
    good.write_text("output: digest-only\n")
    monkeypatch.setenv("PINHOOK_CONFIG", str(bad))
    parser = cli._parser()  # the environment is read when the parser is built
    commands = {"serve": [], "review": [], "resolve": ["nginx"], "pin": [], "fn": [], "report": []}
    for command, rest in commands.items():
        assert parser.parse_args([command, *rest]).config == bad, command
        given = parser.parse_args([command, "--config", str(good), *rest])
        assert given.config == good, command  # a flag given wins
    # Before: the commands that merge several files ignored it.
    merging = {"webhook-config": [], "validating-policy": [], "install": ["--url", "https://x"]}
    for command, rest in merging.items():
        assert parser.parse_args([command, *rest]).config == [bad], command
        given = parser.parse_args([command, "--config", str(good), "--config", str(bad), *rest])
        assert given.config == [good, bad], command  # flags given replace it
    result = pinhook("webhook-config")
    assert result.returncode == 2
    assert "bad.yaml: not valid YAML" in one_line(result)
    # report loads it before it reads the cluster: the config's error, not the cluster's.
    nowhere = str(tmp_path / "no-kubeconfig")
    result = pinhook("report", "--kubeconfig", nowhere)
    assert result.returncode == 2
    assert "bad.yaml: not valid YAML" in one_line(result)
    result = pinhook("report", "--kubeconfig", nowhere, "--config", str(good))
    assert result.returncode == 2
    assert "not valid YAML" not in one_line(result)


def test_log_flags_work_after_any_subcommand_and_before() -> None:
    for args in (
        ["check-config", "--log-level", "debug", "--log-format", "json", "/dev/null"],
        ["--log-level", "debug", "check-config", "/dev/null"],
        ["certs", "ca-bundle", "--log-format", "text", "--ca", "/dev/null"],
    ):
        result = pinhook(*args)
        assert b"unrecognized arguments" not in result.stderr, args


def test_version_help_and_every_flag_explained() -> None:
    version = pinhook("--version")
    assert version.returncode == 0 and version.stdout.startswith(b"pinhook ")
    helped = pinhook("--help").stdout.decode()
    for name in ("PINHOOK_CONFIG", "PINHOOK_LOG_LEVEL", "PINHOOK_METRICS_PORT", "KUBECONFIG"):
        assert name in helped
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")
            elif not action.help:
                missing.append(f"{name} {action.option_strings or action.dest}")

    walk(cli._parser(), "pinhook")
    assert missing == []


def test_check_config_lists_the_effective_rules_from_a_configmap(tmp_path: Path) -> None:
    configmap = tmp_path / "configmap.yaml"
    configmap.write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: pinhook-config}\ndata:\n"
        "  config.yaml: |\n    rewrites:\n      - {from: docker.io/kserve/, to: r.example/kserve}\n"
    )
    result = pinhook("check-config", str(configmap))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[1:] == [
        "  docker.io/kserve -> r.example/kserve",
        "  gcr.io/kubebuilder/kube-rbac-proxy -> quay.io/brancz/kube-rbac-proxy  (built in)",
    ]
    # Every command that takes --config reads the ConfigMap too.
    shown = pinhook("webhook-config", "--config", str(configmap))
    assert shown.returncode == 0 and b"r[.]example" not in shown.stderr
    resolved = pinhook("resolve", "--config", str(configmap), "kind.local/app:dev")
    assert resolved.stdout.decode().split() == ["kind.local/app:dev", "kind.local/app:dev"]


def test_resolve_reports_each_image_on_its_own(registry: RegistryEnv, tmp_path: Path) -> None:
    pushed = registry.push.index("cli/app", "1.0")
    config = registry_config(tmp_path, registry.host)
    images = ["Not A Reference", pushed.tag_ref, f"{registry.host}/cli/app:missing"]
    result = pinhook("resolve", "--config", str(config), "-o", "json", *images)
    assert result.returncode == 1
    rows = orjson.loads(result.stdout)
    assert [row["image"] for row in rows] == images
    assert rows[0]["reason"] == "invalid" and rows[0]["final"] is None
    assert rows[1]["final"] == f"{pushed.tag_ref}@{pushed.digest}" and rows[1]["error"] is None
    assert rows[2]["reason"] == "not-found"
    text = pinhook("resolve", "--config", str(config), *images).stdout.decode().splitlines()
    assert len(text) == 3 and "unpinned: invalid reference" in text[0]


def test_resolve_names_the_setting_to_change(registry: RegistryEnv, tmp_path: Path) -> None:
    image = f"{registry.host}/cli/app:1.0"
    # Listed as allowed, not as insecure: TLS to a plain-HTTP registry, refused at once.
    allowed = tmp_path / "allowed.yaml"
    allowed.write_text(f'registry:\n  allowedHosts: ["{registry.host}"]\n')
    tls = orjson.loads(pinhook("resolve", "--config", str(allowed), "-o", "json", image).stdout)
    assert tls[0]["reason"] == "protocol" and "registry.insecure" in tls[0]["error"]
    forbidden = orjson.loads(pinhook("resolve", "-o", "json", image).stdout)
    assert forbidden[0]["reason"] == "forbidden-host"
    assert "registry.allowedHosts" in forbidden[0]["error"]


def test_a_plain_http_answer_to_tls_is_not_retried() -> None:
    error = httpcore.ConnectError("[SSL: WRONG_VERSION_NUMBER] wrong version number")
    error.__cause__ = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    classified = transport._classify_transport_error("HEAD", httpx.URL("https://r:5000/v2/"), error)
    assert isinstance(classified, ProtocolError)  # _Transient is what gets retried
    assert "registry.insecure" in str(classified)


def test_review_takes_plain_manifests(tmp_path: Path) -> None:
    image = "nginx:1.27"
    config = tmp_path / "config.yaml"
    config.write_text(f'resolver: static\ndigests:\n  "{image}": "{fake_digest(image)}"\n')
    manifests = tmp_path / "pods.yaml"
    manifests.write_text(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n"
        "spec:\n  containers: [{name: c, image: nginx:1.27}]\n"
        "---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n"
    )
    pinned = f"{image}@{fake_digest(image)}"
    as_yaml = pinhook("review", "--config", str(config), "-f", str(manifests))
    assert as_yaml.returncode == 0, as_yaml.stderr
    documents = list(yaml.safe_load_all(as_yaml.stdout))
    assert documents[0]["spec"]["containers"][0]["image"] == pinned
    assert documents[1]["kind"] == "ConfigMap"
    diff = pinhook("review", "--config", str(config), "-f", str(manifests), "-o", "diff")
    lines = diff.stdout.decode().splitlines()
    assert "-    image: nginx:1.27" in lines and f"+    image: {pinned}" in lines
    as_json = pinhook("review", "--config", str(config), "-o", "json", "-", stdin=orjson.dumps(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"},
         "spec": {"containers": [{"name": "c", "image": image}]}}
    ))  # fmt: skip
    assert orjson.loads(as_json.stdout)["spec"]["containers"][0]["image"] == pinned


def test_webhook_config_with_a_url_and_no_ca_warns() -> None:
    result = pinhook("webhook-config", "--url", "https://10.0.0.1:8443/mutate")
    assert result.returncode == 0
    assert "will not trust" in result.stderr.decode()
    assert b"will not trust" not in pinhook("webhook-config").stderr


def test_certs_generate_keeps_existing_files_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert pinhook("certs", "generate", "--out", str(out)).returncode == 0
    before = (out / "tls.key").read_bytes()
    again = pinhook("certs", "generate", "--out", str(out))
    assert again.returncode == 2 and "--force" in one_line(again)
    assert (out / "tls.key").read_bytes() == before
    assert pinhook("certs", "generate", "--out", str(out), "--force").returncode == 0
    assert (out / "tls.key").read_bytes() != before


def test_serve_without_api_configuration_names_kubeconfig_and_in_cluster(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    result = subprocess.run(
        [sys.executable, "-m", "webhook.cli", "serve", "--kube", "on", "--log-format", "text"],
        cwd=tmp_path,
        capture_output=True,
        env={**env, "KUBECONFIG": str(tmp_path / "missing")},
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    (error,) = [line for line in result.stderr.decode().splitlines() if " ERROR " in line]
    assert "webhook.cli: pinhook cannot serve" in error
    assert "KUBECONFIG" in error and "in-cluster" in error
    assert "listening" not in result.stderr.decode()

"""``pinhook pin`` against real loopback registries: only image scalars change, byte for byte."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from tests.harness.fixtures import (
    BASIC_PASSWORD,
    BASIC_USER,
    TOKEN_PASSWORD,
    TOKEN_USER,
    RegistryEnv,
    docker_config,
    dockerconfigjson,
)
from tests.harness.push import PushedImage
from webhook.config import load_settings
from webhook.kinds import Mode, kind_info
from webhook.locate import locate
from webhook.oci.reference import ImageRef
from webhook.pin import joined, objects_in

DATA = Path(__file__).parent / "data"
OBJECTS = DATA / "objects"
PIN = DATA / "pin"
# Image fields as these fixtures write them: plain scalars, one per line.
IMAGE_LINE = re.compile(r"^(\s*(?:- )?(?:image|reference): )(\S+)$")


def pinhook(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "webhook.cli", *map(str, args)],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=120,
        check=False,
    )


def config_file(tmp_path: Path, *hosts: str, extra: str = "builtinRewrites: false\n") -> Path:
    """A config reaching the loopback registries over plain HTTP, with no default rules."""
    listed = ", ".join(f'"{host}"' for host in hosts)
    path = tmp_path / "config.yaml"
    path.write_text(f"registry:\n  insecure: [{listed}]\n  allowedHosts: [{listed}]\n{extra}")
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- a hand-written multi-document file ---------------------------------------------------


def multi_fixture(registry: RegistryEnv, prefix: str) -> tuple[str, dict[str, PushedImage]]:
    pushed = {
        "web": registry.push.index(f"{prefix}/team/web", "1.0"),
        "proxy": registry.push.image(f"{prefix}/team/proxy", "2.1"),
        "tools": registry.push.index(f"{prefix}/team/tools", "3"),
        "api": registry.push.index(f"{prefix}/team/api", "1.2"),
    }
    text = (
        (PIN / "multi.yaml")
        .read_text()
        .replace("REGISTRY", f"{registry.host}/{prefix}")
        .replace("DIGEST_WEB", pushed["web"].digest)
    )
    return text, pushed


def test_only_image_scalars_change_in_a_file_with_comments_anchors_and_odd_quoting(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    text, pushed = multi_fixture(registry, "multi")
    source = tmp_path / "multi.yaml"
    source.write_text(text)
    config = config_file(
        tmp_path, registry.host, extra="builtinRewrites: false\nkinds: {deployments.apps: pin}\n"
    )

    pinned = pinhook("pin", "--config", config, "-f", source)

    assert pinned.returncode == 0, pinned.stderr.decode()
    name = f"{registry.host}/multi/team"
    web, proxy, tools, api = (pushed[k].digest for k in ("web", "proxy", "tools", "api"))
    expected = (
        text.replace(f'"{name}/web:1.0"', f'"{name}/web:1.0@{web}"')
        .replace(f"'{name}/proxy:2.1'", f"'{name}/proxy:2.1@{proxy}'")
        .replace(f"image: {name}/tools:3}}", f"image: {name}/tools:3@{tools}}}")
        .replace(f"&api {name}/api:1.2\n", f"&api {name}/api:1.2@{api}\n")
        .replace(f">-\n        {name}/tools:3\n", f'"{name}/tools:3@{tools}"\n')
    )
    assert expected != text
    assert pinned.stdout.decode() == expected
    # The anchored image counts twice (two fields), the opted-out Pod not at all.
    assert re.search(r"pinned\s+6\b", pinned.stderr.decode())
    assert re.search(r"already pinned\s+1\b", pinned.stderr.decode())

    # Idempotent: pinning the output again changes nothing, and the gate passes.
    source.write_text(expected)
    again = pinhook("pin", "--config", config, "-f", source)
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout.decode() == expected
    assert pinhook("pin", "--check", "--config", config, "-f", source).returncode == 0


def test_check_lists_every_unpinned_image_with_its_file_and_line(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    text, _ = multi_fixture(registry, "check")
    source = tmp_path / "multi.yaml"
    source.write_text(text)
    config = config_file(
        tmp_path, registry.host, extra="builtinRewrites: false\nkinds: {deployments.apps: pin}\n"
    )
    lines = text.splitlines()
    marks = ('web:1.0"', "proxy:2.1'", "tools:3}]", "&api", "&api", "image: >-")
    expected = sorted(next(i for i, line in enumerate(lines, 1) if mark in line) for mark in marks)

    for offline in ([], ["--offline"]):
        checked = pinhook("pin", "--check", *offline, "--config", config, "-f", source)
        assert checked.returncode == 1, checked.stderr.decode()
        listed = checked.stdout.decode().splitlines()
        assert [int(line.split(":")[1]) for line in listed] == expected
        assert all(line.startswith(f"{source}:") for line in listed)
        assert all("not pinned to a digest" in line for line in listed)
        assert source.read_text() == text  # --check changes nothing


# --- KServe, Knative and kustomize output ------------------------------------------------

KSERVE_KNATIVE = (
    "isvc-sklearn-full.yaml",
    "ksvc-predictor.yaml",
    "knative-configuration.yaml",
    "llmisvc-vllm.yaml",
    "clusterstoragecontainer.yaml",
    "servingruntime-multinode.yaml",
)


def test_kserve_knative_and_kustomize_manifests_are_pinned_in_place_and_stay_pinned(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    """The fixtures name Docker Hub and ghcr.io; rules move them to the loopback registry,
    where the test pushed every image, so the run rewrites and pins at once."""
    host = registry.host
    rules = [("docker.io", "kk/docker.io"), ("ghcr.io/knative", "kk/ghcr.io/knative")]
    rules += [("ghcr.io/llm-d", "kk/ghcr.io/llm-d"), ("ghcr.io/acme/feature-enricher", "kk/fe")]
    rewrites = "".join(f'  - {{from: "{src}", to: "{host}/{dst}"}}\n' for src, dst in rules)
    config = config_file(tmp_path, host, extra=f"rewrites:\n{rewrites}")
    repo = tmp_path / "repo"
    (repo / "kserve").mkdir(parents=True)
    for name in KSERVE_KNATIVE:
        shutil.copy(OBJECTS / name, repo / "kserve" / name)
    kustomized = (PIN / "kustomize-output.yaml").read_text().replace("REGISTRY", f"{host}/kz")
    (repo / "kustomize-output.yml").write_text(kustomized)
    before = snapshot(repo)
    finals = push_everything(registry, config, before)

    pinned = pinhook("pin", "-i", "--config", config, "-f", repo)

    assert pinned.returncode == 0, pinned.stderr.decode()
    after = snapshot(repo)
    for name, data in before.items():
        assert after[name].decode() == replace_image_lines(data.decode(), finals), name
    # A ServingRuntime is rewrite-only by default: rewritten, never pinned.
    runtime = after["kserve/servingruntime-multinode.yaml"].decode()
    assert f"{host}/kk/docker.io/kserve/huggingfaceserver:v0.15.2-gpu\n" in runtime
    # The digest-only volume image matches no rule: already pinned, left alone.
    assert (
        b"reference: ghcr.io/acme/models/iris@sha256:4c1e8a"
        in after["kserve/isvc-sklearn-full.yaml"]
    )
    # Templates are off by default, as in the webhook: the kustomize Deployment stays.
    assert f"image: {host}/kz/team/api:1.2\n" in after["kustomize-output.yml"].decode()

    gate = pinhook("pin", "--check", "--config", config, "-f", repo)
    assert gate.returncode == 0, gate.stdout.decode() + gate.stderr.decode()
    assert pinhook("pin", "-i", "--config", config, "-f", repo).returncode == 0
    assert snapshot(repo) == after


def push_everything(
    registry: RegistryEnv, config: Path, files: Mapping[str, bytes]
) -> dict[str, str]:
    """Push every image the files name, where the rules send it; the final image of each."""
    settings = load_settings(config.read_text())
    finals: dict[str, str] = {}
    pushed: dict[tuple[str, str], str] = {}
    for data in files.values():
        for obj in yaml.safe_load_all(data):
            info = kind_info(obj["apiVersion"].rpartition("/")[0], obj["kind"])
            mode = settings.mode_for(info.key) if info else Mode.OFF
            for field in locate(info, obj).fields if info and mode is not Mode.OFF else ():
                rewrite = settings.rewrite_map.apply(ImageRef.parse(field.image))
                target = rewrite.result
                if target.registry != registry.host:
                    continue  # no rule for it: left as it is
                key = (target.repository, target.tag or "latest")
                if key not in pushed:
                    pushed[key] = registry.push.index(*key).digest
                pin = f"@{pushed[key]}" if mode is Mode.PIN else ""
                finals[field.image] = f"{target.familiar_name()}:{key[1]}{pin}"
    return finals


def replace_image_lines(text: str, finals: Mapping[str, str]) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        match = IMAGE_LINE.match(line.rstrip("\n"))
        if match and match.group(2) in finals:
            line = match.group(1) + finals[match.group(2)] + "\n"
        out.append(line)
    return "".join(out)


# --- credentials --------------------------------------------------------------------------


def pod(name: str, image: str, pull_secret: str | None = None) -> str:
    secrets = f"  imagePullSecrets: [{{name: {pull_secret}}}]\n" if pull_secret else ""
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{secrets}"
        f"  containers:\n  - name: app\n    image: {image}\n"
    )


def test_anonymous_basic_and_token_registries_with_docker_config_and_pull_secrets(
    registry: RegistryEnv,
    basic_registry: RegistryEnv,
    token_registry: RegistryEnv,
    tmp_path: Path,
) -> None:
    anonymous = registry.push.index("auth/anon", "1")
    basic = basic_registry.push.index("auth/basic", "1")
    token = token_registry.push.index("auth/token", "1")
    files = tmp_path / "manifests"
    files.mkdir()
    (files / "anon.yaml").write_text(pod("anon", anonymous.tag_ref))
    (files / "basic.yaml").write_text(pod("basic", basic.tag_ref))
    (files / "token.yaml").write_text(pod("token", token.tag_ref, pull_secret="regcred"))
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/dockerconfigjson",
        "metadata": {"name": "regcred", "namespace": "default"},
        "data": {
            ".dockerconfigjson": base64.b64encode(
                json.dumps(
                    dockerconfigjson({token_registry.host: (TOKEN_USER, TOKEN_PASSWORD)})
                ).encode()
            ).decode()
        },
    }
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(yaml.safe_dump(secret))
    creds = docker_config(tmp_path, {basic_registry.host: (BASIC_USER, BASIC_PASSWORD)})
    assert token_registry.issuer is not None
    realm = token_registry.issuer.url.removeprefix("http://").rstrip("/")
    hosts = (registry.host, basic_registry.host, token_registry.host, realm)
    config = config_file(tmp_path, *hosts)
    before = snapshot(files)

    # Without the docker config the Basic registry refuses: the run fails and writes nothing.
    refused = pinhook("pin", "-i", "--config", config, "--pull-secrets", secrets, "-f", files)
    assert refused.returncode == 1
    stderr = refused.stderr.decode()
    assert f"{files / 'basic.yaml'}:8: cannot pin: {basic.tag_ref}" in stderr
    assert "(unauthorized)" in stderr and "nothing was written" in stderr
    assert "token.yaml" not in stderr  # its pull secret was used
    assert "HTTP Request" not in stderr  # no request log drowning the report
    assert snapshot(files) == before

    pinned = pinhook(
        "pin", "-i", "--config", config, "--docker-config", creds,
        "--pull-secrets", secrets, "-f", files,
    )  # fmt: skip
    assert pinned.returncode == 0, pinned.stderr.decode()
    for name, image in (("anon", anonymous), ("basic", basic), ("token", token)):
        expected = pod(
            name, f"{image.tag_ref}@{image.digest}", "regcred" if name == "token" else None
        )
        assert (files / f"{name}.yaml").read_text() == expected


# --- in place: all or nothing -------------------------------------------------------------


def test_in_place_writes_nothing_when_an_image_fails_and_skip_pins_the_rest(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    good = registry.push.index("inplace/good", "1")
    other = registry.push.index("inplace/other", "2")
    missing = f"{registry.host}/inplace/missing:0"
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    (repo / ".hidden").mkdir()
    (repo / "a.yaml").write_text(pod("a", good.tag_ref))
    (repo / "sub" / "b.yml").write_text(pod("b", other.tag_ref).replace("\n", "\r\n"))
    (repo / "c.yaml").write_text("# a tag nobody pushed\n" + pod("c", missing))
    # Not walked: hidden directories, and JSON or other files in a directory.
    (repo / ".hidden" / "d.yaml").write_text(pod("d", f"{registry.host}/inplace/nope:1"))
    (repo / "e.json").write_text(json.dumps(yaml.safe_load(pod("e", good.tag_ref))))
    (repo / "notes.txt").write_text("image: nginx\n")
    config = config_file(tmp_path, registry.host)
    before = snapshot(repo)

    failed = pinhook("pin", "-i", "--config", config, "-f", repo)

    assert failed.returncode == 1
    stderr = failed.stderr.decode()
    assert f"{repo / 'c.yaml'}:9: cannot pin: {missing} (Pod/c)" in stderr
    assert "(not-found)" in stderr
    assert "d.yaml" not in stderr
    assert snapshot(repo) == before  # no file changed, no temporary file left

    skipped = pinhook("pin", "-i", "--on-failure", "skip", "--config", config, "-f", repo)

    assert skipped.returncode == 0, skipped.stderr.decode()
    assert f"{repo / 'c.yaml'}:9: left unpinned: {missing}" in skipped.stderr.decode()
    after = snapshot(repo)
    assert after["a.yaml"] == pod("a", f"{good.tag_ref}@{good.digest}").encode()
    # Windows line ends stay.
    assert (
        after["sub/b.yml"]
        == pod("b", f"{other.tag_ref}@{other.digest}").replace("\n", "\r\n").encode()
    )
    unchanged = ("c.yaml", ".hidden/d.yaml", "e.json", "notes.txt")
    assert {name: after[name] for name in unchanged} == {name: before[name] for name in unchanged}
    assert set(after) == set(before)


# --- standard input, --check --offline, input errors --------------------------------------


def test_standard_input_to_standard_output_and_several_files_joined(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    image = registry.push.index("stdin/app", "1")
    config = config_file(tmp_path, registry.host)
    text = "# from helm template\n" + pod("app", image.tag_ref)
    piped = pinhook("pin", "--config", config, "-q", stdin=text.encode())
    assert piped.returncode == 0, piped.stderr.decode()
    assert piped.stdout.decode() == text.replace(image.tag_ref, f"{image.tag_ref}@{image.digest}")
    assert piped.stderr == b""  # -q: no summary

    second = tmp_path / "second.yaml"
    second.write_text("---\n" + pod("other", image.tag_ref))
    both = pinhook("pin", "--config", config, "-f", "-", "-f", second, stdin=text.encode())
    assert both.returncode == 0, both.stderr.decode()
    documents = [d for d in yaml.safe_load_all(both.stdout) if d]
    assert [d["metadata"]["name"] for d in documents] == ["app", "other"]
    assert {d["spec"]["containers"][0]["image"] for d in documents} == {
        f"{image.tag_ref}@{image.digest}"
    }


def test_offline_check_judges_form_only_and_never_asks_a_registry(tmp_path: Path) -> None:
    digest = "sha256:" + "c" * 64
    unreachable = "127.0.0.1:9"  # nothing listens on the discard port
    config = config_file(
        tmp_path,
        unreachable,
        extra=f'rewrites:\n  - {{from: "old.example/team", to: "{unreachable}/team"}}\n',
    )
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(pod("a", f"{unreachable}/app:1@{digest}"))
    moved = tmp_path / "moved.yaml"
    moved.write_text(pod("b", f"old.example/team/app@{digest}"))
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(pod("c", "Not/A/Valid"))

    ok = pinhook("pin", "--check", "--offline", "--config", config, "-f", pinned)
    assert (ok.returncode, ok.stdout) == (0, b""), ok.stderr.decode()

    work = pinhook("pin", "--check", "--offline", "--config", config, "-f", moved, "-f", invalid)
    assert work.returncode == 1
    assert work.stdout.decode().splitlines() == [
        f"{moved}:8: old.example/team/app@{digest}: a rewrite rule moves its digest to"
        f" {unreachable}/team/app",
        f"{invalid}:8: Not/A/Valid: invalid reference: {invalid_reason('Not/A/Valid')}",
    ]


def invalid_reason(image: str) -> str:
    try:
        ImageRef.parse(image)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{image} parsed")


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["-f", "{dir}/broken.yaml"], b"", "broken.yaml: not valid YAML at line 3"),
        (["-f", "{dir}/absent.yaml"], b"", "absent.yaml: cannot read"),
        (["-i", "-f", "-"], b"kind: Pod\n", "-i cannot write standard input back"),
        (["--offline"], b"kind: Pod\n", "--offline goes with --check"),
        (["-f", "-"], b"\xff\xfe", "<stdin>: not UTF-8"),
        (["--config", "{dir}/bad-config.yaml", "-f", "-"], b"", "invalid configuration"),
    ],
)
def test_usage_and_input_errors_exit_2_with_a_message_and_no_traceback(
    tmp_path: Path, args: list[str], stdin: bytes, message: str
) -> None:
    (tmp_path / "broken.yaml").write_text("kind: Pod\nspec:\n  image: a: b\n")
    (tmp_path / "bad-config.yaml").write_text("onFailure: sometimes\n")
    result = pinhook("pin", *(a.format(dir=tmp_path) for a in args), stdin=stdin)
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert b"Traceback" not in result.stderr


# --- pieces -------------------------------------------------------------------------------


def test_objects_are_documents_or_the_items_of_lists() -> None:
    pod_a = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}}
    listed = {"apiVersion": "v1", "kind": "List", "items": [pod_a, {"kind": "NoVersion"}, pod_a]}
    assert list(objects_in(listed)) == [("/items/0", pod_a), ("/items/2", pod_a)]
    assert list(objects_in(pod_a)) == [("", pod_a)]
    assert list(objects_in(["not", "an", "object"])) == []


def test_files_are_joined_into_one_stream() -> None:
    assert joined(["a: 1", "", "---\nb: 2\n", "c: 3\n"]) == "a: 1\n---\nb: 2\n---\nc: 3\n"

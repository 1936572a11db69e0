"""``pinhook fn``: the KRM function, on its own and run by the real kustomize binary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.harness.fixtures import RegistryEnv
from webhook.krm import field_path, with_results

REQUIRED = os.environ.get("PINHOOK_E2E_REQUIRED") == "1"


def fn(stdin: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "webhook.cli", "fn", *args],
        input=stdin.encode(),
        capture_output=True,
        timeout=120,
        check=False,
    )


def settings(host: str) -> str:
    registry = f'registry:\n  insecure: ["{host}"]\n  allowedHosts: ["{host}"]\n'
    return registry + "builtinRewrites: false\n"


def function_config(host: str, *, on_failure: str | None = None, indent: str = "  ") -> str:
    """The ConfigMap kustomize passes as functionConfig (the transformer file itself)."""
    lines = [
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: pinhook",
        "  annotations:",
        "    config.kubernetes.io/function: |",
        "      exec:",
        "        path: ./pinhook-fn",
        "data:",
    ]
    if on_failure is not None:
        lines.append(f"  onFailure: {on_failure}")
    lines.append("  config.yaml: |")
    lines += [f"    {line}" for line in settings(host).splitlines()]
    return "".join(f"{indent}{line}\n" for line in lines)


def resource_list(host: str, images: dict[str, str], **options: Any) -> str:
    """A ResourceList as kustomize writes it: block style, annotations on every item."""
    items = "".join(
        f"- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: {name}\n    annotations:\n"
        f"      config.kubernetes.io/index: '{index}'\n"
        f"      internal.config.kubernetes.io/path: pods/{name}.yaml\n"
        f"  spec:\n    containers:\n    - image: {image}  # the app\n      name: app\n"
        for index, (name, image) in enumerate(images.items())
    )
    return (
        "apiVersion: config.kubernetes.io/v1\nkind: ResourceList\nitems:\n"
        f"{items}functionConfig:\n{function_config(host, **options)}"
    )


def test_items_are_pinned_and_the_list_is_otherwise_unchanged(
    registry: RegistryEnv,
) -> None:
    web = registry.push.index("krm/web", "1")
    api = registry.push.index("krm/api", "2")
    text = resource_list(registry.host, {"web": web.tag_ref, "api": api.tag_ref})

    result = fn(text)

    assert result.returncode == 0, result.stderr.decode()
    expected = text.replace(f"{web.tag_ref}  #", f"{web.tag_ref}@{web.digest}  #").replace(
        f"{api.tag_ref}  #", f"{api.tag_ref}@{api.digest}  #"
    )
    assert result.stdout.decode() == expected
    assert "results" not in yaml.safe_load(result.stdout)


def test_a_failure_is_an_error_result_and_the_items_stay_unchanged(
    registry: RegistryEnv,
) -> None:
    web = registry.push.index("krm/fail-web", "1")
    missing = f"{registry.host}/krm/missing:0"
    text = resource_list(registry.host, {"web": web.tag_ref, "gone": missing})

    result = fn(text)

    assert result.returncode == 1
    out = yaml.safe_load(result.stdout)
    assert [item["spec"]["containers"][0]["image"] for item in out["items"]] == [
        web.tag_ref,
        missing,
    ]
    [entry] = out["results"]
    assert entry["severity"] == "error"
    assert entry["message"].startswith(f"cannot pin {missing}: ")
    assert "(not-found)" in entry["message"]
    assert entry["resourceRef"] == {"apiVersion": "v1", "kind": "Pod", "name": "gone"}
    assert entry["field"] == {"path": "spec.containers[0].image", "currentValue": missing}
    assert entry["file"] == {"path": "pods/gone.yaml", "index": 1}
    # The list is written as it came, with the results block added at the end.
    assert result.stdout.decode().startswith(text)
    assert f"error: cannot pin {missing}" in result.stderr.decode()


def test_on_failure_skip_in_function_config_pins_the_rest_with_a_warning(
    registry: RegistryEnv,
) -> None:
    web = registry.push.index("krm/skip-web", "1")
    missing = f"{registry.host}/krm/missing:0"
    text = resource_list(registry.host, {"web": web.tag_ref, "gone": missing}, on_failure="skip")

    result = fn(text)

    assert result.returncode == 0, result.stderr.decode()
    out = yaml.safe_load(result.stdout)
    assert [item["spec"]["containers"][0]["image"] for item in out["items"]] == [
        f"{web.tag_ref}@{web.digest}",
        missing,
    ]
    assert [(r["severity"], r["resourceRef"]["name"]) for r in out["results"]] == [
        ("warning", "gone")
    ]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("  apiVersion: v1\n  kind: Secret\n", "functionConfig must be a ConfigMap"),
        ("  kind: ConfigMap\n  data: {onFailure: maybe}\n", "data.onFailure must be skip or"),
        ("  kind: ConfigMap\n  data: {image: x}\n", "unknown data key 'image'"),
        ("  kind: ConfigMap\n  data:\n    config.yaml: 'onFailure: 3'\n", "invalid configuration"),
    ],
)
def test_a_bad_function_config_exits_2_with_the_reason(config: str, message: str) -> None:
    head = "apiVersion: config.kubernetes.io/v1\nkind: ResourceList\nitems: []\n"
    text = f"{head}functionConfig:\n{config}"
    result = fn(text)
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert b"Traceback" not in result.stderr


def test_input_that_is_no_resource_list_exits_2() -> None:
    result = fn("apiVersion: v1\nkind: Pod\n")
    assert result.returncode == 2
    assert "not one ResourceList" in result.stderr.decode()


def test_field_paths_are_written_as_krm_results_spell_them() -> None:
    assert field_path("/spec/containers/0/image") == "spec.containers[0].image"
    assert field_path("/spec/volumes/1/image/reference") == "spec.volumes[1].image.reference"
    assert field_path("/metadata/annotations/a~1b") == "metadata.annotations.a/b"


def test_results_are_appended_or_the_list_is_written_again() -> None:
    result = {"message": "m", "severity": "error"}
    block = "apiVersion: config.kubernetes.io/v1\nkind: ResourceList\nitems: []  # none\n"
    assert with_results(block, [result]) == block + "results:\n- message: m\n  severity: error\n"
    assert with_results(block, []) == block
    # Results already there (an earlier function's): merged, the list written again.
    earlier = block + "results:\n- {message: earlier, severity: info}\n"
    merged = yaml.safe_load(with_results(earlier, [result]))
    assert [r["message"] for r in merged["results"]] == ["earlier", "m"]
    # JSON in, JSON out.
    as_json = '{"apiVersion": "config.kubernetes.io/v1", "kind": "ResourceList", "items": []}'
    assert orjson.loads(with_results(as_json, [result]))["results"] == [result]


# --- through the real kustomize binary ------------------------------------------------------


def kustomize() -> str:
    """The standalone kustomize: ``kubectl kustomize`` has no --enable-exec, so it cannot run
    exec functions. ``scripts/ensure-cluster --build`` builds it next to kubectl."""
    found = shutil.which("kustomize")
    if found is None:
        message = "kustomize not on PATH (scripts/ensure-cluster --build builds it)"
        if REQUIRED:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def kustomization(root: Path, host: str, images: dict[str, str], **options: Any) -> Path:
    """A kustomization whose transformer is pinhook, run through an exec wrapper script."""
    root.mkdir()
    wrapper = root / "pinhook-fn"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m webhook.cli fn "$@"\n')
    wrapper.chmod(0o755)
    (root / "pinhook.yaml").write_text(function_config(host, indent="", **options))
    for name, image in images.items():
        (root / f"{name}.yaml").write_text(
            f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n"
            f"  containers:\n  - name: app\n    image: {image}  # kept by kustomize\n"
        )
    resources = "".join(f"- {name}.yaml\n" for name in images)
    (root / "kustomization.yaml").write_text(
        f"resources:\n{resources}transformers:\n- pinhook.yaml\n"
    )
    return root


def build(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [kustomize(), "build", "--enable-alpha-plugins", "--enable-exec", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=root.parent,
    )


def test_kustomize_build_runs_pinhook_fn_as_an_exec_function(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    kustomize()
    web = registry.push.index("kustomize/web", "1")
    api = registry.push.image("kustomize/api", "2")
    root = kustomization(tmp_path / "app", registry.host, {"web": web.tag_ref, "api": api.tag_ref})

    built = build(root)

    assert built.returncode == 0, built.stderr
    pods = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(built.stdout)}
    assert set(pods) == {"web", "api"}
    assert pods["web"]["spec"]["containers"][0]["image"] == f"{web.tag_ref}@{web.digest}"
    assert pods["api"]["spec"]["containers"][0]["image"] == f"{api.tag_ref}@{api.digest}"
    # kustomize's own bookkeeping annotations do not leak into the output.
    assert all("annotations" not in pod["metadata"] for pod in pods.values())


def test_kustomize_build_fails_with_pinhooks_reason_when_an_image_cannot_be_pinned(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    kustomize()
    web = registry.push.index("kustomize/fail-web", "1")
    missing = f"{registry.host}/kustomize/missing:0"
    images = {"web": web.tag_ref, "gone": missing}

    failed = build(kustomization(tmp_path / "strict", registry.host, images))

    assert failed.returncode != 0
    assert f"cannot pin {missing}" in failed.stderr
    assert failed.stdout == ""

    skipped = build(kustomization(tmp_path / "lenient", registry.host, images, on_failure="skip"))

    assert skipped.returncode == 0, skipped.stderr
    pods = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(skipped.stdout)}
    assert pods["web"]["spec"]["containers"][0]["image"] == f"{web.tag_ref}@{web.digest}"
    assert pods["gone"]["spec"]["containers"][0]["image"] == missing
    assert f"warning: left unpinned {missing}" in skipped.stderr

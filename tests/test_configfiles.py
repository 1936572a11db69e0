"""Configuration from several files: a ConfigMap volume, a ConfigMap manifest, repeated
``--config``; merged in any order, with a clear error where two files disagree."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from webhook.config import OnFailure, SkipAnnotation, load_settings, load_settings_files
from webhook.configfiles import config_stamp, merge_documents
from webhook.errors import ConfigError
from webhook.kinds import Mode

BASE = (
    "rewrites:\n"
    "  - {from: gcr.io/kubebuilder/kube-rbac-proxy, to: quay.io/brancz/kube-rbac-proxy}\n"
)
ENFORCE = "requireDigest: true\nonFailure: deny\n"
RULES = "rewrites:\n  - {from: docker.io/library/nginx, to: mirror.example.com/nginx}\n"
KINDS = "kinds: {deployments.apps: pin}\nregistry: {insecure: [registry.local:5000]}\n"
MORE = "registry: {timeoutSeconds: 4, insecure: ['other.local:5000']}\n"


def configmap_volume(directory: Path, files: dict[str, str]) -> Path:
    """The layout the kubelet writes: each key a symlink through ``..data`` to a timestamped
    directory, swapped atomically on update."""
    directory.mkdir(exist_ok=True)
    version = directory / f"..{len(list(directory.iterdir()))}"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
    data = directory / "..data"
    staged = directory / "..data_tmp"
    staged.symlink_to(version.name)
    staged.replace(data)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    return directory


def test_a_configmap_volume_is_merged(tmp_path: Path) -> None:
    volume = configmap_volume(
        tmp_path / "config",
        {"config.yaml": BASE, "enforce.yaml": ENFORCE, "rules.yaml": RULES, "w.yaml": KINDS},
    )
    settings = load_settings_files([volume])
    assert settings.require_digest is True
    assert settings.on_failure is OnFailure.DENY
    # Lists add up: the rules of both files.
    assert sorted(str(rule.source) for rule in settings.rewrites) == [
        "docker.io/library/nginx",
        "gcr.io/kubebuilder/kube-rbac-proxy",
    ]
    assert settings.mode_for("deployments.apps") is Mode.PIN
    assert settings.registry.insecure == ("registry.local:5000",)


def test_the_order_of_the_files_does_not_matter(tmp_path: Path) -> None:
    texts = [BASE, ENFORCE, RULES, KINDS, MORE]
    results = []
    for order in itertools.permutations(range(len(texts)), len(texts)):
        documents = [(f"f{i}", yaml.safe_load(texts[i])) for i in order]
        merged = load_settings(yaml.safe_dump(merge_documents(documents)))
        results.append(
            (
                merged.require_digest,
                frozenset(str(rule.source) for rule in merged.rewrites),
                frozenset(merged.registry.insecure),
                merged.registry.timeout_seconds,
            )
        )
    assert len(set(results)) == 1


def test_a_value_set_twice_differently_is_an_error_naming_both(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    first.write_text("onFailure: deny\nregistry: {timeoutSeconds: 4}\n")
    second = tmp_path / "b.yaml"
    second.write_text("onFailure: deny\nregistry: {timeoutSeconds: 5}\n")
    with pytest.raises(ConfigError) as error:
        load_settings_files([first, second])
    assert str(error.value).startswith(
        f"registry.timeoutSeconds is set in both {first} and {second}"
    )
    assert error.value.errors == [f"{first}: 4", f"{second}: 5"]


def test_a_mapping_and_a_scalar_do_not_merge(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="registry is set in both a and b"):
        merge_documents([("a", {"registry": {"skip": []}}), ("b", {"registry": "x"})])
    with pytest.raises(ConfigError, match="b: must be a mapping"):
        merge_documents([("a", {}), ("b", ["x"])])


def test_a_configmap_manifest_gives_each_yaml_key(tmp_path: Path) -> None:
    manifest = tmp_path / "configmap.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "pinhook-config"},
                "data": {"config.yaml": BASE, "enforce.yaml": ENFORCE, "notes.txt": "x: [1"},
            }
        )
    )
    settings = load_settings_files([manifest])
    assert settings.require_digest is True
    empty = tmp_path / "empty.yaml"
    empty.write_text("apiVersion: v1\nkind: ConfigMap\ndata: {other: x}\n")
    with pytest.raises(ConfigError, match=r"no \*\.yaml data key"):
        load_settings_files([empty])


def test_errors_name_the_file(tmp_path: Path) -> None:
    volume = configmap_volume(tmp_path / "config", {"a.yaml": BASE, "b.yaml": "kinds: {x: pin}"})
    with pytest.raises(ConfigError) as error:
        load_settings_files([volume])
    assert "unknown kind 'x'" in " ".join(error.value.errors)
    assert str(volume / "b.yaml") in str(error.value)
    (tmp_path / "void").mkdir()
    with pytest.raises(ConfigError, match=r"no \*\.yaml file"):
        load_settings_files([tmp_path / "void"])


def test_the_stamp_of_a_volume_changes_with_any_key(tmp_path: Path) -> None:
    volume = configmap_volume(tmp_path / "config", {"config.yaml": BASE})
    before = config_stamp(volume)
    assert config_stamp(volume) == before
    configmap_volume(volume, {"config.yaml": BASE, "rules.yaml": RULES})
    added = config_stamp(volume)
    assert added != before
    configmap_volume(volume, {"config.yaml": BASE, "rules.yaml": RULES + "\n"})
    assert config_stamp(volume) != added
    # The kubelet's own entries are never read as configuration.
    assert {path.name for path in volume.iterdir()} >= {"..data", "config.yaml", "rules.yaml"}
    stamp = config_stamp(volume)
    assert isinstance(stamp, tuple)
    assert [name for name, _ in stamp] == ["config.yaml", "rules.yaml"]


def test_skip_annotation_setting_is_validated() -> None:
    assert load_settings("").skip_annotation is SkipAnnotation.AUTO
    assert load_settings("skipAnnotation: ignored").skip_annotation is SkipAnnotation.IGNORED
    with pytest.raises(ConfigError) as error:
        load_settings("skipAnnotation: never")
    assert error.value.errors[0].startswith("skipAnnotation: Input should be")


def test_repeated_config_flags_of_the_cli_merge(tmp_path: Path) -> None:
    files = []
    for name, text in (("config.yaml", BASE), ("enforce.yaml", ENFORCE)):
        path = tmp_path / name
        path.write_text(text)
        files.append(path)
    assert load_settings_files(files).require_digest is True

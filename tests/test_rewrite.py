"""The rewrite map and the settings document that carries it."""

from __future__ import annotations

import pytest

from webhook.config import OnFailure, load_settings
from webhook.errors import ConfigError, InvalidReference
from webhook.kinds import Mode
from webhook.oci.reference import ImageRef
from webhook.rewrite import NamePattern, RewriteMap, RewriteRule


def rule(source: str, target: str) -> RewriteRule:
    return RewriteRule(NamePattern.parse(source), NamePattern.parse(target))


def rewrite(rules: RewriteMap, image: str) -> str:
    return str(rules.apply(ImageRef.parse(image)).result)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("gcr.io/kubebuilder/kube-rbac-proxy:v0.8.0", "quay.io/brancz/kube-rbac-proxy:v0.8.0"),
        ("gcr.io/kubebuilder/kube-rbac-proxy", "quay.io/brancz/kube-rbac-proxy"),
        # A component boundary: kube-rbac-proxyx is another repository.
        (
            "gcr.io/kubebuilder/kube-rbac-proxyx:v1",
            "mirror.example.com/kubebuilder/kube-rbac-proxyx:v1",
        ),
        ("gcr.io/kubebuilderx/app:v1", "registry.example.com/gcr/kubebuilderx/app:v1"),
        ("gcr.io/kubebuilder/other:v1", "mirror.example.com/kubebuilder/other:v1"),
        ("gcr.io/distroless/static:nonroot", "registry.example.com/gcr/distroless/static:nonroot"),
        ("nginx:1.25", "mirror.example.com/library/nginx:1.27"),
        ("nginx", "mirror.example.com/library/nginx:stable"),  # no tag means latest
        ("nginx:1.26", "mirror.example.com/library/nginx:1.26"),
        ("kserve/agent:v0.15.2", "mirror.example.com/kserve/agent:v0.15.2"),
    ],
)
def test_longest_prefix_at_component_boundary_wins(image: str, expected: str) -> None:
    rules = RewriteMap(
        [
            rule("gcr.io", "registry.example.com/gcr"),
            rule("gcr.io/kubebuilder/", "mirror.example.com/kubebuilder"),
            rule("gcr.io/kubebuilder/kube-rbac-proxy", "quay.io/brancz/kube-rbac-proxy"),
            rule("docker.io/library/", "mirror.example.com/library"),
            rule("nginx:1.25", "mirror.example.com/library/nginx:1.27"),
            rule("nginx:latest", "mirror.example.com/library/nginx:stable"),
            rule("docker.io/kserve/", "mirror.example.com/kserve"),
        ]
    )
    assert rewrite(rules, image) == expected


@pytest.mark.parametrize(
    "rules",
    [
        [("a.example.com/x", "b.example.com/x"), ("b.example.com/x", "c.example.com/x")],
        [("reg.example.com", "reg.example.com/cache")],  # would grow on every pass
        [("docker.io/library/", "mirror.example.com/library"), ("nginx:1.25", "nginx:1.27")],
        [("gcr.io/a/", "quay.io/a"), ("quay.io", "mirror.example.com/quay")],
    ],
)
def test_chains_rejected_so_reinvocation_is_idempotent(rules: list[tuple[str, str]]) -> None:
    with pytest.raises(InvalidReference, match="rewrite again"):
        RewriteMap([rule(source, target) for source, target in rules])


def test_tag_rules_that_do_not_chain_are_accepted() -> None:
    rules = RewriteMap([rule("nginx:1.25", "nginx:1.27"), rule("nginx:1.26", "nginx:1.27")])
    assert rewrite(rules, "nginx:1.25") == "docker.io/library/nginx:1.27"
    assert rewrite(rules, "nginx:1.27") == "docker.io/library/nginx:1.27"


def test_new_tag_drops_the_old_tags_digest() -> None:
    digest = "sha256:" + "cd" * 32
    result = RewriteMap([rule("nginx:1.25", "nginx:1.27")]).apply(
        ImageRef.parse(f"nginx:1.25@{digest}")
    )
    assert str(result.result) == "docker.io/library/nginx:1.27"
    assert result.changed and result.result.digest is None


def test_digest_kept_and_flagged_as_moved() -> None:
    digest = "sha256:" + "ab" * 32
    result = RewriteMap([rule("gcr.io/kubebuilder/", "quay.io/brancz/")]).apply(
        ImageRef.parse(f"gcr.io/kubebuilder/kube-rbac-proxy:v0.4.0@{digest}")
    )
    assert result.result.digest == digest and result.result.tag == "v0.4.0"
    assert result.moved_digest


@pytest.mark.parametrize(
    ("source", "target", "problem"),
    [
        ("nginx", "nginx:1.27", "no tag"),
        ("nginx@sha256:" + "a" * 64, "other", "not digests"),
        ("", "x", "empty"),
        ("Upper/Case", "x", "lowercase"),
    ],
)
def test_bad_rules_rejected(source: str, target: str, problem: str) -> None:
    with pytest.raises(InvalidReference, match=problem):
        rule(source, target)


def test_duplicate_from_rejected() -> None:
    with pytest.raises(InvalidReference, match=r"rewrites\[1\] has the same 'from'"):
        RewriteMap([rule("gcr.io/a", "quay.io/a"), rule("gcr.io/a/", "quay.io/b")])


# --- settings -------------------------------------------------------------------------------


def test_empty_document_is_the_default() -> None:
    settings = load_settings("")
    assert rewrite(settings.rewrite_map, "gcr.io/kubebuilder/kube-rbac-proxy:v0.13.1") == (
        "quay.io/brancz/kube-rbac-proxy:v0.13.1"
    )
    assert settings.mode_for("pods") is Mode.PIN
    assert settings.mode_for("servingruntimes.serving.kserve.io") is Mode.REWRITE
    assert settings.mode_for("deployments.apps") is Mode.OFF
    assert settings.policy_for("any").on_failure is OnFailure.ALLOW
    assert settings.registry.timeout_seconds == 8.0


def test_bare_yaml_off_means_off() -> None:
    settings = load_settings("kinds:\n  pods: off\n  cronjobs.batch: pin\n")
    assert settings.mode_for("pods") is Mode.OFF
    assert settings.mode_for("cronjobs.batch") is Mode.PIN


def test_bad_map_names_rule_and_field() -> None:
    text = """
rewrites:
  - from: gcr.io/kubebuilder/kube-rbac-proxy
    to: quay.io/brancz/kube-rbac-proxy
  - from: gcr.io/ok
    to: "Quay.io/Bad Name"
kinds:
  widgets: pin
onFailure: maybe
"""
    with pytest.raises(ConfigError) as caught:
        load_settings(text, source="config.yaml")
    lines = caught.value.errors
    assert any(line.startswith("rewrites[1].to:") for line in lines), lines
    assert any(line.startswith("kinds:") and "widgets" in line for line in lines), lines
    assert not any("rewrites[0]" in line for line in lines), lines
    assert any(line.startswith("onFailure:") for line in lines), lines
    assert str(caught.value).startswith("config.yaml: invalid configuration")


def test_rule_level_errors_name_the_rule() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            "rewrites:\n  - from: gcr.io/a\n    to: quay.io/a\n  - from: nginx\n    to: nginx:2\n"
        )
    assert any(line.startswith("rewrites[1]:") for line in caught.value.errors), caught.value
    with pytest.raises(ConfigError, match=r"rewrites\[0\].*rewrite again"):
        load_settings("rewrites:\n  - from: reg.example.com\n    to: reg.example.com/cache\n")


def test_unknown_field_and_bad_yaml_rejected() -> None:
    with pytest.raises(ConfigError, match="rewrite"):
        load_settings("rewrite: []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings("rewrites: [\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings("- a\n")


def test_namespace_policy_inherits_unset_fields() -> None:
    settings = load_settings(
        "onFailure: deny\n"
        "namespaces:\n  dev:\n    onFailure: allow\n  prod:\n    requireDigest: true\n"
    )
    assert settings.policy_for("dev").on_failure is OnFailure.ALLOW
    prod = settings.policy_for("prod")
    assert prod.on_failure is OnFailure.DENY and prod.require_digest is True


def test_static_digest_table_normalised() -> None:
    digest = "sha256:" + "c" * 64
    settings = load_settings(f"digests:\n  nginx: '{digest}'\n")
    assert settings.digest_table[ImageRef.parse("docker.io/library/nginx:latest")] == digest
    with pytest.raises(ConfigError, match="not a valid digest"):
        load_settings("digests:\n  nginx:1: 'sha256:short'\n")


def test_index_docker_io_is_docker_io_in_rules() -> None:
    assert NamePattern.parse("index.docker.io").prefix == "docker.io"
    rules = RewriteMap([rule("index.docker.io", "mirror.example.com/hub")])
    assert rewrite(rules, "nginx:1") == "mirror.example.com/hub/library/nginx:1"
    with pytest.raises(InvalidReference, match="rewrite again"):
        RewriteMap(
            [rule("gcr.io/", "index.docker.io"), rule("docker.io/library/", "mirror.example.com/l")]
        )


def test_each_rule_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parse = NamePattern.parse
    parsed: list[str] = []

    def counting(text: str) -> NamePattern:
        parsed.append(text)
        return parse(text)

    monkeypatch.setattr(NamePattern, "parse", counting)
    settings = load_settings("rewrites:\n  - from: gcr.io/a\n    to: quay.io/a\n")
    assert parsed == ["gcr.io/a", "quay.io/a"]
    assert [(rule.source, rule.target) for rule in settings.rewrites] == [("gcr.io/a", "quay.io/a")]
    assert str(settings.rewrite_map.rules[0]) == "gcr.io/a -> quay.io/a"

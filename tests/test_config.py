"""The config is validated like the data it controls: what would misbehave at admission is
refused at load, with a reason, and a rejected reload is counted and shown."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from webhook import rewrite
from webhook.config import load_settings, load_settings_file, warnings_for
from webhook.errors import ConfigError
from webhook.kinds import Mode
from webhook.runtime import Runtime


def rejected(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(text)
    return str(caught.value)


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("reg_istry.example/x", "invalid registry 'reg_istry.example'"),
        ("quay .io", "invalid registry 'quay .io'"),
        ("quay.io:\uff18\uff10/x", "invalid registry"),  # fullwidth digits in the port
        ("-quay.io/x", "invalid registry '-quay.io'"),
        ("quay.io:70000/x", "port '70000' is above 65535"),
        ("quay.io/-brancz", "invalid path component"),
    ],
)
def test_a_rule_target_no_image_could_have_is_refused(target: str, problem: str) -> None:
    # Before: accepted, after which every image the rule matched was left as is, or denied
    # under requireDigest with a message blaming the user's valid image.
    message = rejected(f"rewrites:\n  - from: gcr.io/team\n    to: '{target}'\n")
    assert "rewrites[0].to" in message and problem in message


def test_a_key_given_twice_is_refused_not_silently_overridden() -> None:
    message = rejected("requireDigest: true\nonFailure: deny\nrequireDigest: false\n")
    assert "key 'requireDigest' is given twice" in message
    assert "line 3" in message


@pytest.mark.parametrize(
    "cache",
    ["ttlSeconds: .inf", "negativeTtlSeconds: .nan", "maxEntries: 100000000", "ttlSeconds: 1e12"],
)
def test_infinite_lifetimes_and_unbounded_sizes_are_refused(cache: str) -> None:
    message = rejected(f"cache:\n  {cache}\n")
    assert "cache." in message


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"rewrites: []\n\xff\xfe", "not UTF-8 text"),
        ("requireDigest: true\n".encode("utf-16"), "UTF-16 text"),
        # libyaml reports its nesting limit; the pure-Python parser a RecursionError
        (b"a: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", "nest"),
        (b"rewrites: [\n", "not valid YAML"),
    ],
)
def test_unreadable_files_are_config_errors(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=reason):
        load_settings_file(path)


def test_check_config_reports_an_unreadable_file_in_one_line_without_a_traceback(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"a: " + b"[" * 10_000 + b"]" * 10_000 + b"\n")
    result = subprocess.run(
        [sys.executable, "-m", "webhook.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "nest" in result.stderr and "not valid YAML" in result.stderr


def test_check_config_warns_about_a_docker_config_that_is_not_there(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("registry:\n  dockerConfig: /nonexistent/config.json\n")
    assert warnings_for(load_settings_file(path)) == [
        "registry.dockerConfig: /nonexistent/config.json does not exist (here)"
    ]
    result = subprocess.run(
        [sys.executable, "-m", "webhook.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "warning: registry.dockerConfig: /nonexistent/config.json" in result.stderr


def test_a_configmap_manifest_reads_like_its_config_yaml(tmp_path: Path) -> None:
    path = tmp_path / "configmap.yaml"
    path.write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: pinhook-config}\n"
        "data:\n  config.yaml: |\n    requireDigest: true\n"
    )
    assert load_settings_file(path).require_digest is True


def test_the_chain_check_does_not_compare_every_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: every rule against every other; 2,000 rules took 5.7 s and stalled admissions
    # during a reload. Counting comparisons keeps this deterministic.
    calls = 0
    original = rewrite.RewriteRule.output_may_match

    def counted(self: rewrite.RewriteRule, other: rewrite.RewriteRule) -> bool:
        nonlocal calls
        calls += 1
        return original(self, other)

    monkeypatch.setattr(rewrite.RewriteRule, "output_may_match", counted)
    rules = "".join(
        f"  - {{from: gcr.io/team{i}/app, to: quay.io/team{i}/app}}\n" for i in range(2000)
    )
    settings = load_settings(f"builtinRewrites: false\nrewrites:\n{rules}")
    assert len(settings.rewrite_map) == 2000
    assert calls < 4000


def test_a_chain_is_still_found_among_many_rules() -> None:
    rules = "".join(f"  - {{from: gcr.io/a{i}, to: quay.io/a{i}}}\n" for i in range(500))
    message = rejected(f"rewrites:\n{rules}  - {{from: quay.io/a7/x, to: ghcr.io/x}}\n")
    assert "rewrites[7]" in message and "rewrites[500]" in message


async def test_a_rejected_reload_is_counted_and_shown_whatever_the_cause(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("requireDigest: false\n")
    runtime = Runtime(load_settings_file(path), config_path=path)
    async with runtime:
        for bad in (b"\xff\xfe\xfd", b"a: " + b"[" * 5_000 + b"]" * 5_000):
            path.write_bytes(bad)
            assert await runtime.reload_config() is False
            ready, reason = runtime.readiness()
            assert ready is True and "a newer one was rejected" in reason
        metrics = runtime.metrics.render().decode()
        assert 'pinhook_config_reloads_total{result="rejected"} 2.0' in metrics
        assert "pinhook_config_last_reload_valid 0.0" in metrics
        path.write_text("requireDigest: true\n")
        assert await runtime.reload_config() is True
        assert runtime.readiness() == (True, "ok")


async def test_a_large_map_is_validated_off_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("{}\n")
    runtime = Runtime(load_settings_file(path), config_path=path)
    rules = "".join(f"  - {{from: gcr.io/t{i}/app, to: quay.io/t{i}/app}}\n" for i in range(5000))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async with runtime:
        path.write_text(f"rewrites:\n{rules}")
        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        before = ticks
        assert await runtime.reload_config() is True
        ticker.cancel()
    # The loop kept turning while the 5,000 rules were validated.
    assert ticks - before > 10
    assert len(runtime.settings.rewrite_map) == 5000 + 1  # and the built-in rule


def test_modes_global_per_kind_and_per_namespace() -> None:
    settings = load_settings(
        "mode: audit\n"
        "kinds: {pods: pin, servingruntimes.serving.kserve.io: rewrite}\n"
        "namespaces: {legacy: {mode: off}, payments: {mode: pin}, other: {requireDigest: true}}\n"
    )
    knative = "services.serving.knative.dev"
    # `mode` turns the kinds that pin by default to audit; a kind named in `kinds` keeps its own.
    assert settings.mode_for(knative) is Mode.AUDIT
    assert settings.mode_for("pods") is Mode.PIN
    # A namespace's mode replaces the mode of every kind that pins there, and only those.
    assert settings.mode_for(knative, "payments") is Mode.PIN
    assert settings.mode_for("pods", "legacy") is Mode.OFF
    assert settings.mode_for("servingruntimes.serving.kserve.io", "legacy") is Mode.REWRITE
    assert settings.mode_for("deployments.apps", "payments") is Mode.OFF
    assert settings.mode_for(knative, "other") is Mode.AUDIT
    assert settings.modes_for("pods") == {Mode.PIN, Mode.OFF}
    assert settings.modes_for(knative) == {Mode.AUDIT, Mode.PIN, Mode.OFF}


def test_yaml_off_is_a_mode_everywhere() -> None:
    settings = load_settings("mode: off\nnamespaces: {x: {mode: off}}\n")
    assert settings.mode is Mode.OFF
    assert settings.namespaces["x"].mode is Mode.OFF


def test_own_rewrites_keep_the_built_in_rule_unless_turned_off() -> None:
    own = "rewrites: [{from: docker.io/kserve/, to: registry.example.com/kserve}]\n"
    rules = [(str(rule), builtin) for rule, builtin in load_settings(own).effective_rules]
    assert rules == [
        ("docker.io/kserve -> registry.example.com/kserve", False),
        ("gcr.io/kubebuilder/kube-rbac-proxy -> quay.io/brancz/kube-rbac-proxy", True),
    ]
    assert load_settings(own + "builtinRewrites: false\n").effective_rules[-1][1] is False
    # A rule of yours with the built-in's `from` replaces it, with no duplicate error.
    mine = "rewrites: [{from: gcr.io/kubebuilder/kube-rbac-proxy, to: mirror.example.com/krp}]\n"
    ((rule, builtin),) = load_settings(mine).effective_rules
    assert (str(rule.target), builtin) == ("mirror.example.com/krp", False)

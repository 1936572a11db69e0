"""DockerKeyring: parsing docker config documents and the kubelet's matching rules.

Matching vectors come from kubernetes/kubernetes pkg/credentialprovider/keyring_test.go
(TestURLsMatch, TestDockerKeyringForGlob, TestKeyringMiss, TestDockerKeyringLookup,
TestIssue3797, TestIsDefaultRegistryMatch, the Docker Hub hit/miss tests).
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from webhook.errors import ConfigError
from webhook.oci.credential import Credential
from webhook.oci.keychain import DockerKeyring, is_default_registry_match, normalise_key
from webhook.oci.reference import ImageRef


def _auth(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


def _config(entries: dict[str, Any]) -> bytes:
    return json.dumps({"auths": entries}).encode()


def _one(key: str, username: str = "foo", password: str = "bar") -> DockerKeyring:
    entry = {"email": "foo@bar.baz", "auth": _auth(username, password)}
    return DockerKeyring.from_dockercfg(json.dumps({key: entry}).encode(), source="test")


def _users(credentials: list[Credential]) -> list[str]:
    return [c.username for c in credentials]


# -- key normalisation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("https://index.docker.io/v1/", "index.docker.io"),
        ("index.docker.io/v1/", "index.docker.io"),
        ("http://registry.example.com:5000/v2/", "registry.example.com:5000"),
        ("https://quay.io/v1/team", "quay.io/team"),
        ("quay.io/coreos", "quay.io/coreos"),
        ("registry.example.com/", "registry.example.com"),
        ("registry.example.com", "registry.example.com"),
        ("https://*.example.com/v1/", "*.example.com"),
        ("https://user@ghcr.io", "ghcr.io"),
        # Go's url.Parse reads "?" as the start of a query, so it can never be a glob here.
        ("reg?.example.com", "reg"),
        ("reg[0-9].example.com/v2/team", "reg[0-9].example.com/team"),
        # Hosts Go's url.Parse rejects: a backslash, a space, a port that is not a number.
        (r"reg\*.example.com", None),
        ("reg .example.com", None),
        ("reg.example.com:https", None),
    ],
)
def test_normalise_key(raw: str, key: str | None) -> None:
    assert normalise_key(raw) == key


def test_unparseable_keys_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="webhook.oci.keychain")
    doc = {"https://[::1": {"auth": _auth("a", "secret-1")}, "ok.io": {"auth": _auth("b", "p")}}
    keyring = DockerKeyring.from_dockercfg(json.dumps(doc).encode(), source="test")
    assert keyring.keys() == ["ok.io"]
    assert "[::1" in caplog.text
    assert "secret-1" not in caplog.text


# -- TestURLsMatch, through a keyring holding one key -------------------------------------


@pytest.mark.parametrize(
    ("glob", "target", "expected"),
    [
        ("*.kubernetes.io", "prefix.kubernetes.io", True),
        ("prefix.*.io", "prefix.kubernetes.io", True),
        ("prefix.kubernetes.*", "prefix.kubernetes.io", True),
        ("*-good.kubernetes.io", "prefix-good.kubernetes.io", True),
        ("*.kubernetes.io/blah", "prefix.kubernetes.io/blah", True),
        ("prefix.*.io/foo", "prefix.kubernetes.io/foo/bar", True),
        ("*.kubernetes.io:1111/blah", "prefix.kubernetes.io:1111/blah", True),
        ("prefix.*.io:1111/foo", "prefix.kubernetes.io:1111/foo/bar", True),
        ("*.kubernetes.io", "kubernetes.io", False),
        ("*.*.kubernetes.io", "prefix.kubernetes.io", False),
        ("*.*.kubernetes.io", "kubernetes.io", False),
        ("*kubernetes.io", "a.kubernetes.io", False),
        ("*kubernetes.io", "kubernetes.io", True),
        ("*.*.*.kubernetes.io", "a.b.c.kubernetes.io", True),
        ("kubernetes.io", "kubernetes.com", False),
        ("k*.io", "quay.io", False),
        ("*.kubernetes.io:1234/blah", "prefix.kubernetes.io:1111/blah", False),
        ("prefix.*.io/foo", "prefix.kubernetes.io:1111/foo/bar", False),
    ],
)
def test_urls_match_vectors(glob: str, target: str, expected: bool) -> None:
    assert bool(_one(glob).lookup_name(target)) is expected


@pytest.mark.parametrize(
    ("glob", "target"),
    [
        ("https://hello.kubernetes.io", "hello.kubernetes.io"),
        ("https://*.docker.io", "prefix.docker.io"),
        ("https://prefix.*.io", "prefix.docker.io"),
        ("https://prefix.docker.*", "prefix.docker.io"),
        ("https://*.docker.io/path", "prefix.docker.io/path"),
        ("https://prefix.*.io/path", "prefix.docker.io/path/subpath"),
        ("https://prefix.docker.*/path", "prefix.docker.io/path"),
        ("https://*.docker.io:8888", "prefix.docker.io:8888"),
        ("https://prefix.*.io:8888", "prefix.docker.io:8888"),
        ("https://prefix.docker.*:8888", "prefix.docker.io:8888"),
        ("https://*.docker.io/path:1111", "prefix.docker.io/path:1111"),
        ("https://*.docker.io/v1/", "prefix.docker.io/path:1111"),
        ("https://*.docker.io/v2/", "prefix.docker.io/path:1111"),
        ("https://prefix.docker.*/path:1111", "prefix.docker.io/path:1111"),
        ("prefix.docker.io:1111", "prefix.docker.io:1111/path"),
        ("*.docker.io:1111", "prefix.docker.io:1111/path"),
    ],
)
def test_keyring_for_glob(glob: str, target: str) -> None:
    found = _one(glob, "foo", "bar").lookup_name(target + "/foo/bar")
    assert [(c.username, c.password) for c in found] == [("foo", "bar")]


@pytest.mark.parametrize(
    ("glob", "target"),
    [
        ("https://hello.kubernetes.io", "world.mesos.org/foo/bar"),
        ("https://*.docker.com", "prefix.docker.io"),
        ("https://suffix.*.io", "prefix.docker.io"),
        ("https://prefix.docker.c*", "prefix.docker.io"),
        ("https://prefix.*.io/path:1111", "prefix.docker.io/path/subpath:1111"),
        ("suffix.*.io", "prefix.docker.io"),
    ],
)
def test_keyring_miss(glob: str, target: str) -> None:
    assert _one(glob).lookup_name(target + "/foo/bar") == []


@pytest.mark.parametrize(
    ("glob", "target", "expected"),
    [
        ("reg[0-9].example.com", "reg7.example.com", True),
        ("reg[^0-9].example.com", "reg7.example.com", False),
        ("reg[a-c][0-9].example.com", "regb5.example.com", True),
        ("reg[a-c][0-9].example.com", "regd5.example.com", False),
        ("reg[.example.com", "reg[.example.com", False),  # bad pattern never matches
        ("REG.example.com", "reg.example.com", False),  # Go's Match is case-sensitive
    ],
)
def test_host_labels_are_go_filepath_globs(glob: str, target: str, expected: bool) -> None:
    assert bool(_one(glob).lookup_name(target + "/app")) is expected


def test_ports_must_be_equal() -> None:
    keyring = _one("registry.example.com:5000")
    assert keyring.lookup_name("registry.example.com:5000/app") != []
    assert keyring.lookup_name("registry.example.com/app") == []
    assert keyring.lookup_name("registry.example.com:5001/app") == []
    assert _one("registry.example.com").lookup_name("registry.example.com:5000/app") == []


def test_ipv6_registry_with_port() -> None:
    keyring = _one("[fd00::1]:5000")
    assert keyring.lookup_name("[fd00::1]:5000/team/app") != []
    assert keyring.lookup_name("[fd00::2]:5000/team/app") == []


# -- TestDockerKeyringLookup / TestIssue3797: order and path prefixes ---------------------


def test_more_specific_paths_first_and_plain_string_prefix() -> None:
    doc = {
        "bar.example.com/pong": {"username": "grace", "password": "squash"},
        "bar.example.com": {"username": "ada", "password": "smash"},
    }
    keyring = DockerKeyring.from_dockercfg(json.dumps(doc).encode(), source="test")
    assert _users(keyring.lookup_name("bar.example.com")) == ["ada"]
    assert _users(keyring.lookup_name("bar.example.com/pong")) == ["grace", "ada"]
    assert _users(keyring.lookup_name("bar.example.com/ping")) == ["ada"]
    assert _users(keyring.lookup_name("bar.example.com/pongz")) == ["grace", "ada"]
    assert _users(keyring.lookup_name("bar.example.com/pong/pang")) == ["grace", "ada"]
    assert keyring.lookup_name("example.com") == []
    assert keyring.lookup_name("foo.example.com") == []


def test_v1_suffixed_key_matches_every_path() -> None:
    keyring = DockerKeyring.from_dockercfg(
        json.dumps({"https://quay.io/v1/": {"username": "rex", "password": "tiny arms"}}).encode(),
        source="test",
    )
    for name in ("quay.io", "quay.io/foo", "quay.io/foo/bar"):
        assert _users(keyring.lookup_name(name)) == ["rex"]


def test_all_matching_keys_in_reverse_sorted_order() -> None:
    doc = {
        "*.example.com": {"auth": _auth("glob", "p")},
        "reg.example.com": {"auth": _auth("host", "p")},
        "reg.example.com/team": {"auth": _auth("team", "p")},
        "reg.example.com/team/app": {"auth": _auth("app", "p")},
        "other.example.com": {"auth": _auth("other", "p")},
    }
    keyring = DockerKeyring.from_dockerconfigjson(json.dumps({"auths": doc}).encode(), source="s")
    # Reverse byte order puts "reg..." before "*...": '*' sorts below letters.
    assert _users(keyring.lookup_name("reg.example.com/team/app")) == [
        "app",
        "team",
        "host",
        "glob",
    ]


# -- Docker Hub --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("foo/bar", True),
        ("docker.io/foo/bar", True),
        ("index.docker.io/foo/bar", True),
        ("foo", True),
        ("", False),
        ("registry.tld/foo/bar", False),
        ("registry:5000/foo/bar", False),
        ("myhostdocker.io/foo/bar", False),
    ],
)
def test_is_default_registry_match(name: str, expected: bool) -> None:
    assert is_default_registry_match(name) is expected


@pytest.mark.parametrize("image", ["nginx", "library/nginx", "google/docker-registry", "jenkins"])
def test_index_docker_io_credentials_apply_to_docker_hub_images(image: str) -> None:
    keyring = _one("https://index.docker.io/v1/", "hub", "pw")
    ref = ImageRef.parse(image)
    assert ref.name.startswith("docker.io/")
    assert _users(keyring.lookup(ref)) == ["hub"]
    # The unqualified names of the kubelet's own tests take the same fallback.
    assert _users(keyring.lookup_name(image)) == ["hub"]


def test_index_docker_io_credentials_do_not_leak_to_other_registries() -> None:
    keyring = _one("https://index.docker.io/v1/")
    assert keyring.lookup_name("world.mesos.org/foo/bar") == []
    assert keyring.lookup(ImageRef.parse("quay.io/coreos/etcd")) == []


def test_qualified_index_docker_io_name_matches_directly() -> None:
    keyring = _one("https://index.docker.io/v1/")
    assert _users(keyring.lookup_name("index.docker.io/google/docker-registry")) == ["foo"]


def test_docker_io_key_matches_directly_and_suppresses_the_fallback() -> None:
    doc = {
        "https://index.docker.io/v1/": {"auth": _auth("index", "p")},
        "docker.io/team": {"auth": _auth("team", "p")},
    }
    keyring = DockerKeyring.from_dockerconfigjson(_config(doc), source="s")
    assert _users(keyring.lookup(ImageRef.parse("team/app"))) == ["team"]
    assert _users(keyring.lookup(ImageRef.parse("nginx"))) == ["index"]


# -- parsing -----------------------------------------------------------------------------


def test_realistic_dockerconfigjson_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": _auth("hubuser", "hub-token")},
                    "ghcr.io": {"auth": _auth("octocat", "ghp_example")},
                    "registry.example.com:5000": {
                        "username": "robot$ci",
                        "password": "p:a:s:s",
                        "email": "ci@example.com",
                    },
                },
                "credHelpers": {"123456789012.dkr.ecr.us-east-1.amazonaws.com": "ecr-login"},
                "psFormat": "table {{.ID}}",
            },
            indent=2,
        )
    )
    keyring = DockerKeyring.from_file(path)
    assert keyring.keys() == ["registry.example.com:5000", "index.docker.io", "ghcr.io"]
    ghcr = keyring.lookup(ImageRef.parse("ghcr.io/octo/app:1"))
    assert [(c.username, c.password) for c in ghcr] == [("octocat", "ghp_example")]
    assert ghcr[0].source == f"docker config {path}"
    own = keyring.lookup(ImageRef.parse("registry.example.com:5000/team/app"))
    assert [(c.username, c.password) for c in own] == [("robot$ci", "p:a:s:s")]
    assert _users(keyring.lookup(ImageRef.parse("busybox"))) == ["hubuser"]


def test_legacy_dockercfg_file(tmp_path: Path) -> None:
    path = tmp_path / ".dockercfg"
    path.write_text(
        json.dumps({"https://quay.io": {"auth": _auth("legacy", "pw"), "email": "a@b.c"}})
    )
    keyring = DockerKeyring.from_file(path)
    assert _users(keyring.lookup(ImageRef.parse("quay.io/coreos/etcd:v3"))) == ["legacy"]


def test_config_without_auths_gives_no_credentials(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"credsStore": "desktop"}))
    keyring = DockerKeyring.from_file(path)
    assert not keyring
    assert keyring.lookup(ImageRef.parse("nginx")) == []


def test_auth_wins_over_username_and_password() -> None:
    doc = {"r.io": {"auth": _auth("from-auth", "pa"), "username": "plain", "password": "pp"}}
    found = DockerKeyring.from_dockerconfigjson(_config(doc), source="s").lookup_name("r.io/a")
    assert [(c.username, c.password) for c in found] == [("from-auth", "pa")]


def test_empty_auth_falls_back_to_username_and_password() -> None:
    doc = {"r.io": {"auth": "", "username": "plain", "password": "pp"}}
    found = DockerKeyring.from_dockerconfigjson(_config(doc), source="s").lookup_name("r.io/a")
    assert [(c.username, c.password) for c in found] == [("plain", "pp")]


def test_field_names_are_case_insensitive_like_go_json() -> None:
    doc = {"r.io": {"Username": "upper", "Password": "pw"}}
    found = DockerKeyring.from_dockercfg(json.dumps(doc).encode(), source="s").lookup_name("r.io/a")
    assert [(c.username, c.password) for c in found] == [("upper", "pw")]


def test_password_may_contain_colons_and_username_may_be_empty() -> None:
    doc = {"r.io": {"auth": _auth("", "tok:en")}}
    found = DockerKeyring.from_dockerconfigjson(_config(doc), source="s").lookup_name("r.io/a")
    assert [(c.username, c.password) for c in found] == [("", "tok:en")]


def test_malformed_entries_are_skipped_and_secrets_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="webhook.oci.keychain")
    no_colon = base64.b64encode(b"onlyusernameSECRET3").decode()
    doc = {
        "bad-base64.io": {"auth": "!!!SECRET1!!!"},
        "no-colon.io": {"auth": no_colon},
        "not-object.io": "SECRET2",
        "number-password.io": {"username": "u", "password": 12345},
        "placeholder.io": {},
        "good.io": {"auth": _auth("good", "pw")},
    }
    keyring = DockerKeyring.from_dockerconfigjson(_config(doc), source="secret ns/pull")
    assert keyring.keys() == ["good.io"]
    for host in ("bad-base64.io", "no-colon.io", "not-object.io", "number-password.io"):
        assert host in caplog.text
    for secret in ("SECRET1", "SECRET2", "SECRET3", no_colon, "12345"):
        assert secret not in caplog.text
    assert "secret ns/pull" in caplog.text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"auths": {"r.io": {"auth": "SECRETVALUE"', "not valid JSON"),
        (b'["SECRETVALUE"]', "must be a JSON object"),
        (b'{"auths": ["SECRETVALUE"]}', '"auths" must be a JSON object'),
        (b"\xff\xfeSECRETVALUE", "not UTF-8"),
    ],
)
def test_malformed_documents_raise_config_error(data: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        DockerKeyring.from_dockerconfigjson(data, source="secret ns/pull")
    assert "secret ns/pull" in str(info.value)
    assert "SECRETVALUE" not in str(info.value)


def test_malformed_legacy_document_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="must be a JSON object"):
        DockerKeyring.from_dockercfg(b'"just a string"', source="s")


def test_unreadable_file_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        DockerKeyring.from_file(tmp_path / "missing.json")


def test_credential_repr_never_shows_the_password() -> None:
    keyring = _one("r.io", "user", "hunter2")
    assert "hunter2" not in repr(keyring.lookup_name("r.io/a"))
    assert "hunter2" not in repr(keyring)


# -- merge -------------------------------------------------------------------------------


def test_merge_indexes_all_keys_together_and_keeps_keyring_order_per_key() -> None:
    first = DockerKeyring.from_dockerconfigjson(
        _config({"reg.io": {"auth": _auth("pod-host", "p")}}), source="secret ns/pod"
    )
    second = DockerKeyring.from_dockerconfigjson(
        _config(
            {
                "https://reg.io/v1/": {"auth": _auth("sa-host", "p")},
                "reg.io/team": {"auth": _auth("sa-team", "p")},
            }
        ),
        source="secret ns/sa",
    )
    merged = DockerKeyring.merge([first, second])
    found = merged.lookup_name("reg.io/team/app")
    # The more specific key wins over keyring order; under one key, the first keyring leads.
    assert _users(found) == ["sa-team", "pod-host", "sa-host"]
    assert [c.source for c in found] == ["secret ns/sa", "secret ns/pod", "secret ns/sa"]
    assert len(merged) == 3
    assert len(DockerKeyring.merge([])) == 0


def test_merge_uses_index_docker_io_fallback_across_keyrings() -> None:
    merged = DockerKeyring.merge([_one("quay.io", "q"), _one("https://index.docker.io/v1/", "h")])
    assert _users(merged.lookup(ImageRef.parse("nginx"))) == ["h"]
    assert _users(merged.lookup(ImageRef.parse("quay.io/a/b"))) == ["q"]

"""DockerKeyring: parsing docker config documents and the kubelet's matching rules.

Matching vectors come from kubernetes/kubernetes pkg/credentialprovider/keyring_test.go
(TestURLsMatch, TestDockerKeyringForGlob, TestKeyringMiss, TestDockerKeyringLookup,
TestIssue3797, TestIsDefaultRegistryMatch, the Docker Hub hit/miss tests) and Go's
path/filepath match_test.go; decoding vectors from config_test.go
(TestDecodeDockerConfigFieldAuth, TestDockerConfigEntryJSONDecode). Cases marked "v1.36" were
checked against the kubelet v1.36.3 packages themselves (built with Go 1.26).
"""

from __future__ import annotations

import base64
import json
import logging
import random
from typing import Any

import pytest

from webhook.errors import ConfigError
from webhook.oci.credential import Credential
from webhook.oci.keychain import DockerKeyring, decode_auth, is_default_registry_match
from webhook.oci.reference import ImageRef
from webhook.oci.urlmatch import match_label, normalise_key, split_host_port, urls_match


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
        ("https://[::1]:5000/v2/", "[::1]:5000"),
        ("reg%c3%a9.io/team%2Fapp", "regé.io/team/app"),
        # Hosts Go 1.26's url.Parse rejects: a backslash, a space, a port that is not a
        # number, "[" past the start (so no glob classes in hosts), two colons, an escaped
        # ASCII byte, a control character, an IPv4 address in brackets (v1.36).
        (r"reg\*.example.com", None),
        ("reg .example.com", None),
        ("reg.example.com:https", None),
        ("reg[0-9].example.com/v2/team", None),
        ("a:b:5000", None),
        ("reg%41.io", None),
        ("reg.io/\n", None),
        ("[1.2.3.4]:5000", None),
        ("reg.io/%zz", None),
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
    ("pattern", "name", "expected"),
    [
        ("abc", "abc", True),
        ("*", "abc", True),
        ("*c", "abc", True),
        ("a*", "a", True),
        ("a*", "ab/c", False),
        ("a*/b", "abc/b", True),
        ("a*/b", "a/c/b", False),
        ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True),
        ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False),
        ("a*b?c*x", "abxbbxdbxebxczzx", True),
        ("a*b?c*x", "abxbbxdbxebxczzy", False),
        ("ab[b-d]", "abc", True),
        ("ab[^c]", "abc", False),
        ("ab[^e-g]", "abc", True),
        ("a\\*b", "a*b", True),
        ("a\\*b", "ab", False),
        ("a?b", "a\u263ab", True),
        ("a???b", "a\u263ab", False),
        ("[a-\u03b6]*", "\u03b1", True),
        ("a?b", "a/b", False),
        ("[\\]a]", "]", True),
        ("[x\\-]", "-", True),
        ("*x", "xxx", True),
        # malformed patterns never match (Go: ErrBadPattern, which the kubelet ignores)
        ("[]a]", "]", False),
        ("[-]", "-", False),
        ("[x-]", "x", False),
        ("\\", "a", False),
        ("[a-b-c]", "a", False),
        ("a[", "a", False),
        ("a[", "ab", False),
        ("[^bc", "a", False),
        # case-sensitive
        ("REG", "reg", False),
    ],
)
def test_labels_match_as_go_filepath_match(pattern: str, name: str, expected: bool) -> None:
    assert match_label(pattern, name) is expected


@pytest.mark.parametrize(
    ("glob", "target", "expected"),
    [
        # v1.36: no glob classes in hosts, Go's url.Parse refuses "[" past the start
        ("reg[0-9].example.com", "reg7.example.com/app", False),
        ("*.example.com", "reg7.example.com/app", True),
        ("reg?.example.com", "reg7.example.com/app", False),  # "?" starts a query
        ("REG.example.com", "reg.example.com/app", False),
        ("*.io", "prefix.kubernetes.io/app", False),
        ("registry.io/foo", "registry.io/foobar/x", True),  # a plain string prefix
        ("registry.io/foo/", "registry.io/foo", False),
        ("docker.io", "docker.io/library/nginx", True),
        ("index.docker.io", "docker.io/library/nginx", False),
        ("*", "localhost/x", True),
        ("*", "docker.io/library/nginx", False),
        ("*.*", "docker.io/library/nginx", True),
        ("https://registry.io", "registry.io/x", False),
        ("?cr.io", "gcr.io/x", False),
    ],
)
def test_urls_match_like_the_kubelet(glob: str, target: str, expected: bool) -> None:
    assert urls_match(glob, target) is expected


@pytest.mark.parametrize(
    ("hostport", "expected"),
    [
        ("[::1]:5000", ("::1", "5000")),
        ("reg.io:5000", ("reg.io", "5000")),
        ("reg.io:", ("reg.io", "")),
        ("reg.io:05000", ("reg.io", "05000")),
        ("reg.io", None),
        ("[::1]", None),
        ("a:b:c", None),
        ("[::1]x:5", None),
        ("[::1]:5:6", None),
        ("a[b:5", None),
    ],
)
def test_split_host_port_is_gos(hostport: str, expected: tuple[str, str] | None) -> None:
    assert split_host_port(hostport) == expected


def test_ports_are_compared_as_strings() -> None:
    # The kubelet compares "05000" with "5000" as text: no match either way (v1.36).
    assert _one("registry.example.com:05000").lookup_name("registry.example.com:5000/app") == []
    assert _one("registry.example.com:5000").lookup_name("registry.example.com:05000/app") == []
    assert _one("registry.example.com:05000").lookup_name("registry.example.com:05000/a") != []


def test_bracketed_ipv6_key_without_port_matches_nothing() -> None:
    # net.SplitHostPort fails on "[::1]", so the kubelet keeps the brackets and reads the one
    # label "[::1]" as a character class, which no image's "[::1]" matches (v1.36).
    keyring = _one("[::1]")
    assert keyring.keys() == ["[::1]"]
    assert keyring.lookup_name("[::1]/team/app") == []
    assert _one("[::1]:5000").lookup_name("[::1]:5000/team/app") != []


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


# -- decoding "auth" exactly as the kubelet does ---------------------------------------------

FOO_BAR = [
    "Zm9vOmJhcg==",  # padded
    "Zm9vOmJhcg",  # not well padded
    "Zm9vOm\nJhcg==\n",  # new line characters
    "\r\nZm9v\rOmJh\ncg",
    base64.b64encode(b"foo:bar").decode(),
    base64.b64encode(b"foo:bar").decode().rstrip("="),
    "Zm9vOmJhch==",  # non-zero trailing bits are tolerated (Go's decoder is not strict)
]


@pytest.mark.parametrize("field", FOO_BAR)
def test_decode_auth_accepts_what_the_kubelet_accepts(field: str) -> None:
    assert decode_auth(field) == ("foo", "bar")


@pytest.mark.parametrize(
    "field",
    [
        "cGFudHM=",  # good base64 data, but no colon
        "Zm9vOmJhcg== ",  # only new line characters are ignored
        " Zm9vOmJhcg==",
        "Zm9v\tOmJhcg==",
        "pants",  # bad base64 data
        "Zm9vOmJhcg=",  # wrong padding
        "Zm9vOmJhcg===",
        "Zm9v=OmJhcg",
        "Pz8_Pz86",  # the URL-safe alphabet is not base64 here
        "Zm9vO",  # a length no base64 text has
        "\n",
    ],
)
def test_decode_auth_refuses_what_the_kubelet_refuses(field: str) -> None:
    with pytest.raises(ValueError, match="auth") as caught:
        decode_auth(field)
    assert field.strip() not in str(caught.value) or not field.strip()


@pytest.mark.parametrize(
    ("plain", "expected"),
    [
        (b"a:b:c", ("a", "b:c")),  # the first colon splits
        (b":b", ("", "b")),
        (b"a:", ("a", "")),
        (b"foo:bar\n", ("foo", "bar\n")),  # `echo foo:bar | base64`: nothing is trimmed
        (b"foo:bar\x00", ("foo", "bar\x00")),
    ],
)
def test_decode_auth_splits_at_the_first_colon_and_trims_nothing(
    plain: bytes, expected: tuple[str, str]
) -> None:
    assert decode_auth(base64.b64encode(plain).decode()) == expected


def test_decode_auth_on_generated_inputs() -> None:
    """Every encoding the kubelet accepts decodes to the pair; every damage it refuses is
    refused. A model independent of the code: the generator knows which it made."""
    rng = random.Random(13)
    alphabet = "ab:é\x00/+ "
    for _ in range(3000):
        username = "".join(rng.choice(alphabet.replace(":", "")) for _ in range(rng.randint(0, 6)))
        password = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
        if rng.random() < 0.5:
            encoded = encoded.rstrip("=")
        for _ in range(rng.randint(0, 3)):  # \r and \n anywhere are skipped
            at = rng.randint(0, len(encoded))
            encoded = encoded[:at] + rng.choice("\r\n") + encoded[at:]
        assert decode_auth(encoded) == (username, password), repr(encoded)
        damaged = _damage(rng, encoded)
        with pytest.raises(ValueError, match="auth"):
            decode_auth(damaged)


def _damage(rng: random.Random, encoded: str) -> str:
    """One change the kubelet's decoder refuses."""
    body = encoded.replace("\r", "").replace("\n", "").rstrip("=")
    choice = rng.randrange(4)
    if choice == 0:  # a character outside the alphabet, anywhere
        at = rng.randint(0, len(encoded))
        return encoded[:at] + rng.choice(" \t-_*.\v") + encoded[at:]
    if choice == 1:  # padding in the middle
        at = rng.randint(0, max(len(body) - 1, 0))
        return body[:at] + "=" + body[at:] + "A"
    if choice == 2 and body:  # a length of 4n+1
        return body + "A" * ((1 - len(body)) % 4)
    return body + "A" * ((-len(body)) % 4) + "==="  # too much padding


# -- documents, read as Go's encoding/json reads them ----------------------------------------


def _found(document: Any, image: str = "r.io/a") -> list[tuple[str, str]]:
    keyring = DockerKeyring.from_dockerconfigjson(json.dumps(document).encode(), source="s")
    return [(c.username, c.password) for c in keyring.lookup_name(image)]


def test_auth_wins_over_username_and_password() -> None:
    entry = {"username": "foo", "password": "bar", "auth": "cGluZzpwb25n"}
    assert _found({"auths": {"r.io": entry}}) == [("ping", "pong")]


def test_empty_auth_falls_back_to_username_and_password() -> None:
    entry = {"auth": "", "username": "plain", "password": "pp"}
    assert _found({"auths": {"r.io": entry}}) == [("plain", "pp")]


def test_field_names_are_case_insensitive_like_go_json() -> None:
    assert _found({"Auths": {"r.io": {"AUTH": "Zm9vOmJhcg=="}}}) == [("foo", "bar")]
    assert _found({"auths": {"r.io": {"Username": "upper", "PASSWORD": "pw"}}}) == [("upper", "pw")]
    # Go folds U+017F (long s) to "s" and U+212A (Kelvin sign) to "k"
    assert _found({"auths": {"r.io": {"u\u017fername": "u", "password": "p"}}}) == [("u", "p")]
    # Registry keys are map keys: compared as written.
    assert _found({"auths": {"R.io": {"auth": "Zm9vOmJhcg=="}}}) == []


def test_null_leaves_a_field_as_it_was_and_the_last_value_wins() -> None:
    entry = '{"username": "a", "Username": null, "password": "p", "PASSWORD": "q"}'
    document = f'{{"auths": {{"r.io": {entry}}}}}'.encode()
    found = DockerKeyring.from_dockerconfigjson(document, source="s").lookup_name("r.io/x")
    assert [(c.username, c.password) for c in found] == [("a", "q")]


def test_tokens_and_unknown_fields_are_ignored_as_by_the_kubelet() -> None:
    entry = {"auth": "Zm9vOmJhcg==", "identitytoken": "tok", "registrytoken": "rt", "x": 1}
    keyring = DockerKeyring.from_dockerconfigjson(
        json.dumps({"auths": {"r.io": entry}, "credsStore": "desktop"}).encode(), source="s"
    )
    (credential,) = keyring.lookup_name("r.io/a")
    assert (credential.identity_token, credential.registry_token) == ("", "")


def test_password_may_contain_colons_and_username_may_be_empty() -> None:
    assert _found({"auths": {"r.io": {"auth": _auth("", "tok:en")}}}) == [("", "tok:en")]


def test_an_entry_without_credentials_matches_but_is_not_returned() -> None:
    # The kubelet keeps it: it matches, so the Docker Hub fallback is not taken; containerd
    # then pulls anonymously with it, so pinhook does not send it.
    document = {
        "auths": {"docker.io": {}, "https://index.docker.io/v1/": {"auth": _auth("hub", "p")}}
    }
    assert _found(document, "docker.io/library/nginx") == []
    assert _found({"auths": {"r.io": None}}) == []


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"auths": {"bad.io": {"auth": "!!!SECRET1!!!"}}}, "'bad.io': \"auth\" is not base64"),
        ({"auths": {"colon.io": {"auth": "U0VDUkVUMg=="}}}, "username:password"),
        ({"auths": {"obj.io": "SECRET3"}}, "'obj.io': the entry is not a JSON object"),
        ({"auths": {"num.io": {"username": "u", "password": 12345}}}, "'password' is not a"),
        ({"auths": {"mail.io": {"auth": _auth("a", "b"), "email": False}}}, "'email'"),
        ({"auths": ["SECRET4"]}, '"auths" must be a JSON object'),
        ({"auths": {}, "HttpHeaders": {"X": 1}}, '"HttpHeaders" must be'),
        (["SECRET5"], "must be a JSON object"),
    ],
)
def test_one_bad_entry_makes_the_whole_document_unusable(document: Any, problem: str) -> None:
    good = {"good.io": {"auth": _auth("good", "pw")}}
    if isinstance(document, dict) and isinstance(document.get("auths"), dict):
        document["auths"] = {**good, **document["auths"]}
    with pytest.raises(ConfigError) as caught:
        DockerKeyring.from_dockerconfigjson(json.dumps(document).encode(), source="secret ns/p")
    message = str(caught.value)
    assert message.startswith("secret ns/p: ")
    assert problem in message
    for secret in ("SECRET", "12345", "pw", "U0VDUkVUMg"):
        assert secret not in message


def test_a_repeated_key_is_read_every_time() -> None:
    # Go decodes both members; an error in the first still fails the document.
    document = b'{"auths": {"r.io": {"auth": "pants"}, "r.io": {"auth": "Zm9vOmJhcg=="}}}'
    with pytest.raises(ConfigError, match="not base64"):
        DockerKeyring.from_dockerconfigjson(document, source="s")
    # Repeated "auths" members fill one map, as in Go.
    merged = b'{"auths": {"a.io": {"auth": "Zm9vOmJhcg=="}}, "Auths": {"b.io": {}}}'
    assert DockerKeyring.from_dockerconfigjson(merged, source="s").keys() == ["b.io", "a.io"]


@pytest.mark.parametrize("document", [b"null", b"{}", b'{"auths": null}', b'{"auths": {}}'])
def test_empty_documents_give_no_credentials(document: bytes) -> None:
    assert not DockerKeyring.from_dockerconfigjson(document, source="s")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"auths": {"r.io": {"auth": "SECRETVALUE"', "not valid JSON"),
        (b"\xff\xfeSECRETVALUE", "not valid JSON"),
        (b'{"auths": {"r.io": {"auth": NaN}}}', "not valid JSON"),
        (b'\xef\xbb\xbf{"auths": {}}', "not valid JSON"),  # Go refuses a byte order mark
    ],
)
def test_malformed_documents_raise_config_error(data: bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        DockerKeyring.from_dockerconfigjson(data, source="secret ns/pull")
    assert "secret ns/pull" in str(info.value)
    assert "SECRETVALUE" not in str(info.value)


def test_bytes_that_are_not_utf8_inside_strings_are_kept_as_go_keeps_them() -> None:
    document = b'{"auths": {"r.io": {"username": "u\xff", "password": "p"}}}'
    found = DockerKeyring.from_dockerconfigjson(document, source="s").lookup_name("r.io/x")
    assert [(c.username, c.password) for c in found] == [("u\ufffd", "p")]


def test_legacy_dockercfg_document() -> None:
    document = {"https://quay.io": {"auth": _auth("legacy", "pw"), "email": "a@b.c"}}
    keyring = DockerKeyring.from_dockercfg(json.dumps(document).encode(), source="s")
    assert _users(keyring.lookup(ImageRef.parse("quay.io/coreos/etcd:v3"))) == ["legacy"]


def test_malformed_legacy_document_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="must be a JSON object"):
        DockerKeyring.from_dockercfg(b'"just a string"', source="s")


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

"""Image reference grammar and normalisation, with vectors from distribution/reference's tests
(reference_test.go, normalize_test.go, regexp_test.go) and go-digest's digest rules."""

from __future__ import annotations

import pytest

from webhook.config import load_settings
from webhook.errors import ConfigError, InvalidReference, PinhookError
from webhook.oci import registry
from webhook.oci.reference import (
    MAX_REFERENCE_LENGTH,
    ImageRef,
    is_valid_digest,
    is_valid_tag,
    parse_name,
)

SHA256 = "sha256:" + "f" * 64
SHA256_B = "sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"
SHA384 = "sha384:" + "a" * 96
SHA512 = "sha512:" + "f" * 128


# input -> (registry, repository, tag, digest), normalised as ParseNormalizedNamed does.
VALID: list[tuple[str, tuple[str, str, str | None, str | None]]] = [
    # Docker Hub short forms
    ("nginx", ("docker.io", "library/nginx", None, None)),
    ("nginx:1.25", ("docker.io", "library/nginx", "1.25", None)),
    ("library/nginx", ("docker.io", "library/nginx", None, None)),
    ("docker.io/nginx", ("docker.io", "library/nginx", None, None)),
    ("docker.io/library/nginx:1.25", ("docker.io", "library/nginx", "1.25", None)),
    ("index.docker.io/nginx", ("docker.io", "library/nginx", None, None)),
    ("index.docker.io/foo/bar:v1", ("docker.io", "foo/bar", "v1", None)),
    ("user/repo", ("docker.io", "user/repo", None, None)),
    ("docker/migrator", ("docker.io", "docker/migrator", None, None)),
    ("test_com", ("docker.io", "library/test_com", None, None)),
    ("test_com/foo", ("docker.io", "test_com/foo", None, None)),
    ("library/foo/bar", ("docker.io", "library/foo/bar", None, None)),
    ("store/foo/bar", ("docker.io", "store/foo/bar", None, None)),
    # no "/": a host-looking first component is still a Docker Hub name, and ":5000" a tag
    ("test.com:tag", ("docker.io", "library/test.com", "tag", None)),
    ("test.com:5000", ("docker.io", "library/test.com", "5000", None)),
    ("localhost:5000", ("docker.io", "library/localhost", "5000", None)),
    ("192.168.1.1", ("docker.io", "library/192.168.1.1", None, None)),
    ("192.168.1.1:5000", ("docker.io", "library/192.168.1.1", "5000", None)),
    ("foo_bar.com:8080", ("docker.io", "library/foo_bar.com", "8080", None)),
    ("foo/foo_bar.com:8080", ("docker.io", "foo/foo_bar.com", "8080", None)),
    # registries with ports, localhost, IPv4, IPv6
    (
        "quay.io/brancz/kube-rbac-proxy:v0.18.0",
        ("quay.io", "brancz/kube-rbac-proxy", "v0.18.0", None),
    ),
    ("test:5000/repo", ("test:5000", "repo", None, None)),
    ("test:5000/repo:tag", ("test:5000", "repo", "tag", None)),
    ("test-com:8080/foo", ("test-com:8080", "foo", None, None)),
    ("localhost/foo", ("localhost", "foo", None, None)),
    ("localhost:5000/a/b:t", ("localhost:5000", "a/b", "t", None)),
    ("host:65535/x", ("host:65535", "x", None, None)),
    ("127.0.0.1:5000/debian", ("127.0.0.1:5000", "debian", None, None)),
    ("192.168.1.1/repo", ("192.168.1.1", "repo", None, None)),
    ("192.168.1.1:5000/repo:5050", ("192.168.1.1:5000", "repo", "5050", None)),
    ("[2001:db8::1]/repo", ("[2001:db8::1]", "repo", None, None)),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", ("[2001:db8:1:2:3:4:5:6]", "repo", "tag", None)),
    ("[2001:db8::1]:5000/repo", ("[2001:db8::1]:5000", "repo", None, None)),
    ("[2001:db8::]:5000/repo", ("[2001:db8::]:5000", "repo", None, None)),
    ("[::1]:5000/repo", ("[::1]:5000", "repo", None, None)),
    ("[fc00::1]:5000/docker/docker", ("[fc00::1]:5000", "docker/docker", None, None)),
    # upper case in the first component makes it a registry (distribution's rule)
    ("Foo/bar", ("Foo", "bar", None, None)),
    ("DOCKER/docker", ("DOCKER", "docker", None, None)),
    # deep paths, separators, punycode hosts
    ("sub-dom1.foo.com/bar/baz/quux", ("sub-dom1.foo.com", "bar/baz/quux", None, None)),
    (
        "b.gcr.io/test.example.com/my-app:test.example.com",
        ("b.gcr.io", "test.example.com/my-app", "test.example.com", None),
    ),
    ("xn--n3h.com/myimage:xn--n3h.com", ("xn--n3h.com", "myimage", "xn--n3h.com", None)),
    ("docker-rules/docker", ("docker.io", "docker-rules/docker", None, None)),
    ("docker---rules/docker", ("docker.io", "docker---rules/docker", None, None)),
    ("dock__er/docker", ("docker.io", "dock__er/docker", None, None)),
    ("foo/a.b_c__d-e---f", ("docker.io", "foo/a.b_c__d-e---f", None, None)),
    ("d/docker", ("docker.io", "d/docker", None, None)),
    ("jess/t", ("docker.io", "jess/t", None, None)),
    (
        "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
        (
            "docker.io",
            "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
            None,
            None,
        ),
    ),
    # 63 hex characters is a name, and a hex name behind a registry is fine
    (
        "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9",
        (
            "docker.io",
            "library/dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9",
            None,
            None,
        ),
    ),
    (
        "docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
        (
            "docker.io",
            "library/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a",
            None,
            None,
        ),
    ),
    # tags: upper case, 128 characters, leading underscore or digit
    ("lowercase:Uppercase", ("docker.io", "library/lowercase", "Uppercase", None)),
    ("foo:" + "t" * 128, ("docker.io", "library/foo", "t" * 128, None)),
    ("foo:_x", ("docker.io", "library/foo", "_x", None)),
    ("foo:1-x.y_z", ("docker.io", "library/foo", "1-x.y_z", None)),
    # digests, alone and with a tag; sha384 and sha512
    ("redis@" + SHA256_B, ("docker.io", "library/redis", None, SHA256_B)),
    ("busybox:latest@" + SHA256_B, ("docker.io", "library/busybox", "latest", SHA256_B)),
    ("test:5000/repo@" + SHA256, ("test:5000", "repo", None, SHA256)),
    ("test:5000/repo:tag@" + SHA256, ("test:5000", "repo", "tag", SHA256)),
    ("[2001:db8::1]:5000/repo:tag@" + SHA256, ("[2001:db8::1]:5000", "repo", "tag", SHA256)),
    (
        "xn--7o8h.com/myimage:xn--7o8h.com@" + SHA512,
        ("xn--7o8h.com", "myimage", "xn--7o8h.com", SHA512),
    ),
    ("gcr.io/foo/bar@" + SHA384, ("gcr.io", "foo/bar", None, SHA384)),
    # "sha256:<hex>" alone is the name "sha256" with a tag, as in ParseNormalizedNamed
    (SHA256_B, ("docker.io", "library/sha256", SHA256_B.split(":")[1], None)),
    # the repository limit is 255 characters without the registry
    ("example.com/" + "a" * 255 + ":tag", ("example.com", "a" * 255, "tag", None)),
    # not a host name but a path component: distribution reads a name without a domain, and
    # the runtime pulls from the host foo_bar.com (tests/test_reference_parity.py)
    ("foo_bar.com/x:1", ("foo_bar.com", "x", "1", None)),
    (
        "a/" * 127 + "a:tag-puts-this-over-max",
        ("docker.io", "a/" * 127 + "a", "tag-puts-this-over-max", None),
    ),
]


@pytest.mark.parametrize(("text", "expected"), VALID, ids=[text[:60] for text, _ in VALID])
def test_parse_valid(text: str, expected: tuple[str, str, str | None, str | None]) -> None:
    ref = ImageRef.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected
    assert ref == ImageRef(*expected)


# input -> a fragment the message must contain
INVALID: list[tuple[str, str]] = [
    ("", "reference is empty"),
    ("Nginx", "repository name must be lowercase"),
    ("Uppercase:tag", "repository name must be lowercase"),
    ("docker/Docker", "repository name must be lowercase"),
    ("docker.io/docker/Docker", "repository name must be lowercase"),
    ("test:5000/Uppercase/lowercase:tag", "repository name must be lowercase"),
    ("localhost/Foo", "repository name must be lowercase"),
    ("quay.io/foo/Bar@" + SHA256, "repository name must be lowercase"),
    # empty components, trailing slash, leading/trailing/doubled separators
    ("docker/", "empty path component"),
    ("quay.io/foo/", "empty path component"),
    ("docker///docker", "empty path component"),
    ("docker.io/docker///docker", "empty path component"),
    ("quay.io//foo", "empty path component"),
    ("/foo", "empty path component"),
    ("-docker", "invalid path component '-docker'"),
    ("-docker/docker", "invalid path component '-docker'"),
    ("docker-/docker", "invalid path component 'docker-'"),
    ("-docker-/docker", "invalid path component"),
    ("____/____", "invalid path component"),
    ("_docker/_docker", "invalid path component"),
    ("dock..er/docker", "invalid"),
    ("quay.io/dock..er", "invalid path component 'dock..er'"),
    ("quay.io/dock___er", "invalid path component"),
    ("quay.io/dock_.er", "invalid path component"),
    ("quay.io/dock-.er", "invalid path component"),
    ("quay.io/foo.", "invalid path component"),
    ("aa/asdf$$^/aa", "invalid path component 'asdf$$^'"),
    ("https://github.com/docker/docker", "invalid"),
    # bad registries
    ("-docker.io/docker/docker", "invalid registry '-docker.io'"),
    ("foo_bar.com:5000/x", "invalid registry 'foo_bar.com:5000'"),
    ("Foo_bar.com/x", "invalid registry 'Foo_bar.com'"),
    ("foo_bar.com/" + "x" * 244, "(it has 256: 'foo_bar.com' is read as part of it)"),
    ("fc00::1:5000/debian", "invalid registry"),
    ("[fe80::1%eth0]:5000/repo", "invalid registry"),
    ("[fe80::1%@invalidzone]:5000/repo", "invalid"),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", "invalid registry"),
    ("[2001:db8::1]", "invalid"),
    ("[2001:db8::1]:5000", "invalid"),
    ("[2001:db8::1]:tag", "invalid"),
    ("[fc00::1]", "invalid"),
    ("foo.com:port/bar", "invalid registry 'foo.com:port'"),
    # distribution takes any digits as a port; a TCP port ends at 65535 (pinhook's divergence)
    ("host:65536/x", "port '65536' is above 65535"),
    ("host:99999999999999999999/x:1", "port '99999999999999999999' is above 65535"),
    ("[::1]:70000/x", "port '70000' is above 65535"),
    ("localhost:" + "9" * 4000 + "/x", "is above 65535"),
    # tags
    ("nginx:", "tag is empty"),
    (":justtag", "repository name is missing"),
    ("nginx:.bad", "invalid tag '.bad'"),
    ("nginx:-bad", "invalid tag '-bad'"),
    ("nginx:a+b", "invalid tag 'a+b'"),
    ("foo:" + "t" * 129, "tag must not be more than 128 characters"),
    ("nginx:caf\u00e9", "invalid tag"),
    ("nginx:\u0661\u0662", "invalid tag"),  # Arabic-Indic digits match Python's \w, not Go's
    ("nginx:1.25\n", "invalid tag"),
    ("nginx\n", "invalid path component"),
    # digests
    ("@" + SHA256, "repository name is missing"),
    ("repo@sha256:" + "f" * 34, "expected 64 hex characters, got 34"),
    ("repo@sha256:" + "f" * 63, "expected 64 hex characters, got 63"),
    ("repo@sha256:" + "f" * 65, "expected 64 hex characters, got 65"),
    ("repo@sha256:" + "F" * 64, "hex must be lowercase"),
    ("repo@sha256:" + "g" * 64, "is not hexadecimal"),
    ("repo@sha512:" + "f" * 64, "expected 128 hex characters, got 64"),
    ("validname@invaliddigest:" + "f" * 64, "unsupported digest algorithm 'invaliddigest'"),
    ("repo@md5:" + "f" * 32, "unsupported digest algorithm 'md5'"),
    ("repo@SHA256:" + "f" * 64, "unsupported digest algorithm 'SHA256'"),
    ("repo@" + "f" * 64, "expected 'algorithm:hex'"),
    ("repo@", "expected 'algorithm:hex'"),
    ("repo@sha256:", "expected 64 hex characters, got 0"),
    ("repo:tag@" + SHA256 + "@" + SHA256, "invalid"),
    ("repo:tag:tag", "invalid"),
    ("repo@" + SHA256 + ":tag", "invalid"),
    # names too long, image IDs
    ("domain/" + "a" * 256 + ":tag", "must not be more than 255 characters (it has 263)"),
    ("a/" * 128 + "a:tag", "must not be more than 255 characters (it has 257)"),
    ("example.com/" + "a" * 256, "must not be more than 255 characters (it has 256)"),
    ("n" * 248, "must not be more than 255 characters (it has 256)"),  # counts "library/"
    (
        "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_" * 4 + "/docker",
        "must not be more than 255 characters",
    ),
    ("1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "image ID"),
    ("quay.io/" + "a" * MAX_REFERENCE_LENGTH, f"longer than {MAX_REFERENCE_LENGTH} characters"),
    # whitespace is never trimmed
    (" nginx", "invalid"),
    ("nginx ", "invalid"),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID, ids=[repr(t[:60]) for t, _ in INVALID])
def test_parse_invalid(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        ImageRef.parse(text)
    message = str(caught.value)
    assert message.startswith("invalid reference ")
    assert fragment in message


def test_lowercase_message_names_the_input() -> None:
    with pytest.raises(
        InvalidReference, match=r"^invalid reference 'Nginx': repository name must be lowercase$"
    ):
        ImageRef.parse("Nginx")


def test_invalid_reference_is_a_value_error_and_a_pinhook_error() -> None:
    with pytest.raises(InvalidReference) as caught:
        ImageRef.parse("Nginx")
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, PinhookError)


def test_a_hostile_input_is_cut_short_in_the_message() -> None:
    with pytest.raises(InvalidReference) as caught:
        ImageRef.parse("a" * 10_000 + "!")
    assert len(str(caught.value)) < 400


def test_errors_are_raised_again_on_every_parse() -> None:
    # the parse cache must never turn a failure into a success or swallow it
    for _ in range(3):
        with pytest.raises(InvalidReference):
            ImageRef.parse("Nginx:1")


# (input, familiar name, normalised name), from distribution's TestParseRepositoryInfo
NAMES: list[tuple[str, str, str]] = [
    ("fooo/bar", "fooo/bar", "docker.io/fooo/bar"),
    ("index.docker.io/fooo/bar", "fooo/bar", "docker.io/fooo/bar"),
    ("ubuntu", "ubuntu", "docker.io/library/ubuntu"),
    ("library/ubuntu", "ubuntu", "docker.io/library/ubuntu"),
    ("docker.io/library/ubuntu", "ubuntu", "docker.io/library/ubuntu"),
    ("nonlibrary/ubuntu", "nonlibrary/ubuntu", "docker.io/nonlibrary/ubuntu"),
    ("other/library", "other/library", "docker.io/other/library"),
    (
        "127.0.0.1:8000/private/moonbase",
        "127.0.0.1:8000/private/moonbase",
        "127.0.0.1:8000/private/moonbase",
    ),
    ("127.0.0.1:8000/privatebase", "127.0.0.1:8000/privatebase", "127.0.0.1:8000/privatebase"),
    (
        "example.com/private/moonbase",
        "example.com/private/moonbase",
        "example.com/private/moonbase",
    ),
    (
        "example.com:8000/privatebasee",
        "example.com:8000/privatebasee",
        "example.com:8000/privatebasee",
    ),
    ("ubuntu-12.04-base", "ubuntu-12.04-base", "docker.io/library/ubuntu-12.04-base"),
    (
        "index.docker.io/library/ubuntu-12.04-base",
        "ubuntu-12.04-base",
        "docker.io/library/ubuntu-12.04-base",
    ),
    ("docker.io/foo", "foo", "docker.io/library/foo"),
    ("docker.io/library/foo/bar", "library/foo/bar", "docker.io/library/foo/bar"),
    ("store/foo/bar", "store/foo/bar", "docker.io/store/foo/bar"),
    ("Foo/bar", "Foo/bar", "Foo/bar"),
    ("FOO/bar", "FOO/bar", "FOO/bar"),
    ("localhost/foo", "localhost/foo", "localhost/foo"),
    ("quay.io/library/foo", "quay.io/library/foo", "quay.io/library/foo"),
    # distribution would show the bare hex, which then parses as an image ID, not this name
    ("docker.io/" + "ab" * 32, "library/" + "ab" * 32, "docker.io/library/" + "ab" * 32),
]


@pytest.mark.parametrize(("text", "familiar", "full"), NAMES, ids=[t for t, _, _ in NAMES])
def test_normalised_and_familiar_names(text: str, familiar: str, full: str) -> None:
    ref = ImageRef.parse(text)
    assert ref.name == full
    assert str(ref) == full
    assert ref.familiar_name() == familiar
    assert ref.familiar() == familiar
    assert parse_name(text) == (ref.registry, ref.repository)


@pytest.mark.parametrize(
    ("text", "normalised", "familiar"),
    [
        ("nginx:1.25", "docker.io/library/nginx:1.25", "nginx:1.25"),
        ("docker.io/library/nginx:1.25", "docker.io/library/nginx:1.25", "nginx:1.25"),
        ("docker.io/foo/bar", "docker.io/foo/bar", "foo/bar"),
        (
            "busybox:latest@" + SHA256_B,
            "docker.io/library/busybox:latest@" + SHA256_B,
            "busybox:latest@" + SHA256_B,
        ),
        ("redis@" + SHA256_B, "docker.io/library/redis@" + SHA256_B, "redis@" + SHA256_B),
        (
            "quay.io/brancz/kube-rbac-proxy:v0.18.0",
            "quay.io/brancz/kube-rbac-proxy:v0.18.0",
            "quay.io/brancz/kube-rbac-proxy:v0.18.0",
        ),
        ("[::1]:5000/repo:tag", "[::1]:5000/repo:tag", "[::1]:5000/repo:tag"),
    ],
)
def test_string_forms(text: str, normalised: str, familiar: str) -> None:
    ref = ImageRef.parse(text)
    assert str(ref) == normalised
    assert ref.familiar() == familiar


ROUND_TRIP = [text for text, _ in VALID] + [text for text, _, _ in NAMES]


@pytest.mark.parametrize("text", ROUND_TRIP, ids=[t[:60] for t in ROUND_TRIP])
def test_round_trips(text: str) -> None:
    ref = ImageRef.parse(text)
    assert ImageRef.parse(str(ref)) == ref
    assert ImageRef.parse(ref.familiar()) == ref
    assert ImageRef.parse(ref.name) == ref.with_tag(None).with_digest(None)
    assert ImageRef(ref.registry, ref.repository, ref.tag, ref.digest) == ref


def test_equal_references_hash_equal() -> None:
    table = {ImageRef.parse("nginx:1.25"): "a"}
    assert table[ImageRef.parse("docker.io/library/nginx:1.25")] == "a"
    assert table[ImageRef.parse("index.docker.io/nginx:1.25")] == "a"
    assert ImageRef.parse("nginx:1.25") != ImageRef.parse("nginx:1.26")
    assert ImageRef.parse("nginx") != ImageRef.parse("nginx:latest")


def test_parse_does_not_add_latest() -> None:
    ref = ImageRef.parse("nginx")
    assert ref.tag is None
    assert ref.tag_or_latest() == "latest"
    assert ImageRef.parse("nginx:1.25").tag_or_latest() == "1.25"
    pinned = ImageRef.parse("nginx@" + SHA256)
    assert pinned.tag is None
    assert pinned.tag_or_latest() == "latest"


def test_with_tag() -> None:
    ref = ImageRef.parse("quay.io/foo/bar:v1@" + SHA256)
    retagged = ref.with_tag("v2")
    assert str(retagged) == "quay.io/foo/bar:v2@" + SHA256
    assert str(ref.with_tag(None)) == "quay.io/foo/bar@" + SHA256
    assert str(ImageRef.parse("foo").with_tag("TAG5")) == "docker.io/library/foo:TAG5"
    assert ref.tag == "v1"  # unchanged: frozen


def test_with_digest() -> None:
    ref = ImageRef.parse("test.com:8000/foo:tag")
    assert str(ref.with_digest(SHA512)) == "test.com:8000/foo:tag@" + SHA512
    assert ref.with_digest(SHA256).with_digest(None) == ref
    assert ref.with_digest(SHA256).with_tag(None) == ImageRef.parse("test.com:8000/foo@" + SHA256)


@pytest.mark.parametrize("tag", ["", "-foo", ".foo", "a/b", "a:b", "a@b", "x" * 129, "caf\u00e9"])
def test_with_tag_rejects_invalid_tags(tag: str) -> None:
    with pytest.raises(InvalidReference, match="tag"):
        ImageRef.parse("busybox").with_tag(tag)


@pytest.mark.parametrize(
    "digest",
    ["", "foo", "sha256:" + "f" * 63, "sha256:" + "F" * 64, "md5:" + "f" * 32, SHA256 + "\n"],
)
def test_with_digest_rejects_invalid_digests(digest: str) -> None:
    with pytest.raises(InvalidReference, match="digest"):
        ImageRef.parse("busybox").with_digest(digest)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        (("docker.io", "Foo"), "repository name must be lowercase"),
        (("docker.io", "library/Foo"), "repository name must be lowercase"),
        (("", "foo/bar"), "registry is empty"),
        (("quay.io", ""), "repository name is missing"),
        (("quay.io", "foo/"), "empty path component"),
        (("quay.io/x", "foo"), "invalid registry"),
        (("foo_bar", "foo"), "invalid registry"),
        (("Foo_bar.com", "foo"), "invalid registry"),
        (("index.docker.io", "library/foo"), "use 'docker.io'"),
        (("docker.io", "nginx"), "use 'library/nginx'"),
        (("myregistry", "foo"), "would be read as a Docker Hub namespace"),
        (("quay.io", "foo", ""), "tag is empty"),
        (("quay.io", "foo", "-x"), "invalid tag"),
        (("quay.io", "foo", None, "sha256:abc"), "expected 64 hex characters"),
        (("quay.io", "foo", None, "sha1:" + "f" * 40), "unsupported digest algorithm"),
        (("quay.io", "a" * 256), "must not be more than 255 characters"),
    ],
)
def test_constructor_validates(fields: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        ImageRef(*fields)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        (("docker.io", "library/nginx", "1.25"), "docker.io/library/nginx:1.25"),
        (("localhost", "foo"), "localhost/foo"),
        (("localhost:5000", "a/b", None, SHA256), "localhost:5000/a/b@" + SHA256),
        (("127.0.0.1:5000", "x", "t", SHA384), "127.0.0.1:5000/x:t@" + SHA384),
        (("[::1]:5000", "repo"), "[::1]:5000/repo"),
        (("Foo", "bar"), "Foo/bar"),
        (("foo_bar.com", "bar"), "foo_bar.com/bar"),
    ],
)
def test_constructor_accepts_normalised_fields(fields: tuple[str, ...], text: str) -> None:
    ref = ImageRef(*fields)
    assert str(ref) == text
    assert ImageRef.parse(text) == ref


def test_references_are_immutable() -> None:
    ref = ImageRef.parse("nginx")
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]


def test_parse_name() -> None:
    assert parse_name("nginx") == ("docker.io", "library/nginx")
    assert parse_name("quay.io/brancz/kube-rbac-proxy") == ("quay.io", "brancz/kube-rbac-proxy")
    assert parse_name("localhost:5000/a/b") == ("localhost:5000", "a/b")
    assert parse_name("index.docker.io/foo/bar") == ("docker.io", "foo/bar")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("nginx:1.25", "without tag or digest"),
        ("nginx@" + SHA256, "without tag or digest"),
        ("Nginx", "must be lowercase"),
        ("quay.io/", "repository name is missing"),
        ("quay.io//x", "empty path component"),
        ("", "empty"),
    ],
)
def test_parse_name_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReference) as caught:
        parse_name(text)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("tag", "valid"),
    [
        ("latest", True),
        ("v0.18.0", True),
        ("_", True),
        ("9", True),
        ("TAG5", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        (".a", False),
        ("-a", False),
        ("a/b", False),
        ("a:b", False),
        ("a+b", False),
        ("caf\u00e9", False),
        ("\u0661", False),
        ("a\n", False),
    ],
)
def test_is_valid_tag(tag: str, valid: bool) -> None:
    assert is_valid_tag(tag) is valid


@pytest.mark.parametrize(
    ("digest", "valid"),
    [
        (SHA256, True),
        (SHA256_B, True),
        (SHA384, True),
        (SHA512, True),
        ("sha256:" + "f" * 63, False),
        ("sha256:" + "f" * 65, False),
        ("sha256:" + "f" * 128, False),
        ("sha512:" + "f" * 64, False),
        ("sha384:" + "f" * 64, False),
        ("sha256:" + "F" * 64, False),
        ("SHA256:" + "f" * 64, False),
        ("sha1:" + "f" * 40, False),
        ("md5:" + "f" * 32, False),
        ("sha256+b64:" + "f" * 64, False),
        ("f" * 64, False),
        ("sha256:", False),
        (":" + "f" * 64, False),
        ("", False),
        (SHA256 + "\n", False),
    ],
)
def test_is_valid_digest(digest: str, valid: bool) -> None:
    assert is_valid_digest(digest) is valid


def test_one_digest_validator_for_references_registries_and_the_config() -> None:
    # The registry client had a regex of its own, whose `^...$` let a trailing newline through.
    assert registry.is_valid_digest is is_valid_digest
    assert not registry.is_valid_digest(SHA256 + "\n")
    with pytest.raises(ConfigError, match="not a valid digest"):
        load_settings(f'digests:\n  "nginx:1": "{SHA256}\\n"\n')

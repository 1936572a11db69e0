"""Parsing parity: pinhook's reference parser against the grammar the kubelet uses.

``Reference`` below ports github.com/distribution/reference v0.6.0 (the version Kubernetes 1.36
pins: its regular expressions, ``splitDockerDomain``, ``ParseNormalizedNamed`` and ``Parse``)
and github.com/opencontainers/go-digest v1.0.0's ``Digest.Validate`` as literally as Python
allows, independently of ``webhook/oci/reference.py``. Many generated names go through both;
they must agree on accept/reject and on the normalised name, tag and digest, except for the
deliberate divergences listed in ``DIVERGENCES``, each with its reason and its own test.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from webhook.errors import InvalidReference
from webhook.oci.reference import MAX_REFERENCE_LENGTH, ImageRef

# -- distribution/reference v0.6.0, regexp.go ------------------------------------------------

ALPHANUMERIC = r"[a-z0-9]+"
SEPARATOR = r"(?:[._]|__|[-]+)"
LOCALHOST = "localhost"
DOMAIN_NAME_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
OPTIONAL_PORT = r"(?::[0-9]+)?"
TAG = r"[\w][\w.-]{0,127}"
DIGEST_PAT = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*[:][0-9A-Fa-f]{32,}"
IDENTIFIER = r"([a-f0-9]{64})"
IPV6_ADDRESS = r"\[(?:[a-fA-F0-9:]+)\]"
DOMAIN_NAME = DOMAIN_NAME_COMPONENT + r"(?:\." + DOMAIN_NAME_COMPONENT + r")*"
HOST = f"(?:{DOMAIN_NAME}|{IPV6_ADDRESS})"
DOMAIN_AND_PORT = HOST + OPTIONAL_PORT
PATH_COMPONENT = ALPHANUMERIC + f"(?:{SEPARATOR}{ALPHANUMERIC})*"
REMOTE_NAME = PATH_COMPONENT + f"(?:/{PATH_COMPONENT})*"
NAME_PAT = f"(?:{DOMAIN_AND_PORT}/)?{REMOTE_NAME}"
# Go's regexp: ASCII \w, and "$" only at the very end (fullmatch, never re's "$").
REFERENCE_REGEXP = re.compile(f"({NAME_PAT})(?::({TAG}))?(?:@({DIGEST_PAT}))?", re.ASCII)
ANCHORED_NAME_REGEXP = re.compile(f"(?:({DOMAIN_AND_PORT})/)?({REMOTE_NAME})", re.ASCII)
ANCHORED_IDENTIFIER_REGEXP = re.compile(IDENTIFIER, re.ASCII)
REPOSITORY_NAME_TOTAL_LENGTH_MAX = 255

# -- go-digest v1.0.0 --------------------------------------------------------------------------

DIGEST_SIZES = {"sha256": 32, "sha384": 48, "sha512": 64}


def digest_valid(digest: str) -> bool:
    """``digest.Parse``: a registered algorithm and exactly its size in lowercase hex."""
    i = digest.find(":")
    if i <= 0 or i + 1 == len(digest):
        return False
    algorithm, encoded = digest[:i], digest[i + 1 :]
    size = DIGEST_SIZES.get(algorithm)
    if size is None:
        return False
    return len(encoded) == size * 2 and re.fullmatch(r"[a-f0-9]+", encoded) is not None


# -- distribution/reference v0.6.0, normalize.go and reference.go -----------------------------


@dataclass(frozen=True)
class Parsed:
    name: str
    tag: str | None
    digest: str | None
    domain: str


def split_docker_domain(name: str) -> tuple[str, str]:
    maybe_domain, slash, maybe_remote = name.partition("/")
    if not slash:
        return "docker.io", "library/" + name
    if maybe_domain == LOCALHOST:
        domain, remote = maybe_domain, maybe_remote
    elif maybe_domain == "index.docker.io":
        domain, remote = "docker.io", maybe_remote
    elif any(ch in maybe_domain for ch in ".:") or maybe_domain.lower() != maybe_domain:
        domain, remote = maybe_domain, maybe_remote
    else:
        domain, remote = "docker.io", name
    if domain == "docker.io" and "/" not in remote:
        remote = "library/" + remote
    return domain, remote


def parse(text: str) -> Parsed | None:
    matches = REFERENCE_REGEXP.fullmatch(text)
    if matches is None:
        return None
    name_match = ANCHORED_NAME_REGEXP.fullmatch(matches[1])
    assert name_match is not None
    domain, path = name_match[1] or "", name_match[2]
    if len(path) > REPOSITORY_NAME_TOTAL_LENGTH_MAX:
        return None
    digest = matches[3]
    if digest and not digest_valid(digest):
        return None
    name = f"{domain}/{path}" if domain else path
    return Parsed(name, matches[2], digest, domain)


def parse_normalized_named(text: str) -> Parsed | None:
    """``ParseNormalizedNamed``: None for every error."""
    if ANCHORED_IDENTIFIER_REGEXP.fullmatch(text):
        return None
    domain, remainder = split_docker_domain(text)
    remote = remainder.partition(":")[0]
    if remote.lower() != remote:
        return None
    return parse(f"{domain}/{remainder}")


# -- pinhook ------------------------------------------------------------------------------------


def pinhook(text: str) -> Parsed | None:
    try:
        ref = ImageRef.parse(text)
    except InvalidReference:
        return None
    return Parsed(ref.name, ref.tag, ref.digest, ref.registry)


def agree(text: str) -> bool:
    ours, theirs = pinhook(text), parse_normalized_named(text)
    if ours is None or theirs is None:
        return ours is theirs
    return (ours.name, ours.tag, ours.digest) == (theirs.name, theirs.tag, theirs.digest)


# -- deliberate divergences --------------------------------------------------------------------


def _max_port(text: str) -> int:
    first = text.partition("/")[0] if "/" in text else ""
    port = re.search(r"\]?:([0-9]+)$", first)
    return int(port[1]) if port else 0


@dataclass(frozen=True)
class Divergence:
    name: str
    applies: Callable[[str], bool]
    reason: str


DIVERGENCES = (
    Divergence(
        "longer than MAX_REFERENCE_LENGTH",
        lambda text: len(text) > MAX_REFERENCE_LENGTH,
        "distribution bounds the path (255), the tag (128) and the digest, but not the domain;"
        " no pullable name is that long (a DNS name has at most 253 characters), and refusing"
        " early bounds the regex work a hostile Pod spec can ask for",
    ),
    Divergence(
        "port above 65535",
        lambda text: _max_port(text) > 65535,
        "distribution's port is [0-9]+; no TCP port is above 65535, so such a name can never"
        " be pulled, and pinhook says so at admission",
    ),
)


def _divergence(text: str) -> Divergence | None:
    return next((d for d in DIVERGENCES if d.applies(text)), None)


# -- generated names ---------------------------------------------------------------------------

# Each pool: pieces the grammar accepts, then pieces it refuses (or that only some positions allow).
FIRST = (
    [
        "a", "foo", "foo_bar", "foo__bar", "foo-bar", "foo--bar", "a.b", "a_b.c", "a__b.c",
        "a_b.c-d", "Foo", "FOO", "fOo.io", "localhost", "docker.io", "index.docker.io",
        "Docker.io", "registry-1.docker.io", "0.0", "1.2.3.4", "xn--bcher-kva.example",
        "quay.io", "[::1]", "exa_mple.com",
    ],
    [
        "foo___bar", "a..b", "a-.b", "-a.b", "_a.b", "Foo_bar", "[fe80::1%eth0]",
        "[::ffff:1.2.3.4]", "::1", "ex-.com", "-ex.com", "a.-b", "café.io", "a.b.", ".a",
    ],
)  # fmt: skip
PORTS = (["", "", "", ":5000", ":0", ":05000", ":65535"], [":", ":x", ":99999", ":65536"])
COMPONENTS = (
    ["x", "nginx", "library", "a_b", "a__b", "a-b", "a--b", "a.b", "0", "a" * 64, "a1" * 32],
    ["a___b", "a..b", "a._b", "_a", "a_", "A", "Ab", "", "é"],
)
TAGS = (
    ["", "", ":1", ":latest", ":T", ":_x", ":" + "t" * 128],
    [":.x", ":-x", ":" + "t" * 129, ":a+b", ":"],
)
DIGESTS = (
    ["", "", "", "@sha256:" + "a" * 64, "@sha384:" + "b" * 96, "@sha512:" + "c" * 128],
    [
        "@sha256:" + "A" * 64,
        "@sha256:" + "a" * 32,
        "@md5:" + "d" * 32,
        "@sha256:" + "a" * 65,
        "@sha256",
        "@sha256:",
        "@a.b+c:" + "e" * 32,
    ],
)


def generated(seed: int, count: int) -> Iterator[str]:
    rng = random.Random(seed)

    def pick(pools: tuple[list[str], list[str]]) -> str:
        return rng.choice(pools[rng.random() < 0.08])

    for _ in range(count):
        parts = [pick(COMPONENTS) for _ in range(rng.choice((0, 1, 1, 2, 3)))]
        if rng.random() < 0.8:
            parts.insert(0, pick(FIRST) + pick(PORTS))
        name = "/".join(parts) or pick(FIRST)
        yield name + pick(TAGS) + pick(DIGESTS)
    for _ in range(count // 4):  # short strings over a hostile alphabet
        yield "".join(rng.choice("aA0._-/:@[]") for _ in range(rng.randint(1, 10)))


# -- tests ----------------------------------------------------------------------------------------


# distribution's own results for names whose first component is not a host name, and others
# (checked against v0.6.0: ParseNormalizedNamed(text).Name(), or None for an error).
TABLE = [
    ("foo_bar/x", "docker.io/foo_bar/x"),
    ("Foo/x", "Foo/x"),
    ("FOO/bar", "FOO/bar"),
    ("a_b.c/x", "a_b.c/x"),
    ("foo_bar.com/x:1", "foo_bar.com/x"),
    ("-a.b/x", None),
    ("a..b/x", None),
    ("a-.b/x", None),
    ("_a.b/x", None),
    ("Foo_bar/x", None),
    ("0.0/x", "0.0/x"),
    ("1.2.3.4:5/x", "1.2.3.4:5/x"),
    ("xn--bcher-kva.example/x", "xn--bcher-kva.example/x"),
    ("example.com", "docker.io/library/example.com"),
    ("example.com:5000", "docker.io/library/example.com"),
    ("localhost", "docker.io/library/localhost"),
    ("index.docker.io/nginx", "docker.io/library/nginx"),
    ("docker.io/nginx", "docker.io/library/nginx"),
    ("a.b/C", None),
    ("a.b/c:T", "a.b/c"),
    ("a/b__c", "docker.io/a/b__c"),
    ("a/b--c", "docker.io/a/b--c"),
    ("a/b___c", None),
    ("a/b..c", None),
    ("a/b._c", None),
    ("[::1]/x", "[::1]/x"),
    ("[::1]:5000/x", "[::1]:5000/x"),
    ("::1/x", None),
    ("[fe80::1%eth0]/x", None),
    ("[::ffff:1.2.3.4]/x", None),
    ("example.com:0/x", "example.com:0/x"),
    ("a.b/c@sha256:" + "a" * 32, None),  # the grammar allows 32 hex; go-digest wants 64
]


@pytest.mark.parametrize(("text", "name"), TABLE)
def test_the_port_gives_distributions_answers(text: str, name: str | None) -> None:
    parsed = parse_normalized_named(text)
    assert (parsed.name if parsed else None) == name


@pytest.mark.parametrize(("text", "name"), TABLE)
def test_pinhook_gives_distributions_answers(text: str, name: str | None) -> None:
    parsed = pinhook(text)
    assert (parsed.name if parsed else None) == name


def test_a_domainless_name_is_resolved_at_its_first_component() -> None:
    # distribution reads a_b.c/x as a path with no domain; containerd then pulls from the host
    # a_b.c, and the kubelet matches credentials against that host: so does pinhook.
    ref = ImageRef.parse("a_b.c/x:1")
    assert (ref.registry, ref.repository, str(ref)) == ("a_b.c", "x", "a_b.c/x:1")
    assert ImageRef.parse(str(ref)) == ref
    assert parse_normalized_named("a_b.c/x:1") == Parsed("a_b.c/x", "1", None, "")
    # The path limit then counts the whole name, as distribution does.
    assert pinhook("a_b.c/" + "x" * 249) is not None
    assert pinhook("a_b.c/" + "x" * 250) is None
    assert parse_normalized_named("a_b.c/" + "x" * 250) is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generated_names_agree(seed: int) -> None:
    checked = disagreements = 0
    shown: list[str] = []
    for text in generated(seed, 4000):
        if _divergence(text) is not None:
            continue
        checked += 1
        if not agree(text):
            disagreements += 1
            shown.append(
                f"{text!r}: pinhook {pinhook(text)}, reference {parse_normalized_named(text)}"
            )
    assert checked > 4500
    assert disagreements == 0, "\n".join(shown[:20])


def test_generated_names_cover_both_outcomes() -> None:
    # A generator that only produced valid (or only invalid) names would prove little.
    results = [parse_normalized_named(text) is not None for text in generated(1, 4000)]
    assert 0.2 < sum(results) / len(results) < 0.8


# -- each deliberate divergence, with its reason --------------------------------------------------


def test_divergence_references_longer_than_the_cap() -> None:
    divergence = DIVERGENCES[0]
    text = "a" * 63 + "." + ".".join(["b" * 63] * 70) + "/x:1"
    assert divergence.applies(text)
    assert parse_normalized_named(text) is not None, "distribution has no total length limit"
    assert pinhook(text) is None, divergence.reason


def test_divergence_ports_above_65535() -> None:
    divergence = DIVERGENCES[1]
    for text in ("localhost:99999999/x", "example.com:65536/x:1"):
        assert divergence.applies(text)
        assert parse_normalized_named(text) is not None, "distribution's port is [0-9]+"
        assert pinhook(text) is None, divergence.reason


def test_ports_up_to_65535_agree() -> None:
    for text in ("localhost:65535/x", "example.com:0/x", "example.com:05000/x"):
        assert _divergence(text) is None
        assert agree(text)
        assert pinhook(text) is not None


def test_every_divergence_has_a_reason_and_a_test() -> None:
    names = {d.name for d in DIVERGENCES}
    assert names == {"longer than MAX_REFERENCE_LENGTH", "port above 65535"}
    assert all(len(d.reason) > 40 for d in DIVERGENCES)

"""Image references under the distribution/reference grammar, normalised like Docker does.

This follows github.com/distribution/reference (``Parse``, ``ParseNormalizedNamed``,
``FamiliarString``) and github.com/opencontainers/go-digest (which digests are valid):

    reference   := name [ ":" tag ] [ "@" digest ]
    name        := [ registry "/" ] repository
    registry    := host [ ":" port ]          ; host: DNS-ish name, IPv4, or [IPv6]
    repository  := component ( "/" component )*
    component   := [a-z0-9]+ ( separator [a-z0-9]+ )*
    separator   := "." | "_" | "__" | "-"+
    tag         := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest      := "sha256:" 64 hex | "sha384:" 96 hex | "sha512:" 128 hex   ; lowercase hex

The first component of a name is a registry only when it is ``localhost``, contains ``.`` or
``:``, or contains an upper-case letter (distribution's rule); otherwise the name is on Docker
Hub (``docker.io``), and a one-component Docker Hub name gets the ``library/`` namespace.

A first component with a ``.`` that is no host name but is a path component (``foo_bar.com``)
is accepted as the registry too: distribution then reads the whole name as a path without a
domain (``foo_bar.com/x``), and the runtime pulls it from the host ``foo_bar.com`` all the same,
so pinhook resolves it there. The 255-character limit then counts the whole name, as there.

The module is pure (no I/O). ``ImageRef.parse`` sits on the admission hot path, so the regular
expressions are compiled once and parsed references are built without validating twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

from ..errors import InvalidReference

# Docker Hub's names: ``docker.io`` is the normalised one, ``index.docker.io`` its legacy alias
# (which the kubelet also uses as the docker config key of last resort), and the distribution
# API itself is served at ``registry-1.docker.io``.
DOCKER_HUB: Final = "docker.io"
DOCKER_HUB_LEGACY: Final = "index.docker.io"
DOCKER_HUB_API_HOST: Final = "registry-1.docker.io"
DEFAULT_TAG: Final = "latest"
# distribution v0.6 counts the path only (the registry is not included), after normalisation,
# so "nginx" counts as "library/nginx".
MAX_REPOSITORY_LENGTH: Final = 255

_OFFICIAL_PREFIX: Final = "library/"
_LOCALHOST: Final = "localhost"

# Explicit ASCII classes rather than \w, and fullmatch rather than $: Python's \w is Unicode and
# its $ accepts a trailing newline, and neither is true of Go's regexp.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT_PAT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6_LITERAL = r"\[[a-fA-F0-9:]+\]"

_PATH_COMPONENT: Final = re.compile(_PATH_COMPONENT_PAT)
_REPOSITORY: Final = re.compile(rf"{_PATH_COMPONENT_PAT}(?:/{_PATH_COMPONENT_PAT})*")
_REGISTRY: Final = re.compile(rf"(?:{_DOMAIN_NAME}|{_IPV6_LITERAL})(?::[0-9]+)?")
_TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# distribution's digestPat: what may stand after "@" at all; go-digest then narrows it down.
_DIGEST_SHAPE: Final = re.compile(
    r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
)
_IMAGE_ID: Final = re.compile(r"[a-f0-9]{64}")

# go-digest's registered algorithms and the exact number of lowercase hex characters of each.
DIGEST_HEX_LENGTHS: Final = {"sha256": 64, "sha384": 96, "sha512": 128}
_LOWER_HEX: Final = frozenset("0123456789abcdef")
_HEX: Final = frozenset("0123456789abcdefABCDEF")

# Not in distribution's grammar, but nothing longer can be pulled (a DNS name has at most 253
# characters, a repository 255, a tag 128, a digest 135), and refusing early bounds the regex
# work a hostile Pod spec can ask for.
MAX_REFERENCE_LENGTH: Final = 4096
MAX_PORT: Final = 65535

_SHOWN_INPUT_MAX = 120
_PARSE_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class ImageRef:
    """A normalised image reference: ``registry/repository[:tag][@digest]``.

    Construction validates every field and insists on the normalised form (``docker.io``, not
    ``index.docker.io``; ``library/nginx``, not ``nginx``), so that equal images compare and
    hash equal and ``str()`` parses back to the same value.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    # The normalised name without tag or digest, e.g. ``docker.io/library/nginx``: computed
    # once, since the digest cache is keyed by it on every admission.
    name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", f"{self.registry}/{self.repository}")
        problem = (
            _registry_field_problem(self.registry)
            or _repository_problem(self.repository)
            or _domainless_length_problem(self.registry, self.repository)
            or _docker_hub_problem(self.registry, self.repository)
            or (None if self.tag is None else _tag_problem(self.tag))
            or (None if self.digest is None else _digest_problem(self.digest))
        )
        if problem is not None:
            raise _invalid(
                _unchecked_str(self.registry, self.repository, self.tag, self.digest), problem
            )

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        """Parse and normalise like distribution's ``ParseNormalizedNamed``.

        ``nginx`` becomes ``docker.io/library/nginx``; no ``latest`` tag is added (see
        :meth:`tag_or_latest`). Raises :class:`InvalidReference` saying what is wrong.
        """
        return _parse_cached(text)

    @classmethod
    def _trusted(
        cls, registry: str, repository: str, tag: str | None, digest: str | None
    ) -> ImageRef:
        """Build from fields that are already validated and normalised, skipping the checks."""
        ref = object.__new__(cls)
        object.__setattr__(ref, "registry", registry)
        object.__setattr__(ref, "repository", repository)
        object.__setattr__(ref, "tag", tag)
        object.__setattr__(ref, "digest", digest)
        object.__setattr__(ref, "name", f"{registry}/{repository}")
        return ref

    def __str__(self) -> str:
        return _unchecked_str(self.registry, self.repository, self.tag, self.digest)

    def familiar_name(self) -> str:
        """The name as Docker shows it: ``nginx``, ``foo/bar``, ``quay.io/foo/bar``."""
        if self.registry != DOCKER_HUB:
            return self.name
        if self.repository.startswith(_OFFICIAL_PREFIX):
            official = self.repository[len(_OFFICIAL_PREFIX) :]
            # library/a/b keeps its prefix: dropping it would read back as docker.io/a/b. So
            # does a 64-hex name, which would read back as an image ID (distribution drops it).
            if "/" not in official and _IMAGE_ID.fullmatch(official) is None:
                return official
        return self.repository

    def familiar(self) -> str:
        """The familiar form with tag and digest, e.g. ``nginx:1.25``."""
        return _unchecked_str(None, self.familiar_name(), self.tag, self.digest)

    def with_tag(self, tag: str | None) -> ImageRef:
        """The same reference with ``tag`` (``None`` removes it); the digest is kept."""
        if tag is not None and (problem := _tag_problem(tag)) is not None:
            raise _invalid(
                _unchecked_str(self.registry, self.repository, tag, self.digest), problem
            )
        return ImageRef._trusted(self.registry, self.repository, tag, self.digest)

    def with_digest(self, digest: str | None) -> ImageRef:
        """The same reference with ``digest`` (``None`` removes it); the tag is kept."""
        if digest is not None and (problem := _digest_problem(digest)) is not None:
            raise _invalid(
                _unchecked_str(self.registry, self.repository, self.tag, digest), problem
            )
        return ImageRef._trusted(self.registry, self.repository, self.tag, digest)

    def tag_or_latest(self) -> str:
        """The tag, or ``latest`` when there is none (what Docker's ``TagNameOnly`` adds).

        Parsing never adds ``latest`` itself: ``repo@digest`` has no tag, and each caller
        decides whether a missing tag means ``latest`` for its purpose.
        """
        return self.tag or DEFAULT_TAG


def parse_name(text: str) -> tuple[str, str]:
    """Parse a bare name (no tag, no digest) into a normalised ``(registry, repository)``."""
    ref = _parse_cached(text)
    if ref.tag is not None or ref.digest is not None:
        raise _invalid(text, "expected a name without tag or digest")
    return ref.registry, ref.repository


def check_registry(text: str) -> None:
    """Raise InvalidReference unless ``text`` is a registry host name (or address) with an
    optional port, in normalised form: what a rewrite rule may write.

    Stricter than what an image may name: distribution reads ``a_b.c/x`` as a name without a
    domain, which runtimes then pull from the host ``a_b.c``; a rule of pinhook's own must
    name a real host.
    """
    problem = _registry_field_problem(text)
    if problem is None and _REGISTRY.fullmatch(text) is None:
        problem = (
            f"invalid registry {_shown(text)}: expected a host name, an IPv4 address or a"
            " bracketed IPv6 address, optionally with ':port'"
        )
    if problem is not None:
        raise _invalid(text, problem)


def is_valid_tag(tag: str) -> bool:
    """Whether ``tag`` is a valid tag: ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``."""
    return _TAG.fullmatch(tag) is not None


def is_valid_digest(digest: str) -> bool:
    """Whether ``digest`` is ``sha256``/``sha384``/``sha512`` with the exact lowercase hex.

    The one digest check in pinhook: for references, registry headers and the static table.
    """
    return _digest_problem(digest) is None


def split_host_port(hostport: str) -> tuple[str, int | None]:
    """Split a registry ``host[:port]`` (``[v6]:port`` for IPv6) into a bare host and a port.

    The port is None when there is none or it is not a number; a name that cannot be split
    (``a:b:c``) is returned whole.
    """
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            return hostport, None
        host, rest = hostport[1:end], hostport[end + 1 :]
        return host, _port(rest[1:]) if rest.startswith(":") else None
    if hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
        return host, _port(port)
    return hostport, None


def _port(text: str) -> int | None:
    # isdigit alone takes fullwidth and other Unicode digits, which int() then accepts too.
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 5 else None


@lru_cache(maxsize=_PARSE_CACHE_SIZE)
def _parse_cached(text: str) -> ImageRef:
    # Safe to share: ImageRef is immutable. Errors are not cached; lru_cache re-raises them.
    return _parse(text)


def _parse(text: str) -> ImageRef:
    if not text:
        raise _invalid(text, "reference is empty")
    if len(text) > MAX_REFERENCE_LENGTH:
        raise _invalid(text, f"reference is longer than {MAX_REFERENCE_LENGTH} characters")
    if _IMAGE_ID.fullmatch(text):
        raise _invalid(text, "a 64-character hexadecimal string is an image ID, not a name")

    # Neither name nor tag may contain "@", and a tag has neither "/" nor ":", so the digest
    # is everything after the first "@" and the tag is after a ":" that follows the last "/".
    rest, at, digest = text.partition("@")
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        familiar, tag = rest[:colon], rest[colon + 1 :]
        if _TAG.fullmatch(tag) is None:
            raise _invalid(text, _tag_problem(tag) or "invalid tag")
    else:
        familiar, tag = rest, None

    if not familiar:
        raise _invalid(text, "repository name is missing")
    registry, repository = _split_registry(familiar)
    problem = (
        _repository_problem(repository)
        or _registry_problem(registry)
        or _domainless_length_problem(registry, repository)
    )
    if problem is not None:
        raise _invalid(text, problem)

    if at and (problem := _digest_problem(digest)) is not None:
        raise _invalid(text, problem)
    return ImageRef._trusted(registry, repository, tag, digest if at else None)


def _split_registry(name: str) -> tuple[str, str]:
    """distribution's ``splitDockerDomain``: where the registry ends and the path begins."""
    first, slash, remainder = name.partition("/")
    if not slash:
        return DOCKER_HUB, _OFFICIAL_PREFIX + name
    if first == DOCKER_HUB_LEGACY:
        registry, repository = DOCKER_HUB, remainder
    elif _is_registry_component(first):
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, name
    if registry == DOCKER_HUB and "/" not in repository:
        repository = _OFFICIAL_PREFIX + repository
    return registry, repository


def _is_registry_component(first: str) -> bool:
    # Upper case is not allowed in a repository, so distribution reads "Foo/bar" as registry
    # "Foo": an odd rule, but the one every Docker-compatible runtime applies.
    return first == _LOCALHOST or "." in first or ":" in first or first.lower() != first


def _repository_problem(repository: str) -> str | None:
    # Length first (distribution checks it second): it keeps the regex work bounded.
    if len(repository) > MAX_REPOSITORY_LENGTH:
        return (
            f"repository name must not be more than {MAX_REPOSITORY_LENGTH} characters"
            f" (it has {len(repository)})"
        )
    if _REPOSITORY.fullmatch(repository) is None:
        return _explain_bad_repository(repository)
    return None


def _explain_bad_repository(repository: str) -> str:
    if not repository:
        return "repository name is missing"
    if repository.lower() != repository:
        return "repository name must be lowercase"
    for component in repository.split("/"):
        if not component:
            return "repository name has an empty path component (a leading, trailing or double '/')"
        if _PATH_COMPONENT.fullmatch(component) is None:
            return (
                f"invalid path component {_shown(component)}: use lowercase letters and digits,"
                " separated by one '.', one or two '_', or one or more '-'"
            )
    return "invalid repository name"


def _registry_problem(registry: str) -> str | None:
    if _REGISTRY.fullmatch(registry) is None and not _is_domainless(registry):
        return (
            f"invalid registry {_shown(registry)}: expected a host name, an IPv4 address or a"
            " bracketed IPv6 address, optionally with ':port'"
        )
    port = registry.rpartition(":")[2] if registry.rfind(":") > registry.rfind("]") else ""
    # distribution's grammar takes any digits; a TCP port cannot be above 65535, and a
    # larger number would only fail later, deep in name resolution.
    if port and (len(port) > len(str(MAX_PORT)) or int(port) > MAX_PORT):
        return f"invalid registry {_shown(registry)}: port {_shown(port)} is above {MAX_PORT}"
    return None


def _is_domainless(registry: str) -> bool:
    """A registry distribution reads as the first path component of a domain-less name."""
    return "." in registry and _PATH_COMPONENT.fullmatch(registry) is not None


def _domainless_length_problem(registry: str, repository: str) -> str | None:
    if _REGISTRY.fullmatch(registry) is not None or not _is_domainless(registry):
        return None
    length = len(registry) + 1 + len(repository)
    if length > MAX_REPOSITORY_LENGTH:
        return (
            f"repository name must not be more than {MAX_REPOSITORY_LENGTH} characters"
            f" (it has {length}: {registry!r} is read as part of it)"
        )
    return None


def _registry_field_problem(registry: str) -> str | None:
    """A registry given to the constructor must also read back as a registry from ``str()``."""
    if not registry:
        return "registry is empty"
    if problem := _registry_problem(registry):
        return problem
    if registry == DOCKER_HUB_LEGACY:
        return f"registry {registry!r} is not normalised: use {DOCKER_HUB!r}"
    if not _is_registry_component(registry):
        return (
            f"registry {registry!r} would be read as a Docker Hub namespace: a registry needs a"
            " '.', a ':port', or to be 'localhost'"
        )
    return None


def _docker_hub_problem(registry: str, repository: str) -> str | None:
    if registry == DOCKER_HUB and "/" not in repository:
        return (
            f"Docker Hub repository {repository!r} is not normalised:"
            f" use {_OFFICIAL_PREFIX + repository!r}"
        )
    return None


def _tag_problem(tag: str) -> str | None:
    if _TAG.fullmatch(tag) is not None:
        return None
    if not tag:
        return "tag is empty"
    if len(tag) > 128:
        return f"tag must not be more than 128 characters (it has {len(tag)})"
    return (
        f"invalid tag {_shown(tag)}: use letters, digits, '_', '.' and '-', not starting with"
        " '.' or '-'"
    )


def _digest_problem(digest: str) -> str | None:
    algorithm, colon, encoded = digest.partition(":")
    expected_length = DIGEST_HEX_LENGTHS.get(algorithm)
    if (
        expected_length is not None
        and len(encoded) == expected_length
        and _LOWER_HEX.issuperset(encoded)
    ):
        return None
    if expected_length is None:
        if colon and _DIGEST_SHAPE.fullmatch(digest) is not None:
            supported = ", ".join(DIGEST_HEX_LENGTHS)
            return f"unsupported digest algorithm {_shown(algorithm)} (supported: {supported})"
        return f"invalid digest {_shown(digest)}: expected 'algorithm:hex'"
    if not _HEX.issuperset(encoded):
        return f"invalid {algorithm} digest: {_shown(encoded)} is not hexadecimal"
    if len(encoded) != expected_length:
        return (
            f"invalid {algorithm} digest: expected {expected_length} hex characters,"
            f" got {len(encoded)}"
        )
    return f"invalid {algorithm} digest: hex must be lowercase"


def _unchecked_str(
    registry: str | None, repository: str, tag: str | None, digest: str | None
) -> str:
    text = repository if registry is None else f"{registry}/{repository}"
    if tag is not None:
        text = f"{text}:{tag}"
    if digest is not None:
        text = f"{text}@{digest}"
    return text


def _shown(text: str) -> str:
    """Quote input for a message, cut short so a hostile value cannot flood a log."""
    if len(text) > _SHOWN_INPUT_MAX:
        text = text[:_SHOWN_INPUT_MAX] + "..."
    return repr(text)


def _invalid(text: str, problem: str) -> InvalidReference:
    return InvalidReference(f"invalid reference {_shown(text)}: {problem}")

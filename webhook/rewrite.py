"""The rewrite map: move image references from one registry or repository to another.

Pure: no I/O. A rule's ``from`` is a normalised name prefix matched at a path-component
boundary (``gcr.io/kubebuilder`` matches ``gcr.io/kubebuilder/x`` but not
``gcr.io/kubebuilderx``), optionally with a tag that restricts the rule to that tag. The
longest ``from`` wins, a tagged rule beats an untagged one of the same prefix, and rules are
applied once: the result of a rewrite is never rewritten again, so chains and cycles are
impossible.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import InvalidReference
from .oci.reference import (
    DOCKER_HUB,
    DOCKER_HUB_LEGACY,
    ImageRef,
    check_registry,
    is_valid_tag,
    parse_name,
    split_host_port,
)


@dataclass(frozen=True, slots=True)
class NamePattern:
    """A normalised name prefix (``registry`` or ``registry/path``) with an optional tag."""

    prefix: str
    tag: str | None = None

    @classmethod
    def parse(cls, text: str) -> NamePattern:
        """Parse the ``from`` or ``to`` of a rule; raises InvalidReference with the reason."""
        text = text.strip()
        if not text:
            raise InvalidReference("must not be empty")
        if "@" in text:
            raise InvalidReference(f"{text!r}: a rule matches names and tags, not digests")
        name, tag = _split_tag(text)
        if tag is not None and not is_valid_tag(tag):
            raise InvalidReference(f"{text!r}: invalid tag {tag!r}")
        namespace = name.endswith("/")
        name = name.rstrip("/")
        if _is_registry_only(name):
            _validate_registry(name)
            # The same alias the reference grammar resolves: images never say index.docker.io.
            return cls(prefix=DOCKER_HUB if name == DOCKER_HUB_LEGACY else name, tag=tag)
        if namespace:
            # "docker.io/kserve/" names the kserve namespace; without the slash docker.io would
            # read "docker.io/kserve" as the image docker.io/library/kserve.
            registry, repository = parse_name(name + "/x")
            check_registry(registry)
            return cls(prefix=f"{registry}/{repository[:-2]}", tag=tag)
        registry, repository = parse_name(name)
        check_registry(registry)
        return cls(prefix=f"{registry}/{repository}", tag=tag)

    def __str__(self) -> str:
        return self.prefix if self.tag is None else f"{self.prefix}:{self.tag}"


def _split_tag(text: str) -> tuple[str, str | None]:
    slash = text.rfind("/")
    if slash == -1 and _is_registry_only(text):
        return text, None
    colon = text.rfind(":")
    if colon > slash:
        return text[:colon], text[colon + 1 :]
    return text, None


def _is_registry_only(name: str) -> bool:
    """``gcr.io`` or ``localhost:5000`` alone names a whole registry, not docker.io/library/x.

    The same rule as distribution's for the first component of a name: it is a host when it
    has a dot or a port, or is ``localhost``. ``nginx:1.25`` stays a name with a tag.
    """
    if "/" in name:
        return False
    host, _ = split_host_port(name)
    return "." in host or host == "localhost"


def _validate_registry(name: str) -> None:
    if name != name.lower():
        raise InvalidReference(f"{name!r}: registry host must be lowercase")
    # The grammar images are read with: a rule naming a host no image can have would
    # never match, or, as a target, write names no runtime can pull.
    if name != DOCKER_HUB_LEGACY:
        check_registry(name)


@dataclass(frozen=True, slots=True)
class RewriteRule:
    source: NamePattern
    target: NamePattern

    def __post_init__(self) -> None:
        if self.target.tag is not None and self.source.tag is None:
            raise InvalidReference(
                f"'to' sets tag {self.target.tag!r} but 'from' has no tag: a rule may only set a"
                " new tag when it matches one tag"
            )

    def matches(self, ref: ImageRef) -> bool:
        if self.source.tag is not None and _effective_tag(ref) != self.source.tag:
            return False
        name = ref.name
        prefix = self.source.prefix
        return name == prefix or (name.startswith(prefix) and name[len(prefix)] == "/")

    def apply(self, ref: ImageRef) -> ImageRef:
        """The reference moved to the target; tag and digest are kept unless the rule sets a
        tag, which drops the digest: it belongs to the old tag."""
        remainder = ref.name[len(self.source.prefix) :]
        registry, repository = parse_name(self.target.prefix + remainder)
        if self.target.tag is not None:
            return ImageRef(registry, repository, self.target.tag, None)
        return ImageRef(registry, repository, ref.tag, ref.digest)

    def output_may_match(self, other: RewriteRule) -> bool:
        """Whether ``other`` could rewrite what this rule writes (a chain)."""
        ours, theirs = self.target.prefix, other.source.prefix
        overlap = ours == theirs or ours.startswith(theirs + "/") or theirs.startswith(ours + "/")
        if not overlap or other.source.tag is None:
            return overlap
        tag_written = self.target.tag or self.source.tag  # None: whatever tag came in
        return tag_written is None or tag_written == other.source.tag

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}"


@dataclass(frozen=True, slots=True)
class Rewrite:
    """The outcome of applying the map to one reference."""

    original: ImageRef
    result: ImageRef
    rule: RewriteRule | None

    @property
    def changed(self) -> bool:
        return self.rule is not None and self.result != self.original

    @property
    def moved_digest(self) -> bool:
        """A digest carried to another repository may not exist there."""
        return (
            self.changed
            and self.original.digest is not None
            and self.result.name != self.original.name
        )


class RewriteMap:
    """An ordered, validated set of rules; lookups cost one pass over the rules of a registry."""

    __slots__ = ("_by_registry", "rules")

    def __init__(self, rules: Iterable[RewriteRule] = ()) -> None:
        self.rules: tuple[RewriteRule, ...] = tuple(rules)
        _reject_duplicates(self.rules)
        chain = find_chain(self.rules)
        if chain is not None:
            i, j = chain
            raise InvalidReference(
                f"rewrites[{i}] ({self.rules[i]}) writes names that rewrites[{j}]"
                f" ({self.rules[j]}) would rewrite again when the webhook is reinvoked;"
                " point the first rule at the final name"
            )
        # Most specific first: longest prefix, and a tagged rule before an untagged one.
        ordered = sorted(
            self.rules, key=lambda r: (len(r.source.prefix), r.source.tag is not None), reverse=True
        )
        by_registry: dict[str, list[RewriteRule]] = {}
        for rule in ordered:
            by_registry.setdefault(rule.source.prefix.split("/", 1)[0], []).append(rule)
        self._by_registry = {k: tuple(v) for k, v in by_registry.items()}

    def find(self, ref: ImageRef) -> RewriteRule | None:
        for rule in self._by_registry.get(ref.registry, ()):
            if rule.matches(ref):
                return rule
        return None

    def apply(self, ref: ImageRef) -> Rewrite:
        rule = self.find(ref)
        if rule is None:
            return Rewrite(original=ref, result=ref, rule=None)
        return Rewrite(original=ref, result=rule.apply(ref), rule=rule)

    def __len__(self) -> int:
        return len(self.rules)


def _effective_tag(ref: ImageRef) -> str | None:
    """``nginx`` means ``nginx:latest``; a reference pinned by digest alone has no tag."""
    if ref.tag is not None:
        return ref.tag
    return "latest" if ref.digest is None else None


def find_chain(rules: Sequence[RewriteRule]) -> tuple[int, int] | None:
    """The first (i, j) where rule j would rewrite rule i's output again, or None.

    Rules apply once per admission, but a reinvoked webhook sees its own output: a chain would
    rewrite again on reinvocation, and a rule whose output it matches itself would grow the
    path each time. A map without chains is a fixed point, so the answer is idempotent.

    Near-linear: a rule's output can only meet a source that is one of its own ancestors (by
    path component) or lies under it, so those are looked up, not every pair tried: a map
    of thousands of rules is checked in milliseconds.
    """
    by_source: dict[str, list[int]] = {}
    for index, rule in enumerate(rules):
        by_source.setdefault(rule.source.prefix, []).append(index)
    sources = sorted(by_source)
    first: tuple[int, int] | None = None
    for i, rule in enumerate(rules):
        for j in _overlapping(rule.target.prefix, by_source, sources):
            if rule.output_may_match(rules[j]) and (first is None or (i, j) < first):
                first = (i, j)
        if first is not None and first[0] == i:
            return first
    return first


def _overlapping(prefix: str, by_source: dict[str, list[int]], sources: list[str]) -> list[int]:
    """Rules whose source equals ``prefix``, is an ancestor of it, or lies under it."""
    found: list[int] = []
    cut = len(prefix)
    while cut > 0:
        found += by_source.get(prefix[:cut], ())
        cut = prefix.rfind("/", 0, cut)
    below = prefix + "/"
    start = bisect.bisect_left(sources, below)
    for source in sources[start:]:
        if not source.startswith(below):
            break
        found += by_source[source]
    return found


def _reject_duplicates(rules: Sequence[RewriteRule]) -> None:
    seen: dict[NamePattern, int] = {}
    for index, rule in enumerate(rules):
        if rule.source in seen:
            raise InvalidReference(
                f"rewrites[{index}] has the same 'from' {str(rule.source)!r}"
                f" as rewrites[{seen[rule.source]}]"
            )
        seen[rule.source] = index


DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    # gcr.io shut down; kubebuilder's kube-rbac-proxy lives on at quay.io/brancz with the same tags.
    ("gcr.io/kubebuilder/kube-rbac-proxy", "quay.io/brancz/kube-rbac-proxy"),
)

"""Find every container-image field in an object, with its pull credentials context.

The locator of each kind is generated from its image specs in the kind table (``kinds``):
each spec compiles, once, into a small function, and a kind's functions call each other as
its specs nest. The module is pure: it reads a decoded JSON body (possibly malformed) and
never raises for anything the body contains; what cannot be read is named in ``problems``.
It reads any mapping and sequence types that subclass ``dict`` and ``list`` (orjson's, or
ruamel.yaml's ``CommentedMap`` and ``CommentedSeq``), and never changes them.

It runs on the admission hot path for every Pod, so it does not copy the body and builds a
pointer string only for a field it reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from .kinds import (
    KINDS,
    All,
    At,
    Container,
    Containers,
    Each,
    ImageVolumes,
    KindInfo,
    Pull,
    Spec,
    kind_info,
)
from .oci.credential import PullContext


class ImageField(NamedTuple):
    # A NamedTuple, like the other values built per image per request: a frozen dataclass
    # costs a setattr call per field, and there are thousands of these a second.
    pointer: str  # RFC 6901 JSON Pointer to the string, e.g. "/spec/containers/0/image"
    image: str  # the current value
    pull: PullContext


@dataclass(frozen=True, slots=True)
class Located:
    fields: tuple[ImageField, ...]
    problems: tuple[str, ...]  # e.g. "/spec/containers/0/image: expected a string, got int"
    # Past the limit: whether there were more image fields (1 or 0, the walk stopped), and
    # how many more problems.
    fields_over_limit: int = 0
    problems_over_limit: int = 0


NO_PULL: Final = PullContext()
UNLIMITED: Final = 1 << 62


def escape_pointer_token(token: str) -> str:
    """Escape one reference token for an RFC 6901 JSON Pointer ("~" first, then "/")."""
    if "~" in token or "/" in token:
        return token.replace("~", "~0").replace("/", "~1")
    return token


def locate(info: KindInfo, obj: Any, limit: int = UNLIMITED) -> Located:
    """Every image field of ``obj``, an object of kind ``info``, with its pull context.

    The walk stops at the first field past ``limit`` (``fields_over_limit`` is then 1: there
    are more, how many is not counted), so a hostile object of 50,000 images costs the walk
    of a thousand; problems past ``limit`` are counted.
    """
    found = _Found(obj, limit)
    if isinstance(obj, dict):
        with contextlib.suppress(_LimitReached):
            _LOCATORS[info.key](obj, "", NO_PULL, found)
    else:
        found.wrong_type("", "an object", obj)
    # Paths that share a prefix (LLM pod specs, runtime workerSpec) meet the same malformed
    # parent more than once; report it once.
    return Located(
        tuple(found.fields),
        tuple(dict.fromkeys(found.problems)),
        found.fields_over_limit,
        found.problems_over_limit,
    )


def locate_images(group: str, kind: str, obj: Any, limit: int = UNLIMITED) -> Located | None:
    """Every image field of ``obj`` with its pull context; None for an unknown kind."""
    info = kind_info(group, kind)
    return None if info is None else locate(info, obj, limit)


class _LimitReached(Exception):
    """Ends a walk at the first image field past the limit."""


class _Found:
    """Accumulates fields and problems for one object, up to a limit of each."""

    __slots__ = (
        "fields",
        "fields_over_limit",
        "inherited",
        "limit",
        "problems",
        "problems_over_limit",
        "root",
    )

    def __init__(self, root: Any, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.fields: list[ImageField] = []
        self.fields_over_limit = 0
        self.problems: list[str] = []
        self.problems_over_limit = 0
        self.inherited: dict[tuple[str, ...], PullContext] | None = None

    def field(self, pointer: str, image: str, pull: PullContext) -> None:
        if len(self.fields) >= self.limit:
            self.fields_over_limit = 1
            raise _LimitReached
        self.fields.append(ImageField(pointer, image, pull))

    def problem(self, pointer: str, message: str) -> None:
        if len(self.problems) < self.limit:
            self.problems.append(f"{pointer or '(root)'}: {message}")
        else:
            self.problems_over_limit += 1

    def wrong_type(self, pointer: str, expected: str, value: object) -> None:
        self.problem(pointer, f"expected {expected}, got {type(value).__name__}")


# A compiled spec: walks ``node`` (a dict) found at ``pointer``, under pull context ``pull``.
_Walk = Callable[[Mapping[str, Any], str, PullContext, _Found], None]


def _compile(spec: Spec) -> _Walk:
    match spec:
        case At(then=then):
            return _at(spec.keys, _compile(then))
        case All(specs=specs):
            return _all(_flat(specs))
        case Pull(then=then, inherit=inherit):
            return _pull(_compile(then), None if inherit is None else tuple(inherit.split(".")))
        case Each(key=key, then=then):
            return _each(key, _compile(then))
        case Containers(key=key):
            return _containers(key)
        case Container(key=key):
            return _container(key)
        case ImageVolumes():
            return _image_volumes
    raise TypeError(f"not an image spec: {spec!r}")


def _at(keys: tuple[str, ...], then: _Walk) -> _Walk:
    tokens = [escape_pointer_token(key) for key in keys]
    # The pointer of each step, built only when a step is reported or the end is reached.
    steps = tuple(
        (key, "".join(f"/{token}" for token in tokens[: i + 1])) for i, key in enumerate(keys)
    )
    suffix = steps[-1][1]

    def walk(node: Mapping[str, Any], pointer: str, pull: PullContext, found: _Found) -> None:
        for key, step in steps:
            value = node.get(key)
            if value is None:
                return
            if not isinstance(value, dict):
                found.wrong_type(pointer + step, "an object", value)
                return
            node = value
        then(node, pointer + suffix, pull, found)

    return walk


def _flat(specs: tuple[Spec, ...]) -> tuple[_Walk, ...]:
    """The walks of ``specs`` in order, nested ``All`` unfolded and a run of ``Container``
    specs walked in one loop: the same walk, fewer calls on the hot path."""
    walks: list[_Walk] = []
    run: list[str] = []
    for spec in _unfold(specs):
        if isinstance(spec, Container):
            run.append(spec.key)
            continue
        if run:
            walks.append(_container(*run))
            run = []
        walks.append(_compile(spec))
    if run:
        walks.append(_container(*run))
    return tuple(walks)


def _unfold(specs: tuple[Spec, ...]) -> list[Spec]:
    return [
        leaf
        for spec in specs
        for leaf in (_unfold(spec.specs) if isinstance(spec, All) else [spec])
    ]


def _all(walks: tuple[_Walk, ...]) -> _Walk:
    if len(walks) == 1:
        return walks[0]

    def walk(node: Mapping[str, Any], pointer: str, pull: PullContext, found: _Found) -> None:
        for each in walks:
            each(node, pointer, pull, found)

    return walk


def _pull(then: _Walk, inherit: tuple[str, ...] | None) -> _Walk:
    def walk(node: Mapping[str, Any], pointer: str, pull: PullContext, found: _Found) -> None:
        base = NO_PULL if inherit is None else _pull_context_at(found, inherit)
        then(node, pointer, _pull_context(node, pointer, found, base), found)

    return walk


def _each(key: str, then: _Walk) -> _Walk:
    token = escape_pointer_token(key)

    def walk(node: Mapping[str, Any], pointer: str, pull: PullContext, found: _Found) -> None:
        items = _list_at(node, key, token, pointer, found)
        if not items:
            return
        base = f"{pointer}/{token}"
        for index, item in enumerate(items):
            if isinstance(item, dict):
                then(item, f"{base}/{index}", pull, found)
            else:
                found.wrong_type(f"{base}/{index}", "an object", item)

    return walk


def _containers(key: str) -> _Walk:
    """A list of containers: each element's ``image``."""

    def image(node: Mapping[str, Any], pointer: str, pull: PullContext, found: _Found) -> None:
        _image_at(node, "image", pointer, pull, found)

    return _each(key, image)


def _container(*keys: str) -> _Walk:
    """Embedded containers, one under each of ``keys``."""
    return _image_holders(keys, "image")


def _image_holders(keys: tuple[str, ...], image_key: str) -> _Walk:
    """The objects under ``keys`` (those present), each holding an image at ``image_key``."""
    tokens = tuple((key, escape_pointer_token(key)) for key in keys)

    def walk(node: Mapping[str, Any], pointer: str, pull: PullContext, found: _Found) -> None:
        for key, token in tokens:
            holder = node.get(key)
            if holder is None:
                continue
            if isinstance(holder, dict):
                _image_at(holder, image_key, f"{pointer}/{token}", pull, found)
            else:
                found.wrong_type(f"{pointer}/{token}", "an object", holder)

    return walk


# Only the image volume source holds a container image; rbd.image is a Ceph block device name
# and must never be touched.
_image_volumes: Final = _each("volumes", _image_holders(("image",), "reference"))


def _list_at(
    node: Mapping[str, Any], key: str, token: str, pointer: str, found: _Found
) -> list[Any] | tuple[Any, ...] | None:
    value = node.get(key)
    if value is None or isinstance(value, list | tuple):
        return value
    found.wrong_type(f"{pointer}/{token}", "a list", value)
    return None


def _image_at(
    node: Mapping[str, Any], key: str, pointer: str, pull: PullContext, found: _Found
) -> None:
    """Report ``node[key]`` as an image; an absent image is normal (it comes from elsewhere)."""
    value = node.get(key)
    if value is None:
        return
    if not isinstance(value, str):
        found.wrong_type(f"{pointer}/{key}", "a string", value)
    elif not value:
        found.problem(f"{pointer}/{key}", "empty image")
    else:
        found.field(f"{pointer}/{key}", value, pull)


# --- pull contexts ------------------------------------------------------------------------


def _pull_context(
    spec: Mapping[str, Any], pointer: str, found: _Found, inherit: PullContext = NO_PULL
) -> PullContext:
    """The pod spec's own credentials; each field absent here falls back to ``inherit``."""
    secrets = _pull_secret_names(spec, pointer, found) or inherit.image_pull_secrets
    account = _service_account(spec, pointer, found) or inherit.service_account
    if not secrets and account is None:
        return NO_PULL
    return PullContext(secrets, account)


def _pull_context_at(found: _Found, keys: tuple[str, ...]) -> PullContext:
    """The credentials of the pod spec at ``keys`` from the root, for another one to inherit.

    Its problems, if any, were reported when it was walked itself (and are reported once).
    """
    if found.inherited is None:
        found.inherited = {}
    elif keys in found.inherited:
        return found.inherited[keys]
    node, pointer, context = found.root, "", NO_PULL
    for key in keys:
        node = node.get(key)
        if not isinstance(node, dict):
            break
        pointer = f"{pointer}/{escape_pointer_token(key)}"
    else:
        context = _pull_context(node, pointer, found)
    found.inherited[keys] = context
    return context


def _pull_secret_names(node: Mapping[str, Any], pointer: str, found: _Found) -> tuple[str, ...]:
    items = _list_at(node, "imagePullSecrets", "imagePullSecrets", pointer, found)
    if not items:
        return ()
    base = f"{pointer}/imagePullSecrets"
    names: dict[str, None] = {}  # ordered, and no quadratic membership test on a long list
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            found.wrong_type(f"{base}/{index}", "an object", item)
            continue
        name = item.get("name")
        if name is None or name == "":
            continue
        if not isinstance(name, str):
            found.wrong_type(f"{base}/{index}/name", "a string", name)
        else:
            names[name] = None
    return tuple(names)


def _service_account(node: Mapping[str, Any], pointer: str, found: _Found) -> str | None:
    for key in ("serviceAccountName", "serviceAccount"):
        value = node.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, str):
            return value
        found.wrong_type(f"{pointer}/{key}", "a string", value)
    return None


_LOCATORS: Final[Mapping[str, _Walk]] = MappingProxyType(
    {info.key: _compile(info.images) for info in KINDS}
)

"""Every image value of a kind's object as CEL, generated from the kind table (``kinds``).

The API server evaluates these: the webhook's ``matchConditions`` ask whether some image
needs pinhook, and a ValidatingAdmissionPolicy can ask whether every image is pinned. An image
value is whatever stands at an image path: a string where the object is well formed, anything
else where it is not, so that a caller can send a malformed object on for pinhook to warn.

Every step into the object is guarded by ``has()`` and ``type()`` checks, and a missing or
wrong-typed part contributes no value, so no object, however malformed, makes an expression
fail (an evaluation error would skip pinhook under ``failurePolicy: Ignore`` and reject the
request under ``Fail``). A macro (filter, map, exists) on a value that may not be a list sits
behind a ternary rather than ``&&``: the same in CEL, and lazier in every evaluator.

Most kinds' image values form one CEL list. An InferenceService's canaries do not: each is a
predictor with lists of its own, and CEL has no flatten, so :class:`CelImages` quantifies over
them apart (``exists``, ``all``) and offers the flat ``values`` only where there is one, and
``lists``, a list of flat lists, everywhere.

The same values can be read from another root (``oldObject``, for an UPDATE), and a kind's
fields one at a time (:func:`cel_image_fields`), for messages that name the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .kinds import All, At, Container, Containers, Each, ImageVolumes, KindInfo, Pull, Spec

CelTest = Callable[[str], str]  # CEL expression of one image value -> CEL bool


@dataclass(frozen=True, slots=True)
class CelImages:
    """The image values of one kind's object (the CEL variable ``object``)."""

    _node: _Node

    @property
    def values(self) -> str | None:
        """A CEL list of every image value; None for a kind whose values CEL cannot flatten."""
        return self._node.values if isinstance(self._node, _Values) else None

    def exists(self, test: CelTest) -> str:
        """CEL: some image value ``s`` satisfies ``test(s)``."""
        return self._node.exists(test)

    def all(self, test: CelTest) -> str:
        """CEL: every image value ``s`` satisfies ``test(s)`` (true when there are none)."""
        return self._node.all(test)

    @property
    def lists(self) -> str:
        """A CEL list of lists of image values, together every one of them."""
        return self._node.lists


def cel_images(info: KindInfo, root: str = "object") -> CelImages:
    """The image values of an object of kind ``info``, as CEL over ``root``."""
    return CelImages(_render(info.images, root, 0))


def cel_image_fields(info: KindInfo) -> list[tuple[str, CelImages]]:
    """Each image field of kind ``info`` apart, in table order, with its path as people write
    it: ``spec.containers[*].image``, ``spec.canary[*].predictor.model.image``."""
    return [
        (path, CelImages(_render(spec, "object", 0))) for path, spec in _fields(info.images, "")
    ]


def cel_string(text: str) -> str:
    """A CEL single-quoted string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def cel_list(texts: Iterable[str]) -> str:
    """A CEL list literal of strings."""
    return "[" + ", ".join(cel_string(text) for text in texts) + "]"


def _fields(spec: Spec, path: str) -> list[tuple[str, Spec]]:
    """The leaves of ``spec`` (one image field each), each under its own parents only."""
    match spec:
        case Containers(key=key):
            return [(f"{path}{key}[*].image", spec)]
        case Container(key=key):
            return [(f"{path}{key}.image", spec)]
        case ImageVolumes():
            return [(f"{path}volumes[*].image.reference", spec)]
        case Pull(then=then):
            return _fields(then, path)
        case At(path=at, then=then):
            return [(leaf, At(at, sub)) for leaf, sub in _fields(then, f"{path}{at}.")]
        case Each(key=key, then=then):
            return [(leaf, Each(key, sub)) for leaf, sub in _fields(then, f"{path}{key}[*].")]
        case All(specs=specs):
            return [leaf for each in specs for leaf in _fields(each, path)]
    raise TypeError(f"not an image spec: {spec!r}")


# --- the rendered tree --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Values:
    """A flat CEL list of image values."""

    values: str

    def exists(self, test: CelTest) -> str:
        return f"{self.values}.exists(s, {test('s')})"

    def all(self, test: CelTest) -> str:
        return f"{self.values}.all(s, {test('s')})"

    @property
    def lists(self) -> str:
        return f"[{self.values}]"


@dataclass(frozen=True, slots=True)
class _Guarded:
    """Values that exist only where ``guard`` holds (the parent of a repeated part)."""

    guard: str
    inner: _Node

    def exists(self, test: CelTest) -> str:
        return f"{self.guard} &&\n({self.inner.exists(test)})"

    def all(self, test: CelTest) -> str:
        return f"!({self.guard}) ||\n({self.inner.all(test)})"

    @property
    def lists(self) -> str:
        return _if(self.guard, self.inner.lists)


@dataclass(frozen=True, slots=True)
class _Parts:
    """Flat values and repeated parts side by side."""

    parts: tuple[_Node, ...]

    def exists(self, test: CelTest) -> str:
        return " ||\n".join(part.exists(test) for part in self.parts)

    def all(self, test: CelTest) -> str:
        return " &&\n".join(part.all(test) for part in self.parts)

    @property
    def lists(self) -> str:
        return _concat(part.lists for part in self.parts)


@dataclass(frozen=True, slots=True)
class _Repeated:
    """The values in each object element of the list ``items``, bound to ``var``."""

    items: str
    var: str
    element: _Node

    def exists(self, test: CelTest) -> str:
        element = self.element
        if isinstance(element, _Guarded):
            condition = f"{element.guard} && {element.inner.exists(test)}"
        else:
            condition = element.exists(test)
        return (
            f"(has({self.items}) && type({self.items}) == list ?"
            f" {self.items}.exists({self.var}, type({self.var}) == map && {condition}) : false)"
        )

    def all(self, test: CelTest) -> str:
        element = self.element
        if isinstance(element, _Guarded):
            condition = f"!({element.guard}) || {element.inner.all(test)}"
        else:
            condition = element.all(test)
        return (
            f"(has({self.items}) && type({self.items}) == list ?"
            f" {self.items}.all({self.var}, type({self.var}) != map || {condition}) : true)"
        )

    @property
    def lists(self) -> str:
        # One list per element: each element's values are flat (no list nests in another).
        element, guard = self.element, f"type({self.var}) == map"
        if isinstance(element, _Guarded):
            guard = f"{guard} && {element.guard}"
            element = element.inner
        if not isinstance(element, _Values):
            raise TypeError(f"nested repeated parts under {self.items}")
        return (
            f"(has({self.items}) && type({self.items}) == list ?"
            f" {self.items}.filter({self.var}, {guard}).map({self.var}, {element.values}) : [])"
        )


_Node = _Values | _Guarded | _Parts | _Repeated


def _render(spec: Spec, node: str, depth: int) -> _Node:
    """``spec`` read at the CEL map expression ``node``; ``depth`` counts enclosing lists."""
    match spec:
        case Containers(key=key):
            return _Values(_container_list(node, key))
        case Container(key=key):
            return _Values(_container_at(node, key))
        case ImageVolumes():
            return _Values(_image_volumes(node))
        case Pull(then=then):
            return _render(then, node, depth)  # credentials are no business of CEL
        case At(then=then):
            guard, end = _path_guard(node, spec.keys)
            inner = _render(then, end, depth)
            if isinstance(inner, _Values):
                return _Values(_if(guard, inner.values))
            return _Guarded(guard, inner)
        case All(specs=specs):
            rendered = [_render(each, node, depth) for each in specs]
            flat = [part.values for part in rendered if isinstance(part, _Values)]
            repeated = [part for part in rendered if not isinstance(part, _Values)]
            if not repeated:
                return _Values(_concat(flat))
            head = (_Values(_concat(flat)),) if flat else ()
            return _Parts((*head, *repeated))
        case Each(key=key, then=then):
            var = "k" if depth == 0 else f"k{depth}"
            if isinstance(then, At):
                # An element's own path is checked in the quantifier, not per image list.
                guard, end = _path_guard(var, then.keys)
                element: _Node = _Guarded(guard, _render(then.then, end, depth + 1))
            else:
                element = _render(then, var, depth + 1)
            return _Repeated(f"{node}.{key}", var, element)
    raise TypeError(f"not an image spec: {spec!r}")


def _if(guard: str, then: str) -> str:
    return f"({guard} ? {then} : [])"


def _concat(parts: Iterable[str]) -> str:
    return "(" + " +\n".join(parts) + ")"


def _path_guard(node: str, keys: Iterable[str]) -> tuple[str, str]:
    """The guard that every step of ``keys`` from ``node`` (a map) is a map, and the end node."""
    guards: list[str] = []
    for key in keys:
        node = f"{node}.{key}"
        guards += [f"has({node})", f"type({node}) == map"]
    return " && ".join(guards), node


def _container_at(node: str, key: str) -> str:
    child = f"{node}.{key}"
    return _if(f"has({child}) && type({child}) == map && has({child}.image)", f"[{child}.image]")


def _container_list(node: str, key: str) -> str:
    child = f"{node}.{key}"
    return _if(
        f"has({child}) && type({child}) == list",
        f"{child}.filter(c, type(c) == map && has(c.image)).map(c, c.image)",
    )


def _image_volumes(node: str) -> str:
    # Only the image volume source holds an image; rbd.image is a Ceph device name. A
    # wrong-typed image source is kept as it is: a non-string value.
    child = f"{node}.volumes"
    return _if(
        f"has({child}) && type({child}) == list",
        f"{child}.filter(v, type(v) == map && has(v.image) &&"
        " (type(v.image) != map || has(v.image.reference)))"
        ".map(v, type(v.image) == map ? v.image.reference : v.image)",
    )

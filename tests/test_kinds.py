"""The kind table and what is generated from it: the Python locator and the CEL image values
must find the same images, on every fixture, evaluated for real with cel-python."""

from __future__ import annotations

import copy
from collections import OrderedDict
from functools import lru_cache
from typing import Any

import celpy
import jsonpointer
import pytest

from tests.reviews import OBJECTS, load_object
from webhook.cel import cel_images
from webhook.kinds import EXPLAINERS, KINDS, PREDICTOR_FRAMEWORKS, KindInfo, Mode, kind_info
from webhook.locate import locate

Obj = dict[str, Any]


def _info(obj: Obj) -> KindInfo:
    info = kind_info(obj["apiVersion"].rpartition("/")[0], obj["kind"])
    assert info is not None
    return info


def _fixtures() -> list[Obj]:
    objects = [load_object(path.name) for path in sorted(OBJECTS.glob("*.yaml"))]
    deployment = load_object("deployment.yaml")
    for api_version, kind in (
        ("apps/v1", "StatefulSet"),
        ("apps/v1", "DaemonSet"),
        ("apps/v1", "ReplicaSet"),
        ("batch/v1", "Job"),
    ):
        objects.append(deployment | {"apiVersion": api_version, "kind": kind})
    objects.append(_every_implementation())
    return objects


def _every_implementation() -> Obj:
    """An InferenceService with every framework and explainer key of the table at once."""
    predictor = {key: {"image": f"example.com/{key}:1"} for key in PREDICTOR_FRAMEWORKS}
    explainer = {key: {"image": f"example.com/explainer-{key}:1"} for key in EXPLAINERS}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": "every-implementation"},
        "spec": {"predictor": predictor, "explainer": explainer},
    }


FIXTURES = _fixtures()


def _id(obj: Obj) -> str:
    return f"{obj['kind']}-{obj['metadata']['name']}"


@lru_cache(maxsize=512)
def _program(expression: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(expression))


def _evaluate(expression: str, obj: Obj, **variables: Any) -> Any:
    activation = {name: celpy.json_to_cel(value) for name, value in variables.items()}
    return _program(expression).evaluate({"object": celpy.json_to_cel(obj), **activation})


def test_fixtures_cover_every_kind() -> None:
    assert {_info(obj).key for obj in FIXTURES} == {info.key for info in KINDS}


@pytest.mark.parametrize("obj", FIXTURES, ids=_id)
def test_cel_and_the_locator_find_the_same_images(obj: Obj) -> None:
    info = _info(obj)
    located = locate(info, obj)
    assert located.fields and located.problems == ()
    images = cel_images(info)
    # Every field gets an image of its own, so each path is told apart from every other.
    marked = copy.deepcopy(obj)
    for index, field in enumerate(located.fields):
        jsonpointer.set_pointer(marked, field.pointer, f"example.com/marker{index}:1")
    markers = [f"example.com/marker{index}:1" for index in range(len(located.fields))]
    if images.values is not None:
        assert list(_evaluate(images.values, obj)) == [f.image for f in located.fields]
        assert list(_evaluate(images.values, marked)) == markers
    is_marker = images.exists(lambda s: f"{s} == marker")
    all_marker = images.all(lambda s: f"{s} == marker")
    for marker in markers:
        assert _evaluate(is_marker, marked, marker=marker)
        assert bool(_evaluate(all_marker, marked, marker=marker)) == (len(markers) == 1)
    assert _evaluate(images.all(lambda s: f"{s} in known"), marked, known=markers)
    assert not _evaluate(images.exists(lambda s: f"!({s} in known)"), marked, known=markers)


@pytest.mark.parametrize("info", KINDS, ids=lambda info: info.key)
def test_an_object_without_images_has_none_in_cel(info: KindInfo) -> None:
    images = cel_images(info)
    for obj in ({}, {"spec": None}, {"spec": "x"}, {"spec": {"predictor": []}}):
        assert not _evaluate(images.exists(lambda s: "true"), obj)
        assert _evaluate(images.all(lambda s: "false"), obj)
        if images.values is not None:
            assert list(_evaluate(images.values, obj)) == []


def test_only_inference_services_have_no_flat_cel_list() -> None:
    # Canary predictors hold lists of their own, and CEL has no flatten.
    assert [info.kind for info in KINDS if cel_images(info).values is None] == ["InferenceService"]


def test_every_framework_key_of_the_table_is_located() -> None:
    info = kind_info("serving.kserve.io", "InferenceService")
    assert info is not None
    pointers = {field.pointer for field in locate(info, _every_implementation()).fields}
    assert pointers == {f"/spec/predictor/{key}/image" for key in PREDICTOR_FRAMEWORKS} | {
        f"/spec/explainer/{key}/image" for key in EXPLAINERS
    }
    assert "catboost" in PREDICTOR_FRAMEWORKS


class _Seq(list[Any]):
    """A list subclass, as ruamel.yaml's CommentedSeq is."""


def _ruamel_like(value: Any) -> Any:
    # CommentedMap subclasses an OrderedDict, itself a dict; CommentedSeq subclasses list.
    if isinstance(value, dict):
        return OrderedDict((key, _ruamel_like(item)) for key, item in value.items())
    if isinstance(value, list):
        return _Seq(_ruamel_like(item) for item in value)
    return value


@pytest.mark.parametrize("obj", FIXTURES, ids=_id)
def test_the_locator_reads_dict_and_list_subclasses(obj: Obj) -> None:
    info = _info(obj)
    assert locate(info, _ruamel_like(obj)) == locate(info, obj)


def test_every_kind_has_a_typed_default_mode_and_its_facts() -> None:
    for info in KINDS:
        assert isinstance(info.default_mode, Mode)
        assert info.key == (f"{info.resource}.{info.group}" if info.group else info.resource)
        assert info.webhook_name.startswith(f"{info.resource}.")
        assert info.webhook_name.endswith(".pinhook.dev")

"""Helpers to build AdmissionReviews from realistic objects and apply the answers."""

from __future__ import annotations

import base64
import copy
import hashlib
import uuid
from pathlib import Path
from typing import Any

import jsonpatch
import orjson
import yaml

OBJECTS = Path(__file__).parent / "data" / "objects"


def load_object(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((OBJECTS / name).read_text())
    return data


def plain_pod(*images: str, name: str = "app") -> dict[str, Any]:
    """A Pod with one container per image and nothing else."""
    containers = [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": containers},
    }


def fake_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def review(
    obj: Any,
    *,
    operation: str = "CREATE",
    namespace: str | None = "default",
    api_version: str = "admission.k8s.io/v1",
    old: Any = None,
    sub_resource: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """An AdmissionReview as the API server sends it for ``obj``."""
    group, _, version = obj.get("apiVersion", "v1").rpartition("/")
    kind = obj["kind"]
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()),
        "kind": {"group": group, "version": version, "kind": kind},
        "resource": {"group": group, "version": version, "resource": kind.lower() + "s"},
        "requestKind": {"group": group, "version": version, "kind": kind},
        "name": obj.get("metadata", {}).get("name"),
        "operation": operation,
        "userInfo": {"username": "kubernetes-admin", "groups": ["system:masters"]},
        "object": obj,
        "oldObject": old,
        "dryRun": dry_run,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    if namespace is not None:
        request["namespace"] = namespace
    if sub_resource is not None:
        request["subResource"] = sub_resource
    return {"apiVersion": api_version, "kind": "AdmissionReview", "request": request}


def body(review_doc: dict[str, Any]) -> bytes:
    return orjson.dumps(review_doc)


def decode_patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    if "patch" not in response:
        return []
    assert response["patchType"] == "JSONPatch"
    ops: list[dict[str, Any]] = orjson.loads(base64.b64decode(response["patch"]))
    return ops


def apply_response(obj: Any, response: dict[str, Any]) -> Any:
    """The object as the API server would store it after this webhook's answer."""
    return jsonpatch.apply_patch(copy.deepcopy(obj), decode_patch(response))


def with_images(obj: Any, images: dict[str, str]) -> Any:
    """A copy of ``obj`` with the strings at the given JSON pointers replaced."""
    expected = copy.deepcopy(obj)
    for pointer, value in images.items():
        jsonpatch.JsonPointer(pointer).set(expected, value)
    return expected

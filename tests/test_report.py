"""The pure parts of ``pinhook report`` (the cluster side runs in tests/e2e/test_report.py)."""

from __future__ import annotations

from typing import Any

from webhook.admission import AdmissionRequest
from webhook.config import load_settings
from webhook.errors import NotFound
from webhook.kinds import Mode
from webhook.locate import NO_PULL, ImageField
from webhook.mutate import Mutator
from webhook.plan import ImagePlan, ImageResult
from webhook.report import digest_of, enforce_denial, field_path, running_digests
from webhook.resolve import StaticDigestResolver

DIGEST = "sha256:" + "b" * 64


def test_digest_of_references_and_image_ids() -> None:
    assert digest_of(f"docker-pullable://nginx@{DIGEST}") == DIGEST
    assert digest_of(f"docker.io/library/nginx@{DIGEST}") == DIGEST
    assert digest_of(f"nginx:1.27@{DIGEST}") == DIGEST
    assert digest_of(DIGEST) is None  # an image ID, not a manifest digest
    assert digest_of("nginx:1.27") is None


def test_running_digests_by_pointer_from_container_statuses() -> None:
    pod: dict[str, Any] = {
        "spec": {
            "initContainers": [{"name": "init", "image": "busybox"}],
            "containers": [{"name": "a", "image": "nginx"}, {"name": "b", "image": "redis"}],
        },
        "status": {
            "initContainerStatuses": [{"name": "init", "imageID": f"busybox@{DIGEST}"}],
            "containerStatuses": [
                {"name": "b", "imageID": f"docker-pullable://redis@{DIGEST}"},
                {"name": "a", "imageID": "sha256:" + "c" * 64},
            ],
        },
    }
    assert running_digests(pod) == {
        "/spec/initContainers/0/image": DIGEST,
        "/spec/containers/1/image": DIGEST,
    }
    assert running_digests({"spec": pod["spec"]}) == {}


def test_field_path() -> None:
    assert field_path("/spec/template/spec/containers/0/image") == (
        "spec.template.spec.containers[0].image"
    )


def _request(namespace: str, image: str) -> AdmissionRequest:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "c", "image": image}]}}  # fmt: skip
    return AdmissionRequest("admission.k8s.io/v1", "r", "", "Pod", "CREATE", namespace, pod, None)


def _results(mutator: Mutator, image: str, digest: str | None) -> list[ImageResult]:
    (planned,) = mutator.plan_fields([ImageField("/spec/containers/0/image", image, NO_PULL)])
    assert isinstance(planned, ImagePlan)
    failure = None if digest else NotFound(f"{image}: not found")
    final = f"{image}@{digest}" if digest else image
    return [ImageResult(planned, final, digest, None, failure)]


def test_enforce_denial_is_decide_with_require_digest_and_audit_as_pin() -> None:
    settings = load_settings(
        "mode: audit\nexcludedNamespaces: [quiet]\nnamespaces: {legacy: {mode: 'off'}}\n"
    )
    mutator = Mutator(settings, StaticDigestResolver({}))
    gone = _results(mutator, "example.com/gone:1", None)
    denial = enforce_denial(mutator, _request("shop", "example.com/gone:1"), gone)
    assert denial == "cannot pin example.com/gone:1 (not-found) and requireDigest is set"
    ok = _results(mutator, "example.com/app:1", DIGEST)
    assert enforce_denial(mutator, _request("shop", "example.com/app:1"), ok) is None
    # Where pinhook would not pin (excluded, or its mode off there), enforce denies nothing.
    assert enforce_denial(mutator, _request("quiet", "example.com/gone:1"), gone) is None
    assert enforce_denial(mutator, _request("legacy", "example.com/gone:1"), gone) is None
    assert mutator.plan(_request("shop", "x:1")).mode is Mode.AUDIT

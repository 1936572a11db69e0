"""``pinhook report``: its pure parts, and the report of objects already read against a real
registry (the cluster side runs in tests/e2e/test_report.py)."""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

from tests.harness.fixtures import BASIC_PASSWORD, BASIC_USER, RegistryEnv, dockerconfigjson
from webhook.admission import AdmissionRequest
from webhook.config import load_settings
from webhook.errors import NotFound
from webhook.kinds import Mode, kind_info
from webhook.kube import StaticPullSecrets
from webhook.locate import NO_PULL, ImageField
from webhook.mutate import Mutator
from webhook.plan import ImagePlan, ImageResult
from webhook.report import (
    Found,
    digest_of,
    enforce_denial,
    field_path,
    print_table,
    report_of,
    running_digests,
)
from webhook.resolve import StaticDigestResolver
from webhook.runtime import Runtime

DIGEST = "sha256:" + "b" * 64
BASIC = (BASIC_USER, BASIC_PASSWORD)


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


# --- each object judged with its own credentials ----------------------------------------------


def _pod(namespace: str, name: str, image: str, secret: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": image}]}
    if secret is not None:
        spec["imagePullSecrets"] = [{"name": secret}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


async def test_each_object_is_judged_on_the_lookup_with_its_own_credentials(
    basic_registry: RegistryEnv,
) -> None:
    host = basic_registry.host
    repo = f"report/private-{uuid.uuid4().hex[:8]}"
    pushed = basic_registry.push.index(repo, "1.0")
    settings = load_settings(f'registry: {{insecure: ["{host}"], allowedHosts: ["{host}"]}}')
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "regcred", "namespace": "team-b"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": json.dumps(dockerconfigjson({host: BASIC}))},
    }
    pods = kind_info("", "Pod")
    assert pods is not None
    # team-b (with the pull secret) listed first: its lookup must not answer for team-a.
    found = [
        Found(pods, _pod("team-b", "first", pushed.tag_ref, "regcred")),
        Found(pods, _pod("team-a", "anonymous", pushed.tag_ref)),
        Found(pods, _pod("team-b", "second", pushed.tag_ref, "regcred")),
    ]
    secrets = StaticPullSecrets.from_manifests([secret])
    async with Runtime(settings, pull_secrets=secrets) as runtime:
        report = await report_of(found, runtime)

    assert report.denied == [
        f"Pod team-a/anonymous: cannot pin {pushed.tag_ref} (unauthorized) and requireDigest is set"
    ]
    rows = {row.credentials: row for row in report.images}
    assert set(rows) == {("secret team-b/regcred",), ()}
    private, anonymous = rows[("secret team-b/regcred",)], rows[()]
    assert private.tag_digest == pushed.digest and private.error is None
    assert [str(use) for use in private.uses] == [
        "Pod team-b/first: spec.containers[0].image",
        "Pod team-b/second: spec.containers[0].image",
    ]
    assert anonymous.tag_digest is None and anonymous.reason == "unauthorized"
    assert [str(use) for use in anonymous.uses] == [
        "Pod team-a/anonymous: spec.containers[0].image"
    ]
    # The same credentials share one lookup: one answer with the manifest, for both Pods.
    answered = [
        entry
        for entry in basic_registry.registry.access_log()
        if f"/v2/{repo}/manifests/1.0" in entry.uri and entry.status == 200
    ]
    assert len(answered) == 1, answered
    summary = report.summary()
    assert (summary["images"], summary["unresolvable"], summary["enforceWouldDeny"]) == (1, 1, 1)
    table = io.StringIO()
    print_table(report, table)
    # Rows of one image are told apart by their credentials.
    assert "(credentials: secret team-b/regcred)" in table.getvalue()
    assert f"{pushed.tag_ref} (credentials: none): " in table.getvalue()

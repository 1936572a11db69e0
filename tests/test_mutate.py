"""The admission pipeline end to end through the HTTP app, with the static digest resolver."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import orjson
import pytest

from tests.reviews import (
    apply_response,
    body,
    decode_patch,
    fake_digest,
    load_object,
    review,
    with_images,
)
from webhook.admission import AdmissionRequest, parse_review
from webhook.app import create_app
from webhook.config import Settings, load_settings
from webhook.kube import NoPullSecrets
from webhook.logs import FIELDS
from webhook.metrics import Metrics
from webhook.mutate import Mutator
from webhook.oci.reference import ImageRef
from webhook.oci.registry import RegistryClient
from webhook.oci.transport import RegistryOptions
from webhook.plan import RequestPlan
from webhook.resolve import (
    DigestResolver,
    Held,
    Holding,
    PullScope,
    RegistryDigestResolver,
    Resolution,
    StaticDigestResolver,
)

PINNED_TAGS = [
    "kserve/storage-initializer:v0.15.2",
    "kserve/sklearnserver:v0.15.2",
    "kserve/agent:v0.15.2",
    "registry.k8s.io/e2e-test-images/agnhost:2.53",
    "ghcr.io/acme/models/iris:1.0",
    "ghcr.io/acme/feature-enricher:2.3.1",
    "kserve/image-transformer:v0.15.2",
    "curlimages/curl:8.10.1",
    "kserve/art-explainer:v0.15.2",
    "ghcr.io/llm-d/llm-d:v0.2.0",
    "ghcr.io/llm-d/llm-d-routing-sidecar:v0.2.0",
    "vllm/vllm-openai:v0.10.1",
    "ghcr.io/llm-d/llm-d-inference-scheduler:v0.2.1",
    "vllm/vllm-openai:v0.10.1-render",
    "quay.io/brancz/kube-rbac-proxy:v0.13.1",
    "nginx:1.27",
    "nginx:latest",
    "ghcr.io/acme/sklearnserver:v0.15.2-patched",
    "registry.example.com/shop/report:1.0.3",
]


def D(image: str) -> str:
    return fake_digest(image)


def settings_yaml(extra: str = "") -> str:
    lines = ["resolver: static", "digests:"]
    lines += [f'  "{image}": "{D(image)}"' for image in PINNED_TAGS]
    return "\n".join(lines) + "\n" + extra


class Webhook:
    """The FastAPI app in-process, reached through httpx like the API server would."""

    def __init__(
        self,
        settings: Settings,
        resolver: DigestResolver | None = None,
        mutator: type[Mutator] = Mutator,
    ) -> None:
        self.metrics = Metrics()
        resolver = resolver or StaticDigestResolver(settings.digest_table)
        self._mutator = mutator(settings, resolver, self.metrics)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(self)), base_url="http://webhook"
        )

    @property
    def mutator(self) -> Mutator:
        return self._mutator

    def readiness(self) -> tuple[bool, str]:
        return True, "ok"

    async def send(self, review_doc: dict[str, Any]) -> dict[str, Any]:
        answer = await self.client.post("/mutate", content=body(review_doc))
        assert answer.status_code == 200, answer.text
        data: dict[str, Any] = answer.json()
        assert data["apiVersion"] == review_doc["apiVersion"]
        assert data["kind"] == "AdmissionReview"
        assert data["response"]["uid"] == review_doc["request"]["uid"]
        return data["response"]


WebhookFactory = Callable[[str], Webhook]


@pytest.fixture
async def webhook_for() -> AsyncIterator[WebhookFactory]:
    made: list[Webhook] = []

    def make(extra: str = "") -> Webhook:
        hook = Webhook(load_settings(settings_yaml(extra)))
        made.append(hook)
        return hook

    yield make
    for hook in made:
        await hook.client.aclose()


@pytest.fixture
def webhook(webhook_for: WebhookFactory) -> Webhook:
    return webhook_for("")


def pinned(image: str) -> str:
    return f"{image}@{D(image)}"


# --- each kind, from a realistic object ---------------------------------------------------


async def test_pod_all_image_fields_pinned_and_nothing_else_changes(webhook: Webhook) -> None:
    pod = load_object("pod-kserve-predictor.yaml")
    response = await webhook.send(review(pod, namespace="models"))
    assert response["allowed"] is True
    expected = with_images(
        pod,
        {
            "/spec/initContainers/0/image": pinned("kserve/storage-initializer:v0.15.2"),
            "/spec/containers/0/image": pinned("kserve/sklearnserver:v0.15.2"),
            "/spec/containers/1/image": pinned("kserve/agent:v0.15.2"),
            "/spec/ephemeralContainers/0/image": pinned(
                "registry.k8s.io/e2e-test-images/agnhost:2.53"
            ),
            "/spec/volumes/1/image/reference": pinned("ghcr.io/acme/models/iris:1.0"),
        },
    )
    assert apply_response(pod, response) == expected
    # rbd.image is a Ceph block device name, not a container image.
    rbd = [v for v in expected["spec"]["volumes"] if "rbd" in v]
    assert rbd[0]["rbd"]["image"] == "kube-model-disk"
    audit = orjson.loads(response["auditAnnotations"]["images"])
    assert "kserve/agent:v0.15.2 -> " + pinned("kserve/agent:v0.15.2") in audit


async def test_inference_service_components_and_kept_digest(webhook: Webhook) -> None:
    isvc = load_object("isvc-sklearn-full.yaml")
    response = await webhook.send(review(isvc, namespace="models"))
    patched = apply_response(isvc, response)
    expected = with_images(
        isvc,
        {
            "/spec/predictor/sklearn/image": pinned("kserve/sklearnserver:v0.15.2"),
            "/spec/predictor/containers/0/image": pinned("ghcr.io/acme/feature-enricher:2.3.1"),
            "/spec/transformer/containers/0/image": pinned("kserve/image-transformer:v0.15.2"),
            "/spec/transformer/initContainers/0/image": pinned("curlimages/curl:8.10.1"),
            "/spec/explainer/art/image": pinned("kserve/art-explainer:v0.15.2"),
        },
    )
    # The image volume already has a digest and no rule applies: it is left exactly as is.
    assert patched == expected


async def test_inference_service_after_kserve_defaulting(webhook: Webhook) -> None:
    isvc = load_object("isvc-defaulted.yaml")
    response = await webhook.send(review(isvc, api_version="admission.k8s.io/v1beta1"))
    patched = apply_response(isvc, response)
    model_image = isvc["spec"]["predictor"]["model"]["image"]
    assert patched["spec"]["predictor"]["model"]["image"] == pinned(model_image)


async def test_serving_runtime_is_rewritten_but_not_pinned(webhook_for: WebhookFactory) -> None:
    hook = webhook_for(
        "rewrites:\n  - from: docker.io/kserve/\n    to: mirror.example.com/kserve\n"
    )
    runtime = load_object("clusterservingruntime-sklearn.yaml")
    response = await hook.send(review(runtime, namespace=None))
    patched = apply_response(runtime, response)
    # KServe swaps runtime tags itself (runtimeVersion, -gpu), so the tag stays and no digest.
    assert patched == with_images(
        runtime, {"/spec/containers/0/image": "mirror.example.com/kserve/sklearnserver:v0.15.2"}
    )


async def test_knative_service_pinned_so_knative_skips_its_own_resolution(webhook: Webhook) -> None:
    ksvc = load_object("ksvc-predictor.yaml")
    response = await webhook.send(review(ksvc, namespace="models"))
    patched = apply_response(ksvc, response)
    container = patched["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == pinned("kserve/sklearnserver:v0.15.2")
    assert patched == with_images(
        ksvc, {"/spec/template/spec/containers/0/image": pinned("kserve/sklearnserver:v0.15.2")}
    )


async def test_llm_inference_service_every_template(webhook: Webhook) -> None:
    llm = load_object("llmisvc-vllm.yaml")
    response = await webhook.send(review(llm, namespace="llm"))
    patched = apply_response(llm, response)
    assert patched["spec"]["template"]["containers"][0]["image"] == pinned(
        "ghcr.io/llm-d/llm-d:v0.2.0"
    )
    router = patched["spec"]["router"]["scheduler"]["template"]["containers"][0]["image"]
    assert router == pinned("ghcr.io/llm-d/llm-d-inference-scheduler:v0.2.1")
    ops = orjson.loads(__import__("base64").b64decode(response["patch"]))
    assert all(op["op"] == "replace" for op in ops)
    assert all(op["path"].endswith(("/image", "/reference")) for op in ops)


async def test_cluster_storage_container_pinned(webhook: Webhook) -> None:
    csc = load_object("clusterstoragecontainer.yaml")
    response = await webhook.send(review(csc, namespace=None))
    patched = apply_response(csc, response)
    assert patched["spec"]["container"]["image"] == pinned("kserve/storage-initializer:v0.15.2")


async def test_workload_templates_are_off_by_default(webhook: Webhook) -> None:
    deployment = load_object("deployment.yaml")
    response = await webhook.send(review(deployment))
    assert response == {"uid": response["uid"], "allowed": True}


async def test_workload_templates_pinned_when_opted_in(webhook_for: WebhookFactory) -> None:
    hook = webhook_for("kinds:\n  cronjobs.batch: pin\n")
    cronjob = load_object("cronjob.yaml")
    response = await hook.send(review(cronjob))
    patched = apply_response(cronjob, response)
    spec = patched["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    images = [c["image"] for c in spec.get("containers", []) + spec.get("initContainers", [])]
    assert images and all("@sha256:" in image for image in images)


# --- the rewrite map ------------------------------------------------------------------------


def pod_with(*images: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default", "annotations": annotations or {}},
        "spec": {
            "containers": [{"name": f"c{i}", "image": image} for i, image in enumerate(images)]
        },
    }


async def test_default_map_moves_kube_rbac_proxy_and_pins_at_quay(webhook: Webhook) -> None:
    pod = pod_with("gcr.io/kubebuilder/kube-rbac-proxy:v0.13.1")
    response = await webhook.send(review(pod))
    patched = apply_response(pod, response)
    assert patched["spec"]["containers"][0]["image"] == pinned(
        "quay.io/brancz/kube-rbac-proxy:v0.13.1"
    )


async def test_user_spelling_kept_when_no_rule_applies(webhook: Webhook) -> None:
    pod = pod_with("docker.io/library/nginx:1.27", "nginx")
    patched = apply_response(pod, await webhook.send(review(pod)))
    images = [c["image"] for c in patched["spec"]["containers"]]
    assert images == [
        f"docker.io/library/nginx:1.27@{D('nginx:1.27')}",
        f"nginx@{D('nginx:latest')}",
    ]


async def test_digest_only_output(webhook_for: WebhookFactory) -> None:
    hook = webhook_for("output: digest-only\n")
    pod = pod_with("nginx:1.27")
    patched = apply_response(pod, await hook.send(review(pod)))
    assert patched["spec"]["containers"][0]["image"] == f"nginx@{D('nginx:1.27')}"


async def test_idempotent_second_pass_gives_no_patch(webhook: Webhook) -> None:
    pod = pod_with("gcr.io/kubebuilder/kube-rbac-proxy:v0.13.1", "nginx:1.27")
    first = apply_response(pod, await webhook.send(review(pod)))
    second = await webhook.send(review(first))
    assert "patch" not in second
    assert second["allowed"] is True
    assert "warnings" not in second


async def test_tagged_rule_sets_new_tag(webhook_for: WebhookFactory) -> None:
    hook = webhook_for("rewrites:\n  - from: nginx:1.25\n    to: nginx:1.27\n")
    pod = pod_with("nginx:1.25", "nginx:1.26")
    patched = apply_response(pod, await hook.send(review(pod)))
    images = [c["image"] for c in patched["spec"]["containers"]]
    assert images[0] == f"nginx:1.27@{D('nginx:1.27')}"
    assert images[1] == "nginx:1.26"  # no digest known and no rule: left as is, with a warning


async def test_moved_digest_kept_with_warning_in_rewrite_mode(webhook_for: WebhookFactory) -> None:
    hook = webhook_for("kinds:\n  pods: rewrite\n")
    digest = "sha256:" + "1" * 64
    pod = pod_with(f"gcr.io/kubebuilder/kube-rbac-proxy:v0.8.0@{digest}")
    response = await hook.send(review(pod))
    patched = apply_response(pod, response)
    assert patched["spec"]["containers"][0]["image"] == (
        f"quay.io/brancz/kube-rbac-proxy:v0.8.0@{digest}"
    )
    assert any("may not exist" in w for w in response["warnings"])


async def test_moved_digest_missing_at_target_pins_tag_there(webhook: Webhook) -> None:
    digest = "sha256:" + "1" * 64
    pod = pod_with(f"gcr.io/kubebuilder/kube-rbac-proxy:v0.13.1@{digest}")
    response = await webhook.send(review(pod))
    patched = apply_response(pod, response)
    assert patched["spec"]["containers"][0]["image"] == pinned(
        "quay.io/brancz/kube-rbac-proxy:v0.13.1"
    )
    assert any("does not exist" in w for w in response["warnings"])


# --- failure policy ---------------------------------------------------------------------------


async def test_unresolvable_admitted_with_warning_by_default(webhook: Webhook) -> None:
    pod = pod_with("example.com/unknown/app:1.0")
    response = await webhook.send(review(pod))
    assert response["allowed"] is True
    assert "patch" not in response
    assert any("example.com/unknown/app:1.0 not pinned" in w for w in response["warnings"])
    assert "not-found" in response["auditAnnotations"]["unpinned"]
    metrics = webhook.metrics.render().decode()
    assert 'pinhook_resolve_failures_total{reason="not-found"} 1.0' in metrics


async def test_on_failure_deny_names_image(webhook_for: WebhookFactory) -> None:
    hook = webhook_for("onFailure: deny\n")
    response = await hook.send(review(pod_with("nginx:1.27", "example.com/unknown/app:1.0")))
    assert response["allowed"] is False
    assert "example.com/unknown/app:1.0" in response["status"]["message"]
    assert response["status"]["code"] == 403
    assert "patch" not in response


async def test_require_digest_per_namespace(webhook_for: WebhookFactory) -> None:
    hook = webhook_for("namespaces:\n  prod:\n    requireDigest: true\n")
    pod = pod_with("example.com/unknown/app:1.0")
    assert (await hook.send(review(pod, namespace="dev")))["allowed"] is True
    denied = await hook.send(review(pod, namespace="prod"))
    assert denied["allowed"] is False
    assert "requireDigest" in denied["status"]["message"]


async def test_require_digest_denies_an_invalid_reference(webhook_for: WebhookFactory) -> None:
    # README: under requireDigest, an invalid reference in a pinned kind is denied, since it
    # cannot end up with a digest.
    hook = webhook_for("requireDigest: true\n")
    denied = await hook.send(review(pod_with("nginx:1.27", "Nginx:1.27")))
    assert denied["allowed"] is False
    assert denied["status"]["code"] == 403
    assert denied["status"]["message"] == (
        "pinhook: /spec/containers/1/image: invalid reference 'Nginx:1.27':"
        " repository name must be lowercase"
    )
    assert "patch" not in denied
    # In a kind that is only rewritten, it is left as it is, with a warning.
    hook = webhook_for("requireDigest: true\nkinds:\n  pods: rewrite\n")
    allowed = await hook.send(review(pod_with("Nginx:1.27")))
    assert allowed["allowed"] is True
    assert any("lowercase" in warning for warning in allowed["warnings"])


async def test_require_digest_denies_an_image_in_a_skipped_registry(
    webhook_for: WebhookFactory,
) -> None:
    hook = webhook_for("requireDigest: true\n")
    denied = await hook.send(review(pod_with("nginx:1.27", "kind.local/app:dev")))
    assert denied["allowed"] is False
    assert denied["status"]["message"] == (
        "pinhook: kind.local/app:dev (/spec/containers/1/image) would not be pinned to a"
        " digest and requireDigest is set"
    )
    # A digest written in a skipped registry is kept, and satisfies requireDigest.
    digest = "sha256:" + "7" * 64
    allowed = await hook.send(review(pod_with(f"kind.local/app:dev@{digest}")))
    assert allowed["allowed"] is True


@pytest.mark.parametrize(
    ("timeout", "budget"),
    [(None, 8.0), ("", 8.0), ("10s", 8.0), ("5s", 3.5), ("4000ms", 2.5), ("1s", 0.5), ("x", 8.0)],
)
def test_budget_leaves_room_in_the_api_servers_timeout(timeout: str | None, budget: float) -> None:
    settings = load_settings("")
    mutator = Mutator(settings, StaticDigestResolver(settings.digest_table))
    assert mutator.budget(timeout) == budget


async def test_skip_registries_are_rewritten_not_resolved(webhook_for: WebhookFactory) -> None:
    hook = webhook_for("rewrites:\n  - from: ko.local/old\n    to: kind.local/new\n")
    pod = pod_with("ko.local/old/app:dev")
    response = await hook.send(review(pod))
    patched = apply_response(pod, response)
    assert patched["spec"]["containers"][0]["image"] == "kind.local/new/app:dev"
    assert "warnings" not in response


# --- opt-outs, operations and bad input ----------------------------------------------------


async def test_skip_annotation_and_excluded_namespace(webhook_for: WebhookFactory) -> None:
    hook = webhook_for("excludedNamespaces: [ci]\n")
    skipped = pod_with("nginx:1.27", annotations={"pinhook.dev/skip": "true"})
    assert "patch" not in await hook.send(review(skipped))
    assert "patch" not in await hook.send(review(pod_with("nginx:1.27"), namespace="ci"))
    assert "patch" in await hook.send(review(pod_with("nginx:1.27"), namespace="web"))


@pytest.mark.parametrize(
    ("config", "namespace", "honoured"),
    [
        ("", "web", True),
        ("requireDigest: true\n", "web", False),
        ("requireDigest: true\nskipAnnotation: honoured\n", "web", True),
        ("skipAnnotation: ignored\n", "web", False),
        # requireDigest in one namespace: the annotation is ignored there only.
        ("namespaces: {payments: {requireDigest: true}}\n", "payments", False),
        ("namespaces: {payments: {requireDigest: true}}\n", "web", True),
        ("requireDigest: true\nnamespaces: {legacy: {requireDigest: false}}\n", "legacy", True),
    ],
)
async def test_skip_annotation_is_not_honoured_where_require_digest_applies(
    webhook_for: WebhookFactory, config: str, namespace: str, honoured: bool
) -> None:
    hook = webhook_for(config)
    skipped = pod_with("nginx:1.27", annotations={"pinhook.dev/skip": "true"})
    response = await hook.send(review(skipped, namespace=namespace))
    assert response["allowed"] is True
    if honoured:
        assert "patch" not in response
        assert "warnings" not in response
    else:
        [op] = decode_patch(response)
        assert op["value"] == pinned("nginx:1.27")
        assert response["warnings"][0] == (
            "pinhook: annotation pinhook.dev/skip ignored: opting out is not allowed in this"
            " namespace"
        )


async def test_dry_run_answered_like_a_real_request(webhook: Webhook) -> None:
    pod = pod_with("nginx:1.27")
    real = await webhook.send(review(pod))
    dry = await webhook.send(review(pod, dry_run=True))
    assert dry["patch"] == real["patch"]


async def test_update_leaves_unchanged_images_and_pins_new_ones(webhook: Webhook) -> None:
    old = pod_with("nginx:1.27")
    new = copy.deepcopy(old)
    new["spec"]["ephemeralContainers"] = [{"name": "debugger", "image": "nginx:latest"}]
    response = await webhook.send(
        review(new, operation="UPDATE", old=old, sub_resource="ephemeralcontainers")
    )
    patched = apply_response(new, response)
    assert patched["spec"]["containers"][0]["image"] == "nginx:1.27"
    assert patched["spec"]["ephemeralContainers"][0]["image"] == f"nginx:latest@{D('nginx:latest')}"


async def test_delete_and_unknown_kind_pass_untouched(webhook: Webhook) -> None:
    pod = pod_with("nginx:1.27")
    assert "patch" not in await webhook.send(review(pod, operation="DELETE"))
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "data": {}}
    response = await webhook.send(review(secret))
    assert response == {"uid": response["uid"], "allowed": True}


async def test_wrong_types_allowed_with_warning(webhook: Webhook) -> None:
    pod = pod_with("nginx:1.27")
    pod["spec"]["containers"].append({"name": "bad", "image": 42})
    pod["spec"]["initContainers"] = {"not": "a list"}
    response = await webhook.send(review(pod))
    assert response["allowed"] is True
    assert len(response["warnings"]) == 2
    patched = apply_response(pod, response)
    assert patched["spec"]["containers"][0]["image"] == pinned("nginx:1.27")
    assert patched["spec"]["containers"][1]["image"] == 42


async def test_invalid_reference_left_with_warning(webhook: Webhook) -> None:
    pod = pod_with("Nginx:1.27", "nginx:1.27")
    response = await webhook.send(review(pod))
    patched = apply_response(pod, response)
    assert patched["spec"]["containers"][0]["image"] == "Nginx:1.27"
    assert any("lowercase" in w for w in response["warnings"])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"apiVersion": "v1", "kind": "Pod"}', "apiVersion"),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}',
            "request.uid",
        ),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request"),
    ],
)
async def test_malformed_review_is_400_with_reason(
    webhook: Webhook, payload: bytes, reason: str
) -> None:
    answer = await webhook.client.post("/mutate", content=payload)
    assert answer.status_code == 400
    assert reason in answer.json()["error"]


async def test_oversized_body_is_413(webhook: Webhook) -> None:
    answer = await webhook.client.post("/mutate", content=b" " * (8 * 1024 * 1024 + 1))
    assert answer.status_code == 413


async def test_oversized_chunked_body_is_413_without_reading_it_all(webhook: Webhook) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(64):  # 16 MiB offered, no Content-Length
            sent += 1
            yield b" " * (256 * 1024)

    answer = await webhook.client.post("/mutate", content=chunks())
    assert answer.status_code == 413
    assert "body larger than" in answer.json()["error"]
    assert sent < 64


async def test_mutate_takes_post_only(webhook: Webhook) -> None:
    answer = await webhook.client.get("/mutate")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "POST"
    assert answer.json() == {"error": "only POST"}


async def test_a_client_that_leaves_mid_body_gets_nothing_and_breaks_nothing(
    webhook: Webhook,
) -> None:
    messages = iter(
        [
            {"type": "http.request", "body": b'{"apiVersion": ', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/mutate",
        "query_string": b"",
        "headers": [],
    }
    await create_app(webhook)(scope, receive, send)
    assert sent == []
    # And the next request is answered as ever.
    await webhook.send(review(pod_with("nginx:1.27")))


async def test_health_ready_and_metrics_elsewhere(webhook: Webhook) -> None:
    await webhook.send(review(pod_with("nginx:1.27")))
    assert (await webhook.client.get("/healthz")).status_code == 200
    assert (await webhook.client.get("/readyz")).json()["ready"] is True
    # Metrics have a port of their own (server.serve_metrics), never the webhook's.
    assert (await webhook.client.get("/metrics")).status_code == 404
    text = webhook.metrics.render().decode()
    assert (
        'pinhook_admission_requests_total{kind="Pod",operation="CREATE",result="patched"} 1.0'
        in text
    )
    assert 'pinhook_images_total{outcome="pinned"} 1.0' in text


async def test_tag_rule_on_a_pinned_image_pins_the_new_tag(webhook_for: WebhookFactory) -> None:
    hook = webhook_for("rewrites:\n  - from: nginx:1.25\n    to: nginx:1.27\n")
    old_digest = "sha256:" + "5" * 64
    pod = pod_with(f"nginx:1.25@{old_digest}")
    response = await hook.send(review(pod))
    patched = apply_response(pod, response)
    assert patched["spec"]["containers"][0]["image"] == f"nginx:1.27@{D('nginx:1.27')}"
    assert any("dropped" in warning for warning in response["warnings"])


async def test_digest_only_reference_missing_at_target_left_as_it_came(webhook: Webhook) -> None:
    image = "gcr.io/kubebuilder/kube-rbac-proxy@sha256:" + "1" * 64
    pod = pod_with(image)
    response = await webhook.send(review(pod))
    assert response["allowed"] is True
    assert "patch" not in response
    assert "digest-not-at-target" in response["auditAnnotations"]["unpinned"]
    assert "images" not in response["auditAnnotations"]


async def test_missing_moved_digest_warning_kept_when_tag_fallback_fails(
    webhook: Webhook,
) -> None:
    pod = pod_with("gcr.io/kubebuilder/kube-rbac-proxy:v0.1.0@sha256:" + "1" * 64)
    response = await webhook.send(review(pod))
    assert any("does not exist" in warning for warning in response["warnings"])
    assert any("not pinned" in warning for warning in response["warnings"])
    patched = apply_response(pod, response)
    assert patched["spec"]["containers"][0]["image"] == "quay.io/brancz/kube-rbac-proxy:v0.1.0"


class NeverAnswers(StaticDigestResolver):
    """A resolver that ignores its deadline: the app's last-resort timeout must still hold."""

    def peek(self, ref: Any) -> str | None:
        return None

    def hold(self, ref: Any) -> Held | None:
        return None

    async def resolve(self, ref: Any, scope: Any, deadline: float) -> Any:
        await asyncio.Event().wait()


@pytest.mark.parametrize(("policy", "allowed"), [("", True), ("requireDigest: true\n", False)])
async def test_last_resort_timeout_follows_the_policy(policy: str, allowed: bool) -> None:
    settings = load_settings(policy)
    hook = Webhook(settings)
    hook._mutator = Mutator(settings, NeverAnswers({}), hook.metrics)
    doc = review(pod_with("nginx:1.27"))
    answer = await hook.client.post("/mutate", content=body(doc), params={"timeout": "2s"})
    await hook.client.aclose()
    response = answer.json()["response"]
    assert response["allowed"] is allowed
    assert "patch" not in response


# --- unexpected errors are policy decisions, never a 500 --------------------------------------

HUGE_PORT = "host:99999999999999999999/x:1"


def inference_service_with_legacy(image: str) -> dict[str, Any]:
    isvc = load_object("isvc-sklearn-full.yaml")
    isvc["spec"]["predictor"]["custom"] = {"container": {"name": "legacy", "image": image}}
    return isvc


def admission_fields(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    (record,) = [r for r in caplog.records if r.getMessage().startswith("admission ")]
    fields: dict[str, Any] = getattr(record, FIELDS)
    return fields


async def test_the_admission_log_line_stays_small_for_huge_invalid_images(
    webhook_for: WebhookFactory, caplog: pytest.LogCaptureFixture
) -> None:
    hook = webhook_for("requireDigest: true\n")
    huge = [f"Nginx{i}:" + "x" * 1_000_000 for i in range(5)]
    with caplog.at_level(logging.INFO, logger="webhook.app"):
        denied = await hook.send(review(pod_with(*huge)))
    assert denied["allowed"] is False
    fields = admission_fields(caplog)
    assert len(fields["images"]) == 5
    for logged, image in zip(fields["images"], huge, strict=True):
        assert logged == f"{image[:256]}... invalid"
    assert len(orjson.dumps(fields)) < 4_000


async def test_the_admission_log_line_cuts_a_long_reason(
    webhook_for: WebhookFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Long valid names the static resolver does not know: the denial names five of them.
    hook = webhook_for("requireDigest: true\nlimits: {auditAnnotationBytes: 65536}\n")
    images = [f"example.com/{'a' * 120}/{'b' * 120}/app{i}:1" for i in range(6)]
    with caplog.at_level(logging.INFO, logger="webhook.app"):
        denied = await hook.send(review(pod_with(*images)))
    message = denied["status"]["message"]
    assert len(message) > 1024
    reason = admission_fields(caplog)["reason"]
    assert reason == f"{message[:1024]}..."


async def test_out_of_range_port_is_invalid_and_denied_under_require_digest() -> None:
    # Before: the port reached name resolution, OverflowError escaped as HTTP 500, and under
    # failurePolicy Ignore the API server admitted what requireDigest should have denied.
    settings = load_settings("resolver: registry\nrequireDigest: true\nonFailure: deny\n")
    async with RegistryClient(RegistryOptions()) as client:
        hook = Webhook(settings, RegistryDigestResolver(client, NoPullSecrets()))
        denied = await hook.send(review(inference_service_with_legacy(HUGE_PORT)))
        await hook.client.aclose()
    assert denied["allowed"] is False
    assert (
        "/spec/predictor/custom/container/image: invalid reference" in (denied["status"]["message"])
    )


class ExplodingResolver:
    """A resolver with a bug: every registry lookup raises something unforeseen."""

    def peek(self, ref: ImageRef) -> str | None:
        return None

    def hold(self, ref: ImageRef) -> Held | None:
        return None

    def holding(self, held: tuple[Held, ...]) -> Holding:
        return Holding(held, 0)

    def holds(self, holding: Holding) -> bool:
        return False

    async def resolve(self, ref: ImageRef, scope: PullScope, deadline: float) -> Resolution:
        raise OverflowError("int too large to convert to C int")

    async def exists(self, ref: ImageRef, scope: PullScope, deadline: float) -> bool:
        raise OverflowError("int too large to convert to C int")


async def test_an_unexpected_resolver_error_is_a_failure_like_any_other() -> None:
    settings = load_settings(settings_yaml("namespaces:\n  prod:\n    requireDigest: true\n"))
    hook = Webhook(settings, ExplodingResolver())
    allowed = await hook.send(review(pod_with("nginx:1.27"), namespace="dev"))
    assert allowed["allowed"] is True and "patch" not in allowed
    assert any("not pinned: internal error (OverflowError)" in w for w in allowed["warnings"])
    denied = await hook.send(review(pod_with("nginx:1.27"), namespace="prod"))
    assert denied["allowed"] is False
    assert 'pinhook_resolve_failures_total{reason="internal"} 2.0' in hook.metrics.render().decode()
    await hook.client.aclose()


class BrokenMutator(Mutator):
    """A bug in the pipeline itself, before any registry is asked."""

    def plan(self, request: AdmissionRequest) -> RequestPlan:
        raise KeyError("a bug")


async def test_a_bug_in_the_pipeline_is_answered_by_policy_not_500() -> None:
    settings = load_settings(settings_yaml("namespaces:\n  prod:\n    requireDigest: true\n"))
    hook = Webhook(settings, mutator=BrokenMutator)
    allowed = await hook.send(review(pod_with("nginx:1.27"), namespace="dev"))
    assert allowed["allowed"] is True
    assert allowed["warnings"] == ["pinhook: internal error; see pinhook's log; object left as is"]
    denied = await hook.send(review(pod_with("nginx:1.27"), namespace="prod"))
    assert denied["allowed"] is False
    assert denied["status"]["message"] == "pinhook: internal error; see pinhook's log"
    await hook.client.aclose()


async def test_metric_labels_from_requests_are_bounded(webhook: Webhook) -> None:
    # Before: each random kind and operation became a series of its own; 20,000 of them grew
    # /metrics to 14 MB and every scrape blocked the loop.
    for index in range(50):
        document = review({"apiVersion": "x.example/v1", "kind": f"Kind{index}"})
        document["request"]["operation"] = f"OP{index}"
        response = await webhook.send(document)
        assert response["allowed"] is True
    await webhook.send(review(pod_with("nginx:1.27")))
    series = [
        line
        for line in webhook.metrics.render().decode().splitlines()
        if line.startswith("pinhook_admission_requests_total{")
    ]
    assert sorted(series) == [
        'pinhook_admission_requests_total{kind="Pod",operation="CREATE",result="patched"} 1.0',
        'pinhook_admission_requests_total{kind="other",operation="other",result="skipped"} 50.0',
    ]


async def test_a_request_whose_digests_are_all_cached_needs_no_registry(
    webhook: Webhook,
) -> None:
    mutator = webhook.mutator
    plan = mutator.plan(parse_review(body(review(pod_with("nginx:1.27", "nginx:latest")))))
    results = mutator.settled(plan)
    assert results is not None and [r.digest for r in results] == [
        D("nginx:1.27"),
        D("nginx:latest"),
    ]
    # One image the static table does not know: the request has to go to a registry.
    plan = mutator.plan(parse_review(body(review(pod_with("nginx:1.27", "example.com/x:1")))))
    assert mutator.settled(plan) is None


async def test_a_namespace_in_audit_mode_gets_no_patch_but_is_told(
    webhook_for: WebhookFactory,
) -> None:
    hook = webhook_for("namespaces:\n  legacy: {mode: audit, requireDigest: true}\n")
    pinned = await hook.send(review(pod_with("nginx:1.27"), namespace="shop"))
    assert "patch" in pinned
    audited = await hook.send(
        review(pod_with("nginx:1.27", "example.com/gone:1"), namespace="legacy")
    )
    assert audited["allowed"] is True and "patch" not in audited
    annotations = audited["auditAnnotations"]
    assert "nginx:1.27 -> nginx:1.27@" in annotations["would-patch"]
    assert "requireDigest" in annotations["would-deny"]
    assert audited["warnings"][0].startswith("pinhook (audit mode): would change nginx:1.27")
    assert any(w.startswith("pinhook (audit mode): would deny") for w in audited["warnings"])
    text = hook.metrics.render().decode()
    assert (
        'pinhook_admission_requests_total{kind="Pod",operation="CREATE",result="audited"} 1.0'
        in text
    )

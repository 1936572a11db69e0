"""Tests for webhook.locate: image fields and pull contexts in realistic admission objects."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonpointer
import orjson
import pytest
import yaml

from webhook.kinds import KINDS, PREDICTOR_FRAMEWORKS, kind_info
from webhook.locate import NO_PULL, ImageField, Located, escape_pointer_token, locate_images
from webhook.oci.credential import PullContext

OBJECTS = Path(__file__).parent / "data" / "objects"
KSERVE = "serving.kserve.io"
KNATIVE = "serving.knative.dev"


def load(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((OBJECTS / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def group_of(obj: dict[str, Any]) -> str:
    api_version: str = obj["apiVersion"]
    return api_version.rpartition("/")[0]


def locate(obj: dict[str, Any]) -> Located:
    located = locate_images(group_of(obj), obj["kind"], obj)
    assert located is not None
    return located


def found(obj: dict[str, Any]) -> set[tuple[str, str, PullContext]]:
    located = locate(obj)
    assert located.problems == ()
    triples = {(f.pointer, f.image, f.pull) for f in located.fields}
    assert len(triples) == len(located.fields), "a field was reported twice"
    return triples


def pull(*secrets: str, sa: str | None = None) -> PullContext:
    return PullContext(tuple(secrets), sa)


# --- realistic objects, one per kind ---------------------------------------------------


def test_pod_with_init_ephemeral_and_image_volume_but_not_rbd() -> None:
    ctx = pull("ghcr-pull", "quay-pull", sa="models-puller")
    assert found(load("pod-kserve-predictor.yaml")) == {
        ("/spec/initContainers/0/image", "kserve/storage-initializer:v0.15.2", ctx),
        ("/spec/containers/0/image", "kserve/sklearnserver:v0.15.2", ctx),
        ("/spec/containers/1/image", "kserve/agent:v0.15.2", ctx),
        (
            "/spec/ephemeralContainers/0/image",
            "registry.k8s.io/e2e-test-images/agnhost:2.53",
            ctx,
        ),
        ("/spec/volumes/1/image/reference", "ghcr.io/acme/models/iris:1.0", ctx),
    }


def test_pod_falls_back_to_deprecated_service_account() -> None:
    pod = load("pod-kserve-predictor.yaml")
    del pod["spec"]["serviceAccountName"]
    pod["spec"]["serviceAccount"] = "old-style"
    located = locate(pod)
    assert {f.pull.service_account for f in located.fields} == {"old-style"}


def test_inference_service_before_defaulting_with_transformer_and_explainer() -> None:
    predictor = pull(sa="models-sa")
    transformer = pull("acme-registry")
    explainer = pull(sa="legacy-explainer-sa")
    assert found(load("isvc-sklearn-full.yaml")) == {
        ("/spec/predictor/sklearn/image", "kserve/sklearnserver:v0.15.2", predictor),
        (
            "/spec/predictor/containers/0/image",
            "ghcr.io/acme/feature-enricher:2.3.1",
            predictor,
        ),
        (
            "/spec/predictor/volumes/0/image/reference",
            "ghcr.io/acme/models/iris@sha256:"
            "4c1e8a2b7d9f0e3a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a",
            predictor,
        ),
        ("/spec/transformer/containers/0/image", "kserve/image-transformer:v0.15.2", transformer),
        ("/spec/transformer/initContainers/0/image", "curlimages/curl:8.10.1", transformer),
        ("/spec/explainer/art/image", "kserve/art-explainer:v0.15.2", explainer),
    }


def test_inference_service_after_defaulting_uses_model_key() -> None:
    assert found(load("isvc-defaulted.yaml")) == {
        (
            "/spec/predictor/model/image",
            "ghcr.io/acme/sklearnserver:v0.15.2-patched",
            pull("acme-registry"),
        ),
    }


@pytest.mark.parametrize("framework", PREDICTOR_FRAMEWORKS)
def test_every_predictor_framework_key(framework: str) -> None:
    isvc = {"spec": {"predictor": {framework: {"storageUri": "s3://m", "image": "repo/x:1"}}}}
    assert found(isvc | {"apiVersion": f"{KSERVE}/v1beta1", "kind": "InferenceService"}) == {
        (f"/spec/predictor/{framework}/image", "repo/x:1", NO_PULL)
    }


def test_inference_service_without_images_finds_nothing() -> None:
    isvc = load("isvc-defaulted.yaml")
    del isvc["spec"]["predictor"]["model"]["image"]
    assert locate(isvc) == Located((), ())


def test_multinode_worker_has_its_own_pull_context_not_the_predictors() -> None:
    # KServe's multiNodeProcess merges the runtime workerSpec with the ISVC workerSpec only.
    assert found(load("isvc-multinode.yaml")) == {
        (
            "/spec/predictor/model/image",
            "kserve/huggingfaceserver:v0.15.2-gpu",
            pull("nvcr-pull", sa="hf-reader"),
        ),
        (
            "/spec/predictor/workerSpec/containers/0/image",
            "kserve/huggingfaceserver:v0.15.2-gpu",
            NO_PULL,
        ),
        ("/spec/predictor/workerSpec/initContainers/0/image", "busybox:1.36", NO_PULL),
        ("/spec/predictor/workerSpec/ephemeralContainers/0/image", "busybox:1.36", NO_PULL),
    }


def test_multinode_worker_with_own_credentials() -> None:
    isvc = load("isvc-multinode.yaml")
    worker = isvc["spec"]["predictor"]["workerSpec"]
    worker["imagePullSecrets"] = [{"name": "worker-pull"}]
    worker["serviceAccountName"] = "worker-sa"
    pulls = {f.pull for f in locate(isvc).fields if "/workerSpec/" in f.pointer}
    assert pulls == {pull("worker-pull", sa="worker-sa")}


def test_canary_predictors_inherit_missing_credentials_from_stable() -> None:
    assert found(load("isvc-canary.yaml")) == {
        (
            "/spec/canary/0/predictor/model/image",
            "ghcr.io/acme/sklearnserver:v0.16.0-rc1",
            pull("stable-pull", sa="fraud-sa"),
        ),
        (
            "/spec/canary/1/predictor/containers/0/image",
            "ghcr.io/acme/fraud-custom:3.0.0",
            pull("canary-pull", sa="canary-sa"),
        ),
    }


def test_canary_inherits_field_by_field() -> None:
    isvc = load("isvc-canary.yaml")
    del isvc["spec"]["canary"][1]["predictor"]["serviceAccountName"]
    fields = {f.pointer: f.pull for f in locate(isvc).fields}
    assert fields["/spec/canary/1/predictor/containers/0/image"] == pull(
        "canary-pull", sa="fraud-sa"
    )


def test_legacy_unpruned_shapes_are_images_too() -> None:
    assert found(load("isvc-legacy.yaml")) == {
        ("/spec/explainer/alibi/image", "kserve/alibi-explainer:v0.11.2", NO_PULL),
        (
            "/spec/transformer/custom/container/image",
            "ghcr.io/acme/income-transformer:1.4",
            NO_PULL,
        ),
    }


def test_cluster_serving_runtime() -> None:
    assert found(load("clusterservingruntime-sklearn.yaml")) == {
        ("/spec/containers/0/image", "kserve/sklearnserver:v0.15.2", NO_PULL),
    }


def test_serving_runtime_worker_uses_its_own_pull_secrets() -> None:
    image = "kserve/huggingfaceserver:v0.15.2-gpu"
    assert found(load("servingruntime-multinode.yaml")) == {
        ("/spec/containers/0/image", image, pull("head-pull")),
        ("/spec/workerSpec/containers/0/image", image, pull("worker-pull")),
    }


def test_cluster_storage_container() -> None:
    assert found(load("clusterstoragecontainer.yaml")) == {
        ("/spec/container/image", "kserve/storage-initializer:v0.15.2", NO_PULL),
    }


def test_knative_service_as_kserve_generates_it() -> None:
    assert found(load("ksvc-predictor.yaml")) == {
        (
            "/spec/template/spec/containers/0/image",
            "kserve/sklearnserver:v0.15.2",
            pull("acme-registry", sa="models-sa"),
        ),
    }


def test_knative_configuration_with_init_container() -> None:
    assert found(load("knative-configuration.yaml")) == {
        (
            "/spec/template/spec/initContainers/0/image",
            "ghcr.io/knative/helloworld-go-migrate:1.2",
            NO_PULL,
        ),
        ("/spec/template/spec/containers/0/image", "ghcr.io/knative/helloworld-go:latest", NO_PULL),
    }


def test_llm_inference_service_every_pod_spec() -> None:
    decode = pull("ghcr-pull", sa="llm-decode")
    assert found(load("llmisvc-vllm.yaml")) == {
        ("/spec/template/containers/0/image", "ghcr.io/llm-d/llm-d:v0.2.0", decode),
        ("/spec/worker/containers/0/image", "ghcr.io/llm-d/llm-d:v0.2.0", NO_PULL),
        (
            "/spec/prefill/template/initContainers/0/image",
            "ghcr.io/llm-d/llm-d-routing-sidecar:v0.2.0",
            pull("ghcr-pull"),
        ),
        (
            "/spec/prefill/template/containers/0/image",
            "vllm/vllm-openai:v0.10.1",
            pull("ghcr-pull"),
        ),
        (
            "/spec/prefill/worker/containers/0/image",
            "vllm/vllm-openai:v0.10.1",
            pull(sa="llm-prefill-worker"),
        ),
        (
            "/spec/router/scheduler/template/containers/0/image",
            "ghcr.io/llm-d/llm-d-inference-scheduler:v0.2.1",
            NO_PULL,
        ),
        (
            "/spec/router/scheduler/tokenizer/template/containers/0/image",
            "vllm/vllm-openai:v0.10.1-render",
            NO_PULL,
        ),
    }


def test_llm_inference_service_config() -> None:
    assert found(load("llmisvcconfig.yaml")) == {
        ("/spec/template/containers/0/image", "ghcr.io/llm-d/llm-d:v0.2.0", NO_PULL),
    }


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"])
def test_workload_templates(kind: str) -> None:
    obj = load("deployment.yaml")
    obj["kind"] = kind
    obj["apiVersion"] = "batch/v1" if kind == "Job" else "apps/v1"
    ctx = pull("private-registry", sa="web")
    assert found(obj) == {
        ("/spec/template/spec/initContainers/0/image", "busybox:1.36", ctx),
        ("/spec/template/spec/containers/0/image", "registry.example.com/shop/web:4.2.0", ctx),
        ("/spec/template/spec/containers/1/image", "envoyproxy/envoy:v1.31.2", ctx),
    }


def test_cronjob_job_template() -> None:
    assert found(load("cronjob.yaml")) == {
        (
            "/spec/jobTemplate/spec/template/spec/containers/0/image",
            "registry.example.com/shop/report:1.0.3",
            pull(sa="reporter"),
        ),
    }


@pytest.mark.parametrize("name", sorted(p.name for p in OBJECTS.glob("*.yaml")))
def test_every_pointer_resolves_to_its_image(name: str) -> None:
    obj = load(name)
    located = locate(obj)
    assert located.fields
    for field in located.fields:
        assert jsonpointer.resolve_pointer(obj, field.pointer) == field.image


def test_locate_does_not_modify_the_object() -> None:
    obj = load("isvc-sklearn-full.yaml")
    before = copy.deepcopy(obj)
    locate(obj)
    assert obj == before


def test_works_on_orjson_decoded_body() -> None:
    body = orjson.loads(orjson.dumps(load("llmisvc-vllm.yaml")))
    assert len(locate(body).fields) == 7


# --- unknown kinds and the kind table ----------------------------------------------------


@pytest.mark.parametrize(
    ("group", "kind"),
    [
        ("", "ConfigMap"),
        (KSERVE, "InferenceGraph"),
        (KSERVE, "TrainedModel"),
        (KNATIVE, "Revision"),
        ("apps", "Pod"),  # right kind, wrong group
        ("", "pod"),  # kinds are case-sensitive
    ],
)
def test_unknown_kind_returns_none(group: str, kind: str) -> None:
    assert kind_info(group, kind) is None
    assert locate_images(group, kind, {"spec": {"containers": [{"image": "x"}]}}) is None


def test_kind_table_is_consistent() -> None:
    keys = [info.key for info in KINDS]
    assert len(keys) == len(set(keys))
    assert len({(info.group, info.kind) for info in KINDS}) == len(KINDS)
    for info in KINDS:
        assert kind_info(info.group, info.kind) is info
        assert info.default_mode in {"pin", "rewrite", "off"}
        expected_key = f"{info.resource}.{info.group}" if info.group else info.resource
        assert info.key == expected_key
        assert info.resource == info.resource.lower()


@pytest.mark.parametrize(
    ("group", "kind", "key", "mode"),
    [
        ("", "Pod", "pods", "pin"),
        (KSERVE, "InferenceService", "inferenceservices.serving.kserve.io", "pin"),
        (KSERVE, "ServingRuntime", "servingruntimes.serving.kserve.io", "rewrite"),
        (KSERVE, "ClusterServingRuntime", "clusterservingruntimes.serving.kserve.io", "rewrite"),
        (KSERVE, "ClusterStorageContainer", "clusterstoragecontainers.serving.kserve.io", "pin"),
        (KSERVE, "LLMInferenceService", "llminferenceservices.serving.kserve.io", "pin"),
        (
            KSERVE,
            "LLMInferenceServiceConfig",
            "llminferenceserviceconfigs.serving.kserve.io",
            "pin",
        ),
        (KNATIVE, "Service", "services.serving.knative.dev", "pin"),
        (KNATIVE, "Configuration", "configurations.serving.knative.dev", "pin"),
        ("apps", "Deployment", "deployments.apps", "off"),
        ("apps", "StatefulSet", "statefulsets.apps", "off"),
        ("apps", "DaemonSet", "daemonsets.apps", "off"),
        ("apps", "ReplicaSet", "replicasets.apps", "off"),
        ("batch", "Job", "jobs.batch", "off"),
        ("batch", "CronJob", "cronjobs.batch", "off"),
    ],
)
def test_kind_info_values(group: str, kind: str, key: str, mode: str) -> None:
    info = kind_info(group, kind)
    assert info is not None
    assert (info.key, info.default_mode) == (key, mode)


def test_kinds_is_immutable() -> None:
    assert isinstance(KINDS, tuple)
    with pytest.raises(AttributeError):
        KINDS[0].key = "x"  # type: ignore[misc]


# --- pointer escaping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "escaped"),
    [
        ("containers", "containers"),
        ("a/b", "a~1b"),
        ("a~b", "a~0b"),
        ("~/", "~0~1"),
        ("~1", "~01"),  # "~" is escaped first, so an existing "~1" does not become "/"
        ("", ""),
    ],
)
def test_escape_pointer_token(token: str, escaped: str) -> None:
    assert escape_pointer_token(token) == escaped
    assert jsonpointer.resolve_pointer({token: 1}, "/" + escaped) == 1


# --- malformed bodies ----------------------------------------------------------------------


def pod(spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "spec": spec}


def located_pod(spec: Any) -> Located:
    located = locate_images("", "Pod", pod(spec))
    assert located is not None
    return located


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"containers": [{"image": 5}]}, "/spec/containers/0/image: expected a string, got int"),
        ({"containers": [{"image": ""}]}, "/spec/containers/0/image: empty image"),
        (
            {"containers": [{"image": ["a"]}]},
            "/spec/containers/0/image: expected a string, got list",
        ),
        (
            {"containers": {"name": "x", "image": "a"}},
            "/spec/containers: expected a list, got dict",
        ),
        ({"containers": "nginx"}, "/spec/containers: expected a list, got str"),
        ({"initContainers": ["nginx"]}, "/spec/initContainers/0: expected an object, got str"),
        (
            {"volumes": [{"name": "v", "image": "repo/x:1"}]},
            "/spec/volumes/0/image: expected an object, got str",
        ),
        (
            {"volumes": [{"image": {"reference": 1}}]},
            "/spec/volumes/0/image/reference: expected a string, got int",
        ),
        ({"volumes": {"a": 1}}, "/spec/volumes: expected a list, got dict"),
        ({"volumes": [7]}, "/spec/volumes/0: expected an object, got int"),
        ({"imagePullSecrets": "secret"}, "/spec/imagePullSecrets: expected a list, got str"),
        ({"imagePullSecrets": ["secret"]}, "/spec/imagePullSecrets/0: expected an object, got str"),
        (
            {"imagePullSecrets": [{"name": 3}]},
            "/spec/imagePullSecrets/0/name: expected a string, got int",
        ),
        ({"serviceAccountName": True}, "/spec/serviceAccountName: expected a string, got bool"),
        ([], "/spec: expected an object, got list"),
        ("spec", "/spec: expected an object, got str"),
    ],
)
def test_malformed_pod_produces_problem_not_exception(spec: Any, problem: str) -> None:
    assert located_pod(spec).problems == (problem,)


def test_malformed_parts_do_not_hide_good_ones() -> None:
    located = located_pod(
        {
            "imagePullSecrets": [{"name": "good"}, "bad", {"name": ""}, {}],
            "containers": [{"image": 1}, None, {"name": "no-image"}, {"image": "ok:1"}],
            "initContainers": None,
            "volumes": [None, {"image": None}, {"image": {"reference": "vol:2"}}],
        }
    )
    assert [(f.pointer, f.image, f.pull) for f in located.fields] == [
        ("/spec/containers/3/image", "ok:1", pull("good")),
        ("/spec/volumes/2/image/reference", "vol:2", pull("good")),
    ]
    assert located.problems == (
        "/spec/imagePullSecrets/1: expected an object, got str",
        "/spec/containers/0/image: expected a string, got int",
        "/spec/containers/1: expected an object, got NoneType",
        "/spec/volumes/0: expected an object, got NoneType",
    )


def test_service_account_name_of_wrong_type_falls_back_to_service_account() -> None:
    located = located_pod(
        {"serviceAccountName": 1, "serviceAccount": "sa", "containers": [{"image": "a"}]}
    )
    assert located.fields[0].pull == pull(sa="sa")
    assert located.problems == ("/spec/serviceAccountName: expected a string, got int",)


def test_duplicate_pull_secrets_are_reported_once() -> None:
    located = located_pod(
        {"imagePullSecrets": [{"name": "a"}, {"name": "a"}], "containers": [{"image": "x"}]}
    )
    assert located.fields[0].pull == pull("a")


@pytest.mark.parametrize("body", [None, [], "Pod", 3])
def test_non_object_body(body: Any) -> None:
    located = locate_images("", "Pod", body)
    assert located is not None
    assert located.fields == ()
    assert located.problems == (f"(root): expected an object, got {type(body).__name__}",)


def test_missing_spec_is_not_a_problem() -> None:
    assert locate_images("", "Pod", {"metadata": {"name": "x"}}) == Located((), ())
    assert locate_images(KSERVE, "InferenceService", {"spec": None}) == Located((), ())


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"predictor": []}, "/spec/predictor: expected an object, got list"),
        (
            {"predictor": {"sklearn": "kserve/sklearnserver"}},
            "/spec/predictor/sklearn: expected an object, got str",
        ),
        (
            {"predictor": {"model": {"image": 1.5}}},
            "/spec/predictor/model/image: expected a string, got float",
        ),
        (
            {"predictor": {"workerSpec": [1]}},
            "/spec/predictor/workerSpec: expected an object, got list",
        ),
        ({"transformer": "custom"}, "/spec/transformer: expected an object, got str"),
        (
            {"transformer": {"custom": {"container": "img"}}},
            "/spec/transformer/custom/container: expected an object, got str",
        ),
        ({"explainer": {"alibi": {"image": ""}}}, "/spec/explainer/alibi/image: empty image"),
        ({"canary": {"predictor": {}}}, "/spec/canary: expected a list, got dict"),
        ({"canary": ["v2"]}, "/spec/canary/0: expected an object, got str"),
        ({"canary": [{"predictor": "x"}]}, "/spec/canary/0/predictor: expected an object, got str"),
    ],
)
def test_malformed_inference_service(spec: Any, problem: str) -> None:
    located = locate_images(KSERVE, "InferenceService", {"spec": spec})
    assert located == Located((), (problem,))


@pytest.mark.parametrize(
    ("group", "kind", "body", "problem"),
    [
        (
            KSERVE,
            "ClusterStorageContainer",
            {"spec": {"container": []}},
            "/spec/container: expected an object, got list",
        ),
        (
            KSERVE,
            "ServingRuntime",
            {"spec": {"workerSpec": "x"}},
            "/spec/workerSpec: expected an object, got str",
        ),
        (
            KSERVE,
            "LLMInferenceService",
            {"spec": {"prefill": {"template": [1]}}},
            "/spec/prefill/template: expected an object, got list",
        ),
        (
            KSERVE,
            "LLMInferenceService",
            {"spec": {"router": {"scheduler": 1}}},
            "/spec/router/scheduler: expected an object, got int",
        ),
        (
            KNATIVE,
            "Service",
            {"spec": {"template": {"spec": {"containers": [{"image": 0}]}}}},
            "/spec/template/spec/containers/0/image: expected a string, got int",
        ),
        (
            "batch",
            "CronJob",
            {"spec": {"jobTemplate": []}},
            "/spec/jobTemplate: expected an object, got list",
        ),
    ],
)
def test_malformed_other_kinds(group: str, kind: str, body: Any, problem: str) -> None:
    assert problem in (locate_images(group, kind, body) or Located((), ())).problems


def test_problem_under_a_shared_parent_is_reported_once() -> None:
    # spec.router.scheduler is the parent of two pod-spec paths (template, tokenizer).
    located = locate_images(KSERVE, "LLMInferenceService", {"spec": {"router": {"scheduler": 1}}})
    assert located == Located((), ("/spec/router/scheduler: expected an object, got int",))
    located = locate_images(KSERVE, "ServingRuntime", {"spec": "x"})
    assert located == Located((), ("/spec: expected an object, got str",))


@pytest.mark.parametrize(
    "value",
    [None, 0, "", "x", [], {}, [None], [[]], {"containers": None}, {"image": {"image": {}}}],
)
def test_garbage_anywhere_never_raises(value: Any) -> None:
    # Drop the same garbage into every place each kind reads and check only that it returns.
    for info in KINDS:
        for template in _every_shape(value):
            result = locate_images(info.group, info.kind, template)
            assert isinstance(result, Located)
            assert all(isinstance(f, ImageField) for f in result.fields)


def _every_shape(value: Any) -> list[dict[str, Any]]:
    pod_spec = {
        "containers": value,
        "initContainers": [value],
        "ephemeralContainers": [{"image": value}],
        "volumes": [{"image": value}, {"image": {"reference": value}}],
        "imagePullSecrets": value,
        "serviceAccountName": value,
        "workerSpec": value,
    }
    component = pod_spec | {key: value for key in ("sklearn", "model", "art", "alibi", "custom")}
    return [
        {"spec": value},
        {"spec": pod_spec},
        {"spec": {"template": value, "worker": pod_spec, "container": value}},
        {"spec": {"template": {"spec": pod_spec}, "jobTemplate": {"spec": value}}},
        {
            "spec": {
                "predictor": component | {"workerSpec": pod_spec},
                "transformer": component,
                "explainer": component,
                "canary": [value, {"predictor": value}, {"predictor": component}],
                "prefill": {"template": value, "worker": pod_spec},
                "router": {"scheduler": {"template": pod_spec, "tokenizer": value}},
            }
        },
    ]

"""Find every container-image field in an admission object, with its pull credentials context.

The module is pure: it reads a decoded JSON body (possibly malformed) and never raises for
anything the body contains. Each kind is composed from one generic pod-spec walker. Field
names were checked against kserve/kserve (``pkg/apis/serving/v1beta1``, ``v1alpha1``) and
knative/serving (``pkg/apis/serving/v1``).

It runs on the admission hot path for every Pod, so it does not copy the body and builds a
pointer string only for a field it reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from .oci.credential import PullContext


@dataclass(frozen=True, slots=True)
class ImageField:
    pointer: str  # RFC 6901 JSON Pointer to the string, e.g. "/spec/containers/0/image"
    image: str  # the current value
    pull: PullContext


@dataclass(frozen=True, slots=True)
class Located:
    fields: tuple[ImageField, ...]
    problems: tuple[str, ...]  # e.g. "/spec/containers/0/image: expected a string, got int"


@dataclass(frozen=True, slots=True)
class KindInfo:
    group: str  # "" for core, "serving.kserve.io", ...
    kind: str  # "Pod", "InferenceService", ...
    resource: str  # plural resource, e.g. "pods", "inferenceservices"
    key: str  # config key in kubectl style: "pods", "deployments.apps", ...
    default_mode: str  # "pin", "rewrite" or "off"


def escape_pointer_token(token: str) -> str:
    """Escape one reference token for an RFC 6901 JSON Pointer ("~" first, then "/")."""
    if "~" in token or "/" in token:
        return token.replace("~", "~0").replace("/", "~1")
    return token


NO_PULL: Final = PullContext()

_CONTAINER_LISTS: Final = ("containers", "initContainers", "ephemeralContainers")

# PredictorSpec one-of implementations; each embeds a core Container, so "image" sits directly
# under the key. "catboost" exists in recent v1beta1 sources (predictor_catboost.go).
PREDICTOR_IMPLEMENTATIONS: Final = (
    "sklearn",
    "xgboost",
    "tensorflow",
    "pytorch",
    "triton",
    "onnx",
    "huggingface",
    "pmml",
    "lightgbm",
    "paddle",
    "catboost",
    "model",
)
# "art" is the only explainer left in v1beta1; "alibi" and "aix" were removed but the minimal
# CRD has no schema for spec, so old objects still carry them unpruned.
EXPLAINER_IMPLEMENTATIONS: Final = ("art", "alibi", "aix")


class _Found:
    """Accumulates fields and problems for one object."""

    __slots__ = ("fields", "problems")

    def __init__(self) -> None:
        self.fields: list[ImageField] = []
        self.problems: list[str] = []

    def problem(self, pointer: str, message: str) -> None:
        self.problems.append(f"{pointer or '(root)'}: {message}")

    def wrong_type(self, pointer: str, expected: str, value: object) -> None:
        self.problem(pointer, f"expected {expected}, got {type(value).__name__}")


def _child(parent: str, token: str) -> str:
    return f"{parent}/{escape_pointer_token(token)}"


def _mapping_at(obj: Mapping[str, Any], key: str, pointer: str, found: _Found) -> Any:
    """``obj[key]`` when it is an object; None (and a problem if it is something else)."""
    value = obj.get(key)
    if value is None or isinstance(value, dict):
        return value
    found.wrong_type(_child(pointer, key), "an object", value)
    return None


def _list_at(obj: Mapping[str, Any], key: str, pointer: str, found: _Found) -> Any:
    value = obj.get(key)
    if value is None or isinstance(value, list | tuple):
        return value
    found.wrong_type(_child(pointer, key), "a list", value)
    return None


def _image_at(
    obj: Mapping[str, Any], key: str, pointer: str, pull: PullContext, found: _Found
) -> None:
    """Report ``obj[key]`` as an image; an absent image is normal (it comes from elsewhere)."""
    value = obj.get(key)
    if value is None:
        return
    if not isinstance(value, str):
        found.wrong_type(_child(pointer, key), "a string", value)
    elif not value:
        found.problem(_child(pointer, key), "empty image")
    else:
        found.fields.append(ImageField(_child(pointer, key), value, pull))


def _container_at(
    obj: Mapping[str, Any], key: str, pointer: str, pull: PullContext, found: _Found
) -> None:
    """A single embedded Container under ``obj[key]`` (framework specs, storage container)."""
    container = _mapping_at(obj, key, pointer, found)
    if container is not None:
        _image_at(container, "image", _child(pointer, key), pull, found)


def _name_list(obj: Mapping[str, Any], pointer: str, found: _Found) -> tuple[str, ...]:
    items = _list_at(obj, "imagePullSecrets", pointer, found)
    if not items:
        return ()
    base = _child(pointer, "imagePullSecrets")
    names: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            found.wrong_type(f"{base}/{index}", "an object", item)
            continue
        name = item.get("name")
        if name is None or name == "":
            continue
        if not isinstance(name, str):
            found.wrong_type(f"{base}/{index}/name", "a string", name)
        elif name not in names:
            names.append(name)
    return tuple(names)


def _service_account(obj: Mapping[str, Any], pointer: str, found: _Found) -> str | None:
    for key in ("serviceAccountName", "serviceAccount"):
        value = obj.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, str):
            return value
        found.wrong_type(_child(pointer, key), "a string", value)
    return None


def _pull_context(
    spec: Mapping[str, Any], pointer: str, found: _Found, inherit: PullContext = NO_PULL
) -> PullContext:
    """The pod spec's own credentials; each field absent here falls back to ``inherit``."""
    secrets = _name_list(spec, pointer, found) or inherit.image_pull_secrets
    account = _service_account(spec, pointer, found) or inherit.service_account
    if not secrets and account is None:
        return NO_PULL
    return PullContext(secrets, account)


def _walk_pod_spec(spec: Mapping[str, Any], pointer: str, pull: PullContext, found: _Found) -> None:
    """Images of a pod-spec-like object: container lists and image volumes."""
    for list_key in _CONTAINER_LISTS:
        containers = _list_at(spec, list_key, pointer, found)
        if not containers:
            continue
        base = _child(pointer, list_key)
        for index, container in enumerate(containers):
            if isinstance(container, dict):
                _image_at(container, "image", f"{base}/{index}", pull, found)
            else:
                found.wrong_type(f"{base}/{index}", "an object", container)
    volumes = _list_at(spec, "volumes", pointer, found)
    if volumes:
        base = _child(pointer, "volumes")
        for index, volume in enumerate(volumes):
            if not isinstance(volume, dict):
                found.wrong_type(f"{base}/{index}", "an object", volume)
            elif volume.get("image") is not None:
                # Only the image volume source holds a container image; rbd.image is a Ceph
                # block device name and must never be touched.
                _image_volume(volume, f"{base}/{index}", pull, found)


def _image_volume(
    volume: Mapping[str, Any], pointer: str, pull: PullContext, found: _Found
) -> None:
    source = _mapping_at(volume, "image", pointer, found)
    if source is not None:
        _image_at(source, "reference", _child(pointer, "image"), pull, found)


def _pod_spec_at(
    obj: Mapping[str, Any], path: tuple[str, ...], pointer: str, found: _Found
) -> None:
    """Follow ``path`` to a pod spec and walk it with its own pull context."""
    for key in path:
        obj = _mapping_at(obj, key, pointer, found)
        if obj is None:
            return
        pointer = _child(pointer, key)
    _walk_pod_spec(obj, pointer, _pull_context(obj, pointer, found), found)


# --- InferenceService -----------------------------------------------------------------


def _walk_component(
    component: Mapping[str, Any],
    pointer: str,
    implementations: tuple[str, ...],
    found: _Found,
    inherit: PullContext = NO_PULL,
) -> PullContext:
    """A predictor, transformer or explainer: inline pod spec plus one-of implementations."""
    pull = _pull_context(component, pointer, found, inherit)
    for key in implementations:
        _container_at(component, key, pointer, pull, found)
    # v1alpha2-era shape ({"custom": {"container": {...}}}) that the schemaless CRD keeps.
    custom = _mapping_at(component, "custom", pointer, found)
    if custom is not None:
        _container_at(custom, "container", _child(pointer, "custom"), pull, found)
    _walk_pod_spec(component, pointer, pull, found)
    return pull


def _walk_predictor(
    predictor: Mapping[str, Any], pointer: str, found: _Found, inherit: PullContext = NO_PULL
) -> PullContext:
    pull = _walk_component(predictor, pointer, PREDICTOR_IMPLEMENTATIONS, found, inherit)
    worker = _mapping_at(predictor, "workerSpec", pointer, found)
    if worker is not None:
        # KServe builds the worker pod from the runtime's workerSpec merged with this
        # workerSpec only (multiNodeProcess); the predictor's credentials are not copied.
        worker_pointer = _child(pointer, "workerSpec")
        _walk_pod_spec(worker, worker_pointer, _pull_context(worker, worker_pointer, found), found)
    return pull


def _locate_inference_service(obj: Mapping[str, Any], found: _Found) -> None:
    spec = _mapping_at(obj, "spec", "", found)
    if spec is None:
        return
    stable = NO_PULL
    predictor = _mapping_at(spec, "predictor", "/spec", found)
    if predictor is not None:
        stable = _walk_predictor(predictor, "/spec/predictor", found)
    transformer = _mapping_at(spec, "transformer", "/spec", found)
    if transformer is not None:
        _walk_component(transformer, "/spec/transformer", (), found)
    explainer = _mapping_at(spec, "explainer", "/spec", found)
    if explainer is not None:
        _walk_component(explainer, "/spec/explainer", EXPLAINER_IMPLEMENTATIONS, found)
    _walk_canaries(spec, stable, found)


def _walk_canaries(spec: Mapping[str, Any], stable: PullContext, found: _Found) -> None:
    # spec.canary[*] = {trafficPercent, predictor} arrived in KServe v0.21 (raw mode). The
    # controller merges each canary predictor over the stable one (mergo WithOverride), so
    # credentials the canary leaves empty are the stable predictor's.
    canaries = _list_at(spec, "canary", "/spec", found)
    if not canaries:
        return
    for index, canary in enumerate(canaries):
        pointer = f"/spec/canary/{index}"
        if not isinstance(canary, dict):
            found.wrong_type(pointer, "an object", canary)
            continue
        predictor = _mapping_at(canary, "predictor", pointer, found)
        if predictor is not None:
            _walk_predictor(predictor, f"{pointer}/predictor", found, stable)


# --- ServingRuntime, ClusterStorageContainer, LLMInferenceService -------------------------


def _locate_serving_runtime(obj: Mapping[str, Any], found: _Found) -> None:
    # ServingRuntimePodSpec has containers, volumes and imagePullSecrets; no init containers
    # and no service account. The worker pod uses the workerSpec's own pull secrets.
    _pod_spec_at(obj, ("spec",), "", found)
    _pod_spec_at(obj, ("spec", "workerSpec"), "", found)


def _locate_storage_container(obj: Mapping[str, Any], found: _Found) -> None:
    # Cluster-scoped, no credentials of its own: the image is later pulled with those of
    # whichever Pod KServe's Pod webhook injects it into.
    spec = _mapping_at(obj, "spec", "", found)
    if spec is not None:
        _container_at(spec, "container", "/spec", NO_PULL, found)


LLM_POD_SPECS: Final = (
    ("spec", "template"),
    ("spec", "worker"),
    ("spec", "prefill", "template"),
    ("spec", "prefill", "worker"),
    ("spec", "router", "scheduler", "template"),
    ("spec", "router", "scheduler", "tokenizer", "template"),
)


def _locate_llm_inference_service(obj: Mapping[str, Any], found: _Found) -> None:
    for path in LLM_POD_SPECS:
        _pod_spec_at(obj, path, "", found)


def _pod_spec_locator(*path: str) -> Callable[[Mapping[str, Any], _Found], None]:
    def locate(obj: Mapping[str, Any], found: _Found) -> None:
        _pod_spec_at(obj, path, "", found)

    return locate


# --- the kind table -------------------------------------------------------------------

_Locator = Callable[[Mapping[str, Any], _Found], None]
_KSERVE = "serving.kserve.io"
_KNATIVE = "serving.knative.dev"

_TEMPLATE = _pod_spec_locator("spec", "template", "spec")

# Default modes: "pin" where a tag left in place fails later (Knative resolves tags itself and
# never creates a Pod when that fails) or is resolved per Pod; "rewrite" for runtimes, because
# KServe edits runtime tags (runtimeVersion, -gpu/-cpu suffixes) and silently ignores
# runtimeVersion on a digest; "off" for workload templates, since pinning them makes GitOps
# tools report drift and their Pods are pinned at Pod admission anyway.
# ClusterStorageContainer is pinned: KServe copies spec.container verbatim into each Pod's
# storage-initializer init container and never edits its tag, so a digest there gives every
# Pod the same image, even when KServe's Pod webhook injects it after pinhook's has run.
_TABLE: Final[tuple[tuple[KindInfo, _Locator], ...]] = (
    (KindInfo("", "Pod", "pods", "pods", "pin"), _pod_spec_locator("spec")),
    (
        KindInfo(
            _KSERVE, "InferenceService", "inferenceservices", f"inferenceservices.{_KSERVE}", "pin"
        ),
        _locate_inference_service,
    ),
    (
        KindInfo(
            _KSERVE, "ServingRuntime", "servingruntimes", f"servingruntimes.{_KSERVE}", "rewrite"
        ),
        _locate_serving_runtime,
    ),
    (
        KindInfo(
            _KSERVE,
            "ClusterServingRuntime",
            "clusterservingruntimes",
            f"clusterservingruntimes.{_KSERVE}",
            "rewrite",
        ),
        _locate_serving_runtime,
    ),
    (
        KindInfo(
            _KSERVE,
            "ClusterStorageContainer",
            "clusterstoragecontainers",
            f"clusterstoragecontainers.{_KSERVE}",
            "pin",
        ),
        _locate_storage_container,
    ),
    (
        KindInfo(
            _KSERVE,
            "LLMInferenceService",
            "llminferenceservices",
            f"llminferenceservices.{_KSERVE}",
            "pin",
        ),
        _locate_llm_inference_service,
    ),
    (
        KindInfo(
            _KSERVE,
            "LLMInferenceServiceConfig",
            "llminferenceserviceconfigs",
            f"llminferenceserviceconfigs.{_KSERVE}",
            "pin",
        ),
        _locate_llm_inference_service,
    ),
    (KindInfo(_KNATIVE, "Service", "services", f"services.{_KNATIVE}", "pin"), _TEMPLATE),
    (
        KindInfo(_KNATIVE, "Configuration", "configurations", f"configurations.{_KNATIVE}", "pin"),
        _TEMPLATE,
    ),
    (KindInfo("apps", "Deployment", "deployments", "deployments.apps", "off"), _TEMPLATE),
    (KindInfo("apps", "StatefulSet", "statefulsets", "statefulsets.apps", "off"), _TEMPLATE),
    (KindInfo("apps", "DaemonSet", "daemonsets", "daemonsets.apps", "off"), _TEMPLATE),
    (KindInfo("apps", "ReplicaSet", "replicasets", "replicasets.apps", "off"), _TEMPLATE),
    (KindInfo("batch", "Job", "jobs", "jobs.batch", "off"), _TEMPLATE),
    (
        KindInfo("batch", "CronJob", "cronjobs", "cronjobs.batch", "off"),
        _pod_spec_locator("spec", "jobTemplate", "spec", "template", "spec"),
    ),
)

KINDS: Final[tuple[KindInfo, ...]] = tuple(info for info, _ in _TABLE)

_BY_KIND: Final[Mapping[tuple[str, str], tuple[KindInfo, _Locator]]] = MappingProxyType(
    {(info.group, info.kind): (info, locate) for info, locate in _TABLE}
)


def kind_info(group: str, kind: str) -> KindInfo | None:
    """The supported kind, or None: an unknown kind is passed through untouched."""
    entry = _BY_KIND.get((group, kind))
    return entry[0] if entry is not None else None


def locate_images(group: str, kind: str, obj: Mapping[str, Any]) -> Located | None:
    """Every image field of ``obj`` with its pull context; None for an unknown kind.

    Never raises for a malformed body: what cannot be read is skipped and named in
    ``problems``.
    """
    entry = _BY_KIND.get((group, kind))
    if entry is None:
        return None
    found = _Found()
    if isinstance(obj, dict):
        entry[1](obj, found)
    else:
        found.wrong_type("", "an object", obj)
    # Paths that share a prefix (LLM pod specs, runtime workerSpec) meet the same malformed
    # parent more than once; report it once.
    return Located(tuple(found.fields), tuple(dict.fromkeys(found.problems)))

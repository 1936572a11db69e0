"""Every kind pinhook acts on, and where its images are: declared once, as data.

Each kind names its group, resource and default mode, and describes its image fields as a
small tree of specs, in the spirit of Kyverno's image extractors. Everything that needs the
paths is generated from this table: the Python locator (``locate``), the CEL that lists an
object's image values (``cel``: the webhook's matchConditions, and later a
ValidatingAdmissionPolicy), and one webhook per kind (``webhookconfig``).

The specs, each read at the object (a JSON object) it is applied to:

- ``At(path, then)``: the object at the dotted ``path``, every step an object;
- ``Each(key, then)``: every element of the list at ``key``;
- ``All(*specs)``: each of the specs, in order;
- ``Pull(then, inherit=None)``: a pod-spec-like object whose ``imagePullSecrets`` and
  ``serviceAccountName`` (or the deprecated ``serviceAccount``) are the pull credentials of
  every image under it; ``inherit`` is the dotted path, from the object's root, of another
  one whose credentials fill the fields this one leaves empty. Images under no ``Pull`` have
  no credentials of their own;
- ``Container(key)``: one embedded container, its image at ``key.image``;
- ``Containers(key)``: a list of containers, images at ``key[*].image``;
- ``ImageVolumes()``: ``volumes[*].image.reference``, the image volume source (never
  ``rbd.image``, a Ceph block device name).

Field names were checked against kserve/kserve (``pkg/apis/serving/v1beta1``, ``v1alpha1``)
and knative/serving (``pkg/apis/serving/v1``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final


class Mode(StrEnum):
    PIN = "pin"  # rewrite, then resolve the tag to a digest
    # Everything pin does (rewrite, resolve, judge by the policy), but no patch and no denial:
    # what pin would have done is reported in warnings, audit annotations, logs and metrics.
    AUDIT = "audit"
    REWRITE = "rewrite"  # rewrite only
    OFF = "off"  # leave the kind alone


# The modes that resolve digests, and that a namespace's or the global ``mode`` replaces.
PINNING: Final = frozenset({Mode.PIN, Mode.AUDIT})


# --- the spec algebra ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Containers:
    key: str


@dataclass(frozen=True, slots=True)
class Container:
    key: str


@dataclass(frozen=True, slots=True)
class ImageVolumes:
    pass


@dataclass(frozen=True, slots=True)
class At:
    path: str
    then: Spec

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.path.split("."))


@dataclass(frozen=True, slots=True)
class Each:
    key: str
    then: Spec


@dataclass(frozen=True, slots=True, init=False)
class All:
    specs: tuple[Spec, ...]

    def __init__(self, *specs: Spec) -> None:
        object.__setattr__(self, "specs", specs)


@dataclass(frozen=True, slots=True)
class Pull:
    then: Spec
    inherit: str | None = None


Spec = Containers | Container | ImageVolumes | At | Each | All | Pull


# --- where each kind keeps its images -----------------------------------------------------

POD_SPEC: Final = All(
    Containers("containers"),
    Containers("initContainers"),
    Containers("ephemeralContainers"),
    ImageVolumes(),
)


def pod_specs(*paths: str) -> All:
    """Pod specs at ``paths``, each with its own pull credentials."""
    return All(*(At(path, Pull(POD_SPEC)) for path in paths))


# PredictorSpec one-of implementations; each embeds a core Container, so "image" sits directly
# under the key. "catboost" exists in recent v1beta1 sources (predictor_catboost.go).
PREDICTOR_FRAMEWORKS: Final = (
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
EXPLAINERS: Final = ("art", "alibi", "aix")


def _component(implementations: tuple[str, ...]) -> All:
    """A predictor, transformer or explainer: one-of implementations, the v1alpha2-era
    ``custom.container`` the schemaless CRD keeps, and an inline pod spec."""
    return All(
        *(Container(key) for key in implementations),
        At("custom", Container("container")),
        POD_SPEC,
    )


def _predictor(inherit: str | None = None) -> Pull:
    # KServe builds the worker pod from the runtime's workerSpec merged with this workerSpec
    # only (multiNodeProcess): the predictor's credentials are not copied to it.
    return Pull(
        All(_component(PREDICTOR_FRAMEWORKS), At("workerSpec", Pull(POD_SPEC))), inherit=inherit
    )


INFERENCE_SERVICE: Final = At(
    "spec",
    All(
        At("predictor", _predictor()),
        At("transformer", Pull(_component(()))),
        At("explainer", Pull(_component(EXPLAINERS))),
        # spec.canary[*] = {trafficPercent, predictor} arrived in KServe v0.21 (raw mode). The
        # controller merges each canary predictor over the stable one (mergo WithOverride), so
        # credentials a canary leaves empty are the stable predictor's.
        Each("canary", At("predictor", _predictor(inherit="spec.predictor"))),
    ),
)
# ServingRuntimePodSpec has containers, volumes and imagePullSecrets; no init containers and
# no service account. The worker pod uses the workerSpec's own pull secrets.
SERVING_RUNTIME: Final = pod_specs("spec", "spec.workerSpec")
# Cluster-scoped, no credentials of its own: the image is later pulled with those of whichever
# Pod KServe's Pod webhook injects it into.
STORAGE_CONTAINER: Final = At("spec", Container("container"))
LLM_SERVICE: Final = pod_specs(
    "spec.template",
    "spec.worker",
    "spec.prefill.template",
    "spec.prefill.worker",
    "spec.router.scheduler.template",
    "spec.router.scheduler.tokenizer.template",
)
TEMPLATE: Final = pod_specs("spec.template.spec")
JOB_TEMPLATE: Final = pod_specs("spec.jobTemplate.spec.template.spec")


# --- the table ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KindInfo:
    group: str  # "" for core, "serving.kserve.io", ...
    kind: str  # "Pod", "InferenceService", ...
    resource: str  # plural resource, e.g. "pods", "inferenceservices"
    default_mode: Mode
    images: Spec = field(repr=False)
    key: str = field(init=False)  # config key in kubectl style: "pods", "deployments.apps"
    webhook_name: str = field(init=False)  # "pods.pinhook.dev", "jobs.batch.pinhook.dev"

    def __post_init__(self) -> None:
        key = f"{self.resource}.{self.group}" if self.group else self.resource
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "webhook_name", _webhook_name(self.group, self.resource))


def _webhook_name(group: str, resource: str) -> str:
    """`pods.pinhook.dev`, `inferenceservices.kserve.pinhook.dev`, `jobs.batch.pinhook.dev`."""
    if not group:
        return f"{resource}.pinhook.dev"
    labels = group.split(".")
    short = labels[-2] if len(labels) >= 2 else labels[0]
    return f"{resource}.{short}.pinhook.dev"


KSERVE: Final = "serving.kserve.io"
KNATIVE: Final = "serving.knative.dev"

# Default modes: "pin" where a tag left in place fails later (Knative resolves tags itself and
# never creates a Pod when that fails) or is resolved per Pod; "rewrite" for runtimes, because
# KServe edits runtime tags (runtimeVersion, -gpu/-cpu suffixes) and silently ignores
# runtimeVersion on a digest; "off" for workload templates, since pinning them makes GitOps
# tools report drift and their Pods are pinned at Pod admission anyway.
# ClusterStorageContainer is pinned: KServe copies spec.container verbatim into each Pod's
# storage-initializer init container and never edits its tag, so a digest there gives every
# Pod the same image, even when KServe's Pod webhook injects it after pinhook's has run.
# One row per kind: group, kind, resource, default mode, where its images are.
_K = KindInfo
KINDS: Final[tuple[KindInfo, ...]] = (
    _K("", "Pod", "pods", Mode.PIN, pod_specs("spec")),
    _K(KSERVE, "InferenceService", "inferenceservices", Mode.PIN, INFERENCE_SERVICE),
    _K(KSERVE, "ServingRuntime", "servingruntimes", Mode.REWRITE, SERVING_RUNTIME),
    _K(KSERVE, "ClusterServingRuntime", "clusterservingruntimes", Mode.REWRITE, SERVING_RUNTIME),
    _K(KSERVE, "ClusterStorageContainer", "clusterstoragecontainers", Mode.PIN, STORAGE_CONTAINER),
    _K(KSERVE, "LLMInferenceService", "llminferenceservices", Mode.PIN, LLM_SERVICE),
    _K(KSERVE, "LLMInferenceServiceConfig", "llminferenceserviceconfigs", Mode.PIN, LLM_SERVICE),
    _K(KNATIVE, "Service", "services", Mode.PIN, TEMPLATE),
    _K(KNATIVE, "Configuration", "configurations", Mode.PIN, TEMPLATE),
    _K("apps", "Deployment", "deployments", Mode.OFF, TEMPLATE),
    _K("apps", "StatefulSet", "statefulsets", Mode.OFF, TEMPLATE),
    _K("apps", "DaemonSet", "daemonsets", Mode.OFF, TEMPLATE),
    _K("apps", "ReplicaSet", "replicasets", Mode.OFF, TEMPLATE),
    _K("batch", "Job", "jobs", Mode.OFF, TEMPLATE),
    _K("batch", "CronJob", "cronjobs", Mode.OFF, JOB_TEMPLATE),
)

KIND_KEYS: Final = frozenset(info.key for info in KINDS)
DEFAULT_MODES: Final[Mapping[str, Mode]] = MappingProxyType(
    {info.key: info.default_mode for info in KINDS}
)
_BY_KIND: Final[Mapping[tuple[str, str], KindInfo]] = MappingProxyType(
    {(info.group, info.kind): info for info in KINDS}
)


def kind_info(group: str, kind: str) -> KindInfo | None:
    """The supported kind, or None: an unknown kind is passed through untouched."""
    return _BY_KIND.get((group, kind))

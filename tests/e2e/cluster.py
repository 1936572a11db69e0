"""The cluster side of the end-to-end suite: connecting, CRDs, namespaces, test objects.

Everything here talks to the API server of ``$KUBECONFIG`` through lightkube's sync client.
Waits are watches bounded by a deadline, never sleeps, except for the one thing the API
server publishes no event for: when a new webhook configuration starts being called.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx2
from lightkube import ApiError, Client, KubeConfig, codecs
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.admissionregistration_v1 import (
    MutatingWebhookConfiguration,
    ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding,
)
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.apps_v1 import Deployment, ReplicaSet
from lightkube.resources.core_v1 import Namespace, Pod, ServiceAccount
from lightkube.types import PatchType

CRD_DIR: Final = Path(__file__).parent / "crds"
FIELD_MANAGER: Final = "pinhook-e2e"
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": FIELD_MANAGER}
# The label that once opted a namespace out; it must not any more.
IGNORE_LABEL: Final = "pinhook.dev/ignore"
PINHOOK_NAMESPACE: Final = "pinhook-system"
CONNECT_TIMEOUT_S: Final = 5.0
REQUEST_TIMEOUT_S: Final = 60.0
CRD_ESTABLISHED_S: Final = 60.0
SERVICE_ACCOUNT_S: Final = 60.0
WEBHOOK_LIVE_S: Final = 30.0
_WEBHOOK_POLL_S: Final = 0.25

InferenceService = create_namespaced_resource(
    "serving.kserve.io", "v1beta1", "InferenceService", "inferenceservices"
)
ServingRuntime = create_namespaced_resource(
    "serving.kserve.io", "v1alpha1", "ServingRuntime", "servingruntimes"
)
ClusterServingRuntime = create_global_resource(
    "serving.kserve.io", "v1alpha1", "ClusterServingRuntime", "clusterservingruntimes"
)
KnativeService = create_namespaced_resource("serving.knative.dev", "v1", "Service", "services")

T = TypeVar("T")


class NoCluster(Exception):
    """Why the suite cannot run here; the message says what to set."""


def kubeconfig_path() -> Path:
    """The kubeconfig file of the test cluster, or NoCluster saying why there is none."""
    path = os.environ.get("KUBECONFIG", "")
    if not path:
        raise NoCluster(
            "KUBECONFIG is not set; point it at a test cluster (see tests/e2e/README.md)"
        )
    # kubectl accepts a list of files; the suite uses the first, and so does pinhook install.
    first = Path(path.split(os.pathsep)[0])
    if not first.is_file():
        raise NoCluster(f"KUBECONFIG names {first}, which does not exist")
    return first


def connect(kubeconfig: Path) -> Client:
    """A client for the cluster, once its API server answered; NoCluster when it does not."""
    try:
        config = KubeConfig.from_file(kubeconfig)
        with Client(config=config, timeout=httpx2.Timeout(CONNECT_TIMEOUT_S)) as probe:
            probe.get(Namespace, "default")
    except ApiError as exc:
        # The API server answered: a real problem with this cluster, not a missing one.
        raise RuntimeError(f"the API server of {kubeconfig} refused a read: {exc}") from exc
    except Exception as exc:  # lightkube raises its own config errors and httpx2 transport ones
        raise NoCluster(
            f"no API server reachable through {kubeconfig} within "
            f"{CONNECT_TIMEOUT_S:.0f}s: {type(exc).__name__}: {exc}"
        ) from exc
    # Creates wait for webhooks (timeoutSeconds 10 each), so reads get far longer than 5 s.
    timeout = httpx2.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    return Client(config=config, field_manager=FIELD_MANAGER, timeout=timeout)


def within(seconds: float, what: str, action: Callable[[], T]) -> T:
    """``action()``'s result, or TimeoutError after ``seconds``.

    lightkube's watches have no deadline of their own, so the action runs in a daemon thread;
    one that never finishes holds only a watch connection, closed with the client.
    """
    outcome: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            outcome.put((True, action()))
        except BaseException as exc:  # handed to the caller's thread
            outcome.put((False, exc))

    threading.Thread(target=run, name=f"e2e-wait {what}", daemon=True).start()
    try:
        ok, value = outcome.get(timeout=seconds)
    except queue.Empty:
        raise TimeoutError(f"{what}: not within {seconds:.0f}s") from None
    if not ok:
        raise value
    result: T = value
    return result


def is_not_found(exc: ApiError) -> bool:
    return exc.status.code == 404


def run_id() -> str:
    return uuid.uuid4().hex[:6]


# --- CRDs -------------------------------------------------------------------------------


def crd_files() -> list[Path]:
    return sorted(CRD_DIR.glob("*.yaml"))


def load_crds() -> list[CustomResourceDefinition]:
    crds: list[CustomResourceDefinition] = []
    for path in crd_files():
        for resource in codecs.load_all_yaml(path.read_text()):
            assert isinstance(resource, CustomResourceDefinition), path
            crds.append(resource)
    return crds


@dataclass
class InstalledCrds:
    """CRDs this run applied (and so deletes); ones that were already there are left alone."""

    applied: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)


def install_crds(client: Client, installed: InstalledCrds) -> None:
    """Server-side apply each missing CRD and wait until the API server serves it.

    A CRD that exists and is not labelled as ours (a real KServe or Knative) is never
    replaced: its schema is the cluster's, and deleting it would delete its objects. One we
    left behind in an interrupted run is taken over and deleted at the end.
    """
    for crd in load_crds():
        assert crd.metadata is not None and crd.metadata.name is not None
        name = crd.metadata.name
        existing = _get_crd(client, name)
        if existing is not None and not _is_ours(existing):
            installed.present.append(name)
            continue
        client.apply(crd, field_manager=FIELD_MANAGER, force=True)
        installed.applied.append(name)
        wait_until_established(client, name)


def wait_until_established(client: Client, name: str) -> None:
    def established() -> None:
        client.wait(CustomResourceDefinition, name, for_conditions=["Established"])

    within(CRD_ESTABLISHED_S, f"CRD {name} Established", established)


def delete_crds(client: Client, names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(ApiError):
            client.delete(CustomResourceDefinition, name)


def _get_crd(client: Client, name: str) -> CustomResourceDefinition | None:
    try:
        return client.get(CustomResourceDefinition, name)
    except ApiError as exc:
        if is_not_found(exc):
            return None
        raise


def _is_ours(crd: CustomResourceDefinition) -> bool:
    labels = (crd.metadata.labels if crd.metadata else None) or {}
    return all(labels.get(key) == value for key, value in MANAGED_BY.items())


# --- namespaces -------------------------------------------------------------------------


@dataclass
class Namespaces:
    """Namespaces a test module made (deleted at teardown) or found (left alone)."""

    client: Client
    created: list[str] = field(default_factory=list)

    def create(self, name: str, labels: dict[str, str] | None = None) -> str:
        metadata = ObjectMeta(name=name, labels={**MANAGED_BY, **(labels or {})})
        self.client.create(Namespace(metadata=metadata))
        self.created.append(name)
        wait_for_default_service_account(self.client, name)
        return name

    def ensure(self, name: str) -> str:
        """Use ``name`` as it is when it exists; otherwise create it, unlabelled."""
        try:
            self.client.get(Namespace, name)
        except ApiError as exc:
            if not is_not_found(exc):
                raise
            return self.create(name)
        wait_for_default_service_account(self.client, name)
        return name

    def delete_all(self) -> None:
        # Not waited for: every Pod here is unscheduled (schedulingGates), so the namespace
        # goes away on its own without a kubelet; nothing later depends on it being gone.
        for name in reversed(self.created):
            with contextlib.suppress(ApiError):
                self.client.delete(Namespace, name)
        self.created.clear()


def wait_for_default_service_account(client: Client, namespace: str) -> None:
    """Pods are refused until the ServiceAccount controller made ``default`` in a namespace."""

    def added() -> None:
        events = client.watch(
            ServiceAccount, namespace=namespace, fields={"metadata.name": "default"}
        )
        for op, _account in events:
            if op in ("ADDED", "MODIFIED"):
                return

    within(SERVICE_ACCOUNT_S, f"ServiceAccount {namespace}/default", added)


# --- objects ----------------------------------------------------------------------------

# Pods stay unscheduled: the assertion is on the stored spec, and an unscheduled Pod is never
# pulled (the registry is on this machine's loopback) and is deleted without a kubelet.
SCHEDULING_GATE: Final = "pinhook.dev/e2e"


def pod(name: str, image: str, namespace: str) -> dict[str, Any]:
    """A Pod that satisfies the restricted Pod Security Standard (pinhook-system enforces it)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "spec": {
            "restartPolicy": "Never",
            "schedulingGates": [{"name": SCHEDULING_GATE}],
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "app",
                    "image": image,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def inference_service(
    name: str, image: str, namespace: str, predictor: str = "model"
) -> dict[str, Any]:
    """``predictor`` is ``model`` (the current shape) or a framework key such as ``sklearn``
    (the older one, which KServe's own webhook moves into ``model``)."""
    storage = "gs://kfserving-examples/models/sklearn/1.0/model"
    implementation: dict[str, Any] = {"storageUri": storage, "image": image}
    if predictor == "model":
        implementation = {"modelFormat": {"name": "sklearn"}, **implementation}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"predictor": {predictor: implementation}},
    }


def _runtime_spec(image: str) -> dict[str, Any]:
    return {
        "supportedModelFormats": [{"name": "sklearn", "version": "1", "autoSelect": True}],
        "containers": [
            {
                "name": "kserve-container",
                "image": image,
                "args": ["--model_name={{.Name}}", "--model_dir=/mnt/models"],
            }
        ],
    }


def serving_runtime(name: str, image: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": name, "namespace": namespace},
        "spec": _runtime_spec(image),
    }


def cluster_serving_runtime(name: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ClusterServingRuntime",
        "metadata": {"name": name, "labels": dict(MANAGED_BY)},
        "spec": _runtime_spec(image),
    }


def knative_service(name: str, image: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"template": {"spec": {"containers": [{"image": image}]}}},
    }


def deployment(
    name: str, image: str, namespace: str, replicas: int, *, labels: dict[str, str]
) -> dict[str, Any]:
    """A Deployment whose Pods are the suite's gated ``pod`` (never scheduled or pulled)."""
    template = pod(name, image, namespace)
    template["metadata"] = {"labels": {**template["metadata"]["labels"], **labels}}
    template["spec"]["restartPolicy"] = "Always"  # the only policy a Deployment accepts
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": template,
        },
    }


def wait_for_pods(
    client: Client, namespace: str, labels: dict[str, str], count: int, seconds: float
) -> list[dict[str, Any]]:
    """The first ``count`` Pods matching ``labels`` that exist, as soon as they do (watch)."""

    def added() -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for op, found in client.watch(Pod, namespace=namespace, labels=_selector(labels)):
            if op in ("ADDED", "MODIFIED"):
                document = as_dict(found)
                seen[document["metadata"]["name"]] = document
            if len(seen) >= count:
                return list(seen.values())
        raise AssertionError("the Pod watch ended")

    return within(seconds, f"{count} Pods {labels} in {namespace}", added)


def wait_for_rollout(client: Client, name: str, namespace: str, seconds: float) -> dict[str, Any]:
    """The Deployment once its controller observed it and all its replicas are of the newest
    ReplicaSet (created, not ready: there is no kubelet)."""

    def rolled_out() -> dict[str, Any]:
        fields = {"metadata.name": name}
        for _op, found in client.watch(Deployment, namespace=namespace, fields=_selector(fields)):
            document = as_dict(found)
            status = document.get("status") or {}
            if (
                status.get("observedGeneration") == document["metadata"]["generation"]
                and status.get("updatedReplicas") == document["spec"]["replicas"]
            ):
                return document
        raise AssertionError("the Deployment watch ended")

    return within(seconds, f"Deployment {namespace}/{name} rolled out", rolled_out)


def replica_sets(
    client: Client, namespace: str, labels: dict[str, str]
) -> tuple[list[dict[str, Any]], str]:
    """The ReplicaSets matching ``labels`` and the list's resourceVersion (to watch from)."""
    listed = client.list(ReplicaSet, namespace=namespace, labels=_selector(labels))
    items = [as_dict(item) for item in listed]  # resourceVersion is known once iterated
    return items, listed.resourceVersion


def _selector(labels: dict[str, str]) -> dict[str, Any]:
    """Plain ``key: value`` pairs, typed as lightkube's selectors (which also take operators)."""
    return dict(labels)


def no_new_replica_set(
    client: Client, namespace: str, labels: dict[str, str], since: str, seconds: float
) -> None:
    """Fails if a ReplicaSet matching ``labels`` is added within ``seconds`` after ``since``.

    A Deployment controller in a hot loop adds one per sync, within milliseconds of the last.
    """

    def first_added() -> str:
        events = client.watch(
            ReplicaSet, namespace=namespace, labels=_selector(labels), resource_version=since
        )
        for op, found in events:
            if op == "ADDED":
                return str(as_dict(found)["metadata"]["name"])
        raise AssertionError("the ReplicaSet watch ended")

    try:
        name = within(seconds, "a new ReplicaSet", first_added)
    except TimeoutError:
        return
    raise AssertionError(f"the Deployment controller created another ReplicaSet: {name}")


def create_and_read_back(client: Client, document: dict[str, Any]) -> dict[str, Any]:
    """Create the object, then GET it: what the API server stored after mutating admission."""
    # lightkube types from_dict's result as a generic resource even for built-in kinds.
    created: Any = client.create(codecs.from_dict(document))
    name, namespace = created.metadata.name, created.metadata.namespace
    stored: Any = client.get(type(created), name, namespace=namespace)
    return as_dict(stored)


def dry_run_create(client: Client, document: dict[str, Any]) -> dict[str, Any]:
    """What the API server would store (dryRun=All); webhooks with sideEffects None run."""
    return as_dict(client.create(codecs.from_dict(document), dry_run=True))


def as_dict(resource: Any) -> dict[str, Any]:
    document: dict[str, Any] = resource.to_dict()
    return document


def delete_pod(client: Client, name: str, namespace: str) -> None:
    with contextlib.suppress(ApiError):
        client.delete(Pod, name, namespace=namespace)


def delete_cluster_serving_runtime(client: Client, name: str) -> None:
    with contextlib.suppress(ApiError):
        client.delete(ClusterServingRuntime, name)


def container_images(obj: dict[str, Any], *path: str) -> list[str]:
    """Images of the container list at ``path`` (``spec``, ``containers`` …)."""
    node: Any = obj
    for key in path:
        node = node[key]
    return [container["image"] for container in node]


def wait_until_webhook_called(
    client: Client, namespace: str, image: str, pinned: str, *, prefix: str = "probe"
) -> None:
    """Create probe Pods until one is stored with ``pinned``: the webhook is being called."""

    def pinned_probe(stored: dict[str, Any]) -> bool:
        return container_images(stored, "spec", "containers") == [pinned]

    wait_until_stored(
        client,
        lambda name: pod(name, image, namespace),
        pinned_probe,
        f"the webhook was not called (expected [{pinned}])",
        prefix=prefix,
    )


def wait_until_stored(
    client: Client,
    document: Callable[[str], dict[str, Any]],
    accept: Callable[[dict[str, Any]], bool],
    what: str,
    *,
    prefix: str = "probe",
    seconds: float = WEBHOOK_LIVE_S,
) -> dict[str, Any]:
    """Create ``document(name)`` under new names until the stored object is accepted.

    A new or changed webhook configuration reaches the API server's dispatcher through an
    informer, a moment after the write; there is no event to wait for, hence the bounded
    retry. Real creates rather than dry runs, so the probe does not depend on how dry runs are
    matched. Returns the accepted object.
    """
    deadline = time.monotonic() + seconds
    attempt = 0
    stored: dict[str, Any] = {}
    while time.monotonic() < deadline:
        attempt += 1
        stored = create_and_read_back(client, document(f"{prefix}-{attempt}"))
        if accept(stored):
            return stored
        time.sleep(_WEBHOOK_POLL_S)
    raise AssertionError(
        f"{what}: not within {seconds:.0f}s, after {attempt} probes; the last one stored "
        f"{stored.get('spec')}"
    )


def poll_until(what: str, seconds: float, check: Callable[[], T | None]) -> T:
    """``check()``'s first result that is not None, asked every fraction of a second.

    Only for what publishes no event (pinhook's metrics, a file it reloads); API objects are
    waited for with watches.
    """
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {seconds:.0f}s")
        time.sleep(_WEBHOOK_POLL_S)


def delete_webhook_configuration(client: Client, name: str) -> None:
    with contextlib.suppress(ApiError):
        client.delete(MutatingWebhookConfiguration, name)


def delete_validating_policy(client: Client, name: str) -> None:
    for resource in (ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicy):
        with contextlib.suppress(ApiError):
            client.delete(resource, name)


def get_validating_policy(client: Client, name: str) -> dict[str, Any]:
    return as_dict(client.get(ValidatingAdmissionPolicy, name))


def wait_until_denied(
    client: Client,
    document: Callable[[str], dict[str, Any]],
    by: str,
    *,
    prefix: str = "probe",
    seconds: float = WEBHOOK_LIVE_S,
) -> str:
    """Create ``document(name)`` under new names until the API server refuses one with a
    message containing ``by``; returns that message.

    A new admission policy or binding is compiled and takes effect a moment after it is
    written, with no event to wait for: hence the bounded retry, as for webhooks. The objects
    admitted meanwhile stay (unscheduled) in their namespace.
    """
    deadline = time.monotonic() + seconds
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        try:
            client.create(codecs.from_dict(document(f"{prefix}-{attempt}")))
        except ApiError as exc:
            message = exc.status.message or ""
            if by in message:
                return message
            raise
        time.sleep(_WEBHOOK_POLL_S)
    raise AssertionError(f"not denied by {by!r} within {seconds:.0f}s, after {attempt} probes")


def get_webhook_configuration(client: Client, name: str) -> dict[str, Any]:
    return as_dict(client.get(MutatingWebhookConfiguration, name))


def patch_webhooks(client: Client, name: str, path: str, value: Any) -> None:
    """Set ``path`` (below ``/webhooks/N``) to ``value`` in every webhook of configuration
    ``name``; each replacement is guarded by a test of the webhook's name."""
    webhooks = get_webhook_configuration(client, name)["webhooks"]
    ops: list[dict[str, Any]] = []
    for index, webhook in enumerate(webhooks):
        ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": webhook["name"]})
        ops.append({"op": "replace", "path": f"/webhooks/{index}{path}", "value": value})
    client.patch(MutatingWebhookConfiguration, name, ops, patch_type=PatchType.JSON)

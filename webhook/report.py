"""``pinhook report``: what pinhook would do to the images already in a cluster.

The step before a rollout: it reads every object of every kind in the kind table (Pods,
workload templates, KServe and Knative objects) from the live cluster, finds their images with
the same locators as the webhook, and says for each distinct image where it is used, whether it
is pinned, what the rewrite map would make of it, whether its tag still resolves and to which
digest (through the same runtime, registry client and credentials as ``pinhook resolve``, one
registry lookup per distinct tag and set of credentials that apply), and whether the digest
running differs from the tag's digest now (a moved tag). The summary says which objects
``enforce`` (``requireDigest``, decided by ``decide`` as at admission) would deny, each judged on
the lookup with its own credentials.

Custom resources whose CRD is not installed are skipped with a note, as are kinds the
credentials may not list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jsonpointer
import orjson
import yaml
from lightkube import AsyncClient
from lightkube.core.resource import GlobalResource
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.apps_v1 import DaemonSet, Deployment, ReplicaSet, StatefulSet
from lightkube.resources.batch_v1 import CronJob, Job
from lightkube.resources.core_v1 import Pod, Secret, ServiceAccount

from .admission import AdmissionRequest
from .config import FailurePolicy, Settings, settings_from
from .decide import DENIED, decide
from .errors import PinhookError, ResolveError
from .flags import add_config_flags
from .kinds import KINDS, PINNING, KindInfo, Mode
from .kube import StaticPullSecrets, async_client
from .kubeerrors import (
    KubeError,
    KubeNotFound,
    KubeUnconfigured,
    KubeUnreachable,
    as_kube_error,
)
from .locate import ImageField, locate
from .mutate import Mutator
from .oci.credential import Credentials
from .oci.reference import ImageRef
from .plan import Action, ImagePlan, ImageResult, InvalidImage, render
from .resolve import (
    CachingResolver,
    DigestResolver,
    DigestSource,
    PullScope,
    StaticDigestResolver,
)
from .runtime import Runtime

log = logging.getLogger(__name__)

# Kinds built into Kubernetes, by (group, kind): their lightkube classes.
_BUILTIN: Final[Mapping[tuple[str, str], Any]] = {
    ("", "Pod"): Pod,
    ("apps", "Deployment"): Deployment,
    ("apps", "StatefulSet"): StatefulSet,
    ("apps", "DaemonSet"): DaemonSet,
    ("apps", "ReplicaSet"): ReplicaSet,
    ("batch", "Job"): Job,
    ("batch", "CronJob"): CronJob,
}
# Image lookups at once; the cache's singleflight makes one request per distinct tag anyway.
CONCURRENT_LOOKUPS: Final = 32
PROGRESS_MIN_OBJECTS: Final = 50
USES_SHOWN: Final = 3
_POD_STATUSES: Final = {
    "containers": "containerStatuses",
    "initContainers": "initContainerStatuses",
    "ephemeralContainers": "ephemeralContainerStatuses",
}


class ReportError(PinhookError):
    """The cluster cannot be read (no kubeconfig, unreachable, refused)."""


# --- what the report holds ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Use:
    """One image field of one object."""

    kind: str
    namespace: str | None
    name: str
    path: str  # spec.containers[0].image
    running_digest: str | None = None  # from a Pod's container status

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}: {self.path}"


@dataclass(slots=True)
class ImageRow:
    """What the report says about one distinct image string, for the objects that pull it with
    the same credentials (an image used in namespaces with different pull secrets gets a row
    for each set)."""

    image: str
    uses: list[Use] = field(default_factory=list)
    credentials: tuple[str, ...] = ()  # where they come from; none: anonymous
    pinned: bool = False  # the reference carries a digest
    rewritten_to: str | None = None  # what the rewrite map makes of it, when it changes it
    final: str | None = None  # what pin mode would write
    tag_digest: str | None = None  # the tag's digest now, at the registry pinhook would use
    running_digest: str | None = None  # the digest written or running
    moved: bool | None = None  # the running digest differs from the tag's digest now
    error: str | None = None  # why the tag does not resolve, or the reference is invalid
    reason: str | None = None  # the error's short reason (not-found, unauthorized, invalid)

    def as_data(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "uses": [str(use) for use in self.uses],
            "credentials": list(self.credentials),
            "pinned": self.pinned,
            "rewrittenTo": self.rewritten_to,
            "final": self.final,
            "tagDigest": self.tag_digest,
            "runningDigest": self.running_digest,
            "moved": self.moved,
            "error": self.error,
            "reason": self.reason,
        }


@dataclass(slots=True)
class Report:
    images: list[ImageRow]
    objects: int
    notes: list[str]
    denied: list[str]  # objects enforce would deny, with the reason

    def summary(self) -> dict[str, int]:
        """Counts of distinct images: one is unresolvable (or moved) when it is with any of
        the credentials it is used with."""

        def images(holds: Callable[[ImageRow], bool]) -> int:
            return len({row.image for row in self.images if holds(row)})

        return {
            "objects": self.objects,
            "images": images(lambda row: True),
            "pinned": images(lambda row: row.pinned),
            "unpinned": images(lambda row: not row.pinned),
            "rewritten": images(lambda row: row.rewritten_to is not None),
            "unresolvable": images(lambda row: row.error is not None),
            "moved": images(lambda row: bool(row.moved)),
            "enforceWouldDeny": len(self.denied),
        }

    def as_data(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "enforceWouldDeny": self.denied,
            "notes": self.notes,
            "images": [row.as_data() for row in self.images],
        }


# --- pure parts -----------------------------------------------------------------------------


def digest_of(reference: str) -> str | None:
    """The digest in an image reference or a container status ``imageID``
    (``docker-pullable://repo@sha256:…``, ``repo@sha256:…``); None for a bare image ID."""
    _, at, digest = reference.rpartition("@")
    return digest if at and digest.startswith("sha256:") else None


def running_digests(obj: Mapping[str, Any]) -> dict[str, str]:
    """A Pod's running digests by image field pointer, from its container statuses."""
    spec, status = obj.get("spec"), obj.get("status")
    if not isinstance(spec, dict) or not isinstance(status, dict):
        return {}
    found: dict[str, str] = {}
    for key, status_key in _POD_STATUSES.items():
        by_name = {
            s.get("name"): s.get("imageID")
            for s in status.get(status_key) or []
            if isinstance(s, dict)
        }
        for index, container in enumerate(spec.get(key) or []):
            if not isinstance(container, dict):
                continue
            image_id = by_name.get(container.get("name"))
            digest = digest_of(image_id) if isinstance(image_id, str) else None
            if digest is not None:
                found[f"/spec/{key}/{index}/image"] = digest
    return found


def field_path(pointer: str) -> str:
    """``/spec/containers/0/image`` as ``spec.containers[0].image``."""
    path = ""
    for key in jsonpointer.JsonPointer(pointer).parts:
        path += f"[{key}]" if key.isdigit() else (f".{key}" if path else key)
    return path


def enforce_denial(
    mutator: Mutator, request: AdmissionRequest, images: Sequence[ImageResult]
) -> str | None:
    """Why ``enforce`` (pin with ``requireDigest``) would deny the object, or None: the
    webhook's own plan and ``decide``, with the policy made strict and audit taken as pin."""
    plan = mutator.plan(request)
    if plan.skipped is not None or plan.mode not in PINNING:
        return None
    strict = FailurePolicy(on_failure=plan.policy.on_failure, require_digest=True)
    plan = plan._replace(mode=Mode.PIN, policy=strict)
    decision = decide(plan, images)
    if decision.result != DENIED or decision.outcome.message is None:
        return None
    return decision.outcome.message.removeprefix("pinhook: ")


# --- the cluster ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    info: KindInfo
    obj: dict[str, Any]

    @property
    def namespace(self) -> str | None:
        value = (self.obj.get("metadata") or {}).get("namespace")
        return value if isinstance(value, str) and value else None

    @property
    def name(self) -> str:
        return str((self.obj.get("metadata") or {}).get("name") or "")


async def _resource(client: AsyncClient, info: KindInfo, notes: list[str]) -> Any | None:
    """The lightkube class to list ``info`` with; None (and a note) when its CRD is not
    installed or cannot be read."""
    builtin = _BUILTIN.get((info.group, info.kind))
    if builtin is not None:
        return builtin
    name = f"{info.resource}.{info.group}"
    try:
        crd = await client.get(CustomResourceDefinition, name)
    except Exception as exc:
        error = _fatal_or(exc, f"reading CRD {name}")
        if isinstance(error, KubeNotFound):
            notes.append(f"{info.key}: CRD not installed; skipped")
        else:
            notes.append(f"{info.key}: CRD not readable ({error.detail}); skipped")
        return None
    versions = crd.spec.versions
    version = next((v.name for v in versions if v.storage), None) or versions[0].name
    if crd.spec.scope == "Cluster":
        return create_global_resource(info.group, version, info.kind, info.resource)
    return create_namespaced_resource(info.group, version, info.kind, info.resource)


def _fatal_or(exc: Exception, what: str) -> KubeError:
    """The Kubernetes error to note; ReportError when the cluster cannot be read at all, and
    anything that is no Kubernetes error again as it was (a bug)."""
    error = as_kube_error(exc, what)
    if error is None:
        raise exc
    if isinstance(error, KubeUnconfigured | KubeUnreachable):
        raise ReportError(str(error)) from None
    return error


def _to_dict(obj: Any) -> dict[str, Any]:
    data = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return data if isinstance(data, dict) else {}


async def _list(
    client: AsyncClient, resource: Any, namespaces: Sequence[str] | None
) -> AsyncIterator[dict[str, Any]]:
    """Every object of ``resource`` in ``namespaces`` (None: all); cluster-scoped ones once."""
    if issubclass(resource, GlobalResource):
        async for obj in client.list(resource):
            yield _to_dict(obj)
        return
    for namespace in namespaces or ["*"]:
        async for obj in client.list(resource, namespace=namespace):
            yield _to_dict(obj)


async def read_objects(
    client: AsyncClient, namespaces: Sequence[str] | None, notes: list[str]
) -> list[Found]:
    found: list[Found] = []
    for info in KINDS:
        resource = await _resource(client, info, notes)
        if resource is None:
            continue
        try:
            async for obj in _list(client, resource, namespaces):
                found.append(Found(info, obj))
        except Exception as exc:
            error = _fatal_or(exc, f"listing {info.key}")
            notes.append(f"{info.key}: cannot list ({error.detail}); skipped")
    return found


async def read_pull_secrets(
    client: AsyncClient, namespaces: Sequence[str] | None, notes: list[str]
) -> StaticPullSecrets:
    """The pull secrets and ServiceAccounts of ``namespaces``, read once."""
    manifests: list[dict[str, Any]] = []
    try:
        for resource, kind in ((Secret, "Secret"), (ServiceAccount, "ServiceAccount")):
            async for obj in _list(client, resource, namespaces):
                manifests.append({**obj, "kind": kind})
    except Exception as exc:
        error = _fatal_or(exc, "listing pull secrets")
        notes.append(f"pull secrets not read ({error.detail}); images resolve without them")
        return StaticPullSecrets()
    return StaticPullSecrets.from_manifests(manifests)


# --- building the report --------------------------------------------------------------------

# One image in one scope: the images of objects whose pull secrets are the same share one.
_Where = tuple[str, PullScope]


# The credentials that apply; None: nothing to look up (invalid, or a bare digest); the error
# when finding them failed (a credential provider past the deadline).
_Applying = Credentials | ResolveError | None


@dataclass(slots=True)
class _Lookup:
    """One row's lookup: the credentials that apply, and a scope they apply in."""

    row: ImageRow
    scope: PullScope
    credentials: _Applying


class _Builder:
    """Rows keyed by the image and the credentials that apply to it.

    The webhook's cache shares a digest between every set of credentials, but an admission that
    finds nothing cached looks the tag up with the object's own: an image that resolves with
    one namespace's pull secret may not resolve in another namespace without it, and enforce
    would deny there. So each set of credentials gets its own lookup, straight from the source
    behind the cache, and each object is judged on the row of its own credentials; objects
    whose credentials are the same (none at all, most often) share one row and one lookup.
    """

    def __init__(self, mutator: Mutator, source: DigestSource, deadline_seconds: float) -> None:
        self._mutator = mutator
        self._source = source
        self._seconds = deadline_seconds
        self._uses: dict[_Where, list[Use]] = {}
        self._lookups: dict[tuple[str, str], _Lookup] = {}  # by image and credentials key
        self._row_of: dict[_Where, ImageRow] = {}
        self._digests: dict[tuple[str, str], asyncio.Task[str]] = {}
        self.denied: list[str] = []

    @property
    def rows(self) -> list[ImageRow]:
        return [lookup.row for lookup in self._lookups.values()]

    def add(self, found: Found) -> list[ImageField]:
        """Record the object's image fields; returns them."""
        located = locate(found.info, found.obj)
        running = running_digests(found.obj) if found.info.kind == "Pod" else {}
        for image_field in located.fields:
            use = Use(
                found.info.kind,
                found.namespace,
                found.name,
                field_path(image_field.pointer),
                running.get(image_field.pointer),
            )
            where = (image_field.image, PullScope(found.namespace, image_field.pull))
            self._uses.setdefault(where, []).append(use)
        return list(located.fields)

    async def group(self) -> None:
        """Find the credentials that apply to each image in each scope, and make the rows."""
        gate = asyncio.Semaphore(CONCURRENT_LOOKUPS)

        async def credentials(where: _Where) -> _Applying:
            async with gate:
                return await self._credentials(*where)

        wheres = list(self._uses)
        found = await asyncio.gather(*(credentials(where) for where in wheres))
        for (image, scope), applying in zip(wheres, found, strict=True):
            key = (image, _key(applying))
            lookup = self._lookups.get(key)
            if lookup is None:
                row = ImageRow(image, credentials=_sources(applying))
                lookup = self._lookups[key] = _Lookup(row, scope, applying)
            lookup.row.uses.extend(self._uses[image, scope])
            self._row_of[image, scope] = lookup.row

    async def _credentials(self, image: str, scope: PullScope) -> _Applying:
        (planned,) = self._mutator.plan_fields([ImageField("/image", image, scope.pull)], Mode.PIN)
        if isinstance(planned, InvalidImage):
            return None
        target = planned.target
        if target.tag is None and target.digest is not None:
            return None
        try:
            return await self._source.credentials(target.with_digest(None), scope, self._deadline())
        except ResolveError as exc:
            return exc

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self._seconds

    async def resolve(self, advance: Callable[[], None]) -> None:
        gate = asyncio.Semaphore(CONCURRENT_LOOKUPS)

        async def one(lookup: _Lookup) -> None:
            async with gate:
                await self._resolve_row(lookup)
            advance()

        await asyncio.gather(*(one(lookup) for lookup in self._lookups.values()))

    async def _resolve_row(self, lookup: _Lookup) -> None:
        row, scope = lookup.row, lookup.scope
        image_field = ImageField("/image", row.image, scope.pull)
        (planned,) = self._mutator.plan_fields([image_field], Mode.PIN)
        if isinstance(planned, InvalidImage):
            row.error, row.reason = f"invalid reference: {planned.error}", "invalid"
            return
        row.pinned = planned.original.digest is not None
        if planned.rewritten:
            row.rewritten_to = str(planned.target)
        row.running_digest = planned.original.digest or next(
            (use.running_digest for use in row.uses if use.running_digest), None
        )
        target = planned.target
        credentials = lookup.credentials
        if credentials is None:
            row.final = render(planned, target.digest, self._mutator.settings.output)
            return  # a digest without a tag: nothing to look up
        try:
            if isinstance(credentials, ResolveError):
                raise credentials
            row.tag_digest = await self._lookup(target.with_digest(None), credentials)
        except ResolveError as exc:
            row.error, row.reason = str(exc), exc.reason
        digest = row.tag_digest if planned.action is Action.RESOLVE else target.digest
        row.final = render(planned, digest, self._mutator.settings.output)
        if row.running_digest is not None:
            await self._moved(row, planned, scope)

    async def _moved(self, row: ImageRow, planned: ImagePlan, scope: PullScope) -> None:
        """Compare with the tag where the image runs from: the original repository (with the
        credentials that apply there for the row's first object)."""
        original = planned.original
        if original.tag is None and original.digest is not None:
            return
        current = row.tag_digest if not planned.rewritten else None
        if current is None and planned.rewritten:
            tagged = original.with_digest(None)
            try:
                credentials = await self._source.credentials(tagged, scope, self._deadline())
                current = await self._lookup(tagged, credentials)
            except ResolveError:
                return
        if current is not None:
            row.moved = current != row.running_digest

    async def _lookup(self, ref: ImageRef, credentials: Credentials) -> str:
        """The tag's digest with these credentials: asked once, however many rows ask."""
        key = (str(ref), credentials.key)
        task = self._digests.get(key)
        if task is None:
            digest = self._source.digest(ref, credentials, self._deadline())
            task = self._digests[key] = asyncio.ensure_future(digest)
        return await task

    def judge(self, found: Found, fields: list[ImageField]) -> None:
        """Record the object when enforce would deny it."""
        request = AdmissionRequest(
            api_version="admission.k8s.io/v1",
            uid="pinhook-report",
            group=found.info.group,
            kind=found.info.kind,
            operation="CREATE",
            namespace=found.namespace,
            obj=found.obj,
            old_obj=None,
            name=found.name,
        )
        results = [self._result(f, found.namespace) for f in fields]
        denial = enforce_denial(self._mutator, request, [r for r in results if r is not None])
        if denial is not None:
            where = f"{found.namespace}/" if found.namespace else ""
            self.denied.append(f"{found.info.kind} {where}{found.name}: {denial}")

    def _result(self, image_field: ImageField, namespace: str | None) -> ImageResult | None:
        """The image's result as the webhook would see it, from the lookup with the
        credentials that apply to this object."""
        (planned,) = self._mutator.plan_fields([image_field], Mode.PIN)
        if isinstance(planned, InvalidImage):
            return None
        row = self._row_of[image_field.image, PullScope(namespace, image_field.pull)]
        failure = None
        digest: str | None = None
        if planned.action is Action.RESOLVE:
            if row.tag_digest is None:
                failure = ResolveError(row.error or "did not resolve", reason=row.reason)
            digest = row.tag_digest
        elif planned.action is Action.VERIFY:
            digest = planned.target.digest
        final = render(planned, digest, self._mutator.settings.output)
        return ImageResult(planned, final, digest, None, failure)


def _key(applying: _Applying) -> str:
    """What tells rows of one image apart."""
    if isinstance(applying, Credentials):
        return applying.key
    return "" if applying is None else f"\0{applying.reason}: {applying}"


def _sources(credentials: _Applying) -> tuple[str, ...]:
    """Where the credentials come from (``secret ns/name``, ``docker config …``), mirrors'
    included; nothing for none."""
    if not isinstance(credentials, Credentials):
        return ()
    found = [c.source for c in credentials.items]
    found += [c.source for _, items in credentials.mirrors for c in items]
    return tuple(dict.fromkeys(source for source in found if source))


def digest_source(resolver: DigestResolver) -> DigestSource:
    """Where the report asks, per set of credentials: the source behind the cache, whose
    digests would answer for every set."""
    if isinstance(resolver, CachingResolver):
        return resolver.source
    if isinstance(resolver, StaticDigestResolver):
        return resolver
    raise TypeError(f"no digest source behind {type(resolver).__name__}")


async def build_report(
    client: AsyncClient, runtime: Runtime, namespaces: Sequence[str] | None
) -> Report:
    notes: list[str] = []
    found = await read_objects(client, namespaces, notes)
    report = await report_of(found, runtime)
    report.notes[:0] = notes
    return report


async def report_of(found: Sequence[Found], runtime: Runtime) -> Report:
    """The report on objects already read, resolving with the runtime's credentials."""
    mutator = runtime.mutator
    seconds = runtime.settings.registry.timeout_seconds
    builder = _Builder(mutator, digest_source(mutator.resolver), seconds)
    fields = [builder.add(item) for item in found]
    await builder.group()
    with _progress(len(found), len(builder.rows)) as advance:
        await builder.resolve(advance)
    for item, item_fields in zip(found, fields, strict=True):
        builder.judge(item, item_fields)
    rows = sorted(builder.rows, key=lambda row: (row.image, row.credentials))
    return Report(rows, len(found), [], builder.denied)


@contextlib.contextmanager
def _progress(objects: int, images: int) -> Iterator[Callable[[], None]]:
    """A progress bar over the images resolving, on a terminal's stderr, for large clusters."""
    if objects < PROGRESS_MIN_OBJECTS or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(f"resolving {images} images of {objects} objects", total=images)
        yield lambda: bar.advance(task)


# --- output ---------------------------------------------------------------------------------


def print_table(report: Report, stream: Any = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream or sys.stdout, highlight=False, width=200)
    table = Table(box=box.SIMPLE)
    for column in ("image", "used by", "pinned", "rewritten to", "tag now", "moved"):
        table.add_column(column)
    rows_of = Counter(row.image for row in report.images)
    for row in report.images:
        uses = [str(use) for use in row.uses]
        shown = "\n".join(uses[:USES_SHOWN])
        if len(uses) > USES_SHOWN:
            shown += f"\n… and {len(uses) - USES_SHOWN} more"
        tag_now = row.tag_digest or (f"error: {row.reason}" if row.error else "-")
        moved = "-" if row.moved is None else ("yes" if row.moved else "no")
        table.add_row(
            _label(row, rows_of[row.image] > 1),
            shown,
            "yes" if row.pinned else "no",
            row.rewritten_to or "-",
            tag_now,
            moved,
        )
    console.print(table)
    for row in report.images:
        if row.error:
            console.print(f"{_label(row, rows_of[row.image] > 1)}: {row.error}")
    summary = ", ".join(f"{key} {value}" for key, value in report.summary().items())
    console.print(f"summary: {summary}")
    if report.denied:
        console.print("enforce (requireDigest) would deny:")
        for line in report.denied:
            console.print(f"  {line}")
    else:
        console.print("enforce (requireDigest) would deny nothing listed here")
    for note in report.notes:
        console.print(f"note: {note}")


def _label(row: ImageRow, shared: bool) -> str:
    """The image, and when it has several rows, the credentials that tell them apart."""
    if not shared:
        return row.image
    return f"{row.image} (credentials: {', '.join(row.credentials) or 'none'})"


def write(report: Report, output: str) -> None:
    if output == "json":
        sys.stdout.buffer.write(orjson.dumps(report.as_data(), option=orjson.OPT_INDENT_2) + b"\n")
    elif output == "yaml":
        sys.stdout.write(yaml.safe_dump(report.as_data(), sort_keys=False, width=120))
    else:
        print_table(report)


# --- the command ----------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = subparsers.add_parser(
        "report",
        help="what pinhook would do to the images running in a cluster",
        description="Read every Pod, workload, KServe and Knative object of the namespaces"
        " asked for and report, per image: where it is used, whether it is pinned, what the"
        " rewrite map does to it, whether its tag resolves and to which digest, and whether the"
        " running digest moved; the summary lists what enforce (requireDigest) would deny."
        " Exit status: 0 done; 2 usage, config or cluster errors.",
    )
    where = report.add_mutually_exclusive_group()
    where.add_argument(
        "-n",
        "--namespace",
        dest="namespaces",
        action="append",
        metavar="NAMESPACE",
        help="a namespace to read (repeatable; default: the kubeconfig's namespace)",
    )
    where.add_argument("-A", "--all-namespaces", action="store_true", help="read every namespace")
    report.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig file (default: in-cluster config, else $KUBECONFIG or ~/.kube/config)",
    )
    add_config_flags(report)
    report.add_argument(
        "-o",
        "--output",
        choices=("table", "json", "yaml"),
        default="table",
        help="table (default), json or yaml",
    )


def run(args: argparse.Namespace) -> int:
    report = asyncio.run(_report(args, settings_from(args.config)))
    write(report, args.output)
    return 0


async def _report(args: argparse.Namespace, settings: Settings) -> Report:
    client = async_client(args.kubeconfig)
    try:
        namespaces = None if args.all_namespaces else (args.namespaces or [client.namespace])
        notes: list[str] = []
        secrets = await read_pull_secrets(client, namespaces, notes)
        runtime = Runtime(settings, docker_config=args.docker_config, pull_secrets=secrets)
        async with runtime:
            report = await build_report(client, runtime, namespaces)
        report.notes[:0] = notes
        return report
    except KubeError as exc:
        raise ReportError(str(exc)) from None
    finally:
        await client.close()

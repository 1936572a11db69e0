"""``pinhook pin``: the webhook's rewrite and pinning, applied to the manifests in git.

Admission-time pinning leaves git and the cluster disagreeing, and GitOps tools then report
drift on every object pinhook patched. ``pin`` runs the same pipeline over YAML files before
they reach the cluster: each document's kind is looked up in the one kind table, its image
fields are found by the same locators, planned by ``Mutator.plan`` under the same per-kind
modes and rewrite map, resolved by ``Mutator.resolve`` through the same cached resolver and
credentials, and judged by ``decide`` under the same policy. What the webhook would then find
is nothing left to do.

Edits go through ``yamlsource``: each image scalar is replaced in its own span and quoting
style, so comments, key order, anchors, indentation and document markers stay byte for byte.

The pipeline is split so that ``krm`` (the kustomize function) shares it: ``manifests`` finds
and plans the objects of a parsed source, ``settle`` resolves them, ``judge`` turns one
object's results into findings, and ``edited_text`` writes a source's findings back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, TextIO

import yaml

from .admission import AdmissionRequest
from .config import Settings, settings_from
from .decide import decide
from .errors import PinhookError
from .flags import add_config_flags
from .kube import PullSecretSource, StaticPullSecrets
from .mutate import Mutator
from .plan import Action, ImagePlan, ImageResult, InvalidImage, RequestPlan, render
from .resolve import StaticDigestResolver
from .runtime import Runtime
from .yamlsource import (
    Document,
    SourceStr,
    Span,
    YamlSourceError,
    load_documents,
    replace_strings,
    string_at,
)

# Walked in a directory; a file named on the command line is read whatever its name. JSON is
# left out of walks: a repository's other JSON files (dashboards, package.json) are no manifests.
MANIFEST_SUFFIXES: Final = (".yaml", ".yml")
DEFAULT_NAMESPACE: Final = "default"
STDIN_NAME: Final = "<stdin>"
# Objects resolving at once. Each resolves its images concurrently under its own deadline, so
# a repository of a thousand objects neither opens a thousand requests nor times out waiting.
CONCURRENT_OBJECTS: Final = 32
# Below these, a progress bar would only flicker.
PROGRESS_MIN_FILES: Final = 20
PROGRESS_MIN_IMAGES: Final = 100

# Usage, input and config errors raise PinhookError, which the CLI turns into exit status 2.
EXIT_OK: Final = 0
EXIT_FOUND: Final = 1  # --check found work, or images could not be pinned


class PinInputError(PinhookError):
    """A manifest cannot be read, is not YAML, or cannot be written back."""


class OnFailure(StrEnum):
    SKIP = "skip"  # leave what cannot be pinned as it is, pin and write the rest
    FAIL = "fail"  # write nothing, exit 1


class Outcome(StrEnum):
    PINNED = "pinned"
    REWRITTEN = "rewritten"
    ALREADY_PINNED = "already pinned"
    LEFT = "left as is"  # no digest, and nothing to do under the kind's mode
    WORK = "needs work"  # --offline: would be pinned or rewritten, not resolved
    FAILED = "failed"


# --- sources --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Source:
    """One input text: a file, or standard input (``path`` None)."""

    name: str  # as messages show it
    path: Path | None
    text: str


def read_sources(given: Sequence[str], stdin: TextIO | None = None) -> list[Source]:
    """The files named, directories walked recursively (``.yaml``/``.yml``, hidden ones left
    out), and ``-`` for standard input; each file once. Raises PinInputError."""
    sources: list[Source] = []
    seen: set[Path] = set()
    for entry in given:
        if entry == "-":
            sources.append(Source(STDIN_NAME, None, _read_stdin(stdin)))
            continue
        for path in _walk(Path(entry)):
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                sources.append(Source(str(path), path, _read_file(path)))
    return sources


def _walk(path: Path) -> Iterator[Path]:
    if not path.is_dir():
        yield path
        return
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.endswith(MANIFEST_SUFFIXES) and not name.startswith("."):
                yield Path(root, name)


def _read_file(path: Path) -> str:
    try:
        # Bytes, then decode: text mode would turn CRLF into LF and the output would differ.
        return _decode(path.read_bytes(), str(path))
    except OSError as exc:
        raise PinInputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _read_stdin(stdin: TextIO | None) -> str:
    stream = stdin or sys.stdin
    return _decode(stream.buffer.read(), STDIN_NAME)


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PinInputError(f"{name}: not UTF-8 text (byte {exc.start})") from None


# --- planning -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Manifest:
    """One Kubernetes object of a source, planned as the webhook would plan it."""

    source: Source
    root: Any  # its document, where the image pointers are looked up
    prefix: str  # the object's pointer in the document: "" or "/items/3" in a List
    obj: dict[str, Any]
    line: int
    plan: RequestPlan

    @property
    def where(self) -> str:
        return f"{self.source.name}:{self.line}"

    @property
    def title(self) -> str:
        name = metadata_field(self.obj, "name")
        return f"{self.obj['kind']}/{name}" if name else str(self.obj["kind"])

    def images(self) -> int:
        return len(self.plan.images)


def manifests(
    mutator: Mutator, source: Source, namespace: str = DEFAULT_NAMESPACE
) -> list[Manifest]:
    """Every object in ``source`` (the items of a List), each planned by ``Mutator.plan``.

    Objects without ``metadata.namespace`` are planned in ``namespace``, as ``kubectl apply``
    would create them. Raises PinInputError when the text is not YAML.
    """
    return plan_documents(mutator, source, parse(source), namespace)


def parse(source: Source) -> list[Document]:
    try:
        return load_documents(source.text)
    except YamlSourceError as exc:
        raise PinInputError(f"{source.name}: {exc}") from None


def plan_documents(
    mutator: Mutator, source: Source, documents: Sequence[Document], namespace: str
) -> list[Manifest]:
    found: list[Manifest] = []
    for document in documents:
        for prefix, obj in objects_in(document.data):
            kind = obj["kind"]
            line = kind.span.line if isinstance(kind, SourceStr) else document.line
            plan = mutator.plan(_request(obj, namespace))
            found.append(Manifest(source, document.data, prefix, obj, line, plan))
    return found


def objects_in(data: Any, prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """The Kubernetes objects of a document: itself, or the items of a ``*List`` (a v1 List,
    a ``kubectl get -o yaml`` answer, a KRM ResourceList), with their pointers."""
    if not isinstance(data, dict):
        return
    kind, items = data.get("kind"), data.get("items")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(items, list):
        for index, item in enumerate(items):
            yield from objects_in(item, f"{prefix}/items/{index}")
    elif isinstance(data.get("apiVersion"), str) and isinstance(kind, str):
        yield prefix, data


def _request(obj: dict[str, Any], namespace: str) -> AdmissionRequest:
    group = str(obj["apiVersion"]).rpartition("/")[0]
    own = metadata_field(obj, "namespace")
    return AdmissionRequest(
        api_version="admission.k8s.io/v1",
        uid="pinhook-pin",
        group=group,
        kind=str(obj["kind"]),
        operation="CREATE",
        namespace=own or namespace,
        obj=obj,
        old_obj=None,
    )


def metadata_field(obj: dict[str, Any], key: str) -> str | None:
    """``metadata.<key>`` when it is a non-empty string."""
    metadata = obj.get("metadata")
    value = metadata.get(key) if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and value else None


# --- resolving ------------------------------------------------------------------------------


async def settle(
    mutator: Mutator,
    found: Sequence[Manifest],
    *,
    advance: Callable[[], None] = lambda: None,
) -> list[list[ImageResult]]:
    """What became of each image of each manifest, in order; failures are results too.

    Every object resolves its images concurrently, ``CONCURRENT_OBJECTS`` objects at a time;
    the caching resolver's singleflight makes one registry request per distinct tag and set
    of credentials that apply (without pull secrets: one per distinct tag).
    """
    gate = asyncio.Semaphore(CONCURRENT_OBJECTS)

    async def one(manifest: Manifest) -> list[ImageResult]:
        async with gate:
            results = await mutator.resolve(manifest.plan)
        advance()
        return results

    return list(await asyncio.gather(*(one(manifest) for manifest in found)))


# --- judging --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """What became, or would become, of one image field."""

    manifest: Manifest
    pointer: str  # of the field, from the object's root
    image: str
    final: str  # what to write; the image itself when nothing changes or it failed
    outcome: Outcome
    reason: str | None = None  # why it failed or needs work
    warning: str | None = None  # what the webhook would warn about
    span: Span | None = None

    @property
    def line(self) -> int:
        return self.span.line if self.span is not None else self.manifest.line

    @property
    def where(self) -> str:
        return f"{self.manifest.source.name}:{self.line}"

    @property
    def changes(self) -> bool:
        return self.outcome in (Outcome.PINNED, Outcome.REWRITTEN)

    def describe(self) -> str:
        """Why ``--check`` lists it."""
        if self.reason is not None:
            return self.reason
        if self.outcome is Outcome.PINNED:
            return f"not pinned to a digest; pinned it is {self.final}"
        return f"a rewrite rule changes it to {self.final}"


def judge(manifest: Manifest, results: Sequence[ImageResult]) -> list[Finding]:
    """The findings of one resolved object, in field order; ``decide`` says whether the
    webhook would deny it, and each image that keeps it from being admitted then fails."""
    decision = decide(manifest.plan, results)
    denial = None if decision.outcome.allowed else decision.outcome.message
    resolved = iter(results)  # one result per valid image, in field order
    findings: list[Finding] = []
    for entry in manifest.plan.images:
        if isinstance(entry, InvalidImage):
            findings.append(_invalid(manifest, entry))
            continue
        result = next(resolved)
        finding = _resolved(manifest, result)
        if denial is not None and finding.outcome is not Outcome.FAILED and "@" not in result.final:
            finding = dataclasses.replace(
                finding, final=finding.image, outcome=Outcome.FAILED, reason=_bare(denial)
            )
        findings.append(finding)
    return findings


def judge_offline(manifest: Manifest, output: Any) -> list[Finding]:
    """The findings of one object by form only: would the webhook have work, with no registry
    asked. ``output`` is the configured output form (for what a rewrite writes)."""
    findings: list[Finding] = []
    for entry in manifest.plan.images:
        if isinstance(entry, InvalidImage):
            findings.append(_invalid(manifest, entry))
        elif entry.action is Action.KEEP:
            pinned = entry.original.digest is not None
            outcome = Outcome.ALREADY_PINNED if pinned else Outcome.LEFT
            findings.append(_finding(manifest, entry.field.pointer, entry.field.image, outcome))
        else:
            reason = _offline_reason(entry, render(entry, entry.target.digest, output))
            image = entry.field.image
            findings.append(
                _finding(manifest, entry.field.pointer, image, Outcome.WORK, reason=reason)
            )
    return findings


def _offline_reason(plan: ImagePlan, rewritten: str) -> str:
    if plan.action is Action.RESOLVE:
        moved = f"; a rewrite rule moves it to {rewritten}" if plan.rewritten else ""
        return f"not pinned to a digest{moved}"
    if plan.action is Action.VERIFY:
        return f"a rewrite rule moves its digest to {plan.target.familiar_name()}"
    return f"a rewrite rule changes it to {rewritten}"


def _resolved(manifest: Manifest, result: ImageResult) -> Finding:
    field = result.plan.field
    warning = _bare(result.warning) if result.warning else None
    if result.failure is not None:
        return _finding(
            manifest,
            field.pointer,
            field.image,
            Outcome.FAILED,
            reason=f"{result.failure} ({result.failure.reason})",
            warning=warning,
        )
    if result.final == field.image:
        outcome = Outcome.ALREADY_PINNED if "@" in field.image else Outcome.LEFT
    else:
        outcome = Outcome.PINNED if result.digest is not None else Outcome.REWRITTEN
    return _finding(
        manifest, field.pointer, field.image, outcome, final=result.final, warning=warning
    )


def _invalid(manifest: Manifest, entry: InvalidImage) -> Finding:
    field, reason = entry.field, f"invalid reference: {entry.error}"
    return _finding(manifest, field.pointer, field.image, Outcome.FAILED, reason=reason)


def _finding(
    manifest: Manifest,
    pointer: str,
    image: str,
    outcome: Outcome,
    *,
    final: str | None = None,
    reason: str | None = None,
    warning: str | None = None,
) -> Finding:
    scalar = string_at(manifest.root, manifest.prefix + pointer)
    span = scalar.span if scalar is not None else None
    return Finding(manifest, pointer, image, final or image, outcome, reason, warning, span)


def _bare(message: str) -> str:
    return message.removeprefix("pinhook: ")


# --- writing --------------------------------------------------------------------------------


def edited_text(source: Source, findings: Sequence[Finding]) -> str:
    """``source`` with the final image of every changed finding written into its span.

    One span reached through an anchor and its aliases must come out the same everywhere;
    raises PinInputError when it would not.
    """
    edits: dict[Span, str] = {}
    for finding in findings:
        if not finding.changes:
            continue
        if finding.span is None:
            raise PinInputError(f"{finding.where}: {finding.image} has no place in the text")
        known = edits.setdefault(finding.span, finding.final)
        if known != finding.final:
            raise PinInputError(
                f"{finding.where}: an anchored image would become both {known} and "
                f"{finding.final}; give each use its own scalar"
            )
    return replace_strings(source.text, edits) if edits else source.text


def write_in_place(texts: dict[Path, str]) -> None:
    """Replace each file atomically; every new file is complete on disk before the first
    rename, so a failure while writing leaves all of them as they were."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in texts.items():
            staged.append((_stage(path, text), path.resolve()))
        for temporary, target in staged:
            os.replace(temporary, target)
    except OSError as exc:
        for temporary, _ in staged:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise PinInputError(f"cannot write {exc.filename or 'a file'}: {exc.strerror}") from None


def _stage(path: Path, text: str) -> str:
    target = path.resolve()  # a symlink stays a link to the edited file
    mode = stat.S_IMODE(target.stat().st_mode)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".pin"
    )
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(text.encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return temporary


def joined(texts: Sequence[str]) -> str:
    """Several sources as one YAML stream, a ``---`` between files that do not start one."""
    out: list[str] = []
    for text in texts:
        if not text.strip():
            continue
        if out and not text.lstrip().startswith("---"):
            out.append("---\n")
        out.append(text if text.endswith("\n") else text + "\n")
    return "".join(out)


# --- the command ----------------------------------------------------------------------------


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pin`` to the ``pinhook`` parser."""
    pin = subparsers.add_parser(
        "pin",
        help="rewrite and pin the images of manifests in files, directories or stdin",
        description="Rewrite and pin image references in Kubernetes YAML as the webhook would,"
        " changing nothing but the image scalars. Exit status: 0 ok; 1 --check found work, or"
        " images could not be pinned (under --on-failure fail); 2 usage, input or config error.",
    )
    pin.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        metavar="FILE|DIR|-",
        help="a manifest file, a directory (walked recursively for .yaml/.yml), or - for"
        " standard input; repeatable (default: -)",
    )
    mode = pin.add_mutually_exclusive_group()
    mode.add_argument(
        "-i", "--in-place", action="store_true", help="write the files back instead of stdout"
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="change nothing; list every image that is unpinned or would be rewritten, exit 1"
        " when there is any",
    )
    pin.add_argument(
        "--offline",
        action="store_true",
        help="with --check: judge the form only (no digest, or a rewrite rule applies), with no"
        " registry access",
    )
    pin.add_argument(
        "--on-failure",
        type=OnFailure,
        choices=list(OnFailure),
        default=OnFailure.FAIL,
        help="when an image cannot be pinned: fail (default: write nothing, exit 1) or skip"
        " (leave it as it is, pin and write the rest, exit 0)",
    )
    add_settings_flags(pin)
    pin.add_argument(
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help="namespace of objects that name none, for per-namespace policy and pull secrets"
        " (default: default)",
    )
    pin.add_argument("-q", "--quiet", action="store_true", help="no summary table on stderr")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--docker-config`` and ``--pull-secrets`` (shared with ``fn``)."""
    add_config_flags(parser)
    parser.add_argument(
        "--pull-secrets",
        type=Path,
        help="YAML of Secrets and ServiceAccounts whose imagePullSecrets apply, as in a cluster",
    )


def pull_secrets_flag(path: Path | None, namespace: str) -> StaticPullSecrets | None:
    if path is None:
        return None
    text = _read_file(path)
    try:
        objects = [o for o in yaml.safe_load_all(text) if isinstance(o, dict)]
    except yaml.YAMLError as exc:
        raise PinInputError(f"{path}: not valid YAML: {exc}") from None
    return StaticPullSecrets.from_manifests(objects, default_namespace=namespace)


def run(args: argparse.Namespace) -> int:
    """``pinhook pin``; raises PinhookError subclasses (exit 2) for usage and input errors."""
    files: list[str] = args.files or ["-"]
    if args.offline and not args.check:
        raise PinInputError("--offline goes with --check: pinning needs the registry")
    if args.in_place and "-" in files:
        raise PinInputError("-i cannot write standard input back; leave out -i to get stdout")
    if files == ["-"] and sys.stdin.isatty():
        raise PinInputError("no input: give -f FILE|DIR, or pipe manifests to standard input")
    settings = settings_from(args.config)
    secrets = pull_secrets_flag(args.pull_secrets, args.namespace)
    sources = read_sources(files)
    return asyncio.run(_pin(args, settings, secrets, sources))


async def _pin(
    args: argparse.Namespace,
    settings: Settings,
    secrets: PullSecretSource | None,
    sources: list[Source],
) -> int:
    if args.check and args.offline:
        mutator = Mutator(settings, StaticDigestResolver({}))
        found = [m for source in sources for m in manifests(mutator, source, args.namespace)]
        findings = [f for m in found for f in judge_offline(m, settings.output)]
    else:
        runtime = Runtime(settings, docker_config=args.docker_config, pull_secrets=secrets)
        async with runtime:
            mutator = runtime.mutator
            found = [m for source in sources for m in manifests(mutator, source, args.namespace)]
            with progress_bar(sources, found) as advance:
                settled = await settle(mutator, found, advance=advance)
        findings = [f for m, r in zip(found, settled, strict=True) for f in judge(m, r)]
    report = Report(sources, found, findings)
    report.print_warnings()
    code = _check(report) if args.check else _write(args, report)
    if not args.quiet:
        report.print_summary()
    return code


def _check(report: Report) -> int:
    work = report.work()
    for finding in work:
        print(f"{finding.where}: {finding.image}: {finding.describe()}")
    sys.stdout.flush()
    return EXIT_FOUND if work else EXIT_OK


def _write(args: argparse.Namespace, report: Report) -> int:
    failed = report.failed()
    skip = args.on_failure is OnFailure.SKIP
    for finding in failed:
        what = "left unpinned" if skip else "cannot pin"
        _err(
            f"{finding.where}: {what}: {finding.image} ({finding.manifest.title}): {finding.reason}"
        )
    if failed and not skip:
        _err(f"{len(failed)} image(s) could not be pinned; nothing was written")
        return EXIT_FOUND
    texts = {source: edited_text(source, report.of(source)) for source in report.sources}
    if args.in_place:
        write_in_place(
            {s.path: text for s, text in texts.items() if s.path is not None and text != s.text}
        )
    else:
        sys.stdout.buffer.write(joined(list(texts.values())).encode("utf-8"))
        sys.stdout.flush()
    return EXIT_OK


def _err(message: str) -> None:
    print(f"pinhook: {message}", file=sys.stderr, flush=True)


class Report:
    """The findings of a run, by source, with the warnings and the summary table."""

    def __init__(
        self,
        sources: Sequence[Source],
        found: Sequence[Manifest],
        findings: Sequence[Finding],
    ) -> None:
        self.sources = list(sources)
        self.manifests = list(found)
        self.findings = list(findings)
        self._by_source: dict[int, list[Finding]] = {}
        for finding in findings:
            self._by_source.setdefault(id(finding.manifest.source), []).append(finding)

    def of(self, source: Source) -> list[Finding]:
        return self._by_source.get(id(source), [])

    def failed(self) -> list[Finding]:
        return [f for f in self.findings if f.outcome is Outcome.FAILED]

    def work(self) -> list[Finding]:
        """What ``--check`` lists: images the webhook would change, or could not pin, in the
        order of the files and lines they are on."""
        order = {id(source): index for index, source in enumerate(self.sources)}
        work = [f for f in self.findings if f.outcome in _WORK]
        return sorted(work, key=lambda f: (order[id(f.manifest.source)], f.line))

    def counts(self) -> dict[Outcome, int]:
        counts = dict.fromkeys(Outcome, 0)
        for finding in self.findings:
            counts[finding.outcome] += 1
        return counts

    def print_warnings(self) -> None:
        """What the webhook would warn about: fields it cannot read, digests a rule moved."""
        for manifest in self.manifests:
            for warning in manifest.plan.warnings:
                _err(f"{manifest.where}: warning: {_bare(warning)}")
        for finding in self.findings:
            if finding.warning:
                _err(f"{finding.where}: warning: {finding.warning}")

    def print_summary(self, stream: TextIO | None = None) -> None:
        """A table of how many files and images, and what became of the images, on stderr."""
        from rich import box
        from rich.console import Console
        from rich.table import Table

        counts = self.counts()
        table = Table(title="pinhook pin", title_justify="left", box=box.SIMPLE, show_header=False)
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_row("files", str(len(self.sources)))
        table.add_row("images", str(len(self.findings)))
        for outcome in Outcome:
            if counts[outcome] or outcome in _ALWAYS_SHOWN:
                table.add_row(str(outcome), str(counts[outcome]))
        Console(file=stream or sys.stderr, highlight=False).print(table)


_WORK: Final = frozenset({Outcome.PINNED, Outcome.REWRITTEN, Outcome.WORK, Outcome.FAILED})
_ALWAYS_SHOWN: Final = frozenset({Outcome.ALREADY_PINNED, Outcome.FAILED})


@contextlib.contextmanager
def progress_bar(
    sources: Sequence[Source], found: Sequence[Manifest]
) -> Iterator[Callable[[], None]]:
    """A rich progress bar on a terminal's stderr over the objects resolving, when there are
    many; a no-op otherwise."""
    images = sum(manifest.images() for manifest in found)
    many = len(sources) >= PROGRESS_MIN_FILES or images >= PROGRESS_MIN_IMAGES
    if not (many and sys.stderr.isatty()):
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task(f"pinning {images} images", total=len(found))
        yield lambda: bar.advance(task)

"""``pinhook fn``: ``pinhook pin`` as a KRM function, for kustomize (exec functions) and kpt.

The orchestrator writes a ``ResourceList`` (config.kubernetes.io/v1) to standard input; the
function pins the images of its ``items`` with the same pipeline as ``pin`` and writes the
list back to standard output, edited in place like a file (every byte but the image scalars
kept). What cannot be pinned goes to ``results``, one entry per image with its
``resourceRef`` and ``field``, as the KRM functions specification asks, and to stderr, which
kustomize passes through. Under ``onFailure: fail`` (the default) such a result is an error,
the items are written back unchanged and the exit status is 1, so the build stops; under
``skip`` it is a warning and the rest is pinned.

``functionConfig`` is a ConfigMap shaped like pinhook's own: ``data["config.yaml"]`` holds the
settings document, and ``data.onFailure`` is ``skip`` or ``fail``. Both are optional; without
them the ``--config`` and ``--on-failure`` flags apply (an exec function's wrapper script can
pass flags, such as ``--docker-config``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
import yaml

from .config import Settings, load_settings, settings_from
from .errors import ConfigError
from .kube import PullSecretSource
from .pin import (
    DEFAULT_NAMESPACE,
    EXIT_FOUND,
    EXIT_OK,
    Finding,
    Manifest,
    OnFailure,
    Outcome,
    PinInputError,
    Source,
    add_settings_flags,
    edited_text,
    judge,
    metadata_field,
    parse,
    plan_documents,
    pull_secrets_flag,
    settle,
)
from .runtime import Runtime
from .yamlsource import Document

SOURCE_NAME: Final = "<ResourceList>"
SETTINGS_KEY: Final = "config.yaml"
ON_FAILURE_KEY: Final = "onFailure"
# Where kpt and kustomize record the file an item came from, newest spelling first.
PATH_ANNOTATIONS: Final = ("internal.config.kubernetes.io/path", "config.kubernetes.io/path")
INDEX_ANNOTATIONS: Final = ("internal.config.kubernetes.io/index", "config.kubernetes.io/index")


@dataclass(frozen=True, slots=True)
class FunctionOptions:
    settings: Settings
    on_failure: OnFailure


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fn`` to the ``pinhook`` parser."""
    fn = subparsers.add_parser(
        "fn",
        help="KRM function: pin the images of a ResourceList on stdin (kustomize, kpt)",
        description="Read a KRM ResourceList on standard input, pin the images of its items and"
        " write it to standard output; failures go to its results. functionConfig: a"
        " ConfigMap with data['config.yaml'] (settings) and data.onFailure (skip|fail).",
    )
    add_settings_flags(fn)
    fn.add_argument(
        "--on-failure",
        type=OnFailure,
        choices=list(OnFailure),
        default=OnFailure.FAIL,
        help="unless functionConfig sets data.onFailure: fail (default) or skip",
    )
    fn.add_argument(
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help="namespace of items that name none (default: default)",
    )


def run(args: argparse.Namespace) -> int:
    """``pinhook fn``; raises PinhookError subclasses (exit 2) for input and config errors."""
    source = Source(SOURCE_NAME, None, _stdin_text())
    documents = parse(source)
    if len(documents) != 1 or not _is_list(documents[0].data):
        raise PinInputError("standard input is not one ResourceList (a List with items)")
    root: dict[str, Any] = documents[0].data
    options = function_options(root.get("functionConfig"), args)
    secrets = pull_secrets_flag(args.pull_secrets, args.namespace)
    output, failed = asyncio.run(_pin(args, source, documents, options, secrets))
    sys.stdout.buffer.write(output.encode("utf-8"))
    sys.stdout.flush()
    return EXIT_FOUND if failed else EXIT_OK


def _stdin_text() -> str:
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PinInputError(f"{SOURCE_NAME}: not UTF-8 (byte {exc.start})") from None


def _is_list(data: Any) -> bool:
    kind = data.get("kind") if isinstance(data, dict) else None
    return isinstance(kind, str) and kind.endswith("List") and isinstance(data.get("items"), list)


def function_options(config: Any, args: argparse.Namespace) -> FunctionOptions:
    """Settings and failure policy from ``functionConfig``, falling back to the flags."""
    if config is None:
        return FunctionOptions(settings_from(args.config), args.on_failure)
    if not isinstance(config, dict) or config.get("kind") != "ConfigMap":
        raise ConfigError("functionConfig must be a ConfigMap (data: config.yaml, onFailure)")
    data = config.get("data") or {}
    if not isinstance(data, dict):
        raise ConfigError("functionConfig: data must be a mapping")
    unknown = sorted(set(data) - {SETTINGS_KEY, ON_FAILURE_KEY})
    if unknown:
        raise ConfigError(
            f"functionConfig: unknown data key {unknown[0]!r}; known: config.yaml, onFailure"
        )
    text = data.get(SETTINGS_KEY)
    settings = (
        settings_from(args.config)
        if text is None
        else load_settings(str(text), source=f"functionConfig data[{SETTINGS_KEY!r}]")
    )
    return FunctionOptions(settings, _on_failure(data.get(ON_FAILURE_KEY), args.on_failure))


def _on_failure(value: Any, default: OnFailure) -> OnFailure:
    if value is None:
        return default
    try:
        return OnFailure(str(value))
    except ValueError:
        raise ConfigError(
            f"functionConfig: data.onFailure must be skip or fail, got {value!r}"
        ) from None


async def _pin(
    args: argparse.Namespace,
    source: Source,
    documents: list[Document],
    options: FunctionOptions,
    secrets: PullSecretSource | None,
) -> tuple[str, bool]:
    runtime = Runtime(options.settings, docker_config=args.docker_config, pull_secrets=secrets)
    async with runtime:
        mutator = runtime.mutator
        found = plan_documents(mutator, source, documents, args.namespace)
        settled = await settle(mutator, found)
    findings = [f for m, r in zip(found, settled, strict=True) for f in judge(m, r)]
    fail = options.on_failure is OnFailure.FAIL
    failed = [f for f in findings if f.outcome is Outcome.FAILED]
    results = [failure_result(f, "error" if fail else "warning") for f in failed]
    results += warning_results(found, findings)
    for result in results:
        print(f"pinhook: {result['severity']}: {result['message']}", file=sys.stderr, flush=True)
    stop = bool(failed) and fail
    text = source.text if stop else edited_text(source, findings)
    return with_results(text, results), stop


# --- results --------------------------------------------------------------------------------


def failure_result(finding: Finding, severity: str) -> dict[str, Any]:
    """One ``results`` entry, in the shape of kustomize's framework.Result."""
    verb = "cannot pin" if severity == "error" else "left unpinned"
    return _result(finding.manifest, f"{verb} {finding.image}: {finding.reason}", severity, finding)


def warning_results(found: Sequence[Manifest], findings: Sequence[Finding]) -> list[dict[str, Any]]:
    """What the webhook would warn about, as warnings."""
    results = [
        _result(manifest, warning.removeprefix("pinhook: "), "warning")
        for manifest in found
        for warning in manifest.plan.warnings
    ]
    results += [_result(f.manifest, f.warning, "warning", f) for f in findings if f.warning]
    return results


def _result(
    manifest: Manifest, message: str, severity: str, finding: Finding | None = None
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "message": message,
        "severity": severity,
        "resourceRef": _resource_ref(manifest.obj),
    }
    if finding is not None:
        path = field_path(finding.pointer)
        result["field"] = {"path": path, "currentValue": str(finding.image)}
    file = _file_of(manifest.obj)
    if file:
        result["file"] = file
    return result


def _resource_ref(obj: dict[str, Any]) -> dict[str, str]:
    ref = {"apiVersion": str(obj["apiVersion"]), "kind": str(obj["kind"])}
    for key in ("name", "namespace"):
        value = metadata_field(obj, key)
        if value is not None:
            ref[key] = str(value)  # a plain str: the YAML dumper refuses SourceStr
    return ref


def _file_of(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    if not isinstance(annotations, dict):
        return {}
    path = next((annotations[k] for k in PATH_ANNOTATIONS if k in annotations), None)
    if not isinstance(path, str):
        return {}
    index = next((annotations[k] for k in INDEX_ANNOTATIONS if k in annotations), None)
    file: dict[str, Any] = {"path": str(path)}
    if isinstance(index, str) and index.isdigit():
        file["index"] = int(index)
    return file


def field_path(pointer: str) -> str:
    """A JSON pointer as a KRM field path: ``/spec/containers/0/image`` is
    ``spec.containers[0].image``."""
    path = ""
    for token in pointer.split("/")[1:]:
        key = token.replace("~1", "/").replace("~0", "~")
        path += f"[{key}]" if key.isdigit() else (f".{key}" if path else key)
    return path


# --- output ---------------------------------------------------------------------------------


def with_results(text: str, results: list[dict[str, Any]]) -> str:
    """The ResourceList ``text`` with ``results`` added.

    Appended as a block at the end when that reads back as the same list plus the results (a
    block mapping, as kustomize and kpt write it, with no results yet); otherwise the whole
    list is written again, as JSON when it came as JSON.
    """
    if not results:
        return text
    original = yaml.safe_load(text)
    block = yaml.safe_dump({"results": results}, sort_keys=False, width=100)
    appended = text + ("" if text.endswith("\n") else "\n") + block
    if "results" not in original:
        try:
            if yaml.safe_load(appended) == {**original, "results": results}:
                return appended
        except yaml.YAMLError:
            pass
    merged = {**original, "results": [*(original.get("results") or []), *results]}
    if text.lstrip().startswith("{"):
        return orjson.dumps(merged, option=orjson.OPT_INDENT_2).decode() + "\n"
    return yaml.safe_dump(merged, sort_keys=False, width=100)

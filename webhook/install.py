"""``pinhook webhook-config``, ``validating-policy``, ``install`` and ``uninstall``.

``webhook-config`` prints the MutatingWebhookConfiguration for a configuration and
``validating-policy`` the ValidatingAdmissionPolicy that backs it up (the manifests under
``manifests/`` are their output); ``install`` writes them to the cluster of the current
kubeconfig with server-side apply, which is how to develop against a kind cluster with
``pinhook serve`` running on the host, and how the end-to-end suite registers pinhook.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import yaml
from lightkube import Client, KubeConfig, codecs
from lightkube.resources.admissionregistration_v1 import (
    MutatingWebhookConfiguration,
    ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding,
)

from . import certs
from .config import settings_from
from .errors import ConfigError, PinhookError
from .flags import add_config_files_flag
from .kinds import KIND_KEYS
from .kubeerrors import KubeError, KubeNotFound, KubeUnconfigured, KubeUnreachable, kube_errors
from .validatingpolicy import armed, build_validating_policy
from .webhookconfig import FAILURE_POLICIES, WebhookTarget, build_webhook_configuration

COMMANDS: Final = ("webhook-config", "validating-policy", "install", "uninstall")
FIELD_MANAGER: Final = "pinhook"
DEFAULT_NAME: Final = "pinhook"
SERVICE_PORT: Final = 443
SERVICE_PATH: Final = "/mutate"

_NOTES: Final = """\
# Do not edit by hand: change the configuration, webhook/kinds.py or webhook/webhookconfig.py and
# run the command above again (tests/test_webhookconfig.py fails when a checked-in copy and the
# generator differ).
#
# One webhook per kind pinhook acts on, each with its own matchConditions (Kubernetes 1.28+):
# the API server skips pinhook for an object whose images are all pinned to a digest and match
# no rewrite rule, or that is annotated pinhook.dev/skip: "true" where that is honoured (not
# where requireDigest applies, by default). They are computed from the rewrite rules and the
# policy; a self-managed pinhook (the base) rewrites them in its own configuration at start
# and whenever it accepts a new config. Otherwise, regenerate after changing `rewrites` or the
# policy, and in any case after changing `kinds`: which webhooks exist is fixed here.
# Workload templates (Deployments, Jobs, ...) are left out unless `kinds` turns them on, and
# ReplicaSets above all: the Deployment controller finds its ReplicaSet by comparing pod
# templates, so one whose template pinhook changed is replaced by a new one, forever.
# failurePolicy Ignore fails open: an unreachable pinhook admits images unpinned rather than
# blocking every Pod in the cluster (the enforce component switches to Fail). The
# namespaceSelector keeps pinhook's own namespace, kube-system and `excludedNamespaces` out by
# name, so pinhook can always start its own Pods; no label a namespace's owner sets opts out.
"""
_POLICY_NOTES: Final = """\
# Do not edit by hand: change the configuration, webhook/kinds.py or webhook/validatingpolicy.py
# and run the command above again (tests/test_webhookconfig.py fails when a checked-in copy and
# the generator differ).
#
# The backstop of a digest-only policy (Kubernetes 1.30+): every image field of every kind in
# `pin` mode must end in a valid digest, in the namespaces where requireDigest applies, whether
# or not pinhook was called. It runs after every mutating webhook, so with pinhook up it finds
# the images pinned already; it denies what pinhook did not pin (pinhook down, its webhook
# failing open or deleted). On UPDATE an image the object already had passes, so objects
# stored before it can still be changed otherwise. pinhook's own namespace and kube-system are
# never checked. A self-managed pinhook patches the policy to the config it serves; otherwise
# regenerate after changing `kinds`, `requireDigest`, `namespaces` or `excludedNamespaces`.
"""


class InstallError(PinhookError):
    """The webhook configuration could not be written to or deleted from the cluster."""


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``webhook-config``, ``install`` and ``uninstall`` to the ``pinhook`` parser."""
    show = subparsers.add_parser(
        "webhook-config", help="print the MutatingWebhookConfiguration for a configuration"
    )
    _target_flags(show, required=False)
    _shape_flags(show)
    show.add_argument(
        "--kind",
        action="append",
        choices=sorted(KIND_KEYS),
        metavar="KIND",
        help="only the webhook of this kind (repeatable): a patch adding them to another",
    )

    policy = subparsers.add_parser(
        "validating-policy",
        help="print the ValidatingAdmissionPolicy (and binding) that backs up requireDigest",
    )
    add_config_files_flag(policy)
    _name_flag(policy)
    policy.add_argument(
        "--namespace",
        default="pinhook-system",
        help="pinhook's own namespace, never checked (default: pinhook-system)",
    )

    install_parser = subparsers.add_parser(
        "install", help="write the MutatingWebhookConfiguration to the cluster ($KUBECONFIG)"
    )
    _target_flags(install_parser, required=True)
    _shape_flags(install_parser)
    install_parser.add_argument(
        "--validating-policy",
        action="store_true",
        help="also the ValidatingAdmissionPolicy and its binding, under the same name",
    )
    _kubeconfig_flag(install_parser)

    remove = subparsers.add_parser(
        "uninstall",
        help="delete pinhook's MutatingWebhookConfiguration, and its ValidatingAdmissionPolicy"
        " and binding if there are",
    )
    remove.add_argument(
        "--name", default=DEFAULT_NAME, help="configuration name (default: pinhook)"
    )
    _kubeconfig_flag(remove)


def _target_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    target = parser.add_mutually_exclusive_group(required=required)
    target.add_argument(
        "--url",
        type=_https_url,
        help="where the API server calls pinhook: https://HOST:PORT/mutate",
    )
    target.add_argument(
        "--service",
        type=_service,
        metavar="NAMESPACE/NAME",
        help=f"an in-cluster Service, port {SERVICE_PORT}, path {SERVICE_PATH}"
        " (webhook-config default: pinhook-system/pinhook)",
    )
    parser.add_argument(
        "--ca", type=Path, help="PEM file of the CA that signed pinhook's serving certificate"
    )


def _name_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name", default=DEFAULT_NAME, help="configuration name (default: pinhook)"
    )


def _shape_flags(parser: argparse.ArgumentParser) -> None:
    add_config_files_flag(parser)
    _name_flag(parser)
    parser.add_argument(
        "--failure-policy",
        choices=FAILURE_POLICIES,
        default="Ignore",
        help="what the API server does when pinhook does not answer (default: Ignore, admit)",
    )
    parser.add_argument(
        "--no-match-conditions",
        dest="match_conditions",
        action="store_false",
        help="for clusters older than Kubernetes 1.28: send every matching object to pinhook",
    )


def _kubeconfig_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kubeconfig", type=Path, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
    )


def _https_url(text: str) -> str:
    if not text.startswith("https://"):
        raise argparse.ArgumentTypeError("the API server calls webhooks over https:// only")
    return text


def _service(text: str) -> tuple[str, str, int, str]:
    namespace, slash, name = text.partition("/")
    if not (namespace and slash and name) or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/NAME, got {text!r}")
    return namespace, name, SERVICE_PORT, SERVICE_PATH


def run(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`; raises PinhookError subclasses with a message for people."""
    match args.command:
        case "webhook-config":
            sys.stdout.write(render(_configuration(args), command=_command_line(args)))
            return 0
        case "validating-policy":
            documents = _policy(args, args.namespace)
            if not armed(documents[0]):
                print(
                    "pinhook: warning: requireDigest applies nowhere or no kind is pinned:"
                    " this policy denies nothing",
                    file=sys.stderr,
                )
            sys.stdout.write(render_policy(documents, command=_policy_command_line(args)))
            return 0
        case "install":
            configuration = _configuration(args)
            install(configuration, kubeconfig=args.kubeconfig)
            count = len(configuration["webhooks"])
            where = args.url or "service {}/{}".format(*args.service)
            print(
                f"installed MutatingWebhookConfiguration {args.name} ({count} webhooks) -> {where}"
            )
            if args.validating_policy:
                namespace = None if args.url else args.service[0]
                for document in _policy(args, namespace):
                    install(document, kubeconfig=args.kubeconfig)
                print(f"installed ValidatingAdmissionPolicy {args.name} and its binding")
            return 0
        case "uninstall":
            for kind, deleted in uninstall(args.name, kubeconfig=args.kubeconfig):
                print(f"deleted {kind} {args.name}" if deleted else f"{kind} {args.name}: none")
            return 0
    raise AssertionError(args.command)


def _policy(args: argparse.Namespace, namespace: str | None) -> list[dict[str, Any]]:
    return build_validating_policy(
        settings_from(args.config), name=args.name, own_namespace=namespace
    )


def _configuration(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_from(args.config)
    if args.url is not None and args.ca is None:
        print(
            "warning: --url without --ca: the configuration gets no caBundle, so the API server"
            " will not trust pinhook's certificate unless a public CA signed it or a"
            " self-managed pinhook sets the caBundle",
            file=sys.stderr,
        )
    ca_bundle = certs.ca_bundle_b64(_read(args.ca)) if args.ca else None
    if args.url is not None:
        target = WebhookTarget(url=args.url, service=None, ca_bundle=ca_bundle)
    else:
        service = args.service or _service("pinhook-system/pinhook")
        target = WebhookTarget(service=service, ca_bundle=ca_bundle)
    return build_webhook_configuration(
        settings,
        target,
        name=args.name,
        failure_policy=args.failure_policy,
        match_conditions=args.match_conditions,
        kinds=getattr(args, "kind", None),
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read", [str(exc)]) from None


def _command_line(args: argparse.Namespace) -> str:
    """The canonical command that prints this configuration, for the generated header."""
    words = ["pinhook", "webhook-config"]
    if args.url is not None:
        words += ["--url", args.url]
    else:
        namespace, name, _, _ = args.service or _service("pinhook-system/pinhook")
        words += ["--service", f"{namespace}/{name}"]
    if args.ca is not None:
        words += ["--ca", str(args.ca)]
    words += _repeated("--config", args.config)
    words += _repeated("--kind", args.kind)
    if args.name != DEFAULT_NAME:
        words += ["--name", args.name]
    if args.failure_policy != "Ignore":
        words += ["--failure-policy", args.failure_policy]
    if not args.match_conditions:
        words.append("--no-match-conditions")
    return shlex.join(words)


def _policy_command_line(args: argparse.Namespace) -> str:
    words = ["pinhook", "validating-policy", *_repeated("--config", args.config)]
    if args.name != DEFAULT_NAME:
        words += ["--name", args.name]
    if args.namespace != "pinhook-system":
        words += ["--namespace", args.namespace]
    return shlex.join(words)


def _repeated(flag: str, values: list[Any] | None) -> list[str]:
    return [word for value in values or () for word in (flag, str(value))]


def render(configuration: dict[str, Any], *, command: str) -> str:
    """YAML of the configuration under a header naming the command that generated it."""
    return f"# Generated by: {command}\n{_NOTES}{_yaml(configuration)}"


def render_policy(documents: list[dict[str, Any]], *, command: str) -> str:
    """YAML of the policy and its binding under a header naming the command."""
    body = "---\n".join(_yaml(document) for document in documents)
    return f"# Generated by: {command}\n{_POLICY_NOTES}{body}"


def _yaml(document: dict[str, Any]) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)


class _Dumper(yaml.SafeDumper):
    """Kubernetes-style YAML: indented lists, no anchors, CEL expressions as literal blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


# --- the cluster --------------------------------------------------------------------------


def install(configuration: dict[str, Any], *, kubeconfig: Path | None = None) -> None:
    """Server-side apply of one object (the webhook configuration, the policy or its binding),
    owning every field it sets (force)."""
    resource = codecs.from_dict(configuration)
    what = f"cannot apply {configuration['kind']} {configuration['metadata']['name']}"
    with _cluster(kubeconfig, what) as client:
        client.apply(resource, field_manager=FIELD_MANAGER, force=True)


_INSTALLED: Final = (
    MutatingWebhookConfiguration,
    ValidatingAdmissionPolicyBinding,
    ValidatingAdmissionPolicy,
)


def uninstall(name: str, *, kubeconfig: Path | None = None) -> list[tuple[str, bool]]:
    """Delete the webhook configuration, policy binding and policy named ``name``: each kind
    with whether there was one to delete."""
    deleted: list[tuple[str, bool]] = []
    with _cluster(kubeconfig, f"cannot delete pinhook's {name}") as client:
        for resource in _INSTALLED:
            what = f"cannot delete {resource.__name__} {name}"
            try:
                with kube_errors(what):
                    client.delete(resource, name)
            except KubeNotFound:
                deleted.append((resource.__name__, False))
            else:
                deleted.append((resource.__name__, True))
    return deleted


@contextmanager
def _cluster(kubeconfig: Path | None, what: str) -> Iterator[Client]:
    """A lightkube Client for the kubeconfig, closed afterwards; an InstallError saying what
    went wrong when it fails (lightkube reads parts of the kubeconfig only when it first sends
    a request, so a missing one may show at any call)."""
    try:
        with kube_errors(what):
            config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
            client = Client(config=config, field_manager=FIELD_MANAGER)
            try:
                yield client
            finally:
                client.close()
    except KubeUnconfigured as exc:
        raise InstallError(
            f"no usable kubeconfig ({exc.detail}): set KUBECONFIG or pass --kubeconfig"
        ) from None
    except KubeUnreachable as exc:
        raise InstallError(f"cannot reach the API server: {exc.detail}") from None
    except KubeError as exc:
        raise InstallError(str(exc)) from None

"""``pinhook webhook-config``, ``pinhook install`` and ``pinhook uninstall``.

``webhook-config`` prints the MutatingWebhookConfiguration for a configuration (the manifests
under ``manifests/`` are its output); ``install`` writes it to the cluster of the current
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
from lightkube.resources.admissionregistration_v1 import MutatingWebhookConfiguration

from . import certs
from .config import default_settings, load_settings_file
from .errors import ConfigError, PinhookError
from .kubeerrors import KubeError, KubeNotFound, KubeUnconfigured, KubeUnreachable, kube_errors
from .webhookconfig import FAILURE_POLICIES, WebhookTarget, build_webhook_configuration

COMMANDS: Final = ("webhook-config", "install", "uninstall")
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
# no rewrite rule, or that is annotated pinhook.dev/skip: "true". They are computed from the
# rewrite rules; a self-managed pinhook (the base) rewrites them in its own configuration at
# start and whenever it accepts a new config. Otherwise, regenerate after changing `rewrites`,
# and in any case after changing `kinds`: which webhooks exist is fixed here.
# Workload templates (Deployments, Jobs, ...) are left out unless `kinds` turns them on, and
# ReplicaSets above all: the Deployment controller finds its ReplicaSet by comparing pod
# templates, so one whose template pinhook changed is replaced by a new one, forever.
# failurePolicy Ignore fails open: an unreachable pinhook admits images unpinned rather than
# blocking every Pod in the cluster (the enforce overlay switches to Fail). The
# namespaceSelector keeps pinhook's own namespace and kube-system out, so pinhook can always
# start its own Pods, and any namespace labelled pinhook.dev/ignore.
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

    install_parser = subparsers.add_parser(
        "install", help="write the MutatingWebhookConfiguration to the cluster ($KUBECONFIG)"
    )
    _target_flags(install_parser, required=True)
    _shape_flags(install_parser)
    _kubeconfig_flag(install_parser)

    remove = subparsers.add_parser(
        "uninstall", help="delete pinhook's MutatingWebhookConfiguration"
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


def _shape_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="pinhook config.yaml, or a ConfigMap holding it (default: built-in)",
    )
    parser.add_argument(
        "--name", default=DEFAULT_NAME, help="configuration name (default: pinhook)"
    )
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
        case "install":
            configuration = _configuration(args)
            install(configuration, kubeconfig=args.kubeconfig)
            count = len(configuration["webhooks"])
            where = args.url or "service {}/{}".format(*args.service)
            print(
                f"installed MutatingWebhookConfiguration {args.name} ({count} webhooks) -> {where}"
            )
            return 0
        case "uninstall":
            if uninstall(args.name, kubeconfig=args.kubeconfig):
                print(f"deleted MutatingWebhookConfiguration {args.name}")
            else:
                print(f"MutatingWebhookConfiguration {args.name} was not installed")
            return 0
    raise AssertionError(args.command)


def _configuration(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings_file(args.config) if args.config else default_settings()
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
    optional: list[tuple[str, object, object]] = [
        ("--ca", args.ca, None),
        ("--config", args.config, None),
        ("--name", args.name, DEFAULT_NAME),
        ("--failure-policy", args.failure_policy, "Ignore"),
    ]
    for flag, value, default in optional:
        if value != default:
            words += [flag, str(value)]
    if not args.match_conditions:
        words.append("--no-match-conditions")
    return shlex.join(words)


def render(configuration: dict[str, Any], *, command: str) -> str:
    """YAML of the configuration under a header naming the command that generated it."""
    body = yaml.dump(configuration, Dumper=_Dumper, sort_keys=False, width=100)
    return f"# Generated by: {command}\n{_NOTES}{body}"


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
    """Server-side apply of the configuration, owning every field it sets (force)."""
    resource = codecs.from_dict(configuration)
    name = configuration["metadata"]["name"]
    with _cluster(kubeconfig, f"cannot apply MutatingWebhookConfiguration {name}") as client:
        client.apply(resource, field_manager=FIELD_MANAGER, force=True)


def uninstall(name: str, *, kubeconfig: Path | None = None) -> bool:
    """Delete the configuration; False when there was none."""
    what = f"cannot delete MutatingWebhookConfiguration {name}"
    with _cluster(kubeconfig, what) as client:
        try:
            with kube_errors(what):
                client.delete(MutatingWebhookConfiguration, name)
        except KubeNotFound:
            return False
    return True


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

"""The ``pinhook`` command: ``serve`` and the offline helpers a policy author uses."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonpatch
import orjson
import yaml
from lightkube import AsyncClient

from . import certs, install, krm, pin
from .admission import AdmissionRequest, parse_review, render_response
from .conditionsync import MatchConditionsSync
from .config import Settings, default_settings, load_settings_file, warnings_for
from .errors import ConfigError, PinhookError
from .kube import KubePullSecrets, PullSecretSource, StaticPullSecrets, UnusableSecrets
from .metrics import Metrics
from .policysync import PolicySync
from .runtime import Runtime
from .selfcert import SelfManagedCertificates, SelfManagedOptions

log = logging.getLogger(__name__)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"PINHOOK_{name}", default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pinhook",
        description="Rewrite image references and pin them to digests at admission.",
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the webhook over HTTPS")
    _config_flags(serve)
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(_env("PORT", "8443") or 8443))
    serve.add_argument(
        "--cert-dir",
        type=Path,
        default=Path(_env("CERT_DIR", "certs") or "certs"),
        help="directory with tls.crt and tls.key; a self-signed pair for localhost is"
        " generated there when none exists (default: ./certs)",
    )
    serve.add_argument("--cert", type=Path, default=_path_env("CERT"), help="certificate file")
    serve.add_argument("--key", type=Path, default=_path_env("KEY"), help="private key file")
    serve.add_argument(
        "--self-managed",
        action="store_true",
        default=_env("SELF_MANAGED", "") in {"1", "true"},
        help="in a cluster: keep the serving certificate in a Secret shared by the replicas and"
        " its CA in the webhook configuration, renewing both before expiry",
    )
    serve.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "pinhook-system"),
        help="pinhook's namespace, for --self-managed (default: $POD_NAMESPACE)",
    )
    serve.add_argument("--service", default="pinhook", help="pinhook's Service name")
    serve.add_argument("--webhook-name", default="pinhook", help="its MutatingWebhookConfiguration")
    serve.add_argument(
        "--cert-dns-name",
        action="append",
        default=[],
        metavar="NAME",
        help="with --self-managed: a DNS name the certificate covers besides the Service's"
        " (repeatable)",
    )
    serve.add_argument(
        "--cert-ip",
        action="append",
        default=[],
        metavar="IP",
        help="with --self-managed: an IP address the certificate covers, for an API server that"
        " calls a URL such as https://127.0.0.1:8443/mutate (repeatable)",
    )
    serve.add_argument(
        "--kube",
        choices=("auto", "on", "off"),
        default=_env("KUBE", "auto"),
        help="read pull secrets and ServiceAccounts through the Kubernetes API"
        " (auto: when running in a cluster)",
    )

    review = commands.add_parser("review", help="answer one AdmissionReview offline")
    _config_flags(review)
    review.add_argument("file", help="AdmissionReview JSON file, or - for standard input")
    review.add_argument("--apply", action="store_true", help="print the patched object instead")
    review.add_argument(
        "--pull-secrets",
        type=Path,
        help="YAML of Secrets and ServiceAccounts to resolve with, as the cluster would",
    )

    resolve = commands.add_parser("resolve", help="print the rewritten, pinned form of images")
    _config_flags(resolve)
    resolve.add_argument("images", nargs="+", metavar="IMAGE")

    install.add_commands(commands)
    pin.add_commands(commands)
    krm.add_commands(commands)

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", type=Path)

    cert = commands.add_parser("certs", help="certificate helpers")
    cert_commands = cert.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    generate = cert_commands.add_parser("generate", help="write a CA and a serving certificate")
    generate.add_argument("--service", default="pinhook")
    generate.add_argument("--namespace", default="pinhook-system")
    generate.add_argument("--out", type=Path, default=Path("certs"))
    generate.add_argument("--days", type=int, default=365)
    generate.add_argument("--dns-name", action="append", default=[], help="extra DNS name")
    generate.add_argument("--ip", action="append", default=[], help="IP address SAN")
    bundle = cert_commands.add_parser("ca-bundle", help="print the base64 caBundle")
    bundle.add_argument("--ca", type=Path, default=Path("certs/ca.crt"))
    return parser


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=_path_env("CONFIG"),
        help="YAML config file, or a directory of *.yaml files merged into one (a ConfigMap"
        " volume); default: the built-in map",
    )
    parser.add_argument(
        "--docker-config",
        type=Path,
        default=_path_env("DOCKER_CONFIG_FILE"),
        help="docker config.json with registry credentials",
    )


def _path_env(name: str) -> Path | None:
    value = _env(name)
    return Path(value) if value else None


def _settings(path: Path | None) -> Settings:
    return load_settings_file(path) if path is not None else default_settings()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(_dispatch(args))
    except PinhookError as exc:
        print(f"pinhook: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    match args.command:
        case "serve":
            return _serve(args)
        case "review":
            return _review(args)
        case "resolve":
            return asyncio.run(_resolve(args))
        case "check-config":
            settings = load_settings_file(args.file)
            print(f"{args.file}: ok ({len(settings.rewrite_map)} rewrite rules)")
            for warning in warnings_for(settings):
                print(f"warning: {warning}", file=sys.stderr)
            return 0
        case "certs":
            return _certs(args)
        case "webhook-config" | "validating-policy" | "install" | "uninstall":
            return install.run(args)
        case "pin":
            return pin.run(args)
        case "fn":
            return krm.run(args)
    raise AssertionError(args.command)


def _serve(args: argparse.Namespace) -> int:
    from .server import ServeOptions, serve

    settings = _settings(args.config)
    cert, key = args.cert, args.key
    if (cert is None) != (key is None):
        print("pinhook: --cert and --key go together", file=sys.stderr)
        return 2
    background = []
    if args.self_managed:
        managed = SelfManagedOptions(
            namespace=args.namespace,
            service=args.service,
            webhook_name=args.webhook_name,
            out_dir=args.cert_dir,
            extra_dns_names=tuple(args.cert_dns_name),
            ip_addresses=tuple(args.cert_ip),
        )
        # One pass before listening, so the first handshake already has the shared
        # certificate; then the renewal loop, on the server's own event loop and client.
        paths = asyncio.run(_ensure_self_managed(managed))
        cert, key = paths.cert, paths.key
        background.append(lambda: _renew_self_managed(managed))
    elif cert is None:
        paths = certs.ensure_self_signed(args.cert_dir)
        cert, key = paths.cert, paths.key
        log.info("TLS certificate %s (CA: %s)", cert, paths.ca_cert)
    metrics = Metrics()
    runtime = Runtime(
        settings,
        config_path=args.config,
        docker_config=args.docker_config,
        pull_secrets=_pull_secrets(args.kube, metrics),
        metrics=metrics,
        # A self-managed pinhook may patch its own webhook configuration and backstop policy:
        # keep the CEL in them generated from the config it is serving.
        config_syncs=(
            [
                MatchConditionsSync(_kube_client, args.webhook_name),
                PolicySync(_kube_client, args.webhook_name, args.namespace),
            ]
            if args.self_managed
            else []
        ),
    )
    options = ServeOptions(
        host=args.host, port=args.port, cert=cert, key=key, server=settings.server
    )
    serve(runtime, options, background)
    return 0


async def _ensure_self_managed(options: SelfManagedOptions) -> certs.CertPaths:
    client = _kube_client()
    try:
        return await SelfManagedCertificates(client, options).ensure()
    finally:
        await client.close()


async def _renew_self_managed(options: SelfManagedOptions) -> None:
    client = _kube_client()
    try:
        await SelfManagedCertificates(client, options).run()
    finally:
        await client.close()


def _kube_client() -> AsyncClient:
    try:
        return AsyncClient(field_manager="pinhook")
    except Exception as exc:  # lightkube raises several kinds for a missing kubeconfig
        raise ConfigError("no Kubernetes API configuration found", [str(exc)]) from exc


def _pull_secrets(mode: str, metrics: Metrics) -> PullSecretSource | None:
    if mode == "off" or (mode == "auto" and not os.environ.get("KUBERNETES_SERVICE_HOST")):
        return None
    unusable = UnusableSecrets(metrics.pull_secret_unusable)
    return KubePullSecrets(_kube_client(), owns_client=True, unusable=unusable)


def _review(args: argparse.Namespace) -> int:
    body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    secrets = None
    if args.pull_secrets is not None:
        objects = yaml.safe_load_all(args.pull_secrets.read_text(encoding="utf-8"))
        secrets = StaticPullSecrets.from_manifests(o for o in objects if isinstance(o, dict))
    runtime = Runtime(
        _settings(args.config), docker_config=args.docker_config, pull_secrets=secrets
    )
    return asyncio.run(_answer_review(args, runtime, parse_review(body)))


async def _answer_review(
    args: argparse.Namespace, runtime: Runtime, request: AdmissionRequest
) -> int:
    async with runtime:
        outcome = await runtime.mutator.review(request)
    if not args.apply:
        sys.stdout.buffer.write(render_response(request.api_version, request.uid, outcome) + b"\n")
        return 0
    patched: Any = request.obj
    if outcome.patch:
        patched = jsonpatch.apply_patch(request.obj, outcome.patch)
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not outcome.allowed:
        print(f"denied: {outcome.message}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(orjson.dumps(patched, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


async def _resolve(args: argparse.Namespace) -> int:
    runtime = Runtime(_settings(args.config), docker_config=args.docker_config)
    async with runtime:
        results = await runtime.mutator.pin(args.images)
    failed = 0
    for result in results:
        if result.failure is not None:
            failed += 1
            print(f"{result.plan.field.image}\t{result.final}\tunpinned: {result.failure}")
        else:
            print(f"{result.plan.field.image}\t{result.final}")
    return 1 if failed else 0


def _certs(args: argparse.Namespace) -> int:
    if args.certs_command == "ca-bundle":
        print(certs.ca_bundle_b64(args.ca.read_bytes()))
        return 0
    names = [*certs.service_dns_names(args.service, args.namespace), *args.dns_name]
    paths = certs.write(certs.generate(names, args.ip, days=args.days), args.out)
    print(f"wrote {paths.ca_cert}, {paths.cert}, {paths.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

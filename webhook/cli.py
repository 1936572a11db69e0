"""The ``pinhook`` command: ``serve`` and the offline helpers a policy author uses."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, NoReturn, cast

import jsonpatch
import orjson
import yaml
from lightkube import AsyncClient

from . import certs, install, krm, logs, pin, report, version
from .admission import AdmissionRequest, parse_review, render_response
from .conditionsync import MatchConditionsSync
from .config import load_settings_file, settings_from, warnings_for
from .configfiles import config_stamp, read_text
from .errors import ConfigError, InvalidReference, PinhookError
from .flags import add_config_flags, env, path_env
from .kube import (
    KubePullSecrets,
    PullSecretSource,
    StaticPullSecrets,
    UnusableSecrets,
    async_client,
)
from .metrics import Metrics
from .mutate import Mutator
from .oci.reference import ImageRef
from .policysync import PolicySync
from .runtime import Runtime
from .selfcert import SelfManagedCertificates, SelfManagedOptions

# By module name even when run as ``python -m webhook.cli`` (``__name__`` is then "__main__").
log = logging.getLogger(__spec__.name if __spec__ is not None else __name__)

# Every environment variable pinhook reads, and the flag it stands in for.
ENVIRONMENT: Final = (
    ("PINHOOK_CONFIG", "--config"),
    ("PINHOOK_DOCKER_CONFIG_FILE", "--docker-config"),
    ("PINHOOK_LOG_LEVEL", "--log-level"),
    ("PINHOOK_LOG_FORMAT", "--log-format"),
    ("PINHOOK_LOG_HTTP_TRACE", "--log-http-trace (1 or true)"),
    ("PINHOOK_HOST", "serve --host"),
    ("PINHOOK_PORT", "serve --port"),
    ("PINHOOK_WORKERS", "serve --workers"),
    ("PINHOOK_METRICS_HOST", "serve --metrics-host"),
    ("PINHOOK_METRICS_PORT", "serve --metrics-port"),
    ("PINHOOK_CERT_DIR", "serve --cert-dir"),
    ("PINHOOK_CERT", "serve --cert"),
    ("PINHOOK_KEY", "serve --key"),
    ("PINHOOK_SELF_MANAGED", "serve --self-managed (1 or true)"),
    ("PINHOOK_KUBE", "serve --kube"),
    ("POD_NAMESPACE", "serve --namespace"),
    ("KUBECONFIG", "the kubeconfig of serve --kube, install, report (else in-cluster config)"),
)
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
EXIT_USAGE: Final = 2
# More processes than this belong in more replicas.
MAX_WORKERS: Final = 64


def _env_flag(name: str) -> bool:
    return (env(name) or "").strip().lower() in _TRUE


class _Parser(argparse.ArgumentParser):
    """argparse, saying what is wrong in one line instead of the usage and a message."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _environment_help() -> str:
    width = max(len(name) for name, _ in ENVIRONMENT)
    lines = [f"  {name.ljust(width)}  {flag}" for name, flag in ENVIRONMENT]
    return "environment variables (a flag given wins):\n" + "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pinhook",
        description="Rewrite image references and pin them to digests at admission.",
        epilog=_environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pinhook {version()}")
    _log_flags(parser, defaults=True)
    commands = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, metavar="COMMAND"),
    )

    serve = commands.add_parser("serve", help="run the webhook over HTTPS")
    _serve_flags(serve)

    review = commands.add_parser(
        "review",
        help="answer an AdmissionReview, or show what pinhook does to manifests, offline",
    )
    add_config_flags(review)
    review.add_argument(
        "file",
        nargs="?",
        help="an AdmissionReview (JSON) or manifests (YAML or JSON, several documents);"
        " - for standard input",
    )
    review.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="append",
        default=[],
        metavar="FILE",
        help="manifests or an AdmissionReview to read (repeatable; - for standard input)",
    )
    review.add_argument(
        "-o",
        "--output",
        choices=("review", "yaml", "json", "diff"),
        help="review: the AdmissionReview answer (default for a review); yaml, json: the"
        " objects as pinhook leaves them (default yaml for manifests); diff: a unified diff",
    )
    review.add_argument(
        "--apply", action="store_true", help="the same as -o json (kept for scripts)"
    )
    review.add_argument(
        "--pull-secrets",
        type=Path,
        help="YAML of Secrets and ServiceAccounts to resolve with, as the cluster would",
    )
    review.add_argument(
        "--namespace",
        default="default",
        help="namespace of manifests that name none (default: default)",
    )

    resolve = commands.add_parser("resolve", help="print the rewritten, pinned form of images")
    add_config_flags(resolve)
    resolve.add_argument("images", nargs="+", metavar="IMAGE", help="image references")
    resolve.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default="text",
        help="text: one tab-separated line per image (default); json: a list of objects",
    )

    install.add_commands(commands)
    pin.add_commands(commands)
    krm.add_commands(commands)
    report.add_commands(commands)

    check = commands.add_parser(
        "check-config", help="validate a configuration file and list the rules that apply"
    )
    check.add_argument("file", type=Path, help="config.yaml, or a ConfigMap manifest holding it")

    cert = commands.add_parser("certs", help="certificate helpers")
    cert_commands = cert.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    generate = cert_commands.add_parser("generate", help="write a CA and a serving certificate")
    generate.add_argument(
        "--service", default="pinhook", help="Service name the certificate is for"
    )
    generate.add_argument("--namespace", default="pinhook-system", help="namespace of that Service")
    generate.add_argument(
        "--out", type=Path, default=Path("certs"), help="directory to write (default: certs)"
    )
    generate.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    generate.add_argument(
        "--dns-name", action="append", default=[], help="extra DNS name (repeatable)"
    )
    generate.add_argument("--ip", action="append", default=[], help="IP address SAN (repeatable)")
    generate.add_argument(
        "--force", action="store_true", help="replace certificate files that exist"
    )
    bundle = cert_commands.add_parser("ca-bundle", help="print the base64 caBundle")
    bundle.add_argument(
        "--ca", type=Path, default=Path("certs/ca.crt"), help="CA file (default: certs/ca.crt)"
    )
    _everywhere(parser)
    return parser


def _log_flags(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The logging flags; a subcommand's copy sets nothing unless given, so that one given
    before the subcommand is not undone by the subcommand's default."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "--log-level",
        choices=logs.LEVELS,
        default=env("LOG_LEVEL", "info") if defaults else argparse.SUPPRESS,
        help="least severe level logged (default: info)",
    )
    group.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=env("LOG_FORMAT") if defaults else argparse.SUPPRESS,
        help="json (one object per line) or text (default: text on a terminal, else json)",
    )
    group.add_argument(
        "--log-http-trace",
        action="store_true",
        default=_env_flag("LOG_HTTP_TRACE") if defaults else argparse.SUPPRESS,
        help="with --log-level debug: also log the HTTP clients' connection traces",
    )


def _everywhere(parser: argparse.ArgumentParser) -> None:
    """The logging flags on every subcommand, so they work after any of them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _log_flags(sub, defaults=False)
                _everywhere(sub)


def _serve_flags(serve: argparse.ArgumentParser) -> None:
    add_config_flags(serve)
    serve.add_argument(
        "--host", default=env("HOST", "127.0.0.1"), help="address to listen on (127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=int, default=env("PORT", "8443"), help="HTTPS port (default: 8443)"
    )
    serve.add_argument(
        "--workers",
        type=_worker_count,
        default=env("WORKERS", "1"),
        help="processes answering on the port, each with its own digest cache (default: 1;"
        " see Serving in the README)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=env("METRICS_PORT"),
        help="serve Prometheus metrics over plain HTTP on this port (default: not served;"
        " the manifests use 9090)",
    )
    serve.add_argument(
        "--metrics-host",
        default=env("METRICS_HOST"),
        help="address for the metrics port (default: --host)",
    )
    serve.add_argument(
        "--cert-dir",
        type=Path,
        default=Path(env("CERT_DIR", "certs") or "certs"),
        help="directory with tls.crt and tls.key; a self-signed pair for localhost is"
        " generated there when none exists (default: ./certs)",
    )
    serve.add_argument("--cert", type=Path, default=path_env("CERT"), help="certificate file")
    serve.add_argument("--key", type=Path, default=path_env("KEY"), help="private key file")
    serve.add_argument(
        "--self-managed",
        action="store_true",
        default=_env_flag("SELF_MANAGED"),
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
        default=env("KUBE", "auto"),
        help="read pull secrets and ServiceAccounts through the Kubernetes API"
        " (auto: in a cluster, or when --kubeconfig is given)",
    )
    serve.add_argument(
        "--kubeconfig",
        type=Path,
        help="kubeconfig file for the Kubernetes API (default: in-cluster config, else"
        " $KUBECONFIG or ~/.kube/config)",
    )


def _worker_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{count}: expected 1 to {MAX_WORKERS}")
    return count


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        # Workers share stderr with each other (``serve --workers``).
        shared = getattr(args, "workers", 1) > 1
        logs.setup(args.log_level, args.log_format, http_trace=args.log_http_trace, shared=shared)
    except ValueError as exc:  # a bad PINHOOK_LOG_LEVEL or PINHOOK_LOG_FORMAT
        print(f"pinhook: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(_dispatch(args))
    except PinhookError as exc:
        return _failed(args, _describe(exc), EXIT_USAGE)
    except OSError as exc:  # a file named on the command line that cannot be read
        where = f"{exc.filename}: " if exc.filename else ""
        return _failed(args, f"{where}{exc.strerror or exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        return 130


def _describe(exc: PinhookError) -> str:
    """The error in one line, unless it lists several problems (an invalid config)."""
    if isinstance(exc, ConfigError) and len(exc.errors) <= 1:
        message = exc.message
        detail = " ".join(" ".join(exc.errors).split())
        return f"{message}: {detail}" if detail else message
    return str(exc)


def _failed(args: argparse.Namespace, message: str, code: int) -> int:
    """Report a failure once: through the log for ``serve`` (its collector reads the log), in
    plain words on stderr for the other commands."""
    if args.command == "serve":
        log.error("pinhook cannot serve: %s", message)
    else:
        print(f"pinhook: {message}", file=sys.stderr)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    match args.command:
        case "serve":
            return _serve(args)
        case "review":
            return _review(args)
        case "resolve":
            return asyncio.run(_resolve(args))
        case "check-config":
            return _check_config(args.file)
        case "certs":
            return _certs(args)
        case "webhook-config" | "validating-policy" | "install" | "uninstall":
            return install.run(args)
        case "pin":
            return pin.run(args)
        case "fn":
            return krm.run(args)
        case "report":
            return report.run(args)
    raise AssertionError(args.command)


def _check_config(path: Path) -> int:
    settings = load_settings_file(path)
    rules = settings.effective_rules
    print(f"{path}: ok ({len(rules)} rewrite rules)")
    for rule, builtin in rules:
        print(f"  {rule}{'  (built in)' if builtin else ''}")
    for warning in warnings_for(settings):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


# --- serve ----------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from .memory import freeze_imported_objects
    from .server import ServeOptions, serve, serve_workers

    frozen = freeze_imported_objects()  # before anything that may be replaced exists
    log.debug("%d objects of pinhook's modules frozen out of garbage collection", frozen)
    # Before the settings are read: a worker started again later compares its file with this.
    stamp = config_stamp(args.config) if args.config is not None else None
    settings = settings_from(args.config)
    cert, key = args.cert, args.key
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together")
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
        kubeconfig = args.kubeconfig
        # One pass before listening, so the first handshake already has the shared
        # certificate; then the renewal loop, on the server's own event loop and client.
        paths = asyncio.run(_ensure_self_managed(managed, kubeconfig))
        cert, key = paths.cert, paths.key
        background.append(lambda: _renew_self_managed(managed, kubeconfig))
    elif cert is None:
        paths = certs.ensure_self_signed(args.cert_dir)
        cert, key = paths.cert, paths.key
        log.info("TLS certificate %s (CA: %s)", cert, paths.ca_cert)

    def make_runtime(worker: int) -> Runtime:
        metrics = Metrics()
        return Runtime(
            settings,
            config_path=args.config,
            config_stamp=stamp,
            docker_config=args.docker_config,
            pull_secrets=_pull_secrets(args.kube, args.kubeconfig, metrics),
            metrics=metrics,
            # A self-managed pinhook may patch its own webhook configuration and backstop
            # policy: keep the CEL in them generated from the config it is serving (one
            # worker is enough).
            config_syncs=(
                [
                    MatchConditionsSync(lambda: _kube_client(args.kubeconfig), args.webhook_name),
                    PolicySync(
                        lambda: _kube_client(args.kubeconfig), args.webhook_name, args.namespace
                    ),
                ]
                if args.self_managed and worker == 0
                else []
            ),
        )

    options = ServeOptions(
        host=args.host,
        port=args.port,
        cert=cert,
        key=key,
        server=settings.server,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        workers=args.workers,
    )
    if options.workers == 1:
        serve(make_runtime(0), options, background)
        return 0
    return serve_workers(make_runtime, options, background)


async def _ensure_self_managed(
    options: SelfManagedOptions, kubeconfig: Path | None
) -> certs.CertPaths:
    client = _kube_client(kubeconfig)
    try:
        return await SelfManagedCertificates(client, options).ensure()
    finally:
        await client.close()


async def _renew_self_managed(options: SelfManagedOptions, kubeconfig: Path | None) -> None:
    client = _kube_client(kubeconfig)
    try:
        await SelfManagedCertificates(client, options).run()
    finally:
        await client.close()


def _kube_client(kubeconfig: Path | None = None) -> AsyncClient:
    return async_client(kubeconfig)


def _pull_secrets(mode: str, kubeconfig: Path | None, metrics: Metrics) -> PullSecretSource | None:
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if mode == "off" or (mode == "auto" and not in_cluster and kubeconfig is None):
        return None
    unusable = UnusableSecrets(metrics.pull_secret_unusable)
    return KubePullSecrets(_kube_client(kubeconfig), owns_client=True, unusable=unusable)


# --- review ---------------------------------------------------------------------------------


def _review(args: argparse.Namespace) -> int:
    given = [*([args.file] if args.file else []), *args.files]
    if not given:
        raise ConfigError("review: name a file (or - for standard input)")
    if given.count("-") > 1:
        raise ConfigError("review: standard input can be read once")
    secrets = None
    if args.pull_secrets is not None:
        objects = _yaml_documents(read_text(args.pull_secrets), str(args.pull_secrets))
        secrets = StaticPullSecrets.from_manifests(
            (o for o in objects if isinstance(o, dict)), default_namespace=args.namespace
        )
    runtime = Runtime(
        settings_from(args.config), docker_config=args.docker_config, pull_secrets=secrets
    )
    texts = [(name, _read_input(name)) for name in given]
    return asyncio.run(_answer_inputs(args, runtime, texts))


def _read_input(name: str) -> bytes:
    return sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()


def _yaml_documents(text: str, source: str) -> list[Any]:
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML", [str(exc).replace("\n", " ")]) from None


def _is_review(document: Any) -> bool:
    return isinstance(document, dict) and document.get("kind") == "AdmissionReview"


async def _answer_inputs(
    args: argparse.Namespace, runtime: Runtime, texts: list[tuple[str, bytes]]
) -> int:
    output = "json" if args.apply else args.output
    code = 0
    async with runtime:
        mutator = runtime.mutator
        for name, body in texts:
            try:
                documents = _yaml_documents(body.decode("utf-8"), name)
            except UnicodeDecodeError:
                raise ConfigError(f"{name}: not UTF-8 text") from None
            for document in documents:
                if _is_review(document):
                    request = parse_review(orjson.dumps(document))
                    code = max(code, await _show(mutator, request, output or "review", args))
                elif isinstance(document, dict):
                    request = _manifest_request(document, args.namespace)
                    code = max(code, await _show(mutator, request, output or "yaml", args))
    return code


def _manifest_request(obj: dict[str, Any], namespace: str) -> AdmissionRequest:
    """A manifest as the API server would send it on CREATE."""
    api_version = obj.get("apiVersion")
    kind = obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        raise ConfigError("review: a manifest without apiVersion and kind")
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    own = metadata.get("namespace") if isinstance(metadata, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return AdmissionRequest(
        api_version="admission.k8s.io/v1",
        uid="pinhook-review",
        group=api_version.rpartition("/")[0],
        kind=kind,
        operation="CREATE",
        namespace=own if isinstance(own, str) and own else namespace,
        obj=obj,
        old_obj=None,
        name=name if isinstance(name, str) else "",
    )


async def _show(
    mutator: Mutator, request: AdmissionRequest, output: str, args: argparse.Namespace
) -> int:
    outcome = await mutator.review(request)
    if output == "review":
        sys.stdout.buffer.write(render_response(request.api_version, request.uid, outcome) + b"\n")
        return 0
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not outcome.allowed:
        print(f"denied: {outcome.message}", file=sys.stderr)
        return 1
    patched: Any = request.obj
    if outcome.patch:
        patched = jsonpatch.apply_patch(request.obj, outcome.patch)
    if output == "json":
        sys.stdout.buffer.write(orjson.dumps(patched, option=orjson.OPT_INDENT_2) + b"\n")
    elif output == "yaml":
        sys.stdout.write("---\n" + _yaml(patched))
    else:
        title = _title(request)
        before, after = _yaml(request.obj), _yaml(patched)
        diff = difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            f"{title} (as given)",
            f"{title} (as pinhook leaves it)",
        )
        sys.stdout.writelines(diff)
    return 0


def _yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, width=100)


def _title(request: AdmissionRequest) -> str:
    where = f"{request.namespace}/" if request.namespace else ""
    return f"{request.kind} {where}{request.name or '(unnamed)'}"


# --- resolve --------------------------------------------------------------------------------


async def _resolve(args: argparse.Namespace) -> int:
    """Each image on its own: an invalid one is reported and the others still resolve."""
    runtime = Runtime(settings_from(args.config), docker_config=args.docker_config)
    rows: list[dict[str, Any]] = []
    valid: list[str] = []
    for image in args.images:
        try:
            ImageRef.parse(image)
        except InvalidReference as exc:
            rows.append(_row(image, None, None, f"invalid reference: {exc}", "invalid"))
        else:
            rows.append({})
            valid.append(image)
    async with runtime:
        results = await runtime.mutator.pin(valid) if valid else []
    answers = iter(results)
    for index, image in enumerate(args.images):
        if rows[index]:
            continue
        result = next(answers)
        failure = result.failure
        rows[index] = _row(
            image,
            result.final,
            result.digest,
            None if failure is None else str(failure),
            None if failure is None else failure.reason,
        )
    _print_rows(rows, args.output)
    return 1 if any(row["error"] for row in rows) else 0


def _row(
    image: str, final: str | None, digest: str | None, error: str | None, reason: str | None
) -> dict[str, Any]:
    return {"image": image, "final": final, "digest": digest, "error": error, "reason": reason}


def _print_rows(rows: list[dict[str, Any]], output: str) -> None:
    if output == "json":
        sys.stdout.buffer.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n")
        return
    for row in rows:
        if row["error"] is None:
            print(f"{row['image']}\t{row['final']}")
        else:
            final = row["final"] or row["image"]
            print(f"{row['image']}\t{final}\tunpinned: {row['error']}")


# --- certs ----------------------------------------------------------------------------------


def _certs(args: argparse.Namespace) -> int:
    if args.certs_command == "ca-bundle":
        print(certs.ca_bundle_b64(args.ca.read_bytes()))
        return 0
    paths = certs.cert_paths(args.out)
    existing = [p for p in (paths.ca_cert, paths.cert, paths.key) if p.exists()]
    if existing and not args.force:
        shown = ", ".join(str(p) for p in existing)
        raise ConfigError(f"{shown} exist; pass --force to replace them")
    names = [*certs.service_dns_names(args.service, args.namespace), *args.dns_name]
    paths = certs.write(certs.generate(names, args.ip, days=args.days), args.out)
    print(f"wrote {paths.ca_cert}, {paths.cert}, {paths.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

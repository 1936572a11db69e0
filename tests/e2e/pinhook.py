"""The pinhook side of the end-to-end suite: certificates, config, ``pinhook serve``, install.

pinhook runs on this machine, outside the cluster, and the API server calls it at
``https://$PINHOOK_E2E_HOST:PORT/mutate``. The test registry stays on loopback: only pinhook
talks to it (pinhook resolves digests itself, and no test Pod is ever pulled).
"""

from __future__ import annotations

import ipaddress
import os
import queue
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tests.harness.push import PushedImage

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
HOST_ENV: Final = "PINHOOK_E2E_HOST"
NO_MATCH_CONDITIONS_ENV: Final = "PINHOOK_E2E_NO_MATCH_CONDITIONS"
# A registry name that never resolves (.test is reserved): only a rewrite rule makes it work.
MOVED_PREFIX: Final = "registry.pinhook-e2e.test/moved"
START_DEADLINE_S: Final = 30.0
STOP_DEADLINE_S: Final = 15.0
CLI_TIMEOUT_S: Final = 60.0


class HostNotSet(Exception):
    """No address for the API server to reach pinhook at; the message says how to set one."""


def e2e_host() -> str:
    """The address the API server reaches this machine at; HostNotSet says how to find it."""
    host = os.environ.get(HOST_ENV, "").strip()
    if not host:
        raise HostNotSet(
            f"{HOST_ENV} is not set: the address at which the cluster's API server reaches "
            "this machine (kind on Linux: the kind network's gateway, `docker network inspect "
            "kind -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}'`, IPv4 one; Docker Desktop: "
            "host.docker.internal). See tests/e2e/README.md"
        )
    return host


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def url_host(host: str) -> str:
    return f"[{host}]" if is_ip(host) and ":" in host else host


def mutate_url(host: str, port: int) -> str:
    """Where the API server calls a pinhook listening on ``port``."""
    return f"https://{url_host(host)}:{port}/mutate"


def listen_port() -> int:
    """The port for a pinhook: PINHOOK_E2E_PORT when set (for the first one), else a free one."""
    return int(os.environ.get("PINHOOK_E2E_PORT") or free_port())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))  # the port pinhook will listen on, on every address
        port: int = sock.getsockname()[1]
        return port


def pinhook_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``pinhook ARGS`` as the user runs it; KUBECONFIG comes from the environment."""
    return subprocess.run(
        [sys.executable, "-m", "webhook.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def _ok(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        raise AssertionError(
            f"{what} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result.stdout


def generate_certs(out: Path, host: str) -> Path:
    """A CA and a serving certificate for ``host``; returns the CA file."""
    san = ["--ip", host] if is_ip(host) else ["--dns-name", host]
    _ok(pinhook_cli("certs", "generate", "--out", str(out), *san), "pinhook certs generate")
    return out / "ca.crt"


def config_text(
    registry_host: str,
    *,
    more_hosts: Sequence[str] = (),
    timeout_seconds: float = 5,
    enforce: bool = False,
    more_rules: Sequence[tuple[str, str]] = (),
    require_digest_in: Sequence[str] = (),
    audit_in: Sequence[str] = (),
) -> str:
    """Resolve at the loopback test registry; move MOVED_PREFIX there.

    ``excludedNamespaces: []`` so that pinhook itself would pin in pinhook-system: a tag kept
    there then proves that the API server never called it (the namespaceSelector), not that
    pinhook chose to do nothing. ``more_hosts`` are further loopback registries pinhook may
    reach; ``enforce`` is the enforce component's policy (requireDigest, onFailure deny);
    ``require_digest_in`` sets requireDigest in those namespaces only; ``audit_in`` sets it
    in those too, in audit mode (which never denies).
    """
    hosts = ", ".join(f'"{host}"' for host in (registry_host, *more_hosts))
    rules = [(f"{MOVED_PREFIX}/", f"{registry_host}/e2e"), *more_rules]
    policy = "requireDigest: true\nonFailure: deny\n" if enforce else ""
    overrides = [f"{name}: {{requireDigest: true}}" for name in require_digest_in]
    overrides += [f"{name}: {{requireDigest: true, mode: audit}}" for name in audit_in]
    if overrides:
        policy += f"namespaces: {{{', '.join(overrides)}}}\n"
    return (
        "resolver: registry\n"
        "excludedNamespaces: []\n"
        f"{policy}"
        "registry:\n"
        f"  insecure: [{hosts}]\n"
        f"  allowedHosts: [{hosts}]\n"
        f"  timeoutSeconds: {timeout_seconds}\n"
        "rewrites:\n"
        + "".join(f"  - from: {source}\n    to: {target}\n" for source, target in rules)
    )


def write_config(path: Path, registry_host: str, **options: Any) -> Path:
    """``config_text(registry_host, **options)`` written to ``path``."""
    path.write_text(config_text(registry_host, **options))
    return path


def moved_ref(image: PushedImage) -> str:
    """The reference a rule moves to ``image``'s tag: same repository under MOVED_PREFIX."""
    assert image.tag is not None and image.repo.startswith("e2e/")
    return f"{MOVED_PREFIX}/{image.repo.removeprefix('e2e/')}:{image.tag}"


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> Tls:
        """The files of a ``kubernetes.io/tls`` Secret, as pinhook writes them to a directory."""
        return cls(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")


@dataclass(frozen=True)
class SelfManaged:
    """``pinhook serve --self-managed``: the certificate comes from a Secret pinhook keeps in
    ``namespace`` and its CA goes into the caBundle of ``webhook_name``."""

    namespace: str
    webhook_name: str
    kubeconfig: Path
    cert_dir: Path

    def serve_args(self, host: str) -> list[str]:
        # The API server calls a URL with ``host`` in it, not the Service the certificate is
        # made for: --cert-ip / --cert-dns-name add it.
        san = ["--cert-ip" if is_ip(host) else "--cert-dns-name", host]
        args = ["--self-managed", "--namespace", self.namespace]
        return [*args, "--webhook-name", self.webhook_name, "--cert-dir", str(self.cert_dir), *san]


class Pinhook:
    """A ``pinhook serve`` subprocess on 0.0.0.0, checked reachable over TLS as ``host``.

    ``tls`` names its certificate files; with ``self_managed`` instead, they are pinhook's own,
    written to its cert dir. Stopped at the end of a ``with`` block.
    """

    def __init__(
        self,
        *,
        host: str,
        config: Path,
        workdir: Path,
        tls: Tls | None = None,
        self_managed: SelfManaged | None = None,
        port: int | None = None,
    ) -> None:
        self.host = host
        self.port = port or listen_port()
        self.metrics_port = free_port()
        self._lines: queue.Queue[str] = queue.Queue()
        self._log: list[str] = []
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        args = ["serve", "--config", str(config)]
        if self_managed is None:
            assert tls is not None, "a pinhook serves either tls or self_managed certificates"
            self.tls = tls
            args += ["--cert", str(tls.cert), "--key", str(tls.key)]
        else:
            self.tls = Tls.in_dir(self_managed.cert_dir)
            args += self_managed.serve_args(host)
            env["KUBECONFIG"] = str(self_managed.kubeconfig)
        # 0.0.0.0: the API server is not on this machine's loopback.
        args += ["--host", "0.0.0.0", "--port", str(self.port), "--kube", "off"]
        # Metrics on loopback only: the test reads them here; the API server never does.
        args += ["--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "webhook.cli", *args],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._pump, name="pinhook-log", daemon=True).start()
        try:
            self.wait_for_log("pinhook listening on", START_DEADLINE_S)
            self.check_serves_as_host()
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Pinhook:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return mutate_url(self.host, self.port)

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._lines.put(line)

    def wait_for_log(self, text: str, timeout: float) -> str:
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} in pinhook's log:\n{self.log()}") from None
            self._log.append(line)
            if text in line:
                return line

    def log(self) -> str:
        while not self._lines.empty():
            self._log.append(self._lines.get_nowait())
        return "".join(self._log)

    def check_serves_as_host(self) -> None:
        """The certificate is valid for ``host``, as the API server will check it."""
        status_line = self.get_over_tls("/healthz", self.tls.ca).split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 200"), status_line

    def get_over_tls(self, path: str, ca: Path) -> bytes:
        """``GET path``'s whole answer, the certificate verified for ``host`` against ``ca``.

        Connects on loopback (``host`` may be a name only containers resolve, such as
        host.docker.internal) but verifies the certificate against ``host``.
        """
        context = ssl.create_default_context(cafile=str(ca))
        request = f"GET {path} HTTP/1.1\r\nHost: pinhook\r\nConnection: close\r\n\r\n"
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=self.host) as tls,
        ):
            tls.sendall(request.encode())
            return b"".join(iter(lambda: tls.recv(65536), b""))

    def serving_certificate(self) -> bytes:
        """The DER certificate pinhook presents now (unverified: compared by the caller)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_DEADLINE_S)

    def refuses_connections(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
        except OSError:
            return True
        return False


def install(
    *,
    url: str,
    ca: Path | None,
    name: str,
    config: Path,
    kubeconfig: Path,
    failure_policy: str,
    validating_policy: bool = False,
) -> str:
    """``pinhook install`` pointing the API server at ``url``; returns its output. Without
    ``ca`` the configuration gets no caBundle: a self-managed pinhook sets it.
    ``validating_policy``: the backstop policy and its binding too, under the same name."""
    args = ["install", "--url", url, "--config", str(config), "--name", name]
    args += ["--failure-policy", failure_policy, "--kubeconfig", str(kubeconfig)]
    if ca is not None:
        args += ["--ca", str(ca)]
    if validating_policy:
        args.append("--validating-policy")
    if os.environ.get(NO_MATCH_CONDITIONS_ENV) == "1":
        args.append("--no-match-conditions")
    return _ok(pinhook_cli(*args), "pinhook install")


def uninstall(name: str, *, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    return pinhook_cli("uninstall", "--name", name, "--kubeconfig", str(kubeconfig))

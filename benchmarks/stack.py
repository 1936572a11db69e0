"""What a benchmark run starts on loopback, and what it reads about those processes in /proc.

Servers: ``pinhook serve`` (``python -m webhook.cli``), the do-nothing webhook
(benchmarks/noop.py) and, when given, k8s-digester's webhook mode. Each gets a free port, and
before every measurement the listening socket on that port must belong to the process that
was started: a port someone else holds would silently measure their server.

Registry: a real ``docker-registry`` with token auth from the test harness's issuer, which
grants anonymous pulls (the admissions carry no credentials), optionally behind loopback
proxies that add a delay to every request, registry and token service alike.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import orjson

from tests.harness.push import (
    ACCEPT_ALL,
    BearerChallengeAuth,
    PushedImage,
    push_image,
)
from tests.harness.registry import (
    RegistryNotInstalled,
    RegistryStartError,
    RunningRegistry,
    TokenAuthSettings,
    free_port,
)
from tests.harness.tokens import TokenIssuer
from tests.reviews import review
from webhook.certs import CertPaths

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 60.0
STOP_SECONDS = 10.0
_POLL_SECONDS = 0.05
PUSH_USER, PUSH_PASSWORD = "bench", "bench-password"


class BenchError(RuntimeError):
    """A setup or measurement problem, reported as one message without a traceback."""


# --- /proc -------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process (all its threads) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"process {pid} has no VmRSS")


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def accepted_connections(pid: int, port: int) -> int:
    """Established connections the process accepted on ``port``."""
    mine = socket_inodes(pid)
    return sum(
        1
        for inode, (local, state) in _tcp_table().items()
        if local == port and state == "01" and inode in mine
    )


def _tcp_table() -> dict[int, tuple[int, str]]:
    """inode -> (local port, state) of every TCP socket in this network namespace."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(name).read_text().splitlines()[1:]:
                fields = line.split()
                port = int(fields[1].rsplit(":", 1)[1], 16)
                table[int(fields[9])] = (port, fields[3])
    return table


def listening_inodes(port: int) -> set[int]:
    return {
        inode for inode, (local, state) in _tcp_table().items() if local == port and state == "0A"
    }


def pid_listening(port: int) -> int | None:
    """The process whose socket listens on ``port`` (a scan of /proc: for setup, not rounds)."""
    listening = listening_inodes(port)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if listening & socket_inodes(int(entry.name)):
                    return int(entry.name)
    return None


def owns_port(pid: int, port: int) -> bool:
    """Whether every socket listening on ``port`` belongs to ``pid`` (and there is one)."""
    listening = listening_inodes(port)
    return bool(listening) and listening <= socket_inodes(pid)


def loaded_stack(pid: int) -> str:
    """Which event loop and HTTP parser a Python server process has loaded ("" if not Python)."""
    if "python" not in os.readlink(f"/proc/{pid}/exe"):
        return ""
    maps = Path(f"/proc/{pid}/maps").read_text()
    loop = "uvloop" if "/uvloop/" in maps else "asyncio"
    parser = "httptools" if "/httptools/" in maps else "h11"
    return f"uvicorn {loop}+{parser}"


# --- servers -----------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    path: str
    log: Path
    stack: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, query: str = "timeout=10s") -> str:
        """The admission URL, with the ``?timeout=`` the API server appends."""
        return f"https://127.0.0.1:{self.port}{self.path}" + (f"?{query}" if query else "")

    def check_owner(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.process.returncode}\n{self.tail()}")
        if not owns_port(self.pid, self.port):
            raise BenchError(
                f"port {self.port} is not (only) served by {self.name} (pid {self.pid}):"
                " refusing to measure another process"
            )

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_SECONDS)


def _clean_env(**extra: str) -> dict[str, str]:
    # A PINHOOK_* variable of the caller's shell must not change what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PINHOOK_", "KUBECONFIG"))}
    return env | extra


@contextlib.contextmanager
def serving(
    name: str,
    command: Callable[[int], list[str]],
    *,
    path: str,
    certs: CertPaths,
    workdir: Path,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Start a server on a free port, wait until it answers an admission, stop it on exit."""
    server = _start(name, command, path, certs, workdir, env or _clean_env())
    try:
        yield server
    finally:
        server.stop()


def _start(
    name: str,
    command: Callable[[int], list[str]],
    path: str,
    certs: CertPaths,
    workdir: Path,
    env: dict[str, str],
) -> Server:
    log = workdir / f"{name}.log"
    for _attempt in range(3):  # a freed port can be taken before the server binds it
        port = free_port()
        with log.open("ab") as out:
            process = subprocess.Popen(
                command(port), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
            )
        server = Server(name, process, port, path, log)
        if _wait_listening(server):
            _wait_answering(server, certs)
            server.stack = loaded_stack(server.pid)
            return server
        server.stop()
    raise BenchError(f"{name} could not listen on a free port\n{server.tail()}")


def _wait_listening(server: Server) -> bool:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            if "address already in use" in server.tail().lower():
                return False
            raise BenchError(
                f"{server.name} exited with {server.process.returncode}\n{server.tail()}"
            )
        if owns_port(server.pid, server.port):
            return True
        time.sleep(_POLL_SECONDS)  # another process: there is no event to await
    raise BenchError(f"{server.name} did not listen within {START_SECONDS:.0f}s\n{server.tail()}")


PROBE = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"}, "spec": {}}


def _wait_answering(server: Server, certs: CertPaths) -> None:
    deadline = time.monotonic() + START_SECONDS
    payload = orjson.dumps(review(PROBE, namespace="bench-probe"))
    with Admissions(server, certs) as client:
        while time.monotonic() < deadline:
            server.check_owner()
            with contextlib.suppress(OSError, http.client.HTTPException):
                if client.post(payload)[0] == 200:
                    return
                client.reconnect()
            time.sleep(_POLL_SECONDS)
    raise BenchError(f"{server.name} did not answer within {START_SECONDS:.0f}s\n{server.tail()}")


class Admissions:
    """One kept-alive HTTPS connection to a webhook, for sequential, timed admissions."""

    def __init__(self, server: Server, certs: CertPaths) -> None:
        self.server = server
        self.tls = ssl.create_default_context(cafile=str(certs.ca_cert))
        self.connection = self._connect()

    def _connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.server.port, context=self.tls, timeout=60
        )

    def reconnect(self) -> None:
        self.connection.close()
        self.connection = self._connect()

    def post(self, payload: bytes) -> tuple[int, dict[str, Any], float]:
        """Status, the decoded ``response`` and the seconds the answer took."""
        target = self.server.url()[len(f"https://127.0.0.1:{self.server.port}") :]
        began = time.perf_counter()
        self.connection.request(
            "POST", target, body=payload, headers={"Content-Type": "application/json"}
        )
        answer = self.connection.getresponse()
        body = answer.read()
        seconds = time.perf_counter() - began
        decoded = orjson.loads(body).get("response", {}) if answer.status == 200 else {}
        return answer.status, decoded, seconds

    def __enter__(self) -> Admissions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.connection.close()


def pinned_images(response: dict[str, Any]) -> int:
    """How many images the answer's patch pins."""
    patch = response.get("patch")
    return base64.b64decode(patch).count(b"@sha256:") if patch else 0


def pinhook_command(config: Path, certs: CertPaths) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "webhook.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--config",
            str(config),
            "--cert",
            str(certs.cert),
            "--key",
            str(certs.key),
            "--kube",
            "off",
            # Metrics have a port of their own (the memory scenario reads the cache misses).
            "--metrics-port",
            str(free_port()),
        ]

    return command


def metrics_port(server: Server) -> int | None:
    """The metrics port a pinhook ``server`` was started with, if any."""
    args = [str(arg) for arg in server.process.args]  # type: ignore[union-attr]
    return int(args[args.index("--metrics-port") + 1]) if "--metrics-port" in args else None


def noop_command(
    certs: CertPaths, answer: Path | None = None, *, uvicorn_tls: bool = False
) -> Callable[[int], list[str]]:
    """The do-nothing webhook; with ``answer``, answering every review with that response.
    Run as a module from the repository, so it serves on this checkout's listener."""

    def command(port: int) -> list[str]:
        extra = [str(answer)] if answer is not None else []
        extra += ["--uvicorn-tls"] if uvicorn_tls else []
        noop = [sys.executable, "-m", "benchmarks.noop"]
        return [*noop, str(port), str(certs.cert), str(certs.key), *extra]

    return command


def pinhook_config(*registry_hosts: str, extra: str = "") -> str:
    """Loopback registries are plain HTTP and private addresses: list them as such."""
    listed = ", ".join(f'"{host}"' for host in registry_hosts)
    return f'registry:\n  insecure: [{listed}]\n  allowedHosts: ["127.0.0.1"]\n{extra}'


# --- k8s-digester ------------------------------------------------------------------------

# controller-runtime wants a kubeconfig even when nothing is read from the API (--offline);
# with its lazy REST mapper, a server that never answers is enough.
_NO_CLUSTER = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
users: [{name: none, user: {}}]
"""


def peer_setup(
    binary: Path, certs: CertPaths, workdir: Path
) -> tuple[Callable[[int], list[str]], dict[str, str]]:
    """Command and environment for ``k8s-digester webhook`` on loopback.

    --offline: no pull secrets from the API (the admissions carry none); certificates from our
    cert dir (tls.crt/tls.key) instead of its rotator; go-containerregistry talks plain HTTP
    to 127.0.0.1 registries by itself. Its webhook server listens on every interface: that
    is not a flag.
    """
    home = workdir / "peer-home"
    (home / ".docker").mkdir(parents=True, exist_ok=True)
    kubeconfig = workdir / "peer-kubeconfig"
    kubeconfig.write_text(_NO_CLUSTER)

    def command(port: int) -> list[str]:
        return [
            str(binary),
            "webhook",
            "--offline",
            "--disable-cert-rotation",
            f"--cert-dir={certs.cert.parent}",
            f"--port={port}",
            "--health-addr=127.0.0.1:0",
            "--metrics-addr=0",
            f"--kubeconfig={kubeconfig}",
        ]

    env = _clean_env(
        HOME=str(home), DOCKER_CONFIG=str(home / ".docker"), POD_NAMESPACE="digester-system"
    )
    return command, env


# --- registry ----------------------------------------------------------------------------


class Registry:
    """docker-registry with token auth on loopback; ``delay`` seconds added to every request.

    ``host`` is what image references name: the registry itself, or the delaying proxy.
    """

    def __init__(self, workdir: Path, *, delay: float = 0.0) -> None:
        self.workdir = workdir
        self.delay = delay
        self._stack = ExitStack()

    def __enter__(self) -> Registry:
        try:
            self._start()
        except (RegistryNotInstalled, RegistryStartError) as exc:
            self._stack.close()
            raise BenchError(str(exc)) from None
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def _start(self) -> None:
        stack = self._stack
        self.issuer = stack.enter_context(
            TokenIssuer(username=PUSH_USER, password=PUSH_PASSWORD, allow_anonymous=True)
        )
        realm = self.issuer.realm
        if self.delay:
            realm = f"http://{stack.enter_context(self._delaying(self.issuer.url)).host}/token"
        bundle = self.issuer.write_rootcertbundle(self.workdir / "issuer.pem")
        settings = TokenAuthSettings(realm, self.issuer.service, self.issuer.issuer, bundle)
        self.registry = stack.enter_context(RunningRegistry("token", token=settings))
        registry_pid = pid_listening(self.registry.port)
        if registry_pid is None:
            raise BenchError(f"no process listens on the registry's port {self.registry.port}")
        # Whose CPU serves the registry side: docker-registry, and this process (the token
        # issuer's threads).
        self.pids = (registry_pid, os.getpid())
        self.host = self.registry.host
        if self.delay:
            self.host = stack.enter_context(self._delaying(self.registry.url)).host
        self.client = stack.enter_context(
            httpx.Client(
                base_url=self.registry.url,
                auth=BearerChallengeAuth(PUSH_USER, PUSH_PASSWORD),
                timeout=30.0,
            )
        )

    def _delaying(self, upstream: str) -> DelayingProxy:
        return DelayingProxy(httpx.URL(upstream).port or 80, self.delay)

    def push(self, repo: str, tag: str) -> PushedImage:
        return push_image(self.client, repo, tag)

    def seed(self, base: PushedImage, tags: Sequence[tuple[str, str]]) -> dict[str, str]:
        """Store a distinct manifest under each (repository, tag); returns ``repo:tag`` -> digest.

        Pushing 10,000 tags through the API takes minutes; the registry's filesystem layout
        is plain files, so the manifests, their revision links and the tag links are written
        directly (distribution does not verify referenced blobs when serving a manifest).
        The first and last are then checked through the registry's API.
        """
        root = self.registry.workdir / "storage" / "docker" / "registry" / "v2"
        manifest = json.loads(base.manifest)
        digests = {}
        for n, (repo, tag) in enumerate(tags):
            manifest["annotations"] = {"dev.pinhook.bench": f"{repo}:{tag}:{n}"}
            data = json.dumps(manifest).encode()
            hexdigest = hashlib.sha256(data).hexdigest()
            digest = f"sha256:{hexdigest}"
            _write(root / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data", data)
            manifests = root / "repositories" / repo / "_manifests"
            _write(manifests / "revisions" / "sha256" / hexdigest / "link", digest.encode())
            _write(manifests / "tags" / tag / "current" / "link", digest.encode())
            _write(
                manifests / "tags" / tag / "index" / "sha256" / hexdigest / "link", digest.encode()
            )
            digests[f"{repo}:{tag}"] = digest
        for repo, tag in {tags[0], tags[-1]}:
            served = self.client.head(f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT_ALL})
            if served.headers.get("Docker-Content-Digest") != digests[f"{repo}:{tag}"]:
                raise BenchError(f"seeded {repo}:{tag} is not served: {served.status_code}")
        return digests

    def traffic(self, repos: str) -> Traffic:
        """Manifest requests (by status) and token requests so far, of the repositories whose
        name starts with ``repos``."""
        prefix = f"/v2/{repos}"
        manifests = Counter(
            e.status
            for e in self.registry.access_log()
            if e.uri.startswith(prefix) and "/manifests/" in e.uri
        )
        scope = f"repository:{repos}"
        tokens = sum(1 for r in self.issuer.requests if any(s.startswith(scope) for s in r.scopes))
        return Traffic(dict(manifests), tokens)

    def requests_served(self) -> int:
        """Every request the registry and the token issuer answered so far."""
        return len(self.registry.access_log()) + self.issuer.request_count


@dataclass(frozen=True)
class Traffic:
    manifests: dict[int, int]  # by HTTP status
    tokens: int

    @property
    def total(self) -> int:
        return sum(self.manifests.values()) + self.tokens

    def __sub__(self, earlier: Traffic) -> Traffic:
        statuses = self.manifests.keys() | earlier.manifests.keys()
        manifests = {s: self.manifests.get(s, 0) - earlier.manifests.get(s, 0) for s in statuses}
        changed = {s: n for s, n in sorted(manifests.items()) if n}
        return Traffic(changed, self.tokens - earlier.tokens)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class DelayingProxy:
    """A TCP proxy on loopback that holds what a client sends for ``delay`` seconds.

    So every request/response exchange takes ``delay`` longer, as with a distant registry,
    whatever HTTP does on top, and without an HTTP proxy's own cost per request (the
    harness's counting proxy takes milliseconds per request under concurrency). It runs its
    own event loop in a thread.
    """

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DelayingProxy:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self._server = started.result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _listen(self) -> asyncio.Server:
        self._open: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _shut(self) -> None:
        # Closing both ends lets every connection's task see EOF and end by itself.
        self._server.close()
        for writers in self._open.values():
            for writer in writers:
                writer.close()
        if self._open:
            await asyncio.wait(list(self._open), timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = [writer]
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._open[task].append(up_writer)
            await asyncio.gather(
                self._held(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
            )
        except OSError:
            pass  # the upstream refused: the client sees its connection closed
        finally:
            for each in self._open.pop(task):
                each.close()

    async def _held(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    writer.write_eof()
                    return
                writer.write(data)

        sender = asyncio.create_task(send())
        while True:
            data = await reader.read(65536)
            queue.put_nowait((loop.time() + self.delay, data))
            if not data:
                break
        await sender


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


class DirectLookup:
    """What a client that resolves a tag itself does: fetch a pull token, then HEAD.

    Both connections are kept alive, as pinhook's pooled client keeps its own.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        issuer = httpx.URL(registry.issuer.url)
        self.token_connection = http.client.HTTPConnection(issuer.host, issuer.port, timeout=30)
        host, port = registry.host.rsplit(":", 1)
        self.registry_connection = http.client.HTTPConnection(host, int(port), timeout=30)

    def digest(self, repo: str, tag: str) -> tuple[str, float]:
        began = time.perf_counter()
        self.token_connection.request("GET", _pull_token_path(self.registry, repo))
        token = orjson.loads(self.token_connection.getresponse().read())["token"]
        self.registry_connection.request(
            "HEAD",
            f"/v2/{repo}/manifests/{tag}",
            headers={"Accept": ACCEPT_ALL, "Authorization": f"Bearer {token}"},
        )
        answer = self.registry_connection.getresponse()
        answer.read()
        seconds = time.perf_counter() - began
        return answer.headers.get("Docker-Content-Digest", ""), seconds

    def close(self) -> None:
        self.token_connection.close()
        self.registry_connection.close()


class HttpxLookup:
    """``DirectLookup`` through the HTTP library pinhook uses, at the layer it uses it: httpx's
    transport (no client), on the loop ``pinhook serve`` runs on. What a miss costs in that
    library alone, measured in the same run, beside what it costs in ``http.client``.
    """

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.loop = _serving_loop()
        self.transport = httpx.AsyncHTTPTransport()  # one pool, connections kept alive

    def digest(self, repo: str, tag: str) -> tuple[str, float]:
        return self.loop.run_until_complete(self._digest(repo, tag))

    async def _digest(self, repo: str, tag: str) -> tuple[str, float]:
        began = time.perf_counter()
        token_url = self.registry.issuer.url + _pull_token_path(self.registry, repo)
        answer = await self._send(httpx.Request("GET", token_url))
        token = orjson.loads(answer.content)["token"]
        head = httpx.Request(
            "HEAD",
            f"http://{self.registry.host}/v2/{repo}/manifests/{tag}",
            headers={"Accept": ACCEPT_ALL, "Authorization": f"Bearer {token}"},
        )
        answer = await self._send(head)
        seconds = time.perf_counter() - began
        return answer.headers.get("Docker-Content-Digest", ""), seconds

    async def _send(self, request: httpx.Request) -> httpx.Response:
        answer = await self.transport.handle_async_request(request)
        await answer.aread()
        await answer.aclose()
        return answer

    def close(self) -> None:
        self.loop.run_until_complete(self.transport.aclose())
        self.loop.close()


def _pull_token_path(registry: Registry, repo: str) -> str:
    """Where a client asks the registry's token issuer for a pull token for ``repo``."""
    return f"/token?service={registry.issuer.service}&scope=repository:{repo}:pull"


def _serving_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def which_wrk() -> str | None:
    return shutil.which("wrk")

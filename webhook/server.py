"""The HTTPS server: uvicorn on uvloop and httptools where installed, behind the connection
guard of ``listener``, with the config and certificate watchers.

The listening socket is bound here, before uvicorn starts, so that a busy port or an address
that cannot be bound is reported once, clearly, and the process exits non-zero; "listening" is
logged only once the socket is bound and the app has started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from .app import create_app
from .certs import CA_CERT_FILE, load_cert_info
from .config import ServerSettings
from .errors import CertificateError, PinhookError
from .listener import ConnectionLimits, ListenerState, guarded_protocol
from .memory import trim_periodically, tune_allocator
from .metrics import Metrics, serve_metrics
from .runtime import Runtime
from .tls import ReloadingTLS
from .workers import MetricsChannel, Supervisor

log = logging.getLogger(__name__)


class ListenError(PinhookError):
    """The address cannot be listened on (in use, not local, not permitted)."""


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8443
    cert: Path = Path("certs/tls.crt")
    key: Path = Path("certs/tls.key")
    watch_interval: float = 2.0
    server: ServerSettings = field(default_factory=ServerSettings)
    # Prometheus metrics over plain HTTP on a port of their own; None: not served.
    metrics_host: str | None = None
    metrics_port: int | None = None
    # Processes answering on the port (serve_workers); 1: this one.
    workers: int = 1


Background = Callable[[], Coroutine[Any, Any, None]]


def connection_limits(server: ServerSettings) -> ConnectionLimits:
    return ConnectionLimits(
        handshake_seconds=server.handshake_timeout_seconds,
        request_seconds=server.request_timeout_seconds,
        idle_seconds=server.idle_timeout_seconds,
        max_connections=server.max_connections,
    )


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The listening socket; ListenError saying why when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def bind_shared(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port (SO_REUSEPORT), once the port is known to be
    free: SO_REUSEPORT alone would share it with any process of the same user that set it too
    (a second pinhook, or workers left behind), and port 0 would give each its own."""
    probe = bind(host, port)
    port = probe.getsockname()[1]
    probe.close()
    return [bind(host, port, reuse_port=True) for _ in range(count)]


class _Server(uvicorn.Server):
    """uvicorn's server, saying "listening" only once it is."""

    def __init__(self, config: uvicorn.Config, where: str) -> None:
        super().__init__(config)
        self._where = where

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("pinhook listening on %s", self._where)


def build_server(
    runtime: Runtime,
    options: ServeOptions,
    background: Sequence[Background] = (),
) -> tuple[uvicorn.Server, ListenerState]:
    """The server and its listener state; ``background`` jobs (certificate renewal) run while
    it serves. Raises CertificateError when the certificate cannot be loaded."""
    tls = ReloadingTLS(options.cert, options.key)
    record_certificates(runtime.metrics, tls.cert)
    listener = ListenerState(tls.context, connection_limits(options.server), runtime.metrics)
    runtime.on_settings(lambda settings: _follow_limits(listener, settings.server))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with runtime:
            tasks = [
                asyncio.create_task(trim_periodically()),
                asyncio.create_task(runtime.watch_config(options.watch_interval)),
                asyncio.create_task(
                    _watch_certificates(tls, runtime.metrics, options.watch_interval)
                ),
                *(asyncio.create_task(job()) for job in background),
            ]
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    app = create_app(runtime, lifespan)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        # TLS is done by the listener's protocol, under its handshake deadline.
        http=guarded_protocol(listener),
        # Only HTTP: an upgrade handed to a WebSocket protocol (when a WebSocket library is
        # installed) would leave the listener's connection count without its end.
        ws="none",
        loop="auto",  # uvloop when installed
        log_config=None,  # pinhook's logging, set up by the CLI
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_keep_alive=max(1, int(options.server.idle_timeout_seconds)),
        timeout_graceful_shutdown=10,
    )
    where = f"https://{_url_host(options.host)}:{options.port}/mutate"
    return _Server(config, where), listener


def serve(runtime: Runtime, options: ServeOptions, background: Sequence[Background] = ()) -> None:
    """Bind, then serve until SIGTERM/SIGINT. Raises ListenError or CertificateError."""
    server, _listener = build_server(runtime, options, background)
    sock = bind(options.host, options.port)
    _metrics_socket, stop_metrics = _serve_metrics(lambda: runtime.metrics.registry, options)
    tune_allocator()
    try:
        with _stopped_by_signals():
            server.run(sockets=[sock])
    finally:
        stop_metrics()
        log.info("pinhook stopped")


class _StopRequested(BaseException):
    """SIGTERM or SIGINT, raised again by uvicorn once it has shut down gracefully."""


def _stop_requested(signum: int, _frame: object) -> None:
    raise _StopRequested(signum)


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """A stop signal ends the block, not the process.

    uvicorn handles SIGTERM and SIGINT while it serves; once it has shut down it restores
    the handlers it found and raises the signal again, and with the default ones the
    process dies there: before its metrics port is closed and the stop is logged, with
    status 143. The handlers it finds are these: the stop ends ``run`` instead, and pinhook
    exits 0 as any server stopped on request. A signal before uvicorn handles them ends
    the start the same way.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, _stop_requested) for sig in stops}
    try:
        yield
    except _StopRequested:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_workers(
    make_runtime: Callable[[int], Runtime],
    options: ServeOptions,
    background: Sequence[Background] = (),
) -> int:
    """``options.workers`` processes on one port (see ``workers``); returns the exit status.

    Worker 0 runs the ``background`` jobs (certificate renewal), once for the pod, and is the
    one ``make_runtime`` may give the jobs that patch cluster objects.
    Raises ListenError or CertificateError before any worker starts.
    """
    sockets = bind_shared(options.host, options.port, options.workers)
    ReloadingTLS(options.cert, options.key)  # a bad certificate is reported here, once

    def main(index: int, sock: socket.socket, channel: MetricsChannel) -> None:
        runtime = make_runtime(index)
        server, _listener = build_server(runtime, options, background if index == 0 else ())
        channel.in_worker(runtime.metrics.render)
        tune_allocator()
        server.run(sockets=[sock])

    supervisor = Supervisor(sockets, main)
    metrics_socket, stop_metrics = _serve_metrics(supervisor.metrics_registry, options)
    supervisor.parent_only.extend(metrics_socket)
    try:
        return supervisor.run()
    finally:
        stop_metrics()
        log.info("pinhook stopped")


def _serve_metrics(
    registry: Callable[[], CollectorRegistry], options: ServeOptions
) -> tuple[list[socket.socket], Callable[[], None]]:
    """The metrics port's socket (none when not served) and the function that stops it."""
    if options.metrics_port is None:
        return [], lambda: None
    host = options.metrics_host or options.host
    try:
        sock, stop = serve_metrics(registry(), host, options.metrics_port)
    except OSError as exc:
        where = f"{host}:{options.metrics_port}"
        raise ListenError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
    log.info("metrics on http://%s:%d/metrics", _url_host(host), options.metrics_port)
    return [sock], stop


def record_certificates(metrics: Metrics, cert: Path) -> None:
    """The expiry of the serving certificate and of its CA (``ca.crt`` beside it, as
    ``certs generate``, cert-manager and a self-managed pinhook write it), for the metrics."""
    metrics.certificates.set("serving", _not_after(cert))
    metrics.certificates.set("ca", _not_after(cert.parent / CA_CERT_FILE))


def _not_after(path: Path) -> datetime | None:
    try:
        return load_cert_info(path.read_bytes()).not_after
    except (OSError, ValueError, CertificateError):
        return None


def _follow_limits(listener: ListenerState, server: ServerSettings) -> None:
    listener.limits = connection_limits(server)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _watch_certificates(tls: ReloadingTLS, metrics: Metrics, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        if tls.reload_if_changed():
            record_certificates(metrics, tls.cert)

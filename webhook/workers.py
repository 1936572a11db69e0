"""``serve --workers N``: N processes answering on one port, supervised by the first.

The parent binds N listening sockets with SO_REUSEPORT before it forks, so a busy port is
reported once, by the process that was started; the kernel then spreads new connections over
the workers by their addresses. Each worker is a whole pinhook: its own event loop, runtime,
digest cache, config and certificate watchers. A worker that dies is started again; one that
keeps dying at start stops the lot, since every other would die the same way.

Metrics: each worker keeps its own counters, and the parent serves the metrics port, asking
every worker for its exposition over a socket pair and labelling each series with
``worker="<n>"``. Aggregate with ``sum without (worker)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

WORKER_LABEL: Final = "worker"
# A worker that exits this soon after it was started failed to start, not while serving.
EARLY_EXIT_SECONDS: Final = 10.0
# Workers failing to start one after another before the parent gives up.
EARLY_EXITS_BEFORE_GIVING_UP: Final = 3
# How long a scrape waits for a worker's metrics; a busy worker is left out of that scrape.
SCRAPE_TIMEOUT_SECONDS: Final = 2.0
STOP_GRACE_SECONDS: Final = 15.0
_LENGTH = struct.Struct("!Q")


class MetricsChannel:
    """One worker's metrics, asked for by the parent over a socket pair."""

    def __init__(self) -> None:
        self._parent, self._worker = socket.socketpair()
        self._lock = threading.Lock()

    def in_worker(self, render: Callable[[], bytes]) -> None:
        """In the worker: answer every request with ``render()``, from a thread."""
        self._parent.close()
        conn = self._worker
        threading.Thread(
            target=_answer_forever, args=(conn, render), name="pinhook-metrics", daemon=True
        ).start()

    def in_parent(self) -> None:
        self._worker.close()

    def fetch(self, timeout: float = SCRAPE_TIMEOUT_SECONDS) -> bytes | None:
        """In the parent: the worker's exposition, or None if it does not answer in time."""
        with self._lock:
            conn = self._parent
            try:
                conn.settimeout(timeout)
                conn.sendall(b"?")
                (length,) = _LENGTH.unpack(_read_exactly(conn, _LENGTH.size))
                return _read_exactly(conn, length)
            except (OSError, EOFError):
                # Out of step (a late answer would be read as the next one): start afresh on
                # the worker's next start.
                return None

    def close(self) -> None:
        self._parent.close()
        self._worker.close()


def _answer_forever(conn: socket.socket, render: Callable[[], bytes]) -> None:
    with contextlib.suppress(OSError, EOFError), conn:
        while _read_exactly(conn, 1):
            body = render()
            conn.sendall(_LENGTH.pack(len(body)) + body)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class WorkersCollector:
    """Every worker's metrics as one exposition, each series labelled with its worker."""

    def __init__(self, channels: Callable[[], Iterable[tuple[int, MetricsChannel]]]) -> None:
        self._channels = channels

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for index, channel in self._channels():
            text = channel.fetch()
            if text is None:
                continue
            for family in text_string_to_metric_families(text.decode()):
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                for sample in family.samples:
                    labels = {**sample.labels, WORKER_LABEL: str(index)}
                    merged.add_sample(
                        sample.name, labels, sample.value, sample.timestamp, sample.exemplar
                    )
        return iter(families.values())


@dataclass
class _Worker:
    index: int
    sock: socket.socket
    pid: int = 0
    started: float = 0.0
    channel: MetricsChannel = field(default_factory=MetricsChannel)


WorkerMain = Callable[[int, socket.socket, MetricsChannel], None]


class Supervisor:
    """Forks the workers, starts again those that die, stops them all on SIGTERM or SIGINT."""

    def __init__(self, sockets: list[socket.socket], main: WorkerMain) -> None:
        self._workers = [_Worker(index, sock) for index, sock in enumerate(sockets)]
        self._main = main
        # Sockets of the parent's own (the metrics port) that a worker must not hold open.
        self.parent_only: list[socket.socket] = []
        self._stopping = False
        self._early_exits = 0

    def metrics_registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(self._live_channels))
        return registry

    def run(self) -> int:
        """Serve until told to stop; the exit status for the process."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for worker in self._workers:
                self._start(worker)
            log.info("pinhook serving with %d workers", len(self._workers))
            return self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._stop_all()

    def _live_channels(self) -> list[tuple[int, MetricsChannel]]:
        return [(w.index, w.channel) for w in self._workers if w.pid]

    def _start(self, worker: _Worker) -> None:
        worker.channel.close()
        worker.channel = MetricsChannel()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                for other in self._workers:
                    if other is not worker:
                        other.sock.close()
                        other.channel.close()
                for sock in self.parent_only:
                    sock.close()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)  # uvicorn installs its own
                self._main(worker.index, worker.sock, worker.channel)
                status = 0
            except BaseException:
                log.exception("worker %d failed", worker.index)
            finally:
                logging.shutdown()
                os._exit(status)
        worker.channel.in_parent()
        worker.pid = pid
        worker.started = time.monotonic()

    def _supervise(self) -> int:
        while not self._stopping:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                return 1
            except InterruptedError:
                continue
            worker = next((w for w in self._workers if w.pid == pid), None)
            if worker is None:
                continue
            worker.pid = 0
            if self._stopping:
                break
            code = os.waitstatus_to_exitcode(status)
            if time.monotonic() - worker.started < EARLY_EXIT_SECONDS:
                self._early_exits += 1
            else:
                self._early_exits = 0
            if self._early_exits >= EARLY_EXITS_BEFORE_GIVING_UP:
                log.error(
                    "workers keep failing at start (worker %d exited with %d); stopping",
                    worker.index,
                    code,
                )
                return code or 1
            log.warning(
                "worker %d (pid %d) exited with %d; starting it again", worker.index, pid, code
            )
            self._start(worker)
        return 0

    def _stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stopping = True
        for worker in self._workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def _stop_all(self) -> None:
        self._stop(signal.SIGTERM, None)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for worker in self._workers:
            if not worker.pid:
                continue
            while time.monotonic() < deadline:
                done, _ = os.waitpid(worker.pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
            worker.pid = 0
            worker.channel.close()
        for worker in self._workers:
            worker.sock.close()

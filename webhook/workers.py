"""``serve --workers N``: N processes answering on one port, supervised by the first.

The parent binds N listening sockets with SO_REUSEPORT before it forks, so a busy port is
reported once, by the process that was started; the kernel then spreads new connections over
the workers by their addresses. Each worker is a whole pinhook: its own event loop, runtime,
digest cache, config and certificate watchers. A worker that dies is started again; one that
keeps dying at start stops the lot, since every other would die the same way. A worker whose
parent is gone (its end of the metrics socket pair closes) stops too.

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
from prometheus_client.registry import RestrictedRegistry

log = logging.getLogger(__name__)

WORKER_LABEL: Final = "worker"
# A worker that exits this soon after it was started failed to start, not while serving.
EARLY_EXIT_SECONDS: Final = 10.0
# Workers failing to start one after another before the parent gives up.
EARLY_EXITS_BEFORE_GIVING_UP: Final = 3
# How long a scrape waits for a worker's metrics; a busy worker is left out of that scrape.
SCRAPE_TIMEOUT_SECONDS: Final = 2.0
STOP_GRACE_SECONDS: Final = 15.0
# How often the parent looks for workers that exited, and for a stop.
SUPERVISE_INTERVAL_SECONDS: Final = 0.2
_STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
_REQUEST = struct.Struct("!Q")  # the request's number
_ANSWER = struct.Struct("!QQ")  # the number it answers, the length of the exposition


class MetricsChannel:
    """One worker's metrics, asked for by the parent over a socket pair.

    Each request carries a number that its answer repeats. An answer that comes too late for
    its scrape is read and dropped by the next one, and what a timeout cut short is kept for
    it, so one slow answer never puts the parent out of step with the worker.
    """

    def __init__(self) -> None:
        self._parent, self._worker = socket.socketpair()
        self._asked = 0
        self._unread = bytearray()

    def in_worker(self, render: Callable[[], bytes]) -> None:
        """In the worker: answer every request with ``render()``, from a thread; when the
        parent is gone (the pair ends), stop the worker."""
        self._parent.close()
        conn = self._worker
        threading.Thread(
            target=answer_forever,
            args=(conn, render, _stop_this_worker),
            name="pinhook-metrics",
            daemon=True,
        ).start()

    def in_parent(self) -> None:
        self._worker.close()

    def ask(self) -> bool:
        """In the parent: ask the worker for its exposition (see ``answer``)."""
        self._asked += 1
        try:
            self._parent.settimeout(SCRAPE_TIMEOUT_SECONDS)
            self._parent.sendall(_REQUEST.pack(self._asked))
        except OSError:
            return False
        return True

    def answer(self, deadline: float) -> bytes | None:
        """The answer to the last ``ask``, or None when it has not come by ``deadline``
        (``time.monotonic``) or the worker is gone."""
        while True:
            frame = self._frame()
            if frame is not None:
                number, body = frame
                if number == self._asked:
                    return body
                continue  # the late answer to an earlier scrape
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self._parent.settimeout(left)
                chunk = self._parent.recv(1 << 20)
            except OSError:  # a timeout included
                return None
            if not chunk:
                return None
            self._unread += chunk

    def _frame(self) -> tuple[int, bytes] | None:
        if len(self._unread) < _ANSWER.size:
            return None
        number, length = _ANSWER.unpack_from(self._unread)
        end = _ANSWER.size + length
        if len(self._unread) < end:
            return None
        body = bytes(self._unread[_ANSWER.size : end])
        del self._unread[:end]
        return number, body

    def close(self) -> None:
        self._parent.close()
        self._worker.close()


def answer_forever(
    conn: socket.socket, render: Callable[[], bytes], parent_gone: Callable[[], None]
) -> None:
    """The worker's end of a MetricsChannel: each request answered with ``render()``, until
    the pair ends, when ``parent_gone()``."""
    with conn:
        try:
            while True:
                (number,) = _REQUEST.unpack(_read_exactly(conn, _REQUEST.size))
                body = render()
                conn.sendall(_ANSWER.pack(number, len(body)) + body)
        except (EOFError, OSError):
            parent_gone()


def _stop_this_worker() -> None:
    # The parent is gone (killed, even by SIGKILL): a worker without its supervisor would
    # hold the port and serve on, unseen. Stop as on SIGTERM.
    log.warning("the supervising process is gone; stopping")
    os.kill(os.getpid(), signal.SIGTERM)


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
    """Every worker's metrics as one exposition, each series labelled with its worker.

    Every worker is asked at once and the scrape waits at most SCRAPE_TIMEOUT_SECONDS in
    all; a worker that does not answer in time, or answers what cannot be read, is left out
    of that scrape.
    """

    def __init__(self, channels: Callable[[], Iterable[tuple[int, MetricsChannel]]]) -> None:
        self._channels = channels
        self._lock = threading.Lock()  # one scrape at a time: they share the channels

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        with self._lock:
            asked = [(index, channel) for index, channel in self._channels() if channel.ask()]
            deadline = time.monotonic() + SCRAPE_TIMEOUT_SECONDS
            for index, channel in asked:
                text = channel.answer(deadline)
                if text is None:
                    log.debug("worker %d did not answer this scrape in time", index)
                    continue
                try:
                    parsed = list(text_string_to_metric_families(text.decode()))
                except (ValueError, UnicodeDecodeError) as exc:
                    log.warning("worker %d answered unreadable metrics: %s", index, exc)
                    continue
                _merge(families, parsed, index)
        return iter(families.values())


def workers_registry(
    channels: Callable[[], Iterable[tuple[int, MetricsChannel]]],
) -> CollectorRegistry:
    """The registry the parent serves: every worker's metrics (``WorkersCollector``)."""
    registry = _WorkersRegistry(auto_describe=False)
    registry.register(WorkersCollector(channels))
    return registry


class _WorkersRegistry(CollectorRegistry):
    """``/metrics?name[]=...`` asks for some series by name. prometheus_client finds them by
    the names each collector declared when it was registered, and the workers' names are
    known only once they answer: so the filter is applied to their answers instead."""

    def restricted_registry(self, names: Iterable[str]) -> RestrictedRegistry:
        return _AnsweredByName(names, self)


class _AnsweredByName(RestrictedRegistry):
    def __init__(self, names: Iterable[str], registry: CollectorRegistry) -> None:
        self._names = frozenset(names)
        super().__init__(self._names, registry)
        self._whole = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._whole.collect():
            samples = [sample for sample in family.samples if sample.name in self._names]
            if samples:
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = samples
                yield kept


def _merge(families: dict[str, Metric], parsed: Iterable[Metric], index: int) -> None:
    for family in parsed:
        merged = families.get(family.name)
        if merged is None:
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            families[family.name] = merged
        for sample in family.samples:
            labels = {**sample.labels, WORKER_LABEL: str(index)}
            merged.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)


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
        self.stop_grace_seconds = STOP_GRACE_SECONDS

    def metrics_registry(self) -> CollectorRegistry:
        return workers_registry(self._live_channels)

    def run(self) -> int:
        """Serve until told to stop; the exit status for the process."""
        previous = {sig: signal.signal(sig, self._stop) for sig in _STOP_SIGNALS}
        try:
            for worker in self._workers:
                self._start(worker)
            log.info("pinhook serving with %d workers", len(self._workers))
            return self._supervise()
        finally:
            self._stop_all()  # under our handlers: a second signal must not cut it short
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _live_channels(self) -> list[tuple[int, MetricsChannel]]:
        return [(w.index, w.channel) for w in self._workers if w.pid]

    def _start(self, worker: _Worker) -> None:
        worker.channel.close()
        worker.channel = MetricsChannel()
        # Blocked across the fork: a stop signal arriving before the worker has its own
        # handlers waits for them, instead of running the parent's handler in the worker.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:  # the worker; never returns
                self._run_worker(worker)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        worker.channel.in_parent()
        worker.pid = pid
        worker.started = time.monotonic()

    def _run_worker(self, worker: _Worker) -> None:
        status = 1
        try:
            for other in self._workers:
                if other is not worker:
                    other.sock.close()
                    other.channel.close()
            for sock in self.parent_only:
                sock.close()
            for sig in _STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)  # uvicorn installs its own
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            self._main(worker.index, worker.sock, worker.channel)
            status = 0
        except BaseException:
            log.exception("worker %d failed", worker.index)
        finally:
            logging.shutdown()
            os._exit(status)

    def _supervise(self) -> int:
        # Polled, not a blocking wait: Python resumes os.wait() after a signal handler, so a
        # stop would wait for some worker to exit first.
        while not self._stopping:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 1
            if pid == 0:
                time.sleep(SUPERVISE_INTERVAL_SECONDS)
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
                return code if code > 0 else 1  # killed by a signal: code is -signum
            log.warning(
                "worker %d (pid %d) exited with %d; starting it again", worker.index, pid, code
            )
            self._start(worker)
        return 0

    def _stop(self, _signum: int, _frame: FrameType | None) -> None:
        self._stopping = True

    def _signal_workers(self, sig: signal.Signals) -> None:
        for worker in self._workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, sig)

    def _stop_all(self) -> None:
        self._stopping = True
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_seconds
        for worker in self._workers:
            if not worker.pid:
                continue
            while time.monotonic() < deadline:
                done, _ = os.waitpid(worker.pid, os.WNOHANG)
                if done:
                    break
                time.sleep(SUPERVISE_INTERVAL_SECONDS / 4)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
            worker.pid = 0
            worker.channel.close()
        for worker in self._workers:
            worker.sock.close()

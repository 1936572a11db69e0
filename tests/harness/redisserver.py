"""Run a real ``redis-server`` (Debian's package) on loopback for tests of the shared cache.

Nothing is persisted. The server can be stopped and started again on the same port, as a
Redis outage and recovery look to the replicas using it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from tests.harness.registry import free_port

REDIS_BINARY = "redis-server"
START_DEADLINE_S = 15.0
STOP_DEADLINE_S = 5.0
_READY = "Ready to accept connections"


class RedisNotInstalled(RuntimeError):
    """``redis-server`` is not on PATH."""


class RunningRedis:
    """A redis-server process on 127.0.0.1; ``url`` stays the same across stop/start."""

    def __init__(self, *, password: str | None = None) -> None:
        binary = shutil.which(REDIS_BINARY)
        if binary is None:
            raise RedisNotInstalled(
                f"{REDIS_BINARY!r} is not installed; run scripts/ensure-packages"
                " (apt-get install redis-server)"
            )
        self._binary = binary
        self.port = free_port()
        self.password = password
        self._dir = Path(tempfile.mkdtemp(prefix="pinhook-redis-"))
        self._process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def __enter__(self) -> RunningRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def start(self) -> None:
        command = [
            self._binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self._dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ]
        if self.password:
            command += ["--requirepass", self.password]
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        ready = threading.Event()
        lines: list[str] = []

        def pump(stream: object) -> None:
            for line in stream:  # type: ignore[attr-defined]
                lines.append(line)
                if _READY in line:
                    ready.set()

        threading.Thread(target=pump, args=(self._process.stdout,), daemon=True).start()
        if not ready.wait(START_DEADLINE_S):
            self.stop()
            raise RuntimeError("redis-server did not start:\n" + "".join(lines[-20:]))

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
        process.terminate()
        try:
            process.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_DEADLINE_S)

    def pause(self) -> None:
        """Stop the process without closing anything (SIGSTOP): connections and new connects
        hang, as with a Redis that is overloaded or behind a dead network path."""
        os.kill(self._pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._pid(), signal.SIGCONT)

    def _pid(self) -> int:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("redis-server is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

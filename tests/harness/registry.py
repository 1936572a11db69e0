"""Run a real ``docker-registry`` (distribution 2.8) on loopback for one test session.

The registry writes an Apache combined access log to stdout and logrus lines to stderr; both
are captured to files so tests can count the requests it served.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import httpx
import yaml

AuthMode = Literal["none", "htpasswd", "token"]

REGISTRY_BINARY = "docker-registry"
START_DEADLINE_S = 15.0
STOP_DEADLINE_S = 5.0
SYNC_DEADLINE_S = 5.0
_POLL_INTERVAL_S = 0.02
_SYNC_REPO = "pinhook-harness-sync"
_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


class RegistryNotInstalled(RuntimeError):
    """``docker-registry`` is not on PATH."""


class RegistryStartError(RuntimeError):
    """The registry process exited or did not answer ``/v2/`` in time."""


@dataclass(frozen=True)
class TokenAuthSettings:
    """What the registry needs to trust a token issuer."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


@dataclass(frozen=True)
class AccessLogEntry:
    method: str
    uri: str
    status: int


def registry_binary() -> str:
    found = shutil.which(REGISTRY_BINARY)
    if found is None:
        raise RegistryNotInstalled(
            f"{REGISTRY_BINARY!r} is not installed; run scripts/ensure-packages "
            "(apt-get install docker-registry), or set PINHOOK_SKIP_REGISTRY=1 to skip "
            "the tests that need it"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash the registry's htpasswd auth accepts.

    libxcrypt (Debian's libcrypt1, always installed) does bcrypt, so no Python package or
    apache2-utils is needed; ``htpasswd -B`` is the fallback on other systems.
    """
    with contextlib.suppress(OSError, AttributeError):
        return _libcrypt_bcrypt(password)
    htpasswd = shutil.which("htpasswd")
    if htpasswd is None:
        raise RuntimeError("no bcrypt available: need libxcrypt (libcrypt1) or apache2-utils")
    out = subprocess.run(
        [htpasswd, "-nbBC", "4", "user", password], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().split(":", 1)[1]


def _libcrypt_bcrypt(password: str) -> str:
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    # Cost 4 is bcrypt's minimum: the registry verifies every request, so keep it cheap.
    salt = lib.crypt_gensalt(b"$2b$", 4, None, 0)
    hashed = lib.crypt(password.encode(), salt) if salt else None
    if not hashed or not hashed.startswith(b"$2b$"):
        raise OSError("libcrypt has no bcrypt")
    return str(hashed.decode())


def registry_config(
    *,
    root: Path,
    port: int,
    auth: AuthMode,
    htpasswd_file: Path | None = None,
    token: TokenAuthSettings | None = None,
) -> dict[str, object]:
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "storage")},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
    }
    if auth == "htpasswd":
        assert htpasswd_file is not None
        config["auth"] = {"htpasswd": {"realm": "pinhook-test", "path": str(htpasswd_file)}}
    elif auth == "token":
        assert token is not None
        config["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token.rootcertbundle),
            }
        }
    return config


class RunningRegistry:
    """A ``docker-registry serve`` process on 127.0.0.1, for use as a context manager.

    ``users`` maps user names to passwords for ``auth="htpasswd"``; ``token`` configures
    ``auth="token"``.
    """

    def __init__(
        self,
        auth: AuthMode = "none",
        *,
        users: dict[str, str] | None = None,
        token: TokenAuthSettings | None = None,
    ) -> None:
        if auth == "htpasswd" and not users:
            raise ValueError("htpasswd auth needs at least one user")
        if auth == "token" and token is None:
            raise ValueError("token auth needs TokenAuthSettings")
        self.auth: AuthMode = auth
        self.users = dict(users or {})
        self.token = token
        self.port = 0
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RuntimeError("registry is not running")
        return Path(self._workdir.name)

    @property
    def access_log_path(self) -> Path:
        return self.workdir / "access.log"

    @property
    def app_log_path(self) -> Path:
        return self.workdir / "registry.log"

    def __enter__(self) -> RunningRegistry:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        binary = registry_binary()
        self._workdir = tempfile.TemporaryDirectory(prefix="pinhook-registry-")
        htpasswd_file = self._write_htpasswd() if self.auth == "htpasswd" else None
        last_error: RegistryStartError | None = None
        # A freed port can be taken by someone else before the registry binds it: retry.
        for _attempt in range(3):
            self.port = free_port()
            config = registry_config(
                root=self.workdir,
                port=self.port,
                auth=self.auth,
                htpasswd_file=htpasswd_file,
                token=self.token,
            )
            config_path = self.workdir / "config.yml"
            config_path.write_text(yaml.safe_dump(config))
            try:
                self._spawn(binary, config_path)
                self._wait_until_ready()
                return
            except RegistryStartError as error:
                last_error = error
                self._kill()
        self.stop()
        assert last_error is not None
        raise last_error

    def stop(self) -> None:
        self._kill()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def _write_htpasswd(self) -> Path:
        path = self.workdir / "htpasswd"
        lines = [f"{user}:{bcrypt_hash(password)}\n" for user, password in self.users.items()]
        path.write_text("".join(lines))
        return path

    def _spawn(self, binary: str, config_path: Path) -> None:
        with (
            self.access_log_path.open("ab") as access_log,
            self.app_log_path.open("ab") as app_log,
        ):
            self._process = subprocess.Popen(
                [binary, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=access_log,
                stderr=app_log,
                cwd=self.workdir,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_DEADLINE_S
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    client.get(f"{self.url}/v2/")
                    return  # any HTTP answer (200, or 401 with auth) means it serves
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self._process.wait(timeout=_POLL_INTERVAL_S)
                    raise RegistryStartError(
                        f"docker-registry exited with {code} before serving\n{self.logs()}"
                    )
        raise RegistryStartError(
            f"docker-registry did not answer /v2/ within {START_DEADLINE_S}s\n{self.logs()}"
        )

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_DEADLINE_S)

    def logs(self) -> str:
        """Both logs, for a failure message."""
        if self._workdir is None:
            return "(registry not running)"
        parts = []
        for path in (self.app_log_path, self.access_log_path):
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts)

    def access_log(self) -> list[AccessLogEntry]:
        """Every request the registry has logged so far, after making sure none is pending."""
        self._sync_access_log()
        return [e for e in self._parse_access_log() if _SYNC_REPO not in e.uri]

    def count_requests(self, method: str, path_substring: str) -> int:
        """How many ``method`` requests had ``path_substring`` in their URI."""
        return sum(
            1
            for entry in self.access_log()
            if entry.method == method.upper() and path_substring in entry.uri
        )

    def _parse_access_log(self) -> Iterator[AccessLogEntry]:
        text = self.access_log_path.read_text(errors="replace")
        for line in text.splitlines():
            match = _ACCESS_LINE.search(line)
            if match:
                yield AccessLogEntry(match["method"], match["uri"], int(match["status"]))

    def _sync_access_log(self) -> None:
        # The access log line is written when the handler returns, which can be just after
        # the client saw its response. A marker request sent now is logged after every
        # request that already completed, so waiting for it makes counts exact.
        marker = uuid.uuid4().hex
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2.0)
        try:
            connection.request("HEAD", f"/v2/{_SYNC_REPO}/manifests/{marker}")
            connection.getresponse().read()
        finally:
            connection.close()
        deadline = time.monotonic() + SYNC_DEADLINE_S
        while marker not in self.access_log_path.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"registry access log never showed {marker}\n{self.logs()}")
            time.sleep(_POLL_INTERVAL_S)

"""A counting reverse proxy on loopback, in front of a test registry.

Every request is counted when it arrives (before it is forwarded), so counts are exact the
moment a client has its answer. Tests can also hold requests at the proxy (to keep many
callers in flight at once) or answer some requests themselves (to imitate odd registries).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import httpx

from tests.harness.wire import OneWriteHandler

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
HOLD_DEADLINE_S = 30.0


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class CannedResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


Interceptor = Callable[[ProxiedRequest], CannedResponse | None]
"""Return a response to send instead of forwarding, or None to forward."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a burst of concurrent clients must not hit SYN retries


class CountingProxy:
    """Forward every request to ``upstream_url`` and count it by method and path.

    ``strip_response_headers`` removes headers from forwarded answers (for example
    ``Docker-Content-Digest``, as ECR-like registries do).
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        interceptor: Interceptor | None = None,
        strip_response_headers: Iterable[str] = (),
    ) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.interceptor = interceptor
        self.strip_response_headers = {h.lower() for h in strip_response_headers}
        self._seen: list[tuple[str, str]] = []
        self._changed = threading.Condition()
        self._released = threading.Event()
        self._released.set()
        self._upstream = httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=200))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy is not running")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def __enter__(self) -> CountingProxy:
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
        self._server = _Server(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="counting-proxy", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._upstream.close()

    # Counting

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request so far, in arrival order."""
        with self._changed:
            return list(self._seen)

    def count(self, method: str | None = None, path_substring: str = "") -> int:
        """Requests with this method (any when None) whose path contains ``path_substring``."""
        with self._changed:
            return _matching(self._seen, method, path_substring)

    def wait_for_count(
        self, n: int, method: str | None = None, path_substring: str = "", timeout: float = 10.0
    ) -> int:
        """Block until at least ``n`` matching requests arrived; returns the count."""
        with self._changed:
            if not self._changed.wait_for(
                lambda: _matching(self._seen, method, path_substring) >= n, timeout
            ):
                raise TimeoutError(
                    f"proxy saw {self._seen!r}, wanted {n} x {method} {path_substring}"
                )
            return _matching(self._seen, method, path_substring)

    def reset(self) -> None:
        with self._changed:
            self._seen.clear()

    def _record(self, method: str, path: str) -> None:
        with self._changed:
            self._seen.append((method, path))
            self._changed.notify_all()

    # Holding: requests are counted, then wait here until released.

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def _wait_while_held(self) -> None:
        if not self._released.wait(HOLD_DEADLINE_S):
            raise TimeoutError("proxy held a request for too long")

    def forward(self, request: ProxiedRequest) -> CannedResponse:
        """Answer one request: the interceptor's answer, or the upstream's."""
        self._record(request.method, request.path)
        self._wait_while_held()
        interceptor = self.interceptor
        canned = interceptor(request) if interceptor is not None else None
        if canned is not None:
            return canned
        upstream = httpx.Request(
            request.method,
            f"{self.upstream_url}{request.path}",
            headers=request.headers,
            content=request.body,
        )
        try:
            response = self._upstream.send(upstream, stream=True)
            try:
                body = b"".join(response.iter_raw())
            finally:
                response.close()
        except httpx.HTTPError as error:
            return CannedResponse(502, {"Content-Type": "text/plain"}, str(error).encode())
        headers = {
            name: value
            for name, value in response.headers.multi_items()
            if name.lower() not in HOP_BY_HOP | self.strip_response_headers
        }
        if request.method != "HEAD" and "content-length" not in {h.lower() for h in headers}:
            headers["Content-Length"] = str(len(body))
        return CannedResponse(response.status_code, headers, body)


def _matching(seen: list[tuple[str, str]], method: str | None, path_substring: str) -> int:
    wanted = method.upper() if method else None
    return sum(1 for m, p in seen if (wanted is None or m == wanted) and path_substring in p)


def _handler_for(proxy: CountingProxy) -> type[BaseHTTPRequestHandler]:
    class ProxyHandler(OneWriteHandler):
        def _proxy(self) -> None:
            request = ProxiedRequest(
                self.command,
                self.path,
                {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP},
                self._read_body(),
            )
            answer = proxy.forward(request)
            self.answer(answer.status, answer.headers, answer.body)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return self._read_chunked()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _read_chunked(self) -> bytes:
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass  # trailers
            return b"".join(chunks)

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy

        def log_message(self, format: str, *args: Any) -> None:
            pass  # requests are recorded on the proxy

    return ProxyHandler

"""Servers the suite runs in threads of its own: a second mutating webhook, a recording proxy in
front of pinhook, and a registry that accepts connections and never answers.

The two HTTPS servers serve the suite's certificate (made for ``PINHOOK_E2E_HOST``) and listen
on every address, like pinhook itself, so the API server reaches them the same way.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final

import httpx

from tests.e2e.pinhook import Tls, url_host

JSON: Final = "application/json"
# Pods carrying this label are changed by the adder webhook; its value says how.
ADDER_LABEL: Final = "pinhook-e2e/adder"
ADD_CONTAINER: Final = "container"
ADD_ANNOTATION: Final = "annotation"
ADDED_CONTAINER: Final = "added"
ADDED_ANNOTATION: Final = "pinhook-e2e/added"
PROXY_TIMEOUT_S: Final = 30.0
_ACCEPT_POLL_S: Final = 0.2

# (path with query, request body) -> (status, response body)
Handler = Callable[[str, bytes], tuple[int, bytes]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class HttpsServer:
    """A threaded HTTPS server on 0.0.0.0 that hands each POST to ``handle``."""

    def __init__(self, tls: Tls, host: str, handle: Handler) -> None:
        self.host = host
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls.cert), str(tls.key))
        self._server = _Server(("0.0.0.0", 0), _handler_for(handle))
        # The handshake happens in the connection's own thread, not in the accepting one.
        self._server.socket = context.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="e2e-https", daemon=True
        )

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def url(self, path: str) -> str:
        return f"https://{url_host(self.host)}:{self.port}{path}"

    def __enter__(self) -> HttpsServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(handle: Handler) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the API server's client expects

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            status, body = handle(self.path, self.rfile.read(length))
            self.send_response(status)
            self.send_header("Content-Type", JSON)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


# --- a second mutating webhook ----------------------------------------------------------


@dataclass(frozen=True)
class AdderCall:
    operation: str
    pod: str
    patched: bool


class AdderWebhook:
    """Adds a container (or only an annotation) to Pods labelled ``ADDER_LABEL``.

    Registered under a configuration name that sorts after pinhook's, so the API server calls
    it after pinhook: whatever it adds reaches pinhook only if pinhook is reinvoked.
    """

    def __init__(self, tls: Tls, host: str, image: str) -> None:
        self.image = image
        self.calls: list[AdderCall] = []
        self._lock = threading.Lock()
        self.server = HttpsServer(tls, host, self._answer)

    @property
    def url(self) -> str:
        return self.server.url("/add")

    def calls_for(self, pod: str) -> list[AdderCall]:
        with self._lock:
            return [call for call in self.calls if call.pod == pod]

    def _answer(self, _path: str, body: bytes) -> tuple[int, bytes]:
        review = json.loads(body)
        request = review["request"]
        pod = request["object"]
        patch = self._patch(pod)
        with self._lock:
            self.calls.append(AdderCall(request["operation"], pod["metadata"]["name"], bool(patch)))
        response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
        if patch:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
        answer = {"apiVersion": review["apiVersion"], "kind": "AdmissionReview"}
        return 200, json.dumps({**answer, "response": response}).encode()

    def _patch(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        metadata = pod["metadata"]
        how = (metadata.get("labels") or {}).get(ADDER_LABEL)
        if how == ADD_CONTAINER:
            names = {container["name"] for container in pod["spec"]["containers"]}
            if ADDED_CONTAINER in names:
                return []
            return [{"op": "add", "path": "/spec/containers/-", "value": self._container()}]
        if how == ADD_ANNOTATION:
            annotations = metadata.get("annotations") or {}
            if ADDED_ANNOTATION in annotations:
                return []
            value = {**annotations, ADDED_ANNOTATION: "true"}
            return [{"op": "add", "path": "/metadata/annotations", "value": value}]
        return []

    def _container(self) -> dict[str, Any]:
        return {
            "name": ADDED_CONTAINER,
            "image": self.image,
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            },
        }

    def __enter__(self) -> AdderWebhook:
        self.server.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.__exit__(exc_type, exc, tb)


def adder_configuration(
    name: str, adder: AdderWebhook, ca_pem: bytes, namespace: str
) -> dict[str, Any]:
    """Its MutatingWebhookConfiguration: Pods labelled ``ADDER_LABEL`` in ``namespace`` only."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "adder.pinhook-e2e.test",
                "clientConfig": {
                    "url": adder.url,
                    "caBundle": base64.b64encode(ca_pem).decode(),
                },
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "objectSelector": {
                    "matchExpressions": [{"key": ADDER_LABEL, "operator": "Exists"}]
                },
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
                # Fail: a Pod the adder should have changed is refused rather than stored as
                # if the adder had nothing to do.
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
            }
        ],
    }


# --- a recording proxy ------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One AdmissionReview passed through: what the API server sent, what pinhook answered."""

    query: str
    request: dict[str, Any]
    response: dict[str, Any]


class RecordingProxy:
    """Forwards AdmissionReviews to pinhook and keeps each exchange.

    pinhook records no AdmissionReview version; the proxy shows which one the API server sent
    and which one pinhook answered with.
    """

    def __init__(self, tls: Tls, host: str, upstream_port: int) -> None:
        # pinhook listens on every address; its certificate is checked for ``host``.
        self.upstream = f"https://127.0.0.1:{upstream_port}"
        self.host = host
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(
            verify=ssl.create_default_context(cafile=str(tls.ca)), timeout=PROXY_TIMEOUT_S
        )
        self.server = HttpsServer(tls, host, self._forward)

    def url(self, path: str) -> str:
        return self.server.url(path)

    def exchanged(self) -> list[Exchange]:
        with self._lock:
            return list(self.exchanges)

    def _forward(self, path: str, body: bytes) -> tuple[int, bytes]:
        answer = self._client.post(
            self.upstream + path,
            content=body,
            headers={"Content-Type": JSON},
            extensions={"sni_hostname": self.host},
        )
        if answer.status_code == 200:
            _, _, query = path.partition("?")
            exchange = Exchange(query, json.loads(body), answer.json())
            with self._lock:
                self.exchanges.append(exchange)
        return answer.status_code, answer.content

    def __enter__(self) -> RecordingProxy:
        self.server.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.__exit__(exc_type, exc, tb)
        self._client.close()


# --- a registry that hangs --------------------------------------------------------------


class HangingRegistry:
    """Accepts TCP connections on loopback and never answers: a registry that hangs.

    Only pinhook talks to it, so it stays on loopback and speaks no TLS (``registry.insecure``).
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_ACCEPT_POLL_S)  # so that the thread sees the stop
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="e2e-hanging", daemon=True)

    @property
    def host(self) -> str:
        port: int = self._listener.getsockname()[1]
        return f"127.0.0.1:{port}"

    def connections(self) -> int:
        with self._lock:
            return len(self._held)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed at stop
            with self._lock:
                self._held.append(connection)

    def __enter__(self) -> HangingRegistry:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            for connection in self._held:
                with contextlib.suppress(OSError):
                    connection.close()
            self._held.clear()

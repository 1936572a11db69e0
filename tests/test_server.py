"""The real server: `pinhook serve` over TLS on loopback, certificate and config live reload."""

from __future__ import annotations

import contextlib
import gc
import queue
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.reviews import apply_response, fake_digest, review
from webhook import certs
from webhook.memory import freeze_imported_objects
from webhook.tls import server_context

NGINX = "nginx:1.27"
CONFIG = f"""
resolver: static
digests:
  "{NGINX}": "{fake_digest(NGINX)}"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Served:
    """A `pinhook serve` subprocess; its log lines are readable as events."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.cwd = cwd
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []  # the lines wait_for took off the queue
        ports = ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "webhook.cli", "serve", *ports, *args],
            cwd=cwd,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        self.wait_for("pinhook listening on")

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 20) -> str:
        seen = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {text!r} in server log: {''.join(seen)}") from None
            seen.append(line)
            self.seen.append(line)
            if text in line:
                return line

    def client(self, ca: Path) -> httpx.Client:
        return httpx.Client(
            base_url=f"https://localhost:{self.port}", verify=ssl.create_default_context(cafile=ca)
        )

    def metrics(self) -> str:
        """One scrape of the plain-HTTP metrics port."""
        answer = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
        answer.raise_for_status()
        return answer.text

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)
        self._pump_thread.join(timeout=15)  # every line it wrote is in self.lines


def test_a_stop_signal_is_logged_and_exits_0(tmp_path: Path) -> None:
    # Before: uvicorn raised SIGTERM again once it had shut down, and the default handler
    # ended the process there (status 143), before the metrics port closed or the log said so.
    server = Served([], cwd=tmp_path)
    server.stop()
    assert server.process.returncode == 0
    server.wait_for("pinhook stopped", timeout=1)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_freezing_keeps_what_lives_out_of_collections_and_no_garbage() -> None:
    living, cycle = _Node(), _Node()
    cycle.other = _Node()
    cycle.other.other = cycle
    garbage = weakref.ref(cycle)
    del cycle
    try:
        frozen = freeze_imported_objects()
        assert garbage() is None  # collected first, not frozen for good
        assert frozen > 0 and gc.get_freeze_count() > 0
        assert not any(o is living for o in gc.get_objects())  # out of every collection
    finally:
        gc.unfreeze()
    assert any(o is living for o in gc.get_objects())


def test_serve_freezes_its_modules_before_it_reads_the_settings(tmp_path: Path) -> None:
    # A full collection walked every object pinhook's imports made: 65 ms without an answer
    # under reviews that all differ, once every few seconds; 4 ms with them frozen.
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    server = Served(["--config", str(config), "--log-level", "debug"], cwd=tmp_path)
    server.stop()
    said = [orjson.loads(line)["msg"] for line in server.seen]
    frozen = [i for i, msg in enumerate(said) if "frozen out of garbage collection" in msg]
    assert len(frozen) == 1
    assert int(said[frozen[0]].split()[0]) > 10_000
    assert frozen[0] < min(i for i, msg in enumerate(said) if "pinhook listening on" in msg)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    server = Served(["--config", str(config)], cwd=tmp_path)
    yield server
    server.stop()


def pod(image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "web", "image": image}]},
    }


def peer_certificate(port: int, ca: Path) -> bytes:
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        return der


def test_serve_generates_certificate_and_answers_over_tls(served: Served) -> None:
    ca = served.cwd / "certs" / "ca.crt"
    assert ca.exists() and (served.cwd / "certs" / "tls.key").stat().st_mode & 0o077 == 0
    with served.client(ca) as client:
        for api_version in ("admission.k8s.io/v1", "admission.k8s.io/v1beta1"):
            doc = review(pod(NGINX), api_version=api_version)
            answer = client.post("/mutate", json=doc, params={"timeout": "10s"})
            assert answer.status_code == 200
            data = answer.json()
            assert data["apiVersion"] == api_version
            assert data["response"]["uid"] == doc["request"]["uid"]
            patched = apply_response(doc["request"]["object"], data["response"])
            assert patched == pod(f"{NGINX}@{fake_digest(NGINX)}")
        assert client.post("/mutate", content=b"nope").status_code == 400
        assert client.get("/readyz").json() == {"ready": True, "reason": "ok"}


def test_server_context_requires_tls12(served: Served) -> None:
    context = server_context(served.cwd / "certs" / "tls.crt", served.cwd / "certs" / "tls.key")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_certificate_hot_reload_keeps_serving(served: Served) -> None:
    cert_dir = served.cwd / "certs"
    old_ca = served.cwd / "old-ca.crt"
    shutil.copy(cert_dir / "ca.crt", old_ca)
    before = peer_certificate(served.port, old_ca)
    with served.client(old_ca) as kept:
        # A connection opened before the swap keeps working on its certificate.
        assert kept.get("/healthz").status_code == 200
        certs.write(certs.generate(["localhost"], ["127.0.0.1"]), cert_dir)
        served.wait_for("serving certificate reloaded")
        assert kept.get("/healthz").status_code == 200
    after = peer_certificate(served.port, cert_dir / "ca.crt")
    assert after != before


def test_config_reload_rejects_bad_and_applies_good(served: Served) -> None:
    config = served.cwd / "config.yaml"
    ca = served.cwd / "certs" / "ca.crt"
    with served.client(ca) as client:
        config.write_text("rewrites:\n  - from: gcr.io\n    to: 'Not A Registry'\n")
        served.wait_for("configuration rejected")
        ready = client.get("/readyz").json()
        assert ready["ready"] is True and "rejected" in ready["reason"]
        assert "pinhook_config_last_reload_valid 0.0" in served.metrics()
        # The last good config keeps serving.
        doc = review(pod(NGINX))
        answer = client.post("/mutate", json=doc).json()["response"]
        assert apply_response(doc["request"]["object"], answer) == pod(
            f"{NGINX}@{fake_digest(NGINX)}"
        )
        config.write_text(CONFIG + "output: digest-only\n")
        served.wait_for("configuration reloaded")
        answer = client.post("/mutate", json=doc).json()["response"]
        assert apply_response(doc["request"]["object"], answer) == pod(
            f"nginx@{fake_digest(NGINX)}"
        )
        assert "pinhook_config_last_reload_valid 1.0" in served.metrics()


def test_serve_refuses_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("rewrites:\n  - from: gcr.io/a\n")
    result = subprocess.run(
        [sys.executable, "-m", "webhook.cli", "serve", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "rewrites[0].to" in result.stderr


# --- connections and heavy objects, against the real server ---------------------------------


@pytest.fixture
def strict_served(tmp_path: Path) -> Iterator[Served]:
    config = tmp_path / "config.yaml"
    config.write_text(
        CONFIG + "server:\n  requestTimeoutSeconds: 1\n  handshakeTimeoutSeconds: 1\n"
    )
    server = Served(["--config", str(config)], cwd=tmp_path)
    yield server
    server.stop()


def tls_socket(served: Served) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=served.cwd / "certs" / "ca.crt")
    raw = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def test_slow_and_silent_clients_are_cut_off_while_others_are_served(
    strict_served: Served,
) -> None:
    # Before: idle and trickling connections were held for ever, 264 KiB each.
    silent = tls_socket(strict_served)
    trickling = tls_socket(strict_served)
    trickling.sendall(b"POST /mutate HTTP/1.1\r\nHost: pinhook\r\nContent-Len")
    untouched = socket.create_connection(("127.0.0.1", strict_served.port), timeout=10)
    with strict_served.client(strict_served.cwd / "certs" / "ca.crt") as client:
        doc = review(pod(NGINX))
        assert client.post("/mutate", json=doc).status_code == 200
    for sock in (silent, trickling, untouched):
        # recv returns b"" (or a TLS close) once the server closed: within the time limit.
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            assert sock.recv(1024) == b""
        sock.close()


def test_websocket_upgrades_are_plain_requests_and_free_their_connection(
    tmp_path: Path,
) -> None:
    # Before: with a WebSocket library installed (wsproto is, here), uvicorn handed an
    # upgrade request to its WebSocket protocol, the listener never saw the connection end,
    # and its slot stayed taken: maxConnections such requests refused every later client.
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG + "server:\n  maxConnections: 2\n")
    server = Served(["--config", str(config)], cwd=tmp_path)
    try:
        upgrade = (
            b"GET /mutate HTTP/1.1\r\nHost: pinhook\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        for _ in range(3):
            with tls_socket(server) as sock:
                sock.sendall(upgrade)
                assert sock.recv(1024).startswith(b"HTTP/1.1 405 ")
        with server.client(server.cwd / "certs" / "ca.crt") as client:
            assert client.post("/mutate", json=review(pod(NGINX))).status_code == 200
    finally:
        server.stop()


def test_the_event_loop_keeps_answering_while_a_huge_object_is_processed(served: Served) -> None:
    huge = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "huge"},
        "spec": {
            "containers": [{"name": f"c{i}", "image": f"example.com/x:{i}"} for i in range(50_000)]
        },
    }
    body = orjson.dumps(review(huge))
    request = (
        b"POST /mutate?timeout=10s HTTP/1.1\r\nHost: pinhook\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    probes: list[float] = []
    with served.client(served.cwd / "certs" / "ca.crt") as client:
        assert client.get("/healthz").status_code == 200  # the probe connection is open
        heavy = tls_socket(served)
        started = time.monotonic()
        heavy.sendall(request)
        heavy.setblocking(False)
        answer = b""
        while not answer:
            probe = time.monotonic()
            assert client.get("/healthz").status_code == 200
            probes.append(time.monotonic() - probe)
            with contextlib.suppress(ssl.SSLWantReadError):  # not answered yet
                answer = heavy.recv(65536)
        took = time.monotonic() - started
        heavy.close()
    assert took < 10
    assert answer.startswith(b"HTTP/1.1 200")
    # Before: the 50,000 images took 3 to 7 s of CPU on the event loop and every concurrent
    # admission waited that long. Now the walk stops at the limit and the body is decoded on
    # a worker thread: a probe waits for a fraction of a second at worst.
    assert max(probes) < 1.0, (took, max(probes))

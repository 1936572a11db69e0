"""`pinhook serve --workers N`: several processes on one port, one metrics port for them all,
reload in every worker, a dead worker started again, a clean stop."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reviews import fake_digest, review
from tests.test_operating import serve_once
from tests.test_server import CONFIG, NGINX, Served, free_port, peer_certificate, pod
from webhook import certs
from webhook.metrics import serve_metrics
from webhook.workers import MetricsChannel, WorkersCollector, answer_forever, workers_registry

WORKERS = 2
# How long a test waits for something that must happen: generous, for a loaded CI machine.
MUST_HAPPEN_S = 20.0
APPLIED = 'pinhook_config_reloads_total{result="applied"}'


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Served]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    server = Served(
        ["--config", str(config), "--workers", str(WORKERS), "--log-format", "text"], cwd=tmp_path
    )
    for _ in range(WORKERS - 1):  # Served waited for the first
        server.wait_for("pinhook listening on")
    yield server
    if server.process.poll() is None:
        server.stop()


def by_worker(metrics: str, series: str) -> dict[str, float]:
    """The value of ``series`` (name and labels but the worker's) for each worker."""
    found: dict[str, float] = {}
    pattern = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
    for line in metrics.splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        worker = re.search(r'worker="(\d+)"', labels)
        rest = re.sub(r',?worker="\d+"', "", labels).strip(",")
        if worker is not None and f"{name}{{{rest}}}" == series:
            found[worker[1]] = found.get(worker[1], 0.0) + float(value)
    return found


def eventually(check: object, what: str) -> None:
    """Waits for ``check()`` to hold: an event seen from outside, by polling."""
    assert callable(check)
    deadline = time.monotonic() + MUST_HAPPEN_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {MUST_HAPPEN_S}s: {what}")
        time.sleep(0.05)


def worker_pids(parent: int) -> set[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return {int(pid) for pid in children}


def test_connections_are_spread_over_the_workers_and_counted_on_one_port(fleet: Served) -> None:
    ca = fleet.cwd / "certs" / "ca.crt"
    admissions = 40
    for _ in range(admissions):  # a new connection each: the kernel picks a worker for each
        with fleet.client(ca) as client:
            answer = client.post("/mutate", json=review(pod(NGINX)))
            assert answer.json()["response"]["patch"]
    patched = 'pinhook_admission_requests_total{kind="Pod",operation="CREATE",result="patched"}'
    counts = by_worker(fleet.metrics(), patched)
    assert sum(counts.values()) == admissions
    assert set(counts) == {"0", "1"}, counts
    assert len(worker_pids(fleet.process.pid)) == WORKERS


def test_every_worker_follows_a_config_change(fleet: Served) -> None:
    before = by_worker(fleet.metrics(), APPLIED)
    moved = "sha256:" + "9" * 64
    (fleet.cwd / "config.yaml").write_text(f'resolver: static\ndigests:\n  "{NGINX}": "{moved}"\n')

    def all_reloaded() -> bool:
        after = by_worker(fleet.metrics(), APPLIED)
        return all(after.get(w, 0) > before.get(w, 0) for w in ("0", "1"))

    eventually(all_reloaded, "both workers reloaded the config")
    ca = fleet.cwd / "certs" / "ca.crt"
    for _ in range(10):
        with fleet.client(ca) as client:
            answer = client.post("/mutate", json=review(pod(NGINX))).json()["response"]
        assert fake_digest(NGINX) not in str(answer)
    # Before: a worker started again served the config the parent read at its start, and
    # took the file's newer stamp for that config's, so it never caught up.
    os.kill(min(worker_pids(fleet.process.pid)), signal.SIGKILL)
    fleet.wait_for("starting it again")
    fleet.wait_for("pinhook listening on")
    for _ in range(20):
        with fleet.client(ca) as client:
            answer = client.post("/mutate", json=review(pod(NGINX))).json()["response"]
        assert fake_digest(NGINX) not in str(answer)


def test_every_worker_follows_a_certificate_change(fleet: Served) -> None:
    cert_dir = fleet.cwd / "certs"
    certs.write(certs.generate(["localhost"], ["127.0.0.1"]), cert_dir)
    for _ in range(WORKERS):
        fleet.wait_for("serving certificate reloaded")
    # Connections land on either worker: every one shows the new certificate.
    new = {peer_certificate(fleet.port, cert_dir / "ca.crt") for _ in range(20)}
    assert len(new) == 1


def test_a_worker_that_dies_is_started_again(fleet: Served) -> None:
    victim = min(worker_pids(fleet.process.pid))
    os.kill(victim, signal.SIGKILL)
    fleet.wait_for("starting it again")
    fleet.wait_for("pinhook listening on")
    pids = worker_pids(fleet.process.pid)
    assert len(pids) == WORKERS and victim not in pids
    with fleet.client(fleet.cwd / "certs" / "ca.crt") as client:
        assert client.post("/mutate", json=review(pod(NGINX))).status_code == 200


def test_sigterm_stops_every_worker_and_frees_the_port(fleet: Served) -> None:
    pids = worker_pids(fleet.process.pid)
    fleet.process.send_signal(signal.SIGTERM)
    assert fleet.process.wait(timeout=MUST_HAPPEN_S) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie_of_init(pid)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", fleet.port))  # nobody holds the port any more


def _is_zombie_of_init(pid: int) -> bool:
    # Reaped by the parent before it exited, so at most a race with /proc's cleanup.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("shared", [False, True])
def test_a_busy_port_is_reported_once_before_any_worker_starts(
    tmp_path: Path, shared: bool
) -> None:
    # Before (shared): a holder that set SO_REUSEPORT too, such as a second pinhook, got the
    # port split with it, silently.
    (tmp_path / "config.yaml").write_text(CONFIG)
    with socket.socket() as holder:
        if shared:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = serve_once(
            "--config", "config.yaml", "--port", str(port), "--workers", "3", cwd=tmp_path
        )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "cannot listen" in line]
    assert len(errors) == 1, done.stderr
    assert "pinhook listening" not in done.stderr


@pytest.mark.parametrize("count", ["0", "65", "two"])
def test_worker_count_out_of_range_is_a_usage_error(tmp_path: Path, count: str) -> None:
    done = serve_once("--workers", count, "--port", str(free_port()), cwd=tmp_path)
    assert done.returncode == 2
    assert "--workers" in done.stderr
    assert "Traceback" not in done.stderr


def test_workers_stop_when_their_parent_is_killed(fleet: Served) -> None:
    # Before: a SIGKILLed parent left its workers serving on, holding the port, unseen.
    pids = worker_pids(fleet.process.pid)
    fleet.process.kill()
    fleet.process.wait(timeout=MUST_HAPPEN_S)
    eventually(
        lambda: all(not Path(f"/proc/{pid}").exists() or _is_zombie_of_init(pid) for pid in pids),
        "every worker stopped",
    )


_STUCK_FLEET = """
import os, signal, socket, sys, time
from webhook.server import bind_shared
from webhook.workers import Supervisor

def main(index, sock, channel):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker stuck past any stop
    os.write(1, b"worker\\n")  # one write: two workers' lines never interleave
    while True:
        time.sleep(1)

supervisor = Supervisor(bind_shared("127.0.0.1", 0, 2), main)
supervisor.stop_grace_seconds = 0.5
sys.exit(supervisor.run())
"""


def test_a_stop_ends_stuck_workers_after_the_grace_period(tmp_path: Path) -> None:
    # Before: the parent waited in os.wait() for a worker to exit before it even began the
    # grace period: workers that ignore SIGTERM kept it from ever stopping.
    fleet = subprocess.Popen(
        [sys.executable, "-c", _STUCK_FLEET], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert fleet.stdout is not None
        for _ in range(2):
            assert fleet.stdout.readline() == "worker\n"
        pids = worker_pids(fleet.pid)
        fleet.send_signal(signal.SIGTERM)
        assert fleet.wait(timeout=MUST_HAPPEN_S) == 0
        assert all(not Path(f"/proc/{pid}").exists() for pid in pids)  # killed and reaped
    finally:
        fleet.kill()
        fleet.wait()


def _exposition(value: int) -> bytes:
    return f"# TYPE pinhook_scrapes_total counter\npinhook_scrapes_total {value}\n".encode()


def test_a_late_answer_never_stands_for_a_later_scrape() -> None:
    # Before: an answer that missed its scrape was read by the next scrape as its own, and
    # every scrape after that was one answer behind.
    calls = itertools.count(1)
    released = threading.Event()

    def render() -> bytes:
        call = next(calls)
        if call == 1:
            released.wait(MUST_HAPPEN_S)  # later than the scrape waits
        return _exposition(call)

    channel = MetricsChannel()
    threading.Thread(
        target=answer_forever, args=(channel._worker, render, lambda: None), daemon=True
    ).start()
    collector = WorkersCollector(lambda: [(0, channel)])
    try:
        assert list(collector.collect()) == []  # not answered in time: left out
        released.set()
        (family,) = collector.collect()
        assert [sample.value for sample in family.samples] == [2.0]
    finally:
        channel.close()


def test_one_worker_answering_garbage_leaves_the_others_scraped() -> None:
    # Before: one unreadable answer raised out of the scrape, and no worker's metrics were
    # served.
    channels = [MetricsChannel(), MetricsChannel()]
    answers = [lambda: b"\xff\xfe not metrics", lambda: _exposition(7)]
    for channel, render in zip(channels, answers, strict=True):
        threading.Thread(
            target=answer_forever, args=(channel._worker, render, lambda: None), daemon=True
        ).start()
    collector = WorkersCollector(lambda: list(enumerate(channels)))
    try:
        (family,) = collector.collect()
        assert [(s.labels, s.value) for s in family.samples] == [({"worker": "1"}, 7.0)]
    finally:
        for channel in channels:
            channel.close()


def test_series_asked_for_by_name_are_served_from_every_worker() -> None:
    # Before: /metrics?name[]=... on the parent found no collector declaring that name (the
    # workers' names are known only from their answers) and served nothing.
    channels = [MetricsChannel(), MetricsChannel()]
    answer = (
        b"# TYPE pinhook_scrapes_total counter\npinhook_scrapes_total 3\n"
        b"# TYPE pinhook_other_total counter\npinhook_other_total 5\n"
    )
    for channel in channels:
        threading.Thread(
            target=answer_forever, args=(channel._worker, lambda: answer, lambda: None), daemon=True
        ).start()
    sock, stop = serve_metrics(workers_registry(lambda: list(enumerate(channels))), "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"
        asked = httpx.get(url, params={"name[]": "pinhook_scrapes_total"}).text
        whole = httpx.get(url).text
    finally:
        stop()
        for channel in channels:
            channel.close()
    served = [line for line in asked.splitlines() if not line.startswith("#")]
    assert served == [
        'pinhook_scrapes_total{worker="0"} 3.0',
        'pinhook_scrapes_total{worker="1"} 3.0',
    ]
    assert 'pinhook_other_total{worker="1"} 5.0' in whole

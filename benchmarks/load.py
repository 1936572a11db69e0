"""Load: timed throughput rounds (wrk, or our client without it) and exact bursts (our client).

Every measurement also reads the server's CPU time from /proc before and after, so each
figure comes with the CPU it cost per request.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks.stack import ROOT, BenchError, Server, cpu_seconds, which_wrk
from webhook.certs import CertPaths

CLIENT = ROOT / "benchmarks" / "client.py"
WRK_SCRIPT = ROOT / "benchmarks" / "wrk.lua"
DEADLINE_SECONDS = 10.0  # the API server's timeoutSeconds the admissions are sent with
# In a timed round every request is a new one, as the API server's are: the load generator
# writes a request counter (8 hex digits, from a random start) over each COUNTER in the body.
# The review's uid gets one; a workload may place more (an annotation) to make each review
# differ in its object too.
COUNTER = "XXXXXXXX"
FRESH_UID = f"{COUNTER}-0000-4000-8000-000000000000"


def load_generator() -> str:
    wrk = which_wrk()
    if wrk is None:
        return "benchmarks/client.py (wrk not installed: scripts/ensure-packages wrk)"
    version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False).stdout
    return version.split("[")[0].strip() or "wrk"


@dataclass(frozen=True)
class Round:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # server CPU per request
    errors: int
    backend_cpu_us: float = 0.0  # registry and token issuer CPU per request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def throughput_round(
    server: Server,
    body_file: Path,
    seconds: int,
    concurrency: int,
    certs: CertPaths,
    backend: Sequence[int] = (),
) -> Round:
    """Drive ``server`` with the one review in ``body_file`` for ``seconds``; ``backend``: the
    processes behind it (registry, token issuer), whose CPU is counted too."""
    server.check_owner()
    body_file = _with_fresh_uids(body_file)
    first = random.randrange(2**31)
    backend_before = sum(cpu_seconds(pid) for pid in backend)
    cpu_before = cpu_seconds(server.pid)
    if which_wrk() is not None:
        figures = _wrk(server, body_file, seconds, concurrency, first)
    else:
        figures = _client_round(server, body_file, seconds, concurrency, certs, first)
    cpu = cpu_seconds(server.pid) - cpu_before
    backend_cpu = sum(cpu_seconds(pid) for pid in backend) - backend_before
    server.check_owner()
    requests = max(figures.requests, 1)
    return Round(
        figures.requests,
        figures.seconds,
        figures.p50_ms,
        figures.p99_ms,
        cpu / requests * 1e6,
        figures.errors,
        backend_cpu / requests * 1e6,
    )


def _with_fresh_uids(body_file: Path) -> Path:
    """A copy of the review in ``body_file`` whose uid the load generator renews per request."""
    review = orjson.loads(body_file.read_bytes())
    review["request"]["uid"] = FRESH_UID
    fresh = body_file.with_suffix(".fresh-uids.json")
    fresh.write_bytes(orjson.dumps(review))
    return fresh


def _wrk(server: Server, body_file: Path, seconds: int, concurrency: int, first: int) -> Round:
    command = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(WRK_SCRIPT),
        server.url(),
    ]
    env = os.environ | {"PINHOOK_BENCH_BODY": str(body_file), "PINHOOK_BENCH_FIRST": str(first)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("PINHOOK-WRK ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    wrk = orjson.loads(line.split(" ", 1)[1])
    errors = sum(wrk[key] for key in ("connect", "read", "write", "status", "timeout"))
    return Round(
        wrk["requests"],
        wrk["duration_us"] / 1e6,
        wrk["p50_us"] / 1e3,
        wrk["p99_us"] / 1e3,
        0,
        errors,
    )


def _client_round(
    server: Server, body_file: Path, seconds: int, concurrency: int, certs: CertPaths, first: int
) -> Round:
    burst = _run_client(server, body_file, concurrency, certs, seconds=seconds, first=first)
    latencies = sorted(burst["latencies"])
    return Round(
        len(latencies),
        burst["elapsed"],
        percentile(latencies, 50) * 1e3,
        percentile(latencies, 99) * 1e3,
        0,
        burst["errors"] + sum(n for s, n in burst["statuses"].items() if s != "200"),
    )


@dataclass(frozen=True)
class Burst:
    """Every answer of an exact burst of admissions."""

    latencies: list[float]  # seconds, sorted
    statuses: dict[str, int]
    allowed: int
    denied: int
    warned: int
    patched: int
    pinned: int
    errors: int
    elapsed: float
    cpu_seconds: float  # the server's
    samples: list[str]  # a few warnings and denials

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies)
        return {
            "admissions": n,
            "errors": self.errors,
            "statuses": self.statuses,
            "allowed": self.allowed,
            "denied": self.denied,
            "warned": self.warned,
            "patched": self.patched,
            "images_pinned": self.pinned,
            "seconds": round(self.elapsed, 3),
            "admissions_per_s": round(n / self.elapsed, 1) if self.elapsed else None,
            "p50_ms": round(percentile(self.latencies, 50) * 1e3, 2),
            "p90_ms": round(percentile(self.latencies, 90) * 1e3, 2),
            "p99_ms": round(percentile(self.latencies, 99) * 1e3, 2),
            "max_ms": round(self.latencies[-1] * 1e3, 2) if n else None,
            "past_deadline": sum(1 for x in self.latencies if x > DEADLINE_SECONDS),
            "cpu_ms_per_admission": round(self.cpu_seconds / n * 1e3, 3) if n else None,
            "warning_and_denial_samples": self.samples,
        }


def burst(
    server: Server, bodies: Sequence[bytes], concurrency: int, certs: CertPaths, workdir: Path
) -> Burst:
    """Send each body once, ``concurrency`` at a time, over connections opened beforehand."""
    body_file = workdir / f"burst-{server.name}.jsonl"
    body_file.write_bytes(b"\n".join(bodies) + b"\n")
    server.check_owner()
    cpu_before = cpu_seconds(server.pid)
    out = _run_client(server, body_file, concurrency, certs)
    cpu = cpu_seconds(server.pid) - cpu_before
    server.check_owner()
    return Burst(
        sorted(out["latencies"]),
        out["statuses"],
        out["allowed"],
        out["denied"],
        out["warned"],
        out["patched"],
        out["pinned"],
        out["errors"],
        out["elapsed"],
        cpu,
        out["samples"],
    )


def _run_client(
    server: Server,
    body_file: Path,
    concurrency: int,
    certs: CertPaths,
    *,
    seconds: float | None = None,
    first: int | None = None,
) -> dict[str, Any]:
    out = body_file.with_suffix(".result.json")
    command = [
        sys.executable,
        str(CLIENT),
        server.url(),
        str(certs.ca_cert),
        str(body_file),
        "--concurrency",
        str(concurrency),
        "--out",
        str(out),
    ]
    if seconds is not None:
        command += ["--seconds", str(seconds)]
    if first is not None:
        command += ["--counter", COUNTER, "--first", str(first)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise BenchError(f"load client failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = orjson.loads(out.read_bytes())
    return result


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted values (0 for none)."""
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-round figures."""
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }

"""How much pinhook costs on the admission hot path, against a do-nothing webhook.

Two measurements, both with every digest already cached (the steady state of a cluster):

1. in-process: one AdmissionReview of a realistic KServe predictor Pod (5 images) through
   decode → locate → rewrite → resolve (cache hit) → patch → encode, against the do-nothing
   work of decoding the review and echoing its uid;
2. over HTTPS on loopback: `pinhook serve` and benchmarks/noop.py (the same FastAPI + uvicorn +
   TLS stack) each driven by the same load generator process, reporting requests per second,
   latency percentiles and the server's resident memory.

Run: .venv/bin/python benchmarks/admission.py [--seconds 10] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.reviews import body, fake_digest, load_object, review  # noqa: E402
from webhook import certs  # noqa: E402
from webhook.admission import parse_review, render_response  # noqa: E402
from webhook.config import load_settings  # noqa: E402
from webhook.mutate import Mutator  # noqa: E402
from webhook.resolve import CachingResolver, StaticDigestResolver  # noqa: E402

POD = load_object("pod-kserve-predictor.yaml")
IMAGES = [
    "kserve/storage-initializer:v0.15.2",
    "kserve/sklearnserver:v0.15.2",
    "kserve/agent:v0.15.2",
    "registry.k8s.io/e2e-test-images/agnhost:2.53",
    "ghcr.io/acme/models/iris:1.0",
]
CONFIG = "resolver: static\ndigests:\n" + "".join(
    f'  "{image}": "{fake_digest(image)}"\n' for image in IMAGES
)


async def in_process(iterations: int) -> tuple[float, float]:
    settings = load_settings(CONFIG)
    resolver = CachingResolver(StaticDigestResolver(settings.digest_table), settings.cache)
    mutator = Mutator(settings, resolver)
    payload = body(review(POD, namespace="models"))

    async def pinhook() -> None:
        request = parse_review(payload)
        outcome = await mutator.review(request)
        assert outcome.patch
        render_response(request.api_version, request.uid, outcome)

    async def noop() -> None:
        doc = orjson.loads(payload)
        orjson.dumps({"response": {"uid": doc["request"]["uid"], "allowed": True}})

    results = []
    for handler in (pinhook, noop):
        for _ in range(200):
            await handler()
        started = time.perf_counter()
        for _ in range(iterations):
            await handler()
        results.append((time.perf_counter() - started) / iterations * 1e6)
    return results[0], results[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(command: list[str], url: str, ca: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    with httpx.Client(verify=str(ca)) as client:
        while time.monotonic() < deadline:
            try:
                if client.get(url + "/healthz").status_code == 200:
                    return process
            except httpx.TransportError:
                time.sleep(0.1)  # a separate process: there is no event to await
    process.kill()
    raise SystemExit(f"server {command} did not start")


async def load(url: str, ca: Path, seconds: float, concurrency: int) -> list[float]:
    payload = body(review(POD, namespace="models"))
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(verify=str(ca), limits=limits, base_url=url) as client:
        stop = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < stop:
                began = time.perf_counter()
                answer = await client.post("/mutate", content=payload)
                answer.raise_for_status()
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("PINHOOK_BENCH_BODY"), "rb")
wrk.body = f:read("*a")
f:close()
"""


def wrk(url: str, tmp: Path, seconds: float, concurrency: int) -> dict[str, float]:
    """Drive the server with wrk (Debian package `wrk`): a C load generator on one thread,
    so the Python client is not what gets measured."""
    body_file = tmp / "review.json"
    body_file.write_bytes(body(review(POD, namespace="models")))
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    command = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds:.0f}s",
        "--latency",
        "-s",
        str(script),
        url + "/mutate",
    ]
    env = os.environ | {"PINHOOK_BENCH_BODY": str(body_file)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"errors under load:\n{out}")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _wrk_ms(out, "50%"),
        "p99_ms": _wrk_ms(out, "99%"),
    }


def _wrk_ms(out: str, label: str) -> float:
    match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
    assert match is not None, out
    return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]


def over_https(seconds: float, concurrency: int) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        paths = certs.ensure_self_signed(tmp / "certs")
        config = tmp / "config.yaml"
        config.write_text(CONFIG)
        python = sys.executable
        servers = {
            "noop": [python, "benchmarks/noop.py", "18444", str(paths.cert), str(paths.key)],
            "pinhook": [
                python,
                "-m",
                "webhook.cli",
                "--log-level",
                "warning",
                "serve",
                "--port",
                "18443",
                "--config",
                str(config),
                "--cert",
                str(paths.cert),
                "--key",
                str(paths.key),
            ],
        }
        ports = {"noop": 18444, "pinhook": 18443}
        for name, command in servers.items():
            url = f"https://localhost:{ports[name]}"
            process = start(command, url, paths.ca_cert)
            try:
                asyncio.run(load(url, paths.ca_cert, 1.0, concurrency))  # warm up
                if shutil.which("wrk"):
                    row = wrk(url, tmp, seconds, concurrency)
                else:
                    latencies = sorted(asyncio.run(load(url, paths.ca_cert, seconds, concurrency)))
                    row = {
                        "rps": len(latencies) / seconds,
                        "p50_ms": statistics.median(latencies) * 1000,
                        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
                    }
                figures[name] = row | {"rss_mib": rss_mib(process.pid)}
            finally:
                process.terminate()
                process.wait()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cpus, python {sys.version.split()[0]}")
    pinhook_us, noop_us = asyncio.run(in_process(args.iterations))
    print(
        f"in-process, 5-image KServe Pod, cached digests: pinhook {pinhook_us:.1f} us/review,"
        f" do-nothing {noop_us:.1f} us/review, pinhook adds {pinhook_us - noop_us:.1f} us"
    )
    figures = over_https(args.seconds, args.concurrency)
    for name, row in figures.items():
        print(
            f"https {name:8} {row['rps']:8.0f} req/s  p50 {row['p50_ms']:6.2f} ms"
            f"  p99 {row['p99_ms']:6.2f} ms  rss {row['rss_mib']:6.1f} MiB"
        )
    ratio = figures["pinhook"]["rps"] / figures["noop"]["rps"]
    driver = "wrk" if shutil.which("wrk") else "httpx (install wrk for steadier figures)"
    print(
        f"pinhook throughput = {ratio:.0%} of the do-nothing webhook "
        f"(concurrency {args.concurrency}, {args.seconds:.0f} s each, load from {driver})"
    )


if __name__ == "__main__":
    main()

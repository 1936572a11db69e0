"""Soak: everything hostile at once, at a bounded rate, for a few minutes, against the real
server, a real registry and a registry of our own that never answers.

Marked slow (``scripts/test -m slow``). While objects with thousands of tags, huge objects,
invalid references, images on a hanging registry, slow and silent clients and idle
connections come in, every admission must be answered within its deadline; afterwards memory
must come back to where it was after a warm-up round of the same mix (first use grows the
caches and the allocator's pools once; a leak would grow them on every round), and a normal
admission must still pin.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.faults import FaultServer, Reply
from tests.harness.fixtures import RegistryEnv
from tests.reviews import apply_response, plain_pod, review
from tests.test_server import Served

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("PINHOOK_SOAK_SECONDS", "180"))
WARM_UP_SECONDS = 20.0
RATE_PER_SECOND = 20  # admissions started per second, of every kind together
DEADLINE_S = 10.0  # the API server's timeoutSeconds


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Mix:
    """One hostile or normal admission after another, in turn, as request bodies made
    beforehand (the test's own encoding must not eat the machine it measures)."""

    def __init__(self, good: str, registry: str, hanging: str) -> None:
        self.turn = 0
        self.good = orjson.dumps(review(plain_pod(good)))
        self.invalid = orjson.dumps(
            review(plain_pod("Nope:1", "host:99999999999999999999/x:1", good))
        )
        self.huge = orjson.dumps(
            review(plain_pod(*(f"example.invalid/huge:{i}" for i in range(20_000))))
        )
        self.registry, self.hanging = registry, hanging

    def next(self) -> bytes:
        self.turn += 1
        n = self.turn
        match n % 10:
            case 0:  # thousands of new tags in one object
                images = (f"{self.registry}/soak/flood:t{n}-{i}" for i in range(2000))
                return orjson.dumps(review(plain_pod(*images)))
            case 1:  # a huge object
                return self.huge
            case 2:  # invalid references, one with an out-of-range port
                return self.invalid
            case 3:  # a registry that never answers
                return orjson.dumps(review(plain_pod(f"{self.hanging}/stuck/app:{n}")))
            case _:  # normal
                return self.good


async def slow_clients(port: int, context: ssl.SSLContext, stop: asyncio.Event) -> int:
    """Silent and trickling clients, over and over; returns how many were cut off."""
    cut = 0
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="localhost"
            )
        except OSError:
            await asyncio.sleep(0.2)
            continue
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: x\r\n")
        try:
            async with asyncio.timeout(30):
                while await reader.read(1024):
                    pass
            cut += 1
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        writer.close()
    return cut


async def idle_connections(port: int, context: ssl.SSLContext, count: int) -> list[Any]:
    held = []
    for _ in range(count):
        try:
            held.append(
                await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="localhost"
                )
            )
        except (OSError, ssl.SSLError):
            break
    return held


async def test_everything_hostile_at_once_for_minutes(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    good = registry.push.index("soak/good", "1.0")
    async with FaultServer() as hanging:
        hanging.route("/v2/stuck/app/manifests/1", Reply(hang=True))
        config = tmp_path / "config.yaml"
        hosts = f'["{registry.host}", "{hanging.host}"]'
        config.write_text(
            f"registry:\n  insecure: {hosts}\n  allowedHosts: {hosts}\n"
            "cache:\n  ttlSeconds: 5\n"
            "server:\n  requestTimeoutSeconds: 2\n  idleTimeoutSeconds: 5\n"
        )
        served = await asyncio.to_thread(Served, ["--config", str(config)], tmp_path)
        try:
            await soak(served, tmp_path, good.tag_ref, good.digest, registry.host, hanging.host)
        finally:
            served.stop()


async def soak(
    served: Served, tmp_path: Path, good: str, digest: str, registry: str, hanging: str
) -> None:
    context = ssl.create_default_context(cafile=tmp_path / "certs" / "ca.crt")
    base = f"https://localhost:{served.port}"
    # Idle connections kept for less time than the server keeps them, as the API server's
    # client does (90 s against pinhook's 120 s default; here 2 s against 5 s).
    limits = httpx.Limits(max_connections=64, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=base, verify=context, timeout=30, limits=limits) as http:
        mix = Mix(good, registry, hanging)
        await run_mix(http, mix, WARM_UP_SECONDS)
        await asyncio.sleep(IDLE_S)
        baseline = rss_mib(served.process.pid)
        stop = asyncio.Event()
        trickle = asyncio.create_task(slow_clients(served.port, context, stop))
        held = await idle_connections(served.port, context, 100)
        slowest, failures = await run_mix(http, mix, SOAK_SECONDS)
        stop.set()
        cut = await trickle
        for _reader, writer in held:
            writer.close()
        assert failures == [], failures[:10]
        assert slowest < DEADLINE_S
        assert cut > 0  # slow clients were cut off, not held
        # Memory comes back to where it was once the load is gone: past the idle timeout the
        # server has dropped every connection, and its periodic trim has run.
        await asyncio.sleep(IDLE_S)
        after = rss_mib(served.process.pid)
        assert after - baseline < 30, (baseline, after)
        # And a normal admission still pins.
        document = review(plain_pod(good))
        answer = await http.post("/mutate?timeout=10s", json=document)
        stored = apply_response(document["request"]["object"], answer.json()["response"])
        assert stored["spec"]["containers"][0]["image"] == f"{good}@{digest}"


# Past the 5 s idle timeout set for this test and the 30 s trim interval.
IDLE_S = 35.0


async def run_mix(http: httpx.AsyncClient, mix: Mix, seconds: float) -> tuple[float, list[str]]:
    """Start RATE_PER_SECOND admissions a second for ``seconds``; the slowest and what failed."""
    slowest = 0.0
    failures: list[str] = []

    async def admit(content: bytes) -> None:
        nonlocal slowest
        started = time.monotonic()
        answer = await http.post("/mutate?timeout=10s", content=content)
        took = time.monotonic() - started
        slowest = max(slowest, took)
        if answer.status_code != 200 or took >= DEADLINE_S:
            failures.append(f"{answer.status_code} after {took:.1f}s")

    tasks: list[asyncio.Task[None]] = []
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        tasks.append(asyncio.create_task(admit(mix.next())))
        await asyncio.sleep(1 / RATE_PER_SECOND)  # the rate is the point here
    await asyncio.gather(*tasks)
    return slowest, failures

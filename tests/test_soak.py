"""Soak: a bounded burst of admissions against the real server and a real registry.

Marked slow (run with `scripts/test -m slow`): it checks that memory stays bounded and every
answer is right while tags keep moving, not how fast anything is.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import httpx
import pytest

from tests.harness.fixtures import RegistryEnv
from tests.reviews import apply_response, review
from tests.test_server import Served

pytestmark = pytest.mark.slow

ROUNDS = 20
PER_ROUND = 200


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def pod(image: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "soak"},
        "spec": {"containers": [{"name": "app", "image": image}]},
    }


async def test_memory_bounded_and_answers_right_under_load(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    images = [registry.push.index(f"soak/app{i}", "v1") for i in range(10)]
    config = tmp_path / "config.yaml"
    config.write_text(
        f'registry:\n  insecure: ["{registry.host}"]\n  allowedHosts: ["{registry.host}"]\n'
        "cache:\n  ttlSeconds: 1\n"
    )
    served = await asyncio.to_thread(Served, ["--config", str(config)], tmp_path)
    try:
        context = ssl.create_default_context(cafile=tmp_path / "certs" / "ca.crt")
        async with httpx.AsyncClient(
            base_url=f"https://localhost:{served.port}", verify=context, timeout=15
        ) as client:
            samples = []
            for round_ in range(ROUNDS):
                docs = [review(pod(images[i % 10].tag_ref)) for i in range(PER_ROUND)]
                answers = await asyncio.gather(*(client.post("/mutate", json=d) for d in docs))
                for doc, answer in zip(docs, answers, strict=True):
                    response = answer.json()["response"]
                    image = apply_response(doc["request"]["object"], response)["spec"][
                        "containers"
                    ][0]["image"]
                    assert "@sha256:" in image, response
                if round_ % 5 == 4:
                    samples.append(rss_kib(served.process.pid))
            # After warm-up, resident memory must not keep growing round after round.
            assert samples[-1] - samples[0] < 20 * 1024, samples
    finally:
        served.stop()

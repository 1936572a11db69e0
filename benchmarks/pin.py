"""How long ``pinhook pin`` takes over a 1,000-image repository of manifests.

The repository: 200 files, each a Pod (two containers and an init container) and a Knative
Service (two containers), 5 images per file, naming 100 distinct tags (20 repositories of 5
tags) pushed to a real loopback ``docker-registry`` through the test harness. Measured, each
as the ``pinhook`` command a CI job runs (a new process, so the digest cache starts empty):

- ``pin -i``, cold: every tag resolved at the registry, every file rewritten in place;
- ``pin --check --offline`` over the unpinned repository: form only, no registry;
- ``pin --check`` over the pinned repository: the CI gate once everything is pinned.

It also counts the manifest requests the registry saw during ``pin -i`` (one per distinct
tag is the goal). Prints a table, then one JSON line.

Run: .venv/bin/python benchmarks/pin.py [--files 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.push import Pusher  # noqa: E402
from tests.harness.registry import RunningRegistry  # noqa: E402

REPOSITORIES = 20
TAGS_PER_REPOSITORY = 5
IMAGES_PER_FILE = 5


def image(host: str, n: int) -> str:
    """The n-th image reference; 100 distinct tags, each used by many files."""
    distinct = n % (REPOSITORIES * TAGS_PER_REPOSITORY)
    return f"{host}/bench/app{distinct // TAGS_PER_REPOSITORY}:1.{distinct % TAGS_PER_REPOSITORY}"


def manifest(host: str, index: int) -> str:
    first = index * IMAGES_PER_FILE
    images = [image(host, first + k * 7) for k in range(IMAGES_PER_FILE)]
    return f"""# service {index}: a Pod and a Knative Service, as a repository keeps them
apiVersion: v1
kind: Pod
metadata:
  name: worker-{index}
  labels: {{app: worker-{index}}}
spec:
  initContainers:
  - name: migrate
    image: {images[0]}   # runs first
  containers:
  - name: app
    image: "{images[1]}"
  - name: sidecar
    image: '{images[2]}'
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: api-{index}
spec:
  template:
    spec:
      containers:
      - image: {images[3]}
        ports: [{{containerPort: 8080}}]
      - image: {images[4]}
"""


def push_all(registry: RunningRegistry) -> None:
    with httpx.Client(base_url=registry.url, timeout=30) as client:
        pusher = Pusher(client)
        for repository in range(REPOSITORIES):
            for tag in range(TAGS_PER_REPOSITORY):
                pusher.image(f"bench/app{repository}", f"1.{tag}")


def write_repository(root: Path, host: str, files: int) -> None:
    shutil.rmtree(root, ignore_errors=True)
    for index in range(files):
        directory = root / f"team{index % 10}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"service-{index}.yaml").write_text(manifest(host, index))


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "webhook.cli", *args],
        capture_output=True,
        check=False,
        cwd=ROOT,
    )
    elapsed = time.perf_counter() - started
    if result.returncode not in (0, 1):
        raise SystemExit(f"pinhook {' '.join(args)} failed:\n{result.stderr.decode()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    with RunningRegistry("none") as registry, tempfile.TemporaryDirectory() as tmp:
        push_all(registry)
        work = Path(tmp)
        config = work / "config.yaml"
        host = registry.host
        config.write_text(f'registry:\n  insecure: ["{host}"]\n  allowedHosts: ["{host}"]\n')
        repository = work / "repo"
        base = ["pin", "-q", "--config", str(config), "-f", str(repository)]
        cold, offline, gate, requests = [], [], [], []
        for _ in range(options.repeat):
            write_repository(repository, host, options.files)
            offline.append(timed([*base, "--check", "--offline"]))
            before = registry.count_requests("HEAD", "/manifests/")
            cold.append(timed([*base, "-i"]))
            requests.append(registry.count_requests("HEAD", "/manifests/") - before)
            gate.append(timed([*base, "--check"]))
        figures = {
            "files": options.files,
            "images": options.files * IMAGES_PER_FILE,
            "distinct_tags": REPOSITORIES * TAGS_PER_REPOSITORY,
            "registry_manifest_requests": max(requests),
            "pin_in_place_cold_s": round(statistics.median(cold), 2),
            "check_offline_s": round(statistics.median(offline), 2),
            "check_pinned_s": round(statistics.median(gate), 2),
            "python": sys.version.split()[0],
        }
    print(f"{'':34} {'median s':>9}")
    print(f"{'pin -i (cold cache)':34} {figures['pin_in_place_cold_s']:>9.2f}")
    print(f"{'pin --check --offline (unpinned)':34} {figures['check_offline_s']:>9.2f}")
    print(f"{'pin --check (pinned)':34} {figures['check_pinned_s']:>9.2f}")
    print(
        f"{figures['files']} files, {figures['images']} images, {figures['distinct_tags']}"
        f" distinct tags, {figures['registry_manifest_requests']} manifest requests"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

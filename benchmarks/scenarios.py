"""The benchmark scenarios. Each starts what it needs, measures, stops it all and returns an
Outcome: figures for the JSON line and rows for the table."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.client
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from benchmarks.load import (
    COUNTER,
    DEADLINE_SECONDS,
    Burst,
    Round,
    burst,
    percentile,
    spread,
    throughput_round,
)
from benchmarks.stack import (
    Admissions,
    BenchError,
    DirectLookup,
    HttpxLookup,
    Registry,
    Server,
    accepted_connections,
    metrics_port,
    noop_command,
    peer_setup,
    pinhook_command,
    pinhook_config,
    pinned_images,
    rss_mib,
    serving,
)
from tests.harness.redisserver import RedisNotInstalled, RunningRedis
from tests.reviews import load_object, plain_pod, review
from webhook.certs import CertPaths

Row = tuple[str, str]


@dataclass
class Settings:
    """How much of everything: ``quick`` shrinks every count for a fast look."""

    quick: bool = False
    rounds: int = 6
    round_seconds: int = 3
    concurrency: int = 16
    cold_lookups: int = 100
    slow_pods: int = 6
    rollout_admissions: int = 200
    rollout_namespaces: int = 20
    burst_tags: int = 2000
    burst_concurrency: int = 200
    cached_digests: int = 10_000
    idle_connections: int = 1000
    scale_out_tags: int = 3

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if not quick:
            return cls()
        return cls(
            quick=True,
            rounds=3,
            round_seconds=1,
            cold_lookups=20,
            slow_pods=2,
            burst_tags=400,
            burst_concurrency=100,
            cached_digests=2000,
            idle_connections=300,
            scale_out_tags=1,
        )


@dataclass
class Context:
    workdir: Path
    certs: CertPaths
    settings: Settings
    peer_binary: Path | None = None


@dataclass
class Outcome:
    figures: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    def row(self, label: str, text: str) -> None:
        self.rows.append((label, text))


Scenario = Callable[[Context], Outcome]


# --- servers -----------------------------------------------------------------------------


def _pinhook(
    ctx: Context, config: str, name: str = "pinhook"
) -> contextlib.AbstractContextManager[Server]:
    path = ctx.workdir / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(config)
    return serving(
        name, pinhook_command(path, ctx.certs), path="/mutate", certs=ctx.certs, workdir=ctx.workdir
    )


def _noop(
    ctx: Context, name: str = "noop", answer: Path | None = None, *, uvicorn_tls: bool = False
) -> contextlib.AbstractContextManager[Server]:
    return serving(
        name,
        noop_command(ctx.certs, answer, uvicorn_tls=uvicorn_tls),
        path="/mutate",
        certs=ctx.certs,
        workdir=ctx.workdir,
    )


def _peer(ctx: Context) -> contextlib.AbstractContextManager[Server]:
    assert ctx.peer_binary is not None
    command, env = peer_setup(ctx.peer_binary, ctx.certs, ctx.workdir)
    return serving(
        "k8s-digester", command, path="/v1/mutate", certs=ctx.certs, workdir=ctx.workdir, env=env
    )


# --- workloads ---------------------------------------------------------------------------

# The KServe predictor Pod's images and where the loopback registry keeps each.
KSERVE_IMAGES = {
    "kserve/storage-initializer:v0.15.2": ("kserve/storage-initializer", "v0.15.2"),
    "kserve/sklearnserver:v0.15.2": ("kserve/sklearnserver", "v0.15.2"),
    "kserve/agent:v0.15.2": ("kserve/agent", "v0.15.2"),
    "registry.k8s.io/e2e-test-images/agnhost:2.53": ("e2e-test-images/agnhost", "2.53"),
    "ghcr.io/acme/models/iris:1.0": ("acme/models/iris", "1.0"),
}


def kserve_pod(registry: Registry) -> dict[str, Any]:
    """tests/data/objects/pod-kserve-predictor.yaml with its five images on the registry."""
    moved = {}
    for image, (repo, tag) in KSERVE_IMAGES.items():
        registry.push(repo, tag)
        moved[image] = f"{registry.host}/{repo}:{tag}"
    pod: dict[str, Any] = _swap_images(load_object("pod-kserve-predictor.yaml"), moved)
    return pod


def _swap_images(value: Any, moved: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {key: _swap_images(item, moved) for key, item in value.items()}
    if isinstance(value, list):
        return [_swap_images(item, moved) for item in value]
    return moved.get(value, value) if isinstance(value, str) else value


def admission(obj: dict[str, Any], namespace: str = "default") -> bytes:
    return orjson.dumps(review(copy.deepcopy(obj), namespace=namespace))


def _seeded(registry: Registry, refs: list[tuple[str, str]]) -> dict[str, str]:
    base = registry.push("bench/base", "v1")
    return registry.seed(base, refs)


# --- 1. warm -----------------------------------------------------------------------------

FIXED_ANSWER = "fixed-answer"
# The do-nothing webhook on uvicorn's own TLS, as any ASGI app would serve: how pinhook's
# listener compares with it.
UVICORN_TLS = "noop, uvicorn's TLS"
# pinhook again, on reviews that each differ in their object too (an annotation): no review is
# like another, so none is answered as an earlier one was (``webhook/answers.py``).
UNLIKE = "pinhook, unlike reviews"


class Workload(NamedTuple):
    name: str
    server: Server
    body_file: Path


def warm(ctx: Context) -> Outcome:
    """Every digest cached: pinhook vs the do-nothing webhook (and the peer), interleaved.

    Also the do-nothing webhook answering with pinhook's own answer (``fixed-answer``): what
    reading the review and sending that answer cost on this stack, whoever works it out.
    The reviews are those of one ReplicaSet's Pods, alike but for their uid; ``UNLIKE`` sends
    pinhook reviews that differ in their object as well.
    """
    s = ctx.settings
    outcome = Outcome()
    with Registry(ctx.workdir) as registry, ExitStack() as stack:
        pod = kserve_pod(registry)
        body_file = ctx.workdir / "warm-review.json"
        body_file.write_bytes(admission(pod, namespace="models"))
        unlike_file = ctx.workdir / "warm-review-unlike.json"
        unlike_file.write_bytes(admission(_annotated(pod, f"unlike-{COUNTER}"), "models"))
        pinhook = stack.enter_context(_pinhook(ctx, pinhook_config(registry.host)))
        pinned, traffic, answers = {}, {}, {}
        pinned["pinhook"], traffic["pinhook"], answers["pinhook"] = _probe(
            ctx, pinhook, registry, body_file
        )
        answer_file = ctx.workdir / "warm-answer.json"
        answer_file.write_bytes(orjson.dumps(answers["pinhook"]))
        servers = [
            stack.enter_context(_noop(ctx)),
            stack.enter_context(_noop(ctx, FIXED_ANSWER, answer_file)),
            pinhook,
            stack.enter_context(_noop(ctx, UVICORN_TLS, uvicorn_tls=True)),
        ]
        if ctx.peer_binary is not None:
            servers.append(stack.enter_context(_peer(ctx)))
        workloads = [Workload(server.name, server, body_file) for server in servers]
        workloads.insert(3, Workload(UNLIKE, pinhook, unlike_file))
        for workload in workloads:
            if workload.name != "pinhook":
                pinned[workload.name], traffic[workload.name], answers[workload.name] = _probe(
                    ctx, workload.server, registry, workload.body_file
                )
        if answers[FIXED_ANSWER]["patch"] != answers["pinhook"]["patch"]:
            raise BenchError("the fixed-answer webhook does not answer as pinhook does")
        for workload in workloads:  # warm-up, not recorded
            throughput_round(workload.server, workload.body_file, 1, s.concurrency, ctx.certs)
        rounds = _interleaved(ctx, workloads, registry.pids)
        figures = {
            workload.name: _round_figures(rounds[workload.name], workload, pinned, traffic)
            for workload in workloads
        }
    outcome.figures = {"servers": figures, "ratios": _warm_ratios(figures)}
    outcome.figures["method"] = (
        f"{s.rounds} interleaved rounds of {s.round_seconds}s per server, concurrency"
        f" {s.concurrency}, medians; a 5-image KServe predictor Pod, a new uid per request"
        f" ('{UNLIKE}': a new annotation too); pinhook on its production registry resolver,"
        " every digest cached"
    )
    for name, f in figures.items():
        outcome.row(
            name,
            f"{f['rps']['median']:.0f} req/s ({f['rps']['min']:.0f}-{f['rps']['max']:.0f}),"
            f" p50 {f['p50_ms']['median']:.2f} ms, p99 {f['p99_ms']['median']:.2f} ms,"
            f" CPU {f['cpu_us_per_request']['median']:.0f} us/req, pins {f['images_pinned']}"
            f" images, {f['registry_requests_per_admission']:.0f} registry+token requests and"
            f" {f['registry_cpu_us_per_request']['median']:.0f} us of their CPU per admission"
            + (f" [{f['stack']}]" if f["stack"] else ""),
        )
    for label, r in outcome.figures["ratios"].items():
        outcome.row(
            label,
            f"throughput {r['rps']:.2f}x, p50 {r['p50']:.2f}x, p99 {r['p99']:.2f}x,"
            f" CPU {r['cpu']:.2f}x ({r['cpu_extra_us']:+.0f} us/req)",
        )
    return outcome


def _annotated(obj: dict[str, Any], value: str) -> dict[str, Any]:
    annotated = copy.deepcopy(obj)
    annotated.setdefault("metadata", {}).setdefault("annotations", {})["bench/unlike"] = value
    return annotated


def _probe(
    ctx: Context, server: Server, registry: Registry, body_file: Path
) -> tuple[int, float, dict[str, Any]]:
    """Images the server pins in the workload, registry requests one admission causes, and
    the server's answer."""
    review = orjson.loads(body_file.read_bytes())
    with Admissions(server, ctx.certs) as client:
        for n in range(2):
            # The first admission resolves; the second shows what the steady state costs.
            before = registry.requests_served()
            uid = review["request"]["uid"] = f"probe-{n}"
            status, response, _ = client.post(orjson.dumps(review))
            if status != 200 or not response.get("allowed") or response.get("uid") != uid:
                raise BenchError(f"{server.name} answered review {uid} with {status}: {response}")
    after = registry.requests_served()
    return pinned_images(response), float(after - before), response


def _interleaved(
    ctx: Context, workloads: list[Workload], backend: tuple[int, ...]
) -> dict[str, list[Round]]:
    """Alternating short rounds, the order reversed every round: a noisy neighbour or a
    thermal drift hits every server alike."""
    s = ctx.settings
    rounds: dict[str, list[Round]] = {workload.name: [] for workload in workloads}
    for n in range(s.rounds):
        for workload in workloads if n % 2 == 0 else reversed(workloads):
            rounds[workload.name].append(
                throughput_round(
                    workload.server,
                    workload.body_file,
                    s.round_seconds,
                    s.concurrency,
                    ctx.certs,
                    backend,
                )
            )
    return rounds


def _round_figures(
    rounds: list[Round], workload: Workload, pinned: dict[str, int], traffic: dict[str, float]
) -> dict[str, Any]:
    return {
        "rps": spread([r.rps for r in rounds]),
        "p50_ms": spread([r.p50_ms for r in rounds]),
        "p99_ms": spread([r.p99_ms for r in rounds]),
        "cpu_us_per_request": spread([r.cpu_us for r in rounds]),
        "registry_cpu_us_per_request": spread([r.backend_cpu_us for r in rounds]),
        "requests": sum(r.requests for r in rounds),
        "errors": sum(r.errors for r in rounds),
        "images_pinned": pinned[workload.name],
        "registry_requests_per_admission": traffic[workload.name],
        "stack": workload.server.stack,
    }


def _warm_ratios(figures: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """pinhook's figures over every other server's, and over the do-nothing webhook's on
    unlike reviews, keyed "pinhook / noop" and so on."""
    ratios = {}
    for name, other in figures.items():
        if name in ("pinhook", UNLIKE):
            continue
        ratios[f"pinhook / {name}"] = _ratio(figures["pinhook"], other)
    if UNLIKE in figures and "noop" in figures:
        ratios[f"{UNLIKE} / noop"] = _ratio(figures[UNLIKE], figures["noop"])
    return ratios


def _ratio(mine: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    return {
        "rps": round(mine["rps"]["median"] / other["rps"]["median"], 3),
        "p50": round(mine["p50_ms"]["median"] / other["p50_ms"]["median"], 3),
        "p99": round(mine["p99_ms"]["median"] / other["p99_ms"]["median"], 3),
        "cpu": round(
            mine["cpu_us_per_request"]["median"] / other["cpu_us_per_request"]["median"], 3
        ),
        "cpu_extra_us": round(
            mine["cpu_us_per_request"]["median"] - other["cpu_us_per_request"]["median"], 1
        ),
    }


# --- 2. cold versus direct ---------------------------------------------------------------


# Every repository of one client starts with cold/<variant>/<client>/.
def _new_tag(name: str, i: int) -> tuple[str, str]:
    return f"cold/new_tag/{name}/app", f"t{i}"


def _new_repository(name: str, i: int) -> tuple[str, str]:
    return f"cold/new_repository/{name}/r{i}", "v1"


COLD_VARIANTS = {"new_tag": _new_tag, "new_repository": _new_repository}


def cold(ctx: Context) -> Outcome:
    """A new tag per admission, against a client doing the token fetch and HEAD itself.

    Two variants: a new tag of a repository that was used before (pinhook may hold a token
    for it), and a new repository (a token is needed, as the direct client fetches every
    time). Each client has repositories of its own, so the registry's access log tells what
    each one sent.
    """
    n = ctx.settings.cold_lookups
    names = ["pinhook", "direct", "httpx"] + (["k8s-digester"] if ctx.peer_binary else [])
    refs = [_new_tag(name, -1) for name in names]  # the warm-up lookups
    for variant in COLD_VARIANTS.values():
        refs += [variant(name, i) for name in names for i in range(n)]
    outcome = Outcome()
    with Registry(ctx.workdir) as registry, ExitStack() as stack:
        _seeded(registry, refs)
        servers = {"pinhook": stack.enter_context(_pinhook(ctx, pinhook_config(registry.host)))}
        if ctx.peer_binary is not None:
            servers["k8s-digester"] = stack.enter_context(_peer(ctx))
        lookups = _cold_lookups(ctx, registry, servers, stack)
        for name, lookup in lookups.items():
            lookup(*_new_tag(name, -1))  # open connections, as a cluster's webhook has them
        for kind, ref in COLD_VARIANTS.items():
            seconds: dict[str, list[float]] = {name: [] for name in lookups}
            traffic = _traffic(registry, kind, names)
            for i in range(n):
                order = names[i % len(names) :] + names[: i % len(names)]
                for name in order:
                    seconds[name].append(lookups[name](*ref(name, i)))
            traffic = {
                name: (count - traffic[name]) / n
                for name, count in _traffic(registry, kind, names).items()
            }
            outcome.figures[kind] = _cold_figures(seconds, traffic)
            _cold_rows(outcome, kind, outcome.figures[kind])
    return outcome


def _traffic(registry: Registry, variant: str, names: list[str]) -> dict[str, float]:
    """Registry manifest plus token requests so far, of each client's repositories."""
    counts = {}
    for name in names:
        repos = f"cold/{variant}/{name}/"
        counts[name] = float(registry.traffic(repos).total)
    return counts


def _cold_lookups(
    ctx: Context, registry: Registry, servers: dict[str, Server], stack: ExitStack
) -> dict[str, Callable[[str, str], float]]:
    lookups: dict[str, Callable[[str, str], float]] = {}
    for name, server in servers.items():
        lookups[name] = _admit_one(stack.enter_context(Admissions(server, ctx.certs)), registry)
    for name, client in (("direct", DirectLookup(registry)), ("httpx", HttpxLookup(registry))):
        stack.callback(client.close)
        lookups[name] = _by_hand(name, client)
    return lookups


def _by_hand(name: str, client: DirectLookup | HttpxLookup) -> Callable[[str, str], float]:
    def lookup(repo: str, tag: str) -> float:
        digest, seconds = client.digest(repo, tag)
        if not digest:
            raise BenchError(f"{name} lookup of {repo}:{tag} found no digest")
        return seconds

    return lookup


def _admit_one(client: Admissions, registry: Registry) -> Callable[[str, str], float]:
    def admit(repo: str, tag: str) -> float:
        pod = plain_pod(f"{registry.host}/{repo}:{tag}")
        status, response, seconds = client.post(admission(pod))
        if status != 200 or pinned_images(response) != 1:
            raise BenchError(f"{client.server.name} did not pin {repo}:{tag}: {status} {response}")
        return seconds

    return admit


def _cold_figures(seconds: dict[str, list[float]], traffic: dict[str, float]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name, values in seconds.items():
        ordered = sorted(values)
        figures[name] = {
            "median_ms": round(percentile(ordered, 50) * 1e3, 3),
            "p90_ms": round(percentile(ordered, 90) * 1e3, 3),
            "lookups": len(ordered),
            "manifest_and_token_requests_per_lookup": round(traffic[name], 2),
        }
    direct = figures["direct"]["median_ms"]
    mine = figures["pinhook"]["median_ms"]
    figures["pinhook_over_direct"] = round(mine / direct, 3)
    # What pinhook adds to its HTTP library's own token + HEAD (less than a whole miss for a
    # new tag, where pinhook asks for no token): the admission, and its own code.
    figures["pinhook_over_httpx_ms"] = round(mine - figures["httpx"]["median_ms"], 3)
    figures["target_ms"] = round(1.2 * direct + 5, 3)
    figures["target_met"] = mine <= 1.2 * direct + 5
    if "k8s-digester" in figures:
        figures["pinhook_over_k8s_digester"] = round(mine / figures["k8s-digester"]["median_ms"], 3)
    return figures


def _cold_rows(outcome: Outcome, variant: str, f: dict[str, Any]) -> None:
    for name in ("pinhook", "direct", "httpx", "k8s-digester"):
        if name in f:
            one = f[name]
            outcome.row(
                f"{variant.replace('_', ' ')}: {name}",
                f"median {one['median_ms']:.2f} ms, p90 {one['p90_ms']:.2f} ms,"
                f" {one['manifest_and_token_requests_per_lookup']:.1f} manifest+token requests",
            )
    met = "met" if f["target_met"] else "MISSED"
    extra = (
        f", pinhook/k8s-digester {f['pinhook_over_k8s_digester']:.2f}x"
        if "pinhook_over_k8s_digester" in f
        else ""
    )
    outcome.row(
        f"{variant.replace('_', ' ')}: ratio",
        f"pinhook/direct {f['pinhook_over_direct']:.2f}x; target 1.2x direct + 5 ms ="
        f" {f['target_ms']:.2f} ms: {met}; pinhook - httpx {f['pinhook_over_httpx_ms']:+.2f} ms"
        f"{extra}",
    )


# --- 3. five new images behind a slow registry -------------------------------------------

SLOW_DELAY = 0.05


def slow_registry(ctx: Context) -> Outcome:
    """One Pod with 5 new images, every registry and token request delayed 50 ms.

    Each webhook has its own five repositories; its Pods carry new tags of them.
    """
    pods = ctx.settings.slow_pods
    names = ["pinhook"] + (["k8s-digester"] if ctx.peer_binary else [])

    def images(name: str, k: int) -> list[tuple[str, str]]:
        return [(f"slow/{name}/{repo}", f"p{k}") for repo, _ in KSERVE_IMAGES.values()]

    outcome = Outcome()
    with Registry(ctx.workdir, delay=SLOW_DELAY) as registry, ExitStack() as stack:
        _seeded(registry, [ref for name in names for k in range(pods) for ref in images(name, k)])
        servers = {"pinhook": stack.enter_context(_pinhook(ctx, pinhook_config(registry.host)))}
        if ctx.peer_binary is not None:
            servers["k8s-digester"] = stack.enter_context(_peer(ctx))
        clients = {
            name: stack.enter_context(Admissions(s, ctx.certs)) for name, s in servers.items()
        }
        seconds: dict[str, list[float]] = {name: [] for name in servers}
        before = {name: registry.traffic(f"slow/{name}/") for name in names}
        for k in range(pods):
            for name, client in clients.items():
                pod = plain_pod(*[f"{registry.host}/{repo}:{tag}" for repo, tag in images(name, k)])
                status, response, took = client.post(admission(pod))
                if status != 200 or pinned_images(response) != len(KSERVE_IMAGES):
                    raise BenchError(f"{name} did not pin the 5 images: {status} {response}")
                seconds[name].append(took)
        traffic = {name: (registry.traffic(f"slow/{name}/") - before[name]).total for name in names}
    for name, values in seconds.items():
        rest = sorted(values[1:]) or values
        outcome.figures[name] = {
            "first_pod_ms": round(values[0] * 1e3, 1),
            "later_pods_median_ms": round(percentile(rest, 50) * 1e3, 1),
            "pods": len(values),
            "manifest_and_token_requests_per_pod": round(traffic[name] / pods, 1),
        }
        outcome.row(
            name,
            f"first Pod {values[0] * 1e3:.0f} ms, later Pods median"
            f" {percentile(rest, 50) * 1e3:.0f} ms, {traffic[name] / pods:.1f} manifest+token"
            " requests per Pod",
        )
    outcome.figures["round_trip_ms"] = SLOW_DELAY * 1e3
    outcome.row("", f"every registry and token request takes {SLOW_DELAY * 1e3:.0f} ms more")
    return outcome


# --- 4. registry traffic of one rollout --------------------------------------------------


def rollout_traffic(ctx: Context) -> Outcome:
    """200 concurrent admissions of one new tag across 20 namespaces without pull secrets."""
    s = ctx.settings
    repo, tag = "rollout/app", "new"
    outcome = Outcome()
    with Registry(ctx.workdir) as registry:
        _seeded(registry, [(repo, tag)])
        pod = plain_pod(f"{registry.host}/{repo}:{tag}")
        bodies = [
            admission(pod, namespace=f"team-{i % s.rollout_namespaces}")
            for i in range(s.rollout_admissions)
        ]
        before = registry.traffic(repo)
        with _pinhook(ctx, pinhook_config(registry.host)) as server:
            result = burst(server, bodies, s.rollout_admissions, ctx.certs, ctx.workdir)
        traffic = registry.traffic(repo) - before
        manifests, tokens = traffic.manifests, traffic.tokens
    outcome.figures = {
        "admissions": s.rollout_admissions,
        "namespaces": s.rollout_namespaces,
        "manifest_requests": sum(manifests.values()),
        "manifest_requests_by_status": {str(k): v for k, v in sorted(manifests.items())},
        "token_requests": tokens,
        "answers": result.summary(),
    }
    by_status = ", ".join(f"{n}x{status}" for status, n in sorted(manifests.items()))
    outcome.row(
        "registry requests",
        f"{sum(manifests.values())} manifest ({by_status}), {tokens} token; target 1 and 1",
    )
    summary = result.summary()
    outcome.row(
        "answers",
        f"{summary['patched']}/{s.rollout_admissions} pinned, p50 {summary['p50_ms']:.1f} ms,"
        f" max {summary['max_ms']:.1f} ms",
    )
    return outcome


# --- 5. a burst of distinct new tags -----------------------------------------------------


def tag_burst(ctx: Context) -> Outcome:
    """2,000 distinct new tags, 200 admissions at a time, each sent with ?timeout=10s."""
    s = ctx.settings
    refs = [("burst/app", f"t{i}") for i in range(s.burst_tags)]
    outcome = Outcome()
    with Registry(ctx.workdir) as registry:
        _seeded(registry, refs)
        bodies = [
            admission(plain_pod(f"{registry.host}/{repo}:{tag}"), namespace=f"team-{i % 20}")
            for i, (repo, tag) in enumerate(refs)
        ]
        with _pinhook(ctx, pinhook_config(registry.host)) as server:
            result = burst(server, bodies, s.burst_concurrency, ctx.certs, ctx.workdir)
    summary = result.summary()
    outcome.figures = summary | {"concurrency": s.burst_concurrency, "deadline_s": DEADLINE_SECONDS}
    outcome.row(
        f"{s.burst_tags} tags @ {s.burst_concurrency}",
        f"p50 {summary['p50_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms, max"
        f" {summary['max_ms']:.0f} ms (deadline {DEADLINE_SECONDS * 1e3:.0f}),"
        f" {summary['past_deadline']} past deadline (target 0)",
    )
    outcome.row(
        "",
        f"{summary['admissions_per_s']:.0f} admissions/s, {summary['patched']} pinned,"
        f" {summary['warned']} answered with a warning (by policy), {summary['denied']} denied,"
        f" {summary['errors']} errors, CPU {summary['cpu_ms_per_admission']:.2f} ms/admission",
    )
    return outcome


# --- 6. memory at 10,000 cached digests --------------------------------------------------


def memory(ctx: Context) -> Outcome:
    """pinhook's resident memory idle, then with 10,000 digests cached."""
    n = ctx.settings.cached_digests
    refs = [(f"memory/app{i % 20}", f"t{i}") for i in range(n)]
    outcome = Outcome()
    with Registry(ctx.workdir) as registry:
        _seeded(registry, refs)
        images = [f"{registry.host}/{repo}:{tag}" for repo, tag in refs]
        bodies = [admission(plain_pod(*images[i : i + 5])) for i in range(0, n, 5)]
        config = pinhook_config(registry.host, extra=f"cache:\n  maxEntries: {n}\n")
        with _pinhook(ctx, config) as server:
            idle = rss_mib(server.pid)
            result = burst(server, bodies, 20, ctx.certs, ctx.workdir)
            loaded = rss_mib(server.pid)
            misses = _cache_misses(server, ctx.certs)
    summary = result.summary()
    outcome.figures = {
        "digests": n,
        "idle_rss_mib": round(idle, 1),
        "rss_mib": round(loaded, 1),
        "bytes_per_digest": round((loaded - idle) * 2**20 / n),
        "images_pinned": summary["images_pinned"],
        "cache_misses": misses,
    }
    outcome.row(
        f"{n} digests cached",
        f"RSS {loaded:.1f} MiB (idle {idle:.1f}, +{(loaded - idle) * 2**20 / n:.0f} B/digest),"
        f" {summary['images_pinned']} images pinned; target <= 120 MB",
    )
    return outcome


def _cache_misses(server: Server, certs: CertPaths) -> float | None:
    port = metrics_port(server)
    if port is None:
        return None
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    for line in text.splitlines():
        if line.startswith("pinhook_digest_cache_events_total") and 'event="miss"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


# --- 7. idle connections -----------------------------------------------------------------


def idle_connections(ctx: Context) -> Outcome:
    """Resident memory with 1,000 idle TLS connections open, and after they close."""
    n = ctx.settings.idle_connections
    outcome = Outcome()
    with _pinhook(ctx, "") as server:
        idle = rss_mib(server.pid)
        opened, held, held_rss, after, after_rss = asyncio.run(_hold_idle(server, ctx.certs, n))
    outcome.figures = {
        "clients": n,
        "handshakes_completed": opened,
        "server_connections_while_held": held,
        "idle_rss_mib": round(idle, 1),
        "held_rss_mib": round(held_rss, 1),
        "after_close_rss_mib": round(after_rss, 1),
        "server_connections_after_close": after,
    }
    outcome.row(
        f"{n} idle TLS clients",
        f"{opened} handshakes done, {held} held by the server;"
        f" RSS idle {idle:.1f} -> held {held_rss:.1f} -> closed {after_rss:.1f} MiB",
    )
    return outcome


async def _hold_idle(
    server: Server, certs: CertPaths, n: int
) -> tuple[int, int, float, int, float]:
    tls = ssl.create_default_context(cafile=str(certs.ca_cert))
    gate = asyncio.Semaphore(50)  # handshakes in flight at once

    async def connect() -> asyncio.StreamWriter | None:
        async with gate:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", server.port, ssl=tls), 10
                )
            except (OSError, TimeoutError):
                return None
            return writer

    def held() -> int:
        return accepted_connections(server.pid, server.port)

    writers = [w for w in await asyncio.gather(*(connect() for _ in range(n))) if w is not None]
    held_while_open = await _settled(held)
    held_rss = rss_mib(server.pid)
    for writer in writers:
        writer.close()
    await asyncio.gather(*(_closed(w) for w in writers))
    held_after = await _settled(held, target=0)
    return len(writers), held_while_open, held_rss, held_after, rss_mib(server.pid)


async def _closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def _settled(count: Callable[[], int], target: int | None = None) -> int:
    """Poll another process's socket count until it reaches ``target`` or stops changing."""
    deadline = time.monotonic() + 10
    last, stable_since = count(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = count()
        if target is not None and now <= target:
            return now
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since > 1.0:
            return now
    return last


# --- 8. scale-out: registry traffic per new tag vs replicas, with and without Redis ------


SCALE_OUT_REPLICAS = (1, 3)


def scale_out(ctx: Context) -> Outcome:
    """200 concurrent admissions of one new tag, round-robin over 1 or 3 pinhook processes,
    each with its own cache, then sharing one Redis: registry requests per new tag."""
    s = ctx.settings
    outcome = Outcome()
    cases: dict[str, Any] = {}
    with Registry(ctx.workdir) as registry, _redis() as redis:
        for replicas in SCALE_OUT_REPLICAS:
            for shared in (False, True):
                case = f"{replicas}x{'-redis' if shared else ''}"
                cases[case] = _scale_out_case(ctx, registry, redis if shared else None, replicas)
    outcome.figures = {
        "admissions_per_tag": s.rollout_admissions,
        "tags_per_case": s.scale_out_tags,
        "cases": cases,
    }
    for case, f in cases.items():
        by_status = ", ".join(
            f"{n:.1f}x{status}" for status, n in f["manifest_requests_per_tag_by_status"].items()
        )
        outcome.row(
            case,
            f"per new tag: {f['manifest_requests_per_tag']:.1f} manifest ({by_status}) +"
            f" {f['token_requests_per_tag']:.1f} token requests; p50 {f['p50_ms']:.1f} ms,"
            f" p99 {f['p99_ms']:.1f} ms,"
            f" {f['pinned']}/{f['admissions']} pinned, {f['errors']} errors",
        )
    return outcome


@contextlib.contextmanager
def _redis() -> Any:
    try:
        with RunningRedis() as server:
            yield server
    except RedisNotInstalled as exc:
        raise BenchError(str(exc)) from None


def _scale_out_case(
    ctx: Context, registry: Registry, redis: RunningRedis | None, replicas: int
) -> dict[str, Any]:
    s = ctx.settings
    extra = ""
    if redis is not None:
        extra = f"cache:\n  redis:\n    url: redis://127.0.0.1:{redis.port}/0\n"
    config = pinhook_config(registry.host, extra=extra)
    name = f"scale/r{replicas}{'-redis' if redis else ''}"
    tags = [f"t{i}" for i in range(s.scale_out_tags)]
    _seeded(registry, [(name, tag) for tag in tags])
    manifests: Counter[int] = Counter()
    tokens = 0
    bursts: list[Burst] = []
    with ExitStack() as stack:
        servers = [stack.enter_context(_pinhook(ctx, config, f"scale{i}")) for i in range(replicas)]
        for tag in tags:
            image = f"{registry.host}/{name}:{tag}"
            bodies = [
                admission(plain_pod(image, name=f"web-{i}"), namespace=f"team-{i % 20}")
                for i in range(s.rollout_admissions)
            ]
            before = registry.traffic(name)
            bursts += _spread_burst(ctx, servers, bodies, s.rollout_admissions)
            traffic = registry.traffic(name) - before
            manifests.update(traffic.manifests)
            tokens += traffic.tokens
    latencies = sorted(x for b in bursts for x in b.latencies)
    return {
        "replicas": replicas,
        "redis": redis is not None,
        "manifest_requests_per_tag": sum(manifests.values()) / len(tags),
        # 200: a lookup; 401: the challenge that first asks for a token in a new repository.
        "manifest_requests_per_tag_by_status": {
            str(status): n / len(tags) for status, n in sorted(manifests.items())
        },
        "token_requests_per_tag": tokens / len(tags),
        "admissions": len(latencies),
        "pinned": sum(b.pinned for b in bursts),
        "errors": sum(b.errors for b in bursts),
        "p50_ms": round(percentile(latencies, 50) * 1e3, 2),
        "p99_ms": round(percentile(latencies, 99) * 1e3, 2),
    }


def _spread_burst(
    ctx: Context, servers: Sequence[Server], bodies: list[bytes], concurrency: int
) -> list[Burst]:
    """Admission i to server i mod n, all servers driven at once, ``concurrency`` in all."""
    n = len(servers)
    share = -(-concurrency // n)
    with ThreadPoolExecutor(n) as pool:
        runs = [
            pool.submit(burst, server, bodies[i::n], share, ctx.certs, ctx.workdir)
            for i, server in enumerate(servers)
        ]
        return [run.result() for run in runs]


SCENARIOS: dict[str, Scenario] = {
    "warm": warm,
    "cold": cold,
    "slow-registry": slow_registry,
    "rollout-traffic": rollout_traffic,
    "tag-burst": tag_burst,
    "memory": memory,
    "idle-connections": idle_connections,
    "scale-out": scale_out,
}

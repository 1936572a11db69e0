"""The metrics an operator alerts on, counted by the real components."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tests.harness.fixtures import RegistryEnv
from tests.harness.proxy import CountingProxy
from webhook.config import CacheSettings, load_settings
from webhook.metrics import Counts, Metrics, Tally, TallyHistogram
from webhook.oci.reference import ImageRef
from webhook.resolve import CachingResolver, PullScope, StaticDigestResolver
from webhook.runtime import Runtime, config_hash

DIGEST = "sha256:" + "a" * 64


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_cache_evictions_are_counted() -> None:
    refs = [ImageRef.parse(f"example.com/app:{n}") for n in range(3)]
    metrics = Metrics()
    cache = CachingResolver(
        StaticDigestResolver(dict.fromkeys(refs, DIGEST)),
        CacheSettings(max_entries=2),
        on_event=metrics.cache_event,
    )
    deadline = asyncio.get_running_loop().time() + 5
    for ref in refs:
        await cache.resolve(ref, PullScope(None), deadline)
    assert len(cache) == 2
    assert sample(metrics, "pinhook_digest_cache_evictions_total") == 1.0
    assert sample(metrics, "pinhook_digest_cache_events_total", event="miss") == 3.0


async def test_lookups_in_flight_and_cached_digests(
    registry: RegistryEnv, registry_proxy: CountingProxy
) -> None:
    pushed = registry.push.index("metrics/app", "1.0")
    host = registry_proxy.host
    settings = load_settings(f'registry:\n  insecure: ["{host}"]\n  allowedHosts: ["{host}"]\n')
    runtime = Runtime(settings)
    in_flight = "pinhook_registry_lookups_in_flight"
    async with runtime:
        registry_proxy.hold()
        lookup = asyncio.create_task(runtime.mutator.pin([f"{host}/metrics/app:1.0"]))
        await asyncio.to_thread(registry_proxy.wait_for_count, 1, "HEAD")
        assert sample(runtime.metrics, in_flight) == 1.0
        registry_proxy.release()
        (result,) = await lookup
        assert result.digest == pushed.digest
        assert sample(runtime.metrics, in_flight) == 0.0
        assert sample(runtime.metrics, "pinhook_digest_cache_entries") == 1.0
        text = runtime.metrics.render().decode()
        assert f'config_hash="{config_hash(settings)}"' in text


def test_build_info_follows_the_configuration() -> None:
    metrics = Metrics()
    metrics.configuration("1.2.3", "aaa")
    metrics.configuration("1.2.3", "bbb")
    text = metrics.render().decode()
    assert 'pinhook_build_info{config_hash="bbb",version="1.2.3"} 1.0' in text
    assert 'config_hash="aaa"' not in text
    assert config_hash(load_settings("")) != config_hash(load_settings("output: digest-only"))


def test_certificate_expiry_counts_down_from_the_loaded_certificate() -> None:
    metrics = Metrics()
    metrics.certificates.set("serving", datetime.now(UTC) + timedelta(days=3))
    value = sample(metrics, "pinhook_certificate_expires_in_seconds", certificate="serving")
    assert value is not None and 3 * 86400 - 60 < value <= 3 * 86400
    metrics.certificates.set("serving", None)
    assert sample(metrics, "pinhook_certificate_expires_in_seconds", certificate="serving") is None


def test_token_requests_are_bounded_by_host() -> None:
    metrics = Metrics()
    for n in range(60):
        metrics.token_request(f"r{n}.example", "ok")
    assert sample(metrics, "pinhook_registry_token_requests_total", host="r0.example", result="ok")
    assert (
        sample(metrics, "pinhook_registry_token_requests_total", host="other", result="ok") == 10.0
    )


def test_no_created_series_and_no_change_to_other_registries() -> None:
    metrics = Metrics()
    metrics.images_seen({"pinned": 1})
    metrics.admission_seconds.observe(0.01)
    text = metrics.render().decode()
    assert "pinhook_images_total" in text and "_created" not in text
    assert sample(metrics, "pinhook_images_created", outcome="pinned") is None
    # Asked for by name (/metrics?name[]=...), they are not there either.
    asked = metrics.registry.restricted_registry(["pinhook_images_created"])
    assert generate_latest(asked) == b""
    # Importing pinhook changes nothing process-wide: another registry keeps its own.
    other = CollectorRegistry()
    Counter("library_events", "a library's own counter", registry=other).inc()
    assert other.get_sample_value("library_events_created") is not None


def _without_created(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "_created" not in line]


def test_tallies_read_as_prometheus_client_counters_and_histograms() -> None:
    """The per-admission tallies are exposed exactly as the library's own types would be,
    including counts made on another thread and values on a bucket's bound."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    labels = ["kind", "result"]
    tally = Tally("t_events", "events", labels, ours)
    counter = Counter("t_events", "events", labels, registry=theirs)
    Tally("t_plain", "unlabelled", [], ours)
    Counter("t_plain", "unlabelled", registry=theirs)  # shows 0 before its first count
    buckets = (0.001, 0.01, 1, 10)
    histogram = TallyHistogram("t_seconds", "seconds", buckets, ours)
    reference = Histogram("t_seconds", "seconds", buckets=buckets, registry=theirs)

    def count(kind: str, result: str, amount: float) -> None:
        tally.inc((kind, result), amount)
        counter.labels(kind, result).inc(amount)

    count("Pod", "patched", 1)
    count("Pod", "patched", 2)
    count("Job", "denied", 1)
    for value in (0.0005, 0.001, 0.0011, 1, 9.99, 10, 11, float("nan")):
        histogram.observe(value)
        reference.observe(value)
    elsewhere = threading.Thread(target=count, args=("Job", "denied", 4))
    elsewhere.start()
    elsewhere.join()
    assert _without_created(generate_latest(ours)) == _without_created(generate_latest(theirs))
    assert ours.get_sample_value("t_events_total", {"kind": "Job", "result": "denied"}) == 5.0
    assert ours.get_sample_value("t_seconds_bucket", {"le": "+Inf"}) == 7.0
    assert ours.get_sample_value("t_seconds_bucket", {"le": "0.001"}) == 2.0
    # Asked for by name (/metrics?name[]=...), a tally is found as a counter is.
    asked = ours.restricted_registry(["t_events_total"])
    assert b't_events_total{kind="Pod",result="patched"} 3.0' in generate_latest(asked)
    # What the library refuses, a tally refuses: a count down, and (when read) label values
    # that do not fit its labels.
    with pytest.raises(ValueError, match="only go up"):
        tally.inc(("Pod", "patched"), -1)
    tally.inc(("Pod",))
    with pytest.raises(ValueError, match="label values"):
        generate_latest(ours)


def test_counts_add_what_the_calls_they_stand_for_would_on_any_thread() -> None:
    """A recalled admission's counts go straight into the sums on the thread that owns them,
    through each tally's ``inc`` on any other: the same totals either way."""
    counted, called = Metrics(), Metrics()
    counts = [
        counted.admission_counts("Pod", "CREATE", "patched"),
        counted.settled_counts({"pinned": 2, "unchanged": 1}, 3, 2),
    ]

    def count() -> None:
        for each in counts:
            counted.count(each)
        counted.admission_seconds.observe(0.02)
        called.answers_recalled.inc()
        called.admission("Pod", "CREATE", "patched")
        called.images_seen({"pinned": 2, "unchanged": 1})
        called.cache_event("hit", 3)
        called.owner_pin("kept", 2)
        called.admission_seconds.observe(0.02)

    count()
    elsewhere = threading.Thread(target=count)
    elsewhere.start()
    elsewhere.join()

    def pinhook(metrics: Metrics) -> list[str]:
        lines = _without_created(generate_latest(metrics.registry))
        return [line for line in lines if "pinhook_" in line and "pinhook_build" not in line]

    assert pinhook(counted) == pinhook(called)
    assert sample(counted, "pinhook_images_total", outcome="pinned") == 4.0
    assert sample(counted, "pinhook_admission_duration_seconds_count") == 2.0
    with pytest.raises(ValueError, match="only go up"):
        Counts.of([(counted.images, ("pinned",), -1)])

"""Prometheus metrics on a registry owned by the app: no process-wide globals to reset in tests.

Served on a port of their own (``serve_metrics``), plain HTTP, never on the webhook's TLS port:
a scraper needs no client certificate trust, and the admission port answers the API server only.
"""

from __future__ import annotations

import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Generic, NamedTuple, TypeVar

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, RestrictedRegistry
from prometheus_client.utils import floatToGoString

from .kinds import KINDS

# Label values come from requests, which anyone who can create an object shapes: only known
# values get a series of their own, so no request can grow /metrics without bound.
KNOWN_KINDS = frozenset(info.kind for info in KINDS)
KNOWN_OPERATIONS = frozenset({"CREATE", "UPDATE", "DELETE", "CONNECT"})
OTHER = "other"
# Registry hosts come from image names: the first ones seen get a series each, the rest share
# "other". A cluster pulls from a handful of registries.
MAX_REGISTRY_HOSTS = 50
_REGISTRY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8)


class Metrics:
    def __init__(self) -> None:
        self.registry: CollectorRegistry = _WithoutCreated(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.build_info = Gauge(
            "pinhook_build_info",
            "1, labelled with pinhook's version and the hash of the configuration it serves",
            ["version", "config_hash"],
            registry=self.registry,
        )
        self._build_labels: tuple[str, str] | None = None
        # Counted on every admission: tallies (below), not prometheus_client's counters.
        self.admissions = Tally(
            "pinhook_admission_requests",
            "AdmissionReviews answered, by kind, operation and result (patched, unchanged,"
            " denied, skipped, audited, invalid)",
            ["kind", "operation", "result"],
            self.registry,
        )
        self.admission_seconds = TallyHistogram(
            "pinhook_admission_duration_seconds",
            "Time to answer one AdmissionReview",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 8, 10),
            self.registry,
        )
        self.images = Tally(
            "pinhook_images",
            "Image references seen, by outcome: pinned, rewritten, unchanged, unpinned, invalid,"
            " audited (audit mode would have changed it), over-limit (past imagesPerObject)",
            ["outcome"],
            self.registry,
        )
        self.resolve_failures = Counter(
            "pinhook_resolve_failures",
            "Images that could not be pinned, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.cache_events = Tally(
            "pinhook_digest_cache_events",
            "Digest cache lookups: hit, miss, shared (joined an in-flight request), stale",
            ["event"],
            self.registry,
        )
        self.config_reloads = Counter(
            "pinhook_config_reloads",
            "Configuration reloads by result (applied, rejected)",
            ["result"],
            registry=self.registry,
        )
        self.config_valid = Gauge(
            "pinhook_config_last_reload_valid",
            "1 when the last configuration seen on disk was valid, 0 when it was rejected",
            registry=self.registry,
        )
        self.config_valid.set(1)
        self.registry_requests = Counter(
            "pinhook_registry_requests",
            "HTTP requests to registries and token services, by host, method and status",
            ["host", "method", "status"],
            registry=self.registry,
        )
        self.registry_seconds = Histogram(
            "pinhook_registry_request_duration_seconds",
            "Time for one registry request, headers and body",
            ["host"],
            buckets=_REGISTRY_BUCKETS,
            registry=self.registry,
        )
        # Only Docker Hub's API host reports these: one series each.
        self.ratelimit_remaining = Gauge(
            "pinhook_registry_ratelimit_remaining",
            "Pulls left in the rate-limit window, as the registry last stated (Docker Hub)",
            ["host"],
            registry=self.registry,
        )
        self.ratelimit_limit = Gauge(
            "pinhook_registry_ratelimit_limit",
            "Pulls allowed per rate-limit window, as the registry last stated (Docker Hub)",
            ["host"],
            registry=self.registry,
        )
        self.registry_rebuilds = Counter(
            "pinhook_registry_client_rebuilds",
            "Times the registry HTTP client was replaced because its pool wedged",
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "pinhook_connections_closed",
            "Client connections cut off: over-limit, handshake-timeout, handshake-failed,"
            " request-timeout",
            ["reason"],
            registry=self.registry,
        )
        self._registry_hosts: set[str] = set()
        self.pull_secrets_unusable = Counter(
            "pinhook_pull_secrets_unusable",
            "Pull secrets the kubelet would refuse (reported once per content), by namespace",
            ["namespace"],
            registry=self.registry,
        )
        self.credential_provider_execs = Counter(
            "pinhook_credential_provider_execs",
            "Credential provider plugin runs, by provider and result (ok, error, timeout)",
            ["provider", "result"],
            registry=self.registry,
        )
        self.shared_cache_operations = Counter(
            "pinhook_shared_cache_operations",
            "Operations on the shared cache (Redis), by operation and result: hit, miss, ok,"
            " busy (another replica holds the lookup), error, timeout, skipped (breaker open),"
            " deadline (the admission's time ran out first)",
            ["operation", "result"],
            registry=self.registry,
        )
        self.shared_cache_breaker = Gauge(
            "pinhook_shared_cache_breaker_state",
            "The shared cache's circuit breaker: 0 closed (in use), 1 half-open (probing),"
            " 2 open (Redis left alone; local cache and registries answer)",
            registry=self.registry,
        )
        self.shared_cache_lock_waits = Counter(
            "pinhook_shared_cache_lock_waits",
            "Lookups that waited for another replica's, by outcome: answered, failed (its"
            " lookup failed), expired (its lock ran out: resolved here), deadline, unavailable",
            ["outcome"],
            registry=self.registry,
        )
        self.shared_cache_lock_wait_seconds = Histogram(
            "pinhook_shared_cache_lock_wait_seconds",
            "Time a lookup waited for another replica's",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8),
            registry=self.registry,
        )
        self.owner_pins = Tally(
            "pinhook_owner_pins",
            "Images of Pods with an owner: pinned to the owner's earlier decision (kept), or"
            " the first decision for that owner and tag (decided)",
            ["event"],
            self.registry,
        )
        self.answers_recalled = Tally(
            "pinhook_answers_recalled",
            "Admissions answered with the answer to an earlier review that differed only in its"
            " uid (the Pods of one ReplicaSet), its digests still cached",
            [],
            self.registry,
        )

        self.token_requests = Counter(
            "pinhook_registry_token_requests",
            "Bearer tokens fetched from token services, by registry host and result (ok,"
            " rejected, timeout, unavailable, forbidden-host, error); a cached token costs none",
            ["host", "result"],
            registry=self.registry,
        )
        self.cache_evictions = Counter(
            "pinhook_digest_cache_evictions",
            "Digest cache entries dropped to stay within cache.maxEntries",
            registry=self.registry,
        )
        self.cache_entries = Gauge(
            "pinhook_digest_cache_entries",
            "Digests held in the cache",
            registry=self.registry,
        )
        self.lookups_in_flight = Gauge(
            "pinhook_registry_lookups_in_flight",
            "Registry lookups (digests and digest checks) under way",
            registry=self.registry,
        )
        self.certificates = _CertificateExpiry(self.registry)
        self._token_hosts: set[str] = set()
        self._children: dict[tuple[object, ...], Counter] = {}

    def _inc(self, counter: Counter, *labels: str, amount: int = 1) -> None:
        # labels() takes a lock and builds a key on every call, and this runs per image of
        # every request; the label sets are few, so the children are kept.
        key = (counter, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        child.inc(amount)

    def images_seen(self, tally: Mapping[str, int]) -> None:
        """One increment per outcome per request, not per image."""
        images = self.images
        for outcome, count in tally.items():
            images.inc((outcome,), count)

    def admission(self, kind: str, operation: str, result: str) -> None:
        self.admissions.inc(_admission_labels(kind, operation, result))

    def admission_counts(self, kind: str, operation: str, result: str) -> Counts:
        """What ``admission`` adds, and one answer recalled: for ``count``, again and again."""
        labels = _admission_labels(kind, operation, result)
        return Counts.of(((self.answers_recalled, (), 1), (self.admissions, labels, 1)))

    def settled_counts(self, images: Mapping[str, int], hits: int, owner_kept: int) -> Counts:
        """What ``images_seen`` and the cache hits (and an owner's digests kept) add."""
        adds: list[tuple[Tally, tuple[str, ...], int]] = [
            (self.images, (outcome,), count) for outcome, count in images.items()
        ]
        if hits:
            adds.append((self.cache_events, ("hit",), hits))
        if owner_kept:
            adds.append((self.owner_pins, ("kept",), owner_kept))
        return Counts.of(adds)

    def count(self, counts: Counts) -> None:
        """Add ``counts`` (``admission_counts``, ``settled_counts``), as the calls they stand
        for would: on the thread that owns the sums, straight into them."""
        if counts.owner == threading.get_ident():
            for own, key, amount in counts.owned:
                own[key] = own.get(key, 0.0) + amount
            return
        for tally, labels, amount in counts.adds:
            tally.inc(labels, amount)

    def cache_event(self, event: str, count: int = 1) -> None:
        if event == EVICTED:
            self.cache_evictions.inc(count)
            return
        self.cache_events.inc((event,), count)

    def registry_request(self, host: str, method: str, status: str, seconds: float) -> None:
        host = _bounded(self._registry_hosts, host)
        self._inc(self.registry_requests, host, method, status)
        self.registry_seconds.labels(host).observe(seconds)

    def token_request(self, host: str, result: str) -> None:
        self._inc(self.token_requests, _bounded(self._token_hosts, host), result)

    def configuration(self, version: str, config_hash: str) -> None:
        """``pinhook_build_info`` for the configuration now serving: one series at a time."""
        if self._build_labels is not None:
            self.build_info.remove(*self._build_labels)
        self._build_labels = (version, config_hash)
        self.build_info.labels(version, config_hash).set(1)

    def registry_client_rebuilt(self) -> None:
        self.registry_rebuilds.inc()

    def registry_ratelimit(self, host: str, remaining: int, limit: int) -> None:
        self.ratelimit_remaining.labels(host).set(remaining)
        self.ratelimit_limit.labels(host).set(limit)

    def connection_closed(self, reason: str) -> None:
        self._inc(self.connections_closed, reason)

    def pull_secret_unusable(self, namespace: str) -> None:
        self.pull_secrets_unusable.labels(namespace).inc()

    def credential_provider_exec(self, provider: str, result: str) -> None:
        self.credential_provider_execs.labels(provider, result).inc()

    def shared_cache_operation(self, operation: str, result: str) -> None:
        self._inc(self.shared_cache_operations, operation, result)

    def shared_cache_breaker_state(self, state: int) -> None:
        self.shared_cache_breaker.set(state)

    def shared_cache_lock_wait(self, outcome: str, seconds: float) -> None:
        self._inc(self.shared_cache_lock_waits, outcome)
        self.shared_cache_lock_wait_seconds.observe(seconds)

    def owner_pin(self, event: str, count: int = 1) -> None:
        self.owner_pins.inc((event,), count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _admission_labels(kind: str, operation: str, result: str) -> tuple[str, str, str]:
    kind = kind if kind in KNOWN_KINDS or not kind else OTHER
    operation = operation if operation in KNOWN_OPERATIONS or not operation else OTHER
    return kind, operation, result


class _WithoutCreated(CollectorRegistry):
    """A registry that leaves out the ``_created`` series: they double every counter's
    series for a value nobody alerts on. Here rather than by
    ``prometheus_client.disable_created_metrics()``, which changes every registry of the
    process, and would have to be called before anything is served."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            created = f"{metric.name}_created"
            metric.samples = [sample for sample in metric.samples if sample.name != created]
            yield metric

    def restricted_registry(self, names: Iterable[str]) -> RestrictedRegistry:
        # /metrics?name[]=... reads the collectors itself, past collect() above.
        return super().restricted_registry(n for n in names if not n.endswith("_created"))


# The cache event for an entry dropped by the LRU bound (``resolve.CachingResolver``).
EVICTED = "evicted"


def _bounded(seen: set[str], host: str) -> str:
    """``host``, or ``other`` once MAX_REGISTRY_HOSTS others have a series."""
    if host not in seen:
        if len(seen) >= MAX_REGISTRY_HOSTS:
            return OTHER
        seen.add(host)
    return host


K = TypeVar("K", bound=Hashable)


class _Sums(Generic[K]):
    """Numbers added to by key: without a lock on the thread that made them, the event loop's.

    prometheus_client's counters take a lock on each increment, and with its checks that is
    about 0.7 µs on a small machine; an admission counts six times, a fifth of what a cached
    admission costs pinhook itself. Only the owning thread writes ``_own``, so it needs no
    lock; any other thread adds to ``_elsewhere`` under one. A scrape copies ``_own`` (a dict
    copy is atomic under the GIL), and at worst misses an increment made meanwhile, which
    the next scrape sees, as with any counter.
    """

    def __init__(self) -> None:
        self._owner = threading.get_ident()
        self._own: dict[K, float] = {}
        self._elsewhere: dict[K, float] = {}
        self._lock = threading.Lock()

    def add(self, key: K, amount: float) -> None:
        if threading.get_ident() == self._owner:
            own = self._own
            own[key] = own.get(key, 0.0) + amount
        else:
            with self._lock:
                self._elsewhere[key] = self._elsewhere.get(key, 0.0) + amount

    def add_two(self, key: K, amount: float, other: K, other_amount: float) -> None:
        """``add`` of two keys, the thread asked for once."""
        if threading.get_ident() == self._owner:
            own = self._own
            own[key] = own.get(key, 0.0) + amount
            own[other] = own.get(other, 0.0) + other_amount
        else:
            with self._lock:
                elsewhere = self._elsewhere
                elsewhere[key] = elsewhere.get(key, 0.0) + amount
                elsewhere[other] = elsewhere.get(other, 0.0) + other_amount

    @property
    def owner(self) -> int:
        """The thread that adds without a lock."""
        return self._owner

    @property
    def owned(self) -> dict[K, float]:
        """The sums that thread adds to: only it may write them."""
        return self._own

    def totals(self) -> dict[K, float]:
        totals = self._own.copy()
        with self._lock:
            for key, amount in self._elsewhere.items():
                totals[key] = totals.get(key, 0.0) + amount
        return totals


class Counts(NamedTuple):
    """What one admission adds to the tallies, worked out once: a like review answered
    again adds the same (``Metrics.count``), without the calls that work it out.

    ``owned`` is the same, as the sums to add to on their owner's thread (``owner``; every
    tally is made on one), where ``count`` writes them without a call per tally."""

    adds: tuple[tuple[Tally, tuple[str, ...], float], ...]
    owner: int | None
    owned: tuple[tuple[dict[tuple[str, ...], float], tuple[str, ...], float], ...]

    @classmethod
    def of(cls, adds: Iterable[tuple[Tally, tuple[str, ...], float]]) -> Counts:
        adds = tuple(adds)
        for tally, _labels, amount in adds:
            if amount < 0:
                tally.inc((), amount)  # refused there, as any count down is
        owners = {tally.sums.owner for tally, _, _ in adds}
        owner = owners.pop() if len(owners) == 1 else None
        owned = tuple((tally.sums.owned, labels, amount) for tally, labels, amount in adds)
        return cls(adds, owner, owned)


class Tally(Collector):
    """A counter family counted on every admission (see ``_Sums``); exposed as a
    ``prometheus_client`` counter of the same name and labels is."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = tuple(labels)
        self.sums: _Sums[tuple[str, ...]] = _Sums()
        registry.register(self)

    def inc(self, labels: tuple[str, ...] = (), amount: float = 1) -> None:
        """Add ``amount`` (not negative) to the series of these label values, in order."""
        if amount < 0:
            raise ValueError(f"{self._name}: counters only go up, not by {amount}")
        self.sums.add(labels, amount)

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        totals = self.sums.totals()
        if not self._labels:
            totals.setdefault((), 0.0)  # an unlabelled counter shows 0 before its first count
        for labels, value in totals.items():
            if len(labels) != len(self._labels):  # checked here, off the path that counts
                raise ValueError(f"{self._name}: label values {labels} for {self._labels}")
            family.add_metric(labels, value)
        return [family]

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labels)


class TallyHistogram(Collector):
    """An unlabelled histogram observed on every admission (see ``_Sums``); exposed as a
    ``prometheus_client`` histogram with these buckets is."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = (*sorted(buckets), float("inf"))
        self._sums: _Sums[int | str] = _Sums()
        registry.register(self)

    def observe(self, value: float) -> None:
        # The first bucket whose bound is at least ``value``: ``le`` means less or equal.
        if value == value:
            self._sums.add_two(bisect_left(self._bounds, value), 1, _SUM, value)
        else:  # NaN is in no bucket (and so not counted), as the library has it
            self._sums.add(_SUM, value)

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterable[Metric]:
        totals = self._sums.totals()
        buckets = []
        count = 0.0
        for index, bound in enumerate(self._bounds):
            count += totals.get(index, 0.0)
            # As prometheus_client writes its own histograms' bounds (untyped there).
            buckets.append((floatToGoString(bound), count))  # type: ignore[no-untyped-call]
        family = HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=totals.get(_SUM, 0.0)
        )
        return [family]


_SUM = "sum"


class _CertificateExpiry(Collector):
    """``pinhook_certificate_expires_in_seconds{certificate}``, computed at each scrape from
    the expiry of the certificates loaded: it counts down between reloads by itself."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.time) -> None:
        self._expiry: dict[str, float] = {}
        self._clock = clock
        registry.register(self)

    def set(self, certificate: str, not_after: datetime | None) -> None:
        """Record ``certificate``'s (``serving``, ``ca``) expiry; None forgets it."""
        if not_after is None:
            self._expiry.pop(certificate, None)
        else:
            self._expiry[certificate] = not_after.timestamp()

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = self._family()
        now = self._clock()
        for certificate, expires in sorted(self._expiry.items()):
            family.add_metric([certificate], expires - now)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "pinhook_certificate_expires_in_seconds",
            "Seconds until the certificate pinhook serves with (serving) or its CA (ca) expires",
            labels=["certificate"],
        )


def serve_metrics(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[socket.socket, Callable[[], None]]:
    """Serve ``/metrics`` over plain HTTP on ``host:port`` from a thread of its own; returns
    its listening socket and the function that stops it. Raises OSError when the port cannot
    be had."""
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return server.socket, stop

"""Docker Hub's pull rate limit: read from its answers, and spared by asking with HEAD.

A loopback fault server plays registry-1.docker.io: the client is told, through its options,
that Docker Hub's API is served there, so ``nginx:1.27`` goes to it like to Docker Hub.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from tests.faults import FaultServer, Reply, error_reply, manifest_reply, sample_index
from tests.faults import sha256_digest as digest_of
from tests.test_registry import deadline_in, loopback_options
from webhook import errors
from webhook.metrics import Metrics
from webhook.oci.credential import ANONYMOUS
from webhook.oci.ratelimit import RateLimitWatch, parse_rate_limit
from webhook.oci.reference import ImageRef
from webhook.oci.registry import RegistryClient

NGINX = ImageRef.parse("nginx:1.27")
NGINX_PATH = "/v2/library/nginx/manifests/1.27"
LIMIT_LOG = "webhook.oci.ratelimit"


def limited(reply: Reply, remaining: int, limit: int = 100) -> Reply:
    headers = {
        **reply.headers,
        "ratelimit-limit": f"{limit};w=21600",
        "ratelimit-remaining": f"{remaining};w=21600",
        "docker-ratelimit-source": "192.0.2.1",
    }
    return Reply(reply.status, headers, reply.body)


@pytest.fixture
async def hub() -> AsyncIterator[FaultServer]:
    async with FaultServer() as server:
        yield server


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def client(hub: FaultServer, metrics: Metrics) -> AsyncIterator[RegistryClient]:
    options = loopback_options(hub.host, docker_hub_host=hub.host)
    async with RegistryClient(options, events=metrics) as client:
        yield client


def gauge(metrics: Metrics, name: str, host: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"host": host})


async def test_the_rate_limit_docker_hub_states_is_a_gauge(
    hub: FaultServer, client: RegistryClient, metrics: Metrics
) -> None:
    body = sample_index()
    hub.route(NGINX_PATH, limited(manifest_reply(body), remaining=57))
    assert await client.resolve_digest(NGINX, ANONYMOUS, deadline=deadline_in(5)) == digest_of(body)
    assert [r.method for r in hub.requests] == ["HEAD"]  # HEAD is not counted by Docker Hub
    assert gauge(metrics, "pinhook_registry_ratelimit_remaining", hub.host) == 57
    assert gauge(metrics, "pinhook_registry_ratelimit_limit", hub.host) == 100


async def test_running_low_is_logged_once_per_window_not_per_request(
    hub: FaultServer,
    client: RegistryClient,
    metrics: Metrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = sample_index()
    hub.route(NGINX_PATH, *(limited(manifest_reply(body), remaining=n) for n in (9, 8, 7)))
    caplog.set_level(logging.WARNING, logger=LIMIT_LOG)
    for _ in range(3):
        await client.resolve_digest(NGINX, ANONYMOUS, deadline=deadline_in(5))
    warnings = [r for r in caplog.records if r.name == LIMIT_LOG]
    assert len(warnings) == 1
    assert "9 of 100 pulls left per 6 h for 192.0.2.1" in warnings[0].getMessage()
    assert gauge(metrics, "pinhook_registry_ratelimit_remaining", hub.host) == 7


async def test_other_registries_rate_limit_headers_are_not_read(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    async with FaultServer() as other, FaultServer() as hub:
        other.route("/v2/team/app/manifests/1", limited(manifest_reply(sample_index()), 0))
        options = loopback_options(other.host, hub.host, docker_hub_host=hub.host)
        async with RegistryClient(options, events=metrics) as client:
            ref = ImageRef.parse(f"{other.host}/team/app:1")
            await client.resolve_digest(ref, ANONYMOUS, deadline=deadline_in(5))
        assert gauge(metrics, "pinhook_registry_ratelimit_remaining", other.host) is None
    assert not [r for r in caplog.records if r.name == LIMIT_LOG]


async def test_a_head_without_a_digest_is_asked_again_before_a_counted_get(
    hub: FaultServer, client: RegistryClient
) -> None:
    body = sample_index()
    hub.route(NGINX_PATH, manifest_reply(body, digest=None), manifest_reply(body), method="HEAD")
    assert await client.resolve_digest(NGINX, ANONYMOUS, deadline=deadline_in(5)) == digest_of(body)
    assert [r.method for r in hub.requests] == ["HEAD", "HEAD"]


async def test_a_malformed_head_is_asked_again_before_a_counted_get(
    hub: FaultServer, client: RegistryClient
) -> None:
    body = sample_index()
    malformed = Reply(raw_head=b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n")
    hub.route(NGINX_PATH, malformed, manifest_reply(body), method="HEAD")
    assert await client.resolve_digest(NGINX, ANONYMOUS, deadline=deadline_in(5)) == digest_of(body)
    assert [r.method for r in hub.requests] == ["HEAD", "HEAD"]


async def test_get_only_when_a_second_head_gives_no_digest_either(
    hub: FaultServer, client: RegistryClient
) -> None:
    body = sample_index()
    hub.route(NGINX_PATH, manifest_reply(body, digest=None))
    assert await client.resolve_digest(NGINX, ANONYMOUS, deadline=deadline_in(5)) == digest_of(body)
    assert [r.method for r in hub.requests] == ["HEAD", "HEAD", "GET"]


async def test_405_goes_straight_to_get(hub: FaultServer, client: RegistryClient) -> None:
    body = sample_index()
    hub.route(NGINX_PATH, error_reply(405), method="HEAD")
    hub.route(NGINX_PATH, manifest_reply(body), method="GET")
    assert await client.resolve_digest(NGINX, ANONYMOUS, deadline=deadline_in(5)) == digest_of(body)
    assert [r.method for r in hub.requests] == ["HEAD", "GET"]


async def test_an_exhausted_limit_is_not_retried(
    hub: FaultServer, client: RegistryClient, metrics: Metrics
) -> None:
    hub.route(NGINX_PATH, limited(error_reply(429, "TOOMANYREQUESTS"), remaining=0))
    with pytest.raises(errors.RegistryUnavailable, match="pull rate limit is exhausted"):
        await client.resolve_digest(NGINX, ANONYMOUS, deadline=deadline_in(5))
    assert len(hub.requests) == 1  # three attempts otherwise; the window is hours long
    assert gauge(metrics, "pinhook_registry_ratelimit_remaining", hub.host) == 0


# -- the headers themselves ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "remaining", "expected"),
    [
        ("100;w=21600", "20;w=21600", (100, 20, 21600)),
        ("100, 100;w=21600", "0, 0;w=21600", (100, 0, 21600)),  # the IETF draft's list form
        ("200", "150", (200, 150, 21600)),  # no window: Docker Hub's six hours
        ("10;w=3600", "10;w=3600", (10, 10, 3600)),
    ],
)
def test_rate_limit_headers_are_parsed(
    limit: str, remaining: str, expected: tuple[int, int, int]
) -> None:
    stated = parse_rate_limit({"ratelimit-limit": limit, "ratelimit-remaining": remaining})
    assert stated is not None
    assert (stated.limit, stated.remaining, stated.window_seconds) == expected


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"ratelimit-limit": "100;w=21600"},
        {"ratelimit-limit": "lots", "ratelimit-remaining": "20"},
        {"ratelimit-limit": "0;w=60", "ratelimit-remaining": "0;w=60"},
        {"ratelimit-limit": "100", "ratelimit-remaining": "-1"},
    ],
)
def test_no_or_nonsense_headers_state_no_limit(headers: dict[str, str]) -> None:
    assert parse_rate_limit(headers) is None


def test_the_warning_comes_back_after_the_window() -> None:
    now = [0.0]
    reports: list[tuple[str, int, int]] = []
    watch = RateLimitWatch(lambda *r: reports.append(r), clock=lambda: now[0])
    low = {"ratelimit-limit": "100;w=600", "ratelimit-remaining": "5;w=600"}
    warned = []
    for at in (0.0, 1.0, 599.0, 600.0, 601.0):
        now[0] = at
        with _capture() as records:
            watch.observe("hub", low)
        warned += [at] * len(records)
    assert warned == [0.0, 600.0]
    assert len(reports) == 5  # the gauge follows every answer


class _capture:
    """Records of the rate-limit logger within a block (no pytest fixture in a loop)."""

    def __enter__(self) -> list[logging.LogRecord]:
        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append  # type: ignore[method-assign]
        logging.getLogger(LIMIT_LOG).addHandler(self.handler)
        return self.records

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(LIMIT_LOG).removeHandler(self.handler)

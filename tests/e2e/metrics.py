"""pinhook's Prometheus metrics, read the way a scraper would: what pinhook itself counted.

The one place that knows where the metrics are served (``/metrics`` on the webhook's TLS port
today); re-point ``metrics_url`` when they move to a port of their own.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.pinhook import Pinhook

ADMISSIONS: Final = "pinhook_admission_requests_total"
IMAGES: Final = "pinhook_images_total"
CONFIG_RELOADS: Final = "pinhook_config_reloads_total"
CONFIG_VALID: Final = "pinhook_config_last_reload_valid"
SCRAPE_TIMEOUT_S: Final = 5.0


def metrics_url(pinhook: Pinhook) -> str:
    # Loopback: the test runs on pinhook's machine; the certificate is checked for pinhook.host.
    return f"https://127.0.0.1:{pinhook.port}/metrics"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class Metrics:
    samples: tuple[Sample, ...]

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 when none)."""
        return sum(
            sample.value
            for sample in self.samples
            if sample.name == name
            and all(sample.labels.get(key) == value for key, value in labels.items())
        )

    def admissions(self, kind: str, operation: str, result: str | None = None) -> float:
        """AdmissionReviews pinhook answered for ``kind``/``operation`` (``result``: patched,
        allowed, denied)."""
        labels = {"kind": kind, "operation": operation}
        return self.value(ADMISSIONS, **labels, **({"result": result} if result else {}))


def scrape(pinhook: Pinhook) -> Metrics:
    """One scrape, over TLS verified against pinhook's CA as issued for ``pinhook.host``."""
    context = ssl.create_default_context(cafile=str(pinhook.tls.ca))
    # The certificate names pinhook.host, which need not be 127.0.0.1: check it by that name.
    transport = httpx.HTTPTransport(verify=context)
    with httpx.Client(transport=transport, timeout=SCRAPE_TIMEOUT_S) as client:
        answer = client.get(metrics_url(pinhook), extensions={"sni_hostname": pinhook.host})
    answer.raise_for_status()
    samples = tuple(
        Sample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    )
    return Metrics(samples)

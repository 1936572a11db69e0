"""pinhook's Prometheus metrics, read the way a scraper would: what pinhook itself counted.

The one place that knows where the metrics are served: plain HTTP on pinhook's metrics port
(``serve --metrics-port``), never the webhook's TLS port.
"""

from __future__ import annotations

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
ANSWERS_RECALLED: Final = "pinhook_answers_recalled_total"
SCRAPE_TIMEOUT_S: Final = 5.0


def metrics_url(pinhook: Pinhook) -> str:
    # Loopback: the test runs on pinhook's machine, which serves its metrics there.
    return f"http://127.0.0.1:{pinhook.metrics_port}/metrics"


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
        unchanged, denied, skipped, audited)."""
        labels = {"kind": kind, "operation": operation}
        return self.value(ADMISSIONS, **labels, **({"result": result} if result else {}))


def scrape(pinhook: Pinhook) -> Metrics:
    """One scrape of the metrics port, as Prometheus does it."""
    answer = httpx.get(metrics_url(pinhook), timeout=SCRAPE_TIMEOUT_S)
    answer.raise_for_status()
    samples = tuple(
        Sample(sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    )
    return Metrics(samples)

"""Docker Hub's pull rate limit, as its answers state it.

Docker Hub sends, on HEAD and GET alike, ``ratelimit-limit: 100;w=21600`` and
``ratelimit-remaining: 20;w=21600`` (pulls; window in seconds) and ``docker-ratelimit-source``
(the address, or IPv6 prefix, the limit is counted for). A GET of a manifest counts as a pull,
a HEAD does not; an answer without the headers is not limited. The figures change between
plans and over time, so they are read, never assumed.

:class:`RateLimitWatch` reports every reading (the metric) and warns when the remaining pulls
drop below a fraction of the limit: once per window, not once per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..redact import scrub

log = logging.getLogger(__name__)

LOW_FRACTION = 0.1
DEFAULT_WINDOW_SECONDS = 21600  # Docker Hub's six hours, when an answer names no window


@dataclass(frozen=True, slots=True)
class RateLimit:
    limit: int
    remaining: int
    window_seconds: int
    source: str

    @property
    def low(self) -> bool:
        return self.remaining < self.limit * LOW_FRACTION

    @property
    def exhausted(self) -> bool:
        return self.remaining <= 0

    def describe(self) -> str:
        hours = self.window_seconds / 3600
        text = f"{self.remaining} of {self.limit} pulls left per {hours:g} h"
        return f"{text} for {self.source}" if self.source else text


def parse_rate_limit(headers: Mapping[str, str]) -> RateLimit | None:
    """The limit an answer states, or None when it states none (or nonsense)."""
    limit = _quota(headers.get("ratelimit-limit"))
    remaining = _quota(headers.get("ratelimit-remaining"))
    if limit is None or remaining is None or limit[0] <= 0:
        return None
    window = remaining[1] or limit[1] or DEFAULT_WINDOW_SECONDS
    source = scrub(str(headers.get("docker-ratelimit-source", "")).strip(), limit=64)
    return RateLimit(limit[0], max(0, remaining[0]), window, source)


def _quota(value: str | None) -> tuple[int, int | None] | None:
    """``N;w=S`` (a list ``N, N;w=S`` takes its first entry): the count and the window."""
    if not value:
        return None
    first = value.split(",")[0]
    count, *params = (part.strip() for part in first.split(";"))
    if not count.isdigit():
        return None
    window = None
    for param in params:
        name, _, number = param.partition("=")
        if name.strip().lower() == "w" and number.strip().isdigit():
            window = int(number.strip()) or None
    return int(count), window


class RateLimitWatch:
    """Reads each answer of one host that states a rate limit: the gauge, and a warning."""

    def __init__(
        self,
        report: Callable[[str, int, int], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._report = report
        self._clock = clock
        self._quiet_until: dict[str, float] = {}

    def observe(self, host: str, headers: Mapping[str, str]) -> RateLimit | None:
        stated = parse_rate_limit(headers)
        if stated is None:
            return None
        self._report(host, stated.remaining, stated.limit)
        now = self._clock()
        if stated.low and now >= self._quiet_until.get(host, 0.0):
            self._quiet_until[host] = now + stated.window_seconds
            log.warning(
                "Docker Hub's pull rate limit is running low (%s): %s; pinhook resolves with"
                " HEAD, which is not counted, but the nodes' pulls are",
                host,
                stated.describe(),
            )
        return stated

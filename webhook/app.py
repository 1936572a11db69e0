"""The HTTP surface: ``POST /mutate``, health, readiness and metrics.

The handler reads the raw body once, decodes it once (orjson) and writes the answer with
orjson: FastAPI's model validation would decode and copy the whole object again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import orjson
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .admission import (
    MAX_BODY_BYTES,
    AdmissionOutcome,
    AdmissionRequest,
    parse_review,
    render_response,
)
from .decide import OVERLOADED
from .errors import InvalidReview
from .listener import ARRIVED
from .metrics import Metrics
from .mutate import TIMEOUT_MARGIN, Mutator
from .plan import RequestPlan

log = logging.getLogger(__name__)

JSON = "application/json"
# Bodies this large are decoded and planned on a worker thread.
LARGE_BODY_BYTES = 256 * 1024
# Below this, resolving could not finish inside the API server's timeout: answer by policy.
MIN_BUDGET_SECONDS = 0.25


class Service(Protocol):
    """What the HTTP layer needs from the running webhook (see ``runtime.Runtime``)."""

    metrics: Metrics

    @property
    def mutator(self) -> Mutator: ...

    def readiness(self) -> tuple[bool, str]: ...


def create_app(
    service: Service,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
) -> FastAPI:
    app = FastAPI(
        title="pinhook",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan or _no_lifespan,
    )

    @app.post("/mutate")
    async def mutate(request: Request) -> Response:
        loop = asyncio.get_running_loop()
        arrived: float = request.scope.get(ARRIVED) or loop.time()
        body = await _read_limited(request)
        if isinstance(body, Response):
            return body
        mutator = service.mutator
        try:
            if len(body) > LARGE_BODY_BYTES:
                # Decoding and walking a huge object is CPU that cannot be capped: a worker
                # thread, so that the loop keeps answering everyone else meanwhile.
                review, plan = await asyncio.to_thread(_read_and_plan, mutator, body)
            else:
                review, plan = _read_and_plan(mutator, body)
        except InvalidReview as exc:
            service.metrics.admission("", "", "invalid")
            return _error(400, str(exc))
        except _PlanFailed as failed:
            review, plan = failed.review, None
        try:
            timeout = request.query_params.get("timeout")
            outcome = await _answer(mutator, review, plan, timeout, arrived)
        except Exception:
            # Whatever went wrong, the API server gets an answer its policy allows, never a
            # 500: under failurePolicy Ignore a 500 would admit what requireDigest denies.
            log.exception("review %s of %s failed; answered by policy", review.uid, review.kind)
            outcome = mutator.failed(review)
        result = "allowed" if outcome.allowed else "denied"
        if outcome.allowed and outcome.patch:
            result = "patched"
        service.metrics.admission(review.kind, review.operation, result)
        service.metrics.admission_seconds.observe(loop.time() - arrived)
        return Response(render_response(review.api_version, review.uid, outcome), media_type=JSON)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/readyz")
    async def readyz() -> Response:
        ready, reason = service.readiness()
        body = orjson.dumps({"ready": ready, "reason": reason})
        return Response(body, status_code=200 if ready else 503, media_type=JSON)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


@asynccontextmanager
async def _no_lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield


class _PlanFailed(Exception):
    """Planning failed after the review was read: answered by policy."""

    def __init__(self, review: AdmissionRequest) -> None:
        super().__init__(review.uid)
        self.review = review


def _read_and_plan(mutator: Mutator, body: bytes) -> tuple[AdmissionRequest, RequestPlan]:
    review = parse_review(body)
    try:
        return review, mutator.plan(review)
    except Exception as exc:
        log.exception("planning review %s of %s failed", review.uid, review.kind)
        raise _PlanFailed(review) from exc


async def _answer(
    mutator: Mutator,
    review: AdmissionRequest,
    plan: RequestPlan | None,
    timeout_query: str | None,
    arrived: float,
) -> AdmissionOutcome:
    """The outcome: at once when every digest is cached; by policy, without asking any
    registry, when the request waited so long that no time is left; else after resolving."""
    if plan is None:
        return mutator.failed(review)
    results = mutator.settled(plan)
    if results is not None:
        return mutator.conclude(plan, results)
    waited = asyncio.get_running_loop().time() - arrived
    budget = mutator.budget(timeout_query) - waited
    if budget < MIN_BUDGET_SECONDS:
        log.warning(
            "review %s of %s waited %.1fs before it could start; answered by policy",
            review.uid,
            review.kind,
            waited,
        )
        return mutator.conclude(plan, None, OVERLOADED)
    try:
        # asyncio.timeout, not wait_for: no extra task per request.
        async with asyncio.timeout(budget + TIMEOUT_MARGIN / 2):
            results = await mutator.resolve(plan, budget)
    except TimeoutError:
        # The resolver keeps its own deadline; this is the guard of last resort.
        log.error("review %s of %s timed out after %.1fs", review.uid, review.kind, budget)
        return mutator.conclude(plan, None)
    return mutator.conclude(plan, results)


async def _read_limited(request: Request) -> bytes | Response:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return _error(413, f"body larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return _error(413, f"body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, reason: str) -> Response:
    return Response(orjson.dumps({"error": reason}), status_code=status, media_type=JSON)

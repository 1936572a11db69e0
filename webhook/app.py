"""The HTTP surface: ``POST /mutate``, health, readiness and metrics.

The handler reads the raw body once, decodes it once (orjson) and writes the answer with
orjson: FastAPI's model validation would decode and copy the whole object again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import orjson
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .admission import MAX_BODY_BYTES, parse_review, render_response
from .errors import InvalidReview
from .metrics import Metrics
from .mutate import TIMEOUT_MARGIN, Mutator

log = logging.getLogger(__name__)

JSON = "application/json"


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
        started = time.perf_counter()
        body = await _read_limited(request)
        if isinstance(body, Response):
            return body
        try:
            review = parse_review(body)
        except InvalidReview as exc:
            service.metrics.admission("", "", "invalid")
            return _error(400, str(exc))
        mutator = service.mutator
        budget = mutator.budget(request.query_params.get("timeout"))
        try:
            # asyncio.timeout, not wait_for: no extra task per request on the hot path.
            async with asyncio.timeout(budget + TIMEOUT_MARGIN / 2):
                outcome = await mutator.review(review, budget=budget)
        except TimeoutError:
            # The resolver keeps its own deadline; this is the guard of last resort.
            log.error("review %s of %s timed out after %.1fs", review.uid, review.kind, budget)
            outcome = mutator.timed_out(review)
        except Exception:
            # Whatever went wrong, the API server gets an answer its policy allows, never a
            # 500: under failurePolicy Ignore a 500 would admit what requireDigest denies.
            log.exception("review %s of %s failed; answered by policy", review.uid, review.kind)
            outcome = mutator.failed(review)
        result = "allowed" if outcome.allowed else "denied"
        if outcome.allowed and outcome.patch:
            result = "patched"
        service.metrics.admission(review.kind, review.operation, result)
        service.metrics.admission_seconds.observe(time.perf_counter() - started)
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

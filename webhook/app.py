"""The HTTP surface: ``POST /mutate``, health and readiness (metrics have a port of their own).

``POST /mutate`` is plain ASGI, in front of FastAPI: it is every admission of the cluster, and
FastAPI's routing, middleware and Request/Response objects cost more per request than
pinhook's own work on a cached image. It reads the raw body once, decodes it once (orjson)
and writes the answer with orjson; a review that differs from an earlier one only in its uid
(the Pods of one ReplicaSet) is answered as that one was, while its decision stands
(``answers.py``). FastAPI serves the rest (health, readiness, 404s) and runs
the lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol
from urllib.parse import parse_qsl

import orjson
from fastapi import FastAPI, Response

from .admission import (
    MAX_BODY_BYTES,
    AdmissionRequest,
    decode_review,
    parse_review,
    read_review,
    render_response,
)
from .answers import Answer, Answers, LikeReview, decoded_like, like_review
from .decide import DENIED, OVERLOADED, SKIPPED, Decision
from .errors import InvalidReview
from .listener import ARRIVED
from .logs import Line
from .metrics import Counts, Metrics
from .mutate import TIMEOUT_MARGIN, Mutator
from .plan import InvalidImage, RequestPlan
from .redact import scrub

log = logging.getLogger(__name__)

JSON = "application/json"
# Bodies this large are decoded and planned on a worker thread.
LARGE_BODY_BYTES = 256 * 1024
# Below this, resolving could not finish inside the API server's timeout: answer by policy.
MIN_BUDGET_SECONDS = 0.25
# Images named in one admission log line; the rest are counted.
MAX_LOGGED_IMAGES = 10
# Characters of one image, and of the reason, in that line: a valid reference has a few
# hundred at most, but an invalid one may be a megabyte.
MAX_LOGGED_IMAGE = 256
MAX_LOGGED_REASON = 1024
# The admission line's fields that differ between like reviews, filled in as it is written.
ADMISSION_BLANKS = ("uid", "durationMs")


class Service(Protocol):
    """What the HTTP layer needs from the running webhook (see ``runtime.Runtime``)."""

    metrics: Metrics

    @property
    def mutator(self) -> Mutator: ...

    def readiness(self) -> tuple[bool, str]: ...


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def create_app(
    service: Service,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
) -> AdmissionApp:
    app = FastAPI(
        title="pinhook",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan or _no_lifespan,
    )

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/readyz")
    async def readyz() -> Response:
        ready, reason = service.readiness()
        body = orjson.dumps({"ready": ready, "reason": reason})
        return Response(body, status_code=200 if ready else 503, media_type=JSON)

    return AdmissionApp(service, app)


class AdmissionApp:
    """The ASGI app: ``/mutate`` here, everything else (and the lifespan) by ``rest``."""

    def __init__(self, service: Service, rest: FastAPI) -> None:
        self.service = service
        self.rest = rest
        self._answers: Answers | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/mutate":
            await self.rest(scope, receive, send)
        elif scope["method"] != "POST":
            await _send(send, 405, _error_body("only POST"), ((b"allow", b"POST"),))
        else:
            try:
                status, body = await self._mutate(scope, receive)
            except _Disconnected:
                log.debug("a client left before its admission request was whole")
                return
            await _send(send, status, body)

    async def _mutate(self, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        service = self.service
        loop = asyncio.get_running_loop()
        arrived: float = scope.get(ARRIVED) or time.monotonic()
        body = await _read_body(scope, receive)
        if body is None:
            return 413, _error_body(f"body larger than {MAX_BODY_BYTES} bytes")
        mutator = service.mutator
        answers = self._answers
        if answers is None or answers.mutator is not mutator:
            answers = self._answers = Answers(mutator)
        like = like_review(body)
        answer = answers.get(like.key) if like is not None else None
        if like is not None and answer is not None:
            standing = self._standing(answers, answer, like.uid, arrived, loop)
            if standing is not None:
                return 200, standing
        try:
            if len(body) > LARGE_BODY_BYTES:
                # Decoding and walking a huge object is CPU that cannot be capped: a worker
                # thread, so that the loop keeps answering everyone else meanwhile.
                review, plan = await asyncio.to_thread(_read_and_plan, mutator, body)
            else:
                review, plan, answer = _recall_or_plan(answers, body, like, answer)
        except InvalidReview as exc:
            service.metrics.admission("", "", "invalid")
            return 400, _error_body(str(exc))
        except _PlanFailed as failed:
            review, plan = failed.review, None
        try:
            decision = await _answer(mutator, review, plan, scope["query_string"], arrived)
        except Exception:
            # Whatever went wrong, the API server gets an answer its policy allows, never a
            # 500: under failurePolicy Ignore a 500 would admit what requireDigest denies.
            log.exception("review %s of %s failed; answered by policy", review.uid, review.kind)
            decision = mutator.failed(review)
        kept = (answers, answer) if answer is not None else None
        return 200, self._answered(review, plan, decision, kept, arrived, loop)

    def _standing(
        self,
        answers: Answers,
        answer: Answer,
        uid: str,
        arrived: float,
        loop: asyncio.AbstractEventLoop,
    ) -> bytes | None:
        """The answer to the like review of ``uid`` while the decision ``answer`` was last
        rendered for stands: the common admission, a ReplicaSet's next Pod, with nothing
        decoded, looked up (but the entries it rests on), decided or rendered. None when it
        does not stand, or was never found to."""
        if answer.decision is None:
            return None
        try:
            standing = answers.mutator.standing(answer.plan)
        except Exception:  # the general path decides it, and answers by policy if it fails
            log.exception("recalling the answer for review %s failed", uid)
            return None
        if standing is None:
            return None
        decision, settled = standing
        if decision is not answer.decision or answer.counts is None:
            self.service.metrics.count(settled)
            review = answer.request(uid)
            return self._answered(review, answer.plan, decision, (answers, answer), arrived, loop)
        return self._rendered(answer, uid, decision, arrived, loop, answer.with_settled(settled))

    def _answered(
        self,
        review: AdmissionRequest,
        plan: RequestPlan | None,
        decision: Decision,
        kept: tuple[Answers, Answer] | None,
        arrived: float,
        loop: asyncio.AbstractEventLoop,
    ) -> bytes:
        """The answer to ``review``, counted and logged; rendered once for its like reviews
        when ``kept`` says where they find it."""
        line: Line | None = None
        answer = kept[1] if kept is not None else None
        recalled = answer is not None and answer.decision is decision
        if kept is not None and not recalled:
            line = _log_line(review, plan, decision)
            added = self.service.metrics.admission_counts(
                review.kind, review.operation, decision.result
            )
            if not kept[0].settle(kept[1], decision, line, added):
                answer = None
        if answer is not None:
            counts = answer.counts if recalled else None
            return self._rendered(answer, review.uid, decision, arrived, loop, counts)
        seconds = time.monotonic() - arrived
        metrics = self.service.metrics
        metrics.admission(review.kind, review.operation, decision.result)
        metrics.admission_seconds.observe(seconds)
        if log.isEnabledFor(logging.INFO):
            line = line or _log_line(review, plan, decision)
            line.write(review.uid, _milliseconds(seconds), loop=loop)
        return render_response(review.api_version, review.uid, decision.outcome)

    def _rendered(
        self,
        answer: Answer,
        uid: str,
        decision: Decision,
        arrived: float,
        loop: asyncio.AbstractEventLoop,
        counts: Counts | None,
    ) -> bytes:
        """``answer``'s answer and log line as rendered for ``decision``, for the review of
        ``uid``; ``counts`` what it adds to the metrics when they were rendered for an
        earlier review (``Answer.counts``), else it is counted as a new admission."""
        metrics = self.service.metrics
        seconds = time.monotonic() - arrived
        if counts is not None:
            metrics.count(counts)
        else:
            review = answer.review
            metrics.admission(review.kind, review.operation, decision.result)
        metrics.admission_seconds.observe(seconds)
        if answer.log_line is not None:
            answer.log_line.write(uid, _milliseconds(seconds), loop=loop)
        return answer.response(uid)


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
    return review, _planned(mutator, review)


def _recall_or_plan(
    answers: Answers, body: bytes, like: LikeReview | None, answer: Answer | None
) -> tuple[AdmissionRequest, RequestPlan, Answer | None]:
    """The review and its plan: recalled when a review like it (``answers.py``) was planned,
    its ``answer`` found under ``like``'s key."""
    decoded = None
    if like is not None:
        if answer is not None:
            return answer.request(like.uid), answer.plan, answer
        # The first review of a key is read as any other, and nothing is kept for it.
        decoded = decoded_like(like) if answers.seen_again(like.key) else None
        if decoded is None:
            like = None
    if decoded is None:
        decoded = decode_review(body)
    review = read_review(decoded)
    plan = _planned(answers.mutator, review)
    if like is None or review.operation != "CREATE":
        return review, plan, None
    return review, plan, answers.keep(like.key, review, plan)


def _planned(mutator: Mutator, review: AdmissionRequest) -> RequestPlan:
    try:
        return mutator.plan(review)
    except Exception as exc:
        log.exception("planning review %s of %s failed", review.uid, review.kind)
        raise _PlanFailed(review) from exc


async def _answer(
    mutator: Mutator,
    review: AdmissionRequest,
    plan: RequestPlan | None,
    query: bytes,
    arrived: float,
) -> Decision:
    """The outcome: at once when every digest is cached; by policy, without asking any
    registry, when the request waited so long that no time is left; else after resolving."""
    if plan is None:
        return mutator.failed(review)
    results = mutator.settled(plan)
    if results is not None:
        return mutator.conclude(plan, results)
    waited = time.monotonic() - arrived
    budget = mutator.budget(_timeout_parameter(query)) - waited
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


def _log_line(review: AdmissionRequest, plan: RequestPlan | None, decision: Decision) -> Line:
    """The one INFO line of an admission: who asked for what, what pinhook did, and what
    became of each image (the first MAX_LOGGED_IMAGES, the rest counted); its uid and
    duration are filled in when it is written (``logs.Line``), once or for each like review."""
    images: list[str] = []
    more = 0
    for result in decision.results:
        if len(images) == MAX_LOGGED_IMAGES:
            more += 1
            continue
        image = result.plan.field.image
        shown = _shortened(image, MAX_LOGGED_IMAGE)
        if result.failure is not None:
            images.append(f"{shown} unpinned: {result.failure.reason}")
        elif result.final != image:
            images.append(f"{shown} -> {_shortened(result.final, MAX_LOGGED_IMAGE)}")
        else:
            images.append(f"{shown} unchanged")
    for entry in plan.images if plan is not None else ():
        if isinstance(entry, InvalidImage):
            if len(images) == MAX_LOGGED_IMAGES:
                more += 1
            else:
                images.append(f"{_shortened(entry.field.image, MAX_LOGGED_IMAGE)} invalid")
    fields: dict[str, object] = {
        "uid": "",
        "kind": review.kind,
        "namespace": review.namespace or "",
        "name": review.name,
        "operation": review.operation,
        "dryRun": review.dry_run,
        "outcome": decision.result,
        "durationMs": 0.0,
        "images": images,
    }
    if more:
        fields["imagesNotShown"] = more
    if decision.result == DENIED and decision.outcome.message:
        fields["reason"] = _shortened(decision.outcome.message, MAX_LOGGED_REASON)
    elif decision.result == SKIPPED and plan is not None and plan.skipped:
        fields["reason"] = plan.skipped
    return Line(log, f"admission {decision.result}", fields, ADMISSION_BLANKS)


def _milliseconds(seconds: float) -> float:
    # round(x, 2) is three times this, on every admission.
    return int(seconds * 100_000 + 0.5) / 100


def _shortened(text: str, limit: int) -> str:
    """``text`` as is when at most ``limit`` characters, else its start, scrubbed, and "..."."""
    if len(text) <= limit:
        return text
    # Cut before scrubbing: its patterns cost a fifth of a second on a megabyte.
    return scrub(text[:limit], limit) + "..."


def _timeout_parameter(query: bytes) -> str | None:
    """The ``timeout`` the API server appends to the URL (``?timeout=10s``), if any."""
    for name, value in parse_qsl(query.decode("latin-1")):
        if name == "timeout":
            return value
    return None


async def _read_body(scope: Scope, receive: Receive) -> bytes | None:
    """The request body, or None as soon as it is known to be over MAX_BODY_BYTES."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > MAX_BODY_BYTES:
                return None
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _Disconnected(Exception):
    """The client closed the connection before its request was whole."""


async def _send(
    send: Send, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error_body(reason: str) -> bytes:
    return orjson.dumps({"error": reason})

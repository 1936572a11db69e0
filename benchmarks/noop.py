"""The do-nothing webhook pinhook is measured against: decode the review, echo its uid, allow.

With ANSWER, a file holding an AdmissionResponse, it answers every review with that response
and the review's uid instead: the floor for any webhook that answers this workload with what
pinhook answers (the same bytes to send), without working anything out.

It runs on the stack `pinhook serve` runs on (uvicorn, with uvloop and httptools when
installed, TLS from the same certificate) and, like pinhook's ``/mutate``, as plain ASGI
without FastAPI's routing and request objects, so the ratio measures pinhook's own work.
The benchmark reads which loop and parser each server really loaded from /proc.

    noop.py PORT CERT KEY [ANSWER]
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import uvicorn

Message = MutableMapping[str, Any]
HEADERS = [(b"content-type", b"application/json")]
# The response given to every review, when one was named (see the module's docstring).
ANSWER: dict[str, Any] = {"allowed": True}


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    if scope["path"] == "/mutate":
        review = orjson.loads(b"".join(chunks))
        body = orjson.dumps(
            {
                "apiVersion": review["apiVersion"],
                "kind": "AdmissionReview",
                "response": {**ANSWER, "uid": review["request"]["uid"]},
            }
        )
    else:  # /healthz
        body = b"{}"
    headers = [*HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    if len(sys.argv) > 4:
        with open(sys.argv[4], "rb") as answer:
            ANSWER = orjson.loads(answer.read())
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ssl_certfile=cert,
        ssl_keyfile=key,
        loop="uvloop" if _installed("uvloop") else "asyncio",
        http="httptools" if _installed("httptools") else "h11",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
    )

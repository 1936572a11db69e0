"""The do-nothing webhook pinhook is measured against: decode the review, echo its uid, allow.

With ANSWER, a file holding an AdmissionResponse, it answers every review with that response
and the review's uid instead: the floor for any webhook that answers this workload with what
pinhook answers (the same bytes to send), without working anything out.

It runs on the stack `pinhook serve` runs on: uvicorn, with uvloop and httptools when
installed, behind pinhook's own listener (``webhook/listener.py``: its TLS, connection cap and
request deadlines, and its answers sent in one TLS record), with the same certificate; and,
like pinhook's ``/mutate``, as plain ASGI without FastAPI's routing and request objects, so
the ratio measures pinhook's own work. With ``--uvicorn-tls`` it runs on uvicorn's own TLS
instead, as any ASGI app would. The benchmark reads which loop and parser each server really
loaded from /proc.

    python -m benchmarks.noop PORT CERT KEY [ANSWER] [--uvicorn-tls]
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from webhook.listener import ConnectionLimits, ListenerState, guarded_protocol
from webhook.tls import server_context

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


class _Uncounted:
    """Where the listener reports closed connections: nowhere, nothing is measured."""

    def connection_closed(self, reason: str) -> None:
        pass


def main() -> None:
    global ANSWER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("cert")
    parser.add_argument("key")
    parser.add_argument("answer", nargs="?")
    parser.add_argument("--uvicorn-tls", action="store_true")
    args = parser.parse_args()
    if args.answer:
        with open(args.answer, "rb") as answer:
            ANSWER = orjson.loads(answer.read())
    http = "httptools" if _installed("httptools") else "h11"
    tls: dict[str, Any]
    if args.uvicorn_tls:
        tls = {"http": http, "ssl_certfile": args.cert, "ssl_keyfile": args.key}
    else:
        context = server_context(Path(args.cert), Path(args.key))
        listener = ListenerState(context, ConnectionLimits(), _Uncounted())
        tls = {"http": guarded_protocol(listener, http), "ws": "none"}
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop" if _installed("uvloop") else "asyncio",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        **tls,
    )


if __name__ == "__main__":
    main()

"""The do-nothing webhook pinhook is measured against: decode the review, echo its uid, allow.

It runs on the stack `pinhook serve` runs on (FastAPI on uvicorn, with uvloop and httptools
when installed, TLS from the same certificate), so the ratio measures pinhook's own work.
The benchmark reads which loop and parser each server really loaded from /proc.

    noop.py PORT CERT KEY
"""

from __future__ import annotations

import importlib.util
import sys

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@app.post("/mutate")
async def mutate(request: Request) -> Response:
    review = orjson.loads(await request.body())
    answer = {
        "apiVersion": review["apiVersion"],
        "kind": "AdmissionReview",
        "response": {"uid": review["request"]["uid"], "allowed": True},
    }
    return Response(orjson.dumps(answer), media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b"{}", media_type="application/json")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ssl_certfile=cert,
        ssl_keyfile=key,
        loop="uvloop" if _installed("uvloop") else "asyncio",
        http="httptools" if _installed("httptools") else "h11",
        log_level="warning",
        access_log=False,
        server_header=False,
    )

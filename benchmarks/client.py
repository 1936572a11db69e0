"""The benchmark's own load client, run as a separate process like wrk.

It sends prepared AdmissionReviews over kept-alive TLS connections and records every answer:
its latency, HTTP status and what the webhook decided. wrk is the better tool for steady
throughput, but it cannot send an exact number of requests and its latency histogram gets
coordinated-omission samples added afterwards, so the scenarios that need every answer of an
exact burst (cold tags, traffic counts, the 2,000-tag burst) use this. Without wrk it also
drives the throughput rounds, and the report says so.

Raw asyncio streams (uvloop when installed) rather than an HTTP library: the client shares
the two cores with the server it measures, so it must cost little per request.

    client.py URL CA BODIES --concurrency N [--seconds S] --out RESULT.json

BODIES holds one request body per line. Without ``--seconds`` each body is sent once
(exact mode); with it, the bodies are sent round-robin until S seconds have passed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import orjson

CONNECT_SECONDS = 30.0


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    allowed: int = 0
    denied: int = 0
    warned: int = 0
    patched: int = 0
    pinned: int = 0  # images pinned, summed over all answers
    errors: int = 0
    elapsed: float = 0.0
    samples: list[str] = field(default_factory=list)  # a few warnings and denials, verbatim

    def record(self, seconds: float, status: int, body: bytes) -> None:
        self.latencies.append(seconds)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status != 200:
            return
        response = orjson.loads(body).get("response", {})
        if response.get("allowed"):
            self.allowed += 1
        else:
            self.denied += 1
            self._sample(str(response.get("status", {}).get("message", "")))
        if response.get("warnings"):
            self.warned += 1
            self._sample(str(response["warnings"][0]))
        if response.get("patch"):
            self.patched += 1
            self.pinned += _pinned(response["patch"])

    def _sample(self, text: str) -> None:
        if len(self.samples) < 3:
            self.samples.append(text[:300])


def _pinned(patch: str) -> int:
    return base64.b64decode(patch).count(b"@sha256:")


class Connection:
    def __init__(self, host: str, port: int, tls: ssl.SSLContext) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.tls), CONNECT_SECONDS
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None
        assert self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = head.lower()
        if b"transfer-encoding: chunked" in headers:
            body = await self._chunked()
        else:
            length = _content_length(headers)
            body = await self.reader.readexactly(length)
        if b"connection: close" in headers:
            self.close()
        return status, body

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        chunks = []
        while size := int((await self.reader.readline()).split(b";")[0].strip() or b"0", 16):
            chunks.append(await self.reader.readexactly(size))
            await self.reader.readline()
        await self.reader.readline()
        return b"".join(chunks)


def _content_length(headers: bytes) -> int:
    at = headers.find(b"content-length:")
    if at < 0:
        return 0
    return int(headers[at + 15 : headers.index(b"\r\n", at)].strip())


class Requests:
    """The requests to send, in turn; with a ``counter`` mark, each one sent is written anew
    with the number of requests sent so far (from ``first``, 8 hex digits) over the mark."""

    def __init__(self, requests: list[bytes], counter: bytes | None, first: int) -> None:
        self._split = [request.split(counter) if counter else [request] for request in requests]
        self._sent = first

    def __len__(self) -> int:
        return len(self._split)

    def __getitem__(self, index: int) -> bytes:
        parts = self._split[index]
        if len(parts) == 1:
            return parts[0]
        self._sent += 1
        return (b"%08x" % (self._sent % 2**32)).join(parts)


def _requests(url: str, bodies: list[bytes]) -> list[bytes]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Content-Type: application/json\r\nContent-Length: "
    )
    return [f"{head}{len(body)}\r\n\r\n".encode() + body for body in bodies]


async def drive(
    url: str,
    ca: str,
    bodies: list[bytes],
    concurrency: int,
    seconds: float | None,
    counter: bytes | None = None,
    first: int = 0,
) -> Results:
    parts = urlsplit(url)
    tls = ssl.create_default_context(cafile=ca)
    requests = Requests(_requests(url, bodies), counter, first)
    connections = [
        Connection(parts.hostname or "127.0.0.1", parts.port or 443, tls)
        for _ in range(min(concurrency, len(requests)) if seconds is None else concurrency)
    ]
    # Connect first: an API server keeps its connections open, so handshakes are not timed.
    await asyncio.gather(*(connection.open() for connection in connections))
    results = Results()
    started = time.perf_counter()
    stop = started + seconds if seconds is not None else None
    next_index = 0

    async def worker(connection: Connection) -> None:
        nonlocal next_index
        while True:
            if stop is None:
                if next_index >= len(requests):
                    return
                request = requests[next_index]
            elif time.perf_counter() >= stop:
                return
            else:
                request = requests[next_index % len(requests)]
            next_index += 1
            began = time.perf_counter()
            try:
                status, body = await connection.exchange(request)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                results.errors += 1
                connection.close()
                continue
            results.record(time.perf_counter() - began, status, body)

    await asyncio.gather(*(worker(connection) for connection in connections))
    results.elapsed = time.perf_counter() - started
    for connection in connections:
        connection.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("ca")
    parser.add_argument("bodies", type=Path)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--counter", help="the mark each request's number is written over")
    parser.add_argument("--first", type=int, default=0, help="the first request's number")
    args = parser.parse_args()
    bodies = [line for line in args.bodies.read_bytes().splitlines() if line]
    counter = args.counter.encode() if args.counter else None
    with asyncio.Runner(loop_factory=_fast_loop()) as runner:
        results = runner.run(
            drive(args.url, args.ca, bodies, args.concurrency, args.seconds, counter, args.first)
        )
    args.out.write_bytes(orjson.dumps(results, option=orjson.OPT_NON_STR_KEYS))


def _fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    main()

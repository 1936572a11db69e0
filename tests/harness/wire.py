"""Answers of the harness's loopback HTTP servers, each sent in one write.

``http.server`` writes the status line and headers in one ``send`` and the body in a second.
With Nagle's algorithm on, the second small segment waits for the ACK of the first, which the
client delays (Linux: up to 40 ms): the token issuer and the counting proxy stalled that long
on many answers, which made every latency measured through them meaningless. Here the whole
answer goes out in one write, and the socket has TCP_NODELAY as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler


class OneWriteHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # StreamRequestHandler.setup sets TCP_NODELAY

    def answer(self, status: int, headers: Mapping[str, str], body: bytes = b"") -> None:
        """Status line, headers and body in one write.

        Content-Length is added unless given (and never for HEAD, whose given length is the
        GET's); a HEAD, 204 or 304 answer carries no body.
        """
        reason = self.responses.get(status, ("",))[0]
        lines = [f"{self.protocol_version} {status} {reason}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        named = {name.lower() for name in headers}
        if self.command != "HEAD" and "content-length" not in named:
            lines.append(f"Content-Length: {len(body)}")
        if headers.get("Connection", "").lower() == "close":
            self.close_connection = True
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        with_body = self.command != "HEAD" and status not in (204, 304)
        self.wfile.write(head + body if with_body else head)

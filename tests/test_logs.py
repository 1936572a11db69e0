"""One logging setup: one formatter, one line per record, the HTTP clients quiet unless asked."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from webhook import logs


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup() configures the process's loggers: put back what pytest had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {name: logging.getLogger(name) for name in ("httpx", "httpcore", "uvicorn.error")}
    saved = {name: (lg.level, list(lg.handlers), lg.propagate) for name, lg in named.items()}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, (lvl, hs, propagate) in saved.items():
        named[name].setLevel(lvl)
        named[name].handlers[:] = hs
        named[name].propagate = propagate


def emitted(fmt: str, level: str = "info", **options: bool) -> tuple[io.StringIO, logging.Logger]:
    stream = io.StringIO()
    logs.setup(level, fmt, stream=stream, **options)
    return stream, logging.getLogger("webhook.test")


def test_json_is_one_object_per_line_with_the_fields_merged() -> None:
    stream, log = emitted("json")
    log.error("config rejected:\n  - a\n  - b", extra={logs.FIELDS: {"uid": "1", "n": 2}})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "config rejected:\n  - a\n  - b"
    assert (first["level"], first["logger"], first["uid"], first["n"]) == (
        "error",
        "webhook.test",
        "1",
        2,
    )
    assert first["time"].endswith("Z")
    assert "ValueError: boom" in second["exc"]


def test_text_is_one_line_per_record() -> None:
    stream, log = emitted("text")
    log.warning(
        "config rejected:\n  - a", extra={logs.FIELDS: {"images": ["a -> b", "c"], "dryRun": False}}
    )
    (line,) = stream.getvalue().splitlines()
    assert " WARNING webhook.test: config rejected:\\n  - a " in line
    assert line.endswith('images="a -> b, c" dryRun=false')


def test_http_clients_stay_at_warning_unless_asked() -> None:
    stream, _ = emitted("json")
    logging.getLogger("httpx").info("HTTP Request: GET https://r.example/v2/")
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")
    logging.getLogger("uvicorn.error").info("Application startup complete.")
    logging.getLogger("uvicorn.error").error("Exception in ASGI application")
    (only,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert only["logger"] == "uvicorn" and only["level"] == "error"

    stream, _ = emitted("json", "debug")
    logging.getLogger("httpx").info("HTTP Request: GET https://r.example/v2/")
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")
    assert [json.loads(line)["logger"] for line in stream.getvalue().splitlines()] == ["httpx"]

    stream, _ = emitted("json", "debug", http_trace=True)
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")
    assert json.loads(stream.getvalue())["logger"] == "httpcore.http11"


def test_third_party_text_is_scrubbed() -> None:
    stream, _ = emitted("json", "debug")
    logging.getLogger("httpx").info("GET https://bob:builder@r.example/token?password=builder")
    assert "builder" not in stream.getvalue()


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="verbose"):
        logs.setup("verbose", "json", stream=io.StringIO())
    with pytest.raises(ValueError, match="xml"):
        logs.setup("info", "xml", stream=io.StringIO())


def test_the_default_format_follows_the_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.default_format(Terminal()) == "text"
    assert logs.default_format(io.StringIO()) == "json"


def test_timestamps_follow_the_clock_across_seconds() -> None:
    formatter = logs.JsonFormatter()
    for created in (1700000000.001, 1700000000.999, 1700000001.5, 1699999999.25):
        record = logging.LogRecord("pinhook", logging.INFO, __file__, 1, "m", None, None)
        record.created = created
        record.msecs = (created - int(created)) * 1000
        expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        expected += f".{int(record.msecs):03d}Z"
        assert json.loads(formatter.format(record))["time"] == expected

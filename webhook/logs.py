"""One logging setup for the whole process: pinhook, uvicorn and the HTTP clients.

Every record goes through one handler on the root logger and one formatter, ``json`` (one
object per line, for log collectors; the manifests' default) or ``text`` (for people, the
default on a terminal). Either way a record is exactly one line: newlines in a message (a
config error lists its problems on several lines) or a traceback are escaped, so no collector
splits one event into several.

Structured fields travel in ``extra={"fields": {...}}``: the JSON formatter merges them into the
object, the text formatter appends them as ``key=value``.

The HTTP clients' own loggers (httpx and its twin httpx2 under lightkube, and httpcore below
them) say one line per request at INFO and a dozen per request at DEBUG: they are held at
WARNING, httpx at DEBUG with ``--log-level debug``, httpcore only with ``--log-http-trace``.
Their text is scrubbed (``redact.scrub``) before it is written: they print URLs, and a URL is
text a registry chose.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, TextIO

import orjson

from .redact import scrub

LEVELS: Final = ("debug", "info", "warning", "error", "critical")
FORMATS: Final = ("json", "text")
FIELDS: Final = "fields"  # the ``extra`` key structured fields travel under

# Loggers of the libraries pinhook runs on; quiet unless asked.
REQUEST_LOGGERS: Final = ("httpx", "httpx2")
TRACE_LOGGERS: Final = ("httpcore", "httpcore2")
SERVER_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.asgi")
_THIRD_PARTY: Final = (*REQUEST_LOGGERS, *TRACE_LOGGERS, "uvicorn")
# uvicorn's own name for its main logger says nothing about errors: call it what it is.
_RENAMED: Final = {"uvicorn.error": "uvicorn"}
_MAX_THIRD_PARTY_TEXT: Final = 4000


def default_format(stream: TextIO | None = None) -> str:
    """``text`` for a person at a terminal, ``json`` for everything else."""
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def setup(
    level: str = "info",
    fmt: str | None = None,
    *,
    http_trace: bool = False,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Route every logger through one handler on ``stream`` (stderr); returns the handler.

    Calling it again replaces the handler: the last call wins.
    """
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    stream = stream or sys.stderr
    fmt = fmt or default_format(stream)
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    _record_only_what_is_written()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    debug = level == "debug"
    for name in (*REQUEST_LOGGERS, *SERVER_LOGGERS):
        # uvicorn repeats at INFO what pinhook says itself ("listening"), and its errors are
        # WARNING and above.
        _route(name, logging.DEBUG if debug else logging.WARNING)
    for name in TRACE_LOGGERS:
        _route(name, logging.DEBUG if http_trace else logging.WARNING)
    return handler


def _record_only_what_is_written() -> None:
    # Neither formatter writes the caller, thread or process; every admission logs a line,
    # and finding the caller's frame is a third of what a record costs (the logging HOWTO's
    # "Optimization" section names these switches).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _route(name: str, level: int) -> None:
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(level)


def _message(record: logging.LogRecord) -> str:
    message = record.getMessage()
    if record.name.startswith(_THIRD_PARTY):
        message = scrub(message, _MAX_THIRD_PARTY_TEXT)
    return message


class _Timestamps:
    """RFC 3339 UTC times to the millisecond; the seconds part is formatted once a second
    (strftime is most of a timestamp's cost, and every admission logs a line)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, FIELDS, None)
    return fields if isinstance(fields, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, the record's fields, exc."""

    def __init__(self) -> None:
        super().__init__()
        self._timestamp = _Timestamps()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._timestamp(record),
            "level": record.levelname.lower(),
            "logger": _RENAMED.get(record.name, record.name),
            "msg": _message(record),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message key=value ...`` on one line."""

    def __init__(self) -> None:
        super().__init__()
        self._timestamp = _Timestamps()

    def format(self, record: logging.LogRecord) -> str:
        name = _RENAMED.get(record.name, record.name)
        line = f"{self._timestamp(record)} {record.levelname} {name}: {_one_line(_message(record))}"
        fields = _fields(record)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        if record.exc_info:
            line += " exc=" + _one_line(self.formatException(record.exc_info))
        return line


def _one_line(text: str) -> str:
    if "\n" not in text and "\r" not in text:
        return text
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        value = ", ".join(_item(v) for v in value)
    elif isinstance(value, Mapping):
        value = _item(value)
    text = str(value)
    if text and not any(c in text for c in ' "=\n\r\\'):
        return text
    return orjson.dumps(text).decode()


def _item(value: Any) -> str:
    if isinstance(value, Mapping):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)
